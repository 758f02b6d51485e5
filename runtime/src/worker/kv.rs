//! KV-cache glue: a run's `KvCache` and `KvCacheAppend` nodes read and extend the session's
//! paged caches (see [`crate::kv`]) instead of tensors in the run's store.

use super::exec::RunCtx;
use crate::error::{Result, RuntimeError};
use crate::kv::{KvCacheManager, KvConfig};
use crate::limits::MAX_KV_LAYERS;
use crate::plan::layer_of;
use candle_core::Tensor;
use genie_scheduler::graph::{Node, OpKind};

impl<'a> RunCtx<'a> {
    pub(super) fn kv_manager(&mut self, width: usize) -> Result<&mut KvCacheManager> {
        // The graph's cache layers, counted once a run.
        let graph = self.graph;
        let layers = *self.kv_layers.get_or_insert_with(|| {
            graph
                .nodes()
                .iter()
                .filter(|n| matches!(n.op, OpKind::KvCache { .. } | OpKind::KvCacheAppend))
                .filter_map(|n| layer_of(graph, n.id))
                .max()
                .map_or(1, |m| m.saturating_add(1))
        });
        if layers > MAX_KV_LAYERS || width == 0 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "a cache of {layers} layers × {width} wide (at most {MAX_KV_LAYERS} layers, \
                     width at least 1)"
                ),
            });
        }
        // The pool holds at most half the budget: blocks of K and V rows of f32.
        const BLOCK_TOKENS: usize = 16;
        let block_bytes = (2 * BLOCK_TOKENS * 4) as u64 * width as u64;
        let max_blocks =
            usize::try_from(self.w.opts.memory_budget / 2 / block_bytes).unwrap_or(usize::MAX);
        let kv = self.w.kv.get_or_insert_with(|| {
            KvCacheManager::new(KvConfig {
                layers,
                width,
                block_tokens: BLOCK_TOKENS,
                max_blocks,
            })
        });
        let cfg = kv.config();
        if cfg.width != width || cfg.layers < layers {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "cache holds {} layers × {} wide, graph needs {layers} × {width}",
                    cfg.layers, cfg.width
                ),
            });
        }
        Ok(kv)
    }

    /// The session's caches (`e` wide), once `seq`'s at `layer` is checked to hold the `l`
    /// positions `node`'s graph says it does.
    fn kv_holding(
        &mut self,
        node: &Node,
        (seq, layer): (u64, usize),
        l: usize,
        e: usize,
    ) -> Result<&mut KvCacheManager> {
        let kv = self.kv_manager(e)?;
        let have = kv.len(seq, layer);
        if have != l {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "{}: sequence {seq} layer {layer} holds {have} positions, graph expects {l}",
                    node.name
                ),
            });
        }
        Ok(kv)
    }

    /// The sequence of cache slot `slot` in this run.
    fn seq_of(&self, node: &Node, slot: u32) -> Result<u64> {
        self.seqs
            .get(slot as usize)
            .copied()
            .ok_or_else(|| RuntimeError::KvCache {
                reason: format!(
                    "{}: cache slot {slot}, but the run names {} sequence(s)",
                    node.name,
                    self.seqs.len()
                ),
            })
    }

    /// The slot of the cache an append extends (its `past` input's; 0 for prefill's fresh
    /// cache).
    fn slot_of_append(&self, node: &Node) -> u32 {
        node.inputs
            .first()
            .and_then(|i| match self.graph.node(i.node)?.op {
                OpKind::KvCache { slot, .. } if node.inputs.len() == 3 => Some(slot),
                _ => None,
            })
            .unwrap_or(0)
    }

    pub(super) fn kv_read(&mut self, node: &Node, layer: usize, slot: u32) -> Result<Tensor> {
        let meta = node
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan(format!("{} has no output", node.name)))?;
        let (b, l, e) = match meta.shape.as_slice() {
            [2, b, l, e] => (*b, *l, *e),
            s => {
                return Err(RuntimeError::KvCache {
                    reason: format!("{}: cache shape {s:?} is not [2, B, L, E]", node.name),
                })
            }
        };
        if b != 1 {
            return Err(RuntimeError::KvCache {
                reason: format!("{}: only batch 1 per sequence is supported", node.name),
            });
        }
        let seq = self.seq_of(node, slot)?;
        if l == 0 {
            // An empty cache (a batched prefill's, which its `present` then fills): the sequence
            // must have none yet.
            self.kv_holding(node, (seq, layer), 0, e)?;
            return Tensor::zeros(
                (2, 1, 0, e),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .map_err(|source| RuntimeError::Kernel {
                node: node.name.clone(),
                source,
            });
        }
        let view = self
            .kv_holding(node, (seq, layer), l, e)?
            .view(seq, layer)?;
        self.stats.cache_hits += 1;
        Ok(view)
    }

    /// A decode step's append (`past`, new K, new V) whose `past` is this worker's own pinned
    /// cache: the new rows go straight into the cache, no copy of `past` is made.
    pub(super) fn appends_in_place(&self, node: &Node) -> bool {
        node.inputs.len() == 3
            && node.inputs.first().is_some_and(|p| {
                self.graph
                    .node(p.node)
                    .is_some_and(|n| matches!(n.op, OpKind::KvCache { .. }))
                    && self.plan.worker_of.get(p.node.index()) == Some(&self.w.me)
            })
    }

    pub(super) fn kv_append_in_place(&mut self, node: &Node, ins: &[Tensor]) -> Result<Tensor> {
        let layer = self.layer_of_append(node)?;
        let kerr = |source| RuntimeError::Kernel {
            node: node.name.clone(),
            source,
        };
        let (past, k, v) = match ins {
            [p, k, v] => (p, k, v),
            _ => return Err(RuntimeError::Plan(format!("{} needs 3 inputs", node.name))),
        };
        let (two, b, l, e) = past.dims4().map_err(kerr)?;
        if two != 2 || b != 1 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "{}: cache of shape {:?} (need [2, 1, L, E])",
                    node.name,
                    past.dims()
                ),
            });
        }
        let seq = self.seq_of(node, self.slot_of_append(node))?;
        let kv = self.kv_manager(e)?;
        let have = kv.len(seq, layer);
        if have != l {
            return Err(RuntimeError::KvCache {
                reason: format!("{}: cache holds {have} positions, past has {l}", node.name),
            });
        }
        let new = Tensor::stack(&[k, v], 0).map_err(kerr)?;
        kv.append_rows(seq, layer, &new)
    }

    /// A batched decode step's attention of one layer ([`OpKind::CachedAttention`]): row `i` of
    /// the new keys and values goes straight into the pinned cache of the sequence of input
    /// `3 + i`'s slot, then each query row attends over its whole cache (a view, no copy).
    pub(super) fn kv_cached_attention(&mut self, node: &Node, ins: &[Tensor]) -> Result<Tensor> {
        let kerr = |source| RuntimeError::Kernel {
            node: node.name.clone(),
            source,
        };
        let (q, k, v, caches) = match ins {
            [q, k, v, caches @ ..] if !caches.is_empty() => (q, k, v, caches),
            _ => {
                return Err(RuntimeError::Plan(format!(
                    "{} needs a query, keys, values and at least one cache",
                    node.name
                )))
            }
        };
        // The new rows, read once: row `i` of K then of V is what cache `i` gains.
        let rows = |t: &Tensor| -> Result<Vec<f32>> {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(kerr)
        };
        let (kr, vr) = (rows(k)?, rows(v)?);
        let w = kr.len() / caches.len();
        if kr.len() != w * caches.len() || vr.len() != kr.len() {
            return Err(RuntimeError::Plan(format!(
                "{}: keys and values are not one row per cache",
                node.name
            )));
        }
        let mut views = Vec::with_capacity(caches.len());
        for (i, (cache, t)) in caches.iter().zip(&node.inputs[3..]).enumerate() {
            let (layer, slot) = match self.graph.node(t.node).map(|n| &n.op) {
                Some(&OpKind::KvCache { layer, slot })
                    if node.layer().map_or(true, |l| l == layer) =>
                {
                    (layer as usize, slot)
                }
                _ => {
                    return Err(RuntimeError::KvCache {
                        reason: format!(
                            "{}: input {} is not a KV cache of its layer",
                            node.name,
                            3 + i
                        ),
                    })
                }
            };
            let (_, _, l, e) = cache.dims4().map_err(kerr)?;
            let seq = self.seq_of(node, slot)?;
            let (k, v) = (&kr[i * w..(i + 1) * w], &vr[i * w..(i + 1) * w]);
            let kv = self.kv_holding(node, (seq, layer), l, e)?;
            views.push(kv.append(seq, layer, k, v)?);
        }
        self.w.kernels.cached_attention(node, q, &views)
    }

    fn layer_of_append(&self, node: &Node) -> Result<usize> {
        layer_of(self.graph, node.id)
            .or_else(|| {
                node.inputs
                    .first()
                    .and_then(|i| match self.graph.node(i.node)?.op {
                        OpKind::KvCache { layer, .. } => Some(layer as usize),
                        _ => None,
                    })
            })
            .ok_or_else(|| RuntimeError::KvCache {
                reason: format!("cannot tell which layer `{}` belongs to", node.name),
            })
    }

    pub(super) fn kv_write(&mut self, node: &Node, t: &Tensor) -> Result<()> {
        let layer = self.layer_of_append(node)?;
        let kerr = |source| RuntimeError::Kernel {
            node: node.name.clone(),
            source,
        };
        let (two, b, l, e) = t.dims4().map_err(kerr)?;
        if two != 2 || b != 1 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "{}: cache of shape {:?} (need [2, 1, L, E])",
                    node.name,
                    t.dims()
                ),
            });
        }
        let seq = self.seq_of(node, self.slot_of_append(node))?;
        let have = self.kv_manager(e)?.len(seq, layer);
        if have > l {
            return Err(RuntimeError::KvCache {
                reason: format!("{}: cache shrank from {have} to {l}", node.name),
            });
        }
        let new = t.narrow(2, have, l - have).map_err(kerr)?;
        self.kv_manager(e)?.append_rows(seq, layer, &new)?;
        Ok(())
    }
}
