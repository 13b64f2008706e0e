//! The daemon's state in an embedded SQLite database: tokens (hashed), sandbox records, encrypted secrets and
//! audit records. The schema is versioned with `PRAGMA user_version`; migrations run in order, each in its
//! own transaction, and a database written by a newer daemon is refused rather than guessed at.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::DaemonError;

/// Migration N (1-based) takes the schema from version N-1 to N. Append only; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: tokens, sandboxes, secrets, audit.
    r#"
    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        hash          TEXT NOT NULL,
        admin         INTEGER NOT NULL DEFAULT 0,
        max_sandboxes INTEGER,
        created_ms    INTEGER NOT NULL,
        revoked_ms    INTEGER
    );
    CREATE TABLE sandboxes (
        id          TEXT PRIMARY KEY,
        owner       TEXT NOT NULL REFERENCES tokens(id),
        state       TEXT NOT NULL CHECK (state IN ('creating', 'running', 'destroying', 'destroyed', 'failed')),
        spec        TEXT NOT NULL,
        labels      TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        started_ms  INTEGER,
        ended_ms    INTEGER,
        end_reason  TEXT,
        vm_id       TEXT,
        vmm_pid     INTEGER,
        daemon_pid  INTEGER NOT NULL,
        start_mode  TEXT,
        start_ms    INTEGER
    );
    CREATE INDEX sandboxes_by_owner ON sandboxes(owner, state);
    CREATE INDEX sandboxes_by_state ON sandboxes(state, expires_ms);
    CREATE TABLE secrets (
        name        TEXT PRIMARY KEY,
        hosts       TEXT NOT NULL,
        nonce       BLOB NOT NULL,
        ciphertext  BLOB NOT NULL,
        created_ms  INTEGER NOT NULL,
        updated_ms  INTEGER NOT NULL
    );
    CREATE TABLE egress_audit (
        sandbox  TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        record   TEXT NOT NULL,
        PRIMARY KEY (sandbox, seq)
    );
    "#,
    // 2: a `paused` state (the VM saved to disk in the data directory). SQLite cannot change a CHECK, so the
    // table is rebuilt with the same columns.
    r#"
    CREATE TABLE sandboxes_v2 (
        id          TEXT PRIMARY KEY,
        owner       TEXT NOT NULL REFERENCES tokens(id),
        state       TEXT NOT NULL CHECK (state IN ('creating', 'running', 'destroying', 'destroyed', 'failed', 'paused')),
        spec        TEXT NOT NULL,
        labels      TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        started_ms  INTEGER,
        ended_ms    INTEGER,
        end_reason  TEXT,
        vm_id       TEXT,
        vmm_pid     INTEGER,
        daemon_pid  INTEGER NOT NULL,
        start_mode  TEXT,
        start_ms    INTEGER
    );
    INSERT INTO sandboxes_v2 SELECT id, owner, state, spec, labels, created_ms, expires_ms, started_ms, ended_ms, end_reason, vm_id, vmm_pid, daemon_pid, start_mode, start_ms FROM sandboxes;
    DROP TABLE sandboxes;
    ALTER TABLE sandboxes_v2 RENAME TO sandboxes;
    CREATE INDEX sandboxes_by_owner ON sandboxes(owner, state);
    CREATE INDEX sandboxes_by_state ON sandboxes(state, expires_ms);
    "#,
    // 3: event-triggered runs, webhook deliveries (for deduplication) and schedule state.
    crate::triggers::store::MIGRATION_RUNS,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// One connection shared behind a mutex: every statement is short, and SQLite serializes writers anyway.
pub struct Store {
    conn: Mutex<Connection>,
}

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub hash: String,
    pub admin: bool,
    pub max_sandboxes: Option<u32>,
    pub created_ms: i64,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct SandboxRow {
    pub id: String,
    pub owner: String,
    pub state: String,
    pub spec: String,
    pub labels: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
    pub vm_id: Option<String>,
    pub vmm_pid: Option<i64>,
    pub daemon_pid: i64,
    pub start_mode: Option<String>,
    pub start_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct SecretRow {
    pub name: String,
    pub hosts: Vec<String>,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn db(what: &'static str) -> impl FnOnce(rusqlite::Error) -> DaemonError {
    move |source| DaemonError::Db { what, source }
}

const SANDBOX_COLS: &str = "id, owner, state, spec, labels, created_ms, expires_ms, started_ms, ended_ms, end_reason, vm_id, vmm_pid, daemon_pid, start_mode, start_ms";

fn sandbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    Ok(SandboxRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        state: r.get(2)?,
        spec: r.get(3)?,
        labels: r.get(4)?,
        created_ms: r.get(5)?,
        expires_ms: r.get(6)?,
        started_ms: r.get(7)?,
        ended_ms: r.get(8)?,
        end_reason: r.get(9)?,
        vm_id: r.get(10)?,
        vmm_pid: r.get(11)?,
        daemon_pid: r.get(12)?,
        start_mode: r.get(13)?,
        start_ms: r.get(14)?,
    })
}

