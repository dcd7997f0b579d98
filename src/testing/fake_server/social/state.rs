//! The fake social server's state and its endpoints.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use oauth2::url::form_urlencoded;
use serde_json::json;
use wiremock::{Request, Respond, ResponseTemplate};

use super::login::Logins;
use super::{
    ClientCredentialsRequest, GraphFailure, GraphRateLimit, LongLivedToken, SocialConfig,
    UsageHeader, UserId,
};
use crate::Clock;

pub(super) const REFRESH_PATH: &str = "/refresh_access_token";
pub(super) const TOKEN_PATH: &str = "/oauth2/token";
pub(super) const EXCHANGE_PATH: &str = "/oauth/access_token";

/// The lifetime of short-lived user tokens.
const SHORT_LIVED: Duration = Duration::from_secs(2 * 3600);
/// The lifetime of the short-lived token an Instagram Login code exchange hands out.
const LOGIN_SHORT_LIVED: Duration = Duration::from_secs(3600);
pub(super) const API_PATH_PATTERN: &str = r"^/v19\.0/";

/// The id the business use case header is reported under.
const APP_ID: &str = "1234567890";

pub(super) fn lock(state: &Mutex<SocialState>) -> MutexGuard<'_, SocialState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// From the client-credentials endpoint.
    Client,
    /// A user's short-lived token, from a login.
    ShortLived(UserId),
    /// A user's long-lived token.
    LongLived(UserId),
}

#[derive(Debug)]
pub(super) struct Token {
    kind: Kind,
    issued_at: SystemTime,
    expires_at: SystemTime,
    failure: Option<GraphFailure>,
}

/// Why a token is refused: a Graph code-190 error.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refused {
    Unknown,
    Failed(GraphFailure),
}

pub(super) struct SocialState {
    pub(super) config: SocialConfig,
    users: Vec<Option<GraphFailure>>,
    tokens: HashMap<String, Token>,
    minted: u64,
    limit: Option<GraphRateLimit>,
    /// Refresh calls within the rate limit's window.
    window: VecDeque<SystemTime>,
    pub(super) refresh_calls: usize,
    pub(super) rate_limited_calls: usize,
    pub(super) premature_refreshes: usize,
    pub(super) renewals: usize,
    pub(super) client_credentials: Vec<ClientCredentialsRequest>,
    pub(super) api_calls: usize,
    pub(super) exchanges: usize,
    pub(super) ig_exchanges: usize,
    pub(super) logins: Logins,
}

impl SocialState {
    pub(super) fn new(config: SocialConfig) -> Self {
        Self {
            config,
            users: Vec::new(),
            tokens: HashMap::new(),
            minted: 0,
            limit: None,
            window: VecDeque::new(),
            refresh_calls: 0,
            rate_limited_calls: 0,
            premature_refreshes: 0,
            renewals: 0,
            client_credentials: Vec::new(),
            api_calls: 0,
            exchanges: 0,
            ig_exchanges: 0,
            logins: Logins::new(),
        }
    }

    pub(super) fn new_user(&mut self) -> UserId {
        self.users.push(None);
        UserId(self.users.len() as u64)
    }

    pub(super) fn assert_known(&self, user: UserId) {
        self.assert_user(user);
    }

    fn assert_user(&self, user: UserId) -> usize {
        let index = (user.0 as usize).wrapping_sub(1);
        assert!(
            index < self.users.len(),
            "{user} was not created by this server"
        );
        index
    }

    fn mint(&mut self, kind: Kind, lifetime: Duration, now: SystemTime) -> (String, SystemTime) {
        self.minted += 1;
        let prefix = match kind {
            Kind::Client => "app".to_owned(),
            Kind::ShortLived(user) => format!("EAAs{user}"),
            Kind::LongLived(user) => format!("IGQV{user}"),
        };
        let value = format!("{prefix}-{}-{:016x}", self.minted, fastrand::u64(..));
        let expires_at = now + lifetime;
        self.tokens.insert(
            value.clone(),
            Token {
                kind,
                issued_at: now,
                expires_at,
                failure: None,
            },
        );
        (value, expires_at)
    }

