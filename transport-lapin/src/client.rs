//! lapin behind the engine's client trait: one AMQP method per call, lapin
//! errors turned into [`ClientError`]s (the broker's reply code and text
//! when the broker closed the channel or connection), confirms from lapin's
//! per-publish `PublisherConfirm`, blocked/unblocked from its event stream.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use switchyard_amqp::client::{
    AmqpChannel, AmqpClient, AmqpConnection, ClientCaps, ClientError, Confirm, ConfirmOutcome, ConnSignals,
    ConnectParams, ConsumerEvent, ConsumerEvents, RawDelivery, RawGet,
};
use switchyard_core::{
    Binding, BrokerReply, Destination, ExchangeKind, ExchangeSpec, Headers, Message, QueueInfo, QueueSpec,
};

use crate::convert;

/// The lapin client (stateless; every connection is independent).
#[derive(Debug, Default, Clone, Copy)]
pub struct LapinClient;

/// A lapin error as the engine needs it.
pub(crate) fn client_error(e: lapin::Error) -> ClientError {
    use lapin::ErrorKind as K;
    match e.kind() {
        K::ProtocolError(p) => ClientError::Broker(BrokerReply::new(p.get_id(), p.get_message().as_str())),
        K::InvalidChannelState(..) | K::InvalidChannel(_) | K::InvalidConnectionState(_) => {
            ClientError::Closed(e.to_string())
        }
        _ if convert::is_connection_level(&e) => ClientError::Closed(e.to_string()),
        _ => ClientError::Other(e.to_string()),
    }
}

/// True when `e`, from opening a channel, is a channel-level broker error:
/// the stale error of an earlier channel with the same id (see
/// [`LapinConnection::open_channel`]), never a refusal of the open itself.
fn stale_refusal(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(_)))
}

fn kind(k: &ExchangeKind) -> lapin::ExchangeKind {
    match k {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        // Plugin kinds are passed through by name.
        other => lapin::ExchangeKind::Custom(other.as_str().to_owned()),
    }
}

fn encode(e: switchyard_core::Error) -> ClientError {
    ClientError::Encode(e.to_string())
}

fn uri(p: &ConnectParams) -> lapin::uri::AMQPUri {
    use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
    AMQPUri {
        scheme: if p.tls.is_some() {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: p.user.clone(),
                password: p.password.expose().to_owned(),
            },
            host: p.host.clone(),
            port: p.port,
        },
        vhost: p.vhost.clone(),
        query: AMQPQueryString {
            heartbeat: Some(p.heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16),
            connection_timeout: Some(p.connection_timeout.as_millis() as u64),
            ..Default::default()
        },
    }
}

#[async_trait]
impl AmqpClient for LapinClient {
    type Connection = LapinConnection;

    fn name(&self) -> &'static str {
        "lapin"
    }

    fn caps(&self) -> ClientCaps {
        ClientCaps {
            blocked_notifications: true,
            decode_failure_drops_connection: false,
            // Confirms are a future per publish: one channel carries a few
            // hundred concurrent publishers best (docs/benchmarks/lapin.md).
            publish_spill: 512,
        }
    }

    async fn connect(&self, params: &ConnectParams, signals: Arc<ConnSignals>) -> Result<LapinConnection, ClientError> {
        let props = ConnectionProperties::default()
            .with_connection_name(params.connection_name.clone().into())
            .with_client_property("product".into(), "switchyard".into());
        let tls = match &params.tls {
            Some(t) => lapin::tcp::OwnedTLSConfig {
                identity: match (&t.client_cert_pem, &t.client_key_pem) {
                    (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                        pem: cert.clone().into_bytes(),
                        key: key.expose().as_bytes().to_vec(),
                    }),
                    _ => None,
                },
                cert_chain: t.ca_pem.clone(),
            },
            None => lapin::tcp::OwnedTLSConfig::default(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(|e| ClientError::Other(e.to_string()))?;
        let connection = Connection::connect_uri_with_config(uri(params), props, tls, runtime)
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?;
        let mut events = Box::pin(connection.events_listener());
        let status = connection.status().clone();
        let sig = signals.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                match ev {
                    lapin::Event::ConnectionBlocked(reason) => sig.blocked(&reason),
                    lapin::Event::ConnectionUnblocked => sig.unblocked(),
                    lapin::Event::Error(e) => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        if !status.connected() {
                            sig.lost(&e.to_string());
                            return;
                        }
                    }
                    _ => {}
                }
            }
            sig.lost("connection ended");
        });
        Ok(LapinConnection {
            connection,
            signals,
            stale_ids: Default::default(),
        })
    }
}

