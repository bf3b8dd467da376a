#!/usr/bin/env python3
"""A wire peer that is not switchyard, for the header round-trip test.

Publishes one message carrying every AMQP field-table type RabbitMQ accepts
(with exact type tags: b B s u I i l f d D S x t T V F A) to QUEUE_IN through
aiormq/pamqp, then waits for the message switchyard republishes to QUEUE_OUT
and compares its headers *with their type tags* (recorded while pamqp decodes
the frame) and its properties with what was sent. Exit 0 when identical.

    python3 scripts/header_peer.py QUEUE_IN QUEUE_OUT [--no-invalid-utf8] [--url URL]
    python3 scripts/header_peer.py --poison QUEUE [--url URL]

`--poison QUEUE` only publishes one message whose `note` header is a long
string that is not valid UTF-8 (legal AMQP; the poison-message test) and exits.

`--no-invalid-utf8` leaves out the long string that is not valid UTF-8 (amqprs
cannot decode it at all). With it, the peer expects that value back as a byte
array (`x`): switchyard carries it as bytes.
"""
import argparse
import asyncio
import datetime
import decimal
import struct
import sys

import aiormq
import pamqp.commands
import pamqp.decode as D
import pamqp.encode as E


class Raw:
    """A value sent with an exact type tag and payload."""

    def __init__(self, tag: bytes, payload: bytes):
        self.tag, self.payload = tag, payload


_encode = E.encode_table_value


def encode_table_value(value):
    if isinstance(value, Raw):
        return value.tag + value.payload
    return _encode(value)


E.encode_table_value = encode_table_value

_embedded = D.embedded_value
TAGGING = False


def embedded_value(value):
    """Decodes like pamqp, keeping the type tag next to the value (only while
    TAGGING: the client's own handshake needs plain values)."""
    n, v = _embedded(value)
    if not TAGGING:
        return n, v
    return n, (value[0:1].decode(), v)


D.embedded_value = embedded_value


def headers(invalid_utf8: bool) -> dict:
    h = {
        "bool": True,
        "i8": -5,
        "u8": Raw(b"B", bytes([200])),
        "i16": -300,
        "u16": 40000,
        "i32": -70000,
        "u32": 3_000_000_000,
        "i64": -(2**40),
        "f32": 1.5,
        "f64": Raw(b"d", struct.pack(">d", 2.25)),
        "dec_neg": decimal.Decimal("-0.001"),
        "dec": decimal.Decimal("12.50"),
        "str": "h\u00e9llo",
        "bytes": bytearray(b"\x00\xff\x10"),
        "ts": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "void": None,
        "table": {"a": 1, "nested": {"b": "c"}},
        "empty_table": {},
        "array": [1, "two", None, [3, 4.0]],
        "empty_array": [],
    }
    if invalid_utf8:
        h["not_utf8"] = Raw(b"S", struct.pack(">I", 2) + b"\xff\xfe")
    return h


def expected(sent: dict, invalid_utf8: bool) -> dict:
    """What the wire carries for `sent`, tags included (encode, then decode)."""
    global TAGGING
    raw = E.field_table(sent)
    TAGGING = True
    _, decoded = D.field_table(raw)
    TAGGING = False
    if invalid_utf8:
        decoded["not_utf8"] = ("x", b"\xff\xfe")
    return decoded


PROPS = dict(
    content_type="application/json",
    content_encoding="identity",
    correlation_id="corr-1",
    message_id="msg-1",
    priority=7,
    delivery_mode=2,
    expiration="60000",
    message_type="peer.test",
    app_id="header-peer",
    timestamp=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
)


async def main() -> int:
    if sys.argv[1:2] == ["--poison"]:
        pp = argparse.ArgumentParser()
        pp.add_argument("--poison", required=True)
        pp.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
        a = pp.parse_args()
        conn = await aiormq.connect(a.url)
        ch = await conn.channel()
        await ch.confirm_delivery()
        bad = {"note": Raw(b"S", struct.pack(">I", 3) + b"\xffok")}
        props = pamqp.commands.Basic.Properties(headers=bad, delivery_mode=2, message_id="poison-1")
        await ch.basic_publish(b"poison", routing_key=a.poison, properties=props)
        await conn.close()
        print(f"peer: published one message with a non-UTF-8 header to {a.poison}")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("queue_in")
    ap.add_argument("queue_out")
    ap.add_argument("--no-invalid-utf8", action="store_true")
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = ap.parse_args()
    invalid_utf8 = not args.no_invalid_utf8

    conn = await aiormq.connect(args.url)
    ch = await conn.channel()
    await ch.confirm_delivery()
    sent = headers(invalid_utf8)
    want = expected(sent, invalid_utf8)
    props = pamqp.commands.Basic.Properties(headers=sent, **PROPS)
    await ch.basic_publish(b'{"peer": true}', routing_key=args.queue_in, properties=props)

    global TAGGING
    got = None
    TAGGING = True
    for _ in range(300):
        msg = await ch.basic_get(args.queue_out, no_ack=True)
        if msg.delivery is not None and not isinstance(msg.delivery, pamqp.commands.Basic.GetEmpty):
            got = msg
            break
        await asyncio.sleep(0.1)
    TAGGING = False
    await conn.close()
    if got is None:
        print(f"peer: nothing arrived on {args.queue_out}")
        return 1
    failures = []
    have = got.header.properties.headers or {}
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            failures.append(f"header {k}: sent {want.get(k)!r}, got back {have.get(k)!r}")
    for k, v in PROPS.items():
        back = getattr(got.header.properties, k)
        if back != v:
            failures.append(f"property {k}: sent {v!r}, got back {back!r}")
    if got.body != b'{"peer": true}':
        failures.append(f"body: got back {got.body!r}")
    for f in failures:
        print("peer:", f)
    print(f"peer: {len(want)} headers and {len(PROPS)} properties compared, {len(failures)} differences")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
