//! The command line, as clap parses it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `switchyard`: operate a switchyard deployment on RabbitMQ (or the
/// in-process broker, for `bench`).
///
/// Connection: the `RABBITMQ_*` variables (as `Settings::from_env`), or
/// `--url`. Management API (for `queues`, `topology diff|export`):
/// `RABBITMQ_MANAGEMENT_URL`, default `http://<amqp host>:15672` with the
/// AMQP credentials. Exit codes: 0 ok, 1 failure, 2 bad usage or bad input.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// AMQP URL (overrides RABBITMQ_URL), e.g. amqp://user:password@host:5672/vhost.
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// The client library to reach the broker with (default: RABBITMQ_TRANSPORT, else lapin).
    #[arg(long, global = true, value_enum)]
    pub transport: Option<TransportArg>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

/// A transport to connect with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// RabbitMQ through lapin.
    Lapin,
    /// RabbitMQ through amqprs.
    Amqprs,
    /// The in-process broker (lives as long as the command: `bench` only).
    Memory,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish messages (always with publisher confirms).
    Publish(PublishArgs),
    /// Consume messages from a queue and print them.
    Consume(ConsumeArgs),
    /// Take messages one at a time without a consumer (basic.get) and print them.
    Get(ConsumeArgs),
    /// One RPC call: publish a request, wait for its reply, print it and its latency.
    Rpc(RpcArgs),
    /// Inspect, replay and purge a dead-letter queue.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Apply, compare and export a topology file (TOML).
    Topology {
        /// What to do.
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Queue depths, consumers and rates (management API).
    Queues(QueuesArgs),
    /// Load generator: producers, consumers, throughput and latency percentiles.
    Bench(BenchArgs),
}

/// Message properties and headers given on the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct MessageArgs {
    /// Delivery mode 2 (the default).
    #[arg(long, conflicts_with = "transient")]
    pub persistent: bool,
    /// Delivery mode 1: not written to disk.
    #[arg(long)]
    pub transient: bool,
    /// Priority (0-255; queues honour it up to their x-max-priority).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Correlation id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Message id.
    #[arg(long)]
    pub message_id: Option<String>,
    /// Content type (default: application/json when the body is JSON, else text/plain).
    #[arg(long)]
    pub content_type: Option<String>,
    /// Per-message TTL in milliseconds.
    #[arg(long, value_name = "MS")]
    pub expiration: Option<u64>,
    /// Message type (AMQP `type`).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Reply-to address.
    #[arg(long)]
    pub reply_to: Option<String>,
    /// A header: `k=v` (string), `k:int=5`, `k:bool=true`, `k:float=1.5`, `k:str=v`. Repeatable.
    #[arg(long = "header", short = 'H', value_name = "K[:TYPE]=V")]
    pub headers: Vec<String>,
}

/// `publish EXCHANGE ROUTING_KEY [BODY]`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Exchange ("" for the default exchange, which routes by queue name).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// The body. Without it (and without --file) the body is read from stdin.
    pub body: Option<String>,
    /// Read the body from this file (`-` for stdin).
    #[arg(long, short, conflicts_with = "body")]
    pub file: Option<PathBuf>,
    /// One message per line of the input (stdin or --file); empty lines are skipped.
    #[arg(long)]
    pub lines: bool,
    /// Publish each message this many times.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u64,
    /// At most this many messages per second (default: as fast as confirms come back).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Fail when no queue is bound for the routing key (instead of the broker dropping the message).
    #[arg(long)]
    pub mandatory: bool,
    /// Messages per confirmed batch (published in order, pipelined within a batch).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Properties and headers.
    #[command(flatten)]
    pub message: MessageArgs,
}

/// How messages taken by `consume` / `get` are settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Args)]
#[group(multiple = false)]
pub struct Settle {
    /// Acknowledge each message: it leaves the queue (the default).
    #[arg(long)]
    pub ack: bool,
    /// Put every message back on the queue when done (peek).
    #[arg(long)]
    pub requeue: bool,
    /// Reject each message: it is dead-lettered if the queue has a dead-letter exchange, else dropped.
    #[arg(long)]
    pub reject: bool,
}

