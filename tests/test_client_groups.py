"""
The client library's side of groups, over a real server on loopback: changes made through the API (create, add,
remove, leave, rename, topic, admin), the membership chain verified against pinned keys (a forged op, an op by a
non-admin, a key substituted in an add or for a member not pinned yet, history vouched for by an add that does
not verify, a refused op withheld, a reader the server adds without a signed op), group messages sealed to
the chain's members only and bound to their group, two admins at once, offline members, receipts per member, the
group_changed push, and the outbox keeping a group message across a restart.
"""

import dataclasses
import os
import sqlite3
import time
import types

from twisted.internet import defer, reactor
from twisted.trial import unittest

import pager
from tests.test_client_devices import DeviceClientTestCase
from tests.test_e2e import E2ETestCase, key, token


class GroupRecorder:
    """What a client hands to on_group_event and on_group_warning."""

    def __init__(self, client):
        self.events, self.warnings = [], []
        client.on_group_event = self.events.append
        client.on_group_warning = lambda gid, name, sentence: self.warnings.append((gid, name, sentence))


class GroupTestCase(E2ETestCase):

    async def setUp(self):
        self.server, self.address = await self.start_server()

    async def user(self, name):
        """A new account C{name}, logged in and receiving, recording its group events and warnings."""
        client = await self.register(self.address, name)
        client.groups_seen = GroupRecorder(client)
        return client

    async def relogin(self, name, **kwargs):
        client = await self.connect(self.address, **kwargs)
        client.groups_seen = GroupRecorder(client)
        await client.login(name, token(name), key(name))
        return client

    def texts(self, client):
        return [bytes(m.plaintext) for m in client.events.messages]

    def capture_sends(self, client):
        """The envelopes' headers C{client} sends from now on (parsed), in a list."""
        sent, request = [], client.protocol.request

        def recording(kind, **fields):
            if kind == "send":
                sent.append(pager.parse_header(pager.base64.b64decode(fields["header"])))
            return request(kind, **fields)
        client.protocol.request = recording
        return sent

    async def members_of(self, client, group):
        return list((await client.group(group)).members)

    async def wait_members(self, client, group, members):
        """Wait until C{client}'s verified chain of C{group} has exactly C{members}."""
        async def check():
            return (await client.group(group)).members == tuple(sorted(members))
        await self.wait_for(check, "%s to see %s with %s" % (client.user, group, sorted(members)))

    async def inject_op(self, gid, raw, signature, signer):
        """Store an op in the server's chain as a lying server would: no check at all, the cache forgotten."""
        op = pager.parse_group_op(raw)

        def txn(t):
            t.execute("INSERT INTO group_ops (gid, seq, op, signature, signer, at) VALUES (?, ?, ?, ?, ?, 0)",
                      (gid, op.seq, raw, signature, signer))
            t.execute("UPDATE groups SET seq = ?, head = ? WHERE gid = ?", (op.seq, op.hash, gid))
        await self.server.store._run(txn)
        self.server.factory._groups.pop(gid, None)


class ChangesTests(GroupTestCase):

    async def test_create_send_receive(self):
        """alice creates #ops with bob; bob learns it from the push, and alice's message reaches him with the group."""
        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("#ops", ["bob"], topic="on call")
        self.assertEqual((info.name, info.label, info.topic, info.seq, info.members, info.admins, info.member),
                         ("ops", "#ops", "on call", 1, ("alice", "bob"), ("alice",), True))
        await self.wait_for(lambda: bob.groups_seen.events, "bob's group event")
        [event] = bob.groups_seen.events
        self.assertEqual((event.group_id, event.name, event.seq, event.kind, event.actor, event.users, event.text),
                         (info.id, "ops", 1, "create", "alice", ("bob",), "on call"))
        msg = await alice.send_group("#ops", "hello ops")
        await self.wait_for(lambda: bob.events.messages, "bob's group message")
        [message] = bob.events.messages
        self.assertEqual((bytes(message.plaintext), message.group_id.hex(), message.group_name, message.group_note,
                          message.message_id.hex()), (b"hello ops", info.id, "ops", None, msg))
        self.assertEqual((bob.groups_seen.warnings, alice.groups_seen.warnings), ([], []))

    async def test_every_change_through_the_api(self):
        """
        add, rename, topic, admin (promote, demote), remove and leave: each is one signed op on the head; every
        member's client verifies it, is told it as a GroupEvent, and ends with the same head and members.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob"])
        gid = info.id
        self.assertEqual((await alice.group_add(gid, ["carol", "bob"])).members, ("alice", "bob", "carol"))
        await self.wait_members(carol, gid, ["alice", "bob", "carol"])
        self.assertEqual([(e.seq, e.kind, e.users) for e in carol.groups_seen.events],
                         [(2, "add", ("carol",))])  # from her add on: what came before is history
        self.assertEqual((await alice.group_rename("#ops", "#ops2")).label, "#ops2")
        self.assertEqual((await alice.group_topic("ops2", "pager duty")).topic, "pager duty")
        self.assertEqual((await alice.group_admin("ops2", "bob")).admins, ("alice", "bob"))
        self.assertEqual((await alice.group_admin("ops2", "bob")).seq, 5)  # an admin already: nothing to do
        await self.wait_for(lambda: len(bob.groups_seen.events) == 5, "bob's five events")
        after = await bob.group_remove("ops2", ["carol"])
        self.assertEqual((after.members, after.seq), (("alice", "bob"), 6))
        self.assertEqual((await bob.group_admin("ops2", "alice", admin=False)).admins, ("bob",))
        left = await alice.group_leave("ops2")
        self.assertEqual((left.member, left.members, left.seq), (False, ("bob",), 8))
        await self.wait_for(lambda: len(bob.groups_seen.events) == 8, "bob's eight events")
        self.assertEqual([(e.seq, e.kind, e.actor, e.users, e.text, e.name) for e in bob.groups_seen.events], [
            (1, "create", "alice", ("bob",), "", "ops"), (2, "add", "alice", ("carol",), "", "ops"),
            (3, "rename", "alice", (), "ops", "ops2"), (4, "topic", "alice", (), "pager duty", "ops2"),
            (5, "promote", "alice", ("bob",), "", "ops2"), (6, "remove", "bob", ("carol",), "", "ops2"),
            (7, "demote", "bob", ("alice",), "", "ops2"), (8, "leave", "alice", (), "", "ops2")])
        await self.wait_for(lambda: len(carol.groups_seen.events) == 5, "carol's events up to her removal")
        self.assertFalse((await carol.group(gid)).member)
        self.assertEqual((await carol.group(gid)).seq, 6)
        self.assertEqual((await alice.group(gid)).head, (await bob.group(gid)).head)
        for client in (alice, bob, carol):
            self.assertEqual(client.groups_seen.warnings, [])

    async def test_refused_changes(self):
        """
        A non-admin's change is refused with the rule's sentence before anything is signed; so is the last admin's
        leaving, a create under a name in use, and asking for a group nobody is in.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        await alice.group_create("ops", ["bob"])
        await self.wait_for(lambda: bob.groups_seen.events, "bob's event")
        with self.assertRaises(pager.GroupRefused):
            await bob.group_rename("ops", "mine")
        with self.assertRaises(pager.GroupRefused) as caught:
            await alice.group_leave("ops")
        self.assertIn("last admin", caught.exception.message)
        with self.assertRaises(pager.GroupExists):
            await bob.group_create("#ops")
        with self.assertRaises(pager.UnknownGroup):
            await bob.group("#nowhere")


