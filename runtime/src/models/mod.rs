//! Model families, and a family-neutral generation loop (prefill, then decode steps against KV
//! caches pinned on a worker) over a [`Driver`].
//!
//! # Families
//!
//! A family is one module of this directory saying three things: its config, parsed from a
//! Hugging Face `config.json` (serde); its prefill and decode-step graph builders; and its
//! checkpoint key mapping. [`Family`] is that contract; [`Model`] is the enum over the families
//! (picked by `model_type`), and is what [`generate`], the demo and `genie generate` take.
//!
//! | `model_type`               | module    | graph builders                               |
//! |----------------------------|-----------|----------------------------------------------|
//! | `gpt2`                     | [`gpt2`]  | `gpt2_prefill` / `gpt2_decode(_batch)`       |
//! | `llama`, `qwen2`, `mistral`| [`llama`] | `llama_prefill` / `llama_decode(_batch)`     |
//!
//! What is family-neutral already: placement and the KV-cache manager take a node's layer from
//! [`Semantics::layer`] (never from its name); execution plans, transfers, the graph cache and
//! the wire protocol know only ops and shapes; a KV cache is sized by its tensor's shape
//! `[2, B, L, E]` (for Llama `E` is KV heads × head size); weights are read by node name from
//! mapped safetensors ([`crate::weights`]); generation feeds `input_ids` and `position_ids`.
//!
//! # Adding a family (Llama-style, as the worked example)
//!
//! 1. Ops the graph lacks, in `scheduler/src/graph.rs`: the [`OpKind`] variant with its
//!    documented input order, its name, its shape rule (`infer_outputs`) and `is_elementwise`
//!    where it applies. Llama added `RmsNorm`, `Rotary` (θ, linear / Llama-3 scaling), `Silu`,
//!    and a `kv_heads` count on `Attention` (grouped-query attention).
//! 2. Their FLOPs and bytes in `scheduler/src/cost.rs` (`RooflineCostModel::work`).
//! 3. The builders, in `scheduler/src/builders/<family>.rs` (Llama:
//!    `scheduler/src/builders/llama.rs`): the config type, deserializable from `config.json`,
//!    prefill, decode-step and batched decode-step builders naming each weight by its checkpoint
//!    key, with `Builder::in_layer` around each block and each layer's attention through
//!    `Builder::cached_attention` (the cache as `KvCache { layer, slot }` → `KvCacheAppend` for
//!    prefill and one-sequence steps; a batched step's caches, one per sequence, all read and
//!    extended by one `CachedAttention` per layer); the names in `by_name`/`MODEL_NAMES`;
//!    parameter-count tests against `transformers`' formula.
//! 4. CPU kernels for new ops in `runtime/src/kernels/cpu.rs` (and one-row fast paths in
//!    `decode.rs` where a decode step spends its time; Llama: grouped-query attention over
//!    column views of the cache).
//! 5. This directory: `<family>.rs` implementing [`Family`] for the config, parsing
//!    `config.json`, and mapping checkpoint keys; a [`Model`] variant and its `model_type`s in
//!    [`Model::from_config_json`] and [`checkpoint_keys`].
//! 6. Tests: `scripts/make-fixtures.py` makes a tiny random checkpoint with `transformers`'
//!    reference logits; `runtime/tests/families.rs` checks logits and greedy tokens against it,
//!    disaggregated on 1/2/3 workers.
//!
//! [`Semantics::layer`]: genie_scheduler::graph::Semantics::layer
//! [`OpKind`]: genie_scheduler::graph::OpKind

pub mod gpt2;
pub mod llama;
pub mod run;

use crate::driver::{Driver, RunOutput};
use crate::error::{Result, RuntimeError};
use crate::plan::Placement;
use candle_core::{Device, Tensor};
use genie_scheduler::builders::{Gpt2Config, LlamaConfig};
use genie_scheduler::graph::{Graph, OpKind, Semantics, TensorRef};
use std::path::Path;

