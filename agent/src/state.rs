//! The node state machine: every state, every event and every allowed
//! transition, in one place. docs/architecture.md draws it.
//!
//! ```text
//!            drain (in flight > 0)          drain complete
//!   active ───────────────────────▶ draining ─────────────▶ drained
//!     │ ▲  ─── drain (nothing in flight) ────────────────────▶ │
//!     │ └──────────────── undrain ◀──────────────────────────┘ │ (and from draining)
//!     │ quarantine (from active, draining, drained)             │
//!     ▼                                                         │
//!   quarantined ── release ──▶ active ◀─────────────────────────┘
//! ```
//!
//! This module is pure: it decides, [`crate::node`] persists and applies.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Where the node is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Accepting work.
    Active,
    /// Finishing in-flight work, accepting nothing new.
    Draining,
    /// Nothing in flight, accepting nothing new.
    Drained,
    /// Workers stopped, everything refused until an admin releases the node.
    Quarantined,
}

impl NodeState {
    /// Every state, for metrics that export one series per state.
    pub const ALL: [NodeState; 4] = [
        NodeState::Active,
        NodeState::Draining,
        NodeState::Drained,
        NodeState::Quarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
            NodeState::Quarantined => "quarantined",
        }
    }

    /// Whether new work may start in this state.
    pub fn accepts_work(self) -> bool {
        self == NodeState::Active
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can happen to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// An admin asks the node to stop taking work.
    Drain,
    /// An admin reverses a drain.
    Undrain,
    /// An admin (or, later, a health policy) fences the node.
    Quarantine,
    /// An admin lifts a quarantine.
    Release,
    /// The last in-flight piece of work of a draining node ended.
    DrainComplete,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Drain => "drain",
            Event::Undrain => "undrain",
            Event::Quarantine => "quarantine",
            Event::Release => "release",
            Event::DrainComplete => "drain_complete",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that the current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} a node that is {from}")]
pub struct InvalidTransition {
    pub from: NodeState,
    pub event: Event,
}

/// The one transition table. `in_flight` is the number of pieces of work
/// still running; a drain with nothing in flight goes straight to `drained`.
pub fn next(from: NodeState, event: Event, in_flight: u64) -> Result<NodeState, InvalidTransition> {
    use Event::*;
    use NodeState::*;
    let to = match (from, event) {
        (Active, Drain) if in_flight == 0 => Drained,
        (Active, Drain) => Draining,
        (Draining, DrainComplete) if in_flight == 0 => Drained,
        (Draining | Drained, Undrain) => Active,
        (Active | Draining | Drained, Quarantine) => Quarantined,
        (Quarantined, Release) => Active,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

/// Who caused a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Actor {
    /// A peer on the admin socket, identified by its kernel credentials.
    Admin { uid: u32, gid: u32, pid: i32 },
    /// ccnoded itself (a component name: `ccnoded`, `state`, `drain`).
    System { component: String },
}

impl Actor {
    pub fn system(component: &str) -> Actor {
        Actor::System {
            component: component.to_owned(),
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Admin { uid, pid, .. } => write!(f, "uid {uid} (pid {pid})"),
            Actor::System { component } => write!(f, "system ({component})"),
        }
    }
}

/// The node's current state with who put it there, when and why. This is
/// what is persisted and what `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub state: NodeState,
    pub reason: String,
    pub by: Actor,
    #[serde(with = "crate::timefmt")]
    pub since: SystemTime,
    /// Increases by one with every transition and survives restarts; a
    /// first start or a recovery from an untrustworthy state starts at 0.
    pub seq: u64,
}

/// Longest reason accepted, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Why a reason was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReasonError {
    #[error("a reason is required")]
    Missing,
    #[error("the reason is longer than {MAX_REASON_BYTES} bytes")]
    TooLong,
    #[error("the reason contains control characters")]
    ControlCharacters,
}

/// Checks an operator-supplied reason and returns it trimmed.
pub fn check_reason(reason: Option<&str>) -> Result<String, ReasonError> {
    let reason = reason.map(str::trim).unwrap_or_default();
    if reason.is_empty() {
        return Err(ReasonError::Missing);
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(ReasonError::TooLong);
    }
    if reason.chars().any(char::is_control) {
        return Err(ReasonError::ControlCharacters);
    }
    Ok(reason.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;
    use NodeState::*;

    #[test]
    fn allowed_transitions() {
        assert_eq!(next(Active, Drain, 0), Ok(Drained));
        assert_eq!(next(Active, Drain, 3), Ok(Draining));
        assert_eq!(next(Draining, DrainComplete, 0), Ok(Drained));
        assert!(
            next(Draining, DrainComplete, 1).is_err(),
            "work still in flight"
        );
        assert_eq!(next(Draining, Undrain, 2), Ok(Active));
        assert_eq!(next(Drained, Undrain, 0), Ok(Active));
        for from in [Active, Draining, Drained] {
            assert_eq!(next(from, Quarantine, 5), Ok(Quarantined));
        }
        assert_eq!(next(Quarantined, Release, 0), Ok(Active));
    }

    #[test]
    fn everything_else_is_refused() {
        let allowed = [
            (Active, Drain),
            (Draining, DrainComplete),
            (Draining, Undrain),
            (Drained, Undrain),
            (Active, Quarantine),
            (Draining, Quarantine),
            (Drained, Quarantine),
            (Quarantined, Release),
        ];
        for from in NodeState::ALL {
            for event in [Drain, Undrain, Quarantine, Release, DrainComplete] {
                if allowed.contains(&(from, event)) {
                    continue;
                }
                assert_eq!(
                    next(from, event, 0),
                    Err(InvalidTransition { from, event }),
                    "{from} + {event}"
                );
            }
        }
    }

    #[test]
    fn quarantine_is_left_only_by_release() {
        for event in [Drain, Undrain, Quarantine, DrainComplete] {
            assert!(next(Quarantined, event, 0).is_err());
        }
    }

    #[test]
    fn reasons_are_checked() {
        assert_eq!(check_reason(None), Err(ReasonError::Missing));
        assert_eq!(check_reason(Some("   ")), Err(ReasonError::Missing));
        assert_eq!(
            check_reason(Some(&"x".repeat(MAX_REASON_BYTES + 1))),
            Err(ReasonError::TooLong)
        );
        assert_eq!(
            check_reason(Some("line\nbreak")),
            Err(ReasonError::ControlCharacters)
        );
        assert_eq!(check_reason(Some("  fan swap ")).unwrap(), "fan swap");
    }

    #[test]
    fn record_round_trips_through_json() {
        let r = NodeRecord {
            state: Quarantined,
            reason: "xid 79".into(),
            by: Actor::Admin {
                uid: 0,
                gid: 0,
                pid: 42,
            },
            since: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            seq: 7,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<NodeRecord>(&json).unwrap(), r);
    }
}
