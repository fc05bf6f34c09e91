//! Talking to other groups: connections (cached, by feature), forwarding a producer's batch
//! to its owner group (hedged across its replicas, down ones tried last and probed), drain
//! states and snapshots of other nodes, and gathering every group's part of a query.

use super::*;

impl Cluster {
    /// Asks the node at `addr` where it stands in a drain.
    pub async fn drain_state_of(&self, addr: &str) -> Result<DrainState, String> {
        let conn = self.connection(addr).await?;
        let r = tokio::time::timeout(FORWARD_TIMEOUT, async {
            Ok::<_, String>(crate::peer::drain_state(&conn).await?)
        })
        .await
        .map_err(|_| format!("{addr}: no drain state in time"))?;
        if r.is_err() {
            self.drop_connection(addr);
        }
        r
    }

    /// Fetches the whole state of the node at `addr`.
    pub async fn snapshot_of(&self, addr: &str) -> Result<edgetally_core::Snapshot, String> {
        let conn = self.connection(addr).await?;
        let r = crate::peer::snapshot(&conn).await.map_err(String::from);
        if r.is_err() {
            self.drop_connection(addr);
        }
        r
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, String> {
        Ok(self.connection_keyed(addr).await?.0)
    }

    /// A connection to `addr` if the node there speaks `feature` of the peer protocol
    /// ([`crate::handshake::FEATURES`]); an error naming what it lacks otherwise.
    pub(super) async fn connection_speaking(
        &self,
        addr: &str,
        feature: &str,
    ) -> Result<quinn::Connection, String> {
        let (conn, key) = self.connection_keyed(addr).await?;
        if !self.auth.facts.speaks(&key, feature) {
            return Err(format!(
                "{addr} runs an earlier release without {feature}: upgrade it"
            ));
        }
        Ok(conn)
    }

    /// Whether a group's error (from [`Self::gather_each`]) says its node lacked `feature`.
    pub(crate) fn lacked(error: &str, feature: &str) -> bool {
        error.contains(&format!("an earlier release without {feature}:"))
    }

    async fn connection_keyed(&self, addr: &str) -> Result<(quinn::Connection, [u8; 32]), String> {
        let sa = resolve(addr).await?;
        let cached = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sa)
            .cloned();
        if let Some((c, key)) = cached {
            if c.close_reason().is_none() {
                return Ok((c, key));
            }
        }
        let (conn, key) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            crate::peer::connect(&self.endpoint, sa, &self.auth),
        )
        .await
        .map_err(|_| format!("{addr}: connect timed out"))??;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sa, (conn.clone(), key));
        Ok((conn, key))
    }

    pub(super) fn drop_connection(&self, addr: &str) {
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            self.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sa);
        }
    }

    /// Forwards a producer's batch to `group` and returns the owner's reply; `Retry` if no
    /// replica of it answered (the producer resends, as after any transient fault).
    ///
    /// Replicas known to be down are tried last, and probed again in the background, so that
    /// after a crash is noticed forwards go straight to a live replica. An attempt that has
    /// not answered within [`FORWARD_HEDGE`] (a replica that died with its connection still
    /// open looks like that) is raced by one to the next replica: batches are idempotent by
    /// their id, so sending one twice counts it once.
    pub async fn forward(
        self: &Arc<Self>,
        group: &Group,
        raw: Vec<u8>,
        source: Option<std::net::IpAddr>,
    ) -> Reply {
        let version = self.topology().version;
        let order = self.forward_order(group);
        let raw: Arc<[u8]> = raw.into();
        let mut attempts = tokio::task::JoinSet::new();
        let mut in_flight: Vec<String> = Vec::new();
        let mut next = 0;
        let mut hedge_at = tokio::time::Instant::now();
        loop {
            if next < order.len()
                && (attempts.is_empty() || tokio::time::Instant::now() >= hedge_at)
            {
                let (me, addr, raw) = (self.clone(), order[next].clone(), raw.clone());
                in_flight.push(addr.clone());
                attempts.spawn(async move {
                    let sent = async {
                        let conn = me.connection(&addr).await?;
                        tokio::time::timeout(FORWARD_TIMEOUT, async {
                            Ok::<_, String>(
                                crate::peer::forward(&conn, raw.to_vec(), version, source).await?,
                            )
                        })
                        .await
                        .map_err(|_| "no reply in time".to_string())?
                    }
                    .await;
                    (addr, sent)
                });
                next += 1;
                hedge_at = tokio::time::Instant::now() + FORWARD_HEDGE;
            }
            let more = next < order.len();
            let done = tokio::select! {
                r = attempts.join_next() => r,
                _ = tokio::time::sleep_until(hedge_at), if more => continue,
            };
            match done {
                Some(Ok((addr, Ok(reply)))) => {
                    self.mark_up(&addr);
                    // Replicas raced and beaten by a later one gave no answer within the
                    // hedge delay: a crashed process whose connection still looks open
                    // looks like that. They are tried last until the probe reaches them
                    // on a new connection.
                    for slow in in_flight.iter().filter(|a| **a != addr) {
                        debug!(group = %group.name, addr = %slow, "no reply within the hedge delay");
                        self.metrics.forward_replica_failed.fetch_add(1, Relaxed);
                        self.mark_down(slow);
                    }
                    self.metrics.forwarded_ok.fetch_add(1, Relaxed);
                    return reply;
                }
                Some(Ok((addr, Err(e)))) => {
                    debug!(group = %group.name, %addr, "forward failed: {e}");
                    in_flight.retain(|a| *a != addr);
                    self.metrics.forward_replica_failed.fetch_add(1, Relaxed);
                    self.mark_down(&addr);
                    // The next replica at once, not after the hedge delay.
                    hedge_at = tokio::time::Instant::now();
                }
                Some(Err(_)) => {}
                None if !more => break,
                None => {}
            }
        }
        self.metrics.forward_failed.fetch_add(1, Relaxed);
        Reply::Retry {
            after_ms: crate::ingest::RETRY_AFTER_MS,
        }
    }

    /// The group's replicas in the order a forward tries them: spread over the live ones
    /// (round robin), those known to be down last.
    fn forward_order(&self, group: &Group) -> Vec<String> {
        let n = group.quic.len();
        let start = self.next.fetch_add(1, Relaxed) as usize;
        let rotated = (0..n).map(|i| group.quic[(start + i) % n].clone());
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let (mut live, dead): (Vec<String>, Vec<String>) = rotated.partition(|a| !down.contains(a));
        live.extend(dead);
        live
    }

    /// A replica answered: it is no longer remembered as down.
    fn mark_up(&self, addr: &str) {
        self.down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
    }

    /// A replica failed: remembered as down (forwards try it last) and probed in the
    /// background — connecting anew (a handshake and the peer login), with a backoff from
    /// 500 ms to 30 s — until it answers.
    fn mark_down(self: &Arc<Self>, addr: &str) {
        // The probe, and any forward that still tries it, connect anew: a connection to a
        // crashed process stays open until its idle timeout.
        self.drop_connection(addr);
        let fresh = self
            .down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr.to_string());
        if !fresh {
            return;
        }
        let (me, addr) = (Arc::downgrade(self), addr.to_string());
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(500);
            loop {
                tokio::time::sleep(wait).await;
                let Some(me) = me.upgrade() else { return };
                if !me
                    .down
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&addr)
                {
                    return;
                }
                if me.connection(&addr).await.is_ok() {
                    debug!(%addr, "replica reachable again");
                    me.mark_up(&addr);
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// Replicas of other groups currently remembered as down.
    pub fn replicas_down(&self) -> Vec<String> {
        self.down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// This node's part of `q`, as its group's place in a gathered answer (the groups it
    /// names as absorbed are noted, so they are not asked).
    pub(crate) fn own_part(
        &self,
        node: &crate::node::Node,
        q: &Query,
    ) -> (GroupAnswer, Option<Part>) {
        let mine = node.part(q);
        self.note_absorbed(&mine.absorbed);
        let place = GroupAnswer {
            name: self.group.clone(),
            answered: true,
            complete: mine.complete,
            as_of_ms: Some(mine.as_of_ms),
            absorbed_by: None,
            error: None,
        };
        (place, Some(mine))
    }

    /// Asks every other group for its part of `q`, all at once, each trying its replicas in
    /// turn until the deadline. One entry per group of the topology other than this node's.
    pub async fn gather(self: &Arc<Self>, q: &Query) -> Vec<(GroupAnswer, Option<Part>)> {
        let until = tokio::time::Instant::now() + self.deadline;
        self.gather_each(&|_| Some(q.clone()), None, until).await
    }

    /// Asks every other group `ask` gives a query for its part of it, all at once, each trying
    /// its replicas in turn until the deadline; only replicas that speak `feature`, if given
    /// (one that does not fails that group, with an error saying so); a group that has not
    /// answered by `until` has not answered. One entry per group asked, and one per drained
    /// group not asked because an heir absorbed it.
    // Long by design: the scatter, its deadline and each group's replica fail-over in one
    // place.
    pub async fn gather_each(
        self: &Arc<Self>,
        ask: &(dyn Fn(&str) -> Option<Query> + Sync),
        feature: Option<&'static str>,
        until: tokio::time::Instant,
    ) -> Vec<(GroupAnswer, Option<Part>)> {
        let t = self.topology();
        let mut asks = tokio::task::JoinSet::new();
        let mut skip = self
            .absorbed_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        skip.remove(&self.group);
        let others: Vec<Group> = t
            .all_groups()
            .into_iter()
            .filter(|g| g.name != self.group && !skip.contains(&g.name))
            .cloned()
            .collect();
        let queries: Vec<Option<Query>> = others.iter().map(|g| ask(&g.name)).collect();
        let others: Vec<(Group, Query)> = others
            .into_iter()
            .zip(queries)
            .filter_map(|(g, q)| Some((g, q?)))
            .collect();
        for (i, (g, q)) in others.iter().enumerate() {
            let (me, g, q) = (self.clone(), g.clone(), q.clone());
            asks.spawn(async move {
                let mut last = String::from("no replica");
                for addr in &g.quic {
                    let got = async {
                        let conn = match feature {
                            Some(f) => me.connection_speaking(addr, f).await?,
                            None => me.connection(addr).await?,
                        };
                        Ok::<_, String>(crate::peer::query(&conn, &q).await?)
                    }
                    .await;
                    match got {
                        Ok(p) => return (i, Ok(p)),
                        Err(e) => {
                            me.drop_connection(addr);
                            last = format!("{addr}: {e}");
                        }
                    }
                }
                (i, Err(last))
            });
        }
        let mut got: Vec<Option<Result<Part, String>>> = vec![None; others.len()];
        let _ = tokio::time::timeout_at(until, async {
            while let Some(done) = asks.join_next().await {
                if let Ok((i, r)) = done {
                    got[i] = Some(r);
                }
            }
        })
        .await;
        asks.abort_all();
        let mut seen = self.absorbed_seen.lock().unwrap_or_else(|e| e.into_inner());
        for p in got.iter().flatten().flatten() {
            seen.extend(
                p.absorbed
                    .iter()
                    .filter(|g| t.drains.contains_key(*g))
                    .cloned(),
            );
        }
        drop(seen);
        let skipped = skip.into_iter().map(|name| {
            (
                GroupAnswer {
                    name,
                    answered: false,
                    complete: false,
                    as_of_ms: None,
                    absorbed_by: None,
                    error: Some("drained and absorbed; not asked".into()),
                },
                None,
            )
        });
        let mut out: Vec<(GroupAnswer, Option<Part>)> = others
            .into_iter()
            .zip(got)
            .map(|((g, _), r)| match r {
                Some(Ok(p)) => (
                    GroupAnswer {
                        name: g.name,
                        answered: true,
                        complete: p.complete,
                        as_of_ms: Some(p.as_of_ms),
                        absorbed_by: None,
                        error: None,
                    },
                    Some(p),
                ),
                other => {
                    self.metrics.parts_missing.fetch_add(1, Relaxed);
                    let error = match other {
                        Some(Err(e)) => e,
                        _ => "no answer within the deadline".into(),
                    };
                    (
                        GroupAnswer {
                            name: g.name,
                            answered: false,
                            complete: false,
                            as_of_ms: None,
                            absorbed_by: None,
                            error: Some(error),
                        },
                        None,
                    )
                }
            })
            .chain(skipped)
            .collect();
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }
}
