#!/usr/bin/env python3
"""
Loss-accounting load test: M pager.PagerClient users, in one process, each sending to random others for T seconds,
while some disconnect (cleanly or abruptly) and reconnect at random.  Every user keeps one duplicate store (a
pager.MemorySeen) across its reconnections, and resends the same envelope when a send's answer was lost.

After a drain period with everyone connected, every message the server accepted must have been shown to every one
of its recipients exactly once, and acknowledged (its sender holds a "delivered" receipt from each recipient), and
the server must hold nothing for anyone.  Exits 1 if a message was lost or shown twice.

    python bench/load.py [--clients 20] [--seconds 30] [--quick] [--json] [--server subprocess|inprocess]

The core, L{run_load}, needs only pager and Twisted: tests/test_load.py runs it against an in-process server.
"""

import argparse
import collections
import dataclasses
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pager  # noqa: E402

from twisted.internet import defer, task, threads  # noqa: E402

TOKEN = "load-test-safetoken"


class CountingSeen(pager.MemorySeen):
    """A user's in-memory duplicate store that counts the duplicates it suppressed."""

    def __init__(self):
        super().__init__()
        self.suppressed = 0

    def contains(self, sender, msg_id, anywhere=False):
        def counted(found):
            if found:
                self.suppressed += 1
            return found
        return super().contains(sender, msg_id, anywhere).addCallback(counted)


class Member:
    """One user of the test: its key, duplicate store and pins survive its reconnections."""

    def __init__(self, name, key):
        self.name, self.key = name, key
        self.seen = CountingSeen()
        self.pins = pager.MemoryPins()
        self.client = None
        self.online = False
        self.offline_until = 0.0
        self.shown = collections.Counter()  # (sender, message id hex) -> times handed to on_message
        self.receipts = collections.Counter()  # (message id hex, recipient) -> delivered receipts received
        self.rejected = []
        self.outbox = None  # (recipients, envelope, message id hex) waiting for the server's answer
        self.connects = 0

    def on_message(self, opened):
        self.shown[(opened.sender, opened.message_id.hex())] += 1

    def on_receipt(self, receipt):
        if receipt.status == "delivered":
            self.receipts[(receipt.message_id, receipt.peer)] += 1
        else:
            self.rejected.append(receipt)

    def on_rejected(self, msg, sender, error):
        self.rejected.append((msg, sender, error))


@dataclasses.dataclass
class LoadResult:
    clients: int
    seconds: float
    sent: int = 0  # envelopes sealed and sent (each once, plus resends of the same envelope)
    resends: int = 0  # sends of an envelope whose earlier answer was lost with its connection
    accepted: int = 0  # distinct messages the server answered ok
    duplicate_answers: int = 0  # ok answers with duplicate: true (a resend of a message already accepted)
    expected: int = 0  # deliveries: accepted messages x their recipients
    delivered: int = 0  # expected deliveries shown to their recipient (at least once)
    acked: int = 0  # expected deliveries whose sender holds a "delivered" receipt
    duplicates_suppressed: int = 0  # redeliveries the clients recognised and did not show again
    receipt_duplicates: int = 0
    lost: int = 0  # expected deliveries never shown
    shown_twice: int = 0  # deliveries shown more than once
    unexpected: int = 0  # messages shown that no sender had seen accepted
    unresolved: int = 0  # sends still without an answer at the end
    pending_after: int = 0  # deliveries the server still held at the final logins
    send_errors: list = dataclasses.field(default_factory=list)
    rejected: int = 0
    disconnects: int = 0
    abrupt: int = 0
    reconnects: int = 0
    drain_seconds: float = 0.0
    drained: bool = False

    @property
    def ok(self):
        return (self.lost == 0 and self.shown_twice == 0 and self.unexpected == 0 and self.unresolved == 0
                and self.pending_after == 0 and not self.send_errors and self.rejected == 0
                and self.acked == self.expected)

    def lines(self):
        return [
            "clients %d for %.1f s: %d disconnects (%d abrupt), %d reconnects" % (
                self.clients, self.seconds, self.disconnects, self.abrupt, self.reconnects),
            "sent %d (+%d resends), accepted %d (%d duplicate answers), deliveries expected %d" % (
                self.sent, self.resends, self.accepted, self.duplicate_answers, self.expected),
            "delivered %d, acked %d (delivered receipts), duplicates suppressed %d, receipt duplicates %d" % (
                self.delivered, self.acked, self.duplicates_suppressed, self.receipt_duplicates),
            "lost %d, shown twice %d, unexpected %d, unresolved sends %d, pending on the server at the end %d, "
            "rejected %d, send errors %d" % (
                self.lost, self.shown_twice, self.unexpected, self.unresolved, self.pending_after, self.rejected,
                len(self.send_errors)),
            "drain after the send phase: %.2f s%s" % (self.drain_seconds, "" if self.drained else " (TIMED OUT)"),
        ]


