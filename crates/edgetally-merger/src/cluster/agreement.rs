//! Versions agree in-band: every second a node asks every node of its topology for its
//! version (adopting a newer one, handing an older node its own), then asks the groups an
//! earlier map gave its producers for their hand-offs.

use super::*;

impl Cluster {
    /// One round of versions and hand-offs: asks every other node of the topology for its
    /// topology (adopting a newer one, handing an older node this one), then asks every
    /// replica of each group whose hand-off is pending to hand over.
    pub async fn versions_round(self: &Arc<Self>, me: std::net::SocketAddr) {
        let t = self.topology();
        let addrs: Vec<String> = t
            .all_groups()
            .iter()
            .flat_map(|g| g.quic.iter().cloned())
            .filter(|a| {
                crate::config::resolve_addr(a).map_or(true, |sa| {
                    sa != me && !(me.ip().is_unspecified() && sa.port() == me.port())
                })
            })
            .collect();
        let mut asks = tokio::task::JoinSet::new();
        for addr in addrs {
            let c = self.clone();
            asks.spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(2), c.version_of(&addr)).await;
                (addr, r.unwrap_or_else(|_| Err("no answer in time".into())))
            });
        }
        let mut heard = BTreeMap::new();
        while let Some(Ok((addr, r))) = asks.join_next().await {
            match r {
                Ok(v) => {
                    heard.insert(addr, v);
                }
                Err(e) => debug!(%addr, "topology version not heard: {e}"),
            }
        }
        *self.versions.lock().unwrap_or_else(|e| e.into_inner()) = heard;
        self.handoff_round().await;
    }

    /// Asks `addr` for its topology; adopts it if newer, hands it this one if older. The
    /// version `addr` routes by afterwards.
    async fn version_of(&self, addr: &str) -> Result<u64, String> {
        let conn = self.connection_speaking(addr, "topology-agreement").await?;
        let raw = crate::peer::topology(&conn)
            .await
            .inspect_err(|_| self.drop_connection(addr))?;
        let theirs: Topology =
            serde_json::from_slice(&raw).map_err(|e| format!("{addr}: bad topology: {e}"))?;
        let mine = self.topology();
        if theirs.version > mine.version {
            let v = theirs.version;
            match self.install(theirs).await {
                Ok(_) => {
                    self.metrics.adoptions.fetch_add(1, Relaxed);
                    info!(%addr, version = v, "adopted a newer topology from another node");
                }
                Err(e) => warn!(%addr, "a newer topology from another node not adopted: {e}"),
            }
            Ok(v)
        } else if theirs.version < mine.version {
            let json = serde_json::to_vec(&*mine).map_err(|e| e.to_string())?;
            crate::peer::adopt(&conn, json).await.map_err(String::from)
        } else {
            if theirs != *mine {
                let why = format!(
                    "{addr} routes by another topology of version {}",
                    mine.version
                );
                warn!("{why}: write the change with a higher version");
                *self.conflict.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
            Ok(theirs.version)
        }
    }

    /// Asks every replica of each group whose hand-off is pending to hand over at the version
    /// in force; records a group's hand-off once all its replicas answered at that version.
    async fn handoff_round(&self) {
        let t = self.topology();
        let json = match serde_json::to_vec(&*t) {
            Ok(j) => j,
            Err(_) => return,
        };
        for name in self.handoffs_pending() {
            let Some(g) = t.all_groups().into_iter().find(|g| g.name == name).cloned() else {
                continue;
            };
            let mut seen = Vec::new();
            let mut all = true;
            for addr in &g.quic {
                let r = async {
                    let conn = self.connection_speaking(addr, "handoffs").await?;
                    tokio::time::timeout(FORWARD_TIMEOUT, async {
                        Ok::<_, String>(
                            crate::peer::handoff(&conn, json.clone(), &self.group).await?,
                        )
                    })
                    .await
                    .map_err(|_| "no hand-off in time".to_string())?
                }
                .await;
                match r {
                    Ok(reply) if reply.version == t.version => seen.extend(reply.seen),
                    Ok(reply) => {
                        debug!(group = %name, %addr, version = reply.version, "hand-off at another version");
                        all = false;
                    }
                    Err(e) => {
                        debug!(group = %name, %addr, "hand-off not answered: {e}");
                        self.drop_connection(addr);
                        all = false;
                    }
                }
            }
            if !all {
                continue;
            }
            let mut h = self
                .handoffs
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Err(e) = h.add(seen) {
                warn!(group = %name, "hand-off refused: {e}");
                continue;
            }
            h.finish(&name, t.version);
            let bytes = match postcard::to_allocvec(&h) {
                Ok(b) => b,
                Err(_) => continue,
            };
            if let Err(e) = write_durably(&self.dir, HANDOFFS_FILE, &bytes) {
                warn!(group = %name, "keeping a hand-off failed: {e}");
                continue;
            }
            *self.handoffs.write().unwrap_or_else(|e| e.into_inner()) = h;
            info!(group = %name, version = t.version, "hand-off received");
        }
    }
}
