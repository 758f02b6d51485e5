//! Graphs of real models at their real sizes: GPT-2 (prefill and decode step), Llama-style
//! decoders (Llama, Qwen2, Mistral: prefill and decode step, see [`LlamaConfig`]), BERT-base and
//! ResNet-50.
//!
//! Every weight is an [`OpKind::Parameter`] node named by its checkpoint key:
//! GPT-2 as in `openai-community/gpt2`'s `model.safetensors` (`wte.weight`,
//! `h.{i}.attn.c_attn.weight` in Conv1D `[in, out]` layout, ...; a loader should also accept the
//! `transformer.` prefix of `GPT2LMHeadModel` checkpoints), BERT as `BertModel`
//! (`embeddings.word_embeddings.weight`, `encoder.layer.{i}.attention.self.query.weight` in
//! `nn.Linear` `[out, in]` layout, ...), ResNet-50 as torchvision (`conv1.weight`,
//! `layer1.0.bn1.running_mean`, ..., `fc.weight`). GPT-2's LM head is tied: the logits are
//! `MatMul{transpose_b}` with the `wte.weight` node, so it is counted once.
//!
//! Model inputs are [`OpKind::Input`] nodes: `input_ids` and `position_ids` (I64 `[B, S]`; the
//! runtime fills position ids, `0..S` for prefill and `L` for a decode step), BERT's
//! `token_type_ids`, ResNet's `images` (F32 `[B, 3, H, W]`).
//!
//! KV caches: the prefill graph emits per layer `h.{i}.attn.present` = `KvCacheAppend(k, v)`
//! (`[2, B, S, 768]`, residency [`Residency::StatefulKvCache`], also a graph output) — exactly
//! the shape the decode graph's `h.{i}.attn.past` [`OpKind::KvCache`] node takes with `L = S`.
//! The decode-step graph appends the new token's k/v (`h.{i}.attn.present`, `[2, B, L+1, 768]`,
//! a graph output: the cache for the next step), reads keys and values back with
//! [`OpKind::KvCacheRead`] and attends over all `L+1` positions. A batched decode step
//! ([`gpt2_decode_batch`]) has one `h.{i}.attn.past` per sequence (slot `i`, its own `L_i`) and
//! one [`OpKind::CachedAttention`] per layer that extends and reads them all in place. A batched
//! prefill ([`gpt2_prefill_batch`]) concatenates several prompts' tokens, splits each layer's
//! queries, keys and values back per prompt (each attends among its own rows) and makes prompt
//! `i`'s cache by appending to an empty `h.{i}.attn.past` of slot `i` (`[2, 1, 0, E]`).
//!
//! Layers: every node of GPT-2's block `h.{i}` and BERT's `encoder.layer.{i}` (its weights, its
//! ops, its KV cache) carries [`Semantics::layer`] `Some(i)`; embeddings, final norms, heads and
//! the pooler carry `None`. Consumers (per-layer placement, the KV-cache manager) read that field,
//! never the names, so a family with other checkpoint keys (`model.layers.{i}`) works the same.
//! ResNet's nodes carry no layer: its stages differ in shape and are balanced by the pipeline
//! partitioner, not placed per layer.
//!
//! Graph outputs, in order: GPT-2 `logits` then the `present` of each layer; BERT
//! `last_hidden_state` then `pooler_output`; ResNet `logits`.

use crate::graph::{
    DType, GeluApprox, Graph, GraphError, KvPart, OpKind, Phase, Residency, Scalar, Semantics,
    TensorMeta, TensorRef, WeightLayout,
};
use crate::Error;
use serde::{Deserialize, Serialize};

mod llama;
pub use llama::{
    llama_decode, llama_decode_batch, llama_prefill, llama_prefill_batch, llama_prefill_last,
    LlamaConfig, LlamaKind,
};

/// GPT-2 hyper-parameters; [`Default`] is the 124M model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Decoder layers (default 12).
    pub layers: usize,
    /// Hidden size (default 768).
    pub hidden: usize,
    /// Attention heads (default 12).
    pub heads: usize,
    /// Vocabulary (default 50257).
    pub vocab: usize,
    /// Maximum positions (default 1024).
    pub context: usize,
    /// Batch size (default 1).
    pub batch: usize,
    /// LayerNorm epsilon (default 1e-5).
    pub layer_norm_eps: f32,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self {
            layers: 12,
            hidden: 768,
            heads: 12,
            vocab: 50257,
            context: 1024,
            batch: 1,
            layer_norm_eps: 1e-5,
        }
    }
}

/// BERT hyper-parameters; [`Default`] is BERT-base (uncased) at batch 8, sequence 128.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Encoder layers (default 12).
    pub layers: usize,
    /// Hidden size (default 768).
    pub hidden: usize,
    /// Attention heads (default 12).
    pub heads: usize,
    /// Feed-forward size (default 3072).
    pub intermediate: usize,
    /// Vocabulary (default 30522).
    pub vocab: usize,
    /// Maximum positions (default 512).
    pub max_positions: usize,
    /// Token types (default 2).
    pub type_vocab: usize,
    /// Batch size (default 8).
    pub batch: usize,
    /// Sequence length (default 128).
    pub seq_len: usize,
    /// LayerNorm epsilon (default 1e-12).
    pub layer_norm_eps: f32,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            layers: 12,
            hidden: 768,
            heads: 12,
            intermediate: 3072,
            vocab: 30522,
            max_positions: 512,
            type_vocab: 2,
            batch: 8,
            seq_len: 128,
            layer_norm_eps: 1e-12,
        }
    }
}

/// ResNet (bottleneck) hyper-parameters; [`Default`] is ResNet-50 at batch 8, 224×224.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage (default `[3, 4, 6, 3]`).
    pub blocks: [usize; 4],
    /// Channels of the stem / first stage's bottleneck (default 64).
    pub width: usize,
    /// Output classes (default 1000).
    pub classes: usize,
    /// Batch size (default 8).
    pub batch: usize,
    /// Image height and width (default 224).
    pub image: usize,
    /// BatchNorm epsilon (default 1e-5).
    pub batch_norm_eps: f32,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            blocks: [3, 4, 6, 3],
            width: 64,
            classes: 1000,
            batch: 8,
            image: 224,
            batch_norm_eps: 1e-5,
        }
    }
}

/// Size overrides for [`by_name`]; `None` keeps the builder's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSize {
    /// Batch size.
    pub batch: Option<usize>,
    /// Prompt / sequence length (GPT-2 prefill default 128, BERT 128).
    pub seq_len: Option<usize>,
    /// KV-cache length L of a GPT-2 decode step (default 1023).
    pub kv_len: Option<usize>,
    /// Number of layers (GPT-2, BERT).
    pub layers: Option<usize>,
    /// Image size (ResNet).
    pub image: Option<usize>,
}

/// Names [`by_name`] accepts.
pub const MODEL_NAMES: [&str; 6] = [
    "gpt2-decode",
    "gpt2-prefill",
    "llama-decode",
    "llama-prefill",
    "bert",
    "resnet50",
];

