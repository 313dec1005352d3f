//! An agent's claim to front a node by the node's own peer id: checked
//! through the agent's tunnel (the node must prove the id in its security
//! handshake) before circuits to that id go to the agent.

use libp2p::PeerId;
use relaygate_common::protocol::{ControlMessage, NodeClaim};
use tokio_util::sync::CancellationToken;

use super::Sessions;
use crate::nodes::{self, Fronted};

impl Sessions {
    /// Checks one node claim of session `id` through its tunnel and, when
    /// the node proves the id, records that this agent fronts it.
    pub(super) async fn check_claim(
        &self,
        peer: PeerId,
        id: u64,
        claim: NodeClaim,
        session: &CancellationToken,
    ) -> ControlMessage {
        let verdict = |accepted: bool, reason: String| ControlMessage::NodeVerdict {
            tunnel: claim.tunnel.clone(),
            node: claim.node.clone(),
            accepted,
            reason,
        };
        let Ok(node) = claim.node.parse::<PeerId>() else {
            self.metrics.bad_input("node_claim");
            return verdict(false, "not a peer id".into());
        };
        let Some((connection, port)) = self.registry.tunnel(&peer, id, &claim.tunnel) else {
            return verdict(false, format!("no tunnel {} in this session", claim.tunnel));
        };
        if let Some(held) = self.nodes.get(&node).filter(|h| h.agent != peer) {
            self.metrics.refuse("node_fronted_elsewhere");
            return verdict(false, format!("node {node} is fronted by agent {} (the gateway's operator can clear it: DELETE /v1/nodes?node={node})", held.agent));
        }
        if let Err(why) = nodes::check(
            &self.dataplane,
            (peer, connection),
            &claim.tunnel,
            port,
            node,
        )
        .await
        {
            self.metrics.refuse("node_claim_unproven");
            tracing::warn!(%peer, tunnel = %claim.tunnel, %node, %why, "node claim refused");
            return verdict(false, why);
        }
        let fronted = Fronted {
            agent: peer,
            tunnel: claim.tunnel.clone(),
            port,
            session: id,
            since: relaygate_common::clock::unix_now(),
        };
        match self.nodes.claim(node, fronted) {
            Err(other) => {
                self.metrics.refuse("node_fronted_elsewhere");
                verdict(false, format!("node {node} is fronted by agent {other}"))
            }
            Ok(()) if session.is_cancelled() => {
                self.nodes.release(&peer, id);
                verdict(false, "the session ended".into())
            }
            Ok(()) => {
                tracing::info!(%peer, tunnel = %claim.tunnel, %node, "node checked: circuits to it go to this agent");
                verdict(true, String::new())
            }
        }
    }
}
