//! The authorization-code flow on the fake server: the `/authorize` endpoint and the token
//! endpoint's `grant_type=authorization_code` (RFC 6749 §4.1, RFC 7636 PKCE).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use wiremock::{Request, Respond, ResponseTemplate};

use super::state::State;
use super::wire::{self, ClientAuth, Reply, TokenReply};
use super::{FakeAuthServer, FakeConfig, GrantId, Preset, RevocationReason};
use crate::Clock;

/// How long an authorization code can be exchanged by default.
const DEFAULT_CODE_LIFETIME: Duration = Duration::from_secs(300);

/// Codes issued by `/authorize`, scripted refusals and counters.
pub(super) struct Codes {
    config: FakeConfig,
    codes: HashMap<String, Code>,
    refusals: VecDeque<(String, String)>,
    lifetime: Duration,
    rng: fastrand::Rng,
    serial: u64,
    authorizations: usize,
    exchanges: usize,
    grants: Vec<GrantId>,
}

/// One authorization code and what it is bound to.
struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: Option<String>,
    expires_at: SystemTime,
    /// Once exchanged (successfully or not), the grant it produced, if any.
    used: Option<Option<GrantId>>,
}

impl Codes {
    pub(super) fn new(config: &FakeConfig) -> Self {
        Self {
            config: config.clone(),
            codes: HashMap::new(),
            refusals: VecDeque::new(),
            lifetime: DEFAULT_CODE_LIFETIME,
            rng: fastrand::Rng::with_seed(config.seed ^ 0x636f_6465),
            serial: 0,
            authorizations: 0,
            exchanges: 0,
            grants: Vec::new(),
        }
    }
}

fn lock(codes: &Mutex<Codes>) -> MutexGuard<'_, Codes> {
    codes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The authorization endpoint's path for `preset`: beside its token endpoint.
pub(super) fn path(preset: Preset) -> &'static str {
    match preset {
        Preset::Standard => "/oauth2/authorize",
        Preset::ConstantContact => "/oauth2/default/v1/authorize",
        Preset::Xoxoday => "/chef/v1/oauth/authorize",
    }
}

/// The authorization-code flow.
impl FakeAuthServer {
    /// The authorization endpoint's full URL (`GET`).
    ///
    /// The user consents at once (no login page): the endpoint answers `302 Found` with
    /// `Location: <redirect_uri>?code=…&state=…`. The code is single-use, expires after
    /// [`set_code_lifetime`](Self::set_code_lifetime) (5 minutes by default) on the server's
    /// clock, and is bound to the client id, the redirect URI and the PKCE challenge, which
    /// the token endpoint checks (`grant_type=authorization_code`; a wrong verifier, redirect
    /// URI or client, an expired or unknown code: `400 invalid_grant`). A code presented a
    /// second time is refused and the grant it produced is revoked
    /// ([`RevocationReason::ReuseDetected`]), as RFC 6749 §4.1.2 recommends; a code whose
    /// exchange was refused is spent too. The scripted token-endpoint failures
    /// ([`fail_next`](Self::fail_next), [`lose_next_replies`](Self::lose_next_replies),
    /// [`set_delay`](Self::set_delay), rate limits) apply to refreshes only.
    ///
    /// Requests the server cannot redirect (unknown `client_id`, a missing or non-HTTP
    /// `redirect_uri`) get `400` with a text page. Errors it can redirect
    /// (`response_type` other than `code`, a missing `S256` PKCE challenge, a scripted
    /// refusal) go back as `error=…&error_description=…&state=…`. The code flow is for the
    /// form-based presets (Standard, Constant Contact-style); the Xoxoday-style token endpoint
    /// does not take codes.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = FakeAuthServer::start(FakeConfig::standard(), Arc::new(ManualClock::fixed())).await;
    /// let url = format!(
    ///     "{}?response_type=code&client_id={}&redirect_uri=http://app/cb&state=xyz\
    ///      &code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256",
    ///     server.authorize_url(),
    ///     server.client_id(),
    /// );
    /// let callback = server.follow_authorization(&url).await?;
    /// assert!(callback.starts_with("http://app/cb?code="));
    /// assert!(callback.ends_with("&state=xyz"));
    /// assert_eq!(server.authorizations(), 1);
    /// # Ok(()) }
    /// ```
    pub fn authorize_url(&self) -> String {
        format!("{}{}", self.server.uri(), path(self.config.preset))
    }

