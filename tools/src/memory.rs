//! Resident memory of this process, for the numbers the CLI reports.

/// (current, peak) resident set size in MiB, from /proc/self/status; None where that file is absent.
pub fn resident_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// "123 MiB resident (peak 456 MiB)", or an empty string where unknown.
pub fn describe() -> String {
    resident_mib().map(|(now, peak)| format!("{now:.0} MiB resident (peak {peak:.0} MiB)")).unwrap_or_default()
}
