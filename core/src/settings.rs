//! Settings from `RABBITMQ_*` environment variables.
//!
//! [`Settings`] covers every variable of the system switchyard replaces, with
//! the same defaults, the same ranges and the same URL-precedence rule, plus
//! a few additions (TLS, connection and confirm deadlines):
//!
//! | variable | default | allowed |
//! |---|---|---|
//! | `RABBITMQ_URL` | `amqp://guest:guest@localhost:5672/` | `amqp://` or `amqps://` URL |
//! | `RABBITMQ_HOST` | `localhost` | non-empty |
//! | `RABBITMQ_PORT` | `5672` | 1–65535 |
//! | `RABBITMQ_USER` | `guest` | any |
//! | `RABBITMQ_PASSWORD` | `guest` | any (never printed) |
//! | `RABBITMQ_VHOST` | `/` | any |
//! | `RABBITMQ_HEARTBEAT` | `60` (seconds) | 10–300 |
//! | `RABBITMQ_CONNECTION_ATTEMPTS` | `3` | 1–10 |
//! | `RABBITMQ_RETRY_DELAY` | `2.0` (seconds) | 0.1–60.0 |
//! | `RABBITMQ_DEFAULT_PREFETCH_COUNT` | `10` | 1–100 |
//! | `RABBITMQ_DEFAULT_MESSAGE_TTL` | `86400000` (ms; 0 = none) | 0–4294967295 |
//! | `RABBITMQ_DEFAULT_EXCHANGE_TYPE` | `topic` | direct, topic, fanout, headers |
//! | `RABBITMQ_ENABLE_DEAD_LETTER` | `true` | boolean |
//! | `RABBITMQ_DEAD_LETTER_EXCHANGE` | `contextiq.dlx` | non-empty when dead-lettering |
//! | `RABBITMQ_ENABLE_PUBLISHER_CONFIRMS` | `true` | boolean |
//! | `RABBITMQ_ENABLE_CONSUMER_PREFETCH` | `true` | boolean |
//! | `RABBITMQ_USE_TLS` | `false` | boolean; `amqps` when the URL is built from parts |
//! | `RABBITMQ_CA_FILE` | unset | path of a PEM CA bundle for TLS |
//! | `RABBITMQ_CLIENT_CERT_FILE` | unset | PEM client certificate chain for mutual TLS (with the key file) |
//! | `RABBITMQ_CLIENT_KEY_FILE` | unset | PEM private key of the client certificate (mutual TLS) |
//! | `RABBITMQ_ADDRESSES` | unset | more nodes of a cluster, `host:port,host:port`, sharing the URL's credentials and vhost (`RABBITMQ_URL` may also list several URLs separated by commas) |
//! | `RABBITMQ_ADDRESS_ORDER` | `shuffle` | `shuffle` (spread clients over the nodes) or `in-order` (try the addresses as listed) |
//! | `RABBITMQ_CONNECTION_NAME` | `switchyard` | connection name shown in the management UI (`/publish`, `/consume` appended) |
//! | `RABBITMQ_CONNECTION_TIMEOUT` | `30.0` (seconds) | 0.1–300.0 |
//! | `RABBITMQ_CONFIRM_TIMEOUT` | `30.0` (seconds) | 0.1–600.0 |
//! | `RABBITMQ_TRANSPORT` | unset (see below) | memory, lapin, amqprs |
//!
//! Where each variable takes effect is listed in [`VARIABLES`] (a test
//! keeps that list, this table and [`Settings::from_lookup`] in step).
//!
//! **`.env` files.** [`Settings::from_env`] also reads `./.env` when it
//! exists, or the file `SWITCHYARD_ENV_FILE` names (which must exist): the
//! seed's `.env.*` style — `KEY=value` lines, `#` comments, blank lines, an
//! optional `export ` prefix, values in `"double"` (with `\n`, `\"`, `\\`
//! escapes) or `'single'` quotes, and `${VAR}` references (to the process
//! environment or an earlier line; unknown ones become empty, as
//! python-dotenv does, with a warning naming the variable). Variables of the
//! process environment take precedence over the file. A malformed line is an
//! `invalid_config` error naming the file and the line number (never the
//! line's value). Values of password and URL variables are never logged.
//!
//! **Settings that shape topology.** `RABBITMQ_DEFAULT_MESSAGE_TTL`,
//! `RABBITMQ_ENABLE_DEAD_LETTER` and `RABBITMQ_DEAD_LETTER_EXCHANGE` take
//! effect on the queues built by [`Settings::queue`] (`x-message-ttl`,
//! `x-dead-letter-exchange` with routing key [`DEAD_LETTER_ROUTING_KEY`]), on
//! the queues of a [`Topology::with_defaults`] that lack them, and in
//! [`Settings::dead_letter_topology`] (the dead-letter exchange and
//! queue); `RABBITMQ_DEFAULT_EXCHANGE_TYPE` on the exchanges built by
//! [`Settings::exchange`]. The dead-letter layer of `switchyard-middleware`
//! takes its exchange from the settings with `DeadLetterLayer::from_settings`.
//! Queues and exchanges built by hand ([`QueueSpec::new`]) are left as
//! written.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{Settings, Topology, ExchangeKind};
//! let s = Settings::from_lookup(|k| match k {
//!     "RABBITMQ_DEFAULT_MESSAGE_TTL" => Some("60000".into()),
//!     "RABBITMQ_DEFAULT_EXCHANGE_TYPE" => Some("direct".into()),
//!     _ => None,
//! }).unwrap();
//! let q = s.queue("extraction.requests");
//! assert_eq!(q.arguments.message_ttl, Some(Duration::from_secs(60)));
//! assert_eq!(q.arguments.dead_letter_exchange.as_deref(), Some("contextiq.dlx"));
//! assert_eq!(s.exchange("contextiq.extraction").kind, ExchangeKind::Direct);
//! let topology = s.dead_letter_topology("dead_letter")
//!     .exchange(s.exchange("contextiq.extraction"))
//!     .bound_queue(q, "contextiq.extraction", "extraction.request");
//! assert_eq!(topology.queues.len(), 2);
//! ```
//!
//! **Transport choice** (`switchyard::connect`): `RABBITMQ_TRANSPORT` names
//! the transport; when it is unset, a `RABBITMQ_URL` of the form `memory://`
//! selects the in-process broker, and anything else a RabbitMQ transport
//! (lapin when its cargo feature is on, else amqprs). A `memory://` URL with
//! `RABBITMQ_TRANSPORT` naming a RabbitMQ transport is refused.
//! See [`Settings::transport_kind`].
//!
//! Booleans accept `true`/`false`/`1`/`0`/`yes`/`no` in any case; an empty
//! variable counts as unset, except for the user and password. Every error is
//! [`Error::InvalidConfig`] naming the variable, the value and what is
//! allowed, e.g. `RABBITMQ_HEARTBEAT=5: must be between 10 and 300`.
//!
//! **URL precedence.** If `RABBITMQ_URL` is set to a value other than the
//! default it wins; otherwise the URL is built from the parts, with the user,
//! password and vhost percent-encoded (vhost `/` becomes `%2F`).
//!
//! **Passwords.** The password (field and inside URLs) is a [`Secret`]: it
//! never appears in `Debug`, `Display`, logs or errors.
//! [`Settings::effective_url`] returns the real URL for transports;
//! [`Settings::effective_url_redacted`] is the one to print.
//!
//! ```
//! use switchyard_core::settings::Settings;
//! let env = [("RABBITMQ_HOST", "rabbit"), ("RABBITMQ_PASSWORD", "s3cret"), ("RABBITMQ_VHOST", "/")];
//! let s = Settings::from_lookup(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap();
//! assert_eq!(s.effective_url_redacted(), "amqp://guest:***@rabbit:5672/%2F");
//! assert!(!format!("{s:?}").contains("s3cret"));
//!
//! let err = Settings::from_lookup(|k| (k == "RABBITMQ_HEARTBEAT").then(|| "5".to_string())).unwrap_err();
//! assert_eq!(err.to_string(), "invalid configuration: RABBITMQ_HEARTBEAT=5: must be between 10 and 300");
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::topology::{Binding, ExchangeKind, ExchangeSpec, QueueSpec, Topology};

/// The default `RABBITMQ_URL`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672/";
/// The default prefetch count (`RABBITMQ_DEFAULT_PREFETCH_COUNT`).
pub const DEFAULT_PREFETCH: u16 = 10;

/// A string that never prints: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The real value, for the code that needs it (a transport's login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// Connection and messaging settings; see the [module docs](self) for the
/// variables, defaults and ranges.
///
/// Fields are public for reading; set them with the builder-style setters
/// (or directly) and call [`validate`](Settings::validate) if you did not go
/// through [`from_env`](Settings::from_env) / [`from_lookup`](Settings::from_lookup).
#[derive(Clone, PartialEq)]
pub struct Settings {
    /// `RABBITMQ_URL` (may hold a password, hence a [`Secret`]).
    pub url: Secret,
    /// `RABBITMQ_HOST`.
    pub host: String,
    /// `RABBITMQ_PORT`.
    pub port: u16,
    /// `RABBITMQ_USER`.
    pub user: String,
    /// `RABBITMQ_PASSWORD`.
    pub password: Secret,
    /// `RABBITMQ_VHOST`.
    pub vhost: String,
    /// `RABBITMQ_HEARTBEAT`: AMQP heartbeat interval (10–300 s).
    pub heartbeat: Duration,
    /// `RABBITMQ_CONNECTION_ATTEMPTS`: connection attempts before giving up (1–10).
    pub connection_attempts: u32,
    /// `RABBITMQ_RETRY_DELAY`: delay between connection attempts (0.1–60 s).
    pub retry_delay: Duration,
    /// `RABBITMQ_DEFAULT_PREFETCH_COUNT`: consumer prefetch (1–100).
    pub default_prefetch_count: u16,
    /// `RABBITMQ_DEFAULT_MESSAGE_TTL`: default queue message TTL; zero means none.
    pub default_message_ttl: Duration,
    /// `RABBITMQ_DEFAULT_EXCHANGE_TYPE`.
    pub default_exchange_type: ExchangeKind,
    /// `RABBITMQ_ENABLE_DEAD_LETTER`.
    pub enable_dead_letter: bool,
    /// `RABBITMQ_DEAD_LETTER_EXCHANGE`.
    pub dead_letter_exchange: String,
    /// `RABBITMQ_ENABLE_PUBLISHER_CONFIRMS`.
    pub enable_publisher_confirms: bool,
    /// `RABBITMQ_ENABLE_CONSUMER_PREFETCH`: when false the Worker asks for
    /// prefetch 0 — unlimited on the memory broker; the RabbitMQ transports
    /// never consume without a bound (the broker would push the whole queue
    /// into memory) and use the default prefetch count instead.
    pub enable_consumer_prefetch: bool,
    /// `RABBITMQ_USE_TLS`: use `amqps` when the URL is built from the parts
    /// (a `RABBITMQ_URL` decides by its own scheme).
    pub use_tls: bool,
    /// `RABBITMQ_CA_FILE`: PEM file of CA certificates trusted for TLS
    /// (the system roots when unset).
    pub ca_file: Option<PathBuf>,
    /// `RABBITMQ_CLIENT_CERT_FILE`: PEM client certificate chain for mutual
    /// TLS (needs [`client_key_file`](Self::client_key_file) too).
    pub client_cert_file: Option<PathBuf>,
    /// `RABBITMQ_CLIENT_KEY_FILE`: PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
    /// `RABBITMQ_ADDRESSES`: more `host:port` addresses of the same cluster,
    /// sharing the credentials and vhost of the URL.
    pub addresses: Vec<String>,
    /// `RABBITMQ_ADDRESS_ORDER`: whether clients try the addresses shuffled
    /// (the default: clients spread over the nodes) or in the listed order.
    pub address_order: AddressOrder,
    /// `RABBITMQ_CONNECTION_NAME`: the connection name shown in the
    /// management UI (default `switchyard`; the transport appends its role).
    pub connection_name: String,
    /// `RABBITMQ_CONNECTION_TIMEOUT`: limit of one connection attempt
    /// (default 30 s, 0.1–300 s).
    pub connection_timeout: Duration,
    /// `RABBITMQ_CONFIRM_TIMEOUT`: how long a publish waits for its broker
    /// confirm before failing with `publish_unconfirmed` (default 30 s, 0.1–600 s).
    pub confirm_timeout: Duration,
    /// `RABBITMQ_TRANSPORT`: which transport `switchyard::connect` builds;
    /// `None`: decided by the URL scheme (see [`Settings::transport_kind`]).
    pub transport: Option<TransportKind>,
}

