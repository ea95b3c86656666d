//! Local processes as GPU instances: the whole lifecycle runs for real on one
//! machine, with `gpu-sim --startup-delay` standing in for a model loading.
//!
//! - `create` picks a free port and spawns `command` with `{port}` replaced,
//!   in a process group of its own; `find` knows it by the name it was
//!   created under;
//! - `stop` suspends the group (SIGSTOP): like a stopped pod that keeps its
//!   volume, it holds its memory but serves nothing;
//! - `start` resumes it (SIGCONT), much faster than a create, as resuming a
//!   warm instance is;
//! - `terminate` kills the group.
//!
//! Signals go to the whole group so that a wrapper (`sh -c …`) or a server
//! with worker processes is stopped and killed as one.

use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::{HourlyCost, Instance, InstanceStatus, Provider, ProviderError};

/// Starts and stops one local process (group).
#[derive(Debug)]
pub struct ProcessProvider {
    name: String,
    /// argv; `{port}` is replaced at each create.
    command: Vec<String>,
    cost: HourlyCost,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    /// The name the controller created it under.
    name: String,
    child: Child,
    address: String,
    suspended: bool,
}

impl ProcessProvider {
    /// `command` is an argv list; `{port}` in it is replaced by the port
    /// picked for each new process.
    pub fn new(name: &str, command: &[String], cost: HourlyCost) -> anyhow::Result<Self> {
        if command.is_empty() {
            return Err(anyhow!("backend {name}: `command` is empty"));
        }
        Ok(Self {
            name: name.to_owned(),
            command: command.to_vec(),
            cost,
            running: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        // Plain values updated in single steps: a panic cannot leave them torn.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn instance(&self, running: &Running) -> Instance {
        Instance {
            id: format!("{}-{}", self.name, running.child.id().unwrap_or_default()),
            address: Some(running.address.clone()),
        }
    }

    /// Sends `signal` to the process group and records whether it is now
    /// suspended.
    fn signal(&self, signal: Signal, suspended: bool) -> Result<Instance, ProviderError> {
        let mut running = self.lock();
        let Some(process) = running.as_mut() else {
            return Err(ProviderError::NotFound(self.name.clone()));
        };
        let group = process_group(&process.child)
            .ok_or_else(|| ProviderError::NotFound(self.name.clone()))?;
        killpg(group, signal).map_err(|e| anyhow!("{signal} to group {group}: {e}"))?;
        process.suspended = suspended;
        Ok(self.instance(process))
    }
}

/// The group the child leads (it was spawned with `process_group(0)`).
fn process_group(child: &Child) -> Option<Pid> {
    let pid = i32::try_from(child.id()?).ok()?;
    Some(Pid::from_raw(pid))
}

/// A port nothing listens on now, for a new process to listen on.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
    Ok(listener.local_addr()?.port())
}

#[async_trait]
impl Provider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn create(&self, name: &str) -> Result<Instance, ProviderError> {
        let mut running = self.lock();
        if let Some(old) = running.take()
            && let Some(group) = process_group(&old.child)
        {
            // Never two instances of one slot.
            let _ = killpg(group, Signal::SIGKILL);
        }
        // A port picked now, not at start-up: one taken meanwhile by another
        // program would otherwise fail every create.
        let port = free_port()?.to_string();
        let argv: Vec<String> = self
            .command
            .iter()
            .map(|arg| arg.replace("{port}", &port))
            .collect();
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let child = Command::new(program)
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("backend {}: spawning {program}", self.name))?;
        let process = Running {
            name: name.to_owned(),
            child,
            address: format!("127.0.0.1:{port}"),
            suspended: false,
        };
        let instance = self.instance(&process);
        *running = Some(process);
        Ok(instance)
    }

    async fn find(&self, name: &str) -> Result<Vec<Instance>, ProviderError> {
        let running = self.lock();
        Ok(running
            .iter()
            .filter(|process| process.name == name)
            .map(|process| self.instance(process))
            .collect())
    }

    async fn start(&self, _instance: &Instance) -> Result<Instance, ProviderError> {
        self.signal(Signal::SIGCONT, false)
    }

    async fn stop(&self, _instance: &Instance) -> Result<(), ProviderError> {
        self.signal(Signal::SIGSTOP, true).map(|_| ())
    }

    async fn terminate(&self, _instance: &Instance) -> Result<(), ProviderError> {
        let taken = self.lock().take();
        if let Some(mut process) = taken {
            // SIGKILL needs no cooperation: a suspended group would not act
            // on SIGTERM.
            if let Some(group) = process_group(&process.child) {
                let _ = killpg(group, Signal::SIGKILL);
            }
            let _ = process.child.wait().await;
        }
        Ok(())
    }

    async fn status(
        &self,
        instance: &Instance,
    ) -> Result<(InstanceStatus, Instance), ProviderError> {
        let mut running = self.lock();
        let Some(process) = running.as_mut() else {
            return Ok((InstanceStatus::Terminated, instance.clone()));
        };
        let status = match process.child.try_wait() {
            Ok(None) if process.suspended => InstanceStatus::Stopped,
            Ok(None) => InstanceStatus::Running,
            Ok(Some(_)) | Err(_) => InstanceStatus::Terminated,
        };
        Ok((status, self.instance(process)))
    }

    fn cost(&self) -> HourlyCost {
        self.cost
    }

    fn ends_with_gateway(&self) -> bool {
        true
    }
}
