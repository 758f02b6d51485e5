//! Serving benchmark: disaggregated prefill/decode against co-located serving, same requests,
//! same kernels, same number of workers.
//!
//! ```text
//! cargo run --release -p genie-benches --bin serve-bench [-- --rates 4,8,16 --requests 24]
//! ```
//!
//! * **disaggregated**: one embedded cluster of 2 workers and one [`Engine`]: prefill on w0, KV
//!   caches streamed to w1 and pinned there, decode on w1.
//! * **co-located**: two single-worker clusters, each with its own engine serving whole
//!   requests (a waiting prefill runs before that worker's next decode steps); requests go to
//!   them in turn.
//!
//! Both run on embedded workers (threads, loopback) unless `--cluster FILE` names the
//! disaggregated engine's `genie worker` processes (prefill and decode workers by their roles,
//! as `EngineConfig::for_cluster` picks them) and `--colocated A,B` the co-located engines'
//! single-worker cluster files: a worker serves one driver at a time, so the modes need workers
//! of their own. `scripts/netns-cluster.sh --serve` runs it so across network namespaces.
//!
//! A seeded workload (Poisson arrivals; 70 % short prompts, 30 % long ones, so prefills
//! interfere with decodes; uniform output lengths) runs at each rate against both. SLOs come
//! from unloaded latencies measured first (medians of 5 long prompts served alone): TTFT ≤ 5×
//! the unloaded TTFT, TPOT ≤ 3× the unloaded TPOT. Goodput = requests meeting both per second
//! of the run. A sample of requests is checked against its tokens when served alone. Last line:
//! `serve goodput_ratio_vs_colocated=<g> tpot_p99_ratio_vs_colocated=<t> batch8_decode_speedup=<s> requests=<n> failed=<f>`
//! (`g` and `t` at the highest rate where co-located goodput is above zero; `s` decode tokens/s
//! with 8 active sequences over 1, counted over the steps in which all 8 are in the batch, the
//! one sequence at the same mean KV length as the eight).
//! `--decode-only` runs only that last measurement (`--model gpt2-124m` in about a minute).
//!
//! Each embedded worker computes on a thread pool of its own (`--threads`, default half the
//! cores), as workers on two machines would: with one pool shared by the process, a decode
//! step's kernels would queue behind a prefill's on the other worker.

