//! `genie demo`: a decoder (GPT-2, or any family of [`crate::models`] from a Hugging Face
//! folder) disaggregated on an embedded cluster, against the naive placement.
//!
//! Two workers on TCP loopback: `w0` runs the prefill; `w1`, the decode worker, holds the KV
//! caches and runs every decode step whole (as the scheduler's schedule of a decode step keeps it
//! on one device: only the token in and the logits out cross the network). During the prefill,
//! each layer's K/V travels to `w1` as soon as `w0` has computed it, while `w0` goes on with the
//! next layer. The naive placement keeps the KV caches on the prefill worker, where the front end
//! (embeddings, final norm, LM head) also runs, and runs the decoder layers on the other worker,
//! so the caches cross the network every step, and it waits for every transfer before computing
//! on (no overlap).

use crate::driver::{Driver, EmbeddedCluster, RunOutput, TransferSample};
use crate::error::{Result, RuntimeError};
use crate::feedback::{calibrate_links, predict_makespan, ComputeCalibration};
use crate::kernels::CpuKernels;
use crate::limits::WorkerOptions;
use crate::models::with_last_logits;
use crate::models::{argmax_last, prompt, row_i64, Family, Model};
use crate::plan::{layer_of, Placement};
use crate::proto::WeightSpec;
use crate::trace::{summarize, write_chrome_trace, CounterSnapshot, Span};
use genie_scheduler::builders::Gpt2Config;
use genie_scheduler::cost::DeviceSpec;
use genie_scheduler::graph::{Graph, NodeId, OpKind};
use genie_scheduler::topology::LinkSpec;
use genie_scheduler::{OptimizationPlan, Scheduler, Topology};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Decode steps each placement runs in a row before the other placement's turn.
const DECODE_BLOCK: usize = 4;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `gpt2-small` (4 layers × 128 hidden, 4096 vocab), `gpt2-124m` (the real GPT-2), or a
    /// Hugging Face model folder (its `config.json` and safetensors; `weights` is then ignored).
    pub model: String,
    /// Prompt length (the KV length decode steps attend over).
    pub seq_len: usize,
    /// Decode steps per placement.
    pub steps: usize,
    /// Where to write the Chrome/Perfetto trace.
    pub trace: PathBuf,
    /// Weight seed.
    pub seed: u64,
    /// Optional safetensors checkpoint (HF GPT-2 layout) instead of seeded weights.
    pub weights: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            model: "gpt2-small".into(),
            seq_len: 1000,
            steps: 16,
            trace: std::env::temp_dir().join("genie-demo-trace.json"),
            seed: 42,
            weights: None,
        }
    }
}

/// The figures of the demo's last line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemoFigures {
    /// Bytes per decode step, naive / co-located.
    pub decode_bytes_ratio: f64,
    /// Decode step latency (median), naive / co-located.
    pub step_latency_ratio: f64,
    /// Pipelined prefill hand-off makespan / max(busiest worker compute, busiest link).
    pub pipelined_vs_bound: f64,
    /// |predicted − measured| / measured makespan after calibration: the median over three
    /// fresh prefills, each predicted before it ran.
    pub prediction_error: f64,
}

impl DemoFigures {
    /// The demo's last line.
    pub fn last_line(&self) -> String {
        format!(
            "demo decode_bytes_ratio_vs_naive={:.2} step_latency_ratio_vs_naive={:.2} \
             pipelined_vs_bound={:.3} prediction_error={:.3}",
            self.decode_bytes_ratio,
            self.step_latency_ratio,
            self.pipelined_vs_bound,
            self.prediction_error
        )
    }
}

/// The model configuration a demo model name stands for (a folder: its `config.json`).
pub fn model_config(name: &str) -> Result<Model> {
    let dir = std::path::Path::new(name);
    if dir.is_dir() {
        return Model::load(dir);
    }
    match name {
        "gpt2-small" => Ok(Model::Gpt2(Gpt2Config {
            layers: 4,
            hidden: 128,
            heads: 4,
            vocab: 4096,
            context: 1024,
            ..Gpt2Config::default()
        })),
        "gpt2-124m" | "gpt2" => Ok(Model::Gpt2(Gpt2Config::default())),
        other => Err(RuntimeError::Plan(format!(
            "unknown demo model `{other}` (expected gpt2-small, gpt2-124m or a model folder)"
        ))),
    }
}

