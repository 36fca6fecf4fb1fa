//! The `spinfs` command: argument parsing and wiring of the library crates.

mod image_cmd;
mod media_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "spinfs", version, about = "A tiered archival filesystem")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with EROFS image pairs directly (build, merge, list, cat).
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Inspect and verify the archive media of a store.
    #[command(subcommand)]
    Media(media_cmd::MediaCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(cmd) => image_cmd::run(cmd),
        Command::Media(cmd) => media_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spinfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
