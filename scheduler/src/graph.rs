//! The semantic relationship graph (SRG): operations, the tensors between them and what they mean.
//!
//! A [`Graph`] is a vector of [`Node`]s. A node's [`NodeId`] is its index in that vector, so every
//! per-node table elsewhere in the crate is a plain `Vec` indexed by `NodeId`. Edges are the node
//! inputs: each input is a [`TensorRef`] naming the producing node and which of its outputs is
//! consumed. Nodes carry metadata only (shape, dtype, byte size), never tensor data, so a graph of
//! GPT-2 124M is a few hundred kilobytes and builds in well under a millisecond.
//!
//! Weights are nodes of their own ([`OpKind::Parameter`], residency
//! [`Residency::PersistentWeight`], named like the Hugging Face / torchvision checkpoint key) and
//! model inputs are [`OpKind::Input`] nodes; both have no inputs and exactly one output.
//!
//! # JSON format
//!
//! [`Graph`] (de)serializes with serde; this is the format another frontend (for instance a
//! PyTorch FX exporter) emits. Unknown fields are rejected; fields marked optional may be left out.
//!
//! ```json
//! {
//!   "name": "tiny",
//!   "nodes": [
//!     { "id": 0, "name": "x", "op": { "kind": "input" },
//!       "outputs": [ { "shape": [2, 4], "dtype": "f32" } ] },
//!     { "id": 1, "name": "fc.weight", "op": { "kind": "parameter", "attrs": { "trainable": true } },
//!       "outputs": [ { "shape": [4, 3], "dtype": "f32" } ],
//!       "semantics": { "residency": "persistent_weight" } },
//!     { "id": 2, "name": "fc", "op": { "kind": "linear", "attrs": { "bias": false, "layout": "in_out" } },
//!       "inputs": [ { "node": 0, "output": 0 }, { "node": 1, "output": 0 } ],
//!       "outputs": [ { "shape": [2, 3], "dtype": "f32" } ],
//!       "semantics": { "phase": "prefill", "module_path": "fc", "colocation_group": "g0",
//!                      "fusion_group": null, "priority": 0, "custom": { "origin": "fx" } } }
//!   ],
//!   "outputs": [ { "node": 2, "output": 0 } ]
//! }
//! ```
//!
//! - `id`: must equal the node's position in `nodes` (dense, unique, starting at 0).
//! - `op`: `{"kind": <snake_case variant>, "attrs": {...}}`; variants without attributes omit
//!   `attrs`; `custom` takes a string: `{"kind": "custom", "attrs": "my_op"}`. The attributes and the
//!   input order of each kind are documented on [`OpKind`].
//! - `inputs` (optional, default `[]`): `(node, output)` pairs, in the order the op documents.
//! - `outputs`: metadata of each output (`shape`: dims, `dtype`: one of [`DType`] in snake_case).
//!   Byte sizes are derived (`elements × dtype size`), never stored.
//! - `semantics` (optional): see [`Semantics`]; every field of it is optional. `layer` (a
//!   number, or `null`/absent for nodes outside every layer) is what per-layer placement and the
//!   KV-cache manager read; names and module paths are never parsed for it.
//! - `outputs` of the graph (optional): tensors the caller wants back (logits, updated KV caches).
//!
//! [`Graph::validate`] checks a deserialized graph: ids, dangling edges, cycles, arity,
//! attributes, sizes, and that each node's declared outputs equal what its op computes from the
//! producers' metadata (so a shape or dtype disagreement between producer and consumer is found
//! and reported with the node's id and name).
//!
//! # Limits
//!
//! A graph may come from a hostile or buggy frontend, so validation takes time linear in the
//! size of the graph and refuses, with a [`GraphError`] naming the node: a tensor of more than
//! [`MAX_RANK`] dimensions, one whose element count or byte size overflows `u64`
//! ([`TensorMeta::checked_bytes`]), shape arithmetic that overflows (a concatenation longer than
//! `usize::MAX`, ...), graphs whose tensors take more than [`MAX_GRAPH_BYTES`] together, and
//! layers above [`MAX_LAYER`]. Sizes
//! of a validated graph, and sums of them, are then plain arithmetic; on graphs that were not
//! validated they saturate instead of wrapping.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

/// Index of a node in [`Graph::nodes`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The id as a `usize` index.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// One output of one node: the unit that travels along an edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRef {
    /// The producing node.
    pub node: NodeId,
    /// Which output of the producer (0-based).
    #[serde(default)]
    pub output: u32,
}

impl TensorRef {
    /// Output `output` of `node`.
    pub fn new(node: NodeId, output: u32) -> Self {
        Self { node, output }
    }
}

impl From<NodeId> for TensorRef {
    fn from(node: NodeId) -> Self {
        Self { node, output: 0 }
    }
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit signed integer (token ids, as PyTorch emits them).
    I64,
    /// 32-bit signed integer.
    I32,
    /// Unsigned byte.
    U8,
    /// Boolean, one byte per element.
    Bool,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::Bf16)
    }

    /// Whether this is an integer type usable as an index.
    pub fn is_index(self) -> bool {
        matches!(self, DType::I64 | DType::I32)
    }
}

/// Most dimensions a tensor may have, far above any real model's. Bounding the rank keeps every
/// shape rule O(1) per input, so validation is linear in the size of the graph.
pub const MAX_RANK: usize = 64;

/// Most bytes the outputs of all nodes of one graph may take together: 1 EiB, far above any model,
/// and low enough that sums over a graph's tensors (a device's peak memory, the bytes of all
/// transfers, even counted once per device) stay within `u64` and the memory sweep's `i64`.
pub const MAX_GRAPH_BYTES: u64 = 1 << 60;

/// Largest layer index a node may carry ([`Semantics::layer`], [`OpKind::KvCache`]'s `layer`
/// where both are given): far above any real model's depth, and low enough that per-layer tables
/// sized by it (placement stages, KV-cache slots) stay small.
pub const MAX_LAYER: u32 = (1 << 16) - 1;

/// Shape and element type of one tensor. Its size is derived: [`TensorMeta::bytes`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorMeta {
    /// Dimensions, outermost first (row-major).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

impl TensorMeta {
    /// A tensor of `shape` and `dtype`.
    pub fn new(shape: impl Into<Vec<usize>>, dtype: DType) -> Self {
        Self {
            shape: shape.into(),
            dtype,
        }
    }

    /// Number of elements (1 for a scalar), or `None` when the product of the non-zero
    /// dimensions times the element size overflows `u64` (so every stride fits as well, in
    /// elements and in bytes). [`Graph::validate`] refuses such a tensor.
    pub fn checked_elements(&self) -> Option<u64> {
        let mut span: u64 = 1;
        let mut empty = false;
        for &d in &self.shape {
            if d == 0 {
                empty = true;
            } else {
                span = span.checked_mul(u64::try_from(d).ok()?)?;
            }
        }
        span.checked_mul(self.dtype.size())?;
        Some(if empty { 0 } else { span })
    }

    /// Size in bytes, or `None` when it overflows (see [`TensorMeta::checked_elements`]).
    pub fn checked_bytes(&self) -> Option<u64> {
        self.checked_elements()?.checked_mul(self.dtype.size())
    }

    /// Number of elements (1 for a scalar); saturates at `u64::MAX`, which a validated graph
    /// never reaches.
    pub fn elements(&self) -> u64 {
        self.checked_elements().unwrap_or(u64::MAX)
    }

    /// Size in bytes; saturates at `u64::MAX`, which a validated graph never reaches.
    pub fn bytes(&self) -> u64 {
        self.checked_bytes().unwrap_or(u64::MAX)
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}{:?}", self.dtype, self.shape)
    }
}

/// An `f32` attribute that hashes and compares by its bits, so ops stay `Eq + Hash`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scalar(pub f32);

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Scalar {}
impl Hash for Scalar {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// Memory layout of a [`OpKind::Linear`] weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// `[in, out]`: GPT-2's `Conv1D`; `y = x · W`.
    InOut,
    /// `[out, in]`: PyTorch's `nn.Linear` (BERT, ResNet's `fc`); `y = x · Wᵀ`.
    OutIn,
}

