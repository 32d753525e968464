//! Standard output for the commands. A reader that goes away early
//! (`vitaltrail devices list | head -n 1`) is a normal end, as it is for
//! `ls`: the command stops writing and exits 0, quietly. `println!` would
//! panic instead ("failed printing to stdout: Broken pipe").

/// `println!` to standard output that returns the write error from the
/// enclosing function (`?`), so a closed pipe ends the command.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::out::stdout_error)?
    }};
}

/// `print!` to standard output, returning the write error as [`outln!`]
/// does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        write!(o, $($arg)*).map_err($crate::out::stdout_error)?;
        o.flush().map_err($crate::out::stdout_error)?
    }};
}

/// Standard output's reader has gone: the command ends, exit 0, no message.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// A write error on standard output: [`StdoutClosed`] for a closed pipe
/// (only standard output's, never a socket's), else the error itself.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing standard output")
    }
}

/// Whether `e` is [`StdoutClosed`].
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}
