//! Weights for [`OpKind::Parameter`] nodes: seeded random by default, or read from a Hugging Face
//! model folder's safetensors.
//!
//! Seeded weights depend only on (seed, parameter name, shape), so every worker (in-process or
//! a separate process) produces the same value for a parameter without any transfer, and a
//! worker only materialises the parameters its nodes use.
//!
//! Checkpoints: a `.safetensors` file, or a folder with `model.safetensors` or the shards listed
//! by `model.safetensors.index.json` (`model-0000N-of-0000M.safetensors`). Files are
//! memory-mapped ([`genie_sys::mmap::MappedFile`]); a tensor is read, and converted from f16,
//! bf16 or f32 to f32, when a node asks for it. Checkpoint keys are the parameter node names;
//! the family named by the folder's `config.json` adds the other spellings it accepts
//! ([`crate::models::checkpoint_keys`]: GPT-2 files with or without `transformer.`). Errors
//! name the file and the tensor.

use crate::error::{Result, RuntimeError};
use candle_core::{Device, Tensor};
use genie_scheduler::graph::{Node, OpKind};
use genie_sys::mmap::MappedFile;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where parameter values come from.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// Deterministic pseudo-random values from this seed.
    Seeded(u64),
    /// Tensors of a safetensors checkpoint (one file or shards), by name.
    Checkpoint(Arc<Checkpoint>),
}

/// Memory-mapped safetensors files and where each tensor lies in them.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file or index the checkpoint was opened from.
    pub path: PathBuf,
    /// `model_type` from the folder's `config.json`, when there is one.
    pub model_type: Option<String>,
    files: Vec<(PathBuf, MappedFile)>,
    tensors: HashMap<String, Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
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

/// The file (and, for a sharded checkpoint, the index) a folder or file path names.
pub fn checkpoint_file(path: &Path) -> PathBuf {
    if !path.is_dir() {
        return path.to_path_buf();
    }
    let single = path.join("model.safetensors");
    let index = path.join("model.safetensors.index.json");
    if !single.exists() && index.exists() {
        index
    } else {
        single
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding one.
    pub fn open(path: &Path) -> Result<Self> {
        let file = checkpoint_file(path);
        let err = |p: &Path, reason: String| RuntimeError::Checkpoint {
            path: p.to_path_buf(),
            reason,
        };
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let is_index = file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".index.json"));
        let shards: Vec<String> = if is_index {
            let text = std::fs::read_to_string(&file).map_err(|e| err(&file, e.to_string()))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let idx: Index =
                serde_json::from_str(&text).map_err(|e| err(&file, format!("index: {e}")))?;
            let mut names: Vec<String> = idx.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            for n in &names {
                // Shards lie beside the index: a bare file name, never a path.
                if n.contains('/') || n.contains('\\') || n == ".." || n.is_empty() {
                    return Err(err(&file, format!("shard `{n}` is not a file name")));
                }
            }
            names
        } else {
            vec![String::new()]
        };
        let mut files = Vec::with_capacity(shards.len());
        let mut tensors = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let p = if is_index {
                dir.join(shard)
            } else {
                file.clone()
            };
            let map = MappedFile::open(&p).map_err(|e| err(&p, e.to_string()))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| err(&p, format!("not a safetensors file: {e}")))?;
            for (name, info) in meta.tensors() {
                let base = 8 + n;
                tensors.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + info.data_offsets.0,
                        end: base + info.data_offsets.1,
                    },
                );
            }
            files.push((p, map));
        }
        let model_type = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(str::to_owned));
        Ok(Self {
            path: file,
            model_type,
            files,
            tensors,
        })
    }

    /// Names of all tensors held.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Tensor `key` as f32 with `shape` (any of `keys`, the first found), or an error naming the
    /// file and the tensor.
    pub fn tensor(&self, keys: &[String], shape: &[usize]) -> Result<Tensor> {
        let name = keys.first().cloned().unwrap_or_default();
        let Some((key, e)) = keys
            .iter()
            .find_map(|k| self.tensors.get(k).map(|e| (k, e)))
        else {
            return Err(RuntimeError::Weight {
                name,
                reason: format!("not found in checkpoint {}", self.path.display()),
            });
        };
        let (file, map) = &self.files[e.file];
        let werr = |reason: String| RuntimeError::Weight {
            name: key.clone(),
            reason: format!("{} (in {})", reason, file.display()),
        };
        if e.shape != shape {
            return Err(werr(format!(
                "checkpoint has shape {:?}, the config needs {shape:?}",
                e.shape
            )));
        }
        let bytes = map
            .get(e.start..e.end)
            .ok_or_else(|| werr("data lies outside the file".into()))?;
        let v: Vec<f32> = match e.dtype {
            safetensors::Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(werr(format!("dtype {other:?} is not supported"))),
        };
        Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).map_err(|e| werr(e.to_string()))
    }
}

impl WeightSource {
    /// Loads a checkpoint: `path` is a `.safetensors` file, a `model.safetensors.index.json`,
    /// or a Hugging Face model folder holding either.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self::Checkpoint(Arc::new(Checkpoint::open(path)?)))
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
            WeightSource::Checkpoint(c) => {
                let keys = crate::models::checkpoint_keys(c.model_type.as_deref(), &node.name);
                c.tensor(&keys, &meta.shape)
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
