//! Running the `layerwise` binary from the CLI contract tests.

use std::process::{Command, Output};

/// Runs `layerwise` with `args` and collects its output.
pub fn layerwise(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_layerwise")).args(args).output().expect("run layerwise")
}

/// Its standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `layerwise args` fails without a panic and that its message mentions every part.
pub fn assert_fails_naming(args: &[&str], parts: &[&str]) {
    let out = layerwise(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for part in parts {
        assert!(err.contains(part), "{args:?}: error {err:?} should mention {part:?}");
    }
}
