//! `spinfs image ...` subcommands.

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum ImageCmd {
    /// Placeholder until the image crate lands.
    Unavailable,
}

pub fn run(_cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the image commands are not built yet")
}