/// What a model family tells the runtime: its graphs and sizes.
pub trait Family {
    /// The Hugging Face `model_type` (`gpt2`, `llama`, `qwen2`, `mistral`).
    fn model_type(&self) -> &str;
    /// The prefill graph over `seq_len` prompt tokens: outputs logits `[B, S, V]`, then each
    /// layer's KV cache.
    fn prefill(&self, seq_len: usize) -> Result<Graph>;
    /// [`Family::prefill`] whose head reads only the last position: outputs the next token's
    /// logits `[B, 1, V]`, then each layer's KV cache (see [`prefill_last`]).
    fn prefill_last(&self, seq_len: usize) -> Result<Graph>;
    /// One decode step against KV caches of length `kv_len`: outputs logits `[B, 1, V]`, then
    /// the updated caches.
    fn decode(&self, kv_len: usize) -> Result<Graph>;
    /// One decode step of several sequences, sequence `i` against caches of length
    /// `kv_lens[i]` (cache slot `i`): logits `[N, 1, V]`, row `i` sequence `i`'s, then the
    /// updated caches. Each sequence's rows go through the same operations as in
    /// [`Family::decode`] (and one length gives its graph).
    fn decode_batch(&self, kv_lens: &[usize]) -> Result<Graph>;
    /// The prefill of several prompts at once (lengths `lens`, their tokens concatenated in
    /// that order; see [`run_prefill_batch`]): logits `[N, 1, V]`, row `i` the next token's of
    /// prompt `i`, whose cache is made in slot `i`. Each prompt's rows go through the operations
    /// [`Family::prefill_last`] gives them alone; one length gives its graph.
    fn prefill_batch(&self, lens: &[usize]) -> Result<Graph>;
    /// Vocabulary size.
    fn vocab(&self) -> usize;
    /// Decoder layers.
    fn layers(&self) -> usize;
    /// Most positions a sequence may have.
    fn context(&self) -> usize;
    /// Width `E` of one layer's cache `[2, B, L, E]`: one position's K (or V) values in one
    /// layer (GPT-2: hidden; Llama: KV heads × head size).
    fn kv_width(&self) -> usize;
    /// Bytes of KV cache a sequence of `tokens` positions takes (K and V, every layer, f32).
    fn kv_bytes(&self, tokens: usize) -> u64 {
        2 * (self.layers() as u64) * (tokens as u64) * (self.kv_width() as u64) * 4
    }
    /// One line: layers, sizes, heads.
    fn describe(&self) -> String;
}

/// A model of any supported family.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// Llama-style: Llama, Qwen2, Mistral.
    Llama(LlamaConfig),
}

fn sched_err(e: genie_scheduler::Error) -> RuntimeError {
    RuntimeError::Scheduler(e)
}

/// `model_type`s [`Model::from_config_json`] accepts.
pub const MODEL_TYPES: [&str; 4] = ["gpt2", "llama", "qwen2", "mistral"];

impl Model {
    /// Parses a Hugging Face `config.json` (its text; `path` only names it in errors).
    pub fn from_config_json(text: &str, path: &Path) -> Result<Self> {
        let err = |reason: String| RuntimeError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let t = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| err("no `model_type`".into()))?;
        match t {
            "gpt2" => gpt2::from_config_json(&v).map(Model::Gpt2).map_err(err),
            "llama" | "qwen2" | "mistral" => {
                llama::from_config_json(&v).map(Model::Llama).map_err(err)
            }
            other => Err(err(format!(
                "model_type `{other}` is not supported (supported: {})",
                MODEL_TYPES.join(", ")
            ))),
        }
    }

    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_config_json(&text, &path)
    }

    /// The model a name stands for: `gpt2-small` (4 layers × 128 hidden, 4096 vocab: the
    /// demo's default), `gpt2-124m` (or `gpt2`: the real GPT-2's shape), or a Hugging Face
    /// folder ([`Model::load`]).
    pub fn named(name: &str) -> Result<Self> {
        let dir = Path::new(name);
        if dir.is_dir() {
            return Self::load(dir);
        }
        match name {
            "gpt2-small" => Ok(Self::Gpt2(Gpt2Config {
                layers: 4,
                hidden: 128,
                heads: 4,
                vocab: 4096,
                context: 1024,
                ..Gpt2Config::default()
            })),
            "gpt2-124m" | "gpt2" => Ok(Self::Gpt2(Gpt2Config::default())),
            other => Err(RuntimeError::Plan(format!(
                "unknown model `{other}` (expected gpt2-small, gpt2-124m or a model folder)"
            ))),
        }
    }

    fn family(&self) -> &dyn Family {
        match self {
            Model::Gpt2(c) => c,
            Model::Llama(c) => c,
        }
    }
}

