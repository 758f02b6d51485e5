//! The serving engine from Python: `genie.Engine` and the token streams of its requests.
//!
//! ```python
//! import genie
//! with genie.Engine.embedded(workers=2, model="gpt2-small") as engine:
//!     stream = engine.submit([1, 2, 3], max_tokens=8)
//!     tokens = list(stream)              # blocks (GIL released) until each token arrives
//!     print(stream.finish_reason, stream.timings["first_token_s"])
//! ```
//!
//! Prefill runs on one worker, the KV cache is built on the decode worker and pinned there (see
//! the Rust crate's `engine` module). Waits release the GIL and wake every 100 ms for signals.

use crate::errors;
use genie_runtime::cluster::Cluster;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::engine::{
    Engine as RsEngine, EngineConfig, EngineError, FinishReason, Request, RequestHandle, Sampling,
    Step, Timings,
};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::proto::WeightSpec;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a wait without a limit wakes to let Python handle signals.
const SLICE: Duration = Duration::from_millis(100);

fn runtime_err(e: genie_runtime::RuntimeError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// An engine and the embedded cluster it runs on (if it made one).
struct Running {
    engine: RsEngine,
    cluster: Option<EmbeddedCluster>,
}

/// A serving engine: submit requests from any thread, read their tokens as they come.
#[pyclass(module = "genie", name = "Engine")]
pub struct Engine {
    inner: Mutex<Option<Arc<Running>>>,
}

impl Engine {
    fn running(&self) -> PyResult<Arc<Running>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("engine lock poisoned"))?
            .clone()
            .ok_or_else(|| errors::engine(EngineError::ShutDown))
    }

    fn start(
        py: Python<'_>,
        driver: Driver,
        cluster: Option<EmbeddedCluster>,
        cfg: EngineConfig,
    ) -> PyResult<Self> {
        let engine = py
            .detach(|| RsEngine::start(driver, cfg))
            .map_err(runtime_err)?;
        Ok(Self {
            inner: Mutex::new(Some(Arc::new(Running { engine, cluster }))),
        })
    }
}

fn config(model: &str, kv_pool_mb: u64, prefill: usize, decode: usize) -> PyResult<EngineConfig> {
    let model = genie_runtime::models::Model::named(model)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let mut cfg = EngineConfig::disaggregated(model);
    cfg.kv_pool_bytes = kv_pool_mb.saturating_mul(1 << 20);
    cfg.prefill_worker = prefill;
    cfg.decode_worker = decode;
    Ok(cfg)
}

#[pymethods]
impl Engine {
    /// An engine on an embedded cluster of `workers` worker threads (TCP on loopback): prefill
    /// on worker 0, decode on worker 1 (worker 0 when there is one). `model`: `gpt2-small` or
    /// `gpt2-124m`, with seeded random weights (`seed`), or a Hugging Face model folder
    /// (`config.json` and safetensors; GPT-2, Llama, Qwen2, Mistral) whose weights are loaded.
    #[staticmethod]
    #[pyo3(signature = (workers = 2, model = "gpt2-small", seed = 7, kv_pool_mb = 256))]
    fn embedded(
        py: Python<'_>,
        workers: usize,
        model: &str,
        seed: u64,
        kv_pool_mb: u64,
    ) -> PyResult<Self> {
        if workers == 0 {
            return Err(PyValueError::new_err(
                "an embedded cluster needs at least one worker",
            ));
        }
        let cfg = config(model, kv_pool_mb, 0, usize::from(workers > 1))?;
        let (cluster, driver) = py
            .detach(|| -> genie_runtime::Result<_> {
                let dir = std::path::Path::new(model);
                let (opts, weights) = if dir.is_dir() {
                    let opts = WorkerOptions {
                        model_dir: Some(dir.to_path_buf()),
                        ..WorkerOptions::default()
                    };
                    (opts, WeightSpec::Checkpoint(".".into()))
                } else {
                    (WorkerOptions::default(), WeightSpec::Seeded(seed))
                };
                let kernels = Arc::new(CpuKernels::new());
                let cluster = EmbeddedCluster::start_with(workers, kernels, opts)?;
                let driver = Driver::connect(&cluster.cluster, weights)?;
                Ok((cluster, driver))
            })
            .map_err(runtime_err)?;
        Self::start(py, driver, Some(cluster), cfg)
    }

