"""
Which server a client is talking to: the server id each address presented is remembered (HOME/known_servers), a
known address presenting another id is refused by every client command, script commands make a key and register
only with --register, and trust-server / forget-server accept a deliberate move.  Also the chat's reconnection,
driven by a L{task.Clock}: rate_limited is retried, and a failed attempt's connection is closed.
"""

import os

from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

import pager
from tests.test_cli import CLITestCase, free_port, key, token


class MovedServerTestCase(CLITestCase):
    """
    A first server on a fixed loopback port where alice and bob have accounts and keys on this machine; then the
    same port served by a second server with a fresh database (a rebuilt server, or someone on the path), where an
    impostor has registered "alice" and "bob" and queued a message for bob "from alice".
    """

    async def serve_on(self, port, db):
        options = pager.ServerOptions()
        options.parseOptions(["--listen", "tcp:%d:interface=127.0.0.1" % port, "--db", db])
        server = pager.makeService(options, reactor)
        server.startService()
        self.addCleanup(self.stop_server, server)
        await server.ready
        self.server, self.address = server, "tcp:127.0.0.1:%d" % port
        self.host = "127.0.0.1:%d" % port
        return server

    async def first_server(self):
        """The first server: alice and bob use it once from the command line, which remembers its id."""
        self.port = free_port()
        await self.serve_on(self.port, self.mktemp())
        self.first_id = self.server_id
        self.alice_home = await self.provision("alice")
        self.bob_home = await self.provision("bob")
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "first", home=self.alice_home,
                                token_of="alice")
        self.assertExit(sent, 0)
        fetched = await self.run_command("fetch", self.host, "--user", "bob", home=self.bob_home, token_of="bob")
        self.assertExit(fetched, 0)
        self.assertIn("first", fetched.out)

    async def second_server(self, impostor=True):
        """
        The same port, a fresh database: an impostor registers bob, and (with C{impostor}) alice, and pages bob as
        alice.
        """
        await self.stop_server(self.server)
        await self.serve_on(self.port, self.mktemp())
        self.second_id = self.server_id
        self.assertNotEqual(self.first_id, self.second_id)
        fake = {name: pager.generate_private_key() for name in ("alice", "bob")}
        bob = await self.connect(self.address)
        await bob.register("bob", token("bob"), fake["bob"])
        clients = [bob]
        if impostor:
            alice = await self.connect(self.address)
            await alice.register("alice", token("alice"), fake["alice"])
            await alice.send("bob", "from alice, honestly")
            clients.append(alice)
        await self.offline(self.server, *clients)
        self.known_before = self.known_file()

    def known_file(self, home=None):
        with open(os.path.join(home or self.alice_home, pager.KNOWN_SERVERS_NAME)) as f:
            return f.read()

    async def assertNothingAtSecond(self, *homes):
        """Nothing was made for the second server: no key, no directory, no pin, no delivery taken."""
        for home in homes:
            self.assertFalse(os.path.exists(os.path.join(home, self.second_id)), "a directory for the new id")
            self.assertNotIn(self.second_id, self.known_file(home))
        self.assertEqual(sorted(await self.server.store.user_names()), ["alice", "bob"])
        self.assertEqual(len(await self.pending(self.server, "bob")), 1)

    def assertRefusal(self, result):
        line = self.assertOneErrorLine(result, pager.EXIT_KEY_TRUST)
        self.assertIn(self.first_id, line)
        self.assertIn(self.second_id, line)
        self.assertIn("trust-server", line)
        return line


