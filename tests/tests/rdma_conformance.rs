//! The transport conformance suite on the RDMA backend. Needs a verbs device named by
//! `GENIE_RDMA_DEVICE` (e.g. `rxe0` inside the soft-RoCE VM of `scripts/test-rdma.sh`); without it
//! every test fails loudly rather than passing silently.
#![cfg(feature = "rdma")]

use genie_transport::{BackendChoice, TransportConfig};

fn rdma() -> TransportConfig {
    let device = std::env::var("GENIE_RDMA_DEVICE")
        .expect("GENIE_RDMA_DEVICE is not set: run the RDMA suite through scripts/test-rdma.sh");
    TransportConfig {
        backend: BackendChoice::Rdma,
        rdma_device: Some(device),
        ..TransportConfig::default()
    }
}

genie_tests::conformance_tests!(rdma);

/// The busy-poll mode (the waiting thread drives the CQ) passes the core cases too.
#[test]
fn busy_poll_integrity_and_notifications() {
    let make = || TransportConfig {
        poll_mode: genie_transport::PollMode::BusyPoll,
        ..rdma()
    };
    genie_tests::conformance::notifications_in_order(&make);
    genie_tests::conformance::batches_with_mixed_results(&make);
}
