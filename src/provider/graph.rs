//! Graph API-style (Facebook, Instagram) and X-style error classification.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::error::{ConfigProblem, InvalidationReason, ProviderError, UnavailableCause};
use crate::provider::{Classifier, HttpReply};

/// Graph API usage is measured over a rolling hour.
const USAGE_WINDOW: Duration = Duration::from_secs(3600);

/// The longest wait any estimate is taken to mean (a bogus header cannot park a grant for
/// longer).
const MAX_ESTIMATE: Duration = Duration::from_secs(24 * 3600);

/// The Graph API's error bodies (Facebook- and Instagram-style endpoints).
///
/// Graph answers `400` (sometimes `401`, `403` or `429`) with
/// `{"error":{"message":…,"type":"OAuthException","code":190,"error_subcode":460,"fbtrace_id":…}}`;
/// the `code` and `error_subcode` decide, whatever the status:
///
/// | code / subcode | outcome |
/// |---|---|
/// | `190` / `458` (the user removed the app) | `Reauthorize(Revoked)` |
/// | `190` / `459` (security checkpoint) | `Reauthorize(SecurityCheckpoint)` |
/// | `190` / `460` (password changed) | `Reauthorize(PasswordChanged)` |
/// | `190` / `463` (token expired) | `Reauthorize(AccessTokenExpired)` |
/// | `190` / `467` (invalid token) | `Reauthorize(InvalidGrant)` |
/// | `190` with another or no subcode | `Reauthorize(Provider { code: "190/<subcode>" })` or `"190"` |
/// | `102` (session invalid) | `Reauthorize(Provider { code: "102" })` |
/// | `4` (app), `17` (user), `32` (page), `613` (custom), `80000`–`80014` (business use case) | `RateLimited`, with an estimated wait (below) |
/// | `2` (service temporarily unavailable) | `Unavailable(ServerError)` |
/// | `101` (invalid application id) | `Misconfigured(InvalidClient)` |
/// | anything else | the RFC 6749 rules of [`StandardClassifier`](crate::StandardClassifier) |
///
/// # Rate-limit estimate
///
/// Graph sends no `Retry-After`, only usage headers. The wait is, in order:
///
/// 1. `Retry-After`, if a proxy added one;
/// 2. the largest `estimated_time_to_regain_access` (minutes) in `x-business-use-case-usage`
///    (`{"<object id>":[{"type":…,"call_count":…,"total_cputime":…,"total_time":…,
///    "estimated_time_to_regain_access":…}]}`);
/// 3. from the largest percentage `p ≥ 100` among `call_count`, `total_time` and
///    `total_cputime` in `x-app-usage`, `x-page-usage` or the business use case entries: usage
///    is counted over a rolling hour, so if it was spread evenly, it falls back to 100 % after
///    `60 min × (1 − 100 / p)`; never less than the fallback;
/// 4. otherwise the fallback ([`fallback_retry_after`](Self::fallback_retry_after), default
///    5 minutes): calls made while limited count against the limit too, so a short default
///    would prolong it.
///
/// Every estimate is capped at 24 hours. Malformed headers are ignored (the next rule applies).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use reqwest::header::{HeaderMap, HeaderValue};
/// use tokenkeeper::{GraphClassifier, HttpReply, InvalidationReason, ProviderErrorKind};
///
/// let classifier = GraphClassifier::new();
/// let body = r#"{"error":{"message":"Error validating access token: The session has been invalidated because the user changed their password.","type":"OAuthException","code":190,"error_subcode":460,"fbtrace_id":"A1b2"}}"#;
/// let err = HttpReply::new(400, HeaderMap::new(), body)
///     .interpret(&classifier, SystemTime::now())
///     .unwrap_err();
/// assert_eq!(err.kind(), &ProviderErrorKind::Reauthorize(InvalidationReason::PasswordChanged));
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-business-use-case-usage", HeaderValue::from_static(
///     r#"{"1234":[{"type":"pages","call_count":100,"total_cputime":20,"total_time":30,"estimated_time_to_regain_access":12}]}"#));
/// let body = r#"{"error":{"message":"User request limit reached","type":"OAuthException","code":80001}}"#;
/// let err = HttpReply::new(400, headers, body)
///     .interpret(&classifier, SystemTime::now())
///     .unwrap_err();
/// assert_eq!(err.kind(), &ProviderErrorKind::RateLimited {
///     retry_after: Some(Duration::from_secs(12 * 60)),
/// });
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GraphClassifier {
    fallback: Duration,
}

