//! Human sizes: plain byte counts or binary K/M/G/T suffixes (4K = 4096).

use std::fmt;

/// Parses `"4096"`, `"4K"`, `"480M"`, `"1G"`, `"2T"` (binary multiples; an optional trailing
/// `B` or `iB` is accepted, case-insensitive). Rejects empty, negative, fractional and
/// overflowing values.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let err = || SizeError(text.to_string());
    if t.is_empty() {
        return Err(err());
    }
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Formats a byte count the way users read it: `480 MiB`, `1.5 GiB`, `252 KiB`, `17 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A size argument that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError(pub String);

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid size '{}': expected a byte count or a number with a K, M, G or T suffix (e.g. 4K, 480M)",
            self.0
        )
    }
}

impl std::error::Error for SizeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("252KiB").unwrap(), 252 * 1024);
        assert_eq!(parse_size("480M").unwrap(), 480 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size(" 7 ").unwrap(), 7);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "K",
            "-4K",
            "1.5M",
            "4X",
            "abc",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(17), "17 B");
        assert_eq!(format_size(252 * 1024), "252 KiB");
        assert_eq!(format_size(480 << 20), "480 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
