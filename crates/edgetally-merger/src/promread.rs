//! Prometheus remote read (`POST /api/v1/read`): a Prometheus server configured with
//! `remote_read` runs PromQL over edgetally's event-time series, and Grafana's stock
//! Prometheus data source charts them through it.
//!
//! The series, one per (metric, category[, entity]):
//! - `edgetally_count`, `edgetally_sum`, `edgetally_min`, `edgetally_max`, with the labels
//!   `category` and, for one entity's series, `entity`;
//! - one sample per step at the step's start, holding the aggregate of `[t, t + step)` — the
//!   points `/v1/series` answers for the same start and step. The step is the query's
//!   (`hints.step_ms`), at least 1 s, coarsened so a series has at most
//!   [`MAX_SAMPLES`] samples. A step with no records has count and sum 0 and, for min and
//!   max, a staleness marker (so PromQL does not carry the previous step's value over);
//! - without an `entity` matcher (or with one that matches the empty value) a category's
//!   total series; a matcher that excludes the empty value (`entity=~".+"`, `entity="d1"`)
//!   selects per-entity series instead, at most [`MAX_ENTITIES`] per category (the most
//!   counted first) — so `sum(edgetally_count{category="x"})` never adds a category's total
//!   to its entities.
//!
//! - `edgetally_distinct` (the estimated distinct subjects of the step) and
//!   `edgetally_quantile` with a `quantile` label of `0.5`, `0.9` or `0.99`, from the
//!   sketches (docs/PROTOCOL.md §10), with the same `category`/`entity` labels; sketches are
//!   kept per minute, so their step is the query's rounded up to whole minutes. A step
//!   without a sketch holds a staleness marker.
//!
//! Only series with records in the queried range are returned. The wire format is
//! Prometheus' `prompb` (snappy-compressed protobuf, the `SAMPLES` response type), written
//! with prost and snap.

use crate::node::Node;
use crate::scatter::Query;
use edgetally_core::Total;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most samples in one series (the step grows to keep under it).
pub const MAX_SAMPLES: i64 = 11_000;
/// Most per-entity series per category and query.
pub const MAX_ENTITIES: usize = 1000;
/// Most samples one request's response may hold, over all its series (a request past it is
/// refused before any series is read: 2 M samples are about 32 MB in memory).
pub const MAX_RESPONSE_SAMPLES: usize = 2_000_000;
/// Most queries in one request.
const MAX_QUERIES: usize = 16;
/// Most label matchers in one request, over all its queries (Prometheus sends a handful).
pub const MAX_MATCHERS: usize = 64;
/// Longest matcher value, in bytes (a regex is compiled from it).
pub const MAX_MATCHER_BYTES: usize = 1024;
/// Compiled regexes kept for reuse: a dashboard's refreshes send the same few again and again.
const REGEX_CACHE: usize = 256;
/// Largest request, decompressed.
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Prometheus' staleness marker: a NaN with this exact bit pattern.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;
/// The metric names, in the order of [`values`].
pub const METRICS: [&str; 4] = [
    "edgetally_count",
    "edgetally_sum",
    "edgetally_min",
    "edgetally_max",
];

/// The quantile series of `edgetally_quantile`: (the `quantile` label, q).
pub const QUANTILES: [(&str, f64); 3] = [("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99)];

/// A series read from the sketches.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SketchSeries {
    /// `edgetally_distinct`.
    Distinct,
    /// `edgetally_quantile{quantile=…}`: index into [`QUANTILES`].
    Quantile(usize),
}

impl SketchSeries {
    fn all() -> impl Iterator<Item = SketchSeries> {
        std::iter::once(SketchSeries::Distinct)
            .chain((0..QUANTILES.len()).map(SketchSeries::Quantile))
    }

    fn name(self) -> &'static str {
        match self {
            SketchSeries::Distinct => "edgetally_distinct",
            SketchSeries::Quantile(_) => "edgetally_quantile",
        }
    }

    /// The `quantile` label's value ("" when the series has none).
    fn quantile_label(self) -> &'static str {
        match self {
            SketchSeries::Distinct => "",
            SketchSeries::Quantile(i) => QUANTILES[i].0,
        }
    }

    fn value(self, k: &edgetally_core::Sketches) -> Option<f64> {
        match self {
            SketchSeries::Distinct => k.distinct.as_ref().map(|h| h.estimate().round()),
            SketchSeries::Quantile(i) => k.quantiles.as_ref()?.quantile(QUANTILES[i].1),
        }
    }
}

