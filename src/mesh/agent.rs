//! The agent's Connect-native endpoints (`api-docs/agent/connect.mdx`): CA roots and leaf
//! certificates with blocking queries, and connection authorization. Consul marks them
//! deprecated since 1.18 (in favour of a future proxyless integration) and still serves them.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use tokio::time::sleep;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::registry::Secret;
use crate::registry::consul::client::Client;
use crate::registry::consul::watch::{TokenBucket, next_index};

const REGISTRY: &str = "consul";

/// `GET /v1/agent/connect/ca/roots` (its `TrustDomain` is not read: as in Consul's Go SDK,
/// the roots alone decide which trust domains are accepted).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CaRoots {
    #[serde(default)]
    pub(crate) roots: Vec<CaRoot>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CaRoot {
    /// The root certificate, PEM.
    pub(crate) root_cert: String,
}

/// `GET /v1/agent/connect/ca/leaf/:service`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct LeafCert {
    /// The leaf, then any intermediates, PEM.
    #[serde(rename = "CertPEM")]
    pub(crate) cert_pem: String,
    #[serde(rename = "PrivateKeyPEM", deserialize_with = "secret")]
    pub(crate) private_key_pem: Secret,
}

fn secret<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
    String::deserialize(deserializer).map(Secret)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Authorization {
    authorized: bool,
    #[serde(default)]
    reason: String,
}

/// One blocking query followed over time, with the rules of the health watch
/// (`watch.rs`): the next index from the answer, a reset when it goes backwards, a
/// non-blocking query after an error, a token bucket, and a jittered backoff after errors.
pub(crate) struct AgentWatch<T> {
    client: Arc<Client>,
    path: Vec<String>,
    index: u64,
    bucket: TokenBucket,
    backoff: Backoff,
    failed: bool,
    answer: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for AgentWatch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentWatch")
            .field("path", &self.path)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl AgentWatch<CaRoots> {
    /// Follows the CA roots.
    pub(crate) fn roots(client: Arc<Client>) -> Self {
        Self::new(client, &["v1", "agent", "connect", "ca", "roots"])
    }
}

impl AgentWatch<LeafCert> {
    /// Follows `service`'s leaf certificate.
    pub(crate) fn leaf(client: Arc<Client>, service: &str) -> Self {
        Self::new(client, &["v1", "agent", "connect", "ca", "leaf", service])
    }
}

impl<T: serde::de::DeserializeOwned> AgentWatch<T> {
    fn new(client: Arc<Client>, path: &[&str]) -> Self {
        let settings = &client.settings;
        Self {
            bucket: TokenBucket::new(settings.requests_per_second),
            backoff: Backoff::new(settings.retry_base, settings.retry_max),
            client,
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            index: 0,
            failed: false,
            answer: PhantomData,
        }
    }

    /// The next answer: at once the first time and after an error (once the backoff has
    /// passed), else when the index moves or `wait` (at most the registry's) passes.
    /// Dropping the future cancels the query; the state stays consistent.
    pub(crate) async fn next(&mut self, wait: Duration) -> Result<T> {
        if self.failed {
            sleep(self.backoff.next_delay()).await;
            self.failed = false;
        }
        self.bucket.take().await;
        let segments: Vec<&str> = self.path.iter().map(String::as_str).collect();
        let request = self.client.request(Method::GET, self.client.url(&segments));
        let wait = wait.min(self.client.settings.wait);
        match self.client.get_json(request, Some(self.index), wait).await {
            Ok((value, returned)) => {
                self.index = next_index(self.index, returned);
                self.backoff.reset();
                Ok(value)
            }
            Err(error) => {
                self.index = 0;
                self.failed = true;
                Err(error)
            }
        }
    }
}

impl Client {
    /// Whether the client with this certificate may connect to `target`, and why.
    pub(crate) async fn connect_authorize(
        &self,
        target: &str,
        client_cert_uri: &str,
        client_cert_serial: &str,
    ) -> Result<(bool, String)> {
        let url = self.url(&["v1", "agent", "connect", "authorize"]);
        let request = self.request(Method::POST, url).json(&json!({
            "Target": target,
            "ClientCertURI": client_cert_uri,
            "ClientCertSerial": client_cert_serial,
        }));
        let (answer, _): (Authorization, _) = self.get_json(request, None, Duration::ZERO).await?;
        Ok((answer.authorized, answer.reason))
    }

    /// Sends a (blocking, with `index`) request that must succeed, and decodes its body.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(T, Option<u64>)> {
        let (request, timeout) = self.blocking(request, index, wait);
        let (status, index, body) = self.send(request, timeout).await?;
        if !status.is_success() {
            return Err(crate::registry::consul::client::status_error(status, &body));
        }
        let value = serde_json::from_slice(&body).map_err(|e| Error::Malformed {
            registry: REGISTRY,
            source: e.into(),
        })?;
        Ok((value, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_documented_answers_and_hides_the_key() {
        let leaf: LeafCert = serde_json::from_str(
            r#"{"SerialNumber": "60:a3:7b", "CertPEM": "-----BEGIN CERTIFICATE-----",
                "PrivateKeyPEM": "-----BEGIN EC PRIVATE KEY-----", "Service": "web",
                "ServiceURI": "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web",
                "ValidAfter": "2018-05-25T21:39:23Z", "ValidBefore": "2018-05-28T21:39:23Z",
                "CreateIndex": 5, "ModifyIndex": 5}"#,
        )
        .unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE"));
        assert!(!format!("{leaf:?}").contains("PRIVATE"), "{leaf:?}");
        let roots: CaRoots = serde_json::from_str(
            r#"{"ActiveRootID": "c7:bd", "TrustDomain": "7f42f496.consul",
                "Roots": [{"ID": "c7:bd", "Name": "Consul CA Root Cert", "RootCert": "PEM",
                           "IntermediateCerts": null, "Active": true}]}"#,
        )
        .unwrap();
        assert_eq!(roots.roots[0].root_cert, "PEM");
    }

    /// Catches a `Debug` that says nothing of what the watch follows.
    #[test]
    fn a_watch_shows_its_path_and_index() {
        let consul = crate::registry::consul::ConsulRegistry::builder()
            .build()
            .unwrap();
        let watch = AgentWatch::<CaRoots>::roots(consul.client());
        let shown = format!("{watch:?}");
        assert!(
            shown.starts_with("AgentWatch")
                && shown.contains("roots")
                && shown.contains("index: 0"),
            "{shown}"
        );
    }
}
