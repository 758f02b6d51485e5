//! Llama-style decoders (Llama, Qwen2, Mistral, SmolLM): RMSNorm, rotary position embeddings,
//! grouped-query attention and a SwiGLU MLP.
//!
//! Weights are named by their Hugging Face checkpoint keys (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `MistralForCausalLM` all share them): `model.embed_tokens.weight`,
//! `model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`
//! in `nn.Linear` `[out, in]` layout (Qwen2 adds `{q,k,v}_proj.bias`),
//! `model.layers.{i}.post_attention_layernorm.weight`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.norm.weight` and, unless the
//! embeddings are tied, `lm_head.weight`. Rotary embeddings apply to q and k before the cache,
//! so the cache holds rotated keys, as in `transformers`.
//!
//! KV caches are `[2, B, L, G·D]`: sized by the key/value heads G, not the query heads. Graph
//! outputs, in order: `logits` then the `present` cache of each layer (as GPT-2's).

use super::{check, Builder, Head};
use crate::graph::{
    DType, Graph, GraphError, OpKind, Phase, RopeScaling, Scalar, TensorRef, WeightLayout,
};
use crate::Error;
use serde::{Deserialize, Deserializer, Serialize};

/// Which Llama-style architecture a [`LlamaConfig`] describes (Hugging Face's `model_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlamaKind {
    /// `llama` (Llama 2/3, SmolLM, TinyLlama): biases only with `attention_bias`.
    #[default]
    Llama,
    /// `qwen2`: q/k/v projections always carry biases; sliding window only with
    /// `use_sliding_window`.
    Qwen2,
    /// `mistral`: a sliding attention window (refused when a sequence is longer than it).
    Mistral,
}

impl LlamaKind {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaKind::Llama => "llama",
            LlamaKind::Qwen2 => "qwen2",
            LlamaKind::Mistral => "mistral",
        }
    }
}

/// Llama-style hyper-parameters. Deserializes from a Hugging Face `config.json` (its field names
/// are accepted as aliases; fields this crate does not use are ignored). [`Default`] is a
/// 135M-class model (SmolLM-135M's shape): 30 layers × 576 hidden, 9 heads, 3 KV heads, 1536
/// intermediate, vocabulary 49152, tied embeddings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    /// Architecture (`model_type`; default `llama`).
    #[serde(alias = "model_type")]
    pub kind: LlamaKind,
    /// Decoder layers (`num_hidden_layers`).
    #[serde(alias = "num_hidden_layers")]
    pub layers: usize,
    /// Hidden size (`hidden_size`).
    #[serde(alias = "hidden_size")]
    pub hidden: usize,
    /// Query heads H (`num_attention_heads`).
    #[serde(alias = "num_attention_heads")]
    pub heads: usize,
    /// Key/value heads G, dividing H (`num_key_value_heads`; `None`: H).
    #[serde(alias = "num_key_value_heads")]
    pub kv_heads: Option<usize>,
    /// Size of one head (`head_dim`; `None`: hidden / heads).
    pub head_dim: Option<usize>,
    /// MLP width (`intermediate_size`).
    #[serde(alias = "intermediate_size")]
    pub intermediate: usize,
    /// Vocabulary (`vocab_size`).
    #[serde(alias = "vocab_size")]
    pub vocab: usize,
    /// Maximum positions (`max_position_embeddings`; default 2048).
    #[serde(alias = "max_position_embeddings")]
    pub context: usize,
    /// RMSNorm epsilon (`rms_norm_eps`; default 1e-5).
    #[serde(alias = "rms_norm_eps")]
    pub norm_eps: f32,
    /// Base of the rotary frequencies (`rope_theta`; default 10000).
    pub rope_theta: f32,
    /// Rotary frequency rescaling (`rope_scaling`: none, `linear` or `llama3`; others refused).
    #[serde(deserialize_with = "rope_scaling")]
    pub rope_scaling: RopeScaling,
    /// The LM head reads the embedding table (`tie_word_embeddings`; default true).
    #[serde(alias = "tie_word_embeddings")]
    pub tied_embeddings: bool,
    /// Biases on q/k/v and o (Llama's `attention_bias`; Qwen2 has q/k/v biases regardless).
    pub attention_bias: bool,
    /// Attention window (`sliding_window`); used by Mistral, and by Qwen2 with
    /// `use_sliding_window`. A longer sequence is refused.
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for `sliding_window` (default false).
    pub use_sliding_window: bool,
    /// MLP activation (`hidden_act`); only `silu` is supported.
    pub hidden_act: String,
    /// Biases in the MLP (Llama's `mlp_bias`); refused, no released model uses them.
    pub mlp_bias: bool,
    /// Batch size (default 1; not part of `config.json`).
    pub batch: usize,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            kind: LlamaKind::Llama,
            layers: 30,
            hidden: 576,
            heads: 9,
            kv_heads: Some(3),
            head_dim: None,
            intermediate: 1536,
            vocab: 49152,
            context: 2048,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            tied_embeddings: true,
            attention_bias: false,
            sliding_window: None,
            use_sliding_window: false,
            hidden_act: "silu".into(),
            mlp_bias: false,
            batch: 1,
        }
    }
}

