//! A worker's tensor store: persistent weights, pinned KV caches and ephemeral activations.
//!
//! Ephemeral tensors carry a count of the consumers still to read them; the store drops a
//! tensor when its last consumer has taken it (the schedule's "evict after last use"
//! directive). Persistent and pinned tensors stay until removed explicitly.

use crate::error::{Result, RuntimeError};
use candle_core::Tensor;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;

/// How long a stored tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// A weight: lives as long as the worker.
    Persistent,
    /// A KV cache (or anything the schedule says to keep): lives until removed.
    Pinned,
    /// An activation: freed after `remaining` more reads.
    Ephemeral {
        /// Reads still expected.
        remaining: usize,
    },
}

#[derive(Debug)]
struct Entry {
    tensor: Tensor,
    residency: Residency,
}

/// Tensors held by one worker, by name (or any other key that can name them in errors).
#[derive(Debug)]
pub struct TensorStore<K = String> {
    worker: String,
    entries: HashMap<K, Entry>,
    bytes: usize,
    peak_bytes: usize,
    freed: usize,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl<K: Eq + Hash + Display> TensorStore<K> {
    /// An empty store for `worker` (the name is used in errors).
    pub fn new(worker: impl Into<String>) -> Self {
        Self {
            worker: worker.into(),
            entries: HashMap::new(),
            bytes: 0,
            peak_bytes: 0,
            freed: 0,
        }
    }

    /// Stores `tensor` under `name`, replacing any previous tensor of that name. An ephemeral
    /// tensor with no consumers is dropped at once.
    pub fn insert(&mut self, name: impl Into<K>, tensor: Tensor, residency: Residency) {
        if let Residency::Ephemeral { remaining: 0 } = residency {
            self.freed += 1;
            return;
        }
        let name = name.into();
        self.bytes += tensor_bytes(&tensor);
        if let Some(old) = self.entries.insert(name, Entry { tensor, residency }) {
            self.bytes -= tensor_bytes(&old.tensor);
        }
        self.peak_bytes = self.peak_bytes.max(self.bytes);
    }

    /// Reads `name` as one of its consumers: an ephemeral tensor's count drops by one and the
    /// tensor is freed when it reaches zero.
    pub fn consume<Q>(&mut self, name: &Q) -> Result<Tensor>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Display + ?Sized,
    {
        let entry = self
            .entries
            .get_mut(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                worker: self.worker.clone(),
                tensor: name.to_string(),
            })?;
        let t = entry.tensor.clone();
        if let Residency::Ephemeral { remaining } = &mut entry.residency {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.entries.remove(name);
                self.bytes -= tensor_bytes(&t);
                self.freed += 1;
            }
        }
        Ok(t)
    }

    /// Looks at `name` without counting a read.
    pub fn peek<Q>(&self, name: &Q) -> Option<&Tensor>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(name).map(|e| &e.tensor)
    }

    /// Whether `name` is held.
    pub fn contains<Q>(&self, name: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.contains_key(name)
    }

    /// Removes `name` whatever its residency.
    pub fn remove<Q>(&mut self, name: &Q) -> Option<Tensor>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let e = self.entries.remove(name)?;
        self.bytes -= tensor_bytes(&e.tensor);
        Some(e.tensor)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Most bytes ever held at once.
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    /// Ephemeral tensors freed so far.
    pub fn freed(&self) -> usize {
        self.freed
    }

    /// Number of tensors held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ephemeral_freed_after_last_consumer_others_stay() {
        let t = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut s: TensorStore = TensorStore::new("w0");
        s.insert("w", t.clone(), Residency::Persistent);
        s.insert("kv", t.clone(), Residency::Pinned);
        s.insert("a", t.clone(), Residency::Ephemeral { remaining: 2 });
        s.insert("dead", t, Residency::Ephemeral { remaining: 0 });
        assert_eq!(s.len(), 3);
        assert_eq!(s.bytes(), 3 * 64);
        s.consume("a").unwrap();
        assert!(s.contains("a"));
        s.consume("a").unwrap();
        assert!(!s.contains("a"));
        assert!(matches!(
            s.consume("a"),
            Err(RuntimeError::MissingTensor { .. })
        ));
        for _ in 0..3 {
            s.consume("w").unwrap();
            s.consume("kv").unwrap();
        }
        assert_eq!(s.len(), 2);
        assert_eq!(s.freed(), 2);
        assert_eq!(s.peak_bytes(), 3 * 64);
        assert!(s.remove("kv").is_some());
        assert_eq!(s.bytes(), 64);
    }
}
