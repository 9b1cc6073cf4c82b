#!/usr/bin/env python3
"""
Large-message benchmark: one big message relayed sender -> server -> recipient.  The sender streams: it seals with
pager.Sealer as it goes and writes the header frame, then chunk frames, only as fast as the socket takes them; the
recipient reads and acknowledges without keeping the chunks.  Measures throughput and the server's peak memory
(VmRSS every 50 ms) against its idle memory, for two sizes: it must not grow with the message.

    python bench/large.py [--quick] [--json] [--sizes 16,256]
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

import pager  # noqa: E402

MIB = 1024 * 1024
RSS_FLAT_MIB = 32.0
SEND_BUFFER = 2 * MIB  # the sender seals more only when less than this is waiting to be written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="relay one large message; throughput and server memory")
    p.add_argument("--quick", action="store_true", help="a smoke run well under a minute (4 and 16 MiB)")
    p.add_argument("--full", action="store_true", help="the full run (the default: 16 and 256 MiB)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--sizes", help="message sizes in MiB, comma-separated, smallest first")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for one transfer, in seconds")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    args.sizes = [float(x) for x in (args.sizes or ("4,16" if args.quick else "16,256")).split(",")]
    return args


class StreamingSender:
    """Seals C{size} bytes incrementally and queues header and chunk frames while the socket keeps up."""

    def __init__(self, conn, key, recipient_key, size):
        self.conn, self.size = conn, size
        self.sealer = pager.Sealer(key, "sender", {"receiver": recipient_key})
        self.block = os.urandom(pager.CHUNK_SIZE)
        self.remaining = size
        self.done = False
        self.frames = 0
        self.msg = self.sealer.message_id.hex().encode()
        conn.queue(pager.encode_frame({"type": "send", "id": 1, "to": ["receiver"], "size": size,
                                       "header": pager.b64(self.sealer.header), "chunks": []}) + b"\n")

    def _chunk(self, chunk, signature=None):
        frame = b'{"type":"chunk","id":1,"chunks":["%s"]' % pager.b64(chunk).encode()
        if signature is not None:
            frame += b',"signature":"%s"' % pager.b64(signature).encode()
        self.conn.queue(frame + b"}\n")
        self.frames += 1

    def pump(self):
        while not self.done and self.conn.buffered() < SEND_BUFFER:
            if self.remaining > 0:
                n = min(self.remaining, len(self.block))
                self.remaining -= n
                for chunk in self.sealer.update(self.block[:n]):
                    self._chunk(chunk)
            else:
                last, signature = self.sealer.finish()
                for chunk in last[:-1]:
                    self._chunk(chunk)
                self._chunk(last[-1], signature)
                self.done = True


class Probe:
    """
    A second pair exchanging one small message every C{interval} seconds during the transfer: how long the big
    message holds up everybody else (send write to push read, and send write to the server's ok).
    """

    def __init__(self, sender, receiver, frames, interval=0.05):
        self.sender, self.receiver, self.frames, self.interval = sender, receiver, frames, interval
        self.sent = {}  # message id hex -> time written
        self.ok_at = {}  # request id -> time written
        self.delivery, self.accept = [], []
        self.next_at = 0.0
        self.index = 0
        self.running = False
        sender.on_lines, receiver.on_lines = self.on_sender, self.on_receiver

    def on_sender(self, conn, lines):
        now = time.perf_counter()
        for line in lines:
            if line.startswith(bl.OK_PREFIX):
                t = self.ok_at.pop(bl.ok_id(line), None)
                if t is not None:
                    self.accept.append(now - t)

    def on_receiver(self, conn, lines):
        now = time.perf_counter()
        for line in lines:
            if line.startswith(bl.MESSAGE_PREFIX):
                msg = line[bl.MESSAGE_LEN:bl.MESSAGE_LEN + 32]
                t = self.sent.pop(msg, None)
                if t is not None:
                    self.delivery.append(now - t)
                conn.queue(b'{"type":"ack","id":"a","msg":"%s"}\n' % msg)

    def tick(self, now):
        if self.running and now >= self.next_at and self.index < len(self.frames):
            rid, msg, frame = self.frames[self.index]
            self.index += 1
            self.sent[msg] = self.ok_at[b"%d" % rid] = now
            self.sender.queue(frame)
            self.next_at = now + self.interval

    def unanswered(self):
        return len(self.sent) + len(self.ok_at)


def transfer(args, size, keys, probe_frames, report):
    work = bl.workdir("pager-large-")
    try:
        db = os.path.join(work, "bench.db")
        bl.seed_users_db(db, [("sender", keys[0]), ("receiver", keys[1]), ("sender2", keys[2]),
                              ("receiver2", keys[3])])
        server = bl.start_pager(work, db=db, extra=["--max-message", str(300 * MIB)])
        try:
            loop = bl.Loop()
            sender, receiver, sender2, receiver2 = bl.login_all(
                loop, server.port, [("sender", keys[0], False), ("receiver", keys[1], True),
                                    ("sender2", keys[2], False), ("receiver2", keys[3], True)])[0]
            probe = Probe(sender2, receiver2, probe_frames)
            loop.run_until(lambda: False, 1.0)  # settle, then the idle sample
            idle = server.rss_kib()
            rss = bl.RssSampler(server.pid, 0.05).start()
            st = {"t_ok": None, "t_first": None, "t_last": None, "t_acked": None, "bytes": 0, "frames": 0,
                  "errors": []}
            perf = time.perf_counter

            def on_sender(conn, lines):
                for line in lines:
                    if line.startswith(b'{"type":"ok","id":1,'):
                        st["t_ok"] = perf()
                    elif line.startswith(bl.ERROR_PREFIX):
                        st["errors"].append(json.loads(line))

            def on_receiver(conn, lines):
                now = perf()
                for line in lines:
                    if line.startswith(bl.CHUNK_PREFIX):
                        start = line.index(b'"chunks":["') + 11
                        end = line.index(b'"', start)
                        text = line[start:end]
                        st["bytes"] += len(text) * 3 // 4 - text.count(b"=", -2) - pager.GCM_TAG_SIZE
                        st["frames"] += 1
                        if line.rfind(b'"signature":"', end) > 0:
                            st["t_last"] = now
                            msg = line[bl.CHUNK_LEN:bl.CHUNK_LEN + 32]
                            conn.queue(b'{"type":"ack","id":"big","msg":"%s"}\n' % msg)
                    elif line.startswith(bl.MESSAGE_PREFIX):
                        st["t_first"] = now
                    elif line.startswith(b'{"type":"ok","id":"big"}'):
                        st["t_acked"] = now
                    elif line.startswith(bl.ERROR_PREFIX):
                        st["errors"].append(json.loads(line))

            sender.on_lines, receiver.on_lines = on_sender, on_receiver
            cpu = bl.CpuMeter(server.pid)
            t0 = perf()
            stream = StreamingSender(sender, keys[0], keys[1].public_key(), int(size))
            probe.running = True

            def tick(now):
                stream.pump()
                probe.tick(now)
            ok = loop.run_until(lambda: st["t_acked"] is not None or st["errors"], args.timeout, tick=tick,
                                interval=0.002)
            probe.running = False
            cpu_used = cpu.stop()
            loop.run_until(lambda: not probe.unanswered(), 30)
            rss.stop()
            loop.close()
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if st["errors"]:
        raise RuntimeError("errors during the transfer: %s" % st["errors"][:3])
    if not ok:
        raise RuntimeError("the transfer of %d bytes timed out after %.0f s (%d bytes received)" % (
            size, args.timeout, st["bytes"]))
    if st["bytes"] != size:
        raise RuntimeError("received %d bytes of plaintext, expected %d" % (st["bytes"], size))
    r = {
        "size": size, "upload_s": st["t_ok"] - t0, "download_s": st["t_last"] - st["t_first"],
        "total_s": st["t_last"] - t0, "acked_s": st["t_acked"] - t0, "frames": stream.frames,
        "rss_idle_mib": idle / 1024.0, "rss_peak_mib": rss.peak / 1024.0,
        "rss_growth_mib": (rss.peak - idle) / 1024.0, "cpu": cpu_used,
        "probe_delivery": bl.summary_ms(probe.delivery), "probe_accept": bl.summary_ms(probe.accept),
        "probe_sent": probe.index, "probe_unanswered": probe.unanswered(),
    }
    mib = size / MIB
    report.say("%6.0f MiB: upload %.2f s (%.1f MB/s), download %.2f s (%.1f MB/s), end to end %.2f s (%.1f MB/s); "
               "server RSS idle %.1f MiB, peak %.1f MiB (+%.1f MiB)" % (
                   mib, r["upload_s"], size / r["upload_s"] / 1e6, r["download_s"], size / r["download_s"] / 1e6,
                   r["total_s"], size / r["total_s"] / 1e6, r["rss_idle_mib"], r["rss_peak_mib"],
                   r["rss_growth_mib"]))
    report.say("           ack answered %.2f s after the last chunk was read" % (r["acked_s"] - r["total_s"]))
    pd, pa = r["probe_delivery"], r["probe_accept"]
    report.say("           meanwhile, a small message every 50 ms between two other users (%d sent): send to push "
               "p50 %s ms, p99 %s ms, max %s ms; send to ok max %s ms" % (
                   r["probe_sent"], bl.fmt(pd["p50"], 1), bl.fmt(pd["p99"], 1), bl.fmt(pd["max"], 1),
                   bl.fmt(pa["max"], 1)))
    report.say("           " + bl.cpu_text(cpu_used, mib, "MiB", 1e3, "ms"))
    return r


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("large", args.json)
    keys = bl.load_keys(4, cache=args.key_cache)
    probe_count = 2000
    [tails] = bl.seal_tails(keys, ["sender", "receiver", "sender2", "receiver2"], [(2, 3, probe_count)])
    results = []
    for mib in args.sizes:
        log("large: one message of %g MiB" % mib)
        probe_frames = [(i + 10, msg, bl.send_frame(i + 10, "receiver2", tail)) for i, (msg, tail) in enumerate(tails)]
        results.append(transfer(args, int(mib * MIB), keys, probe_frames, report))
    for r in results:
        n = "%g MiB" % (r["size"] / MIB)
        report.row("%s message: end-to-end throughput" % n, r["size"] / r["total_s"] / 1e6, "MB/s")
        report.row("%s message: upload throughput (to the server's ok)" % n, r["size"] / r["upload_s"] / 1e6, "MB/s")
        report.row("%s message: download throughput (push to the last chunk)" % n,
                   r["size"] / r["download_s"] / 1e6, "MB/s")
        report.row("%s message: send start to ack answered" % n, r["acked_s"], "s")
        report.row("%s message: last chunk read to ack answered" % n, r["acked_s"] - r["total_s"], "s")
        report.row("%s message: other users' small message meanwhile, send to push p99" % n,
                   r["probe_delivery"]["p99"], "ms")
        report.row("%s message: other users' small message meanwhile, send to push max" % n,
                   r["probe_delivery"]["max"], "ms")
        report.row("%s message: other users' small message meanwhile, send to ok max" % n,
                   r["probe_accept"]["max"], "ms")
        report.row("%s message: server RSS peak minus idle" % n, r["rss_growth_mib"], "MiB")
        report.row("%s message: server CPU per MiB" % n, r["cpu"]["server"] / (r["size"] / MIB) * 1000, "ms")
        report.row("%s message: generator CPU per MiB" % n, r["cpu"]["generator"] / (r["size"] / MIB) * 1000, "ms")
        bl.others_row(report, "%s message: other processes' CPU meanwhile" % n, r["cpu"])
    if len(results) >= 2:
        small, large = results[0], results[-1]
        diff = large["rss_growth_mib"] - small["rss_growth_mib"]
        report.row("server RSS growth, %g MiB vs %g MiB message" % (large["size"] / MIB, small["size"] / MIB), diff,
                   "MiB", target="< %g MiB (flat with the message size)" % RSS_FLAT_MIB, passed=diff < RSS_FLAT_MIB)
    report.note(bl.RAISED_LIMITS_NOTE + " Here also --max-message %d (300 MiB)." % (300 * MIB))
    report.note("Sizes are plaintext bytes (1 MB = 10^6 bytes in MB/s). The sender seals with pager.Sealer as it "
                "writes (64 KiB chunks, one per chunk frame) and keeps at most %d MiB waiting for the socket; the "
                "recipient, online throughout, counts and acks without keeping or decrypting the chunks. Upload "
                "runs from the first frame written to the server's ok; download from the message push to the last "
                "chunk; end to end from the first frame written to the last chunk read." % (SEND_BUFFER // MIB))
    report.note("During each transfer a second pair of users (sender2 -> receiver2) exchanges one 256-byte message "
                "every 50 ms (pre-sealed, acked on arrival): its latencies show how long the large message holds up "
                "everybody else's sends and deliveries (the store has one thread).")
    report.note("Users were created straight in a fresh database with pager's own add_user_txn before the server "
                "started; each size runs on a fresh server.")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
