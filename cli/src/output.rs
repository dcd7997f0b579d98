//! What `list`, `show` and `export` print: a grant's status without its secrets, as a table
//! row or a JSON object; and a grant's full record, secrets included, when asked.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenkeeper::{GrantHealth, GrantRecord, TokenKey};

/// One grant as listed: never a secret.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub key: String,
    /// `active`, `backing_off`, `reauthorization_required`, or `encrypted` (read without the
    /// store's key).
    pub health: &'static str,
    /// Why the grant is dead (snake case), for `reauthorization_required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The reason in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_text: Option<String>,
    /// Where the grant was moved, for reason `moved`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// When it was found dead, or the end of its backoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_off_until: Option<String>,
    pub access_expires_at: Option<String>,
    pub refresh_expires_at: Option<String>,
    pub has_refresh_token: bool,
    pub last_refresh: Option<String>,
    pub failures: u32,
    pub last_error: Option<String>,
}

impl Summary {
    pub fn of(key: &TokenKey, record: &GrantRecord, now: SystemTime) -> Self {
        let tokens = record.tokens();
        let mut summary = Summary {
            key: key.as_str().to_owned(),
            health: "active",
            reason: None,
            reason_text: None,
            moved_to: record.moved_to().map(str::to_owned),
            since: None,
            backing_off_until: None,
            access_expires_at: tokens.expires_at().map(rfc3339),
            refresh_expires_at: tokens.refresh_expires_at().map(rfc3339),
            has_refresh_token: tokens.refresh_token().is_some(),
            last_refresh: record.last_refresh().map(rfc3339),
            failures: record.failures(),
            last_error: record.last_error().map(str::to_owned),
        };
        if crate::keys::is_envelope(record) {
            // Read without the key: nothing here is the grant's (the tokens' expiry and state
            // are inside the ciphertext).
            summary.health = "encrypted";
            summary.access_expires_at = None;
            summary.refresh_expires_at = None;
            return summary;
        }
        match GrantHealth::of(record, now) {
            GrantHealth::BackingOff { until } => {
                summary.health = "backing_off";
                summary.backing_off_until = Some(rfc3339(until));
            }
            GrantHealth::ReauthorizationRequired { reason, since } => {
                summary.health = "reauthorization_required";
                summary.reason = Some(reason.label());
                summary.reason_text = Some(reason.to_string());
                summary.since = since.map(rfc3339);
            }
            _ => {}
        }
        summary
    }

    /// The health column: `active`, `backing off until …`, `dead: <reason>`, `moved to …`.
    fn health_cell(&self) -> String {
        match (self.health, &self.moved_to) {
            (_, Some(to)) => format!("moved to {to}"),
            ("backing_off", _) => format!(
                "backing off until {}",
                self.backing_off_until.as_deref().unwrap_or("?")
            ),
            ("reauthorization_required", _) => {
                format!("dead: {}", self.reason.unwrap_or("unknown"))
            }
            ("encrypted", _) => "encrypted (give --key-env or --key-file)".to_owned(),
            (health, _) => health.to_owned(),
        }
    }

    /// `show`: one field a line.
    pub fn lines(&self) -> String {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        let mut out = String::new();
        let mut line = |name: &str, value: String| out.push_str(&format!("{name:<19}{value}\n"));
        line("key", self.key.clone());
        line("health", self.health_cell());
        if let Some(text) = &self.reason_text {
            line("reason", text.clone());
        }
        if self.since.is_some() {
            line("since", dash(&self.since));
        }
        line("access expires", dash(&self.access_expires_at));
        line("refresh expires", dash(&self.refresh_expires_at));
        line(
            "refresh token",
            if self.has_refresh_token { "yes" } else { "no" }.to_owned(),
        );
        line("last refresh", dash(&self.last_refresh));
        line("failures", self.failures.to_string());
        line("last error", dash(&self.last_error));
        out
    }
}

/// `list`: a table with a header, columns padded to their widest cell.
pub fn table(rows: &[Summary]) -> String {
    let header = [
        "KEY",
        "HEALTH",
        "ACCESS EXPIRES",
        "REFRESH EXPIRES",
        "LAST REFRESH",
        "LAST ERROR",
    ];
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.key.clone(),
                r.health_cell(),
                dash(&r.access_expires_at),
                dash(&r.refresh_expires_at),
                dash(&r.last_refresh),
                dash(&r.last_error),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |row: &[&str]| {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push(&header);
    for row in &cells {
        push(&row.each_ref().map(String::as_str));
    }
    out
}

/// A line of `export --include-secrets`: the key and the full stored record (tokens included),
/// which `import` reads back.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportLine {
    pub key: String,
    pub record: Value,
}

impl ExportLine {
    pub fn of(key: &TokenKey, record: &GrantRecord) -> Result<Self, serde_json::Error> {
        Ok(Self {
            key: key.as_str().to_owned(),
            record: serde_json::to_value(record)?,
        })
    }
}

/// RFC 3339 in UTC, to the second: `2026-12-01T10:22:54Z`.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use tokenkeeper::{AccessToken, RefreshToken, TokenSet};

    #[test]
    fn times_are_rfc3339_utc() {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_120_574);
        assert_eq!(rfc3339(at), "2026-12-01T10:22:54Z");
    }

    #[test]
    fn a_summary_has_no_secret_and_a_moved_grant_says_where() {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_120_574);
        let tokens = TokenSet::new(AccessToken::new("access-secret"))
            .with_refresh_token(RefreshToken::new("refresh-secret"))
            .with_expires_at(at);
        let record = GrantRecord::new(tokens).into_moved("file:///elsewhere", at);
        let summary = Summary::of(&TokenKey::from("k"), &record, at);
        let json = serde_json::to_string(&summary).unwrap();
        let text = table(&[summary]) + &Summary::of(&TokenKey::from("k"), &record, at).lines();
        for out in [&json, &text] {
            assert!(!out.contains("secret"), "{out}");
            assert!(out.contains("file:///elsewhere"), "{out}");
        }
        assert!(json.contains(r#""reason":"moved""#), "{json}");
        assert!(
            json.contains(r#""access_expires_at":"2026-12-01T10:22:54Z""#),
            "{json}"
        );
    }
}
