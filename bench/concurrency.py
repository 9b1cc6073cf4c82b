#!/usr/bin/env python3
"""
Concurrency benchmark: many authenticated connections at once.  Connects and logs in N raw connections (a login
storm bounded by a window of connections in progress), while a separate, already logged-in connection pings the
server every 100 ms to measure how responsive its reactor stays.  Then reports the server's memory per connection
and checks that a message still goes through quickly with everyone connected.

    python bench/concurrency.py [--quick] [--json] [--connections 10000]
"""

import argparse
import os
import random
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

TARGET_MESSAGE_MS = 50.0
FD_MARGIN = 200  # descriptors each process needs besides the connections


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="N concurrent authenticated connections: login storm, responsiveness, "
                                            "memory per connection")
    p.add_argument("--quick", action="store_true", help="a smoke run with 1,000 connections")
    p.add_argument("--full", action="store_true", help="the full run (the default: 10,000 connections)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--connections", type=int, help="connections to log in (default 10000; quick 1000)")
    p.add_argument("--keys", type=int, default=50, help="RSA keys shared by the accounts (default 50)")
    p.add_argument("--window", type=int, default=100,
                   help="connections connecting or logging in at once (default 100: below the server's "
                        "--argon2-queue of 256, and short enough a queue for each login to finish well within "
                        "the 30 s login timeout)")
    p.add_argument("--argon2-concurrency", type=int, help="passed to the server (its default is 2)")
    p.add_argument("--messages", type=int, default=20, help="messages sent one by one with everyone connected")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    args.connections = args.connections or (1000 if args.quick else 10000)
    return args


class Pinger:
    """One logged-in connection that pings every C{interval} seconds and records each round trip."""

    def __init__(self, conn, interval=0.1):
        self.conn, self.interval = conn, interval
        self.sent = {}
        self.rtts = []
        self.seq = 0
        self.next_at = 0.0
        self.phase = []  # the round trips of the current phase
        conn.on_lines = self.on_lines

    def on_lines(self, conn, lines):
        now = time.perf_counter()
        for line in lines:
            if line.startswith(bl.OK_PREFIX):
                t = self.sent.pop(bl.ok_id(line), None)
                if t is not None:
                    self.phase.append(now - t)

    def tick(self, now):
        if now >= self.next_at:
            self.seq += 1
            rid = b'"p%d"' % self.seq
            self.sent[rid] = now
            self.conn.queue(b'{"type":"ping","id":%s}\n' % rid)
            self.next_at = now + self.interval

    def take(self, loop, wait=2.0):
        """The round trips of the phase just ended (waiting for the pings still out), and start a new phase."""
        loop.run_until(lambda: not self.sent, wait, interval=0.005)
        unanswered = len(self.sent)
        phase, self.phase, self.sent = self.phase, [], {}
        return phase, unanswered


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("concurrency", args.json)
    soft, hard = bl.raise_nofile()
    n = args.connections
    if hard != resource.RLIM_INFINITY and hard < n + FD_MARGIN:
        n = hard - FD_MARGIN
        report.note("RLIMIT_NOFILE hard limit is %d: used %d connections instead of %d." % (hard, n, args.connections))
    else:
        report.note("RLIMIT_NOFILE: hard limit %s per process; the generator raised its soft limit to %d and started "
                    "the server with a soft limit of %d (each side needs about N + %d descriptors)." % (
                        hard, soft, min(hard, n + 1000), FD_MARGIN))
    keys = bl.load_keys(args.keys, cache=args.key_cache)
    names = ["u%05d" % i for i in range(n)]
    rng = random.Random(1)
    pairs = [tuple(rng.sample(range(n), 2)) for _ in range(args.messages)]
    frames = []
    for i, (a, b) in enumerate(pairs):
        sealer_keys = [keys[a % len(keys)], keys[b % len(keys)]]
        [[env]] = bl.seal_envelopes(sealer_keys, [names[a], names[b]], [(0, 1, 1)])
        msg = bl.pager.parse_header(env.header).message_id.hex().encode()
        frames.append((a, b, msg, bl.send_frame(i + 1, names[b], bl.envelope_tail(env))))

    work = bl.workdir("pager-concurrency-")
    try:
        db = os.path.join(work, "bench.db")
        t = time.perf_counter()
        bl.seed_users_db(db, [(name, keys[i % len(keys)]) for i, name in enumerate(names)] + [("pinger", keys[0])])
        log("created %d accounts in the database in %.1f s" % (n + 1, time.perf_counter() - t))
        extra = ["--idle-timeout", "3600"]
        if args.argon2_concurrency:
            extra += ["--argon2-concurrency", str(args.argon2_concurrency)]
        server = bl.start_pager(work, db=db, nofile=min(hard, n + 1000), extra=extra)
        try:
            results = storm(args, report, server, n, names, keys, frames)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_rows(report, args, n, results)
    report.finish()
    return 0