/// A transport `switchyard::connect` can build (`RABBITMQ_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// The in-process broker (`switchyard-memory`, cargo feature `memory`).
    Memory,
    /// RabbitMQ through lapin (cargo feature `lapin`).
    Lapin,
    /// RabbitMQ through amqprs (cargo feature `amqprs`).
    Amqprs,
}

impl TransportKind {
    /// The name used in `RABBITMQ_TRANSPORT` and in cargo features.
    pub fn as_str(&self) -> &'static str {
        match self {
            TransportKind::Memory => "memory",
            TransportKind::Lapin => "lapin",
            TransportKind::Amqprs => "amqprs",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = Error;
    /// Parses `memory`, `lapin` or `amqprs` (any case); the error names
    /// `RABBITMQ_TRANSPORT`.
    fn from_str(v: &str) -> Result<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "memory" => Ok(TransportKind::Memory),
            "lapin" => Ok(TransportKind::Lapin),
            "amqprs" => Ok(TransportKind::Amqprs),
            _ => Err(invalid("RABBITMQ_TRANSPORT", v, "must be one of memory, lapin, amqprs")),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            url: Secret::new(DEFAULT_URL),
            host: "localhost".into(),
            port: 5672,
            user: "guest".into(),
            password: Secret::new("guest"),
            vhost: "/".into(),
            heartbeat: Duration::from_secs(60),
            connection_attempts: 3,
            retry_delay: Duration::from_secs(2),
            default_prefetch_count: DEFAULT_PREFETCH,
            default_message_ttl: Duration::from_millis(86_400_000),
            default_exchange_type: ExchangeKind::Topic,
            enable_dead_letter: true,
            dead_letter_exchange: "contextiq.dlx".into(),
            enable_publisher_confirms: true,
            enable_consumer_prefetch: true,
            use_tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            addresses: Vec::new(),
            address_order: AddressOrder::Shuffle,
            connection_name: "switchyard".into(),
            connection_timeout: Duration::from_secs(30),
            confirm_timeout: Duration::from_secs(30),
            transport: None,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("effective_url", &self.effective_url_redacted())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("vhost", &self.vhost)
            .field("heartbeat", &self.heartbeat)
            .field("connection_attempts", &self.connection_attempts)
            .field("retry_delay", &self.retry_delay)
            .field("default_prefetch_count", &self.default_prefetch_count)
            .field("default_message_ttl", &self.default_message_ttl)
            .field("default_exchange_type", &self.default_exchange_type)
            .field("enable_dead_letter", &self.enable_dead_letter)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("enable_publisher_confirms", &self.enable_publisher_confirms)
            .field("enable_consumer_prefetch", &self.enable_consumer_prefetch)
            .field("use_tls", &self.use_tls)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("addresses", &self.addresses)
            .field("address_order", &self.address_order)
            .field("connection_name", &self.connection_name)
            .field("connection_timeout", &self.connection_timeout)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("transport", &self.transport)
            .finish()
    }
}

impl fmt::Display for Settings {
    /// A one-line summary without secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (heartbeat {}s, prefetch {}, confirms {}, dead-letter {})",
            self.effective_url_redacted(),
            self.heartbeat.as_secs(),
            self.default_prefetch_count,
            if self.enable_publisher_confirms { "on" } else { "off" },
            if self.enable_dead_letter {
                self.dead_letter_exchange.as_str()
            } else {
                "off"
            }
        )
    }
}

fn invalid(variable: &str, value: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        variable: variable.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn check_range<T: PartialOrd + fmt::Display>(variable: &str, v: T, lo: T, hi: T) -> Result<T> {
    if v < lo || v > hi {
        Err(invalid(
            variable,
            v.to_string(),
            format!("must be between {lo} and {hi}"),
        ))
    } else {
        Ok(v)
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.1}")
    } else {
        format!("{s}")
    }
}

fn check_secs(variable: &str, d: Duration, lo: f64, hi: f64) -> Result<Duration> {
    let s = d.as_secs_f64();
    // Durations built from text keep the text's float; compare with a
    // tolerance of one nanosecond so that 0.1 is inside 0.1–60.0.
    if s + 1e-9 < lo || s - 1e-9 > hi {
        return Err(invalid(
            variable,
            fmt_secs(d),
            format!("must be between {lo:?} and {hi:?}"),
        ));
    }
    Ok(d)
}

/// Parses an integer variable and checks its range.
fn parse_int<T>(variable: &str, raw: &str, lo: T, hi: T) -> Result<T>
where
    T: TryFrom<i128> + Into<i128> + fmt::Display + Copy,
{
    let t = raw.trim();
    let wide: i128 = t
        .parse()
        .map_err(|_| invalid(variable, raw, format!("must be an integer between {lo} and {hi}")))?;
    if wide < lo.into() || wide > hi.into() {
        return Err(invalid(variable, t, format!("must be between {lo} and {hi}")));
    }
    T::try_from(wide).map_err(|_| invalid(variable, t, format!("must be between {lo} and {hi}")))
}

/// Parses a float number of seconds and checks its range.
fn parse_secs(variable: &str, raw: &str, lo: f64, hi: f64) -> Result<Duration> {
    let t = raw.trim();
    let v: f64 = t.parse().map_err(|_| {
        invalid(
            variable,
            raw,
            format!("must be a number of seconds between {lo:?} and {hi:?}"),
        )
    })?;
    if !v.is_finite() || v < lo || v > hi {
        return Err(invalid(variable, t, format!("must be between {lo:?} and {hi:?}")));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Parses a boolean: `true`/`false`/`1`/`0`/`yes`/`no`, any case.
pub fn parse_bool(variable: &str, raw: &str) -> Result<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(variable, raw, "must be one of true, false, 1, 0, yes, no")),
    }
}

/// The order in which clients try the addresses of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressOrder {
    /// Shuffled once per transport, so that clients spread over the nodes.
    #[default]
    Shuffle,
    /// As listed.
    InOrder,
}

/// `host:port` (`[v6]:port`), or a bare host with `default_port`.
fn parse_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let s = s.trim();
    if s.is_empty() || s.contains('@') || s.contains('/') {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok().filter(|p| *p > 0)?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h.to_owned(), p.parse().ok().filter(|p| *p > 0)?)),
        Some(_) => None,
        None => Some((s.to_owned(), default_port)),
    }
}

/// The parts of an `amqp://` / `amqps://` URL, decoded.
///
/// Its `Debug` hides the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// True for `amqps`.
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (5672 for amqp, 5671 for amqps when the URL names none).
    pub port: u16,
    /// User name (`guest` when the URL names none).
    pub user: String,
    /// Password (`guest` when the URL names none).
    pub password: Secret,
    /// Virtual host, decoded (`/` when the URL has no path or an empty one).
    pub vhost: String,
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result
/// is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Replaces the password of a URL (if any) with `***`.
///
/// The user information ends at the **last** `@` after `://`, so a password
/// holding unencoded `@`, `/`, `?` or `#` is still hidden. When the user
/// information holds `/`, `?` or `#` (a URL [`parse_amqp_url`] rejects),
/// everything between `://` and the last `@` is hidden, user included. Text
/// that is not a URL but contains `@` has everything before its last `@`
/// hidden.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL: if it might hold credentials, hide all before the '@'.
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url.to_owned(),
        };
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = if userinfo.contains(URL_DELIMITERS) {
        "***".to_owned()
    } else {
        match userinfo.find(':') {
            Some(c) => format!("{}:***", &userinfo[..c]),
            None => userinfo.to_owned(),
        }
    };
    format!("{}://{}{}", &url[..scheme_end], user, &rest[at..])
}

/// The characters that end a URL's authority; unencoded in the user
/// information they make the URL ambiguous.
const URL_DELIMITERS: [char; 3] = ['/', '?', '#'];

