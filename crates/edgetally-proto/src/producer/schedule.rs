//! The transmit schedule: routing by topology, endpoint choice in rendezvous order with
//! failover, what to send and when to wake, and the replies that retire or retry a batch.

use super::*;

impl Producer {
    /// Routes batches by the cluster's shard-group topology (`GET /v1/topology`, or the
    /// file the mergers read): each batch goes first to the endpoints its owner group lists
    /// — the owner under the map in force at the batch's own creation time, as the mergers
    /// compute it ([`crate::topology::Topology::route`]) — in rendezvous order, then to the
    /// others (which forward it). An endpoint belongs to a group when its name is one of the
    /// group's `quic` or `http` addresses. Without a topology (`None`), or when no endpoint
    /// is the owner's, every batch takes the one rendezvous order, and any merger forwards.
    ///
    /// Needs the feature `routing` (on for the native crates; the npm package's wasm module
    /// leaves it off, to keep its bundle small): without it the topology is ignored.
    pub fn set_topology(&mut self, topology: Option<crate::topology::Topology>) {
        // Reduced here, once, to per map and group the endpoints that take the group's
        // batches (its heir's, when drained): what `Topology::route` computes per batch. The
        // hot path (`order_for`) then links none of the topology code into the wasm module.
        self.routes = topology.map_or_else(Vec::new, |t| {
            let all = t.all_groups();
            let authority = |n: &str| {
                let n = n.split_once("://").map_or(n, |(_, r)| r);
                n.split('/').next().unwrap_or(n).to_string()
            };
            let names: Vec<String> = self.names.iter().map(|n| authority(n)).collect();
            t.maps
                .iter()
                .map(|m| MapRoutes {
                    from_ms: m.from_ms,
                    groups: m
                        .groups
                        .iter()
                        .map(|g| {
                            let takes = t
                                .heir(&g.name)
                                .and_then(|h| all.iter().find(|a| a.name == h));
                            let members = takes.map_or_else(Vec::new, |h| {
                                (0..names.len())
                                    .filter(|&i| {
                                        h.quic
                                            .iter()
                                            .chain(&h.http)
                                            .any(|a| authority(a) == names[i])
                                    })
                                    .collect()
                            });
                            (g.name.clone().into_boxed_str(), members)
                        })
                        .collect(),
                })
                .collect()
        });
    }