    /// An engine on the `genie worker` processes of a cluster file (its secret as the file
    /// says): prefill on worker `prefill_worker`, decode on `decode_worker` (indices in the file).
    #[staticmethod]
    #[pyo3(signature = (cluster_file, model = "gpt2-small", seed = 7, kv_pool_mb = 256, prefill_worker = 0, decode_worker = 1))]
    fn connect(
        py: Python<'_>,
        cluster_file: PathBuf,
        model: &str,
        seed: u64,
        kv_pool_mb: u64,
        prefill_worker: usize,
        decode_worker: usize,
    ) -> PyResult<Self> {
        let cfg = config(model, kv_pool_mb, prefill_worker, decode_worker)?;
        let driver = py
            .detach(|| -> genie_runtime::Result<_> {
                let cluster = Cluster::load(&cluster_file)?;
                Driver::connect(&cluster, WeightSpec::Seeded(seed))
            })
            .map_err(runtime_err)?;
        Self::start(py, driver, None, cfg)
    }

    /// Submits a request and returns its token stream. Greedy unless `temperature` is given
    /// (then seeded sampling with `top_k` (0: all), `top_p` and `seed`). Raises `ValueError` for
    /// a malformed request and `KvPoolFullError` when its KV cache does not fit now.
    #[pyo3(signature = (prompt_ids, max_tokens, stop = None, temperature = None, top_k = 0, top_p = 1.0, seed = 0))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        prompt_ids: Vec<i64>,
        max_tokens: usize,
        stop: Option<Vec<i64>>,
        temperature: Option<f32>,
        top_k: usize,
        top_p: f32,
        seed: u64,
    ) -> PyResult<RequestStream> {
        let run = self.running()?;
        let sampling = match temperature {
            None => Sampling::Greedy,
            Some(temperature) => Sampling::Seeded {
                seed,
                temperature,
                top_k,
                top_p,
            },
        };
        let req = Request {
            prompt: prompt_ids,
            max_new_tokens: max_tokens,
            stop: stop.unwrap_or_default(),
            sampling,
        };
        let h = py
            .detach(|| run.engine.submit(req))
            .map_err(errors::engine)?;
        Ok(RequestStream {
            id: h.id(),
            state: Mutex::new(StreamState {
                handle: Some(h),
                reason: None,
                timings: None,
            }),
        })
    }

    /// Cancels request `request_id` (no effect once it ended).
    fn cancel(&self, request_id: u64) -> PyResult<()> {
        self.running()?.engine.cancel(request_id);
        Ok(())
    }

    /// Bytes of the KV pool free now.
    fn kv_free(&self) -> PyResult<u64> {
        Ok(self.running()?.engine.kv_free())
    }

    /// Stops the engine (requests still running end with an error) and its embedded cluster.
    /// Idempotent.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("engine lock poisoned"))?
            .take();
        let Some(run) = taken else {
            return Ok(());
        };
        // Streams do not hold the engine, so this is the last reference unless a `submit` is
        // running on another thread right now; wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut run = run;
        let running = loop {
            match Arc::try_unwrap(run) {
                Ok(r) => break r,
                Err(back) if Instant::now() < deadline => {
                    run = back;
                    py.detach(|| std::thread::sleep(Duration::from_millis(1)));
                }
                Err(_) => return Err(PyRuntimeError::new_err("engine still in use by a submit")),
            }
        };
        py.detach(move || -> genie_runtime::Result<()> {
            let driver = running.engine.shutdown()?;
            match running.cluster {
                Some(c) => c.stop(driver),
                None => driver.shutdown(),
            }
        })
        .map_err(runtime_err)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.shutdown(py)?;
        Ok(false)
    }
}

