"""
The client library against servers of another protocol version or that misbehave: the version check of C{hello},
closing a connection the server never reads, and a C{users} listing that never ends or carries bad counts.
"""

import json
import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

import pager
from tests import test_output, test_server
from tests.test_cli import CLITestCase
from tests.test_output import SERVER_ID


def hello(**fields):
    frame = {"type": "hello", "protocol": pager.PROTOCOL_VERSION, "server": "pager/test", "server_id": SERVER_ID,
             "challenge": pager.b64(b"\x01" * pager.CHALLENGE_SIZE), "limits": pager.Limits().public()}
    frame.update(fields)
    return frame


class _AbortableTransport(StringTransport):
    """A transport whose peer never reads: C{loseConnection} never completes, C{abortConnection} does at once."""

    aborted = 0

    def abortConnection(self):
        self.aborted += 1
        self.connected = False
        self.protocol.connectionLost(Failure(ConnectionAbortedError()))


def connected(frame=None):
    """A client protocol on an L{_AbortableTransport} that has read C{frame} (a hello by default)."""
    proto = pager.PagerClientProtocol()
    transport = _AbortableTransport()
    transport.protocol = proto
    proto.makeConnection(transport)
    proto.dataReceived(pager.encode_frame(frame or hello()) + b"\n")
    return proto, transport


class VersionTests(unittest.SynchronousTestCase):
    """Each side refuses the other's protocol version with a sentence that says what to do."""

    def refusal(self, version):
        proto, transport = connected(hello(protocol=version))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionResetError()))
        return self.failureResultOf(proto.hello, pager.BadRequest).value.message

    def test_older_server(self):
        """A server of protocol version 1: the client closes, naming both versions and saying to upgrade the server."""
        message = self.refusal(1)
        self.assertIn("protocol version 1", message)
        self.assertIn("version %d" % pager.PROTOCOL_VERSION, message)
        self.assertIn("upgrade the server", message)

    def test_newer_server(self):
        """A server of a later version: the client closes, saying to upgrade this client."""
        message = self.refusal(pager.PROTOCOL_VERSION + 1)
        self.assertIn("protocol version %d" % (pager.PROTOCOL_VERSION + 1), message)
        self.assertIn("upgrade this client", message)

    def test_no_version(self):
        """A hello with no usable version (missing, a string, a boolean) is refused naming the version spoken."""
        for version in (None, "2", True, 2.0):
            message = self.refusal(version)
            self.assertIn("version %d" % pager.PROTOCOL_VERSION, message, version)
            self.assertIn("names no protocol version", message, version)



class ServerVersionTests(test_server.ServerTestCase):

    def test_version_two(self):
        """
        The proofs name the server since version 2 (and pager 0.2.0), and the server's hello says so: a client of
        version 1, which checks the hello's version, closes instead of signing a proof without the server id that
        would be refused and charged to its address as a failed login.
        """
        self.assertEqual((pager.PROTOCOL_VERSION, pager.__version__), (4, "0.5.5"))
        hello = self.connect().hello
        self.assertEqual((hello["protocol"], hello["server"]), (4, "pager/0.5.5"))


class VersionCommandTests(CLITestCase):
    """What a user sees of a server of another version."""

    listen = test_output.HostileServerTests.listen
    alice_home = test_output.HostileServerTests.alice_home
    run_as_alice = test_output.HostileServerTests.run_as_alice

    async def test_old_server(self):
        """users at a server of protocol version 1: exit 6, one line naming both versions and what to upgrade."""
        self.listen(hello={"protocol": 1})
        result = await self.run_as_alice("users")
        line = self.assertOneErrorLine(result, pager.EXIT_NETWORK)
        self.assertIn("protocol version 1", line)
        self.assertIn("version %d" % pager.PROTOCOL_VERSION, line)
        self.assertIn("upgrade the server", line)


class CloseTests(unittest.SynchronousTestCase):
    """L{pager.PagerClient.close} never waits for ever for a server that does not read."""

    def test_close_aborts_after_grace(self):
        """A close the server never lets complete is aborted CLOSE_GRACE seconds later; the Deferred then fires."""
        proto, transport = connected()
        clock = MemoryReactorClock()
        client = pager.PagerClient(proto, reactor=clock)
        d = client.close()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        clock.advance(pager.CLIENT_CLOSE_GRACE - 0.1)
        self.assertNoResult(d)
        self.assertEqual(transport.aborted, 0)
        clock.advance(0.1)
        self.assertEqual(transport.aborted, 1)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_in_time_not_aborted(self):
        """A close the server lets complete in time cancels the abort; closing twice schedules one abort."""
        proto, transport = connected()
        clock = MemoryReactorClock()
        client = pager.PagerClient(proto, reactor=clock)
        d = client.close()
        client.close()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        transport.connected = False
        proto.connectionLost(Failure(ConnectionResetError()))
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(transport.aborted, 0)


class _DeafServer(protocol.Protocol):
    """Greets like pager, then never reads a byte."""

    def connectionMade(self):
        self.transport.write(pager.encode_frame(hello()) + b"\n")
        self.transport.pauseProducing()


class DeafServerTests(unittest.TestCase):
    """A real loopback connection to a server that stops reading: the client's close still ends promptly."""

    async def test_close_ends(self):
        """With 64 MiB written and unread, close() ends within CLIENT_CLOSE_GRACE + 2 s, by aborting."""
        factory = protocol.Factory.forProtocol(_DeafServer)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await pager.PagerClient.connect("tcp:127.0.0.1:%d" % port.getHost().port, reactor, timeout=5)
        client.protocol.transport.write(b"\n" * (64 << 20))  # blank lines, which a pager server would skip
        started = reactor.seconds()
        d = client.close()
        d.addTimeout(pager.CLIENT_CLOSE_GRACE + 2, reactor)
        await d
        self.assertGreaterEqual(reactor.seconds() - started, pager.CLIENT_CLOSE_GRACE - 0.5)


