//! Llama-style decoders (`model_type` `llama`, `qwen2`, `mistral`): config from `config.json`
//! (the scheduler's [`LlamaConfig`] deserializes Hugging Face's field names itself), the
//! `llama_prefill` / `llama_decode` builders, and checkpoint keys as `*ForCausalLM` files
//! spell them (`model.layers.{i}.self_attn.q_proj.weight`, ..., `lm_head.weight` when untied;
//! a bare `*Model` file without the `model.` prefix is read too).

use super::{sched_err, Family};
use crate::error::Result;
use genie_scheduler::builders::{
    llama_decode, llama_decode_batch, llama_prefill, llama_prefill_batch, llama_prefill_last,
    LlamaConfig,
};
use genie_scheduler::graph::Graph;
use serde::Deserialize;

/// The Llama-style config of a parsed `config.json`, checked.
pub fn from_config_json(v: &serde_json::Value) -> std::result::Result<LlamaConfig, String> {
    let mut c = LlamaConfig::deserialize(v).map_err(|e| format!("llama config: {e}"))?;
    // `transformers`' Llama, Qwen2 and Mistral configs default to untied embeddings.
    if v.get("tie_word_embeddings").is_none() {
        c.tied_embeddings = false;
    }
    c.check(1)
        .map_err(|e| format!("{} config: {e}", c.kind.model_type()))?;
    Ok(c)
}

/// Keys parameter `name` may have: as named, and without the `model.` prefix.
pub fn checkpoint_keys(name: &str) -> Vec<String> {
    let mut keys = vec![name.to_owned()];
    if let Some(rest) = name.strip_prefix("model.") {
        keys.push(rest.to_owned());
    }
    keys
}

impl Family for LlamaConfig {
    fn model_type(&self) -> &str {
        self.kind.model_type()
    }
    fn prefill(&self, seq_len: usize) -> Result<Graph> {
        llama_prefill(self, seq_len).map_err(sched_err)
    }
    fn prefill_last(&self, seq_len: usize) -> Result<Graph> {
        llama_prefill_last(self, seq_len).map_err(sched_err)
    }
    fn decode(&self, kv_len: usize) -> Result<Graph> {
        llama_decode(self, kv_len).map_err(sched_err)
    }
    fn decode_batch(&self, kv_lens: &[usize]) -> Result<Graph> {
        llama_decode_batch(self, kv_lens).map_err(sched_err)
    }
    fn prefill_batch(&self, lens: &[usize]) -> Result<Graph> {
        llama_prefill_batch(self, lens).map_err(sched_err)
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn layers(&self) -> usize {
        self.layers
    }
    fn context(&self) -> usize {
        self.context
    }
    fn kv_width(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }
    fn describe(&self) -> String {
        format!(
            "{}: {} layers × {} hidden, {} heads ({} KV heads) of {}, MLP {}, vocab {}{}",
            self.kind.model_type(),
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads(),
            self.head_dim(),
            self.intermediate,
            self.vocab,
            if self.tied_embeddings {
                ", tied embeddings"
            } else {
                ""
            }
        )
    }
}
