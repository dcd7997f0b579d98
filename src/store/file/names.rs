//! How keys become file names and back (see [`FileStore`](super::FileStore)'s layout).

use std::fs;
use std::path::Path;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
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

/// The bytes a file name encodes: all but `a`–`z`, `0`–`9`, `-` and `_` (upper-case letters
/// too, so that case-insensitive file systems cannot merge two keys).
const ENCODED: &AsciiSet = &{
    let mut set = NON_ALPHANUMERIC.remove(b'-').remove(b'_');
    let mut upper = b'A';
    while upper <= b'Z' {
        set = set.add(upper);
        upper += 1;
    }
    set
};

/// The percent-encoded file-name form of a key (see [`FileStore`](super::FileStore)'s layout).
pub(super) fn encode_key(key: &str) -> String {
    if key.is_empty() {
        return "%".to_owned();
    }
    utf8_percent_encode(key, ENCODED).to_string()
}

/// The key of a file name, if it is exactly what [`encode_key`] makes of some key: the
/// round trip rejects what decoding alone would let through (lower-case hex, a kept byte
/// encoded, a stray `%`, a byte that is neither kept nor encoded).
pub(super) fn decode_key(name: &str) -> Option<String> {
    if name == "%" {
        return Some(String::new());
    }
    let key = percent_decode_str(name).decode_utf8().ok()?;
    (encode_key(&key) == name).then(|| key.into_owned())
}

#[cfg(test)]
pub(super) fn keeps(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}
