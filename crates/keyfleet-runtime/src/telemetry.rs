//! Telemetry setup: `tracing` to stderr as text or JSON (filtered by `RUST_LOG`), and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OpenTelemetry traces and metrics over OTLP/gRPC.
//!
//! The OTLP side follows the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//! per-signal `…_TRACES_ENDPOINT`/`…_METRICS_ENDPOINT`), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `…_TIMEOUT`, `…_COMPRESSION`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL` and `OTEL_SDK_DISABLED`.
//! Without an endpoint no exporter, no OpenTelemetry layer and no trace-context parsing exist.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Dispatch, Level};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

/// Where and as what to export over OTLP/gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// Overrides the `OTEL_EXPORTER_OTLP_*ENDPOINT` variables (tests point it at a collector).
    pub endpoint: Option<String>,
    /// `service.name`, unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` name one.
    pub service_name: String,
    /// Overrides `OTEL_METRIC_EXPORT_INTERVAL`.
    pub metric_interval: Option<Duration>,
}

impl Otlp {
    /// OTLP export as the environment asks for it: `None` unless an OTLP endpoint variable is
    /// set (and `OTEL_SDK_DISABLED` is not `true`).
    pub fn from_env(default_service_name: &str) -> Option<Otlp> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let disabled =
            std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let endpoint = set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        (endpoint && !disabled).then(|| Otlp {
            endpoint: None,
            service_name: default_service_name.to_owned(),
            metric_interval: None,
        })
    }
}

/// Flushes and shuts the OpenTelemetry exporters down when dropped (after the servers have
/// drained). Holds nothing when OTLP export is off.
#[must_use = "dropping the guard shuts the exporters down"]
#[derive(Debug, Default)]
pub struct Guard {
    providers: Option<(SdkTracerProvider, SdkMeterProvider)>,
}

impl Guard {
    /// True when spans and metrics are exported.
    pub fn exporting(&self) -> bool {
        self.providers.is_some()
    }

    /// Exports every finished span and the current metrics now, without blocking the runtime.
    pub async fn flush(&self) {
        if let Some((tracer, meter)) = self.providers.clone() {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = tracer.force_flush();
                let _ = meter.force_flush();
            })
            .await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some((tracer, meter)) = self.providers.take() else {
            return;
        };
        let shutdown = move || {
            if let Err(e) = tracer.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: could not flush traces on shutdown: {e}");
            }
            if let Err(e) = meter.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: could not flush metrics on shutdown: {e}");
            }
        };
        // The exporters' I/O runs on the Tokio runtime: on a worker thread, let the others
        // drive it while this one blocks.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(shutdown),
            _ => shutdown(),
        }
    }
}

static EXPORTING: AtomicBool = AtomicBool::new(false);
static METER_PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// True once an OTLP exporter exists in this process: only then is incoming trace context
/// parsed, so the hot path pays nothing when export is off.
pub fn otel_enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The meter provider of the OTLP export, when there is one (see `metrics_bridge`).
pub(crate) fn meter_provider() -> Option<&'static SdkMeterProvider> {
    METER_PROVIDER.get()
}

/// Installs the global subscriber for the binary. `default_filter` applies when `RUST_LOG` is
/// unset; OTLP export starts when the environment asks for it (see the module docs), named
/// `service_name` unless `OTEL_SERVICE_NAME` says otherwise. Must run inside the Tokio runtime
/// (the exporters live on it); call it once and keep the guard until the servers have drained.
pub fn init(format: LogFormat, default_filter: &str, service_name: &str) -> Guard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let otlp = Otlp::from_env(service_name);
    let (dispatch, guard) = match build(format, filter, otlp.as_ref(), false) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("warning: OpenTelemetry export disabled: {e:#}");
            let filter = EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(default_filter));
            build(format, filter, None, false).expect("logging alone always builds")
        }
    };
    let exporting = guard.exporting();
    if tracing::dispatcher::set_global_default(dispatch).is_ok() && exporting {
        tracing::info!(
            service = service_name,
            "exporting traces and metrics over OTLP/gRPC"
        );
    }
    guard
}

/// Logging for tests: captured by the test harness, `RUST_LOG` or warnings only.
pub fn test_init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A subscriber for tests that exports to `otlp` (a collector the test runs), to be installed
/// for one thread with `tracing::dispatcher::set_default` (run the test on a current-thread
/// runtime so the servers' tasks see it).
pub fn test_dispatch(otlp: &Otlp) -> anyhow::Result<(Dispatch, Guard)> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    build(LogFormat::Text, filter, Some(otlp), true)
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Builds the subscriber: the log layer filtered by `filter`, plus, with `otlp`, the
/// OpenTelemetry layer that exports keyfleet's spans at INFO and above (whatever `RUST_LOG`
/// says about log lines).
fn build(
    format: LogFormat,
    filter: EnvFilter,
    otlp: Option<&Otlp>,
    test_writer: bool,
) -> anyhow::Result<(Dispatch, Guard)> {
    // Colours only on a terminal: `docker logs` and log files get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs: BoxedLayer = match (format, test_writer) {
        (_, true) => fmt.with_test_writer().with_filter(filter).boxed(),
        (LogFormat::Text, false) => fmt.with_writer(std::io::stderr).with_filter(filter).boxed(),
        (LogFormat::Json, false) => fmt
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![logs];
    let mut guard = Guard::default();
    if let Some(otlp) = otlp {
        let (tracer_provider, meter_provider) = providers(otlp)?;
        let tracer = tracer_provider.tracer("keyfleet");
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(Targets::new().with_target("keyfleet", Level::INFO))
                .boxed(),
        );
        let _ = METER_PROVIDER.set(meter_provider.clone());
        opentelemetry::global::set_meter_provider(meter_provider.clone());
        EXPORTING.store(true, Ordering::Relaxed);
        guard.providers = Some((tracer_provider, meter_provider));
    }
    let subscriber = Registry::default().with(layers);
    Ok((Dispatch::new(subscriber), guard))
}

fn providers(otlp: &Otlp) -> anyhow::Result<(SdkTracerProvider, SdkMeterProvider)> {
    use opentelemetry_otlp::WithExportConfig as _;
    let resource = resource(&otlp.service_name);
    let mut spans = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let mut metrics = opentelemetry_otlp::MetricExporter::builder().with_tonic();
    if let Some(endpoint) = &otlp.endpoint {
        spans = spans.with_endpoint(endpoint.clone());
        metrics = metrics.with_endpoint(endpoint.clone());
    }
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans.build()?)
        .with_resource(resource.clone())
        .build();
    let mut reader = PeriodicReader::builder(metrics.build()?);
    if let Some(interval) = otlp.metric_interval {
        reader = reader.with_interval(interval);
    }
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(reader.build())
        .with_resource(resource)
        .build();
    Ok((tracer_provider, meter_provider))
}

/// The resource: the SDK's detectors (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, SDK
/// name and version), then our defaults for what they leave unset.
fn resource(service_name: &str) -> Resource {
    let from_env = Resource::builder().build();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name(service_name.to_owned());
    }
    if from_env
        .get(&opentelemetry::Key::from_static_str("service.version"))
        .is_none()
    {
        builder =
            builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    builder.build()
}