/// The step of a sketch series: the query's, rounded up to whole minutes.
fn sketch_step(step: i64) -> i64 {
    (step.max(1).saturating_add(59_999) / 60_000).saturating_mul(60_000)
}

/// `prompb.ReadRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadRequest {
    /// The queries.
    #[prost(message, repeated, tag = "1")]
    pub queries: Vec<PromQuery>,
    /// Response types the client accepts: 0 `SAMPLES`, 1 `STREAMED_XOR_CHUNKS`.
    #[prost(int32, repeated, tag = "2")]
    pub accepted_response_types: Vec<i32>,
}

/// `prompb.Query`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PromQuery {
    /// Range start, ms (inclusive).
    #[prost(int64, tag = "1")]
    pub start_timestamp_ms: i64,
    /// Range end, ms (inclusive).
    #[prost(int64, tag = "2")]
    pub end_timestamp_ms: i64,
    /// Label matchers, all of which a series must satisfy.
    #[prost(message, repeated, tag = "3")]
    pub matchers: Vec<LabelMatcher>,
    /// What the query evaluates (its step).
    #[prost(message, optional, tag = "4")]
    pub hints: Option<ReadHints>,
}

/// `prompb.LabelMatcher`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelMatcher {
    /// 0 `=`, 1 `!=`, 2 `=~`, 3 `!~`.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    /// Label name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Value or (anchored RE2) regular expression.
    #[prost(string, tag = "3")]
    pub value: String,
}

/// `prompb.ReadHints` (the fields used here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadHints {
    /// The query's step, ms.
    #[prost(int64, tag = "1")]
    pub step_ms: i64,
    /// The function applied, if any.
    #[prost(string, tag = "2")]
    pub func: String,
    /// Selection start, ms.
    #[prost(int64, tag = "3")]
    pub start_ms: i64,
    /// Selection end, ms.
    #[prost(int64, tag = "4")]
    pub end_ms: i64,
}

/// `prompb.ReadResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadResponse {
    /// One result per query, in order.
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<QueryResult>,
}

/// `prompb.QueryResult`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueryResult {
    /// The series.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prompb.TimeSeries`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Labels, sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Samples, by time.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prompb.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prompb.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Time, ms.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Why a read request was refused (HTTP 400), with a reason code.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRead(pub &'static str, pub String);

/// A label matcher, compiled.
struct Matcher {
    kind: i32,
    name: String,
    value: String,
    re: Option<Arc<regex::Regex>>,
}

/// The anchored regex of a matcher value, from the cache or compiled (bounded in size) and
/// kept. Compiling is CPU work of up to milliseconds: callers run on the blocking pool.
fn compiled(value: &str) -> Result<Arc<regex::Regex>, BadRead> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<String, Arc<regex::Regex>>>> =
        std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(re) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(value) {
        return Ok(re.clone());
    }
    let re = Arc::new(
        regex::RegexBuilder::new(&format!("^(?:{value})$"))
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
            .map_err(|e| BadRead("bad_matcher", format!("{value:?}: {e}")))?,
    );
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= REGEX_CACHE {
        // A full cache starts over: the set a client sends repeatedly is back within a
        // round, and an attacker's stream of new patterns cannot make it grow.
        c.clear();
    }
    c.insert(value.to_string(), re.clone());
    Ok(re)
}

impl Matcher {
    fn new(m: &LabelMatcher) -> Result<Matcher, BadRead> {
        let re = match m.r#type {
            0 | 1 => None,
            2 | 3 => Some(compiled(&m.value)?),
            t => return Err(BadRead("bad_matcher", format!("unknown matcher type {t}"))),
        };
        Ok(Matcher {
            kind: m.r#type,
            name: m.name.clone(),
            value: m.value.clone(),
            re,
        })
    }

    /// Whether a label value (`""` for an absent label) satisfies the matcher.
    fn matches(&self, v: &str) -> bool {
        match (&self.re, self.kind) {
            (Some(re), 2) => re.is_match(v),
            (Some(re), _) => !re.is_match(v),
            (None, 0) => v == self.value,
            (None, _) => v != self.value,
        }
    }
}

