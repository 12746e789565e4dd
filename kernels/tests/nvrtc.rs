//! Compilation: every kernel family through NVRTC (the library the CUDA backend compiles with at run
//! time) for compute_80 and compute_90, then assembled by `ptxas -v` for sm_80 and sm_90, with each
//! kernel's registers, shared memory and spills printed, and every kernel's PTX checked to await its
//! inputs on sm_90 (programmatic dependent launch). NVRTC and ptxas come from PyPI wheels of one
//! CUDA version (nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvcc-cu12; `.ci/run` installs them and puts them
//! on LD_LIBRARY_PATH and PATH). Where a tool is missing the test says so on stderr and checks what
//! it can.

use std::io::Write;
use std::process::Command;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use layerwise_kernels::sources::{program, KERNELS};

fn say(text: &str) {
    // Straight to stderr: the test harness does not capture this, so a skip is never silent.
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn ptxas() -> Option<String> {
    let candidate = std::env::var("LAYERWISE_PTXAS").unwrap_or_else(|_| "ptxas".into());
    Command::new(&candidate).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| candidate)
}

#[test]
fn nvrtc_every_kernel_compiles_and_assembles_for_sm80_and_sm90() {
    if !layerwise_kernels::cuda::program::nvrtc_available() {
        say("nvrtc_*: SKIPPED: libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12 and put its lib/ on LD_LIBRARY_PATH; .ci/run does)");
        return;
    }
    let ptxas = ptxas();
    if ptxas.is_none() {
        say("nvrtc_*: ptxas not found (pip install nvidia-cuda-nvcc-cu12; .ci/run does): compiling to PTX only");
    }
    let dir = std::env::temp_dir().join(format!("layerwise-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut report = String::new();
    for (virtual_arch, real_arch) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        for (file, kernels) in KERNELS {
            let source = program(file).expect("a kernel file");
            let options =
                CompileOptions { arch: Some(virtual_arch), name: Some(file.to_string()), ..Default::default() };
            let ptx = compile_ptx_with_opts(&source, options)
                .unwrap_or_else(|e| panic!("{file} for {virtual_arch}: {e:?}"))
                .to_src();
            for kernel in *kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "{file}: no entry {kernel} in the PTX for {virtual_arch}"
                );
            }
            // Programmatic dependent launch: on sm_90 every kernel awaits its inputs
            // (griddepcontrol.wait, common.cuh's lw_await_inputs); nothing of it is built for sm_80.
            for kernel in *kernels {
                let start = ptx.find(&format!(".entry {kernel}(")).expect("the entry");
                let body = &ptx[start..];
                let body = &body[..body[1..].find(".entry ").map_or(body.len(), |end| end + 1)];
                assert_eq!(
                    body.contains("griddepcontrol.wait"),
                    virtual_arch == "compute_90",
                    "{file}: {kernel} for {virtual_arch}: griddepcontrol.wait present or missing"
                );
            }
            let Some(ptxas) = &ptxas else { continue };
            let path = dir.join(format!("{file}.{real_arch}.ptx"));
            std::fs::write(&path, &ptx).expect("write PTX");
            let out = Command::new(ptxas)
                .args(["-v", &format!("-arch={real_arch}"), "-o", "/dev/null"])
                .arg(&path)
                .output()
                .expect("run ptxas");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "ptxas {file} {real_arch}: {log}");
            for kernel in *kernels {
                assert!(
                    log.contains(&format!("'{kernel}'")),
                    "ptxas {file} {real_arch}: no report for {kernel}: {log}"
                );
            }
            for line in log.lines().filter(|l| l.contains("bytes spill stores")) {
                let spills: Vec<&str> = line.split(',').filter(|part| part.contains("spill")).collect();
                assert!(
                    spills.iter().all(|part| part.trim().starts_with("0 bytes")),
                    "{file} {real_arch} spills: {line}"
                );
            }
            report.push_str(&format!("-- {file} {real_arch}\n{log}"));
        }
    }
    say(&report);
    let _ = std::fs::remove_dir_all(&dir);
}
