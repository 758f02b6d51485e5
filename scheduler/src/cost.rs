//! Cost model: FLOPs and bytes per operation, timed with a roofline on a device spec.
//!
//! [`RooflineCostModel`] estimates `time = launch + max(flops / (peak · util), bytes / mem_bw)`.
//! Device specs are plain data ([`DeviceSpec`]) with presets for common accelerators. Like the
//! rest of the scheduler the model is deterministic and does no I/O: the same inputs always give
//! the same estimate, so a decision can be replayed from a recorded graph and topology.

use crate::graph::{Graph, Node, OpKind, TensorMeta};
use serde::{Deserialize, Serialize};

/// What kind of processor a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A host CPU.
    Cpu,
    /// A GPU or other accelerator.
    Gpu,
}

/// Performance and capacity of one device. All rates are per second, all sizes in bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Model name (e.g. `A100`).
    pub model: String,
    /// Processor kind.
    pub kind: DeviceKind,
    /// Peak dense throughput in FLOP/s (FP16/BF16 tensor rate for GPUs).
    pub peak_flops: f64,
    /// Memory bandwidth in bytes/s.
    pub mem_bandwidth: f64,
    /// Memory capacity in bytes.
    pub memory: u64,
    /// Fraction of peak FLOPs reached in practice (default 0.6).
    #[serde(default = "default_util")]
    pub utilization: f64,
    /// Fixed cost per operation (kernel launch / dispatch), seconds (default 5 µs).
    #[serde(default = "default_launch")]
    pub launch_overhead: f64,
    /// Relative price per hour (for bandwidth-per-cost matching; default 1.0).
    #[serde(default = "default_price")]
    pub cost_per_hour: f64,
}

fn default_util() -> f64 {
    0.6
}
fn default_launch() -> f64 {
    5e-6
}
fn default_price() -> f64 {
    1.0
}

const GB: f64 = 1e9;
const GIB: u64 = 1 << 30;

impl DeviceSpec {
    fn preset(model: &str, kind: DeviceKind, tflops: f64, gbps: f64, gib: u64, price: f64) -> Self {
        Self {
            model: model.to_owned(),
            kind,
            peak_flops: tflops * 1e12,
            mem_bandwidth: gbps * GB,
            memory: gib * GIB,
            utilization: default_util(),
            launch_overhead: if kind == DeviceKind::Cpu { 1e-6 } else { 5e-6 },
            cost_per_hour: price,
        }
    }

    /// A server CPU socket: 2 TFLOP/s, 200 GB/s, 256 GiB.
    pub fn cpu() -> Self {
        Self::preset("CPU", DeviceKind::Cpu, 2.0, 200.0, 256, 0.5)
    }
    /// NVIDIA V100 SXM2 32 GB: 125 TFLOP/s FP16, 900 GB/s.
    pub fn v100() -> Self {
        Self::preset("V100", DeviceKind::Gpu, 125.0, 900.0, 32, 1.5)
    }
    /// NVIDIA A100 SXM 80 GB: 312 TFLOP/s BF16, 2039 GB/s.
    pub fn a100() -> Self {
        Self::preset("A100", DeviceKind::Gpu, 312.0, 2039.0, 80, 3.0)
    }
    /// NVIDIA H100 SXM 80 GB: 989 TFLOP/s BF16, 3350 GB/s.
    pub fn h100() -> Self {
        Self::preset("H100", DeviceKind::Gpu, 989.0, 3350.0, 80, 6.0)
    }
    /// NVIDIA H200 141 GB: 989 TFLOP/s BF16, 4800 GB/s.
    pub fn h200() -> Self {
        Self::preset("H200", DeviceKind::Gpu, 989.0, 4800.0, 141, 7.0)
    }
    /// NVIDIA L4 24 GB: 121 TFLOP/s FP16, 300 GB/s.
    pub fn l4() -> Self {
        Self::preset("L4", DeviceKind::Gpu, 121.0, 300.0, 24, 0.8)
    }

    /// A preset by case-insensitive name: `cpu`, `v100`, `a100`, `h100`, `h200`, `l4`.
    pub fn by_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "cpu" => Some(Self::cpu()),
            "v100" => Some(Self::v100()),
            "a100" => Some(Self::a100()),
            "h100" => Some(Self::h100()),
            "h200" => Some(Self::h200()),
            "l4" => Some(Self::l4()),
            _ => None,
        }
    }

    /// Achievable FLOP/s (`peak · utilization`).
    pub fn effective_flops(&self) -> f64 {
        (self.peak_flops * self.utilization).max(1.0)
    }
}

