//! A batched decode step (one forward pass over several sequences, each against its own KV
//! length) gives every sequence bitwise the logits of its step alone, for GPT-2 and a
//! Llama-style model (grouped-query attention, rotary positions per row), with sequences
//! joining and leaving between steps; and a run naming a cache slot it has no sequence for, or
//! whose attention reads anything but its own layer's caches, is refused with an error naming
//! it. A batched prefill (several prompts in one forward pass) gives every prompt bitwise the
//! logits and cache of its prefill alone.

mod common;
use common::bits;
use genie_runtime::driver::Sending;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{
    argmax_last, prefill_last, prompt, run_decode_batch, run_decode_step, run_prefill,
    run_prefill_batch, Family, Model,
};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::builders::{kv_move, Gpt2Config, LlamaConfig};
use genie_scheduler::graph::OpKind;
use std::sync::Arc;

/// The GPT-2 of these tests.
fn gpt2() -> Model {
    Model::Gpt2(Gpt2Config {
        layers: 2,
        hidden: 64,
        heads: 4,
        vocab: 300,
        context: 64,
        ..Gpt2Config::default()
    })
}

/// The Llama-style model of these tests (grouped-query attention, an untied head).
fn llama() -> Model {
    Model::Llama(LlamaConfig {
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: Some(2),
        intermediate: 96,
        vocab: 300,
        context: 64,
        tied_embeddings: false,
        ..LlamaConfig::default()
    })
}

/// Prefill on w0 with the caches built on w1; every decode step whole on w1.
fn prefill_place(g: &genie_scheduler::graph::Graph) -> Placement {
    Placement::by_rule(g, |n| usize::from(matches!(n.op, OpKind::KvCacheAppend)))
}

fn prefill(driver: &mut Driver, model: &Model, p: &[i64], seq: u64) -> i64 {
    let (g, last) = prefill_last(model, p.len()).unwrap();
    let out = run_prefill(driver, &g, &prefill_place(&g), p, last, seq).unwrap();
    argmax_last(&out.outputs[0]).unwrap()
}

/// Prompts of lengths `lens` for `model`, prompt `i` shifted by `shift · i` (distinct contents).
fn prompts_of(model: &Model, lens: &[usize], shift: i64) -> Vec<Vec<i64>> {
    let v = model.vocab() as i64;
    lens.iter()
        .enumerate()
        .map(|(i, &l)| {
            prompt(l, model.vocab())
                .iter()
                .map(|t| (t + shift * i as i64) % v)
                .collect()
        })
        .collect()
}

/// The token ids (`[N, 1]` I64) a greedy step returned, by row.
fn ids(out: &genie_runtime::driver::RunOutput) -> Vec<i64> {
    out.outputs[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

/// Sequences `0..n` decoded in batches (with two copies of each prefilled: one for the batch,
/// one stepped alone), every row compared bitwise with its step alone.
fn batched_equals_alone(model: &Model) {
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(5)).unwrap();
    let prompts = prompts_of(model, &[3, 11, 6, 17, 1], 7);
    // (batch sequence, alone sequence, next token, KV length)
    let mut seqs: Vec<(u64, u64, i64, usize)> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (b, a) = (i as u64, 100 + i as u64);
        let t = prefill(&mut driver, model, p, b);
        assert_eq!(prefill(&mut driver, model, p, a), t);
        seqs.push((b, a, t, p.len()));
    }
    // Which sequences take part in each step: all, one leaves, it joins again at another
    // place, a single one, all.
    let steps: [&[usize]; 5] = [
        &[0, 1, 2, 3, 4],
        &[0, 2, 3, 4],
        &[4, 0, 2, 3],
        &[1],
        &[3, 1, 0, 2, 4],
    ];
    let mut rows_checked = 0;
    for members in steps {
        let lens: Vec<usize> = members.iter().map(|&i| seqs[i].3).collect();
        let toks: Vec<i64> = members.iter().map(|&i| seqs[i].2).collect();
        let ids: Vec<u64> = members.iter().map(|&i| seqs[i].0).collect();
        let g = model.decode_batch(&lens).unwrap();
        let place = Placement::by_rule(&g, |_| 1);
        let out = run_decode_batch(&driver, &g, &place, &toks, &lens, &ids).unwrap();
        let logits = &out.outputs[0];
        assert_eq!(logits.dims(), &[members.len(), 1, model.vocab()]);
        for (row, &i) in members.iter().enumerate() {
            let (_, alone, tok, len) = seqs[i];
            let g1 = model.decode(len).unwrap();
            let p1 = Placement::by_rule(&g1, |_| 1);
            let one = run_decode_step(&driver, &g1, &p1, tok, len, alone).unwrap();
            let batched = logits.narrow(0, row, 1).unwrap();
            assert_eq!(
                bits(&batched),
                bits(&one.outputs[0]),
                "{}: sequence {i} (row {row} of {}) differs from its step alone",
                model.model_type(),
                members.len()
            );
            rows_checked += 1;
            seqs[i].2 = argmax_last(&batched).unwrap();
            seqs[i].3 += 1;
        }
    }
    assert_eq!(rows_checked, 19);
    cluster.stop(driver).unwrap();
}

