#!/usr/bin/env python3
"""Probe the semantics corners that the switchyard conformance suite pins.

Runs against RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/),
prints one line per fact ("FACT <name>: <observed>") and deletes what it
declares. Needs `pip install pika`. The results are recorded in
docs/rabbitmq-semantics.md.
"""
import os
import struct
import sys
import time
import uuid

import pika
import pika.data
from pika.exceptions import ChannelClosedByBroker

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN = uuid.uuid4().hex[:8]


# --- typed field values: pika cannot choose widths nor report them ---------
class T:
    """A field value with an explicit AMQP type tag (as RabbitMQ names it)."""

    FMT = {"b": ">b", "B": ">B", "s": ">h", "u": ">H", "I": ">i", "i": ">I", "l": ">q", "f": ">f", "d": ">d",
           "T": ">Q", "t": ">B"}

    def __init__(self, tag, value):
        self.tag, self.value = tag, value

    def __repr__(self):
        return f"{self.tag}:{self.value!r}"

    def __eq__(self, other):
        return isinstance(other, T) and (self.tag, self.value) == (other.tag, other.value)


_orig_encode = pika.data.encode_value


def _encode(pieces, value):
    if isinstance(value, T):
        raw = struct.pack(">c", value.tag.encode()) + struct.pack(T.FMT[value.tag], value.value)
        pieces.append(raw)
        return len(raw)
    return _orig_encode(pieces, value)


TYPED = [True]


def _decode(encoded, offset):
    if not TYPED[0]:
        return _orig_decode(encoded, offset)
    kind = encoded[offset:offset + 1].decode()
    if kind in T.FMT:
        fmt = T.FMT[kind]
        (v,) = struct.unpack_from(fmt, encoded, offset + 1)
        if kind == "t":
            v = bool(v)
        return T(kind, v), offset + 1 + struct.calcsize(fmt)
    if kind == "S":
        (n,) = struct.unpack_from(">I", encoded, offset + 1)
        return T("S", encoded[offset + 5:offset + 5 + n].decode()), offset + 5 + n
    if kind == "x":
        (n,) = struct.unpack_from(">I", encoded, offset + 1)
        return T("x", bytes(encoded[offset + 5:offset + 5 + n])), offset + 5 + n
    if kind == "A":
        (n,) = struct.unpack_from(">I", encoded, offset + 1)
        end, off, items = offset + 5 + n, offset + 5, []
        while off < end:
            v, off = _decode(encoded, off)
            items.append(v)
        return T("A", items), end
    if kind == "F":
        table, off = pika.data.decode_table(encoded, offset + 1)
        return T("F", table), off
    if kind == "V":
        return T("V", None), offset + 1
    return _orig_decode(encoded, offset)


_orig_decode = pika.data.decode_value
pika.data.encode_value = _encode
pika.data.decode_value = _decode


# --- helpers ----------------------------------------------------------------
def conn():
    # connection.start carries server properties that pika itself must read
    TYPED[0] = False
    try:
        return pika.BlockingConnection(pika.URLParameters(URL))
    finally:
        TYPED[0] = True


C = conn()
CH = C.channel()
CH.confirm_delivery()
DECLARED_Q, DECLARED_X = [], []


def fact(name, value):
    print(f"FACT {name}: {value}")
    sys.stdout.flush()


def q(suffix, **kw):
    name = f"sy-probe.{RUN}.{suffix}"
    DECLARED_Q.append(name)
    args = kw.pop("arguments", None)
    CH.queue_declare(name, arguments=args, **kw)
    return name


def x(suffix, kind):
    name = f"sy-probe.{RUN}.{suffix}"
    DECLARED_X.append(name)
    CH.exchange_declare(name, kind)
    return name


def pub(exchange, rk, body, **props):
    headers = props.pop("headers", None)
    mandatory = props.pop("mandatory", False)
    CH.basic_publish(exchange, rk, body, pika.BasicProperties(headers=headers, **props), mandatory=mandatory)


def drain(queue):
    out = []
    while True:
        m, p, b = CH.basic_get(queue, auto_ack=True)
        if m is None:
            return out
        out.append(b.decode())


def depth(queue):
    return CH.queue_declare(queue, passive=True).method.message_count


def error_of(fn):
    """Runs fn on a fresh channel; returns the broker's close code or 'ok'."""
    c = conn()
    ch = c.channel()
    try:
        fn(c, ch)
        return "ok"
    except ChannelClosedByBroker as e:
        return f"{e.reply_code} {e.reply_text}"
    finally:
        try:
            c.close()
        except Exception:
            pass