    /// The next authorization request is refused by the user: redirected back with
    /// `error=access_denied&error_description=The+user+denied+access.` (and the state).
    /// Refusals queue up with [`refuse_next_authorization`](Self::refuse_next_authorization).
    pub fn deny_next_authorization(&self) {
        self.refuse_next_authorization("access_denied", "The user denied access.");
    }

    /// The next authorization request is redirected back with `error` and
    /// `error_description` (`invalid_scope`, `server_error`, `consent_required`, …).
    pub fn refuse_next_authorization(&self, error: &str, description: &str) {
        lock(&self.codes)
            .refusals
            .push_back((error.to_owned(), description.to_owned()));
    }

    /// How long a code can be exchanged after it was issued, on the server's clock.
    pub fn set_code_lifetime(&self, lifetime: Duration) {
        lock(&self.codes).lifetime = lifetime;
    }

    /// Requests to the authorization endpoint so far, whatever their outcome.
    pub fn authorizations(&self) -> usize {
        lock(&self.codes).authorizations
    }

    /// Code exchanges (`grant_type=authorization_code`) at the token endpoint so far, whatever
    /// their outcome. They are not in [`refresh_calls`](Self::refresh_calls) or
    /// [`requests`](Self::requests).
    pub fn code_exchanges(&self) -> usize {
        lock(&self.codes).exchanges
    }

    /// The grants created by code exchanges, oldest first.
    pub fn authorized_grants(&self) -> Vec<GrantId> {
        lock(&self.codes).grants.clone()
    }

    /// Plays the browser's part of an authorization: `GET url` (an authorization URL of this
    /// server) without following the redirect, and returns where it points (the callback URL,
    /// with `code` and `state`, or `error`).
    ///
    /// # Errors
    ///
    /// If the request fails or the answer is not a redirect (an [`std::io::Error`], so that
    /// `?` works in any test).
    pub async fn follow_authorization(&self, url: &str) -> std::io::Result<String> {
        follow_authorization(url).await
    }
}

/// `GET url` without following the redirect; where it points (the callback URL).
pub(super) async fn follow_authorization(url: &str) -> std::io::Result<String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(std::io::Error::other)?;
    let reply = client
        .get(url)
        .send()
        .await
        .map_err(std::io::Error::other)?;
    let status = reply.status();
    reply
        .headers()
        .get("location")
        .filter(|_| status.is_redirection())
        .and_then(|location| location.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| {
            std::io::Error::other(format!("the authorization endpoint answered {status}"))
        })
}

/// The wiremock responder behind the authorization endpoint.
pub(super) struct AuthorizeEndpoint {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) codes: Arc<Mutex<Codes>>,
}

impl Respond for AuthorizeEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        let mut codes = lock(&self.codes);
        let codes = &mut *codes;
        let config = &codes.config;
        codes.authorizations += 1;
        let params: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let param = |name: &str| params.get(name).map(String::as_str);
        if param("client_id") != Some(config.client_id.as_str()) {
            return page(400, "Unknown client_id.");
        }
        let Some(mut redirect) = param("redirect_uri")
            .and_then(|uri| reqwest::Url::parse(uri).ok())
            .filter(|uri| matches!(uri.scheme(), "http" | "https"))
        else {
            return page(400, "Missing or invalid redirect_uri.");
        };
        let redirect_uri = param("redirect_uri").unwrap_or_default().to_owned();
        let state = param("state");
        let refusal = if param("response_type") != Some("code") {
            Some((
                "unsupported_response_type".to_owned(),
                "Only response_type=code is supported.".to_owned(),
            ))
        } else if param("code_challenge").is_none() {
            Some((
                "invalid_request".to_owned(),
                "PKCE code_challenge is required.".to_owned(),
            ))
        } else if param("code_challenge_method") != Some("S256") {
            Some((
                "invalid_request".to_owned(),
                "code_challenge_method must be S256.".to_owned(),
            ))
        } else {
            codes.refusals.pop_front()
        };
        {
            let mut query = redirect.query_pairs_mut();
            match refusal {
                Some((error, description)) => {
                    query
                        .append_pair("error", &error)
                        .append_pair("error_description", &description);
                }
                None => {
                    codes.serial += 1;
                    let random: String = (0..24).map(|_| codes.rng.alphanumeric()).collect();
                    let code = format!("code{}-{random}", codes.serial);
                    let lifetime = codes.lifetime;
                    codes.codes.insert(
                        code.clone(),
                        Code {
                            client_id: config.client_id.clone(),
                            redirect_uri,
                            challenge: param("code_challenge").unwrap_or_default().to_owned(),
                            scope: param("scope").map(str::to_owned),
                            expires_at: now + lifetime,
                            used: None,
                        },
                    );
                    query.append_pair("code", &code);
                }
            }
            if let Some(state) = state {
                query.append_pair("state", state);
            }
        }
        ResponseTemplate::new(302).insert_header("location", redirect.as_str())
    }
}