impl Store {
    /// Opens (creating if needed) `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, DaemonError> {
        let conn = Connection::open(path).map_err(|source| DaemonError::Db { what: "open the database", source })?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store, DaemonError> {
        Self::init(Connection::open_in_memory().map_err(db("open the database"))?)
    }

    fn init(mut conn: Connection) -> Result<Store, DaemonError> {
        // The CLI (`hutch token create`, `hutch secret set`) writes while the daemon runs: WAL lets readers go
        // on, and the busy timeout makes a writer wait its turn instead of failing.
        conn.busy_timeout(Duration::from_secs(10)).map_err(db("set the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(db("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db("enable foreign keys"))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db("read the schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(DaemonError::SchemaTooNew { found: version, known: SCHEMA_VERSION });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(db("begin a migration"))?;
            tx.execute_batch(sql).map_err(db("apply a migration"))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(db("record the schema version"))?;
            tx.commit().map_err(db("commit a migration"))?;
        }
        Ok(Store { conn: Mutex::new(conn) })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (statements are atomic), so a
        // poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64, DaemonError> {
        self.conn().pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db("read the schema version"))
    }

    // --- tokens ---

    pub fn insert_token(&self, t: &TokenRow) -> Result<(), DaemonError> {
        let r = self.conn().execute(
            "INSERT INTO tokens (id, name, hash, admin, max_sandboxes, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![t.id, t.name, t.hash, t.admin, t.max_sandboxes, t.created_ms],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(DaemonError::Conflict(format!("a token named {:?} already exists (pick another --name)", t.name)))
            }
            Err(e) => Err(DaemonError::Db { what: "insert a token", source: e }),
        }
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRow>, DaemonError> {
        self.conn()
            .query_row(
                "SELECT id, name, hash, admin, max_sandboxes, created_ms, revoked_ms FROM tokens WHERE id = ?1",
                params![id],
                token_row,
            )
            .optional()
            .map_err(db("read a token"))
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT id, name, hash, admin, max_sandboxes, created_ms, revoked_ms FROM tokens ORDER BY created_ms")
            .map_err(db("list tokens"))?;
        let rows = st.query_map([], token_row).map_err(db("list tokens"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list tokens"))
    }

    /// Revokes by name; returns whether a live token had that name.
    pub fn revoke_token(&self, name: &str) -> Result<bool, DaemonError> {
        let n = self
            .conn()
            .execute("UPDATE tokens SET revoked_ms = ?1 WHERE name = ?2 AND revoked_ms IS NULL", params![now_ms(), name])
            .map_err(db("revoke a token"))?;
        Ok(n > 0)
    }

    // --- sandboxes ---

    pub fn insert_sandbox(&self, s: &SandboxRow) -> Result<(), DaemonError> {
        self.conn()
            .execute(
                &format!("INSERT INTO sandboxes ({SANDBOX_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
                params![
                    s.id,
                    s.owner,
                    s.state,
                    s.spec,
                    s.labels,
                    s.created_ms,
                    s.expires_ms,
                    s.started_ms,
                    s.ended_ms,
                    s.end_reason,
                    s.vm_id,
                    s.vmm_pid,
                    s.daemon_pid,
                    s.start_mode,
                    s.start_ms
                ],
            )
            .map_err(db("insert a sandbox"))?;
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, DaemonError> {
        self.conn()
            .query_row(&format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1"), params![id], sandbox_row)
            .optional()
            .map_err(db("read a sandbox"))
    }

    /// Sandboxes of `owner` (all owners when `None`), newest first, optionally in one state.
    pub fn sandboxes(&self, owner: Option<&str>, state: Option<&str>) -> Result<Vec<SandboxRow>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!(
                "SELECT {SANDBOX_COLS} FROM sandboxes WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY created_ms DESC, id"
            ))
            .map_err(db("list sandboxes"))?;
        let rows = st.query_map(params![owner, state], sandbox_row).map_err(db("list sandboxes"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list sandboxes"))
    }

    /// Sandboxes that are not finished (creating, running, destroying).
    pub fn unfinished(&self) -> Result<Vec<SandboxRow>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE state IN ('creating', 'running', 'destroying')"))
            .map_err(db("list sandboxes"))?;
        let rows = st.query_map([], sandbox_row).map_err(db("list sandboxes"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list sandboxes"))
    }

    pub fn mark_running(&self, id: &str, vm_id: &str, vmm_pid: Option<u32>, mode: &str, start_ms: i64) -> Result<(), DaemonError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET state = 'running', started_ms = ?2, vm_id = ?3, vmm_pid = ?4, start_mode = ?5, start_ms = ?6 WHERE id = ?1",
                params![id, now_ms(), vm_id, vmm_pid, mode, start_ms],
            )
            .map_err(db("update a sandbox"))?;
        Ok(())
    }

    /// `running` -> `paused` (its VM saved to disk); returns whether it was running.
    pub fn mark_paused(&self, id: &str) -> Result<bool, DaemonError> {
        let n = self
            .conn()
            .execute("UPDATE sandboxes SET state = 'paused', vmm_pid = NULL WHERE id = ?1 AND state = 'running'", params![id])
            .map_err(db("update a sandbox"))?;
        Ok(n > 0)
    }

    /// `paused` -> `creating` for a resume by this daemon; false if it was not paused (another resume won).
    pub fn mark_resuming(&self, id: &str) -> Result<bool, DaemonError> {
        let n = self
            .conn()
            .execute(
                "UPDATE sandboxes SET state = 'creating', daemon_pid = ?2 WHERE id = ?1 AND state = 'paused'",
                params![id, std::process::id() as i64],
            )
            .map_err(db("update a sandbox"))?;
        Ok(n > 0)
    }

    /// `creating` -> `paused` again: a resume was refused before it touched the saved state.
    pub fn mark_back_paused(&self, id: &str) -> Result<(), DaemonError> {
        self.conn()
            .execute("UPDATE sandboxes SET state = 'paused' WHERE id = ?1 AND state = 'creating'", params![id])
            .map_err(db("update a sandbox"))?;
        Ok(())
    }

    /// Moves a sandbox to `destroying` unless it already ended; returns whether it did.
    pub fn mark_destroying(&self, id: &str) -> Result<bool, DaemonError> {
        let n = self
            .conn()
            .execute("UPDATE sandboxes SET state = 'destroying' WHERE id = ?1 AND state IN ('creating', 'running')", params![id])
            .map_err(db("update a sandbox"))?;
        Ok(n > 0)
    }

    /// Records the end of a sandbox (`destroyed` or `failed`) with why.
    pub fn mark_ended(&self, id: &str, state: &str, reason: &str) -> Result<(), DaemonError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET state = ?2, ended_ms = ?3, end_reason = ?4 WHERE id = ?1 AND state NOT IN ('destroyed', 'failed')",
                params![id, state, now_ms(), reason],
            )
            .map_err(db("update a sandbox"))?;
        Ok(())
    }

    pub fn set_expiry(&self, id: &str, expires_ms: i64) -> Result<(), DaemonError> {
        self.conn()
            .execute("UPDATE sandboxes SET expires_ms = ?2 WHERE id = ?1", params![id, expires_ms])
            .map_err(db("update a sandbox"))?;
        Ok(())
    }

    /// Running sandboxes whose time is up.
    pub fn expired(&self, now: i64) -> Result<Vec<String>, DaemonError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT id FROM sandboxes WHERE state = 'running' AND expires_ms <= ?1").map_err(db("list expired"))?;
        let rows = st.query_map(params![now], |r| r.get(0)).map_err(db("list expired"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list expired"))
    }

    pub fn count_by_state(&self) -> Result<Vec<(String, i64)>, DaemonError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT state, COUNT(*) FROM sandboxes GROUP BY state").map_err(db("count sandboxes"))?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db("count sandboxes"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("count sandboxes"))
    }

    // --- secrets ---

    pub fn put_secret(&self, s: &SecretRow) -> Result<(), DaemonError> {
        let hosts = serde_json::to_string(&s.hosts).map_err(|e| DaemonError::Internal(format!("encode hosts: {e}")))?;
        self.conn()
            .execute(
                "INSERT INTO secrets (name, hosts, nonce, ciphertext, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT(name) DO UPDATE SET hosts = excluded.hosts, nonce = excluded.nonce, ciphertext = excluded.ciphertext, updated_ms = excluded.updated_ms",
                params![s.name, hosts, s.nonce, s.ciphertext, s.updated_ms],
            )
            .map_err(db("store a secret"))?;
        Ok(())
    }

    pub fn secret(&self, name: &str) -> Result<Option<SecretRow>, DaemonError> {
        self.conn()
            .query_row(
                "SELECT name, hosts, nonce, ciphertext, created_ms, updated_ms FROM secrets WHERE name = ?1",
                params![name],
                secret_row,
            )
            .optional()
            .map_err(db("read a secret"))
    }

    pub fn secrets(&self) -> Result<Vec<SecretRow>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT name, hosts, nonce, ciphertext, created_ms, updated_ms FROM secrets ORDER BY name")
            .map_err(db("list secrets"))?;
        let rows = st.query_map([], secret_row).map_err(db("list secrets"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list secrets"))
    }

    pub fn delete_secret(&self, name: &str) -> Result<bool, DaemonError> {
        let n = self.conn().execute("DELETE FROM secrets WHERE name = ?1", params![name]).map_err(db("delete a secret"))?;
        Ok(n > 0)
    }

    // --- egress audit ---

    pub fn audit(&self, sandbox: &str, limit: u32) -> Result<Vec<String>, DaemonError> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT record FROM egress_audit WHERE sandbox = ?1 ORDER BY seq LIMIT ?2")
            .map_err(db("read the audit log"))?;
        let rows = st.query_map(params![sandbox, limit], |r| r.get(0)).map_err(db("read the audit log"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("read the audit log"))
    }

    pub fn append_audit(&self, sandbox: &str, record: &str) -> Result<(), DaemonError> {
        self.conn()
            .execute(
                "INSERT INTO egress_audit (sandbox, seq, record) VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM egress_audit WHERE sandbox = ?1), ?2)",
                params![sandbox, record],
            )
            .map_err(db("append to the audit log"))?;
        Ok(())
    }
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0)?,
        name: r.get(1)?,
        hash: r.get(2)?,
        admin: r.get(3)?,
        max_sandboxes: r.get(4)?,
        created_ms: r.get(5)?,
        revoked: r.get::<_, Option<i64>>(6)?.is_some(),
    })
}