/// Parses an AMQP URL (`amqp[s]://[user[:password]@]host[:port][/vhost][?query]`).
///
/// Errors name `variable` and show the URL with its password redacted.
pub fn parse_amqp_url(variable: &str, url: &str) -> Result<Endpoint> {
    let bad = |reason: &str| invalid(variable, redact_url(url), reason.to_owned());
    let url = url.trim();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("must be an amqp:// or amqps:// URL"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "amqp" => false,
        "amqps" => true,
        _ => return Err(bad("scheme must be amqp or amqps")),
    };
    // The user information ends at the last '@': a password may hold '@'.
    let (userinfo, rest) = match rest.rfind('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    if userinfo.is_some_and(|ui| ui.contains(URL_DELIMITERS)) {
        return Err(bad(
            "the user or password holds an unencoded '/', '?' or '#' (or the vhost or query holds '@'): \
             percent-encode them ('/' is %2F, '?' is %3F, '#' is %23, '@' is %40)",
        ));
    }
    let rest = rest.split('#').next().unwrap_or("");
    let (before_query, _query) = rest.split_once('?').unwrap_or((rest, ""));
    let (hostport, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], Some(&before_query[i + 1..])),
        None => (before_query, None),
    };
    let (user, password) = match userinfo {
        None => ("guest".to_owned(), "guest".to_owned()),
        Some(ui) => {
            let (u, p) = ui.split_once(':').unwrap_or((ui, ""));
            let u = percent_decode(u).ok_or_else(|| bad("user is not valid percent-encoded UTF-8"))?;
            let p = percent_decode(p).ok_or_else(|| bad("password is not valid percent-encoded UTF-8"))?;
            (u, p)
        }
    };
    let (host, port_text) = if let Some(h) = hostport.strip_prefix('[') {
        let end = h.find(']').ok_or_else(|| bad("unclosed '[' in IPv6 host"))?;
        let after = &h[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected text after IPv6 host")),
        };
        (h[..end].to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (hostport.to_owned(), None),
        }
    };
    let host = percent_decode(&host).ok_or_else(|| bad("host is not valid percent-encoded UTF-8"))?;
    if host.is_empty() {
        return Err(bad("host is missing"));
    }
    let port = match port_text {
        None | Some("") => {
            if tls {
                5671
            } else {
                5672
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(bad("port must be between 1 and 65535")),
        },
    };
    let vhost = match path {
        None | Some("") => "/".to_owned(),
        Some(p) => {
            if p.contains('/') {
                return Err(bad("vhost must be percent-encoded ('/' is %2F)"));
            }
            percent_decode(p).ok_or_else(|| bad("vhost is not valid percent-encoded UTF-8"))?
        }
    };
    Ok(Endpoint {
        tls,
        host,
        port,
        user,
        password: Secret(password),
        vhost,
    })
}

impl Settings {
    /// Reads the process environment (`RABBITMQ_*`) and the `.env` file —
    /// `SWITCHYARD_ENV_FILE` if set, else `./.env` if it exists — with the
    /// process environment taking precedence, and validates. See the
    /// [module docs](self) for the file's syntax.
    pub fn from_env() -> Result<Settings> {
        Self::from_sources(|name| std::env::var(name).ok(), Path::new(".env"))
    }

