"""
End-to-end tests: a real pager server (makeService, the real Store) and real PagerClients talking over loopback TCP
on the real reactor.  Nothing sleeps: L{E2ETestCase.wait_for} polls a condition with a bound and fails saying what
it waited for.
"""

import inspect
import json
import os
import signal
import socket
import sys

from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.python import usage
from twisted.trial import unittest

import pager

PAGER_PY = os.path.abspath(pager.__file__)
LISTEN = "tcp:0:interface=127.0.0.1"
POLL = 0.01  # seconds between two looks at a condition
TRIES = 500  # looks before giving up: about 5 seconds

_KEYS = {}


def key(name):
    """The RSA key of C{name}, generated once for the whole module."""
    if name not in _KEYS:
        _KEYS[name] = pager.generate_private_key()
    return _KEYS[name]


def token(name):
    return name + "-safetoken"


class Events:
    """Records everything a PagerClient hands to its listener callbacks."""

    def __init__(self, client):
        self.messages, self.receipts, self.rejected, self.disconnects = [], [], [], []
        client.on_message = self.messages.append
        client.on_receipt = self.receipts.append
        client.on_rejected = lambda msg, sender, error: self.rejected.append((msg, sender, error))
        client.on_disconnect = self.disconnects.append


class RawClient(protocol.Protocol):
    """A plain TCP peer that writes whatever it is told and records what comes back."""

    def __init__(self):
        self.data = b""
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason

    def frames(self):
        """The complete lines received so far, parsed as JSON."""
        return [json.loads(line) for line in self.data.split(b"\n")[:-1]]


class E2ETestCase(unittest.TestCase):
    """Helpers to run servers and clients and to wait for conditions, cleaning everything up."""

    async def wait_for(self, condition, what, tries=TRIES):
        """
        Poll C{condition} (a callable returning a value or an awaitable) until it is true; return that value.
        Fails the test, naming C{what}, after C{tries} looks.
        """
        for _ in range(tries):
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await task.deferLater(reactor, POLL)
        self.fail("Timed out after %.1f s waiting for %s." % (tries * POLL, what))

    async def start_server(self, db=None, options=()):
        """
        A pager server from the command-line options (C{options} added) on a free loopback port; C{(service, client
        endpoint)}.
        """
        given = options
        options = pager.ServerOptions()
        options.parseOptions(["--listen", LISTEN, "--db", db or self.mktemp(), *given])
        server = pager.makeService(options, reactor)
        server.startService()
        self.addCleanup(self.stop_server, server)
        port = await server.ready
        return server, "tcp:127.0.0.1:%d" % port.getHost().port

    async def stop_server(self, server):
        if not server.running:
            return
        try:
            await self.wait_for(lambda: server.factory.connections == 0, "the server's connections to close")
        finally:
            await server.stopService()

    @property
    def keyring(self):
        """
        The prekeys of every device of this test (a L{pager.MemoryPrekeys}, keyed by device): each new session gets
        its device's prekeys, as a real device finds them in its state directory.
        """
        if not hasattr(self, "_keyring"):
            self._keyring = pager.MemoryPrekeys()
        return self._keyring

    async def connect(self, address, **kwargs):
        if kwargs.get("seen") is None:
            kwargs["seen"] = pager.MemorySeen(self.keyring)
        client = await pager.PagerClient.connect(address, reactor, **kwargs)
        self.addCleanup(client.close)
        client.events = Events(client)
        return client

    async def device_envelope(self, address, sender, recipients, plaintext, client=None, **kwargs):
        """
        An envelope from C{sender}'s identity device (its module key) to every device of C{recipients}, sealed to
        their prekeys as the server's bundles give them, for a test that sends it its own way.  C{client}: a
        logged-in session of C{sender} to ask for the bundles with (else one is logged in for that, then closed).
        """
        own = client is None
        if own:
            client = await self.login(address, sender, receive=False)
        try:
            targets = await client.device_targets(recipients)
        finally:
            if own:
                await client.close()
        return pager.seal(key(sender), sender, targets, plaintext, **kwargs)

    async def register(self, address, name):
        """A new account C{name} with its module key, logged in and receiving."""
        client = await self.connect(address)
        await client.register(name, token(name), key(name))
        return client

    async def login(self, address, name, receive=True, seen=None, pins=None):
        """A new session of C{name}: its event recorders are attached before it logs in."""
        client = await self.connect(address, seen=seen, pins=pins)
        await client.login(name, token(name), key(name), receive=receive)
        return client

    async def offline(self, server, *clients):
        """Close C{clients} and wait until the server no longer counts them as online."""
        names = {c.user for c in clients}
        for client in clients:
            await client.close()
        await self.wait_for(lambda: not names & set(server.factory.online), "%s to be offline" % sorted(names))

    def pending(self, server, name):
        """The messages the server still holds for C{name}."""
        return server.store.pending(name, 0)

    async def no_pending(self, server, name):
        await self.wait_for(lambda: self.pending(server, name).addCallback(lambda ms: not ms),
                            "the server to hold no message for %s" % name)

    def assertOpened(self, message, sender, plaintext, message_id=None, recipients=None):
        self.assertIsInstance(message, pager.OpenedMessage)
        self.assertEqual(message.sender, sender)
        self.assertEqual(message.sender_fingerprint, pager.fingerprint(key(sender).public_key()))
        self.assertEqual(message.plaintext, plaintext)
        if message_id is not None:
            self.assertEqual(message.message_id.hex(), message_id)
        if recipients is not None:
            self.assertEqual(message.recipients, tuple(recipients))


