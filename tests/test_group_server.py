"""
Tests for the server's side of groups: group_op (each op kind's permissions, the checks in their documented order,
races between admins, the limits, among them the groups one user may put another in and the storage budget),
group_ops and groups (what members, former members and others may read), group sends (coverage, the head they were
sealed for, who may send, delivery to every member device, stored once, the quotas they count against), what a
departing member's pending deliveries become, the group_changed push, the server's cache of groups (only a member's
request makes it read a chain), and the store's schema 4 with its migration.
Driven like tests.test_server: StringTransport, a synchronous store and a MemoryReactorClock; ops are built and
signed with the envelope section's own functions.
"""

import base64
import dataclasses
import sqlite3
import types

from twisted.internet import defer
from twisted.trial import unittest

import pager

from tests.test_devices import CREATED, DeviceTestCase, did, seal_to
from tests.test_server import b64, private_key

GID = bytes(range(16))
OTHER = bytes(range(16, 32))
T = 1_700_000_000_000  # an op's time, in milliseconds (not checked)
ZERO = bytes(32)


def fp(user):
    return pager.fingerprint(private_key(user))


class GroupTestCase(DeviceTestCase):
    """Helpers: build, sign and send ops on the head the server last answered; seal and send group messages."""

    def setUp(self):
        super().setUp()
        self.heads = {}  # group id -> (seq, head) as the last ok answer gave them

    def query(self, sql, *args):
        return self.store.pool._conn.execute(sql, args).fetchall()

    def head(self, gid=GID):
        return self.heads.get(gid, (0, ZERO))

    def op(self, kind, actor="alice", gid=GID, seq=None, prev=None, actor_fp=None, key=None, **fields):
        """An op of C{kind} by C{actor} on the last head (or C{seq}/C{prev}), and its signature."""
        last_seq, last_head = self.head(gid)
        raw = pager.encode_group_op(gid, last_seq + 1 if seq is None else seq, last_head if prev is None else prev,
                                    kind, actor, actor_fp or fp(actor), T, **fields)
        return raw, pager.sign_group_op(key or private_key(actor), raw)

    def send_op(self, conn, raw, signature, gid=GID):
        answer = conn.request("group_op", group=gid.hex(), op=b64(raw), signature=b64(signature))
        if answer["type"] == "ok":
            self.heads[gid] = (answer["seq"], bytes.fromhex(answer["head"]))
        return answer

    def group_op(self, conn, kind, actor="alice", gid=GID, **fields):
        return self.send_op(conn, *self.op(kind, actor, gid, **fields), gid=gid)

    def create(self, conn, members=("bob",), name="ops", actor="alice", gid=GID, topic=""):
        return self.assertOk(self.group_op(conn, "create", actor, gid, name=name, topic=topic,
                                           members=[(m, fp(m)) for m in members]))

    def ops_of(self, conn, gid=GID, after=0):
        return conn.request("group_ops", group=gid.hex(), after=after)

    def assertRefused(self, answer, code, *words, gid=GID, seq=None):
        """An error C{code} whose sentence has C{words}, and the group's chain unchanged (at C{seq})."""
        self.assertError(answer, code)
        for word in words:
            self.assertIn(word, answer["message"])
        stored = self.query("SELECT COUNT(*) FROM group_ops WHERE gid = ?", gid)[0][0]
        self.assertEqual(stored, self.head(gid)[0] if seq is None else seq)
        return answer

    def seal_group(self, sender, targets, gid=GID, head=None, sender_key=None, plaintext=b"hello group"):
        """A group message from C{sender}'s device C{sender_key} (its identity device by default) to C{targets}."""
        return seal_to(sender, sender_key or private_key(sender), targets, plaintext,
                       group=(gid, self.head(gid)[1] if head is None else head))

    def send_group(self, conn, envelope, gid=GID, **extra):
        fields = {"group": gid.hex(), "size": envelope.size, "header": b64(envelope.header),
                  "chunks": [b64(c) for c in envelope.chunks], "signature": b64(envelope.signature)}
        fields.update(extra)
        return conn.request("send", **fields)


def devices(*users):
    return [(user, private_key(user)) for user in users]


