//! `tidings up`: starts the store, the schema registry (embedded unless a URL is given), the
//! broker (an in-process mock cluster unless `--brokers` is given), applies the topology, then
//! runs the selected stages under one shutdown tree until SIGTERM or Ctrl-C.

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tidings_core::client_stats::{reporting, ClientStats};
use tidings_core::shutdown::TaskTree;
use tidings_core::{RegistryClient, RegistryEndpoint};
use tidings_gateway::auth::{self, Key};
use tidings_gateway::browser::BrowserAccess;
use tidings_gateway::chat::{ChatConfig, ChatState};
use tidings_gateway::delivery::backfill::LogSource;
use tidings_gateway::delivery::hub::StoreResume;
use tidings_gateway::delivery::{self, DeliveryConfig, Hub, HubConfig, Owners};
use tidings_gateway::produce::EventProducer;
use tidings_gateway::web::{DevSignIn, WebConfig};
use tidings_gateway::{AuthConfig, InboxState, IngestState, IngestTopic, Parts, Readiness, StreamState};
use tidings_pipeline::registry::Access;
use tidings_pipeline::stages::templating::{self, TemplatingConfig};
use tidings_pipeline::topology::{self, Topology};
use tidings_sinks::persistence::{self, PersistenceConfig};
use tidings_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::endpoints::{registry_write_token, Endpoints};
use crate::settings;
use crate::Infra;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// A TOML file of settings: the keys are this command's long flags without the dashes
    /// (`http = "0.0.0.0:8080"`, `ingest-token = ["..."]`, `dev = true`), a list for a repeatable
    /// flag. Its values replace the built-in defaults; env vars and flags still win over them.
    #[arg(long, env = "TIDINGS_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// What reading --config found (refusals, warnings); filled in by the parser.
    #[arg(skip)]
    pub config_file: crate::config_file::Report,
    #[command(flatten)]
    pub infra: Infra,
    /// Listen address of the public HTTP gateway (streams, inbox, /healthz, /readyz, /metrics).
    #[arg(long, env = "TIDINGS_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Listen address of HTTP event ingest (`POST /v1/events/{topic}`), for upstream services
    /// only: keep it on loopback or a private network. Served only when a service token is set.
    #[arg(long, env = "TIDINGS_INGEST_LISTEN", default_value = "127.0.0.1:8090")]
    pub ingest_listen: SocketAddr,
    /// Service tokens that may produce over HTTP ingest (`Authorization: Bearer <token>`), at
    /// least 16 characters each; comma-separated in the env var.
    #[arg(long = "ingest-token", env = "TIDINGS_INGEST_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub ingest_tokens: Vec<String>,
    /// Serve `/metrics` on this address only (e.g. a port only the scraper reaches) instead of on
    /// the public gateway port.
    #[arg(long, env = "TIDINGS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Open connections (streams included) the public gateway listener (--http) holds at most;
    /// past it new connections are closed at once (`tidings_http_connections_refused_total`,
    /// `reason="cap"`). Each listener has a cap of its own, so a full one locks out no other.
    #[arg(long, env = "TIDINGS_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Open connections one client address may hold on the public gateway listener (`reason="per_ip"`
    /// past it); 0, the default: no such cap (behind a proxy or a NAT many users share one address).
    #[arg(long, env = "TIDINGS_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// Open connections the HTTP ingest listener (--ingest-listen) holds at most.
    #[arg(long, env = "TIDINGS_INGEST_MAX_CONNECTIONS", default_value_t = 1_024)]
    pub ingest_max_connections: usize,
    /// Open connections the embedded schema registry's listener (--registry-listen) holds at most.
    #[arg(long, env = "TIDINGS_REGISTRY_MAX_CONNECTIONS", default_value_t = 256)]
    pub registry_max_connections: usize,
    /// Open connections the /metrics listener (--metrics-listen) holds at most.
    #[arg(long, env = "TIDINGS_METRICS_MAX_CONNECTIONS", default_value_t = 64)]
    pub metrics_max_connections: usize,
    /// Seconds a client has to send a complete request head, on every listener; for HTTP/1 this
    /// also bounds the wait for a keep-alive connection's next request.
    #[arg(long, env = "TIDINGS_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_timeout_secs: u64,
    /// Seconds a request may take from its head to its response, body read included (408
    /// beyond), on every listener and route; a stream's body is not bounded by it.
    #[arg(long, env = "TIDINGS_HTTP_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_request_timeout_secs: u64,
    /// Seconds a response write (streams included) may make no progress before its connection is
    /// closed: a client that stopped reading is cut off (`tidings_http_timeouts_total`, `kind="write"`).
    #[arg(long, env = "TIDINGS_HTTP_WRITE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_write_timeout_secs: u64,
    /// Seconds a connection may have no request in flight and write nothing before it is closed
    /// (`kind="idle"`), on every listener.
    #[arg(long, env = "TIDINGS_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_idle_timeout_secs: u64,
    /// Development mode: accept the public dev ingest token, short JWT secrets and, when no
    /// --jwt-secret or --jwt-public-key-file is set, user tokens signed with the public dev secret.
    /// Never in production: anyone can mint those.
    #[arg(long, env = "TIDINGS_DEV")]
    pub dev: bool,
    /// Listen address of the embedded schema registry (used when no --schema-registry-url).
    #[arg(long, env = "TIDINGS_REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    pub registry_listen: SocketAddr,
    /// Token every write to the embedded registry needs (register, delete, change levels), from
    /// loopback too: bearer, or basic auth's password; at least 32 characters. Unset: one is
    /// generated at each start into <data-dir>/registry-write-token (mode 0600).
    #[arg(long, env = "TIDINGS_REGISTRY_WRITE_TOKEN", hide_env_values = true)]
    pub registry_write_token: Option<String>,
    /// Host names clients reach the embedded registry by (`registry.internal`), comma-separated in
    /// the env var; besides them only localhost, loopback addresses and the listen address (any
    /// address when it is 0.0.0.0) are served: other `Host` headers get 421 (DNS rebinding).
    #[arg(long = "registry-allow-host", env = "TIDINGS_REGISTRY_ALLOW_HOSTS", value_delimiter = ',')]
    pub registry_allow_hosts: Vec<String>,
    /// Stages to run, comma-separated: templating, persistence, gateway (which includes HTTP
    /// ingest), ingest (HTTP ingest alone, no delivery: e.g. an ingest tier of its own).
    #[arg(long, env = "TIDINGS_STAGES", value_delimiter = ',', default_value = "templating,persistence,gateway")]
    pub stages: Vec<String>,
    /// Seconds to let tasks finish their work after SIGTERM before exiting anyway.
    #[arg(long, env = "TIDINGS_GRACE_SECS", default_value_t = 15)]
    pub grace_secs: u64,
    /// OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318): spans are exported as protobuf to
    /// <url>/v1/traces. Unset: no export, only the traceparent headers travel.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub sse: SseArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
}

