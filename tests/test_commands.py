"""
The command line in-process: the command coroutines run against a real server on a loopback port in this process,
with standard output and error captured, so each test proves what a child process would without starting one.  The
few things only a process shows (twistd's exit status, a pipe closed by its reader, a Python without pager's
dependencies) are subprocess smoke tests at the end.
"""

import io
import os
import sys

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python import usage
from twisted.trial import unittest

import pager
from tests.test_cli import PAGER_PY, CLITestCase, Result, base_env
from tests.test_cli import Output as _Output
from tests.test_e2e import free_port, key, token


class InProcessTestCase(CLITestCase):
    """Runs C{pager-cli COMMAND ...} in this process with L{CLITestCase.run_command}."""


class SendInputTests(InProcessTestCase):
    """What send takes as the message: text, a file, or nothing at all."""

    async def test_binary_stdin_sent_as_file(self):
        """
        Standard input that is not UTF-8 is sent, byte for byte, as the file stdin.bin (one note on stderr), never
        as a text message whose bytes a reader would see mangled.
        """
        await self.serve()
        home = await self.provision("alice")
        await self.account("bob")
        data = b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary"
        result = await self.run_command("send", "HOST", "--user", "alice", "--to", "bob", home=home,
                                        token_of="alice", stdin=data)
        self.assertExit(result, 0)
        self.assertIn("not UTF-8 text: sending it as the file stdin.bin", result.err)
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        [message] = bob.events.messages
        self.assertEqual((message.content_type, message.filename, message.plaintext), ("file", "stdin.bin", data))

    async def test_empty_message_refused_alike(self):
        """
        An empty or blank message is refused with the same sentence and exit code whether it comes from the command
        line or from standard input; nothing is sent.
        """
        await self.serve()
        home = await self.provision("alice")
        await self.account("bob")
        results = []
        for args, stdin in (([" "], None), (["", "  "], None), ([], b""), ([], b" \n\t\n")):
            result = await self.run_command("send", "HOST", "--user", "alice", "--to", "bob", *args, home=home,
                                            token_of="alice", stdin=stdin)
            results.append(self.assertOneErrorLine(result, pager.EXIT_USAGE))
            self.assertEqual(result.out, "")
        self.assertEqual(set(line.partition(" (see")[0].rstrip(".") for line in results[:2]),
                         {"pager: " + pager.NOTHING_TO_SEND.rstrip(".")})
        host = self.host  # what HOST stands for
        self.assertEqual(set(line.partition(" (see")[0] for line in results[2:]),
                         {"pager: Nothing to send: no message follows HOST (here %s) and standard input is empty."
                          % host})
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_forgotten_host(self):
        """
        A forgotten HOST makes the message's first word the address: with nothing on standard input, the error
        names what was taken as HOST (exit 2), rather than only saying the message is empty.
        """
        await self.serve()
        result = await self.run_command("send", "--user", "alice", "--to", "bob", "disk", home=self.home(),
                                        stdin=b"")
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertIn("no message follows HOST (here disk) and standard input is empty", line)
        result = await self.run_command("send", "--user", "alice", "--to", "bob", "disk full", home=self.home())
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertIn("The server address 'disk full' has a space in its host name: is HOST missing", line)

    async def test_file_dash(self):
        """--file - is not taken for a file named '-' (Cannot read -): it says how standard input is sent (exit 2)."""
        await self.serve()
        home = await self.provision("alice")
        await self.account("bob")
        result = await self.run_command("send", "HOST", "--user", "alice", "--to", "bob", "--file", "-", home=home,
                                        token_of="alice", stdin=b"hello")
        self.assertIn("--file - is not standard input", self.assertOneErrorLine(result, pager.EXIT_USAGE))
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_message_argument_not_utf8(self):
        """A MESSAGE argument that is not UTF-8 (bytes the file system encoding kept as surrogates) is bad usage."""
        await self.serve()
        home = await self.provision("alice")
        result = await self.run_command("send", "HOST", "--user", "alice", "--to", "bob", "caf\udce9", home=home,
                                        token_of="alice")
        self.assertIn("--file", self.assertOneErrorLine(result, pager.EXIT_USAGE))

    async def test_wait_delivered_fires_on_receipt(self):
        """send --wait-delivered ends as soon as the last recipient's receipt arrives, not at a polling tick."""
        await self.serve()
        home = await self.provision("alice")
        await self.account("bob")
        await self.account("carol")
        bob = await self.login(self.address, "bob")
        carol = await self.login(self.address, "carol")
        result = await self.run_command("send", "HOST", "--user", "alice", "--to", "bob,carol", "--wait-delivered",
                                        "hello both", home=home, token_of="alice")
        self.assertExit(result, 0)
        self.assertEqual([m.plaintext for m in bob.events.messages + carol.events.messages], [b"hello both"] * 2)