fn page(status: u16, text: &'static str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("content-type", "text/plain; charset=utf-8")
        .set_body_string(text)
}

const INVALID_GRANT: &str = r#"{"error":"invalid_grant","error_description":"The authorization code is invalid, expired, already used, or was issued to another client, redirect URI or PKCE challenge."}"#;

/// Answers a token request if it is a code exchange (`None`: not one, the refresh handling
/// takes it). Only form-based presets take codes.
pub(super) fn exchange(
    codes: &Mutex<Codes>,
    state: &Mutex<State>,
    clock: &dyn Clock,
    request: &Request,
) -> Option<ResponseTemplate> {
    let mut codes = lock(codes);
    let codes = &mut *codes;
    let config = &codes.config;
    if config.preset == Preset::Xoxoday {
        return None;
    }
    let (mut params, client) = wire::form_params(config.preset, request).ok()?;
    if params.get("grant_type").map(String::as_str) != Some("authorization_code") {
        return None;
    }
    let now = clock.now();
    codes.exchanges += 1;
    let client_id = match &client {
        ClientAuth::Basic { id, secret } if client_matches(config, id, Some(secret)) => id,
        ClientAuth::Params { id, secret } if client_matches(config, id, secret.as_ref()) => id,
        _ => {
            let used_basic = client.used_basic();
            return Some(Reply::InvalidClient { used_basic }.render(config.preset, now));
        }
    };
    let Some(value) = params.remove("code") else {
        return Some(wire::json(
            400,
            r#"{"error":"invalid_request","error_description":"The code parameter is missing."}"#,
        ));
    };
    let Some(code) = codes.codes.get_mut(&value) else {
        return Some(wire::json(400, INVALID_GRANT));
    };
    if let Some(issued) = code.used {
        // RFC 6749 §4.1.2: a code used twice revokes what it produced.
        if let Some(grant) = issued {
            super::lock(state).revoke(grant, RevocationReason::ReuseDetected);
        }
        return Some(wire::json(400, INVALID_GRANT));
    }
    code.used = Some(None);
    let verifier = params.remove("code_verifier").unwrap_or_default();
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    let bound = code.client_id == *client_id
        && params.get("redirect_uri") == Some(&code.redirect_uri)
        && challenge == code.challenge
        && now < code.expires_at;
    if !bound {
        return Some(wire::json(400, INVALID_GRANT));
    }
    let scope = code.scope.clone().or_else(|| config.scope.clone());
    let issued = super::lock(state).issue_grant(now);
    code.used = Some(Some(issued.grant));
    codes.grants.push(issued.grant);
    let reply = Reply::Tokens(TokenReply {
        access_token: issued.access_token,
        refresh_token: Some(issued.refresh_token),
        expires_in: issued.expires_in,
        access_expires_at: issued.access_expires_at,
        refresh_expires_at: issued.refresh_expires_at,
        scope,
        numeric_expiries: config.numeric_expiries,
    });
    Some(reply.render(config.preset, now))
}

