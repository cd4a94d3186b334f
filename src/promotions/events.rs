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
use crate::stock::store::{changed_promotion, subscribe_changes, unsubscribe_changes};
use crate::stock::{Keys, ListenerPool};

/// Wait before subscribing again after the channel was lost.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Listens on `P:events` until `shutdown`, subscribing again after failures,
/// on a connection from `pool` (one per listener).
pub async fn listen(
    pool: ListenerPool,
    keys: Keys,
    cache: PromotionCache,
    shutdown: CancellationToken,
) {
    loop {
        match subscribe_once(&pool, &keys, &cache, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cache invalidation channel lost; reconnecting");
                if !pace::sleep(RESUBSCRIBE_AFTER, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// One subscription, until it drops (an error: the connection is thrown
/// away) or `shutdown` (`Ok`: it unsubscribes and goes back to the pool).
async fn subscribe_once(
    pool: &ListenerPool,
    keys: &Keys,
    cache: &PromotionCache,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut conn = pool.lease().await?;
    if let Err(e) = subscribe_changes(&mut conn, keys).await {
        ListenerPool::discard(conn);
        return Err(e.into());
    }
    // Anything may have changed while we were not listening.
    cache.invalidate_all();
    let closed = {
        let mut changes = conn.on_message();
        loop {
            tokio::select! {
                change = changes.next() => match change {
                    Some(msg) => match changed_promotion(&msg) {
                        Ok(id) => cache.invalidate(id).await,
                        Err(e) => tracing::warn!(error = %e, "malformed cache invalidation message"),
                    },
                    None => break true,
                },
                _ = shutdown.cancelled() => break false,
            }
        }
    };
    if closed || unsubscribe_changes(&mut conn, keys).await.is_err() {
        ListenerPool::discard(conn);
    }
    if closed {
        anyhow::bail!("pub/sub connection closed");
    }
    Ok(())
}