class FetchOutputTests(InProcessTestCase):
    """fetch when its output goes away, or its files cannot be saved."""

    async def pages(self, count):
        """alice's home; bob has C{count} text messages waiting from alice."""
        await self.serve()
        home = await self.provision("bob")
        await self.account("alice")
        alice = await self.login(self.address, "alice", receive=False)
        for n in range(count):
            await alice.send(["bob"], b"page %d" % n)
        await alice.close()
        return home

    async def test_output_closed(self):
        """
        fetch whose reader stops after one line ('fetch | head -1') ends with one sentence (exit 7), and the
        messages it did not print stay on the server.
        """
        home = await self.pages(5)
        out = _Output(lines=1)
        self.addCleanup(out.close_fd)
        result = await self.run_command("fetch", "HOST", "--user", "bob", home=home, token_of="bob", stdout=out)
        line = self.assertOneErrorLine(result, pager.EXIT_LOCAL)
        self.assertIn("stay on the server", line)
        self.assertEqual(result.out.count("\n"), 1)
        self.assertEqual(len(await self.pending(self.server, "bob")), 4)  # the messages after it too

    async def test_files_directory_unwritable(self):
        """A file that cannot be saved (files/ is not a directory) is a local failure; the file stays queued."""
        await self.serve()
        home = await self.provision("bob")
        await self.account("alice")
        alice = await self.login(self.address, "alice", receive=False)
        await alice.send(["bob"], b"report", content_type="file", filename="report.txt")
        await alice.close()
        with open(os.path.join(self.user_dir(home, "bob"), "files"), "w") as f:
            f.write("in the way")
        result = await self.run_command("fetch", "HOST", "--user", "bob", home=home, token_of="bob")
        self.assertIn("Cannot save the file report.txt", self.assertOneErrorLine(result, pager.EXIT_LOCAL))
        self.assertEqual(len(await self.pending(self.server, "bob")), 1)


