//! `genie-runtime`: runs a scheduled graph across workers connected by the transport.
//!
//! - [`cluster`]: the static cluster file (`genie worker --cluster FILE`).
//! - [`store`]: a worker's tensors (persistent weights, pinned KV caches, ephemeral activations).
//! - [`kv`]: the paged KV-cache manager.
//! - [`kernels`]: the [`Kernels`](kernels::Kernels) trait and the reference CPU backend.
//! - [`weights`]: seeded or safetensors weights.
//! - [`trace`]: timeline, counters, Chrome/Perfetto trace export.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod demo;
pub mod driver;
pub mod error;
pub mod feedback;
pub mod kernels;
pub mod kv;
pub mod models;
pub mod plan;
pub mod proto;
pub mod store;
pub mod trace;
pub mod weights;
pub mod worker;

pub use error::{Result, RuntimeError};
