//! Retries of transient failures: a 5xx answer or a connection that failed, with exponential backoff.
//! A 4xx answer is the forge's decision and is never retried.

use std::future::Future;
use std::time::Duration;

/// How often and how patiently a transient failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (at least 1).
    pub attempts: u32,
    /// The wait before the second try; each later wait doubles, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, first_delay: Duration::from_secs(2), max_delay: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `n` (1-based).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// One try's failure.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another try (5xx, connection refused or reset, timeout).
    Transient(String),
    /// Final.
    Fatal(crate::ForgeError),
}

/// Runs `op` until it succeeds, fails for good, or the tries run out.
pub(crate) async fn run<T, F, Fut>(policy: RetryPolicy, what: &str, mut op: F) -> Result<T, crate::ForgeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let attempts = policy.attempts.max(1);
    let mut n = 0;
    loop {
        n += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Transient(message)) => {
                if n >= attempts {
                    return Err(crate::ForgeError::Transient { what: what.to_string(), attempts: n, message });
                }
                let wait = policy.delay(n);
                tracing::warn!(what, attempt = n, wait_ms = wait.as_millis() as u64, %message, "transient forge failure; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let p = RetryPolicy { attempts: 10, first_delay: Duration::from_millis(100), max_delay: Duration::from_millis(500) };
        let d: Vec<u128> = (1..=5).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        assert_eq!(p.delay(200), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn transient_failures_are_retried_fatal_ones_are_not() {
        let p = RetryPolicy { attempts: 3, first_delay: Duration::from_millis(1), max_delay: Duration::from_millis(1) };
        let mut calls = 0;
        let r: Result<(), _> = run(p, "thing", || {
            calls += 1;
            async { Err(Failure::Transient("503".into())) }
        })
        .await;
        assert_eq!(calls, 3);
        assert!(matches!(r, Err(crate::ForgeError::Transient { attempts: 3, .. })));
        let mut calls = 0;
        let r: Result<(), _> = run(p, "thing", || {
            calls += 1;
            async { Err(Failure::Fatal(crate::ForgeError::Config("no".into()))) }
        })
        .await;
        assert_eq!(calls, 1);
        assert!(matches!(r, Err(crate::ForgeError::Config(_))));
        let mut calls = 0;
        let r = run(p, "thing", || {
            calls += 1;
            let c = calls;
            async move { if c < 2 { Err(Failure::Transient("reset".into())) } else { Ok(c) } }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
    }
}