class LocalFailureTests(InProcessTestCase):
    """A file on this machine that cannot be used exits 7 with one sentence, not a key-file or usage code."""

    async def test_local_files(self):
        await self.serve()
        home = await self.provision("alice")
        garbage = os.path.abspath(self.mktemp())
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        missing = os.path.abspath(self.mktemp())
        latin1 = os.path.abspath(self.mktemp())
        with open(latin1, "wb") as f:
            f.write("safetoken caf\u00e9\n".encode("latin-1"))
        os.chmod(latin1, 0o600)
        cases = [
            ("token file not UTF-8", ["users", "HOST", "--user", "alice", "--token-file", latin1], "not UTF-8"),
            ("missing --file", ["send", "HOST", "--user", "alice", "--to", "alice", "--file", missing], "Cannot read"),
            ("missing CA file", ["users", "HOST", "--user", "alice", "--tls", "--ca", missing], "CA file"),
            ("CA file not PEM", ["users", "HOST", "--user", "alice", "--tls", "--ca", garbage], "CA file"),
            ("missing token file", ["users", "HOST", "--user", "alice", "--token-file", missing], "Cannot read"),
        ]
        for what, argv, words in cases:
            given = "--token-file" in argv  # PAGER_TOKEN would come first
            result = await self.run_command(*argv, home=home, token_of=None if given else "alice")
            self.assertIn(words, self.assertOneErrorLine(result, pager.EXIT_LOCAL), what)

    async def test_import_key_without_user(self):
        """import-key with no --user and no terminal is the usage error, not a traceback from closing no store."""
        await self.serve()
        path = os.path.abspath(self.mktemp())
        pager.save_private_key(path, key("alice"), "")
        result = await self.run_command("import-key", "HOST", path, home=self.home())
        self.assertIn("user", self.assertOneErrorLine(result, pager.EXIT_USAGE).lower())

    async def test_damaged_local_database(self):
        """A client.sqlite3 that is not a database: one sentence naming it, exit 7, in scripts and in connect."""
        await self.serve()
        home = await self.provision("alice")
        database = os.path.join(self.user_dir(home, "alice"), pager.LOCAL_DB_NAME)
        with open(database, "wb") as f:
            f.write(b"this is not an SQLite database, not at all" * 100)
        os.chmod(database, 0o600)
        for argv in (["fetch", "HOST", "--user", "alice"], ["users", "HOST", "--user", "alice"]):
            result = await self.run_command(*argv, home=home, token_of="alice")
            line = self.assertOneErrorLine(result, pager.EXIT_LOCAL)
            self.assertIn(database, line, argv)
        session = pager.Session(reactor, {"server": self.host, "home": home, "user": "alice", "token-file": None,
                                          "passphrase-file": None, "no-passphrase": False, "tls": False, "ca": None,
                                          "no-history": False, "register": False},
                                pager.Prompter(reactor, interactive=False))
        self.addCleanup(session.close)
        os.environ["PAGER_TOKEN"] = token("alice")
        with self.assertRaises(pager.LocalError) as caught:
            await session.start()
        self.assertIn(database, caught.exception.message)

    async def test_home_is_a_file(self):
        """A PAGER_HOME that is a file is a local failure naming it (exit 7), not a key-file error (3)."""
        await self.serve()
        home = os.path.abspath(self.mktemp())
        with open(home, "w") as f:
            f.write("not a directory\n")
        result = await self.run_command("fetch", "HOST", "--user", "alice", home=home, token_of="alice")
        self.assertIn(home, self.assertOneErrorLine(result, pager.EXIT_LOCAL))

    async def test_internal_error_one_sentence(self):
        """
        An error no code path expects is one sentence, 'internal error: ...', exit 1, with no traceback unless
        PAGER_DEBUG is set (then the traceback follows on stderr).
        """
        def broken(reactor, config):
            raise RuntimeError("something nobody expected")
        await self.serve()
        self.patch(pager, "_CLIENT_COMMANDS", dict(pager._CLIENT_COMMANDS, users=broken))
        result = await self.run_command("users", "HOST", "--user", "alice", home=self.home())
        line = self.assertOneErrorLine(result, pager.EXIT_FAILURE)
        self.assertIn("internal error: RuntimeError: something nobody expected", line)
        self.patch(pager, "_debugging", lambda: True)  # as PAGER_DEBUG=1 would
        result = await self.run_command("users", "HOST", "--user", "alice", home=self.home())
        self.assertExit(result, pager.EXIT_FAILURE)
        self.assertIn("Traceback", result.err)
        self.assertIn("internal error: RuntimeError", result.err)

    def test_exit_codes(self):
        """Each error type has its documented exit code; report() writes its one sentence."""
        cases = [(pager.LocalError("x."), 7), (pager.OutputClosed(), 7), (usage.UsageError("x."), 2),
                 (pager.NetworkError("x."), 6), (pager.KeyFileError("x."), 3), (pager.UnknownUser("x."), 4),
                 (pager.Interrupted(), 130), (pager.PagerError("x."), 1)]
        for error, code in cases:
            self.assertEqual(pager.exit_code(error), code, error)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(pager.report(pager.LocalError("Cannot write /x: No such file."), "see --help"), 7)
        self.assertEqual(err.getvalue(), "pager: Cannot write /x: No such file (see --help).\n")


