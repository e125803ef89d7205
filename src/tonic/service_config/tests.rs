use super::*;

fn parse(json: &str) -> ServiceConfig {
    json.parse()
        .unwrap_or_else(|error| panic!("{json}: {error}"))
}

/// The field a config is refused for, with the reason.
fn refused(json: &str) -> (String, String) {
    match json.parse::<ServiceConfig>() {
        Ok(config) => panic!("{json} was taken: {config:?}"),
        Err(ServiceConfigError::Invalid { field, reason }) => (field, reason),
        Err(error) => panic!("{json}: {error}"),
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// gRPC's published examples (grpc's doc/service_config.md; grpc-java's retrying and
/// hedging examples; grpc-go's retry example, which writes its fields in PascalCase, and its
/// health example). Catches a field read under one spelling only, a duration or code read
/// wrong, and a method looked up without its service's fallback.
#[test]
fn grpc_published_examples_parse() {
    let doc = parse(
        r#"{
          "loadBalancingConfig": [ { "round_robin": {} } ],
          "methodConfig": [ {
              "name": [ { "service": "foo", "method": "bar" }, { "service": "baz" } ],
              "timeout": "1.000000001s"
          } ]
        }"#,
    );
    let bar = doc.method("/foo/bar").expect("named");
    assert_eq!(bar.timeout, Some(Duration::new(1, 1)));
    assert_eq!(doc.method("/baz/any"), Some(bar), "by its service");
    assert_eq!(
        doc.method("/foo/other"),
        None,
        "foo's other methods are not named"
    );
    assert_eq!(doc.load_metric(), Err(&["round_robin".to_owned()][..]));

    let java_retry = parse(
        r#"{ "methodConfig": [ {
              "name": [ { "service": "helloworld.Greeter", "method": "SayHello" } ],
              "retryPolicy": {
                "maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "30s",
                "backoffMultiplier": 2, "retryableStatusCodes": [ "UNAVAILABLE" ]
              } } ] }"#,
    );
    let retry = java_retry.method("/helloworld.Greeter/SayHello").unwrap();
    assert_eq!(
        retry.retry,
        Some(RetryPolicy {
            max_attempts: 5,
            initial_backoff: SECOND / 2,
            max_backoff: 30 * SECOND,
            backoff_multiplier: 2.0,
            retryable_codes: Codes::default().with(tonic::Code::Unavailable),
        })
    );

    let java_hedging = parse(
        r#"{ "methodConfig": [ {
              "name": [ { "service": "helloworld.Greeter", "method": "SayHello" } ],
              "hedgingPolicy": { "maxAttempts": 3, "hedgingDelay": "1s" } } ],
             "retryThrottling": { "maxTokens": 10, "tokenRatio": 0.1 } }"#,
    );
    let hedging = java_hedging.method("/helloworld.Greeter/SayHello").unwrap();
    assert_eq!(
        hedging.hedging,
        Some(HedgingPolicy {
            max_attempts: 3,
            hedging_delay: SECOND,
            non_fatal_codes: Codes::default(),
        })
    );
    assert_eq!(
        java_hedging.retry_throttling(),
        Some(RetryThrottling {
            max_milli_tokens: 10_000,
            milli_token_ratio: 100,
        })
    );

    let go_retry = parse(
        r#"{ "methodConfig": [{
              "name": [{"service": "grpc.examples.echo.Echo"}],
              "retryPolicy": {
                  "MaxAttempts": 4, "InitialBackoff": ".01s", "MaxBackoff": ".01s",
                  "BackoffMultiplier": 1.0, "RetryableStatusCodes": [ "UNAVAILABLE" ]
              } }]}"#,
    );
    let policy = go_retry
        .method("/grpc.examples.echo.Echo/UnaryEcho")
        .unwrap();
    let policy = policy.retry.as_ref().unwrap();
    assert_eq!(
        (policy.max_attempts, policy.initial_backoff),
        (4, SECOND / 100)
    );

    let go_health = parse(
        r#"{ "loadBalancingPolicy": "round_robin", "healthCheckConfig": { "serviceName": "" } }"#,
    );
    assert_eq!(go_health.health_check_service(), Some(""));
}

