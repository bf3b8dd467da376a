#!/usr/bin/env python3
"""Probe the RabbitMQ behaviours the memory broker copies for issue 9
("the memory broker as RabbitMQ's twin"): reply codes and texts of refusals,
queue argument validation and equivalence, sender-selected distribution
(CC/BCC), max length on requeue, and cancel.

Runs against RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/),
prints one `FACT <what>: <observed>` line per fact and deletes what it
declares. Needs `pip install pika`. Results: docs/rabbitmq-semantics.md
("Twin" section).
"""
import os
import sys
import time
import uuid

import pika
from pika.exceptions import ChannelClosedByBroker

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN = uuid.uuid4().hex[:8]
conn = pika.BlockingConnection(pika.URLParameters(URL))
cleanup_q, cleanup_x = [], []


def n(s):
    return f"twin-{RUN}-{s}"


def fact(what, observed):
    print(f"FACT {what}: {observed}", flush=True)


def attempt(what, f):
    ch = conn.channel()
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


def q(ch, name, args=None, **kw):
    ch.queue_declare(name, arguments=args, **kw)
    cleanup_q.append(name)
    return name


def x(ch, name, kind="direct", **kw):
    ch.exchange_declare(name, kind, **kw)
    cleanup_x.append(name)
    return name


def get_all(ch, queue):
    out = []
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=True)
        if m is None:
            return out
        out.append((b.decode(), m.routing_key, m.redelivered, p.headers))


def errors():
    attempt("exchange.declare amq.zz", lambda ch: ch.exchange_declare("amq.zz" + RUN, "direct"))
    attempt("exchange.declare amq.direct (equivalent)", lambda ch: ch.exchange_declare("amq.direct", "direct", durable=True))
    attempt("exchange.declare amq.direct as topic", lambda ch: ch.exchange_declare("amq.direct", "topic", durable=True))
    attempt("exchange.declare ''", lambda ch: ch.exchange_declare("", "direct"))
    attempt("queue.declare amq.zz", lambda ch: ch.queue_declare("amq.zz" + RUN))
    ch = conn.channel()
    qq = q(ch, n("q"))
    xx = x(ch, n("x"))
    xi = x(ch, n("xi"), internal=True)
    attempt("queue.bind to ''", lambda ch: ch.queue_bind(qq, "", routing_key="k"))
    attempt("queue.unbind from ''", lambda ch: ch.queue_unbind(qq, "", routing_key="k"))
    attempt("exchange.bind dest ''", lambda ch: ch.exchange_bind("", xx, routing_key="k"))
    attempt("exchange.bind source ''", lambda ch: ch.exchange_bind(xx, "", routing_key="k"))
    attempt("exchange.bind dest amq.direct", lambda ch: ch.exchange_bind("amq.direct", xx, routing_key="k"))

    def pub_internal(ch):
        ch.confirm_delivery()
        ch.basic_publish(xi, "k", b"x")
    attempt("basic.publish internal", pub_internal)

    def pub_missing(ch):
        ch.confirm_delivery()
        ch.basic_publish(n("nox"), "k", b"x")
    attempt("basic.publish missing exchange", pub_missing)
    attempt("exchange.delete amq.direct", lambda ch: ch.exchange_delete("amq.direct"))
    attempt("exchange.delete ''", lambda ch: ch.exchange_delete(""))
    attempt("exchange.delete missing", lambda ch: ch.exchange_delete(n("nox")))
    attempt("exchange.declare conflicting kind", lambda ch: ch.exchange_declare(xx, "topic"))
    attempt("exchange.declare conflicting durable", lambda ch: ch.exchange_declare(xx, "direct", durable=True))
    attempt("queue.declare conflicting durable", lambda ch: ch.queue_declare(qq, durable=True))
    attempt("queue.declare conflicting auto_delete", lambda ch: ch.queue_declare(qq, auto_delete=True))
    attempt("queue.declare passive missing", lambda ch: ch.queue_declare(n("noq"), passive=True))
    attempt("exchange.declare passive missing", lambda ch: ch.exchange_declare(n("nox"), passive=True))
    attempt("queue.bind missing queue", lambda ch: ch.queue_bind(n("noq"), xx, routing_key="k"))
    attempt("queue.bind missing exchange", lambda ch: ch.queue_bind(qq, n("nox"), routing_key="k"))
    attempt("exchange.bind missing source", lambda ch: ch.exchange_bind(xx, n("nox"), routing_key="k"))
    attempt("exchange.bind missing destination", lambda ch: ch.exchange_bind(n("nox"), xx, routing_key="k"))
    attempt("queue.purge missing", lambda ch: ch.queue_purge(n("noq")))
    attempt("queue.delete missing", lambda ch: ch.queue_delete(n("noq")))
    attempt("basic.get missing", lambda ch: ch.basic_get(n("noq")))
    attempt("basic.consume missing", lambda ch: ch.basic_consume(n("noq"), lambda *a: None))
    attempt("queue.unbind missing", lambda ch: ch.queue_unbind(n("noq"), xx, routing_key="k"))
    ex = q(ch, n("excl"), exclusive=True)
    other = pika.BlockingConnection(pika.URLParameters(URL))
    for what, f in [
        ("exclusive: queue.declare other conn", lambda c: c.queue_declare(ex, exclusive=True)),
        ("exclusive: queue.declare non-exclusive same conn", None),
        ("exclusive: passive other conn", lambda c: c.queue_declare(ex, passive=True)),
        ("exclusive: basic.consume other conn", lambda c: c.basic_consume(ex, lambda *a: None)),
        ("exclusive: queue.purge other conn", lambda c: c.queue_purge(ex)),
        ("exclusive: queue.delete other conn", lambda c: c.queue_delete(ex)),
        ("exclusive: queue.bind other conn", lambda c: c.queue_bind(ex, xx, routing_key="k")),
        ("exclusive: basic.get other conn", lambda c: c.basic_get(ex)),
    ]:
        if f is None:
            attempt(what, lambda ch: ch.queue_declare(ex))
            continue
        c = other.channel()
        try:
            f(c)
            fact(what, "ok")
        except ChannelClosedByBroker as e:
            fact(what, f"{e.reply_code} {e.reply_text}")
    other.close()
    # Exclusive consumer.
    qe = q(ch, n("qe"))
    ch.basic_consume(qe, lambda *a: None, exclusive=True)
    attempt("basic.consume on queue with exclusive consumer", lambda c: c.basic_consume(qe, lambda *a: None))
    ch.close()


