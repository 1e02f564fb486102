use thiserror::Error;

/// Every failure the core reports; the bindings turn each into a Python `ValueError` subclass.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("token path is not in the trie: token {token} at position {position} is not a child of the node reached so far")]
    PathNotInTrie { position: usize, token: u32 },
}

pub type Result<T> = std::result::Result<T, CoreError>;

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument {
        field,
        message: message.into(),
    }
}