class LoadTest:
    def __init__(self, reactor, address, clients, seconds, seed, drain_timeout, keys, pause, disconnect_every,
                 offline, max_recipients, say):
        self.reactor, self.address = reactor, address
        self.seconds, self.drain_timeout = seconds, drain_timeout
        self.rng = random.Random(seed)
        self.keys = keys
        self.pause, self.disconnect_every, self.offline = pause, disconnect_every, offline
        self.max_recipients = max_recipients
        self.say = say or (lambda text: None)
        self.members = []
        self.result = LoadResult(clients, seconds)
        self.accepted = {}  # message id hex -> (sender, recipients)
        self.stop_sending = False
        self.stop_chaos = False
        self.closing = False
        self.deadline = None
        self._tasks = set()
        self.count = clients

    def sleep(self, seconds):
        return task.deferLater(self.reactor, max(0.0, seconds), lambda: None)

    def spawn(self, coroutine):
        d = defer.Deferred.fromCoroutine(coroutine)
        self._tasks.add(d)

        def done(result):
            self._tasks.discard(d)
            return result
        d.addBoth(done)
        d.addErrback(lambda f: None if f.check(defer.CancelledError) else self.result.send_errors.append(
            "task failed: %s: %s" % (f.type.__name__, f.getErrorMessage())))
        return d

    # -- connections --

    def _wire(self, member, client):
        client.on_message = member.on_message
        client.on_receipt = member.on_receipt
        client.on_rejected = member.on_rejected
        client.on_disconnect = lambda error: self._lost(member, client)

    def _lost(self, member, client):
        if member.client is client:
            member.client = None
            member.online = False
            if not self.closing:
                self.spawn(self._reconnect(member))

    async def _connect(self, member):
        client = await pager.PagerClient.connect(self.address, self.reactor, seen=member.seen, pins=member.pins)
        self._wire(member, client)  # before logging in: pending messages come at once
        return client

    async def _reconnect(self, member):
        await self.sleep(member.offline_until - self.reactor.seconds())
        for _ in range(100):
            if self.closing:
                return
            client = None
            try:
                client = await self._connect(member)
                await client.login(member.name, TOKEN, member.key, receive=True)
            except defer.CancelledError:
                if client is not None:
                    await client.close()
                raise
            except Exception as e:  # refused, reset, timed out, or an error answer while the server is busy
                if client is not None:
                    await client.close()
                self.say("reconnecting %s failed (%s); trying again" % (member.name, e))
                await self.sleep(0.1)
                continue
            if self.closing:
                await client.close()
                return
            member.client, member.online = client, True
            member.connects += 1
            self.result.reconnects += 1
            return
        self.result.send_errors.append("%s could not reconnect" % member.name)

    def _drop(self, member):
        client = member.client
        if client is None:
            return
        member.offline_until = self.reactor.seconds() + self.rng.uniform(*self.offline)
        self.result.disconnects += 1
        if self.rng.random() < 0.5:
            self.result.abrupt += 1
            client.protocol.transport.abortConnection()  # no FIN: in-flight requests and acks are cut off
        else:
            client.close()

    # -- the work --

    async def _sender(self, member):
        others = [m.name for m in self.members if m is not member]
        n = 0
        while True:
            if self.reactor.seconds() > self.deadline:
                return
            if member.outbox is None and self.stop_sending:
                return
            client = member.client
            if client is None or not member.online or client.protocol.lost is not None:
                # A lost connection fails its pending requests before it tells its listener: wait for the
                # reconnection instead of retrying on the dead client (its requests fail at once, forever).
                await self.sleep(0.02)
                continue
            if member.outbox is None:
                names = sorted(self.rng.sample(others, self.rng.randint(1, min(self.max_recipients, len(others)))))
                n += 1
                text = "%s #%d to %s: %s" % (member.name, n, ",".join(names), "x" * self.rng.randint(0, 300))
                try:
                    # Sealed to every device of the recipients, as the server's bundles give them now.
                    _, envelope = await client.seal(names, text.encode("utf-8"))
                except (pager.ConnectionLost, pager.ProtocolError) as e:
                    if isinstance(e, pager.ConnectionLost) or client is not member.client:
                        continue
                    self.result.send_errors.append("bundles of %s: %s" % (names, e))
                    return
                msg = pager.parse_header(envelope.header).message_id.hex()
                member.outbox = (names, envelope, msg)
                self.result.sent += 1
            else:
                self.result.resends += 1
            names, envelope, msg = member.outbox
            try:
                answer = await client.send_envelope(names, envelope)
            except pager.ConnectionLost:
                continue  # maybe accepted, maybe not: the same envelope goes again after the reconnection
            except pager.PagerError as e:
                if client.protocol.lost is not None:
                    continue  # the connection went while sending
                self.result.send_errors.append("send %s to %s: %s" % (msg, names, e))
                member.outbox = None
                continue
            if answer.get("msg") != msg:
                self.result.send_errors.append("answer for %s names %s" % (msg, answer.get("msg")))
            if answer.get("duplicate"):
                self.result.duplicate_answers += 1
            self.accepted[msg] = (member.name, names)
            member.outbox = None
            if self.pause:
                await self.sleep(self.rng.uniform(0, self.pause))

    async def _chaos(self):
        while not self.stop_chaos:
            await self.sleep(self.rng.uniform(*self.disconnect_every))
            if self.stop_chaos:
                return
            online = [m for m in self.members if m.online]
            if len(online) > len(self.members) // 2:
                self._drop(self.rng.choice(online))

    def _complete(self):
        """Every accepted message shown to each recipient and acknowledged (its sender holds the receipt)."""
        by_name = {m.name: m for m in self.members}
        for msg, (sender, names) in self.accepted.items():
            for name in names:
                if not by_name[name].shown[(sender, msg)] or not by_name[sender].receipts[(msg, name)]:
                    return False
        return True

    async def run(self):
        reactor = self.reactor
        if self.keys is None:
            pool = reactor.getThreadPool()
            self.keys = await defer.gatherResults(
                [threads.deferToThreadPool(reactor, pool, pager.generate_private_key) for _ in range(self.count)])
        tag = "%04x" % self.rng.randrange(1 << 16)
        self.members = [Member("load%s-%02d" % (tag, i), self.keys[i]) for i in range(self.count)]
        for member in self.members:
            client = await self._connect(member)
            await client.register(member.name, TOKEN, member.key)
            member.client, member.online = client, True
            member.connects += 1
        self.say("%d users registered; sending for %.1f s" % (len(self.members), self.seconds))
        start = reactor.seconds()
        self.deadline = start + self.seconds + self.drain_timeout
        senders = [self.spawn(self._sender(m)) for m in self.members]
        chaos = self.spawn(self._chaos())
        await self.sleep(self.seconds)
        self.stop_sending = True
        self.stop_chaos = True
        drain_start = reactor.seconds()
        await chaos
        await defer.DeferredList(senders)
        quiet = 0
        while reactor.seconds() < self.deadline:
            # Done once every delivery is confirmed and every client has been idle for a while: a resend that was
            # accepted again, or a redelivery after a lost ack, is then handled and acknowledged too.
            if all(m.online for m in self.members) and self._complete() and all(m.client.idle for m in self.members):
                quiet += 1
                if quiet >= 4:
                    self.result.drained = True
                    break
            else:
                quiet = 0
            await self.sleep(0.05)
        self.result.drain_seconds = reactor.seconds() - drain_start
        self.say("drained in %.2f s; final check" % self.result.drain_seconds)
        await self._close_all()
        await self._final_logins()
        self._account()
        return self.result

    async def _close_all(self):
        self.closing = True
        clients = [m.client for m in self.members if m.client is not None]
        for m in self.members:
            m.client, m.online = None, False
        for d in list(self._tasks):
            d.cancel()
        await defer.DeferredList([c.close() for c in clients])

    async def _final_logins(self):
        """Log every user in once more: the server must report nothing pending for anyone."""
        for member in self.members:
            client = await pager.PagerClient.connect(self.address, self.reactor, seen=member.seen, pins=member.pins)
            client.on_message, client.on_receipt = member.on_message, member.on_receipt
            try:
                pending = await client.login(member.name, TOKEN, member.key, receive=True)
                self.result.pending_after += pending
                for _ in range(100):  # anything still pending is handled (and counted) before closing
                    if client.processed >= pending:
                        break
                    await self.sleep(0.02)
            finally:
                await client.close()

    def _account(self):
        r = self.result
        by_name = {m.name: m for m in self.members}
        r.accepted = len(self.accepted)
        shown_keys = set()
        for msg, (sender, names) in self.accepted.items():
            for name in names:
                r.expected += 1
                times = by_name[name].shown[(sender, msg)]
                shown_keys.add((name, sender, msg))
                if times == 0:
                    r.lost += 1
                else:
                    r.delivered += 1
                if by_name[sender].receipts[(msg, name)]:
                    r.acked += 1
        for m in self.members:
            r.duplicates_suppressed += m.seen.suppressed
            r.rejected += len(m.rejected)
            r.receipt_duplicates += sum(n - 1 for n in m.receipts.values() if n > 1)
            for (sender, msg), times in m.shown.items():
                if times > 1:
                    r.shown_twice += 1
                if (m.name, sender, msg) not in shown_keys:
                    r.unexpected += 1
            if m.outbox is not None:
                r.unresolved += 1


