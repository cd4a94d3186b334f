//! An open-loop load generator: purchases at a fixed arrival rate, each from
//! the next distinct buyer, with latency measured from the moment each
//! request was due, not from when it was sent.
//!
//! ```text
//! cargo run --release --example paced -- URL PATH TOKENS.csv RATE SECONDS [CONNECTIONS]
//! ```
//!
//! wrk is closed-loop: a slow answer delays the next request on its
//! connection, so the latency it reports hides the queue a real crowd would
//! build (coordinated omission). Here request `k` is due at `start + k / RATE`
//! whatever happened before; it goes out on connection `k mod CONNECTIONS`
//! as soon as that connection is free, and its latency runs from its due
//! time to its answer. TOKENS.csv holds `user_id,token` lines (`seckill
//! tokens`; a header line is skipped); request `k` carries line `k`'s JWT.
//!
//! RATE 0 runs closed loop instead: each connection sends its next request
//! as soon as the last is answered, for SECONDS; the `achieved` figure is then
//! the most this client gets out of the gateway, the rate the open-loop run's
//! "80 % of the maximum" is taken from (wrk needs less CPU per request than
//! this client, and on 2 shared cores the difference is the gateway's).
//!
//! Prints one line for loadtest/bench.sh:
//! `paced rate R sent N seconds S achieved A p50 P p90 P p99 P p999 P max P
//! statuses CODE:N,...` (latencies in milliseconds).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

struct Plan {
    authority: String,
    path: String,
    tokens: Vec<String>,
    rate: f64,
    seconds: f64,
    connections: usize,
}

fn usage() -> ! {
    eprintln!("usage: paced URL PATH TOKENS.csv RATE SECONDS [CONNECTIONS]");
    std::process::exit(2)
}

fn plan() -> Plan {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        usage();
    }
    let authority = args[0]
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let tokens: Vec<String> = std::fs::read_to_string(&args[2])
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", args[2]))
        .lines()
        .filter_map(|l| l.split_once(','))
        .filter(|(user, _)| user.parse::<i64>().is_ok())
        .map(|(_, token)| token.trim().to_string())
        .collect();
    let number = |i: usize| args[i].parse::<f64>().unwrap_or_else(|_| usage());
    Plan {
        authority,
        path: args[1].clone(),
        tokens,
        rate: number(3),
        seconds: number(4),
        connections: args
            .get(5)
            .map_or(64, |c| c.parse().unwrap_or_else(|_| usage())),
    }
}

/// What one connection saw: latency in microseconds per answered request,
/// and the count of each status.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
}

async fn connection(plan: &Plan, index: usize, start: Instant, total: usize) -> Seen {
    let mut seen = Seen::default();
    let stream = match tokio::net::TcpStream::connect(&plan.authority).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect {}: {e}", plan.authority);
            seen.errors += 1;
            return seen;
        }
    };
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("handshake: {e}");
            seen.errors += 1;
            return seen;
        }
    };
    tokio::spawn(conn);
    let mut k = index;
    let closed = plan.rate == 0.0;
    let stop = start + Duration::from_secs_f64(plan.seconds);
    while k < total {
        let due = if closed {
            let now = Instant::now();
            if now >= stop {
                break;
            }
            now.max(start)
        } else {
            start + Duration::from_secs_f64(k as f64 / plan.rate)
        };
        tokio::time::sleep_until(due.into()).await;
        let request = Request::post(plan.path.as_str())
            .header("host", plan.authority.as_str())
            .header("authorization", format!("Bearer {}", plan.tokens[k]))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("a valid request");
        let answered = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        };
        match answered.await {
            Ok(status) => {
                seen.latencies_us.push(due.elapsed().as_micros() as u64);
                *seen.statuses.entry(status).or_default() += 1;
            }
            Err(_) => {
                seen.errors += 1;
                return seen;
            }
        }
        k += plan.connections;
    }
    seen
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let plan = plan();
    let closed = plan.rate == 0.0;
    let wanted = if closed {
        plan.tokens.len()
    } else {
        (plan.rate * plan.seconds) as usize
    };
    let total = wanted.min(plan.tokens.len());
    if !closed && total < wanted {
        eprintln!(
            "warning: {} tokens for {} requests; sending {total}",
            plan.tokens.len(),
            (plan.rate * plan.seconds) as usize
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let plan = &plan;
    let (seen, elapsed) = runtime.block_on(async move {
        // A moment to open the connections before the first request is due.
        let start = Instant::now() + Duration::from_millis(200);
        let all = futures_util::future::join_all(
            (0..plan.connections).map(|i| connection(plan, i, start, total)),
        )
        .await;
        (all, start.elapsed())
    });
    let mut latencies: Vec<u64> = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut errors = 0;
    for s in seen {
        latencies.extend(s.latencies_us);
        for (code, n) in s.statuses {
            *statuses.entry(code).or_default() += n;
        }
        errors += s.errors;
    }
    latencies.sort_unstable();
    let sent = latencies.len();
    let statuses: Vec<String> = statuses.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    println!(
        "paced rate {} sent {sent} seconds {:.3} achieved {:.0} p50 {:.2} p90 {:.2} p99 {:.2} p999 {:.2} max {:.2} errors {errors} statuses {}",
        plan.rate,
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
        latencies.last().map_or(0.0, |&m| m as f64 / 1000.0),
        statuses.join(","),
    );
}
