//! The chat benchmark: users in rooms, each sending at a fixed rate over the chat API
//! (`POST /v1/rooms/{id}/messages`) while every user holds their stream, on Apache Kafka and
//! PostgreSQL. Every member must get every message of their room exactly once and in room order
//! (seq increasing); latency is from just before a send's first attempt (its time is in the text)
//! to its arrival on each member's stream; at the end the room history (`chat_messages`) must hold
//! exactly the acknowledged messages.
//!
//! `chat_kill` runs templating, persistence and the gateway as three `tidings up` processes and,
//! during the measured run, SIGKILLs persistence and then the gateway and restarts each (the
//! gateway on the same port; both rejoin their groups with the same `group.instance.id`, as a
//! restarted pod would). Streams reconnect with `Last-Event-ID`; a send that failed or got no answer
//! is retried with the same `client_id` (the same message id).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};
use tidings_loadgen::{Client, Seen, Totals};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::cpu::CpuWindow;
use super::{now_micros, up_args, wait_ready, Proc};
use crate::user_id;
use tidings_loadgen::percentiles;

/// The chat scenarios' settings (flags of `bench`).
pub struct ChatOpts {
    pub users: usize,
    pub room_size: usize,
    /// Messages per second per user.
    pub rate: f64,
    /// Measured seconds of sending.
    pub secs: u64,
    /// Seconds of the same load before the measured ones (broker JIT, pools, rings).
    pub warm_secs: u64,
    /// SIGKILL and restart persistence and the gateway during the measured run.
    pub kill: bool,
}

/// What one member's stream got.
struct Inbox {
    /// Highest seq so far (a room's messages must arrive in increasing seq).
    last_seq: i64,
    ids: HashSet<String>,
    duplicates: u64,
    out_of_order: u64,
    /// Messages of a room the user is not in.
    foreign: u64,
    /// Latency (µs) of measured messages from other members, and of the user's own.
    others_us: Vec<i64>,
    own_us: Vec<i64>,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            last_seq: -1,
            ids: HashSet::new(),
            duplicates: 0,
            out_of_order: 0,
            foreign: 0,
            others_us: Vec::new(),
            own_us: Vec::new(),
        }
    }
}

/// The fields of a delivered notification the benchmark reads, borrowed where the JSON allows
/// (parsing a whole tree per delivery took a good part of this process's core).
#[derive(serde::Deserialize)]
struct Delivered<'a> {
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
    seq: Option<i64>,
    #[serde(borrow)]
    event: Option<DeliveredEvent<'a>>,
}

#[derive(serde::Deserialize)]
struct DeliveredEvent<'a> {
    #[serde(borrow)]
    room_id: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    payload: DeliveredPayload<'a>,
}

#[derive(serde::Deserialize, Default)]
struct DeliveredPayload<'a> {
    #[serde(borrow)]
    message_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    sender_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

/// A message's text: phase (`w` warm-up, `m` measured), sender index, number, send time (µs).
fn text(measured: bool, sender: usize, k: usize, sent_us: i64) -> String {
    format!("{} {sender} {k} {sent_us}", if measured { 'm' } else { 'w' })
}

fn parse_text(t: &str) -> Option<(bool, i64)> {
    let mut it = t.split(' ');
    let measured = it.next()? == "m";
    let sent_us = it.nth(2)?.parse().ok()?;
    Some((measured, sent_us))
}

/// One acknowledged send.
struct Ack {
    room: usize,
    message_id: String,
    seq: i64,
}

#[derive(Default)]
struct SendStats {
    attempts: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
    failed: AtomicU64,
    /// Sends that started more than 1 s after their due time (the user's previous one was slow).
    late: AtomicU64,
}

fn token(user: &str) -> String {
    tidings_gateway::auth::mint_hs256(
        tidings_gateway::auth::DEV_SECRET.as_bytes(),
        user,
        Duration::from_secs(86_400),
        None,
        None,
    )
    .expect("token")
}