# --- routing ----------------------------------------------------------------
def topic():
    ex = x("topic", "topic")
    patterns = ["#", "*", "a.*", "a.#", "*.*", "a.*.b", "a.#.b", "#.a", "*.#", "a"]
    keys = ["", "a", "a.", "a..b", "a.b", ".a", "a.x.b", "a.x.y.b"]
    qs = {}
    for p in patterns:
        name = q(f"topic-{len(qs)}")
        CH.queue_bind(name, ex, p)
        qs[p] = name
    for k in keys:
        pub(ex, k, k or "<empty>")
    for p in patterns:
        fact(f"topic pattern {p!r} matches keys", drain(qs[p]))


def headers_exchange():
    ex = x("headers", "headers")
    cases = {
        "all-I1": {"x-match": "all", "k": T("I", 1)},
        "any-k1-z2": {"x-match": "any", "k": T("I", 1), "z": T("I", 2)},
        "all-k1-z2": {"x-match": "all", "k": T("I", 1), "z": T("I", 2)},
        "all-xkey": {"x-match": "all", "x-foo": "bar"},
        "all-str1": {"x-match": "all", "k": "1"},
        "all-f1": {"x-match": "all", "k": T("d", 1.0)},
        "all-bool": {"x-match": "all", "k": T("t", True)},
        "all-void": {"x-match": "all", "k": None},
        "default-kind": {"k": T("I", 1), "z": T("I", 2)},
        "all-nokeys": {"x-match": "all"},
        "any-nokeys": {"x-match": "any"},
        "all-binary1": {"x-match": "all", "k": b"1"},
        "any-xfoo-k1": {"x-match": "any", "x-foo": "bar", "k": T("I", 1)},
        "all-k2": {"x-match": "all", "k": T("I", 2)},
    }
    qs = {}
    for label, args in cases.items():
        name = q(f"hdr-{label}")
        CH.queue_bind(name, ex, "", arguments=args)
        qs[label] = name
    msgs = {
        "k=b1": {"k": T("b", 1)},
        "k=B1": {"k": T("B", 1)},
        "k=s1": {"k": T("s", 1)},
        "k=u1": {"k": T("u", 1)},
        "k=i1": {"k": T("i", 1)},
        "k=l1": {"k": T("l", 1)},
        "k=S'1'": {"k": "1"},
        "k=x'1'": {"k": b"1"},
        "k=d1.0": {"k": T("d", 1.0)},
        "k=f1.0": {"k": T("f", 1.0)},
        "k=t": {"k": T("t", True)},
        "k=I1,z=I2": {"k": T("I", 1), "z": T("I", 2)},
        "z=I2": {"z": T("I", 2)},
        "x-foo=bar": {"x-foo": "bar"},
        "k=I2": {"k": T("I", 2)},
        "k=l-big": {"k": T("l", 2 ** 32 + 1)},
        "none": None,
    }
    for label, h in msgs.items():
        pub(ex, "", label, headers=h)
    for label in cases:
        fact(f"headers binding {label} {cases[label]} matches", drain(qs[label]))


def e2e_and_unbind():
    src = x("e2e-src", "topic")
    dst = x("e2e-dst", "fanout")
    name = q("e2e")
    CH.exchange_bind(dst, src, "a.#")
    CH.queue_bind(name, dst, "")
    pub(src, "a.b", "1")
    pub(src, "b", "2")
    fact("exchange-to-exchange binding topic a.# -> fanout -> queue got", drain(name))
    CH.queue_unbind(name, dst, "")
    pub(src, "a.c", "3")
    fact("after unbind got", drain(name))
    fact("unbind of a missing binding", error_of(lambda c, ch: ch.queue_unbind(name, dst, "nope")))
    twice = q("bound-twice")
    CH.queue_bind(twice, src, "a.*")
    CH.queue_bind(twice, src, "#")
    pub(src, "a.b", "once")
    fact("queue bound twice (a.* and #) to a topic exchange, one publish a.b: got", drain(twice))
    fact("default exchange routes to queue by name", (pub("", name, "d"), drain(name))[1])
    fact("bind to default exchange", error_of(lambda c, ch: ch.queue_bind(name, "", "x")))


