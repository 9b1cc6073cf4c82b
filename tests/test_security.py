"""
Attacks on a running pager server, and faults it must survive.

Most tests run a real server in this process on a loopback port, with a logged-in "witness": alice and bob, two
PagerClients that must still ping and still get a message through after each attack (L{SecurityTestCase.witness_ok}).
Attackers are raw TCP peers (L{Peer}) that write whatever they like and record every line the server sends back;
each line must be valid JSON.  Time-dependent rules (throttling, idle timeouts) are also checked on a server driven
by a MemoryReactorClock, as in tests/test_server.py.  The fault tests run the server as a child process and kill it,
or break its database under it.

Nothing sleeps: every wait polls with task.deferLater and gives up after a bound.
"""

import base64
import collections
import hashlib
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import sys
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, endpoints, error, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent, globalLogPublisher

import pager
from tests import test_server
from tests.test_cli import CLITestCase, Child, base_env
from tests.test_e2e import free_port, key, token
from tests.test_server import device_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGER_PY = os.path.join(REPO, "pager.py")
LISTEN = "tcp:0:interface=127.0.0.1"
MiB = 1024 * 1024
PROPERTY = settings(max_examples=300, deadline=None, database=None)


def rss():
    """This process's resident memory in bytes now (VmRSS), or its peak if /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def b64(data):
    return base64.b64encode(data).decode("ascii")


async def read_elsewhere(testcase, *paths):
    """
    The bytes of the files at C{paths} (missing ones read as empty), read by a child process.  A database file that
    this process's server has open must not be opened and closed here: closing any descriptor of a file drops
    every POSIX lock this process holds on it, SQLite's included, and another process (an admin command) could
    then take the database for unused and remove its WAL.
    """
    script = ("import os, sys\n"
              "for p in sys.argv[1:]:\n"
              "    if os.path.exists(p):\n"
              "        sys.stdout.buffer.write(open(p, 'rb').read())\n")
    paths = [os.path.abspath(p) for p in paths]
    child = testcase.spawn([sys.executable, "-c", script] + paths, base_env())
    result = await testcase.finish(child, "reading %s" % ", ".join(paths))
    testcase.assertEqual(result.code, 0, result)
    return bytes(child.out)


class Peer(protocol.Protocol):
    """
    A raw TCP peer: writes whatever it is told, records every line the server sends (parsed; a line that is not a
    JSON object is kept in C{invalid}), and tracks the latest challenge so it can sign a login.  It registers itself
    as a streaming producer, so C{paused} says when its own writes back up.
    """

    def __init__(self):
        self.buffer = b""
        self.frames = []
        self.invalid = []
        self.received = 0
        self.lost = None
        self.paused = False
        self.challenge = None

    def connectionMade(self):
        self.transport.registerProducer(self, True)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.paused = True

    def dataReceived(self, data):
        self.received += len(data)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                frame = json.loads(line)
            except ValueError:
                frame = None
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                self.invalid.append(line)
                continue
            if isinstance(frame.get("challenge"), str):
                self.challenge = base64.b64decode(frame["challenge"])
            self.frames.append(frame)

    def connectionLost(self, reason):
        self.lost = reason

    def write_line(self, line):
        self.transport.write(line + b"\n")

    def write(self, frame):
        self.write_line(json.dumps(frame, separators=(",", ":")).encode("utf-8"))

    def errors(self, since=0):
        return [f for f in self.frames[since:] if f["type"] == "error"]

    def answer(self, rid):
        for frame in self.frames:
            if frame["type"] in ("ok", "error") and frame.get("id") == rid and type(frame.get("id")) is type(rid):
                return frame
        return None


class SecurityTestCase(CLITestCase):
    """A server with a witness (alice and bob, logged in), raw peers, and helpers to check answers."""

    async def start(self, *args, witness=True, db=None, bind=None):
        """
        Start a server with extra command-line C{args}; sets C{self.server} and C{self.port}.  With C{witness},
        alice and bob log in (registering unless they already exist), from C{bind} if given.
        """
        options = pager.ServerOptions()
        options.parseOptions(["--listen", LISTEN, "--db", db or self.mktemp()] + list(args))
        self.server = pager.makeService(options, reactor)
        self.server.startService()
        self.addCleanup(self.stop_server, self.server)
        self.port = (await self.server.ready).getHost().port
        self.address = "tcp:host=127.0.0.1:port=%d" % self.port
        if bind is not None:
            self.address += ":bindAddress=" + bind
        if witness:
            self.alice = await self.witness_login("alice")
            self.bob = await self.witness_login("bob")
        return self.server

    async def witness_login(self, name):
        if await self.server.store.get_user(name) is None:
            await self.provision(name)
        return await self.login(self.address, name)

    async def provision(self, name, private_key=None):
        """Create the account C{name} straight in the server's store (with its module key and token)."""
        public = (private_key or key(name)).public_key()
        salt = os.urandom(pager.ARGON2_SALT_SIZE)
        await self.server.store.add_user(name, pager.public_key_pem(public), pager.fingerprint(public), salt,
                                         pager.hash_token(token(name), salt), reactor.seconds())

    async def witness_ok(self, label="still here"):
        """The witness still works: alice pings, and a message from her reaches bob, verified."""
        await self.alice.ping()
        count = len(self.bob.events.messages)
        msg = await self.alice.send("bob", label)
        await self.wait_for(lambda: len(self.bob.events.messages) > count, "bob to get %r" % label)
        self.assertOpened(self.bob.events.messages[-1], "alice", label.encode(), msg)

    async def peer(self, bind=None, hello=True):
        """A raw peer connected to the server; waits for its first line (hello, or an error) unless told not to."""
        peer = Peer()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port,
                                                bindAddress=(bind, 0) if bind else None)
        await endpoints.connectProtocol(endpoint, peer)
        self.addCleanup(self.drop, peer)
        if hello:
            await self.wait_for(lambda: peer.frames or peer.lost, "the server's first line")
        return peer

    async def drop(self, peer):
        if peer.lost is None:
            peer.transport.abortConnection()
            await self.wait_for(lambda: peer.lost is not None, "a raw connection to close")
        self.assertEqual(peer.invalid, [], "the server sent lines that are not JSON objects")

    async def answer(self, peer, rid, what=None):
        return await self.wait_for(lambda: peer.answer(rid), what or "the answer to request %r" % (rid,))

    async def request(self, peer, kind, rid, **fields):
        frame = {"type": kind, "id": rid}
        frame.update(fields)
        peer.write(frame)
        return await self.answer(peer, rid)

    async def peer_login(self, peer, name, rid="login"):
        proof = pager.sign_auth(key(name), "login", self.server.factory.server_id, name, peer.challenge)
        answer = await self.request(peer, "login", rid, user=name, token=token(name), proof=b64(proof))
        self.assertEqual(answer["type"], "ok", answer)
        return answer

    async def logged_in_peer(self, name="alice"):
        peer = await self.peer()
        await self.peer_login(peer, name)
        return peer

    async def assertAlive(self, peer, rid="alive"):
        """The raw peer's connection is open and answers a ping."""
        self.assertIsNone(peer.lost)
        self.assertEqual(await self.request(peer, "ping", rid), {"type": "ok", "id": rid})

    def assertError(self, frame, code, rid=None):
        self.assertEqual((frame["type"], frame.get("code")), ("error", code), frame)
        self.assertIsInstance(frame["message"], str)
        self.assertTrue(frame["message"])
        if rid is None:
            self.assertNotIn("id", frame)
        else:
            self.assertEqual(frame["id"], rid)
        return frame

    async def assertLineRefused(self, peer, line, rid=None):
        """The raw line gets exactly one bad_request (with C{rid}, or no id), and the connection goes on."""
        count = len(peer.frames)
        peer.write_line(line)
        await self.wait_for(lambda: len(peer.frames) > count, "the answer to %r" % line[:40])
        [frame] = peer.frames[count:]
        self.assertError(frame, "bad_request", rid)
        await self.assertAlive(peer, "after-%d" % count)
        return frame

    async def assertClosedTooLarge(self, peer):
        await self.wait_for(lambda: peer.lost is not None, "the server to close the connection")
        [frame] = peer.errors()
        self.assertError(frame, "too_large")
        return frame

    def user_names(self):
        return self.server.store.user_names()


# Every field of every request, and values of the wrong JSON type for it.  Each row: (request type, base fields,
# field, wrong values).  The base fields are well formed, so the field under test is what the server refuses.

_STRING = [7, -1.5, True, None, [], {}, ["alice"]]
_OPTIONAL_STRING = [7, -1.5, True, False, [], {}, ["x"]]
_INTEGER = ["5", 5.5, True, None, [], {}, [5]]
_BOOLEAN = ["yes", 1, 0, None, [], {}, "true"]
_LIST = ["bob", 7, True, None, {}, [7], [None], [["bob"]], [{}]]
_OPTIONAL_LIST = ["bob", 7, True, {}, [7], [None], [["x"]], [{}]]


