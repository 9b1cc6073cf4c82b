"""
The proof of forward secrecy: a thief who later takes everything (bob's identity key file with its passphrase, his
device's whole state directory, the server's database) and holds every envelope captured on the wire cannot open a
message bob read once the signed prekey it used is past its grace period; the same thief can while it is not, so
the first proof does not pass by accident.  Also: a one-time prekey's private part is gone from the state files
(WAL included) once the message that used it is stored, and replays are refused.

A real server and real clients over loopback TCP; time moves forward on a clock shared by both (L{ShiftedClock}).
"""

import dataclasses
import os
import sqlite3

from twisted.internet import defer, reactor

import pager
from tests.test_e2e import LISTEN, E2ETestCase, Events, key, token

PASSPHRASE = "correct horse battery staple"


class ShiftedClock:
    """The real reactor, whose clock (C{seconds}) runs C{offset} seconds ahead: days pass in a test at once."""

    def __init__(self, real):
        self._real = real
        self.offset = 0.0

    def seconds(self):
        return self._real.seconds() + self.offset

    def __getattr__(self, name):
        return getattr(self._real, name)


class Thief:
    """
    What the thief holds: bob's identity key (file and passphrase), every prekey private part in bob's state
    directory it can decrypt with it, and the server's database.  It tries every one of them on every envelope.
    """

    def __init__(self, key_path, state_dir, server_db):
        self.key = pager.load_private_key(key_path, PASSPHRASE)
        self.device = pager.device_id(self.key)
        vault = pager.prekey_vault_key(self.key)
        self.signed, self.one_time = {}, {}
        db = sqlite3.connect("file:%s?mode=ro" % os.path.join(state_dir, pager.LOCAL_DB_NAME), uri=True)
        try:
            for kind, prekey_id, sealed, valid_from, valid_until in db.execute(
                    "SELECT kind, id, private_enc, valid_from, valid_until FROM prekeys WHERE device = ?",
                    (self.device,)):
                private = pager.open_prekey_private(vault, self.device, kind, prekey_id, sealed)
                if kind == "signed":
                    self.signed[prekey_id] = (private, (valid_from, valid_until))
                else:
                    self.one_time[prekey_id] = private
        finally:
            db.close()
        server = sqlite3.connect("file:%s?mode=ro" % server_db, uri=True)
        try:
            # The server's database holds prekeys' public parts only: nothing in it opens a message.
            tables = {row[0] for row in server.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self.server_tables = tables
        finally:
            server.close()

    def signed_private(self, prekey_id):
        entry = self.signed.get(prekey_id)
        return entry[0] if entry else None

    def signed_valid(self, prekey_id):
        entry = self.signed.get(prekey_id)
        return entry[1] if entry else None

    def one_time_private(self, prekey_id):
        return self.one_time.get(prekey_id)

    def open(self, envelope, sender_key):
        return pager.open_envelope(envelope, self.key, "bob", sender_key, device=self.device, prekeys=self)


class ForwardSecrecyTestCase(E2ETestCase):
    """A real server, alice, and bob with his key file and state directory as pager-cli keeps them."""

    async def setUp(self):
        self.clock = ShiftedClock(reactor)
        options = pager.ServerOptions()
        self.server_db = os.path.abspath(self.mktemp())
        options.parseOptions(["--listen", LISTEN, "--db", self.server_db])
        self.server = pager.makeService(options, self.clock)
        self.server.startService()
        self.addCleanup(self.stop_server, self.server)
        port = await self.server.ready
        self.address = "tcp:127.0.0.1:%d" % port.getHost().port
        # bob's device: its identity key file (with a passphrase) and its state directory, as pager-cli keeps them.
        self.state_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.state_dir, 0o700)
        self.key_path = os.path.join(self.state_dir, pager.KEY_FILE_NAME)
        pager.save_private_key(self.key_path, key("bob"), PASSPHRASE)
        self.store = pager.LocalStore(os.path.join(self.state_dir, pager.LOCAL_DB_NAME), self.clock)
        await self.store.open(self.clock.seconds())
        self.addCleanup(lambda: self.store.pool.running and self.store.close())
        self.alice = await self.client()
        await self.alice.register("alice", token("alice"), key("alice"))
        self.bob = await self.client(seen=self.store, pins=self.store)
        await self.bob.register("bob", token("bob"), key("bob"))

    async def client(self, **kwargs):
        if kwargs.get("seen") is None:
            kwargs["seen"] = pager.MemorySeen(self.keyring)
        client = await pager.PagerClient.connect(self.address, self.clock, **kwargs)
        self.addCleanup(client.close)
        client.events = Events(client)
        return client

    async def capture(self, text, one_time=True):
        """alice seals C{text} to bob and sends it; returns the envelope as it went over the wire."""
        alice = self.alice
        if one_time:
            # the server hands one requester one of a device's one-time prekeys every ONE_TIME_INTERVAL at most
            self.clock.offset += pager.ONE_TIME_INTERVAL
            names, envelope = await alice.seal("bob", text)
        else:
            # The bundle as the server gave it, without its one-time prekey: the signed prekey alone, as when the
            # pool has run dry.
            now = self.clock.seconds()
            targets = [dataclasses.replace(t, one_time=None) for t in await alice._targets(["bob"], now)]
            envelope = pager.seal(alice.private_key, "alice", targets, text.encode(), timestamp_ms=int(now * 1000),
                                  now=now)
            names = ["bob"]
        entry = pager.parse_header(envelope.header).entry("bob", pager.device_id(key("bob")))
        self.assertEqual(entry.kind, pager.WRAP_X25519)  # never RSA-OAEP to a device with prekeys
        self.assertEqual(bool(entry.opk_id), one_time)
        await alice.send_envelope(names, envelope)
        return envelope

    async def read_all(self, count):
        """bob has read C{count} messages, and the server holds none for him."""
        await self.wait_for(lambda: len(self.bob.events.messages) == count, "bob to read %d messages" % count)
        await self.no_pending(self.server, "bob")

    async def steal(self):
        """Everything, taken now: the state files are read as they are on disk."""
        return Thief(self.key_path, self.state_dir, self.server_db)

    async def rotate_past_grace(self):
        """bob's signed prekey is replaced; then its grace period (the server's expiry and a day) passes."""
        self.clock.offset += pager.PREKEY_ROTATION
        done = await self.bob.maintain_prekeys()
        self.assertIsNotNone(done["signed"])
        self.clock.offset += self.bob.prekey_grace
        done = await self.bob.maintain_prekeys()
        self.assertGreaterEqual(done["deleted"], 1)


    async def replay(self, envelope, msg_id):
        """The message pushed to bob again, as a hostile server (or a replayed connection) would."""
        self.bob.frame_received({"type": "message", "msg": msg_id, "from": "alice",
                                 "header": pager.b64(envelope.header),
                                 "chunks": [pager.b64(c) for c in envelope.chunks],
                                 "signature": pager.b64(envelope.signature)})
        await self.wait_for(lambda: self.bob.idle, "bob to handle the replay")


