//! Cumulative per-(route, deployment) series and their Prometheus text exposition (format 0.0.4).
//! Labels stay low-cardinality on purpose: route, deployment and status class only, never run or key.

use super::histogram::{Histogram, BOUNDS};
use super::{Record, ERROR_CLASSES, TOKEN_KINDS};
use hashbrown::{Equivalent, HashMap};
use std::fmt::Write;

/// `(route, deployment)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct SeriesKey {
    route: Box<str>,
    deployment: Box<str>,
}

#[derive(Hash)]
struct SeriesRef<'a> {
    route: &'a str,
    deployment: &'a str,
}

impl Equivalent<SeriesKey> for SeriesRef<'_> {
    fn equivalent(&self, k: &SeriesKey) -> bool {
        self.route == &*k.route && self.deployment == &*k.deployment
    }
}

/// Status classes `0xx`..`9xx` (successes by HTTP status) followed by the error classes.
const STATUS_SLOTS: usize = 10 + ERROR_CLASSES.len();

#[derive(Debug, Clone, Default)]
pub(super) struct Series {
    status: [u64; STATUS_SLOTS],
    tokens: [[u64; 2]; 5],
    cost_usd: f64,
    cost_unknown: u64,
    ttft: Histogram,
    ttft_sum: f64,
    duration: Histogram,
    duration_sum: f64,
}

pub(super) fn observe(
    series: &mut HashMap<SeriesKey, Series>,
    r: &Record<'_>,
    error: Option<usize>,
) {
    let key = SeriesRef {
        route: r.route,
        deployment: r.deployment,
    };
    let s = match series.get_mut(&key) {
        Some(s) => s,
        None => series
            .entry(SeriesKey {
                route: r.route.into(),
                deployment: r.deployment.into(),
            })
            .or_default(),
    };
    let slot = match error {
        Some(i) => 10 + i,
        None => usize::from(r.status / 100).min(9),
    };
    s.status[slot] += 1;
    for (kind, (&n, &est)) in r.tokens.iter().zip(r.estimated.iter()).enumerate() {
        s.tokens[kind][usize::from(est)] += n;
    }
    match r.cost_usd.filter(|c| c.is_finite()) {
        Some(c) => s.cost_usd += c,
        None => s.cost_unknown += 1,
    }
    if let Some(t) = r.ttft_s.filter(|t| t.is_finite() && *t >= 0.0) {
        s.ttft.observe(t);
        s.ttft_sum += t;
    }
    let d = if r.duration_s.is_finite() && r.duration_s >= 0.0 {
        r.duration_s
    } else {
        0.0
    };
    s.duration.observe(d);
    s.duration_sum += d;
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
}