class PermissionTests(GroupTestCase):
    """Who may make each kind of op; every refusal leaves the chain as it was."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob, self.carol = self.register("alice"), self.register("bob"), self.register("carol")
        self.dave = self.register("dave")
        answer = self.create(self.alice, ("bob", "carol"))
        self.assertEqual(answer, {"type": "ok", "id": answer["id"], "group": GID.hex(), "seq": 1,
                                  "head": self.head()[1].hex()})

    def test_createThenList(self):
        """The creator and the listed users are members; groups lists the group for each of them."""
        self.assertEqual(self.query("SELECT user, since FROM group_members ORDER BY user"),
                         [("alice", 1), ("bob", 1), ("carol", 1)])
        for conn in (self.alice, self.bob, self.carol):
            self.assertEqual(self.assertOk(conn.request("groups"))["groups"],
                             [{"group": GID.hex(), "name": "ops", "seq": 1, "head": self.head()[1].hex(),
                               "member": True}])
        self.assertEqual(self.assertOk(self.dave.request("groups"))["groups"], [])

    def test_addByAdminOnly(self):
        """add: a member who is not an admin is forbidden; an admin adds."""
        self.assertRefused(self.group_op(self.bob, "add", "bob", members=[("dave", fp("dave"))]), "forbidden",
                           "admin")
        self.assertOk(self.group_op(self.alice, "add", members=[("dave", fp("dave"))]))
        self.assertEqual(self.query("SELECT since FROM group_members WHERE user = 'dave'"), [(2,)])

    def test_removeByAdminOnly(self):
        """remove: a member who is not an admin is forbidden; an admin removes; nobody removes themselves."""
        self.assertRefused(self.group_op(self.bob, "remove", "bob", users=["carol"]), "forbidden", "admin")
        self.assertRefused(self.group_op(self.alice, "remove", users=["alice"]), "forbidden", "leave")
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        self.assertEqual(self.query("SELECT user FROM group_members ORDER BY user"), [("alice",), ("bob",)])

    def test_leave(self):
        """leave: any member; the last admin may not while others remain; the last member's leave ends the group."""
        self.assertOk(self.group_op(self.bob, "leave", "bob"))
        self.assertRefused(self.group_op(self.alice, "leave"), "forbidden", "last admin")
        self.assertOk(self.group_op(self.alice, "promote", user="carol"))
        self.assertOk(self.group_op(self.alice, "leave"))
        self.assertOk(self.group_op(self.carol, "leave", "carol"))
        self.assertEqual(self.query("SELECT name, seq, members FROM groups"), [("ops", 5, 0)])
        # the group has ended: its name is free again, and nothing more happens to it
        self.assertRefused(self.group_op(self.carol, "topic", "carol", topic="x"), "unknown_group")
        self.create(self.alice, ("bob",), gid=OTHER)

    def test_renameAndTopicByAdminOnly(self):
        """rename and topic: admins only."""
        self.assertRefused(self.group_op(self.bob, "rename", "bob", name="ops2"), "forbidden", "admin")
        self.assertRefused(self.group_op(self.bob, "topic", "bob", topic="hi"), "forbidden", "admin")
        self.assertOk(self.group_op(self.alice, "rename", name="ops2"))
        self.assertOk(self.group_op(self.alice, "topic", topic="hi"))
        self.assertEqual(self.query("SELECT name, seq FROM groups"), [("ops2", 3)])

    def test_promoteAndDemote(self):
        """promote and demote: admins only; a promoted member may add; the last admin is not demoted."""
        self.assertRefused(self.group_op(self.bob, "promote", "bob", user="bob"), "forbidden")
        self.assertRefused(self.group_op(self.alice, "demote", user="alice"), "forbidden", "last admin")
        self.assertOk(self.group_op(self.alice, "promote", user="bob"))
        self.assertOk(self.group_op(self.bob, "add", "bob", members=[("dave", fp("dave"))]))
        self.assertRefused(self.group_op(self.carol, "demote", "carol", user="bob"), "forbidden", "admin")
        self.assertOk(self.group_op(self.bob, "demote", "bob", user="alice"))
        self.assertRefused(self.group_op(self.alice, "topic", topic="x"), "forbidden", "admin")

    def test_nonMemberUnknownGroup(self):
        """Any op by a non-member is unknown_group, with the same sentence as for a group that does not exist."""
        here = self.assertRefused(self.group_op(self.dave, "leave", "dave"), "unknown_group")
        nowhere = self.assertRefused(self.group_op(self.dave, "leave", "dave", gid=OTHER), "unknown_group", gid=OTHER)
        self.assertEqual(here["message"], nowhere["message"])
        self.assertEqual(here["message"], pager.UnknownGroup().message)

    def test_actorIsTheSession(self):
        """An op whose actor is another user, or names another identity key, is forbidden."""
        raw, signature = self.op("topic", "bob", topic="x")
        self.assertRefused(self.send_op(self.alice, raw, signature), "forbidden", "actor")
        raw, signature = self.op("topic", actor_fp=fp("mallory"), topic="x")
        self.assertRefused(self.send_op(self.alice, raw, signature), "forbidden", "identity key")

    def test_signatureChecked(self):
        """An op signed by another key than the actor's identity key is bad_request; nothing is stored."""
        raw, _ = self.op("topic", topic="x")
        answer = self.send_op(self.alice, raw, pager.sign_group_op(private_key("mallory"), raw))
        self.assertRefused(answer, "bad_request", "signature does not verify")
        self.assertOk(self.group_op(self.alice, "topic", topic="x"))

    def test_malformed(self):
        """Fields, op bytes and an op for another group than "group" names: bad_request."""
        raw, signature = self.op("topic", topic="x")
        for fields in ({"group": "XY" * 16, "op": b64(raw), "signature": b64(signature)},
                       {"group": GID.hex(), "op": "not base64!", "signature": b64(signature)},
                       {"group": GID.hex(), "op": b64(raw[:-1]), "signature": b64(signature)},
                       {"group": GID.hex(), "op": b64(raw)},
                       {"group": OTHER.hex(), "op": b64(raw), "signature": b64(signature)},
                       {"group": GID.hex(), "op": b64(b"x" * (pager.MAX_GROUP_OP_BYTES + 1)),
                        "signature": b64(signature)}):
            self.assertRefused(self.alice.request("group_op", **fields), "bad_request")

    def test_linkedDeviceRefused(self):
        """A linked device cannot change a group, even with the identity key's signature: forbidden, with why."""
        phone = self.link("alice", "alice-phone", identity=self.alice)
        conn = self.device_session("alice", phone)
        answer = self.assertRefused(self.group_op(conn, "topic", topic="x"), "forbidden")
        self.assertEqual(answer["message"], "Group changes are signed with your identity key: make them on your"
                                            " identity device.")
        # reading works on every device
        self.assertEqual(self.assertOk(self.ops_of(conn))["seq"], 1)
        self.assertEqual(len(self.assertOk(conn.request("groups"))["groups"]), 1)

    def test_createIdTaken(self):
        """A create with an id in use is group_exists."""
        self.assertRefused(self.group_op(self.dave, "create", "dave", seq=1, prev=ZERO, name="other", topic="",
                                         members=[]), "group_exists", "id")

    def test_nameTaken(self):
        """A create or rename to the name of a group that has members is group_exists."""
        self.assertRefused(self.group_op(self.dave, "create", "dave", OTHER, name="ops", topic="", members=[]),
                           "group_exists", "#ops", gid=OTHER)
        self.create(self.dave, (), name="dev", actor="dave", gid=OTHER)
        self.assertRefused(self.group_op(self.dave, "rename", "dave", OTHER, name="ops"), "group_exists", "#ops",
                           gid=OTHER)

    def test_keysMustBeCurrent(self):
        """
        Attack: an admin's client (or a server) lists a key for a user that is not the user's current one: the op
        is bad_request naming the user; an unknown user is unknown_user.
        """
        self.assertRefused(self.group_op(self.alice, "add", members=[("dave", fp("mallory"))]), "bad_request",
                           "dave", "not the current one")
        self.assertRefused(self.group_op(self.alice, "add", members=[("nobody", fp("mallory"))]), "unknown_user",
                           "nobody")
        self.assertRefused(self.group_op(self.dave, "create", "dave", OTHER, name="x", topic="",
                                         members=[("alice", fp("bob"))]), "bad_request", "alice", gid=OTHER)


class RaceTests(GroupTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob, self.carol = self.register("alice"), self.register("bob"), self.register("carol")
        self.dave, self.erin = self.register("dave"), self.register("erin")
        self.create(self.alice, ("bob", "carol"))
        self.assertOk(self.group_op(self.alice, "promote", user="bob"))

    def test_twoAdminsOnOneHead(self):
        """
        Two admins change the group on the same head: the first lands; the second gets group_changed with the new
        version and head; rebuilt on them, it lands.
        """
        seq, head = self.head()
        first = self.op("add", members=[("dave", fp("dave"))])
        second = self.op("add", "bob", members=[("erin", fp("erin"))])
        self.assertOk(self.send_op(self.alice, *first))
        answer = self.assertRefused(self.send_op(self.bob, *second), "group_changed", "#ops", "3")
        self.assertEqual((answer["seq"], answer["head"]), (3, self.head()[1].hex()))
        self.assertEqual(self.head()[1], pager.parse_group_op(first[0]).hash)
        rebuilt = self.op("add", "bob", seq=answer["seq"] + 1, prev=bytes.fromhex(answer["head"]),
                          members=[("erin", fp("erin"))])
        self.assertOk(self.send_op(self.bob, *rebuilt))
        self.assertEqual(self.query("SELECT user FROM group_members ORDER BY user"),
                         [("alice",), ("bob",), ("carol",), ("dave",), ("erin",)])
        self.assertNotEqual(head, self.head()[1])

    def test_staleSeq(self):
        """An op that repeats a version already taken, or skips one, is group_changed."""
        for seq, prev in ((2, self.head()[1]), (4, self.head()[1]), (3, ZERO)):
            answer = self.assertRefused(self.group_op(self.alice, "topic", seq=seq, prev=prev, topic="x"),
                                        "group_changed")
            self.assertEqual((answer["seq"], answer["head"]), (2, self.head()[1].hex()))

    def test_storeRechecksHead(self):
        """
        The store's transaction checks the head again: an op checked against a state the cache held before another
        op landed is group_changed there, and a message sealed for the old head too.
        """
        gid, (seq, head) = GID, self.head()
        raw, signature = self.op("topic", topic="x")
        op = pager.parse_group_op(raw)
        self.assertOk(self.group_op(self.alice, "topic", topic="y"))
        failure = self.failureResultOf(self.store.add_group_op(
            gid, op.seq, op.prev, op.hash, raw, signature, "PEM", "alice", fp("alice"), "ops", (), (), "", 3, 0,
            self.limits), pager.GroupChanged)
        self.assertEqual((failure.value.seq, failure.value.head), self.head())
        failure = self.failureResultOf(self.store.accept_message(
            b"m" * 16, "alice", b"header", b"sig", 1, [b"c"], ["bob"], 0, self.limits, group=(gid, head)),
            pager.GroupChanged)
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])


