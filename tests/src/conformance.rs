//! The transport conformance suite: every backend must pass it unchanged.
//!
//! Each case is a function taking a configuration factory (`&dyn Fn() -> TransportConfig`); the
//! [`conformance_tests!`](crate::conformance_tests) macro turns them into one `#[test]` each for a
//! backend. Cases open their own endpoints on loopback, so they run in parallel.

use genie_transport::{
    open, Batch, Connection, Region, RegionAccess, RemoteRegion, Transfer, TransferKind, Transport,
    TransportConfig, TransportError,
};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Makes the configuration of each endpoint a case opens.
pub type MakeConfig<'a> = &'a dyn Fn() -> TransportConfig;

/// Generous bound for waits that only expire when something is broken.
pub const WAIT: Duration = Duration::from_secs(30);

/// Generates one `#[test]` per conformance case for the backend configured by `$make`
/// (an expression of type `fn() -> TransportConfig` or a closure).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            integrity_sizes_and_unaligned_offsets, notifications_in_order, messages_and_size_limit,
            large_messages_are_delivered_whole,
            batches_with_mixed_results, access_violations_have_precise_errors,
            wrong_key_closes_the_connection, a_flooding_peer_is_held_not_queued,
            regions_grant_only_their_access, idle_and_dripping_sockets_do_not_starve_accept,
            a_grant_is_valid_only_on_its_connection,
            many_concurrent_transfers_over_many_connections, shared_secret, registered_caller_memory);
        #[test]
        fn peer_process_killed_mid_transfer() {
            $crate::conformance::peer_process_killed_mid_transfer(&$make, env!("CARGO_BIN_EXE_genie-test-peer"));
        }
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::$case(&$make);
            }
        )*
    };
}

/// Two endpoints and a connection between them (`ab` on `a`, `ba` on `b`).
pub struct Pair {
    /// First endpoint (the client).
    pub a: Arc<dyn Transport>,
    /// Second endpoint (the server).
    pub b: Arc<dyn Transport>,
    /// `a`'s side of the connection.
    pub ab: Arc<dyn Connection>,
    /// `b`'s side of the connection.
    pub ba: Arc<dyn Connection>,
}

/// Opens two endpoints with `make()` and connects them.
pub fn pair(make: MakeConfig<'_>) -> Pair {
    let a = open(make()).expect("open a");
    let b = open(make()).expect("open b");
    let ab = a.connect(b.local_addr()).expect("connect");
    let ba = b.accept(WAIT).expect("accept");
    assert_eq!(ab.backend(), a.backend());
    assert_eq!(ab.peer_endpoint(), b.endpoint_id());
    assert_eq!(ba.peer_endpoint(), a.endpoint_id());
    Pair { a, b, ab, ba }
}

/// Fills a region with a deterministic pseudo-random pattern (xorshift64).
pub fn fill(r: &Region, seed: u64) {
    let mut x = seed | 1;
    r.with_mut(|b| {
        for chunk in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    });
}

/// CRC-32 of `r[offset..offset+len]`.
pub fn crc(r: &Region, offset: usize, len: usize) -> u32 {
    r.with(|b| crc32fast::hash(&b[offset..offset + len]))
}

fn wait_ok(op: genie_transport::Op, what: &str) {
    if let Err(e) = op.wait(WAIT) {
        panic!("{what}: {e}");
    }
}

/// Sizes 1 B … 64 MiB at unaligned offsets on both sides: write, then read back, with checksums.
pub fn integrity_sizes_and_unaligned_offsets(make: MakeConfig<'_>) {
    const MAX: usize = 64 << 20;
    let p = pair(make);
    let src = p.a.alloc_region(MAX + 64).unwrap();
    let back = p.a.alloc_region(MAX + 64).unwrap();
    let dst = p.b.alloc_region(MAX + 64).unwrap();
    fill(&src, 0x5eed);
    let d = dst.descriptor();
    for (i, &len) in [
        1usize,
        3,
        4095,
        4096,
        4097,
        65_537,
        (1 << 20) + 13,
        (8 << 20) + 1,
        MAX,
    ]
    .iter()
    .enumerate()
    {
        let (lo, ro, bo) = (i % 7 + 1, (i * 5) % 13 + 3, (i * 3) % 11 + 1);
        wait_ok(p.ab.write(&src, lo, &d, ro as u64, len).unwrap(), "write");
        assert_eq!(
            crc(&dst, ro, len),
            crc(&src, lo, len),
            "write of {len} B landed intact"
        );
        wait_ok(p.ab.read(&back, bo, &d, ro as u64, len).unwrap(), "read");
        assert_eq!(
            crc(&back, bo, len),
            crc(&src, lo, len),
            "read of {len} B intact"
        );
    }
    // Zero-length transfers complete too.
    wait_ok(p.ab.write(&src, 0, &d, 0, 0).unwrap(), "empty write");
    wait_ok(p.ab.read(&back, 0, &d, 0, 0).unwrap(), "empty read");
}

