//! Accounts: buyers who register a username and password and log in for the
//! JWT the user routes take.
//!
//! Passwords are hashed with Argon2id and its recommended parameters, on
//! threads of their own, one per core (a hash takes tens of milliseconds of
//! CPU, which must not stall the gateway's runtime). A login for an unknown username
//! verifies the password against a fixed hash all the same, so the answer
//! takes as long as for a wrong password and tells nothing about which
//! usernames exist.

pub mod repo;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sqlx::PgPool;
use tokio::sync::Semaphore;

/// How long a login or registration waits for a hashing slot before it is
/// answered `503`.
const HASH_WAIT: Duration = Duration::from_secs(2);

/// Why an account request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// A field breaks its rule; the message names it.
    #[error("{0}")]
    Invalid(String),
    #[error("the username is taken")]
    UsernameTaken,
    /// Every hashing slot stayed busy: try again.
    #[error("too many logins at once")]
    Busy,
    /// Unknown username or wrong password: the same answer for both.
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Usernames: 3 to 64 of `a-z 0-9 _ . -` (API.md).
pub fn check_username(username: &str) -> Result<(), AccountError> {
    let valid = (3..=64).contains(&username.len())
        && username
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(AccountError::Invalid(
            "`username` must be 3 to 64 characters of a-z, 0-9, `_`, `.` and `-`".into(),
        ))
    }
}

/// Passwords: 8 to 128 characters (API.md).
pub fn check_password(password: &str) -> Result<(), AccountError> {
    if (8..=128).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(AccountError::Invalid(
            "`password` must be 8 to 128 characters".into(),
        ))
    }
}

/// A hash no password is known to match, verified for unknown usernames.
static DECOY: LazyLock<String> = LazyLock::new(|| {
    Argon2::default()
        .hash_password(b"no account has this password, it only takes the time")
        .expect("argon2 hashes with its default parameters")
        .to_string()
});

/// A job for the hashing threads.
type Job = Box<dyn FnOnce() + Send>;

/// The threads that hash: one per core, for the life of the process. An
/// Argon2id hash allocates 19 MiB; on threads of their own those blocks are
/// reused from one hash to the next, where tokio's blocking pool would spread
/// them over many threads' allocator arenas and keep them all.
static HASHERS: LazyLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = LazyLock::new(|| {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for n in 0..hashing_slots() {
        let rx = Arc::clone(&rx);
        std::thread::Builder::new()
            .name(format!("seckill-argon2-{n}"))
            .spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })
            .expect("a hashing thread starts");
    }
    std::sync::Mutex::new(tx)
});

/// Hashes running at once: one per core.
fn hashing_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` on a hashing thread.
async fn on_hasher<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    HASHERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| anyhow::anyhow!("the hashing threads are gone"))?;
    rx.await.context("a hashing job ended without an answer")
}

/// Hashes `password` on a hashing thread.
async fn hash(password: String) -> anyhow::Result<String> {
    on_hasher(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))
    })
    .await?
}

/// Whether `password` matches the PHC string `hash`, on a hashing thread.
async fn verify(password: String, hash: String) -> anyhow::Result<bool> {
    on_hasher(move || {
        let parsed = PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await?
}

/// The account workflows.
#[derive(Clone)]
pub struct Accounts {
    db: PgPool,
    /// Hashes running at once: one per core, so a storm of logins takes the
    /// CPU of its slots and no more, and the sale keeps the rest.
    hashing: Arc<Semaphore>,
}

impl Accounts {
    pub fn new(db: PgPool) -> Self {
        Accounts {
            db,
            hashing: Arc::new(Semaphore::new(hashing_slots())),
        }
    }

    /// Runs one hashing job in a slot.
    async fn in_slot<T>(
        &self,
        job: impl Future<Output = anyhow::Result<T>>,
    ) -> Result<T, AccountError> {
        let _slot = tokio::time::timeout(HASH_WAIT, self.hashing.acquire())
            .await
            .map_err(|_| AccountError::Busy)?
            .context("the hashing slots are closed")?;
        Ok(job.await?)
    }

    /// Creates an account; returns its user id.
    pub async fn register(&self, username: &str, password: &str) -> Result<i64, AccountError> {
        check_username(username)?;
        check_password(password)?;
        let hashed = self.in_slot(hash(password.to_string())).await?;
        repo::insert(&self.db, username, &hashed)
            .await?
            .ok_or(AccountError::UsernameTaken)
    }

    /// The user id of `username` when `password` is right.
    pub async fn login(&self, username: &str, password: &str) -> Result<i64, AccountError> {
        // A username no registration could accept names no account: it is
        // not looked up (PostgreSQL refuses text with a NUL byte, which
        // would be a 500), only checked against the decoy like any unknown
        // one, so the answer and its time are the same.
        let account = match check_username(username) {
            Ok(()) => repo::find(&self.db, username).await?,
            Err(_) => None,
        };
        let (id, stored) = match account {
            Some(a) => (Some(a.id), a.password_hash),
            None => (None, DECOY.clone()),
        };
        let matches = self.in_slot(verify(password.to_string(), stored)).await?;
        match id {
            Some(id) if matches => Ok(id),
            _ => Err(AccountError::InvalidCredentials),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_and_passwords_follow_the_contract() {
        for ok in ["abc", "buyer_42", "a.b-c", &"x".repeat(64)] {
            assert!(check_username(ok).is_ok(), "{ok}");
        }
        for bad in ["ab", "Abc", "a b", "ü-ser", &"x".repeat(65), ""] {
            assert!(check_username(bad).is_err(), "{bad}");
        }
        assert!(check_password("12345678").is_ok());
        assert!(check_password("1234567").is_err());
        assert!(check_password(&"p".repeat(129)).is_err());
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let h = hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify("correct horse".into(), h.clone()).await.unwrap());
        assert!(!verify("wrong horse".into(), h).await.unwrap());
        assert!(!verify("anything".into(), DECOY.clone()).await.unwrap());
    }
}
