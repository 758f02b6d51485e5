//! The `genie` binary's own modules (not part of the `genie_runtime` library): experiments and
//! commands that only the command line runs.

pub mod demo;
#[cfg(feature = "etcd")]
pub mod etcd;
