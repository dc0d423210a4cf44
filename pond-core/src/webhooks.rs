//! Webhook subscriptions and their deliveries, as the Standard Webhooks spec
//! (<https://www.standardwebhooks.com>) has them: each event is POSTed as JSON with
//! `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,` + base64 HMAC-SHA256 over
//! `{id}.{timestamp}.{body}` under each live secret).
//!
//! This module is the pure part: the records, the signature, the payload, the retry schedule.
//! The sender (HTTP, the address policy, leases across nodes) lives in pond-http.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::time::Timestamp;

/// Record kind of subscriptions (key: the subscription id).
pub const SUBSCRIPTION_RECORD: &str = "webhook";
/// Record kind of each subscription's delivery progress (key: the subscription id).
pub const CURSOR_RECORD: &str = "webhook-cursor";
/// Record kind of each subscription's recent deliveries (key: the subscription id).
pub const LOG_RECORD: &str = "webhook-log";
/// Record kind of each subscription's queue of events asked for again (key: the subscription id).
pub const REDELIVER_RECORD: &str = "webhook-redeliver";
/// Deliveries kept in a subscription's log.
pub const LOG_KEEP: usize = 100;
/// The secret prefix the spec uses.
pub const SECRET_PREFIX: &str = "whsec_";

/// Waits between attempts at one event after a failure: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
/// 10 h — about 27.6 h from the first failure before pond gives the event up.
pub const RETRY_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// A signing secret as stored: its bytes sealed under the server key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    /// Base64 of the secret sealed under the server key ([`crate::seal::seal_at_rest`]).
    pub sealed: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When a rotation retired it (signatures stop using it then); `None` while current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// A project's subscription to events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Its id (`wh_…`).
    pub id: String,
    /// Whose events it receives.
    pub project_id: String,
    /// Where they are POSTed.
    pub url: String,
    /// Event type patterns it wants (empty: every event).
    #[serde(default)]
    pub types: Vec<String>,
    /// A label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Signing secrets, newest last.
    pub secrets: Vec<StoredSecret>,
    /// When it was made.
    pub created_at: Timestamp,
}

impl Subscription {
    /// Whether it wants `event`.
    pub fn wants(&self, event: &Event) -> bool {
        event.event.project_id == self.project_id
            && (self.types.is_empty() || self.types.iter().any(|t| crate::events::type_matches(t, &event.event.kind)))
    }
}

/// Where a subscription's delivery stands; written only by the node holding its lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Every event up to this position was delivered (or given up on).
    pub after: i64,
    /// Failed attempts at the next event.
    #[serde(default)]
    pub failures: u32,
    /// No attempt before this time (after a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    /// The node delivering, and until when it holds the subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// See `holder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<Timestamp>,
}

impl Cursor {
    /// Whether `node` may deliver now: the lease is its own or has lapsed.
    pub fn free_for(&self, node: &str, now: Timestamp) -> bool {
        self.holder.as_deref() == Some(node) || self.lease_until.is_none_or(|t| t <= now)
    }
}

/// How one attempt at one event went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivery {
    /// The event's position.
    pub event: i64,
    /// The `webhook-id` sent (the same on every attempt at the event).
    pub webhook_id: String,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Which attempt at this event (1, 2, …).
    pub attempt: u32,
    /// When it was sent.
    pub at: Timestamp,
    /// The receiver's HTTP status, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds from sending to the answer.
    pub duration_ms: u64,
    /// `delivered`, `retrying` (another attempt is due at `retry_at`) or `gave_up`.
    pub outcome: String,
    /// When the next attempt is due (`retrying`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
}

/// The `webhook-id` of an event: the same for every attempt and every subscription, so a
/// receiver can drop repeats.
pub fn webhook_id(event: &Event) -> String {
    format!("evt_{}", event.seq)
}

/// The JSON body for `event`: `{type, timestamp, data}` as the spec suggests. It holds states
/// and names only (never a stage's output or error text).
pub fn payload(event: &Event) -> String {
    let body = serde_json::json!({
        "type": event.event.kind,
        "timestamp": event.event.at.to_rfc3339(),
        "data": event,
    });
    body.to_string()
}

/// The `webhook-signature` header: `v1,<base64 HMAC-SHA256>` under each secret, space-separated
/// (several during a rotation's overlap).
pub fn signature(secrets: &[Vec<u8>], webhook_id: &str, timestamp_secs: i64, body: &str) -> String {
    let signed = format!("{webhook_id}.{timestamp_secs}.{body}");
    secrets
        .iter()
        // HMAC takes a key of any length, so no secret is skipped.
        .filter_map(|key| <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).ok())
        .map(|mut mac| {
            mac.update(signed.as_bytes());
            format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The secret as shown once to its owner: `whsec_` + base64 of its bytes.
pub fn secret_text(bytes: &[u8]) -> String {
    format!("{SECRET_PREFIX}{}", B64.encode(bytes))
}

/// How long to wait after failure number `failures` (1 for the first), with `jitter` in
/// [-1, 1] spreading it by up to a fifth; `None` once the schedule is spent.
pub fn retry_delay(failures: u32, jitter: f64) -> Option<Duration> {
    let base = RETRY_SCHEDULE.get(failures.checked_sub(1)? as usize)?;
    let spread = base.as_secs_f64() * 0.2 * jitter.clamp(-1.0, 1.0);
    Some(Duration::from_secs_f64((base.as_secs_f64() + spread).max(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_the_spec_example() {
        // The example of the Standard Webhooks spec (and its reference libraries).
        let key = B64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn retries_span_a_day_then_stop() {
        let total: Duration = (1..=RETRY_SCHEDULE.len() as u32).map(|n| retry_delay(n, 0.0).unwrap()).sum();
        assert!(total >= Duration::from_secs(24 * 3600), "{total:?}");
        assert_eq!(retry_delay(RETRY_SCHEDULE.len() as u32 + 1, 0.0), None);
        assert_eq!(retry_delay(0, 0.0), None);
        let early = retry_delay(2, -1.0).unwrap();
        let late = retry_delay(2, 1.0).unwrap();
        assert_eq!((early.as_secs(), late.as_secs()), (240, 360));
    }
}