fn client_matches(config: &FakeConfig, id: &str, secret: Option<&String>) -> bool {
    id == config.client_id
        && secret.map_or(config.public_client, |secret| {
            *secret == config.client_secret
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine as _;
    use sha2::{Digest, Sha256};

    use super::super::{FakeAuthServer, FakeConfig};
    use crate::testing::ManualClock;

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const REDIRECT: &str = "http://app.example/cb";

    fn challenge(verifier: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier))
    }

    async fn server() -> (FakeAuthServer, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
        (server, clock)
    }

    fn authorize_url(server: &FakeAuthServer, extra: &str) -> String {
        format!(
            "{}?response_type=code&client_id={}&redirect_uri={REDIRECT}&state=st&scope=a%20b\
             &code_challenge={}&code_challenge_method=S256{extra}",
            server.authorize_url(),
            server.client_id(),
            challenge(VERIFIER),
        )
    }

    async fn code(server: &FakeAuthServer) -> String {
        let location = server
            .follow_authorization(&authorize_url(server, ""))
            .await
            .unwrap();
        let url = reqwest::Url::parse(&location).unwrap();
        let code = url.query_pairs().find(|(n, _)| n == "code").unwrap().1;
        code.into_owned()
    }

    /// Exchanges `code`; returns the status and the body.
    async fn exchange(
        server: &FakeAuthServer,
        code: &str,
        verifier: &str,
        redirect: &str,
    ) -> (u16, serde_json::Value) {
        let reply = reqwest::Client::new()
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs([
                        ("grant_type", "authorization_code"),
                        ("code", code),
                        ("code_verifier", verifier),
                        ("redirect_uri", redirect),
                    ])
                    .finish(),
            )
            .send()
            .await
            .unwrap();
        let status = reply.status().as_u16();
        (
            status,
            serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_code_exchanges_once_for_a_grant_in_the_presets_format() {
        let (server, _clock) = server().await;
        let code = code(&server).await;
        let (status, body) = exchange(&server, &code, VERIFIER, REDIRECT).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "a b");
        assert!(server.is_access_token_valid(body["access_token"].as_str().unwrap()));
        assert_eq!(server.authorized_grants().len(), 1);
        assert_eq!(server.refresh_calls(), 0, "exchanges are not refreshes");

        let (status, body) = exchange(&server, &code, VERIFIER, REDIRECT).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        assert_eq!(server.code_exchanges(), 2);
    }

    #[tokio::test]
    async fn the_code_is_bound_to_verifier_redirect_and_lifetime() {
        let (server, clock) = server().await;
        let wrong_verifier = "x".repeat(43);
        let cases: [(&str, &str, u64); 3] = [
            (&wrong_verifier, REDIRECT, 0),
            (VERIFIER, "http://app.example/other", 0),
            (VERIFIER, REDIRECT, 301),
        ];
        for (verifier, redirect, wait) in cases {
            let code = code(&server).await;
            clock.advance(Duration::from_secs(wait));
            let (status, body) = exchange(&server, &code, verifier, redirect).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (400, Some("invalid_grant"))
            );
            // A refused code is spent: the right verifier cannot be tried afterwards.
            let (status, _) = exchange(&server, &code, VERIFIER, REDIRECT).await;
            assert_eq!(status, 400);
        }
        assert!(server.authorized_grants().is_empty());
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_or_without_a_redirect() {
        let (server, _clock) = server().await;
        let unknown_client = authorize_url(&server, "").replace("client_id=", "client_id=x");
        assert!(server.follow_authorization(&unknown_client).await.is_err());
        let no_redirect = authorize_url(&server, "").replace("redirect_uri=", "redirect=");
        assert!(server.follow_authorization(&no_redirect).await.is_err());

        let plain = authorize_url(&server, "").replace("method=S256", "method=plain");
        let location = server.follow_authorization(&plain).await.unwrap();
        assert!(location.starts_with(&format!("{REDIRECT}?error=invalid_request&")));
        assert!(location.ends_with("&state=st"));

        server.refuse_next_authorization("consent_required", "Ask again.");
        let location = server
            .follow_authorization(&authorize_url(&server, ""))
            .await
            .unwrap();
        assert_eq!(
            location,
            format!("{REDIRECT}?error=consent_required&error_description=Ask+again.&state=st")
        );
        assert_eq!(server.authorizations(), 4);
    }
}
