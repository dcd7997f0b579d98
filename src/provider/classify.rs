//! Turning a token endpoint's reply into a typed outcome.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::error::{
    ConfigProblem, InvalidationReason, ProviderError, ProviderErrorKind, UnavailableCause,
};
use crate::provider::HttpReply;

/// Maps a provider's non-standard replies to typed failures.
///
/// A classifier sees every reply, successful status or not, before the RFC 6749 rules. Return
/// `Some` for the replies it recognises and `None` to fall through to the standard rules
/// (RFC 6749 §5.2 codes, `429`, `5xx`, then the lenient success parse).
///
/// Closures work too:
///
/// ```
/// use tokenkeeper::{HttpReply, InvalidationReason, ProviderError};
/// // Facebook-style: HTTP 400 with error.code 190 and subcode 460 means "password changed".
/// let classify = |reply: &HttpReply, _now: std::time::SystemTime| {
///     let json = reply.json()?;
///     (json["error"]["error_subcode"] == 460)
///         .then(|| ProviderError::reauthorize(InvalidationReason::PasswordChanged))
/// };
/// # let _ = classify;
/// ```
pub trait Classifier: Send + Sync + 'static {
    /// Classifies `reply`, or returns `None` to apply the standard rules.
    fn classify(&self, reply: &HttpReply, now: SystemTime) -> Option<ProviderError>;
}

impl<F> Classifier for F
where
    F: Fn(&HttpReply, SystemTime) -> Option<ProviderError> + Send + Sync + 'static,
{
    fn classify(&self, reply: &HttpReply, now: SystemTime) -> Option<ProviderError> {
        self(reply, now)
    }
}

/// The RFC 6749 rules alone (the default of [`OAuth2Provider`](crate::OAuth2Provider)).
///
/// | reply | outcome |
/// |---|---|
/// | 2xx with an `access_token` | success (lenient parse, see [`TokenResponse::from_json`](crate::TokenResponse::from_json)) |
/// | 2xx without one, or not JSON | `Unavailable(InvalidResponse)` |
/// | `429` | `RateLimited`, with `Retry-After` (seconds or HTTP-date) when sent |
/// | `3xx`, or any reply reached by following a redirect | `Misconfigured(Endpoint)`: the token URL is wrong (a redirect is never followed by the default client: it would re-send the refresh token and client secret) |
/// | `invalid_grant` | `Reauthorize(InvalidGrant)` |
/// | `interaction_required`, `login_required`, `consent_required`, `access_denied` | `Reauthorize(Provider { code })`: only the user can fix these (log in, consent, allow access), so they are not retried; the code is kept as it came so the app can tell the user what to do |
/// | `invalid_client`, `unauthorized_client`, `unsupported_grant_type`, `invalid_scope`, `invalid_request` | `Misconfigured` |
/// | `temporarily_unavailable`, `server_error`, any `5xx` | `Unavailable`, with `Retry-After` when sent |
/// | `slow_down` | `RateLimited` |
/// | `401` without a code | `Misconfigured(InvalidClient)` (RFC 6749 §5.2) |
/// | `404`, `405` | `Misconfigured(Endpoint)` |
/// | any other status | `Unavailable(UnexpectedStatus)`: retried with backoff, the grant is not killed |
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardClassifier;

impl Classifier for StandardClassifier {
    fn classify(&self, _reply: &HttpReply, _now: SystemTime) -> Option<ProviderError> {
        None
    }
}

pub(crate) fn standard(reply: &HttpReply, now: SystemTime) -> Option<ProviderError> {
    let status = reply.status();
    if reply.redirected() || (300..400).contains(&status) {
        return Some(ProviderError::misconfigured(ConfigProblem::Endpoint));
    }
    let retry_after = reply.retry_after(now);
    if status == 429 {
        return Some(ProviderError::rate_limited(retry_after));
    }
    let unavailable =
        |cause| ProviderError::new(ProviderErrorKind::Unavailable { cause, retry_after });
    if (200..300).contains(&status) {
        return None;
    }
    if let Some(code) = reply.oauth_error() {
        let err = match code.as_str() {
            "invalid_grant" => ProviderError::reauthorize(InvalidationReason::InvalidGrant),
            // OpenID Connect Core §3.1.2.6 and RFC 6749 §4.1.2.1 codes: a human must act.
            "interaction_required" | "login_required" | "consent_required" | "access_denied" => {
                ProviderError::reauthorize(InvalidationReason::Provider { code: code.clone() })
            }
            "invalid_client" => ProviderError::misconfigured(ConfigProblem::InvalidClient),
            "unauthorized_client" => {
                ProviderError::misconfigured(ConfigProblem::UnauthorizedClient)
            }
            "unsupported_grant_type" => {
                ProviderError::misconfigured(ConfigProblem::UnsupportedGrantType)
            }
            "invalid_scope" => ProviderError::misconfigured(ConfigProblem::InvalidScope),
            "invalid_request" => ProviderError::misconfigured(ConfigProblem::InvalidRequest),
            "slow_down" => ProviderError::rate_limited(retry_after),
            "temporarily_unavailable" | "server_error" => {
                unavailable(UnavailableCause::ServerError)
            }
            _ if status >= 500 => unavailable(UnavailableCause::ServerError),
            _ => unavailable(UnavailableCause::UnexpectedStatus),
        };
        return Some(err);
    }
    Some(match status {
        500..=599 => unavailable(UnavailableCause::ServerError),
        401 => ProviderError::misconfigured(ConfigProblem::InvalidClient),
        404 | 405 => ProviderError::misconfigured(ConfigProblem::Endpoint),
        408 => unavailable(UnavailableCause::Timeout),
        _ => unavailable(UnavailableCause::UnexpectedStatus),
    })
}