    /// The endpoint order for a batch created at `created_ms`: the rendezvous order, the
    /// owner group's endpoints first (as `Topology::route`: the map in force at `created_ms`,
    /// the group whose name weighs most, ties to the first listed).
    pub(super) fn order_for(&self, created_ms: i64) -> std::borrow::Cow<'_, [usize]> {
        if !cfg!(feature = "routing") {
            return std::borrow::Cow::Borrowed(&self.order);
        }
        let groups = crate::topology::in_force(&self.routes, |m| m.from_ms, created_ms)
            .map_or(&[][..], |m| &m.groups[..]);
        let owner = crate::topology::heaviest(&self.key, groups.iter().map(|(n, _)| &**n));
        match owner.map(|i| &groups[i].1) {
            Some(members) if !members.is_empty() => {
                let (mut first, rest): (Vec<usize>, Vec<usize>) =
                    self.order.iter().partition(|i| members.contains(i));
                first.extend(rest);
                std::borrow::Cow::Owned(first)
            }
            _ => std::borrow::Cow::Borrowed(&self.order),
        }
    }

    pub(super) fn endpoint(&mut self, now_ms: i64, created_ms: i64) -> usize {
        if let Some(t) = self.failed_over_at {
            if now_ms - t >= self.config.failback_ms {
                self.preferred = 0;
                self.failed_over_at = None;
            }
        }
        let order = self.order_for(created_ms);
        order[self.preferred % order.len()]
    }

    /// Seals what is pending if its flush interval is over, without sending anything (an
    /// offline browser keeps sealing into its stored outbox). Returns when to call again:
    /// the next flush deadline, if anything is pending.
    pub fn poll_seal(&mut self, now_ms: i64) -> Option<i64> {
        if let Some(t) = self.first_pending_ms {
            if now_ms - t >= self.config.flush_interval_ms {
                self.seal(now_ms);
            }
        }
        self.first_pending_ms
            .map(|t| t + self.config.flush_interval_ms)
    }

    /// The next batch to send now, if any (respecting `max_in_flight` and backoff).
    pub fn poll_transmit(&mut self, now_ms: i64) -> Option<Transmit> {
        self.poll_seal(now_ms);
        let in_flight = self.outbox.values().filter(|o| o.in_flight).count();
        if in_flight >= self.config.max_in_flight {
            return None;
        }
        let (seq, created_ms) = self
            .outbox
            .iter()
            .find(|(_, o)| !o.in_flight && !o.unsigned && o.next_try_ms <= now_ms)
            .map(|(s, o)| (*s, o.created_ms))?;
        let endpoint = self.endpoint(now_ms, created_ms);
        let o = self.outbox.get_mut(&seq)?;
        o.in_flight = true;
        o.endpoint = endpoint;
        self.stats.bytes_sent += o.bytes.len() as u64;
        Some(Transmit {
            seq,
            endpoint,
            bytes: o.bytes.clone(),
        })
    }

    /// When the caller should call in again at the latest (a flush deadline, a retry, or a
    /// batch sealed unsigned that [`Producer::poll_sign`] has not handed out yet); a time in
    /// the past (possibly `i64::MIN`) means "now": compare with saturating arithmetic.
    ///
    /// Every state in which the machine has work for its driver is covered here, so a driver
    /// that only sleeps until this deadline never leaves a sealed batch waiting for the
    /// application's next call.
    pub fn poll_timeout(&self) -> Option<i64> {
        let flush = self
            .first_pending_ms
            .map(|t| t + self.config.flush_interval_ms);
        let retry = self
            .outbox
            .values()
            .filter(|o| !o.in_flight && (!o.unsigned || !o.signing))
            .map(|o| o.next_try_ms)
            .min();
        match (flush, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing to persist, if any.
    pub fn poll_persist(&mut self) -> Option<PersistOp> {
        self.persist.pop_front()
    }

    pub(super) fn backoff(&mut self, attempts: u32) -> i64 {
        let cap = self
            .config
            .backoff_base_ms
            .saturating_mul(1i64 << attempts.min(30))
            .min(self.config.backoff_max_ms);
        1 + self.jitter.below(cap)
    }

    /// The merger's reply to batch `seq`.
    pub fn handle_reply(&mut self, now_ms: i64, seq: u64, reply: Reply) {
        match reply {
            Reply::Ack => {
                if let Some(o) = self.remove(seq) {
                    self.stats.acked += 1;
                    self.stats.acked_records = self.stats.acked_records.saturating_add(o.records);
                }
            }
            // A batch of a newer format than v1 refused for its version alone: the node is
            // of an earlier release (a rolling upgrade), not the batch at fault. Kept, and
            // tried at the next endpoint, as after a transport failure.
            Reply::Nack(code)
                if code == RejectCode::UnsupportedVersion as u16
                    && self.outbox.get(&seq).is_some_and(|o| {
                        o.in_flight && o.bytes.first().is_some_and(|&v| v > envelope::VERSION)
                    }) =>
            {
                let endpoint = self.outbox.get(&seq).map_or(0, |o| o.endpoint);
                self.handle_transport_error(now_ms, seq, endpoint);
            }
            Reply::Nack(code) => {
                if let Some(o) = self.remove(seq) {
                    self.stats.rejected.add(
                        RejectCode::from_u16(code).unwrap_or(RejectCode::Malformed),
                        1,
                    );
                    self.stats.rejected_records =
                        self.stats.rejected_records.saturating_add(o.records);
                }
            }
            Reply::Retry { after_ms } => self.retry_later(now_ms, seq, after_ms as i64, false),
        }
    }

    /// Sending batch `seq` failed in transport (connection refused, reset, timed out): retry
    /// it after a backoff on the next endpoint in rendezvous order.
    pub fn handle_transport_error(&mut self, now_ms: i64, seq: u64, endpoint: usize) {
        let created_ms = self.outbox.get(&seq).map_or(i64::MIN, |o| o.created_ms);
        let order = self.order_for(created_ms);
        if order.get(self.preferred % order.len()) == Some(&endpoint) && order.len() > 1 {
            self.preferred = (self.preferred + 1) % self.order.len();
            self.failed_over_at = Some(now_ms);
        }
        self.retry_later(now_ms, seq, 0, true);
    }

    pub(super) fn retry_later(
        &mut self,
        now_ms: i64,
        seq: u64,
        at_least_ms: i64,
        _transport: bool,
    ) {
        let Some(attempts) = self
            .outbox
            .get(&seq)
            .filter(|o| o.in_flight)
            .map(|o| o.attempts)
        else {
            return;
        };
        let delay = self.backoff(attempts).max(at_least_ms);
        if let Some(o) = self.outbox.get_mut(&seq) {
            o.in_flight = false;
            o.attempts += 1;
            o.next_try_ms = now_ms.saturating_add(delay);
            self.stats.retried += 1;
        }
    }

    pub(super) fn remove(&mut self, seq: u64) -> Option<Outgoing> {
        let o = self.outbox.remove(&seq)?;
        self.stats.outbox_bytes -= o.bytes.len() as u64;
        self.persist_op(PersistOp::Remove { seq });
        Some(o)
    }
}
