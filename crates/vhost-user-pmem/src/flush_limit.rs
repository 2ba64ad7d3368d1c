//! `--flush-rate-limit OPS[/s][,burst=N]`: the text the option takes, the bounds of its numbers,
//! and the token bucket that holds fdatasyncs back to that rate.
//!
//! The bucket meters fdatasyncs, not requests: in group mode one fdatasync still answers every
//! request waiting when it starts, so a guest that flushes faster than the limit gets bigger
//! batches, not refusals. A sync that finds the bucket empty starts later; nothing is answered
//! early and nothing fails because of the limit.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The highest rate and burst accepted. No disk completes a million fdatasyncs a second, so a
/// larger figure is a typo, and the bound keeps the bucket's arithmetic far from overflow.
pub const MAX_OPS: u32 = 1_000_000;

/// A refused `--flush-rate-limit`. Each message quotes the text and says what would be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlushLimitError {
    #[error("--flush-rate-limit is empty: give OPS[/s][,burst=N], for example 20/s,burst=5")]
    Empty,
    #[error(
        "--flush-rate-limit {0:?}: a negative rate means nothing; give a whole number of \
         fdatasyncs per second from 1 to {MAX_OPS}"
    )]
    Negative(String),
    #[error(
        "--flush-rate-limit {0:?}: expected OPS[/s][,burst=N] with OPS a whole number of \
         fdatasyncs per second, for example 20/s,burst=5"
    )]
    BadRate(String),
    #[error(
        "--flush-rate-limit {0:?}: a rate of 0 would hold every flush back forever; give at \
         least 1/s, or leave the option out for no limit"
    )]
    ZeroRate(String),
    #[error(
        "--flush-rate-limit {0:?}: more than {MAX_OPS}/s, which no disk reaches; leave the \
         option out for no limit"
    )]
    RateTooHigh(String),
    #[error(
        "--flush-rate-limit {text:?}: unknown key {key:?}; the only key is burst=N (for \
         example 20/s,burst=5)"
    )]
    UnknownKey { text: String, key: String },
    #[error("--flush-rate-limit {0:?}: burst is given twice; give it once")]
    BurstTwice(String),
    #[error(
        "--flush-rate-limit {0:?}: burst= needs a whole number of fdatasyncs from 1 to \
         {MAX_OPS}, for example burst=5"
    )]
    BadBurst(String),
    #[error(
        "--flush-rate-limit {0:?}: burst=0 would hold every flush back forever; give burst=1 \
         or more"
    )]
    ZeroBurst(String),
}

/// A validated `--flush-rate-limit`: at most `burst` fdatasyncs at once, and `ops_per_sec` a
/// second after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushRateLimit {
    pub ops_per_sec: u32,
    /// Without `burst=`, [`FlushRateLimit::ops_per_sec`]: a device idle for a second may sync
    /// one second's worth at once.
    pub burst: u32,
}

impl FromStr for FlushRateLimit {
    type Err = FlushLimitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(FlushLimitError::Empty);
        }
        let mut parts = text.split(',');
        // `split` yields at least one part, even of an empty string.
        let rate = parts.next().unwrap_or_default();
        let rate = rate.strip_suffix("/s").unwrap_or(rate);
        if rate.starts_with('-') {
            return Err(FlushLimitError::Negative(text.to_string()));
        }
        let ops_per_sec = match whole_number(rate) {
            None => return Err(FlushLimitError::BadRate(text.to_string())),
            Some(0) => return Err(FlushLimitError::ZeroRate(text.to_string())),
            Some(n) if n > u64::from(MAX_OPS) => {
                return Err(FlushLimitError::RateTooHigh(text.to_string()))
            }
            Some(n) => n as u32,
        };
        let mut burst = None;
        for part in parts {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            if key != "burst" {
                return Err(FlushLimitError::UnknownKey {
                    text: text.to_string(),
                    key: key.to_string(),
                });
            }
            if burst.is_some() {
                return Err(FlushLimitError::BurstTwice(text.to_string()));
            }
            burst = Some(match whole_number(value) {
                Some(0) => return Err(FlushLimitError::ZeroBurst(text.to_string())),
                Some(n) if n <= u64::from(MAX_OPS) => n as u32,
                _ => return Err(FlushLimitError::BadBurst(text.to_string())),
            });
        }
        Ok(FlushRateLimit {
            ops_per_sec,
            burst: burst.unwrap_or(ops_per_sec),
        })
    }
}

/// Plain ASCII digits only: no sign, no spaces, no decimals, no exponent. `None` also for a
/// number too long for 64 bits, which is above every bound anyway.
fn whole_number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().or(Some(u64::MAX))
}

impl fmt::Display for FlushRateLimit {
    /// The option's own syntax, so that a logged limit can be pasted back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s,burst={}", self.ops_per_sec, self.burst)
    }
}

/// The token bucket, kept as the time at which it would next be empty of tokens if no sync had
/// to wait (the "theoretical arrival time" of the generic cell rate algorithm). It needs no
/// timer: it is looked at only when a sync is about to start, so an idle device never wakes up
/// for it.
#[derive(Debug)]
pub struct TokenBucket {
    /// Time one token takes to come back.
    interval: Duration,
    /// How far ahead of now the bucket may run: `burst - 1` intervals.
    slack: Duration,
    /// `None` until the first sync: the bucket starts full.
    next: Option<Instant>,
}

