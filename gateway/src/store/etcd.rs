//! Leases in etcd, shared by every gateway of a fleet. Two keys per lease
//! under `store.etcd.prefix`: `leases/<agent>/<tunnel>` holds the port, and
//! `ports/<port>` holds `<agent>/<tunnel>`. A claim reads both and writes
//! both in one transaction that holds only if neither changed since (their
//! revisions are compared), retried a few times under contention: two
//! gateways never give one port to two tunnels. A third,
//! `active/<agent>/<tunnel>`, holds when the lease was last in use by a
//! session (milliseconds since the UNIX epoch), written by whichever
//! gateway holds the agent, so every gateway judges expiry alike.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    TlsOptions, Txn, TxnOp,
};
use relaygate_common::names::LeasePort;
use tokio::runtime::Handle;

use super::{Claim, Lease, LeaseKey, LeaseStore, StoreError};
use crate::config::store::EtcdConfig;

/// Attempts of one claim when other gateways change the same keys meanwhile.
const CLAIM_ATTEMPTS: usize = 8;
/// Between attempts of a request that failed for a transient reason.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Times of last use written in one transaction (etcd allows 128 operations).
const TOUCH_BATCH: usize = 60;

pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
    rt: Handle,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EtcdStore {
    /// Connects to the endpoints.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        Ok(Self::with_client(connect_client(cfg).await?, cfg))
    }

    /// The store on a client the gateway shares with its other etcd work.
    pub fn with_client(client: Client, cfg: &EtcdConfig) -> Self {
        Self {
            client,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            rt: Handle::current(),
        }
    }

    fn lease_key(&self, key: &LeaseKey) -> String {
        format!("{}leases/{key}", self.prefix)
    }

    fn port_key(&self, port: LeasePort) -> String {
        format!("{}ports/{}", self.prefix, port.get())
    }

    fn active_key(&self, key: &LeaseKey) -> String {
        format!("{}active/{key}", self.prefix)
    }

    /// Runs `txn`; whether its comparisons held.
    fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let resp = self.run(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })?;
        Ok(resp.succeeded())
    }

    /// Writes `at` as the last use of each of `keys` that has a lease, in
    /// one transaction; false when one of them has none (any more).
    fn touch_all(&self, keys: &[LeaseKey], at: u64) -> Result<bool, StoreError> {
        let when: Vec<Compare> = keys
            .iter()
            .map(|k| Compare::version(self.lease_key(k), CompareOp::Greater, 0))
            .collect();
        let then: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::put(self.active_key(k), at.to_string(), None))
            .collect();
        self.txn(Txn::new().when(when).and_then(then))
    }

    /// Runs the request `f` makes on the runtime, again after transient
    /// errors (a leader election: "leader changed", a member gone) until
    /// `store.etcd.timeout` has passed.
    fn run<T, Fut>(&self, mut f: impl FnMut(KvClient) -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.rt.block_on(async {
            loop {
                let attempt = tokio::time::timeout_at(deadline, f(self.client.kv_client())).await;
                match attempt {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) if tokio::time::Instant::now() + RETRY_PAUSE < deadline => {
                        tracing::debug!(error = %e, "etcd request failed; trying again");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Ok(Err(e)) => return Err(unavailable(e)),
                    Err(_) => return Err(unavailable("no answer within store.etcd.timeout")),
                }
            }
        })
    }

    /// A key's value and modification revision, if it exists.
    fn read(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let resp = self.run(|mut kv| async move { kv.get(key, None).await })?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Deletes `key` if it still holds `value`.
    fn delete_if(&self, key: String, value: String) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        self.run(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .map(|_| ())
    }
}

/// A client for `cfg`'s endpoints (TLS when a CA is given; user and
/// password file when given), shared by the lease store and the fleet.
pub async fn connect_client(cfg: &EtcdConfig) -> Result<Client, StoreError> {
    if cfg.endpoints.is_empty() {
        return Err(StoreError::Open {
            path: "store.etcd.endpoints".into(),
            message: "no endpoint: list etcd's client URLs (host:2379)".into(),
        });
    }
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StoreError::Open {
            path: p.display().to_string(),
            message: e.to_string(),
        })
    };
    let mut opts = ConnectOptions::new()
        .with_timeout(cfg.timeout)
        .with_connect_timeout(cfg.timeout);
    if let Some(ca) = &cfg.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(tls);
    }
    if let Some(user) = &cfg.user {
        let Some(file) = &cfg.password_file else {
            return Err(StoreError::Open {
                path: "store.etcd.password_file".into(),
                message: "store.etcd.user needs the password in a file".into(),
            });
        };
        let password = String::from_utf8_lossy(&read(file)?).trim().to_string();
        opts = opts.with_user(user.clone(), password);
    }
    tokio::time::timeout(cfg.timeout, Client::connect(&cfg.endpoints, Some(opts)))
        .await
        .map_err(|_| unavailable(format!("no answer from {:?}", cfg.endpoints)))?
        .map_err(|e| unavailable(format!("{:?}: {e}", cfg.endpoints)))
}