def _wrong_type_rows(envelope):
    proof = b64(b"\0" * 256)
    register = {"user": "mallory", "public_key": pager.public_key_pem(key("mallory")), "token": "x" * 10,
                "proof": proof}
    login = {"user": "alice", "token": "x" * 10, "proof": proof, "receive": True}
    rekey = {"user": "alice", "token": "x" * 10, "public_key": pager.public_key_pem(key("mallory")),
             "proof_old": proof, "proof_new": proof}
    recover = {"user": "alice", "token": "x" * 10, "public_key": pager.public_key_pem(key("mallory")),
               "proof": proof}
    send = {"to": ["bob"], "size": envelope.size, "header": b64(envelope.header),
            "chunks": [b64(c) for c in envelope.chunks], "signature": b64(envelope.signature)}
    msg = pager.parse_header(envelope.header).message_id.hex()
    before_login = [
        ("register", register, "user", _STRING), ("register", register, "public_key", _STRING),
        ("register", register, "token", _STRING), ("register", register, "proof", _STRING),
        ("register", register, "invite", _OPTIONAL_STRING),
        ("login", login, "user", _STRING), ("login", login, "token", _STRING), ("login", login, "proof", _STRING),
        ("login", login, "receive", _BOOLEAN),
        ("rekey", rekey, "user", _STRING), ("rekey", rekey, "token", _STRING),
        ("rekey", rekey, "public_key", _STRING), ("rekey", rekey, "proof_old", _STRING),
        ("rekey", rekey, "proof_new", _STRING),
        ("recover", recover, "user", _STRING), ("recover", recover, "token", _STRING),
        ("recover", recover, "public_key", _STRING), ("recover", recover, "proof", _STRING),
    ]
    after_login = [
        ("key", {"user": "bob"}, "user", _STRING),
        ("send", send, "to", _LIST), ("send", send, "size", _INTEGER), ("send", send, "header", _STRING),
        ("send", send, "chunks", _OPTIONAL_LIST), ("send", send, "signature", _OPTIONAL_STRING),
        ("ack", {"msg": msg}, "msg", _STRING), ("ack", {"receipt": 1}, "receipt", _INTEGER),
        ("reject", {"msg": msg, "reason": "no"}, "msg", _STRING),
        ("reject", {"msg": msg, "reason": "no"}, "reason", _STRING),
    ]
    return before_login, after_login


