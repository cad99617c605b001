//! The browser driver of the page tests: `tests/browser/page.mjs` (playwright-core driving Debian's
//! Chromium), one JSON command per line and one answer line each, bounded in time.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::{browser_dir, chromium};

/// One browser command (a wait included) at most.
pub const STEP: Duration = Duration::from_secs(45);
/// One wait for a condition on a page at most.
pub const WAIT: Duration = Duration::from_secs(30);

/// `target/browser/`, where the tests' screenshots go.
pub fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser");
    std::fs::create_dir_all(&dir).expect("creating target/browser");
    dir
}

/// The node driver: one command at a time, each answered by one line.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    next: u64,
    /// The function body whose value a failed wait prints: what the test reads of the page.
    snapshot: &'static str,
}

impl Browser {
    /// Starts the driver; `snapshot` is printed with every failed wait.
    pub fn start(snapshot: &'static str) -> Browser {
        let mut child = tokio::process::Command::new("node")
            .arg(browser_dir().join("page.mjs"))
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting node (is Node.js installed?)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Browser { child, stdin, lines, next: 0, snapshot }
    }

    /// Runs `cmd` in context `ctx`: its value, or the driver's error (with what the page showed).
    pub async fn try_call(&mut self, ctx: &str, mut cmd: Value) -> Result<Value, Value> {
        self.next += 1;
        let id = self.next;
        cmd["id"] = json!(id);
        cmd["ctx"] = json!(ctx);
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.expect("writing to the driver");
        let answer = tokio::time::timeout(STEP, async {
            loop {
                let Some(line) = self.lines.next_line().await.expect("reading the driver") else {
                    panic!("the browser driver exited during {cmd}");
                };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("driver (not JSON): {line}");
                    continue;
                };
                if v["id"] == id {
                    return v;
                }
                // Console output and page errors of the page, to follow the story.
                eprintln!("page: {line}");
                assert_ne!(v["kind"], "pageerror", "the page threw: {v}");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer from the browser to {cmd} within {STEP:?}"));
        if answer["kind"] == "done" {
            Ok(answer["value"].clone())
        } else {
            Err(answer)
        }
    }

    pub async fn call(&mut self, ctx: &str, cmd: Value) -> Value {
        match self.try_call(ctx, cmd.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("browser command {cmd} in {ctx} failed: {}\npage text:\n{}", e["error"], e["page_text"]),
        }
    }

    /// Waits until the function body `js` returns something truthy in `ctx`'s page: its value.
    pub async fn wait(&mut self, ctx: &str, what: &str, js: &str) -> Value {
        match self.try_call(ctx, json!({"cmd": "wait", "js": js, "timeout_ms": WAIT.as_millis() as u64})).await {
            Ok(v) => v,
            Err(e) => {
                let now = self.try_call(ctx, json!({"cmd": "eval", "js": self.snapshot})).await;
                panic!(
                    "{ctx}: waiting for {what} failed: {}\npage now: {now:?}\npage text:\n{}",
                    e["error"], e["page_text"]
                )
            }
        }
    }

    pub async fn eval(&mut self, ctx: &str, js: &str) -> Value {
        self.call(ctx, json!({"cmd": "eval", "js": js})).await
    }

    pub async fn snapshot(&mut self, ctx: &str) -> Value {
        self.eval(ctx, self.snapshot).await
    }

    pub async fn screenshot(&mut self, ctx: &str, name: &str) {
        let path = screenshot_dir().join(format!("{name}.png"));
        self.call(ctx, json!({"cmd": "screenshot", "path": path})).await;
        eprintln!("screenshot {}", path.display());
    }

    pub async fn close(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }
}

/// Opens the page at `url` in context `user` (a phone-sized window) and signs in as `user` with
/// the dev sign-in, by keyboard.
pub async fn sign_in(b: &mut Browser, url: &str, user: &str) {
    b.call(user, json!({"cmd": "open", "url": format!("{url}/"), "width": 390, "height": 844})).await;
    b.call(user, json!({"cmd": "fill", "selector": "#dev-user", "value": user})).await;
    b.call(user, json!({"cmd": "press", "selector": "#dev-user", "key": "Enter"})).await;
    b.wait(user, "signed in", "return !document.getElementById('app').hidden").await;
    // A first stream starts from now: an event produced before it opens reaches the page only
    // through the inbox it loaded before, so tests produce after this.
    b.wait(user, "the stream to be live", "return document.getElementById('conn').dataset.state === 'live'").await;
}

/// To the Preferences view by keyboard (the tab link, then Enter) and its categories loaded.
pub async fn preferences_view(b: &mut Browser, user: &str) {
    b.call(user, json!({"cmd": "press", "selector": "#tab-preferences", "key": "Enter"})).await;
    b.wait(user, "the categories", "return document.querySelectorAll('#prefs-categories input').length > 0").await;
}

/// Submits the Preferences form with Enter and waits for the page to say it saved.
pub async fn save_preferences(b: &mut Browser, user: &str) {
    b.call(user, json!({"cmd": "press", "selector": "#prefs-form button[type=submit]", "key": "Enter"})).await;
    b.wait(user, "saved", "return document.getElementById('prefs-status').textContent === 'Preferences saved.'").await;
}
