//! The OpenAPI 3.1 documents of the HTTP API, generated from the code so they cannot drift: the
//! routers are built with `utoipa-axum`'s `OpenApiRouter` and `routes!`, so registering a route
//! is documenting it (its `#[utoipa::path]` says its parameters, body and every status it
//! answers), and the schemas are derived from the wire types themselves.
//!
//! Two documents: [`server_document`] (`pond server`: consumer, admin and `/v1/orch` routes) and
//! [`orchestrator_document`] (`pond orchestrator`: the `/v1/worker` routes its workers call).
//! Each is served at `GET /v1/openapi.json` by its process and checked in under `docs/`
//! (`pond openapi [--orchestrator]` prints them); `GET /docs` shows the server's with a vendored
//! Redoc.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr};
use utoipa::{Modify, OpenApi as _};

use crate::error::ErrorBody;

/// Name of the bearer scheme of consumers and admins (`pond_key_…`, `pond_admin_…`).
pub const BEARER: &str = "bearer";
/// Name of the bearer scheme of orchestrators on `/v1/orch` (`pond_orch_…`).
pub const ORCHESTRATOR: &str = "orchestrator";
/// Name of the header scheme carrying a worker's own credential on relayed job calls.
pub const WORKER_TOKEN: &str = "worker_token";
/// Name of the bearer scheme of workers on the orchestrator (`pond_worker_…`).
pub const WORKER: &str = "worker";

/// Response components shared by every operation: the error answers, all with the one
/// [`ErrorBody`] shape.
macro_rules! error_responses {
    ($($name:ident => $description:literal),* $(,)?) => {
        $(
            #[doc = $description]
            pub struct $name;

            impl<'r> utoipa::ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
                    (stringify!($name), error_response($description).into())
                }
            }
        )*
    };
}

error_responses! {
    BadRequest => "The request is malformed: the body is not JSON, or a path segment does not decode.",
    Unauthorized => "No valid credential: missing, malformed, unknown or revoked (`WWW-Authenticate: Bearer`).",
    Forbidden => "The credential is valid but may not do this (another project, or not an admin).",
    NotFound => "No such thing, or not visible to this credential (another project's run answers the same).",
    Conflict => "Conflicts with the current state.",
    PayloadTooLarge => "The body is larger than this route's limit (checked before the credential).",
    UnsupportedMediaType => "The body is not sent as `Content-Type: application/json`.",
    Invalid => "A field failed validation: `error.field` names it (`definition.stages[1].key`, `query.limit`, `path.id`) and `error.reason` says why. Text holding NUL (U+0000) is refused here too.",
    Unavailable => "The database is unreachable; retry (`Retry-After: 1`).",
    TooManyRequests => "Too many at once for this credential (e.g. open event streams), or a quota of its project used up (e.g. uploaded bundles no run uses); the message says which and what frees it.",
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    let mut response = ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build());
    // What `ApiError` adds to these two (see `error.rs`).
    let header = |description: &str| {
        utoipa::openapi::HeaderBuilder::new()
            .schema(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String))
            .description(Some(description))
            .build()
    };
    if description.starts_with("No valid credential") {
        response = response.header("WWW-Authenticate", header("`Bearer`."));
    } else if description.starts_with("The database is unreachable") {
        response = response.header("Retry-After", header("Seconds to wait before retrying (`1`)."));
    }
    response.build()
}

/// Bytes as they are: an artifact, a job's input, a bundle upload.
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::schema::SchemaFormat::KnownFormat(
                utoipa::openapi::schema::KnownFormat::Binary,
            )))
            .into()
    }
}

impl utoipa::ToSchema for Binary {}

/// One server-sent event of a followed log (`GET /v1/runs/{id}/logs?follow=1`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Documents the stream's events; the stream writes them with axum's `Event`.
pub struct LogStreamEvent {
    /// `log`: a line; `end`: the run ended (the last event); `error`: the stream ends early (the
    /// token was revoked, or the log could not be read).
    event: LogStreamEventKind,
    /// For `log`: the line's `seq`, which `Last-Event-ID` resumes after.
    id: Option<String>,
    /// JSON: a `LogLine` (`log`), a `LogEnd` (`end`); text for `error`.
    data: String,
}

/// The kinds of [`LogStreamEvent`].
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
pub enum LogStreamEventKind {
    /// A line.
    Log,
    /// The run ended.
    End,
    /// The stream ends early.
    Error,
}

/// Adds the security schemes.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_string());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            BEARER,
            bearer(
                "An API key: `Authorization: Bearer pond_key_…` (a consumer's, limited to its projects) or \
                 `pond_admin_…` (an admin's, everything). Made by `pond admin keys create`.",
            ),
        );
        components.add_security_scheme(
            ORCHESTRATOR,
            bearer(
                "An orchestrator's credential (`Authorization: Bearer pond_orch_…`), received when it enrolled \
                 with a code from `pond admin enroll create`.",
            ),
        );
        components.add_security_scheme(
            WORKER_TOKEN,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                crate::pool_wire::WORKER_TOKEN_HEADER,
                "On job calls an orchestrator relays: the worker's own credential (`pond_worker_…`) beside the \
                 orchestrator's bearer token. Pond checks both and that the worker holds the job's lease, so an \
                 orchestrator cannot act for a worker whose credential it does not present.",
            ))),
        );
    }
}