/// One lapin connection.
pub struct LapinConnection {
    connection: Connection,
    signals: Arc<ConnSignals>,
    /// Channel ids lost to stale errors (see [`LapinConnection::open_channel`]).
    stale_ids: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl AmqpConnection for LapinConnection {
    type Channel = LapinChannel;

    async fn open_channel(&self) -> Result<LapinChannel, ClientError> {
        // lapin 4.12 keeps the error of every channel the broker closed
        // (its "poison", by channel id) after the channel is gone, and fails
        // every frame of a later channel that gets the same id with it. Ids
        // are handed out in turn up to channel-max (2047 on RabbitMQ), so
        // once a connection has opened that many channels, a new channel on
        // the id of one that was refused (a 404 for a missing queue, a 406)
        // fails its `channel.open` with that old error — and the request
        // that needed the channel reported it as its own. A broker never
        // refuses `channel.open` by closing the channel (only by closing the
        // connection), so a channel-level refusal of it is such a stale
        // error: lapin keeps that id taken, and the next id is tried.
        for _ in 0..=u16::MAX {
            match self.connection.create_channel().await {
                Ok(channel) => return Ok(LapinChannel { channel }),
                Err(e) if stale_refusal(&e) => {
                    self.stale_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(error = %e, "channel id refused with the error of an earlier channel; trying the next id");
                }
                Err(e)
                    if matches!(e.kind(), lapin::ErrorKind::ChannelsLimitReached)
                        && self.stale_ids.load(std::sync::atomic::Ordering::Relaxed) > 0 =>
                {
                    // Every id is taken, some by stale errors: only a new
                    // connection has them free again. (Without stale ids
                    // the application has channel-max channels open, and
                    // the error is reported as it is.)
                    let why = "no channel id left on the connection (lapin keeps the ids of channels the broker closed); reconnecting";
                    tracing::warn!("{why}");
                    self.signals.lost(why);
                    let close = self.connection.close(200, "reconnecting: no channel id left".into());
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
                    return Err(ClientError::Closed(why.into()));
                }
                Err(e) => return Err(client_error(e)),
            }
        }
        Err(ClientError::Other("no channel could be opened".into()))
    }

    fn is_open(&self) -> bool {
        self.connection.status().connected()
    }

    fn server_name(&self) -> Option<String> {
        // lapin does not expose the server properties; the engine knows the
        // address it connected to (`connected_address`).
        None
    }

    async fn close(&self) {
        if self.is_open() {
            let close = self.connection.close(200, "closed by application".into());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
        }
        self.signals.lost("closed by application");
    }
}

/// One lapin channel.
pub struct LapinChannel {
    channel: Channel,
}

fn confirm_outcome(r: lapin::Result<Confirmation>) -> ConfirmOutcome {
    match r {
        Ok(Confirmation::Ack(None)) => ConfirmOutcome::Ack,
        Ok(Confirmation::NotRequested) => ConfirmOutcome::NotRequested,
        Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
            let d = ret.delivery;
            ConfirmOutcome::Returned {
                reply: BrokerReply::new(ret.reply_code, ret.reply_text.as_str()).caused_by(60, 40),
                message: Some(Box::new(convert::from_delivery(d.data, &d.properties))),
            }
        }
        Ok(Confirmation::Nack(None)) => ConfirmOutcome::Nack,
        Err(e) => ConfirmOutcome::Lost(client_error(e)),
    }
}

