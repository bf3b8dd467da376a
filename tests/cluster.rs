//! Failover on a real three-node RabbitMQ cluster (`scripts/cluster.sh up`,
//! nodes on 127.0.0.1:5681–5683), on both clients:
//! `cargo test --features lapin,amqprs --test cluster`.
//!
//! 20,000 persistent messages go through a quorum queue while a publisher and
//! a Worker, each given all three addresses, run; the node the clients are
//! connected to is stopped, later started again, then another is stopped.
//! Every id is counted (lost, duplicated) and the counts printed. Also: an
//! address list whose first node is down connects to the next, and bad
//! address lists are clear errors that never print a password.
//!
//! With `SWITCHYARD_REQUIRE_RABBITMQ=1` (scripts/test.sh, which starts the
//! cluster) a missing cluster fails the tests; otherwise they say "skipped".

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use switchyard::settings::AddressOrder;
use switchyard::worker::{RouteConfig, Worker};
use switchyard::{handler_fn, Admin, Destination, Envelope, Message, Publisher, QueueSpec, Settings, Transport};
use switchyard_amqp::{AmqpClient, AmqpConfig, AmqpTransport};

const NODES: [u16; 3] = [5681, 5682, 5683];

fn cluster_url() -> String {
    NODES
        .iter()
        .map(|p| format!("amqp://guest:guest@127.0.0.1:{p}/"))
        .collect::<Vec<_>>()
        .join(",")
}

fn cluster_up() -> bool {
    NODES
        .iter()
        .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
}

fn require_cluster() -> bool {
    if cluster_up() {
        return true;
    }
    if switchyard_core::testkit::rabbitmq_required() {
        panic!("the test cluster is not running: start it with `scripts/cluster.sh up` (scripts/test.sh does)");
    }
    println!("skipped: the test cluster is not running (scripts/cluster.sh up)");
    false
}