class BadInputTests(SecurityTestCase):
    """Malformed input gets a clear error frame; oversize input gets too_large and a closed connection."""

    async def test_invalid_json(self):
        """Lines that are not JSON get bad_request without an id; the connection and the witness go on."""
        await self.start()
        peer = await self.peer()
        for line in (b"{", b'{"type":"ping","id":1', b"ping", b"{'type': 'ping'}", b'{"type":"ping",}',
                     b'{"type":"ping","id":1}{"type":"ping","id":2}', b"\x00", b'{"type":"ping","id":1,"x":NaN}'):
            await self.assertLineRefused(peer, line, rid=1 if b"NaN" in line else None)
        await self.witness_ok()

    async def test_not_an_object(self):
        """JSON values that are not objects (arrays, strings, numbers, null, booleans) get bad_request."""
        await self.start()
        peer = await self.peer()
        for line in (b"[]", b'"ping"', b"42", b"null", b"true", b'[{"type":"ping","id":1}]', b"-0.5e3"):
            await self.assertLineRefused(peer, line)
        await self.witness_ok()

    async def test_huge_numbers(self):
        """
        A 5000-digit integer (as a line, as an id, as a field), a 4000-digit one, and 1e999 (which Python reads as
        infinity) are refused with bad_request, never an internal error.
        """
        await self.start()
        peer = await self.peer()
        digits5000, digits4000 = b"9" * 5000, b"9" * 4000
        await self.assertLineRefused(peer, digits5000)
        await self.assertLineRefused(peer, b'{"type":"ping","id":' + digits5000 + b"}")
        await self.assertLineRefused(peer, b'{"type":"ping","id":' + digits4000 + b"}")
        await self.assertLineRefused(peer, b'{"type":"ping","id":1e999}')
        await self.assertLineRefused(peer, b'{"type":"ping","id":-1e999}')
        await self.assertLineRefused(peer, b"1e999")
        logged_in = await self.logged_in_peer()
        for value in (digits5000, b"-" + digits5000):
            await self.assertLineRefused(logged_in, b'{"type":"ack","id":"r","receipt":' + value + b"}")
        for i, value in enumerate((digits4000, b"1e999", b"-1e999", b"1E400")):
            rid = "n%d" % i
            await self.assertLineRefused(logged_in, b'{"type":"ack","id":"%s","receipt":%s}' % (rid.encode(), value),
                                         rid=rid)
            rid = "s%d" % i
            line = (b'{"type":"send","id":"%s","to":["bob"],"size":%s,"header":"AAAA","chunks":[]}'
                    % (rid.encode(), value))
            await self.assertLineRefused(logged_in, line, rid=rid)
        await self.witness_ok()

    async def test_deep_nesting(self):
        """
        Deeply nested JSON gets bad_request (10,000 brackets before login, 100,000 after login), and 100,000
        brackets before login, over the 16 KiB limit, get too_large and a closed connection.
        """
        await self.start()
        peer = await self.peer()
        await self.assertLineRefused(peer, b"[" * 10000)
        await self.assertLineRefused(peer, b'{"type":"ping","id":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}")
        logged_in = await self.logged_in_peer()
        await self.assertLineRefused(logged_in, b"[" * 100000)
        await self.assertLineRefused(logged_in, b'{"type":"ping","id":1,"x":' + b"{\"a\":" * 20000 + b"1"
                                     + b"}" * 20000 + b"}")
        oversize = await self.peer()
        oversize.write_line(b"[" * 100000)
        await self.assertClosedTooLarge(oversize)
        await self.witness_ok()

    async def test_wrong_types(self):
        """
        Every field of every request type, given a value of the wrong JSON type, gets bad_request naming that field,
        echoing the request id; as do wrong-typed ids (answered without an id) and types.  Nothing is registered,
        nobody is logged in, nothing is sent.
        """
        await self.start()
        envelope = pager.seal(key("alice"), "alice", {"bob": key("bob").public_key()}, b"wrong types")
        before_login, after_login = _wrong_type_rows(envelope)
        anonymous = await self.peer()
        logged_in = await self.logged_in_peer("alice")
        expected = {}
        for peer, rows in ((anonymous, before_login), (logged_in, after_login)):
            for kind, base, field, values in rows:
                for i, value in enumerate(values):
                    rid = "%s.%s.%d" % (kind, field, i)
                    frame = dict(base, type=kind, id=rid)
                    frame[field] = value
                    peer.write(frame)
                    expected[rid] = (peer, field, value)
        for rid, (peer, field, value) in expected.items():
            answer = await self.answer(peer, rid)
            self.assertError(answer, "bad_request", rid)
            message = answer["message"]
            self.assertTrue('"%s"' % field in message or (field in ("user", "to") and "User names" in message),
                            "%s = %r: %r" % (rid, value, message))

        for peer in (anonymous, logged_in):
            for i, rid in enumerate([True, 1.5, None, [], {}, "x" * 65, 2 ** 53 + 1, -2 ** 53 - 1]):
                count = len(peer.frames)
                peer.write({"type": "ping", "id": rid})
                await self.wait_for(lambda: len(peer.frames) > count, "the answer to a ping with id %r" % (rid,))
                self.assertError(peer.frames[count], "bad_request")
                self.assertIn('"id"', peer.frames[count]["message"])
            for i, kind in enumerate([7, None, [], {}, "Ping", "", "x" * 33, "ping!"]):
                rid = "type.%d" % i
                peer.write({"type": kind, "id": rid})
                self.assertError(await self.answer(peer, rid), "bad_request", rid)
            await self.assertAlive(peer)
        self.assertEqual(await self.user_names(), ["alice", "bob"])
        self.assertEqual(await self.pending(self.server, "bob"), [])
        self.assertEqual(sorted(self.server.factory.online), ["alice", "bob"])
        await self.witness_ok()

    async def test_wrong_types_in_chunk_frames(self):
        """A chunk frame of an upload in progress with a wrong-typed chunks or signature gets bad_request naming it."""
        await self.start()
        envelope = await self.device_envelope(self.address, "alice", ["bob"], os.urandom(3000), self.alice,
                                              chunk_size=1024)
        header = {"to": ["bob"], "size": envelope.size, "header": b64(envelope.header), "chunks": []}
        cases = [("chunks", v) for v in _OPTIONAL_LIST] + [("signature", v) for v in _OPTIONAL_STRING]
        for i, (field, value) in enumerate(cases):
            peer = await self.logged_in_peer("alice")  # a fresh connection each: see test_chunk_error_ends_upload
            rid = "chunk.%s.%d" % (field, i)
            peer.write(dict(header, type="send", id=rid))
            frame = {"type": "chunk", "id": rid, "chunks": [b64(envelope.chunks[0])]}
            frame[field] = value
            peer.write(frame)
            answer = self.assertError(await self.answer(peer, rid), "bad_request", rid)
            self.assertIn('"%s"' % field, answer["message"], (field, value))
            peer.transport.loseConnection()
            await self.wait_for(lambda: peer.lost is not None, "the connection to close")
        self.assertEqual(await self.pending(self.server, "bob"), [])
        await self.witness_ok()

    async def test_chunk_error_ends_upload(self):
        """
        An upload whose chunk frame was refused (here: a malformed signature) has had its one answer: it is over,
        so the connection can send another message at once, and further chunk frames with its id get no second
        answer (PROTOCOL.md 4.9).
        """
        await self.start()
        peer = await self.logged_in_peer("alice")
        envelope = await self.device_envelope(self.address, "alice", ["bob"], os.urandom(3000), self.alice,
                                              chunk_size=1024)
        peer.write({"type": "send", "id": "up", "to": ["bob"], "size": envelope.size,
                    "header": b64(envelope.header), "chunks": []})
        peer.write({"type": "chunk", "id": "up", "chunks": [b64(envelope.chunks[0])], "signature": 5})
        self.assertError(await self.answer(peer, "up"), "bad_request", "up")
        other = await self.device_envelope(self.address, "alice", ["bob"], b"next message", self.alice)
        answer = await self.request(peer, "send", "next", to=["bob"], size=other.size, header=b64(other.header),
                                    chunks=[b64(c) for c in other.chunks], signature=b64(other.signature))
        self.assertEqual(answer["type"], "ok", answer)
        # bob gets it before the witness's message is counted (its push may still be on its way after the ok)
        await self.wait_for(lambda: any(m.plaintext == b"next message" for m in self.bob.events.messages),
                            "bob to get the next message")
        await self.witness_ok()

    async def test_invalid_utf8(self):
        """Lines that are not UTF-8 (stray bytes, overlong forms, surrogates, cut sequences) get bad_request."""
        await self.start()
        peer = await self.peer()
        for line in (b'{"type":"ping","id":1,"x":"\xff\xfe"}', b'{"type":"ping","id":1,"x":"\xc0\xaf"}',
                     b'{"type":"ping","id":1,"x":"\xed\xa0\x80"}', b'{"type":"ping","id":1,"x":"\xe2\x82"}',
                     b"\x80", b'{"type":"p\xffing","id":1}'):
            await self.assertLineRefused(peer, line)
        await self.witness_ok()

    async def test_binary_garbage(self):
        """64 KiB of random bytes cut into lines: every non-blank line is answered bad_request; the connection lives."""
        await self.start()
        peer = await self.peer()
        await self.assertAlive(peer, "first")  # so the garbage is not the connection's first bytes (a TLS probe)
        rng = random.Random(20240611)
        lines = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"")
                 for _ in range(600)]
        expected = sum(1 for line in lines if line.strip())
        count = len(peer.frames)
        peer.transport.write(b"\n".join(lines) + b"\n")
        await self.wait_for(lambda: len(peer.frames) - count >= expected, "%d answers" % expected)
        await self.assertAlive(peer)
        answers = peer.frames[count:-1]
        self.assertEqual(len(answers), expected)
        for frame in answers:
            self.assertEqual((frame["type"], frame["code"]), ("error", "bad_request"), frame)
        await self.witness_ok()

    async def test_hundred_megabyte_line(self):
        """
        A peer streams a 100 MB line with no newline in 64 KiB pieces: the server answers too_large and closes the
        connection long before 100 MB are sent (the pre-login limit is 16 KiB), and its memory does not grow.
        """
        await self.start()
        limit = self.server.factory.limits.max_line_unauthenticated
        self.assertEqual(limit, 16 * 1024)
        before = rss()
        peer = await self.peer()
        piece = b"x" * 65536
        sent, deadline = 0, reactor.seconds() + 20
        while sent < 100 * 1000 * 1000 and peer.lost is None and not peer.errors():
            if reactor.seconds() > deadline:
                self.fail("streaming did not end within 20 s (sent %d bytes)" % sent)
            if not peer.paused:
                peer.transport.write(piece)
                sent += len(piece)
            await task.deferLater(reactor, 0)
        frame = await self.assertClosedTooLarge(peer)
        self.assertIn(str(limit), frame["message"])
        self.assertLess(sent, 4 * MiB, "the server let %d bytes of one line in" % sent)
        growth = rss() - before
        self.assertLess(growth, 50 * MiB, "the server's memory grew by %d bytes" % growth)
        await self.witness_ok()

    async def test_ten_thousand_lines(self):
        """
        10,000 small garbage lines in one write are each answered with bad_request (no id), the connection survives,
        and the server's memory does not grow.
        """
        await self.start()
        before = rss()
        peer = await self.peer()
        count = len(peer.frames)
        peer.transport.write(b"".join(b"garbage line %d\n" % i for i in range(10000)))
        await self.wait_for(lambda: len(peer.frames) - count >= 10000, "10,000 answers", tries=2000)
        for frame in peer.frames[count:]:
            self.assertEqual((frame["type"], frame["code"], "id" in frame), ("error", "bad_request", False), frame)
        await self.assertAlive(peer)
        self.assertEqual(len(peer.frames) - count, 10001)
        growth = rss() - before
        self.assertLess(growth, 50 * MiB, "the server's memory grew by %d bytes" % growth)
        await self.witness_ok()

    async def test_client_that_does_not_read(self):
        """
        A peer that writes short garbage lines and never reads the answers must not make the server hold the
        answers in memory without bound: 400,000 two-byte lines would be answered with about 30 MB.  The server
        has to stop reading from such a peer; here at most 8 MiB (kernel socket buffers included) may be written
        to it, however long it keeps sending.
        """
        await self.start()
        known = set(self.server.factory.protocols)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        [server_side] = await self.wait_for(lambda: set(self.server.factory.protocols) - known,
                                            "the server to take the connection")
        written = [0]
        original_write = server_side.transport.write

        def counting_write(data):
            written[0] += len(data)
            return original_write(data)
        server_side.transport.write = counting_write

        def flood():
            sock.setblocking(True)
            sock.settimeout(3.0)
            data = b"x\n" * 32768
            sent = 0
            try:
                for _ in range(400000 // 32768 + 1):
                    sock.sendall(data)
                    sent += len(data)
            except OSError:
                pass  # the server stopped reading (a timeout) or closed the connection: both fine
            return sent

        flooding = threads.deferToThread(flood)
        bound = 8 * MiB
        previous = -1
        for _ in range(1000):
            if written[0] > bound:
                break
            if flooding.called and written[0] == previous:
                break
            previous = written[0]
            await task.deferLater(reactor, 0.02)
        sent = await flooding
        sock.close()
        if server_side in self.server.factory.protocols:
            server_side.transport.abortConnection()  # a server that stopped reading may not notice the close soon
        self.assertLessEqual(written[0], bound, "the server wrote %d bytes of answers to a peer that read none of "
                                                "them (it sent %d bytes of requests)" % (written[0], sent))
        await self.wait_for(lambda: server_side not in self.server.factory.protocols, "the flood connection to end")
        await self.witness_ok()

    async def test_sql_and_path_names(self):
        """
        User names that look like SQL or paths are refused with bad_request wherever a name is taken (register,
        login, key, send); the users table is intact.  SQL in a free-text field (a reject reason) is stored and
        passed on verbatim.
        """
        await self.start()
        names = ["../../etc/passwd", "a'; DROP TABLE users;--", "alice' OR '1'='1", "alice\"; --", "..",
                 "/etc/passwd", "alice\x00", "alice%00", "robert'); DROP TABLE users;--"]
        anonymous = await self.peer()
        logged_in = await self.logged_in_peer("bob")
        proof = b64(b"\0" * 256)
        for i, name in enumerate(names):
            answer = await self.request(anonymous, "register", "r%d" % i, user=name, token="x" * 10, proof=proof,
                                        public_key=pager.public_key_pem(key("mallory")))
            self.assertError(answer, "bad_request", "r%d" % i)
            self.assertError(await self.request(anonymous, "login", "l%d" % i, user=name, token="x" * 10,
                                                proof=proof), "bad_request", "l%d" % i)
            self.assertError(await self.request(logged_in, "key", "k%d" % i, user=name), "bad_request", "k%d" % i)
            self.assertError(await self.request(logged_in, "send", "s%d" % i, to=[name], size=0, header="",
                                                chunks=[]), "bad_request", "s%d" % i)
        self.assertEqual(await self.user_names(), ["alice", "bob"])
        conn = sqlite3.connect(self.server.store.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT name FROM users ORDER BY name").fetchall(), [("alice",), ("bob",)])

        reason = "x'); DROP TABLE users; DELETE FROM messages; --"
        envelope = await self.device_envelope(self.address, "alice", ["bob"], b"to be refused", self.alice)
        await self.bob.close()
        await self.wait_for(lambda: len(self.server.factory.receivers.get("bob", ())) == 1,
                            "the witness bob to be offline")
        await self.alice.send_envelope(["bob"], envelope)
        await self.wait_for(lambda: [f for f in logged_in.frames if f["type"] == "message"], "bob's message")
        msg = pager.parse_header(envelope.header).message_id.hex()
        self.assertEqual((await self.request(logged_in, "reject", "rj", msg=msg, reason=reason))["type"], "ok")
        await self.wait_for(lambda: self.alice.events.receipts, "alice's receipt")
        self.assertEqual([(r.status, r.reason) for r in self.alice.events.receipts], [("rejected", reason)])
        self.assertEqual(conn.execute("SELECT name FROM users ORDER BY name").fetchall(), [("alice",), ("bob",)])
        self.bob = await self.login(self.address, "bob")
        await self.witness_ok()

    async def test_lookalike_names(self):
        """
        Names with Unicode look-alikes of ASCII letters (the Kelvin sign, fullwidth letters, Cyrillic a) are
        refused with bad_request, never folded to an existing account; nothing is registered.
        """
        await self.start()
        lookalikes = ["\u212aelvin", "\uff4belvin", "\uff41lice", "\u0430lice", "b\u043eb", "alic\u0435",
                      "\u0391lice", "a\u200blice", "\u00e5lice"]
        anonymous = await self.peer()
        logged_in = await self.logged_in_peer("bob")
        for i, name in enumerate(lookalikes):
            private = key("alice") if "lic" in name else key("bob")
            proof = b64(pager.sign_auth(private, "register", self.server.factory.server_id, "alice",
                                         anonymous.challenge))
            answer = await self.request(anonymous, "register", "r%d" % i, user=name, token=token("alice"),
                                        proof=proof, public_key=pager.public_key_pem(key("kelvin")))
            self.assertError(answer, "bad_request", "r%d" % i)
            proof = b64(pager.sign_auth(private, "login", self.server.factory.server_id, "alice", anonymous.challenge))
            answer = await self.request(anonymous, "login", "l%d" % i, user=name, token=token("alice"), proof=proof)
            self.assertError(answer, "bad_request", "l%d" % i)
            self.assertError(await self.request(logged_in, "key", "k%d" % i, user=name), "bad_request", "k%d" % i)
        self.assertEqual(await self.user_names(), ["alice", "bob"])
        self.assertEqual(sorted(self.server.factory.online), ["alice", "bob"])
        await self.witness_ok()


# -- property-based: arbitrary bytes and frames never break the framing layer or the server protocol --

_REQUEST_TYPES = ["register", "login", "rekey", "recover", "ping", "users", "key", "send", "chunk", "ack", "reject",
                  "hello", "ok", "message"]
_FIELDS = ["user", "token", "public_key", "proof", "proof_old", "proof_new", "receive", "invite", "to", "size",
           "header", "chunks", "signature", "msg", "receipt", "reason"]
_PLAUSIBLE = ["alice", "bob", "ALICE", "\u212aelvin", "00" * 16, "zz" * 16, "", "x" * 65, "AAAA", "***",
              b64(b"\0" * 256), b64(b"\0" * 2000), "correct horse battery staple", "../../etc/passwd",
              "a'; DROP TABLE users;--", "\ud800", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"]
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 64, max_value=2 ** 64),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_field_values = st.one_of(_json_values, st.sampled_from(_PLAUSIBLE), st.lists(st.sampled_from(_PLAUSIBLE), max_size=3))
_frames = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(_REQUEST_TYPES), _json_values)},
    optional=dict({"id": st.one_of(st.integers(-2 ** 54, 2 ** 54), st.text(max_size=70), _json_values)},
                  **{name: _field_values for name in _FIELDS}))