    pub(super) fn issue_long_lived(&mut self, user: UserId, now: SystemTime) -> LongLivedToken {
        self.assert_user(user);
        let lifetime = self.config.long_lived_lifetime;
        let (access_token, expires_at) = self.mint(Kind::LongLived(user), lifetime, now);
        LongLivedToken {
            user,
            access_token,
            issued_at: now,
            expires_at,
        }
    }

    /// A short-lived token for `user`, as a login hands out: (token, expiry).
    pub(super) fn issue_short_lived(
        &mut self,
        user: UserId,
        now: SystemTime,
    ) -> (String, SystemTime) {
        self.assert_user(user);
        self.mint(Kind::ShortLived(user), SHORT_LIVED, now)
    }

    /// The short-lived (1-hour) token an Instagram Login code exchange hands `user`.
    pub(super) fn issue_login_token(&mut self, user: UserId, now: SystemTime) -> String {
        self.assert_user(user);
        self.mint(Kind::ShortLived(user), LOGIN_SHORT_LIVED, now).0
    }

    /// `user` authorized the app again: their failure no longer applies to new tokens, and
    /// every token issued before keeps it.
    pub(super) fn reauthorize(&mut self, user: UserId) {
        let index = self.assert_user(user);
        let Some(failure) = self.users[index].take() else {
            return;
        };
        for token in self.tokens.values_mut() {
            if matches!(token.kind, Kind::ShortLived(u) | Kind::LongLived(u) if u == user) {
                token.failure.get_or_insert(failure);
            }
        }
    }

    pub(super) fn fail_user(&mut self, user: UserId, failure: GraphFailure) {
        let index = self.assert_user(user);
        self.users[index] = Some(failure);
    }

    pub(super) fn fail_token(&mut self, value: &str, failure: GraphFailure) {
        if let Some(token) = self.tokens.get_mut(value) {
            token.failure = Some(failure);
        }
    }

    pub(super) fn set_rate_limit(&mut self, limit: Option<GraphRateLimit>) {
        self.limit = limit;
        self.window.clear();
    }

    /// The token, if the API would accept it now.
    pub(super) fn check(&self, value: &str, now: SystemTime) -> Result<&Token, Refused> {
        let token = self.tokens.get(value).ok_or(Refused::Unknown)?;
        let user_failure = match token.kind {
            Kind::ShortLived(user) | Kind::LongLived(user) => self.users[(user.0 - 1) as usize],
            Kind::Client => None,
        };
        if let Some(failure) = token.failure.or(user_failure) {
            return Err(Refused::Failed(failure));
        }
        if token.expires_at <= now {
            return Err(Refused::Failed(GraphFailure::Expired));
        }
        Ok(token)
    }

