"""
The script commands (C{send}, C{fetch}, C{users}, C{export-key}, C{import-key}) against a real server running in
this process on a loopback port.  Most run in-process through the command coroutines (L{CLITestCase.run_command}),
which proves what a child process would without paying for a fresh Python; what only a process shows (a signal, the
umask of a new process, C{python pager.py} itself) runs as a child started with C{reactor.spawnProcess}, so the
server keeps serving while the test waits, and every wait is bounded.

Each test has its own C{PAGER_HOME}.  To keep the suite fast, most users are registered in-process with the module's
keys (L{tests.test_e2e.key}) and their key files written straight into their home with L{pager.save_private_key};
only the tests about first use let the command line make a key.
"""

import dataclasses
import io
import json
import os
import re
import shutil
import sqlite3
import stat
import sys

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, error, protocol, reactor, stdio, task
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

import pager
from tests.test_e2e import E2ETestCase, free_port, key, token

PAGER_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pager.py")
PROCESS_TIMEOUT = 30.0  # seconds a child process may take before it is killed and the test fails
MESSAGE_ID = re.compile(r"[0-9a-f]{32}")


def base_env(**extra):
    """This process's environment without any PAGER_* variable, plus C{extra} (None values are left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGER_")}
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


@dataclasses.dataclass
class Result:
    """How a child process ended: its exit code (None if a signal ended it) and what it wrote."""

    code: object
    out: str
    err: str

    def __str__(self):
        return "exit code %r\n--- stdout:\n%s\n--- stderr:\n%s" % (self.code, self.out, self.err)


class Child(protocol.ProcessProtocol):
    """Collects a child's output; writes C{stdin} (if not None) and closes its standard input."""

    def __init__(self, stdin=b""):
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended = defer.Deferred()
        self.code = None
        self.finished = False

    def connectionMade(self):
        if self.stdin is not None:
            if self.stdin:
                self.transport.write(self.stdin)
            self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        (self.err if fd == 2 else self.out).extend(data)

    def processEnded(self, reason):
        self.finished = True
        self.code = reason.value.exitCode
        self.ended.callback(self.code)

    def result(self):
        return Result(self.code, self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace"))


class Output(io.StringIO):
    """
    A captured standard output whose reader goes away after C{lines} lines: the next write raises BrokenPipeError,
    and later ones are thrown away without an error, as they are once fetch has pointed its output at /dev/null.
    """

    def __init__(self, lines=None):
        super().__init__()
        self.lines = lines
        self.broken = False
        read, self.fd = os.pipe()
        os.close(read)

    def write(self, text):
        if self.broken:
            return len(text)
        if self.lines is not None and self.getvalue().count("\n") >= self.lines:
            self.broken = True
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)

    def fileno(self):
        return self.fd

    def close_fd(self):
        os.close(self.fd)


_SERVER_LOGGERS = ("pager.PagerServer", "pager.PagerService", "pager.Store")  # a child process has no server in it


def _no_chat_here(*args, **kwargs):
    raise AssertionError("the chat would read this process's real standard input: run connect as a child process")