class WaitingTests(unittest.SynchronousTestCase):
    """The events commands wait on, instead of polling a flag."""

    def client(self):
        protocol = pager.PagerClientProtocol()
        client = pager.PagerClient(protocol, task.Clock())
        release = defer.Deferred()

        async def handle(item):
            await release
        client._handle_message = handle
        return client, release

    def test_when_processed(self):
        """when_processed(n) fires once n pushed messages are dealt with; when_handled once none is in hand."""
        client, release = self.client()
        self.successResultOf(client.when_handled())
        processed, handled = client.when_processed(1), None
        client._enqueue(client._handle_message, "message")
        handled = client.when_handled()
        self.assertNoResult(processed)
        self.assertNoResult(handled)
        release.callback(None)
        self.successResultOf(processed)
        self.successResultOf(handled)
        self.assertEqual(client._waiters, [])

    def test_when_processed_connection_lost(self):
        """A wait for messages that will not come ends when the connection does."""
        client, _ = self.client()
        waiting = client.when_processed(1)
        self.assertNoResult(waiting)
        client.protocol.lost = pager.ConnectionLost()
        client.connection_lost(client.protocol.lost)
        self.successResultOf(waiting)

    def test_within(self):
        """within() says whether the event came in time, and a wait that timed out is cancelled and forgotten."""
        clock = task.Clock()
        client, release = self.client()
        late = defer.Deferred.fromCoroutine(pager.within(clock, client.when_processed(1), 10))
        clock.advance(9.9)
        self.assertNoResult(late)
        clock.advance(0.1)
        self.assertIs(self.successResultOf(late), False)
        self.assertEqual(client._waiters, [])
        on_time = defer.Deferred.fromCoroutine(pager.within(clock, client.when_processed(1), 10))
        client._enqueue(client._handle_message, "message")
        release.callback(None)
        self.assertIs(self.successResultOf(on_time), True)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_client_warnings_logged(self):
        """A client command's warnings reach stderr as one 'pager: ' line each; information stays quiet."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        log = Logger(observer=pager.client_log_observer())
        log.info("logged in as {user}", user="alice")
        log.warn("Ignoring a malformed {kind} frame from the server:\n{why}", kind="receipt", why="no id")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("Handling an incoming frame failed")
        self.assertEqual(err.getvalue().splitlines(), [
            "pager: Ignoring a malformed receipt frame from the server: no id",
            "pager: Handling an incoming frame failed: division by zero"])


class OptionsTests(unittest.SynchronousTestCase):
    """What each command accepts and lists."""

    def parse(self, *argv):
        options = pager.Options()
        options.parseOptions(list(argv))
        return options

    def test_twistd_offers_only_server(self):
        """Under twistd (which sets parent) the only command is server, and --help lists no other."""
        options = pager.Options()
        options.parent = usage.Options()
        options.parent.subCommand = "pager"
        self.assertEqual([c[0] for c in options.subCommands], ["server"])
        self.assertNotIn("connect", options.getUsage())
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as raised:  # one sentence and exit 2, not twistd's help page and exit 1
            options.parseOptions(["connect"])
        self.assertEqual(raised.exception.code, pager.EXIT_USAGE)
        self.assertEqual(err.getvalue(), "pager: Unknown command: connect (see 'twistd pager --help').\n")
        options.parseOptions(["server", "--listen", "tcp:0", "--db", self.mktemp()])
        self.assertTrue(pager.makeService(options, MemoryReactorClock()).exit_on_failure)
        alone = self.parse("server", "--listen", "tcp:0", "--db", self.mktemp())
        self.assertFalse(pager.makeService(alone, MemoryReactorClock()).exit_on_failure)
        self.assertIn("connect", [c[0] for c in pager.Options().subCommands])

    def test_server_gc_thresholds(self):
        """The server collects cyclic garbage less often than Python's default (its objects are short-lived)."""
        import gc
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        gc.set_threshold(700, 10, 10)
        pager.makeService(self.parse("server", "--listen", "tcp:0", "--db", self.mktemp()), MemoryReactorClock())
        self.assertEqual(gc.get_threshold(), pager.SERVER_GC_THRESHOLDS)
        self.assertGreater(pager.SERVER_GC_THRESHOLDS[0], 700)

    def test_db_in_missing_directory(self):
        """server --db in a directory that does not exist is one sentence naming the directory."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "pager.sqlite3")
        error = self.assertRaises(usage.UsageError, self.parse, "server", "--db", missing)
        self.assertIn("there is no directory %s" % os.path.dirname(missing), str(error))

    def test_version_everywhere(self):
        """--version prints pager's version at the top and after any command, not Twisted's."""
        for argv in (["--version"], ["server", "--version"], ["send", "--version"], ["admin", "--version"],
                     ["admin", "users", "--version"], ["make-cert", "--version"]):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            error = self.assertRaises(SystemExit, self.parse, *argv)
            self.assertEqual((error.code, out.getvalue()), (0, "pager %s\n" % pager.__version__), argv)

    def test_options_after_positionals(self):
        """Options may follow the positional arguments everywhere, admin's --db after its command too."""
        self.assertEqual(self.parse("admin", "users", "--db", "x.db").subOptions["db"], "x.db")
        self.assertEqual(self.parse("admin", "backup", "out.db", "-d", "y.db").subOptions["db"], "y.db")
        self.assertEqual(self.parse("admin", "--db", "z.db", "stats").subOptions["db"], "z.db")
        invite = self.parse("admin", "invite", "--db", "x.db", "-n", "3").subOptions
        self.assertEqual((invite["db"], invite.subOptions["count"]), ("x.db", 3))
        send = self.parse("send", "localhost", "hello", "--user", "alice", "--to", "bob").subOptions
        self.assertEqual((send["user"], send["to"], send["message"]), ("alice", ["bob"], "hello"))
        fetch = self.parse("fetch", "localhost", "--json", "-u", "bob").subOptions
        self.assertEqual((fetch["user"], fetch["json"]), ("bob", True))

    def command_options(self, name):
        [options] = [parser() for command, _, parser, _ in pager.Options().subCommands if command == name]
        return options

    def test_only_own_options(self):
        """
        Every client command lists and accepts exactly the shared options that apply to it, and the help of a
        secret's file and of --no-passphrase says what they do for that command.
        """
        shared = ["--token-file", "--passphrase-file", "--no-passphrase", "--skew-window", "--no-history"]
        cases = {  # command: the shared options it has (the others it neither lists nor accepts)
            "connect": shared,
            "fetch": shared,
            "send": ["--token-file", "--passphrase-file", "--no-passphrase", "--no-history"],
            "users": ["--token-file", "--passphrase-file", "--no-passphrase"],
            "export-key": ["--passphrase-file", "--no-passphrase"],  # never logs in
            "import-key": ["--token-file", "--passphrase-file", "--no-passphrase"],  # logs in to check the key
            "passwd": ["--passphrase-file", "--no-passphrase"],  # uses the kept safetoken, never a given one
            "token": ["--token-file", "--passphrase-file"],  # makes no key: --no-passphrase has nothing to store
            "verify": ["--token-file", "--passphrase-file"],
            "trust": ["--token-file", "--passphrase-file"],
            "fingerprint": ["--token-file", "--passphrase-file"],
            "trust-server": [],
            "forget-server": [],
            "link-device": ["--token-file", "--passphrase-file", "--no-passphrase"],  # makes the new device's key
            "revoke-device": ["--token-file", "--passphrase-file"],
            "devices": ["--token-file", "--passphrase-file"],
            "group": ["--token-file", "--passphrase-file"],
            "groups": ["--token-file", "--passphrase-file"],
        }
        self.assertEqual(set(cases), set(pager._CLIENT_COMMANDS))
        for command, present in cases.items():
            text = str(self.command_options(command)).replace("=", " ")
            for option in shared:
                if option in present:
                    self.assertIn(option + " ", text, (command, option))
                    continue
                self.assertNotIn(option + " ", text, (command, option))
                argv = [command, "localhost", "--user", "alice", option] + (
                    [] if option in ("--no-history", "--no-passphrase") else ["1"])
                self.assertRaises(usage.UsageError, self.parse, *argv)
        asking = "connect asks for it, and so does every other command on a terminal (standard input and error)"

        def unwrapped(command):  # --help's lines joined
            return " ".join(str(self.command_options(command)).split())
        self.assertIn(asking, unwrapped("send"))
        self.assertIn("connect asks for it, and so does every other command that logs in with it on a terminal "
                      "(standard input and error)", unwrapped("fetch"))
        self.assertNotIn("never ask", str(self.command_options("send")))
        for command, words in (("passwd", "Remove the key's passphrase"), ("export-key", "Write the file without"),
                               ("import-key", "Store the imported key without"), ("send", "Store a new key")):
            self.assertIn(words, " ".join(str(self.command_options(command)).split()), command)


