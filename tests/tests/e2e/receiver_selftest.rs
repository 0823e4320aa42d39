//! The independent webhook receiver agrees with our signer: a request signed with
//! `WebhookSecret` verifies, a tampered or wrongly keyed one gets 401. Needs only python3.

use std::time::Duration;

use capibara_shared::domain::webhook::WebhookSecret;
use capibara_tests::receiver::{Receiver, ReceiverOptions};

async fn send(
    url: &str,
    secret: &WebhookSecret,
    msg_id: &str,
    ts: i64,
    signed_body: &[u8],
    sent_body: &[u8],
) -> u16 {
    let sig = secret.sign(msg_id, ts, signed_body);
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(sent_body.to_vec())
        .send()
        .await
        .expect("post to receiver")
        .status()
        .as_u16()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn receiver_verifies_our_signatures() {
    let (secret, encoded) = WebhookSecret::generate();
    let rx = Receiver::start(&[&encoded], ReceiverOptions::default());
    let url = format!("{}/hooks/a", rx.url);
    let body = br#"{"type":"job.succeeded","data":{"id":"j1"}}"#;

    assert_eq!(send(&url, &secret, "msg_1", now(), body, body).await, 200);
    // Tampered body.
    let tampered = br#"{"type":"job.succeeded","data":{"id":"j2"}}"#;
    assert_eq!(
        send(&url, &secret, "msg_2", now(), body, tampered).await,
        401
    );
    // Another key.
    let (other, _) = WebhookSecret::generate();
    assert_eq!(send(&url, &other, "msg_3", now(), body, body).await, 401);
    // Outside the timestamp tolerance.
    assert_eq!(
        send(&url, &secret, "msg_4", now() - 3600, body, body).await,
        401
    );

    let reqs = rx.wait_requests(4, Duration::from_secs(5)).await;
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0]["verified"], true);
    assert_eq!(reqs[0]["path"], "/hooks/a");
    assert_eq!(reqs[0]["webhook_id"], "msg_1");
    assert_eq!(reqs[0]["status_returned"], 200);
    assert_eq!(reqs[0]["body"]["data"]["id"], "j1");
    for r in &reqs[1..] {
        assert_eq!(r["verified"], false, "{r}");
        assert_eq!(r["status_returned"], 401, "{r}");
    }
    assert_eq!(reqs[3]["reason"], "timestamp too old");
}

#[tokio::test]
async fn receiver_rotated_secrets_and_scripted_failures() {
    let (old, old_s) = WebhookSecret::generate();
    let (new, new_s) = WebhookSecret::generate();
    let rx = Receiver::start(
        &[&old_s, &new_s],
        ReceiverOptions {
            fail_first: Some(2),
            status_after: Some(204),
            ..Default::default()
        },
    );
    let body = br#"{"n":1}"#;
    // A header with two signatures, the second by a key the receiver knows.
    let (unknown, _) = WebhookSecret::generate();
    let ts = now();
    let header = format!(
        "{} {}",
        unknown.sign("m1", ts, body),
        new.sign("m1", ts, body)
    );
    let status = reqwest::Client::new()
        .post(&rx.url)
        .header("webhook-id", "m1")
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", header)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 500, "first verified request fails");
    assert_eq!(send(&rx.url, &old, "m2", now(), body, body).await, 500);
    assert_eq!(send(&rx.url, &old, "m3", now(), body, body).await, 204);
    // A bad signature does not use up the scripted failures and always gets 401.
    assert_eq!(send(&rx.url, &unknown, "m4", now(), body, body).await, 401);
    assert_eq!(send(&rx.url, &new, "m5", now(), body, body).await, 204);

    let statuses: Vec<i64> = rx
        .requests()
        .iter()
        .map(|r| r["status_returned"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, vec![500, 500, 204, 401, 204]);
}