/// Notifications arrive in order, each after its data has landed; both directions work.
pub fn notifications_in_order(make: MakeConfig<'_>) {
    const N: u32 = 2000;
    let p = pair(make);
    let src = p.a.alloc_region(N as usize * 8).unwrap();
    let dst = p.b.alloc_region(N as usize * 8).unwrap();
    let d = dst.descriptor();
    let mut ops = Vec::new();
    for i in 0..N {
        let at = i as usize * 8;
        src.write(at, &u64::from(i).to_le_bytes()).unwrap();
        ops.push(p.ab.write_notify(&src, at, &d, at as u64, 8, i).unwrap());
    }
    for i in 0..N {
        let imm = p.ba.recv_notification(WAIT).unwrap();
        assert_eq!(imm, i, "notifications in order");
        let mut got = [0u8; 8];
        dst.read(i as usize * 8, &mut got).unwrap();
        assert_eq!(
            u64::from_le_bytes(got),
            u64::from(i),
            "data landed before notification {i}"
        );
    }
    for op in ops {
        wait_ok(op, "write_notify");
    }
    assert_eq!(p.ba.try_recv_notification().unwrap(), None);
    // The other direction.
    let back = p.b.alloc_region(8).unwrap();
    wait_ok(
        p.ba.write_notify(&back, 0, &src.descriptor(), 0, 8, 0xabcd)
            .unwrap(),
        "reverse write_notify",
    );
    assert_eq!(p.ab.recv_notification(WAIT).unwrap(), 0xabcd);
}