/// Nodes of the front end (embeddings, final norm, LM head): those outside every layer.
fn is_frontend(g: &Graph, id: NodeId) -> bool {
    layer_of(g, id).is_none()
}

fn is_kv(op: &OpKind) -> bool {
    matches!(
        op,
        OpKind::KvCache { .. } | OpKind::KvCacheAppend | OpKind::KvCacheRead { .. }
    )
}

/// Co-located prefill: everything on w0 except the KV caches, which are built on w1.
pub fn colocated_prefill(g: &Graph) -> Placement {
    Placement::by_rule(g, |n| usize::from(matches!(n.op, OpKind::KvCacheAppend)))
}

/// Co-located decode: the whole step on w1, the decode worker, where the sequence's KV caches
/// are pinned (the scheduler, too, keeps a decode step on one device).
pub fn colocated_decode(g: &Graph) -> Placement {
    Placement::by_rule(g, |_| 1)
}

/// Naive prefill: everything (KV caches included) on w0.
pub fn naive_prefill(g: &Graph) -> Placement {
    let mut p = Placement::single(g);
    p.overlap = false;
    p
}

/// Naive decode: KV caches stay on w0 (the prefill worker); decoder layers run on w1, so each
/// step ships every layer's whole K and V to w1; no overlap.
pub fn naive_decode(g: &Graph) -> Placement {
    let mut p = Placement::by_rule(g, |n| usize::from(!is_frontend(g, n.id) && !is_kv(&n.op)));
    p.overlap = false;
    p
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Phase {
    prefill: RunOutput,
    prefill_graph: Graph,
    prefill_place: Placement,
    steps: Vec<RunOutput>,
    tokens: Vec<i64>,
    seq: u64,
    prompt_len: usize,
    decode_place: fn(&Graph) -> Placement,
    label: &'static str,
}

fn sched_err(e: genie_scheduler::Error) -> RuntimeError {
    RuntimeError::Scheduler(e)
}

#[allow(clippy::too_many_arguments)]
fn prefill_phase(
    driver: &mut Driver,
    cfg: &Model,
    tokens_in: &[i64],
    seq: u64,
    prefill_place: fn(&Graph) -> Placement,
    decode_place: fn(&Graph) -> Placement,
    label: &'static str,
    out: &mut dyn FnMut(String),
) -> Result<Phase> {
    let s = tokens_in.len();
    let (g, last) = with_last_logits(cfg.prefill(s)?, s)?;
    let p = prefill_place(&g);
    let prefill = driver.run(
        &g,
        &p,
        &[
            ("input_ids", row_i64(tokens_in.to_vec())?),
            ("position_ids", row_i64((0..s as i64).collect())?),
        ],
        &[last],
        seq,
    )?;
    let first = prefill
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("prefill returned nothing".into()))?;
    let tokens = vec![argmax_last(first)?];
    let sum = summarize(&prefill.spans);
    out(format!(
        "[{label}] prefill {s} tokens: {:.1} ms, {} bytes moved in {} transfers",
        sum.makespan_us / 1e3,
        prefill.counters.bytes_moved,
        prefill.counters.transfers
    ));
    Ok(Phase {
        prefill,
        prefill_graph: g,
        prefill_place: p,
        steps: Vec::new(),
        tokens,
        seq,
        prompt_len: s,
        decode_place,
        label,
    })
}

/// One greedy decode step of `ph`'s sequence.
fn decode_step(
    driver: &mut Driver,
    cfg: &Model,
    ph: &mut Phase,
    steps: usize,
    out: &mut dyn FnMut(String),
) -> Result<()> {
    let step = ph.steps.len();
    let l = ph.prompt_len + step;
    let dg = cfg.decode(l)?;
    let dp = (ph.decode_place)(&dg);
    let tok = ph.tokens.last().copied().unwrap_or(0);
    let logits = *dg
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("decode graph has no outputs".into()))?;
    let r = driver.run(
        &dg,
        &dp,
        &[
            ("input_ids", row_i64(vec![tok])?),
            ("position_ids", row_i64(vec![l as i64])?),
        ],
        &[logits],
        ph.seq,
    )?;
    let o = r
        .outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan("decode returned nothing".into()))?;
    ph.tokens.push(argmax_last(o)?);
    let sum = summarize(&r.spans);
    out(format!(
        "[{}] decode step {}/{steps} (kv {l}): {:.2} ms (compute+transfer span {:.2} ms, busiest worker {:.2} ms), {} bytes between workers, {} to/from the driver",
        ph.label,
        step + 1,
        r.wall.as_secs_f64() * 1e3,
        sum.makespan_us / 1e3,
        sum.busiest_worker_us() / 1e3,
        r.counters.bytes_moved,
        r.driver_bytes
    ));
    ph.steps.push(r);
    Ok(())
}