/// `rope_scaling` as Hugging Face writes it: `null`, or an object with `rope_type` (older files:
/// `type`) `default`, `linear` or `llama3` and that type's parameters.
fn rope_scaling<'de, D: Deserializer<'de>>(d: D) -> Result<RopeScaling, D::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    struct Hf {
        rope_type: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
        factor: Option<f32>,
        low_freq_factor: Option<f32>,
        high_freq_factor: Option<f32>,
        original_max_position_embeddings: Option<usize>,
    }
    let Some(hf) = Option::<Hf>::deserialize(d)? else {
        return Ok(RopeScaling::None);
    };
    let kind = hf.rope_type.or(hf.kind).unwrap_or_else(|| "default".into());
    let need = |v: Option<f32>, what: &str| {
        v.filter(|v| v.is_finite() && *v > 0.0)
            .map(Scalar)
            .ok_or_else(|| {
                D::Error::custom(format!("rope_scaling {kind}: needs a positive {what}"))
            })
    };
    match kind.as_str() {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: need(hf.factor, "factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need(hf.factor, "factor")?,
            low_freq_factor: need(hf.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(hf.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: hf.original_max_position_embeddings.ok_or_else(
                || D::Error::custom("rope_scaling llama3: needs original_max_position_embeddings"),
            )?,
        }),
        other => Err(D::Error::custom(format!(
            "rope_scaling type `{other}` is not supported (default, linear, llama3 are)"
        ))),
    }
}

