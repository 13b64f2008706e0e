//! The audit trail: one JSON record per connection, per HTTP request and per DNS question, sent
//! to a sink (a JSON-lines file or memory), and the end-of-run summary of denials. Records
//! carry secret names, never values.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use hutch_policy::Phase;
use serde::Serialize;

/// Where audit records go. Implementations must not block for long: they run on the data path.
pub trait AuditSink: Send + Sync {
    fn record(&self, record: &AuditRecord);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    Connection,
    Request,
    Dns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// How the sandbox reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Proxy,
    Tunnel,
    Dns,
}

/// What the gateway did with the bytes of an allowed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// TLS carried end to end after checking the ClientHello's server name.
    TlsPassthrough,
    /// TLS terminated with the sandbox CA and re-originated to the verified upstream.
    TlsIntercept,
    /// Plaintext HTTP, parsed request by request.
    Http,
    /// Neither TLS nor HTTP, on a port other than 80 and 443.
    Tcp,
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub sandbox: String,
    /// The phase the connection, request or lookup was decided under.
    pub phase: Phase,
    pub event: AuditEvent,
    pub via: Via,
    /// `name:port` as decided on, or the requested destination (sanitized) when it was refused.
    pub dest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub decision: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Notable facts, e.g. `possible_exfiltration:NAME`, `placeholder_over_plaintext:NAME`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl AuditRecord {
    pub(crate) fn new(
        sandbox: &str,
        phase: Phase,
        event: AuditEvent,
        via: Via,
        dest: String,
        decision: Verdict,
    ) -> AuditRecord {
        AuditRecord {
            time: now_rfc3339(),
            sandbox: sandbox.to_string(),
            phase,
            event,
            via,
            dest,
            addr: None,
            mode: None,
            method: None,
            path: None,
            status: None,
            decision,
            rule: None,
            reason: None,
            bytes_up: 0,
            bytes_down: 0,
            secrets: Vec::new(),
            flags: Vec::new(),
        }
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// Shortens and escapes a string the sandbox chose before it goes into a record or message (see
/// [`hutch_text::is_unsafe`]: controls, bidirectional and invisible format characters).
pub(crate) fn sanitize(s: &str) -> String {
    hutch_text::shorten(s, 256)
}

/// `s`, shortened and escaped if it holds anything a terminal must not see as it is.
fn clean_field(s: &mut String) {
    if s.chars().count() > 1024 || s.chars().any(hutch_text::is_unsafe) {
        *s = hutch_text::shorten(s, 1024);
    }
}

/// Every text field of a record escaped: a guest-chosen host name, path or method, or an error message that
/// quotes one, is shown on the user's terminal (summary), in the audit file, and in the daemon's API.
fn cleaned(record: &AuditRecord) -> std::borrow::Cow<'_, AuditRecord> {
    let dirty = |s: &String| s.len() > 1024 || s.chars().any(hutch_text::is_unsafe);
    let fields = [&record.method, &record.path, &record.rule, &record.reason];
    if !dirty(&record.dest) && !fields.into_iter().flatten().any(dirty) && !record.secrets.iter().chain(&record.flags).any(dirty) {
        return std::borrow::Cow::Borrowed(record);
    }
    let mut r = record.clone();
    clean_field(&mut r.dest);
    for f in [&mut r.method, &mut r.path, &mut r.rule, &mut r.reason].into_iter().flatten() {
        clean_field(f);
    }
    for f in r.secrets.iter_mut().chain(r.flags.iter_mut()) {
        clean_field(f);
    }
    std::borrow::Cow::Owned(r)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Appends one JSON line per record to a file (created with mode 0600).
pub struct FileAuditSink {
    file: Mutex<File>,
}

impl FileAuditSink {
    pub fn create(path: &Path) -> io::Result<FileAuditSink> {
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        Ok(FileAuditSink {
            file: Mutex::new(opts.open(path)?),
        })
    }
}

impl AuditSink for FileAuditSink {
    fn record(&self, record: &AuditRecord) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        // One write per line, so lines from concurrent connections never interleave.
        if let Err(e) = lock(&self.file).write_all(&line) {
            tracing::warn!(error = %e, "cannot write audit record");
        }
    }
}

/// Keeps records in memory, at most a fixed number (the first ones; later ones are only counted), so a guest
/// that makes millions of attempts cannot grow the host's memory. For tests and for callers that ship records
/// elsewhere; a run without an audit file keeps none at all ([`CountingAuditSink`]).
pub struct MemoryAuditSink {
    records: Mutex<Vec<AuditRecord>>,
    cap: usize,
    seen: std::sync::atomic::AtomicU64,
}

impl Default for MemoryAuditSink {
    fn default() -> Self {
        MemoryAuditSink::with_capacity(MemoryAuditSink::DEFAULT_CAP)
    }
}

impl MemoryAuditSink {
    /// Records kept by [`MemoryAuditSink::new`].
    pub const DEFAULT_CAP: usize = 10_000;

    pub fn new() -> MemoryAuditSink {
        MemoryAuditSink::default()
    }

    /// Keeps at most `cap` records.
    pub fn with_capacity(cap: usize) -> MemoryAuditSink {
        MemoryAuditSink { records: Mutex::new(Vec::new()), cap, seen: std::sync::atomic::AtomicU64::new(0) }
    }

    /// The records kept (the first [`MemoryAuditSink::DEFAULT_CAP`], or the capacity given).
    pub fn records(&self) -> Vec<AuditRecord> {
        lock(&self.records).clone()
    }

    /// Every record received, kept or not.
    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, record: &AuditRecord) {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = lock(&self.records);
        if r.len() < self.cap {
            r.push(record.clone());
        }
    }
}