/// Catches a snake_case field not read, the default entry not applied, a number code not
/// read, `maxAttempts` not capped at 5, and a policy list that does not fall through to
/// the first policy tower-sd has.
#[test]
fn snake_case_numbers_the_default_and_the_policies_tower_sd_has() {
    let config = parse(
        r#"{ "method_config": [
              { "name": [ {} ], "wait_for_ready": true, "retry_policy": {
                  "max_attempts": 9, "initial_backoff": "1s", "max_backoff": "2s",
                  "backoff_multiplier": 1.5, "retryable_status_codes": [ 14, "ABORTED" ] } },
              { "name": [ { "service": "a.B", "method": "C" } ], "timeout": "0s" } ],
             "load_balancing_config": [ { "pick_first": {} }, { "peak_ewma": {} },
                                        { "least_request_experimental": {} } ] }"#,
    );
    let default = config.method("/x.Y/Z").expect("the default");
    assert_eq!(default.wait_for_ready, Some(true));
    let retry = default.retry.as_ref().unwrap();
    assert_eq!(retry.max_attempts, 5, "capped");
    let codes = retry.retryable_codes;
    assert!(codes.contains(tonic::Code::Unavailable) && codes.contains(tonic::Code::Aborted));
    assert!(!codes.contains(tonic::Code::Internal));
    assert_eq!(
        config.method("/a.B/C").unwrap().timeout,
        Some(Duration::ZERO)
    );
    assert_eq!(config.load_metric(), Ok(Some(LoadMetric::peak_ewma())));
    assert_eq!(parse("{}").load_metric(), Ok(None));
    assert!(parse("{}").method("/a.B/C").is_none());
}

