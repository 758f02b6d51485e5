//! Helpers shared by Genie's cross-crate integration tests.
//!
//! [`conformance`] is the transport conformance suite, written once and instantiated per backend
//! with [`conformance_tests!`] (see `tests/tcp_conformance.rs`, and `tests/rdma_conformance.rs`,
//! which needs `GENIE_RDMA_DEVICE`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
