//! `spinfs media ...` subcommands.

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum MediaCmd {
    /// Placeholder until the media crate lands.
    Unavailable,
}

pub fn run(_cmd: MediaCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the media commands are not built yet")
}