/// Which GELU formula an [`OpKind::Gelu`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeluApprox {
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`: GPT-2's `gelu_new`.
    Tanh,
    /// `0.5·x·(1 + erf(x/√2))`: BERT's `gelu`.
    Erf,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Which half of a KV cache an [`OpKind::KvCacheRead`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvPart {
    /// Index 0 of the cache's leading axis: the keys.
    Key,
    /// Index 1 of the cache's leading axis: the values.
    Value,
}

/// How an [`OpKind::Rotary`] rescales its inverse frequencies `θ^(−2i/D)` (Hugging Face's
/// `rope_scaling`), for contexts longer than the model was trained on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// The frequencies as they are.
    #[default]
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        /// Divisor of every frequency.
        factor: Scalar,
    },
    /// Llama 3's: wavelengths longer than `original_max_position_embeddings / low_freq_factor`
    /// divided by `factor`, shorter than `original_max_position_embeddings / high_freq_factor`
    /// kept, and those between interpolated smoothly.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: Scalar,
        /// Sets the wavelength above which frequencies are divided by `factor`.
        low_freq_factor: Scalar,
        /// Sets the wavelength below which frequencies are kept.
        high_freq_factor: Scalar,
        /// Context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The inverse frequencies `θ^(−2i/d)` for `i < d/2`, rescaled, in f32 as Hugging Face's
    /// `_compute_default_rope_parameters` and `_compute_llama3_parameters` compute them.
    pub fn inv_freq(&self, theta: f32, d: usize) -> Vec<f32> {
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match *self {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor.0).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor.0;
                let high_wavelen = old / high_freq_factor.0;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor.0
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor.0)
                                / (high_freq_factor.0 - low_freq_factor.0);
                            (1.0 - smooth) * f / factor.0 + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// What a node computes, with every attribute a kernel needs.
///
/// Input order is part of each variant's contract. "Broadcast" means NumPy rules: shapes are
/// aligned at their trailing dimension and each pair of dims must be equal or one of them 1.
/// Layouts: images are NCHW; sequences are `[batch, seq, hidden]`; a KV cache is
/// `[2, batch, len, heads·head_dim]` (keys at index 0, values at index 1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "attrs", rename_all = "snake_case")]
pub enum OpKind {
    /// A model input supplied at run time (token ids as I64/I32, images as F32). No inputs, one
    /// output whose metadata is declared.
    Input,
    /// A weight: no inputs, one output whose metadata is declared, residency
    /// [`Residency::PersistentWeight`]. `trainable == false` marks buffers such as BatchNorm
    /// running statistics, which [`Graph::parameter_count`] does not count.
    Parameter {
        /// Counted as a model parameter.
        trainable: bool,
    },
    /// The KV cache of one decoder layer held from earlier steps: no inputs, one output
    /// `[2, B, L, H·D]`, residency [`Residency::StatefulKvCache`].
    KvCache {
        /// Decoder layer index.
        layer: u32,
        /// Which of the run's sequences the cache belongs to: 0 for a one-sequence run, `i` for
        /// the `i`-th sequence of a batched decode step (whose graph holds one cache per
        /// sequence and layer, each with its own length).
        #[serde(default, skip_serializing_if = "is_zero")]
        slot: u32,
    },
    /// Appends new keys/values. Inputs `[cache [2,B,L,E], k [B,T,E], v [B,T,E]]` →
    /// `[2, B, L+T, E]`; or `[k, v]` → a fresh cache `[2, B, T, E]` (prefill).
    KvCacheAppend,
    /// Reads one half of a cache: input `[cache [2,B,L,E]]` → `[B, L, E]`.
    KvCacheRead {
        /// Keys or values.
        part: KvPart,
    },
    /// Table lookup. Inputs `[ids (I64/I32, any shape S), table [V, D]]` → `S ++ [D]`, dtype of
    /// the table.
    Embedding,
    /// Affine map over the last axis. Inputs `[x [..., in], w, b [out] if bias]` → `[..., out]`;
    /// `w` is `[in, out]` or `[out, in]` as `layout` says.
    Linear {
        /// Whether a bias input follows the weight.
        bias: bool,
        /// Weight layout.
        layout: WeightLayout,
    },
    /// Batched matrix product. Inputs `[a [..., M, K], b [..., K, N]]` (or `b [..., N, K]` when
    /// `transpose_b`) → `[..., M, N]`; batch dims broadcast (a 2-D `b` is shared by all batches).
    MatMul {
        /// Use `bᵀ` (e.g. a tied LM head multiplying by the `[V, D]` embedding table).
        transpose_b: bool,
    },
    /// 2-D convolution, cross-correlation as PyTorch. Inputs `[x [N,C,H,W], w [O, C/groups, kh,
    /// kw], b [O] if bias]` → `[N, O, (H+2p-d(kh-1)-1)/s+1, ...]`.
    Conv2d {
        /// Stride (h, w).
        stride: [usize; 2],
        /// Zero padding on each side (h, w).
        padding: [usize; 2],
        /// Dilation (h, w).
        dilation: [usize; 2],
        /// Channel groups.
        groups: usize,
        /// Whether a bias input follows the weight.
        bias: bool,
    },
    /// Inference-mode batch normalisation over axis 1. Inputs `[x [N,C,...], weight [C], bias [C],
    /// running_mean [C], running_var [C]]` → shape of `x`;
    /// `y = (x - mean) / sqrt(var + eps) · weight + bias`.
    BatchNorm {
        /// Added to the variance.
        eps: Scalar,
    },
    /// Layer normalisation over the last axis. Inputs `[x [..., D], weight [D], bias [D]]` → shape
    /// of `x`.
    LayerNorm {
        /// Added to the variance.
        eps: Scalar,
    },
    /// Softmax along `axis`. Input `[x]` → shape of `x`. With `causal`, over the last two axes
    /// `[.., Q, K]` element `(i, j)` is masked (−∞) when `j > i + (K − Q)`.
    Softmax {
        /// Axis (0-based).
        axis: usize,
        /// Apply the causal mask described above.
        causal: bool,
    },
    /// Fused multi-head scaled dot-product attention. Inputs `[q [B,Q,H·D], k [B,K,G·D],
    /// v [B,K,G·D]]` → `[B, Q, H·D]`; heads are contiguous slices of the last axis;
    /// `softmax(scale · q·kᵀ [+ causal mask as in Softmax]) · v` per head, query head `h`
    /// reading key/value head `h / (H/G)` (grouped-query attention; `G = H` without `kv_heads`).
    Attention {
        /// Number of query heads H.
        heads: usize,
        /// Number of key/value heads G, dividing H (`None`: H, plain multi-head attention).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kv_heads: Option<usize>,
        /// Size of one head D.
        head_dim: usize,
        /// Causal mask with offset `K − Q` (so a decode step sees the whole cache).
        causal: bool,
        /// Score scale, normally `1/√D`.
        scale: Scalar,
    },
    /// One decode step's attention for a batch of sequences, each over its own KV cache (a
    /// ragged batch: every cache has its own length). Inputs `[q [N,1,H·D], k [N,1,G·D],
    /// v [N,1,G·D], cache_0 [2,1,L_0,G·D], …, cache_{N-1} [2,1,L_{N-1},G·D]]` (each cache a
    /// [`OpKind::KvCache`] of the same layer) → `[N, 1, H·D]`. Row `i`'s key and value are
    /// appended to cache `i` (the sequence's state, as [`OpKind::KvCacheAppend`] in place), and
    /// row `i`'s query attends over its `L_i + 1` positions as [`OpKind::Attention`] does (one
    /// query at the last position: the causal mask hides nothing). Residency
    /// [`Residency::StatefulKvCache`]: it writes the caches, so it is never recomputed or moved
    /// away from them. One node per layer instead of a subgraph per sequence.
    CachedAttention {
        /// Number of query heads H.
        heads: usize,
        /// Number of key/value heads G, dividing H (`None`: H).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kv_heads: Option<usize>,
        /// Size of one head D.
        head_dim: usize,
        /// Score scale, normally `1/√D`.
        scale: Scalar,
    },
    /// Root-mean-square normalisation over the last axis (Llama's `RMSNorm`). Inputs
    /// `[x [..., D], weight [D]]` → shape of `x`; `y = x / sqrt(mean(x²) + eps) · weight`.
    RmsNorm {
        /// Added to the mean square.
        eps: Scalar,
    },
    /// Rotary position embedding (Llama's, "rotate half" pairing: element `i` of a head with
    /// element `i + D/2`). Inputs `[x [B, S, H·D], position_ids (I64/I32) [B, S]]` → shape of `x`;
    /// per head, `x·cos(p·f) + rotate_half(x)·sin(p·f)` with the frequencies `f` of
    /// [`RopeScaling::inv_freq`].
    Rotary {
        /// Size of one head D (even).
        head_dim: usize,
        /// The base θ of the frequencies (`rope_theta`).
        theta: Scalar,
        /// Frequency rescaling.
        #[serde(default)]
        scaling: RopeScaling,
    },
    /// Elementwise `a + b`, broadcast. Inputs `[a, b]`, same dtype.
    Add,
    /// Elementwise `a · b`, broadcast. Inputs `[a, b]`, same dtype.
    Mul,
    /// GELU. Input `[x]` → shape of `x`.
    Gelu {
        /// Formula.
        approximate: GeluApprox,
    },
    /// `x · sigmoid(x)` (SiLU, the gate of a SwiGLU MLP). Input `[x]`.
    Silu,
    /// `max(x, 0)`. Input `[x]`.
    Relu,
    /// `tanh(x)`. Input `[x]`.
    Tanh,
    /// Max pooling, NCHW, floor mode, padding counts as −∞. Input `[x [N,C,H,W]]`.
    MaxPool2d {
        /// Window (h, w).
        kernel: [usize; 2],
        /// Stride (h, w).
        stride: [usize; 2],
        /// Padding (h, w).
        padding: [usize; 2],
    },
    /// Average pooling, NCHW, floor mode, padding included in the divisor. Input `[x [N,C,H,W]]`.
    AvgPool2d {
        /// Window (h, w).
        kernel: [usize; 2],
        /// Stride (h, w).
        stride: [usize; 2],
        /// Padding (h, w).
        padding: [usize; 2],
    },
    /// Mean over H and W. Input `[x [N,C,H,W]]` → `[N, C, 1, 1]`.
    GlobalAvgPool2d,
    /// Reinterprets the (row-major) data with a new shape of the same element count. Input `[x]`.
    Reshape {
        /// The new shape.
        shape: Vec<usize>,
    },
    /// Permutes axes: output axis `i` is input axis `perm[i]`. Input `[x]`.
    Transpose {
        /// A permutation of `0..rank`.
        perm: Vec<usize>,
    },
    /// Joins its inputs (one or more, same rank and dtype, equal except along `axis`).
    Concat {
        /// Axis joined along.
        axis: usize,
    },
    /// Cuts the input `[x]` along `axis` into consecutive pieces of `sizes`; one output per piece.
    Split {
        /// Axis cut along.
        axis: usize,
        /// Piece lengths; they sum to the axis length.
        sizes: Vec<usize>,
    },
    /// `x[.., start..end, ..]` along `axis`. Input `[x]`.
    Slice {
        /// Axis sliced.
        axis: usize,
        /// First index kept.
        start: usize,
        /// One past the last index kept.
        end: usize,
    },
    /// The index of the largest value along the last axis: input `[..., V]` (float) →
    /// `[...]` (I64). Each value replaces the best so far only when it is greater: ties go to the
    /// lowest index, a NaN after the first value is never chosen, a NaN first is never replaced. A decode step's greedy next tokens, so that a
    /// worker returns one id per sequence instead of its logits.
    ArgMax,
    /// An operation this crate does not know: any inputs, outputs as declared, costed as generic.
    Custom(String),
}

impl OpKind {
    /// Short snake_case name of the kind (the JSON `kind`; `custom:<name>` for custom ops).
    pub fn name(&self) -> &str {
        match self {
            OpKind::Input => "input",
            OpKind::Parameter { .. } => "parameter",
            OpKind::KvCache { .. } => "kv_cache",
            OpKind::KvCacheAppend => "kv_cache_append",
            OpKind::KvCacheRead { .. } => "kv_cache_read",
            OpKind::Embedding => "embedding",
            OpKind::Linear { .. } => "linear",
            OpKind::MatMul { .. } => "mat_mul",
            OpKind::Conv2d { .. } => "conv2d",
            OpKind::BatchNorm { .. } => "batch_norm",
            OpKind::LayerNorm { .. } => "layer_norm",
            OpKind::Softmax { .. } => "softmax",
            OpKind::Attention { .. } => "attention",
            OpKind::CachedAttention { .. } => "cached_attention",
            OpKind::RmsNorm { .. } => "rms_norm",
            OpKind::Rotary { .. } => "rotary",
            OpKind::Add => "add",
            OpKind::Mul => "mul",
            OpKind::Gelu { .. } => "gelu",
            OpKind::Silu => "silu",
            OpKind::Relu => "relu",
            OpKind::Tanh => "tanh",
            OpKind::MaxPool2d { .. } => "max_pool2d",
            OpKind::AvgPool2d { .. } => "avg_pool2d",
            OpKind::GlobalAvgPool2d => "global_avg_pool2d",
            OpKind::Reshape { .. } => "reshape",
            OpKind::Transpose { .. } => "transpose",
            OpKind::Concat { .. } => "concat",
            OpKind::Split { .. } => "split",
            OpKind::Slice { .. } => "slice",
            OpKind::ArgMax => "arg_max",
            OpKind::Custom(name) => name,
        }
    }

    /// Whether the node is a source whose output metadata is declared rather than computed
    /// (inputs, parameters, KV-cache state).
    pub fn is_source(&self) -> bool {
        matches!(
            self,
            OpKind::Input | OpKind::Parameter { .. } | OpKind::KvCache { .. }
        )
    }

    /// Whether the op only moves or views data (reshape, transpose, split, slice, concat, cache read).
    pub fn is_data_movement(&self) -> bool {
        matches!(
            self,
            OpKind::Reshape { .. }
                | OpKind::Transpose { .. }
                | OpKind::Split { .. }
                | OpKind::Slice { .. }
                | OpKind::Concat { .. }
                | OpKind::KvCacheRead { .. }
        )
    }

    /// Whether the op is elementwise (cheap, fusable into its producer).
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            OpKind::Add
                | OpKind::Mul
                | OpKind::Gelu { .. }
                | OpKind::Silu
                | OpKind::Relu
                | OpKind::Tanh
        )
    }
}

