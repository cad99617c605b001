//! The HTTP side of `up`: event ingest for services on its own listener, and the gateway
//! (delivery over SSE, inbox, chat API, web page) on the public one, with `/metrics` on a third
//! listener when asked (always, for a process without the gateway). Each listener has its own
//! connection cap.

use anyhow::Context;
use rdkafka::producer::FutureProducer;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tidings_core::client_stats::{reporting, ClientStats};
use tidings_core::shutdown::TaskTree;
use tidings_core::RegistryClient;
use tidings_gateway::browser::BrowserAccess;
use tidings_gateway::campaigns::CampaignsState;
use tidings_gateway::chat::{ChatConfig, ChatState};
use tidings_gateway::coupons::{CouponConfig, CouponState, DecisionSource};
use tidings_gateway::delivery::backfill::LogSource;
use tidings_gateway::delivery::hub::StoreResume;
use tidings_gateway::delivery::owners::RedirectAllow;
use tidings_gateway::delivery::{self, DeliveryConfig, Hub, Owners};
use tidings_gateway::preferences::{Category, PreferencesState};
use tidings_gateway::produce::EventProducer;
use tidings_gateway::segments::SegmentsState;
use tidings_gateway::service_auth::ServiceTokens;
use tidings_gateway::web::{DevSignIn, WebConfig};
use tidings_gateway::{AuthConfig, InboxState, IngestState, IngestTopic, Parts, Readiness, StreamState};
use tidings_pipeline::stages::claims;
use tidings_pipeline::topology::Topology;
use tracing::{info, warn};

use super::args::DEFAULT_METRICS_LISTEN;
use super::infra::Infrastructure;
use super::UpArgs;
use crate::settings::Settings;

/// Where the HTTP listeners are (`http://addr`); empty for one that is off.
#[derive(Default)]
pub struct Listening {
    pub http: String,
    pub ingest: String,
}

/// Serves ingest (when `ingest` or `gateway` runs and a service token is set) and the gateway
/// (when `gateway` runs) under `tasks`.
pub fn serve(
    args: &UpArgs,
    settings: Settings,
    infra: &Infrastructure,
    tasks: &mut TaskTree,
    readiness: &Readiness,
) -> anyhow::Result<Listening> {
    let mut listening = Listening::default();
    if !args.runs("gateway") {
        metrics(args, tasks, readiness)?;
    }
    if !(args.runs("gateway") || args.runs("ingest")) {
        return Ok(listening);
    }
    // The gateway needs keys to check user tokens; ingest alone uses them, when it has them, only
    // to tell a user token (403) from an unknown one (401).
    let auth = settings.auth.map(Arc::new);
    // One producer of schema-checked JSON events for ingest and the chat API.
    let producer: FutureProducer<ClientStats> =
        reporting(infra.kafka.producer()).create_with_context(ClientStats::new("ingest-producer"))?;
    let events = Arc::new(EventProducer::new(infra.registry_client.clone(), producer));
    // The coupon API takes the same service tokens as ingest, to define coupons and redeem codes.
    let services = settings.ingest_tokens.clone();
    listening.ingest = ingest(args, infra, settings.ingest_tokens, events.clone(), auth.clone(), tasks, readiness)?;
    if let (true, Some(auth)) = (args.runs("gateway"), auth) {
        let origins = (settings.redirect_allow, settings.cors_allow);
        // Segments take the same service tokens too, to load campaign audiences.
        let segments = args.segments.state(infra.store.clone(), services.clone(), Some(auth.clone()));
        // Campaigns too, to launch, list and cancel them.
        let campaigns = args.campaigns.state(
            infra.store.clone(),
            &infra.topology,
            events.clone(),
            services.clone(),
            Some(auth.clone()),
        );
        let coupons = coupons(args, infra, auth.clone(), services, events.clone(), tasks, readiness)?;
        let parts = (events, coupons, segments, campaigns);
        listening.http = gateway(args, infra, auth, parts, origins, tasks, readiness)?;
    }
    Ok(listening)
}