    /// Counts a refresh call against the limit: the usage header for the reply, and whether
    /// the call is refused.
    fn throttle(&mut self, now: SystemTime) -> (Option<(&'static str, String)>, bool) {
        let Some(limit) = self.limit else {
            return (None, false);
        };
        while self
            .window
            .front()
            .is_some_and(|t| *t + limit.window <= now)
        {
            self.window.pop_front();
        }
        self.window.push_back(now);
        let calls = self.window.len();
        let limited = calls > limit.max_calls;
        let percent = (calls * 100).div_ceil(limit.max_calls);
        let header = match limit.usage {
            UsageHeader::None => None,
            UsageHeader::App => Some((
                "x-app-usage",
                json!({"call_count": percent, "total_cputime": percent / 4, "total_time": percent / 2})
                    .to_string(),
            )),
            UsageHeader::BusinessUseCase => {
                // A call is allowed again once all but `max_calls - 1` calls left the window.
                let minutes = if limited {
                    let frees = self.window[calls - limit.max_calls] + limit.window;
                    let wait = frees.duration_since(now).unwrap_or_default();
                    wait.as_secs().div_ceil(60)
                } else {
                    0
                };
                Some((
                    "x-business-use-case-usage",
                    json!({APP_ID: [{
                        "type": "instagram",
                        "call_count": percent,
                        "total_cputime": percent / 4,
                        "total_time": percent / 2,
                        "estimated_time_to_regain_access": minutes,
                    }]})
                    .to_string(),
                ))
            }
        };
        (header, limited)
    }

    fn refresh(&mut self, params: &HashMap<String, String>, now: SystemTime) -> ResponseTemplate {
        self.refresh_calls += 1;
        let (usage, limited) = self.throttle(now);
        let with_usage = |reply: ResponseTemplate| match &usage {
            Some((name, value)) => reply.insert_header(*name, value.as_str()),
            None => reply,
        };
        if limited {
            self.rate_limited_calls += 1;
            let code = self.limit.map_or(4, |l| l.code);
            return with_usage(graph_error(
                400,
                code,
                None,
                "Application request limit reached",
            ));
        }
        if params.get("grant_type").map(String::as_str) != Some("ig_refresh_token") {
            return with_usage(graph_error(400, 100, None, "Unsupported grant_type."));
        }
        let Some(value) = params.get("access_token") else {
            return with_usage(graph_error(
                400,
                100,
                None,
                "An access token is required to request this resource.",
            ));
        };
        let (user, issued_at) = match self.check(value, now) {
            Ok(Token {
                kind: Kind::LongLived(user),
                issued_at,
                ..
            }) => (*user, *issued_at),
            Ok(_) => {
                return with_usage(graph_error(
                    400,
                    100,
                    None,
                    "Only long-lived user tokens can be refreshed.",
                ))
            }
            Err(refused) => return with_usage(refused_reply(refused)),
        };
        if issued_at + self.config.min_refresh_age > now {
            self.premature_refreshes += 1;
            return with_usage(graph_error(
                400,
                100,
                None,
                "The access token is too new to be refreshed.",
            ));
        }
        let lifetime = self.config.long_lived_lifetime;
        let (access_token, _) = self.mint(Kind::LongLived(user), lifetime, now);
        self.renewals += 1;
        with_usage(json_reply(
            200,
            json!({
                "access_token": access_token,
                "token_type": "bearer",
                "expires_in": lifetime.as_secs(),
            }),
        ))
    }

    fn exchange(
        &mut self,
        flavour: Exchange,
        params: &HashMap<String, String>,
        now: SystemTime,
    ) -> ResponseTemplate {
        let (grant_type, token_param) = match flavour {
            Exchange::Facebook => {
                self.exchanges += 1;
                ("fb_exchange_token", "fb_exchange_token")
            }
            Exchange::Instagram => {
                self.ig_exchanges += 1;
                ("ig_exchange_token", "access_token")
            }
        };
        if params.get("grant_type").map(String::as_str) != Some(grant_type) {
            return graph_error(400, 100, None, "Unsupported grant_type.");
        }
        let client_ok = (flavour == Exchange::Instagram
            || params.get("client_id") == Some(&self.config.client_id))
            && params.get("client_secret") == Some(&self.config.client_secret);
        if !client_ok {
            return graph_error(400, 101, None, "Error validating application.");
        }
        let Some(value) = params.get(token_param) else {
            return graph_error(400, 100, None, &format!("Missing {token_param}."));
        };
        let user = match self.check(value, now) {
            Ok(Token {
                kind: Kind::ShortLived(user) | Kind::LongLived(user),
                ..
            }) => *user,
            Ok(_) => return graph_error(400, 100, None, "Not a user access token."),
            Err(refused) => return refused_reply(refused),
        };
        let lifetime = self.config.long_lived_lifetime;
        let (access_token, _) = self.mint(Kind::LongLived(user), lifetime, now);
        json_reply(
            200,
            json!({
                "access_token": access_token,
                "token_type": "bearer",
                "expires_in": lifetime.as_secs(),
            }),
        )
    }

    fn client_credentials(&mut self, request: &Request, now: SystemTime) -> ResponseTemplate {
        let params = if request.body.is_empty() {
            HashMap::new()
        } else {
            form(&request.body)
        };
        let basic = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(decode_basic);
        let (id, secret) = match basic {
            Some((id, secret)) => (Some(id), Some(secret)),
            None => (
                params.get("client_id").cloned(),
                params.get("client_secret").cloned(),
            ),
        };
        let authenticated = id.as_deref() == Some(self.config.client_id.as_str())
            && secret.as_deref() == Some(self.config.client_secret.as_str());
        let reply = if params.get("grant_type").map(String::as_str) != Some("client_credentials") {
            (400, json!({"error": "unsupported_grant_type"}))
        } else if !authenticated {
            (
                401,
                json!({"error": "invalid_client", "error_description": "Client authentication failed."}),
            )
        } else {
            let lifetime = self.config.client_token_lifetime;
            let (access_token, _) = self.mint(Kind::Client, lifetime, now);
            let mut body = json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs(),
            });
            if let Some(scope) = params.get("scope") {
                body["scope"] = json!(scope);
            }
            (200, body)
        };
        self.client_credentials.push(ClientCredentialsRequest {
            at: now,
            scope: params.get("scope").cloned(),
            audience: params.get("audience").cloned(),
            status: reply.0,
        });
        json_reply(reply.0, reply.1)
    }

    fn api(&mut self, request: &Request, now: SystemTime) -> ResponseTemplate {
        self.api_calls += 1;
        let bearer = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned());
        let token = bearer.or_else(|| query(request).remove("access_token"));
        let Some(token) = token else {
            return refused_reply(Refused::Unknown);
        };
        match self.check(&token, now) {
            Ok(Token {
                kind: Kind::ShortLived(user) | Kind::LongLived(user),
                ..
            }) => json_reply(200, json!({"id": user.to_string()})),
            Ok(_) => json_reply(200, json!({"id": "app"})),
            Err(refused) => refused_reply(refused),
        }
    }
}

