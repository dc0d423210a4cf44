//! The typed client's calls for events (`/v1/events`) and webhooks (`/v1/webhooks`).

use std::time::Duration;

use pond_core::events::Event;

use crate::client::{encode_path, encode_query, Body, Client, ClientError};
use crate::events_api::EventPage;
use crate::webhooks::{CreateWebhook, DeliveryLog, WebhookList, WebhookView};

/// Which events to read.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// One project (default: every project the token may use).
    pub project: Option<String>,
    /// Event types or `run.*`, `stage.*`, `*` (empty: all).
    pub types: Vec<String>,
}

impl EventFilter {
    fn query(&self) -> String {
        let mut query = String::new();
        if let Some(p) = &self.project {
            query.push_str(&format!("&project={}", encode_query(p)));
        }
        if !self.types.is_empty() {
            query.push_str(&format!("&types={}", encode_query(&self.types.join(","))));
        }
        query
    }
}

impl Client {
    /// `GET /v1/events?after=`: a page of events after a position.
    pub fn events(&self, filter: &EventFilter, after: i64, limit: u32) -> Result<EventPage, ClientError> {
        let path = format!("/v1/events?after={after}&limit={limit}{}", filter.query());
        self.json(self.request("GET", &path), None)
    }

    /// Follows `GET /v1/events` (server-sent events) from `after` (`None`: from now), calling
    /// `on_event` for each until it returns false. Reconnects from the last event seen
    /// (`Last-Event-ID`) when the connection drops.
    pub fn follow_events(
        &self,
        filter: &EventFilter,
        after: Option<i64>,
        on_event: &mut dyn FnMut(&Event) -> bool,
    ) -> Result<(), ClientError> {
        let mut cursor = after;
        let mut failures = 0;
        loop {
            let mut req = self.request("GET", &format!("/v1/events?follow=1{}", filter.query()));
            if let Some(c) = cursor {
                req = req.set("Last-Event-ID", &c.to_string());
            }
            match self.send(req, None) {
                Ok(response) => {
                    failures = 0;
                    if !read_stream(response.into_reader(), &mut cursor, on_event)? {
                        return Ok(());
                    }
                }
                Err(e @ ClientError::Api { .. }) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures > 30 {
                        return Err(e);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `POST /v1/webhooks`: the answer carries the signing secret, shown this once.
    pub fn create_webhook(&self, body: &CreateWebhook) -> Result<WebhookView, ClientError> {
        let body = serde_json::to_value(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(self.request("POST", "/v1/webhooks"), Some(Body::Json(body)))
    }

    /// `GET /v1/webhooks`.
    pub fn webhooks(&self) -> Result<WebhookList, ClientError> {
        self.json(self.request("GET", "/v1/webhooks"), None)
    }

    /// `GET /v1/webhooks/{id}`.
    pub fn webhook(&self, id: &str) -> Result<WebhookView, ClientError> {
        self.json(self.request("GET", &format!("/v1/webhooks/{}", encode_path(id))), None)
    }

    /// `DELETE /v1/webhooks/{id}`.
    pub fn remove_webhook(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request("DELETE", &format!("/v1/webhooks/{}", encode_path(id))), None).map(|_| ())
    }

    /// `POST /v1/webhooks/{id}/rotate-secret`: a new secret (returned once); the old one signs
    /// beside it for `overlap_seconds`.
    pub fn rotate_webhook_secret(&self, id: &str, overlap_seconds: Option<u64>) -> Result<WebhookView, ClientError> {
        let body = serde_json::json!({ "overlap_seconds": overlap_seconds });
        let path = format!("/v1/webhooks/{}/rotate-secret", encode_path(id));
        self.json(self.request("POST", &path), Some(Body::Json(body)))
    }

    /// `GET /v1/webhooks/{id}/deliveries`: the last deliveries, newest first.
    pub fn webhook_deliveries(&self, id: &str) -> Result<DeliveryLog, ClientError> {
        self.json(self.request("GET", &format!("/v1/webhooks/{}/deliveries", encode_path(id))), None)
    }

    /// `POST /v1/webhooks/{id}/redeliver`: sends one event again.
    pub fn redeliver_webhook(&self, id: &str, event: i64) -> Result<(), ClientError> {
        let path = format!("/v1/webhooks/{}/redeliver", encode_path(id));
        self.send(self.request("POST", &path), Some(Body::Json(serde_json::json!({ "event": event })))).map(|_| ())
    }
}

/// Reads events until the stream ends (`true`: reconnect) or `on_event` says stop (`false`).
fn read_stream(
    reader: impl std::io::Read,
    cursor: &mut Option<i64>,
    on_event: &mut dyn FnMut(&Event) -> bool,
) -> Result<bool, ClientError> {
    crate::client::for_each_event(reader, &mut |name, id, data| match name {
        // Where the stream starts: resume from there even if no event follows.
        "ready" => {
            *cursor = id.and_then(|i| i.parse().ok()).or(*cursor);
            Ok(true)
        }
        "error" => Err(ClientError::Decode(format!("server error while following: {data}"))),
        _ => {
            let event: Event = serde_json::from_str(data).map_err(|e| ClientError::Decode(format!("event: {e}")))?;
            *cursor = Some(event.seq);
            Ok(on_event(&event))
        }
    })
}
