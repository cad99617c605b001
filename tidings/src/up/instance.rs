//! This process's announcement: every few seconds its stages, the partitions its consumers own
//! per group and, with the gateway, its URL and open streams, produced to the compacted
//! instances topic under its instance id; a tombstone when it stops. `tidings status` reads them.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tidings_core::shutdown::TaskTree;
use tidings_core::status::{local, Announcement, GatewayInfo, Owned, ANNOUNCE_EVERY_MS};
use tidings_gateway::delivery::Hub;
use tidings_gateway::status::{LiveStatus, StatusState};
use tidings_gateway::AuthConfig;
use tidings_pipeline::topology::Topology;
use tracing::{info, warn};

use super::infra::Infrastructure;
use super::UpArgs;
use crate::status::{spec, INSTANCES_TOPIC};

/// How long one announcement may wait for the broker.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway of this process, once `gateway_status` saw it.
static GATEWAY: OnceLock<(String, Arc<Hub>)> = OnceLock::new();

/// Announces this process under `tasks` until shutdown, then writes its tombstone. Off (a
/// warning) when the topology declares no instances topic.
pub fn spawn(args: &UpArgs, infra: &Infrastructure, tasks: &mut TaskTree) {
    let topo = infra.topology.clone();
    if !topo.topics.contains_key(INSTANCES_TOPIC) {
        warn!("Not announcing this process: the topology declares no {INSTANCES_TOPIC} topic (`tidings status` will not see it).");
        return;
    }
    let producer: FutureProducer = match infra.kafka.producer().create() {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "Not announcing this process: no Kafka producer.");
            return;
        }
    };
    let topic = topo.topic_name(INSTANCES_TOPIC);
    let host = hostname();
    let pid = std::process::id();
    let instance = format!("{host}-{pid}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let stages = args.stages.clone();
    let clients = clients(&topo, args);
    let started = chrono::Utc::now().timestamp_millis();
    let token = tasks.token().clone();
    info!(%instance, "Announcing this process on {topic} every {ANNOUNCE_EVERY_MS} ms.");
    tasks.spawn("instance", async move {
        let mut tick = tokio::time::interval(Duration::from_millis(ANNOUNCE_EVERY_MS as u64));
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            let a = announcement(&instance, &host, pid, &stages, &clients, started);
            let value = serde_json::to_vec(&a).expect("an announcement serializes");
            let rec: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&topic).key(instance.as_str()).payload(value.as_slice());
            if let Err((e, _)) = producer.send(rec, SEND_TIMEOUT).await {
                warn!(error = %e, "Announcing this process on {topic} failed; retrying at the next tick.");
            }
        }
        let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic).key(instance.as_str());
        match producer.send(rec, SEND_TIMEOUT).await {
            Ok(_) => info!(%instance, "Withdrew this process's announcement."),
            Err((e, _)) => warn!(error = %e, "The tombstone of this process's announcement was not written."),
        }
        Ok::<(), std::convert::Infallible>(())
    });
}

/// The consumer clients of the stages this process runs: client name → (stage, group, topics).
fn clients(topo: &Topology, args: &UpArgs) -> BTreeMap<&'static str, (String, String, Vec<String>)> {
    let mut out = BTreeMap::new();
    for g in spec(topo, Some(&args.sse.delivery_group)).groups {
        let run = if g.stage == "gateway" { "gateway" } else { g.stage.as_str() };
        let client = match g.stage.as_str() {
            "templating" => "templating-consumer",
            "persistence" => "persistence-consumer",
            "claims" => "claims-consumer",
            "scheduler" => "scheduler-consumer",
            "gateway" => "delivery-consumer",
            _ => continue,
        };
        if args.runs(run) {
            out.insert(client, (g.stage, g.group, g.topics));
        }
    }
    out
}

fn announcement(
    instance: &str,
    host: &str,
    pid: u32,
    stages: &[String],
    clients: &BTreeMap<&'static str, (String, String, Vec<String>)>,
    started: i64,
) -> Announcement {
    let held = local::snapshot();
    let groups = clients
        .iter()
        .map(|(client, (stage, group, topics))| {
            let partitions = held.get(client).cloned().unwrap_or_default();
            (group.clone(), Owned { stage: stage.clone(), topics: topics.clone(), partitions })
        })
        .collect();
    let gateway = GATEWAY.get().map(|(url, hub)| GatewayInfo { url: url.clone(), streams: hub.connections() as u64 });
    Announcement {
        instance: instance.to_string(),
        host: host.to_string(),
        pid,
        stages: stages.to_vec(),
        groups,
        gateway,
        started_at_ms: started,
        updated_at_ms: chrono::Utc::now().timestamp_millis(),
        interval_ms: ANNOUNCE_EVERY_MS,
    }
}

/// `GET /v1/status` for the gateway at `url` (whose streams the announcements count): services
/// with an ingest token and the `--admin-user`s. `None` (a warning) without its Kafka client.
pub fn gateway_status(
    args: &UpArgs,
    infra: &Infrastructure,
    auth: Arc<AuthConfig>,
    hub: &Arc<Hub>,
    url: &str,
) -> Option<StatusState> {
    let _ = GATEWAY.set((url.to_string(), hub.clone()));
    let collector =
        match tidings_core::status::Collector::new(&infra.kafka, spec(&infra.topology, Some(&args.sse.delivery_group)))
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "GET /v1/status is off: no Kafka client for it.");
                return None;
            }
        };
    // The same service tokens as ingest (settings::check refused bad ones already).
    let mut tokens: Vec<&str> = args.ingest_tokens.iter().map(String::as_str).collect();
    if args.dev {
        tokens.push(tidings_gateway::service_auth::DEV_SERVICE_TOKEN);
    }
    let services = tidings_gateway::service_auth::ServiceTokens::new(tokens).unwrap_or_default();
    let window = Duration::from_secs(args.status_window_secs.max(1));
    Some(StatusState {
        source: Arc::new(LiveStatus::new(collector, window, Some(infra.store.clone()))),
        services,
        auth,
        admins: Arc::new(args.admin_users.iter().map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect()),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}
