//! Pause points: named places in the workflows (recovery, reconcile, a
//! cancel, a bucket refill) where a test can hold the code, to force an
//! interleaving instead of hoping a sleep wins a race.
//!
//! A point is armed for one key prefix (each test has its own), so parallel
//! tests never hold each other's code. An armed point holds the first task
//! that reaches it until the test releases it; later arrivals pass. With
//! nothing armed, reaching a point costs one uncontended lock and an empty
//! scan. The one point on the purchase path (a bucketed promotion's refill
//! finding units in transit) is off its common case.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

/// The armed points: (scope, name) and what the held task waits on.
type Armed = Vec<(String, &'static str, Arc<Gate>)>;

static ARMED: Mutex<Armed> = Mutex::new(Vec::new());

struct Gate {
    reached: Notify,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

/// A point armed by a test: learn when code reached it, then release it.
pub struct Hold {
    gate: Arc<Gate>,
    release: Option<oneshot::Sender<()>>,
}

impl Hold {
    /// Completes once a task is held at the point.
    pub async fn reached(&self) {
        self.gate.reached.notified().await;
    }

    /// Lets the held task go on (dropping the hold does the same).
    pub fn release(mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

/// Arms point `name` for the keys under `scope` (a key prefix).
pub fn arm(scope: &str, name: &'static str) -> Hold {
    let (tx, rx) = oneshot::channel();
    let gate = Arc::new(Gate {
        reached: Notify::new(),
        release: Mutex::new(Some(rx)),
    });
    ARMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((scope.to_string(), name, gate.clone()));
    Hold {
        gate,
        release: Some(tx),
    }
}

/// Marks point `name` in the workflow running under `scope`: held there if a
/// test armed it, else passes at once.
pub async fn point(scope: &str, name: &'static str) {
    let gate = {
        let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
        match armed.iter().position(|(s, n, _)| s == scope && *n == name) {
            Some(i) => armed.swap_remove(i).2,
            None => return,
        }
    };
    let release = gate
        .release
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    gate.reached.notify_one();
    if let Some(rx) = release {
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_armed_point_holds_the_first_arrival_until_released() {
        let hold = arm("scope-a", "step");
        let held = tokio::spawn(point("scope-a", "step"));
        hold.reached().await;
        // Other scopes and later arrivals pass.
        point("scope-b", "step").await;
        point("scope-a", "step").await;
        assert!(!held.is_finished());
        hold.release();
        held.await.unwrap();
    }
}