/// `/metrics` with `/healthz` and `/readyz` for a process without the gateway (whose public port
/// serves them otherwise), on `--metrics-listen` or [`DEFAULT_METRICS_LISTEN`]. Only the default
/// may be taken (another process on the host): then a warning, not a refusal.
fn metrics(args: &UpArgs, tasks: &mut TaskTree, readiness: &Readiness) -> anyhow::Result<()> {
    let addr = args.metrics_listen.unwrap_or(DEFAULT_METRICS_LISTEN);
    let listener = match tidings_gateway::bind(addr, None) {
        Ok(l) => l,
        Err(e) if args.metrics_listen.is_none() && e.kind() == std::io::ErrorKind::AddrInUse => {
            warn!("/metrics is not served: the default {addr} is taken; set --metrics-listen.");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("binding /metrics to {addr}")),
    };
    info!("Prometheus /metrics (and /healthz, /readyz) on http://{}.", listener.local_addr()?);
    let app = tidings_gateway::metrics_app().merge(tidings_gateway::health::router(readiness.clone()));
    let (t, limits) = (tasks.token().clone(), args.http_limits("metrics", args.metrics_max_connections));
    tasks.spawn("metrics", async move { tidings_gateway::serve(listener, app, limits, t).await });
    Ok(())
}

/// HTTP ingest on its own listener, for the templating stage's input topics (not chat, which
/// only the chat API produces: it checks membership and the sender). Off without a token.
fn ingest(
    args: &UpArgs,
    infra: &Infrastructure,
    tokens: ServiceTokens,
    events: Arc<EventProducer>,
    users: Option<Arc<AuthConfig>>,
    tasks: &mut TaskTree,
    readiness: &Readiness,
) -> anyhow::Result<String> {
    let topo = &infra.topology;
    let topics: HashMap<String, IngestTopic> = topo
        .topics
        .iter()
        .filter(|(name, _)| topo.stages.templating.inputs.contains(name) && name.as_str() != "chat")
        .map(|(name, spec)| {
            (name.clone(), IngestTopic { physical: topo.topic_name(name), key_field: spec.key.clone() })
        })
        .collect();
    if tokens.is_empty() {
        info!("HTTP ingest is off: no --ingest-token (TIDINGS_INGEST_TOKENS) is set.");
        return Ok(String::new());
    }
    let ingest = Arc::new(IngestState { topics, events, tokens, users });
    let listener = tidings_gateway::bind(args.ingest_listen, None)
        .with_context(|| format!("binding HTTP ingest to {}", args.ingest_listen))?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = tidings_gateway::ingest_app(ingest, readiness.clone());
    let (t, limits) = (tasks.token().clone(), args.http_limits("ingest", args.ingest_max_connections));
    tasks.spawn("ingest", async move { tidings_gateway::serve(listener, app, limits, t).await });
    // Ready once it listens: its producer reports broker trouble per request (503), and a process
    // running ingest alone has no other component that would make /readyz answer 200.
    readiness.set("ingest", true);
    info!("HTTP ingest for services listening on {url} (POST /v1/events/{{topic}}, service token required).");
    Ok(url)
}

/// The producer and the parts of the gateway for services (each off without its settings).
type ServiceParts = (Arc<EventProducer>, Option<CouponState>, Option<Arc<SegmentsState>>, Option<Arc<CampaignsState>>);