impl GraphClassifier {
    /// The classifier with a 5-minute fallback wait.
    pub fn new() -> Self {
        Self {
            fallback: Duration::from_secs(5 * 60),
        }
    }

    /// The wait reported for a rate limit whose headers give no estimate (default 5 minutes;
    /// capped at 24 hours).
    pub fn fallback_retry_after(mut self, wait: Duration) -> Self {
        self.fallback = wait.min(MAX_ESTIMATE);
        self
    }

    /// The wait before a rate-limited app may call again, estimated from `reply`'s headers
    /// (see [the rules](GraphClassifier#rate-limit-estimate)).
    pub fn estimate_retry_after(&self, reply: &HttpReply, now: SystemTime) -> Duration {
        if let Some(wait) = reply.retry_after(now) {
            return wait.min(MAX_ESTIMATE);
        }
        let usage = Usage::read(reply.headers());
        if let Some(minutes) = usage.regain_minutes.filter(|m| *m > 0.0) {
            return minutes_to_duration(minutes);
        }
        if usage.max_percent >= 100.0 {
            let share = 1.0 - 100.0 / usage.max_percent;
            let estimate = whole_seconds(USAGE_WINDOW.as_secs_f64() * share);
            return estimate.max(self.fallback);
        }
        self.fallback
    }
}

impl Default for GraphClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Classifier for GraphClassifier {
    fn classify(&self, reply: &HttpReply, now: SystemTime) -> Option<ProviderError> {
        let error = GraphError::read(reply)?;
        let reauthorize = |reason| Some(ProviderError::reauthorize(reason));
        match (error.code, error.subcode) {
            (190, Some(458)) => reauthorize(InvalidationReason::Revoked),
            (190, Some(459)) => reauthorize(InvalidationReason::SecurityCheckpoint),
            (190, Some(460)) => reauthorize(InvalidationReason::PasswordChanged),
            (190, Some(463)) => reauthorize(InvalidationReason::AccessTokenExpired),
            (190, Some(467)) => reauthorize(InvalidationReason::InvalidGrant),
            (190, Some(sub)) => reauthorize(InvalidationReason::Provider {
                code: format!("190/{sub}"),
            }),
            (190, None) | (102, _) => reauthorize(InvalidationReason::Provider {
                code: error.code.to_string(),
            }),
            (4 | 17 | 32 | 613 | 80000..=80014, _) => Some(ProviderError::rate_limited(Some(
                self.estimate_retry_after(reply, now),
            ))),
            (2, _) => Some(ProviderError::new(
                crate::error::ProviderErrorKind::Unavailable {
                    cause: UnavailableCause::ServerError,
                    retry_after: reply.retry_after(now),
                },
            )),
            (101, _) => Some(ProviderError::misconfigured(ConfigProblem::InvalidClient)),
            _ => None,
        }
    }
}

/// The `error` object of a Graph reply: code and subcode (the message is never kept: it may
/// quote a token).
struct GraphError {
    code: i64,
    subcode: Option<i64>,
}

impl GraphError {
    fn read(reply: &HttpReply) -> Option<Self> {
        let json = reply.json()?;
        let error = json.get("error")?.as_object()?;
        let code = integer(error.get("code")?)?;
        let subcode = error.get("error_subcode").and_then(integer);
        Some(Self { code, subcode })
    }
}

/// An integer sent as a JSON number or a string.
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-negative, finite number sent as a JSON number or a string.
fn number(v: &Value) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then_some(n)
}

fn minutes_to_duration(minutes: f64) -> Duration {
    whole_seconds(minutes * 60.0)
}

/// `secs` rounded to whole seconds, within 0 and [`MAX_ESTIMATE`].
fn whole_seconds(secs: f64) -> Duration {
    let cap = MAX_ESTIMATE.as_secs_f64();
    Duration::from_secs_f64(secs.clamp(0.0, cap).round())
}

/// What the usage headers say.
#[derive(Debug, Default)]
struct Usage {
    /// The largest `estimated_time_to_regain_access`, in minutes.
    regain_minutes: Option<f64>,
    /// The largest usage percentage seen.
    max_percent: f64,
}