class DeliveryTests(E2ETestCase):
    """Messages reach their recipients, online or not, across restarts and reconnections, and only once."""

    async def test_online_delivery_with_receipt(self):
        """An online recipient gets the verified, decrypted message; the sender gets a 'delivered' receipt."""
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        msg = await alice.send("bob", "hello bob")
        await self.wait_for(lambda: bob.events.messages and alice.events.receipts, "bob's message and its receipt")
        [message] = bob.events.messages
        self.assertOpened(message, "alice", b"hello bob", msg, ["bob"])
        self.assertEqual(message.content_type, "text")
        self.assertIsNotNone(message.accepted_at)
        [receipt] = alice.events.receipts
        self.assertEqual((receipt.message_id, receipt.peer, receipt.status, receipt.reason),
                         (msg, "bob", "delivered", ""))
        await self.no_pending(server, "bob")
        await self.wait_for(lambda: server.store.pending_receipts("alice", 0).addCallback(lambda rs: not rs),
                            "alice's receipt to be acknowledged")
        self.assertEqual((bob.events.rejected, alice.events.messages), ([], []))

    async def test_multi_recipient(self):
        """One message to bob and carol reaches both, and alice gets a receipt from each."""
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        carol = await self.register(address, "carol")
        msg = await alice.send(["carol", "bob"], "hello both")
        await self.wait_for(lambda: bob.events.messages and carol.events.messages and len(alice.events.receipts) == 2,
                            "both deliveries and both receipts")
        for client in (bob, carol):
            [message] = client.events.messages
            self.assertOpened(message, "alice", b"hello both", msg, ["bob", "carol"])
        self.assertEqual(sorted((r.peer, r.status, r.message_id) for r in alice.events.receipts),
                         [("bob", "delivered", msg), ("carol", "delivered", msg)])

    async def test_offline_recipient(self):
        """A message to an offline user waits on the server; it is delivered at login and alice gets the receipt."""
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        msg = await alice.send("bob", "while you were out")
        self.assertEqual([m.msg_id.hex() for m in await self.pending(server, "bob")], [msg])
        bob = await self.login(address, "bob")
        await self.wait_for(lambda: bob.events.messages and alice.events.receipts, "delivery at login and receipt")
        [message] = bob.events.messages
        self.assertOpened(message, "alice", b"while you were out", msg)
        self.assertEqual([(r.message_id, r.status) for r in alice.events.receipts], [(msg, "delivered")])

    async def test_burst_acknowledged_in_few_frames(self):
        """
        Thirty messages waiting at login are all shown once and acknowledged, in fewer ack frames than messages
        (those handled while an ack is in flight go together in one list); the thirty receipts waiting for alice
        are dismissed the same way.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        sent = [await alice.send("bob", "page %d" % n) for n in range(30)]
        await self.offline(server, alice)
        frames = []
        handle_ack = pager.PagerServerProtocol.handle_ack

        def recording(protocol, frame, rid):
            frames.append((protocol.user, frame))
            return handle_ack(protocol, frame, rid)

        self.patch(pager.PagerServerProtocol, "handle_ack", recording)
        bob = await self.login(address, "bob")
        await self.wait_for(lambda: len(bob.events.messages) == 30, "thirty messages")
        await self.no_pending(server, "bob")
        self.assertEqual([m.message_id.hex() for m in bob.events.messages], sent)
        acked = [frame for user, frame in frames if user == "bob"]
        self.assertLess(len(acked), 30)
        # Handed over in order, each with every one before it: one cumulative ack covers them all.
        self.assertEqual([sorted(set(frame) & {"msg", "msgs", "upto"}) for frame in acked], [["upto"]] * len(acked))
        self.assertEqual(len(await server.store.pending_receipts("alice", 0)), 30)
        alice = await self.login(address, "alice")
        await self.wait_for(lambda: len(alice.events.receipts) == 30, "thirty receipts")
        await self.wait_for(lambda: server.store.pending_receipts("alice", 0).addCallback(lambda rs: not rs),
                            "alice's acknowledgement of the receipts")
        dismissed = [frame.get("receipts", [frame.get("receipt")]) for user, frame in frames if user == "alice"]
        self.assertEqual(sorted(r for batch in dismissed for r in batch), sorted(r.rid for r in alice.events.receipts))
        self.assertLess(len(dismissed), 30)

    async def test_cumulative_ack_stops_at_an_unsettled_message(self):
        """
        Messages are acknowledged with a cumulative ack (upto) while every message pushed before them is settled;
        one whose hand-off fails stays on the server, and those after it are acknowledged by list, never by a
        cumulative ack that would cover it.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        sent = [await alice.send("bob", "page %d" % n) for n in range(6)]
        frames = []
        handle_ack = pager.PagerServerProtocol.handle_ack

        def recording(protocol, frame, rid):
            frames.append(frame)
            return handle_ack(protocol, frame, rid)

        self.patch(pager.PagerServerProtocol, "handle_ack", recording)
        shown = []

        def hand_off(message):
            if message.plaintext == b"page 2":
                raise ValueError("the terminal is on fire")
            shown.append(message.message_id.hex())

        bob = await self.connect(address)
        bob.on_message = hand_off
        await bob.login("bob", token("bob"), key("bob"))
        await self.wait_for(lambda: len(shown) == 5, "five hand-offs")
        await self.wait_for(lambda: self.flushLoggedErrors(ValueError), "the hand-off error to be logged")

        async def only_the_failed_one_left():
            return [m.msg_id.hex() for m in await self.pending(server, "bob")] == [sent[2]]
        await self.wait_for(only_the_failed_one_left, "every message but the failed one acknowledged")
        self.assertTrue([frame for frame in frames if "upto" in frame])
        listed = {m for frame in frames for m in frame.get("msgs", [])}
        self.assertLessEqual(set(sent[3:]), listed)  # after the gap: by list (with some before it, perhaps)
        self.assertNotIn(sent[2], listed)
        await bob.ping()
        self.assertEqual([m.msg_id.hex() for m in await self.pending(server, "bob")], [sent[2]])

    async def test_acks_one_by_one_without_max_ack_batch(self):
        """
        A server that does not announce max_ack_batch (or announces something that is not a positive integer) gets
        one ack frame per message, in the original form, and every message is still acknowledged.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        sent = [await alice.send("bob", "page %d" % n) for n in range(5)]
        frames = []
        handle_ack = pager.PagerServerProtocol.handle_ack

        def recording(protocol, frame, rid):
            if protocol.user == "bob":
                frames.append(frame)
            return handle_ack(protocol, frame, rid)

        self.patch(pager.PagerServerProtocol, "handle_ack", recording)
        for announced in ("1000", None):
            client = await self.connect(address)
            if announced is None:
                del client.limits["max_ack_batch"]
            else:
                client.limits["max_ack_batch"] = announced
            self.assertIsNone(client._ack_batch())
            await client.close()
        bob = await self.connect(address)
        del bob.limits["max_ack_batch"]
        await bob.login("bob", token("bob"), key("bob"))
        await self.wait_for(lambda: len(bob.events.messages) == 5, "five messages")
        await self.no_pending(server, "bob")
        self.assertEqual([frame.get("msg") for frame in frames], sent)
        self.assertNotIn("msgs", str(frames))

    async def test_offline_sender_gets_stored_receipt(self):
        """When the sender is offline too, the receipt waits on the server and comes at her next login."""
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        msg = await alice.send("bob", "see you later")
        await self.offline(server, alice)
        bob = await self.login(address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        [stored] = await self.wait_for(lambda: server.store.pending_receipts("alice", 0),
                                       "the receipt to be stored for alice")
        self.assertEqual((stored.msg_id.hex(), stored.peer, stored.status), (msg, "bob", "delivered"))
        alice = await self.login(address, "alice")
        await self.wait_for(lambda: alice.events.receipts, "alice's stored receipt")
        [receipt] = alice.events.receipts
        self.assertEqual((receipt.message_id, receipt.peer, receipt.status, receipt.rid),
                         (msg, "bob", "delivered", stored.rid))
        await self.wait_for(lambda: server.store.pending_receipts("alice", 0).addCallback(lambda rs: not rs),
                            "alice's acknowledgement of the receipt")

    async def test_server_restart_loses_nothing(self):
        """
        A message accepted for an offline user survives the server being stopped: a new server on the same database
        (and another port) delivers it, with the same server id, and the receipt reaches the sender.
        """
        db = self.mktemp()
        first, address = await self.start_server(db)
        alice = await self.register(address, "alice")
        await self.offline(first, await self.register(address, "bob"))
        msg = await alice.send("bob", "survive the restart")
        server_id = alice.server_id
        await self.offline(first, alice)
        await first.stopService()

        second, address2 = await self.start_server(db)
        self.assertNotEqual(address, address2)
        bob = await self.login(address2, "bob")
        self.assertEqual(bob.server_id, server_id)
        await self.wait_for(lambda: bob.events.messages, "bob's message from the new server")
        self.assertOpened(bob.events.messages[0], "alice", b"survive the restart", msg)
        alice = await self.login(address2, "alice")
        await self.wait_for(lambda: alice.events.receipts, "alice's receipt from the new server")
        self.assertEqual([(r.message_id, r.status) for r in alice.events.receipts], [(msg, "delivered")])
        self.assertEqual(len(bob.events.messages), 1)

    async def test_handoff_never_finishes_then_reconnect(self):
        """
        A recipient whose hand-off never completes does not acknowledge: after it disconnects, its next session gets
        the message again, shows it once, and acknowledges it.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        msg = await alice.send("bob", "take your time")

        stuck, never = [], defer.Deferred()
        self.addCleanup(never.cancel)
        bob1 = await self.connect(address)
        bob1.on_message = lambda m: (stuck.append(m), never)[1]
        await bob1.login("bob", token("bob"), key("bob"))
        await self.wait_for(lambda: stuck, "the first hand-off to start")
        await self.offline(server, bob1)
        self.assertEqual([m.msg_id.hex() for m in await self.pending(server, "bob")], [msg])
        self.assertEqual(alice.events.receipts, [])

        bob2 = await self.login(address, "bob")
        await self.wait_for(lambda: bob2.events.messages, "the redelivery")
        await self.no_pending(server, "bob")
        await self.wait_for(lambda: alice.events.receipts, "alice's receipt")
        self.assertOpened(bob2.events.messages[0], "alice", b"take your time", msg)
        self.assertEqual((len(stuck), len(bob2.events.messages), len(alice.events.receipts)), (1, 1, 1))

    async def test_handoff_raises_then_reconnect(self):
        """
        A message whose hand-off raises stays on the server (and the error is logged); the next session gets it.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, await self.register(address, "bob"))
        calls = []

        def broken(message):
            calls.append(message)
            raise ValueError("the terminal is on fire")

        bob1 = await self.connect(address)
        bob1.on_message = broken
        await bob1.login("bob", token("bob"), key("bob"))
        msg = await alice.send("bob", "are you there")
        await self.wait_for(lambda: calls, "the failing hand-off")
        await self.wait_for(lambda: self.flushLoggedErrors(ValueError), "the hand-off error to be logged")
        await bob1.ping()
        self.assertEqual([m.msg_id.hex() for m in await self.pending(server, "bob")], [msg])
        await self.offline(server, bob1)

        bob2 = await self.login(address, "bob")
        await self.wait_for(lambda: bob2.events.messages, "the redelivery")
        await self.no_pending(server, "bob")
        self.assertOpened(bob2.events.messages[0], "alice", b"are you there", msg)
        self.assertEqual(len(calls), 1)

    async def _lose_ack(self, seen_path):
        """
        Alice sends bob a message; bob's first session (with a SeenStore on C{seen_path}, or none) hands it off,
        then drops the connection before its ack can be written.  Returns C{(server, address, alice, msg, seen, shown)}:
        C{seen} is the first session's SeenStore (or None), C{shown} lists what that session handed off.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        seen = None
        if seen_path is not None:
            # The device's state from the start: its prekeys are kept in the same store as the seen ids.
            seen = pager.SeenStore(seen_path)
            self.addCleanup(lambda: seen.pool.running and seen.close())
            await seen.open(reactor.seconds())
        bob0 = await self.connect(address, seen=seen)
        await bob0.register("bob", token("bob"), key("bob"))
        await self.offline(server, bob0)
        msg = await alice.send("bob", "exactly once, please")
        shown = []

        def show_then_drop(message):
            shown.append(message)
            bob1.protocol.transport.abortConnection()  # nothing written from now on reaches the server

        bob1 = await self.connect(address, seen=seen)
        bob1.on_message = show_then_drop
        try:
            await bob1.login("bob", token("bob"), key("bob"))
        except pager.ConnectionLost:
            pass  # the hand-off dropped the connection while login's follow-up requests (devices, prekeys) waited
        await self.wait_for(lambda: shown, "the first hand-off")
        await self.wait_for(lambda: "bob" not in server.factory.online, "bob's first session to end")
        # The premise: the server never got the ack, so it still holds the message.
        self.assertEqual([m.msg_id.hex() for m in await self.pending(server, "bob")], [msg])
        return server, address, alice, msg, seen, shown

    async def test_lost_ack_deduplicated_by_seen_store(self):
        """
        A message handed off whose ack was lost is redelivered; a session sharing the same SeenStore acknowledges it
        without handing it off a second time.
        """
        seen_path = self.mktemp()
        server, address, alice, msg, seen, shown = await self._lose_ack(seen_path)
        self.assertTrue(await seen.contains("alice", bytes.fromhex(msg)))
        bob2 = await self.login(address, "bob", seen=seen)
        await self.no_pending(server, "bob")
        await self.wait_for(lambda: alice.events.receipts, "alice's receipt")
        self.assertEqual(bob2.events.messages, [])
        self.assertEqual(len(shown), 1)
        self.assertOpened(shown[0], "alice", b"exactly once, please", msg)
        self.assertEqual([(r.message_id, r.status) for r in alice.events.receipts], [(msg, "delivered")])

    async def test_lost_ack_deduplicated_by_reopened_seen_store(self):
        """The duplicate store persists: a new SeenStore on the same file (a restarted client) still deduplicates."""
        seen_path = self.mktemp()
        server, address, alice, msg, seen, shown = await self._lose_ack(seen_path)
        seen.close()
        reopened = pager.SeenStore(seen_path)
        self.addCleanup(reopened.close)
        await reopened.open(reactor.seconds())
        bob2 = await self.login(address, "bob", seen=reopened)
        await self.no_pending(server, "bob")
        self.assertEqual((len(shown), bob2.events.messages), (1, []))

    async def test_lost_ack_redelivered_without_seen_store(self):
        """
        The control for the two tests above: a session without the first session's duplicate store is pushed the
        message again, which proves the ack really was lost and the server really redelivers.  The one-time prekey
        it was sealed to went when the first session stored it (forward secrecy), so it can no longer be opened: the
        device, which recorded that it stored it, acknowledges it without showing it twice or refusing it.
        """
        server, address, alice, msg, seen, shown = await self._lose_ack(None)
        bob2 = await self.login(address, "bob")
        await self.wait_for(lambda: bob2.processed, "the redelivery")
        await self.no_pending(server, "bob")
        self.assertEqual([m.message_id.hex() for m in shown], [msg])
        self.assertEqual((bob2.events.messages, bob2.events.rejected), ([], []))

    async def test_large_message(self):
        """
        A 3 MiB message is uploaded in many frames, streamed to the recipient in many frames, and arrives intact.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        sent_kinds, received_kinds = [], []
        alice_send_frame = alice.protocol.send_frame
        alice.protocol.send_frame = lambda frame: (sent_kinds.append(frame["type"]), alice_send_frame(frame))[1]
        bob_frame_received = bob.frame_received
        bob.frame_received = lambda frame: (received_kinds.append(frame["type"]), bob_frame_received(frame))[1]

        big = os.urandom(3 * 1024 * 1024)
        msg = await alice.send("bob", big, content_type="file", filename="big.bin")
        await self.wait_for(lambda: bob.events.messages and alice.events.receipts, "the 3 MiB message", tries=2000)
        [message] = bob.events.messages
        self.assertOpened(message, "alice", big, msg)
        self.assertEqual((message.content_type, message.filename), ("file", "big.bin"))
        self.assertEqual(alice.events.receipts[0].status, "delivered")
        self.assertGreater(sent_kinds.count("chunk"), 10)
        self.assertEqual(received_kinds.count("message"), 1)
        self.assertGreater(received_kinds.count("message_chunk"), 10)

    async def test_two_sessions_of_one_user(self):
        """
        An interactive session and a send-only session of bob can both send; only the interactive one gets bob's
        messages.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        interactive = await self.register(address, "bob")
        send_only = await self.login(address, "bob", receive=False)
        await interactive.send("alice", "from the terminal")
        await send_only.send("alice", "from a script")
        await self.wait_for(lambda: len(alice.events.messages) == 2, "both of bob's messages")
        self.assertEqual(sorted((m.sender, m.plaintext) for m in alice.events.messages),
                         [("bob", b"from a script"), ("bob", b"from the terminal")])

        msg = await alice.send("bob", "for whoever reads")
        await self.wait_for(lambda: interactive.events.messages, "the interactive session's message")
        await self.no_pending(server, "bob")
        await send_only.ping()
        self.assertOpened(interactive.events.messages[0], "alice", b"for whoever reads", msg)
        self.assertEqual(len(interactive.events.messages), 1)
        self.assertEqual(send_only.events.messages, [])
        online, registered = await send_only.users()
        self.assertEqual((online, registered), (["alice", "bob"], ["alice", "bob"]))

    async def test_users_paged(self):
        """
        With 2100 registered users, PagerClient.users reads every page (three of at most 1000) and returns all
        names; users_page gives one page with the totals and where to go on (with online, it counts those online).
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        public = key("alice").public_key()
        pem, fp = pager.public_key_pem(public), pager.fingerprint(public)
        names = ["user%04d" % n for n in range(2100)]
        await defer.gatherResults([server.store.add_user(name, pem, fp, b"s" * 16, b"h" * 32, 0.0)
                                   for name in names])
        online, registered = await alice.users()
        self.assertEqual((online, registered), (["alice"], ["alice"] + names))
        page = await alice.users_page(after="user0999", limit=3)
        self.assertEqual(page, pager.UsersPage(["user1000", "user1001", "user1002"], [], 2101, 1, "user1002"))
        page = await alice.users_page(online=True)
        self.assertEqual(page, pager.UsersPage(["alice"], ["alice"], 1, 1, None))

    async def test_rejected_message(self):
        """
        A message the recipient cannot open (its client holds the wrong private key) is rejected: alice's receipt
        says rejected with the reason, and the server does not send it again.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        bob.private_key = key("not-bob")
        msg = await alice.send("bob", "for bob's eyes only")
        await self.wait_for(lambda: bob.events.rejected and alice.events.receipts, "the rejection and its receipt")
        [(rejected_msg, sender, error)] = bob.events.rejected
        self.assertEqual((rejected_msg, sender), (msg, "alice"))
        self.assertIsInstance(error, pager.EnvelopeError)
        [receipt] = alice.events.receipts
        self.assertEqual((receipt.message_id, receipt.peer, receipt.status), (msg, "bob", "rejected"))
        self.assertEqual(receipt.reason, error.message)
        self.assertTrue(receipt.reason)
        self.assertEqual(bob.events.messages, [])
        await self.no_pending(server, "bob")

        # A new session of bob, with the right key, gets the next message and never the rejected one.
        await self.offline(server, bob)
        bob2 = await self.login(address, "bob")
        later = await alice.send("bob", "second try")
        await self.wait_for(lambda: bob2.events.messages, "the next message")
        await bob2.ping()
        self.assertEqual([(m.message_id.hex(), m.plaintext) for m in bob2.events.messages], [(later, b"second try")])
        self.assertEqual(bob2.events.rejected, [])


    async def test_sender_rekeys_before_delivery(self):
        """
        A message signed just before its sender replaced the key still opens for a recipient who pinned the old
        key, as verified, while a recipient with no pin cannot tell it from a forgery and rejects it.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        carol = await self.register(address, "carol")
        await bob.trust("alice")  # bob has seen alice's key before: it is pinned in his client
        await self.offline(server, bob)
        await self.offline(server, carol)
        msg = await alice.send(["bob", "carol"], "sent before my re-key")
        new_key = key("alice-new")
        await alice.rekey("alice", token("alice"), key("alice"), new_key)
        bob2 = await self.login(address, "bob", pins=bob.pins)
        await self.wait_for(lambda: bob2.events.messages, "the message signed with the old key")
        [opened] = bob2.events.messages
        self.assertEqual((opened.message_id.hex(), opened.plaintext, opened.key_status),
                         (msg, b"sent before my re-key", "pinned"))
        carol2 = await self.login(address, "carol")
        await self.wait_for(lambda: carol2.events.rejected, "carol's client to refuse what it cannot verify")
        self.assertIsInstance(carol2.events.rejected[0][2], pager.WrongSenderKey)

    async def test_recipient_rekeys_before_delivery(self):
        """
        A message sealed for its recipient's devices before the recipient re-keyed cannot open on the new device:
        it is refused with a reason that says why (sealed for the devices of before), and its sender is told it.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        await self.offline(server, alice)
        msg = await bob.send(["alice"], "sent while alice's laptop was lost")
        again = await self.connect(address)  # alice's new machine
        await again.recover("alice", token("alice"), key("alice-new"))
        await again.login("alice", token("alice"), key("alice-new"))
        await self.wait_for(lambda: again.events.rejected, "the message refused at alice's new device")
        reason = again.events.rejected[0][2].message
        self.assertEqual(reason, "The message was sealed for alice's devices as they were when it was sent, and "
                                 "this one was not among them (a key change or a device linked since).")
        await self.wait_for(lambda: [r for r in bob.events.receipts if r.message_id == msg], "bob's receipt")
        [receipt] = [r for r in bob.events.receipts if r.message_id == msg]
        self.assertEqual((receipt.status, receipt.reason), ("rejected", reason))


