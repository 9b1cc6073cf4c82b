"""
Tests for the group operations and group envelopes of L{pager}'s envelope section: the operation bytes and their
parser, signatures, every rule of L{pager.GroupState.apply}, folding a chain, and group messages (the group tag,
the group id and membership head in the signed header, the group limits).

Pure code: no reactor, no server.  RSA keys come from tests.test_envelope's module cache.
"""

import hashlib
import os
import re
import shutil
import struct
import subprocess

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import pager
from tests.test_envelope import NOW, SMALL, _Device, _key, _lp_bytes, _pub

GID = bytes(range(16))
OTHER_GID = bytes(range(16, 32))
T = 1700000000000  # milliseconds
ZERO = bytes(32)
PROPERTY = settings(max_examples=300, deadline=None, database=None)


def _fp(name):
    """A stand-in identity fingerprint for C{name} (the rules never look inside it)."""
    return hashlib.sha256(b"identity of " + name.encode()).digest()


def _u32(n):
    return struct.pack(">I", n)


def _create_raw(members=(("bob", _fp("bob")),), name="ops", topic="", actor="alice", group_id=GID, seq=1,
                prev=ZERO, kind=b"create", actor_fp=None, tail=b""):
    """A create operation written field by field from the documented layout, without L{pager.encode_group_op}."""
    body = _lp_bytes(name.encode()) + _lp_bytes(topic.encode()) + _u32(len(members))
    for user, fp in members:
        body += _lp_bytes(user.encode()) + _lp_bytes(fp)
    return (_lp_bytes(b"pager-group-op-v1") + _lp_bytes(group_id) + _u32(seq) + _lp_bytes(prev) + _lp_bytes(kind)
            + _lp_bytes(actor.encode()) + _lp_bytes(actor_fp if actor_fp is not None else _fp(actor))
            + struct.pack(">Q", T) + body + tail)


def _op_raw(kind, body, actor="alice", seq=2, prev=ZERO):
    """Any operation written field by field: the common fields, then C{body} as given."""
    return (_lp_bytes(b"pager-group-op-v1") + _lp_bytes(GID) + _u32(seq) + _lp_bytes(prev)
            + _lp_bytes(kind.encode()) + _lp_bytes(actor.encode()) + _lp_bytes(_fp(actor)) + struct.pack(">Q", T)
            + body)


class ConstantsTests(SynchronousTestCase):
    def test_values(self):
        """The tags and limits the spec fixes, and the error codes of the three group errors."""
        self.assertEqual(pager.GROUP_OP_TAG, b"pager-group-op-v1")
        self.assertEqual(pager.GROUP_ENVELOPE_TAG, b"pager-group-envelope-v1")
        self.assertEqual(pager.GROUP_OP_KINDS,
                         ("create", "add", "remove", "leave", "rename", "topic", "promote", "demote"))
        self.assertEqual((pager.MAX_GROUP_TOPIC_BYTES, pager.MAX_GROUP_OPS, pager.MAX_GROUP_OP_BYTES,
                          pager.MAX_GROUP_WRAPS, pager.GROUP_OP_RATE, pager.GROUP_OP_BURST, pager.MAX_FORMER_GROUPS,
                          pager.DEFAULT_MAX_GROUP_MEMBERS, pager.GROUP_ID_SIZE),
                         (256, 4096, 32768, 2048, 1.0, 30, 64, 256, 16))
        self.assertEqual(pager.GroupOpError().code, "bad_request")
        self.assertIsInstance(pager.GroupOpError(), pager.BadRequest)
        self.assertEqual(pager.GroupRefused().code, "forbidden")
        self.assertIsInstance(pager.GroupRefused(), pager.Forbidden)
        self.assertEqual(pager.GroupFull().code, "too_large")
        self.assertIsInstance(pager.GroupFull(), pager.GroupRefused)

    def test_tags_distinct(self):
        """No tag of a signed structure is another's: an operation is never an envelope, a certificate or a proof."""
        tags = [pager.GROUP_OP_TAG, pager.GROUP_ENVELOPE_TAG, pager.ENVELOPE_TAG, pager.ENVELOPE_TAG_V1,
                pager.DEVICE_TAG, pager.REVOCATION_TAG, pager.SIGNED_PREKEY_TAG, pager.SIGNATURE_TAG,
                pager.AUTH_TAG, pager.WRAP_TAG, pager.COMMITMENT_TAG]
        self.assertEqual(len(set(tags)), len(tags))