struct StreamState {
    /// `None` once the request ended (or was cancelled from here).
    handle: Option<RequestHandle>,
    reason: Option<FinishReason>,
    timings: Option<Timings>,
}

/// The tokens of one request, as an iterator (`for token in stream`) or one at a time
/// (`next_token(timeout)`).
#[pyclass(module = "genie", name = "RequestStream")]
pub struct RequestStream {
    id: u64,
    state: Mutex<StreamState>,
}

impl RequestStream {
    /// The next token; `None` at the end. `timeout` in seconds (`None`: no limit).
    fn step(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<i64>> {
        let total = match timeout {
            None => None,
            Some(t) => Some(Duration::try_from_secs_f64(t).map_err(|_| {
                PyValueError::new_err(format!("timeout must be a non-negative number, not {t}"))
            })?),
        };
        let start = Instant::now();
        loop {
            let slice = total.map_or(SLICE, |t| t.saturating_sub(start.elapsed()).min(SLICE));
            let got = py.detach(|| -> Option<Result<Step, EngineError>> {
                let mut st = self.state.lock().ok()?;
                let h = st.handle.as_mut()?;
                let r = h.next(slice);
                match &r {
                    Ok(Step::Done(reason, timings)) => {
                        st.reason = Some(*reason);
                        st.timings = Some(timings.clone());
                        st.handle = None;
                    }
                    Err(EngineError::Timeout(_)) => {}
                    Err(_) => st.handle = None,
                    Ok(Step::Token(_)) => {}
                }
                Some(r)
            });
            match got {
                None | Some(Ok(Step::Done(..))) => return Ok(None),
                Some(Ok(Step::Token(t))) => return Ok(Some(t)),
                Some(Err(EngineError::Timeout(_))) => {
                    if let Some(t) = total {
                        if start.elapsed() >= t {
                            return Err(errors::engine(EngineError::Timeout(t)));
                        }
                    }
                    py.check_signals()?;
                }
                Some(Err(e)) => return Err(errors::engine(e)),
            }
        }
    }
}

#[pymethods]
impl RequestStream {
    /// The request's id (for `Engine.cancel`).
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<i64>> {
        self.step(py, None)
    }

    /// The next token, or `None` when the request ended; raises `TimeoutError` after `timeout`
    /// seconds without one (the request goes on).
    #[pyo3(signature = (timeout = None))]
    fn next_token(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<i64>> {
        self.step(py, timeout)
    }

    /// Ends the request early; its KV cache goes back to the pool.
    fn cancel(&self) -> PyResult<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| PyRuntimeError::new_err("stream lock poisoned"))?;
        if st.handle.take().is_some() {
            st.reason = Some(FinishReason::Cancelled);
        }
        Ok(())
    }

    /// `"length"`, `"stop"` or `"cancelled"` once the request ended, else `None`.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        let st = self.state.lock().ok()?;
        st.reason.map(|r| match r {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        })
    }

    /// Where the request's time went, in seconds (once it ended): `queue_s`, `prefill_s`,
    /// `kv_transfer_s`, `kv_bytes`, `first_token_s`, `token_s` (submission to each token),
    /// `prefill_worker` (the index of the worker that prefilled it) and `prefill_batch` (the
    /// requests prefilled in one pass with it, itself included).
    #[getter]
    fn timings<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let st = self
            .state
            .lock()
            .map_err(|_| PyRuntimeError::new_err("stream lock poisoned"))?;
        let Some(t) = &st.timings else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("queue_s", t.queue.as_secs_f64())?;
        d.set_item("prefill_s", t.prefill.as_secs_f64())?;
        d.set_item("kv_transfer_s", t.kv_transfer.as_secs_f64())?;
        d.set_item("kv_bytes", t.kv_bytes)?;
        d.set_item("prefill_worker", t.prefill_worker)?;
        d.set_item("prefill_batch", t.prefill_batch)?;
        d.set_item("first_token_s", t.first_token.as_secs_f64())?;
        let tokens: Vec<f64> = t.tokens.iter().map(Duration::as_secs_f64).collect();
        d.set_item("token_s", tokens)?;
        Ok(Some(d))
    }
}