class RobustnessTests(E2ETestCase):
    """Bad peers are answered and dropped without disturbing anyone else; connections end cleanly."""

    async def test_garbage_and_long_line(self):
        """
        A raw peer's non-JSON line gets an error frame; its 200 KB line without a newline gets too_large and the
        connection is closed.  A logged-in user keeps pinging and messaging throughout.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        raw = RawClient()
        port = server.port.getHost().port
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
        self.addCleanup(self._drop_raw, raw)
        await self.wait_for(lambda: raw.frames(), "the hello")
        self.assertEqual(raw.frames()[0]["type"], "hello")

        raw.transport.write(b"\xff\xfe not json\n")
        await self.wait_for(lambda: len(raw.frames()) >= 2, "the answer to garbage")
        error = raw.frames()[1]
        self.assertEqual((error["type"], error["code"]), ("error", "bad_request"))
        self.assertNotIn("id", error)

        async def still_working(text):
            await alice.ping()
            count = len(bob.events.messages)
            msg = await alice.send("bob", text)
            await self.wait_for(lambda: len(bob.events.messages) > count, "bob to get %r" % text)
            self.assertOpened(bob.events.messages[-1], "alice", text.encode(), msg)

        await still_working("during")
        self.assertIsNone(raw.lost, "the server dropped a peer for one bad line")

        raw.transport.write(b"x" * 200_000)
        await self.wait_for(lambda: raw.lost is not None, "the server to drop the long line's connection")
        codes = [f.get("code") for f in raw.frames() if f["type"] == "error"]
        self.assertEqual(codes, ["bad_request", "too_large"])
        await still_working("after")

    async def _drop_raw(self, raw):
        if raw.lost is None:
            raw.transport.loseConnection()
            await self.wait_for(lambda: raw.lost is not None, "the raw connection to close")

    async def test_request_after_disconnect_fails(self):
        """A request made after the connection is gone fails with ConnectionLost instead of waiting forever."""
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.offline(server, alice)
        d = defer.Deferred.fromCoroutine(alice.ping())
        for _ in range(100):
            if d.called:
                break
            await task.deferLater(reactor, POLL)
        if not d.called:
            d.addErrback(lambda f: None)
            d.cancel()
            self.fail("ping() on a closed connection neither answered nor failed within 1 s: it waits forever.")
        with self.assertRaises(pager.ConnectionLost):
            await d

    async def test_stop_service_closes_connections(self):
        """Stopping the server service also ends its clients' connections: none stays tied to the closed store."""
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await server.stopService()
        gone = alice.protocol.done
        for _ in range(100):
            if gone.called:
                break
            await task.deferLater(reactor, POLL)
        self.assertTrue(gone.called, "alice's connection is still open 1 s after the server service stopped")


