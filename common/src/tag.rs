use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// One `key=value` tag. Keys are lowercase (`[a-z0-9][a-z0-9._/-]*`, at most 63 bytes); values
/// are `[A-Za-z0-9._-]+`, at most 63 bytes, so a tag is safe in a query string, a Redis key
/// and a label on a Kubernetes node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag {
    key: String,
    value: String,
}

impl Tag {
    pub fn new(key: &str, value: &str) -> Result<Self, ParseError> {
        Self::parse("tag", &format!("{key}={value}"))
    }

    pub fn parse(field: &str, text: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::new(field, text, reason);
        let Some((key, value)) = text.split_once('=') else {
            return Err(bad("expected key=value"));
        };
        if key.is_empty() || key.len() > 63 {
            return Err(bad("key must be 1 to 63 characters"));
        }
        if !key.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(bad("key must start with a-z or 0-9"));
        }
        if !key.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/')
        }) {
            return Err(bad("key may contain only a-z, 0-9, '.', '_', '-' and '/'"));
        }
        if value.is_empty() || value.len() > 63 {
            return Err(bad("value must be 1 to 63 characters"));
        }
        if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(bad("value may contain only A-Z, a-z, 0-9, '.', '_' and '-'"));
        }
        Ok(Self { key: key.to_owned(), value: value.to_owned() })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

crate::text_conversions!(Tag, "tag");

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// The tags of one resource: at most one value per key (setting a key again replaces it).
/// Serialized as a sorted list of `key=value` strings, the same form the CLI takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Tag>", into = "Vec<Tag>")]
pub struct Tags(BTreeMap<String, String>);

impl Tags {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, tag: Tag) {
        self.0.insert(tag.key, tag.value);
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn contains(&self, tag: &Tag) -> bool {
        self.get(tag.key()) == Some(tag.value())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = Tag> + '_ {
        self.0.iter().map(|(k, v)| Tag { key: k.clone(), value: v.clone() })
    }
}

impl FromIterator<Tag> for Tags {
    fn from_iter<I: IntoIterator<Item = Tag>>(iter: I) -> Self {
        let mut tags = Self::new();
        for tag in iter {
            tags.insert(tag);
        }
        tags
    }
}

impl TryFrom<Vec<Tag>> for Tags {
    type Error = ParseError;
    fn try_from(list: Vec<Tag>) -> Result<Self, Self::Error> {
        let mut tags = Self::new();
        for tag in list {
            if let Some(old) = tags.get(tag.key())
                && old != tag.value()
            {
                return Err(ParseError::new(
                    "tags",
                    tag.to_string(),
                    format!("key {:?} is given twice", tag.key()),
                ));
            }
            tags.insert(tag);
        }
        Ok(tags)
    }
}

impl From<Tags> for Vec<Tag> {
    fn from(tags: Tags) -> Self {
        tags.iter().collect()
    }
}

impl fmt::Display for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Which workers may take a job: every tag in the selector must be present on the worker.
/// An empty selector matches every worker. Canonical text form: sorted `k=v` joined by `,`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagSelector(Vec<Tag>);

impl TagSelector {
    pub fn new(tags: impl IntoIterator<Item = Tag>) -> Result<Self, ParseError> {
        let mut list: Vec<Tag> = tags.into_iter().collect();
        list.sort();
        list.dedup();
        for pair in list.windows(2) {
            if pair[0].key() == pair[1].key() {
                return Err(ParseError::new(
                    "selector",
                    format!("{},{}", pair[0], pair[1]),
                    "a key may appear only once",
                ));
            }
        }
        Ok(Self(list))
    }

    pub fn any() -> Self {
        Self(Vec::new())
    }

    pub fn tags(&self) -> &[Tag] {
        &self.0
    }

    pub fn matches(&self, tags: &Tags) -> bool {
        self.0.iter().all(|t| tags.contains(t))
    }

    /// The datacenter the selector is confined to (`datacenter=NAME`), if any. A value that
    /// is not a valid name confines it to no datacenter a worker can have.
    pub fn datacenter(&self) -> Option<crate::Name> {
        self.0.iter().find(|t| t.key() == "datacenter").and_then(|t| t.value().parse().ok())
    }
}

impl FromStr for TagSelector {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::any());
        }
        let tags =
            s.split(',').map(|t| Tag::parse("selector", t)).collect::<Result<Vec<_>, _>>()?;
        Self::new(tags)
    }
}

impl TryFrom<String> for TagSelector {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TagSelector> for String {
    fn from(s: TagSelector) -> Self {
        s.to_string()
    }
}

impl fmt::Display for TagSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse_and_explain() {
        let t: Tag = "site=flat".parse().unwrap();
        assert_eq!((t.key(), t.value()), ("site", "flat"));
        assert!("topology.kubernetes.io/zone=a-1".parse::<Tag>().is_ok());
        for bad in ["site", "=x", "site=", "Site=x", "site=a b", "k=v=w", "k=<script>"] {
            let err = bad.parse::<Tag>().unwrap_err();
            assert_eq!(err.field, "tag");
            assert_eq!(err.value, bad);
        }
    }

    #[test]
    fn tags_keep_one_value_per_key() {
        let tags: Tags = ["a=1", "b=2", "a=3"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(tags.to_string(), "a=3,b=2");
        let json = serde_json::to_string(&tags).unwrap();
        assert_eq!(json, r#"["a=3","b=2"]"#);
        assert!(serde_json::from_str::<Tags>(r#"["a=1","a=2"]"#).is_err());
    }

    #[test]
    fn selector_matches_subsets() {
        let tags: Tags = ["datacenter=home", "role=builder", "arch=x86_64"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(TagSelector::any().matches(&tags));
        assert!("role=builder,datacenter=home".parse::<TagSelector>().unwrap().matches(&tags));
        assert!(!"role=builder,datacenter=away".parse::<TagSelector>().unwrap().matches(&tags));
        assert!("a=1,a=2".parse::<TagSelector>().is_err());
        let sel: TagSelector = "role=b,datacenter=home".parse().unwrap();
        assert_eq!(sel.to_string(), "datacenter=home,role=b");
    }
}