/// The compare that holds while `key` is as it was read.
fn unchanged(key: &str, read: &Option<(Vec<u8>, i64)>) -> Compare {
    match read {
        Some((_, rev)) => Compare::mod_revision(key, CompareOp::Equal, *rev),
        None => Compare::version(key, CompareOp::Equal, 0),
    }
}

fn parse_time(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn parse_port(v: &[u8]) -> Result<LeasePort, StoreError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(LeasePort::new)
        .ok_or_else(|| StoreError::Corrupt(format!("bad port {:?}", String::from_utf8_lossy(v))))
}

impl LeaseStore for EtcdStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        let prefix = format!("{}leases/", self.prefix);
        let resp = self.run(|mut kv| {
            let prefix = prefix.clone();
            async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                let key: LeaseKey = k.trim_start_matches(&prefix).parse()?;
                Ok(Lease {
                    key,
                    port: parse_port(kv.value())?,
                })
            })
            .collect()
    }

    fn claim(&self, lease: &Lease, previous: Option<LeasePort>) -> Result<Claim, StoreError> {
        let me = lease.key.to_string();
        let (lk, pk) = (self.lease_key(&lease.key), self.port_key(lease.port));
        for _ in 0..CLAIM_ATTEMPTS {
            let held = self.read(&lk)?;
            let owner = self.read(&pk)?;
            if let Some((v, _)) = &held {
                let current = parse_port(v)?;
                if current != lease.port && Some(current) != previous {
                    return Ok(Claim::Existing(current));
                }
            }
            if let Some((v, _)) = &owner {
                let holder = String::from_utf8_lossy(v);
                if holder != me {
                    return Ok(Claim::Held(holder.parse()?));
                }
            }
            let txn = Txn::new()
                .when([unchanged(&lk, &held), unchanged(&pk, &owner)])
                .and_then([
                    TxnOp::put(lk.clone(), lease.port.get().to_string(), None),
                    TxnOp::put(pk.clone(), me.clone(), None),
                ]);
            let done = self.run(|mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })?;
            if done.succeeded() {
                // The port it moved from, if still its own, is free again.
                if let Some(prev) = previous.filter(|p| *p != lease.port) {
                    self.delete_if(self.port_key(prev), me)?;
                }
                return Ok(Claim::Granted);
            }
        }
        Err(unavailable(
            "the lease's keys kept changing under other gateways; try again",
        ))
    }

    fn holder(&self, port: LeasePort) -> Result<Option<LeaseKey>, StoreError> {
        self.read(&self.port_key(port))?
            .map(|(v, _)| String::from_utf8_lossy(&v).parse())
            .transpose()
    }

    fn remove(&self, key: &LeaseKey) -> Result<(), StoreError> {
        let lk = self.lease_key(key);
        if let Some((v, _)) = self.read(&lk)? {
            let port = parse_port(&v)?;
            self.delete_if(lk, port.get().to_string())?;
            self.delete_if(self.port_key(port), key.to_string())?;
        }
        let ak = self.active_key(key);
        self.run(|mut kv| {
            let ak = ak.clone();
            async move { kv.delete(ak, None).await }
        })?;
        Ok(())
    }

    fn touch(&self, keys: &[LeaseKey], at: u64) -> Result<(), StoreError> {
        for batch in keys.chunks(TOUCH_BATCH) {
            // A lease removed meanwhile fails the batch: then key by key,
            // so the others are still written and the removed one is not
            // brought back.
            if !self.touch_all(batch, at)? {
                for k in batch {
                    self.touch_all(std::slice::from_ref(k), at)?;
                }
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Vec<(Lease, Option<u64>)>, StoreError> {
        let prefix = format!("{}active/", self.prefix);
        let resp = self.run(|mut kv| {
            let prefix = prefix.clone();
            async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })?;
        let times: std::collections::HashMap<String, u64> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                let key = k.strip_prefix(&prefix)?.to_string();
                Some((key, parse_time(kv.value())?))
            })
            .collect();
        Ok(self
            .load()?
            .into_iter()
            .map(|l| {
                let at = times.get(&l.key.to_string()).copied();
                (l, at)
            })
            .collect())
    }

    fn expire(&self, key: &LeaseKey, seen: Option<u64>) -> Result<bool, StoreError> {
        let (lk, ak) = (self.lease_key(key), self.active_key(key));
        let Some((v, rev)) = self.read(&lk)? else {
            return Ok(true);
        };
        let port = parse_port(&v)?;
        let used = match seen {
            Some(at) => Compare::value(ak.clone(), CompareOp::Equal, at.to_string()),
            None => Compare::version(ak.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(lk.clone(), CompareOp::Equal, rev),
                used,
            ])
            .and_then([TxnOp::delete(lk, None), TxnOp::delete(ak, None)]);
        if !self.txn(txn)? {
            return Ok(false);
        }
        self.delete_if(self.port_key(port), key.to_string())?;
        Ok(true)
    }

    fn port_of(&self, key: &LeaseKey) -> Result<Option<LeasePort>, StoreError> {
        self.read(&self.lease_key(key))?
            .map(|(v, _)| parse_port(&v))
            .transpose()
    }
}
