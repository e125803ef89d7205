//! Reading a configuration document: durations, and errors that name the key they concern
//! and never repeat a secret.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::RegistryConfig;
use crate::error::{BoxError, Error, Result};

/// Parses a human-readable duration: `500ms`, `10s`, `1m`, `1m30s`, `2h`.
///
/// # Errors
///
/// A message saying what was expected.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("invalid duration `{text}`: expected e.g. 500ms, 10s, 1m, 1m30s, 2h");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = Duration::try_from_secs_f64(value * seconds).map_err(|_| bad())?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("duration `{text}` is too long (more than {} s)", u64::MAX))?;
    }
    Ok(total)
}

pub(super) fn duration_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
        .transpose()
}

pub(super) fn invalid(key: impl Into<String>, why: impl Into<BoxError>) -> Error {
    Error::InvalidConfig {
        key: key.into(),
        source: why.into(),
    }
}

/// `line L column C: what` as (L, C, what).
pub(super) fn parse_location(text: &str) -> Option<(usize, usize, &str)> {
    let rest = text.strip_prefix("line ")?;
    let (line, rest) = rest.split_once(" column ")?;
    let (column, what) = rest.split_once(": ")?;
    Some((line.parse().ok()?, column.parse().ok()?, what))
}

/// Keys whose values are secrets: an error about one never repeats its value.
const SECRET_KEYS: [&str; 2] = ["token", "password"];

/// Turns a deserialization error of the parsed document into the key it concerns.
pub(super) fn from_value(value: serde_json::Value) -> Result<RegistryConfig> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let secret = SECRET_KEYS
            .iter()
            .any(|key| path.rsplit('.').next() == Some(*key));
        let key = if path == "." {
            "(document)".to_owned()
        } else {
            path
        };
        let message = if secret {
            "invalid value (not shown: it is a secret)".to_owned()
        } else {
            error.into_inner().to_string()
        };
        invalid(key, message)
    })
}

/// A syntax error as `line L, column C: what`, without the source line the parsers quote
/// (which may hold a token or password), and with any secret's value scrubbed besides.
pub(super) fn syntax_error(line: usize, column: usize, what: &str, source: &str) -> Error {
    let mut message = format!("syntax error at line {line}, column {column}: {what}");
    for value in secret_values(source) {
        message = message.replace(value, "<redacted>");
    }
    invalid("(document)", message)
}

/// The values written after a secret key (`token: ...`, `password = ...`), unparsed.
pub(super) fn secret_values(source: &str) -> impl Iterator<Item = &str> {
    source.lines().filter_map(|line| {
        let line = line.trim_start();
        let key = SECRET_KEYS.iter().find(|key| line.starts_with(*key))?;
        let rest = line[key.len()..].trim_start();
        let value = rest.strip_prefix([':', '='])?.trim();
        let value = value.trim_matches(['"', '\''].as_slice());
        (value.len() >= 3).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_that_overflow_are_errors() {
        let error = parse_duration("10000000000000000000s10000000000000000000s").unwrap_err();
        assert!(error.contains("too long"), "{error}");
        assert!(parse_duration("1e30h").is_err());
    }

    #[test]
    fn secret_values_are_found_in_yaml_and_toml() {
        let source = "registry:\n  consul:\n    token: \"abc-123\n    password = 'pw-456'\n    tokenish: no\n";
        let values: Vec<&str> = secret_values(source).collect();
        assert_eq!(values, ["abc-123", "pw-456"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "10", "s", "10 parsecs", "1x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
