//! Rate limiting for log lines that a guest can trigger at will.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Lets `burst` events through per `period`, and reports how many were held back so that a
/// flood stays visible without filling the log.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    burst: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(period: Duration, burst: u32) -> Self {
        RateLimit {
            period,
            burst,
            state: Mutex::new(State {
                window_start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// Returns `Some(n)` if this event may be logged, where `n` events were suppressed since the
    /// last one that was; `None` if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = lock(&self.state);
        let expired = s
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.period);
        if expired {
            s.window_start = Some(now);
            s.passed = 0;
        }
        if s.passed < self.burst {
            s.passed += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bursts_and_counts_suppressed() {
        let rl = RateLimit::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        assert_eq!(rl.check_at(t0), Some(0));
        assert_eq!(rl.check_at(t0), Some(0));
        assert_eq!(rl.check_at(t0), None);
        assert_eq!(rl.check_at(t0 + Duration::from_millis(10)), None);
        assert_eq!(rl.check_at(t0 + Duration::from_secs(1)), Some(2));
    }
}
