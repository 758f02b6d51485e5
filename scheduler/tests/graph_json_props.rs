//! `Graph::from_json` on hostile input: arbitrary bytes, valid graphs with bytes or numbers
//! changed, and round trips of valid graphs. Every input goes through the fuzzing hook
//! (`genie_scheduler::fuzzing::graph_json`), which also schedules what validates, so these cases
//! are what `fuzz/fuzz_targets/graph_json.rs` runs, in CI on the stable toolchain.

use genie_scheduler::builders::{bert, gpt2_decode, gpt2_prefill, resnet};
use genie_scheduler::builders::{BertConfig, Gpt2Config, ResNetConfig};
use genie_scheduler::fuzzing::graph_json;
use genie_scheduler::synthetic::{layered_dag, SyntheticConfig};
use genie_scheduler::Graph;
use proptest::prelude::*;
use std::sync::OnceLock;

/// Small graphs of every builder, as JSON: the bases that mutations start from.
fn bases() -> &'static [String] {
    static BASES: OnceLock<Vec<String>> = OnceLock::new();
    BASES.get_or_init(|| {
        let gpt2 = Gpt2Config {
            layers: 1,
            hidden: 8,
            heads: 2,
            vocab: 16,
            context: 8,
            batch: 1,
            ..Gpt2Config::default()
        };
        let bert_config = BertConfig {
            layers: 1,
            hidden: 8,
            heads: 2,
            intermediate: 16,
            vocab: 16,
            max_positions: 8,
            batch: 1,
            seq_len: 4,
            ..BertConfig::default()
        };
        let resnet_config = ResNetConfig {
            blocks: [1, 1, 0, 0],
            width: 2,
            classes: 3,
            batch: 1,
            image: 32,
            ..ResNetConfig::default()
        };
        let graphs = [
            gpt2_prefill(&gpt2, 3).unwrap(),
            gpt2_decode(&gpt2, 4).unwrap(),
            bert(&bert_config).unwrap(),
            resnet(&resnet_config).unwrap(),
        ];
        // Compact JSON: mutations then land on content rather than indentation.
        graphs
            .iter()
            .map(|g| serde_json::to_string(g).unwrap())
            .collect()
    })
}

/// Byte ranges of the unsigned integers in `json` (shapes, ids, attributes).
fn numbers(json: &str) -> Vec<(usize, usize)> {
    let b = json.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let s = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

/// Values that break size arithmetic.
fn hostile_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_owned()),
        Just("1".to_owned()),
        Just(u32::MAX.to_string()),
        Just((1u64 << 32).to_string()),
        Just((1u64 << 62).to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("-1".to_owned()),
        Just("1e999".to_owned()),
        any::<u64>().prop_map(|v| v.to_string()),
        (0u64..70).prop_map(|v| v.to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        graph_json(&data);
    }

    #[test]
    fn json_shaped_garbage_never_panics(
        text in r#"[\[\]{}",:0-9a-z_\- .e]{0,400}"#
    ) {
        graph_json(text.as_bytes());
    }

    #[test]
    fn valid_graphs_with_bytes_changed_never_panic(
        base in 0usize..4,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = bases()[base].clone().into_bytes();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len().max(1));
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i.min(bytes.len()), byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        graph_json(&bytes);
    }

    #[test]
    fn valid_graphs_with_numbers_changed_never_panic(
        base in 0usize..4,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), hostile_number()), 1..4),
    ) {
        let mut json = bases()[base].clone();
        for (at, value) in edits {
            let spans = numbers(&json);
            let (s, e) = spans[at.index(spans.len())];
            json.replace_range(s..e, &value);
        }
        graph_json(json.as_bytes());
    }

    #[test]
    fn valid_graphs_round_trip(
        nodes in 2usize..60,
        width in 1usize..6,
        fan_in in 1usize..4,
        seed in any::<u64>(),
    ) {
        let g = layered_dag(&SyntheticConfig {
            nodes,
            width,
            max_fan_in: fan_in,
            colocation_groups: 2,
            seed,
            ..SyntheticConfig::default()
        }).unwrap();
        let back = Graph::from_json(&g.to_json().unwrap()).unwrap();
        prop_assert_eq!(&back, &g);
        prop_assert_eq!(back.structural_hash(), g.structural_hash());
        graph_json(g.to_json().unwrap().as_bytes());
    }
}

#[test]
fn every_base_graph_round_trips_and_schedules() {
    for json in bases() {
        let g = Graph::from_json(json).unwrap();
        assert_eq!(serde_json::to_string(&g).unwrap(), *json);
        graph_json(json.as_bytes());
    }
}

#[test]
fn float_attributes_out_of_f32_range_are_refused() {
    // 1e39 parses as an f64 and becomes an f32 infinity, which JSON cannot write back.
    let mut seen = 0;
    for base in bases() {
        for key in ["\"eps\":", "\"scale\":"] {
            let Some(i) = base.find(key) else { continue };
            let start = i + key.len();
            let end = start + base[start..].find([',', '}']).unwrap();
            for value in ["1e39", "-1e39", "3.5e38"] {
                let mut json = base.clone();
                json.replace_range(start..end, value);
                assert!(Graph::from_json(&json).is_err(), "{key}{value} accepted");
                graph_json(json.as_bytes());
                seen += 1;
            }
        }
    }
    assert!(seen >= 6);
}