impl Family for Model {
    fn model_type(&self) -> &str {
        self.family().model_type()
    }
    fn prefill(&self, seq_len: usize) -> Result<Graph> {
        self.family().prefill(seq_len)
    }
    fn prefill_last(&self, seq_len: usize) -> Result<Graph> {
        self.family().prefill_last(seq_len)
    }
    fn decode(&self, kv_len: usize) -> Result<Graph> {
        self.family().decode(kv_len)
    }
    fn decode_batch(&self, kv_lens: &[usize]) -> Result<Graph> {
        self.family().decode_batch(kv_lens)
    }
    fn prefill_batch(&self, lens: &[usize]) -> Result<Graph> {
        self.family().prefill_batch(lens)
    }
    fn vocab(&self) -> usize {
        self.family().vocab()
    }
    fn layers(&self) -> usize {
        self.family().layers()
    }
    fn context(&self) -> usize {
        self.family().context()
    }
    fn kv_width(&self) -> usize {
        self.family().kv_width()
    }
    fn describe(&self) -> String {
        self.family().describe()
    }
}

impl From<Gpt2Config> for Model {
    fn from(c: Gpt2Config) -> Self {
        Model::Gpt2(c)
    }
}

impl From<LlamaConfig> for Model {
    fn from(c: LlamaConfig) -> Self {
        Model::Llama(c)
    }
}

/// The checkpoint keys parameter `name` may have in a checkpoint of `model_type` (`None`: a
/// bare safetensors file, read as GPT-2's), the graph's own spelling first.
pub fn checkpoint_keys(model_type: Option<&str>, name: &str) -> Vec<String> {
    match model_type {
        Some("llama" | "qwen2" | "mistral") => llama::checkpoint_keys(name),
        _ => gpt2::checkpoint_keys(name),
    }
}

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

/// The last row (`V` values) of `[.., V]` logits; empty when there are none.
fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let v = logits.dim(candle_core::D::Minus1).map_err(kerr)?;
    let mut flat: Vec<f32> = logits
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(kerr)?;
    Ok(flat.split_off(flat.len().saturating_sub(v)))
}

/// Index of the largest value of the last row of `[.., V]` logits.
pub fn argmax_last(logits: &Tensor) -> Result<i64> {
    let last = last_row(logits)?;
    let mut best = 0usize;
    for (i, x) in last.iter().enumerate() {
        if *x > last[best] {
            best = i;
        }
    }
    Ok(best as i64)
}

/// One generation: what each run returned.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prefill run (its outputs: the last position's logits are not returned; see `tokens`).
    pub prefill: RunOutput,
    /// Decode runs, one per step (outputs: `[logits]`).
    pub steps: Vec<RunOutput>,
    /// Greedy tokens: the first from prefill, then one per step.
    pub tokens: Vec<i64>,
}

/// How [`generate_with`] picks each token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 (the default) picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (default 0: all).
    pub top_k: usize,
    /// Nucleus sampling: draw from the most likely tokens whose probabilities sum to at least
    /// `top_p` (default 1: all).
    pub top_p: f32,
    /// Seed of the draws (default 0): the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks a token from the last row of `[.., V]` logits: greedy at temperature 0, else a draw
/// from the temperature-scaled distribution truncated to the top `top_k`, then to `top_p`.
pub fn pick(logits: &Tensor, s: &Sampling, rng: &mut impl rand::Rng) -> Result<i64> {
    if s.temperature <= 0.0 || !s.temperature.is_finite() {
        return argmax_last(logits);
    }
    let last = last_row(logits)?;
    let u = rng.random::<f64>();
    Ok(sample(&last, s.temperature, s.top_k, s.top_p, u) as i64)
}

/// Index drawn from `logits / temperature` restricted to the top `top_k` (0: all) and then to
/// the smallest prefix reaching probability `top_p`, with `u` uniform in `[0, 1)`.
pub(crate) fn sample(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f64) -> usize {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Most likely first; ties by lower id, so the order (and the draw) is deterministic.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if top_k > 0 {
        idx.truncate(top_k);
    }
    let Some(&best) = idx.first() else {
        return 0;
    };
    let max = f64::from(logits[best]);
    let t = f64::from(temperature);
    let weights: Vec<f64> = idx
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = 0;
    let mut mass = 0.0;
    for w in &weights {
        keep += 1;
        mass += w / total;
        if mass >= f64::from(top_p) {
            break;
        }
    }
    let kept: f64 = weights[..keep].iter().sum();
    let mut x = u * kept;
    for (k, w) in weights[..keep].iter().enumerate() {
        if x < *w {
            return idx[k];
        }
        x -= w;
    }
    idx[keep - 1]
}

