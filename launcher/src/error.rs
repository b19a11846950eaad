//! The launcher's error type. `Input` errors are the user's to fix (config, CLI, data files,
//! checkpoints): one line, exit code 2. `Runtime` errors are failures during a valid run:
//! exit code 1. `Stopped` is a run a signal ended early with a checkpoint: 128 + the signal.

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Runtime(String),
    /// A run stopped by a signal at the end of a step, with a checkpoint there (see `stop`):
    /// exit code 128 + the signal. `message` is empty on the ranks that do not report it.
    #[error("{message}")]
    Stopped { signal: i32, message: String },
}

impl LaunchError {
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Input(_) => 2,
            LaunchError::Runtime(_) => 1,
            LaunchError::Stopped { signal, .. } => (128 + signal).clamp(129, 255) as u8,
        }
    }
}

/// Input error with a formatted message.
macro_rules! input_err {
    ($($t:tt)*) => { $crate::error::LaunchError::Input(format!($($t)*)) };
}
pub(crate) use input_err;

impl From<dptrain_core::Error> for LaunchError {
    fn from(e: dptrain_core::Error) -> Self {
        use dptrain_core::Error as E;
        match e {
            E::File { .. } | E::Config { .. } | E::Io { .. } => LaunchError::Input(e.to_string()),
            other => LaunchError::Runtime(other.to_string()),
        }
    }
}

impl From<dptrain_optim::OptimError> for LaunchError {
    fn from(e: dptrain_optim::OptimError) -> Self {
        LaunchError::Runtime(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, LaunchError>;
