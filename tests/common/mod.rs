//! What several RabbitMQ test files share.

use std::process::Command;

/// Runs `rabbitmqctl` with `args`, failing the test if it does not succeed.
pub fn rabbitmqctl(args: &[&str]) {
    rabbitmqctl_output(args);
}

/// Runs `rabbitmqctl` with `args` and returns what it printed, failing the
/// test if it does not succeed.
#[allow(dead_code)] // not every test file reads the output
pub fn rabbitmqctl_output(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
