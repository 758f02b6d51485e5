//! A hostile driver, accept starvation and worker faults against real `genie worker`
//! processes (the cases are in `hostile_cases/mod.rs`; `scripts/test-hostile.sh` runs the same
//! ones through `examples/hostile.rs` and prints the summary line).

mod hostile_cases;
use hostile_cases::{accept_starvation, heal, run_hostile, Fault, Outcome, REPLY_WITHIN};
use std::path::Path;

fn genie() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_genie"))
}

/// Every hostile request gets a typed `Failed` reply within 5 s and the worker keeps serving.
#[test]
fn hostile_driver_requests_are_refused_typed() {
    let (results, rss) = run_hostile(genie());
    for r in &results {
        eprintln!("{:<30} {:?} {:?}", r.name, r.took, r.outcome);
    }
    eprintln!("max rss {rss:.0} MiB");
    for r in &results {
        assert_eq!(r.outcome, Outcome::RefusedTyped, "{}", r.name);
        assert!(r.took <= REPLY_WITHIN, "{} took {:?}", r.name, r.took);
    }
}

/// 100 connections that never say hello and 50 idle or dripping sockets do not keep a real
/// driver out for more than 5 s.
#[test]
fn silent_connections_do_not_starve_the_acceptor() {
    let r = accept_starvation(genie());
    assert_eq!(r.outcome, Outcome::RefusedTyped, "took {:?}", r.took);
}

/// A SIGKILLed worker, restarted, rejoins at the next setup.
#[test]
fn a_killed_and_restarted_worker_rejoins() {
    heal(genie(), Fault::Kill).unwrap();
}

/// A worker stopped past the peer timeout, resumed, rejoins at the next setup.
#[test]
fn a_stopped_and_resumed_worker_rejoins() {
    heal(genie(), Fault::Stop).unwrap();
}