class EncodeTests(SynchronousTestCase):
    """encode_group_op writes the documented bytes; parse_group_op reads them back."""

    def test_create_layout(self):
        """A create operation's bytes are exactly the documented fields, its members sorted by name."""
        members = [("carol", _fp("carol")), ("bob", _fp("bob"))]
        raw = pager.encode_group_op(GID, 1, ZERO, "create", "alice", _fp("alice"), T, name="ops",
                                    topic="deploys \u2713", members=members)
        self.assertEqual(raw, _create_raw(sorted(members), topic="deploys \u2713"))
        self.assertEqual(pager.parse_group_op(raw).hash, hashlib.sha256(raw).digest())

    def test_round_trips(self):
        """Every kind reads back with its fields (and only those); lists are sorted whatever order they came in."""
        cases = [
            ("create", dict(name="ops", topic="t", members={"carol": _fp("carol"), "bob": _fp("bob")}),
             dict(name="ops", topic="t", members=(("bob", _fp("bob")), ("carol", _fp("carol"))))),
            ("create", dict(name="solo"), dict(name="solo", topic="", members=())),
            ("add", dict(members=[("zed", _fp("zed")), ("dave", _fp("dave"))]),
             dict(members=(("dave", _fp("dave")), ("zed", _fp("zed"))))),
            ("remove", dict(users=["carol", "bob"]), dict(users=("bob", "carol"))),
            ("leave", {}, {}),
            ("rename", dict(name="ops2"), dict(name="ops2")),
            ("topic", dict(topic=""), dict(topic="")),
            ("topic", dict(topic="x" * 256), dict(topic="x" * 256)),
            ("promote", dict(user="bob"), dict(user="bob")),
            ("demote", dict(user="bob"), dict(user="bob")),
        ]
        for kind, given_fields, expected in cases:
            seq, prev = (1, ZERO) if kind == "create" else (7, b"\x07" * 32)
            raw = pager.encode_group_op(GID, seq, prev, kind, "alice", _fp("alice"), T, **given_fields)
            op = pager.parse_group_op(raw)
            full = dict(name=None, topic=None, members=(), users=(), user=None)
            full.update(expected)
            self.assertEqual(op, pager.GroupOp(raw, GID, seq, prev, kind, "alice", _fp("alice"), T, **full))
            self.assertEqual(pager.encode_group_op(GID, seq, prev, kind, "alice", _fp("alice"), T,
                                                   **given_fields), raw)

    def test_bodies(self):
        """The body of each kind other than create, byte for byte."""
        def body(kind, **fields):
            raw = pager.encode_group_op(GID, 2, ZERO, kind, "alice", _fp("alice"), T, **fields)
            common = _op_raw(kind, b"")
            self.assertTrue(raw.startswith(common))
            return raw[len(common):]

        self.assertEqual(body("add", members=[("bob", _fp("bob"))]),
                         _u32(1) + _lp_bytes(b"bob") + _lp_bytes(_fp("bob")))
        self.assertEqual(body("remove", users=["dave", "bob"]), _u32(2) + _lp_bytes(b"bob") + _lp_bytes(b"dave"))
        self.assertEqual(body("leave"), b"")
        self.assertEqual(body("rename", name="ops2"), _lp_bytes(b"ops2"))
        self.assertEqual(body("topic", topic="\u00e9t\u00e9"), _lp_bytes("\u00e9t\u00e9".encode()))
        self.assertEqual(body("promote", user="bob"), _lp_bytes(b"bob"))
        self.assertEqual(body("demote", user="bob"), _lp_bytes(b"bob"))

    def test_encode_refuses(self):
        """Fields another kind takes, missing fields and invalid values are GroupOpErrors, with a sentence."""
        def refused(sentence, kind="add", seq=2, **fields):
            fields.setdefault("actor", "alice")
            actor = fields.pop("actor")
            error = self.assertRaises(pager.GroupOpError, pager.encode_group_op, GID, seq, ZERO, kind, actor,
                                      _fp("alice"), T, **fields)
            if sentence is not None:
                self.assertEqual(error.message, sentence)

        refused("'join' is not a kind of group operation.", kind="join")
        refused("The leave operation takes no users.", kind="leave", users=["bob"])
        refused("The add operation takes no name, topic.", members=[("bob", _fp("bob"))], name="x", topic="y")
        refused("The add operation needs members.", members=[])
        refused("The remove operation needs users.", kind="remove")
        refused("The rename operation needs name.", kind="rename")
        refused("The promote operation needs user.", kind="promote")
        refused("The create operation needs name.", kind="create", seq=1)
        refused("The create operation takes no users.", kind="create", seq=1, name="ops", users=["bob"])
        refused("'Bob' is not a valid user name.", members=[("Bob", _fp("bob"))])
        refused("'#ops' is not a valid group name (canonical_group_name gives it).", kind="rename", name="#ops")
        refused("'al ice' is not a valid user name.", kind="leave", actor="al ice")
        refused("The topic is not text that UTF-8 can encode.", kind="topic", topic="\ud800")
        refused("A group's topic is at most 256 bytes of UTF-8.", kind="topic", topic="\u00e9" * 129)
        refused("The group operation's users are not sorted without a name twice.", kind="remove",
                users=["bob", "bob"])
        refused("The group operation's key fingerprint is not 32 bytes.", members=[("bob", b"short")])
        refused("The sequence number or the time is out of range.", kind="leave", seq=2 ** 32)
        refused("A group operation's sequence number starts at 1.", kind="leave", seq=0)
        self.assertRaises(pager.GroupOpError, pager.encode_group_op, GID[:15], 2, ZERO, "leave", "alice",
                          _fp("alice"), T)
        self.assertRaises(pager.GroupOpError, pager.encode_group_op, GID, 2, ZERO, "leave", "alice",
                          _fp("alice"), -1)

    def test_largest(self):
        """An add of 256 users with the longest names fits MAX_GROUP_OP_BYTES, with room to spare."""
        members = [("%s%03d" % ("u" * 29, i), _fp(str(i))) for i in range(256)]
        raw = pager.encode_group_op(GID, 2, ZERO, "add", "a" * 32, _fp("a"), T, members=members)
        self.assertLess(len(raw), pager.MAX_GROUP_OP_BYTES)
        self.assertEqual(len(pager.parse_group_op(raw).members), 256)


