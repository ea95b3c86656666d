//! A GPU cloud on tokio's clock: renting takes the cold-start time, resuming
//! the resume time, and a resume fails for lack of capacity at a seeded
//! rate. On the simulation's paused clock those waits cost no real time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate_backends::fleet::providers::{
    HourlyCost, Instance, InstanceStatus, Provider, ProviderError,
};

/// How the simulated cloud behaves.
#[derive(Debug, Clone, Copy)]
pub struct SimTiming {
    /// Rent to ready (COLD → HOT): image pull, weights download, model load.
    pub cold_start: Duration,
    /// Resume of a stopped instance to ready (WARM → HOT).
    pub resume: Duration,
    /// Share of resumes refused because the host's GPU was rented meanwhile.
    pub resume_failure_rate: f64,
}

/// What the providers of one simulation were asked, for the report.
#[derive(Debug, Default)]
pub struct ProviderCalls {
    pub creates: AtomicU64,
    pub resumes: AtomicU64,
    pub resume_failures: AtomicU64,
    pub stops: AtomicU64,
    pub terminates: AtomicU64,
}

/// Stands in for every managed backend's provider. The instance is ready
/// when `create` or `start` returns, so the simulation's readiness check
/// passes at once.
pub struct SimProvider {
    name: String,
    timing: SimTiming,
    cost: HourlyCost,
    /// Shared by the simulation's providers and seeded once: the run is
    /// single-threaded, so the draws come in the same order every time.
    rng: Arc<Mutex<StdRng>>,
    calls: Arc<ProviderCalls>,
    rented: AtomicU64,
}

impl SimProvider {
    pub fn new(
        name: &str,
        timing: SimTiming,
        cost: HourlyCost,
        rng: Arc<Mutex<StdRng>>,
        calls: Arc<ProviderCalls>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            timing,
            cost,
            rng,
            calls,
            rented: AtomicU64::new(0),
        }
    }

    /// The generator every provider of a run shares.
    pub fn shared_rng(seed: u64) -> Arc<Mutex<StdRng>> {
        Arc::new(Mutex::new(StdRng::seed_from_u64(seed)))
    }

    fn running(&self, id: &str) -> Instance {
        Instance {
            id: id.to_owned(),
            address: Some(format!("{}.sim:8000", self.name)),
        }
    }
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> &'static str {
        "sim"
    }

    async fn create(&self, _name: &str) -> Result<Instance, ProviderError> {
        self.calls.creates.fetch_add(1, Ordering::Relaxed);
        let n = self.rented.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.timing.cold_start).await;
        Ok(self.running(&format!("{}-{n}", self.name)))
    }

    /// Never asked: a simulated create always answers.
    async fn find(&self, _name: &str) -> Result<Vec<Instance>, ProviderError> {
        Ok(Vec::new())
    }

    /// A refused resume answers at once, as a cloud's start call does when
    /// the host has no free GPU; the controller then rents anew.
    async fn start(&self, instance: &Instance) -> Result<Instance, ProviderError> {
        self.calls.resumes.fetch_add(1, Ordering::Relaxed);
        let refused = {
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            rng.random::<f64>() < self.timing.resume_failure_rate
        };
        if refused {
            self.calls.resume_failures.fetch_add(1, Ordering::Relaxed);
            return Err(ProviderError::NoCapacity(
                "the host's GPU was rented meanwhile (simulated)".into(),
            ));
        }
        tokio::time::sleep(self.timing.resume).await;
        Ok(self.running(&instance.id))
    }

    async fn stop(&self, _instance: &Instance) -> Result<(), ProviderError> {
        self.calls.stops.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn terminate(&self, _instance: &Instance) -> Result<(), ProviderError> {
        self.calls.terminates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn status(
        &self,
        instance: &Instance,
    ) -> Result<(InstanceStatus, Instance), ProviderError> {
        Ok((InstanceStatus::Running, self.running(&instance.id)))
    }

    fn cost(&self) -> HourlyCost {
        self.cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(rate: f64, seed: u64) -> (SimProvider, Arc<ProviderCalls>) {
        let calls = Arc::new(ProviderCalls::default());
        let timing = SimTiming {
            cold_start: Duration::from_secs(45 * 60),
            resume: Duration::from_secs(180),
            resume_failure_rate: rate,
        };
        let p = SimProvider::new(
            "gpu-1",
            timing,
            HourlyCost::default(),
            SimProvider::shared_rng(seed),
            Arc::clone(&calls),
        );
        (p, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn create_takes_the_cold_start_and_resume_the_resume_time() {
        let (p, _) = provider(0.0, 1);
        let t0 = tokio::time::Instant::now();
        let instance = p.create("gpu-1-test").await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(45 * 60));
        assert!(instance.address.is_some());
        let t1 = tokio::time::Instant::now();
        assert_eq!(p.start(&instance).await.unwrap().id, instance.id);
        assert_eq!(t1.elapsed(), Duration::from_secs(180));
    }

    #[tokio::test(start_paused = true)]
    async fn resumes_fail_for_lack_of_capacity_at_the_seeded_rate() {
        let (p, calls) = provider(0.1, 9);
        let instance = Instance {
            id: "x".into(),
            address: None,
        };
        let mut failed = 0;
        for _ in 0..2000 {
            if let Err(e) = p.start(&instance).await {
                assert!(matches!(e, ProviderError::NoCapacity(_)));
                failed += 1;
            }
        }
        assert!((150..250).contains(&failed), "{failed} of 2000");
        assert_eq!(calls.resume_failures.load(Ordering::Relaxed), failed);
    }
}
