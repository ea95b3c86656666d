//! What the crate's integration tests share: gpu-sim as they drive it. Each
//! test binary uses part of it and adds its own request helpers to [`Sim`].

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};

use tollgate_testkit::GpuSim;

/// The test kit's [`GpuSim`], wrapped so that each test binary can add
/// methods of its own (`impl Sim { … }`), which a type of another crate
/// cannot be given.
pub struct Sim(GpuSim);

impl Sim {
    /// gpu-sim with `args` on a free port, once it accepts connections.
    pub fn start(args: &[&str]) -> Self {
        Self(GpuSim::start(args))
    }

    /// Unpaced: every answer in one write.
    pub fn fast(extra: &[&str]) -> Self {
        Self(GpuSim::fast(extra))
    }
}

impl Deref for Sim {
    type Target = GpuSim;

    fn deref(&self) -> &GpuSim {
        &self.0
    }
}

impl DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut GpuSim {
        &mut self.0
    }
}