/// Decodes a request body (snappy block, then protobuf), bounded.
pub fn decode_request(body: &[u8]) -> Result<ReadRequest, BadRead> {
    let len = snap::raw::decompress_len(body)
        .map_err(|e| BadRead("malformed", format!("not snappy: {e}")))?;
    if len > MAX_REQUEST_BYTES {
        return Err(BadRead(
            "too_large",
            format!("{len} bytes decompressed; at most {MAX_REQUEST_BYTES}"),
        ));
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| BadRead("malformed", format!("not snappy: {e}")))?;
    let req = <ReadRequest as prost::Message>::decode(raw.as_slice())
        .map_err(|e| BadRead("malformed", format!("not a ReadRequest: {e}")))?;
    if req.queries.len() > MAX_QUERIES {
        return Err(BadRead(
            "too_many_queries",
            format!("{} queries; at most {MAX_QUERIES}", req.queries.len()),
        ));
    }
    let matchers: usize = req.queries.iter().map(|q| q.matchers.len()).sum();
    if matchers > MAX_MATCHERS {
        return Err(BadRead(
            "too_many_matchers",
            format!("{matchers} label matchers; at most {MAX_MATCHERS} per request"),
        ));
    }
    if let Some(m) = req
        .queries
        .iter()
        .flat_map(|q| &q.matchers)
        .find(|m| m.value.len() > MAX_MATCHER_BYTES)
    {
        return Err(BadRead(
            "matcher_too_long",
            format!(
                "a matcher on {:?} is {} bytes; at most {MAX_MATCHER_BYTES}",
                m.name,
                m.value.len()
            ),
        ));
    }
    if !req.accepted_response_types.is_empty() && !req.accepted_response_types.contains(&0) {
        return Err(BadRead(
            "unsupported_response_type",
            "only the SAMPLES response type is served".into(),
        ));
    }
    Ok(req)
}

/// Encodes a request as a client sends it (protobuf, then a snappy block).
pub fn encode_request(r: &ReadRequest) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(&prost::Message::encode_to_vec(r))
        .unwrap_or_default()
}

/// Encodes a response (protobuf, then a snappy block).
pub fn encode_response(r: &ReadResponse) -> Vec<u8> {
    let raw = prost::Message::encode_to_vec(r);
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .unwrap_or_default()
}

/// The step for a query: its hint (at least 1 s, whole seconds), coarsened to stay under
/// [`MAX_SAMPLES`].
pub fn step_for(start: i64, end: i64, hint_ms: i64) -> i64 {
    let whole = |ms: i64| (ms.saturating_add(999) / 1000).saturating_mul(1000);
    let mut step = whole(hint_ms.max(1000));
    let span = end.saturating_sub(start).max(0);
    if span / step >= MAX_SAMPLES {
        step = whole(span / MAX_SAMPLES + 1);
    }
    step
}

/// Refuses a response of `series` series × `names` metrics × the steps of `[start, end)`
/// whose running total `so_far + that` would pass [`MAX_RESPONSE_SAMPLES`]; else the new total.
pub fn within_budget(
    so_far: usize,
    series: usize,
    names: usize,
    start: i64,
    end: i64,
    step: i64,
) -> Result<usize, BadRead> {
    let steps = usize::try_from(end.saturating_sub(start) / step.max(1) + 2).unwrap_or(usize::MAX);
    let total = series
        .saturating_mul(names)
        .saturating_mul(steps)
        .saturating_add(so_far);
    if total > MAX_RESPONSE_SAMPLES {
        return Err(BadRead(
            "too_many_samples",
            format!(
                "the response would hold about {total} samples; at most {MAX_RESPONSE_SAMPLES}: \
                 narrow the matchers, the range or raise the step"
            ),
        ));
    }
    Ok(total)
}

/// The four values of a step's total, in [`METRICS`] order (`None`: no record, so a
/// staleness marker for min and max).
fn values(t: &Total) -> [Option<f64>; 4] {
    let empty = t.count == 0;
    [
        Some(t.count as f64),
        Some(t.sum.to_f64()),
        (!empty).then_some(t.min),
        (!empty).then_some(t.max),
    ]
}

