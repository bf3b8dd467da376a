//! The message model: body, AMQP basic properties and typed headers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A typed header value, covering the AMQP 0-9-1 field-table types that
/// RabbitMQ uses.
///
/// Integers keep their width so that a header read from the broker and
/// written back is unchanged. [`HeaderValue::as_i64`] reads any integer.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HeaderValue {
    /// A boolean.
    Bool(bool),
    /// A signed 8-bit integer.
    I8(i8),
    /// An unsigned 8-bit integer.
    U8(u8),
    /// A signed 16-bit integer.
    I16(i16),
    /// An unsigned 16-bit integer.
    U16(u16),
    /// A signed 32-bit integer.
    I32(i32),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A signed 64-bit integer (AMQP long-long; RabbitMQ's `x-death` counts).
    I64(i64),
    /// A 32-bit float.
    F32(f32),
    /// A 64-bit float.
    F64(f64),
    /// A UTF-8 string (AMQP long string).
    String(String),
    /// Raw bytes (AMQP byte array, or a long string that is not UTF-8).
    Bytes(Bytes),
    /// A timestamp in seconds since the Unix epoch.
    Timestamp(u64),
    /// An array of values.
    Array(Vec<HeaderValue>),
    /// A nested table.
    Table(Headers),
    /// No value (AMQP void).
    Void,
    /// An AMQP decimal: `value × 10^-scale` (`value` is the signed 32-bit
    /// integer on the wire, so `-0.001` is `{ scale: 3, value: -1 }`).
    /// Kept as sent, never converted to a float.
    Decimal {
        /// Number of decimal digits after the point.
        scale: u8,
        /// The unscaled value.
        value: i32,
    },
}

impl HeaderValue {
    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an `i64`, if it is any integer type (or a timestamp).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            HeaderValue::I8(v) => v as i64,
            HeaderValue::U8(v) => v as i64,
            HeaderValue::I16(v) => v as i64,
            HeaderValue::U16(v) => v as i64,
            HeaderValue::I32(v) => v as i64,
            HeaderValue::U32(v) => v as i64,
            HeaderValue::I64(v) => v,
            HeaderValue::Timestamp(v) => i64::try_from(v).ok()?,
            _ => return None,
        })
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            HeaderValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as a nested table, if it is one.
    pub fn as_table(&self) -> Option<&Headers> {
        match self {
            HeaderValue::Table(t) => Some(t),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[HeaderValue]> {
        match self {
            HeaderValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! header_from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for HeaderValue {
            fn from(v: $t) -> Self { HeaderValue::$v(v) }
        })*
    };
}
header_from!(bool => Bool, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32,
    u32 => U32, i64 => I64, f32 => F32, f64 => F64, String => String, Bytes => Bytes,
    Vec<HeaderValue> => Array, Headers => Table);

impl From<&str> for HeaderValue {
    fn from(v: &str) -> Self {
        HeaderValue::String(v.to_owned())
    }
}

/// An ordered map of typed headers (AMQP field table).
///
/// Keys are kept sorted, as RabbitMQ and both AMQP clients keep them.
///
/// A message's headers also record whether the wire carries a headers table
/// at all: "no headers property" and "an empty headers table" are different
/// messages in AMQP, and a message received with an empty table is published
/// on with an empty table. [`Headers::new`] has no table until a header is
/// inserted; [`Headers::empty_table`] is an explicitly empty one. Equality
/// compares the entries and [`has_table`](Headers::has_table). Tables nested
/// in a [`HeaderValue::Table`] are always tables.
///
/// ```
/// use switchyard_core::Headers;
/// let none = Headers::new();
/// assert!(!none.has_table());
/// assert!(Headers::empty_table().has_table());
/// assert_ne!(none, Headers::empty_table());
/// let mut h = Headers::new();
/// h.insert("tenant", "acme");
/// assert!(h.has_table());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Headers {
    map: BTreeMap<String, HeaderValue>,
    /// The table is present even when empty.
    table: bool,
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map && self.has_table() == other.has_table()
    }
}

impl Headers {
    /// No headers (no table on the wire until a header is inserted).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty headers table that is sent as such (AMQP distinguishes it
    /// from no headers property).
    pub fn empty_table() -> Self {
        Headers {
            map: BTreeMap::new(),
            table: true,
        }
    }

    /// True when a headers table is present: it has entries, or it was
    /// received or built as an explicitly empty table.
    pub fn has_table(&self) -> bool {
        self.table || !self.map.is_empty()
    }

    /// Marks the table present (`true`) or absent when empty (`false`).
    pub fn set_table(&mut self, present: bool) {
        self.table = present;
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Option<HeaderValue> {
        self.map.insert(key.into(), value.into())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&HeaderValue> {
        self.map.get(key)
    }

    /// The value of `key` if it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(HeaderValue::as_str)
    }

    /// The value of `key` if it is an integer.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(HeaderValue::as_i64)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<HeaderValue> {
        self.map.remove(key)
    }

