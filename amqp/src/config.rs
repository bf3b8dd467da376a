//! The configuration of an AMQP transport: one set of names for both
//! clients, built from [`Settings`] (every `RABBITMQ_*` connection variable
//! maps here, once).
//!
//! ```
//! use switchyard_amqp::AmqpConfig;
//! use switchyard_core::Settings;
//! let cfg = AmqpConfig::from_settings(&Settings::default()).unwrap();
//! assert_eq!(cfg.default_prefetch, 10);
//! assert!(cfg.separate_connections);
//! assert!(!format!("{cfg:?}").contains("guest@"));
//! ```

use std::path::Path;
use std::time::Duration;

use switchyard_core::settings::{parse_amqp_url, Secret, Settings};
use switchyard_core::{Error, Result};

use crate::client::{ConnectParams, TlsMaterial};
use crate::recovery::{BackoffPolicy, RecoveryConfig};

/// How an AMQP transport connects and behaves. Its `Debug` never shows the
/// password or key material.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Where and how to connect (TLS material already read from disk).
    pub connect: ConnectParams,
    /// Attempts of the first connect (`RABBITMQ_CONNECTION_ATTEMPTS`).
    pub connection_attempts: u32,
    /// Delay between first-connect attempts (`RABBITMQ_RETRY_DELAY`).
    pub retry_delay: Duration,
    /// Publisher confirms (`RABBITMQ_ENABLE_PUBLISHER_CONFIRMS`, default on).
    pub publisher_confirms: bool,
    /// Confirm channels in the publishing pool (default 4). Single publishes
    /// fill the first channel up to the client's
    /// [`publish_spill`](crate::client::ClientCaps::publish_spill) in flight
    /// before the next one takes the overflow (512 on lapin and amqprs);
    /// batches take turns over the pool.
    pub publish_channels: usize,
    /// The prefetch a consumer gets when it asks for 0
    /// (`RABBITMQ_DEFAULT_PREFETCH_COUNT`). A consumer never runs without a
    /// QoS bound: the broker would push the whole queue into client memory.
    pub default_prefetch: u16,
    /// Reconnect policy and how long publishes wait (`RABBITMQ_CONFIRM_TIMEOUT`).
    pub recovery: RecoveryConfig,
    /// Coalesce manual acks (one `multiple` ack over the settled prefix).
    pub coalesce_acks: bool,
    /// Longest delay before coalesced acks are sent (default 10 ms).
    pub ack_flush_interval: Duration,
    /// Publish on one connection and consume on another (default true,
    /// RabbitMQ's guidance): a connection blocked by a resource alarm then
    /// holds up publishes only, never acks.
    pub separate_connections: bool,
    /// Consumers sharing one consumer connection, for clients that lose the
    /// whole connection on a delivery they cannot decode (amqprs; default
    /// 16, 1 gives every consumer its own). A shared connection lost while
    /// the broker stays up puts each of its consumers on a connection of its
    /// own, so a poison message is still traced to its queue (see the
    /// engine's `conns` module). lapin consumers always share the main
    /// connection.
    pub consumers_per_connection: usize,
}

