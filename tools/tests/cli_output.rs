//! Output errors (issue #13): a reader that closes the pipe early (`| head -c 1`) ends the command
//! quietly with status 141, as a process killed by SIGPIPE would report in a shell; a full disk is an
//! error naming stdout. Never a panic.

use std::process::{Command, Stdio};

#[allow(dead_code)]
mod common;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");

/// Runs `layerwise args` with its stdout a pipe whose reader is gone before the model has loaded;
/// returns the exit status and stderr.
fn with_stdout_closed(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_layerwise"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run layerwise");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_closed_pipe_ends_quietly_with_status_141() {
    for args in [
        &["generate", "--model", DEMO, "--prompt", "Hello", "--max-new-tokens", "20"][..],
        &["generate", "--model", DEMO, "--prompt", "Hello", "--max-new-tokens", "20", "--json"][..],
        &["info", "--model", DEMO][..],
    ] {
        let (code, err) = with_stdout_closed(args);
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert_eq!(code, Some(141), "{args:?}: stderr {err}");
        assert!(!err.contains("error"), "{args:?}: a closed pipe is not an error to report: {err}");
    }
}

#[test]
fn a_full_disk_is_an_error_naming_stdout() {
    let Ok(full) = std::fs::File::options().write(true).open("/dev/full") else {
        eprintln!("a_full_disk_is_an_error_naming_stdout: SKIPPED: no /dev/full on this system");
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_layerwise"))
        .args(["info", "--model", DEMO, "--json"])
        .stdout(full)
        .output()
        .expect("run layerwise");
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing to stdout") && err.contains("No space left"), "{err}");
}
