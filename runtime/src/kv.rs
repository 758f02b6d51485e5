//! The KV-cache manager: paged blocks per sequence, pinned on the worker that runs the
//! sequence's decode.
//!
//! Memory is a pool of fixed-size blocks, each holding `block_tokens` rows of K and of V for
//! one layer. A sequence owns one block table per layer; layers fill independently, so a
//! prefill on another worker can stream layer `l`'s rows in while layer `l+1` is still being
//! computed there.

use crate::error::{Result, RuntimeError};
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

#[derive(Debug, Default)]
struct Sequence {
    /// Per layer: block ids, and rows filled.
    tables: Vec<(Vec<usize>, usize)>,
}

/// Paged KV storage for many sequences.
#[derive(Debug)]
pub struct KvCacheManager {
    cfg: KvConfig,
    blocks: Vec<Vec<f32>>,
    free: Vec<usize>,
    seqs: HashMap<u64, Sequence>,
}

impl KvCacheManager {
    /// A pool of `cfg.max_blocks` blocks (allocated lazily).
    pub fn new(cfg: KvConfig) -> Self {
        Self {
            cfg,
            blocks: Vec::new(),
            free: Vec::new(),
            seqs: HashMap::new(),
        }
    }

    /// The cache's shape.
    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    fn block_len(&self) -> usize {
        2 * self.cfg.block_tokens * self.cfg.width
    }

    fn alloc(&mut self) -> Result<usize> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if self.blocks.len() >= self.cfg.max_blocks {
            return Err(RuntimeError::KvCache {
                reason: format!("out of blocks ({} in use)", self.cfg.max_blocks),
            });
        }
        self.blocks.push(vec![0.0; self.block_len()]);
        Ok(self.blocks.len() - 1)
    }

    fn seq_mut(&mut self, seq: u64) -> &mut Sequence {
        let layers = self.cfg.layers;
        self.seqs.entry(seq).or_insert_with(|| Sequence {
            tables: vec![(Vec::new(), 0); layers],
        })
    }

    /// Appends rows of K and V (row-major, `width` floats a row) to `seq`'s cache at `layer`.
    pub fn append(&mut self, seq: u64, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (w, bt) = (self.cfg.width, self.cfg.block_tokens);
        if layer >= self.cfg.layers {
            return Err(RuntimeError::KvCache {
                reason: format!("layer {layer} out of range ({} layers)", self.cfg.layers),
            });
        }
        if k.len() != v.len() || k.len() % w != 0 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "K has {} and V {} floats; both must be equal multiples of width {w}",
                    k.len(),
                    v.len()
                ),
            });
        }
        let rows = k.len() / w;
        for r in 0..rows {
            let filled = self.seq_mut(seq).tables[layer].1;
            let (bi, off) = (filled / bt, filled % bt);
            if bi == self.seq_mut(seq).tables[layer].0.len() {
                let b = self.alloc()?;
                self.seq_mut(seq).tables[layer].0.push(b);
            }
            let block_id = self.seq_mut(seq).tables[layer].0[bi];
            let block = &mut self.blocks[block_id];
            block[off * w..(off + 1) * w].copy_from_slice(&k[r * w..(r + 1) * w]);
            let vbase = bt * w;
            block[vbase + off * w..vbase + (off + 1) * w].copy_from_slice(&v[r * w..(r + 1) * w]);
            self.seq_mut(seq).tables[layer].1 += 1;
        }
        Ok(())
    }

    /// Rows cached for `seq` at `layer` (0 for an unknown sequence).
    pub fn len(&self, seq: u64, layer: usize) -> usize {
        self.seqs
            .get(&seq)
            .and_then(|s| s.tables.get(layer))
            .map_or(0, |t| t.1)
    }

    /// K and V of `seq` at `layer`, gathered into contiguous row-major buffers.
    pub fn gather(&self, seq: u64, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = self.seqs.get(&seq).ok_or_else(|| RuntimeError::KvCache {
            reason: format!("unknown sequence {seq}"),
        })?;
        let (table, filled) = s.tables.get(layer).ok_or_else(|| RuntimeError::KvCache {
            reason: format!("layer {layer} out of range"),
        })?;
        let (w, bt) = (self.cfg.width, self.cfg.block_tokens);
        let mut k = Vec::with_capacity(filled * w);
        let mut v = Vec::with_capacity(filled * w);
        let mut left = *filled;
        for &b in table {
            let n = left.min(bt);
            let block = &self.blocks[b];
            k.extend_from_slice(&block[..n * w]);
            v.extend_from_slice(&block[bt * w..bt * w + n * w]);
            left -= n;
        }
        Ok((k, v))
    }

    /// Frees every block of `seq`.
    pub fn free_sequence(&mut self, seq: u64) {
        if let Some(s) = self.seqs.remove(&seq) {
            for (t, _) in s.tables {
                self.free.extend(t);
            }
        }
    }

    /// Blocks currently owned by sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.blocks.len() - self.free.len()
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
            max_blocks: 4,
        });
        let rows = |n: usize, base: f32| (0..n * 3).map(|i| base + i as f32).collect::<Vec<_>>();
        m.append(7, 0, &rows(3, 0.0), &rows(3, 100.0)).unwrap();
        m.append(7, 0, &rows(1, 9.0), &rows(1, 109.0)).unwrap();
        assert_eq!(m.len(7, 0), 4);
        assert_eq!(m.len(7, 1), 0);
        assert_eq!(m.blocks_in_use(), 2);
        let (k, v) = m.gather(7, 0).unwrap();
        assert_eq!(k, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(v, (0..12).map(|i| 100.0 + i as f32).collect::<Vec<_>>());
        m.append(7, 1, &rows(4, 0.0), &rows(4, 0.0)).unwrap();
        let e = m.append(8, 0, &rows(1, 0.0), &rows(1, 0.0)).unwrap_err();
        assert!(e.to_string().contains("out of blocks"), "{e}");
        m.free_sequence(7);
        assert_eq!(m.blocks_in_use(), 0);
        m.append(8, 0, &rows(1, 0.0), &rows(1, 0.0)).unwrap();
        assert!(m.append(8, 2, &[], &[]).is_err());
        assert!(m.append(8, 0, &[1.0], &[1.0]).is_err());
    }
}
