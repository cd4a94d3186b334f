//! Graceful shutdown of the real binary: SIGTERM while purchases are in
//! flight answers every one of them, then exits 0.

use std::time::Duration;

use futures_util::future::join_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{test_settings, user_token};
use crate::procs::GatewayProc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_every_in_flight_purchase_and_exits_zero() {
    let settings = test_settings();
    let mut gateway =
        GatewayProc::start(&settings, &[("SECKILL_SHUTDOWN_GRACE_MS", "10000")]).await;
    let id = gateway.active_promotion(10, 1).await;
    let addr = gateway.addr.clone();

    // Twenty purchases whose bodies are only half sent: they are in flight
    // (the handler is reading the body) when the signal arrives.
    let mut conns = Vec::new();
    for user in 1..=20 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /api/promotions/{id}/purchase HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\n\r\n{{",
            user_token(user)
        );
        s.write_all(head.as_bytes()).await.unwrap();
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    kill(Pid::from_raw(gateway.pid()), Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The rest of each body arrives after the signal; each gets its answer.
    let answers = join_all(conns.into_iter().map(|mut s| async move {
        s.write_all(b"}").await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("answered before the grace period ends")
            .expect("the connection is closed cleanly");
        String::from_utf8_lossy(&buf).to_string()
    }))
    .await;
    let ok = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    let gone = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 410"))
        .count();
    println!("in flight at SIGTERM: 20; answered 200: {ok}, 410: {gone}");
    assert_eq!(
        ok + gone,
        20,
        "every in-flight purchase is answered: {answers:?}"
    );
    assert_eq!(ok, 10, "exactly the stock was sold");

    let status = tokio::time::timeout(Duration::from_secs(15), gateway.child.wait())
        .await
        .expect("the gateway exits within the grace period")
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit code 0 after SIGTERM");

    // New connections are refused once it is gone.
    assert!(TcpStream::connect(&addr).await.is_err());
}
