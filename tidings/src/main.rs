//! The `tidings` command: `up` runs every stage (on embedded defaults unless pointed at real
//! infrastructure), `topology` checks and applies `topology.yaml`, `produce` and `demo` send
//! events, `inbox` reads the store, `segment` loads campaign audiences and `campaign` launches,
//! lists, shows and cancels campaigns.

mod audit;
mod campaign;
mod config_file;
mod coupon_create;
mod coupon_verify;
mod demo;
mod dlq;
mod endpoints;
mod offsets;
mod replay;
mod segment;
mod settings;
mod status;
mod tools;
mod up;

use clap::{Args, CommandFactory, Parser, Subcommand};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tidings", version, about = "Kafka-native notifications: Avro events → templates → PostgreSQL → SSE.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the infrastructure is. Every flag has an env var; unset means "use the embedded default".
#[derive(Args, Clone, Debug)]
pub struct Infra {
    /// Kafka bootstrap servers. Default: an in-process mock cluster (`up`) or the one `up` started.
    #[arg(long, env = "TIDINGS_BROKERS")]
    pub brokers: Option<String>,
    /// postgres://… or sqlite:… Default: sqlite://<data-dir>/tidings.db.
    #[arg(long, env = "TIDINGS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// URL of a Confluent-compatible schema registry. Default: the embedded one.
    #[arg(long, env = "TIDINGS_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// The topology file.
    #[arg(long, env = "TIDINGS_TOPOLOGY", default_value = "topology.yaml")]
    pub topology: PathBuf,
    /// Prefix for every topic and consumer group (isolates test runs on a shared broker).
    #[arg(long, env = "TIDINGS_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// Extra librdkafka property for every client, `key=value`, repeatable (e.g.
    /// `group.instance.id=pipeline-1` for static membership, `session.timeout.ms=6000`).
    #[arg(long = "kafka-opt", env = "TIDINGS_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_kafka_opt)]
    pub kafka_opts: Vec<(String, String)>,
    /// Kafka `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "TIDINGS_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,
    /// Kafka `sasl.mechanism`: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER.
    #[arg(long, env = "TIDINGS_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    /// Kafka `sasl.username`.
    #[arg(long, env = "TIDINGS_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// Kafka `sasl.password`; prefer the env var (a flag shows in `ps`).
    #[arg(long, env = "TIDINGS_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// Kafka `ssl.ca.location`: PEM file of the CA(s) that signed the brokers' certificates
    /// (default: the system trust store).
    #[arg(long, env = "TIDINGS_KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<PathBuf>,
    /// Schema registry HTTP basic credentials `user:password` (Confluent Cloud: API key:secret).
    #[arg(long, env = "TIDINGS_SCHEMA_REGISTRY_BASIC_AUTH", hide_env_values = true)]
    pub schema_registry_basic_auth: Option<String>,
    /// Schema registry bearer token.
    #[arg(long, env = "TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN", hide_env_values = true)]
    pub schema_registry_bearer_token: Option<String>,
    /// Extra CA certificate (PEM) to trust for an https schema registry.
    #[arg(long, env = "TIDINGS_SCHEMA_REGISTRY_CA_FILE")]
    pub schema_registry_ca_file: Option<PathBuf>,
    /// Directory for the embedded store and the endpoints file.
    #[arg(long, env = "TIDINGS_DATA_DIR", default_value = "tidings-data")]
    pub data_dir: PathBuf,
}

