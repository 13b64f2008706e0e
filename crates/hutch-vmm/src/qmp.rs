//! A minimal QMP client: capabilities negotiation, commands, and waiting for events. Host-only: the socket lives
//! in the VM's private directory and no guest device reaches it.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::VmmError;

pub struct Qmp {
    reader: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    /// Events seen while waiting for command replies.
    events: Vec<Value>,
}

impl Qmp {
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::trace!("qmp connect: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(VmmError::Qmp(format!("cannot connect to {}: {e}", path.display()))),
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r).lines(), writer: w, events: Vec::new() };
        let greeting = qmp.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn next_message(&mut self) -> Result<Value, VmmError> {
        match self.reader.next_line().await {
            Ok(Some(line)) => serde_json::from_str(&line).map_err(|e| VmmError::Qmp(format!("bad message {line:?}: {e}"))),
            Ok(None) => Err(VmmError::Qmp("QEMU closed the monitor (did it exit?)".into())),
            Err(e) => Err(VmmError::Qmp(format!("read: {e}"))),
        }
    }

    pub async fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": cmd });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.map_err(|e| VmmError::Qmp(format!("write: {e}")))?;
        loop {
            let m = self.next_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(VmmError::Qmp(format!("{cmd}: {}", e.get("desc").and_then(Value::as_str).unwrap_or("error"))));
            }
            if m.get("event").is_some() {
                self.events.push(m);
            }
        }
    }

    /// Polls `query-migrate` until the migration completes or fails.
    pub async fn wait_migration(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let st = self.execute("query-migrate", json!({})).await?;
            match st.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = st.get("error-desc").and_then(Value::as_str).unwrap_or("unknown error");
                    return Err(VmmError::Snapshot { what: "migration failed", reason: why.to_string() });
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(VmmError::Timeout(timeout, "the migration to finish"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
