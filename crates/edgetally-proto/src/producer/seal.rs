//! Sealing: pending summaries in canonical order, split within the merger's limits, encoded
//! and signed (or queued for an external signer), into the outbox.

use super::*;

impl Producer {
    /// Seals everything pending into batches (canonical, within the limits) and queues them.
    pub fn seal(&mut self, now_ms: i64) {
        self.seal_within(now_ms, self.config.max_batch_bytes);
    }

    /// Seals everything pending into batches of at most about `max_bytes` each (the
    /// per-key estimate bounds the encoding from above): a page being left seals into
    /// batches that fit the browser's 64 KiB keepalive budget.
    pub fn seal_within(&mut self, now_ms: i64, max_bytes: usize) {
        for h in std::mem::take(&mut self.active) {
            if let Some(cur) = self.handles[h as usize].current.take() {
                self.closed.push((h, cur.bucket, cur.summary, cur.sketches));
            }
        }
        if self.closed.is_empty() {
            return;
        }
        let mut entries = std::mem::take(&mut self.closed);
        small_sort::sort_by_key(&mut entries, |e| (e.0, e.1));
        while !entries.is_empty() {
            // Merge repeats of a key (a handle that went back to an earlier bucket). A repeat
            // with sketches is sealed in a batch of its own instead (the merger merges them):
            // the producer then carries no sketch merge — the browser's module is sized.
            let mut merged: Vec<Closed> = Vec::with_capacity(entries.len());
            let mut later: Vec<Closed> = Vec::new();
            for (h, b, s, k) in entries {
                if let Some((h2, b2, s2, k2)) = merged.last_mut() {
                    if *h2 == h && *b2 == b {
                        // A key's summaries cannot overflow in practice (2^64 records); if
                        // they did, the second part would be refused as a duplicate key
                        // rather than wrapped.
                        if k.is_none() && k2.is_none() && s2.merge(&s).is_ok() {
                            continue;
                        }
                        if k.is_some() || k2.is_some() {
                            later.push((h, b, s, k));
                            continue;
                        }
                    }
                }
                merged.push((h, b, s, k));
            }
            self.seal_chunks(now_ms, max_bytes, merged);
            entries = later;
        }
        self.stats.pending = 0;
        self.pending_bytes = 0;
        self.first_pending_ms = None;
    }

    /// Seals entries with distinct keys, sorted, into batches within the limits.
    fn seal_chunks(&mut self, now_ms: i64, max_bytes: usize, merged: Vec<Closed>) {
        let max = self
            .config
            .max_batch_summaries
            .min(self.config.limits.max_summaries)
            .max(1);
        let mut chunks: Vec<Vec<Closed>> = Vec::new();
        let mut bytes = 0;
        for e in merged {
            let size = self.entry_bytes(&e);
            match chunks.last_mut() {
                Some(c) if c.len() < max && bytes + size <= max_bytes => {
                    bytes += size;
                    c.push(e);
                }
                _ => {
                    bytes = size;
                    chunks.push(vec![e]);
                }
            }
        }
        for chunk in chunks {
            for part in self.split_by_names(chunk) {
                self.seal_one(now_ms, part);
            }
        }
    }

    /// Splits a chunk so no batch exceeds the distinct category or entity limits.
    pub(super) fn split_by_names(&self, chunk: Vec<Closed>) -> Vec<Vec<Closed>> {
        let (mc, me) = (
            self.config.limits.max_categories.max(1),
            self.config.limits.max_entities.max(1),
        );
        let mut parts = Vec::new();
        let mut cur = Vec::new();
        let mut cats: rustc_hash::FxHashSet<&str> = Default::default();
        let mut ents: rustc_hash::FxHashSet<&str> = Default::default();
        for e in chunk {
            let st = &self.handles[e.0 as usize];
            let new_cat = !cats.contains(&*st.category);
            let new_ent = st.entity.as_deref().is_some_and(|x| !ents.contains(x));
            if (new_cat && cats.len() >= mc) || (new_ent && ents.len() >= me) {
                parts.push(std::mem::take(&mut cur));
                cats.clear();
                ents.clear();
            }
            cats.insert(&st.category);
            if let Some(x) = st.entity.as_deref() {
                ents.insert(x);
            }
            cur.push(e);
        }
        if !cur.is_empty() {
            parts.push(cur);
        }
        parts
    }

