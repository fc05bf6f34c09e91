//! Reading `POST /v1/events` bodies (a JSON array or NDJSON, field by field, bounded) and
//! folding one request's events into one batch's summaries (`EventsFold`, pure).

use super::*;
use std::borrow::Cow;

/// An event's fields: ts_ms, category, entity, value, subject; borrowed from the body
/// unless the JSON string had escapes.
pub(super) type EventFields<'a> = (
    i64,
    Cow<'a, str>,
    Option<Cow<'a, str>>,
    f64,
    Option<Cow<'a, str>>,
);
/// One event of `POST /v1/events`: its fields, or why it was refused.
pub(super) type EventResult<'a> = Result<EventFields<'a>, (RejectCode, String)>;
/// An event's fields as borrowed for its canonical form: ts_ms, category, entity, value,
/// subject.
pub(super) type EventRef<'a> = (i64, &'a str, Option<&'a str>, f64, Option<&'a str>);

/// The bucket width of the batches `POST /v1/events` makes.
pub(super) const EVENTS_BUCKET_MS: i64 = 1000;

/// Most events one `POST /v1/events` request may hold (more: 413 `too_many_events`).
pub const MAX_EVENTS_PER_REQUEST: usize = 100_000;
/// Most rejections listed one by one in a reply; the rest are counted by reason.
pub const MAX_LISTED_REJECTIONS: usize = 100;

/// A JSON scalar as an event field sees it; arrays and objects are skipped unread
/// (`IgnoredAny`), so a hostile field costs no memory. Strings are borrowed from the body
/// when they can be (no escapes): an event's fields cost no allocation.
pub(super) enum Scalar<'de> {
    Int(i64),
    Float(f64),
    Str(Cow<'de, str>),
    Null,
    Other(&'static str),
}

impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Scalar<'de>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Scalar<'de>, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Scalar<'de>, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

impl Scalar<'_> {
    /// What it is, for messages.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Scalar::Int(_) | Scalar::Float(_) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Null => "null",
            Scalar::Other(k) => k,
        }
    }
}

/// At most `n` characters of attacker-chosen text for a message.
pub(super) fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// An event object's key, read without allocating: one of the five fields (its index in
/// [`FIELDS`]), or (for the message) the first 40 characters of another.
enum Field {
    Known(usize),
    Unknown(String),
}

/// The fields of an event object.
const FIELDS: [&str; 5] = ["ts_ms", "category", "entity", "value", "subject"];

impl<'de> serde::Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Field, E> {
                Ok(FIELDS
                    .iter()
                    .position(|&f| f == v)
                    .map_or_else(|| Field::Unknown(clip(v, 40)), Field::Known))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// One element of the events array (or one NDJSON line), read field by field straight from
/// the JSON text: memory per event is its own strings, whatever the element holds.
pub(super) struct EventItem<'de>(EventResult<'de>);

impl<'de> serde::Deserialize<'de> for EventItem<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EventItem<'de>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EventItem<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<EventItem<'de>, A::Error> {
                // In the order of FIELDS.
                let mut fields: [Option<Scalar<'de>>; 5] = [None, None, None, None, None];
                let mut problem: Option<(RejectCode, String)> = None;
                while let Some(k) = a.next_key::<Field>()? {
                    let slot = match k {
                        Field::Known(i) => &mut fields[i],
                        Field::Unknown(other) => {
                            problem.get_or_insert((
                                RejectCode::InvalidEvent,
                                format!("unknown field {other:?}"),
                            ));
                            a.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    let v = a.next_value::<Scalar<'de>>()?;
                    if slot.replace(v).is_some() {
                        if let Field::Known(i) = k {
                            problem.get_or_insert((
                                RejectCode::InvalidEvent,
                                format!("field {:?} given twice", FIELDS[i]),
                            ));
                        }
                    }
                }
                if let Some(p) = problem {
                    return Ok(EventItem(Err(p)));
                }
                let [ts, cat, ent, val, subj] = fields;
                Ok(EventItem(event_fields(ts, cat, ent, val, subj)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<EventItem<'de>, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(not_an_object())
            }
            fn visit_i64<E>(self, _: i64) -> Result<EventItem<'de>, E> {
                Ok(not_an_object())
            }
            fn visit_u64<E>(self, _: u64) -> Result<EventItem<'de>, E> {
                Ok(not_an_object())
            }
            fn visit_f64<E>(self, _: f64) -> Result<EventItem<'de>, E> {
                Ok(not_an_object())
            }
            fn visit_str<E>(self, _: &str) -> Result<EventItem<'de>, E> {
                Ok(not_an_object())
            }
            fn visit_bool<E>(self, _: bool) -> Result<EventItem<'de>, E> {
                Ok(not_an_object())
            }
            fn visit_unit<E>(self) -> Result<EventItem<'de>, E> {
                Ok(not_an_object())
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn not_an_object() -> EventItem<'static> {
    EventItem(Err((
        RejectCode::InvalidEvent,
        "an event must be a JSON object".to_string(),
    )))
}

