//! The fleet's ban list in etcd: `bans/<target>` under `store.etcd.prefix`,
//! holding the ban as JSON, under an etcd lease that ends with the ban (a
//! permanent ban has none). Every gateway puts the bans made on it (admin API,
//! automatic, config) and deletes the ones lifted on it, and watches the
//! prefix: a ban made anywhere holds everywhere within a watch round trip,
//! and closes the banned peer's connections there too. While etcd is away
//! each gateway keeps its own list and tries again; what it made meanwhile
//! waits in an [`Outbox`] that holds one change per target.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::Notify;

use crate::{
    guard::{BanChange, BanSink, BanTarget, BanView, Guard},
    host::HostHandle,
};

/// Ban changes made here that etcd has not taken yet: the latest per target,
/// so a gateway cut off from etcd while it bans an attack's sources holds
/// no more than its own ban list, not a queue that grows with every change.
#[derive(Default)]
pub struct Outbox {
    pending: Mutex<HashMap<String, BanChange>>,
    ready: Notify,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BanChange>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything waiting, taken out.
    fn take(&self) -> Vec<BanChange> {
        self.lock().drain().map(|(_, c)| c).collect()
    }

    /// Puts back a change etcd did not take, unless a newer one for its target came meanwhile.
    fn put_back(&self, change: BanChange) {
        self.lock().entry(key_of(&change)).or_insert(change);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BanSink for Outbox {
    fn push(&self, change: BanChange) {
        self.lock().insert(key_of(&change), change);
        self.ready.notify_one();
    }
}

fn key_of(change: &BanChange) -> String {
    match change {
        BanChange::Added(v) => v.target.to_string(),
        BanChange::Lifted(t) => t.to_string(),
    }
}

/// Wait before watching again after etcd went away.
const RETRY: Duration = Duration::from_secs(1);

pub struct SharedBans {
    client: Client,
    prefix: String,
}

impl SharedBans {
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: format!("{prefix}bans/"),
        }
    }

    /// Shares this gateway's bans and applies everyone's, until the process ends.
    pub async fn run(mut self, guard: Arc<Guard>, host: HostHandle, outbox: Arc<Outbox>) {
        loop {
            if let Err(e) = self.follow(&guard, &host, &outbox).await {
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
        outbox: &Outbox,
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
        self.flush(outbox).await?;
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
                () = outbox.ready.notified() => self.flush(outbox).await?,
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

    /// Publishes what waits; what etcd did not take goes back.
    async fn flush(&mut self, outbox: &Outbox) -> Result<(), etcd_client::Error> {
        let mut changes = outbox.take().into_iter();
        while let Some(change) = changes.next() {
            if let Err(e) = self.publish(change.clone()).await {
                for c in std::iter::once(change).chain(changes) {
                    outbox.put_back(c);
                }
                return Err(e);
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::BanSource;

    fn added(target: &BanTarget) -> BanChange {
        BanChange::Added(BanView {
            target: target.clone(),
            reason: "test".into(),
            source: BanSource::Automatic,
            expires: None,
        })
    }

    #[test]
    fn the_outbox_holds_the_latest_change_per_target() {
        let o = Outbox::default();
        let sources: Vec<BanTarget> = (0..50)
            .map(|i| format!("198.51.100.{i}").parse().expect("a target"))
            .collect();
        // Banned and lifted over and over while etcd is away.
        for _ in 0..200 {
            for t in &sources {
                o.push(added(t));
                o.push(BanChange::Lifted(t.clone()));
            }
        }
        assert_eq!(o.len(), sources.len());
        let taken = o.take();
        assert!(taken.iter().all(|c| matches!(c, BanChange::Lifted(_))));
        assert!(o.is_empty());
        // A change etcd refused goes back only if nothing newer came meanwhile.
        o.push(added(&sources[0]));
        o.put_back(BanChange::Lifted(sources[0].clone()));
        o.put_back(BanChange::Lifted(sources[1].clone()));
        let mut back = o.take();
        back.sort_by_key(key_of);
        assert_eq!(
            back,
            vec![added(&sources[0]), BanChange::Lifted(sources[1].clone())]
        );
    }
}
