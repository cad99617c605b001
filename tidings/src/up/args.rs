//! `tidings up`'s flags (each with its env var and a config-file key of the same name), and
//! what they turn into: the hub's bounds, the user-token keys, the listeners' limits.

use anyhow::{bail, Context};
use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;
use tidings_gateway::auth::{self, Key};
use tidings_gateway::delivery::HubConfig;
use tidings_gateway::AuthConfig;
use tracing::info;

use crate::settings;
use crate::Infra;

/// Where a process without the gateway serves `/metrics` when `--metrics-listen` is unset (the
/// port OpenTelemetry and Prometheus exporters conventionally use).
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9464));

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
    /// the public gateway port. A process without the gateway (e.g. `--stages templating`) serves
    /// `/metrics`, `/healthz` and `/readyz` here, on 127.0.0.1:9464 when unset (if another process
    /// already holds that default port, with a warning, on none).
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
    /// ingest and, when the topology declares its topics, the coupon API), ingest (HTTP ingest
    /// alone, no delivery: e.g. an ingest tier of its own), claims (the coupon claim stage:
    /// `coupon-claims` decided into `coupons`), scheduler (releases what templating holds on
    /// `tidings.scheduled`, quiet hours and scheduled campaigns, at its time).
    #[arg(
        long,
        env = "TIDINGS_STAGES",
        value_delimiter = ',',
        default_value = "templating,persistence,gateway,claims,scheduler"
    )]
    pub stages: Vec<String>,
    /// Testing only, needs --dev: the scheduler stage reads "now" from this file at every tick (an
    /// RFC 3339 time or integer microseconds since the epoch) instead of the system clock, so a
    /// test moves time past a release by writing it.
    #[arg(long, env = "TIDINGS_CLOCK_FILE")]
    pub clock_file: Option<std::path::PathBuf>,
    /// Seconds to let tasks finish their work after SIGTERM before exiting anyway.
    #[arg(long, env = "TIDINGS_GRACE_SECS", default_value_t = 15)]
    pub grace_secs: u64,
    /// OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318): spans are exported as protobuf to
    /// <url>/v1/traces. Unset: no export, only the traceparent headers travel.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// User ids (`sub` of their tokens) that may read `GET /v1/status` and see the web page's
    /// Status view; comma-separated in the env var. Default: none (services only).
    #[arg(long = "admin-user", env = "TIDINGS_ADMIN_USERS", value_delimiter = ',')]
    pub admin_users: Vec<String>,
    /// Seconds of lag samples `GET /v1/status` judges each group's state over.
    #[arg(long, env = "TIDINGS_STATUS_WINDOW_SECS", default_value_t = 60)]
    pub status_window_secs: u64,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub sse: SseArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    #[command(flatten)]
    pub coupons: CouponArgs,
    #[command(flatten)]
    pub segments: crate::segment::SegmentApiArgs,
    #[command(flatten)]
    pub campaigns: crate::campaign::CampaignApiArgs,
}

/// The coupon API's waits and bound.
#[derive(Args, Clone, Debug)]
pub struct CouponArgs {
    /// Milliseconds `POST /v1/coupons/{id}/claims` (and `POST /v1/coupons`) waits for the claim
    /// stage's decision before answering 202 with where to ask later.
    #[arg(long, env = "TIDINGS_COUPON_CLAIM_WAIT_MS", default_value_t = 500)]
    pub coupon_claim_wait_ms: u64,
    /// Milliseconds `POST /v1/coupons/{id}/redemptions` waits for the claim stage's decision
    /// before answering 503 `decision_pending` (a retry with the same code and order_id gets it).
    #[arg(long, env = "TIDINGS_COUPON_REDEMPTION_WAIT_MS", default_value_t = 5_000)]
    pub coupon_redemption_wait_ms: u64,
    /// Coupon requests waiting for their decision at most, per gateway; past it a claim answers
    /// 202 at once and a redemption 503 `decision_pending` without being produced.
    #[arg(long, env = "TIDINGS_COUPON_MAX_WAITING", default_value_t = 10_000)]
    pub coupon_max_waiting: usize,
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
    /// Campaigns whose delivered counts (campaign notifications written to streams, added to the
    /// store every second) this gateway keeps at once; past it the least recently seen campaign's
    /// count is written and forgotten.
    #[arg(long, env = "TIDINGS_CAMPAIGN_COUNTS_MAX", default_value_t = 1000)]
    pub campaign_counts_max: usize,
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
            max_campaigns: self.campaign_counts_max,
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

impl UpArgs {
    /// Whether `--stages` names `stage`.
    pub fn runs(&self, stage: &str) -> bool {
        self.stages.iter().any(|s| s == stage)
    }

    /// The same timeouts on every listener, and a connection cap for each: clients that fill the
    /// public one must not lock services out of ingest or the registry.
    pub fn http_limits(&self, name: &'static str, max_connections: usize) -> tidings_gateway::Limits {
        tidings_gateway::Limits {
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            request_timeout: Duration::from_secs(self.http_request_timeout_secs),
            write_timeout: Duration::from_secs(self.http_write_timeout_secs),
            idle_timeout: Duration::from_secs(self.http_idle_timeout_secs),
            ..tidings_gateway::Limits::new(max_connections).named(name)
        }
    }
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
}
