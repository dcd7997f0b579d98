//! The presets' wire formats: reading refresh requests and writing replies.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use wiremock::{Request, ResponseTemplate};

use super::{Preset, RetryAfter, RevocationReason};

/// A refresh request, decoded but not yet checked.
#[derive(Debug, Default)]
pub(super) struct RefreshRequest {
    pub(super) grant_type: Option<String>,
    pub(super) refresh_token: Option<String>,
    pub(super) client: ClientAuth,
}

/// The client credentials a request carried.
#[derive(Debug, Default)]
pub(super) enum ClientAuth {
    /// None at all.
    #[default]
    Missing,
    /// An `Authorization: Basic` header, decoded.
    Basic { id: String, secret: String },
    /// An `Authorization` header that is not a well-formed Basic one.
    BadHeader,
    /// Parameters in the request body (or query string).
    Params { id: String, secret: Option<String> },
}

impl ClientAuth {
    pub(super) fn used_basic(&self) -> bool {
        matches!(self, ClientAuth::Basic { .. } | ClientAuth::BadHeader)
    }
}

/// Decodes a refresh request in `preset`'s format; `Err` carries an `error_description`.
pub(super) fn parse(preset: Preset, request: &Request) -> Result<RefreshRequest, &'static str> {
    match preset {
        Preset::Standard | Preset::ConstantContact => parse_form_request(preset, request),
        Preset::Xoxoday => parse_json_request(request),
    }
}

fn parse_form_request(preset: Preset, request: &Request) -> Result<RefreshRequest, &'static str> {
    let (mut params, client) = form_params(preset, request)?;
    Ok(RefreshRequest {
        grant_type: params.remove("grant_type"),
        refresh_token: params.remove("refresh_token"),
        client,
    })
}

/// Decodes an RFC 7009 revocation request: the `token` and the client's credentials.
pub(super) fn parse_revocation(
    request: &Request,
) -> Result<(Option<String>, ClientAuth), &'static str> {
    let (mut params, client) = form_params(Preset::Standard, request)?;
    Ok((params.remove("token"), client))
}

/// The form parameters (body, or for Constant Contact a body-less query) and client credentials.
pub(super) fn form_params(
    preset: Preset,
    request: &Request,
) -> Result<(HashMap<String, String>, ClientAuth), &'static str> {
    let mut params = if !request.body.is_empty() {
        if !content_type_is(request, "application/x-www-form-urlencoded") {
            return Err("The request body must be application/x-www-form-urlencoded.");
        }
        parse_form(&request.body)?
    } else if preset == Preset::ConstantContact {
        parse_form(request.url.query().unwrap_or("").as_bytes())?
    } else {
        HashMap::new()
    };
    let client = match request.headers.get("authorization") {
        Some(value) => value.to_str().ok().and_then(decode_basic).map_or(
            ClientAuth::BadHeader,
            |(id, secret)| ClientAuth::Basic { id, secret },
        ),
        None => match params.remove("client_id") {
            Some(id) => ClientAuth::Params {
                id,
                secret: params.remove("client_secret"),
            },
            None => ClientAuth::Missing,
        },
    };
    Ok((params, client))
}

fn parse_json_request(request: &Request) -> Result<RefreshRequest, &'static str> {
    if !content_type_is(request, "application/json") {
        return Err("The request body must be application/json.");
    }
    let serde_json::Value::Object(mut fields) =
        serde_json::from_slice(&request.body).map_err(|_| "The request body is not valid JSON.")?
    else {
        return Err("The request body must be a JSON object.");
    };
    let mut take = |name: &str| match fields.remove(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(value)) => Ok(Some(value)),
        Some(_) => Err("Request fields must be strings."),
    };
    let grant_type = take("grant_type")?;
    let refresh_token = take("refresh_token")?;
    let client = match (take("client_id")?, take("client_secret")?) {
        (Some(id), secret) => ClientAuth::Params { id, secret },
        (None, _) => ClientAuth::Missing,
    };
    Ok(RefreshRequest {
        grant_type,
        refresh_token,
        client,
    })
}

