//! Timestamps as the API writes them: RFC 3339 in UTC with millisecond precision
//! (`2026-12-01T10:00:00.123Z`). Parsing accepts any RFC 3339 time. Use with
//! `#[serde(with = "hyperfleet_types::timestamp")]` or `timestamp::option` for optional fields.

use serde::{Deserialize, Deserializer, Serializer};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// Formats `t` in UTC with milliseconds.
pub fn format(t: OffsetDateTime) -> String {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    match t.checked_to_offset(UtcOffset::UTC) {
        // Formatting with this description cannot fail: every component exists.
        Some(utc) => utc.format(&fmt).unwrap_or_default(),
        // Past year 9999 in UTC (never a time `parse` accepted): written with its own offset, not panicking.
        None => t.format(&Rfc3339).unwrap_or_default(),
    }
}

/// Parses any RFC 3339 time whose UTC form is a date of years 0000–9999 (and returns it in UTC):
/// `9999-12-31T23:30:00-01:00` is year 10000 in UTC, which the API cannot write, so it is refused.
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()?.checked_to_offset(UtcOffset::UTC)
}

/// The current time, truncated to what [`format`] keeps, so a value survives a round trip unchanged.
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_millisecond(t.millisecond()).unwrap_or(t)
}

pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*t))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).ok_or_else(|| serde::de::Error::custom(format!("'{text}' is not an RFC 3339 time")))
}

/// The same for `Option<OffsetDateTime>` (`null` when absent).
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&format(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => parse(&text)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("'{text}' is not an RFC 3339 time"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_milliseconds() {
        let t = parse("2026-12-01T10:00:00.123456+02:00").unwrap();
        assert_eq!(format(t), "2026-12-01T08:00:00.123Z");
        let n = now();
        assert_eq!(parse(&format(n)), Some(n));
        assert_eq!(parse("yesterday"), None);
    }

    #[test]
    fn a_time_past_year_9999_in_utc_is_refused_not_a_panic() {
        assert_eq!(parse("9999-12-31T23:30:00-01:00"), None);
        let last = parse("9999-12-31T23:30:00+01:00").unwrap();
        assert_eq!(format(last), "9999-12-31T22:30:00.000Z");
        let made_elsewhere = OffsetDateTime::parse("9999-12-31T23:30:00-01:00", &Rfc3339).unwrap();
        assert_eq!(format(made_elsewhere), "9999-12-31T23:30:00-01:00");
    }
}
