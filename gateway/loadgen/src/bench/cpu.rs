//! CPU accounting from /proc over a measured part (the box, the tidings process, these clients)
//! and a probe of late wake-ups of a load-client thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Late wake-ups of a thread that sleeps 2 ms in a loop (`LATE[i]`: later than 5, 10, 20 ms).
/// Not a tokio task: it tells a box that did not run a waiting thread for milliseconds (the
/// broker, tidings and the clients share two cores) from a stall inside the measured process.
pub(super) static LATE: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

pub(super) static LATE_MAX_US: AtomicU64 = AtomicU64::new(0);

pub(super) fn start_wakeup_probe() {
    std::thread::Builder::new()
        .name("wakeup-probe".into())
        .spawn(|| loop {
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(2));
            let late = t.elapsed().saturating_sub(Duration::from_millis(2));
            LATE_MAX_US.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
            for (i, ms) in [5, 10, 20].into_iter().enumerate() {
                if late > Duration::from_millis(ms) {
                    LATE[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .expect("spawning the wake-up probe");
}

/// The wake-up probe's counts since the last call: call it where a measurement starts (to drop
/// what came before) and where it ends.
pub(super) fn wakeups_late() -> Value {
    let [over5, over10, over20] = LATE.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
    json!({
        "over_5ms": over5, "over_10ms": over10, "over_20ms": over20,
        "max_ms": LATE_MAX_US.swap(0, Ordering::Relaxed) as f64 / 1000.0,
        "note": "wake-ups of a load-client thread sleeping 2 ms in a loop, during the measured part",
    })
}

/// CPU time over a measured part, from /proc: the whole box, the tidings process under test (if
/// any) and these clients; the rest is mostly the broker (or nginx). Less noisy than a latency
/// tail on a shared two-core box, so it shows what a change costs or saves per event.
pub(super) struct CpuWindow {
    pub(super) box_ticks: (u64, u64),
    pub(super) server: Option<(u32, u64)>,
    pub(super) clients: u64,
}

/// (busy, total) clock ticks of all cores since boot: busy leaves out idle and iowait.
pub(super) fn box_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    (total - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0), total)
}

/// User plus system clock ticks of a process, all its threads.
pub(super) fn proc_ticks(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name (which may hold spaces): utime is the 12th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse::<u64>().ok()).sum()
}

impl CpuWindow {
    pub(super) fn start(server: Option<u32>) -> CpuWindow {
        CpuWindow {
            box_ticks: box_ticks(),
            server: server.map(|p| (p, proc_ticks(Some(p)))),
            clients: proc_ticks(None),
        }
    }

    /// Cores used on average since `start`, and CPU µs per event (`events` of the measured part).
    pub(super) fn end(self, events: usize) -> Value {
        let ((busy0, total0), (busy1, total1)) = (self.box_ticks, box_ticks());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let hz = 100.0; // USER_HZ: /proc reports clock ticks of 1/100 s on Linux
        let secs = |ticks: u64| ticks as f64 / hz;
        let busy = secs(busy1 - busy0);
        let server = self.server.map(|(p, t)| secs(proc_ticks(Some(p)).saturating_sub(t)));
        let clients = secs(proc_ticks(None) - self.clients);
        let others = (busy - clients - server.unwrap_or(0.0)).max(0.0);
        let per_event = |s: f64| (s * 1e6 / events.max(1) as f64).round();
        json!({
            "box_busy": (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
            "cores": cores,
            "secs": {"server": server, "clients": clients, "others": others},
            "per_event_us": {"server": server.map(per_event), "clients": per_event(clients), "others": per_event(others)},
            "note": "CPU over the measured part from /proc (10 ms ticks): server = the tidings process (absent for nchan), clients = this load generator, others = the rest of the box (the broker, or nginx)",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// A window counts this whole process as the clients, so the two tests must not overlap
    /// (the test harness runs tests on parallel threads).
    static ONE_WINDOW_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn cpu_window_counts_the_cpu_a_process_burns() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (sleeper, pid) = {
            let c = Command::new("sleep").arg("5").spawn().expect("sleep");
            let pid = c.id();
            (c, pid)
        };
        let w = CpuWindow::start(Some(pid));
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(400) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let v = w.end(1_000);
        let mut sleeper = sleeper;
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        // This thread spun for 0.4 s; a sleeping process used none; the box was at least that busy.
        let clients = v["secs"]["clients"].as_f64().unwrap();
        assert!((0.3..2.0).contains(&clients), "{v}");
        assert!(v["secs"]["server"].as_f64().unwrap() < 0.05, "{v}");
        assert!(v["box_busy"].as_f64().unwrap() > 0.1, "{v}");
        assert!(v["per_event_us"]["clients"].as_f64().unwrap() >= 300.0, "{v}");
    }

    #[test]
    fn cpu_window_counts_a_busy_server_process() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut spinner = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let w = CpuWindow::start(Some(spinner.id()));
        std::thread::sleep(Duration::from_millis(600));
        let v = w.end(1);
        let _ = spinner.kill();
        let _ = spinner.wait();
        // The shell spun for 0.6 s (on a core of its own or sharing one); this thread slept.
        let server = v["secs"]["server"].as_f64().unwrap();
        assert!((0.2..1.5).contains(&server), "{v}");
        assert!(v["secs"]["clients"].as_f64().unwrap() < 0.1, "{v}");
    }
}