class SignatureCheckerTests(E2ETestCase):
    """
    The server checks the signatures of sends in its checker process (SignatureChecker): what it refuses is refused
    as before, and a checker that dies or hangs loses no message and changes no order.
    """

    async def test_forged_signature_refused(self):
        """A send whose signature does not verify is refused with bad_request and stored nowhere."""
        server, address = await self.start_server()
        checker = server.factory.signatures
        self.assertTrue(checker.running)
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        await self.offline(server, bob)
        await self.assertForgeryRefused(address, alice)
        msg = await alice.send("bob", "from alice")
        [held] = await self.pending(server, "bob")
        self.assertEqual(held.msg_id.hex(), msg)
        self.assertGreaterEqual(checker._answered, 2)  # both went through the checker process

    async def test_send_without_chunks_stalls_nothing(self):
        """
        A send with no chunk at all (size 0), whose signed bytes cannot even be formed, is refused with
        bad_request before the store keeps a place for it: the sends after it are still answered and delivered.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        envelope = await self.device_envelope(address, "alice", ["bob"], b"", client=alice)
        alice.protocol.send_frame({"type": "send", "id": "empty", "to": ["bob"], "size": 0,
                                   "header": pager.b64(envelope.header), "chunks": [],
                                   "signature": pager.b64(envelope.signature)})
        msg = await alice.send("bob", "after the empty one")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertOpened(bob.events.messages[0], "alice", b"after the empty one", msg)

    async def test_checker_failing_to_ask_stalls_nothing(self):
        """
        A send whose check cannot even be asked (the checker raises) gets an error, and gives back the place the
        store kept for it: the sends after it are still answered.
        """
        server, address = await self.start_server()
        alice = await self.register(address, "alice")
        await self.register(address, "bob")
        checker = server.factory.signatures
        real = checker.check

        def broken(*args):
            checker.check = real
            raise RuntimeError("the pipe is gone")

        checker.check = broken
        with self.assertRaises(pager.PagerError) as failed:
            await alice.send("bob", "refused")
        self.assertEqual(failed.exception.code, "internal")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await alice.send("bob", "after")

    async def test_checker_killed_nothing_lost(self):
        """
        Checks still waiting when the checker process is killed are made by the server itself: every message is
        accepted, and arrives once; a new checker process takes the checks after.  (The twenty are sealed in
        threads, so they leave in no set order; the store's order around places kept for checks is tested in
        test_checker.)
        """
        server, address = await self.start_server()
        checker = server.factory.signatures
        checker.RESTART_DELAY = 0.05
        alice = await self.register(address, "alice")
        bob = await self.register(address, "bob")
        await alice.send("bob", "before")
        os.kill(checker.transport.pid, signal.SIGSTOP)  # it answers nothing now, and checks pile up
        sends = [defer.Deferred.fromCoroutine(alice.send("bob", "during %d" % i)) for i in range(20)]
        await self.wait_for(lambda: len(checker._waiting) == 20, "the checks to wait for the stopped checker")
        checker.transport.signalProcess("KILL")
        ids = await defer.gatherResults(sends)
        await self.wait_for(lambda: checker.running, "a new checker process")
        answered = checker._answered
        ids.append(await alice.send("bob", "after"))
        self.assertEqual(checker._answered, answered + 1)
        await self.wait_for(lambda: len(bob.events.messages) == 22, "bob's 22 messages")
        received = bob.events.messages
        self.assertEqual(sorted(m.message_id.hex() for m in received[1:]), sorted(ids))
        self.assertEqual(sorted(m.plaintext for m in received[1:-1]), sorted(b"during %d" % i for i in range(20)))
        self.assertEqual((received[0].plaintext, received[-1].plaintext), (b"before", b"after"))
        await self.no_pending(server, "bob")

    async def test_in_process(self):
        """--signatures-in-process: no checker process; the store's thread checks, and refuses a forgery."""
        server, address = await self.start_server(options=["--signatures-in-process"])
        self.assertIsNone(server.factory.signatures)
        alice = await self.register(address, "alice")
        await self.register(address, "bob")
        await self.assertForgeryRefused(address, alice)
        await alice.send("bob", "fine")

    async def assertForgeryRefused(self, address, alice):
        """alice's send to bob of an envelope whose signature does not verify is refused with bad_request."""
        envelope = await self.device_envelope(address, "alice", ["bob"], b"not from alice", client=alice)
        forged = pager.Envelope(envelope.header, envelope.chunks, bytes([envelope.signature[0] ^ 1])
                                + envelope.signature[1:])
        with self.assertRaises(pager.BadRequest) as refused:
            await alice.send_envelope(["bob"], forged)
        self.assertIn("signature", refused.exception.message)


