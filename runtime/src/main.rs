//! The `genie` command line.
#![forbid(unsafe_code)]

fn main() {}
