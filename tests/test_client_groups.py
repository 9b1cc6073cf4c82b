"""
The client library's side of groups, over a real server on loopback: changes made through the API (create, add,
remove, leave, rename, topic, admin), the membership chain verified against pinned keys (a forged op, an op by a
non-admin, a key substituted in an add, a reader the server adds without a signed op), group messages sealed to
the chain's members only and bound to their group, two admins at once, offline members, receipts per member, the
group_changed push, and the outbox keeping a group message across a restart.
"""

import dataclasses
import os

from twisted.internet import defer, reactor

import pager
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

    async def members_seen(self, client, gid, members):
        await self.wait_for(lambda: client.group(gid).addCallback(lambda g: list(g.members) == sorted(members))
                            if hasattr(client.group(gid), "addCallback") else None, "members")


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
