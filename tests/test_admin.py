"""
The operator's commands, C{pager.py admin --db DB ...}, run in-process (as L{pager.main} would run them; a backup
also as a child process, as an operator runs it) on the database of a real server that keeps running in this
process: they must be safe while it runs, and the server must go on working after each.
"""

import io
import os
import sqlite3
import stat
import sys

from twisted.internet import endpoints, reactor

import pager
from tests.test_cli import CLITestCase
from tests.test_e2e import key, token
from tests.test_security import Peer, b64, read_elsewhere
from tests.test_server import device_fields

LISTEN = "tcp:0:interface=127.0.0.1"


class AdminTestCase(CLITestCase):
    """A running server on a database in a file, and helpers to run admin commands on that file."""

    async def start(self, *args):
        self.db = os.path.abspath(self.mktemp())
        options = pager.ServerOptions()
        options.parseOptions(["--listen", LISTEN, "--db", self.db] + list(args))
        self.server = pager.makeService(options, reactor)
        self.server.startService()
        self.addCleanup(self.stop_server, self.server)
        self.port = (await self.server.ready).getHost().port
        self.address = "tcp:127.0.0.1:%d" % self.port
        return self.server

    async def admin(self, *args, db=None, process=False):
        """
        Run C{pager-cli admin --db DB ARGS...} in-process, or (with C{process}) as a child process, as an operator
        would beside the server's; returns its Result.
        """
        run = self.pager if process else self.run_command
        return await run("admin", "--db", db or self.db, *args)

    async def users(self, *names, online=()):
        """Register C{names} in-process; those not in C{online} log out again.  Returns the clients still online."""
        clients = {}
        for name in names:
            client = await self.register(self.address, name)
            if name in online:
                clients[name] = client
            else:
                await self.offline(self.server, client)
        return clients

    async def admin_all(self, *runs):
        """Run several admin commands in turn (each a dict of args and optionally db); their Results, in order."""
        return [await self.admin(*run["args"], db=run.get("db")) for run in runs]

    def query_dump(self):
        conn = sqlite3.connect(self.db)
        try:
            return list(conn.iterdump())
        finally:
            conn.close()

    def query(self, sql, *args, db=None):
        conn = sqlite3.connect(db or self.db)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    async def server_works(self):
        """A fresh pair of sessions can still page each other through the server."""
        names = set(await self.server.store.user_names())
        for name in ("witness-a", "witness-b"):
            if name not in names:
                await self.users(name)
        sender = await self.login(self.address, "witness-a")
        receiver = await self.login(self.address, "witness-b")
        msg = await sender.send("witness-b", "the server still works")
        await self.wait_for(lambda: receiver.events.messages, "the witness message")
        self.assertOpened(receiver.events.messages[0], "witness-a", b"the server still works", msg)
        await self.offline(self.server, sender, receiver)

    async def open_upload(self):
        """A server with alice and bob; alice logged in on a raw connection with a 3-chunk upload begun for bob."""
        await self.start()
        await self.users("alice", "bob")
        peer = Peer()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), peer)
        self.addCleanup(lambda: peer.lost is None and peer.transport.abortConnection())
        await self.wait_for(lambda: peer.challenge, "the hello")
        proof = pager.sign_auth(key("alice"), "login", self.server.factory.server_id, "alice", peer.challenge)
        peer.write({"type": "login", "id": "l", "user": "alice", "token": token("alice"), "proof": b64(proof)})
        await self.wait_for(lambda: peer.answer("l"), "the login")
        envelope = await self.device_envelope(self.address, "alice", ["bob"], os.urandom(3000), chunk_size=1024)
        peer.write({"type": "send", "id": "up", "to": ["bob"], "size": envelope.size,
                    "header": b64(envelope.header), "chunks": [b64(envelope.chunks[0])]})
        peer.write({"type": "ping", "id": "p1"})
        await self.wait_for(lambda: peer.answer("p1"), "the ping after the first frame")
        return peer, envelope