    /// True if `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no headers.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Iterates over the headers in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &HeaderValue)> {
        self.map.iter()
    }

    /// Keeps only the headers for which `f` returns true.
    pub fn retain(&mut self, mut f: impl FnMut(&str, &HeaderValue) -> bool) {
        self.map.retain(|k, v| f(k, v))
    }

    /// The underlying map.
    pub fn as_map(&self) -> &BTreeMap<String, HeaderValue> {
        &self.map
    }

    /// The underlying map, mutably.
    pub fn as_map_mut(&mut self) -> &mut BTreeMap<String, HeaderValue> {
        &mut self.map
    }
}

impl<K: Into<String>, V: Into<HeaderValue>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers {
            map: iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            table: false,
        }
    }
}

impl IntoIterator for Headers {
    type Item = (String, HeaderValue);
    type IntoIter = std::collections::btree_map::IntoIter<String, HeaderValue>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a HeaderValue);
    type IntoIter = std::collections::btree_map::Iter<'a, String, HeaderValue>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

/// AMQP basic properties of a message.
///
/// `delivery_mode` is **`Some(2)` (persistent) by default**: a message
/// survives a broker restart on a durable queue unless you opt out with
/// [`Message::transient`] / [`Message::persistent`]`(false)` (mode 1). A
/// received message carries what the wire carried, including no delivery
/// mode at all (`None`, which brokers treat as transient); see
/// [`Properties::is_persistent`]. `expiration` is the per-message TTL, sent
/// to the broker in whole milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Properties {
    /// MIME type of the body, e.g. `application/json`.
    pub content_type: Option<Arc<str>>,
    /// Encoding applied to the body, e.g. `gzip` or `zstd`.
    pub content_encoding: Option<Arc<str>>,
    /// Correlates a reply (or a chain of messages) with its request.
    pub correlation_id: Option<Arc<str>>,
    /// Where a reply should be sent (a queue name, or `amq.rabbitmq.reply-to`).
    pub reply_to: Option<Arc<str>>,
    /// Application-assigned unique id of this message.
    pub message_id: Option<Arc<str>>,
    /// Creation time, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Priority 0–255, honoured by queues with `x-max-priority`: a queue
    /// declared with `x-max-priority` N delivers higher priorities first and
    /// treats anything above N as N (AMQP suggests 0–9; RabbitMQ allows a
    /// queue maximum of up to 255). Sent as set, never clamped.
    pub priority: Option<u8>,
    /// Per-message time to live.
    pub expiration: Option<Duration>,
    /// AMQP delivery mode: 2 is persistent (written to disk on durable
    /// queues; the default), 1 transient; `None` when the wire carried none.
    pub delivery_mode: Option<u8>,
    /// Application message type name (AMQP `type`).
    pub kind: Option<Arc<str>>,
    /// Creating application's id.
    pub app_id: Option<Arc<str>>,
    /// Authenticated user id (RabbitMQ validates it against the connection's user).
    pub user_id: Option<Arc<str>>,
    /// AMQP `cluster-id` (deprecated by AMQP 0-9-1 but carried by RabbitMQ
    /// and both clients; kept so that a message is relayed as received).
    pub cluster_id: Option<Arc<str>>,
}

impl Properties {
    /// Delivery mode 2, the persistent mode.
    pub const PERSISTENT: u8 = 2;
    /// Delivery mode 1, the transient mode.
    pub const TRANSIENT: u8 = 1;

    /// True when the delivery mode is 2 (persistent). Brokers treat any other
    /// value, and no delivery mode, as transient.
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(Self::PERSISTENT)
    }
}

impl Default for Properties {
    /// No properties set, except the delivery mode (2, persistent).
    fn default() -> Self {
        Properties {
            content_type: None,
            content_encoding: None,
            correlation_id: None,
            reply_to: None,
            message_id: None,
            timestamp: None,
            priority: None,
            expiration: None,
            delivery_mode: Some(Properties::PERSISTENT),
            kind: None,
            app_id: None,
            user_id: None,
            cluster_id: None,
        }
    }
}

/// A message: body, properties and headers.
///
/// Messages are persistent (delivery mode 2) unless made
/// [`transient`](Message::transient). Built with chained setters:
///
/// ```
/// use switchyard_core::Message;
/// let m = Message::new("hello")
///     .with_content_type("text/plain")
///     .with_priority(5)
///     .with_header("tenant", "acme");
/// assert_eq!(m.properties.priority, Some(5));
/// assert_eq!(m.headers.get_str("tenant"), Some("acme"));
/// assert!(m.properties.is_persistent());
/// assert!(!Message::new("event").transient().properties.is_persistent());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The body, shared without copying.
    pub body: Bytes,
    /// AMQP basic properties.
    pub properties: Properties,
    /// Application headers.
    pub headers: Headers,
}

