//! The trace settings: OpenTelemetry's standard `OTEL_*` variables, which
//! say whether spans are exported, where and which. `crate::telemetry`
//! reads them. As OpenTelemetry's specification asks, an empty `OTEL_*`
//! value is the same as none, so their text is kept as given and checked
//! together by [`trace_export`].
use clap::Args;

use super::ConfigError;

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Traces")]
pub struct TelemetrySettings {
    /// Base URL of an OTLP/HTTP collector; spans go to `<url>/v1/traces`.
    /// Tracing is off while neither endpoint is set.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// The full URL spans are sent to, instead of OTEL_EXPORTER_OTLP_ENDPOINT's.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", global = true)]
    pub otlp_traces_endpoint: Option<String>,
    /// How spans are sent: http/protobuf, the one protocol taskql speaks.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", global = true)]
    pub otlp_protocol: Option<String>,
    /// Like OTEL_EXPORTER_OTLP_PROTOCOL, for traces only (it wins).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", global = true)]
    pub otlp_traces_protocol: Option<String>,
    /// `service.name` of the spans taskql sends.
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true)]
    pub otel_service_name: Option<String>,
    /// Which traces are kept: always_on, always_off, traceidratio,
    /// parentbased_always_on (the default), parentbased_always_off,
    /// parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", global = true)]
    pub traces_sampler: Option<String>,
    /// The ratio of the traceidratio samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", global = true)]
    pub traces_sampler_arg: Option<String>,
}

/// Where and how spans are exported, when tracing is on.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    /// The URL spans are POSTed to (OTLP/HTTP, protobuf).
    pub endpoint: String,
    /// `OTEL_SERVICE_NAME`; without it, a `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`, else `taskql`.
    pub service_name: Option<String>,
    pub sampler: TraceSampler,
}

/// Which traces are kept, as `OTEL_TRACES_SAMPLER` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// Follow the caller's decision when a request continues a trace.
    pub parent_based: bool,
    /// The share of new traces kept, from 0 to 1.
    pub ratio: f64,
}

/// An `OTEL_*` value: as OpenTelemetry's specification asks, an empty one
/// is the same as none.
fn otel_value(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|text| !text.is_empty())
}

/// The URL spans go to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as given, or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended.
fn traces_endpoint(settings: &TelemetrySettings) -> Result<Option<String>, ConfigError> {
    let (setting, given, url) = match (
        otel_value(settings.otlp_traces_endpoint.as_deref()),
        otel_value(settings.otlp_endpoint.as_deref()),
    ) {
        (Some(url), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url, url.to_owned()),
        (None, Some(base)) => (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            base,
            format!("{}/v1/traces", base.trim_end_matches('/')),
        ),
        (None, None) => return Ok(None),
    };
    let is_http = url.parse::<axum::http::Uri>().ok().is_some_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
    });
    if !is_http {
        return Err(ConfigError::new(
            setting,
            format!("'{given}' is not an http:// or https:// URL like http://localhost:4318"),
        ));
    }
    Ok(Some(url))
}

/// Whether tracing is on, and how: from the standard `OTEL_*` variables.
/// An unsupported protocol or sampler is an error even while tracing is off.
pub fn trace_export(settings: &TelemetrySettings) -> Result<Option<TraceExport>, ConfigError> {
    let (setting, protocol) = match otel_value(settings.otlp_traces_protocol.as_deref()) {
        Some(protocol) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(protocol)),
        None => (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            otel_value(settings.otlp_protocol.as_deref()),
        ),
    };
    if let Some(protocol) = protocol.filter(|p| *p != "http/protobuf") {
        return Err(ConfigError::new(
            setting,
            format!("'{protocol}' is not supported; taskql sends traces as http/protobuf"),
        ));
    }
    let sampler_name =
        otel_value(settings.traces_sampler.as_deref()).unwrap_or("parentbased_always_on");
    let ratio_arg = || -> Result<f64, ConfigError> {
        match otel_value(settings.traces_sampler_arg.as_deref()) {
            None => Ok(1.0),
            Some(text) => match text.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                _ => Err(ConfigError::new(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("'{text}' is not a ratio from 0 to 1, like 0.25"),
                )),
            },
        }
    };
    let (parent_based, ratio) = match sampler_name {
        "always_on" => (false, 1.0),
        "always_off" => (false, 0.0),
        "traceidratio" => (false, ratio_arg()?),
        "parentbased_always_on" => (true, 1.0),
        "parentbased_always_off" => (true, 0.0),
        "parentbased_traceidratio" => (true, ratio_arg()?),
        other => {
            return Err(ConfigError::new(
                "OTEL_TRACES_SAMPLER",
                format!(
                    "'{other}' is not one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            ));
        }
    };
    let Some(endpoint) = traces_endpoint(settings)? else {
        return Ok(None);
    };
    Ok(Some(TraceExport {
        endpoint,
        service_name: otel_value(settings.otel_service_name.as_deref()).map(str::to_owned),
        sampler: TraceSampler {
            parent_based,
            ratio,
        },
    }))
}