/// Two-sided messages in order; a message over the limit is refused before sending.
pub fn messages_and_size_limit(make: MakeConfig<'_>) {
    let p = pair(make);
    let max = p.a.config().max_message_size;
    for i in 0..100u32 {
        let msg = vec![i as u8; (i as usize * 37) % 200 + 1];
        wait_ok(p.ab.send(&msg).unwrap(), "send");
        assert_eq!(p.ba.recv(WAIT).unwrap(), msg);
    }
    wait_ok(p.ba.send(&vec![7; max]).unwrap(), "send max");
    assert_eq!(p.ab.recv(WAIT).unwrap().len(), max);
    match p.ab.send(&vec![0; max + 1]) {
        Err(TransportError::MessageTooLarge { len, max: m }) => {
            assert_eq!((len, m), (max + 1, max))
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert!(matches!(p.ba.try_recv(), Ok(None)));
    assert!(matches!(
        p.ba.recv(Duration::from_millis(10)),
        Err(TransportError::Timeout { .. })
    ));
    assert!(p.ab.is_alive() && p.ba.is_alive());
}

/// Messages far above one receive buffer (1 B, 64 KiB + 1, 3 MiB, the 4 MiB maximum) with
/// `max_message_size` = 4 MiB arrive whole, intact and in order, both ways; one byte over the
/// maximum is refused with `MessageTooLarge` and the connection stays usable.
pub fn large_messages_are_delivered_whole(make: MakeConfig<'_>) {
    const MAX: usize = 4 << 20;
    let cfg = || TransportConfig {
        max_message_size: MAX,
        ..make()
    };
    let p = pair(&cfg);
    let pattern = |len: usize, seed: u64| {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    let sizes = [1, (64 << 10) + 1, 3 << 20, 1, MAX];
    for (from, to) in [(&p.ab, &p.ba), (&p.ba, &p.ab)] {
        // Post them all before receiving any: the receiver must keep them apart.
        let msgs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u64 + 1))
            .collect();
        let ops: Vec<_> = msgs.iter().map(|m| from.send(m).unwrap()).collect();
        for (i, m) in msgs.iter().enumerate() {
            let got = to.recv(WAIT).unwrap();
            assert_eq!(got.len(), m.len(), "message {i}: length");
            assert_eq!(
                crc32fast::hash(&got),
                crc32fast::hash(m),
                "message {i} ({} B): checksum",
                m.len()
            );
        }
        for op in ops {
            wait_ok(op, "large send");
        }
    }
    match p.ab.send(&vec![0; MAX + 1]) {
        Err(TransportError::MessageTooLarge { len, max }) => assert_eq!((len, max), (MAX + 1, MAX)),
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    wait_ok(p.ab.send(b"after").unwrap(), "send after the refused one");
    assert_eq!(p.ba.recv(WAIT).unwrap(), b"after");
    assert!(matches!(p.ba.try_recv(), Ok(None)));
    assert!(p.ab.is_alive() && p.ba.is_alive());
}

/// A batch with successes and failures: status counts and each transfer's own result.
pub fn batches_with_mixed_results(make: MakeConfig<'_>) {
    let p = pair(make);
    let src = p.a.alloc_region(1 << 16).unwrap();
    let dst = p.b.alloc_region(1 << 16).unwrap();
    fill(&src, 9);
    let d = dst.descriptor();
    let unknown = RemoteRegion {
        region: d.region + 1000,
        ..d
    };
    let t = |kind, local_offset, remote, remote_offset, len| Transfer {
        kind,
        local: &src,
        local_offset,
        remote,
        remote_offset,
        len,
    };
    let transfers = [
        t(TransferKind::Write, 0, &d, 0, 1000),
        t(TransferKind::WriteNotify(11), 1000, &d, 1000, 2000),
        t(TransferKind::Read, 40_000, &d, 0, 1000),
        t(TransferKind::Read, 0, &d, (1 << 16) - 10, 11),
        t(TransferKind::Write, (1 << 16) - 1, &d, 0, 2),
        t(TransferKind::Write, 0, &unknown, 0, 10),
    ];
    let batch: Batch = p.ab.post_batch(&transfers).unwrap();
    let s = batch.wait(WAIT).unwrap();
    assert_eq!(
        (s.pending, s.ok, s.failed),
        (0, 3, 3),
        "{:?}",
        batch.results()
    );
    let r = batch.results();
    assert!(matches!(r[0], Some(Ok(()))));
    assert!(matches!(r[1], Some(Ok(()))));
    assert!(matches!(r[2], Some(Ok(()))));
    assert!(
        matches!(r[3], Some(Err(TransportError::RegionOutOfBounds { offset, len: 11, size, .. })) if offset == (1 << 16) - 10 && size == 1 << 16)
    );
    assert!(matches!(
        r[4],
        Some(Err(TransportError::LocalOutOfBounds { .. }))
    ));
    assert!(
        matches!(r[5], Some(Err(TransportError::UnknownRegion { region })) if region == unknown.region)
    );
    assert_eq!(p.ba.recv_notification(WAIT).unwrap(), 11);
    assert_eq!(crc(&dst, 0, 3000), crc(&src, 0, 3000));
    assert_eq!(crc(&src, 40_000, 1000), crc(&dst, 0, 1000));
}

/// Out of bounds, unknown region, foreign descriptor: each its precise error, and the connection
/// stays usable. (A wrong key closes it: [`wrong_key_closes_the_connection`].)
pub fn access_violations_have_precise_errors(make: MakeConfig<'_>) {
    let p = pair(make);
    let src = p.a.alloc_region(4096).unwrap();
    let dst = p.b.alloc_region(4096).unwrap();
    let d = dst.descriptor();
    let check = |op: Result<genie_transport::Op, TransportError>,
                 want: &dyn Fn(&TransportError) -> bool,
                 what: &str| {
        let e = op.and_then(|o| o.wait(WAIT)).expect_err(what);
        assert!(want(&e), "{what}: got {e:?}");
    };
    check(
        p.ab.write(&src, 0, &d, 4000, 100),
        &|e| matches!(e, TransportError::RegionOutOfBounds { region, offset: 4000, len: 100, size: 4096 } if *region == d.region),
        "write, out of bounds",
    );
    check(
        p.ab.read(&src, 0, &d, 4096, 1),
        &|e| {
            matches!(
                e,
                TransportError::RegionOutOfBounds {
                    offset: 4096,
                    len: 1,
                    ..
                }
            )
        },
        "read, out of bounds",
    );
    check(
        p.ab.write(&src, 0, &d, u64::MAX, 2),
        &|e| matches!(e, TransportError::RegionOutOfBounds { .. }),
        "write, offset overflow",
    );
    let gone = p.b.alloc_region(64).unwrap();
    let gd = gone.descriptor();
    drop(gone);
    check(
        p.ab.write(&src, 0, &gd, 0, 8),
        &|e| matches!(e, TransportError::UnknownRegion { region } if *region == gd.region),
        "write, dropped region",
    );
    check(
        p.ab.read(&src, 0, &gd, 0, 8),
        &|e| matches!(e, TransportError::UnknownRegion { .. }),
        "read, dropped region",
    );
    check(
        p.ab.write(&src, 4090, &d, 0, 8),
        &|e| matches!(e, TransportError::LocalOutOfBounds { .. }),
        "local out of bounds",
    );
    let foreign = RemoteRegion {
        endpoint: d.endpoint ^ 1,
        ..d
    };
    check(
        p.ab.write(&src, 0, &foreign, 0, 8),
        &|e| matches!(e, TransportError::ForeignDescriptor { .. }),
        "foreign descriptor",
    );
    // Nothing was touched, and the connection still works.
    assert!(dst.with(|b| b.iter().all(|&x| x == 0)));
    fill(&src, 3);
    wait_ok(
        p.ab.write(&src, 0, &d, 0, 4096).unwrap(),
        "write after errors",
    );
    assert_eq!(crc(&dst, 0, 4096), crc(&src, 0, 4096));
    assert!(p.ab.is_alive() && p.ba.is_alive());
}

/// Eight connections from four client endpoints to one server, each driven by its own thread with
/// many writes and reads in flight.
pub fn many_concurrent_transfers_over_many_connections(make: MakeConfig<'_>) {
    const CLIENTS: usize = 4;
    const CONNS_PER_CLIENT: usize = 2;
    const OPS: usize = 64;
    const SLOT: usize = 64 * 1024;
    let server = open(make()).unwrap();
    let n = CLIENTS * CONNS_PER_CLIENT;
    let dst = server.alloc_region(n * OPS * SLOT).unwrap();
    let d = dst.descriptor();
    let clients: Vec<_> = (0..CLIENTS).map(|_| open(make()).unwrap()).collect();
    let mut conns = Vec::new();
    for c in &clients {
        for _ in 0..CONNS_PER_CLIENT {
            conns.push((c.clone(), c.connect(server.local_addr()).unwrap()));
        }
    }
    let accepted: Vec<_> = (0..n).map(|_| server.accept(WAIT).unwrap()).collect();
    std::thread::scope(|s| {
        for (k, (ep, conn)) in conns.iter().enumerate() {
            s.spawn(move || {
                let src = ep.alloc_region(OPS * SLOT).unwrap();
                let back = ep.alloc_region(OPS * SLOT).unwrap();
                fill(&src, k as u64 + 100);
                let base = k * OPS * SLOT;
                let len = |i: usize| (i * 7919 + k * 31) % SLOT + 1;
                let writes: Vec<_> = (0..OPS)
                    .map(|i| {
                        conn.write(&src, i * SLOT, &d, (base + i * SLOT) as u64, len(i))
                            .unwrap()
                    })
                    .collect();
                writes
                    .into_iter()
                    .for_each(|o| wait_ok(o, "concurrent write"));
                let reads: Vec<_> = (0..OPS)
                    .map(|i| {
                        conn.read(&back, i * SLOT, &d, (base + i * SLOT) as u64, len(i))
                            .unwrap()
                    })
                    .collect();
                reads
                    .into_iter()
                    .for_each(|o| wait_ok(o, "concurrent read"));
                for i in 0..OPS {
                    assert_eq!(
                        crc(&back, i * SLOT, len(i)),
                        crc(&src, i * SLOT, len(i)),
                        "conn {k} op {i}"
                    );
                }
            });
        }
    });
    assert!(accepted.iter().all(|c| c.is_alive()));
}

/// Matching secrets connect; a wrong or missing secret is refused with `AuthFailed` on both sides.
pub fn shared_secret(make: MakeConfig<'_>) {
    let with = |s: Option<&str>| TransportConfig {
        secret: s.map(String::from),
        ..make()
    };
    let server = open(with(Some("open sesame"))).unwrap();
    let good = open(with(Some("open sesame"))).unwrap();
    let c = good.connect(server.local_addr()).unwrap();
    let sc = server.accept(WAIT).unwrap();
    wait_ok(c.send(b"ok").unwrap(), "send after auth");
    assert_eq!(sc.recv(WAIT).unwrap(), b"ok");
    for client_secret in [Some("wrong"), None] {
        let bad = open(with(client_secret)).unwrap();
        match bad.connect(server.local_addr()) {
            Err(TransportError::AuthFailed { .. }) => {}
            other => {
                panic!("client with secret {client_secret:?}: expected AuthFailed, got {other:?}")
            }
        }
        match server.accept(WAIT) {
            Err(TransportError::AuthFailed { .. }) => {}
            other => panic!("server side of {client_secret:?}: expected AuthFailed, got {other:?}"),
        }
    }
    // A client with a secret refuses a server without one.
    let open_server = open(with(None)).unwrap();
    assert!(matches!(
        good.connect(open_server.local_addr()),
        Err(TransportError::AuthFailed { .. })
    ));
    assert!(matches!(
        open_server.accept(WAIT),
        Err(TransportError::AuthFailed { .. })
    ));
    // The authenticated connection was not disturbed.
    wait_ok(c.send(b"still").unwrap(), "send after refusals");
    assert_eq!(sc.recv(WAIT).unwrap(), b"still");
}

/// A wrong key fails its operation with `BadKey` and then closes the connection (on RDMA, where
/// keys are 32-bit and guessable, a free guess must not exist; TCP follows the same rule). The
/// target memory is untouched, and other connections carry on.
pub fn wrong_key_closes_the_connection(make: MakeConfig<'_>) {
    let p = pair(make);
    let other = p.a.connect(p.b.local_addr()).unwrap();
    let _other_b = p.b.accept(WAIT).unwrap();
    let src = p.a.alloc_region(4096).unwrap();
    let dst = p.b.alloc_region(4096).unwrap();
    fill(&src, 5);
    let d = dst.descriptor();
    let bad_key = RemoteRegion {
        key: d.key ^ 0xff,
        ..d
    };
    let e =
        p.ab.write(&src, 0, &bad_key, 0, 8)
            .and_then(|o| o.wait(WAIT))
            .expect_err("write with a wrong key");
    assert!(
        matches!(e, TransportError::BadKey { region } if region == d.region),
        "{e:?}"
    );
    // Both sides see the connection closed (recv returns the error instead of waiting).
    assert!(p.ba.recv(WAIT).is_err(), "the target kept the connection");
    assert!(
        p.ab.recv(WAIT).is_err(),
        "the requester kept the connection"
    );
    assert!(!p.ab.is_alive() && !p.ba.is_alive());
    assert!(dst.with(|b| b.iter().all(|&x| x == 0)));
    // Another connection between the same endpoints is not affected.
    wait_ok(
        other.write(&src, 0, &d, 0, 4096).unwrap(),
        "other connection",
    );
    assert_eq!(crc(&dst, 0, 4096), crc(&src, 0, 4096));
}

/// A peer that sends faster than the application takes is held by back-pressure (a small
/// inbound queue here; receive credits on RDMA): nothing is lost, order is kept, and taking
/// the queued items lets the rest through.
pub fn a_flooding_peer_is_held_not_queued(make: MakeConfig<'_>) {
    const N: u32 = 3000;
    let small = || TransportConfig {
        max_inbound_queue: 8,
        max_inbound_bytes: 4096,
        ..make()
    };
    let p = pair(&small);
    let src = p.a.alloc_region(8).unwrap();
    let dst = p.b.alloc_region(8).unwrap();
    let d = dst.descriptor();
    // Messages and notifications interleaved, from another thread: the sender blocks (or its
    // operations wait) while the receiver takes nothing.
    std::thread::scope(|s| {
        let ab = &p.ab;
        let src = &src;
        let sender = s.spawn(move || {
            let mut ops = Vec::new();
            for i in 0..N {
                ops.push(ab.send(&i.to_le_bytes()).unwrap());
                ops.push(ab.write_notify(src, 0, &d, 0, 8, i).unwrap());
            }
            for op in ops {
                wait_ok(op, "send under back-pressure");
            }
        });
        for i in 0..N {
            let m = p.ba.recv(WAIT).unwrap();
            assert_eq!(m, i.to_le_bytes(), "message {i} in order");
            assert_eq!(p.ba.recv_notification(WAIT).unwrap(), i, "notification {i}");
        }
        sender.join().unwrap();
    });
    assert!(p.ab.is_alive() && p.ba.is_alive());
}

/// A region grants only the access it was made with: a landing region cannot be read, a source
/// cannot be written, a local region neither; each refusal is `AccessDenied`, the memory is
/// untouched, and the connection stays usable.
pub fn regions_grant_only_their_access(make: MakeConfig<'_>) {
    let p = pair(make);
    let src = p.a.alloc_region(4096).unwrap();
    fill(&src, 7);
    let landing = p.b.alloc_region_with(4096, RegionAccess::Write).unwrap();
    let source =
        p.b.register_with(vec![9u8; 4096], RegionAccess::Read)
            .unwrap();
    let local = p.b.alloc_region_with(4096, RegionAccess::Local).unwrap();
    assert_eq!(landing.access(), RegionAccess::Write);
    let denied = |op: Result<genie_transport::Op, TransportError>, want: &str, what: &str| {
        let e = op.and_then(|o| o.wait(WAIT)).expect_err(what);
        assert!(
            matches!(e, TransportError::AccessDenied { op, .. } if op == want),
            "{what}: {e:?}"
        );
    };
    denied(
        p.ab.read(&src, 0, &landing.descriptor(), 0, 8),
        "read",
        "read a landing region",
    );
    denied(
        p.ab.write(&src, 0, &source.descriptor(), 0, 8),
        "write",
        "write a source",
    );
    denied(
        p.ab.write(&src, 0, &local.descriptor(), 0, 8),
        "write",
        "write a local region",
    );
    denied(
        p.ab.read(&src, 0, &local.descriptor(), 0, 8),
        "read",
        "read a local region",
    );
    assert!(source.with(|b| b.iter().all(|&x| x == 9)));
    assert!(local.with(|b| b.iter().all(|&x| x == 0)));
    // What each grants works.
    wait_ok(
        p.ab.write(&src, 0, &landing.descriptor(), 0, 4096).unwrap(),
        "write a landing region",
    );
    assert_eq!(crc(&landing, 0, 4096), crc(&src, 0, 4096));
    wait_ok(
        p.ab.read(&src, 0, &source.descriptor(), 0, 4096).unwrap(),
        "read a source",
    );
    assert!(src.with(|b| b.iter().all(|&x| x == 9)));
    assert!(p.ab.is_alive() && p.ba.is_alive());
}

/// 100 sockets that connect and then say nothing (or drip one byte) hold nobody up: each
/// handshake runs on its own with one deadline, so a real peer connects at once, and the idle
/// ones are dropped after the peer timeout.
pub fn idle_and_dripping_sockets_do_not_starve_accept(make: MakeConfig<'_>) {
    use std::io::Write;
    let p = pair(make);
    let addr = p.b.local_addr();
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(&[0]);
        }
        idle.push(s);
    }
    let start = Instant::now();
    let c =
        p.a.connect(addr)
            .expect("a real peer connects past 100 idle sockets");
    // `accept` also reports the idle sockets' handshakes that ran out of time (each after one
    // peer timeout): on a slow machine some may come before the real peer's connection.
    let deadline = start + Duration::from_secs(5);
    let sc = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match p.b.accept(left.max(Duration::from_millis(1))) {
            Ok(sc) => break sc,
            Err(TransportError::PeerDead { .. } | TransportError::Timeout { .. })
                if Instant::now() < deadline =>
            {
                continue
            }
            Err(e) => panic!("the real peer is not accepted: {e}"),
        }
    };
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    wait_ok(c.send(b"through").unwrap(), "send past idle sockets");
    assert_eq!(sc.recv(WAIT).unwrap(), b"through");
    drop(idle);
}

