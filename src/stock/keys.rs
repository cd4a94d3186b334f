//! Every Redis key name, built in one place from the deployment's prefix.
//!
//! All keys of one promotion share the hash tag `{P:p:ID}`, so one Lua script
//! may touch them all and the layout already fits Redis Cluster. A promotion
//! split into buckets (see `stock::buckets`) keeps that tag for bucket 0, so
//! `buckets: 1` is the layout of before, and uses `{P:p:ID:bK}` for bucket
//! `K` ≥ 1, with the same key names under it.

/// Key names under one prefix (`SECKILL_KEY_PREFIX`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one promotion, in the order the scripts take them.
#[derive(Debug, Clone)]
pub struct PromotionKeys {
    /// Hash: window, limit, price, initial stock, `sold`, `returned`.
    pub meta: String,
    /// String: units left on sale.
    pub stock: String,
    /// Hash: user id → units bought.
    pub buyers: String,
    /// Stream: order messages for the workers.
    pub orders: String,
    /// Hash: user id → order id of the buyer's latest purchase.
    pub results: String,
    /// Set: ids of the orders whose unit came back (cancelled or expired).
    pub returned: String,
    /// Hash: user id → 1 for each buyer admitted with a token.
    pub tokens: String,
    /// Hash: order id → user id of every order the purchase script
    /// accepted, so a replayed call (a lost reply, a client's resend) takes
    /// nothing twice, and pay and cancel know an order on its way.
    pub won: String,
    /// String: the token of the recovery rebuilding this promotion, with a
    /// TTL; recovery's writes are refused unless it still holds it.
    pub recovering: String,
    /// Hash (source bucket): transfer id → `units:destination:state` of
    /// every transfer out of this bucket; state 0 in transit, 1 done.
    pub transfers: String,
    /// Hash (destination bucket): transfer id → `units:source` of every
    /// transfer this bucket received.
    pub received: String,
    tag: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of promotion `id`.
    pub fn promotion(&self, id: i64) -> PromotionKeys {
        self.bucket(id, 0)
    }

    /// The keys of bucket `bucket` of promotion `id`: bucket 0 is
    /// [`Keys::promotion`], the others have a hash tag each.
    pub fn bucket(&self, id: i64, bucket: u32) -> PromotionKeys {
        let tag = if bucket == 0 {
            format!("{{{}:p:{id}}}", self.prefix)
        } else {
            format!("{{{}:p:{id}:b{bucket}}}", self.prefix)
        };
        PromotionKeys {
            meta: format!("{tag}:meta"),
            stock: format!("{tag}:stock"),
            buyers: format!("{tag}:buyers"),
            orders: format!("{tag}:orders"),
            results: format!("{tag}:results"),
            returned: format!("{tag}:returned"),
            tokens: format!("{tag}:tokens"),
            won: format!("{tag}:won"),
            recovering: format!("{tag}:recovering"),
            transfers: format!("{tag}:transfers"),
            received: format!("{tag}:received"),
            tag,
        }
    }

    /// String: a captcha challenge of promotion `id` (expires with it).
    pub fn captcha(&self, id: i64, challenge: &str) -> String {
        format!("{}:captcha:{challenge}", self.promotion(id).tag)
    }

    /// Set of the ids of promotions whose streams the workers read.
    pub fn live_promotions(&self) -> String {
        format!("{}:promotions", self.prefix)
    }

    /// Pub/sub channel on which a promotion id is published when its stock
    /// came back or it was edited: every gateway drops its cached view of it.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Stream of order messages that could not be parsed, kept for a person.
    pub fn dead_letters(&self) -> String {
        format!("{}:deadletter", self.prefix)
    }

    /// The consumer group every order worker joins.
    pub fn consumer_group(&self) -> &'static str {
        "order-workers"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_keys_share_one_hash_tag() {
        let k = Keys::new("sk").promotion(7);
        for key in [
            &k.meta,
            &k.stock,
            &k.buyers,
            &k.orders,
            &k.results,
            &k.returned,
            &k.tokens,
            &k.won,
            &k.recovering,
        ] {
            assert!(key.starts_with("{sk:p:7}:"), "{key}");
        }
        assert_eq!(k.stock, "{sk:p:7}:stock");
    }

    #[test]
    fn bucket_zero_is_the_promotion_and_others_have_a_tag_each() {
        let keys = Keys::new("sk");
        let (p, b0) = (keys.promotion(7), keys.bucket(7, 0));
        assert_eq!(
            (&p.meta, &p.stock, &p.buyers, &p.orders, &p.results),
            (&b0.meta, &b0.stock, &b0.buyers, &b0.orders, &b0.results)
        );
        assert_eq!(p.meta, "{sk:p:7}:meta");
        let b3 = keys.bucket(7, 3);
        assert_eq!(b3.stock, "{sk:p:7:b3}:stock");
        assert_eq!(b3.orders, "{sk:p:7:b3}:orders");
        assert_eq!(b3.transfers, "{sk:p:7:b3}:transfers");
    }
}