class MovedServerTests(MovedServerTestCase):
    """A server with a new id at a known address: send, fetch, users, the key commands and connect refuse it."""

    async def test_send_refused(self):
        """send to a known address presenting a new id exits 5 naming both ids; it registers and pins nothing."""
        await self.first_server()
        await self.second_server()
        for extra in ((), ("--register",)):
            result = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "secret", *extra,
                                      home=self.alice_home, token_of="alice", passphrase="a passphrase")
            self.assertRefusal(result)
            self.assertEqual(result.out, "")
        await self.assertNothingAtSecond(self.alice_home)
        self.assertEqual(self.known_file(), self.known_before)

    async def test_fetch_refused(self):
        """fetch refuses too: the impostor's message "from alice" is neither shown nor acknowledged."""
        await self.first_server()
        await self.second_server()
        result = await self.run_command("fetch", self.host, "--user", "bob", "--json", home=self.bob_home,
                                  token_of="bob")
        self.assertRefusal(result)
        self.assertNotIn("honestly", result.out)
        await self.assertNothingAtSecond(self.bob_home)

    async def test_other_commands_refused(self):
        """users, export-key and import-key refuse the same way."""
        await self.first_server()
        await self.second_server()
        out = os.path.abspath(self.mktemp())
        pem = os.path.abspath(self.mktemp())
        with open(pem, "wb") as f:
            f.write(key("alice").private_bytes(pager.serialization.Encoding.PEM,
                                               pager.serialization.PrivateFormat.PKCS8,
                                               pager.serialization.NoEncryption()))
        commands = [("users", self.host, "--user", "alice"),
                    ("export-key", self.host, "--user", "alice", "--out", out),
                    ("import-key", self.host, "--user", "alice", pem, "--no-passphrase", "--force")]
        for command in commands:
            result = await self.run_command(*command, home=self.alice_home, token_of="alice", passphrase="pass")
            self.assertRefusal(result)
        self.assertFalse(os.path.exists(out))
        await self.assertNothingAtSecond(self.alice_home)

    async def test_connect_refused(self):
        """The interactive connect refuses before asking anything, and registers nothing."""
        await self.first_server()
        await self.second_server()
        result = await self.run_command("connect", self.host, "--user", "alice", home=self.alice_home, token_of="alice",
                                  passphrase="pass", stdin=b"y\nbob\nsecret\n")
        self.assertRefusal(result)
        await self.assertNothingAtSecond(self.alice_home)

    async def test_trust_server(self):
        """
        trust-server with a wrong --id changes nothing (exit 5); with none it accepts the new id, naming both,
        after which send --register makes alice a new key there, and the old key stays where it was.
        """
        await self.first_server()
        await self.second_server(impostor=False)
        old_key = os.path.join(self.user_dir(self.alice_home, "alice").replace(self.second_id, self.first_id),
                               pager.KEY_FILE_NAME)
        malformed = await self.run_command("trust-server", self.host, "--id", "78b725bee21c", home=self.alice_home)
        self.assertIn("32 hex digits", self.assertOneErrorLine(malformed, pager.EXIT_USAGE))
        wrong = await self.run_command("trust-server", self.host, "--id", "ab" * 16, home=self.alice_home)
        self.assertOneErrorLine(wrong, pager.EXIT_KEY_TRUST)
        self.assertEqual(self.known_file(), self.known_before)
        # As pasted from the operator's log or a chat: upper case and a stray space still name the id.
        trusted = await self.run_command("trust-server", self.host, "--id", " " + self.second_id.upper(), home=self.alice_home)
        self.assertExit(trusted, 0)
        self.assertIn(self.first_id, trusted.out)
        self.assertIn(self.second_id, trusted.out)
        self.assertIn(self.second_id, self.known_file())
        self.assertNotIn(self.first_id, self.known_file())
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hello", "--register",
                                home=self.alice_home, token_of="alice", passphrase="new passphrase")
        self.assertExit(sent, 0)
        self.assertTrue(os.path.exists(os.path.join(self.user_dir(self.alice_home, "alice"), pager.KEY_FILE_NAME)))
        self.assertTrue(os.path.exists(old_key))

    async def test_forget_server_keeps_old_keys(self):
        """
        After forget-server the next command pins the id it finds, but no new key is made for alice, who has one
        here from the address's former id: not by send --register, not by connect (exit 5, naming the old id and
        trust-server).  bob, who has none, may register.
        """
        await self.first_server()
        await self.second_server(impostor=False)
        forgot = await self.run_command("forget-server", self.host, home=self.alice_home)
        self.assertExit(forgot, 0)
        self.assertIn(self.first_id, forgot.out)
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hello", "--register",
                                home=self.alice_home, token_of="alice", passphrase="new passphrase")
        line = self.assertOneErrorLine(sent, pager.EXIT_KEY_TRUST)
        self.assertIn(self.first_id, line)
        self.assertIn("trust-server", line)
        connect = await self.run_command("connect", self.host, "--user", "alice", home=self.alice_home,
                                   token_of="alice", passphrase="new passphrase", stdin=b"y\n")
        self.assertEqual(connect.code, pager.EXIT_KEY_TRUST, connect)
        self.assertIn(self.first_id, connect.err)
        self.assertEqual(sorted(await self.server.store.user_names()), ["bob"])
        self.assertFalse(os.path.exists(os.path.join(self.alice_home, self.second_id, "alice")))



