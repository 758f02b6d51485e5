//! The `genie` binary: demo prints its last line, schedule prints a schedule, bad cluster files
//! are rejected naming the field.

use std::process::Command;

fn genie(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_genie"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_prints_the_specified_last_line() {
    let trace = std::env::temp_dir().join(format!("genie-cli-trace-{}.json", std::process::id()));
    let (ok, out, err) = genie(&[
        "demo",
        "--seq-len",
        "64",
        "--steps",
        "3",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(ok, "demo failed: {err}\n{out}");
    let last = out.lines().last().unwrap();
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields[0], "demo", "{last}");
    let names = [
        "decode_bytes_ratio_vs_naive",
        "step_latency_ratio_vs_naive",
        "pipelined_vs_bound",
        "prediction_error",
    ];
    assert_eq!(fields.len(), 5, "{last}");
    for (f, name) in fields[1..].iter().zip(names) {
        let (k, v) = f.split_once('=').unwrap();
        assert_eq!(k, name);
        let v: f64 = v.parse().unwrap();
        assert!(v.is_finite() && v >= 0.0, "{last}");
    }
    assert!(out.contains("transport: tcp backend"), "{out}");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(t["traceEvents"].as_array().unwrap().len() > 10);
    let _ = std::fs::remove_file(trace);
}

#[test]
fn schedule_command_and_cluster_errors() {
    let dir = std::env::temp_dir().join(format!("genie-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7301\"\n\
         [[workers]]\nname = \"b\"\naddress = \"127.0.0.1:7302\"\n",
    )
    .unwrap();
    let out_file = dir.join("s.json");
    let (ok, out, err) = genie(&[
        "schedule",
        "--model",
        "bert",
        "--cluster",
        good.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("schedule of"), "{out}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert!(s["node_device"].as_array().unwrap().len() > 100);

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[workers]]\nname = \"a\"\naddress = \"localhost\"\n").unwrap();
    let (ok, _, err) = genie(&[
        "schedule",
        "--model",
        "bert",
        "--cluster",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("workers[0].address"), "{err}");
    let (ok, _, err) = genie(&["worker", "--cluster", bad.to_str().unwrap(), "--name", "a"]);
    assert!(!ok);
    assert!(err.contains("workers[0].address"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn schedule_command_takes_a_topology_file() {
    let topo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scheduler/examples/cluster.toml"
    );
    let (ok, out, err) = genie(&["schedule", "--model", "gpt2-decode", "--topology", topo]);
    assert!(ok, "schedule failed: {err}");
    assert!(out.contains("schedule of `gpt2-decode`"), "{out}");
    let (ok, _, err) = genie(&["schedule", "--model", "bert"]);
    assert!(!ok, "schedule without --cluster or --topology succeeded");
    assert!(err.contains("--cluster"), "{err}");
}

/// `genie secret` prints a fresh 32-byte hex secret; `genie worker` refuses a cluster off
/// loopback without one (saying how to make one), and a secret file others may read.
#[test]
fn secure_by_default() {
    use std::os::unix::fs::PermissionsExt;
    let (ok, a, _) = genie(&["secret"]);
    let (_, b, _) = genie(&["secret"]);
    assert!(ok);
    let a = a.trim();
    assert_eq!(a.len(), 64, "{a}");
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    assert_ne!(a, b.trim());

    let dir = std::env::temp_dir().join(format!("genie-cli-secure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = dir.join("cluster.toml");
    let workers = "[[workers]]\nname = \"w0\"\naddress = \"192.0.2.1:7100\"\n";
    std::fs::write(&cluster, workers).unwrap();
    let path = cluster.to_str().unwrap();
    let (ok, _, err) = genie(&["worker", "--cluster", path, "--name", "w0"]);
    assert!(!ok);
    assert!(
        err.contains("genie secret") && err.contains("secret_file"),
        "{err}"
    );
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, a).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        &cluster,
        format!("secret_file = \"cluster.secret\"\n{workers}"),
    )
    .unwrap();
    let (ok, _, err) = genie(&["worker", "--cluster", path, "--name", "w0"]);
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");
    // The driver side refuses the same cluster built in code.
    let mut c = genie_runtime::cluster::Cluster::loopback(&[7100]);
    c.workers[0].address = "192.0.2.1:7100".parse().unwrap();
    let e = genie_runtime::driver::Driver::connect(&c, genie_runtime::proto::WeightSpec::Seeded(1))
        .unwrap_err();
    assert!(
        matches!(e, genie_runtime::RuntimeError::InsecureCluster { .. }),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `genie generate` on the committed fixtures: text in, text out, and as its last line the
/// greedy ids that `transformers`' forward pass gives (`reference.json`); ids in work without a
/// tokenizer; a folder of an unknown model type is refused naming it.
#[test]
fn generate_prints_text_and_reference_tokens_last() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for kind in ["llama", "gpt2"] {
        let dir = fixtures.join(kind);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let want: Vec<i64> = r["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        let (ok, out, err) = genie(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            r["prompt"].as_str().unwrap(),
            "--max-tokens",
            &want.len().to_string(),
        ]);
        assert!(ok, "{kind}: {err}\n{out}");
        let ids: Vec<String> = want.iter().map(i64::to_string).collect();
        let last = out.lines().last().unwrap();
        assert_eq!(last, format!("tokens=[{}]", ids.join(", ")), "{out}");
        assert!(out.contains(r["prompt"].as_str().unwrap()), "{out}");
        let ids_in: Vec<String> = r["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let (ok, out, err) = genie(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids_in.join(","),
            "--max-tokens",
            "3",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "5",
        ]);
        assert!(ok, "{kind}: {err}\n{out}");
        assert!(out.lines().last().unwrap().starts_with("tokens=["), "{out}");
    }
    let (ok, _, err) = genie(&[
        "generate",
        "--model",
        fixtures.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]);
    assert!(!ok && err.contains("config.json"), "{err}");
}

/// `genie demo --model DIR` runs a Llama-style folder disaggregated.
#[test]
fn demo_runs_a_model_folder() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2");
    let trace = std::env::temp_dir().join(format!("genie-cli-qwen-{}.json", std::process::id()));
    let (ok, out, err) = genie(&[
        "demo",
        "--model",
        dir.to_str().unwrap(),
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(ok, "demo failed: {err}\n{out}");
    assert!(out.contains("qwen2: 2 layers"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("demo "), "{out}");
    let _ = std::fs::remove_file(trace);
}