class LimitTests(GroupTestCase):

    def setUp(self):
        super().setUp()
        for user in ("alice", "bob", "carol", "dave"):
            setattr(self, user, self.register(user))

    def test_memberLimit(self):
        """More members than max_group_members (the creator counted) is too_large, at create and at add."""
        self.serve(pager.Limits(max_group_members=3))
        self.alice, self.bob = self.login("alice"), self.login("bob")
        self.assertRefused(self.group_op(self.alice, "create", name="ops", topic="",
                                         members=[(m, fp(m)) for m in ("bob", "carol", "dave")]), "too_large", "3")
        self.create(self.alice, ("bob", "carol"))
        self.assertRefused(self.group_op(self.alice, "add", members=[("dave", fp("dave"))]), "too_large", "3")

    def test_groupsPerUser(self):
        """A user in max_groups groups is not made a member of another: quota_exceeded naming them, creator too."""
        self.serve(pager.Limits(max_groups=2))
        self.alice, self.bob, self.carol = self.login("alice"), self.login("bob"), self.login("carol")
        self.dave = self.login("dave")
        self.create(self.alice, ("bob",), name="one", gid=bytes(16))
        self.create(self.dave, ("alice", "bob"), name="two", actor="dave", gid=bytes(15) + b"\1")
        self.assertRefused(self.group_op(self.carol, "create", "carol", name="three", topic="",
                                         members=[("bob", fp("bob")), ("dave", fp("dave"))]), "quota_exceeded",
                           "bob is in 2 groups")
        self.assertRefused(self.group_op(self.alice, "create", name="three", topic="", members=[]),
                           "quota_exceeded", "alice")
        self.create(self.carol, ("dave",), name="three", actor="carol")
        self.assertRefused(self.group_op(self.carol, "add", "carol", members=[("alice", fp("alice"))]),
                           "quota_exceeded", "alice")
        # leaving one makes room
        self.assertOk(self.group_op(self.bob, "leave", "bob", gid=bytes(16)))
        self.assertOk(self.group_op(self.carol, "add", "carol", members=[("bob", fp("bob"))]))

    def test_groupsPutInByOneUser(self):
        """
        Attack: an add needs no consent, so one user filled another's max_groups with groups of their own: nobody
        else could add the victim, and the victim could create none.  One user puts another in at most
        max_groups_by_one groups (quota_exceeded naming the victim and the limit, for a create or an add); the
        victim's own groups, and those others put them in, still fit.  Leaving one lets that user put them back in
        one, no more.
        """
        self.serve(pager.Limits(max_groups=8))
        self.assertEqual(self.factory.limits.max_groups_by_one, 4)
        mallory, self.alice, self.bob = self.register("mallory"), self.login("alice"), self.login("bob")
        gids = [bytes(15) + bytes([n]) for n in range(1, 6)]
        for n, gid in enumerate(gids[:4]):
            self.create(mallory, ("bob",), name="spam%d" % n, actor="mallory", gid=gid)
        answer = self.assertRefused(self.group_op(mallory, "create", "mallory", gids[4], name="spam4", topic="",
                                                  members=[("bob", fp("bob")), ("carol", fp("carol"))]),
                                    "quota_exceeded", "You have put bob in 4 groups already", "8", gid=gids[4])
        self.assertNotIn("carol", answer["message"])
        self.create(mallory, ("carol",), name="spam4", actor="mallory", gid=gids[4])
        self.assertRefused(self.group_op(mallory, "add", "mallory", gids[4], members=[("bob", fp("bob"))]),
                           "quota_exceeded", "bob", gid=gids[4])
        # mallory's own groups are not counted against her: she is in 5
        self.create(self.alice, ("bob",), name="real", gid=OTHER)
        self.create(self.bob, (), name="mine", actor="bob", gid=bytes(16))
        self.assertEqual(self.query("SELECT COUNT(*) FROM group_members WHERE user = 'bob'"), [(6,)])
        self.assertOk(self.group_op(self.bob, "leave", "bob", gid=gids[0]))
        self.assertOk(self.group_op(mallory, "add", "mallory", gids[4], members=[("bob", fp("bob"))]))
        self.assertRefused(self.group_op(mallory, "add", "mallory", gids[0], members=[("bob", fp("bob"))]),
                           "quota_exceeded", "bob", gid=gids[0])

    def test_groupsByOneBound(self):
        """An eighth of max_groups, at least 4, at most half (at least 1)."""
        for max_groups, by_one in ((64, 8), (256, 32), (8, 4), (6, 3), (2, 1), (1, 1)):
            self.assertEqual(pager.Limits(max_groups=max_groups).max_groups_by_one, by_one)

    def test_storageBudget(self):
        """
        Attack: group ops were stored past the database's budget (max_db_bytes), where a message got storage_full.
        Every op that takes nobody out (create, add, topic...) is storage_full now, nothing stored; a leave or a
        remove, which free what waited for the members they take out, still land.
        """
        self.create(self.alice, ("bob", "carol"))
        self.serve(pager.Limits(max_db_bytes=4096))  # far below what the database already uses
        self.alice, self.bob, self.dave = self.login("alice"), self.login("bob"), self.login("dave")
        self.assertError(self.send_group(self.alice, self.seal_group("alice", devices("bob", "carol"))),
                         "storage_full")
        self.assertRefused(self.group_op(self.alice, "topic", topic="y" * 256), "storage_full", "4096 bytes")
        self.assertRefused(self.group_op(self.alice, "add", members=[("dave", fp("dave"))]), "storage_full")
        self.assertRefused(self.group_op(self.dave, "create", "dave", OTHER, name="dev", topic="", members=[]),
                           "storage_full", gid=OTHER)
        self.assertEqual(self.query("SELECT COUNT(*) FROM groups"), [(1,)])
        self.assertOk(self.group_op(self.bob, "leave", "bob"))
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        self.assertEqual(self.query("SELECT user FROM group_members"), [("alice",)])

    def test_chainLength(self):
        """A chain holds at most MAX_GROUP_OPS ops: the next is quota_exceeded, saying to create a new group."""
        self.patch(pager, "MAX_GROUP_OPS", 3)
        self.create(self.alice)
        self.assertOk(self.group_op(self.alice, "topic", topic="a"))
        self.assertOk(self.group_op(self.alice, "topic", topic="b"))
        self.assertRefused(self.group_op(self.alice, "topic", topic="c"), "quota_exceeded", "create a new group")

    def test_opRate(self):
        """An account makes GROUP_OP_BURST ops at once, then GROUP_OP_RATE a second: rate_limited with retry_after."""
        self.create(self.alice)
        for n in range(pager.GROUP_OP_BURST - 1):
            self.assertOk(self.group_op(self.alice, "topic", topic=str(n)))
        answer = self.assertRefused(self.group_op(self.alice, "topic", topic="x"), "rate_limited")
        self.assertEqual(answer["retry_after"], 1)
        self.assertOk(self.group_op(self.bob, "leave", "bob"))  # another account's ops are not counted with them
        self.clock.advance(1)
        self.alice = self.login("alice")
        self.assertOk(self.group_op(self.alice, "topic", topic="x"))
        self.assertRefused(self.group_op(self.alice, "topic", topic="y"), "rate_limited")

    def test_limitsInHelloAndOptions(self):
        """The limits are in hello and are options of pager server; max_line is 256 KiB by default."""
        limits = self.connect().hello["limits"]
        self.assertEqual((limits["max_group_members"], limits["max_groups"], limits["max_line"],
                          limits["group_fanout_rate"]), (256, 64, 256 * 1024, 2000.0))
        options = pager.ServerOptions()
        options.parseOptions(["--db", self.mktemp(), "--max-group-members", "100", "--max-groups", "5",
                              "--group-fanout-rate", "50"])
        self.assertEqual((options.limits.max_group_members, options.limits.max_groups,
                          options.limits.group_fanout_rate), (100, 5, 50.0))
        with self.assertRaises(pager.usage.UsageError):
            pager.ServerOptions().parseOptions(["--db", self.mktemp(), "--max-group-members", "257"])