/// Builds a model graph by name (one of [`MODEL_NAMES`]: `llama-*` is the 135M-class
/// [`LlamaConfig::default`]), with the defaults of its config type unless `size` overrides them.
pub fn by_name(name: &str, size: &ModelSize) -> Result<Graph, Error> {
    match name {
        "gpt2-decode" | "gpt2-prefill" => {
            let mut c = Gpt2Config::default();
            if let Some(b) = size.batch {
                c.batch = b;
            }
            if let Some(l) = size.layers {
                c.layers = l;
            }
            if name == "gpt2-decode" {
                gpt2_decode(&c, size.kv_len.unwrap_or(1023))
            } else {
                gpt2_prefill(&c, size.seq_len.unwrap_or(128))
            }
        }
        "llama-decode" | "llama-prefill" => {
            let mut c = LlamaConfig::default();
            if let Some(b) = size.batch {
                c.batch = b;
            }
            if let Some(l) = size.layers {
                c.layers = l;
            }
            if name == "llama-decode" {
                llama_decode(&c, size.kv_len.unwrap_or(1023))
            } else {
                llama_prefill(&c, size.seq_len.unwrap_or(128))
            }
        }
        "bert" => {
            let mut c = BertConfig::default();
            if let Some(b) = size.batch {
                c.batch = b;
            }
            if let Some(s) = size.seq_len {
                c.seq_len = s;
            }
            if let Some(l) = size.layers {
                c.layers = l;
            }
            bert(&c)
        }
        "resnet50" => {
            let mut c = ResNetConfig::default();
            if let Some(b) = size.batch {
                c.batch = b;
            }
            if let Some(i) = size.image {
                c.image = i;
            }
            resnet(&c)
        }
        other => Err(Error::UnknownModel {
            name: other.to_owned(),
            known: MODEL_NAMES.join(", "),
        }),
    }
}

/// Appends nodes with the current phase, module path and layer.
struct Builder {
    g: Graph,
    phase: Phase,
    module: String,
    layer: Option<u32>,
    /// What the graph adds around its layers: with [`Head::Batched`], decode steps attend with
    /// one [`OpKind::CachedAttention`] per layer (see [`Builder::cached_attention`]); with
    /// [`Head::Last`], the head reads only the last position (a prefill whose caller wants the
    /// next token).
    head: Head,
    /// A batched prefill's prompt lengths, in the order their tokens are concatenated (empty:
    /// one sequence). See [`Builder::cached_attention`] and [`Builder::last_position`].
    pieces: Vec<usize>,
}

impl Builder {
    fn new(name: &str, phase: Phase) -> Self {
        Self {
            g: Graph::new(name),
            phase,
            module: String::new(),
            layer: None,
            head: Head::All,
            pieces: Vec::new(),
        }
    }

    fn sem(&self, residency: Residency) -> Semantics {
        Semantics {
            phase: self.phase,
            residency: Some(residency),
            module_path: self.module.clone(),
            layer: self.layer,
            ..Semantics::default()
        }
    }

    fn source(
        &mut self,
        name: String,
        op: OpKind,
        shape: &[usize],
        dtype: DType,
        residency: Residency,
    ) -> Result<TensorRef, GraphError> {
        let sem = self.sem(residency);
        let id =
            self.g
                .add_with_outputs(name, op, vec![], vec![TensorMeta::new(shape, dtype)], sem)?;
        Ok(id.into())
    }

