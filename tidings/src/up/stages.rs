//! The pipeline stages `--stages` selects: each is started by its own crate's `spawn` with its
//! typed config, and its readiness check joins `/readyz`.

use tidings_core::shutdown::TaskTree;
use tidings_gateway::Readiness;
use tidings_pipeline::stages::templating::{self, TemplatingConfig};
use tidings_sinks::persistence::{self, PersistenceConfig};

use super::infra::Infrastructure;
use super::UpArgs;

/// Spawns templating and persistence when selected.
pub fn spawn(args: &UpArgs, infra: &Infrastructure, tasks: &mut TaskTree, readiness: &Readiness) {
    let (kafka, registry) = (&infra.kafka, &infra.registry);
    if args.runs("templating") {
        let cfg = TemplatingConfig::new(kafka.clone(), registry.clone(), infra.topology.clone());
        readiness.set_check("templating", templating::spawn(tasks, cfg, infra.store.clone()));
    }
    if args.runs("persistence") {
        let cfg = PersistenceConfig::new(kafka.clone(), registry.clone(), &infra.topology);
        readiness.set_check("persistence", persistence::spawn(tasks, cfg, infra.store.clone()));
    }
}
