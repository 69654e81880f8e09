//! The `homeport` CLI end to end: exit codes and messages a person sees.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::path::Path;
use std::process::Output;

use anyhow::Result;
use common::*;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn cli(w: &World, args: &[&str]) -> Result<Output> {
    w.agent.cli(Path::new(HOMEPORT), args)
}

#[tokio::test]
async fn cli_lifecycle_and_errors() -> Result<()> {
    let w = World::new()?;
    let dir = tempfile::tempdir()?;

    // validate: every problem with line and column; non-zero exit.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"Hello\"\nimage = \"x\"\nimgae = \"y\"\n")?;
    let o = cli(&w, &["validate", bad.to_str().unwrap_or_default()])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("bad.toml:3:1: imgae: unknown field"),
        "{}",
        text(&o)
    );
    std::fs::write(&bad, "name = \"Hello\"\nimage = \"UPPER/x\"\n")?;
    let o = cli(&w, &["validate", bad.to_str().unwrap_or_default()])?;
    assert!(
        text(&o).contains("1:8: name:") && text(&o).contains("2:9: image:"),
        "{}",
        text(&o)
    );

    // install, ls, inspect, exec (exit code passes through), logs, history, rm.
    let good = dir.path().join("hello.toml");
    std::fs::write(
        &good,
        w.manifest(
            "hello",
            "hello:1",
            "[[volume]]\nname = \"data\"\npath = \"/data\"\n",
        ),
    )?;
    let g = good.to_str().unwrap_or_default();
    assert!(cli(&w, &["validate", g])?.status.success());
    let o = cli(&w, &["install", g])?;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("installed hello"), "{}", text(&o));
    assert!(
        text(&o).contains("layers 3/3"),
        "progress shows layers: {}",
        text(&o)
    );
    wait_running(&w.client(), "hello").await?;
    let o = cli(&w, &["install", g])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("an app named hello is already installed"),
        "{}",
        text(&o)
    );

    let o = cli(&w, &["ls"])?;
    assert!(
        text(&o).contains("hello") && text(&o).contains("running"),
        "{}",
        text(&o)
    );
    let o = cli(&w, &["exec", "hello", "--", "sh", "-c", "echo out; exit 5"])?;
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    let o = cli(&w, &["inspect", "hello"])?;
    assert!(
        text(&o).contains("volumes:") && text(&o).contains("/data"),
        "{}",
        text(&o)
    );
    cli(
        &w,
        &[
            "exec",
            "hello",
            "--",
            "wget",
            "-qO-",
            "http://127.0.0.1:8080/",
        ],
    )?;
    let o = cli(&w, &["logs", "--tail", "1", "hello"])?;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "{}",
        text(&o)
    );
    assert!(cli(&w, &["stop", "hello"])?.status.success());
    assert!(cli(&w, &["start", "hello"])?.status.success());
    let o = cli(&w, &["history", "hello"])?;
    let h = text(&o);
    assert!(
        h.contains("install")
            && h.contains("stop")
            && h.contains("start")
            && h.contains("root (uid 0)"),
        "{h}"
    );
    let o = cli(&w, &["images"])?;
    assert!(
        text(&o).contains("hello:1") && text(&o).contains("hello"),
        "{}",
        text(&o)
    );

    let o = cli(&w, &["update", "hello"])?;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("hello is up to date"), "{}", text(&o));

    // Unknown app: clear message, non-zero.
    let o = cli(&w, &["inspect", "nope"])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("no app named nope is installed"),
        "{}",
        text(&o)
    );
    let o = cli(&w, &["start", "Not_A_Name"])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not a valid app name"), "{}", text(&o));

    let o = cli(&w, &["rm", "hello", "--purge-data"])?;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&cli(&w, &["ls"])?).lines().count() == 1,
        "only the header is left"
    );
    let o = cli(&w, &["images", "prune"])?;
    assert!(text(&o).contains("1 images, 3 layers"), "{}", text(&o));

    // No agent: a message that says so.
    let o = std::process::Command::new(HOMEPORT)
        .args(["--socket", "/nonexistent.sock", "ls"])
        .output()?;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cannot reach the agent"), "{}", text(&o));
    Ok(())
}