    fn input(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<TensorRef, GraphError> {
        self.source(
            name.to_owned(),
            OpKind::Input,
            shape,
            dtype,
            Residency::EphemeralActivation,
        )
    }

    /// A trainable weight named `<module>.<leaf>`.
    fn param(&mut self, leaf: &str, shape: &[usize]) -> Result<TensorRef, GraphError> {
        self.weight(leaf, shape, true)
    }

    fn weight(
        &mut self,
        leaf: &str,
        shape: &[usize],
        trainable: bool,
    ) -> Result<TensorRef, GraphError> {
        let name = if self.module.is_empty() {
            leaf.to_owned()
        } else {
            format!("{}.{leaf}", self.module)
        };
        self.source(
            name,
            OpKind::Parameter { trainable },
            shape,
            DType::F32,
            Residency::PersistentWeight,
        )
    }

    fn op(
        &mut self,
        leaf: &str,
        op: OpKind,
        inputs: Vec<TensorRef>,
    ) -> Result<TensorRef, GraphError> {
        Ok(self
            .op_r(leaf, op, inputs, Residency::EphemeralActivation)?
            .into())
    }

    fn op_r(
        &mut self,
        leaf: &str,
        op: OpKind,
        inputs: Vec<TensorRef>,
        residency: Residency,
    ) -> Result<crate::graph::NodeId, GraphError> {
        let name = if self.module.is_empty() {
            leaf.to_owned()
        } else {
            format!("{}.{leaf}", self.module)
        };
        let sem = self.sem(residency);
        self.g.add(name, op, inputs, sem)
    }

    fn at(&mut self, module: impl Into<String>) {
        self.module = module.into();
    }

    /// Nodes added from now on belong to layer `i` (`None`: to no layer). An index beyond
    /// `u32` is kept out of range, so the graph refuses it instead of wrapping.
    fn in_layer(&mut self, i: Option<usize>) {
        self.layer = i.map(|i| u32::try_from(i).unwrap_or(u32::MAX));
    }

    /// `x` (`[B, S, D]`), or only its last position `[B, 1, D]` when the head reads that alone.
    fn last_position(&mut self, x: TensorRef, s: usize) -> Result<TensorRef, GraphError> {
        if self.head != Head::Last {
            return Ok(x);
        }
        if self.pieces.len() > 1 {
            // A batched prefill: each prompt's last position, one row per prompt (`[N, 1, D]`).
            let mut rows = Vec::with_capacity(self.pieces.len());
            let mut end = 0;
            for (i, l) in self.pieces.clone().into_iter().enumerate() {
                end += l;
                let op = OpKind::Slice {
                    axis: 1,
                    start: end - 1,
                    end,
                };
                rows.push(self.op(&format!("last_position.seq{i}"), op, vec![x])?);
            }
            return self.op("last_positions", OpKind::Concat { axis: 0 }, rows);
        }
        let op = OpKind::Slice {
            axis: 1,
            start: s.saturating_sub(1),
            end: s,
        };
        self.op("last_position", op, vec![x])
    }

    /// One layer's attention against its KV cache, for prefill or a decode step.
    ///
    /// `kv` empty: prefill; the new keys and values make the cache (`present`). One length `L`:
    /// a decode step against the cache `past` (`[2, batch, L, width]`, slot 0), the new keys and
    /// values appended to it. Several: a decode step of `kv.len()` sequences, one row each of
    /// `q`, `k`, `v` (`[N, 1, ·]`): the rows are split apart, each sequence attends over its own
    /// cache (slot `i`, `[2, 1, kv[i], width]`, nodes under `<module>.seq<i>`), and the outputs
    /// are concatenated back in sequence order. Each sequence's nodes are the one-sequence
    /// step's, so its rows see the same operations as when it runs alone.
    ///
    /// A batched decode graph ([`gpt2_decode_batch`], [`llama_decode_batch`]) instead gives each
    /// layer one [`OpKind::CachedAttention`] over `q`, `k`, `v` and every sequence's cache (slot
    /// `i`, `[2, 1, kv[i], width]`, under `<module>.seq<i>`), whatever the number of sequences:
    /// it appends each row to its cache in place and attends as the one-sequence step's
    /// attention does, so no updated cache is returned.
    fn cached_attention(
        &mut self,
        past: &str,
        layer: usize,
        [q, k, v]: [TensorRef; 3],
        (kv, batch, width): (&[usize], usize, usize),
        attn: &OpKind,
    ) -> Result<CachedAttention, GraphError> {
        let present = |b: &mut Self, ins: Vec<TensorRef>| -> Result<TensorRef, GraphError> {
            Ok(b.op_r(
                "present",
                OpKind::KvCacheAppend,
                ins,
                Residency::StatefulKvCache,
            )?
            .into())
        };
        let one = |b: &mut Self, slot: usize, l: usize, rows: usize, [q, k, v]: [TensorRef; 3]| {
            let slot32 = u32::try_from(slot).unwrap_or(u32::MAX);
            let layer32 = u32::try_from(layer).unwrap_or(u32::MAX);
            let past = b.source(
                past.to_owned(),
                OpKind::KvCache {
                    layer: layer32,
                    slot: slot32,
                },
                &[2, rows, l, width],
                DType::F32,
                Residency::StatefulKvCache,
            )?;
            let p = present(b, vec![past, k, v])?;
            let kr = b.op("read_k", OpKind::KvCacheRead { part: KvPart::Key }, vec![p])?;
            let vr = b.op(
                "read_v",
                OpKind::KvCacheRead {
                    part: KvPart::Value,
                },
                vec![p],
            )?;
            let out = b.op("attention", attn.clone(), vec![q, kr, vr])?;
            Ok::<_, GraphError>((out, p))
        };
        if self.head == Head::Batched && !kv.is_empty() {
            let OpKind::Attention {
                heads,
                kv_heads,
                head_dim,
                scale,
                ..
            } = *attn
            else {
                return Err(GraphError::InvalidAttribute {
                    node: crate::graph::NodeId(self.g.len() as u32),
                    name: past.to_owned(),
                    reason: "a batched decode step needs an attention op".into(),
                });
            };
            let module = self.module.clone();
            let mut ins = vec![q, k, v];
            for (i, &l) in kv.iter().enumerate() {
                self.module = format!("{module}.seq{i}");
                let slot = u32::try_from(i).unwrap_or(u32::MAX);
                let layer = u32::try_from(layer).unwrap_or(u32::MAX);
                let cache = self.source(
                    past.to_owned(),
                    OpKind::KvCache { layer, slot },
                    &[2, 1, l, width],
                    DType::F32,
                    Residency::StatefulKvCache,
                )?;
                ins.push(cache);
            }
            self.module = module;
            let op = OpKind::CachedAttention {
                heads,
                kv_heads,
                head_dim,
                scale,
            };
            let out = self
                .op_r("attention", op, ins, Residency::StatefulKvCache)?
                .into();
            return Ok(CachedAttention {
                out,
                presents: Vec::new(),
            });
        }
        match kv {
            [] if self.pieces.len() > 1 => {
                // A batched prefill: each prompt's rows attend among themselves as they would
                // alone, and make a fresh cache of their own (slot `i`, from an empty one).
                let sizes = self.pieces.clone();
                let (qs, ks, vs) = self.split_qkv([q, k, v], 1, &sizes)?;
                let module = self.module.clone();
                let layer32 = u32::try_from(layer).unwrap_or(u32::MAX);
                let mut outs = Vec::with_capacity(sizes.len());
                let mut presents = Vec::with_capacity(sizes.len());
                for i in 0..sizes.len() {
                    self.module = format!("{module}.seq{i}");
                    let [q, k, v] = [qs, ks, vs].map(|n| TensorRef::new(n, i as u32));
                    let empty = self.source(
                        past.to_owned(),
                        OpKind::KvCache {
                            layer: layer32,
                            slot: u32::try_from(i).unwrap_or(u32::MAX),
                        },
                        &[2, batch, 0, width],
                        DType::F32,
                        Residency::StatefulKvCache,
                    )?;
                    presents.push(present(self, vec![empty, k, v])?);
                    outs.push(self.op("attention", attn.clone(), vec![q, k, v])?);
                }
                self.module = module;
                let out = self.op("attention_rows", OpKind::Concat { axis: 1 }, outs)?;
                Ok(CachedAttention { out, presents })
            }
            [] => {
                let p = present(self, vec![k, v])?;
                let out = self.op("attention", attn.clone(), vec![q, k, v])?;
                Ok(CachedAttention {
                    out,
                    presents: vec![p],
                })
            }
            [l] => {
                let (out, p) = one(self, 0, *l, batch, [q, k, v])?;
                Ok(CachedAttention {
                    out,
                    presents: vec![p],
                })
            }
            lens => {
                let (qs, ks, vs) = self.split_qkv([q, k, v], 0, &vec![1; lens.len()])?;
                let module = self.module.clone();
                let mut outs = Vec::with_capacity(lens.len());
                let mut presents = Vec::with_capacity(lens.len());
                for (i, &l) in lens.iter().enumerate() {
                    self.module = format!("{module}.seq{i}");
                    let rows = [qs, ks, vs].map(|n| TensorRef::new(n, i as u32));
                    let (out, p) = one(self, i, l, 1, rows)?;
                    outs.push(out);
                    presents.push(p);
                }
                self.module = module;
                let out = self.op("attention_rows", OpKind::Concat { axis: 0 }, outs)?;
                Ok(CachedAttention { out, presents })
            }
        }
    }

    /// `q`, `k` and `v` split along `axis` into parts of `sizes` (`split_q`, `split_k`,
    /// `split_v`), one per sequence.
    fn split_qkv(
        &mut self,
        [q, k, v]: [TensorRef; 3],
        axis: usize,
        sizes: &[usize],
    ) -> Result<
        (
            crate::graph::NodeId,
            crate::graph::NodeId,
            crate::graph::NodeId,
        ),
        GraphError,
    > {
        let mut split = |t: TensorRef, leaf: &str| {
            self.op_r(
                leaf,
                OpKind::Split {
                    axis,
                    sizes: sizes.to_vec(),
                },
                vec![t],
                Residency::EphemeralActivation,
            )
        };
        Ok((
            split(q, "split_q")?,
            split(k, "split_k")?,
            split(v, "split_v")?,
        ))
    }

    /// A cache's keys and values (`read_k`, `read_v`), for a move.
    fn read_whole(&mut self, past: TensorRef) -> Result<(TensorRef, TensorRef), GraphError> {
        let k = self.op(
            "read_k",
            OpKind::KvCacheRead { part: KvPart::Key },
            vec![past],
        )?;
        let v = self.op(
            "read_v",
            OpKind::KvCacheRead {
                part: KvPart::Value,
            },
            vec![past],
        )?;
        Ok((k, v))
    }

    /// `module.{weight,bias}` then LayerNorm.
    fn layer_norm(
        &mut self,
        module: &str,
        x: TensorRef,
        d: usize,
        eps: f32,
    ) -> Result<TensorRef, GraphError> {
        let saved = std::mem::replace(&mut self.module, module.to_owned());
        let w = self.param("weight", &[d])?;
        let b = self.param("bias", &[d])?;
        let y = self.op("out", OpKind::LayerNorm { eps: Scalar(eps) }, vec![x, w, b]);
        self.module = saved;
        y
    }

    /// `module.{weight,bias}` then Linear.
    fn linear(
        &mut self,
        module: &str,
        x: TensorRef,
        din: usize,
        dout: usize,
        layout: WeightLayout,
    ) -> Result<TensorRef, GraphError> {
        self.linear_with(module, x, (din, dout), layout, true)
    }

    /// `module.weight` (and `module.bias` when `bias`) then Linear from `dims.0` to `dims.1`.
    fn linear_with(
        &mut self,
        module: &str,
        x: TensorRef,
        (din, dout): (usize, usize),
        layout: WeightLayout,
        bias: bool,
    ) -> Result<TensorRef, GraphError> {
        let saved = std::mem::replace(&mut self.module, module.to_owned());
        let wshape = match layout {
            WeightLayout::InOut => [din, dout],
            WeightLayout::OutIn => [dout, din],
        };
        let mut ins = vec![x, self.param("weight", &wshape)?];
        if bias {
            ins.push(self.param("bias", &[dout])?);
        }
        let y = self.op("out", OpKind::Linear { bias, layout }, ins);
        self.module = saved;
        y
    }
}

/// What [`Builder::cached_attention`] adds: the attention output and each sequence's updated
/// cache (one for prefill and one-sequence steps).
struct CachedAttention {
    out: TensorRef,
    presents: Vec<TensorRef>,
}

fn check(cond: bool, what: &str) -> Result<(), Error> {
    if cond {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            reason: what.to_owned(),
        })
    }
}