class OldHomeTests(MovedServerTestCase):
    """
    A home from before known_servers: alice's key is filed under the first server's id, but nothing says which id
    the address had.  A server with a new id there gets no silent new key: the user is told of the old one.
    """

    async def test_key_under_another_id(self):
        """
        connect says this machine holds alice's key under the first id, and that the server may have been replaced,
        before it asks ("n" makes nothing); send --register writes the same warning on stderr and registers (one
        user may be on two servers).
        """
        await self.first_server()
        await self.second_server(impostor=False)
        os.unlink(os.path.join(self.alice_home, pager.KNOWN_SERVERS_NAME))
        connect = await self.run_command("connect", self.host, "--user", "alice", home=self.alice_home, token_of="alice",
                                   passphrase="new passphrase", stdin=b"n\n")
        self.assertExit(connect, pager.EXIT_AUTH)
        [warning] = [line for line in connect.err.splitlines() if self.first_id in line]
        for words in (self.second_id, "replaced", "operator", "Make a new key"):
            self.assertIn(words, connect.err)
        self.assertLess(connect.err.index(warning), connect.err.index("Make a new key"))
        self.assertEqual(await self.server.store.user_names(), ["bob"])
        sent = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "hello", "--register",
                                home=self.alice_home, token_of="alice", passphrase="new passphrase")
        self.assertExit(sent, 0)
        self.assertIn(warning, sent.err.splitlines())
        self.assertEqual(sorted(await self.server.store.user_names()), ["alice", "bob"])
        again = await self.run_command("send", self.host, "--user", "alice", "--to", "bob", "again", home=self.alice_home,
                                 token_of="alice", passphrase="new passphrase")
        self.assertExit(again, 0)
        self.assertNotIn(self.first_id, again.err)


