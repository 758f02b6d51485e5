//! Property tests of the RDMA side channel's frame decoder (`transport/src/rdma/wire.rs`) through
//! its fuzzing hook, the one `fuzz/fuzz_targets/rdma_wire.rs` calls: arbitrary bytes never panic,
//! and every frame that decodes encodes and decodes back to itself (the hook asserts it).
//! Needs the `rdma` feature (the decoder is compiled only with it), which builds without a
//! device.
#![cfg(feature = "rdma")]

use genie_transport::fuzzing::rdma_wire;
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

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
