//! Benchmark: memory of the keyed rate limiters at 1,000,000 distinct keys,
//! and after pruning. Run with
//! `cargo run --release --example limiter_memory`.
//!
//! Prints figures; asserts nothing about the machine's speed.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use seckill::limit::Limits;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    const KEYS: u32 = 1_000_000;
    // The production defaults: 5/s per user, 200/s per IP.
    let limits = Limits::new(0, 5, 200, vec![]);
    let base = rss_kib();
    let started = Instant::now();
    for k in 0..KEYS {
        let _ = limits.check_user(i64::from(k) + 1);
        let _ = limits.check_ip(IpAddr::V4(Ipv4Addr::from(k)));
    }
    let filled = rss_kib();
    let (users, ips) = limits.tracked_keys();
    println!(
        "limiters: {users} user keys + {ips} ip keys in {:.2} s; RSS +{:.1} MiB ({:.0} bytes per key)",
        started.elapsed().as_secs_f64(),
        (filled - base) as f64 / 1024.0,
        (filled - base) as f64 * 1024.0 / f64::from(2 * KEYS)
    );
    // Every key is replenished a second later; the prune timer runs every 10 s.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    limits.prune();
    let (users, ips) = limits.tracked_keys();
    println!(
        "after prune ({:.0} ms): {users} user keys + {ips} ip keys; RSS +{:.1} MiB over the start",
        started.elapsed().as_secs_f64() * 1000.0,
        rss_kib().saturating_sub(base) as f64 / 1024.0
    );
}