fn parse_kafka_opt(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

impl Infra {
    /// Kafka settings for `brokers`: the security flags and the `--kafka-opt` properties, which
    /// win over every default; pinned or repeated keys are refused, all of them at once.
    pub fn kafka(&self, brokers: String) -> anyhow::Result<tidings_core::kafka::KafkaConfig> {
        let mut opts: Vec<(String, String)> = [
            ("security.protocol", self.kafka_security_protocol.clone()),
            ("sasl.mechanism", self.kafka_sasl_mechanism.clone()),
            ("sasl.username", self.kafka_sasl_username.clone()),
            ("sasl.password", self.kafka_sasl_password.clone()),
            ("ssl.ca.location", self.kafka_ssl_ca_location.as_ref().map(|p| p.display().to_string())),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
        opts.extend(self.kafka_opts.iter().cloned());
        Ok(tidings_core::kafka::KafkaConfig::with_opts(brokers, opts)?)
    }

    /// The registry at `url` with the credentials and CA given by flags.
    pub fn registry(&self, url: String) -> anyhow::Result<tidings_core::RegistryEndpoint> {
        let basic_auth = match &self.schema_registry_basic_auth {
            Some(s) => match s.split_once(':') {
                Some((u, p)) => Some((u.to_string(), p.to_string())),
                None => anyhow::bail!("--schema-registry-basic-auth must be user:password"),
            },
            None => None,
        };
        let ca_pem = match &self.schema_registry_ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?),
            None => None,
        };
        Ok(tidings_core::RegistryEndpoint {
            url,
            basic_auth,
            bearer_token: self.schema_registry_bearer_token.clone(),
            ca_pem,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: registry, templating, persistence and the HTTP gateway.
    Up(up::UpArgs),
    /// Check or apply topology.yaml.
    #[command(subcommand)]
    Topology(TopologyCmd),
    /// Define coupons and check the claim stage's decisions.
    #[command(subcommand)]
    Coupon(CouponCmd),
    /// Produce JSON events (one per line on stdin) to a topic as Avro through the registry.
    Produce {
        /// Logical topic name from topology.yaml (e.g. orders).
        topic: String,
        #[command(flatten)]
        infra: Infra,
    },
    /// Print a tidings.toml for `tidings up --config`: every key, commented out at its default.
    ConfigExample,
    /// Send a realistic mixed stream of order, coupon and chat events through the HTTP ingest.
    Demo(demo::DemoArgs),
    /// Show a user's stored notifications, newest first.
    Inbox {
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        infra: Infra,
    },
    /// Count stored notifications.
    Stats {
        #[command(flatten)]
        infra: Infra,
    },
    /// Print an HS256 token for a user, signed with the gateway's secret (dev default if unset).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Lifetime of the token in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// HS256 secret; default: the dev secret `tidings up` uses when none is given.
        #[arg(long, env = "TIDINGS_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
        /// `iss` claim to include.
        #[arg(long, env = "TIDINGS_JWT_ISSUER")]
        jwt_issuer: Option<String>,
        /// `aud` claim to include.
        #[arg(long, env = "TIDINGS_JWT_AUDIENCE")]
        jwt_audience: Option<String>,
    },
    /// Audience segments for campaigns: import (replace) from CSV, append, remove, list, show, delete.
    #[command(subcommand)]
    Segment(segment::SegmentCmd),
    /// Campaigns: launch (or --dry-run), list, show, cancel.
    #[command(subcommand)]
    Campaign(campaign::CampaignCmd),
    /// Dead letters: list (counts by reason and source), show (decoded), replay (re-drive after
    /// a fix, dry run unless --execute), purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// The stage groups' offsets: show them (state, members, lag), reset an idle group's.
    #[command(subcommand)]
    Offsets(offsets::OffsetsCmd),
    /// Completeness of a time range, per bucket: records in, stored, delivery-only, dead-lettered,
    /// in flight and missing (exit 3 when any is missing).
    Audit(audit::AuditArgs),
    /// Replay a time or offset range of a topic through a stage beside the running stages
    /// (dry run unless --execute); `replay list` shows the recorded replays.
    Replay(replay::ReplayCmd),
    /// The system at a glance: topology, instances and the partitions they own, lag and state per
    /// group over a window (OK, lagging, stalled, stopped), dead letters by reason, streams per
    /// gateway. Exit 3 when any group is not OK.
    Status(status::StatusArgs),
}

#[derive(Subcommand)]
enum CouponCmd {
    /// Define a coupon: its CouponDefined record produced to `coupon-claims`, checked as `POST /v1/coupons`
    /// checks it (exit 64 naming every bad flag).
    Create(coupon_create::CreateArgs),
    /// Re-read the coupon-claims log and the decisions on `coupons` (start to current end) and the
    /// store's claim tables, and check every invariant of the claim stage; exit 1 on a violation, 2 if it cannot read them.
    /// Run it when the stage has decided the log to its end (a claim not yet decided counts).
    Verify {
        /// Check only this coupon id.
        #[arg(long)]
        coupon: Option<String>,
        #[command(flatten)]
        infra: Infra,
    },
}

#[derive(Subcommand)]
enum TopologyCmd {
    /// Report every error in the topology file at once.
    Check {
        #[arg(long, env = "TIDINGS_TOPOLOGY", default_value = "topology.yaml")]
        topology: PathBuf,
    },
    /// Create or grow the declared topics; report drift that cannot be fixed.
    Apply {
        #[command(flatten)]
        infra: Infra,
    },
}

/// Default log filter when TIDINGS_LOG is unset.
const DEFAULT_LOG: &str = "info,librdkafka=warn,rdkafka=warn,sqlx=warn";

/// Logs to stderr; with an OTLP endpoint, also exports tidings' spans (`send {topic}`,
/// `process {topic}`, `sse write`; see tidings_core::trace) through a batch processor. Returns
/// the provider to flush on exit.
fn init_tracing(otlp_endpoint: Option<&str>) -> anyhow::Result<Option<SdkTracerProvider>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("TIDINGS_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let env = |k: &str| std::env::var(k).ok();
    let export = otlp_traces_url(otlp_endpoint, env);
    let Some(url) = export.url else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
        export.warnings.iter().for_each(|w| tracing::warn!("{w}"));
        return Ok(None);
    };
    // The sampler follows OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, which the SDK reads.
    let provider = otlp_provider(&url)?;
    tidings_core::trace::install_propagator();
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
        .with(tidings_core::trace::otel_layer(provider.tracer("tidings")))
        .init();
    export.warnings.iter().for_each(|w| tracing::warn!("{w}"));
    tracing::info!("Exporting spans over OTLP/HTTP to {url}.");
    Ok(Some(provider))
}

/// Where spans go, and what in the variables was ignored.
#[derive(Debug, PartialEq)]
struct TracesExport {
    url: Option<String>,
    warnings: Vec<String>,
}

/// The spec's OTLP/HTTP traces endpoint when OTEL_TRACES_EXPORTER=otlp names none.
const DEFAULT_OTLP_TRACES: &str = "http://localhost:4318/v1/traces";

/// Where spans go, from the standard variables (`env`) the SDK leaves to its caller: nowhere with
/// OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none; else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
/// as is (it wins, per the OTel spec), else `<endpoint>/v1/traces`; else, only with an explicit
/// OTEL_TRACES_EXPORTER=otlp, the spec's default endpoint. Off unless asked for.
fn otlp_traces_url(endpoint: Option<&str>, env: impl Fn(&str) -> Option<String>) -> TracesExport {
    let mut warnings = Vec::new();
    let var = |k: &str| env(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let off = TracesExport { url: None, warnings: Vec::new() };
    match var("OTEL_SDK_DISABLED").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "true" => return off,
        Some(v) if v != "false" => warnings.push(format!("Ignoring OTEL_SDK_DISABLED={v} (true or false).")),
        _ => {}
    }
    let explicit = match var("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "none" => return off,
        Some(v) if v == "otlp" => true,
        Some(v) => {
            warnings.push(format!("Ignoring OTEL_TRACES_EXPORTER={v}: tidings exports over otlp or none."));
            false
        }
        None => false,
    };
    let url = var(opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
        .or_else(|| {
            let e = endpoint.map(str::trim).filter(|e| !e.is_empty())?;
            Some(format!("{}/v1/traces", e.trim_end_matches('/')))
        })
        .or_else(|| explicit.then(|| DEFAULT_OTLP_TRACES.to_string()));
    TracesExport { url, warnings }
}

fn otlp_provider(url: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP exporter for {url}: {e}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "tidings".into());
    // The async-runtime processor exports on the tokio runtime, which the async reqwest client
    // needs; batch size and delay follow the standard OTEL_BSP_* variables.
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
        .build())
}