fn check_gpt2(c: &Gpt2Config, tokens: usize) -> Result<(), Error> {
    check(
        c.layers > 0 && c.batch > 0 && c.vocab > 0 && c.context > 0,
        "gpt2: layers, batch, vocab and context must be positive",
    )?;
    check(tokens > 0, "gpt2: sequence length must be positive")?;
    check(
        c.heads > 0 && c.hidden % c.heads == 0 && c.hidden > 0,
        "gpt2: hidden must be a positive multiple of heads",
    )?;
    // The MLP is 4·hidden wide; larger tensors are refused by the graph's own size checks.
    check(
        c.hidden.checked_mul(4).is_some(),
        "gpt2: hidden is too large",
    )
}

/// GPT-2 prefill over a prompt of `seq_len` tokens: logits `[B, S, V]` and each layer's KV cache.
pub fn gpt2_prefill(c: &Gpt2Config, seq_len: usize) -> Result<Graph, Error> {
    check_gpt2(c, seq_len)?;
    gpt2(c, seq_len, &[], (Head::All, &[]))
}

/// [`gpt2_prefill`] whose LM head reads only the last position (a `Slice` of the final norm's
/// output): logits `[B, 1, V]`, the next token's, and each layer's KV cache; the head's work is
/// one row's, not `S`.
pub fn gpt2_prefill_last(c: &Gpt2Config, seq_len: usize) -> Result<Graph, Error> {
    check_gpt2(c, seq_len)?;
    gpt2(c, seq_len, &[], (Head::Last, &[]))
}

/// A prefill of several prompts at once (lengths `lens`, their tokens concatenated in that order:
/// `input_ids` and `position_ids` `[1, Σ lens]`, each prompt's positions from 0): logits
/// `[N, 1, V]`, row `i` the next token's of prompt `i`, then each layer's caches. Each prompt's
/// rows go through the operations [`gpt2_prefill_last`] gives them alone (the products, norms and
/// activations row by row, the attention among its own rows), and its cache is made in slot `i`
/// (a `present` appended to an empty [`OpKind::KvCache`] of that slot). `c.batch` must be 1; one
/// length gives [`gpt2_prefill_last`]'s graph.
pub fn gpt2_prefill_batch(c: &Gpt2Config, lens: &[usize]) -> Result<Graph, Error> {
    let total = check_prefill_batch(c.batch, lens)?;
    if let [l] = lens {
        return gpt2_prefill_last(c, *l);
    }
    check_gpt2(c, total)?;
    for &l in lens {
        check(l <= c.context, "gpt2: a prompt longer than the context")?;
    }
    gpt2(c, total, &[], (Head::Last, lens))
}

/// A batched prefill's prompts: 1 to [`MAX_DECODE_BATCH`], none empty, over models of batch 1;
/// their total length.
fn check_prefill_batch(batch: usize, lens: &[usize]) -> Result<usize, Error> {
    check(
        batch == 1,
        "a batched prefill takes models of batch 1 (the prompts' tokens in one row)",
    )?;
    check(
        !lens.is_empty() && lens.len() <= MAX_DECODE_BATCH && lens.iter().all(|&l| l > 0),
        &format!("a batched prefill has 1 to {MAX_DECODE_BATCH} prompts, none empty"),
    )?;
    lens.iter()
        .try_fold(0usize, |t, &l| t.checked_add(l))
        .ok_or_else(|| Error::InvalidConfig {
            reason: "a batched prefill's prompts overflow".into(),
        })
}

/// What a decoder graph's builder adds around its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Logits at every position; a decode step's attention per sequence.
    All,
    /// Logits at the last position only.
    Last,
    /// A batched decode step: one [`OpKind::CachedAttention`] per layer.
    Batched,
}

/// One GPT-2 decode step against KV caches of length `kv_len`: logits `[B, 1, V]` and the
/// updated caches.
pub fn gpt2_decode(c: &Gpt2Config, kv_len: usize) -> Result<Graph, Error> {
    check_gpt2(c, 1)?;
    gpt2(c, 1, &[kv_len], (Head::All, &[]))
}

/// One GPT-2 decode step of several sequences at once, sequence `i` against KV caches of
/// length `kv_lens[i]` (slot `i`, see the module docs): logits `[N, 1, V]` (row `i` is
/// sequence `i`'s), its only output; each layer's [`OpKind::CachedAttention`] extends the
/// sequences' caches in place. `c.batch` must be 1.
pub fn gpt2_decode_batch(c: &Gpt2Config, kv_lens: &[usize]) -> Result<Graph, Error> {
    check_batch(c.batch, kv_lens)?;
    check_gpt2(c, 1)?;
    gpt2(c, 1, kv_lens, (Head::Batched, &[]))
}

/// A batched decode step's sequences: 1 to [`MAX_DECODE_BATCH`], over models of batch 1.
fn check_batch(batch: usize, kv_lens: &[usize]) -> Result<(), Error> {
    check(
        batch == 1,
        "a batched decode step takes models of batch 1 (one row per sequence)",
    )?;
    check(
        !kv_lens.is_empty() && kv_lens.len() <= MAX_DECODE_BATCH,
        &format!("a batched decode step has 1 to {MAX_DECODE_BATCH} sequences"),
    )
}

/// Most sequences one batched decode step ([`gpt2_decode_batch`], [`llama_decode_batch`])
/// takes.
pub const MAX_DECODE_BATCH: usize = 256;