# --- declarations -------------------------------------------------------------
def declarations():
    name = q("decl", durable=True)
    CH.queue_declare(name, durable=True)
    fact("identical queue redeclare", "ok")
    fact("queue redeclare durable=false", error_of(lambda c, ch: ch.queue_declare(name, durable=False)))
    fact("queue redeclare other arguments", error_of(
        lambda c, ch: ch.queue_declare(name, durable=True, arguments={"x-max-length": 5})))
    ex = f"sy-probe.{RUN}.decl-x"
    DECLARED_X.append(ex)
    CH.exchange_declare(ex, "direct", durable=True)
    CH.exchange_declare(ex, "direct", durable=True)
    fact("identical exchange redeclare", "ok")
    fact("exchange redeclare other kind", error_of(lambda c, ch: ch.exchange_declare(ex, "topic", durable=True)))
    fact("exchange redeclare durable=false", error_of(lambda c, ch: ch.exchange_declare(ex, "direct", durable=False)))
    fact("exchange redeclare auto_delete=true", error_of(
        lambda c, ch: ch.exchange_declare(ex, "direct", durable=True, auto_delete=True)))
    fact("queue redeclare exclusive=true (same connection)", error_of(lambda c, ch: ch.queue_declare(name, durable=True, exclusive=True)))
    fact("queue redeclare auto_delete=true", error_of(lambda c, ch: ch.queue_declare(name, durable=True, auto_delete=True)))
    # exclusive queue from another connection
    exq = f"sy-probe.{RUN}.exclusive"
    CH.queue_declare(exq, exclusive=True)
    fact("exclusive queue: consume from 2nd connection",
         error_of(lambda c, ch: ch.basic_consume(exq, lambda *a: None)))
    fact("exclusive queue: passive declare from 2nd connection",
         error_of(lambda c, ch: ch.queue_declare(exq, passive=True)))
    fact("exclusive queue: redeclare from 2nd connection", error_of(lambda c, ch: ch.queue_declare(exq, exclusive=True)))
    fact("exclusive queue: publish from 2nd connection", error_of(lambda c, ch: ch.basic_publish("", exq, b"p")))
    fact("exclusive queue: delete from 2nd connection", error_of(lambda c, ch: ch.queue_delete(exq)))
    fact("exclusive queue: purge from 2nd connection", error_of(lambda c, ch: ch.queue_purge(exq)))
    CH.queue_delete(exq)
    # exclusive consumer
    name2 = q("exclusive-consumer")
    c2 = conn()
    ch2 = c2.channel()
    ch2.basic_consume(name2, lambda *a: None, exclusive=True)
    fact("exclusive consumer held: 2nd consume", error_of(lambda c, ch: ch.basic_consume(name2, lambda *a: None)))
    c2.close()
    fact("exclusive consumer held by other conn, closed: consume again",
         error_of(lambda c, ch: ch.basic_consume(name2, lambda *a: None)))
    c3 = conn()
    ch3 = c3.channel()
    ch3.basic_consume(name2, lambda *a: None)
    fact("consumer present: exclusive consume", error_of(
        lambda c, ch: ch.basic_consume(name2, lambda *a: None, exclusive=True)))
    c3.close()
    # exclusive queue of a closed connection
    c6 = conn()
    ch6 = c6.channel()
    exq2 = f"sy-probe.{RUN}.exclusive-closed"
    ch6.queue_declare(exq2, exclusive=True)
    c6.close()
    time.sleep(0.2)
    fact("exclusive queue after its connection closed", error_of(lambda c, ch: ch.queue_declare(exq2, passive=True)))
    # x-expires
    unused = q("expires-unused", arguments={"x-expires": 300})
    used = q("expires-used", arguments={"x-expires": 300})
    c7 = conn()
    ch7 = c7.channel()
    ch7.basic_consume(used, lambda *a: None)
    time.sleep(1.0)
    fact("x-expires 300ms, no consumer, after 1s", error_of(lambda c, ch: ch.queue_declare(unused, passive=True)))
    fact("x-expires 300ms, with a consumer, after 1s", error_of(lambda c, ch: ch.queue_declare(used, passive=True)))
    c7.close()
    time.sleep(1.0)
    fact("x-expires 300ms, consumer gone 1s ago", error_of(lambda c, ch: ch.queue_declare(used, passive=True)))
    polled = q("expires-polled", arguments={"x-expires": 300})
    for _ in range(10):
        time.sleep(0.1)
        CH.queue_declare(polled, passive=True)
    fact("x-expires 300ms, passive declare every 100ms for 1s", error_of(lambda c, ch: ch.queue_declare(polled, passive=True)))
    time.sleep(1.0)
    fact("  then left alone 1s", error_of(lambda c, ch: ch.queue_declare(polled, passive=True)))
    # server-named
    r = CH.queue_declare("", exclusive=True)
    fact("server-named queue name", r.method.queue)
    CH.queue_delete(r.method.queue)
    # auto-delete
    ad = q("autodelete", auto_delete=True)
    time.sleep(0.2)
    fact("auto-delete queue with no consumer ever still exists", error_of(lambda c, ch: ch.queue_declare(ad, passive=True)))
    c4 = conn()
    ch4 = c4.channel()
    t1 = ch4.basic_consume(ad, lambda *a: None)
    t2 = ch4.basic_consume(ad, lambda *a: None)
    ch4.basic_cancel(t1)
    time.sleep(0.2)
    fact("auto-delete: one of two consumers cancelled, queue", error_of(lambda c, ch: ch.queue_declare(ad, passive=True)))
    ch4.basic_cancel(t2)
    time.sleep(0.2)
    fact("auto-delete: last consumer cancelled, queue", error_of(lambda c, ch: ch.queue_declare(ad, passive=True)))
    c4.close()
    # missing things
    fact("publish to missing exchange", error_of(lambda c, ch: (ch.confirm_delivery(), ch.basic_publish(
        f"sy-probe.{RUN}.missing", "k", b"x"))))
    fact("consume missing queue", error_of(lambda c, ch: ch.basic_consume(f"sy-probe.{RUN}.missing", lambda *a: None)))
    fact("passive declare missing queue", error_of(lambda c, ch: ch.queue_declare(f"sy-probe.{RUN}.missing", passive=True)))
    fact("purge missing queue", error_of(lambda c, ch: ch.queue_purge(f"sy-probe.{RUN}.missing")))
    fact("delete missing queue", error_of(lambda c, ch: print("   delete-ok count",
         ch.queue_delete(f"sy-probe.{RUN}.missing").method.message_count)))
    fact("delete missing exchange", error_of(lambda c, ch: ch.exchange_delete(f"sy-probe.{RUN}.missing")))
    fact("bind missing queue", error_of(lambda c, ch: ch.queue_bind(f"sy-probe.{RUN}.missing", "amq.direct", "k")))
    fact("bind from missing exchange", error_of(lambda c, ch: ch.queue_bind(name, f"sy-probe.{RUN}.missing", "k")))
    fact("passive declare missing exchange",
         error_of(lambda c, ch: ch.exchange_declare(f"sy-probe.{RUN}.missing", passive=True)))
    # mandatory
    returned = []
    c5 = conn()
    ch5 = c5.channel()
    ch5.confirm_delivery()
    ch5.add_on_return_callback(lambda ch, m, p, b: returned.append((m.reply_code, m.reply_text, m.exchange, m.routing_key)))
    try:
        ch5.basic_publish("amq.direct", f"nobody.{RUN}", b"m", mandatory=True)
        fact("mandatory unroutable publish", "confirmed (ack)")
    except pika.exceptions.UnroutableError as e:
        fact("mandatory unroutable publish", f"UnroutableError, returned {[(m.method.reply_code, m.method.reply_text) for m in e.messages]}")
    ch5.basic_publish("amq.direct", f"nobody.{RUN}", b"m")
    fact("non-mandatory unroutable publish", "confirmed (ack), dropped")
    c5.close()


