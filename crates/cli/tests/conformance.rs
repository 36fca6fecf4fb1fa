//! Third-party conformance suites against a real spinfs mount: pjdfstest (POSIX semantics,
//! failures must equal the checked-in expected list exactly) and fsx (data integrity under
//! random operations of every kind).

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_script(cmd: &mut Command) {
    let out = cmd.output().expect("run script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Shown with --no-capture and on failure.
    println!("{text}");
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
}

#[test]
fn pjdfstest_failures_are_exactly_the_expected_ones() {
    let m = Mounted::new(&[]);
    common::set_mode(&m.mnt, 0o755);
    let dir = m.path("pjd");
    std::fs::create_dir(&dir).unwrap();
    common::set_mode(&dir, 0o777);
    run_script(
        Command::new(repo().join("scripts/pjdfstest.sh"))
            .arg(&dir)
            .arg(repo().join("tests/pjdfstest/spinfs.expected")),
    );
}

#[test]
fn fsx_100k_operations_of_every_kind() {
    let m = Mounted::new(&[]);
    let nops = std::env::var("SPINFS_FSX_OPS").unwrap_or_else(|_| "100000".into());
    run_script(
        Command::new(repo().join("scripts/fsx.sh"))
            .arg(&m.mnt)
            .arg(&nops),
    );
}
