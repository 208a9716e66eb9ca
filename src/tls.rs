//! TLS: every client here (sqlx, lapin, lettre, reqwest for OpenSearch) uses rustls with
//! the ring provider, never OpenSSL. reqwest asks for the process-wide default provider,
//! so it is installed once, before any reqwest client is built.

/// Installs ring as the process's rustls provider (idempotent; a provider installed
/// earlier by someone else is kept).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
