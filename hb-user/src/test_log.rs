//! What a module logs at WARN and above (or from another level up), for
//! tests that count lines.

use std::sync::{Arc, Mutex};

/// One line: its level, its message and its other fields, as logged.
#[derive(Clone, Debug)]
pub struct Warning {
    pub level: tracing::Level,
    pub message: String,
    pub fields: Vec<(&'static str, String)>,
}

impl Warning {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The lines one module (`target`) logs at WARN and above (or at
/// `level` and above) on the threads where [`Warnings::capture`] is in
/// force.
#[derive(Clone)]
pub struct Warnings {
    target: &'static str,
    level: tracing::Level,
    pub lines: Arc<Mutex<Vec<Warning>>>,
}

impl Warnings {
    pub fn of(target: &'static str) -> Warnings {
        Warnings::from_level(target, tracing::Level::WARN)
    }

    /// The lines of `target` at `level` and above (INFO: also what it
    /// says when a problem ends).
    pub fn from_level(target: &'static str, level: tracing::Level) -> Warnings {
        Warnings {
            target,
            level,
            lines: Arc::default(),
        }
    }

    /// Captures this thread's lines until the guard is dropped.
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        use tracing_subscriber::layer::SubscriberExt as _;
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    pub fn taken(&self) -> Vec<Warning> {
        self.lines.lock().unwrap().clone()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if meta.target() != self.target || *meta.level() > self.level {
            return;
        }
        let mut line = Warning {
            level: *meta.level(),
            message: String::new(),
            fields: Vec::new(),
        };
        event.record(
            &mut |f: &tracing::field::Field, v: &dyn std::fmt::Debug| match f.name() {
                "message" => line.message = format!("{v:?}"),
                name => line.fields.push((name, format!("{v:?}"))),
            },
        );
        self.lines.lock().unwrap().push(line);
    }
}