class CLITestCase(E2ETestCase):
    """
    Starts a server, provisions users, and runs pager-cli commands: in-process with L{run_command}, or as child
    processes with L{pager}.
    """

    async def serve(self):
        """Start a server; sets C{self.server}, C{self.address} (client endpoint) and C{self.host} (HOST:PORT)."""
        self.server, self.address = await self.start_server()
        self.host = "127.0.0.1:%d" % self.server.port.getHost().port
        return self.server

    @property
    def server_id(self):
        return self.server.factory.server_id

    def home(self):
        """A new, not yet existing, PAGER_HOME (an absolute path)."""
        return os.path.abspath(self.mktemp())

    def user_dir(self, home, name):
        return os.path.join(home, self.server_id, name)

    async def account(self, name, private_key=None):
        """
        Register C{name} on the server in-process (with the module key unless told otherwise), then log out.  The
        device's prekeys stay in the test's keyring, for the in-process sessions of C{name} that follow.
        """
        client = await pager.PagerClient.connect(self.address, reactor, seen=pager.MemorySeen(self.keyring))
        try:
            await client.register(name, token(name), private_key or key(name))
        finally:
            await client.close()

    def install_key(self, home, name, passphrase="", private_key=None):
        """Write C{name}'s key file into C{home}, as the client would have after registering; returns its path."""
        directory = pager.user_directory(home, self.server_id, name)
        path = os.path.join(directory, pager.KEY_FILE_NAME)
        pager.save_private_key(path, private_key or key(name), passphrase)
        return path

    async def provision(self, name, passphrase=""):
        """
        A registered user with its key on this machine: returns its PAGER_HOME.  Registered with the local store
        in that home, so the device's prekeys are there, as after registering with the command line.
        """
        home = self.home()
        self.install_key(home, name, passphrase)
        store = pager.LocalStore(os.path.join(self.user_dir(home, name), pager.LOCAL_DB_NAME), reactor)
        try:
            await store.open(reactor.seconds())
            client = await pager.PagerClient.connect(self.address, reactor, seen=store, pins=store)
            try:
                await client.register(name, token(name), key(name))
            finally:
                await client.close()
        finally:
            store.close()
        return home

    def spawn(self, argv, env, stdin=b"", usePTY=False, child=None):
        """Start C{argv} (C{argv[0]} is the executable); the child is killed at cleanup if still running."""
        child = child or Child(stdin)
        reactor.spawnProcess(child, argv[0], argv, env=env, path=os.path.dirname(PAGER_PY), usePTY=usePTY)
        self.addCleanup(self.reap, child)
        return child

    async def reap(self, child):
        if not child.finished:
            try:
                child.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            await child.ended

    async def finish(self, child, what, timeout=PROCESS_TIMEOUT):
        """Wait (at most C{timeout} seconds) for C{child} to exit; fail the test, with its output, if it does not."""
        if not child.finished:
            timer = reactor.callLater(timeout, self._kill_late, child)
            try:
                await child.ended
            finally:
                if timer.active():
                    timer.cancel()
            if getattr(child, "killed_late", False):
                self.fail("%s did not exit within %g s and was killed.\n%s" % (what, timeout, child.result()))
        return child.result()

    def _kill_late(self, child):
        child.killed_late = True
        try:
            child.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    async def run_command(self, *argv, home=None, token_of=None, passphrase=None, env=None, stdin=b"", stdout=None,
                          timeout=PROCESS_TIMEOUT):
        """
        Run C{pager-cli ARGV...} in this process as L{pager.main} would (HOST in C{argv} stands for the server), and
        return its L{Result}; the arguments are L{pager}'s.  Standard output and error are captured behind the
        L{pager.SafeWriter} main puts there, with the client's log warnings as C{pager: ...} lines; standard input
        holds C{stdin} (bytes) and is no terminal.  A command that reaches the chat (which reads the real standard
        input) is an error: C{connect} past its questions runs as a child process.
        """
        variables = dict(PAGER_HOME=home, PAGER_PASSPHRASE=passphrase,
                         PAGER_TOKEN=token(token_of) if token_of else None)
        variables.update(env or {})
        saved_environment = dict(os.environ)
        for name in list(os.environ):
            if name.startswith("PAGER_"):
                del os.environ[name]
        os.environ.update({k: v for k, v in variables.items() if v is not None})
        given = io.BytesIO(stdin or b"")

        def read_line(fd=0):
            line = given.readline()
            return line.rstrip(b"\n").decode("utf-8", "replace").rstrip("\r") if line else None
        isatty = os.isatty
        patches = [(pager, "_read_stdin", given.read), (pager, "_read_line_unbuffered", read_line),
                   (os, "isatty", lambda fd: False if fd == 0 else isatty(fd)), (stdio, "StandardIO", _no_chat_here)]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        out = stdout if stdout is not None else Output()
        err = io.StringIO()
        saved_streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = pager.SafeWriter.wrap(out), pager.SafeWriter.wrap(err)
        warnings = pager.client_log_observer()

        def client_warnings(event):
            if not event.get("log_namespace", "").startswith(_SERVER_LOGGERS):
                warnings(event)
        globalLogPublisher.addObserver(client_warnings)
        server = getattr(self, "server", None)
        connections = server.factory.connections if server is not None else 0
        code = 0
        try:
            options = pager.Options()
            try:
                options.parseOptions([self.host if a == "HOST" else a for a in argv])
            except usage.UsageError as e:
                raise SystemExit(pager.report(pager._usage_error(options, e, "pager-cli")))
            if options.subCommand in ("make-cert", "admin"):
                try:
                    (pager._make_cert_command if options.subCommand == "make-cert" else pager._admin_command)(
                        options.subOptions)
                except (pager.PagerError, usage.UsageError) as e:
                    raise SystemExit(pager.report(e))
            else:
                self.assertNotEqual(options.subCommand, "server", "run the server with self.serve()")
                running = defer.Deferred.fromCoroutine(
                    pager._run_client_command(reactor, options.subCommand, options.subOptions))
                running.addTimeout(timeout, reactor)
                try:
                    await running
                except defer.TimeoutError:
                    self.fail("pager-cli %s did not finish within %g s.\n%s"
                              % (" ".join(argv), timeout, Result(None, out.getvalue(), err.getvalue())))
        except SystemExit as e:
            code = e.code
        finally:
            globalLogPublisher.removeObserver(client_warnings)
            sys.stdout, sys.stderr = saved_streams
            for owner, name, value in originals:
                setattr(owner, name, value)
            os.environ.clear()
            os.environ.update(saved_environment)
            if stdout is None:
                out.close_fd()
        if server is not None:
            # A child has exited by the time its parent sees it, long after its last bytes left: wait, as that does,
            # until the server has read everything the command sent and seen its connection close.
            await self.wait_for(lambda: server.factory.connections <= connections, "the command's connection to close")
        return Result(code, out.getvalue(), err.getvalue())

    async def pager(self, *args, home=None, user=None, token_of=None, passphrase=None, stdin=b"", env=None,
                    prefix=(), timeout=PROCESS_TIMEOUT):
        """
        Run C{pager.py ARGS...} to completion; returns its L{Result}.  C{home} becomes PAGER_HOME, C{token_of}
        NAME puts NAME's safetoken in PAGER_TOKEN, C{passphrase} goes in PAGER_PASSPHRASE, C{env} adds variables.
        """
        variables = dict(PAGER_HOME=home, PAGER_PASSPHRASE=passphrase,
                         PAGER_TOKEN=token(token_of) if token_of else None)
        variables.update(env or {})
        argv = list(prefix) + [sys.executable, PAGER_PY] + list(args)
        child = self.spawn(argv, base_env(**variables), stdin)
        return await self.finish(child, "pager.py %s" % " ".join(args), timeout)

    def assertExit(self, result, code):
        self.assertEqual(result.code, code, "expected exit code %d:\n%s" % (code, result))

    def assertOneErrorLine(self, result, code):
        """The command failed with C{code} and exactly one line on stderr, 'pager: ...', and no traceback."""
        self.assertExit(result, code)
        self.assertNotIn("Traceback", result.err + result.out)
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 1, "expected exactly one line on stderr:\n%s" % result)
        self.assertTrue(lines[0].startswith("pager: "), "stderr does not start with 'pager: ':\n%s" % result)
        return lines[0]

    def assertMode(self, path, mode):
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), mode, "mode of %s" % path)


