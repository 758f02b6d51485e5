//! `genie-scheduler`: turns an annotated model graph into an execution schedule.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
