//! Values the command line takes: addresses (IP or host name), a node's URL (with or without
//! its scheme), times (epoch ms, RFC 3339 or relative to now) and durations (ms or `30s`).

use std::net::SocketAddr;

/// `ip:port` or `host:port`, resolved as configuration files' addresses are
/// ([`edgetally_merger::config::resolve_addr`]).
pub fn addr(s: &str) -> Result<SocketAddr, String> {
    edgetally_merger::config::resolve_addr(s)
}

/// An address flag of `serve`, checked here (a bad one is a usage error naming the flag) and
/// kept as written: the setting reads it again.
pub fn addr_text(s: &str) -> Result<String, String> {
    addr(s).map(|_| s.to_string())
}

/// A node's HTTP base URL: `http://host:port`, `https://…`, or `host:port` (taken as
/// `http://`). Trailing slashes are dropped.
pub fn node_url(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let url = match s.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => s.to_string(),
        Some((scheme, _)) => {
            return Err(format!(
                "{scheme:?} is not http or https: write http://host:port"
            ))
        }
        None if !s.is_empty() => format!("http://{s}"),
        None => return Err("empty address: write http://host:port".into()),
    };
    Ok(url)
}

/// A duration: whole milliseconds (`60000`) or text with units (`60s`, `1h 30m`, `250ms`).
pub fn duration_ms(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.trim().parse::<i64>() {
        return Ok(n);
    }
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}): write milliseconds or e.g. 30s, 5m, 1h 30m")
    })?;
    i64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

/// A time, as ms since the epoch, from:
/// - an integer: epoch milliseconds (one that looks like epoch seconds gets a warning);
/// - RFC 3339: `2026-12-06T10:00:00Z`, `2026-12-06T11:00:00.5+01:00`;
/// - `now`, `now-1h`, `now+5m`, or a bare duration meaning that long ago (`1h`, `-1h`).
pub fn time_ms(s: &str) -> Result<i64, String> {
    time_ms_at(s, edgetally_net::now_ms())
}

/// [`time_ms`] with the current time given.
pub fn time_ms_at(s: &str, now: i64) -> Result<i64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i64>() {
        if n != 0 && n.unsigned_abs() < 100_000_000_000 {
            eprintln!(
                "warning: {n} is read as epoch milliseconds ({}); epoch seconds would be {n}000",
                rfc3339(n)
            );
        }
        return Ok(n);
    }
    if let Ok(d) = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
        return i64::try_from(d.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| format!("{s:?} is out of range"));
    }
    let rel = |sign: i64, d: &str| -> Result<i64, String> {
        let ms = duration_ms(d.trim()).map_err(|_| {
            format!(
                "{s:?} is not a time: write epoch ms, RFC 3339 (2026-12-06T10:00:00Z), now, \
                 now-1h, or a duration ago (15m)"
            )
        })?;
        Ok(now.saturating_add(sign.saturating_mul(ms)))
    };
    match t.strip_prefix("now") {
        Some("") => Ok(now),
        Some(rest) => match rest.trim_start().split_at_checked(1) {
            Some(("-", d)) => rel(-1, d),
            Some(("+", d)) => rel(1, d),
            _ => rel(1, "?"),
        },
        None => rel(-1, t.strip_prefix('-').unwrap_or(t)),
    }
}

/// An epoch-ms time as RFC 3339 (UTC), for messages.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_form() {
        let now = 1_765_000_000_000; // 2025-12-06T05:46:40Z
        for (text, want) in [
            ("1765000000123", 1_765_000_000_123),
            ("now", now),
            ("now-1h", now - 3_600_000),
            ("now - 90s", now - 90_000),
            ("now+5m", now + 300_000),
            ("15m", now - 900_000),
            ("-2d", now - 2 * 86_400_000),
            ("2025-12-06T05:46:40Z", now),
            ("2025-12-06T06:46:40.250+01:00", now + 250),
            ("1970-01-01T00:00:00Z", 0),
        ] {
            assert_eq!(time_ms_at(text, now), Ok(want), "{text}");
        }
        for bad in ["yesterday", "now*2", "2025-12-06", "5 fortnights", ""] {
            let err = time_ms_at(bad, now).expect_err(bad);
            assert!(err.contains("is not a time"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_and_urls() {
        assert_eq!(duration_ms("60000"), Ok(60_000));
        assert_eq!(duration_ms("1m"), Ok(60_000));
        assert_eq!(duration_ms("1h 30m"), Ok(5_400_000));
        assert!(duration_ms("soon").is_err());
        assert_eq!(
            node_url("127.0.0.1:7070").as_deref(),
            Ok("http://127.0.0.1:7070")
        );
        assert_eq!(node_url("http://h:1/").as_deref(), Ok("http://h:1"));
        assert_eq!(node_url("https://h:1").as_deref(), Ok("https://h:1"));
        assert!(node_url("ftp://h:1").is_err());
        assert_eq!(
            addr("127.0.0.1:7071"),
            Ok("127.0.0.1:7071".parse().expect("addr"))
        );
        assert_eq!(addr("[::1]:7071"), Ok("[::1]:7071".parse().expect("addr")));
        assert_eq!(
            addr("localhost:7071"),
            Ok("127.0.0.1:7071".parse().expect("addr"))
        );
        assert!(addr("localhost").expect_err("no port").contains("no port"));
    }
}