class MalformedTests(SynchronousTestCase):
    """Every malformed operation is a GroupOpError naming what is wrong, and nothing else."""

    def assertMalformed(self, raw, sentence):
        error = self.assertRaises(pager.GroupOpError, pager.parse_group_op, raw)
        self.assertEqual(error.message, sentence)

    def test_valid_baseline(self):
        """The operations the other tests spoil parse as they are."""
        pager.parse_group_op(_create_raw())
        pager.parse_group_op(_op_raw("leave", b""))

    def test_header_fields(self):
        self.assertMalformed("text", "The group operation is not bytes.")
        self.assertMalformed(_create_raw(tail=b"x" * pager.MAX_GROUP_OP_BYTES),
                             "A group operation is at most 32768 bytes.")
        self.assertMalformed(_lp_bytes(b"pager-envelope-v2") + _create_raw()[21:],
                             "This is not a pager group operation.")
        self.assertMalformed(_create_raw(group_id=GID[:15]), "The group operation's group id is not 16 bytes.")
        self.assertMalformed(_create_raw(group_id=GID + b"x"), "The group operation's group id is not 16 bytes.")
        self.assertMalformed(_create_raw(seq=0), "A group operation's sequence number starts at 1.")
        self.assertMalformed(_create_raw(prev=ZERO[:31]), "The group operation's previous hash is not 32 bytes.")
        self.assertMalformed(_create_raw(kind=b"join"), "The group operation is of an unknown kind.")
        self.assertMalformed(_create_raw(kind=b"CREATE"), "The group operation is of an unknown kind.")
        self.assertMalformed(_create_raw(kind=b"create" * 3), "A field of the group operation is too long.")
        self.assertMalformed(_create_raw(actor="Alice"), "The group operation's actor is not a valid name.")
        self.assertMalformed(_create_raw(actor=""), "The group operation's actor is not a valid name.")
        self.assertMalformed(_create_raw(actor="a" * 33), "A field of the group operation is too long.")
        self.assertMalformed(_create_raw(actor_fp=b"x" * 31),
                             "The group operation's actor's key fingerprint is not 32 bytes.")

    def test_bodies(self):
        self.assertMalformed(_create_raw(tail=b"\x00"), "The group operation has trailing bytes.")
        self.assertMalformed(_op_raw("leave", b"\x00\x00\x00\x00"), "The group operation has trailing bytes.")
        self.assertMalformed(_create_raw(name="-ops"), "The group operation's group name is not a valid name.")
        self.assertMalformed(_op_raw("rename", _lp_bytes(b"")), "The group operation's group name is not a valid name.")
        self.assertMalformed(_create_raw(topic="x" * 257), "A group's topic is at most 256 bytes of UTF-8.")
        self.assertMalformed(_op_raw("topic", _lp_bytes(b"\xff")), "The group's topic is not valid UTF-8.")
        self.assertMalformed(_create_raw(members=[("carol", _fp("carol")), ("bob", _fp("bob"))]),
                             "The group operation's users are not sorted without a name twice.")
        self.assertMalformed(_create_raw(members=[("bob", _fp("bob")), ("bob", _fp("bob"))]),
                             "The group operation's users are not sorted without a name twice.")
        self.assertMalformed(_create_raw(members=[("bob", b"x" * 33)]),
                             "The group operation's key fingerprint is not 32 bytes.")
        self.assertMalformed(_create_raw(members=[("bob", b"x" * 31)]),
                             "The group operation's key fingerprint is not 32 bytes.")
        self.assertMalformed(_create_raw(members=[("b\xe9b", _fp("bob"))]),
                             "The group operation's user is not a valid name.")
        self.assertMalformed(_op_raw("add", _u32(0)), "The group operation lists no user.")
        self.assertMalformed(_op_raw("remove", _u32(0)), "The group operation lists no user.")
        self.assertMalformed(_op_raw("remove", _u32(2 ** 32 - 1) + _lp_bytes(b"bob")),
                             "The group operation is truncated.")
        self.assertMalformed(_op_raw("remove", _lp_bytes(b"bob")), "The group operation is truncated.")
        self.assertMalformed(_op_raw("remove", _u32(2) + _lp_bytes(b"bob") + _lp_bytes(b"bob")),
                             "The group operation's users are not sorted without a name twice.")
        self.assertMalformed(_op_raw("promote", b""), "The group operation is truncated.")
        self.assertMalformed(_op_raw("demote", _lp_bytes(b"Bob")), "The group operation's user is not a valid name.")
        # A create may list nobody; its count is still there.
        self.assertEqual(pager.parse_group_op(_create_raw(members=())).members, ())
        self.assertMalformed(_create_raw(members=())[:-4], "The group operation is truncated.")

    def test_every_truncation(self):
        """Every proper prefix of an operation of each kind is refused."""
        ops = [_create_raw(members=[("bob", _fp("bob")), ("carol", _fp("carol"))], topic="t"),
               _op_raw("remove", _u32(1) + _lp_bytes(b"bob")), _op_raw("leave", b""),
               _op_raw("promote", _lp_bytes(b"bob"))]
        for raw in ops:
            pager.parse_group_op(raw)
            for n in range(len(raw)):
                self.assertRaises(pager.GroupOpError, pager.parse_group_op, raw[:n])

    @PROPERTY
    @given(st.binary(max_size=400))
    def test_random_bytes(self, data):
        """Arbitrary bytes, alone or after a valid prefix, parse or raise GroupOpError: never anything else."""
        for raw in (data, _create_raw()[:60] + data, _op_raw("add", data)):
            try:
                pager.parse_group_op(raw)
            except pager.GroupOpError:
                pass

    @PROPERTY
    @given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
    def test_any_flipped_byte(self, where, mask):
        """A valid operation with any byte changed parses to other fields (another hash) or raises GroupOpError."""
        raw = bytearray(_create_raw(members=[("bob", _fp("bob")), ("carol", _fp("carol"))], topic="t"))
        raw[where % len(raw)] ^= mask
        try:
            op = pager.parse_group_op(bytes(raw))
        except pager.GroupOpError:
            return
        self.assertNotEqual(op.hash, hashlib.sha256(_create_raw(
            members=[("bob", _fp("bob")), ("carol", _fp("carol"))], topic="t")).digest())


class SignatureTests(SynchronousTestCase):
    def setUp(self):
        self.key = _key("alice")
        self.raw = pager.encode_group_op(GID, 1, ZERO, "create", "alice", pager.fingerprint(self.key), T,
                                         name="ops", members=[("bob", pager.fingerprint(_key("bob")))])
        self.op = pager.parse_group_op(self.raw)
        self.signature = pager.sign_group_op(self.key, self.raw)

    def test_good(self):
        """The actor's signature verifies, given the parsed operation or its bytes; it is plain RSA-PSS (salt 32)."""
        pager.verify_group_op(_pub("alice"), self.op, self.signature)
        pager.verify_group_op(_pub("alice"), self.raw, self.signature)
        _pub("alice").verify(self.signature, self.raw, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                                   salt_length=32), hashes.SHA256())

    def test_bad(self):
        """A changed signature, or one over other bytes, raises BadSignature."""
        for i in (0, len(self.signature) // 2, len(self.signature) - 1):
            bad = bytearray(self.signature)
            bad[i] ^= 1
            error = self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("alice"), self.op, bytes(bad))
            self.assertEqual(error.message, "The group operation's signature does not verify.")
        other = pager.encode_group_op(GID, 1, ZERO, "create", "alice", pager.fingerprint(self.key), T + 1,
                                      name="ops", members=[("bob", pager.fingerprint(_key("bob")))])
        self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("alice"), other, self.signature)
        self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("alice"), self.op, b"")
        self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("alice"), self.op, "text")

    def test_other_key(self):
        """
        Another key is refused, whether it signed or not: the operation names its actor's key by fingerprint, so
        a server cannot pass off an operation under a key it substituted.
        """
        error = self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("bob"), self.op, self.signature)
        self.assertEqual(error.message, "The group operation names another key than the one given for alice.")
        by_bob = pager.sign_group_op(_key("bob"), self.raw)
        self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("bob"), self.op, by_bob)
        self.assertRaises(pager.BadSignature, pager.verify_group_op, _pub("alice"), self.op, by_bob)

    def test_malformed_bytes(self):
        """Bytes that are no operation are a GroupOpError before any key is looked at."""
        self.assertRaises(pager.GroupOpError, pager.verify_group_op, _pub("alice"), self.raw[:-1], self.signature)
        self.assertRaises(pager.GroupOpError, pager.verify_group_op, _pub("alice"), self.raw + b"x", self.signature)

    def test_not_an_envelope_signature(self):
        """An operation's signature is over the operation's own tag: no envelope or proof signs the same bytes."""
        self.assertTrue(self.raw.startswith(_lp_bytes(b"pager-group-op-v1")))
        self.assertFalse(pager.verify_auth(_pub("alice"), self.signature, "login", "0" * 32, "alice", bytes(32)))


