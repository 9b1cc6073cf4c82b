"""
Tests for pager's server protocol: PagerServerProtocol and PagerServerFactory driven through StringTransport, with a
synchronous Store, a synchronous in_thread and a MemoryReactorClock, so that every answer is written before
dataReceived returns.  Also the client's side of the challenge rule.
"""

import base64
import dataclasses
import hashlib
import json
import os

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import pager

from tests.doubles import synchronous_store

TOKEN = "correct horse battery staple"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 1234)
REMOTE = IPv4Address("TCP", "203.0.113.5", 1)
MISSING = object()

_keys = {}


def private_key(label):
    """The module's RSA-2048 key for C{label} (usually a user name), generated once."""
    if label not in _keys:
        _keys[label] = pager.generate_private_key()
    return _keys[label]


def weak_key():
    """The module's RSA-1024 key, which pager must refuse."""
    if "weak" not in _keys:
        _keys["weak"] = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return _keys["weak"]


def pem(label):
    return pager.public_key_pem(private_key(label))


def b64(data):
    return base64.b64encode(data).decode("ascii")


def synchronous(f, *args, **kwargs):
    """An in_thread that runs C{f} at once, so that the server answers within dataReceived."""
    return defer.maybeDeferred(f, *args, **kwargs)


def seal(sender, recipients, plaintext=b"hello", sender_key=None, **kwargs):
    """An envelope from C{sender} to the named recipients, sealed with the module's keys."""
    keys = {name: private_key(name).public_key() for name in recipients}
    return pager.seal(sender_key or private_key(sender), sender, keys, plaintext, **kwargs)


def send_fields(envelope, to=None, size=None, signed=True):
    """The fields of a one-frame send request for C{envelope}."""
    fields = {
        "to": to if to is not None else pager.parse_header(envelope.header).recipient_names,
        "size": envelope.size if size is None else size,
        "header": b64(envelope.header),
        "chunks": [b64(c) for c in envelope.chunks],
    }
    if signed:
        fields["signature"] = b64(envelope.signature)
    return fields


def device_fields(key, user, name="laptop", created=1_700_000_000):
    """The register frame's "device" field: the identity device's self-certificate (RSA keys are certified once)."""
    try:
        user = pager.canonical_username(user)
    except pager.BadRequest:
        pass
    label = (pager.fingerprint(key), user, name, created)
    if label not in _certificates:
        try:
            _certificates[label] = pager.certify_device(key, user, key.public_key(), name, created)
        except (pager.BadKey, pager.BadCertificate):  # a request the server refuses before it looks at the device
            return {"name": name, "created": created, "certificate": b64(b"\0" * 256)}
    certificate = _certificates[label]
    return {"name": certificate.name, "created": certificate.created, "certificate": b64(certificate.signature)}


_certificates = {}


def msg_id(envelope):
    return pager.parse_header(envelope.header).message_id.hex()


class Connection:
    """
    A client's end of one connection to the server under test: requests go in as lines, everything the server
    writes comes out as parsed frames.  Tracks the latest challenge the server sent.
    """

    def __init__(self, factory, peer=LOOPBACK):
        self.protocol = factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.transport)
        self.challenge = None
        self._unread = []
        self._next_id = 0
        self.hello = self.read()[0]

    def read(self):
        """Every frame written to this connection since the last read, oldest first."""
        data = self.transport.value()
        self.transport.clear()
        frames, self._unread = self._unread, []
        lines = data.split(b"\n")
        assert lines[-1] == b"", "the server wrote a partial line: %r" % (lines[-1],)
        for line in lines[:-1]:
            frame = json.loads(line)
            if "challenge" in frame:
                self.challenge = base64.b64decode(frame["challenge"])
            frames.append(frame)
        return frames

    def pushed(self, kind):
        """The frames of type C{kind} written since the last read (other frames are dropped)."""
        return [f for f in self.read() if f["type"] == kind]

    def write_line(self, line):
        self.protocol.dataReceived(line + b"\n")

    def write(self, frame):
        self.write_line(pager.encode_frame(frame))

    def new_id(self):
        self._next_id += 1
        return self._next_id

    def request(self, kind, **fields):
        """Send one request and return its only answer; pushed frames stay for L{read}."""
        frame = {"type": kind, "id": fields.pop("id") if "id" in fields else self.new_id()}
        frame.update({k: v for k, v in fields.items() if v is not MISSING})
        self.write(frame)
        frames = self.read()
        answers = [f for f in frames if f["type"] in ("ok", "error") and f.get("id") == frame["id"]]
        if len(answers) != 1:
            raise AssertionError("expected one answer to %r, got %r" % (frame, frames))
        self._unread = [f for f in frames if f is not answers[0]]
        return answers[0]

    @property
    def server_id(self):
        return self.hello["server_id"]

    def register(self, user, key, token=TOKEN, proof_user=None, proof_key=None, challenge=None, purpose="register",
                 device=None):
        proof = pager.sign_auth(proof_key or key, purpose, self.server_id, proof_user or user,
                                challenge or self.challenge, pager.fingerprint(key))
        return self.request("register", user=user, public_key=pager.public_key_pem(key), token=token,
                            proof=b64(proof), device=device or device_fields(key, user))

    def login(self, user, key, token=TOKEN, receive=True, challenge=None, proof_user=None, server_id=None):
        proof = pager.sign_auth(key, "login", server_id or self.server_id, proof_user or user,
                                challenge or self.challenge)
        return self.request("login", user=user, token=token, proof=b64(proof), receive=receive)

    def send(self, envelope, **kwargs):
        return self.request("send", **send_fields(envelope, **kwargs))

    def ping(self):
        return self.request("ping")

    def lose(self):
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class ServerTestCase(SynchronousTestCase):
    """A server on a fresh store, with C{limits}; L{serve} swaps in other limits."""

    limits = pager.Limits()

    def setUp(self):
        self.store = synchronous_store(self.mktemp())
        self.addCleanup(self.store.close)
        self.server_id = self.successResultOf(self.store.open())
        self.clock = MemoryReactorClock()
        self.serve(self.limits)

    def serve(self, limits):
        self.factory = pager.PagerServerFactory(self.store, limits, reactor=self.clock, in_thread=synchronous,
                                                server_id=self.server_id)

    def connect(self, peer=LOOPBACK):
        return Connection(self.factory, peer)

    def register(self, user):
        """A connection on which C{user} has just registered (and so is logged in)."""
        conn = self.connect()
        self.assertOk(conn.register(user, private_key(user)))
        return conn

    def login(self, user, receive=True):
        conn = self.connect()
        self.assertOk(conn.login(user, private_key(user), receive=receive))
        return conn

    def offline(self, user):
        """Register C{user} and disconnect."""
        self.register(user).lose()

    def assertOk(self, answer):
        self.assertEqual(answer["type"], "ok", answer)
        return answer

    def assertError(self, answer, code):
        self.assertEqual((answer["type"], answer.get("code")), ("error", code), answer)
        self.assertIsInstance(answer["message"], str)
        return answer

    def assertStillOpen(self, conn):
        """The connection is open and answers a ping."""
        self.assertFalse(conn.transport.disconnecting)
        self.assertOk(conn.ping())


class HelloTests(ServerTestCase):

    def test_hello(self):
        """The server greets with protocol version, software, server id, a 32-byte challenge and the limits."""
        conn = self.connect()
        hello = conn.hello
        self.assertEqual(set(hello), {"type", "protocol", "server", "server_id", "challenge", "limits"})
        self.assertEqual(hello["type"], "hello")
        self.assertEqual(hello["protocol"], pager.PROTOCOL_VERSION)
        self.assertEqual(hello["server"], "pager/" + pager.__version__)
        self.assertEqual(hello["server_id"], self.server_id)
        self.assertEqual(len(base64.b64decode(hello["challenge"], validate=True)), 32)
        self.assertEqual(hello["limits"], self.limits.public())
        self.assertNotEqual(self.connect().hello["challenge"], hello["challenge"])


class MalformedRequestTests(ServerTestCase):
    """Requests the server cannot carry out get an error frame, and the connection goes on."""

    def assertLineRefused(self, conn, line, rid=MISSING):
        """The raw line gets exactly one bad_request error, echoing C{rid} if given, and the connection goes on."""
        conn.write_line(line)
        frames = conn.read()
        self.assertEqual(len(frames), 1, frames)
        self.assertError(frames[0], "bad_request")
        if rid is MISSING:
            self.assertNotIn("id", frames[0])
        else:
            self.assertEqual(frames[0]["id"], rid)
        self.assertStillOpen(conn)

    def assertFieldsRefused(self, conn, kind, base, cases):
        """Each (field, value, code) case, applied to C{base}, is refused with C{code} echoing the request id."""
        for number, (name, value, code) in enumerate(cases):
            fields = dict(base)
            if value is MISSING:
                del fields[name]
            else:
                fields[name] = value
            rid = "%s-%d" % (kind, number)
            answer = conn.request(kind, id=rid, **fields)
            self.assertEqual((answer["type"], answer.get("code")), ("error", code), (kind, name, value, answer))
            self.assertEqual(answer["id"], rid)
            self.assertStillOpen(conn)

    def test_malformedJSON(self):
        """A line that is not JSON gets bad_request without an id."""
        conn = self.connect()
        self.assertLineRefused(conn, b'{"type": "ping", "id": 1')
        self.assertLineRefused(conn, b"ping")

    def test_blankLineIgnored(self):
        """A blank line is allowed and answered with nothing; the connection keeps working."""
        conn = self.connect()
        conn.transport.clear()
        conn.protocol.dataReceived(b"\n  \r\n")
        self.assertEqual(conn.transport.value(), b"")
        self.assertFalse(conn.transport.disconnecting)

    def test_constants(self):
        """A frame with NaN gets bad_request echoing its id, which can still be read."""
        self.assertLineRefused(self.connect(), b'{"type":"ping","id":3,"x":NaN}', rid=3)

    def test_notAnObject(self):
        """JSON that is not an object ([], "x", 1, null) gets bad_request."""
        conn = self.connect()
        for line in (b"[]", b'"x"', b"1", b"null", b'[{"type":"ping","id":1}]'):
            self.assertLineRefused(conn, line)

    def test_invalidUTF8(self):
        """A line that is not UTF-8 gets bad_request."""
        self.assertLineRefused(self.connect(), b'{"type":"ping","id":1,"x":"\xff\xfe"}')

    def test_deepNesting(self):
        """A deeply nested line gets bad_request and the server does not fall over."""
        conn = self.connect()
        self.assertLineRefused(conn, b"[" * 4000)
        self.assertLineRefused(conn, b'{"type":"ping","id":1,"x":' + b"[" * 4000 + b"]" * 4000 + b"}")

    def test_hugeInteger(self):
        """A 5000-digit integer gets bad_request."""
        self.assertLineRefused(self.connect(), b'{"type":"ping","id":1,"n":' + b"1" * 5000 + b"}")

    def test_missingOrInvalidType(self):
        """A frame without a valid type gets bad_request echoing its id."""
        conn = self.connect()
        for line in (b'{"id":1}', b'{"type":7,"id":1}', b'{"type":"Ping","id":1}', b'{"type":"","id":1}'):
            self.assertLineRefused(conn, line, rid=1)

    def test_unknownType(self):
        """A frame of an unknown type gets bad_request echoing its id."""
        conn = self.connect()
        for kind in ("frobnicate", "ok", "hello", "message"):
            self.assertError(conn.request(kind, id="x"), "bad_request")
        self.assertStillOpen(conn)

    def test_missingId(self):
        """A request without a valid id gets bad_request without an id, before and after login."""
        for conn in (self.connect(), self.register("alice")):
            self.assertLineRefused(conn, b'{"type":"ping"}')
            for rid in (b"true", b"1.5", b"null", b"[1]", b'"' + b"x" * 65 + b'"', str(2 ** 53 + 1).encode()):
                self.assertLineRefused(conn, b'{"type":"ping","id":' + rid + b"}")

    def test_ids(self):
        """String and integer ids are echoed exactly."""
        conn = self.connect()
        for rid in (0, -5, 2 ** 53, "", "r\u00e9q", "x" * 64):
            self.assertEqual(conn.request("ping", id=rid), {"type": "ok", "id": rid})

    def test_registerFields(self):
        """Wrong-typed or missing register fields get bad_request, or bad_key for a bad public key."""
        conn = self.connect()
        base = {"user": "alice", "public_key": pem("alice"), "token": TOKEN, "proof": b64(b"\0" * 256)}
        self.assertFieldsRefused(conn, "register", base, [
            ("user", 7, "bad_request"), ("user", ["alice"], "bad_request"), ("user", MISSING, "bad_request"),
            ("public_key", "garbage", "bad_key"), ("public_key", 5, "bad_request"),
            ("public_key", MISSING, "bad_request"), ("public_key", pem("alice")[:200], "bad_key"),
            ("token", ["x" * 10], "bad_request"), ("token", 123456789, "bad_request"),
            ("token", MISSING, "bad_request"), ("token", "x" * 1025, "bad_request"),
            ("proof", "not base64!", "bad_request"), ("proof", 5, "bad_request"),
            ("proof", MISSING, "bad_request"),
        ])

    def test_loginFields(self):
        """Wrong-typed or missing login fields get bad_request."""
        conn = self.connect()
        base = {"user": "alice", "token": TOKEN, "proof": b64(b"\0" * 256), "receive": True}
        self.assertFieldsRefused(conn, "login", base, [
            ("user", 7, "bad_request"), ("user", MISSING, "bad_request"), ("user", "no such name!", "bad_request"),
            ("token", ["x" * 10], "bad_request"), ("token", MISSING, "bad_request"),
            ("token", "short", "bad_request"),
            ("proof", "***", "bad_request"), ("proof", MISSING, "bad_request"),
            ("receive", "yes", "bad_request"), ("receive", 1, "bad_request"),
        ])

    def test_rekeyFields(self):
        """Wrong-typed or missing rekey fields get bad_request, or bad_key for a bad public key."""
        conn = self.connect()
        base = {"user": "alice", "token": TOKEN, "public_key": pem("new"), "proof_old": b64(b"\0" * 256),
                "proof_new": b64(b"\0" * 256)}
        self.assertFieldsRefused(conn, "rekey", base, [
            ("public_key", "garbage", "bad_key"), ("public_key", ["x"], "bad_request"),
            ("proof_old", "***", "bad_request"), ("proof_old", MISSING, "bad_request"),
            ("proof_new", 5, "bad_request"), ("proof_new", MISSING, "bad_request"),
            ("user", 7, "bad_request"), ("token", [], "bad_request"), ("token", MISSING, "bad_request"),
        ])

    def test_recoverFields(self):
        """Wrong-typed or missing recover fields get bad_request, or bad_key for a bad public key."""
        conn = self.connect()
        base = {"user": "alice", "token": TOKEN, "public_key": pem("new"), "proof": b64(b"\0" * 256)}
        self.assertFieldsRefused(conn, "recover", base, [
            ("public_key", "garbage", "bad_key"), ("public_key", MISSING, "bad_request"),
            ("proof", "***", "bad_request"), ("proof", MISSING, "bad_request"),
            ("user", 7, "bad_request"), ("user", MISSING, "bad_request"), ("token", ["x"], "bad_request"),
        ])

    def test_keyFields(self):
        """A key request whose user is missing, not a string or not a valid name gets bad_request."""
        conn = self.register("alice")
        self.assertFieldsRefused(conn, "key", {"user": "alice"}, [
            ("user", 7, "bad_request"), ("user", MISSING, "bad_request"), ("user", "a b", "bad_request"),
        ])

    def test_sendFields(self):
        """Wrong-typed or missing send fields get bad_request."""
        conn = self.register("alice")
        base = send_fields(seal("alice", ["alice"]))
        self.assertFieldsRefused(conn, "send", base, [
            ("to", "alice", "bad_request"), ("to", [], "bad_request"), ("to", [5], "bad_request"),
            ("to", ["alice", "Alice"], "bad_request"), ("to", MISSING, "bad_request"),
            ("size", -1, "bad_request"), ("size", True, "bad_request"), ("size", "5", "bad_request"),
            ("size", 5.0, "bad_request"), ("size", MISSING, "bad_request"),
            ("header", 5, "bad_request"), ("header", "***", "bad_request"), ("header", MISSING, "bad_request"),
            ("header", b64(b"not an envelope"), "bad_request"),
            ("chunks", "x", "bad_request"), ("chunks", [5], "bad_request"), ("chunks", ["***"], "bad_request"),
            ("chunks", {"0": "x"}, "bad_request"),
            ("signature", "***", "bad_request"), ("signature", 5, "bad_request"),
        ])

    def test_chunkFields(self):
        """A chunk frame with wrong-typed fields, or for no upload in progress, gets bad_request."""
        conn = self.register("alice")
        self.assertFieldsRefused(conn, "chunk", {"chunks": []}, [
            ("chunks", "x", "bad_request"), ("chunks", [5], "bad_request"), ("signature", 5, "bad_request"),
            ("chunks", [], "bad_request"),
        ])

    def test_ackFields(self):
        """Wrong-typed ack fields (msg not a 32-digit hex string, receipt not a positive integer) get bad_request."""
        conn = self.register("alice")
        self.assertFieldsRefused(conn, "ack", {"msg": "00" * 16}, [
            ("msg", 5, "bad_request"), ("msg", "zz" * 16, "bad_request"), ("msg", "ab", "bad_request"),
            ("msg", "00" * 17, "bad_request"), ("msg", MISSING, "bad_request"), ("msg", None, "bad_request"),
            ("receipt", "1", "bad_request"), ("receipt", 0, "bad_request"), ("receipt", True, "bad_request"),
            ("receipt", -1, "bad_request"), ("receipt", 1.0, "bad_request"),
        ])

    def test_ackListFields(self):
        """
        The list form of ack refuses, with bad_request and without touching anything, a list that is empty, too
        long, or holds one item of the wrong kind.
        """
        conn = self.register("alice")
        good = "00" * 16
        self.assertFieldsRefused(conn, "ack", {"msgs": [good]}, [
            ("msgs", [], "bad_request"), ("msgs", good, "bad_request"), ("msgs", [good, 5], "bad_request"),
            ("msgs", [good, "zz" * 16], "bad_request"), ("msgs", [good, "ab"], "bad_request"),
            ("msgs", [" " + "00" * 15 + " "], "bad_request"),
            ("msgs", [good] * (pager.MAX_ACK_BATCH + 1), "bad_request"),
            ("receipts", [], "bad_request"), ("receipts", [1, "2"], "bad_request"), ("receipts", [0], "bad_request"),
            ("receipts", [True], "bad_request"), ("receipts", [2 ** 63], "bad_request"),
            ("receipts", list(range(1, pager.MAX_ACK_BATCH + 2)), "bad_request"),
        ])

    def test_ackListRefusedWhole(self):
        """A list-form ack with good message ids but a malformed receipt list acknowledges nothing."""
        self.offline("bob")
        alice = self.register("alice")
        envelope = seal("alice", ["bob"])
        self.assertOk(alice.send(envelope))
        bob = self.login("bob")
        [message] = bob.pushed("message")
        self.assertError(bob.request("ack", msgs=[message["msg"]], receipts=["1"]), "bad_request")
        bob.lose()
        self.assertEqual([f["msg"] for f in self.login("bob").pushed("message")], [msg_id(envelope)])

    def test_rejectFields(self):
        """Wrong-typed reject fields get bad_request."""
        conn = self.register("alice")
        self.assertFieldsRefused(conn, "reject", {"msg": "00" * 16, "reason": "no"}, [
            ("msg", 5, "bad_request"), ("msg", MISSING, "bad_request"),
            ("reason", 5, "bad_request"), ("reason", MISSING, "bad_request"), ("reason", "x" * 501, "bad_request"),
        ])

    def test_ackReceiptOutOfRange(self):
        """An ack for receipt 2**63, the top of the accepted range, is refused cleanly, not as an internal error."""
        conn = self.register("alice")
        self.assertError(conn.request("ack", receipt=2 ** 63), "bad_request")
        self.assertStillOpen(conn)

    def test_surrogateToken(self):
        """A safetoken holding a lone surrogate escape, which is not UTF-8, gets bad_request, not an internal error."""
        conn = self.connect()
        answer = conn.register("alice", private_key("alice"), token="\ud800" * 8)
        self.assertError(answer, "bad_request")
        self.assertStillOpen(conn)

    def test_surrogateReason(self):
        """A reject reason holding a lone surrogate escape gets bad_request, not an internal error."""
        self.offline("bob")
        alice = self.register("alice")
        envelope = seal("alice", ["bob"])
        self.assertOk(alice.send(envelope))
        bob = self.login("bob")
        bob.read()
        self.assertError(bob.request("reject", msg=msg_id(envelope), reason="\udc80 bad"), "bad_request")
        self.assertStillOpen(bob)