class ReadTests(GroupTestCase):
    """group_ops and groups: members read everything, former members up to their end, others nothing."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob, self.carol = self.register("alice"), self.register("bob"), self.register("carol")
        self.create(self.alice, ("bob", "carol"))
        self.assertOk(self.group_op(self.alice, "remove", users=["bob"]))
        self.removed = self.head()
        self.assertOk(self.group_op(self.alice, "topic", topic="after bob"))

    def test_memberReadsAll(self):
        """A member reads every op, each with its signature and the signer's PEM, and the server's member list."""
        answer = self.assertOk(self.ops_of(self.carol))
        self.assertEqual((answer["group"], answer["seq"], answer["head"], answer["members"], answer["more"]),
                         (GID.hex(), 3, self.head()[1].hex(), ["alice", "carol"], False))
        self.assertEqual([op["seq"] for op in answer["ops"]], [1, 2, 3])
        for op in answer["ops"]:
            self.assertEqual(op["key"], pager.public_key_pem(private_key("alice")))
            pager.verify_group_op(pager.load_public_key(op["key"]), base64.b64decode(op["op"]),
                                  base64.b64decode(op["signature"]))
        self.assertEqual([op["seq"] for op in self.assertOk(self.ops_of(self.carol, after=2))["ops"]], [3])
        self.assertEqual(self.assertOk(self.ops_of(self.carol, after=3))["ops"], [])

    def test_formerMemberReadsToTheirRemoval(self):
        """A removed member reads the ops up to the one that removed them, no member list; groups says member false."""
        answer = self.assertOk(self.ops_of(self.bob))
        self.assertEqual([op["seq"] for op in answer["ops"]], [1, 2])
        self.assertEqual((answer["seq"], answer["head"], answer["more"]), (2, self.removed[1].hex(), False))
        self.assertNotIn("members", answer)
        self.assertEqual(self.assertOk(self.ops_of(self.bob, after=2))["ops"], [])
        self.assertEqual(self.assertOk(self.bob.request("groups"))["groups"],
                         [{"group": GID.hex(), "name": "ops", "seq": 2, "head": self.removed[1].hex(),
                           "member": False}])

    def test_readdedMemberReadsAll(self):
        """Added back, a former member is a member again: it reads the whole chain and is listed as a member."""
        self.assertOk(self.group_op(self.alice, "add", members=[("bob", fp("bob"))]))
        self.assertEqual(self.assertOk(self.ops_of(self.bob))["seq"], 4)
        self.assertEqual([g["member"] for g in self.assertOk(self.bob.request("groups"))["groups"]], [True])

    def test_othersUnknownGroup(self):
        """Someone never in the group gets unknown_group, the same sentence as for a group that does not exist."""
        dave = self.register("dave")
        here, nowhere = self.ops_of(dave), self.ops_of(dave, OTHER)
        self.assertError(here, "unknown_group")
        self.assertEqual(here["message"], self.assertError(nowhere, "unknown_group")["message"])
        self.assertError(dave.request("group_ops", group=GID.hex(), after=-1), "bad_request")

    def test_pages(self):
        """group_ops answers with as many ops as fit half of max_line (at least one), saying whether more follow."""
        ops, seq, head, members, more = self.successResultOf(self.store.group_ops(GID, "carol", 0, 4000))
        self.assertEqual(([op[0] for op in ops], more), ([1], True))  # two ops take more than 2000 bytes
        ops, _, _, _, more = self.successResultOf(self.store.group_ops(GID, "carol", 0, 8000))
        self.assertEqual(([op[0] for op in ops], more), ([1, 2, 3], False))
        ops, _, _, _, more = self.successResultOf(self.store.group_ops(GID, "carol", 1, 4000))
        self.assertEqual(([op[0] for op in ops], more), ([2], True))

    def test_formerGroupsBounded(self):
        """groups lists at most MAX_FORMER_GROUPS groups left; an ended group nobody may read any more is deleted."""
        self.patch(pager, "MAX_FORMER_GROUPS", 2)
        gids = [bytes([n]) * 16 for n in range(1, 4)]
        for n, gid in enumerate(gids):
            self.create(self.bob, (), name="solo%d" % n, actor="bob", gid=gid)
            self.assertOk(self.group_op(self.bob, "leave", "bob", gid=gid))
        listed = self.assertOk(self.bob.request("groups"))["groups"]
        self.assertEqual([(g["name"], g["member"]) for g in listed], [("solo2", False), ("solo1", False)])
        self.assertEqual(self.query("SELECT COUNT(*) FROM group_ops WHERE gid = ?", gids[0]), [(0,)])
        self.assertEqual(self.query("SELECT COUNT(*) FROM groups WHERE gid = ?", gids[0]), [(0,)])
        self.assertError(self.ops_of(self.bob, gids[0]), "unknown_group")
        self.assertEqual(self.assertOk(self.ops_of(self.bob, gids[2]))["seq"], 2)


class GroupSendTests(GroupTestCase):
    """Group messages: who may send, what the envelope must hold, and delivery to every member device."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob, self.carol = self.register("alice"), self.register("bob"), self.register("carol")
        self.dave = self.register("dave")
        self.phone = self.link("carol", "carol-phone", identity=self.carol)
        self.carol_phone = self.device_session("carol", self.phone)
        self.create(self.alice, ("bob", "carol"))
        self.members = devices("bob", "carol") + [("carol", self.phone)]
        for conn in (self.alice, self.bob, self.carol, self.carol_phone, self.dave):
            conn.read()

    def test_deliveredToEveryMemberDevice(self):
        """One message row (with its group) for every member device; each gets it pushed; queued names nobody."""
        envelope = self.seal_group("alice", self.members)
        answer = self.assertOk(self.send_group(self.alice, envelope))
        self.assertEqual((answer["duplicate"], answer["queued"]), (False, []))
        msg = pager.parse_header(envelope.header).message_id.hex()
        for conn in (self.bob, self.carol, self.carol_phone):
            self.assertEqual([f["msg"] for f in conn.pushed("message")], [msg])
        self.assertEqual(self.dave.pushed("message"), [])
        self.assertEqual(self.query("SELECT gid FROM messages"), [(GID,)])
        self.assertEqual(self.query("SELECT recipient, device FROM deliveries ORDER BY recipient, device"),
                         sorted([("bob", did(private_key("bob"))), ("carol", did(private_key("carol"))),
                                 ("carol", did(self.phone))]))
        # one receipt a member: bob's ack, then carol's phone's
        self.assertOk(self.bob.request("ack", msg=msg))
        self.assertOk(self.carol_phone.request("ack", msg=msg))
        self.assertOk(self.carol.request("ack", msg=msg))
        self.assertEqual(sorted((r["from"], r["status"]) for r in self.alice.pushed("receipt")),
                         [("bob", "delivered"), ("carol", "delivered")])
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_storedAsItsPushOnlyForADeviceWithoutSession(self):
        """
        A message every member device takes at once is stored as its fields; one a device has no session for (carol's
        phone, carol's laptop online) as its push line, which the phone gets when it logs in, as carol got it live.
        """
        self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))
        self.assertEqual(self.query("SELECT line IS NULL, header != x'' FROM messages"), [(1, 1)])
        for conn in (self.bob, self.carol, self.carol_phone):
            conn.read()
        self.carol_phone.lose()
        envelope = self.seal_group("alice", self.members, plaintext=b"while the phone sleeps")
        self.assertOk(self.send_group(self.alice, envelope))
        msg = pager.parse_header(envelope.header).message_id.hex()
        self.assertEqual(self.query("SELECT line IS NULL, header FROM messages WHERE msg_id = ?", bytes.fromhex(msg)),
                         [(0, b"")])
        [live] = self.carol.pushed("message")
        phone = self.device_session("carol", self.phone)
        self.assertEqual([f for f in phone.pushed("message") if f["msg"] == msg], [live])

    def test_chargedLikeOneToOne(self):
        """
        A group message counts once against its sender's quota (the one 1:1 messages count against), and once
        against each member's pending quota however many devices get it; past either, quota_exceeded naming who,
        nothing stored.  Settled by every member, it counts no more.
        """
        self.serve(pager.Limits(max_sender_pending_messages=2, max_pending_messages=2))
        self.alice, self.bob, self.carol = self.login("alice"), self.login("bob"), self.login("carol")
        self.carol_phone = self.device_session("carol", self.phone)
        counts = ("SELECT name, sent_count, pending_count FROM users WHERE name IN ('alice', 'bob', 'carol')"
                  " ORDER BY name")
        first = self.seal_group("alice", self.members)
        self.assertOk(self.send_group(self.alice, first))
        self.assertEqual(self.query(counts), [("alice", 1, 0), ("bob", 0, 1), ("carol", 0, 1)])
        self.assertOk(self.alice.send(seal_to("alice", private_key("alice"), devices("dave"))))
        answer = self.assertError(self.send_group(self.alice, self.seal_group("alice", self.members)),
                                  "quota_exceeded")
        self.assertIn("too many messages waiting", answer["message"])
        self.assertOk(self.send_group(self.carol, self.seal_group("carol", devices("alice", "bob")
                                                                  + [("carol", self.phone)])))
        answer = self.assertError(self.send_group(self.carol_phone, self.seal_group(
            "carol", devices("alice", "bob", "carol"), sender_key=self.phone)), "quota_exceeded")
        self.assertIn("bob", answer["message"])
        self.assertEqual(self.query(counts), [("alice", 2, 1), ("bob", 0, 2), ("carol", 1, 2)])
        msg = pager.parse_header(first.header).message_id.hex()
        for conn in (self.bob, self.carol, self.carol_phone):
            self.assertOk(conn.request("ack", msg=msg))
        self.assertEqual(self.query(counts), [("alice", 1, 1), ("bob", 0, 1), ("carol", 1, 1)])
        self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))

    def test_pushEncodedOnce(self):
        """The push is encoded once for all the member devices it fans out to, and each gets the same line."""
        built = []
        original = pager.push_tail
        self.patch(pager, "push_tail", lambda *args: built.append(args) or original(*args))
        envelope = self.seal_group("alice", self.members)
        self.assertOk(self.send_group(self.alice, envelope))
        lines = []
        for conn in (self.bob, self.carol, self.carol_phone):
            lines.append(conn.transport.value())
            self.assertEqual([f["type"] for f in conn.read()], ["message"])
        self.assertEqual(len(set(lines)), 1)
        self.assertEqual([args[3] for args in built], [envelope.header])

    def test_offlineMemberGetsItAtLogin(self):
        """A member offline when the message came gets it when they log in; queued names them."""
        self.bob.lose()
        envelope = self.seal_group("alice", self.members)
        self.assertEqual(self.assertOk(self.send_group(self.alice, envelope))["queued"], ["bob"])
        bob = self.login("bob")
        self.assertEqual([f["msg"] for f in bob.pushed("message")], [pager.parse_header(envelope.header).message_id.hex()])

    def test_senderOtherDevices(self):
        """The sender's other devices are covered like 1:1 (its sending device never); a phone may send."""
        self.assertError(self.send_group(self.carol, self.seal_group("carol", devices("alice", "bob"))),
                         "devices_changed")
        self.assertError(self.send_group(self.carol, self.seal_group("carol", devices("alice", "bob", "carol")
                                                                     + [("carol", self.phone)])), "bad_request")
        self.assertOk(self.send_group(self.carol, self.seal_group("carol", devices("alice", "bob")
                                                                  + [("carol", self.phone)])))
        self.assertOk(self.send_group(self.carol_phone, self.seal_group("carol", devices("alice", "bob", "carol"),
                                                                        sender_key=self.phone)))

    def test_coverage(self):
        """
        Attack: a sender leaves out a member's device, or a member, or wraps to a non-member: devices_changed naming
        the member, or bad_request for the non-member; nothing is stored.
        """
        answer = self.assertError(self.send_group(self.alice, self.seal_group("alice", devices("bob", "carol"))),
                                  "devices_changed")
        self.assertIn("carol", answer["message"])
        answer = self.assertError(self.send_group(self.alice, self.seal_group(
            "alice", devices("carol") + [("carol", self.phone)])), "devices_changed")
        self.assertIn("bob", answer["message"])
        self.assertError(self.send_group(self.alice, self.seal_group("alice", self.members + devices("dave"))),
                         "bad_request")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_staleHead(self):
        """A message sealed for an earlier version of the group is group_changed with the current seq and head."""
        old = self.head()[1]
        self.assertOk(self.group_op(self.alice, "topic", topic="x"))
        answer = self.assertError(self.send_group(self.alice, self.seal_group("alice", self.members, head=old)),
                                  "group_changed")
        self.assertEqual((answer["seq"], answer["head"]), (2, self.head()[1].hex()))
        self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))

    def test_nonMemberSender(self):
        """A member who left cannot post (forbidden, naming the group); a group that does not exist is unknown_group."""
        self.assertOk(self.group_op(self.bob, "leave", "bob"))
        answer = self.assertError(self.send_group(self.bob, self.seal_group("bob", devices("alice", "carol")
                                                                            + [("carol", self.phone)])), "forbidden")
        self.assertEqual(answer["message"], "You are not a member of #ops.")
        self.assertError(self.send_group(self.dave, self.seal_group("dave", devices("alice"), gid=OTHER), gid=OTHER),
                         "unknown_group")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_envelopeKindMatchesSend(self):
        """
        Attack: replay across kinds.  A 1:1 envelope sent as a group message, a group envelope sent to users, a
        group envelope sent to another group, or a send naming both "to" and "group": bad_request.
        """
        one = seal_to("alice", private_key("alice"), self.members)
        self.assertError(self.send_group(self.alice, one), "bad_request")
        group = self.seal_group("alice", self.members)
        fields = {"size": group.size, "header": b64(group.header), "chunks": [b64(c) for c in group.chunks],
                  "signature": b64(group.signature)}
        self.assertError(self.alice.request("send", to=["bob", "carol"], **fields), "bad_request")
        self.assertError(self.alice.request("send", to=["bob", "carol"], group=GID.hex(), **fields), "bad_request")
        self.create(self.alice, ("bob", "carol"), name="other", gid=OTHER)
        self.assertError(self.send_group(self.alice, group, gid=OTHER), "bad_request")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_uploadInFrames(self):
        """A group message in several frames is checked when it begins and delivered when its last frame comes."""
        envelope = self.seal_group("alice", self.members, plaintext=b"x" * 3000)
        sealer_chunks = envelope.chunks
        self.assertEqual(len(sealer_chunks), 1)
        first = self.alice.new_id()
        self.alice.write({"type": "send", "id": first, "group": GID.hex(), "size": envelope.size,
                          "header": b64(envelope.header), "chunks": []})
        self.assertEqual(self.alice.read(), [])
        answer = self.alice.request("chunk", id=first, chunks=[b64(c) for c in sealer_chunks],
                                    signature=b64(envelope.signature))
        self.assertOk(answer)
        self.assertEqual(self.query("SELECT gid FROM messages"), [(GID,)])
        self.assertEqual(len(self.bob.pushed("message")), 1)

    def test_deletedMember(self):
        """
        A member whose account the operator deleted has no devices: the message must have no entries for them
        (else unknown_user, or devices_changed once the server has read that the devices are gone), and is stored
        for the others; the chain is left as it was.
        """
        self.assertOk(self.group_op(self.alice, "add", members=[("dave", fp("dave"))]))
        self.dave.lose()
        conn = sqlite3.connect(self.store.path, isolation_level=None)
        self.addCleanup(conn.close)
        pager._admin_txn(conn, pager.delete_user_txn, "dave")
        self.assertEqual(self.query("SELECT user FROM group_members WHERE user = 'dave'"), [("dave",)])
        # the server's cache still has dave's devices (the operator's command ran in another process)
        answer = self.assertError(self.send_group(self.alice, self.seal_group("alice", self.members
                                                                              + devices("dave"))), "unknown_user")
        self.assertIn("dave", answer["message"])
        answer = self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))
        answer = self.assertError(self.send_group(self.alice, self.seal_group("alice", self.members
                                                                              + devices("dave"))), "devices_changed")
        self.assertIn("dave", answer["message"])
        answer = self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))
        self.assertEqual(answer["queued"], [])
        self.assertEqual(self.query("SELECT DISTINCT recipient FROM deliveries ORDER BY recipient"),
                         [("bob",), ("carol",)])

    def test_aloneWithOneDevice(self):
        """The only member, with no other device, has nobody to send to: bad_request, nothing stored."""
        self.create(self.dave, (), name="solo", actor="dave", gid=OTHER)
        self.assertError(self.dave.request("send", group=OTHER.hex(), size=0, header=b64(b""), chunks=[],
                                           signature=b64(b"s")), "bad_request")
        envelope = seal_to("dave", private_key("dave"), devices("dave"), group=(OTHER, self.head(OTHER)[1]))
        self.assertError(self.send_group(self.dave, envelope, gid=OTHER), "bad_request")
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])


