//! The names of a `RedisStore`'s keys: `{prefix}{tag}:grant` and `{prefix}{tag}:lock`, where
//! the tag (a Redis Cluster hash tag) stands for the grant's key, so that both keys of a grant
//! share a hash slot.

use std::borrow::Cow;

use crate::error::{StoreError, StoreErrorKind};
use crate::token::TokenKey;

/// What ends a grant's hash key (after its hash tag).
const GRANT: &str = ":grant";
/// What ends a grant's lock key (after its hash tag).
const LOCK: &str = ":lock";

/// The key names under one prefix.
#[derive(Debug)]
pub(super) struct Layout {
    prefix: String,
}

impl Layout {
    /// The layout under `prefix`, which may not hold `{` or `}`: Redis would take the hash
    /// tag from the prefix (one slot for every key, or, for `{}`, none shared by a grant's
    /// two keys).
    pub(super) fn new(prefix: &str) -> Result<Self, StoreError> {
        if prefix.contains(['{', '}']) {
            return Err(StoreError::with_kind(
                StoreErrorKind::InvalidKey,
                format!(
                    "the prefix `{prefix}` holds `{{` or `}}`, which would choose the Redis \
                     Cluster hash slot of every key"
                ),
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash holding `key`'s version and record.
    pub(super) fn grant(&self, key: &TokenKey) -> String {
        format!("{}{{{}}}{GRANT}", self.prefix, hash_tag(key.as_str()))
    }

    /// `key`'s refresh lock.
    pub(super) fn lock(&self, key: &TokenKey) -> String {
        format!("{}{{{}}}{LOCK}", self.prefix, hash_tag(key.as_str()))
    }

    /// The `SCAN … MATCH` pattern of every grant hash.
    pub(super) fn grants_pattern(&self) -> String {
        format!("{}{{*}}{GRANT}", glob_escape(&self.prefix))
    }

    /// The grant a key name returned by `SCAN` belongs to, if it is one of this layout's.
    pub(super) fn grant_of(&self, name: &[u8]) -> Option<TokenKey> {
        let name = std::str::from_utf8(name).ok()?;
        let tag = name
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix(GRANT)?
            .strip_suffix('}')?;
        key_of_tag(tag).map(TokenKey::from)
    }
}

/// The hash tag of a grant's keys: `key` with `%`, `{` and `}` percent-encoded, `%` for the
/// empty key (an empty tag `{}` would not be a tag).
fn hash_tag(key: &str) -> Cow<'_, str> {
    if key.is_empty() {
        return Cow::Borrowed("%");
    }
    if !key.contains(['%', '{', '}']) {
        return Cow::Borrowed(key);
    }
    let mut tag = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    Cow::Owned(tag)
}

/// The key a [`hash_tag`] stands for, if `tag` is one.
fn key_of_tag(tag: &str) -> Option<String> {
    if tag == "%" {
        return Some(String::new());
    }
    if tag.is_empty() || tag.contains(['{', '}']) {
        return None;
    }
    let mut key = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(at) = rest.find('%') {
        key.push_str(&rest[..at]);
        let code = rest.get(at..at + 3)?;
        key.push(match code {
            "%25" => '%',
            "%7B" => '{',
            "%7D" => '}',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    key.push_str(rest);
    Some(key)
}

/// Escapes the glob characters of `SCAN … MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn a_grants_keys_share_a_hash_slot_and_name_it_back() {
        let layout = Layout::new("tokenkeeper:").unwrap();
        let awkward = [
            "",
            "k",
            "customer-42",
            "}",
            "{",
            "{}",
            "}{",
            "%",
            "%7B",
            "a{b}c",
            "é/\\?*[x]:{%}",
        ];
        let mut slots = BTreeSet::new();
        for key in awkward {
            let key = TokenKey::from(key);
            let tag = hash_tag(key.as_str());
            assert!(
                !tag.is_empty() && !tag.contains(['{', '}']),
                "{key:?}: {tag}"
            );
            let (grant, lock) = (layout.grant(&key), layout.lock(&key));
            assert_eq!(Slot::for_key(&grant), Slot::for_key(&lock), "{key:?}");
            assert_eq!(
                Slot::for_key(&grant),
                Slot::for_key(tag.as_bytes()),
                "{key:?}"
            );
            assert_eq!(layout.grant_of(grant.as_bytes()), Some(key.clone()));
            assert_eq!(layout.grant_of(lock.as_bytes()), None, "a lock is no grant");
            slots.insert(format!("{:?}", Slot::for_key(&grant)));
        }
        assert!(slots.len() > 5, "grants spread over slots: {slots:?}");
        assert_eq!(
            layout.grant(&TokenKey::from("customer-42")),
            "tokenkeeper:{customer-42}:grant"
        );
        assert_eq!(
            layout.lock(&TokenKey::from("a%{b}")),
            "tokenkeeper:{a%25%7Bb%7D}:lock"
        );
        assert_eq!(layout.grant(&TokenKey::from("")), "tokenkeeper:{%}:grant");
        for foreign in [
            "tokenkeeper:{}:grant",
            "tokenkeeper:{a{b}:grant",
            "tokenkeeper:{a}b}:grant",
            "tokenkeeper:{%2}:grant",
            "tokenkeeper:{%41}:grant",
            "tokenkeeper:{a%zz}:grant",
            "tokenkeeper:grant:k",
            "other:{k}:grant",
        ] {
            assert_eq!(layout.grant_of(foreign.as_bytes()), None, "{foreign}");
        }
        assert_eq!(layout.grant_of(b"tokenkeeper:{\xff}:grant"), None);
    }

    #[test]
    fn the_pattern_escapes_the_prefix_and_braces_are_refused() {
        assert_eq!(
            Layout::new("app*[a]:").unwrap().grants_pattern(),
            "app\\*\\[a\\]:{*}:grant"
        );
        for prefix in ["{app}:", "app{", "app}", "a{}"] {
            let err = Layout::new(prefix).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::InvalidKey, "{prefix}");
        }
    }
}
