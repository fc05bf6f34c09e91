//! The query endpoints: aggregate, window, top-k, totals and series, with how fresh and
//! complete each answer is.

use super::*;

pub(super) fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// count, sum, sum_exact, avg, min, max of a total (null where count is 0).
pub(super) fn stats(t: &Total, obj: &mut Map<String, Value>) {
    let empty = t.count == 0;
    let sum = t.sum.to_f64();
    obj.insert("count".into(), json!(t.count));
    obj.insert("sum".into(), num(sum));
    obj.insert("sum_exact".into(), json!(t.sum.to_decimal()));
    obj.insert(
        "avg".into(),
        if empty {
            Value::Null
        } else {
            num(sum / t.count as f64)
        },
    );
    obj.insert("min".into(), if empty { Value::Null } else { num(t.min) });
    obj.insert("max".into(), if empty { Value::Null } else { num(t.max) });
}

/// `{"key", count, sum, …}` for each (group name, totals) row.
pub(super) fn rows_json(rows: &Rows) -> Value {
    Value::Array(
        rows.rows
            .iter()
            .map(|(name, t)| {
                let mut o = Map::new();
                o.insert("key".into(), json!(name));
                stats(t, &mut o);
                Value::Object(o)
            })
            .collect(),
    )
}

/// How fresh and complete an answer is: when it was computed, and whether it holds every
/// batch the cluster has, as far as this node can tell — this node sees all its peers and,
/// with shard groups, every group answered in time from a node that sees all of its own
/// (`shard_groups` lists each group's part). An incomplete answer may lack batches held only
/// elsewhere; it never counts one twice.
pub(super) fn freshness(
    node: &Node,
    complete: bool,
    groups: &[crate::cluster::GroupAnswer],
    obj: &mut Map<String, Value>,
) {
    obj.insert("as_of_ms".into(), json!(now_ms()));
    obj.insert("complete".into(), json!(complete));
    if node.cluster.is_some() {
        obj.insert(
            "shard_groups".into(),
            Value::Array(
                groups
                    .iter()
                    .map(|g| {
                        json!({
                            "name": g.name,
                            "answered": g.answered,
                            "complete": g.complete,
                            "as_of_ms": g.as_of_ms,
                            "absorbed_by": g.absorbed_by,
                            "error": g.error,
                        })
                    })
                    .collect(),
            ),
        );
    }
}

pub(super) async fn aggregate_json(
    node: &Node,
    category: String,
    entity: Option<String>,
    (start, end): (i64, i64),
    qs: &[f64],
) -> Map<String, Value> {
    let ((answer, complete, groups), (sketches, sketches_complete)) = tokio::join!(
        node.query(Query::Aggregate {
            category: category.clone(),
            entity: entity.clone(),
            start,
            end,
        }),
        sketch_points(node, &category, &entity, (start, end), 0)
    );
    let (start, end, total) =
        answer
            .into_points()
            .into_iter()
            .next()
            .unwrap_or((start, end, Total::EMPTY));
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert("entity".into(), json!(entity));
    o.insert("time_window_start".into(), json!(start));
    o.insert("time_window_end".into(), json!(end));
    stats(&total, &mut o);
    add_sketch(&mut o, sketches.first(), qs);
    freshness(node, complete && sketches_complete, &groups, &mut o);
    o
}

pub(super) async fn aggregate(
    State(node): State<Node_>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "start", "end", "entity", "quantiles"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let entity = p.name("entity", false)?;
    let window = p.window()?;
    let qs = p.quantiles()?;
    let o = aggregate_json(&node, category, entity, window, &qs).await;
    Ok(Json(Value::Object(o)))
}

pub(super) async fn window(
    State(node): State<Node_>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "width_ms", "entity", "quantiles"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let entity = p.name("entity", false)?;
    let width = p.int("width_ms", 1, 400 * 86_400_000, None)?;
    let qs = p.quantiles()?;
    let now = now_ms();
    let mut o = aggregate_json(&node, category, entity, (now - width, now), &qs).await;
    o.insert("width_ms".into(), json!(width));
    Ok(Json(Value::Object(o)))
}

