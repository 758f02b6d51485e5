//! Shared helpers of Genie's benchmark binaries.
#![forbid(unsafe_code)]
