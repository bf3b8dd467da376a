//! What the root benches share: the machine line printed with their figures.

/// The machine a figure was measured on: processors, date and load average.
pub fn machine() -> String {
    let sh = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "nproc {}, {}, load {}",
        sh("nproc"),
        sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        sh("cut -d' ' -f1-3 /proc/loadavg")
    )
}