impl Usage {
    fn read(headers: &HeaderMap) -> Self {
        let mut usage = Usage::default();
        let json = |name: &str| {
            headers
                .get(name)
                .and_then(|v| serde_json::from_slice::<Value>(v.as_bytes()).ok())
        };
        for name in ["x-app-usage", "x-page-usage"] {
            if let Some(Value::Object(entry)) = json(name) {
                usage.percentages(&entry);
            }
        }
        if let Some(Value::Object(objects)) = json("x-business-use-case-usage") {
            for entries in objects.values() {
                for entry in entries.as_array().into_iter().flatten() {
                    let Some(entry) = entry.as_object() else {
                        continue;
                    };
                    usage.percentages(entry);
                    if let Some(m) = entry
                        .get("estimated_time_to_regain_access")
                        .and_then(number)
                    {
                        usage.regain_minutes = Some(usage.regain_minutes.map_or(m, |r| r.max(m)));
                    }
                }
            }
        }
        usage
    }

    fn percentages(&mut self, entry: &serde_json::Map<String, Value>) {
        for field in ["call_count", "total_time", "total_cputime"] {
            if let Some(p) = entry.get(field).and_then(number) {
                self.max_percent = self.max_percent.max(p);
            }
        }
    }
}

/// X (Twitter)-style refresh errors: a spent or unknown single-use refresh token gets `400`
/// `{"error":"invalid_request","error_description":"Value passed for the token was invalid."}`
/// — `invalid_request`, not `invalid_grant`.
///
/// | reply | outcome |
/// |---|---|
/// | `invalid_request` whose description says "Value passed for the token was invalid" | `Reauthorize(InvalidGrant)` |
/// | anything else | the RFC 6749 rules of [`StandardClassifier`](crate::StandardClassifier) (another `invalid_request` stays `Misconfigured`) |
///
/// Use it only for X-style providers: elsewhere `invalid_request` is a client bug, and
/// treating it as a dead grant would send users to re-authorize for a developer's mistake.
///
/// ```
/// use std::time::SystemTime;
/// use reqwest::header::HeaderMap;
/// use tokenkeeper::{HttpReply, InvalidationReason, ProviderErrorKind, XClassifier};
///
/// let body = r#"{"error":"invalid_request","error_description":"Value passed for the token was invalid."}"#;
/// let err = HttpReply::new(400, HeaderMap::new(), body)
///     .interpret(&XClassifier, SystemTime::now())
///     .unwrap_err();
/// assert_eq!(err.kind(), &ProviderErrorKind::Reauthorize(InvalidationReason::InvalidGrant));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct XClassifier;

