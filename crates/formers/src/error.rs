//! The one error type of the library: every variant names what a user must fix.

use std::path::PathBuf;

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Errors carry the file, key or tensor they are about and the expected vs found value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing, unknown or impossible.
    #[error("config: `{key}`: {msg}")]
    Config { key: String, msg: String },
    /// A file could not be read or written. The I/O error is part of the message, not a
    /// `source()`, so a chain printed with `{:#}` says it once.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A checkpoint or weights file is unusable.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// Training produced a non-finite loss.
    #[error("loss became {loss} at step {step}; stopped. {kept}")]
    NonFinite {
        step: usize,
        loss: f32,
        kept: String,
    },
    /// A model's output (an embedding, a row of logits) held a NaN or an infinity: the
    /// message names the stage, the input or step, and the value.
    #[error("{0}")]
    NonFiniteOutput(String),
    /// Input that the model cannot take (too long, wrong token ids, ...).
    #[error("input: {0}")]
    Input(String),
    /// An error from the tensor backend (in the message, not a `source()`, for the same
    /// reason as [`Error::Io`]).
    #[error("tensor: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl Error {
    /// A configuration error about `key`.
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_states_each_cause_once() {
        let e = Error::io("/x", std::io::Error::from(std::io::ErrorKind::NotFound));
        // `{:#}` of anyhow and similar print the message, then each `source()`.
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string(), "/x: entity not found");
    }
}