/// Checks an event's fields by type (values and ranges are the builder's to check).
pub(super) fn event_fields<'a>(
    ts: Option<Scalar<'a>>,
    cat: Option<Scalar<'a>>,
    ent: Option<Scalar<'a>>,
    val: Option<Scalar<'a>>,
    subj: Option<Scalar<'a>>,
) -> EventResult<'a> {
    let ts = match ts {
        Some(Scalar::Int(n)) => n,
        Some(Scalar::Float(_)) => {
            return Err((
                RejectCode::InvalidTimestamp,
                "ts_ms must be an integer number of milliseconds".into(),
            ))
        }
        Some(_) => {
            return Err((
                RejectCode::InvalidTimestamp,
                "ts_ms must be a number".into(),
            ))
        }
        None => return Err((RejectCode::InvalidEvent, "ts_ms is required".into())),
    };
    let category = match cat {
        Some(Scalar::Str(s)) => s,
        Some(other) => {
            return Err((
                RejectCode::InvalidCategory,
                format!("category must be a string, not {}", other.kind()),
            ))
        }
        None => return Err((RejectCode::InvalidEvent, "category is required".into())),
    };
    let entity = match ent {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(s)) => Some(s),
        Some(other) => {
            return Err((
                RejectCode::InvalidEntity,
                format!("entity must be a string, not {}", other.kind()),
            ))
        }
    };
    let value = match val {
        None => 1.0,
        Some(Scalar::Int(n)) => n as f64,
        Some(Scalar::Float(x)) => x,
        Some(other) => {
            return Err((
                RejectCode::InvalidValue,
                format!("value must be a number, not {}", other.kind()),
            ))
        }
    };
    let subject = match subj {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(s)) if !s.is_empty() && s.len() <= 200 => Some(s),
        Some(Scalar::Str(_)) => {
            return Err((
                RejectCode::InvalidEvent,
                "subject must be 1-200 bytes".into(),
            ))
        }
        Some(other) => {
            return Err((
                RejectCode::InvalidEvent,
                format!("subject must be a string, not {}", other.kind()),
            ))
        }
    };
    Ok((ts, category, entity, value, subject))
}

/// Why an event was refused, for a rejection whose code says it (the SDK's `record` checks).
pub fn event_reason(code: RejectCode) -> &'static str {
    match code {
        RejectCode::InvalidCategory => {
            "category must be 1-200 bytes of UTF-8 without control characters"
        }
        RejectCode::InvalidEntity => {
            "entity must be 1-200 bytes of UTF-8 without control characters"
        }
        RejectCode::InvalidValue => "value must be finite with |value| <= 1e15",
        RejectCode::InvalidTimestamp => "ts_ms is outside the representable range",
        RejectCode::BucketTooOld => "ts_ms is older than max_lateness",
        RejectCode::FutureTimestamp => "ts_ms is further ahead than max_future_skew",
        _ => "rejected",
    }
}

pub(super) fn too_large(code: &'static str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code,
        message,
    }
}

