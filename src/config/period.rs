//! Budget periods and their boundaries in the operator's time zone.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    /// Weeks start on Monday (ISO 8601).
    Weekly,
    #[default]
    Monthly,
    /// A lifetime budget: never resets.
    None,
}

impl Period {
    /// As written in the config and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::None => "none",
        }
    }

    /// As said in messages ("the lifetime budget of ...").
    pub fn name(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::None => "lifetime",
        }
    }

    /// The period containing `now_ms` (Unix milliseconds) as `[start, end)` in Unix
    /// milliseconds; a lifetime budget spans all time.
    pub fn bounds(self, tz: Tz, now_ms: i64) -> (i64, i64) {
        let now = DateTime::<Utc>::from_timestamp_millis(now_ms).unwrap_or_default().with_timezone(&tz);
        let today = now.date_naive();
        let (first, next) = match self {
            Period::None => return (0, i64::MAX),
            Period::Daily => (today, today + Days::new(1)),
            Period::Weekly => {
                let monday = today - Days::new(u64::from(today.weekday().num_days_from_monday()));
                (monday, monday + Days::new(7))
            }
            Period::Monthly => {
                let first = today.with_day(1).expect("day 1 exists");
                (first, first + Months::new(1))
            }
        };
        (local_midnight(tz, first), local_midnight(tz, next))
    }
}

/// The instant a local date begins. Where midnight does not exist (a DST jump at 00:00), the
/// day starts at the first local time that does.
fn local_midnight(tz: Tz, date: NaiveDate) -> i64 {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight is valid");
    for _ in 0..4 {
        if let Some(dt) = tz.from_local_datetime(&t).earliest() {
            return dt.timestamp_millis();
        }
        t += chrono::Duration::minutes(30);
    }
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight is valid")).timestamp_millis()
}

/// Unix milliseconds as RFC 3339 in UTC, for messages and headers.
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "never".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn periods_in_a_time_zone() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        // 2026-11-27 is a Friday; Paris is UTC+1 in November.
        let now = ms("2026-11-27T23:30:00Z"); // already Saturday 00:30 in Paris
        assert_eq!(Period::Daily.bounds(tz, now), (ms("2026-11-27T23:00:00Z"), ms("2026-11-28T23:00:00Z")));
        assert_eq!(Period::Weekly.bounds(tz, now), (ms("2026-11-22T23:00:00Z"), ms("2026-11-29T23:00:00Z")));
        assert_eq!(Period::Monthly.bounds(tz, now), (ms("2026-10-31T23:00:00Z"), ms("2026-11-30T23:00:00Z")));
        assert_eq!(Period::None.bounds(tz, now), (0, i64::MAX));
    }

    #[test]
    fn month_across_a_dst_change() {
        let tz: Tz = "America/New_York".parse().unwrap();
        // March 2027: EST (-5) on the 1st, EDT (-4) from the 14th.
        let (start, end) = Period::Monthly.bounds(tz, ms("2027-03-20T12:00:00Z"));
        assert_eq!((start, end), (ms("2027-03-01T05:00:00Z"), ms("2027-04-01T04:00:00Z")));
    }

    #[test]
    fn midnight_that_does_not_exist() {
        // Santiago skips 00:00-01:00 when DST starts (2026-09-06).
        let tz: Tz = "America/Santiago".parse().unwrap();
        let (start, _) = Period::Daily.bounds(tz, ms("2026-09-06T12:00:00Z"));
        assert_eq!(rfc3339(start), "2026-09-06T04:00:00Z");
    }
}
