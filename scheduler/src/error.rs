//! The crate's error type.

use crate::graph::GraphError;

/// Everything that can go wrong in the scheduler, split by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The graph is malformed (the variant names the node).
    #[error("invalid graph: {0}")]
    Graph(#[from] GraphError),
    /// A graph or schedule could not be (de)serialized as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A builder got an unknown model name.
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel {
        /// What was asked for.
        name: String,
        /// What exists.
        known: String,
    },
    /// A builder or configuration value is out of range.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
}