class SendFetchTests(CLITestCase):
    """send and fetch carry messages end to end; fetch acknowledges and remembers what it printed."""

    async def test_send_then_fetch(self):
        """
        bob registers with a first fetch --register (nothing printed); alice (new) sends with --register and gets the
        message id; bob's fetch
        prints it, fetch --json prints the next as JSON, and a last fetch prints nothing: all acknowledged, and the
        duplicate store on disk holds both ids.
        """
        await self.serve()
        bob_home, alice_home = self.home(), self.home()
        first = await self.pager("fetch", self.host, "--user", "bob", "--register", home=bob_home, token_of="bob",
                                 passphrase="bob's passphrase")
        self.assertExit(first, 0)
        self.assertEqual(first.out, "")
        self.assertTrue(os.path.exists(os.path.join(self.user_dir(bob_home, "bob"), "key.p12")))

        sent = await self.pager("send", self.host, "--user", "alice", "--to", "bob", "hello", "bob", "--register",
                                home=alice_home, token_of="alice", passphrase="alice's passphrase")
        self.assertExit(sent, 0)
        self.assertRegex(sent.out, r"\A[0-9a-f]{32}\n\Z")
        msg1 = sent.out.strip()

        fetched = await self.pager("fetch", self.host, "--user", "bob", home=bob_home, token_of="bob",
                                   passphrase="bob's passphrase")
        self.assertExit(fetched, 0)
        [line] = fetched.out.splitlines()
        self.assertIn("alice", line)
        self.assertTrue(line.endswith("hello bob"), line)
        self.assertIn("first message: key pinned", line)

        sent = await self.pager("send", self.host, "--user", "alice", "--to", "bob", "second one",
                                home=alice_home, token_of="alice", passphrase="alice's passphrase")
        self.assertExit(sent, 0)
        msg2 = sent.out.strip()
        fetched = await self.pager("fetch", self.host, "--user", "bob", "--json", home=bob_home, token_of="bob",
                                   passphrase="bob's passphrase")
        self.assertExit(fetched, 0)
        [line] = fetched.out.splitlines()
        record = json.loads(line)
        for field in ("id", "from", "to", "time", "accepted_at", "type", "text", "key_status"):
            self.assertIn(field, record)
        self.assertEqual((record["id"], record["from"], record["to"], record["type"], record["text"]),
                         (msg2, "alice", ["bob"], "text", "second one"))
        self.assertEqual(record["key_status"], "pinned")  # pinned on first use, not compared out of band
        self.assertIsInstance(record["time"], (int, float))
        self.assertIsInstance(record["accepted_at"], (int, float))

        again = await self.pager("fetch", self.host, "--user", "bob", home=bob_home, token_of="bob",
                                 passphrase="bob's passphrase")
        self.assertExit(again, 0)
        self.assertEqual(again.out, "")
        self.assertEqual(await self.pending(self.server, "bob"), [])

        db = sqlite3.connect(os.path.join(self.user_dir(bob_home, "bob"), pager.LOCAL_DB_NAME))
        try:
            seen = {(sender, bytes(m).hex()) for sender, m in db.execute("SELECT sender, msg_id FROM seen")}
        finally:
            db.close()
        self.assertEqual(seen, {("alice", msg1), ("alice", msg2)})

    async def test_redelivered_message_already_shown(self):
        """
        A fetch that printed a message and recorded it, but was cut off before its acknowledgement reached the
        server, left it pending: the next fetch acknowledges it without printing it again, and exits.
        """
        await self.serve()
        bob_home = await self.provision("bob")
        await self.account("alice")
        alice = await self.login(self.address, "alice")
        msg = await alice.send("bob", "printed once")
        store = pager.LocalStore(os.path.join(self.user_dir(bob_home, "bob"), pager.LOCAL_DB_NAME), reactor)
        await store.open(reactor.seconds())
        await store.add("alice", bytes.fromhex(msg), reactor.seconds())
        store.close()
        fetched = await self.run_command("fetch", self.host, "--user", "bob", home=bob_home, token_of="bob", timeout=8)
        self.assertExit(fetched, 0)
        self.assertEqual(fetched.out, "")
        await self.no_pending(self.server, "bob")  # the server may still be writing the acknowledgement

    async def test_message_from_stdin(self):
        """Without MESSAGE, send reads the message from standard input."""
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", home=alice_home,
                                token_of="alice", stdin=b"disk full\n")
        self.assertExit(sent, 0)
        msg = sent.out.strip()
        self.assertRegex(msg, MESSAGE_ID)
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        [message] = bob.events.messages
        self.assertOpened(message, "alice", message.plaintext, msg, ["bob"])
        self.assertEqual(message.plaintext.rstrip(b"\n"), b"disk full")

    async def test_empty_stdin(self):
        """An empty standard input is a usage error: nothing is sent."""
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", home=alice_home,
                                  token_of="alice", stdin=b"")
        self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertEqual(result.out, "")
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_ten_mebibyte_file(self):
        """
        send --file with 10 MiB of random bytes: fetch saves it, byte for byte, as files/<name> (mode 0600) in bob's
        directory for this server and names the path it saved.
        """
        await self.serve()
        alice_home = await self.provision("alice")
        bob_home = await self.provision("bob")
        data = os.urandom(10 * 1024 * 1024)
        source = os.path.abspath(os.path.join(self.mktemp(), "report.bin"))
        os.makedirs(os.path.dirname(source))
        with open(source, "wb") as f:
            f.write(data)
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--file", source,
                                home=alice_home, token_of="alice")
        self.assertExit(sent, 0)
        self.assertRegex(sent.out.strip(), MESSAGE_ID)

        fetched = await self.run_command("fetch", self.host, "--user", "bob", home=bob_home, token_of="bob")
        self.assertExit(fetched, 0)
        saved = os.path.join(self.user_dir(bob_home, "bob"), "files", "report.bin")
        self.assertTrue(os.path.exists(saved), "nothing at %s:\n%s" % (saved, fetched))
        self.assertMode(saved, 0o600)
        self.assertMode(os.path.dirname(saved), 0o700)
        with open(saved, "rb") as f:
            self.assertTrue(f.read() == data, "the saved file differs from the one sent")
        self.assertIn(saved, fetched.out)
        self.assertIn("report.bin", fetched.out)
        await self.no_pending(self.server, "bob")  # the server may still be writing the acknowledgement

    async def test_users_json(self):
        """users --json prints one JSON object: who is online and who is registered."""
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("carol")
        await self.account("bob")
        await self.login(self.address, "bob")
        result = await self.run_command("users", self.host, "--user", "alice", "--json", home=alice_home,
                                  token_of="alice")
        self.assertExit(result, 0)
        [line] = result.out.splitlines()
        listing = json.loads(line)
        self.assertEqual(set(listing), {"online", "registered"})
        self.assertEqual(listing["registered"], ["alice", "bob", "carol"])
        self.assertIn("bob", listing["online"])
        self.assertNotIn("carol", listing["online"])


class WaitDeliveredTests(CLITestCase):
    """send --wait-delivered waits for the recipient's delivery receipt, and gives up after --timeout."""

    async def test_delivered(self):
        """With bob online, send --wait-delivered exits 0 once bob's client has confirmed the delivery."""
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        bob = await self.login(self.address, "bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered",
                                  "--timeout", "20", "are you there", home=alice_home, token_of="alice")
        self.assertExit(result, 0)
        msg = result.out.strip()
        self.assertRegex(msg, MESSAGE_ID)
        self.assertEqual([(m.message_id.hex(), m.plaintext) for m in bob.events.messages],
                         [(msg, b"are you there")])

    async def test_not_delivered(self):
        """With bob offline and --timeout 1, send --wait-delivered exits 1 saying the message was not delivered."""
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered",
                                  "--timeout", "1", "anyone?", home=alice_home, token_of="alice")
        line = self.assertOneErrorLine(result, pager.EXIT_FAILURE)
        self.assertIn("not delivered", line.lower())
        self.assertIn("bob", line)
        msg = result.out.strip()
        self.assertRegex(msg, MESSAGE_ID)
        self.assertEqual([m.msg_id.hex() for m in await self.pending(self.server, "bob")], [msg])

    async def test_receipt_fetched_later(self):
        """
        The receipt of a message delivered after send --wait-delivered gave up is told by the sender's next fetch:
        a JSON record with --json (the message's id, who, what, when), once; a line naming the id without it.
        """
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered",
                                        "--timeout", "1", "anyone?", home=alice_home, token_of="alice")
        self.assertExit(result, pager.EXIT_FAILURE)
        msg = result.out.strip()
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        await self.wait_for(lambda: self.server.store.pending_receipts("alice", 0), "alice's receipt")
        fetched = await self.run_command("fetch", self.host, "--user", "alice", "--json", home=alice_home,
                                         token_of="alice")
        self.assertExit(fetched, 0)
        [record] = [json.loads(line) for line in fetched.out.splitlines()]
        self.assertEqual({k: record[k] for k in ("type", "msg", "peer", "status")},
                         {"type": "receipt", "msg": msg, "peer": "bob", "status": "delivered"})
        self.assertIsInstance(record["time"], float)
        self.assertEqual(fetched.err, "")
        again = await self.run_command("fetch", self.host, "--user", "alice", "--json", home=alice_home,
                                       token_of="alice")
        self.assertEqual((again.out, again.err), ("", ""))  # acknowledged: told once

        second = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered",
                                        "--timeout", "20", "and you?", home=alice_home, token_of="alice")
        self.assertExit(second, 0)  # bob is online: delivered while send waited, its receipt taken then
        await bob.close()
        third = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered",
                                       "--timeout", "1", "later", home=alice_home, token_of="alice")
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's third message")
        await self.wait_for(lambda: self.server.store.pending_receipts("alice", 0), "alice's second receipt")
        plain = await self.run_command("fetch", self.host, "--user", "alice", home=alice_home, token_of="alice")
        self.assertExit(plain, 0)
        self.assertEqual(plain.out, "")
        self.assertRegex(plain.err, r"^pager: \[\d\d:\d\d\] \u2713\u2713 %s delivered to bob\n$" % third.out.strip())


    async def test_connection_lost_while_waiting(self):
        """
        A server that goes away while send --wait-delivered waits ends the wait at once: exit 6, one sentence that
        the message was accepted (with its id) and its delivery is unknown, not the --timeout's "not delivered".
        """
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        sending = defer.Deferred.fromCoroutine(self.run_command(
            "send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered", "--timeout", "60", "still there?",
            home=alice_home, token_of="alice", timeout=15))
        pending = await self.wait_for(lambda: self.pending(self.server, "bob"), "the message to be accepted")
        await self.server.stopService()
        result = await sending
        line = self.assertOneErrorLine(result, pager.EXIT_NETWORK)
        msg = pending[0].msg_id.hex()
        self.assertEqual(result.out.strip(), msg)
        self.assertEqual(line, "pager: The connection to %s was lost while waiting for delivery to bob: the message "
                               "%s was accepted, but whether it was delivered is unknown." % (self.host, msg))


