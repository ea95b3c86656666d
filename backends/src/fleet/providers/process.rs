//! Local processes as GPU instances: the whole lifecycle runs for real on one
//! machine, with `gpu-sim --startup-delay` standing in for a model loading.
//!
//! - `create` spawns `command` (`{port}` replaced by the port Tollgate picked);
//! - `stop` suspends the process (SIGSTOP): like a stopped pod that keeps its
//!   volume, it holds its memory but serves nothing;
//! - `start` resumes it (SIGCONT), much faster than a create, as resuming a
//!   warm instance is;
//! - `terminate` kills it.

use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::{HourlyCost, Instance, InstanceStatus, Provider, ProviderError};

/// Starts and stops one local process.
#[derive(Debug)]
pub struct ProcessProvider {
    name: String,
    /// argv, `{port}` already replaced.
    command: Vec<String>,
    address: String,
    cost: HourlyCost,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    child: Child,
    suspended: bool,
}

impl ProcessProvider {
    /// `command` is an argv list whose `{port}` is replaced by `port`.
    pub fn new(
        name: &str,
        command: &[String],
        port: u16,
        cost: HourlyCost,
    ) -> anyhow::Result<Self> {
        if command.is_empty() {
            return Err(anyhow!("backend {name}: `command` is empty"));
        }
        Ok(Self {
            name: name.to_owned(),
            command: command
                .iter()
                .map(|arg| arg.replace("{port}", &port.to_string()))
                .collect(),
            address: format!("127.0.0.1:{port}"),
            cost,
            running: Mutex::new(None),
        })
    }

    /// Where the process listens.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn instance(&self, pid: Option<u32>) -> Instance {
        Instance {
            id: format!("{}-{}", self.name, pid.unwrap_or_default()),
            address: Some(self.address.clone()),
        }
    }

    fn signal(&self, signal: Signal, suspended: bool) -> Result<Instance, ProviderError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let Some(process) = running.as_mut() else {
            return Err(ProviderError::NotFound(self.name.clone()));
        };
        let pid = process
            .child
            .id()
            .ok_or_else(|| ProviderError::NotFound(self.name.clone()))?;
        let raw = i32::try_from(pid).map_err(|e| anyhow!(e))?;
        kill(Pid::from_raw(raw), signal).map_err(|e| anyhow!("{signal} to {pid}: {e}"))?;
        process.suspended = suspended;
        Ok(self.instance(Some(pid)))
    }
}

/// A port nothing listens on now, for a process backend to listen on.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
    Ok(listener.local_addr()?.port())
}

#[async_trait]
impl Provider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn create(&self) -> Result<Instance, ProviderError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut old) = running.take() {
            // Never two processes on one port.
            let _ = old.child.start_kill();
        }
        let (program, args) = self
            .command
            .split_first()
            .ok_or_else(|| anyhow!("empty command"))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("backend {}: spawning {program}", self.name))?;
        let instance = self.instance(child.id());
        *running = Some(Running {
            child,
            suspended: false,
        });
        Ok(instance)
    }

    async fn start(&self, _instance: &Instance) -> Result<Instance, ProviderError> {
        self.signal(Signal::SIGCONT, false)
    }

    async fn stop(&self, _instance: &Instance) -> Result<(), ProviderError> {
        self.signal(Signal::SIGSTOP, true).map(|_| ())
    }

    async fn terminate(&self, _instance: &Instance) -> Result<(), ProviderError> {
        let taken = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut process) = taken {
            // A suspended process would not act on SIGTERM; SIGKILL needs no
            // cooperation.
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
        Ok(())
    }

    async fn status(
        &self,
        _instance: &Instance,
    ) -> Result<(InstanceStatus, Instance), ProviderError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let status = match running.as_mut() {
            None => InstanceStatus::Terminated,
            Some(process) => match process.child.try_wait() {
                Ok(None) if process.suspended => InstanceStatus::Stopped,
                Ok(None) => InstanceStatus::Running,
                Ok(Some(_)) | Err(_) => InstanceStatus::Terminated,
            },
        };
        let pid = running.as_ref().and_then(|p| p.child.id());
        Ok((status, self.instance(pid)))
    }

    fn cost(&self) -> HourlyCost {
        self.cost
    }

    fn ends_with_gateway(&self) -> bool {
        true
    }
}