class _Chain:
    """A group's chain under test: makes each operation on the current head and applies it."""

    def __init__(self, test, max_members=pager.DEFAULT_MAX_GROUP_MEMBERS):
        self.test, self.max = test, max_members
        self.state = pager.GroupState.empty(GID)
        self.ops = []

    def make(self, kind, actor, seq=None, prev=None, group_id=GID, **fields):
        seq = self.state.seq + 1 if seq is None else seq
        prev = self.state.head if prev is None else prev
        if kind in ("create", "add") and "members" in fields:
            fields["members"] = [(user, _fp(user)) for user in fields["members"]]
        return pager.parse_group_op(pager.encode_group_op(group_id, seq, prev, kind, actor, _fp(actor), T,
                                                          **fields))

    def do(self, kind, actor, **fields):
        op = self.make(kind, actor, **fields)
        state = self.state.apply(op, self.max)
        self.test.assertEqual((state.seq, state.head, state.group_id), (op.seq, op.hash, GID))
        self.state = state
        self.ops.append(op)
        return state

    def refused(self, sentence, kind, actor, error=pager.GroupRefused, **fields):
        op = fields.pop("op", None) or self.make(kind, actor, **fields)
        before = self.state
        e = self.test.assertRaises(error, self.state.apply, op, self.max)
        self.test.assertEqual(e.message, sentence)
        self.test.assertIs(self.state, before)
        return e