class FetchWaitTests(CLITestCase):
    """fetch --wait that the server leaves, or a signal stops, says so: it never ends as if it had waited."""

    async def bob_waiting(self):
        """A server, and bob's home with his key; bob has no session on the server."""
        await self.serve()
        home = await self.provision("bob")
        await self.wait_for(lambda: not self.server.factory.online.get("bob"), "bob's registration to log out")
        return home

    async def test_server_gone(self):
        """A server that stops while fetch --wait waits: exit 6 at once, one sentence."""
        home = await self.bob_waiting()
        fetching = defer.Deferred.fromCoroutine(self.run_command(
            "fetch", self.host, "--user", "bob", "--wait", "60", home=home, token_of="bob", timeout=15))
        await self.wait_for(lambda: self.server.factory.online.get("bob"), "fetch to log in")
        await self.server.stopService()
        result = await fetching
        line = self.assertOneErrorLine(result, pager.EXIT_NETWORK)
        self.assertEqual(line, "pager: The connection to %s was lost while waiting for more messages (--wait)."
                         % self.host)

    async def interrupt(self, argv, name, signal, started):
        """Start pager.py C{argv} as C{name}, send it C{signal} once C{started()} is true: its L{Result}."""
        child = self.spawn([sys.executable, PAGER_PY] + argv, base_env(PAGER_HOME=self.homes[name],
                                                                        PAGER_TOKEN=token(name)))
        await self.wait_for(lambda: started(child) or child.finished, "pager.py %s to start" % argv[0])
        self.assertFalse(child.finished, child.result())
        child.transport.signalProcess(signal)
        return await self.finish(child, "%s stopped by SIG%s" % (argv[0], signal), 10)

    async def test_fetch_wait_interrupted(self):
        """SIGINT, SIGTERM or SIGHUP during fetch --wait: exit 130 and one sentence, never 0."""
        self.homes = {"bob": await self.bob_waiting()}
        for signal in ("INT", "TERM", "HUP"):
            result = await self.interrupt(["fetch", self.host, "--user", "bob", "--wait", "60"], "bob", signal,
                                          lambda child: self.server.factory.online.get("bob"))
            self.assertEqual(self.assertOneErrorLine(result, pager.EXIT_INTERRUPTED),
                             "pager: interrupted before the command finished.")
            await self.wait_for(lambda: not self.server.factory.online.get("bob"), "bob's session to end")

    async def test_send_wait_interrupted(self):
        """SIGINT or SIGTERM during send --wait-delivered: exit 130 and the one sentence, no traceback."""
        await self.serve()
        self.homes = {"alice": await self.provision("alice")}
        await self.account("bob")
        for signal in ("INT", "TERM"):
            result = await self.interrupt(
                ["send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered", "--timeout", "60", "hi"],
                "alice", signal, lambda child: b"\n" in child.out)
            self.assertEqual(self.assertOneErrorLine(result, pager.EXIT_INTERRUPTED),
                             "pager: interrupted before the command finished.")
            self.assertRegex(result.out.strip(), MESSAGE_ID)


class NoReceiptTests(CLITestCase):
    """A script's send that does not wait for delivery asks for no receipt: the server makes and stores none."""

    async def test_plain_send_asks_no_receipt(self):
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "no answer needed",
                                        home=alice_home, token_of="alice")
        self.assertExit(result, 0)
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")

        async def acknowledged():
            return not await self.pending(self.server, "bob")
        await self.wait_for(acknowledged, "bob's acknowledgement")
        self.assertEqual(await self.server.store.pending_receipts("alice", 0), [])
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"no answer needed"])


