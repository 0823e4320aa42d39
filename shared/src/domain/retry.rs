//! Retry backoff: exponential with jitter, owned by the runtime (not by executors).

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::FieldError;

/// Backoff between attempts: `initial_ms × factor^(n-1)`, ±20 % jitter, capped at `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the second attempt, in milliseconds (default 1000).
    #[serde(default = "Backoff::default_initial")]
    pub initial_ms: u64,
    /// Multiplier per attempt (default 2.0).
    #[serde(default = "Backoff::default_factor")]
    pub factor: f64,
    /// Upper bound of one delay in milliseconds (default 3,600,000 = 1 h).
    #[serde(default = "Backoff::default_max")]
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: Self::default_initial(),
            factor: Self::default_factor(),
            max_ms: Self::default_max(),
        }
    }
}

impl Backoff {
    fn default_initial() -> u64 {
        1_000
    }
    fn default_factor() -> f64 {
        2.0
    }
    fn default_max() -> u64 {
        3_600_000
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if !(1.0..=10.0).contains(&self.factor) {
            return Err(FieldError::new(
                "backoff.factor",
                "must be between 1 and 10",
            ));
        }
        if self.max_ms > 7 * 24 * 3_600_000 {
            return Err(FieldError::new("backoff.max_ms", "must be at most 7 days"));
        }
        if self.initial_ms > self.max_ms {
            return Err(FieldError::new(
                "backoff.initial_ms",
                "must not exceed max_ms",
            ));
        }
        Ok(())
    }

    /// Delay before the attempt after `failed_attempt` (1-based), without jitter.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(64) as i32;
        let ms = (self.initial_ms as f64) * self.factor.powi(exp);
        Duration::from_millis(ms.min(self.max_ms as f64) as u64)
    }

    /// Delay with ±20 % jitter, still capped at `max_ms`.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let base = self.base_delay(failed_attempt).as_millis() as f64;
        let jitter = rand::rng().random_range(0.8..=1.2);
        Duration::from_millis((base * jitter).min(self.max_ms as f64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_and_stop_at_the_cap() {
        let b = Backoff {
            initial_ms: 1000,
            factor: 2.0,
            max_ms: 5000,
        };
        assert_eq!(b.base_delay(1), Duration::from_millis(1000));
        assert_eq!(b.base_delay(2), Duration::from_millis(2000));
        assert_eq!(b.base_delay(3), Duration::from_millis(4000));
        assert_eq!(b.base_delay(4), Duration::from_millis(5000));
        assert_eq!(b.base_delay(60), Duration::from_millis(5000));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let b = Backoff::default();
        for _ in 0..1000 {
            let d = b.delay(2).as_millis();
            assert!((1600..=2400).contains(&d), "{d}");
        }
    }
}
