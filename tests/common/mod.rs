//! What several RabbitMQ test files share.

use std::process::Command;

/// Runs `rabbitmqctl` with `args`, failing the test if it does not succeed.
pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