class ForwardSecrecyTests(ForwardSecrecyTestCase):
    """Messages bob read stay closed to whoever steals all of bob's keys and state after the grace period."""

    async def test_stolen_after_grace_opens_nothing(self):
        """
        alice sends bob messages (with a one-time prekey, and with the signed prekey alone); bob reads them; his
        signed prekey rotates past its grace period.  The thief then takes bob's identity key file and passphrase,
        his whole state directory and the server's database, and holds every envelope captured on the wire: none
        opens (PrekeyUnavailable), though the thief does hold bob's current prekeys.
        """
        captured = [await self.capture("first"), await self.capture("second"),
                    await self.capture("signed prekey only", one_time=False)]
        await self.read_all(3)
        self.assertEqual(sorted(bytes(m.plaintext) for m in self.bob.events.messages),
                         [b"first", b"second", b"signed prekey only"])
        await self.rotate_past_grace()
        await self.bob.close()
        thief = await self.steal()
        self.assertTrue(thief.signed and thief.one_time)  # it has bob's prekeys of now: just not the old ones
        self.assertIn("one_time_prekeys", thief.server_tables)
        for envelope in captured:
            self.assertRaises(pager.PrekeyUnavailable, thief.open, envelope, key("alice").public_key())

    async def test_stolen_within_grace_opens(self):
        """
        The control: the same thief, stealing while the signed prekey is still within its grace period, opens the
        message bob read that used it alone, and one bob has not received yet; a message whose one-time prekey
        went when bob stored it stays closed even now.
        """
        one_time = await self.capture("read, one-time prekey")
        signed_only = await self.capture("read, signed prekey only", one_time=False)
        await self.read_all(2)
        await self.bob.close()
        await self.wait_for(lambda: "bob" not in self.server.factory.online, "bob to be offline")
        unread = await self.capture("not read yet")
        self.clock.offset += pager.PREKEY_ROTATION  # rotated, but within the grace period
        thief = await self.steal()
        self.assertEqual(bytes(thief.open(signed_only, key("alice").public_key()).plaintext),
                         b"read, signed prekey only")
        self.assertEqual(bytes(thief.open(unread, key("alice").public_key()).plaintext), b"not read yet")
        self.assertRaises(pager.PrekeyUnavailable, thief.open, one_time, key("alice").public_key())

    def state_bytes(self):
        """The bytes of every file in bob's state directory (the database, its WAL and shared-memory files...)."""
        data = b""
        for name in sorted(os.listdir(self.state_dir)):
            with open(os.path.join(self.state_dir, name), "rb") as f:
                data += f.read()
        return data

    async def test_one_time_private_part_gone_from_disk(self):
        """
        Once bob stored a message, the private part of the one-time prekey it used is in no file of his state
        directory, the WAL included: neither sealed under the vault key nor in the clear.
        """
        device = pager.device_id(key("bob"))
        vault = pager.prekey_vault_key(key("bob"))
        before = {p.prekey_id: p for p in await self.store.local_prekeys(device) if p.kind == "one-time"}
        envelope = await self.capture("burn after reading")
        opk_id = pager.parse_header(envelope.header).entry("bob", device).opk_id
        prekey = before[opk_id]
        raw = pager.open_prekey_private(vault, device, "one-time", opk_id, prekey.private_enc).private_bytes_raw()
        self.assertIn(prekey.private_enc, self.state_bytes())  # the premise: it was on disk
        await self.read_all(1)
        await self.wait_for(lambda: self.store.prekey_privates(device, 0, opk_id).addCallback(
            lambda found: found[1] is None), "the one-time prekey to be deleted")
        data = self.state_bytes()
        self.assertNotIn(prekey.private_enc, data)
        self.assertNotIn(raw, data)
        others = [p for i, p in before.items() if i != opk_id]
        self.assertTrue(all(p.private_enc in data for p in others[:5]))  # the search does find what is there

    async def test_replays_refused(self):
        """
        A message pushed again after bob stored it (with a one-time prekey, whose private part is gone, or with the
        signed prekey alone, which still opens it) is recognised by the duplicate store before any unwrapping: it
        is acknowledged and never handed off a second time, nor refused.
        """
        one_time = await self.capture("once with a one-time prekey")
        signed_only = await self.capture("once with the signed prekey", one_time=False)
        await self.read_all(2)
        for envelope in (one_time, signed_only):
            header = pager.parse_header(envelope.header)
            await self.replay(envelope, header.message_id.hex())
        self.assertEqual(len(self.bob.events.messages), 2)
        self.assertEqual(self.bob.events.rejected, [])