class RegisterFlagTests(CLITestCase):
    """Script commands make a key and register only with --register."""

    async def test_no_key_without_register(self):
        """send, fetch and users for a user without a key here exit 3 naming --register; nothing is made."""
        await self.serve()
        await self.account("bob")
        home = self.home()
        commands = [("send", self.host, "--user", "carol", "--to", "bob", "hi"),
                    ("fetch", self.host, "--user", "carol"), ("users", self.host, "--user", "carol")]
        for command in commands:
            result = await self.run_command(*command, home=home, token_of="carol", passphrase="carol's passphrase")
            line = self.assertOneErrorLine(result, pager.EXIT_AUTH)
            self.assertIn("--register", line)
        self.assertFalse(os.path.exists(os.path.join(home, self.server_id)))
        self.assertEqual(sorted(await self.server.store.user_names()), ["bob"])
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_register(self):
        """send --register makes carol a key, registers her and sends; later commands need no flag."""
        await self.serve()
        await self.account("bob")
        home = self.home()
        sent = await self.run_command("send", self.host, "--user", "carol", "--to", "bob", "hi", "--register",
                                home=home, token_of="carol", passphrase="carol's passphrase")
        self.assertExit(sent, 0)
        self.assertNotIn("Warning", sent.err)  # no key for carol under another server id here
        self.assertIn("carol", await self.server.store.user_names())
        self.assertTrue(os.path.exists(os.path.join(self.user_dir(home, "carol"), pager.KEY_FILE_NAME)))
        with open(os.path.join(home, pager.KNOWN_SERVERS_NAME)) as f:
            self.assertIn("tcp:%s %s" % (self.host, self.server_id), f.read())
        self.assertMode(os.path.join(home, pager.KNOWN_SERVERS_NAME), 0o600)
        again = await self.run_command("users", self.host, "--user", "carol", home=home, token_of="carol",
                                 passphrase="carol's passphrase")
        self.assertExit(again, 0)

    async def test_register_with_name(self):
        """
        send, fetch and users --register --name NAME register this machine as the device NAME; --name without
        --register is refused (exit 2) saying it only names a device being registered, as is a malformed name.
        """
        await self.serve()
        await self.account("bob")
        for user, command in (("carol", ("send", "--to", "bob", "hi")), ("dave", ("fetch",)), ("erin", ("users",))):
            result = await self.run_command(command[0], self.host, "--user", user, *command[1:], "--register",
                                            "--name", "%s-box" % user, home=self.home(), token_of=user,
                                            passphrase="a passphrase")
            self.assertExit(result, 0)
            _, devices = await self.server.store.devices(user)
            self.assertEqual([d.name for d in devices], ["%s-box" % user], command[0])
            refused = await self.run_command(command[0], self.host, "--user", user, *command[1:], "--name", "other",
                                             home=self.home(), token_of=user, passphrase="a passphrase")
            self.assertIn("--name only names this machine as a device being registered: give it with --register",
                          self.assertOneErrorLine(refused, pager.EXIT_USAGE))
            malformed = await self.run_command(command[0], self.host, "--user", user, *command[1:], "--register",
                                               "--name", " padded", home=self.home())
            self.assertIn(pager.DEVICE_NAME_RULE.rstrip("."), self.assertOneErrorLine(malformed, pager.EXIT_USAGE))
        self.assertEqual(sorted(await self.server.store.user_names()), ["bob", "carol", "dave", "erin"])

    async def test_register_without_passphrase(self):
        """
        send --register with no passphrase for the new key is a missing answer, as for an existing key: one sentence
        naming PAGER_PASSPHRASE and --no-passphrase, exit 2; no key, no account.
        """
        await self.serve()
        await self.account("bob")
        home = self.home()
        result = await self.run_command("send", self.host, "--user", "carol", "--to", "bob", "hi", "--register",
                                  home=home, token_of="carol")
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertIn("PAGER_PASSPHRASE", line)
        self.assertIn("--no-passphrase", line)
        self.assertNotIn("carol", await self.server.store.user_names())

    async def test_connect_asks_before_registering(self):
        """connect asks before making a key: "n" makes nothing and registers nobody; "y" registers."""
        await self.serve()
        home = self.home()
        declined = await self.run_command("connect", self.host, "--user", "carol", home=home, token_of="carol",
                                    passphrase="carol's passphrase", stdin=b"n\n")
        self.assertExit(declined, pager.EXIT_AUTH)
        self.assertIn("register", declined.err)
        self.assertEqual(await self.server.store.user_names(), [])
        self.assertFalse(os.path.exists(os.path.join(home, self.server_id)))
        accepted = await self.pager("connect", self.host, "--user", "carol", home=home, token_of="carol",
                                    passphrase="carol's passphrase", stdin=b"y\n")
        self.assertExit(accepted, 0)
        self.assertIn("Logged in as carol", accepted.out)
        self.assertEqual(await self.server.store.user_names(), ["carol"])


