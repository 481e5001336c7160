//! Observability: a verifier's RPC span joins the caller's W3C trace and reaches an in-test
//! OTLP collector (with the node's metrics); `/metrics` parsed as Prometheus text moves as
//! traffic and outages say it should.

use std::collections::HashMap;

use keyfleet_runtime::telemetry::{self, Otlp};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::trace::v1::Span;

use super::*;

// ---------------------------------------------------------------------------------------------
// An OTLP/gRPC collector

/// An exported span with its resource's attributes.
type ResourceSpan = (Vec<KeyValue>, Span);
/// An exported metric point: metric name, point attributes, value.
type Point = (String, Vec<KeyValue>, f64);

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ResourceSpan>>>,
    points: Arc<Mutex<Vec<Point>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.unwrap_or_default().attributes;
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (resource.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut points = self.points.lock().unwrap();
        for resource_metrics in request.into_inner().resource_metrics {
            for scope in resource_metrics.scope_metrics {
                for m in scope.metrics {
                    let data = match m.data {
                        Some(metric::Data::Sum(s)) => s.data_points,
                        Some(metric::Data::Gauge(g)) => g.data_points,
                        _ => continue,
                    };
                    for p in data {
                        let value = match p.value {
                            Some(NumberValue::AsDouble(v)) => v,
                            Some(NumberValue::AsInt(v)) => v as f64,
                            None => continue,
                        };
                        points.push((m.name.clone(), p.attributes, value));
                    }
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;

impl Collector {
    /// The collector, its URL, and its server (stopped when dropped).
    async fn start() -> (Collector, String, Task) {
        let collector = Collector::default();
        let routes = Routes::new(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()));
        let (addr, task) = serve::grpc(routes).await;
        (collector, format!("http://{addr}"), task)
    }

    fn span_named(&self, name: &str) -> Option<ResourceSpan> {
        let spans = self.spans.lock().unwrap();
        spans.iter().find(|(_, s)| s.name == name).cloned()
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match &kv.value {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(s)),
            }) => Some(s.as_str()),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// Current-thread runtime: the test's subscriber (set for this thread only, not globally, so
// the other tests of this binary keep theirs) then sees every task of the servers.
#[test]
fn verify_span_joins_the_callers_trace_and_reaches_the_collector() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (collector, url, collector_server) = Collector::start().await;
        let (dispatch, guard) = telemetry::test_dispatch(&Otlp {
            endpoint: Some(url),
            service_name: "keyfleet-verifier-test".into(),
            metric_interval: None,
        })
        .unwrap();
        assert!(guard.exporting() && telemetry::otel_enabled());
        let _scoped = tracing::dispatcher::set_default(&dispatch);

        let a = key(1);
        let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
        let node = ready_node(Config {
            clock: Clock::manual(NOW),
            ..Config::for_test(authority.source())
        })
        .await;

        // The caller's span, as an instrumented microservice would send it.
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let parent_id = "00f067aa0ba902b7";
        let good = token(&a, NOW);
        let mut request = Request::new(VerifyRequest {
            token: good.clone(),
            audience: String::new(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
        );
        let response = node.client.clone().verify(request).await.unwrap();
        assert!(response.into_inner().valid);

        guard.flush().await;
        eventually("the Verify span at the collector", || async {
            guard.flush().await;
            collector
                .span_named("keyfleet.v1.Verifier/Verify")
                .is_some()
        })
        .await;
        let (resource, span) = collector.span_named("keyfleet.v1.Verifier/Verify").unwrap();
        assert_eq!(hex(&span.trace_id), trace_id, "joins the caller's trace");
        assert_eq!(
            hex(&span.parent_span_id),
            parent_id,
            "child of the caller's span"
        );
        assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(
            attr(&resource, "service.name"),
            Some("keyfleet-verifier-test")
        );
        for (key, want) in [
            ("node_id", "test-node"),
            ("region", "test"),
            ("reason", "OK"),
            ("kid", a.kid.as_str()),
            ("rpc.system", "grpc"),
            ("rpc.method", "Verify"),
        ] {
            assert_eq!(attr(&span.attributes, key), Some(want), "{key}");
        }
        // Never the token, anywhere in what was exported.
        let exported = format!("{:?}", collector.spans.lock().unwrap());
        assert!(!exported.contains(&good), "a token reached the collector");
        let signature = good.rsplit('.').next().unwrap();
        assert!(!exported.contains(signature));

        // The node's Prometheus registry is exported too, labelled with the node.
        eventually("keyfleet_verify at the collector", || async {
            guard.flush().await;
            collector.points.lock().unwrap().iter().any(|(name, a, v)| {
                name == "keyfleet_verify"
                    && attr(a, "reason") == Some("OK")
                    && attr(a, "node_id") == Some("test-node")
                    && *v >= 1.0
            })
        })
        .await;

        node.stop().await;
        authority.stop().await;
        // Shutting the exporters down blocks: off this (the runtime's only) thread.
        tokio::task::spawn_blocking(move || drop(guard))
            .await
            .unwrap();
        drop(collector_server);
    });
}

// ---------------------------------------------------------------------------------------------
// /metrics as Prometheus sees it

struct Scraped(HashMap<String, Vec<prometheus_parse::Sample>>);

impl Scraped {
    /// The value of `name` with exactly these labels among its own (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map_or(0.0, |s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name} is not a number: {other:?}"),
            })
    }

    fn verdicts(&self, reason: &str) -> f64 {
        self.get("keyfleet_verify_total", &[("reason", reason)])
    }
}

