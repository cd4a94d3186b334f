//! Cache invalidation across gateways over Redis pub/sub.
//!
//! When a unit comes back (cancel, payment timeout) or a promotion is edited
//! or deleted, its id is published on `P:events`; every gateway drops its
//! cached meta and sold-out flag for it, so a returned unit is sold again at
//! once. A missed message costs at most the cache TTL, and a gateway that
//! (re)connects drops its whole cache, since it may have missed some.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use crate::promotions::PromotionCache;

/// Tells every gateway that promotion `id` changed. Best effort: the cache
/// TTL covers a lost message.
pub async fn publish_changed(conn: &mut ConnectionManager, keys: &Keys, id: i64) {
    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(keys.events())
        .arg(id)
        .query_async(conn)
        .await;
    if let Err(e) = published {
        tracing::warn!(promotion = id, error = %e, "failed to publish a cache invalidation");
    }
}

/// Listens on `P:events` until `shutdown`, reconnecting after failures.
pub async fn listen(
    redis_url: String,
    keys: Keys,
    cache: PromotionCache,
    shutdown: CancellationToken,
) {
    let channel = keys.events();
    while !shutdown.is_cancelled() {
        match subscribe_once(&redis_url, &channel, &cache, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cache invalidation channel lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

async fn subscribe_once(
    redis_url: &str,
    channel: &str,
    cache: &PromotionCache,
    shutdown: &CancellationToken,
) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    // Anything may have changed while we were not listening.
    cache.invalidate_all();
    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection closed")));
                };
                match msg.get_payload::<i64>() {
                    Ok(id) => cache.invalidate(id).await,
                    Err(e) => tracing::warn!(error = %e, "malformed cache invalidation message"),
                }
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
