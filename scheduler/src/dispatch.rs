//! Lock-free dispatch of a task DAG to worker threads.
//!
//! # Algorithm
//!
//! Dataflow execution with *atomic dependency counters* and *work-stealing deques*:
//!
//! 1. Every task `v` has a counter `pending[v]` initialised to its number of distinct
//!    predecessors. Tasks with no predecessor are dealt to the workers in contiguous blocks.
//! 2. Each worker thread owns a private stack (a plain `Vec`, invisible to others) and a public
//!    LIFO deque (Chase & Lev, *Dynamic circular work-stealing deque*, SPAA 2005, as implemented
//!    by `crossbeam-deque`'s `Worker`/`Stealer`). It runs its *continuation* first (see 3), then
//!    its private stack, then its public deque (LIFO keeps a consumer on the core whose caches
//!    hold its inputs), and only then steals a batch from another worker's public deque.
//! 3. When a task finishes, its worker decrements `pending[c]` of every successor `c`. The
//!    decrement that brings a counter to zero — exactly one, because `fetch_sub` is a single
//!    atomic read-modify-write — hands `c` to that worker. The first successor handed over
//!    becomes the worker's continuation and runs next without touching any queue; the others go
//!    on its private stack. A successor with a single predecessor needs no atomic at all: only
//!    this worker can make it ready (a bit per edge, computed once, marks those). No task is ever
//!    queued twice or lost, and no lock is taken.
//! 4. Sharing on demand (in the spirit of Acar, Charguéraud & Rainey, *Scheduling parallel
//!    programs by work stealing with private deques*, PPoPP 2013): a worker that finds nothing to
//!    steal raises a shared `hungry` count; a busy worker that sees it non-zero, holds more than
//!    one private task and has an empty public deque moves the older half of its private stack
//!    to its public deque, where the hungry worker steals it. So the common path — run, count
//!    down, continue — touches no shared queue and executes no fence.
//! 5. A global `remaining` counter tells idle workers when the whole DAG is done. Workers count
//!    finished tasks locally and subtract them from `remaining` in one step whenever they run
//!    out of local work (before looking elsewhere), so the shared counter is touched once per
//!    dry spell, not once per task. Idle workers back off (spin, then yield).
//!
//! # Memory orderings
//!
//! - `pending[c].fetch_sub(1, AcqRel)`: the *release* half publishes everything the finishing
//!   task wrote (its outputs) to whoever later observes the counter; the *acquire* half lets the
//!   worker that brings the counter to zero see the writes of **every** predecessor, because all
//!   earlier decrements are read-modify-writes in the same release sequence. So a task starts
//!   only after it can see all of its inputs. (Relaxed would let a consumer run before a
//!   producer's output is visible on its core.) A single-predecessor successor is made ready by
//!   the thread that ran its predecessor, so program order already orders the two.
//! - `remaining.fetch_sub(k, AcqRel)` and the idle check `remaining.load(Acquire)`: each
//!   subtraction releases the retiring worker's finished tasks, and the worker that sees zero
//!   has acquired all of them, so when [`Dispatcher::run`] returns every task's effects are
//!   visible to the caller (thread joins add that too). A worker retires its count before it
//!   searches for work, so the count reaches zero exactly when every task has finished.
//! - Counter initialisation uses plain construction: it happens before the worker threads are
//!   spawned, and spawning synchronises.
//! - Hand-off of a task index through a public deque is ordered by `crossbeam-deque` itself
//!   (a push happens-before the pop or steal that returns the item). Private stacks and the
//!   continuation never leave their thread.
//! - `hungry` uses `Relaxed` loads and read-modify-writes: it is only a hint that decides
//!   *when* tasks are published, never *whether* a task runs or what it sees (publication goes
//!   through the deque). A stale value only delays sharing; the owner keeps running its private
//!   tasks, so the run always finishes.
//!
//! The counter logic is ours and is checked with `loom` (`RUSTFLAGS="--cfg loom" cargo test -p
//! genie-scheduler --release --lib dispatch`): every interleaving of concurrent completions gives
//! each task to exactly one thread, and that thread sees all of the task's inputs. (Weakening the
//! pending decrement to `Relaxed` makes the diamond test fail under loom.)
//!
//! [`DependencyCounters`] is public so that other executors can share the counting without the
//! deques: the runtime's worker runs its nodes in dataflow order with them, and the `sched-bench`
//! `dispatch_vs_mutex` baseline (in `genie-benches`) hands ready tasks out through one
//! `Mutex<VecDeque>`.

use crate::graph::Graph;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

#[cfg(not(loom))]
use crossbeam_deque::{Steal, Stealer, Worker};

/// A DAG of tasks `0..len` as successor lists and in-degrees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskGraph {
    offsets: Vec<u32>,
    succ: Vec<u32>,
    indegree: Vec<u32>,
    /// Bit `e` set: the successor at edge position `e` has that edge as its only input.
    solo: Vec<u64>,
}