/// The chat API's limits.
#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    /// Longest chat message, in bytes (413 beyond).
    #[arg(long, env = "TIDINGS_CHAT_MAX_TEXT_BYTES", default_value_t = 4_000)]
    pub chat_max_text_bytes: usize,
    /// Seconds after sending during which the sender may edit or delete a message.
    #[arg(long, env = "TIDINGS_CHAT_EDIT_WINDOW_SECS", default_value_t = 900)]
    pub chat_edit_window_secs: u64,
    /// Chat messages a user may send per second, sustained (429 + Retry-After beyond).
    #[arg(long, env = "TIDINGS_CHAT_RATE", default_value_t = 5)]
    pub chat_rate: u32,
    /// Chat messages a user may send in a burst, above the sustained rate.
    #[arg(long, env = "TIDINGS_CHAT_BURST", default_value_t = 20)]
    pub chat_burst: u32,
    /// Write budget per user, in tokens per second, over every chat change: send, edit, delete,
    /// read mark, join, leave, close, room creation (429 + Retry-After beyond). A change costs
    /// 1 + (room members / --chat-fanout-per-token) tokens, at most the burst.
    #[arg(long, env = "TIDINGS_CHAT_WRITE_RATE", default_value_t = 10.0)]
    pub chat_write_rate: f64,
    /// Write budget per user: tokens available at once.
    #[arg(long, env = "TIDINGS_CHAT_WRITE_BURST", default_value_t = 40)]
    pub chat_write_burst: u32,
    /// Room members per extra token a chat change costs (it fans out to every member).
    #[arg(long, env = "TIDINGS_CHAT_FANOUT_PER_TOKEN", default_value_t = 100)]
    pub chat_fanout_per_token: u64,
    /// New direct inquiries one buyer may open per --chat-inquiry-window-secs (429 beyond; asking
    /// again about the same product is not new).
    #[arg(long, env = "TIDINGS_CHAT_INQUIRIES_PER_BUYER", default_value_t = 20)]
    pub chat_inquiries_per_buyer: u32,
    /// New direct inquiries one buyer may open to one seller per --chat-inquiry-window-secs.
    #[arg(long, env = "TIDINGS_CHAT_INQUIRIES_PER_PAIR", default_value_t = 5)]
    pub chat_inquiries_per_pair: u32,
    /// The inquiry limits' window, in seconds: all of a window's inquiries at once, then refilled
    /// evenly over it.
    #[arg(long, env = "TIDINGS_CHAT_INQUIRY_WINDOW_SECS", default_value_t = 3_600)]
    pub chat_inquiry_window_secs: u64,
    /// Room history pages a user may read per second, sustained (429 + Retry-After beyond).
    #[arg(long, env = "TIDINGS_CHAT_HISTORY_RATE", default_value_t = 5.0)]
    pub chat_history_rate: f64,
    /// Room history pages a user may read in a burst.
    #[arg(long, env = "TIDINGS_CHAT_HISTORY_BURST", default_value_t = 20)]
    pub chat_history_burst: u32,
    /// Largest and default page of `GET /v1/rooms` (later pages with `?after=<next>`).
    #[arg(long, env = "TIDINGS_CHAT_ROOMS_PAGE", default_value_t = 200)]
    pub chat_rooms_page: u32,
    /// Users (and buyer-seller pairs) each chat budget remembers at most; past it the idle, then
    /// the least recently active are forgotten.
    #[arg(long, env = "TIDINGS_CHAT_TRACKED_USERS", default_value_t = 100_000)]
    pub chat_tracked_users: usize,
}

