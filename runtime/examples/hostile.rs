//! Hostile drivers, accept starvation and healing against real `genie worker` processes; what
//! `scripts/test-hostile.sh` runs. Run it with
//! `cargo run --release -p genie-runtime --example hostile -- target/release/genie`.
//!
//! Prints one line per case, then, last, the summary:
//! `hostile cases=<n> refused_typed=<n> crashed=<n> hung=<n> max_rss_mb=<x> heal_ok=<1|0>`,
//! and exits non-zero unless every case was refused with a typed error, none crashed or hung,
//! and healing worked. The cases are described in `runtime/tests/hostile_cases/mod.rs`.

#[path = "../tests/hostile_cases/mod.rs"]
mod hostile_cases;

use hostile_cases::{accept_starvation, heal, run_hostile, Fault, Outcome};
use std::path::PathBuf;

fn main() {
    let genie = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/genie"));
    let (mut results, rss) = run_hostile(&genie);
    results.push(accept_starvation(&genie));
    // More groups of cases (a transport flood, ...) go here: push their CaseResults.
    let (mut refused, mut crashed, mut hung) = (0, 0, 0);
    for r in &results {
        match &r.outcome {
            Outcome::RefusedTyped => refused += 1,
            Outcome::Crashed(_) => crashed += 1,
            Outcome::Hung => hung += 1,
            Outcome::NotRefused(_) => {}
        }
        println!(
            "case {:<30} {:>8.3} s  {:?}  {}",
            r.name,
            r.took.as_secs_f64(),
            r.outcome,
            r.detail
        );
    }
    let mut heal_ok = true;
    for fault in [Fault::Kill, Fault::Stop] {
        match heal(&genie, fault) {
            Ok(detail) => println!("heal {fault:?}: ok ({detail})"),
            Err(why) => {
                println!("heal {fault:?}: FAILED: {why}");
                heal_ok = false;
            }
        }
    }
    let n = results.len();
    println!(
        "hostile cases={n} refused_typed={refused} crashed={crashed} hung={hung} \
         max_rss_mb={rss:.0} heal_ok={}",
        u8::from(heal_ok)
    );
    if refused != n || crashed != 0 || hung != 0 || !heal_ok {
        std::process::exit(1);
    }
}
