//! [`ServiceConfig`]: gRPC's service config, the JSON that sets each method's retry or
//! hedging policy, deadline and wait-for-ready, the channel's retry throttle, its health
//! check and its load-balancing policy.
//!
//! It is read as gRPC's implementations read it:
//!
//! - Field names follow protobuf's JSON mapping: lowerCamelCase or the proto's snake_case,
//!   and, as grpc-go allows (its retry example writes `MaxAttempts`), in any case.
//! - Unknown fields are ignored, as every gRPC implementation ignores them.
//! - Durations are protobuf JSON durations (`"0.1s"`, `"2s"`); status codes are names
//!   (`"UNAVAILABLE"`) or numbers.
//! - A known field with an invalid value is a [`ServiceConfigError`] naming it
//!   (`methodConfig[0].retryPolicy.maxAttempts`), by gRFC A6's rules: `maxAttempts` at
//!   least 2 (more than 5 is taken as 5), backoffs and multiplier above 0, at least one
//!   retryable code, not both a retry and a hedging policy, `maxTokens` in `(0, 1000]`,
//!   `tokenRatio` above 0 (kept to 3 decimals); a method named twice, or a method without
//!   its service.
//! - A method's configuration is the one naming it, else its service's, else the default
//!   (a `name` entry with neither).
//! - `loadBalancingConfig` lists policies in order of preference, and the first one
//!   tower-sd has is used: `least_request_experimental` (gRFC A48's least request, which
//!   is P2C by requests in flight, tower-sd's default; its `choiceCount` is always 2) or
//!   `peak_ewma` (P2C by peak-EWMA latency). **Where we differ**: gRPC rejects a config
//!   none of whose policies it has; a channel here keeps P2C and logs a warning, since
//!   a config written for `round_robin` or `pick_first` should not keep a client from
//!   starting.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::balance::LoadMetric;
use crate::connection::policy::{HedgeRules, MAX_ATTEMPTS, RetryRules, Retryable};

/// gRPC's service config (see the module docs). Parse it from JSON with [`str::parse`];
/// in a YAML or TOML configuration, it is the same structure.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceConfig {
    /// Method configurations by path: `/service/method`, `/service/`, or `` (the default).
    methods: HashMap<String, Arc<MethodConfig>>,
    retry_throttling: Option<RetryThrottling>,
    health_check_service: Option<String>,
    /// The policies of `loadBalancingConfig` (or `loadBalancingPolicy`), in order.
    balancing: Vec<String>,
}

/// The configuration of one method, or of every method of a service.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The call's deadline, unless the caller set a shorter one.
    pub timeout: Option<Duration>,
    /// Whether a call waits (until its deadline) for an instance to be ready instead of
    /// failing when none is.
    pub wait_for_ready: Option<bool>,
    /// Its retry policy.
    pub retry: Option<RetryPolicy>,
    /// Its hedging policy.
    pub hedging: Option<HedgingPolicy>,
    /// The retry policy as the connections apply it.
    pub(crate) rules: Option<Arc<RetryRules>>,
    /// The hedging policy as the connections apply it.
    pub(crate) hedge_rules: Option<Arc<HedgeRules>>,
}

/// gRFC A6's retry policy.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts at most, the first included (2 to 5).
    pub max_attempts: u32,
    /// The ceiling of the first retry's backoff.
    pub initial_backoff: Duration,
    /// The ceiling of any backoff.
    pub max_backoff: Duration,
    /// How the ceiling grows from one retry to the next.
    pub backoff_multiplier: f64,
    /// The status codes that make an attempt worth retrying.
    pub retryable_codes: Codes,
}

/// gRFC A6's hedging policy.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HedgingPolicy {
    /// Attempts at most, the first included (2 to 5).
    pub max_attempts: u32,
    /// The time between one attempt and the next.
    pub hedging_delay: Duration,
    /// The status codes after which the other attempts go on (any other ends the call).
    pub non_fatal_codes: Codes,
}

/// gRFC A6's retry throttle: a channel's token bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryThrottling {
    /// Tokens in a full bucket, in thousandths (1 to 1,000,000).
    pub max_milli_tokens: u32,
    /// Tokens a successful call gives back, in thousandths (at least 1).
    pub milli_token_ratio: u32,
}

/// A set of gRPC status codes.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Codes(u32);

impl Codes {
    /// Whether `code` is in the set.
    pub fn contains(self, code: tonic::Code) -> bool {
        let code = code as u32;
        code < 32 && self.0 & (1 << code) != 0
    }