class BusyServerTests(CLITestCase):
    """send waits for a busy server (rate_limited with a wait) and tries again, up to pager.SEND_BUSY_WAIT in all."""

    async def send_while_busy(self, refusals, text):
        """
        alice sends bob C{text} while the server refuses her next C{refusals} prekey-bundle requests as over the
        bundle rate, with a 1 s wait: C{(result, the users refused)}.
        """
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        factory, refused = self.server.factory, []
        original = factory.bundle_requested

        def bundle_requested(user):
            if len(refused) < refusals:
                refused.append(user)
                raise pager.RateLimited("Too many prekey bundle requests; try again in 1 s.", retry_after=1)
            return original(user)
        factory.bundle_requested = bundle_requested
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", text, home=alice_home,
                                        token_of="alice")
        return result, refused

    async def test_busy_then_sent(self):
        result, refused = await self.send_while_busy(1, "in a while")
        self.assertExit(result, 0)
        self.assertEqual(refused, ["alice"])
        self.assertEqual(result.err, "pager: the server is busy; trying again in 1 s.\n")
        self.assertEqual([m.msg_id.hex() for m in await self.pending(self.server, "bob")], [result.out.strip()])

    async def test_too_busy(self):
        """A wait past what is left of SEND_BUSY_WAIT ends the command: exit 1, one line, nothing sent."""
        self.patch(pager, "SEND_BUSY_WAIT", 0.5)
        result, _ = await self.send_while_busy(100, "never mind")
        line = self.assertOneErrorLine(result, pager.EXIT_FAILURE)
        self.assertEqual(line, "pager: The server is busy for longer than 0.5 s; the message was not sent (try "
                               "again in 1 s).")
        self.assertEqual(result.out, "")
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_stayed_busy(self):
        """After waiting once, a wait past what is left of SEND_BUSY_WAIT ends the command, saying how long it waited."""
        self.patch(pager, "SEND_BUSY_WAIT", 1.5)
        await self.assertStayedBusy(*await self.send_while_busy(2, "never mind"))

    async def assertStayedBusy(self, result, refused):
        """One wait, then exit 1 saying how long it waited; nothing sent."""
        self.assertExit(result, pager.EXIT_FAILURE)
        self.assertEqual(refused, ["alice", "alice"])
        self.assertEqual(result.err, "pager: the server is busy; trying again in 1 s.\n"
                                     "pager: The server stayed busy for 1 s of waiting; the message was not sent (try "
                                     "again in 1 s).\n")
        self.assertEqual(result.out, "")
        self.assertEqual(await self.pending(self.server, "bob"), [])


    async def send_while_logins_busy(self, refusals, text):
        """
        alice sends bob C{text} while the server refuses her next C{refusals} logins as too many of her logins being
        checked at once (as it does for a dozen sends of hers started together): C{(result, the users refused)}.
        """
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        factory, refused = self.server.factory, []
        original = factory.hash_token_for

        async def hash_token_for(connection, account, token, salt):
            if account == "alice" and len(refused) < refusals:
                refused.append(account)
                raise pager.RateLimited("Too many logins of this account or from your address are being checked; "
                                        "try again in a moment.", retry_after=factory.HASH_RETRY_AFTER)
            return await original(connection, account, token, salt)
        factory.hash_token_for = hash_token_for
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", text, home=alice_home,
                                        token_of="alice")
        return result, refused

    async def test_logins_busy_then_sent(self):
        """A login refused as one of too many being checked is tried again after the wait the server gives."""
        result, refused = await self.send_while_logins_busy(2, "after the others")
        self.assertExit(result, 0)
        self.assertEqual(refused, ["alice", "alice"])
        self.assertEqual(result.err, "pager: the server is busy; trying again in 1 s.\n" * 2)
        self.assertEqual([m.msg_id.hex() for m in await self.pending(self.server, "bob")], [result.out.strip()])

    async def test_logins_stayed_busy(self):
        """The login's waits count towards SEND_BUSY_WAIT like the message's: past it, exit 1, nothing sent."""
        self.patch(pager, "SEND_BUSY_WAIT", 1.5)
        await self.assertStayedBusy(*await self.send_while_logins_busy(100, "never mind"))


class BadTimeoutTests(CLITestCase):
    """A --timeout that is not a positive number is a usage error before anything is sent (a retry would not send twice)."""

    async def test_bad_timeout_sends_nothing(self):
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        for value in ("-1", "0", "nan", "inf", "abc"):
            result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--wait-delivered",
                                            "--timeout", value, "hello", home=alice_home, token_of="alice")
            line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
            self.assertIn("--timeout must be a positive finite number, not '%s'" % value, line)
            self.assertEqual(result.out, "")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "--timeout", "5",
                                        "hello", home=alice_home, token_of="alice")
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)  # not silently ignored: the script meant to wait
        self.assertIn("--timeout is how long --wait-delivered waits", line)
        self.assertEqual(await self.pending(self.server, "bob"), [])


class BadWaitTests(CLITestCase):
    """A fetch --wait that is not a finite number of seconds, 0 or more, is a usage error before anything is fetched."""

    async def test_bad_wait(self):
        home = self.home()
        for value in ("-1", "nan", "inf", "abc"):
            result = await self.run_command("fetch", "127.0.0.1:1", "--user", "bob", "--wait", value, home=home,
                                            token_of="bob")
            self.assertEqual(self.assertOneErrorLine(result, pager.EXIT_USAGE),
                             "pager: --wait must be a finite number, 0 or more, not '%s' (see 'pager-cli fetch "
                             "--help')." % value)
            self.assertEqual(result.out, "")
        self.assertFalse(os.path.exists(home))


class ExitCodeTests(CLITestCase):
    """Each failure has its documented exit code and one line on stderr, never a traceback."""

    async def test_unknown_recipient(self):
        await self.serve()
        alice_home = await self.provision("alice")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "nobody", "hi", home=alice_home,
                                  token_of="alice")
        line = self.assertOneErrorLine(result, pager.EXIT_UNKNOWN_USER)
        self.assertIn("nobody", line)

    async def test_wrong_token(self):
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hi", home=alice_home,
                                  env={"PAGER_TOKEN": "not alice's safetoken"})
        self.assertOneErrorLine(result, pager.EXIT_AUTH)
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_no_token(self):
        """A script command never prompts: without a safetoken it says where to give one."""
        await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hi", home=alice_home)
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertIn("PAGER_TOKEN", line)

    async def test_unreachable_server(self):
        result = await self.run_command("send", "127.0.0.1:%d" % free_port(), "--user", "alice", "--to", "bob", "hi",
                                  home=self.home(), env={"PAGER_TOKEN": "whatever-token"})
        self.assertOneErrorLine(result, pager.EXIT_NETWORK)

    async def usage_errors(self, cases):
        """
        Run each command line of C{cases} (what, args; HOST stands for the server); each must fail with exit 2 and
        one line.
        """
        await self.serve()
        alice_home = await self.provision("alice")
        failures = []
        for what, args in cases:
            result = await self.run_command(*args, home=alice_home, token_of="alice")
            try:
                self.assertOneErrorLine(result, pager.EXIT_USAGE)
            except self.failureException as e:
                failures.append("%s: %s" % (what, e))
        if failures:
            self.fail("\n\n".join(failures))

    async def test_bad_command_line(self):
        """A missing --to, a bad recipient name, an unknown option and --ca without --tls: exit 2, one line."""
        await self.usage_errors([
            ("missing --to", ["send", "HOST", "--user", "alice", "hi"]),
            ("bad --to name", ["send", "HOST", "--user", "alice", "--to", "bob smith!", "hi"]),
            ("unknown option", ["send", "HOST", "--user", "alice", "--to", "bob", "--bogus", "hi"]),
            ("--ca without --tls", ["send", "HOST", "--user", "alice", "--to", "bob", "--ca", "ca.pem", "hi"]),
        ])

    async def test_missing_host(self):
        """send without its HOST: exit 2, one line giving the command's synopsis, not only 'Wrong number'."""
        result = await self.run_command("send")
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertEqual(line, "pager: Wrong number of arguments: the command is 'pager-cli send %s' (see "
                               "'pager-cli send --help')." % pager.SendOptions.synopsis)

    async def test_bad_arguments(self):
        """A bad --user name: exit 2, one line.  (A --file that cannot be read is a local failure: LocalTests.)"""
        await self.usage_errors([
            ("bad --user name", ["send", "HOST", "--user", "../alice", "--to", "bob", "hi"]),
        ])


