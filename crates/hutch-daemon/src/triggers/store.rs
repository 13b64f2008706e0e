//! Runs, deliveries and schedule state behind the daemon's [`Store`]. A run's row is written (with its
//! delivery id, in one transaction) before the webhook is answered, and moves forward only:
//! queued → running → succeeded / failed / cancelled / timed_out, each end with its reason.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::store::{db, now_ms, Store};
use crate::DaemonError;

/// Schema version 2 (see `store::MIGRATIONS`).
pub(crate) const MIGRATION_RUNS: &str = r#"
    CREATE TABLE runs (
        id               TEXT PRIMARY KEY,
        trigger          TEXT NOT NULL,
        source           TEXT NOT NULL,
        event            TEXT NOT NULL,
        delivery         TEXT,
        state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out')),
        reason           TEXT,
        plan             TEXT NOT NULL,
        payload          BLOB NOT NULL,
        concurrency_key  TEXT,
        retry_of         TEXT,
        created_ms       INTEGER NOT NULL,
        started_ms       INTEGER,
        command_ms       INTEGER,
        first_output_ms  INTEGER,
        command_end_ms   INTEGER,
        delivered_ms     INTEGER,
        ended_ms         INTEGER,
        exit_code        INTEGER,
        sandbox          TEXT,
        daemon_pid       INTEGER,
        branch           TEXT,
        pull_request     TEXT,
        held_back        TEXT
    );
    CREATE INDEX runs_by_state ON runs(state, created_ms);
    CREATE INDEX runs_by_key ON runs(concurrency_key, state);
    CREATE TABLE deliveries (
        trigger      TEXT NOT NULL,
        delivery     TEXT NOT NULL,
        run          TEXT,
        received_ms  INTEGER NOT NULL,
        PRIMARY KEY (trigger, delivery)
    );
    CREATE TABLE schedules (
        trigger       TEXT PRIMARY KEY,
        last_fire_ms  INTEGER NOT NULL
    );
"#;

/// One run as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunRow {
    pub id: String,
    pub trigger: String,
    /// `webhook`, `schedule` or `retry`.
    pub source: String,
    /// The event's kind (`issue_comment`, `schedule`, ...).
    pub event: String,
    pub delivery: Option<String>,
    /// queued, running, succeeded, failed, cancelled, timed_out.
    pub state: String,
    pub reason: Option<String>,
    /// The checked values the run was made from (repository, ref, issue, ...), as JSON.
    pub plan: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub concurrency_key: Option<String>,
    pub retry_of: Option<String>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub command_ms: Option<i64>,
    pub first_output_ms: Option<i64>,
    pub command_end_ms: Option<i64>,
    pub delivered_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub sandbox: Option<String>,
    pub daemon_pid: Option<i64>,
    pub branch: Option<String>,
    pub pull_request: Option<String>,
    /// Sensitive paths held back from delivery, as JSON.
    pub held_back: Option<String>,
}

impl RunRow {
    #[allow(clippy::too_many_arguments)]
    pub fn new(id: String, trigger: &str, source: &str, event: &str, delivery: Option<String>, plan: String, payload: Vec<u8>, key: Option<String>) -> RunRow {
        RunRow {
            id,
            trigger: trigger.into(),
            source: source.into(),
            event: event.into(),
            delivery,
            state: "queued".into(),
            reason: None,
            plan,
            payload,
            concurrency_key: key,
            retry_of: None,
            created_ms: now_ms(),
            started_ms: None,
            command_ms: None,
            first_output_ms: None,
            command_end_ms: None,
            delivered_ms: None,
            ended_ms: None,
            exit_code: None,
            sandbox: None,
            daemon_pid: None,
            branch: None,
            pull_request: None,
            held_back: None,
        }
    }

    pub fn ended(&self) -> bool {
        !matches!(self.state.as_str(), "queued" | "running")
    }
}

const COLS: &str = "id, trigger, source, event, delivery, state, reason, plan, payload, concurrency_key, retry_of, created_ms, started_ms, command_ms, first_output_ms, command_end_ms, delivered_ms, ended_ms, exit_code, sandbox, daemon_pid, branch, pull_request, held_back";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        trigger: r.get(1)?,
        source: r.get(2)?,
        event: r.get(3)?,
        delivery: r.get(4)?,
        state: r.get(5)?,
        reason: r.get(6)?,
        plan: r.get(7)?,
        payload: r.get(8)?,
        concurrency_key: r.get(9)?,
        retry_of: r.get(10)?,
        created_ms: r.get(11)?,
        started_ms: r.get(12)?,
        command_ms: r.get(13)?,
        first_output_ms: r.get(14)?,
        command_end_ms: r.get(15)?,
        delivered_ms: r.get(16)?,
        ended_ms: r.get(17)?,
        exit_code: r.get(18)?,
        sandbox: r.get(19)?,
        daemon_pid: r.get(20)?,
        branch: r.get(21)?,
        pull_request: r.get(22)?,
        held_back: r.get(23)?,
    })
}

