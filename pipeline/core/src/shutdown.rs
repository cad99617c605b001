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

    fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `shutdown` is cancelled, restarting it
/// after failures `retriable` accepts with a backoff capped at 30 s. Failures after shutdown began
/// count as a clean stop. Every stage's `run` is this loop around its `run_once`. `health` is up
/// only while an attempt runs.
pub async fn restart_on_transient<E, F, Fut>(
    stage: &str,
    health: &StageHealth,
    shutdown: &CancellationToken,
    mut attempt: F,
    retriable: impl Fn(&E) -> bool,
) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut delays = crate::retry::schedule(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        health.set(true);
        let result = attempt().await;
        health.set(false);
        match result {
            Ok(()) => return Ok(()),
            Err(_) if shutdown.is_cancelled() => return Ok(()),
            Err(e) if retriable(&e) => {
                let backoff = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, "{stage} stage failed; restarting from its stored offsets in {backoff:?}.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn health_is_down_while_a_stage_waits_to_restart() {
        let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let run = {
            let (health, shutdown, attempts) = (health.clone(), shutdown.clone(), attempts.clone());
            tokio::spawn(async move {
                restart_on_transient(
                    "Test",
                    &health,
                    &shutdown.clone(),
                    || {
                        let (n, shutdown) = (attempts.fetch_add(1, Ordering::Relaxed), shutdown.clone());
                        async move {
                            if n == 0 {
                                Err("broker down".to_string())
                            } else {
                                shutdown.cancelled().await;
                                Ok(())
                            }
                        }
                    },
                    |_| true,
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(attempts.load(Ordering::Relaxed), 1);
        assert!(!health.is_up(), "up while waiting out the backoff after a failure");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(attempts.load(Ordering::Relaxed), 2);
        assert!(health.is_up(), "down while the second attempt runs");
        shutdown.cancel();
        run.await.unwrap().unwrap();
        assert!(!health.is_up(), "up after the stage stopped");
    }
}
