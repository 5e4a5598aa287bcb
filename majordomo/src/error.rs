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
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The thread a local critique ran on died (a panic while decoding).
    #[error("critique worker failed: {0}")]
    Worker(String),
}

/// What went wrong with a remote (OpenAI-compatible) critic. The server being out of reach or
/// overloaded is told apart from it answering wrongly: the first is UNAVAILABLE, the second
/// INTERNAL, and the orchestrator fails over on both.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No answer at all: connection refused, DNS, TLS, or the request timed out.
    #[error("the remote majordomo at {url} did not answer: {why}")]
    Unreachable { url: String, why: String },
    /// An HTTP error status; `body` is the start of the server's message.
    #[error("the remote majordomo answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// A success status whose body is no OpenAI chat completion.
    #[error("the remote majordomo's answer is not an OpenAI chat completion: {0}")]
    Protocol(String),
    /// Every try answered something that is not the schema's JSON.
    #[error("the remote majordomo gave no valid {what} in {tries} tries: {why}; its last answer: {answer}")]
    InvalidAnswer {
        what: &'static str,
        tries: usize,
        why: String,
        answer: String,
    },
}

impl RemoteError {
    /// Whether the server is out of service (perhaps briefly), not answering wrongly.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Http { status, .. } => matches!(status, 408 | 429) || *status >= 500,
            Self::Protocol(_) | Self::InvalidAnswer { .. } => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, MajordomoError>;