/// What inserting a delivery's run did.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The delivery id was seen before; the run it made, if any.
    Duplicate(Option<String>),
}

/// A timestamp column a run fills as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Mark {
    Command,
    FirstOutput,
    CommandEnd,
    Delivered,
}

impl Store {
    fn insert_run_tx(tx: &rusqlite::Transaction<'_>, r: &RunRow) -> rusqlite::Result<usize> {
        tx.execute(
            &format!("INSERT INTO runs ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)"),
            params![
                r.id, r.trigger, r.source, r.event, r.delivery, r.state, r.reason, r.plan, r.payload, r.concurrency_key, r.retry_of,
                r.created_ms, r.started_ms, r.command_ms, r.first_output_ms, r.command_end_ms, r.delivered_ms, r.ended_ms, r.exit_code,
                r.sandbox, r.daemon_pid, r.branch, r.pull_request, r.held_back
            ],
        )
    }

    /// Records `delivery` of `trigger` and, when `run` is given, its run, in one transaction: a delivery id is
    /// acted on once.
    pub fn insert_delivery(&self, trigger: &str, delivery: &str, run: Option<&RunRow>) -> Result<Inserted, DaemonError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db("begin a delivery"))?;
        let seen: Option<Option<String>> = tx
            .query_row("SELECT run FROM deliveries WHERE trigger = ?1 AND delivery = ?2", params![trigger, delivery], |r| r.get(0))
            .optional()
            .map_err(db("look up a delivery"))?;
        if let Some(run) = seen {
            return Ok(Inserted::Duplicate(run));
        }
        tx.execute(
            "INSERT INTO deliveries (trigger, delivery, run, received_ms) VALUES (?1, ?2, ?3, ?4)",
            params![trigger, delivery, run.map(|r| r.id.clone()), now_ms()],
        )
        .map_err(db("record a delivery"))?;
        if let Some(r) = run {
            Self::insert_run_tx(&tx, r).map_err(db("insert a run"))?;
        }
        tx.commit().map_err(db("commit a delivery"))?;
        Ok(Inserted::New)
    }

    pub fn insert_run(&self, r: &RunRow) -> Result<(), DaemonError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db("begin a run"))?;
        Self::insert_run_tx(&tx, r).map_err(db("insert a run"))?;
        tx.commit().map_err(db("commit a run"))
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRow>, DaemonError> {
        self.conn().query_row(&format!("SELECT {COLS} FROM runs WHERE id = ?1"), params![id], row).optional().map_err(db("read a run"))
    }

    /// Runs newest first, optionally of one state or trigger.
    pub fn runs(&self, state: Option<&str>, trigger: Option<&str>, limit: u32) -> Result<Vec<RunRow>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!(
                "SELECT {COLS} FROM runs WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR trigger = ?2) ORDER BY created_ms DESC, id LIMIT ?3"
            ))
            .map_err(db("list runs"))?;
        let rows = st.query_map(params![state, trigger, limit], row).map_err(db("list runs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list runs"))
    }

    /// Queued runs, oldest first.
    pub fn queued_runs(&self) -> Result<Vec<RunRow>, DaemonError> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {COLS} FROM runs WHERE state = 'queued' ORDER BY created_ms, id")).map_err(db("list runs"))?;
        let rows = st.query_map([], row).map_err(db("list runs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list runs"))
    }

    /// Unfinished runs with `key`, other than `except`.
    pub fn runs_with_key(&self, key: &str, except: &str) -> Result<Vec<RunRow>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!("SELECT {COLS} FROM runs WHERE concurrency_key = ?1 AND id != ?2 AND state IN ('queued', 'running') ORDER BY created_ms"))
            .map_err(db("list runs"))?;
        let rows = st.query_map(params![key, except], row).map_err(db("list runs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list runs"))
    }

    /// queued → running, by this daemon; whether it moved (a run cancelled meanwhile stays cancelled).
    pub fn start_run(&self, id: &str) -> Result<bool, DaemonError> {
        let n = self
            .conn()
            .execute(
                "UPDATE runs SET state = 'running', started_ms = ?2, daemon_pid = ?3 WHERE id = ?1 AND state = 'queued'",
                params![id, now_ms(), std::process::id() as i64],
            )
            .map_err(db("start a run"))?;
        Ok(n > 0)
    }

    pub fn set_run_sandbox(&self, id: &str, sandbox: &str) -> Result<(), DaemonError> {
        self.conn().execute("UPDATE runs SET sandbox = ?2 WHERE id = ?1", params![id, sandbox]).map_err(db("update a run"))?;
        Ok(())
    }

    pub fn mark_run(&self, id: &str, what: Mark, ms: i64) -> Result<(), DaemonError> {
        let col = match what {
            Mark::Command => "command_ms",
            Mark::FirstOutput => "first_output_ms",
            Mark::CommandEnd => "command_end_ms",
            Mark::Delivered => "delivered_ms",
        };
        self.conn().execute(&format!("UPDATE runs SET {col} = ?2 WHERE id = ?1 AND {col} IS NULL"), params![id, ms]).map_err(db("update a run"))?;
        Ok(())
    }

    pub fn set_run_exit(&self, id: &str, code: Option<i64>) -> Result<(), DaemonError> {
        self.conn().execute("UPDATE runs SET exit_code = ?2 WHERE id = ?1", params![id, code]).map_err(db("update a run"))?;
        Ok(())
    }

    pub fn set_run_delivery(&self, id: &str, branch: Option<&str>, pr: Option<&str>, held_back: Option<&str>) -> Result<(), DaemonError> {
        self.conn()
            .execute("UPDATE runs SET branch = ?2, pull_request = ?3, held_back = ?4 WHERE id = ?1", params![id, branch, pr, held_back])
            .map_err(db("update a run"))?;
        Ok(())
    }

    /// Ends an unfinished run with `state` and why; whether it was unfinished.
    pub fn end_run(&self, id: &str, state: &str, reason: &str) -> Result<bool, DaemonError> {
        let n = self
            .conn()
            .execute(
                "UPDATE runs SET state = ?2, reason = ?3, ended_ms = ?4 WHERE id = ?1 AND state IN ('queued', 'running')",
                params![id, state, reason, now_ms()],
            )
            .map_err(db("end a run"))?;
        Ok(n > 0)
    }

    pub fn count_runs_by_state(&self) -> Result<Vec<(String, i64)>, DaemonError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT state, COUNT(*) FROM runs GROUP BY state").map_err(db("count runs"))?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db("count runs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("count runs"))
    }

    pub fn schedule_last(&self, trigger: &str) -> Result<Option<i64>, DaemonError> {
        self.conn()
            .query_row("SELECT last_fire_ms FROM schedules WHERE trigger = ?1", params![trigger], |r| r.get(0))
            .optional()
            .map_err(db("read a schedule"))
    }

    pub fn set_schedule_last(&self, trigger: &str, ms: i64) -> Result<(), DaemonError> {
        self.conn()
            .execute(
                "INSERT INTO schedules (trigger, last_fire_ms) VALUES (?1, ?2) ON CONFLICT(trigger) DO UPDATE SET last_fire_ms = excluded.last_fire_ms",
                params![trigger, ms],
            )
            .map_err(db("record a schedule"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_makes_one_run_and_runs_move_forward_only() {
        let s = Store::open_in_memory().unwrap();
        let r = RunRow::new("r1".into(), "fix", "webhook", "issue_comment", Some("d1".into()), "{}".into(), b"{}".to_vec(), Some("k".into()));
        assert_eq!(s.insert_delivery("fix", "d1", Some(&r)).unwrap(), Inserted::New);
        let mut r2 = r.clone();
        r2.id = "r2".into();
        assert_eq!(s.insert_delivery("fix", "d1", Some(&r2)).unwrap(), Inserted::Duplicate(Some("r1".into())));
        assert!(s.run("r2").unwrap().is_none());
        assert_eq!(s.insert_delivery("other", "d1", None).unwrap(), Inserted::New, "ids are per trigger");
        assert_eq!(s.queued_runs().unwrap().len(), 1);
        assert!(s.start_run("r1").unwrap());
        assert!(!s.start_run("r1").unwrap());
        assert!(s.end_run("r1", "succeeded", "delivered").unwrap());
        assert!(!s.end_run("r1", "failed", "late").unwrap());
        let got = s.run("r1").unwrap().unwrap();
        assert_eq!((got.state.as_str(), got.reason.as_deref()), ("succeeded", Some("delivered")));
        assert!(s.runs_with_key("k", "x").unwrap().is_empty());
    }
}
