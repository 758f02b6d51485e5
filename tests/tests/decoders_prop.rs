//! Property tests of the decoders a peer or a driver can reach, through the same hooks the fuzz
//! targets call (`fuzz/`), so that CI on the stable toolchain runs them on every
//! `cargo test --workspace`: arbitrary bytes never panic and are decoded in bounded time, and
//! well-formed values encode and decode back to themselves.
//!
//! The runtime's control messages (`genie_runtime::proto`) are here; the graph JSON decoder's are
//! in `scheduler/tests/graph_json_props.rs`, the TCP frame decoder's in
//! `transport/tests/decoder_props.rs`.

use genie_runtime::plan::Placement;
use genie_runtime::proto::{
    self, ComputeRecord, Feed, GraphRef, Msg, PayloadTensor, Reshape, RunStats, WeightSpec,
};
use genie_scheduler::builders::{gpt2_decode, Gpt2Config};
use genie_scheduler::graph::{DType, NodeId, TensorMeta, TensorRef};
use proptest::prelude::*;

/// `[u32 LE header length][header][payload]`.
fn frame(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(payload);
    b
}

fn tiny_graph() -> genie_scheduler::Graph {
    gpt2_decode(
        &Gpt2Config {
            layers: 1,
            hidden: 8,
            heads: 2,
            vocab: 16,
            context: 8,
            ..Gpt2Config::default()
        },
        3,
    )
    .unwrap()
}

fn meta() -> impl Strategy<Value = TensorMeta> {
    (
        proptest::collection::vec(0usize..1 << 20, 0..5),
        prop_oneof![Just(DType::F32), Just(DType::I64), Just(DType::Bf16)],
    )
        .prop_map(|(shape, dtype)| TensorMeta::new(shape, dtype))
}

fn tensor_ref() -> impl Strategy<Value = TensorRef> {
    (any::<u32>(), any::<u32>()).prop_map(|(n, o)| TensorRef::new(NodeId(n), o))
}

fn payload_tensor() -> impl Strategy<Value = PayloadTensor> {
    (
        ".{0,12}",
        proptest::option::of(tensor_ref()),
        meta(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(name, tensor, meta, offset, len)| PayloadTensor {
            name,
            tensor,
            meta,
            offset,
            len,
        })
}

/// Finite floats: JSON has no NaN or infinity.
fn micros() -> impl Strategy<Value = f64> {
    -1e15f64..1e15
}

fn stats() -> impl Strategy<Value = RunStats> {
    (
        proptest::collection::vec(
            (any::<u32>(), micros(), micros()).prop_map(|(node, start_us, dur_us)| ComputeRecord {
                node,
                start_us,
                dur_us,
            }),
            0..4,
        ),
        proptest::collection::vec((any::<u32>(), micros()), 0..4),
        any::<[u64; 4]>(),
    )
        .prop_map(|(compute, posted, n)| RunStats {
            compute,
            arrived: posted.iter().map(|&(i, t)| (i, t * 0.5)).collect(),
            posted,
            recomputes: n[0],
            cache_hits: n[1],
            nodes: n[2],
            peak_store_bytes: n[3],
        })
}

/// Every message kind (of those that have no transport descriptor), with arbitrary fields.
fn message() -> impl Strategy<Value = Msg> {
    prop_oneof![
        Just(Msg::HelloDriver),
        ".{0,16}".prop_map(|name| Msg::HelloPeer { name }),
        prop_oneof![
            any::<u64>().prop_map(WeightSpec::Seeded),
            ".{0,24}".prop_map(WeightSpec::Checkpoint),
        ]
        .prop_map(|weights| Msg::Setup { weights }),
        Just(Msg::SetupDone),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..4),
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(payload_tensor(), 0..3),
            proptest::collection::vec(tensor_ref(), 0..3),
            proptest::collection::vec(
                (any::<u32>(), any::<u32>(), meta()).prop_map(|(node, output, meta)| Reshape {
                    node,
                    output,
                    meta
                }),
                0..3
            ),
        )
            .prop_map(|(run, forget, define, seq, inputs, wanted, reshape)| {
                let graph = if define {
                    let graph = tiny_graph();
                    GraphRef::Define {
                        id: run ^ 1,
                        placement: Placement::single(&graph),
                        graph,
                    }
                } else {
                    GraphRef::Cached { id: run, reshape }
                };
                let free = forget.iter().map(|f| f ^ seq).collect();
                Msg::Run {
                    run,
                    forget,
                    graph,
                    seqs: vec![seq, seq ^ 1],
                    inputs,
                    wanted,
                    spans: run % 2 == 0,
                    free,
                    feed: (run % 3 == 0).then(|| Feed {
                        run: run ^ seq,
                        rows: vec![(seq as u32, run as u32)],
                    }),
                    acks_later: run % 5 == 0,
                }
            }),
        (
            any::<u64>(),
            proptest::collection::vec(payload_tensor(), 0..3),
            stats()
        )
            .prop_map(|(run, outputs, stats)| Msg::Done {
                run,
                outputs,
                stats
            }),
        (any::<u64>(), ".{0,40}", proptest::option::of(".{0,8}")).prop_map(
            |(run, error, culprit)| Msg::Failed {
                run,
                error,
                culprit
            }
        ),
        any::<u64>().prop_map(|seq| Msg::FreeSequence { seq }),
        Just(Msg::Shutdown),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn runtime_messages_from_arbitrary_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        proto::fuzz_decode(&data);
    }

    #[test]
    fn runtime_messages_with_json_shaped_headers_never_panic(
        header in r#"[\[\]{}",:0-9a-zA-Z_\- .]{0,300}"#,
        payload in proptest::collection::vec(any::<u8>(), 0..32),
        claimed in proptest::option::of(any::<u32>()),
    ) {
        let mut bytes = frame(header.as_bytes(), &payload);
        if let Some(len) = claimed {
            bytes[..4].copy_from_slice(&len.to_le_bytes());
        }
        proto::fuzz_decode(&bytes);
    }

    #[test]
    fn runtime_messages_round_trip(
        msg in message(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let bytes = proto::encode(&msg, &payload).unwrap();
        let (back, back_payload) = proto::decode(&bytes, "peer").unwrap();
        prop_assert_eq!(&back_payload, &payload);
        prop_assert_eq!(proto::encode(&back, &back_payload).unwrap(), bytes.clone());
        proto::fuzz_decode(&bytes);
    }

    #[test]
    fn runtime_messages_with_bytes_changed_never_panic(
        msg in message(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = proto::encode(&msg, b"payload").unwrap();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        proto::fuzz_decode(&bytes);
    }
}

#[test]
fn runtime_message_lengths_are_checked_before_anything_is_allocated() {
    // A header length far beyond what arrived is refused at once, whatever it claims.
    for claimed in [5u32, 1 << 20, u32::MAX] {
        let mut bytes = frame(b"\"Shutdown\"", b"");
        bytes[..4].copy_from_slice(&claimed.to_le_bytes());
        assert!(proto::decode(&bytes, "peer").is_err());
    }
    assert!(proto::decode(&[], "peer").is_err());
    // Deep nesting stops at serde_json's recursion limit instead of overflowing the stack.
    let deep = "[".repeat(100_000);
    assert!(proto::decode(&frame(deep.as_bytes(), b""), "peer").is_err());
    let deep = format!("{{\"HelloPeer\":{{\"name\":{}", "[".repeat(100_000));
    assert!(proto::decode(&frame(deep.as_bytes(), b""), "peer").is_err());
}
