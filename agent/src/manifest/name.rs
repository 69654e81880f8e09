//! `AppName`: the app id, also a DNS label (`<app>-<device>.local`), a cgroup and a directory name.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Lower-case letters, digits and single dashes; starts with a letter, ends with a letter or
/// digit; at most 32 characters, so `<app>-<device>` stays within a 63-byte DNS label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppName(String);

pub const MAX_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a valid app name: {why}")]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

impl AppName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for AppName {
    type Error = NameError;

    fn try_from(s: &str) -> Result<Self, NameError> {
        let err = |why| {
            Err(NameError {
                name: s.to_string(),
                why,
            })
        };
        if s.is_empty() {
            return err("it is empty");
        }
        if s.len() > MAX_LEN {
            return err("use at most 32 characters");
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return err("use lower-case letters, digits and dashes");
        }
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
            return err("it must start with a letter");
        }
        if s.ends_with('-') {
            return err("it must not end with a dash");
        }
        if s.contains("--") {
            return err("it must not contain two dashes in a row");
        }
        Ok(AppName(s.to_string()))
    }
}

impl TryFrom<String> for AppName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        AppName::try_from(s.as_str())
    }
}

impl std::str::FromStr for AppName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        AppName::try_from(s)
    }
}

impl From<AppName> for String {
    fn from(n: AppName) -> String {
        n.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, ok: bool) {
        assert_eq!(AppName::try_from(input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn names() {
        for good in ["a", "wiki", "my-app2", "a1", "x-y-z", &"a".repeat(32)] {
            check(good, true);
        }
        for bad in [
            "",
            "Wiki",
            "1app",
            "-a",
            "a-",
            "a--b",
            "a_b",
            "a.b",
            "ä",
            &"a".repeat(33),
            "a b",
        ] {
            check(bad, false);
        }
    }

    #[test]
    fn error_names_the_input() {
        let e = AppName::try_from("Wiki").unwrap_err().to_string();
        assert_eq!(
            e,
            "\"Wiki\" is not a valid app name: use lower-case letters, digits and dashes"
        );
    }
}
