//! Inputs for the scheduler's model builders, and a GPT-2 generation loop (prefill, then decode
//! steps against KV caches pinned on a worker) over a [`Driver`].
//!
//! # Adding a model family today
//!
//! A family is not yet one module: GPT-2 is the only decoder, and its config type and builders
//! are named directly by the generation loop, the demo and the CLI. What is already
//! family-neutral: placement and the KV-cache manager take a node's layer from
//! [`Semantics::layer`] (never from its name, so `model.layers.{i}` works as `h.{i}` does);
//! execution plans, transfers, the graph cache and the wire protocol know only ops and shapes;
//! a KV cache is sized by its tensor's shape `[2, B, L, E]`, whatever `E` is made of.
//!
//! Adding a family (Llama-style, say) takes, in order:
//!
//! 1. `scheduler/src/graph.rs`, only for ops the graph lacks (Llama: RMSNorm, rotary
//!    embeddings, SiLU; `Attention` has one head count, so grouped-query attention needs a KV-head
//!    count): the [`OpKind`] variant and its documented input order, its name, arity and shape
//!    rule (`OpKind::name`, `infer_outputs`), and `is_elementwise` where it applies.
//! 2. `scheduler/src/cost.rs`: the new ops' FLOPs and bytes in `RooflineCostModel::work`;
//!    `scheduler/src/analysis.rs` if a new op changes a pattern it detects (attention over a KV
//!    cache, fusable elementwise chains).
//! 3. `scheduler/src/builders.rs`: the config type (there is no `config.json` parsing yet: the
//!    config is a Rust struct), prefill and decode-step builders that name each weight by its
//!    checkpoint key, call `Builder::in_layer` around each block so every node in it carries its
//!    layer, and keep each layer's cache as `KvCache { layer }` → `KvCacheAppend`; then the
//!    family's names in `by_name` and `MODEL_NAMES` (used by `genie schedule` and the benches),
//!    and parameter-count tests against the reference implementation.
//! 4. `runtime/src/kernels/cpu.rs`: a kernel per new op in the op match and its entry in
//!    `min_inputs`; `runtime/src/kernels/decode.rs` for one-row fast paths a decode step needs.
//! 5. `runtime/src/weights.rs`: the checkpoint key mapping (today only GPT-2's optional
//!    `transformer.` prefix) and, for seeded weights, whether the magnitude rules keyed on name
//!    suffixes (`weight`, `running_var`, ...) suit the family's parameters.
//! 6. This module: [`generate`] takes a [`Gpt2Config`] and calls `gpt2_prefill` /
//!    `gpt2_decode`; a second family needs its own loop or a family-neutral one.
//! 7. `runtime/src/demo.rs` (`model_config` and the prefill/decode phases take a
//!    [`Gpt2Config`]) and `runtime/src/main.rs` (the model names the CLI accepts).
//! 8. Tests: the runtime's correctness tests (`runtime/tests/correctness.rs`,
//!    `processes.rs`) are written against [`Gpt2Config`]; a family needs its own bitwise
//!    1/2/3-worker and process runs, and numerics against reference logits.
//!
//! [`Semantics::layer`]: genie_scheduler::graph::Semantics::layer
//! [`OpKind`]: genie_scheduler::graph::OpKind

use crate::driver::{Driver, RunOutput};
use crate::error::{Result, RuntimeError};
use crate::plan::Placement;
use candle_core::{Device, Tensor};
use genie_scheduler::builders::{gpt2_decode, gpt2_prefill, Gpt2Config};
use genie_scheduler::graph::{Graph, TensorRef};

fn kerr(source: candle_core::Error) -> RuntimeError {
    RuntimeError::Kernel {
        node: "<inputs>".into(),
        source,
    }
}

/// `[1, n]` I64 tensor.
pub fn row_i64(v: Vec<i64>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, (1, n), &Device::Cpu).map_err(kerr)
}

/// A deterministic prompt of `len` token ids below `vocab`.
pub fn prompt(len: usize, vocab: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * 7919 + 13) % vocab.max(1)) as i64)
        .collect()
}

/// Index of the largest value of the last row of `[.., V]` logits.
pub fn argmax_last(logits: &Tensor) -> Result<i64> {
    let v = logits.dim(candle_core::D::Minus1).map_err(kerr)?;
    let flat: Vec<f32> = logits
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(kerr)?;
    let last = flat.get(flat.len().saturating_sub(v)..).unwrap_or(&[]);
    let mut best = 0usize;
    for (i, x) in last.iter().enumerate() {
        if *x > last[best] {
            best = i;
        }
    }
    Ok(best as i64)
}

/// One GPT-2 generation: what each run returned.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prefill run (its outputs: the last position's logits are not returned; see `tokens`).
    pub prefill: RunOutput,
    /// Decode runs, one per step (outputs: `[logits]`).
    pub steps: Vec<RunOutput>,
    /// Greedy tokens: the first from prefill, then one per step.
    pub tokens: Vec<i64>,
}

/// Runs a prefill of `prompt` then `steps` greedy decode steps for sequence `seq`.
/// `prefill_place` / `decode_place` choose each graph's placement.
pub fn generate(
    driver: &mut Driver,
    cfg: &Gpt2Config,
    prompt: &[i64],
    steps: usize,
    seq: u64,
    mut prefill_place: impl FnMut(&Graph) -> Result<Placement>,
    mut decode_place: impl FnMut(&Graph) -> Result<Placement>,
) -> Result<Generation> {
    let sched = |e: genie_scheduler::Error| RuntimeError::Scheduler(e.to_string());
    let s = prompt.len();
    let g = gpt2_prefill(cfg, s).map_err(sched)?;
    let p = prefill_place(&g)?;
    let ids = row_i64(prompt.to_vec())?;
    let pos = row_i64((0..s as i64).collect())?;
    let logits_ref: TensorRef = *g
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("prefill graph has no outputs".into()))?;
    let prefill = driver.run(
        &g,
        &p,
        &[("input_ids", ids), ("position_ids", pos)],
        &[logits_ref],
        seq,
    )?;
    let first = prefill
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("prefill returned nothing".into()))?;
    let mut tokens = vec![argmax_last(first)?];
    let mut runs = Vec::with_capacity(steps);
    for step in 0..steps {
        let l = s + step;
        let g = gpt2_decode(cfg, l).map_err(sched)?;
        let p = decode_place(&g)?;
        let tok = *tokens.last().unwrap_or(&0);
        let out = driver.run(
            &g,
            &p,
            &[
                ("input_ids", row_i64(vec![tok])?),
                ("position_ids", row_i64(vec![l as i64])?),
            ],
            &[*g.outputs
                .first()
                .ok_or_else(|| RuntimeError::Plan("decode graph has no outputs".into()))?],
            seq,
        )?;
        let logits = out
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("decode returned nothing".into()))?;
        tokens.push(argmax_last(logits)?);
        runs.push(out);
    }
    Ok(Generation {
        prefill,
        steps: runs,
        tokens,
    })
}