impl Message {
    /// A message with `body`, no headers and default properties (persistent).
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            body: body.into(),
            ..Default::default()
        }
    }

    /// A persistent JSON message: `payload` serialized, `content_type` =
    /// `application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(payload: &T) -> crate::Result<Self> {
        crate::codec::JsonCodec.to_message(payload)
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.content_type = Some(v.into());
        self
    }

    /// Sets the content encoding.
    pub fn with_content_encoding(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.content_encoding = Some(v.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.correlation_id = Some(v.into());
        self
    }

    /// Sets the reply-to address.
    pub fn with_reply_to(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.reply_to = Some(v.into());
        self
    }

    /// Sets the message id.
    pub fn with_message_id(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.message_id = Some(v.into());
        self
    }

    /// Sets the priority (0–255, sent as given; a queue with
    /// `x-max-priority` N treats anything above N as N).
    pub fn with_priority(mut self, p: u8) -> Self {
        self.properties.priority = Some(p);
        self
    }

    /// Sets the per-message TTL.
    pub fn with_expiration(mut self, ttl: Duration) -> Self {
        self.properties.expiration = Some(ttl);
        self
    }

    /// Sets the creation timestamp (seconds since the epoch).
    pub fn with_timestamp(mut self, secs: u64) -> Self {
        self.properties.timestamp = Some(secs);
        self
    }

    /// Sets the message type name.
    pub fn with_kind(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.kind = Some(v.into());
        self
    }

    /// Sets the application id.
    pub fn with_app_id(mut self, v: impl Into<Arc<str>>) -> Self {
        self.properties.app_id = Some(v.into());
        self
    }

    /// Makes the message persistent (delivery mode 2, the default) or
    /// transient (delivery mode 1).
    pub fn persistent(mut self, yes: bool) -> Self {
        self.properties.delivery_mode = Some(if yes {
            Properties::PERSISTENT
        } else {
            Properties::TRANSIENT
        });
        self
    }

    /// Makes the message transient (delivery mode 1): faster, but lost if
    /// the broker restarts. Same as `.persistent(false)`.
    pub fn transient(self) -> Self {
        self.persistent(false)
    }

    /// Sets the `x-delay` header (whole milliseconds, saturating) read by
    /// an `x-delayed-message` exchange (see
    /// [`ExchangeSpec::delayed`](crate::ExchangeSpec::delayed)).
    pub fn with_delay(self, delay: Duration) -> Self {
        let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        self.with_header("x-delay", HeaderValue::I64(ms))
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Replaces all headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

/// Current time in whole seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new random identifier (128 random bits, hex), for message and
/// correlation ids.
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS once per process and then per
    // instance; mixing a counter makes consecutive ids distinct.
    use std::hash::{BuildHasher, Hasher};
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let s = std::collections::hash_map::RandomState::new();
    let mut h1 = s.build_hasher();
    h1.write_u64(n);
    let a = h1.finish();
    let mut h2 = s.build_hasher();
    h2.write_u64(a ^ 0x9e37_79b9_7f4a_7c15);
    let b = h2.finish();
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_types_and_read_any_integer() {
        let mut h = Headers::new();
        h.insert("a", 5i32);
        h.insert("b", 7i64);
        h.insert("s", "x");
        assert_eq!(h.get_i64("a"), Some(5));
        assert_eq!(h.get_i64("b"), Some(7));
        assert_eq!(h.get("a"), Some(&HeaderValue::I32(5)));
        assert_eq!(h.get_str("s"), Some("x"));
        assert_eq!(h.get_i64("s"), None);
    }

    #[test]
    fn messages_are_persistent_unless_made_transient() {
        assert!(Message::new("x").properties.is_persistent());
        assert!(Message::default().properties.is_persistent());
        assert!(Message::json(&1).unwrap().properties.is_persistent());
        assert_eq!(Message::new("x").transient().properties.delivery_mode, Some(1));
        assert!(!Message::new("x").persistent(false).properties.is_persistent());
        let none = Properties {
            delivery_mode: None,
            ..Properties::default()
        };
        assert!(!none.is_persistent());
    }

    #[test]
    fn headers_tell_no_table_from_an_empty_table() {
        assert!(!Headers::new().has_table());
        assert!(!Message::new("x").headers.has_table());
        assert!(Headers::empty_table().has_table());
        assert_ne!(Headers::new(), Headers::empty_table());
        let mut h = Headers::new();
        h.insert("a", 1i64);
        assert_eq!(h, [("a", 1i64)].into_iter().collect::<Headers>());
        h.remove("a");
        assert!(!h.has_table(), "a table emptied by removals is no table unless marked");
        h.set_table(true);
        assert_eq!(h, Headers::empty_table());
    }

    #[test]
    fn priority_is_kept_as_set_and_ids_are_unique() {
        assert_eq!(Message::new("x").with_priority(200).properties.priority, Some(200));
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert_eq!(new_id().len(), 32);
    }
}
