//! Retrying what may pass (an outage, a credential that gets fixed) on backon's capped exponential
//! schedule, with jitter; a retry wait ends at once when shutdown begins. Every stage's inner
//! retries (registry look-ups, store writes, room and segment reads) use this one loop.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Why a retried operation gave up, with its last error.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The error is not one a retry can fix.
    Failed(E),
    /// Shutdown began while it was still failing with a retriable error.
    ShutDown(E),
}

/// The schedule: `first`, doubling, at most `max`, for as long as it takes.
pub fn schedule(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new().with_min_delay(first).with_max_delay(max).with_jitter().without_max_times().build()
}

/// Runs `op` until it succeeds, fails with an error `retriable` rejects, or `shutdown` begins
/// while it fails; logs each retry as `what()`. Called per record by the stages: nothing is built
/// (no schedule, no message) unless `op` fails.
pub async fn until_done<T, E, F, Fut>(
    shutdown: &CancellationToken,
    what: impl Fn() -> String,
    (first, max): (Duration, Duration),
    mut op: F,
    retriable: impl Fn(&E) -> bool,
) -> Result<T, GaveUp<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut delays = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !retriable(&e) => return Err(GaveUp::Failed(e)),
            Err(e) if shutdown.is_cancelled() => return Err(GaveUp::ShutDown(e)),
            Err(e) => {
                let delay = delays.get_or_insert_with(|| schedule(first, max)).next().unwrap_or(max);
                tracing::warn!(error = %e, "{} failed; retrying in {delay:?} (nothing is skipped meanwhile).", what());
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(GaveUp::ShutDown(e)),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_only_what_may_pass_and_stops_waiting_at_shutdown() {
        let shutdown = CancellationToken::new();
        let calls = AtomicUsize::new(0);
        let window = (Duration::from_millis(100), Duration::from_secs(1));
        // Two outages, then success.
        let r = until_done(
            &shutdown,
            || "t".into(),
            window,
            || async {
                if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                    Err("down")
                } else {
                    Ok(7)
                }
            },
            |_| true,
        )
        .await;
        assert_eq!((r.ok(), calls.load(Ordering::Relaxed)), (Some(7), 3));
        // Not retriable: one call.
        calls.store(0, Ordering::Relaxed);
        let r = until_done(
            &shutdown,
            || "t".into(),
            window,
            || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>("bad")
            },
            |e| *e != "bad",
        )
        .await;
        assert!(matches!(r, Err(GaveUp::Failed("bad"))) && calls.load(Ordering::Relaxed) == 1);
        // Failing forever: shutdown ends the wait, not the next scheduled attempt.
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.cancel();
        });
        let started = tokio::time::Instant::now();
        let r = until_done(
            &shutdown,
            || "t".into(),
            (Duration::from_secs(10), Duration::from_secs(10)),
            || async { Err::<(), _>("down") },
            |_| true,
        )
        .await;
        assert!(matches!(r, Err(GaveUp::ShutDown("down"))));
        assert!(started.elapsed() < Duration::from_secs(1), "slept through shutdown: {:?}", started.elapsed());
    }

    #[test]
    fn the_schedule_grows_and_is_capped() {
        let d: Vec<Duration> = schedule(Duration::from_millis(100), Duration::from_secs(1)).take(8).collect();
        assert_eq!(d.len(), 8, "the schedule must not run out");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)), "{d:?}");
        assert!(d[6] >= Duration::from_secs(1), "{d:?}");
    }
}