#[async_trait]
impl AmqpChannel for LapinChannel {
    fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    async fn confirm_select(&self) -> Result<(), ClientError> {
        self.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(client_error)
    }

    async fn qos(&self, prefetch: u16) -> Result<(), ClientError> {
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(client_error)
    }

    async fn declare_exchange(&self, spec: &ExchangeSpec, passive: bool) -> Result<(), ClientError> {
        let args = convert::headers_to_table(&spec.arguments).map_err(encode)?;
        self.channel
            .exchange_declare(
                convert::short_name("exchange name", &spec.name).map_err(encode)?,
                kind(&spec.kind),
                ExchangeDeclareOptions {
                    passive,
                    durable: spec.durable,
                    auto_delete: spec.auto_delete,
                    internal: spec.internal,
                    nowait: false,
                },
                args,
            )
            .await
            .map_err(client_error)
    }

    async fn declare_queue(&self, spec: &QueueSpec, passive: bool) -> Result<QueueInfo, ClientError> {
        let args = convert::headers_to_table(&spec.arguments.to_headers()).map_err(encode)?;
        let q = self
            .channel
            .queue_declare(
                convert::short_name("queue name", &spec.name).map_err(encode)?,
                QueueDeclareOptions {
                    passive,
                    durable: spec.durable,
                    exclusive: spec.exclusive,
                    auto_delete: spec.auto_delete,
                    nowait: false,
                },
                if passive { Default::default() } else { args },
            )
            .await
            .map_err(client_error)?;
        Ok(QueueInfo {
            name: q.name().as_str().to_owned(),
            message_count: q.message_count(),
            consumer_count: q.consumer_count(),
        })
    }

    async fn bind(&self, b: &Binding) -> Result<(), ClientError> {
        let args = convert::headers_to_table(&b.arguments).map_err(encode)?;
        let (dest, src, rk) = convert::binding_names(b).map_err(encode)?;
        let r = if b.destination_is_exchange {
            self.channel
                .exchange_bind(dest, src, rk, ExchangeBindOptions::default(), args)
                .await
        } else {
            self.channel
                .queue_bind(dest, src, rk, QueueBindOptions::default(), args)
                .await
        };
        r.map_err(client_error)
    }

