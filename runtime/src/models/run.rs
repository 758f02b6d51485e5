//! `genie generate`: a model folder run on an embedded two-worker cluster, prefill on `w0` (its
//! KV caches built on `w1`), every decode step on `w1`, where the caches stay pinned.

use super::{generate_with, Family, Model, Sampling};
use crate::driver::{Driver, EmbeddedCluster};
use crate::error::{Result, RuntimeError};
use crate::kernels::CpuKernels;
use crate::limits::WorkerOptions;
use crate::plan::{cpu_topology, Placement};
use crate::proto::WeightSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// A Hugging Face model folder: `config.json`, safetensors, optionally `tokenizer.json`.
    pub model: PathBuf,
    /// The prompt as text (needs `tokenizer.json`).
    pub prompt: Option<String>,
    /// The prompt as token ids.
    pub prompt_ids: Option<Vec<i64>>,
    /// Tokens to generate (the first from the prefill).
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: Sampling,
}

/// A folder's `tokenizer.json`, through the `tokenizers` crate.
pub struct TextTokenizer(tokenizers::Tokenizer);

impl TextTokenizer {
    /// `dir/tokenizer.json`, or `None` when the folder has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        tokenizers::Tokenizer::from_file(&path)
            .map(|t| Some(Self(t)))
            .map_err(|e| RuntimeError::Checkpoint {
                path,
                reason: format!("tokenizer: {e}"),
            })
    }

    /// Token ids of `text` (special tokens such as a BOS added as the tokenizer says).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .0
            .encode(text, true)
            .map_err(|e| RuntimeError::Plan(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// The text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        self.0
            .decode(&ids, true)
            .map_err(|e| RuntimeError::Plan(format!("tokenizer: {e}")))
    }
}

/// Runs `genie generate`: progress and text to `out`, the generated ids returned (the caller
/// prints them as the last line).
pub fn run_generate(opts: &GenerateOptions, out: &mut dyn FnMut(String)) -> Result<Vec<i64>> {
    let dir = std::fs::canonicalize(&opts.model).map_err(|e| RuntimeError::Checkpoint {
        path: opts.model.clone(),
        reason: e.to_string(),
    })?;
    let model = Model::load(&dir)?;
    let tok = TextTokenizer::load(&dir)?;
    let prompt = match (&opts.prompt, &opts.prompt_ids, &tok) {
        (_, Some(ids), _) => ids.clone(),
        (Some(text), None, Some(t)) => t.encode(text)?,
        (Some(_), None, None) => {
            return Err(RuntimeError::Plan(format!(
                "{} has no tokenizer.json: give --prompt-ids",
                dir.display()
            )))
        }
        (None, None, _) => {
            return Err(RuntimeError::Plan(
                "give --prompt TEXT or --prompt-ids 1,2,3".into(),
            ))
        }
    };
    if opts.max_tokens == 0 {
        return Ok(Vec::new());
    }
    out(format!("model {}: {}", dir.display(), model.describe()));
    out(format!("prompt ids {prompt:?}"));
    let wopts = WorkerOptions {
        model_dir: Some(dir.clone()),
        ..WorkerOptions::default()
    };
    let cluster = EmbeddedCluster::start_with(2, Arc::new(CpuKernels::new()), wopts)?;
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Checkpoint(".".into()))?;
    // The scheduler's placements: prefill on w0 with the KV caches on w1, decode on w1.
    let sched = std::cell::RefCell::new(genie_scheduler::Scheduler::new(cpu_topology(2)?));
    let pre = |g: &_| Placement::scheduled(&mut sched.borrow_mut(), g, 0, 1);
    let dec = |g: &_| Placement::scheduled(&mut sched.borrow_mut(), g, 1, 1);
    let gen = generate_with(
        &mut driver,
        &model,
        &prompt,
        opts.max_tokens - 1,
        0,
        &opts.sampling,
        pre,
        dec,
    );
    let stopped = cluster.stop(driver);
    let gen = gen?;
    stopped?;
    if let Some(t) = &tok {
        out(format!("{}{}", t.decode(&prompt)?, t.decode(&gen.tokens)?));
    }
    Ok(gen.tokens)
}