/// A decode graph (from [`Family::decode_batch`]) whose only output is each sequence's greedy
/// next token (`[N, 1]` I64, an [`OpKind::ArgMax`] over its logits), so that the worker returns
/// one id per sequence instead of `V` logits: the token [`argmax_last`] would pick from them.
pub fn with_next_tokens(mut g: Graph) -> Result<Graph> {
    let logits = *g
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("graph has no outputs".into()))?;
    let id = g
        .add(
            "next_tokens",
            OpKind::ArgMax,
            vec![logits],
            Semantics::default(),
        )
        .map_err(|e| RuntimeError::Scheduler(e.into()))?;
    g.outputs = vec![id.into()];
    Ok(g)
}

/// The prefill graph of `seq_len` tokens that computes only the last position's logits (all
/// generation needs: the head's work is one row's, not `seq_len`), and that tensor `[B, 1, V]`.
pub fn prefill_last<F: Family + ?Sized>(model: &F, seq_len: usize) -> Result<(Graph, TensorRef)> {
    let g = model.prefill_last(seq_len)?;
    let logits = *g
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("graph has no outputs".into()))?;
    Ok((g, logits))
}

/// Runs the prefill graph `g` of `prompt` (from [`Family::prefill`] or [`prefill_last`]) placed
/// by `place` for sequence `seq`, fetching `logits`: the one way a prefill is fed
/// (`input_ids` and `position_ids` `0..s`), shared by generation, the engine and the demo.
pub fn run_prefill(
    driver: &Driver,
    g: &Graph,
    place: &Placement,
    prompt: &[i64],
    logits: TensorRef,
    seq: u64,
) -> Result<RunOutput> {
    driver.run(g, place, &prefill_inputs(&[prompt])?, &[logits], seq)
}

/// The inputs of a prefill of `prompts` (one, or several batched: [`Family::prefill_batch`]):
/// `input_ids` the prompts' tokens in order, `position_ids` each prompt's `0..len`.
pub fn prefill_inputs(prompts: &[&[i64]]) -> Result<[(&'static str, Tensor); 2]> {
    let ids = row_i64(prompts.concat())?;
    let pos = row_i64(prompts.iter().flat_map(|p| 0..p.len() as i64).collect())?;
    Ok([("input_ids", ids), ("position_ids", pos)])
}

/// Runs the batched prefill graph `g` (from [`Family::prefill_batch`]) of `prompts` placed by
/// `place`, prompt `i` for sequence `seqs[i]`, fetching `logits` (`[N, 1, V]`): `input_ids` the
/// prompts' tokens in order, `position_ids` each prompt's `0..len`.
pub fn run_prefill_batch(
    driver: &Driver,
    g: &Graph,
    place: &Placement,
    prompts: &[&[i64]],
    logits: TensorRef,
    seqs: &[u64],
) -> Result<RunOutput> {
    if prompts.len() != seqs.len() {
        return Err(RuntimeError::Plan(format!(
            "a batched prefill of {} prompts for {} sequences",
            prompts.len(),
            seqs.len()
        )));
    }
    driver.run_batch(g, place, &prefill_inputs(prompts)?, &[logits], seqs)
}

/// Runs the decode graph `g` (from [`Family::decode`] at the KV length `position`) of `token` at
/// `position` placed by `place` for sequence `seq`, fetching the graph's logits (its first
/// output).
pub fn run_decode_step(
    driver: &Driver,
    g: &Graph,
    place: &Placement,
    token: i64,
    position: usize,
    seq: u64,
) -> Result<RunOutput> {
    run_decode_batch(driver, g, place, &[token], &[position], &[seq])
}

/// Runs the batched decode graph `g` (from [`Family::decode_batch`] at the sequences' KV
/// lengths, which are their `positions`) of one token per sequence, sequence `i` being
/// `seqs[i]` (its caches are slot `i`'s), placed by `place`; fetches the logits `[N, 1, V]`.
pub fn run_decode_batch(
    driver: &Driver,
    g: &Graph,
    place: &Placement,
    tokens: &[i64],
    positions: &[usize],
    seqs: &[u64],
) -> Result<RunOutput> {
    let logits = *g
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("decode graph has no outputs".into()))?;
    let n = tokens.len();
    if positions.len() != n || seqs.len() != n {
        return Err(RuntimeError::Plan(format!(
            "a batched step of {n} tokens, {} positions, {} sequences",
            positions.len(),
            seqs.len()
        )));
    }
    let inputs = decode_inputs(tokens, positions)?;
    driver.run_batch(g, place, &inputs, &[logits], seqs)
}