/// The public gateway: delivery (this instance's share of the notifications partitions, streamed
/// over SSE), the inbox, the chat API and the web page; `/metrics` here or on its own listener.
fn gateway(
    args: &UpArgs,
    infra: &Infrastructure,
    auth: Arc<AuthConfig>,
    (events, coupons, segments, campaigns): ServiceParts,
    (redirect_allow, cors_allow): (RedirectAllow, RedirectAllow),
    tasks: &mut TaskTree,
    readiness: &Readiness,
) -> anyhow::Result<String> {
    let (topo, store) = (&infra.topology, &infra.store);
    let inbox = InboxState { store: store.clone(), auth: auth.clone() };
    let categories = topo.category_list().into_iter().map(|(name, c)| Category {
        name,
        critical: c.critical,
        description: c.description,
    });
    let preferences =
        PreferencesState { store: store.clone(), auth: auth.clone(), categories: Arc::new(categories.collect()) };
    let chat = chat(args, infra, auth.clone(), events)?;
    let send_buffer = (args.sse.socket_send_buffer > 0).then_some(args.sse.socket_send_buffer);
    let listener = tidings_gateway::bind(args.http, send_buffer)
        .with_context(|| format!("binding the gateway to {}", args.http))?;
    let http = format!("http://{}", listener.local_addr()?);
    let advertised = args.sse.advertise_url.clone().unwrap_or_else(|| http.clone());

    let notifications = topo.topic_name(&topo.stages.templating.output);
    let persistence_group = topo.group_name(&topo.stages.persistence.group);
    let resume = StoreResume { store: store.clone(), group: persistence_group, topic: notifications.clone() };
    // Resumes older than a ring are backfilled from the notifications topic itself.
    let log = LogSource {
        kafka: infra.kafka.clone(),
        registry: RegistryClient::new(&infra.registry).context("the schema registry client of backfills")?,
        topic: notifications.clone(),
        group: topo.group_name(&format!("{}-backfill", args.sse.delivery_group)),
    };
    let hub = Hub::with_log(args.sse.hub_config(), Some(resume), Some(log));
    let gateways = redirect_allow.origins();
    let owners = Owners::with_allow(&advertised, &notifications, redirect_allow);
    let group = topo.group_name(&args.sse.delivery_group);
    let owners_topic = topo.topic_name(&args.sse.owners_topic);
    let dcfg = DeliveryConfig::new(infra.kafka.clone(), infra.registry.clone(), notifications, group, owners_topic);
    readiness.set_check("delivery", delivery::spawn(tasks, dcfg, hub.clone(), owners.clone()));
    let instance = delivery::campaigns::instance_id(&advertised);
    let every = delivery::campaigns::FLUSH_EVERY;
    let counts = delivery::campaigns::flush_counts(hub.clone(), store.clone(), instance, every, tasks.token().clone());
    tasks.spawn("campaign-deliveries", counts);

    let browser = BrowserAccess {
        cors_allow,
        cookie_secure: args.sse.cookie_secure || advertised.starts_with("https://"),
        cookie_domain: args.sse.cookie_domain.clone(),
        session_ttl: Duration::from_secs(args.sse.stream_session_secs.max(1)),
    };
    let stream = StreamState { hub, owners, auth, browser: Arc::new(browser) };
    let parts = Parts {
        inbox: Some(inbox),
        chat: Some(chat),
        coupons,
        stream: Some(stream.clone()),
        metrics_elsewhere: args.metrics_listen.is_some(),
        web: Some(web_config(topo, args, gateways)),
        segments,
        preferences: Some(preferences),
        campaigns,
        status: super::instance::gateway_status(args, infra, stream.auth.clone(), &stream.hub, &advertised),
    };
    let app = tidings_gateway::app(parts, readiness.clone());
    readiness.set("gateway", true);
    if let Some(addr) = args.metrics_listen {
        let listener = tidings_gateway::bind(addr, None).with_context(|| format!("binding /metrics to {addr}"))?;
        info!("Prometheus /metrics on http://{} only.", listener.local_addr()?);
        let (t, limits) = (tasks.token().clone(), args.http_limits("metrics", args.metrics_max_connections));
        tasks.spawn("metrics", async move {
            tidings_gateway::serve(listener, tidings_gateway::metrics_app(), limits, t).await
        });
    }
    let t = tasks.token().clone();
    let limits = args.http_limits("public", args.max_connections).per_ip(args.max_connections_per_ip);
    tasks.spawn("gateway", async move { tidings_gateway::serve_gateway(listener, app, Some(stream), limits, t).await });
    info!(
        "Gateway listening on {http}, advertised as {advertised} (GET /v1/stream, GET /v1/notifications, \
         GET /healthz, /readyz, /metrics); the web page at {http}/."
    );
    Ok(http)
}

