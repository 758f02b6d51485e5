//! Every model family against the reference logits of its committed fixture
//! (`runtime/tests/fixtures/<model_type>`, made by `scripts/make-fixtures.py`): the Hugging Face
//! folder loads (config, f32/f16/bf16 safetensors, one file or shards), the logits of the prefill
//! and of each decode step are within 1e-4 of the reference, the greedy tokens are equal, and
//! the answer is bitwise the same on 1, 2 and 3 workers and disaggregated (prefill on w0, KV
//! streamed to w1, decode there).

mod common;
mod family_check;
use family_check::{check_family, fixtures, reference};
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::models::{generate, Family, Model};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::graph::Graph;
use std::sync::Arc;

#[test]
fn gpt2_fixture_matches_reference() {
    check_family("gpt2");
}

#[test]
fn llama_fixture_matches_reference() {
    check_family("llama");
}

#[test]
fn qwen2_fixture_matches_reference() {
    check_family("qwen2");
}

#[test]
fn mistral_fixture_matches_reference() {
    check_family("mistral");
}

/// Clear errors: an unknown `model_type`, a missing tensor, a shape that disagrees with the
/// config, each naming the file or the tensor.
#[test]
fn bad_folders_are_refused_with_the_file_and_tensor_named() {
    let dir = std::env::temp_dir().join(format!("genie-families-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let llama = fixtures().join("llama");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(llama.join(f), dir.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(llama.join("config.json")).unwrap();
    let with = |from: &str, to: &str| {
        assert!(config.contains(from), "{from}");
        std::fs::write(dir.join("config.json"), config.replace(from, to)).unwrap();
    };
    with("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
    let e = Model::load(&dir).unwrap_err().to_string();
    assert!(e.contains("gpt_neox") && e.contains("config.json"), "{e}");

    let run = |kind: &Model| {
        let opts = WorkerOptions {
            model_dir: Some(dir.clone()),
            ..WorkerOptions::default()
        };
        let cluster = EmbeddedCluster::start_with(1, Arc::new(CpuKernels::new()), opts).unwrap();
        let mut driver =
            Driver::connect(&cluster.cluster, WeightSpec::Checkpoint(".".into())).unwrap();
        let one = |g: &Graph| Ok(Placement::single(g));
        let e = generate(&mut driver, kind, &[1, 2, 3], 1, 0, one, one)
            .unwrap_err()
            .to_string();
        cluster.stop(driver).unwrap();
        e
    };
    // Untied: the head's `lm_head.weight` is not in the file.
    with(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    let e = run(&Model::load(&dir).unwrap());
    assert!(
        e.contains("lm_head.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    // A wider MLP than the file's.
    with("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    let e = run(&Model::load(&dir).unwrap());
    assert!(e.contains("mlp") && e.contains("shape"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Mistral's sliding window is refused with a clear error before anything runs, when the
/// prompt and steps would exceed it.
#[test]
fn mistral_beyond_its_window_is_refused_up_front() {
    let model = Model::load(&fixtures().join("mistral")).unwrap();
    let opts = WorkerOptions {
        model_dir: Some(fixtures()),
        ..WorkerOptions::default()
    };
    let cluster = EmbeddedCluster::start_with(1, Arc::new(CpuKernels::new()), opts).unwrap();
    let mut driver =
        Driver::connect(&cluster.cluster, WeightSpec::Checkpoint("mistral".into())).unwrap();
    let one = |g: &Graph| Ok(Placement::single(g));
    let p: Vec<i64> = (0..60).collect();
    let e = generate(&mut driver, &model, &p, 10, 0, one, one).unwrap_err();
    assert!(e.to_string().contains("sliding window of 64"), "{e}");
    let ok = generate(&mut driver, &model, &p, 4, 1, one, one).unwrap();
    assert_eq!(ok.tokens.len(), 5);
    cluster.stop(driver).unwrap();
}

/// The serving engine is family-neutral: on a Llama-style checkpoint (GQA, so the KV pool is
/// sized by KV heads) several concurrent requests give the reference's greedy tokens,
/// disaggregated (prefill on w0, decode on w1).
#[test]
fn the_engine_serves_llama_style_checkpoints() {
    use genie_runtime::engine::{Engine, EngineConfig, Request, Sampling};
    for kind in ["llama", "qwen2"] {
        let model = Model::load(&fixtures().join(kind)).unwrap();
        let r = reference(kind);
        let opts = WorkerOptions {
            model_dir: Some(fixtures()),
            ..WorkerOptions::default()
        };
        let cluster = EmbeddedCluster::start_with(2, Arc::new(CpuKernels::new()), opts).unwrap();
        let driver =
            Driver::connect(&cluster.cluster, WeightSpec::Checkpoint(kind.to_owned())).unwrap();
        let cfg = EngineConfig::disaggregated(model.clone());
        assert_eq!(cfg.kv_bytes(10), model.kv_bytes(10));
        let engine = Engine::start(driver, cfg).unwrap();
        let handles: Vec<_> = (0..3)
            .map(|_| {
                engine
                    .submit(Request {
                        prompt: r.prompt_ids.clone(),
                        max_new_tokens: r.tokens.len(),
                        stop: vec![],
                        sampling: Sampling::Greedy,
                    })
                    .unwrap()
            })
            .collect();
        for h in handles {
            let got: Vec<i64> = h.tokens().collect::<Result<_, _>>().unwrap();
            assert_eq!(got, r.tokens, "{kind}");
        }
        let driver = engine.shutdown().unwrap();
        cluster.stop(driver).unwrap();
    }
}
