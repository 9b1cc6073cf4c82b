"""
What the client shows of the strings a server chooses.  L{HostileServer} speaks just enough of the protocol on a
loopback port to log a client in, and puts terminal escape sequences (window title, clear screen, the one-byte CSI
0x9b, bidirectional overrides) in every string field the client can display: pushed messages and receipts, the
answers to C{users}, C{key} and C{send}, error frames and the C{hello}.  The real commands run as child processes
against it (C{connect} reading a pipe, C{fetch}, C{send}, C{users}); none of those sequences may reach their
standard output or standard error, and a name that is not a user name is refused, never shown.
"""

import io
import json
import os
import sys
import unicodedata

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

import pager
from tests.test_cli import PAGER_PY, CLITestCase, base_env
from tests.test_e2e import key, token
from tests.test_terminal import TerminalProcess

SERVER_ID = "5e1f0e55e1f0e55e1f0e55e1f0e55e1f"


def evil(word):
    """A string that sets the window title, clears the screen, colours text and reverses it; C{word} marks it."""
    return "\x1b]0;%s\x07\x1b[2J\x9b31m\u202e%s\u2066x\u2069\x1b[0m" % (word, word)


def harmful(text):
    """The characters of C{text} that could drive or spoof a terminal: ESC, BEL, C1 controls, bidi controls."""
    return sorted({c for c in text if c in "\x1b\x07" or 0x80 <= ord(c) <= 0x9f
                   or 0x202a <= ord(c) <= 0x202e or 0x2066 <= ord(c) <= 0x2069 or c in "\u200e\u200f\u061c"})