class AdminCommandTests(AdminTestCase):

    async def test_users(self):
        """'admin users' lists every user with the number and bytes of messages waiting for them."""
        await self.start()
        alice = (await self.users("alice", "bob", "carol", online=("alice",)))["alice"]
        await alice.send("bob", "one")
        await alice.send("bob", "two!")
        await alice.send("carol", "three")
        result = await self.admin("users")
        self.assertExit(result, 0)
        header, *rows = result.out.splitlines()
        self.assertIn("user", header)
        self.assertIn("pending", header)
        listed = {row.split()[0]: (int(row.split()[-2]), int(row.split()[-1])) for row in rows}
        self.assertEqual(listed, {"alice": (0, 0), "bob": (2, 7), "carol": (1, 5)})
        await self.server_works()

    async def test_invite(self):
        """
        'admin invite -n 3' prints three codes; on a server with --registration invite, each registers one user
        once, and a used code is refused.  The database holds no code in clear.
        """
        await self.start("--registration", "invite")
        result = await self.admin("invite", "-n", "3")
        self.assertExit(result, 0)
        codes = result.out.split()
        self.assertEqual(len(codes), 3)
        self.assertEqual(len(set(codes)), 3)

        async def register(name, code):
            client = await self.connect(self.address)
            proof = pager.sign_auth(key(name), "register", client.server_id, name, client.protocol.challenge)
            try:
                await client.protocol.request("register", user=name, public_key=pager.public_key_pem(key(name)),
                                              token=token(name), proof=b64(proof), invite=code,
                                              device=device_fields(key(name), name))
            finally:
                await client.close()

        for name, code in zip(("alice", "bob", "carol"), codes):
            await register(name, code)
        with self.assertRaises(pager.Forbidden):
            await register("dave", codes[0])
        self.assertEqual(await self.server.store.user_names(), ["alice", "bob", "carol"])
        raw = await read_elsewhere(self, self.db, self.db + "-wal")
        dump = "\n".join(self.query_dump())
        for code in codes:
            self.assertNotIn(code.encode(), raw)
            self.assertNotIn(code, dump)
        more = await self.admin("invite", "-n", "1")
        self.assertExit(more, 0)
        await register("witness-a", more.out.strip())
        await register("witness-b", (await self.admin("invite")).out.strip())
        await self.server_works()

    async def test_delete_user(self):
        """
        'admin delete-user bob' removes bob and the messages waiting for him (a message also for carol stays hers);
        the server then knows no bob.  Deleting an unknown user exits 4.
        """
        await self.start()
        alice = (await self.users("alice", "bob", "carol", online=("alice",)))["alice"]
        await alice.send("bob", "first")
        await alice.send("bob", "second")
        shared = await alice.send(["bob", "carol"], "for both")
        result = await self.admin("delete-user", "bob")
        self.assertExit(result, 0)
        self.assertIn("bob", result.out)
        self.assertIn("3", result.out)

        self.assertEqual(await self.server.store.user_names(), ["alice", "carol"])
        self.assertEqual(await self.pending(self.server, "bob"), [])
        self.assertEqual([m.msg_id.hex() for m in await self.pending(self.server, "carol")], [shared])
        self.assertEqual(self.query("SELECT COUNT(*) FROM deliveries WHERE recipient = 'bob'"), [(0,)])
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(1,)])
        self.assertEqual(self.query("SELECT COUNT(*) FROM chunks WHERE seq NOT IN (SELECT seq FROM messages)"), [(0,)])
        with self.assertRaises(pager.UnknownUser):
            await alice.public_key("bob", refresh=True)
        with self.assertRaises(pager.UnknownUser):
            await alice.send("bob", "are you there?")
        with self.assertRaises(pager.AuthFailed):
            await self.login(self.address, "bob")

        again = await self.admin("delete-user", "bob")
        self.assertOneErrorLine(again, pager.EXIT_UNKNOWN_USER)
        await self.offline(self.server, alice)
        await self.server_works()

    async def test_reset_key(self):
        """
        'admin reset-key bob pub.pem' replaces bob's key: the key lookup gives the new fingerprint, bob logs in with
        the new private key and no longer with the old one, and alice, who pinned the old key, is stopped by
        KeyChanged until she trusts the new one.
        """
        await self.start()
        alice = (await self.users("alice", "bob", online=("alice",)))["alice"]
        await alice.send("bob", "pinning your key")
        new_key = key("bob-new")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(pager.public_key_pem(new_key))
        result = await self.admin("reset-key", "bob", path)
        self.assertExit(result, 0)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), result.out)

        _, fp = await alice.public_key("bob", refresh=True)
        self.assertEqual(fp, pager.fingerprint(new_key))
        with self.assertRaises(pager.KeyChanged):
            await alice.send("bob", "to the new key?")
        old = await self.connect(self.address)
        with self.assertRaises(pager.AuthFailed):
            await old.login("bob", token("bob"), key("bob"))
        bob = await self.connect(self.address)
        await bob.login("bob", token("bob"), new_key)
        await alice.trust("bob")
        msg = await alice.send("bob", "to the new key")
        await self.wait_for(lambda: bob.events.messages, "the message to bob's new key")
        self.assertEqual((bob.events.messages[-1].message_id.hex(), bob.events.messages[-1].plaintext),
                         (msg, b"to the new key"))
        await self.offline(self.server, alice, bob)
        await self.server_works()

    async def test_backup_while_running(self):
        """
        'admin backup DEST', while the server runs and still holds committed messages only in its WAL, writes a
        database (mode 0600) that opens and holds every user and every pending message; DEST must be a new file.
        """
        await self.start()
        alice = (await self.users("alice", "bob", "carol", online=("alice",)))["alice"]
        sent = [await alice.send(["bob", "carol"] if i % 2 else "bob", "message %d" % i) for i in range(6)]
        # The premise: the committed messages are in the WAL, so a copy of the main file alone would miss them.
        self.assertGreater(os.path.getsize(self.db + "-wal"), 0)
        main_only = os.path.abspath(self.mktemp())
        with open(main_only, "wb") as f:
            f.write(await read_elsewhere(self, self.db))
        copied = self.query("SELECT COUNT(*) FROM messages", db=main_only) if self.query(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'messages'", db=main_only) != [(0,)] else [(0,)]
        self.assertLess(copied[0][0], len(sent))

        dest = os.path.abspath(self.mktemp())
        result = await self.admin("backup", dest, process=True)  # SQLite's locks between processes, as deployed
        self.assertExit(result, 0)
        self.assertEqual(stat.S_IMODE(os.stat(dest).st_mode), 0o600)
        self.assertFalse(os.path.exists(dest + "-wal") and os.path.getsize(dest + "-wal") > 0)
        self.assertEqual(self.query("PRAGMA integrity_check", db=dest), [("ok",)])
        self.assertEqual(self.query("SELECT name FROM users ORDER BY name", db=dest),
                         [("alice",), ("bob",), ("carol",)])
        self.assertEqual(sorted(bytes(r[0]).hex() for r in self.query("SELECT msg_id FROM messages", db=dest)),
                         sorted(sent))
        self.assertEqual(self.query("SELECT recipient, COUNT(*) FROM deliveries GROUP BY recipient ORDER BY 1",
                                    db=dest), [("bob", 6), ("carol", 3)])
        self.assertEqual(self.query("SELECT value FROM meta WHERE key = 'server_id'", db=dest),
                         [(self.server.factory.server_id,)])

        again = await self.admin("backup", dest)
        self.assertOneErrorLine(again, pager.EXIT_USAGE)
        await self.offline(self.server, alice)
        await self.server_works()

    async def test_stats(self):
        """'admin stats' prints the counts of users, pending deliveries and messages, receipts and invites."""
        await self.start()
        alice = (await self.users("alice", "bob", "carol", online=("alice",)))["alice"]
        await alice.send("bob", "pending")
        await alice.send(["bob", "carol"], "half delivered")
        await self.offline(self.server, alice)  # so that carol's receipt stays stored for her
        carol = await self.login(self.address, "carol")
        await self.wait_for(lambda: carol.events.messages, "carol's message")
        await self.wait_for(lambda: self.server.store.pending_receipts("alice", 0), "the stored receipt")
        await self.server.store.create_invites(2, reactor.seconds())
        result = await self.admin("stats")
        self.assertExit(result, 0)
        stats = {line.split()[0]: int(line.split()[1]) for line in result.out.splitlines()}
        self.assertEqual({k: stats[k] for k in ("users", "pending_deliveries", "pending_messages", "stored_receipts",
                                                "unused_invites")},
                         {"users": 3, "pending_deliveries": 2, "pending_messages": 2, "stored_receipts": 1,
                          "unused_invites": 2})
        self.assertEqual(stats["pending_bytes"], len("pending") + len("half delivered"))
        self.assertGreater(stats["database_bytes"], 0)
        await self.offline(self.server, carol)
        await self.server_works()

    async def test_during_an_upload(self):
        """
        An admin command run while a client is in the middle of a multi-frame upload does not disturb it: the
        upload completes and is delivered.
        """
        peer, envelope = await self.open_upload()
        self.assertIsNone(peer.answer("up"))

        result = await self.admin("stats")
        self.assertExit(result, 0)

        peer.write({"type": "chunk", "id": "up", "chunks": [b64(c) for c in envelope.chunks[1:]],
                    "signature": b64(envelope.signature)})
        answer = await self.wait_for(lambda: peer.answer("up"), "the upload's answer")
        self.assertEqual(answer["type"], "ok", answer)
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "the uploaded message")
        self.assertEqual(bob.events.messages[0].message_id.hex(), answer["msg"])
        peer.transport.loseConnection()
        await self.wait_for(lambda: peer.lost is not None, "the raw connection to close")
        await self.offline(self.server, bob)
        await self.server_works()


