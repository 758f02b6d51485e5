//! The baseline of the `sched-bench` `dispatch_vs_mutex` figure: a task DAG run with the
//! dispatcher's own [`DependencyCounters`], but with every ready task going through one shared
//! `Mutex<VecDeque>` instead of [`Dispatcher::run`](genie_scheduler::dispatch::Dispatcher::run)'s
//! continuations, private stacks and work-stealing deques. The two differ only in how ready tasks
//! are handed out, which is what the figure measures.

use genie_scheduler::dispatch::{DependencyCounters, DispatchStats, TaskGraph};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Runs every task of `graph` once, each after all of its predecessors, calling
/// `task(index, worker)` on one of `threads` worker threads (at least 1) that share one
/// `Mutex<VecDeque>` ready queue. Returns when all tasks are done; `stolen` is always 0.
pub fn run_with_mutex_queue<F>(graph: &TaskGraph, threads: usize, task: F) -> DispatchStats
where
    F: Fn(u32, usize) + Sync,
{
    if graph.is_empty() {
        return DispatchStats::default();
    }
    let counters = DependencyCounters::new(graph);
    let queue: Mutex<VecDeque<u32>> = Mutex::new(graph.roots().collect());
    let (queue, counters, task) = (&queue, &counters, &task);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|me| {
                s.spawn(move || {
                    let mut executed = 0u64;
                    let mut unretired = 0usize;
                    let backoff = crossbeam_utils::Backoff::new();
                    loop {
                        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                        match next {
                            Some(t) => {
                                backoff.reset();
                                task(t, me);
                                executed += 1;
                                unretired += 1;
                                counters.complete(graph, t, |c| {
                                    if let Ok(mut q) = queue.lock() {
                                        q.push_back(c);
                                    }
                                });
                            }
                            None => {
                                if counters.retire(std::mem::take(&mut unretired)) {
                                    break;
                                }
                                if counters.done() {
                                    break;
                                }
                                backoff.snooze();
                            }
                        }
                    }
                    executed
                })
            })
            .collect();
        DispatchStats {
            executed: handles.into_iter().map(|h| h.join().unwrap_or(0)).sum(),
            stolen: 0,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use genie_scheduler::builders::{gpt2_prefill, Gpt2Config};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Each task records the order stamp at which it ran; every edge must go forward.
    fn check_run(g: &TaskGraph, threads: usize) {
        let clock = AtomicU64::new(1);
        let stamp: Vec<AtomicU64> = (0..g.len()).map(|_| AtomicU64::new(0)).collect();
        let runs: Vec<AtomicU64> = (0..g.len()).map(|_| AtomicU64::new(0)).collect();
        let st = run_with_mutex_queue(g, threads, |t: u32, _w: usize| {
            // Every predecessor has finished (and its stamp is visible).
            for p in 0..g.len() as u32 {
                if g.successors(p).contains(&t) {
                    assert_ne!(stamp[p as usize].load(Ordering::Relaxed), 0);
                }
            }
            stamp[t as usize].store(clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            runs[t as usize].fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(st.executed, g.len() as u64);
        assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn runs_every_task_once_after_its_predecessors() {
        let g = gpt2_prefill(
            &Gpt2Config {
                layers: 2,
                ..Gpt2Config::default()
            },
            4,
        )
        .unwrap();
        let tg = TaskGraph::from_graph(&g);
        for threads in [1, 2, 4] {
            check_run(&tg, threads);
        }
        assert_eq!(
            run_with_mutex_queue(&TaskGraph::default(), 2, |_, _| {}).executed,
            0
        );
    }
}
