//! A token reply's JSON object, read in one pass: the fields [`TokenResponse`] interprets
//! apart, every other field kept as it came.
//!
//! Reading the whole reply into a `serde_json::Value` and then taking each known field out of
//! its map cost as much again as the JSON itself (a map insertion and a removal per field).
//!
//! [`TokenResponse`]: super::TokenResponse

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::ParseError;

/// The fields a token reply is interpreted by.
const KNOWN: [&str; 12] = [
    "access_token",
    "refresh_token",
    "token_type",
    "expires_in",
    "expires_at",
    "access_token_expiry",
    "refresh_token_expires_in",
    "refresh_expires_in",
    "refresh_token_expiry",
    "refresh_token_expires_at",
    "refresh_expires_at",
    "scope",
];

/// A reply's fields: the [`KNOWN`] ones apart, the others in `extra`. A field sent twice is
/// the last one sent, as in a `serde_json::Value`.
pub(super) struct Fields {
    known: [Option<Value>; KNOWN.len()],
    pub(super) extra: Map<String, Value>,
}

impl Fields {
    /// Reads the JSON object `body`.
    pub(super) fn parse(body: &[u8]) -> Result<Self, ParseError> {
        serde_json::from_slice(body).map_err(|e| {
            // Valid JSON of another type fails as data; anything else is not JSON (a body
            // that only starts like another type is checked in full).
            if e.is_data() && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
                ParseError::NotAnObject
            } else {
                ParseError::NotJson
            }
        })
    }

    /// Takes the field `name` out.
    pub(super) fn remove(&mut self, name: &str) -> Option<Value> {
        match KNOWN.iter().position(|known| *known == name) {
            Some(i) => self.known[i].take(),
            None => self.extra.remove(name),
        }
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields {
            known: Default::default(),
            extra: Map::new(),
        };
        while let Some(name) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            match KNOWN.iter().position(|known| *known == name) {
                Some(i) => fields.known[i] = Some(value),
                None => {
                    fields.extra.insert(name, value);
                }
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known fields in [`KNOWN`]'s order, and the others.
    type Read = Result<(Vec<Option<Value>>, Map<String, Value>), ParseError>;

    /// The fields as the `Value` route read them: known ones taken out of the object.
    fn by_value(body: &[u8]) -> Read {
        let value: Value = serde_json::from_slice(body).map_err(|_| ParseError::NotJson)?;
        let Value::Object(mut obj) = value else {
            return Err(ParseError::NotAnObject);
        };
        let known = KNOWN.iter().map(|name| obj.remove(*name)).collect();
        Ok((known, obj))
    }

    fn by_fields(body: &[u8]) -> Read {
        let mut fields = Fields::parse(body)?;
        let known = KNOWN.iter().map(|name| fields.remove(name)).collect();
        Ok((known, fields.extra))
    }

    #[test]
    fn reads_what_a_value_would_hold() {
        let bodies: &[&[u8]] = &[
            br#"{"access_token":"a","refresh_token":"r","expires_in":3600,"token_type":"Bearer","scope":"a b"}"#,
            br#" {"access_token":"a","id_token":{"x":[1,2]},"expires_in":"60","user":null} "#,
            br#"{"access_token":"a","access_token":"b","extra":1,"extra":2}"#,
            br#"{"scope":["a","b"],"refresh_expires_at":"1720000000000","x\"y":true}"#,
            br#"{}"#,
            br#"[1,2]"#,
            br#"[1,2"#,
            br#""access_token""#,
            br#"null"#,
            br#"7"#,
            br#"{"access_token":"a"} trailing"#,
            br#"{"access_token":"a""#,
            br#"not json"#,
            b"",
            b"\xef\xbb\xbf{}",
        ];
        for body in bodies {
            assert_eq!(
                by_fields(body),
                by_value(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
