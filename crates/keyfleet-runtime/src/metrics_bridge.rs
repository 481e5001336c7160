//! Exports the servers' Prometheus registries over OTLP as well, by reading their text
//! exposition when the periodic reader collects (every `OTEL_METRIC_EXPORT_INTERVAL`), so the
//! hot path keeps one set of counters and pays nothing for OpenTelemetry.
//!
//! Counters become observable counters and gauges (and `info` metrics) observable gauges,
//! under the Prometheus family name, with the sample's labels plus the node's attributes;
//! a histogram is exported as its `_sum` and `_count`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};

/// Renders a registry's text exposition (refreshing any gauge it computes on scrape), or
/// `None` once its server is gone (hold the server weakly).
pub type Render = dyn Fn() -> Option<String> + Send + Sync;

struct Source {
    attributes: Vec<KeyValue>,
    render: Arc<Render>,
}

#[derive(Default)]
struct Bridge {
    sources: Vec<Source>,
    instruments: HashSet<String>,
}

static BRIDGE: Mutex<Option<Bridge>> = Mutex::new(None);

/// Exports the registry that `render` prints, with `attributes` (e.g. `node_id`, `region`)
/// on every point, until `render` returns `None`. Does nothing without OTLP export.
pub fn export(
    attributes: &[(&'static str, &str)],
    render: impl Fn() -> Option<String> + Send + Sync + 'static,
) {
    let Some(provider) = crate::telemetry::meter_provider() else {
        return;
    };
    let Some(text) = render() else {
        return;
    };
    let meter = provider.meter("keyfleet");
    let families = parse(&text);
    let mut bridge = BRIDGE.lock().unwrap_or_else(|e| e.into_inner());
    let bridge = bridge.get_or_insert_with(Bridge::default);
    bridge.sources.push(Source {
        attributes: attributes
            .iter()
            .map(|(k, v)| KeyValue::new(*k, v.to_string()))
            .collect(),
        render: Arc::new(render),
    });
    for family in families {
        for (name, kind) in family.instruments() {
            if bridge.instruments.insert(name.clone()) {
                register(&meter, name, kind, family.help.clone());
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

fn register(meter: &Meter, name: String, kind: Kind, help: String) {
    let sample_name = match kind {
        Kind::Counter if !name.ends_with("_sum") && !name.ends_with("_count") => {
            format!("{name}_total")
        }
        _ => name.clone(),
    };
    let observe = move |record: &mut dyn FnMut(f64, &[KeyValue])| {
        for (text, attributes) in rendered() {
            for sample in parse_samples(&text) {
                if sample.name == sample_name {
                    let mut all = attributes.clone();
                    all.extend(sample.labels.into_iter().map(|(k, v)| KeyValue::new(k, v)));
                    record(sample.value, &all);
                }
            }
        }
    };
    match kind {
        Kind::Counter => {
            let _ = meter
                .f64_observable_counter(name)
                .with_description(help)
                .with_callback(move |o| observe(&mut |v, a| o.observe(v, a)))
                .build();
        }
        Kind::Gauge => {
            let _ = meter
                .f64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |o| observe(&mut |v, a| o.observe(v, a)))
                .build();
        }
    }
}

/// The current exposition of every live source, with its attributes.
fn rendered() -> Vec<(String, Vec<KeyValue>)> {
    let sources: Vec<_> = {
        let bridge = BRIDGE.lock().unwrap_or_else(|e| e.into_inner());
        bridge
            .iter()
            .flat_map(|b| &b.sources)
            .map(|s| (s.render.clone(), s.attributes.clone()))
            .collect()
    };
    let mut gone = false;
    let out = sources
        .into_iter()
        .filter_map(|(render, attributes)| match render() {
            Some(text) => Some((text, attributes)),
            None => {
                gone = true;
                None
            }
        })
        .collect();
    if gone {
        let mut bridge = BRIDGE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = bridge.as_mut() {
            b.sources.retain(|s| s.render.as_ref()().is_some());
        }
    }
    out
}

struct Family {
    name: String,
    kind: String,
    help: String,
}

impl Family {
    fn instruments(&self) -> Vec<(String, Kind)> {
        match self.kind.as_str() {
            "counter" => vec![(self.name.clone(), Kind::Counter)],
            "gauge" => vec![(self.name.clone(), Kind::Gauge)],
            "info" => vec![(format!("{}_info", self.name), Kind::Gauge)],
            "histogram" => vec![
                (format!("{}_sum", self.name), Kind::Counter),
                (format!("{}_count", self.name), Kind::Counter),
            ],
            _ => Vec::new(),
        }
    }
}

fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    let mut help = std::collections::HashMap::new();
    for line in text.lines() {
        let mut words = line.splitn(4, ' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name), rest) => {
                help.insert(name.to_owned(), rest.unwrap_or("").to_owned());
            }
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => families.push(Family {
                name: name.to_owned(),
                kind: kind.to_owned(),
                help: String::new(),
            }),
            _ => {}
        }
    }
    for family in &mut families {
        family.help = help.remove(&family.name).unwrap_or_default();
    }
    families
}

#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Samples of a text exposition (label values unescaped); comments and bad lines skipped.
fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches(',');
            if let Some(after) = body.strip_prefix('}') {
                break after;
            }
            let (key, after) = body.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            body = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposition() {
        let text = "# HELP keyfleet_verify Verify answers by reason.\n\
                    # TYPE keyfleet_verify counter\n\
                    keyfleet_verify_total{reason=\"OK\"} 3\n\
                    keyfleet_verify_total{reason=\"a\\\"b\",x=\"y\"} 1.5\n\
                    # TYPE keyfleet_jwks_age_seconds gauge\n\
                    keyfleet_jwks_age_seconds -1\n\
                    # EOF\n";
        let families = parse(text);
        assert_eq!(families.len(), 2);
        assert_eq!(families[0].help, "Verify answers by reason.");
        assert_eq!(
            families[0].instruments(),
            vec![("keyfleet_verify".to_owned(), Kind::Counter)]
        );
        let samples = parse_samples(text);
        assert_eq!(
            samples,
            vec![
                Sample {
                    name: "keyfleet_verify_total".into(),
                    labels: vec![("reason".into(), "OK".into())],
                    value: 3.0
                },
                Sample {
                    name: "keyfleet_verify_total".into(),
                    labels: vec![("reason".into(), "a\"b".into()), ("x".into(), "y".into())],
                    value: 1.5
                },
                Sample {
                    name: "keyfleet_jwks_age_seconds".into(),
                    labels: vec![],
                    value: -1.0
                },
            ]
        );
    }
}