    /// [`from_env`](Settings::from_env) with the process environment read
    /// through `env` and `default_file` in place of `./.env`.
    fn from_sources(env: impl Fn(&str) -> Option<String>, default_file: &Path) -> Result<Settings> {
        let file = match env(ENV_FILE_VARIABLE).filter(|v| !v.trim().is_empty()) {
            Some(path) => {
                let path = PathBuf::from(path.trim());
                if !path.is_file() {
                    return Err(invalid(
                        ENV_FILE_VARIABLE,
                        path.display().to_string(),
                        "no such file: point it at a .env file or unset it",
                    ));
                }
                Some(path)
            }
            None => default_file.is_file().then(|| default_file.to_path_buf()),
        };
        let entries = match &file {
            Some(path) => read_env_file_with(path, &env)?,
            None => Vec::new(),
        };
        if let Some(path) = &file {
            // Names only: a .env file holds other services' secrets too,
            // under names no pattern can recognise.
            let names: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
            tracing::debug!(file = %path.display(), variables = ?names, "settings: read .env file");
        }
        Self::from_lookup(|name| {
            env(name).or_else(|| entries.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        })
    }

    /// Reads variables through `lookup` (name → value) and validates. Tests
    /// use this instead of mutating the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let mut s = Settings::default();
        // Strings that count even when empty (an empty password is a password).
        let get_raw = |name: &str| lookup(name);
        // Everything else: empty means unset.
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        if let Some(v) = get("RABBITMQ_URL") {
            s.url = Secret(v.trim().to_owned());
        }
        if let Some(v) = get("RABBITMQ_HOST") {
            s.host = v.trim().to_owned();
        }
        if let Some(v) = get("RABBITMQ_PORT") {
            s.port = parse_int("RABBITMQ_PORT", &v, 1u16, 65535)?;
        }
        if let Some(v) = get_raw("RABBITMQ_USER") {
            s.user = v;
        }
        if let Some(v) = get_raw("RABBITMQ_PASSWORD") {
            s.password = Secret(v);
        }
        if let Some(v) = get_raw("RABBITMQ_VHOST") {
            s.vhost = v;
        }
        if let Some(v) = get("RABBITMQ_HEARTBEAT") {
            s.heartbeat = Duration::from_secs(parse_int("RABBITMQ_HEARTBEAT", &v, 10u64, 300)?);
        }
        if let Some(v) = get("RABBITMQ_CONNECTION_ATTEMPTS") {
            s.connection_attempts = parse_int("RABBITMQ_CONNECTION_ATTEMPTS", &v, 1u32, 10)?;
        }
        if let Some(v) = get("RABBITMQ_RETRY_DELAY") {
            s.retry_delay = parse_secs("RABBITMQ_RETRY_DELAY", &v, 0.1, 60.0)?;
        }
        if let Some(v) = get("RABBITMQ_DEFAULT_PREFETCH_COUNT") {
            s.default_prefetch_count = parse_int("RABBITMQ_DEFAULT_PREFETCH_COUNT", &v, 1u16, 100)?;
        }
        if let Some(v) = get("RABBITMQ_DEFAULT_MESSAGE_TTL") {
            let ms = parse_int("RABBITMQ_DEFAULT_MESSAGE_TTL", &v, 0u64, u32::MAX as u64)?;
            s.default_message_ttl = Duration::from_millis(ms);
        }
        if let Some(v) = get("RABBITMQ_DEFAULT_EXCHANGE_TYPE") {
            s.default_exchange_type = v.parse::<ExchangeKind>().map_err(|_| {
                invalid(
                    "RABBITMQ_DEFAULT_EXCHANGE_TYPE",
                    v.as_str(),
                    "must be one of direct, topic, fanout, headers",
                )
            })?;
        }
        if let Some(v) = get("RABBITMQ_ENABLE_DEAD_LETTER") {
            s.enable_dead_letter = parse_bool("RABBITMQ_ENABLE_DEAD_LETTER", &v)?;
        }
        if let Some(v) = get("RABBITMQ_DEAD_LETTER_EXCHANGE") {
            s.dead_letter_exchange = v.trim().to_owned();
        }
        if let Some(v) = get("RABBITMQ_ENABLE_PUBLISHER_CONFIRMS") {
            s.enable_publisher_confirms = parse_bool("RABBITMQ_ENABLE_PUBLISHER_CONFIRMS", &v)?;
        }
        if let Some(v) = get("RABBITMQ_ENABLE_CONSUMER_PREFETCH") {
            s.enable_consumer_prefetch = parse_bool("RABBITMQ_ENABLE_CONSUMER_PREFETCH", &v)?;
        }
        if let Some(v) = get("RABBITMQ_USE_TLS") {
            s.use_tls = parse_bool("RABBITMQ_USE_TLS", &v)?;
        }
        if let Some(v) = get("RABBITMQ_CA_FILE") {
            s.ca_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = get("RABBITMQ_CLIENT_CERT_FILE") {
            s.client_cert_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = get("RABBITMQ_CLIENT_KEY_FILE") {
            s.client_key_file = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = get("RABBITMQ_ADDRESSES") {
            s.addresses = v.split(',').map(|a| a.trim().to_owned()).collect();
        }
        if let Some(v) = get("RABBITMQ_ADDRESS_ORDER") {
            s.address_order = match v.trim().to_ascii_lowercase().as_str() {
                "shuffle" => AddressOrder::Shuffle,
                "in-order" | "in_order" | "ordered" => AddressOrder::InOrder,
                _ => {
                    return Err(invalid(
                        "RABBITMQ_ADDRESS_ORDER",
                        v.trim(),
                        "must be shuffle or in-order",
                    ))
                }
            };
        }
        if let Some(v) = get("RABBITMQ_CONNECTION_NAME") {
            s.connection_name = v.trim().to_owned();
        }
        if let Some(v) = get("RABBITMQ_CONNECTION_TIMEOUT") {
            s.connection_timeout = parse_secs("RABBITMQ_CONNECTION_TIMEOUT", &v, 0.1, 300.0)?;
        }
        if let Some(v) = get("RABBITMQ_CONFIRM_TIMEOUT") {
            s.confirm_timeout = parse_secs("RABBITMQ_CONFIRM_TIMEOUT", &v, 0.1, 600.0)?;
        }
        if let Some(v) = get("RABBITMQ_TRANSPORT") {
            s.transport = Some(v.parse()?);
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks every range and the effective URL; the error names the
    /// variable that configures the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.host.trim().is_empty() {
            return Err(invalid("RABBITMQ_HOST", "", "must not be empty"));
        }
        check_range("RABBITMQ_PORT", self.port, 1, 65535)?;
        check_range("RABBITMQ_HEARTBEAT", self.heartbeat.as_secs_f64(), 10.0, 300.0).map_err(|_| {
            invalid(
                "RABBITMQ_HEARTBEAT",
                fmt_secs(self.heartbeat).trim_end_matches(".0"),
                "must be between 10 and 300",
            )
        })?;
        check_range("RABBITMQ_CONNECTION_ATTEMPTS", self.connection_attempts, 1, 10)?;
        check_secs("RABBITMQ_RETRY_DELAY", self.retry_delay, 0.1, 60.0)?;
        check_range("RABBITMQ_DEFAULT_PREFETCH_COUNT", self.default_prefetch_count, 1, 100)?;
        if self.default_message_ttl.as_millis() > u32::MAX as u128 {
            return Err(invalid(
                "RABBITMQ_DEFAULT_MESSAGE_TTL",
                self.default_message_ttl.as_millis().to_string(),
                format!("must be between 0 and {}", u32::MAX),
            ));
        }
        if self.enable_dead_letter && self.dead_letter_exchange.trim().is_empty() {
            return Err(invalid(
                "RABBITMQ_DEAD_LETTER_EXCHANGE",
                "",
                "must not be empty when RABBITMQ_ENABLE_DEAD_LETTER is true",
            ));
        }
        check_secs("RABBITMQ_CONNECTION_TIMEOUT", self.connection_timeout, 0.1, 300.0)?;
        check_secs("RABBITMQ_CONFIRM_TIMEOUT", self.confirm_timeout, 0.1, 600.0)?;
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            let (set, missing) = if self.client_cert_file.is_some() {
                ("RABBITMQ_CLIENT_CERT_FILE", "RABBITMQ_CLIENT_KEY_FILE")
            } else {
                ("RABBITMQ_CLIENT_KEY_FILE", "RABBITMQ_CLIENT_CERT_FILE")
            };
            return Err(invalid(
                missing,
                "",
                format!("must be set when {set} is (mutual TLS needs both)"),
            ));
        }
        if self.connection_name.len() > 200 || self.connection_name.chars().any(char::is_control) {
            return Err(invalid(
                "RABBITMQ_CONNECTION_NAME",
                self.connection_name.clone(),
                "must be at most 200 bytes without control characters",
            ));
        }
        if self.memory_url() {
            if let Some(kind @ (TransportKind::Lapin | TransportKind::Amqprs)) = self.transport {
                return Err(invalid(
                    "RABBITMQ_TRANSPORT",
                    kind.as_str(),
                    "RABBITMQ_URL is a memory:// URL; set RABBITMQ_TRANSPORT=memory or an amqp:// URL",
                ));
            }
            return Ok(());
        }
        if self.transport == Some(TransportKind::Memory) {
            return Ok(());
        }
        self.endpoints()?;
        Ok(())
    }

    /// True when `RABBITMQ_URL` is a `memory://` URL.
    fn memory_url(&self) -> bool {
        self.url.expose().trim().to_ascii_lowercase().starts_with("memory://")
    }

    /// The transport these settings select: `RABBITMQ_TRANSPORT` if set,
    /// else [`TransportKind::Memory`] for a `memory://` URL, else `None`
    /// ("a RabbitMQ transport": `switchyard::connect` takes lapin when its
    /// feature is on, else amqprs).
    ///
    /// ```
    /// use switchyard_core::settings::{Settings, TransportKind};
    /// assert_eq!(Settings::default().transport_kind(), None);
    /// assert_eq!(Settings::default().with_url("memory://").transport_kind(), Some(TransportKind::Memory));
    /// assert_eq!(
    ///     Settings::default().with_transport(TransportKind::Amqprs).transport_kind(),
    ///     Some(TransportKind::Amqprs)
    /// );
    /// let e = Settings::from_lookup(|k| (k == "RABBITMQ_TRANSPORT").then(|| "kafka".to_string())).unwrap_err();
    /// assert_eq!(e.to_string(), "invalid configuration: RABBITMQ_TRANSPORT=kafka: must be one of memory, lapin, amqprs");
    /// ```
    pub fn transport_kind(&self) -> Option<TransportKind> {
        self.transport
            .or_else(|| self.memory_url().then_some(TransportKind::Memory))
    }

    /// Sets `RABBITMQ_TRANSPORT`.
    pub fn with_transport(mut self, kind: TransportKind) -> Self {
        self.transport = Some(kind);
        self
    }

    /// True when `RABBITMQ_URL` decides the connection (it is set to a value
    /// other than the default).
    pub fn url_takes_precedence(&self) -> bool {
        let u = self.url.expose().trim();
        !u.is_empty() && u != DEFAULT_URL
    }

    /// The URL transports connect to, password included: `RABBITMQ_URL` if
    /// it is not the default, else built from the parts. Never log it; use
    /// [`effective_url_redacted`](Settings::effective_url_redacted).
    pub fn effective_url(&self) -> String {
        if self.url_takes_precedence() {
            return self.url.expose().trim().to_owned();
        }
        self.url_from_parts(self.password.expose())
    }

    /// The effective URL with the password replaced by `***`.
    pub fn effective_url_redacted(&self) -> String {
        if self.url_takes_precedence() {
            return self
                .url
                .expose()
                .trim()
                .split(',')
                .map(|u| redact_url(u.trim()))
                .collect::<Vec<_>>()
                .join(",");
        }
        self.url_from_parts("***")
    }

    fn url_from_parts(&self, password: &str) -> String {
        let scheme = if self.use_tls { "amqps" } else { "amqp" };
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let password = if password == "***" {
            password.to_owned()
        } else {
            percent_encode(password)
        };
        format!(
            "{scheme}://{}:{password}@{host}:{}/{}",
            percent_encode(&self.user),
            self.port,
            percent_encode(&self.vhost)
        )
    }

    /// The effective URL's parts, decoded (for transports whose client
    /// takes host, port, user, password and vhost separately).
    pub fn endpoint(&self) -> Result<Endpoint> {
        Ok(self.endpoints()?.remove(0))
    }

    /// Every node address: the URL's (or the URLs', when `RABBITMQ_URL`
    /// lists several separated by commas), then `RABBITMQ_ADDRESSES`. They
    /// must share the scheme, credentials and vhost; an empty or unparsable
    /// entry, or a mix, is an `invalid_config` error naming the entry
    /// (without its password).
    ///
    /// ```
    /// use switchyard_core::Settings;
    /// let s = Settings::default()
    ///     .with_url("amqp://app:pw@node1:5672/prod,amqp://app:pw@node2:5672/prod")
    ///     .with_addresses(["node3:5673"]);
    /// let eps = s.endpoints().unwrap();
    /// assert_eq!(eps.iter().map(|e| e.port).collect::<Vec<_>>(), [5672, 5672, 5673]);
    /// assert_eq!(eps[2].host, "node3");
    /// let mixed = Settings::default().with_url("amqp://app:pw@a/prod,amqp://app:pw@b/test");
    /// let e = mixed.endpoints().unwrap_err().to_string();
    /// assert!(e.contains("vhost") && !e.contains("pw"), "{e}");
    /// ```
    pub fn endpoints(&self) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        if self.url_takes_precedence() {
            let url = self.url.expose().trim();
            for (i, entry) in url.split(',').enumerate() {
                let entry = entry.trim();
                if entry.is_empty() {
                    return Err(invalid(
                        "RABBITMQ_URL",
                        self.effective_url_redacted(),
                        format!("entry {} of the comma-separated list is empty", i + 1),
                    ));
                }
                out.push(parse_amqp_url("RABBITMQ_URL", entry)?);
            }
        } else {
            out.push(parse_amqp_url("RABBITMQ_HOST", &self.effective_url())?);
        }
        let first = out[0].clone();
        for (i, e) in out.iter().enumerate().skip(1) {
            let what = if e.vhost != first.vhost {
                Some("vhost")
            } else if e.user != first.user || e.password != first.password {
                Some("credentials")
            } else if e.tls != first.tls {
                Some("scheme (amqp / amqps)")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(invalid(
                    "RABBITMQ_URL",
                    redact_url(self.url.expose().trim().split(',').nth(i).unwrap_or("").trim()),
                    format!(
                        "entry {} has a different {what} from the first: every node of one cluster must share them",
                        i + 1
                    ),
                ));
            }
        }
        for (i, a) in self.addresses.iter().enumerate() {
            let (host, port) = parse_host_port(a, if first.tls { 5671 } else { 5672 }).ok_or_else(|| {
                invalid(
                    "RABBITMQ_ADDRESSES",
                    redact_url(a),
                    format!("entry {} must be host:port (IPv6 as [addr]:port)", i + 1),
                )
            })?;
            out.push(Endpoint {
                host,
                port,
                ..first.clone()
            });
        }
        Ok(out)
    }

    /// Sets `RABBITMQ_ADDRESSES`.
    pub fn with_addresses<I, A>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        self.addresses = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// True if the connection uses TLS (`amqps`).
    pub fn tls(&self) -> bool {
        if self.url_takes_precedence() {
            self.url.expose().trim().to_ascii_lowercase().starts_with("amqps://")
        } else {
            self.use_tls
        }
    }

    /// The default message TTL, `None` when it is zero (no expiration).
    pub fn message_ttl(&self) -> Option<Duration> {
        (!self.default_message_ttl.is_zero()).then_some(self.default_message_ttl)
    }

    /// The prefetch consumers should use: the default prefetch count, or 0
    /// (unlimited) when consumer prefetch is disabled.
    pub fn consumer_prefetch(&self) -> u16 {
        if self.enable_consumer_prefetch {
            self.default_prefetch_count
        } else {
            0
        }
    }

    /// A durable queue named `name` with the settings' defaults:
    /// `x-message-ttl` from `RABBITMQ_DEFAULT_MESSAGE_TTL` (none when 0) and,
    /// when `RABBITMQ_ENABLE_DEAD_LETTER` is true, `x-dead-letter-exchange`
    /// = `RABBITMQ_DEAD_LETTER_EXCHANGE` with `x-dead-letter-routing-key` =
    /// [`DEAD_LETTER_ROUTING_KEY`] (the key [`dead_letter_topology`](Self::dead_letter_topology)
    /// binds; RabbitMQ's `x-death` keeps the original key). Refine it with
    /// the [`QueueSpec`] setters.
    pub fn queue(&self, name: impl Into<String>) -> QueueSpec {
        let mut q = QueueSpec::new(name);
        if let Some(ttl) = self.message_ttl() {
            q = q.message_ttl(ttl);
        }
        if self.enable_dead_letter {
            q = q.dead_letter(self.dead_letter_exchange.clone(), Some(DEAD_LETTER_ROUTING_KEY));
        }
        q
    }

    /// A durable exchange named `name` of the kind
    /// `RABBITMQ_DEFAULT_EXCHANGE_TYPE` (topic by default).
    pub fn exchange(&self, name: impl Into<String>) -> ExchangeSpec {
        ExchangeSpec::new(name, self.default_exchange_type.clone())
    }

    /// The dead-letter exchange and queue (the seed's `contextiq.dlx` and
    /// `dead_letter`): the exchange `RABBITMQ_DEAD_LETTER_EXCHANGE` of kind
    /// `RABBITMQ_DEFAULT_EXCHANGE_TYPE`, and the durable queue `queue`
    /// bound to it with [`DEAD_LETTER_ROUTING_KEY`] — without a TTL (dead
    /// letters wait for inspection) and without a dead-letter exchange of
    /// its own (no cycle). Empty when `RABBITMQ_ENABLE_DEAD_LETTER` is false.
    /// Add the rest of the topology to it.
    pub fn dead_letter_topology(&self, queue: impl Into<String>) -> Topology {
        if !self.enable_dead_letter {
            return Topology::new();
        }
        let queue = queue.into();
        Topology::new()
            .exchange(self.exchange(self.dead_letter_exchange.clone()))
            .queue(QueueSpec::new(queue.clone()))
            .binding(Binding::queue(
                queue,
                self.dead_letter_exchange.clone(),
                DEAD_LETTER_ROUTING_KEY,
            ))
    }

    /// The dead-letter exchange, `None` when `RABBITMQ_ENABLE_DEAD_LETTER`
    /// is false.
    pub fn dead_letter(&self) -> Option<&str> {
        self.enable_dead_letter.then_some(self.dead_letter_exchange.as_str())
    }

    /// Sets `RABBITMQ_URL`.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Secret(url.into());
        self
    }
    /// Sets the host.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }
    /// Sets the port.
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Sets the user and password.
    pub fn with_credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = user.into();
        self.password = Secret(password.into());
        self
    }
    /// Sets the virtual host.
    pub fn with_vhost(mut self, vhost: impl Into<String>) -> Self {
        self.vhost = vhost.into();
        self
    }
    /// Sets the heartbeat interval.
    pub fn with_heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = d;
        self
    }
    /// Sets the number of connection attempts.
    pub fn with_connection_attempts(mut self, n: u32) -> Self {
        self.connection_attempts = n;
        self
    }
    /// Sets the delay between connection attempts.
    pub fn with_retry_delay(mut self, d: Duration) -> Self {
        self.retry_delay = d;
        self
    }
    /// Sets the default prefetch count.
    pub fn with_prefetch(mut self, n: u16) -> Self {
        self.default_prefetch_count = n;
        self
    }
    /// Sets the default message TTL (zero: none).
    pub fn with_message_ttl(mut self, d: Duration) -> Self {
        self.default_message_ttl = d;
        self
    }
    /// Sets the default exchange type.
    pub fn with_exchange_type(mut self, kind: ExchangeKind) -> Self {
        self.default_exchange_type = kind;
        self
    }
    /// Enables dead-lettering to `exchange`, or disables it with `None`.
    pub fn with_dead_letter(mut self, exchange: Option<&str>) -> Self {
        match exchange {
            Some(e) => {
                self.enable_dead_letter = true;
                self.dead_letter_exchange = e.to_owned();
            }
            None => self.enable_dead_letter = false,
        }
        self
    }
    /// Enables or disables publisher confirms.
    pub fn with_publisher_confirms(mut self, yes: bool) -> Self {
        self.enable_publisher_confirms = yes;
        self
    }
    /// Enables or disables consumer prefetch.
    pub fn with_consumer_prefetch(mut self, yes: bool) -> Self {
        self.enable_consumer_prefetch = yes;
        self
    }
    /// Uses TLS when the URL is built from the parts.
    pub fn with_tls(mut self, yes: bool) -> Self {
        self.use_tls = yes;
        self
    }
    /// Sets the CA file for TLS.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }
    /// Sets the connection timeout.
    pub fn with_connection_timeout(mut self, d: Duration) -> Self {
        self.connection_timeout = d;
        self
    }
    /// Sets the publisher-confirm timeout.
    pub fn with_confirm_timeout(mut self, d: Duration) -> Self {
        self.confirm_timeout = d;
        self
    }
}