class ApplyTests(SynchronousTestCase):
    """Each rule of GroupState.apply, and the sentence of each refusal."""

    def setUp(self):
        self.chain = _Chain(self)
        self.chain.do("create", "alice", name="ops", topic="deploys", members=["bob", "carol"])

    def test_empty(self):
        """The state before the first operation: version 0, a zero head, nobody."""
        empty = pager.GroupState.empty(GID)
        self.assertEqual((empty.group_id, empty.seq, empty.head, empty.name, dict(empty.members), empty.admins,
                          dict(empty.joined)), (GID, 0, ZERO, None, {}, frozenset(), {}))
        self.assertFalse(empty.ended)

    def test_create(self):
        """The creator becomes a member (with the fingerprint the operation names) and the only admin."""
        state = self.chain.state
        self.assertEqual((state.seq, state.name, state.topic, state.label), (1, "ops", "deploys", "#ops"))
        self.assertEqual(dict(state.members), {"alice": _fp("alice"), "bob": _fp("bob"), "carol": _fp("carol")})
        self.assertEqual(list(state.members), ["alice", "bob", "carol"])
        self.assertEqual(state.admins, frozenset(["alice"]))
        self.assertEqual(dict(state.joined), {"alice": 1, "bob": 1, "carol": 1})
        self.assertTrue(state.is_member("bob") and state.is_admin("alice"))
        self.assertFalse(state.is_admin("bob") or state.is_member("dave"))
        with self.assertRaises(TypeError):
            state.members["eve"] = ZERO
        self.assertEqual(state.head, self.chain.ops[0].hash)

    def test_create_refusals(self):
        chain = _Chain(self)
        chain.refused("A group's first operation must create it.", "add", "alice", members=["bob"])
        chain.refused("A group's first operation must create it.", "leave", "alice")
        chain.refused("The creator of #ops is a member of it already: list the others only.", "create", "alice",
                      name="ops", members=["alice", "bob"])
        chain.refused("The operation does not extend the chain of #ops: it follows version 1, and #ops is at "
                      "version 0.", "create", "alice", name="ops", seq=2)
        chain.refused("The operation does not extend the chain of #ops: its previous hash is not that of version 0.",
                      "create", "alice", name="ops", prev=b"\x01" * 32)
        self.chain.refused("#ops exists already: only a group's first operation creates it.", "create", "bob",
                           name="ops2")

    def test_create_full(self):
        """Creator plus listed members may reach the limit, not pass it (GroupFull, code too_large)."""
        _Chain(self, max_members=3).do("create", "alice", name="ops", members=["bob", "carol"])
        error = _Chain(self, max_members=2).refused("#ops would have 3 members; a group has at most 2.", "create",
                                                    "alice", error=pager.GroupFull, name="ops",
                                                    members=["bob", "carol"])
        self.assertEqual(error.code, "too_large")
        members = ["m%03d" % i for i in range(256)]
        _Chain(self).refused("#ops would have 257 members; a group has at most 256.", "create", "alice",
                             error=pager.GroupFull, name="ops", members=members)
        self.assertEqual(len(_Chain(self).do("create", "alice", name="ops", members=members[:255]).members), 256)

    def test_chain(self):
        """An operation for another group, another version or on another head is refused."""
        c = self.chain
        c.refused("The operation is for another group.", "leave", "bob", group_id=OTHER_GID)
        c.refused("The operation does not extend the chain of #ops: it follows version 2, and #ops is at version 1.",
                  "leave", "bob", seq=3)
        c.refused("The operation does not extend the chain of #ops: it follows version 0, and #ops is at version 1.",
                  "leave", "bob", seq=1, prev=ZERO)
        c.refused("The operation does not extend the chain of #ops: its previous hash is not that of version 1.",
                  "leave", "bob", prev=ZERO)
        # Two admins at once: both build on version 2; the first applied wins, the second no longer extends.
        c.do("promote", "alice", user="bob")
        first, second = c.make("topic", "alice", topic="a"), c.make("topic", "bob", topic="b")
        c.state = c.state.apply(first)
        c.refused("The operation does not extend the chain of #ops: it follows version 2, and #ops is at version 3.",
                  None, None, op=second)

    def test_apply_needs_parsed(self):
        self.assertRaises(pager.GroupOpError, self.chain.state.apply, self.chain.ops[0].raw)

    def test_members_only(self):
        """Every operation after create is by a current member."""
        for kind, fields in (("add", dict(members=["eve"])), ("leave", {}), ("topic", dict(topic="x")),
                             ("remove", dict(users=["bob"]))):
            self.chain.refused("dave is not a member of #ops.", kind, "dave", **fields)

    def test_admins_only(self):
        """Add, remove, rename, topic, promote and demote are for admins; a member who is none is told so."""
        for kind, fields, words in (
                ("add", dict(members=["dave"]), "add members"), ("remove", dict(users=["carol"]), "remove members"),
                ("rename", dict(name="ops2"), "rename it"), ("topic", dict(topic="x"), "change its topic"),
                ("promote", dict(user="carol"), "make a member an admin"),
                ("demote", dict(user="alice"), "take a member's admin role away")):
            self.chain.refused("Only an admin of #ops can %s; bob is not one." % words, kind, "bob", **fields)

    def test_add(self):
        c = self.chain
        c.refused("carol is a member of #ops already.", "add", "alice", members=["carol", "dave"])
        state = c.do("add", "alice", members=["erin", "dave"])
        self.assertEqual(list(state.members), ["alice", "bob", "carol", "dave", "erin"])
        self.assertEqual(dict(state.joined), {"alice": 1, "bob": 1, "carol": 1, "dave": 2, "erin": 2})
        self.assertEqual(state.admins, frozenset(["alice"]))
        # A member removed and added again joined when last added.
        c.do("remove", "alice", users=["dave"])
        self.assertNotIn("dave", c.state.joined)
        self.assertEqual(c.do("add", "alice", members=["dave"]).joined["dave"], 4)

    def test_add_full(self):
        c = _Chain(self, max_members=4)
        c.do("create", "alice", name="ops", members=["bob"])
        c.do("add", "alice", members=["carol", "dave"])
        error = c.refused("#ops would have 5 members; a group has at most 4.", "add", "alice",
                          error=pager.GroupFull, members=["erin"])
        self.assertEqual(error.code, "too_large")
        c.do("remove", "alice", users=["bob"])
        c.do("add", "alice", members=["erin"])

    def test_remove(self):
        """An admin removes members, admins included (who stop being admins), but not themselves."""
        c = self.chain
        c.do("promote", "alice", user="bob")
        c.refused("An admin does not remove themselves from #ops: leave it instead (/group leave #ops).", "remove",
                  "alice", users=["alice", "carol"])
        c.refused("dave is not a member of #ops.", "remove", "alice", users=["carol", "dave"])
        state = c.do("remove", "alice", users=["bob", "carol"])
        self.assertEqual((list(state.members), state.admins), (["alice"], frozenset(["alice"])))
        self.assertEqual(dict(state.joined), {"alice": 1})
        c.refused("bob is not a member of #ops.", "leave", "bob")

    def test_remove_another_admin(self):
        """An admin may remove another admin, even the creator; the remover stays the admin."""
        c = self.chain
        c.do("promote", "alice", user="bob")
        state = c.do("remove", "bob", users=["alice"])
        self.assertEqual((list(state.members), state.admins), (["bob", "carol"], frozenset(["bob"])))

    def test_leave(self):
        """A member leaves; the last admin does so only when nobody else remains, which ends the group."""
        c = self.chain
        state = c.do("leave", "carol")
        self.assertEqual(list(state.members), ["alice", "bob"])
        c.refused("You are the last admin of #ops: make another member an admin first, then leave.", "leave", "alice")
        c.do("promote", "alice", user="bob")
        state = c.do("leave", "alice")
        self.assertEqual((list(state.members), state.admins), (["bob"], frozenset(["bob"])))
        self.assertFalse(state.ended)
        state = c.do("leave", "bob")
        self.assertEqual((dict(state.members), state.admins, dict(state.joined), state.seq),
                         ({}, frozenset(), {}, 5))
        self.assertTrue(state.ended)
        for kind, actor, fields in (("leave", "bob", {}), ("add", "bob", dict(members=["carol"])),
                                    ("topic", "alice", dict(topic="x"))):
            c.refused("#ops has no members left.", kind, actor, **fields)
        c.refused("#ops exists already: only a group's first operation creates it.", "create", "bob", name="ops",
                  members=["carol"])

    def test_leave_admin_among_admins(self):
        c = self.chain
        c.do("promote", "alice", user="carol")
        self.assertEqual(c.do("leave", "alice").admins, frozenset(["carol"]))

    def test_rename_and_topic(self):
        c = self.chain
        c.refused("#ops is called that already.", "rename", "alice", name="ops")
        state = c.do("rename", "alice", name="ops2")
        self.assertEqual((state.name, state.label), ("ops2", "#ops2"))
        self.assertEqual(c.do("topic", "alice", topic="").topic, "")
        self.assertEqual(c.do("topic", "alice", topic="caf\u00e9").topic, "caf\u00e9")
        c.refused("Only an admin of #ops2 can rename it; carol is not one.", "rename", "carol", name="x")

    def test_promote_demote(self):
        c = self.chain
        c.refused("dave is not a member of #ops.", "promote", "alice", user="dave")
        c.refused("alice is an admin of #ops already.", "promote", "alice", user="alice")
        c.refused("bob is not an admin of #ops.", "demote", "alice", user="bob")
        c.refused("alice is the last admin of #ops: make another member an admin first.", "demote", "alice",
                  user="alice")
        self.assertEqual(c.do("promote", "alice", user="bob").admins, frozenset(["alice", "bob"]))
        # A new admin has every right: it demotes the creator, who may no longer change the group.
        self.assertEqual(c.do("demote", "bob", user="alice").admins, frozenset(["bob"]))
        c.refused("Only an admin of #ops can add members; alice is not one.", "add", "alice", members=["dave"])
        c.do("promote", "bob", user="alice")
        self.assertEqual(c.do("demote", "alice", user="alice").admins, frozenset(["bob"]))

    def test_states_are_immutable(self):
        """apply returns a new state and leaves the old one as it was."""
        before = self.chain.state
        self.chain.do("add", "alice", members=["dave"])
        self.assertNotIn("dave", before.members)
        self.assertEqual(before.seq, 1)
        self.assertRaises(AttributeError, setattr, before, "seq", 5)


class FoldTests(SynchronousTestCase):
    def test_fold(self):
        """fold_group_ops gives the state after each operation; bytes and parsed operations alike."""
        c = _Chain(self)
        states = [c.do("create", "alice", name="ops", members=["bob"]), c.do("add", "alice", members=["carol"]),
                  c.do("remove", "alice", users=["bob"]), c.do("rename", "alice", name="ops2")]
        self.assertEqual(pager.fold_group_ops(GID, c.ops), states)
        self.assertEqual(pager.fold_group_ops(GID, [op.raw for op in c.ops]), states)
        self.assertEqual([sorted(s.members) for s in states],
                         [["alice", "bob"], ["alice", "bob", "carol"], ["alice", "carol"], ["alice", "carol"]])
        self.assertEqual(pager.fold_group_ops(GID, []), [])

    def test_fold_refuses(self):
        """A chain with a gap, an operation out of order, or one the rules refuse does not fold."""
        c = _Chain(self)
        c.do("create", "alice", name="ops", members=["bob"])
        c.do("add", "alice", members=["carol"])
        c.do("leave", "carol")
        self.assertRaises(pager.GroupRefused, pager.fold_group_ops, GID, [c.ops[0], c.ops[2]])
        self.assertRaises(pager.GroupRefused, pager.fold_group_ops, GID, [c.ops[1], c.ops[0]])
        self.assertRaises(pager.GroupRefused, pager.fold_group_ops, OTHER_GID, c.ops)
        self.assertRaises(pager.GroupFull, pager.fold_group_ops, GID, c.ops, max_members=2)
        self.assertRaises(pager.GroupOpError, pager.fold_group_ops, GID, [c.ops[0].raw[:-1]])