/// `consume QUEUE` / `get QUEUE`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The queue.
    pub queue: String,
    /// Stop after this many messages (consume: default unlimited; get: default 1).
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// consume: stop when no message arrives for this many seconds.
    #[arg(long, value_name = "SECS")]
    pub idle: Option<f64>,
    /// consume: prefetch (default 10).
    #[arg(long, default_value_t = 10)]
    pub prefetch: u16,
    /// How to settle what was taken.
    #[command(flatten)]
    pub settle: Settle,
}

/// `rpc EXCHANGE ROUTING_KEY BODY`.
#[derive(Debug, Args)]
pub struct RpcArgs {
    /// Exchange ("" for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// The request body.
    pub body: String,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Properties and headers.
    #[command(flatten)]
    pub message: MessageArgs,
}

/// Which dead letters.
#[derive(Debug, Clone, Default, Args)]
pub struct Select {
    /// By message id (repeatable).
    #[arg(long = "id", value_name = "MESSAGE_ID")]
    pub ids: Vec<String>,
    /// By position in the queue, as `dlq list` numbers them (repeatable).
    #[arg(long = "index", value_name = "N")]
    pub indexes: Vec<usize>,
    /// Those whose reason (x-error, x-error-kind, or x-death reason) contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// All of them.
    #[arg(long)]
    pub all: bool,
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with their reason and origin (they stay in the queue).
    List {
        /// The dead-letter queue.
        queue: String,
        /// Look at no more than this many messages.
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
    /// Show one dead letter in full (it stays in the queue).
    Show {
        /// The dead-letter queue.
        queue: String,
        /// Its message id.
        #[arg(long = "id", conflicts_with = "index", required_unless_present = "index")]
        id: Option<String>,
        /// Its position, as `dlq list` numbers them.
        #[arg(long)]
        index: Option<usize>,
        /// Look at no more than this many messages.
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
    /// Send selected dead letters back where they came from; each leaves the
    /// queue only once its republish is confirmed.
    Replay {
        /// The dead-letter queue.
        queue: String,
        /// Which ones.
        #[command(flatten)]
        select: Select,
        /// Look at no more than this many messages.
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
    /// Remove every message from the dead-letter queue (needs --yes).
    Purge {
        /// The dead-letter queue.
        queue: String,
        /// Really purge.
        #[arg(long)]
        yes: bool,
    },
}

/// `topology` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Declare every exchange, queue and binding of the file.
    Apply {
        /// The topology file (TOML).
        file: PathBuf,
    },
    /// Compare the file with the broker: missing, extra, mismatched (exit 1 when they differ).
    Diff {
        /// The topology file (TOML).
        file: PathBuf,
        /// Also report exchanges and queues of the vhost the file does not name.
        #[arg(long)]
        all: bool,
    },
    /// Write the broker's topology (of the vhost) as a file.
    Export {
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// `queues [FILTER]`.
#[derive(Debug, Args)]
pub struct QueuesArgs {
    /// Only queues whose name contains this text.
    pub filter: Option<String>,
}

/// `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Publishing tasks.
    #[arg(long, short = 'x', default_value_t = 1)]
    pub producers: usize,
    /// Consuming tasks.
    #[arg(long, short = 'y', default_value_t = 1)]
    pub consumers: usize,
    /// Body size in bytes (at least 8: the send time travels in the body).
    #[arg(long, short = 's', default_value_t = 1000)]
    pub size: usize,
    /// Messages per second per producer (default: unlimited).
    #[arg(long, short = 'r')]
    pub rate: Option<f64>,
    /// How long to publish, in seconds.
    #[arg(long, short = 'z', default_value_t = 10.0)]
    pub duration: f64,
    /// Publish without publisher confirms.
    #[arg(long)]
    pub no_confirms: bool,
    /// Publishes awaiting their confirm per producer.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 200)]
    pub prefetch: u16,
    /// Consumers auto-ack.
    #[arg(long)]
    pub auto_ack: bool,
    /// Persistent messages (default transient).
    #[arg(long)]
    pub persistent: bool,
    /// Use this queue (declared if absent, kept) instead of a temporary one.
    #[arg(long)]
    pub queue: Option<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
