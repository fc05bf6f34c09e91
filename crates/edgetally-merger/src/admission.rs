//! Admission and quotas: who may send batches to this merger, and how much.
//!
//! Checks run at the ingress of batches from producers only, in this order:
//!
//! 1. **Source rate** (before any decoding): batches per second per source address (an IPv6
//!    address counts by its /64). Over the limit: `Retry` with the time until a token frees.
//! 2. **Policy** (after decoding, before the signature is verified, so unknown keys cost no
//!    verification): `open` admits every key; `allowlist` the keys listed in a file that is
//!    re-read when it changes; `enrolled` the keys holding an unexpired credential signed by
//!    a configured issuer ([`edgetally_proto::credential`]). Refused: `Nack not_admitted`.
//! 3. **Value bounds** per category: `Nack value_out_of_bounds`.
//! 4. After the signature verified and the batch is known not to be a duplicate (a resent
//!    batch is always acknowledged): the **producer rate** in batches/s and summaries/s
//!    (`Retry`), then the **novelty quotas** against the state the batch would change: new
//!    categories and new (category, entity) series per producer per hour (`Nack
//!    category_quota`, `entity_quota`), new series per source address per hour (`Nack
//!    source_quota`: keys are free to mint, addresses are not), and the total number of
//!    series (`Nack series_limit`), whose last tenth is kept for producers the state already
//!    holds: keys minted to fill the cap stop at nine tenths of it, and a producer already
//!    known can still add series within its own quotas.
//!
//! Batches a peer sends (replication) are never checked: they were admitted where they
//! entered the cluster, and refusing them would split replicas. The node's own batches
//! (`POST /v1/events`, guarded by bearer tokens) skip the policy and per-producer limits but
//! not the series cap or value bounds.
//!
//! Token buckets allow a debt: a batch is admitted while the bucket is not negative and then
//! charged in full, so a batch larger than the bucket's capacity still passes once the bucket
//! refills, and a producer is never starved.

use crate::config::{Config, ProducerPolicy};
use edgetally_core::{Batch, Novelty, ProducerKey, RejectCode};
use std::collections::BTreeMap;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
use tracing::{info, warn};

/// Seconds of rate a bucket holds (its burst).
pub const BURST_SECS: f64 = 2.0;
/// Most enrolled keys remembered at once (expired ones are swept first).
pub const MAX_ENROLLED: usize = 1 << 20;
/// Most producers and sources tracked at once by the rate limits; past it, idle entries are
/// swept early.
pub const MAX_TRACKED: usize = 1 << 20;
/// The longest `Retry` delay a rate limit suggests, ms.
const MAX_DELAY_MS: f64 = 60_000.0;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Bucket {
    fn full(rate: f64, now: i64) -> Bucket {
        Bucket {
            tokens: rate * BURST_SECS,
            at_ms: now,
        }
    }

    fn refill(&mut self, rate: f64, now: i64) {
        let dt = (now - self.at_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + dt * rate).min(rate * BURST_SECS);
        self.at_ms = now.max(self.at_ms);
    }

    /// Whether it holds all it can (a bucket of an unlimited rate, 0, always does).
    fn is_full(&self, rate: f64) -> bool {
        rate <= 0.0 || self.tokens >= rate * BURST_SECS
    }

    /// The wait (ms) before this bucket admits again, if it does not now.
    fn wait_ms(&self, rate: f64) -> Option<u32> {
        (self.tokens < 0.0)
            .then(|| ((-self.tokens / rate) * 1000.0).clamp(1.0, MAX_DELAY_MS) as u32)
    }
}

/// What a batch was charged against its producer's hourly quotas before it applied (an upper
/// bound, or the exact novelty when the bound did not fit); settled by [`Admission::settle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The producer charged (`None`: the node's own key, which has no producer quotas).
    key: Option<ProducerKey>,
    hour: i64,
    categories: u32,
    entities: u32,
    /// The source address charged, and the new series charged to it.
    source: Option<(IpAddr, u32)>,
}