impl Node {
    async fn scrape(&self) -> Scraped {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("/metrics parses as Prometheus text");
        let mut by_name: HashMap<String, Vec<prometheus_parse::Sample>> = HashMap::new();
        for sample in scrape.samples {
            by_name
                .entry(sample.metric.clone())
                .or_default()
                .push(sample);
        }
        Scraped(by_name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_entries_zero_checks_every_token() {
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let node = ready_node(Config {
        cache_entries: 0,
        clock: Clock::manual(NOW),
        ..Config::for_test(authority.source())
    })
    .await;
    let before = node.scrape().await;
    for what in ["valid", "valid again", "and again"] {
        check(&node, what, &token(&a, NOW), "", Reason::Ok).await;
    }
    let after = node.scrape().await;
    assert_eq!(after.verdicts("OK") - before.verdicts("OK"), 3.0);
    for name in ["keyfleet_cache_hits_total", "keyfleet_cache_entries"] {
        assert_eq!(after.get(name, &[]), 0.0, "{name} with the cache off");
    }
    node.stop().await;
    authority.stop().await;
}

/// A node on a manual clock at `NOW` that pulls every 100 ms, following `authority`.
async fn pulling_node(authority: &FakeAuthority, clock: &Clock) -> Node {
    ready_node(Config {
        refresh_interval: Duration::from_millis(100),
        unknown_kid_cooldown: Duration::from_secs(3600),
        clock: clock.clone(),
        ..Config::for_test(authority.source())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_verdicts_and_show_freshness() {
    let (a, stranger) = (key(1), key(9));
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let node = pulling_node(&authority, &Clock::manual(NOW)).await;

    let before = node.scrape().await;
    assert_eq!(
        before.get(
            "keyfleet_node_info",
            &[("node_id", "test-node"), ("region", "test")]
        ),
        1.0
    );
    assert_eq!(before.get("keyfleet_jwks_version", &[]), 1.0);
    assert_eq!(before.get("keyfleet_jwks_age_seconds", &[]), 0.0);

    check(&node, "valid", &token(&a, NOW), "", Reason::Ok).await;
    check(&node, "valid again", &token(&a, NOW), "", Reason::Ok).await;
    let expired = token_as(&a, &a.kid, NOW - 1000, |c| c.exp = NOW - 600);
    check(&node, "expired", &expired, "", Reason::Expired).await;
    let unknown = token(&stranger, NOW);
    check(&node, "unknown kid", &unknown, "", Reason::UnknownKid).await;

    let after = node.scrape().await;
    for (reason, delta) in [
        ("OK", 2.0),
        ("EXPIRED", 1.0),
        ("UNKNOWN_KID", 1.0),
        ("BAD_SIGNATURE", 0.0),
    ] {
        assert_eq!(
            after.verdicts(reason) - before.verdicts(reason),
            delta,
            "keyfleet_verify_total{{reason={reason:?}}}"
        );
    }
    assert_eq!(
        after.get("keyfleet_unknown_kid_total", &[])
            - before.get("keyfleet_unknown_kid_total", &[]),
        1.0
    );
    assert_eq!(
        after.get("keyfleet_cache_hits_total", &[]) - before.get("keyfleet_cache_hits_total", &[]),
        1.0,
        "the valid token, asked again, is answered from the verified-token cache"
    );
    assert_eq!(after.get("keyfleet_cache_entries", &[]), 1.0);
    assert_eq!(
        after.get("keyfleet_verify_duration_seconds_count", &[])
            - before.get("keyfleet_verify_duration_seconds_count", &[]),
        4.0
    );
    assert_eq!(
        after.get(
            "keyfleet_jwks_fetch_total",
            &[("source", "push"), ("outcome", "ok")]
        ),
        1.0
    );
    node.stop().await;
    authority.stop().await;
}

/// The authority goes away: pulls fail, and the key set ages with the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_key_set_ageing_once_the_authority_is_gone() {
    let authority = FakeAuthority::start(snapshot(1, &[&key(1)])).await;
    let clock = Clock::manual(NOW);
    let node = pulling_node(&authority, &clock).await;
    authority.stop().await;
    eventually("a failed pull", || async {
        node.scrape().await.get(
            "keyfleet_jwks_fetch_total",
            &[("source", "pull"), ("outcome", "error")],
        ) >= 1.0
    })
    .await;
    clock.advance(120);
    let stale = node.scrape().await;
    assert!(
        stale.get("keyfleet_jwks_age_seconds", &[]) >= 120.0,
        "the freshness gauge moves when the authority is gone"
    );
    assert_eq!(stale.get("keyfleet_jwks_version", &[]), 1.0);
    node.stop().await;
}
