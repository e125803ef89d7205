//! A call's deadline: `grpc-timeout` read, chosen and written.

use std::time::Duration;

use tonic::body::Body;

/// The call's deadline: the caller's (`grpc-timeout`), the method's or the channel's,
/// whichever is soonest, for the whole call, and sent to the server as `grpc-timeout`.
pub(super) fn deadline(
    request: &mut http::Request<Body>,
    channel: Option<Duration>,
    method: Option<Duration>,
) -> Option<Duration> {
    let caller = grpc_timeout(request.headers());
    let ours = [channel, method].into_iter().flatten().min();
    match (caller, ours) {
        (Some(caller), Some(ours)) if ours >= caller => Some(caller),
        (_, Some(ours)) => {
            set_grpc_timeout(request.headers_mut(), ours);
            Some(ours)
        }
        (caller, None) => caller,
    }
}

/// Sets `grpc-timeout` to `limit`, in the finest unit whose count has at most 8 digits,
/// rounded up (as grpc-go writes it).
fn set_grpc_timeout(headers: &mut http::HeaderMap, limit: Duration) {
    const MAX: u128 = 99_999_999;
    let nanos = limit.as_nanos().max(1);
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let (count, unit) = units
        .iter()
        .map(|&(size, unit)| (nanos.div_ceil(size), unit))
        .find(|&(count, _)| count <= MAX)
        .unwrap_or((MAX, "H"));
    if let Ok(value) = http::HeaderValue::from_str(&format!("{count}{unit}")) {
        headers.insert("grpc-timeout", value);
    }
}

/// `grpc-timeout` (a number of at most 8 digits and a unit), as the gRPC protocol defines it.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(limit: Duration) -> String {
        let mut headers = http::HeaderMap::new();
        set_grpc_timeout(&mut headers, limit);
        headers["grpc-timeout"].to_str().unwrap().to_owned()
    }

    /// Catches a unit too coarse (a deadline cut to 0, or rounded down, which would end a
    /// call early), a count past the 8 digits gRPC allows, and a header its reader does
    /// not take back.
    #[test]
    fn grpc_timeout_is_written_in_the_finest_unit_that_fits_and_read_back() {
        let ms = Duration::from_millis;
        assert_eq!(written(ms(1)), "1000000n");
        assert_eq!(written(ms(150)), "150000u");
        assert_eq!(written(Duration::from_secs(100)), "100000m");
        assert_eq!(written(Duration::from_secs(200_000)), "200000S");
        assert_eq!(
            written(Duration::from_nanos(100_000_001)),
            "100001u",
            "rounded up"
        );
        assert_eq!(written(Duration::ZERO), "1n");
        assert_eq!(written(Duration::MAX), "99999999H", "at most 8 digits");
        for limit in [
            ms(1),
            ms(150),
            Duration::from_secs(7),
            Duration::from_secs(90_000),
        ] {
            let mut headers = http::HeaderMap::new();
            set_grpc_timeout(&mut headers, limit);
            assert_eq!(grpc_timeout(&headers), Some(limit), "{limit:?}");
        }
    }
}
