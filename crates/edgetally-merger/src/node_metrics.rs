//! `/metrics`: the node's values for every family of the registry
//! ([`crate::metrics::FAMILIES`]): the counters of [`crate::metrics::Metrics`], then what is
//! read from the state, admission, the shard-group layer and the peer links.

use crate::metrics::Exposition;
use crate::node::Node;
use edgetally_net::now_ms;
use std::sync::atomic::Ordering::Relaxed;

impl Node {
    /// The Prometheus text exposition of this node.
    pub fn metrics_text(&self) -> String {
        let mut x = Exposition::default();
        self.metrics.write(&mut x);
        self.write_state(&mut x);
        self.write_admission(&mut x);
        self.write_cluster(&mut x);
        self.write_peers(&mut x);
        x.finish()
    }

    fn write_state(&self, x: &mut Exposition) {
        let (entries, epochs, series, memory) = {
            let r = self.state();
            (
                r.entry_count(),
                r.epoch_count(),
                r.series_count(),
                r.memory(),
            )
        };
        for (name, v) in [
            ("edgetally_series", series as f64),
            ("edgetally_tier_entries", entries as f64),
            ("edgetally_producer_epochs", epochs as f64),
            (
                "edgetally_stored_batches",
                self.store.batch_count().unwrap_or(0) as f64,
            ),
            ("edgetally_quarantined_batches", self.quarantined as f64),
            ("edgetally_log_torn_bytes", self.store.torn_tails().1 as f64),
            (
                "edgetally_uptime_seconds",
                self.started.elapsed().as_secs_f64(),
            ),
        ] {
            x.family(name).value(v);
        }
        x.family("edgetally_memory_bytes");
        for (kind, v) in memory
            .by_kind()
            .into_iter()
            .chain([("admission", self.admission.memory_bytes())])
        {
            x.labelled(&[("kind", kind)], v as f64);
        }
    }

    fn write_admission(&self, x: &mut Exposition) {
        let adm = &self.admission;
        let st = &adm.stats;
        let (tracked_producers, tracked_sources) = adm.tracked();
        for (name, v) in [
            ("edgetally_admission_allowlist_keys", adm.allowlist_len()),
            ("edgetally_admission_enrolled_producers", adm.enrolled_len()),
            ("edgetally_admission_tracked_producers", tracked_producers),
            ("edgetally_admission_tracked_sources", tracked_sources),
        ] {
            x.family(name).value(v as f64);
        }
        x.family("edgetally_throttled_total")
            .labelled(
                &[("scope", "producer")],
                st.throttled_producer.load(Relaxed) as f64,
            )
            .labelled(
                &[("scope", "source")],
                st.throttled_source.load(Relaxed) as f64,
            );
        x.family("edgetally_credentials_total")
            .labelled(
                &[("result", "accepted")],
                st.credentials_accepted.load(Relaxed) as f64,
            )
            .labelled(
                &[("result", "refused")],
                st.credentials_refused.load(Relaxed) as f64,
            );
        x.family("edgetally_allowlist_load_errors_total")
            .value(st.allowlist_errors.load(Relaxed) as f64);
    }

    fn write_cluster(&self, x: &mut Exposition) {
        let Some(c) = &self.cluster else {
            return;
        };
        let m = &c.metrics;
        x.family("edgetally_forwarded_total");
        for (outcome, v) in [
            ("sent", &m.forwarded_ok),
            ("failed", &m.forward_failed),
            ("received", &m.received_forwarded),
        ] {
            x.labelled(&[("outcome", outcome)], v.load(Relaxed) as f64);
        }
        x.family("edgetally_topology_reloads_total");
        for (result, v) in [
            ("applied", &m.reloads),
            ("refused", &m.reloads_refused),
            ("past_reroute", &m.past_reroutes),
        ] {
            x.labelled(&[("result", result)], v.load(Relaxed) as f64);
        }
        for (name, v) in [
            (
                "edgetally_forward_replica_failures_total",
                m.forward_replica_failed.load(Relaxed) as f64,
            ),
            (
                "edgetally_forward_replicas_down",
                c.replicas_down().len() as f64,
            ),
            ("edgetally_topology_version", c.topology().version as f64),
            (
                "edgetally_topology_adoptions_total",
                m.adoptions.load(Relaxed) as f64,
            ),
            (
                "edgetally_handoffs_pending",
                c.handoffs_pending().len() as f64,
            ),
            (
                "edgetally_applied_elsewhere_total",
                m.applied_elsewhere.load(Relaxed) as f64,
            ),
            (
                "edgetally_topology_settled",
                f64::from(u8::from(c.settled())),
            ),
            (
                "edgetally_query_parts_missing_total",
                m.parts_missing.load(Relaxed) as f64,
            ),
        ] {
            x.family(name).value(v);
        }
    }

    fn write_peers(&self, x: &mut Exposition) {
        let Some(repl) = &self.replication else {
            return;
        };
        let now = now_ms();
        // The peers' status before the replica's read lock (lock order: peer sync, replica).
        let (status, links) = {
            let sync = repl.sync();
            (sync.status(now), sync.link_counters())
        };
        let r = self.state();
        for name in [
            "edgetally_peer_reachable",
            "edgetally_peer_lag_batches",
            "edgetally_peer_lag_seconds",
            "edgetally_peer_digest_batches",
        ] {
            x.family(name);
            for (addr, p) in &status {
                let v = match name {
                    "edgetally_peer_reachable" => f64::from(u8::from(p.reachable)),
                    "edgetally_peer_lag_batches" => r.lag_of(&addr.to_string()).unwrap_or(0) as f64,
                    "edgetally_peer_lag_seconds" if p.last_sync_ms > 0 => {
                        (now - p.last_sync_ms) as f64 / 1000.0
                    }
                    "edgetally_peer_lag_seconds" => f64::NAN,
                    _ => p.digest_batches as f64,
                };
                x.labelled(&[("peer", &addr.to_string())], v);
            }
        }
        x.family("edgetally_peer_pushes_dropped_total")
            .value(links.pushes_dropped as f64);
        x.family("edgetally_peer_pushes_timed_out_total")
            .value(links.pushes_timed_out as f64);
    }
}