fn content_type_is(request: &Request, expected: &str) -> bool {
    request
        .headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case(expected))
}

/// `a=1&b=2`, percent- and `+`-decoded; a repeated parameter is an error (RFC 6749 §3.2).
fn parse_form(input: &[u8]) -> Result<HashMap<String, String>, &'static str> {
    let mut params = HashMap::new();
    for pair in input.split(|&b| b == b'&').filter(|pair| !pair.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let name = form_decode(name).ok_or("The request body is not valid form data.")?;
        let value = form_decode(value).ok_or("The request body is not valid form data.")?;
        if params.insert(name, value).is_some() {
            return Err("A request parameter was repeated.");
        }
    }
    Ok(params)
}

fn form_decode(input: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (*bytes.next()? as char).to_digit(16)?;
                let lo = (*bytes.next()? as char).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// `Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
fn decode_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((
        form_decode(&decoded[..colon])?,
        form_decode(&decoded[colon + 1..])?,
    ))
}

/// What the server answers, before it is put in `preset`'s words.
#[derive(Debug)]
pub(super) enum Reply {
    Tokens(TokenReply),
    InvalidRequest(&'static str),
    InvalidClient {
        used_basic: bool,
    },
    UnsupportedGrantType,
    DeadToken(DeadToken),
    RateLimited {
        retry_in: Duration,
        retry_after: Option<RetryAfter>,
    },
    /// A proxy's HTML error page with this status.
    Html(u16),
}

/// Why a refresh token was refused.
#[derive(Clone, Copy, Debug)]
pub(super) enum DeadToken {
    Unknown,
    Expired,
    Spent,
    ReuseDetected,
    Superseded,
    Revoked(RevocationReason),
}

#[derive(Debug)]
pub(super) struct TokenReply {
    pub(super) access_token: String,
    /// `None`: leave the field out.
    pub(super) refresh_token: Option<String>,
    pub(super) expires_in: Duration,
    pub(super) access_expires_at: SystemTime,
    pub(super) refresh_expires_at: Option<SystemTime>,
    pub(super) scope: Option<String>,
    pub(super) numeric_expiries: bool,
}

#[derive(Serialize)]
struct StandardTokens<'a> {
    access_token: &'a str,
    token_type: &'a str,
    expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
}

#[derive(Serialize)]
struct ConstantContactTokens<'a> {
    token_type: &'a str,
    expires_in: u64,
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
}

#[derive(Serialize)]
struct XoxodayTokens<'a> {
    access_token: &'a str,
    token_type: &'a str,
    expires_in: u64,
    refresh_token: &'a str,
    access_token_expiry: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token_expiry: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct OAuthError<'a> {
    error: &'a str,
    error_description: &'a str,
}

const CC_DEAD_TOKEN: &str =
    r#"{"error":"invalid_grant","error_description":"The refresh token is invalid or expired."}"#;
const CC_THROTTLED: &str = r#"{"error_key":"throttled","error_message":"Too Many Requests"}"#;
const XOXODAY_TOKEN_ERROR: &str = r#"{"success":0,"error_message_id":"auth.token_error"}"#;
const XOXODAY_INVALID_TOKEN: &str =
    r#"{"error":"invalid_token","error_description":"invalid/expired token"}"#;
const XOXODAY_LIMIT: &str = r#"{"message":"auth.request_limit_exceeded"}"#;

impl Reply {
    /// The HTTP status [`render`](Self::render) gives this reply in `preset`'s words.
    pub(super) fn status(&self, preset: Preset) -> u16 {
        match self {
            Reply::Tokens(_) => 200,
            Reply::InvalidRequest(_) | Reply::UnsupportedGrantType => 400,
            Reply::InvalidClient { .. } => 401,
            Reply::DeadToken(_) if preset == Preset::Xoxoday => 401,
            Reply::DeadToken(_) => 400,
            Reply::RateLimited { .. } => 429,
            Reply::Html(status) => *status,
        }
    }