    /// The set with `code` in it too.
    #[must_use]
    pub fn with(self, code: tonic::Code) -> Self {
        Self(self.0 | (1 << (code as u32)))
    }
}

impl fmt::Debug for Codes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(
                (0..17)
                    .filter(|i| self.0 & (1 << i) != 0)
                    .map(tonic::Code::from),
            )
            .finish()
    }
}

/// A service config that cannot be used: not JSON, or a field with an invalid value.
#[derive(Debug, thiserror::Error)]
pub enum ServiceConfigError {
    /// The text is not JSON.
    #[error("the service config is not JSON")]
    Json(#[source] serde_json::Error),
    /// A field's value is invalid.
    #[error("invalid service config field `{field}`: {reason}")]
    Invalid {
        /// The field, as a path (`methodConfig[0].retryPolicy.maxAttempts`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

// ===== impl ServiceConfig =====

impl ServiceConfig {
    /// The configuration of the method at `path` (`/package.Service/Method`): its own, else
    /// its service's, else the default.
    pub fn method(&self, path: &str) -> Option<&Arc<MethodConfig>> {
        if self.methods.is_empty() {
            return None;
        }
        if let Some(config) = self.methods.get(path) {
            return Some(config);
        }
        let service = path.rfind('/').map_or("", |end| &path[..=end]);
        self.methods.get(service).or_else(|| self.methods.get(""))
    }

    /// The channel's retry throttle, when set.
    pub fn retry_throttling(&self) -> Option<RetryThrottling> {
        self.retry_throttling
    }

    /// The service name of the health check (`healthCheckConfig.serviceName`), when set.
    pub fn health_check_service(&self) -> Option<&str> {
        self.health_check_service.as_deref()
    }

    /// The first load-balancing policy of the config that tower-sd has; `Err` with the
    /// names listed when it has none of them.
    pub(crate) fn load_metric(&self) -> Result<Option<LoadMetric>, &[String]> {
        if self.balancing.is_empty() {
            return Ok(None);
        }
        self.balancing
            .iter()
            .find_map(|name| match name.as_str() {
                "least_request_experimental" => Some(LoadMetric::PendingRequests),
                "peak_ewma" => Some(LoadMetric::peak_ewma()),
                _ => None,
            })
            .map(Some)
            .ok_or(&self.balancing)
    }
}

impl FromStr for ServiceConfig {
    type Err = ServiceConfigError;

    fn from_str(json: &str) -> Result<Self, ServiceConfigError> {
        let value: Value = serde_json::from_str(json).map_err(ServiceConfigError::Json)?;
        Self::from_value(&value)
    }
}

impl<'de> serde::Deserialize<'de> for ServiceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_value(&value).map_err(serde::de::Error::custom)
    }
}

impl ServiceConfig {
    fn from_value(value: &Value) -> Result<Self, ServiceConfigError> {
        let root = Object::of(value, String::new())?;
        let mut config = Self::default();
        if let Some((field, list)) = root.array("methodConfig")? {
            for (i, entry) in list.iter().enumerate() {
                let entry = Object::of(entry, format!("{field}[{i}]"))?;
                config.add_methods(&entry)?;
            }
        }
        if let Some(throttling) = root.object("retryThrottling")? {
            config.retry_throttling = Some(throttling_of(&throttling)?);
        }
        if let Some(health) = root.object("healthCheckConfig")? {
            config.health_check_service = health.string("serviceName")?.map(str::to_owned);
        }
        if let Some((field, list)) = root.array("loadBalancingConfig")? {
            for (i, entry) in list.iter().enumerate() {
                let field = format!("{field}[{i}]");
                match entry.as_object() {
                    Some(policy) if policy.len() == 1 => {
                        config.balancing.extend(policy.keys().cloned());
                    }
                    _ => return Err(invalid(&field, "not an object with exactly one policy")),
                }
            }
        } else if let Some(policy) = root.string("loadBalancingPolicy")? {
            config.balancing.push(policy.to_ascii_lowercase());
        }
        Ok(config)
    }

