//! Randomized decoder tests (the stable-toolchain stand-in for `fuzz/`): the receive path never
//! panics on arbitrary bytes, and a valid header round-trips.
use genie_transport::fuzzing::decode_frame;
use genie_transport::tcp::codec::{encode_frame, FrameKind, Header, HEADER_LEN};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![
        Just(FrameKind::Write),
        Just(FrameKind::ReadReq),
        Just(FrameKind::ReadResp),
        Just(FrameKind::Msg),
        Just(FrameKind::Ack),
        Just(FrameKind::Err),
        Just(FrameKind::Ping),
        Just(FrameKind::Hello),
        Just(FrameKind::Refuse),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_frame(&data);
    }

    #[test]
    fn plausible_frames_never_panic(
        frames in proptest::collection::vec(
            (kind(), 0u8..4, any::<u32>(), 0u64..4, 0u64..8, 0u64..5000, proptest::collection::vec(any::<u8>(), 0..64)),
            1..6,
        )
    ) {
        let mut bytes = Vec::new();
        for (k, flags, arg, op_id, region, offset, body) in frames {
            let mut h = Header::new(k);
            h.flags = flags;
            h.arg = arg;
            h.op_id = op_id;
            h.region = region;
            h.offset = offset;
            bytes.extend(encode_frame(h, &body));
        }
        decode_frame(&bytes);
    }

    #[test]
    fn header_roundtrips(k in kind(), flags in 0u8..4, body_len: u32, arg: u32, op_id: u64, region: u64, offset: u64, key: u64) {
        let h = Header { body_len, arg, op_id, region, offset, key, flags, ..Header::new(k) };
        let enc = h.encode();
        prop_assert_eq!(enc.len(), HEADER_LEN);
        prop_assert_eq!(Header::decode(&enc), Ok(h));
    }
}
