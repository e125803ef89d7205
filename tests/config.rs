//! The configuration file and the registry factory.
#![cfg(feature = "config")]

use tower_sd_testkit as support;

use std::time::Duration;

use tower_sd::config::RegistryConfig;
use tower_sd::{Error, ServiceInstance, ServiceRegistry};

/// The decision record's YAML, exactly as written there.
const DECISION_RECORD: &str = r#"
registry:
  type: consul            # consul | kubernetes | etcd | dns | static | memory
  consul:
    address: "localhost:8500"
    datacenter: "dc1"
    scheme: "http"
    health_check: { interval: "10s", timeout: "3s", deregister_after: "1m" }
  kubernetes:
    namespace: "default"
    in_cluster: true
"#;

/// The key and message of an `InvalidConfig`.
fn invalid(result: tower_sd::Result<impl std::fmt::Debug>) -> (String, String) {
    match result {
        Err(Error::InvalidConfig { key, source }) => (key, source.to_string()),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn the_decision_record_parses_to_the_expected_values() {
    let config = RegistryConfig::from_yaml_str(DECISION_RECORD).unwrap();
    let registry = &config.registry;
    assert_eq!(registry.kind, "consul");
    let consul = registry.consul.as_ref().unwrap();
    assert_eq!(consul.address.as_deref(), Some("localhost:8500"));
    assert_eq!(consul.datacenter.as_deref(), Some("dc1"));
    assert_eq!(consul.scheme.as_deref(), Some("http"));
    let check = consul.health_check.as_ref().unwrap();
    assert_eq!(check.interval, Some(Duration::from_secs(10)));
    assert_eq!(check.timeout, Some(Duration::from_secs(3)));
    assert_eq!(check.deregister_after, Some(Duration::from_secs(60)));
    let kubernetes = registry.kubernetes.as_ref().unwrap();
    assert_eq!(kubernetes.namespace.as_deref(), Some("default"));
    assert_eq!(kubernetes.in_cluster, Some(true));
}

#[cfg(feature = "consul")]
#[tokio::test]
async fn the_decision_record_builds_a_consul_registry() {
    let _limit = support::time_limit(60);
    // The decision record's file, pointed at the fake agent: what it registers and asks
    // carries the file's settings.
    let fake = support::fake_consul::FakeConsul::start(None).await;
    let yaml = DECISION_RECORD.replace("localhost:8500", &fake.addr.to_string());
    let registry = RegistryConfig::from_yaml_str(&yaml)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(registry.kind(), "consul");
    registry
        .register(ServiceInstance::new("web-1", "web", "10.0.0.7", 8080))
        .await
        .unwrap();
    let check = &fake.registration("web-1").unwrap()["Check"];
    assert_eq!(check["HTTP"], "http://10.0.0.7:8080/healthz");
    assert_eq!(check["Interval"], "10s");
    assert_eq!(check["Timeout"], "3s");
    assert_eq!(check["DeregisterCriticalServiceAfter"], "60s");
    registry.discover(&"web".into()).await.unwrap();
    let query = fake
        .requests()
        .into_iter()
        .find(|r| r.starts_with("GET health/service/web?"))
        .unwrap();
    assert!(query.contains("dc=dc1"), "the datacenter is asked: {query}");
}

#[test]
fn toml_is_accepted_too() {
    let _limit = support::time_limit(30);
    let config = RegistryConfig::from_toml_str(
        r#"
        [registry]
        type = "static"
        [[registry.static.instances]]
        id = "a"
        name = "api"
        address = "10.0.0.1"
        port = 80
        "#,
    )
    .unwrap();
    let registry = config.build().unwrap();
    assert_eq!(registry.kind(), "static");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let found = runtime.block_on(registry.discover(&"api".into())).unwrap();
    assert_eq!(found, [ServiceInstance::new("a", "api", "10.0.0.1", 80)]);
}

#[test]
fn every_invalid_configuration_names_its_key() {
    let (key, message) = invalid(
        RegistryConfig::from_yaml_str("registry:\n  type: zookeeper\n")
            .unwrap()
            .build(),
    );
    assert_eq!(key, "registry.type");
    assert!(
        message.contains("zookeeper")
            && message.contains("consul, kubernetes, etcd, dns, static, memory"),
        "{message}"
    );

    // A backend left out of the build names its feature (only testable without it).
    #[cfg(not(feature = "kubernetes"))]
    {
        let (key, message) = invalid(
            RegistryConfig::from_yaml_str("registry:\n  type: kubernetes\n")
                .unwrap()
                .build(),
        );
        assert_eq!(key, "registry.type");
        assert!(message.contains("cargo feature `kubernetes`"), "{message}");
    }

    let (key, message) = invalid(RegistryConfig::from_yaml_str(
        "registry:\n  type: consul\n  consul:\n    health_check: { interval: \"10 parsecs\" }\n",
    ));
    assert_eq!(key, "registry.consul.health_check.interval");
    assert!(message.contains("10 parsecs"), "{message}");

    let (key, message) = invalid(RegistryConfig::from_yaml_str(
        "registry:\n  type: consul\n  consul:\n    adress: x\n",
    ));
    assert_eq!(key, "registry.consul.adress");
    assert!(message.contains("unknown field `adress`"), "{message}");

    let (key, _) = invalid(RegistryConfig::from_yaml_str(
        "registry:\n  type: memory\n  extra: 1\n",
    ));
    assert_eq!(key, "registry.extra");

    let (key, _) = invalid(RegistryConfig::from_yaml_str("registry: [unclosed\n"));
    assert_eq!(key, "(document)");

    let (key, _) = invalid(RegistryConfig::from_path("/nonexistent/registry.yaml"));
    assert_eq!(key, "(file)");
}

#[cfg(feature = "consul")]
#[test]
fn a_consul_address_without_a_port_is_rejected() {
    let config = RegistryConfig::from_yaml_str(
        "registry:\n  type: consul\n  consul:\n    address: localhost\n",
    )
    .unwrap();
    let (key, message) = invalid(config.with_env(|_| None).build());
    assert_eq!(key, "registry.consul.address");
    assert!(message.contains("no port"), "{message}");
}

#[test]
fn the_environment_overrides_the_file() {
    let config = RegistryConfig::from_yaml_str(DECISION_RECORD)
        .unwrap()
        .with_env(|name| match name {
            "CONSUL_HTTP_ADDR" => Some("consul.internal:8501".to_owned()),
            "CONSUL_HTTP_TOKEN" => Some("from-env".to_owned()),
            _ => None,
        });
    let consul = config.registry.consul.as_ref().unwrap();
    assert_eq!(consul.address.as_deref(), Some("consul.internal:8501"));
    assert_eq!(consul.token.as_deref(), Some("from-env"));
    assert!(
        !format!("{consul:?}").contains("from-env"),
        "the token is redacted"
    );
}

#[test]
fn cache_and_fallback_wrap_the_registry() {
    let config = RegistryConfig::from_yaml_str(
        r#"
registry:
  type: memory
  cache: { max_stale: "5m", persist: "/var/cache/tower-sd-test.json" }
  failover_after: "10s"
  fallback:
    - type: static
      static:
        instances:
          - { id: "a", name: "api", address: "10.0.0.1", port: 80 }
"#,
    )
    .unwrap();
    let registry = config.build().unwrap();
    assert_eq!(registry.kind(), "fallback");
    // The memory registry behind a cache with the file's settings, then the static list.
    let debug = format!("{registry:?}");
    for part in [
        "FallbackRegistry { chain: [CachedRegistry { inner: MemoryRegistry",
        "max_stale: Some(300s)",
        "persist: Some(\"/var/cache/tower-sd-test.json\")",
        "StaticRegistry { instances: [ServiceInstance { id: \"a\"",
        "failover_after: 10s",
    ] {
        assert!(debug.contains(part), "{part} in {debug}");
    }

    let (key, _) = invalid(
        RegistryConfig::from_yaml_str(
            "registry:\n  type: memory\n  fallback:\n    - type: static\n      static:\n        instances:\n          - { id: a, name: api, address: 10.0.0.1, port: 0 }\n",
        )
        .unwrap()
        .build(),
    );
    assert_eq!(key, "registry.fallback[0].static.instances");
}

#[test]
fn the_example_configuration_files_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        RegistryConfig::from_path(&path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        seen += 1;
    }
    assert!(seen >= 5, "one file per backend");
}

#[cfg(feature = "kubernetes")]
#[test]
fn the_kubernetes_section_builds_a_kubernetes_registry() {
    let config = RegistryConfig::from_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/kubernetes.yaml"),
    )
    .unwrap();
    // The client is made on first use, so building needs neither a cluster nor a runtime.
    let registry = config.build().unwrap();
    assert_eq!(registry.kind(), "kubernetes");
    let debug = format!("{registry:?}");
    assert!(
        debug.contains("InCluster") && debug.contains("\"grpc\""),
        "{debug}"
    );
}