class KeyTrustTests(CLITestCase):
    """Trust on first use: a key that changes after it was pinned stops sending (5) and is flagged on receipt."""

    async def test_changed_recipient_key(self):
        """
        alice pins bob's key with a first send; when the server starts handing out another key for bob, her next
        send exits 5 naming both fingerprints and 'trust bob', and sends nothing.
        """
        server = await self.serve()
        alice_home = await self.provision("alice")
        await self.account("bob")
        first = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "one", home=alice_home,
                                 token_of="alice")
        self.assertExit(first, 0)

        other = key("mallory-as-bob")
        await server.store.set_key("bob", pager.public_key_pem(other), pager.fingerprint(other), reactor.seconds())
        server.factory.key_changed("bob", other.public_key())
        before = len(await self.pending(server, "bob"))

        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "two", home=alice_home,
                                  token_of="alice")
        line = self.assertOneErrorLine(result, pager.EXIT_KEY_TRUST)
        self.assertEqual(result.out, "")
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("bob"))), line)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(other)), line)
        self.assertIn("accept it with 'pager-cli trust %s --user alice bob'" % self.host, line)
        self.assertEqual(len(await self.pending(server, "bob")), before)

    async def test_incoming_from_changed_key(self):
        """
        bob has alice's key pinned; her messages are 'pinned' until she re-keys.  The next one, signed with her
        new key, is opened but marked 'changed', describe_message says KEY CHANGED, and the pin is not replaced.
        """
        await self.serve()
        await self.account("alice")
        await self.account("bob")
        store = pager.LocalStore(os.path.abspath(self.mktemp()), reactor)
        self.addCleanup(store.close)
        await store.open(reactor.seconds())
        alice_fp = pager.fingerprint(key("alice"))
        await store.set_pin("alice", pager.public_key_pem(key("alice")), alice_fp, reactor.seconds())

        bob = await self.connect(self.address, seen=store, pins=store)
        await bob.login("bob", token("bob"), key("bob"))
        alice = await self.login(self.address, "alice")
        await alice.send("bob", "before")
        await self.wait_for(lambda: bob.events.messages, "the first message")
        self.assertEqual(bob.events.messages[0].key_status, "pinned")
        self.assertNotIn("KEY CHANGED", pager.describe_message(bob.events.messages[0]))

        new_key = key("alice-new")
        await alice.rekey("alice", token("alice"), key("alice"), new_key)
        msg = await alice.send("bob", "after")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "the message signed with the new key")
        message = bob.events.messages[1]
        self.assertEqual((message.message_id.hex(), message.plaintext), (msg, b"after"))
        self.assertEqual(message.sender_fingerprint, pager.fingerprint(new_key))
        self.assertEqual(message.key_status, "changed")
        self.assertRegex(pager.describe_message(message), r"^\[\d\d:\d\d\] alice \u26a0 KEY CHANGED, NOT VERIFIED "
                                                          r"\(see /fingerprint alice, then /trust alice\): after$")
        pin = await store.get_pin("alice")
        self.assertEqual(bytes(pin[1]), alice_fp)

    async def test_fetch_names_command_lines(self):
        """
        fetch marks a message signed by a changed key with the commands that check and accept it as they run on the
        command line (pager-cli fingerprint, then pager-cli trust), not the chat's /fingerprint and /trust.
        """
        await self.serve()
        home = await self.provision("bob")
        await self.account("alice")
        alice = await self.login(self.address, "alice", receive=False)
        await alice.send("bob", "before")
        first = await self.run_command("fetch", "HOST", "--user", "bob", home=home, token_of="bob")
        self.assertExit(first, 0)
        self.assertIn("alice \u2713 (first message: key pinned) before", first.out)
        await alice.rekey("alice", token("alice"), key("alice"), key("alice-new"))
        await alice.send("bob", "after")
        result = await self.run_command("fetch", "HOST", "--user", "bob", home=home, token_of="bob")
        self.assertExit(result, 0)
        self.assertRegex(result.out, r"^\[\d\d:\d\d\] alice \u26a0 KEY CHANGED, NOT VERIFIED \(see 'pager-cli "
                                     r"fingerprint %s --user bob alice', then 'pager-cli trust %s --user bob alice'\): "
                                     r"after\n$" % (re.escape(self.host), re.escape(self.host)))
        self.assertNotIn("/trust", result.out)


class KeyFileTests(CLITestCase):
    """Key files and the local database are private, PKCS#12 that openssl reads, and refused when exposed."""

    async def test_permissions_under_umask_0(self):
        """
        Even with umask 0, a first send --register makes HOME/<server id> and the user directory 0700 and key.p12,
        client.sqlite3 and HOME/known_servers 0600; a fetch saves a file in a 0700 files directory, mode 0600.  A
        key file made readable by others is refused (exit 3) with the chmod that fixes it.
        """
        await self.serve()
        bob_home = await self.provision("bob")
        alice_home = self.home()
        umask0 = [shutil.which("sh") or "/bin/sh", "-c", 'umask 000; exec "$@"', "sh"]
        source = os.path.abspath(self.mktemp())
        with open(source, "wb") as f:
            f.write(b"secret notes\n")
        sent = await self.pager("send", self.host, "--user", "alice", "--to", "bob", "--file", source, "--register",
                                home=alice_home, token_of="alice", passphrase="alice's passphrase", prefix=umask0)
        self.assertExit(sent, 0)
        directory = self.user_dir(alice_home, "alice")
        self.assertMode(alice_home, 0o700)
        self.assertMode(os.path.join(alice_home, self.server_id), 0o700)
        self.assertMode(directory, 0o700)
        self.assertMode(os.path.join(directory, "key.p12"), 0o600)
        self.assertMode(os.path.join(directory, "client.sqlite3"), 0o600)
        self.assertMode(os.path.join(alice_home, pager.KNOWN_SERVERS_NAME), 0o600)
        for name in os.listdir(directory):
            self.assertEqual(os.stat(os.path.join(directory, name)).st_mode & 0o077, 0, name)

        fetched = await self.pager("fetch", self.host, "--user", "bob", home=bob_home, token_of="bob",
                                   prefix=umask0)
        self.assertExit(fetched, 0)
        bob_dir = self.user_dir(bob_home, "bob")
        saved = os.path.join(bob_dir, "files", os.path.basename(source))
        self.assertMode(os.path.dirname(saved), 0o700)
        self.assertMode(saved, 0o600)
        for name in os.listdir(bob_dir):
            self.assertEqual(os.stat(os.path.join(bob_dir, name)).st_mode & 0o077, 0, name)

        os.chmod(os.path.join(directory, "key.p12"), 0o644)
        exposed = await self.pager("send", self.host, "--user", "alice", "--to", "bob", "hi", home=alice_home,
                                   token_of="alice", passphrase="alice's passphrase")
        line = self.assertOneErrorLine(exposed, pager.EXIT_AUTH)
        self.assertIn("chmod 600", line)

    async def test_openssl_reads_key_file(self):
        """
        The key file a first send --register writes (token and passphrase from files) is PKCS#12 with PBES2 and 600,000
        iterations: openssl opens it with the passphrase and not without.
        """
        openssl = shutil.which("openssl")
        if openssl is None:
            raise unittest.SkipTest("openssl is not installed")
        await self.serve()
        await self.account("bob")
        home = self.home()
        token_file, passphrase_file = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        with open(token_file, "w") as f:
            f.write(token("alice") + "\n")
        os.chmod(token_file, 0o600)  # a token file others may read is refused
        with open(passphrase_file, "w") as f:
            f.write("correct horse battery\n")
        os.chmod(passphrase_file, 0o600)  # so is a passphrase file
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hi", "--register",
                                "--token-file", token_file, "--passphrase-file", passphrase_file, home=home)
        self.assertExit(sent, 0)
        path = os.path.join(self.user_dir(home, "alice"), "key.p12")

        async def openssl_run(*args):
            child = self.spawn([openssl, "pkcs12", "-in", path] + list(args), base_env())
            return await self.finish(child, "openssl pkcs12")

        info = await openssl_run("-info", "-noout", "-passin", "pass:correct horse battery")
        self.assertExit(info, 0)
        self.assertIn("PBES2", info.out + info.err)
        self.assertIn("600000", info.out + info.err)
        dump = await openssl_run("-nodes", "-nocerts", "-passin", "pass:correct horse battery")
        self.assertExit(dump, 0)
        self.assertIn("PRIVATE KEY", dump.out)
        loaded = serialization.load_pem_private_key(dump.out.encode("ascii"), None)
        with open(os.path.join(self.user_dir(home, "alice"), "key.p12"), "rb") as f:
            ours = pager.decode_private_key(f.read(), "correct horse battery")
        self.assertEqual(pager.fingerprint(loaded), pager.fingerprint(ours))

        for wrong in ("pass:", "pass:wrong horse"):
            refused = await openssl_run("-nodes", "-nocerts", "-passin", wrong)
            self.assertNotEqual(refused.code, 0, "openssl read the key with %s" % wrong)
            self.assertNotIn("PRIVATE KEY", refused.out)


