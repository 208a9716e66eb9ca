//! `index_user`, `unindex_user`, `unindex_tenant`: keep the search index in step with
//! the database of record.
//!
//! `index_user` does not trust its arguments' snapshot: it reads the user as it is now
//! and indexes that (or removes it, if the user is gone), with its version, so jobs run
//! in any order, any number of times, converge on the current state.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobFailure, JobKind};
use crate::jobs::{Job, NewJob};
use crate::search::{IndexOp, SearchIndex, UserDoc};
use crate::store::{Store, StoreError};

/// Which user (or tenant) to bring up to date.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexArgs {
    pub tenant_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
}

impl IndexArgs {
    /// A job for one version of a user (each version is its own job, so an update is
    /// never mistaken for a duplicate of the create).
    pub fn index_user(tenant_id: Uuid, user_id: Uuid, version: i64) -> NewJob {
        let args = IndexArgs { tenant_id, user_id: Some(user_id) };
        NewJob::new("index_user", format!("index_user:{user_id}:{version}"), serde_json::json!(args))
    }

    pub fn unindex_user(tenant_id: Uuid, user_id: Uuid) -> NewJob {
        let args = IndexArgs { tenant_id, user_id: Some(user_id) };
        NewJob::new("unindex_user", format!("unindex_user:{user_id}"), serde_json::json!(args))
    }

    pub fn unindex_tenant(tenant_id: Uuid) -> NewJob {
        let args = IndexArgs { tenant_id, user_id: None };
        NewJob::new("unindex_tenant", format!("unindex_tenant:{tenant_id}"), serde_json::json!(args))
    }
}

fn args_of(job: &Job) -> Result<IndexArgs, JobFailure> {
    serde_json::from_value(job.args.clone()).map_err(|e| JobFailure::permanent(format!("{} args: {e}", job.kind)))
}

/// Indexing as job kinds; `name` picks which of the three.
pub struct Indexing {
    name: &'static str,
    store: Arc<dyn Store>,
    index: Arc<dyn SearchIndex>,
}

impl Indexing {
    /// The three kinds over one store and index.
    pub fn kinds(store: Arc<dyn Store>, index: Arc<dyn SearchIndex>) -> Vec<Arc<dyn JobKind>> {
        ["index_user", "unindex_user", "unindex_tenant"]
            .into_iter()
            .map(|name| Arc::new(Indexing { name, store: store.clone(), index: index.clone() }) as Arc<dyn JobKind>)
            .collect()
    }
}

#[async_trait]
impl JobKind for Indexing {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let args = args_of(job)?;
        let op = match (self.name, args.user_id) {
            ("unindex_tenant", _) => IndexOp::DeleteTenant { tenant_id: args.tenant_id },
            ("unindex_user", Some(user_id)) => IndexOp::DeleteUser { tenant_id: args.tenant_id, user_id },
            ("index_user", Some(user_id)) => match self.store.get_user(args.tenant_id, user_id).await {
                Ok(u) => IndexOp::UpsertUser(UserDoc {
                    tenant_id: u.tenant_id,
                    user_id: u.id,
                    email: u.email,
                    name: u.name,
                    version: u.version,
                }),
                // Deleted since: make sure it is gone from the index too.
                Err(StoreError::NotFound(_)) => IndexOp::DeleteUser { tenant_id: args.tenant_id, user_id },
                Err(e) => return Err(JobFailure::new(e)),
            },
            (kind, None) => return Err(JobFailure::permanent(format!("{kind} needs a user_id"))),
            (kind, Some(_)) => return Err(JobFailure::permanent(format!("unknown indexing kind {kind}"))),
        };
        self.index.apply(&[op]).await.map_err(JobFailure::new)
    }
}