#[cfg(feature = "etcd")]
#[test]
fn the_etcd_section_builds_an_etcd_registry() {
    let config = RegistryConfig::from_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/etcd.yaml"),
    )
    .unwrap();
    let registry = config.build().unwrap();
    assert_eq!(registry.kind(), "etcd");
    let debug = format!("{registry:?}");
    for part in [
        "endpoints: [\"http://127.0.0.1:2379\"]",
        "prefix: \"/services\"",
        "lease_ttl: 10s",
    ] {
        assert!(debug.contains(part), "{part} in {debug}");
    }

    let with_password = RegistryConfig::from_yaml_str(
        "registry:\n  type: etcd\n  etcd:\n    endpoints: [\"http://127.0.0.1:2379\"]\n    username: root\n    password: hunter2\n",
    )
    .unwrap();
    let debug = format!("{with_password:?} {:?}", with_password.build().unwrap());
    assert!(!debug.contains("hunter2"), "{debug}");

    let (key, _) = invalid(
        RegistryConfig::from_yaml_str(
            "registry:\n  type: etcd\n  etcd:\n    endpoints: [\"127.0.0.1:2379\"]\n",
        )
        .unwrap()
        .build(),
    );
    assert_eq!(key, "registry.etcd.endpoints");
    let (key, _) = invalid(
        RegistryConfig::from_yaml_str("registry:\n  type: etcd\n  etcd:\n    endpoints: [\"http://e:2379\"]\n    username: root\n")
            .unwrap()
            .build(),
    );
    assert_eq!(key, "registry.etcd.password");
    let (key, _) = invalid(
        RegistryConfig::from_yaml_str(
            "registry:\n  type: memory\n  fallback:\n    - type: etcd\n      etcd: { endpoints: [\"http://e:2379\"], prefix: \"services\" }\n",
        )
        .unwrap()
        .build(),
    );
    assert_eq!(key, "registry.fallback[0].etcd.prefix");
}

