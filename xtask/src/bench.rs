//! `cargo xtask bench`.
use anyhow::{Result, bail};

#[derive(clap::Args)]
pub struct Args {
    /// One short round of each scenario.
    #[arg(long)]
    quick: bool,
}

pub fn run(_args: Args) -> Result<()> {
    bail!("the benchmark is not written yet")
}