/// Each invalid field is refused with its name (gRFC A6's rules and protobuf's JSON
/// mapping). Catches a rule not checked, and an error that names the wrong field.
#[test]
fn each_invalid_field_is_refused_with_its_name() {
    let retry = |fields: &str| {
        format!(
            r#"{{ "methodConfig": [ {{ "name": [ {{ "service": "s" }} ], "retryPolicy": {{ {fields} }} }} ] }}"#
        )
    };
    let good = [
        r#""maxAttempts": 2"#,
        r#""initialBackoff": "1s""#,
        r#""maxBackoff": "1s""#,
        r#""backoffMultiplier": 2"#,
        r#""retryableStatusCodes": ["UNAVAILABLE"]"#,
    ];
    parse(&retry(&good.join(",")));
    let path = "methodConfig[0].retryPolicy";
    let cases = [
        (0, r#""maxAttempts": 1"#, "maxAttempts", "at least 2"),
        (0, r#""maxAttempts": 2.5"#, "maxAttempts", "whole"),
        (0, r#""maxAttempts": "3""#, "maxAttempts", "not a number"),
        (0, "", "maxAttempts", "required"),
        (1, r#""initialBackoff": "0s""#, "initialBackoff", "above 0"),
        (
            1,
            r#""initialBackoff": "1""#,
            "initialBackoff",
            "not a duration",
        ),
        (
            1,
            r#""initialBackoff": "-1s""#,
            "initialBackoff",
            "negative",
        ),
        (
            1,
            r#""initialBackoff": "1.0000000001s""#,
            "initialBackoff",
            "not a duration",
        ),
        (2, r#""maxBackoff": "1e3s""#, "maxBackoff", "not a duration"),
        (
            2,
            r#""maxBackoff": "315576000001s""#,
            "maxBackoff",
            "longer",
        ),
        (
            3,
            r#""backoffMultiplier": 0"#,
            "backoffMultiplier",
            "above 0",
        ),
        (3, "", "backoffMultiplier", "required"),
        (
            4,
            r#""retryableStatusCodes": []"#,
            "retryableStatusCodes",
            "at least one",
        ),
        (
            4,
            r#""retryableStatusCodes": ["unavailable"]"#,
            "retryableStatusCodes[0]",
            "status code",
        ),
        (
            4,
            r#""retryableStatusCodes": [17]"#,
            "retryableStatusCodes[0]",
            "status code",
        ),
    ];
    for (index, replacement, field, reason) in cases {
        let mut fields = good.to_vec();
        fields[index] = replacement;
        let fields: Vec<&str> = fields.into_iter().filter(|f| !f.is_empty()).collect();
        let (got, why) = refused(&retry(&fields.join(",")));
        assert_eq!(got, format!("{path}.{field}"), "{replacement}");
        assert!(why.contains(reason), "{replacement}: {why}");
    }

    let whole = [
        (
            r#"{ "methodConfig": [ { "name": [ { "service": "s" } ], "retryPolicy": {
                 "maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s",
                 "backoffMultiplier": 2, "retryableStatusCodes": [14] },
                 "hedgingPolicy": { "maxAttempts": 2 } } ] }"#,
            "methodConfig[0].hedgingPolicy",
        ),
        (
            r#"{ "methodConfig": [ { "name": [ { "method": "m" } ] } ] }"#,
            "methodConfig[0].name[0]",
        ),
        (
            r#"{ "methodConfig": [ { "name": [ { "service": "s" } ] },
                                  { "name": [ { "service": "s" } ] } ] }"#,
            "methodConfig[1].name[0]",
        ),
        (
            r#"{ "methodConfig": [ { "name": [ {} ], "hedgingPolicy": { "maxAttempts": 1 } } ] }"#,
            "methodConfig[0].hedgingPolicy.maxAttempts",
        ),
        (
            r#"{ "methodConfig": [ { "name": [ {} ], "hedgingPolicy": { "maxAttempts": 2,
                 "nonFatalStatusCodes": ["NOPE"] } } ] }"#,
            "methodConfig[0].hedgingPolicy.nonFatalStatusCodes[0]",
        ),
        (
            r#"{ "methodConfig": [ { "name": [ {} ], "timeout": "-1s" } ] }"#,
            "methodConfig[0].timeout",
        ),
        (
            r#"{ "methodConfig": [ { "name": [ {} ], "waitForReady": "yes" } ] }"#,
            "methodConfig[0].waitForReady",
        ),
        (r#"{ "methodConfig": {} }"#, "methodConfig"),
        (r#"{ "methodConfig": [ 1 ] }"#, "methodConfig[0]"),
        (
            r#"{ "retryThrottling": { "maxTokens": 0, "tokenRatio": 1 } }"#,
            "retryThrottling.maxTokens",
        ),
        (
            r#"{ "retryThrottling": { "maxTokens": 1001, "tokenRatio": 1 } }"#,
            "retryThrottling.maxTokens",
        ),
        (
            r#"{ "retryThrottling": { "maxTokens": 10, "tokenRatio": 0 } }"#,
            "retryThrottling.tokenRatio",
        ),
        (
            r#"{ "retryThrottling": { "maxTokens": 10 } }"#,
            "retryThrottling.tokenRatio",
        ),
        (
            r#"{ "healthCheckConfig": { "serviceName": 1 } }"#,
            "healthCheckConfig.serviceName",
        ),
        (
            r#"{ "loadBalancingConfig": [ { "a": {}, "b": {} } ] }"#,
            "loadBalancingConfig[0]",
        ),
        ("[]", "(the service config)"),
    ];
    for (json, field) in whole {
        assert_eq!(refused(json).0, field, "{json}");
    }
    assert!(matches!(
        "{".parse::<ServiceConfig>(),
        Err(ServiceConfigError::Json(_))
    ));
}

/// Catches a duration read wrong at its edges: no whole part, no fraction, nine decimals.
#[test]
fn durations_read_as_protobuf_writes_them() {
    let ms = Duration::from_millis;
    assert_eq!(parse_duration(".01s"), Ok(ms(10)));
    assert_eq!(parse_duration("2.s"), Ok(2 * SECOND));
    assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
    assert_eq!(
        parse_duration("315576000000s"),
        Ok(Duration::from_secs(315_576_000_000))
    );
    for bad in ["s", ".s", "1", "1ms", "+1s", "1.2.3s", " 1s", "0x1s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
    // Its throttle values keep 3 decimals.
    let config = parse(r#"{ "retryThrottling": { "maxTokens": 0.0015, "tokenRatio": 0.0024 } }"#);
    assert_eq!(
        config.retry_throttling(),
        Some(RetryThrottling {
            max_milli_tokens: 2,
            milli_token_ratio: 2,
        })
    );
}
