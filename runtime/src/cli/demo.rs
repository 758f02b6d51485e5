//! `genie demo`: a decoder (GPT-2, or any family of [`genie_runtime::models`] from a Hugging Face
//! folder) disaggregated on an embedded cluster by the scheduler's placement, against the naive
//! placement. An experiment of the `genie` binary, not part of the library.
//!
//! Two workers on loopback: `w0` runs the prefill; `w1`, the decode worker, holds the KV caches
//! and runs every decode step whole. Both placements are the scheduler's
//! ([`Placement::scheduled`]): the prefill's compute on `w0` with its KV caches on `w1` (the
//! co-location constraint keeps each cache with its group), a decode step on `w1`, so only the
//! token in and the logits out cross the network. During the prefill each layer's K/V travels to
//! `w1` as soon as `w0` has computed it, while `w0` goes on with the next layer. The naive
//! baseline, hand-made, keeps the KV caches on the prefill worker, where the front end
//! (embeddings, final norm, LM head) also runs, and runs the decoder layers on the other worker,
//! so the caches cross the network every step, and it waits for every transfer before computing
//! on (no overlap).
//!
//! Then the runtime's feedback loop: links and compute calibrated from the measured runs, and
//! three fresh prefills each predicted before it runs.

use genie_runtime::driver::{Driver, EmbeddedCluster, RunOutput, TransferSample};
use genie_runtime::error::{Result, RuntimeError};
use genie_runtime::feedback::{calibrate_links, predict_makespan, ComputeCalibration};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::models::{
    argmax_last, prefill_last, prompt, run_decode_step, run_prefill, Family, Model,
};
use genie_runtime::plan::{cpu_topology, layer_of, Placement};
use genie_runtime::proto::WeightSpec;
use genie_runtime::trace::{summarize, write_chrome_trace, CounterSnapshot, Span};
use genie_scheduler::graph::{Graph, OpKind};
use genie_scheduler::topology::DeviceId;
use genie_scheduler::{OptimizationPlan, Scheduler, Topology};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Decode steps each placement runs in a row before the other placement's turn.
const DECODE_BLOCK: usize = 4;

/// The prefill worker and the decode worker.
const PREFILL: usize = 0;
const DECODE: usize = 1;

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
    /// Bytes per decode step, naive / scheduled.
    pub decode_bytes_ratio: f64,
    /// Decode step latency (median), naive / scheduled.
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

/// Who places a phase's graphs.
#[derive(Clone, Copy, PartialEq)]
enum Placer {
    /// The scheduler: prefill on w0 with its KV caches on w1, decode on w1.
    Scheduled,
    /// The hand-made baseline: KV caches on w0, decoder layers on w1, no overlap.
    Naive,
}

impl Placer {
    fn prefill(self, s: &mut Scheduler, g: &Graph) -> Result<Placement> {
        match self {
            Self::Scheduled => Placement::scheduled(s, g, PREFILL, DECODE),
            Self::Naive => {
                let mut p = Placement::single(g);
                p.overlap = false;
                Ok(p)
            }
        }
    }

    fn decode(self, s: &mut Scheduler, g: &Graph) -> Result<Placement> {
        match self {
            Self::Scheduled => Placement::scheduled(s, g, DECODE, DECODE),
            Self::Naive => {
                let mut p = Placement::by_rule(g, |n| {
                    usize::from(layer_of(g, n.id).is_some() && !is_kv(&n.op))
                });
                p.overlap = false;
                Ok(p)
            }
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Naive => "naive",
        }
    }
}

