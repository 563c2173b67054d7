//! Placeholder: being built (see the open issues).

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`hb send` is not built yet")
}
