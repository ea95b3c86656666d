//! The lifecycle states of a GPU instance.

use std::fmt;

/// Where an instance is in its life. Each backend in the config is one
/// instance slot; a static backend is always [`InstanceState::Hot`].
///
/// ```text
///  cold ──create──▶ provisioning ──▶ starting ──ready──▶ hot ──sleep──▶ draining ──stop──▶ warm
///   ▲                                   ▲                                                 │
///   └────────────── release (terminate) ┴──────────────── wake (resume) ◀─────────────────┘
/// ```
///
/// A failed create, resume or start leads to `failed`; the controller
/// releases what is left and the slot becomes `cold` again after a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceState {
    /// Not rented: costs nothing, slowest to bring up.
    Cold,
    /// Being rented (or, for a local process, spawned).
    Provisioning,
    /// Rented but stopped: pays for storage only, resumes in minutes.
    Warm,
    /// Running, loading its model; not routable until its probe passes.
    Starting,
    /// Healthy and routable.
    Hot,
    /// Takes no new requests; stopped once those in flight are done.
    Draining,
    /// A provider call failed; released, then cold again.
    Failed,
}

impl InstanceState {
    pub const ALL: [InstanceState; 7] = [
        Self::Cold,
        Self::Provisioning,
        Self::Warm,
        Self::Starting,
        Self::Hot,
        Self::Draining,
        Self::Failed,
    ];

    /// The state's position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Provisioning => "provisioning",
            Self::Warm => "warm",
            Self::Starting => "starting",
            Self::Hot => "hot",
            Self::Draining => "draining",
            Self::Failed => "failed",
        }
    }

    /// Billed at the running (GPU) rate: from the moment a rent or resume is
    /// asked for until the stop is done.
    pub fn bills_running(self) -> bool {
        matches!(
            self,
            Self::Provisioning | Self::Starting | Self::Hot | Self::Draining
        )
    }

    /// Billed at the stopped (storage) rate.
    pub fn bills_stopped(self) -> bool {
        self == Self::Warm
    }

    /// On its way to hot: counts as capacity about to arrive, so the
    /// controller does not wake a second instance for the same backlog.
    pub fn is_waking(self) -> bool {
        matches!(self, Self::Provisioning | Self::Starting)
    }

    pub(crate) fn to_u8(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_u8(value: u8) -> Self {
        Self::ALL
            .get(usize::from(value))
            .copied()
            .unwrap_or(Self::Failed)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_byte() {
        for state in InstanceState::ALL {
            assert_eq!(InstanceState::from_u8(state.to_u8()), state);
        }
    }

    #[test]
    fn index_is_the_position_in_all() {
        for (position, state) in InstanceState::ALL.into_iter().enumerate() {
            assert_eq!(state.index(), position);
        }
    }
}
