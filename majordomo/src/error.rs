//! The majordomo's typed errors.

#[derive(Debug, thiserror::Error)]
pub enum MajordomoError {
    /// A request field is missing or malformed; the message names the field.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("grammar engine: {0}")]
    Grammar(String),
    #[error(transparent)]
    Lm(#[from] lm::LmError),
}

pub type Result<T> = std::result::Result<T, MajordomoError>;
