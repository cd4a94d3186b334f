//! Rate limits (governor): a global ceiling on purchases that protects
//! Redis, one per user (from the JWT) and one per client IP; and a budget of
//! failed admin authentications per client IP.
//!
//! The client IP is the TCP peer, unless the peer is a trusted proxy (nginx):
//! then it is taken from `X-Forwarded-For` (the right-most address that is not
//! itself a trusted proxy) or `X-Real-IP`. A limiter's verdict is always
//! acted on: a refusal is a [`RateLimited`] the caller turns into `429`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::HeaderMap;
use ipnet::IpNet;

/// A request refused by a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// Which limit: `global`, `user`, `ip` or `admin`.
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
    /// Failed admin authentications per client IP. While an address's
    /// budget is spent, every admin request from it is refused, the right
    /// token included: a guess that passed would otherwise stand out among
    /// the refusals. Pruned like `per_user`.
    admin_failures: Option<FailureBudget<IpAddr>>,
    /// Failed logins, per client address and per account name.
    login_failures: Option<(FailureBudget<IpAddr>, FailureBudget<String>)>,
    trusted_proxies: Vec<IpNet>,
    clock: DefaultClock,
}

/// A GCRA budget of failures per key: `burst` failures at once, then one per
/// `interval`. Unlike governor's limiters it can be asked whether a key is
/// blocked without spending anything, because a success must not cost.
struct FailureBudget<K> {
    interval: Duration,
    /// `interval` × the burst: how far ahead of now the theoretical arrival
    /// time may run.
    window: Duration,
    /// The theoretical arrival time of each key's next failure.
    tat: Mutex<HashMap<K, Instant>>,
}

