//! GPT-2: config from `config.json` (`n_layer`, `n_embd`, `n_head`, `vocab_size`,
//! `n_positions`, `layer_norm_epsilon`), the scheduler's `gpt2_prefill` / `gpt2_decode`
//! builders, and its checkpoint keys (`h.{i}.attn.c_attn.weight`, ..., with or without the
//! `transformer.` prefix of `GPT2LMHeadModel` files; the LM head tied to `wte.weight`).

use super::{sched_err, Family};
use crate::error::Result;
use genie_scheduler::builders::{
    gpt2_decode, gpt2_decode_batch, gpt2_prefill, gpt2_prefill_batch, gpt2_prefill_last, Gpt2Config,
};
use genie_scheduler::graph::Graph;
use serde::Deserialize;

/// The fields of a GPT-2 `config.json` this runtime reads; absent ones take GPT-2 124M's values.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct HfGpt2 {
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    vocab_size: usize,
    n_positions: usize,
    layer_norm_epsilon: f32,
    n_inner: Option<usize>,
    activation_function: String,
}

impl Default for HfGpt2 {
    fn default() -> Self {
        let c = Gpt2Config::default();
        Self {
            n_layer: c.layers,
            n_embd: c.hidden,
            n_head: c.heads,
            vocab_size: c.vocab,
            n_positions: c.context,
            layer_norm_epsilon: c.layer_norm_eps,
            n_inner: None,
            activation_function: "gelu_new".into(),
        }
    }
}

/// GPT-2's config from a parsed `config.json`.
pub fn from_config_json(v: &serde_json::Value) -> std::result::Result<Gpt2Config, String> {
    let hf = HfGpt2::deserialize(v).map_err(|e| format!("gpt2 config: {e}"))?;
    if hf.n_inner.is_some_and(|n| n != 4 * hf.n_embd) {
        return Err("gpt2 config: n_inner other than 4·n_embd is not supported".into());
    }
    if hf.activation_function != "gelu_new" {
        return Err(format!(
            "gpt2 config: activation_function `{}` is not supported (gelu_new is)",
            hf.activation_function
        ));
    }
    Ok(Gpt2Config {
        layers: hf.n_layer,
        hidden: hf.n_embd,
        heads: hf.n_head,
        vocab: hf.vocab_size,
        context: hf.n_positions,
        layer_norm_eps: hf.layer_norm_epsilon,
        batch: 1,
    })
}

/// Keys parameter `name` may have: as named, and with the `transformer.` prefix added or
/// removed.
pub fn checkpoint_keys(name: &str) -> Vec<String> {
    let alt = match name.strip_prefix("transformer.") {
        Some(rest) => rest.to_owned(),
        None => format!("transformer.{name}"),
    };
    vec![name.to_owned(), alt]
}

impl Family for Gpt2Config {
    fn model_type(&self) -> &str {
        "gpt2"
    }
    fn prefill(&self, seq_len: usize) -> Result<Graph> {
        gpt2_prefill(self, seq_len).map_err(sched_err)
    }
    fn prefill_last(&self, seq_len: usize) -> Result<Graph> {
        gpt2_prefill_last(self, seq_len).map_err(sched_err)
    }
    fn decode(&self, kv_len: usize) -> Result<Graph> {
        gpt2_decode(self, kv_len).map_err(sched_err)
    }
    fn decode_batch(&self, kv_lens: &[usize]) -> Result<Graph> {
        gpt2_decode_batch(self, kv_lens).map_err(sched_err)
    }
    fn prefill_batch(&self, lens: &[usize]) -> Result<Graph> {
        gpt2_prefill_batch(self, lens).map_err(sched_err)
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
        self.hidden
    }
    fn describe(&self) -> String {
        format!(
            "gpt2: {} layers × {} hidden, {} heads, vocab {}",
            self.layers, self.hidden, self.heads, self.vocab
        )
    }
}
