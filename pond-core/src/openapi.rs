//! OpenAPI schemas of the types whose JSON shape is written by hand (ids, times, spans, the
//! executor union); every other wire type derives its schema beside its definition. Only built
//! with the `openapi` feature, which pond-http turns on.

use std::borrow::Cow;

use utoipa::openapi::schema::{Discriminator, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::definition::{BuiltinSpec, ExecutorSpec, NoopSpec, ShellSpec, SwarmSpec};
use crate::ids::{BlobId, RunId, TokenId};
use crate::source::{ResolvedSource, Source, SourceSpec};
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
    }
    schema
}

/// The executor variants: `kind` and the component holding its settings.
const EXECUTORS: [(&str, &str); 4] =
    [("noop", "NoopExecutor"), ("builtin", "BuiltinExecutor"), ("shell", "ShellExecutor"), ("swarm", "SwarmExecutor")];

impl PartialSchema for ExecutorSpec {
    fn schema() -> RefOr<Schema> {
        let mut discriminator = Discriminator::new("kind");
        let mut one_of = OneOfBuilder::new();
        for (kind, name) in EXECUTORS {
            discriminator.mapping.insert(kind.into(), format!("#/components/schemas/{name}"));
            one_of = one_of.item(Ref::from_schema_name(name));
        }
        one_of
            .discriminator(Some(discriminator))
            .description(Some("Which executor runs a stage, with its settings; `kind` selects the variant."))
            .into()
    }
}

impl ToSchema for ExecutorSpec {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExecutorSpec")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        let variants = [
            executor_variant::<NoopSpec>("noop"),
            executor_variant::<BuiltinSpec>("builtin"),
            executor_variant::<ShellSpec>("shell"),
            executor_variant::<SwarmSpec>("swarm"),
        ];
        for ((_, name), schema) in EXECUTORS.into_iter().zip(variants) {
            schemas.push((name.to_string(), schema));
        }
        NoopSpec::schemas(schemas);
        BuiltinSpec::schemas(schemas);
        ShellSpec::schemas(schemas);
        SwarmSpec::schemas(schemas);
    }
}

/// The kinds of source: `kind` and the component of that kind of source.
const SOURCES: [(&str, &str); 3] =
    [("git_https", "GitHttpsSource"), ("local", "LocalSource"), ("bundle", "BundleSource")];

impl PartialSchema for Source {
    fn schema() -> RefOr<Schema> {
        let mut discriminator = Discriminator::new("kind");
        let mut one_of = OneOfBuilder::new();
        for (kind, name) in SOURCES {
            discriminator.mapping.insert(kind.into(), format!("#/components/schemas/{name}"));
            one_of = one_of.item(Ref::from_schema_name(name));
        }
        one_of
            .discriminator(Some(discriminator))
            .description(Some("A source of a run, as submitted plus what fetching it resolved."))
            .into()
    }
}

impl ToSchema for Source {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Source")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        // The JSON is flat — `{"label", "kind", "config", "resolved"?}` — so each kind of source
        // is one object with the label and resolution beside its kind and config (rather than an
        // `allOf` of the label and the `kind`/`config` union, which client generators trip over).
        let label: RefOr<Schema> = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("Name of the source within the run; also its directory name in the checkout."))
            .into();
        let mut resolved = Ref::from_schema_name("ResolvedSource");
        resolved.description = "What the first fetch found; later fetches reproduce it.".into();
        let resolved: RefOr<Schema> = resolved.into();
        if let RefOr::T(Schema::OneOf(kinds)) = SourceSpec::schema() {
            for ((_, name), mut kind) in SOURCES.into_iter().zip(kinds.items) {
                if let RefOr::T(Schema::Object(object)) = &mut kind {
                    object.properties.insert("label".into(), label.clone());
                    object.properties.insert("resolved".into(), resolved.clone());
                    object.required.insert(0, "label".into());
                    if let Some(RefOr::T(Schema::Object(config))) = object.properties.get_mut("config") {
                        config.title = Some(format!("{name}Config"));
                    }
                }
                schemas.push((name.to_string(), kind));
            }
        }
        schemas.push(("ResolvedSource".into(), ResolvedSource::schema()));
        SourceSpec::schemas(schemas);
    }
}
