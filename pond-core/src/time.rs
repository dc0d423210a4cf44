//! Time as plain values. pond-core never reads a clock: callers pass `now` in, usually through
//! the [`Clock`] trait, so leases, backoff and timeouts are testable with a fake clock.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, in milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }
    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }
    /// This instant plus a span (saturating).
    pub fn plus(self, span: Millis) -> Self {
        Timestamp(self.0.saturating_add(span.0 as i64))
    }
    /// Milliseconds from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Millis {
        Millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
    /// RFC 3339 text with millisecond precision.
    pub fn to_rfc3339(self) -> String {
        // RFC 3339 ends at year 9999; a later value (a corrupt record) is shown as that end.
        const LAST: i64 = 253_402_300_799_999;
        let t = UNIX_EPOCH + Duration::from_millis(self.0.clamp(0, LAST) as u64);
        humantime::format_rfc3339_millis(t).to_string()
    }
    /// Parses RFC 3339 text.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let t: SystemTime = humantime::parse_rfc3339_weak(text).ok()?;
        let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis();
        Some(Timestamp(ms as i64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&text)
            .ok_or_else(|| de::Error::custom(format!("`{text}` is not an RFC 3339 timestamp")))
    }
}

/// A span of time in milliseconds. In definitions it is written as seconds (`30`, `0.5`) or as
/// text (`"90s"`, `"5m"`, `"1h 30m"`); it is shown as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// `s` whole seconds.
    pub const fn from_secs(s: u64) -> Self {
        Millis(s * 1000)
    }
    /// As a std duration.
    pub fn to_std(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.to_std()))
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: seconds as a number, or text such as \"90s\" or \"5m\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                v.checked_mul(1000).map(Millis).ok_or_else(|| E::custom("duration is too long"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                if v < 0 {
                    return Err(E::custom("duration must not be negative"));
                }
                self.visit_u64(v as u64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Millis, E> {
                if !v.is_finite() || !(0.0..=1e12).contains(&v) {
                    return Err(E::custom("duration must be a non-negative number of seconds"));
                }
                Ok(Millis((v * 1000.0).round() as u64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
                humantime::parse_duration(v)
                    .map(|d| Millis(d.as_millis() as u64))
                    .map_err(|e| E::custom(format!("`{v}` is not a duration ({e})")))
            }
        }
        d.deserialize_any(V)
    }
}

/// The source of `now` for the engine. Production passes the system clock; tests a fake one.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The host's wall clock. Reading the OS clock is the caller's choice, made by passing this in.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock that moves only when told to; for deterministic tests of leases and backoff.
#[derive(Debug, Default)]
pub struct FakeClock(std::sync::atomic::AtomicI64);

impl FakeClock {
    /// A fake clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        FakeClock(std::sync::atomic::AtomicI64::new(start.0))
    }
    /// Moves the clock forward.
    pub fn advance(&self, span: Millis) {
        self.0.fetch_add(span.0 as i64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_from_numbers_and_text() {
        let cases = [("30", 30_000), ("0.5", 500), ("\"90s\"", 90_000), ("\"1h 30m\"", 5_400_000)];
        for (text, ms) in cases {
            let parsed: Millis = serde_json::from_str(text).unwrap();
            assert_eq!(parsed, Millis(ms), "{text}");
        }
        assert!(serde_json::from_str::<Millis>("-1").is_err());
        assert!(serde_json::from_str::<Millis>("\"soon\"").is_err());
    }

    #[test]
    fn timestamps_round_trip_through_rfc3339() {
        let t = Timestamp::from_millis(1_700_000_000_123);
        assert_eq!(t.to_rfc3339(), "2023-11-14T22:13:20.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()), Some(t));
    }
}

/// How the engine waits between retries without owning a runtime: the caller passes its own
/// (tokio's `sleep` in pond's processes). The default does not wait at all, which only suits
/// stores that never report themselves unavailable (the memory store in tests).
pub trait Pause: Send + Sync {
    /// Resolves after `delay`.
    fn pause(&self, delay: Millis) -> crate::exec::BoxFuture<'_, ()>;
}

/// A [`Pause`] that returns at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPause;

impl Pause for NoPause {
    fn pause(&self, _delay: Millis) -> crate::exec::BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Exponential backoff with full jitter: each delay is a random share of a ceiling that
/// doubles from `first` up to `max`, so retries of many producers spread out.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    ceiling: Millis,
    max: Millis,
}

impl Backoff {
    /// Starts at `first`, doubles up to `max`.
    pub fn new(first: Millis, max: Millis) -> Self {
        Backoff { ceiling: first, max }
    }

    /// The next delay: between half the ceiling and the ceiling, chosen by `random`.
    pub fn next(&mut self, random: u16) -> Millis {
        let ceiling = self.ceiling.0.max(1);
        let delay = ceiling / 2 + (ceiling / 2) * u64::from(random) / u64::from(u16::MAX);
        self.ceiling = Millis(ceiling.saturating_mul(2).min(self.max.0));
        Millis(delay)
    }
}