/// Sends until the broker acknowledged it (201) or `give_up`; retries (same `client_id`) after a
/// failed connection, a timeout, a 5xx or a 429 (after its Retry-After). Answers the message id and
/// seq, and the time from `sent_us` to the 201.
#[allow(clippy::too_many_arguments)]
async fn send_one(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    text: &str,
    client_id: &str,
    sent_us: i64,
    give_up: Instant,
    stats: &SendStats,
) -> Option<(String, i64, i64)> {
    let body = json!({"text": text, "client_id": client_id}).to_string();
    let mut first = true;
    while Instant::now() < give_up {
        if !first {
            stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        let r = http
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.clone())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let wait = match r {
            Ok(r) if r.status().as_u16() == 201 => {
                let answered = now_micros() - sent_us;
                let Ok(v) = r.json::<Value>().await else { continue };
                let (Some(id), Some(seq)) = (v["message_id"].as_str(), v["seq"].as_i64()) else { break };
                return Some((id.to_string(), seq, answered));
            }
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                if r.status().as_u16() == 429 {
                    stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                let secs = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let _ = r.bytes().await;
                secs.map_or(Duration::from_millis(200), Duration::from_secs)
            }
            Ok(r) => {
                eprintln!("bench chat: send refused: {} {}", r.status(), r.text().await.unwrap_or_default());
                break;
            }
            Err(_) => Duration::from_millis(200),
        };
        tokio::time::sleep(wait).await;
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
    None
}

/// A free port on 127.0.0.1 (for a gateway that restarts on the same one).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `up_args` with a fixed `--http` address.
fn with_http(mut args: Vec<String>, http: &str) -> Vec<String> {
    if let Some(i) = args.iter().position(|a| a == "--http") {
        args[i + 1] = http.to_string();
    }
    args
}

/// The processes, shared with the task that kills and restarts them (dropping the last handle
/// kills whatever still runs).
#[derive(Default)]
struct Procs {
    all: Vec<Proc>,
}

/// What the kill task saw: when it killed what, and how long until the replacement was ready.
type KillLog = Arc<Mutex<Vec<Value>>>;

/// The CPU window of the measured part, once it has started (the kill task tells it which tidings
/// process ends and which replaces it).
type SharedCpu = Arc<Mutex<Option<CpuWindow>>>;

/// Applies `f` to the CPU window if the measured part has started it.
fn in_window(cpu: &SharedCpu, f: impl FnOnce(&mut CpuWindow)) {
    if let Some(w) = cpu.lock().unwrap().as_mut() {
        f(w);
    }
}

async fn wait_endpoints(procs: &Arc<tokio::sync::Mutex<Procs>>, i: usize) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        {
            let mut p = procs.lock().await;
            let dir = p.all[i].dir.clone();
            if let Ok(text) = std::fs::read(dir.join("endpoints.json")) {
                if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                    return Ok(v);
                }
            }
            if let Some(s) = p.all[i].child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!("{} exited ({s}); last log lines: {:?}", p.all[i].name, tail);
            }
        }
        if Instant::now() > deadline {
            bail!("process {i} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    name: &str,
    bin: &Path,
    root: &Path,
    topology: &Path,
    brokers: &str,
    prefix: &str,
    o: &ChatOpts,
) -> anyhow::Result<Value> {
    if o.room_size == 0 || o.users < o.room_size || !o.users.is_multiple_of(o.room_size) {
        bail!("--chat-users ({}) must be a multiple of --chat-room-size ({})", o.users, o.room_size);
    }
    let rooms_n = o.users / o.room_size;
    let (store, db) = tidings_store::testing::fresh_postgres().await.context("a fresh PostgreSQL database")?;
    let tidings_store::Store::Postgres(pool) = store else { bail!("not a PostgreSQL store") };
    let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
    let base = |stages: &str| up_args(Some(brokers), Some(prefix), topology, &db, stages);

    // Processes: one all-stages `tidings up`, or (kill) templating | persistence | gateway.
    let procs = Arc::new(tokio::sync::Mutex::new(Procs::default()));
    let gw_port = free_port()?;
    let gw_http = format!("127.0.0.1:{gw_port}");
    let url = format!("http://{gw_http}");
    let (gw_index, pers_index, gw_args, pers_args) = if o.kill {
        procs.lock().await.all.push(Proc::spawn(bin, "chat-core", root, &base("templating"), &[])?);
        let core = wait_endpoints(&procs, 0).await?;
        let registry = core["schema_registry_url"].as_str().unwrap_or_default().to_string();
        let reg = ["--schema-registry-url".to_string(), registry];
        let mut pers = base("persistence");
        pers.extend(reg.clone());
        let mut gw = with_http(base("gateway"), &gw_http);
        gw.extend(reg);
        let pers_env = [("TIDINGS_KAFKA_OPTS", "group.instance.id=bench-chat-persistence".to_string())];
        procs.lock().await.all.push(Proc::spawn(bin, "chat-persistence-0", root, &pers, &pers_env)?);
        let gw_env = [("TIDINGS_KAFKA_OPTS", "group.instance.id=bench-chat-gateway".to_string())];
        procs.lock().await.all.push(Proc::spawn(bin, "chat-gateway-0", root, &gw, &gw_env)?);
        wait_endpoints(&procs, 1).await?;
        (2, Some(1), gw, pers)
    } else {
        let all = with_http(base("templating,persistence,gateway"), &gw_http);
        procs.lock().await.all.push(Proc::spawn(bin, "chat-all", root, &all, &[])?);
        (0, None, Vec::new(), Vec::new())
    };
    wait_endpoints(&procs, gw_index).await?;
    wait_ready(&http, &url, Duration::from_secs(120)).await?;

    // Rooms and members, before the clock starts: user r*size creates room r, the others join.
    let users: Vec<String> = (0..o.users).map(|i| user_id("c", i)).collect();
    let tokens: Arc<Vec<String>> = Arc::new(users.iter().map(|u| token(u)).collect());
    let t_setup = Instant::now();
    let rooms: Vec<String> = futures::stream::iter(0..rooms_n)
        .map(|r| {
            let (http, url, tok) = (http.clone(), url.clone(), tokens[r * o.room_size].clone());
            async move {
                let body = json!({"kind": "group", "name": format!("bench room {r}"), "tags": ["bench"]});
                let resp = http.post(format!("{url}/v1/rooms")).bearer_auth(tok).json(&body).send().await?;
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if status.as_u16() != 201 {
                    bail!("creating room {r}: {status} {v}");
                }
                Ok::<_, anyhow::Error>(v["room_id"].as_str().unwrap_or_default().to_string())
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let joins: Vec<anyhow::Result<()>> = futures::stream::iter((0..o.users).filter(|i| i % o.room_size != 0))
        .map(|i| {
            let (http, tok) = (http.clone(), tokens[i].clone());
            let target = format!("{url}/v1/rooms/{}/members", rooms[i / o.room_size]);
            async move {
                let resp = http.post(target).bearer_auth(tok).send().await?;
                if resp.status().as_u16() != 200 {
                    bail!("user {i} joining: {} {}", resp.status(), resp.text().await.unwrap_or_default());
                }
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    joins.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let setup_secs = t_setup.elapsed().as_secs_f64();

    // Every user's stream.
    let inboxes: Arc<Vec<Mutex<Inbox>>> = Arc::new((0..o.users).map(|_| Mutex::default()).collect());
    let stop = CancellationToken::new();
    let totals = Arc::new(Totals::default());
    let sse_http = tidings_loadgen::http_client();
    let room_index: Arc<HashMap<String, usize>> =
        Arc::new(rooms.iter().enumerate().map(|(i, r)| (r.clone(), i)).collect());
    let mut streams: Vec<JoinHandle<Seen>> = Vec::with_capacity(o.users);
    let t_connect = Instant::now();
    for i in 0..o.users {
        let c = Client {
            gateways: vec![url.clone()],
            token: tokens[i].clone(),
            http: sse_http.clone(),
            reconnect_after_close: true,
        };
        let (stop, totals, inboxes, room_index) = (stop.clone(), totals.clone(), inboxes.clone(), room_index.clone());
        let (me, my_room) = (users[i].clone(), i / o.room_size);
        streams.push(tokio::spawn(async move {
            c.run_data(0, stop, totals, move |data, _| {
                let received_us = now_micros();
                let Ok(v) = serde_json::from_str::<Delivered<'_>>(data) else { return };
                if v.kind != "chat.message" {
                    return;
                }
                let Some(ev) = v.event else { return };
                let p = ev.payload;
                let mut inbox = inboxes[i].lock().unwrap();
                if room_index.get(ev.room_id.as_ref()) != Some(&my_room) {
                    inbox.foreign += 1;
                    return;
                }
                if !inbox.ids.insert(p.message_id.unwrap_or_default().into_owned()) {
                    inbox.duplicates += 1;
                }
                let seq = v.seq.unwrap_or(-1);
                if seq <= inbox.last_seq {
                    inbox.out_of_order += 1;
                }
                inbox.last_seq = inbox.last_seq.max(seq);
                if let Some((true, sent_us)) = p.text.as_deref().and_then(parse_text) {
                    if p.sender_id.as_deref() == Some(me.as_str()) {
                        inbox.own_us.push(received_us - sent_us);
                    } else {
                        inbox.others_us.push(received_us - sent_us);
                    }
                }
            })
            .await
        }));
        if i % 100 == 99 {
            tokio::time::sleep_until((t_connect + Duration::from_secs_f64((i + 1) as f64 / 3000.0)).into()).await;
        }
    }
    let connected = super::wait_connected(&totals, o.users, Duration::from_secs(120)).await;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    // Headers arrive as the stream registers; a moment for the last ones.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The kill task: persistence at a third of the measured run, the gateway at two thirds.
    let kills: KillLog = Arc::default();
    let cpu: SharedCpu = Arc::default();
    let t0 = Instant::now() + Duration::from_millis(200);
    let measured_at = t0 + Duration::from_secs(o.warm_secs);
    let killer = if o.kill {
        let (procs, kills, cpu) = (procs.clone(), kills.clone(), cpu.clone());
        let (bin, root, url, http) = (bin.to_path_buf(), root.to_path_buf(), url.clone(), http.clone());
        let third = Duration::from_secs_f64(o.secs as f64 / 3.0);
        let pers_index = pers_index.expect("kill mode has a persistence process");
        Some(tokio::spawn(async move {
            let pers_env = [("TIDINGS_KAFKA_OPTS", "group.instance.id=bench-chat-persistence".to_string())];
            let gw_env = [("TIDINGS_KAFKA_OPTS", "group.instance.id=bench-chat-gateway".to_string())];
            tokio::time::sleep_until((measured_at + third).into()).await;
            let at = Instant::now();
            {
                let mut p = procs.lock().await;
                in_window(&cpu, |w| w.server_ends(p.all[pers_index].pid()));
                let _ = p.all[pers_index].child.kill();
                let _ = p.all[pers_index].child.wait();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let respawned = Proc::spawn(&bin, "chat-persistence-1", &root, &pers_args, &pers_env);
            match respawned {
                Ok(new) => {
                    let mut p = procs.lock().await;
                    in_window(&cpu, |w| w.server_starts(new.pid()));
                    p.all[pers_index] = new;
                }
                Err(e) => return Err(e),
            }
            let up = wait_endpoints(&procs, pers_index).await;
            kills.lock().unwrap().push(json!({
                "killed": "persistence", "at_secs": (at - measured_at).as_secs_f64(),
                "restarted_after_secs": 1.0, "up_after_secs": up.is_ok().then(|| at.elapsed().as_secs_f64()),
            }));

            tokio::time::sleep_until((measured_at + 2 * third).into()).await;
            let at = Instant::now();
            {
                let mut p = procs.lock().await;
                in_window(&cpu, |w| w.server_ends(p.all[gw_index].pid()));
                let _ = p.all[gw_index].child.kill();
                let _ = p.all[gw_index].child.wait();
                p.all[gw_index] = Proc::spawn(&bin, "chat-gateway-1", &root, &gw_args, &gw_env)?;
                in_window(&cpu, |w| w.server_starts(p.all[gw_index].pid()));
            }
            let ready = wait_ready(&http, &url, Duration::from_secs(60)).await;
            kills.lock().unwrap().push(json!({
                "killed": "gateway", "at_secs": (at - measured_at).as_secs_f64(), "restarted_after_secs": 0.0,
                "ready_after_secs": ready.is_ok().then(|| at.elapsed().as_secs_f64()),
            }));
            Ok::<_, anyhow::Error>(())
        }))
    } else {
        None
    };

    // The senders: user i sends message k at t0 + (k + i/users) / rate, spread evenly.
    let per_user = ((o.warm_secs + o.secs) as f64 * o.rate).round() as usize;
    let warm_msgs = (o.warm_secs as f64 * o.rate).round() as usize;
    let stats = Arc::new(SendStats::default());
    let post_http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let answers: Arc<Mutex<Vec<i64>>> = Arc::default();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut senders = Vec::with_capacity(o.users);
    for i in 0..o.users {
        let (http, tokens, stats, acks, answers) =
            (post_http.clone(), tokens.clone(), stats.clone(), acks.clone(), answers.clone());
        let room = i / o.room_size;
        let target = format!("{url}/v1/rooms/{}/messages", rooms[room]);
        let (rate, users, run_id) = (o.rate, o.users, run_id.clone());
        senders.push(tokio::spawn(async move {
            // One send in flight per user, as a chat client that keeps its own messages in order:
            // a slow answer delays that user's next message (counted as late), never piles up
            // connections (the open-files limit) or retries.
            for k in 0..per_user {
                let due = t0 + Duration::from_secs_f64((k as f64 + i as f64 / users as f64) / rate);
                tokio::time::sleep_until(due.into()).await;
                if Instant::now() > due + Duration::from_secs(1) {
                    stats.late.fetch_add(1, Ordering::Relaxed);
                }
                let client_id = format!("{run_id}-{i}-{k}");
                let sent_us = now_micros();
                let measured = k >= warm_msgs;
                let body = text(measured, i, k, sent_us);
                let give_up = Instant::now() + Duration::from_secs(60);
                let got = send_one(&http, &target, &tokens[i], &body, &client_id, sent_us, give_up, &stats).await;
                if let Some((message_id, seq, answered_us)) = got {
                    acks.lock().unwrap().push(Ack { room, message_id, seq });
                    if measured {
                        answers.lock().unwrap().push(answered_us);
                    }
                }
            }
        }));
    }
    // Deliveries so far: distinct messages on each member's stream.
    let received = || inboxes.iter().map(|b| b.lock().unwrap().ids.len()).sum::<usize>();
    // CPU over the measured part: from the end of the warm-up until the deliveries are in, per
    // delivery in it. Started with the processes locked, so a kill cannot fall between the two.
    tokio::time::sleep_until(measured_at.into()).await;
    let received_before = {
        let p = procs.lock().await;
        *cpu.lock().unwrap() = Some(CpuWindow::start(&p.all.iter().map(Proc::pid).collect::<Vec<_>>()));
        received()
    };
    for s in senders {
        let _ = s.await;
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let kill_outcome = match killer {
        Some(k) => Some(k.await.map_err(anyhow::Error::from).and_then(|r| r)),
        None => None,
    };

    // Deliveries: every acknowledged message to each member of its room.
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let expected = acks.len() * o.room_size;
    let deadline = Instant::now() + Duration::from_secs(if o.kill { 90 } else { 60 });
    while received() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_secs = t0.elapsed().as_secs_f64() - send_secs;
    let cpu = cpu.lock().unwrap().take().map(|w| w.end(received().saturating_sub(received_before)));
    // A moment more for late duplicates.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // History: the stored messages, once persistence has caught up (or stopped moving).
    let acked_ids: HashSet<&str> = acks.iter().map(|a| a.message_id.as_str()).collect();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM chat_messages").fetch_one(&pool).await.unwrap_or(-1)
    };
    let (mut last, mut still_since) = (count().await, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(60);
    while (last as usize) < acked_ids.len()
        && Instant::now() < deadline
        && still_since.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = count().await;
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    let stored: Vec<(String, i64)> = sqlx::query_as("SELECT message_id, source_offset FROM chat_messages")
        .fetch_all(&pool)
        .await
        .context("reading chat_messages")?;
    let stored_seq: HashMap<&str, i64> = stored.iter().map(|(m, s)| (m.as_str(), *s)).collect();
    let acked_not_stored = acked_ids.iter().filter(|m| !stored_seq.contains_key(*m)).count();
    let stored_not_acked = stored_seq.keys().filter(|m| !acked_ids.contains(*m)).count();
    let seq_differs =
        acks.iter().filter(|a| stored_seq.get(a.message_id.as_str()).is_some_and(|s| *s != a.seq)).count();
    let duplicate_acks = acks.len() - acked_ids.len();

    // Per member: acknowledged messages of their room they never got, and ones they got twice.
    let mut by_room: Vec<Vec<&str>> = vec![Vec::new(); rooms_n];
    for a in &acks {
        by_room[a.room].push(a.message_id.as_str());
    }
    let (mut missing, mut members_missing, mut dups, mut members_dups, mut disorder, mut foreign) = (0, 0, 0, 0, 0, 0);
    let (mut unacked_delivered, mut got) = (0, 0);
    let (mut others, mut own) = (Vec::new(), Vec::new());
    for (i, b) in inboxes.iter().enumerate() {
        let mut b = b.lock().unwrap();
        let room = &by_room[i / o.room_size];
        let m = room.iter().filter(|id| !b.ids.contains(**id)).count();
        missing += m;
        members_missing += usize::from(m > 0);
        dups += b.duplicates;
        members_dups += usize::from(b.duplicates > 0);
        disorder += b.out_of_order;
        foreign += b.foreign;
        got += b.ids.len();
        unacked_delivered += b.ids.iter().filter(|id| !acked_ids.contains(id.as_str())).count();
        others.append(&mut b.others_us);
        own.append(&mut b.own_us);
    }
    stop.cancel();
    let mut connects = 0;
    for s in streams {
        if let Ok(seen) = s.await {
            connects += seen.connects;
        }
    }
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let sent = o.users * per_user;
    let mut v = json!({
        "scenario": name,
        "users": o.users,
        "rooms": rooms_n,
        "room_size": o.room_size,
        "rate_per_user": o.rate,
        "secs": o.secs,
        "warm_secs": o.warm_secs,
        "setup_secs": setup_secs,
        "connected": connected,
        "connect_secs": connect_secs,
        "latency_ms": percentiles(others),
        "own_stream_latency_ms": percentiles(own),
        "send_to_201_ms": percentiles(answers),
        "cpu": cpu,
    });
    let sends = json!({
        "target_send_rate": o.users as f64 * o.rate,
        "achieved_send_rate": sent as f64 / send_secs,
        "sent": sent,
        "acked": acks.len(),
        "acked_distinct": acked_ids.len(),
        "acked_twice": duplicate_acks,
        "send_failed": stats.failed.load(Ordering::Relaxed),
        "sends_late_over_1s": stats.late.load(Ordering::Relaxed),
        "send_attempts": stats.attempts.load(Ordering::Relaxed),
        "send_retries": stats.retries.load(Ordering::Relaxed),
        "rate_limited_429": stats.rate_limited.load(Ordering::Relaxed),
        "messages_stored": stored.len(),
        "acked_not_stored": acked_not_stored,
        "stored_not_acked": stored_not_acked,
        "stored_seq_differs_from_ack": seq_differs,
    });
    let deliveries = json!({
        "deliveries_expected": expected,
        "deliveries_received": got,
        "complete": got >= expected && missing == 0,
        "missing": missing,
        "members_missing_some": members_missing,
        "duplicates": dups,
        "members_with_duplicates": members_dups,
        "order_violations": disorder,
        "foreign_room_deliveries": foreign,
        "delivered_but_not_acked": unacked_delivered,
        "stream_connects": connects,
        "drain_secs": drain_secs,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "path": "POST /v1/rooms/{id}/messages → chat → templating fan-out → notifications → delivery → members' streams; chat → persistence → chat_messages",
        "note": "latency: send start (first attempt) → arrival on each other member's stream, measured seconds only; Kafka, PostgreSQL, tidings and all clients share the machine",
    });
    for part in [sends, deliveries] {
        if let (Some(to), Value::Object(from)) = (v.as_object_mut(), part) {
            to.extend(from);
        }
    }
    if o.kill {
        v["kills"] = json!(*kills.lock().unwrap());
        v["processes"] = json!("templating | persistence | gateway, three `tidings up`; static group membership");
        if let Some(Err(e)) = kill_outcome {
            v["kill_error"] = json!(format!("{e:#}"));
        }
    } else {
        v["processes"] = json!("one `tidings up` (templating, persistence, gateway)");
    }
    {
        let mut p = procs.lock().await;
        for proc in &mut p.all {
            proc.shutdown().await;
        }
    }
    Ok(v)
}