class UsersTests(unittest.SynchronousTestCase):
    """L{pager.PagerClient.users} reads a bounded listing, and checks the counts it is given."""

    def setUp(self):
        self.proto, self.transport = connected()
        self.client = pager.PagerClient(self.proto, reactor=MemoryReactorClock())
        self.transport.clear()

    def answer(self, **fields):
        """Answer the one request sent since the last answer with C{fields}; return that request."""
        [request] = [json.loads(line) for line in self.transport.value().splitlines() if line.strip()]
        self.transport.clear()
        self.proto.dataReceived(pager.encode_frame(dict(fields, type="ok", id=request["id"])) + b"\n")
        return request

    def page(self, names, count, following, online_count=0):
        return self.answer(registered=names, online=[], count=count, online_count=online_count, next=following)

    def test_bad_counts(self):
        """count and online_count must be non-negative integers: a string, a float, a bool, -1 or none is refused."""
        for bad in ("3", 3.0, True, -1, None, [3]):
            for field in ("count", "online_count"):
                d = defer.Deferred.fromCoroutine(self.client.users())
                fields = {"registered": ["bob"], "online": [], "count": 1, "online_count": 0, "next": None}
                fields[field] = bad
                if bad is None:
                    del fields[field]
                self.answer(**fields)
                self.assertIn(field, self.failureResultOf(d, pager.BadRequest).value.message)

    def test_online_not_among_registered(self):
        """An online name that is not in the page's registered names is refused."""
        d = defer.Deferred.fromCoroutine(self.client.users())
        self.answer(registered=["bob"], online=["carol"], count=1, online_count=1, next=None)
        self.failureResultOf(d, pager.BadRequest)

    def test_stops_at_count(self):
        """Once the names read reach the answer's count, the listing ends even if the server offers more."""
        d = defer.Deferred.fromCoroutine(self.client.users())
        self.page(["a1", "a2"], 4, "a2")
        request = self.page(["a3", "a4"], 4, "a4")
        self.assertEqual(request["after"], "a2")
        self.assertEqual(self.successResultOf(d), ([], ["a1", "a2", "a3", "a4"]))
        self.assertEqual(self.transport.value(), b"")

    def test_next_must_advance(self):
        """A next that is not the page's last name, or does not sort after the previous one, is refused."""
        d = defer.Deferred.fromCoroutine(self.client.users())
        self.page(["b"], 10, "b")
        self.page(["a"], 10, "a")
        self.failureResultOf(d, pager.BadRequest)
        d = defer.Deferred.fromCoroutine(self.client.users())
        self.page(["b"], 10, "c")
        self.failureResultOf(d, pager.BadRequest)

    def test_page_cap(self):
        """A server raising its count as it goes, one name a page, is stopped at MAX_USERS_PAGES pages."""
        d = defer.Deferred.fromCoroutine(self.client.users())
        for number in range(pager.MAX_USERS_PAGES):
            self.assertNoResult(d)
            self.page(["u%07d" % number], number + 2, "u%07d" % number)
        message = self.failureResultOf(d, pager.BadRequest).value.message
        self.assertIn("10,000 pages", message)
        self.assertEqual(self.transport.value(), b"")

    def test_name_cap(self):
        """A listing past MAX_USERS_LISTED names is stopped, whatever the count says."""
        self.patch(pager, "MAX_USERS_LISTED", 2500)
        d = defer.Deferred.fromCoroutine(self.client.users())
        for number in range(3):
            self.assertNoResult(d)
            names = ["u%07d" % i for i in range(number * 1000, number * 1000 + 1000)]
            self.page(names, 10 ** 9, names[-1])
        message = self.failureResultOf(d, pager.BadRequest).value.message
        self.assertIn("2,500 names", message)
        self.assertEqual(self.transport.value(), b"")


class SettledTests(unittest.SynchronousTestCase):
    """What a cumulative ack may cover: the settled messages at the front of the push order, nothing past a gap."""

    def test_prefix_stops_at_unsettled(self):
        settled = pager._Settled()
        for seq, msg in ((3, "a"), (7, "b"), (9, "c"), (12, "d")):
            settled.pushed(seq, msg)
        settled.settle("a")
        settled.settle("c")
        self.assertEqual(settled.take_prefix(), (3, {"a"}))
        self.assertEqual(settled.take_prefix(), (None, set()))  # "b" is open: "c" waits behind it
        settled.settle("b")
        settled.settle("unknown")  # never pushed on this connection: nothing to settle
        self.assertEqual(settled.take_prefix(), (9, {"b", "c"}))
        settled.settle("d")
        self.assertEqual(settled.take_prefix(), (12, {"d"}))

    def test_no_number_or_no_order_means_lists(self):
        """A push without seq, or one whose seq does not increase, stops cumulative acks for the connection."""
        for pushes in (((5, "a"), (None, "b")), ((5, "a"), (5, "b")), ((5, "a"), (4, "b"))):
            settled = pager._Settled()
            for seq, msg in pushes:
                settled.pushed(seq, msg)
            settled.settle("a")
            settled.settle("b")
            self.assertTrue(settled.broken)
            self.assertEqual(settled.take_prefix(), (None, set()))

    def test_bounded(self):
        """Behind an open message at most MAX are tracked; past it the connection acknowledges by lists."""
        settled = pager._Settled()
        for n in range(pager._Settled.MAX + 1):
            settled.pushed(n + 1, "m%d" % n)
        self.assertTrue(settled.broken)
        settled.settle("m0")
        self.assertEqual(settled.take_prefix(), (None, set()))
