//! What every channel we open shares with its amqprs callback: the reason it
//! was closed, its confirm tracker, its consumer.

use std::sync::{Arc, Weak};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{Channel, ConfirmSelectArguments};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_core::Result;

use crate::confirms::ConfirmTracker;
use crate::consume::ConsumerShared;
use crate::errors::{client_error, close_error, Subject};

/// Hook run (on a spawned task) when the broker closes a channel.
pub(crate) type OnClose = Box<dyn Fn(u16, String) + Send + Sync>;

/// State shared between a channel's owner and its callback.
#[derive(Default)]
pub(crate) struct ChanState {
    /// `(reply code, reply text)` of the broker's `channel.close`.
    pub closed: Mutex<Option<(u16, String)>>,
    /// Confirm bookkeeping, for channels in confirm mode.
    pub confirms: Option<Arc<ConfirmTracker>>,
    /// The consumer on this channel, if any.
    pub consumer: Mutex<Option<Weak<ConsumerShared>>>,
    /// Called after a broker-initiated close.
    pub on_close: Mutex<Option<OnClose>>,
}

impl ChanState {
    /// Maps an amqprs error of an operation on `subject` to a switchyard
    /// error, using the broker's close reason when there is one.
    pub fn error(&self, e: amqprs::error::Error, subject: Subject<'_>) -> switchyard_core::Error {
        match &*self.closed.lock() {
            Some((code, text)) => close_error(*code, text, subject),
            None => client_error(e),
        }
    }
}

struct Callback(Arc<ChanState>);

#[async_trait]
impl ChannelCallback for Callback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        let (code, text) = (close.reply_code(), close.reply_text().clone());
        tracing::debug!(code, text = %text, "broker closed a channel");
        *self.0.closed.lock() = Some((code, text.clone()));
        if let Some(hook) = &*self.0.on_close.lock() {
            hook(code, text);
        }
        // Ok: amqprs then answers close-ok and ends the channel.
        Ok(())
    }

    async fn cancel(&mut self, _channel: &Channel, cancel: Cancel) -> std::result::Result<(), amqprs::error::Error> {
        let consumer = self.0.consumer.lock().as_ref().and_then(Weak::upgrade);
        if let Some(c) = consumer {
            if c.tag() == cancel.consumer_tag().as_str() {
                c.broker_cancelled();
            }
        }
        Ok(())
    }

    async fn flow(&mut self, _channel: &Channel, active: bool) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        if let Some(t) = &self.0.confirms {
            t.ack(ack.delivery_tag(), ack.mutiple());
        }
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        if let Some(t) = &self.0.confirms {
            t.nack(nack.delivery_tag(), nack.multiple());
        }
    }

    async fn publish_return(&mut self, _channel: &Channel, ret: Return, _props: BasicProperties, _content: Vec<u8>) {
        if let Some(t) = &self.0.confirms {
            t.returned(ret.exchange(), ret.routing_key());
        }
    }
}

/// Opens a channel with our callback registered (and confirm mode when
/// `state.confirms` is set).
pub(crate) async fn open(conn: &Connection, state: Arc<ChanState>) -> Result<Channel> {
    let ch = conn.open_channel(None).await.map_err(client_error)?;
    ch.register_callback(Callback(state.clone()))
        .await
        .map_err(client_error)?;
    if state.confirms.is_some() {
        ch.confirm_select(ConfirmSelectArguments::default())
            .await
            .map_err(|e| state.error(e, Subject::Exchange("")))?;
    }
    Ok(ch)
}