class AdminHardeningTests(AdminTestCase):
    """The admin commands against a running server: what its sessions and its disk see of them."""

    async def test_delete_user_and_reset_key_end_sessions(self):
        """
        'admin delete-user' and 'admin reset-key', run by another process, close the user's open sessions within
        the server's --account-check-interval; other users' sessions go on.
        """
        await self.start("--account-check-interval", "0.2")
        clients = await self.users("alice", "bob", "carol", online=("alice", "bob", "carol"))
        result = await self.admin("delete-user", "alice")
        self.assertExit(result, 0)
        await self.wait_for(lambda: clients["alice"].events.disconnects, "alice's session to be closed")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(pager.public_key_pem(key("bob-new")))
        self.assertExit(await self.admin("reset-key", "bob", path), 0)
        await self.wait_for(lambda: clients["bob"].events.disconnects, "bob's session to be closed")
        await self.wait_for(lambda: set(self.server.factory.online) == {"carol"}, "only carol to be online")
        await clients["carol"].ping()
        await self.offline(self.server, clients["carol"])
        await self.server_works()

    async def test_deleted_name_gets_nothing_of_the_old_account(self):
        """
        After 'admin delete-user alice', whoever registers "alice" next gets no receipt of the old alice's
        messages, and the messages she had pending for others are gone.
        """
        await self.start()
        alice = (await self.users("alice", "bob", online=("alice",)))["alice"]
        await alice.send("bob", "from the old alice")
        await self.offline(self.server, alice)
        self.assertExit(await self.admin("delete-user", "alice"), 0)
        self.assertEqual(await self.pending(self.server, "bob"), [])
        new_alice = await self.connect(self.address)
        await new_alice.register("alice", token("alice-new"), key("alice-new"))
        bob = await self.login(self.address, "bob")
        await bob.ping()
        self.assertEqual(bob.events.messages, [])
        self.assertEqual(self.query("SELECT COUNT(*) FROM receipts"), [(0,)])
        await new_alice.ping()
        self.assertEqual(new_alice.events.receipts, [])
        await self.offline(self.server, bob, new_alice)
        await self.server_works()

    async def test_stats_open_uploads(self):
        """
        'admin stats' shows an open upload (count and declared bytes, also counted in pending_bytes) and the
        database's size with its WAL and its free space.
        """
        peer, envelope = await self.open_upload()
        result = await self.admin("stats")
        self.assertExit(result, 0)
        stats = {line.split()[0]: int(line.split()[1]) for line in result.out.splitlines()}
        self.assertEqual((stats["open_uploads"], stats["open_upload_bytes"], stats["pending_bytes"]),
                         (1, 3000, 3000))
        self.assertGreater(stats["database_bytes"], 0)
        self.assertGreaterEqual(stats["wal_bytes"], 0)
        self.assertGreaterEqual(stats["free_bytes"], 0)
        peer.transport.loseConnection()
        await self.wait_for(lambda: peer.lost is not None, "the raw connection to close")
        await self.wait_for(lambda: self.query("SELECT COUNT(*) FROM messages") == [(0,)], "the upload dropped")
        stats = {line.split()[0]: int(line.split()[1]) for line in (await self.admin("stats")).out.splitlines()}
        self.assertEqual((stats["open_uploads"], stats["open_upload_bytes"], stats["pending_bytes"]), (0, 0, 0))
        await self.server_works()

    async def test_backup_private_from_start(self):
        """
        'admin backup' creates DEST 0600 before anything is written into it, whatever the umask, and refuses a
        DEST that is a symbolic link (even one to a missing file), creating nothing.
        """
        await self.start()
        await self.users("alice")
        seen = []
        connect = sqlite3.connect

        def watching_connect(path, *args, **kwargs):
            if path == dest:
                seen.append(stat.S_IMODE(os.lstat(path).st_mode) if os.path.exists(path) else None)
            return connect(path, *args, **kwargs)

        dest = os.path.abspath(self.mktemp())
        self.patch(pager.sqlite3, "connect", watching_connect)
        self.patch(sys, "stdout", io.StringIO())
        old = os.umask(0)
        try:
            config = pager.Options()
            config.parseOptions(["admin", "--db", self.db, "backup", dest])
            pager._admin_command(config.subOptions)
        finally:
            os.umask(old)
        self.assertEqual(seen, [0o600])
        self.assertEqual(stat.S_IMODE(os.stat(dest).st_mode), 0o600)

        target = os.path.abspath(self.mktemp())
        link = os.path.abspath(self.mktemp())
        os.symlink(target, link)
        result = await self.admin("backup", link)
        self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertFalse(os.path.exists(target))
        await self.server_works()