use anyhow::{bail, Context, Result};
use clap::Parser;
use genie_runtime::cluster::Cluster;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::engine::{Completion, Engine, EngineConfig, PrefillOrder, Request};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::models::{Family, Model};
use genie_runtime::proto::WeightSpec;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The allocator the `genie` binary runs its workers with (mimalloc keeps freed memory for
/// reuse; glibc's malloc maps and unmaps each large tensor): the embedded workers here are the
/// same code, and run as `genie worker` processes would.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Disaggregated vs co-located serving on embedded clusters")]
struct Args {
    /// Arrival rates to sweep, requests per second: up to where the co-located engines saturate
    /// on two cores (their TPOT and goodput collapse first, as prefills stall their decodes).
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,192,256")]
    rates: Vec<f64>,
    /// Requests per rate.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Model: gpt2-small (4 layers × 128) or gpt2-124m.
    #[arg(long, default_value = "gpt2-small")]
    model: String,
    /// Short prompts: lengths drawn uniformly from this range.
    #[arg(long, default_value = "8-32")]
    short: String,
    /// Long prompts: lengths drawn uniformly from this range.
    #[arg(long, default_value = "256-384")]
    long: String,
    /// Share of long prompts.
    #[arg(long, default_value_t = 0.3)]
    long_share: f64,
    /// Output lengths drawn uniformly from this range.
    #[arg(long, default_value = "16-48")]
    output: String,
    /// Workload seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Perfetto/Chrome trace of the disaggregated run at the highest rate (one track per
    /// worker, one per link).
    #[arg(long, default_value = "target/serve-trace.json")]
    trace: std::path::PathBuf,
    /// Plot (SVG) of goodput against arrival rate, both modes.
    #[arg(long, default_value = "target/serve-goodput.svg")]
    plot: std::path::PathBuf,
    /// Rounds of the decode-scaling measurement (its median is reported); 0 skips it (the
    /// last line then says `batch8_decode_speedup=NaN`), as the network-namespace smoke runs do.
    #[arg(long, default_value_t = 5)]
    decode_rounds: usize,
    /// The disaggregated engine's cluster file (`genie worker` processes; default: 2 embedded
    /// workers). Needs `--colocated`.
    #[arg(long, requires = "colocated")]
    cluster: Option<std::path::PathBuf>,
    /// The co-located engines' cluster files, one worker each, comma-separated (with
    /// `--cluster`; default: 2 embedded single-worker clusters).
    #[arg(long, value_delimiter = ',', requires = "cluster")]
    colocated: Option<Vec<std::path::PathBuf>>,
    /// Compute threads of each embedded worker, a pool of its own (default: half the cores,
    /// at least one: each mode runs two workers, as two machines would). With one shared pool
    /// a decode step's kernels would queue behind a prefill's on another worker.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Only the decode-scaling measurement on the disaggregated engine (no rate sweep, no
    /// co-located baseline): quick enough for `--model gpt2-124m`. Last line
    /// `serve-decode model=<m> batch8_decode_speedup=<s>`.
    #[arg(long)]
    decode_only: bool,
    /// The order in which every engine (both modes alike) prefills its waiting requests:
    /// `arrival` (first come, first served) or `shortest` (the shortest prompt first; a request
    /// that waited `--max-wait-ms` goes next whatever its length).
    #[arg(long, default_value = "arrival", value_parser = ["arrival", "shortest"])]
    prefill_order: String,
    /// With `--prefill-order shortest`: the longest a request waits before it goes next.
    #[arg(long, default_value_t = 1000)]
    max_wait_ms: u64,
    /// Requests each engine runs at once at most (`EngineConfig::max_running`; both modes
    /// alike, each co-located engine as many).
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Most requests one prefill takes (`EngineConfig::max_prefill_batch`; both modes alike):
    /// short prompts waiting one after another, up to 64 tokens in all, go in one forward pass.
    /// 1 prefills every request alone.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_prefill_batch: u16,
    /// Every engine (both modes alike) waits for each decode step's reply before it sends the
    /// next (`EngineConfig::step_ahead` off): for an A/B of sending steps ahead.
    #[arg(long)]
    no_step_ahead: bool,
}

/// What every engine of both modes is configured with beyond its workers.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    order: PrefillOrder,
    max_running: usize,
    max_prefill_batch: usize,
    step_ahead: bool,
}

impl Tuning {
    fn apply(self, cfg: &mut EngineConfig) {
        cfg.prefill_order = self.order;
        cfg.max_running = self.max_running;
        cfg.max_prefill_batch = self.max_prefill_batch;
        cfg.step_ahead = self.step_ahead;
    }
}

impl Args {
    /// The engines' prefill order.
    fn order(&self) -> PrefillOrder {
        match self.prefill_order.as_str() {
            "shortest" => PrefillOrder::ShortestFirst {
                max_wait: Duration::from_millis(self.max_wait_ms),
            },
            _ => PrefillOrder::Arrival,
        }
    }

    /// What every engine of both modes is configured with beyond its workers.
    fn tuning(&self) -> Tuning {
        Tuning {
            order: self.order(),
            max_running: self.max_running,
            max_prefill_batch: usize::from(self.max_prefill_batch),
            step_ahead: !self.no_step_ahead,
        }
    }
}

fn range(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("`{s}`: expected LOW-HIGH"))?;
    let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
    if a == 0 || b < a {
        bail!("`{s}`: expected 1 <= LOW <= HIGH");
    }
    Ok((a, b))
}

/// One request of the workload: when it arrives (from the start of the run) and what it asks.
#[derive(Clone)]
struct Arrival {
    at: Duration,
    req: Request,
}

fn workload(args: &Args, rate: f64, vocab: usize) -> Result<Vec<Arrival>> {
    let (short, long, out) = (
        range(&args.short)?,
        range(&args.long)?,
        range(&args.output)?,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ rate.to_bits());
    let mut t = 0.0f64;
    let mut v = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        // Exponential inter-arrival times: a Poisson process at `rate`.
        let u: f64 = rng.random::<f64>().max(1e-12);
        t += -u.ln() / rate;
        let (lo, hi) = if rng.random::<f64>() < args.long_share {
            long
        } else {
            short
        };
        let len = rng.random_range(lo..=hi);
        let prompt = (0..len)
            .map(|_| rng.random_range(0..vocab as i64))
            .collect();
        let n = rng.random_range(out.0..=out.1);
        v.push(Arrival {
            at: Duration::from_secs_f64(t),
            req: Request::greedy(prompt, n),
        });
    }
    Ok(v)
}

