//! Parsers for config values that name something outside the file: key hashes, expiry times,
//! JWT algorithms. The config checks them at load (with the value's position in the file);
//! the modules that use the values call the same parsers.

use std::time::SystemTime;

use jsonwebtoken::Algorithm;

/// The SHA-256 of a key, as the config and the store hold it.
pub type KeyHash = [u8; 32];

pub fn parse_key_hash(s: &str) -> Result<KeyHash, String> {
    let hex_part = s
        .strip_prefix("sha256:")
        .ok_or_else(|| "a key hash looks like `sha256:<64 hex digits>` (see `tollgate keys new`)".to_string())?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| "a key hash needs exactly 64 hex digits after `sha256:`".to_string())?;
    Ok(out)
}

pub fn parse_expiry(dt: &toml::value::Datetime) -> Result<SystemTime, String> {
    use toml::value::Offset;
    let (Some(date), Some(time), Some(offset)) = (dt.date, dt.time, dt.offset) else {
        return Err("an expiry needs a date, a time and an offset, e.g. 2027-01-31T00:00:00Z".into());
    };
    let offset_minutes = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes),
    };
    let days = days_from_civil(i64::from(date.year), i64::from(date.month), i64::from(date.day));
    let secs = days * 86_400 + i64::from(time.hour) * 3600 + i64::from(time.minute) * 60 + i64::from(time.second)
        - offset_minutes * 60;
    let secs = u64::try_from(secs).map_err(|_| format!("expiry {dt} is before 1970"))?;
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, time.nanosecond))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `"HS256"` etc.; `none` is not an algorithm here.
pub fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Err("algorithm \"none\" is never accepted".into());
    }
    s.parse::<Algorithm>().map_err(|_| format!("unknown JWT algorithm {s:?}"))
}