    /// The HTTP reply in `preset`'s words, at `now` on the server's clock.
    pub(super) fn render(&self, preset: Preset, now: SystemTime) -> ResponseTemplate {
        match self {
            Reply::Tokens(tokens) => tokens.render(preset),
            Reply::InvalidRequest(description) => oauth_error(400, "invalid_request", description),
            Reply::InvalidClient { used_basic } => {
                let description = match preset {
                    Preset::Standard => "Client authentication failed.",
                    Preset::ConstantContact => {
                        "The client secret supplied for a confidential client is invalid."
                    }
                    Preset::Xoxoday => "invalid client credentials",
                };
                let reply = oauth_error(401, "invalid_client", description);
                if *used_basic && preset != Preset::Xoxoday {
                    // RFC 6749 §5.2: a client that tried the Authorization header gets a challenge.
                    reply.insert_header("www-authenticate", r#"Basic realm="token""#)
                } else {
                    reply
                }
            }
            Reply::UnsupportedGrantType => oauth_error(
                400,
                "unsupported_grant_type",
                "The authorization grant type is not supported by the authorization server.",
            ),
            Reply::DeadToken(why) => match preset {
                Preset::Standard => {
                    oauth_error(400, "invalid_grant", standard_dead_token_description(*why))
                }
                Preset::ConstantContact => json(400, CC_DEAD_TOKEN),
                Preset::Xoxoday => match why {
                    DeadToken::Revoked(RevocationReason::PasswordReset) => {
                        json(401, XOXODAY_TOKEN_ERROR)
                    }
                    _ => json(401, XOXODAY_INVALID_TOKEN),
                },
            },
            Reply::RateLimited {
                retry_in,
                retry_after,
            } => {
                let (reply, habit) = match preset {
                    Preset::Standard => (
                        oauth_error(
                            429,
                            "temporarily_unavailable",
                            "Too many refresh requests; retry later.",
                        ),
                        RetryAfter::Seconds,
                    ),
                    Preset::ConstantContact => (json(429, CC_THROTTLED), RetryAfter::Omitted),
                    Preset::Xoxoday => (json(429, XOXODAY_LIMIT), RetryAfter::Omitted),
                };
                match retry_after.unwrap_or(habit) {
                    RetryAfter::Seconds => {
                        reply.insert_header("retry-after", whole_seconds_up(*retry_in).to_string())
                    }
                    RetryAfter::HttpDate => reply.insert_header(
                        "retry-after",
                        httpdate::fmt_http_date(
                            now + Duration::from_secs(whole_seconds_up(*retry_in)),
                        ),
                    ),
                    RetryAfter::Omitted => reply,
                }
            }
            Reply::Html(status) => html_error(*status),
        }
    }
}

impl TokenReply {
    fn render(&self, preset: Preset) -> ResponseTemplate {
        let expires_in = self.expires_in.as_secs();
        let body = match preset {
            Preset::Standard => serde_json::to_vec(&StandardTokens {
                access_token: &self.access_token,
                token_type: "Bearer",
                expires_in,
                scope: self.scope.as_deref(),
                refresh_token: self.refresh_token.as_deref(),
            }),
            Preset::ConstantContact => serde_json::to_vec(&ConstantContactTokens {
                token_type: "Bearer",
                expires_in,
                access_token: &self.access_token,
                scope: self.scope.as_deref(),
                refresh_token: self.refresh_token.as_deref(),
            }),
            Preset::Xoxoday => serde_json::to_vec(&XoxodayTokens {
                access_token: &self.access_token,
                token_type: "bearer",
                expires_in,
                refresh_token: self.refresh_token.as_deref().unwrap_or_default(),
                access_token_expiry: self.expiry(self.access_expires_at),
                refresh_token_expiry: self.refresh_expires_at.map(|at| self.expiry(at)),
            }),
        };
        // Serializing these structs cannot fail: every field is a string or an integer.
        let reply = json_bytes(200, body.unwrap_or_default());
        if preset == Preset::Xoxoday {
            reply
        } else {
            no_store(reply)
        }
    }
}

impl TokenReply {
    /// Epoch milliseconds, as a string or (with `numeric_expiries`) a number.
    fn expiry(&self, at: SystemTime) -> serde_json::Value {
        let millis = epoch_millis(at);
        if self.numeric_expiries {
            serde_json::Value::from(u64::try_from(millis).unwrap_or(u64::MAX))
        } else {
            serde_json::Value::from(millis.to_string())
        }
    }
}

fn standard_dead_token_description(why: DeadToken) -> &'static str {
    match why {
        DeadToken::Unknown => "The refresh token is invalid.",
        DeadToken::Expired => "The refresh token has expired.",
        DeadToken::Spent => "The refresh token has already been used.",
        DeadToken::ReuseDetected => {
            "The refresh token has already been used; the grant has been revoked."
        }
        DeadToken::Superseded => "The refresh token has been superseded.",
        DeadToken::Revoked(RevocationReason::UserRevoked) => "The grant has been revoked.",
        DeadToken::Revoked(RevocationReason::PasswordReset) => {
            "The grant was revoked after a password reset."
        }
        DeadToken::Revoked(RevocationReason::ReuseDetected) => {
            "The grant was revoked after a refresh token was reused."
        }
        DeadToken::Revoked(RevocationReason::RateLimitAbuse) => {
            "The grant was revoked after too many refresh requests."
        }
        DeadToken::Revoked(RevocationReason::ClientRevoked) => {
            "The grant was revoked by the client."
        }
    }
}