/// A private region is reached only through a descriptor its owner granted on one connection:
/// that connection reads and writes it; a second authenticated connection between the same
/// endpoints presenting the same descriptor gets `BadKey` (and is closed), the region's own
/// endpoint-wide descriptor grants nothing, and the memory is untouched by either.
pub fn a_grant_is_valid_only_on_its_connection(make: MakeConfig<'_>) {
    let p = pair(make);
    let second = p.a.connect(p.b.local_addr()).unwrap();
    let second_b = p.b.accept(WAIT).unwrap();
    let private =
        p.b.alloc_private_region(4096, RegionAccess::ReadWrite)
            .unwrap();
    assert!(private.is_private());
    let granted = p.ba.grant(&private).unwrap();
    assert_eq!(
        p.ba.grant(&private).unwrap(),
        granted,
        "one grant per connection"
    );
    let src = p.a.alloc_region(4096).unwrap();
    fill(&src, 11);
    // The granting connection: full access.
    wait_ok(
        p.ab.write(&src, 0, &granted, 0, 4096).unwrap(),
        "granted write",
    );
    assert_eq!(crc(&private, 0, 4096), crc(&src, 0, 4096));
    wait_ok(
        p.ab.write_notify(&src, 0, &granted, 0, 64, 5).unwrap(),
        "granted write with a notification",
    );
    assert_eq!(p.ba.recv_notification(WAIT).unwrap(), 5);
    let back = p.a.alloc_region(4096).unwrap();
    wait_ok(
        p.ab.read(&back, 0, &granted, 0, 4096).unwrap(),
        "granted read",
    );
    assert_eq!(crc(&back, 0, 4096), crc(&src, 0, 4096));
    // The endpoint-wide descriptor of a private region grants nothing, on any connection.
    let plain = private.descriptor();
    let third = p.a.connect(p.b.local_addr()).unwrap();
    let _third_b = p.b.accept(WAIT).unwrap();
    let e = third
        .write(&src, 0, &plain, 0, 8)
        .and_then(|o| o.wait(WAIT))
        .expect_err("a private region's own descriptor");
    assert!(matches!(e, TransportError::BadKey { .. }), "{e:?}");
    // Another connection presenting the granted descriptor: refused and closed.
    let zeros = p.a.alloc_region(4096).unwrap();
    let e = second
        .write(&zeros, 0, &granted, 0, 4096)
        .and_then(|o| o.wait(WAIT))
        .expect_err("the grant of another connection");
    assert!(matches!(e, TransportError::BadKey { .. }), "{e:?}");
    assert!(
        second_b.recv(WAIT).is_err(),
        "the target kept the connection"
    );
    assert_eq!(
        crc(&private, 0, 4096),
        crc(&src, 0, 4096),
        "memory untouched"
    );
    // The granting connection is unaffected.
    wait_ok(
        p.ab.write(&src, 0, &granted, 0, 8).unwrap(),
        "granting connection still works",
    );
}

