//! Writing results to stdout. A closed pipe (`layerwise generate ... | head -c 1`) or a full disk is
//! an error like any other, carried up to `main`, which ends a closed pipe quietly with the status a
//! shell gives a process killed by SIGPIPE (141) and reports anything else: never a panic, which
//! `println!` would be.

use std::fmt::Display;
use std::io::{self, Write};

use anyhow::{Context, Result};

/// Writes `text` and a newline to stdout.
pub fn line(text: impl Display) -> Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}").context("writing to stdout")
}

/// Writes `bytes` to stdout now (no newline; flushed, for text that streams as it is made).
pub fn stream(bytes: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}

/// Flushes what stdout still holds (at the end of a command).
pub fn flush() -> Result<()> {
    io::stdout().lock().flush().context("writing to stdout")
}

/// True if `err` comes from writing into a pipe whose reader has gone.
pub fn is_closed_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}

/// The exit status of a process that stopped writing because the reader closed the pipe.
pub const CLOSED_PIPE_STATUS: u8 = 141;