fn gpt2(
    c: &Gpt2Config,
    s: usize,
    kv: &[usize],
    (head, pieces): (Head, &[usize]),
) -> Result<Graph, Error> {
    let decode = !kv.is_empty();
    let phase = if decode {
        Phase::Decode
    } else {
        Phase::Prefill
    };
    let name = if decode {
        "gpt2-decode"
    } else {
        "gpt2-prefill"
    };
    let (bsz, d, hd) = (c.batch * kv.len().max(1), c.hidden, c.hidden / c.heads);
    let mut b = Builder::new(name, Phase::Embedding);
    b.head = head;
    b.pieces = pieces.to_vec();
    let ids = b.input("input_ids", &[bsz, s], DType::I64)?;
    let pos = b.input("position_ids", &[bsz, s], DType::I64)?;
    b.at("wte");
    let wte = b.weight("weight", &[c.vocab, d], true)?;
    let tok = b.op("embed", OpKind::Embedding, vec![ids, wte])?;
    b.at("wpe");
    let wpe = b.param("weight", &[c.context, d])?;
    let pe = b.op("embed", OpKind::Embedding, vec![pos, wpe])?;
    b.at("");
    let mut h = b.op("embed_sum", OpKind::Add, vec![tok, pe])?;
    b.phase = phase;
    let mut presents: Vec<TensorRef> = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        b.in_layer(Some(i));
        let p = format!("h.{i}");
        let x = b.layer_norm(&format!("{p}.ln_1"), h, d, c.layer_norm_eps)?;
        b.at(format!("{p}.attn"));
        let qkv = b.linear(
            &format!("{p}.attn.c_attn"),
            x,
            d,
            3 * d,
            WeightLayout::InOut,
        )?;
        let split = b.op_r(
            "split_qkv",
            OpKind::Split {
                axis: 2,
                sizes: vec![d, d, d],
            },
            vec![qkv],
            Residency::EphemeralActivation,
        )?;
        let (q, k, v) = (
            TensorRef::new(split, 0),
            TensorRef::new(split, 1),
            TensorRef::new(split, 2),
        );
        let attn_op = OpKind::Attention {
            heads: c.heads,
            kv_heads: None,
            head_dim: hd,
            causal: true,
            scale: Scalar(1.0 / (hd as f32).sqrt()),
        };
        let a = b.cached_attention(
            &format!("{p}.attn.past"),
            i,
            [q, k, v],
            (kv, c.batch, d),
            &attn_op,
        )?;
        presents.extend(a.presents);
        let a = a.out;
        let proj = b.linear(&format!("{p}.attn.c_proj"), a, d, d, WeightLayout::InOut)?;
        b.at(p.clone());
        let h1 = b.op("attn_residual", OpKind::Add, vec![h, proj])?;
        let x2 = b.layer_norm(&format!("{p}.ln_2"), h1, d, c.layer_norm_eps)?;
        let fc = b.linear(&format!("{p}.mlp.c_fc"), x2, d, 4 * d, WeightLayout::InOut)?;
        b.at(format!("{p}.mlp"));
        let g = b.op(
            "gelu",
            OpKind::Gelu {
                approximate: GeluApprox::Tanh,
            },
            vec![fc],
        )?;
        let out = b.linear(&format!("{p}.mlp.c_proj"), g, 4 * d, d, WeightLayout::InOut)?;
        b.at(p);
        h = b.op("mlp_residual", OpKind::Add, vec![h1, out])?;
    }
    b.in_layer(None);
    let hf = b.layer_norm("ln_f", h, d, c.layer_norm_eps)?;
    let hf = b.last_position(hf, s)?;
    b.at("lm_head");
    let logits = b.op(
        "logits",
        OpKind::MatMul { transpose_b: true },
        vec![hf, wte],
    )?;
    let mut g = b.g;
    g.outputs.push(logits);
    g.outputs.extend(presents);
    Ok(g)
}

/// A sequence's KV cache moving between workers, for a run of its own: per layer `i`, the cache
/// `h.{i}.attn.past` ([`OpKind::KvCache`], slot 0, `[2, 1, len, width]`) is read back as keys and
/// values and appended whole to a fresh cache (`h.{i}.attn.present`, [`OpKind::KvCacheAppend`],
/// as prefill makes one). Placed with the `past` nodes and their reads on the worker that holds
/// the cache and the appends on the one that takes it, one run copies every layer, each layer
/// travelling while the next is read. Outputs: the `present` of each layer.
///
/// This is how a prefill worker hands a finished prefill's cache to a decode worker without the
/// decode worker taking part in the prefill itself.
pub fn kv_move(layers: usize, width: usize, len: usize) -> Result<Graph, Error> {
    check(
        layers > 0 && width > 0 && len > 0,
        "kv_move: layers, width and length must be positive",
    )?;
    let mut b = Builder::new("kv-move", Phase::Decode);
    let mut presents = Vec::with_capacity(layers);
    for i in 0..layers {
        b.in_layer(Some(i));
        b.at(format!("h.{i}.attn"));
        let layer = u32::try_from(i).unwrap_or(u32::MAX);
        let past = b.source(
            format!("h.{i}.attn.past"),
            OpKind::KvCache { layer, slot: 0 },
            &[2, 1, len, width],
            DType::F32,
            Residency::StatefulKvCache,
        )?;
        let (k, v) = b.read_whole(past)?;
        let p = b.op_r(
            "present",
            OpKind::KvCacheAppend,
            vec![k, v],
            Residency::StatefulKvCache,
        )?;
        presents.push(p.into());
    }
    let mut g = b.g;
    g.outputs = presents;
    Ok(g)
}

/// Several sequences' KV caches moving together, for a run of its own: [`kv_move`] for each of
/// `lens` (sequence `j`'s caches are slot `j`, `[2, 1, lens[j], width]`), each appended to an
/// empty cache of its slot (`[2, 1, 0, width]`: placed with the appends, where the caches go).
/// Outputs: the `present` of each layer and sequence. One length gives [`kv_move`]'s graph.
pub fn kv_move_batch(layers: usize, width: usize, lens: &[usize]) -> Result<Graph, Error> {
    if let [len] = lens {
        return kv_move(layers, width, *len);
    }
    check(
        layers > 0 && width > 0 && lens.len() <= MAX_DECODE_BATCH && lens.iter().all(|&l| l > 0),
        &format!(
            "kv_move_batch: layers and width positive, 1 to {MAX_DECODE_BATCH} lengths, none 0"
        ),
    )?;
    check(!lens.is_empty(), "kv_move_batch: no sequence")?;
    let mut b = Builder::new("kv-move", Phase::Decode);
    let mut presents = Vec::with_capacity(layers * lens.len());
    for i in 0..layers {
        b.in_layer(Some(i));
        let layer = u32::try_from(i).unwrap_or(u32::MAX);
        for (j, &len) in lens.iter().enumerate() {
            b.at(format!("h.{i}.attn.seq{j}"));
            let slot = u32::try_from(j).unwrap_or(u32::MAX);
            let cache = |b: &mut Builder, l: usize| {
                b.source(
                    format!("h.{i}.attn.past"),
                    OpKind::KvCache { layer, slot },
                    &[2, 1, l, width],
                    DType::F32,
                    Residency::StatefulKvCache,
                )
            };
            let past = cache(&mut b, len)?;
            let (k, v) = b.read_whole(past)?;
            let empty = cache(&mut b, 0)?;
            let p = b.op_r(
                "present",
                OpKind::KvCacheAppend,
                vec![empty, k, v],
                Residency::StatefulKvCache,
            )?;
            presents.push(p.into());
        }
    }
    let mut g = b.g;
    g.outputs = presents;
    Ok(g)
}

