//! When signed metadata expires: a lifetime (`30d`, `12h`, `90m`) or a fixed time.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// When one role's metadata expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    /// This long after signing.
    After(Duration),
    /// At this time, even if it is already past (tests make expired repositories this way).
    At(Timestamp),
}

impl Expires {
    /// A lifetime of `days` days.
    pub const fn days(days: u64) -> Self {
        Expires::After(Duration::from_secs(days * 86_400))
    }

    /// The expiry time for metadata signed at `now`, whole seconds (what TUF metadata holds).
    pub fn resolve(self, now: Timestamp) -> Result<Timestamp, ExpiryError> {
        let at = match self {
            Expires::At(at) => at,
            Expires::After(d) => SignedDuration::try_from(d)
                .ok()
                .and_then(|d| now.checked_add(d).ok())
                .ok_or(ExpiryError::TooFar(self))?,
        };
        Timestamp::from_second(at.as_second()).map_err(|_| ExpiryError::TooFar(self))
    }
}

impl fmt::Display for Expires {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expires::At(at) => write!(f, "{at}"),
            Expires::After(d) => {
                let s = d.as_secs();
                for (unit, len) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
                    if s != 0 && s % len == 0 {
                        return write!(f, "{}{unit}", s / len);
                    }
                }
                write!(f, "{s}s")
            }
        }
    }
}

/// Parses a lifetime (`30d`, `12h`, `90m`, `45s`, `2w`) or an RFC 3339 time
/// (`2030-01-01T00:00:00Z`).
impl FromStr for Expires {
    type Err = ExpiryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ExpiryError::Invalid(s.to_owned());
        let s = s.trim();
        if s.contains('T') {
            return s.parse::<Timestamp>().map(Expires::At).map_err(|_| bad());
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            _ => return Err(bad()),
        };
        let secs = n.checked_mul(unit).ok_or_else(bad)?;
        Ok(Expires::After(Duration::from_secs(secs)))
    }
}

/// Lifetimes of the three roles signed on every publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub targets: Expires,
    pub snapshot: Expires,
    pub timestamp: Expires,
}

impl Default for Expiry {
    /// 30 days for targets, 7 for the snapshot, 1 for the timestamp.
    fn default() -> Self {
        Expiry {
            targets: Expires::days(30),
            snapshot: Expires::days(7),
            timestamp: Expires::days(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    #[error(
        "invalid expiry {0:?}: expected a lifetime like 30d, 12h or 90m, \
         or a time like 2030-01-01T00:00:00Z"
    )]
    Invalid(String),
    #[error("expiry {0} is too far in the future")]
    TooFar(Expires),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<u64>) {
        let got = input.parse::<Expires>().ok().map(|e| match e {
            Expires::After(d) => d.as_secs(),
            Expires::At(_) => panic!("{input} parsed as a time"),
        });
        assert_eq!(got, expected, "{input}");
    }

    #[test]
    fn parses_lifetimes() {
        check("30d", Some(30 * 86_400));
        check("12h", Some(12 * 3_600));
        check("90m", Some(90 * 60));
        check("45s", Some(45));
        check("2w", Some(2 * 604_800));
        check("0s", Some(0));
        check("30", None);
        check("d", None);
        check("-1d", None);
        check("1.5d", None);
        check("3y", None);
        check("30 d", None);
        check("99999999999999999999d", None);
        check("9999999999999999d", None);
    }

    #[test]
    fn parses_times_and_resolves() {
        let at: Expires = "2030-01-02T03:04:05Z".parse().unwrap();
        let now: Timestamp = "2025-01-01T00:00:00.5Z".parse().unwrap();
        assert_eq!(
            at.resolve(now).unwrap(),
            "2030-01-02T03:04:05Z".parse::<Timestamp>().unwrap()
        );
        let in_a_day = Expires::days(1).resolve(now).unwrap();
        assert_eq!(in_a_day.to_string(), "2025-01-02T00:00:00Z");
        assert!("2030-13-01T00:00:00Z".parse::<Expires>().is_err());
        let err = "soon".parse::<Expires>().unwrap_err().to_string();
        assert!(err.contains("30d"), "{err}");
    }

    #[test]
    fn displays_lifetimes() {
        for s in ["30d", "12h", "90m", "45s", "2w", "0s"] {
            assert_eq!(s.parse::<Expires>().unwrap().to_string(), s);
        }
    }
}
