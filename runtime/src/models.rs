//! Inputs for the scheduler's model builders, and a GPT-2 generation loop (prefill, then decode
//! steps against KV caches pinned on a worker) over a [`Driver`].

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