/// The pure part of `POST /v1/events`: folds the events of one request, in order, into one
/// batch's worth of summaries and a bounded list of rejections. No I/O, no clock (`now` is
/// given). A request is applied all or nothing, so it must fit one batch.
pub(super) struct EventsFold {
    pub(super) limits: edgetally_core::Limits,
    pub(super) now: i64,
    /// Per-category value bounds (admission), checked per event.
    pub(super) admission: Arc<crate::admission::Admission>,
    pub(super) builder: BatchBuilder,
    pub(super) events: usize,
    pub(super) accepted: u64,
    pub(super) max_ts: i64,
    pub(super) listed: Vec<Value>,
    pub(super) by_reason: BTreeMap<&'static str, u64>,
    /// Why the whole request is refused, once it is.
    pub(super) refused: Option<ApiError>,
    /// An `Idempotency-Key` request: what it applies must be a function of its events alone
    /// (never of the clock, the node or its settings), so the events are checked on their
    /// own first and the clock and settings are checked for the request as a whole.
    pub(super) keyed: bool,
    /// Keyed: the canonical form of the events read (each event's fields, or its rejection's
    /// code), so a body reformatted (whitespace, key order, `1` for `1.0`) is the same request.
    pub(super) canonical: sha2::Sha256,
    /// Keyed: events valid on their own that the clock or a setting refuses here, now, with
    /// their index (the first [`MAX_LISTED_REJECTIONS`]) and counted by reason. Kept apart from
    /// the events' own rejections: a replay answers with those alone, as the first
    /// application did.
    pub(super) refused_here: u64,
    pub(super) here_listed: Vec<Value>,
    pub(super) here_by_reason: BTreeMap<&'static str, u64>,
}

impl EventsFold {
    pub(super) fn new(
        limits: edgetally_core::Limits,
        now: i64,
        admission: Arc<crate::admission::Admission>,
    ) -> Result<EventsFold, ApiError> {
        Ok(EventsFold {
            limits,
            now,
            admission,
            builder: BatchBuilder::new(EVENTS_BUCKET_MS as u32)
                .map_err(|_| bad("internal", "bucket width"))?,
            events: 0,
            accepted: 0,
            max_ts: i64::MIN,
            listed: Vec::new(),
            by_reason: BTreeMap::new(),
            refused: None,
            keyed: false,
            canonical: sha2::Digest::new(),
            refused_here: 0,
            here_listed: Vec::new(),
            here_by_reason: BTreeMap::new(),
        })
    }

    /// Adds an event's canonical form to the request's (keyed requests only).
    pub(super) fn canon(&mut self, event: Result<EventRef<'_>, RejectCode>) {
        use sha2::Digest as _;
        if !self.keyed {
            return;
        }
        let h = &mut self.canonical;
        match event {
            Err(code) => {
                h.update([0]);
                h.update((code as u16).to_le_bytes());
            }
            Ok((ts, cat, ent, value, subject)) => {
                h.update([1]);
                h.update(ts.to_le_bytes());
                h.update((cat.len() as u32).to_le_bytes());
                h.update(cat.as_bytes());
                match ent {
                    None => h.update([0]),
                    Some(e) => {
                        h.update([1]);
                        h.update((e.len() as u32).to_le_bytes());
                        h.update(e.as_bytes());
                    }
                }
                h.update(value.to_bits().to_le_bytes());
                // Only when present: a request without subjects has the digest it had before.
                if let Some(s) = subject {
                    h.update([2]);
                    h.update((s.len() as u32).to_le_bytes());
                    h.update(s.as_bytes());
                }
            }
        }
    }

    /// The clock and setting checks of one event valid on its own: its bucket (of the fold's
    /// 1 s width) within the time window (`Limits::check_bucket_time`, the rule every merger
    /// applies to a batch), its value within the category's bounds.
    pub(super) fn check_here(&self, ts: i64, cat: &str, value: f64) -> Result<(), RejectCode> {
        let start = ts.div_euclid(EVENTS_BUCKET_MS) * EVENTS_BUCKET_MS;
        self.limits
            .check_bucket_time(start, EVENTS_BUCKET_MS, self.now)?;
        if !self.admission.value_in_bounds(cat, value) {
            return Err(RejectCode::ValueOutOfBounds);
        }
        Ok(())
    }

    /// What an event adds to its summary's sketches: its subject's hash (into a HyperLogLog
    /// of the default precision, or the category's cap if lower) and, for a quantile
    /// category, its value.
    fn sketch_opts(&self, category: &str, subject: Option<&str>) -> edgetally_proto::SketchOpts {
        let p = &self.admission.sketches;
        edgetally_proto::SketchOpts {
            subject: subject.map(|s| {
                (
                    p.subject_hash(s),
                    p.cap(category)
                        .min(edgetally_core::sketches::HLL_DEFAULT_PRECISION),
                )
            }),
            quantiles: p.quantiles(category),
        }
    }

    pub(super) fn reject(&mut self, index: usize, code: RejectCode, message: String) {
        *self.by_reason.entry(code.as_str()).or_insert(0) += 1;
        if self.listed.len() < MAX_LISTED_REJECTIONS {
            self.listed
                .push(json!({"index": index, "error": code.as_str(), "message": message}));
        }
    }