/// Engines of one serving mode; requests go to them in turn.
struct Mode {
    name: &'static str,
    engines: Vec<Engine>,
    /// Each engine's embedded workers (none: `genie worker` processes from a cluster file).
    clusters: Vec<Option<EmbeddedCluster>>,
}

/// A driver on `file`'s workers, or on `n` embedded ones (kept with it).
fn driver_on(
    file: Option<&Path>,
    n: usize,
    threads: usize,
) -> Result<(Driver, Cluster, Option<EmbeddedCluster>)> {
    let weights = WeightSpec::Seeded(1);
    match file {
        Some(f) => {
            let c = Cluster::load(f).with_context(|| format!("cluster file {}", f.display()))?;
            let d = Driver::connect(&c, weights)
                .with_context(|| format!("connecting to the workers of {}", f.display()))?;
            Ok((d, c, None))
        }
        None => {
            let opts = WorkerOptions {
                threads: Some(threads),
                ..WorkerOptions::default()
            };
            let e = EmbeddedCluster::start_with(n, Arc::new(CpuKernels::new()), opts)?;
            let d = Driver::connect(&e.cluster, weights)?;
            Ok((d, e.cluster.clone(), Some(e)))
        }
    }
}

impl Mode {
    fn disaggregated(
        model: &Model,
        file: Option<&Path>,
        threads: usize,
        tuning: Tuning,
    ) -> Result<Self> {
        let (d, cluster, e) = driver_on(file, 2, threads)?;
        let mut cfg = EngineConfig::for_cluster(model.clone(), &cluster)?;
        if cfg.prefill_worker == cfg.decode_worker {
            bail!("the disaggregated cluster needs a prefill and a decode worker of their own");
        }
        cfg.kv_pool_bytes = 4 << 30;
        tuning.apply(&mut cfg);
        Ok(Self {
            name: "disaggregated",
            engines: vec![Engine::start(d, cfg)?],
            clusters: vec![e],
        })
    }

    fn colocated(
        model: &Model,
        files: Option<&[PathBuf]>,
        threads: usize,
        tuning: Tuning,
    ) -> Result<Self> {
        let mut engines = Vec::new();
        let mut clusters = Vec::new();
        let files: Vec<Option<&Path>> = match files {
            Some(f) => f.iter().map(|p| Some(p.as_path())).collect(),
            None => vec![None, None],
        };
        for f in files {
            let (d, cluster, e) = driver_on(f, 1, threads)?;
            if cluster.workers.len() != 1 {
                bail!(
                    "a co-located engine's cluster has one worker, not {}",
                    cluster.workers.len()
                );
            }
            let mut cfg = EngineConfig::disaggregated(model.clone());
            cfg.decode_worker = 0;
            cfg.kv_pool_bytes = 2 << 30;
            tuning.apply(&mut cfg);
            engines.push(Engine::start(d, cfg)?);
            clusters.push(e);
        }
        Ok(Self {
            name: "co-located",
            engines,
            clusters,
        })
    }

    /// Stops the engines, and the embedded workers; `genie worker` processes keep serving.
    fn stop(self) -> Result<()> {
        for (e, c) in self.engines.into_iter().zip(self.clusters) {
            let d = e.shutdown()?;
            if let Some(c) = c {
                c.stop(d)?;
            }
        }
        Ok(())
    }

    /// Serves `work` with its arrival times; one result per request, in order.
    fn serve(&self, work: &[Arrival]) -> (Vec<Result<Completion, String>>, Duration) {
        let start = Instant::now();
        let results = std::thread::scope(|s| {
            let threads: Vec<_> = work
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let engine = &self.engines[i % self.engines.len()];
                    s.spawn(move || {
                        let wait = a.at.saturating_sub(start.elapsed());
                        std::thread::sleep(wait);
                        engine
                            .submit(a.req.clone())
                            .map_err(|e| e.to_string())
                            .and_then(|h| h.wait().map_err(|e| e.to_string()))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("request thread panicked".into()))
                })
                .collect()
        });
        (results, start.elapsed())
    }
}

fn tpot(c: &Completion) -> Option<Duration> {
    let t = &c.timings.tokens;
    if t.len() < 2 {
        return None;
    }
    Some((t[t.len() - 1] - t[0]) / (t.len() as u32 - 1))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    ttft_p50: f64,
    ttft_p99: f64,
    tpot_p50: f64,
    tpot_p99: f64,
    tokens_per_s: f64,
    goodput: f64,
    failed: usize,
}