def _encode(frame):
    return json.dumps(frame).encode("utf-8", "surrogatepass")


_lines = st.lists(st.one_of(_frames.map(_encode), st.binary(max_size=300),
                            _json_values.map(_encode)), min_size=1, max_size=8)


class NonReadingPeerTests(SecurityTestCase):
    """
    Peers that send requests and never read the answers, over real loopback sockets: the server's buffered output
    for one stays bounded, and the connection is gone soon after it is cut off or times out.
    """

    GRACE = 0.5  # --close-grace in these tests

    async def start_with_users(self, *args):
        """A server (no witness) holding 1000 users with 32-character names: a users answer is about 35 KB."""
        await self.start("--close-grace", str(self.GRACE), *args, witness=False)
        await self.provision("alice")
        public = key("alice").public_key()
        pem, fp = pager.public_key_pem(public), pager.fingerprint(public)
        await defer.gatherResults([self.server.store.add_user(name, pem, fp, b"s" * 16, b"h" * 32, 0.0)
                                   for name in test_server.long_names(1000)])

    async def silent_peer(self):
        """
        A raw peer logged in as alice that then stops reading, and the server's side of its connection, which
        records when the server first closed it (C{closed_at}) and the most bytes its transport held at once
        (C{most_held}).
        """
        known = set(self.server.factory.protocols)
        peer = await self.peer()
        await self.peer_login(peer, "alice")
        [server_side] = set(self.server.factory.protocols) - known
        peer.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.transport.pauseProducing()
        transport = server_side.transport
        server_side.most_held = 0
        server_side.closed_at = None
        original_write, original_close = transport.write, server_side.close

        def write(data):
            original_write(data)
            held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            server_side.most_held = max(server_side.most_held, held)

        def close():
            if server_side.closed_at is None:
                server_side.closed_at = reactor.seconds()
            original_close()
        transport.write, server_side.close = write, close
        return peer, server_side

    def log_events(self):
        """The server's log events from now on, in a list that grows."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def cut_offs(self, events):
        """The unread byte counts of the connections the server cut off, from its log C{events}."""
        return [e["n"] for e in events if "bytes unread" in e.get("log_format", "")]

    async def gone(self, server_side, what):
        """Wait until the server closed C{server_side} and dropped it; the seconds from the close to the drop."""
        await self.wait_for(lambda: server_side.closed_at is not None, what)
        await self.wait_for(lambda: server_side not in self.server.factory.protocols,
                            "the connection to be gone after " + what)
        return reactor.seconds() - server_side.closed_at

    async def test_flood_cut_off(self):
        """
        3000 users requests and not one answer read: once 64 KiB wait in the transport the server reads no more of
        them, and past 1 MiB written while paused (64 answers of 35 KB may be in flight) it cuts the peer off with
        too_large: the transport never held more than 64 KiB + 1 MiB + one answer (1.1 MiB; without the bound all
        3000 answers, 100 MB, would wait in memory), and the connection is gone within close_grace (0.5 s) + 1 s of
        the cut-off.  Another peer is served throughout.
        """
        await self.start_with_users()
        peer, server_side = await self.silent_peer()
        events = self.log_events()
        peer.transport.write(b"".join(b'{"type":"users","id":%d}\n' % n for n in range(3000)))
        elapsed = await self.gone(server_side, "the cut-off")
        self.assertLess(elapsed, self.GRACE + 1.0)
        limits = self.server.factory.limits
        [unread] = self.cut_offs(events)
        self.assertGreater(unread, limits.max_unread_output)
        self.assertLessEqual(server_side.most_held, 64 * 1024 + limits.max_unread_output + 40 * 1024)
        await self.assertAlive(await self.peer())

    async def test_timed_out_peer_aborted(self):
        """
        With --max-in-flight 4 a peer that sends 300 users requests and reads nothing never passes the 1 MiB bound
        (at most 4 answers are written while its output is paused); the 2-second idle timeout closes it and, though
        its answers still wait in the transport, it is gone within close_grace (0.5 s) + 1 s of the timeout.
        """
        await self.start_with_users("--idle-timeout", "2", "--max-in-flight", "4")
        peer, server_side = await self.silent_peer()
        events = self.log_events()
        peer.transport.write(b"".join(b'{"type":"users","id":%d}\n' % n for n in range(300)))
        await self.wait_for(lambda: server_side.flow.paused, "the server's output to back up")
        elapsed = await self.gone(server_side, "the idle timeout")
        self.assertLess(elapsed, self.GRACE + 1.0)
        self.assertEqual(self.cut_offs(events), [])
        self.assertGreater(server_side.most_held, 64 * 1024)


    async def test_shutdown_aborts_silent_peer(self):
        """
        A server stopping while a peer that never reads has answers waiting for it finishes stopping within
        close_grace (0.5 s) + 1 s: the peer's connection is aborted after the grace, not waited for.
        """
        await self.start_with_users("--max-in-flight", "4")
        peer, server_side = await self.silent_peer()
        peer.transport.write(b"".join(b'{"type":"users","id":%d}\n' % n for n in range(300)))
        await self.wait_for(lambda: server_side.flow.paused, "the server's output to back up")
        started = reactor.seconds()
        await self.server.stopService()
        self.assertLess(reactor.seconds() - started, self.GRACE + 1.0)
        self.assertNotIn(server_side, self.server.factory.protocols)

class PropertyTests(test_server.ServerTestCase):
    """
    decode_frame and PagerServerProtocol (over StringTransport, with a synchronous store and a MemoryReactorClock,
    as in tests/test_server.py) on arbitrary input.
    """

    @PROPERTY
    @given(st.binary(max_size=2000))
    def test_decode_frame_arbitrary_bytes(self, data):
        """decode_frame on arbitrary bytes raises BadRequest or returns a dict whose type is a string."""
        self.assertDecodes(data)

    @PROPERTY
    @given(st.one_of(_frames.map(_encode), _json_values.map(_encode)), st.integers(0, 2000), st.binary(max_size=4))
    def test_decode_frame_near_json(self, data, position, insert):
        """decode_frame on JSON, frames and JSON with a few bytes inserted: BadRequest or a dict with a string type."""
        position %= len(data) + 1
        self.assertDecodes(data[:position] + insert + data[position:])

    def assertDecodes(self, data):
        try:
            frame = pager.decode_frame(data)
        except pager.BadRequest as e:
            self.assertIsInstance(e.message, str)
            return
        self.assertIsInstance(frame, dict)
        self.assertIsInstance(frame["type"], str)

    def feed(self, conn, lines, cut):
        """Feed C{lines} to the server in pieces of C{cut} bytes; every line it writes must be a JSON object."""
        data = b"\n".join(lines) + b"\n"
        conn.transport.clear()
        for i in range(0, len(data), cut):
            conn.protocol.dataReceived(data[i:i + cut])
        output = conn.transport.value()
        *written, rest = output.split(b"\n")
        self.assertEqual(rest, b"", "the server wrote a partial line")
        for line in written:
            frame = json.loads(line)
            self.assertIsInstance(frame, dict, line)
            self.assertIsInstance(frame.get("type"), str, line)
            self.assertFalse(frame["type"] == "error" and frame.get("code") == "internal", line)
        conn.lose()

    @PROPERTY
    @given(_lines, st.integers(1, 400))
    def test_server_before_login(self, lines, cut):
        """Arbitrary lines on a new connection never raise out of dataReceived, and every answer is JSON."""
        self.clock.advance(7200)  # earlier examples' failed logins are forgotten
        self.feed(self.connect(), lines, cut)

    @PROPERTY
    @given(_lines, st.integers(1, 400))
    def test_server_after_login(self, lines, cut):
        """Arbitrary lines on a logged-in connection never raise out of dataReceived, and every answer is JSON."""
        if not hasattr(self, "registered"):
            self.factory.hash_token = test_server._fast_hash
            self.register("alice").lose()
            self.offline("bob")
            self.registered = True
        self.clock.advance(7200)
        conn = self.connect()
        self.assertOk(conn.login("alice", test_server.private_key("alice")))
        conn.read()
        self.feed(conn, lines, cut)


class SlowlorisTests(SecurityTestCase):
    """Bytes trickling in without a newline never keep a connection alive."""

    async def test_trickle_before_login(self):
        """
        With --login-timeout 1, a peer sending a partial line one byte every 20 ms is told 'timeout' and dropped
        about 1 s after it connected; the witness, logged in, is not.
        """
        await self.start("--login-timeout", "1")
        peer = await self.peer()
        started = reactor.seconds()
        peer.transport.write(b'{"type":"ping","id":1,"pad":"')
        trickle = task.LoopingCall(lambda: peer.lost is None and peer.transport.write(b"x"))
        trickle.start(0.02)
        try:
            await self.wait_for(lambda: peer.lost is not None, "the server to drop the trickling peer", tries=300)
        finally:
            trickle.stop()
        elapsed = reactor.seconds() - started
        [frame] = peer.errors()
        self.assertError(frame, "timeout")
        self.assertIn("no login within", frame["message"])
        self.assertGreater(elapsed, 0.9)
        self.assertLess(elapsed, 3.0)
        await self.witness_ok()


class IdleTrickleTests(test_server.ServerTestCase):
    """The idle timeout after login, on a MemoryReactorClock."""

    limits = pager.Limits(idle_timeout=100)

    def test_trickle_after_login(self):
        """
        After login, a byte every second without a newline does not extend the idle timeout: the connection is
        closed 100 s after its last complete line, while a connection sending whole lines stays.
        """
        trickler = self.register("alice")
        talker = self.register("bob")
        trickler.protocol.dataReceived(b'{"type":"ping","id":"partial"')
        for second in range(1, 100):
            self.clock.advance(1)
            trickler.protocol.dataReceived(b" ")
            talker.protocol.dataReceived(b"\n")
            self.assertFalse(trickler.transport.disconnecting, "closed after %d s" % second)
        self.clock.advance(1.5)
        frames = trickler.read()
        self.assertEqual([(f["type"], f.get("code")) for f in frames], [("error", "timeout")], frames)
        self.assertTrue(trickler.transport.disconnecting)
        self.assertFalse(talker.transport.disconnecting)
        self.assertOk(talker.ping())


class ConnectionLimitTests(SecurityTestCase):

    async def test_fourth_connection_refused(self):
        """
        With --max-connections-per-address 3, a fourth connection from 127.0.0.1 gets rate_limited instead of hello
        and is closed; once one of the three closes, a new one is accepted.  The witness connects from 127.0.0.2,
        another loopback address, and is not counted with them.
        """
        await self.start("--max-connections-per-address", "3", bind="127.0.0.2")
        peers = [await self.peer(bind="127.0.0.1") for _ in range(3)]
        for peer in peers:
            self.assertEqual(peer.frames[0]["type"], "hello")
        fourth = await self.peer(bind="127.0.0.1")
        await self.wait_for(lambda: fourth.lost is not None, "the fourth connection to be closed")
        [frame] = fourth.frames
        self.assertError(frame, "rate_limited")
        self.assertIn("3", frame["message"])
        await self.witness_ok()

        await self.drop(peers[0])
        await self.wait_for(lambda: self.server.factory.per_address["127.0.0.1"] == 2,
                            "the server to count the closed connection")
        again = await self.peer(bind="127.0.0.1")
        self.assertEqual(again.frames[0]["type"], "hello")
        self.assertIsNone(again.lost)
        await self.assertAlive(again)
        await self.witness_ok()


class AuthenticationTests(SecurityTestCase):

    async def test_wrong_token_and_unknown_user_alike(self):
        """A wrong token and an unknown user both get auth_failed with the same message."""
        await self.start()
        client = await self.connect(self.address)
        with self.assertRaises(pager.AuthFailed) as wrong:
            await client.login("alice", "not alice's token", key("alice"))
        with self.assertRaises(pager.AuthFailed) as unknown:
            await client.login("nobody", token("nobody"), key("nobody"))
        with self.assertRaises(pager.AuthFailed) as wrong_key:
            await client.login("alice", token("alice"), key("mallory"))
        self.assertEqual({e.exception.code for e in (wrong, unknown, wrong_key)}, {"auth_failed"})
        self.assertEqual(wrong.exception.message, unknown.exception.message)
        self.assertEqual(wrong.exception.message, wrong_key.exception.message)
        await self.witness_ok()

    async def test_brute_force_throttled(self):
        """
        After account_free_failures (3) wrong tokens for carol, the next attempt is refused with rate_limited at
        once, before any token check: even with the right token.  Dave, another account from the same address, logs
        in normally, and the witness keeps working.
        """
        await self.start()
        await self.provision("carol")
        await self.provision("dave")
        client = await self.connect(self.address)
        for attempt in range(3):
            with self.assertRaises(pager.AuthFailed):
                await client.login("carol", "guess number %d" % attempt, key("carol"))
        started = reactor.seconds()
        with self.assertRaises(pager.RateLimited) as limited:
            await client.login("carol", token("carol"), key("carol"))
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertIn("try again in 1 s", limited.exception.message)
        self.assertNotIn("carol", self.server.factory.online)
        dave = await self.connect(self.address)
        await dave.login("dave", token("dave"), key("dave"))
        await dave.ping()
        await self.witness_ok()

    async def test_requests_before_login(self):
        """users, key, send, chunk, ack and reject before login get not_authenticated; the connection goes on."""
        await self.start()
        peer = await self.peer()
        envelope = pager.seal(key("alice"), "alice", {"bob": key("bob").public_key()}, b"not yet")
        msg = pager.parse_header(envelope.header).message_id.hex()
        requests = [("users", {}), ("key", {"user": "bob"}),
                    ("send", {"to": ["bob"], "size": envelope.size, "header": b64(envelope.header),
                              "chunks": [b64(c) for c in envelope.chunks], "signature": b64(envelope.signature)}),
                    ("chunk", {"chunks": []}), ("ack", {"msg": msg}), ("ack", {"receipt": 1}),
                    ("reject", {"msg": msg, "reason": "no"})]
        for i, (kind, fields) in enumerate(requests):
            self.assertError(await self.request(peer, kind, i, **fields), "not_authenticated", i)
        await self.assertAlive(peer)
        self.assertEqual(await self.pending(self.server, "bob"), [])
        await self.witness_ok()

    async def test_two_sessions_of_one_user(self):
        """
        A second receiving session of bob (the same device) works alongside the first: both are pushed alice's
        message; each shows it at most once, neither refuses it.  (The session that stores it first deletes the
        one-time prekey it was sealed to: the other one then only acknowledges it.)
        """
        await self.start()
        second = await self.login(self.address, "bob")
        msg = await self.alice.send("bob", "for both of you")
        await self.wait_for(lambda: self.bob.events.messages or second.events.messages, "a session's copy")
        await self.no_pending(self.server, "bob")
        await self.wait_for(lambda: self.bob.idle and second.idle, "both sessions to be done with it")
        for session in (self.bob, second):
            self.assertEqual(session.events.rejected, [])
            self.assertLessEqual(len(session.events.messages), 1)
            for message in session.events.messages:
                self.assertOpened(message, "alice", b"for both of you", msg)
        await second.ping()
        await self.witness_ok()


class ThrottleClockTests(test_server.ServerTestCase):
    """Login throttling on a MemoryReactorClock, so that waits of a minute and an hour take no time."""

    limits = pager.Limits(address_free_failures=1000)  # isolate the account throttle

    def setUp(self):
        super().setUp()
        self.offline("alice")
        self.offline("bob")

    def attempt(self, user="alice", right=False, peer=test_server.LOOPBACK):
        conn = self.connect(peer)
        answer = conn.login(user, test_server.private_key(user),
                            token=test_server.TOKEN if right else "wrong token %f" % self.clock.seconds())
        conn.lose()
        return answer

    def assertLimited(self, answer, seconds):
        self.assertError(answer, "rate_limited")
        self.assertIn("try again in %d s" % seconds, answer["message"])
        self.assertEqual(answer["retry_after"], seconds)  # for a client that waits before trying again

    def test_wait_doubles_and_is_capped(self):
        """
        After 3 free wrong tokens from one address the account must wait there 1 s, then 2, 4, 8, 16, 32 s after
        each further failure, then 60 s (account_max_delay) however many more; a refused attempt is not counted
        against the account (it is against the address, whose allowance this class makes large), and the right
        token is refused too while the wait lasts.
        """
        for _ in range(3):
            self.assertError(self.attempt(), "auth_failed")
        for failures, wait in [(3, 1), (4, 2), (5, 4), (6, 8), (7, 16), (8, 32), (9, 60), (10, 60), (11, 60)]:
            self.assertLimited(self.attempt(), wait)
            self.clock.advance(wait - 0.5)
            self.assertLimited(self.attempt(right=True), 1)
            self.clock.advance(0.51)
            self.assertError(self.attempt(), "auth_failed")  # failure number failures + 1
        self.clock.advance(59)
        self.assertLimited(self.attempt(right=True), 1)
        self.clock.advance(1.01)
        self.assertOk(self.attempt(right=True))
        # A success clears the account's failures: the next wrong token is one of three free ones again.
        self.assertError(self.attempt(), "auth_failed")
        self.assertOk(self.attempt(right=True))

    def test_forgotten_after_an_hour(self):
        """Failures an hour old are forgotten: the count starts again from one, with no wait."""
        for _ in range(5):
            self.clock.advance(10)
            self.assertError(self.attempt(), "auth_failed")
        self.assertLimited(self.attempt(right=True), 4)
        self.clock.advance(3601)
        self.assertError(self.attempt(), "auth_failed")
        self.assertError(self.attempt(), "auth_failed")
        self.assertOk(self.attempt(right=True))

    def garbage_login(self, user, peer):
        """A login naming C{user} with a proof by a key that is not theirs, from C{peer}."""
        conn = self.connect(peer)
        answer = conn.login(user, test_server.private_key("mallory"), token="not the token")
        conn.lose()
        return answer

    def test_garbage_proofs_charged_to_requester(self):
        """
        From five addresses, 30 logins each naming alice with a proof by the wrong key (and some naming nobody):
        every address ends up refused (rate_limited), yet alice logs in at once with her key and token after
        every round, from her own address and even from one of theirs' neighbours.
        """
        self.serve(pager.Limits())
        attackers = [IPv4Address("TCP", "198.51.100.%d" % i, 5000) for i in range(1, 6)]
        for round_ in range(30):
            for peer in attackers:
                self.assertIn(self.garbage_login("alice" if round_ % 3 else "nobody", peer)["code"],
                              ("auth_failed", "rate_limited"))
            self.assertOk(self.attempt(right=True))
            self.clock.advance(1)
        for peer in attackers:
            self.assertError(self.garbage_login("alice", peer), "rate_limited")
        self.assertOk(self.attempt(right=True, peer=IPv4Address("TCP", "198.51.100.6", 5000)))

    def test_refusals_count(self):
        """
        An address that polls while it must wait is refused every time and its wait grows (each refusal counts as
        a failure of the address), up to address_max_delay; once it waits out the wait it was told, it gets in.
        """
        self.serve(pager.Limits())
        attacker = IPv4Address("TCP", "203.0.113.9", 4000)
        for i in range(10):
            self.assertError(self.attempt("user%d" % i, peer=attacker), "auth_failed")
        waits = []
        for _ in range(15):
            self.clock.advance(0.5)
            answer = self.assertError(self.attempt("bob", right=True, peer=attacker), "rate_limited")
            waits.append(int(answer["message"].split("try again in ")[1].split()[0]))
        self.assertEqual(waits, [2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900, 900, 900, 900])
        self.clock.advance(899)
        self.assertLimited(self.attempt("bob", right=True, peer=attacker), 900)
        self.clock.advance(900.01)
        self.assertOk(self.attempt("bob", right=True, peer=attacker))

    def test_wrong_tokens_per_account_and_address(self):
        """
        Wrong tokens with alice's own key from one address slow alice down at that address only: from another
        address she logs in at once.
        """
        elsewhere = IPv4Address("TCP", "192.0.2.44", 1)
        for _ in range(3):
            self.assertError(self.attempt(), "auth_failed")
        self.assertLimited(self.attempt(right=True), 1)
        self.assertOk(self.attempt(right=True, peer=elsewhere))

    def recover(self, peer, right=False):
        conn = self.connect(peer)
        new_key = test_server.private_key("new")
        proof = pager.sign_auth(new_key, "recover", conn.server_id, "alice", conn.challenge)
        answer = conn.request("recover", user="alice", token=test_server.TOKEN if right else "not her token",
                              public_key=pager.public_key_pem(new_key), proof=test_server.b64(proof))
        conn.lose()
        return answer

    def test_recover_throttled_apart(self):
        """
        Wrong tokens in recover (each with a good proof by a new key, which anyone can make) from many loopback
        addresses slow down alice's recoveries from every address, but never her login.
        """
        for i in range(2, 8):
            answer = self.recover(IPv4Address("TCP", "127.0.0.%d" % i, 1))
            self.assertIn(answer["code"], ("auth_failed", "rate_limited"))
            self.assertOk(self.attempt(right=True))
        self.assertError(self.recover(IPv4Address("TCP", "127.0.0.99", 1), right=True), "rate_limited")
        self.assertOk(self.attempt(right=True))

    def test_other_account_not_slowed(self):
        """While alice's account waits, bob logs in at once from the same address."""
        for _ in range(6):
            self.clock.advance(40)
            self.assertError(self.attempt(), "auth_failed")
        self.assertLimited(self.attempt(right=True), 8)
        self.assertOk(self.attempt("bob", right=True))

    def test_address_throttle(self):
        """
        Guessing across many accounts from one address: after address_free_failures (10) failures that address
        waits, even for an account with the right token, while another address logs in to that account at once.
        """
        self.serve(pager.Limits())
        attacker = IPv4Address("TCP", "203.0.113.9", 4000)
        for i in range(10):
            self.assertError(self.attempt("user%d" % i, peer=attacker), "auth_failed")
        # Waiting 1 s, it tries at once: refused, and the refusal counts, so the wait is now 2 s.
        self.assertLimited(self.attempt("bob", right=True, peer=attacker), 2)
        self.assertOk(self.attempt("bob", right=True))