fn labels(key: &SeriesKey) -> String {
    let mut out = String::from("route=\"");
    escape(&key.route, &mut out);
    out.push_str("\",deployment=\"");
    escape(&key.deployment, &mut out);
    out.push('"');
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exported `le` bounds: 1, 2.5 and 5 per decade (a subset of the stored R10 bounds, so exact).
fn exported_bounds() -> impl Iterator<Item = usize> {
    BOUNDS.iter().enumerate().filter_map(|(i, b)| {
        let mantissa = b / 10f64.powf(b.log10().floor());
        [1.0, 2.5, 5.0]
            .iter()
            .any(|m| (mantissa - m).abs() < 1e-9)
            .then_some(i)
    })
}

fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    rows: &[(&SeriesKey, String, &Histogram, f64)],
) {
    header(out, name, "histogram", help);
    let bounds: Vec<usize> = exported_bounds().collect();
    for (_, labels, hist, sum) in rows {
        for &i in &bounds {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {}",
                BOUNDS[i],
                hist.cumulative(i)
            );
        }
        let count = hist.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

pub(super) fn render(series: &HashMap<SeriesKey, Series>) -> String {
    let mut keys: Vec<(&SeriesKey, &Series)> = series.iter().collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let labelled: Vec<(&SeriesKey, String, &Series)> =
        keys.into_iter().map(|(k, s)| (k, labels(k), s)).collect();
    let mut out = String::with_capacity(1024 + labelled.len() * 4096);

    let name = "tokenrelay_requests_total";
    header(
        &mut out,
        name,
        "counter",
        "Requests finished, by HTTP status class (success) or error class.",
    );
    for (_, l, s) in &labelled {
        for (slot, &n) in s.status.iter().enumerate().filter(|(_, n)| **n > 0) {
            let _ = if slot < 10 {
                writeln!(out, "{name}{{{l},status_class=\"{slot}xx\"}} {n}")
            } else {
                writeln!(
                    out,
                    "{name}{{{l},status_class=\"{}\"}} {n}",
                    ERROR_CLASSES[slot - 10]
                )
            };
        }
    }

    let name = "tokenrelay_tokens_total";
    header(
        &mut out,
        name,
        "counter",
        "Tokens metered, as reported by the provider or estimated locally.",
    );
    for (_, l, s) in &labelled {
        for (kind, counts) in TOKEN_KINDS.iter().zip(s.tokens.iter()) {
            for (source, n) in ["reported", "estimated"].iter().zip(counts.iter()) {
                let _ = writeln!(
                    out,
                    "{name}{{{l},direction=\"{kind}\",source=\"{source}\"}} {n}"
                );
            }
        }
    }

    let name = "tokenrelay_cost_usd_total";
    header(
        &mut out,
        name,
        "counter",
        "Cost in US dollars of requests with a known price.",
    );
    for (_, l, s) in &labelled {
        let _ = writeln!(out, "{name}{{{l}}} {}", s.cost_usd);
    }

    let name = "tokenrelay_cost_unknown_requests_total";
    header(
        &mut out,
        name,
        "counter",
        "Requests whose cost is unknown (no price for the model).",
    );
    for (_, l, s) in &labelled {
        let _ = writeln!(out, "{name}{{{l}}} {}", s.cost_unknown);
    }

    let ttft: Vec<_> = labelled
        .iter()
        .map(|(k, l, s)| (*k, l.clone(), &s.ttft, s.ttft_sum))
        .collect();
    histogram(
        &mut out,
        "tokenrelay_time_to_first_token_seconds",
        "Time from request start to the first token sent to the client.",
        &ttft,
    );
    let duration: Vec<_> = labelled
        .iter()
        .map(|(k, l, s)| (*k, l.clone(), &s.duration, s.duration_sum))
        .collect();
    histogram(
        &mut out,
        "tokenrelay_request_duration_seconds",
        "Time from request start to its end (success, error or disconnect).",
        &duration,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Meters, Record};
    use std::collections::BTreeMap;

    /// A small exposition-format checker: every sample line parses, belongs to a declared family,
    /// label values are well-escaped, histogram buckets are cumulative and end in `+Inf` == `_count`.
    fn check(text: &str) -> BTreeMap<String, f64> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "histogram", "gauge"].contains(&kind));
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "duplicate TYPE {name}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "stray line {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let name = series.split('{').next().unwrap();
            assert!(name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample {name} before its TYPE");
            if let Some(body) = series.strip_prefix(name) {
                if !body.is_empty() {
                    let inner = body
                        .strip_prefix('{')
                        .and_then(|b| b.strip_suffix('}'))
                        .unwrap();
                    // Walk label pairs honouring escapes.
                    let mut chars = inner.chars().peekable();
                    while chars.peek().is_some() {
                        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                        assert!(
                            key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                            "{key}"
                        );
                        assert_eq!(chars.next(), Some('"'));
                        loop {
                            match chars.next().unwrap() {
                                '\\' => assert!(matches!(chars.next(), Some('\\' | '"' | 'n'))),
                                '"' => break,
                                '\n' => panic!("raw newline"),
                                _ => {}
                            }
                        }
                        if let Some(c) = chars.next() {
                            assert_eq!(c, ',');
                        }
                    }
                }
            }
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "duplicate sample {series}"
            );
        }
        samples
    }

    #[test]
    fn exposition_parses_and_histograms_are_cumulative() {
        let m = Meters::new();
        let weird = "we\"ird\\route\nx";
        for (i, route) in ["chat", weird, "chat"].iter().enumerate() {
            m.record(&Record {
                ts: 1.0,
                route,
                deployment: "openai-1",
                status: 200,
                tokens: [10, 5, 0, 0, 0],
                estimated: [false, i == 1, false, false, false],
                cost_usd: if i == 2 { None } else { Some(0.5) },
                ttft_s: Some(0.1 * (i + 1) as f64),
                duration_s: 2.0 * (i + 1) as f64,
                ..Record::default()
            })
            .unwrap();
        }
        m.record(&Record {
            route: "chat",
            deployment: "openai-1",
            status: 429,
            error_class: "rate_limited",
            duration_s: 0.01,
            ..Record::default()
        })
        .unwrap();
        let text = m.prometheus();
        let s = check(&text);
        let l = "route=\"chat\",deployment=\"openai-1\"";
        assert_eq!(
            s[&format!("tokenrelay_requests_total{{{l},status_class=\"2xx\"}}")],
            2.0
        );
        assert_eq!(
            s[&format!("tokenrelay_requests_total{{{l},status_class=\"rate_limited\"}}")],
            1.0
        );
        assert_eq!(
            s[&format!("tokenrelay_tokens_total{{{l},direction=\"input\",source=\"reported\"}}")],
            20.0
        );
        assert_eq!(s[&format!("tokenrelay_cost_usd_total{{{l}}}")], 0.5);
        assert_eq!(
            s[&format!("tokenrelay_cost_unknown_requests_total{{{l}}}")],
            2.0
        );
        assert!(text.contains("route=\"we\\\"ird\\\\route\\nx\""));
        let d = "tokenrelay_request_duration_seconds";
        assert_eq!(s[&format!("{d}_count{{{l}}}")], 3.0);
        assert_eq!(s[&format!("{d}_bucket{{{l},le=\"+Inf\"}}")], 3.0);
        assert_eq!(s[&format!("{d}_bucket{{{l},le=\"0.01\"}}")], 1.0);
        assert_eq!(s[&format!("{d}_bucket{{{l},le=\"5\"}}")], 2.0);
        assert!((s[&format!("{d}_sum{{{l}}}")] - 8.01).abs() < 1e-9);
        // Cumulative: bucket counts never decrease with le.
        let buckets: Vec<f64> = text
            .lines()
            .filter(|x| x.starts_with(&format!("{d}_bucket{{{l}")))
            .map(|x| x.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), 19);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        // Never run or key labels.
        assert!(!text.contains("run=") && !text.contains("key"));
    }

    #[test]
    fn empty_meters_render_headers_only() {
        let text = Meters::new().prometheus();
        assert!(check(&text).is_empty());
        assert!(text.contains("# TYPE tokenrelay_time_to_first_token_seconds histogram\n"));
    }
}