#[cfg(feature = "dns")]
#[test]
fn the_dns_section_builds_a_dns_registry() {
    let config = RegistryConfig::from_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/dns.yaml"),
    )
    .unwrap();
    assert_eq!(config.build().unwrap().kind(), "dns");
    // Every key reaches the registry (values other than the defaults, so that a key read
    // and dropped shows).
    let registry = RegistryConfig::from_yaml_str(
        "registry:\n  type: dns\n  dns:\n    nameservers: [\"127.0.0.1:5353\"]\n    \
         min_ttl: \"7s\"\n    max_ttl: \"9m\"\n    record: \"a\"\n    port: 8080\n",
    )
    .unwrap()
    .build()
    .unwrap();
    let shown = format!("{registry:?}");
    for setting in [
        "nameservers: [127.0.0.1:5353]",
        "record: A",
        "port: Some(8080)",
        "min_ttl: 7s",
        "max_ttl: 540s",
    ] {
        assert!(shown.contains(setting), "{setting} in {shown}");
    }

    let (key, message) = invalid(
        RegistryConfig::from_yaml_str(
            "registry:\n  type: dns\n  dns:\n    nameservers: [\"127.0.0.1:53\", \"localhost\"]\n",
        )
        .unwrap()
        .build(),
    );
    assert_eq!(key, "registry.dns.nameservers[1]");
    assert!(message.contains("localhost"), "{message}");
    let (key, message) = invalid(
        RegistryConfig::from_yaml_str("registry:\n  type: dns\n  dns:\n    record: mx\n")
            .unwrap()
            .build(),
    );
    assert_eq!(key, "registry.dns.record");
    assert!(message.contains("srv, a, aaaa, ip"), "{message}");
    let (key, _) = invalid(
        RegistryConfig::from_yaml_str(
            "registry:\n  type: dns\n  dns:\n    min_ttl: 10m\n    max_ttl: 1m\n",
        )
        .unwrap()
        .build(),
    );
    assert_eq!(key, "registry.dns.min_ttl");
}