class FanoutRateTests(GroupTestCase):
    """
    Attack: each member device a group message reaches costs the server a delivery and a push, and a full group
    has some 2,000.  An account's group messages reach GROUP_FANOUT_BURST devices at once, then group_fanout_rate
    a second: past that, rate_limited with retry_after, and nothing stored.
    """

    limits = pager.Limits(group_fanout_rate=3.0)

    def setUp(self):
        self.patch(pager, "GROUP_FANOUT_BURST", 7)
        super().setUp()
        self.alice, self.bob, self.carol = self.register("alice"), self.register("bob"), self.register("carol")
        self.dave = self.register("dave")
        self.phone = self.link("carol", "carol-phone", identity=self.carol)
        self.create(self.alice, ("bob", "carol"))
        self.members = devices("bob", "carol") + [("carol", self.phone)]  # three devices a message

    def test_rate(self):
        for _ in range(2):
            self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))
        answer = self.assertRefused(self.send_group(self.alice, self.seal_group("alice", self.members)),
                                    "rate_limited", "3 a second")
        self.assertEqual(answer["retry_after"], 1)  # one token left: two more come in 2/3 s
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(2,)])
        self.clock.advance(1)
        self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))

    def test_othersAndOneToOneNotCounted(self):
        """Another account's group messages are not counted with alice's; nor are 1:1 messages."""
        for _ in range(2):
            self.assertOk(self.send_group(self.alice, self.seal_group("alice", self.members)))
        self.assertOk(self.send_group(self.bob, self.seal_group("bob", devices("alice", "carol")
                                                                + [("carol", self.phone)])))
        envelope = seal_to("alice", private_key("alice"), devices("dave"))
        self.assertOk(self.alice.request("send", to=["dave"], size=envelope.size, header=b64(envelope.header),
                                         chunks=[b64(c) for c in envelope.chunks],
                                         signature=b64(envelope.signature)))


