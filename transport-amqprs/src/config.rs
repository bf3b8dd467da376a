//! Connection configuration, built from [`Settings`] or a URL.

use std::fmt;
use std::time::Duration;

use switchyard_amqp::recovery::{BackoffPolicy, RecoveryConfig};
use switchyard_core::settings::{parse_amqp_url, Secret, Settings};
use switchyard_core::{Error, Result};

/// How [`AmqprsTransport`](crate::AmqprsTransport) connects and behaves.
///
/// Build it with [`from_settings`](AmqprsConfig::from_settings) or
/// [`from_url`](AmqprsConfig::from_url) and adjust with the setters. Its
/// `Debug` never shows the password.
#[derive(Clone)]
pub struct AmqprsConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Virtual host.
    pub vhost: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: Secret,
    /// Heartbeat interval in seconds (at least 1; amqprs misbehaves with 0).
    pub heartbeat: u16,
    /// Connection name shown in the RabbitMQ management UI.
    pub connection_name: String,
    /// Connection attempts before [`connect`](crate::AmqprsTransport::connect) gives up.
    pub connection_attempts: u32,
    /// Delay between those attempts.
    pub retry_delay: Duration,
    /// Limit of one connection attempt.
    pub connection_timeout: Duration,
    /// Publisher confirms (on by default; off makes `publish` return once sent).
    pub publisher_confirms: bool,
    /// Channels in the publishing pool.
    pub publisher_channels: usize,
    /// Prefetch used when a consumer asks for 0 (amqprs' receiver is
    /// unbounded, so a consumer always gets a bound).
    pub default_prefetch: u16,
    /// Reconnect policy and how long publishes wait during an outage.
    pub recovery: RecoveryConfig,
    /// Ack coalescing for manual-ack consumers (one `multiple` ack over the
    /// settled prefix).
    pub coalesce_acks: bool,
    /// TLS (`amqps`), with the `tls` cargo feature (on by default).
    pub tls: bool,
    /// PEM file of CA certificates trusted for TLS (the webpki roots when unset).
    pub ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for AmqprsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqprsConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vhost", &self.vhost)
            .field("user", &self.user)
            .field("password", &"***")
            .field("heartbeat", &self.heartbeat)
            .field("connection_name", &self.connection_name)
            .field("connection_attempts", &self.connection_attempts)
            .field("retry_delay", &self.retry_delay)
            .field("publisher_confirms", &self.publisher_confirms)
            .field("publisher_channels", &self.publisher_channels)
            .field("default_prefetch", &self.default_prefetch)
            .field("recovery", &self.recovery)
            .field("coalesce_acks", &self.coalesce_acks)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl Default for AmqprsConfig {
    fn default() -> Self {
        AmqprsConfig {
            host: "127.0.0.1".into(),
            port: 5672,
            vhost: "/".into(),
            user: "guest".into(),
            password: Secret::new("guest"),
            heartbeat: 60,
            connection_name: "switchyard-amqprs".into(),
            connection_attempts: 3,
            retry_delay: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(30),
            publisher_confirms: true,
            publisher_channels: 4,
            default_prefetch: 10,
            recovery: RecoveryConfig::default(),
            coalesce_acks: true,
            tls: false,
            ca_file: None,
        }
    }
}

impl AmqprsConfig {
    /// The configuration `settings` describe (URL or parts, heartbeat,
    /// connection attempts and retry delay, prefetch, confirms).
    pub fn from_settings(settings: &Settings) -> Result<Self> {
        let ep = settings.endpoint()?;
        let heartbeat = settings.heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16;
        Ok(AmqprsConfig {
            host: ep.host,
            port: ep.port,
            vhost: ep.vhost,
            user: ep.user,
            password: ep.password,
            heartbeat,
            connection_attempts: settings.connection_attempts.max(1),
            retry_delay: settings.retry_delay,
            connection_timeout: settings.connection_timeout,
            publisher_confirms: settings.enable_publisher_confirms,
            default_prefetch: settings.default_prefetch_count.max(1),
            recovery: RecoveryConfig::default().publish_wait_timeout(settings.confirm_timeout),
            tls: ep.tls,
            ca_file: settings.ca_file.clone(),
            ..AmqprsConfig::default()
        })
    }