/// BERT encoder with pooler (`BertModel`): last hidden state `[B, S, D]` and pooled `[B, D]`.
pub fn bert(c: &BertConfig) -> Result<Graph, Error> {
    check(
        c.layers > 0 && c.batch > 0 && c.seq_len > 0 && c.vocab > 0,
        "bert: layers, batch, seq_len, vocab must be positive",
    )?;
    check(
        c.heads > 0 && c.hidden > 0 && c.hidden % c.heads == 0,
        "bert: hidden must be a positive multiple of heads",
    )?;
    check(
        c.seq_len <= c.max_positions && c.type_vocab > 0 && c.intermediate > 0,
        "bert: seq_len must not exceed max_positions",
    )?;
    let (bsz, s, d, ff) = (c.batch, c.seq_len, c.hidden, c.intermediate);
    let hd = d / c.heads;
    let eps = c.layer_norm_eps;
    let mut b = Builder::new("bert", Phase::Embedding);
    let ids = b.input("input_ids", &[bsz, s], DType::I64)?;
    let types = b.input("token_type_ids", &[bsz, s], DType::I64)?;
    let pos = b.input("position_ids", &[bsz, s], DType::I64)?;
    b.at("embeddings.word_embeddings");
    let we = b.param("weight", &[c.vocab, d])?;
    let x1 = b.op("embed", OpKind::Embedding, vec![ids, we])?;
    b.at("embeddings.position_embeddings");
    let pe = b.param("weight", &[c.max_positions, d])?;
    let x2 = b.op("embed", OpKind::Embedding, vec![pos, pe])?;
    b.at("embeddings.token_type_embeddings");
    let te = b.param("weight", &[c.type_vocab, d])?;
    let x3 = b.op("embed", OpKind::Embedding, vec![types, te])?;
    b.at("embeddings");
    let sum = b.op("sum_word_position", OpKind::Add, vec![x1, x2])?;
    let sum = b.op("sum_token_type", OpKind::Add, vec![sum, x3])?;
    let mut h = b.layer_norm("embeddings.LayerNorm", sum, d, eps)?;
    b.phase = Phase::Prefill;
    for i in 0..c.layers {
        b.in_layer(Some(i));
        let p = format!("encoder.layer.{i}");
        let sa = format!("{p}.attention.self");
        let q = b.linear(&format!("{sa}.query"), h, d, d, WeightLayout::OutIn)?;
        let k = b.linear(&format!("{sa}.key"), h, d, d, WeightLayout::OutIn)?;
        let v = b.linear(&format!("{sa}.value"), h, d, d, WeightLayout::OutIn)?;
        b.at(sa);
        let a = b.op(
            "attention",
            OpKind::Attention {
                heads: c.heads,
                kv_heads: None,
                head_dim: hd,
                causal: false,
                scale: Scalar(1.0 / (hd as f32).sqrt()),
            },
            vec![q, k, v],
        )?;
        let o = b.linear(
            &format!("{p}.attention.output.dense"),
            a,
            d,
            d,
            WeightLayout::OutIn,
        )?;
        b.at(format!("{p}.attention.output"));
        let r = b.op("residual", OpKind::Add, vec![o, h])?;
        let h1 = b.layer_norm(&format!("{p}.attention.output.LayerNorm"), r, d, eps)?;
        let f = b.linear(
            &format!("{p}.intermediate.dense"),
            h1,
            d,
            ff,
            WeightLayout::OutIn,
        )?;
        b.at(format!("{p}.intermediate"));
        let g = b.op(
            "gelu",
            OpKind::Gelu {
                approximate: GeluApprox::Erf,
            },
            vec![f],
        )?;
        let o2 = b.linear(&format!("{p}.output.dense"), g, ff, d, WeightLayout::OutIn)?;
        b.at(format!("{p}.output"));
        let r2 = b.op("residual", OpKind::Add, vec![o2, h1])?;
        h = b.layer_norm(&format!("{p}.output.LayerNorm"), r2, d, eps)?;
    }
    b.in_layer(None);
    b.at("pooler");
    let cls = b.op(
        "cls",
        OpKind::Slice {
            axis: 1,
            start: 0,
            end: 1,
        },
        vec![h],
    )?;
    let cls = b.op(
        "cls_flat",
        OpKind::Reshape {
            shape: vec![bsz, d],
        },
        vec![cls],
    )?;
    let pd = b.linear("pooler.dense", cls, d, d, WeightLayout::OutIn)?;
    b.at("pooler");
    let pooled = b.op("activation", OpKind::Tanh, vec![pd])?;
    let mut g = b.g;
    g.outputs.push(h);
    g.outputs.push(pooled);
    Ok(g)
}

/// ResNet with bottleneck blocks (torchvision v1.5: stride on the 3×3 conv): logits `[B, classes]`.
pub fn resnet(c: &ResNetConfig) -> Result<Graph, Error> {
    check(
        c.batch > 0 && c.width > 0 && c.classes > 0,
        "resnet: batch, width, classes must be positive",
    )?;
    check(c.image >= 32, "resnet: image must be at least 32 pixels")?;
    // The last stage is 8·width planes, expanded 4×; larger tensors are refused by the graph's
    // own size checks.
    check(
        c.width.checked_mul(32).is_some(),
        "resnet: width is too large",
    )?;
    let eps = c.batch_norm_eps;
    let mut b = Builder::new("resnet50", Phase::Vision);
    let x = b.input("images", &[c.batch, 3, c.image, c.image], DType::F32)?;
    let x = conv_bn(&mut b, "", "conv1", "bn1", x, 3, c.width, 7, 2, eps)?;
    b.at("");
    let x = b.op("relu", OpKind::Relu, vec![x])?;
    let mut x = b.op(
        "maxpool",
        OpKind::MaxPool2d {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        },
        vec![x],
    )?;
    let mut inplanes = c.width;
    for (stage, &blocks) in c.blocks.iter().enumerate() {
        let planes = c.width << stage;
        for blk in 0..blocks {
            let stride = if stage > 0 && blk == 0 { 2 } else { 1 };
            let p = format!("layer{}.{blk}", stage + 1);
            let y = conv_bn(&mut b, &p, "conv1", "bn1", x, inplanes, planes, 1, 1, eps)?;
            b.at(p.clone());
            let y = b.op("relu1", OpKind::Relu, vec![y])?;
            let y = conv_bn(
                &mut b, &p, "conv2", "bn2", y, planes, planes, 3, stride, eps,
            )?;
            b.at(p.clone());
            let y = b.op("relu2", OpKind::Relu, vec![y])?;
            let y = conv_bn(&mut b, &p, "conv3", "bn3", y, planes, planes * 4, 1, 1, eps)?;
            let shortcut = if blk == 0 {
                conv_bn(
                    &mut b,
                    &p,
                    "downsample.0",
                    "downsample.1",
                    x,
                    inplanes,
                    planes * 4,
                    1,
                    stride,
                    eps,
                )?
            } else {
                x
            };
            b.at(p.clone());
            let s = b.op("residual", OpKind::Add, vec![y, shortcut])?;
            x = b.op("relu3", OpKind::Relu, vec![s])?;
            inplanes = planes * 4;
        }
    }
    b.at("");
    let pooled = b.op("avgpool", OpKind::GlobalAvgPool2d, vec![x])?;
    let flat = b.op(
        "flatten",
        OpKind::Reshape {
            shape: vec![c.batch, inplanes],
        },
        vec![pooled],
    )?;
    let logits = b.linear("fc", flat, inplanes, c.classes, WeightLayout::OutIn)?;
    let mut g = b.g;
    g.outputs.push(logits);
    Ok(g)
}

