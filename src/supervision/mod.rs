//! The supervision tree: every long-lived actor of the process hangs under [`root`].
//!
//! Children are declared as data ([`spec::ChildSpec`] tables next to each supervisor),
//! so the tree, the logs and ARCHITECTURE.md can all be read off the same list.
//!
//! Today's tree (later capabilities add `pipeline`, `jobs` and `indexer` under `root`):
//! ```text
//! root (one-for-one)
//! └── tenants (supervisor, permanent)
//!     └── tenant-<uuid> … (one per active tenant, started on demand, drained when idle)
//! ```

pub mod root;
pub mod spec;

pub use root::{Root, RootArgs, RootMsg};
pub use spec::{ChildKind, ChildSpec, Restart, ROOT_CHILDREN};
