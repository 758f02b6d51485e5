//! Completion handles: `genie.Completion` (one operation) and `genie.BatchCompletion` (a batch).

use crate::errors::to_py;
use crate::region::Region;
use crate::wait_released;
use genie_transport::{Batch, Op};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// A staged region's range to copy out to the caller's buffer once a read into it succeeded.
pub(crate) struct CopyBack {
    pub(crate) region: Py<Region>,
    pub(crate) ranges: Vec<(usize, usize)>,
    /// Set by the first caller that copies (a handle may be polled from several threads).
    pub(crate) copied: AtomicBool,
}

impl CopyBack {
    pub(crate) fn new(region: Py<Region>, ranges: Vec<(usize, usize)>) -> Self {
        Self {
            region,
            ranges,
            copied: AtomicBool::new(false),
        }
    }

    /// Copies the ranges whose transfers succeeded (`ok(i)`), once.
    fn run(&self, py: Python<'_>, ok: impl Fn(usize) -> bool) -> PyResult<()> {
        // Relaxed: the flag only elects one copier; the copy itself runs under the GIL.
        if self.copied.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let r = self.region.get();
        for (i, &(off, len)) in self.ranges.iter().enumerate() {
            if ok(i) {
                r.stage_out(py, off, len)?;
            }
        }
        Ok(())
    }
}

/// One in-flight operation (a write, read or send).
///
/// `done()` never blocks; `wait(timeout=None)` blocks (spinning in busy-poll mode) with the GIL
/// released. Both raise the operation's error as a `genie.GenieError` subclass. A wait that times
/// out raises `genie.TimeoutError` and does not cancel the operation.
#[pyclass(module = "genie", name = "Completion", frozen)]
pub struct Completion {
    op: Op,
    copy_back: Option<CopyBack>,
}

impl Completion {
    pub(crate) fn new(op: Op, copy_back: Option<CopyBack>) -> Self {
        Self { op, copy_back }
    }

    fn finished(&self, py: Python<'_>, r: genie_transport::Result<()>) -> PyResult<()> {
        r.map_err(|e| to_py(py, e))?;
        match &self.copy_back {
            Some(c) => c.run(py, |_| true),
            None => Ok(()),
        }
    }
}

#[pymethods]
impl Completion {
    /// Whether the operation completed; raises its error if it failed. Never blocks.
    fn done(&self, py: Python<'_>) -> PyResult<bool> {
        match self.op.poll() {
            None => Ok(false),
            Some(r) => self.finished(py, r).map(|()| true),
        }
    }

    /// Waits until the operation completes (at most `timeout` seconds; `None`: no limit, but
    /// Ctrl-C still interrupts), with the GIL released.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        if let Some(r) = self.op.poll() {
            return self.finished(py, r);
        }
        let op = &self.op;
        wait_released(py, timeout, |d| op.wait(d))?;
        self.finished(py, Ok(()))
    }

    fn __repr__(&self) -> String {
        format!("Completion(done={})", self.op.is_done())
    }
}

/// Many transfers submitted in one call, with one handle.
///
/// `status()` gives `(pending, ok, failed)`; `wait()` and `done()` raise the first failed
/// transfer's error (its position in the batch is the exception's `index` attribute);
/// `errors()` lists every failure as `(index, exception)`.
#[pyclass(module = "genie", name = "BatchCompletion", frozen)]
pub struct BatchCompletion {
    batch: Batch,
    copy_back: Option<CopyBack>,
}

impl BatchCompletion {
    pub(crate) fn new(batch: Batch, copy_back: Option<CopyBack>) -> Self {
        Self { batch, copy_back }
    }

    fn finished(&self, py: Python<'_>) -> PyResult<()> {
        let results = self.batch.results();
        if let Some(c) = &self.copy_back {
            c.run(py, |i| matches!(results.get(i), Some(Some(Ok(())))))?;
        }
        for (i, r) in results.into_iter().enumerate() {
            if let Some(Err(e)) = r {
                let err = to_py(py, e);
                err.value(py).setattr("index", i)?;
                return Err(err);
            }
        }
        Ok(())
    }
}

#[pymethods]
impl BatchCompletion {
    /// Number of transfers.
    fn __len__(&self) -> usize {
        self.batch.len()
    }

    /// `(pending, ok, failed)` counts. Never blocks.
    fn status(&self) -> (usize, usize, usize) {
        let s = self.batch.status();
        (s.pending, s.ok, s.failed)
    }

    /// Whether every transfer completed; raises the first failure's error. Never blocks.
    fn done(&self, py: Python<'_>) -> PyResult<bool> {
        if !self.batch.status().is_done() {
            return Ok(false);
        }
        self.finished(py).map(|()| true)
    }

    /// Waits until every transfer completed (at most `timeout` seconds), with the GIL released;
    /// raises the first failure's error.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        if !self.batch.status().is_done() {
            let b = &self.batch;
            wait_released(py, timeout, |d| b.wait(d))?;
        }
        self.finished(py)
    }

    /// Every failed transfer as `(index, exception)`, in order (completed ones only).
    fn errors(&self, py: Python<'_>) -> Vec<(usize, Py<PyAny>)> {
        self.batch
            .results()
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Some(Err(e)) => Some((i, to_py(py, e).into_value(py).into_any())),
                _ => None,
            })
            .collect()
    }

    fn __repr__(&self) -> String {
        let s = self.batch.status();
        format!(
            "BatchCompletion(len={}, pending={}, ok={}, failed={})",
            self.batch.len(),
            s.pending,
            s.ok,
            s.failed
        )
    }
}
