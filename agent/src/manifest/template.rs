//! `{{section.key}}` templates in env values and commands, filled in when an app starts.
//!
//! A template is `{{`, optional spaces, a variable of the shape `word.word` (lower-case letters
//! and `_`), optional spaces, `}}`. Text that merely contains `{{` without that shape (a Go or
//! Jinja template an app itself reads, `{{.Name}}`) is left alone, so apps keep working; a
//! variable of the right shape that is not known is an error, so a typo never reaches an app
//! as literal text.

use std::collections::BTreeMap;

/// A variable and the manifest section that must be present for it to have a value.
pub struct Variable {
    pub name: &'static str,
    pub needs: Option<&'static str>,
    pub meaning: &'static str,
}

/// Every variable a template may use.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "app.name",
        needs: None,
        meaning: "the app's name",
    },
    Variable {
        name: "app.address",
        needs: None,
        meaning: "the app's IPv6 address",
    },
    Variable {
        name: "app.ipv4",
        needs: None,
        meaning: "the app's IPv4 address",
    },
    Variable {
        name: "https.url",
        needs: Some("https"),
        meaning: "the app's public URL, https://<name>/ without the trailing slash",
    },
    Variable {
        name: "https.hostname",
        needs: Some("https"),
        meaning: "the host name in the app's public URL",
    },
    Variable {
        name: "database.host",
        needs: Some("database"),
        meaning: "the database server's address",
    },
    Variable {
        name: "database.port",
        needs: Some("database"),
        meaning: "the database server's port",
    },
    Variable {
        name: "database.name",
        needs: Some("database"),
        meaning: "the app's database",
    },
    Variable {
        name: "database.user",
        needs: Some("database"),
        meaning: "the app's database role",
    },
    Variable {
        name: "database.password",
        needs: Some("database"),
        meaning: "the role's password",
    },
    Variable {
        name: "database.url",
        needs: Some("database"),
        meaning: "postgresql://user:password@host:port/name",
    },
    Variable {
        name: "cache.host",
        needs: Some("cache"),
        meaning: "the cache's address (127.0.0.1, inside the app)",
    },
    Variable {
        name: "cache.port",
        needs: Some("cache"),
        meaning: "the cache's port",
    },
    Variable {
        name: "cache.password",
        needs: Some("cache"),
        meaning: "the cache's password",
    },
    Variable {
        name: "cache.url",
        needs: Some("cache"),
        meaning: "redis://:password@127.0.0.1:6379/0",
    },
];

/// One `{{…}}` found in a text: where it is (byte range) and the variable it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub start: usize,
    pub end: usize,
    pub variable: String,
}

/// The templates in `text`, in order.
pub fn uses(text: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("{{") {
        let start = from + i;
        let Some(j) = text[start + 2..].find("}}") else {
            break;
        };
        let inner = text[start + 2..start + 2 + j].trim();
        let end = start + 2 + j + 2;
        if is_variable_shape(inner) {
            out.push(Use {
                start,
                end,
                variable: inner.to_string(),
            });
            from = end;
        } else {
            from = start + 2;
        }
    }
    out
}

fn is_variable_shape(s: &str) -> bool {
    let mut parts = s.split('.');
    let word = |w: Option<&str>| {
        w.is_some_and(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    };
    word(parts.next()) && word(parts.next()) && parts.next().is_none()
}

/// Why a variable cannot be used in a manifest with the given sections; `None` when it can.
pub fn check(variable: &str, has_section: impl Fn(&str) -> bool) -> Option<String> {
    match VARIABLES.iter().find(|v| v.name == variable) {
        None => Some(format!(
            "unknown template variable {{{{{variable}}}}}: use one of {}",
            VARIABLES
                .iter()
                .map(|v| v.name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(v) => match v.needs {
            Some(section) if !has_section(section) => Some(format!(
                "{{{{{variable}}}}} needs a [{section}] section in the manifest"
            )),
            _ => None,
        },
    }
}

/// `text` with every template replaced by its value. Variables without a value (only
/// possible for a manifest that was not validated) become empty.
pub fn render(text: &str, values: &BTreeMap<&'static str, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for u in uses(text) {
        out.push_str(&text[last..u.start]);
        if let Some(v) = values.get(u.variable.as_str()) {
            out.push_str(v);
        }
        last = u.end;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_variables_and_leaves_other_braces() {
        let found: Vec<String> = uses("a {{database.url}} b {{ cache.url }} {{.Name}} {{x}} {{")
            .into_iter()
            .map(|u| u.variable)
            .collect();
        assert_eq!(found, ["database.url", "cache.url"]);
    }

    #[test]
    fn renders() {
        let values = BTreeMap::from([
            ("database.host", "10.0.0.1".to_string()),
            ("https.url", "https://w.local".to_string()),
        ]);
        assert_eq!(
            render("{{database.host}}:5432 {{ https.url }}/x {{.Go}}", &values),
            "10.0.0.1:5432 https://w.local/x {{.Go}}"
        );
    }

    #[test]
    fn checks_names_and_sections() {
        let has = |s: &str| s == "https";
        assert_eq!(check("https.url", has), None);
        assert!(
            check("database.url", has).is_some_and(|m| m.contains("needs a [database] section"))
        );
        assert!(check("database.pasword", has).is_some_and(|m| m
            .contains("unknown template variable {{database.pasword}}")
            && m.contains("database.password")));
    }
}
