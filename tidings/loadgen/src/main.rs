//! `tidings-loadgen`: SSE load for the gateway.
//!
//! - `hold`: opens and keeps N reconnecting streams (users `<prefix><index>`), printing a JSON
//!   progress line every second; one process stays under the 20,000 open-files limit, so large
//!   runs start several.
//! - `bench`: the gateway benchmark (one command, one JSON line per scenario): idle connections and
//!   RSS per connection, fan-out latency to 10,000 users and for a campaign, sustained latency at a
//!   fixed rate, many gateway + client processes holding 100,000 connections, HTTP-ingest-to-stream
//!   latency with its per-hop split (Apache Kafka and the embedded mock cluster), a 10,000-user
//!   broadcast, and the same loads on nginx + nchan for comparison.

mod bench;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidings_loadgen::{http_client, Client, Totals};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "tidings-loadgen", about = "SSE load generator and benchmark for the tidings gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold N streams open until SIGTERM or --secs.
    Hold(HoldArgs),
    /// Run the gateway benchmark and print JSON lines.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct HoldArgs {
    /// Gateway base URLs, comma-separated; user i starts at gateway i % len and follows redirects.
    #[arg(long, value_delimiter = ',')]
    gateways: Vec<String>,
    /// User id prefix.
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// First user index.
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// Number of users (one stream each).
    #[arg(long)]
    count: usize,
    /// HS256 secret the gateways accept.
    #[arg(long, default_value = tidings_gateway::auth::DEV_SECRET)]
    secret: String,
    /// Stop after this many seconds (0: until SIGTERM).
    #[arg(long, default_value_t = 0)]
    secs: u64,
    /// New connections started per second (a ramp keeps the accept queues from overflowing).
    #[arg(long, default_value_t = 4000)]
    ramp: usize,
}

pub fn user_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:06}")
}

/// Who the clients are and where they connect.
pub struct Fleet<'a> {
    pub gateways: &'a [String],
    /// User id prefix.
    pub prefix: &'a str,
    /// HS256 secret the gateways accept.
    pub secret: &'a str,
    /// New connections per second.
    pub ramp: usize,
}

/// Starts `count` clients (users `from..from+count`) at the fleet's ramp; `on_event` sees each
/// delivered notification's JSON (parsed, and checked for duplicates and order).
pub async fn start_clients(
    fleet: &Fleet<'_>,
    from: usize,
    count: usize,
    stop: &CancellationToken,
    totals: &Arc<Totals>,
    on_event: Arc<dyn Fn(&serde_json::Value) + Send + Sync>,
) -> Vec<tokio::task::JoinHandle<tidings_loadgen::Seen>> {
    ramp_clients(fleet, from, count, |i, c| {
        let (stop, totals, cb) = (stop.clone(), totals.clone(), on_event.clone());
        tokio::spawn(async move { c.run(i, stop, totals, move |v, _| cb(v)).await })
    })
    .await
}

/// Like [`start_clients`] for a benchmark: `on_data` gets each delivered event's `data` text
/// unparsed and nothing per event is kept, so the clients spend little of the cores they share
/// with what they measure.
pub async fn start_data_clients(
    fleet: &Fleet<'_>,
    from: usize,
    count: usize,
    stop: &CancellationToken,
    totals: &Arc<Totals>,
    on_data: Arc<dyn Fn(&str) + Send + Sync>,
) -> Vec<tokio::task::JoinHandle<tidings_loadgen::Seen>> {
    ramp_clients(fleet, from, count, |i, c| {
        let (stop, totals, cb) = (stop.clone(), totals.clone(), on_data.clone());
        tokio::spawn(async move { c.run_data(i, stop, totals, move |d, _| cb(d)).await })
    })
    .await
}

/// Mints each user's token and starts its client with `spawn`, at the fleet's ramp.
async fn ramp_clients(
    fleet: &Fleet<'_>,
    from: usize,
    count: usize,
    mut spawn: impl FnMut(usize, Client) -> tokio::task::JoinHandle<tidings_loadgen::Seen>,
) -> Vec<tokio::task::JoinHandle<tidings_loadgen::Seen>> {
    let Fleet { gateways, prefix, secret, ramp } = *fleet;
    let http = http_client();
    let mut handles = Vec::with_capacity(count);
    let started = std::time::Instant::now();
    for (n, i) in (from..from + count).enumerate() {
        let user = user_id(prefix, i);
        let token =
            tidings_gateway::auth::mint_hs256(secret.as_bytes(), &user, Duration::from_secs(86_400), None, None)
                .expect("token");
        let c = Client { gateways: gateways.to_vec(), token, http: http.clone(), reconnect_after_close: true };
        handles.push(spawn(i, c));
        if ramp > 0 && n % 100 == 99 {
            let due = started + Duration::from_secs_f64((n + 1) as f64 / ramp as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    handles
}

async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let totals = Arc::new(Totals::default());
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
            term.recv().await;
            stop.cancel();
        });
    }
    if args.secs > 0 {
        let stop = stop.clone();
        let secs = args.secs;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            stop.cancel();
        });
    }
    let reporter = {
        let (totals, stop) = (totals.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                println!(
                    "{}",
                    serde_json::json!({
                        "connected": totals.connected.load(Ordering::Relaxed),
                        "events": totals.events.load(Ordering::Relaxed),
                        "errors": totals.errors.load(Ordering::Relaxed),
                    })
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let fleet = Fleet { gateways: &args.gateways, prefix: &args.user_prefix, secret: &args.secret, ramp: args.ramp };
    let handles = start_clients(&fleet, args.from, args.count, &stop, &totals, Arc::new(|_| {})).await;
    stop.cancelled().await;
    for h in handles {
        let _ = h.await;
    }
    reporter.abort();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Hold(a) => hold(a).await,
            Cmd::Bench(a) => bench::run(a).await,
        }
    })
}