class GroupNameTests(SynchronousTestCase):
    def test_canonical(self):
        """One leading '#' is optional; the rest follows the user name rules, lower-cased."""
        for text in ("ops", "#ops", "#OPS", "Ops"):
            self.assertEqual(pager.canonical_group_name(text), "ops")
        self.assertEqual(pager.canonical_group_name("#a.b-c_1"), "a.b-c_1")
        for text in ("", "#", "##ops", "#-ops", "o p", "#" + "a" * 33, "\u212aops", None, 5):
            error = self.assertRaises(pager.BadRequest, pager.canonical_group_name, text)
            self.assertIn("#name", error.message)


# -- group envelopes --

class _GroupEnvelopeMixin:
    """Alice (identity device) sends to #ops: Bob's two devices, Carol's device and her own laptop."""

    HEAD = hashlib.sha256(b"head").digest()

    def setUp(self):
        self.bob_desk = _Device("bob", "bob", 11)
        self.bob_phone = _Device("bob", "bob-phone", 12, one_time=False)
        self.carol = _Device("carol", "carol", 13)
        self.laptop = _Device("alice", "alice-laptop", 14)
        self.devices = [self.bob_desk, self.bob_phone, self.carol, self.laptop]
        self.plaintext = os.urandom(2500)
        self.envelope = self.seal(self.plaintext)

    def seal(self, plaintext, group=None, targets=None, **kwargs):
        kwargs.setdefault("timestamp_ms", NOW * 1000)
        kwargs.setdefault("now", NOW)
        kwargs.setdefault("chunk_size", SMALL)
        targets = targets if targets is not None else [d.target() for d in self.devices]
        return pager.seal(_key("alice"), "alice", targets, plaintext, group=group or (GID, self.HEAD), **kwargs)


def _group_layout(header):
    """The documented group header's fields up to the entries, walked without parse_header: {name: bytes}."""
    fields, pos = {}, 0

    def take(n):
        nonlocal pos
        pos += n
        return header[pos - n:pos]

    def lp(name):
        fields[name] = take(struct.unpack(">I", take(4))[0])

    lp("tag")
    lp("message id")
    fields["timestamp"] = take(8)
    for name in ("sender", "sender fingerprint", "sender device", "group id", "group head", "content type",
                 "filename"):
        lp(name)
    fields["chunk size"], fields["count"] = take(4), take(4)
    return fields