/// Shuffles `v` (Fisher–Yates over the std hasher's random seed).
fn shuffle<T>(v: &mut [T]) {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    for i in (1..v.len()).rev() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        let j = (h.finish() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn read_file(variable: &str, path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::InvalidConfig {
        variable: variable.into(),
        value: path.display().to_string(),
        reason: format!("cannot read the {what}: {e}"),
    })
}

impl AmqpConfig {
    /// The configuration `settings` describe. Reads the TLS files now (a
    /// missing or unreadable file is an `invalid_config` error naming the
    /// variable), so reconnects never touch the disk.
    pub fn from_settings(settings: &Settings) -> Result<Self> {
        settings.validate()?;
        let endpoints = settings.endpoints()?;
        let mut addresses: Vec<(String, u16)> = endpoints.iter().map(|e| (e.host.clone(), e.port)).collect();
        if settings.address_order == switchyard_core::settings::AddressOrder::Shuffle {
            shuffle(&mut addresses);
        }
        let ep = endpoints.into_iter().next().expect("at least one endpoint");
        let tls = if ep.tls {
            Some(TlsMaterial {
                ca_pem: match &settings.ca_file {
                    Some(p) => Some(read_file("RABBITMQ_CA_FILE", p, "CA file")?),
                    None => None,
                },
                client_cert_pem: match &settings.client_cert_file {
                    Some(p) => Some(read_file("RABBITMQ_CLIENT_CERT_FILE", p, "client certificate")?),
                    None => None,
                },
                client_key_pem: match &settings.client_key_file {
                    Some(p) => Some(Secret::new(read_file("RABBITMQ_CLIENT_KEY_FILE", p, "client key")?)),
                    None => None,
                },
                ca_file: settings.ca_file.clone(),
            })
        } else {
            None
        };
        Ok(AmqpConfig {
            connect: ConnectParams {
                host: addresses[0].0.clone(),
                port: addresses[0].1,
                addresses,
                vhost: ep.vhost,
                user: ep.user,
                password: ep.password,
                tls,
                heartbeat: settings.heartbeat,
                connection_timeout: settings.connection_timeout,
                connection_name: settings.connection_name.clone(),
            },
            connection_attempts: settings.connection_attempts.max(1),
            retry_delay: settings.retry_delay,
            publisher_confirms: settings.enable_publisher_confirms,
            publish_channels: 4,
            default_prefetch: settings.default_prefetch_count.max(1),
            recovery: RecoveryConfig::default()
                .publish_wait_timeout(settings.confirm_timeout)
                .backoff(BackoffPolicy::new(
                    Duration::from_millis(100),
                    settings.retry_delay.max(Duration::from_secs(2)),
                )),
            coalesce_acks: true,
            ack_flush_interval: Duration::from_millis(10),
            separate_connections: true,
            consumers_per_connection: 16,
        })
    }

    /// The configuration of an `amqp://user:pass@host:port/vhost` URL with
    /// defaults otherwise.
    pub fn from_url(url: &str) -> Result<Self> {
        parse_amqp_url("RABBITMQ_URL", url)?;
        Self::from_settings(&Settings::default().with_url(url))
    }

    /// Sets the connection name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connect.connection_name = name.into();
        self
    }

    /// Sets how many consumers share one consumer connection (at least 1);
    /// see [`AmqpConfig::consumers_per_connection`].
    pub fn consumers_per_connection(mut self, n: usize) -> Self {
        self.consumers_per_connection = n.max(1);
        self
    }

    /// Sets the recovery configuration.
    pub fn recovery(mut self, r: RecoveryConfig) -> Self {
        self.recovery = r;
        self
    }

    /// The broker address (all of them, for a cluster) without the password.
    pub fn describe(&self) -> String {
        if self.connect.addresses.len() <= 1 {
            return self.connect.describe();
        }
        let list: Vec<String> = self.connect.addresses.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        format!("{} (nodes {})", self.connect.describe(), list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_map_once_and_tls_files_are_read_up_front() {
        let s = Settings::from_lookup(|k| match k {
            "RABBITMQ_URL" => Some("amqps://app:s3cret@rabbit.example:5671/prod".into()),
            "RABBITMQ_CA_FILE" => Some("/nonexistent/ca.pem".into()),
            "RABBITMQ_CONNECTION_NAME" => Some("billing".into()),
            _ => None,
        })
        .unwrap();
        let e = AmqpConfig::from_settings(&s).unwrap_err();
        assert_eq!(e.code(), "invalid_config");
        assert!(e.to_string().contains("RABBITMQ_CA_FILE"), "{e}");
        assert!(!e.to_string().contains("s3cret"));

        let dir = std::env::temp_dir().join(format!("sy-amqp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let cfg = AmqpConfig::from_settings(&s.clone().with_ca_file(&ca)).unwrap();
        let tls = cfg.connect.tls.as_ref().unwrap();
        assert!(tls.ca_pem.as_deref().unwrap().starts_with("-----BEGIN"));
        assert_eq!(cfg.connect.connection_name, "billing");
        assert_eq!(cfg.describe(), "amqps://app@rabbit.example:5671/prod");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn mutual_tls_needs_both_files() {
        let e = Settings::from_lookup(|k| match k {
            "RABBITMQ_CLIENT_CERT_FILE" => Some("/tmp/cert.pem".into()),
            _ => None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("RABBITMQ_CLIENT_KEY_FILE"), "{e}");
    }
}
