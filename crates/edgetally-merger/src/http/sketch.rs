//! The distinct-count and quantile parts of the query answers (the sketches of batch format
//! v2): `distinct` in aggregate, window, series and totals answers, `quantiles` where asked
//! for, and top-k by distinct. Sketches are kept at minute and hour resolution, so each part
//! reports the window it covered (the query's, widened to whole minutes).

use super::*;
use edgetally_core::Sketches;

/// Most quantiles one request may ask for.
pub const MAX_QUANTILES: usize = 32;

impl Params {
    /// `quantiles=0.5,0.9,0.99`: each in [0, 1], at most [`MAX_QUANTILES`]; empty if absent.
    pub(super) fn quantiles(&self) -> Result<Vec<f64>, ApiError> {
        let Some(raw) = self.opt_str("quantiles") else {
            return Ok(Vec::new());
        };
        let qs = raw
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q))
            })
            .collect::<Option<Vec<f64>>>()
            .filter(|qs| !qs.is_empty() && qs.len() <= MAX_QUANTILES)
            .ok_or_else(|| {
                bad(
                    "bad_parameter",
                    format!(
                        "quantiles must be 1-{MAX_QUANTILES} comma-separated numbers in [0, 1]"
                    ),
                )
            })?;
        Ok(qs)
    }
}

/// `distinct`: the estimated number of distinct subjects, its relative standard error and
/// the window the sketches covered; `null` when no record of the answer had a subject.
pub(super) fn distinct_json(k: &Sketches, start: i64, end: i64) -> Value {
    match &k.distinct {
        None => Value::Null,
        Some(h) => json!({
            "estimate": h.estimate().round(),
            "relative_standard_error": h.standard_error(),
            "precision": h.precision(),
            "time_window_start": start,
            "time_window_end": end,
        }),
    }
}

/// `quantiles`: each asked-for quantile's value (within the relative accuracy of the exact
/// quantile of the values counted), the count and out-of-range counts; `null` when the
/// category keeps no quantiles (or nothing was recorded).
pub(super) fn quantiles_json(k: &Sketches, qs: &[f64], start: i64, end: i64) -> Value {
    match &k.quantiles {
        None => Value::Null,
        Some(s) => {
            let (below, above) = s.overflow();
            json!({
                "values": qs
                    .iter()
                    .map(|&q| json!({"q": q, "value": s.quantile(q).map_or(Value::Null, num)}))
                    .collect::<Vec<_>>(),
                "relative_accuracy": f64::from(s.accuracy_bp()) / 10_000.0,
                "count": s.count(),
                "below_range": below,
                "above_range": above,
                "time_window_start": start,
                "time_window_end": end,
            })
        }
    }
}

/// The sketch points of a category (or entity) over one window (`step_ms` 0) or per step,
/// from the whole cluster, and whether every part answered.
pub(super) async fn sketch_points(
    node: &Node,
    category: &str,
    entity: &Option<String>,
    (start, end): (i64, i64),
    step_ms: i64,
) -> (Vec<(i64, i64, Sketches)>, bool) {
    let (answer, complete, _) = node
        .query(Query::Sketches {
            category: category.to_string(),
            entity: entity.clone(),
            start,
            end,
            step_ms,
            max_points: MAX_SERIES_POINTS as u32,
        })
        .await;
    (answer.into_sketches(), complete)
}

/// Adds `distinct` (and `quantiles`, if asked for) of one sketch point to an answer object.
pub(super) fn add_sketch(
    o: &mut Map<String, Value>,
    point: Option<&(i64, i64, Sketches)>,
    qs: &[f64],
) {
    let empty = (0, 0, Sketches::default());
    let (s, e, k) = point.unwrap_or(&empty);
    o.insert("distinct".into(), distinct_json(k, *s, *e));
    if !qs.is_empty() {
        o.insert("quantiles".into(), quantiles_json(k, qs, *s, *e));
    }
}

/// `/v1/topk?rank=distinct`: the `k` entities of a category with the most distinct subjects,
/// descending (ties by name), each with its distinct part.
pub(super) async fn topk_distinct(
    node: &Node,
    category: String,
    (start, end): (i64, i64),
    k: usize,
) -> Map<String, Value> {
    let (answer, complete, groups) = node
        .query(Query::SketchRows {
            category: Some(category.clone()),
            start,
            end,
            group_by: 2,
        })
        .await;
    let (s, e, rows) = answer.into_sketch_rows();
    let mut ranked: Vec<(Option<String>, Sketches, f64)> = rows
        .into_iter()
        .filter_map(|(name, k)| {
            let est = k.distinct.as_ref()?.estimate().round();
            name.is_some().then_some((name, k, est))
        })
        .collect();
    ranked.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(k);
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert("by".into(), json!("entity"));
    o.insert("rank".into(), json!("distinct"));
    o.insert("k".into(), json!(k));
    o.insert("time_window_start".into(), json!(s));
    o.insert("time_window_end".into(), json!(e));
    o.insert(
        "items".into(),
        Value::Array(
            ranked
                .iter()
                .map(|(name, k, _)| json!({"key": name, "distinct": distinct_json(k, s, e)}))
                .collect(),
        ),
    );
    freshness(node, complete, &groups, &mut o);
    o
}
