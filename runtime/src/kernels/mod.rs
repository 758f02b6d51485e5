//! Kernels: what computes a node's outputs from its inputs.
//!
//! [`Kernels`] is the plug-in point for a serving stack's own kernels; [`CpuKernels`] is the
//! reference backend on `candle-core`, which runs every op the scheduler's model builders emit
//! (GPT-2, BERT, ResNet-50). Source nodes (inputs, parameters, KV-cache state) are not kernels:
//! the executor supplies them from the caller, the [`weights`](crate::weights) and the
//! [`kv`](crate::kv) manager.

mod cpu;
mod decode;

pub use cpu::CpuKernels;

/// Most rows a product of [`CpuKernels`] computes with each row's result the same bits whether it
/// comes alone or with others (its few-row products; more rows go to gemm, which packs them and
/// sums in another order). A batched decode step or prefill within it gives each sequence the
/// bits it gets alone.
pub const EXACT_BATCH_ROWS: usize = 64;

use crate::error::{Result, RuntimeError};
use candle_core::{DType as CDType, Device, Tensor};
use genie_scheduler::graph::{DType, Node, TensorMeta};

/// Computes nodes. Implementations must be deterministic for a given input if the runtime's
/// "same answer on any number of workers" guarantee is to be bitwise.
pub trait Kernels: Send + Sync {
    /// Short name shown in summaries.
    fn name(&self) -> &str;
    /// Computes `node`'s outputs (in the op's documented order) from its inputs.
    fn run(&self, node: &Node, inputs: &[Tensor]) -> Result<Vec<Tensor>>;
    /// The attention of an [`OpKind::CachedAttention`](genie_scheduler::graph::OpKind) `node`
    /// once the worker has appended each row's key and value to its sequence's cache: `q` is
    /// `[N, 1, H·D]`, `caches[i]` sequence `i`'s whole cache `[2, 1, L_i + 1, G·D]` (a view of
    /// the worker's KV pages); returns `[N, 1, H·D]`, row `i` the bits the one-sequence step's
    /// `Attention` gives it.
    fn cached_attention(&self, node: &Node, q: &Tensor, caches: &[Tensor]) -> Result<Tensor>;
}

/// The candle dtype that stores a graph dtype.
pub fn candle_dtype(d: DType) -> Result<CDType> {
    Ok(match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::Bf16 => CDType::BF16,
        DType::I64 => CDType::I64,
        DType::I32 => CDType::I32,
        DType::U8 | DType::Bool => CDType::U8,
    })
}

/// Serializes a tensor to little-endian bytes (contiguous, row-major).
pub fn tensor_to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let err = |source| RuntimeError::Kernel {
        node: "<serialize>".into(),
        source,
    };
    let flat = t.flatten_all().map_err(err)?;
    Ok(match t.dtype() {
        CDType::F32 => flat
            .to_vec1::<f32>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::I64 => flat
            .to_vec1::<i64>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::U32 => flat
            .to_vec1::<u32>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CDType::U8 => flat.to_vec1::<u8>().map_err(err)?,
        other => {
            return Err(RuntimeError::Plan(format!(
                "cannot move tensors of dtype {other:?} between workers"
            )))
        }
    })
}

/// Rebuilds a tensor of `meta` from little-endian bytes; the length must match exactly.
pub fn tensor_from_bytes(meta: &TensorMeta, bytes: &[u8]) -> Result<Tensor> {
    let want = crate::limits::checked_bytes(meta).ok_or_else(|| RuntimeError::ShapeOverflow {
        tensor: "<payload>".into(),
        shape: meta.shape.clone(),
    })?;
    if bytes.len() as u64 != want {
        return Err(RuntimeError::Plan(format!(
            "tensor {meta}: expected {want} bytes, got {}",
            bytes.len()
        )));
    }
    let err = |source| RuntimeError::Kernel {
        node: "<deserialize>".into(),
        source,
    };
    let shape = meta.shape.clone();
    let t = match meta.dtype {
        DType::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        }
        DType::I64 => {
            let v: Vec<i64> = bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
        }
        DType::U8 | DType::Bool => Tensor::from_vec(bytes.to_vec(), shape, &Device::Cpu),
        other => {
            return Err(RuntimeError::Plan(format!(
                "cannot move tensors of dtype {other:?} between workers"
            )))
        }
    };
    t.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_exactly() {
        let meta = TensorMeta::new([2, 3], DType::F32);
        let t = Tensor::from_vec(
            vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.25, 1e-30, 7.0],
            (2, 3),
            &Device::Cpu,
        )
        .unwrap();
        let b = tensor_to_bytes(&t).unwrap();
        let back = tensor_from_bytes(&meta, &b).unwrap();
        assert_eq!(tensor_to_bytes(&back).unwrap(), b);
        assert!(tensor_from_bytes(&meta, &b[..4]).is_err());
        let ids = Tensor::from_vec(vec![1i64, 2, 3], 3, &Device::Cpu).unwrap();
        let meta = TensorMeta::new([3], DType::I64);
        let back = tensor_from_bytes(&meta, &tensor_to_bytes(&ids).unwrap()).unwrap();
        assert_eq!(back.to_vec1::<i64>().unwrap(), vec![1, 2, 3]);
    }
}
