//! Label selectors for `GET /machines?label=…`: comma-separated terms, all of which must hold —
//! `key=value` (also `key==value`), `key!=value` (true when the key is absent too), `key` (present),
//! `!key` (absent).

use std::collections::BTreeMap;

use super::validate::{label_key, label_value};

/// Most terms in one selector.
const MAX_TERMS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Selector(Vec<Term>);

impl Selector {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let key_ok = |k: &str| -> Result<String, String> {
                let k = k.trim();
                if label_key(k) { Ok(k.to_string()) } else { Err(format!("label: '{k}' is not a label key")) }
            };
            let value_ok = |v: &str| -> Result<String, String> {
                let v = v.trim();
                if label_value(v) { Ok(v.to_string()) } else { Err(format!("label: '{v}' is not a label value")) }
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(key_ok(k)?, value_ok(v)?)
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Equals(key_ok(k)?, value_ok(v)?)
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::Absent(key_ok(k)?)
            } else {
                Term::Exists(key_ok(raw)?)
            };
            terms.push(term);
        }
        if terms.len() > MAX_TERMS {
            return Err(format!("label: at most {MAX_TERMS} terms"));
        }
        Ok(Self(terms))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> =
            [("team", "ml"), ("env", "dev"), ("example.com/tier", "gold")].map(|(k, v)| (k.into(), v.into())).into();
        let m = |s: &str| Selector::parse(s).unwrap().matches(&labels);
        assert!(m("team=ml"));
        assert!(m("team==ml,env!=prod"));
        assert!(m("team, example.com/tier=gold"));
        assert!(m("!owner") && m("owner!=bob"));
        assert!(!m("team=ml,env=prod"));
        assert!(!m("owner") && !m("!team"));
        assert!(m(""), "an empty selector selects everything");
        assert!(Selector::parse("bad key=1").unwrap_err().contains("'bad key'"));
        assert!(Selector::parse("=1").is_err());
        // A value no label can have (a NUL, a space) is refused, not stored or compared.
        assert!(Selector::parse("team=m\0l").unwrap_err().contains("not a label value"));
        assert!(Selector::parse("team!=a b").unwrap_err().contains("'a b'"));
        assert!(m("team!=") && !m("team="), "an empty value is a value");
        assert!(Selector::parse(&vec!["a"; 33].join(",")).unwrap_err().contains("at most 32"));
    }
}
