//! `index_user`, `unindex_user`, `unindex_tenant`: keep the search index in step with
//! the database of record.
//!
//! `index_user` does not trust its arguments' snapshot: it reads the user as it is now
//! and indexes that (or removes it, if the user is gone), with its version, so jobs run
//! in any order, any number of times, converge on the current state. It then reads the
//! users again: a delete (of the user or its tenant) that committed between the first
//! read and the index write has had its own unindex change applied already, maybe
//! before this upsert landed, so a user gone by the second read is removed again. A
//! delete that commits after the second read is unindexed by its own job, after this
//! upsert: a deleted user never stays in the index.
//!
//! A leased batch shares its reads and its index write.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobContext, JobFailure, JobKind};
use crate::jobs::{Job, NewJob};
use crate::search::{IndexOp, SearchIndex, UserDoc};
use crate::store::Store;

/// Which user (or tenant) to bring up to date.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexArgs {
    pub tenant_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
}

/// The queue of every index change (user documents and audit entries): the `indexer`
/// role's workers take it, so indexing scales (and runs) apart from email and webhooks.
pub const QUEUE: &str = "index";

fn on_index_queue(mut job: NewJob) -> NewJob {
    job.queue = QUEUE.into();
    job
}

impl IndexArgs {
    /// A job for one version of a user (each version is its own job, so an update is
    /// never mistaken for a duplicate of the create).
    pub fn index_user(tenant_id: Uuid, user_id: Uuid, version: i64) -> NewJob {
        let args = IndexArgs { tenant_id, user_id: Some(user_id) };
        on_index_queue(NewJob::new("index_user", format!("index_user:{user_id}:{version}"), serde_json::json!(args)))
    }

    pub fn unindex_user(tenant_id: Uuid, user_id: Uuid) -> NewJob {
        let args = IndexArgs { tenant_id, user_id: Some(user_id) };
        on_index_queue(NewJob::new("unindex_user", format!("unindex_user:{user_id}"), serde_json::json!(args)))
    }

    pub fn unindex_tenant(tenant_id: Uuid) -> NewJob {
        let args = IndexArgs { tenant_id, user_id: None };
        on_index_queue(NewJob::new("unindex_tenant", format!("unindex_tenant:{tenant_id}"), serde_json::json!(args)))
    }
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

    /// The (tenant, user) pair a job names, or why it cannot be run.
    fn target(&self, job: &Job) -> Result<(Uuid, Option<Uuid>), JobFailure> {
        let args: IndexArgs =
            IndexArgs::deserialize(&job.args).map_err(|e| JobFailure::permanent(format!("{} args: {e}", job.kind)))?;
        match (self.name, args.user_id) {
            ("unindex_tenant", _) => Ok((args.tenant_id, None)),
            (_, Some(user)) => Ok((args.tenant_id, Some(user))),
            (kind, None) => Err(JobFailure::permanent(format!("{kind} needs a user_id"))),
        }
    }

    /// The current rows of these users, by id, keeping only those in the tenant the job
    /// named (a user id of another tenant counts as gone).
    async fn current(&self, targets: &[(Uuid, Uuid)]) -> Result<HashMap<Uuid, UserDoc>, JobFailure> {
        let ids: Vec<Uuid> = targets.iter().map(|(_, u)| *u).collect();
        let wanted: HashSet<(Uuid, Uuid)> = targets.iter().copied().collect();
        let users = self.store.find_users(&ids).await.map_err(JobFailure::new)?;
        Ok(users
            .into_iter()
            .filter(|u| wanted.contains(&(u.tenant_id, u.id)))
            .map(|u| {
                let doc =
                    UserDoc { tenant_id: u.tenant_id, user_id: u.id, email: u.email, name: u.name, version: u.version };
                (doc.user_id, doc)
            })
            .collect())
    }

    /// Index the current state of these users, then remove any that a racing delete
    /// took away meanwhile (see the module note).
    async fn index_users(&self, targets: &[(Uuid, Uuid)]) -> Result<(), JobFailure> {
        let now = self.current(targets).await?;
        let ops: Vec<IndexOp> = targets
            .iter()
            .map(|(tenant_id, user_id)| match now.get(user_id) {
                Some(doc) => IndexOp::UpsertUser(doc.clone()),
                None => IndexOp::DeleteUser { tenant_id: *tenant_id, user_id: *user_id },
            })
            .collect();
        self.index.apply(&ops).await.map_err(JobFailure::new)?;
        let upserted: Vec<(Uuid, Uuid)> = targets.iter().copied().filter(|(_, u)| now.contains_key(u)).collect();
        if upserted.is_empty() {
            return Ok(());
        }
        let after = self.current(&upserted).await?;
        let gone: Vec<IndexOp> = upserted
            .into_iter()
            .filter(|(_, u)| !after.contains_key(u))
            .map(|(tenant_id, user_id)| IndexOp::DeleteUser { tenant_id, user_id })
            .collect();
        if !gone.is_empty() {
            tracing::info!(users = gone.len(), "users deleted while being indexed; removed again");
            self.index.apply(&gone).await.map_err(JobFailure::new)?;
        }
        Ok(())
    }
}

#[async_trait]
impl JobKind for Indexing {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn run_batch(&self, jobs: &[&Job], _ctx: &JobContext) -> Vec<Result<(), JobFailure>> {
        let parsed: Vec<Result<(Uuid, Option<Uuid>), JobFailure>> = jobs.iter().map(|j| self.target(j)).collect();
        let targets: Vec<(Uuid, Option<Uuid>)> = parsed.iter().filter_map(|p| p.as_ref().ok().copied()).collect();
        let done = async {
            if targets.is_empty() {
                return Ok(());
            }
            match self.name {
                "index_user" => {
                    let users: Vec<(Uuid, Uuid)> = targets.iter().filter_map(|(t, u)| u.map(|u| (*t, u))).collect();
                    self.index_users(&users).await
                }
                "unindex_user" => {
                    let ops: Vec<IndexOp> = targets
                        .iter()
                        .filter_map(|(t, u)| u.map(|user_id| IndexOp::DeleteUser { tenant_id: *t, user_id }))
                        .collect();
                    self.index.apply(&ops).await.map_err(JobFailure::new)
                }
                "unindex_tenant" => {
                    let ops: Vec<IndexOp> =
                        targets.iter().map(|(tenant_id, _)| IndexOp::DeleteTenant { tenant_id: *tenant_id }).collect();
                    self.index.apply(&ops).await.map_err(JobFailure::new)
                }
                other => Err(JobFailure::permanent(format!("unknown indexing kind {other}"))),
            }
        }
        .await;
        super::outcomes(parsed, &done)
    }
}