    /// Adds one `methodConfig` entry under each of its names.
    fn add_methods(&mut self, entry: &Object<'_>) -> Result<(), ServiceConfigError> {
        let method = Arc::new(method_of(entry)?);
        // An entry without names applies to nothing (grpc-go skips it too).
        let Some((field, names)) = entry.array("name")? else {
            return Ok(());
        };
        for (i, name) in names.iter().enumerate() {
            let name = Object::of(name, format!("{field}[{i}]"))?;
            let service = name.string("service")?.unwrap_or_default();
            let method_name = name.string("method")?.unwrap_or_default();
            let path = match (service, method_name) {
                ("", "") => String::new(),
                ("", _) => return Err(invalid(&name.path, "a method without its service")),
                (service, "") => format!("/{service}/"),
                (service, method_name) => format!("/{service}/{method_name}"),
            };
            if self.methods.insert(path, Arc::clone(&method)).is_some() {
                return Err(invalid(&name.path, "names a method named before"));
            }
        }
        Ok(())
    }
}

fn method_of(entry: &Object<'_>) -> Result<MethodConfig, ServiceConfigError> {
    let timeout = entry.duration("timeout")?;
    let wait_for_ready = entry.bool("waitForReady")?;
    let retry = entry
        .object("retryPolicy")?
        .map(|p| retry_of(&p))
        .transpose()?;
    let hedging = entry
        .object("hedgingPolicy")?
        .map(|p| hedging_of(&p))
        .transpose()?;
    if retry.is_some() && hedging.is_some() {
        return Err(invalid(
            &entry.field("hedgingPolicy"),
            "set beside a retryPolicy (only one of them may be)",
        ));
    }
    let rules = retry.as_ref().map(|policy| {
        Arc::new(RetryRules {
            max_attempts: policy.max_attempts,
            initial_backoff: policy.initial_backoff,
            max_backoff: policy.max_backoff,
            multiplier: policy.backoff_multiplier,
            retryable: Retryable::Grpc(policy.retryable_codes.0),
        })
    });
    let hedge_rules = hedging.as_ref().map(|policy| {
        Arc::new(HedgeRules {
            max_attempts: policy.max_attempts,
            delay: policy.hedging_delay,
            non_fatal: policy.non_fatal_codes.0,
        })
    });
    Ok(MethodConfig {
        timeout,
        wait_for_ready,
        retry,
        hedging,
        rules,
        hedge_rules,
    })
}

fn retry_of(policy: &Object<'_>) -> Result<RetryPolicy, ServiceConfigError> {
    let positive = |name: &str| -> Result<Duration, ServiceConfigError> {
        match policy.duration(name)? {
            Some(d) if !d.is_zero() => Ok(d),
            Some(_) => Err(invalid(&policy.field(name), "must be above 0")),
            None => Err(invalid(&policy.field(name), "is required")),
        }
    };
    let multiplier = policy.number("backoffMultiplier")?;
    let backoff_multiplier = match multiplier {
        Some(m) if m > 0.0 && m.is_finite() => m,
        Some(_) => {
            return Err(invalid(
                &policy.field("backoffMultiplier"),
                "must be above 0",
            ));
        }
        None => return Err(invalid(&policy.field("backoffMultiplier"), "is required")),
    };
    let retryable_codes = policy.codes("retryableStatusCodes")?;
    if retryable_codes == Codes::default() {
        return Err(invalid(
            &policy.field("retryableStatusCodes"),
            "must name at least one code",
        ));
    }
    Ok(RetryPolicy {
        max_attempts: max_attempts(policy)?,
        initial_backoff: positive("initialBackoff")?,
        max_backoff: positive("maxBackoff")?,
        backoff_multiplier,
        retryable_codes,
    })
}

fn hedging_of(policy: &Object<'_>) -> Result<HedgingPolicy, ServiceConfigError> {
    Ok(HedgingPolicy {
        max_attempts: max_attempts(policy)?,
        hedging_delay: policy.duration("hedgingDelay")?.unwrap_or_default(),
        non_fatal_codes: policy.codes("nonFatalStatusCodes")?,
    })
}

/// `maxAttempts`: required, at least 2; above 5 it is taken as 5 (gRFC A6).
fn max_attempts(policy: &Object<'_>) -> Result<u32, ServiceConfigError> {
    let field = policy.field("maxAttempts");
    match policy.number("maxAttempts")? {
        Some(n) if n.fract() != 0.0 => Err(invalid(&field, "must be a whole number")),
        Some(n) if n >= 2.0 => Ok((n.min(f64::from(MAX_ATTEMPTS))) as u32),
        Some(_) => Err(invalid(&field, "must be at least 2")),
        None => Err(invalid(&field, "is required")),
    }
}

fn throttling_of(throttling: &Object<'_>) -> Result<RetryThrottling, ServiceConfigError> {
    let milli = |name: &str| -> Result<f64, ServiceConfigError> {
        let value = throttling
            .number(name)?
            .ok_or_else(|| invalid(&throttling.field(name), "is required"))?;
        Ok((value * 1000.0).round())
    };
    let max = milli("maxTokens")?;
    if !(max > 0.0 && max <= 1_000_000.0) {
        return Err(invalid(
            &throttling.field("maxTokens"),
            "must be above 0 and at most 1000",
        ));
    }
    let ratio = milli("tokenRatio")?;
    if !(ratio >= 1.0 && ratio <= f64::from(u32::MAX)) {
        return Err(invalid(
            &throttling.field("tokenRatio"),
            "must be at least 0.001",
        ));
    }
    Ok(RetryThrottling {
        max_milli_tokens: max as u32,
        milli_token_ratio: ratio as u32,
    })
}

fn invalid(field: &str, reason: &str) -> ServiceConfigError {
    ServiceConfigError::Invalid {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A JSON object at `path`, whose fields are found whatever their case or underscores.
struct Object<'a> {
    fields: &'a Map<String, Value>,
    path: String,
}

/// A field name with its case and underscores ignored: `maxAttempts`, `max_attempts` and
/// `MaxAttempts` are one field.
fn folded(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl<'a> Object<'a> {
    fn of(value: &'a Value, path: String) -> Result<Self, ServiceConfigError> {
        match value.as_object() {
            Some(fields) => Ok(Self { fields, path }),
            None => Err(invalid(&path_or_root(&path), "not an object")),
        }
    }

    /// The path of field `name`.
    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// Field `name`'s value, unless it is absent or `null`.
    fn get(&self, name: &str) -> Option<&'a Value> {
        let wanted = folded(name);
        self.fields
            .iter()
            .find(|(key, _)| folded(key) == wanted)
            .map(|(_, value)| value)
            .filter(|value| !value.is_null())
    }

    fn typed<T>(
        &self,
        name: &str,
        what: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, ServiceConfigError> {
        self.get(name)
            .map(|value| read(value).ok_or_else(|| invalid(&self.field(name), what)))
            .transpose()
    }

    fn object(&self, name: &str) -> Result<Option<Object<'a>>, ServiceConfigError> {
        let path = self.field(name);
        self.typed(name, "not an object", Value::as_object)
            .map(|fields| fields.map(|fields| Object { fields, path }))
    }

    fn array(&self, name: &str) -> Result<Option<(String, &'a Vec<Value>)>, ServiceConfigError> {
        let path = self.field(name);
        self.typed(name, "not a list", Value::as_array)
            .map(|list| list.map(|list| (path, list)))
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, ServiceConfigError> {
        self.typed(name, "not a string", Value::as_str)
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ServiceConfigError> {
        self.typed(name, "not true or false", Value::as_bool)
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ServiceConfigError> {
        self.typed(name, "not a number", Value::as_f64)
    }

    fn duration(&self, name: &str) -> Result<Option<Duration>, ServiceConfigError> {
        let Some(text) = self.string(name)? else {
            return Ok(None);
        };
        parse_duration(text)
            .map(Some)
            .map_err(|reason| invalid(&self.field(name), &reason))
    }

    fn codes(&self, name: &str) -> Result<Codes, ServiceConfigError> {
        let Some((path, list)) = self.array(name)? else {
            return Ok(Codes::default());
        };
        list.iter()
            .enumerate()
            .try_fold(Codes::default(), |codes, (i, code)| {
                code_of(code)
                    .map(|code| codes.with(code))
                    .ok_or_else(|| invalid(&format!("{path}[{i}]"), "not a gRPC status code"))
            })
    }
}

fn path_or_root(path: &str) -> String {
    if path.is_empty() {
        "(the service config)".to_owned()
    } else {
        path.to_owned()
    }
}

/// A status code by its name (`"UNAVAILABLE"`) or number (0 to 16).
fn code_of(value: &Value) -> Option<tonic::Code> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let number = match value {
        Value::String(name) => NAMES.iter().position(|known| known == name)?,
        Value::Number(n) => usize::try_from(n.as_u64()?).ok().filter(|n| *n < 17)?,
        _ => return None,
    };
    Some(tonic::Code::from(number as i32))
}

/// A protobuf JSON duration: seconds with up to 9 decimals and an `s` (`"1.5s"`), at
/// least 0.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let malformed = || format!("{text:?} is not a duration like \"1.5s\"");
    let number = text.strip_suffix('s').ok_or_else(malformed)?;
    if number.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty())
        || !digits(whole)
        || !digits(fraction)
        || fraction.len() > 9
    {
        return Err(malformed());
    }
    // At most protobuf's 315,576,000,000 s (10,000 years).
    let seconds: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| malformed())?
    };
    if seconds > 315_576_000_000 {
        return Err(format!("{text:?} is longer than protobuf allows"));
    }
    let nanos: u32 = format!("{fraction:0<9}").parse().map_err(|_| malformed())?;
    Ok(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests;
