//! How each `[cache] compress` encoding trades ratio for fill cost on exports shaped like
//! Convocore's (the mock's JSON and CSV with generated turns), level by level, for a 2 KiB,
//! 100 KiB and 5 MiB export: the measurement behind the levels in `src/compress.rs`.
//!
//! `cargo run --release --example compression_levels [-- --quick]` prints Markdown tables
//! (BENCHMARKS.md keeps them). `--quick` measures the chosen levels only.

use std::time::{Duration, Instant};

use convocore_gateway::compress::{Coding, BROTLI_QUALITY, GZIP_LEVEL, ZSTD_LEVEL};
use convocore_gateway::testing::samples;

/// An export of about `bytes`, in JSON or CSV.
fn export(bytes: usize, csv: bool) -> Vec<u8> {
    // Grow the turn count until the body is at least `bytes`, then cut at the first turn past.
    let mut turns = 1;
    loop {
        let body = if csv {
            samples::csv("agent-bench", "convo-bench", 1, turns)
        } else {
            samples::json("eu", "agent-bench", "convo-bench", 1, turns)
        };
        if body.len() >= bytes {
            return body.into_bytes();
        }
        let per_turn = body.len() / (turns + 2);
        turns += ((bytes - body.len()) / per_turn.max(1)).max(1);
    }
}

/// Mean time of `f` over as many runs as fit in ~300 ms (at least 2, after one warm-up).
fn time<T>(mut f: impl FnMut() -> T) -> Duration {
    std::hint::black_box(f());
    let budget = Duration::from_millis(300);
    let started = Instant::now();
    let mut runs = 0u32;
    while runs < 2 || (started.elapsed() < budget && runs < 10_000) {
        std::hint::black_box(f());
        runs += 1;
    }
    started.elapsed() / runs
}

fn levels(coding: Coding, size: usize, quick: bool) -> Vec<u32> {
    if quick {
        return vec![match coding {
            Coding::Zstd => ZSTD_LEVEL as u32,
            Coding::Br => BROTLI_QUALITY,
            Coding::Gzip => GZIP_LEVEL,
        }];
    }
    let big = size > 1 << 20;
    match coding {
        Coding::Zstd if big => vec![1, 2, 3, 5, 7, 9],
        Coding::Zstd => vec![1, 2, 3, 5, 7, 9, 12, 19],
        Coding::Br if big => vec![1, 3, 4, 5, 6, 7],
        Coding::Br => vec![1, 3, 4, 5, 6, 7, 9, 11],
        Coding::Gzip => vec![1, 3, 5, 6, 9],
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!("| export | encoding | level | size | ratio | fill (encode once) | MB/s |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (label, bytes) in [
        ("2 KiB", 2 << 10),
        ("100 KiB", 100 << 10),
        ("5 MiB", 5 << 20),
    ] {
        for csv in [false, true] {
            let body = export(bytes, csv);
            let kind = if csv { "CSV" } else { "JSON" };
            for coding in Coding::ALL {
                for level in levels(coding, bytes, quick) {
                    let Ok(encoded) = coding.encode_at(&body, level) else {
                        eprintln!("{coding:?} {level} failed");
                        continue;
                    };
                    let took = time(|| coding.encode_at(&body, level));
                    let mbps = body.len() as f64 / took.as_secs_f64() / 1e6;
                    println!(
                        "| {label} {kind} | {} | {level} | {} | {:.3} | {:.3} ms | {:.0} |",
                        coding.name(),
                        encoded.len(),
                        encoded.len() as f64 / body.len() as f64,
                        took.as_secs_f64() * 1e3,
                        mbps
                    );
                }
            }
        }
    }
}