/// Execution phase a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Processing a whole prompt (or an encoder pass): compute bound.
    Prefill,
    /// One token against a KV cache: memory bound.
    Decode,
    /// Convolutional / vision encoder work.
    Vision,
    /// Embedding lookups.
    Embedding,
    /// Not annotated; analysis may fill it in.
    #[default]
    Unknown,
}

/// Where a node's output lives and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    /// A weight: resident for the model's life, never shipped per step.
    PersistentWeight,
    /// A KV cache: resident across steps on the device that decodes the sequence.
    StatefulKvCache,
    /// A temporary: freed after its last consumer.
    EphemeralActivation,
}

/// Semantic annotations of a node. Every field has a default, so frontends may omit any.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Semantics {
    /// Execution phase (default `unknown`).
    pub phase: Phase,
    /// Residency; `None` when not annotated ([`Node::residency`] then derives it from the op).
    pub residency: Option<Residency>,
    /// Dotted module path, e.g. `h.3.attn`. Descriptive only: nothing reads a layer or any other
    /// meaning out of it (see `layer`).
    pub module_path: String,
    /// The repeated block (decoder or encoder layer) this node belongs to, counted from 0;
    /// `None` for nodes outside every layer (embeddings, final norm, head) and for graphs
    /// whose frontend does not say. Per-layer placement and the KV-cache manager key on it
    /// (see [`Node::layer`]); at most [`MAX_LAYER`].
    pub layer: Option<u32>,
    /// Nodes sharing a co-location group always run on one device.
    pub colocation_group: Option<String>,
    /// Nodes sharing a fusion group are meant to run as one kernel (and so also share a device).
    pub fusion_group: Option<String>,
    /// Higher runs earlier among ready nodes.
    pub priority: i32,
    /// Frontend-specific annotations.
    pub custom: BTreeMap<String, String>,
}

/// One operation of the graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Its index in [`Graph::nodes`].
    pub id: NodeId,
    /// Human-readable name; for parameters the checkpoint key.
    pub name: String,
    /// What it computes.
    pub op: OpKind,
    /// Consumed tensors, in the order the op documents.
    #[serde(default)]
    pub inputs: Vec<TensorRef>,
    /// Metadata of each produced tensor.
    pub outputs: Vec<TensorMeta>,
    /// Semantic annotations.
    #[serde(default)]
    pub semantics: Semantics,
}

impl Node {
    /// The residency: the annotation, or derived from the op when not annotated.
    pub fn residency(&self) -> Residency {
        if let Some(r) = self.semantics.residency {
            return r;
        }
        match self.op {
            OpKind::Parameter { .. } => Residency::PersistentWeight,
            OpKind::KvCache { .. } | OpKind::KvCacheAppend | OpKind::CachedAttention { .. } => {
                Residency::StatefulKvCache
            }
            _ => Residency::EphemeralActivation,
        }
    }

    /// The layer this node belongs to: [`Semantics::layer`], or for an [`OpKind::KvCache`] whose
    /// semantics leave it out, the op's own layer. Never derived from the node's name.
    pub fn layer(&self) -> Option<u32> {
        match (self.semantics.layer, &self.op) {
            (Some(l), _) | (None, &OpKind::KvCache { layer: l, .. }) => Some(l),
            (None, _) => None,
        }
    }

    /// Total bytes of all outputs (saturating; a validated graph stays far below the limit, see
    /// [`MAX_GRAPH_BYTES`]).
    pub fn output_bytes(&self) -> u64 {
        self.outputs
            .iter()
            .fold(0u64, |acc, m| acc.saturating_add(m.bytes()))
    }
}

