//! What the persistence stage's tests share: pipeline's stage-test environment (topology, embedded
//! registry, store) on a mock cluster, notifications as templating emits them, the stage's settings.

#![allow(dead_code)]

#[path = "../../../pipeline/tests/common/mod.rs"]
pub mod common;

use std::time::Duration;
use tidings_core::Notification;
use tidings_sinks::persistence::PersistenceConfig;

pub use common::{consumer, encoder, env_mock as env, read, Env};

/// Notification number `i` for `user`, as the templating stage would emit it.
pub fn notification(i: usize, user: &str, occurred_at: i64) -> Notification {
    Notification {
        notification_id: Notification::id_for(&format!("ev-{i}"), user),
        user_id: user.into(),
        kind: "k".into(),
        title: format!("t{i}"),
        body: "b".into(),
        link: None,
        source_event_id: format!("ev-{i}"),
        occurred_at,
        source_topic: "orders".into(),
        source_partition: 0,
        source_offset: i as i64,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: vec![],
    }
}

/// Persistence settings for the `notifications` topic of `env` under consumer group `group`.
pub fn persistence_cfg(env: &Env, group: &str, batch_size: usize, linger: Duration) -> PersistenceConfig {
    PersistenceConfig {
        kafka: env.kafka.clone(),
        registry: env.registry_url.clone().into(),
        group: group.into(),
        notifications_topic: "notifications".into(),
        chat_topic: None,
        chat_schema: None,
        dead_letter: "tidings.dlq.persistence".into(),
        batch_size,
        linger,
        health: Default::default(),
    }
}