class HostileServer(LineReceiver):
    """
    A server that logs in whoever asks and lies in every string it sends.  The factory says what: C{hello} fields
    to override, C{instead_of_hello} (a frame sent instead, then the connection closes), C{pushes} (frames pushed
    after login), C{after_send} (frames pushed after answering C{send}), C{answers} (type -> the frame answering
    that request type, without its id) and C{hold} (request types answered only once every pushed message and
    receipt has been acknowledged or rejected).
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 22

    def connectionMade(self):
        self.held = []
        factory = self.factory
        if factory.instead_of_hello is not None:
            self.send(factory.instead_of_hello)
            self.transport.loseConnection()
            return
        hello = {"type": "hello", "protocol": pager.PROTOCOL_VERSION, "server": "pager/0.1.0",
                 "server_id": SERVER_ID, "challenge": pager.b64(os.urandom(pager.CHALLENGE_SIZE)),
                 "limits": {"max_line": 131072, "max_message": 1 << 20, "max_ack_batch": 1000,
                            "idle_timeout": 300.0, "message_expiry": 86400.0}}
        hello.update(factory.hello)
        self.send(hello)

    def send(self, frame):
        self.transport.write(json.dumps(frame).encode("ascii") + b"\n")

    def lineReceived(self, line):
        if not line.strip():
            return  # the client's probe
        frame = json.loads(line)
        self.factory.received.append(frame)
        kind = frame["type"]
        if kind in ("ack", "reject"):
            self.settle(frame)
        if kind in self.factory.hold and not self.factory.settled():
            self.held.append(frame)
            return
        self.answer(frame)

    def answer(self, frame):
        kind = frame["type"]
        answer = self.factory.answers.get(kind)
        if answer is None:
            answer = getattr(self, "answer_" + kind, lambda frame: {"type": "ok"})(frame)
        self.send(dict(answer, id=frame["id"]))
        if answer["type"] == "ok":
            pushes = {"login": self.factory.pushes, "send": self.factory.after_send}
            for push in pushes.get(kind, []):
                self.send(push)

    def answer_login(self, frame):
        self.user = frame["user"]
        return {"type": "ok", "pending": len([p for p in self.factory.pushes if p["type"] == "message"])}

    def answer_key(self, frame):
        public = key(frame["user"]).public_key()
        return {"type": "ok", "user": frame["user"], "public_key": pager.public_key_pem(public),
                "fingerprint": pager.fingerprint(public).hex(), "key_set_at": 0.0}

    def answer_send(self, frame):
        return {"type": "ok", "msg": os.urandom(16).hex(), "duplicate": False, "queued": []}

    def answer_groups(self, frame):
        """alice is in no group (the login's look at her groups)."""
        return {"type": "ok", "groups": []}

    def answer_bundle(self, frame):
        """Each user's module key as a legacy device (the requester's own name: no other device)."""
        bundles = []
        for user in frame["users"]:
            public = key(user).public_key()
            devices = [] if user == self.user else [{
                "id": pager.device_id(public).hex(), "public_key": pager.public_key_pem(public), "name": None,
                "created": None, "certificate": None, "revoked": None, "prekeys": False, "signed_prekey": None,
                "one_time_prekey": None}]
            bundles.append({"user": user, "identity_key": pager.public_key_pem(public), "devices": devices})
        return {"type": "ok", "bundles": bundles}

    def settle(self, frame):
        for field in ("msg", "receipt"):
            if field in frame:
                self.factory.settled_ids.add(frame[field])
        for field in ("msgs", "receipts"):
            self.factory.settled_ids.update(frame.get(field, []))
        if self.factory.settled():
            held, self.held = self.held, []
            for waiting in held:
                self.answer(waiting)


class HostileFactory(protocol.ServerFactory):
    protocol = HostileServer

    def __init__(self, pushes=(), answers=None, hello=None, instead_of_hello=None, hold=(), after_send=()):
        self.pushes = list(pushes)
        self.after_send = list(after_send)
        self.answers = answers or {}
        self.hello = hello or {}
        self.instead_of_hello = instead_of_hello
        self.hold = set(hold)
        self.received = []
        self.settled_ids = set()

    def settled(self):
        expected = {p.get("msg") if p["type"] == "message" else p.get("receipt") for p in self.pushes}
        return expected <= self.settled_ids

    def requests(self, kind):
        return [f for f in self.received if f["type"] == kind]


def message_push(sender, text=b"", signed_by="bob", to="alice", content_type="text", filename=""):
    """A C{message} frame the server says is from C{sender}, sealed and signed by C{signed_by} for C{to}."""
    envelope = pager.seal(key(signed_by), signed_by, {to: key(to).public_key()}, text, content_type=content_type,
                          filename=filename)
    msg = pager.parse_header(envelope.header).message_id.hex()
    return {"type": "message", "msg": msg, "from": sender, "accepted_at": reactor.seconds(),
            "size": envelope.size, "header": pager.b64(envelope.header),
            "chunks": [pager.b64(c) for c in envelope.chunks], "signature": pager.b64(envelope.signature)}


def receipt_push(rid, sender, status="delivered", reason=""):
    return {"type": "receipt", "receipt": rid, "msg": os.urandom(16).hex(), "from": sender, "status": status,
            "reason": reason, "at": reactor.seconds()}


def error_frame(code, word):
    return {"type": "error", "code": code, "message": "Refused: %s." % evil(word)}


# What alice's client is sent in the tests that push: a message from a name that is no user name (its envelope is
# bob's), a verified message from bob whose text and a file whose name are full of escapes, a receipt from a name
# that is no user name, and a receipt from bob whose reason is full of escapes.
def hostile_pushes():
    return [
        receipt_push(1, evil("receiptfrom")),
        receipt_push(2, "bob", "rejected", "cannot open: " + evil("receiptreason")),
        message_push(evil("senderword")),
        message_push("bob", ("hello " + evil("bodyword") + "\nsecond line\ttabbed").encode("utf-8")),
        message_push("bob", b"file data", content_type="file", filename=evil("fileword") + ".txt"),
    ]


class HostileServerTests(CLITestCase):
    """The script commands and the chat against a server that puts escapes in every string it sends."""

    def listen(self, **kwargs):
        factory = HostileFactory(**kwargs)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.host = "127.0.0.1:%d" % port.getHost().port
        return factory

    def alice_home(self):
        """A PAGER_HOME where alice has her key (unencrypted) for the hostile server."""
        home = self.home()
        directory = pager.user_directory(home, SERVER_ID, "alice")
        pager.save_private_key(os.path.join(directory, pager.KEY_FILE_NAME), key("alice"), "")
        return home

    async def run_as_alice(self, *args, stdin=b"", process=False):
        """
        Run a command as alice: in-process, or (with C{process}) as a child, where the chat reads a real standard
        input and everything goes through the writers pager.main puts on standard output and error.
        """
        run = self.pager if process else self.run_command
        return await run(*(args[:1] + (self.host, "--user", "alice") + args[1:]), home=self.alice_home(),
                         token_of="alice", stdin=stdin)

    def assertNothingHarmful(self, result):
        self.assertEqual(harmful(result.out), [], "standard output:\n%r" % result.out)
        self.assertEqual(harmful(result.err), [], "standard error:\n%r" % result.err)
        self.assertNotIn("Traceback", result.out + result.err)

    def assertRefusedNamesUnseen(self, result, factory):
        """Neither name that is no user name was shown; the message from one was rejected, the receipt dropped."""
        for word in ("senderword", "receiptfrom"):
            self.assertNotIn(word, result.out + result.err)
        [bad] = [p["msg"] for p in factory.pushes if p["type"] == "message" and p["from"] != "bob"]
        self.assertEqual([r["msg"] for r in factory.requests("reject")], [bad])

    async def test_fetch(self):
        """
        fetch prints bob's messages with the escapes made visible, never the name that is no user name; the message
        from that name is rejected and its receipt dropped.
        """
        factory = self.listen(pushes=hostile_pushes())
        result = await self.run_as_alice("fetch", process=True)  # through pager.main, as a user runs it
        self.assertExit(result, 0)
        self.assertNothingHarmful(result)
        self.assertRefusedNamesUnseen(result, factory)
        self.assertIn("\\x1b]0;bodyword\\x07", result.out)
        self.assertIn("second line\ttabbed", result.out)
        self.assertIn("fileword", result.out)
        self.assertIn("receiptreason", result.err)

    async def test_fetch_json(self):
        """fetch --json: JSON's own escaping keeps every control character off the terminal, and the text exact."""
        text = "hello " + evil("bodyword") + "\u200f\u061c\x7f\r"
        factory = self.listen(pushes=[message_push("bob", text.encode("utf-8")), message_push(evil("senderword"))])
        result = await self.run_as_alice("fetch", "--json")
        self.assertExit(result, 0)
        self.assertNothingHarmful(result)
        self.assertEqual(result.out, result.out.encode("ascii", "strict").decode("ascii"))
        [record] = [json.loads(line) for line in result.out.splitlines()]
        self.assertEqual(record["text"], text)
        self.assertEqual(record["from"], "bob")
        self.assertEqual(len(factory.requests("reject")), 1)
        self.assertNotIn("senderword", result.err)

    async def test_send_error_text(self):
        """The server refuses the message with a sentence full of escapes: one clean line on stderr, exit 1."""
        self.listen(answers={"send": error_frame("too_large", "errorword")})
        result = await self.run_as_alice("send", "--to", "bob", "hi")
        line = self.assertOneErrorLine(result, 1)
        self.assertNothingHarmful(result)
        self.assertIn("errorword", line)

    async def test_send_wait_delivered_reason(self):
        """send --wait-delivered: a rejection receipt's reason is shown on stderr with its escapes made visible."""
        msg = "ab" * 16
        self.listen(answers={"send": {"type": "ok", "msg": msg, "duplicate": False, "queued": []}},
                    after_send=[dict(receipt_push(7, "bob", "rejected", evil("reasonword")), msg=msg)])
        result = await self.run_as_alice("send", "--to", "bob", "--wait-delivered", "hi")
        line = self.assertOneErrorLine(result, 1)
        self.assertNothingHarmful(result)
        self.assertIn("reasonword", line)

    async def test_users_names_refused(self):
        """A users answer holding something that is no user name is refused (exit 1), and not shown."""
        self.listen(answers={"users": {"type": "ok", "online": ["bob", evil("onlineword")], "registered": ["bob"]}})
        result = await self.run_as_alice("users")
        self.assertOneErrorLine(result, 1)
        self.assertNothingHarmful(result)
        self.assertNotIn("onlineword", result.out + result.err)

    async def test_key_for_another_name_refused(self):
        """
        A bundle answer (the keys a message is sealed to) naming another user than the one asked for is refused:
        nothing is sent.
        """
        self.listen(answers={"bundle": {"type": "ok", "bundles": [
            {"user": evil("keyword"), "identity_key": pager.public_key_pem(key("bob").public_key()), "devices": []}]}})
        result = await self.run_as_alice("send", "--to", "bob", "hi")
        self.assertNotEqual(result.code, 0, result)
        self.assertNothingHarmful(result)
        self.assertNotIn("keyword", result.out + result.err)

    async def test_error_instead_of_hello(self):
        """An error frame instead of the hello, its sentence full of escapes: one clean line on stderr."""
        self.listen(instead_of_hello=error_frame("rate_limited", "helloerror"))
        result = await self.run_as_alice("users")
        line = self.assertOneErrorLine(result, pager.exit_code(pager.RateLimited()))
        self.assertNothingHarmful(result)
        self.assertIn("helloerror", line)

    async def test_error_answering_login(self):
        """The login answered with an error full of escapes and line breaks: still one clean line on stderr."""
        self.listen(answers={"login": {"type": "error", "code": "internal",
                                       "message": "Broken:\n" + evil("loginerror") + "\r\npager: fake line"}})
        result = await self.run_as_alice("fetch")
        line = self.assertOneErrorLine(result, 1)
        self.assertNothingHarmful(result)
        self.assertIn("loginerror", line)

    async def test_hello_software_string_refused(self):
        """A hello whose software string is full of escapes is refused as malformed, and not shown."""
        self.listen(hello={"server": evil("softword")})
        result = await self.run_as_alice("users")
        self.assertOneErrorLine(result, pager.EXIT_NETWORK)
        self.assertNothingHarmful(result)
        self.assertNotIn("softword", result.out + result.err)

    async def test_hello_server_id_refused(self):
        """A hello whose server id is no hex string is refused, and not shown."""
        self.listen(hello={"server_id": "ab" + evil("idword")})
        result = await self.run_as_alice("users")
        self.assertNotEqual(result.code, 0, result)
        self.assertNothingHarmful(result)
        self.assertNotIn("idword", result.out + result.err)

    async def test_connect_reading_a_pipe(self):
        """
        The chat (connect, reading a pipe): pushed messages and receipts, the users answer and a send refused with
        escapes: nothing harmful reaches standard output or standard error, refused names are never shown.
        """
        factory = self.listen(
            pushes=hostile_pushes(), hold=("users",),
            answers={"users": {"type": "ok", "online": [evil("onlineword")], "registered": ["bob"]},
                     "send": error_frame("quota_exceeded", "sendrefused")})
        result = await self.run_as_alice("connect", stdin=b"users\n/msg bob hi\n", process=True)
        self.assertExit(result, 0)
        self.assertNothingHarmful(result)
        self.assertRefusedNamesUnseen(result, factory)
        self.assertNotIn("onlineword", result.out + result.err)
        for word in ("bodyword", "fileword", "receiptreason", "sendrefused"):
            self.assertIn(word, result.out)
        self.assertIn("\\x1b]0;bodyword\\x07", result.out)

    async def test_connect_in_a_terminal(self):
        """
        The raw-mode chat screen (connect in a pseudo-terminal) draws its own escape sequences, but none of those the
        server put in pushed messages, receipts and the users answer.
        """
        factory = self.listen(
            pushes=hostile_pushes(),
            answers={"users": {"type": "ok", "online": ["bob"], "registered": ["bob", evil("registeredword")]}})
        child = TerminalProcess()
        argv = [sys.executable, PAGER_PY, "connect", self.host, "--user", "alice"]
        self.spawn(argv, base_env(TERM="xterm", PAGER_HOME=self.alice_home(), PAGER_TOKEN=token("alice")),
                   usePTY=True, child=child)
        await self.wait_for(lambda: factory.settled() or child.finished, "every push settled", tries=2000)
        await self.wait_for(lambda: "receiptreason" in child.output() or child.finished, "the pushes on the screen",
                            tries=2000)
        child.transport.write(b"users\r")
        await self.wait_for(lambda: factory.requests("users") and "\n" in child.output().split("users", 1)[-1]
                            or child.finished, "the users answer on the screen", tries=2000)
        child.transport.write(b"\x04")
        result = await self.finish(child, "the chat after Ctrl-D")
        drawn = child.output()
        self.assertEqual(result.code, 0, drawn)
        self.assertIn("not a user name", drawn)  # the users answer was refused
        self.assertNotIn("\\x0d", drawn)  # the client's own line ending after the chat is not escaped
        for sequence in ("\x1b]", "\x07", "\x1b[2J", "\x9b", "\u202e", "\u2066", "\u2069", "\x1b[0m", "\x1b[31m"):
            self.assertNotIn(sequence, drawn)
        for word in ("senderword", "receiptfrom", "registeredword"):
            self.assertNotIn(word, drawn)
        for word in ("bodyword", "fileword", "receiptreason"):
            self.assertIn(word, drawn)


class SafeWriterTests(unittest.TestCase):
    """The one writer everything shown on a terminal goes through."""

    def test_every_control_and_format_character(self):
        """
        Every C0 and C1 control but tab and newline, every format character (bidi controls, invisible ones) but the
        joiners some scripts need, the line and paragraph separators and lone surrogates are made visible.
        """
        allowed = {"\t", "\n", "\u200c", "\u200d"}
        for code in range(0x110000):
            c = chr(code)
            if c in allowed or unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Cs"):
                continue
            out = io.StringIO()
            pager.SafeWriter(out).write("a%sb" % c)
            self.assertNotIn(c, out.getvalue(), "U+%04X" % code)
            self.assertTrue(out.getvalue().startswith("a\\") and out.getvalue().endswith("b"), out.getvalue())

    def test_ordinary_text_unchanged(self):
        text = "plain text, tab\there\nnew line; ünïcödé, 日本語, emoji 👩\u200d💻, العربية"
        out = io.StringIO()
        pager.SafeWriter(out).write(text)
        self.assertEqual(out.getvalue(), text)

    def test_escapes_made_visible(self):
        out = io.StringIO()
        pager.SafeWriter(out).write(evil("w"))
        self.assertEqual(out.getvalue(), "\\x1b]0;w\\x07\\x1b[2J\\x9b31m\\u202ew\\u2066x\\u2069\\x1b[0m")

    def test_wrap_once(self):
        out = io.StringIO()
        writer = pager.SafeWriter.wrap(out)
        self.assertIs(pager.SafeWriter.wrap(writer), writer)
        writer.write("\\")
        self.assertEqual(out.getvalue(), "\\")

    def test_prompter(self):
        """What the prompter says (server sentences among it) goes through the writer."""
        out = io.StringIO()
        pager.Prompter(reactor, interactive=False, out=out).say("error: " + evil("w"))
        self.assertEqual(harmful(out.getvalue()), [])

    def test_plain_chat(self):
        out = io.StringIO()
        plain = pager.PlainChat(_StubChat(), out)
        plain.makeConnection(StringTransport())
        plain.show("from the network: " + evil("w"))
        self.assertEqual(harmful(out.getvalue()), [])
        self.assertIn("\\x1b]0;w", out.getvalue())

    def test_chat_screen(self):
        """
        The raw-mode chat screen draws its own escape sequences (erase the line, move the cursor) but none of those
        in the text it shows.
        """
        transport = StringTransport()
        chat_screen = pager.ChatScreen(_StubChat(), reactor)
        chat_screen.makeConnection(transport)
        transport.clear()
        chat_screen.show("[12:00] bob " + evil("w") + "\nsecond line")
        chat_screen.set_prompt(evil("p") + "> ")
        chat_screen.show("again")
        drawn = transport.value().decode("utf-8")
        for sequence in ("\x1b]", "\x07", "\x1b[2J", "\x9b", "\u202e", "\u2066", "\x1b[0m", "\x1b[31m"):
            self.assertNotIn(sequence, drawn)
        self.assertIn("\\x1b]0;w\\x07", drawn)
        self.assertIn("\r\nsecond line\r\n", drawn)
        self.assertIn("\\x1b]0;p\\x07", drawn)


class _StubChat:
    """Just what a chat UI calls on its chat."""

    confirming = None

    def attach(self, ui):
        self.ui = ui

    def quit(self):
        pass


class ClientNameCheckTests(unittest.SynchronousTestCase):
    """L{pager.PagerClient} checks every name the server sends before handing anything on (no sockets)."""

    def setUp(self):
        self.proto = pager.PagerClientProtocol()
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        hello = {"type": "hello", "protocol": pager.PROTOCOL_VERSION, "server": "pager/test", "server_id": SERVER_ID,
                 "challenge": pager.b64(b"\x01" * pager.CHALLENGE_SIZE), "limits": pager.Limits().public()}
        self.proto.dataReceived(pager.encode_frame(hello) + b"\n")
        self.client = pager.PagerClient(self.proto, reactor=MemoryReactorClock(),
                                        in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
        self.handed = []
        self.client.on_message = self.client.on_receipt = self.handed.append
        self.client.on_rejected = lambda *args: self.handed.append(args)
        self.transport.clear()

    def receive(self, frame):
        self.proto.dataReceived(pager.encode_frame(frame) + b"\n")

    def sent(self):
        return [json.loads(line) for line in self.transport.value().splitlines() if line.strip()]

    def answer(self, **fields):
        [request] = self.sent()
        self.transport.clear()
        self.receive(dict(fields, id=request["id"]))
        return request

    def test_receipt_from_a_bad_name_dropped(self):
        """A receipt whose from is not a user name (or whose status is unknown) is acknowledged, never handed on."""
        self.receive(receipt_push(1, evil("w")))
        self.receive(receipt_push(2, "Bob"))
        self.receive(receipt_push(3, "bob", status=evil("s")[:32]))
        self.assertEqual(self.handed, [])
        acked = [r for frame in self.sent() if frame["type"] == "ack" for r in frame.get("receipts", [])]
        self.assertEqual(acked, [1])  # the others wait for the first acknowledgement's answer
        self.answer(type="ok")
        acked = [r for frame in self.sent() if frame["type"] == "ack" for r in frame.get("receipts", [])]
        self.assertEqual(acked, [2, 3])
        self.transport.clear()
        self.receive(receipt_push(4, "bob"))
        self.assertEqual([r.peer for r in self.handed], ["bob"])

    def test_message_from_a_bad_name_rejected(self):
        """A message whose from is not a user name is rejected without being opened or handed on."""
        push = message_push(evil("w"))
        self.receive(push)
        request = self.answer(type="ok")
        self.assertEqual((request["type"], request["msg"]), ("reject", push["msg"]))
        self.assertEqual(self.handed, [])
        self.assertEqual(self.client.processed, 1)

    def test_users_answer_with_a_bad_name(self):
        for bad in (["bob", evil("w")], ["bob", "Bob"], "bob", [3]):
            d = defer.Deferred.fromCoroutine(self.client.users())
            self.answer(type="ok", online=["bob"], registered=bad)
            self.failureResultOf(d, pager.BadRequest)

    def test_key_answer_for_another_name(self):
        d = defer.Deferred.fromCoroutine(self.client.public_key("bob"))
        self.answer(**dict(HostileServer.answer_key(None, {"user": "bob"}), user="mallory"))
        self.failureResultOf(d, pager.BadKey)

    def test_error_sentence_on_one_line(self):
        """An error's sentence reaches the caller on one line, at most 1000 characters (and 3 dots)."""
        d = defer.Deferred.fromCoroutine(self.client.ping())
        self.answer(type="error", code="internal", message="Broken:\r\n\x1b[2J\u2028pager: fake  line\n")
        self.assertEqual(self.failureResultOf(d, pager.InternalError).value.message, "Broken: \x1b[2J pager: fake line")
        d = defer.Deferred.fromCoroutine(self.client.ping())
        self.answer(type="error", code="internal", message="x" * 5000)
        self.assertEqual(len(self.failureResultOf(d, pager.InternalError).value.message), 1003)
        d = defer.Deferred.fromCoroutine(self.client.ping())
        self.answer(type="error", code="internal", message={"not": "text"})
        self.assertEqual(self.failureResultOf(d, pager.InternalError).value.message, "(the server gave no reason)")
