//! `IMAGE_VERSION`: dot-separated numbers (`0.1.0.1763900000`: the workspace version, then
//! the build's `SOURCE_DATE_EPOCH`), compared number by number.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageVersion {
    text: String,
    parts: Vec<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an image version (numbers separated by dots, like 0.1.0.1763900000)")]
pub struct BadVersion(pub String);

impl FromStr for ImageVersion {
    type Err = BadVersion;
    fn from_str(s: &str) -> Result<Self, BadVersion> {
        let bad = || BadVersion(s.to_string());
        if s.is_empty() || s.len() > 64 {
            return Err(bad());
        }
        let parts = s
            .split('.')
            .map(|p| {
                if p.is_empty() || p.len() > 19 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    Err(bad())
                } else {
                    p.parse::<u64>().map_err(|_| bad())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ImageVersion {
            text: s.to_string(),
            parts,
        })
    }
}

impl ImageVersion {
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Ord for ImageVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        // Missing trailing parts count as 0: 1.2 == 1.2.0 in order (not in text).
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| {
                let a = self.parts.get(i).copied().unwrap_or(0);
                let b = other.parts.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or_else(|| self.text.cmp(&other.text))
    }
}

impl PartialOrd for ImageVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ImageVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for ImageVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for ImageVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ImageVersion {
        s.parse().unwrap()
    }

    #[test]
    fn compares_number_by_number() {
        assert!(v("0.1.0.1763900001") > v("0.1.0.1763900000"));
        assert!(v("0.2.0.1") > v("0.1.9.999999999"));
        assert!(v("0.10.0.1") > v("0.9.0.1"), "not text order");
        assert!(v("1.2.1") > v("1.2"));
        assert_eq!(v("1.2").cmp(&v("1.2")), Ordering::Equal);
    }

    #[test]
    fn rejects_what_is_not_a_version() {
        for bad in [
            "",
            "1..2",
            "a.b",
            "1.2.",
            "-1",
            "1.2 ",
            "99999999999999999999",
        ] {
            let e = bad.parse::<ImageVersion>().unwrap_err();
            assert_eq!(e, BadVersion(bad.to_string()));
            assert!(e.to_string().contains("not an image version"));
        }
    }
}