/// Keeps no record, only their number: for a run without an audit file, whose end-of-run summary comes from
/// the gateway's bounded tally of denials.
#[derive(Default)]
pub struct CountingAuditSink {
    seen: std::sync::atomic::AtomicU64,
}

impl CountingAuditSink {
    pub fn new() -> CountingAuditSink {
        CountingAuditSink::default()
    }

    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AuditSink for CountingAuditSink {
    fn record(&self, _record: &AuditRecord) {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Denials counted by destination and reason, for the end of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DenialSummary {
    pub entries: Vec<DenialEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DenialEntry {
    pub phase: Phase,
    pub dest: String,
    pub reason: String,
    pub count: u64,
}

impl DenialSummary {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.entries.iter().map(|e| e.count).sum()
    }
}

impl fmt::Display for DenialSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            return writeln!(f, "hutch: no egress was denied");
        }
        writeln!(f, "hutch: {} denied egress attempt(s):", self.total())?;
        for e in self.entries.iter().take(SUMMARY_LINES) {
            let during = match e.phase {
                Phase::Setup => "; during setup",
                Phase::Agent => "",
            };
            // Escaped again here: the summary is printed to the user's terminal.
            writeln!(f, "  {:>5}x {}  ({}{during})", e.count, hutch_text::escape(&e.dest), hutch_text::escape(&e.reason))?;
        }
        if self.entries.len() > SUMMARY_LINES {
            let rest = &self.entries[SUMMARY_LINES..];
            let n: u64 = rest.iter().map(|e| e.count).sum();
            writeln!(f, "  {n:>5}x to {} other destination(s) (every one is in the audit log: --audit FILE)", rest.len())?;
        }
        Ok(())
    }
}

/// Sends records to the sink and keeps the denial tally.
pub(crate) struct Auditor {
    sink: std::sync::Arc<dyn AuditSink>,
    denials: Mutex<BTreeMap<(Phase, String, String), u64>>,
}

/// Lines of the printed summary; the rest are counted on one line.
const SUMMARY_LINES: usize = 20;

/// Distinct (destination, reason) pairs kept for the summary; later ones are counted together.
const MAX_SUMMARY_KEYS: usize = 1000;

impl Auditor {
    pub(crate) fn new(sink: std::sync::Arc<dyn AuditSink>) -> Auditor {
        Auditor {
            sink,
            denials: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn emit(&self, record: &AuditRecord) {
        let record = &*cleaned(record);
        if record.decision == Verdict::Deny {
            let mut d = lock(&self.denials);
            let mut key = (
                record.phase,
                record.dest.clone(),
                record.reason.clone().unwrap_or_default(),
            );
            if d.len() >= MAX_SUMMARY_KEYS && !d.contains_key(&key) {
                key = (
                    record.phase,
                    "(other destinations)".into(),
                    "summary full".into(),
                );
            }
            *d.entry(key).or_insert(0) += 1;
        }
        self.sink.record(record);
    }

    pub(crate) fn summary(&self) -> DenialSummary {
        let d = lock(&self.denials);
        let mut entries: Vec<DenialEntry> = d
            .iter()
            .map(|((phase, dest, reason), count)| DenialEntry {
                phase: *phase,
                dest: dest.clone(),
                reason: reason.clone(),
                count: *count,
            })
            .collect();
        entries.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.dest.cmp(&b.dest)));
        DenialSummary { entries }
    }
}