class LineLengthTests(ServerTestCase):
    """Lines longer than the limit for the connection's state get too_large and the connection is closed."""

    limits = pager.Limits(max_line=96 * 1024)

    def padded_ping(self, length):
        """A ping line of exactly C{length} bytes."""
        prefix, suffix = b'{"type":"ping","id":1,"pad":"', b'"}'
        return prefix + b"x" * (length - len(prefix) - len(suffix)) + suffix

    def assertTooLarge(self, conn):
        frames = conn.read()
        self.assertEqual([(f["type"], f["code"]) for f in frames], [("error", "too_large")], frames)
        self.assertTrue(conn.transport.disconnecting)

    def test_longestLineBeforeLogin(self):
        """A line of exactly max_line_unauthenticated bytes is accepted before login."""
        conn = self.connect()
        conn.write_line(self.padded_ping(self.limits.max_line_unauthenticated))
        self.assertEqual(conn.read(), [{"type": "ok", "id": 1}])

    def test_oversizeBeforeLogin(self):
        """A line one byte over max_line_unauthenticated before login gets too_large and is closed."""
        conn = self.connect()
        conn.write_line(self.padded_ping(self.limits.max_line_unauthenticated + 1))
        self.assertTooLarge(conn)

    def test_oversizeWithoutDelimiter(self):
        """Bytes past max_line_unauthenticated without a newline get too_large and are closed."""
        conn = self.connect()
        conn.protocol.dataReceived(b"x" * (self.limits.max_line_unauthenticated + 1))
        self.assertTooLarge(conn)

    def test_oversizeAfterLogin(self):
        """A line one byte over max_line after login gets too_large and is closed."""
        conn = self.register("alice")
        conn.write_line(self.padded_ping(self.limits.max_line + 1))
        self.assertTooLarge(conn)

    def test_longLineAfterLogin(self):
        """A line over the pre-login limit but within max_line is fine after login."""
        conn = self.register("alice")
        conn.write_line(self.padded_ping(self.limits.max_line_unauthenticated * 2))
        self.assertEqual(conn.read(), [{"type": "ok", "id": 1}])
        conn.write_line(self.padded_ping(self.limits.max_line))
        self.assertEqual(conn.read(), [{"type": "ok", "id": 1}])
        self.assertStillOpen(conn)


class LineSplittingTests(ServerTestCase):
    """
    The server finds every line of a read where it is (not splitting its buffer anew per line), to the same rules
    as LineReceiver: lines across reads, held reading, data that comes while a line is handled, long lines.
    """

    def test_manyLinesAcrossReads(self):
        """Requests split anywhere across reads are each answered once, in order."""
        conn = self.register("alice")
        data = b"".join(b'{"type":"ping","id":%d}\n' % n for n in range(200))
        for start in range(0, len(data), 37):
            conn.protocol.dataReceived(data[start:start + 37])
        self.assertEqual([f["id"] for f in conn.read()], list(range(200)))
        conn.protocol.dataReceived(b'{"type":"ping","id":"half')
        self.assertEqual(conn.read(), [])
        conn.protocol.dataReceived(b'"}\n{"type":"ping","id":"next"}\n')
        self.assertEqual([f["id"] for f in conn.read()], ["half", "next"])

    def test_heldReadingKeepsTheRest(self):
        """Lines read while the server holds reading wait, and are answered in order once it resumes."""
        conn = self.register("alice")
        conn.protocol._hold("test")
        conn.protocol.dataReceived(b'{"type":"ping","id":1}\n{"type":"ping","id":2}\n{"type":"ping",')
        self.assertEqual(conn.read(), [])
        conn.protocol.dataReceived(b'"id":3}\n')
        conn.protocol._release("test")
        self.assertEqual([f["id"] for f in conn.read()], [1, 2, 3])

    def test_heldByAnEarlierLine(self):
        """A line that holds reading (max_in_flight reached) leaves the lines after it in the same read unread."""
        conn = self.register("alice")
        held = self.factory.store = _HeldStore(self.store)
        lines = b"".join(b'{"type":"users","id":%d}\n' % n for n in range(self.limits.max_in_flight + 3))
        conn.protocol.dataReceived(lines)
        self.assertEqual(len(held.held), self.limits.max_in_flight)
        self.assertEqual(conn.read(), [])
        held.release()  # answered: reading resumes, and the three left in the read are asked of the store
        self.assertEqual(len([f for f in conn.read() if f["type"] == "ok"]), self.limits.max_in_flight)
        self.assertEqual(len(held.held), 3)
        held.release()
        self.assertEqual([f["id"] for f in conn.read()], [self.limits.max_in_flight + n for n in range(3)])

    def test_longLineAmongShortOnes(self):
        """A line over the limit after good ones in the same read: those are answered, then too_large and close."""
        conn = self.connect()
        long_line = b'{"type":"ping","id":9,"pad":"' + b"x" * self.limits.max_line_unauthenticated + b'"}'
        conn.protocol.dataReceived(b'{"type":"ping","id":1}\n' + long_line + b'\n{"type":"ping","id":2}\n')
        frames = conn.read()
        self.assertEqual([(f["type"], f.get("id"), f.get("code")) for f in frames],
                         [("ok", 1, None), ("error", None, "too_large")])
        self.assertTrue(conn.transport.disconnecting)


class NotAuthenticatedTests(ServerTestCase):

    def test_requestsBeforeLogin(self):
        """users, key, send, chunk, ack and reject before login get not_authenticated, and the connection goes on."""
        conn = self.connect()
        envelope = seal("alice", ["alice"])
        for kind, fields in [("users", {}), ("key", {"user": "alice"}), ("send", send_fields(envelope)),
                             ("chunk", {"chunks": []}), ("ack", {"msg": msg_id(envelope)}),
                             ("ack", {"receipt": 1}), ("reject", {"msg": msg_id(envelope), "reason": "x"})]:
            self.assertError(conn.request(kind, **fields), "not_authenticated")
        self.assertStillOpen(conn)


class RegisterTests(ServerTestCase):

    def test_register(self):
        """A valid register answers ok with the user and logs the connection in."""
        conn = self.connect()
        answer = conn.register("alice", private_key("alice"))
        self.assertEqual(set(answer), {"type", "id", "user", "challenge", "device"})
        self.assertEqual((answer["type"], answer["user"]), ("ok", "alice"))
        self.assertEqual(self.assertOk(conn.request("users"))["online"], ["alice"])

    def test_taken(self):
        """Registering a taken name gets user_exists."""
        self.register("alice")
        conn = self.connect()
        self.assertError(conn.register("alice", private_key("mallory")), "user_exists")
        self.assertError(conn.request("users"), "not_authenticated")

    def test_caseFolding(self):
        """A name is registered in lower case, and the upper-case spelling is then taken."""
        conn = self.connect()
        answer = self.assertOk(conn.register("Alice", private_key("alice"), proof_user="alice"))
        self.assertEqual(answer["user"], "alice")
        self.assertEqual(self.assertOk(conn.request("key", user="ALICE"))["user"], "alice")
        self.assertError(self.connect().register("ALICE", private_key("mallory"), proof_user="alice"),
                         "user_exists")

    def test_invalidNames(self):
        """Names that are empty, too long, badly formed or not ASCII get bad_request and register nothing."""
        conn = self.connect()
        for name in ("", "-alice", ".alice", "_alice", "a" * 33, "al ice", "al/ice", "alice\n", "\u212aelvin",
                     "\u00e5sa", "al\u0131ce"):
            self.assertError(conn.register(name, private_key("alice"), proof_user="alice"), "bad_request")
        self.assertStillOpen(conn)
        self.assertEqual(self.successResultOf(self.store.user_names()), [])

    def test_longestName(self):
        """A 32-character name is accepted."""
        conn = self.connect()
        self.assertEqual(self.assertOk(conn.register("a" * 32, private_key("alice")))["user"], "a" * 32)

    def test_shortToken(self):
        """A safetoken shorter than 8 characters gets bad_request; 8 characters are enough."""
        conn = self.connect()
        self.assertError(conn.register("alice", private_key("alice"), token="1234567"), "bad_request")
        self.assertOk(conn.register("alice", private_key("alice"), token="12345678"))

    def test_badProof(self):
        """A proof by another key, for another purpose or for another name gets auth_failed and registers nothing."""
        conn = self.connect()
        key = private_key("alice")
        self.assertError(conn.register("alice", key, proof_key=private_key("mallory")), "auth_failed")
        self.assertError(conn.register("alice", key, purpose="login"), "auth_failed")
        self.assertError(conn.register("alice", key, proof_user="bob"), "auth_failed")
        self.assertError(conn.request("register", user="alice", public_key=pem("alice"), token=TOKEN,
                                      proof=b64(b"\0" * 256), device=device_fields(key, "alice")), "auth_failed")
        self.assertEqual(self.successResultOf(self.store.user_names()), [])
        self.assertOk(conn.register("alice", key))

    def test_staleChallenge(self):
        """A proof over the hello challenge, after one attempt consumed it, gets auth_failed."""
        conn = self.connect()
        hello_challenge = conn.challenge
        self.assertError(conn.register("alice", private_key("alice"), proof_key=private_key("mallory")),
                         "auth_failed")
        self.assertNotEqual(conn.challenge, hello_challenge)
        self.assertError(conn.register("alice", private_key("alice"), challenge=hello_challenge), "auth_failed")
        self.assertOk(conn.register("alice", private_key("alice")))

    def test_weakKey(self):
        """A 1024-bit key gets bad_key."""
        conn = self.connect()
        self.assertError(conn.register("alice", weak_key()), "bad_key")
        self.assertStillOpen(conn)


