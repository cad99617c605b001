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

/// CPU time over a measured part, from /proc: the whole box, the tidings processes under test (if
/// any) and the load clients (this process, plus any client processes it started); the rest is
/// mostly the broker (or nginx). Less noisy than a latency tail on a shared two-core box, so it
/// shows what a change costs or saves per delivered event.
pub(super) struct CpuWindow {
    box_ticks: (u64, u64),
    /// Each tidings process and its ticks at the start (0 for one started inside the window).
    servers: Vec<(u32, u64)>,
    /// Ticks spent inside the window by tidings processes that have ended (killed by chat_kill),
    /// and whether any has.
    ended_servers: (u64, bool),
    /// Other client processes and their ticks at the start.
    client_procs: Vec<(u32, u64)>,
    clients: u64,
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
    /// Starts counting; `servers` are the tidings processes (none for nchan).
    pub(super) fn start(servers: &[u32]) -> CpuWindow {
        CpuWindow {
            box_ticks: box_ticks(),
            servers: servers.iter().map(|&p| (p, proc_ticks(Some(p)))).collect(),
            ended_servers: (0, false),
            client_procs: Vec::new(),
            clients: proc_ticks(None),
        }
    }

    /// Counts these processes as load clients too (`hold` processes this one started).
    pub(super) fn with_clients(mut self, pids: &[u32]) -> CpuWindow {
        self.client_procs = pids.iter().map(|&p| (p, proc_ticks(Some(p)))).collect();
        self
    }

    /// Tidings process `pid` is about to be killed: what it spent inside the window stays counted
    /// (once it is gone, /proc no longer has its ticks). Call it just before the kill.
    pub(super) fn server_ends(&mut self, pid: u32) {
        if let Some(i) = self.servers.iter().position(|&(p, _)| p == pid) {
            let (_, from) = self.servers.swap_remove(i);
            self.ended_servers.0 += proc_ticks(Some(pid)).saturating_sub(from);
            self.ended_servers.1 = true;
        }
    }

    /// Tidings process `pid` started inside the window (a restart): all its CPU counts.
    pub(super) fn server_starts(&mut self, pid: u32) {
        self.servers.push((pid, 0));
    }

    /// Cores used on average since `start`, and CPU µs per delivered event (`events` of the
    /// measured part; none when nothing was delivered, as with idle streams).
    pub(super) fn end(self, events: usize) -> Value {
        let ((busy0, total0), (busy1, total1)) = (self.box_ticks, box_ticks());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let hz = 100.0; // USER_HZ: /proc reports clock ticks of 1/100 s on Linux
        let secs = |ticks: u64| ticks as f64 / hz;
        let since =
            |procs: &[(u32, u64)]| procs.iter().map(|&(p, t)| proc_ticks(Some(p)).saturating_sub(t)).sum::<u64>();
        let busy = secs(busy1 - busy0);
        let (ended, any_ended) = self.ended_servers;
        let server = (!self.servers.is_empty() || any_ended).then(|| secs(since(&self.servers) + ended));
        let clients = secs(proc_ticks(None).saturating_sub(self.clients) + since(&self.client_procs));
        let others = (busy - clients - server.unwrap_or(0.0)).max(0.0);
        let per_event = |s: f64| (events > 0).then(|| (s * 1e6 / events as f64).round());
        json!({
            "box_busy": (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
            "cores": cores,
            "delivered_events": events,
            "secs": {"server": server, "clients": clients, "others": others},
            "per_event_us": {
                "server": server.and_then(per_event), "clients": per_event(clients), "others": per_event(others),
            },
            "note": "CPU over the measured part from /proc (10 ms ticks): server = the tidings processes (absent for nchan), clients = the load generator's processes, others = the rest of the box (the broker, or nginx); per_event_us = CPU µs / delivered_events",
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

    /// Waits until process `pid` has used `ticks` more clock ticks of CPU than `from` (at most
    /// 30 s): on a busy shared box a spinning process gets less than its wall time.
    fn until_spent(pid: u32, from: u64, ticks: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while proc_ticks(Some(pid)) < from + ticks && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn cpu_window_counts_the_cpu_a_process_burns() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (sleeper, pid) = {
            let c = Command::new("sleep").arg("5").spawn().expect("sleep");
            let pid = c.id();
            (c, pid)
        };
        let w = CpuWindow::start(&[pid]);
        let (t, from) = (Instant::now(), proc_ticks(None));
        let mut x = 0u64;
        // 0.4 s of this process's CPU, however long the box takes to give it.
        while proc_ticks(None) < from + 40 && t.elapsed() < Duration::from_secs(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let v = w.end(1_000);
        let mut sleeper = sleeper;
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        // This thread spun for 0.4 s of CPU; a sleeping process used none; the box was at least
        // that busy.
        let clients = v["secs"]["clients"].as_f64().unwrap();
        assert!((0.4..2.0).contains(&clients), "{v}");
        assert!(v["secs"]["server"].as_f64().unwrap() < 0.05, "{v}");
        assert!(v["box_busy"].as_f64().unwrap() > 0.1, "{v}");
        assert!(v["per_event_us"]["clients"].as_f64().unwrap() >= 300.0, "{v}");
    }

    #[test]
    fn cpu_window_counts_a_busy_server_process() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut spinner = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let w = CpuWindow::start(&[spinner.id()]);
        until_spent(spinner.id(), w.servers[0].1, 40);
        let v = w.end(1);
        let _ = spinner.kill();
        let _ = spinner.wait();
        // The shell spun for 0.4 s of CPU; this thread slept.
        let server = v["secs"]["server"].as_f64().unwrap();
        assert!((0.4..1.5).contains(&server), "{v}");
        assert!(v["secs"]["clients"].as_f64().unwrap() < 0.1, "{v}");
    }

    #[test]
    fn cpu_window_keeps_a_killed_server_and_counts_its_restart() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let spin = || Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let mut first = spin();
        let mut w = CpuWindow::start(&[first.id()]);
        until_spent(first.id(), w.servers[0].1, 40);
        w.server_ends(first.id());
        let _ = first.kill();
        let _ = first.wait();
        let mut second = spin();
        w.server_starts(second.id());
        until_spent(second.id(), 0, 40);
        let v = w.end(1);
        let _ = second.kill();
        let _ = second.wait();
        // 0.4 s of CPU from the killed process (gone from /proc by now) and 0.4 s from its restart.
        let server = v["secs"]["server"].as_f64().unwrap();
        assert!((0.8..2.5).contains(&server), "{v}");
    }

    #[test]
    fn cpu_window_counts_client_processes_and_no_events_as_none_per_event() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut holder = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let (mut server, server_pid) = {
            let c = Command::new("sleep").arg("5").spawn().expect("sleep");
            let pid = c.id();
            (c, pid)
        };
        let w = CpuWindow::start(&[server_pid]).with_clients(&[holder.id()]);
        until_spent(holder.id(), w.client_procs[0].1, 40);
        let v = w.end(0);
        for c in [&mut holder, &mut server] {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The spinning client process counts as the clients; nothing delivered: no per-event figure.
        let clients = v["secs"]["clients"].as_f64().unwrap();
        assert!((0.4..1.5).contains(&clients), "{v}");
        assert!(v["secs"]["server"].as_f64().unwrap() < 0.05, "{v}");
        assert!(v["per_event_us"]["server"].is_null() && v["per_event_us"]["clients"].is_null(), "{v}");
        assert_eq!(v["delivered_events"], 0, "{v}");
    }
}