class GraceClampTests(ForwardSecrecyTestCase):
    """The server's hello cannot make a device keep its replaced signed prekeys longer than MAX_PREKEY_GRACE."""

    def test_grace_clamped(self):
        """Whatever message_expiry the hello says, the grace is at most MAX_PREKEY_GRACE and never negative."""
        limits = self.bob.limits
        default = pager.Limits.message_expiry + pager.SEEN_MARGIN
        for expiry, grace in [(1e12, pager.MAX_PREKEY_GRACE), (float("inf"), default), (float("nan"), default),
                              (-5, default), (True, default), ("30", default), (None, default),
                              (0, pager.SEEN_MARGIN), (3600, 3600 + pager.SEEN_MARGIN),
                              (pager.Limits.message_expiry, default)]:
            limits["message_expiry"] = expiry
            self.assertEqual(self.bob.prekey_grace, grace, expiry)
        self.assertEqual(pager.MAX_PREKEY_GRACE, 30 * pager.DAY + pager.SEEN_MARGIN)

    async def test_grace_from_hostile_hello_capped(self):
        """
        bob's server says message_expiry = 1e12 in its hello: bob's client warns, keeps the replaced signed prekey
        no longer than MAX_PREKEY_GRACE, and a thief who steals everything 56 days later opens nothing.
        """
        from twisted.logger import Logger
        events = []
        self.bob.log = Logger(observer=events.append)
        signed_only = await self.capture("read, signed prekey only", one_time=False)
        await self.read_all(1)
        self.bob.limits["message_expiry"] = 1e12  # the hello's value, as a hostile server sends it
        self.assertEqual(self.bob.prekey_grace, pager.MAX_PREKEY_GRACE)
        for _ in range(8):
            self.clock.offset += pager.PREKEY_ROTATION
            await self.bob.maintain_prekeys()
        warned = [e for e in events if "message expiry" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)  # once, not at every look
        await self.bob.close()
        thief = await self.steal()
        self.assertRaises(pager.PrekeyUnavailable, thief.open, signed_only, key("alice").public_key())