    /// The configuration of an `amqp://user:pass@host:port/vhost` URL, with
    /// defaults for everything else.
    pub fn from_url(url: &str) -> Result<Self> {
        let ep = parse_amqp_url("RABBITMQ_URL", url)?;
        Ok(AmqprsConfig {
            host: ep.host,
            port: ep.port,
            vhost: ep.vhost,
            user: ep.user,
            password: ep.password,
            tls: ep.tls,
            ..AmqprsConfig::default()
        })
    }

    /// Sets the connection name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Sets the recovery policy.
    pub fn recovery(mut self, r: RecoveryConfig) -> Self {
        self.recovery = r;
        self
    }

    /// Sets the reconnect backoff.
    pub fn backoff(mut self, b: BackoffPolicy) -> Self {
        self.recovery.backoff = b;
        self
    }

    /// Sets how long publishes wait for a confirm across an outage.
    pub fn publish_wait_timeout(mut self, d: Duration) -> Self {
        self.recovery.publish_wait_timeout = d;
        self
    }

    /// Sets the number of publishing channels (at least 1).
    pub fn publisher_channels(mut self, n: usize) -> Self {
        self.publisher_channels = n.max(1);
        self
    }

    /// Turns ack coalescing on or off.
    pub fn coalesce_acks(mut self, yes: bool) -> Self {
        self.coalesce_acks = yes;
        self
    }

    /// Trusts the CA certificates in the PEM file `path` for TLS.
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Sets the connection attempts and the delay between them.
    pub fn connection_attempts(mut self, n: u32, delay: Duration) -> Self {
        self.connection_attempts = n.max(1);
        self.retry_delay = delay;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.tls && !cfg!(feature = "tls") {
            return Err(Error::Unsupported {
                feature: "amqps (TLS): switchyard-amqprs was built without its `tls` feature".into(),
            });
        }
        if let Some(ca) = &self.ca_file {
            if self.tls && !ca.is_file() {
                return Err(Error::InvalidConfig {
                    variable: "RABBITMQ_CA_FILE".into(),
                    value: ca.display().to_string(),
                    reason: "is not a readable file".into(),
                });
            }
        }
        if self.host.is_empty() {
            return Err(Error::InvalidConfig {
                variable: "RABBITMQ_HOST".into(),
                value: String::new(),
                reason: "must not be empty".into(),
            });
        }
        for (what, v) in [
            ("RABBITMQ_VHOST", &self.vhost),
            ("connection name", &self.connection_name),
        ] {
            if v.len() > crate::convert::SHORT_STR_MAX {
                return Err(Error::InvalidConfig {
                    variable: what.into(),
                    value: v.clone(),
                    reason: "must be at most 255 bytes".into(),
                });
            }
        }
        Ok(())
    }

    /// `host:port/vhost`, for messages (no credentials).
    pub(crate) fn describe(&self) -> String {
        format!(
            "{}:{}{}",
            self.host,
            self.port,
            if self.vhost == "/" { "/" } else { &self.vhost }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_url_and_settings_never_show_the_password() {
        let c = AmqprsConfig::from_url("amqp://bob:s3cret@rabbit:5673/%2Fprod").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.vhost.as_str(), c.user.as_str()),
            ("rabbit", 5673, "/prod", "bob")
        );
        assert_eq!(c.password.expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));

        let s = Settings::default()
            .with_url("amqp://alice:pw@h:5672/v")
            .with_heartbeat(Duration::from_secs(30))
            .with_prefetch(42);
        let c = AmqprsConfig::from_settings(&s).unwrap();
        assert_eq!(
            (c.host.as_str(), c.vhost.as_str(), c.heartbeat, c.default_prefetch),
            ("h", "v", 30, 42)
        );
        c.validate().unwrap();

        let tls = AmqprsConfig::from_url("amqps://h/").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.port, 5671);
        let e = tls.ca_file("/nonexistent/ca.pem").validate().unwrap_err();
        if cfg!(feature = "tls") {
            assert_eq!(e.code(), "invalid_config");
            assert!(e.to_string().contains("RABBITMQ_CA_FILE"));
        } else {
            assert_eq!(e.code(), "unsupported");
        }
        assert_eq!(
            AmqprsConfig::from_url("http://h/").unwrap_err().code(),
            "invalid_config"
        );
    }
}
