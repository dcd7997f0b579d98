//! Why a command failed, and the exit code a script sees for it.

use std::fmt;
use std::process::ExitCode;

/// Exit codes, as documented in `--help` and the README.
pub mod code {
    /// A store could not be read or written, or the input was unreadable.
    pub const RUNTIME: u8 = 1;
    /// The command line is wrong (clap's own code for bad arguments, also a bad store URL or a
    /// missing key).
    pub const USAGE: u8 = 2;
    /// The grant does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// Refused: the destination already has the grant, `--force` is needed, the grant was
    /// already moved, or the input holds no secrets to import.
    pub const REFUSED: u8 = 4;
}

/// A failed command: a message for stderr and an exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A runtime failure (exit code 1).
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: code::RUNTIME,
            message: message.into(),
        }
    }

    /// A store failure: `context`, then the error and its causes (the library keeps secrets
    /// out of all of them).
    pub fn store(context: impl fmt::Display, error: impl std::error::Error) -> Self {
        let mut message = format!("{context}: {error}");
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Self::runtime(message)
    }

    /// A usage error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: code::USAGE,
            message: message.into(),
        }
    }

    /// The grant does not exist (exit code 3).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: code::NOT_FOUND,
            message: message.into(),
        }
    }

    /// Refused (exit code 4).
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            code: code::REFUSED,
            message: message.into(),
        }
    }

    /// Prints the message on stderr as a warning (the command goes on).
    pub fn warn(&self) {
        eprintln!("tokenkeeper: warning: {}", self.message);
    }

    /// Prints the message on stderr and returns the exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("tokenkeeper: error: {}", self.message);
        ExitCode::from(self.code)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