/// The coupon API's state, and its reader of decisions on `coupons` (ready once assigned at the
/// partitions' ends); off when the topology declares no claim stage topics.
fn coupons(
    args: &UpArgs,
    infra: &Infrastructure,
    auth: Arc<AuthConfig>,
    services: ServiceTokens,
    events: Arc<EventProducer>,
    tasks: &mut TaskTree,
    readiness: &Readiness,
) -> anyhow::Result<Option<CouponState>> {
    let topo = &infra.topology;
    if !(topo.topics.contains_key(claims::INPUT) && topo.topics.contains_key(claims::OUTPUT)) {
        info!("The coupon API is off: the topology declares no {} and {} topics.", claims::INPUT, claims::OUTPUT);
        return Ok(None);
    }
    let c = &args.coupons;
    let mut cfg = CouponConfig::new(topo.topic_name(claims::INPUT));
    cfg.claim_wait = Duration::from_millis(c.coupon_claim_wait_ms);
    cfg.redemption_wait = Duration::from_millis(c.coupon_redemption_wait_ms);
    cfg.max_waiting = c.coupon_max_waiting;
    let state = CouponState::new(infra.store.clone(), auth, services, events, cfg);
    let source = DecisionSource {
        kafka: infra.kafka.clone(),
        registry: infra.registry_client.clone(),
        topic: topo.topic_name(claims::OUTPUT),
        group: topo.group_name("coupon-api-decisions"),
    };
    let (waiters, ready, token) = (state.waiters.clone(), readiness.clone(), tasks.token().clone());
    readiness.set("coupon-decisions", false);
    tasks.spawn("coupon-decisions", async move {
        // Retried like a stage's start: right after the topics are created their leaders may
        // still move, and the `coupons` subject may not be registered yet.
        let mut backoff = Duration::from_millis(250);
        let reader = loop {
            match source.clone().start(waiters.clone()).await {
                Ok(reader) => break reader,
                Err(e) if e.is_retriable() => {
                    warn!(error = %e, "The coupon API's decision reader could not start; retrying in {backoff:?}.");
                    tokio::select! {
                        _ = token.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        };
        ready.set("coupon-decisions", true);
        reader.run(token).await
    });
    Ok(Some(state))
}

/// The chat API's state and limits.
fn chat(
    args: &UpArgs,
    infra: &Infrastructure,
    auth: Arc<AuthConfig>,
    events: Arc<EventProducer>,
) -> anyhow::Result<ChatState> {
    let topo = &infra.topology;
    let mut cfg = ChatConfig::new(
        topo.topic_name("chat"),
        topo.group_name(&topo.stages.persistence.group),
        topo.topic_name(&topo.stages.templating.output),
    );
    let c = &args.chat;
    cfg.max_text_bytes = c.chat_max_text_bytes;
    cfg.edit_window = Duration::from_secs(c.chat_edit_window_secs);
    cfg.send_rate = (c.chat_rate, c.chat_burst);
    cfg.write_rate = (c.chat_write_rate, c.chat_write_burst);
    cfg.fanout_per_token = c.chat_fanout_per_token;
    cfg.inquiries_per_buyer = c.chat_inquiries_per_buyer;
    cfg.inquiries_per_pair = c.chat_inquiries_per_pair;
    cfg.inquiry_window = Duration::from_secs(c.chat_inquiry_window_secs);
    cfg.history_rate = (c.chat_history_rate, c.chat_history_burst);
    cfg.rooms_page = c.chat_rooms_page;
    cfg.tracked_users = c.chat_tracked_users;
    // Watermarks only: it never joins a group nor reads.
    let watermarks =
        infra.kafka.consumer_with(&format!("{}-watermarks", topo.group_name("chat-api")), &[], &[]).create()?;
    Ok(ChatState::new(infra.store.clone(), auth, events, cfg, watermarks))
}

/// The web page's settings: the kinds to listen for, dev sign-in when `--dev` and no key of its
/// own (then the public dev secret is the gateway's only key, so the tokens it signs verify), and
/// the gateways its stream may be redirected to.
fn web_config(topo: &Topology, args: &UpArgs, gateways: Vec<String>) -> WebConfig {
    let mut kinds: Vec<String> = topo.templates.iter().map(|t| t.kind.clone()).collect();
    // Campaign notifications are made by templating from the campaigns topic, not by a template.
    if topo.stages.templating.inputs.iter().any(|i| i == "campaigns") {
        kinds.push(delivery::campaigns::CAMPAIGN_KIND.to_string());
    }
    kinds.sort();
    kinds.dedup();
    let dev_key = args.dev && args.jwt.jwt_secret.is_none() && args.jwt.jwt_public_key_file.is_none();
    let dev_sign_in =
        dev_key.then(|| DevSignIn { issuer: args.jwt.jwt_issuer.clone(), audience: args.jwt.jwt_audience.clone() });
    WebConfig { kinds, dev_sign_in, gateways }
}
