#!/usr/bin/env python3
"""
Relay benchmark: 256-byte messages from N senders to N receivers through a pager server in its own process, and the
same load through a bare Twisted JSON-lines relay (bench/ceiling_relay.py) as the ceiling.

A message counts once it is accepted (the sender's ok), delivered (pushed to the receiver) and acknowledged (the
receiver's ack answered ok).  Latency runs from the write of the send frame to the read of the message push, on the
generator's one clock.  Fixed offered rates (open loop, paced every half millisecond), then as fast as possible
(closed loop: a bounded window of unacknowledged messages per sender).  Send frames carry "receipt":false (the
senders want no receipts).  Receivers acknowledge all the messages of one read with one cumulative ack up to the
read's largest delivery sequence number (--ack upto, the default; list-form acks when the server's pushes carry no
"seq"), with list-form acks (--ack batch), or one ack per message (--ack single).

Targets, for 10 pairs: at least 10,000 msg/s as fast as possible, with at most 100 us of server CPU per message and
at most 5 times the bare relay's CPU per message in the same invocation; p99 latency at most 5 ms at a fixed
2,000 msg/s (p50 and p99 at 5,000 msg/s are reported too).  For 1,000 pairs: at least 6,000 msg/s.

    python bench/relay.py [--quick] [--json] [--pairs 10,1000] [--rates 1000,2000,5000,10000]
                          [--ack upto|batch|single] [--only pager|ceiling] [--profile out.svg]
"""

import argparse
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

TARGET_THROUGHPUT = {10: 10000.0, 1000: 6000.0}  # pairs -> msg/s as fast as possible
TARGET_CPU_PAIRS = 10  # the as-fast-as-possible run whose server CPU per message has a target
TARGET_CPU_US = 100.0  # server CPU per message, at most
TARGET_CPU_RATIO = 5.0  # ... and at most this many times the bare relay's in the same invocation
TARGET_P99_MS = 5.0
TARGET_P99_RATE, TARGET_P99_PAIRS = 2000.0, 10  # the fixed rate and pairs at which p99 latency has a target
DEFAULT_RATES = "1000,2000,5000,10000"
QUICK_RATES = "2000,5000"
REF_TWISTED_LINES = 650000.0
REF_PROSODY = 25000.0
REF_MOSQUITTO = 72000.0
REF_MOSQUITTO_P99_MS = 2.0
LINES_PER_MESSAGE = 5  # at the relay: send and ack read; forwarded message, send ok and ack ok written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pager relay throughput and latency, against a bare Twisted relay")
    p.add_argument("--quick", action="store_true", help="a smoke run well under a minute")
    p.add_argument("--full", action="store_true", help="the full run (the default)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--pairs", help="sender->receiver pair counts, comma-separated (default 10,1000; quick 10,100)")
    p.add_argument("--rates", help="fixed offered rates in messages/s (default %s; quick %s)" % (
        DEFAULT_RATES, QUICK_RATES))
    p.add_argument("--seconds", type=float, help="seconds per fixed-rate run (default 5; quick 1)")
    p.add_argument("--max-seconds", type=float, help="seconds of the as-fast-as-possible run (default 8; quick 2)")
    p.add_argument("--max-messages", type=int,
                   help="envelopes for each as-fast-as-possible pager run (default 80000; quick 3000)")
    p.add_argument("--window", type=int,
                   help="unacknowledged messages per sender in the as-fast-as-possible run (default 2048/pairs, "
                        "2 to 256)")
    p.add_argument("--ack", choices=["upto", "batch", "single"], default="upto",
                   help="receivers acknowledge all the messages of one read with one cumulative ack up to its "
                        "largest delivery sequence number (upto, default; list-form acks when the server sends no "
                        "\"seq\"), with list-form acks of at most 1,000 ids (batch), or each message with an ack "
                        "of its own (single)")
    p.add_argument("--only", choices=["pager", "ceiling"], help="run one side only")
    p.add_argument("--profile", metavar="FILE",
                   help="after the measured runs, profile the pager server with py-spy during one more "
                        "as-fast-as-possible run (FILE.svg: flame graph; .txt: collapsed stacks; .json: speedscope)")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    q = args.quick
    args.pairs = [int(x) for x in (args.pairs or ("10,100" if q else "10,1000")).split(",")]
    args.rates = [float(x) for x in (args.rates or (QUICK_RATES if q else DEFAULT_RATES)).split(",")]
    args.seconds = args.seconds or (1.0 if q else 5.0)
    args.max_seconds = args.max_seconds or (2.0 if q else 8.0)
    args.max_messages = args.max_messages or (3000 if q else 80000)
    return args


