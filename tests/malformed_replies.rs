//! Malformed, empty, huge and non-JSON token endpoint replies become typed errors (or a
//! correct lenient parse), never a panic, and never cost the grant its refresh token: a
//! malformed optional field beside a rotated refresh token is dropped and reported, and a
//! rotated refresh token beside an unusable access token travels in the error.

mod support;

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::harness::{json_reply, reply, token_endpoint, Harness};
use tokenkeeper::{
    ClientSecret, Clock, ConfigProblem, Error, OAuth2Provider, ParseError, ProviderErrorKind,
    RefreshToken, TokenSet, TokenStore, UnavailableCause, DEFAULT_BODY_LIMIT,
};
use wiremock::{MockServer, ResponseTemplate};

const OLD_RT: &str = "rt-old-0001";

/// A server answering POST /token with each of `replies` in turn (the last one forever), and
/// a harness whose standard provider points at it. Keep the server for the harness's life.
async fn harness(replies: Vec<ResponseTemplate>) -> (MockServer, Harness) {
    let server = token_endpoint(replies).await;
    let provider = OAuth2Provider::builder("client", format!("{}/token", server.uri()))
        .client_secret(ClientSecret::new("client-secret"))
        .build()
        .expect("provider");
    let harness = Harness::new(provider, OLD_RT).await;
    (server, harness)
}

/// What the reply must become.
enum Want {
    /// `Unavailable(InvalidResponse)` caused by this parse error.
    Invalid(ParseError),
    /// Another transient failure.
    Unavailable(UnavailableCause),
    /// A configuration fault.
    Misconfigured(ConfigProblem),
}

/// Sends `template` once through the manager and checks the typed failure and the grant.
async fn check_failure(case: &str, status: u16, template: ResponseTemplate, want: Want) {
    let (_server, h) = harness(vec![template]).await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    let failure = h.provider_failure();
    assert_eq!(failure.status(), Some(status), "{case}");
    match want {
        Want::Invalid(parse) => {
            assert!(
                matches!(
                    &err,
                    Error::Unavailable {
                        cause: UnavailableCause::InvalidResponse,
                        status: Some(s),
                        ..
                    } if *s == status
                ),
                "{case}: {err:?}"
            );
            assert_eq!(
                failure.kind(),
                &ProviderErrorKind::Unavailable {
                    cause: UnavailableCause::InvalidResponse,
                    retry_after: None
                },
                "{case}"
            );
            let source = failure
                .source()
                .and_then(|s| s.downcast_ref::<ParseError>())
                .unwrap_or_else(|| panic!("{case}: the parse error is kept as the source"));
            assert_eq!(source, &parse, "{case}");
            assert!(err.is_retryable(), "{case}");
        }
        Want::Unavailable(cause) => {
            assert!(
                matches!(
                    &err,
                    Error::Unavailable { cause: c, status: Some(s), .. } if *c == cause && *s == status
                ),
                "{case}: {err:?}"
            );
            assert!(err.is_retryable(), "{case}");
        }
        Want::Misconfigured(problem) => {
            assert!(
                matches!(
                    &err,
                    Error::Misconfigured { problem: p, status: Some(s), .. } if *p == problem && *s == status
                ),
                "{case}: {err:?}"
            );
            assert!(!err.is_retryable(), "{case}");
        }
    }
    assert!(!err.is_reauth_required(), "{case}");
    // No token, no body in the error text.
    assert!(!err.to_string().contains("at-new"), "{case}: {err}");
    h.assert_intact(case).await;
}

/// Sends `template` through the manager and returns the refreshed token set.
async fn check_success(case: &str, template: ResponseTemplate) -> (Arc<TokenSet>, SystemTime) {
    let (_server, h) = harness(vec![template]).await;
    let now = h.clock.now();
    let token = h
        .manager
        .access_token(&h.key)
        .await
        .unwrap_or_else(|e| panic!("{case}: {e:?}"));
    assert_eq!(token.secret(), "at-new", "{case}");
    let set = h.manager.token(&h.key).await.expect("token set");
    (set, now)
}

