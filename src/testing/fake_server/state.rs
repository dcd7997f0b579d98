//! The fake server's memory: grants, every token it ever issued, and the scripted failures.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use super::wire::{ClientAuth, DeadToken, RefreshRequest, Reply, TokenReply};
use super::{
    FakeConfig, GrantId, GrantState, IssuedGrant, RateLimit, RecordedRefresh, RefreshLifetime,
    RefreshOutcome, RevocationReason, Rotation,
};

pub(super) struct State {
    config: FakeConfig,
    rng: fastrand::Rng,
    /// `GrantId(n)` lives at index `n - 1`.
    grants: Vec<Grant>,
    tokens: HashMap<String, Token>,
    rate_limit: Option<RateLimit>,
    injected_failures: VecDeque<u16>,
    lost_replies: usize,
    pub(super) delay: Option<Duration>,
    pub(super) log: Vec<RecordedRefresh>,
    pub(super) reuse_detections: usize,
    pub(super) api_calls: usize,
    pub(super) revocations: usize,
}

struct Grant {
    revoked: Option<RevocationReason>,
    /// Tokens minted for this grant so far; makes every token value unique.
    serial: u64,
    access_token: String,
    refresh_token: String,
    /// The grant-level refresh deadline under [`RefreshLifetime::Absolute`].
    deadline: Option<SystemTime>,
    /// When rate-limit-admitted calls arrived, oldest first.
    admitted: VecDeque<SystemTime>,
    /// Calls rejected by the rate limit since it was set.
    throttled: usize,
}

struct Token {
    grant: GrantId,
    kind: Kind,
    expires_at: Option<SystemTime>,
    status: Status,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Access,
    Refresh,
}

#[derive(Clone, Copy)]
enum Status {
    Live,
    Spent { at: SystemTime },
    Superseded,
}

/// The server's answer to one call, before it is rendered.
pub(super) struct Handled {
    pub(super) reply: Reply,
    pub(super) grant: Option<GrantId>,
    pub(super) outcome: RefreshOutcome,
    pub(super) reply_lost: bool,
}