impl LlamaConfig {
    /// Key/value heads G.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// Size of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden.checked_div(self.heads).unwrap_or(0))
    }

    /// Whether the q/k/v projections carry biases.
    pub fn qkv_bias(&self) -> bool {
        self.kind == LlamaKind::Qwen2 || self.attention_bias
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.kind != LlamaKind::Qwen2 && self.attention_bias
    }

    /// The attention window this architecture applies, if any.
    pub fn window(&self) -> Option<usize> {
        match self.kind {
            LlamaKind::Llama => None,
            LlamaKind::Qwen2 => self.sliding_window.filter(|_| self.use_sliding_window),
            LlamaKind::Mistral => self.sliding_window,
        }
    }

    /// Width of one layer's keys (or values) per token: `G · D`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads().saturating_mul(self.head_dim())
    }

    /// Checks the configuration for a sequence of `tokens` positions in all (prompt, or cache
    /// plus the new token).
    pub fn check(&self, tokens: usize) -> Result<(), Error> {
        let t = self.kind.model_type();
        let what = |s: &str| format!("{t}: {s}");
        check(
            self.layers > 0 && self.batch > 0 && self.vocab > 0 && self.intermediate > 0,
            &what("layers, batch, vocab and intermediate must be positive"),
        )?;
        check(tokens > 0, &what("sequence length must be positive"))?;
        check(
            self.heads > 0 && self.hidden > 0 && self.head_dim() > 0 && self.head_dim() % 2 == 0,
            &what("heads, hidden and an even head_dim must be positive"),
        )?;
        check(
            self.head_dim.is_some() || self.hidden % self.heads == 0,
            &what("hidden must be a multiple of heads"),
        )?;
        let g = self.kv_heads();
        check(
            g > 0 && self.heads % g == 0,
            &what("num_key_value_heads must divide num_attention_heads"),
        )?;
        check(
            self.heads.checked_mul(self.head_dim()).is_some(),
            &what("heads · head_dim is too large"),
        )?;
        check(
            self.rope_theta.is_finite() && self.rope_theta > 0.0,
            &what("rope_theta must be positive"),
        )?;
        check(
            self.hidden_act == "silu",
            &what(&format!(
                "hidden_act `{}` is not supported (silu is)",
                self.hidden_act
            )),
        )?;
        check(!self.mlp_bias, &what("mlp_bias is not supported"))?;
        if let Some(w) = self.window() {
            check(
                tokens <= w,
                &what(&format!(
                    "a sequence of {tokens} positions exceeds the sliding window of {w}, \
                     which this runtime does not apply"
                )),
            )?;
        }
        Ok(())
    }

    /// Trainable parameters, by `transformers`' formula for the same config (what
    /// [`Graph::parameter_count`] of [`llama_prefill`] equals). Meaningful for a config that
    /// passes [`LlamaConfig::check`] (others may wrap).
    pub fn parameter_count(&self) -> u64 {
        let (d, ff, v) = (
            self.hidden as u64,
            self.intermediate as u64,
            self.vocab as u64,
        );
        let (hq, hkv) = (
            self.heads.saturating_mul(self.head_dim()) as u64,
            self.kv_width() as u64,
        );
        let attn = d * hq
            + 2 * d * hkv
            + hq * d
            + if self.qkv_bias() { hq + 2 * hkv } else { 0 }
            + if self.o_bias() { d } else { 0 };
        let layer = attn + 3 * d * ff + 2 * d;
        let head = if self.tied_embeddings { 0 } else { v * d };
        v * d + self.layers as u64 * layer + d + head
    }
}

/// Llama-style prefill over a prompt of `seq_len` tokens: logits `[B, S, V]` and each layer's KV
/// cache `[2, B, S, G·D]`.
pub fn llama_prefill(c: &LlamaConfig, seq_len: usize) -> Result<Graph, Error> {
    c.check(seq_len)?;
    llama(c, seq_len, &[], (Head::All, &[]))
}

/// [`llama_prefill`] whose head reads only the last position: logits `[B, 1, V]` and each
/// layer's KV cache (see [`gpt2_prefill_last`](super::gpt2_prefill_last)).
pub fn llama_prefill_last(c: &LlamaConfig, seq_len: usize) -> Result<Graph, Error> {
    c.check(seq_len)?;
    llama(c, seq_len, &[], (Head::Last, &[]))
}

/// A prefill of several prompts at once: logits `[N, 1, V]`, row `i` prompt `i`'s next token's,
/// and each prompt's cache in slot `i` (see [`gpt2_prefill_batch`](super::gpt2_prefill_batch)).
/// `c.batch` must be 1; one length gives [`llama_prefill_last`]'s graph. Each prompt is checked
/// as it would be alone (a sliding window bounds each prompt, not their total: each attends
/// over its own rows only).
pub fn llama_prefill_batch(c: &LlamaConfig, lens: &[usize]) -> Result<Graph, Error> {
    let total = super::check_prefill_batch(c.batch, lens)?;
    if let [l] = lens {
        return llama_prefill_last(c, *l);
    }
    for &l in lens {
        c.check(l)?;
    }
    llama(c, total, &[], (Head::Last, lens))
}

/// One Llama-style decode step against KV caches of length `kv_len`: logits `[B, 1, V]` and the
/// updated caches `[2, B, L+1, G·D]`.
pub fn llama_decode(c: &LlamaConfig, kv_len: usize) -> Result<Graph, Error> {
    c.check(kv_len.saturating_add(1))?;
    llama(c, 1, &[kv_len], (Head::All, &[]))
}

