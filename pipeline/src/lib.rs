//! The tidings pipeline: topology (`topology.yaml`), the embedded schema registry, and the
//! templating stage.
//!
//! - `topology`: parse, check (every error at once) and apply the declared topics and stages.
//! - `registry`: a Confluent-compatible schema registry served over HTTP, persisted in the store.
//! - `stages::templating`: domain events → notifications keyed by user, with a dead-letter topic.

pub mod registry;
pub mod stages;
pub mod topology;
