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

from twisted.internet import reactor

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


class ForwardSecrecyTests(E2ETestCase):
    """Messages bob read stay closed to whoever steals all of bob's keys and state after the grace period."""

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

    async def replay(self, envelope, msg_id):
        """The message pushed to bob again, as a hostile server (or a replayed connection) would."""
        self.bob.frame_received({"type": "message", "msg": msg_id, "from": "alice",
                                 "header": pager.b64(envelope.header),
                                 "chunks": [pager.b64(c) for c in envelope.chunks],
                                 "signature": pager.b64(envelope.signature)})
        await self.wait_for(lambda: self.bob.idle, "bob to handle the replay")

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