class Scenario:
    def __init__(self, pairs, mode, rate, seconds, budget):
        self.pairs, self.mode, self.rate, self.seconds, self.budget = pairs, mode, rate, seconds, budget
        self.frames = None  # per pair: list of (message id hex, frame bytes)
        self.ids = None  # request id -> (pair, message id hex)

    @property
    def label(self):
        if self.mode == "rate":
            return "%d pairs @ %s/s" % (self.pairs, "{:,.0f}".format(self.rate))
        return "%d pairs, max" % self.pairs

    def per_pair(self):
        return int(math.ceil(self.budget / self.pairs))


def build_scenarios(args, profile=False):
    out = []
    for pairs in args.pairs:
        for rate in args.rates:
            out.append(Scenario(pairs, "rate", rate, args.seconds, int(rate * args.seconds * 1.02) + pairs))
        out.append(Scenario(pairs, "max", None, args.max_seconds, max(args.max_messages, 4 * pairs)))
    if profile:
        pairs = max(args.pairs)
        out.append(Scenario(pairs, "max", None, args.max_seconds, max(args.max_messages, 4 * pairs)))
    return out


def window_for(args, pairs):
    if args.window:
        return args.window
    return max(2, min(256, 2048 // pairs))


# -- one scenario on connected, logged-in connections --

def run_scenario(loop, sc, senders, receivers, server_pid, window, ack="batch", drain_timeout=60.0):
    P = sc.pairs
    frames = sc.frames
    perf = time.perf_counter
    sent_at = {}
    lat = []
    pos = [0] * P
    inflight = [0] * P
    errors = collections.Counter()
    MSG, ML, OKP, ERR = bl.MESSAGE_PREFIX, bl.MESSAGE_LEN, bl.OK_PREFIX, bl.ERROR_PREFIX
    ok_id = bl.ok_id
    mode_max = sc.mode == "max"
    warm = min(1.0, sc.seconds * 0.2)
    v = dict(issued=0, accepted=0, delivered=0, completed=0, failed=0, sending=True, rr=0,
             warm_count=None, t_warm=None, end_count=None, t_end=None, aborted=None)

    total = sum(len(fr) for fr in frames)
    upto = ack == "upto"
    ackers = []
    UNKNOWN_NONE = b'"unknown_msgs":[]'
    NO_ACK = (0, None, 0)

    def send_next(p, now):
        i = pos[p]
        fr = frames[p]
        if i >= len(fr):
            if v["issued"] >= total:
                stop_sending(now)  # every pre-built frame is out: the measured window ends here
            return False
        msg, frame = fr[i]
        pos[p] = i + 1
        sent_at[msg] = now
        senders[p].queue(frame)
        inflight[p] += 1
        v["issued"] += 1
        return True

    def make_receiver(p):
        acks = {}  # request id -> (messages of this run it acknowledges, its form, messages it acknowledges)
        acker = bl.Acker(ack)
        ackers.append(acker)

        def on_lines(conn, lines):
            now = perf()
            ids, tracked, last = [], [], None
            for line in lines:
                if line.startswith(MSG):
                    msg = line[ML:ML + 32]
                    t = sent_at.pop(msg, None)
                    if t is not None:
                        lat.append((t, now - t))
                    v["delivered"] += 1
                    ids.append(msg)
                    tracked.append(t is not None)
                    last = line
                elif line.startswith(OKP):
                    n, form, count = acks.pop(ok_id(line), NO_ACK)
                    if form == "batch" and UNKNOWN_NONE not in line:
                        errors["ack: unknown ids"] += 1
                    elif form == "upto" and bl.settled(line) != count:
                        errors["ack upto: settled a count other than the read's"] += 1
                    if n:
                        v["completed"] += n
                        inflight[p] -= n
                        if mode_max and v["sending"]:
                            for _ in range(n):
                                if not send_next(p, now):
                                    break
                elif line.startswith(ERR):
                    frame = json.loads(line)
                    errors["ack " + str(frame.get("code"))] += 1
                    n, _, _ = acks.pop(str(frame.get("id")).encode(), NO_ACK)
                    v["failed"] += n
                    inflight[p] -= n
            if ids:  # everything this read brought, acknowledged at once
                out = []
                top = bl.message_seq(last) if upto else None
                for rid, start, end, form, frame in acker.frames(ids, top):
                    acks[rid] = (sum(tracked[start:end]), form, end - start)
                    out.append(frame)
                conn.queue(b"".join(out))
        return on_lines

    def make_sender(p):
        def on_lines(conn, lines):
            for line in lines:
                if line.startswith(OKP):
                    v["accepted"] += 1
                elif line.startswith(ERR):
                    frame = json.loads(line)
                    errors["send " + str(frame.get("code"))] += 1
                    found = sc.ids.get(frame.get("id"))
                    if found is not None and sent_at.pop(found[1], None) is not None:
                        v["failed"] += 1
                        inflight[p] -= 1
                        if mode_max and v["sending"]:
                            send_next(p, perf())
                # receipts are not needed here: send frames ask for none ("receipt":false), and a server
                # without that flag pushes a send-only session those of its own messages, which it leaves stored
        return on_lines

    for p in range(P):
        senders[p].on_lines = make_sender(p)
        receivers[p].on_lines = make_receiver(p)

    backlog_limit = max(1000, int((sc.rate or 0) * 0.5))
    cpu = bl.CpuMeter(server_pid)
    t0 = perf()
    t_stop = t0 + sc.seconds

    def stop_sending(now):
        v["sending"] = False
        if v["t_end"] is None:
            v["t_end"], v["end_count"] = now, v["completed"]

    def tick(now):
        if v["t_warm"] is None and now >= t0 + warm:
            v["t_warm"], v["warm_count"] = now, v["completed"]
        if not v["sending"]:
            return
        if now >= t_stop:
            return stop_sending(now)
        if mode_max:
            return
        due = int((now - t0) * sc.rate) - v["issued"]
        while due > 0:
            p = v["rr"] % P
            v["rr"] += 1
            if not send_next(p, now):
                return stop_sending(now)
            due -= 1
        if v["issued"] - v["completed"] - v["failed"] > backlog_limit:
            v["aborted"] = now - t0
            stop_sending(now)

    if mode_max:
        for p in range(P):
            for _ in range(window):
                if not send_next(p, t0):
                    break
    interval = 0.0005 if mode_max else min(0.001, max(0.0002, 1.0 / sc.rate))
    loop.run_until(lambda: not v["sending"], sc.seconds + 5, tick=tick, interval=interval)
    stop_sending(perf())
    drained = loop.run_until(lambda: v["completed"] + v["failed"] >= v["issued"], drain_timeout, interval=0.005)
    t_done = perf()
    cpu_used = cpu.stop()
    if v["t_warm"] is None:
        v["t_warm"], v["warm_count"] = t0, 0
    measure_from = t0 + warm
    # A run whose sending phase after the warm-up is under half of it (or under 0.5 s) is measured whole, drain
    # included: over a few dozen milliseconds the rate is that of one group commit, not of the server.
    short = v["t_end"] - max(v["t_warm"], measure_from) < max(0.5, 0.5 * (v["t_end"] - t0))
    if short:
        v["t_warm"], v["warm_count"] = t0, 0
        measure_from = t0
    latencies = [d for t, d in lat if t >= measure_from]
    window_count = v["end_count"] - v["warm_count"]
    span = v["t_end"] - v["t_warm"]
    # An offered rate not sustained is reported as the rate actually served, drain included; so is a run measured
    # whole, and one in which no ack was answered inside the sending window (a short as-fast-as-possible run whose
    # first group commit ends after the window): its window holds no rate at all.
    whole = v["aborted"] is not None or short or window_count <= 0 or span < 1e-3
    result = {
        "label": sc.label, "pairs": P, "mode": sc.mode, "rate": sc.rate, "window": window if mode_max else None,
        "issued": v["issued"], "accepted": v["accepted"], "delivered": v["delivered"], "completed": v["completed"],
        "failed": v["failed"], "errors": dict(errors), "drained": drained,
        "throughput": window_count / span if not whole else v["completed"] / max(1e-9, t_done - t0),
        "whole": whole and v["aborted"] is None, "acks": {k: sum(a.used[k] for a in ackers) for k in ackers[0].used},
        "overall": v["completed"] / max(1e-9, t_done - t0),
        "send_seconds": v["t_end"] - t0, "total_seconds": t_done - t0,
        "aborted": v["aborted"], "latency": bl.summary_ms(latencies), "cpu": cpu_used,
        "exhausted": not mode_max and v["aborted"] is None and v["t_end"] < t_stop - 0.01,
    }
    return result


def describe(target, r):
    lat = r["latency"]
    text = "%-8s %-26s %9s msg/s  (%d sent, %d acked%s)  latency p50 %s ms, p99 %s ms, max %s ms" % (
        target, r["label"], bl.fmt(r["throughput"], 0), r["issued"], r["completed"],
        ", %d failed" % r["failed"] if r["failed"] else "", bl.fmt(lat["p50"], 2), bl.fmt(lat["p99"], 2),
        bl.fmt(lat["max"], 1))
    if r["aborted"] is not None:
        text += "\n         offered rate NOT sustained: backlog over the limit after %.2f s" % r["aborted"]
    elif r["whole"]:
        text += "\n         msg/s over the whole run, drain included"
    text += "\n         ack frames: %s" % ", ".join("%d %s" % (n, form) for form, n in r["acks"].items() if n)
    if not r["drained"]:
        text += "\n         %d messages still unacknowledged at the end of the drain" % (
            r["issued"] - r["completed"] - r["failed"])
    if r["errors"]:
        text += "\n         errors: %s" % r["errors"]
    text += "\n         " + bl.cpu_text(r["cpu"], r["completed"])
    return text


# -- the two servers --

def build_frames(scenarios, tails, names_r, ceiling=False):
    """Per scenario and pair, the pre-encoded frames, each message used once (pager) or relabelled (ceiling)."""
    gid = 0
    cursor = collections.Counter()
    for sc in scenarios:
        sc.frames, sc.ids = [], {}
        n = sc.per_pair()
        for p in range(sc.pairs):
            pool = tails[p]
            rname = names_r[p]
            out = []
            for _ in range(n):
                gid += 1
                if ceiling:
                    msg, tail = b"%032x" % gid, pool[cursor[p] % len(pool)][1]
                    frame = b'{"type":"message","msg":"%s","to":"%s","id":%d,' % (msg, rname.encode(), gid) + tail
                else:
                    msg, tail = pool[cursor[p]]
                    frame = bl.send_frame(gid, rname, tail)
                    sc.ids[gid] = (p, msg)
                cursor[p] += 1
                out.append((msg, frame))
            sc.frames.append(out)


def run_pager(args, report, scenarios, keys, names_s, names_r, tails, work, prekeys=None):
    P = max(args.pairs)
    build_frames(scenarios, tails, names_r)
    server = bl.start_pager(work, nofile=4 * P + 1000)
    log("pager server pid %d on port %d" % (server.pid, server.port))
    results, profile = [], None
    try:
        rt = bl.ReactorThread()
        t = time.perf_counter()
        users = [(names_s[i], keys[i]) for i in range(P)] + [(names_r[i], keys[P + i]) for i in range(P)]
        retries = rt.run(bl.register_with_clients, server.port, users, 48, bl.TOKEN, prekeys)
        rt.stop()
        log("registered %d users with pager.PagerClient in %.1f s (%d retries on rate_limited)"
            % (len(users), time.perf_counter() - t, retries))
        loop = bl.Loop()
        accounts = [(names_s[i], keys[i], False) for i in range(P)] + [(names_r[i], keys[P + i], True)
                                                                        for i in range(P)]
        t = time.perf_counter()
        conns, stats = bl.login_all(loop, server.port, accounts, window=200)
        log("logged in %d raw connections in %.1f s (%d retries)" % (len(conns), time.perf_counter() - t,
                                                                    stats["retries"]))
        senders, receivers = conns[:P], conns[P:]
        measured = scenarios[:-1] if args.profile else scenarios
        for sc in measured:
            bl.ping_all(loop, conns)
            log("pager: %s" % sc.label)
            r = run_scenario(loop, sc, senders, receivers, server.pid, window_for(args, sc.pairs), args.ack)
            report.say(describe("pager", r))
            results.append(r)
            loop.run_until(lambda: False, 0.3)
        if args.profile:
            sc = scenarios[-1]
            bl.ping_all(loop, conns)
            profile = bl.start_profile(args.profile, server.pid, sc.seconds + 2)
            log("pager: %s, profiled with py-spy into %s" % (sc.label, args.profile))
            r = run_scenario(loop, sc, senders, receivers, server.pid, window_for(args, sc.pairs), args.ack)
            report.say(describe("profiled", r))
            bl.finish_profile(profile, report, args.profile, "an extra as-fast-as-possible run")
        loop.close()
    finally:
        code = server.stop()
        if code not in (0, None):
            report.note("The pager server exited with status %s; log tail: %s" % (code, server.log_tail(5)))
    return results


def run_ceiling(args, report, scenarios, names_r, tails, work):
    P = max(args.pairs)
    build_frames(scenarios, tails, names_r, ceiling=True)
    port = bl.free_port()
    relay = bl.ServerProcess([sys.executable, os.path.join(bl.HERE, "ceiling_relay.py"), "--port", str(port)], port,
                             work, "ceiling-relay", nofile=4 * P + 1000, expect_hello=False).start()
    log("ceiling relay pid %d on port %d" % (relay.pid, port))
    results = []
    try:
        loop = bl.Loop()
        waiting = set()

        def on_lines(conn, lines):
            waiting.discard(conn)

        senders = [loop.connect(port, on_lines) for _ in range(P)]
        receivers = []
        for i in range(P):
            conn = loop.connect(port, on_lines)
            conn.queue(b'{"type":"login","id":"login","user":"%s"}\n' % names_r[i].encode())
            waiting.add(conn)
            receivers.append(conn)
        if not loop.run_until(lambda: not waiting, 60):
            raise RuntimeError("the ceiling relay did not answer every login")
        for sc in scenarios:
            if sc.frames is None:
                continue
            log("ceiling: %s" % sc.label)
            r = run_scenario(loop, sc, senders, receivers, relay.pid, window_for(args, sc.pairs), args.ack)
            report.say(describe("ceiling", r))
            results.append(r)
            loop.run_until(lambda: False, 0.3)
        loop.close()
    finally:
        relay.stop()
    return results


# -- the report --

def add_rows(report, pager_results, ceiling_results, single_acks, ceiling_run=True):
    for target, results in (("pager", pager_results), ("ceiling", ceiling_results)):
        for r in results:
            if r["aborted"] is not None:
                report.note("%s %s: offered rate NOT sustained; it stopped offering after %.2f s with more than "
                            "max(1000, rate x 0.5 s) messages unacknowledged, and its msg/s is what it served over "
                            "the whole run, drain included." % (target, r["label"], r["aborted"]))
            elif r["whole"]:
                report.note("%s %s: msg/s is over the whole run, drain included: its sending phase after the "
                            "warm-up was too short, or no ack was answered inside it." % (target, r["label"]))
            if not r["drained"]:
                report.note("%s %s: %d messages were still unacknowledged at the end of the 60 s drain." % (
                    target, r["label"], r["issued"] - r["completed"] - r["failed"]))
            if r["errors"]:
                report.note("%s %s: errors: %s." % (target, r["label"], ", ".join(
                    "%s x%d" % (k, n) for k, n in sorted(r["errors"].items()))))
    ceiling = {(r["pairs"], r["mode"], r["rate"]): r for r in ceiling_results}
    for r in pager_results:
        key = (r["pairs"], r["mode"], r["rate"])
        c = ceiling.get(key)
        lat = r["latency"]
        name = "pager " + r["label"]
        if r["mode"] == "rate":
            report.row(name + ": acked msg/s%s" % (" (NOT sustained)" if r["aborted"] is not None else ""),
                       r["throughput"], "msg/s")
            report.row(name + ": latency p50", lat["p50"], "ms")
            if r["pairs"] == TARGET_P99_PAIRS and r["rate"] == TARGET_P99_RATE:
                report.row(name + ": latency p99", lat["p99"], "ms", target="<= %g ms" % TARGET_P99_MS,
                           passed=lat["p99"] is not None and lat["p99"] <= TARGET_P99_MS and r["aborted"] is None)
            elif r["rate"] >= 10000:
                report.row(name + ": latency p99", lat["p99"], "ms", reference=REF_MOSQUITTO_P99_MS,
                           reference_label="mosquitto QoS 1 p99 at 10,000/s")
            else:
                report.row(name + ": latency p99", lat["p99"], "ms")
            if c is not None and c["latency"]["p99"]:
                report.row(name + ": latency p99 vs ceiling", lat["p99"], "ms", reference=c["latency"]["p99"],
                           reference_label="bare Twisted relay p99, measured")
        else:
            goal = TARGET_THROUGHPUT.get(r["pairs"])
            report.row(name + ": durable acked msg/s", r["throughput"], "msg/s",
                       reference=c["throughput"] if c else None,
                       reference_label="bare Twisted JSON-lines relay, measured" if c else None,
                       target=">= {:,.0f} msg/s".format(goal) if goal else None,
                       passed=r["throughput"] >= goal if goal else None)
            report.row(name + ": msg/s vs XMPP", r["throughput"], "msg/s", reference=REF_PROSODY,
                       reference_label="XMPP server (Prosody), published")
            report.row(name + ": msg/s vs MQTT", r["throughput"], "msg/s", reference=REF_MOSQUITTO,
                       reference_label="mosquitto QoS 1, published")
            report.row(name + ": latency p50", lat["p50"], "ms")
            report.row(name + ": latency p99", lat["p99"], "ms")
            bl.others_row(report, name + ": other processes' CPU meanwhile", r["cpu"])
        n = max(1, r["completed"])
        cpu_us = r["cpu"]["server"] / n * 1e6
        if r["mode"] == "max" and r["pairs"] == TARGET_CPU_PAIRS:
            cpu_row(report, name + ": server CPU per message", cpu_us, c, ceiling_run)
        else:
            report.row(name + ": server CPU per message", cpu_us, "us")
        report.row(name + ": generator CPU per message", r["cpu"]["generator"] / n * 1e6, "us",
                   reference=cpu_us, reference_label="server CPU per message")
    for r in ceiling_results:
        lat = r["latency"]
        name = "ceiling %s" % r["label"]
        if r["mode"] == "max":
            report.row(name + ": msg/s", r["throughput"], "msg/s")
            if single_acks:  # with list-form acks a message costs fewer lines, a varying number
                report.row(name + ": lines/s at the relay", r["throughput"] * LINES_PER_MESSAGE, "lines/s",
                           reference=REF_TWISTED_LINES,
                           reference_label="bare Twisted relay, typical (context only)")
        else:
            report.row(name + ": acked msg/s", r["throughput"], "msg/s")
        report.row(name + ": latency p50", lat["p50"], "ms")
        report.row(name + ": latency p99", lat["p99"], "ms")
        n = max(1, r["completed"])
        report.row(name + ": relay CPU per message", r["cpu"]["server"] / n * 1e6, "us")
        report.row(name + ": generator CPU per message", r["cpu"]["generator"] / n * 1e6, "us")


def ack_note(form, pager_results, ceiling_results):
    """What the receivers sent to acknowledge, in words: the form asked for and the frames actually sent."""
    if form == "single":
        text = "Receivers ack every message with an ack frame of its own (--ack single)."
    elif form == "batch":
        text = ("Receivers ack all the messages of one read from the socket with list-form acks (\"msgs\", "
                "PROTOCOL.md 4.12; at most 1,000 ids a frame), --ack batch.")
    else:
        text = ("Receivers ack all the messages of one read from the socket with one cumulative ack, "
                "{\"type\":\"ack\",\"upto\":N} with the read's largest delivery sequence number (\"seq\" of the "
                "message pushes), or with list-form acks (\"msgs\", at most 1,000 ids a frame) when the pushes carry "
                "no \"seq\" (an older server, and the ceiling relay, which forwards the senders' lines).")
    for side, results in (("pager", pager_results), ("ceiling", ceiling_results)):
        used = {}
        for r in results:
            for kind, n in r["acks"].items():
                used[kind] = used.get(kind, 0) + n
        if any(used.values()):
            text += " %s ack frames sent: %s." % (side.capitalize(), ", ".join(
                "{:,} {}".format(n, kind) for kind, n in used.items() if n))
    return text


def cpu_row(report, figure, cpu_us, ceiling, ceiling_run):
    """
    The server CPU per message of the as-fast-as-possible run with a target: at most TARGET_CPU_US, and at most
    TARGET_CPU_RATIO times the bare relay's CPU per message in the same invocation.  Without the bare relay's
    figure the ratio part cannot be judged: the row then fails when the absolute part fails, else has no verdict.
    """
    absolute = cpu_us <= TARGET_CPU_US
    target = "<= %g us and <= %gx ceiling" % (TARGET_CPU_US, TARGET_CPU_RATIO)
    if ceiling is not None and ceiling["completed"]:
        reference = ceiling["cpu"]["server"] / ceiling["completed"] * 1e6
        ratio = cpu_us / reference if reference else None
        passed = absolute and ratio is not None and ratio <= TARGET_CPU_RATIO
        report.row(figure, cpu_us, "us", reference=reference, reference_label="bare Twisted relay CPU per message, "
                   "same invocation", target=target, passed=passed)
        return
    why = "the ceiling was not run (--only pager)" if not ceiling_run else "the ceiling's run measured nothing"
    report.row(figure, cpu_us, "us", target=target + " (ceiling part not judged)", passed=False if not absolute
               else None)
    report.note("%s: %s, so the %gx-ceiling part of its target is not judged; the row fails only when the %g us "
                "part does, and otherwise has no verdict." % (figure, why, TARGET_CPU_RATIO, TARGET_CPU_US))


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("relay", args.json)
    bl.raise_nofile()
    P = max(args.pairs)
    names_s = ["s%05d" % i for i in range(P)]
    names_r = ["r%05d" % i for i in range(P)]
    keys = bl.load_keys(2 * P, cache=args.key_cache)
    scenarios = build_scenarios(args, profile=bool(args.profile))
    need = collections.Counter()
    for sc in scenarios:
        for p in range(sc.pairs):
            need[p] += sc.per_pair()
    work = bl.workdir("pager-relay-")
    pager_results, ceiling_results = [], []
    try:
        prekeys = bl.signed_prekeys(keys[P:2 * P], names_r)  # receivers' prekeys: sealed to as 0.3 clients do
        if args.only != "ceiling":
            tails = bl.seal_tails(keys, names_s + names_r, [(p, P + p, need[p]) for p in range(P)], prekeys=prekeys)
        else:  # the ceiling only needs frames of the right size: a few real envelopes, relabelled
            tails = bl.seal_tails(keys, names_s + names_r, [(p, P + p, 2) for p in range(P)])
        if args.only != "ceiling":
            pager_results = run_pager(args, report, scenarios, keys, names_s, names_r, tails, work, prekeys)
        if args.only != "pager":
            ceiling_scenarios = build_scenarios(args)
            for sc in ceiling_scenarios:
                if sc.mode == "max":
                    sc.budget *= 8  # the ceiling is much faster: let the time bound end its run
            run_ceiling_results = run_ceiling(args, report, ceiling_scenarios, names_r, tails, work)
            ceiling_results = run_ceiling_results
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_rows(report, pager_results, ceiling_results, args.ack == "single", ceiling_run=args.only != "pager")
    report.note(bl.RAISED_LIMITS_NOTE)
    report.note("Load: 256-byte text messages, one recipient each; sender i sends only to receiver i. Senders log "
                "in send-only and their send frames carry \"receipt\":false, so a server that knows the flag makes "
                "no receipt (an older one ignores it, pushes the receipts of the session's own messages and keeps "
                "them stored). " + ack_note(args.ack, pager_results, ceiling_results) +
                " A message is counted when the receiver's ack is answered ok.")
    report.note("Every envelope is real (pager.Sealer: RSA-OAEP wrap, AES-256-GCM, RSA-PSS signature), sealed in "
                "advance with a unique message id; send frames are pre-encoded bytes. Users are registered with "
                "pager.PagerClient (one RSA-2048 key each, cached in %s between runs), then every connection "
                "logs in on a raw socket." % (args.key_cache if args.key_cache is not None else
                                              bl.default_key_cache()))
    report.note("Latency: send-frame write to message-push read, one clock, messages sent after the first %s "
                "of each run (warm-up excluded), and msg/s over the same part of the sending phase; a run whose "
                "sending phase after the warm-up is shorter than half of it or 0.5 s is measured whole, msg/s "
                "then counting its drain too. Fixed rates are open loop, paced every 0.2-1 ms; a run stops "
                "offering when more than max(1000, rate x 0.5 s) messages are unacknowledged (reported as NOT "
                "sustained). Max runs keep a window of 2048/pairs (2 to 256) unacknowledged messages per sender."
                % "20% (at most 1 s)")
    report.note("Generator and server share the machine's cores; generator CPU per message is reported next to "
                "the server's to show that the generator is not the bottleneck.")
    report.note("The ceiling relay (bench/ceiling_relay.py) parses each line as JSON, forwards it to the user "
                "named in 'to' and answers ok (with \"unknown_msgs\":[] to a list-form ack); it stores nothing and "
                "checks nothing. Its frames carry the same envelopes." + (" Lines/s counts the 5 lines per message it reads and writes." if args.ack == "single"
                                else ""))
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