#[test]
fn gpt2_batched_decode_is_bitwise_each_sequence_alone() {
    batched_equals_alone(&gpt2());
}

#[test]
fn llama_batched_decode_is_bitwise_each_sequence_alone() {
    batched_equals_alone(&llama());
}

/// Prompts of 3, 11, 6, 17 and 1 tokens prefilled in one batched pass on w0 and each alone:
/// every row of the batch's logits is bitwise the prompt's alone, and so is its cache (a decode
/// step of the same token against each gives the same logits bits).
fn batched_prefill_equals_alone(model: &Model) {
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(5)).unwrap();
    let prompts: Vec<Vec<i64>> = [3usize, 11, 6, 17, 1]
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            prompt(l, model.vocab())
                .iter()
                .map(|t| (t + 5 * i as i64) % model.vocab() as i64)
                .collect()
        })
        .collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let on_w0 = |g: &genie_scheduler::graph::Graph| Placement::by_rule(g, |_| 0);
    let g = model.prefill_batch(&lens).unwrap();
    let batch: Vec<u64> = (200..205).collect();
    let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let out = run_prefill_batch(&driver, &g, &on_w0(&g), &refs, g.outputs[0], &batch).unwrap();
    let logits = &out.outputs[0];
    assert_eq!(logits.dims(), &[prompts.len(), 1, model.vocab()]);
    for (i, p) in prompts.iter().enumerate() {
        let alone = 300 + i as u64;
        let (g1, last) = prefill_last(model, p.len()).unwrap();
        let one = run_prefill(&driver, &g1, &on_w0(&g1), p, last, alone).unwrap();
        let row = logits.narrow(0, i, 1).unwrap();
        assert_eq!(
            bits(&row),
            bits(&one.outputs[0]),
            "{}: prompt {i} of the batch differs from its prefill alone",
            model.model_type()
        );
        // The caches: one decode step of the same token against each.
        let tok = argmax_last(&row).unwrap();
        let gd = model.decode(p.len()).unwrap();
        let step = |seq| {
            run_decode_step(&driver, &gd, &on_w0(&gd), tok, p.len(), seq)
                .unwrap()
                .outputs
                .remove(0)
        };
        assert_eq!(
            bits(&step(batch[i])),
            bits(&step(alone)),
            "{}: prompt {i}'s cache from the batch differs from its own",
            model.model_type()
        );
    }
    cluster.stop(driver).unwrap();
}

#[test]
fn gpt2_batched_prefill_is_bitwise_each_prompt_alone() {
    batched_prefill_equals_alone(&gpt2());
}

#[test]
fn llama_batched_prefill_is_bitwise_each_prompt_alone() {
    batched_prefill_equals_alone(&llama());
}

