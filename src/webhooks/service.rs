//! What the webhook endpoints of the API do (the HTTP layer only translates): validate
//! and SSRF-check URLs, keep secrets out of every answer but create and rotation, and
//! turn tests, retries and recoveries into delivery jobs.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::delivery::DeliveryArgs;
use super::ssrf;
use crate::domain::webhook::{
    new_secret, DeliveryAttempt, EndpointPatch, NewEndpoint, NewEndpointInput, WebhookEndpoint,
};
use crate::domain::{DomainEvent, EventContext, Page, PageRequest, ValidationErrors};
use crate::error::{Error, Result};
use crate::jobs::JobClient;
use crate::store::Store;

/// How long the previous secret keeps signing after a rotation (SPEC §7).
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// Most events one recover resends.
pub const MAX_RECOVER: u32 = 10_000;

#[derive(Clone)]
pub struct Webhooks {
    store: Arc<dyn Store>,
    jobs: JobClient,
    /// Seals secrets before they are stored.
    secret_box: Arc<super::secret_box::SecretBox>,
    allow_private: bool,
    resolve_timeout: Duration,
}

impl Webhooks {
    pub fn new(
        store: Arc<dyn Store>,
        jobs: JobClient,
        secret_box: Arc<super::secret_box::SecretBox>,
        allow_private: bool,
    ) -> Self {
        Webhooks { store, jobs, secret_box, allow_private, resolve_timeout: Duration::from_secs(3) }
    }

    /// 422 unless the URL's host is public (or private ones are allowed).
    async fn check_destination(&self, url: &str) -> Result<()> {
        if self.allow_private {
            return Ok(());
        }
        let parsed = url::Url::parse(url).map_err(|e| ValidationErrors::single("url", e.to_string()))?;
        let host = parsed.host_str().unwrap_or_default();
        let port = parsed.port_or_known_default().unwrap_or(443);
        ssrf::check_host(host, port, self.resolve_timeout)
            .await
            .map_err(|e| Error::Validation(ValidationErrors::single("url", e.to_string())))
    }

    /// A new endpoint and its secret (shown once).
    pub async fn create(&self, tenant_id: Uuid, input: NewEndpointInput) -> Result<(WebhookEndpoint, String)> {
        let new = NewEndpoint::parse(tenant_id, input, self.allow_private, crate::domain::now())?;
        self.check_destination(&new.endpoint.url).await?;
        let sealed = NewEndpoint { secret: self.secret_box.seal(&new.secret), endpoint: new.endpoint.clone() };
        let endpoint = self.store.create_webhook(&sealed).await?;
        tracing::info!(tenant_id = %tenant_id, endpoint_id = %endpoint.id, "webhook endpoint created");
        Ok((endpoint, new.secret))
    }

    pub async fn list(&self, tenant_id: Uuid, page: PageRequest) -> Result<Page<WebhookEndpoint>> {
        self.store.get_tenant(tenant_id).await?;
        Ok(self.store.list_webhooks(tenant_id, page).await?)
    }

    pub async fn get(&self, tenant_id: Uuid, id: Uuid) -> Result<WebhookEndpoint> {
        Ok(self.store.get_webhook(tenant_id, id).await?)
    }

    pub async fn update(&self, tenant_id: Uuid, id: Uuid, patch: EndpointPatch) -> Result<WebhookEndpoint> {
        let before = self.store.get_webhook(tenant_id, id).await?;
        let url_changed = patch.url.is_some();
        let after = patch.apply(&before, self.allow_private, crate::domain::now())?;
        if url_changed {
            self.check_destination(&after.url).await?;
        }
        Ok(self.store.update_webhook(&after).await?)
    }

    pub async fn delete(&self, tenant_id: Uuid, id: Uuid) -> Result<()> {
        Ok(self.store.delete_webhook(tenant_id, id).await?)
    }

    /// A new secret (shown once); the old one signs too for [`ROTATION_OVERLAP`].
    pub async fn rotate_secret(&self, tenant_id: Uuid, id: Uuid) -> Result<String> {
        let secret = new_secret();
        let until = Utc::now() + chrono::Duration::from_std(ROTATION_OVERLAP).unwrap_or_default();
        self.store.rotate_webhook_secret(tenant_id, id, &self.secret_box.seal(&secret), until).await?;
        tracing::info!(tenant_id = %tenant_id, endpoint_id = %id, "webhook secret rotated");
        Ok(secret)
    }

    /// Sends a `webhook.test` event to one endpoint; returns its id.
    pub async fn test(&self, tenant_id: Uuid, id: Uuid, ctx: &EventContext) -> Result<Uuid> {
        let endpoint = self.store.get_webhook(tenant_id, id).await?;
        let event = DomainEvent::webhook_test(&endpoint, ctx);
        self.jobs
            .enqueue(DeliveryArgs::job(endpoint.id, &event))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(event.id)
    }

    pub async fn deliveries(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        status: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<DeliveryAttempt>> {
        self.store.get_webhook(tenant_id, id).await?;
        Ok(self.store.list_deliveries(id, status, page).await?)
    }

    /// Resends one event to one endpoint now (nothing is sent if it was delivered).
    pub async fn retry(&self, tenant_id: Uuid, id: Uuid, event_id: Uuid) -> Result<()> {
        let endpoint = self.store.get_webhook(tenant_id, id).await?;
        let event = self
            .store
            .outbox_event(event_id)
            .await?
            .filter(|e| e.tenantid == tenant_id)
            .ok_or(Error::NotFound("event"))?;
        self.resend(endpoint.id, &event).await
    }

    /// Resends every event that failed to reach the endpoint since `since`; how many.
    pub async fn recover(&self, tenant_id: Uuid, id: Uuid, since: DateTime<Utc>) -> Result<u64> {
        let endpoint = self.store.get_webhook(tenant_id, id).await?;
        let mut n = 0;
        for event_id in self.store.undelivered_since(endpoint.id, since, MAX_RECOVER).await? {
            if let Some(event) = self.store.outbox_event(event_id).await?.filter(|e| e.tenantid == tenant_id) {
                self.resend(endpoint.id, &event).await?;
                n += 1;
            }
        }
        tracing::info!(tenant_id = %tenant_id, endpoint_id = %id, resent = n, "webhook recover");
        Ok(n)
    }

    /// Endpoints with attempts since `since`, the most failures first (all tenants).
    pub async fn health(&self, since: DateTime<Utc>, limit: u32) -> Result<Vec<crate::store::EndpointHealth>> {
        Ok(self.store.webhook_health(since, limit).await?)
    }

    /// A fresh delivery job: a previous one (dead, or done after failing) keeps its key
    /// for the queue's retention, so the key says which resend this is.
    async fn resend(&self, endpoint_id: Uuid, event: &DomainEvent) -> Result<()> {
        let mut job = DeliveryArgs::job(endpoint_id, event);
        job.idempotency_key = format!("{}:resend:{}", job.idempotency_key, Uuid::now_v7());
        self.jobs.enqueue(job).await.map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(())
    }
}
