//! Helpers shared by Genie's cross-crate integration tests.
#![forbid(unsafe_code)]