fn is_kv(op: &OpKind) -> bool {
    matches!(
        op,
        OpKind::KvCache { .. } | OpKind::KvCacheAppend | OpKind::KvCacheRead { .. }
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One sequence: its prefill and decode steps under one placer.
struct Phase {
    prefill: RunOutput,
    prefill_graph: Graph,
    prefill_place: Placement,
    steps: Vec<RunOutput>,
    tokens: Vec<i64>,
    seq: u64,
    prompt_len: usize,
    placer: Placer,
    label: &'static str,
}

/// What every step of the demo needs.
struct Demo<'a> {
    driver: Driver,
    model: Model,
    scheduler: Scheduler,
    opts: &'a DemoOptions,
    out: &'a mut dyn FnMut(String),
}

impl Demo<'_> {
    fn say(&mut self, line: String) {
        (self.out)(line);
    }

    /// A prefill of `tokens` as sequence `seq`, placed by `placer`.
    fn prefill(
        &mut self,
        tokens: &[i64],
        seq: u64,
        placer: Placer,
        label: &'static str,
    ) -> Result<Phase> {
        let s = tokens.len();
        let (g, last) = prefill_last(&self.model, s)?;
        let p = placer.prefill(&mut self.scheduler, &g)?;
        let prefill = run_prefill(&self.driver, &g, &p, tokens, last, seq)?;
        let first = prefill
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("prefill returned nothing".into()))?;
        let next = argmax_last(first)?;
        let sum = summarize(&prefill.spans);
        self.say(format!(
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
            tokens: vec![next],
            seq,
            prompt_len: s,
            placer,
            label,
        })
    }

    /// One greedy decode step of `ph`'s sequence.
    fn decode_step(&mut self, ph: &mut Phase) -> Result<()> {
        let step = ph.steps.len();
        let l = ph.prompt_len + step;
        let dg = self.model.decode(l)?;
        let dp = ph.placer.decode(&mut self.scheduler, &dg)?;
        let tok = ph.tokens.last().copied().unwrap_or(0);
        let r = run_decode_step(&self.driver, &dg, &dp, tok, l, ph.seq)?;
        let o = r
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("decode returned nothing".into()))?;
        ph.tokens.push(argmax_last(o)?);
        let sum = summarize(&r.spans);
        self.say(format!(
            "[{}] decode step {}/{} (kv {l}): {:.2} ms (compute+transfer span {:.2} ms, busiest worker {:.2} ms), {} bytes between workers, {} to/from the driver",
            ph.label,
            step + 1,
            self.opts.steps,
            r.wall.as_secs_f64() * 1e3,
            sum.makespan_us / 1e3,
            sum.busiest_worker_us() / 1e3,
            r.counters.bytes_moved,
            r.driver_bytes
        ));
        ph.steps.push(r);
        Ok(())
    }

    /// The scheduler's schedule of one decode step, and where its placements put the KV caches.
    fn show_placements(&mut self) -> Result<()> {
        let dg = self.model.decode(self.opts.seq_len)?;
        let s = self
            .scheduler
            .create_schedule(&dg, &OptimizationPlan::default())
            .map_err(RuntimeError::Scheduler)?;
        self.say(format!("scheduler's schedule of one decode step:\n{s}"));
        let pg = self.model.prefill(self.opts.seq_len)?;
        let pre = Placer::Scheduled.prefill(&mut self.scheduler, &pg)?;
        let dec = Placer::Scheduled.decode(&mut self.scheduler, &dg)?;
        let on = |g: &Graph, p: &Placement, w: usize| {
            g.nodes()
                .iter()
                .filter(|n| p.worker_of[n.id.index()] == w)
                .count()
        };
        let kv_on = |g: &Graph, p: &Placement| {
            g.nodes()
                .iter()
                .filter(|n| is_kv(&n.op))
                .all(|n| p.worker_of[n.id.index()] == DECODE)
        };
        self.say(format!(
            "scheduler's placement, prefill on w0 with the KV caches on w1: {} of {} nodes on w1 (KV caches on w1: {}); a decode step on w1: {} of {} nodes on w1 (KV caches on w1: {})",
            on(&pg, &pre, DECODE),
            pg.nodes().len(),
            kv_on(&pg, &pre),
            on(&dg, &dec, DECODE),
            dg.nodes().len(),
            kv_on(&dg, &dec),
        ));
        Ok(())
    }

    /// Both placements' prefills, then their decode steps alternated in blocks (both see the same
    /// machine load while each runs a few steps in a row, as a decode worker does: alternating
    /// every step would start each step from the other placement's caches). Their tokens must
    /// agree.
    fn compare(&mut self, p: &[i64]) -> Result<(Phase, Phase)> {
        let mut ours = self.prefill(p, 1, Placer::Scheduled, Placer::Scheduled.label())?;
        let mut naive = self.prefill(p, 2, Placer::Naive, Placer::Naive.label())?;
        let mut done = 0;
        while done < self.opts.steps {
            let n = DECODE_BLOCK.min(self.opts.steps - done);
            for ph in [&mut ours, &mut naive] {
                for _ in 0..n {
                    self.decode_step(ph)?;
                }
            }
            done += n;
        }
        if ours.tokens != naive.tokens {
            return Err(RuntimeError::Plan(format!(
                "placements disagree on the generated tokens: {:?} vs {:?}",
                ours.tokens, naive.tokens
            )));
        }
        self.say(format!(
            "generated tokens (both placements agree): {:?}",
            ours.tokens
        ));
        Ok((ours, naive))
    }

    /// Calibrates `topo`'s link from every transfer of `runs` and compute per op kind from three
    /// more scheduled prefills (recent, steady runs: not the process's first, which pay its
    /// warm-up) and the decode steps of `runs`.
    fn calibrate(
        &mut self,
        p: &[i64],
        runs: &[&Phase],
        topo: &mut Topology,
    ) -> Result<ComputeCalibration> {
        let mut extra = Vec::new();
        for seq in 6..9u64 {
            extra.push(self.prefill(p, seq, Placer::Scheduled, "scheduled, for calibration")?);
            self.driver.free_sequence(seq)?;
        }
        let mut samples: Vec<TransferSample> = Vec::new();
        let mut cal = ComputeCalibration::default();
        for ph in runs.iter().copied().chain(&extra) {
            samples.extend(ph.prefill.transfers.iter().cloned());
            for r in &ph.steps {
                samples.extend(r.transfers.iter().cloned());
            }
        }
        for ph in &extra {
            cal.add_run(&ph.prefill_graph, topo, &ph.prefill);
        }
        for ph in runs {
            for (i, r) in ph.steps.iter().enumerate() {
                let dg = self.model.decode(ph.prompt_len + i)?;
                cal.add_run(&dg, topo, r);
            }
        }
        let before = topo.link(DeviceId(PREFILL as u32), DeviceId(DECODE as u32));
        match calibrate_links(topo, &samples) {
            Ok(cals) => {
                for c in cals {
                    self.say(format!(
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
            Err(e) => self.say(format!(
                "link calibration failed, keeping the prior link: {e}"
            )),
        }
        Ok(cal)
    }

    /// Three fresh scheduled prefills, each predicted just before it runs from the runs before
    /// it (the last three: the calibration follows a machine whose speed drifts, as a runtime
    /// calibrating online would). Returns the median run and the median prediction error.
    fn predict(
        &mut self,
        p: &[i64],
        like: &Phase,
        topo: &Topology,
        cal: &mut ComputeCalibration,
    ) -> Result<(Phase, f64)> {
        let mut fresh = Vec::new();
        let mut errors = Vec::new();
        for seq in 3..6u64 {
            let predicted = predict_makespan(&like.prefill_graph, &like.prefill_place, topo, cal)?;
            let ph = self.prefill(p, seq, Placer::Scheduled, "scheduled, after calibration")?;
            self.driver.free_sequence(seq)?;
            let measured = summarize(&ph.prefill.spans).makespan_us / 1e6;
            self.say(format!(
                "  predicted {:.1} ms, measured {:.1} ms",
                predicted * 1e3,
                measured * 1e3
            ));
            errors.push(if measured > 0.0 {
                (predicted - measured).abs() / measured
            } else {
                f64::INFINITY
            });
            cal.add_run(&ph.prefill_graph, topo, &ph.prefill);
            cal.keep_last(3);
            fresh.push(ph);
        }
        // The median run is the measurement of the hand-off (the machine may be shared).
        fresh.sort_by(|a, b| {
            summarize(&a.prefill.spans)
                .makespan_us
                .total_cmp(&summarize(&b.prefill.spans).makespan_us)
        });
        Ok((fresh.swap_remove(1), median(&mut errors)))
    }
}

/// The options as run: a folder's model and checkpoint, the prompt fitted to its context, the
/// checkpoint named by its absolute path (workers resolve it inside their model directory).
fn resolve(opts: &DemoOptions) -> Result<(Model, DemoOptions)> {
    let model = Model::named(&opts.model)?;
    let mut opts = opts.clone();
    if Path::new(&opts.model).is_dir() {
        opts.weights = Some(PathBuf::from(&opts.model));
        opts.seq_len = opts.seq_len.min(model.context().saturating_sub(opts.steps));
    }
    opts.weights = opts.weights.map(|w| std::fs::canonicalize(&w).unwrap_or(w));
    if opts.seq_len + opts.steps > model.context() || opts.seq_len < 2 {
        return Err(RuntimeError::Plan(format!(
            "sequence {} + {} steps must fit the context of {}",
            opts.seq_len,
            opts.steps,
            model.context()
        )));
    }
    Ok((model, opts))
}

/// Two embedded workers that may load the checkpoint the user named, and only from where it lies.
fn start_cluster(opts: &DemoOptions) -> Result<EmbeddedCluster> {
    let model_dir = opts.weights.as_ref().map(|p| {
        let dir = if p.is_dir() {
            p.as_path()
        } else {
            p.parent().unwrap_or(p)
        };
        if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir.to_path_buf()
        }
    });
    let wopts = WorkerOptions {
        model_dir,
        ..WorkerOptions::default()
    };
    EmbeddedCluster::start_with(2, Arc::new(CpuKernels::new()), wopts)
}

/// Bytes over the network (the driver's included) and the median wall time of a decode step.
fn per_step(ph: &Phase) -> (f64, f64) {
    let n = ph.steps.len().max(1) as f64;
    let bytes = ph
        .steps
        .iter()
        .map(|r| (r.counters.bytes_moved + r.driver_bytes) as f64)
        .sum::<f64>()
        / n;
    let mut lat: Vec<f64> = ph.steps.iter().map(|r| r.wall.as_secs_f64()).collect();
    (bytes, median(&mut lat))
}

/// The measured prefill, then `decode`'s steps back to back, as one Chrome/Perfetto trace.
fn trace_of(prefill: &Phase, decode: &Phase) -> (Vec<Span>, CounterSnapshot) {
    let mut spans: Vec<Span> = prefill.prefill.spans.clone();
    let mut offset = summarize(&prefill.prefill.spans).makespan_us;
    let mut counters = prefill.prefill.counters;
    for r in &decode.steps {
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
        offset += summarize(&r.spans).makespan_us + 10.0;
        counters = add_counters(counters, r.counters);
    }
    (spans, counters)
}

/// Runs the demo, sending each progress line to `out`; returns the figures (the caller prints
/// [`DemoFigures::last_line`] last).
pub fn run_demo(opts: &DemoOptions, out: &mut dyn FnMut(String)) -> Result<DemoFigures> {
    let started = Instant::now();
    let (model, opts) = resolve(opts)?;
    let cluster = start_cluster(&opts)?;
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
    let driver = Driver::connect(&cluster.cluster, weights)?;
    out(format!(
        "model {}: {}; prompt {} tokens, {} decode steps",
        opts.model,
        model.describe(),
        opts.seq_len,
        opts.steps
    ));
    // The scheduler's view of the cluster: two CPU devices joined by a loopback link, an initial
    // guess calibrated below from measured transfers.
    let mut topo = cpu_topology(2)?;
    let p = prompt(opts.seq_len, model.vocab());
    let mut demo = Demo {
        driver,
        model,
        scheduler: Scheduler::new(topo.clone()),
        opts: &opts,
        out,
    };
    demo.show_placements()?;
    let (ours, naive) = demo.compare(&p)?;
    let mut cal = demo.calibrate(&p, &[&ours, &naive], &mut topo)?;
    let (measured_run, prediction_error) = demo.predict(&p, &ours, &topo, &mut cal)?;
    let sum = summarize(&measured_run.prefill.spans);
    let measured = sum.makespan_us / 1e6;
    let bound = sum.busiest_worker_us().max(sum.busiest_link_us()) / 1e6;
    demo.say(format!(
        "pipelined prefill→decode hand-off: makespan {:.1} ms; busiest worker compute {:.1} ms; busiest link {:.1} ms; KV streamed {} bytes",
        measured * 1e3,
        sum.busiest_worker_us() / 1e3,
        sum.busiest_link_us() / 1e3,
        sum.total_bytes()
    ));
    demo.say(format!(
        "predicted vs measured makespan: median error {:.1}% over 3 runs, each predicted before it ran",
        prediction_error * 100.0
    ));
    let (cb, cl) = per_step(&ours);
    let (nb, nl) = per_step(&naive);
    demo.say(format!(
        "decode per step (bytes over the network, driver's included): scheduled {cb:.0} bytes, {:.2} ms median; naive {nb:.0} bytes, {:.2} ms median",
        cl * 1e3,
        nl * 1e3
    ));
    let (spans, counters) = trace_of(&measured_run, &ours);
    write_chrome_trace(&opts.trace, &spans, &counters)?;
    demo.say(format!(
        "trace written to {} (open in https://ui.perfetto.dev); counters: {} bytes moved, {} transfers, {} weight cache hits, {} recomputes",
        opts.trace.display(),
        counters.bytes_moved,
        counters.transfers,
        counters.cache_hits,
        counters.recomputes
    ));
    cluster.stop(demo.driver)?;
    out(format!(
        "demo took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    Ok(DemoFigures {
        decode_bytes_ratio: ratio(nb, cb),
        step_latency_ratio: ratio(nl, cl),
        pipelined_vs_bound: ratio(measured, bound),
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
