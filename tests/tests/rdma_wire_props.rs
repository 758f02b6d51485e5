//! Property tests of the RDMA side channel's frame decoder (`transport/src/rdma/wire.rs`) through
//! its fuzzing hook, the one `fuzz/fuzz_targets/rdma_wire.rs` calls: arbitrary bytes never panic,
//! and every frame that decodes encodes and decodes back to itself (the hook asserts it).
//! Needs the `rdma` feature (the decoder is compiled only with it), which builds without a
//! device.
#![cfg(feature = "rdma")]

use genie_transport::fuzzing::{rdma_wire, rdma_wire_decodes};
use proptest::prelude::*;

/// Deterministic filler bytes (SplitMix64), so the sweep below is the same on every run.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// Every tag with every body length up to 160 bytes, filled with zeros, ones, `0xff`, noise, and
/// zeros after each small version byte and flag (a hello starts with the protocol version and a
/// 0/1 flag): this reaches every frame kind at its exact length (so the hook's round trip is
/// checked for each), and the truncated and over-long bodies around it.
#[test]
fn every_tag_and_length_decodes_without_panic_and_round_trips() {
    for tag in 0..=255u8 {
        for len in 0..=160usize {
            for fill in 0..20u8 {
                let mut body = vec![tag];
                body.extend(match fill {
                    0 => vec![0; len],
                    1 => vec![0xff; len],
                    2 => vec![1; len],
                    3 => filler(u64::from(tag) << 16 | len as u64, len),
                    _ => {
                        let mut b = vec![0; len];
                        if len >= 2 {
                            (b[0], b[1]) = ((fill - 4) / 2, (fill - 4) % 2);
                        }
                        b
                    }
                });
                rdma_wire(&body);
                // The same bytes as a stream with a length prefix.
                let mut stream = (body.len() as u32).to_le_bytes().to_vec();
                stream.extend_from_slice(&body);
                rdma_wire(&stream);
            }
        }
    }
}

/// A QP info frame body (tag 8, version 4 layout: the first QP, `lanes` further ones, the seal)
/// with these addressing bytes.
#[allow(clippy::too_many_arguments)]
fn qp_info_body(
    qpn: u32,
    psn: u32,
    link_layer: u8,
    gid_type: u8,
    flags: u8,
    lid: u16,
    gid: [u8; 16],
    mtu: u32,
    tail: [u32; 2],
    lanes: u8,
    tag: Option<[u8; 32]>,
) -> Vec<u8> {
    let mut b = vec![8];
    let start = b.len();
    b.extend_from_slice(&qpn.to_le_bytes());
    b.extend_from_slice(&psn.to_le_bytes());
    b.extend_from_slice(&[link_layer, gid_type, flags]);
    b.extend_from_slice(&lid.to_le_bytes());
    b.extend_from_slice(&gid);
    b.extend_from_slice(&mtu.to_le_bytes());
    for v in tail {
        b.extend_from_slice(&v.to_le_bytes());
    }
    // Further lanes (handshake v4): a count, then each lane's QP info, here the first's again.
    let info = b[start..].to_vec();
    b.push(lanes);
    for _ in 0..lanes {
        b.extend_from_slice(&info);
    }
    match tag {
        Some(t) => {
            b.push(1);
            b.extend_from_slice(&t);
        }
        None => b.push(0),
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The addressing fields of the QP info: any LID, GID and MTU decode (and round-trip);
    /// the link layer (1 IB, 2 Ethernet), GID type (0 IB, 1 RoCE v1, 2 RoCE v2) and flags (bit 0
    /// only) decode exactly when they hold a defined value, and nothing else is accepted.
    #[test]
    fn qp_info_addressing_fields_decode_iff_defined(
        qpn in any::<u32>(),
        psn in any::<u32>(),
        link_layer in 0u8..6,
        gid_type in 0u8..6,
        flags in prop_oneof![Just(0u8), Just(1), any::<u8>()],
        lid in any::<u16>(),
        gid in any::<[u8; 16]>(),
        mtu in any::<u32>(),
        tail in any::<[u32; 2]>(),
        lanes in 0u8..3,
        tag in any::<Option<[u8; 32]>>(),
        cut in any::<proptest::sample::Index>(),
    ) {
        let body =
            qp_info_body(qpn, psn, link_layer, gid_type, flags, lid, gid, mtu, tail, lanes, tag);
        let defined = matches!(link_layer, 1 | 2) && gid_type <= 2 && flags <= 1;
        prop_assert_eq!(rdma_wire_decodes(&body), defined);
        // Truncated anywhere, or with a trailing byte, never decodes.
        prop_assert!(!rdma_wire_decodes(&body[..cut.index(body.len())]));
        let mut long = body.clone();
        long.push(0);
        prop_assert!(!rdma_wire_decodes(&long));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
        rdma_wire(&data);
    }

    #[test]
    fn streams_of_length_prefixed_frames_never_panic(
        frames in proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..96), any::<Option<u32>>()),
            0..8,
        ),
    ) {
        let mut stream = Vec::new();
        for (tag, body, claimed) in frames {
            let len = claimed.unwrap_or(body.len() as u32 + 1);
            stream.extend_from_slice(&len.to_le_bytes());
            stream.push(tag);
            stream.extend_from_slice(&body);
        }
        rdma_wire(&stream);
    }
}