class DepartureTests(GroupTestCase):
    """What waits for a member who leaves or is removed, and who is told that the group changed."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob, self.carol = self.register("alice"), self.register("bob"), self.register("carol")
        self.dave = self.register("dave")
        self.create(self.alice, ("bob", "carol"))
        self.carol.lose()
        self.envelope = self.seal_group("alice", devices("bob", "carol"))
        self.msg = pager.parse_header(self.envelope.header).message_id.hex()
        self.assertOk(self.send_group(self.alice, self.envelope))
        for conn in (self.alice, self.bob, self.dave):
            conn.read()

    def test_removedMemberDropped(self):
        """
        Removing carol drops her pending delivery of the group's message: alice gets a rejected receipt saying so,
        carol gets nothing at login, bob still has his.
        """
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        [receipt] = self.alice.pushed("receipt")
        self.assertEqual((receipt["msg"], receipt["from"], receipt["status"], receipt["reason"]),
                         (self.msg, "carol", "rejected", "carol was removed from #ops before receiving it."))
        carol = self.login("carol")
        self.assertEqual(carol.pushed("message"), [])
        self.assertEqual(self.query("SELECT pending_count FROM users WHERE name = 'carol'"), [(0,)])
        self.assertEqual(self.query("SELECT recipient FROM deliveries"), [("bob",)])
        self.assertOk(self.bob.request("ack", msg=self.msg))
        self.assertEqual(self.query("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_leftMemberDropped(self):
        """A member who leaves has their pending deliveries of the group dropped too, with a receipt saying so."""
        carol = self.login("carol")
        self.assertEqual(len(carol.pushed("message")), 1)  # pushed, not yet acknowledged
        self.assertOk(self.group_op(carol, "leave", "carol"))
        [receipt] = self.alice.pushed("receipt")
        self.assertEqual(receipt["reason"], "carol left #ops before receiving it.")
        self.assertError(carol.request("ack", msg=self.msg), "unknown_message")

    def test_ownCopiesStay(self):
        """
        A departing member's own group messages still waiting for their other devices stay (they were sealed while
        the member was one, so that the conversation reads the same on each device); what others sent them is
        dropped, with its receipt.  So for a leave, and for a removal.
        """
        carol = self.login("carol")
        phone = self.link("carol", "carol-phone", identity=carol)  # and it stays offline
        targets = devices("alice", "bob") + [("carol", phone)]
        own = [self.seal_group("carol", targets)]
        self.assertOk(self.send_group(carol, own[0]))
        self.assertOk(self.group_op(carol, "leave", "carol"))
        self.assertOk(self.group_op(self.alice, "add", members=[("carol", fp("carol"))]))
        own.append(self.seal_group("carol", targets))
        self.assertOk(self.send_group(carol, own[1]))
        other = self.seal_group("alice", devices("bob", "carol") + [("carol", phone)])
        self.assertOk(self.send_group(self.alice, other))
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        self.assertEqual(sorted((r["msg"], r["from"], r["status"], r["reason"]) for r in self.alice.pushed("receipt")),
                         sorted([(self.msg, "carol", "rejected", "carol left #ops before receiving it."),
                                 (pager.parse_header(other.header).message_id.hex(), "carol", "rejected",
                                  "carol was removed from #ops before receiving it.")]))
        phone_session = self.device_session("carol", phone)
        self.assertEqual([f["msg"] for f in phone_session.pushed("message")],
                         [pager.parse_header(e.header).message_id.hex() for e in own])
        for envelope in own:
            self.assertOk(phone_session.request("ack", msg=pager.parse_header(envelope.header).message_id.hex()))
        self.assertEqual(carol.pushed("receipt"), [])  # no receipt for one's own copies

    def test_otherMessagesStay(self):
        """A 1:1 message waiting for the departing member is not touched."""
        one = seal_to("bob", private_key("bob"), devices("carol"))
        self.assertOk(self.bob.send(one))
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        carol = self.login("carol")
        self.assertEqual([f["msg"] for f in carol.pushed("message")],
                         [pager.parse_header(one.header).message_id.hex()])

    def test_groupChangedPushed(self):
        """
        Every other session of every member after the op, and of the removed member, is pushed group_changed with
        the new version; non-members and the session that made the change are not.
        """
        carol = self.login("carol")
        carol.read()
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        push = {"type": "group_changed", "group": GID.hex(), "seq": 2, "head": self.head()[1].hex()}
        self.assertEqual(self.bob.pushed("group_changed"), [push])
        self.assertEqual(carol.pushed("group_changed"), [push])
        self.assertEqual(self.dave.pushed("group_changed"), [])
        self.assertEqual(self.alice.pushed("group_changed"), [])
        other_alice = self.login("alice")
        other_alice.read()
        self.assertOk(self.group_op(self.alice, "add", members=[("dave", fp("dave"))]))
        push = {"type": "group_changed", "group": GID.hex(), "seq": 3, "head": self.head()[1].hex()}
        self.assertEqual(self.dave.pushed("group_changed"), [push])
        self.assertEqual(other_alice.pushed("group_changed"), [push])
        self.assertEqual(carol.pushed("group_changed"), [])


class CacheTests(GroupTestCase):
    """The factory's group cache: a known group's send reads no group from the store; a restart rebuilds it."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.register("alice"), self.register("bob")
        self.create(self.alice, ("bob",))
        self.assertOk(self.group_op(self.alice, "topic", topic="x"))

    def test_noStoreReadForKnownGroup(self):
        """Sends to a known group read neither the chain nor the members from the store."""
        reads = []
        self.patch(self.store, "group_chain", lambda *a: reads.append(a))
        for _ in range(3):
            self.assertOk(self.send_group(self.alice, self.seal_group("alice", devices("bob"))))
        self.assertEqual(reads, [])

    def test_rebuiltFromChain(self):
        """A new server (empty cache) folds the stored chain: the same head, members and admins."""
        before = self.factory._groups[GID]
        self.serve(self.limits)
        self.assertFalse(self.factory.group_cached(GID))
        state = self.successResultOf(defer.ensureDeferred(self.factory.group_state(GID)))
        self.assertEqual((state.seq, state.head, dict(state.members), state.admins, state.topic),
                         (before.seq, before.head, dict(before.members), before.admins, "x"))
        self.assertTrue(self.factory.group_cached(GID))
        self.alice, self.bob = self.login("alice"), self.login("bob")
        self.assertOk(self.send_group(self.alice, self.seal_group("alice", devices("bob"))))
        self.assertIsNone(self.successResultOf(defer.ensureDeferred(self.factory.group_state(OTHER))))

    def test_lowerMemberLimitKeepsGroups(self):
        """A group larger than a member limit the operator set later is still read, and can still shrink."""
        self.register("carol")
        self.assertOk(self.group_op(self.alice, "add", members=[("carol", fp("carol"))]))
        self.serve(pager.Limits(max_group_members=2))
        self.alice = self.login("alice")
        self.assertOk(self.group_op(self.alice, "remove", users=["carol"]))
        self.assertError(self.group_op(self.alice, "add", members=[("carol", fp("carol"))]), "too_large")

    def chain_reads(self):
        """Every read of a group's chain from the store, from now on (the server's fold reads it page by page)."""
        reads = []
        real = self.store.group_chain
        self.patch(self.store, "group_chain", lambda *a: reads.append(a) or real(*a))
        return reads

    def test_endedGroupNeverFolded(self):
        """
        Attack: a group without members left (which the cache does not hold) named in send frames and ops, again
        and again, by a former member or by anyone who knows its id, made the server read and fold its whole chain
        (up to MAX_GROUP_OPS ops) at every frame.  Each such frame now costs a look-up of a few rows: unknown_group
        (group_exists for a create with its id), and the chain is never read, on the server that saw the group end
        and on a new one.
        """
        dave = self.register("dave")
        self.assertOk(self.group_op(self.bob, "leave", "bob"))
        self.assertOk(self.group_op(self.alice, "leave"))
        reads = self.chain_reads()
        for restarted in (False, True):
            if restarted:
                self.serve(self.limits)
                self.alice, dave = self.login("alice"), self.login("dave")
            for conn, user in ((self.alice, "alice"), (dave, "dave")):
                for _ in range(3):
                    answer = self.assertError(self.send_group(conn, self.seal_group(user, devices("bob"))),
                                              "unknown_group")
                    self.assertEqual(answer["message"], pager.UnknownGroup().message)
                    self.assertRefused(self.group_op(conn, "topic", user, topic="y"), "unknown_group")
                    self.assertRefused(self.group_op(conn, "create", user, seq=1, prev=ZERO, name="ops", topic="",
                                                     members=[]), "group_exists")
            self.assertEqual(reads, [])
            self.assertFalse(self.factory.group_cached(GID))

    def test_nonMemberNeverFolds(self):
        """
        Attack: someone outside a live group names its id (send frames, ops) on a server that has not cached the
        group yet: the store says they are not a member (a few rows), and the chain is never read; unknown_group,
        the sentence given for a group that does not exist.  A member's first request folds the chain once, and
        the state stays cached: further sends and ops read no chain.
        """
        dave = self.register("dave")
        self.serve(self.limits)
        self.alice, self.bob, dave = self.login("alice"), self.login("bob"), self.login("dave")
        reads = self.chain_reads()
        for _ in range(3):
            answer = self.assertError(self.send_group(dave, self.seal_group("dave", devices("alice", "bob"))),
                                      "unknown_group")
            self.assertEqual(answer["message"], pager.UnknownGroup().message)
            self.assertRefused(self.group_op(dave, "leave", "dave"), "unknown_group")
            self.assertRefused(self.group_op(dave, "create", "dave", seq=1, prev=ZERO, name="dev", topic="",
                                             members=[]), "group_exists")
        self.assertEqual(reads, [])
        self.assertFalse(self.factory.group_cached(GID))
        for _ in range(3):
            self.assertOk(self.send_group(self.bob, self.seal_group("bob", devices("alice"))))
        self.assertOk(self.group_op(self.alice, "topic", topic="z"))
        self.assertOk(self.send_group(self.bob, self.seal_group("bob", devices("alice"))))
        self.assertEqual(reads, [(GID, 0)])
        # once cached, an outsider's frame reads no chain either
        self.assertError(self.send_group(dave, self.seal_group("dave", devices("alice", "bob"))), "unknown_group")
        self.assertEqual(reads, [(GID, 0)])

    def test_loadWhileOpLands(self):
        """
        Lookups while a group's chain is read share that read; if an op of the group lands meanwhile, the state
        read (older) is not cached over the op's.
        """
        self.serve(self.limits)
        gate = defer.Deferred()
        real = self.store.group_chain
        self.patch(self.store, "group_chain", lambda *a: gate.addCallback(lambda _: real(*a)))
        loading = defer.ensureDeferred(self.factory.group_state(GID))
        waiting = defer.ensureDeferred(self.factory.group_state(GID))
        landed = dataclasses.replace(pager.GroupState.empty(GID), seq=3, head=b"h" * 32,
                                     members=types.MappingProxyType({"alice": fp("alice")}))
        self.factory.group_committed(landed, ())
        gate.callback(None)
        first, second = self.successResultOf(loading), self.successResultOf(waiting)
        self.assertIs(first, second)
        self.assertEqual(first.seq, 2)
        self.assertIs(self.successResultOf(defer.ensureDeferred(self.factory.group_state(GID))), landed)