impl Classifier for XClassifier {
    fn classify(&self, reply: &HttpReply, _now: SystemTime) -> Option<ProviderError> {
        if (200..300).contains(&reply.status()) {
            return None;
        }
        let json = reply.json()?;
        let spent = json.get("error").and_then(Value::as_str) == Some("invalid_request")
            && json
                .get("error_description")
                .and_then(Value::as_str)
                .is_some_and(|d| d.contains("Value passed for the token was invalid"));
        spent.then(|| ProviderError::reauthorize(InvalidationReason::InvalidGrant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProviderErrorKind;
    use crate::provider::StandardClassifier;
    use reqwest::header::HeaderValue;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    fn graph_body(code: i64, subcode: Option<i64>) -> String {
        let sub = subcode.map_or(String::new(), |s| format!(r#","error_subcode":{s}"#));
        format!(
            r#"{{"error":{{"message":"m","type":"OAuthException","code":{code}{sub},"fbtrace_id":"AbC"}}}}"#
        )
    }

    fn kind_of(
        classifier: &dyn Classifier,
        status: u16,
        headers: &[(&'static str, &str)],
        body: &str,
    ) -> ProviderErrorKind {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        HttpReply::new(status, map, body.as_bytes().to_vec())
            .interpret(classifier, now())
            .expect_err("a failure")
            .kind()
            .clone()
    }

    fn limited(secs: u64) -> ProviderErrorKind {
        ProviderErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(secs)),
        }
    }

    #[test]
    fn every_code_190_subcode() {
        let c = GraphClassifier::new();
        let dead = |r| ProviderErrorKind::Reauthorize(r);
        let cases = [
            (Some(458), dead(InvalidationReason::Revoked)),
            (Some(459), dead(InvalidationReason::SecurityCheckpoint)),
            (Some(460), dead(InvalidationReason::PasswordChanged)),
            (Some(463), dead(InvalidationReason::AccessTokenExpired)),
            (Some(467), dead(InvalidationReason::InvalidGrant)),
            (
                Some(464),
                dead(InvalidationReason::Provider {
                    code: "190/464".into(),
                }),
            ),
            (
                None,
                dead(InvalidationReason::Provider { code: "190".into() }),
            ),
        ];
        for (subcode, want) in cases {
            for status in [400, 401, 403] {
                assert_eq!(
                    kind_of(&c, status, &[], &graph_body(190, subcode)),
                    want,
                    "{subcode:?} {status}"
                );
            }
        }
        // Codes and subcodes sent as strings.
        let body = r#"{"error":{"type":"OAuthException","code":"190","error_subcode":"460"}}"#;
        assert_eq!(
            kind_of(&c, 400, &[], body),
            dead(InvalidationReason::PasswordChanged)
        );
        for subcode in [None, Some(1)] {
            assert_eq!(
                kind_of(&c, 400, &[], &graph_body(102, subcode)),
                dead(InvalidationReason::Provider { code: "102".into() })
            );
        }
    }

    #[test]
    fn other_codes() {
        let c = GraphClassifier::new();
        assert_eq!(
            kind_of(&c, 500, &[], &graph_body(2, None)),
            ProviderErrorKind::Unavailable {
                cause: UnavailableCause::ServerError,
                retry_after: None
            }
        );
        assert_eq!(
            kind_of(&c, 400, &[], &graph_body(101, None)),
            ProviderErrorKind::Misconfigured(ConfigProblem::InvalidClient)
        );
        // Unknown codes fall through to the standard rules: not a dead grant.
        assert_eq!(
            kind_of(&c, 400, &[], &graph_body(100, Some(33))),
            ProviderErrorKind::Unavailable {
                cause: UnavailableCause::UnexpectedStatus,
                retry_after: None
            }
        );
        // RFC 6749 bodies still work behind the Graph classifier.
        assert_eq!(
            kind_of(&c, 401, &[], r#"{"error":"invalid_client"}"#),
            ProviderErrorKind::Misconfigured(ConfigProblem::InvalidClient)
        );
        // A success passes through.
        assert!(HttpReply::new(
            200,
            HeaderMap::new(),
            br#"{"access_token":"a","token_type":"bearer","expires_in":5183944}"#.to_vec()
        )
        .interpret(&c, now())
        .is_ok());
    }

    #[test]
    fn every_rate_limit_code_uses_the_fallback_without_headers() {
        let c = GraphClassifier::new();
        let mut codes = vec![4, 17, 32, 613];
        codes.extend(80000..=80014);
        for code in codes {
            for status in [400, 403, 429] {
                assert_eq!(
                    kind_of(&c, status, &[], &graph_body(code, None)),
                    limited(300),
                    "{code} {status}"
                );
            }
        }
        assert_eq!(
            kind_of(
                &c.fallback_retry_after(Duration::from_secs(42)),
                400,
                &[],
                &graph_body(4, None)
            ),
            limited(42)
        );
        // 80015 is not a rate-limit code.
        assert!(!matches!(
            kind_of(&c, 400, &[], &graph_body(80015, None)),
            ProviderErrorKind::RateLimited { .. }
        ));
    }

    #[test]
    fn estimate_from_each_header() {
        let c = GraphClassifier::new();
        let body = graph_body(4, None);
        // Retry-After wins.
        assert_eq!(
            kind_of(&c, 429, &[("retry-after", "90")], &body),
            limited(90)
        );
        // Business use case: the largest estimate, in minutes.
        let buc = r#"{"111":[{"type":"pages","call_count":100,"total_cputime":10,"total_time":10,"estimated_time_to_regain_access":7}],"222":[{"type":"instagram","call_count":50,"total_cputime":5,"total_time":5,"estimated_time_to_regain_access":"15"}]}"#;
        assert_eq!(
            kind_of(&c, 400, &[("x-business-use-case-usage", buc)], &body),
            limited(15 * 60)
        );
        // App usage at 200 %: back to 100 % after half the hour.
        let app = r#"{"call_count":200,"total_time":20,"total_cputime":10}"#;
        assert_eq!(
            kind_of(&c, 400, &[("x-app-usage", app)], &body),
            limited(30 * 60)
        );
        // Page usage at 400 % of CPU time: 45 minutes.
        let page = r#"{"call_count":10,"total_time":20,"total_cputime":400}"#;
        assert_eq!(
            kind_of(&c, 400, &[("x-page-usage", page)], &body),
            limited(45 * 60)
        );
        // At 100 % the estimate is zero: the fallback is the floor.
        let full = r#"{"call_count":100,"total_time":1,"total_cputime":1}"#;
        assert_eq!(
            kind_of(&c, 400, &[("x-app-usage", full)], &body),
            limited(300)
        );
        // A business use case entry at 0 minutes but over 100 %: the percentage decides.
        let buc = r#"{"1":[{"type":"pages","call_count":150,"total_cputime":1,"total_time":1,"estimated_time_to_regain_access":0}]}"#;
        assert_eq!(
            kind_of(&c, 400, &[("x-business-use-case-usage", buc)], &body),
            limited(20 * 60)
        );
        // A huge estimate is capped at a day.
        let huge = r#"{"1":[{"estimated_time_to_regain_access":1e300}]}"#;
        assert_eq!(
            kind_of(&c, 400, &[("x-business-use-case-usage", huge)], &body),
            limited(24 * 3600)
        );
    }

    #[test]
    fn malformed_usage_headers_fall_back() {
        let c = GraphClassifier::new();
        let body = graph_body(80004, None);
        for (name, value) in [
            ("x-app-usage", "not json"),
            ("x-app-usage", "[1,2,3]"),
            ("x-app-usage", r#"{"call_count":"lots"}"#),
            ("x-app-usage", r#"{"call_count":-500}"#),
            ("x-app-usage", r#"{"call_count":null}"#),
            ("x-page-usage", "{"),
            ("x-business-use-case-usage", r#"{"1":"x"}"#),
            ("x-business-use-case-usage", r#"{"1":[1,"a",null]}"#),
            (
                "x-business-use-case-usage",
                r#"{"1":[{"estimated_time_to_regain_access":"soon"}]}"#,
            ),
            (
                "x-business-use-case-usage",
                r#"{"1":[{"estimated_time_to_regain_access":-3}]}"#,
            ),
            ("x-business-use-case-usage", "[]"),
            ("retry-after", "later"),
        ] {
            assert_eq!(
                kind_of(&c, 400, &[(name, value)], &body),
                limited(300),
                "{name}: {value}"
            );
        }
        // A header that is not valid UTF-8.
        let mut map = HeaderMap::new();
        map.insert(
            "x-app-usage",
            HeaderValue::from_bytes(b"{\"call_count\":\xff}").unwrap(),
        );
        let err = HttpReply::new(400, map, body.into_bytes())
            .interpret(&c, now())
            .unwrap_err();
        assert_eq!(err.kind(), &limited(300));
    }

    #[test]
    fn malformed_graph_bodies_are_not_dead_grants() {
        let c = GraphClassifier::new();
        for body in [
            r#"{"error":{"code":"x190"}}"#,
            r#"{"error":{"message":"no code"}}"#,
            r#"{"error":190}"#,
            r#"{"error":{"code":1.5e400}}"#,
            "<html>bad gateway</html>",
            "",
        ] {
            assert!(
                !matches!(
                    kind_of(&c, 400, &[], body),
                    ProviderErrorKind::Reauthorize(_)
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn x_style_invalid_request_is_dead_only_with_the_x_classifier() {
        let spent = r#"{"error":"invalid_request","error_description":"Value passed for the token was invalid."}"#;
        assert_eq!(
            kind_of(&XClassifier, 400, &[], spent),
            ProviderErrorKind::Reauthorize(InvalidationReason::InvalidGrant)
        );
        for other in [
            &StandardClassifier as &dyn Classifier,
            &GraphClassifier::new(),
        ] {
            assert_eq!(
                kind_of(other, 400, &[], spent),
                ProviderErrorKind::Misconfigured(ConfigProblem::InvalidRequest)
            );
        }
        // Another invalid_request is still a client bug with the X classifier.
        let other = r#"{"error":"invalid_request","error_description":"Missing required parameter [grant_type]."}"#;
        assert_eq!(
            kind_of(&XClassifier, 400, &[], other),
            ProviderErrorKind::Misconfigured(ConfigProblem::InvalidRequest)
        );
        assert_eq!(
            kind_of(&XClassifier, 400, &[], r#"{"error":"invalid_grant"}"#),
            ProviderErrorKind::Reauthorize(InvalidationReason::InvalidGrant)
        );
    }
}
