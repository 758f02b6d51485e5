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