class FloodPeer(Peer):
    """
    Mallory's connection in the flood of L{FairnessTests.test_one_account_cannot_starve_logins}: it logs in, and
    every time an answer brings a new challenge it sends a valid re-key (to the same key) over that challenge, then a
    malformed re-key (no C{proof_new}) and a malformed login (no C{proof}), for C{rounds} rounds.  Against a server
    that answers malformed requests with a fresh challenge at once, that queues valid re-keys as fast as they can be
    signed.
    """

    def __init__(self, server_id, rounds):
        super().__init__()
        self.server_id, self.rounds_left, self.sent = server_id, rounds, 0
        self.used = set()

    def dataReceived(self, data):
        super().dataReceived(data)
        challenge = self.challenge
        if challenge is None or challenge in self.used or self.lost is not None:
            return
        self.used.add(challenge)
        mallory, sid = key("mallory"), self.server_id
        if not self.sent:
            self.write({"type": "login", "id": "login", "user": "mallory", "token": token("mallory"),
                        "proof": b64(pager.sign_auth(mallory, "login", sid, "mallory", challenge))})
        elif self.rounds_left > 0:
            self.rounds_left -= 1
            fp = pager.fingerprint(mallory)
            proof = b64(pager.sign_auth(mallory, "rekey", sid, "mallory", challenge, fp))
            fields = {"user": "mallory", "token": token("mallory"), "public_key": pager.public_key_pem(mallory),
                      "proof_old": proof}
            self.write({"type": "rekey", "id": "rekey%d" % self.sent, "proof_new": proof, **fields})
            self.write({"type": "rekey", "id": "bad%d" % self.sent, **fields})
            self.write({"type": "login", "id": "badlogin%d" % self.sent, "user": "mallory",
                        "token": token("mallory")})
        self.sent += 1


