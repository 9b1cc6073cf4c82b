#!/usr/bin/env python3
"""
Store benchmark: what pager's SQLite store alone costs per message, with no network, no JSON, no Deferreds and no
signature check.  Pager's own transaction functions run in a plain loop on one connection set up as the server sets
up its own (WAL, synchronous=FULL), in transactions of --batch messages, each ending with its COMMIT:

- accept: accept_message_txn for a 256-byte message to one recipient (the row, the delivery, the recipient's
  counters; the row holds the message's fields in the live scenario, its push line in the queued one, as the
  server stores a message for a connected or a disconnected recipient);
- read back: pending_pushes_txn, a page at a time, as a login's drain reads the queue;
- settle: ack_many_txn, the list-form ack: the delivery and the message deleted, a receipt stored for the sender;
- dismiss: ack_many_txn with the receipt ids, as the sender acknowledges its receipts.

Two scenarios.  live, the relay's steady state: each batch is accepted, settled and its receipts dismissed before
the next, so the database stays small; a message relayed to an online recipient is pushed from memory, never read
back, so 1 / (accept + settle + dismiss) is a ceiling on durable messages per second that no change above the store
can lift.  queued, a drain: every message is accepted first, then read back a page at a time and settled; 100,000 x
(read back + settle) is a floor for draining 100,000.  Both are shown next to the relay's and the drain's targets, as
references.

    python bench/store.py [--quick] [--json] [--count 100000] [--batch 1000]
"""

import argparse
import collections
import itertools
import os
import shutil
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

import pager  # noqa: E402

TARGET_RELAY = 10000.0  # durable messages per second, 10 pairs (bench/relay.py)
TARGET_DRAIN_S = 2.0  # seconds for 100,000 queued messages (bench/drain.py)


_clock_ms = itertools.count(int(time.time() * 1000))


def _message_ids(n):
    """C{n} message ids as pager's sender makes them (pager.new_message_id), for messages sealed 1 ms apart."""
    return [pager.new_message_id(next(_clock_ms)) for _ in range(n)]