class ExportImportTests(CLITestCase):
    """Keys move between machines with export-key and import-key, and the original pager's PEM files import too."""

    async def test_export_then_import(self):
        """
        export-key writes alice's key (mode 0600) from home A; import-key installs it in an empty home B, where
        fetch as alice then logs in.
        """
        await self.serve()
        home_a = await self.provision("alice", passphrase="pass-a")
        out = os.path.abspath(self.mktemp())
        exported = await self.run_command("export-key", self.host, "--user", "alice", "--out", out, home=home_a,
                                    passphrase="pass-a")
        self.assertExit(exported, 0)
        self.assertMode(out, 0o600)
        self.assertTrue(pager.key_file_is_encrypted(out))

        home_b = self.home()
        imported = await self.run_command("import-key", self.host, "--user", "alice", out, home=home_b,
                                    passphrase="pass-a", token_of="alice")
        self.assertExit(imported, 0)
        path = os.path.join(self.user_dir(home_b, "alice"), "key.p12")
        self.assertMode(path, 0o600)
        self.assertEqual(pager.fingerprint(pager.load_private_key(path, "pass-a")), pager.fingerprint(key("alice")))

        fetched = await self.run_command("fetch", self.host, "--user", "alice", home=home_b, token_of="alice",
                                   passphrase="pass-a")
        self.assertExit(fetched, 0)

    async def test_import_original_pem(self):
        """
        The original pager's unencrypted {username}_private_key.pem (TraditionalOpenSSL or PKCS#8) imports; the
        imported key logs in.  Importing over an existing key needs --force.
        """
        await self.serve()
        await self.account("alice")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        files = {}
        for kind in ("TraditionalOpenSSL", "PKCS8"):
            path = files[kind] = os.path.join(directory, kind, "alice_private_key.pem")
            os.makedirs(os.path.dirname(path))
            with open(path, "wb") as f:
                f.write(key("alice").private_bytes(serialization.Encoding.PEM,
                                                   getattr(serialization.PrivateFormat, kind),
                                                   serialization.NoEncryption()))

        home_c, home_d = self.home(), self.home()
        traditional = await self.run_command("import-key", self.host, "--user", "alice", files["TraditionalOpenSSL"],
                                       "--no-passphrase", home=home_c, token_of="alice")
        self.assertExit(traditional, 0)
        pkcs8 = await self.run_command("import-key", self.host, "--user", "alice", files["PKCS8"], home=home_d,
                                 passphrase="pass-d", token_of="alice")
        self.assertExit(pkcs8, 0)
        self.assertFalse(pager.key_file_is_encrypted(os.path.join(self.user_dir(home_c, "alice"), "key.p12")))
        self.assertTrue(pager.key_file_is_encrypted(os.path.join(self.user_dir(home_d, "alice"), "key.p12")))

        fetched = await self.run_command("fetch", self.host, "--user", "alice", home=home_c, token_of="alice")
        self.assertExit(fetched, 0)

        again = await self.run_command("import-key", self.host, "--user", "alice", files["PKCS8"], "--no-passphrase",
                                 home=home_d)
        line = self.assertOneErrorLine(again, pager.EXIT_USAGE)
        self.assertIn("--force", line)
        self.assertTrue(pager.key_file_is_encrypted(os.path.join(self.user_dir(home_d, "alice"), "key.p12")))
        forced = await self.run_command("import-key", self.host, "--user", "alice", files["PKCS8"], "--no-passphrase",
                                  "--force", home=home_d, token_of="alice")
        self.assertExit(forced, 0)
        self.assertFalse(pager.key_file_is_encrypted(os.path.join(self.user_dir(home_d, "alice"), "key.p12")))

    async def _no_key_here(self, passphrase):
        await self.serve()
        await self.account("alice")
        await self.account("bob")
        home = self.home()
        result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hi", home=home,
                                  token_of="alice", passphrase=passphrase)
        self.assertExit(result, pager.EXIT_AUTH)
        self.assertNotIn("Traceback", result.err)
        self.assertTrue(result.err.splitlines()[-1].startswith("pager: "), result)
        self.assertIn("import-key", result.err.splitlines()[-1])
        self.assertFalse(os.path.exists(os.path.join(self.user_dir(home, "alice"), "key.p12")))
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_registered_elsewhere(self):
        """A user registered on the server whose key is not on this machine: send exits 3 naming import-key."""
        await self._no_key_here(passphrase="a passphrase")

    async def test_registered_elsewhere_without_passphrase(self):
        """The same with only PAGER_TOKEN set (no passphrase is needed to be told to bring the key)."""
        await self._no_key_here(passphrase=None)