impl TokenBucket {
    pub fn new(limit: FlushRateLimit) -> TokenBucket {
        let interval = Duration::from_secs(1) / limit.ops_per_sec;
        TokenBucket {
            interval,
            slack: interval * (limit.burst - 1),
            next: None,
        }
    }

    /// Takes a token for a sync starting at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        // After a quiet spell the bucket is full again, not fuller: starting from `now`
        // caps what the idle time saved at `burst`.
        let next = self.next.map_or(now, |n| n.max(now));
        let ahead = next.duration_since(now);
        if ahead > self.slack {
            return Err(ahead - self.slack);
        }
        self.next = Some(next + self.interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(ops_per_sec: u32, burst: u32) -> FlushRateLimit {
        FlushRateLimit { ops_per_sec, burst }
    }

    #[test]
    fn parses_the_forms() {
        assert_eq!("20".parse(), Ok(limit(20, 20)));
        assert_eq!("20/s".parse(), Ok(limit(20, 20)));
        assert_eq!("20/s,burst=1".parse(), Ok(limit(20, 1)));
        assert_eq!("20,burst=50".parse(), Ok(limit(20, 50)));
        assert_eq!("1".parse(), Ok(limit(1, 1)));
        assert_eq!("1000000/s".parse(), Ok(limit(MAX_OPS, MAX_OPS)));
        let l: FlushRateLimit = "7/s,burst=3".parse().unwrap();
        assert_eq!(l.to_string().parse(), Ok(l), "printed {l}");
    }

    #[test]
    fn refuses_bad_text_with_the_reason() {
        use FlushLimitError::*;
        let e = |t: &str| t.parse::<FlushRateLimit>().unwrap_err();
        assert_eq!(e(""), Empty);
        assert_eq!(e("0"), ZeroRate("0".into()));
        assert_eq!(e("0/s,burst=4"), ZeroRate("0/s,burst=4".into()));
        assert_eq!(e("-5/s"), Negative("-5/s".into()));
        assert_eq!(e("1000001"), RateTooHigh("1000001".into()));
        assert_eq!(
            e("99999999999999999999999"),
            RateTooHigh("99999999999999999999999".into())
        );
        for bad in [
            "fast", "/s", "2.5/s", "20/m", "20/s/s", " 20", "+20", "1e3", ",burst=2",
        ] {
            assert_eq!(e(bad), BadRate(bad.into()), "{bad:?}");
        }
        assert_eq!(e("20/s,burst=0"), ZeroBurst("20/s,burst=0".into()));
        for bad in ["20,burst=", "20,burst=x", "20,burst=-1", "20,burst=1000001"] {
            assert_eq!(e(bad), BadBurst(bad.into()), "{bad:?}");
        }
        assert!(matches!(e("20,rate=3"), UnknownKey { key, .. } if key == "rate"));
        assert!(matches!(e("20,burst"), BadBurst(_)));
        assert!(matches!(e("20,"), UnknownKey { key, .. } if key.is_empty()));
        assert_eq!(
            e("20,burst=1,burst=2"),
            BurstTwice("20,burst=1,burst=2".into())
        );
        // Every message names the option, so that the one line on stderr says what to fix.
        assert!(e("0").to_string().starts_with("--flush-rate-limit \"0\": "));
    }

    #[test]
    fn the_first_burst_passes_then_the_rate_applies() {
        let mut b = TokenBucket::new(limit(10, 3));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.take(t0), Ok(()));
        }
        // The fourth waits one interval, and taking nothing meanwhile changes nothing.
        assert_eq!(b.take(t0), Err(Duration::from_millis(100)));
        assert_eq!(
            b.take(t0 + Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        assert_eq!(b.take(t0 + Duration::from_millis(100)), Ok(()));
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn refills_at_the_rate_and_never_beyond_the_burst() {
        let mut b = TokenBucket::new(limit(4, 2));
        let t0 = Instant::now();
        assert_eq!(b.take(t0), Ok(()));
        assert_eq!(b.take(t0), Ok(()));
        assert!(b.take(t0).is_err());
        // An hour idle saves two tokens, not 14400.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(later), Ok(()));
        assert_eq!(b.take(later), Ok(()));
        assert_eq!(b.take(later), Err(Duration::from_millis(250)));
        // Steady demand gets exactly the rate: 4 a second.
        let mut passed = 0;
        for ms in (0..=10_000).step_by(5) {
            if b.take(later + Duration::from_millis(ms)).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, 40);
    }

    #[test]
    fn a_burst_of_one_spaces_every_sync() {
        let mut b = TokenBucket::new(limit(20, 1));
        let t0 = Instant::now();
        assert_eq!(b.take(t0), Ok(()));
        assert_eq!(b.take(t0), Err(Duration::from_millis(50)));
        assert_eq!(b.take(t0 + Duration::from_millis(50)), Ok(()));
        assert_eq!(
            b.take(t0 + Duration::from_millis(60)),
            Err(Duration::from_millis(40))
        );
    }
}
