//! Child specifications: what a supervisor starts, how, and what it does when it dies.
//! Modelled on Erlang's child specs (`rabbit_sup.erl` keeps them in one table).

use std::time::Duration;

/// Whether a child supervises others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    Worker,
    Supervisor,
}

/// When a dead child is restarted (OTP restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always.
    Permanent,
    /// Only after a failure, not after a normal stop.
    Transient,
    /// Never.
    Temporary,
}

/// One row of a supervisor's child table.
#[derive(Debug, Clone, Copy)]
pub struct ChildSpec {
    /// Unique, stable name: the name shown in `/debug/actors` and used by kill requests.
    pub name: &'static str,
    pub kind: ChildKind,
    pub restart: Restart,
    /// How long an orderly stop may take before the child is killed.
    pub shutdown: Duration,
    /// One line for humans.
    pub doc: &'static str,
}

/// The root's children, started in this order and stopped in reverse.
pub const ROOT_CHILDREN: &[ChildSpec] = &[ChildSpec {
    name: "tenants",
    kind: ChildKind::Supervisor,
    restart: Restart::Permanent,
    shutdown: Duration::from_secs(15),
    doc: "tenant lifecycle and one user manager per active tenant",
}];

/// Restart intensity: more than `MAX_RESTARTS` within `RESTART_PERIOD` escalates.
pub const MAX_RESTARTS: usize = 3;
pub const RESTART_PERIOD: Duration = Duration::from_secs(5);