class ReplayWindowTests(ForwardSecrecyTestCase):
    """Replays of messages sealed to the signed prekey alone, once the duplicate store may have forgotten them."""

    def push(self, client, envelope, msg):
        """The message handed to C{client} again, as a hostile server (or a restored database) would."""
        incoming = pager._Incoming(msg, "alice", self.clock.seconds(), envelope.header, envelope.chunks,
                                   envelope.signature)
        real = client.protocol.request
        client.protocol.request = lambda kind, **f: (defer.succeed({}) if kind in ("ack", "reject")
                                                     else real(kind, **f))
        return client._handle_message(incoming)

    def test_seen_keep_bounds(self):
        """The duplicate store's window: never below the default, nor below the grace plus a prekey's lifetime."""
        default = pager.Limits.message_expiry + pager.SEEN_MARGIN
        for expiry in (0, -1, float("nan"), float("-inf"), 1e12, True, None, 3600, pager.Limits.message_expiry):
            keep = pager.seen_keep({"message_expiry": expiry})
            self.assertGreaterEqual(keep, default, expiry)
            self.assertGreaterEqual(keep, pager.prekey_grace({"message_expiry": expiry}) + pager.PREKEY_LIFETIME)
            self.assertLessEqual(keep, pager.MAX_PREKEY_GRACE + pager.PREKEY_LIFETIME)
        self.assertEqual(pager.seen_keep({}), default + pager.PREKEY_LIFETIME)

    async def test_replay_after_short_seen_window(self):
        """
        The hello says message_expiry = 0; two days later the server replays a message bob read that used the
        signed prekey alone (still kept): the duplicate store, whose window was clamped, recognises it.
        """
        env = await self.capture("pay bob 100", one_time=False)
        await self.read_all(1)
        self.clock.offset += 2 * pager.DAY
        # bob's next session: the store opened as pager-cli opens it, and with the hello's value as it was
        await self.store.open(self.clock.seconds(), pager.seen_keep({"message_expiry": 0}))
        await self.store.open(self.clock.seconds(), 0 + pager.SEEN_MARGIN)
        self.store._handed.clear()  # a new process
        await self.push(self.bob, env, "ab" * 16)
        self.assertEqual([bytes(m.plaintext) for m in self.bob.events.messages], [b"pay bob 100"])
        self.assertEqual(self.bob.events.rejected, [])

    async def offline(self, days):
        """bob reads a message sealed to his signed prekey alone, is offline C{days}, then logs in again."""
        env = await self.capture("pay bob 100", one_time=False)
        await self.read_all(1)
        await self.bob.close()
        self.clock.offset += days * pager.DAY
        store = pager.LocalStore(os.path.join(self.state_dir, pager.LOCAL_DB_NAME), self.clock)
        await store.open(self.clock.seconds())  # the default window
        self.addCleanup(lambda: store.pool.running and store.close())
        bob = await self.client(seen=store, pins=store)
        await bob.login("bob", token("bob"), key("bob"))
        await self.push(bob, env, "cd" * 16)
        return bob

    async def test_replay_after_forty_days_offline(self):
        """With honest limits, a device offline 40 days still remembers the message: the replay is not shown."""
        bob = await self.offline(40)
        self.assertEqual((bob.events.messages, bob.events.rejected, bob.failures), ([], [], []))

    async def test_replay_older_than_seen_window_refused(self):
        """
        Offline longer than the duplicate store's window (the message's seen row is gone, its signed prekey still
        kept: replaced only now): the message's signed time is older than the window, so it is refused with a
        reason and not shown.
        """
        bob = await self.offline(50)
        self.assertEqual(bob.events.messages, [])
        [(_, sender, error)] = bob.events.rejected
        self.assertEqual(sender, "alice")
        self.assertIsInstance(error, pager.StaleMessage)
        self.assertIn("replay", error.message)