class AdminErrorTests(AdminTestCase):

    async def test_missing_database(self):
        """A --db that does not exist: exit 1 with one sentence, and no database is created."""
        missing = os.path.abspath(self.mktemp())
        commands = (["users"], ["stats"], ["invite"], ["backup", missing + ".bak"])
        for result in await self.admin_all(*[dict(args=c, db=missing) for c in commands]):
            line = self.assertOneErrorLine(result, pager.EXIT_FAILURE)
            self.assertIn(missing, line)
            self.assertFalse(os.path.exists(missing))
            self.assertFalse(os.path.exists(missing + ".bak"))

    async def test_bad_server_id(self):
        """A database whose server id is not 32 hex digits: every admin command exits 1 with one sentence."""
        db = os.path.abspath(self.mktemp())
        store = pager.Store(db)
        await store.open()
        store.close()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE meta SET value = 'not-hex' WHERE key = 'server_id'")
        conn.close()
        for result in await self.admin_all(*[dict(args=c, db=db) for c in (["users"], ["stats"])]):
            line = self.assertOneErrorLine(result, pager.EXIT_FAILURE)
            self.assertIn("server id", line)

    async def test_bad_usage(self):
        """Bad command lines exit 2 with one sentence and leave the database alone."""
        await self.start()
        await self.users("alice")
        before = self.query("SELECT name, fingerprint FROM users")
        commands = ([], ["frobnicate"], ["delete-user"], ["delete-user", "a", "b"], ["reset-key", "alice"],
                    ["invite", "-n", "0"], ["invite", "-n", "many"], ["backup"], ["users", "extra"],
                    ["--no-such-option", "users"], ["reset-key", "alice", os.path.abspath(self.mktemp())])
        for args, result in zip(commands, await self.admin_all(*[dict(args=c) for c in commands])):
            # A public key file that cannot be read is a local failure, not a wrong command line.
            self.assertOneErrorLine(result, pager.EXIT_LOCAL if args[:1] == ["reset-key"] and len(args) == 3
                                    else pager.EXIT_USAGE)
        self.assertEqual(self.query("SELECT name, fingerprint FROM users"), before)
        await self.server_works()

    async def test_invalid_name(self):
        """
        A NAME that is not a user name is a wrong command line, as for 'send --to': exit 2 with one sentence, and
        nothing changes.
        """
        await self.start()
        await self.users("alice")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(pager.public_key_pem(key("mallory")))
        commands = (["delete-user", "Not A Name!"], ["delete-user", "../alice"], ["reset-key", "al ice", path])
        for result in await self.admin_all(*[dict(args=c) for c in commands]):
            line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
            self.assertIn("User names", line)
        self.assertEqual(await self.server.store.user_names(), ["alice"])
