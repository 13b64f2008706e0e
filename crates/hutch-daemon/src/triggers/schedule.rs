//! Schedules: cron expressions in UTC (five fields, or six with seconds first). The last time each schedule
//! fired is kept in the database. On start a schedule that has never fired begins from now (nothing is
//! "caught up" from before it existed); a schedule that was due one or more times while the daemon was down
//! fires once, not once per missed time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::config::{Source, Trigger, Value};
use super::event::Planned;
use super::store::{Inserted, RunRow};
use super::Triggers;
use crate::store::now_ms;

/// Whether a schedule whose last firing was at `last_ms` is due at `now_ms`, and the due time.
pub fn due(cron: &croner::Cron, last_ms: i64, now_ms: i64) -> Option<i64> {
    let last: DateTime<Utc> = Utc.timestamp_millis_opt(last_ms).single()?;
    let next = cron.find_next_occurrence(&last, false).ok()?;
    let next_ms = next.timestamp_millis();
    (next_ms <= now_ms).then_some(next_ms)
}

impl Triggers {
    pub(crate) async fn schedule_loop(self: Arc<Self>) {
        loop {
            self.fire_due();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    fn fire_due(&self) {
        let set = self.set();
        let now = now_ms();
        for t in set.triggers.values() {
            let Source::Schedule { cron, .. } = &t.source else { continue };
            let store = &self.mgr.store;
            let last = match store.schedule_last(&t.name) {
                Ok(Some(l)) => l,
                Ok(None) => {
                    let _ = store.set_schedule_last(&t.name, now);
                    continue;
                }
                Err(e) => {
                    tracing::error!(trigger = %t.name, "cannot read the schedule's state: {e}");
                    continue;
                }
            };
            let Some(at) = due(cron, last, now) else { continue };
            // One run however many times it was due: the state moves to now.
            if let Err(e) = self.fire(t, at, now) {
                tracing::error!(trigger = %t.name, "cannot queue the scheduled run: {e}");
            }
        }
    }

    fn fire(&self, t: &Trigger, at: i64, now: i64) -> Result<(), crate::DaemonError> {
        let (Value::Fixed((owner, repo)), Value::Fixed(git_ref)) = (&t.job.repository, &t.job.git_ref) else {
            return Err(crate::DaemonError::Internal("a schedule's repository and ref are fixed in the file".into()));
        };
        let plan = Planned {
            owner: owner.clone(),
            repo: repo.clone(),
            git_ref: git_ref.clone(),
            issue: None,
            concurrency_key: match &t.job.concurrency {
                Some((Value::Fixed(k), _)) => Some(format!("{}:{k}", t.name)),
                _ => None,
            },
            prompt: None,
            author: None,
            action: None,
        };
        let payload = serde_json::json!({ "schedule": t.name, "due": Utc.timestamp_millis_opt(at).single().map(|d| d.to_rfc3339()) });
        let id = super::new_run_id();
        let row = RunRow::new(
            id.clone(),
            &t.name,
            "schedule",
            "schedule",
            Some(format!("schedule:{at}")),
            serde_json::to_string(&plan).map_err(|e| crate::DaemonError::Internal(e.to_string()))?,
            payload.to_string().into_bytes(),
            plan.concurrency_key.clone(),
        );
        let store = &self.mgr.store;
        if store.insert_delivery(&t.name, &format!("schedule:{at}"), Some(&row))? == Inserted::New {
            tracing::info!(trigger = %t.name, run = %id, "scheduled run queued");
            self.supersede(t, &row);
            self.wake.notify_one();
        }
        store.set_schedule_last(&t.name, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_missed_many_times_is_due_once() {
        let cron = croner::Cron::new("0 3 * * *").parse().unwrap();
        let day = 86_400_000;
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap().timestamp_millis();
        assert_eq!(due(&cron, t0, t0 + 1000), None);
        let at = due(&cron, t0, t0 + 5 * day).unwrap();
        assert_eq!(at, Utc.with_ymd_and_hms(2026, 1, 2, 3, 0, 0).unwrap().timestamp_millis());
        // After firing, the state is "now": the four other missed 03:00s do not fire.
        assert_eq!(due(&cron, t0 + 5 * day, t0 + 5 * day + 1000), None);
    }
}
