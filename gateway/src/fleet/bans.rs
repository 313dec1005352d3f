//! The fleet's ban list in etcd: `bans/<target>` under `store.etcd.prefix`,
//! holding the ban as JSON, under an etcd lease that ends with the ban (a
//! permanent ban has none). Every gateway puts the bans made on it (admin API,
//! automatic, config) and deletes the ones lifted on it, and watches the
//! prefix: a ban made anywhere holds everywhere within a watch round trip,
//! and closes the banned peer's connections there too. While etcd is away
//! each gateway keeps its own list and tries again.

use std::{sync::Arc, time::Duration};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::mpsc;

use crate::{
    guard::{BanChange, BanTarget, BanView, Guard},
    host::HostHandle,
};

/// Wait before watching again after etcd went away.
const RETRY: Duration = Duration::from_secs(1);

pub struct SharedBans {
    client: Client,
    prefix: String,
    /// Changes made here that etcd did not take yet.
    backlog: Vec<BanChange>,
}

impl SharedBans {
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: format!("{prefix}bans/"),
            backlog: Vec::new(),
        }
    }

    /// Shares this gateway's bans and applies everyone's, until the process ends.
    pub async fn run(
        mut self,
        guard: Arc<Guard>,
        host: HostHandle,
        mut outbox: mpsc::UnboundedReceiver<BanChange>,
    ) {
        loop {
            if let Err(e) = self.follow(&guard, &host, &mut outbox).await {
                tracing::warn!(error = %e, "fleet ban list: etcd unreachable; bans hold locally, retrying");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Loads the list, then watches it and publishes local changes, until an
    /// error.
    async fn follow(
        &mut self,
        guard: &Guard,
        host: &HostHandle,
        outbox: &mut mpsc::UnboundedReceiver<BanChange>,
    ) -> Result<(), etcd_client::Error> {
        let listed = self
            .client
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = listed.header().map_or(0, |h| h.revision());
        for kv in listed.kvs() {
            self.apply(guard, host, kv.value()).await;
        }
        // What was made here while etcd was away.
        while let Some(change) = self.backlog.first().cloned() {
            self.publish(change).await?;
            self.backlog.remove(0);
        }
        let (_watcher, mut events) = self
            .client
            .watch(
                self.prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        loop {
            tokio::select! {
                change = outbox.recv() => match change {
                    Some(change) => {
                        if let Err(e) = self.publish(change.clone()).await {
                            self.backlog.push(change);
                            return Err(e);
                        }
                    }
                    None => return Ok(()),
                },
                message = events.message() => {
                    let Some(resp) = message? else {
                        return Ok(()); // the watch ended: start over
                    };
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        match ev.event_type() {
                            EventType::Put => self.apply(guard, host, kv.value()).await,
                            EventType::Delete => {
                                let key = String::from_utf8_lossy(kv.key());
                                if let Ok(target) = key.trim_start_matches(&self.prefix).parse::<BanTarget>() {
                                    if guard.lift_shared(&target) {
                                        tracing::info!(%target, "ban lifted by the fleet");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    async fn apply(&self, guard: &Guard, host: &HostHandle, value: &[u8]) {
        match serde_json::from_slice::<BanView>(value) {
            Ok(view) => {
                let target = view.target.clone();
                if guard.apply_shared(view) {
                    host.close_banned(&[target]).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "fleet ban list: a ban etcd holds is not valid JSON; skipped")
            }
        }
    }

    async fn publish(&mut self, change: BanChange) -> Result<(), etcd_client::Error> {
        match change {
            BanChange::Added(view) => {
                let key = format!("{}{}", self.prefix, view.target);
                let mut opts = None;
                if let Some(expires) = view.expires {
                    let now = relaygate_common::clock::unix_now();
                    let ttl = i64::try_from(expires.saturating_sub(now).max(1)).unwrap_or(i64::MAX);
                    let lease = self.client.lease_grant(ttl, None).await?;
                    opts = Some(PutOptions::new().with_lease(lease.id()));
                }
                let json = serde_json::to_vec(&view).unwrap_or_default();
                self.client.put(key, json, opts).await?;
            }
            BanChange::Lifted(target) => {
                self.client
                    .delete(format!("{}{}", self.prefix, target), None)
                    .await?;
            }
        }
        Ok(())
    }
}