class LoginTests(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.offline("alice")

    def test_login(self):
        """Login with the right token and proof answers ok with the user."""
        conn = self.connect()
        answer = conn.login("alice", private_key("alice"))
        self.assertEqual(set(answer), {"type", "id", "user", "challenge", "pending", "device", "certified",
                                       "prekeys"})
        self.assertEqual((answer["type"], answer["user"], answer["pending"]), ("ok", "alice", 0))
        self.assertOk(conn.request("users"))

    def test_wrongToken(self):
        """A wrong token gets auth_failed and does not log in."""
        conn = self.connect()
        self.assertError(conn.login("alice", private_key("alice"), token="wrong token"), "auth_failed")
        self.assertError(conn.request("users"), "not_authenticated")

    def test_unknownUserLikeWrongToken(self):
        """An unknown user gets auth_failed with the same message as a wrong token."""
        conn = self.connect()
        wrong = self.assertError(conn.login("alice", private_key("alice"), token="wrong token"), "auth_failed")
        unknown = self.assertError(conn.login("nobody", private_key("mallory")), "auth_failed")
        self.assertEqual(unknown["message"], wrong["message"])

    def test_badProof(self):
        """A proof by another key or over a stale challenge gets auth_failed."""
        conn = self.connect()
        hello_challenge = conn.challenge
        self.assertError(conn.login("alice", private_key("mallory")), "auth_failed")
        self.assertError(conn.login("alice", private_key("alice"), challenge=hello_challenge), "auth_failed")
        self.assertError(conn.request("users"), "not_authenticated")

    def test_secondLogin(self):
        """A second login on a logged-in connection gets bad_request."""
        conn = self.login("alice")
        self.assertError(conn.login("alice", private_key("alice")), "bad_request")
        self.assertError(conn.register("carol", private_key("carol")), "bad_request")
        self.assertStillOpen(conn)

    def test_refusedSecondLoginFreshChallenge(self):
        """Even the bad_request answer to a second login carries a challenge different from the previous one."""
        conn = self.login("alice")
        previous = conn.challenge
        answer = self.assertError(conn.login("alice", private_key("alice")), "bad_request")
        self.assertIn("challenge", answer)
        self.assertNotEqual(conn.challenge, previous)


class ChallengeTests(ServerTestCase):

    def test_freshChallenges(self):
        """
        Every answer to a well-formed register or login, ok or error, carries a new challenge; a malformed one
        (here a bad name or a short token) takes nothing: its answer has no challenge and the current one stays.
        """
        seen = []

        def check(conn, answer):
            self.assertIn("challenge", answer)
            challenge = base64.b64decode(answer["challenge"], validate=True)
            self.assertEqual(len(challenge), 32)
            self.assertNotIn(challenge, seen)
            seen.append(challenge)

        def unchanged(conn, answer):
            self.assertError(answer, "bad_request")
            self.assertNotIn("challenge", answer)
            self.assertEqual(conn.challenge, seen[-1])

        conn = self.connect()
        seen.append(conn.challenge)
        check(conn, conn.register("alice", private_key("alice"), proof_key=private_key("mallory")))
        unchanged(conn, conn.register("a b", private_key("alice")))
        unchanged(conn, conn.register("alice", private_key("alice"), token="short"))
        check(conn, conn.register("alice", private_key("alice")))
        other = self.connect()
        seen.append(other.challenge)
        check(other, other.register("alice", private_key("mallory")))
        check(other, other.login("alice", private_key("mallory")))
        check(other, other.login("alice", private_key("alice"), token="wrong token"))
        check(other, other.login("nobody", private_key("alice")))
        unchanged(other, other.login("alice", private_key("alice"), receive="yes"))
        check(other, other.login("alice", private_key("alice")))


class SendTests(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.offline("bob")

    def test_accepted(self):
        """A valid message is answered ok with its id and duplicate false."""
        envelope = seal("alice", ["bob"])
        answer = self.assertOk(self.alice.send(envelope))
        self.assertEqual(answer["msg"], msg_id(envelope))
        self.assertIs(answer["duplicate"], False)
        self.assertEqual(answer["queued"], ["bob"])

    def test_acceptedAnswerFields(self):
        """The ok answer to send carries msg, accepted_at and duplicate, as the protocol summary documents."""
        self.clock.advance(100)
        answer = self.assertOk(self.alice.send(seal("alice", ["bob"])))
        self.assertLessEqual({"type", "id", "msg", "accepted_at", "duplicate"}, set(answer))
        self.assertEqual(answer["accepted_at"], 100)

    def test_forgedSenderName(self):
        """An envelope sealed as mallory by alice's session gets forbidden."""
        envelope = seal("mallory", ["bob"], sender_key=private_key("alice"))
        self.assertError(self.alice.send(envelope), "forbidden")

    def test_forgedSenderKey(self):
        """An envelope sealed as alice with another key gets forbidden."""
        envelope = seal("alice", ["bob"], sender_key=private_key("mallory"))
        self.assertError(self.alice.send(envelope), "forbidden")

    def test_recipientsMismatch(self):
        """Envelope recipients that are not exactly the "to" list get bad_request."""
        envelope = seal("alice", ["bob"])
        self.assertError(self.alice.send(envelope, to=["alice"]), "bad_request")
        self.assertError(self.alice.send(envelope, to=["alice", "bob"]), "bad_request")
        envelope = seal("alice", ["alice", "bob"])
        self.assertError(self.alice.send(envelope, to=["bob"]), "bad_request")

    def test_unknownRecipient(self):
        """A message to an unknown user gets unknown_user naming that user."""
        answer = self.assertError(self.alice.send(seal("alice", ["carol"])), "unknown_user")
        self.assertIn("carol", answer["message"])

    def test_sizeTooLarge(self):
        """A declared size larger than the message gets bad_request."""
        envelope = seal("alice", ["bob"])
        self.assertError(self.alice.send(envelope, size=envelope.size + 1), "bad_request")

    def test_sizeTooSmall(self):
        """A declared size smaller than the message gets bad_request, since the size is wrong, not the message."""
        envelope = seal("alice", ["bob"])
        self.assertError(self.alice.send(envelope, size=envelope.size - 1), "bad_request")

    def test_overMaxMessage(self):
        """A message over max_message gets too_large; one of exactly max_message is accepted."""
        self.serve(pager.Limits(max_message=100))
        alice = self.login("alice")
        self.assertError(alice.send(seal("alice", ["bob"], b"x" * 101)), "too_large")
        self.assertOk(alice.send(seal("alice", ["bob"], b"x" * 100)))

    def test_quota(self):
        """With max_pending_messages=2, a third pending message for a recipient gets quota_exceeded."""
        self.serve(pager.Limits(max_pending_messages=2))
        alice = self.login("alice")
        self.assertOk(alice.send(seal("alice", ["bob"], b"1")))
        self.assertOk(alice.send(seal("alice", ["bob"], b"2")))
        answer = self.assertError(alice.send(seal("alice", ["bob"], b"3")), "quota_exceeded")
        self.assertIn("bob", answer["message"])

    def test_multiRecipientAllOrNothing(self):
        """A message to a known and an unknown recipient is refused as a whole: the known one never gets it."""
        envelope = seal("alice", ["bob", "carol"])
        answer = self.assertError(self.alice.send(envelope), "unknown_user")
        self.assertIn("carol", answer["message"])
        self.assertNotIn("bob", answer["message"])
        bob = self.login("bob")
        self.assertEqual(bob.read(), [])
        self.assertEqual(self.successResultOf(self.store.get_user("bob")).pending_count, 0)

    def test_badSignature(self):
        """A signature that does not verify gets bad_request and nothing is delivered."""
        envelope = seal("alice", ["bob"])
        tampered = bytearray(envelope.signature)
        tampered[-1] ^= 1
        envelope.signature = bytes(tampered)
        self.assertError(self.alice.send(envelope), "bad_request")
        other = seal("alice", ["bob"])
        envelope.signature = other.signature
        self.assertError(self.alice.send(envelope), "bad_request")
        self.assertEqual(self.login("bob").read(), [])

    def test_duplicate(self):
        """Resending the same message gives ok with duplicate true, and it is delivered once."""
        bob = self.login("bob")
        envelope = seal("alice", ["bob"])
        first = self.assertOk(self.alice.send(envelope))
        second = self.assertOk(self.alice.send(envelope))
        self.assertEqual((first["duplicate"], second["duplicate"]), (False, True))
        self.assertEqual(second["msg"], first["msg"])
        self.assertEqual([f["msg"] for f in bob.pushed("message")], [msg_id(envelope)])
        bob.lose()
        self.assertEqual([f["msg"] for f in self.login("bob").pushed("message")], [msg_id(envelope)])


class UploadTests(ServerTestCase):
    """Messages too large for one line go up as a send header frame and chunk frames."""

    limits = pager.Limits(max_line=96 * 1024)

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")
        self.envelope = seal("alice", ["bob"], b"0123456789" * 500, chunk_size=1024)

    def header_frame(self, envelope, rid="up"):
        fields = send_fields(envelope, signed=False)
        fields["chunks"] = []
        return dict(fields, type="send", id=rid)

    def chunk_frames(self, envelope, rid="up"):
        frames = []
        for index, chunk in enumerate(envelope.chunks):
            frame = {"type": "chunk", "id": rid, "chunks": [b64(chunk)]}
            if index == len(envelope.chunks) - 1:
                frame["signature"] = b64(envelope.signature)
            frames.append(frame)
        return frames

    def test_lostWhileLastChunkCommits(self):
        """
        When the connection drops while the last chunk frame's chunks are being committed, the dropped upload is
        not accepted afterwards: no delivery without its message, and the recipient's quota is not counted.
        """
        self.bob.lose()
        store_add_chunks = self.store.add_chunks
        held = []

        def add_chunks(seq, start, chunks):  # committed at once, but its answer reaches the reactor later
            answer = defer.Deferred()
            held.append((store_add_chunks(seq, start, chunks), answer))
            return answer

        frames = self.chunk_frames(self.envelope)
        self.alice.write(self.header_frame(self.envelope))
        for frame in frames[:-1]:
            self.alice.write(frame)
        self.patch(self.store, "add_chunks", add_chunks)
        self.alice.write(frames[-1])
        self.alice.lose()  # the upload is dropped now
        committed, answer = held.pop()
        committed.chainDeferred(answer)
        query = lambda sql: self.successResultOf(  # noqa: E731
            self.store.pool.runInteraction(lambda txn: txn.execute(sql).fetchall()))
        self.assertEqual(query("SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(query("SELECT COUNT(*) FROM chunks"), [(0,)])
        self.assertEqual(query("SELECT COUNT(*) FROM deliveries"), [(0,)])
        self.assertEqual(query("SELECT pending_count, pending_bytes FROM users WHERE name = 'bob'"), [(0, 0)])
        self.assertEqual(self.login("bob").read(), [])

    def test_upload(self):
        """A header frame and chunk frames are answered once, at the end, and reach the recipient whole."""
        envelope = self.envelope
        self.assertEqual(len(envelope.chunks), 5)
        self.alice.write(self.header_frame(envelope))
        self.assertEqual(self.alice.read(), [])
        frames = self.chunk_frames(envelope)
        for frame in frames[:-1]:
            self.alice.write(frame)
            self.assertEqual(self.alice.read(), [])
        self.assertEqual(self.bob.read(), [])
        self.alice.write(frames[-1])
        [answer] = self.alice.read()
        self.assertEqual((answer["type"], answer["id"], answer["msg"], answer["duplicate"], answer["queued"]),
                         ("ok", "up", msg_id(envelope), False, []))

        pushed = self.bob.read()
        self.assertEqual([f["type"] for f in pushed], ["message"] + ["message_chunk"] * 5)
        self.assertEqual({f["msg"] for f in pushed}, {msg_id(envelope)})
        self.assertEqual(pushed[0]["from"], "alice")
        self.assertEqual(pushed[0]["header"], b64(envelope.header))
        self.assertEqual(pushed[0]["size"], 5000)
        chunks = [base64.b64decode(c) for f in pushed for c in f["chunks"]]
        self.assertEqual(chunks, envelope.chunks)
        self.assertEqual([("signature" in f) for f in pushed], [False] * 5 + [True])
        signature = base64.b64decode(pushed[-1]["signature"])
        opened = pager.open_envelope(pager.Envelope(envelope.header, chunks, signature), private_key("bob"), "bob",
                                     private_key("alice").public_key())
        self.assertEqual(opened.plaintext, b"0123456789" * 500)

    def test_uploadOvertakenByLaterMessage(self):
        """
        An upload begun before a later single-frame message, and finished after it, still reaches the online
        recipient at once: delivery order is the order of acceptance, not of the upload's start.
        """
        self.alice.write(self.header_frame(self.envelope))
        carol = self.register("carol")
        quick = seal("carol", ["bob"], b"quick")
        self.assertOk(carol.send(quick))
        [first] = self.bob.read()
        self.assertEqual(first["msg"], msg_id(quick))
        for frame in self.chunk_frames(self.envelope):
            self.alice.write(frame)
        self.assertEqual(self.alice.read()[-1]["type"], "ok")
        pushed = self.bob.read()
        self.assertEqual([f["type"] for f in pushed], ["message"] + ["message_chunk"] * 5)
        self.assertEqual({f["msg"] for f in pushed}, {msg_id(self.envelope)})

    def test_errorMidUpload(self):
        """A malformed chunk gets one error; later chunk frames of that upload are dropped without answers."""
        frames = self.chunk_frames(self.envelope)
        self.alice.write(self.header_frame(self.envelope))
        self.alice.write(frames[0])
        self.alice.write({"type": "chunk", "id": "up", "chunks": ["***"]})
        for frame in frames[2:]:
            self.alice.write(frame)
        answers = self.alice.read()
        self.assertEqual(len(answers), 1, answers)
        self.assertError(answers[0], "bad_request")
        self.assertEqual(answers[0]["id"], "up")
        self.assertStillOpen(self.alice)
        self.assertEqual(self.bob.read(), [])
        # The refused upload left nothing behind: the same message goes through afterwards.
        self.assertOk(self.alice.send(self.envelope))
        self.assertEqual(len(self.bob.pushed("message")), 1)

    def test_headerRefused(self):
        """An upload refused at its header frame gets one error; its chunk frames are dropped without answers."""
        envelope = seal("alice", ["carol"], b"0123456789" * 500, chunk_size=1024)
        self.alice.write(self.header_frame(envelope))
        for frame in self.chunk_frames(envelope):
            self.alice.write(frame)
        answers = self.alice.read()
        self.assertEqual(len(answers), 1, answers)
        self.assertError(answers[0], "unknown_user")
        self.assertEqual(answers[0]["id"], "up")
        self.assertStillOpen(self.alice)

    def test_duplicateUpload(self):
        """Uploading an accepted message again in chunk frames gives ok with duplicate true and no second delivery."""
        for _ in range(2):
            self.alice.write(self.header_frame(self.envelope))
            for frame in self.chunk_frames(self.envelope):
                self.alice.write(frame)
        self.assertEqual([f["duplicate"] for f in self.alice.read()], [False, True])
        self.assertEqual(len(self.bob.pushed("message")), 1)


class UploadLimitTests(ServerTestCase):
    """
    What one user's unfinished uploads may hold: their declared size counted against every quota from the first
    frame, a few at a time, dropped when idle, and within the database's budget.
    """

    def setUp(self):
        super().setUp()
        self.serve(pager.Limits(max_line=96 * 1024, max_pending_bytes=12000, max_open_uploads=2))
        self.alice = self.register("alice")
        self.offline("bob")
        self.envelope = seal("alice", ["bob"], b"0123456789" * 500, chunk_size=1024)

    header_frame = UploadTests.header_frame
    chunk_frames = UploadTests.chunk_frames

    def query(self, sql, *args):
        return self.successResultOf(self.store.pool.runInteraction(lambda txn: txn.execute(sql, args).fetchall()))

    def counters(self, name):
        return self.query("SELECT pending_count, pending_bytes, sent_count, sent_bytes FROM users WHERE name = ?",
                          name)[0]

    def begin(self, conn, envelope, rid="up"):
        """The header frame and the first chunk frame of C{envelope}'s upload, with no answer."""
        conn.write(self.header_frame(envelope, rid))
        conn.write(self.chunk_frames(envelope, rid)[0])
        self.assertEqual(conn.read(), [])

    def test_reservationCounted(self):
        """
        An upload's declared size counts against the recipient's and the sender's quotas from its first frame:
        while it is open, another message that would not fit beside it is refused, and once it is accepted it is
        counted once.
        """
        self.begin(self.alice, self.envelope)
        self.assertEqual(self.counters("bob"), (1, 5000, 0, 0))
        self.assertEqual(self.counters("alice"), (0, 0, 1, 5000))
        carol = self.register("carol")
        answer = self.assertError(carol.send(seal("carol", ["bob"], b"x" * 7001)), "quota_exceeded")
        self.assertIn("bob", answer["message"])
        self.assertOk(carol.send(seal("carol", ["bob"], b"x" * 7000)))
        for frame in self.chunk_frames(self.envelope)[1:]:
            self.alice.write(frame)
        self.assertOk(self.alice.read()[-1])
        self.assertEqual(self.counters("bob"), (2, 12000, 0, 0))
        self.assertEqual(self.counters("alice"), (0, 0, 1, 5000))

    def test_openUploadLimit(self):
        """
        A user may have max_open_uploads uploads open at once, over all their connections: one more is refused
        with rate_limited (its chunk frames dropped quietly) until one of them ends.
        """
        other = self.login("alice")
        third = self.login("alice")
        self.begin(self.alice, self.envelope)
        self.begin(other, seal("alice", ["bob"], b"1" * 3000, chunk_size=1024))
        refused = seal("alice", ["bob"], b"2" * 3000, chunk_size=1024)
        third.write(self.header_frame(refused))
        for frame in self.chunk_frames(refused):
            third.write(frame)
        [answer] = third.read()
        self.assertError(answer, "rate_limited")
        self.assertEqual(answer["id"], "up")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(2,)])
        other.lose()  # its upload ends: the place is free again
        third.write(self.header_frame(refused, "again"))
        for frame in self.chunk_frames(refused, "again"):
            third.write(frame)
        self.assertOk(third.read()[-1])

    def test_idleUploadDropped(self):
        """
        An upload with no chunk frame for upload_idle_timeout seconds is dropped: its id is answered timeout, its
        chunks and its reservation are gone, its late chunk frames are dropped quietly, and the connection lives.
        """
        timeout = self.factory.limits.upload_idle_timeout
        frames = self.chunk_frames(self.envelope)
        self.begin(self.alice, self.envelope)
        self.clock.advance(timeout - 1)
        self.alice.write(frames[1])  # a chunk frame starts the wait again
        self.clock.advance(timeout - 1)
        self.assertEqual(self.alice.read(), [])
        self.clock.advance(1)
        [answer] = self.alice.read()
        self.assertError(answer, "timeout")
        self.assertEqual(answer["id"], "up")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(self.query("SELECT COUNT(*) FROM chunks"), [(0,)])
        self.assertEqual(self.counters("bob"), (0, 0, 0, 0))
        self.assertEqual(self.counters("alice"), (0, 0, 0, 0))
        for frame in frames[2:]:
            self.alice.write(frame)
        self.assertEqual(self.alice.read(), [])
        self.assertStillOpen(self.alice)
        self.assertEqual(self.factory.open_uploads, {})
        self.assertOk(self.alice.send(self.envelope))

    def test_manyUnfinishedUploads(self):
        """
        The reviewed attack, scaled down: 16 connections of one user each declare a large message and stream every
        chunk but the last.  Only what the user's bounds allow begins, all of it counted; the rest is refused at its
        header frame, and a minute later nothing of it is left.
        """
        self.serve(pager.Limits(max_line=96 * 1024, max_open_uploads=4, max_sender_pending_bytes=3 * 20480))
        conns = [self.login("alice") for _ in range(16)]
        answers = []
        for n, conn in enumerate(conns):
            envelope = seal("alice", ["bob"], bytes([n]) * 20480, chunk_size=1024)
            conn.write(self.header_frame(envelope))
            for frame in self.chunk_frames(envelope)[:-1]:
                conn.write(frame)
            answers.append([f.get("code") for f in conn.read()])
        self.assertEqual(answers, [[]] * 3 + [["quota_exceeded"]] * 13)
        self.assertEqual(self.counters("bob"), (3, 3 * 20480, 0, 0))
        self.assertEqual(self.counters("alice")[2:], (3, 3 * 20480))
        self.assertLessEqual(self.query("SELECT SUM(LENGTH(data)) FROM chunks")[0][0], 3 * (20480 + 20 * 16))
        self.clock.advance(self.factory.limits.upload_idle_timeout)
        self.assertEqual([[f.get("code") for f in conn.read()] for conn in conns[:3]], [["timeout"]] * 3)
        self.assertEqual(self.query("SELECT COUNT(*) FROM chunks"), [(0,)])
        self.assertEqual(self.counters("bob"), (0, 0, 0, 0))
        self.assertEqual(self.counters("alice"), (0, 0, 0, 0))

    def test_senderQuota(self):
        """
        A sender may have max_sender_pending_messages messages (and max_sender_pending_bytes bytes) stored and
        not yet delivered, over all recipients: past it, quota_exceeded, whoever the recipient; an ack gives room.
        """
        self.serve(pager.Limits(max_sender_pending_messages=2, max_sender_pending_bytes=100))
        alice = self.login("alice")
        self.offline("carol")
        first = seal("alice", ["bob"], b"1")
        self.assertOk(alice.send(first))
        self.assertOk(alice.send(seal("alice", ["bob", "carol"], b"2")))
        answer = self.assertError(alice.send(seal("alice", ["carol"], b"3")), "quota_exceeded")
        self.assertIn("You have too many messages waiting", answer["message"])
        dave = self.register("dave")
        self.assertOk(dave.send(seal("dave", ["bob"], b"another sender is not held back")))
        bob = self.login("bob")
        bob.read()
        self.assertOk(bob.request("ack", msg=msg_id(first)))
        self.assertOk(alice.send(seal("alice", ["carol"], b"3")))
        self.assertError(alice.send(seal("alice", ["carol"], b"4")), "quota_exceeded")
        self.assertEqual(self.counters("alice")[2:], (2, 2))
        # the byte bound, for a multi-frame upload too
        self.serve(pager.Limits(max_line=96 * 1024, max_sender_pending_bytes=4000))
        dave = self.login("dave")
        dave.write(self.header_frame(seal("dave", ["carol"], b"x" * 5000, chunk_size=1024)))
        self.assertError(dave.read()[0], "quota_exceeded")

    def test_storageBudget(self):
        """
        Past max_db_bytes (pages in use plus open uploads' declared sizes) a message is refused with
        storage_full, in one frame or many; the space an open upload reserves counts before its chunks come.
        """
        used = self.query("SELECT (SELECT page_count FROM pragma_page_count())"
                          " * (SELECT page_size FROM pragma_page_size())")[0][0]
        self.serve(pager.Limits(max_line=96 * 1024, max_db_bytes=used + 100 * 1024, max_pending_bytes=10 ** 9))
        alice = self.login("alice")
        big = seal("alice", ["bob"], b"x" * 150 * 1024, chunk_size=65536)
        alice.write(self.header_frame(big))
        [answer] = alice.read()
        self.assertError(answer, "storage_full")
        self.assertIn(str(used + 100 * 1024), answer["message"])
        self.begin(alice, seal("alice", ["bob"], b"y" * 90 * 1024, chunk_size=1024), rid="held")
        other = self.login("alice")
        self.assertError(other.send(seal("alice", ["bob"], b"z" * 20 * 1024)), "storage_full")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages WHERE accepted_at IS NOT NULL"), [(0,)])
        alice.lose()  # the held upload is dropped: its reservation no longer counts
        self.assertOk(other.send(seal("alice", ["bob"], b"z" * 20 * 1024)))


    def test_budgetCountsUploadOnce(self):
        """
        An open upload's stored chunks come off its reservation as they are stored: with an upload of four 64 KiB
        chunks streamed up to its last frame, a 60 KiB message that fits beside what is really used is accepted.
        """
        used = self.query("SELECT (SELECT page_count FROM pragma_page_count())"
                          " * (SELECT page_size FROM pragma_page_size())")[0][0]
        self.serve(pager.Limits(max_line=96 * 1024, max_db_bytes=used + 420 * 1024, max_pending_bytes=10 ** 9))
        alice = self.login("alice")
        held = seal("alice", ["bob"], os.urandom(4 * 65536), chunk_size=65536)
        alice.write(self.header_frame(held))
        for frame in self.chunk_frames(held)[:-1]:
            alice.write(frame)
        self.assertEqual(alice.read(), [])
        self.assertEqual(self.query("SELECT value FROM counters WHERE name = 'reserved'"), [(65536,)])
        other = self.login("alice")
        self.assertOk(other.send(seal("alice", ["bob"], os.urandom(60 * 1024))))
        alice.write(self.chunk_frames(held)[-1])
        self.assertOk(alice.read()[0])
        self.assertEqual(self.query("SELECT value FROM counters WHERE name = 'reserved'"), [(0,)])


class AccountGoneTests(ServerTestCase):
    """The operator's delete-user and reset-key, run on the database by another process, end the user's sessions."""

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")
        self.factory.start_account_check()
        self.addCleanup(self.factory.stop_account_check)
        self.interval = self.factory.limits.account_check_interval

    def run_txn(self, fn, *args):
        return self.successResultOf(self.store.pool.runInteraction(fn, *args))

    def assertEnded(self, conn):
        [notice] = conn.read()
        self.assertError(notice, "auth_failed")
        self.assertNotIn("id", notice)
        self.assertTrue(conn.transport.disconnecting)

    def test_deleteUser(self):
        """
        After delete-user, the deleted user's session can store nothing more at once, and it is closed at the next
        account check; other sessions go on.
        """
        self.run_txn(pager.delete_user_txn, "alice")
        self.assertError(self.alice.send(seal("alice", ["bob"])), "forbidden")
        self.clock.advance(self.interval)
        self.assertEnded(self.alice)
        self.assertStillOpen(self.bob)

    def test_resetKey(self):
        """After reset-key, the session logged in with the old key is refused sends and then closed."""
        new = private_key("alice-new")
        self.run_txn(pager.set_key_txn, "alice", pager.public_key_pem(new), pager.fingerprint(new), 0.0, True)
        self.assertError(self.alice.send(seal("alice", ["bob"])), "forbidden")
        self.clock.advance(self.interval)
        self.assertEnded(self.alice)
        self.assertOk(self.connect().login("alice", new))

    def test_checkGoesOnAfterAFailure(self):
        """A check that fails (the database cannot be read) is logged, and the next one still closes the session."""
        account_keys = self.store.account_keys
        self.patch(self.store, "account_keys", lambda names: defer.fail(pager.StoreError("database is locked")))
        self.run_txn(pager.delete_user_txn, "alice")
        self.clock.advance(self.interval)
        self.assertEqual(len(self.flushLoggedErrors(pager.StoreError)), 1)
        self.assertFalse(self.alice.transport.disconnecting)
        self.patch(self.store, "account_keys", account_keys)
        self.clock.advance(self.interval)
        self.assertEnded(self.alice)

    def test_ownRekeyKeepsSessions(self):
        """
        A rekey through the server itself: the session that asked for it goes on with the new key and can send;
        every other session of the user, logged in with the old key, is closed at once.
        """
        other = self.login("alice")
        new = private_key("alice-rekeyed")
        new_fp = pager.fingerprint(new)
        challenge = self.alice.challenge
        self.assertOk(self.alice.request(
            "rekey", user="alice", token=TOKEN, public_key=pager.public_key_pem(new),
            proof_old=b64(pager.sign_auth(private_key("alice"), "rekey", self.server_id, "alice", challenge, new_fp)),
            proof_new=b64(pager.sign_auth(new, "rekey", self.server_id, "alice", challenge, new_fp))))
        [notice] = other.read()
        self.assertError(notice, "auth_failed")
        self.assertTrue(other.transport.disconnecting)
        self.clock.advance(self.interval)
        self.assertStillOpen(self.alice)
        self.assertOk(self.alice.send(seal("alice", ["bob"], sender_key=new)))

    def test_deletedNameLeavesNothing(self):
        """
        Nothing pending of a deleted user reaches whoever registers the name next: the messages they sent are
        dropped with the deliveries waiting for them, so no receipt is made for the name, and the recipients'
        quotas are given back.
        """
        self.offline("carol")
        sent = seal("alice", ["carol"], b"from the old alice")
        self.assertOk(self.alice.send(sent))
        self.assertOk(self.alice.send(seal("alice", ["bob"], b"to bob")))
        self.bob.read()
        self.run_txn(pager.delete_user_txn, "alice")
        self.clock.advance(self.interval)
        self.assertEqual(self.query_counts("carol"), (0, 0))
        carol = self.login("carol")
        self.assertEqual(carol.pushed("message"), [])
        self.assertError(carol.request("ack", msg=msg_id(sent)), "unknown_message")
        new_alice = self.connect()
        self.assertOk(new_alice.register("alice", private_key("alice-new")))
        self.assertEqual(new_alice.read(), [])
        self.assertEqual(self.run_txn(lambda txn: txn.execute("SELECT COUNT(*) FROM receipts").fetchall()), [(0,)])

    def query_counts(self, name):
        return tuple(self.successResultOf(self.store.get_user(name)).__dict__[f]
                     for f in ("pending_count", "pending_bytes"))


class DeliveryTests(ServerTestCase):

    query_counts = AccountGoneTests.query_counts

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")

    def test_push(self):
        """An online recipient is pushed the message; its ack is ok and the sender is pushed a delivered receipt."""
        bob = self.register("bob")
        self.clock.advance(50)
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        [message] = bob.read()
        self.assertEqual(message["type"], "message")
        self.assertEqual(message["msg"], msg_id(envelope))
        self.assertEqual(message["from"], "alice")
        self.assertEqual(message["header"], b64(envelope.header))
        self.assertEqual(message["chunks"], [b64(c) for c in envelope.chunks])
        self.assertEqual(message["signature"], b64(envelope.signature))
        self.assertEqual(message["size"], envelope.size)
        self.assertEqual(message["accepted_at"], 50)
        self.assertNotIn("id", message)
        self.assertEqual(self.alice.read(), [])

        self.clock.advance(10)
        self.assertEqual(self.assertOk(bob.request("ack", id="a", msg=message["msg"])), {"type": "ok", "id": "a"})
        [receipt] = self.alice.read()
        self.assertEqual(receipt, {"type": "receipt", "receipt": receipt["receipt"], "msg": msg_id(envelope),
                                   "from": "bob", "status": "delivered", "reason": "", "at": 60})
        self.assertIsInstance(receipt["receipt"], int)
        self.assertOk(self.alice.request("ack", receipt=receipt["receipt"]))
        self.assertError(self.alice.request("ack", receipt=receipt["receipt"]), "unknown_message")
        self.assertError(bob.request("ack", msg=message["msg"]), "unknown_message")

    def test_pushedFields(self):
        """
        A pushed message carries exactly the fields the protocol documents; its recipients travel in the signed
        header, not in a field the server could change.
        """
        bob = self.register("bob")
        self.assertOk(self.alice.send(seal("alice", ["bob"])))
        [message] = bob.read()
        self.assertEqual({"type", "msg", "seq", "from", "size", "accepted_at", "header", "chunks", "signature"},
                         set(message))
        self.assertIs(type(message["seq"]), int)
        self.assertEqual(pager.parse_header(base64.b64decode(message["header"])).recipient_names, ["bob"])

    def test_pushLineIsTheEncodedFrame(self):
        """
        The push line built by hand is byte for byte what encode_frame makes of the same fields, whatever the
        numbers (an accepted_at that is whole or not) and however many chunks.
        """
        protocol = self.alice.protocol
        for accepted_at, chunks in ((50, [b"one chunk"]), (1795692390.2736099, [b"a" * 100, b"b" * 7, b"c"]),
                                    (0.1, [b""])):
            message = pager.StoredMessage(7, b"\x9f" * 16, "bob.x-1", b"header bytes", b"signature", 12, len(chunks),
                                          accepted_at, chunks, ord=123456789)
            self.assertEqual(protocol._message_line(message), pager.encode_frame({
                "type": "message", "msg": "9f" * 16, "seq": 123456789, "from": "bob.x-1", "size": 12,
                "accepted_at": accepted_at, "header": b64(b"header bytes"), "chunks": [b64(c) for c in chunks],
                "signature": b64(b"signature")}) + b"\n")

    def query(self, sql, *args):
        return self.successResultOf(self.store.pool.runInteraction(lambda txn: txn.execute(sql, args).fetchall()))

    def login_raw(self, user):
        """Log C{user} in; returns the connection and the bytes the server wrote after its hello, unparsed."""
        conn = self.connect()
        proof = pager.sign_auth(private_key(user), "login", conn.server_id, user, conn.challenge)
        conn.write({"type": "login", "id": 1, "user": user, "token": TOKEN, "proof": b64(proof), "receive": True})
        written = conn.transport.value()
        conn.transport.clear()
        return conn, written

    def test_queuedMessageStoredAsItsPush(self):
        """
        A message for a device that is not connected is stored as its push line (header, signature and chunk
        only in it), and the recipient who logs in gets that line: the frame encode_frame makes of its fields.
        """
        self.offline("bob")
        self.clock.advance(12.2736099)
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        [(header, signature, body, line)] = self.query("SELECT header, signature, body, line FROM messages")
        self.assertEqual((header, signature, body), (b"", None, None))
        self.assertIn(b64(envelope.signature).encode(), line)
        bob, written = self.login_raw("bob")
        pushed, answer = written.splitlines(keepends=True)
        self.assertEqual(json.loads(answer)["type"], "ok")
        self.assertEqual(pushed, pager.encode_frame({
            "type": "message", "msg": msg_id(envelope), "seq": json.loads(pushed)["seq"], "from": "alice",
            "size": envelope.size, "accepted_at": 12.2736099, "header": b64(envelope.header),
            "chunks": [b64(c) for c in envelope.chunks], "signature": b64(envelope.signature)}) + b"\n")
        [stored] = self.successResultOf(self.store.pending("bob", 0))
        self.assertEqual((stored.msg_id.hex(), stored.sender, stored.header, stored.signature, stored.chunks,
                          stored.size, stored.accepted_at),
                         (msg_id(envelope), "alice", envelope.header, envelope.signature, envelope.chunks,
                          envelope.size, 12.2736099))

    def test_queuedLinesPushedTogether(self):
        """
        The lines of queued messages go out a run at a time, each write holding lines up to the feed's
        WRITE_BYTES, not one write per message: 60 queued messages of about 1.4 KB take two writes, every line
        whole and in the order accepted.
        """
        self.offline("bob")
        envelopes = [seal("alice", ["bob"], b"%d" % n) for n in range(60)]
        for envelope in envelopes:
            self.assertOk(self.alice.send(envelope))
        conn = self.connect()
        writes, write = [], conn.transport.write
        conn.transport.write = lambda data: writes.append(data) or write(data)
        proof = pager.sign_auth(private_key("bob"), "login", conn.server_id, "bob", conn.challenge)
        conn.write({"type": "login", "id": 1, "user": "bob", "token": TOKEN, "proof": b64(proof), "receive": True})
        pushes = [data for data in writes if b'"type":"message"' in data]
        self.assertEqual(len(pushes), 2)
        self.assertGreaterEqual(len(pushes[0]), pager._Feed.WRITE_BYTES)
        self.assertEqual([data[-1:] for data in pushes], [b"\n", b"\n"])  # each write holds whole lines
        lines = b"".join(pushes).splitlines()
        self.assertEqual([json.loads(line)["msg"] for line in lines], [msg_id(e) for e in envelopes])

    def test_pushedMessageStoredAsItsFields(self):
        """
        A message every device of which takes it at once is stored as its fields, the smaller form; if it is read
        back (the session dropped before acknowledging it), its push is the very line the live push was.
        """
        bob = self.register("bob")
        self.clock.advance(12.5)
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        live = bob.transport.value()
        bob.lose()
        [(header, signature, body, line)] = self.query("SELECT header, signature, body, line FROM messages")
        self.assertEqual((header, signature, body, line),
                         (envelope.header, envelope.signature, envelope.chunks[0], None))
        bob, written = self.login_raw("bob")
        pushed, answer = written.splitlines(keepends=True)
        self.assertEqual(json.loads(answer)["type"], "ok")
        self.assertEqual(pushed, live)

    def test_storedPushLongerThanMaxLine(self):
        """
        A message stored as a push line that a server restarted with a shorter C{max_line} cannot send in one line
        goes as a push without chunks and one chunk frame each, as any large message.
        """
        self.offline("bob")
        envelope = seal("alice", ["bob"], os.urandom(40 * 1024), chunk_size=20 * 1024)
        self.assertEqual(len(envelope.chunks), 2)
        self.assertOk(self.alice.send(envelope))
        [(line,)] = self.query("SELECT line FROM messages")
        self.assertGreater(len(line), 48 * 1024)
        self.serve(dataclasses.replace(self.limits, max_line=40 * 1024))
        bob = self.login("bob")
        message, first, last = bob.read()
        self.assertEqual((message["type"], message["msg"], message["chunks"]), ("message", msg_id(envelope), []))
        self.assertEqual((first["type"], last["type"]), ("message_chunk", "message_chunk"))
        self.assertEqual(first["chunks"] + last["chunks"], [b64(c) for c in envelope.chunks])
        self.assertEqual(last["signature"], b64(envelope.signature))

    def test_receiptWaitsForSender(self):
        """A receipt for an offline sender is pushed when the sender next logs in, until it is acked."""
        bob = self.register("bob")
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        self.alice.lose()
        self.assertOk(bob.request("ack", msg=msg_id(envelope)))
        alice = self.login("alice")
        [receipt] = alice.pushed("receipt")
        self.assertEqual((receipt["msg"], receipt["status"]), (msg_id(envelope), "delivered"))
        alice.lose()
        alice = self.login("alice")
        [again] = alice.pushed("receipt")
        self.assertEqual(again, receipt)
        self.assertOk(alice.request("ack", receipt=receipt["receipt"]))
        alice.lose()
        self.assertEqual(self.login("alice").read(), [])

    def test_ackList(self):
        """
        One ack frame may list many messages and many receipts: the listed deliveries are deleted, a receipt goes
        to each sender, the ids that are not pending are named in the answer instead of failing the rest, and
        nothing listed is delivered again.
        """
        self.offline("bob")
        envelopes = [seal("alice", ["bob"]) for _ in range(3)]
        for envelope in envelopes:
            self.assertOk(self.alice.send(envelope))
        bob = self.login("bob")
        self.assertEqual([f["msg"] for f in bob.pushed("message")], [msg_id(e) for e in envelopes])
        stranger = "AB" * 16
        answer = bob.request("ack", msgs=[msg_id(envelopes[2]), stranger, msg_id(envelopes[0])])
        self.assertOk(answer)
        self.assertEqual(answer["unknown_msgs"], [stranger])  # as it was sent
        self.assertNotIn("unknown_receipts", answer)
        receipts = self.alice.pushed("receipt")
        self.assertEqual([(r["msg"], r["from"], r["status"]) for r in receipts],
                         [(msg_id(envelopes[2]), "bob", "delivered"), (msg_id(envelopes[0]), "bob", "delivered")])
        answer = self.alice.request("ack", receipts=[r["receipt"] for r in receipts] + [10 ** 12])
        self.assertOk(answer)
        self.assertEqual(answer["unknown_receipts"], [10 ** 12])
        self.assertEqual(self.alice.request("ack", receipts=[receipts[0]["receipt"]])["unknown_receipts"],
                         [receipts[0]["receipt"]])
        bob.lose()
        self.assertEqual([f["msg"] for f in self.login("bob").pushed("message")], [msg_id(envelopes[1])])
        self.alice.lose()
        self.assertEqual(self.login("alice").pushed("receipt"), [])

    def test_seqFollowsPushOrder(self):
        """
        Each pushed message carries its delivery sequence number, increasing in the order messages are pushed,
        whether they were queued (drained at login) or pushed live; one message fanned out has one number.
        """
        self.offline("bob")
        queued = [seal("alice", ["bob"]) for _ in range(3)]
        for envelope in queued:
            self.assertOk(self.alice.send(envelope))
        bob = self.login("bob")
        carol = self.register("carol")
        both = seal("alice", ["bob", "carol"])
        self.assertOk(self.alice.send(both))
        seqs = [f["seq"] for f in bob.pushed("message")]
        self.assertEqual(len(seqs), 4)
        self.assertEqual(seqs, sorted(set(seqs)))
        [to_carol] = carol.pushed("message")
        self.assertEqual(to_carol["seq"], seqs[-1])

    def test_ackUpto(self):
        """
        A cumulative ack settles, as delivered, every message pushed to the device up to the number it names, with a
        receipt to each sender in delivery order; the answer says how many; nothing later is touched, and nothing
        settled comes again.
        """
        self.offline("bob")
        envelopes = [seal("alice", ["bob"]) for _ in range(3)]
        for envelope in envelopes:
            self.assertOk(self.alice.send(envelope))
        bob = self.login("bob")
        pushed = bob.pushed("message")
        self.assertEqual(bob.request("ack", id="u", upto=pushed[1]["seq"]), {"type": "ok", "id": "u", "settled": 2})
        receipts = self.alice.pushed("receipt")
        self.assertEqual([(r["msg"], r["status"]) for r in receipts],
                         [(msg_id(envelopes[0]), "delivered"), (msg_id(envelopes[1]), "delivered")])
        self.assertEqual(self.assertOk(bob.request("ack", upto=pushed[1]["seq"]))["settled"], 0)
        answer = self.alice.request("ack", upto=1, receipts=[r["receipt"] for r in receipts] + [10 ** 12])
        self.assertEqual((answer["settled"], answer["unknown_receipts"]), (0, [10 ** 12]))
        self.assertEqual(self.query_counts("bob"), (1, envelopes[2].size))
        bob.lose()
        self.assertEqual([f["msg"] for f in self.login("bob").pushed("message")], [msg_id(envelopes[2])])

    def test_ackUptoIsPerDevice(self):
        """A cumulative ack settles only the acking user's deliveries: another recipient of the same message keeps its own."""
        self.offline("carol")
        bob = self.register("bob")
        envelope = seal("alice", ["bob", "carol"])
        self.assertOk(self.alice.send(envelope))
        [message] = bob.pushed("message")
        self.assertEqual(bob.request("ack", upto=2 ** 62)["settled"], 1)
        self.assertEqual(self.query_counts("carol"), (1, envelope.size))
        self.assertEqual([f["msg"] for f in self.login("carol").pushed("message")], [message["msg"]])

    def test_ackUptoMalformed(self):
        """A cumulative ack needs a positive integer, and names messages no other way in the same frame."""
        bob = self.register("bob")
        self.assertOk(self.alice.send(seal("alice", ["bob"])))
        [message] = bob.pushed("message")
        for fields in ({"upto": 0}, {"upto": "5"}, {"upto": 1.5}, {"upto": True}, {"upto": 2 ** 63},
                       {"upto": 5, "msgs": [message["msg"]]}, {"upto": 5, "msg": message["msg"]},
                       {"upto": 5, "receipts": "x"}):
            self.assertError(bob.request("ack", **fields), "bad_request")
        bob.lose()
        self.assertEqual(len(self.login("bob").pushed("message")), 1)

    def test_noReceiptWanted(self):
        """
        A message sent with "receipt": false makes no receipt, stored or pushed, when it is acknowledged or rejected;
        the same sender's other messages still do.
        """
        self.offline("bob")
        quiet = [seal("alice", ["bob"]) for _ in range(2)]
        wanted = seal("alice", ["bob"])
        for envelope in quiet:
            self.assertOk(self.alice.request("send", receipt=False, **send_fields(envelope)))
        self.assertOk(self.alice.request("send", receipt=True, **send_fields(wanted)))
        bob = self.login("bob")
        pushed = bob.pushed("message")
        self.assertOk(bob.request("reject", msg=pushed[1]["msg"], reason="cannot open"))
        self.assertEqual(bob.request("ack", upto=pushed[2]["seq"])["settled"], 2)
        self.assertEqual([r["msg"] for r in self.alice.pushed("receipt")], [msg_id(wanted)])
        self.alice.lose()
        self.assertEqual([r["msg"] for r in self.login("alice").pushed("receipt")], [msg_id(wanted)])
        self.assertEqual(self.query_counts("bob"), (0, 0))

    def test_receiptFieldMalformed(self):
        """"receipt" is true or false; anything else is refused and stores nothing."""
        self.offline("bob")
        envelope = seal("alice", ["bob"])
        for value in ("no", 0, None, []):
            self.assertError(self.alice.request("send", receipt=value, **send_fields(envelope)), "bad_request")
        self.assertEqual(self.query_counts("bob"), (0, 0))

    def test_pausedReceiverGetsLivePushesUpToSlack(self):
        """
        While a receiver's transport buffer is full (its output paused), messages accepted for it are still pushed
        live, up to a quarter of max_unread_output written meanwhile; past that the rest wait in the store, and
        once it reads again they come from there: every message once, in order.
        """
        bob = self.register("bob")
        bob.protocol.flow.pauseProducing()
        envelopes = [seal("alice", ["bob"], b"x" * 40000) for _ in range(12)]
        for envelope in envelopes:
            self.assertOk(self.alice.send(envelope))
        slack = self.limits.max_unread_output // 4
        written = len(bob.transport.value())
        live = bob.pushed("message")
        self.assertGreater(len(live), 1)
        self.assertLess(len(live), len(envelopes))
        self.assertLess(written, slack + 60000)
        bob.protocol.flow.resumeProducing()
        rest = bob.pushed("message")
        self.assertEqual([f["msg"] for f in live + rest], [msg_id(e) for e in envelopes])

    def test_ackOtherUsersDelivery(self):
        """An ack by carol for bob's message gets unknown_message, and bob still gets it on his next login."""
        self.offline("bob")
        carol = self.register("carol")
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        self.assertError(carol.request("ack", msg=msg_id(envelope)), "unknown_message")
        self.assertError(carol.request("reject", msg=msg_id(envelope), reason="no"), "unknown_message")
        self.assertEqual(self.alice.read(), [])
        self.assertEqual([f["msg"] for f in self.login("bob").pushed("message")], [msg_id(envelope)])

    def test_reject(self):
        """A reject gives the sender a rejected receipt with the reason, and the message is not delivered again."""
        bob = self.register("bob")
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        [message] = bob.pushed("message")
        self.assertOk(bob.request("reject", msg=message["msg"], reason="The signature does not verify."))
        [receipt] = self.alice.read()
        self.assertEqual((receipt["type"], receipt["msg"], receipt["from"], receipt["status"], receipt["reason"]),
                         ("receipt", msg_id(envelope), "bob", "rejected", "The signature does not verify."))
        bob.lose()
        self.assertEqual(self.login("bob").read(), [])

    def test_pendingInOrder(self):
        """An offline recipient gets its pending messages on login, in the order they were accepted."""
        self.offline("bob")
        envelopes = [seal("alice", ["bob"], b"message %d" % i) for i in range(4)]
        for envelope in envelopes:
            self.assertOk(self.alice.send(envelope))
        bob = self.connect()
        self.assertEqual(self.assertOk(bob.login("bob", private_key("bob")))["pending"], 4)
        self.assertEqual([f["msg"] for f in bob.pushed("message")], [msg_id(e) for e in envelopes])

    def test_redeliveredAfterDisconnect(self):
        """A message not acked before the recipient disconnects is delivered again on its next login."""
        bob = self.register("bob")
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        self.assertEqual([f["msg"] for f in bob.pushed("message")], [msg_id(envelope)])
        bob.lose()
        bob = self.login("bob")
        [message] = bob.pushed("message")
        self.assertEqual(message["msg"], msg_id(envelope))
        self.assertEqual(message["chunks"], [b64(c) for c in envelope.chunks])
        self.assertOk(bob.request("ack", msg=message["msg"]))
        bob.lose()
        self.assertEqual(self.login("bob").read(), [])

    def test_twoSessions(self):
        """Two sessions of the same user are both pushed a message."""
        first = self.register("bob")
        second = self.login("bob")
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        self.assertEqual([f["msg"] for f in first.pushed("message")], [msg_id(envelope)])
        self.assertEqual([f["msg"] for f in second.pushed("message")], [msg_id(envelope)])
        self.assertOk(second.request("ack", msg=msg_id(envelope)))
        self.assertError(first.request("ack", msg=msg_id(envelope)), "unknown_message")

    def test_sendOnly(self):
        """A send-only session is pushed no messages, nor receipts for messages another session sent."""
        receiving = self.register("bob")
        sending = self.login("bob", receive=False)
        envelope = seal("alice", ["bob"])
        self.assertOk(self.alice.send(envelope))
        self.assertEqual(sending.read(), [])
        self.assertEqual(len(receiving.pushed("message")), 1)
        other = seal("bob", ["alice"], b"from the receiving session")
        self.assertOk(receiving.send(other))
        self.assertOk(self.alice.request("ack", msg=msg_id(other)))
        self.assertEqual(sending.read(), [])
        self.assertEqual([f["msg"] for f in receiving.pushed("receipt")], [msg_id(other)])

    def test_sendOnlyOwnReceipts(self):
        """A send-only session can send, and is pushed the receipt of its own message."""
        receiving = self.register("bob")
        sending = self.login("bob", receive=False)
        reply = seal("bob", ["alice"])
        self.assertOk(sending.send(reply))
        self.assertOk(self.alice.request("ack", msg=msg_id(reply)))
        self.assertEqual([(f["type"], f["msg"], f["status"]) for f in sending.read()],
                         [("receipt", msg_id(reply), "delivered")])
        self.assertEqual([f["msg"] for f in receiving.pushed("receipt")], [msg_id(reply)])

    def test_sendOnlyLoginGetsNoPending(self):
        """A send-only login is not pushed the messages pending for its user."""
        self.offline("bob")
        self.assertOk(self.alice.send(seal("alice", ["bob"])))
        sending = self.connect()
        self.assertEqual(self.assertOk(sending.login("bob", private_key("bob"), receive=False))["pending"], 0)
        self.assertEqual(sending.read(), [])
        self.assertEqual(len(self.login("bob").pushed("message")), 1)


class TimeoutTests(ServerTestCase):

    limits = pager.Limits(login_timeout=10, idle_timeout=100)

    def assertTimedOut(self, conn):
        frames = conn.read()
        self.assertEqual([(f["type"], f["code"]) for f in frames], [("error", "timeout")], frames)
        self.assertNotIn("id", frames[0])
        self.assertTrue(conn.transport.disconnecting)

    def test_loginTimeout(self):
        """A connection that does not log in within login_timeout gets a timeout error and is closed."""
        conn = self.connect()
        self.clock.advance(9.9)
        self.assertEqual(conn.read(), [])
        self.assertFalse(conn.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTimedOut(conn)

    def test_loginTimeoutNotExtended(self):
        """Pings before login do not extend login_timeout: an unauthenticated connection is closed on time."""
        conn = self.connect()
        for _ in range(3):
            self.clock.advance(4)
            if conn.transport.disconnecting:
                break
            conn.write({"type": "ping", "id": 1})
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual([f["code"] for f in conn.read() if f["type"] == "error"], ["timeout"])

    def test_idleTimeout(self):
        """After login idle_timeout applies instead of login_timeout, and a ping resets it."""
        conn = self.register("alice")
        self.clock.advance(99)
        self.assertFalse(conn.transport.disconnecting)
        self.assertOk(conn.ping())
        self.clock.advance(99)
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(conn.read(), [])
        self.clock.advance(1.5)
        self.assertTimedOut(conn)

    def test_nothingAfterTimeout(self):
        """Lines that arrive after the timeout closed the connection get no answer."""
        conn = self.connect()
        self.clock.advance(11)
        conn.read()
        conn.write({"type": "ping", "id": 1})
        self.assertEqual(conn.read(), [])


class _HeldStore:
    """The server's store with every call's result held back until L{release}: its requests stay in flight."""

    def __init__(self, store):
        self._store = store
        self.held = []

    def __getattr__(self, name):
        method = getattr(self._store, name)

        def held(*args):
            d = defer.Deferred()
            self.held.append((method, args, d))
            return d
        return held

    def release(self):
        held, self.held = self.held, []
        for method, args, d in held:
            method(*args).chainDeferred(d)


def long_names(count):
    """C{count} distinct user names of the longest allowed length (32 characters), sorted."""
    return ["u%031d" % n for n in range(count)]


class ServerCloseTests(ServerTestCase):
    """
    Every close the server starts lets the peer read what was written for close_grace seconds, then aborts the
    connection: a peer that never reads cannot keep it (and its buffered output) open.
    """

    limits = pager.Limits(login_timeout=10, idle_timeout=100, max_line=96 * 1024)

    def assertAbortedAfterGrace(self, conn):
        """The connection is closing now, and is aborted close_grace seconds later, not before."""
        grace = self.limits.close_grace
        self.assertTrue(conn.transport.disconnecting)
        self.assertFalse(conn.transport.disconnected)
        self.clock.advance(grace - 0.1)
        self.assertFalse(conn.transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(conn.transport.disconnected, "the connection was not aborted after the grace")
        conn.lose()

    def test_idleTimeout(self):
        """A connection closed by the idle timeout is aborted close_grace (3) seconds later."""
        self.assertEqual(self.limits.close_grace, 3.0)
        conn = self.register("alice")
        self.clock.advance(100.1)
        self.assertEqual([f.get("code") for f in conn.read()], ["timeout"])
        self.assertAbortedAfterGrace(conn)

    def test_loginTimeout(self):
        """A connection closed by the login timeout is aborted close_grace seconds later."""
        conn = self.connect()
        self.clock.advance(10.1)
        self.assertAbortedAfterGrace(conn)

    def test_oversizeLine(self):
        """A connection closed for a line over the limit is aborted close_grace seconds later."""
        conn = self.register("alice")
        conn.write_line(b"x" * (self.limits.max_line + 1))
        self.assertEqual([f.get("code") for f in conn.read()], ["too_large"])
        self.assertAbortedAfterGrace(conn)

    def test_tooManyConnections(self):
        """A connection refused for its address's connection limit is aborted close_grace seconds later."""
        self.serve(pager.Limits(max_connections_per_address=1))
        first = self.connect(REMOTE)
        second = self.connect(REMOTE)
        self.assertEqual(second.hello.get("code"), "rate_limited")
        self.assertAbortedAfterGrace(second)
        self.assertStillOpen(first)

    def test_closedOnce(self):
        """
        A close cancels the idle timeout; a second close while the first one's grace runs schedules no second
        abort; once the connection is gone nothing is left scheduled.
        """
        conn = self.register("alice")
        conn.protocol.close()
        conn.protocol.close()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertAbortedAfterGrace(conn)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_goneBeforeTheGraceEnds(self):
        """A peer that reads and closes during the grace leaves nothing scheduled: the abort is cancelled."""
        conn = self.register("alice")
        conn.protocol.close()
        conn.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(conn.transport.disconnected)


class UnreadOutputTests(ServerTestCase):
    """A peer that stops reading may leave at most max_unread_output bytes of answers unread; then it is cut off."""

    def test_cutOffPastTheBound(self):
        """
        2000 users of 32-character names; alice keeps 64 users requests in flight, then her output is paused (the
        transport's buffer is full: she reads nothing) and they complete.  The server reads none of her further
        requests, writes answers only up to max_unread_output (1 MiB) plus the answer that crossed it, then a
        too_large error, and aborts the connection close_grace seconds later.
        """
        limits = self.limits
        names = long_names(2000)
        for name in names:
            self.successResultOf(self.store.add_user(name, pem("alice"), b"f" * 32, b"s" * 16, b"h" * 32, 0.0))
        alice = self.register("alice")
        held = self.factory.store = _HeldStore(self.store)
        for n in range(limits.max_in_flight):
            alice.write({"type": "users", "id": n})
        alice.write({"type": "ping", "id": "later"})
        self.assertEqual(alice.read(), [])
        alice.protocol.flow.pauseProducing()  # as the transport does once its buffer passes 64 KiB
        held.release()
        written = len(alice.transport.value())
        frames = alice.read()
        answers = [f for f in frames if f["type"] == "ok"]
        self.assertTrue(answers)
        largest = max(len(pager.encode_frame(f)) + 1 for f in answers)
        self.assertLessEqual(written, limits.max_unread_output + largest + 200)
        self.assertGreater(written, limits.max_unread_output)
        self.assertLess(len(answers), limits.max_in_flight)
        self.assertEqual((frames[-1]["type"], frames[-1]["code"]), ("error", "too_large"))
        self.assertNotIn("later", [f.get("id") for f in frames])
        self.assertTrue(alice.transport.disconnecting)
        self.clock.advance(limits.close_grace + 0.1)
        self.assertTrue(alice.transport.disconnected)

    def test_readingPeerNotCutOff(self):
        """
        The control: the same answers to a peer whose output resumes (it reads) now and then are all written,
        and the connection stays open.
        """
        names = long_names(2000)
        for name in names:
            self.successResultOf(self.store.add_user(name, pem("alice"), b"f" * 32, b"s" * 16, b"h" * 32, 0.0))
        alice = self.register("alice")
        held = self.factory.store = _HeldStore(self.store)
        for n in range(self.limits.max_in_flight):
            alice.write({"type": "users", "id": n})
        for n in range(self.limits.max_in_flight):
            alice.protocol.flow.pauseProducing()
            method, args, d = held.held.pop(0)
            method(*args).chainDeferred(d)
            alice.protocol.flow.resumeProducing()  # the transport's buffer drained: she reads
        self.assertEqual(len([f for f in alice.read() if f["type"] == "ok"]), self.limits.max_in_flight)
        self.factory.store = self.store
        self.assertStillOpen(alice)


class DirectoryTests(ServerTestCase):

    def test_users(self):
        """users lists the users online and every registered user, each sorted."""
        carol = self.register("carol")
        alice = self.register("alice")
        self.offline("bob")
        self.login("alice")
        self.assertEqual(self.assertOk(alice.request("users", id="u")),
                         {"type": "ok", "id": "u", "online": ["alice", "carol"],
                          "registered": ["alice", "bob", "carol"], "count": 3, "online_count": 2, "next": None})
        carol.lose()
        self.assertEqual(self.assertOk(alice.request("users"))["online"], ["alice"])

    def test_usersPaged(self):
        """
        With 2500 users, users answers at most max_users_page (1000) names and the name to continue after; pages
        from after=next cover every user once, in order; limit asks for fewer; online lists only the page's online
        users, while count and online_count count everyone.
        """
        names = long_names(2500)
        for name in names:
            self.successResultOf(self.store.add_user(name, pem("alice"), b"f" * 32, b"s" * 16, b"h" * 32, 0.0))
        alice = self.register("alice")
        self.assertEqual(alice.hello["limits"]["max_users_page"], 1000)
        seen, after, pages = [], None, 0
        while True:
            answer = self.assertOk(alice.request("users", after=after if after is not None else MISSING))
            pages += 1
            self.assertLessEqual(len(answer["registered"]), 1000)
            self.assertEqual((answer["count"], answer["online_count"]), (2501, 1))
            self.assertEqual(answer["online"], ["alice"] if "alice" in answer["registered"] else [])
            self.assertLess(len(pager.encode_frame(answer)), pager.MIN_MAX_LINE)
            seen += answer["registered"]
            after = answer["next"]
            if after is None:
                break
            self.assertEqual(after, answer["registered"][-1])
        self.assertEqual(pages, 3)
        self.assertEqual(seen, sorted(names + ["alice"]))
        answer = self.assertOk(alice.request("users", after="a", limit=2))
        self.assertEqual((answer["registered"], answer["next"]), (["alice", names[0]], names[0]))

    def test_usersOnline(self):
        """With online true, users pages through the users online only."""
        for name in ("dave", "carol", "bob", "alice"):
            self.register(name)
        self.offline("eve")
        alice = self.login("alice")
        answer = self.assertOk(alice.request("users", online=True, limit=2))
        self.assertEqual((answer["registered"], answer["online"], answer["next"]),
                         (["alice", "bob"], ["alice", "bob"], "bob"))
        self.assertEqual((answer["count"], answer["online_count"]), (4, 4))
        answer = self.assertOk(alice.request("users", online=True, after="bob", limit=2))
        self.assertEqual((answer["registered"], answer["next"]), (["carol", "dave"], None))

    def test_usersBadFields(self):
        """A limit outside 1 to 1000, a non-boolean online or an invalid after name get bad_request naming it."""
        alice = self.register("alice")
        for fields, name in (({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "5"}, "limit"),
                             ({"online": 1}, "online"), ({"after": 5}, "after"), ({"after": "Not A Name!"}, "")):
            answer = self.assertError(alice.request("users", **fields), "bad_request")
            self.assertIn(name, answer["message"])

    def test_key(self):
        """key returns the user's PEM, its fingerprint as pager.fingerprint computes it, and when it was set."""
        self.clock.advance(1234.5)
        alice = self.register("alice")
        self.offline("bob")
        answer = self.assertOk(alice.request("key", id="k", user="Bob"))
        self.assertEqual(answer, {"type": "ok", "id": "k", "user": "bob", "public_key": pem("bob"),
                                  "fingerprint": pager.fingerprint(private_key("bob")).hex(), "key_set_at": 1234.5})
        key = pager.load_public_key(answer["public_key"])
        self.assertEqual(pager.fingerprint(key).hex(), answer["fingerprint"])

    def test_keyUnknown(self):
        """key for an unknown user gets unknown_user naming it."""
        alice = self.register("alice")
        answer = self.assertError(alice.request("key", user="nobody"), "unknown_user")
        self.assertIn("nobody", answer["message"])


class RekeyTests(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")

    def rekey(self, conn, old_key, new_key, token=TOKEN):
        new_fp = pager.fingerprint(new_key)
        challenge, sid = conn.challenge, conn.server_id
        return conn.request("rekey", user="alice", token=token, public_key=pager.public_key_pem(new_key),
                            proof_old=b64(pager.sign_auth(old_key, "rekey", sid, "alice", challenge, new_fp)),
                            proof_new=b64(pager.sign_auth(new_key, "rekey", sid, "alice", challenge, new_fp)))

    def fingerprint_of(self, user):
        return self.assertOk(self.alice.request("key", user=user))["fingerprint"]

    def test_rekey(self):
        """A rekey with the token and both proofs is ok, and key lookups show the new fingerprint."""
        new_fp = pager.fingerprint(private_key("new")).hex()
        answer = self.assertOk(self.rekey(self.alice, private_key("alice"), private_key("new")))
        self.assertEqual(answer["fingerprint"], new_fp)
        self.assertIn("challenge", answer)
        self.assertEqual(self.fingerprint_of("alice"), new_fp)
        # The session now signs with the new key: a message sealed with it is accepted.
        self.assertOk(self.alice.send(pager.seal(private_key("new"), "alice", {"alice": private_key("new").public_key()},
                                                 b"hello")))
        self.assertError(self.connect().login("alice", private_key("alice")), "auth_failed")
        self.assertOk(self.connect().login("alice", private_key("new")))

    def test_wrongOldProof(self):
        """A rekey whose old-key proof is by another key gets auth_failed and keeps the old key."""
        old_fp = self.fingerprint_of("alice")
        self.assertError(self.rekey(self.alice, private_key("mallory"), private_key("new")), "auth_failed")
        self.assertEqual(self.fingerprint_of("alice"), old_fp)

    def test_wrongToken(self):
        """A rekey with the wrong token gets auth_failed and keeps the old key."""
        old_fp = self.fingerprint_of("alice")
        self.assertError(self.rekey(self.alice, private_key("alice"), private_key("new"), token="wrong token"),
                         "auth_failed")
        self.assertEqual(self.fingerprint_of("alice"), old_fp)


class RecoverTests(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.offline("alice")

    def recover(self, conn, new_key):
        proof = pager.sign_auth(new_key, "recover", conn.server_id, "alice", conn.challenge)
        return conn.request("recover", user="alice", token=TOKEN, public_key=pager.public_key_pem(new_key),
                            proof=b64(proof))

    def current_fingerprint(self):
        return bytes(self.successResultOf(self.store.get_user("alice")).fingerprint).hex()

    def test_remotePlainTCP(self):
        """Recovery over plain TCP from a non-loopback address gets forbidden and changes nothing."""
        before = self.current_fingerprint()
        self.assertError(self.recover(self.connect(REMOTE), private_key("new")), "forbidden")
        self.assertEqual(self.current_fingerprint(), before)

    def test_loopback(self):
        """Recovery from loopback with the token and a proof by the new key is ok and sets the new key."""
        conn = self.connect()
        answer = self.assertOk(self.recover(conn, private_key("new")))
        new_fp = pager.fingerprint(private_key("new")).hex()
        self.assertEqual(answer["fingerprint"], new_fp)
        self.assertEqual(self.current_fingerprint(), new_fp)
        self.assertOk(self.connect().login("alice", private_key("new")))

    def test_rateLimited(self):
        """A second recovery within recovery_interval gets rate_limited; after it, recovery works again."""
        conn = self.connect()
        self.assertOk(self.recover(conn, private_key("new")))
        self.assertError(self.recover(conn, private_key("carol")), "rate_limited")
        self.clock.advance(self.limits.recovery_interval - 90)
        error = self.assertError(self.recover(self.connect(), private_key("carol")), "rate_limited")
        self.assertEqual((error["message"], error["retry_after"]), (
            "This account recovered its key in the last 60 minutes, the shortest time between two recoveries on "
            "this server: try again in 2 minutes.", 90))
        self.clock.advance(89)
        self.assertError(self.recover(self.connect(), private_key("carol")), "rate_limited")
        self.assertEqual(self.current_fingerprint(), pager.fingerprint(private_key("new")).hex())
        self.clock.advance(2)
        self.assertOk(self.recover(self.connect(), private_key("carol")))

    def test_notAllowed(self):
        """With allow_recovery false, recovery gets forbidden even from loopback."""
        self.serve(pager.Limits(allow_recovery=False))
        self.assertError(self.recover(self.connect(), private_key("new")), "forbidden")


class _GatedHashes:
    """
    Stands in for the factory's hash_token: every hash waits until the test calls L{finish}, then gives the real
    Argon2id.  Shows how many hashes the server has asked for at once.
    """

    def __init__(self):
        self.waiting = []
        self.asked = 0

    def __call__(self, token, salt):
        self.asked += 1
        d = defer.Deferred()
        self.waiting.append((d, token, salt))
        return d

    def finish(self):
        """Let every waiting hash finish, oldest first."""
        while self.waiting:
            d, token, salt = self.waiting.pop(0)
            d.callback(pager.hash_token(token, salt))


def auth_fields(conn, kind, user="alice", key=None, new_key=None, token=TOKEN, proof=None):
    """The fields of a well-formed C{kind} request (login, rekey or recover) signed over C{conn}'s challenge."""
    key = key or private_key(user)
    sid, challenge = conn.server_id, conn.challenge
    if kind == "login":
        return {"user": user, "token": token,
                "proof": proof or b64(pager.sign_auth(key, "login", sid, user, challenge))}
    new_key = new_key or private_key("new")
    new_fp = pager.fingerprint(new_key)
    fields = {"user": user, "token": token, "public_key": pager.public_key_pem(new_key)}
    if kind == "rekey":
        fields["proof_old"] = proof or b64(pager.sign_auth(key, "rekey", sid, user, challenge, new_fp))
        fields["proof_new"] = b64(pager.sign_auth(new_key, "rekey", sid, user, challenge, new_fp))
    else:
        fields["proof"] = proof or b64(pager.sign_auth(new_key, "recover", sid, user, challenge, new_fp))
    return fields


class AuthInFlightTests(ServerTestCase):
    """
    One authentication request at a time per connection, and malformed ones take nothing: nobody can queue token
    hashes faster than they are answered.  Token hashing is gated (L{_GatedHashes}) so the test sees what waits.
    """

    def setUp(self):
        super().setUp()
        for name in ("alice", "mallory"):
            self.offline(name)
        self.hashes = self.factory.hash_token = _GatedHashes()

    def offline(self, user):
        """Register C{user} with an ungated hash."""
        gate = self.factory.hash_token
        self.factory.hash_token = lambda token, salt: defer.succeed(pager.hash_token(token, salt))
        super().offline(user)
        self.factory.hash_token = gate

    def serve(self, limits):
        super().serve(limits)
        self.hashes = self.factory.hash_token = _GatedHashes()

    def test_oneAtATime(self):
        """
        While a login waits for its hash, a second login, a rekey or a recover on the same connection is refused at
        once with bad_request, without a challenge and without taking one; the first is then answered ok.
        """
        conn = self.connect()
        conn.write({"type": "login", "id": "first", **auth_fields(conn, "login")})
        self.assertEqual(conn.read(), [])
        waiting = conn.challenge  # the hello's, which the first login took
        for kind in ("login", "rekey", "recover", "register"):
            fields = auth_fields(conn, kind) if kind != "register" else {
                "user": "carol", "public_key": pem("carol"), "token": TOKEN, "proof": b64(b"\0" * 256)}
            answer = self.assertError(conn.request(kind, id=kind, **fields), "bad_request")
            self.assertIn("one at a time", answer["message"])
            self.assertNotIn("challenge", answer)
        self.assertEqual(len(self.hashes.waiting), 1)
        self.hashes.finish()
        [answer] = conn.read()
        self.assertOk(answer)
        self.assertEqual(answer["id"], "first")
        self.assertNotEqual(conn.challenge, waiting)
        self.assertOk(conn.request("users"))

    def test_malformedTakesNothing(self):
        """
        A register, login, rekey or recover with a missing or wrong-typed field is answered bad_request (or bad_key)
        without a challenge, and the challenge stays: a proof over it then logs in.
        """
        conn = self.connect()
        hello_challenge = conn.challenge
        cases = [("login", "proof", MISSING), ("login", "user", 7), ("login", "token", MISSING),
                 ("login", "receive", "yes"), ("rekey", "proof_new", MISSING), ("rekey", "proof_old", 5),
                 ("rekey", "public_key", "garbage"), ("rekey", "token", "short"), ("recover", "proof", MISSING),
                 ("recover", "user", ["alice"]), ("register", "token", MISSING), ("register", "invite", 5)]
        for number, (kind, name, value) in enumerate(cases):
            fields = auth_fields(conn, kind) if kind != "register" else {
                "user": "carol", "public_key": pem("carol"), "token": TOKEN, "proof": b64(b"\0" * 256)}
            if value is MISSING:
                del fields[name]
            else:
                fields[name] = value
            answer = conn.request(kind, id=number, **fields)
            self.assertIn(answer.get("code"), ("bad_request", "bad_key"), (kind, name, answer))
            self.assertNotIn("challenge", answer, (kind, name))
            self.assertEqual(conn.challenge, hello_challenge)
        self.assertEqual(self.hashes.waiting, [])
        conn.write({"type": "login", "id": "ok", **auth_fields(conn, "login")})
        self.hashes.finish()
        self.assertOk(conn.read()[0])

    def test_hashesPerAccount(self):
        """
        Mallory's third login with the right key and token, from a third address, is refused with rate_limited at
        once while two of hers wait for their hash (argon2_per_account); alice's login from the same address as
        the third is not refused, and everyone but the refused one logs in.
        """
        conns = [self.connect(IPv4Address("TCP", "198.51.100.%d" % i, 1000)) for i in (1, 2, 3)]
        for i, conn in enumerate(conns[:2]):
            conn.write({"type": "login", "id": i, **auth_fields(conn, "login", "mallory")})
        self.assertEqual(len(self.hashes.waiting), 2)
        answer = self.assertError(conns[2].request("login", **auth_fields(conns[2], "login", "mallory")),
                                  "rate_limited")
        self.assertIn("challenge", answer)
        alice = self.connect(IPv4Address("TCP", "198.51.100.3", 1001))
        alice.write({"type": "login", "id": "a", **auth_fields(alice, "login")})
        self.assertEqual(len(self.hashes.waiting), 3)
        self.hashes.finish()
        for conn in conns[:2] + [alice]:
            self.assertOk(conn.read()[0])

    def test_burstsDoNotLockOutTheAddress(self):
        """
        Twenty times over, four cron jobs of alice log in at once from one address with her key and token: two are
        hashed, two refused rate_limited with a short retry_after (argon2_per_account); then carol logs in from the
        same address at once, and so does a fifth job of alice.
        """
        self.offline("carol")
        host = IPv4Address("TCP", "198.51.100.9", 1000)
        for burst in range(20):
            conns = [self.connect(host) for _ in range(4)]
            for i, conn in enumerate(conns[:2]):
                conn.write({"type": "login", "id": i, **auth_fields(conn, "login")})
            for conn in conns[2:]:
                answer = self.assertError(conn.request("login", **auth_fields(conn, "login")), "rate_limited")
                self.assertEqual(answer["retry_after"], 1)
                self.assertIn("challenge", answer)
            self.hashes.finish()
            for conn in conns[:2]:
                self.assertOk(conn.read()[0])
            for conn in conns:
                conn.lose()
        for name in ("carol", "alice"):
            conn = self.connect(host)
            conn.write({"type": "login", "id": name, **auth_fields(conn, "login", name)})
            self.hashes.finish()
            self.assertOk(conn.read()[0])

    def test_recoveriesCountedApart(self):
        """
        Two recoveries of alice (right key proofs, wrong tokens) waiting for their hash make a third recovery wait
        its turn (rate_limited), but do not stop her login from being hashed at once.
        """
        recoveries = []
        for i in (2, 3):
            conn = self.connect(IPv4Address("TCP", "127.0.0.%d" % i, 1000))
            conn.write({"type": "recover", "id": i, **auth_fields(conn, "recover", token="not her token")})
            recoveries.append(conn)
        conn = self.connect(IPv4Address("TCP", "127.0.0.4", 1000))
        self.assertError(conn.request("recover", **auth_fields(conn, "recover")), "rate_limited")
        alice = self.connect()
        alice.write({"type": "login", "id": "a", **auth_fields(alice, "login")})
        self.assertEqual(len(self.hashes.waiting), 3)
        self.hashes.finish()
        for conn in recoveries:
            self.assertError(conn.read()[0], "auth_failed")
        self.assertOk(alice.read()[0])

    def test_hashesPerAddress(self):
        """
        With argon2_per_address 2, a third login from one address (for an account with nothing waiting) is refused
        at once while two wait; a login from another address is not.
        """
        self.offline("carol")
        self.serve(pager.Limits(argon2_per_address=2))
        attacker = IPv4Address("TCP", "203.0.113.7", 1000)
        waiting = []
        for name in ("alice", "mallory"):
            conn = self.connect(attacker)
            conn.write({"type": "login", "id": name, **auth_fields(conn, "login", name)})
            waiting.append(conn)
        conn = self.connect(attacker)
        self.assertError(conn.request("login", **auth_fields(conn, "login", "carol")), "rate_limited")
        carol = self.connect()
        carol.write({"type": "login", "id": "c", **auth_fields(carol, "login", "carol")})
        self.assertEqual(len(self.hashes.waiting), 3)
        self.hashes.finish()
        for conn in waiting + [carol]:
            self.assertOk(conn.read()[0])

    def test_rekeyInterval(self):
        """
        After a re-key, the account's next re-key within rekey_interval (60 s) is refused with rate_limited before
        its token is hashed; after it, it works.
        """
        def rekey(rid):
            conn = self.connect()
            conn.write({"type": "rekey", "id": rid, **auth_fields(conn, "rekey", key=old, new_key=new)})
            self.hashes.finish()
            [answer] = conn.read()
            return answer

        old, new = private_key("alice"), private_key("new")
        self.assertOk(rekey(1))
        old, new = new, private_key("newer")
        answer = self.assertError(rekey(2), "rate_limited")
        self.assertIn("try again in 60 s", answer["message"])
        self.clock.advance(59)
        self.assertError(rekey(3), "rate_limited")
        self.assertEqual(self.hashes.asked, 1)
        self.clock.advance(1)
        self.assertOk(rekey(4))

    def test_concurrentRekeys(self):
        """While one re-key of an account waits for its hash, another one of the same account is refused."""
        first, second = self.connect(), self.connect(REMOTE)
        first.write({"type": "rekey", "id": 1, **auth_fields(first, "rekey")})
        self.assertError(second.request("rekey", **auth_fields(second, "rekey", new_key=private_key("newer"))),
                         "rate_limited")
        self.hashes.finish()
        self.assertOk(first.read()[0])


class ServerIdTests(ServerTestCase):
    """Proofs name the server they are made for."""

    def test_proofForAnotherServer(self):
        """
        Alice has the same key and token on servers A and B.  A login proof made over B's challenge but naming A's
        server id is refused by B (auth_failed); the same proof naming B's id logs in.  Likewise for register.
        """
        server_a = self.server_id
        store_b = synchronous_store(self.mktemp())
        self.addCleanup(store_b.close)
        server_b = self.successResultOf(store_b.open())
        self.assertNotEqual(server_a, server_b)
        self.offline("alice")
        self.store, self.server_id = store_b, server_b
        self.serve(self.limits)
        conn = self.connect()
        self.assertEqual(conn.server_id, server_b)
        key = private_key("alice")
        fp = pager.fingerprint(key)
        proof = pager.sign_auth(key, "register", server_a, "alice", conn.challenge, fp)
        self.assertError(conn.request("register", user="alice", public_key=pem("alice"), token=TOKEN,
                                      proof=b64(proof), device=device_fields(key, "alice")), "auth_failed")
        self.assertOk(conn.register("alice", key))
        conn = self.connect()
        self.assertError(conn.login("alice", key, server_id=server_a), "auth_failed")
        self.assertOk(conn.login("alice", key))


class _CountingSecrets:
    """Stands in for the secrets module in pager: the same bytes, in the same order, after every reset."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.count = 0

    def token_bytes(self, n):
        self.count += 1
        return hashlib.sha256(b"%d" % self.count).digest()[:n]

    def token_hex(self, n):
        return self.token_bytes(n).hex()


FRAMING_SERVER_ID = "f4a3" * 8


def _fast_hash(token, salt):
    """A stand-in for Argon2id, for the test that replays a session a few thousand times."""
    return defer.succeed(hashlib.sha256(salt + token.encode("utf-8")).digest())


class FramingTests(SynchronousTestCase):
    """
    The answers to a whole session (register, send, ack, acking the receipt) do not depend on how its bytes are cut
    into dataReceived calls, as Twisted's own LineReceiver tests check.  Challenges are made deterministic so that
    every replay sees the same bytes.
    """

    def setUp(self):
        self.secrets = _CountingSecrets()
        self.patch(pager, "secrets", self.secrets)
        self.session = None
        self.hello = None

    def session_lines(self, hello):
        """The session's requests: one line each, the register proof signed over the hello's challenge."""
        key = private_key("alice")
        challenge = base64.b64decode(json.loads(hello)["challenge"])
        envelope = seal("alice", ["alice"], b"a note to self", message_id=b"\x07" * 16)
        proof = pager.sign_auth(key, "register", FRAMING_SERVER_ID, "alice", challenge)
        frames = [
            {"type": "register", "id": 1, "user": "alice", "public_key": pem("alice"), "token": TOKEN,
             "proof": b64(proof), "device": device_fields(key, "alice")},
            dict(send_fields(envelope), type="send", id=2),
            {"type": "ack", "id": 3, "msg": msg_id(envelope)},
            {"type": "ack", "id": 4, "receipt": 1},
            {"type": "users", "id": "five"},
        ]
        lines = [pager.encode_frame(f) + b"\n" for f in frames]
        lines.insert(3, b"not json\n")
        lines.append(b'{"type":"ping","id":6}\n')
        return lines

    def replay(self, pieces, fast=False):
        """Run the session on a fresh server, feeding it the byte strings C{pieces(lines)}; return what it wrote."""
        store = synchronous_store(":memory:")
        try:
            self.successResultOf(store.open())
            self.secrets.reset()
            factory = pager.PagerServerFactory(store, pager.Limits(), reactor=MemoryReactorClock(),
                                               in_thread=synchronous, server_id=FRAMING_SERVER_ID)
            if fast:
                factory.hash_token = _fast_hash
            proto = factory.buildProtocol(LOOPBACK)
            transport = StringTransport(peerAddress=LOOPBACK)
            proto.makeConnection(transport)
            hello = transport.value()
            transport.clear()
            if self.session is None:
                self.hello, self.session = hello, self.session_lines(hello)
            self.assertEqual(hello, self.hello)
            for piece in pieces(self.session):
                proto.dataReceived(piece)
            return transport.value()
        finally:
            store.close()

    def expected(self):
        """The answers with one line per dataReceived call, checked to be the session's intended answers."""
        output = self.replay(lambda lines: lines)
        frames = [json.loads(line) for line in output.split(b"\n")[:-1]]
        self.assertEqual([(f["type"], f.get("id"), f.get("code")) for f in frames], [
            ("ok", 1, None), ("message", None, None), ("ok", 2, None), ("receipt", None, None), ("ok", 3, None),
            ("error", None, "bad_request"), ("ok", 4, None), ("ok", "five", None), ("ok", 6, None),
        ])
        return output

    def test_byteByByte(self):
        """The session fed one byte at a time gets the same answers as fed one line at a time."""
        expected = self.expected()
        self.assertEqual(self.replay(lambda lines: [bytes([b]) for b in b"".join(lines)]), expected)

    def test_chunkSizes(self):
        """The session fed in pieces of 2 to 9 bytes, and all at once, gets the same answers."""
        expected = self.expected()
        for size in range(2, 10):
            def pieces(lines, size=size):
                data = b"".join(lines)
                return [data[i:i + size] for i in range(0, len(data), size)]
            self.assertEqual(self.replay(pieces), expected, "pieces of %d bytes" % size)
        self.assertEqual(self.replay(lambda lines: [b"".join(lines)]), expected)

    def test_everySplitPoint(self):
        """The session's bytes cut in two at every possible point get the same answers."""
        expected = self.replay(lambda lines: lines, fast=True)
        self.assertEqual(expected, self.expected())
        length = len(b"".join(self.session))
        for cut in range(1, length):
            def pieces(lines, cut=cut):
                data = b"".join(lines)
                return [data[:cut], data[cut:]]
            output = self.replay(pieces, fast=True)
            if output != expected:
                self.fail("cut at byte %d of %d: %r" % (cut, length, output))


class ClientChallengeTests(SynchronousTestCase):
    """The client never signs a challenge that is not exactly 32 bytes."""

    def connect(self):
        proto = pager.PagerClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), pager.PROBE)  # the blank lines that expose a TLS port at once
        transport.clear()
        return proto, transport

    def hello(self, challenge):
        return pager.encode_frame({"type": "hello", "protocol": pager.PROTOCOL_VERSION, "server": "pager/test",
                                   "server_id": "5e" * 16, "challenge": b64(challenge),
                                   "limits": pager.Limits().public()}) + b"\n"

    def test_shortHelloChallenge(self):
        """A hello whose challenge is 31 bytes makes the client close the connection and fail its hello Deferred."""
        proto, transport = self.connect()
        proto.dataReceived(self.hello(b"\x01" * 31))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(proto.challenge)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(proto.hello, pager.BadRequest)

    def test_noChallengeNoSignature(self):
        """A PagerClient whose protocol has no challenge refuses to register, and writes nothing."""
        proto, transport = self.connect()
        client = pager.PagerClient(proto, reactor=MemoryReactorClock(), in_thread=synchronous)
        self.assertIsNone(proto.challenge)
        d = defer.Deferred.fromCoroutine(client.register("alice", TOKEN, private_key("alice")))
        self.failureResultOf(d, pager.BadRequest)
        self.assertEqual(transport.value(), b"")

    def test_malformedLaterChallenge(self):
        """After a good hello, an answer carrying a 31-byte challenge leaves the client nothing to sign."""
        proto, transport = self.connect()
        proto.dataReceived(self.hello(b"\x01" * 32))
        self.successResultOf(proto.hello)
        client = pager.PagerClient(proto, reactor=MemoryReactorClock(), in_thread=synchronous)
        proto.dataReceived(pager.encode_frame({"type": "error", "code": "auth_failed", "message": "no",
                                               "challenge": b64(b"\x02" * 31)}) + b"\n")
        self.assertIsNone(proto.challenge)
        d = defer.Deferred.fromCoroutine(client.login("alice", TOKEN, private_key("alice")))
        self.failureResultOf(d, pager.BadRequest)
        self.assertEqual(transport.value(), b"")


class RecentTests(SynchronousTestCase):
    """The window of a send-only session's recent message ids, whose receipts it is sent."""

    def test_keepsTheLastDistinct(self):
        """It holds the last C{size} distinct ids; adding one again makes it the newest rather than a copy."""
        recent = pager._Recent(3)
        for item in (b"a", b"b", b"c", b"a", b"d"):
            recent.add(item)
        self.assertEqual(len(recent), 3)
        self.assertEqual([i for i in (b"a", b"b", b"c", b"d") if i in recent], [b"a", b"c", b"d"])


class ReceiptBoundTests(ServerTestCase):
    """What one user's unacknowledged receipts may hold on the server."""

    def test_rejectedToSelfBounded(self):
        """
        Alice sends 20 messages to herself and rejects each with the longest reason (500 characters), never
        acknowledging a receipt: with max_pending_receipts 5, her oldest receipts are dropped after every 5 new ones,
        so never more than 9 are stored, always her newest.
        """
        self.serve(pager.Limits(max_pending_receipts=5))
        alice = self.register("alice")
        pushed = []
        for n in range(20):
            envelope = seal("alice", ["alice"], b"%d" % n)
            self.assertOk(alice.send(envelope))
            self.assertOk(alice.request("reject", msg=msg_id(envelope), reason="x" * 500))
            pushed += [f["receipt"] for f in alice.read() if f["type"] == "receipt"]
            stored = [r.rid for r in self.successResultOf(self.store.pending_receipts("alice", 0))]
            self.assertLessEqual(len(stored), 9)
            self.assertEqual(stored, pushed[-len(stored):])
        self.assertEqual(len(pushed), 20)  # each was pushed as it happened
        self.assertEqual(len(stored), 5)  # the 20th was a trim
        self.assertError(alice.request("reject", msg=msg_id(envelope), reason="x" * 501), "bad_request")

    def test_oneTrimAtATime(self):
        """
        While a trim of alice's receipts waits in the store's queue, the receipts made meanwhile queue no other
        trim: the waiting one runs after them and trims them too.  Once it is done, the next five queue one.
        """
        self.serve(pager.Limits(max_pending_receipts=5))
        alice = self.register("alice")
        trim, waiting = self.store.trim_receipts, []

        def queued_trim(user, keep):  # the trim's turn in the store comes when the test says
            outcome = defer.Deferred()
            waiting.append(lambda: trim(user, keep).chainDeferred(outcome))
            return outcome
        self.store.trim_receipts = queued_trim

        def reject(count):
            for n in range(count):
                envelope = seal("alice", ["alice"], b"%d" % n)
                self.assertOk(alice.send(envelope))
                self.assertOk(alice.request("reject", msg=msg_id(envelope), reason="no"))

        def stored():
            return len(self.successResultOf(self.store.pending_receipts("alice", 0)))

        reject(15)
        self.assertEqual(len(waiting), 1)
        waiting.pop()()
        self.assertEqual(stored(), 5)
        reject(4)
        self.assertEqual((waiting, stored()), ([], 9))
        reject(1)
        self.assertEqual(len(waiting), 1)
        waiting.pop()()
        self.assertEqual(stored(), 5)

    def test_cumulativeAckCountedOnce(self):
        """
        One cumulative ack that makes 12 receipts for bob (online) and 3 for carol pushes bob's 12 to him in the
        order they were made, and queues one trim, bob's: carol's 3 are under max_pending_receipts.
        """
        self.serve(pager.Limits(max_pending_receipts=5))
        alice, bob, carol = self.register("alice"), self.register("bob"), self.register("carol")
        trims = []
        self.store.trim_receipts = lambda user, keep: trims.append((user, keep)) or defer.succeed(0)
        sent = []
        for n in range(15):
            sender, conn = (carol, "carol") if n % 5 == 4 else (bob, "bob")
            envelope = seal(conn, ["alice"], b"%d" % n)
            self.assertOk(sender.send(envelope))
            sent.append((conn, msg_id(envelope)))
        pushed = alice.pushed("message")
        self.assertEqual(len(pushed), 15)
        self.assertEqual(alice.request("ack", upto=pushed[-1]["seq"])["settled"], 15)
        receipts = [f for f in bob.read() if f["type"] == "receipt"]
        self.assertEqual([f["msg"] for f in receipts], [m for who, m in sent if who == "bob"])
        self.assertEqual([f["receipt"] for f in receipts], sorted(f["receipt"] for f in receipts))
        self.assertEqual(trims, [("bob", 5)])


class KeyReplacedTests(ServerTestCase):
    """A session logged in with a key that was replaced can neither settle nor read what waits for the new key."""

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")
        self.envelope = seal("bob", ["alice"])
        self.assertOk(self.bob.send(self.envelope))
        self.assertEqual(len(self.alice.pushed("message")), 1)

    def pending(self):
        return self.successResultOf(self.store.get_user("alice")).pending_count

    def test_recoverClosesOldKeySessions(self):
        """
        After alice recovers her account from another connection, her session logged in with the old key gets
        auth_failed without id and is closed at once; its ack is never carried out.
        """
        new = private_key("alice-recovered")
        conn = self.connect()
        proof = pager.sign_auth(new, "recover", conn.server_id, "alice", conn.challenge, pager.fingerprint(new))
        self.assertOk(conn.request("recover", user="alice", token=TOKEN, public_key=pager.public_key_pem(new),
                                   proof=b64(proof)))
        [notice] = self.alice.read()
        self.assertError(notice, "auth_failed")
        self.assertNotIn("id", notice)
        self.assertTrue(self.alice.transport.disconnecting)
        self.alice.write({"type": "ack", "id": 1, "msg": msg_id(self.envelope)})
        self.assertEqual(self.alice.read(), [])
        self.assertEqual(self.pending(), 1)
        self.assertStillOpen(self.bob)

    def reset_key_then(self, kind, **fields):
        """After the operator's reset-key, the old-key session's C{kind} is refused forbidden and closes it."""
        new = private_key("alice-reset")
        self.successResultOf(self.store.pool.runInteraction(
            pager.set_key_txn, "alice", pager.public_key_pem(new), pager.fingerprint(new), 0.0, True))
        answer = self.assertError(self.alice.request(kind, **fields), "forbidden")
        self.assertIn("key replaced", answer["message"])
        self.assertTrue(self.alice.transport.disconnecting)
        self.assertEqual(self.pending(), 1)

    def test_resetKeyThenAck(self):
        """
        Within account_check_interval of the operator's reset-key, an ack by the session logged in with the old
        key is refused with forbidden and closes the session; nothing is settled.
        """
        self.reset_key_then("ack", msg=msg_id(self.envelope))

    def test_resetKeyThenAckList(self):
        """The same for the list form of ack."""
        self.reset_key_then("ack", msgs=[msg_id(self.envelope)])

    def test_resetKeyThenReject(self):
        """The same for reject."""
        self.reset_key_then("reject", msg=msg_id(self.envelope), reason="")

    def test_feedChecksTheKey(self):
        """
        A receiving session whose key was replaced by the operator drains nothing more from the store: its next
        login-time page is refused and the session is closed.
        """
        new = private_key("alice-reset")
        self.successResultOf(self.store.pool.runInteraction(
            pager.set_key_txn, "alice", pager.public_key_pem(new), pager.fingerprint(new), 0.0, True))
        self.alice.protocol.messages.start()  # what a paused feed does when the peer reads again
        [notice] = self.alice.read()
        self.assertError(notice, "auth_failed")
        self.assertTrue(self.alice.transport.disconnecting)


class UploadHeldTests(ServerTestCase):
    """The upload idle clock stops while the server itself holds the connection's reading."""

    limits = pager.Limits(max_line=96 * 1024)

    def test_idleClockPausedWhileHeld(self):
        """
        While reading is held (here: too many requests in flight), no idle timer runs for the open upload; once
        reading resumes, the upload has the whole upload_idle_timeout again.
        """
        timeout = self.limits.upload_idle_timeout
        alice = self.register("alice")
        self.offline("bob")
        envelope = seal("alice", ["bob"], b"0123456789" * 500, chunk_size=1024)
        alice.write(UploadTests.header_frame(None, envelope))
        alice.write(UploadTests.chunk_frames(None, envelope)[0])
        self.clock.advance(10)
        alice.protocol._hold("in_flight")
        self.assertFalse(alice.protocol._upload.timer.active())
        self.clock.advance(3 * timeout)
        self.assertEqual(alice.read(), [])
        alice.protocol._release("in_flight")
        self.clock.advance(timeout - 1)
        self.assertEqual(alice.read(), [])
        self.clock.advance(1)
        self.assertError(alice.read()[0], "timeout")


class RegisterChargedTests(ServerTestCase):
    """A register whose proof does not verify is a failed attempt of its requester."""

    def test_badProofsCharged(self):
        """
        Ten registers with proofs by the wrong key from one address use up its allowance (address_free_failures):
        the next register and a login of an existing user from that address are refused with rate_limited.
        """
        self.offline("alice")
        peer = IPv4Address("TCP", "198.51.100.20", 1000)
        for n in range(10):
            conn = self.connect(peer)
            self.assertError(conn.register("user%d" % n, private_key("carol"), proof_key=private_key("mallory")),
                             "auth_failed")
        self.assertError(self.connect(peer).register("carol", private_key("carol")), "rate_limited")
        self.assertError(self.connect(peer).login("alice", private_key("alice")), "rate_limited")
        self.assertOk(self.connect().login("alice", private_key("alice")))


class ReclaimTests(ServerTestCase):
    """Space from acknowledged messages is given back soon, not only at the hourly sweep."""

    def test_fileShrinksAfterAck(self):
        """
        Once a 16 MiB message is acknowledged, the database file shrinks to about its earlier size within
        RECLAIM_DELAY seconds, with no reclaim called by hand and no expiry sweep.
        """
        self.offline("alice")
        bob = self.register("bob")
        self.successResultOf(self.store.checkpoint())
        before = os.path.getsize(self.store.path)
        mid = os.urandom(16)
        chunks = [os.urandom(65536) for _ in range(256)]
        self.successResultOf(self.store.accept_message(
            mid, "alice", b"header", b"sig", 16 * 1024 * 1024, chunks, ["bob"], 0.0,
            pager.Limits(max_pending_bytes=2 ** 30)))
        self.successResultOf(self.store.checkpoint())
        self.assertGreater(os.path.getsize(self.store.path), before + 16 * 1024 * 1024)
        bob.protocol.messages.start()
        bob.read()
        self.assertOk(bob.request("ack", msg=mid.hex()))
        self.clock.advance(self.factory.RECLAIM_DELAY)
        self.assertLess(os.path.getsize(self.store.path), before + 1024 * 1024)


class ServerNitTests(ServerTestCase):

    def test_timeoutCodeKnown(self):
        """A client maps the timeout code to IdleTimeout, not to a bare ProtocolError."""
        self.assertIsInstance(pager.error_for_code("timeout", "idle"), pager.IdleTimeout)

    def test_repeatedIdNotEchoed(self):
        """A frame with two id members is refused with bad_request, which echoes neither id."""
        conn = self.connect()
        conn.write_line(b'{"type":"ping","id":"a","id":"b"}')
        [answer] = conn.read()
        self.assertError(answer, "bad_request")
        self.assertNotIn("id", answer)

    def test_stopAccountCheckAlone(self):
        """Stopping the expiry sweep leaves the account check running, and each stops on its own."""
        self.factory.start_expiry()
        self.factory.start_account_check()
        self.factory.stop_expiry()
        self.assertTrue(self.factory._account_check.running)
        self.factory.stop_account_check()
        self.assertFalse(self.factory._account_check.running)