class GroupEnvelopeTests(_GroupEnvelopeMixin, SynchronousTestCase):
    def test_round_trip(self):
        """Every member device opens the message, which names its group and head, from the signed header."""
        header = pager.parse_header(self.envelope.header)
        self.assertEqual((header.version, header.group_id, header.group_head), (2, GID, self.HEAD))
        self.assertEqual(header.recipient_names, ["alice", "bob", "carol"])
        for device in self.devices:
            opened = device.open(self.envelope, _pub("alice"))
            self.assertEqual(bytes(opened.plaintext), self.plaintext)
            self.assertEqual((opened.group_id, opened.group_head, opened.sender), (GID, self.HEAD, "alice"))
            self.assertEqual(opened.recipients, ("bob", "carol"))

    def test_layout(self):
        """The group tag, then fields 1-6 as in a 1:1 header, then the group id and head (6a, 6b), then the rest."""
        fields = _group_layout(self.envelope.header)
        self.assertEqual(fields["tag"], b"pager-group-envelope-v1")
        self.assertEqual((fields["sender"], fields["sender device"]), (b"alice", pager.device_id(_key("alice"))))
        self.assertEqual((fields["group id"], fields["group head"]), (GID, self.HEAD))
        self.assertEqual((fields["content type"], fields["filename"]), (b"text", b""))
        self.assertEqual(struct.unpack(">II", fields["chunk size"] + fields["count"]), (SMALL, 4))

    def test_one_to_one_unchanged(self):
        """A message sealed without a group has the 1:1 tag and no group fields."""
        envelope = pager.seal(_key("alice"), "alice", [self.bob_desk.target()], b"hi", timestamp_ms=NOW * 1000,
                              now=NOW)
        header = pager.parse_header(envelope.header)
        self.assertEqual((header.group_id, header.group_head), (None, None))
        self.assertTrue(envelope.header.startswith(_lp_bytes(b"pager-envelope-v2")))
        opened = self.bob_desk.open(envelope, _pub("alice"))
        self.assertEqual((opened.group_id, opened.group_head), (None, None))

    def _retagged(self, header, tag):
        """C{header} with its tag replaced by C{tag}, every other byte as it was."""
        n = struct.unpack(">I", header[:4])[0]
        return _lp_bytes(tag) + header[4 + n:]

    def test_tags_are_not_interchangeable(self):
        """A group header given the 1:1 tag does not parse, nor does a 1:1 header given the group tag."""
        self.assertRaises(pager.MalformedEnvelope, pager.parse_header,
                          self._retagged(self.envelope.header, pager.ENVELOPE_TAG))
        one = pager.seal(_key("alice"), "alice", [self.bob_desk.target()], b"hi", timestamp_ms=NOW * 1000, now=NOW)
        self.assertRaises(pager.MalformedEnvelope, pager.parse_header,
                          self._retagged(one.header, pager.GROUP_ENVELOPE_TAG))

    def test_as_one_to_one_does_not_verify(self):
        """
        A recipient who rewrites a group message as a 1:1 message (dropping the group fields, re-encrypting the
        chunks with the content key it knows) cannot make the sender's signature cover it.
        """
        header = pager.parse_header(self.envelope.header)
        content_key = self._unwrap_key()
        forged = pager._encode_header(header.message_id, header.timestamp_ms, header.sender,
                                      header.sender_fingerprint, header.sender_device, header.content_type,
                                      header.filename, header.chunk_size, list(header.entries), header.commitment)
        envelope = pager.Envelope(forged, self._encrypt(forged, content_key), self.envelope.signature)
        self.assertEqual(pager.parse_header(forged).group_id, None)
        self.assertRaises(pager.BadSignature, self.bob_desk.open, envelope, _pub("alice"))

    def _unwrap_key(self):
        """The content key, as Bob's desk (a member, so a possible forger) unwraps it."""
        header = pager.parse_header(self.envelope.header)
        entry = header.entry("bob", self.bob_desk.id)
        return pager.Opener._x25519_unwrap(header, "bob", entry, self.bob_desk.prekeys)

    def _encrypt(self, header, content_key):
        size = pager.parse_header(header).chunk_size
        pieces = [self.plaintext[i:i + size] for i in range(0, len(self.plaintext), size)]
        aead, ad = AESGCM(content_key), hashlib.sha256(header).digest()
        return [aead.encrypt(i.to_bytes(11, "big") + (b"\x01" if i == len(pieces) - 1 else b"\x00"), p, ad)
                for i, p in enumerate(pieces)]

    def test_group_fields_signed(self):
        """
        Another group id or head in the header: the server's verifier refuses the signature, and so does a
        recipient, even when the forger re-encrypts the chunks under the changed header.
        """
        header = pager.parse_header(self.envelope.header)
        content_key = self._unwrap_key()
        for group in ((OTHER_GID, self.HEAD), (GID, hashlib.sha256(b"other head").digest())):
            forged = pager._encode_header(
                header.message_id, header.timestamp_ms, header.sender, header.sender_fingerprint,
                header.sender_device, header.content_type, header.filename, header.chunk_size, list(header.entries),
                header.commitment, group=group)
            self.assertEqual((pager.parse_header(forged).group_id, pager.parse_header(forged).group_head), group)
            verifier = pager.EnvelopeVerifier(forged)
            for chunk in self.envelope.chunks:
                verifier.update(chunk)
            self.assertRaises(pager.BadSignature, verifier.verify, self.envelope.signature, _pub("alice"))
            # As is: the chunks no longer authenticate (the header is their associated data).
            self.assertRaises(pager.EnvelopeError, self.bob_desk.open,
                              pager.Envelope(forged, self.envelope.chunks, self.envelope.signature), _pub("alice"))
            # Re-encrypted by a member who knows the content key: the signature still fails.
            envelope = pager.Envelope(forged, self._encrypt(forged, content_key), self.envelope.signature)
            self.assertRaises(pager.BadSignature, self.carol.open, envelope, _pub("alice"))
        # The untouched envelope verifies (the forgery, not the method, is what fails).
        verifier = pager.EnvelopeVerifier(self.envelope.header)
        for chunk in self.envelope.chunks:
            verifier.update(chunk)
        verifier.verify(self.envelope.signature, _pub("alice"))
        envelope = pager.Envelope(self.envelope.header, self._encrypt(self.envelope.header, content_key),
                                  self.envelope.signature)
        self.assertEqual(bytes(self.carol.open(envelope, _pub("alice")).plaintext), self.plaintext)

    def test_group_field_lengths(self):
        """A group id of another length than 16, or a head of another length than 32, is malformed."""
        header = pager.parse_header(self.envelope.header)
        for group in ((GID[:15], self.HEAD), (GID + b"x", self.HEAD), (GID, self.HEAD[:31]), (GID, b"")):
            raw = pager._encode_header(
                header.message_id, header.timestamp_ms, header.sender, header.sender_fingerprint,
                header.sender_device, header.content_type, header.filename, header.chunk_size, list(header.entries),
                header.commitment, group=group)
            error = self.assertRaises(pager.MalformedEnvelope, pager.parse_header, raw)
            self.assertEqual(error.message, "The group id or the membership head has the wrong length.")
        for n in range(len(self.envelope.header)):
            self.assertRaises(pager.MalformedEnvelope, pager.parse_header, self.envelope.header[:n])

    def test_sealer_group_argument(self):
        """group must be (16 bytes, 32 bytes)."""
        for group in ((GID[:15], self.HEAD), (GID, self.HEAD[:31]), ("ab" * 8, self.HEAD), (GID, None)):
            self.assertRaises(ValueError, self.seal, b"x", group=group)
        self.assertRaises((ValueError, TypeError), self.seal, b"x", group=(GID,))


def _fake_entry(name, i):
    """An X25519 entry that parses (its bytes are not a real wrap): enough to test header limits."""
    return pager.Wrap(name, i.to_bytes(16, "big"), pager.WRAP_X25519, b"w" * 48, 1, 0, b"e" * 32)


def _header(entries, group=(GID, ZERO)):
    return pager._encode_header(b"m" * 16, T, "alice", _fp("alice"), b"d" * 16, "text", "", SMALL,
                                sorted(entries, key=pager._wrap_order), ZERO, group=group)


class GroupLimitTests(SynchronousTestCase):
    def test_wraps(self):
        """A group header holds up to MAX_GROUP_WRAPS entries; a 1:1 header still MAX_WRAPS."""
        entries = [_fake_entry("m%03d" % (i % 200), i) for i in range(pager.MAX_GROUP_WRAPS)]
        self.assertEqual(len(pager.parse_header(_header(entries)).entries), 2048)
        error = self.assertRaises(pager.MalformedEnvelope, pager.parse_header,
                                  _header(entries + [_fake_entry("m000", 99999)]))
        self.assertEqual(error.message, "A group message has 1 to 2048 wrapped keys.")
        self.assertRaises(pager.MalformedEnvelope, pager.parse_header, _header([]))
        few = [_fake_entry("m%03d" % (i % 60), i) for i in range(pager.MAX_WRAPS + 1)]
        error = self.assertRaises(pager.MalformedEnvelope, pager.parse_header, _header(few, group=None))
        self.assertEqual(error.message, "A message has 1 to 512 wrapped keys.")
        pager.parse_header(_header(few))

    def test_names(self):
        """A group header names at most 256 users, the sender included; a 1:1 header 64 besides the sender."""
        members = [_fake_entry("m%03d" % i, i) for i in range(255)]
        pager.parse_header(_header(members))
        pager.parse_header(_header(members + [_fake_entry("alice", 999)]))  # the sender's other device
        error = self.assertRaises(pager.MalformedEnvelope, pager.parse_header,
                                  _header(members + [_fake_entry("zz", 999)]))
        self.assertEqual(error.message, "A group message names at most 256 members, its sender included.")
        self.assertRaises(pager.MalformedEnvelope, pager.parse_header, _header(members[:65], group=None))
        pager.parse_header(_header(members[:64], group=None))

    def test_sealer_limits(self):
        """The Sealer refuses a group message to more devices or members than a group header holds."""
        device = _Device("bob", "bob", 21)
        spk = device.signed

        def targets(names_and_counts):
            out = []
            for name, count in names_and_counts:
                for i in range(count):
                    signed = pager.SignedPrekey(name, i.to_bytes(16, "big"), spk.prekey_id, spk.public,
                                                spk.valid_from, spk.valid_until, b"")
                    out.append(pager.DeviceTarget(name, i.to_bytes(16, "big"), signed_prekey=signed))
            return out

        seal = lambda t: pager.Sealer(_key("alice"), "alice", t, timestamp_ms=NOW * 1000, now=NOW,
                                      group=(GID, ZERO))
        self.assertRaises(ValueError, seal, targets([("m%03d" % i, 1) for i in range(256)]))
        sealer = seal(targets([("m%03d" % i, 1) for i in range(255)]))
        self.assertEqual(len(pager.parse_header(sealer.header).entries), 255)
        self.assertRaises(ValueError, seal, targets([("m%03d" % i, 9) for i in range(228)]))  # 2052 devices
        self.assertRaises(ValueError, seal, [])
        # The 1:1 limits are unchanged: 65 recipients is too many without a group.
        self.assertRaises(ValueError, pager.Sealer, _key("alice"), "alice",
                          targets([("m%03d" % i, 1) for i in range(65)]), timestamp_ms=NOW * 1000, now=NOW)


