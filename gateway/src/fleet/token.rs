//! One join token for the whole fleet: an agent admitted by one gateway
//! holds sessions with the others too. `token` under `store.etcd.prefix`
//! holds it; the first gateway to start puts its own, the others adopt it
//! (and keep it in their token file, so `relaygate-gateway token` prints the
//! one in force). A token given inline (`admission.token`) stays the
//! gateway's own and is only published when none is.

use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use relaygate_common::names::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read or publish the fleet's join token in etcd: {0}; fix: check store.etcd (endpoints, TLS, user)")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd holds no usable join token at {0}")]
    Missing(String),
    #[error("cannot keep the fleet's join token in {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Publishes `mine` unless the fleet has a token; returns the fleet's.
pub async fn fleet_token(
    client: &mut Client,
    prefix: &str,
    mine: &Secret,
) -> Result<Secret, TokenError> {
    let key = format!("{prefix}token");
    let txn = Txn::new()
        .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), mine.expose(), None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        return Ok(mine.clone());
    }
    for op in resp.op_responses() {
        if let etcd_client::TxnOpResponse::Get(g) = op {
            if let Some(v) = g.kvs().first().and_then(|kv| kv.value_str().ok()) {
                if !v.trim().is_empty() {
                    return Ok(Secret::new(v.trim()));
                }
            }
        }
    }
    Err(TokenError::Missing(key))
}

/// Rewrites the token file (0600) with the fleet's token.
pub fn keep(path: &Path, token: &Secret) -> Result<(), TokenError> {
    relaygate_common::files::write_atomic(path, format!("{}\n", token.expose()).as_bytes(), 0o600)
        .map_err(|source| TokenError::Write {
            path: path.display().to_string(),
            source,
        })
}