/// Exports what is still buffered and stops the exporter, waiting at most 5 s (a collector that
/// is down must not hold up exit).
async fn shutdown_tracing(provider: SdkTracerProvider) {
    // The processor's shutdown blocks its caller until the runtime has run the final export, so
    // it runs on its own thread while this runtime keeps going.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("otel-shutdown".into()).spawn(move || {
        let _ = tx.send(provider.shutdown());
    });
    if spawned.is_err() {
        eprintln!("warning: could not flush the remaining spans (no thread for the exporter shutdown)");
        return;
    }
    match tokio::time::timeout(std::time::Duration::from_secs(5), rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("warning: flushing spans to the OTLP endpoint failed: {e}"),
        Ok(Err(_)) | Err(_) => eprintln!("warning: flushing spans to the OTLP endpoint did not finish within 5 s"),
    }
}

/// `tidings token`: the token goes to stdout alone so it can be captured (`T=$(tidings token ...)`).
fn print_token(
    user: &str,
    ttl_secs: u64,
    secret: Option<&str>,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if user.is_empty() {
        anyhow::bail!("--user must not be empty");
    }
    let secret = secret.unwrap_or_else(|| {
        tracing::warn!("No --jwt-secret: signing with the dev secret, which only a dev-mode `tidings up` accepts.");
        tidings_gateway::auth::DEV_SECRET
    });
    let ttl = std::time::Duration::from_secs(ttl_secs);
    println!("{}", tidings_gateway::auth::mint_hs256(secret.as_bytes(), user, ttl, issuer, audience)?);
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let (cli, config_file) = config_file::parse_from::<Cli>(std::env::args_os().collect());
    let otlp_endpoint = match &cli.command {
        // A malformed endpoint is refused by `up`'s settings check with every other setting (exit
        // 64); until then the log goes to stderr only.
        Command::Up(args) => {
            args.otlp_endpoint.clone().filter(|u| u.trim().is_empty() || settings::check_http_url(u.trim()).is_ok())
        }
        _ => std::env::var(opentelemetry_otlp::OTEL_EXPORTER_OTLP_ENDPOINT).ok(),
    };
    let provider = match init_tracing(otlp_endpoint.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up(mut args) => {
            args.config_file = config_file;
            up::run(args).await
        }
        Command::Topology(TopologyCmd::Check { topology }) => tools::topology_check(&topology),
        Command::Topology(TopologyCmd::Apply { infra }) => tools::topology_apply(&infra).await,
        Command::Produce { topic, infra } => tools::produce(&topic, &infra).await,
        Command::Coupon(CouponCmd::Create(args)) => coupon_create::run(&args).await,
        Command::Coupon(CouponCmd::Verify { coupon, infra }) => coupon_verify::run(coupon.as_deref(), &infra).await,
        Command::ConfigExample => {
            print!("{}", config_file::example(Cli::command().find_subcommand("up").expect("`up` is a subcommand")));
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Inbox { user, limit, infra } => tools::inbox(&user, limit, &infra).await,
        Command::Stats { infra } => tools::stats(&infra).await,
        Command::Segment(cmd) => segment::run(cmd).await,
        Command::Campaign(cmd) => campaign::run(cmd).await,
        Command::Dlq(cmd) => dlq::run(cmd).await,
        Command::Offsets(cmd) => offsets::run(cmd).await,
        Command::Audit(args) => audit::run(args).await,
        Command::Replay(cmd) => replay::run(cmd).await,
        Command::Status(args) => status::run(args).await,
        Command::Token { user, ttl_secs, jwt_secret, jwt_issuer, jwt_audience } => {
            print_token(&user, ttl_secs, jwt_secret.as_deref(), jwt_issuer.as_deref(), jwt_audience.as_deref())
        }
    };
    if let Some(p) = provider {
        shutdown_tracing(p).await;
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(endpoint: Option<&str>, vars: &[(&str, &str)]) -> TracesExport {
        let vars: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        otlp_traces_url(endpoint, |k| vars.get(k).cloned())
    }

    #[test]
    fn traces_are_exported_only_when_asked_for() {
        assert_eq!(url(None, &[]).url, None, "off by default");
        assert_eq!(url(Some(" "), &[]).url, None);
        assert_eq!(url(Some("http://c:4318/"), &[]).url.as_deref(), Some("http://c:4318/v1/traces"));
        let traces = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/x");
        assert_eq!(url(Some("http://c:4318"), &[traces]).url.as_deref(), Some("http://t:1/x"), "the signal's own wins");
        let otlp = ("OTEL_TRACES_EXPORTER", "otlp");
        assert_eq!(url(None, &[otlp]).url.as_deref(), Some(DEFAULT_OTLP_TRACES));
        for off in [("OTEL_SDK_DISABLED", "TRUE"), ("OTEL_TRACES_EXPORTER", "none")] {
            assert_eq!(url(Some("http://c:4318"), &[off, traces]), TracesExport { url: None, warnings: vec![] });
        }
        let odd = url(Some("http://c:4318"), &[("OTEL_SDK_DISABLED", "yes"), ("OTEL_TRACES_EXPORTER", "zipkin")]);
        assert_eq!(odd.url.as_deref(), Some("http://c:4318/v1/traces"), "unknown values are ignored");
        assert_eq!(odd.warnings.len(), 2, "{:?}", odd.warnings);
    }
}
