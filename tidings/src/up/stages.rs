//! The pipeline stages `--stages` selects: each is started by its own crate's `spawn` with its
//! typed config, and its readiness check joins `/readyz`.

use tidings_core::shutdown::TaskTree;
use tidings_gateway::Readiness;
use tidings_pipeline::stages::claims::{self, ClaimsConfig};
use tidings_pipeline::stages::scheduler::{self, FileClock, SchedulerConfig};
use tidings_pipeline::stages::templating::{self, TemplatingConfig};
use tidings_sinks::persistence::{self, PersistenceConfig};

use super::infra::Infrastructure;
use super::UpArgs;

/// Spawns templating, persistence, the claim stage and the scheduler when selected. Fails only on
/// a claim-stage or scheduler topology `settings::check` already refused.
pub fn spawn(args: &UpArgs, infra: &Infrastructure, tasks: &mut TaskTree, readiness: &Readiness) -> anyhow::Result<()> {
    // Lag in seconds for every group a consumer of this process reports statistics for.
    tidings_core::lag::enable_gauges(&infra.kafka);
    let (kafka, registry) = (&infra.kafka, &infra.registry);
    if args.runs("templating") {
        let cfg = TemplatingConfig::new(kafka.clone(), registry.clone(), infra.topology.clone());
        readiness.set_check("templating", templating::spawn(tasks, cfg, infra.store.clone()));
    }
    if args.runs("persistence") {
        let cfg = PersistenceConfig::new(kafka.clone(), registry.clone(), &infra.topology);
        readiness.set_check("persistence", persistence::spawn(tasks, cfg, infra.store.clone()));
    }
    if args.runs("claims") {
        // Topics, schemas, group, batching and memory bounds from topology.yaml (`stages.claims`).
        let cfg = ClaimsConfig::new(kafka.clone(), registry.clone(), &infra.topology)?;
        readiness.set_check("claims", spawn_claims(tasks, cfg, infra.store.clone()));
    }
    if args.runs("scheduler") {
        // Topics, group, tick and batching from topology.yaml (`stages.scheduler`).
        let mut cfg = SchedulerConfig::new(kafka.clone(), &infra.topology)?;
        if let Some(path) = &args.clock_file {
            // `settings::check` refused it without --dev.
            tracing::warn!(
                "The scheduler reads the time from {} (--clock-file), not the system clock.",
                path.display()
            );
            cfg = cfg.with_clock(std::sync::Arc::new(FileClock::new(path)));
        }
        readiness.set_check("scheduler", scheduler::spawn(tasks, cfg, infra.store.clone()));
    }
    Ok(())
}

/// Runs the claim stage under `tasks`; the returned check is its readiness.
fn spawn_claims(
    tasks: &mut TaskTree,
    cfg: ClaimsConfig,
    store: tidings_store::Store,
) -> impl Fn() -> bool + Send + Sync + 'static {
    let health = cfg.health.clone();
    let shutdown = tasks.token().clone();
    tasks.spawn(claims::STAGE, async move { claims::run(cfg, store, shutdown).await });
    move || health.is_up()
}