/// Answers one query.
// Long by design: one remote-read query: its matchers, the plan, then one series per (category,
// entity, statistic), nested as the prompb types are.
async fn answer(
    node: &Node,
    q: &PromQuery,
    matchers: Arc<[Matcher]>,
    used: &mut usize,
) -> Result<QueryResult, BadRead> {
    fn on<'a>(ms: &'a [Matcher], label: &'a str) -> impl Iterator<Item = &'a Matcher> {
        ms.iter().filter(move |m| m.name == label)
    }
    let on = |label: &'static str| on(&matchers, label);
    // Any other label is absent from every series: its matchers must accept "".
    let labels = ["__name__", "category", "entity", "quantile"];
    if matchers
        .iter()
        .any(|m| !labels.contains(&m.name.as_str()) && !m.matches(""))
    {
        return Ok(QueryResult::default());
    }
    let no_quantile = on("quantile").all(|m| m.matches(""));
    let names: Vec<usize> = (0..METRICS.len())
        .filter(|&i| no_quantile && on("__name__").all(|m| m.matches(METRICS[i])))
        .collect();
    let sketched: Vec<SketchSeries> = SketchSeries::all()
        .filter(|s| {
            on("__name__").all(|m| m.matches(s.name()))
                && on("quantile").all(|m| m.matches(s.quantile_label()))
        })
        .collect();
    if names.is_empty() && sketched.is_empty() {
        return Ok(QueryResult::default());
    }
    // Prometheus' range is inclusive at both ends; ours is [start, end).
    let (start, end) = (q.start_timestamp_ms, q.end_timestamp_ms.saturating_add(1));
    if end <= start {
        return Ok(QueryResult::default());
    }
    let hint = q.hints.as_ref().map_or(0, |h| h.step_ms);
    let step = step_for(start, end, hint);
    // The categories with records in the range that the category matchers accept.
    let (answer, _, _) = node
        .query(Query::Totals {
            start,
            end,
            group_by: 1,
        })
        .await;
    let rows = answer.into_rows().rows;
    let ms = matchers.clone();
    let categories: Vec<String> = blocking(move || {
        rows.into_iter()
            .filter(|(_, t)| t.count > 0)
            .filter_map(|(name, _)| name)
            .filter(|c| {
                ms.iter()
                    .filter(|m| m.name == "category")
                    .all(|m| m.matches(c))
            })
            .collect()
    })
    .await?;
    let totals_only = on("entity").all(|m| m.matches(""));
    let mut budget = *used;
    let mut out = Vec::new();
    for category in categories {
        let entities: Vec<Option<String>> = if totals_only {
            vec![None]
        } else {
            let (answer, _, _) = node
                .query(Query::TopK {
                    category: category.clone(),
                    start,
                    end,
                    by_producer: false,
                })
                .await;
            let mut rows = answer.into_rows();
            let ms = matchers.clone();
            blocking(move || {
                rows.rows.retain(|(name, t)| {
                    t.count > 0
                        && name.as_deref().is_some_and(|e| {
                            ms.iter()
                                .filter(|m| m.name == "entity")
                                .all(|m| m.matches(e))
                        })
                });
                rows.rank(MAX_ENTITIES);
                rows.rows.into_iter().map(|(name, _)| name).collect()
            })
            .await?
        };
        budget = within_budget(budget, entities.len(), names.len(), start, end, step)?;
        let s_step = sketch_step(step);
        budget = within_budget(budget, entities.len(), sketched.len(), start, end, s_step)?;
        for entity in entities {
            if !sketched.is_empty() {
                out.extend(
                    sketch_series(node, &category, &entity, (start, end), s_step, &sketched).await,
                );
            }
            if names.is_empty() {
                continue;
            }
            let (answer, _, _) = node
                .query(Query::Series {
                    category: category.clone(),
                    entity: entity.clone(),
                    start,
                    end,
                    step_ms: step,
                    max_points: MAX_SAMPLES as u32,
                })
                .await;
            let points = answer.into_points();
            for &i in &names {
                let labels = series_labels(METRICS[i], &category, &entity);
                let samples = points
                    .iter()
                    .map(|(t, _, total)| Sample {
                        value: values(total)[i].unwrap_or(f64::from_bits(STALE_NAN)),
                        timestamp: *t,
                    })
                    .collect();
                out.push(TimeSeries { labels, samples });
            }
        }
    }
    out.sort_by(|a, b| {
        let key = |s: &TimeSeries| {
            s.labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect::<Vec<_>>()
        };
        key(a).cmp(&key(b))
    });
    *used = budget;
    Ok(QueryResult { timeseries: out })
}