/// The routing key of dead letters: queues from [`Settings::queue`]
/// dead-letter with it, [`Settings::dead_letter_topology`] binds the
/// dead-letter queue with it, and `DeadLetterLayer::from_settings` publishes
/// with it (the seed's `dead_letter` queue configuration).
pub const DEAD_LETTER_ROUTING_KEY: &str = "dead_letter";

/// The variable naming the `.env` file [`Settings::from_env`] reads.
pub const ENV_FILE_VARIABLE: &str = "SWITCHYARD_ENV_FILE";

/// One `RABBITMQ_*` variable and where it takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    /// The variable's name.
    pub name: &'static str,
    /// A valid value other than the default (tests set it and check that
    /// the settings change).
    pub example: &'static str,
    /// Where the value takes effect (the functions that read it, in backticks).
    pub takes_effect: &'static str,
}

/// Every `RABBITMQ_*` variable [`Settings::from_lookup`] reads, in the
/// order of the [module docs](self)' table, with where it takes effect.
pub const VARIABLES: &[Variable] = &[
    Variable { name: "RABBITMQ_URL", example: "amqp://u:p@rabbit:5673/v", takes_effect: "`AmqpConfig::from_settings` (nodes, credentials, vhost, TLS by scheme) through `Settings::endpoints`; `switchyard::connect` (a `memory://` URL selects the in-process broker)" },
    Variable { name: "RABBITMQ_HOST", example: "rabbit", takes_effect: "`Settings::effective_url` (when RABBITMQ_URL is the default) → `AmqpConfig::from_settings`" },
    Variable { name: "RABBITMQ_PORT", example: "5673", takes_effect: "`Settings::effective_url` → `AmqpConfig::from_settings`" },
    Variable { name: "RABBITMQ_USER", example: "app", takes_effect: "`Settings::effective_url` → `AmqpConfig::from_settings` (login)" },
    Variable { name: "RABBITMQ_PASSWORD", example: "s3cret", takes_effect: "`Settings::effective_url` → `AmqpConfig::from_settings` (login; never printed)" },
    Variable { name: "RABBITMQ_VHOST", example: "prod", takes_effect: "`Settings::effective_url` → `AmqpConfig::from_settings` (virtual host)" },
    Variable { name: "RABBITMQ_HEARTBEAT", example: "30", takes_effect: "`AmqpConfig::from_settings` (AMQP heartbeat of every connection)" },
    Variable { name: "RABBITMQ_CONNECTION_ATTEMPTS", example: "5", takes_effect: "`AmqpConfig::from_settings` (attempts of the first connection)" },
    Variable { name: "RABBITMQ_RETRY_DELAY", example: "5.0", takes_effect: "`AmqpConfig::from_settings` (delay between connection attempts; reconnect backoff cap)" },
    Variable { name: "RABBITMQ_DEFAULT_PREFETCH_COUNT", example: "20", takes_effect: "`Settings::consumer_prefetch` → `Worker::with_settings` (routes' prefetch); `AmqpConfig::from_settings` (a consume without prefetch)" },
    Variable { name: "RABBITMQ_DEFAULT_MESSAGE_TTL", example: "60000", takes_effect: "`Settings::queue`, `Topology::with_defaults` (`x-message-ttl` of queues declared from the settings)" },
    Variable { name: "RABBITMQ_DEFAULT_EXCHANGE_TYPE", example: "direct", takes_effect: "`Settings::exchange` and `Settings::dead_letter_topology` (kind of exchanges declared from the settings)" },
    Variable { name: "RABBITMQ_ENABLE_DEAD_LETTER", example: "false", takes_effect: "`Settings::queue`, `Topology::with_defaults` (`x-dead-letter-exchange` or none), `Settings::dead_letter_topology`, `DeadLetterLayer::from_settings`" },
    Variable { name: "RABBITMQ_DEAD_LETTER_EXCHANGE", example: "app.dlx", takes_effect: "`Settings::queue`, `Topology::with_defaults`, `Settings::dead_letter_topology`, `DeadLetterLayer::from_settings` (the exchange dead letters go to)" },
    Variable { name: "RABBITMQ_ENABLE_PUBLISHER_CONFIRMS", example: "false", takes_effect: "`AmqpConfig::from_settings` (confirm mode of publishing channels)" },
    Variable { name: "RABBITMQ_ENABLE_CONSUMER_PREFETCH", example: "false", takes_effect: "`Settings::consumer_prefetch` → `Worker::with_settings` (prefetch 0 when false: unlimited on the memory broker; the RabbitMQ transports never consume unbounded and use `AmqpConfig::from_settings`'s default prefetch instead)" },
    Variable { name: "RABBITMQ_USE_TLS", example: "true", takes_effect: "`Settings::effective_url` (`amqps` when the URL is built from the parts) → `AmqpConfig::from_settings`" },
    Variable { name: "RABBITMQ_CA_FILE", example: "/etc/ca.pem", takes_effect: "`AmqpConfig::from_settings` (trusted CAs, read at start)" },
    Variable { name: "RABBITMQ_CLIENT_CERT_FILE", example: "/etc/client.pem", takes_effect: "`AmqpConfig::from_settings` (mutual TLS certificate, read at start)" },
    Variable { name: "RABBITMQ_CLIENT_KEY_FILE", example: "/etc/client.key", takes_effect: "`AmqpConfig::from_settings` (mutual TLS key, read at start)" },
    Variable { name: "RABBITMQ_ADDRESSES", example: "node2:5672,node3:5672", takes_effect: "`Settings::endpoints` → `AmqpConfig::from_settings` (more cluster nodes)" },
    Variable { name: "RABBITMQ_ADDRESS_ORDER", example: "in-order", takes_effect: "`AmqpConfig::from_settings` (shuffle or keep the node order)" },
    Variable { name: "RABBITMQ_CONNECTION_NAME", example: "billing", takes_effect: "`AmqpConfig::from_settings` (connection name in the management UI)" },
    Variable { name: "RABBITMQ_CONNECTION_TIMEOUT", example: "5.0", takes_effect: "`AmqpConfig::from_settings` (limit of one connection attempt)" },
    Variable { name: "RABBITMQ_CONFIRM_TIMEOUT", example: "10.0", takes_effect: "`AmqpConfig::from_settings` (how long a publish waits for its confirm)" },
    Variable { name: "RABBITMQ_TRANSPORT", example: "memory", takes_effect: "`switchyard::connect` (which transport is built)" },
];

/// True for variables whose values must never be printed: passwords and
/// URLs (which may hold one).
pub fn is_secret_variable(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    n.contains("PASSWORD") || n.contains("URL") || n.contains("SECRET") || n.contains("TOKEN")
}

/// `value` as it may be printed for variable `name`: `***` for passwords
/// and secrets, the URL with its password redacted for URL variables.
pub fn display_value(name: &str, value: &str) -> String {
    let n = name.to_ascii_uppercase();
    if n.contains("URL") && !(n.contains("PASSWORD") || n.contains("SECRET") || n.contains("TOKEN")) {
        value
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",")
    } else if is_secret_variable(name) {
        "***".to_owned()
    } else {
        value.to_owned()
    }
}

/// Reads a `.env` file (see the [module docs](self)): its `KEY=value`
/// entries in file order, `${VAR}` references resolved against the process
/// environment and earlier lines. Errors are `invalid_config` naming the
/// file and line, never the value.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    read_env_file_with(path, &|name: &str| std::env::var(name).ok())
}

fn read_env_file_with(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            ENV_FILE_VARIABLE,
            path.display().to_string(),
            format!("cannot read the file: {e}"),
        )
    })?;
    parse_env_text(&path.display().to_string(), &text, env)
}

fn parse_env_text(file: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let at = format!("line {}", i + 1);
        let bad = |reason: String| invalid(file, at.as_str(), reason);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map(str::trim_start).unwrap_or(line);
        let Some((key, rest)) = line.split_once('=') else {
            return Err(bad("expected KEY=value".into()));
        };
        let key = key.trim();
        let valid_key = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(bad(
                "the name must be letters, digits and '_', not starting with a digit".into(),
            ));
        }
        let rest = rest.trim_start();
        let lookup = |name: &str| -> String {
            env(name)
                .or_else(|| out.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                .unwrap_or_else(|| {
                    tracing::warn!(
                        file,
                        line = i + 1,
                        variable = name,
                        "${{{name}}} is not set: replaced by nothing"
                    );
                    String::new()
                })
        };
        let value = if let Some(body) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = body.chars();
            let mut closed = None;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = Some(chars.as_str());
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('n') => v.push('\n'),
                        Some('t') => v.push('\t'),
                        Some(c @ ('"' | '\\' | '$')) => {
                            if c == '$' {
                                v.push('\u{0}');
                            } else {
                                v.push(c);
                            }
                        }
                        Some(c) => {
                            v.push('\\');
                            v.push(c);
                        }
                        None => break,
                    },
                    c => v.push(c),
                }
            }
            let Some(after) = closed else {
                return Err(bad(format!("{key}: the double quote is not closed on this line")));
            };
            check_after_quote(after).map_err(|r| bad(format!("{key}: {r}")))?;
            expand(&v, &lookup).replace('\u{0}', "$")
        } else if let Some(body) = rest.strip_prefix('\'') {
            let Some(end) = body.find('\'') else {
                return Err(bad(format!("{key}: the single quote is not closed on this line")));
            };
            check_after_quote(&body[end + 1..]).map_err(|r| bad(format!("{key}: {r}")))?;
            body[..end].to_owned()
        } else {
            // Unquoted: a '#' after whitespace starts a comment.
            let mut end = rest.len();
            let bytes = rest.as_bytes();
            for (j, b) in bytes.iter().enumerate() {
                if *b == b'#' && (j == 0 || bytes[j - 1].is_ascii_whitespace()) {
                    end = j;
                    break;
                }
            }
            let v = rest[..end].trim();
            if v.contains(['"', '\'']) {
                return Err(bad(format!("{key}: quotes must enclose the whole value")));
            }
            expand(v, &lookup)
        };
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

