//! The KV-cache manager: per-sequence caches pinned on the worker that runs the sequence's
//! decode, reserved in fixed-size blocks from a bounded pool.
//!
//! A sequence owns one reservation per layer; layers fill independently, so a prefill on another
//! worker can stream layer `l`'s rows in while layer `l+1` is still being computed there. Each
//! reservation is one `[2, 1, capacity, width]` tensor (K rows then V rows) whose capacity is a
//! whole number of blocks: a decode step appends its new row in place and hands attention a view
//! of the filled rows, so no step copies the cache. A new reservation has a quarter more blocks
//! than its first rows need (at least one more), so the decode steps after a prompt's rows landed
//! append in place; growth doubles it (one copy, amortised over the rows it makes room for). Both
//! are charged to the pool block by block, and fall back to the blocks needed when the pool has
//! no room for more.

use crate::error::{Result, RuntimeError};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Shape of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Decoder layers.
    pub layers: usize,
    /// Width of one K (or V) row: hidden size.
    pub width: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Blocks in the pool.
    pub max_blocks: usize,
}

#[derive(Debug, Default, Clone)]
struct Layer {
    /// `[2, 1, blocks * block_tokens, width]`, allocated on first append.
    store: Option<Tensor>,
    blocks: usize,
    filled: usize,
}

#[derive(Debug, Default)]
struct Sequence {
    layers: Vec<Layer>,
}

/// KV storage for many sequences, drawn from a pool of blocks.
#[derive(Debug)]
pub struct KvCacheManager {
    cfg: KvConfig,
    in_use: usize,
    seqs: HashMap<u64, Sequence>,
}

fn kv_err(e: candle_core::Error) -> RuntimeError {
    RuntimeError::KvCache {
        reason: e.to_string(),
    }
}

impl KvCacheManager {
    /// A pool of `cfg.max_blocks` blocks (reserved lazily).
    pub fn new(cfg: KvConfig) -> Self {
        Self {
            cfg,
            in_use: 0,
            seqs: HashMap::new(),
        }
    }

