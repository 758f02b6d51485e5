//! Synthetic layered DAGs, for property tests and scale benchmarks.
//!
//! [`layered_dag`] builds a deterministic (seeded) graph: a layer of inputs, then layers of
//! [`OpKind::Custom`] compute nodes, each reading 1..=`max_fan_in` tensors from the previous
//! `window` layers, some with a weight of their own; optionally a share of compute nodes carries
//! one of `colocation_groups` random co-location labels. Sizes vary per node so costs and
//! transfers differ.

use crate::graph::{DType, Graph, GraphError, OpKind, Residency, Semantics, TensorMeta, TensorRef};
use serde::{Deserialize, Serialize};

/// Shape of a synthetic DAG.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct SyntheticConfig {
    /// Total nodes (inputs, weights and compute nodes), at least 2 (default 1000).
    pub nodes: usize,
    /// Nodes per layer (default 16).
    pub width: usize,
    /// Most inputs per compute node (default 3).
    pub max_fan_in: usize,
    /// How many layers back an input may come from (default 2).
    pub window: usize,
    /// Percentage of compute nodes that own a weight (default 30).
    pub weight_percent: u32,
    /// Number of random co-location labels (0 = none; default 0).
    pub colocation_groups: usize,
    /// Percentage of compute nodes that get a label (default 20).
    pub colocation_percent: u32,
    /// Smallest and largest output, in f32 elements (default 256 ..= 65536).
    pub elements: (usize, usize),
    /// RNG seed (default 1).
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            nodes: 1000,
            width: 16,
            max_fan_in: 3,
            window: 2,
            weight_percent: 30,
            colocation_groups: 0,
            colocation_percent: 20,
            elements: (256, 65536),
            seed: 1,
        }
    }
}

/// SplitMix64: tiny, fast, deterministic.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Builds a synthetic layered DAG (see the [module docs](self)).
pub fn layered_dag(cfg: &SyntheticConfig) -> Result<Graph, GraphError> {
    let mut rng = SplitMix64::new(cfg.seed);
    let width = cfg.width.max(1);
    let (lo, hi) = (
        cfg.elements.0.max(1),
        cfg.elements.1.max(cfg.elements.0.max(1)),
    );
    let size = |rng: &mut SplitMix64| lo + rng.below(hi - lo + 1);
    let mut g = Graph::new(format!("synthetic-{}-{}", cfg.nodes, cfg.seed));
    let target = cfg.nodes.max(2);
    // layers[k] = the tensors produced by layer k.
    let mut layers: Vec<Vec<TensorRef>> = Vec::new();
    let mut first = Vec::with_capacity(width);
    for i in 0..width.min(target / 2).max(1) {
        let id = g.add_with_outputs(
            format!("in{i}"),
            OpKind::Input,
            vec![],
            vec![TensorMeta::new([size(&mut rng)], DType::F32)],
            Semantics::default(),
        )?;
        first.push(id.into());
    }
    layers.push(first);
    let op = OpKind::Custom("synthetic".to_owned());
    while g.len() < target {
        let mut layer = Vec::with_capacity(width);
        for _ in 0..width {
            if g.len() >= target {
                break;
            }
            let k = layers.len();
            let mut inputs: Vec<TensorRef> = Vec::with_capacity(cfg.max_fan_in + 1);
            let fan_in = 1 + rng.below(cfg.max_fan_in.max(1));
            for _ in 0..fan_in {
                let back = 1 + rng.below(cfg.window.max(1).min(k));
                let src = &layers[k - back];
                let t = src[rng.below(src.len())];
                if !inputs.contains(&t) {
                    inputs.push(t);
                }
            }
            let name = format!("l{k}.n{}", layer.len());
            if (rng.below(100) as u32) < cfg.weight_percent && g.len() + 2 <= target {
                let w = g.add_with_outputs(
                    format!("{name}.weight"),
                    OpKind::Parameter { trainable: true },
                    vec![],
                    vec![TensorMeta::new([size(&mut rng)], DType::F32)],
                    Semantics {
                        residency: Some(Residency::PersistentWeight),
                        ..Semantics::default()
                    },
                )?;
                inputs.push(w.into());
            }
            let mut sem = Semantics::default();
            if cfg.colocation_groups > 0 && (rng.below(100) as u32) < cfg.colocation_percent {
                sem.colocation_group = Some(format!("g{}", rng.below(cfg.colocation_groups)));
            }
            let id = g.add_with_outputs(
                name,
                op.clone(),
                inputs,
                vec![TensorMeta::new([size(&mut rng)], DType::F32)],
                sem,
            )?;
            layer.push(id.into());
        }
        if !layer.is_empty() {
            layers.push(layer);
        }
    }
    if let Some(last) = layers.last() {
        g.outputs.extend(last.iter().copied());
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_valid_and_sized() {
        let cfg = SyntheticConfig {
            nodes: 5000,
            colocation_groups: 10,
            ..SyntheticConfig::default()
        };
        let a = layered_dag(&cfg).unwrap();
        let b = layered_dag(&cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 5000);
        a.validate().unwrap();
        assert!(a
            .nodes()
            .iter()
            .any(|n| n.semantics.colocation_group.is_some()));
        let c = layered_dag(&SyntheticConfig { seed: 2, ..cfg }).unwrap();
        assert_ne!(a.structural_hash(), c.structural_hash());
    }
}
