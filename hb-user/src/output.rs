//! What the commands print on stdout, for people and scripts.

use std::io::Write as _;

use anyhow::Context as _;

/// Writes `text` to stdout. A reader that went away (`| head`) ends the
/// output quietly, as it does for any Unix filter: not a panic, not an
/// error.
pub fn stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}
