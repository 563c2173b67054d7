//! Events: what the monitor announces when its belief about a node
//! changes, as JSON lines to a file or stdout, and to `--on-event` hooks.
//!
//! The tick hands its events to [`EventSink::publish`], which only queues
//! them: writing and running hooks happen on their own task, so a slow
//! disk or a hung hook never delays failure detection. The queue to the
//! writer is unbounded on purpose: its size is bounded by the fleet (a
//! partition of the whole fleet is one event per node) and losing a `dead`
//! event is worse than holding it in memory. Hooks are different (each is
//! a process): they have their own bounded queue and concurrency, and what
//! does not fit is counted and logged, never waited for (see `hooks`).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use super::{
    hooks::Hooks,
    metrics::Metrics,
    state::{EventKind, Status},
};

/// One announcement. Serialized as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Increasing per monitor process: orders events that hooks may see
    /// out of order.
    pub seq: u64,
    /// Wall-clock time of the tick that decided, RFC 3339 (UTC).
    pub ts: String,
    pub node_id: u32,
    pub event: EventKind,
    /// Status before this event.
    pub previous: Status,
    /// Status after it.
    pub state: Status,
    pub phi: f64,
    pub generation: u32,
    /// For `restarted`: the generation before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_generation: Option<u32>,
    /// Time since the last accepted heartbeat, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// Interval the node reports using, ms.
    pub interval_ms: u32,
    pub accepted: u64,
    pub lost: u64,
    pub restarts: u32,
}

/// Where event lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Only the log.
    None,
    Stdout,
    /// Appended to a file, reopened on SIGHUP (log rotation).
    File(PathBuf),
}

impl Destination {
    pub fn parse(s: &str) -> Destination {
        match s {
            "" => Destination::None,
            "-" => Destination::Stdout,
            p => Destination::File(PathBuf::from(p)),
        }
    }
}

enum Msg {
    Events(Vec<Event>),
    Reopen,
    /// Flush and acknowledge (shutdown).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The tick's handle to the event writer.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<Msg>,
}

impl EventSink {
    /// Opens the destination (failing early and clearly if it cannot be
    /// written) and starts the writer task.
    pub async fn start(
        dest: Destination,
        hooks: Option<Hooks>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<EventSink> {
        let out = open(&dest).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(rx, dest, out, hooks, metrics));
        Ok(EventSink { tx })
    }

    /// Queues a batch of events; never blocks.
    pub fn publish(&self, events: Vec<Event>) {
        if !events.is_empty() {
            let _ = self.tx.send(Msg::Events(events));
        }
    }

    /// Reopens the events file (after log rotation).
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Waits until everything queued so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

type Out = Option<Box<dyn AsyncWrite + Send + Unpin>>;

async fn open(dest: &Destination) -> anyhow::Result<Out> {
    Ok(match dest {
        Destination::None => None,
        Destination::Stdout => Some(Box::new(tokio::io::stdout())),
        Destination::File(p) => Some(Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .await
                .with_context(|| format!("cannot open events file {}", p.display()))?,
        )),
    })
}

async fn writer(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    dest: Destination,
    mut out: Out,
    hooks: Option<Hooks>,
    metrics: Arc<Metrics>,
) {
    let mut line = Vec::with_capacity(512);
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Events(batch) => {
                for ev in &batch {
                    metrics.event(ev.event);
                    if out.is_none() || tracing::enabled!(tracing::Level::DEBUG) {
                        tracing::info!(
                            node_id = ev.node_id,
                            event = %ev.event,
                            previous = %ev.previous,
                            phi = ev.phi,
                            generation = ev.generation,
                            last_seen_ms = ev.last_seen_ms,
                            "node event"
                        );
                    }
                    if let Some(w) = out.as_mut() {
                        line.clear();
                        // Serializing plain fields cannot fail.
                        let _ = serde_json::to_writer(&mut line, ev);
                        line.push(b'\n');
                        if let Err(e) = w.write_all(&line).await {
                            metrics.event_write_failed();
                            tracing::error!(error = %e, "cannot write event");
                        }
                    }
                    if let Some(h) = hooks.as_ref() {
                        h.submit(ev);
                    }
                }
                if let Some(w) = out.as_mut()
                    && let Err(e) = w.flush().await
                {
                    metrics.event_write_failed();
                    tracing::error!(error = %e, "cannot flush events");
                }
            }
            Msg::Reopen => {
                if let Destination::File(p) = &dest {
                    match open(&dest).await {
                        Ok(o) => {
                            out = o;
                            tracing::info!(path = %p.display(), "events file reopened");
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "keeping the old events file")
                        }
                    }
                }
            }
            Msg::Flush(ack) => {
                if let Some(w) = out.as_mut() {
                    let _ = w.flush().await;
                }
                let _ = ack.send(());
            }
        }
    }
}

/// RFC 3339 UTC timestamp of the wall clock now, millisecond precision.
pub fn now_rfc3339() -> String {
    use time::format_description::well_known::Rfc3339;
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now);
    now.format(&Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_line_has_the_contract_fields() {
        let ev = Event {
            seq: 3,
            ts: now_rfc3339(),
            node_id: 42,
            event: EventKind::Restarted,
            previous: Status::Dead,
            state: Status::Alive,
            phi: 0.1,
            generation: 8,
            prev_generation: Some(7),
            last_seen_ms: Some(12),
            interval_ms: 1000,
            accepted: 5,
            lost: 0,
            restarts: 1,
        };
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "restarted");
        assert_eq!(v["previous"], "dead");
        assert_eq!(v["node_id"], 42);
        assert_eq!(v["prev_generation"], 7);
        let ts = v["ts"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
        assert!(ts.ends_with('Z'), "{ts}");
    }
}
