#!/usr/bin/env python3
"""Probe RabbitMQ's basic.get and conditional deletes (queue.delete
if-unused / if-empty, exchange.delete if-unused) for the memory twin.

Runs against RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/),
prints one `FACT <what>: <observed>` line per fact and deletes what it
declares. Needs `pip install pika`. Results: docs/rabbitmq-semantics.md
("basic.get" and "Conditional deletes").
"""
import os
import uuid

import pika
from pika.exceptions import ChannelClosedByBroker

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN = uuid.uuid4().hex[:8]
conn = pika.BlockingConnection(pika.URLParameters(URL))
conn2 = pika.BlockingConnection(pika.URLParameters(URL))


def n(s):
    return f"ops-{RUN}-{s}"


def fact(what, observed):
    print(f"FACT {what}: {observed}", flush=True)


def attempt(what, f, c=None):
    ch = (c or conn).channel()
    try:
        r = f(ch)
        fact(what, f"ok {r!r}" if r is not None else "ok")
    except ChannelClosedByBroker as e:
        fact(what, f"{e.reply_code} {e.reply_text}")
        return
    try:
        ch.close()
    except Exception:
        pass


def exists(name):
    ch = conn.channel()
    try:
        ch.queue_declare(name, passive=True)
        ch.close()
        return True
    except ChannelClosedByBroker:
        return False


def get_probe():
    ch = conn.channel()
    q = n("get")
    ch.queue_declare(q)
    fact("get on empty queue", ch.basic_get(q))
    for b in ["a", "b", "c"]:
        ch.basic_publish("", q, b.encode())
    m, p, body = ch.basic_get(q)
    fact("get a (manual)", (body, m.message_count, m.redelivered, m.delivery_tag, m.exchange, m.routing_key))
    ch.basic_nack(m.delivery_tag, requeue=True)
    m, p, body = ch.basic_get(q)
    fact("get after nack requeue", (body, m.message_count, m.redelivered, m.delivery_tag))
    ch.basic_reject(m.delivery_tag, requeue=True)
    m, p, body = ch.basic_get(q, auto_ack=True)
    fact("get auto-ack after reject requeue", (body, m.message_count, m.redelivered))
    m, p, body = ch.basic_get(q)
    fact("get b manual, then close the channel", (body, m.message_count))
    ch.close()
    ch = conn.channel()
    fact("depth after the channel closed", ch.queue_declare(q, passive=True).method.message_count)
    ch.queue_delete(q)
    attempt("get on a missing queue", lambda ch: ch.basic_get(n("missing")))
    # auto-delete queue: get does not delete it, even after a consumer left
    ch = conn.channel()
    ad = n("ad")
    ch.queue_declare(ad, auto_delete=True)
    ch.basic_publish("", ad, b"x")
    ch.basic_publish("", ad, b"y")
    m, p, body = ch.basic_get(ad)
    ch.basic_ack(m.delivery_tag)
    fact("auto-delete queue exists after get+ack", exists(ad))
    ch.basic_get(ad, auto_ack=True)
    fact("auto-delete queue exists after get auto-ack", exists(ad))
    ch.queue_delete(ad)
    # exclusive queue of another connection
    ch2 = conn2.channel()
    ex = n("excl")
    ch2.queue_declare(ex, exclusive=True)
    attempt("get on another connection's exclusive queue", lambda ch: ch.basic_get(ex))
    # queue with an exclusive consumer
    q2 = n("exclcons")
    ch2.queue_declare(q2)
    ch2.basic_publish("", q2, b"z")
    ch2.basic_consume(q2, lambda *a: None, exclusive=True)
    ch2.basic_qos(prefetch_count=0)
    attempt("get on a queue with another connection's exclusive consumer", lambda ch: ch.basic_get(q2))
    ch2.queue_delete(q2)
    # x-expires: does get count as use?
    ch = conn.channel()
    xq = n("expires")
    ch.queue_declare(xq, arguments={"x-expires": 600})
    import time
    for _ in range(4):
        time.sleep(0.3)
        ch.basic_get(xq)
    fact("x-expires 600ms queue after 4 gets 300ms apart", exists(xq))
    if exists(xq):
        conn.channel().queue_delete(xq)


def delete_probe():
    ch = conn.channel()
    q = n("del")
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    attempt("queue.delete if-empty with 1 ready", lambda ch: ch.queue_delete(q, if_empty=True))
    attempt("queue.delete if-unused with 1 ready, no consumer", lambda ch: ch.queue_delete(q, if_unused=True).method.message_count)
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    ch.basic_qos(prefetch_count=5)
    tag = ch.basic_consume(q, lambda *a: None)
    conn.process_data_events(0.3)
    attempt("queue.delete if-unused with a consumer", lambda c: c.queue_delete(q, if_unused=True))
    attempt("queue.delete if-empty with 1 unacked only, consumer", lambda c: c.queue_delete(q, if_empty=True).method.message_count)
    fact("queue exists after if-empty delete with unacked only", exists(q))
    ch.basic_cancel(tag)
    if exists(q):
        attempt("queue.delete if-unused after cancel (unacked left)", lambda c: c.queue_delete(q, if_unused=True).method.message_count)
    attempt("queue.delete if-unused if-empty of a missing queue", lambda c: c.queue_delete(n("missing"), if_unused=True, if_empty=True).method.message_count)
    # exchanges
    ch = conn.channel()
    x = n("x")
    y = n("y")
    q3 = n("bq")
    ch.exchange_declare(x, "direct")
    ch.exchange_declare(y, "direct")
    ch.queue_declare(q3)
    ch.queue_bind(q3, x, "k")
    attempt("exchange.delete if-unused with a queue binding", lambda c: c.exchange_delete(x, if_unused=True))
    ch = conn.channel()
    ch.queue_unbind(q3, x, "k")
    ch.exchange_bind(x, y, "k")  # destination x, source y
    attempt("exchange.delete if-unused of an e2e source", lambda c: c.exchange_delete(y, if_unused=True))
    attempt("exchange.delete if-unused of an e2e destination", lambda c: c.exchange_delete(x, if_unused=True))
    ch = conn.channel()
    ch.exchange_declare(x, "direct")
    attempt("exchange.delete if-unused without bindings", lambda c: c.exchange_delete(y, if_unused=True))
    attempt("exchange.delete if-unused of a missing exchange", lambda c: c.exchange_delete(n("nox"), if_unused=True))
    attempt("exchange.delete if-unused amq.direct", lambda c: c.exchange_delete("amq.direct", if_unused=True))
    ch = conn.channel()
    for e in (x, y):
        ch.exchange_delete(e)
    ch.queue_delete(q3)


get_probe()
delete_probe()
conn.close()
conn2.close()