/// `prefix.conv` (no bias, padding k/2) then `prefix.bn` (inference BatchNorm).
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    b: &mut Builder,
    prefix: &str,
    conv: &str,
    bn: &str,
    x: TensorRef,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    eps: f32,
) -> Result<TensorRef, GraphError> {
    let join = |leaf: &str| {
        if prefix.is_empty() {
            leaf.to_owned()
        } else {
            format!("{prefix}.{leaf}")
        }
    };
    b.at(join(conv));
    let w = b.param("weight", &[cout, cin, k, k])?;
    let y = b.op(
        "out",
        OpKind::Conv2d {
            stride: [stride, stride],
            padding: [k / 2, k / 2],
            dilation: [1, 1],
            groups: 1,
            bias: false,
        },
        vec![x, w],
    )?;
    b.at(join(bn));
    let gamma = b.param("weight", &[cout])?;
    let beta = b.param("bias", &[cout])?;
    let mean = b.weight("running_mean", &[cout], false)?;
    let var = b.weight("running_var", &[cout], false)?;
    b.op(
        "out",
        OpKind::BatchNorm { eps: Scalar(eps) },
        vec![y, gamma, beta, mean, var],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::NodeId;

    /// A batched prefill: logits `[N, 1, V]`; per layer one cache per prompt (slot `i`, empty)
    /// and one `present` of its length; one prompt is `gpt2_prefill_last`'s graph; no prompt,
    /// an empty one or a model of batch 2 is refused.
    #[test]
    fn a_batched_prefill_makes_one_cache_per_prompt() {
        let c = Gpt2Config {
            layers: 2,
            hidden: 32,
            heads: 2,
            vocab: 50,
            context: 32,
            ..Gpt2Config::default()
        };
        let g = gpt2_prefill_batch(&c, &[3, 5, 2]).unwrap();
        g.validate().unwrap();
        let logits = g.tensor(g.outputs[0]).unwrap();
        assert_eq!(logits.shape, vec![3, 1, 50]);
        assert_eq!(g.outputs.len(), 1 + 2 * 3);
        for (k, p) in g.outputs[1..].iter().enumerate() {
            let n = g.node(p.node).unwrap();
            assert!(matches!(n.op, OpKind::KvCacheAppend));
            assert_eq!(n.outputs[0].shape, vec![2, 1, [3, 5, 2][k % 3], 32]);
            let past = g.node(n.inputs[0].node).unwrap();
            assert!(
                matches!(past.op, OpKind::KvCache { slot, .. } if slot as usize == k % 3),
                "{past:?}"
            );
            assert_eq!(past.outputs[0].shape, vec![2, 1, 0, 32]);
        }
        assert_eq!(
            gpt2_prefill_batch(&c, &[4]).unwrap(),
            gpt2_prefill_last(&c, 4).unwrap()
        );
        assert!(gpt2_prefill_batch(&c, &[]).is_err());
        assert!(gpt2_prefill_batch(&c, &[3, 0]).is_err());
        let two = Gpt2Config { batch: 2, ..c };
        assert!(gpt2_prefill_batch(&two, &[3, 4]).is_err());
    }

    /// A batched KV move: per layer and sequence `j` a cache of slot `j` read whole and appended
    /// to an empty cache of slot `j`; one length is `kv_move`'s graph; a zero length is refused.
    #[test]
    fn a_batched_kv_move_copies_each_sequence_to_its_slot() {
        let g = kv_move_batch(2, 8, &[3, 5]).unwrap();
        g.validate().unwrap();
        assert_eq!(g.outputs.len(), 4);
        for (k, p) in g.outputs.iter().enumerate() {
            let n = g.node(p.node).unwrap();
            let (layer, j) = (k / 2, k % 2);
            assert!(matches!(n.op, OpKind::KvCacheAppend));
            assert_eq!(n.outputs[0].shape, vec![2, 1, [3, 5][j], 8]);
            assert_eq!(n.layer(), Some(layer as u32));
            let empty = g.node(n.inputs[0].node).unwrap();
            assert!(matches!(empty.op, OpKind::KvCache { slot, .. } if slot as usize == j));
            assert_eq!(empty.outputs[0].shape, vec![2, 1, 0, 8]);
        }
        assert_eq!(
            kv_move_batch(2, 8, &[4]).unwrap(),
            kv_move(2, 8, 4).unwrap()
        );
        assert!(kv_move_batch(2, 8, &[4, 0]).is_err());
        assert!(kv_move_batch(2, 8, &[]).is_err());
    }

    /// A KV move reads each layer's cache `[2, 1, L, E]` and appends it whole: its `present`s
    /// have the shape of prefill's, one per layer, each in its layer; empty sizes are refused.
    #[test]
    fn kv_move_copies_every_layer_whole() {
        let g = kv_move(3, 16, 7).unwrap();
        g.validate().unwrap();
        assert_eq!(g.outputs.len(), 3);
        for (i, p) in g.outputs.iter().enumerate() {
            let n = g.node(p.node).unwrap();
            assert!(matches!(n.op, OpKind::KvCacheAppend));
            assert_eq!(n.outputs[0].shape, vec![2, 1, 7, 16]);
            assert_eq!(n.layer(), Some(i as u32));
        }
        let caches = g
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, OpKind::KvCache { slot: 0, .. }))
            .count();
        assert_eq!(caches, 3);
        assert!(kv_move(0, 16, 7).is_err());
        assert!(kv_move(2, 16, 0).is_err());
    }

    /// A batched decode step has one cache per sequence and layer (slot `i`, its own length),
    /// all read and extended by one `CachedAttention` per layer (co-located with it), logits
    /// one row per sequence as its only output, and the shared layers (embeddings, norms,
    /// linear layers) once; of one sequence, the one-sequence step's nodes up to the attention.
    #[test]
    fn batched_decode_steps_have_one_cache_per_sequence() {
        let c = Gpt2Config {
            layers: 2,
            hidden: 32,
            heads: 2,
            vocab: 64,
            context: 64,
            ..Gpt2Config::default()
        };
        let attentions = |g: &Graph| -> Vec<crate::graph::Node> {
            g.nodes()
                .iter()
                .filter(|n| matches!(n.op, OpKind::CachedAttention { .. }))
                .cloned()
                .collect()
        };
        let one = gpt2_decode_batch(&c, &[5]).unwrap();
        one.validate().unwrap();
        assert_eq!(attentions(&one).len(), 2);
        assert!(!one
            .nodes()
            .iter()
            .any(|n| matches!(n.op, OpKind::KvCacheAppend | OpKind::KvCacheRead { .. })));
        let lens = [3usize, 9, 1];
        let g = gpt2_decode_batch(&c, &lens).unwrap();
        g.validate().unwrap();
        let logits = &g.outputs[0];
        assert_eq!(
            g.node(logits.node).unwrap().outputs[0].shape,
            vec![3, 1, 64]
        );
        assert_eq!(g.outputs.len(), 1);
        let colocation = crate::analysis::analyze(&g).colocation;
        for a in attentions(&g) {
            assert_eq!(a.inputs.len(), 3 + lens.len());
            assert_eq!(a.outputs[0].shape, vec![3, 1, 32]);
            assert_eq!(a.residency(), Residency::StatefulKvCache);
            let group = colocation[a.id.index()].clone();
            assert!(group.is_some());
            for (i, t) in a.inputs[3..].iter().enumerate() {
                let cache = g.node(t.node).unwrap();
                assert_eq!(
                    cache.op,
                    OpKind::KvCache {
                        layer: a.layer().unwrap(),
                        slot: i as u32
                    }
                );
                assert_eq!(colocation[t.node.index()], group, "{}", cache.name);
            }
        }
        let mut caches = Vec::new();
        for n in g.nodes() {
            if let OpKind::KvCache { layer, slot } = n.op {
                caches.push((layer, slot, n.outputs[0].shape.clone()));
            }
        }
        let want: Vec<_> = (0..2u32)
            .flat_map(|l| {
                lens.iter()
                    .enumerate()
                    .map(move |(i, &n)| (l, i as u32, vec![2, 1, n, 32]))
            })
            .collect();
        assert_eq!(caches, want);
        let linears = |g: &Graph| {
            g.nodes()
                .iter()
                .filter(|n| matches!(n.op, OpKind::Linear { .. }))
                .count()
        };
        assert_eq!(linears(&g), linears(&gpt2_decode(&c, 3).unwrap()));
        let llama = LlamaConfig {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: Some(2),
            intermediate: 96,
            vocab: 100,
            context: 64,
            ..LlamaConfig::default()
        };
        let g = llama_decode_batch(&llama, &[2, 4]).unwrap();
        assert_eq!(
            g.node(g.outputs[0].node).unwrap().outputs[0].shape,
            vec![2, 1, llama.vocab]
        );
        assert!(gpt2_decode_batch(&c, &[]).is_err());
        assert!(gpt2_decode_batch(&c, &vec![1; MAX_DECODE_BATCH + 1]).is_err());
        let c2 = Gpt2Config { batch: 2, ..c };
        assert!(gpt2_decode_batch(&c2, &[1, 2]).is_err());
    }

    #[test]
    fn gpt2_small_has_124m_parameters_in_both_variants() {
        let c = Gpt2Config::default();
        let p = gpt2_prefill(&c, 16).unwrap();
        let d = gpt2_decode(&c, 1023).unwrap();
        p.validate().unwrap();
        d.validate().unwrap();
        assert_eq!(p.parameter_count(), 124_439_808);
        assert_eq!(d.parameter_count(), 124_439_808);
        let logits = d.tensor(d.outputs[0]).unwrap();
        assert_eq!(logits.shape, vec![1, 1, 50257]);
        assert_eq!(d.outputs.len(), 13);
        let present = d.tensor(d.outputs[1]).unwrap();
        assert_eq!(present.shape, vec![2, 1, 1024, 768]);
        let prefill_present = p.tensor(p.outputs[1]).unwrap();
        assert_eq!(prefill_present.shape, vec![2, 1, 16, 768]);
        // The prefill's present is what a decode graph with L = S takes as its past.
        let d16 = gpt2_decode(&c, 16).unwrap();
        let past = d16
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.attn.past")
            .unwrap();
        assert_eq!(&past.outputs[0], prefill_present);
        assert_eq!(past.residency(), Residency::StatefulKvCache);
        let names: Vec<&str> = d.nodes().iter().map(|n| n.name.as_str()).collect();
        for key in [
            "wte.weight",
            "wpe.weight",
            "h.0.attn.c_attn.weight",
            "h.11.mlp.c_proj.bias",
            "ln_f.weight",
        ] {
            assert!(names.contains(&key), "missing {key}");
        }
        let c_attn = d
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.attn.c_attn.weight")
            .unwrap();
        assert_eq!(c_attn.outputs[0].shape, vec![768, 2304]);
        // Tied head: the logits read the wte parameter.
        let head = d.node(d.outputs[0].node).unwrap();
        assert_eq!(d.node(head.inputs[1].node).unwrap().name, "wte.weight");
    }

    #[test]
    fn bert_base_and_resnet50_parameter_counts() {
        let g = bert(&BertConfig::default()).unwrap();
        g.validate().unwrap();
        assert_eq!(g.parameter_count(), 109_482_240);
        assert_eq!(g.tensor(g.outputs[1]).unwrap().shape, vec![8, 768]);
        let r = resnet(&ResNetConfig::default()).unwrap();
        r.validate().unwrap();
        assert_eq!(r.parameter_count(), 25_557_032);
        assert_eq!(r.tensor(r.outputs[0]).unwrap().shape, vec![8, 1000]);
        let convs = r
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, OpKind::Conv2d { .. }))
            .count();
        assert_eq!(convs, 53);
        let names: Vec<&str> = r.nodes().iter().map(|n| n.name.as_str()).collect();
        assert!(names.contains(&"layer4.2.bn3.running_var"));
        assert!(names.contains(&"layer2.0.downsample.0.weight"));
    }

    #[test]
    fn by_name_and_sizes() {
        for name in MODEL_NAMES {
            let small = ModelSize {
                batch: Some(2),
                seq_len: Some(8),
                kv_len: Some(8),
                layers: Some(2),
                image: Some(64),
            };
            let g = by_name(name, &small).unwrap();
            g.validate().unwrap();
            assert!(g.is_id_ordered());
            let json = g.to_json().unwrap();
            assert_eq!(Graph::from_json(&json).unwrap(), g);
        }
        assert!(matches!(
            by_name("gpt5", &ModelSize::default()),
            Err(Error::UnknownModel { .. })
        ));
        let bad = Gpt2Config {
            heads: 5,
            ..Gpt2Config::default()
        };
        assert!(matches!(
            gpt2_decode(&bad, 4),
            Err(Error::InvalidConfig { .. })
        ));
        let g = by_name("gpt2-decode", &ModelSize::default()).unwrap();
        assert_eq!(g.node(NodeId(0)).unwrap().outputs[0].dtype, DType::I64);
    }

    /// The layer of a node inside block `i` is `Some(i)`, outside every block `None`: here
    /// checked against the names, which consumers themselves never parse.
    #[test]
    fn builders_set_each_nodes_layer() {
        let small = ModelSize {
            batch: Some(1),
            seq_len: Some(4),
            kv_len: Some(4),
            layers: Some(3),
            image: Some(32),
        };
        for (name, prefix) in [
            ("gpt2-decode", "h."),
            ("gpt2-prefill", "h."),
            ("llama-decode", "model.layers."),
            ("llama-prefill", "model.layers."),
            ("bert", "encoder.layer."),
        ] {
            let g = by_name(name, &small).unwrap();
            let mut seen = [0usize; 3];
            for n in g.nodes() {
                let expect: Option<u32> = n
                    .name
                    .strip_prefix(prefix)
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse().ok());
                assert_eq!(n.semantics.layer, expect, "{name}: {}", n.name);
                assert_eq!(n.layer(), expect, "{name}: {}", n.name);
                if let Some(l) = expect {
                    seen[l as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c > 0), "{name}: {seen:?}");
        }
        let r = by_name("resnet50", &small).unwrap();
        assert!(r.nodes().iter().all(|n| n.layer().is_none()));
    }
}