#[tokio::test]
async fn malformed_200_replies_are_invalid_responses() {
    let cases: Vec<(&str, ResponseTemplate, ParseError)> = vec![
        ("empty body", ResponseTemplate::new(200), ParseError::NotJson),
        (
            "empty body labelled json",
            json_reply(200, ""),
            ParseError::NotJson,
        ),
        (
            "plain text",
            reply(200, b"OK, token refreshed".to_vec(), "text/plain"),
            ParseError::NotJson,
        ),
        (
            "html error page",
            reply(
                200,
                b"<!DOCTYPE html><html><head><title>Error</title></head><body><h1>Something went wrong</h1></body></html>".to_vec(),
                "text/html; charset=utf-8",
            ),
            ParseError::NotJson,
        ),
        (
            "json array",
            json_reply(200, r#"[{"access_token":"at-new"}]"#),
            ParseError::NotAnObject,
        ),
        ("json null", json_reply(200, "null"), ParseError::NotAnObject),
        ("json string", json_reply(200, r#""at-new""#), ParseError::NotAnObject),
        ("empty object", json_reply(200, "{}"), ParseError::MissingAccessToken),
        (
            "no access_token",
            // (With a refresh token beside it, the rotation is kept: see
            // `hardening::a_garbled_reply_that_carries_a_rotated_refresh_token_keeps_it`.)
            json_reply(200, r#"{"token_type":"Bearer","expires_in":3600}"#),
            ParseError::MissingAccessToken,
        ),
        (
            "access_token as a number",
            json_reply(200, r#"{"access_token":12345,"expires_in":3600}"#),
            ParseError::InvalidField("access_token"),
        ),
        (
            "access_token empty",
            json_reply(200, r#"{"access_token":"","expires_in":3600}"#),
            ParseError::InvalidField("access_token"),
        ),
        (
            "access_token null",
            json_reply(200, r#"{"access_token":null}"#),
            ParseError::InvalidField("access_token"),
        ),
        // A malformed optional field (`expires_in`, `scope`, …) is not a failure: see
        // `a_broken_optional_field_beside_a_rotated_refresh_token_keeps_the_rotation`.
        (
            "refresh_token as a number",
            json_reply(200, r#"{"access_token":"at-new","refresh_token":42}"#),
            ParseError::InvalidField("refresh_token"),
        ),
        (
            "truncated json",
            json_reply(200, r#"{"access_token":"at-new","token_type":"Bearer","expires_in":36"#),
            ParseError::NotJson,
        ),
        (
            "invalid utf-8",
            reply(200, vec![b'{', 0xff, 0xfe, b'}'], "application/json"),
            ParseError::NotJson,
        ),
    ];
    assert!(cases.len() >= 10);
    for (case, template, parse) in cases {
        check_failure(case, 200, template, Want::Invalid(parse)).await;
    }
}

#[tokio::test]
async fn malformed_error_replies_are_typed() {
    let html = b"<html><body><h1>Bad Request</h1></body></html>".to_vec();
    let unexpected = || Want::Unavailable(UnavailableCause::UnexpectedStatus);
    let cases: Vec<(&str, u16, ResponseTemplate, Want)> = vec![
        (
            "400 html",
            400,
            reply(400, html.clone(), "text/html"),
            unexpected(),
        ),
        ("403 empty", 403, ResponseTemplate::new(403), unexpected()),
        (
            "400 error code not a string",
            400,
            json_reply(400, r#"{"error":{"code":190}}"#),
            unexpected(),
        ),
        (
            "400 truncated json",
            400,
            json_reply(400, r#"{"error":"invalid_gr"#),
            unexpected(),
        ),
        (
            "401 html",
            401,
            reply(401, html.clone(), "text/html"),
            Want::Misconfigured(ConfigProblem::InvalidClient),
        ),
        (
            "404 html",
            404,
            reply(404, html.clone(), "text/html"),
            Want::Misconfigured(ConfigProblem::Endpoint),
        ),
        (
            "502 html",
            502,
            reply(502, html, "text/html"),
            Want::Unavailable(UnavailableCause::ServerError),
        ),
    ];
    for (case, status, template, want) in cases {
        check_failure(case, status, template, want).await;
    }
}

#[tokio::test]
async fn huge_body_is_an_invalid_response_and_the_grant_survives() {
    let huge = {
        // A syntactically valid token response padded to 5 MB.
        let mut body = br#"{"access_token":"at-new","padding":""#.to_vec();
        body.resize(5 * 1024 * 1024, b'x');
        body.extend_from_slice(br#""}"#);
        body
    };
    let (_server, h) = harness(vec![
        reply(200, huge, "application/json"),
        json_reply(200, r#"{"access_token":"at-new","expires_in":3600}"#),
    ])
    .await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unavailable {
                cause: UnavailableCause::InvalidResponse,
                status: Some(200),
                ..
            }
        ),
        "{err:?}"
    );
    let failure = h.provider_failure();
    assert_eq!(
        failure.kind(),
        &ProviderErrorKind::Unavailable {
            cause: UnavailableCause::InvalidResponse,
            retry_after: None
        }
    );
    assert_eq!(
        failure
            .source()
            .and_then(|s| s.downcast_ref::<ParseError>()),
        Some(&ParseError::TooLarge {
            limit: DEFAULT_BODY_LIMIT
        })
    );
    h.assert_intact("5 MB").await;

    // Alive: once the backoff is over, the next reply is used.
    h.clock.advance(Duration::from_secs(3600));
    let token = h.manager.access_token(&h.key).await.expect("recovered");
    assert_eq!(token.secret(), "at-new");
    let record = h.store.load(&h.key).await.unwrap().unwrap().value;
    assert_eq!(
        record.tokens().refresh_token().map(RefreshToken::secret),
        Some(OLD_RT)
    );
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn lenient_parses_of_real_world_deviations() {
    let epoch = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);

    let (set, now) = check_success(
        "expires_in as a numeric string",
        json_reply(200, r#"{"access_token":"at-new","expires_in":"3600"}"#),
    )
    .await;
    assert_eq!(set.expires_at(), Some(now + Duration::from_secs(3600)));
    assert_eq!(set.refresh_token().map(RefreshToken::secret), Some(OLD_RT));

    let (set, _) = check_success(
        "epoch-ms expiry as a string",
        json_reply(
            200,
            r#"{"access_token":"at-new","access_token_expiry":"1768521600000"}"#,
        ),
    )
    .await;
    assert_eq!(set.expires_at(), Some(epoch(1_768_521_600)));

    let (set, _) = check_success(
        "epoch-ms expiry as a number",
        json_reply(
            200,
            r#"{"access_token":"at-new","access_token_expiry":1768521600000}"#,
        ),
    )
    .await;
    assert_eq!(set.expires_at(), Some(epoch(1_768_521_600)));

    let (set, _) = check_success(
        "epoch-seconds expires_at",
        json_reply(200, r#"{"access_token":"at-new","expires_at":1768521600}"#),
    )
    .await;
    assert_eq!(set.expires_at(), Some(epoch(1_768_521_600)));

    let (set, now) = check_success(
        "valid json labelled text/plain",
        reply(
            200,
            br#"{"access_token":"at-new","expires_in":86400,"refresh_token":"rt-new"}"#.to_vec(),
            "text/plain",
        ),
    )
    .await;
    assert_eq!(set.expires_at(), Some(now + Duration::from_secs(86400)));
    assert_eq!(
        set.refresh_token().map(RefreshToken::secret),
        Some("rt-new")
    );

    let (set, now) = check_success(
        "valid json labelled text/html",
        reply(
            200,
            br#"{"access_token":"at-new","expires_in":3600.5}"#.to_vec(),
            "text/html",
        ),
    )
    .await;
    assert_eq!(
        set.expires_at(),
        Some(now + Duration::from_millis(3_600_500))
    );

    let (set, _) = check_success(
        "null and empty refresh_token keep the old one",
        json_reply(
            200,
            r#"{"access_token":"at-new","refresh_token":null,"expires_in":3600}"#,
        ),
    )
    .await;
    assert_eq!(set.refresh_token().map(RefreshToken::secret), Some(OLD_RT));
    let (set, _) = check_success(
        "empty refresh_token",
        json_reply(200, r#"{"access_token":"at-new","refresh_token":""}"#),
    )
    .await;
    assert_eq!(set.refresh_token().map(RefreshToken::secret), Some(OLD_RT));
    assert_eq!(set.expires_at(), None);

    let (set, _) = check_success(
        "scope as an array and unknown fields",
        json_reply(
            200,
            r#"{"access_token":"at-new","scope":["a","b"],"id_token":"x.y.z","expires_in":3600}"#,
        ),
    )
    .await;
    assert_eq!(set.scopes(), Some(&["a".to_owned(), "b".to_owned()][..]));
    assert!(set.extra().contains_key("id_token"));
}

#[tokio::test]
async fn absurd_retry_after_is_not_a_panic() {
    for (status, body) in [
        (429, r#"{"error":"slow_down"}"#),
        (503, r#"{"error":"temporarily_unavailable"}"#),
    ] {
        let (_server, h) = harness(vec![
            json_reply(status, body).insert_header("retry-after", "18446744073709551615")
        ])
        .await;
        let err = h.manager.access_token(&h.key).await.unwrap_err();
        let case = format!("{status} with Retry-After: u64::MAX");
        assert!(
            matches!(
                (&err, status),
                (
                    Error::RateLimited {
                        retry_after: Some(_),
                        ..
                    },
                    429
                ) | (
                    Error::Unavailable {
                        cause: UnavailableCause::ServerError,
                        retry_after: Some(_),
                        ..
                    },
                    503
                )
            ),
            "{case}: {err:?}"
        );
        h.assert_intact(&case).await;
        // The hold is persisted: no second request is sent.
        let again = h.manager.access_token(&h.key).await.unwrap_err();
        assert!(again.is_retryable(), "{case}: {again:?}");
        assert_eq!(h.calls(), 1, "{case}");
    }
}

/// Every optional field, broken in every way, beside a rotated refresh token.
const BROKEN_OPTIONAL_FIELDS: &[(&str, &str)] = &[
    ("expires_in", "null"),
    ("expires_in", "-3600"),
    ("expires_in", r#""one day""#),
    ("expires_in", "1e300"),
    ("expires_in", "99999999999999999999"),
    ("expires_in", "true"),
    ("expires_at", "-1"),
    ("expires_at", r#""tomorrow""#),
    ("expires_at", "1e300"),
    ("access_token_expiry", "null"),
    ("access_token_expiry", "[1768521600000]"),
    ("refresh_token_expires_in", "null"),
    ("refresh_token_expires_in", "-1"),
    ("refresh_token_expires_in", r#""a while""#),
    ("refresh_token_expires_in", "1e300"),
    ("refresh_token_expiry", r#"{"ms":1}"#),
    ("refresh_token_expires_at", "-7"),
    ("scope", "null"),
    ("scope", "42"),
    ("scope", r#"["a",{"b":1}]"#),
    ("token_type", "null"),
    ("token_type", "false"),
];

#[tokio::test]
async fn a_broken_optional_field_beside_a_rotated_refresh_token_keeps_the_rotation() {
    for (field, value) in BROKEN_OPTIONAL_FIELDS {
        let case = format!("{field}: {value}");
        let body =
            format!(r#"{{"access_token":"at-new","refresh_token":"rt-new","{field}":{value}}}"#);
        let (set, _) = check_success(&case, json_reply(200, &body)).await;
        assert_eq!(
            set.refresh_token().map(RefreshToken::secret),
            Some("rt-new"),
            "{case}"
        );
        assert_eq!(set.token_type(), "Bearer", "{case}");
        if field.starts_with("refresh") {
            assert_eq!(set.refresh_expires_at(), None, "{case}");
        } else if field.starts_with("expires") || field.starts_with("access") {
            // An expiry stated unreadably gets the manager's fallback lifetime (1 h).
            assert_eq!(
                set.expires_at(),
                set.issued_at().map(|t| t + Duration::from_secs(3600)),
                "{case}"
            );
        }
        assert!(!set.extra().contains_key(*field), "{case}");
    }
}

#[test]
fn malformed_optional_fields_are_reported_by_name_only() {
    use tokenkeeper::{HttpReply, StandardClassifier};
    let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    for (field, value) in BROKEN_OPTIONAL_FIELDS {
        let body =
            format!(r#"{{"access_token":"at-new","refresh_token":"rt-new","{field}":{value}}}"#);
        let reply = HttpReply::new(200, Default::default(), body.clone());
        let response = reply
            .interpret(&StandardClassifier, now)
            .unwrap_or_else(|e| panic!("{body}: {e:?}"));
        assert_eq!(
            response.refresh_token().map(RefreshToken::secret),
            Some("rt-new"),
            "{body}"
        );
        // A `null` scope or token type is absent; a `null` expiry is stated but unusable.
        let null_is_absent = *value == "null" && (*field == "scope" || *field == "token_type");
        let want: &[&str] = if null_is_absent { &[] } else { &[field] };
        assert_eq!(response.malformed_fields(), want, "{body}");
    }
}

#[tokio::test]
async fn a_rotated_refresh_token_beside_an_unusable_access_token_is_kept_in_the_error() {
    for body in [
        r#"{"token_type":"Bearer","expires_in":3600,"refresh_token":"rt-new"}"#,
        r#"{"access_token":"","refresh_token":"rt-new"}"#,
        r#"{"access_token":null,"refresh_token":"rt-new"}"#,
        r#"{"access_token":12345,"refresh_token":"rt-new","expires_in":"soon"}"#,
    ] {
        let (_server, h) = harness(vec![json_reply(200, body)]).await;
        let err = h.manager.access_token(&h.key).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Unavailable {
                    cause: UnavailableCause::InvalidResponse,
                    ..
                }
            ),
            "{body}: {err:?}"
        );
        let failure = h.provider_failure();
        assert_eq!(
            failure.rotated_refresh_token().map(RefreshToken::secret),
            Some("rt-new"),
            "{body}"
        );
        assert!(
            failure
                .source()
                .and_then(|s| s.downcast_ref::<ParseError>())
                .is_some(),
            "{body}"
        );
        let shown = format!("{failure} {failure:?} {err} {err:?}");
        assert!(!shown.contains("rt-new"), "{body}: {shown}");
    }
    // A refresh token of the wrong type is not a token: nothing to keep.
    let (_server, h) = harness(vec![json_reply(
        200,
        r#"{"access_token":"at-new","refresh_token":{"value":"rt-new"}}"#,
    )])
    .await;
    h.manager.access_token(&h.key).await.unwrap_err();
    assert!(h.provider_failure().rotated_refresh_token().is_none());
}