def _push_msg_id(line):
    """The message id of a push line as the store gives it (its "msg" member comes first)."""
    start = len(b'{"type":"message","msg":"')
    return bytes.fromhex(line[start:start + 2 * pager.MESSAGE_ID_SIZE].decode("ascii"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="the cost of pager's SQLite store per message, alone")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (10,000 messages)")
    p.add_argument("--full", action="store_true", help="the full run (the default: 100,000 messages)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--count", type=int, help="messages to accept, read back and settle")
    p.add_argument("--batch", type=int, default=1000, help="messages per transaction (default 1000)")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    if args.count is None:
        args.count = 10000 if args.quick else 100000
    if args.count < 1 or args.batch < 1:
        p.error("--count and --batch must be at least 1")
    return args


def open_db(work, name):
    conn = sqlite3.connect(os.path.join(work, name), isolation_level=None)
    pager.prepare_connection(conn)
    txn = conn.cursor()
    pager.create_schema_txn(txn)
    txn.execute("BEGIN")
    for user in ("sender", "receiver"):
        pager.add_user_txn(txn, user, "PEM", b"f" * 32, b"s" * 16, b"h" * 32, time.time())
    txn.execute("COMMIT")
    return conn, txn


class Steps:
    """Pager's own store functions over one connection, each step timed (wall and CPU seconds, summed)."""

    def __init__(self, txn, envelope, batch):
        self.txn, self.envelope, self.batch = txn, envelope, batch
        self.limits = pager.Limits(max_pending_messages=10 ** 9, max_pending_bytes=10 ** 15,
                                   max_sender_pending_messages=10 ** 9, max_sender_pending_bytes=10 ** 15,
                                   max_db_bytes=10 ** 15)
        self.now = time.time()
        self.times = collections.defaultdict(lambda: [0.0, 0.0])

    def _timed(self, step, fn, *args):
        t0, c0 = time.perf_counter(), time.process_time()
        self.txn.execute("BEGIN")
        result = fn(*args)
        self.txn.execute("COMMIT")
        spent = self.times[step]
        spent[0] += time.perf_counter() - t0
        spent[1] += time.process_time() - c0
        return result

    def accept(self, ids, queued):
        def run():
            e = self.envelope
            for msg_id in ids:
                # the server encodes the push line on its reactor before the transaction, and stores it when the
                # recipient is not connected (queued); so does this loop
                tail = pager.push_tail("sender", e.size, self.now, e.header, e.chunks, e.signature,
                                       self.limits.max_line)
                pager.accept_message_txn(self.txn, msg_id, "sender", e.header, e.signature, e.size, e.chunks,
                                         ["receiver"], self.now, self.limits, tail=tail if queued else None)
        self._timed("accept", run)

    def read_back(self, after):
        page = self._timed("read", pager.pending_pushes_txn, self.txn, "receiver", after, self.batch, 48 * 1024,
                           self.limits.max_line)
        return [_push_msg_id(line) for _, line in page], page[-1][0] if page else after

    def settle(self, ids):
        receipts, unknown, _ = self._timed("settle", pager.ack_many_txn, self.txn, "receiver", ids, None, self.now)
        if unknown or len(receipts) != len(ids):
            raise RuntimeError("settling %d messages left %d unknown" % (len(ids), len(unknown)))
        return [receipt.rid for _, receipt in receipts]

    def dismiss(self, rids):
        _, _, unknown = self._timed("dismiss", pager.ack_many_txn, self.txn, "sender", None, rids, self.now)
        if unknown:
            raise RuntimeError("%d receipts of %d were not stored" % (len(unknown), len(rids)))

    def check_empty(self):
        left = self.txn.execute("SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM deliveries)"
                                " + (SELECT COUNT(*) FROM chunks) + (SELECT COUNT(*) FROM receipts)").fetchone()[0]
        if left:
            raise RuntimeError("%d rows left after every message was settled and every receipt dismissed" % left)


def live(args, envelope, work):
    """The relay's steady state: each batch accepted, settled and its receipts dismissed before the next."""
    conn, txn = open_db(work, "live.db")
    steps = Steps(txn, envelope, args.batch)
    for start in range(0, args.count, args.batch):
        ids = _message_ids(min(args.batch, args.count - start))
        steps.accept(ids, queued=False)
        steps.dismiss(steps.settle(ids))
    steps.check_empty()
    conn.close()
    return steps.times


def queued(args, envelope, work):
    """A drain: every message accepted first, then read back a page at a time and settled, then dismissed."""
    conn, txn = open_db(work, "queued.db")
    steps = Steps(txn, envelope, args.batch)
    for start in range(0, args.count, args.batch):
        steps.accept(_message_ids(min(args.batch, args.count - start)), queued=True)
    after, done = 0, 0
    while True:
        ids, after = steps.read_back(after)
        if not ids:
            break
        steps.dismiss(steps.settle(ids))
        done += len(ids)
    if done != args.count:
        raise RuntimeError("drained %d of %d messages" % (done, args.count))
    steps.check_empty()
    conn.close()
    return steps.times


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("store", args.json)
    keys = bl.load_keys(2, cache=args.key_cache)
    envelope = pager.seal(keys[0], "sender", {"receiver": keys[1].public_key()}, os.urandom(256))
    work = bl.workdir("pager-store-")
    try:
        log("live: %d messages, each batch of %d accepted, settled and dismissed in turn" % (args.count, args.batch))
        relay = live(args, envelope, work)
        log("queued: %d messages accepted, then drained" % args.count)
        drain = queued(args, envelope, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.count
    labels = {"accept": "accept (row, chunk, delivery, counters)", "read": "read back (pending pages)",
              "settle": "settle (list-form ack, with its receipt)", "dismiss": "dismiss the receipt (list-form ack)"}
    per = {}
    for scenario, times, steps in (("live", relay, ("accept", "settle", "dismiss")),
                                   ("queued %s" % "{:,}".format(n), drain, ("accept", "read", "settle", "dismiss"))):
        per[scenario] = {}
        for step in steps:
            wall, cpu = times[step]
            per[scenario][step] = wall / n * 1e6
            report.row("store, %s: %s per message" % (scenario, labels[step]), wall / n * 1e6, "us")
            report.say("%-14s %-42s %7.1f us per message (CPU %.1f us)" % (scenario, labels[step], wall / n * 1e6,
                                                                          cpu / n * 1e6))
    # References only, not targets: the relay and drain benchmarks hold those, and count them.
    one = sum(per["live"].values())
    report.row("store ceiling: relayed durable messages per second (live)", 1e6 / one, "msg/s",
               reference=TARGET_RELAY, reference_label="the relay's target, 10 pairs (bench/relay.py)")
    q = per["queued %s" % "{:,}".format(n)]
    floor = (q["read"] + q["settle"]) * 100000 / 1e6
    report.row("store floor: draining 100,000 queued (read back, settle)", floor, "s", reference=TARGET_DRAIN_S,
               reference_label="the drain's target (bench/drain.py)")
    report.note("%d messages of 256 bytes to one recipient, all from one real envelope (header %d bytes, signature "
                "%d, one chunk of %d) under distinct message ids, in transactions of %d messages, each ending with "
                "its COMMIT (WAL, synchronous=FULL, as the server runs), in a temporary directory. Times are "
                "wall-clock, COMMIT and its fsync included." % (n, len(envelope.header), len(envelope.signature),
                                                                 len(envelope.chunks[0]), args.batch))
    report.note("live: the relay's steady state, each batch accepted, settled and its receipts dismissed before the "
                "next, so the database never holds more than one batch; a message pushed from memory to an online "
                "recipient is never read back. The ceiling is 1 / (accept + settle + dismiss): the server adds the "
                "network, JSON, the signature check and Deferreds on top, in the same process.")
    report.note("queued: a drain, every message accepted first and then read back a page at a time and settled; "
                "the floor is 100,000 x (read back + settle). Message ids are made as pager's sender makes them, "
                "sealed 1 ms apart (they begin with that time, so the message-id index grows and shrinks at one "
                "end); these costs still grow a little with the queue%s." % ("" if n >= 100000 else ": with fewer than 100,000 queued the floor is "
                                       "optimistic"))
    report.finish()
    return 0

if __name__ == "__main__":
    sys.exit(main())
