//! `hutch runs ls|show|logs [-f]|cancel|retry`: event-triggered runs on a daemon (an admin token). Text a run
//! carries from an event or a VM (reasons, output) is escaped before it reaches the terminal.

use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::Value;

use crate::remote::{Api, Conn};

#[derive(Debug, Subcommand)]
pub enum RunsCmd {
    /// List runs, newest first.
    Ls(RunsLsArgs),
    /// A run's record: state, reason, timings, sandbox, branch, pull request.
    Show(RunArgs),
    /// A run's output (setup and command); -f follows it until the run ends.
    Logs(RunLogsArgs),
    /// Cancel a queued or running run (its VM is destroyed).
    Cancel(RunArgs),
    /// Queue a new run of an ended run's event.
    Retry(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunsLsArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Only runs in this state (queued, running, succeeded, failed, cancelled, timed_out).
    #[arg(long)]
    pub state: Option<String>,
    /// Only runs of this trigger.
    #[arg(long)]
    pub trigger: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_run_id)]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunLogsArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_run_id)]
    pub id: String,
    /// Keep printing output as it comes until the run ends.
    #[arg(short, long)]
    pub follow: bool,
}

/// A run id: `r` and 12 lowercase hex digits.
fn parse_run_id(s: &str) -> Result<String, String> {
    let ok = s.len() == 13 && s.starts_with('r') && s[1..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{:?} is not a run id (r and 12 lowercase hex digits, as `hutch runs ls` prints)", hutch_text::escape(s)))
    }
}

pub async fn runs(c: RunsCmd) -> anyhow::Result<i32> {
    match c {
        RunsCmd::Ls(a) => ls(a).await,
        RunsCmd::Show(a) => {
            let api = Api::new(&a.conn)?;
            let r: Value = api.json(reqwest::Method::GET, &format!("/v1/runs/{}", a.id), None::<&()>).await?;
            print_run(&r, a.json)
        }
        RunsCmd::Cancel(a) => {
            let api = Api::new(&a.conn)?;
            let r: Value = api.json(reqwest::Method::POST, &format!("/v1/runs/{}/cancel", a.id), None::<&()>).await?;
            print_run(&r, a.json)
        }
        RunsCmd::Retry(a) => {
            let api = Api::new(&a.conn)?;
            let r: Value = api.json(reqwest::Method::POST, &format!("/v1/runs/{}/retry", a.id), None::<&()>).await?;
            if a.json {
                println!("{r}");
            } else {
                println!("{}", s(&r, "id"));
            }
            Ok(0)
        }
        RunsCmd::Logs(a) => logs(a).await,
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(t)) => hutch_text::escape(t).into_owned(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn secs(v: &Value, from: &str, to: &str) -> Option<f64> {
    Some((v.get(to)?.as_i64()? - v.get(from)?.as_i64()?) as f64 / 1000.0)
}

fn print_run(r: &Value, json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{r}");
        return Ok(0);
    }
    for k in ["id", "trigger", "source", "event", "delivery", "state", "reason", "sandbox", "exit_code", "branch", "pull_request", "held_back", "retry_of"] {
        println!("{k:<14}{}", s(r, k));
    }
    if let Some(plan) = r.get("plan").and_then(|p| p.as_str()).and_then(|p| serde_json::from_str::<Value>(p).ok()) {
        println!("{:<14}{}/{} at {}", "repository", s(&plan, "owner"), s(&plan, "repo"), s(&plan, "git_ref"));
    }
    for (label, from, to) in [
        ("queued", "created_ms", "started_ms"),
        ("to command", "created_ms", "command_ms"),
        ("first output", "created_ms", "first_output_ms"),
        ("command", "command_ms", "command_end_ms"),
        ("delivered at", "created_ms", "delivered_ms"),
        ("total", "created_ms", "ended_ms"),
    ] {
        if let Some(t) = secs(r, from, to) {
            println!("{label:<14}{t:.2} s");
        }
    }
    Ok(0)
}

async fn ls(a: RunsLsArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let mut q = vec![];
    if let Some(st) = &a.state {
        q.push(format!("state={st}"));
    }
    if let Some(t) = &a.trigger {
        q.push(format!("trigger={t}"));
    }
    let path = if q.is_empty() { "/v1/runs".to_string() } else { format!("/v1/runs?{}", q.join("&")) };
    let r: Value = api.json(reqwest::Method::GET, &path, None::<&()>).await?;
    if a.json {
        println!("{r}");
        return Ok(0);
    }
    let runs = r.get("runs").and_then(|v| v.as_array()).cloned().unwrap_or_default();
    println!("{:<15}{:<20}{:<12}{:<16}REASON", "ID", "TRIGGER", "STATE", "EVENT");
    for run in runs {
        println!("{:<15}{:<20}{:<12}{:<16}{}", s(&run, "id"), s(&run, "trigger"), s(&run, "state"), s(&run, "event"), hutch_text::shorten(&s(&run, "reason"), 80));
    }
    Ok(0)
}

async fn logs(a: RunLogsArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let path = format!("/v1/runs/{}/logs{}", a.id, if a.follow { "?follow=true" } else { "" });
    let resp = api.send(api.req(reqwest::Method::GET, &path)).await?;
    let mut body = resp.bytes_stream();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the run's output")?;
        // VM output: escaped, line breaks and tabs kept.
        out.write_all(hutch_text::escape_lines(&chunk).as_bytes())?;
        out.flush()?;
    }
    Ok(0)
}