class HistoryTransactionTests(ForwardSecrecyTestCase):
    """The history entry, the seen row and the one-time prekey's deletion are one transaction."""

    async def test_crash_between_leaves_nothing_half_done(self):
        """
        The transaction that stores a message fails (the machine stops): neither its history entry nor its seen
        row is on disk, and its one-time prekey is still there to open it; redelivered, it is stored once, with
        its one-time prekey gone.
        """
        device = pager.device_id(key("bob"))
        shown = []

        async def record(message):  # what the chat does: show, then record in the history
            shown.append(bytes(message.plaintext))
            await self.store.add_history(pager.HistoryEntry(
                message.timestamp, "in", message.sender, message.message_id.hex(), message.content_type,
                message.filename, bytes(message.plaintext), message.key_status))
        self.bob.on_message = record
        real = pager._seen_add_txn

        def crash(txn, *args, **kwargs):
            real(txn, *args, **kwargs)
            raise sqlite3.OperationalError("disk I/O error")  # rolled back: as if the machine had stopped here
        self.patch(pager, "_seen_add_txn", crash)
        envelope = await self.capture("once")
        opk_id = pager.parse_header(envelope.header).entry("bob", device).opk_id
        await self.wait_for(lambda: self.bob.failures, "the store's transaction to fail")
        self.assertEqual(shown, [b"once"])
        self.assertEqual(await self.store.history("alice"), [])
        self.assertIsNotNone((await self.store.prekey_privates(device, 0, opk_id))[1])
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.patch(pager, "_seen_add_txn", real)
        self.store._handed.clear()  # the process that failed is gone
        await self.replay(envelope, pager.parse_header(envelope.header).message_id.hex())
        self.assertEqual([bytes(e.body) for e in await self.store.history("alice")], [b"once"])
        self.assertIsNone((await self.store.prekey_privates(device, 0, opk_id))[1])
        self.assertEqual(self.bob.events.rejected, [])