class MessageTests(GroupTestCase):

    async def test_new_member_gets_only_later_messages(self):
        """carol, added after alice's first message, gets only the second; bob gets both."""
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await alice.group_create("ops", ["bob"])
        await alice.send_group("ops", "before carol")
        await alice.group_add("ops", ["carol"])
        await alice.send_group("ops", "with carol")
        await self.wait_for(lambda: len(bob.events.messages) == 2 and carol.events.messages, "the messages")
        await self.no_pending(self.server, "carol")
        self.assertEqual(self.texts(bob), [b"before carol", b"with carol"])
        self.assertEqual(self.texts(carol), [b"with carol"])

    async def test_removed_member_gets_nothing(self):
        """After carol's removal no envelope has an entry for her, and she receives nothing."""
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await alice.group_create("ops", ["bob", "carol"])
        await alice.send_group("ops", "all three")
        await self.wait_for(lambda: carol.events.messages, "carol's first message")
        await alice.group_remove("ops", ["carol"])
        sent = self.capture_sends(alice)
        await alice.send_group("ops", "without carol")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "bob's second message")
        await self.no_pending(self.server, "carol")
        self.assertEqual(self.texts(carol), [b"all three"])
        self.assertEqual([h.recipient_names for h in sent], [["bob"]])

    async def test_left_member_cannot_post(self):
        """bob left: his client refuses to send to the group, and an envelope he sealed before is refused too."""
        alice, bob = await self.user("alice"), await self.user("bob")
        await alice.group_create("ops", ["bob"])
        await self.wait_for(lambda: bob.groups_seen.events, "bob's event")
        _, early = await bob.seal_group("ops", "sealed before leaving")
        await bob.group_leave("ops")
        with self.assertRaises(pager.Forbidden) as caught:
            await bob.send_group("ops", "after leaving")
        self.assertIn("not a member of #ops", caught.exception.message)
        with self.assertRaises((pager.Forbidden, pager.UnknownGroup)):
            await bob._send_envelope(None, early, group=bytes.fromhex((await bob.group("ops")).id))
        await self.no_pending(self.server, "alice")
        self.assertEqual(alice.events.messages, [])

    async def test_offline_member_gets_queued_messages_at_login(self):
        """bob is offline while alice sends twice; at login both come, each with its group."""
        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await self.offline(self.server, bob)
        answer = await alice.post_group("ops", "one")
        self.assertEqual(answer["queued"], ["bob"])
        await alice.send_group("ops", "two")
        bob = await self.relogin("bob")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "bob's queued messages")
        self.assertEqual(self.texts(bob), [b"one", b"two"])
        self.assertEqual({(m.group_id.hex(), m.group_name) for m in bob.events.messages}, {(info.id, "ops")})

    async def test_own_other_device(self):
        """
        alice's linked laptop gets her group messages (as sent by her) and bob's, verifies the chain itself, and
        makes no change: the identity key signs those.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        await alice.group_create("ops", ["bob"])
        laptop = await DeviceClientTestCase.link(self, alice, "alice-laptop")
        laptop.groups_seen = GroupRecorder(laptop)
        self.assertEqual((await laptop.group("#ops")).members, ("alice", "bob"))
        sent = self.capture_sends(alice)
        await alice.send_group("ops", "from the desk")
        self.assertEqual(sent[0].devices_of("alice"), [pager.device_id(key("alice-laptop"))])
        await bob.send_group("ops", "hello both")
        await self.wait_for(lambda: len(laptop.events.messages) == 2, "the laptop's two messages")
        self.assertEqual([(m.sender, bytes(m.plaintext), m.group_name) for m in laptop.events.messages],
                         [("alice", b"from the desk", "ops"), ("bob", b"hello both", "ops")])
        with self.assertRaises(pager.NotIdentityDevice):
            await laptop.group_topic("ops", "from the laptop")
        await laptop.send_group("ops", "but it may talk")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "bob's message from the laptop")

    async def test_header_too_large_for_a_line(self):
        """A group header that would not fit one line of the server's is refused before sending, with the numbers."""
        alice, _ = await self.user("alice"), await self.user("bob")
        await alice.group_create("ops", ["bob"])
        alice.protocol.limits = dict(alice.protocol.limits, max_line=1500)
        sent = self.capture_sends(alice)
        with self.assertRaises(pager.TooLarge) as caught:
            await alice.send_group("ops", "too many wraps for this server")
        self.assertIn("holds 1 wrapped key (", caught.exception.message)
        self.assertIn("max_line 1 KiB", caught.exception.message)
        self.assertEqual(sent, [])

    async def test_receipts_per_member(self):
        """Each member's receipt of a group message is recorded: group_delivery names who has it."""
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob", "carol"])
        msg = await alice.send_group("ops", "tick tick")
        await self.wait_for(lambda: len(alice.events.receipts) == 2, "both receipts")
        group, members, receipts = await alice.group_delivery(msg)
        self.assertEqual((group.id, members), (info.id, ["bob", "carol"]))
        self.assertEqual({user: status for user, (status, _, _) in receipts.items()},
                         {"bob": "delivered", "carol": "delivered"})
        self.assertIsNone(await alice.group_delivery("00" * 16))

    async def test_group_changed_push_updates_members(self):
        """alice adds carol: bob's client, told by the push, verifies the op and lists carol without asking."""
        alice, bob, _ = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        requests, request = [], bob.protocol.request
        bob.protocol.request = lambda kind, **fields: (requests.append(kind), request(kind, **fields))[1]
        await alice.group_add("ops", ["carol"])
        await self.wait_for(lambda: len(bob.groups_seen.events) == 2, "bob's add event")
        self.assertEqual(bob.groups_seen.events[-1].users, ("carol",))
        self.assertEqual(await self.members_of(bob, "ops"), ["alice", "bob", "carol"])
        self.assertIn("group_ops", requests)

    async def test_two_admins_at_once_converge(self):
        """alice and bob (both admins) add at once: one is refused group_changed, rebuilt on the new head, and both
        clients end with the same head and members."""
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.user("carol"), await self.user("dave")
        await alice.group_create("ops", ["bob"])
        await alice.group_admin("ops", "bob")
        await self.wait_for(lambda: len(bob.groups_seen.events) == 2, "bob's promotion")
        changed = []
        for client in (alice, bob):
            request = client.protocol.request

            def counting(kind, request=request, **fields):
                d = request(kind, **fields)
                d.addErrback(lambda f: (changed.append(f.check(pager.GroupChanged)), f)[1])
                return d
            client.protocol.request = counting
        await defer.gatherResults([defer.Deferred.fromCoroutine(alice.group_add("ops", ["carol"])),
                                   defer.Deferred.fromCoroutine(bob.group_add("ops", ["dave"]))])
        self.assertIn(pager.GroupChanged, changed)
        await self.wait_for(lambda: len(alice.groups_seen.events) == 4 and len(bob.groups_seen.events) == 4,
                            "both adds on both")
        a, b = await alice.group("ops"), await bob.group("ops")
        self.assertEqual((a.seq, a.head, a.members), (b.seq, b.head, b.members))
        self.assertEqual(a.members, ("alice", "bob", "carol", "dave"))

    async def test_replay_into_another_group_or_as_one_to_one_refused(self):
        """
        A group message's envelope names its group and head under the signature: the server refuses it sent to
        another group or as a 1:1 message, and a client that is not a member of the group it names refuses it.
        """
        alice, bob, dave = await self.user("alice"), await self.user("bob"), await self.user("dave")
        await alice.group_create("ops", ["bob"])
        await alice.group_create("dev", ["bob", "dave"])
        ops = bytes.fromhex((await alice.group("ops")).id)
        dev = bytes.fromhex((await alice.group("dev")).id)
        _, envelope = await alice.seal_group("ops", "for ops only")
        with self.assertRaises(pager.BadRequest):
            await alice._send_envelope(None, envelope, group=dev)
        with self.assertRaises(pager.BadRequest):
            await alice._send_envelope(["bob"], envelope)
        # Sealed to dave's devices, naming #ops, which dave is not in: his client refuses it.
        state = (await alice.group("ops")).state
        targets = await alice.device_targets(["dave"])
        forged = pager.seal(key("alice"), "alice", targets, b"sneaked in", sender_fingerprint=alice.identity_fp,
                            group=(ops, state.head))
        incoming = pager._Incoming("%s" % pager.parse_header(forged.header).message_id.hex(), "alice", None,
                                   forged.header, list(forged.chunks), forged.signature)
        request = dave.protocol.request  # the server holds no such message: its reject is answered here
        dave.protocol.request = lambda kind, **fields: (defer.succeed({"type": "ok"}) if kind == "reject"
                                                        else request(kind, **fields))
        await dave._handle_message(incoming)
        [(_, sender, error)] = dave.events.rejected
        self.assertIsInstance(error, pager.NotInGroup)
        self.assertEqual(dave.events.messages, [])


    async def hand(self, client, sender, group, head, text):
        """An envelope from C{sender} to C{client}'s devices naming C{group} at C{head}, handed to C{client} as if
        pushed (a reject is answered here: the server never held it)."""
        sending = await self.login(self.address, sender, receive=False)
        targets = await sending.device_targets([client.user])
        await sending.close()
        envelope = pager.seal(key(sender), sender, targets, text, sender_fingerprint=pager.fingerprint(key(sender)),
                              group=(group, head))
        incoming = pager._Incoming(pager.parse_header(envelope.header).message_id.hex(), sender, None,
                                   envelope.header, list(envelope.chunks), envelope.signature)
        request = client.protocol.request
        client.protocol.request = lambda kind, **fields: (defer.succeed({"type": "ok"}) if kind == "reject"
                                                          else request(kind, **fields))
        try:
            await client._handle_message(incoming)
        finally:
            client.protocol.request = request

    async def test_versions_named_by_messages(self):
        """
        A message sealed for an earlier version this client verified is shown as any other (it waited while the
        group changed); one from a sender who has left since, with a note saying so; one for a version this client
        cannot verify is shown (its sender a current member) with a note and a warning; one whose sender was not a
        member in the version it names is refused.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        first = await alice.group_create("ops", ["bob"])
        gid = bytes.fromhex(first.id)
        await alice.group_add("ops", ["carol"])
        await self.wait_for(lambda: len(bob.groups_seen.events) == 2, "bob's two events")
        await self.hand(bob, "alice", gid, first.head, b"from version 1")
        [message] = bob.events.messages
        self.assertEqual((bytes(message.plaintext), message.group_note), (b"from version 1", None))
        await self.hand(bob, "alice", gid, os.urandom(32), b"from nowhere")
        self.assertEqual((bytes(bob.events.messages[-1].plaintext), bob.events.messages[-1].group_note),
                         (b"from nowhere", "sealed for a version of #ops this client does not know; yours is 2"))
        self.assertIn("cannot verify", bob.groups_seen.warnings[-1][2])
        await self.hand(bob, "carol", gid, first.head, b"before carol was in")
        self.assertEqual(len(bob.events.messages), 2)
        [(_, sender, error)] = bob.events.rejected
        self.assertEqual((sender, error.message), ("carol", "carol was not a member of #ops in the version the "
                                                            "message names."))
        second = await carol.group("ops")
        await carol.group_leave("ops")
        await self.wait_for(lambda: len(bob.groups_seen.events) == 3, "bob's look at carol's leave")
        await self.hand(bob, "carol", gid, bytes.fromhex(second.head) if isinstance(second.head, str)
                        else second.head, b"sent before I left")
        self.assertEqual((bytes(bob.events.messages[-1].plaintext), bob.events.messages[-1].group_note),
                         (b"sent before I left", "sealed for version 2 of #ops, before carol left or was removed "
                                                 "(version 3 is yours)"))


class ChainTests(GroupTestCase):

    async def test_server_added_reader_gets_nothing_and_members_are_warned(self):
        """
        The server adds eve to #ops without a signed op (its member table and its cache): members are warned at
        their next look, no envelope alice sends has an entry for eve, and the send is refused with the reason.
        """
        alice, bob, eve = await self.user("alice"), await self.user("bob"), await self.user("eve")
        info = await alice.group_create("ops", ["bob"])
        gid = bytes.fromhex(info.id)
        await self.wait_members(bob, "ops", ["alice", "bob"])

        def txn(t):
            t.execute("INSERT INTO group_members (gid, user, since) VALUES (?, 'eve', 1)", (gid,))
        await self.server.store._run(txn)
        state = await self.server.factory.group_state(gid)
        members = dict(state.members, eve=pager.fingerprint(key("eve").public_key()))
        self.server.factory._groups[gid] = dataclasses.replace(state, members=types.MappingProxyType(members))
        sent = self.capture_sends(alice)
        with self.assertRaises(pager.Forbidden) as caught:
            await alice.send_group("ops", "not for eve")
        self.assertIn("eve", caught.exception.message)
        self.assertTrue(sent)
        self.assertTrue(all("eve" not in h.recipient_names for h in sent))
        self.assertEqual(eve.events.messages, [])
        sentence = ("The server lists eve as a member of #ops, but no signed operation made eve one; nothing is "
                    "sealed to eve.")
        self.assertIn((info.id, "ops", sentence), alice.groups_seen.warnings)
        await bob.close()
        bob = await self.relogin("bob")  # his next login reads the group again
        self.assertIn((info.id, "ops", sentence), bob.groups_seen.warnings)
        self.assertEqual((await bob.group("ops")).members, ("alice", "bob"))

    async def test_deleted_member_left_out_with_a_warning(self):
        """
        The operator deleted carol's account: alice's message goes to bob with no entry for carol, and alice is
        warned that carol's account is gone.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob", "carol"])
        await self.offline(self.server, carol)
        conn = sqlite3.connect(self.server.store.path, isolation_level=None)
        self.addCleanup(conn.close)
        pager._admin_txn(conn, pager.delete_user_txn, "carol")
        self.server.factory.forget_devices(["carol"])
        sent = self.capture_sends(alice)
        answer = await alice.post_group("ops", "carol is gone")
        self.assertEqual(answer["queued"], [])
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertEqual([h.recipient_names for h in sent], [["bob"]])
        self.assertIn((info.id, "ops", "carol's account is gone from the server (deleted by its operator?): #ops's "
                       "messages are not sealed to carol."), alice.groups_seen.warnings)
        self.assertEqual((await alice.group_delivery(answer["msg"]))[1], ["bob"])

    async def test_history_rule(self):
        """
        alice creates #ops with bob, makes him an admin, and re-keys her account; bob adds carol.  carol, verifying
        the chain from scratch, accepts the create signed with alice's old key (before the add that made her a
        member, which commits to it by hash) and, named for alice by that create, the promotion it signed; she is
        told that bob vouched for history signed with a key that is not alice's now.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob"])
        await alice.group_admin("ops", "bob")
        await self.wait_for(lambda: len(bob.groups_seen.events) == 2, "bob's two events")
        await alice.rekey("alice", token("alice"), key("alice"), key("alice-new"))
        await bob.group_add("ops", ["carol"])
        await self.wait_members(carol, info.id, ["alice", "bob", "carol"])
        self.assertIsNone((await carol.group(info.id)).broken)
        self.assertEqual([w for _, _, w in carol.groups_seen.warnings], [
            "#ops's changes from before you were added include some signed with a key that is not the one known here "
            "for alice (a key changed since, or a history made up): bob vouched for them by adding you."])
        self.assertEqual([e.kind for e in carol.groups_seen.events], ["add"])  # the history is not news

    async def test_rekeyed_admin_adds(self):
        """
        alice re-keys her account after creating #ops, then adds carol with her new key.  carol, who never pinned
        alice, takes the add only once she compared alice's new key with her and marked it verified: the create
        names the old one, and the server saying otherwise is exactly what a server substituting keys would say
        (trusting the server's key is not enough).  bob, who pinned alice's old key, accepts no op of the new one
        either.  Each chain goes on as soon as its user verified the key, without waiting for another change.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        await alice.rekey("alice", token("alice"), key("alice"), key("alice-new"))
        await alice.group_add("ops", ["carol"])
        await self.wait_for(lambda: carol.groups_seen.warnings, "carol's warning")
        self.assertIn("version 2 (add by alice) is signed with a key", carol.groups_seen.warnings[-1][2])
        self.assertEqual(carol.groups_seen.events, [])  # the history the add would vouch for is not kept either
        self.assertEqual((await carol.refresh_group(info.id)).seq, 0)
        # Named as its ops name it, not by its id: in the warning, the list, and what "#ops" finds to refuse.
        self.assertTrue(carol.groups_seen.warnings[-1][2].startswith("#ops's membership chain does not verify"))
        self.assertIn("as the signed change that made them a member gives it", carol.groups_seen.warnings[-1][2])
        self.assertNotIn("the admin who added them", carol.groups_seen.warnings[-1][2])  # alice made #ops herself
        self.assertEqual([(g.label, g.member) for g in await carol.groups()], [("#ops", False)])
        with self.assertRaises(pager.GroupRefused) as refused:
            await carol.send_group("ops", "hello?")
        self.assertIn("Not sent: #ops's membership chain does not verify: version 2", refused.exception.message)
        self.assertEqual(pager.describe_groups(await carol.groups(), "carol"),
                         "Your groups:\n  #ops  \u26a0 does not verify yet (nothing is sent to it)")
        new_fp = pager.fingerprint(key("alice-new").public_key())
        await carol.trust("alice")
        still = await carol.group(info.id)
        self.assertEqual(still.seq, 0)
        self.assertIn("was not compared with alice", still.broken)
        await carol.verify("alice", new_fp)
        now = await carol.group(info.id)  # read again by verify itself
        self.assertEqual((now.members, now.broken), (("alice", "bob", "carol"), None))
        await self.wait_for(lambda: bob.groups_seen.warnings, "bob's warning")
        broken = await bob.group("ops")
        self.assertEqual((broken.seq, broken.members), (1, ("alice", "bob")))
        self.assertIn("version 2 (add by alice) is signed with a key", broken.broken)
        await bob.trust("alice")
        await bob.verify("alice", new_fp)
        self.assertEqual((await bob.group("ops")).members, ("alice", "bob", "carol"))
        self.assertIsNone((await bob.group("ops")).broken)

    async def test_rekeyed_member_message_held_then_shown(self):
        """
        bob re-keys, then posts to #ops with his new key: carol, who has not compared it, holds the message on the
        server (nothing lost, nothing refused) and is told why; once she trusts and verifies bob's new key, it is
        shown, in the same session.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await alice.group_create("ops", ["bob", "carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        await self.wait_members(bob, "ops", ["alice", "bob", "carol"])
        await bob.rekey("bob", token("bob"), key("bob"), key("bob-new"))
        await bob.send_group("ops", "new key, same bob")
        await self.wait_for(lambda: any("kept on the server until you compare bob's key" in w
                                        for _, _, w in carol.groups_seen.warnings), "carol's warning")
        self.assertEqual((self.texts(carol), carol.events.rejected), ([], []))
        await carol.trust("bob")
        await carol.verify("bob", pager.fingerprint(key("bob-new").public_key()))
        await self.wait_for(lambda: self.texts(carol), "the held message")
        self.assertEqual(self.texts(carol), [b"new key, same bob"])
        await self.wait_for(lambda: self.server.store.pending("carol", 0).addCallback(lambda left: not left),
                            "carol's acknowledgement")

    async def test_held_at_most_a_week(self):
        """
        A held group message counts against its reader's pending quota while it waits: one accepted more than
        MAX_HOLD ago is refused instead, and its sender's receipt says why.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await alice.group_create("ops", ["bob", "carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        await self.wait_members(bob, "ops", ["alice", "bob", "carol"])
        await bob.rekey("bob", token("bob"), key("bob"), key("bob-new"))
        later = time.time() + pager.MAX_HOLD + 60
        self.patch(carol, "_now", lambda: later)
        await bob.send_group("ops", "a week unread")
        await self.wait_for(lambda: [r for r in bob.events.receipts if r.peer == "carol"], "carol's receipt")
        [receipt] = [r for r in bob.events.receipts if r.peer == "carol"]
        self.assertEqual(receipt.status, "rejected")
        self.assertIn("Not verified within 7 days, so refused", receipt.reason)
        self.assertEqual(self.texts(carol), [])

    async def test_own_key_changed_since_added(self):
        """
        bob was added with the key he has since replaced: his new machine, reading the chain from scratch, tells
        him the members hold his messages until they compare his new key; it does not ask him to check his own.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        await bob.rekey("bob", token("bob"), key("bob"), key("bob-new"))
        await bob.close()
        fresh = await self.connect(self.address)
        fresh.groups_seen = GroupRecorder(fresh)
        await fresh.login("bob", token("bob"), key("bob-new"))
        self.assertEqual((await fresh.group(info.id)).members, ("alice", "bob"))
        [warning] = [w for _, _, w in fresh.groups_seen.warnings if "added you" in w]
        self.assertIn("the members' clients hold your messages and changes to #ops until they compare your new key",
                      warning)
        self.assertFalse([w for _, _, w in fresh.groups_seen.warnings if "bob's key" in w])

    async def forged_chain(self, make):
        """#ops of alice and bob, then an op C{make(state)} gives, stored by the server as is; bob reads it."""
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.user("eve")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        gid = bytes.fromhex(info.id)
        raw, signature, signer = make(info.state)
        await self.inject_op(gid, raw, signature, signer)
        after = await bob.refresh_group("ops")
        return alice, bob, info, after

    async def assert_broken(self, bob, info, after, why):
        self.assertEqual((after.seq, after.head, after.members), (1, info.head, ("alice", "bob")))
        self.assertIn(why, after.broken)
        [(gid, name, sentence)] = bob.groups_seen.warnings
        self.assertEqual((gid, name), (info.id, "ops"))
        self.assertIn("does not verify", sentence)
        with self.assertRaises(pager.GroupRefused) as caught:
            await bob.send_group("ops", "to a broken group")
        self.assertIn("Not sent: #ops's membership chain does not verify", caught.exception.message)
        self.assertEqual(len(bob.groups_seen.events), 1)

    async def test_forged_signature(self):
        """An op as if by alice with a signature that is not hers over it: the chain is broken there."""
        def make(state):
            raw = pager.encode_group_op(state.group_id, 2, state.head, "add", "alice",
                                        pager.fingerprint(key("alice").public_key()), 0,
                                        members=[("eve", pager.fingerprint(key("eve").public_key()))])
            return raw, pager.sign_group_op(key("eve"), raw), pager.public_key_pem(key("alice"))
        alice, bob, info, after = await self.forged_chain(make)
        await self.assert_broken(bob, info, after, "signature of version 2")

    async def test_op_by_a_non_admin(self):
        """bob's own, well signed, add of eve (bob is no admin) stored by the server: the rules refuse it."""
        def make(state):
            raw = pager.encode_group_op(state.group_id, 2, state.head, "add", "bob",
                                        pager.fingerprint(key("bob").public_key()), 0,
                                        members=[("eve", pager.fingerprint(key("eve").public_key()))])
            return raw, pager.sign_group_op(key("bob"), raw), pager.public_key_pem(key("bob"))
        alice, bob, info, after = await self.forged_chain(make)
        await self.assert_broken(bob, info, after, "breaks the group's rules")

    async def test_malformed_op_after_a_good_one(self):
        """alice's topic (version 2), then bytes that are no operation: bob keeps version 2, and the chain is broken."""
        alice_fp = pager.fingerprint(key("alice").public_key())

        def make(state):
            raw = pager.encode_group_op(state.group_id, 2, state.head, "topic", "alice", alice_fp, 0, topic="t")
            return raw, pager.sign_group_op(key("alice"), raw), pager.public_key_pem(key("alice"))

        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        gid = bytes.fromhex(info.id)
        await self.inject_op(gid, *make(info.state))

        def txn(t):
            t.execute("INSERT INTO group_ops (gid, seq, op, signature, signer, at) VALUES (?, 3, ?, ?, ?, 0)",
                      (gid, b"no operation", b"s", pager.public_key_pem(key("alice"))))
            t.execute("UPDATE groups SET seq = 3 WHERE gid = ?", (gid,))
        await self.server.store._run(txn)
        self.server.factory._groups.pop(gid, None)
        after = await bob.refresh_group("ops")
        self.assertEqual((after.seq, after.topic), (2, "t"))
        self.assertIn("the operation after version 2 is malformed", after.broken)
        self.assertEqual([e.kind for e in bob.groups_seen.events], ["create", "topic"])

    async def test_key_substituted_in_an_add(self):
        """
        bob pinned carol's key; carol's account is re-keyed; alice (who never pinned carol) adds her with the new
        key: bob is warned that the add names a key for carol that is not the one pinned here.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await bob.recipient_key("carol")
        await carol.rekey("carol", token("carol"), key("carol"), key("carol-new"))
        info = await alice.group_create("ops", ["bob"])
        await alice.group_add("ops", ["carol"])
        await self.wait_for(lambda: bob.groups_seen.warnings, "bob's warning")
        [(gid, name, sentence)] = bob.groups_seen.warnings
        self.assertEqual((gid, name), (info.id, "ops"))
        self.assertIn("alice added carol to #ops (version 2) with the key", sentence)
        self.assertIn("not carol's key as pinned here", sentence)
        self.assertEqual(alice.groups_seen.warnings, [])


class OutboxTests(GroupTestCase):

    async def test_group_message_survives_a_restart(self):
        """
        A group message put in the outbox (recipients ["#<group id>"]) while disconnected stays on disk; after a
        restart (a new store on the same file, the chain read from it) the outbox sends it with send_group.
        """
        path = os.path.abspath(self.mktemp())
        store = pager.LocalStore(path, reactor)
        await store.open(reactor.seconds())
        alice = await self.connect(self.address, seen=store, pins=store)
        await alice.register("alice", token("alice"), key("alice"))
        bob = await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await alice.close()
        ref = await store.outbox_add(reactor.seconds(), ["#" + info.id], "text", "", b"kept for the group")
        store.close()
        store = pager.LocalStore(path, reactor)
        await store.open(reactor.seconds())
        self.addCleanup(lambda: store.pool.running and store.close())
        alice = await self.connect(self.address, seen=store, pins=store)
        await alice.login("alice", token("alice"), key("alice"))
        session = Sessionish(alice, store)
        shown = []
        outbox = pager.Outbox(session, shown.append, reactor)
        await outbox.flush()
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        [message] = bob.events.messages
        self.assertEqual((bytes(message.plaintext), message.group_id.hex()), (b"kept for the group", info.id))
        self.assertIsNone(await store.outbox_next())
        [entry] = await store.history(group=info.id)
        self.assertEqual((entry.group, entry.status, entry.body), (info.id, "sent", b"kept for the group"))
        self.assertEqual(shown, ["\u2713 #%d sent" % ref])
        self.assertEqual((await alice.group_delivery(message.message_id.hex()))[1], ["bob"])


class Sessionish:
    """What the outbox uses of a Session: its client and store."""

    def __init__(self, client, store):
        self.client, self.store, self.closing = client, store, False


class LocalStoreTests(unittest.TestCase):
    """The group tables of L{pager.LocalStore}, and the history's group column added to an older store."""

    async def test_tables(self):
        """Chains, unread counts, messages sent and their receipts are kept; a 0.3 history gains its group column."""
        path = os.path.abspath(self.mktemp())
        old = sqlite3.connect(path)  # a store of 0.3: its history has no grp column
        old.execute("CREATE TABLE history (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, direction TEXT NOT"
                    " NULL, peer TEXT NOT NULL, msg_id TEXT NOT NULL, content_type TEXT NOT NULL, filename TEXT NOT "
                    "NULL, body BLOB NOT NULL, status TEXT NOT NULL)")
        old.execute("INSERT INTO history (at, direction, peer, msg_id, content_type, filename, body, status) VALUES"
                    " (1.0, 'in', 'bob', 'aa', 'text', '', x'6869', 'delivered')")
        old.commit()
        old.close()
        store = pager.LocalStore(path, reactor)
        self.addCleanup(store.close)
        await store.open(reactor.seconds())
        gid = bytes(range(16))
        await store.add_history(pager.HistoryEntry(2.0, "in", "bob", "bb", "text", "", b"in ops", "delivered",
                                                   gid.hex()))
        self.assertEqual([(e.msg_id, e.group) for e in await store.history("bob")], [("aa", None)])
        self.assertEqual([(e.msg_id, e.group) for e in await store.history(group=gid.hex())], [("bb", gid.hex())])
        await store.save_group(gid, "ops", 2, b"h" * 32, True, None, [(1, b"op1", b"s1", "k"), (2, b"op2", b"s2",
                                                                                                   "k")])
        self.assertEqual(await store.group_unread(gid, add=3), 3)
        await store.save_group(gid, "ops2", 1, b"g" * 32, False, "why", [])  # never ops past the verified head
        self.assertEqual(await store.group_rows(), [(gid, "ops2", 1, b"g" * 32, False, "why", 3)])
        self.assertEqual(await store.group_ops(gid), [(1, b"op1", b"s1", "k")])
        self.assertEqual(await store.group_unread(gid, count=0), 0)
        await store.add_group_sent("cc", gid, ["carol", "bob"])
        await store.add_group_receipt("cc", "bob", "delivered", 5.0)
        await store.add_group_receipt("cc", "bob", "rejected", 6.0, "bob left #ops before receiving it.")
        self.assertEqual(await store.group_sent("cc"), (gid, ["bob", "carol"]))
        self.assertEqual(await store.group_receipts("cc"),
                         {"bob": ("rejected", 6.0, "bob left #ops before receiving it.")})
        self.assertIsNone(await store.group_sent("dd"))


def fp(name):
    return pager.fingerprint(key(name).public_key())


def pem(name):
    return pager.public_key_pem(key(name))


class PlantedTestCase(GroupTestCase):
    """A lying server, modelled by writing its database: groups made of any ops, and ops withdrawn."""

    async def plant_group(self, ops, members):
        gid = pager.parse_group_op(ops[0][0]).group_id
        last = pager.parse_group_op(ops[-1][0])

        def txn(t):
            t.execute("INSERT INTO groups (gid, name, seq, head, members, created_at) VALUES (?, 'ops', ?, ?, ?, 0)",
                      (gid, last.seq, last.hash, len(members)))
            for raw, signature, signer in ops:
                t.execute("INSERT INTO group_ops (gid, seq, op, signature, signer, at) VALUES (?, ?, ?, ?, ?, 0)",
                          (gid, pager.parse_group_op(raw).seq, raw, signature, signer))
            for user in members:
                t.execute("INSERT INTO group_members (gid, user, since) VALUES (?, ?, 1)", (gid, user))
        await self.server.store._run(txn)
        self.server.factory._groups.pop(gid, None)
        return gid

    async def truncate_to(self, gid, seq):
        def txn(t):
            head = pager.parse_group_op(bytes(t.execute("SELECT op FROM group_ops WHERE gid = ? AND seq = ?",
                                                        (gid, seq)).fetchone()[0])).hash
            t.execute("DELETE FROM group_ops WHERE gid = ? AND seq > ?", (gid, seq))
            t.execute("UPDATE groups SET seq = ?, head = ? WHERE gid = ?", (seq, head, gid))
        await self.server.store._run(txn)
        self.server.factory._groups.pop(gid, None)

    def op(self, gid, seq, prev, kind, actor, signer, **fields):
        raw = pager.encode_group_op(gid, seq, prev, kind, actor, fp(signer), 0, **fields)
        return raw, pager.sign_group_op(key(signer), raw), pem(signer)

    def head(self, op):
        return pager.parse_group_op(op[0]).hash

    def fail_key_request(self, client, user):
        """Make the server answer C{client}'s key requests for C{user} with rate_limited; returns the undo."""
        request = client.protocol.request

        def lying(kind, **fields):
            if kind == "key" and fields.get("user") == user:
                return defer.fail(pager.RateLimited("Try again later.", retry_after=1))
            return request(kind, **fields)
        client.protocol.request = lying
        return lambda: setattr(client.protocol, "request", request)


class ForgedHistoryTests(PlantedTestCase):
    """
    History that only the add of this client's user vouches for is kept only once that add verified; a refused op
    keeps the chain broken until that very op verifies (withholding it, or showing another, changes nothing).
    """

    def forged_create(self, gid):
        """'alice creates #ops with bob and eve', signed by a key that is not alice's (the server's)."""
        raw = pager.encode_group_op(gid, 1, bytes(32), "create", "alice", fp("alice-fake"), 0, name="ops",
                                    topic="", members=[("bob", fp("bob")), ("eve", fp("eve"))])
        return raw, pager.sign_group_op(key("alice-fake"), raw), pem("alice-fake")

    def junk_add_of_bob(self, gid, prev, signer="zed", good_signature=True):
        """An op after the forged one that lists bob (so the client takes its seq as bob's join version)."""
        raw = pager.encode_group_op(gid, 2, prev, "add", signer, fp(signer), 0, members=[("bob", fp("bob"))])
        signature = pager.sign_group_op(key(signer), raw) if good_signature else b"\0" * 256
        return raw, signature, pem(signer)

    async def test_forged_op_of_pinned_admin_accepted_silently(self):
        """
        bob has alice's key pinned.  The server shows bob a group whose create is 'by alice' but signed by the
        server's key, followed by an op listing bob whose signer's key request the server answers with an error
        (a dropped connection would do the same).  An op signed with a key other than the pinned one is accepted
        only for history, before an add of bob that a trusted key signed: here no such add exists.
        """
        alice, bob, eve = await self.user("alice"), await self.user("bob"), await self.user("eve")
        await bob.recipient_key("alice")  # bob has talked to alice: her key is pinned
        gid = os.urandom(16)
        first = self.forged_create(gid)
        second = self.junk_add_of_bob(gid, pager.parse_group_op(first[0]).hash)
        await self.plant_group([first, second], ["alice", "bob", "eve"])

        request = bob.protocol.request

        def lying(kind, **fields):
            if kind == "key" and fields.get("user") == "zed":
                return defer.fail(pager.RateLimited("Try again later.", retry_after=1))
            return request(kind, **fields)
        bob.protocol.request = lying
        try:
            await bob.refresh_group(gid)
        except pager.RateLimited:
            pass
        bob.protocol.request = request
        await self.truncate_to(gid, 1)
        info = await bob.refresh_group(gid)
        sent = self.capture_sends(bob)
        try:
            await bob.send_group(gid, "for alice and the group")
        except pager.PagerError:
            pass
        self.sealed_to = [h.recipient_names for h in sent]
        # What must hold: no op signed with a key other than alice's pinned one is accepted as alice's create, and
        # nothing bob seals goes to eve, whom only that forged op made a member.
        self.assertFalse(info.seq == 1 and info.broken is None and "eve" in info.members,
                         "bob's client accepted a create 'by alice' signed with another key, silently: members %s, "
                         "warnings %s; bob then sealed to %s" % (info.members, bob.groups_seen.warnings, self.sealed_to))
        self.assertFalse(any("eve" in h.recipient_names for h in sent),
                         "bob sealed a group message to eve, made a member only by a forged op")

    async def test_forged_op_accepted_then_chain_unbroken(self):
        """
        The same without any lie about keys: the op after the forged create has a bad signature.  bob's chain
        breaks, and the forged create (by a key that is not alice's pinned one) is not kept either.
        """
        alice, bob, eve = await self.user("alice"), await self.user("bob"), await self.user("eve")
        await bob.recipient_key("alice")
        gid = os.urandom(16)
        first = self.forged_create(gid)
        second = self.junk_add_of_bob(gid, pager.parse_group_op(first[0]).hash, signer="alice",
                                      good_signature=False)
        await self.plant_group([first, second], ["alice", "bob", "eve"])
        before = await bob.refresh_group(gid)
        self.assertEqual(before.seq, 0, "bob kept version 1, a create 'by alice' signed with a key that is not "
                                        "alice's pinned one (members %s, events %s)"
                         % (before.members, [(e.kind, e.actor, e.users) for e in bob.groups_seen.events]))

    async def test_unbroken_by_withholding(self):
        """
        A chain broken by a forged op stays broken when the server stops showing the forged op: a server cannot make
        the warning go away without an op that verifies.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        gid = bytes.fromhex(info.id)
        raw = pager.encode_group_op(gid, 2, info.head, "topic", "alice", fp("alice"), 0, topic="x")
        await self.inject_op(gid, raw, b"\0" * 256, pem("alice"))
        broken = await bob.refresh_group("ops")
        self.assertIsNotNone(broken.broken)
        await self.truncate_to_head(gid, info)
        again = await bob.refresh_group("ops")
        self.assertIsNotNone(again.broken, "the server made bob's 'chain does not verify' go away by withholding "
                                           "the op that broke it")

    async def truncate_to_head(self, gid, info):
        def txn(t):
            t.execute("DELETE FROM group_ops WHERE gid = ? AND seq > ?", (gid, info.seq))
            t.execute("UPDATE groups SET seq = ?, head = ? WHERE gid = ?", (info.seq, info.head, gid))
        await self.server.store._run(txn)
        self.server.factory._groups.pop(gid, None)


class KeySwapMixin:
    """A server that swaps bob's key: the operator's reset-key, and a device of the server's logged in as bob."""

    def reset_key(self, conn, user):
        """The operator's reset-key (a malicious server can do the same, or answer only carol's requests so)."""
        fake = key(user + "-fake")
        pager._admin_txn(conn, pager.set_key_txn, user, pager.public_key_pem(fake), pager.fingerprint(fake),
                         time.time(), True)

    async def substitute_bob(self):
        """alice creates #ops with bob and carol (carol never talked to bob); the server swaps bob's key."""
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob", "carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        self.assertEqual(info.state.members["bob"], fp("bob"))  # the chain names bob's real key
        return alice, carol, await self.fake_bob(bob), info

    async def fake_bob(self, bob):
        """bob's client goes; the server gives bob another key, and a device of the server's logs in as bob."""
        await bob.close()
        conn = sqlite3.connect(self.server.store.path, isolation_level=None)
        self.addCleanup(conn.close)
        self.reset_key(conn, "bob")
        self.server.factory.forget_devices(["bob"])
        fake = await self.connect(self.address)
        await fake.login("bob", token("bob"), key("bob-fake"))
        return fake

    async def refused_to_seal(self, carol):
        """carol's group message is sealed to nobody: key_changed, saying so."""
        sent = self.capture_sends(carol)
        with self.assertRaises(pager.KeyChanged) as raised:
            await carol.send_group("ops", "secret for the group")
        self.assertEqual(sent, [])
        return raised.exception.message

    async def assert_held(self, carol):
        await self.wait_for(lambda: any("kept on the server until you compare bob's key" in w
                                        for _, _, w in carol.groups_seen.warnings), "carol's warning")
        self.assertEqual(([m for m in carol.events.messages if m.group_name], carol.events.rejected), ([], []))
        [held] = await self.server.store.pending("carol", 0)  # neither acknowledged nor refused
        self.assertEqual(held.sender, "bob")


class ChainFingerprintTests(KeySwapMixin, GroupTestCase):
    """
    The chain names each member's identity fingerprint (signed by the admin who added them): a client that has not
    pinned that member takes that key, not whatever the server gives, for sealing, for opening the member's
    messages, and for the member's ops.  The server 're-keys' bob (reset-key, which a malicious operator can do; or
    it just answers carol's key and bundle requests with its own key) and runs a device as 'bob'.
    """

    async def test_seals_to_a_key_the_chain_does_not_name(self):
        """carol seals #ops's message to the server's 'bob', though the chain names bob's real key."""
        alice, carol, fake, info = await self.substitute_bob()
        sent = self.capture_sends(carol)
        with self.assertRaises(pager.KeyChanged) as raised:
            await carol.send_group("ops", "secret for the group")
        self.assertIn("#ops's signed membership names", raised.exception.message)
        self.assertEqual(sent, [])  # nothing sealed, so nothing for the server's 'bob' to read
        self.assertIsNone(await carol.pins.get_pin("bob"))  # and the server's key is not pinned either

    async def test_forged_member_message(self):
        """
        The server's 'bob' posts to #ops: carol does not show it, as it is not signed by the chain's bob; it is held
        on the server (not refused) until carol compares bob's key, and she is told so.
        """
        alice, carol, fake, info = await self.substitute_bob()
        await fake.sync_groups()
        await fake.send_group("ops", "I am bob")
        await self.assert_held(carol)

    async def test_forged_admin_op_by_unpinned_admin(self):
        """
        bob is an admin of #ops; carol never pinned bob.  The server's 'bob' adds eve (its own op, signed by the
        key the server gives for bob): carol's chain breaks there, as the chain says bob's key is another one.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        eve = await self.user("eve")
        info = await alice.group_create("ops", ["bob", "carol"])
        await alice.group_admin("ops", "bob")
        await self.wait_for(lambda: len(carol.groups_seen.events) == 2, "carol's two events")
        fake = await self.fake_bob(bob)
        await fake.sync_groups()
        await fake.group_add("ops", ["eve"])
        await self.wait_for(lambda: len(carol.groups_seen.events) >= 3 or carol.groups_seen.warnings,
                            "carol's look at the add")
        now = await carol.group("ops")
        self.assertFalse("eve" in now.members and now.broken is None,
                         "carol accepted 'bob added eve' signed by a key the chain does not name for bob; "
                         "warnings: %s" % carol.groups_seen.warnings)


class RemovedMemberPostsTests(GroupTestCase):
    """
    Only the server knows whether a message was accepted before the change that removed its sender: a removed
    member's message sealed for the version before the removal is shown, with a note saying the sender left or was
    removed since.  A server colluding with a removed member can deliver one; the note is what the reader sees.
    """

    async def test_removed_member_posts_for_an_old_version(self):
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob", "carol"])
        gid = bytes.fromhex(info.id)
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        old_state = await self.server.factory.group_state(gid)
        await alice.group_remove("ops", ["bob"])
        await self.wait_members(carol, "ops", ["alice", "carol"])
        # the lying server: takes a message sealed for version 1 as if it were the head
        self.patch(pager, "_check_group_head_txn", lambda *a: None)
        self.server.factory._groups[gid] = old_state
        envelope = await self.device_envelope(self.address, "bob", ["alice", "carol"], b"still here", client=bob,
                                              group=(gid, info.head))
        await bob.protocol.request("send", group=gid.hex(), size=envelope.size,
                                   header=pager.b64(envelope.header), chunks=[pager.b64(c) for c in envelope.chunks],
                                   signature=pager.b64(envelope.signature))
        await self.wait_for(lambda: carol.events.messages or carol.events.rejected, "carol's look at bob's post")
        shown = [(m.sender, bytes(m.plaintext), m.group_note) for m in carol.events.messages]
        self.assertEqual(shown, [("bob", b"still here", "sealed for version 1 of #ops, before bob left or was "
                                                          "removed (version 2 is yours)")])


class PinnedLaterTests(KeySwapMixin, GroupTestCase):
    """
    A member pinned here some other way (a 1:1 message either way, a look at their devices), with a key the server
    gave, is still held to the key the chain names: that pin counts in the group only once verified out of band.
    """

    async def test_one_to_one_first_contact_then_group_seals_to_server_key(self):
        """
        carol is in #ops whose signed chain names bob's real key; she never pinned bob.  The server swaps bob's
        key and its 'bob' sends carol a 1:1 message (pinned on first use).  carol's next group message is sealed to
        nobody: the pinned key is not the one the chain names, and she has not compared it.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob", "carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        self.assertIsNone(await carol.pins.get_pin("bob"))
        fake = await self.fake_bob(bob)
        await fake.send(["carol"], "hi carol, it's bob")
        await self.wait_for(lambda: carol.events.messages, "carol's 1:1 from 'bob'")
        self.assertIn("is not the key #ops's signed membership names for bob", await self.refused_to_seal(carol))

    async def test_one_to_one_first_contact_then_forged_group_post(self):
        """With the same pin, the server's 'bob' posts to #ops: carol holds it, as not signed by the chain's bob."""
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob", "carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        fake = await self.fake_bob(bob)
        await fake.send(["carol"], "hi carol")
        await self.wait_for(lambda: carol.events.messages, "carol's 1:1")
        await fake.sync_groups()
        await fake.send_group("ops", "I am bob, in #ops")
        await self.assert_held(carol)

    async def test_pinned_before_join_warning_says_nothing_sent_but_sends(self):
        """
        carol pinned the server's 'bob' first (1:1); then alice adds carol to #ops, whose chain names bob's real
        key.  carol is warned that nothing is sent to #ops until she compares bob's key, and nothing is; once she
        verified the key pinned here (her decision), it is bob's key in the group too.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        fake = await self.fake_bob(bob)
        await fake.send(["carol"], "hi carol")
        await self.wait_for(lambda: carol.events.messages, "carol's 1:1")
        await alice.group_add("ops", ["carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        warned = [w for _, _, w in carol.groups_seen.warnings if "nothing is sent to #ops" in w]
        self.assertTrue(warned, carol.groups_seen.warnings)
        await self.refused_to_seal(carol)
        await carol.verify("bob", fp("bob-fake"))
        await carol.send_group("ops", "bob's key compared")
        await self.wait_for(lambda: fake.events.messages, "the message at the key carol verified")


class VouchedWarningTests(PlantedTestCase):

    async def test_vouched_warning_not_suppressed_by_a_read_cut_short(self):
        """
        carol has alice's key pinned.  The server makes up #ops: 'alice' (the server's key) creates it with 'bob'
        (named with the server's key for bob), promotes him, and 'bob' adds carol -- all server keys.  Then one more
        op by a non-member 'zed', whose key request the server answers with rate_limited: the read is cut short, and
        the history it took under the history rule is not kept.  The server then withdraws op 4: carol's next look
        takes the history again, and warns that it is vouched for by bob only; so does a restart of her client.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await carol.recipient_key("alice")  # pinned: alice's real key
        gid = os.urandom(16)
        op1 = self.op(gid, 1, bytes(32), "create", "alice", "alice-fake", name="ops", topic="",
                      members=[("bob", fp("bob-fake"))])
        op2 = self.op(gid, 2, self.head(op1), "promote", "alice", "alice-fake", user="bob")
        op3 = self.op(gid, 3, self.head(op2), "add", "bob", "bob-fake", members=[("carol", fp("carol"))])
        op4 = self.op(gid, 4, self.head(op3), "topic", "zed", "zed", topic="x")
        await self.plant_group([op1, op2, op3, op4], ["alice", "bob", "carol"])
        restore = self.fail_key_request(carol, "zed")
        try:
            await carol.refresh_group(gid)
        except pager.RateLimited:
            pass
        restore()
        await self.truncate_to(gid, 3)
        info = await carol.refresh_group(gid)
        pins = carol.pins
        await carol.close()
        carol2 = await self.relogin("carol", pins=pins)  # same local store: a restart
        info2 = await carol2.group(gid.hex())
        warnings = [w for _, _, w in carol.groups_seen.warnings + carol2.groups_seen.warnings]
        self.assertFalse(info2.seq == 3 and info2.broken is None and not any("vouched" in w for w in warnings),
                         "carol keeps a #ops 'created by alice' signed with a key that is not alice's pinned one, "
                         "members %s, bob pinned to %s, with no warning at all (warnings: %s)" % (
                             info2.members,
                             "the server's key" if bytes((await carol2.pins.get_pin("bob"))[1]) == fp("bob-fake")
                             else "?", warnings))


class DiscardedHistoryPinsTests(PlantedTestCase):

    async def test_discarded_history_leaves_a_pin(self):
        """
        The server shows carol (alice pinned) a made-up #ops: 'alice' (server key) creates it naming bob with the
        server's key, 'bob' leaves (signed with it), 'alice' adds carol.  The add does not verify, so 'none of that
        history is kept' -- yet bob is now pinned here to the server's key, which carol never saw.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await carol.recipient_key("alice")
        gid = os.urandom(16)
        op1 = self.op(gid, 1, bytes(32), "create", "alice", "alice-fake", name="ops", topic="",
                      members=[("bob", fp("bob-fake"))])
        op2 = self.op(gid, 2, self.head(op1), "leave", "bob", "bob-fake")
        op3 = self.op(gid, 3, self.head(op2), "add", "alice", "alice-fake", members=[("carol", fp("carol"))])
        await self.plant_group([op1, op2, op3], ["alice", "carol"])
        info = await carol.refresh_group(gid)
        self.assertEqual(info.seq, 0)
        self.assertIsNotNone(info.broken)
        pin = await carol.pins.get_pin("bob")
        self.assertIsNone(pin, "history vouched for by nobody (and not kept) pinned bob to %s (the server's key: %s)"
                          % (pager.format_fingerprint(bytes(pin[1])), bytes(pin[1]) == fp("bob-fake")) if pin else "")


class ReaddedMemberStuckTests(GroupTestCase):

    async def test_readded_member_stuck_on_old_key_history(self):
        """
        Honest server.  alice creates #ops with carol and dave, makes dave an admin; carol leaves; dave sets the
        topic, then re-keys (a lost key recovered); carol pins dave's new key; alice adds carol back.  carol's
        chain resumes at her leave, and what came after it is history for her as when joining: dave's topic (his
        old key) is vouched for by alice's add, with a warning, as a client verifying from scratch takes it.
        """
        alice, carol, dave = await self.user("alice"), await self.user("carol"), await self.user("dave")
        info = await alice.group_create("ops", ["carol", "dave"])
        await alice.group_admin("ops", "dave")
        await self.wait_members(carol, "ops", ["alice", "carol", "dave"])
        await self.wait_for(lambda: len(dave.groups_seen.events) >= 2, "dave's events")
        await carol.group_leave("ops")
        await dave.group_topic("ops", "while carol was away")
        await dave.rekey("dave", token("dave"), key("dave"), key("dave-new"))
        await carol.trust("dave")  # carol pins dave's new key (she checked it with him)
        self.assertEqual(bytes((await carol.pins.get_pin("dave"))[1]), fp("dave-new"))
        await alice.group_add("ops", ["carol"])
        await self.wait_members(carol, "ops", ["alice", "carol", "dave"])
        again = await carol.group("ops")
        self.assertEqual((again.broken, again.topic), (None, "while carol was away"))
        self.assertIn("signed with a key that is not the one known here for dave", carol.groups_seen.warnings[-1][2])
        self.assertEqual([e.kind for e in carol.groups_seen.events][-1:], ["add"])  # the topic is history to her
        fresh = await self.relogin("carol")  # another client of carol's (no local state): from scratch
        scratch = await fresh.group(info.id)
        self.assertEqual((scratch.broken, scratch.head), (None, again.head))


class PinnedLaterMoreTests(KeySwapMixin, GroupTestCase):
    """Other paths that pin the server's key for a member on first use: the group still holds to the chain's."""

    async def check_path(self, pin_it):
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await alice.group_create("ops", ["bob", "carol"])
        await self.wait_members(carol, "ops", ["alice", "bob", "carol"])
        await self.fake_bob(bob)
        await pin_it(carol)
        self.assertEqual(bytes((await carol.pins.get_pin("bob"))[1]), fp("bob-fake"))
        await self.refused_to_seal(carol)

    async def test_devices_command_pins(self):
        """carol looks at bob's devices (/devices bob)."""
        await self.check_path(lambda carol: carol.devices("bob"))

    async def test_one_to_one_send_pins(self):
        """carol sends bob a 1:1 message first."""
        await self.check_path(lambda carol: carol.send(["bob"], "hi bob"))


