//! The facade is enough: README snippets and examples name no other
//! switchyard crate and no tower crate of their own; `switchyard::connect`
//! builds the transport the settings and features select.

use std::path::{Path, PathBuf};

use switchyard::{Destination, Message, QueueSpec, Settings, TransportKind};

/// Paths a user of the facade must not need.
const FORBIDDEN_CRATES: [&str; 6] = [
    "switchyard_core",
    "switchyard_middleware",
    "switchyard_lapin",
    "switchyard_amqprs",
    "switchyard_memory",
    "switchyard_amqp",
];

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every offence in `code`: a forbidden crate path, or a `tower` path not
/// reached through `switchyard::`.
fn offences(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        for krate in FORBIDDEN_CRATES {
            for (i, _) in line.match_indices(krate) {
                let before = line[..i].chars().next_back();
                let after = line[i + krate.len()..].chars().next();
                if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
                    found.push(format!("line {}: {krate}: {}", n + 1, line.trim()));
                }
            }
        }
        for (i, _) in line.match_indices("tower") {
            let before = &line[..i];
            let after = line[i + "tower".len()..].chars().next();
            let word = !before.chars().next_back().is_some_and(is_ident) && !after.is_some_and(is_ident);
            let path = line[i + "tower".len()..].starts_with("::") || before.trim_end().ends_with("use");
            if word && path && !before.ends_with("switchyard::") {
                found.push(format!("line {}: tower: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

/// The Rust code blocks of a markdown file.
fn rust_blocks(markdown: &str) -> String {
    let mut out = String::new();
    let mut in_rust = false;
    for line in markdown.lines() {
        let t = line.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            if in_rust {
                in_rust = false;
            } else {
                let lang = info.split(',').next().unwrap_or("").trim();
                in_rust = lang == "rust";
            }
            out.push('\n');
            continue;
        }
        if in_rust {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_scanner_catches_what_it_must() {
    assert_eq!(offences("use switchyard_core::Message;").len(), 1);
    assert_eq!(
        offences("let x = switchyard_lapin::LapinTransport::connect(&s);").len(),
        1
    );
    assert_eq!(offences("use tower::ServiceBuilder;").len(), 1);
    assert_eq!(offences("let b = tower::ServiceBuilder::new();").len(), 1);
    assert!(offences("use switchyard::tower::ServiceBuilder;").is_empty());
    assert!(offences("use switchyard::{ServiceBuilder, Layer};").is_empty());
    assert!(offences("// switchyard_messages_handled_total and a tower of cards").is_empty());
    let md = "text switchyard_core::x\n```rust\nuse switchyard_middleware::prelude::*;\n```\n```bash\nswitchyard_core\n```\n";
    assert_eq!(offences(&rust_blocks(md)).len(), 1);
}

#[test]
fn readme_snippets_and_examples_use_only_the_facade() {
    let mut checked = Vec::new();
    let mut bad = Vec::new();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for o in offences(&rust_blocks(&readme)) {
        bad.push(format!("README.md {o}"));
    }
    checked.push("README.md".to_owned());
    let mut examples: Vec<_> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    examples.sort();
    assert!(
        examples.len() >= 2,
        "expected contextiq.rs and scheduled.rs, found {examples:?}"
    );
    for path in &examples {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path
            .strip_prefix(root())
            .unwrap_or(Path::new("?"))
            .display()
            .to_string();
        for o in offences(&text) {
            bad.push(format!("{name} {o}"));
        }
        checked.push(name);
    }
    assert!(
        bad.is_empty(),
        "checked {checked:?}; these name another crate than switchyard:\n{}",
        bad.join("\n")
    );
}

#[tokio::test]
async fn connect_builds_the_memory_transport_and_shares_named_brokers() {
    let by_var = Settings::from_lookup(|k| (k == "RABBITMQ_TRANSPORT").then(|| "memory".to_string())).unwrap();
    let t = switchyard::connect(&by_var).await.unwrap();
    assert_eq!(t.name(), "memory");

    // Two connects to memory://facade-test reach one broker.
    let by_url = Settings::default().with_url("memory://facade-test");
    let a = switchyard::connect(&by_url).await.unwrap();
    let b = switchyard::connect(&by_url).await.unwrap();
    a.declare_queue(&QueueSpec::new("shared")).await.unwrap();
    a.publish(&Destination::queue("shared"), Message::new("hi"))
        .await
        .unwrap();
    assert_eq!(b.queue_info("shared").await.unwrap().message_count, 1);
    // Another name is another broker.
    let c = switchyard::connect(&Settings::default().with_url("memory://other"))
        .await
        .unwrap();
    assert_eq!(c.queue_info("shared").await.unwrap_err().code(), "queue_not_found");

    // A memory URL with a RabbitMQ transport named is refused by the settings.
    let e = switchyard::connect(
        &Settings::default()
            .with_url("memory://")
            .with_transport(TransportKind::Lapin),
    )
    .await
    .err()
    .expect("connect must fail");
    assert_eq!(e.code(), "invalid_config");
    assert!(e.to_string().contains("RABBITMQ_TRANSPORT"), "{e}");
}

#[cfg(not(feature = "lapin"))]
#[tokio::test]
async fn connect_names_the_variable_and_the_feature_when_lapin_is_off() {
    let e = switchyard::connect(&Settings::default().with_transport(TransportKind::Lapin))
        .await
        .err()
        .expect("connect must fail");
    assert_eq!(e.code(), "invalid_config");
    let text = e.to_string();
    assert!(text.contains("RABBITMQ_TRANSPORT=lapin"), "{text}");
    assert!(text.contains("cargo feature \"lapin\""), "{text}");
}

#[cfg(not(any(feature = "lapin", feature = "amqprs")))]
#[tokio::test]
async fn connect_without_a_rabbitmq_feature_says_how_to_choose() {
    let e = switchyard::connect(&Settings::default())
        .await
        .err()
        .expect("connect must fail");
    assert_eq!(e.code(), "invalid_config");
    let text = e.to_string();
    assert!(text.contains("RABBITMQ_TRANSPORT"), "{text}");
    assert!(text.contains("memory://") && text.contains("\"lapin\""), "{text}");
}