/// The inputs of a batched decode step: `input_ids` (`tokens`) and `position_ids`
/// (`positions`), `[N, 1]` each.
pub fn decode_inputs(tokens: &[i64], positions: &[usize]) -> Result<[(&'static str, Tensor); 2]> {
    let col = |v: Vec<i64>| {
        let n = v.len();
        Tensor::from_vec(v, (n, 1), &Device::Cpu).map_err(kerr)
    };
    Ok([
        ("input_ids", col(tokens.to_vec())?),
        (
            "position_ids",
            col(positions.iter().map(|&p| p as i64).collect())?,
        ),
    ])
}

/// Runs a prefill of `prompt` then `steps` greedy decode steps for sequence `seq`.
/// `prefill_place` / `decode_place` choose each graph's placement. The prefill returns the
/// logits of every position (`[B, S, V]`); for long prompts use [`generate_with`].
pub fn generate<F: Family + ?Sized>(
    driver: &mut Driver,
    model: &F,
    prompt: &[i64],
    steps: usize,
    seq: u64,
    prefill_place: impl FnMut(&Graph) -> Result<Placement>,
    decode_place: impl FnMut(&Graph) -> Result<Placement>,
) -> Result<Generation> {
    let places = (prefill_place, decode_place);
    let greedy = Sampling::default();
    run_generation(driver, model, prompt, (steps, seq), &greedy, false, places)
}

/// [`generate`] with tokens picked as `sampling` says, and only the last position's logits
/// returned by the prefill (`[B, 1, V]`: a long prompt's whole logits would not fit one
/// message to the driver).
#[allow(clippy::too_many_arguments)]
pub fn generate_with<F: Family + ?Sized>(
    driver: &mut Driver,
    model: &F,
    prompt: &[i64],
    steps: usize,
    seq: u64,
    sampling: &Sampling,
    prefill_place: impl FnMut(&Graph) -> Result<Placement>,
    decode_place: impl FnMut(&Graph) -> Result<Placement>,
) -> Result<Generation> {
    let places = (prefill_place, decode_place);
    run_generation(driver, model, prompt, (steps, seq), sampling, true, places)
}

#[allow(clippy::type_complexity)]
fn run_generation<F: Family + ?Sized>(
    driver: &mut Driver,
    model: &F,
    prompt: &[i64],
    (steps, seq): (usize, u64),
    sampling: &Sampling,
    last_only: bool,
    (mut prefill_place, mut decode_place): (
        impl FnMut(&Graph) -> Result<Placement>,
        impl FnMut(&Graph) -> Result<Placement>,
    ),
) -> Result<Generation> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
    let s = prompt.len();
    if s == 0 || s + steps > model.context() {
        return Err(RuntimeError::Plan(format!(
            "a prompt of {s} tokens and {steps} steps must be non-empty and fit the context of {}",
            model.context()
        )));
    }
    if let Some(bad) = prompt
        .iter()
        .find(|&&t| t < 0 || t as u64 >= model.vocab() as u64)
    {
        return Err(RuntimeError::Plan(format!(
            "token id {bad} is outside the vocabulary of {}",
            model.vocab()
        )));
    }
    if steps > 0 {
        // Refuse before running what the last step cannot do (a sliding window, ...).
        model.decode(s + steps - 1)?;
    }
    let (g, logits_ref) = if last_only {
        prefill_last(model, s)?
    } else {
        let g = model.prefill(s)?;
        let logits: TensorRef = *g
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("prefill graph has no outputs".into()))?;
        (g, logits)
    };
    let p = prefill_place(&g)?;
    let prefill = run_prefill(driver, &g, &p, prompt, logits_ref, seq)?;
    let first = prefill
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("prefill returned nothing".into()))?;
    let mut tokens = vec![pick(first, sampling, &mut rng)?];
    let mut runs = Vec::with_capacity(steps);
    for step in 0..steps {
        let l = s + step;
        let g = model.decode(l)?;
        let p = decode_place(&g)?;
        let out = run_decode_step(driver, &g, &p, *tokens.last().unwrap_or(&0), l, seq)?;
        let logits = out
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("decode returned nothing".into()))?;
        tokens.push(pick(logits, sampling, &mut rng)?);
        runs.push(out);
    }
    Ok(Generation {
        prefill,
        steps: runs,
        tokens,
    })
}