/// The share of `max_series` kept for producers the state already holds, in tenths: new
/// producers may add series only while the node holds fewer than nine tenths of the cap.
const KNOWN_PRODUCERS_TENTHS: u64 = 1;

#[derive(Clone, Copy, Debug)]
struct ProducerState {
    batches: Bucket,
    summaries: Bucket,
    /// The hour (ms / 3,600,000) the counts below belong to.
    hour: i64,
    new_categories: u32,
    new_entities: u32,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Batches answered `Retry` by the per-producer rate limit.
    pub throttled_producer: AtomicU64,
    /// Batches answered `Retry` by the per-source rate limit.
    pub throttled_source: AtomicU64,
    /// Credentials accepted.
    pub credentials_accepted: AtomicU64,
    /// Credentials refused.
    pub credentials_refused: AtomicU64,
    /// Allowlist loads that failed (the previous list stays in force).
    pub allowlist_errors: AtomicU64,
    /// Batches refused because their source used up its new series for the hour.
    pub source_quota: AtomicU64,
}

/// The admission state of a node.
#[derive(Debug)]
pub struct Admission {
    policy: ProducerPolicy,
    own: ProducerKey,
    allowlist_file: Option<PathBuf>,
    allow: RwLock<(Arc<HashSet<ProducerKey>>, Option<SystemTime>)>,
    issuers: Vec<[u8; 32]>,
    enrolled: Mutex<HashMap<ProducerKey, i64>>,
    producers: Mutex<HashMap<ProducerKey, ProducerState>>,
    sources: Mutex<HashMap<IpAddr, Bucket>>,
    /// New series per source this hour: source → (hour, count).
    source_series: Mutex<HashMap<IpAddr, (i64, u32)>>,
    source_new_series_per_hour: u32,
    producer_batches: f64,
    producer_summaries: f64,
    source_batches: f64,
    new_categories_per_hour: u32,
    new_entities_per_hour: u32,
    max_series: u64,
    bounds: HashMap<String, (f64, f64)>,
    any_bounds: Option<(f64, f64)>,
    /// Producers found equivocating, with the epoch where it was found (PROTOCOL.md §9).
    equivocators: RwLock<BTreeMap<ProducerKey, u64>>,
    /// Where that list is kept (`<data dir>/equivocators`: `<key hex> <epoch>` per line).
    equivocators_file: PathBuf,
    refuse_equivocators: bool,
    /// The sketch caps and how `POST /v1/events` makes sketches.
    pub sketches: crate::sketch_policy::SketchPolicy,
    /// Counters.
    pub stats: AdmissionStats,
}

/// The file (in the data directory) that lists producers found equivocating.
pub const EQUIVOCATORS_FILE: &str = "equivocators";

/// Reads the equivocators file: `<key hex> <epoch>` per line; a missing file is an empty list.
fn read_equivocators(path: &std::path::Path) -> Result<BTreeMap<ProducerKey, u64>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        let (Some(k), Some(e)) = (f.next().and_then(key_of), f.next()) else {
            // A line cut short by a crash mid-append is the only way to get a bad one: skip it.
            continue;
        };
        let epoch = e
            .parse()
            .map_err(|_| format!("{} line {}: bad epoch", path.display(), i + 1))?;
        out.insert(ProducerKey(k), epoch);
    }
    Ok(out)
}

/// Parses 64 hex digits.
fn key_of(s: &str) -> Option<[u8; 32]> {
    edgetally_net::tls::parse_hash(s.trim())
}

/// Reads an allowlist: one producer key (64 hex digits) per line; `#` starts a comment.
pub fn parse_allowlist(text: &str) -> Result<HashSet<ProducerKey>, String> {
    let mut keys = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let k = key_of(line)
            .ok_or_else(|| format!("line {}: not a producer key (64 hex digits)", i + 1))?;
        keys.insert(ProducerKey(k));
    }
    Ok(keys)
}

fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

