//! One shutdown tree: a root `CancellationToken`, named tasks, and a grace period after which
//! stragglers are reported and abandoned.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Named long-running tasks sharing one cancellation token.
pub struct TaskTree {
    token: CancellationToken,
    tasks: JoinSet<(String, Result<(), String>)>,
}

impl TaskTree {
    pub fn new(token: CancellationToken) -> Self {
        TaskTree { token, tasks: JoinSet::new() }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Spawns `fut` under `name`; its error (if any) is reported when it ends.
    pub fn spawn<F, E>(&mut self, name: &str, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let name = name.to_string();
        self.tasks.spawn(async move {
            let r = fut.await.map_err(|e| e.to_string());
            (name, r)
        });
    }

    /// Waits until the token is cancelled or any task ends (a task ending early is a failure of
    /// the whole process: cancel the rest), then waits up to `grace` for all tasks.
    /// Returns the names and errors of tasks that failed.
    pub async fn run(mut self, grace: Duration) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        tokio::select! {
            _ = self.token.cancelled() => {}
            Some(done) = self.tasks.join_next() => {
                match done {
                    Ok((name, Ok(()))) => {
                        if !self.token.is_cancelled() {
                            tracing::warn!(task = %name, "Task {name} ended on its own; shutting the rest down.");
                        }
                    }
                    Ok((name, Err(e))) => {
                        tracing::error!(task = %name, error = %e, "Task {name} failed; shutting the rest down.");
                        failures.push((name, e));
                    }
                    Err(e) => failures.push(("?".into(), e.to_string())),
                }
                self.token.cancel();
            }
        }
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => match next {
                    None => break,
                    Some(Ok((_, Ok(())))) => {}
                    Some(Ok((name, Err(e)))) => failures.push((name, e)),
                    Some(Err(e)) => failures.push(("?".into(), e.to_string())),
                },
                _ = &mut deadline => {
                    tracing::warn!(remaining = self.tasks.len(), "Grace period of {grace:?} is over; abandoning {} task(s).", self.tasks.len());
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        failures
    }
}

/// Whether a stage is running an attempt (as opposed to waiting out a backoff after a failure,
/// or stopped): what its `/readyz` component reports.
#[derive(Debug, Clone, Default)]
pub struct StageHealth(Arc<AtomicBool>);

impl StageHealth {
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }
}