/// Caller memory registered with `register` is a target like any other and comes back afterwards.
pub fn registered_caller_memory(make: MakeConfig<'_>) {
    let p = pair(make);
    let dst = p.b.register(vec![0u8; 10_000]).unwrap();
    let src =
        p.a.register((0..10_000u32).map(|i| (i % 256) as u8).collect())
            .unwrap();
    wait_ok(
        p.ab.write(&src, 17, &dst.descriptor(), 33, 9000).unwrap(),
        "write to registered",
    );
    drop(p);
    let v = dst
        .try_into_vec()
        .expect("last handle gives the buffer back");
    assert!((0..9000).all(|i| v[33 + i] == ((17 + i) % 256) as u8));
}

/// Starts `genie-test-peer` with `config`, returns it and its address.
pub fn spawn_peer(
    peer_bin: &str,
    config: &TransportConfig,
    len: usize,
) -> (PeerProcess, std::net::SocketAddr) {
    let mut child = Command::new(peer_bin)
        .arg(serde_json::to_string(config).unwrap())
        .arg(len.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn genie-test-peer");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("peer said {line:?}"))
        .parse()
        .unwrap();
    (PeerProcess(child), addr)
}

/// A spawned peer process, killed when dropped (so a failing test leaves nothing behind).
pub struct PeerProcess(pub Child);

impl PeerProcess {
    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A peer process killed mid-transfer: every pending operation fails within the peer timeout,
/// other connections carry on, and a restarted peer accepts a new connection.
pub fn peer_process_killed_mid_transfer(make: MakeConfig<'_>, peer_bin: &str) {
    const LEN: usize = 64 << 20;
    let config = make();
    let bound = config.peer_timeout + Duration::from_millis(500);
    let me = open(config.clone()).unwrap();
    let other = pair(make);
    let src = me.alloc_region(LEN).unwrap();
    fill(&src, 77);
    let peer_config = TransportConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let (mut child, addr) = spawn_peer(peer_bin, &peer_config, LEN);
    let conn = me.connect(addr).unwrap();
    let d: RemoteRegion = serde_json::from_slice(&conn.recv(WAIT).unwrap()).unwrap();
    wait_ok(
        conn.write(&src, 0, &d, 0, 4096).unwrap(),
        "first write to the peer",
    );
    // Post 16 large writes and a read from another thread and kill the peer once the first is
    // posted, so that the kill lands while work is pending even where a post moves its data
    // before it returns (soft-RoCE over loopback runs the whole request in the posting thread,
    // so everything posted before a kill would be done by then). A post the dead connection
    // refuses counts as failed, as the pending ones do.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut failed = 0;
    let (ops, killed) = std::thread::scope(|s| {
        let (conn, src, d) = (&conn, &src, &d);
        let poster = s.spawn(move || {
            let mut refused = 0;
            for i in 0..17 {
                let op = if i < 16 {
                    conn.write(src, 0, d, 0, LEN)
                } else {
                    conn.read(src, 0, d, 0, LEN)
                };
                match op {
                    Ok(op) => {
                        if tx.send(op).is_err() {
                            break;
                        }
                    }
                    Err(
                        TransportError::PeerDead { .. } | TransportError::ConnectionClosed { .. },
                    ) => refused += 1,
                    Err(e) => panic!("posting to a peer being killed: unexpected {e:?}"),
                }
            }
            refused
        });
        let mut ops = vec![rx.recv().expect("the first write was refused")];
        child.kill();
        let killed = Instant::now();
        failed += poster.join().expect("the posting thread panicked");
        ops.extend(rx.try_iter());
        (ops, killed)
    });
    for op in &ops {
        let left = bound.saturating_sub(killed.elapsed());
        match op.wait(left) {
            Ok(()) => {}
            Err(TransportError::PeerDead { .. } | TransportError::ConnectionClosed { .. }) => {
                failed += 1
            }
            Err(e) => panic!(
                "pending op after kill: unexpected {e:?} after {:?}",
                killed.elapsed()
            ),
        }
    }
    assert!(
        killed.elapsed() <= bound,
        "pending ops resolved after {:?}",
        killed.elapsed()
    );
    assert!(
        failed > 0,
        "some of {} ops were pending at the kill (17 posted or refused)",
        ops.len()
    );
    let deadline = Instant::now() + bound;
    while conn.is_alive() && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(!conn.is_alive());
    assert!(
        conn.write(&src, 0, &d, 0, 1).is_err(),
        "a dead connection refuses new work"
    );
    // Other connections carry on.
    let r = other.b.alloc_region(16).unwrap();
    let s = other.a.alloc_region(16).unwrap();
    wait_ok(
        other.ab.write(&s, 0, &r.descriptor(), 0, 16).unwrap(),
        "unrelated connection",
    );
    // A restarted peer (new process, new endpoint) accepts again.
    let (_child, addr) = spawn_peer(peer_bin, &peer_config, LEN);
    let conn = me.connect(addr).unwrap();
    let d2: RemoteRegion = serde_json::from_slice(&conn.recv(WAIT).unwrap()).unwrap();
    assert_ne!(d2.endpoint, d.endpoint);
    assert!(matches!(
        conn.write(&src, 0, &d, 0, 8),
        Err(TransportError::ForeignDescriptor { .. })
    ));
    wait_ok(
        conn.write(&src, 5, &d2, 9, 1 << 20).unwrap(),
        "write to the restarted peer",
    );
    let back = me.alloc_region(1 << 20).unwrap();
    wait_ok(
        conn.read(&back, 0, &d2, 9, 1 << 20).unwrap(),
        "read from the restarted peer",
    );
    assert_eq!(crc(&back, 0, 1 << 20), crc(&src, 5, 1 << 20));
}

/// Threads of this process now (`/proc/self/task`).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Median round trip of an 8-byte write (post, then wait for its completion) on `conn`, in µs.
pub fn write_latency_8b(conn: &dyn Connection, src: &Region, dst: &RemoteRegion) -> f64 {
    const ITERS: usize = 1000;
    for _ in 0..100 {
        wait_ok(conn.write(src, 0, dst, 0, 8).unwrap(), "warm-up write");
    }
    let mut t: Vec<f64> = (0..ITERS)
        .map(|_| {
            let start = Instant::now();
            wait_ok(conn.write(src, 0, dst, 0, 8).unwrap(), "8 B write");
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[ITERS / 2]
}

/// What [`connections_at_scale`] measured.
#[derive(Debug, Clone, Copy)]
pub struct ScaleReport {
    /// Threads of the process with one connection between the two endpoints.
    pub threads_at_1: usize,
    /// Threads with all connections open.
    pub threads_at_n: usize,
    /// Median 8-byte write round trip with one connection open, µs.
    pub write_8b_us_at_1: f64,
    /// The same on the first connection with all of them open, µs.
    pub write_8b_us_at_n: f64,
}

/// Raises this process's soft open-file limit to `want` (at most the hard limit); panics with the
/// limits when that is not enough.
fn raise_open_file_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if matches!(now.current, Some(c) if c >= want) || now.current.is_none() {
        return;
    }
    let target = now.maximum.map_or(want, |m| m.min(want));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: now.maximum,
        },
    );
    let got = getrlimit(Resource::Nofile).current;
    assert!(
        matches!(got, Some(c) if c >= want) || got.is_none(),
        "this test needs {want} open files; the limit is {got:?} (hard {:?}): raise it with ulimit -n",
        now.maximum
    );
}

/// `conns` connections between two endpoints carry `ops` writes (of 1 B to 4 KiB, all posted
/// before any is waited for, spread round-robin over the connections), then `ops` reads of the same
/// ranges into a third region; the checksums of source, target and read-back agree, and every
/// connection is still alive. Thread counts (`/proc/self/task`, so other tests running at the
/// same time count too) and the 8-byte write latency at one and at `conns` connections are
/// returned and printed.
pub fn connections_at_scale(make: MakeConfig<'_>, conns: usize, ops: usize) -> ScaleReport {
    const SLOT: usize = 4096;
    // Both ends of every connection live in this process: a few descriptors each, more than
    // the common soft limit of 1024.
    raise_open_file_limit(8 * conns as u64 + 256);
    let a = open(make()).expect("open a");
    let b = open(make()).expect("open b");
    let dst = b.alloc_region(ops * SLOT).unwrap();
    let d = dst.descriptor();
    let src = a.alloc_region(ops * SLOT).unwrap();
    let back = a.alloc_region(ops * SLOT).unwrap();
    fill(&src, 0x5ca1e);
    let mut ab = vec![a.connect(b.local_addr()).expect("connect 0")];
    let mut ba = vec![b.accept(WAIT).expect("accept 0")];
    let threads_at_1 = thread_count();
    let write_8b_us_at_1 = write_latency_8b(&*ab[0], &src, &d);
    for i in 1..conns {
        ab.push(
            a.connect(b.local_addr())
                .unwrap_or_else(|e| panic!("connect {i}: {e}")),
        );
        ba.push(b.accept(WAIT).unwrap_or_else(|e| panic!("accept {i}: {e}")));
    }
    let threads_at_n = thread_count();
    let len = |i: usize| (i * 7919) % SLOT + 1;
    let writes: Vec<_> = (0..ops)
        .map(|i| {
            ab[i % conns]
                .write(&src, i * SLOT, &d, (i * SLOT) as u64, len(i))
                .unwrap_or_else(|e| panic!("write {i}: {e}"))
        })
        .collect();
    writes
        .into_iter()
        .for_each(|o| wait_ok(o, "write at scale"));
    let reads: Vec<_> = (0..ops)
        .map(|i| {
            ab[(i + 1) % conns]
                .read(&back, i * SLOT, &d, (i * SLOT) as u64, len(i))
                .unwrap_or_else(|e| panic!("read {i}: {e}"))
        })
        .collect();
    reads.into_iter().for_each(|o| wait_ok(o, "read at scale"));
    for i in 0..ops {
        let want = crc(&src, i * SLOT, len(i));
        assert_eq!(crc(&dst, i * SLOT, len(i)), want, "target of op {i}");
        assert_eq!(crc(&back, i * SLOT, len(i)), want, "read-back of op {i}");
    }
    let write_8b_us_at_n = write_latency_8b(&*ab[0], &src, &d);
    assert!(ab.iter().chain(&ba).all(|c| c.is_alive()));
    let r = ScaleReport {
        threads_at_1,
        threads_at_n,
        write_8b_us_at_1,
        write_8b_us_at_n,
    };
    eprintln!(
        "scale: backend {} poll_mode {:?}: {conns} connections, {ops} outstanding ops: threads {} at 1 connection, {} at {conns}; 8 B write {:.2} us at 1 connection, {:.2} us at {conns}",
        a.backend(),
        a.config().poll_mode,
        r.threads_at_1,
        r.threads_at_n,
        r.write_8b_us_at_1,
        r.write_8b_us_at_n
    );
    r
}