fn cluster(args: &[&str]) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
        .args(args)
        .output()
        .expect("run scripts/cluster.sh");
    assert!(
        out.status.success(),
        "cluster.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node number (1–3) of `host:port`.
fn node_of(address: &str) -> usize {
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    NODES.iter().position(|p| *p == port).expect("a cluster port") + 1
}

async fn connect<C: AmqpClient + Default>(name: &str, order: AddressOrder) -> AmqpTransport<C> {
    let mut settings = Settings::default()
        .with_url(cluster_url())
        .with_connection_attempts(3)
        .with_retry_delay(Duration::from_millis(500));
    settings.address_order = order;
    let mut config = AmqpConfig::from_settings(&settings).unwrap().connection_name(name);
    config.recovery.publish_wait_timeout = Duration::from_secs(60);
    AmqpTransport::<C>::connect_with(config)
        .await
        .expect("connect to the cluster")
}

async fn wait_moved<C: AmqpClient>(t: &AmqpTransport<C>, away_from: usize, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(a) = t.connected_address() {
            if node_of(&a) != away_from && t.publish_address().is_some_and(|p| node_of(&p) != away_from) {
                return a;
            }
        }
        assert!(Instant::now() < deadline, "{what} did not move off node {away_from}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn failover<C: AmqpClient + Default>() {
    if !require_cluster() {
        return;
    }
    let _serial = SERIAL.lock().await;
    cluster(&["start", "1"]);
    cluster(&["start", "2"]);
    cluster(&["start", "3"]);
    let producer = connect::<C>("switchyard cluster producer", AddressOrder::InOrder).await;
    let consumer = connect::<C>("switchyard cluster consumer", AddressOrder::InOrder).await;
    let client = producer.name();
    let queue = format!("sy-cluster-{}", &switchyard_core::message::new_id()[..10]);
    producer
        .declare_queue(&QueueSpec::new(queue.as_str()).queue_type(switchyard::QueueType::Quorum))
        .await
        .unwrap();

    let seen: Arc<Mutex<(HashSet<u32>, usize)>> = Arc::default();
    let s2 = seen.clone();
    let handler = handler_fn(move |env: Envelope| {
        let seen = s2.clone();
        async move {
            let id: u32 = std::str::from_utf8(env.body()).unwrap().parse().unwrap();
            let mut g = seen.lock();
            if !g.0.insert(id) {
                g.1 += 1;
            }
            Ok::<_, switchyard::HandlerError>(())
        }
    });
    let handle = Worker::new(Arc::new(consumer.clone()))
        .route_with(queue.as_str(), handler, RouteConfig::default().prefetch(100))
        .start()
        .await
        .unwrap();

    const N: u32 = 20_000;
    let confirmed = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let publishing = {
        let (p, q, confirmed, retried) = (producer.clone(), queue.clone(), confirmed.clone(), retried.clone());
        tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (p, q, confirmed, retried, next) =
                    (p.clone(), q.clone(), confirmed.clone(), retried.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let id = next.fetch_add(1, Ordering::AcqRel) as u32;
                        if id >= N {
                            return;
                        }
                        // At least once: a publish that failed is sent again.
                        while p
                            .publish(&Destination::queue(q.as_str()), Message::new(id.to_string()))
                            .await
                            .is_err()
                        {
                            retried.fetch_add(1, Ordering::AcqRel);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        confirmed.fetch_add(1, Ordering::AcqRel);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };

    // Stop the node the consumer is on once a quarter is through.
    while confirmed.load(Ordering::Acquire) < (N / 4) as usize {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = node_of(&consumer.connected_address().expect("connected"));
    let at_first = confirmed.load(Ordering::Acquire);
    cluster(&["stop", &first.to_string()]);
    let moved_to = wait_moved(&consumer, first, "the consumer").await;
    wait_moved(&producer, first, "the producer").await;
    // Bring it back, then stop the node the consumer moved to.
    cluster(&["start", &first.to_string()]);
    while confirmed.load(Ordering::Acquire) < (3 * N / 4) as usize {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = node_of(&moved_to);
    let at_second = confirmed.load(Ordering::Acquire);
    cluster(&["stop", &second.to_string()]);
    let finally_on = wait_moved(&consumer, second, "the consumer").await;
    publishing.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.lock().0.len() < N as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (unique, dups) = {
        let g = seen.lock();
        (g.0.len(), g.1)
    };
    let elapsed = started.elapsed();
    cluster(&["start", &second.to_string()]);
    let _ = handle.shutdown().await;
    let _ = producer.delete_queue(&queue).await;
    let _ = producer.close().await;
    let _ = consumer.close().await;
    println!(
        "{client} cluster failover: {N} published ({} publish retries), stopped node {first} at {at_first} confirmed \
         (moved to {moved_to}), node {second} at {at_second} (moved to {finally_on}); {unique}/{N} received, \
         {} lost, {dups} duplicates, {elapsed:?}; consumer reconnects {}, producer reconnects {}",
        retried.load(Ordering::Acquire),
        N as usize - unique,
        consumer.state_watch().generation() - 1,
        producer.publish_state_watch().generation() - 1,
    );
    assert_eq!(unique, N as usize, "{client}: messages lost across the failovers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_failover_loses_nothing() {
    failover::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_failover_loses_nothing() {
    failover::<switchyard::amqprs::AmqprsClient>().await;
}

async fn first_node_down<C: AmqpClient + Default>() {
    if !require_cluster() {
        return;
    }
    let _serial = SERIAL.lock().await;
    // Port 5699 is not a node: the first address refuses, the next answers.
    let url = format!("amqp://guest:guest@127.0.0.1:5699/,{}", cluster_url());
    let mut settings = Settings::default().with_url(url).with_connection_attempts(1);
    settings.address_order = AddressOrder::InOrder;
    let t = AmqpTransport::<C>::connect_with(AmqpConfig::from_settings(&settings).unwrap())
        .await
        .expect("the next node answers");
    let at = t.connected_address().unwrap();
    println!("{}: first address down, connected to {at}", t.name());
    assert_ne!(at, "127.0.0.1:5699");
    t.health_check().await.unwrap();
    let _ = t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_connects_to_the_next_node_when_the_first_is_down() {
    first_node_down::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_connects_to_the_next_node_when_the_first_is_down() {
    first_node_down::<switchyard::amqprs::AmqprsClient>().await;
}

#[test]
fn bad_address_lists_are_clear_errors_without_passwords() {
    let cases = [
        ("amqp://app:s3cret@a:5672/,,amqp://app:s3cret@b:5672/", "entry 2"),
        ("amqp://app:s3cret@a:5672/,http://app:s3cret@b/", "scheme"),
        ("amqp://app:s3cret@a:5672/prod,amqp://app:s3cret@b:5672/test", "vhost"),
        ("amqp://app:s3cret@a:5672/,amqp://other:s3cret@b:5672/", "credentials"),
    ];
    for (url, says) in cases {
        let e = Settings::from_lookup(|k| (k == "RABBITMQ_URL").then(|| url.to_owned())).unwrap_err();
        let text = e.to_string();
        println!("{url:?} -> {text}");
        assert_eq!(e.code(), "invalid_config");
        assert!(text.contains("RABBITMQ_URL"), "{text}");
        assert!(text.contains(says), "{text}");
        assert!(!text.contains("s3cret"), "password printed: {text}");
    }
    let e = Settings::from_lookup(|k| match k {
        "RABBITMQ_URL" => Some("amqp://app:s3cret@a:5672/".into()),
        "RABBITMQ_ADDRESSES" => Some("b:5672,c:notaport".into()),
        _ => None,
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("RABBITMQ_ADDRESSES") && e.contains("entry 2") && !e.contains("s3cret"),
        "{e}"
    );
    let e = Settings::from_lookup(|k| (k == "RABBITMQ_ADDRESS_ORDER").then(|| "random".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RABBITMQ_ADDRESS_ORDER"), "{e}");
    // A good list: every node, credentials shared, order kept when asked.
    let s = Settings::from_lookup(|k| match k {
        "RABBITMQ_URL" => Some("amqp://app:s3cret@a:5672/prod".into()),
        "RABBITMQ_ADDRESSES" => Some("b:5673, [::1]:5674".into()),
        "RABBITMQ_ADDRESS_ORDER" => Some("in-order".into()),
        _ => None,
    })
    .unwrap();
    let cfg = AmqpConfig::from_settings(&s).unwrap();
    assert_eq!(
        cfg.connect.addresses,
        [("a".to_owned(), 5672), ("b".to_owned(), 5673), ("::1".to_owned(), 5674)]
    );
    assert!(!format!("{cfg:?} {}", cfg.describe()).contains("s3cret"));
}