class FairnessTests(SecurityTestCase):
    """
    One user, or one address, cannot stop everyone else from logging in; nobody can lock another account out.
    Real Argon2id, real loopback sockets; attackers bind to other loopback addresses (Linux routes all of 127/8).
    """

    LOGIN_BOUND = 5.0  # seconds: the longest any other user's login may take during the attack

    async def test_one_account_cannot_starve_logins(self):
        """
        Mallory floods from 127.0.0.2 on 16 connections: each logs in with her key and token, then answers every
        new challenge with a valid re-key, a malformed re-key and a malformed login, 25 rounds each (400 valid
        re-keys).  Once 150 rounds
        are under way, eight other users log in at once from 127.0.0.1: every login succeeds, each within
        LOGIN_BOUND seconds; at no time does mallory have more than 2 token hashes running or waiting
        (argon2_per_account), nor do more than 10 hashes wait in all (mallory's 2 and the eight).
        """
        await self.start()
        for name in ["mallory"] + ["user%d" % i for i in range(8)]:
            await self.provision(name)
        factory = self.server.factory
        most_waiting = [0]
        hash_token = factory.hash_token

        def counting_hash(token_, salt):
            d = hash_token(token_, salt)
            most_waiting[0] = max(most_waiting[0], len(factory._hashing.waiting))
            return d
        factory.hash_token = counting_hash
        mallory_most = [0]
        hash_token_for = factory.hash_token_for

        async def counting_hash_for(connection, account, token_, salt):
            hashed = defer.Deferred.fromCoroutine(hash_token_for(connection, account, token_, salt))
            mallory_most[0] = max(mallory_most[0], factory._hashing_accounts["mallory"])  # this one counted now
            return await hashed
        factory.hash_token_for = counting_hash_for

        peers = []
        for _ in range(16):
            peer = FloodPeer(factory.server_id, rounds=25)
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=("127.0.0.2", 0))
            await endpoints.connectProtocol(endpoint, peer)
            self.addCleanup(self.drop, peer)
            peers.append(peer)
        await self.wait_for(lambda: sum(p.sent for p in peers) >= 150, "the flood to get going")

        async def timed_login(name):
            started = reactor.seconds()
            client = await self.login(self.address, name)
            took = reactor.seconds() - started
            await client.close()
            return took

        took = await defer.gatherResults([defer.Deferred.fromCoroutine(timed_login("user%d" % i))
                                          for i in range(8)])
        flood = sum(p.sent for p in peers)
        self.assertLess(max(took), self.LOGIN_BOUND, (took, flood))
        self.assertLessEqual(most_waiting[0], 10, flood)
        self.assertGreater(mallory_most[0], 0, flood)
        self.assertLessEqual(mallory_most[0], factory.limits.argon2_per_account, flood)
        await self.witness_ok()

    async def test_targeted_account_not_locked_out(self):
        """
        Attackers on 127.0.0.2 to 127.0.0.6, three connections each, send logins naming alice with garbage proofs,
        re-keys of alice with garbage old-key proofs, and recoveries of alice with a good new-key proof and a wrong
        token, each connection one request after another, while the server's throttle clock moves one second at a
        time; every second alice logs in from 127.0.0.1 with her key and token: all 20 logins succeed.
        """
        await self.start()
        factory = self.server.factory
        clock = task.Clock()
        factory.now = clock.seconds
        sid = factory.server_id
        peers = []
        for host in range(2, 7):
            for _ in range(3):
                peers.append(await self.peer(bind="127.0.0.%d" % host))
        garbage = b64(os.urandom(256))
        mallory = key("mallory")
        codes = collections.Counter()

        async def attack(peer, second):
            for i in range(4):
                rid = "%d-%d" % (second, i)
                kind = ("login", "rekey", "recover", "login")[i]
                fields = {"user": "alice", "token": "guess %s" % rid}
                if kind == "login":
                    fields["proof"] = garbage
                else:
                    fp = pager.fingerprint(mallory)
                    proof = b64(pager.sign_auth(mallory, kind, sid, "alice", peer.challenge, fp))
                    fields.update(public_key=pager.public_key_pem(mallory))
                    if kind == "rekey":
                        fields.update(proof_old=garbage, proof_new=proof)
                    else:
                        fields.update(proof=proof)
                answer = await self.request(peer, kind, rid, **fields)
                codes[answer.get("code")] += 1

        async def alice_logs_in():
            client = await self.login(self.address, "alice")
            await client.close()

        logins = 0
        for second in range(20):
            clock.advance(1)
            await defer.gatherResults([defer.Deferred.fromCoroutine(attack(peer, second)) for peer in peers]
                                      + [defer.Deferred.fromCoroutine(alice_logs_in())])
            logins += 1
        self.assertEqual(logins, 20)
        self.assertEqual(set(codes), {"auth_failed", "rate_limited"}, codes)
        self.assertGreater(codes["rate_limited"], codes["auth_failed"], codes)
        await self.witness_ok()


