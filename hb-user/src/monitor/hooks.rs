//! `--on-event CMD`: one process per event, bounded in number and time.
//!
//! `CMD` runs under `/bin/sh -c`, with the event in its environment
//! (`HB_EVENT`, `HB_NODE_ID`, `HB_PREVIOUS`, `HB_STATE`, `HB_PHI`,
//! `HB_GENERATION`, `HB_LAST_SEEN_MS`, `HB_TS`, `HB_SEQ`) and as one JSON
//! line on its stdin. At most `concurrency` hooks run at once; each is
//! killed when it outlives `timeout`. Events that find `queue` hooks
//! already waiting are dropped (counted in `hb_hook_failures_total{reason=
//! "dropped"}` and logged): a storm of events must never pile up processes
//! or memory. Hooks may finish out of order; `HB_SEQ` orders them.

use std::{sync::Arc, time::Duration};

use tokio::{io::AsyncWriteExt, process::Command, sync::Semaphore};

use super::{events::Event, metrics::Metrics};

/// Settings of the hook runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookOptions {
    pub command: String,
    pub concurrency: usize,
    pub timeout: Duration,
    pub queue: usize,
}

/// Handle to the hook runner.
#[derive(Clone)]
pub struct Hooks {
    tx: tokio::sync::mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
}

impl Hooks {
    pub fn start(opts: HookOptions, metrics: Arc<Metrics>) -> Hooks {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(opts.queue.max(1));
        let m = metrics.clone();
        tokio::spawn(async move {
            let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
            let opts = Arc::new(opts);
            while let Some(ev) = rx.recv().await {
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let (opts, m) = (opts.clone(), m.clone());
                tokio::spawn(async move {
                    run_one(&opts, &ev, &m).await;
                    drop(permit);
                });
            }
        });
        Hooks { tx, metrics }
    }

    /// Queues a hook run for `ev`; drops it (counted) when the queue is full.
    pub fn submit(&self, ev: &Event) {
        if self.tx.try_send(ev.clone()).is_err() {
            self.metrics.hook_failed("dropped");
            tracing::warn!(
                node_id = ev.node_id,
                event = %ev.event,
                "hook queue full, event not passed to --on-event"
            );
        }
    }
}

async fn run_one(opts: &HookOptions, ev: &Event, m: &Metrics) {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&opts.command)
        .env("HB_EVENT", ev.event.name())
        .env("HB_NODE_ID", ev.node_id.to_string())
        .env("HB_PREVIOUS", ev.previous.name())
        .env("HB_STATE", ev.state.name())
        .env("HB_PHI", format!("{:.3}", ev.phi))
        .env("HB_GENERATION", ev.generation.to_string())
        .env(
            "HB_LAST_SEEN_MS",
            ev.last_seen_ms.map(|v| v.to_string()).unwrap_or_default(),
        )
        .env("HB_TS", &ev.ts)
        .env("HB_SEQ", ev.seq.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Its own process group, so a timeout kills whatever it started.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            m.hook_failed("spawn");
            tracing::error!(error = %e, command = %opts.command, "cannot start hook");
            return;
        }
    };
    let mut json = serde_json::to_vec(ev).unwrap_or_default();
    json.push(b'\n');
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that ignores its stdin closes the pipe: not an error.
            let _ = stdin.write_all(&json).await;
        }
        child.wait().await
    };
    match tokio::time::timeout(opts.timeout, run).await {
        Ok(Ok(status)) if status.success() => m.hook_ok(),
        Ok(Ok(status)) => {
            m.hook_failed("exit");
            tracing::warn!(node_id = ev.node_id, event = %ev.event, %status, "hook failed");
        }
        Ok(Err(e)) => {
            m.hook_failed("wait");
            tracing::error!(error = %e, "cannot wait for hook");
        }
        Err(_) => {
            m.hook_failed("timeout");
            tracing::warn!(
                node_id = ev.node_id,
                event = %ev.event,
                timeout_ms = opts.timeout.as_millis() as u64,
                "hook timed out, killed"
            );
            if let Some(pid) = child.id() {
                // SAFETY: plain kill(2) of the hook's process group.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(node_id: u32) -> Event {
        crate::monitor::events::test_event(node_id.into())
    }

    async fn wait_for(m: &Metrics, f: impl Fn(&Metrics) -> bool) {
        for _ in 0..200 {
            if f(m) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "condition not reached: ok {} timeout {} dropped {} exit {} spawn {} wait {}",
            m.hooks_ok(),
            m.hook_failures("timeout"),
            m.hook_failures("dropped"),
            m.hook_failures("exit"),
            m.hook_failures("spawn"),
            m.hook_failures("wait")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hook_gets_env_and_stdin() {
        let dir = std::env::temp_dir().join(format!("hb-hook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            HookOptions {
                command: format!(
                    "echo \"$HB_EVENT $HB_NODE_ID $HB_PREVIOUS $HB_LAST_SEEN_MS\" > {0}.tmp; cat >> {0}.tmp; mv {0}.tmp {0}",
                    out.display()
                ),
                concurrency: 2,
                timeout: Duration::from_secs(5),
                queue: 8,
            },
            m.clone(),
        );
        h.submit(&ev(42));
        wait_for(&m, |m| m.hooks_ok() == 1).await;
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), "dead 42 suspect 3000");
        let v: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(v["node_id"], 42);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_hooks_are_killed_and_excess_is_dropped() {
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            HookOptions {
                command: "sleep 30".into(),
                concurrency: 1,
                timeout: Duration::from_millis(200),
                queue: 1,
            },
            m.clone(),
        );
        let t0 = std::time::Instant::now();
        for i in 0..10 {
            h.submit(&ev(i)); // never blocks
        }
        assert!(t0.elapsed() < Duration::from_millis(100));
        // One runs (or waits for its slot), one waits in the queue, the
        // rest are dropped at once.
        wait_for(&m, |m| m.hook_failures("timeout") >= 1).await;
        let dropped = m.hook_failures("dropped");
        assert!((8..=9).contains(&dropped), "{dropped}");
        wait_for(&m, |m| m.hook_failures("timeout") == 10 - dropped).await;
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "killed, not waited for"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_hook_is_counted() {
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            HookOptions {
                command: "exit 3".into(),
                concurrency: 1,
                timeout: Duration::from_secs(5),
                queue: 4,
            },
            m.clone(),
        );
        h.submit(&ev(1));
        wait_for(&m, |m| m.hook_failures("exit") == 1).await;
    }
}
