//! calibft core: discretized output spaces, tokenized prefix tries with CSR next-token targets,
//! and Wasserstein-1 scoring. Pure Rust; the pyo3 bindings live in `python.rs` behind the
//! `python` feature so the crate tests and benches without libpython.

pub mod error;
pub mod grid;
pub mod metrics;
pub mod rng;
pub mod space;
pub mod tokenize;
pub mod trie;

#[cfg(feature = "python")]
mod python;

pub use error::{CoreError, Result};
pub use space::OutputSpace;
pub use tokenize::CompletionTokenizer;
pub use trie::Trie;
