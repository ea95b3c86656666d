//! How a job's run proves itself to the gateway. A runner sends each job to
//! its own gateway's listener, so the job goes through everything a live
//! request does (admission, the tier priority queue, routing, metering).
//! The client's key is not stored (only its hash), so the run carries, in
//! one header, a secret drawn at the gateway's start (nothing outside the
//! process knows it), the job's id and attempt, and the submitting key's
//! hash. The gateway strips the header before forwarding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::store::Claim;
use crate::keys::secret::KeyHash;

pub const JOB_RUN_HEADER: &str = "x-tollgate-job";

/// The secret of this process's runs.
pub struct RunPass {
    secret: [u8; 32],
}

/// A job's run, as the gateway admits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRun {
    pub id: Uuid,
    /// The claim the run belongs to (every write it makes names it).
    pub attempt: i32,
    pub key_hash: KeyHash,
}

impl JobRun {
    /// When the job was submitted, from its UUIDv7: the time its usage
    /// event carries, the same on every attempt, so a second attempt's event
    /// is the first one's duplicate and is dropped (one event per job).
    pub fn submitted_at(&self) -> SystemTime {
        let (seconds, nanos) = self
            .id
            .get_timestamp()
            .map_or((0, 0), |timestamp| timestamp.to_unix());
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }
}

impl Default for RunPass {
    fn default() -> Self {
        Self {
            secret: rand::rng().random(),
        }
    }
}

impl RunPass {
    /// The header value for `claim`'s run.
    pub fn header(&self, claim: &Claim) -> String {
        format!(
            "{}.{}.{}.{}",
            hex::encode(self.secret),
            claim.id,
            claim.attempt,
            hex::encode(claim.key_hash.0)
        )
    }

    /// The run a header value names, if it carries this process's secret.
    pub fn verify(&self, value: &[u8]) -> Option<JobRun> {
        let value = std::str::from_utf8(value).ok()?;
        let mut parts = value.split('.');
        let secret = hex::decode(parts.next()?).ok()?;
        if !bool::from(secret.as_slice().ct_eq(&self.secret)) {
            return None;
        }
        let id = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        let key_hash = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        parts.next().is_none().then_some(JobRun {
            id,
            attempt,
            key_hash: KeyHash(key_hash),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Claim {
        Claim {
            id: Uuid::now_v7(),
            attempt: 3,
            account_id: Uuid::nil(),
            key_id: Uuid::nil(),
            key_hash: KeyHash([7; 32]),
            tier: "free".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            content_type: None,
            body: Vec::new(),
            sent_before: false,
            created_at: SystemTime::now(),
            batch_id: None,
        }
    }

    #[test]
    fn a_run_is_known_only_by_its_own_process() {
        let (pass, claim) = (RunPass::default(), claim());
        let header = pass.header(&claim);
        let run = pass.verify(header.as_bytes()).expect("its own run");
        assert_eq!(
            (run.id, run.attempt, run.key_hash),
            (claim.id, 3, claim.key_hash)
        );
        assert_eq!(RunPass::default().verify(header.as_bytes()), None);
        for forged in [
            "",
            "00.x.1.00",
            &format!("{}.1", header),
            &header.replacen('.', "..", 1),
        ] {
            assert_eq!(pass.verify(forged.as_bytes()), None, "{forged}");
        }
    }

    #[test]
    fn a_run_is_dated_by_its_job_id() {
        let run = JobRun {
            id: Uuid::now_v7(),
            attempt: 1,
            key_hash: KeyHash([0; 32]),
        };
        let age = SystemTime::now()
            .duration_since(run.submitted_at())
            .unwrap();
        assert!(age < Duration::from_secs(5), "{age:?}");
    }
}