class RegistrationPolicyTests(SecurityTestCase):

    async def register_with(self, client, name, invite=None):
        """Register C{name} with its module key on C{client}, sending C{invite} if given (raw request)."""
        proof = pager.sign_auth(key(name), "register", client.server_id, name, client.protocol.challenge)
        fields = dict(user=name, public_key=pager.public_key_pem(key(name)), token=token(name), proof=b64(proof),
                      device=device_fields(key(name), name))
        if invite is not None:
            fields["invite"] = invite
        return await client.protocol.request("register", **fields)

    async def test_closed(self):
        """With --registration closed, hello says so and register gets forbidden; existing users log in."""
        await self.start("--registration", "closed")
        client = await self.connect(self.address)
        self.assertEqual(client.limits["registration"], "closed")
        with self.assertRaises(pager.Forbidden):
            await client.register("carol", token("carol"), key("carol"))
        with self.assertRaises(pager.Forbidden):
            await self.register_with(client, "carol", invite="anything")
        self.assertEqual(await self.user_names(), ["alice", "bob"])
        await self.witness_ok()

    async def test_invite(self):
        """
        With --registration invite: no code or a wrong code gets forbidden; a code from the store registers once,
        and the same code is refused the second time.
        """
        await self.start("--registration", "invite")
        codes = await self.server.store.create_invites(2, reactor.seconds())
        client = await self.connect(self.address)
        self.assertEqual(client.limits["registration"], "invite")
        with self.assertRaises(pager.Forbidden):
            await client.register("carol", token("carol"), key("carol"))
        with self.assertRaises(pager.Forbidden):
            await self.register_with(client, "carol", invite="not-a-code")
        await self.register_with(client, "carol", invite="  %s \n" % codes[0])
        other = await self.connect(self.address)
        with self.assertRaises(pager.Forbidden):
            await self.register_with(other, "dave", invite=codes[0])
        await self.register_with(other, "dave", invite=codes[1])
        self.assertEqual(await self.user_names(), ["alice", "bob", "carol", "dave"])
        await self.witness_ok()


def hand_sealed(sender, recipient, plaintext, wrap):
    """
    An envelope built by hand from the format's parts, like another implementation would, with the content key
    wrapped for C{recipient} by C{wrap(public_key, content_key)}.  Everything else is as pager.seal makes it.
    """
    content_key, message_id = os.urandom(32), os.urandom(pager.MESSAGE_ID_SIZE)
    recipient_key = key(recipient).public_key()
    entry = pager.Wrap(recipient, pager.device_id(recipient_key), pager.WRAP_RSA, wrap(recipient_key, content_key))
    header = pager._encode_header(message_id, int(time.time() * 1000), sender, pager.fingerprint(key(sender)),
                                  pager.device_id(key(sender)), "text", "", pager.CHUNK_SIZE, [entry],
                                  pager._commitment(message_id, content_key))
    chunk = AESGCM(content_key).encrypt(pager._nonce(0, True), plaintext, hashlib.sha256(header).digest())
    signed = pager.signed_bytes(header, 1, len(chunk), hashlib.sha256(chunk).digest())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=pager.PSS_SALT_LENGTH)
    return pager.Envelope(header, [chunk], key(sender).sign(signed, pss, hashes.SHA256()))


def oaep(public_key, content_key):
    return public_key.encrypt(content_key, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                                        label=None))


def pkcs1v15(public_key, content_key):
    return public_key.encrypt(content_key, padding.PKCS1v15())


class ServerCryptoTests(SecurityTestCase):
    """What the server lets through is still checked by the recipient, and the server refuses what it can check."""

    async def test_pkcs1v15_wrapped_key_rejected(self):
        """
        An envelope whose content key is wrapped with RSA PKCS#1 v1.5 instead of OAEP (otherwise well formed and
        signed) is refused by the recipient with KeyUnwrapFailed; the same envelope wrapped with OAEP opens
        (control).  Since bob's device publishes prekeys, the server refuses any RSA wrap to it (a downgrade) before
        it could reach him: only a legacy device still takes RSA-OAEP.
        """
        await self.start()
        control = hand_sealed("alice", "bob", b"wrapped properly", oaep)
        opened = pager.open_envelope(control, key("bob"), "bob", key("alice").public_key())
        self.assertEqual(opened.plaintext, b"wrapped properly")

        envelope = hand_sealed("alice", "bob", b"wrapped the old way", pkcs1v15)
        self.assertRaises(pager.KeyUnwrapFailed, pager.open_envelope, envelope, key("bob"), "bob",
                          key("alice").public_key())
        with self.assertRaises(pager.BadRequest) as refused:
            await self.alice.send_envelope(["bob"], envelope)
        self.assertIn("downgrade", refused.exception.message)
        self.assertEqual(await self.pending(self.server, "bob"), [])
        self.assertEqual((self.bob.events.messages, self.bob.events.rejected), ([], []))
        await self.no_pending(self.server, "bob")
        await self.witness_ok()

    async def test_short_key_refused(self):
        """A 1024-bit key can neither register nor replace a key (bad_key); nothing changes."""
        await self.start()
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        client = await self.connect(self.address)
        with self.assertRaises(pager.BadKey) as refused:
            await client.register("carol", token("carol"), weak)
        self.assertEqual(refused.exception.code, "bad_key")
        with self.assertRaises(pager.BadKey):
            await self.alice.rekey("alice", token("alice"), key("alice"), weak)
        self.assertEqual(await self.user_names(), ["alice", "bob"])
        record = await self.server.store.get_user("alice")
        self.assertEqual(bytes(record.fingerprint), pager.fingerprint(key("alice")))
        await self.witness_ok()

    async def test_message_id_replay_by_another_sender(self):
        """
        While alice's message to carol (offline) is held, mallory can neither reuse its message id in an envelope of
        her own (bad_request) nor upload alice's envelope as is (forbidden: the sender is not her); carol then gets
        alice's message, and only it.
        """
        await self.start()
        await self.provision("carol")
        await self.provision("mallory")
        original = pager.seal(key("alice"), "alice", {"carol": key("carol").public_key()}, b"the original")
        message_id = pager.parse_header(original.header).message_id
        await self.alice.send_envelope(["carol"], original)

        mallory = await self.login(self.address, "mallory")
        copy = pager.seal(key("mallory"), "mallory", {"carol": key("carol").public_key()}, b"the impostor",
                          message_id=message_id)
        with self.assertRaises(pager.BadRequest):
            await mallory.send_envelope(["carol"], copy)
        big = pager.seal(key("mallory"), "mallory", {"carol": key("carol").public_key()}, os.urandom(200000),
                         message_id=message_id)
        with self.assertRaises(pager.BadRequest):
            await mallory.send_envelope(["carol"], big)  # the same, as a multi-frame upload
        with self.assertRaises(pager.Forbidden):
            await mallory.send_envelope(["carol"], original)
        await mallory.ping()

        carol = await self.login(self.address, "carol")
        await self.wait_for(lambda: carol.events.messages, "carol's message")
        await self.no_pending(self.server, "carol")
        [message] = carol.events.messages
        self.assertOpened(message, "alice", b"the original", message_id.hex(), ["carol"])
        self.assertEqual(carol.events.rejected, [])
        await self.witness_ok()