class HelpTests(CLITestCase):
    """--help exits 0 and describes every option."""

    async def test_help(self):
        common = ["--user", "--home", "--token-file", "--passphrase-file", "--no-passphrase", "--tls", "--ca"]
        cases = {
            (): ["connect", "send", "fetch", "users", "export-key", "import-key", "trust-server", "forget-server"],
            ("send",): common + ["--to", "--file", "--wait-delivered", "--timeout", "--register"],
            ("fetch",): common + ["--json", "--wait", "--register"],
            ("connect",): common + ["--no-history", "--register"],
            ("trust-server",): ["--home", "--tls", "--ca", "--id"],
            ("forget-server",): ["--home", "--tls"],
        }
        for command, words in cases.items():
            result = await self.run_command(*(command + ("--help",)), home=self.home())
            self.assertExit(result, 0)
            self.assertNotIn("Traceback", result.err)
            for word in words:
                self.assertIn(word, result.out, "%r missing from pager.py %s --help" % (word, " ".join(command)))


    async def test_help_fits_80_columns(self):
        """Every command's --help fits a terminal of 80 columns: its usage line, and group's list of actions."""
        for name, _, _, _ in pager.Options._SUBCOMMANDS:
            result = await self.run_command(name, "--help", home=self.home(), env={"COLUMNS": "80"})
            self.assertExit(result, 0)
            self.assertIn("Usage: pager-cli %s" % name, result.out)
            for line in result.out.splitlines():
                self.assertLessEqual(len(line), 80, "pager-cli %s --help: %r" % (name, line))
        # twistd writes its own words before the server's synopsis.
        self.assertLessEqual(len("Usage: twistd [options] pager [options] server " + pager.ServerOptions.synopsis), 80)

    def test_help_words_whole(self):
        """
        No word of any command's option help is broken across lines: not a long one (an endpoint string), not one
        with a hyphen (a command name like link-device).
        """
        commands = [cls for name, cls in vars(pager).items()
                    if isinstance(cls, type) and issubclass(cls, usage.Options) and not name.startswith("_")]
        self.assertIn(pager.ServerOptions, commands)
        for cls in commands:
            options = cls()
            for width in (80, 120):
                text = options.getUsage(width=width)
                for name, doc in options.docs.items():
                    for word in (doc or "").split():
                        self.assertIn(word, text, "%s --%s at width %d" % (cls.__name__, name, width))


class _FakeServer(protocol.Protocol):
    """A server that greets like pager, answers login, then does what the test says: close, or fall silent."""

    def __init__(self, pending, close_after_login, logins):
        self.pending, self.close_after_login, self.logins = pending, close_after_login, logins
        self.buffer = b""

    def connectionMade(self):
        self.transport.write(pager.encode_frame({
            "type": "hello", "protocol": pager.PROTOCOL_VERSION, "server": "fake", "server_id": "ab" * 16,
            "challenge": pager.b64(b"c" * 32), "limits": pager.Limits().public()}) + b"\n")

    def dataReceived(self, data):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            frame = json.loads(line)
            if frame["type"] == "login":
                self.transport.write(pager.encode_frame({
                    "type": "ok", "id": frame["id"], "user": frame["user"], "pending": self.pending,
                    "challenge": pager.b64(b"d" * 32)}) + b"\n")
                self.logins.append(frame["user"])
                if self.close_after_login:
                    self.transport.loseConnection()


class FaultyServerTests(CLITestCase):
    """Commands against servers that misbehave end with a clear sentence and the right exit code, never hang."""

    def fake_server(self, pending=0, close_after_login=False):
        self.logins = []
        factory = protocol.Factory.forProtocol(lambda: _FakeServer(pending, close_after_login, self.logins))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return "127.0.0.1:%d" % port.getHost().port

    def home_with_key(self, name):
        home = self.home()
        directory = pager.user_directory(home, "ab" * 16, name)
        pager.save_private_key(os.path.join(directory, pager.KEY_FILE_NAME), key(name), "")
        return home

    async def test_fetch_connection_lost_before_promised_messages(self):
        """A server that promises 3 waiting messages and closes: fetch exits 6 at once, saying the rest stay."""
        host = self.fake_server(pending=3, close_after_login=True)
        result = await self.run_command("fetch", host, "--user", "bob", home=self.home_with_key("bob"),
                                  env={"PAGER_TOKEN": "bobs-token"}, timeout=10)
        line = self.assertOneErrorLine(result, pager.EXIT_NETWORK)
        self.assertIn("lost", line)

    async def test_interrupted_send_is_not_success(self):
        """A send stopped by SIGINT before the server answered exits 130, never 0."""
        host = self.fake_server()  # answers login, then nothing: the key request never gets an answer
        child = self.spawn([sys.executable, PAGER_PY, "send", host, "--user", "alice", "--to", "bob", "hi"],
                           base_env(PAGER_HOME=self.home_with_key("alice"), PAGER_TOKEN="alices-token"))
        for _ in range(1500):  # until the fake server has answered its login (at most 15 s)
            if self.logins or child.finished:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.logins, ["alice"], child.result())
        child.transport.signalProcess("INT")
        result = await self.finish(child, "interrupted send", 10)
        line = self.assertOneErrorLine(result, pager.EXIT_INTERRUPTED)
        self.assertIn("interrupted", line)
        self.assertEqual(result.out, "")

    async def test_bad_out_paths(self):
        """export-key and make-cert given an --out they cannot write say so in one sentence (exit 7: local)."""
        await self.serve()
        home = await self.provision("alice")
        result = await self.run_command("export-key", self.host, "--user", "alice", "--out", "/nonexistent/dir/k.p12",
                                  home=home, passphrase="export-pass")
        self.assertIn("Cannot write", self.assertOneErrorLine(result, pager.EXIT_LOCAL))
        taken = os.path.abspath(self.mktemp())
        with open(taken, "w") as f:
            f.write("a file, not a directory")
        result = await self.run_command("make-cert", "localhost", "--out", taken)
        self.assertIn("Cannot write", self.assertOneErrorLine(result, pager.EXIT_LOCAL))

    async def test_token_file_not_text(self):
        """A safetoken file that is not UTF-8 is a file this machine cannot use (exit 7), in one sentence."""
        await self.serve()
        home = await self.provision("alice")
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\n")
        os.chmod(path, 0o600)  # a token file others may read is refused before it is read
        result = await self.run_command("users", self.host, "--user", "alice", "--token-file", path, home=home)
        self.assertIn("not UTF-8", self.assertOneErrorLine(result, pager.EXIT_LOCAL))

    async def test_import_garbage(self):
        """import-key of a file that is no key says exactly that (exit 3), not 'wrong passphrase'."""
        await self.serve()
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"this is not a key at all\n")
        result = await self.run_command("import-key", self.host, "--user", "alice", path, home=self.home(),
                                  passphrase="local-pass")
        self.assertIn("not a key file", self.assertOneErrorLine(result, pager.EXIT_AUTH))

    async def test_refused_registration_leaves_no_key(self):
        """A first send that the server refuses to register leaves no key behind, final or pending."""
        options = pager.ServerOptions()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--db", self.mktemp(),
                              "--registration", "closed"])
        self.server = pager.makeService(options, reactor)
        self.server.startService()
        self.addCleanup(self.stop_server, self.server)
        port = await self.server.ready
        self.host = "127.0.0.1:%d" % port.getHost().port
        home = self.home()
        result = await self.run_command("send", self.host, "--user", "newbie", "--to", "newbie", "hi", "--register",
                                  home=home, env={"PAGER_TOKEN": "newbie-token"}, passphrase="pass")
        self.assertExit(result, pager.EXIT_FAILURE)
        self.assertNotIn("Traceback", result.err)
        self.assertIn("pager: This server does not take new users", result.err.splitlines()[-1])
        directory = self.user_dir(home, "newbie")  # not even made now: the closed server is known before any key
        names = os.listdir(directory) if os.path.exists(directory) else []
        self.assertEqual(sorted(n for n in names if n.startswith("key")), [])
