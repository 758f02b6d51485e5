//! Striping over several TCP streams (`tcp.streams > 1`): transfers around the stripe boundary
//! checked with checksums in both directions, notification and message order after striped
//! writes, a further stream dying, hostile joins, the configuration's bounds.

use genie_tests::conformance::WAIT;
use genie_transport::tcp::codec::{encode_frame, FrameKind, Header, RefuseCode, HEADER_LEN};
use genie_transport::tcp::stripe::STRIPE_MIN;
use genie_transport::{open, Connection, Region, Transport, TransportConfig, TransportError};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

fn cfg(streams: usize) -> TransportConfig {
    let mut c = TransportConfig::tcp();
    c.tcp.streams = streams;
    c
}

struct Pair {
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    ab: Arc<dyn Connection>,
    ba: Arc<dyn Connection>,
}

fn pair(client: usize, server: usize) -> Pair {
    let a: Arc<dyn Transport> = open(cfg(client)).unwrap();
    let b: Arc<dyn Transport> = open(cfg(server)).unwrap();
    let ab = a.connect(b.local_addr()).unwrap();
    let ba = b.accept(WAIT).unwrap();
    Pair { a, b, ab, ba }
}

/// FNV-1a over a region's bytes `[at, at + len)`.
fn checksum(r: &Region, at: usize, len: usize) -> u64 {
    let mut buf = vec![0u8; len];
    r.read(at, &mut buf).unwrap();
    buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic bytes (xorshift) seeded by `seed`.
fn fill(r: &Region, at: usize, len: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    r.write(at, &data).unwrap();
}

const SIZES: [usize; 5] = [1, STRIPE_MIN - 1, STRIPE_MIN, STRIPE_MIN + 1, 64 << 20];

/// Writes and reads of every size, at unaligned offsets, land whole: both directions (the
/// server's side stripes over the streams that joined it).
fn sizes_land_whole(streams: usize) {
    let p = pair(streams, streams);
    let max = 64 << 20;
    for (conn, local_ep, remote_ep) in [(&p.ab, &p.a, &p.b), (&p.ba, &p.b, &p.a)] {
        let src = local_ep.alloc_region(max + 16).unwrap();
        let back = local_ep.alloc_region(max + 16).unwrap();
        let dst = remote_ep.alloc_region(max + 16).unwrap();
        let d = dst.descriptor();
        for (i, &len) in SIZES.iter().enumerate() {
            fill(&src, 3, len, i as u64 + 1);
            conn.write(&src, 3, &d, 5, len).unwrap().wait(WAIT).unwrap();
            assert_eq!(
                checksum(&dst, 5, len),
                checksum(&src, 3, len),
                "{streams} streams: write of {len} bytes"
            );
            conn.read(&back, 7, &d, 5, len).unwrap().wait(WAIT).unwrap();
            assert_eq!(
                checksum(&back, 7, len),
                checksum(&src, 3, len),
                "{streams} streams: read of {len} bytes"
            );
        }
    }
}

#[test]
fn sizes_around_the_stripe_boundary_land_whole_over_two_streams() {
    sizes_land_whole(2);
}

#[test]
fn sizes_around_the_stripe_boundary_land_whole_over_three_streams() {
    sizes_land_whole(3);
}

#[test]
fn the_two_ends_use_the_smaller_setting() {
    for (client, server) in [(3, 2), (2, 1), (1, 4)] {
        let p = pair(client, server);
        let src = p.a.alloc_region(4 * STRIPE_MIN).unwrap();
        let dst = p.b.alloc_region(4 * STRIPE_MIN).unwrap();
        fill(&src, 0, 4 * STRIPE_MIN, 9);
        p.ab.write(&src, 0, &dst.descriptor(), 0, 4 * STRIPE_MIN)
            .unwrap()
            .wait(WAIT)
            .unwrap();
        assert_eq!(
            checksum(&dst, 0, 4 * STRIPE_MIN),
            checksum(&src, 0, 4 * STRIPE_MIN),
            "client {client}, server {server} streams"
        );
        p.ab.send(b"ok").unwrap().wait(WAIT).unwrap();
        assert_eq!(p.ba.recv(WAIT).unwrap(), b"ok");
    }
}

/// A notification or message posted after striped writes (not waited for) reaches the peer only
/// once those writes' bytes have all landed; so does a striped write's own notification.
#[test]
fn notifications_and_messages_after_striped_writes_come_after_the_data() {
    const BLOCK: usize = 4 * STRIPE_MIN + 123;
    const ROUNDS: usize = 12;
    let p = pair(3, 3);
    let src = p.a.alloc_region(ROUNDS * BLOCK).unwrap();
    let dst = p.b.alloc_region(ROUNDS * BLOCK).unwrap();
    let flag = p.a.alloc_region(8).unwrap();
    let flags = p.b.alloc_region(8 * ROUNDS).unwrap();
    let d = dst.descriptor();
    let mut sums = Vec::new();
    let mut ops = Vec::new();
    for i in 0..ROUNDS {
        let at = i * BLOCK;
        fill(&src, at, BLOCK, 100 + i as u64);
        sums.push(checksum(&src, at, BLOCK));
        match i % 3 {
            // A plain striped write, then a small write with a notification.
            0 => {
                ops.push(p.ab.write(&src, at, &d, at as u64, BLOCK).unwrap());
                let fd = flags.descriptor();
                ops.push(
                    p.ab.write_notify(&flag, 0, &fd, 8 * i as u64, 8, i as u32)
                        .unwrap(),
                );
            }
            // A striped write carrying the notification itself.
            1 => ops.push(
                p.ab.write_notify(&src, at, &d, at as u64, BLOCK, i as u32)
                    .unwrap(),
            ),
            // A striped write, then a message.
            _ => {
                ops.push(p.ab.write(&src, at, &d, at as u64, BLOCK).unwrap());
                ops.push(p.ab.send(&(i as u32).to_le_bytes()).unwrap());
            }
        }
    }
    for (i, sum) in sums.iter().enumerate() {
        let got = if i % 3 == 2 {
            let m = p.ba.recv(WAIT).unwrap();
            u32::from_le_bytes(m.try_into().unwrap())
        } else {
            p.ba.recv_notification(WAIT).unwrap()
        };
        assert_eq!(got as usize, i, "in order");
        assert_eq!(
            checksum(&dst, i * BLOCK, BLOCK),
            *sum,
            "write {i} landed before its notification or message"
        );
    }
    for op in ops {
        op.wait(WAIT).unwrap();
    }
}

/// Many writes in flight, shorter than a stripe: they take turns on the streams, all land.
#[test]
fn many_short_writes_in_flight_spread_and_land() {
    const N: usize = 256;
    const LEN: usize = 64 * 1024 + 5;
    let p = pair(2, 2);
    let src = p.a.alloc_region(N * LEN).unwrap();
    let dst = p.b.alloc_region(N * LEN).unwrap();
    fill(&src, 0, N * LEN, 77);
    let d = dst.descriptor();
    let ops: Vec<_> = (0..N)
        .map(|i| {
            p.ab.write(&src, i * LEN, &d, (i * LEN) as u64, LEN)
                .unwrap()
        })
        .collect();
    for op in ops {
        op.wait(WAIT).unwrap();
    }
    assert_eq!(checksum(&dst, 0, N * LEN), checksum(&src, 0, N * LEN));
}

#[test]
fn streams_outside_one_to_the_cap_are_refused() {
    for n in [0, genie_transport::config::TcpConfig::MAX_STREAMS + 1] {
        match open(cfg(n)) {
            Err(TransportError::InvalidArgument(m)) => assert!(m.contains("tcp.streams"), "{m}"),
            other => panic!("streams = {n}: expected InvalidArgument, got {other:?}"),
        }
    }
}

/// A raw client's stream, speaking the handshake by hand (no secret).
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(server: &Arc<dyn Transport>) -> Self {
        let s = TcpStream::connect(server.local_addr()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        Raw { s }
    }

    fn frame(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut h = [0u8; HEADER_LEN];
        self.s.read_exact(&mut h).ok()?;
        let h = Header::decode(&h).unwrap();
        let mut body = vec![0u8; h.body_len as usize];
        self.s.read_exact(&mut body).ok()?;
        Some((h, body))
    }

    /// HELLO (`streams` wanted, or joining `join`) as endpoint `endpoint`, then AUTH: returns
    /// the server's HELLO_ACK header and whether READY followed (else the REFUSE code).
    fn handshake(&mut self, endpoint: u64, streams: u32, join: u64) -> (Header, Result<(), u32>) {
        let hello =
            genie_transport::tcp::codec::plain_client_handshake(endpoint, [endpoint as u8; 32]);
        // The helper's HELLO with our stripe fields, then its AUTH.
        let mut h = Header::decode(&hello[..HEADER_LEN]).unwrap();
        h.arg = streams;
        h.op_id = join;
        let body = &hello[HEADER_LEN..hello.len() - HEADER_LEN];
        self.s.write_all(&encode_frame(h, body)).unwrap();
        self.s
            .write_all(&hello[hello.len() - HEADER_LEN..])
            .unwrap();
        let (ack, _) = self.frame().expect("HELLO_ACK");
        // A refusal of the AUTH that came right behind HELLO goes out alone (what was not yet
        // sent, HELLO_ACK included, is dropped).
        if ack.kind == FrameKind::Refuse {
            return (ack, Err(ack.arg));
        }
        assert_eq!(ack.kind, FrameKind::HelloAck);
        let (f, _) = self.frame().expect("READY or REFUSE");
        let r = match f.kind {
            FrameKind::Ready => Ok(()),
            FrameKind::Refuse => Err(f.arg),
            k => panic!("unexpected {k:?}"),
        };
        (ack, r)
    }
}

/// A raw client's connection of two streams to a striping server; returns the streams and the
/// server's handle.
fn raw_striped(server: &Arc<dyn Transport>) -> (Raw, Raw, u64, Arc<dyn Connection>) {
    let mut first = Raw::connect(server);
    let (ack, r) = first.handshake(0xc1, 2, 0);
    r.unwrap();
    assert_eq!(ack.arg, 2, "two streams granted");
    assert_ne!(ack.op_id, 0, "a connection id");
    let conn = server.accept(WAIT).unwrap();
    let mut second = Raw::connect(server);
    let (ack2, r) = second.handshake(0xc1, 0, ack.op_id);
    r.unwrap();
    assert_eq!(ack2.arg, 0);
    (first, second, ack.op_id, conn)
}

#[test]
fn a_dead_further_stream_fails_the_connection_with_a_typed_error() {
    let server: Arc<dyn Transport> = open(cfg(2)).unwrap();
    let (first, second, _, conn) = raw_striped(&server);
    assert!(conn.is_alive());
    drop(second);
    match conn.recv(WAIT) {
        Err(TransportError::ConnectionClosed { .. } | TransportError::PeerDead { .. }) => {}
        other => panic!("expected the connection to fail, got {other:?}"),
    }
    assert!(!conn.is_alive());
    drop(first);
}

#[test]
fn hostile_joins_are_refused() {
    let server: Arc<dyn Transport> = open(cfg(2)).unwrap();
    let (_first, _second, conn_id, conn) = raw_striped(&server);
    let stream_refused = RefuseCode::Stream as u32;
    // An id nobody gave out; the right id from another endpoint; a third stream of a
    // connection of two.
    for (endpoint, id, what) in [
        (0xc1, conn_id ^ 0x10, "unknown id"),
        (0xc2, conn_id, "another endpoint"),
        (0xc1, conn_id, "connection complete"),
    ] {
        let mut raw = Raw::connect(&server);
        let (_, r) = raw.handshake(endpoint, 0, id);
        assert_eq!(r, Err(stream_refused), "{what}");
        assert!(raw.frame().is_none(), "{what}: closed after the refusal");
        match server.accept(WAIT) {
            Err(TransportError::StreamRefused { .. }) => {}
            other => panic!("{what}: expected StreamRefused, got {other:?}"),
        }
    }
    assert!(conn.is_alive(), "the claimed connection is unaffected");
    // A joining stream that asks for streams of its own is malformed.
    let mut raw = Raw::connect(&server);
    let hello = genie_transport::tcp::codec::plain_client_handshake(0xc1, [3; 32]);
    let mut h = Header::decode(&hello[..HEADER_LEN]).unwrap();
    h.arg = 2;
    h.op_id = conn_id;
    raw.s
        .write_all(&encode_frame(
            h,
            &hello[HEADER_LEN..hello.len() - HEADER_LEN],
        ))
        .unwrap();
    let (f, _) = raw.frame().expect("REFUSE");
    assert_eq!(f.kind, FrameKind::Refuse);
    assert_eq!(f.arg, RefuseCode::Protocol as u32);
}

#[test]
fn a_client_is_refused_by_a_closed_connection_id_too() {
    let server: Arc<dyn Transport> = open(cfg(2)).unwrap();
    let (first, second, conn_id, conn) = raw_striped(&server);
    drop(first);
    drop(second);
    assert!(conn.recv(WAIT).is_err());
    // The id was withdrawn when the connection failed, before its handle saw the error.
    let mut raw = Raw::connect(&server);
    let (_, r) = raw.handshake(0xc1, 0, conn_id);
    assert_eq!(r, Err(RefuseCode::Stream as u32));
}
