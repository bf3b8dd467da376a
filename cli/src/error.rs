//! Errors of the command line and their exit codes.

use std::fmt;

/// Exit code: the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed (broker unreachable, publish not
/// confirmed, RPC timeout, differences found by `topology diff`).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage or bad input (malformed header, unparsable file,
/// unknown queue or exchange, mismatched declaration, management API
/// missing).
pub const EXIT_USAGE: u8 = 2;

/// A failed command: a one-line message for stderr and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The exit code ([`EXIT_FAILURE`] or [`EXIT_USAGE`]).
    pub exit: u8,
    /// What went wrong and what to do, on one line.
    pub message: String,
}

/// The result of a command.
pub type CliResult<T> = Result<T, CliError>;

fn one_line(s: impl fmt::Display) -> String {
    let s = s.to_string();
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl CliError {
    /// Bad usage or bad input (exit code 2).
    pub fn usage(message: impl fmt::Display) -> Self {
        CliError {
            exit: EXIT_USAGE,
            message: one_line(message),
        }
    }

    /// A failure (exit code 1).
    pub fn failure(message: impl fmt::Display) -> Self {
        CliError {
            exit: EXIT_FAILURE,
            message: one_line(message),
        }
    }

    /// The same error with `context` in front of its message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{}: {}", one_line(context), self.message);
        self
    }

    /// The same error with `suffix` after its message.
    pub fn context_suffix(mut self, suffix: &str) -> Self {
        self.message.push_str(suffix);
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// True for a finite number above zero (rates, durations, timeouts).
pub fn positive(x: f64) -> bool {
    // Bounded so that durations and rates built from it cannot overflow:
    // from a millisecond (or 0.001 per second) to about 31 years.
    x.is_finite() && (1e-3..=1e9).contains(&x)
}

/// The exit code of a switchyard error: 2 for what the user can fix in
/// the command or the topology (missing queue or exchange, conflicting
/// declaration, refused access, bad configuration), 1 otherwise.
pub fn exit_code_of(e: &switchyard::Error) -> u8 {
    match e.code() {
        "queue_not_found"
        | "exchange_not_found"
        | "precondition_failed"
        | "access_refused"
        | "resource_locked"
        | "invalid_config"
        | "unsupported" => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

impl From<switchyard::Error> for CliError {
    fn from(e: switchyard::Error) -> Self {
        let hint = match e.code() {
            "queue_not_found" => " (list queues with `switchyard queues`)",
            "precondition_failed" => " (`switchyard topology diff FILE` shows mismatched arguments)",
            "connection_failed" => "",
            _ => "",
        };
        CliError {
            exit: exit_code_of(&e),
            message: one_line(format!("{e}{hint}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_and_codes_follow_the_error() {
        let e = CliError::usage("a\nb   c");
        assert_eq!(e.message, "a b c");
        assert_eq!(e.exit, EXIT_USAGE);
        let e: CliError = switchyard::Error::QueueNotFound {
            queue: "q".into(),
            reply: None,
        }
        .into();
        assert_eq!(e.exit, EXIT_USAGE);
        assert!(e.message.contains("switchyard queues"), "{}", e.message);
        let e: CliError = switchyard::Error::ConnectionFailed { message: "x".into() }.into();
        assert_eq!(e.exit, EXIT_FAILURE);
    }
}
