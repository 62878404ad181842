//! OpenTelemetry traces, sent over OTLP/HTTP when an endpoint is configured.
//!
//! taskql's spans are `tracing` spans at DEBUG level; the OpenTelemetry
//! layer exports those of requests (the HTTP request, its GraphQL
//! operation, the service call, each database statement). With no endpoint
//! there is no layer, and the log filter (INFO by default) disables these
//! spans where they are written: they cost a check of a cached flag.
//!
//! The trace context travels in W3C `traceparent` headers, and with a task:
//! a create stores the `traceparent` of its service span in the task, and a
//! worker sends a child of it with its calls about the task.
use std::collections::HashMap;

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::config::{ConfigError, TraceExport, TraceSampler};

/// The header that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The name of the span of an HTTP request: the only span that may start a
/// trace (the reaper's and other background spans never do).
pub const HTTP_SPAN: &str = "http.request";

/// The exporting half of tracing: the SDK's provider, whose batch thread
/// sends spans. [`Self::shutdown`] sends what is left.
pub struct Traces {
    provider: SdkTracerProvider,
}

fn sampler(setting: TraceSampler) -> Sampler {
    let root = match setting.ratio {
        r if r >= 1.0 => Sampler::AlwaysOn,
        r if r <= 0.0 => Sampler::AlwaysOff,
        r => Sampler::TraceIdRatioBased(r),
    };
    if setting.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

impl Traces {
    /// Starts the exporter; it sends batches on a thread of its own (the
    /// `OTEL_BSP_*` variables tune them).
    pub fn start(export: &TraceExport) -> Result<Self, ConfigError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(export.endpoint.clone())
            .build()
            .map_err(|err| {
                ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("cannot export to {}: {err}", export.endpoint),
                )
            })?;
        // The SDK reads OTEL_RESOURCE_ATTRIBUTES; a name set there stands
        // unless OTEL_SERVICE_NAME (or its flag) gives one.
        let detected = Resource::builder().build();
        let unnamed = detected
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .is_none_or(|name| name.as_str().starts_with("unknown_service"));
        let service_name = match &export.service_name {
            Some(name) => Some(name.clone()),
            None if unnamed => Some("taskql".to_owned()),
            None => None,
        };
        let resource = match service_name {
            Some(name) => Resource::builder().with_service_name(name).build(),
            None => detected,
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler(export.sampler))
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The layer that turns request spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        // taskql's spans, and its events at INFO or above (as span events).
        let ours = |meta: &tracing::Metadata<'_>| {
            meta.target().starts_with("taskql")
                && (meta.is_span() || *meta.level() <= tracing::Level::INFO)
        };
        // Only a request starts a trace; inside one, every span of ours.
        let filter = tracing_subscriber::filter::dynamic_filter_fn(
            move |meta: &tracing::Metadata<'_>, cx: &tracing_subscriber::layer::Context<'_, S>| {
                ours(meta) && (meta.name() == HTTP_SPAN || cx.lookup_current().is_some())
            },
        )
        .with_callsite_filter(move |meta| {
            if ours(meta) {
                Interest::sometimes()
            } else {
                Interest::never()
            }
        })
        .with_max_level_hint(LevelFilter::DEBUG);
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("taskql"))
            .with_location(false)
            .with_threads(false)
            .with_filter(filter)
    }

    /// Sends the spans not sent yet, and stops the exporter.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "cannot send the last spans");
        }
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// The trace a request continues: its `traceparent` (and `tracestate`).
/// A missing or malformed one gives an empty context, so a new trace.
pub fn remote_context(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &Headers(headers))
}

/// The `traceparent` that names `span` as the parent, when it is traced
/// (sampled or not: a worker then keeps the same decision).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut fields);
    fields.remove(TRACEPARENT)
}

/// The span of one GraphQL operation, named `mutation CreateTask` as
/// OpenTelemetry's GraphQL conventions ask.
pub fn graphql_span(kind: Option<&'static str>, name: Option<&str>) -> tracing::Span {
    tracing::debug_span!(
        "graphql",
        otel.name = %match (kind, name) {
            (Some(kind), Some(name)) => format!("{kind} {name}"),
            (Some(kind), None) => kind.to_owned(),
            (None, _) => "graphql".to_owned(),
        },
        "graphql.operation.type" = kind,
        "graphql.operation.name" = name,
    )
}

/// Middleware: the span of an HTTP request, named by its route, which
/// continues the trace of an incoming `traceparent`. Websocket upgrades get
/// one too; the operations of the socket that follows are not traced.
pub async fn trace_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str());
    let span = tracing::debug_span!(
        HTTP_SPAN,
        otel.name = %format_args!("{} {}", request.method(), route.unwrap_or("")),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = %request.method(),
        "http.route" = route,
        "http.response.status_code" = tracing::field::Empty,
    );
    if span.is_disabled() {
        return next.run(request).await;
    }
    // A span not traced (tracing is off, or only logs asked for it) has
    // no parent to set; nor does a malformed header.
    let _ = span.set_parent(remote_context(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}
