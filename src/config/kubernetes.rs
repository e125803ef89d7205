//! `registry.kubernetes`: [`KubernetesSection`], and the registry it builds.

use std::sync::Arc;

use serde::Deserialize;

use crate::error::Result;
use crate::registry::ServiceRegistry;

/// `registry.kubernetes`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KubernetesSection {
    /// Namespace of the services.
    pub namespace: Option<String>,
    /// Use the in-cluster configuration (else kubeconfig).
    pub in_cluster: Option<bool>,
    /// The Service port name to use.
    pub port_name: Option<String>,
    /// Extra label selector.
    pub label_selector: Option<String>,
}

impl KubernetesSection {
    /// The registry this section describes.
    #[cfg(feature = "kubernetes")]
    #[allow(clippy::unnecessary_wraps)] // the same signature as without the feature
    pub(super) fn registry(self, _path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        use super::build::Maybe;
        use crate::registry::kubernetes::KubernetesRegistry;

        let builder = KubernetesRegistry::builder()
            .in_cluster(self.in_cluster.unwrap_or(false))
            .maybe(self.namespace, |b, v| b.namespace(v))
            .maybe(self.port_name, |b, v| b.port_name(v))
            .maybe(self.label_selector, |b, v| b.label_selector(v));
        Ok(Arc::new(builder.build()))
    }

    #[cfg(not(feature = "kubernetes"))]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        Err(super::build::not_compiled_in("kubernetes", path))
    }
}