impl Admission {
    /// Builds the admission state from the configuration; `own` is the node's key. An
    /// allowlist that cannot be read is an error here (at start-up), a warning on reload.
    pub fn new(config: &Config, own: ProducerKey) -> Result<Admission, String> {
        let issuers = config
            .issuer_keys
            .iter()
            .map(|k| key_of(k).ok_or_else(|| format!("issuer_keys: {k:?} is not 64 hex digits")))
            .collect::<Result<Vec<_>, _>>()?;
        if config.producer_policy == ProducerPolicy::Enrolled && issuers.is_empty() {
            return Err("producer_policy = \"enrolled\" needs issuer_keys".into());
        }
        if config.producer_policy == ProducerPolicy::Allowlist
            && config.producer_allowlist.is_none()
        {
            return Err("producer_policy = \"allowlist\" needs producer_allowlist (a file)".into());
        }
        let mut bounds = HashMap::new();
        let mut any_bounds = None;
        for (cat, &[lo, hi]) in &config.value_bounds {
            if lo
                .partial_cmp(&hi)
                .is_none_or(|o| o == std::cmp::Ordering::Greater)
            {
                return Err(format!("value_bounds.{cat}: [{lo}, {hi}] is not a range"));
            }
            if cat == "*" {
                any_bounds = Some((lo, hi));
            } else {
                bounds.insert(cat.clone(), (lo, hi));
            }
        }
        let a = Admission {
            policy: config.producer_policy,
            own,
            allowlist_file: config.producer_allowlist.clone(),
            allow: RwLock::new((Arc::default(), None)),
            issuers,
            enrolled: Mutex::default(),
            producers: Mutex::default(),
            sources: Mutex::default(),
            source_series: Mutex::default(),
            source_new_series_per_hour: config.source_new_series_per_hour,
            producer_batches: config.producer_batches_per_sec,
            producer_summaries: config.producer_summaries_per_sec,
            source_batches: config.source_batches_per_sec,
            new_categories_per_hour: config.new_categories_per_hour,
            new_entities_per_hour: config.new_entities_per_hour,
            max_series: config.max_series,
            bounds,
            any_bounds,
            equivocators: RwLock::new(read_equivocators(&config.data_dir.join(EQUIVOCATORS_FILE))?),
            equivocators_file: config.data_dir.join(EQUIVOCATORS_FILE),
            refuse_equivocators: config.refuse_equivocators,
            sketches: crate::sketch_policy::SketchPolicy::new(config)?,
            stats: AdmissionStats::default(),
        };
        if a.allowlist_file.is_some() {
            a.reload_allowlist()?;
        }
        Ok(a)
    }