/// Delivery over SSE: who owns which partition, and the bounds that keep memory flat.
#[derive(Args, Clone, Debug)]
pub struct SseArgs {
    /// URL clients reach this gateway at; other instances redirect this instance's users here.
    /// Default: http://<bound --http address>.
    #[arg(long, env = "TIDINGS_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Origins other instances may redirect browsers to (`https://gw-1.example.com`, `https://*.gw.example.com`,
    /// `http://10.0.0.5:8080`), comma-separated in the env var. Default: this instance's own host, any port.
    #[arg(long = "redirect-allow", env = "TIDINGS_REDIRECT_ALLOW", value_delimiter = ',')]
    pub redirect_allow: Vec<String>,
    /// Origins whose pages may read the stream with credentials (CORS on `GET /v1/stream` only),
    /// besides those of --redirect-allow (peer gateways serve the page too). Same syntax.
    #[arg(long = "cors-allow-origin", env = "TIDINGS_CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,
    /// Mark the stream's session cookie `Secure`. Implied when --advertise-url is https.
    #[arg(long, env = "TIDINGS_COOKIE_SECURE")]
    pub cookie_secure: bool,
    /// `Domain` of the session cookie: the parent domain every gateway is under (`gw.example.com`),
    /// so the owner a browser is redirected to gets it. Unset: only the host that set it (any port).
    #[arg(long, env = "TIDINGS_COOKIE_DOMAIN")]
    pub cookie_domain: Option<String>,
    /// Longest life of a stream credential (the `tidings_stream` cookie of `POST /v1/session`), in
    /// seconds, at least 1; it never outlives the user token it was made from.
    #[arg(long, env = "TIDINGS_STREAM_SESSION_SECS", default_value_t = 900)]
    pub stream_session_secs: u64,
    /// Consumer group shared by all gateway instances (prefixed with the topic prefix).
    #[arg(long, env = "TIDINGS_DELIVERY_GROUP", default_value = "tidings-delivery")]
    pub delivery_group: String,
    /// Logical topic (declared in topology.yaml) where instances announce the partitions they own.
    #[arg(long, env = "TIDINGS_OWNERS_TOPIC", default_value = "tidings.gateway.owners")]
    pub owners_topic: String,
    /// Seconds between heartbeat comments on an idle stream.
    #[arg(long, env = "TIDINGS_SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub sse_heartbeat_secs: u64,
    /// Reconnect delay hinted to clients (`retry:`), in milliseconds.
    #[arg(long, env = "TIDINGS_SSE_RETRY_MS", default_value_t = 2000)]
    pub sse_retry_ms: u64,
    /// Events queued per stream before the client counts as slow and is closed.
    #[arg(long, env = "TIDINGS_SSE_QUEUE_EVENTS", default_value_t = 256)]
    pub sse_queue_events: usize,
    /// Bytes queued per stream before the client counts as slow and is closed.
    #[arg(long, env = "TIDINGS_SSE_QUEUE_BYTES", default_value_t = 256 * 1024)]
    pub sse_queue_bytes: usize,
    /// Streams per user; past it the oldest is closed.
    #[arg(long, env = "TIDINGS_SSE_MAX_PER_USER", default_value_t = 8)]
    pub sse_max_per_user: usize,
    /// Kernel send buffer per connection in bytes (SO_SNDBUF); bounds what a stalled client can
    /// park in the kernel. 0 leaves it to the kernel's autotuning (up to megabytes per connection).
    #[arg(long, env = "TIDINGS_SOCKET_SEND_BUFFER", default_value_t = 64 * 1024)]
    pub socket_send_buffer: u32,
    /// Recent events kept per owned partition for resumes.
    #[arg(long, env = "TIDINGS_RING_EVENTS", default_value_t = 4096)]
    pub ring_events: usize,
    /// Bytes of recent events kept per owned partition for resumes.
    #[arg(long, env = "TIDINGS_RING_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub ring_bytes: usize,
    /// Most events a backfill from Kafka may add to a ring, for resumes older than it (clients
    /// away while a gateway restarted); 0 sends those resumes to the store (no chat copies there).
    #[arg(long, env = "TIDINGS_RING_BACKFILL_EVENTS", default_value_t = 65536)]
    pub ring_backfill_events: usize,
}