/// A series' labels: its metric name, category and entity (if any).
fn series_labels(name: &str, category: &str, entity: &Option<String>) -> Vec<Label> {
    let mut labels = vec![
        Label {
            name: "__name__".into(),
            value: name.into(),
        },
        Label {
            name: "category".into(),
            value: category.into(),
        },
    ];
    if let Some(e) = entity {
        labels.push(Label {
            name: "entity".into(),
            value: e.clone(),
        });
    }
    labels
}

/// The sketch series of one category (or entity): one sample per step of `step` (whole
/// minutes) from the sketches of `[start, end)`.
async fn sketch_series(
    node: &Node,
    category: &str,
    entity: &Option<String>,
    (start, end): (i64, i64),
    step: i64,
    sketched: &[SketchSeries],
) -> Vec<TimeSeries> {
    let (answer, _, _) = node
        .query(Query::Sketches {
            category: category.to_string(),
            entity: entity.clone(),
            start,
            end,
            step_ms: step,
            max_points: MAX_SAMPLES as u32,
        })
        .await;
    let points = answer.into_sketches();
    sketched
        .iter()
        .map(|&s| {
            let mut labels = series_labels(s.name(), category, entity);
            if let SketchSeries::Quantile(_) = s {
                labels.push(Label {
                    name: "quantile".into(),
                    value: s.quantile_label().into(),
                });
            }
            let samples = points
                .iter()
                .map(|(t, _, k)| Sample {
                    value: s.value(k).unwrap_or(f64::from_bits(STALE_NAN)),
                    timestamp: *t,
                })
                .collect();
            TimeSeries { labels, samples }
        })
        // Only series with data in the range (a category without sketches has none).
        .filter(|ts| ts.samples.iter().any(|x| x.value.to_bits() != STALE_NAN))
        .collect()
}

/// Runs CPU work of a read (regex compiling and matching) on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, BadRead> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BadRead("internal", format!("read task failed: {e}")))
}