# -- PROTOCOL.md's section 6.14 --

def _protocol_section(number):
    """The text of PROTOCOL.md's section C{number} (e.g. "6.14"), up to the next heading of its level or above."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "PROTOCOL.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^### %s .*?(?=^##[# ]? |\Z)" % re.escape(number), text, re.M | re.S)
    assert match is not None, "PROTOCOL.md has no section %s" % number
    return match.group(0)


def _code_blocks(section, info=""):
    """The fenced code blocks of C{section} whose info string is C{info}, in order."""
    return re.findall(r"^```%s\n(.*?)^```$" % re.escape(info), section, re.M | re.S)


class ProtocolExampleTests(SynchronousTestCase):
    """The worked example of PROTOCOL.md section 6.14 is what the code makes, and its OpenSSL commands work."""

    def setUp(self):
        self.section = _protocol_section("6.14")

    def test_worked_example(self):
        """The example's bytes, read off the document, are encode_group_op's for its inputs, and so is the hash."""
        [block] = [b for b in _code_blocks(self.section) if "lp(\"pager-group-op-v1\")" in b and "#" not in b]
        data = ""
        for line in block.splitlines():
            for token in line.split():
                if not re.fullmatch("[0-9a-f]+", token):
                    break
                data += token
        raw = pager.encode_group_op(bytes(range(16)), 1, bytes(32), "create", "alice", bytes(range(32, 64)),
                                    1700000000000, name="ops", topic="deploys",
                                    members=[("bob", bytes(range(64, 96)))])
        self.assertEqual(bytes.fromhex(data), raw)
        self.assertIn("; %d bytes:" % len(raw), self.section)
        op = pager.parse_group_op(raw)
        self.assertEqual((op.kind, op.name, op.topic, op.members), ("create", "ops", "deploys",
                                                                    (("bob", bytes(range(64, 96))),)))
        self.assertIn("`%s`" % op.hash.hex(), self.section)
        self.assertEqual(pager.GroupState.empty(bytes(range(16))).apply(op).head, op.hash)

    def test_openssl_commands(self):
        """
        The section's shell commands, run on an operation signed with a real key: the fingerprint twice, Verified
        OK, the hash; and a changed byte fails.
        """
        for tool in ("openssl", "xxd", "sh"):
            if shutil.which(tool) is None:
                raise SkipTest("%s is not installed" % tool)
        [script] = _code_blocks(self.section, "sh")
        directory = self.mktemp()
        os.makedirs(directory)
        key = _key("alice")
        raw = pager.encode_group_op(os.urandom(16), 1, bytes(32), "create", "alice", pager.fingerprint(key), T,
                                    name="ops", members=[("bob", pager.fingerprint(_key("bob")))])
        files = {"op.bin": raw, "op.sig": pager.sign_group_op(key, raw),
                 "alice.pub.pem": pager.public_key_pem(key).encode("ascii")}
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)

        def run():
            result = subprocess.run(["sh", "-c", script], cwd=directory, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=60)
            return result.stdout.decode().split("\n")

        lines = run()
        self.assertEqual(lines[:4], [pager.fingerprint(key).hex()] * 2
                         + ["Verified OK", hashlib.sha256(raw).hexdigest()])
        altered = bytearray(raw)
        altered[-1] ^= 1
        with open(os.path.join(directory, "op.bin"), "wb") as f:
            f.write(bytes(altered))
        lines = run()
        self.assertIn("Verification failure", lines)
        self.assertNotIn("Verified OK", lines)


class ChainPropertyTests(SynchronousTestCase):
    """Random sequences of operations: the rules either apply one or refuse it, and the state stays consistent."""

    USERS = ("alice", "bob", "carol", "dave", "erin")

    @PROPERTY
    @given(st.lists(st.tuples(st.sampled_from(pager.GROUP_OP_KINDS[1:]), st.integers(0, 4),
                              st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True)), max_size=40))
    def test_invariants(self, steps):
        """
        After every step: admins are members, there is an admin while there are members, joined names exactly the
        members, and a refused operation leaves the state as it was (every refusal is a GroupRefused).
        """
        chain = _Chain(self, max_members=4)
        chain.do("create", "alice", name="ops", members=["bob"])
        for kind, actor, targets in steps:
            names = [self.USERS[i] for i in targets]
            fields = {"add": dict(members=names), "remove": dict(users=names), "leave": {},
                      "rename": dict(name="ops%d" % targets[0]), "topic": dict(topic="t%d" % targets[0]),
                      "promote": dict(user=names[0]), "demote": dict(user=names[0])}[kind]
            op = chain.make(kind, self.USERS[actor], **fields)
            before = chain.state
            try:
                state = before.apply(op, chain.max)
            except pager.GroupRefused:
                continue
            self.assertEqual((state.seq, state.head), (before.seq + 1, op.hash))
            self.assertLessEqual(state.admins, set(state.members))
            self.assertEqual(set(state.joined), set(state.members))
            self.assertLessEqual(len(state.members), 4)
            self.assertEqual(bool(state.admins), bool(state.members))
            self.assertIn(op.actor, before.members)
            if kind != "leave":
                self.assertIn(op.actor, before.admins)
            chain.state = state
            chain.ops.append(op)
        self.assertEqual(pager.fold_group_ops(GID, chain.ops, 4)[-1], chain.state)