#[test]
fn the_environment_overrides_only_the_primary_consul() {
    let config = RegistryConfig::from_yaml_str(
        r#"
registry:
  type: consul
  consul: { address: "primary:8500", token: "file-token" }
  fallback:
    - type: consul
      consul: { address: "other-dc:8500", token: "other-token" }
"#,
    )
    .unwrap()
    .with_env(|name| match name {
        "CONSUL_HTTP_ADDR" => Some("from-env:8500".to_owned()),
        "CONSUL_HTTP_TOKEN" => Some("env-token".to_owned()),
        _ => None,
    });
    let primary = config.registry.consul.as_ref().unwrap();
    assert_eq!(primary.address.as_deref(), Some("from-env:8500"));
    assert_eq!(primary.token.as_deref(), Some("env-token"));
    let fallback = config.registry.fallback[0].consul.as_ref().unwrap();
    assert_eq!(fallback.address.as_deref(), Some("other-dc:8500"));
    assert_eq!(fallback.token.as_deref(), Some("other-token"));

    // A fallback chain whose primary is not Consul: nothing is overridden.
    let config = RegistryConfig::from_yaml_str(
        "registry:\n  type: memory\n  fallback:\n    - type: consul\n      consul: { address: \"c:8500\" }\n",
    )
    .unwrap()
    .with_env(|_| Some("from-env:1".to_owned()));
    assert!(config.registry.consul.is_none());
    let fallback = config.registry.fallback[0].consul.as_ref().unwrap();
    assert_eq!(fallback.address.as_deref(), Some("c:8500"));
}

/// Catches a backend error that keeps the backend's own name (`consul.ca_file`) or a fixed
/// `registry.` root: inside a fallback, the key must say which entry it is.
#[cfg(all(feature = "consul", feature = "etcd", feature = "dns"))]
#[test]
fn backend_errors_inside_a_fallback_name_their_place_in_the_file() {
    let missing = "/nonexistent/tower-sd-test-ca.pem";
    for (backend, section, want) in [
        (
            "consul",
            format!("consul: {{ address: \"127.0.0.1:8501\", ca_file: \"{missing}\" }}"),
            "registry.fallback[0].consul.ca_file",
        ),
        (
            "etcd",
            format!("etcd: {{ endpoints: [\"https://e:2379\"], ca_file: \"{missing}\" }}"),
            "registry.fallback[0].etcd.ca_file",
        ),
        (
            "dns",
            "dns: { min_ttl: 10m, max_ttl: 1m }".to_owned(),
            "registry.fallback[0].dns.min_ttl",
        ),
    ] {
        let yaml = format!(
            "registry:\n  type: memory\n  fallback:\n    - type: {backend}\n      {section}\n"
        );
        let (key, message) = invalid(RegistryConfig::from_yaml_str(&yaml).unwrap().build());
        assert_eq!(key, want, "{backend}: {message}");
    }
}

#[test]
fn a_duration_that_overflows_is_an_error_naming_its_key() {
    let (key, message) = invalid(RegistryConfig::from_yaml_str(
        "registry:\n  type: memory\n  cache: { max_stale: \"10000000000000000000s10000000000000000000s\" }\n",
    ));
    assert_eq!(key, "registry.cache.max_stale");
    assert!(message.contains("too long"), "{message}");
}

#[test]
fn syntax_errors_never_show_a_secret() {
    const SECRET: &str = "s3cr3t-9f2a";
    let broken_yaml =
        format!("registry:\n  type: consul\n  consul:\n    token: \"{SECRET}\n    address: [\n");
    let broken_toml =
        format!("[registry]\ntype = \"consul\"\n[registry.consul]\ntoken = \"{SECRET}\n");
    let unquoted_toml =
        format!("[registry]\ntype = \"consul\"\n[registry.consul]\ntoken = {SECRET}\n");
    for (what, result) in [
        ("yaml", RegistryConfig::from_yaml_str(&broken_yaml)),
        ("toml", RegistryConfig::from_toml_str(&broken_toml)),
        (
            "unquoted toml",
            RegistryConfig::from_toml_str(&unquoted_toml),
        ),
    ] {
        let error = result.unwrap_err();
        let shown = format!("{error:?} {error} {}", tower_sd_chain(&error));
        assert!(!shown.contains(SECRET), "{what}: {shown}");
        assert!(shown.contains("line"), "{what}: says where: {shown}");
    }
    // A value of the wrong type under a secret key is not shown either.
    let (key, message) = invalid(RegistryConfig::from_yaml_str(
        "registry:\n  type: consul\n  consul:\n    token: 918273645\n",
    ));
    assert_eq!(key, "registry.consul.token");
    assert!(!message.contains("918273645"), "{message}");
}

/// An error and its sources, as a log line would show them.
fn tower_sd_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    text
}