/// Work of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpWork {
    /// Floating-point operations.
    pub flops: f64,
    /// Bytes read and written from device memory.
    pub bytes: f64,
}

/// Estimates how long nodes take on devices.
pub trait CostModel: Send + Sync {
    /// FLOPs and memory traffic of `node` in `graph`.
    fn work(&self, graph: &Graph, node: &Node) -> OpWork;
    /// Seconds to run `node` on `device`.
    fn node_time(&self, graph: &Graph, node: &Node, device: &DeviceSpec) -> f64;
}

/// The default cost model: per-kind FLOP/byte counts and a roofline.
#[derive(Clone, Copy, Debug, Default)]
pub struct RooflineCostModel;

fn els(m: &TensorMeta) -> f64 {
    m.elements() as f64
}

impl CostModel for RooflineCostModel {
    fn work(&self, graph: &Graph, node: &Node) -> OpWork {
        let ins = || node.inputs.iter().filter_map(|t| graph.tensor(*t));
        let in_bytes: f64 = ins().map(|m| m.bytes() as f64).sum();
        let out_bytes: f64 = node.outputs.iter().map(|m| m.bytes() as f64).sum();
        let out_els: f64 = node.outputs.iter().map(els).sum();
        let first = || node.inputs.first().and_then(|t| graph.tensor(*t));
        let traffic = in_bytes + out_bytes;
        match &node.op {
            OpKind::Input | OpKind::Parameter { .. } | OpKind::KvCache { .. } => OpWork::default(),
            // Views: no data moved.
            OpKind::Reshape { .. } | OpKind::KvCacheRead { .. } => OpWork {
                flops: 0.0,
                bytes: 0.0,
            },
            OpKind::KvCacheAppend => {
                // In place: only the new keys and values are written.
                let new: f64 = node
                    .inputs
                    .iter()
                    .rev()
                    .take(2)
                    .filter_map(|t| graph.tensor(*t))
                    .map(|m| m.bytes() as f64)
                    .sum();
                OpWork {
                    flops: 0.0,
                    bytes: 2.0 * new,
                }
            }
            OpKind::Embedding => OpWork {
                flops: 0.0,
                bytes: 2.0 * out_bytes + first().map_or(0.0, |m| m.bytes() as f64),
            },
            OpKind::Linear { .. } => {
                let k = first().and_then(|m| m.shape.last().copied()).unwrap_or(0) as f64;
                OpWork {
                    flops: 2.0 * out_els * k,
                    bytes: traffic,
                }
            }
            OpKind::MatMul { .. } => {
                let k = first().and_then(|m| m.shape.last().copied()).unwrap_or(0) as f64;
                OpWork {
                    flops: 2.0 * out_els * k,
                    bytes: traffic,
                }
            }
            OpKind::Conv2d { .. } => {
                let w = node.inputs.get(1).and_then(|t| graph.tensor(*t));
                let per_out = w.map_or(0.0, |w| {
                    w.shape.iter().skip(1).map(|&d| d as f64).product::<f64>()
                });
                OpWork {
                    flops: 2.0 * out_els * per_out,
                    bytes: traffic,
                }
            }
            OpKind::Attention {
                heads, head_dim, ..
            } => {
                let q = first();
                let k = node.inputs.get(1).and_then(|t| graph.tensor(*t));
                let (b, sq) = q.map_or((0.0, 0.0), |m| {
                    (
                        *m.shape.first().unwrap_or(&0) as f64,
                        *m.shape.get(1).unwrap_or(&0) as f64,
                    )
                });
                let sk = k.map_or(0.0, |m| *m.shape.get(1).unwrap_or(&0) as f64);
                let h = *heads as f64;
                let d = *head_dim as f64;
                OpWork {
                    // QKᵀ and AV (2 FLOPs per MAC each) plus ~5 per score for the softmax.
                    flops: b * h * sq * sk * (4.0 * d + 5.0),
                    bytes: traffic,
                }
            }
            OpKind::CachedAttention {
                heads, head_dim, ..
            } => {
                // Each row attends over its cache plus the row it appends; the caches are read
                // (K and V), the new rows written in place.
                let positions: f64 = node
                    .inputs
                    .iter()
                    .skip(3)
                    .filter_map(|t| graph.tensor(*t))
                    .map(|m| *m.shape.get(2).unwrap_or(&0) as f64 + 1.0)
                    .sum();
                let caches: f64 = node
                    .inputs
                    .iter()
                    .skip(3)
                    .filter_map(|t| graph.tensor(*t))
                    .map(|m| m.bytes() as f64)
                    .sum();
                let h = *heads as f64;
                let d = *head_dim as f64;
                OpWork {
                    flops: h * positions * (4.0 * d + 5.0),
                    bytes: caches + 2.0 * (in_bytes - caches) + out_bytes,
                }
            }
            OpKind::Softmax { .. } => OpWork {
                flops: 5.0 * out_els,
                bytes: traffic,
            },
            OpKind::LayerNorm { .. } | OpKind::BatchNorm { .. } => OpWork {
                flops: 8.0 * out_els,
                bytes: traffic,
            },
            // Square, sum, scale and multiply by the weight.
            OpKind::RmsNorm { .. } => OpWork {
                flops: 4.0 * out_els,
                bytes: traffic,
            },
            // Two products and a sum per element, plus a cos and a sin per pair.
            OpKind::Rotary { .. } => OpWork {
                flops: 6.0 * out_els,
                bytes: traffic,
            },
            OpKind::Gelu { .. } | OpKind::Silu | OpKind::Tanh => OpWork {
                flops: 10.0 * out_els,
                bytes: traffic,
            },
            OpKind::Add | OpKind::Mul | OpKind::Relu => OpWork {
                flops: out_els,
                bytes: traffic,
            },
            OpKind::MaxPool2d { kernel, .. } | OpKind::AvgPool2d { kernel, .. } => OpWork {
                flops: out_els * (kernel[0] as f64 * kernel[1] as f64),
                bytes: traffic,
            },
            OpKind::GlobalAvgPool2d => OpWork {
                flops: first().map_or(0.0, els),
                bytes: traffic,
            },
            OpKind::Transpose { .. }
            | OpKind::Concat { .. }
            | OpKind::Split { .. }
            | OpKind::Slice { .. } => OpWork {
                flops: 0.0,
                bytes: 2.0 * out_bytes,
            },
            // One comparison per value read.
            OpKind::ArgMax => OpWork {
                flops: first().map_or(0.0, els),
                bytes: traffic,
            },
            // Unknown ops: one FLOP per element touched, plus the traffic.
            OpKind::Custom(_) => OpWork {
                flops: out_els + ins().map(els).sum::<f64>(),
                bytes: traffic,
            },
        }
    }

