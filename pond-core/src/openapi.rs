//! OpenAPI schemas of the types whose JSON shape is written by hand (ids, times, spans, the
//! executor union); every other wire type derives its schema beside its definition. Only built
//! with the `openapi` feature, which pond-http turns on.

use std::borrow::Cow;

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::definition::{BuiltinSpec, ExecutorSpec, NoopSpec, ShellSpec, SwarmSpec};
use crate::ids::{BlobId, RunId, TokenId};
use crate::time::{Millis, Timestamp};

fn uuid(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uuid".into())))
        .description(Some(description))
        .into()
}

macro_rules! uuid_schema {
    ($name:ident, $description:literal) => {
        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                uuid($description)
            }
        }
        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

uuid_schema!(RunId, "A run's id (UUIDv7: ids sort by creation time).");
uuid_schema!(BlobId, "A stored blob's id (an uploaded bundle or an artifact's bytes).");
uuid_schema!(TokenId, "An API key's id (never secret).");

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("RFC 3339, UTC, millisecond precision."))
            .into()
    }
}

impl ToSchema for Timestamp {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Timestamp")
    }
}

impl PartialSchema for Millis {
    fn schema() -> RefOr<Schema> {
        // Read as seconds or as text; always written as text.
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Number).minimum(Some(0.0)).description(Some("Seconds.")))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("A duration as text: `90s`, `5m`, `1h 30m`.")),
            )
            .description(Some("A span of time: seconds as a number, or text such as `90s` (shown as text)."))
            .into()
    }
}

impl ToSchema for Millis {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Duration")
    }
}

/// One executor variant: the variant's own settings with its `kind` added (the JSON is flat:
/// `{"kind": "shell", "argv": […]}`).
fn executor_variant<T: PartialSchema>(kind: &str) -> RefOr<Schema> {
    let mut schema = T::schema();
    if let RefOr::T(Schema::Object(object)) = &mut schema {
        let tag = ObjectBuilder::new().schema_type(Type::String).enum_values(Some([kind])).build();
        object.properties.insert("kind".into(), tag.into());
        object.required.insert(0, "kind".into());
        object.title = Some(kind.to_string());
    }
    schema
}

impl PartialSchema for ExecutorSpec {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(executor_variant::<NoopSpec>("noop"))
            .item(executor_variant::<BuiltinSpec>("builtin"))
            .item(executor_variant::<ShellSpec>("shell"))
            .item(executor_variant::<SwarmSpec>("swarm"))
            .description(Some("Which executor runs a stage, with its settings; `kind` selects the variant."))
            .into()
    }
}

impl ToSchema for ExecutorSpec {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExecutorSpec")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        NoopSpec::schemas(schemas);
        BuiltinSpec::schemas(schemas);
        ShellSpec::schemas(schemas);
        SwarmSpec::schemas(schemas);
    }
}
