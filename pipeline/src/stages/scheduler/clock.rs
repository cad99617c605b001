//! The scheduler's clock: the system's, or (for tests, `--clock-file` with `--dev`) a file read
//! at every tick that holds the current time, so a test moves time past a release by writing it.

use std::path::PathBuf;

/// Where the scheduler reads "now" from, in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_micros(&self) -> Result<i64, ClockError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("cannot read the clock file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the clock file {path} holds {text:?}, neither an RFC 3339 time nor integer microseconds since the epoch")]
    Malformed { path: String, text: String },
}

/// The system's time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> Result<i64, ClockError> {
        Ok(chrono::Utc::now().timestamp_micros())
    }
}

/// The time written in a file: an RFC 3339 time (`2026-12-07T22:30:00Z`) or integer microseconds
/// since the epoch, surrounding whitespace ignored. Read at every call.
#[derive(Debug, Clone)]
pub struct FileClock {
    path: PathBuf,
}

impl FileClock {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileClock { path: path.into() }
    }
}

impl Clock for FileClock {
    fn now_micros(&self) -> Result<i64, ClockError> {
        let path = self.path.display().to_string();
        let text =
            std::fs::read_to_string(&self.path).map_err(|source| ClockError::Read { path: path.clone(), source })?;
        parse_time(text.trim())
            .ok_or_else(|| ClockError::Malformed { path, text: text.trim().chars().take(64).collect() })
    }
}

/// `text` as microseconds since the epoch: integer microseconds or an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<i64> {
    if let Ok(micros) = text.parse::<i64>() {
        return Some(micros);
    }
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_clock_reads_rfc3339_or_micros_at_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("now");
        let clock = FileClock::new(&path);
        assert!(matches!(clock.now_micros(), Err(ClockError::Read { .. })), "no file yet");
        std::fs::write(&path, "2026-12-07T10:00:00Z\n").unwrap();
        assert_eq!(clock.now_micros().unwrap(), 1_796_637_600_000_000);
        std::fs::write(&path, "2026-12-07T19:00:00.5+09:00").unwrap();
        assert_eq!(clock.now_micros().unwrap(), 1_796_637_600_500_000);
        std::fs::write(&path, " 1700000000000000 ").unwrap();
        assert_eq!(clock.now_micros().unwrap(), 1_700_000_000_000_000);
        std::fs::write(&path, "tomorrow").unwrap();
        let err = clock.now_micros().unwrap_err().to_string();
        assert!(err.contains("tomorrow") && err.contains("RFC 3339"), "{err}");
        let now = SystemClock.now_micros().unwrap();
        assert!(now > 1_796_000_000_000_000, "{now}");
    }
}