impl<K: std::hash::Hash + Eq> FailureBudget<K> {
    /// `per_minute` failures a minute, with a burst of the same size.
    fn per_minute(per_minute: u32) -> Option<Self> {
        let n = NonZeroU32::new(per_minute)?;
        let window = Duration::from_secs(60);
        Some(FailureBudget {
            interval: window / n.get(),
            window,
            tat: Mutex::new(HashMap::new()),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, Instant>> {
        self.tat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `key` stays blocked, if its budget is spent.
    fn blocked(&self, key: &K, now: Instant) -> Option<Duration> {
        let tat = *self.entries().get(key)?;
        let ahead = tat.max(now) + self.interval - now;
        ahead.checked_sub(self.window).filter(|d| !d.is_zero())
    }

    /// Spends one failure of `key`'s budget.
    fn record(&self, key: K, now: Instant) {
        let mut entries = self.entries();
        let tat = entries.entry(key).or_insert(now);
        *tat = (*tat).max(now) + self.interval;
    }

    /// Spends one failure of `key`'s budget ahead of time, unless it is
    /// spent already (then how long it stays blocked). A success gives it
    /// back with [`FailureBudget::refund`], so concurrent attempts cannot
    /// all pass the check before any of them has failed.
    fn reserve(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut entries = self.entries();
        let tat = entries.entry(key).or_insert(now);
        let next = (*tat).max(now) + self.interval;
        match (next - now)
            .checked_sub(self.window)
            .filter(|d| !d.is_zero())
        {
            Some(wait) => Err(wait),
            None => {
                *tat = next;
                Ok(())
            }
        }
    }

    /// Gives back a failure reserved for an attempt that succeeded.
    fn refund(&self, key: &K) {
        if let Some(tat) = self.entries().get_mut(key) {
            *tat = tat.checked_sub(self.interval).unwrap_or(*tat);
        }
    }

    /// Forgets keys whose budget is whole again.
    fn prune(&self, now: Instant) {
        let mut entries = self.entries();
        entries.retain(|_, tat| *tat > now);
        entries.shrink_to_fit();
    }

    /// Keys held (the pruning test counts them).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries().len()
    }
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
            admin_failures: None,
            login_failures: None,
            trusted_proxies,
            clock: DefaultClock::default(),
        }
    }

    /// Limits failed admin authentications to `per_minute` per client IP,
    /// with a burst of the same size (0: no limit).
    pub fn with_admin_failures(mut self, per_minute: u32) -> Self {
        self.admin_failures = FailureBudget::per_minute(per_minute);
        self
    }

    /// Limits failed logins to `per_minute` per client IP and per account
    /// name, each with a burst of the same size (0: no limit).
    pub fn with_login_failures(mut self, per_minute: u32) -> Self {
        self.login_failures =
            FailureBudget::per_minute(per_minute).zip(FailureBudget::per_minute(per_minute));
        self
    }

    /// Reserves one failed login from `ip` for `username` before the
    /// password is checked; refused while either budget is spent. Give it
    /// back with [`Limits::login_succeeded`] when the password was right.
    pub fn reserve_login(&self, ip: IpAddr, username: &str) -> Result<(), RateLimited> {
        let Some((by_ip, by_name)) = &self.login_failures else {
            return Ok(());
        };
        let now = Instant::now();
        by_ip
            .reserve(canonical(ip), now)
            .map_err(|wait| self.refused("login", wait))?;
        if let Err(wait) = by_name.reserve(username.to_string(), now) {
            by_ip.refund(&canonical(ip));
            return Err(self.refused("login", wait));
        }
        Ok(())
    }

    /// A login reserved with [`Limits::reserve_login`] succeeded: it costs
    /// nothing.
    pub fn login_succeeded(&self, ip: IpAddr, username: &str) {
        if let Some((by_ip, by_name)) = &self.login_failures {
            by_ip.refund(&canonical(ip));
            by_name.refund(&username.to_string());
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

    /// Refuses every admin request from `ip` while its budget of failed
    /// admin authentications is spent.
    pub fn check_admin(&self, ip: IpAddr) -> Result<(), RateLimited> {
        match &self.admin_failures {
            Some(budget) => match budget.blocked(&canonical(ip), Instant::now()) {
                Some(wait) => Err(self.refused("admin", wait)),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Counts a failed admin authentication from `ip`.
    pub fn admin_failed(&self, ip: IpAddr) {
        if let Some(budget) = &self.admin_failures {
            budget.record(canonical(ip), Instant::now());
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
        let now = Instant::now();
        if let Some(b) = &self.admin_failures {
            b.prune(now);
        }
        if let Some((by_ip, by_name)) = &self.login_failures {
            by_ip.prune(now);
            by_name.prune(now);
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

    #[test]
    fn admin_failures_block_the_address_once_the_burst_is_spent_and_successes_cost_nothing() {
        let budget = FailureBudget::per_minute(3).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        // Asking costs nothing.
        for _ in 0..10 {
            assert_eq!(budget.blocked(&a, t0), None);
        }
        for _ in 0..3 {
            assert_eq!(budget.blocked(&a, t0), None);
            budget.record(a, t0);
        }
        // The budget is spent: blocked until one failure's worth (20 s) is back.
        let wait = budget.blocked(&a, t0).expect("blocked after 3 failures");
        assert_eq!(wait, Duration::from_secs(20));
        assert_eq!(budget.blocked(&b, t0), None, "another address is not");
        assert!(budget.blocked(&a, t0 + Duration::from_secs(19)).is_some());
        assert_eq!(budget.blocked(&a, t0 + Duration::from_secs(20)), None);
        // Pruning keeps it while it still counts, forgets it once whole.
        budget.prune(t0 + Duration::from_secs(59));
        assert_eq!(budget.len(), 1);
        budget.prune(t0 + Duration::from_secs(60));
        assert_eq!(budget.len(), 0);
    }

    #[test]
    fn a_blocked_address_is_refused_as_admin_with_a_retry_after() {
        let limits = Limits::new(0, 0, 0, vec![]).with_admin_failures(2);
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        // IPv4-mapped IPv6 is the same address.
        let mapped: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        limits.admin_failed(ip);
        assert!(limits.check_admin(ip).is_ok());
        limits.admin_failed(mapped);
        let refused = limits.check_admin(ip).unwrap_err();
        assert_eq!(refused.limit, "admin");
        assert!(refused.retry_after_secs >= 1);
        let off = Limits::new(0, 0, 0, vec![]);
        for _ in 0..100 {
            off.admin_failed(ip);
        }
        assert!(off.check_admin(ip).is_ok());
    }
}