# --- delivery ---------------------------------------------------------------
def delivery():
    name = q("requeue")
    for i in range(1, 5):
        pub("", name, str(i))
    got = [CH.basic_get(name) for _ in range(3)]
    CH.basic_nack(got[0][0].delivery_tag, requeue=True)
    CH.basic_nack(got[2][0].delivery_tag, requeue=True)
    order = []
    while True:
        m, p, b = CH.basic_get(name, auto_ack=False)
        if m is None:
            break
        order.append((b.decode(), m.redelivered))
        CH.basic_ack(m.delivery_tag)
    fact("publish 1..4, get 1,2,3, nack(1,requeue) then nack(3,requeue); queue order (body, redelivered)", order)
    CH.basic_ack(got[1][0].delivery_tag)
    # depth counts ready only; purge and delete counts
    name = q("depth")
    for i in range(5):
        pub("", name, str(i))
    m, _, _ = CH.basic_get(name)
    fact("5 published, 1 unacked: declare-ok message_count", depth(name))
    fact("purge count (4 ready, 1 unacked)", CH.queue_purge(name).method.message_count)
    for i in range(3):
        pub("", name, str(i))
    fact("delete count (3 ready, 1 unacked)", CH.queue_delete(name).method.message_count)
    # consumer count
    name = q("consumers")
    c = conn()
    ch = c.channel()
    ch.basic_consume(name, lambda *a: None)
    ch.basic_consume(name, lambda *a: None)
    fact("2 consumers: declare-ok consumer_count", CH.queue_declare(name, passive=True).method.consumer_count)
    c.close()
    # queue deleted under a consumer
    name = q("deleted-under")
    c = conn()
    ch = c.channel()
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.NAME))
    ch.basic_consume(name, lambda *a: None)
    CH.queue_delete(name)
    c.process_data_events(0.5)
    fact("queue deleted under consumer: consumer receives", cancelled)
    c.close()
    # reject without requeue and no DLX
    name = q("reject-drop")
    pub("", name, "r")
    m, _, _ = CH.basic_get(name)
    CH.basic_reject(m.delivery_tag, requeue=False)
    fact("reject(requeue=false) without DLX: depth after", depth(name))
    # prefetch with basic_consume: messages arriving count
    name = q("prefetch")
    for i in range(5):
        pub("", name, str(i))
    c = conn()
    ch = c.channel()
    ch.basic_qos(prefetch_count=2)
    got = []
    ch.basic_consume(name, lambda ch_, m, p, b: got.append(m.delivery_tag))
    c.process_data_events(0.5)
    fact("prefetch 2, 5 ready: delivered before any ack", len(got))
    ch.basic_ack(got[0])
    c.process_data_events(0.5)
    fact("after one ack: delivered", len(got))
    fact("depth (ready) with 3 unacked of 5", depth(name))
    c.close()
    # cancel: unacked stay with the channel
    name = q("cancel")
    for i in range(2):
        pub("", name, str(i))
    c = conn()
    ch = c.channel()
    ch.basic_qos(prefetch_count=10)
    got = []
    tag = ch.basic_consume(name, lambda ch_, m, p, b: got.append(m.delivery_tag))
    c.process_data_events(0.3)
    ch.basic_cancel(tag)
    fact("after cancel with 2 unacked: depth", depth(name))
    ch.basic_ack(got[0])
    fact("ack after cancel", "ok")
    c.close()
    time.sleep(0.2)
    fact("after channel close with 1 unacked left: depth", depth(name))


