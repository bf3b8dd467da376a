//! Settings and connections: `RABBITMQ_*`, `--url`, `--transport`.

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use switchyard::{Settings, Transport, TransportKind};

use crate::args::{Global, TransportArg};
use crate::error::{CliError, CliResult};

/// The settings of a command: `RABBITMQ_*`, then `--url` and `--transport`
/// on top. Publisher confirms are always on.
pub fn settings(g: &Global) -> CliResult<Settings> {
    let mut s = Settings::from_env().map_err(CliError::from)?;
    if let Some(url) = &g.url {
        s = s.with_url(url.clone());
    }
    let kind = match g.transport {
        Some(TransportArg::Lapin) => TransportKind::Lapin,
        Some(TransportArg::Amqprs) => TransportKind::Amqprs,
        Some(TransportArg::Memory) => TransportKind::Memory,
        None => s.transport.or(s.transport_kind()).unwrap_or(TransportKind::Lapin),
    };
    s = s.with_transport(kind);
    s.enable_publisher_confirms = true;
    Ok(s)
}

/// True when the settings select the in-process broker.
pub fn is_memory(s: &Settings) -> bool {
    s.transport == Some(TransportKind::Memory)
}

/// Connects; the in-process broker only where `memory_ok` (it lives and
/// dies with this command).
pub async fn connect(s: &Settings, command: &str, memory_ok: bool) -> CliResult<Arc<dyn Transport>> {
    if is_memory(s) && !memory_ok {
        return Err(CliError::usage(format!(
            "`{command}` needs a broker that outlives the command: the memory transport lives inside one process \
             (use it with `bench`); choose --transport lapin or amqprs"
        )));
    }
    switchyard::connect(s).await.map_err(CliError::from)
}

/// A progress bar on stderr, hidden with `--quiet`, `--json` or when
/// stderr is not a terminal. `len` 0 makes a spinner.
pub fn progress(g: &Global, len: u64, template: &str) -> ProgressBar {
    let pb = if len == 0 {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::new(len)
    };
    if g.quiet || g.json {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style);
    }
    pb
}