class KnownServersTests(unittest.TestCase):
    """The known_servers file on its own."""

    def test_file(self):
        """Lines are kept per address and TLS; a malformed file is refused naming its line; it is mode 0600."""
        home = os.path.abspath(self.mktemp())
        known = pager.KnownServers(home)
        plain = pager.server_address("LocalHost", 5050, False)
        tls = pager.server_address("localhost", 5050, True)
        self.assertEqual((plain, tls), ("tcp:localhost:5050", "tls:localhost:5050"))
        self.assertEqual(pager.server_address("::1", 5050, False), "tcp:[::1]:5050")
        self.assertEqual((pager.host_port("::1", 5050), pager.host_port("LocalHost", 5051)),
                         ("[::1]:5050", "LocalHost:5051"))  # as the commands name an address
        known.check(plain, "aa" * 16)
        known.remember(plain, "aa" * 16)
        known.check(plain, "aa" * 16)
        known.check(tls, "bb" * 16)  # another address: not known
        with self.assertRaises(pager.ServerChanged):
            known.check(plain, "bb" * 16)
        self.assertEqual(os.stat(known.path).st_mode & 0o777, 0o600)
        self.assertEqual(known.forget(plain), "aa" * 16)
        self.assertEqual(known.forgotten(plain), ["aa" * 16])
        known.check(plain, "bb" * 16)
        known.remember(tls, "aa" * 16)
        known.forget(tls)
        known.remember(tls, "aa" * 16)  # the same server again: no longer a forgotten one
        self.assertEqual((known.known(tls), known.forgotten(tls)), ("aa" * 16, []))
        self.assertEqual(known.trust(plain, "bb" * 16), None)
        self.assertEqual(known.forgotten(plain), [])
        with open(known.path, "a") as f:
            f.write("tcp:x:1 not-hex\n")
        with self.assertRaises(pager.LocalError) as caught:  # a file on this machine: exit 7, not a key's 3
            known.check(plain, "bb" * 16)
        self.assertIn("line", caught.exception.message)
        self.assertEqual(pager.exit_code(caught.exception), pager.EXIT_LOCAL)
        with open(known.path, "wb") as f:
            f.write(b"\xff\xfe not UTF-8\n")
        self.assertRaises(pager.LocalError, known.check, plain, "bb" * 16)
        not_a_directory = os.path.abspath(self.mktemp())  # a PAGER_HOME that is a file
        with open(not_a_directory, "w") as f:
            f.write("a file\n")
        with self.assertRaises(pager.LocalError) as caught:
            pager.KnownServers(not_a_directory).known(plain)
        self.assertIn(not_a_directory, caught.exception.message)


class _FakeClient:
    """A connection that tells C{on_disconnect} when it is closed, as a L{pager.PagerClient} does."""

    def __init__(self, server_id):
        self.server_id = server_id
        self.closed = False
        self.on_disconnect = None

    def close(self):
        self.closed = True
        if self.on_disconnect is not None:
            self.on_disconnect(pager.ConnectionLost())
        return defer.succeed(None)


