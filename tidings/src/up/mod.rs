//! `tidings up`: checks every setting, then starts the infrastructure (store, schema registry,
//! Kafka or its embedded mock, the topology and its schemas), spawns the selected stages under
//! one shutdown tree, prints the endpoints and runs until SIGTERM or Ctrl-C.

mod args;
mod gateway;
mod infra;
mod instance;
mod stages;

use std::process::ExitCode;
use std::time::Duration;
use tidings_core::shutdown::TaskTree;
use tidings_gateway::Readiness;
use tidings_pipeline::topology::Topology;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use args::UpArgs;

use crate::endpoints::Endpoints;
use crate::settings;
use crate::Infra;

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    for w in &args.config_file.warnings {
        tracing::warn!("{w}");
    }
    // Every setting first, all refusals at once, before anything is created, written or bound.
    let settings = match settings::check(&args) {
        Ok(s) => s,
        Err(errors) => return Ok(refuse(&errors)),
    };
    // The recorder first: a metric handle taken before it exists records nowhere, and the stages
    // take theirs when they start (templating's and persistence's were missing from /metrics).
    tidings_gateway::metrics::install();
    let token = CancellationToken::new();
    let mut tasks = TaskTree::new(token.clone());
    let readiness = Readiness::default();

    let infra = infra::start(&args, &settings, &mut tasks).await?;
    stages::spawn(&args, &infra, &mut tasks, &readiness)?;
    let listening = gateway::serve(&args, settings, &infra, &mut tasks, &readiness)?;
    instance::spawn(&args, &infra, &mut tasks);

    let endpoints = Endpoints {
        brokers: infra.brokers.clone(),
        schema_registry_url: infra.registry_url.clone(),
        database_url: infra.database_url.clone(),
        http: listening.http,
        ingest: listening.ingest,
        // The dev token is public anyway; real tokens are never written to disk.
        ingest_token: args.dev.then(|| tidings_gateway::service_auth::DEV_SERVICE_TOKEN.to_string()),
        topic_prefix: infra.topology.topic_prefix.clone(),
    };
    endpoints.write(&args.infra.data_dir)?;
    print_endpoints(&endpoints, infra.mock.is_some());

    tokio::spawn(shutdown_signal(token));
    let failures = tasks.run(Duration::from_secs(args.grace_secs)).await;
    // The mock cluster, if any, outlives every client of it.
    drop(infra);
    if failures.is_empty() {
        info!("tidings stopped cleanly.");
        return Ok(ExitCode::SUCCESS);
    }
    for (name, e) in &failures {
        eprintln!("error: {name}: {e}");
    }
    Ok(ExitCode::FAILURE)
}

/// Prints every refused setting; EX_USAGE.
fn refuse(errors: &[String]) -> ExitCode {
    eprintln!("error: `tidings up` refuses {} setting(s); nothing was started:", errors.len());
    for e in errors {
        eprintln!("  - {e}");
    }
    ExitCode::from(settings::EX_USAGE)
}

fn print_endpoints(ep: &Endpoints, mock: bool) {
    println!("tidings is up.");
    let note = if mock { "   (embedded mock cluster; any Kafka client can produce here)" } else { "" };
    println!("  Kafka bootstrap:  {}{note}", ep.brokers);
    println!("  Schema registry:  {}", ep.schema_registry_url);
    println!("  Store:            {}", ep.database_url);
    if !ep.http.is_empty() {
        println!("  Gateway:          {}", ep.http);
    }
    if !ep.ingest.is_empty() {
        println!("  Ingest (services): {}", ep.ingest);
    }
    println!("Try `tidings demo` in another terminal, then `tidings inbox --user u0001`.");
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