class HistoryEventsTests(GroupTestCase):

    async def test_history_told_as_news_after_a_short_first_read(self):
        """
        The server answers carol's first group_ops with the ops before her add only (more: false).  Made while
        she was not a member, they are not news; the next read (from version 2) tells her add, and only that.
        """
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        info = await alice.group_create("ops", ["bob"])
        await alice.group_topic("ops", "before carol")
        request, calls = carol.protocol.request, []

        def short(kind, **fields):
            d = request(kind, **fields)
            if kind == "group_ops" and not calls:
                calls.append(1)
                d.addCallback(lambda a: dict(a, ops=[o for o in a["ops"] if o["seq"] <= 2], more=False))
            return d
        carol.protocol.request = short
        await alice.group_add("ops", ["carol"])
        await self.wait_for(lambda: calls, "carol's first read")
        self.assertEqual(carol.groups_seen.events, [])
        carol.protocol.request = request
        await carol.refresh_group(info.id)
        kinds = [e.kind for e in carol.groups_seen.events]
        self.assertEqual(kinds, ["add"], "history before carol's add reached her UI as news: %s" % kinds)


class TrustUnsticksTests(GroupTestCase):

    async def test_trust_then_send(self):
        """
        bob pinned alice's old key; alice re-keys and adds carol: bob's #ops breaks (as documented).  bob compares
        the new key with alice, runs trust and verify, and sends to #ops at once: verifying reads the group again.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        carol = await self.user("carol")
        await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        await alice.rekey("alice", token("alice"), key("alice"), key("alice-new"))
        await alice.group_add("ops", ["carol"])
        await self.wait_for(lambda: bob.groups_seen.warnings, "bob's warning")
        await bob.trust("alice")
        await bob.verify("alice", fp("alice-new"))
        try:
            await bob.send_group("ops", "after trusting alice")
        except pager.PagerError as e:
            self.fail("after 'trust alice', bob's send to #ops still fails: %s" % e.message)


class OwnFormerKeyTests(PlantedTestCase):
    """
    A group op this user signed with a key of theirs from before a re-key or recovery is still theirs: a key replaced
    on this machine is remembered; a machine reading the chain from its start (set up after a recovery) takes one on
    first use, saying so once; neither is taken after an op signed with the key of now, nor on a chain held here.
    """

    async def fresh_machine(self, name, new_key):
        """C{name}'s new machine: no pins, no chains, logged in with C{new_key}, recording its group events."""
        client = await self.connect(self.address)
        client.groups_seen = GroupRecorder(client)
        await client.login(name, token(name), key(new_key))
        return client

    async def test_recovered_creator_keeps_groups(self):
        """
        alice made #ops with bob, lost her machine and recovered on a new one: her groups verify there, with one
        warning naming the old key, and she can post to #ops and change it with her new key.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.user("carol")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        await alice.recover("alice", token("alice"), key("alice-new"))
        await alice.close()
        fresh = await self.fresh_machine("alice", "alice-new")
        group = await fresh.group(info.id)
        self.assertEqual((group.members, group.broken), (("alice", "bob"), None))
        self.assertEqual([w for _, _, w in fresh.groups_seen.warnings], [
            "#ops's changes made in your name up to version 1 are signed with a key of yours that this machine never "
            "held (%s): they are taken as yours, made before you replaced your key. If you never had that key, "
            "someone else made them." % pager.format_fingerprint(fp("alice"))])
        sent = self.capture_sends(fresh)
        await fresh.send_group("ops", "back again")
        self.assertEqual([h.recipient_names for h in sent], [["bob"]])
        await fresh.group_add("ops", ["carol"])
        self.assertEqual((await fresh.refresh_group(info.id)).members, ("alice", "bob", "carol"))
        self.assertEqual(len(fresh.groups_seen.warnings), 1)  # said once: the chain is held here now

    async def test_rekey_here_remembered(self):
        """alice re-keys on this machine: the old key is kept as hers, so reading #ops anew warns of nothing."""
        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await self.wait_members(bob, "ops", ["alice", "bob"])
        await alice.rekey("alice", token("alice"), key("alice"), key("alice-new"))
        self.assertEqual(await alice.pins.former_keys("alice"), {fp("alice")})
        alice.pins._groups.clear()
        alice._chains.clear()
        self.assertEqual((await alice.refresh_group(info.id)).members, ("alice", "bob"))
        self.assertEqual(alice.groups_seen.warnings, [])

    async def test_old_key_after_new_refused(self):
        """
        Once the chain has an op of alice's signed with her key of now, an op signed with her old key (a thief of the
        old key, and the server, adding eve) is refused, also on a machine reading the chain from its start.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.user("carol"), await self.user("eve")
        info = await alice.group_create("ops", ["bob"])
        await alice.rekey("alice", token("alice"), key("alice"), key("alice-new"))
        await alice.group_add("ops", ["carol"])
        gid = bytes.fromhex(info.id)
        head = (await alice.group(info.id)).state.head
        await self.inject_op(gid, *self.op(gid, 3, head, "add", "alice", "alice", members=[("eve", fp("eve"))]))
        fresh = await self.fresh_machine("alice", "alice-new")
        group = await fresh.group(info.id)
        self.assertEqual(group.members, ("alice", "bob", "carol"))
        self.assertIn("version 3 (add by alice) is signed with a key (%s) that is not your key: an earlier version "
                      "is signed with your key of now" % pager.format_fingerprint(fp("alice")), group.broken)

    async def test_unknown_own_key_on_held_chain_refused(self):
        """On a chain held here, an op 'by alice' signed with a key she never had here is refused."""
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.user("eve")
        info = await bob.group_create("ops", ["alice"])
        await bob.group_admin("ops", "alice")
        await self.wait_members(alice, "ops", ["alice", "bob"])
        gid = bytes.fromhex(info.id)
        await self.wait_for(lambda: len(alice.groups_seen.events) == 2, "alice's promotion")
        head = (await alice.refresh_group(info.id)).state.head
        await self.inject_op(gid, *self.op(gid, 3, head, "add", "alice", "alice-fake", members=[("eve", fp("eve"))]))
        group = await alice.refresh_group(info.id)
        self.assertEqual(group.members, ("alice", "bob"))
        self.assertIn("version 3 (add by alice) is signed with a key (%s) that is not your key, nor one this "
                      "machine knew you by before" % pager.format_fingerprint(fp("alice-fake")), group.broken)

    async def test_read_cut_short_keeps_the_key(self):
        """
        A first read cut short (the connection lost) after alice's first two old-key ops keeps them, warned of, and
        the key with them: the next read takes her third op, signed with it too, though the chain is held by then.
        """
        alice, bob = await self.user("alice"), await self.user("bob")
        info = await alice.group_create("ops", ["bob"])
        await alice.group_admin("ops", "bob")
        await alice.group_topic("ops", "on call")
        await alice.recover("alice", token("alice"), key("alice-new"))
        await alice.close()
        fresh = await self.connect(self.address)
        fresh.groups_seen = GroupRecorder(fresh)
        in_thread = fresh.in_thread

        def cut(f, *args, **kwargs):
            if f is pager.verify_group_op and args[1].seq == 3:
                return defer.fail(pager.ConnectionLost("The connection was lost."))
            return in_thread(f, *args, **kwargs)
        fresh.in_thread = cut
        await fresh.login("alice", token("alice"), key("alice-new"))  # its groups read at once, this one cut short
        with self.assertRaises(pager.ConnectionLost):
            await fresh.refresh_group(info.id)
        self.assertEqual((await fresh.group(info.id)).seq, 2)
        self.assertEqual(await fresh.pins.former_keys("alice"), {fp("alice")})
        [warning] = [w for _, _, w in fresh.groups_seen.warnings]
        self.assertIn("changes made in your name up to version 2", warning)
        fresh.in_thread = in_thread
        group = await fresh.refresh_group(info.id)
        self.assertEqual((group.seq, group.topic, group.broken), (3, "on call", None))
        self.assertEqual(len(fresh.groups_seen.warnings), 1)
