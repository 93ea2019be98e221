//! Reading the values of flags: byte sizes (`1k`, `10k`, `1m`), rates (`500/s`), durations
//! (`30s`, `2m`, through humantime) and weighted lists (`1k:70,10k:25,1m:5`).

use std::time::Duration;

use crate::error::LoadError;

/// Largest message size accepted (the sender keeps one padding buffer of this size).
pub const MAX_SIZE: u64 = 256 * 1024 * 1024;

/// Reads `1024`, `1k`, `10K`, `1m`, `1M`, `2g` (binary multiples, k = 1024).
pub fn parse_size(flag: &'static str, s: &str) -> Result<u64, LoadError> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_lowercase() {
                'k' => 1024,
                'm' => 1024 * 1024,
                'g' => 1024 * 1024 * 1024,
                'b' => 1,
                _ => return Err(LoadError::flag(flag, format!("unknown unit in {s:?}"))),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| LoadError::flag(flag, format!("{s:?} is not a size like 1024, 10k or 1m")))?;
    n.checked_mul(mult)
        .filter(|&v| v <= MAX_SIZE)
        .ok_or_else(|| LoadError::flag(flag, format!("{s:?} is over {MAX_SIZE} bytes")))
}

/// Reads `500`, `500/s`, `30000/m` as messages per second.
pub fn parse_rate(flag: &'static str, s: &str) -> Result<f64, LoadError> {
    let (n, per) = match s.split_once('/') {
        Some((n, unit)) => {
            let per = match unit {
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                _ => return Err(LoadError::flag(flag, format!("unknown unit in {s:?}"))),
            };
            (n, per)
        }
        None => (s, 1.0),
    };
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| LoadError::flag(flag, format!("{s:?} is not a rate like 500/s")))?;
    if !n.is_finite() {
        return Err(LoadError::flag(flag, format!("{s:?} is not a finite rate")));
    }
    if n <= 0.0 {
        return Err(LoadError::flag(flag, "the rate must be above zero"));
    }
    let rate = n / per;
    // Messages are spaced by 1/rate: it must be a time (at most a day), and not shorter than
    // a nanosecond.
    if !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(LoadError::flag(
            flag,
            format!("{s:?} is outside 1/day to 10^9/s"),
        ));
    }
    Ok(rate)
}

/// The slowest rate: one message a day.
const MIN_RATE: f64 = 1.0 / 86_400.0;
/// The fastest rate: one message a nanosecond.
const MAX_RATE: f64 = 1e9;

/// Reads a duration: `30s`, `1m`, `250ms`, `1h 30m`.
pub fn parse_duration(flag: &'static str, s: &str) -> Result<Duration, LoadError> {
    // Taken as a value even when it begins with `-`, so that it is refused as what it is: a
    // negative duration, or the next flag where the value was left out.
    let t = s.trim_start();
    if t.starts_with("--") {
        return Err(LoadError::flag(
            flag,
            format!("a value is required (found the flag {s:?})"),
        ));
    }
    if t.strip_prefix('-')
        .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit() || c == '.'))
    {
        return Err(LoadError::flag(flag, format!("{s:?} is negative")));
    }
    // `M` is a month to the parser, while sizes take it for MiB: `5M` written for minutes
    // would be a five-month run without a word.
    if s.contains('M') {
        return Err(LoadError::flag(
            flag,
            format!("{s:?} is ambiguous: durations take m for minutes (M would be months)"),
        ));
    }
    let d =
        humantime::parse_duration(s).map_err(|e| LoadError::flag(flag, format!("{s:?}: {e}")))?;
    // Far enough for any run, and near enough that instants and message counts reckoned from
    // it cannot overflow.
    if d > LONGEST {
        return Err(LoadError::flag(
            flag,
            format!("{s:?} is more than 10 years"),
        ));
    }
    Ok(d)
}

/// The longest duration a flag takes.
const LONGEST: Duration = Duration::from_secs(10 * 366 * 86_400);

/// Reads `item:weight,item:weight`; an item without a weight weighs 1.
pub fn parse_weighted<T>(
    flag: &'static str,
    s: &str,
    item: impl Fn(&str) -> Result<T, LoadError>,
) -> Result<Vec<(T, u32)>, LoadError> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (value, weight) = match part.split_once(':') {
            Some((v, w)) => {
                let w: u32 = w.trim().parse().map_err(|_| {
                    LoadError::flag(
                        flag,
                        format!("weight {w:?} is not a whole number from 0 to 4294967295"),
                    )
                })?;
                (v, w)
            }
            None => (part, 1),
        };
        if weight == 0 {
            continue;
        }
        out.push((item(value.trim())?, weight));
    }
    if out.is_empty() {
        return Err(LoadError::flag(flag, "no item with a weight above zero"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("--size", "1024").unwrap(), 1024);
        assert_eq!(parse_size("--size", "1k").unwrap(), 1024);
        assert_eq!(parse_size("--size", "10K").unwrap(), 10240);
        assert_eq!(parse_size("--size", "1m").unwrap(), 1 << 20);
        assert!(parse_size("--size", "1x").is_err());
        assert!(parse_size("--size", "k").is_err());
        assert!(parse_size("--size", "1t").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("--rate", "500/s").unwrap(), 500.0);
        assert_eq!(parse_rate("--rate", "60/m").unwrap(), 1.0);
        assert_eq!(parse_rate("--rate", "20").unwrap(), 20.0);
        assert!(parse_rate("--rate", "0/s").is_err());
        assert!(parse_rate("--rate", "1/h").is_ok());
        for bad in [
            "1e-20/s", "5e-324/s", "inf/s", "1e400/s", "NaN", "2e9/s", "0.5/day",
        ] {
            let e = parse_rate("--rate", bad).unwrap_err().to_string();
            assert!(e.contains("--rate"), "{bad}: {e}");
        }
        assert!(parse_rate("--rate", "inf/s")
            .unwrap_err()
            .to_string()
            .contains("finite"));
        assert!(parse_rate("--rate", "fast").is_err());
    }

    #[test]
    fn a_capital_m_in_a_duration_is_refused_not_read_as_months() {
        let e = parse_duration("--duration", "5M").unwrap_err().to_string();
        assert!(e.contains("--duration") && e.contains("ambiguous"), "{e}");
        assert_eq!(
            parse_duration("--duration", "5m").ok(),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn durations_past_ten_years_are_refused() {
        assert_eq!(
            parse_duration("--duration", "1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("--duration", "10years").is_ok());
        let e = parse_duration("--duration", "11years")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--duration") && e.contains("10 years"), "{e}");
    }

    #[test]
    fn weighted_lists() {
        let mix = parse_weighted("--size", "1k:70,10k:25,1m:5", |v| parse_size("--size", v));
        assert_eq!(mix.unwrap(), vec![(1024, 70), (10240, 25), (1 << 20, 5)]);
        assert!(parse_weighted("--size", "1k:0", |v| parse_size("--size", v)).is_err());
        assert!(parse_weighted("--size", "1k:x", |v| parse_size("--size", v)).is_err());
    }
}
