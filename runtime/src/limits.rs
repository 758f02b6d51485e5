//! What a driver may make a worker allocate or open: the worker's options and the checks that
//! run on every graph, placement and input before anything is sized by them.
//!
//! A driver is trusted to be authenticated, not to be correct. Every size a worker computes
//! from driver input goes through [`tensor_bytes`] (checked arithmetic: a shape whose size
//! overflows is a typed [`RuntimeError::ShapeOverflow`], never a wrap or a panic), and every
//! allocation sized by the driver (a parameter, an input, a node's outputs, a landing region,
//! the KV pool, the weight cache) is held to the worker's memory budget first
//! ([`RuntimeError::OverBudget`]). Checkpoints are read only from the worker's model directory,
//! and only from regular files ([`checkpoint_path`]). The checks are linear in the size of the
//! graph.

use crate::error::{Result, RuntimeError};
use genie_scheduler::graph::{Graph, OpKind, TensorMeta};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The default memory budget of a worker: 4 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 4 << 30;

/// Most decoder layers a KV cache may have (GPT-2 XL has 48, Llama-3 405B 126).
pub const MAX_KV_LAYERS: usize = 1024;

/// How a worker limits what drivers may ask of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerOptions {
    /// Directory checkpoints may be loaded from (`genie worker --model-dir`). Default none:
    /// only seeded weights.
    pub model_dir: Option<PathBuf>,
    /// Bytes any one pool of driver-sized memory may hold: a run's tensors, the weight cache,
    /// the KV pool, the landing regions of one link; and so the largest single tensor.
    /// Default [`DEFAULT_MEMORY_BUDGET`] (`genie worker --memory-budget-mb`).
    pub memory_budget: u64,
    /// Compute threads of its own (`genie worker --threads`). `None` (the default): the
    /// process's shared pool (one thread per core), which workers of one process share.
    /// `Some(n)`: a pool of `n` threads for this worker alone, so that workers sharing a
    /// machine (an [`crate::driver::EmbeddedCluster`], a benchmark) do not queue behind one
    /// another's kernels: a prefill worker's long matrix products then never delay a decode
    /// worker's step. At least 1.
    pub threads: Option<usize>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            model_dir: None,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            threads: None,
        }
    }
}

/// Bytes of a tensor of `meta`, or `None` when the product overflows 64 bits.
pub fn checked_bytes(meta: &TensorMeta) -> Option<u64> {
    meta.shape
        .iter()
        .try_fold(meta.dtype.size(), |acc, &d| acc.checked_mul(d as u64))
}

/// Bytes of output `output` of node `node`, as a typed error when the product overflows.
pub fn tensor_bytes(node: &str, output: usize, meta: &TensorMeta) -> Result<u64> {
    checked_bytes(meta).ok_or_else(|| RuntimeError::ShapeOverflow {
        tensor: format!("{node}:{output}"),
        shape: meta.shape.clone(),
    })
}

/// Refuses `bytes` for `what` if it exceeds `budget`.
pub fn within_budget(worker: &str, what: &str, bytes: u64, budget: u64) -> Result<()> {
    within_budget_of(worker, || what.to_owned(), bytes, budget)
}

/// [`within_budget`] naming `what` only when it refuses (no string made per check on hot paths).
pub fn within_budget_of(
    worker: &str,
    what: impl FnOnce() -> String,
    bytes: u64,
    budget: u64,
) -> Result<()> {
    if bytes > budget {
        return Err(RuntimeError::OverBudget {
            worker: worker.into(),
            what: what(),
            bytes,
            budget,
        });
    }
    Ok(())
}