    fn node_time(&self, graph: &Graph, node: &Node, device: &DeviceSpec) -> f64 {
        if node.op.is_source() {
            return 0.0;
        }
        let w = self.work(graph, node);
        let compute = w.flops / device.effective_flops();
        let memory = w.bytes / device.mem_bandwidth.max(1.0);
        device.launch_overhead + compute.max(memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::{gpt2_decode, gpt2_prefill, Gpt2Config};

    #[test]
    fn decode_is_memory_bound_and_prefill_compute_bound() {
        let c = Gpt2Config::default();
        let m = RooflineCostModel;
        let a100 = DeviceSpec::a100();
        let ridge = a100.effective_flops() / a100.mem_bandwidth;
        let intensity = |g: &Graph, name: &str| {
            let n = g.nodes().iter().find(|n| n.name == name).unwrap();
            let w = m.work(g, n);
            w.flops / w.bytes
        };
        let d = gpt2_decode(&c, 1023).unwrap();
        let p = gpt2_prefill(&c, 1024).unwrap();
        assert!(intensity(&d, "h.0.mlp.c_fc.out") < ridge);
        assert!(intensity(&p, "h.0.mlp.c_fc.out") > ridge);
        // 2·M·K·N for the c_fc matmul of one token.
        let n = d
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.mlp.c_fc.out")
            .unwrap();
        assert_eq!(m.work(&d, n).flops, 2.0 * 768.0 * 3072.0);
        assert!(m.node_time(&d, n, &DeviceSpec::h100()) < m.node_time(&d, n, &DeviceSpec::l4()));
        for name in ["cpu", "V100", "a100", "H100", "h200", "L4"] {
            assert!(DeviceSpec::by_name(name).is_some());
        }
    }
}
