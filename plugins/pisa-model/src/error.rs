//! What can go wrong building or importing a model: always naming the file and the key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: tensor `{key}` is missing (expected shape {expected:?})")]
    Missing { file: String, key: String, expected: Vec<usize> },
    #[error("{file}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape { file: String, key: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{file}: tensor `{key}` is not part of this model ({why})")]
    Unexpected { file: String, key: String, why: String },
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{path}: bad config: {why}")]
    Config { path: PathBuf, why: String },
    #[error("checkpoint {file}: {why}")]
    Checkpoint { file: String, why: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
