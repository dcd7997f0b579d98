//! How keys become file names and back (see [`FileStore`](super::FileStore)'s layout).

use std::fs;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Encoded key names longer than this are hashed instead: with the longest suffix the name
/// must stay within the usual 255-byte limit of file systems.
pub(super) const MAX_ENCODED_KEY: usize = 240;

/// The file name (without suffix) of a key: its percent-encoding, or for a key whose encoding
/// is longer than [`MAX_ENCODED_KEY`], `%%` and the SHA-256 of the key in hex (see
/// [`FileStore`](super::FileStore)'s layout).
pub(super) fn file_name(key: &str) -> String {
    let name = encode_key(key);
    if name.len() <= MAX_ENCODED_KEY {
        return name;
    }
    format!("%%{:x}", Sha256::digest(key.as_bytes()))
}

/// Whether `stem` has the form of a hashed file name (a long key's).
pub(super) fn is_hashed_name(stem: &str) -> bool {
    stem.strip_prefix("%%").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The key written in the grant file `path` whose hashed name is `stem`, if the file is one
/// of ours and the key hashes to that name. A corrupt file with a hashed name cannot be listed
/// (its key is unknown); loading the key still reports it.
pub(super) fn key_in_file(path: &Path, stem: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct KeyOnly {
        key: String,
    }
    let bytes = fs::read(path).ok()?;
    let Ok(KeyOnly { key }) = serde_json::from_slice(&bytes) else {
        tracing::warn!(
            path = %path.display(),
            "a grant file of a long key is not readable; it is not listed"
        );
        return None;
    };
    (file_name(&key) == stem).then_some(key)
}

/// The percent-encoded file-name form of a key (see [`FileStore`](super::FileStore)'s layout).
pub(super) fn encode_key(key: &str) -> String {
    if key.is_empty() {
        return "%".to_owned();
    }
    let mut name = String::with_capacity(key.len());
    for b in key.bytes() {
        if keeps(b) {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

/// The key of a file name, if it is exactly what [`encode_key`] makes of some key.
pub(super) fn decode_key(name: &str) -> Option<String> {
    if name == "%" {
        return Some(String::new());
    }
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2)?;
            if !hex
                .iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
            {
                return None;
            }
            let byte = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if keeps(byte) {
                return None; // Not the canonical name of any key.
            }
            bytes.push(byte);
            rest = &tail[2..];
        } else if keeps(b) {
            bytes.push(b);
            rest = tail;
        } else {
            return None;
        }
    }
    if bytes.is_empty() {
        return None;
    }
    String::from_utf8(bytes).ok()
}

pub(super) fn keeps(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}
