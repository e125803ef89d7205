//! The service's current leaf certificate and the CA roots, kept fresh by one background
//! task that follows the agent's blocking queries.
//!
//! The leaf is asked for again before it expires even when the agent's blocking query has
//! not returned: the wait of each leaf query ends at the renewal point (nine tenths of the
//! certificate's lifetime), so a stalled query cannot let the certificate lapse. Each new
//! leaf or root set replaces the old one atomically (arc-swap); TLS configurations read it
//! at every handshake, so a rotation applies to new connections and leaves open ones alone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::agent::{AgentWatch, CaRoots, LeafCert};
use super::identity::CertFacts;
use crate::error::{BoxError, Chain, Error, Result};

const REGISTRY: &str = "consul";

/// The leaf certificate this service presents.
#[derive(Debug)]
pub(crate) struct Leaf {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) facts: CertFacts,
}

/// The CA roots, as a trust store and as the client-certificate verifier built from it.
#[derive(Debug)]
pub(crate) struct Roots {
    pub(crate) store: Arc<RootCertStore>,
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
}

/// What the refresher publishes and the TLS configurations read.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) leaf: ArcSwapOption<Leaf>,
    pub(crate) roots: ArcSwapOption<Roots>,
    /// Notified at every change, for waiters.
    pub(crate) changes: watch::Sender<()>,
    /// The last fetch error.
    pub(crate) last_error: Mutex<Option<Error>>,
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn malformed(source: impl Into<BoxError>) -> Error {
    Error::Malformed {
        registry: REGISTRY,
        source: source.into(),
    }
}

impl Store {
    pub(crate) fn new() -> Self {
        Self {
            leaf: ArcSwapOption::empty(),
            roots: ArcSwapOption::empty(),
            changes: watch::Sender::new(()),
            last_error: Mutex::new(None),
        }
    }

    fn changed(&self) {
        self.changes.send_replace(());
    }

    fn failed(&self, what: &str, error: Error) {
        warn!(what, error = %Chain(&error), "Consul Connect: fetching from the agent failed; keeping the current certificates");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        self.changed();
    }
}

impl Leaf {
    fn parse(answer: &LeafCert) -> Result<Self> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(answer.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(malformed)?;
        let first = chain
            .first()
            .ok_or_else(|| malformed("CertPEM holds no certificate"))?;
        let facts = CertFacts::read(first).map_err(malformed)?;
        let key = PrivateKeyDer::from_pem_slice(answer.private_key_pem.0.as_bytes())
            .map_err(|_| malformed("PrivateKeyPEM holds no private key"))?;
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(malformed)?;
        Ok(Self {
            key: Arc::new(key),
            facts,
        })
    }

    /// When to ask for a new leaf even if the agent has not sent one: at nine tenths of
    /// its lifetime.
    fn renew_at(&self) -> SystemTime {
        let facts = &self.facts;
        let lifetime = facts
            .not_after
            .duration_since(facts.not_before)
            .unwrap_or_default();
        facts.not_after - lifetime / 10
    }
}

impl Roots {
    fn parse(answer: &CaRoots) -> Result<Self> {
        let mut store = RootCertStore::empty();
        for root in &answer.roots {
            for cert in CertificateDer::pem_slice_iter(root.root_cert.as_bytes()) {
                store.add(cert.map_err(malformed)?).map_err(malformed)?;
            }
        }
        if store.is_empty() {
            return Err(malformed("the agent answered no CA root"));
        }
        let store = Arc::new(store);
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&store),
            provider(),
        )
        .build()
        .map_err(malformed)?;
        Ok(Self {
            store,
            client_verifier,
        })
    }
}

/// The wait of the next leaf query: until the renewal point, at least 1 s (so a leaf past
/// it is asked for once a second, never in a hot loop), at most `max`.
fn leaf_wait(leaf: Option<&Leaf>, max: Duration) -> Duration {
    let Some(leaf) = leaf else { return max };
    let left = leaf
        .renew_at()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    left.max(Duration::from_secs(1)).min(max)
}

/// Follows the roots and the leaf of `service` until dropped.
pub(crate) async fn refresh(
    store: Arc<Store>,
    mut roots: AgentWatch<CaRoots>,
    mut leaf: AgentWatch<LeafCert>,
) {
    // The registry's wait (`AgentWatch` caps every wait at it).
    let wait = Duration::MAX;
    let roots = async {
        loop {
            match roots
                .next(wait)
                .await
                .and_then(|answer| Roots::parse(&answer))
            {
                Ok(new) => {
                    debug!(roots = new.store.len(), "Consul Connect: CA roots");
                    store.roots.store(Some(Arc::new(new)));
                    store.changed();
                }
                Err(error) => store.failed("CA roots", error),
            }
        }
    };
    let leaf = async {
        // The serial last warned about as not renewed, so the warning comes once per leaf.
        let mut warned: Option<String> = None;
        loop {
            let current = store.leaf.load_full();
            let wait = leaf_wait(current.as_deref(), wait);
            match leaf
                .next(wait)
                .await
                .and_then(|answer| Leaf::parse(&answer))
            {
                Ok(new) => {
                    let serial = &new.facts.serial;
                    if current.as_ref().is_none_or(|c| c.facts.serial != *serial) {
                        info!(serial, id = %new.facts.id, "Consul Connect: new leaf certificate");
                        store.leaf.store(Some(Arc::new(new)));
                        store.changed();
                    } else if SystemTime::now() >= new.renew_at() && warned.as_ref() != Some(serial)
                    {
                        warned = Some(serial.clone());
                        warn!(
                            serial,
                            "Consul Connect: the agent has not renewed the leaf certificate yet"
                        );
                    }
                }
                Err(error) => store.failed("leaf certificate", error),
            }
        }
    };
    tokio::join!(roots, leaf);
}
