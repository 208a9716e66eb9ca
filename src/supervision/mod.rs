//! The supervision tree: every long-lived actor of the process hangs under `root`.
//!
//! - [`spec`]: strategies, restart types, intensity, backoff and child specs (data).
//! - [`supervisor`]: the OTP-style supervisor actor.
//! - [`intensity`], [`backoff`]: the restart window and restart delays (pure).
//! - [`tree`]: the live view behind `/debug/actors` and the chaos kill endpoint.
//! - [`root`]: the process's tree, declared as a child table.

pub mod backoff;
pub mod intensity;
pub mod root;
pub mod spec;
pub mod supervisor;
pub mod tree;

pub use root::{Root, RootHandle};
pub use spec::{
    Activity, ActivityGuard, Backoff, ChildKind, ChildSpec, Intensity, Passivation, Restart, StartCtx, StartFn,
    Strategy, SupervisorSpec, RESTARTS_PER_CHILD,
};
pub use supervisor::{StartedChild, Supervisor, SupervisorMsg};
pub use tree::{ActorNode, Status, Tree};
