//! Hand-over from the `oauth2` crate: an application running its own flow with `oauth2`
//! (authorization code, device code…) turns the token response into a [`TokenSet`] in one line.

use std::time::SystemTime;

use oauth2::{ExtraTokenFields, StandardTokenResponse, TokenResponse as _, TokenType};
use serde_json::Value;

use super::{AccessToken, Expiry, RefreshToken, TokenResponse, TokenSet};

impl TokenSet {
    /// The tokens of a response from the [`oauth2`] crate, with `expires_in` counted from
    /// `now` (the time of the response, on the clock the manager uses).
    ///
    /// Copies the access token, the refresh token, `expires_in`, the scopes, the token type,
    /// and the extra fields (into [`extra`](Self::extra)); `issued_at` is `now`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use oauth2::basic::BasicTokenResponse;
    /// use tokenkeeper::TokenSet;
    ///
    /// // What `oauth2`'s `exchange_code(..).request_async(..)` returns:
    /// let response: BasicTokenResponse = serde_json::from_str(
    ///     r#"{"access_token":"at","token_type":"bearer","expires_in":3600,"refresh_token":"rt"}"#,
    /// )?;
    /// // With a manager: `TokenSet::from_oauth2(&response, manager.clock().now())`.
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let tokens = TokenSet::from_oauth2(&response, now);
    /// assert_eq!(tokens.access_token().secret(), "at");
    /// assert_eq!(tokens.refresh_token().map(|t| t.secret()), Some("rt"));
    /// assert_eq!(tokens.expires_at(), Some(now + Duration::from_secs(3600)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_oauth2<EF, TT>(response: &StandardTokenResponse<EF, TT>, now: SystemTime) -> Self
    where
        EF: ExtraTokenFields,
        TT: TokenType,
    {
        TokenSet::new(AccessToken::new(response.access_token().secret().as_str()))
            .apply(TokenResponse::from(response), now)
    }
}

/// [`TokenSet::from_oauth2`] at [`SystemTime::now`]. With a manager whose
/// [`Clock`](crate::Clock) is not the system clock (tests), call `from_oauth2` with the
/// manager's clock instead.
impl<EF: ExtraTokenFields, TT: TokenType> From<&StandardTokenResponse<EF, TT>> for TokenSet {
    fn from(response: &StandardTokenResponse<EF, TT>) -> Self {
        TokenSet::from_oauth2(response, SystemTime::now())
    }
}

/// [`TokenSet::from_oauth2`] at [`SystemTime::now`] (see the `&StandardTokenResponse` impl).
impl<EF: ExtraTokenFields, TT: TokenType> From<StandardTokenResponse<EF, TT>> for TokenSet {
    fn from(response: StandardTokenResponse<EF, TT>) -> Self {
        TokenSet::from(&response)
    }
}

/// The reply as a [`Provider`](crate::Provider) returns it, for a custom provider that runs the
/// refresh with the `oauth2` crate: `expires_in` stays relative ([`Expiry::In`]), and the
/// manager makes it absolute on its clock.
impl<EF: ExtraTokenFields, TT: TokenType> From<&StandardTokenResponse<EF, TT>> for TokenResponse {
    fn from(response: &StandardTokenResponse<EF, TT>) -> Self {
        let mut reply =
            TokenResponse::new(AccessToken::new(response.access_token().secret().as_str()));
        if let Some(refresh) = response.refresh_token() {
            reply = reply.with_refresh_token(RefreshToken::new(refresh.secret().as_str()));
        }
        if let Some(lifetime) = response.expires_in() {
            reply = reply.with_expires(Expiry::In(lifetime));
        }
        if let Some(scopes) = response.scopes() {
            reply = reply.with_scopes(scopes.iter().map(|s| s.as_str().to_owned()).collect());
        }
        // `oauth2`'s token types serialize as their wire name ("bearer", "mac", …).
        if let Ok(Value::String(kind)) = serde_json::to_value(response.token_type()) {
            if !kind.is_empty() {
                reply = reply.with_token_type(kind);
            }
        }
        if let Ok(Value::Object(extra)) = serde_json::to_value(response.extra_fields()) {
            reply = reply.with_extra(extra);
        }
        reply
    }
}

/// See the `&StandardTokenResponse` impl.
impl<EF: ExtraTokenFields, TT: TokenType> From<StandardTokenResponse<EF, TT>> for TokenResponse {
    fn from(response: StandardTokenResponse<EF, TT>) -> Self {
        TokenResponse::from(&response)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use oauth2::basic::{BasicTokenResponse, BasicTokenType};
    use oauth2::{EmptyExtraTokenFields, Scope};
    use serde::{Deserialize, Serialize};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn full() -> BasicTokenResponse {
        let mut response = StandardTokenResponse::new(
            oauth2::AccessToken::new("at-1".into()),
            BasicTokenType::Bearer,
            EmptyExtraTokenFields {},
        );
        response.set_refresh_token(Some(oauth2::RefreshToken::new("rt-1".into())));
        response.set_expires_in(Some(&Duration::from_secs(600)));
        response.set_scopes(Some(vec![
            Scope::new("read".into()),
            Scope::new("write".into()),
        ]));
        response
    }

    #[test]
    fn every_standard_field_is_carried_over() {
        let tokens = TokenSet::from_oauth2(&full(), at(1000));
        assert_eq!(tokens.access_token().secret(), "at-1");
        assert_eq!(
            tokens.refresh_token().map(RefreshToken::secret),
            Some("rt-1")
        );
        assert_eq!(tokens.expires_at(), Some(at(1600)));
        assert_eq!(tokens.issued_at(), Some(at(1000)));
        assert_eq!(tokens.token_type(), "bearer");
        assert_eq!(
            tokens.scopes(),
            Some(&["read".to_owned(), "write".to_owned()][..])
        );
        assert!(tokens.extra().is_empty());
    }

    #[test]
    fn absent_fields_stay_absent() {
        let bare = BasicTokenResponse::new(
            oauth2::AccessToken::new("at-2".into()),
            BasicTokenType::Bearer,
            EmptyExtraTokenFields {},
        );
        let tokens = TokenSet::from_oauth2(&bare, at(5));
        assert!(tokens.refresh_token().is_none());
        assert!(tokens.expires_at().is_none() && tokens.scopes().is_none());
    }

    #[test]
    fn the_reply_form_keeps_the_lifetime_relative() {
        let reply = TokenResponse::from(full());
        assert_eq!(reply.expires(), Some(Expiry::In(Duration::from_secs(600))));
        assert_eq!(
            reply.refresh_token().map(RefreshToken::secret),
            Some("rt-1")
        );
    }

    #[test]
    fn from_counts_from_the_system_clock() {
        let before = SystemTime::now();
        let tokens = TokenSet::from(full());
        let after = SystemTime::now();
        let expires = tokens.expires_at().unwrap();
        assert!(
            expires >= before + Duration::from_secs(600)
                && expires <= after + Duration::from_secs(600)
        );
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct IdToken {
        id_token: String,
    }
    impl ExtraTokenFields for IdToken {}

    #[test]
    fn extra_fields_land_in_extra_and_stay_out_of_debug() {
        let response = StandardTokenResponse::new(
            oauth2::AccessToken::new("at-3".into()),
            BasicTokenType::Bearer,
            IdToken {
                id_token: "idt-secret".into(),
            },
        );
        let tokens = TokenSet::from_oauth2(&response, at(0));
        assert_eq!(tokens.extra()["id_token"], "idt-secret");
        assert!(!format!("{tokens:?}").contains("idt-secret"));
    }
}