def storm(args, report, server, n, names, keys, frames):
    loop = bl.Loop()
    [pconn], _ = bl.login_all(loop, server.port, [("pinger", keys[0], True)])
    pinger = Pinger(pconn)
    loop.run_until(lambda: False, 1.0, tick=pinger.tick)
    idle_before, _ = pinger.take(loop)
    rss_before = server.rss_kib()
    log("login storm: %d connections, at most %d in progress" % (n, args.window))
    rss = bl.RssSampler(server.pid, 0.1).start()
    cpu = bl.CpuMeter(server.pid)
    done_marks = {}

    half = {}

    def progress(done):
        if done == n // 2:
            half["rss"], half["n"] = server.rss_kib(), done
        if done % max(1, n // 10) == 0:
            log("  %d logged in" % done)

    t0 = time.perf_counter()
    accounts = [(name, keys[i % len(keys)], True) for i, name in enumerate(names)]
    conns, stats = bl.login_all(loop, server.port, accounts, window=args.window, tick=pinger.tick,
                                on_progress=progress, timeout=max(600, n / 10.0))
    t_all = time.perf_counter() - t0
    cpu_used = cpu.stop()
    storm_pings, storm_unanswered = pinger.take(loop)
    rss.stop()
    log("all %d logged in after %.1f s" % (n, t_all))

    # everyone connected: settle, then memory and a quiet phase of pings
    loop.run_until(lambda: False, 2.0, tick=pinger.tick)
    quiet_pings, quiet_unanswered = pinger.take(loop)
    rss_after = server.rss_kib()

    arrived = {}

    def on_lines(conn, lines):
        now = time.perf_counter()
        for line in lines:
            if line.startswith(bl.MESSAGE_PREFIX):
                msg = line[bl.MESSAGE_LEN:bl.MESSAGE_LEN + 32]
                arrived[msg] = now
                conn.queue(b'{"type":"ack","id":"a","msg":"%s"}\n' % msg)
            elif line.startswith(bl.ERROR_PREFIX):
                raise RuntimeError("error with everyone connected: %s" % line[:300])

    for conn in conns:
        conn.on_lines = on_lines
    message_ms = []
    for a, b, msg, frame in frames:
        t = time.perf_counter()
        conns[a].queue(frame)
        if not loop.run_until(lambda: msg in arrived, 10.0, tick=pinger.tick, interval=0.001):
            raise RuntimeError("a message from %s to %s did not arrive within 10 s" % (names[a], names[b]))
        message_ms.append((arrived[msg] - t) * 1000)
    message_pings, _ = pinger.take(loop)
    still_open = sum(1 for c in conns if not c.closed)
    loop.close()

    connect_ms = [(c.t_hello - c.t_start) * 1000 for c in conns]
    login_ms = [(c.t_ok - c.t_hello) * 1000 for c in conns]
    r = {
        "n": n, "seconds": t_all, "logins_per_s": n / t_all, "retries": stats["retries"], "cpu": cpu_used,
        "storm_pings": bl.summary_ms(storm_pings), "storm_unanswered": storm_unanswered,
        "quiet_pings": bl.summary_ms(quiet_pings), "idle_before": bl.summary_ms(idle_before),
        "rss_before_mib": rss_before / 1024.0, "rss_after_mib": rss_after / 1024.0,
        "rss_peak_mib": rss.peak / 1024.0, "rss_per_conn_kib": (rss_after - rss_before) / n,
        # the slope from half to all logged in leaves out what the first logins add once (Argon2id buffers kept
        # by the hashing threads' malloc arenas)
        "rss_slope_kib": (rss_after - half["rss"]) / max(1, n - half["n"]) if half else None,
        "message_ms": message_ms, "message_pings": bl.summary_ms(message_pings), "still_open": still_open,
        "connect": bl.summary_ms([x / 1000 for x in connect_ms]), "login": bl.summary_ms([x / 1000 for x in login_ms]),
    }
    sp, qp = r["storm_pings"], r["quiet_pings"]
    report.say("%d connections logged in in %.1f s: %.1f logins/s (%d retries on rate_limited); per connection: "
               "connect to hello p50 %s ms, p99 %s ms; hello to login ok p50 %s ms, p99 %s ms" % (
                   n, t_all, r["logins_per_s"], r["retries"], bl.fmt(r["connect"]["p50"], 1),
                   bl.fmt(r["connect"]["p99"], 1), bl.fmt(r["login"]["p50"], 1), bl.fmt(r["login"]["p99"], 1)))
    report.say("ping every 100 ms during the storm: %d answered, p50 %s ms, p99 %s ms, max %s ms (%d unanswered at "
               "the end)" % (sp["n"], bl.fmt(sp["p50"], 2), bl.fmt(sp["p99"], 2), bl.fmt(sp["max"], 2),
                             storm_unanswered))
    report.say("ping with all %d connected and idle: p50 %s ms, p99 %s ms, max %s ms (before the storm: p50 %s ms)"
               % (n, bl.fmt(qp["p50"], 2), bl.fmt(qp["p99"], 2), bl.fmt(qp["max"], 2),
                  bl.fmt(r["idle_before"]["p50"], 2)))
    report.say("server RSS %.1f MiB before, %.1f MiB with all connected (peak %.1f MiB): %.1f KiB per connection "
               "overall, %s KiB per connection from half to all connected" % (
                   r["rss_before_mib"], r["rss_after_mib"], r["rss_peak_mib"], r["rss_per_conn_kib"],
                   bl.fmt(r["rss_slope_kib"], 1)))
    report.say("message send -> push with all connected (%d messages, one at a time): p50 %s ms, max %s ms" % (
        len(message_ms), bl.fmt(bl.percentile(message_ms, 50), 2), bl.fmt(max(message_ms), 2)))
    report.say("storm " + bl.cpu_text(cpu_used, n, "login"))
    return r


def add_rows(report, args, n, r):
    sp, qp = r["storm_pings"], r["quiet_pings"]
    report.row("connections logged in at once", n, "conns")
    report.row("connect and log in %d connections" % n, r["seconds"], "s")
    report.row("logins per second during the storm", r["logins_per_s"], "logins/s")
    report.row("login: hello to ok, p99", r["login"]["p99"], "ms")
    report.row("ping round trip during the storm: p50", sp["p50"], "ms")
    report.row("ping round trip during the storm: p99", sp["p99"], "ms")
    report.row("ping round trip during the storm: max", sp["max"], "ms")
    report.row("ping round trip with all connected, idle: p99", qp["p99"], "ms")
    report.row("server RSS per connection, (all - before) / N", r["rss_per_conn_kib"], "KiB")
    report.row("server RSS per connection, half to all connected", r["rss_slope_kib"], "KiB")
    report.row("server RSS with all connected", r["rss_after_mib"], "MiB")
    report.row("message send to push, all connected: p50", bl.percentile(r["message_ms"], 50), "ms")
    worst = max(r["message_ms"])
    report.row("message send to push, all connected: max", worst, "ms", target="< %g ms" % TARGET_MESSAGE_MS,
               passed=worst < TARGET_MESSAGE_MS)
    report.row("server CPU per login", r["cpu"]["server"] / n * 1000, "ms")
    report.row("generator CPU per login", r["cpu"]["generator"] / n * 1000, "ms")
    if r["cpu"].get("others") is not None:
        report.row("CPU used by other processes during the storm",
                   100 * r["cpu"]["others"] / r["cpu"]["wall"], "% core")
    report.note(bl.RAISED_LIMITS_NOTE + " Here also --idle-timeout 3600, so that connections logged in early stay "
                "open through a long storm without keep-alive traffic.")
    report.note("Accounts were created straight in the server's database with pager's own add_user_txn before it "
                "started, sharing one safetoken hash (one Argon2id salt) and a pool of %d RSA keys (the server "
                "accepts the same key for several users); every login still signs its own connection's challenge "
                "(the proof names the user) and costs the server one Argon2id hash." % args.keys)
    report.note("Storm: at most %d connections connecting or logging in at once (the server answers rate_limited "
                "past --argon2-queue, default 256, waiting hashes; such logins are retried after 0.25 s with the "
                "new challenge). Token hashing runs %s at once (--argon2-concurrency), which bounds logins/s."
                % (args.window, args.argon2_concurrency or "2 (the default)"))
    report.note("Ping: a separate connection, logged in before the storm, sends a ping every 100 ms and records "
                "each round trip. RSS per connection is given two ways: (RSS with all connected - RSS before the "
                "storm) / N, "
                "which also counts memory the first logins add once (each Argon2id hash allocates 19 MiB, and the "
                "hashing threads' malloc arenas keep it), and the slope from half to all connected.")
    report.note("Message check: %d messages, each from one random logged-in connection to another, sent one at a "
                "time; time from the send write to the push read." % len(r["message_ms"]))


if __name__ == "__main__":
    sys.exit(main())
