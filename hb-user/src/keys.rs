//! Placeholder: being built (see the open issues).

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Placeholder.
    Show,
}

pub fn run(_cmd: Cmd) -> anyhow::Result<()> {
    anyhow::bail!("`hb keys` is not built yet")
}