/// Why a graph is malformed. Each variant names the offending node by id and name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GraphError {
    /// Two nodes carry the same id.
    #[error("duplicate node id {id} (at positions {first} and {second})")]
    DuplicateId {
        /// The repeated id.
        id: u32,
        /// Position of the first node with it.
        first: usize,
        /// Position of the second.
        second: usize,
    },
    /// A node's id is not its position (ids must be dense, 0-based, in order).
    #[error("node `{name}` at position {position} has id {id}; ids must equal positions")]
    IdNotPosition {
        /// Position in the node list.
        position: usize,
        /// Its id.
        id: u32,
        /// Its name.
        name: String,
    },
    /// An input refers to a node that does not exist.
    #[error("node {node} `{name}` input {input} refers to missing node {producer}")]
    DanglingEdge {
        /// Consumer.
        node: NodeId,
        /// Consumer name.
        name: String,
        /// Input position.
        input: usize,
        /// The missing producer id.
        producer: u32,
    },
    /// An input refers to an output index the producer does not have.
    #[error("node {node} `{name}` input {input} reads output {output} of {producer}, which has {available}")]
    MissingOutput {
        /// Consumer.
        node: NodeId,
        /// Consumer name.
        name: String,
        /// Input position.
        input: usize,
        /// Producer.
        producer: NodeId,
        /// Requested output index.
        output: u32,
        /// Number of outputs the producer has.
        available: usize,
    },
    /// A graph output refers to a missing node or output.
    #[error("graph output {index} refers to missing tensor {tensor:?}")]
    DanglingGraphOutput {
        /// Position in [`Graph::outputs`].
        index: usize,
        /// The reference.
        tensor: TensorRef,
    },
    /// The graph has a cycle through this node.
    #[error("cycle through node {node} `{name}`")]
    Cycle {
        /// A node on the cycle.
        node: NodeId,
        /// Its name.
        name: String,
    },
    /// Wrong number of inputs for the op.
    #[error("node {node} `{name}` ({op}) takes {expected} inputs, has {found}")]
    Arity {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Its op kind.
        op: String,
        /// What the op takes.
        expected: &'static str,
        /// How many it has.
        found: usize,
    },
    /// An input's shape does not fit the op.
    #[error("node {node} `{name}` input {input} has shape {found:?}: {reason}")]
    ShapeMismatch {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Input position.
        input: usize,
        /// The producer's shape.
        found: Vec<usize>,
        /// What the op needed.
        reason: String,
    },
    /// An input's dtype does not fit the op.
    #[error("node {node} `{name}` input {input} has dtype {found:?}, expected {expected}")]
    DTypeMismatch {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Input position.
        input: usize,
        /// The producer's dtype.
        found: DType,
        /// What the op needed.
        expected: String,
    },
    /// The declared outputs differ from what the op computes from its inputs.
    #[error("node {node} `{name}` declares outputs {declared:?} but its inputs give {computed:?}")]
    OutputMismatch {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// As declared.
        declared: Vec<TensorMeta>,
        /// As computed.
        computed: Vec<TensorMeta>,
    },
    /// An attribute is invalid (zero stride, bad permutation, ...).
    #[error("node {node} `{name}`: invalid attribute: {reason}")]
    InvalidAttribute {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An output has more than [`MAX_RANK`] dimensions.
    #[error("node {node} `{name}` output {output} has rank {rank}; at most {max} is allowed")]
    RankTooLarge {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Output index.
        output: usize,
        /// Its rank.
        rank: usize,
        /// [`MAX_RANK`].
        max: usize,
    },
    /// An output's element count or byte size does not fit in `u64`
    /// (see [`TensorMeta::checked_elements`]).
    #[error("node {node} `{name}` output {output} {dtype:?}{shape:?} is too large: its size overflows u64")]
    TensorTooLarge {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Output index.
        output: usize,
        /// The shape.
        shape: Vec<usize>,
        /// The element type.
        dtype: DType,
    },
    /// A dimension computed by the node's shape rule overflows (a concatenation or an appended
    /// cache longer than `usize::MAX`, `heads · head_dim` overflowing, ...).
    #[error("node {node} `{name}`: shape arithmetic overflows: {reason}")]
    ShapeOverflow {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Which computation overflowed.
        reason: String,
    },
    /// A node's layer ([`Semantics::layer`], or its [`OpKind::KvCache`] op's) is above
    /// [`MAX_LAYER`].
    #[error("node {node} `{name}` has layer {layer}; at most {max} is allowed")]
    LayerTooLarge {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Its layer.
        layer: u32,
        /// [`MAX_LAYER`].
        max: u32,
    },
    /// A KV cache's [`Semantics::layer`] differs from the layer its [`OpKind::KvCache`] op reads.
    #[error("node {node} `{name}` is in layer {layer} but reads the KV cache of layer {op_layer}")]
    LayerMismatch {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// [`Semantics::layer`].
        layer: u32,
        /// The op's layer.
        op_layer: u32,
    },
    /// The outputs of all nodes up to this one take more than [`MAX_GRAPH_BYTES`] together.
    #[error("graph too large: its tensors up to node {node} `{name}` take more than {max} bytes")]
    GraphTooLarge {
        /// The node at which the running total passed the limit.
        node: NodeId,
        /// Its name.
        name: String,
        /// [`MAX_GRAPH_BYTES`].
        max: u64,
    },
}

/// A model graph. See the [module docs](self) for the JSON format.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graph {
    /// Name of the model / graph.
    pub name: String,
    nodes: Vec<Node>,
    /// Tensors returned to the caller.
    #[serde(default)]
    pub outputs: Vec<TensorRef>,
    #[serde(skip)]
    hash: OnceLock<u64>,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.nodes == other.nodes && self.outputs == other.outputs
    }
}

/// Consumers of each node, as a compressed adjacency list (built once, indexed by [`NodeId`]).
#[derive(Clone, Debug, Default)]
pub struct Consumers {
    offsets: Vec<u32>,
    targets: Vec<NodeId>,
}

impl Consumers {
    /// Distinct consumer nodes of `id`, in ascending id order.
    pub fn of(&self, id: NodeId) -> &[NodeId] {
        let i = id.index();
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.targets[a as usize..b as usize],
            _ => &[],
        }
    }
}

impl Graph {
    /// An empty graph called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Parses a graph from JSON and validates it.
    pub fn from_json(json: &str) -> Result<Self, crate::Error> {
        let g: Graph = serde_json::from_str(json)?;
        g.validate()?;
        Ok(g)
    }

    /// Serializes to pretty JSON.
    pub fn to_json(&self) -> Result<String, crate::Error> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// All nodes, indexed by [`NodeId`].
    #[inline]
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Number of nodes.
    #[inline]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node with `id`, if any.
    #[inline]
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.index())
    }

    /// Mutable access to a node (annotation passes); invalidates the cached structural hash.
    pub fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.hash.take();
        self.nodes.get_mut(id.index())
    }

    /// Mutable access to all nodes; invalidates the cached structural hash.
    pub fn nodes_mut(&mut self) -> &mut [Node] {
        self.hash.take();
        &mut self.nodes
    }

    /// Metadata of a tensor, if it exists.
    pub fn tensor(&self, t: TensorRef) -> Option<&TensorMeta> {
        self.nodes
            .get(t.node.index())
            .and_then(|n| n.outputs.get(t.output as usize))
    }

    /// Appends a node whose outputs are computed from its op and inputs, after checking them.
    /// Source ops ([`OpKind::is_source`]) and [`OpKind::Custom`] need declared outputs: use
    /// [`Graph::add_with_outputs`].
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: OpKind,
        inputs: Vec<TensorRef>,
        semantics: Semantics,
    ) -> Result<NodeId, GraphError> {
        let id = NodeId(self.nodes.len() as u32);
        let name = name.into();
        let outputs = infer_outputs(self, id, &name, &op, &inputs)?.ok_or_else(|| {
            GraphError::InvalidAttribute {
                node: id,
                name: name.clone(),
                reason: format!("{} needs declared outputs", op.name()),
            }
        })?;
        check_tensors(id, &name, &outputs)?;
        check_layer(id, &name, &op, &semantics)?;
        self.hash.take();
        self.nodes.push(Node {
            id,
            name,
            op,
            inputs,
            outputs,
            semantics,
        });
        Ok(id)
    }

    /// Appends a node with declared outputs; checks them against the computed ones where the op
    /// defines them.
    pub fn add_with_outputs(
        &mut self,
        name: impl Into<String>,
        op: OpKind,
        inputs: Vec<TensorRef>,
        outputs: Vec<TensorMeta>,
        semantics: Semantics,
    ) -> Result<NodeId, GraphError> {
        let id = NodeId(self.nodes.len() as u32);
        let name = name.into();
        check_node_outputs(self, id, &name, &op, &inputs, &outputs)?;
        check_layer(id, &name, &op, &semantics)?;
        self.hash.take();
        self.nodes.push(Node {
            id,
            name,
            op,
            inputs,
            outputs,
            semantics,
        });
        Ok(id)
    }

    /// Sum of the elements of all trainable [`OpKind::Parameter`] nodes.
    pub fn parameter_count(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| matches!(n.op, OpKind::Parameter { trainable: true }))
            .flat_map(|n| &n.outputs)
            .fold(0u64, |acc, m| acc.saturating_add(m.elements()))
    }

    /// Builds the consumer lists of every node, in time linear in the number of edges (a node
    /// that reads one producer many times, e.g. a concatenation of copies, is listed once).
    /// Inputs that name no node are skipped.
    pub fn consumers(&self) -> Consumers {
        let n = self.nodes.len();
        let mut last = vec![0usize; n];
        let mut counts = vec![0u32; n + 1];
        for (pos, node) in self.nodes.iter().enumerate() {
            for_each_producer(&mut last, pos, node, |p| counts[p + 1] += 1);
        }
        for i in 1..=n {
            counts[i] += counts[i - 1];
        }
        last.fill(0);
        let mut fill = counts.clone();
        let mut targets = vec![NodeId(0); counts[n] as usize];
        for (pos, node) in self.nodes.iter().enumerate() {
            for_each_producer(&mut last, pos, node, |p| {
                targets[fill[p] as usize] = node.id;
                fill[p] += 1;
            });
        }
        Consumers {
            offsets: counts,
            targets,
        }
    }

    /// A topological order (Kahn's algorithm, smallest id first among ready nodes in FIFO
    /// order), or the cycle error, in time linear in the number of edges. Assumes ids equal
    /// positions and edges are in range (see [`Graph::validate`]); others are skipped.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, GraphError> {
        let n = self.nodes.len();
        let cons = self.consumers();
        let mut indeg = vec![0u32; n];
        for u in 0..n as u32 {
            for v in cons.of(NodeId(u)) {
                if let Some(d) = indeg.get_mut(v.index()) {
                    *d += 1;
                }
            }
        }
        let mut order: Vec<NodeId> = Vec::with_capacity(n);
        order.extend((0..n as u32).map(NodeId).filter(|i| indeg[i.index()] == 0));
        let mut head = 0;
        while head < order.len() {
            let u = order[head];
            head += 1;
            for &v in cons.of(u) {
                if let Some(d) = indeg.get_mut(v.index()) {
                    *d -= 1;
                    if *d == 0 {
                        order.push(v);
                    }
                }
            }
        }
        if order.len() < n {
            let bad = indeg
                .iter()
                .position(|&d| d > 0)
                .map(|i| &self.nodes[i])
                .ok_or_else(|| GraphError::Cycle {
                    node: NodeId(0),
                    name: String::new(),
                })?;
            return Err(GraphError::Cycle {
                node: bad.id,
                name: bad.name.clone(),
            });
        }
        Ok(order)
    }

    /// Whether every node's producers have smaller ids (the order builders emit).
    pub fn is_id_ordered(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.inputs.iter().all(|t| t.node < n.id))
    }

    /// Checks the whole graph: ids dense and unique, edges and graph outputs in range, every
    /// tensor at most [`MAX_RANK`] dimensions with a size that fits in `u64`, all tensors together
    /// at most [`MAX_GRAPH_BYTES`], every layer at most [`MAX_LAYER`] (and a KV cache's semantic
    /// layer equal to its op's), no cycle, and every node's inputs and declared outputs
    /// consistent with its op.
    ///
    /// Time and memory are linear in the size of the graph (nodes, edges and dimensions), so a
    /// hostile graph is refused as quickly as it was read.
    pub fn validate(&self) -> Result<(), GraphError> {
        let n = self.nodes.len();
        let mut seen = vec![usize::MAX; n];
        for (pos, node) in self.nodes.iter().enumerate() {
            let id = node.id.index();
            if id < n {
                if seen[id] != usize::MAX {
                    return Err(GraphError::DuplicateId {
                        id: node.id.0,
                        first: seen[id],
                        second: pos,
                    });
                }
                seen[id] = pos;
            }
        }
        for (pos, node) in self.nodes.iter().enumerate() {
            if node.id.index() != pos {
                return Err(GraphError::IdNotPosition {
                    position: pos,
                    id: node.id.0,
                    name: node.name.clone(),
                });
            }
        }
        for node in &self.nodes {
            for (i, t) in node.inputs.iter().enumerate() {
                let Some(p) = self.nodes.get(t.node.index()) else {
                    return Err(GraphError::DanglingEdge {
                        node: node.id,
                        name: node.name.clone(),
                        input: i,
                        producer: t.node.0,
                    });
                };
                if t.output as usize >= p.outputs.len() {
                    return Err(GraphError::MissingOutput {
                        node: node.id,
                        name: node.name.clone(),
                        input: i,
                        producer: p.id,
                        output: t.output,
                        available: p.outputs.len(),
                    });
                }
            }
        }
        for (index, t) in self.outputs.iter().enumerate() {
            if self.tensor(*t).is_none() {
                return Err(GraphError::DanglingGraphOutput { index, tensor: *t });
            }
        }
        let mut total: u64 = 0;
        for node in &self.nodes {
            check_tensors(node.id, &node.name, &node.outputs)?;
            check_layer(node.id, &node.name, &node.op, &node.semantics)?;
            total = total
                .checked_add(node.output_bytes())
                .filter(|&t| t <= MAX_GRAPH_BYTES)
                .ok_or_else(|| GraphError::GraphTooLarge {
                    node: node.id,
                    name: node.name.clone(),
                    max: MAX_GRAPH_BYTES,
                })?;
        }
        if !self.is_id_ordered() {
            self.topo_order()?;
        }
        for node in &self.nodes {
            check_node_outputs(
                self,
                node.id,
                &node.name,
                &node.op,
                &node.inputs,
                &node.outputs,
            )?;
        }
        Ok(())
    }

    /// A 64-bit hash of the graph's structure (ops, edges, metadata, semantics; not node names),
    /// computed on first use and cached until the graph is mutated.
    pub fn structural_hash(&self) -> u64 {
        *self.hash.get_or_init(|| {
            let mut h = Fnv64::default();
            self.nodes.len().hash(&mut h);
            for node in &self.nodes {
                node.op.hash(&mut h);
                node.inputs.hash(&mut h);
                node.outputs.hash(&mut h);
                node.semantics.hash(&mut h);
            }
            self.outputs.hash(&mut h);
            h.finish()
        })
    }
}