/// Adds the worker's bearer scheme of the orchestrator's document.
struct WorkerSecurity;

impl Modify for WorkerSecurity {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.description = Some(
            "A worker's credential (`Authorization: Bearer pond_worker_…`), received when it enrolled through this \
             orchestrator. The orchestrator asks pond about it (cached for 30 s) and relays it with every job call."
                .into(),
        );
        components.add_security_scheme(WORKER, SecurityScheme::Http(http));
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Pond",
        description = "Pond's control plane: submit runs (a workflow snapshot plus sources), read their state, \
            logs and artifacts; administer keys, the agent registry, credentials, budgets and worker pools; \
            the `/v1/orch` routes orchestrators call for their pools' workers.\n\n\
            Every error answer has the shape of `ErrorBody`. Every route has a body limit, checked before the \
            credential. Another project's run answers exactly like a missing one (404).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(
        schemas(ErrorBody),
        responses(BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, TooManyRequests,
            UnsupportedMediaType, Invalid, Unavailable),
    ),
    modifiers(&Security),
    tags(
        (name = "runs", description = "Submitting runs and reading their state, logs and artifacts."),
        (name = "verify", description = "What a reader checks pond's answers with: signing keys and the transparency log."),
        (name = "usage", description = "Model spend and budgets."),
        (name = "events", description = "Run and stage state changes, as a page or a stream."),
        (name = "webhooks", description = "A project's events POSTed to a URL (Standard Webhooks), with a delivery log."),
        (name = "keys", description = "API keys (admin), and rotating one's own."),
        (name = "agents", description = "The model and harness registry (admin)."),
        (name = "credentials", description = "Credentials, sealed at rest and never returned (admin)."),
        (name = "pools", description = "Enrollment codes and pool members (admin)."),
        (name = "orch", description = "What orchestrators call: enrollment, the claim long poll and their workers' job calls."),
        (name = "meta", description = "Health, version, metrics and these documents."),
    ),
)]
struct ServerBase;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Pond orchestrator",
        description = "What a `pond orchestrator` serves to its pool's workers. Workers long-poll for jobs; \
            job calls are relayed to pond's `/v1/orch/jobs/…` with the worker's credential, and pond's answers \
            (statuses and bodies) reach the worker unchanged. The orchestrator answers 503 itself only when \
            pond cannot be reached, and 401 only when pond refused the worker's credential.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(
        schemas(ErrorBody),
        responses(BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge,
            UnsupportedMediaType, Invalid, Unavailable),
    ),
    modifiers(&WorkerSecurity),
    tags(
        (name = "worker", description = "Enrollment, the claim long poll and job calls."),
        (name = "meta", description = "Health and this document."),
    ),
)]
struct OrchestratorBase;

/// The base of the server's document (info, shared components, security schemes); the
/// routers add their paths.
pub(crate) fn server_base() -> OpenApi {
    ServerBase::openapi()
}

/// The base of the orchestrator's document.
pub(crate) fn orchestrator_base() -> OpenApi {
    OrchestratorBase::openapi()
}

/// What the routers' documents need after they are assembled: axum's wildcard segments
/// (`{*name}`) written as OpenAPI path templates (`{name}`), so a client fills them like any
/// parameter (a wildcard's value may hold `/`).
pub(crate) fn finish(mut openapi: OpenApi) -> OpenApi {
    let paths = std::mem::take(&mut openapi.paths.paths);
    openapi.paths.paths = paths.into_iter().map(|(path, item)| (path.replace("{*", "{"), item)).collect();
    openapi
}

/// `T`'s object schema with one more (required) property: the schema of a type that flattens
/// `T` beside a field of its own. (utoipa's `allOf` for `#[serde(flatten)]` would keep `T`'s
/// `additionalProperties: false`, which refuses the other field.)
pub(crate) fn with_property<T: utoipa::PartialSchema>(
    name: &str,
    property: RefOr<utoipa::openapi::schema::Schema>,
    description: &str,
) -> RefOr<utoipa::openapi::schema::Schema> {
    let mut schema = T::schema();
    if let RefOr::T(utoipa::openapi::schema::Schema::Object(object)) = &mut schema {
        object.properties.insert(name.to_string(), property);
        object.required.insert(0, name.to_string());
        object.description = Some(description.to_string());
    }
    schema
}

/// The server's document (see the module docs).
pub fn server_document() -> &'static OpenApi {
    static DOCUMENT: OnceLock<OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(crate::api::openapi)
}

/// The orchestrator's document.
pub fn orchestrator_document() -> &'static OpenApi {
    static DOCUMENT: OnceLock<OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(crate::orchestrator::openapi)
}