    async fn unbind(&self, b: &Binding) -> Result<(), ClientError> {
        let args = convert::headers_to_table(&b.arguments).map_err(encode)?;
        let (dest, src, rk) = convert::binding_names(b).map_err(encode)?;
        let r = if b.destination_is_exchange {
            self.channel
                .exchange_unbind(dest, src, rk, ExchangeUnbindOptions::default(), args)
                .await
        } else {
            self.channel.queue_unbind(dest, src, rk, args).await
        };
        r.map_err(client_error)
    }

    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), ClientError> {
        self.channel
            .exchange_delete(
                convert::short_name("exchange name", name).map_err(encode)?,
                ExchangeDeleteOptions {
                    if_unused,
                    ..Default::default()
                },
            )
            .await
            .map_err(client_error)
    }

    async fn delete_queue(&self, name: &str, if_unused: bool, if_empty: bool) -> Result<u32, ClientError> {
        self.channel
            .queue_delete(
                convert::short_name("queue name", name).map_err(encode)?,
                QueueDeleteOptions {
                    if_unused,
                    if_empty,
                    ..Default::default()
                },
            )
            .await
            .map_err(client_error)
    }

    async fn purge_queue(&self, name: &str) -> Result<u32, ClientError> {
        self.channel
            .queue_purge(
                convert::short_name("queue name", name).map_err(encode)?,
                QueuePurgeOptions::default(),
            )
            .await
            .map_err(client_error)
    }

    // Not `async fn`: `#[async_trait]` would box it, and this method of
    // `AmqpChannel` returns its future unboxed.
    #[allow(clippy::manual_async_fn)]
    fn publish(
        &self,
        dest: &Destination,
        message: &Message,
        mandatory: bool,
    ) -> impl std::future::Future<Output = Result<Confirm, ClientError>> + Send {
        async move {
            let props = convert::to_properties(message).map_err(encode)?;
            let confirm = self
                .channel
                .basic_publish(
                    convert::short_name("exchange name", dest.exchange()).map_err(encode)?,
                    convert::short_name("routing key", dest.routing_key()).map_err(encode)?,
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    &message.body,
                    props,
                )
                .await
                .map_err(client_error)?;
            Ok(Confirm::boxed(async move { confirm_outcome(confirm.await) }))
        }
    }

    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        no_ack: bool,
        exclusive: bool,
        arguments: &Headers,
    ) -> Result<ConsumerEvents, ClientError> {
        let arguments = convert::headers_to_table(arguments).map_err(encode)?;
        let consumer = self
            .channel
            .basic_consume(
                convert::short_name("queue name", queue).map_err(encode)?,
                convert::short_name("consumer tag", consumer_tag).map_err(encode)?,
                BasicConsumeOptions {
                    no_ack,
                    exclusive,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(client_error)?;
        // lapin ends the stream after a basic.cancel (ours or the broker's)
        // and yields an error when the channel or connection closes.
        let events = futures_util::stream::unfold(Some(consumer), |state| async move {
            let mut consumer = state?;
            match consumer.next().await {
                Some(Ok(d)) => {
                    let ev = ConsumerEvent::Delivery(RawDelivery {
                        delivery_tag: d.delivery_tag,
                        redelivered: d.redelivered,
                        exchange: d.exchange.as_str().to_owned(),
                        routing_key: d.routing_key.as_str().to_owned(),
                        message: convert::from_delivery(d.data, &d.properties),
                    });
                    Some((ev, Some(consumer)))
                }
                Some(Err(e)) => Some((ConsumerEvent::Closed(client_error(e)), None)),
                None => Some((ConsumerEvent::Cancelled, None)),
            }
        });
        Ok(Box::pin(events))
    }

    async fn get(&self, queue: &str, no_ack: bool) -> Result<Option<RawGet>, ClientError> {
        let got = self
            .channel
            .basic_get(
                convert::short_name("queue name", queue).map_err(encode)?,
                BasicGetOptions { no_ack },
            )
            .await
            .map_err(client_error)?;
        Ok(got.map(|g| {
            let d = g.delivery;
            RawGet {
                delivery: RawDelivery {
                    delivery_tag: d.delivery_tag,
                    redelivered: d.redelivered,
                    exchange: d.exchange.as_str().to_owned(),
                    routing_key: d.routing_key.as_str().to_owned(),
                    message: convert::from_delivery(d.data, &d.properties),
                },
                message_count: g.message_count,
            }
        }))
    }

    async fn cancel(&self, consumer_tag: &str) -> Result<(), ClientError> {
        self.channel
            .basic_cancel(
                convert::short_name("consumer tag", consumer_tag).map_err(encode)?,
                BasicCancelOptions::default(),
            )
            .await
            .map_err(client_error)
    }

    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), ClientError> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions { multiple })
            .await
            .map_err(client_error)
    }

    async fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<(), ClientError> {
        self.channel
            .basic_nack(delivery_tag, BasicNackOptions { multiple, requeue })
            .await
            .map_err(client_error)
    }

    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), ClientError> {
        self.channel
            .basic_reject(delivery_tag, BasicRejectOptions { requeue })
            .await
            .map_err(client_error)
    }

    async fn close(&self) {
        if self.is_open() {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.channel.close(200, "closed".into()),
            )
            .await;
        }
    }
}