class ReconnectTests(unittest.TestCase):
    """Session.reconnect on a task.Clock, with the connection and the login replaced by fakes."""

    def session(self, failures):
        """A session whose logins fail with C{failures} in turn, then succeed; returns it and the clients made."""
        clock = task.Clock()
        config = {"server": "localhost", "home": os.path.abspath(self.mktemp()), "user": "alice", "tls": False,
                  "ca": None}
        session = pager.Session(clock, config, pager.Prompter(clock, interactive=False))
        session.server_id = "aa" * 16
        clients, failures, self.disconnects = [], list(failures), []

        async def connect(check=True):
            clients.append(_FakeClient("aa" * 16))
            clients[-1].on_disconnect = self.disconnects.append  # as the chat wires every connection
            return clients[-1]

        async def login(client):
            if failures:
                raise failures.pop(0)
        session.connect, session._login = connect, login
        return clock, session, clients

    def test_rate_limited_is_retried(self):
        """A re-login answered rate_limited is retried after a longer wait; the refused connection is closed."""
        clock, session, clients = self.session([pager.RateLimited("Too many logins; try again later.")])
        said = []
        d = defer.Deferred.fromCoroutine(session.reconnect(said.append))
        clock.advance(1)
        self.assertEqual(len(clients), 1)
        self.assertTrue(clients[0].closed)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual(len(clients), 1)  # the wait doubled: 2 s
        clock.advance(1)
        self.assertIs(self.successResultOf(d), clients[1])
        self.assertFalse(clients[1].closed)
        self.assertIn("Too many logins; try again later.", said)
        self.assertEqual(self.disconnects, [])  # closing the refused attempt started no second reconnection

    def test_rate_limited_waits_as_told(self):
        """
        A re-login refused with a retry_after longer than the backoff waits that long before the next try (each
        refused try would lengthen the server's wait); a retry_after past an hour is not taken from the server.
        """
        clock, session, clients = self.session([pager.RateLimited("Too many failed logins; try again in 120 s.",
                                                                  retry_after=120.0)])
        d = defer.Deferred.fromCoroutine(session.reconnect(lambda text: None))
        clock.advance(1)
        self.assertEqual(len(clients), 1)
        clock.advance(119.5)
        self.assertEqual(len(clients), 1)
        clock.advance(0.5)
        self.assertIs(self.successResultOf(d), clients[1])

    def test_retry_after_read_from_the_frame(self):
        """The client reads a rate_limited error's retry_after when it is a sane number of seconds, else ignores it."""
        for value, expected in [(7, 7.0), (0.5, 0.5), (-1, None), (10 ** 9, None), ("7", None), (True, None)]:
            proto = pager.PagerClientProtocol()
            errors = []
            proto.makeConnection(StringTransport())
            d = proto.request("login")
            d.addErrback(errors.append)
            rid = next(iter(proto._pending))
            proto.lineReceived(pager.encode_frame({"type": "error", "id": rid, "code": "rate_limited",
                                                   "message": "wait", "retry_after": value}))
            self.assertIsInstance(errors[0].value, pager.RateLimited)
            self.assertEqual(errors[0].value.retry_after, expected, value)

    def test_failed_attempt_closed(self):
        """A connection whose login is cut off or times out is closed before the next try."""
        clock, session, clients = self.session([pager.ConnectionLost(), pager.NetworkError("down")])
        d = defer.Deferred.fromCoroutine(session.reconnect(lambda text: None))
        for wait in (1, 2, 4):
            clock.advance(wait)
        self.assertIs(self.successResultOf(d), clients[2])
        self.assertEqual([c.closed for c in clients], [True, True, False])
        self.assertEqual(self.disconnects, [])

    def test_other_server_stops(self):
        """A server with another id at the address ends the reconnection with ServerChanged; nothing stays open."""
        clock, session, clients = self.session([])
        session.server_id = "bb" * 16
        d = defer.Deferred.fromCoroutine(session.reconnect(lambda text: None))
        clock.advance(1)
        self.failureResultOf(d, pager.ServerChanged)
        self.assertTrue(clients[0].closed)


class ChatReconnectTests(MovedServerTestCase):
    """The chat, reconnecting after its server went away, to a server with another id at the same address."""

    async def test_chat_refuses_new_server(self):
        """The chat says the address presents another id, naming both, and stops retrying; nothing is registered."""
        from tests.test_terminal import FakeUI
        self.port = free_port()
        await self.serve_on(self.port, self.mktemp())
        first_id = self.server_id
        home = await self.provision("alice")
        token_file = os.path.abspath(self.mktemp())
        with open(token_file, "w") as f:
            f.write(token("alice") + "\n")
        os.chmod(token_file, 0o600)  # a token file others may read is refused
        config = {"server": self.host, "home": home, "user": "alice", "token-file": token_file,
                  "passphrase-file": None, "no-passphrase": False, "tls": False, "ca": None, "no-history": False}
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("PAGER_")})
        session = pager.Session(reactor, config, pager.Prompter(reactor, interactive=False))
        chat = pager.Chat(session, reactor)
        await session.start()
        ui = FakeUI()
        chat.attach(ui)
        self.addCleanup(lambda: (chat.quit(), chat.done)[1])
        await self.server.stopService()  # closes alice's connection: the chat starts reconnecting
        await self.serve_on(self.port, self.mktemp())
        await self.wait_for(lambda: chat.done.called, "the chat to refuse the new server and end", tries=1000)
        # The chat ends, and connect with it: with the refusal's sentence and exit code, once the terminal is back.
        self.assertIsInstance(chat.ended_by, pager.ServerChanged)
        self.assertEqual(pager.exit_code(chat.ended_by), pager.EXIT_KEY_TRUST)
        self.assertIn(first_id, chat.ended_by.message)
        self.assertIn(self.server_id, chat.ended_by.message)
        self.assertIn("pager-cli trust-server %s --home %s" % (self.host, home), chat.ended_by.message)
        self.assertNotIn("Reconnected.", ui.text())
        self.assertEqual(await self.server.store.user_names(), [])
        self.assertEqual(self.server.factory.connections, 0)