/// Calls `f` once per distinct producer of `node` (at position `pos`) that is in range.
/// `last[p]` holds the position + 1 of the last node that reported `p`; nodes are visited in
/// position order, so a repeated input is recognised in O(1) instead of by a scan of the inputs
/// before it (which made a node with millions of inputs quadratic).
fn for_each_producer(last: &mut [usize], pos: usize, node: &Node, mut f: impl FnMut(usize)) {
    let stamp = pos + 1;
    for t in &node.inputs {
        let p = t.node.index();
        if let Some(l) = last.get_mut(p) {
            if *l != stamp {
                *l = stamp;
                f(p);
            }
        }
    }
}

/// FNV-1a: stable across runs and platforms, so a hash can be recorded and compared later.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Every output at most [`MAX_RANK`] dimensions, with a size that fits in `u64`.
fn check_tensors(id: NodeId, name: &str, outputs: &[TensorMeta]) -> Result<(), GraphError> {
    for (output, m) in outputs.iter().enumerate() {
        if m.rank() > MAX_RANK {
            return Err(GraphError::RankTooLarge {
                node: id,
                name: name.to_owned(),
                output,
                rank: m.rank(),
                max: MAX_RANK,
            });
        }
        if m.checked_bytes().is_none() {
            return Err(GraphError::TensorTooLarge {
                node: id,
                name: name.to_owned(),
                output,
                shape: m.shape.clone(),
                dtype: m.dtype,
            });
        }
    }
    Ok(())
}

/// A layer at most [`MAX_LAYER`]; a KV cache's semantic layer, when given, equal to its op's.
fn check_layer(id: NodeId, name: &str, op: &OpKind, sem: &Semantics) -> Result<(), GraphError> {
    let op_layer = match op {
        OpKind::KvCache { layer, .. } => Some(*layer),
        _ => None,
    };
    match (sem.layer, op_layer) {
        (Some(layer), Some(op_layer)) if layer != op_layer => Err(GraphError::LayerMismatch {
            node: id,
            name: name.to_owned(),
            layer,
            op_layer,
        }),
        (Some(layer), _) | (None, Some(layer)) if layer > MAX_LAYER => {
            Err(GraphError::LayerTooLarge {
                node: id,
                name: name.to_owned(),
                layer,
                max: MAX_LAYER,
            })
        }
        _ => Ok(()),
    }
}

fn check_node_outputs(
    g: &Graph,
    id: NodeId,
    name: &str,
    op: &OpKind,
    inputs: &[TensorRef],
    outputs: &[TensorMeta],
) -> Result<(), GraphError> {
    check_tensors(id, name, outputs)?;
    if op.is_source() {
        if !inputs.is_empty() {
            return Err(GraphError::Arity {
                node: id,
                name: name.to_owned(),
                op: op.name().to_owned(),
                expected: "0",
                found: inputs.len(),
            });
        }
        if outputs.len() != 1 {
            return Err(GraphError::InvalidAttribute {
                node: id,
                name: name.to_owned(),
                reason: format!(
                    "a {} has exactly one output, not {}",
                    op.name(),
                    outputs.len()
                ),
            });
        }
        if let OpKind::KvCache { .. } = op {
            if outputs[0].rank() != 3 + 1 || outputs[0].shape[0] != 2 {
                return Err(GraphError::InvalidAttribute {
                    node: id,
                    name: name.to_owned(),
                    reason: format!("a KV cache is [2, B, L, E], not {:?}", outputs[0].shape),
                });
            }
        }
        return Ok(());
    }
    if let Some(computed) = infer_outputs(g, id, name, op, inputs)? {
        if computed != outputs {
            return Err(GraphError::OutputMismatch {
                node: id,
                name: name.to_owned(),
                declared: outputs.to_vec(),
                computed,
            });
        }
    }
    Ok(())
}

/// Context for the shape rules of one node.
struct Infer<'a> {
    id: NodeId,
    name: &'a str,
    op: &'a OpKind,
    ins: Vec<&'a TensorMeta>,
}

impl Infer<'_> {
    fn arity(&self, ok: bool, expected: &'static str) -> Result<(), GraphError> {
        if ok {
            Ok(())
        } else {
            Err(GraphError::Arity {
                node: self.id,
                name: self.name.to_owned(),
                op: self.op.name().to_owned(),
                expected,
                found: self.ins.len(),
            })
        }
    }
    /// Two inputs, or three with a bias.
    fn arity_with_bias(&self, bias: bool) -> Result<(), GraphError> {
        self.arity(
            self.ins.len() == if bias { 3 } else { 2 },
            if bias { "3" } else { "2" },
        )
    }
    fn shape_err(&self, input: usize, reason: impl Into<String>) -> GraphError {
        GraphError::ShapeMismatch {
            node: self.id,
            name: self.name.to_owned(),
            input,
            found: self
                .ins
                .get(input)
                .map(|m| m.shape.clone())
                .unwrap_or_default(),
            reason: reason.into(),
        }
    }
    fn overflow(&self, reason: impl Into<String>) -> GraphError {
        GraphError::ShapeOverflow {
            node: self.id,
            name: self.name.to_owned(),
            reason: reason.into(),
        }
    }
    fn attr_err(&self, reason: impl Into<String>) -> GraphError {
        GraphError::InvalidAttribute {
            node: self.id,
            name: self.name.to_owned(),
            reason: reason.into(),
        }
    }
    /// Input `input`'s dtype is not the `expected` one.
    fn dtype_err(&self, input: usize, expected: impl Into<String>) -> GraphError {
        GraphError::DTypeMismatch {
            node: self.id,
            name: self.name.to_owned(),
            input,
            found: self.ins[input].dtype,
            expected: expected.into(),
        }
    }
    fn float(&self, input: usize) -> Result<DType, GraphError> {
        let d = self.ins[input].dtype;
        if d.is_float() {
            Ok(d)
        } else {
            Err(self.dtype_err(input, "a float type"))
        }
    }
    /// An integer input (ids, positions); `expected` says which.
    fn index(&self, input: usize, expected: &str) -> Result<(), GraphError> {
        if self.ins[input].dtype.is_index() {
            Ok(())
        } else {
            Err(self.dtype_err(input, expected))
        }
    }
    fn same_dtype(&self, input: usize, dtype: DType) -> Result<(), GraphError> {
        if self.ins[input].dtype == dtype {
            Ok(())
        } else {
            Err(self.dtype_err(input, format!("{dtype:?}")))
        }
    }
    fn rank(&self, input: usize, rank: usize) -> Result<&[usize], GraphError> {
        let s = &self.ins[input].shape;
        if s.len() == rank {
            Ok(s)
        } else {
            Err(self.shape_err(input, format!("expected rank {rank}")))
        }
    }
    fn vector(&self, input: usize, len: usize) -> Result<(), GraphError> {
        if self.ins[input].shape == [len] {
            Ok(())
        } else {
            Err(self.shape_err(input, format!("expected [{len}]")))
        }
    }
}

fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i < r - a.len() {
            1
        } else {
            a[i - (r - a.len())]
        };
        let db = if i < r - b.len() {
            1
        } else {
            b[i - (r - b.len())]
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

fn pool_dim(len: usize, k: usize, s: usize, p: usize, d: usize) -> Option<usize> {
    let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let padded = len.checked_add(p.checked_mul(2)?)?;
    if s == 0 || padded < span {
        return None;
    }
    Some((padded - span) / s + 1)
}

/// Output metadata an op computes from its inputs; `Ok(None)` for ops whose outputs are declared
/// (sources, custom).
fn infer_outputs(
    g: &Graph,
    id: NodeId,
    name: &str,
    op: &OpKind,
    inputs: &[TensorRef],
) -> Result<Option<Vec<TensorMeta>>, GraphError> {
    let cx = Infer {
        id,
        name,
        op,
        ins: input_metas(g, id, name, inputs)?,
    };
    let outputs = match op {
        OpKind::Input | OpKind::Parameter { .. } | OpKind::KvCache { .. } | OpKind::Custom(_) => {
            return Ok(None)
        }
        OpKind::KvCacheAppend => cx.kv_cache_append(),
        OpKind::KvCacheRead { .. } => cx.kv_cache_read(),
        OpKind::Embedding => cx.embedding(),
        OpKind::Linear { bias, layout } => cx.linear(*bias, *layout),
        OpKind::MatMul { transpose_b } => cx.matmul(*transpose_b),
        OpKind::Conv2d {
            stride,
            padding,
            dilation,
            groups,
            bias,
        } => cx.conv2d(*stride, *padding, *dilation, *groups, *bias),
        OpKind::MaxPool2d {
            kernel,
            stride,
            padding,
        }
        | OpKind::AvgPool2d {
            kernel,
            stride,
            padding,
        } => cx.pool2d(*kernel, *stride, *padding),
        OpKind::GlobalAvgPool2d => cx.global_avg_pool2d(),
        OpKind::BatchNorm { .. } => cx.batch_norm(),
        OpKind::LayerNorm { .. } => cx.layer_norm(),
        OpKind::RmsNorm { .. } => cx.rms_norm(),
        OpKind::Softmax { axis, causal } => cx.softmax(*axis, *causal),
        OpKind::Attention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => cx.attention(*heads, *kv_heads, *head_dim),
        OpKind::CachedAttention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => cx.cached_attention(*heads, *kv_heads, *head_dim),
        OpKind::Rotary { head_dim, .. } => cx.rotary(*head_dim),
        OpKind::Add | OpKind::Mul => cx.broadcast_binary(),
        OpKind::Gelu { .. } | OpKind::Silu | OpKind::Relu | OpKind::Tanh => cx.activation(),
        OpKind::Reshape { shape } => cx.reshape(shape),
        OpKind::Transpose { perm } => cx.transpose(perm),
        OpKind::Concat { axis } => cx.concat(*axis),
        OpKind::Split { axis, sizes } => cx.split(*axis, sizes),
        OpKind::Slice { axis, start, end } => cx.slice(*axis, *start, *end),
        OpKind::ArgMax => cx.arg_max(),
    };
    outputs.map(Some)
}

/// The metadata of each of a node's inputs, or the error naming the first edge that points at no
/// node or at an output its producer does not have.
fn input_metas<'g>(
    g: &'g Graph,
    id: NodeId,
    name: &str,
    inputs: &[TensorRef],
) -> Result<Vec<&'g TensorMeta>, GraphError> {
    let mut ins = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.iter().enumerate() {
        let Some(p) = g.nodes.get(t.node.index()) else {
            return Err(GraphError::DanglingEdge {
                node: id,
                name: name.to_owned(),
                input: i,
                producer: t.node.0,
            });
        };
        let Some(m) = p.outputs.get(t.output as usize) else {
            return Err(GraphError::MissingOutput {
                node: id,
                name: name.to_owned(),
                input: i,
                producer: p.id,
                output: t.output,
                available: p.outputs.len(),
            });
        };
        ins.push(m);
    }
    Ok(ins)
}

/// A single output tensor.
fn one(shape: Vec<usize>, dtype: DType) -> Result<Vec<TensorMeta>, GraphError> {
    Ok(vec![TensorMeta { shape, dtype }])
}

