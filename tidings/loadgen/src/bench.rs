//! The gateway benchmark: starts real `tidings up` processes on a broker (Apache Kafka in practice)
//! or on the embedded mock cluster, holds SSE connections and measures memory per connection and
//! send-to-receipt latency; the same loads also run against nginx + nchan for comparison. Prints
//! one JSON line per scenario. Latency is receipt time minus the notification's `occurred_at`,
//! which the benchmark sets just before it produces or POSTs (same machine, same clock).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;

use self::cpu::start_wakeup_probe;
use self::ingest_latency::{ingest_latency, LatencyLoad};
use self::load::{NotificationSender, PACE_MS};
use self::produce::{EventProducer, Via};
use self::report::{comparison, emit, report};
use self::stack::{up_args, wait_ready, Proc, Stack};
use self::users::{wait_connected, Users};
// For the chat scenarios.
use self::load::now_micros;

mod broadcast;
mod campaign;
mod campaigns;
mod chat;
mod claims;
mod cpu;
mod fanout;
mod idle;
mod ingest_latency;
mod load;
mod metrics;
mod multi;
mod nchan;
mod produce;
mod record_times;
mod replay;
mod report;
mod stack;
mod sustained;
mod users;

/// Every scenario, in the order they run (`chat` and `chat_kill` only when named: `.ci/bench-chat`;
/// `claims_decide`, `claims_hot_row` and `claims_http` only when named: `.ci/bench-claims`;
/// `csv_import`, `campaign_100k` and `campaign_1m` only when named: `.ci/bench-campaigns`; `replay_1m`
/// only when named: `.ci/bench-replay`).
const ALL: &str = "ingest_latency,ingest_latency_kafka,broadcast,broadcast_kafka,ingest_latency_embedded,nchan_fanout,nchan_broadcast,idle,fanout,campaign,sustained,multi";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Kafka bootstrap servers (a real broker: several gateway processes share a consumer group).
    #[arg(long, env = "TIDINGS_TEST_BROKERS")]
    brokers: String,
    /// The `tidings` binary (default: next to this one).
    #[arg(long)]
    tidings: Option<PathBuf>,
    /// topology.yaml.
    #[arg(long, default_value = "topology.yaml")]
    topology: PathBuf,
    /// Scenarios to run, comma-separated: ingest_latency, ingest_latency_kafka, broadcast,
    /// broadcast_kafka, ingest_latency_embedded, nchan_fanout, nchan_broadcast, idle, fanout, campaign, sustained, multi, chat, chat_kill,
    /// claims_decide, claims_hot_row, claims_http, csv_import, campaign_100k, campaign_1m, replay_1m (the chat, claim and campaign ones need PostgreSQL at TIDINGS_TEST_PG). A `comparison` line follows when a tidings
    /// scenario and its nchan counterpart both ran.
    #[arg(long, value_delimiter = ',', default_value = ALL)]
    scenarios: Vec<String>,
    /// nginx + nchan base URL for the nchan scenarios (compose/start-nchan.sh prints it).
    #[arg(long, env = "TIDINGS_BENCH_NCHAN_URL")]
    nchan: Option<String>,
    /// Seconds of the same load, unmeasured, before ingest_latency measures (whole rounds of one
    /// event per user, at least one): a freshly started broker JVM spends its first minute or so
    /// compiling its hot paths on the cores the measurement shares. At most 5 on the mock cluster.
    #[arg(long, default_value_t = 45)]
    latency_warm_secs: u64,
    /// Users (one stream and one event each) in ingest_latency and nchan_fanout.
    #[arg(long, default_value_t = 2_000)]
    latency_users: usize,
    /// Events per second POSTed in ingest_latency and nchan_fanout.
    #[arg(long, default_value_t = 2_000)]
    latency_rate: usize,
    /// Measured rounds (one event per user each, back to back at the rate) in ingest_latency and
    /// nchan_fanout: the p99 of one round is its 20th-slowest event, so one stall anywhere on the
    /// box decided it; five rounds are 10,000 events over 5 s, and each round's p99 is printed too.
    #[arg(long, default_value_t = 5)]
    latency_rounds: usize,
    /// Write each measured ingest_latency event to this CSV: POST, `orders` and `notifications`
    /// CreateTime and receipt (µs since the epoch) and its stream position `partition.offset`, to
    /// line slow events up with what else the box did then. `{scenario}` in the path becomes the
    /// scenario's name (without it, ingest_latency_embedded overwrites ingest_latency's file).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Milliseconds between the bursts a paced load goes out in (each burst is rate × this / 1000
    /// items at once).
    #[arg(long, default_value_t = 10)]
    pace_ms: u64,
    /// Connected users, each in every campaign's audience, in broadcast and nchan_broadcast.
    #[arg(long, default_value_t = 10_000)]
    broadcast_users: usize,
    /// Campaigns (messages) in broadcast and nchan_broadcast.
    #[arg(long, default_value_t = 10)]
    campaigns: usize,
    /// Campaigns per second.
    #[arg(long, default_value_t = 10)]
    campaign_rate: usize,
    /// Measured bursts of `campaigns` in broadcast and nchan_broadcast, each after the previous
    /// one arrived and a pause (BURST_PAUSE): one burst's p99 is one sample of a noisy box (nchan
    /// alone measured 222-1160 ms here); each burst's p99 is printed too.
    #[arg(long, default_value_t = 3)]
    broadcast_rounds: usize,
    /// Seconds of unmeasured bursts (at least one) before broadcast measures, as for
    /// ingest_latency: run alone, right after the broker started, its JIT compiles through them.
    #[arg(long, default_value_t = 30)]
    broadcast_warm_secs: u64,
    /// Idle connections held by one gateway process (stay under its 20,000 open files).
    #[arg(long, default_value_t = 19_000)]
    idle: usize,
    /// Users that get one notification each in the fan-out scenario.
    #[arg(long, default_value_t = 10_000)]
    fanout_users: usize,
    /// Notifications per second in the sustained scenario.
    #[arg(long, default_value_t = 5_000)]
    rate: usize,
    /// Length of the sustained scenario in seconds.
    #[arg(long, default_value_t = 20)]
    sustain_secs: u64,
    /// Gateway processes in the multi-process scenario.
    #[arg(long, default_value_t = 6)]
    multi_gateways: usize,
    /// Connections in the multi-process scenario (spread over as many client processes).
    #[arg(long, default_value_t = 100_000)]
    multi_connections: usize,
    /// Users in the chat scenarios (one stream each, all sending).
    #[arg(long, default_value_t = 3_000)]
    chat_users: usize,
    /// Members per chat room (users / room size rooms).
    #[arg(long, default_value_t = 10)]
    chat_room_size: usize,
    /// Messages per second each chat user sends.
    #[arg(long, default_value_t = 1.0)]
    chat_rate: f64,
    /// Measured seconds of chat sending.
    #[arg(long, default_value_t = 60)]
    chat_secs: u64,
    /// Seconds of the same chat load before the measured ones.
    #[arg(long, default_value_t = 5)]
    chat_warm_secs: u64,
    /// Claims in claims_decide's log, all on one hot coupon (`.ci/bench-claims`).
    #[arg(long, default_value_t = 1_000_000)]
    claims: usize,
    /// Distinct users making claims_decide's claims.
    #[arg(long, default_value_t = 200_000)]
    claim_users: usize,
    /// The hot coupon's stock in claims_decide.
    #[arg(long, default_value_t = 100_000)]
    claim_stock: usize,
    /// Claims of the log's start that claims_hot_row decides (its stock scaled to the same share).
    #[arg(long, default_value_t = 100_000)]
    hot_row_claims: usize,
    /// Concurrent PostgreSQL connections of claims_hot_row.
    #[arg(long, default_value_t = 64)]
    hot_row_connections: u32,
    /// Users claiming over HTTP at once in claims_http, one claim each.
    #[arg(long, default_value_t = 5_000)]
    http_claimants: usize,
    /// The coupon's stock in claims_http.
    #[arg(long, default_value_t = 1_000)]
    http_claim_stock: usize,
    /// Rows of csv_import's CSV file (`tidings segment import` against psql `\copy`).
    #[arg(long, default_value_t = 1_000_000)]
    import_rows: usize,
    /// Users of campaign_100k's segment.
    #[arg(long, default_value_t = 100_000)]
    campaign_users: usize,
    /// SSE users connected during the campaign scenarios (the segments' first users).
    #[arg(long, default_value_t = 10_000)]
    campaign_sse_users: usize,
    /// Users of campaign_1m's segment.
    #[arg(long, default_value_t = 1_000_000)]
    campaign_big_users: usize,
    /// Notifications replay_1m persists (a campaign to a segment this size) and replays
    /// (`.ci/bench-replay`).
    #[arg(long, default_value_t = 1_000_000)]
    replay_notifications: usize,
    /// Connected SSE users receiving replay_1m's live load.
    #[arg(long, default_value_t = 300)]
    replay_sse_users: usize,
    /// Live events per second produced to `orders` during replay_1m.
    #[arg(long, default_value_t = 300)]
    replay_live_rate: usize,
    /// Seconds of replay_1m's live load measured without the replay.
    #[arg(long, default_value_t = 20)]
    replay_baseline_secs: u64,
    /// Percent of replay_1m's rows deleted before the replay (users whose number mod 100 is below it).
    #[arg(long, default_value_t = 10)]
    replay_delete_percent: u32,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    PACE_MS.store(args.pace_ms.max(1), Ordering::Relaxed);
    start_wakeup_probe();
    let bin = match &args.tidings {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("tidings"),
    };
    if !bin.exists() {
        bail!("{} not found: build it (cargo build --release -p tidings) or pass --tidings", bin.display());
    }
    let topology = std::fs::canonicalize(&args.topology).context("topology.yaml")?;
    let root = tempfile::Builder::new().prefix("tidings-bench-").tempdir()?;
    let prefix = format!("bench{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let run = |s: &str| args.scenarios.iter().any(|x| x == s);
    let http = reqwest::Client::new();
    eprintln!("bench: prefix {prefix}, work dir {}", root.path().display());
    let mut results = HashMap::new();

    // Latency through the whole chain, on one all-stages process per broker: events sent over
    // HTTP ingest, or produced straight to Kafka as upstream services do (`_kafka`).
    let on_stack = ["ingest_latency", "ingest_latency_kafka", "broadcast", "broadcast_kafka"];
    if on_stack.iter().any(|s| run(s)) {
        let stack_prefix = format!("{prefix}all.");
        match Stack::start(&bin, root.path(), "all-kafka", &topology, Some(&args.brokers), Some(&stack_prefix), &http)
            .await
        {
            Ok(mut stack) => {
                let mut users = Users::new(&stack.url, "l");
                let producer = if run("ingest_latency_kafka") || run("broadcast_kafka") {
                    let topics = [format!("{}orders", stack.prefix), format!("{}coupons", stack.prefix)];
                    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                    Some(EventProducer::new(&stack.brokers, &stack.registry, &topics).await)
                } else {
                    None
                };
                for name in on_stack.into_iter().filter(|s| run(s)) {
                    let via = match (name.ends_with("_kafka"), &producer) {
                        (false, _) => Via::Http(&stack.ingest, &http),
                        (true, Some(Ok(p))) => Via::Kafka(p, &stack.prefix),
                        (true, Some(Err(e))) => {
                            report(&mut results, name, Err(anyhow::anyhow!("the Kafka producer: {e:#}")));
                            continue;
                        }
                        (true, None) => unreachable!("a producer is made when a _kafka scenario runs"),
                    };
                    let v = if name.starts_with("ingest_latency") {
                        let load = LatencyLoad {
                            users: args.latency_users,
                            rate: args.latency_rate,
                            warm: Duration::from_secs(args.latency_warm_secs),
                            rounds: args.latency_rounds,
                            timeline: args.timeline.clone(),
                        };
                        ingest_latency(name, &stack, &mut users, load, via, &http).await
                    } else {
                        let shape =
                            (args.campaign_rate, args.broadcast_rounds, Duration::from_secs(args.broadcast_warm_secs));
                        broadcast::broadcast(name, &stack, &mut users, args.broadcast_users, args.campaigns, shape, via)
                            .await
                    };
                    report(&mut results, name, v);
                }
                users.close().await;
                stack.proc.shutdown().await;
            }
            Err(e) => {
                for name in on_stack.into_iter().filter(|s| run(s)) {
                    report(&mut results, name, Err(anyhow::anyhow!("{e:#}")));
                }
            }
        }
    }
    if run("ingest_latency_embedded") {
        let name = "ingest_latency_embedded";
        let v = async {
            let mut stack = Stack::start(&bin, root.path(), "all-embedded", &topology, None, None, &http).await?;
            let mut users = Users::new(&stack.url, "e");
            let v = ingest_latency(
                name,
                &stack,
                &mut users,
                LatencyLoad {
                    users: args.latency_users,
                    rate: args.latency_rate,
                    // No JVM to warm up, and the in-memory mock cluster got slower with more
                    // records in it: after 45 s of warm-up p50 24 / p99 77 ms, against 11 / 16 ms
                    // after 5 s (each fetch walks the partition's log from its start; README,
                    // Gateway benchmark).
                    warm: Duration::from_secs(args.latency_warm_secs.min(5)),
                    rounds: args.latency_rounds,
                    timeline: args.timeline.clone(),
                },
                Via::Http(&stack.ingest, &http),
                &http,
            )
            .await;
            users.close().await;
            stack.proc.shutdown().await;
            v.map(|mut v| {
                v["broker"] = json!("embedded librdkafka mock cluster (`tidings up` without --brokers)");
                v
            })
        }
        .await;
        report(&mut results, name, v);
    }

    // The same loads on nginx + nchan: publish over HTTP straight to EventSource subscribers.
    for (name, fanout) in [("nchan_fanout", true), ("nchan_broadcast", false)] {
        if !run(name) {
            continue;
        }
        let Some(base) = args.nchan.as_deref() else {
            emit(json!({"scenario": name, "skipped": "no --nchan / TIDINGS_BENCH_NCHAN_URL (compose/start-nchan.sh)"}));
            continue;
        };
        let v = nchan::scenario(name, fanout, base.trim_end_matches('/'), &args, &http).await;
        report(&mut results, name, Ok(v));
    }
    if let Some(v) = comparison(&results) {
        emit(v);
    }

    if run("claims_decide") || run("claims_hot_row") {
        let o = claims::ClaimOpts {
            claims: args.claims,
            users: args.claim_users,
            stock: args.claim_stock,
            hot_row_claims: args.hot_row_claims,
            hot_row_connections: args.hot_row_connections,
        };
        let claims_prefix = format!("{prefix}claims.");
        let decided = if run("claims_decide") {
            let v = claims::decide(&bin, root.path(), &topology, &args.brokers, &claims_prefix, &o).await;
            match v {
                Ok((v, log)) => {
                    report(&mut results, "claims_decide", Ok(v));
                    Some(log)
                }
                Err(e) => {
                    report(&mut results, "claims_decide", Err(e));
                    None
                }
            }
        } else {
            None
        };
        if run("claims_hot_row") {
            let log = decided.unwrap_or_else(|| claims::log(&o));
            report(&mut results, "claims_hot_row", claims::hot_row(&log, &o).await);
            if let (Some(a), Some(c)) = (results.get("claims_decide"), results.get("claims_hot_row")) {
                emit(claims::comparison(a, c));
            }
        }
    }

    if run("claims_http") {
        let o = claims::HttpOpts { users: args.http_claimants, stock: args.http_claim_stock };
        let http_prefix = format!("{prefix}claims-http.");
        let v = claims::http(&bin, root.path(), &topology, &args.brokers, &http_prefix, &o).await;
        report(&mut results, "claims_http", v);
    }

    if ["csv_import", "campaign_100k", "campaign_1m"].iter().any(|s| run(s)) {
        let o = campaigns::CampaignOpts {
            import_rows: args.import_rows,
            users: args.campaign_users,
            sse_users: args.campaign_sse_users,
            big_users: args.campaign_big_users,
        };
        let campaigns_prefix = format!("{prefix}campaigns.");
        campaigns::run(&bin, root.path(), &topology, &args.brokers, &campaigns_prefix, &run, &o, &mut results).await;
    }
    if run("replay_1m") {
        let o = replay::ReplayOpts {
            notifications: args.replay_notifications,
            sse_users: args.replay_sse_users,
            live_rate: args.replay_live_rate,
            baseline_secs: args.replay_baseline_secs,
            delete_percent: args.replay_delete_percent,
        };
        let replay_prefix = format!("{prefix}replay.");
        let v = replay::run(&bin, root.path(), &topology, &args.brokers, &replay_prefix, &o).await;
        report(&mut results, "replay_1m", v);
    }

    for (name, kill) in [("chat", false), ("chat_kill", true)] {
        if !run(name) {
            continue;
        }
        let opts = chat::ChatOpts {
            users: args.chat_users,
            room_size: args.chat_room_size,
            rate: args.chat_rate,
            secs: args.chat_secs,
            warm_secs: args.chat_warm_secs,
            kill,
        };
        let chat_prefix = format!("{prefix}{name}.");
        let v = chat::run(name, &bin, root.path(), &topology, &args.brokers, &chat_prefix, &opts).await;
        report(&mut results, name, v);
    }

    if !["idle", "fanout", "campaign", "sustained", "multi"].iter().any(|s| run(s)) {
        return Ok(());
    }
    let db = format!("sqlite://{}/bench.db", root.path().display());
    let base = |stages: &str| up_args(Some(&args.brokers), Some(&prefix), &topology, &db, stages);

    // The pipeline (templating for the campaign, persistence) and the embedded registry.
    let mut core = Proc::spawn(&bin, "core", root.path(), &base("templating,persistence"), &[])?;
    let core_ep = core.endpoints().await?;
    let registry_url = core_ep["schema_registry_url"].as_str().unwrap_or_default().to_string();
    let mut gw_args = base("gateway");
    gw_args.extend(["--schema-registry-url".to_string(), registry_url.clone()]);

    let sender = NotificationSender::new(&args.brokers, &registry_url, &format!("{prefix}notifications")).await?;

    if run("idle") || run("fanout") || run("campaign") || run("sustained") {
        let mut gw = Proc::spawn(&bin, "gateway-single", root.path(), &gw_args, &[])?;
        let gw_ep = gw.endpoints().await?;
        let url = gw_ep["http"].as_str().unwrap_or_default().to_string();
        let ingest = gw_ep["ingest"].as_str().unwrap_or_default().to_string();
        wait_ready(&http, &url, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The tidings processes: this gateway, and templating + persistence.
        let servers = [gw.pid(), core.pid()];
        let mut users = Users::new(&url, "b");
        let (connected, v) = idle::idle(&gw, &url, &mut users, args.idle, &servers, &http).await;
        emit(v);
        if run("fanout") {
            emit(fanout::fanout(&users, &sender, args.fanout_users.min(connected), &servers).await);
        }
        if run("campaign") {
            emit(campaign::campaign(&users, connected, &ingest, &http, &servers).await?);
        }
        if run("sustained") {
            emit(sustained::sustained(&users, &sender, connected, args.rate, args.sustain_secs, &servers).await);
        }
        users.close().await;
        gw.shutdown().await;
    }

    if run("multi") {
        emit(multi::multi(&bin, root.path(), &gw_args, args.multi_gateways, args.multi_connections, &http).await?);
    }
    core.shutdown().await;
    Ok(())
}
