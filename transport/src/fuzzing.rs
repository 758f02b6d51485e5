//! Hooks for fuzzers (see `fuzz/` at the repository root). Not part of the stable API.

use crate::config::Backend;
use crate::region::RegionTable;
use crate::tcp::codec::Header;
use crate::tcp::proto::{Conn, ConnConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The RDMA side channel's frame decoder: its fuzzing hook (the `rdma` module is private).
#[cfg(feature = "rdma")]
pub use crate::rdma::wire::fuzz_decode as rdma_wire;

/// Whether bytes decode as one RDMA side-channel frame body (round trip checked as in
/// [`rdma_wire`]): for property tests of particular fields.
#[cfg(feature = "rdma")]
pub use crate::rdma::wire::decodes as rdma_wire_decodes;

/// Feeds untrusted bytes to the TCP frame decoder and to an established server-side connection
/// state machine (with one registered region), exactly as if a peer had sent them. Must never
/// panic, whatever `data` holds.
pub fn decode_frame(data: &[u8]) {
    // The header decoder alone, on every 48-byte window.
    let _ = Header::decode(data.get(..crate::tcp::codec::HEADER_LEN).unwrap_or(data));
    // The whole receive path: handshake (no secret) then the fuzzer's bytes as data frames.
    let regions = RegionTable::new(1, Backend::Tcp);
    let Ok(region) = regions.alloc(4096) else {
        return;
    };
    let now = Instant::now();
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    let cfg = ConnConfig {
        endpoint: 1,
        secret: None,
        peer_timeout: Duration::from_secs(2),
        max_message_size: 1024,
        grants: Default::default(),
        streams: 1,
        conn_id: 1,
        joins: Default::default(),
    };
    let mut conn = Conn::server(cfg, peer, now, [7; 32]);
    let hello = crate::tcp::codec::plain_client_handshake(2, [9; 32]);
    let mut src = std::io::Read::chain(&hello[..], data);
    let _ = conn.read_from(&mut src, &regions, now);
    let mut sink = Vec::new();
    let _ = conn.write_to(&mut sink, now);
    while conn.poll_event().is_some() {}
    drop(region);
}
