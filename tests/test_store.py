"""
Tests for pager's Store section: the SQLite database behind the server, driven through the real adbapi pool.
"""

import os
import sqlite3

from twisted.internet.defer import Deferred
from twisted.trial import unittest

import pager

NOW = 1_700_000_000.0
LIMITS = pager.Limits()

_KEYS = []


def _keys():
    """Two RSA keys (alice, bob), generated once for the whole module."""
    if not _KEYS:
        _KEYS.extend(pager.generate_private_key() for _ in range(2))
    return _KEYS


# The schema of pager 0.2 (schema version 2), as it was: the migration tests start from it.
SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    token_salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    key_set_at REAL NOT NULL,
    registered_at REAL NOT NULL,
    recovered_at REAL,
    pending_count INTEGER NOT NULL DEFAULT 0,
    pending_bytes INTEGER NOT NULL DEFAULT 0,
    sent_count INTEGER NOT NULL DEFAULT 0,
    sent_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    header BLOB NOT NULL,
    signature BLOB,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    accepted_at REAL,
    expires_at REAL,
    ord INTEGER UNIQUE,
    reserved TEXT
);
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (seq, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    recipient TEXT NOT NULL,
    ord INTEGER NOT NULL,
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    PRIMARY KEY (recipient, ord)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries(seq);
CREATE INDEX IF NOT EXISTS messages_expiry ON messages(expires_at);
CREATE TABLE IF NOT EXISTS receipts (
    rid INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    peer TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_user ON receipts(user, rid);
CREATE TABLE IF NOT EXISTS invites (
    code_hash BLOB PRIMARY KEY,
    created_at REAL NOT NULL,
    used_by TEXT,
    used_at REAL
);
"""


def _msg_id(n):
    return n.to_bytes(pager.MESSAGE_ID_SIZE, "big")


class StoreTests(unittest.TestCase):
    """
    The server's database: users, messages with their chunks and deliveries, receipts, and what survives a
    restart.
    """

    def setUp(self):
        self.path = self.mktemp()

    async def open_store(self, path=None):
        """A Store on C{path} (this test's database by default), opened, closed at cleanup if still open."""
        store = pager.Store(path or self.path)
        self.addCleanup(lambda: store.pool.running and store.close())
        await store.open()
        return store

    async def reopen(self, store):
        """Close C{store} and open a new Store on the same file, as a restarted server would."""
        store.close()
        return await self.open_store(store.path)

    async def add_users(self, store, *names):
        for name in names:
            await store.add_user(name, "PEM of " + name, b"fp-" + name.encode(), b"s" * 16, b"h" * 32, NOW)

    async def accept(self, store, n, sender, recipients, chunks=(b"chunk-0", b"chunk-1"), limits=LIMITS, now=NOW):
        """Accept message number C{n} whole; returns C{(seq, accepted_at, duplicate)}."""
        size = sum(len(c) for c in chunks)
        seq, accepted_at, duplicate, _ = await store.accept_message(
            _msg_id(n), sender, b"header-%d" % n, b"signature-%d" % n, size, list(chunks), sorted(recipients), now,
            limits)
        return seq, accepted_at, duplicate

    def query(self, store, sql, *args):
        """Rows of a read-only query, run on the store's own pool."""
        return store.pool.runInteraction(lambda txn: txn.execute(sql, args).fetchall())

    # -- schema --

    async def test_server_id_stable_across_reopen(self):
        """open() creates the schema and a server id, and a reopened database gives the same id."""
        store = pager.Store(self.path)
        self.addCleanup(lambda: store.pool.running and store.close())
        first = await store.open()
        self.assertIsInstance(first, str)
        self.assertEqual(len(first), 32)
        store.close()
        second = await (await self.open_store()).open()
        self.assertEqual(first, second)

    async def test_server_ids_differ_between_databases(self):
        """Two fresh databases get different server ids."""
        a = await (await self.open_store(self.mktemp())).open()
        b = await (await self.open_store(self.mktemp())).open()
        self.assertNotEqual(a, b)

    async def test_newer_schema_refused(self):
        """A database whose schema_version is newer than this pager's makes open() fail with StoreError."""
        store = await self.open_store()
        store.close()
        conn = sqlite3.connect(self.path)
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(pager.SCHEMA_VERSION + 1),))
        conn.close()
        newer = pager.Store(self.path)
        self.addCleanup(newer.close)
        with self.assertRaises(pager.StoreError) as caught:
            await newer.open()
        self.assertIn(str(pager.SCHEMA_VERSION + 1), caught.exception.message)

    async def test_wal_and_synchronous_full(self):
        """The pool's connection uses WAL journaling and synchronous=FULL."""
        store = await self.open_store()
        self.assertEqual(await self.query(store, "PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(await self.query(store, "PRAGMA synchronous"), [(2,)])  # 2 is FULL

    async def assertNoOrphans(self, store):
        """Every chunk belongs to a message, every delivery to a stored message."""
        self.assertEqual(await self.query(
            store, "SELECT COUNT(*) FROM chunks WHERE seq NOT IN (SELECT seq FROM messages)"), [(0,)])
        self.assertEqual(await self.query(
            store, "SELECT COUNT(*) FROM deliveries WHERE seq NOT IN (SELECT seq FROM messages)"), [(0,)])

    async def test_wal_persists_in_file(self):
        """The database file itself is left in WAL mode, seen by a plain sqlite3 connection after close."""
        store = await self.open_store()
        store.close()
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    # -- users --

    async def test_add_and_get_user(self):
        """add_user stores every field; get_user returns them with zero pending counters."""
        store = await self.open_store()
        await store.add_user("alice", "PEM", b"fingerprint", b"salt" * 4, b"hash" * 8, NOW)
        record = await store.get_user("alice")
        self.assertEqual(record.name, "alice")
        self.assertEqual(record.public_key, "PEM")
        self.assertEqual(bytes(record.fingerprint), b"fingerprint")
        self.assertEqual(bytes(record.token_salt), b"salt" * 4)
        self.assertEqual(bytes(record.token_hash), b"hash" * 8)
        self.assertEqual((record.key_set_at, record.registered_at, record.recovered_at), (NOW, NOW, None))
        self.assertEqual((record.pending_count, record.pending_bytes), (0, 0))
        self.assertIsNone(await store.get_user("bob"))

    async def test_user_names_sorted(self):
        """user_names lists every registered user, sorted."""
        store = await self.open_store()
        await self.add_users(store, "carol", "alice", "bob")
        self.assertEqual(await store.user_names(), ["alice", "bob", "carol"])

    async def test_duplicate_user(self):
        """Adding a name twice raises UserExists naming it, and keeps the first record."""
        store = await self.open_store()
        await store.add_user("alice", "PEM one", b"fp1", b"s" * 16, b"h" * 32, NOW)
        with self.assertRaises(pager.UserExists) as caught:
            await store.add_user("alice", "PEM two", b"fp2", b"s" * 16, b"h" * 32, NOW + 1)
        self.assertIn("alice", caught.exception.message)
        self.assertEqual((await store.get_user("alice")).public_key, "PEM one")

    # -- messages --

    async def test_accepted_message_survives_reopen(self):
        """A message, its chunks and its deliveries are still there after the database is closed and reopened."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        seq, accepted_at, duplicate = await self.accept(store, 1, "alice", ["bob", "carol"])
        self.assertEqual((accepted_at, duplicate), (NOW, False))
        store = await self.reopen(store)
        for user in ("bob", "carol"):
            [message] = await store.pending(user, 0)
            self.assertEqual(
                (message.seq, message.msg_id, message.sender, message.header, message.signature, message.size,
                 message.chunk_count, message.accepted_at, message.chunks),
                (seq, _msg_id(1), "alice", b"header-1", b"signature-1", 14, 2, NOW, [b"chunk-0", b"chunk-1"]))
            record = await store.get_user(user)
            self.assertEqual((record.pending_count, record.pending_bytes), (1, 14))
        self.assertEqual(await store.chunks(seq, 1, 5), [b"chunk-1"])
        self.assertEqual(await self.query(store, "SELECT recipient FROM deliveries ORDER BY recipient"),
                         [("bob",), ("carol",)])

    async def test_accept_duplicate(self):
        """Accepting the same message id from the same sender again answers duplicate and stores nothing more."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        seq, _, _ = await self.accept(store, 1, "alice", ["bob"])
        again = await self.accept(store, 1, "alice", ["bob"], now=NOW + 5)
        self.assertEqual(again, (seq, NOW, True))
        self.assertEqual(len(await store.pending("bob", 0)), 1)
        self.assertEqual((await store.get_user("bob")).pending_count, 1)

    async def test_accept_taken_id_other_sender(self):
        """A message id already used by another sender is refused with BadRequest."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        await self.accept(store, 1, "alice", ["bob"])
        with self.assertRaises(pager.BadRequest):
            await self.accept(store, 1, "carol", ["bob"])

    async def test_large_message_pending_without_chunks(self):
        """pending() leaves out the chunks of a message larger than inline_bytes; chunks() reads them."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        seq, _, _ = await self.accept(store, 1, "alice", ["bob"], chunks=[b"a" * 100, b"b" * 100])
        [message] = await store.pending("bob", 0, inline_bytes=150)
        self.assertIsNone(message.chunks)
        self.assertEqual(message.chunk_count, 2)
        self.assertEqual(await store.chunks(seq, 0, 2), [b"a" * 100, b"b" * 100])

    async def test_ack_only_own_delivery(self):
        """
        An ack deletes only the acking recipient's delivery; the message row goes with the last ack, and every
        recipient's pending counters are back to zero.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        seq, _, _ = await self.accept(store, 1, "alice", ["bob", "carol"])

        sender, receipt = await store.ack("bob", _msg_id(1), "delivered", "", NOW + 1)
        self.assertEqual(sender, "alice")
        self.assertEqual((receipt.msg_id, receipt.peer, receipt.status, receipt.reason, receipt.at),
                         (_msg_id(1), "bob", "delivered", "", NOW + 1))
        self.assertEqual(await store.pending("bob", 0), [])
        self.assertEqual([m.seq for m in await store.pending("carol", 0)], [seq])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(1,)])
        bob = await store.get_user("bob")
        self.assertEqual((bob.pending_count, bob.pending_bytes), (0, 0))

        with self.assertRaises(pager.UnknownMessage):
            await store.ack("bob", _msg_id(1), "delivered", "", NOW + 2)

        await store.ack("carol", _msg_id(1), "delivered", "", NOW + 3)
        self.assertEqual(await store.pending("carol", 0), [])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(0,)])
        for name in ("alice", "bob", "carol"):
            record = await store.get_user(name)
            self.assertEqual((record.pending_count, record.pending_bytes), (0, 0), name)

    async def test_ack_many(self):
        """
        ack_many() settles a list of messages: it deletes only the acking user's deliveries of the ids that are pending for them,
        reports the others as unknown, stores one receipt per message in the order asked, and drops a message with
        its chunks once its last delivery is gone.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        for n in range(1, 6):
            await self.accept(store, n, "alice" if n % 2 else "carol", ["bob"] if n != 3 else ["bob", "carol"])
        asked = [_msg_id(4), _msg_id(1), _msg_id(9), _msg_id(3), _msg_id(1)]  # 9 was never sent; 1 twice
        receipts, unknown, _ = await store.ack_many("bob", asked, None, NOW + 1)
        self.assertEqual(unknown, [_msg_id(9)])
        self.assertEqual([(sender, r.msg_id, r.peer, r.status) for sender, r in receipts],
                         [("carol", _msg_id(4), "bob", "delivered"), ("alice", _msg_id(1), "bob", "delivered"),
                          ("alice", _msg_id(3), "bob", "delivered")])
        self.assertEqual([r.rid for _, r in receipts], sorted(r.rid for _, r in receipts))
        self.assertEqual([m.msg_id for m in await store.pending("bob", 0)], [_msg_id(2), _msg_id(5)])
        self.assertEqual([m.msg_id for m in await store.pending("carol", 0)], [_msg_id(3)])  # carol's own delivery
        self.assertEqual(sorted(r[0] for r in await self.query(store, "SELECT msg_id FROM messages")),
                         sorted([_msg_id(2), _msg_id(3), _msg_id(5)]))
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(6,)])
        await self.assertNoOrphans(store)
        bob = await store.get_user("bob")
        self.assertEqual((bob.pending_count, bob.pending_bytes), (2, 28))
        # Nobody else can settle bob's deliveries, and settling them again finds nothing.
        self.assertEqual(await store.ack_many("alice", [_msg_id(2)], None, NOW), ([], [_msg_id(2)], []))
        self.assertEqual(await store.ack_many("bob", [_msg_id(4)], None, NOW), ([], [_msg_id(4)], []))
        self.assertEqual(len(await store.pending_receipts("alice", 0)), 2)
        self.assertEqual(len(await store.pending_receipts("carol", 0)), 1)

    async def test_ack_many_paged(self):
        """
        A list longer than one query's page (1,000 ids, queried 500 at a time) settles whole, its receipts in
        order; then one call dismisses them all and reports an id that was never stored.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        for n in range(1, 1001):
            await self.accept(store, n, "alice", ["bob"], chunks=[b"c"])
        receipts, unknown, _ = await store.ack_many("bob", [_msg_id(n) for n in range(1, 1001)], None, NOW)
        self.assertEqual(unknown, [])
        self.assertEqual([r.msg_id for _, r in receipts], [_msg_id(n) for n in range(1, 1001)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(0,)])
        stored = await store.pending_receipts("alice", 0, limit=2000)
        self.assertEqual([r.rid for r in stored], [r.rid for _, r in receipts])
        self.assertEqual(await store.ack_many("alice", None, [r.rid for r in stored] + [10 ** 9], NOW),
                         ([], [], [10 ** 9]))
        self.assertEqual(await store.pending_receipts("alice", 0), [])

    async def test_ack_by_non_recipient(self):
        """A user who is not a recipient cannot acknowledge (and so delete) someone else's delivery."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "mallory")
        await self.accept(store, 1, "alice", ["bob"])
        with self.assertRaises(pager.UnknownMessage):
            await store.ack("mallory", _msg_id(1), "delivered", "", NOW)
        with self.assertRaises(pager.UnknownMessage):
            await store.ack("alice", _msg_id(1), "delivered", "", NOW)
        self.assertEqual(len(await store.pending("bob", 0)), 1)

    async def test_unacked_pending_after_reopen_in_order(self):
        """Unacknowledged messages come back from pending() after a reopen, in the order they were accepted."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        # Interleave senders and ids so that neither id nor sender order matches acceptance order.
        await self.accept(store, 30, "carol", ["bob"])
        await self.accept(store, 10, "alice", ["bob"])
        await self.accept(store, 20, "carol", ["bob"])
        await self.accept(store, 5, "alice", ["bob"])
        await store.ack("bob", _msg_id(20), "delivered", "", NOW)
        store = await self.reopen(store)
        pending = await store.pending("bob", 0)
        self.assertEqual([m.msg_id for m in pending], [_msg_id(30), _msg_id(10), _msg_id(5)])
        self.assertEqual([m.seq for m in pending], sorted(m.seq for m in pending))
        after = await store.pending("bob", pending[0].ord, limit=1)
        self.assertEqual([m.msg_id for m in after], [_msg_id(10)])

    async def test_incomplete_upload_dropped_at_open(self):
        """An upload begun but never accepted, and its chunks, are gone after the next open()."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        await self.accept(store, 1, "alice", ["bob"])
        seq, duplicate, _ = await store.begin_upload(_msg_id(2), "alice", b"header-2", 1000, ["bob"], pager.Limits())
        self.assertFalse(duplicate)
        await store.add_chunks(seq, 0, [b"x" * 10, b"y" * 10])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks WHERE seq = ?", seq), [(2,)])
        self.assertEqual([m.msg_id for m in await store.pending("bob", 0)], [_msg_id(1)])

        store = await self.reopen(store)
        self.assertEqual(await self.query(store, "SELECT msg_id FROM messages"), [(_msg_id(1),)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks WHERE seq = ?", seq), [(0,)])
        # The id is free again: the sender can upload it from scratch.
        self.assertEqual((await self.accept(store, 2, "alice", ["bob"]))[2], False)

    async def test_upload_dropped_while_finishing(self):
        """
        An upload dropped (its connection closed) while its last frame was on the way is not accepted after all:
        its chunks cannot be added and its acceptance is refused, leaving no delivery and no quota counted.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        seq, _, _ = await store.begin_upload(_msg_id(2), "alice", b"header-2", 5000, ["bob"], pager.Limits())
        await store.add_chunks(seq, 0, [b"x" * 10])
        await store.abort_upload(seq)
        with self.assertRaises(pager.BadRequest):
            await store.add_chunks(seq, 1, [b"y" * 10])
        with self.assertRaises(pager.BadRequest):
            await store.accept_message(_msg_id(2), "alice", b"header-2", b"sig", 5000, None, ["bob"], NOW, LIMITS,
                                       seq)
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM deliveries"), [(0,)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(0,)])
        bob = await store.get_user("bob")
        self.assertEqual((bob.pending_count, bob.pending_bytes), (0, 0))

    async def test_pending_page_bytes(self):
        """A page of pending messages ends once it holds page_bytes of them, but always holds at least one."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        for n in range(1, 6):
            await self.accept(store, n, "alice", ["bob"], chunks=[b"c" * 1000])
        page = await store.pool.runInteraction(pager.pending_txn, "bob", 0, 100, 48 * 1024, 2500)
        self.assertEqual([m.msg_id for m in page], [_msg_id(1), _msg_id(2)])
        page = await store.pool.runInteraction(pager.pending_txn, "bob", 0, 100, 48 * 1024, 10)
        self.assertEqual([m.msg_id for m in page], [_msg_id(1)])
        self.assertEqual(page[0].chunks, [b"c" * 1000])

    async def test_abort_upload(self):
        """abort_upload() drops an unfinished upload with its chunks, and never an accepted message."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        accepted, _, _ = await self.accept(store, 1, "alice", ["bob"])
        seq, _, _ = await store.begin_upload(_msg_id(2), "alice", b"header-2", 1000, ["bob"], pager.Limits())
        await store.add_chunks(seq, 0, [b"x" * 10])
        await store.abort_upload(seq)
        await store.abort_upload(accepted)
        self.assertEqual(await self.query(store, "SELECT seq FROM messages"), [(accepted,)])
        self.assertEqual(await self.query(store, "SELECT seq, COUNT(*) FROM chunks GROUP BY seq"), [(accepted, 2)])
        await self.assertNoOrphans(store)

    async def test_upload_then_accept(self):
        """An upload begun, given chunks in pieces, then accepted, is one pending message with all its chunks."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        seq, _, _ = await store.begin_upload(_msg_id(7), "alice", b"header-7", 6, ["bob"], pager.Limits())
        await store.add_chunks(seq, 0, [b"ab"])
        await store.add_chunks(seq, 1, [b"cd", b"ef"])
        result = await store.accept_message(_msg_id(7), "alice", b"header-7", b"sig", 6, None, ["bob"], NOW, LIMITS,
                                            seq=seq)
        self.assertEqual(result[:3], (seq, NOW, False))
        self.assertIsInstance(result[3], int)
        store = await self.reopen(store)
        [message] = await store.pending("bob", 0)
        self.assertEqual((message.chunk_count, message.chunks, message.signature), (3, [b"ab", b"cd", b"ef"], b"sig"))

    async def test_upload_reservation_released_at_open(self):
        """An upload left open by a stopped server gives its reservation back at the next open()."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        await store.begin_upload(_msg_id(2), "alice", b"header-2", 1000, ["bob"], pager.Limits())
        counts = "SELECT name, pending_count, pending_bytes, sent_count, sent_bytes FROM users ORDER BY name"
        self.assertEqual(await self.query(store, counts), [("alice", 0, 0, 1, 1000), ("bob", 1, 1000, 0, 0)])
        self.assertEqual(await self.query(store, "SELECT value FROM counters WHERE name = 'reserved'"), [(1000,)])
        store = await self.reopen(store)
        self.assertEqual(await self.query(store, counts), [("alice", 0, 0, 0, 0), ("bob", 0, 0, 0, 0)])
        self.assertEqual(await self.query(store, "SELECT value FROM counters WHERE name = 'reserved'"), [(0,)])

    async def test_file_shrinks_after_ack(self):
        """
        A new database uses incremental auto-vacuum: once a 16 MiB message is acknowledged, reclaiming (as the
        expiry loop does) gives its space back and the file shrinks to about what it was.
        """
        store = await self.open_store()
        self.assertEqual(await self.query(store, "PRAGMA auto_vacuum"), [(2,)])
        await self.add_users(store, "alice", "bob")
        await store.checkpoint()
        before = os.path.getsize(store.path)
        chunks = [os.urandom(65536) for _ in range(256)]
        await self.accept(store, 1, "alice", ["bob"], chunks=chunks, limits=pager.Limits(max_pending_bytes=2 ** 30))
        await store.checkpoint()
        self.assertGreater(os.path.getsize(store.path), before + 16 * 1024 * 1024)
        await store.ack("bob", _msg_id(1), "delivered", "", NOW)
        factory = pager.PagerServerFactory(store)
        await factory.reclaim()
        self.assertLess(os.path.getsize(store.path), before + 1024 * 1024)
        self.assertEqual(await self.query(store, "PRAGMA freelist_count"), [(0,)])

    async def test_server_id_checked_at_open(self):
        """A database whose server id is not 32 hex digits is refused at open, with one sentence."""
        store = await self.open_store()
        await self.query(store, "UPDATE meta SET value = 'abc' WHERE key = 'server_id'")
        store.close()
        with self.assertRaises(pager.StoreError) as caught:
            await self.open_store()
        self.assertIn("server id", caught.exception.message)
        self.assertIn("32 hexadecimal digits", caught.exception.message)

    async def test_migration_from_schema_1(self):
        """
        A database written by the previous schema (1) is brought to the current one at open: the new columns and
        counters exist, each sender's stored messages are counted, its unfinished uploads are dropped, and it gets
        incremental auto-vacuum.
        """
        old_schema = (SCHEMA_2.replace(",\n    sent_count INTEGER NOT NULL DEFAULT 0", "")
                      .replace(",\n    sent_bytes INTEGER NOT NULL DEFAULT 0", "")
                      .replace(",\n    reserved TEXT", ""))
        self.assertNotIn("reserved", old_schema)
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.executescript(old_schema)
        conn.executescript(
            "INSERT INTO meta VALUES ('schema_version', '1');"
            " INSERT INTO meta VALUES ('server_id', '0123456789abcdef0123456789abcdef');"
            "INSERT INTO counters VALUES ('ord', 2);"
            "INSERT INTO users (name, public_key, fingerprint, token_salt, token_hash, key_set_at, registered_at,"
            " pending_count, pending_bytes) VALUES ('alice', 'p', x'00', x'00', x'00', 0, 0, 0, 0),"
            " ('bob', 'p', x'01', x'00', x'00', 0, 0, 2, 30);"
            "INSERT INTO messages (seq, msg_id, sender, header, signature, size, chunk_count, accepted_at,"
            " expires_at, ord) VALUES (1, x'01', 'alice', x'', x'', 10, 1, 1, 9e9, 1),"
            " (2, x'02', 'alice', x'', x'', 20, 1, 1, 9e9, 2), (3, x'03', 'alice', x'', NULL, 99, 0, NULL, NULL, NULL);"
            "INSERT INTO deliveries VALUES ('bob', 1, 1), ('bob', 2, 2);")
        self.assertEqual(conn.execute("PRAGMA auto_vacuum").fetchone(), (0,))
        conn.close()
        store = await self.open_store()
        self.assertEqual(await self.query(store, "SELECT value FROM meta WHERE key = 'schema_version'"),
                         [(str(pager.SCHEMA_VERSION),)])
        self.assertEqual(await self.query(store, "SELECT name, sent_count, sent_bytes, pending_count, pending_bytes"
                                                 " FROM users ORDER BY name"),
                         [("alice", 2, 30, 0, 0), ("bob", 0, 0, 2, 30)])
        self.assertEqual(await self.query(store, "SELECT seq FROM messages ORDER BY seq"), [(1,), (2,)])
        self.assertEqual(await self.query(store, "PRAGMA auto_vacuum"), [(2,)])
        await store.ack("bob", b"\x01", "delivered", "", NOW)
        self.assertEqual(await self.query(store, "SELECT sent_count, sent_bytes FROM users WHERE name = 'alice'"),
                         [(1, 20)])

    # -- quotas --

    async def test_quota_all_or_nothing(self):
        """
        A message one recipient has no room for raises QuotaExceeded naming that recipient, and is stored for no
        one.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        limits = pager.Limits(max_pending_messages=1)
        await self.accept(store, 1, "alice", ["carol"], limits=limits)
        with self.assertRaises(pager.QuotaExceeded) as caught:
            await self.accept(store, 2, "alice", ["bob", "carol"], limits=limits)
        self.assertIn("carol", caught.exception.message)
        self.assertNotIn("bob", caught.exception.message)
        self.assertEqual(await store.pending("bob", 0), [])
        self.assertEqual([m.msg_id for m in await store.pending("carol", 0)], [_msg_id(1)])
        self.assertEqual(await self.query(store, "SELECT msg_id FROM messages"), [(_msg_id(1),)])
        bob = await store.get_user("bob")
        self.assertEqual((bob.pending_count, bob.pending_bytes), (0, 0))
        carol = await store.get_user("carol")
        self.assertEqual((carol.pending_count, carol.pending_bytes), (1, 14))

    async def test_database_file_private(self):
        """The server's database file is created 0600 even under umask 0, and its WAL files follow it."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        store = await self.open_store()
        await self.add_users(store, "alice")
        for suffix in ("", "-wal"):
            self.assertEqual(os.stat(store.path + suffix).st_mode & 0o777, 0o600, suffix)

    def test_secure_delete_whatever_the_build(self):
        """A connection whose SQLite build leaves secure_delete off gets it on from prepare_connection."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        conn.execute("PRAGMA secure_delete=OFF")
        pager.prepare_connection(conn)
        self.assertEqual(conn.execute("PRAGMA secure_delete").fetchone(), (1,))

    async def test_page_size(self):
        """
        A new database has pages of PAGE_SIZE; one made with 4 KiB pages before keeps them, and works: a message
        is accepted and read back after the reopen.
        """
        store = await self.open_store()
        self.assertEqual(await self.query(store, "PRAGMA page_size"), [(pager.PAGE_SIZE,)])
        self.assertNotEqual(pager.PAGE_SIZE, 4096)
        old = self.mktemp()
        conn = sqlite3.connect(old)
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
        store = await self.open_store(old)
        await self.add_users(store, "alice", "bob")
        await self.accept(store, 1, "alice", ["bob"])
        store = await self.reopen(store)
        self.assertEqual(await self.query(store, "PRAGMA page_size"), [(4096,)])
        self.assertEqual([m.msg_id for m in await store.pending("bob", 0)], [_msg_id(1)])

    async def test_delivered_message_zeroed_on_disk(self):
        """
        Once bob acknowledges a message and the WAL is checkpointed, its header, signature and chunk are in
        neither file of the database: deleted rows are overwritten with zeros, not left in free space.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        chunk = b"chunk-" + os.urandom(16).hex().encode()
        await self.accept(store, 1, "alice", ["bob"], chunks=(chunk,))
        await store.ack("bob", _msg_id(1), "delivered", "", NOW + 1)
        await store.pool.runWithConnection(pager.checkpoint)
        for suffix in ("", "-wal"):
            with open(store.path + suffix, "rb") as f:
                data = f.read()
            for part in (chunk, b"header-1", b"signature-1"):
                self.assertNotIn(part, data, suffix)

    async def test_group_commit_isolates_a_failure(self):
        """
        Operations asked for together commit in one transaction, in order; one that fails (an unknown recipient)
        is refused alone, and the others before and after it are stored.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        asked = [store.accept_message(_msg_id(n), "alice", b"h", b"s", 1, [b"c"], [to], NOW, LIMITS)
                 for n, to in ((1, "bob"), (2, "nobody"), (3, "bob"))]
        self.assertGreater(len(store._queue), 0)  # queued behind the first: they form one batch
        first = await asked[0]
        with self.assertRaises(pager.UnknownUser):
            await asked[1]
        third = await asked[2]
        self.assertLess(first[3], third[3])  # delivery order follows the order asked
        self.assertEqual([m.msg_id for m in await store.pending("bob", 0)], [_msg_id(1), _msg_id(3)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(2,)])
        bob = await store.get_user("bob")
        self.assertEqual((bob.pending_count, bob.pending_bytes), (2, 2))

    async def test_quota_bytes(self):
        """The pending-bytes bound counts too: a message that would pass it raises QuotaExceeded."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        limits = pager.Limits(max_pending_bytes=20)
        await self.accept(store, 1, "alice", ["bob"], limits=limits)  # 14 bytes
        with self.assertRaises(pager.QuotaExceeded) as caught:
            await self.accept(store, 2, "alice", ["bob"], limits=limits)
        self.assertIn("bob", caught.exception.message)
        self.assertEqual(len(await store.pending("bob", 0)), 1)

    async def test_unknown_recipient_all_or_nothing(self):
        """A message to an unknown user raises UnknownUser naming that user, and is stored for no one."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        with self.assertRaises(pager.UnknownUser) as caught:
            await self.accept(store, 1, "alice", ["bob", "dave"])
        self.assertIn("dave", caught.exception.message)
        self.assertNotIn("bob", caught.exception.message)
        self.assertEqual(await store.pending("bob", 0), [])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(0,)])
        self.assertEqual((await store.get_user("bob")).pending_count, 0)

    async def test_upload_checks_recipients_first(self):
        """
        Beginning a multi-frame upload refuses an unknown or full recipient, naming it, before anything is stored;
        with room for everyone it begins.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        with self.assertRaises(pager.UnknownUser) as caught:
            await store.begin_upload(_msg_id(1), "alice", b"h", 10, ["bob", "zed"], LIMITS)
        self.assertIn("zed", caught.exception.message)
        with self.assertRaises(pager.QuotaExceeded) as caught:
            await store.begin_upload(_msg_id(2), "alice", b"h", 10, ["bob"], pager.Limits(max_pending_bytes=9))
        self.assertIn("bob", caught.exception.message)
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])
        seq, duplicate, _ = await store.begin_upload(_msg_id(3), "alice", b"h", 10, ["alice", "bob"], LIMITS)
        self.assertFalse(duplicate)
        self.assertEqual(await self.query(store, "SELECT seq FROM messages"), [(seq,)])

    # -- expiry and receipts --

    async def test_expire(self):
        """
        expire() drops the deliveries past their expiry time, returns an 'expired' receipt for each sender, and
        leaves younger messages alone.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        limits = pager.Limits(message_expiry=100.0)
        await self.accept(store, 1, "alice", ["bob", "carol"], limits=limits, now=NOW)
        await self.accept(store, 2, "carol", ["bob"], limits=limits, now=NOW + 50)
        self.assertEqual(await store.expire(NOW + 99), [])

        expired = await store.expire(NOW + 101)
        self.assertEqual(sorted((sender, r.peer, r.status, r.msg_id) for sender, r in expired),
                         [("alice", "bob", "expired", _msg_id(1)), ("alice", "carol", "expired", _msg_id(1))])
        for _, receipt in expired:
            self.assertTrue(receipt.reason)
            self.assertEqual(receipt.at, NOW + 101)
        self.assertEqual([m.msg_id for m in await store.pending("bob", 0)], [_msg_id(2)])
        self.assertEqual(await store.pending("carol", 0), [])
        self.assertEqual(await self.query(store, "SELECT msg_id FROM messages"), [(_msg_id(2),)])
        carol = await store.get_user("carol")
        self.assertEqual((carol.pending_count, carol.pending_bytes), (0, 0))
        bob = await store.get_user("bob")
        self.assertEqual((bob.pending_count, bob.pending_bytes), (1, 14))
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(2,)])  # message 2's
        await self.assertNoOrphans(store)
        stored = await store.pending_receipts("alice", 0)
        self.assertEqual(sorted((r.peer, r.status) for r in stored), [("bob", "expired"), ("carol", "expired")])

    async def test_pending_receipts_and_ack_receipt(self):
        """
        Receipts wait for their sender in order; ack_receipt deletes one, only for its owner, and only once.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob", "carol")
        await self.accept(store, 1, "alice", ["bob", "carol"])
        await store.ack("carol", _msg_id(1), "rejected", "bad key", NOW + 1)
        await store.ack("bob", _msg_id(1), "delivered", "", NOW + 2)
        store = await self.reopen(store)

        receipts = await store.pending_receipts("alice", 0)
        self.assertEqual([(r.msg_id, r.peer, r.status, r.reason, r.at) for r in receipts],
                         [(_msg_id(1), "carol", "rejected", "bad key", NOW + 1),
                          (_msg_id(1), "bob", "delivered", "", NOW + 2)])
        self.assertEqual(await store.pending_receipts("bob", 0), [])
        self.assertEqual(await store.pending_receipts("alice", receipts[0].rid), receipts[1:])

        with self.assertRaises(pager.UnknownMessage):
            await store.ack_receipt("bob", receipts[0].rid)
        await store.ack_receipt("alice", receipts[0].rid)
        with self.assertRaises(pager.UnknownMessage):
            await store.ack_receipt("alice", receipts[0].rid)
        self.assertEqual(await store.pending_receipts("alice", 0), receipts[1:])

    async def test_receipt_ids_never_given_twice(self):
        """
        The ids a settle gives its receipts are the ones stored, in the order made, and always larger than any
        given before, even once the newest were acknowledged and deleted and the store reopened: a client's
        cursor over its receipts (after the last id it saw) would otherwise skip a new receipt under an old id.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        for i in range(1, 7):
            await self.accept(store, i, "alice", ["bob"])
        made, _, _ = await store.ack_many("bob", [_msg_id(1), _msg_id(2), _msg_id(3)], None, NOW + 1)
        stored = await store.pending_receipts("alice", 0)
        self.assertEqual([receipt for _, receipt in made], stored)
        self.assertEqual([r.msg_id for r in stored], [_msg_id(1), _msg_id(2), _msg_id(3)])
        self.assertEqual([r.rid for r in stored], sorted({r.rid for r in stored}))
        for receipt in stored:  # the newest included, which AUTOINCREMENT would otherwise give again
            await store.ack_receipt("alice", receipt.rid)
        store = await self.reopen(store)

        _, rejected = await store.ack("bob", _msg_id(4), "rejected", "no", NOW + 2)
        _, delivered = await store.ack("bob", _msg_id(5), "delivered", "", NOW + 3)
        self.assertGreater(rejected.rid, stored[-1].rid)
        self.assertGreater(delivered.rid, rejected.rid)
        self.assertEqual([(r.msg_id, r.status) for r in await store.pending_receipts("alice", stored[-1].rid)],
                         [(_msg_id(4), "rejected"), (_msg_id(5), "delivered")])

    # -- what the file holds --

    async def test_dump_has_no_token_or_plaintext(self):
        """
        The database file, dumped whole, holds neither a user's safetoken nor the plaintext of a stored message,
        as text or as hex.
        """
        alice_key, bob_key = _keys()
        token = "correct-horse-battery-staple-7291"
        plaintext = b"the eagle lands at midnight 4471"
        store = await self.open_store()
        for name, key in (("alice", alice_key), ("bob", bob_key)):
            salt = os.urandom(pager.ARGON2_SALT_SIZE)
            public = key.public_key()
            await store.add_user(name, pager.public_key_pem(public), pager.fingerprint(public), salt,
                                 pager.hash_token(token, salt), NOW)
        envelope = pager.seal(alice_key, "alice", {"bob": bob_key.public_key()}, plaintext)
        await store.accept_message(pager.parse_header(envelope.header).message_id, "alice", envelope.header,
                                   envelope.signature, envelope.size, envelope.chunks, ["bob"], NOW, LIMITS)
        # The envelope really is in there: bob can open what the store gives back.
        [message] = await store.pending("bob", 0)
        opened = pager.open_envelope(pager.Envelope(message.header, message.chunks, message.signature), bob_key,
                                     "bob", alice_key.public_key())
        self.assertEqual(opened.plaintext, plaintext)
        store.close()

        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        dump = "\n".join(conn.iterdump())
        self.assertIn("alice", dump)
        self.assertIn(bytes(message.header).hex().upper()[:64], dump.upper())
        for secret in (token.encode(), plaintext):
            self.assertNotIn(secret.decode(), dump)
            self.assertNotIn(secret.hex(), dump.lower())
        # Nor in the raw files (the database and anything left in its WAL).
        for suffix in ("", "-wal"):
            if os.path.exists(self.path + suffix):
                with open(self.path + suffix, "rb") as f:
                    raw = f.read()
                self.assertNotIn(token.encode(), raw)
                self.assertNotIn(plaintext, raw)