/// The shape rules, one per op (ops sharing a rule share a method), by family: KV cache, linear
/// algebra, convolution and pooling, normalisation, attention, elementwise, shape.
impl Infer<'_> {
    fn kv_cache_append(&self) -> Result<Vec<TensorMeta>, GraphError> {
        let n = self.ins.len();
        self.arity(n == 2 || n == 3, "2 or 3")?;
        let (kpos, base) = if n == 3 { (1, Some(0)) } else { (0, None) };
        let dt = self.float(kpos)?;
        let k = self.rank(kpos, 3)?;
        if self.ins[kpos + 1].shape != k {
            return Err(self.shape_err(kpos + 1, format!("values must match keys {k:?}")));
        }
        self.same_dtype(kpos + 1, dt)?;
        match base {
            None => one(vec![2, k[0], k[1], k[2]], dt),
            Some(c) => {
                let cache = self.rank(c, 4)?;
                if cache[0] != 2 || cache[1] != k[0] || cache[3] != k[2] {
                    return Err(
                        self.shape_err(c, format!("cache must be [2, {}, L, {}]", k[0], k[2]))
                    );
                }
                self.same_dtype(c, dt)?;
                let len = cache[2]
                    .checked_add(k[1])
                    .ok_or_else(|| self.overflow("cache length + new tokens"))?;
                one(vec![2, k[0], len, k[2]], dt)
            }
        }
    }

    fn kv_cache_read(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let c = self.rank(0, 4)?;
        if c[0] != 2 {
            return Err(self.shape_err(0, "cache must be [2, B, L, E]"));
        }
        one(c[1..].to_vec(), self.ins[0].dtype)
    }

    fn embedding(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 2, "2")?;
        self.index(0, "i64 or i32 ids")?;
        let dt = self.float(1)?;
        let t = self.rank(1, 2)?;
        let mut s = self.ins[0].shape.clone();
        s.push(t[1]);
        one(s, dt)
    }

    fn linear(&self, bias: bool, layout: WeightLayout) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity_with_bias(bias)?;
        let dt = self.float(0)?;
        let x = &self.ins[0].shape;
        let w = self.rank(1, 2)?;
        self.same_dtype(1, dt)?;
        let (i, o) = match layout {
            WeightLayout::InOut => (w[0], w[1]),
            WeightLayout::OutIn => (w[1], w[0]),
        };
        if x.last() != Some(&i) {
            return Err(self.shape_err(0, format!("last axis must be {i} (weight {w:?})")));
        }
        if bias {
            self.vector(2, o)?;
            self.same_dtype(2, dt)?;
        }
        let mut s = x.clone();
        if let Some(last) = s.last_mut() {
            *last = o;
        }
        one(s, dt)
    }

    fn matmul(&self, transpose_b: bool) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 2, "2")?;
        let dt = self.float(0)?;
        self.same_dtype(1, dt)?;
        let a = &self.ins[0].shape;
        let b = &self.ins[1].shape;
        if a.len() < 2 {
            return Err(self.shape_err(0, "rank must be at least 2"));
        }
        if b.len() < 2 {
            return Err(self.shape_err(1, "rank must be at least 2"));
        }
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let (bk, bn) = if transpose_b {
            (b[b.len() - 1], b[b.len() - 2])
        } else {
            (b[b.len() - 2], b[b.len() - 1])
        };
        if bk != k {
            return Err(self.shape_err(1, format!("inner dimension must be {k}")));
        }
        let Some(mut s) = broadcast(&a[..a.len() - 2], &b[..b.len() - 2]) else {
            return Err(self.shape_err(1, "batch dims do not broadcast"));
        };
        s.push(m);
        s.push(bn);
        one(s, dt)
    }

    fn conv2d(
        &self,
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        bias: bool,
    ) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity_with_bias(bias)?;
        let dt = self.float(0)?;
        let x = self.rank(0, 4)?;
        let w = self.rank(1, 4)?;
        self.same_dtype(1, dt)?;
        if groups == 0 || x[1] % groups != 0 || w[0] % groups != 0 {
            return Err(self.attr_err(format!("groups {groups} must divide channels")));
        }
        if w[1].checked_mul(groups) != Some(x[1]) {
            return Err(self.shape_err(1, format!("weight must be [O, {}, kh, kw]", x[1] / groups)));
        }
        if bias {
            self.vector(2, w[0])?;
        }
        let h = pool_dim(x[2], w[2], stride[0], padding[0], dilation[0]);
        let wd = pool_dim(x[3], w[3], stride[1], padding[1], dilation[1]);
        match (h, wd) {
            (Some(h), Some(wd)) if dilation[0] > 0 && dilation[1] > 0 => {
                one(vec![x[0], w[0], h, wd], dt)
            }
            _ => Err(self.attr_err("stride/dilation zero or kernel larger than input")),
        }
    }

    /// Max and average pooling.
    fn pool2d(
        &self,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let dt = self.float(0)?;
        let x = self.rank(0, 4)?;
        if kernel[0] == 0 || kernel[1] == 0 {
            return Err(self.attr_err("kernel must be positive"));
        }
        let h = pool_dim(x[2], kernel[0], stride[0], padding[0], 1);
        let w = pool_dim(x[3], kernel[1], stride[1], padding[1], 1);
        match (h, w) {
            (Some(h), Some(w)) => one(vec![x[0], x[1], h, w], dt),
            _ => Err(self.attr_err("stride zero or window larger than input")),
        }
    }

    fn global_avg_pool2d(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let dt = self.float(0)?;
        let x = self.rank(0, 4)?;
        one(vec![x[0], x[1], 1, 1], dt)
    }

    fn batch_norm(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 5, "5")?;
        let dt = self.float(0)?;
        let x = &self.ins[0].shape;
        if x.len() < 2 {
            return Err(self.shape_err(0, "rank must be at least 2"));
        }
        for i in 1..5 {
            self.vector(i, x[1])?;
            self.same_dtype(i, dt)?;
        }
        one(x.clone(), dt)
    }

    fn layer_norm(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 3, "3")?;
        let dt = self.float(0)?;
        let Some(&d) = self.ins[0].shape.last() else {
            return Err(self.shape_err(0, "rank must be at least 1"));
        };
        for i in 1..3 {
            self.vector(i, d)?;
            self.same_dtype(i, dt)?;
        }
        one(self.ins[0].shape.clone(), dt)
    }

    fn rms_norm(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 2, "2")?;
        let dt = self.float(0)?;
        let Some(&d) = self.ins[0].shape.last() else {
            return Err(self.shape_err(0, "rank must be at least 1"));
        };
        self.vector(1, d)?;
        self.same_dtype(1, dt)?;
        one(self.ins[0].shape.clone(), dt)
    }

    fn softmax(&self, axis: usize, causal: bool) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let dt = self.float(0)?;
        let r = self.ins[0].rank();
        if axis >= r || (causal && r < 2) {
            return Err(self.attr_err(format!("axis {axis} / causal invalid for rank {r}")));
        }
        one(self.ins[0].shape.clone(), dt)
    }

    /// The widths of an attention's queries (`H·D`) and keys/values (`G·D`), checked: positive,
    /// no overflow, `G` dividing `H`.
    fn head_widths(
        &self,
        heads: usize,
        kv_heads: Option<usize>,
        head_dim: usize,
    ) -> Result<(usize, usize), GraphError> {
        let e = heads
            .checked_mul(head_dim)
            .ok_or_else(|| self.overflow("heads · head_dim"))?;
        if e == 0 {
            return Err(self.attr_err("heads and head_dim must be positive"));
        }
        let g = kv_heads.unwrap_or(heads);
        if g == 0 || heads % g != 0 {
            return Err(self.attr_err(format!("kv_heads {g} must divide heads {heads}")));
        }
        // g divides heads, so g · head_dim ≤ e does not overflow.
        Ok((e, g * head_dim))
    }

    fn attention(
        &self,
        heads: usize,
        kv_heads: Option<usize>,
        head_dim: usize,
    ) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 3, "3")?;
        let dt = self.float(0)?;
        let (e, ekv) = self.head_widths(heads, kv_heads, head_dim)?;
        let q = self.rank(0, 3)?;
        let k = self.rank(1, 3)?;
        if q[2] != e {
            return Err(self.shape_err(0, format!("expected [B, Q, {e}]")));
        }
        if k[0] != q[0] || k[2] != ekv {
            return Err(self.shape_err(1, format!("expected [{}, K, {ekv}]", q[0])));
        }
        if self.ins[2].shape != k {
            return Err(self.shape_err(2, format!("values must match keys {k:?}")));
        }
        self.same_dtype(1, dt)?;
        self.same_dtype(2, dt)?;
        one(q.to_vec(), dt)
    }

    fn cached_attention(
        &self,
        heads: usize,
        kv_heads: Option<usize>,
        head_dim: usize,
    ) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() >= 4, "4 or more")?;
        let dt = self.float(0)?;
        let (e, ekv) = self.head_widths(heads, kv_heads, head_dim)?;
        let n = self.ins.len() - 3;
        if self.rank(0, 3)? != [n, 1, e] {
            return Err(self.shape_err(0, format!("expected [{n}, 1, {e}] (one row per cache)")));
        }
        for i in [1, 2] {
            if self.rank(i, 3)? != [n, 1, ekv] {
                return Err(self.shape_err(i, format!("expected [{n}, 1, {ekv}]")));
            }
            self.same_dtype(i, dt)?;
        }
        for c in 3..self.ins.len() {
            let cache = self.rank(c, 4)?;
            if cache[0] != 2 || cache[1] != 1 || cache[3] != ekv {
                return Err(self.shape_err(c, format!("cache must be [2, 1, L, {ekv}]")));
            }
            self.same_dtype(c, dt)?;
        }
        one(vec![n, 1, e], dt)
    }

    fn rotary(&self, head_dim: usize) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 2, "2")?;
        let dt = self.float(0)?;
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(self.attr_err(format!("head_dim {head_dim} must be positive and even")));
        }
        let x = self.rank(0, 3)?;
        if x[2] % head_dim != 0 {
            return Err(self.shape_err(0, format!("last axis must be heads · {head_dim}")));
        }
        self.index(1, "i64 or i32 positions")?;
        if self.ins[1].shape != x[..2] {
            return Err(self.shape_err(1, format!("positions must be [{}, {}]", x[0], x[1])));
        }
        one(x.to_vec(), dt)
    }

    /// Add and Mul: two inputs of one dtype, broadcast against each other.
    fn broadcast_binary(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 2, "2")?;
        let dt = self.ins[0].dtype;
        self.same_dtype(1, dt)?;
        let Some(s) = broadcast(&self.ins[0].shape, &self.ins[1].shape) else {
            return Err(self.shape_err(
                1,
                format!("does not broadcast with {:?}", self.ins[0].shape),
            ));
        };
        one(s, dt)
    }

    /// Gelu, Silu, Relu, Tanh: one float input, same shape out.
    fn activation(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let dt = self.float(0)?;
        one(self.ins[0].shape.clone(), dt)
    }

    fn reshape(&self, shape: &[usize]) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let want = TensorMeta::new(shape.to_vec(), self.ins[0].dtype).checked_elements();
        if want.is_none() || want != self.ins[0].checked_elements() {
            return Err(self.shape_err(0, format!("cannot reshape to {shape:?}")));
        }
        one(shape.to_vec(), self.ins[0].dtype)
    }

    fn transpose(&self, perm: &[usize]) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let x = &self.ins[0].shape;
        let mut seen = vec![false; x.len()];
        if perm.len() != x.len()
            || !perm
                .iter()
                .all(|&p| p < x.len() && !std::mem::replace(&mut seen[p], true))
        {
            return Err(self.attr_err(format!("{perm:?} is not a permutation of rank {}", x.len())));
        }
        one(perm.iter().map(|&p| x[p]).collect(), self.ins[0].dtype)
    }

    fn concat(&self, axis: usize) -> Result<Vec<TensorMeta>, GraphError> {
        let n = self.ins.len();
        self.arity(n >= 1, "at least 1")?;
        let first = &self.ins[0].shape;
        if axis >= first.len() {
            return Err(self.attr_err(format!("axis {axis} out of range for rank {}", first.len())));
        }
        let mut s = first.clone();
        for i in 1..n {
            // A repeat of the first input needs no comparison (a concatenation of copies).
            if !std::ptr::eq(self.ins[i], self.ins[0]) {
                let o = &self.ins[i].shape;
                self.same_dtype(i, self.ins[0].dtype)?;
                if o.len() != first.len()
                    || o.iter()
                        .zip(first)
                        .enumerate()
                        .any(|(d, (a, b))| d != axis && a != b)
                {
                    return Err(
                        self.shape_err(i, format!("must match {first:?} except on axis {axis}"))
                    );
                }
            }
            s[axis] = s[axis]
                .checked_add(self.ins[i].shape[axis])
                .ok_or_else(|| self.overflow(format!("length of axis {axis}")))?;
        }
        one(s, self.ins[0].dtype)
    }

    fn split(&self, axis: usize, sizes: &[usize]) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let x = &self.ins[0].shape;
        let total = sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b));
        if axis >= x.len() || total != Some(x[axis]) || sizes.is_empty() {
            return Err(self.attr_err(format!("sizes {sizes:?} do not split axis {axis} of {x:?}")));
        }
        Ok(sizes
            .iter()
            .map(|&len| {
                let mut s = x.clone();
                s[axis] = len;
                TensorMeta::new(s, self.ins[0].dtype)
            })
            .collect())
    }

    fn arg_max(&self) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        self.float(0)?;
        let x = &self.ins[0].shape;
        if x.last().map_or(true, |&v| v == 0) {
            return Err(self.shape_err(0, "needs a last axis of at least one value"));
        }
        one(x[..x.len() - 1].to_vec(), DType::I64)
    }

    fn slice(&self, axis: usize, start: usize, end: usize) -> Result<Vec<TensorMeta>, GraphError> {
        self.arity(self.ins.len() == 1, "1")?;
        let x = &self.ins[0].shape;
        if axis >= x.len() || start >= end || end > x[axis] {
            return Err(self.attr_err(format!("slice {start}..{end} of axis {axis} of {x:?}")));
        }
        let mut s = x.clone();
        s[axis] = end - start;
        one(s, self.ins[0].dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Graph {
        let mut g = Graph::new("tiny");
        let x = g
            .add_with_outputs(
                "x",
                OpKind::Input,
                vec![],
                vec![TensorMeta::new([2, 4], DType::F32)],
                Semantics::default(),
            )
            .unwrap();
        let w = g
            .add_with_outputs(
                "w",
                OpKind::Parameter { trainable: true },
                vec![],
                vec![TensorMeta::new([4, 3], DType::F32)],
                Semantics::default(),
            )
            .unwrap();
        let y = g
            .add(
                "fc",
                OpKind::Linear {
                    bias: false,
                    layout: WeightLayout::InOut,
                },
                vec![x.into(), w.into()],
                Semantics::default(),
            )
            .unwrap();
        g.add("act", OpKind::Relu, vec![y.into()], Semantics::default())
            .unwrap();
        g.outputs.push(NodeId(3).into());
        g
    }

    #[test]
    fn json_round_trip_and_doc_example() {
        let g = tiny();
        g.validate().unwrap();
        let back = Graph::from_json(&g.to_json().unwrap()).unwrap();
        assert_eq!(back, g);
        assert_eq!(back.structural_hash(), g.structural_hash());
        let doc = r#"{"name":"tiny","nodes":[
          {"id":0,"name":"x","op":{"kind":"input"},"outputs":[{"shape":[2,4],"dtype":"f32"}]},
          {"id":1,"name":"fc.weight","op":{"kind":"parameter","attrs":{"trainable":true}},
           "outputs":[{"shape":[4,3],"dtype":"f32"}],"semantics":{"residency":"persistent_weight"}},
          {"id":2,"name":"fc","op":{"kind":"linear","attrs":{"bias":false,"layout":"in_out"}},
           "inputs":[{"node":0,"output":0},{"node":1,"output":0}],
           "outputs":[{"shape":[2,3],"dtype":"f32"}],
           "semantics":{"phase":"prefill","module_path":"fc","colocation_group":"g0",
                        "fusion_group":null,"priority":0,"custom":{"origin":"fx"}}}],
          "outputs":[{"node":2,"output":0}]}"#;
        let g2 = Graph::from_json(doc).unwrap();
        assert_eq!(g2.parameter_count(), 12);
        // JSON written before nodes had layers still loads: no node is in a layer.
        assert!(g2.nodes().iter().all(|n| n.layer().is_none()));
        let custom = r#"{"kind":"custom","attrs":"rope"}"#;
        assert_eq!(
            serde_json::from_str::<OpKind>(custom).unwrap(),
            OpKind::Custom("rope".into())
        );
    }

    #[test]
    fn layers_round_trip_and_are_validated() {
        let g = with_node(tiny(), |n| n.semantics.layer = Some(7));
        g.validate().unwrap();
        let json = g.to_json().unwrap();
        assert!(json.contains("\"layer\": 7"), "{json}");
        let back = Graph::from_json(&json).unwrap();
        assert_eq!(back.node(NodeId(2)).unwrap().layer(), Some(7));
        assert_eq!(back, g);
        // The layer is part of the structure: a schedule cached for one layering is not reused
        // for another.
        assert_ne!(g.structural_hash(), tiny().structural_hash());
        // From a frontend: too large, negative or beyond u32 is refused, typed.
        let layered = |l: &str| json.replace("\"layer\": 7", &format!("\"layer\": {l}"));
        assert!(matches!(
            Graph::from_json(&layered("65536")),
            Err(crate::Error::Graph(GraphError::LayerTooLarge {
                layer: 65536,
                ..
            }))
        ));
        for bad in ["-1", "4294967296", "\"3\""] {
            assert!(matches!(
                Graph::from_json(&layered(bad)),
                Err(crate::Error::Json(_))
            ));
        }
        assert_eq!(
            Graph::from_json(&layered("null"))
                .unwrap()
                .node(NodeId(2))
                .unwrap()
                .layer(),
            None
        );

        let g = with_node(tiny(), |n| n.semantics.layer = Some(MAX_LAYER + 1));
        assert!(matches!(
            g.validate(),
            Err(GraphError::LayerTooLarge { layer, max: MAX_LAYER, .. }) if layer == MAX_LAYER + 1
        ));
        let mut g = Graph::new("kv");
        let cache = |layer| OpKind::KvCache { layer, slot: 0 };
        let meta = || vec![TensorMeta::new([2, 1, 4, 8], DType::F32)];
        let at = |layer| Semantics {
            layer,
            ..Semantics::default()
        };
        // A KV cache without a semantic layer is in its op's layer.
        let c = g
            .add_with_outputs("past", cache(3), vec![], meta(), at(None))
            .unwrap();
        assert_eq!(g.node(c).unwrap().layer(), Some(3));
        let e = g
            .add_with_outputs("past2", cache(3), vec![], meta(), at(Some(4)))
            .unwrap_err();
        assert!(matches!(
            e,
            GraphError::LayerMismatch {
                layer: 4,
                op_layer: 3,
                ..
            }
        ));
        let e = g
            .add_with_outputs("past3", cache(u32::MAX), vec![], meta(), at(None))
            .unwrap_err();
        assert!(matches!(e, GraphError::LayerTooLarge { .. }), "{e}");
        g.add_with_outputs(
            "past4",
            cache(MAX_LAYER),
            vec![],
            meta(),
            at(Some(MAX_LAYER)),
        )
        .unwrap();
        g.validate().unwrap();
        g.node_mut(NodeId(1)).unwrap().semantics.layer = Some(0);
        assert!(matches!(
            g.validate(),
            Err(GraphError::LayerMismatch { layer: 0, .. })
        ));
    }

    fn with_node(mut g: Graph, f: impl FnOnce(&mut Node)) -> Graph {
        f(g.node_mut(NodeId(2)).unwrap());
        g
    }

    #[test]
    fn malformed_graphs_give_typed_errors() {
        let g = with_node(tiny(), |n| n.inputs[0] = TensorRef::new(NodeId(9), 0));
        assert!(matches!(
            g.validate(),
            Err(GraphError::DanglingEdge {
                producer: 9,
                input: 0,
                ..
            })
        ));
        let g = with_node(tiny(), |n| n.inputs[0] = TensorRef::new(NodeId(0), 1));
        assert!(matches!(
            g.validate(),
            Err(GraphError::MissingOutput { output: 1, .. })
        ));
        let g = with_node(tiny(), |n| n.id = NodeId(1));
        assert!(matches!(
            g.validate(),
            Err(GraphError::DuplicateId {
                id: 1,
                first: 1,
                second: 2
            })
        ));
        let g = with_node(tiny(), |n| n.id = NodeId(7));
        assert!(matches!(
            g.validate(),
            Err(GraphError::IdNotPosition {
                position: 2,
                id: 7,
                ..
            })
        ));
        let g = with_node(tiny(), |n| n.inputs[0] = TensorRef::new(NodeId(3), 0));
        match g.validate() {
            Err(GraphError::Cycle { node, .. }) => assert!(node == NodeId(2) || node == NodeId(3)),
            other => panic!("expected a cycle, got {other:?}"),
        }
        let g = with_node(tiny(), |n| n.outputs[0].shape = vec![2, 5]);
        assert!(matches!(
            g.validate(),
            Err(GraphError::OutputMismatch {
                node: NodeId(2),
                ..
            })
        ));
        let mut g = tiny();
        g.node_mut(NodeId(1)).unwrap().outputs[0].shape = vec![5, 3];
        match g.validate() {
            Err(GraphError::ShapeMismatch {
                node,
                name,
                input,
                found,
                ..
            }) => {
                assert_eq!(
                    (node, name.as_str(), input, found),
                    (NodeId(2), "fc", 0, vec![2, 4])
                );
            }
            other => panic!("expected a shape mismatch, got {other:?}"),
        }
        let mut g = tiny();
        g.node_mut(NodeId(0)).unwrap().outputs[0].dtype = DType::I64;
        assert!(matches!(
            g.validate(),
            Err(GraphError::DTypeMismatch {
                found: DType::I64,
                ..
            })
        ));
        let g = with_node(tiny(), |n| {
            n.inputs.pop();
        });
        assert!(matches!(
            g.validate(),
            Err(GraphError::Arity { found: 1, .. })
        ));
        let g = with_node(tiny(), |n| {
            n.op = OpKind::Transpose { perm: vec![0, 0] };
            n.inputs.pop();
        });
        assert!(matches!(
            g.validate(),
            Err(GraphError::InvalidAttribute {
                node: NodeId(2),
                ..
            })
        ));
        assert!(matches!(
            Graph::from_json("{\"name\": 3}"),
            Err(crate::Error::Json(_))
        ));
        let mut g = tiny();
        g.outputs.push(TensorRef::new(NodeId(40), 0));
        assert!(matches!(
            g.validate(),
            Err(GraphError::DanglingGraphOutput { index: 1, .. })
        ));
    }

    #[test]
    fn hash_changes_on_mutation() {
        let mut g = tiny();
        let h = g.structural_hash();
        g.node_mut(NodeId(3)).unwrap().semantics.priority = 5;
        assert_ne!(h, g.structural_hash());
    }

    #[test]
    fn topo_order_handles_unordered_ids() {
        let g = tiny();
        let order = g.topo_order().unwrap();
        assert_eq!(order.len(), 4);
        let cons = g.consumers();
        assert_eq!(cons.of(NodeId(0)), &[NodeId(2)]);
        assert_eq!(cons.of(NodeId(2)), &[NodeId(3)]);
    }
}