impl TaskGraph {
    /// From an edge list `(from, to)` over `n` tasks; duplicate edges count once. Edges out of
    /// range are ignored.
    pub fn from_edges(n: usize, edges: &[(u32, u32)]) -> Self {
        let mut e: Vec<(u32, u32)> = edges
            .iter()
            .copied()
            .filter(|&(a, b)| (a as usize) < n && (b as usize) < n)
            .collect();
        e.sort_unstable();
        e.dedup();
        let mut offsets = vec![0u32; n + 1];
        let mut indegree = vec![0u32; n];
        for &(a, b) in &e {
            offsets[a as usize + 1] += 1;
            indegree[b as usize] += 1;
        }
        for i in 1..=n {
            offsets[i] += offsets[i - 1];
        }
        Self::finish(offsets, e.into_iter().map(|(_, b)| b).collect(), indegree)
    }

    /// The node DAG of a graph (task `i` = node `i`).
    pub fn from_graph(graph: &Graph) -> Self {
        let cons = graph.consumers();
        let n = graph.len();
        let mut offsets = Vec::with_capacity(n + 1);
        let mut succ = Vec::new();
        let mut indegree = vec![0u32; n];
        offsets.push(0);
        for i in 0..n as u32 {
            for c in cons.of(crate::graph::NodeId(i)) {
                succ.push(c.0);
                indegree[c.index()] += 1;
            }
            offsets.push(succ.len() as u32);
        }
        Self::finish(offsets, succ, indegree)
    }

    fn finish(offsets: Vec<u32>, succ: Vec<u32>, indegree: Vec<u32>) -> Self {
        let mut solo = vec![0u64; succ.len().div_ceil(64)];
        for (e, &c) in succ.iter().enumerate() {
            if indegree[c as usize] == 1 {
                solo[e / 64] |= 1 << (e % 64);
            }
        }
        Self {
            offsets,
            succ,
            indegree,
            solo,
        }
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.indegree.len()
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.indegree.is_empty()
    }

    /// Successors of `task`.
    pub fn successors(&self, task: u32) -> &[u32] {
        let i = task as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.succ[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Tasks with no predecessor.
    pub fn roots(&self) -> impl Iterator<Item = u32> + '_ {
        self.indegree
            .iter()
            .enumerate()
            .filter(|(_, &d)| d == 0)
            .map(|(i, _)| i as u32)
    }
}

/// The per-run atomic state: one pending-predecessor counter per task and the count of tasks
/// not yet retired. See the [module docs](self) for the orderings.
#[derive(Debug)]
pub struct DependencyCounters {
    pending: Vec<AtomicU32>,
    remaining: AtomicUsize,
}

impl DependencyCounters {
    /// Fresh counters for one run of `graph`.
    pub fn new(graph: &TaskGraph) -> Self {
        Self {
            pending: graph.indegree.iter().map(|&d| AtomicU32::new(d)).collect(),
            remaining: AtomicUsize::new(graph.len()),
        }
    }

    /// Records that `task` finished: calls `ready(c)` for every successor whose last pending
    /// predecessor this was.
    #[inline]
    pub fn complete(&self, graph: &TaskGraph, task: u32, mut ready: impl FnMut(u32)) {
        let i = task as usize;
        let (Some(&a), Some(&b)) = (graph.offsets.get(i), graph.offsets.get(i + 1)) else {
            return;
        };
        for e in a as usize..b as usize {
            let c = graph.succ[e];
            if graph.solo[e / 64] & (1 << (e % 64)) != 0 {
                // Only this thread can make `c` ready; program order covers visibility.
                ready(c);
                continue;
            }
            if let Some(p) = self.pending.get(c as usize) {
                // AcqRel: publish this task's outputs; the zeroing thread acquires all of them.
                if p.fetch_sub(1, Ordering::AcqRel) == 1 {
                    ready(c);
                }
            }
        }
    }

    /// Retires `finished` tasks (counted locally by a worker); returns `true` if that finished
    /// the run.
    #[inline]
    pub fn retire(&self, finished: usize) -> bool {
        if finished == 0 {
            return self.done();
        }
        // AcqRel: release this worker's tasks; the thread reaching zero has acquired them all.
        self.remaining.fetch_sub(finished, Ordering::AcqRel) == finished
    }

    /// Whether every task has been retired.
    #[inline]
    pub fn done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Tasks executed.
    pub executed: u64,
    /// Tasks a worker took from another worker's deque.
    pub stolen: u64,
}

/// Runs task DAGs on a fixed number of threads with work-stealing deques.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(loom, allow(dead_code))]
pub struct Dispatcher {
    threads: usize,
}

impl Dispatcher {
    /// A dispatcher using `threads` worker threads (at least 1).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }

    /// Runs every task of `graph` once, each after all of its predecessors, calling
    /// `task(index, worker)` on some worker thread. Returns when all tasks are done.
    #[cfg(not(loom))]
    pub fn run<F>(&self, graph: &TaskGraph, task: F) -> DispatchStats
    where
        F: Fn(u32, usize) + Sync,
    {
        if graph.is_empty() {
            return DispatchStats::default();
        }
        let counters = DependencyCounters::new(graph);
        // Roots are dealt in contiguous blocks: neighbouring ids tend to feed the same
        // consumers, so their counters stay in one worker's cache. Each stack is reversed so
        // that the lowest ids run first.
        let roots: Vec<u32> = graph.roots().collect();
        let per = roots.len().div_ceil(self.threads).max(1);
        let seeds: Vec<Vec<u32>> = (0..self.threads)
            .map(|i| {
                let lo = (i * per).min(roots.len());
                let hi = ((i + 1) * per).min(roots.len());
                roots[lo..hi].iter().rev().copied().collect()
            })
            .collect();
        let workers: Vec<Worker<u32>> = (0..self.threads).map(|_| Worker::new_lifo()).collect();
        let stealers: Vec<Stealer<u32>> = workers.iter().map(Worker::stealer).collect();
        let hungry = AtomicUsize::new(0);
        let (stealers, counters, task, hungry) = (&stealers, &counters, &task, &hungry);
        std::thread::scope(|s| {
            let handles: Vec<_> = workers
                .into_iter()
                .zip(seeds)
                .enumerate()
                .map(|(me, (public, mut private))| {
                    s.spawn(move || {
                        let mut st = DispatchStats::default();
                        let backoff = crossbeam_utils::Backoff::new();
                        let mut unretired = 0usize;
                        let mut next: Option<u32> = None;
                        let mut am_hungry = false;
                        loop {
                            let found = next
                                .take()
                                .or_else(|| private.pop())
                                .or_else(|| public.pop());
                            let t = match found {
                                Some(t) => t,
                                None => {
                                    // Out of local work: retire before looking elsewhere.
                                    if counters.retire(std::mem::take(&mut unretired)) {
                                        break;
                                    }
                                    match steal(&public, stealers, me) {
                                        Some(t) => {
                                            st.stolen += 1;
                                            if am_hungry {
                                                hungry.fetch_sub(1, Ordering::Relaxed);
                                                am_hungry = false;
                                            }
                                            backoff.reset();
                                            t
                                        }
                                        None if counters.done() => break,
                                        None => {
                                            if !am_hungry {
                                                hungry.fetch_add(1, Ordering::Relaxed);
                                                am_hungry = true;
                                            }
                                            backoff.snooze();
                                            continue;
                                        }
                                    }
                                }
                            };
                            // Relaxed: a hint only; no data is published through it.
                            if private.len() > 1
                                && hungry.load(Ordering::Relaxed) > 0
                                && public.is_empty()
                            {
                                // Publish the older half (the bottom of the stack) for thieves.
                                let half = private.len() / 2;
                                for x in private.drain(..half) {
                                    public.push(x);
                                }
                            }
                            task(t, me);
                            st.executed += 1;
                            unretired += 1;
                            counters.complete(graph, t, |c| {
                                if next.is_none() {
                                    next = Some(c);
                                } else {
                                    private.push(c);
                                }
                            });
                        }
                        st
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .fold(DispatchStats::default(), |a, b| DispatchStats {
                    executed: a.executed + b.executed,
                    stolen: a.stolen + b.stolen,
                })
        })
    }
}

/// Steals a batch from another worker's public deque into `local` and returns one task;
/// retries while a steal reports a lost race.
#[cfg(not(loom))]
fn steal(local: &Worker<u32>, stealers: &[Stealer<u32>], me: usize) -> Option<u32> {
    loop {
        let mut retry = false;
        for (i, s) in stealers.iter().enumerate() {
            if i == me {
                continue;
            }
            match s.steal_batch_and_pop(local) {
                Steal::Success(t) => return Some(t),
                Steal::Retry => retry = true,
                Steal::Empty => {}
            }
        }
        if !retry {
            return None;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::builders::{gpt2_prefill, Gpt2Config};
    use std::sync::atomic::AtomicU64;

    /// Each task records the order stamp at which it ran; every edge must go forward.
    fn check_run(g: &TaskGraph, threads: usize) {
        let clock = AtomicU64::new(1);
        let stamp: Vec<AtomicU64> = (0..g.len()).map(|_| AtomicU64::new(0)).collect();
        let runs: Vec<AtomicU64> = (0..g.len()).map(|_| AtomicU64::new(0)).collect();
        let f = |t: u32, _w: usize| {
            // Every predecessor has finished (and its stamp is visible).
            for p in 0..g.len() as u32 {
                if g.successors(p).contains(&t) {
                    assert_ne!(
                        stamp[p as usize].load(std::sync::atomic::Ordering::Relaxed),
                        0
                    );
                }
            }
            stamp[t as usize].store(
                clock.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
            runs[t as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let st = Dispatcher::new(threads).run(g, f);
        assert_eq!(st.executed, g.len() as u64);
        assert!(runs
            .iter()
            .all(|r| r.load(std::sync::atomic::Ordering::Relaxed) == 1));
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
        // A wide fan-out / fan-in.
        let mut edges = Vec::new();
        for i in 1..200u32 {
            edges.push((0, i));
            edges.push((i, 200));
        }
        let wide = TaskGraph::from_edges(201, &edges);
        check_run(&wide, 3);
        assert_eq!(
            Dispatcher::new(2)
                .run(&TaskGraph::default(), |_, _| {})
                .executed,
            0
        );
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize as Data;
    use loom::sync::Arc;

    /// Two producers finish concurrently; the consumer is handed to exactly one of them, and that
    /// thread sees both producers' outputs.
    #[test]
    fn diamond_hand_off_is_exactly_once_and_sees_all_inputs() {
        loom::model(|| {
            // 0 → 2, 1 → 2
            let g = Arc::new(TaskGraph::from_edges(3, &[(0, 2), (1, 2)]));
            let c = Arc::new(DependencyCounters::new(&g));
            let out = Arc::new([Data::new(0), Data::new(0)]);
            let handles: Vec<_> = (0..2u32)
                .map(|t| {
                    let (g, c, out) = (g.clone(), c.clone(), out.clone());
                    loom::thread::spawn(move || {
                        // The task's output, written without synchronisation of its own.
                        out[t as usize].store(10 + t as usize, Ordering::Relaxed);
                        let mut got = None;
                        c.complete(&g, t, |r| got = Some(r));
                        c.retire(1);
                        if got == Some(2) {
                            // Running task 2 here: both inputs must be visible.
                            assert_eq!(out[0].load(Ordering::Relaxed), 10);
                            assert_eq!(out[1].load(Ordering::Relaxed), 11);
                        }
                        got.is_some()
                    })
                })
                .collect();
            let handed: usize = handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap_or(false)))
                .sum();
            assert_eq!(handed, 1);
            assert!(!c.done());
            c.complete(&g, 2, |_| panic!("task 2 has no successors"));
            assert!(c.retire(1));
            assert!(c.done());
        });
    }

    /// Two independent tasks finishing on two threads: exactly one sees itself last, and then `done()`
    /// holds and every task's write is visible to it.
    #[test]
    fn last_completion_is_observed_once() {
        loom::model(|| {
            let g = Arc::new(TaskGraph::from_edges(2, &[]));
            let c = Arc::new(DependencyCounters::new(&g));
            let out = Arc::new([Data::new(0), Data::new(0)]);
            let handles: Vec<_> = (0..2u32)
                .map(|t| {
                    let (g, c, out) = (g.clone(), c.clone(), out.clone());
                    loom::thread::spawn(move || {
                        out[t as usize].store(1, Ordering::Relaxed);
                        c.complete(&g, t, |_| {});
                        let last = c.retire(1);
                        if last {
                            assert!(c.done());
                            assert_eq!(out[0].load(Ordering::Relaxed), 1);
                            assert_eq!(out[1].load(Ordering::Relaxed), 1);
                        }
                        last
                    })
                })
                .collect();
            let lasts: usize = handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap_or(false)))
                .sum();
            assert_eq!(lasts, 1);
        });
    }

    /// Batched retirement: one worker retires two tasks at once, another one; exactly one of
    /// the two retirements finishes the run, and it sees all three tasks' writes.
    #[test]
    fn batched_retire_finishes_exactly_once() {
        loom::model(|| {
            let g = Arc::new(TaskGraph::from_edges(3, &[]));
            let c = Arc::new(DependencyCounters::new(&g));
            let out = Arc::new([Data::new(0), Data::new(0), Data::new(0)]);
            let batches: [&'static [u32]; 2] = [&[0, 1], &[2]];
            let handles: Vec<_> = batches
                .into_iter()
                .map(|tasks| {
                    let (g, c, out) = (g.clone(), c.clone(), out.clone());
                    loom::thread::spawn(move || {
                        for &t in tasks {
                            out[t as usize].store(1, Ordering::Relaxed);
                            c.complete(&g, t, |_| {});
                        }
                        let last = c.retire(tasks.len());
                        if last {
                            assert!(out.iter().all(|x| x.load(Ordering::Relaxed) == 1));
                        }
                        last
                    })
                })
                .collect();
            let lasts: usize = handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap_or(false)))
                .sum();
            assert_eq!(lasts, 1);
            assert!(c.done());
        });
    }
}