/// Checks every tensor a graph declares against the budget, before the graph is validated or
/// anything is sized by it: each tensor's size must be computable and within the budget, and
/// each KV cache's layer below [`MAX_KV_LAYERS`]. One pass over the nodes and their outputs.
pub fn check_graph_sizes(worker: &str, graph: &Graph, budget: u64) -> Result<()> {
    for n in graph.nodes() {
        for (o, meta) in n.outputs.iter().enumerate() {
            let bytes = tensor_bytes(&n.name, o, meta)?;
            within_budget_of(worker, || format!("tensor `{}:{o}`", n.name), bytes, budget)?;
        }
        if let OpKind::KvCache { layer, .. } = n.op {
            if layer as usize >= MAX_KV_LAYERS {
                return Err(RuntimeError::KvCache {
                    reason: format!(
                        "`{}` reads layer {layer}; at most {MAX_KV_LAYERS} layers are kept",
                        n.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The checkpoint a driver names, resolved inside `model_dir`: a path relative to it (or an
/// absolute one inside it), which after resolving links must still lie inside it and be a
/// regular file (or a directory holding `model.safetensors`, which must be one) of at most
/// `budget` bytes. Never opens the file, so a FIFO or a device cannot block or feed the worker.
pub fn checkpoint_path(model_dir: Option<&Path>, asked: &str, budget: u64) -> Result<PathBuf> {
    let refuse = |path: &Path, reason: String| RuntimeError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let asked_path = Path::new(asked);
    let Some(dir) = model_dir else {
        return Err(refuse(
            asked_path,
            "this worker has no model directory (start it with `genie worker --model-dir DIR`)"
                .into(),
        ));
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| refuse(dir, format!("model directory: {e}")))?;
    let joined = dir.join(asked_path);
    let mut file = joined
        .canonicalize()
        .map_err(|e| refuse(&joined, e.to_string()))?;
    if file.is_dir() {
        // A Hugging Face folder: `model.safetensors`, or the index of its shards (which the
        // loader reads from beside the index, by bare file names only; the budget below is then
        // the index's size: shards are memory-mapped, and what a run materialises of them is
        // held to the weight cache's budget).
        file = crate::weights::checkpoint_file(&file)
            .canonicalize()
            .map_err(|e| refuse(&joined, e.to_string()))?;
    }
    if !file.starts_with(&dir) {
        return Err(refuse(
            &file,
            format!("outside the model directory {}", dir.display()),
        ));
    }
    let meta = std::fs::metadata(&file).map_err(|e| refuse(&file, e.to_string()))?;
    if !meta.is_file() {
        return Err(refuse(&file, "not a regular file".into()));
    }
    within_budget("<checkpoint>", "checkpoint", meta.len(), budget)
        .map_err(|e| refuse(&file, e.to_string()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use genie_scheduler::graph::{DType, Semantics};

    #[test]
    fn sizes_are_checked_not_wrapped() {
        let ok = TensorMeta::new(vec![2, 3], DType::F32);
        assert_eq!(checked_bytes(&ok), Some(24));
        let wraps = TensorMeta::new(vec![1 << 32, 1 << 32], DType::F32);
        assert_eq!(checked_bytes(&wraps), None);
        assert!(matches!(
            tensor_bytes("x", 0, &wraps),
            Err(RuntimeError::ShapeOverflow { .. })
        ));
        let mut g = Graph::new("big");
        g.add_with_outputs(
            "p",
            OpKind::Parameter { trainable: true },
            vec![],
            vec![TensorMeta::new(vec![1 << 40], DType::F32)],
            Semantics::default(),
        )
        .unwrap();
        assert!(matches!(
            check_graph_sizes("w", &g, 1 << 30),
            Err(RuntimeError::OverBudget { .. })
        ));
        check_graph_sizes("w", &g, u64::MAX).unwrap();
    }

    #[test]
    fn checkpoints_only_from_the_model_dir_and_only_regular_files() {
        let dir = std::env::temp_dir().join(format!("genie-limits-{}", std::process::id()));
        let models = dir.join("models");
        std::fs::create_dir_all(models.join("gpt2")).unwrap();
        std::fs::write(models.join("gpt2/model.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("outside.safetensors"), b"x").unwrap();
        let m = Some(models.as_path());
        assert!(checkpoint_path(m, "gpt2", 1 << 20).is_ok());
        assert!(checkpoint_path(m, "gpt2/model.safetensors", 1 << 20).is_ok());
        for bad in ["../outside.safetensors", "/dev/zero", "/etc/passwd", "nope"] {
            assert!(
                matches!(
                    checkpoint_path(m, bad, 1 << 20),
                    Err(RuntimeError::Checkpoint { .. })
                ),
                "{bad}"
            );
        }
        assert!(checkpoint_path(m, "gpt2", 0).is_err());
        assert!(checkpoint_path(None, "gpt2", 1 << 20).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
