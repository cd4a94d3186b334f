//! Cache invalidation across gateways: the listener.
//!
//! When a unit comes back (cancel, payment timeout) or a promotion is edited
//! or deleted, its id is published on `P:events` (`Store::publish_changed`);
//! every gateway drops its cached meta and sold-out flag for it, so a
//! returned unit is sold again at once. A missed message costs at most the
//! cache TTL, and a gateway that (re)connects drops its whole cache, since it
//! may have missed some.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::PromotionCache;
use crate::pace;
use crate::stock::Keys;
use crate::stock::store::subscribe_changes;

/// Wait before subscribing again after the channel was lost.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Listens on `P:events` until `shutdown`, subscribing again after failures.
pub async fn listen(
    redis_url: String,
    keys: Keys,
    cache: PromotionCache,
    shutdown: CancellationToken,
) {
    loop {
        match subscribe_once(&redis_url, &keys, &cache, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cache invalidation channel lost; reconnecting");
                if !pace::sleep(RESUBSCRIBE_AFTER, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// One subscription, until it drops (an error) or `shutdown` (`Ok`).
async fn subscribe_once(
    redis_url: &str,
    keys: &Keys,
    cache: &PromotionCache,
    shutdown: &CancellationToken,
) -> redis::RedisResult<()> {
    let changes = subscribe_changes(redis_url, keys).await?;
    tokio::pin!(changes);
    // Anything may have changed while we were not listening.
    cache.invalidate_all();
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(id)) => cache.invalidate(id).await,
                Some(Err(e)) => tracing::warn!(error = %e, "malformed cache invalidation message"),
                None => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "pub/sub connection closed",
                    )))
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
