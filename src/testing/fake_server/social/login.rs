//! Instagram Login on the fake social server: the `/oauth/authorize` endpoint and the code
//! exchange at `POST /oauth/access_token`, which hands out a short-lived (1-hour) token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};
use wiremock::{Request, Respond, ResponseTemplate};

use super::state::{form, json_reply, lock, SocialState};
use super::UserId;
use crate::Clock;

pub(super) const AUTHORIZE_PATH: &str = "/oauth/authorize";
/// `POST` (the `fb_exchange_token` endpoint is a `GET` on the same path).
pub(super) const LOGIN_TOKEN_PATH: &str = "/oauth/access_token";
pub(super) const IG_EXCHANGE_PATH: &str = "/access_token";

/// Instagram's authorization codes are valid for an hour.
const CODE_LIFETIME: Duration = Duration::from_secs(3600);

/// Codes issued by the authorization endpoint, who the browser is signed in as, counters.
pub(super) struct Logins {
    codes: HashMap<String, Code>,
    pub(super) signed_in: Option<UserId>,
    serial: u64,
    pub(super) authorizations: usize,
    pub(super) code_exchanges: usize,
}

/// One authorization code and what it is bound to.
struct Code {
    user: UserId,
    redirect_uri: String,
    challenge: String,
    expires_at: SystemTime,
    used: bool,
}

impl Logins {
    pub(super) fn new() -> Self {
        Self {
            codes: HashMap::new(),
            signed_in: None,
            serial: 0,
            authorizations: 0,
            code_exchanges: 0,
        }
    }
}

fn page(status: u16, text: &'static str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("content-type", "text/plain; charset=utf-8")
        .set_body_string(text)
}

/// Instagram's error body for the code exchange:
/// `{"error_type":"OAuthException","code":400,"error_message":…}`.
fn login_error(message: &str) -> ResponseTemplate {
    json_reply(
        400,
        json!({"error_type": "OAuthException", "code": 400, "error_message": message}),
    )
}

impl SocialState {
    fn authorize(&mut self, request: &Request, now: SystemTime) -> ResponseTemplate {
        self.logins.authorizations += 1;
        let params: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let param = |name: &str| params.get(name).map(String::as_str);
        if param("client_id") != Some(self.config.client_id.as_str()) {
            return page(400, "Invalid platform app.");
        }
        let Some(mut redirect) = param("redirect_uri")
            .and_then(|uri| reqwest::Url::parse(uri).ok())
            .filter(|uri| matches!(uri.scheme(), "http" | "https"))
        else {
            return page(400, "Invalid redirect_uri.");
        };
        let refusal = if param("response_type") != Some("code") {
            Some("unsupported_response_type")
        } else if param("code_challenge").is_none()
            || param("code_challenge_method") != Some("S256")
        {
            Some("invalid_request")
        } else {
            None
        };
        {
            let mut query = redirect.query_pairs_mut();
            match refusal {
                Some(error) => {
                    query.append_pair("error", error);
                }
                None => {
                    let user = match self.logins.signed_in {
                        Some(user) => user,
                        None => self.new_user(),
                    };
                    // Consenting authorizes the app again for this user.
                    self.reauthorize(user);
                    self.logins.serial += 1;
                    let random: String = (0..24).map(|_| fastrand::alphanumeric()).collect();
                    let code = format!("AQ{}-{random}", self.logins.serial);
                    self.logins.codes.insert(
                        code.clone(),
                        Code {
                            user,
                            redirect_uri: param("redirect_uri").unwrap_or_default().to_owned(),
                            challenge: param("code_challenge").unwrap_or_default().to_owned(),
                            expires_at: now + CODE_LIFETIME,
                            used: false,
                        },
                    );
                    query.append_pair("code", &code);
                }
            }
            if let Some(state) = param("state") {
                query.append_pair("state", state);
            }
        }
        ResponseTemplate::new(302).insert_header("location", redirect.as_str())
    }

    fn exchange_code(&mut self, request: &Request, now: SystemTime) -> ResponseTemplate {
        self.logins.code_exchanges += 1;
        let params = form(&request.body);
        let param = |name: &str| params.get(name).map(String::as_str);
        if param("grant_type") != Some("authorization_code") {
            return login_error("Invalid grant_type.");
        }
        let client_ok = param("client_id") == Some(self.config.client_id.as_str())
            && param("client_secret") == Some(self.config.client_secret.as_str());
        if !client_ok {
            return login_error("Invalid platform app");
        }
        let refused = "Matching code was not found or was already used.";
        let Some(code) = param("code").and_then(|code| self.logins.codes.get_mut(code)) else {
            return login_error(refused);
        };
        if code.used {
            return login_error(refused);
        }
        code.used = true;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(param("code_verifier").unwrap_or_default()));
        if param("redirect_uri") != Some(code.redirect_uri.as_str()) {
            return login_error(
                "Error validating verification code. Please make sure your redirect_uri is identical to the one you used in the OAuth dialog request",
            );
        }
        if challenge != code.challenge || now >= code.expires_at {
            return login_error(refused);
        }
        let user = code.user;
        let access_token = self.issue_login_token(user, now);
        json_reply(
            200,
            json!({"access_token": access_token, "user_id": user.0}),
        )
    }
}

pub(super) struct AuthorizeEndpoint {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<SocialState>>,
}

impl Respond for AuthorizeEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        lock(&self.state).authorize(request, now)
    }
}

pub(super) struct CodeExchangeEndpoint {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<SocialState>>,
}

impl Respond for CodeExchangeEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let now = self.clock.now();
        lock(&self.state).exchange_code(request, now)
    }
}
