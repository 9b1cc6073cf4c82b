#!/usr/bin/env python3
"""
Group messages against 1:1 messages, in the same run: one short text message to a group of 100 members (one device
each, every device with X25519 prekeys), next to the same message to one user.

  - seal: pager.Sealer with group=(id, head), 99 X25519 wraps (the sender's only device gets none), against the
    1:1 seal of the same text to one device; and the cost each further member's device adds.
  - open: what one member's device spends opening the group message (a header of 99 entries), against opening the
    1:1 message.
  - server: a pager server in its own process; the group is created with a real signed create operation, the 99
    other members are logged in and receiving.  One message at a time, the time from the write of the send frame
    to its ok (accepted), and to the push reaching the last of the 99 receivers (fanned out), and the server's CPU
    per message: accepting it, pushing it 99 times, taking the 99 acks, making the 99 delivered receipts and taking
    the sender's acks of them.  The same for a 1:1 message (one push, one ack, one receipt).  Both kinds alternate
    in passes, so that noise hits both alike.

The crypto rounds interleave the group and the 1:1 operation; each figure is the median of the rounds.

    python bench/group.py              # full run
    python bench/group.py --quick      # fewer rounds and messages
    python bench/group.py --json       # the bench/run.py contract on stdout
    python bench/group.py --no-server  # the crypto part only
    python bench/group.py --profile out.txt  # also py-spy the server during one more pass of group messages
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402
import pager  # noqa: E402

MEMBERS = 100  # the group, its sender included: 99 receiving devices
TEXT = (b"Deploy of 4.2 is done; the dashboards are green. Ping me if anything looks off. " * 2)[:100]
GROUP_ID = bytes.fromhex("67726f75702d62656e63682d30303031")
ONE_TO_ONE = "1:1 (one device)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="a 100-member group message against a 1:1 message: seal, open, server")
    p.add_argument("--quick", action="store_true", help="a smoke run well under a minute")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--rounds", type=int, help="crypto rounds (default 60; quick 10)")
    p.add_argument("--messages", type=int, help="messages of each kind through the server (default 300; quick 30)")
    p.add_argument("--passes", type=int, default=3, help="alternating server passes (default 3)")
    p.add_argument("--no-server", action="store_true", help="measure the crypto only")
    p.add_argument("--profile", metavar="FILE",
                   help="after the measured runs, profile the server with py-spy during one more pass of group "
                        "messages (FILE.svg: flame graph; .txt: collapsed stacks; .json: speedscope)")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (10 if args.quick else 60)
    args.messages = args.messages or (30 if args.quick else 300)
    return args


class Prekeys:
    """One device's prekeys, as pager's Opener asks for them."""

    def __init__(self, spk_id, spk, opk_id, opk, valid):
        self.spk_id, self.spk, self.opk_id, self.opk, self.valid = spk_id, spk, opk_id, opk, valid

    def signed_private(self, prekey_id):
        return self.spk if prekey_id == self.spk_id else None

    def one_time_private(self, prekey_id):
        return self.opk if prekey_id == self.opk_id else None

    def signed_valid(self, prekey_id):
        return self.valid if prekey_id == self.spk_id else None


class Members:
    """
    The group's 100 members: an RSA identity key each (their only device), a signed prekey (published on the server
    in place of the client's own) and a one-time prekey each (used only by the in-process crypto rounds).
    """

    def __init__(self, keys):
        now = int(time.time())
        self.names = ["m%03d" % i for i in range(MEMBERS)]
        self.keys = keys
        self.devices = [pager.device_id(k) for k in keys]
        self.fps = [pager.fingerprint(k) for k in keys]
        self.signed, self.targets, self.prekeys = {}, [], []
        for i, (name, key) in enumerate(zip(self.names, keys)):
            spk, opk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
            signed = pager.sign_prekey(key, name, 1000 + i, pager.x25519_public_bytes(spk), now - 60,
                                       now + pager.PREKEY_LIFETIME)
            self.signed[name] = signed
            one_time = pager.OneTimePrekey(5000 + i, pager.x25519_public_bytes(opk))
            self.targets.append(pager.DeviceTarget(name, self.devices[i], signed_prekey=signed, one_time=one_time))
            self.prekeys.append(Prekeys(signed.prekey_id, spk, one_time.prekey_id, opk,
                                        (signed.valid_from, signed.valid_until)))
        self.sender = self.names[0]
        self.create = pager.encode_group_op(
            GROUP_ID, 1, bytes(32), "create", self.sender, self.fps[0], int(time.time() * 1000), name="bench",
            members=list(zip(self.names[1:], self.fps[1:])))
        self.head = pager.parse_group_op(self.create).hash
        self.signature = pager.sign_group_op(keys[0], self.create)

    def seal_group(self, targets=None, one_time=True):
        targets = targets if targets is not None else self.targets[1:]
        if not one_time:
            targets = [pager.DeviceTarget(t.user, t.device_id, signed_prekey=t.signed_prekey) for t in targets]
        return pager.seal(self.keys[0], self.sender, targets, TEXT, group=(GROUP_ID, self.head))

    def seal_one(self, one_time=True):
        target = self.targets[1]
        if not one_time:
            target = pager.DeviceTarget(target.user, target.device_id, signed_prekey=target.signed_prekey)
        return pager.seal(self.keys[0], self.sender, [target], TEXT)

    def open(self, envelope, i=1):
        return pager.open_envelope(envelope, None, self.names[i], self.keys[0].public_key(), device=self.devices[i],
                                   prekeys=self.prekeys[i])


def _median_ms(samples):
    return 1000 * statistics.median(samples)


def _spread(samples):
    """The interquartile range over the median: how noisy the rounds were."""
    if len(samples) < 4:
        return None
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) / statistics.median(samples)


def measure_crypto(report, members, rounds):
    """Interleaved rounds: group seal and 1:1 seal, then a member opening each."""
    perf = time.perf_counter
    seal_group, seal_one, seal_ten, open_group, open_one, open_last = [], [], [], [], [], []
    ten = members.targets[1:11]
    log("crypto: %d rounds of a group seal (99 devices), a 1:1 seal and the opens" % rounds)
    for r in range(rounds + 2):  # the first two rounds warm up
        order = (0, 1) if r % 2 else (1, 0)
        for which in order:
            t = perf()
            if which == 0:
                group = members.seal_group()
                dt_group = perf() - t
                t = perf()
                members.seal_group(ten)
                dt_ten = perf() - t
            else:
                one = members.seal_one()
                dt_one = perf() - t
        for which in order:
            t = perf()
            if which == 0:
                opened = members.open(group)
                dt_open_group = perf() - t
                t = perf()
                members.open(group, MEMBERS - 1)  # the last entry of the header
                dt_open_last = perf() - t
            else:
                opened_one = members.open(one)
                dt_open_one = perf() - t
        if bytes(opened.plaintext) != TEXT or bytes(opened_one.plaintext) != TEXT or opened.group_id != GROUP_ID:
            raise SystemExit("a member did not open the message it was sent")
        if r >= 2:
            seal_group.append(dt_group)
            seal_ten.append(dt_ten)
            seal_one.append(dt_one)
            open_group.append(dt_open_group)
            open_last.append(dt_open_last)
            open_one.append(dt_open_one)
    header = len(group.header)
    report.row("seal, group of %d (99 devices)" % MEMBERS, _median_ms(seal_group), "ms", _median_ms(seal_one),
               ONE_TO_ONE)
    per_device = (statistics.median(seal_group) - statistics.median(seal_ten)) / (99 - 10)
    report.row("seal, each further member device", 1000 * per_device, "ms", _median_ms(seal_one), ONE_TO_ONE)
    report.row("open, one member (first entry)", _median_ms(open_group), "ms", _median_ms(open_one), ONE_TO_ONE)
    report.row("open, one member (last entry)", _median_ms(open_last), "ms", _median_ms(open_one), ONE_TO_ONE)
    report.row("group header size", header / 1024, "KiB", len(one.header) / 1024, ONE_TO_ONE)
    noisy = [name for name, s in (("group seal", seal_group), ("1:1 seal", seal_one), ("group open", open_group),
                                  ("1:1 open", open_one)) if (_spread(s) or 0) > 0.25]
    if noisy:
        report.note("crypto rounds were noisy (interquartile range above 25%% of the median): %s." % ", ".join(noisy))
    report.note("The crypto rounds seal %d bytes of text with a one-time prekey in every wrap (two X25519 agreements "
                "per device) and open it on a member's device; each figure is the median of %d interleaved rounds."
                % (len(TEXT), rounds))


# -- the server part --

def _receipt_ids(line):
    frame = json.loads(line)
    return frame["receipt"]


def measure_server(report, members, args, work):
    """Register the members, create the group with its signed op, then send both kinds one at a time."""
    messages, passes = args.messages, max(1, args.passes)
    per_pass = max(1, messages // passes)
    log("sealing %d group messages and %d 1:1 messages in advance" % (per_pass * passes, per_pass * passes))
    # No one-time prekeys here: the server hands out those the clients published, and these envelopes are sealed
    # before it runs.  Each wrap is then one agreement (the server does not look inside it either way).
    group_envs = [members.seal_group(one_time=False) for _ in range(per_pass * (passes + bool(args.profile)))]
    one_envs = [members.seal_one(one_time=False) for _ in range(per_pass * passes)]
    server = bl.start_pager(work)
    thread = bl.ReactorThread()
    try:
        users = list(zip(members.names, members.keys))
        log("registering %d accounts through pager.PagerClient" % len(users))
        thread.run(bl.register_with_clients, server.port, users, 16, bl.TOKEN, members.signed)
    finally:
        thread.stop()
    loop = bl.Loop()
    try:
        accounts = [(name, key, True) for name, key in users]
        conns, _ = bl.login_all(loop, server.port, accounts)
        sender, receivers = conns[0], conns[1:]
        _create_group(loop, sender, members)
        results = {"group": [], "one": []}
        for p in range(passes):
            kinds = ("group", "one") if p % 2 == 0 else ("one", "group")
            for kind in kinds:
                envs = (group_envs if kind == "group" else one_envs)[p * per_pass:(p + 1) * per_pass]
                targets = receivers if kind == "group" else receivers[:1]
                results[kind].append(_run(loop, sender, targets, envs, kind, server.pid))
                log("pass %d, %s: %d messages" % (p + 1, kind, len(envs)))
        _report_server(report, results, per_pass * passes)
        if args.profile:
            spy = bl.start_profile(args.profile, server.pid)
            _run(loop, sender, receivers, group_envs[passes * per_pass:], "group", server.pid)
            spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
            bl.finish_profile(spy, report, args.profile, "one more pass of %d group messages" % per_pass)
        report.note(bl.RAISED_LIMITS_NOTE)
    finally:
        loop.close()
        server.stop()


def _create_group(loop, sender, members):
    """The group's create operation, signed by the sender's identity key, sent as a group_op; waits for its ok."""
    answer = {}

    def on_lines(conn, lines):
        for line in lines:
            if line.startswith(b'{"type":"ok","id":"create"') or line.startswith(b'{"type":"error"'):
                answer["line"] = line
    sender.on_lines = on_lines
    sender.queue(pager.encode_frame({"type": "group_op", "id": "create", "group": GROUP_ID.hex(),
                                     "op": pager.b64(members.create), "signature": pager.b64(members.signature)})
                 + b"\n")
    if not loop.run_until(lambda: "line" in answer, 60):
        raise SystemExit("the server did not answer the group's create operation")
    frame = json.loads(answer["line"])
    if frame["type"] != "ok" or frame["head"] != members.head.hex():
        raise SystemExit("the server refused the group's create operation: %r" % frame)


def _run(loop, sender, receivers, envelopes, kind, server_pid):
    """
    Send C{envelopes} one at a time from C{sender}: each send waits until the previous message reached every one of
    C{receivers}.  Receivers acknowledge what each read brought in one list-form ack; the sender does the same with
    its receipts.  Returns the accept and fan-out latencies (seconds), the server's CPU and the wall time.
    """
    perf = time.perf_counter
    state = {"i": 0, "t0": None, "accepted": None, "arrived": 0, "rid": 0, "receipts": 0, "errors": []}
    accept, fanout = [], []
    expected = len(receivers)
    MSG, ML = bl.MESSAGE_PREFIX, bl.MESSAGE_LEN
    RECEIPT = b'{"type":"receipt","receipt":'

    def next_id():
        state["rid"] += 1
        return state["rid"]

    def send_next():
        env = envelopes[state["i"]]
        rid = next_id()
        head = (b'{"type":"send","id":%d,"group":"%s",' % (rid, GROUP_ID.hex().encode()) if kind == "group"
                else b'{"type":"send","id":%d,"to":["%s"],' % (rid, receivers[0].name.encode()))
        state.update(t0=perf(), accepted=None, arrived=0)
        sender.queue(head + bl.envelope_tail(env))

    def done_one(now):
        accept.append(state["accepted"] - state["t0"])
        fanout.append(now - state["t0"])
        state["i"] += 1
        if state["i"] < len(envelopes):
            send_next()

    def on_sender(conn, lines):
        receipts = []
        for line in lines:
            if line.startswith(RECEIPT):
                receipts.append(_receipt_ids(line))
            elif line.startswith(b'{"type":"ok"') and b'"msg"' in line and state["accepted"] is None:
                state["accepted"] = perf()
                if state["arrived"] == expected:
                    done_one(state["accepted"])
            elif line.startswith(bl.ERROR_PREFIX):
                state["errors"].append(line[:300])
        if receipts:
            state["receipts"] += len(receipts)
            conn.queue(b'{"type":"ack","id":%d,"receipts":[%s]}\n' % (
                next_id(), b",".join(b"%d" % r for r in receipts)))

    def on_receiver(conn, lines):
        msgs = []
        for line in lines:
            if line.startswith(MSG):
                msgs.append(line[ML:ML + 32])
            elif line.startswith(bl.ERROR_PREFIX):
                state["errors"].append(line[:300])
        if msgs:
            conn.queue(b'{"type":"ack","id":"a","msgs":[%s]}\n' % b",".join(b'"%s"' % m for m in msgs))
            state["arrived"] += len(msgs)
            if state["arrived"] == expected and state["accepted"] is not None:
                done_one(perf())

    sender.on_lines = on_sender
    for conn in receivers:
        conn.on_lines = on_receiver
    total = len(envelopes)
    cpu = bl.CpuMeter(server_pid)
    send_next()
    finished = loop.run_until(lambda: len(fanout) == total or state["errors"], 600)
    # The last receipts and acks still cost the server: wait for them before the meter stops.
    loop.run_until(lambda: state["receipts"] >= total * expected or state["errors"], 60)
    result = cpu.stop()
    if state["errors"] or not finished:
        raise SystemExit("the %s run failed: %s" % (kind, state["errors"][:3] or "it did not finish in 600 s"))
    return {"accept": accept, "fanout": fanout, "cpu": result, "messages": total, "deliveries": total * expected}


def _report_server(report, results, total):
    def joined(kind, field):
        return [x for r in results[kind] for x in r[field]]

    def cpu_per_message(kind):
        return 1e3 * sum(r["cpu"]["server"] for r in results[kind]) / sum(r["messages"] for r in results[kind])

    group_cpu, one_cpu = cpu_per_message("group"), cpu_per_message("one")
    report.row("server: accept, group message", _median_ms(joined("group", "accept")), "ms",
               _median_ms(joined("one", "accept")), ONE_TO_ONE)
    report.row("server: accept + fan-out to 99 receivers", _median_ms(joined("group", "fanout")), "ms",
               _median_ms(joined("one", "fanout")), ONE_TO_ONE)
    report.row("server: fan-out p99", 1000 * bl.percentile(joined("group", "fanout"), 99), "ms",
               1000 * bl.percentile(joined("one", "fanout"), 99), ONE_TO_ONE)
    report.row("server CPU per group message", group_cpu, "ms", one_cpu, ONE_TO_ONE)
    report.row("server CPU per delivery (group / 99)", group_cpu / (MEMBERS - 1), "ms", one_cpu, ONE_TO_ONE)
    others = sum(r["cpu"]["others"] or 0 for k in results for r in results[k])
    wall = sum(r["cpu"]["wall"] for k in results for r in results[k])
    if wall and others / wall > 0.2:
        report.note("Other processes used %.0f%% of a core during the server runs: the figures are noisier."
                    % (100 * others / wall))
    report.note("Server: %d messages of each kind, one at a time (the next is sent once the previous one reached "
                "every receiver), in alternating passes; the group's %d other members are logged in and receiving, "
                "and acknowledge each read's messages with one ack; the sender acknowledges its receipts the same "
                "way.  Server CPU per message covers accepting it, its pushes, the acks and the delivered receipts."
                % (total, MEMBERS - 1))


def main(argv=None):
    args = parse_args(argv)
    report = bl.Report("group", as_json=args.json)
    keys = bl.load_keys(MEMBERS, cache=args.key_cache)
    members = Members(keys)
    measure_crypto(report, members, args.rounds)
    if args.no_server:
        report.note("The server part was left out (--no-server).")
    else:
        work = bl.workdir("pager-bench-group-")
        measure_server(report, members, args, work)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