/// One Llama-style decode step of several sequences at once, sequence `i` against caches of
/// length `kv_lens[i]`: logits `[N, 1, V]`, the caches extended in place (see
/// [`gpt2_decode_batch`](super::gpt2_decode_batch)). `c.batch` must be 1.
pub fn llama_decode_batch(c: &LlamaConfig, kv_lens: &[usize]) -> Result<Graph, Error> {
    super::check_batch(c.batch, kv_lens)?;
    for &l in kv_lens {
        c.check(l.saturating_add(1))?;
    }
    llama(c, 1, kv_lens, (Head::Batched, &[]))
}

impl Builder {
    /// `module.weight` then RMSNorm.
    fn rms_norm(
        &mut self,
        module: &str,
        x: TensorRef,
        d: usize,
        eps: f32,
    ) -> Result<TensorRef, GraphError> {
        let saved = std::mem::replace(&mut self.module, module.to_owned());
        let w = self.param("weight", &[d])?;
        let y = self.op("out", OpKind::RmsNorm { eps: Scalar(eps) }, vec![x, w]);
        self.module = saved;
        y
    }
}

fn llama(
    c: &LlamaConfig,
    s: usize,
    kv: &[usize],
    (head, pieces): (Head, &[usize]),
) -> Result<Graph, Error> {
    let decode = !kv.is_empty();
    let (phase, name) = if decode {
        (Phase::Decode, format!("{}-decode", c.kind.model_type()))
    } else {
        (Phase::Prefill, format!("{}-prefill", c.kind.model_type()))
    };
    let (bsz, d, hd, ff) = (
        c.batch * kv.len().max(1),
        c.hidden,
        c.head_dim(),
        c.intermediate,
    );
    let (eq, ekv) = (c.heads * hd, c.kv_width());
    let mut b = Builder::new(&name, Phase::Embedding);
    b.head = head;
    b.pieces = pieces.to_vec();
    let ids = b.input("input_ids", &[bsz, s], DType::I64)?;
    let pos = b.input("position_ids", &[bsz, s], DType::I64)?;
    b.at("model.embed_tokens");
    let table = b.param("weight", &[c.vocab, d])?;
    let mut h = b.op("embed", OpKind::Embedding, vec![ids, table])?;
    b.phase = phase;
    let rope = OpKind::Rotary {
        head_dim: hd,
        theta: Scalar(c.rope_theta),
        scaling: c.rope_scaling,
    };
    let attn_op = OpKind::Attention {
        heads: c.heads,
        kv_heads: Some(c.kv_heads()),
        head_dim: hd,
        causal: true,
        scale: Scalar(1.0 / (hd as f32).sqrt()),
    };
    let mut presents: Vec<TensorRef> = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        b.in_layer(Some(i));
        let p = format!("model.layers.{i}");
        let sa = format!("{p}.self_attn");
        let x = b.rms_norm(&format!("{p}.input_layernorm"), h, d, c.norm_eps)?;
        let lin = |b: &mut Builder, m: &str, x, dims, bias| {
            b.linear_with(&format!("{sa}.{m}"), x, dims, WeightLayout::OutIn, bias)
        };
        let q = lin(&mut b, "q_proj", x, (d, eq), c.qkv_bias())?;
        let k = lin(&mut b, "k_proj", x, (d, ekv), c.qkv_bias())?;
        let v = lin(&mut b, "v_proj", x, (d, ekv), c.qkv_bias())?;
        b.at(sa.clone());
        let q = b.op("q_rotary", rope.clone(), vec![q, pos])?;
        let k = b.op("k_rotary", rope.clone(), vec![k, pos])?;
        let a = b.cached_attention(
            &format!("{sa}.past"),
            i,
            [q, k, v],
            (kv, c.batch, ekv),
            &attn_op,
        )?;
        presents.extend(a.presents);
        let a = a.out;
        let o = lin(&mut b, "o_proj", a, (eq, d), c.o_bias())?;
        b.at(p.clone());
        let h1 = b.op("attn_residual", OpKind::Add, vec![h, o])?;
        let x2 = b.rms_norm(&format!("{p}.post_attention_layernorm"), h1, d, c.norm_eps)?;
        let mlp = format!("{p}.mlp");
        let gate = b.linear_with(
            &format!("{mlp}.gate_proj"),
            x2,
            (d, ff),
            WeightLayout::OutIn,
            false,
        )?;
        let up = b.linear_with(
            &format!("{mlp}.up_proj"),
            x2,
            (d, ff),
            WeightLayout::OutIn,
            false,
        )?;
        b.at(mlp.clone());
        let act = b.op("silu", OpKind::Silu, vec![gate])?;
        let gated = b.op("gated", OpKind::Mul, vec![act, up])?;
        let down = b.linear_with(
            &format!("{mlp}.down_proj"),
            gated,
            (ff, d),
            WeightLayout::OutIn,
            false,
        )?;
        b.at(p);
        h = b.op("mlp_residual", OpKind::Add, vec![h1, down])?;
    }
    b.in_layer(None);
    let hf = b.rms_norm("model.norm", h, d, c.norm_eps)?;
    let hf = b.last_position(hf, s)?;
    let logits = if c.tied_embeddings {
        b.at("lm_head");
        b.op(
            "logits",
            OpKind::MatMul { transpose_b: true },
            vec![hf, table],
        )?
    } else {
        b.linear_with("lm_head", hf, (d, c.vocab), WeightLayout::OutIn, false)?
    };
    let mut g = b.g;
    g.outputs.push(logits);
    g.outputs.extend(presents);
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `transformers`' count for a config, written out as its modules hold parameters:
    /// embeddings, per layer q/k/v/o (+ biases), gate/up/down and two norms, the final norm and
    /// an untied head.
    fn hf_count(c: &LlamaConfig) -> u64 {
        let (d, ff, v, l) = (
            c.hidden as u64,
            c.intermediate as u64,
            c.vocab as u64,
            c.layers as u64,
        );
        let hd = c.head_dim() as u64;
        let (q, kv) = (c.heads as u64 * hd, c.kv_heads() as u64 * hd);
        let qkv_bias = if c.qkv_bias() { q + 2 * kv } else { 0 };
        let o_bias = if c.o_bias() { d } else { 0 };
        let per_layer = (d * q + d * kv + d * kv + q * d) + qkv_bias + o_bias + 3 * d * ff + 2 * d;
        v * d + l * per_layer + d + if c.tied_embeddings { 0 } else { d * v }
    }

    #[test]
    fn smollm_135m_shape_has_its_parameter_count() {
        let c = LlamaConfig::default();
        let p = llama_prefill(&c, 16).unwrap();
        let d = llama_decode(&c, 512).unwrap();
        p.validate().unwrap();
        d.validate().unwrap();
        // SmolLM-135M as `transformers` reports it (`num_parameters()`).
        assert_eq!(p.parameter_count(), 134_515_008);
        assert_eq!(d.parameter_count(), 134_515_008);
        assert_eq!(c.parameter_count(), 134_515_008);
        assert_eq!(d.outputs.len(), 31);
        // KV caches sized by the 3 KV heads of 64: [2, 1, L+1, 192].
        assert_eq!(d.tensor(d.outputs[1]).unwrap().shape, vec![2, 1, 513, 192]);
        assert_eq!(p.tensor(p.outputs[1]).unwrap().shape, vec![2, 1, 16, 192]);
        assert_eq!(d.tensor(d.outputs[0]).unwrap().shape, vec![1, 1, 49152]);
        let past = d
            .nodes()
            .iter()
            .find(|n| n.name == "model.layers.0.self_attn.past")
            .unwrap();
        assert_eq!(past.outputs[0].shape, vec![2, 1, 512, 192]);
        for n in d.nodes() {
            let expect: Option<u32> = n
                .name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse().ok());
            assert_eq!(n.layer(), expect, "{}", n.name);
        }
    }

    #[test]
    fn parameter_counts_equal_the_reference_formula() {
        let base = LlamaConfig {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: Some(2),
            intermediate: 96,
            vocab: 300,
            ..LlamaConfig::default()
        };
        // Each with `transformers`' own count for the same config (its LlamaConfig, Qwen2Config
        // or MistralConfig, the model built on torch's meta device, `num_parameters()`).
        let variants = [
            (base.clone(), 80_960),
            (
                LlamaConfig {
                    tied_embeddings: false,
                    ..base.clone()
                },
                100_160,
            ),
            (
                LlamaConfig {
                    kind: LlamaKind::Qwen2,
                    ..base.clone()
                },
                81_216,
            ),
            (
                LlamaConfig {
                    attention_bias: true,
                    kv_heads: None,
                    ..base.clone()
                },
                89_664,
            ),
            (
                LlamaConfig {
                    kind: LlamaKind::Mistral,
                    sliding_window: Some(64),
                    head_dim: Some(32),
                    tied_embeddings: false,
                    ..base.clone()
                },
                124_736,
            ),
        ];
        for (c, transformers) in variants {
            let g = llama_prefill(&c, 5).unwrap();
            g.validate().unwrap();
            assert_eq!(hf_count(&c), transformers, "{c:?}");
            assert_eq!(g.parameter_count(), hf_count(&c), "{c:?}");
            assert_eq!(c.parameter_count(), hf_count(&c), "{c:?}");
            let json = g.to_json().unwrap();
            assert_eq!(Graph::from_json(&json).unwrap(), g);
            let names: Vec<&str> = g.nodes().iter().map(|n| n.name.as_str()).collect();
            assert_eq!(
                names.contains(&"lm_head.weight"),
                !c.tied_embeddings,
                "{c:?}"
            );
            assert_eq!(
                names.contains(&"model.layers.1.self_attn.q_proj.bias"),
                c.qkv_bias()
            );
        }
    }

    #[test]
    fn config_json_and_refusals() {
        let json = r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 100,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "sliding_window": 8, "tie_word_embeddings": false, "hidden_act": "silu",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            "torch_dtype": "float32"}"#;
        let c: LlamaConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.kind, LlamaKind::Mistral);
        assert_eq!((c.layers, c.hidden, c.heads, c.kv_heads()), (2, 64, 4, 1));
        assert!(!c.tied_embeddings);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
        assert!(llama_prefill(&c, 8).is_ok());
        let e = llama_prefill(&c, 9).unwrap_err().to_string();
        assert!(e.contains("sliding window of 8"), "{e}");
        // A batch of prompts each within the window, though 11 rows in all.
        let g = llama_prefill_batch(&c, &[5, 6]).unwrap();
        assert_eq!(g.tensor(g.outputs[0]).unwrap().shape, vec![2, 1, 100]);
        let e = llama_prefill_batch(&c, &[5, 9]).unwrap_err().to_string();
        assert!(e.contains("sliding window of 8"), "{e}");
        assert!(llama_decode(&c, 8).is_err());
        let yarn = r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#;
        let e = serde_json::from_str::<LlamaConfig>(yarn).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let linear = r#"{"rope_scaling": {"type": "linear", "factor": 2.0}}"#;
        let c: LlamaConfig = serde_json::from_str(linear).unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Linear {
                factor: Scalar(2.0)
            }
        );
        let bad = LlamaConfig {
            kv_heads: Some(4),
            ..LlamaConfig::default()
        };
        assert!(matches!(
            llama_decode(&bad, 4),
            Err(Error::InvalidConfig { .. })
        ));
        let gelu = LlamaConfig {
            hidden_act: "gelu".into(),
            ..LlamaConfig::default()
        };
        assert!(llama_prefill(&gelu, 4).is_err());
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: Scalar(8.0),
            low_freq_factor: Scalar(1.0),
            high_freq_factor: Scalar(4.0),
            original_max_position_embeddings: 8192,
        };
        let base = RopeScaling::None.inv_freq(500000.0, 128);
        let scaled = s.inv_freq(500000.0, 128);
        assert_eq!(scaled[0], base[0]);
        assert_eq!(scaled[63], base[63] / 8.0);
        assert!(scaled.iter().zip(&base).all(|(s, b)| s <= b));
    }
}
