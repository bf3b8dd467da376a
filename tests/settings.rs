//! Settings through the facade: the process environment, the cached getter,
//! and feeding a Worker.

use std::time::Duration;

use switchyard::settings::{self, Settings};
use switchyard::worker::Worker;
use switchyard::ExchangeKind;

/// The only test in this binary that touches the process environment, so no
/// other test can observe the change.
#[test]
fn from_env_and_the_cached_getter_read_the_process_environment() {
    let vars = [
        ("RABBITMQ_URL", "amqps://app:t0p-secret@rabbit.prod.internal/contextiq"),
        ("RABBITMQ_HEARTBEAT", "30"),
        ("RABBITMQ_CONNECTION_ATTEMPTS", "5"),
        ("RABBITMQ_RETRY_DELAY", "5.0"),
        ("RABBITMQ_DEFAULT_PREFETCH_COUNT", "20"),
        ("RABBITMQ_DEFAULT_EXCHANGE_TYPE", "direct"),
        ("RABBITMQ_ENABLE_PUBLISHER_CONFIRMS", "YES"),
        ("RABBITMQ_CA_FILE", "/etc/ssl/certs/ca.pem"),
    ];
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let s = Settings::from_env().unwrap();
    assert_eq!(s.heartbeat, Duration::from_secs(30));
    assert_eq!(s.connection_attempts, 5);
    assert_eq!(s.retry_delay, Duration::from_secs(5));
    assert_eq!(s.default_prefetch_count, 20);
    assert_eq!(s.default_exchange_type, ExchangeKind::Direct);
    assert!(s.tls());
    let ep = s.endpoint().unwrap();
    assert_eq!(
        (ep.host.as_str(), ep.port, ep.vhost.as_str()),
        ("rabbit.prod.internal", 5671, "contextiq")
    );
    assert_eq!(
        s.effective_url(),
        "amqps://app:t0p-secret@rabbit.prod.internal/contextiq"
    );
    assert_eq!(
        s.effective_url_redacted(),
        "amqps://app:***@rabbit.prod.internal/contextiq"
    );
    assert!(!format!("{s:?} {s}").contains("t0p-secret"));

    let global = settings::get().unwrap();
    assert_eq!(global, &s);
    // Cached: later changes to the environment are not seen.
    std::env::set_var("RABBITMQ_HEARTBEAT", "5");
    assert!(std::ptr::eq(settings::get().unwrap(), global));
    // ...but a fresh read validates them.
    let e = Settings::from_env().unwrap_err();
    assert_eq!(e.code(), "invalid_config");
    assert_eq!(
        e.to_string(),
        "invalid configuration: RABBITMQ_HEARTBEAT=5: must be between 10 and 300"
    );
    for (k, _) in vars {
        std::env::remove_var(k);
    }
}

#[test]
fn settings_feed_the_worker_prefetch_and_errors_name_the_variable() {
    let s = Settings::from_lookup(|k| (k == "RABBITMQ_DEFAULT_PREFETCH_COUNT").then(|| "7".to_string())).unwrap();
    assert_eq!(s.consumer_prefetch(), 7);
    let broker = switchyard::memory::MemoryBroker::new();
    let w = Worker::new(broker.connect()).with_settings(&s);
    assert!(format!("{w:?}").contains("Worker"));

    for (var, value, reason) in [
        ("RABBITMQ_PORT", "0", "must be between 1 and 65535"),
        ("RABBITMQ_PORT", "abc", "must be an integer between 1 and 65535"),
        ("RABBITMQ_CONNECTION_ATTEMPTS", "11", "must be between 1 and 10"),
        ("RABBITMQ_DEFAULT_PREFETCH_COUNT", "101", "must be between 1 and 100"),
        ("RABBITMQ_RETRY_DELAY", "0.05", "must be between 0.1 and 60.0"),
        (
            "RABBITMQ_ENABLE_DEAD_LETTER",
            "maybe",
            "must be one of true, false, 1, 0, yes, no",
        ),
    ] {
        let e = Settings::from_lookup(|k| (k == var).then(|| value.to_string())).unwrap_err();
        assert_eq!(e.code(), "invalid_config");
        assert_eq!(e.to_string(), format!("invalid configuration: {var}={value}: {reason}"));
    }
    let e = Settings::from_lookup(|k| (k == "RABBITMQ_URL").then(|| "amqp://u:sekrit@host:99999/".to_string()))
        .unwrap_err();
    assert!(!e.to_string().contains("sekrit"), "{e}");
    assert!(e.to_string().contains("RABBITMQ_URL=amqp://u:***@host:99999/"), "{e}");
}