/// The Xoxoday-style refresh endpoint's error bodies.
///
/// | body | outcome |
/// |---|---|
/// | `{"success":0,"error_message_id":"auth.token_error"}` (a super admin reset the password) | `Reauthorize(PasswordChanged)` |
/// | `{"error":"invalid_token",…}` (another super admin generated a new token) | `Reauthorize(Superseded)` |
/// | `{"message":"auth.request_limit_exceeded"}` | `RateLimited` (with `Retry-After` if sent) |
/// | `{"errors":[{"message":"auth.request_limit_exceeded","penaltySeconds":60}]}` | `RateLimited` for the penalty |
/// | `PIPE10015` / `PIPE10016` (user or company disabled) | `Reauthorize(Provider { code })` |
/// | `PIPE10017` (IP not allow-listed) | `Misconfigured` |
///
/// The statuses of these replies are not documented, so the body decides, whatever the status.
#[derive(Debug, Clone, Copy, Default)]
pub struct XoxodayClassifier;

impl Classifier for XoxodayClassifier {
    fn classify(&self, reply: &HttpReply, now: SystemTime) -> Option<ProviderError> {
        let json = reply.json()?;
        let text = |v: &Value| v.as_str().map(str::to_owned);
        if json.get("error_message_id").and_then(Value::as_str) == Some("auth.token_error") {
            return Some(ProviderError::reauthorize(
                InvalidationReason::PasswordChanged,
            ));
        }
        if json.get("error").and_then(Value::as_str) == Some("invalid_token") {
            return Some(ProviderError::reauthorize(InvalidationReason::Superseded));
        }
        if json.get("message").and_then(Value::as_str) == Some("auth.request_limit_exceeded") {
            return Some(ProviderError::rate_limited(reply.retry_after(now)));
        }
        if let Some(errors) = json.get("errors").and_then(Value::as_array) {
            for e in errors {
                if e.get("message").and_then(Value::as_str) == Some("auth.request_limit_exceeded") {
                    let penalty = e
                        .get("penaltySeconds")
                        .and_then(Value::as_u64)
                        .map(Duration::from_secs);
                    return Some(ProviderError::rate_limited(
                        penalty.or(reply.retry_after(now)),
                    ));
                }
            }
        }
        let code = ["code", "errorCode", "error_code"]
            .iter()
            .find_map(|k| json.get(*k).and_then(text))?;
        match code.as_str() {
            "PIPE10015" | "PIPE10016" => {
                Some(ProviderError::reauthorize(InvalidationReason::Provider {
                    code,
                }))
            }
            "PIPE10017" => Some(ProviderError::misconfigured(ConfigProblem::OAuth { code })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    fn reply(status: u16, body: &str) -> HttpReply {
        HttpReply::new(status, HeaderMap::new(), body.as_bytes().to_vec())
    }

    fn kind(r: Result<crate::TokenResponse, ProviderError>) -> ProviderErrorKind {
        r.expect_err("expected a failure").kind().clone()
    }

    #[test]
    fn retry_after_as_seconds_and_http_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(
            HttpReply::new(429, h, vec![]).retry_after(now()),
            Some(Duration::from_secs(120))
        );
        let mut h = HeaderMap::new();
        let at = httpdate::fmt_http_date(now() + Duration::from_secs(300));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&at).unwrap());
        assert_eq!(
            HttpReply::new(429, h, vec![]).retry_after(now()),
            Some(Duration::from_secs(300))
        );
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(HttpReply::new(429, h, vec![]).retry_after(now()), None);
    }

    #[test]
    fn xoxoday_bodies() {
        let c = XoxodayClassifier;
        let cases = [
            (
                401,
                r#"{"success":0,"error_message_id":"auth.token_error"}"#,
                ProviderErrorKind::Reauthorize(InvalidationReason::PasswordChanged),
            ),
            (
                401,
                r#"{"error":"invalid_token","error_description":"invalid/expired token"}"#,
                ProviderErrorKind::Reauthorize(InvalidationReason::Superseded),
            ),
            (
                429,
                r#"{"message":"auth.request_limit_exceeded"}"#,
                ProviderErrorKind::RateLimited { retry_after: None },
            ),
            (
                429,
                r#"{"errors":[{"message":"auth.request_limit_exceeded","penaltySeconds":60}]}"#,
                ProviderErrorKind::RateLimited {
                    retry_after: Some(Duration::from_secs(60)),
                },
            ),
            (
                401,
                r#"{"code":"PIPE10016"}"#,
                ProviderErrorKind::Reauthorize(InvalidationReason::Provider {
                    code: "PIPE10016".into(),
                }),
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                kind(reply(status, body).interpret(&c, now())),
                want,
                "{body}"
            );
        }
        // Status 200 with the password-reset body is still a dead grant.
        assert_eq!(
            kind(
                reply(
                    200,
                    r#"{"success":0,"error_message_id":"auth.token_error"}"#
                )
                .interpret(&c, now())
            ),
            ProviderErrorKind::Reauthorize(InvalidationReason::PasswordChanged)
        );
        // A success passes through.
        assert!(reply(200, r#"{"access_token":"a","expires_in":"1296000"}"#)
            .interpret(&c, now())
            .is_ok());
    }
}
