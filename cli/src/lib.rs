//! `switchyard-cli`: the `switchyard` command, an operations tool for
//! switchyard deployments: publish, consume and get messages, make an RPC
//! call, inspect and replay dead letters, apply/diff/export topology files,
//! watch queues, and benchmark a broker.
//!
//! Exit codes: [`error::EXIT_OK`] (0), [`error::EXIT_FAILURE`] (1),
//! [`error::EXIT_USAGE`] (2, bad usage or input).
#![warn(missing_docs)]

pub mod args;
pub mod bench;
pub mod connect;
pub mod consume;
pub mod dlq;
pub mod error;
pub mod message;
pub mod mgmt;
pub mod publish;
pub mod queues;
pub mod table;
pub mod topo;
pub mod topology;

use args::{Cli, Command};
use error::CliResult;

/// Runs a parsed command line; returns the exit code of a command that
/// finished (0, or 1 for `topology diff` when it found differences).
pub async fn run(cli: Cli) -> CliResult<u8> {
    let g = &cli.global;
    match &cli.command {
        Command::Publish(a) => publish::run(g, a).await,
        Command::Consume(a) => consume::consume(g, a).await,
        Command::Get(a) => consume::get(g, a).await,
        Command::Rpc(a) => consume::rpc(g, a).await,
        Command::Dlq { command } => dlq::run(g, command).await,
        Command::Topology { command } => topology::run(g, command).await,
        Command::Queues(a) => queues::run(g, a).await,
        Command::Bench(a) => bench::run(g, a).await,
    }
}
