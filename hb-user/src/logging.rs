//! Logging through `tracing`, to stderr, filtered by `--log` / `HB_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. An unparsable filter falls back to
/// `info` with a warning rather than failing the program.
pub fn init(filter: &str) {
    let (filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    // Colours only for a terminal: not in the journal, a file or a pipe.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(e) = bad {
        tracing::warn!(error = %e, "invalid log filter, using info");
    }
}