def round_robin():
    name = q("rr")
    c = conn()
    ch = c.channel()
    ch.basic_qos(prefetch_count=10)
    seen = {"A": [], "B": []}
    ch.basic_consume(name, lambda ch_, m, p, b: seen["A"].append(b.decode()), auto_ack=True)
    ch.basic_consume(name, lambda ch_, m, p, b: seen["B"].append(b.decode()), auto_ack=True)
    for i in range(6):
        pub("", name, str(i))
    c.process_data_events(0.5)
    fact("two consumers, 6 messages: split", seen)
    c.close()


# --- dead lettering -----------------------------------------------------------
def dead_lettering():
    dlx = x("dlx", "direct")
    dlq = q("dlq")
    CH.queue_bind(dlq, dlx, "dead")
    CH.queue_bind(dlq, dlx, "orig")
    src = q("dl-src", arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
    pub("", src, "rej", headers={"h": "v"}, expiration="60000", priority=3)
    m, _, _ = CH.basic_get(src)
    CH.basic_reject(m.delivery_tag, requeue=False)
    time.sleep(0.2)
    m, p, b = CH.basic_get(dlq, auto_ack=True)
    fact("dead-lettered on reject: delivery exchange / routing key", (m.exchange, m.routing_key))
    fact("dead-lettered on reject: headers", p.headers)
    fact("dead-lettered on reject: expiration / priority property", (p.expiration, p.priority))
    # no routing-key override: keeps original routing key(s)
    src2 = q("dl-src2", arguments={"x-dead-letter-exchange": dlx})
    CH.queue_bind(src2, "amq.direct", "orig")
    pub("amq.direct", "orig", "rej2")
    m, _, _ = CH.basic_get(src2)
    CH.basic_nack(m.delivery_tag, requeue=False)
    time.sleep(0.2)
    m, p, b = CH.basic_get(dlq, auto_ack=True)
    fact("dead-lettered via nack without rk override: rk / x-death", (m.routing_key, p.headers))
    # per-message TTL only at the head
    src3 = q("dl-ttl-head", arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
    pub("", src3, "long", expiration="60000")
    pub("", src3, "short", expiration="50")
    time.sleep(0.4)
    fact("per-message TTL: short behind long, after 400ms depth", depth(src3))
    fact("  dlq has", drain(dlq))
    m, _, _ = CH.basic_get(src3, auto_ack=True)
    time.sleep(0.2)
    fact("  after taking head: depth", depth(src3))
    m, p, b = CH.basic_get(dlq, auto_ack=True)
    fact("  dlq then has", (b and b.decode(), p and p.headers, p and p.expiration))
    # a short TTL at the head expires
    pub("", src3, "short2", expiration="50")
    time.sleep(0.4)
    fact("per-message TTL at head, after 400ms: depth", depth(src3))
    m, p, b = CH.basic_get(dlq, auto_ack=True)
    fact("  dlq", (b and b.decode(), p and p.headers))
    # queue TTL
    src4 = q("dl-qttl", arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead",
                                   "x-message-ttl": 100})
    pub("", src4, "q1")
    pub("", src4, "q2")
    time.sleep(0.5)
    fact("queue TTL 100ms, after 500ms: depth", depth(src4))
    res = []
    while True:
        m, p, b = CH.basic_get(dlq, auto_ack=True)
        if m is None:
            break
        res.append((b.decode(), p.headers))
    fact("  dlq", res)
    # max-length drop-head
    src5 = q("dl-maxlen", arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead",
                                     "x-max-length": 2})
    for i in range(1, 5):
        pub("", src5, f"m{i}")
    time.sleep(0.2)
    fact("max-length 2 drop-head, 4 published: queue holds", drain(src5))
    res = []
    while True:
        m, p, b = CH.basic_get(dlq, auto_ack=True)
        if m is None:
            break
        res.append((b.decode(), p.headers["x-death"].value[0].value["reason"].value))
    fact("  dlq got", res)
    # max-length counts ready only
    src6 = q("maxlen-ready", arguments={"x-max-length": 2})
    pub("", src6, "u1")
    m_un, _, _ = CH.basic_get(src6)
    pub("", src6, "r1")
    pub("", src6, "r2")
    fact("max-length 2 with 1 unacked + 2 published: ready depth", depth(src6))
    CH.basic_ack(m_un.delivery_tag)
    # reject-publish
    src7 = q("rejpub", arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead",
                                  "x-max-length": 1, "x-overflow": "reject-publish"})
    pub("", src7, "a")
    try:
        pub("", src7, "b")
        fact("reject-publish: second publish", "confirmed")
    except pika.exceptions.NackError:
        fact("reject-publish: second publish", "nacked (NackError)")
    fact("  queue holds", drain(src7))
    fact("  dlq got", drain(dlq))
    src8 = q("rejpubdlx", arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead",
                                     "x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    pub("", src8, "a")
    try:
        pub("", src8, "b")
        fact("reject-publish-dlx: second publish", "confirmed")
    except pika.exceptions.NackError:
        fact("reject-publish-dlx: second publish", "nacked (NackError)")
    fact("  queue holds", drain(src8))
    m, p, b = CH.basic_get(dlq, auto_ack=True)
    fact("  dlq got", (b and b.decode(), p and p.headers))
    # twice dead-lettered through the same queue: count increments
    loop = q("dl-loop", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"sy-probe.{RUN}.dl-loop"})
    pub("", loop, "again")
    for _ in range(2):
        m, _, _ = CH.basic_get(loop)
        CH.basic_reject(m.delivery_tag, requeue=False)
        time.sleep(0.1)
    m, p, b = CH.basic_get(loop, auto_ack=True)
    fact("rejected twice from the same queue (DLX = default exchange back to it): headers", p.headers)
    # two queues: A dead-letters into B, B into C
    qc = q("dl-chain-c")
    qb = q("dl-chain-b", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": qc})
    qa = q("dl-chain-a", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": qb})
    pub("", qa, "chain")
    for src_q in (qa, qb):
        m, _, _ = CH.basic_get(src_q)
        CH.basic_reject(m.delivery_tag, requeue=False)
        time.sleep(0.1)
    m, p, b = CH.basic_get(qc, auto_ack=True)
    fact("dead-lettered A -> B -> C: x-death queues in order",
         [e.value["queue"].value for e in p.headers["x-death"].value])
    fact("  x-first-death-queue", p.headers["x-first-death-queue"])
    # the DLX does not exist: the rejected message is dropped
    q1 = q("dl-missing-dlx", arguments={"x-dead-letter-exchange": f"sy-probe.{RUN}.no-such-dlx"})
    pub("", q1, "x")
    m, _, _ = CH.basic_get(q1)
    CH.basic_reject(m.delivery_tag, requeue=False)
    time.sleep(0.2)
    fact("DLX missing: reject accepted, depth after", depth(q1))
    # the lower of queue TTL and per-message TTL applies
    sink = q("dl-sink")
    q2 = q("dl-ttl-min1", arguments={"x-message-ttl": 60000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": sink})
    pub("", q2, "m50", expiration="50")
    q3 = q("dl-ttl-min2", arguments={"x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": sink})
    pub("", q3, "m60s", expiration="60000")
    time.sleep(0.5)
    fact("queue TTL 60s + message TTL 50ms / queue TTL 100ms + message TTL 60s: depths after 500ms",
         (depth(q2), depth(q3)))
    res = []
    while True:
        m, p, b = CH.basic_get(sink, auto_ack=True)
        if m is None:
            break
        res.append((b.decode(), p.headers["x-death"].value[0].value.get("original-expiration")))
    fact("  dead letters (body, original-expiration)", res)
    # a message held unacked past the queue TTL, then requeued, expires at once
    q4 = q("dl-ttl-requeue", arguments={"x-message-ttl": 200, "x-dead-letter-exchange": "",
                                        "x-dead-letter-routing-key": sink})
    pub("", q4, "held")
    m, _, _ = CH.basic_get(q4)
    time.sleep(0.5)
    CH.basic_nack(m.delivery_tag, requeue=True)
    time.sleep(0.3)
    fact("queue TTL 200ms, held unacked 500ms then requeued: depth", depth(q4))
    fact("  dead letters", drain(sink))


# --- priorities ----------------------------------------------------------------
def priorities():
    name = q("prio", arguments={"x-max-priority": 5})
    for body, pr in [("p0a", None), ("p3a", 3), ("p9", 9), ("p3b", 3), ("p0b", 0), ("p5", 5)]:
        pub("", name, body, priority=pr)
    out = []
    while True:
        m, p, b = CH.basic_get(name, auto_ack=True)
        if m is None:
            break
        out.append((b.decode(), p.priority))
    fact("x-max-priority 5: consumed order (body, priority property)", out)
    name = q("noprio")
    for body, pr in [("a", 1), ("b", 9)]:
        pub("", name, body, priority=pr)
    fact("queue without x-max-priority: order", drain(name))


# --- properties and header types -------------------------------------------------
def properties():
    name = q("props")
    props = dict(content_type="application/json", content_encoding="gzip", correlation_id="c-1", reply_to="r",
                 message_id="m-1", timestamp=1700000000, priority=4, expiration="60000", delivery_mode=2,
                 type="kind", app_id="app", user_id="guest")
    headers = {"b": T("b", -5), "B": T("B", 200), "s": T("s", -300), "u": T("u", 60000), "I": T("I", -70000),
               "i": T("i", 4000000000), "l": T("l", -(2 ** 40)), "f": T("f", 1.5), "d": T("d", 2.25),
               "t": T("t", True), "S": "str", "x": b"\x00\xff", "T": T("T", 1700000000),
               "A": [T("I", 1), "two"], "F": {"n": T("l", 1)}, "V": None}
    pub("", name, "props", headers=headers, **props)
    m, p, b = CH.basic_get(name, auto_ack=True)
    plain = p.headers
    for k in props:
        fact(f"property {k} round-trip", getattr(p, k))
    for k in sorted(headers):
        fact(f"header type {k} round-trip", p.headers.get(k))
    fact("user_id other than the connection's user", error_of(
        lambda c, ch: (ch.confirm_delivery(), ch.basic_publish("", name, b"u", pika.BasicProperties(user_id="other")))))
    # after dead-lettering, do header types survive?
    dlx = x("props-dlx", "fanout")
    dlq = q("props-dlq")
    CH.queue_bind(dlq, dlx, "")
    src = q("props-src", arguments={"x-dead-letter-exchange": dlx})
    pub("", src, "props", headers=headers)
    m, _, _ = CH.basic_get(src)
    CH.basic_reject(m.delivery_tag, requeue=False)
    time.sleep(0.2)
    m, p, b = CH.basic_get(dlq, auto_ack=True)
    changed = {k: (plain.get(k), p.headers.get(k)) for k in headers if p.headers.get(k) != plain.get(k)}
    fact("header types after dead-lettering, compared with a plain round trip (those changed)", changed or "none")
    fact("header values after dead-lettering", {k: p.headers.get(k) for k in sorted(headers)})


# --- max-length-bytes, auto-delete exchange, single active consumer, quorum delivery limit ---
def extras():
    dl = q("extras-dl")
    mb = q("maxbytes", arguments={"x-max-length-bytes": 10, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dl})
    for b in ["aaaa", "bbbb", "cccc"]:
        pub("", mb, b)
    fact("x-max-length-bytes 10, three 4-byte bodies: queue", drain(mb))
    res = []
    while True:
        m, p, b = CH.basic_get(dl, auto_ack=True)
        if m is None:
            break
        res.append((b.decode(), p.headers["x-death"].value[0].value["reason"].value))
    fact("  dead letters (body, reason)", res)
    # auto-delete exchange
    ax = f"sy-probe.{RUN}.adx"
    DECLARED_X.append(ax)
    CH.exchange_declare(ax, "direct", auto_delete=True)
    time.sleep(0.2)
    fact("auto-delete exchange never bound", error_of(lambda c, ch: ch.exchange_declare(ax, "direct", auto_delete=True,
                                                                                       passive=True)))
    aq = q("adx-q")
    CH.queue_bind(aq, ax, "k")
    CH.queue_bind(aq, ax, "j")
    CH.queue_unbind(aq, ax, "k")
    fact("auto-delete exchange, one of two bindings removed", error_of(
        lambda c, ch: ch.exchange_declare(ax, "direct", auto_delete=True, passive=True)))
    CH.queue_unbind(aq, ax, "j")
    time.sleep(0.2)
    fact("auto-delete exchange, last binding removed", error_of(
        lambda c, ch: ch.exchange_declare(ax, "direct", auto_delete=True, passive=True)))
    # single active consumer
    sac = q("sac", arguments={"x-single-active-consumer": True})
    ca, cb = conn(), conn()
    cha, chb = ca.channel(), cb.channel()
    got = {"A": [], "B": []}
    ta = cha.basic_consume(sac, lambda a, m, p, b: (got["A"].append(b.decode()), a.basic_ack(m.delivery_tag)))
    chb.basic_consume(sac, lambda a, m, p, b: (got["B"].append(b.decode()), a.basic_ack(m.delivery_tag)))
    for i in range(4):
        pub("", sac, str(i))
    ca.process_data_events(0.5)
    cb.process_data_events(0.5)
    fact("single active consumer, two consumers, 4 messages", dict(got))
    cha.basic_cancel(ta)
    time.sleep(0.3)
    for i in range(4, 6):
        pub("", sac, str(i))
    ca.process_data_events(0.5)
    cb.process_data_events(1.0)
    fact("  after the active one cancels, 2 more", dict(got))
    ca.close()
    cb.close()
    # quorum queue delivery limit
    qq = q("quorum", durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 2,
                                              "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dl})
    pub("", qq, "poison")
    seen = []
    for _ in range(5):
        time.sleep(0.2)
        m, p, b = CH.basic_get(qq)
        if m is None:
            break
        seen.append((m.redelivered, (p.headers or {}).get("x-delivery-count")))
        CH.basic_nack(m.delivery_tag, requeue=True)
    time.sleep(0.3)
    fact("quorum queue, x-delivery-limit 2, nack(requeue) each time: deliveries (redelivered, x-delivery-count)", seen)
    m, p, b = CH.basic_get(dl, auto_ack=True)
    fact("  dead letter", (b and b.decode(), p and p.headers))
    # the same through basic.consume (basic.get above reports x-delivery-count 0 on the first delivery)
    qq2 = q("quorum-consume", durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 2})
    pub("", qq2, "poison")
    seen = []

    def on_message(a, m, p, b):
        seen.append((m.redelivered, (p.headers or {}).get("x-delivery-count")))
        a.basic_nack(m.delivery_tag, requeue=True)

    cq = conn()
    chq = cq.channel()
    chq.basic_qos(prefetch_count=1)
    chq.basic_consume(qq2, on_message)
    end = time.time() + 2
    while time.time() < end:
        cq.process_data_events(0.1)
    cq.close()
    fact("quorum queue, x-delivery-limit 2, consumer nacking with requeue: deliveries (redelivered, x-delivery-count)",
         seen)


def main():
    fact("broker version", C._impl.server_properties.get("version"))
    steps = [topic, headers_exchange, e2e_and_unbind, declarations, delivery, round_robin, dead_lettering,
             priorities, properties, extras]
    only = sys.argv[1:]
    try:
        for step in steps:
            if only and step.__name__ not in only:
                continue
            print(f"--- {step.__name__}")
            step()
    finally:
        # A fresh connection: the probe's own may have been closed by an error.
        cleanup = conn()
        ch = cleanup.channel()
        for n in DECLARED_Q:
            ch.queue_delete(n)
        for n in DECLARED_X:
            ch.exchange_delete(n)
        cleanup.close()
        if C.is_open:
            C.close()

if __name__ == "__main__":
    main()