fn refused_reply(refused: Refused) -> ResponseTemplate {
    let reply = match refused {
        Refused::Unknown => graph_error(400, 190, None, "Invalid OAuth access token."),
        Refused::Failed(failure) => {
            graph_error(400, 190, Some(failure.subcode()), failure.message())
        }
    };
    reply.insert_header(
        "www-authenticate",
        r#"OAuth "Facebook Platform" "invalid_token" "Error validating access token""#,
    )
}

/// A Graph error body: `{"error":{"message","type","code","error_subcode","fbtrace_id"}}`.
pub(super) fn graph_error(
    status: u16,
    code: u32,
    subcode: Option<u32>,
    message: &str,
) -> ResponseTemplate {
    let mut error = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEfGhIjK",
    });
    if let Some(subcode) = subcode {
        error["error_subcode"] = json!(subcode);
    }
    json_reply(status, json!({ "error": error }))
}

pub(super) fn json_reply(status: u16, body: serde_json::Value) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.to_string().into_bytes(), "application/json")
}

pub(super) fn form(input: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(input).into_owned().collect()
}

pub(super) fn query(request: &Request) -> HashMap<String, String> {
    form(request.url.query().unwrap_or("").as_bytes())
}

fn decode_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| -> String {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

pub(super) struct RefreshEndpoint {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<SocialState>>,
}

impl Respond for RefreshEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        lock(&self.state).refresh(&query(request), now)
    }
}

/// Which short-to-long-lived exchange an [`ExchangeEndpoint`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange {
    /// `fb_exchange_token`, with the client id.
    Facebook,
    /// `ig_exchange_token`, the token as `access_token`, no client id.
    Instagram,
}

pub(super) struct ExchangeEndpoint {
    pub(super) flavour: Exchange,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<SocialState>>,
}

impl Respond for ExchangeEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        lock(&self.state).exchange(self.flavour, &query(request), now)
    }
}

pub(super) struct ClientCredentialsEndpoint {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<SocialState>>,
}

impl Respond for ClientCredentialsEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        lock(&self.state).client_credentials(request, now)
    }
}

pub(super) struct ApiEndpoint {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<SocialState>>,
}

impl Respond for ApiEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        lock(&self.state).api(request, now)
    }
}
