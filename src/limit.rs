//! Rate limits (governor): a global ceiling on purchases that protects
//! Redis, one per user (from the JWT) and one per client IP.
//!
//! The client IP is the TCP peer, unless the peer is a trusted proxy (nginx):
//! then it is taken from `X-Forwarded-For` (the right-most address that is not
//! itself a trusted proxy) or `X-Real-IP`. A limiter's verdict is always
//! acted on: a refusal is a [`RateLimited`] the caller turns into `429`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::HeaderMap;
use ipnet::IpNet;

/// A request refused by a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// Which limit: `global`, `user` or `ip`.
    pub limit: &'static str,
    /// Whole seconds until a retry can pass (at least 1).
    pub retry_after_secs: u64,
}

/// The limits of one gateway. A limit configured as 0 is off.
pub struct Limits {
    /// Purchases per second reaching Redis from this gateway.
    global: Option<DefaultDirectRateLimiter>,
    /// Requests per second per user on the sale routes. Grows with every
    /// distinct user: [`Limits::prune`] runs on a timer.
    per_user: Option<DefaultKeyedRateLimiter<i64>>,
    /// Requests per second per client IP on `/api`. Pruned like `per_user`.
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_proxies: Vec<IpNet>,
    clock: DefaultClock,
}

/// A quota of `per_second` with a burst of the same size.
fn quota(per_second: u32) -> Option<Quota> {
    NonZeroU32::new(per_second).map(Quota::per_second)
}

impl Limits {
    pub fn new(global: u32, per_user: u32, per_ip: u32, trusted_proxies: Vec<IpNet>) -> Self {
        Limits {
            global: quota(global).map(RateLimiter::direct),
            per_user: quota(per_user).map(RateLimiter::keyed),
            per_ip: quota(per_ip).map(RateLimiter::keyed),
            trusted_proxies,
            clock: DefaultClock::default(),
        }
    }

    fn refused(&self, limit: &'static str, wait: Duration) -> RateLimited {
        metrics::counter!("seckill_rate_limited_total", "limit" => limit).increment(1);
        RateLimited {
            limit,
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    /// One purchase towards Redis.
    pub fn check_global(&self) -> Result<(), RateLimited> {
        match &self.global {
            Some(l) => l
                .check()
                .map_err(|n| self.refused("global", n.wait_time_from(self.clock.now()))),
            None => Ok(()),
        }
    }

    pub fn check_user(&self, user_id: i64) -> Result<(), RateLimited> {
        match &self.per_user {
            Some(l) => l
                .check_key(&user_id)
                .map_err(|n| self.refused("user", n.wait_time_from(self.clock.now()))),
            None => Ok(()),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), RateLimited> {
        match &self.per_ip {
            Some(l) => l
                .check_key(&ip)
                .map_err(|n| self.refused("ip", n.wait_time_from(self.clock.now()))),
            None => Ok(()),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, or the forwarded one when the peer
    /// is a trusted proxy.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer_ip = canonical(peer.ip());
        if !self.is_trusted(peer_ip) {
            return peer_ip;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .map(canonical)
            .collect::<Vec<_>>();
        // Right to left: the first address our own proxies did not add.
        if let Some(ip) = forwarded.iter().rev().find(|ip| !self.is_trusted(**ip)) {
            return *ip;
        }
        headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .map(canonical)
            .unwrap_or(peer_ip)
    }

    /// Forgets keys whose limit has fully replenished, and gives the memory
    /// back: without it a keyed limiter grows with every distinct key.
    pub fn prune(&self) {
        if let Some(l) = &self.per_user {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys held by the per-user and per-IP limiters.
    pub fn tracked_keys(&self) -> (usize, usize) {
        (
            self.per_user.as_ref().map_or(0, |l| l.len()),
            self.per_ip.as_ref().map_or(0, |l| l.len()),
        )
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_a_trusted_peer() {
        let limits = Limits::new(0, 0, 0, nets(&["10.0.0.0/8", "127.0.0.1/32"]));
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let h = headers("203.0.113.9, 10.1.2.3");
        assert_eq!(
            limits.client_ip(proxy, &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            limits.client_ip(stranger, &h),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_spoofed_left_most_address_is_ignored() {
        let limits = Limits::new(0, 0, 0, nets(&["127.0.0.1/32"]));
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        // The client sent "1.1.1.1"; nginx appended the real peer.
        let h = headers("1.1.1.1, 198.51.100.4");
        assert_eq!(
            limits.client_ip(proxy, &h),
            "198.51.100.4".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn per_user_limit_refuses_past_the_burst_with_a_retry_after() {
        let limits = Limits::new(0, 3, 0, vec![]);
        for _ in 0..3 {
            assert!(limits.check_user(1).is_ok());
        }
        let refused = limits.check_user(1).unwrap_err();
        assert_eq!(refused.limit, "user");
        assert!(refused.retry_after_secs >= 1);
        assert!(
            limits.check_user(2).is_ok(),
            "another user has a budget of their own"
        );
    }

    #[test]
    fn pruning_forgets_replenished_keys() {
        let limits = Limits::new(0, 1000, 1000, vec![]);
        for user in 0..100_000 {
            let _ = limits.check_user(user);
        }
        assert_eq!(limits.tracked_keys().0, 100_000);
        // One request of a 1000/s budget is back within a millisecond.
        std::thread::sleep(Duration::from_millis(20));
        limits.prune();
        assert_eq!(limits.tracked_keys().0, 0);
    }
}
