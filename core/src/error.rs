//! The one error type of `dptrain-core`, with structured variants so callers (the launcher in
//! particular) can turn each into a one-line message and an exit code without parsing strings.

use std::path::PathBuf;

/// Errors raised by the engine, the parameter store, data and checkpoint code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("dtype mismatch in {op}: expected {expected}, got {got}")]
    DType { op: &'static str, expected: String, got: String },
    #[error("device error: {0}")]
    Device(String),
    #[error("op `{0}` has no backward but a gradient reached it")]
    NoBackward(&'static str),
    #[error("autograd: {0}")]
    Autograd(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{key}: {msg}")]
    Config { key: String, msg: String },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape { op, detail: detail.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
