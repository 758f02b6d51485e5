//! The transport conformance suite on the TCP backend, plus TCP-specific cases that speak the wire
//! protocol from raw sockets (malformed and oversized frames).

use genie_tests::conformance::{self, WAIT};
use genie_transport::tcp::codec::{
    encode_frame, plain_client_handshake, FrameKind, Header, HEADER_LEN,
};
use genie_transport::{open, TransportConfig, TransportError};
use std::io::{Read, Write};
use std::net::TcpStream;

fn tcp() -> TransportConfig {
    TransportConfig::tcp()
}

genie_tests::conformance_tests!(tcp);

/// The suite again with each connection striped over two TCP streams.
mod two_streams {
    fn tcp2() -> genie_transport::TransportConfig {
        let mut c = super::tcp();
        c.tcp.streams = 2;
        c
    }
    genie_tests::conformance_tests!(tcp2);
}

/// The suite again over three streams (an odd count: parts of unequal length).
mod three_streams {
    fn tcp3() -> genie_transport::TransportConfig {
        let mut c = super::tcp();
        c.tcp.streams = 3;
        c
    }
    genie_tests::conformance_tests!(tcp3);
}

/// The busy-poll mode passes the core cases too.
#[test]
fn busy_poll_integrity_and_notifications() {
    let make = || TransportConfig {
        poll_mode: genie_transport::PollMode::BusyPoll,
        ..tcp()
    };
    conformance::notifications_in_order(&make);
    conformance::batches_with_mixed_results(&make);
}

/// Reads until the endpoint closes the socket (EOF, or a reset when it closed with our bytes
/// unread); returns what arrived.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return v,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return v,
            Err(e) => panic!("expected the endpoint to close the socket, got {e}"),
        }
    }
}

#[test]
fn malformed_handshake_is_refused_and_the_endpoint_carries_on() {
    let server = open(tcp()).unwrap();
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    // Exactly one header's worth, so the endpoint has read everything when it closes (no reset).
    let junk = b"GET / HTTP/1.1\r\nHost: genie\r\n\r\n-----------------";
    assert_eq!(junk.len(), HEADER_LEN);
    raw.write_all(junk).unwrap();
    match server.accept(WAIT) {
        Err(TransportError::InvalidFrame { expected, .. }) => assert_eq!(expected, "magic \"GN\""),
        other => panic!("expected InvalidFrame, got {other:?}"),
    }
    let reply = read_to_close(&mut raw);
    let h = Header::decode(&reply[..HEADER_LEN]).unwrap();
    assert_eq!(
        h.kind,
        FrameKind::Refuse,
        "the refusal is sent before closing"
    );
    // The endpoint still serves a well-behaved client.
    let client = open(tcp()).unwrap();
    let c = client.connect(server.local_addr()).unwrap();
    let s = server.accept(WAIT).unwrap();
    c.send(b"fine").unwrap().wait(WAIT).unwrap();
    assert_eq!(s.recv(WAIT).unwrap(), b"fine");
}

/// A raw client that completed the handshake, and the server's side of it.
fn raw_established(
    server: &std::sync::Arc<dyn genie_transport::Transport>,
) -> (TcpStream, std::sync::Arc<dyn genie_transport::Connection>) {
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.write_all(&plain_client_handshake(0xbad, [1; 32]))
        .unwrap();
    let conn = server.accept(WAIT).unwrap();
    assert_eq!(conn.peer_endpoint(), 0xbad);
    (raw, conn)
}

#[test]
fn malformed_frame_after_handshake_closes_only_that_connection() {
    let server = open(tcp()).unwrap();
    let client = open(tcp()).unwrap();
    let good = client.connect(server.local_addr()).unwrap();
    let good_s = server.accept(WAIT).unwrap();
    let (mut raw, conn) = raw_established(&server);
    let mut h = Header::new(FrameKind::Ping).encode();
    h[3] = 200; // unknown kind
    raw.write_all(&h).unwrap();
    match conn.recv(WAIT) {
        Err(TransportError::InvalidFrame { expected, got, .. }) => {
            assert_eq!(expected, "a known frame kind");
            assert_eq!(got, "kind 200");
        }
        other => panic!("expected InvalidFrame, got {other:?}"),
    }
    assert!(!conn.is_alive());
    read_to_close(&mut raw);
    good.send(b"unaffected").unwrap().wait(WAIT).unwrap();
    assert_eq!(good_s.recv(WAIT).unwrap(), b"unaffected");
}

#[test]
fn oversized_frames_close_the_connection() {
    let server = open(tcp()).unwrap();
    let max = server.config().max_message_size;
    // A message over the limit.
    let (mut raw, conn) = raw_established(&server);
    let mut h = Header::new(FrameKind::Msg);
    h.op_id = 1;
    raw.write_all(&encode_frame(h, &vec![0; max + 1])).unwrap();
    match conn.recv(WAIT) {
        Err(TransportError::PeerMisbehaved { what, .. }) => {
            assert!(what.contains("exceeds"), "{what}")
        }
        other => panic!("expected PeerMisbehaved, got {other:?}"),
    }
    read_to_close(&mut raw);
    // A write chunk over the chunk limit, announced in the header only.
    let (mut raw, conn) = raw_established(&server);
    let mut h = Header::new(FrameKind::Write);
    h.body_len = u32::MAX;
    raw.write_all(&h.encode()).unwrap();
    assert!(matches!(
        conn.recv(WAIT),
        Err(TransportError::PeerMisbehaved { .. })
    ));
    read_to_close(&mut raw);
}

#[test]
fn raw_write_out_of_bounds_gets_an_error_reply_and_memory_is_untouched() {
    let server = open(tcp()).unwrap();
    let region = server.alloc_region(100).unwrap();
    let d = region.descriptor();
    let (mut raw, conn) = raw_established(&server);
    let mut ack = vec![0u8; HEADER_LEN + 41 + HEADER_LEN]; // HELLO_ACK (41-byte body) + READY
    raw.read_exact(&mut ack).unwrap();
    let mut h = Header::new(FrameKind::Write);
    h.op_id = 42;
    h.region = d.region;
    h.key = d.key;
    h.offset = 90;
    h.flags = genie_transport::tcp::codec::FLAG_LAST;
    raw.write_all(&encode_frame(h, &[0xee; 20])).unwrap();
    let mut reply = vec![0u8; HEADER_LEN + 32];
    raw.read_exact(&mut reply).unwrap();
    let rh = Header::decode(&reply[..HEADER_LEN]).unwrap();
    assert_eq!((rh.kind, rh.op_id), (FrameKind::Err, 42));
    let err =
        genie_transport::tcp::codec::AccessError::decode(rh.arg, &reply[HEADER_LEN..]).unwrap();
    assert!(
        matches!(
            err,
            TransportError::RegionOutOfBounds {
                offset: 90,
                len: 20,
                size: 100,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        region.with(|b| b.iter().all(|&x| x == 0)),
        "nothing written"
    );
    assert!(
        conn.is_alive(),
        "an access violation does not close the connection"
    );
}

/// 1024 connections between two endpoints carry 1000 outstanding operations, checked with
/// checksums.
#[test]
fn connections_at_scale() {
    genie_tests::conformance::connections_at_scale(&tcp, 1024, 1000);
}