/// Catches a `service_config` section not read (YAML or TOML), read into something other
/// than gRPC's service config, or an invalid field in it that does not name itself.
#[cfg(feature = "tonic")]
#[test]
fn a_service_config_rides_beside_the_registry() {
    let yaml = RegistryConfig::from_yaml_str(
        r#"
registry: { type: memory }
service_config:
  methodConfig:
    - name: [ { service: "helloworld.Greeter" } ]
      timeout: "2s"
      retryPolicy: { maxAttempts: 3, initialBackoff: "0.1s", maxBackoff: "1s",
                     backoffMultiplier: 2, retryableStatusCodes: [ UNAVAILABLE ] }
  retryThrottling: { maxTokens: 10, tokenRatio: 0.1 }
"#,
    )
    .unwrap();
    let toml = RegistryConfig::from_toml_str(
        r#"
[registry]
type = "memory"

[service_config]
retryThrottling = { maxTokens = 10, tokenRatio = 0.1 }

[[service_config.methodConfig]]
name = [ { service = "helloworld.Greeter" } ]
timeout = "2s"
retryPolicy = { maxAttempts = 3, initialBackoff = "0.1s", maxBackoff = "1s", backoffMultiplier = 2, retryableStatusCodes = [ "UNAVAILABLE" ] }
"#,
    )
    .unwrap();
    assert_eq!(yaml, toml);
    let config = yaml.service_config.expect("read");
    let method = config
        .method("/helloworld.Greeter/SayHello")
        .expect("by service");
    assert_eq!(method.timeout, Some(std::time::Duration::from_secs(2)));
    assert_eq!(method.retry.as_ref().map(|r| r.max_attempts), Some(3));
    assert!(config.retry_throttling().is_some());

    let (key, why) = invalid(RegistryConfig::from_yaml_str(
        "registry: { type: memory }\nservice_config: { retryThrottling: { maxTokens: 0, tokenRatio: 1 } }\n",
    ));
    assert!(key.starts_with("service_config"), "{key}");
    assert!(why.contains("retryThrottling.maxTokens"), "{why}");
}

/// Catches `max_stale` parsed but not applied: the file's limit makes a read from a
/// server 6 s out of touch with its leader an error.
#[cfg(feature = "consul")]
#[tokio::test]
async fn a_consul_max_stale_from_the_file_refuses_older_answers() {
    let _limit = support::time_limit(60);
    let fake = support::fake_consul::FakeConsul::start(None).await;
    fake.set_leader(true, Duration::from_secs(6));
    let yaml = format!(
        "registry:\n  type: consul\n  consul:\n    address: \"{}\"\n    max_stale: \"5s\"\n",
        fake.addr
    );
    let registry = RegistryConfig::from_yaml_str(&yaml)
        .unwrap()
        .build()
        .unwrap();
    let error = registry.discover(&"web".into()).await.unwrap_err();
    assert!(matches!(error, Error::Stale { .. }), "{error:?}");
}

/// Catches failover settings that do not reach the registry (queries would follow one
/// datacenter), read from YAML and TOML, and both forms given at once taken silently.
#[tokio::test]
async fn consul_failover_from_the_file_follows_the_datacenters_in_order() {
    let _limit = support::time_limit(60);
    let fake = support::fake_consul::FakeConsul::start(None).await;
    fake.set_datacenters(&["dc1", "dc3", "dc2"]);
    for (node, dc) in [("node-2", "dc2"), ("node-3", "dc3")] {
        fake.set_node_datacenter(node, dc);
        let registration = serde_json::json!({
            "ID": "web", "Name": "web", "Tags": [], "Address": "10.0.0.9", "Port": 80,
            "Meta": {}, "Weights": {"Passing": 1, "Warning": 1},
        });
        fake.register_on(node, registration, "passing");
    }
    let tiers = |set: Vec<tower_sd::ServiceInstance>| -> Vec<(String, u16)> {
        set.into_iter().map(|i| (i.id, i.priority)).collect()
    };
    let yaml = format!(
        "registry:\n  type: consul\n  consul:\n    address: \"{}\"\n    failover: [\"dc2\", \"dc3\"]\n",
        fake.addr
    );
    let registry = RegistryConfig::from_yaml_str(&yaml)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        tiers(registry.discover(&"web".into()).await.unwrap()),
        [
            ("dc2/node-2/web".to_owned(), 1),
            ("dc3/node-3/web".to_owned(), 2)
        ]
    );
    let toml = format!(
        "[registry]\ntype = \"consul\"\n[registry.consul]\naddress = \"{}\"\nnearest_datacenters = 1\ndatacenters_refresh = \"1s\"\n",
        fake.addr
    );
    let registry = RegistryConfig::from_toml_str(&toml)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        tiers(registry.discover(&"web".into()).await.unwrap()),
        [("dc3/node-3/web".to_owned(), 1)],
        "dc3 is the nearest"
    );
    let both = format!("{yaml}    nearest_datacenters: 1\n");
    let error = RegistryConfig::from_yaml_str(&both)
        .unwrap()
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidConfig { key, .. } if key == "registry.consul.nearest_datacenters"),
        "{error:?}"
    );
}