impl State {
    pub(super) fn new(config: FakeConfig) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(config.seed),
            config,
            grants: Vec::new(),
            tokens: HashMap::new(),
            rate_limit: None,
            injected_failures: VecDeque::new(),
            lost_replies: 0,
            delay: None,
            log: Vec::new(),
            reuse_detections: 0,
            api_calls: 0,
            revocations: 0,
        }
    }

    pub(super) fn issue_grant(&mut self, now: SystemTime) -> IssuedGrant {
        let id = GrantId(self.grants.len() as u64 + 1);
        self.grants.push(Grant {
            revoked: None,
            serial: 0,
            access_token: String::new(),
            refresh_token: String::new(),
            deadline: None,
            admitted: VecDeque::new(),
            throttled: 0,
        });
        self.start_generation(id, now)
    }

    /// Mints a fresh pair for `id` from scratch, as a dashboard would: every earlier token of
    /// the grant dies with [`DeadToken::Superseded`], and the grant is active again.
    pub(super) fn supersede(&mut self, id: GrantId, now: SystemTime) -> IssuedGrant {
        for token in self.tokens.values_mut().filter(|token| token.grant == id) {
            token.status = Status::Superseded;
        }
        self.start_generation(id, now)
    }

    fn start_generation(&mut self, id: GrantId, now: SystemTime) -> IssuedGrant {
        let deadline = match self.config.refresh_lifetime {
            RefreshLifetime::Absolute(lifetime) => Some(now + lifetime),
            RefreshLifetime::Sliding(_) | RefreshLifetime::Never => None,
        };
        let grant = self.grant_mut(id);
        grant.revoked = None;
        grant.deadline = deadline;
        let refresh_token = self.mint(id, Kind::Refresh, now);
        self.grant_mut(id).refresh_token = refresh_token;
        self.issue_access(id, now)
    }

    /// A new access token for `id`, paired with the grant's current refresh token.
    fn issue_access(&mut self, id: GrantId, now: SystemTime) -> IssuedGrant {
        let access_token = self.mint(id, Kind::Access, now);
        let grant = self.grant_mut(id);
        grant.access_token = access_token.clone();
        let refresh_token = grant.refresh_token.clone();
        IssuedGrant {
            grant: id,
            access_expires_at: now + self.config.access_lifetime,
            refresh_expires_at: self.tokens[&refresh_token].expires_at,
            access_token,
            refresh_token,
            expires_in: self.config.access_lifetime,
        }
    }

    fn mint(&mut self, id: GrantId, kind: Kind, now: SystemTime) -> String {
        let grant = self.grant_mut(id);
        grant.serial += 1;
        let serial = grant.serial;
        let deadline = grant.deadline;
        let prefix = match kind {
            Kind::Access => "at",
            Kind::Refresh => "rt",
        };
        let value = format!("{prefix}-{id}-{serial}-{:016x}", self.rng.u64(..));
        let expires_at = match (kind, self.config.refresh_lifetime) {
            (Kind::Access, _) => Some(now + self.config.access_lifetime),
            (Kind::Refresh, RefreshLifetime::Sliding(lifetime)) => Some(now + lifetime),
            (Kind::Refresh, RefreshLifetime::Absolute(_)) => deadline,
            (Kind::Refresh, RefreshLifetime::Never) => None,
        };
        self.tokens.insert(
            value.clone(),
            Token {
                grant: id,
                kind,
                expires_at,
                status: Status::Live,
            },
        );
        value
    }

    /// One call to the token endpoint: the scripted failures first, then the refresh itself.
    pub(super) fn handle(
        &mut self,
        request: Result<RefreshRequest, &'static str>,
        now: SystemTime,
    ) -> Handled {
        if self.injected_failures.front().is_some() {
            let status = self.injected_failures.pop_front().unwrap_or(503);
            let grant = request
                .ok()
                .and_then(|request| request.refresh_token)
                .and_then(|value| self.refresh_token(&value).map(|token| token.grant));
            return Handled {
                reply: Reply::Html(status),
                grant,
                outcome: RefreshOutcome::InjectedFailure,
                reply_lost: false,
            };
        }
        let (reply, grant, outcome) = match request {
            Ok(request) => self.refresh(request, now),
            Err(description) => (
                Reply::InvalidRequest(description),
                None,
                RefreshOutcome::InvalidRequest,
            ),
        };
        let reply_lost = self.lost_replies > 0;
        if reply_lost {
            self.lost_replies -= 1;
        }
        Handled {
            reply: if reply_lost { Reply::Html(504) } else { reply },
            grant,
            outcome,
            reply_lost,
        }
    }

    fn refresh(
        &mut self,
        request: RefreshRequest,
        now: SystemTime,
    ) -> (Reply, Option<GrantId>, RefreshOutcome) {
        let client_ok = match &request.client {
            ClientAuth::Basic { id, secret } => self.client_matches(id, Some(secret)),
            ClientAuth::Params { id, secret } => self.client_matches(id, secret.as_ref()),
            ClientAuth::Missing | ClientAuth::BadHeader => false,
        };
        if !client_ok {
            let used_basic = request.client.used_basic();
            return (
                Reply::InvalidClient { used_basic },
                None,
                RefreshOutcome::InvalidClient,
            );
        }
        match request.grant_type.as_deref() {
            Some("refresh_token") => {}
            Some(_) => {
                return (
                    Reply::UnsupportedGrantType,
                    None,
                    RefreshOutcome::UnsupportedGrantType,
                )
            }
            None => {
                return (
                    Reply::InvalidRequest("The grant_type parameter is missing."),
                    None,
                    RefreshOutcome::InvalidRequest,
                )
            }
        }
        let Some(value) = request.refresh_token.filter(|value| !value.is_empty()) else {
            return (
                Reply::InvalidRequest("The refresh_token parameter is missing."),
                None,
                RefreshOutcome::InvalidRequest,
            );
        };
        let Some(token) = self.refresh_token(&value) else {
            return (
                Reply::DeadToken(DeadToken::Unknown),
                None,
                RefreshOutcome::UnknownToken,
            );
        };
        let (id, status, expires_at) = (token.grant, token.status, token.expires_at);
        let dead = |why: DeadToken, outcome| (Reply::DeadToken(why), Some(id), outcome);

        if let Some(reason) = self.grant(id).revoked {
            return dead(DeadToken::Revoked(reason), RefreshOutcome::Revoked(reason));
        }
        if let Some(reply) = self.throttle(id, now) {
            return (reply, Some(id), RefreshOutcome::RateLimited);
        }
        if expires_at.is_some_and(|at| at <= now) {
            return dead(DeadToken::Expired, RefreshOutcome::Expired);
        }
        match status {
            Status::Superseded => dead(DeadToken::Superseded, RefreshOutcome::Superseded),
            Status::Spent { at } => match self.config.rotation {
                Rotation::OnWithGrace(grace) if now < at + grace => {
                    let issued = self.issue_access(id, now);
                    (
                        self.token_reply(issued, true),
                        Some(id),
                        RefreshOutcome::GraceReplay,
                    )
                }
                _ if self.config.reuse_detection => {
                    self.revoke(id, RevocationReason::ReuseDetected);
                    self.reuse_detections += 1;
                    dead(DeadToken::ReuseDetected, RefreshOutcome::ReuseDetected)
                }
                _ => dead(DeadToken::Spent, RefreshOutcome::Spent),
            },
            Status::Live => {
                let rotated = self.config.rotation != Rotation::Off;
                if rotated {
                    if let Some(token) = self.tokens.get_mut(&value) {
                        token.status = Status::Spent { at: now };
                    }
                    let refresh_token = self.mint(id, Kind::Refresh, now);
                    self.grant_mut(id).refresh_token = refresh_token;
                } else if let (Some(token), RefreshLifetime::Sliding(lifetime)) =
                    (self.tokens.get_mut(&value), self.config.refresh_lifetime)
                {
                    token.expires_at = Some(now + lifetime);
                }
                let issued = self.issue_access(id, now);
                (
                    self.token_reply(issued, rotated),
                    Some(id),
                    RefreshOutcome::Refreshed { rotated },
                )
            }
        }
    }

    fn client_matches(&self, id: &str, secret: Option<&String>) -> bool {
        id == self.config.client_id
            && secret.map_or(self.config.public_client, |secret| {
                *secret == self.config.client_secret
            })
    }

    fn token_reply(&self, issued: IssuedGrant, rotated: bool) -> Reply {
        let omit = !rotated
            && self.config.rotation == Rotation::Off
            && self.config.omit_unchanged_refresh_token;
        Reply::Tokens(TokenReply {
            access_token: issued.access_token,
            refresh_token: (!omit).then_some(issued.refresh_token),
            expires_in: issued.expires_in,
            access_expires_at: issued.access_expires_at,
            refresh_expires_at: issued
                .refresh_expires_at
                .filter(|_| !self.config.refresh_expiry_at_issue_only),
            scope: self.config.scope.clone(),
            numeric_expiries: self.config.numeric_expiries,
        })
    }

    /// Applies the rate limit to a call on `id`: `None` admits it.
    fn throttle(&mut self, id: GrantId, now: SystemTime) -> Option<Reply> {
        let limit = self.rate_limit?;
        let grant = self.grant_mut(id);
        while grant
            .admitted
            .front()
            .is_some_and(|&at| at + limit.window <= now)
        {
            grant.admitted.pop_front();
        }
        if grant.admitted.len() < limit.max {
            grant.admitted.push_back(now);
            return None;
        }
        grant.throttled += 1;
        let retry_in = grant.admitted.front().map_or(limit.window, |&oldest| {
            (oldest + limit.window)
                .duration_since(now)
                .unwrap_or_default()
        });
        if limit
            .invalidate_after
            .is_some_and(|after| grant.throttled >= after)
        {
            self.revoke(id, RevocationReason::RateLimitAbuse);
        }
        Some(Reply::RateLimited {
            retry_in,
            retry_after: limit.retry_after,
        })
    }

    /// An RFC 7009 revocation: the HTTP status to answer. Revoking any token of a grant ends
    /// the whole grant (§2.1 lets a server do so); unknown tokens are answered 200 too (§2.2).
    pub(super) fn revoke_token(&mut self, token: Option<String>, client: &ClientAuth) -> u16 {
        let authenticated = match client {
            ClientAuth::Basic { id, secret } => self.client_matches(id, Some(secret)),
            ClientAuth::Params { id, secret } => self.client_matches(id, secret.as_ref()),
            ClientAuth::Missing | ClientAuth::BadHeader => false,
        };
        if !authenticated {
            return 401;
        }
        let Some(token) = token else { return 400 };
        self.revocations += 1;
        if let Some(grant) = self.tokens.get(&token).map(|t| t.grant) {
            self.grant_mut(grant)
                .revoked
                .get_or_insert(RevocationReason::ClientRevoked);
        }
        200
    }

    pub(super) fn revoke(&mut self, id: GrantId, reason: RevocationReason) {
        self.grant_mut(id).revoked = Some(reason);
    }

    pub(super) fn expire_refresh_tokens(&mut self, id: GrantId, now: SystemTime) {
        let grant = self.grant_mut(id);
        grant.deadline = Some(grant.deadline.map_or(now, |deadline| deadline.min(now)));
        for token in self.tokens.values_mut() {
            if token.grant == id && token.kind == Kind::Refresh {
                token.expires_at = Some(token.expires_at.map_or(now, |at| at.min(now)));
            }
        }
    }

    pub(super) fn set_rate_limit(&mut self, limit: Option<RateLimit>) {
        self.rate_limit = limit;
        for grant in &mut self.grants {
            grant.admitted.clear();
            grant.throttled = 0;
        }
    }

    pub(super) fn fail_next(&mut self, n: usize, status: u16) {
        self.injected_failures
            .extend(std::iter::repeat_n(status, n));
    }

    pub(super) fn lose_next_replies(&mut self, n: usize) {
        self.lost_replies += n;
    }

    pub(super) fn is_access_token_valid(&self, value: &str, now: SystemTime) -> bool {
        self.tokens.get(value).is_some_and(|token| {
            token.kind == Kind::Access
                && matches!(token.status, Status::Live)
                && token.expires_at.is_some_and(|at| now < at)
                && self.grant(token.grant).revoked.is_none()
        })
    }

    /// The grant a valid access token belongs to.
    pub(super) fn authorize(&self, access_token: &str, now: SystemTime) -> Option<GrantId> {
        self.is_access_token_valid(access_token, now)
            .then(|| self.tokens[access_token].grant)
    }

    pub(super) fn current_refresh_token(&self, id: GrantId) -> Option<String> {
        let grant = self.grants.get(grant_index(id))?;
        grant.revoked.is_none().then(|| grant.refresh_token.clone())
    }

    pub(super) fn grant_state(&self, id: GrantId, now: SystemTime) -> GrantState {
        let grant = self.grant(id);
        if let Some(reason) = grant.revoked {
            return GrantState::Revoked(reason);
        }
        let expired = self.tokens[&grant.refresh_token]
            .expires_at
            .is_some_and(|at| at <= now);
        if expired {
            GrantState::RefreshTokenExpired
        } else {
            GrantState::Active
        }
    }

    fn refresh_token(&self, value: &str) -> Option<&Token> {
        self.tokens
            .get(value)
            .filter(|token| token.kind == Kind::Refresh)
    }

    fn grant(&self, id: GrantId) -> &Grant {
        &self.grants[grant_index(id)]
    }

    fn grant_mut(&mut self, id: GrantId) -> &mut Grant {
        &mut self.grants[grant_index(id)]
    }

    /// Panics (as the public methods document) when `id` was not issued by this server.
    pub(super) fn assert_known(&self, id: GrantId) {
        assert!(
            grant_index(id) < self.grants.len(),
            "{id} was not issued by this FakeAuthServer"
        );
    }
}

fn grant_index(id: GrantId) -> usize {
    usize::try_from(id.0).unwrap_or(usize::MAX).wrapping_sub(1)
}
