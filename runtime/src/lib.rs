//! `genie-runtime`: runs a scheduled graph across workers connected by the transport.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