fn oauth_error(status: u16, error: &str, error_description: &str) -> ResponseTemplate {
    let body = serde_json::to_vec(&OAuthError {
        error,
        error_description,
    });
    no_store(json_bytes(status, body.unwrap_or_default()))
}

pub(super) fn json(status: u16, body: &'static str) -> ResponseTemplate {
    json_bytes(status, body.as_bytes().to_vec())
}

fn json_bytes(status: u16, body: Vec<u8>) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body, "application/json")
}

/// RFC 6749 §5.1: token replies must not be cached.
fn no_store(reply: ResponseTemplate) -> ResponseTemplate {
    reply
        .insert_header("cache-control", "no-store")
        .insert_header("pragma", "no-cache")
}

/// The page nginx sends when it cannot get an answer from upstream.
fn html_error(status: u16) -> ResponseTemplate {
    let title = format!("{status} {}", reason_phrase(status));
    let body = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    ResponseTemplate::new(status).set_body_raw(body, "text/html")
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Temporarily Unavailable",
        504 => "Gateway Time-out",
        _ => "Error",
    }
}

fn whole_seconds_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn epoch_millis(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_plus_percent_and_bad_escapes() {
        assert_eq!(form_decode(b"a+b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(form_decode(b"%zz"), None);
        assert_eq!(form_decode(b"%4"), None);
        assert_eq!(form_decode(b"%ff"), None, "not UTF-8");
    }

    #[test]
    fn repeated_form_parameters_are_rejected() {
        assert!(parse_form(b"a=1&a=2").is_err());
        assert_eq!(parse_form(b"a=1&&b=").unwrap().len(), 2);
    }

    #[test]
    fn basic_credentials_are_base64_of_urlencoded_parts() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("my%3Aid:s+cret")
        );
        assert_eq!(
            decode_basic(&header),
            Some(("my:id".to_owned(), "s cret".to_owned()))
        );
        assert_eq!(decode_basic("Bearer abc"), None);
        assert_eq!(decode_basic("Basic !!!"), None);
    }
}
