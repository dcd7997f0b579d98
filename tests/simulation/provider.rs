//! The model provider, seen through one manager instance's connection.

use async_trait::async_trait;
use tokenkeeper::{Provider, ProviderError, RefreshRequest, TokenResponse};

use crate::world::{lock, Delay, Reply, Shared};

/// The payload of an injected panic; the panic hook keeps these quiet.
pub const PANIC_MESSAGE: &str = "sim: injected provider panic";

pub struct SimProvider {
    pub world: Shared,
    pub inst: usize,
}

/// Ends the call in the model when its future is gone, answered or dropped.
struct Guard {
    world: Shared,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.world).provider_gone(self.id);
    }
}

#[async_trait]
impl Provider for SimProvider {
    async fn refresh(&self, request: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        let presented = request
            .tokens
            .refresh_token()
            .map(|t| t.secret().to_owned());
        let plan = lock(&self.world).provider_enter(self.inst, request.key, presented.as_deref());
        let _guard = Guard {
            world: self.world.clone(),
            id: plan.id,
        };
        match plan.delay {
            Delay::Now => {}
            Delay::For(d) => tokio::time::sleep(d).await,
            Delay::Forever => std::future::pending::<()>().await,
        }
        let result = lock(&self.world).provider_reply(plan.id, &plan.reply);
        if matches!(plan.reply, Reply::Panic) {
            panic!("{PANIC_MESSAGE}");
        }
        result
    }
}