class CommandLineTests(unittest.SynchronousTestCase):
    """The server's command-line options."""

    def test_max_line_too_small(self):
        """A --max-line too small for one chunk frame is a usage error."""
        self.assertRaises(usage.UsageError, pager.Options().parseOptions, ["server", "--max-line", "1000"])

    def test_bad_listen(self):
        """A --listen that is not a server endpoint string is a usage error."""
        self.assertRaises(usage.UsageError, pager.Options().parseOptions, ["server", "--listen", "nonsense:1"])

    def test_not_positive(self):
        """Limits must be positive numbers."""
        self.assertRaises(usage.UsageError, pager.Options().parseOptions, ["server", "--max-message", "0"])

    def test_no_command(self):
        """Naming no command is a usage error."""
        self.assertRaises(usage.UsageError, pager.Options().parseOptions, [])

    def test_defaults(self):
        """With no options the server listens on tcp:5050:backlog=1024 and uses pager.sqlite3, with default limits."""
        options = pager.Options()
        options.parseOptions(["server"])
        self.assertEqual(options.subCommand, "server")
        self.assertEqual(options.subOptions["listen"], "tcp:5050:backlog=1024")
        self.assertEqual(options.subOptions["db"], "pager.sqlite3")
        self.assertEqual(options.subOptions.limits, pager.Limits())

    def test_limits(self):
        """Limit options become the server's Limits."""
        options = pager.Options()
        options.parseOptions(["server", "--max-line", str(200 * 1024), "--idle-timeout", "12.5", "--no-recovery"])
        limits = options.subOptions.limits
        self.assertEqual((limits.max_line, limits.idle_timeout, limits.allow_recovery), (200 * 1024, 12.5, False))


class ServerProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.stdout = b""
        self.stderr = b""
        self.ended = None

    def outReceived(self, data):
        self.stdout += data

    def errReceived(self, data):
        self.stderr += data

    def processEnded(self, reason):
        self.ended = reason


def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessTests(E2ETestCase):
    """C{python pager.py server} as a real process."""

    async def test_server_process(self):
        """
        The server process listens, greets a client with hello, logs 'listening on' and its server id (which
        users compare before 'trust-server') to stderr, and exits with status 0 on SIGTERM.
        """
        port = free_port()
        db = os.path.abspath(self.mktemp())
        process = ServerProcess()
        argv = [sys.executable, PAGER_PY, "server", "--listen", "tcp:%d:interface=127.0.0.1" % port, "--db", db]
        reactor.spawnProcess(process, sys.executable, argv, env=os.environ.copy(),
                             path=os.path.dirname(PAGER_PY))
        self.addCleanup(self._kill, process)

        async def try_connect():
            if process.ended is not None:
                self.fail("The server process ended early: %s\n%s" % (process.ended.value,
                                                                       process.stderr.decode(errors="replace")))
            try:
                return await pager.PagerClient.connect("tcp:127.0.0.1:%d" % port, reactor, timeout=5)
            except error.ConnectionRefusedError:
                return None

        client = await self.wait_for(try_connect, "the server process to accept connections", tries=1500)
        self.addCleanup(client.close)
        self.assertEqual(client.hello["type"], "hello")
        self.assertEqual(client.hello["protocol"], pager.PROTOCOL_VERSION)
        self.assertEqual(client.hello["server"], pager.SOFTWARE)
        await client.close()

        process.transport.signalProcess("TERM")
        await self.wait_for(lambda: process.ended is not None, "the server process to exit after SIGTERM", tries=1000)
        self.assertEqual(process.ended.value.exitCode, 0, process.stderr.decode(errors="replace"))
        self.assertIn(b"listening on", process.stderr)
        self.assertIn(b"server id " + client.server_id.encode(), process.stderr)
        self.assertTrue(os.path.exists(db))

    async def _kill(self, process):
        if process.ended is None:
            try:
                process.transport.signalProcess("KILL")
            except Exception:
                pass
            await self.wait_for(lambda: process.ended is not None, "the killed server process to end")
