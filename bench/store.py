#!/usr/bin/env python3
"""
Store benchmark: what pager's SQLite store alone costs per message, with no network, no JSON, no Deferreds and no
signature check.  Pager's own transaction functions run in a plain loop on one connection set up as the server sets
up its own (WAL, synchronous=FULL), in transactions of --batch messages, each ending with its COMMIT:

- accept: accept_message_txn for a 256-byte message to one recipient (the row, its chunk, the delivery, the
  recipient's counters);
- read back: pending_txn, a page at a time, as a login's drain reads the queue;
- settle: ack_many_txn, the list-form ack: the delivery and the message deleted, a receipt stored for the sender.

The sum is the least server CPU a durable message can cost with this store, so its inverse is a ceiling on durable
messages per second that no change above the store can lift; it is shown next to the relay's and the drain's targets.

    python bench/store.py [--quick] [--json] [--count 100000] [--batch 1000]
"""

import argparse
import os
import secrets
import shutil
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

import pager  # noqa: E402

TARGET_RELAY = 25000.0  # durable messages per second (bench/relay.py)
TARGET_DRAIN_S = 2.0  # seconds for 100,000 queued messages (bench/drain.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="the cost of pager's SQLite store per message, alone")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (10,000 messages)")
    p.add_argument("--full", action="store_true", help="the full run (the default: 100,000 messages)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--count", type=int, help="messages to accept, read back and settle")
    p.add_argument("--batch", type=int, default=1000, help="messages per transaction (default 1000)")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    args.count = args.count or (10000 if args.quick else 100000)
    return args


def measure(args, envelope, work):
    db = os.path.join(work, "store.db")
    conn = sqlite3.connect(db, isolation_level=None)
    pager.prepare_connection(conn)
    txn = conn.cursor()
    pager.create_schema_txn(txn)
    txn.execute("BEGIN")
    for name in ("sender", "receiver"):
        pager.add_user_txn(txn, name, "PEM", b"f" * 32, b"s" * 16, b"h" * 32, time.time())
    txn.execute("COMMIT")
    limits = pager.Limits(max_pending_messages=10 ** 9, max_pending_bytes=10 ** 15)
    ids = [secrets.token_bytes(pager.MESSAGE_ID_SIZE) for _ in range(args.count)]
    now = time.time()

    def timed(step):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - t0, time.process_time() - c0

    def accept():
        for start in range(0, len(ids), args.batch):
            txn.execute("BEGIN")
            for msg_id in ids[start:start + args.batch]:
                pager.accept_message_txn(txn, msg_id, "sender", envelope.header, envelope.signature, envelope.size,
                                         envelope.chunks, ["receiver"], now, limits)
            txn.execute("COMMIT")

    pages = []

    def read_back():
        after = 0
        while True:
            txn.execute("BEGIN")
            page = pager.pending_txn(txn, "receiver", after, args.batch, 48 * 1024)
            txn.execute("COMMIT")
            if not page:
                return
            pages.append([m.msg_id for m in page])
            after = page[-1].ord

    def settle():
        for page in pages:
            txn.execute("BEGIN")
            receipts, unknown, _ = pager.ack_many_txn(txn, "receiver", page, None, now)
            txn.execute("COMMIT")
            if unknown or len(receipts) != len(page):
                raise RuntimeError("settling a page left %d of %d unknown" % (len(unknown), len(page)))

    log("accepting %d messages in transactions of %d" % (args.count, args.batch))
    accepted = timed(accept)
    log("reading them back")
    read = timed(read_back)
    if sum(len(p) for p in pages) != args.count:
        raise RuntimeError("read back %d of %d messages" % (sum(len(p) for p in pages), args.count))
    log("settling them")
    settled = timed(settle)
    left = txn.execute("SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM deliveries)"
                       " + (SELECT COUNT(*) FROM chunks)").fetchone()[0]
    conn.close()
    if left:
        raise RuntimeError("%d rows left after settling every message" % left)
    return {"accept": accepted, "read": read, "settle": settled}


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("store", args.json)
    keys = bl.load_keys(2, cache=args.key_cache)
    envelope = pager.seal(keys[0], "sender", {"receiver": keys[1].public_key()}, os.urandom(256))
    work = bl.workdir("pager-store-")
    try:
        r = measure(args, envelope, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.count
    per = {step: wall / n * 1e6 for step, (wall, _) in r.items()}
    for step, label in (("accept", "accept (row, chunk, delivery, counters)"),
                        ("read", "read back (pending pages)"),
                        ("settle", "settle (list-form ack, with its receipt)")):
        wall, cpu = r[step]
        report.row("store: %s per message" % label, per[step], "us")
        report.say("%-48s %7.1f us per message (CPU %.1f us)" % (label, per[step], cpu / n * 1e6))
    total = per["accept"] + per["read"] + per["settle"]
    report.row("store: one durable message, all three", total, "us")
    report.row("store ceiling: durable messages per second", 1e6 / total, "msg/s", reference=TARGET_RELAY,
               reference_label="the relay's target (bench/relay.py)", target=">= %d msg/s" % TARGET_RELAY,
               passed=1e6 / total >= TARGET_RELAY)
    drain = (per["read"] + per["settle"]) * 100000 / 1e6
    report.row("store floor: draining 100,000 queued", drain, "s", reference=TARGET_DRAIN_S,
               reference_label="the drain's target (bench/drain.py)", target="< %g s" % TARGET_DRAIN_S,
               passed=drain < TARGET_DRAIN_S)
    report.note("%d messages of 256 bytes to one recipient, all from one real envelope (header %d bytes, "
                "signature %d, one chunk of %d) under %d distinct message ids; transactions of %d messages, each "
                "ending with its COMMIT (WAL, synchronous=FULL, as the server runs), in a temporary directory."
                % (n, len(envelope.header), len(envelope.signature), len(envelope.chunks[0]), n, args.batch))
    report.note("The ceiling is 1 / (accept + read back + settle): what the store alone allows with nothing else "
                "running; the server adds the network, JSON, the signature check and Deferreds on top, in the same "
                "process. The drain floor is 100,000 x (read back + settle).")
    if n < 100000:
        report.note("With %d messages, not 100,000, both figures are optimistic: the message-id index is random, so "
                    "the cost per message grows with the queue." % n)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