pub(super) async fn topk(
    State(node): State<Node_>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["category", "start", "end", "k", "by", "rank"])?;
    let category = p.name("category", true)?.unwrap_or_default();
    let (start, end) = p.window()?;
    let k = p.int("k", 1, 1000, Some(10))? as usize;
    match (p.opt_str("rank").unwrap_or("count"), p.opt_str("by")) {
        ("count", _) => {}
        ("distinct", None | Some("entity")) => {
            let o = topk_distinct(&node, category, (start, end), k).await;
            return Ok(Json(Value::Object(o)));
        }
        (other, _) => {
            return Err(bad(
                "bad_parameter",
                format!("rank must be count, or distinct with by=entity, not {other:?}"),
            ))
        }
    }
    let by = match p.opt_str("by").unwrap_or("entity") {
        "entity" => TopBy::Entity,
        "producer" => TopBy::Producer,
        other => {
            return Err(bad(
                "bad_parameter",
                format!("by must be entity or producer, not {other:?}"),
            ))
        }
    };
    let ask = crate::scatter::topk::TopKAsk {
        category: category.clone(),
        start,
        end,
        by_producer: by == TopBy::Producer,
    };
    let (rows, complete, groups) = node.topk_by_count(&ask, k).await;
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert(
        "by".into(),
        json!(if by == TopBy::Entity {
            "entity"
        } else {
            "producer"
        }),
    );
    o.insert("k".into(), json!(k));
    o.insert("time_window_start".into(), json!(rows.start));
    o.insert("time_window_end".into(), json!(rows.end));
    o.insert("items".into(), rows_json(&rows));
    freshness(&node, complete, &groups, &mut o);
    Ok(Json(Value::Object(o)))
}

pub(super) async fn totals(
    State(node): State<Node_>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q, &["start", "end", "group_by"])?;
    let (start, end) = p.window()?;
    let (g, label) = match p.opt_str("group_by").unwrap_or("none") {
        "none" => (0, "none"),
        "category" => (1, "category"),
        "entity" => (2, "entity"),
        other => {
            return Err(bad(
                "bad_parameter",
                format!("group_by must be none, category or entity, not {other:?}"),
            ))
        }
    };
    let ((answer, complete, groups), (sketches, sketches_complete, _)) = tokio::join!(
        node.query(Query::Totals {
            start,
            end,
            group_by: g,
        }),
        node.query(Query::SketchRows {
            category: None,
            start,
            end,
            group_by: g,
        })
    );
    let rows = answer.into_rows();
    let (s_start, s_end, sketch_rows) = sketches.into_sketch_rows();
    let sketch_rows: BTreeMap<Option<String>, edgetally_core::Sketches> =
        sketch_rows.into_iter().collect();
    let mut groups_json = rows_json(&rows);
    if let Value::Array(items) = &mut groups_json {
        for (item, (name, _)) in items.iter_mut().zip(&rows.rows) {
            if let Value::Object(obj) = item {
                let k = sketch_rows.get(name).cloned().unwrap_or_default();
                obj.insert("distinct".into(), distinct_json(&k, s_start, s_end));
            }
        }
    }
    let mut o = Map::new();
    o.insert("group_by".into(), json!(label));
    o.insert("time_window_start".into(), json!(rows.start));
    o.insert("time_window_end".into(), json!(rows.end));
    o.insert("groups".into(), groups_json);
    freshness(&node, complete && sketches_complete, &groups, &mut o);
    Ok(Json(Value::Object(o)))
}

/// Most points one series answer may hold.
pub const MAX_SERIES_POINTS: usize = 10_000;

pub(super) async fn series(
    State(node): State<Node_>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(
        q,
        &["category", "start", "end", "step_ms", "entity", "quantiles"],
    )?;
    let category = p.name("category", true)?.unwrap_or_default();
    let entity = p.name("entity", false)?;
    let (start, end) = p.window()?;
    let step = p.int("step_ms", 1000, 400 * 86_400_000, None)?;
    let qs = p.quantiles()?;
    if (end - start) / step >= MAX_SERIES_POINTS as i64 {
        return Err(bad(
            "too_many_points",
            format!("at most {MAX_SERIES_POINTS} steps per request"),
        ));
    }
    let ((answer, complete, groups), (sketches, sketches_complete)) = tokio::join!(
        node.query(Query::Series {
            category: category.clone(),
            entity: entity.clone(),
            start,
            end,
            step_ms: step,
            max_points: MAX_SERIES_POINTS as u32,
        }),
        sketch_points(&node, &category, &entity, (start, end), step)
    );
    let pts: Vec<Value> = answer
        .into_points()
        .iter()
        .enumerate()
        .map(|(i, (start, end, total))| {
            let mut o = Map::new();
            o.insert("time_window_start".into(), json!(start));
            o.insert("time_window_end".into(), json!(end));
            stats(total, &mut o);
            add_sketch(&mut o, sketches.get(i), &qs);
            Value::Object(o)
        })
        .collect();
    let mut o = Map::new();
    o.insert("category".into(), json!(category));
    o.insert("entity".into(), json!(entity));
    o.insert("step_ms".into(), json!(step));
    o.insert("points".into(), Value::Array(pts));
    freshness(&node, complete && sketches_complete, &groups, &mut o);
    Ok(Json(Value::Object(o)))
}