fn figures(
    results: &[Result<Completion, String>],
    wall: Duration,
    ttft_slo: f64,
    tpot_slo: f64,
) -> Figures {
    let ok: Vec<&Completion> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let mut ttft: Vec<f64> = ok
        .iter()
        .map(|c| c.timings.first_token.as_secs_f64() * 1e3)
        .collect();
    let mut tp: Vec<f64> = ok
        .iter()
        .filter_map(|c| tpot(c))
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let tokens: usize = ok.iter().map(|c| c.tokens.len()).sum();
    let good = ok
        .iter()
        .filter(|c| {
            c.timings.first_token.as_secs_f64() * 1e3 <= ttft_slo
                && tpot(c).map_or(true, |d| d.as_secs_f64() * 1e3 <= tpot_slo)
        })
        .count();
    let secs = wall.as_secs_f64().max(1e-9);
    Figures {
        ttft_p50: pct(&mut ttft, 0.5),
        ttft_p99: pct(&mut ttft, 0.99),
        tpot_p50: pct(&mut tp, 0.5),
        tpot_p99: pct(&mut tp, 0.99),
        tokens_per_s: tokens as f64 / secs,
        goodput: good as f64 / secs,
        failed: results.len() - ok.len(),
    }
}

/// Requests served alone, one after the other, for the unloaded TTFT and TPOT the SLOs are
/// chosen from (their medians).
const UNLOADED_RUNS: usize = 5;

/// Decode steps measured per decode-scaling round: the window in which all of its sequences
/// are decoding at once is meant to hold at least this many.
const DECODE_STEPS: usize = 48;

/// What one decode-scaling round measured ([`decode_rate`]).
#[derive(Debug, Clone, Copy)]
struct DecodeRate {
    /// Decode tokens per second over the window.
    tokens_per_s: f64,
    /// Steps in the window (tokens counted per sequence).
    window: usize,
    /// The last sequence's first-token time.
    first: Duration,
    /// Mean KV length the counted tokens' steps attended over.
    mean_kv: f64,
}

/// One decode-scaling round: the decode tokens/s of one engine with `n` sequences decoding at
/// once (prompts of `prompt` tokens), over the window in which all `n` are in the batch, from
/// the last one's first token to the first one's last: the prefills before it and the drain
/// after it run smaller batches and are not counted. `steps` tokens per sequence (see
/// [`ramp_steps`]). `None` when no step had all `n` in the batch.
fn decode_rate(
    mode: &Mode,
    n: usize,
    (prompt, steps): (usize, usize),
) -> Result<Option<DecodeRate>> {
    let engine = &mode.engines[0];
    let work: Vec<Request> = (0..n)
        .map(|i| Request::greedy(vec![(i as i64 * 13) % 97 + 1; prompt], steps))
        .collect();
    let done: Vec<(Instant, Completion)> = std::thread::scope(|s| {
        let t: Vec<_> = work
            .iter()
            .map(|r| {
                s.spawn(move || {
                    let at = Instant::now();
                    engine.submit(r.clone()).map(|h| (at, h.wait()))
                })
            })
            .collect();
        t.into_iter()
            .map(|t| match t.join() {
                Ok(Ok((at, Ok(c)))) => Ok((at, c)),
                _ => Err(anyhow::anyhow!("a decode-rate request failed")),
            })
            .collect::<Result<_>>()
    })?;
    let times: Vec<Vec<Instant>> = done
        .iter()
        .map(|(at, c)| c.timings.tokens.iter().map(|t| *at + *t).collect())
        .collect();
    let from = times.iter().filter_map(|t| t.first()).max().copied();
    let to = times.iter().filter_map(|t| t.last()).min().copied();
    let (Some(from), Some(to)) = (from, to) else {
        bail!("a decode-rate request produced no token");
    };
    // Token `j` of a sequence comes from the step that attended over `prompt + j` positions.
    let (counted, kv_sum) = times
        .iter()
        .flat_map(|t| t.iter().enumerate())
        .filter(|(_, &x)| x > from && x <= to)
        .fold((0usize, 0usize), |(c, s), (j, _)| (c + 1, s + prompt + j));
    let window = to.saturating_duration_since(from).as_secs_f64();
    if counted == 0 || window <= 0.0 {
        // The prefills took longer than the first sequences' decodes: the caller asks for more.
        return Ok(None);
    }
    let first = done
        .iter()
        .map(|(_, c)| c.timings.first_token)
        .max()
        .unwrap_or_default();
    Ok(Some(DecodeRate {
        tokens_per_s: counted as f64 / window,
        window: counted / n,
        first,
        mean_kv: kv_sum as f64 / counted as f64,
    }))
}

