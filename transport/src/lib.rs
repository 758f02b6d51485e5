//! `genie-transport`: moves bytes between machines.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
