//! A manager holding one expired grant, over a provider whose every result is recorded, and a
//! wiremock token endpoint to point the provider at: for tests that pin both how a reply is
//! classified by the provider and what the manager then does with the grant.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    AccessToken, Clock, GrantHealth, GrantRecord, MemoryStore, Provider, ProviderError,
    RefreshRequest, RefreshToken, TokenKey, TokenManager, TokenResponse, TokenSet, TokenStore,
};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The access token every harness grant starts with.
pub const OLD_AT: &str = "at-old-0001";

type Seen = Arc<Mutex<Vec<Result<TokenResponse, ProviderError>>>>;

/// Wraps a provider and records what it returned to the manager.
///
/// A test that needs only the provider-level result can call the provider itself with
/// `RefreshRequest::new`. The harness tests check the manager's reaction too, so they need the
/// result of the very call the manager made: calling the provider again would send a second
/// request to the server.
struct Recording<P> {
    inner: P,
    seen: Seen,
}

#[async_trait]
impl<P: Provider> Provider for Recording<P> {
    async fn refresh(&self, req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        let result = self.inner.refresh(req).await;
        self.seen.lock().unwrap().push(result.clone());
        result
    }
}

pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub store: Arc<MemoryStore>,
    pub manager: TokenManager,
    pub key: TokenKey,
    seen: Seen,
    old_rt: String,
}

impl Harness {
    /// A manager over `provider`, a memory store and a fixed manual clock, holding one grant
    /// (`OLD_AT`, refresh token `old_rt`) whose access token has expired.
    pub async fn new(provider: impl Provider, old_rt: &str) -> Self {
        let clock = Arc::new(ManualClock::fixed());
        let store = Arc::new(MemoryStore::new());
        let seen = Seen::default();
        let manager = TokenManager::builder(Recording {
            inner: provider,
            seen: seen.clone(),
        })
        .clock(clock.clone())
        .store(store.clone())
        .build();
        let key = TokenKey::from("acct-1");
        let grant = TokenSet::new(AccessToken::new(OLD_AT))
            .with_refresh_token(RefreshToken::new(old_rt))
            .with_expires_at(clock.now() - Duration::from_secs(1));
        manager.insert(key.clone(), grant).await.expect("insert");
        Self {
            clock,
            store,
            manager,
            key,
            seen,
            old_rt: old_rt.to_owned(),
        }
    }

    /// How many times the manager called the provider.
    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// What the provider returned on its last call, which must have failed.
    pub fn provider_failure(&self) -> ProviderError {
        let seen = self.seen.lock().unwrap();
        match seen.last().expect("the provider was called") {
            Ok(r) => panic!("expected the provider to fail, got {r:?}"),
            Err(e) => e.clone(),
        }
    }

    pub async fn stored(&self) -> GrantRecord {
        self.store
            .load(&self.key)
            .await
            .expect("load")
            .expect("grant is stored")
            .value
    }

    /// The grant is alive and the store still holds the tokens it was inserted with.
    pub async fn assert_intact(&self, case: &str) {
        let record = self.stored().await;
        assert_eq!(
            record.tokens().refresh_token().map(RefreshToken::secret),
            Some(self.old_rt.as_str()),
            "{case}"
        );
        assert_eq!(record.tokens().access_token().secret(), OLD_AT, "{case}");
        let status = self.manager.status(&self.key).await.expect("status");
        assert!(
            !matches!(status.health, GrantHealth::ReauthorizationRequired { .. }),
            "{case}: {status:?}"
        );
        assert!(!status.needs_reauthorization(), "{case}");
        assert!(status.has_refresh_token, "{case}");
        assert!(
            self.manager
                .reauthorization_required()
                .await
                .expect("list")
                .is_empty(),
            "{case}"
        );
    }
}

/// A server answering POST /token with each of `replies` in turn (the last one forever).
pub async fn token_endpoint(replies: Vec<ResponseTemplate>) -> MockServer {
    let server = MockServer::start().await;
    let count = replies.len();
    for (i, reply) in replies.into_iter().enumerate() {
        let mock = Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(reply);
        let mock = if i + 1 < count {
            mock.up_to_n_times(1)
        } else {
            mock
        };
        mock.mount(&server).await;
    }
    server
}

/// A reply with `body` labelled `content_type`.
pub fn reply(status: u16, body: impl Into<Vec<u8>>, content_type: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.into(), content_type)
}

/// A reply with `body` labelled `application/json`.
pub fn json_reply(status: u16, body: &str) -> ResponseTemplate {
    reply(status, body.as_bytes().to_vec(), "application/json")
}
