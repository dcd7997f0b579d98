//! A protected resource next to the token endpoint, answering as the preset's API would.

use std::sync::{Arc, Mutex};

use wiremock::{Request, Respond, ResponseTemplate};

use super::wire::json;
use super::{lock, Preset, State};
use crate::Clock;

/// The resource's path on the fake server.
pub(super) const PATH: &str = "/api/resource";

/// Answers `200 {"grant":"g1"}` to a request bearing a valid access token, and the preset's
/// `401` to anything else.
pub(super) struct ResourceEndpoint {
    pub(super) preset: Preset,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) state: Arc<Mutex<State>>,
}

impl Respond for ResourceEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let bearer = request
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let mut state = lock(&self.state);
        state.api_calls += 1;
        let now = self.clock.now();
        match bearer.and_then(|token| state.authorize(token, now)) {
            Some(grant) => ResponseTemplate::new(200)
                .set_body_raw(format!(r#"{{"grant":"{grant}"}}"#), "application/json"),
            None => unauthorized(self.preset),
        }
    }
}

fn unauthorized(preset: Preset) -> ResponseTemplate {
    match preset {
        Preset::Standard => json(
            401,
            r#"{"error":"invalid_token","error_description":"The access token is invalid or expired."}"#,
        )
        .insert_header(
            "www-authenticate",
            r#"Bearer error="invalid_token", error_description="The access token is invalid or expired.""#,
        ),
        Preset::ConstantContact => json(
            401,
            r#"{"error_key":"unauthorized","error_message":"Unauthorized"}"#,
        )
        .insert_header("www-authenticate", "Bearer realm=api.cc.email"),
        Preset::Xoxoday => json(
            401,
            r#"{"error":"invalid_token","error_description":"invalid/expired token"}"#,
        ),
    }
}