/// Runs the demo, sending each progress line to `out`; returns the figures (the caller prints
/// [`DemoFigures::last_line`] last).
pub fn run_demo(opts: &DemoOptions, out: &mut dyn FnMut(String)) -> Result<DemoFigures> {
    let started = Instant::now();
    let cfg = model_config(&opts.model)?;
    let folder = std::path::Path::new(&opts.model).is_dir();
    let mut opts = opts.clone();
    if folder {
        opts.weights = Some(PathBuf::from(&opts.model));
        // A folder's model may be small: fit the prompt to its context.
        opts.seq_len = opts.seq_len.min(cfg.context().saturating_sub(opts.steps));
    }
    // Workers resolve a checkpoint inside their model directory: name it by its absolute path.
    opts.weights = opts.weights.map(|w| std::fs::canonicalize(&w).unwrap_or(w));
    let opts = &opts;
    if opts.seq_len + opts.steps > cfg.context() || opts.seq_len < 2 {
        return Err(RuntimeError::Plan(format!(
            "sequence {} + {} steps must fit the context of {}",
            opts.seq_len,
            opts.steps,
            cfg.context()
        )));
    }
    // The workers may load the checkpoint the user named, and only from where it lies.
    let model_dir = opts.weights.as_ref().map(|p| {
        let dir = if p.is_dir() {
            p.as_path()
        } else {
            p.parent().unwrap_or(p)
        };
        if dir.as_os_str().is_empty() {
            std::path::PathBuf::from(".")
        } else {
            dir.to_path_buf()
        }
    });
    let wopts = WorkerOptions {
        model_dir,
        ..WorkerOptions::default()
    };
    let cluster = EmbeddedCluster::start_with(2, Arc::new(CpuKernels::new()), wopts)?;
    out(format!(
        "transport: {} backend ({})",
        cluster.selection.backend, cluster.selection.reason
    ));
    for w in &cluster.cluster.workers {
        out(format!("worker {} listening on {}", w.name, w.address));
    }
    let weights = match &opts.weights {
        Some(p) => WeightSpec::Checkpoint(p.display().to_string()),
        None => WeightSpec::Seeded(opts.seed),
    };
    let mut driver = Driver::connect(&cluster.cluster, weights)?;
    out(format!(
        "model {}: {}; prompt {} tokens, {} decode steps",
        opts.model,
        cfg.describe(),
        opts.seq_len,
        opts.steps
    ));

    // The scheduler's view of the same cluster: two CPU devices joined by a loopback link
    // (an initial guess; calibrated below from measured transfers).
    let mut topo = Topology::uniform(2, DeviceSpec::cpu(), LinkSpec::gbps(20.0, 30.0))
        .map_err(|e| RuntimeError::Scheduler(e.into()))?;
    let sched = sched_err;
    {
        let dg = cfg.decode(opts.seq_len)?;
        let mut scheduler = Scheduler::new(topo.clone());
        let s = scheduler
            .create_schedule(&dg, &OptimizationPlan::default())
            .map_err(sched)?;
        out(format!("scheduler's schedule of one decode step:\n{s}"));
        let ours = colocated_decode(&dg);
        let kv_on_w1 = dg
            .nodes()
            .iter()
            .filter(|n| is_kv(&n.op))
            .all(|n| ours.worker_of[n.id.index()] == 1);
        out(format!(
            "runtime placement of a decode step: {} of {} nodes on w1, the decode worker (KV pinned on w1: {kv_on_w1})",
            ours.worker_of.iter().filter(|w| **w == 1).count(),
            dg.nodes().len()
        ));
    }

    let p = prompt(opts.seq_len, cfg.vocab());
    let mut say = |s: String| out(s);
    let mut colo = prefill_phase(
        &mut driver,
        &cfg,
        &p,
        1,
        colocated_prefill,
        colocated_decode,
        "co-located",
        &mut say,
    )?;
    let mut naive = prefill_phase(
        &mut driver,
        &cfg,
        &p,
        2,
        naive_prefill,
        naive_decode,
        "naive",
        &mut say,
    )?;
    // Alternate the two placements in blocks of steps, so both see the same machine load while
    // each runs a few steps in a row, as a decode worker does. (Alternating every step made each
    // step start from the other placement's caches: on one small machine both placements share
    // one L3, and the naive step streams megabytes of KV through it.)
    let mut done = 0;
    while done < opts.steps {
        let n = DECODE_BLOCK.min(opts.steps - done);
        for ph in [&mut colo, &mut naive] {
            for _ in 0..n {
                decode_step(&mut driver, &cfg, ph, opts.steps, &mut say)?;
            }
        }
        done += n;
    }
    if colo.tokens != naive.tokens {
        return Err(RuntimeError::Plan(format!(
            "placements disagree on the generated tokens: {:?} vs {:?}",
            colo.tokens, naive.tokens
        )));
    }
    say(format!(
        "generated tokens (both placements agree): {:?}",
        colo.tokens
    ));

    // Three more co-located prefills, back to back, for calibration only. Compute is calibrated
    // from these (the median ratio per bucket shrugs off one slowed run), not from the first
    // prefills of the process, which pay its warm-up (first touch of the weights' and the
    // allocator's memory, cold code): a runtime calibrates from its recent, steady runs. Links are
    // calibrated from every transfer measured so far.
    let mut extra = Vec::new();
    for k in 0..3u64 {
        let seq = 6 + k;
        extra.push(prefill_phase(
            &mut driver,
            &cfg,
            &p,
            seq,
            colocated_prefill,
            colocated_decode,
            "co-located, for calibration",
            &mut say,
        )?);
        driver.free_sequence(seq)?;
    }

    // Feedback: calibrate links from every measured transfer, compute per op kind.
    let mut samples: Vec<TransferSample> = Vec::new();
    let mut cal = ComputeCalibration::default();
    for ph in [&colo, &naive].into_iter().chain(&extra) {
        samples.extend(ph.prefill.transfers.iter().cloned());
        for r in &ph.steps {
            samples.extend(r.transfers.iter().cloned());
        }
    }
    for ph in &extra {
        cal.add_run(&ph.prefill_graph, &topo, &ph.prefill);
    }
    for ph in [&colo, &naive] {
        for (i, r) in ph.steps.iter().enumerate() {
            let dg = cfg.decode(opts.seq_len + i)?;
            cal.add_run(&dg, &topo, r);
        }
    }
    let before = topo.link(
        genie_scheduler::topology::DeviceId(0),
        genie_scheduler::topology::DeviceId(1),
    );
    match calibrate_links(&mut topo, &samples) {
        Ok(cals) => {
            for c in cals {
                say(format!(
                    "calibrated link w0<->w1 from {} transfers: {:.2} GB/s, {:.1} µs latency (was {:.2} GB/s, {:.1} µs); rms error {:.1} µs; topology v{}",
                    samples.len(),
                    c.spec.bandwidth / 1e9,
                    c.spec.latency * 1e6,
                    before.bandwidth / 1e9,
                    before.latency * 1e6,
                    c.rms_error * 1e6,
                    c.version
                ));
            }
        }
        Err(e) => say(format!(
            "link calibration failed, keeping the prior link: {e}"
        )),
    }

    // Three fresh pipelined prefills, each predicted just before it runs from the runs before
    // it (the last three: the calibration follows a machine whose speed drifts, as a runtime
    // calibrating online would); the prediction error is the median of the three.
    let mut fresh = Vec::new();
    let mut errors = Vec::new();
    for k in 0..3u64 {
        let predicted = predict_makespan(&colo.prefill_graph, &colo.prefill_place, &topo, &cal)?;
        let ph = prefill_phase(
            &mut driver,
            &cfg,
            &p,
            3 + k,
            colocated_prefill,
            colocated_decode,
            "co-located, after calibration",
            &mut say,
        )?;
        driver.free_sequence(3 + k)?;
        let measured = summarize(&ph.prefill.spans).makespan_us / 1e6;
        say(format!(
            "  predicted {:.1} ms, measured {:.1} ms",
            predicted * 1e3,
            measured * 1e3
        ));
        errors.push(if measured > 0.0 {
            (predicted - measured).abs() / measured
        } else {
            f64::INFINITY
        });
        cal.add_run(&ph.prefill_graph, &topo, &ph.prefill);
        cal.keep_last(3);
        fresh.push(ph);
    }
    let prediction_error = median(&mut errors);
    // The median run is the measurement of the hand-off (the machine may be shared).
    fresh.sort_by(|a, b| {
        summarize(&a.prefill.spans)
            .makespan_us
            .total_cmp(&summarize(&b.prefill.spans).makespan_us)
    });
    let measured_run = fresh.swap_remove(1);
    let sum = summarize(&measured_run.prefill.spans);
    let measured = sum.makespan_us / 1e6;
    let bound = sum.busiest_worker_us().max(sum.busiest_link_us()) / 1e6;
    say(format!(
        "pipelined prefill→decode hand-off: makespan {:.1} ms; busiest worker compute {:.1} ms; busiest link {:.1} ms; KV streamed {} bytes",
        measured * 1e3,
        sum.busiest_worker_us() / 1e3,
        sum.busiest_link_us() / 1e3,
        sum.total_bytes()
    ));
    say(format!(
        "predicted vs measured makespan: median error {:.1}% over 3 runs, each predicted before it ran",
        prediction_error * 100.0
    ));

    let per_step = |ph: &Phase| -> (f64, f64) {
        let n = ph.steps.len().max(1) as f64;
        let bytes = ph
            .steps
            .iter()
            .map(|r| (r.counters.bytes_moved + r.driver_bytes) as f64)
            .sum::<f64>()
            / n;
        let mut lat: Vec<f64> = ph.steps.iter().map(|r| r.wall.as_secs_f64()).collect();
        (bytes, median(&mut lat))
    };
    let (cb, cl) = per_step(&colo);
    let (nb, nl) = per_step(&naive);
    say(format!(
        "decode per step (bytes over the network, driver's included): co-located {cb:.0} bytes, {:.2} ms median; naive {nb:.0} bytes, {:.2} ms median",
        cl * 1e3,
        nl * 1e3
    ));

    // Trace: the measured prefill, then the co-located decode steps, back to back.
    let mut spans: Vec<Span> = measured_run.prefill.spans.clone();
    let mut offset = sum.makespan_us;
    let mut counters = measured_run.prefill.counters;
    for r in &colo.steps {
        let s = summarize(&r.spans);
        let first = r
            .spans
            .iter()
            .map(|s| s.start_us)
            .fold(f64::INFINITY, f64::min);
        let first = if first.is_finite() { first } else { 0.0 };
        for sp in &r.spans {
            let mut sp = sp.clone();
            sp.start_us += offset - first;
            spans.push(sp);
        }
        offset += s.makespan_us + 10.0;
        counters = add_counters(counters, r.counters);
    }
    write_chrome_trace(&opts.trace, &spans, &counters)?;
    say(format!(
        "trace written to {} (open in https://ui.perfetto.dev); counters: {} bytes moved, {} transfers, {} weight cache hits, {} recomputes",
        opts.trace.display(),
        counters.bytes_moved,
        counters.transfers,
        counters.cache_hits,
        counters.recomputes
    ));
    cluster.stop(driver)?;
    say(format!(
        "demo took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(DemoFigures {
        decode_bytes_ratio: if cb > 0.0 { nb / cb } else { f64::INFINITY },
        step_latency_ratio: if cl > 0.0 { nl / cl } else { f64::INFINITY },
        pipelined_vs_bound: if bound > 0.0 {
            measured / bound
        } else {
            f64::INFINITY
        },
        prediction_error,
    })
}

fn add_counters(a: CounterSnapshot, b: CounterSnapshot) -> CounterSnapshot {
    CounterSnapshot {
        bytes_moved: a.bytes_moved + b.bytes_moved,
        transfers: a.transfers + b.transfers,
        cache_hits: a.cache_hits + b.cache_hits,
        recomputes: a.recomputes + b.recomputes,
        nodes: a.nodes + b.nodes,
    }
}