fn check_after_quote(after: &str) -> std::result::Result<(), &'static str> {
    let t = after.trim_start();
    if t.is_empty() || t.starts_with('#') {
        Ok(())
    } else {
        Err("unexpected text after the closing quote")
    }
}

/// Replaces `${NAME}` with `lookup(NAME)`.
fn expand(v: &str, lookup: &dyn Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(start) = rest.find("${") {
        match rest[start + 2..].find('}') {
            Some(len) => {
                out.push_str(&rest[..start]);
                out.push_str(&lookup(&rest[start + 2..start + 2 + len]));
                rest = &rest[start + 3 + len..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

static GLOBAL: OnceLock<std::result::Result<Settings, (String, String, String)>> = OnceLock::new();

/// The process-wide settings, read from the environment on the first call
/// and cached (like the seed's `lru_cache`d getter).
///
/// The outcome is cached too: if the environment is invalid, every call
/// returns the same [`Error::InvalidConfig`] (fix the variable and restart;
/// tests should use [`Settings::from_lookup`] instead).
pub fn get() -> Result<&'static Settings> {
    let cached = GLOBAL.get_or_init(|| {
        Settings::from_env().map_err(|e| match e {
            Error::InvalidConfig {
                variable,
                value,
                reason,
            } => (variable, value, reason),
            other => ("RABBITMQ_*".to_owned(), String::new(), other.to_string()),
        })
    });
    match cached {
        Ok(s) => Ok(s),
        Err((variable, value, reason)) => Err(invalid(variable, value.as_str(), reason.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_transport_is_parsed_validated_and_checked_against_the_url() {
        assert_eq!(lookup(&[]).unwrap().transport, None);
        for (raw, kind) in [
            ("memory", TransportKind::Memory),
            ("LAPIN", TransportKind::Lapin),
            (" amqprs ", TransportKind::Amqprs),
        ] {
            let s = one("RABBITMQ_TRANSPORT", raw).unwrap();
            assert_eq!(s.transport, Some(kind));
            assert_eq!(s.transport_kind(), Some(kind));
        }
        let e = one("RABBITMQ_TRANSPORT", "kafka").unwrap_err();
        assert_eq!(e.code(), "invalid_config");
        assert!(e.to_string().contains("RABBITMQ_TRANSPORT=kafka"), "{e}");
        // Empty counts as unset.
        assert_eq!(one("RABBITMQ_TRANSPORT", "").unwrap().transport, None);
        // A memory:// URL selects memory and skips the AMQP URL checks.
        let s = one("RABBITMQ_URL", "memory://").unwrap();
        assert_eq!(s.transport_kind(), Some(TransportKind::Memory));
        let e = lookup(&[("RABBITMQ_URL", "memory://"), ("RABBITMQ_TRANSPORT", "lapin")]).unwrap_err();
        assert!(e.to_string().contains("RABBITMQ_TRANSPORT=lapin"), "{e}");
        assert!(e.to_string().contains("memory://"), "{e}");
        let s = lookup(&[("RABBITMQ_URL", "memory://"), ("RABBITMQ_TRANSPORT", "memory")]).unwrap();
        assert_eq!(s.transport_kind(), Some(TransportKind::Memory));
        // An amqp URL leaves the choice to the features.
        assert_eq!(
            one("RABBITMQ_URL", "amqp://u:p@h:5672/v").unwrap().transport_kind(),
            None
        );
        // Some other scheme is still refused unless the transport is memory.
        assert!(one("RABBITMQ_URL", "kafka://x").is_err());
    }

    fn lookup(pairs: &[(&str, &str)]) -> Result<Settings> {
        let owned: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(move |name| owned.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn one(name: &str, value: &str) -> Result<Settings> {
        lookup(&[(name, value)])
    }

    fn err_text(r: Result<Settings>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code(), "invalid_config");
        e.to_string()
    }

    #[test]
    fn defaults_match_the_seed() {
        let s = lookup(&[]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.host, "localhost");
        assert_eq!(s.port, 5672);
        assert_eq!(s.user, "guest");
        assert_eq!(s.password.expose(), "guest");
        assert_eq!(s.vhost, "/");
        assert_eq!(s.heartbeat, Duration::from_secs(60));
        assert_eq!(s.connection_attempts, 3);
        assert_eq!(s.retry_delay, Duration::from_secs(2));
        assert_eq!(s.default_prefetch_count, 10);
        assert_eq!(s.default_message_ttl, Duration::from_millis(86_400_000));
        assert_eq!(s.message_ttl(), Some(Duration::from_secs(86_400)));
        assert_eq!(s.default_exchange_type, ExchangeKind::Topic);
        assert!(s.enable_dead_letter);
        assert_eq!(s.dead_letter_exchange, "contextiq.dlx");
        assert!(s.enable_publisher_confirms);
        assert!(s.enable_consumer_prefetch);
        assert!(!s.tls());
        assert_eq!(s.ca_file, None);
        assert_eq!(s.effective_url(), "amqp://guest:guest@localhost:5672/%2F");
        assert!(!s.url_takes_precedence());
        s.validate().unwrap();
    }

    #[test]
    fn integer_ranges_at_both_edges_and_just_outside() {
        let cases: &[(&str, &str, &str, &str, &str, &str)] = &[
            // variable, low, high, below, above, range text
            ("RABBITMQ_HEARTBEAT", "10", "300", "9", "301", "between 10 and 300"),
            ("RABBITMQ_CONNECTION_ATTEMPTS", "1", "10", "0", "11", "between 1 and 10"),
            (
                "RABBITMQ_DEFAULT_PREFETCH_COUNT",
                "1",
                "100",
                "0",
                "101",
                "between 1 and 100",
            ),
            ("RABBITMQ_PORT", "1", "65535", "0", "65536", "between 1 and 65535"),
        ];
        for (var, lo, hi, below, above, range) in cases {
            one(var, lo).unwrap_or_else(|e| panic!("{var}={lo}: {e}"));
            one(var, hi).unwrap_or_else(|e| panic!("{var}={hi}: {e}"));
            for bad in [below, above] {
                let t = err_text(one(var, bad));
                assert_eq!(t, format!("invalid configuration: {var}={bad}: must be {range}"));
            }
        }
        let s = lookup(&[
            ("RABBITMQ_HEARTBEAT", "10"),
            ("RABBITMQ_CONNECTION_ATTEMPTS", "10"),
            ("RABBITMQ_DEFAULT_PREFETCH_COUNT", "100"),
            ("RABBITMQ_PORT", "65535"),
        ])
        .unwrap();
        assert_eq!(s.heartbeat, Duration::from_secs(10));
        assert_eq!(s.connection_attempts, 10);
        assert_eq!(s.default_prefetch_count, 100);
        assert_eq!(s.port, 65535);
        assert_eq!(
            err_text(one("RABBITMQ_HEARTBEAT", "5")),
            "invalid configuration: RABBITMQ_HEARTBEAT=5: must be between 10 and 300"
        );
        assert!(err_text(one("RABBITMQ_PORT", "-1")).contains("must be between 1 and 65535"));
    }

    #[test]
    fn retry_delay_is_a_float_range() {
        assert_eq!(
            one("RABBITMQ_RETRY_DELAY", "0.1").unwrap().retry_delay,
            Duration::from_millis(100)
        );
        assert_eq!(
            one("RABBITMQ_RETRY_DELAY", "60.0").unwrap().retry_delay,
            Duration::from_secs(60)
        );
        assert_eq!(
            one("RABBITMQ_RETRY_DELAY", "60").unwrap().retry_delay,
            Duration::from_secs(60)
        );
        assert_eq!(
            err_text(one("RABBITMQ_RETRY_DELAY", "0.09")),
            "invalid configuration: RABBITMQ_RETRY_DELAY=0.09: must be between 0.1 and 60.0"
        );
        assert_eq!(
            err_text(one("RABBITMQ_RETRY_DELAY", "60.01")),
            "invalid configuration: RABBITMQ_RETRY_DELAY=60.01: must be between 0.1 and 60.0"
        );
        assert!(err_text(one("RABBITMQ_RETRY_DELAY", "NaN")).contains("RABBITMQ_RETRY_DELAY=NaN"));
        assert!(err_text(one("RABBITMQ_RETRY_DELAY", "soon")).contains("must be a number of seconds"));
        // Built by hand, validate() holds the same range.
        let e = Settings::default()
            .with_retry_delay(Duration::from_millis(50))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("RABBITMQ_RETRY_DELAY=0.05"), "{e}");
        Settings::default()
            .with_retry_delay(Duration::from_millis(100))
            .validate()
            .unwrap();
    }

    #[test]
    fn bad_port_text_and_non_numbers() {
        assert_eq!(
            err_text(one("RABBITMQ_PORT", "http")),
            "invalid configuration: RABBITMQ_PORT=http: must be an integer between 1 and 65535"
        );
        assert!(err_text(one("RABBITMQ_PORT", "56 72")).contains("RABBITMQ_PORT=56 72"));
        assert!(err_text(one("RABBITMQ_HEARTBEAT", "1.5")).contains("must be an integer between 10 and 300"));
        assert!(err_text(one("RABBITMQ_DEFAULT_MESSAGE_TTL", "-1")).contains("RABBITMQ_DEFAULT_MESSAGE_TTL=-1"));
        assert_eq!(one("RABBITMQ_DEFAULT_MESSAGE_TTL", "0").unwrap().message_ttl(), None);
        // Empty numeric values count as unset.
        assert_eq!(one("RABBITMQ_PORT", "").unwrap().port, 5672);
    }

    #[test]
    fn booleans_accept_six_spellings_and_nothing_else() {
        for (v, want) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("Yes", true),
            ("false", false),
            ("False", false),
            ("0", false),
            ("NO", false),
        ] {
            assert_eq!(
                one("RABBITMQ_ENABLE_DEAD_LETTER", v).unwrap().enable_dead_letter,
                want,
                "{v}"
            );
            assert_eq!(
                one("RABBITMQ_ENABLE_PUBLISHER_CONFIRMS", v)
                    .unwrap()
                    .enable_publisher_confirms,
                want
            );
        }
        for bad in ["on", "off", "2", "ture", "y"] {
            assert_eq!(
                err_text(one("RABBITMQ_ENABLE_CONSUMER_PREFETCH", bad)),
                format!(
                    "invalid configuration: RABBITMQ_ENABLE_CONSUMER_PREFETCH={bad}: must be one of true, false, 1, 0, yes, no"
                )
            );
        }
        let s = one("RABBITMQ_ENABLE_CONSUMER_PREFETCH", "false").unwrap();
        assert_eq!(s.consumer_prefetch(), 0);
        assert_eq!(Settings::default().consumer_prefetch(), 10);
    }

    #[test]
    fn exchange_type_and_dead_letter_exchange() {
        assert_eq!(
            one("RABBITMQ_DEFAULT_EXCHANGE_TYPE", "Direct")
                .unwrap()
                .default_exchange_type,
            ExchangeKind::Direct
        );
        assert_eq!(
            err_text(one("RABBITMQ_DEFAULT_EXCHANGE_TYPE", "fan")),
            "invalid configuration: RABBITMQ_DEFAULT_EXCHANGE_TYPE=fan: must be one of direct, topic, fanout, headers"
        );
        assert_eq!(
            one("RABBITMQ_DEAD_LETTER_EXCHANGE", "my.dlx")
                .unwrap()
                .dead_letter_exchange,
            "my.dlx"
        );
        let e = Settings::default().with_dead_letter(Some("")).validate().unwrap_err();
        assert!(e.to_string().contains("RABBITMQ_DEAD_LETTER_EXCHANGE"));
        Settings::default().with_dead_letter(None).validate().unwrap();
    }

    #[test]
    fn url_precedence_rule() {
        // A non-default URL wins over the parts.
        let s = lookup(&[
            ("RABBITMQ_URL", "amqp://app:pw@rabbit.internal:5673/prod"),
            ("RABBITMQ_HOST", "ignored"),
            ("RABBITMQ_PORT", "1234"),
        ])
        .unwrap();
        assert!(s.url_takes_precedence());
        assert_eq!(s.effective_url(), "amqp://app:pw@rabbit.internal:5673/prod");
        let ep = s.endpoint().unwrap();
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.user.as_str(), ep.vhost.as_str()),
            ("rabbit.internal", 5673, "app", "prod")
        );
        assert_eq!(ep.password.expose(), "pw");
        // The default URL (set explicitly) does not: the parts decide.
        let s = lookup(&[
            ("RABBITMQ_URL", DEFAULT_URL),
            ("RABBITMQ_HOST", "rabbitmq"),
            ("RABBITMQ_USER", "contextiq"),
            ("RABBITMQ_PASSWORD", "contextiq_dev_password"),
        ])
        .unwrap();
        assert!(!s.url_takes_precedence());
        assert_eq!(
            s.effective_url(),
            "amqp://contextiq:contextiq_dev_password@rabbitmq:5672/%2F"
        );
        // Unset URL: parts.
        let s = one("RABBITMQ_PORT", "5673").unwrap();
        assert_eq!(s.effective_url(), "amqp://guest:guest@localhost:5673/%2F");
        assert_eq!(s.endpoint().unwrap().vhost, "/");
    }

    #[test]
    fn vhost_user_and_password_are_percent_encoded() {
        let s = lookup(&[
            ("RABBITMQ_VHOST", "team/a b"),
            ("RABBITMQ_USER", "us@r"),
            ("RABBITMQ_PASSWORD", "p:w/d@%"),
        ])
        .unwrap();
        assert_eq!(
            s.effective_url(),
            "amqp://us%40r:p%3Aw%2Fd%40%25@localhost:5672/team%2Fa%20b"
        );
        let ep = s.endpoint().unwrap();
        assert_eq!(ep.vhost, "team/a b");
        assert_eq!(ep.user, "us@r");
        assert_eq!(ep.password.expose(), "p:w/d@%");
        assert_eq!(
            Settings::default().with_vhost("/").effective_url_redacted(),
            "amqp://guest:***@localhost:5672/%2F"
        );
    }

    #[test]
    fn amqps_tls_and_ca_file() {
        let s = lookup(&[
            (
                "RABBITMQ_URL",
                "amqps://contextiq:pw@rabbitmq.production.internal/contextiq",
            ),
            ("RABBITMQ_CA_FILE", "/etc/ssl/ca.pem"),
        ])
        .unwrap();
        assert!(s.tls());
        let ep = s.endpoint().unwrap();
        assert!(ep.tls);
        assert_eq!(ep.port, 5671);
        assert_eq!(s.ca_file.as_deref(), Some(std::path::Path::new("/etc/ssl/ca.pem")));
        let s = lookup(&[("RABBITMQ_USE_TLS", "yes"), ("RABBITMQ_PORT", "5671")]).unwrap();
        assert!(s.tls());
        assert_eq!(s.effective_url(), "amqps://guest:guest@localhost:5671/%2F");
        let ep = parse_amqp_url("X", "amqp://[::1]:5673").unwrap();
        assert_eq!((ep.host.as_str(), ep.port, ep.vhost.as_str()), ("::1", 5673, "/"));
        assert_eq!(
            Settings::default().with_host("::1").effective_url_redacted(),
            "amqp://guest:***@[::1]:5672/%2F"
        );
    }

    #[test]
    fn malformed_urls_are_errors_without_the_password() {
        for bad in [
            "http://u:hunter2@host/",
            "amqp://u:hunter2@host:notaport/",
            "amqp://u:hunter2@:5672/",
            "amqp://u:hunter2@host:0/",
            "amqp://u:hunter2@host/a/b",
            "u:hunter2@host",
        ] {
            let t = err_text(one("RABBITMQ_URL", bad));
            assert!(t.contains("RABBITMQ_URL="), "{t}");
            assert!(!t.contains("hunter2"), "password leaked: {t}");
            if bad.contains("://") {
                assert!(t.contains("u:***@"), "{t}");
            }
        }
    }

    #[test]
    fn passwords_with_unencoded_delimiters_are_rejected_and_never_printed() {
        for (url, secret) in [
            ("amqp://u:pa#ss@host:5672/%2F", "pa#ss"),
            ("amqp://u:pa/ss@host/", "pa/ss"),
            ("amqp://u:pa?ss@host/", "pa?ss"),
            ("amqp://admin:1234/xyz@rabbit.internal", "1234/xyz"),
            ("amqp://admin:1234/xyz@rabbit.internal:5672/", "1234/xyz"),
        ] {
            let e = one("RABBITMQ_URL", url).unwrap_err();
            assert_eq!(e.code(), "invalid_config");
            for t in [e.to_string(), format!("{e:?}")] {
                assert!(!t.contains(secret), "password leaked: {t}");
                assert!(t.contains("percent-encode"), "{t}");
                assert!(t.contains("RABBITMQ_URL"), "{t}");
            }
            let e = parse_amqp_url("X", url).unwrap_err();
            assert!(!format!("{e} {e:?}").contains(secret), "{e:?}");
            // Never validated, still never printed.
            let s = Settings::default().with_url(url);
            for t in [
                s.effective_url_redacted(),
                format!("{s:?}"),
                s.to_string(),
                redact_url(url),
            ] {
                assert!(!t.contains(secret), "password leaked: {t}");
                assert!(t.contains("amqp://***@"), "{t}");
            }
        }
        // An unencoded '@' in the password is unambiguous: accepted and hidden.
        let s = one("RABBITMQ_URL", "amqp://u:p@ss@host:5673/vh").unwrap();
        let ep = s.endpoint().unwrap();
        assert_eq!((ep.user.as_str(), ep.password.expose()), ("u", "p@ss"));
        assert_eq!((ep.host.as_str(), ep.port, ep.vhost.as_str()), ("host", 5673, "vh"));
        assert_eq!(s.effective_url_redacted(), "amqp://u:***@host:5673/vh");
        assert!(!format!("{s:?} {s}").contains("p@ss"));
        // The percent-encoded forms work.
        let ep = parse_amqp_url("X", "amqp://admin:1234%2Fxyz@rabbit.internal").unwrap();
        assert_eq!(
            (ep.password.expose(), ep.host.as_str()),
            ("1234/xyz", "rabbit.internal")
        );
        let ep = parse_amqp_url("X", "amqp://u:pa%23s%3Fs@host/%2F").unwrap();
        assert_eq!((ep.password.expose(), ep.vhost.as_str()), ("pa#s?s", "/"));
    }

    #[test]
    fn password_never_printed() {
        let s = lookup(&[("RABBITMQ_PASSWORD", "hunter2"), ("RABBITMQ_USER", "bob")]).unwrap();
        let dbg = format!("{s:?}");
        let disp = s.to_string();
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!disp.contains("hunter2"), "{disp}");
        assert!(disp.contains("amqp://bob:***@localhost:5672/%2F"), "{disp}");
        assert_eq!(s.effective_url_redacted(), "amqp://bob:***@localhost:5672/%2F");
        assert!(s.effective_url().contains("hunter2"));
        let s = one("RABBITMQ_URL", "amqp://bob:hunter2@h/").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!s.to_string().contains("hunter2"));
        assert!(!format!("{:?}", s.endpoint().unwrap()).contains("hunter2"));
        assert_eq!(format!("{}", Secret::new("hunter2")), "***");
        assert_eq!(redact_url("amqp://h/"), "amqp://h/");
        // An out-of-range value next to a password: the error names only the variable.
        let e = lookup(&[("RABBITMQ_PASSWORD", "hunter2"), ("RABBITMQ_HEARTBEAT", "400")]).unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn empty_password_is_kept_and_host_must_not_be_empty() {
        let s = one("RABBITMQ_PASSWORD", "").unwrap();
        assert_eq!(s.password.expose(), "");
        assert_eq!(s.effective_url(), "amqp://guest:@localhost:5672/%2F");
        let e = Settings::default().with_host(" ").validate().unwrap_err();
        assert!(e.to_string().contains("RABBITMQ_HOST"));
    }

    #[test]
    fn global_getter_is_cached() {
        let a = get().map(|s| s as *const Settings);
        let b = get().map(|s| s as *const Settings);
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("cached getter changed its answer"),
        }
    }

    /// The names of the `RABBITMQ_*` variables `from_lookup` reads, from
    /// this file's source.
    fn variables_read_by_from_lookup() -> Vec<String> {
        let src = include_str!("settings.rs");
        let start = src.find("pub fn from_lookup").unwrap();
        let end = start + src[start..].find("s.validate()?;").unwrap();
        let body = &src[start..end];
        let mut names = Vec::new();
        for pat in ["get(\"", "get_raw(\""] {
            for (i, _) in body.match_indices(pat) {
                let rest = &body[i + pat.len()..];
                names.push(rest[..rest.find('"').unwrap()].to_owned());
            }
        }
        names
    }

    #[test]
    fn every_variable_read_is_listed_with_where_it_takes_effect() {
        let listed: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        let mut read = variables_read_by_from_lookup();
        assert!(read.len() >= 26, "{read:?}");
        read.sort();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(
            read, sorted,
            "from_lookup and VARIABLES differ: add an entry to VARIABLES (or remove one)"
        );
        // The module docs' table lists the same variables, in the same order.
        let table: Vec<&str> = include_str!("settings.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! | `RABBITMQ_"))
            .map(|l| l.split('`').next().unwrap())
            .collect();
        let table: Vec<String> = table.iter().map(|n| format!("RABBITMQ_{n}")).collect();
        assert_eq!(table, listed, "the module docs' table and VARIABLES differ");
    }

    /// Every function a `takes_effect` names (in backticks) exists in the
    /// workspace's sources.
    #[test]
    fn where_each_variable_takes_effect_names_existing_functions() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut sources = String::new();
        fn walk(dir: &Path, out: &mut String) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        for krate in ["core", "amqp", "middleware", "."] {
            let dir = root.join(krate).join("src");
            if dir.is_dir() {
                walk(&dir, &mut sources);
            }
        }
        for v in VARIABLES {
            let named: Vec<&str> = v
                .takes_effect
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|t| t.contains("::") && !t.contains(' '))
                .collect();
            assert!(
                !named.is_empty(),
                "{}: takes_effect names no function: {}",
                v.name,
                v.takes_effect
            );
            for item in named {
                let f = item.rsplit("::").next().unwrap();
                assert!(
                    sources.contains(&format!("fn {f}(")) || sources.contains(&format!("fn {f}<")),
                    "{}: `{item}` not found in the workspace",
                    v.name
                );
            }
        }
    }

    #[test]
    fn every_variable_changes_the_settings() {
        for v in VARIABLES {
            let mut pairs = vec![(v.name, v.example)];
            // Variables that only count together with another one.
            match v.name {
                "RABBITMQ_CLIENT_CERT_FILE" => pairs.push(("RABBITMQ_CLIENT_KEY_FILE", "/k")),
                "RABBITMQ_CLIENT_KEY_FILE" => pairs.push(("RABBITMQ_CLIENT_CERT_FILE", "/c")),
                _ => {}
            }
            let s = lookup(&pairs).unwrap_or_else(|e| panic!("{}={}: {e}", v.name, v.example));
            let with_partner_only = match v.name {
                "RABBITMQ_CLIENT_CERT_FILE" => {
                    lookup(&[("RABBITMQ_CLIENT_KEY_FILE", "/k"), ("RABBITMQ_CLIENT_CERT_FILE", "/c")]).unwrap()
                }
                "RABBITMQ_CLIENT_KEY_FILE" => {
                    lookup(&[("RABBITMQ_CLIENT_CERT_FILE", "/c"), ("RABBITMQ_CLIENT_KEY_FILE", "/k")]).unwrap()
                }
                _ => Settings::default(),
            };
            assert_ne!(s, with_partner_only, "{}={} changed nothing", v.name, v.example);
        }
    }

    #[test]
    fn queue_and_exchange_specs_apply_ttl_dead_lettering_and_exchange_type() {
        let s = Settings::default();
        let q = s.queue("work");
        assert!(q.durable);
        assert_eq!(q.arguments.message_ttl, Some(Duration::from_millis(86_400_000)));
        assert_eq!(q.arguments.dead_letter_exchange.as_deref(), Some("contextiq.dlx"));
        assert_eq!(
            q.arguments.dead_letter_routing_key.as_deref(),
            Some(DEAD_LETTER_ROUTING_KEY)
        );
        assert_eq!(s.exchange("x").kind, ExchangeKind::Topic);
        let t = s.dead_letter_topology("dead_letter");
        assert_eq!(t.exchanges, vec![ExchangeSpec::topic("contextiq.dlx")]);
        assert_eq!(t.queues, vec![QueueSpec::new("dead_letter")]);
        assert_eq!(
            t.bindings,
            vec![Binding::queue("dead_letter", "contextiq.dlx", DEAD_LETTER_ROUTING_KEY)]
        );
        assert_eq!(s.dead_letter(), Some("contextiq.dlx"));

        let s = lookup(&[
            ("RABBITMQ_DEFAULT_MESSAGE_TTL", "0"),
            ("RABBITMQ_ENABLE_DEAD_LETTER", "false"),
            ("RABBITMQ_DEFAULT_EXCHANGE_TYPE", "fanout"),
        ])
        .unwrap();
        assert_eq!(s.queue("work"), QueueSpec::new("work"));
        assert_eq!(s.exchange("x"), ExchangeSpec::fanout("x"));
        assert_eq!(s.dead_letter_topology("dead_letter"), Topology::new());
        assert_eq!(s.dead_letter(), None);

        let s = lookup(&[
            ("RABBITMQ_DEAD_LETTER_EXCHANGE", "app.dlx"),
            ("RABBITMQ_DEFAULT_EXCHANGE_TYPE", "direct"),
        ])
        .unwrap();
        assert_eq!(s.queue("w").arguments.dead_letter_exchange.as_deref(), Some("app.dlx"));
        assert_eq!(
            s.dead_letter_topology("dlq").exchanges,
            vec![ExchangeSpec::direct("app.dlx")]
        );
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    fn parse(text: &str) -> Result<Vec<(String, String)>> {
        parse_env_text(".env", text, &env_of(&[("FROM_ENV", "e")]))
    }

    #[test]
    fn env_file_syntax_comments_quotes_exports_and_references() {
        let got = parse(
            "# comment\n\nRABBITMQ_HOST=rabbit # trailing comment\nexport RABBITMQ_USER = app\n\
             RABBITMQ_PASSWORD=\"p#ss \\\"q\\\" ${FROM_ENV}\"\nRABBITMQ_VHOST='/ ${literal}'\n\
             RABBITMQ_URL=amqps://app:${RABBITMQ_PASSWORD}@h:5671/v\nEMPTY=\nHASH=a#b\n",
        )
        .unwrap();
        let get = |k: &str| got.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RABBITMQ_HOST"), Some("rabbit"));
        assert_eq!(get("RABBITMQ_USER"), Some("app"));
        assert_eq!(get("RABBITMQ_PASSWORD"), Some("p#ss \"q\" e"));
        assert_eq!(get("RABBITMQ_VHOST"), Some("/ ${literal}"));
        assert_eq!(get("RABBITMQ_URL"), Some("amqps://app:p#ss \"q\" e@h:5671/v"));
        assert_eq!(get("EMPTY"), Some(""));
        assert_eq!(get("HASH"), Some("a#b"));
        assert_eq!(got.len(), 7);
    }

    #[test]
    fn malformed_env_lines_name_the_file_and_line_but_not_the_value() {
        for (text, line, why) in [
            ("A=1\nRABBITMQ_PASSWORD\n", 2, "expected KEY=value"),
            ("RABBITMQ_PASSWORD=\"hunter2\n", 1, "not closed"),
            ("\n\nRABBITMQ_PASSWORD='hunter2\n", 3, "not closed"),
            ("RABBITMQ_PASSWORD=\"hunter2\" x\n", 1, "after the closing quote"),
            ("1BAD=hunter2\n", 1, "letters, digits"),
            ("RABBITMQ_PASSWORD=hun\"ter2\n", 1, "quotes"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.code(), "invalid_config");
            let msg = e.to_string();
            assert!(msg.contains(".env") && msg.contains(&format!("line {line}")), "{msg}");
            assert!(msg.contains(why), "{msg}");
            assert!(!msg.contains("hunter2") && !msg.contains("ter2"), "{msg}");
        }
    }

    #[test]
    fn from_env_reads_the_file_with_the_process_environment_first() {
        let dir = std::env::temp_dir().join(format!("switchyard-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(".env");
        std::fs::write(
            &file,
            "RABBITMQ_HOST=from-file\nRABBITMQ_PORT=5673\nRABBITMQ_HEARTBEAT=30\n",
        )
        .unwrap();
        // ./.env (here: `file`) read; the environment wins over it.
        let s = Settings::from_sources(env_of(&[("RABBITMQ_HEARTBEAT", "45")]), &file).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("from-file", 5673));
        assert_eq!(s.heartbeat, Duration::from_secs(45));
        // No file: defaults.
        let s = Settings::from_sources(env_of(&[]), &dir.join("missing")).unwrap();
        assert_eq!(s, Settings::default());
        // SWITCHYARD_ENV_FILE points elsewhere (and must exist).
        let other = dir.join("prod.env");
        std::fs::write(&other, "RABBITMQ_DEFAULT_PREFETCH_COUNT=20\n").unwrap();
        let path: &'static str = Box::leak(other.display().to_string().into_boxed_str());
        let pairs: &'static [(&str, &str)] = Box::leak(vec![(ENV_FILE_VARIABLE, path)].into_boxed_slice());
        let s = Settings::from_sources(env_of(pairs), &file).unwrap();
        assert_eq!(s.default_prefetch_count, 20);
        assert_eq!(
            s.host, "localhost",
            "the default file is not read when SWITCHYARD_ENV_FILE is set"
        );
        let e = Settings::from_sources(env_of(&[(ENV_FILE_VARIABLE, "/nonexistent/x.env")]), &file).unwrap_err();
        assert!(e.to_string().contains("SWITCHYARD_ENV_FILE=/nonexistent/x.env"), "{e}");
        // A bad value in the file is reported like one from the environment.
        std::fs::write(&file, "RABBITMQ_HEARTBEAT=5\n").unwrap();
        let e = Settings::from_sources(env_of(&[]), &file).unwrap_err();
        assert!(e.to_string().contains("RABBITMQ_HEARTBEAT=5"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_values_are_never_displayed() {
        assert_eq!(display_value("RABBITMQ_PASSWORD", "hunter2"), "***");
        assert_eq!(
            display_value("RABBITMQ_URL", "amqp://u:hunter2@h/v"),
            "amqp://u:***@h/v"
        );
        assert_eq!(
            display_value("RABBITMQ_URL", "amqp://u:a@h/v, amqp://u:b@i/v"),
            "amqp://u:***@h/v,amqp://u:***@i/v"
        );
        assert_eq!(display_value("RABBITMQ_HOST", "rabbit"), "rabbit");
        for v in VARIABLES {
            assert_eq!(
                is_secret_variable(v.name),
                v.name == "RABBITMQ_PASSWORD" || v.name == "RABBITMQ_URL",
                "{}",
                v.name
            );
        }
    }
}