impl SseArgs {
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            ring_events: self.ring_events,
            ring_bytes: self.ring_bytes,
            queue_events: self.sse_queue_events,
            queue_bytes: self.sse_queue_bytes,
            max_connections_per_user: self.sse_max_per_user,
            heartbeat: Duration::from_secs(self.sse_heartbeat_secs.max(1)),
            retry: Duration::from_millis(self.sse_retry_ms),
            backfill_events: self.ring_backfill_events,
            ..HubConfig::default()
        }
    }
}

/// How the gateway authenticates users (JWT). With neither a secret nor a public key, `up` refuses
/// to start unless `--dev` allows the public dev secret.
#[derive(Args, Clone, Debug)]
pub struct JwtArgs {
    /// HS256 shared secret, at least 32 bytes and not the public dev secret (both allowed only with
    /// --dev). Needed (or --jwt-public-key-file) unless --dev, which then accepts the public dev
    /// secret `tidings-dev-secret`.
    #[arg(long, env = "TIDINGS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key: RS256 for an RSA key, ES256 for an EC P-256 key.
    #[arg(long, env = "TIDINGS_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "TIDINGS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "TIDINGS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Secret the stream credentials of `POST /v1/session` are signed with (a key derived from
    /// it), at least 32 characters, the same on every gateway; it verifies no user token. Unset:
    /// derived from --jwt-secret; with only --jwt-public-key-file, browser sessions answer 501.
    #[arg(long, env = "TIDINGS_STREAM_SECRET", hide_env_values = true)]
    pub stream_secret: Option<String>,
}

impl JwtArgs {
    /// The gateway's auth settings; the dev secret only in dev mode (with a warning).
    pub fn auth_config(&self, dev: bool) -> anyhow::Result<AuthConfig> {
        let mut keys = Vec::new();
        if let Some(secret) = &self.jwt_secret {
            keys.push(Key::hs256(secret.as_bytes()));
        }
        if let Some(path) = &self.jwt_public_key_file {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let key = Key::from_public_pem(&pem).with_context(|| format!("loading {}", path.display()))?;
            info!("Gateway accepts {:?} tokens signed for the key in {}.", key.algorithm(), path.display());
            keys.push(key);
        }
        if keys.is_empty() && !dev {
            bail!(
                "the gateway has no key to check user tokens with: set --jwt-secret (TIDINGS_JWT_SECRET) or \
                 --jwt-public-key-file, or pass --dev to accept tokens signed with the public dev secret \
                 (local development only)"
            );
        }
        if keys.is_empty() {
            tracing::warn!(
                "No --jwt-secret or --jwt-public-key-file: the gateway accepts HS256 tokens signed with the \
                 built-in dev secret {:?}. Anyone can mint those; set TIDINGS_JWT_SECRET outside local dev.",
                auth::DEV_SECRET
            );
            keys.push(Key::hs256(auth::DEV_SECRET.as_bytes()));
        }
        match &self.stream_secret {
            Some(s) => {
                settings::check_stream_secret(s)
                    .map_err(|e| anyhow::anyhow!("--stream-secret (TIDINGS_STREAM_SECRET) {e}"))?;
                keys.push(Key::stream_only(s.as_bytes()));
            }
            None if self.jwt_secret.is_none() && self.jwt_public_key_file.is_some() => tracing::warn!(
                "No --stream-secret and no --jwt-secret: browsers cannot open stream sessions (POST /v1/session \
                 answers 501); set TIDINGS_STREAM_SECRET, the same on every gateway."
            ),
            None => {}
        }
        Ok(AuthConfig { issuer: self.jwt_issuer.clone(), audience: self.jwt_audience.clone(), keys })
    }
}

/// The web page's settings: the kinds to listen for, dev sign-in when `--dev` and no key of its
/// own (then the public dev secret is the gateway's only key, so the tokens it signs verify), and
/// the gateways its stream may be redirected to.
fn web_config(topo: &Topology, args: &UpArgs, gateways: Vec<String>) -> WebConfig {
    let mut kinds: Vec<String> = topo.templates.iter().map(|t| t.kind.clone()).collect();
    kinds.sort();
    kinds.dedup();
    let dev_key = args.dev && args.jwt.jwt_secret.is_none() && args.jwt.jwt_public_key_file.is_none();
    let dev_sign_in =
        dev_key.then(|| DevSignIn { issuer: args.jwt.jwt_issuer.clone(), audience: args.jwt.jwt_audience.clone() });
    WebConfig { kinds, dev_sign_in, gateways }
}

