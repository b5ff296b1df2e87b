//! Durations as settings write them: parsed from flags, shown in the config dump.

use std::time::Duration;

/// A duration as written that is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadDuration {
    #[error("{0:?}: expected a number with a unit (500ms, 10s, 2m, 24h)")]
    NoNumber(String),
    #[error("{0:?}: unit must be ms, s, m or h")]
    UnknownUnit(String),
}

/// `500ms`, `10s`, `2m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, BadDuration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| BadDuration::NoNumber(s.to_string()))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(BadDuration::UnknownUnit(s.to_string())),
    }
}

/// A duration as `<n>ms` in the config dump (`#[serde(with = "crate::units::humantime_ms")]`).
pub mod humantime_ms {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}