/// A document as the checked-in files hold it: pretty JSON ending in a newline.
pub fn to_json(openapi: &OpenApi) -> String {
    let mut value = match serde_json::to_value(openapi) {
        Ok(value) => value,
        Err(e) => return format!("{{\"error\": \"{e}\"}}\n"),
    };
    fix_link_fields(&mut value);
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// utoipa 5 writes a Link object's fields in snake case (`operation_id`); OpenAPI spells them
/// `operationId`, `operationRef` and `requestBody`, and clients ignore a link without them.
fn fix_link_fields(document: &mut serde_json::Value) {
    let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) else { return };
    let operations = paths.values_mut().filter_map(|item| item.as_object_mut()).flat_map(|item| item.values_mut());
    let responses = operations.filter_map(|op| op.get_mut("responses")?.as_object_mut()).flat_map(|r| r.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else { continue };
        for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
            for (from, to) in
                [("operation_id", "operationId"), ("operation_ref", "operationRef"), ("request_body", "requestBody")]
            {
                if let Some(value) = link.remove(from) {
                    link.insert(to.to_string(), value);
                }
            }
        }
    }
}

fn json_document(openapi: &'static OpenApi, cache: &'static OnceLock<String>) -> Response {
    let text = cache.get_or_init(|| to_json(openapi));
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], text.as_str()).into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object)))]
pub(crate) async fn server_openapi_json() -> Response {
    static TEXT: OnceLock<String> = OnceLock::new();
    json_document(server_document(), &TEXT)
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object)))]
pub(crate) async fn orchestrator_openapi_json() -> Response {
    static TEXT: OnceLock<String> = OnceLock::new();
    json_document(orchestrator_document(), &TEXT)
}

/// The Redoc bundle, vendored from npm (`redoc` 2.x, `bundles/redoc.standalone.js`, MIT: its
/// licence is beside it): the docs page loads nothing from anywhere else.
const REDOC_JS: &[u8] = include_bytes!("../assets/redoc/redoc.standalone.js");

/// The docs page: Redoc showing `/v1/openapi.json`, every URL local.
const DOCS_HTML: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pond API</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<redoc spec-url="/v1/openapi.json" disable-search="false"></redoc>
<script src="/docs/redoc.standalone.js"></script>
</body>
</html>
"#;

/// The API's documentation page.
#[utoipa::path(get, path = "/docs", tag = "meta", security(()),
    responses((status = 200, description = "The API's documentation (Redoc, served by pond itself).", content_type = "text/html", body = String)))]
pub(crate) async fn docs_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            // The page runs only pond's own script and reads only pond's own document.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                     img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; \
                     frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                ),
            ),
        ],
        DOCS_HTML,
    )
        .into_response()
}

/// The docs page's script.
#[utoipa::path(get, path = "/docs/redoc.standalone.js", tag = "meta", security(()),
    responses((status = 200, description = "Redoc's standalone bundle (MIT), vendored.", content_type = "text/javascript", body = String)))]
pub(crate) async fn docs_script() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600")),
        ],
        REDOC_JS,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The modules that build the server's and the orchestrator's routers register routes only
    /// through `routes!`, which documents them: axum's own `.route(` would serve one undocumented.
    #[test]
    fn routers_register_routes_only_with_their_documentation() {
        let routers = [
            ("api.rs", include_str!("api.rs")),
            ("orch.rs", include_str!("orch.rs")),
            ("orchestrator.rs", include_str!("orchestrator.rs")),
            ("agents_api.rs", include_str!("agents_api.rs")),
            ("keys_api.rs", include_str!("keys_api.rs")),
            ("usage_api.rs", include_str!("usage_api.rs")),
        ];
        for (file, text) in routers {
            for undocumented in [".route(\"", ".route_service(", ".nest_service(", "axum::routing::"] {
                assert!(!text.contains(undocumented), "{file} registers a route with `{undocumented}`: use `routes!`");
            }
        }
    }

    /// What the boundary guarantees for every route is in every operation's responses: a
    /// credential refused (401) where one is needed, a body over the limit (413) where one is
    /// taken, and each answer's body in the error shape.
    #[test]
    fn every_operation_documents_what_the_boundary_answers() {
        for document in [server_document(), orchestrator_document()] {
            let json: serde_json::Value = serde_json::from_str(&to_json(document)).unwrap();
            for (path, item) in json["paths"].as_object().unwrap() {
                for (method, operation) in item.as_object().unwrap() {
                    let responses = operation["responses"].as_object().unwrap();
                    let secured = operation["security"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|r| r.as_object().is_some_and(|r| !r.is_empty())));
                    if secured {
                        assert!(responses.contains_key("401"), "{method} {path} does not document 401");
                    }
                    if operation.get("requestBody").is_some() {
                        assert!(responses.contains_key("413"), "{method} {path} does not document 413");
                    }
                    for (status, response) in responses {
                        if status.starts_with('4') || status.starts_with('5') {
                            let reference = response["$ref"].as_str().unwrap_or_default();
                            assert!(reference.starts_with("#/components/responses/"), "{method} {path} {status}");
                        }
                    }
                    // Links name operations that exist, as OpenAPI spells the field.
                    for response in responses.values() {
                        for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                            let target = link["operationId"].as_str().unwrap_or_default();
                            assert!(json.to_string().contains(&format!("\"operationId\":\"{target}\"")), "{target}");
                        }
                    }
                }
            }
        }
    }
}