    /// Takes the next event; `false` once the request is refused whole.
    pub(super) fn event(&mut self, item: EventResult<'_>) -> bool {
        let index = self.events;
        self.events += 1;
        if self.events > MAX_EVENTS_PER_REQUEST {
            self.refused = Some(too_large(
                "too_many_events",
                format!("at most {MAX_EVENTS_PER_REQUEST} events per request; split it"),
            ));
            return false;
        }
        let (ts, cat, ent, value, subject) = match item {
            Ok(x) => x,
            Err((code, msg)) => {
                self.canon(Err(code));
                self.reject(index, code, msg);
                return true;
            }
        };
        let folded = if self.keyed {
            // The event on its own first: what a keyed request holds depends on its events
            // alone. The clock and the settings are then checked for the whole request.
            let opts = self.sketch_opts(&cat, subject.as_deref());
            let r = self
                .builder
                .record_with(&cat, ent.as_deref(), ts, value, opts);
            self.canon(r.map(|()| (ts, &*cat, ent.as_deref(), value, subject.as_deref())));
            if let (Ok(()), Err(code)) = (r, self.check_here(ts, &cat, value)) {
                self.refused_here += 1;
                *self.here_by_reason.entry(code.as_str()).or_insert(0) += 1;
                if self.here_listed.len() < MAX_LISTED_REJECTIONS {
                    self.here_listed.push(json!({"index": index, "error": code.as_str(), "message": event_reason(code)}));
                }
            }
            r
        } else {
            let opts = self.sketch_opts(&cat, subject.as_deref());
            self.check_here(ts, &cat, value).and_then(|()| {
                self.builder
                    .record_with(&cat, ent.as_deref(), ts, value, opts)
            })
        };
        match folded {
            Ok(()) => {
                self.accepted += 1;
                self.max_ts = self.max_ts.max(ts);
                let l = &self.limits;
                if self.builder.len() > l.max_summaries
                    || self.builder.categories() > l.max_categories
                    || self.builder.entities() > l.max_entities
                {
                    self.refused = Some(too_large(
                        "request_too_large",
                        format!(
                            "a request is applied as one batch: at most {} distinct (category, entity, second), {} categories and {} entities; split it",
                            l.max_summaries, l.max_categories, l.max_entities
                        ),
                    ));
                    return false;
                }
            }
            Err(code) => self.reject(index, code, event_reason(code).to_string()),
        }
        true
    }

    /// Reads a JSON array of events element by element.
    pub(super) fn array(&mut self, text: &str) -> Result<(), ApiError> {
        struct Each<'a>(&'a mut EventsFold);
        impl<'de> serde::de::Visitor<'de> for Each<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON array of events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
                while let Some(EventItem(e)) = a.next_element()? {
                    if !self.0.event(e) {
                        return Err(serde::de::Error::custom("refused"));
                    }
                }
                Ok(())
            }
        }
        use serde::Deserializer as _;
        let mut de = serde_json::Deserializer::from_str(text);
        let read = de.deserialize_seq(Each(self)).and_then(|()| de.end());
        if let Some(e) = self.refused.take() {
            return Err(e);
        }
        read.map_err(|e| {
            bad(
                "malformed",
                format!("body is not a JSON array of events: {e}"),
            )
        })
    }

    /// Reads NDJSON: one event per non-empty line; a line that is not JSON is rejected alone.
    pub(super) fn ndjson(&mut self, text: &str) -> Result<(), ApiError> {
        // Lines end in LF, CRLF or a lone CR (as some exporters write them). Both are ASCII,
        // so every piece between them is whole UTF-8.
        let ends = memchr::memchr2_iter(b'\n', b'\r', text.as_bytes()).chain([text.len()]);
        let mut start = 0;
        for end in ends {
            let line = text.get(start..end).unwrap_or_default();
            start = end + 1;
            if line.trim().is_empty() {
                continue;
            }
            let item = serde_json::from_str::<EventItem>(line)
                .map(|EventItem(e)| e)
                .unwrap_or_else(|e| Err((RejectCode::Malformed, format!("line is not JSON: {e}"))));
            if !self.event(item) {
                break;
            }
        }
        self.refused.take().map_or(Ok(()), Err)
    }
}
