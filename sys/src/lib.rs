//! `genie-sys`: the only crate of Genie that contains `unsafe` code.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment saying why it holds;
//! everything exported is a small safe type with RAII clean-up.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod addressing;
pub mod clock;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mem;
pub mod mmap;
pub mod pci;
#[cfg(feature = "rdma")]
pub mod verbs;