class ReadmeTests(unittest.SynchronousTestCase):
    """What pager's sentences say the README holds, it holds; what the README says of connect is what it does."""

    def read(self, name):
        with open(os.path.join(os.path.dirname(PAGER_PY), name), encoding="utf-8") as f:
            return f.read()

    def test_references(self):
        import re
        source, readme = self.read("pager.py"), self.read("README.md")
        headings = set(re.findall(r"^#+ (.+)$", readme, re.M))
        for section in re.findall(r"README, ([A-Z][\w ]*\w)", source):
            self.assertIn(section, headings, "pager.py points to a README section that does not exist")
        flat = " ".join(readme.split())
        # A piped connect reads no secret from the pipe: the README's pipe example says where it comes from.
        pipe = flat[flat.index("When standard input is not a terminal, `connect` reads"):][:600]
        self.assertIn("PAGER_PASSPHRASE", pipe)
        # Inside a conversation a bare quit is a message: the README never says it leaves the chat there.
        self.assertNotIn("or `quit`.", flat)
        self.assertNotIn("(`quit`, Ctrl-C", flat)


class MakeCertTests(unittest.SynchronousTestCase):

    def test_refuses_to_overwrite(self):
        """make-cert refuses to replace cert.pem or key.pem without --force, and replaces both with it."""
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        with open(os.path.join(out, "key.pem"), "w") as f:
            f.write("the operator's real key")
        self.patch(sys, "stdout", io.StringIO())
        options = pager.Options()
        options.parseOptions(["make-cert", "localhost", "--out", out])
        error = self.assertRaises(usage.UsageError, pager._make_cert_command, options.subOptions)
        self.assertIn("--force", str(error))
        self.assertEqual(os.listdir(out), ["key.pem"])
        with open(os.path.join(out, "key.pem")) as f:
            self.assertEqual(f.read(), "the operator's real key")
        options = pager.Options()
        options.parseOptions(["make-cert", "localhost", "--out", out, "--force"])
        pager._make_cert_command(options.subOptions)
        self.assertEqual(sorted(os.listdir(out)), ["cert.pem", "key.pem"])
        with open(os.path.join(out, "key.pem")) as f:
            self.assertIn("PRIVATE KEY", f.read())
        self.assertEqual(os.stat(os.path.join(out, "key.pem")).st_mode & 0o777, 0o600)

    def test_run_files_ignored(self):
        """twistd's run files (pid file, log) are in .gitignore."""
        with open(os.path.join(os.path.dirname(PAGER_PY), ".gitignore")) as f:
            lines = f.read().splitlines()
        for pattern in ("twistd.pid", "twistd.log*"):
            self.assertIn(pattern, lines)