    /// Records that `producer` equivocated in `epoch`; true the first time. The list is
    /// appended to the data directory's file, so the verdict survives a restart.
    pub fn add_equivocator(&self, producer: ProducerKey, epoch: u64) -> bool {
        let mut list = self.equivocators.write().unwrap_or_else(|e| e.into_inner());
        if list.contains_key(&producer) {
            return false;
        }
        list.insert(producer, epoch);
        let line = format!("{} {epoch}\n", edgetally_net::tls::hex(&producer.0));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.equivocators_file)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        if let Err(e) = written {
            tracing::warn!(
                "could not record the equivocator in {}: {e}",
                self.equivocators_file.display()
            );
        }
        true
    }

    /// Producers found equivocating, with the epoch where it was found.
    pub fn equivocators(&self) -> Vec<(ProducerKey, u64)> {
        let list = self.equivocators.read().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|(k, e)| (*k, *e)).collect()
    }

    /// Whether equivocators' batches are refused.
    pub fn refuses_equivocators(&self) -> bool {
        self.refuse_equivocators
    }

    /// The policy in force.
    pub fn policy(&self) -> ProducerPolicy {
        self.policy
    }

    /// Re-reads the allowlist file if it changed since the last read. Returns whether a new
    /// list was loaded; on error the previous list stays in force.
    pub fn reload_allowlist(&self) -> Result<bool, String> {
        let Some(path) = &self.allowlist_file else {
            return Ok(false);
        };
        let fail = |e: String| {
            self.stats.allowlist_errors.fetch_add(1, Relaxed);
            format!("{}: {e}", path.display())
        };
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(|e| fail(e.to_string()))?;
        if self.allow.read().unwrap_or_else(|e| e.into_inner()).1 == Some(modified) {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let keys = parse_allowlist(&text).map_err(fail)?;
        let n = keys.len();
        *self.allow.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(keys), Some(modified));
        info!(keys = n, file = %path.display(), "producer allowlist loaded");
        Ok(true)
    }

    /// Keys on the allowlist.
    pub fn allowlist_len(&self) -> usize {
        self.allow.read().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Keys enrolled and not yet expired (an upper bound: expired ones are swept lazily).
    pub fn enrolled_len(&self) -> usize {
        self.enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Estimated heap bytes of the per-producer and per-source state (rate limits, quotas,
    /// enrolments): entries times their size, at a hash table's 7/8 fill.
    pub fn memory_bytes(&self) -> u64 {
        use std::mem::size_of;
        let hash = |entry: usize, n: usize| ((entry + 1) * n * 8 / 7) as u64;
        let (producers, sources) = self.tracked();
        let enrolled = self.enrolled_len();
        hash(size_of::<(ProducerKey, ProducerState)>(), producers)
            + hash(size_of::<(IpAddr, Bucket)>(), sources)
            + hash(size_of::<(ProducerKey, i64)>(), enrolled)
    }

    /// Producers and sources tracked by the rate limits.
    pub fn tracked(&self) -> (usize, usize) {
        (
            self.producers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            self.sources.lock().unwrap_or_else(|e| e.into_inner()).len(),
        )
    }

    /// Checks and records a credential; the key it admits is enrolled until it expires.
    pub fn enroll(&self, bytes: &[u8], now_ms: i64) -> Result<ProducerKey, RejectCode> {
        match edgetally_proto::credential::verify(bytes, &self.issuers, now_ms) {
            Ok(c) => {
                let mut e = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
                if e.len() >= MAX_ENROLLED && !e.contains_key(&c.producer) {
                    e.retain(|_, &mut until| until > now_ms);
                    if e.len() >= MAX_ENROLLED {
                        // Full of live credentials: the producer is told to come back.
                        self.stats.credentials_refused.fetch_add(1, Relaxed);
                        return Err(RejectCode::NotAdmitted);
                    }
                }
                let until = e.entry(c.producer).or_insert(c.not_after_ms);
                *until = (*until).max(c.not_after_ms);
                self.stats.credentials_accepted.fetch_add(1, Relaxed);
                Ok(c.producer)
            }
            Err(code) => {
                self.stats.credentials_refused.fetch_add(1, Relaxed);
                Err(code)
            }
        }
    }

    /// The per-source rate limit: `Some(delay_ms)` when this source must wait.
    pub fn throttle_source(&self, ip: IpAddr, now_ms: i64) -> Option<u32> {
        let rate = self.source_batches;
        if rate <= 0.0 {
            return None;
        }
        let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_TRACKED {
            Self::sweep_sources(&mut m, rate, now_ms);
        }
        let b = m
            .entry(source_key(ip))
            .or_insert_with(|| Bucket::full(rate, now_ms));
        b.refill(rate, now_ms);
        if let Some(wait) = b.wait_ms(rate) {
            self.stats.throttled_source.fetch_add(1, Relaxed);
            return Some(wait);
        }
        b.tokens -= 1.0;
        None
    }

    /// The policy and the value bounds: checks that need only the decoded batch (run before
    /// its signature is verified).
    pub fn check_batch(&self, batch: &Batch, now_ms: i64) -> Result<(), RejectCode> {
        let key = batch.id.producer;
        if self.refuse_equivocators
            && key != self.own
            && self
                .equivocators
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key)
        {
            return Err(RejectCode::Equivocated);
        }
        if key != self.own {
            match self.policy {
                ProducerPolicy::Open => {}
                ProducerPolicy::Allowlist => {
                    if !self
                        .allow
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                        .contains(&key)
                    {
                        return Err(RejectCode::NotAdmitted);
                    }
                }
                ProducerPolicy::Enrolled => {
                    let e = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
                    if e.get(&key).is_none_or(|&until| until <= now_ms) {
                        return Err(RejectCode::NotAdmitted);
                    }
                }
            }
        }
        if self.bounds.is_empty() && self.any_bounds.is_none() {
            return Ok(());
        }
        for s in &batch.summaries {
            if let Some((lo, hi)) = self.bounds_for(batch.category(s)) {
                if s.summary.min < lo || s.summary.max > hi {
                    return Err(RejectCode::ValueOutOfBounds);
                }
            }
        }
        Ok(())
    }

    /// The `[lo, hi]` bounds configured for `category`: its own, else `"*"`'s.
    fn bounds_for(&self, category: &str) -> Option<(f64, f64)> {
        self.bounds.get(category).copied().or(self.any_bounds)
    }

    /// Whether `value` lies within the bounds configured for `category` (if any).
    pub fn value_in_bounds(&self, category: &str, value: f64) -> bool {
        match self.bounds_for(category) {
            Some((lo, hi)) => lo <= value && value <= hi,
            None => true,
        }
    }

    /// The checks that need the verified batch and the state: the series cap, the producer's
    /// rates, then the novelty quotas of the producer and of its `source` address (if known).
    /// `series` is the number of series the state holds (with what earlier batches of the
    /// group will add); `exact` computes what the batch would add
    /// ([`edgetally_core::Replica::novelty`]), and is called only when an upper bound taken
    /// from the batch's shape does not already fit — so a producer far from its quotas, on a
    /// node far from its cap, costs no lookup; `known` says whether the state already holds
    /// the producer (asked only past nine tenths of the cap). Returns what was reserved (the
    /// series to add to `series`, and the quota charge to settle once the batch applied), or
    /// `Err(Ok(delay))` for a retry, `Err(Err(code))` for a refusal.
    // Long by design: the admission checks in their documented order (series cap, rates,
    // novelty quotas per producer and per source), each refusing with its code
    // (docs/design/ingest.md).
    pub fn charge(
        &self,
        batch: &Batch,
        series: u64,
        now_ms: i64,
        source: Option<IpAddr>,
        exact: impl Fn() -> Novelty,
        known: impl FnOnce() -> bool,
    ) -> Result<(u64, Option<Reservation>), Result<u32, RejectCode>> {
        // Computed at most once, and only if a bound does not fit.
        let mut computed: Option<Novelty> = None;
        let mut novelty = || *computed.get_or_insert_with(&exact);
        let summaries = batch.summaries.len() as u32;
        // Distinct categories (indices into the batch's string table, which `Batch::check`
        // bounds), with a bit per string.
        let mut seen = vec![0u64; batch.strings.len().div_ceil(64)];
        let mut ub_cats = 0u32;
        for s in &batch.summaries {
            let (w, b) = ((s.category / 64) as usize, s.category % 64);
            if let Some(word) = seen.get_mut(w) {
                if *word & (1 << b) == 0 {
                    *word |= 1 << b;
                    ub_cats += 1;
                }
            }
        }
        let ub_ents = batch
            .summaries
            .iter()
            .filter(|s| s.entity != edgetally_core::NO_ENTITY)
            .count() as u32;
        let ub_series = 2 * ub_cats as u64 + summaries as u64;
        let key = batch.id.producer;
        let mut add_series = ub_series;
        let cap = self.max_series;
        let for_new = cap - cap * KNOWN_PRODUCERS_TENTHS / 10;
        if cap > 0 && series.saturating_add(ub_series) > for_new {
            add_series = novelty().series as u64;
            let total = series.saturating_add(add_series);
            if add_series > 0 && (total > cap || (total > for_new && key != self.own && !known())) {
                return Err(Err(RejectCode::SeriesLimit));
            }
        }
        let hour = now_ms.div_euclid(3_600_000);
        // The source's share, checked here and charged once every other check passed.
        let qs = self.source_new_series_per_hour;
        let source = source.filter(|_| qs > 0).map(source_key);
        let mut source_charge = None;
        if let Some(ip) = source {
            let used = {
                let m = self.source_series.lock().unwrap_or_else(|e| e.into_inner());
                m.get(&ip)
                    .filter(|(h, _)| *h == hour)
                    .map_or(0, |(_, n)| *n)
            };
            let want = if used as u64 + ub_series <= qs as u64 {
                ub_series as u32
            } else {
                novelty().series
            };
            if want > 0 && used.saturating_add(want) > qs {
                self.stats.source_quota.fetch_add(1, Relaxed);
                return Err(Err(RejectCode::SourceQuota));
            }
            source_charge = Some((ip, want));
        }
        let charge_source = |c: Option<(IpAddr, u32)>| {
            if let Some((ip, want)) = c {
                let mut m = self.source_series.lock().unwrap_or_else(|e| e.into_inner());
                if m.len() >= MAX_TRACKED && !m.contains_key(&ip) {
                    m.retain(|_, (h, _)| *h == hour);
                }
                let st = m.entry(ip).or_insert((hour, 0));
                if st.0 != hour {
                    *st = (hour, 0);
                }
                st.1 = st.1.saturating_add(want);
            }
        };
        if key == self.own {
            charge_source(source_charge);
            return Ok((
                add_series,
                source_charge.map(|c| Reservation {
                    key: None,
                    hour,
                    categories: 0,
                    entities: 0,
                    source: Some(c),
                }),
            ));
        }
        let (rb, rs) = (self.producer_batches, self.producer_summaries);
        let mut m = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_TRACKED && !m.contains_key(&key) {
            Self::sweep_producers(&mut m, rb, rs, now_ms);
        }
        let st = m.entry(key).or_insert_with(|| ProducerState {
            batches: Bucket::full(rb, now_ms),
            summaries: Bucket::full(rs, now_ms),
            hour,
            new_categories: 0,
            new_entities: 0,
        });
        if rb > 0.0 {
            st.batches.refill(rb, now_ms);
            if let Some(w) = st.batches.wait_ms(rb) {
                self.stats.throttled_producer.fetch_add(1, Relaxed);
                return Err(Ok(w));
            }
        }
        if rs > 0.0 {
            st.summaries.refill(rs, now_ms);
            if let Some(w) = st.summaries.wait_ms(rs) {
                self.stats.throttled_producer.fetch_add(1, Relaxed);
                return Err(Ok(w));
            }
        }
        if st.hour != hour {
            st.hour = hour;
            st.new_categories = 0;
            st.new_entities = 0;
        }
        let (qc, qe) = (self.new_categories_per_hour, self.new_entities_per_hour);
        let fits = |c: u32, e: u32| {
            (qc == 0 || st.new_categories.saturating_add(c) <= qc)
                && (qe == 0 || st.new_entities.saturating_add(e) <= qe)
        };
        let (cats, ents) = if fits(ub_cats, ub_ents) {
            (ub_cats, ub_ents)
        } else {
            let n = novelty();
            if qc > 0 && st.new_categories.saturating_add(n.categories) > qc {
                return Err(Err(RejectCode::CategoryQuota));
            }
            if qe > 0 && st.new_entities.saturating_add(n.entities) > qe {
                return Err(Err(RejectCode::EntityQuota));
            }
            (n.categories, n.entities)
        };
        st.new_categories = st.new_categories.saturating_add(cats);
        st.new_entities = st.new_entities.saturating_add(ents);
        st.batches.tokens -= 1.0;
        st.summaries.tokens -= summaries as f64;
        drop(m);
        charge_source(source_charge);
        Ok((
            add_series,
            Some(Reservation {
                key: Some(key),
                hour,
                categories: cats,
                entities: ents,
                source: source_charge,
            }),
        ))
    }

    /// Settles a reservation once its batch applied (`actual`: what it really added,
    /// [`edgetally_core::Replica::last_novelty`]) or was not written (`Novelty::default()`):
    /// the difference goes back to the producer's hourly quotas.
    pub fn settle(&self, r: Reservation, actual: Novelty) {
        if let Some((ip, charged)) = r.source {
            let mut m = self.source_series.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(st) = m.get_mut(&ip) {
                if st.0 == r.hour {
                    st.1 = st.1.saturating_sub(charged.saturating_sub(actual.series));
                }
            }
        }
        let Some(key) = r.key else { return };
        let mut m = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = m.get_mut(&key) {
            if st.hour == r.hour {
                st.new_categories = st
                    .new_categories
                    .saturating_sub(r.categories.saturating_sub(actual.categories));
                st.new_entities = st
                    .new_entities
                    .saturating_sub(r.entities.saturating_sub(actual.entities));
            }
        }
    }

    /// Drops sources whose buckets are full: they hold nothing a fresh entry would not.
    fn sweep_sources(m: &mut HashMap<IpAddr, Bucket>, rate: f64, now_ms: i64) {
        m.retain(|_, b| {
            b.refill(rate, now_ms);
            !b.is_full(rate)
        });
    }

    /// Drops producers whose buckets are full and who have used none of this hour's novelty
    /// quotas (their hour is over, or they brought nothing new): they hold nothing a fresh
    /// entry would not. An ephemeral producer — a page view that sent a batch or two into
    /// known categories — is forgotten at the next sweep instead of at the end of the hour.
    /// The table gives its memory back once it is mostly empty.
    fn sweep_producers(m: &mut HashMap<ProducerKey, ProducerState>, rb: f64, rs: f64, now_ms: i64) {
        let hour = now_ms.div_euclid(3_600_000);
        m.retain(|_, st| {
            st.batches.refill(rb, now_ms);
            st.summaries.refill(rs, now_ms);
            (st.hour == hour && (st.new_categories > 0 || st.new_entities > 0))
                || !st.batches.is_full(rb)
                || !st.summaries.is_full(rs)
        });
        if m.capacity() > 4 * m.len() + 1024 {
            m.shrink_to(2 * m.len());
        }
    }

    /// Periodic upkeep: re-reads the allowlist if it changed and, with `sweep`, forgets idle
    /// producers and sources and expired enrolments.
    pub fn upkeep(&self, now_ms: i64, sweep: bool) {
        if let Err(e) = self.reload_allowlist() {
            warn!("producer allowlist not reloaded (the previous list stays in force): {e}");
        }
        if !sweep {
            return;
        }
        {
            let mut m = self.producers.lock().unwrap_or_else(|e| e.into_inner());
            Self::sweep_producers(
                &mut m,
                self.producer_batches,
                self.producer_summaries,
                now_ms,
            );
        }
        {
            let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            Self::sweep_sources(&mut m, self.source_batches, now_ms);
        }
        self.enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, &mut until| until > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_admit_their_rate_and_name_the_wait() {
        let mut b = Bucket::full(10.0, 0);
        let mut admitted = 0;
        for _ in 0..100 {
            b.refill(10.0, 0);
            if b.wait_ms(10.0).is_none() {
                b.tokens -= 1.0;
                admitted += 1;
            }
        }
        // Burst of 2 s at 10/s, plus the debt of one.
        assert_eq!(admitted, 21);
        assert_eq!(b.wait_ms(10.0), Some(100));
        b.refill(10.0, 100);
        assert_eq!(b.wait_ms(10.0), None);
    }

    fn batch_of(cats: &[&str], seq: u64) -> Batch {
        let s = edgetally_proto::Signer::from_seed([9; 32]);
        let mut b = edgetally_proto::BatchBuilder::new(1000).expect("width");
        for c in cats {
            b.record(c, None, 1_700_000_000_000, 1.0).expect("record");
        }
        let id = edgetally_core::BatchId {
            producer: s.producer(),
            epoch: 1,
            seq,
        };
        b.finish(id, 1_700_000_000_000)
    }

    #[test]
    fn quotas_reserve_an_upper_bound_settle_to_the_truth_and_look_closer_near_the_limit() {
        let config = Config {
            new_categories_per_hour: 3,
            producer_batches_per_sec: 0.0,
            producer_summaries_per_sec: 0.0,
            max_series: 0,
            ..Config::default()
        };
        let a = Admission::new(&config, ProducerKey([0; 32])).expect("admission");
        let now = 1_700_000_000_000;
        let exact_called = std::cell::Cell::new(false);
        let novelty = |categories: u32| {
            exact_called.set(true);
            Novelty {
                categories,
                entities: 0,
                series: 2 * categories,
            }
        };
        // Two categories fit the quota of 3 by their bound alone: no lookup.
        let (_, r) = a
            .charge(
                &batch_of(&["a", "b"], 0),
                0,
                now,
                None,
                || novelty(2),
                || true,
            )
            .expect("admitted");
        assert!(!exact_called.get());
        // Only one of them was new after all: one comes back.
        a.settle(r.expect("reserved"), novelty(1));
        exact_called.set(false);
        // Two more fit (1 + 2 = 3).
        let (_, r) = a
            .charge(
                &batch_of(&["c", "d"], 1),
                0,
                now,
                None,
                || novelty(2),
                || true,
            )
            .expect("admitted");
        assert!(!exact_called.get());
        a.settle(r.expect("reserved"), novelty(2));
        exact_called.set(false);
        // The bound no longer fits: the exact novelty decides — none new passes, one refused.
        assert!(a
            .charge(&batch_of(&["a"], 2), 0, now, None, || novelty(0), || true)
            .is_ok());
        assert!(exact_called.get());
        assert_eq!(
            a.charge(&batch_of(&["e"], 3), 0, now, None, || novelty(1), || true),
            Err(Err(RejectCode::CategoryQuota))
        );
        // A batch that was never written gives its whole reservation back; a new hour resets.
        assert!(a
            .charge(
                &batch_of(&["f"], 4),
                0,
                now + 3_600_000,
                None,
                || novelty(1),
                || true
            )
            .is_ok());
    }

    #[test]
    fn a_sweep_forgets_producers_that_hold_nothing_a_fresh_entry_would_not() {
        let config = Config {
            new_categories_per_hour: 3,
            producer_batches_per_sec: 10.0,
            producer_summaries_per_sec: 0.0,
            max_series: 0,
            ..Config::default()
        };
        let a = Admission::new(&config, ProducerKey([0; 32])).expect("admission");
        let now = 1_700_000_000_000;
        let of = |seed: u8| {
            let mut b = batch_of(&["a"], 0);
            b.id.producer = edgetally_proto::Signer::from_seed([seed; 32]).producer();
            b
        };
        let novelty = |categories: u32| Novelty {
            categories,
            entities: 0,
            series: 2 * categories,
        };
        // 1 brought nothing new, 2 a new category (its hour's quota is in use), 3 nothing new
        // but sends again and again (its rate bucket is not full yet).
        for (seed, new, batches) in [(1, 0, 1), (2, 1, 1), (3, 0, 15)] {
            for _ in 0..batches {
                let (_, r) = a
                    .charge(&of(seed), 0, now, None, || novelty(new), || true)
                    .expect("admitted");
                if let Some(r) = r {
                    a.settle(r, novelty(new));
                }
            }
        }
        assert_eq!(a.tracked().0, 3);
        a.upkeep(now + 100, true);
        assert_eq!(
            a.tracked().0,
            2,
            "only the producer that holds nothing goes"
        );
        // The used quota is still there: 2 more categories fit, a third does not.
        for n in 0..2 {
            let (_, r) = a
                .charge(&of(2), 0, now + 200 + n, None, || novelty(1), || true)
                .expect("within the quota");
            a.settle(r.expect("reserved"), novelty(1));
        }
        assert_eq!(
            a.charge(&of(2), 0, now + 300, None, || novelty(1), || true),
            Err(Err(RejectCode::CategoryQuota))
        );
        // Once its bucket has refilled, 3 goes too; 2 stays until its hour is over.
        a.upkeep(now + 10_000, true);
        assert_eq!(a.tracked().0, 1);
        a.upkeep(now + 3_600_000, true);
        assert_eq!(a.tracked().0, 0);
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let m: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(source_key(m), "10.0.0.1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn allowlists_parse_keys_and_comments_and_name_bad_lines() {
        let k = "ab".repeat(32);
        let set = parse_allowlist(&format!("# site A\n{k}  # laptop\n\n")).expect("parse");
        assert_eq!(set.len(), 1);
        assert!(parse_allowlist("zz\n").unwrap_err().contains("line 1"));
    }
}