/// Answers a remote-read request body with a response body.
pub async fn read(node: &Node, body: &[u8]) -> Result<Vec<u8>, BadRead> {
    let req = decode_request(body)?;
    // Regexes are compiled (or taken from the cache) on the blocking pool: a request full
    // of costly patterns must not hold an async worker, which ingest shares.
    let queries = req.queries.clone();
    let compiled: Vec<Arc<[Matcher]>> = blocking(move || {
        queries
            .iter()
            .map(|q| {
                q.matchers
                    .iter()
                    .map(Matcher::new)
                    .collect::<Result<Arc<[Matcher]>, _>>()
            })
            .collect::<Result<_, _>>()
    })
    .await??;
    let mut results = Vec::with_capacity(req.queries.len());
    let mut samples = 0;
    for (q, matchers) in req.queries.iter().zip(compiled) {
        results.push(answer(node, q, matchers, &mut samples).await?);
    }
    Ok(encode_response(&ReadResponse { results }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_whole_seconds_and_bounded() {
        assert_eq!(step_for(0, 60_000, 0), 1000);
        assert_eq!(step_for(0, 60_000, 15_000), 15_000);
        assert_eq!(step_for(0, 60_000, 1500), 2000);
        let day = 86_400_000;
        let s = step_for(0, 30 * day, 1000);
        assert!(30 * day / s < MAX_SAMPLES && s % 1000 == 0, "{s}");
    }

    #[test]
    fn responses_are_bounded_across_series_and_queries() {
        let day = 86_400_000;
        // One category's four metrics over a day at 1 min: well inside.
        let one = within_budget(0, 1, 4, 0, day, 60_000).expect("small");
        assert_eq!(one, 4 * (1440 + 2));
        // 1,000 entities × 4 metrics × 11,000 steps: refused before anything is read.
        let step = step_for(0, 400 * day, 1000);
        let err = within_budget(0, MAX_ENTITIES, 4, 0, 400 * day, step).expect_err("large");
        assert_eq!(err.0, "too_many_samples");
        // The running total carries over from earlier categories and queries.
        assert!(within_budget(MAX_RESPONSE_SAMPLES - one + 1, 1, 4, 0, day, 60_000).is_err());
        assert!(within_budget(MAX_RESPONSE_SAMPLES - one, 1, 4, 0, day, 60_000).is_ok());
    }

    #[test]
    fn matchers_follow_prometheus() {
        let m = |t, v: &str| {
            Matcher::new(&LabelMatcher {
                r#type: t,
                name: "x".into(),
                value: v.into(),
            })
            .expect("matcher")
        };
        assert!(m(0, "a").matches("a") && !m(0, "a").matches("ab"));
        assert!(m(1, "a").matches("") && !m(1, "a").matches("a"));
        // Regexes are anchored at both ends.
        assert!(m(2, "a.*").matches("abc") && !m(2, "b").matches("abc"));
        assert!(m(2, ".*").matches("") && !m(2, ".+").matches(""));
        assert!(m(3, "a|b").matches("c") && !m(3, "a|b").matches("a"));
        assert!(Matcher::new(&LabelMatcher {
            r#type: 2,
            name: "x".into(),
            value: "(".into()
        })
        .is_err());
    }

    #[test]
    fn requests_are_bounded_and_checked() {
        let body = encode_request;
        let q = PromQuery {
            start_timestamp_ms: 0,
            end_timestamp_ms: 1,
            matchers: vec![],
            hints: None,
        };
        let ok = ReadRequest {
            queries: vec![q.clone()],
            accepted_response_types: vec![],
        };
        assert_eq!(decode_request(&body(&ok)), Ok(ok));
        let many = ReadRequest {
            queries: vec![q.clone(); MAX_QUERIES + 1],
            accepted_response_types: vec![],
        };
        assert_eq!(
            decode_request(&body(&many)).map_err(|e| e.0),
            Err("too_many_queries")
        );
        let chunks = ReadRequest {
            queries: vec![q],
            accepted_response_types: vec![1],
        };
        assert_eq!(
            decode_request(&body(&chunks)).map_err(|e| e.0),
            Err("unsupported_response_type")
        );
        assert_eq!(
            decode_request(b"\xff\xff\xff").map_err(|e| e.0),
            Err("malformed")
        );
        // A small body that claims a huge decompressed size is refused before decompressing.
        let mut bomb = Vec::new();
        let mut n = 1u64 << 31;
        while n >= 0x80 {
            bomb.push((n as u8) | 0x80);
            n >>= 7;
        }
        bomb.push(n as u8);
        assert_eq!(decode_request(&bomb).map_err(|e| e.0), Err("too_large"));
    }

    /// Issue 28, finding 7: a request full of costly regex matchers is refused by count and
    /// size before anything is compiled, and a pattern sent again is compiled once.
    #[test]
    fn matchers_are_bounded_in_count_and_size_and_compiled_once() {
        let body = encode_request;
        let m = |v: &str| LabelMatcher {
            r#type: 2,
            name: "category".into(),
            value: v.into(),
        };
        let q = |ms: Vec<LabelMatcher>| PromQuery {
            start_timestamp_ms: 0,
            end_timestamp_ms: 1,
            matchers: ms,
            hints: None,
        };
        let req = |qs: Vec<PromQuery>| ReadRequest {
            queries: qs,
            accepted_response_types: vec![],
        };
        // Spread over queries, the count is the request's.
        let at_cap = req(vec![q(vec![m("a"); MAX_MATCHERS / 2]); 2]);
        assert!(decode_request(&body(&at_cap)).is_ok());
        let over = req(vec![q(vec![m("a"); MAX_MATCHERS / 2 + 1]); 2]);
        assert_eq!(
            decode_request(&body(&over)).map_err(|e| e.0),
            Err("too_many_matchers")
        );
        let long = req(vec![q(vec![m(&r"\w".repeat(MAX_MATCHER_BYTES / 2 + 1))])]);
        assert_eq!(
            decode_request(&body(&long)).map_err(|e| e.0),
            Err("matcher_too_long")
        );
        // One compile per pattern: the same Arc comes back.
        let a = compiled(r"cpu|mem\w{15}").expect("compiles");
        let b = compiled(r"cpu|mem\w{15}").expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        // A pattern too large to compile within the size limits is refused, not built.
        assert_eq!(
            compiled(&r"\w{15}".repeat(120))
                .map(|_| ())
                .map_err(|e| e.0),
            Err("bad_matcher")
        );
    }
}