/// Tokens per sequence for a round of `n`: [`DECODE_STEPS`] plus the steps its serial prefills
/// take before the last sequence joins (from one sequence's first-token time and step time,
/// with half again as margin), within the model's context after the 8-token prompt.
fn ramp_steps(n: usize, first_token: Duration, step: Duration, context: usize) -> usize {
    let per = first_token.as_secs_f64() / step.as_secs_f64().max(1e-6);
    let ramp = (1.5 * n as f64 * per).ceil().min(1e6) as usize;
    (DECODE_STEPS + ramp)
        .min(context.saturating_sub(9))
        .max(DECODE_STEPS)
}

/// Decode scaling with concurrent sequences: `rounds` rounds of 8 sequences then 1, interleaved
/// so that a slow moment of the machine hits both; prints the median round's figures and
/// returns its ratio. The one sequence decodes at the same mean KV length as the eight did in
/// their window (its prompt longer by what the eight had decoded while the later ones joined):
/// a step's attention grows with the KV length, and the ratio compares batch sizes, not
/// lengths. A first one-sequence run gives the step time that sizes the eight's ramp.
fn decode_scaling(disagg: &Mode, rounds_n: usize, context: usize) -> Result<f64> {
    let mut rounds = Vec::with_capacity(rounds_n);
    let no_window = "one sequence gave no window";
    for _ in 0..rounds_n {
        let probe = decode_rate(disagg, 1, (8, DECODE_STEPS + 1))?.context(no_window)?;
        let step = Duration::from_secs_f64(1.0 / probe.tokens_per_s.max(1e-9));
        let mut steps = ramp_steps(8, probe.first, step, context);
        // Where the prefills took longer than estimated, again with three times the steps.
        let mut tries = 0;
        let eight = loop {
            match decode_rate(disagg, 8, (8, steps))? {
                Some(r) => break r,
                None if tries < 2 && steps < context.saturating_sub(9) => {
                    tries += 1;
                    steps = (steps * 3).min(context.saturating_sub(9));
                }
                None => bail!(
                    "decode rate with 8 sequences: no step had all 8 in the batch within {steps} steps each"
                ),
            }
        };
        if eight.window < DECODE_STEPS / 2 {
            println!(
                "  (a round with 8 sequences had only {} steps with all 8 in the batch)",
                eight.window
            );
        }
        // Its window's mean KV length is its prompt plus half its steps.
        let prompt = (eight.mean_kv - (DECODE_STEPS + 1) as f64 / 2.0).round() as usize;
        let prompt = prompt.min(context.saturating_sub(DECODE_STEPS + 2)).max(1);
        let one = decode_rate(disagg, 1, (prompt, DECODE_STEPS + 1))?.context(no_window)?;
        rounds.push((eight.tokens_per_s / one.tokens_per_s, one, eight));
    }
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (batch8, one, eight) = rounds[rounds.len() / 2];
    println!(
        "decode: {:.1} tokens/s with 1 sequence, {:.1} with 8, at mean KV lengths {:.0} and {:.0} ({batch8:.2}x; median of {} rounds, each over the steps all its sequences decode together, ratios {})",
        one.tokens_per_s,
        eight.tokens_per_s,
        one.mean_kv,
        eight.mean_kv,
        rounds_n,
        rounds
            .iter()
            .map(|r| format!("{:.2}", r.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(batch8)
}

/// A small SVG line chart of goodput (requests/s meeting both SLOs) against arrival rate:
/// disaggregated and co-located, axes from zero, ticks at each rate.
fn goodput_svg(curve: &[(f64, f64, f64)]) -> String {
    let (w, h, l, b) = (640.0, 400.0, 60.0, 50.0);
    let xmax = curve.iter().map(|c| c.0).fold(1e-9, f64::max);
    let ymax = curve.iter().map(|c| c.1.max(c.2)).fold(1e-9, f64::max) * 1.1;
    let x = |v: f64| l + v / xmax * (w - l - 20.0);
    let y = |v: f64| h - b - v / ymax * (h - b - 30.0);
    let line = |pick: fn(&(f64, f64, f64)) -> f64, color: &str| {
        let pts: Vec<String> = curve
            .iter()
            .map(|c| format!("{:.1},{:.1}", x(c.0), y(pick(c))))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        )
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">serve-bench: goodput (req/s meeting TTFT and TPOT SLOs)</text>\n\
         <line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{l}\" y1=\"30\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">arrival rate (req/s)</text>\n",
        w / 2.0,
        h - b,
        w - 20.0,
        h - b,
        h - b,
        (w + l) / 2.0,
        h - 12.0
    );
    for c in curve {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(c.0),
            h - b + 16.0,
            c.0
        ));
    }
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            l - 6.0,
            y(v) + 4.0
        ));
    }
    svg.push_str(&line(|c| c.1, "#1f77b4"));
    svg.push_str(&line(|c| c.2, "#d62728"));
    svg.push_str(&format!(
        "\n<text x=\"{}\" y=\"44\" fill=\"#1f77b4\">disaggregated</text>\n<text x=\"{}\" y=\"60\" fill=\"#d62728\">co-located</text>\n</svg>\n",
        l + 10.0,
        l + 10.0
    ));
    svg
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = genie_runtime::models::Model::named(&args.model)?;
    if args.rates.is_empty() || args.rates.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("--rates: positive requests per second expected");
    }
    let (_, long_hi) = range(&args.long)?;
    let (_, out_hi) = range(&args.output)?;
    if long_hi + out_hi > model.context() {
        bail!(
            "long prompts + outputs ({}) exceed the model's context ({})",
            long_hi + out_hi,
            model.context()
        );
    }
    let threads = args.threads.map_or_else(
        || {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .max(1)
        },
        usize::from,
    );
    println!(
        "serve-bench: model {} ({}), {} requests per rate, rates {:?} req/s, prompts short {} / long {} ({}% long), outputs {}, {threads} compute thread(s) per embedded worker, prefill order {:?}, at most {} running per engine, prefills of at most {} requests, decode steps sent ahead: {}",
        args.model,
        model.describe(),
        args.requests,
        args.rates,
        args.short,
        args.long,
        (args.long_share * 100.0).round(),
        args.output,
        args.order(),
        args.max_running,
        args.max_prefill_batch,
        if args.no_step_ahead { "no" } else { "yes" }
    );
    if args.decode_rounds == 0 && args.decode_only {
        bail!("--decode-only needs at least one --decode-rounds");
    }
    if let (Some(c), Some(co)) = (&args.cluster, &args.colocated) {
        let co: Vec<String> = co.iter().map(|p| p.display().to_string()).collect();
        println!(
            "workers: disaggregated {}, co-located {}",
            c.display(),
            co.join(" ")
        );
    }
    let disagg = Mode::disaggregated(&model, args.cluster.as_deref(), threads, args.tuning())?;
    if args.decode_only {
        // Warm up (graphs sent, weights materialised), then only the decode scaling.
        decode_rate(&disagg, 1, (8, 2))?.context("the warm-up request gave no token")?;
        let batch8 = decode_scaling(&disagg, args.decode_rounds, model.context())?;
        disagg.stop()?;
        println!(
            "serve-decode model={} batch8_decode_speedup={batch8:.2}",
            args.model
        );
        return Ok(());
    }
    let coloc = Mode::colocated(&model, args.colocated.as_deref(), threads, args.tuning())?;

    // Unloaded latencies: a long prompt alone, on the disaggregated engine.
    let probe = workload(&args, 1.0, model.vocab())?;
    let long = probe
        .iter()
        .max_by_key(|a| a.req.prompt.len())
        .context("empty workload")?
        .clone();
    // Warm both modes up first (graphs sent, weights materialised, caches filled).
    for mode in [&disagg, &coloc] {
        for _ in 0..mode.engines.len() {
            let (r, _) = mode.serve(&[Arrival {
                at: Duration::ZERO,
                ..long.clone()
            }]);
            r.into_iter()
                .next()
                .context("no result")?
                .map_err(anyhow::Error::msg)?;
        }
    }
    // The unloaded figures: medians of a few requests served alone, one at a time.
    let mut alone = Vec::new();
    for _ in 0..UNLOADED_RUNS {
        let (r, _) = disagg.serve(&[Arrival {
            at: Duration::ZERO,
            ..long.clone()
        }]);
        let c = r
            .into_iter()
            .next()
            .context("no result")?
            .map_err(anyhow::Error::msg)?;
        let ttft = c.timings.first_token.as_secs_f64() * 1e3;
        let tpot = tpot(&c).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        alone.push((ttft, tpot));
    }
    let ttft0 = pct(&mut alone.iter().map(|a| a.0).collect::<Vec<_>>(), 0.5);
    let tpot0 = pct(&mut alone.iter().map(|a| a.1).collect::<Vec<_>>(), 0.5);
    let (ttft_slo, tpot_slo) = (5.0 * ttft0, 3.0 * tpot0);
    println!(
        "unloaded (median of {UNLOADED_RUNS}): TTFT {ttft0:.1} ms (prompt {}), TPOT {tpot0:.2} ms; SLOs: TTFT <= {ttft_slo:.1} ms, TPOT <= {tpot_slo:.2} ms",
        long.req.prompt.len()
    );

    let batch8 = if args.decode_rounds == 0 {
        println!("decode: not measured (--decode-rounds 0)");
        f64::NAN
    } else {
        decode_scaling(&disagg, args.decode_rounds, model.context())?
    };

    println!(
        "{:>6} {:>14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "rate",
        "mode",
        "ttft_p50",
        "ttft_p99",
        "tpot_p50",
        "tpot_p99",
        "tok/s",
        "goodput",
        "failed"
    );
    let mut last_pair: Option<(Figures, Figures)> = None;
    let mut curve: Vec<(f64, f64, f64)> = Vec::new();
    let top_rate = args.rates.iter().copied().fold(0.0, f64::max);
    let mut total = 0;
    let mut failed = 0;
    let mut mismatched = 0;
    for &rate in &args.rates {
        let work = workload(&args, rate, model.vocab())?;
        let mut pair = Vec::new();
        for mode in [&disagg, &coloc] {
            let traced = rate == top_rate && mode.name == "disaggregated";
            if traced {
                mode.engines[0].record_spans(true);
            }
            let (results, wall) = mode.serve(&work);
            if traced {
                mode.engines[0].record_spans(false);
                let spans = mode.engines[0].take_spans();
                genie_runtime::trace::write_chrome_trace(&args.trace, &spans, &Default::default())?;
                println!(
                    "trace of the disaggregated run at {rate} req/s ({} spans): {}",
                    spans.len(),
                    args.trace.display()
                );
            }
            // Correctness under load: the first requests equal themselves served alone.
            for (a, r) in work.iter().zip(&results).take(3) {
                let (alone, _) = mode.serve(&[Arrival {
                    at: Duration::ZERO,
                    req: a.req.clone(),
                }]);
                match (r, alone.first()) {
                    (Ok(c), Some(Ok(x))) if c.tokens == x.tokens => {}
                    _ => mismatched += 1,
                }
            }
            let f = figures(&results, wall, ttft_slo, tpot_slo);
            total += results.len();
            failed += f.failed;
            println!(
                "{rate:>6.2} {:>14} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>9.1} {:>9.2} {:>6}",
                mode.name,
                f.ttft_p50,
                f.ttft_p99,
                f.tpot_p50,
                f.tpot_p99,
                f.tokens_per_s,
                f.goodput,
                f.failed
            );
            pair.push(f);
        }
        if pair[1].goodput > 0.0 {
            last_pair = Some((pair[0], pair[1]));
        }
        curve.push((rate, pair[0].goodput, pair[1].goodput));
    }
    std::fs::write(&args.plot, goodput_svg(&curve))
        .with_context(|| format!("writing {}", args.plot.display()))?;
    println!("plot of goodput against rate: {}", args.plot.display());
    disagg.stop()?;
    coloc.stop()?;
    if mismatched > 0 {
        bail!("{mismatched} sampled requests differ from their tokens served alone");
    }
    let (g, t) = match last_pair {
        Some((d, c)) => (d.goodput / c.goodput, d.tpot_p99 / c.tpot_p99),
        None => (f64::NAN, f64::NAN),
    };
    println!(
        "serve goodput_ratio_vs_colocated={g:.2} tpot_p99_ratio_vs_colocated={t:.2} batch8_decode_speedup={batch8:.2} requests={total} failed={failed}"
    );
    Ok(())
}
