//! An agent keeps more than one lane so that sealing and opening, one task per
//! lane on each side, spread over the gateway's and the agent's cores. Each
//! lane has a slot number, sent as the TLS server name: a lane the agent
//! redials replaces the one in its slot at once, instead of a dead one
//! lingering until its keep-alive runs out. The name also says which flow
//! control the agent speaks (`lane3.flow2.relaygate`; a name without it is
//! an agent from before window tuning).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{LaneError, LaneFlow};

/// Most lanes one agent keeps to one gateway.
pub const MAX_LANES: u8 = 8;

// A slot's server name has one digit.
const _: () = assert!(MAX_LANES <= 10);

const NAME_PREFIX: &str = "lane";
const NAME_SUFFIX: &str = ".relaygate";
const TUNED_MARK: &str = ".flow2";

/// How many lanes an agent keeps (agent), or takes from one agent (gateway):
/// 1 to [`MAX_LANES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct LaneCount(u8);

impl LaneCount {
    pub const ONE: LaneCount = LaneCount(1);

    pub const fn new(n: u8) -> Option<LaneCount> {
        if n >= 1 && n <= MAX_LANES {
            Some(LaneCount(n))
        } else {
            None
        }
    }

    pub const fn get(self) -> u8 {
        self.0
    }

    /// `n` brought into 1 to [`MAX_LANES`].
    pub fn clamped(n: u8) -> LaneCount {
        LaneCount(n.clamp(1, MAX_LANES))
    }

    /// The slots of this many lanes: 0, 1, ...
    pub fn slots(self) -> impl Iterator<Item = LaneSlot> {
        (0..self.0).map(LaneSlot)
    }

    /// Whether `slot` is one of this many lanes.
    pub fn holds(self, slot: LaneSlot) -> bool {
        slot.0 < self.0
    }
}

impl TryFrom<u8> for LaneCount {
    type Error = String;

    fn try_from(n: u8) -> Result<Self, String> {
        LaneCount::new(n).ok_or_else(|| format!("lanes must be 1 to {MAX_LANES}, not {n}"))
    }
}

impl From<LaneCount> for u8 {
    fn from(c: LaneCount) -> u8 {
        c.0
    }
}

impl fmt::Display for LaneCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which of an agent's lanes a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneSlot(u8);

impl LaneSlot {
    /// A lane that names no slot (an agent from before slots) is the first.
    pub const FIRST: LaneSlot = LaneSlot(0);

    /// The TLS server name the agent sends for this slot, speaking `flow`.
    pub fn server_name(self, flow: LaneFlow) -> String {
        let mark = match flow {
            LaneFlow::Fixed => "",
            LaneFlow::Tuned => TUNED_MARK,
        };
        format!("{NAME_PREFIX}{}{mark}{NAME_SUFFIX}", self.0)
    }

    /// The slot a TLS server name names, and the flow control the agent
    /// speaks; none named is the first slot of an agent from before both.
    pub fn from_server_name(name: Option<&str>) -> Result<(LaneSlot, LaneFlow), LaneError> {
        let Some(name) = name else {
            return Ok((LaneSlot::FIRST, LaneFlow::Fixed));
        };
        let rest = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|r| r.strip_suffix(NAME_SUFFIX));
        let (n, flow) = match rest.and_then(|r| r.strip_suffix(TUNED_MARK)) {
            Some(n) => (Some(n), LaneFlow::Tuned),
            None => (rest, LaneFlow::Fixed),
        };
        n.filter(|n| n.len() == 1)
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|n| *n < MAX_LANES)
            .map(|n| (LaneSlot(n), flow))
            .ok_or_else(|| LaneError::Handshake("the TLS server name names no lane slot".into()))
    }
}

impl fmt::Display for LaneSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_travel_as_server_names_and_strange_names_are_refused() {
        let all = LaneCount::try_from(MAX_LANES).unwrap();
        for slot in all.slots() {
            for flow in [LaneFlow::Fixed, LaneFlow::Tuned] {
                let name = slot.server_name(flow);
                assert_eq!(
                    LaneSlot::from_server_name(Some(&name)).unwrap(),
                    (slot, flow)
                );
            }
        }
        assert_eq!(
            LaneSlot::from_server_name(Some("lane3.relaygate")).unwrap(),
            (LaneSlot(3), LaneFlow::Fixed),
            "an agent from before window tuning"
        );
        assert_eq!(
            LaneSlot::from_server_name(None).unwrap(),
            (LaneSlot::FIRST, LaneFlow::Fixed)
        );
        for bad in [
            "lane8.relaygate",
            "lane01.relaygate",
            "lane.relaygate",
            "lane-1.relaygate",
            "lane1.example.com",
            "lane1.flow3.relaygate",
            "lane.flow2.relaygate",
            "example.com",
            "",
        ] {
            assert!(LaneSlot::from_server_name(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_count_is_one_to_eight_and_holds_its_slots() {
        assert!(LaneCount::try_from(0).is_err());
        assert!(LaneCount::try_from(MAX_LANES + 1).is_err());
        let two = LaneCount::try_from(2).unwrap();
        assert_eq!(two.slots().count(), 2);
        assert!(two.holds(LaneSlot(1)) && !two.holds(LaneSlot(2)));
        assert_eq!(two.min(LaneCount::ONE), LaneCount::ONE);
        assert_eq!(LaneCount::clamped(0), LaneCount::ONE);
        assert_eq!(LaneCount::clamped(200).get(), MAX_LANES);
        let parsed: LaneCount = serde_json::from_str("3").unwrap();
        assert_eq!(parsed.get(), 3);
        assert!(serde_json::from_str::<LaneCount>("9").is_err());
    }
}