    /// The cache's shape.
    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    /// Appends rows of K and V (row-major, `width` floats a row) to `seq`'s cache at `layer`;
    /// returns a view of everything cached there, as [`KvCacheManager::append_rows`].
    pub fn append(&mut self, seq: u64, layer: usize, k: &[f32], v: &[f32]) -> Result<Tensor> {
        let w = self.cfg.width;
        if w == 0 || k.len() != v.len() || k.len() % w != 0 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "K has {} and V {} floats; both must be equal multiples of width {w}",
                    k.len(),
                    v.len()
                ),
            });
        }
        self.put(seq, layer, k, v)
    }

    /// Appends `new` (`[2, 1, n, width]`: K rows, then V rows, f32) to `seq`'s cache at
    /// `layer`, in place, and returns a view `[2, 1, len, width]` of everything cached there
    /// (no copy).
    pub fn append_rows(&mut self, seq: u64, layer: usize, new: &Tensor) -> Result<Tensor> {
        let w = self.cfg.width;
        if !matches!(new.dims(), [2, 1, _, e] if *e == w) {
            return Err(RuntimeError::KvCache {
                reason: format!("new rows of shape {:?}, need [2, 1, n, {w}]", new.dims()),
            });
        }
        // Read in place (no copy of a contiguous tensor: a moved cache's rows go once, into
        // the reservation). `new` is never the reservation's own storage: an append of the
        // cached rows to themselves adds no row (see the worker's append).
        let new = new.contiguous().map_err(kv_err)?;
        with_f32(&new, |rows| {
            let (k, v) = rows.split_at(rows.len() / 2);
            self.put(seq, layer, k, v)
        })
        .unwrap_or_else(|| {
            Err(RuntimeError::KvCache {
                reason: format!("new rows of dtype {:?}, need f32 on the CPU", new.dtype()),
            })
        })
    }

    /// Appends K rows `k` and V rows `v` (as many of each, `width` floats a row) to `seq`'s
    /// cache at `layer`: written straight into its reservation when they fit (a decode step's
    /// row: nothing else copied), else into a new one made in one allocation (the rows kept,
    /// the new ones, then zeros to its end). A view of everything cached there.
    fn put(&mut self, seq: u64, layer: usize, k: &[f32], v: &[f32]) -> Result<Tensor> {
        let KvConfig {
            layers,
            width: w,
            block_tokens: bt,
            max_blocks,
        } = self.cfg;
        if layer >= layers {
            return Err(RuntimeError::KvCache {
                reason: format!("layer {layer} out of range ({layers} layers)"),
            });
        }
        let n = k.len() / w.max(1);
        let free = max_blocks.saturating_sub(self.in_use);
        let s = self.seqs.entry(seq).or_insert_with(|| Sequence {
            layers: vec![Layer::default(); layers],
        });
        let l = s
            .layers
            .get_mut(layer)
            .ok_or_else(|| RuntimeError::KvCache {
                reason: format!("layer {layer} out of range"),
            })?;
        let need = (l.filled + n).div_ceil(bt.max(1));
        let store = match &l.store {
            Some(store) if need <= l.blocks => {
                if n > 0 {
                    let at = l.filled * w;
                    store.inplace_op1(&WriteRows { k, v, at }).map_err(kv_err)?;
                }
                store
            }
            old => {
                let want = if old.is_none() {
                    need + (need / 4).max(1)
                } else {
                    need.max(2 * l.blocks)
                };
                let blocks = if want - l.blocks <= free { want } else { need };
                if blocks.saturating_sub(l.blocks) > free {
                    return Err(RuntimeError::KvCache {
                        reason: format!("out of blocks ({max_blocks} in use)"),
                    });
                }
                let cap = blocks * bt;
                let mut buf: Vec<f32> = Vec::with_capacity(2 * cap * w);
                for (half, rows) in [k, v].into_iter().enumerate() {
                    if let (Some(old), true) = (old, l.filled > 0) {
                        // Half `half` (K or V) of the old `[2, 1, _, w]` store, its rows kept.
                        with_f32(old, |d| {
                            let at = half * (d.len() / 2);
                            buf.extend_from_slice(d.get(at..at.checked_add(l.filled * w)?)?);
                            Some(())
                        })
                        .flatten()
                        .ok_or_else(|| RuntimeError::KvCache {
                            reason: "a reservation is not contiguous f32 rows on the CPU".into(),
                        })?;
                    }
                    buf.extend_from_slice(rows);
                    buf.resize((half + 1) * cap * w, 0.0);
                }
                let store = Tensor::from_vec(buf, (2, 1, cap, w), &Device::Cpu).map_err(kv_err)?;
                self.in_use += blocks - l.blocks;
                l.blocks = blocks;
                l.store.insert(store)
            }
        };
        l.filled += n;
        store.narrow(2, 0, l.filled).map_err(kv_err)
    }

    /// Rows cached for `seq` at `layer` (0 for an unknown sequence).
    pub fn len(&self, seq: u64, layer: usize) -> usize {
        self.seqs
            .get(&seq)
            .and_then(|s| s.layers.get(layer))
            .map_or(0, |l| l.filled)
    }

    /// A view `[2, 1, len, width]` of `seq`'s cache at `layer` (no copy).
    pub fn view(&self, seq: u64, layer: usize) -> Result<Tensor> {
        let s = self.seqs.get(&seq).ok_or_else(|| RuntimeError::KvCache {
            reason: format!("unknown sequence {seq}"),
        })?;
        let l = s.layers.get(layer).ok_or_else(|| RuntimeError::KvCache {
            reason: format!("layer {layer} out of range"),
        })?;
        match &l.store {
            Some(t) => t.narrow(2, 0, l.filled).map_err(kv_err),
            None => {
                Tensor::zeros((2, 1, 0, self.cfg.width), DType::F32, &Device::Cpu).map_err(kv_err)
            }
        }
    }

    /// K and V of `seq` at `layer`, copied into contiguous row-major buffers.
    pub fn gather(&self, seq: u64, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let t = self.view(seq, layer)?;
        let part = |i: usize| -> candle_core::Result<Vec<f32>> {
            t.get(i)?.flatten_all()?.to_vec1::<f32>()
        };
        Ok((part(0).map_err(kv_err)?, part(1).map_err(kv_err)?))
    }

    /// Frees every block of `seq`.
    pub fn free_sequence(&mut self, seq: u64) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.in_use -= s.layers.iter().map(|l| l.blocks).sum::<usize>();
        }
    }

    /// Blocks currently reserved by sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.in_use
    }
}