    pub(super) fn seal_one(&mut self, now_ms: i64, entries: Vec<Closed>) {
        // Every record counted in exactly one summary: the batch holds this many.
        let records: u64 = entries.iter().map(|e| e.2.count).sum();
        // Canonical form: strings sorted, summaries in key order.
        let mut names: Vec<&str> = Vec::new();
        for (h, _, _, _) in &entries {
            let st = &self.handles[*h as usize];
            names.push(&st.category);
            if let Some(e) = &st.entity {
                names.push(e);
            }
        }
        small_sort::sort_by_key(&mut names, |s| *s);
        names.dedup();
        let index = |s: &str| names.binary_search(&s).map_or(0, |i| i as u32);
        let mut keyed: Vec<(BatchSummary, Option<Box<Sketches>>)> = entries
            .into_iter()
            .map(|(h, b, s, k)| {
                let st = &self.handles[h as usize];
                let summary = BatchSummary {
                    category: index(&st.category),
                    entity: st.entity.as_deref().map_or(NO_ENTITY, |e| index(e) + 1),
                    bucket: b,
                    summary: s,
                };
                (summary, k)
            })
            .collect();
        small_sort::sort_by_key(&mut keyed, |(s, _)| (s.category, s.entity, s.bucket));
        let (summaries, sketches) = unzip_sketches(keyed);
        let strings: StringTable = names.iter().collect();
        let seq = self.next_seq;
        let batch = Batch {
            id: BatchId {
                producer: self.key,
                epoch: self.epoch,
                seq,
            },
            created_ms: now_ms,
            bucket_ms: self.config.bucket_ms,
            strings,
            summaries,
            sketches,
        };
        let Ok(mut bytes) = envelope::seal_unsigned(&batch) else {
            return;
        };
        if let Some(sign) = &self.sign {
            let Some(m) = envelope::signing_message(&bytes) else {
                return;
            };
            envelope::set_signature(&mut bytes, &sign(&m));
        }
        self.next_seq += 1;
        self.persist_op(PersistOp::Identity {
            epoch: self.epoch,
            next_seq: self.next_seq,
        });
        let bytes: Arc<[u8]> = bytes.into();
        self.make_room(bytes.len());
        if self.stats.outbox_bytes as usize + bytes.len() > self.config.max_outbox_bytes {
            // Everything left is in flight: the new batch is the one that cannot fit.
            self.stats.dropped += 1;
            self.stats.dropped_records = self.stats.dropped_records.saturating_add(records);
            return;
        }
        self.stats.outbox_bytes += bytes.len() as u64;
        self.persist_op(PersistOp::Put {
            seq,
            bytes: bytes.clone(),
        });
        self.outbox
            .insert(seq, Outgoing::new(bytes, records, &self.config.limits));
    }

    /// Drops the oldest batches not in flight until `incoming` more bytes fit.
    pub(super) fn make_room(&mut self, incoming: usize) {
        while self.stats.outbox_bytes as usize + incoming > self.config.max_outbox_bytes {
            if self.drop_oldest(u64::MAX).is_none() {
                return;
            }
        }
    }
}

/// Summaries in key order and, apart, the sketches of those that have any (by index).
fn unzip_sketches(
    keyed: Vec<(BatchSummary, Option<Box<Sketches>>)>,
) -> (Vec<BatchSummary>, Vec<(u32, Sketches)>) {
    let mut sketches = Vec::new();
    let mut summaries = Vec::with_capacity(keyed.len());
    for (i, (s, k)) in keyed.into_iter().enumerate() {
        if let Some(k) = k.filter(|k| !k.is_empty()) {
            sketches.push((i as u32, *k));
        }
        summaries.push(s);
    }
    (summaries, sketches)
}
