//! The `tidings` command: `up` runs every stage (on embedded defaults unless pointed at real
//! infrastructure), `topology` checks and applies `topology.yaml`, `produce` and `demo` send
//! events, `inbox` and `segment` read and load the store.

mod demo;
mod endpoints;
mod tools;
mod up;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Directory for the embedded store and the endpoints file.
    #[arg(long, env = "TIDINGS_DATA_DIR", default_value = "tidings-data")]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: registry, templating, persistence and the HTTP gateway.
    Up(up::UpArgs),
    /// Check or apply topology.yaml.
    #[command(subcommand)]
    Topology(TopologyCmd),
    /// Produce JSON events (one per line on stdin) to a topic as Avro through the registry.
    Produce {
        /// Logical topic name from topology.yaml (e.g. orders).
        topic: String,
        #[command(flatten)]
        infra: Infra,
    },
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
    /// Load a named audience segment (one user id per line on stdin) for campaigns.
    Segment {
        /// Segment name, as used by `SegmentAudience.segment`.
        name: String,
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

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TIDINGS_LOG").unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn,sqlx=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Topology(TopologyCmd::Check { topology }) => tools::topology_check(&topology),
        Command::Topology(TopologyCmd::Apply { infra }) => tools::topology_apply(&infra).await,
        Command::Produce { topic, infra } => tools::produce(&topic, &infra).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Inbox { user, limit, infra } => tools::inbox(&user, limit, &infra).await,
        Command::Stats { infra } => tools::stats(&infra).await,
        Command::Segment { name, infra } => tools::segment(&name, &infra).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