/// Calls `f` with the floats of a contiguous f32 tensor on the CPU, under one read of its
/// storage; `None` for other dtypes or layouts.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (from, to) = layout.contiguous_offsets()?;
    Some(f(data.get(from..to)?))
}

/// K rows `k` and V rows `v` written at float `at` of each half of a contiguous f32 store
/// `[2, 1, capacity, width]` (K then V), in place; an error (and the store untouched) for any
/// other dtype or layout, or rows past its end.
struct WriteRows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    at: usize,
}

impl candle_core::InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let unfit = |why: &str| candle_core::Error::Msg(format!("kv-write-rows: {why}"));
        let candle_core::CpuStorage::F32(data) = storage else {
            return Err(unfit("not an f32 store"));
        };
        let (from, to) = layout
            .contiguous_offsets()
            .ok_or_else(|| unfit("not a contiguous store"))?;
        let data = data
            .get_mut(from..to)
            .ok_or_else(|| unfit("a layout past its storage"))?;
        let half = data.len() / 2;
        let end = self.at.checked_add(self.k.len());
        let Some(end) = end.filter(|&e| e <= half && self.k.len() == self.v.len()) else {
            return Err(unfit("rows past the store's end"));
        };
        if layout.dims().first() != Some(&2) {
            return Err(unfit("not a store of K and V"));
        }
        let (ks, vs) = data.split_at_mut(half);
        let span = self.at..end;
        ks[span.clone()].copy_from_slice(self.k);
        vs[span].copy_from_slice(self.v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_append_gather_free() {
        let mut m = KvCacheManager::new(KvConfig {
            layers: 2,
            width: 3,
            block_tokens: 2,
            max_blocks: 5,
        });
        let rows = |n: usize, base: f32| (0..n * 3).map(|i| base + i as f32).collect::<Vec<_>>();
        // 3 rows need 2 blocks; a new reservation takes one more, where the next row goes.
        m.append(7, 0, &rows(3, 0.0), &rows(3, 100.0)).unwrap();
        assert_eq!(m.blocks_in_use(), 3);
        m.append(7, 0, &rows(1, 9.0), &rows(1, 109.0)).unwrap();
        assert_eq!(m.len(7, 0), 4);
        assert_eq!(m.len(7, 1), 0);
        assert_eq!(m.blocks_in_use(), 3);
        let (k, v) = m.gather(7, 0).unwrap();
        assert_eq!(k, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(v, (0..12).map(|i| 100.0 + i as f32).collect::<Vec<_>>());
        // Past the reservation: 8 more rows need 6 blocks, 3 more than the 2 free: refused,
        // and the rows kept as they were.
        let e = m.append(7, 0, &rows(8, 12.0), &rows(8, 112.0)).unwrap_err();
        assert!(e.to_string().contains("out of blocks"), "{e}");
        assert_eq!(m.gather(7, 0).unwrap().0.len(), 12);
        // 2 rows fill the reservation in place; 1 more grows it (to the 4 blocks needed, as
        // doubling to 6 exceeds the pool), the rows kept.
        m.append(7, 0, &rows(2, 12.0), &rows(2, 112.0)).unwrap();
        assert_eq!(m.blocks_in_use(), 3);
        m.append(7, 0, &rows(1, 18.0), &rows(1, 118.0)).unwrap();
        assert_eq!(m.blocks_in_use(), 4);
        let (k, v) = m.gather(7, 0).unwrap();
        assert_eq!(k, (0..21).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(v, (0..21).map(|i| 100.0 + i as f32).collect::<Vec<_>>());
        m.free_sequence(7);
        m.append(7, 0, &rows(4, 0.0), &rows(4, 100.0)).unwrap();
        // 2 blocks left: 4 rows get the 2 they need, without the one more.
        m.append(7, 1, &rows(4, 0.0), &rows(4, 0.0)).unwrap();
        assert_eq!(m.blocks_in_use(), 5);
        let e = m.append(8, 0, &rows(1, 0.0), &rows(1, 0.0)).unwrap_err();
        assert!(e.to_string().contains("out of blocks"), "{e}");
        m.free_sequence(7);
        assert_eq!(m.blocks_in_use(), 0);
        m.append(8, 0, &rows(1, 0.0), &rows(1, 0.0)).unwrap();
        assert!(m.append(8, 2, &[], &[]).is_err());
        assert!(m.append(8, 0, &[1.0], &[1.0]).is_err());
    }
}