class SecretsAtRestTests(SecurityTestCase):

    async def test_no_token_or_plaintext_in_database_or_log(self):
        """
        After a real session (alice registers with safetoken T; she sends 'top secret plaintext' to bob, once while
        he is online and once while he is offline), neither T nor the plaintext is in the database file, its WAL,
        an SQL dump of it, or the server's log, while the server runs and after it stops.  The stored envelope is.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        secret_token = "T-%s-safetoken" % os.urandom(8).hex()
        plaintext = "top secret plaintext"
        await self.start(witness=False)
        alice = await self.connect(self.address)
        await alice.register("alice", secret_token, key("alice"))
        bob = await self.register(self.address, "bob")
        await alice.send("bob", plaintext + " (delivered)")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        await self.offline(self.server, bob)
        await alice.send("bob", plaintext + " (waiting)")
        [stored] = await self.pending(self.server, "bob")

        async def check(when):
            secrets = [secret_token.encode(), plaintext.encode()]
            raw = await read_elsewhere(self, self.server.store.path, self.server.store.path + "-wal")
            conn = sqlite3.connect(self.server.store.path)
            try:
                dump = "\n".join(conn.iterdump())
            finally:
                conn.close()
            # stored as its push line: the header in base64, as the recipient gets it
            self.assertIn(base64.b64encode(stored.header).hex().upper()[:64], dump.upper(),
                          "the premise: the envelope is stored")
            for secret in secrets:
                for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
                    self.assertNotIn(form, raw, when)
                    self.assertNotIn(form.decode().lower(), dump.lower(), when)
            log = "\n".join(formatEvent(e) for e in events)
            self.assertIn("alice registered", log, "the premise: the log was captured")
            for secret in secrets:
                self.assertNotIn(secret.decode(), log, when)

        await check("while the server runs")
        await self.offline(self.server, alice)
        await self.server.stopService()
        await check("after the server stopped")


class ServerChild(Child):
    """A child process whose standard input is closed, remembering the signal that ended it, if any."""

    signal = None

    def processEnded(self, reason):
        self.signal = getattr(reason.value, "signal", None)
        super().processEnded(reason)


class FaultTests(SecurityTestCase):
    """Crashes, cut connections and a failing database lose no accepted message and never fake an acceptance."""

    async def server_process(self, db, prefix=None, args=()):
        """
        Start a pager server as a child process on a free loopback port with database C{db} (C{pager.py server}, or
        C{prefix} followed by the server arguments); returns C{(child, client endpoint)} once it accepts clients.
        """
        port = free_port()
        server_args = ["server", "--listen", "tcp:%d:interface=127.0.0.1" % port, "--db", db] + list(args)
        argv = (prefix or [sys.executable, PAGER_PY]) + server_args
        child = self.spawn(argv, base_env(PYTHONPATH=REPO), child=ServerChild())
        address = "tcp:127.0.0.1:%d" % port

        async def ready():
            if child.finished:
                self.fail("The server process ended early:\n%s" % child.result())
            try:
                client = await pager.PagerClient.connect(address, reactor, timeout=5)
            except error.ConnectionRefusedError:
                return None
            await client.close()
            return True

        await self.wait_for(ready, "the server process to accept connections", tries=1500)
        return child, address

    async def test_sigkill_between_accept_and_delivery(self):
        """
        alice's message to offline bob is accepted; the server process is killed with SIGKILL before delivering it;
        a new server process on the same database delivers it to bob (whose client keeps a SeenStore on disk)
        exactly once, and bob's next login finds nothing more.
        """
        db = os.path.abspath(self.mktemp())
        first, address = await self.server_process(db)
        alice = await self.connect(address)
        await alice.register("alice", token("alice"), key("alice"))
        seen = pager.SeenStore(os.path.abspath(self.mktemp()))  # bob's device state, prekeys included
        self.addCleanup(lambda: seen.pool.running and seen.close())
        await seen.open(reactor.seconds())
        bob = await self.connect(address, seen=seen)
        await bob.register("bob", token("bob"), key("bob"))
        await bob.close()
        answer = await alice.post("bob", "survives kill -9")
        self.assertEqual(answer["queued"], ["bob"])
        os.kill(first.transport.pid, signal.SIGKILL)
        await self.finish(first, "the killed server")
        self.assertIsNone(first.code)  # it died of the signal

        second, address = await self.server_process(db)
        bob = await self.connect(address, seen=seen)
        self.assertEqual(await bob.login("bob", token("bob"), key("bob")), 1)
        await self.wait_for(lambda: bob.processed == 1, "bob to receive and acknowledge the message")
        [message] = bob.events.messages
        self.assertOpened(message, "alice", b"survives kill -9", answer["msg"], ["bob"])
        await bob.close()

        again = await self.connect(address, seen=seen)
        self.assertEqual(await again.login("bob", token("bob"), key("bob")), 0)
        await again.ping()
        self.assertEqual((again.events.messages, again.processed), ([], 0))
        await again.close()
        second.transport.signalProcess("TERM")
        await self.finish(second, "the second server")

    async def test_recipient_cut_mid_delivery(self):
        """
        bob's connection reads part of a 4 MiB message being streamed to him, then closes; the message stays on
        the server, and bob's next login receives it whole and intact, and alice gets the receipt.
        """
        await self.start()
        await self.offline(self.server, self.bob)
        data = os.urandom(4 * MiB)
        msg = await self.alice.send("bob", data, content_type="file", filename="big.bin")

        raw = await self.peer()
        await self.peer_login(raw, "bob")
        await self.wait_for(lambda: raw.received > 512 * 1024, "part of the stream")
        raw.transport.abortConnection()
        await self.wait_for(lambda: raw.lost is not None, "bob's connection to close")
        kinds = [f["type"] for f in raw.frames]
        self.assertIn("message", kinds)
        self.assertFalse([f for f in raw.frames if f["type"] == "message_chunk" and "signature" in f],
                         "the whole message arrived before the cut")
        await self.wait_for(lambda: "bob" not in self.server.factory.online, "bob's cut session to end")
        self.assertEqual([m.msg_id.hex() for m in await self.pending(self.server, "bob")], [msg])
        self.assertEqual(self.alice.events.receipts, [])

        self.bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: self.bob.events.messages and self.alice.events.receipts,
                            "the whole message and its receipt", tries=2000)
        [message] = self.bob.events.messages
        self.assertOpened(message, "alice", data, msg)
        self.assertEqual(message.filename, "big.bin")
        self.assertEqual([(r.message_id, r.status) for r in self.alice.events.receipts], [(msg, "delivered")])
        await self.witness_ok()

    async def test_database_refuses_writes(self):
        """
        While the server's database refuses every write (its connection switched to read-only with PRAGMA
        query_only, which makes SQLite fail each write as it would on a read-only or failing disk), alice's sends
        get an error of code internal and never an ok; the server keeps answering pings; nothing is delivered.  Once
        writes work again, the same envelope is accepted as new and delivered once.
        """
        await self.start()
        store = self.server.store
        envelope = await self.device_envelope(self.address, "alice", ["bob"], b"written at last", self.alice)
        large = await self.device_envelope(self.address, "alice", ["bob"], os.urandom(300000), self.alice)
        await store.pool.runInteraction(lambda txn: txn.execute("PRAGMA query_only = ON"))
        try:
            for attempt in (envelope, large, envelope):
                with self.assertRaises(pager.InternalError) as failed:
                    await self.alice.send_envelope(["bob"], attempt)
                self.assertEqual(failed.exception.code, "internal")
            await self.alice.ping()
        finally:
            await store.pool.runInteraction(lambda txn: txn.execute("PRAGMA query_only = OFF"))
        logged = self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertGreaterEqual(len(logged), 3)
        for failure in logged:
            self.assertIn("readonly", str(failure.value))
        self.assertEqual(self.bob.events.messages, [])

        answer = await self.alice.send_envelope(["bob"], envelope)
        self.assertFalse(answer["duplicate"])
        await self.wait_for(lambda: self.bob.events.messages, "the message after the fault")
        [message] = self.bob.events.messages
        self.assertEqual(message.plaintext, b"written at last")
        await self.witness_ok()

    async def test_sigterm_under_twistd(self):
        """
        'twistd -n pager server' shuts down in order within a few seconds of SIGTERM (exit status 0, or the SIGTERM
        that twistd re-raises once it has shut down), its log saying 'Server Shut Down' and its pid file removed; a
        message it accepted before is delivered by the server started next on the same database.
        """
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if os.path.exists(twistd):
            prefix = [sys.executable, twistd]
        else:
            prefix = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pidfile = os.path.join(directory, "twistd.pid")
        db = os.path.join(directory, "pager.sqlite3")
        child, address = await self.server_process(db, prefix + ["-n", "--pidfile", pidfile, "pager"])
        self.assertTrue(os.path.exists(pidfile))
        alice = await self.connect(address)
        await alice.register("alice", token("alice"), key("alice"))
        bob = await self.connect(address)
        await bob.register("bob", token("bob"), key("bob"))
        await bob.close()
        msg = await alice.send("bob", "accepted before SIGTERM")

        started = reactor.seconds()
        child.transport.signalProcess("TERM")
        result = await self.finish(child, "twistd after SIGTERM", timeout=10)
        self.assertLess(reactor.seconds() - started, 5)
        # twistd ends an orderly shutdown by re-raising the signal that asked for it (twisted.scripts.twistd.run,
        # app._exitWithSignal), so the status is "terminated by SIGTERM" rather than 0: accept exactly those two.
        self.assertTrue(result.code == 0 or (result.code is None and child.signal == signal.SIGTERM),
                        "exit code %r, signal %r\n%s" % (result.code, child.signal, result))
        self.assertIn("Server Shut Down", result.out + result.err)
        self.assertNotIn("Traceback", result.out + result.err)
        self.assertFalse(os.path.exists(pidfile))

        second, address = await self.server_process(db)
        bob = await self.login(address, "bob")
        await self.wait_for(lambda: bob.events.messages, "the message after the restart")
        self.assertOpened(bob.events.messages[0], "alice", b"accepted before SIGTERM", msg)
        await bob.close()
        second.transport.signalProcess("TERM")
        await self.finish(second, "the second server")