# The server's schema 3 (pager 0.3), as it was: the migration test starts from it.
SCHEMA_3 = """
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
    device BLOB NOT NULL,
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    told INTEGER NOT NULL DEFAULT 0,
    shared INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipient, ord, device)
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
CREATE TABLE IF NOT EXISTS devices (
    user TEXT NOT NULL,
    device_id BLOB NOT NULL,
    public_key TEXT NOT NULL,
    name TEXT,
    created INTEGER,
    certificate BLOB,
    revoked_at INTEGER,
    revocation BLOB,
    prekeys INTEGER NOT NULL DEFAULT 0,
    added_at REAL NOT NULL,
    last_seen REAL,
    PRIMARY KEY (user, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signed_prekeys (
    user TEXT NOT NULL,
    device_id BLOB NOT NULL,
    prekey_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    valid_from INTEGER NOT NULL,
    valid_until INTEGER NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (user, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    user TEXT NOT NULL,
    device_id BLOB NOT NULL,
    prekey_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    PRIMARY KEY (user, device_id, prekey_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS invites (
    code_hash BLOB PRIMARY KEY,
    created_at REAL NOT NULL,
    used_by TEXT,
    used_at REAL
);
"""


class StoreTests(unittest.TestCase):
    """Schema 4 on the real store: a schema 3 database brought to it, and group ops committed in batches."""

    async def test_migrationFromSchema3(self):
        """
        A database of pager 0.3 (schema 3) with a message pending for bob's device is brought to schema 4: the
        group tables exist and are empty, the message has no group and is still read and acknowledged, and a
        group can be made and messaged.
        """
        path = self.mktemp()
        alice, bob = private_key("alice"), private_key("bob")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.executescript(SCHEMA_3)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
        conn.execute("INSERT INTO meta VALUES ('server_id', '0123456789abcdef0123456789abcdef')")
        conn.execute("INSERT INTO counters VALUES ('ord', 1)")
        conn.execute("INSERT INTO counters VALUES ('reserved', 0)")
        for name, key, pending, sent in (("alice", alice, 0, 1), ("bob", bob, 1, 0)):
            conn.execute("INSERT INTO users (name, public_key, fingerprint, token_salt, token_hash, key_set_at,"
                         " registered_at, pending_count, pending_bytes, sent_count, sent_bytes) VALUES (?, ?, ?,"
                         " x'00', x'00', 5, 5, ?, ?, ?, ?)", (name, pager.public_key_pem(key), pager.fingerprint(key),
                                                             pending, 12 * pending, sent, 12 * sent))
            conn.execute("INSERT INTO devices (user, device_id, public_key, name, created, certificate, added_at)"
                         " VALUES (?, ?, ?, 'laptop', ?, x'00', 5)",
                         (name, pager.device_id(key), pager.public_key_pem(key), CREATED))
        conn.execute("INSERT INTO messages (seq, msg_id, sender, header, signature, size, chunk_count, accepted_at,"
                     " expires_at, ord) VALUES (1, ?, 'alice', x'68', x'73', 12, 1, 1, 9e9, 1)", (b"m" * 16,))
        conn.execute("INSERT INTO chunks VALUES (1, 0, x'00')")
        conn.execute("INSERT INTO deliveries (recipient, ord, device, seq) VALUES ('bob', 1, ?, 1)",
                     (pager.device_id(bob),))
        conn.close()
        store = pager.Store(path)
        self.addCleanup(lambda: store.pool.running and store.close())
        await store.open()
        query = lambda sql, *args: store.pool.runInteraction(lambda txn: txn.execute(sql, args).fetchall())  # noqa
        self.assertEqual(await query("SELECT value FROM meta WHERE key = 'schema_version'"),
                         [(str(pager.SCHEMA_VERSION),)])
        for table in ("groups", "group_ops", "group_members", "former_members"):
            self.assertEqual(await query("SELECT COUNT(*) FROM %s" % table), [(0,)])
        self.assertEqual(await query("SELECT msg_id, gid FROM messages"), [(b"m" * 16, None)])
        [message] = await store.pending("bob", 0, device=pager.device_id(bob))
        self.assertEqual((message.msg_id, message.sender, message.chunks), (b"m" * 16, "alice", [b"\0"]))
        sender, receipt = await store.ack("bob", b"m" * 16, "delivered", "", 10, device=pager.device_id(bob))
        self.assertEqual((sender, receipt.status), ("alice", "delivered"))
        # a group on the migrated database
        raw = pager.encode_group_op(GID, 1, ZERO, "create", "alice", pager.fingerprint(alice), T, name="ops",
                                    topic="", members=[("bob", pager.fingerprint(bob))])
        op = pager.parse_group_op(raw)
        await store.add_group_op(GID, 1, ZERO, op.hash, raw, b"sig", "PEM", "alice", pager.fingerprint(alice), "ops",
                                 (("alice", pager.fingerprint(alice)), ("bob", pager.fingerprint(bob))), (), "", 2, 10,
                                 pager.Limits())
        self.assertEqual(await store.groups("bob"), [(GID, "ops", 1, op.hash, True)])
        seq, _, duplicate, _ = await store.accept_message(b"n" * 16, "alice", b"h", b"s", 1, [b"c"], ["bob"], 11,
                                                          pager.Limits(), group=(GID, op.hash))
        self.assertEqual(await query("SELECT gid FROM messages WHERE seq = ?", seq), [(GID,)])

    async def test_twoOpsInOneBatch(self):
        """
        Two ops on one head queued at once on the real store (group commit): the first lands; the second, which
        shares its batch with other work, is group_changed with the first's version and head, and that other work is
        still done.
        """
        store = pager.Store(self.mktemp())
        self.addCleanup(lambda: store.pool.running and store.close())
        await store.open()
        alice, bob = private_key("alice"), private_key("bob")
        for name, key in (("alice", alice), ("bob", bob), ("carol", private_key("carol"))):
            await store.add_user(name, pager.public_key_pem(key), pager.fingerprint(key), b"s" * 16, b"h" * 32, 1)
        create = pager.encode_group_op(GID, 1, ZERO, "create", "alice", fp("alice"), T, name="ops", topic="",
                                       members=[("bob", fp("bob"))])
        head = pager.parse_group_op(create).hash
        await store.add_group_op(GID, 1, ZERO, head, create, b"sig", "PEM", "alice", fp("alice"), "ops",
                                 (("alice", fp("alice")), ("bob", fp("bob"))), (), "", 2, 1, pager.Limits())
        first = pager.parse_group_op(pager.encode_group_op(GID, 2, head, "topic", "alice", fp("alice"), T, topic="a"))
        second = pager.parse_group_op(pager.encode_group_op(GID, 2, head, "add", "alice", fp("alice"), T,
                                                            members=[("carol", fp("carol"))]))
        landed = store.add_group_op(GID, 2, head, first.hash, first.raw, b"sig", "PEM", "alice", fp("alice"), "ops",
                                    (), (), "", 2, 2, pager.Limits())
        refused = store.add_group_op(GID, 2, head, second.hash, second.raw, b"sig", "PEM", "alice", fp("alice"),
                                     "ops", (("carol", fp("carol")),), (), "", 3, 2, pager.Limits())
        listed = store.groups("bob")
        self.assertEqual(await landed, [])
        with self.assertRaises(pager.GroupChanged) as caught:
            await refused
        self.assertEqual((caught.exception.seq, caught.exception.head), (2, first.hash))
        self.assertEqual(await listed, [(GID, "ops", 2, first.hash, True)])
        self.assertEqual(await store.groups("carol"), [])
