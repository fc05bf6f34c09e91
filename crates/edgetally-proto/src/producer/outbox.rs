//! The bounded outbox: sealed batches by seq, with their attempts and schedule.

use super::*;

pub(super) struct Outgoing {
    pub(super) bytes: Arc<[u8]>,
    pub(super) records: u64,
    pub(super) attempts: u32,
    pub(super) next_try_ms: i64,
    pub(super) in_flight: bool,
    /// Sealed without its signature (an external signer's producer): not sent until
    /// [`Producer::handle_signature`] puts it in.
    pub(super) unsigned: bool,
    /// Handed out by [`Producer::poll_sign`], signature not yet back.
    pub(super) signing: bool,
    /// Its signed creation time (what the topology routes it by; `i64::MIN` if unreadable).
    pub(super) created_ms: i64,
    /// The endpoint it was last handed out for.
    pub(super) endpoint: usize,
}

impl Outgoing {
    pub(super) fn new(bytes: Arc<[u8]>, records: u64, limits: &edgetally_core::Limits) -> Outgoing {
        Outgoing {
            unsigned: envelope::is_unsigned(&bytes),
            // Read only where batches are routed by a topology (feature `routing`).
            created_ms: if cfg!(feature = "routing") {
                envelope::peek(&bytes, limits).map_or(i64::MIN, |(_, t)| t)
            } else {
                i64::MIN
            },
            bytes,
            records,
            attempts: 0,
            next_try_ms: i64::MIN,
            in_flight: false,
            signing: false,
            endpoint: 0,
        }
    }
}

/// The outbox, in seq order: a `VecDeque` searched by seq. Seqs arrive in increasing order
/// (sealing) and usually leave from the front (acks), so inserts and removals are cheap; a
/// `BTreeMap` would do the same with ~6 KB more wasm (the browser SDK's module is sized).
#[derive(Default)]
pub(super) struct Outbox(pub(super) VecDeque<(u64, Outgoing)>);

impl Outbox {
    pub(super) fn index(&self, seq: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&seq, |e| e.0)
    }

    pub(super) fn contains_key(&self, seq: &u64) -> bool {
        self.index(*seq).is_ok()
    }

    /// Adds a batch under a seq not yet present (an existing one is left as it is).
    pub(super) fn insert(&mut self, seq: u64, o: Outgoing) {
        match self.0.back() {
            Some(&(last, _)) if last >= seq => {
                if let Err(i) = self.index(seq) {
                    self.0.insert(i, (seq, o));
                }
            }
            _ => self.0.push_back((seq, o)),
        }
    }

    pub(super) fn get(&self, seq: &u64) -> Option<&Outgoing> {
        self.index(*seq).ok().map(|i| &self.0[i].1)
    }

    pub(super) fn get_mut(&mut self, seq: &u64) -> Option<&mut Outgoing> {
        self.index(*seq).ok().map(|i| &mut self.0[i].1)
    }

    pub(super) fn remove(&mut self, seq: &u64) -> Option<Outgoing> {
        let i = self.index(*seq).ok()?;
        self.0.remove(i).map(|e| e.1)
    }

    /// Whether any batch has a seq below `token`.
    pub(super) fn any_below(&self, token: u64) -> bool {
        self.0.front().is_some_and(|e| e.0 < token)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Outgoing)> {
        self.0.iter().map(|(s, o)| (s, o))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Outgoing> {
        self.0.iter().map(|e| &e.1)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Outgoing> {
        self.0.iter_mut().map(|e| &mut e.1)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