class SubmitTests(unittest.TestCase):
    """Store.submit: the hot path's operations, answered by callbacks when their batch has committed."""

    setUp, open_store, add_users = StoreTests.setUp, StoreTests.open_store, StoreTests.add_users

    async def test_callbacks_in_order_and_isolated(self):
        """
        Each operation's outcome goes to its own callback, in the order asked; an operation that raises gets its
        error alone, and a callback that fails is logged without keeping the batch's other callbacks from running.
        """
        store = await self.open_store()
        await self.add_users(store, "alice")
        told, finished = [], Deferred()

        def broken(result):
            told.append(("broken", result))
            raise RuntimeError("a callback's own bug")

        def failing(txn):
            txn.execute("INSERT INTO meta VALUES ('undone', 'x')")
            raise pager.UnknownUser("no such user")

        store.submit(pager.get_user_txn, ("alice",), broken, told.append)
        store.submit(failing, (), told.append, lambda error: told.append(("failed", error)))
        store.submit(pager.user_names_txn, (), lambda names: (told.append(names), finished.callback(None)),
                     told.append)
        await finished
        self.assertEqual(told[0][0], "broken")
        self.assertEqual(told[0][1].name, "alice")
        self.assertEqual(told[1][0], "failed")
        self.assertIsInstance(told[1][1], pager.UnknownUser)
        self.assertEqual(told[2], ["alice"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(await store.pool.runInteraction(
            lambda txn: txn.execute("SELECT COUNT(*) FROM meta WHERE key = 'undone'").fetchall()), [(0,)])


class LocalHistoryTests(unittest.TestCase):
    """The client's local history, as `history NAME` reads it."""

    async def test_history_name_is_literal(self):
        """
        history("a_b") lists what was exchanged with a_b (alone or among several recipients) and nothing with axb,
        a%b or aab: a name's '_' is not an SQL LIKE wildcard.
        """
        from twisted.internet import reactor
        store = pager.LocalStore(os.path.abspath(self.mktemp()), reactor)
        self.addCleanup(store.close)
        await store.open(1000.0)
        for n, (direction, peer) in enumerate([("in", "a_b"), ("in", "axb"), ("out", "a%b"), ("out", "aab,zed"),
                                              ("out", "axb,carol"), ("out", "carol,a_b"), ("in", "a\\_b")]):
            await store.add_history(pager.HistoryEntry(1000.0 + n, direction, peer, "%032x" % n, "text", "",
                                                       peer.encode(), "sent"))
        self.assertEqual([e.peer for e in await store.history("a_b")], ["a_b", "carol,a_b"])
        self.assertEqual([e.peer for e in await store.history("axb")], ["axb", "axb,carol"])
        self.assertEqual([e.peer for e in await store.history("a%b")], ["a%b"])


class DeviceStoreTests(unittest.TestCase):
    """Schema 3: devices, prekeys and per-device deliveries."""

    setUp = StoreTests.setUp
    open_store, add_users = StoreTests.open_store, StoreTests.add_users
    accept, query = StoreTests.accept, StoreTests.query

    async def test_migration_from_schema_2(self):
        """
        A database of pager 0.2 (schema 2) with a message pending for bob is brought to schema 3 (and on to the
        current one): every user gets its identity device (id: the first half of its key's fingerprint) as a legacy
        device, without certificate, and the pending message waits for bob's identity device, which reads and
        acknowledges it; alice gets her receipt.
        """
        alice, bob = _keys()
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.executescript(SCHEMA_2)
        users = [(name, pager.public_key_pem(k), pager.fingerprint(k)) for name, k in (("alice", alice), ("bob", bob))]
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        conn.execute("INSERT INTO meta VALUES ('server_id', '0123456789abcdef0123456789abcdef')")
        conn.execute("INSERT INTO counters VALUES ('ord', 1)")
        conn.execute("INSERT INTO counters VALUES ('reserved', 0)")
        conn.executemany("INSERT INTO users (name, public_key, fingerprint, token_salt, token_hash, key_set_at,"
                         " registered_at, pending_count, pending_bytes, sent_count, sent_bytes)"
                         " VALUES (?, ?, ?, x'00', x'00', 5, 5, ?, ?, ?, ?)",
                         [users[0] + (0, 0, 1, 12), users[1] + (1, 12, 0, 0)])
        conn.execute("INSERT INTO messages (seq, msg_id, sender, header, signature, size, chunk_count, accepted_at,"
                     " expires_at, ord) VALUES (1, ?, 'alice', x'68', x'73', 12, 1, 1, 9e9, 1)", (_msg_id(1),))
        conn.execute("INSERT INTO chunks VALUES (1, 0, x'00')")
        conn.execute("INSERT INTO deliveries VALUES ('bob', 1, 1)")
        conn.close()
        store = await self.open_store()
        self.assertEqual(await self.query(store, "SELECT value FROM meta WHERE key = 'schema_version'"),
                         [(str(pager.SCHEMA_VERSION),)])
        _, devices = await store.devices("bob")
        self.assertEqual([(d.device_id, d.public_key, d.certificate, d.prekeys) for d in devices],
                         [(pager.device_id(bob), users[1][1], None, False)])
        self.assertEqual(len((await store.devices("alice"))[1]), 1)
        bob_device = pager.device_id(bob)
        self.assertEqual(await store.pending("bob", 0, device=pager.device_id(alice)), [])
        [message] = await store.pending("bob", 0, device=bob_device)
        self.assertEqual((message.msg_id, message.sender), (_msg_id(1), "alice"))
        sender, receipt = await store.ack("bob", _msg_id(1), "delivered", "", NOW, device=bob_device)
        self.assertEqual((sender, receipt.peer, receipt.status), ("alice", "bob", "delivered"))
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(await self.query(store, "SELECT name, pending_count, sent_count FROM users ORDER BY name"),
                         [("alice", 0, 0), ("bob", 0, 0)])

    async def test_migration_from_schema_4(self):
        """
        A database of pager 0.4 (schema 4), whose delivery order came from a counter ahead of the messages'
        sequence, is brought to schema 5: a message accepted after the upgrade comes after the one that waited, the
        waiting one (its chunks in the chunks table) reads and settles as before, and the new one keeps its one
        chunk in its row.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        store.close()
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("ALTER TABLE messages DROP COLUMN line")
        conn.execute("ALTER TABLE messages DROP COLUMN body")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO counters VALUES ('ord', 1000)")
        conn.execute("INSERT INTO messages (seq, msg_id, sender, header, signature, size, chunk_count, accepted_at,"
                     " expires_at, ord) VALUES (7, ?, 'alice', x'68', x'73', 2, 2, ?, 9e12, 1000)", (_msg_id(1), NOW))
        conn.executemany("INSERT INTO chunks VALUES (7, ?, ?)", [(0, b"old-0"), (1, b"old-1")])
        conn.execute("INSERT INTO deliveries (recipient, ord, device, seq) VALUES ('bob', 1000, ?, 7)", (b"d" * 16,))
        conn.execute("UPDATE users SET pending_count = 1, pending_bytes = 2 WHERE name = 'bob'")
        conn.close()
        store = await self.open_store()
        self.assertEqual(await self.query(store, "SELECT value FROM meta WHERE key = 'schema_version'"),
                         [(str(pager.SCHEMA_VERSION),)])
        _, _, _, ord_ = await store.accept_message(_msg_id(2), "alice", b"header", b"signature", 3, [b"new"], ["bob"],
                                                   NOW, LIMITS, targets=[("bob", b"d" * 16, False)])
        self.assertGreater(ord_, 1000)
        old, new = await store.pending("bob", 0)
        self.assertEqual((old.msg_id, old.ord, old.chunks), (_msg_id(1), 1000, [b"old-0", b"old-1"]))
        self.assertEqual((new.msg_id, new.ord, new.chunks), (_msg_id(2), ord_, [b"new"]))
        self.assertEqual(await store.chunks(new.seq, 0, 5), [b"new"])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks WHERE seq = ?", new.seq), [(0,)])
        receipts, settled, _ = await store.ack_upto("bob", b"d" * 16, ord_, None, NOW)
        self.assertEqual([r.msg_id for _, r in receipts], [_msg_id(1), _msg_id(2)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM chunks"), [(0,)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])

    async def test_migration_from_schema_5(self):
        """
        A database of pager 0.5.0 (schema 5) is brought to schema 6: a message that waited, its chunk in its row,
        reads and settles as before, and one accepted after the upgrade is stored as its push line alone.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        store.close()
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("ALTER TABLE messages DROP COLUMN line")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO messages (seq, msg_id, sender, header, signature, size, chunk_count, accepted_at,"
                     " expires_at, body) VALUES (7, ?, 'alice', x'68', x'73', 3, 1, ?, 9e12, x'6f6c64')",
                     (_msg_id(1), NOW))
        conn.execute("INSERT INTO deliveries (recipient, ord, device, seq) VALUES ('bob', 7, ?, 7)", (b"d" * 16,))
        conn.execute("UPDATE users SET pending_count = 1, pending_bytes = 3 WHERE name = 'bob'")
        conn.close()
        store = await self.open_store()
        self.assertEqual(await self.query(store, "SELECT value FROM meta WHERE key = 'schema_version'"),
                         [(str(pager.SCHEMA_VERSION),)])
        tail = pager.push_tail("alice", 3, NOW, b"header", [b"new"], b"signature", 1024 * 1024)
        _, _, _, ord_ = await store.accept_message(_msg_id(2), "alice", b"header", b"signature", 3, [b"new"], ["bob"],
                                                   NOW, LIMITS, targets=[("bob", b"d" * 16, False)], tail=tail)
        self.assertGreater(ord_, 7)
        self.assertEqual(await self.query(store, "SELECT seq, header, body, line FROM messages ORDER BY seq"),
                         [(7, b"h", b"old", None), (ord_, b"", None, tail)])
        old, new = await store.pending("bob", 0)
        self.assertEqual((old.msg_id, old.ord, old.header, old.chunks), (_msg_id(1), 7, b"h", [b"old"]))
        self.assertEqual((new.msg_id, new.ord, new.header, new.signature, new.chunks),
                         (_msg_id(2), ord_, b"header", b"signature", [b"new"]))
        old_push, new_push = await store.pending_pushes("bob", 0, 10, 48 * 1024, 1024 * 1024)
        self.assertEqual((old_push[0], old_push[1].msg_id), (7, _msg_id(1)))
        self.assertEqual(new_push, (ord_, b'{"type":"message","msg":"%s","seq":%d' % (_msg_id(2).hex().encode(), ord_)
                                    + tail))
        receipts, settled, _ = await store.ack_upto("bob", b"d" * 16, ord_, None, NOW)
        self.assertEqual([r.msg_id for _, r in receipts], [_msg_id(1), _msg_id(2)])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM messages"), [(0,)])

    async def test_ack_upto_two_devices(self):
        """
        A cumulative ack settles one device's deliveries by range: the user's receipt is made at the first device's
        ack, in delivery order, none at the second's; a message counts against the user, and is kept, until its
        last device settles it.
        """
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        first, second = b"1" * 16, b"2" * 16
        for n in (1, 2, 3):
            await store.accept_message(_msg_id(n), "alice", b"header", b"signature", 5, [b"chunk"], ["bob"], NOW,
                                       LIMITS, targets=[("bob", first, False), ("bob", second, False)])
        pending = await store.pending("bob", 0, device=first)
        receipts, settled, unknown = await store.ack_upto("bob", first, pending[1].ord, None, NOW)
        self.assertEqual((settled, unknown), (2, []))
        self.assertEqual([(sender, r.msg_id, r.status) for sender, r in receipts],
                         [("alice", _msg_id(1), "delivered"), ("alice", _msg_id(2), "delivered")])
        self.assertEqual([m.msg_id for m in await store.pending("bob", 0, device=first)], [_msg_id(3)])
        self.assertEqual(len(await store.pending("bob", 0, device=second)), 3)
        self.assertEqual(await self.query(store, "SELECT pending_count FROM users WHERE name = 'bob'"), [(3,)])
        receipts, settled, _ = await store.ack_upto("bob", second, pending[0].ord, None, NOW)
        self.assertEqual((receipts, settled), ([], 1))
        self.assertEqual(await self.query(store, "SELECT pending_count FROM users WHERE name = 'bob'"), [(2,)])
        self.assertEqual(await self.query(store, "SELECT msg_id FROM messages ORDER BY seq"),
                         [(_msg_id(2),), (_msg_id(3),)])
        self.assertEqual(await self.query(store, "SELECT sent_count FROM users WHERE name = 'alice'"), [(2,)])

    async def test_one_time_prekey_taken_once(self):
        """bundle_txn deletes the one-time prekey it hands out, in its own transaction: two bundles never share one."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        device = b"fp-alice"
        await store.publish_prekeys("alice", device, (5, b"k" * 32, 0, 100, b"sig"), [(1, b"a" * 32), (2, b"b" * 32)],
                                    pager.MAX_ONE_TIME_PREKEYS)
        taken = []
        for _ in range(3):
            bundles, low = await store.bundle(["alice"], "bob", b"fp-bob")
            [(user, _, [(record, signed, one_time)])] = bundles
            self.assertEqual((user, record.device_id, signed[0]), ("alice", device, 5))
            taken.append(one_time)
        self.assertEqual(taken, [(1, b"a" * 32), (2, b"b" * 32), None])

    async def test_rekey_replaces_devices(self):
        """set_key leaves the account one device, the new identity device, which takes the old one's queue."""
        store = await self.open_store()
        await self.add_users(store, "alice", "bob")
        await store.add_device("bob", b"phone-device-id!", "PEM", "phone", 1, b"c", NOW, 8)
        await self.accept(store, 1, "alice", ["bob"])
        self.assertEqual(await self.query(store, "SELECT COUNT(*) FROM deliveries"), [(2,)])
        await store.set_key("bob", "NEW PEM", b"new-fingerprint-of-bob", NOW)
        _, devices = await store.devices("bob")
        self.assertEqual([(d.device_id, d.certificate) for d in devices], [(b"new-fingerprint-", None)])
        self.assertEqual(await self.query(store, "SELECT recipient, device FROM deliveries"),
                         [("bob", b"new-fingerprint-")])
        self.assertEqual(await self.query(store, "SELECT pending_count FROM users WHERE name = 'bob'"), [(1,)])
