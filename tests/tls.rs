//! amqps with mutual TLS on both clients, against a RabbitMQ node that
//! requires a client certificate (`scripts/cluster.sh tls-up`: 127.0.0.1:5691,
//! certificates under `/tmp/switchyard-cluster/tls`):
//! `cargo test --features lapin,amqprs --test tls`.
//!
//! With the CA, the client certificate and its key (`RABBITMQ_CA_FILE`,
//! `RABBITMQ_CLIENT_CERT_FILE`, `RABBITMQ_CLIENT_KEY_FILE`) a message goes
//! through; without the client certificate the broker refuses the handshake
//! and connecting fails with `connection_failed`; an unreadable key file is
//! `invalid_config` naming the variable.

use std::path::PathBuf;
use std::time::Duration;

use switchyard::{Admin, ConsumeOptions, Consumer, Destination, Message, Publisher, QueueSpec, Settings, Transport};
use switchyard_amqp::{AmqpClient, AmqpConfig, AmqpTransport};

fn certs() -> PathBuf {
    PathBuf::from(std::env::var("SWITCHYARD_CLUSTER_DIR").unwrap_or_else(|_| "/tmp/switchyard-cluster".into()))
        .join("tls")
}

fn tls_node_up() -> bool {
    if certs().join("client.key").exists() && std::net::TcpStream::connect(("127.0.0.1", 5691)).is_ok() {
        return true;
    }
    if switchyard_core::testkit::rabbitmq_required() {
        panic!("the TLS test node is not running: start it with `scripts/cluster.sh tls-up` (scripts/test.sh does)");
    }
    println!("skipped: the TLS test node is not running (scripts/cluster.sh tls-up)");
    false
}

fn settings(client_cert: bool) -> Settings {
    let d = certs();
    let mut s = Settings::default()
        .with_url("amqps://guest:guest@localhost:5691/")
        .with_ca_file(d.join("ca.pem"))
        .with_connection_attempts(1);
    if client_cert {
        s.client_cert_file = Some(d.join("client.pem"));
        s.client_key_file = Some(d.join("client.key"));
    }
    s.connection_timeout = Duration::from_secs(10);
    s
}

async fn mutual_tls<C: AmqpClient + Default>() {
    if !tls_node_up() {
        return;
    }
    let t = AmqpTransport::<C>::connect_with(AmqpConfig::from_settings(&settings(true)).unwrap())
        .await
        .expect("mutual TLS connects");
    let client = t.name();
    let q = format!("sy-tls-{}", &switchyard_core::message::new_id()[..10]);
    t.declare_queue(&QueueSpec::new(q.as_str())).await.unwrap();
    t.publish(&Destination::queue(q.as_str()), Message::new("over tls"))
        .await
        .unwrap();
    let mut sub = t.consume(&q, ConsumeOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&d.message.body[..], b"over tls");
    d.ack().await.unwrap();
    let _ = sub.close().await;
    t.delete_queue(&q).await.unwrap();
    t.close().await.unwrap();

    let refused = AmqpTransport::<C>::connect_with(AmqpConfig::from_settings(&settings(false)).unwrap())
        .await
        .expect_err("the node requires a client certificate");
    println!("{client}: mutual TLS round trip ok; without a client certificate: {refused}");
    assert_eq!(refused.code(), "connection_failed", "{refused}");
    assert!(!refused.to_string().contains("guest:guest"));

    let mut bad = settings(true);
    bad.client_key_file = Some(certs().join("missing.key"));
    let e = AmqpConfig::from_settings(&bad).unwrap_err();
    assert_eq!(e.code(), "invalid_config");
    assert!(e.to_string().contains("RABBITMQ_CLIENT_KEY_FILE"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_mutual_tls() {
    mutual_tls::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_mutual_tls() {
    mutual_tls::<switchyard::amqprs::AmqprsClient>().await;
}
