//! Where GPU instances come from: the operations real GPU clouds offer,
//! behind one trait, so the lifecycle controller is the same for a rented
//! pod and a local process.
//!
//! - [`process`]: local processes (`gpu-sim`), so the whole lifecycle runs
//!   for real on one machine.
//! - [`runpod`]: RunPod's pods API.
//!
//! Static backends (always-on servers) have no provider: their lifecycle is
//! fixed at `hot`.

pub mod process;
pub mod runpod;

use async_trait::async_trait;

/// One rented (or started) instance, as its provider knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The provider's id (a pod id, or a process's name).
    pub id: String,
    /// `host:port` to reach the inference server on, once the provider
    /// knows it (a pod gets its public port mapping only when running).
    pub address: Option<String>,
}

/// What the provider reports about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    /// Being created or started; not running yet.
    Pending,
    Running,
    /// Stopped: paid for storage only, resumable.
    Stopped,
    /// Gone: nothing is billed, it cannot be resumed.
    Terminated,
}

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The host (for a resume) or the region (for a create) has no free GPU
    /// of the kind asked for. A failed resume falls back to a create.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// The provider has no such instance (terminated meanwhile).
    #[error("instance {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Hourly prices of one instance, by state, in the account's currency.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HourlyCost {
    /// While running (GPU, CPU, memory, disk).
    pub running: f64,
    /// While stopped (the volume holding the weights).
    pub stopped: f64,
}

/// A GPU cloud (or a local stand-in for one). Every call is one attempt: the
/// controller decides about retries, and records each transition.
#[async_trait]
pub trait Provider: Send + Sync {
    /// For logs and `/admin/backends`: `process`, `runpod`.
    fn kind(&self) -> &'static str;

    /// Rents a new instance named `name` and starts it. The controller
    /// mints `name` (unique to this create, see [`Self::name_prefix`]) and
    /// records it before the call, so that a create whose answer is lost
    /// (a timeout, a connection reset after the cloud rented the instance)
    /// can be found again with [`Self::find`] instead of rented twice.
    async fn create(&self, name: &str) -> Result<Instance, ProviderError>;

    /// The instances named `name` that are not terminated, as the provider
    /// lists them now: none when the create never took effect, normally
    /// one, more only when a create was retried while an earlier one was
    /// still being carried out.
    async fn find(&self, name: &str) -> Result<Vec<Instance>, ProviderError>;

    /// Resumes a stopped instance. May fail with
    /// [`ProviderError::NoCapacity`] when its host's GPUs were taken
    /// meanwhile. The answer carries the address, which may have changed.
    async fn start(&self, instance: &Instance) -> Result<Instance, ProviderError>;

    /// Stops a running instance, keeping its storage.
    async fn stop(&self, instance: &Instance) -> Result<(), ProviderError>;

    /// Releases the instance for good.
    async fn terminate(&self, instance: &Instance) -> Result<(), ProviderError>;

    /// What the provider says about the instance now (with its address when
    /// running).
    async fn status(
        &self,
        instance: &Instance,
    ) -> Result<(InstanceStatus, Instance), ProviderError>;

    /// Prices by state, for cost accounting.
    fn cost(&self) -> HourlyCost;

    /// How the names of its instances begin (`tollgate-{backend}-{uuid}`
    /// by default), so that an operator tells them apart in the cloud's
    /// console.
    fn name_prefix(&self) -> &str {
        "tollgate"
    }

    /// Whether its instances end with Tollgate (local child processes): the
    /// controller then terminates them on shutdown. Rented instances outlive
    /// a restart and are found again from the event log.
    fn ends_with_gateway(&self) -> bool {
        false
    }
}
