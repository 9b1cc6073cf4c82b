#!/usr/bin/env python3
"""
Drain benchmark: messages queued for an offline user, then the user logs in (a raw socket that acknowledges every
message as it arrives).  Measures the time until all are delivered and acknowledged, and the server's memory
(VmRSS sampled every 50 ms) during the drain, for two queue lengths: it must not grow with the queue.

The receiver acknowledges all the messages of one read with one cumulative ack up to the read's largest delivery
sequence number (--ack upto, the default; list-form acks when the server's pushes carry no "seq"), with list-form
acks (--ack batch), or one ack per message (--ack single).

Targets: 100,000 queued messages drained (login to the last ack answered) in under 2 s, and the server's memory
flat with the queue (its growth with 100,000 queued within 16 MiB of its growth with 10,000).

    python bench/drain.py [--quick] [--json] [--counts 10000,100000] [--insert db|socket]
                          [--ack upto|batch|single]
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

REF_MOSQUITTO_S = 0.25
TARGET_S = 2.0
TARGET_COUNT = 100000
RSS_FLAT_MIB = 16.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="time to drain a queue of messages to a user who logs in")
    p.add_argument("--quick", action="store_true", help="a smoke run well under a minute (1,000 and 5,000 queued)")
    p.add_argument("--full", action="store_true", help="the full run (the default: 10,000 and 100,000 queued)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--counts", help="queue lengths to compare, comma-separated")
    p.add_argument("--insert", choices=["db", "socket"], default="db",
                   help="queue the messages straight into the database before the server starts (db, default), "
                        "or send them through the server on a pipelined raw socket (socket)")
    p.add_argument("--ack", choices=["upto", "batch", "single"], default="upto",
                   help="acknowledge every message read in one go with one cumulative ack up to its largest "
                        "delivery sequence number (upto, default; list-form acks when the server sends no \"seq\"), "
                        "with list-form acks of at most 1,000 ids (batch), or each message with an ack of its own "
                        "(single)")
    p.add_argument("--receipts", choices=["wanted", "none"], default="wanted",
                   help="the queued messages' senders want delivery receipts, as an interactive client does "
                        "(wanted, default: each ack stores one), or not, as a script's send without --wait-delivered "
                        "(none)")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for one drain, in seconds")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    p.add_argument("--profile", metavar="FILE",
                   help="profile the server with py-spy during the longest drain (FILE.svg: flame graph; .txt: "
                        "collapsed stacks; .json: speedscope)")
    args = p.parse_args(argv)
    args.counts = [int(x) for x in (args.counts or ("1000,5000" if args.quick else "10000,100000")).split(",")]
    return args


def queue_by_socket(port, sender_key, envelopes, receipt=True):
    """Send every envelope from a raw send-only session, 1000 in flight; returns the seconds it took."""
    loop = bl.Loop()
    [conn], _ = bl.login_all(loop, port, [("sender", sender_key, False)])
    frames = [bl.send_frame(i, "receiver", bl.envelope_tail(env), receipt) for i, env in enumerate(envelopes)]
    state = {"next": 0, "ok": 0, "errors": []}

    def on_lines(c, lines):
        for line in lines:
            if line.startswith(bl.OK_PREFIX):
                state["ok"] += 1
                if state["next"] < len(frames):
                    c.queue(frames[state["next"]])
                    state["next"] += 1
            elif line.startswith(bl.ERROR_PREFIX):
                state["errors"].append(json.loads(line))

    conn.on_lines = on_lines
    t0 = time.perf_counter()
    for _ in range(min(1000, len(frames))):
        conn.queue(frames[state["next"]])
        state["next"] += 1
    if not loop.run_until(lambda: state["ok"] + len(state["errors"]) >= len(frames), 600):
        raise RuntimeError("queueing by socket timed out: %d of %d accepted" % (state["ok"], len(frames)))
    if state["errors"]:
        raise RuntimeError("sends refused: %s" % state["errors"][:3])
    elapsed = time.perf_counter() - t0
    loop.close()
    return elapsed


def drain_once(args, count, keys, envelopes, report):
    work = bl.workdir("pager-drain-")
    try:
        db = os.path.join(work, "bench.db")
        bl.seed_users_db(db, [("sender", keys[0]), ("receiver", keys[1])])
        insert_seconds = None
        if args.insert == "db":
            t = time.perf_counter()
            bl.store_messages_db(db, "sender", lambda header: ["receiver"], envelopes[:count],
                                 receipt=args.receipts == "wanted")
            insert_seconds = time.perf_counter() - t
            log("queued %d messages in the database in %.2f s" % (count, insert_seconds))
        spy = None
        server = bl.start_pager(work, db=db)
        try:
            if args.insert == "socket":
                insert_seconds = queue_by_socket(server.port, keys[0], envelopes[:count], args.receipts == "wanted")
                log("queued %d messages through the server in %.2f s" % (count, insert_seconds))
            loop = bl.Loop()
            time.sleep(0.5)  # let the server settle before the idle sample
            rss_idle = server.rss_kib()
            cpu = bl.CpuMeter(server.pid)
            st = {"delivered": 0, "acked": 0, "errors": [], "t_first": None, "t_delivered": None, "t_acked": None}
            perf = time.perf_counter
            MSG, ML, OKP = bl.MESSAGE_PREFIX, bl.MESSAGE_LEN, bl.OK_PREFIX
            acker = bl.Acker(args.ack)
            upto = args.ack == "upto"
            batches = {}  # request id -> (how many messages its ack covers, its form)

            def on_lines(conn, lines):
                now = perf()
                ids, last = [], None
                for line in lines:
                    if line.startswith(MSG):
                        st["delivered"] += 1
                        if st["t_first"] is None:
                            st["t_first"] = now
                        if st["delivered"] == count:
                            st["t_delivered"] = now
                        ids.append(line[ML:ML + 32])
                        last = line
                    elif line.startswith(OKP):
                        answer = json.loads(line)
                        n, form = batches.pop(answer["id"])
                        if answer.get("unknown_msgs") or form == "upto" and answer.get("settled") != n:
                            st["errors"].append(answer)
                        st["acked"] += n
                        if st["acked"] == count:
                            st["t_acked"] = now
                    elif line.startswith(bl.ERROR_PREFIX):
                        st["errors"].append(json.loads(line))
                if ids:
                    out = []
                    for rid, start, end, form, frame in acker.frames(ids, bl.message_seq(last) if upto else None):
                        batches[int(rid)] = (end - start, form)
                        out.append(frame)
                    conn.queue(b"".join(out))

            if args.profile and count == max(args.counts):
                spy = bl.start_profile(args.profile, server.pid)  # until the server stops
            [conn], _ = bl.login_all(loop, server.port, [("receiver", keys[1], True)])
            # sampled from the login's answer on: the login's own Argon2id buffer (19 MiB) is not the queue's
            rss = bl.RssSampler(server.pid, 0.05).start()
            t_login = conn.t_hello  # the login request goes out as the hello is read
            conn.on_lines = on_lines
            if conn.early:
                on_lines(conn, conn.early)
            ok = loop.run_until(lambda: st["acked"] >= count or st["errors"], args.timeout, interval=0.01)
            cpu_used = cpu.stop()
            rss.stop()
            loop.close()
        finally:
            server.stop()
            if spy is not None:
                bl.finish_profile(spy, report, args.profile, "the drain of %d messages (and its login)" % count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if st["errors"]:
        raise RuntimeError("errors during the drain: %s" % st["errors"][:3])
    if not ok:
        raise RuntimeError("drain of %d messages timed out after %.0f s: %d delivered, %d acked" % (
            count, args.timeout, st["delivered"], st["acked"]))
    r = {
        "count": count, "insert_seconds": insert_seconds,
        "login_seconds": conn.t_ok - t_login,
        "delivered_seconds": st["t_delivered"] - t_login, "acked_seconds": st["t_acked"] - t_login,
        "rss_idle_mib": rss_idle / 1024.0, "rss_start_mib": rss.first / 1024.0, "rss_peak_mib": rss.peak / 1024.0,
        "rss_growth_mib": (rss.peak - rss.first) / 1024.0, "cpu": cpu_used, "acks": dict(acker.used),
    }
    report.say("%7d queued: login %.3f s, all delivered %.2f s, all acked %.2f s (%s msg/s); server RSS %.1f MiB "
               "before the login, %.1f MiB when it was answered, peak %.1f MiB (+%.1f MiB)" % (
                   count, r["login_seconds"], r["delivered_seconds"], r["acked_seconds"],
                   bl.fmt(count / r["acked_seconds"], 0), r["rss_idle_mib"], r["rss_start_mib"], r["rss_peak_mib"],
                   r["rss_growth_mib"]))
    report.say("         ack frames: %s" % ", ".join("%d %s" % (n, form) for form, n in r["acks"].items() if n))
    report.say("         " + bl.cpu_text(cpu_used, count))
    return r


def ack_note(form, results):
    """How the receiver acknowledged, in words: the form asked for and the frames actually sent."""
    if form == "single":
        text = "with one ack frame per message (--ack single)."
    elif form == "batch":
        text = ("with list-form acks (\"msgs\", PROTOCOL.md 4.12; at most 1,000 ids a frame) for all the messages "
                "of each read from the socket (--ack batch).")
    else:
        text = ("with one cumulative ack, {\"type\":\"ack\",\"upto\":N} with the largest delivery sequence number "
                "(\"seq\") of the pushes of each read from the socket, or list-form acks (\"msgs\", at most 1,000 "
                "ids a frame) when the pushes carry no \"seq\" (an older server).")
    used = {}
    for r in results:
        for kind, n in r["acks"].items():
            used[kind] = used.get(kind, 0) + n
    return text + " Ack frames sent: %s." % ", ".join("{:,} {}".format(n, kind) for kind, n in used.items() if n)


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("drain", args.json)
    keys = bl.load_keys(2, cache=args.key_cache)
    [envelopes] = bl.seal_envelopes(keys, ["sender", "receiver"], [(0, 1, max(args.counts))])
    results = []
    for count in args.counts:
        log("drain: %d queued messages" % count)
        results.append(drain_once(args, count, keys, envelopes, report))
    for r in results:
        n = "{:,}".format(r["count"])
        big = r["count"] >= TARGET_COUNT
        report.row("drain %s queued: login to all acked" % n, r["acked_seconds"], "s",
                   reference=REF_MOSQUITTO_S if big else None,
                   reference_label="mosquitto, 100,000 queued" if big else None,
                   target="< %g s" % TARGET_S if big else None, passed=r["acked_seconds"] < TARGET_S if big else None)
        report.row("drain %s queued: login to all delivered" % n, r["delivered_seconds"], "s")
        report.row("drain %s queued: messages acked per second" % n, r["count"] / r["acked_seconds"], "msg/s")
        report.row("drain %s queued: login answered" % n, r["login_seconds"] * 1000, "ms")
        report.row("drain %s queued: server RSS peak minus start (login answered)" % n, r["rss_growth_mib"], "MiB")
        report.row("drain %s queued: server RSS peak minus idle (before the login)" % n,
                   r["rss_peak_mib"] - r["rss_idle_mib"], "MiB")
        report.row("drain %s queued: server CPU per message" % n, r["cpu"]["server"] / r["count"] * 1e6, "us")
        report.row("drain %s queued: generator CPU per message" % n, r["cpu"]["generator"] / r["count"] * 1e6, "us")
        bl.others_row(report, "drain %s queued: other processes' CPU meanwhile" % n, r["cpu"])
        if r["insert_seconds"]:
            report.row("queue %s messages (%s)" % (n, args.insert), r["count"] / r["insert_seconds"], "msg/s")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        diff = large["rss_growth_mib"] - small["rss_growth_mib"]
        report.row("server RSS growth, {:,} vs {:,} queued".format(large["count"], small["count"]),
                   diff, "MiB", target="< %g MiB (flat with the queue)" % RSS_FLAT_MIB, passed=diff < RSS_FLAT_MIB)
    report.note(bl.RAISED_LIMITS_NOTE)
    if args.insert == "db":
        report.note("The queue was written straight into the server's SQLite database before the server started, "
                    "with pager's own create_schema_txn, add_user_txn and accept_message_txn (in transactions of "
                    "5,000), from real envelopes sealed in advance (256-byte plaintext, one recipient); 'queue ... "
                    "(db)' is that insert rate, not the server's.")
    else:
        report.note("The queue was sent through the server by a raw send-only session with 1,000 sends in flight; "
                    "'queue ... (socket)' is the server's accept rate into an offline user's queue.")
    report.note("The queued messages' senders %s." % (
        "want delivery receipts (--receipts wanted): each ack stores one for the sender" if args.receipts == "wanted"
        else "want no receipts (--receipts none), as a script's send without --wait-delivered"))
    report.note("Drain time runs from the login request (written as the hello is read) to the answer to the last "
                "ack, so it includes the login's Argon2id hash. The receiver acks each message as soon as its "
                "frame is read, without decrypting it, " + ack_note(args.ack, results))
    report.note("RSS: the server's VmRSS sampled every 50 ms from the login's answer to the end of the drain "
                "('start'); 'idle' is sampled just before the login, so 'peak minus idle' also counts the login's own "
                "Argon2id buffer (19 MiB), which the hashing thread's malloc arena may keep. Each queue length runs "
                "on a fresh server and database.")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