fn secret_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SecretRow> {
    let hosts: String = r.get(1)?;
    Ok(SecretRow {
        name: r.get(0)?,
        hosts: serde_json::from_str(&hosts).unwrap_or_default(),
        nonce: r.get(2)?,
        ciphertext: r.get(3)?,
        created_ms: r.get(4)?,
        updated_ms: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_versioned_and_reopen_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        drop(s);
        // A database from a newer daemon is refused, not half-understood.
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(c);
        let err = Store::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn sandbox_states_move_forward_only() {
        let s = Store::open_in_memory().unwrap();
        s.insert_token(&TokenRow { id: "t1".into(), name: "a".into(), hash: "h".into(), admin: false, max_sandboxes: None, created_ms: 1, revoked: false })
            .unwrap();
        let row = SandboxRow {
            id: "s1".into(),
            owner: "t1".into(),
            state: "creating".into(),
            spec: "{}".into(),
            labels: "{}".into(),
            created_ms: 1,
            expires_ms: 10,
            started_ms: None,
            ended_ms: None,
            end_reason: None,
            vm_id: None,
            vmm_pid: None,
            daemon_pid: 1,
            start_mode: None,
            start_ms: None,
        };
        s.insert_sandbox(&row).unwrap();
        s.mark_running("s1", "vm", Some(42), "snapshot restore", 200).unwrap();
        assert_eq!(s.expired(5).unwrap(), Vec::<String>::new());
        assert_eq!(s.expired(10).unwrap(), vec!["s1".to_string()]);
        assert!(s.mark_destroying("s1").unwrap());
        s.mark_ended("s1", "destroyed", "deleted").unwrap();
        assert!(!s.mark_destroying("s1").unwrap(), "an ended sandbox does not come back");
        s.mark_ended("s1", "failed", "late").unwrap();
        let got = s.sandbox("s1").unwrap().unwrap();
        assert_eq!((got.state.as_str(), got.end_reason.as_deref()), ("destroyed", Some("deleted")));
        assert!(s.unfinished().unwrap().is_empty());
        // A row must name a real owner.
        let mut orphan = row.clone();
        orphan.id = "s2".into();
        orphan.owner = "nobody".into();
        assert!(s.insert_sandbox(&orphan).is_err());
    }
}