class I8(int):
    pass


def args_probe():
    ch = conn.channel()
    for what, args in [
        ("x-message-ttl string", {"x-message-ttl": "1000"}),
        ("x-message-ttl negative", {"x-message-ttl": -1}),
        ("x-expires 0", {"x-expires": 0}),
        ("x-expires string", {"x-expires": "1000"}),
        ("x-max-length negative", {"x-max-length": -1}),
        ("x-max-length string", {"x-max-length": "5"}),
        ("x-max-length-bytes negative", {"x-max-length-bytes": -1}),
        ("x-overflow bogus", {"x-overflow": "bogus"}),
        ("x-overflow int", {"x-overflow": 1}),
        ("x-max-priority 0", {"x-max-priority": 0}),
        ("x-max-priority 256", {"x-max-priority": 256}),
        ("x-max-priority string", {"x-max-priority": "5"}),
        ("x-dead-letter-exchange int", {"x-dead-letter-exchange": 5}),
        ("x-dead-letter-routing-key without dlx", {"x-dead-letter-routing-key": "k"}),
        ("x-dead-letter-routing-key int", {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": 5}),
        ("x-queue-type bogus", {"x-queue-type": "bogus"}),
        ("x-single-active-consumer string", {"x-single-active-consumer": "true"}),
        ("x-queue-mode bogus", {"x-queue-mode": "bogus"}),
        ("x-unknown anything", {"x-unknown": "whatever"}),
        ("x-delivery-limit on classic", {"x-delivery-limit": 3}),
        ("x-delivery-limit string on classic", {"x-delivery-limit": "3"}),
    ]:
        name = n("a" + uuid.uuid4().hex[:6])
        attempt("first declare " + what, lambda c: (q(c, name, args), "declared")[1])
    # Equivalence.
    base = {"x-message-ttl": 1000, "x-max-length": 10, "x-overflow": "drop-head", "x-foo": "a"}
    name = q(ch, n("eq"), dict(base))
    for what, change in [
        ("identical", {}),
        ("x-message-ttl other value", {"x-message-ttl": 2000}),
        ("x-message-ttl as string", {"x-message-ttl": "1000"}),
        ("x-message-ttl as long (same value)", {"x-message-ttl": 2 ** 40 - 2 ** 40 + 1000}),
        ("x-message-ttl absent", {"x-message-ttl": None}),
        ("x-max-length other", {"x-max-length": 11}),
        ("x-max-length negative", {"x-max-length": -1}),
        ("x-overflow other", {"x-overflow": "reject-publish"}),
        ("x-overflow absent", {"x-overflow": None}),
        ("x-foo other", {"x-foo": "b"}),
        ("x-foo absent", {"x-foo": None}),
        ("x-bar added", {"x-bar": 1}),
        ("x-expires added", {"x-expires": 100000}),
        ("x-dead-letter-exchange added", {"x-dead-letter-exchange": "dlx"}),
        ("x-dead-letter-routing-key added", {"x-dead-letter-routing-key": "k"}),
        ("x-max-priority added", {"x-max-priority": 5}),
        ("x-queue-type classic added", {"x-queue-type": "classic"}),
        ("x-queue-mode lazy added", {"x-queue-mode": "lazy"}),
        ("x-single-active-consumer false added", {"x-single-active-consumer": False}),
        ("x-single-active-consumer true added", {"x-single-active-consumer": True}),
        ("x-max-length-bytes added", {"x-max-length-bytes": 1000}),
        ("x-delivery-limit added", {"x-delivery-limit": 3}),
    ]:
        a = dict(base)
        for k, v in change.items():
            if v is None:
                a.pop(k)
            else:
                a[k] = v
        attempt("redeclare " + what, lambda c: c.queue_declare(name, arguments=a) and None)
    # Absent vs explicit classic the other way round
    name2 = q(ch, n("eq2"), {"x-queue-type": "classic"})
    attempt("redeclare without x-queue-type of explicit classic", lambda c: c.queue_declare(name2) and None)
    name3 = q(ch, n("eq3"), {"x-single-active-consumer": False})
    attempt("redeclare without sac of explicit sac=false", lambda c: c.queue_declare(name3) and None)
    ch.close()


def cc_bcc():
    ch = conn.channel()
    xx = x(ch, n("ccx"))
    qs = {}
    for k in "abc":
        qs[k] = q(ch, n("cc" + k))
        ch.queue_bind(qs[k], xx, routing_key=k)
    ch.confirm_delivery()
    ch.basic_publish(xx, "a", b"m1", pika.BasicProperties(headers={"CC": ["b"], "BCC": ["c"], "h": 1}))
    ch.basic_publish(xx, "a", b"m2", pika.BasicProperties(headers={"CC": ["a", "b"], "BCC": ["b", "a"]}))
    time.sleep(0.3)
    for k in "abc":
        fact(f"cc/bcc queue {k}", get_all(ch, qs[k]))
    # Default exchange.
    ch.basic_publish("", qs["a"], b"m3", pika.BasicProperties(headers={"CC": [qs["b"]], "BCC": [qs["c"]]}))
    time.sleep(0.3)
    for k in "abc":
        fact(f"cc/bcc default exchange queue {k}", get_all(ch, qs[k]))
    # Non-array CC
    attempt("publish CC as string", lambda c: (c.confirm_delivery(), c.basic_publish(xx, "a", b"s", pika.BasicProperties(headers={"CC": "b"})))[1] and None)
    time.sleep(0.2)
    for k in "ab":
        fact(f"CC-as-string queue {k}", get_all(ch, qs[k]))
    attempt("publish BCC as int", lambda c: (c.confirm_delivery(), c.basic_publish(xx, "a", b"s", pika.BasicProperties(headers={"BCC": 5})))[1] and None)
    ch.basic_publish(xx, "a", b"mixed", pika.BasicProperties(headers={"CC": ["b", 5]}))
    time.sleep(0.2)
    for k in "ab":
        fact(f"CC mixed array queue {k}", get_all(ch, qs[k]))
    # Mandatory: routed only by CC
    def mand(c):
        c.confirm_delivery()
        c.basic_publish(xx, "nokey", b"m", pika.BasicProperties(headers={"CC": ["b"]}), mandatory=True)
    attempt("mandatory routed only by CC", mand)
    fact("queue b after mandatory-by-CC", get_all(ch, qs["b"]))
    # Dead-lettering.
    dlx = x(ch, n("dlx"))
    dq = {}
    for k in ["d", "e", "f", "r"]:
        dq[k] = q(ch, n("dl" + k))
        ch.queue_bind(dq[k], dlx, routing_key=k)
    src = q(ch, n("src"), {"x-dead-letter-exchange": dlx})
    ch.queue_bind(src, xx, routing_key="d")
    src2 = q(ch, n("src2"), {"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "r"})
    ch.queue_bind(src2, xx, routing_key="d")
    ch.basic_publish(xx, "d", b"dead", pika.BasicProperties(headers={"CC": ["e"], "BCC": ["f"]}))
    time.sleep(0.3)
    for s in (src, src2):
        m, p, b = ch.basic_get(s)
        fact(f"before dead-lettering headers in {s[-4:]}", p.headers)
        ch.basic_reject(m.delivery_tag, requeue=False)
    time.sleep(0.3)
    for k in dq:
        fact(f"dead letter queue {k}", get_all(ch, dq[k]))
    # TTL with CC
    src3 = q(ch, n("src3"), {"x-dead-letter-exchange": dlx, "x-message-ttl": 10})
    ch.queue_bind(src3, xx, routing_key="e")
    ch.basic_publish(xx, "d", b"ttl", pika.BasicProperties(headers={"CC": ["e"]}))
    time.sleep(0.5)
    for k in dq:
        fact(f"ttl dead letter queue {k}", get_all(ch, dq[k]))
    ch.close()


def maxlen_requeue():
    for overflow in ["drop-head", "reject-publish", "reject-publish-dlx"]:
        ch = conn.channel()
        dlx = x(ch, n("mldlx" + overflow))
        dlq = q(ch, n("mldlq" + overflow))
        ch.queue_bind(dlq, dlx, routing_key="#")
        ch2 = conn.channel()
        dx = x(ch2, n("mlfan" + overflow), "fanout")
        ch.queue_bind(dlq, dx)
        qq = q(ch, n("ml" + overflow), {"x-max-length": 2, "x-overflow": overflow, "x-dead-letter-exchange": dx})
        ch.confirm_delivery()
        for i in (1, 2):
            ch.basic_publish("", qq, f"m{i}".encode())
        cons = conn.channel()
        cons.basic_qos(prefetch_count=2)
        got = []
        cons.basic_consume(qq, lambda c, m, p, b: got.append((m.delivery_tag, b.decode())))
        while len(got) < 2:
            conn.process_data_events(0.05)
        for i in (3, 4):
            try:
                ch.basic_publish("", qq, f"m{i}".encode())
            except Exception as e:
                fact(f"{overflow}: publish m{i}", repr(e))
        cons.basic_nack(got[0][0], requeue=True)
        conn.process_data_events(0.3)
        fact(f"{overflow}: depth after nack-requeue of m1 into full queue",
             ch.queue_declare(qq, passive=True).method.message_count)
        # close the consumer channel with m2 unacked (it may have got m1 again)
        cons.close()
        conn.process_data_events(0.3)
        fact(f"{overflow}: queue after closing the channel", [(b, r) for b, _, r, _ in get_all(ch, qq)])
        fact(f"{overflow}: dead letters", [(b, (h or {}).get("x-death", [{}])[0].get("reason")) for b, _, _, h in get_all(ch, dlq)])
        ch2.close()
        ch.close()


def cancel():
    ch = conn.channel()
    qq = q(ch, n("cancel"))
    for i in range(3):
        ch.basic_publish("", qq, f"c{i}".encode())
    cons = conn.channel()
    cons.basic_qos(prefetch_count=10)
    got = []
    tag = cons.basic_consume(qq, lambda c, m, p, b: got.append(m.delivery_tag))
    while len(got) < 3:
        conn.process_data_events(0.05)
    cons.basic_cancel(tag)
    conn.process_data_events(0.2)
    fact("cancel: ready after cancel with 3 unacked", ch.queue_declare(qq, passive=True).method.message_count)
    cons.basic_ack(got[0])
    conn.process_data_events(0.2)
    fact("cancel: ready after acking one after cancel", ch.queue_declare(qq, passive=True).method.message_count)
    cons.close()
    conn.process_data_events(0.2)
    fact("cancel: ready after closing the channel", ch.queue_declare(qq, passive=True).method.message_count)
    ch.close()


def deaths(props):
    """x-death as (queue, reason, count) triples, names without the run prefix."""
    cut = len(n(""))
    return [(d["queue"][cut:], d["reason"], int(d["count"])) for d in (props.headers or {}).get("x-death", [])]


def seconds(t):
    return int(t.timestamp()) if hasattr(t, "timestamp") else int(t)


def dead_letter_cycles():
    ch = conn.channel()
    # A chain q1 -> q2 -> q3 -> q4 -> end through TTLs of 0: the order of
    # x-death after each death.
    end = q(ch, n("dl-end"))
    prev = end
    for i in (4, 3, 2, 1):
        prev = q(ch, n(f"dl-q{i}"), {"x-message-ttl": 0, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": prev})
    ch.basic_publish("", prev, b"chain")
    time.sleep(0.3)
    m, p, b = ch.basic_get(end, auto_ack=True)
    fact("x-death after expiring in q1, q2, q3, q4 in turn", deaths(p))
    # One entry counted twice: is its time kept or updated?
    loop = q(ch, n("dl-loop"), {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": n("dl-loop")})
    ch.basic_publish("", loop, b"loop")
    times = []
    for _ in range(3):
        m, p, b = ch.basic_get(loop, auto_ack=False)
        if p.headers:
            times.append(seconds(p.headers["x-death"][0]["time"]))
        ch.basic_reject(m.delivery_tag, requeue=False)
        time.sleep(1.2)
    fact("x-death time of one entry, rejected again 1.2 s later (seconds between)", times[-1] - times[0])
    ch.basic_get(loop, auto_ack=True)
    # Client-set x-first-death-reason without x-death, and an x-death that
    # is not an array.
    own = q(ch, n("dl-own"), {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": end})
    for hs in ({"x-first-death-reason": "mine"}, {"x-death": "not an array"}):
        ch.basic_publish("", own, b"own", pika.BasicProperties(headers=hs))
        m, p, b = ch.basic_get(own, auto_ack=False)
        ch.basic_reject(m.delivery_tag, requeue=False)
        time.sleep(0.1)
        m, p, b = ch.basic_get(end, auto_ack=True)
        h = p.headers
        fact(f"dead-lettered with {hs}", (h.get("x-first-death-reason"), deaths(p)))
    # Two queues dead-lettering into a fanout exchange bound to both: A
    # (TTL 300 ms) and B (TTL 0). The dead letter from B reaches A; once
    # rejected from A it keeps going round.
    for wait in (0.1, 0.45, 0.75, 1.05):
        e = x(ch, n(f"dl-fan{wait}"), "fanout")
        qa = q(ch, n(f"dl-A{wait}"), {"x-message-ttl": 300, "x-dead-letter-exchange": e})
        qb = q(ch, n(f"dl-B{wait}"), {"x-message-ttl": 0, "x-dead-letter-exchange": e})
        ch.queue_bind(qa, e)
        ch.queue_bind(qb, e)
        ch.basic_publish(e, "k", b"m")
        time.sleep(0.05)
        ch.basic_get(qa, auto_ack=True)
        m, p, b = ch.basic_get(qa, auto_ack=False)
        if wait == 0.1:
            fact("A and B: the dead letter from B in A", deaths(p))
        ch.basic_reject(m.delivery_tag, requeue=False)
        time.sleep(wait)
        fact(f"A and B: A {wait} s after rejecting it", [deaths(p) for _, _, _, p in get_all_props(ch, qa)])
    ch.close()


def get_all_props(ch, queue):
    out = []
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=True)
        if m is None:
            return out
        out.append((b.decode(), m.routing_key, m.redelivered, p))

STEPS = {"errors": errors, "args": args_probe, "cc": cc_bcc, "maxlen": maxlen_requeue, "cancel": cancel, "dlx": dead_letter_cycles}
try:
    for s in (sys.argv[1:] or STEPS):
        STEPS[s]()
finally:
    ch = conn.channel()
    for name in cleanup_q:
        try:
            ch.queue_delete(name)
        except ChannelClosedByBroker:
            ch = conn.channel()
    for name in cleanup_x:
        try:
            ch.exchange_delete(name)
        except ChannelClosedByBroker:
            ch = conn.channel()
    conn.close()