async def run_load(reactor, address, clients=6, seconds=3.0, seed=None, drain_timeout=30.0, keys=None, pause=0.01,
                   disconnect_every=(0.05, 0.3), offline=(0.02, 0.4), max_recipients=3, say=None):
    """
    Run the scenario against the pager server at C{address} (a client endpoint string such as
    C{tcp:127.0.0.1:5050}) on C{reactor}; returns a L{LoadResult}.  Every connection is closed when it returns.

    @param keys: optional RSA private keys, one per client (generated when not given).
    @param disconnect_every: a (low, high) range of seconds between two random disconnections.
    @param offline: a (low, high) range of seconds a disconnected client stays away.
    """
    test = LoadTest(reactor, address, clients, seconds, seed, drain_timeout, keys, pause, disconnect_every, offline,
                    max_recipients, say)
    return await test.run()


# -- the command line --

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pager loss accounting under random disconnections")
    p.add_argument("--clients", type=int, help="users (default 20; quick 6)")
    p.add_argument("--seconds", type=float, help="seconds of sending (default 30; quick 5)")
    p.add_argument("--quick", action="store_true", help="a smoke run well under a minute")
    p.add_argument("--full", action="store_true", help="the full run (the default)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--server", choices=["subprocess", "inprocess"], default="subprocess",
                   help="run the server in its own process (default) or in this process's reactor")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="longest drain after the send phase")
    p.add_argument("--key-cache", default=None, help="file caching the benchmark's RSA keys ('' for none)")
    args = p.parse_args(argv)
    args.clients = args.clients or (6 if args.quick else 20)
    args.seconds = args.seconds or (5.0 if args.quick else 30.0)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def main(argv=None):
    sys.path.insert(0, HERE)
    import benchlib as bl

    args = parse_args(argv)
    report = bl.Report("load", args.json)
    keys = bl.load_keys(args.clients, cache=args.key_cache)
    work = bl.workdir("pager-load-")
    outcome = {}

    async def scenario(reactor):
        server = None
        if args.server == "subprocess":
            server = bl.start_pager(work)
            address = "tcp:%s:%d" % (bl.LOOPBACK, server.port)
            pid = server.pid
        else:
            options = pager.ServerOptions()
            options.parseOptions(["--listen", "tcp:0:interface=%s" % bl.LOOPBACK, "--db",
                                  os.path.join(work, "bench.db")] + bl.PAGER_BENCH_ARGS)
            service = pager.makeService(options, reactor)
            service.startService()
            port = await service.ready
            address = "tcp:%s:%d" % (bl.LOOPBACK, port.getHost().port)
            pid = None
        cpu = bl.CpuMeter(pid)
        try:
            outcome["result"] = await run_load(reactor, address, args.clients, args.seconds, args.seed,
                                               args.drain_timeout, keys, say=bl.log)
        finally:
            outcome["cpu"] = cpu.stop()
            if server is not None:
                server.stop()
            else:
                await service.stopService()

    from twisted.internet import reactor
    try:
        d = defer.Deferred.fromCoroutine(scenario(reactor))
        d.addErrback(lambda f: outcome.__setitem__("failure", f))
        d.addBoth(lambda _: reactor.stop())
        limit = reactor.callLater(args.seconds + args.drain_timeout + 300, reactor.stop)
        reactor.run()
        if limit.active():
            limit.cancel()
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    if "failure" in outcome:
        outcome["failure"].printTraceback(file=sys.stderr)
        return 2
    if "result" not in outcome:
        sys.stderr.write("load: did not finish in time\n")
        return 2
    r = outcome["result"]
    for line in r.lines():
        report.say(line)
    report.say(bl.cpu_text(outcome["cpu"], max(1, r.expected), "delivery"))
    report.row("messages sent", r.sent, "msgs")
    report.row("messages accepted", r.accepted, "msgs")
    report.row("deliveries expected (accepted x recipients)", r.expected, "deliveries")
    report.row("deliveries shown once", r.delivered, "deliveries")
    report.row("deliveries acknowledged (receipts)", r.acked, "deliveries", target="= expected",
               passed=r.acked == r.expected)
    report.row("duplicates suppressed by the clients", r.duplicates_suppressed, "msgs")
    report.row("resends after a lost answer", r.resends, "sends")
    report.row("random disconnections", r.disconnects, "disconnects")
    report.row("lost", r.lost, "deliveries", target="= 0", passed=r.lost == 0)
    report.row("shown twice", r.shown_twice, "deliveries", target="= 0", passed=r.shown_twice == 0)
    report.row("pending on the server at the end", r.pending_after, "deliveries", target="= 0",
               passed=r.pending_after == 0)
    report.row("sends without an answer at the end", r.unresolved, "sends", target="= 0", passed=r.unresolved == 0)
    report.row("drain after the send phase", r.drain_seconds, "s")
    report.note("seed %d; server %s%s" % (args.seed, args.server, "" if args.server == "inprocess" else
                                          " (its own process)"))
    report.note(bl.RAISED_LIMITS_NOTE)
    report.note("Each user sends one message at a time (1 to 3 random recipients, up to 300 bytes) through "
                "pager.PagerClient, keeps the envelope until the server answers, and resends the same envelope "
                "after a reconnection when the answer was lost. A random online user is disconnected every "
                "0.05-0.3 s (half abruptly, with a TCP reset) and comes back after 0.02-0.4 s; at most half are "
                "offline at once. Each user's pager.MemorySeen survives its reconnections.")
    if r.send_errors:
        report.note("send errors: %s" % "; ".join(r.send_errors[:5]))
    report.finish()
    return 0 if r.lost == 0 and r.shown_twice == 0 and r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