class ProcessSmokeTests(CLITestCase):
    """What only a process shows: exit statuses and what reaches a real stderr."""

    def twistd(self):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if os.path.exists(twistd):
            return [sys.executable, twistd]
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

    async def test_twistd(self):
        """
        'twistd pager --help' lists only server, and 'twistd -n pager server' exits non-zero, saying why, when it
        cannot listen.
        """
        env = base_env(PYTHONPATH=os.path.dirname(PAGER_PY))
        helped = await self.finish(self.spawn(self.twistd() + ["pager", "--help"], env), "twistd pager --help")
        self.assertExit(helped, 0)
        commands = helped.out.partition("Commands:")[2].split()
        self.assertEqual(commands[0], "server")
        self.assertNotIn("connect", helped.out)
        self.assertIn("'twistd pager server --help' lists its options", helped.out)
        self.assertNotIn("safetoken", helped.out)  # pager-cli's exit codes are not the server's
        missing = os.path.join(os.path.abspath(self.mktemp()), "pager.sqlite3")
        refused = await self.finish(self.spawn(self.twistd() + ["-n", "pager", "server", "--db", missing], env),
                                    "twistd pager server with a --db in no directory")
        self.assertExit(refused, 2)  # one sentence, not twistd's help page and exit 1
        self.assertEqual(refused.out, "")
        self.assertEqual(refused.err.splitlines(), [
            "pager: --db %s: there is no directory %s (create it first) (see 'twistd pager server --help')."
            % (missing, os.path.dirname(missing))])
        port = reactor.listenTCP(free_port(), protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        argv = self.twistd() + ["-n", "--pidfile", os.path.join(directory, "twistd.pid"), "pager", "server",
                                "--listen", "tcp:%d:interface=127.0.0.1" % port.getHost().port,
                                "--db", os.path.join(directory, "pager.sqlite3")]
        result = await self.finish(self.spawn(argv, env), "twistd that cannot listen")
        self.assertExit(result, 1)
        self.assertIn("pager could not start: Couldn't listen", result.out + result.err)
        self.assertNotIn("Traceback", result.out + result.err)
        self.assertFalse(os.path.exists(os.path.join(directory, "twistd.pid")))

    async def test_without_dependencies(self):
        """'python pager.py' from a checkout, with a Python that lacks Twisted: one sentence on what to install."""
        env = base_env()
        env.pop("PYTHONPATH", None)  # trial's parallel workers put the environment's packages there
        result = await self.finish(self.spawn([sys.executable, "-S", PAGER_PY, "--help"], env),
                                   "pager.py without dependencies")
        line = self.assertOneErrorLine(result, pager.EXIT_FAILURE)
        self.assertIn("dependencies are not installed", line)
        self.assertIn("pip install", line)

    async def test_fetch_into_head(self):
        """'fetch | head -1': no traceback and at most one sentence on stderr, whatever head's timing."""
        await self.serve()
        home = await self.provision("bob")
        await self.account("alice")
        alice = await self.login(self.address, "alice", receive=False)
        for n in range(3):
            await alice.send(["bob"], b"page %d " % n + b"x" * 200000)
        await alice.close()
        command = "%s %s fetch %s --user bob | head -c 10 >/dev/null; exit ${PIPESTATUS[0]}" % (
            sys.executable, PAGER_PY, self.host)
        env = base_env(PAGER_HOME=home, PAGER_TOKEN=token("bob"))
        result = await self.finish(self.spawn(["/bin/bash", "-c", command], env), "fetch | head")
        self.assertNotIn("Traceback", result.err)
        self.assertNotIn("Exception ignored", result.err)
        # Three large messages: pager is still printing when head leaves (how many got into the pipe before
        # depends on timing; FetchOutputTests.test_output_closed counts them in-process).
        self.assertIn("stay on the server", self.assertOneErrorLine(result, pager.EXIT_LOCAL))
        self.assertGreaterEqual(len(await self.pending(self.server, "bob")), 1)

    async def test_fetch_into_closed_or_full_output(self):
        """
        fetch with its standard output closed ('>&-') or full ('>/dev/full'): exit 7 and one sentence, every message
        left on the server.
        """
        await self.serve()
        home = await self.provision("bob")
        await self.account("alice")
        alice = await self.login(self.address, "alice", receive=False)
        for n in range(2):
            await alice.send(["bob"], b"page %d" % n)
        await alice.close()
        env = base_env(PAGER_HOME=home, PAGER_TOKEN=token("bob"))
        for redirect, why in ((">&-", "it is closed"), (">/dev/full", "No space left on device")):
            command = "exec %s %s fetch %s --user bob %s" % (sys.executable, PAGER_PY, self.host, redirect)
            result = await self.finish(self.spawn(["/bin/bash", "-c", command], env), "fetch " + redirect)
            self.assertEqual(self.assertOneErrorLine(result, pager.EXIT_LOCAL),
                             "pager: Cannot write to standard output (%s); the messages not printed stay on the "
                             "server." % why)
            self.assertEqual(len(await self.pending(self.server, "bob")), 2)