pub(crate) fn load_topology(infra: &Infra) -> anyhow::Result<Topology> {
    let topo = Topology::load(&infra.topology)
        .map_err(|errs| anyhow::anyhow!("{} is invalid:\n{errs}", infra.topology.display()))?;
    Ok(match &infra.topic_prefix {
        Some(p) => topo.with_prefix(p),
        None => topo,
    })
}

async fn shutdown_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received; finishing in-flight work, then exiting."),
        _ = tokio::signal::ctrl_c() => info!("Ctrl-C received; finishing in-flight work, then exiting."),
        _ = token.cancelled() => {}
    }
    token.cancel();
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    // Every setting first, all refusals at once, before anything is created, written or bound.
    let settings = match settings::check(&args) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("error: `tidings up` refuses {} setting(s); nothing was started:", errors.len());
            for e in &errors {
                eprintln!("  - {e}");
            }
            return Ok(ExitCode::from(settings::EX_USAGE));
        }
    };
    for w in &args.config_file.warnings {
        tracing::warn!("{w}");
    }
    // The recorder first: a metric handle taken before it exists records nowhere, and the stages
    // take theirs when they start (templating's and persistence's were missing from /metrics).
    tidings_gateway::metrics::install();
    let topo = Arc::new(settings.topology);
    std::fs::create_dir_all(&args.infra.data_dir)
        .with_context(|| format!("creating {}", args.infra.data_dir.display()))?;
    let database_url = settings.database_url;
    let store = Store::connect(&database_url).await.with_context(|| format!("opening the store at {database_url}"))?;
    info!(backend = store.backend(), "Store ready at {database_url}.");

    let token = CancellationToken::new();
    let mut tasks = TaskTree::new(token.clone());
    // The same timeouts on every listener, and a connection cap for each: clients that fill the
    // public one must not lock services out of ingest or the registry.
    let http_limits = |name: &'static str, max_connections: usize| tidings_gateway::Limits {
        header_timeout: Duration::from_secs(args.http_header_timeout_secs),
        request_timeout: Duration::from_secs(args.http_request_timeout_secs),
        write_timeout: Duration::from_secs(args.http_write_timeout_secs),
        idle_timeout: Duration::from_secs(args.http_idle_timeout_secs),
        ..tidings_gateway::Limits::new(max_connections).named(name)
    };
    let readiness = Readiness::default();

    // Schema registry: external by URL, or the embedded one on its own listener.
    let (registry_url, registry) = match settings.external_registry {
        Some(endpoint) => (endpoint.url.clone(), endpoint),
        None => {
            let registry = tidings_pipeline::registry::Registry::open(store.clone())
                .await
                .context("opening the embedded schema registry")?;
            let listener = tokio::net::TcpListener::bind(args.registry_listen)
                .await
                .with_context(|| format!("binding the schema registry to {}", args.registry_listen))?;
            let addr = listener.local_addr()?;
            let write_token = registry_write_token(settings.registry_write_token, &args.infra.data_dir)?;
            let access = Access::new(write_token.clone(), args.registry_allow_hosts.iter().cloned());
            let (t, limits) = (token.clone(), http_limits("registry", args.registry_max_connections));
            tasks.spawn("schema-registry", async move {
                tidings_pipeline::registry::serve_with(listener, registry, access, limits, t).await
            });
            info!("Embedded schema registry listening on http://{addr}.");
            let url = format!("http://{addr}");
            // This process registers the topology's schemas with it like any other writer.
            let endpoint =
                RegistryEndpoint { url: url.clone(), basic_auth: None, bearer_token: Some(write_token), ca_pem: None };
            (url, endpoint)
        }
    };

    // Kafka: external brokers, or an in-process mock cluster whose listener other clients can use.
    let mock: Option<MockCluster<'static, _>>;
    let brokers = match &args.infra.brokers {
        Some(b) => {
            mock = None;
            b.clone()
        }
        None => {
            let m = MockCluster::new(1).context("starting the embedded Kafka mock cluster")?;
            let b = m.bootstrap_servers();
            // The mock cluster starts empty every time; offsets a previous run stored with its
            // rows would point past the end of the new topics and hide their first records.
            let forgotten = store.forget_offsets(&topo.group_name(&topo.stages.persistence.group)).await?;
            if forgotten > 0 {
                info!("Embedded Kafka starts empty; forgot {forgotten} offset(s) stored by the previous run (stored rows stay).");
            }
            let report = topology::apply::apply_mock(&topo, &m)
                .map_err(|e| anyhow::anyhow!("creating topics on the mock cluster: {e}"))?;
            info!("Embedded Kafka (librdkafka mock cluster, for development: it slows under sustained load, use --brokers for that) at {b}; {report}");
            mock = Some(m);
            b
        }
    };
    let mut kafka = settings.kafka;
    kafka.brokers = brokers.clone();
    if mock.is_some() {
        // A fetch that finds nothing waits out its whole wait on the mock cluster, even if records
        // arrive meanwhile (Kafka answers as soon as they do), so the wait is delivery latency
        // here. Not what makes the mock slow under sustained load: each fetch that returns a batch
        // walks the partition's in-memory log from its start (README, Gateway benchmark).
        kafka.tuned.push(("fetch.wait.max.ms".into(), "5".into()));
    } else {
        // A wrong password or CA fails here, at once and clearly, instead of in every stage.
        let probe_cfg = kafka.clone();
        tokio::task::spawn_blocking(move || tidings_core::kafka::probe(&probe_cfg, Duration::from_secs(30)))
            .await
            .context("Kafka connection probe")??;
        info!("Connected to Kafka at {brokers}.");
        let admin: AdminClient<DefaultClientContext> = kafka.admin().create()?;
        let report = topology::apply::apply(&topo, &admin, Duration::from_secs(30))
            .await
            .map_err(|e| anyhow::anyhow!("applying the topology: {e}"))?;
        info!("Topology applied: {report}");
    }

    // Every topic with a schema has it registered under <topic>-value, so ingest and producers find it.
    let client = RegistryClient::new(&registry)?;
    for (logical, _) in topo.topics.iter() {
        if let Some(text) = topo.schema_text(logical) {
            let subject = format!("{}-value", topo.topic_name(logical));
            let id = register_with_retry(&client, &subject, text, &topo, logical).await?;
            info!("Schema for {subject} registered as id {id}.");
        }
    }

    let run = |name: &str| args.stages.iter().any(|s| s == name);
    if run("templating") {
        let cfg = TemplatingConfig::new(kafka.clone(), registry.clone(), topo.clone());
        readiness.set_check("templating", templating::spawn(&mut tasks, cfg, store.clone()));
    }
    if run("persistence") {
        let cfg = PersistenceConfig::new(kafka.clone(), registry.clone(), &topo);
        readiness.set_check("persistence", persistence::spawn(&mut tasks, cfg, store.clone()));
    }
    let (mut http, mut ingest_url) = (String::new(), String::new());
    // The gateway needs keys to check user tokens; ingest alone uses them, when it has them, only
    // to tell a user token (403) from an unknown one (401).
    let auth = if run("gateway") || run("ingest") { settings.auth.map(Arc::new) } else { None };
    // One producer of schema-checked JSON events for ingest and the chat API.
    let events = if run("gateway") || run("ingest") {
        let producer: FutureProducer<ClientStats> =
            reporting(kafka.producer()).create_with_context(ClientStats::new("ingest-producer"))?;
        Some(Arc::new(EventProducer::new(client.clone(), producer)))
    } else {
        None
    };
    if let (true, Some(events)) = (run("gateway") || run("ingest"), &events) {
        let topics: HashMap<String, IngestTopic> = topo
            .topics
            .iter()
            // Chat events come only from the chat API, which checks membership and the sender.
            .filter(|(name, _)| topo.stages.templating.inputs.contains(name) && name.as_str() != "chat")
            .map(|(name, spec)| {
                (name.clone(), IngestTopic { physical: topo.topic_name(name), key_field: spec.key.clone() })
            })
            .collect();
        let tokens = settings.ingest_tokens;
        if tokens.is_empty() {
            info!("HTTP ingest is off: no --ingest-token (TIDINGS_INGEST_TOKENS) is set.");
        } else {
            let ingest = Arc::new(IngestState { topics, events: events.clone(), tokens, users: auth.clone() });
            let listener = tidings_gateway::bind(args.ingest_listen, None)
                .with_context(|| format!("binding HTTP ingest to {}", args.ingest_listen))?;
            ingest_url = format!("http://{}", listener.local_addr()?);
            let app = tidings_gateway::ingest_app(ingest, readiness.clone());
            let t = token.clone();
            let limits = http_limits("ingest", args.ingest_max_connections);
            tasks.spawn("ingest", async move { tidings_gateway::serve(listener, app, limits, t).await });
            info!("HTTP ingest for services listening on {ingest_url} (POST /v1/events/{{topic}}, service token required).");
        }
    }
    if let (true, Some(auth), Some(events)) = (run("gateway"), auth, events) {
        let inbox = InboxState { store: store.clone(), auth: auth.clone() };
        let chat = {
            let mut cfg = ChatConfig::new(
                topo.topic_name("chat"),
                topo.group_name(&topo.stages.persistence.group),
                topo.topic_name(&topo.stages.templating.output),
            );
            cfg.max_text_bytes = args.chat.chat_max_text_bytes;
            cfg.edit_window = Duration::from_secs(args.chat.chat_edit_window_secs);
            cfg.send_rate = (args.chat.chat_rate, args.chat.chat_burst);
            cfg.write_rate = (args.chat.chat_write_rate, args.chat.chat_write_burst);
            cfg.fanout_per_token = args.chat.chat_fanout_per_token;
            cfg.inquiries_per_buyer = args.chat.chat_inquiries_per_buyer;
            cfg.inquiries_per_pair = args.chat.chat_inquiries_per_pair;
            cfg.inquiry_window = Duration::from_secs(args.chat.chat_inquiry_window_secs);
            cfg.history_rate = (args.chat.chat_history_rate, args.chat.chat_history_burst);
            cfg.rooms_page = args.chat.chat_rooms_page;
            cfg.tracked_users = args.chat.chat_tracked_users;
            // Watermarks only: it never joins a group nor reads.
            let watermarks =
                kafka.consumer_with(&format!("{}-watermarks", topo.group_name("chat-api")), &[], &[]).create()?;
            ChatState::new(store.clone(), auth.clone(), events, cfg, watermarks)
        };
        let send_buffer = (args.sse.socket_send_buffer > 0).then_some(args.sse.socket_send_buffer);
        let listener = tidings_gateway::bind(args.http, send_buffer)
            .with_context(|| format!("binding the gateway to {}", args.http))?;
        let addr = listener.local_addr()?;
        http = format!("http://{addr}");
        let advertised = args.sse.advertise_url.clone().unwrap_or_else(|| http.clone());

        // Delivery: this instance's share of the notifications partitions, streamed over SSE.
        let notifications = topo.topic_name(&topo.stages.templating.output);
        let persistence_group = topo.group_name(&topo.stages.persistence.group);
        let resume = StoreResume { store: store.clone(), group: persistence_group, topic: notifications.clone() };
        // Resumes older than a ring are backfilled from the notifications topic itself.
        let log = LogSource {
            kafka: kafka.clone(),
            registry: RegistryClient::new(&registry).context("the schema registry client of backfills")?,
            topic: notifications.clone(),
            group: topo.group_name(&format!("{}-backfill", args.sse.delivery_group)),
        };
        let hub = Hub::with_log(args.sse.hub_config(), Some(resume), Some(log));
        let allow = settings.redirect_allow;
        let gateways = allow.origins();
        let owners = Owners::with_allow(&advertised, &notifications, allow);
        let dcfg = DeliveryConfig::new(
            kafka.clone(),
            registry.clone(),
            notifications,
            topo.group_name(&args.sse.delivery_group),
            topo.topic_name(&args.sse.owners_topic),
        );
        readiness.set_check("delivery", delivery::spawn(&mut tasks, dcfg, hub.clone(), owners.clone()));
        let browser = BrowserAccess {
            cors_allow: settings.cors_allow,
            cookie_secure: args.sse.cookie_secure || advertised.starts_with("https://"),
            cookie_domain: args.sse.cookie_domain.clone(),
            session_ttl: Duration::from_secs(args.sse.stream_session_secs.max(1)),
        };
        let stream = StreamState { hub, owners, auth, browser: Arc::new(browser) };
        let app = tidings_gateway::app(
            Parts {
                inbox: Some(inbox),
                chat: Some(chat),
                stream: Some(stream.clone()),
                metrics_elsewhere: args.metrics_listen.is_some(),
                web: Some(web_config(&topo, &args, gateways)),
            },
            readiness.clone(),
        );
        readiness.set("gateway", true);
        if let Some(addr) = args.metrics_listen {
            let listener = tidings_gateway::bind(addr, None).with_context(|| format!("binding /metrics to {addr}"))?;
            info!("Prometheus /metrics on http://{} only.", listener.local_addr()?);
            let (t, limits) = (token.clone(), http_limits("metrics", args.metrics_max_connections));
            tasks.spawn("metrics", async move {
                tidings_gateway::serve(listener, tidings_gateway::metrics_app(), limits, t).await
            });
        }
        let t = token.clone();
        let limits = http_limits("public", args.max_connections).per_ip(args.max_connections_per_ip);
        tasks.spawn(
            "gateway",
            async move { tidings_gateway::serve_gateway(listener, app, Some(stream), limits, t).await },
        );
        info!(
            "Gateway listening on {http}, advertised as {advertised} (GET /v1/stream, GET /v1/notifications, \
             GET /healthz, /readyz, /metrics); the web page at {http}/."
        );
    }

    Endpoints {
        brokers: brokers.clone(),
        schema_registry_url: registry_url.clone(),
        database_url: database_url.clone(),
        http: http.clone(),
        ingest: ingest_url.clone(),
        // The dev token is public anyway; real tokens are never written to disk.
        ingest_token: args.dev.then(|| tidings_gateway::service_auth::DEV_SERVICE_TOKEN.to_string()),
        topic_prefix: topo.topic_prefix.clone(),
    }
    .write(&args.infra.data_dir)?;
    println!("tidings is up.");
    println!(
        "  Kafka bootstrap:  {brokers}{}",
        if mock.is_some() { "   (embedded mock cluster; any Kafka client can produce here)" } else { "" }
    );
    println!("  Schema registry:  {registry_url}");
    println!("  Store:            {database_url}");
    if !http.is_empty() {
        println!("  Gateway:          {http}");
    }
    if !ingest_url.is_empty() {
        println!("  Ingest (services): {ingest_url}");
    }
    println!("Try `tidings demo` in another terminal, then `tidings inbox --user u0001`.");

    tokio::spawn(shutdown_signal(token.clone()));
    let failures = tasks.run(Duration::from_secs(args.grace_secs)).await;
    drop(mock);
    if failures.is_empty() {
        info!("tidings stopped cleanly.");
        Ok(ExitCode::SUCCESS)
    } else {
        for (name, e) in &failures {
            eprintln!("error: {name}: {e}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// The registry may be starting (embedded) or briefly unreachable (external): retry only that.
/// Without write credentials, a schema already registered as the subject's latest version will
/// do (a gateway beside the process that registered it needs only reads).
async fn register_with_retry(
    client: &RegistryClient,
    subject: &str,
    text: &str,
    topo: &Topology,
    logical: &str,
) -> anyhow::Result<u32> {
    let mut delay = Duration::from_millis(200);
    for _ in 0..10 {
        match client.register(subject, text).await {
            Ok(id) => return Ok(id),
            // Wrong credentials are a configuration error, not an outage: no retry.
            Err(e @ tidings_core::RegistryError::Unauthorized(..)) => {
                if let (Ok((id, latest)), Some(ours)) = (client.latest(subject).await, topo.schema(logical)) {
                    if latest.canonical_form() == ours.canonical_form() {
                        info!("Not allowed to register {subject} ({e}), but its latest version is this schema.");
                        return Ok(id);
                    }
                }
                return Err(anyhow::anyhow!("registering {subject}: {e}"));
            }
            Err(e) if e.is_retriable() => {
                tracing::warn!(error = %e, "Schema registry not reachable; retrying in {delay:?}.");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(anyhow::anyhow!("registering {subject}: {e}")),
        }
    }
    bail!("schema registry at {} unreachable", client.url())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream secret under 32 characters is refused; a long enough one signs stream credentials
    /// that another gateway with the same one takes, whatever its user-token keys.
    #[test]
    fn the_stream_secret_is_checked_and_shared() {
        #[derive(clap::Parser)]
        struct Jwt {
            #[command(flatten)]
            jwt: JwtArgs,
        }
        let config = |args: &[&str]| {
            <Jwt as clap::Parser>::try_parse_from([&["tidings"], args].concat()).unwrap().jwt.auth_config(true)
        };
        let short = "s".repeat(31);
        let err = config(&["--stream-secret", &short]).unwrap_err();
        assert!(err.to_string().contains("--stream-secret"), "{err}");
        let secret = "s".repeat(32);
        let a = config(&["--stream-secret", &secret]).unwrap();
        let b = config(&["--stream-secret", &secret, "--jwt-secret", "another-user-token-secret"]).unwrap();
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60;
        assert_eq!(b.verify_stream(&a.mint_stream("alice", exp).unwrap()).unwrap(), "alice");
        let c = config(&["--stream-secret", &"t".repeat(32)]).unwrap();
        assert!(c.verify_stream(&a.mint_stream("alice", exp).unwrap()).is_err());
    }

    /// A gateway beside the process that serves the embedded registry has no write token: the
    /// schemas that process registered will do, and only those.
    #[tokio::test]
    async fn without_write_credentials_only_an_already_registered_schema_will_do() {
        let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
        let registry = tidings_pipeline::registry::Registry::open(store).await.unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
        let topo = Topology::load(&path).unwrap();
        let subject = format!("{}-value", topo.topic_name("orders"));
        let (orders, coupons) = (topo.schema_text("orders").unwrap(), topo.schema_text("coupons").unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let (access, limits) = (Access::new("t".repeat(32), []), tidings_core::http::Limits::default());
        let server =
            tidings_pipeline::registry::serve_with(listener, registry.clone(), access, limits, shutdown.clone());
        tokio::spawn(server);
        let client = RegistryClient::new(&url).unwrap();

        let refused = register_with_retry(&client, &subject, orders, &topo, "orders").await;
        assert!(refused.is_err(), "registered without the write token: {refused:?}");
        let id = registry.register(&subject, orders).await.unwrap();
        assert_eq!(register_with_retry(&client, &subject, orders, &topo, "orders").await.unwrap(), id);
        let other = register_with_retry(&client, &subject, coupons, &topo, "coupons").await;
        assert!(other.is_err(), "another schema passed as the registered one: {other:?}");
        shutdown.cancel();
    }
}
