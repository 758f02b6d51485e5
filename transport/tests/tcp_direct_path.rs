//! The TCP backend's direct path (callers writing their own small requests to the socket) against
//! its fallback (the connection's inbox, written by the progress thread): several threads submit on
//! one connection at once, mixing small messages (direct), large ones and one-sided writes (both
//! through the progress thread), while the receiving side's progress thread writes ACKs on the
//! socket its own callers write replies to. Each thread's requests must arrive in order and intact,
//! and a message must never overtake a write submitted before it by the same thread.

use genie_transport::tcp::endpoint::DIRECT_MAX;
use genie_transport::{open, Connection, PollMode, Transport, TransportConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
/// Message senders, each with its own id; the writer thread has id `SENDERS`.
const SENDERS: u8 = 4;
const PER_SENDER: u32 = 250;
const WRITES: u32 = 200;
const SLOT: usize = 4096;
/// Message sizes cycle through these: below, at and above `DIRECT_MAX`, and tiny.
const SIZES: [usize; 6] = [9, 1000, 16 * 1024, DIRECT_MAX, DIRECT_MAX + 5000, 13];

fn config(poll_mode: PollMode) -> TransportConfig {
    TransportConfig {
        poll_mode,
        max_message_size: 2 * DIRECT_MAX,
        ..TransportConfig::tcp()
    }
}

/// Two endpoints and a connection between them, from each side.
type Pair = (
    Arc<dyn Transport>,
    Arc<dyn Transport>,
    Arc<dyn Connection>,
    Arc<dyn Connection>,
);

/// Two endpoints of `poll_mode` on loopback and a connection between them, from each side.
fn connected(poll_mode: PollMode) -> Pair {
    let a = open(config(poll_mode)).unwrap();
    let b = open(config(poll_mode)).unwrap();
    let ab = a.connect(b.local_addr()).unwrap();
    let ba = b.accept(WAIT).unwrap();
    (a, b, ab, ba)
}

/// Byte `i` of the payload of message `seq` from `sender`.
fn pattern(sender: u8, seq: u32, i: usize) -> u8 {
    (u64::from(sender) * 131 + u64::from(seq) * 7 + i as u64 * 31 % 251) as u8
}

/// A message: sender, sequence number, then a payload the receiver can check.
fn message(sender: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(len.max(5));
    m.push(sender);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend((m.len()..len).map(|i| pattern(sender, seq, i)));
    m
}

fn parse(m: &[u8]) -> (u8, u32) {
    assert!(m.len() >= 5, "message of {} bytes", m.len());
    (m[0], u32::from_le_bytes([m[1], m[2], m[3], m[4]]))
}

fn slot_pattern(i: u32) -> Vec<u8> {
    (0..SLOT).map(|k| (i as usize * 17 + k) as u8).collect()
}

fn concurrent_submitters_keep_order_and_integrity(poll_mode: PollMode) {
    let (a, b, ab, ba) = connected(poll_mode);
    let dst = b.alloc_region(WRITES as usize * SLOT).unwrap();
    let d = dst.descriptor();
    let src = a.alloc_region(WRITES as usize * SLOT).unwrap();
    for i in 0..WRITES {
        src.write(i as usize * SLOT, &slot_pattern(i)).unwrap();
    }
    let total = u32::from(SENDERS) * PER_SENDER + WRITES;
    std::thread::scope(|s| {
        for sender in 0..SENDERS {
            let ab = ab.clone();
            s.spawn(move || {
                let ops: Vec<_> = (0..PER_SENDER)
                    .map(|seq| {
                        let len = SIZES[(seq as usize + sender as usize) % SIZES.len()];
                        ab.send(&message(sender, seq, len)).unwrap()
                    })
                    .collect();
                ops.into_iter().for_each(|o| o.wait(WAIT).unwrap());
            });
        }
        // One-sided writes (through the progress thread), each followed by a small message (direct
        // when possible) that must not overtake it.
        let (ab_w, src, d) = (ab.clone(), &src, &d);
        s.spawn(move || {
            let mut ops = Vec::new();
            for i in 0..WRITES {
                let at = i as usize * SLOT;
                ops.push(ab_w.write(src, at, d, at as u64, SLOT).unwrap());
                ops.push(ab_w.send(&message(SENDERS, i, 5)).unwrap());
            }
            ops.into_iter().for_each(|o| o.wait(WAIT).unwrap());
        });
        // The receiver checks and echoes each message's id back (b's callers and b's progress
        // thread, writing ACKs, share the socket to `a`).
        let (ba, dst) = (ba.clone(), &dst);
        s.spawn(move || {
            let mut next: HashMap<u8, u32> = HashMap::new();
            let mut echoes = Vec::new();
            for _ in 0..total {
                let m = ba.recv(WAIT).unwrap();
                let (sender, seq) = parse(&m);
                let want = next.entry(sender).or_insert(0);
                assert_eq!(seq, *want, "sender {sender}: messages in order");
                *want += 1;
                if sender == SENDERS {
                    let mut got = vec![0u8; SLOT];
                    dst.read(seq as usize * SLOT, &mut got).unwrap();
                    assert!(
                        got == slot_pattern(seq),
                        "write {seq} landed before its message"
                    );
                } else {
                    assert!(
                        m.iter()
                            .enumerate()
                            .skip(5)
                            .all(|(i, &x)| x == pattern(sender, seq, i)),
                        "sender {sender} message {seq} intact"
                    );
                }
                echoes.push(ba.send(&m[..5]).unwrap());
            }
            echoes.into_iter().for_each(|o| o.wait(WAIT).unwrap());
        });
        let ab_r = ab.clone();
        s.spawn(move || {
            let mut next: HashMap<u8, u32> = HashMap::new();
            for _ in 0..total {
                let (sender, seq) = parse(&ab_r.recv(WAIT).unwrap());
                let want = next.entry(sender).or_insert(0);
                assert_eq!(seq, *want, "echoes of sender {sender} in order");
                *want += 1;
            }
        });
    });
    assert!(ab.is_alive() && ba.is_alive());
    assert_eq!(ab.try_recv().unwrap(), None);
    assert_eq!(ba.try_recv().unwrap(), None);
}

#[test]
fn concurrent_submitters_blocking() {
    concurrent_submitters_keep_order_and_integrity(PollMode::Blocking);
}

#[test]
fn concurrent_submitters_busy_poll() {
    concurrent_submitters_keep_order_and_integrity(PollMode::BusyPoll);
}

/// A caller that holds its region's write lock while it submits a write of it gets its operation
/// at once (submitting never waits for a region's lock); the write leaves once the lock is
/// released, in order with the messages around it, and carries what the region held by then.
#[test]
fn a_write_of_a_region_its_caller_holds_locked_leaves_once_released() {
    let (a, b, ab, ba) = connected(PollMode::Blocking);
    const N: u32 = 50;
    let dst = b.alloc_region(N as usize * SLOT).unwrap();
    let d = dst.descriptor();
    let src = a.alloc_region(N as usize * SLOT).unwrap();
    let mut ops = Vec::new();
    for i in 0..N {
        let at = i as usize * SLOT;
        if i % 2 == 0 {
            // Locked: submitted under the guard, whose last change must still be sent.
            let mut g = src.lock_mut();
            g[at..at + SLOT].fill(0xEE);
            ops.push(ab.write(&src, at, &d, at as u64, SLOT).unwrap());
            g[at..at + SLOT].copy_from_slice(&slot_pattern(i));
        } else {
            src.write(at, &slot_pattern(i)).unwrap();
            ops.push(ab.write(&src, at, &d, at as u64, SLOT).unwrap());
        }
        ops.push(ab.send(&message(SENDERS, i, 5)).unwrap());
    }
    ops.into_iter().for_each(|o| o.wait(WAIT).unwrap());
    for i in 0..N {
        let (sender, seq) = parse(&ba.recv(WAIT).unwrap());
        assert_eq!((sender, seq), (SENDERS, i), "messages in order");
        let mut got = vec![0u8; SLOT];
        dst.read(i as usize * SLOT, &mut got).unwrap();
        assert!(
            got == slot_pattern(i),
            "write {i} intact, before its message"
        );
    }
}

/// After the peer goes away, sends fail (typed) instead of hanging, on either path.
#[test]
fn sends_fail_once_the_peer_is_gone() {
    let (_a, b, ab, ba) = connected(PollMode::Blocking);
    ab.send(b"hello").unwrap().wait(WAIT).unwrap();
    assert_eq!(ba.recv(WAIT).unwrap(), b"hello");
    drop(ba);
    drop(b);
    // Keep sending until the failure is seen: every operation completes, none hangs.
    let mut failed = false;
    for i in 0..10_000u32 {
        let len = if i % 2 == 0 { 8 } else { DIRECT_MAX + 1 };
        match ab.send(&vec![1u8; len]) {
            Ok(op) => {
                if op.wait(WAIT).is_err() {
                    failed = true;
                    break;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "sends to a closed peer fail");
    let again = ab.send(b"x").and_then(|op| op.wait(WAIT));
    assert!(
        again.is_err(),
        "a send after the failure fails too: {again:?}"
    );
}
