//! Weights for [`OpKind::Parameter`] nodes: seeded random by default, or loaded from a
//! safetensors checkpoint in the Hugging Face layout.
//!
//! Seeded weights depend only on (seed, parameter name, shape), so every worker (in-process or
//! a separate process) produces the same value for a parameter without any transfer, and a
//! worker only materialises the parameters its nodes use.
//!
//! Checkpoint keys are the parameter node names (`transformer.h.0.attn.c_attn.weight` for
//! GPT-2 in Conv1D `[in, out]` layout). Hugging Face GPT-2 files often omit the
//! `transformer.` prefix; both spellings are accepted. The LM head is tied to
//! `transformer.wte.weight` by the builder, so no separate key is needed.

use crate::error::{Result, RuntimeError};
use candle_core::{DType as CDType, Device, Tensor};
use genie_scheduler::graph::{Node, OpKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where parameter values come from.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// Deterministic pseudo-random values from this seed.
    Seeded(u64),
    /// Tensors of a safetensors checkpoint, by name.
    Checkpoint {
        /// The file they came from.
        path: PathBuf,
        /// Tensors by key.
        tensors: HashMap<String, Tensor>,
    },
}

/// FNV-1a: a stable hash of a parameter name (std's hasher is not stable across releases).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl WeightSource {
    /// Loads a checkpoint: `path` is a `.safetensors` file or a directory holding
    /// `model.safetensors`.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("model.safetensors")
        } else {
            path.to_path_buf()
        };
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
            RuntimeError::Checkpoint {
                path: file.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self::Checkpoint {
            path: file,
            tensors,
        })
    }

    /// The value of parameter `node` (f32, the node's declared shape).
    pub fn value(&self, node: &Node) -> Result<Tensor> {
        let meta = node.outputs.first().ok_or_else(|| RuntimeError::Weight {
            name: node.name.clone(),
            reason: "parameter node has no output".into(),
        })?;
        let werr = |reason: String| RuntimeError::Weight {
            name: node.name.clone(),
            reason,
        };
        match self {
            WeightSource::Seeded(seed) => {
                let n = meta.elements() as usize;
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&node.name));
                let name = node.name.as_str();
                let trainable = matches!(node.op, OpKind::Parameter { trainable: true });
                let rank1 = meta.shape.len() == 1;
                // Magnitudes in the range of the real models' initialisation, so activations
                // stay finite through deep stacks.
                let v: Vec<f32> = if name.ends_with("running_var") {
                    (0..n).map(|_| rng.random_range(0.5..1.5)).collect()
                } else if name.ends_with("running_mean") || !trainable && rank1 {
                    (0..n).map(|_| rng.random_range(-0.1..0.1)).collect()
                } else if rank1 && name.ends_with("weight") {
                    (0..n).map(|_| rng.random_range(0.8..1.2)).collect()
                } else if rank1 {
                    (0..n).map(|_| rng.random_range(-0.05..0.05)).collect()
                } else {
                    let fan_in: usize = if meta.shape.len() == 4 {
                        meta.shape[1..].iter().product()
                    } else {
                        meta.shape.iter().copied().min().unwrap_or(1)
                    };
                    let a = (1.0 / (fan_in.max(1) as f32)).sqrt();
                    (0..n).map(|_| rng.random_range(-a..a)).collect()
                };
                Tensor::from_vec(v, meta.shape.clone(), &Device::Cpu)
                    .map_err(|e| werr(e.to_string()))
            }
            WeightSource::Checkpoint { path, tensors } => {
                let alt = match node.name.strip_prefix("transformer.") {
                    Some(rest) => rest.to_string(),
                    None => format!("transformer.{}", node.name),
                };
                let t = tensors
                    .get(&node.name)
                    .or_else(|| tensors.get(&alt))
                    .ok_or_else(|| werr(format!("not found in checkpoint {}", path.display())))?;
                if t.dims() != meta.shape.as_slice() {
                    return Err(werr(format!(
                        "checkpoint has shape {:?}, graph needs {:?}",
                        t.dims(),
                        meta.shape
                    )));
                }
                t.to_dtype(CDType::F32).map_err(|e| werr(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genie_scheduler::graph::{DType, NodeId, Semantics, TensorMeta};

    fn param(name: &str, shape: &[usize]) -> Node {
        Node {
            id: NodeId(0),
            name: name.into(),
            op: OpKind::Parameter { trainable: true },
            inputs: vec![],
            outputs: vec![TensorMeta::new(shape.to_vec(), DType::F32)],
            semantics: Semantics::default(),
        }
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn seeded_is_stable_per_name_and_seed() {
        let s = WeightSource::Seeded(7);
        let a = s.value(&param("h.0.w", &[4, 8])).unwrap();
        assert_eq!(vals(&a), vals(&s.value(&param("h.0.w", &[4, 8])).unwrap()));
        assert_ne!(vals(&a), vals(&s.value(&param("h.1.w", &[4, 8])).unwrap()));
        let other = WeightSource::Seeded(8)
            .value(&param("h.0.w", &[4, 8]))
            .unwrap();
        assert_ne!(vals(&a), vals(&other));
    }

    #[test]
    fn checkpoint_round_trip_with_prefix_and_shape_check() {
        let dir = std::env::temp_dir().join(format!("genie-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
        let mut m = HashMap::new();
        m.insert("h.0.attn.c_attn.weight".to_string(), t);
        candle_core::safetensors::save(&m, &file).unwrap();
        let s = WeightSource::load(&dir).unwrap();
        let v = s
            .value(&param("transformer.h.0.attn.c_attn.weight", &[2, 2]))
            .unwrap();
        assert_eq!(vals(&v), vec![1.0, 2.0, 3.0, 4.0]);
        let e = s.value(&param("transformer.h.0.attn.c_attn.weight", &[4]));
        assert!(matches!(e, Err(RuntimeError::Weight { .. })));
        assert!(s.value(&param("missing", &[2])).is_err());
        assert!(WeightSource::load(&dir.join("nope.safetensors")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