/// A graph whose cache slot has no sequence in the run is refused (typed, nothing changed).
#[test]
fn a_cache_slot_without_a_sequence_is_refused() {
    let model = Model::Gpt2(Gpt2Config {
        layers: 1,
        hidden: 32,
        heads: 2,
        vocab: 50,
        context: 32,
        ..Gpt2Config::default()
    });
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(5)).unwrap();
    let t0 = prefill(&mut driver, &model, &[1, 2, 3], 0);
    let t1 = prefill(&mut driver, &model, &[4, 5], 1);
    let g = model.decode_batch(&[3, 2]).unwrap();
    let place = Placement::by_rule(&g, |_| 1);
    // Two slots, one sequence named: refused by the decode worker, naming the slot.
    let col = |v: Vec<i64>| candle_core::Tensor::from_vec(v, (2, 1), &candle_core::Device::Cpu);
    let inputs = [
        ("input_ids", col(vec![t0, t1]).unwrap()),
        ("position_ids", col(vec![3, 2]).unwrap()),
    ];
    let err = driver
        .run_batch(&g, &place, &inputs, &g.outputs[..1], &[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("slot 1"), "{err}");
    // A run naming a sequence twice is refused too.
    let err = run_decode_batch(&driver, &g, &place, &[t0, t1], &[3, 2], &[0, 0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("twice") || err.contains("reconnect"), "{err}");
    cluster.stop(driver).unwrap();
}

/// A batched step's attention fed something other than a cache of its own layer (another
/// layer's cache, a plain input of a cache's shape) is refused with an error naming it.
#[test]
fn a_cached_attention_over_a_foreign_tensor_is_refused() {
    let model = Model::Gpt2(Gpt2Config {
        layers: 2,
        hidden: 32,
        heads: 2,
        vocab: 50,
        context: 32,
        ..Gpt2Config::default()
    });
    let g = model.decode_batch(&[3]).unwrap();
    let attention = |layer| {
        g.nodes()
            .iter()
            .find(|n| matches!(n.op, OpKind::CachedAttention { .. }) && n.layer() == Some(layer))
            .unwrap()
            .id
    };
    let (a0, a1) = (attention(0), attention(1));
    // Layer 0's attention reading layer 1's cache.
    let mut crossed = g.clone();
    crossed.node_mut(a0).unwrap().inputs[3] = g.node(a1).unwrap().inputs[3];
    // Layer 0's attention reading a driver input shaped as its cache.
    let mut forged = g.clone();
    let meta = g.tensor(g.node(a0).unwrap().inputs[3]).unwrap().clone();
    let fake = forged
        .add_with_outputs(
            "fake_cache",
            OpKind::Input,
            vec![],
            vec![meta.clone()],
            Default::default(),
        )
        .unwrap();
    forged.node_mut(a0).unwrap().inputs[3] = fake.into();
    let cpu = candle_core::Device::Cpu;
    let zeros =
        candle_core::Tensor::zeros(meta.shape.as_slice(), candle_core::DType::F32, &cpu).unwrap();
    for (what, bad) in [("crossed", &crossed), ("forged", &forged)] {
        // A fresh session each time: a refused run leaves the driver to reconnect.
        let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
        let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(5)).unwrap();
        let t0 = prefill(&mut driver, &model, &[1, 2, 3], 0);
        let one = |v: i64| candle_core::Tensor::from_vec(vec![v], (1, 1), &cpu).unwrap();
        let mut inputs = vec![("input_ids", one(t0)), ("position_ids", one(3))];
        if what == "forged" {
            inputs.push(("fake_cache", zeros.clone()));
        }
        let err = driver
            .run_batch(
                bad,
                &Placement::by_rule(bad, |_| 1),
                &inputs,
                &bad.outputs[..1],
                &[0],
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a KV cache of its layer"), "{what}: {err}");
        cluster.stop(driver).unwrap();
    }
}

/// Greedy decode steps sent ahead on a [`StepStream`](genie_runtime::driver::StepStream), each
/// step's tokens fed to the next on the worker, give every sequence the tokens of steps run one
/// at a time (sequences joining and leaving between steps), for GPT-2 and a Llama-style model.
/// A feed naming a run that is not the worker's last, or a row out of range, fails the step with
/// an error that says so.
fn steps_sent_ahead_equal_steps_one_at_a_time(model: &Model) {
    use genie_runtime::models::with_next_tokens;
    use genie_runtime::proto::Feed;
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(9)).unwrap();
    let prompts = prompts_of(model, &[4, 9, 2, 13], 5);
    // Each prompt prefilled twice: sequence i for the stream, 100 + i stepped one at a time.
    let mut first = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let t = prefill(&mut driver, model, p, i as u64);
        assert_eq!(prefill(&mut driver, model, p, 100 + i as u64), t);
        first.push(t);
    }
    // The members of each step, in row order: all, one leaves, one joins back elsewhere.
    let steps: [&[usize]; 6] = [
        &[0, 1, 2, 3],
        &[0, 1, 2, 3],
        &[0, 2, 3],
        &[3, 0, 1, 2],
        &[1, 3],
        &[2, 1, 3, 0],
    ];
    // One at a time: each step's tokens read back before the next is sent.
    let mut want: Vec<Vec<i64>> = first.iter().map(|&t| vec![t]).collect();
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for members in steps {
        let l: Vec<usize> = members.iter().map(|&i| lens[i]).collect();
        let toks: Vec<i64> = members.iter().map(|&i| *want[i].last().unwrap()).collect();
        let seqs: Vec<u64> = members.iter().map(|&i| 100 + i as u64).collect();
        let g = with_next_tokens(model.decode_batch(&l).unwrap()).unwrap();
        let place = Placement::by_rule(&g, |_| 1);
        let out = run_decode_batch(&driver, &g, &place, &toks, &l, &seqs).unwrap();
        for (&i, t) in members.iter().zip(ids(&out)) {
            want[i].push(t);
            lens[i] += 1;
        }
    }
    // Two caches built on w0 to move to w1: 51 first (so that w1's landing region for w0 is
    // known), 50 in two rounds later, its take-in on the stream between two steps.
    let moved = &prompts[1];
    for seq in [50, 51] {
        let (g, last) = prefill_last(model, moved.len()).unwrap();
        run_prefill(&driver, &g, &Placement::single(&g), moved, last, seq).unwrap();
    }
    let mv = kv_move(model.layers(), model.kv_width(), moved.len()).unwrap();
    let mv_place = prefill_place(&mv);
    // Sent ahead: each step goes before the one ahead of it has answered; a sequence in the
    // step just sent takes its token from that step's reply, on the worker.
    let driver = Arc::new(driver);
    match driver.send_senders(&mv, &mv_place, &[51]).unwrap() {
        Sending::Done(_) => {}
        Sending::Senders(s) => drop(driver.take_in(s, &mv).unwrap()),
    }
    let mut stream = driver.stream(1).unwrap();
    let mut got: Vec<Vec<i64>> = first.iter().map(|&t| vec![t]).collect();
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut flying: std::collections::VecDeque<(genie_scheduler::graph::Graph, Vec<usize>)> =
        Default::default();
    let mut last_run = None;
    for (k, &members) in steps.iter().enumerate() {
        let prev: Vec<usize> = flying.back().map(|f| f.1.clone()).unwrap_or_default();
        let mut toks = Vec::new();
        let mut rows = Vec::new();
        let mut l = Vec::new();
        for (row, &i) in members.iter().enumerate() {
            match prev.iter().position(|&p| p == i) {
                Some(src) => {
                    rows.push((row as u32, src as u32));
                    toks.push(-1);
                    l.push(lens[i] + 1);
                }
                None => {
                    toks.push(*got[i].last().unwrap());
                    l.push(lens[i]);
                }
            }
        }
        let seqs: Vec<u64> = members.iter().map(|&i| i as u64).collect();
        let g = with_next_tokens(model.decode_batch(&l).unwrap()).unwrap();
        let place = Placement::by_rule(&g, |_| 1);
        let inputs = genie_runtime::models::decode_inputs(&toks, &l).unwrap();
        let feed = last_run
            .filter(|_| !rows.is_empty())
            .map(|run| Feed { run, rows });
        last_run = Some(
            stream
                .send(&g, &place, (&inputs, &g.outputs[..1]), &seqs, feed)
                .unwrap(),
        );
        flying.push_back((g, members.to_vec()));
        if k == 2 {
            // The take-in goes between this step and the next, which its token ids feed.
            let Sending::Senders(s) = driver.send_senders(&mv, &mv_place, &[50]).unwrap() else {
                panic!("the move went in one round");
            };
            stream.take_in(s).unwrap();
            flying.push_back((mv.clone(), Vec::new()));
        }
        // Each reply is read once the step after it has gone (the last one at the end).
        let end = k + 1 == steps.len();
        while flying.len() > 1 || (end && !flying.is_empty()) {
            let (g, m) = flying.pop_front().unwrap();
            let out = stream.wait(&g).unwrap();
            if m.is_empty() {
                // The take-in: its whole run, both rounds.
                assert!(out.counters.bytes_moved > 0);
                continue;
            }
            for (&i, t) in m.iter().zip(ids(&out)) {
                got[i].push(t);
                lens[i] += 1;
            }
        }
    }
    assert_eq!(got, want, "{}", model.model_type());
    assert_eq!(stream.in_flight(), 0);
    drop(stream);
    // The cache taken in on the stream is w0's bit for bit: a decode step over either gives
    // the same logits.
    let on = |w: usize| {
        let g = model.decode_batch(&[moved.len()]).unwrap();
        let place = Placement::by_rule(&g, |_| w);
        let out = run_decode_batch(&driver, &g, &place, &[3], &[moved.len()], &[50]).unwrap();
        bits(&out.outputs[0])
    };
    assert_eq!(on(0), on(1), "{}", model.model_type());
    // A feed from a run that was not the worker's last fails the step, saying so (and, as
    // any failed run, leaves the driver to reconnect).
    let step = |driver: &Arc<Driver>, seq: u64, tok: i64, len: usize, feed: Option<Feed>| {
        let g = with_next_tokens(model.decode_batch(&[len]).unwrap()).unwrap();
        let place = Placement::by_rule(&g, |_| 1);
        let inputs = genie_runtime::models::decode_inputs(&[tok], &[len]).unwrap();
        let mut stream = driver.stream(1).unwrap();
        let run = stream
            .send(&g, &place, (&inputs, &g.outputs[..1]), &[seq], feed)
            .unwrap();
        stream.wait(&g).map(|_| run).map_err(|e| e.to_string())
    };
    let tok = *got[0].last().unwrap();
    let feed = Feed {
        run: last_run.unwrap() ^ 7,
        rows: vec![(0, 0)],
    };
    let e = step(&driver, 0, tok, lens[0], Some(feed)).unwrap_err();
    assert!(e.contains("feed") && e.contains("last run"), "{e}");
    cluster.stop(Arc::try_unwrap(driver).unwrap()).unwrap();
    // A row out of range: refused the same way.
    let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(9)).unwrap();
    let t = prefill(&mut driver, model, &prompts[0], 0);
    let driver = Arc::new(driver);
    let run = step(&driver, 0, t, prompts[0].len(), None).unwrap();
    let feed = Feed {
        run,
        rows: vec![(0, 3)],
    };
    let e = step(&driver, 0, t, prompts[0].len() + 1, Some(feed)).unwrap_err();
    assert!(e.contains("feed") && e.contains("row 0 from row 3"), "{e}");
    cluster.stop(Arc::try_unwrap(driver).unwrap()).unwrap();
}

#[test]
fn gpt2_steps_sent_ahead_equal_steps_one_at_a_time() {
    steps_sent_ahead_equal_steps_one_at_a_time(&gpt2());
}

#[test]
fn llama_steps_sent_ahead_equal_steps_one_at_a_time() {
    steps_sent_ahead_equal_steps_one_at_a_time(&llama());
}
