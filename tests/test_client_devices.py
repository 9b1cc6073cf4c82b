"""
The client library's side of devices, over a real server on loopback: linking a device (and refusing a wrong code
or a forged answer), two users with two devices each, the sender's other devices, receipts per user, no downgrade
to RSA-OAEP, sealing anew when the devices changed, the device lines, and keeping prekeys up (rotation, top-up,
lost state), and the local tables that keep a device's prekeys and its contacts' devices.
"""

import dataclasses
import hashlib
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

import pager
from tests.test_e2e import LISTEN, E2ETestCase, Events, key, token
from tests.test_forward_secrecy import ShiftedClock


class DeviceClientTestCase(E2ETestCase):

    async def setUp(self):
        self.server, self.address = await self.start_server()

    async def link(self, identity, label, name="laptop"):
        """
        Link a new device (key C{label}) to C{identity}'s account: the new device asks with a fresh code, the
        identity device approves with the code as typed; the new device then logs in.  Returns its client.
        """
        user = identity.user
        newcomer = await self.connect(self.address)
        text, secret = pager.new_link_code()
        await newcomer.link_request(user, key(label), name, secret)
        linked = defer.Deferred.fromCoroutine(newcomer.wait_linked())
        info = await identity.approve_link(None, None, pager.parse_link_code(text.lower().replace("-", " ")))
        mine = await linked
        self.assertEqual((info.id, mine.id, mine.name), (pager.device_id(key(label)).hex(),) * 2 + (name,))
        device = await self.connect(self.address)
        await device.login(user, None, key(label), device=mine.id)
        await newcomer.close()
        return device

    def strip_bundles(self, client, change):
        """Make C{client} see every device object of its bundle answers through C{change(device object)}."""
        request = client.protocol.request

        def changed(kind, **fields):
            d = request(kind, **fields)
            if kind == "bundle":
                def edit(answer):
                    for bundle in answer["bundles"]:
                        for device in bundle["devices"]:
                            change(device)
                    return answer
                d.addCallback(edit)
            return d
        client.protocol.request = changed


class TwoDevicesEachTests(DeviceClientTestCase):

    async def test_two_users_two_devices_each(self):
        """
        alice and bob each have two devices.  alice's message reaches both of bob's and her own other device, which
        sees it as sent by alice (sender == its own user, sender_device == alice's first device); bob's answer from
        his second device likewise.  alice gets one receipt for bob, however many of his devices acknowledged.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        alice2 = await self.link(alice, "alice-laptop")
        bob2 = await self.link(bob, "bob-phone", name="phone")
        for client in (alice2, bob2):
            client.events = type(alice.events)(client)
        msg = await alice.send("bob", "hello bob, everywhere")
        for client in (bob, bob2, alice2):
            await self.wait_for(lambda: client.events.messages, "the message on %s's device %s" % (
                client.user, client.device))
        for client in (bob, bob2):
            self.assertOpened(client.events.messages[0], "alice", b"hello bob, everywhere", msg)
            self.assertEqual(client.events.messages[0].sender_device, pager.device_id(key("alice")))
            self.assertEqual(client.events.messages[0].recipients, ("bob",))  # not alice: she wrote to bob only
        [own] = alice2.events.messages
        self.assertEqual((own.sender, own.sender_device, bytes(own.plaintext)),
                         ("alice", pager.device_id(key("alice")), b"hello bob, everywhere"))
        self.assertEqual(own.recipients, ("bob",))
        self.assertEqual(alice.events.messages, [])  # never to the sending device
        await self.no_pending(self.server, "bob")
        await self.wait_for(lambda: alice.events.receipts, "alice's receipt")
        reply = await bob2.send("alice", "got it, from my phone")
        for client in (alice, alice2, bob):
            await self.wait_for(lambda: client.events.messages and client.events.messages[-1].message_id.hex()
                                == reply, "the reply on %s's device %s" % (client.user, client.device))
        self.assertEqual(bob.events.messages[-1].sender_device, pager.device_id(key("bob-phone")))
        await self.wait_for(lambda: bob2.events.receipts, "bob's receipt")
        await self.no_pending(self.server, "alice")
        # One receipt per recipient user (each of the sender's devices may be told it).
        self.assertEqual([(r.message_id, r.peer, r.status) for r in alice.events.receipts], [(msg, "bob", "delivered")])
        self.assertEqual({(r.message_id, r.peer, r.status) for r in alice.events.receipts + alice2.events.receipts},
                         {(msg, "bob", "delivered")})
        self.assertEqual({(r.message_id, r.peer) for r in bob.events.receipts + bob2.events.receipts},
                         {(reply, "alice")})
        self.assertLessEqual(len(bob2.events.receipts), 1)

    async def test_devices_listed_and_verified(self):
        """devices() lists a user's devices, each certified by the pinned identity key; one's own with last_seen."""
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        await self.link(bob, "bob-phone", name="phone")
        listed = await alice.devices("bob")
        self.assertEqual([(d.id, d.name, d.certified, d.revoked) for d in listed],
                         [(pager.device_id(key("bob")).hex(), pager.default_device_name(), True, False),
                          (pager.device_id(key("bob-phone")).hex(), "phone", True, False)])
        own = await bob.devices()
        self.assertEqual(len(own), 2)
        self.assertTrue(all(d.last_seen is not None for d in own))


class LinkRefusalTests(DeviceClientTestCase):

    async def test_wrong_code_signs_nothing(self):
        """
        The identity device checks the request's MAC with the code typed before signing: another code (a typo,
        or a passer-by's request) matches no request, raises BadLinkCode, and no device is added.
        """
        alice = await self.register(self.address, "alice")
        newcomer = await self.connect(self.address)
        _, secret = pager.new_link_code()
        await newcomer.link_request("alice", key("alice-laptop"), "laptop", secret)
        _, other = pager.new_link_code()
        signed = []
        self.patch(pager, "certify_device", lambda *args: signed.append(args))
        with self.assertRaises(pager.BadLinkCode):
            await alice.approve_link(None, None, other)
        [request] = await alice.link_pending()
        with self.assertRaises(pager.BadLinkCode):
            await alice.approve_link(request, "laptop", other)
        self.assertEqual(signed, [])
        self.assertEqual(len(await alice.devices()), 1)

    async def test_code_matching_two_requests_refused(self):
        """
        approve_link(None, ...) with a code whose MAC two pending requests carry (two devices asking with one code,
        or a request the server copied) refuses, in a sentence saying so, and signs nothing; the request chosen by
        the user (approve_link(request, ...)) is approved.
        """
        alice = await self.register(self.address, "alice")
        _, secret = pager.new_link_code()
        for label, name in (("alice-laptop", "laptop"), ("alice-phone", "phone")):
            newcomer = await self.connect(self.address)
            await newcomer.link_request("alice", key(label), name, secret)
        signed = []
        real = pager.certify_device
        self.patch(pager, "certify_device", lambda *args: signed.append(args) or real(*args))
        error = await self.assertFailure(defer.Deferred.fromCoroutine(alice.approve_link(None, None, secret)),
                                         pager.BadLinkCode)
        self.assertIn("More than one", error.message)
        self.assertEqual(signed, [])
        requests = await alice.link_pending()
        self.assertEqual(len(requests), 2)
        info = await alice.approve_link([r for r in requests if r.name == "phone"][0], None, secret)
        self.assertEqual((info.name, len(signed)), ("phone", 1))

    async def test_evicted(self):
        """
        The server pushed the request out to make room for newer ones (link_expired with evicted): the wait ends
        with LinkFailed saying so, not that nobody approved it in time.
        """
        newcomer = await self.connect(self.address)
        await self.register(self.address, "alice")
        _, secret = pager.new_link_code()
        await newcomer.link_request("alice", key("alice-laptop"), "laptop", secret)
        waiting = defer.Deferred.fromCoroutine(newcomer.wait_linked())
        newcomer.frame_received({"type": "link_expired", "evicted": True})
        failure = await self.assertFailure(waiting, pager.LinkFailed)
        self.assertIn("to make room for newer requests for alice", failure.message)

    async def test_declined(self):
        """
        The identity device declines a request (the person answered no): the new device's wait ends at once with
        LinkFailed saying it was declined on the identity device, the request is gone, and no device was added.
        """
        alice = await self.register(self.address, "alice")
        newcomer = await self.connect(self.address)
        _, secret = pager.new_link_code()
        await newcomer.link_request("alice", key("alice-laptop"), "laptop", secret)
        waiting = defer.Deferred.fromCoroutine(newcomer.wait_linked())
        [request] = await alice.link_pending()
        await alice.decline_link(request)
        failure = await self.assertFailure(waiting, pager.LinkFailed)
        self.assertIn("declined on the machine that holds alice's identity key", failure.message)
        self.assertEqual((await alice.link_pending(), len(await alice.devices())), ([], 1))
        with self.assertRaises(pager.BadRequest):  # answered already
            await alice.decline_link(request)

    async def answer(self, frame_fields, secret, label="alice-laptop", identity="alice"):
        """The new device's check of a C{linked} push made of C{frame_fields}; returns the wait's Deferred."""
        newcomer = await self.connect(self.address)
        newcomer._link = pager._LinkWait("alice", key(label), "laptop", secret, defer.Deferred(), "ab")
        waiting = defer.Deferred.fromCoroutine(newcomer.wait_linked())
        frame = {"type": "linked", "link": "ab"}
        frame.update(frame_fields)
        newcomer.frame_received(frame)
        return waiting

    def certificate(self, signer, label="alice-laptop"):
        return pager.certify_device(key(signer), "alice", key(label).public_key(), "laptop", 1700000000)

    async def test_forged_answers_refused(self):
        """
        The new device accepts only a certificate of its own key, signed by the identity key the answer gives and
        covered by a MAC made with its code: a server (or anyone without the code) cannot make it take another
        identity or another certificate.
        """
        _, secret = pager.new_link_code()
        _, wrong = pager.new_link_code()
        server_id = self.server.factory.server_id

        def fields(certificate, mac_secret, identity="alice", bound=None):
            return {"device": certificate.to_json(), "identity_key": pager.public_key_pem(key(identity).public_key()),
                    "answer_mac": pager.b64(pager.link_answer_mac(
                        mac_secret, server_id, pager.fingerprint(key(bound or identity)), certificate))}

        good = self.certificate("alice")
        cases = [
            fields(good, wrong),  # a MAC made without the code (the server's, a passer-by's)
            fields(self.certificate("mallory"), wrong, "mallory"),  # the server's own identity, without the code
            fields(self.certificate("mallory"), secret),  # a certificate the identity key did not sign
            fields(self.certificate("alice", "mallory-key"), secret),  # another device's key
            fields(good, secret, bound="mallory"),  # a MAC over another identity than the answer's key
        ]
        for case in cases:
            failure = await self.assertFailure(await self.answer(case, secret), pager.LinkFailed)
            self.assertIn("refused", failure.message)
        linked = await (await self.answer(fields(good, secret), secret))  # the control
        self.assertEqual(linked.id, pager.device_id(key("alice-laptop")).hex())


class NoDowngradeTests(DeviceClientTestCase):

    async def test_withheld_prekeys_refused(self):
        """
        A server that withholds a certified device's signed prekey gets NoPrekeys from the sender, not a message
        wrapped with RSA-OAEP: nothing is sent.
        """
        alice = await self.register(self.address, "alice")
        await self.register(self.address, "bob")

        def withhold(device):
            device["signed_prekey"] = device["one_time_prekey"] = None
        self.strip_bundles(alice, withhold)
        with self.assertRaises(pager.NoPrekeys):
            await alice.send("bob", "not like this")
        self.assertEqual(await self.pending(self.server, "bob"), [])

    async def test_certified_once_never_rsa(self):
        """
        A legacy device (no certificate, never published prekeys, its key the identity key) is wrapped with
        RSA-OAEP only while its user was never seen with a certified device: once one was, the same answer is
        refused (NoPrekeys), so a server cannot make a device look legacy again.  An uncertified device whose key
        is not the identity key is refused outright.
        """
        alice = await self.register(self.address, "alice")
        await self.register(self.address, "bob")

        def legacy(device):
            device.update(certificate=None, name=None, created=None, prekeys=False, signed_prekey=None,
                          one_time_prekey=None)
        request = alice.protocol.request
        self.strip_bundles(alice, legacy)
        names, envelope = await alice.seal("bob", "to a 0.2 account")
        [entry] = pager.parse_header(envelope.header).entries
        self.assertEqual((entry.name, entry.kind), ("bob", pager.WRAP_RSA))
        alice.protocol.request = request
        await alice.send("bob", "seen certified now")
        self.strip_bundles(alice, legacy)
        with self.assertRaises(pager.NoPrekeys):
            await alice.seal("bob", "downgraded")

        def stranger(device):
            legacy(device)
            device["public_key"] = pager.public_key_pem(key("mallory").public_key())
            device["id"] = pager.device_id(key("mallory")).hex()
        alice.protocol.request = request
        self.strip_bundles(alice, stranger)
        with self.assertRaises(pager.BadCertificate):
            await alice.seal("bob", "to a stranger")


class DeviceChangeTests(DeviceClientTestCase):

    async def test_sealed_anew_when_devices_changed(self):
        """
        A message sealed before bob linked a device is refused by the server (devices_changed); the client seals
        it anew, with the same message id, and it reaches both of bob's devices.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        names, envelope = await alice.seal("bob", "sealed before the phone")
        bob2 = await self.link(bob, "bob-phone", name="phone")
        answer = await alice.send_envelope(names, envelope)
        self.assertEqual(answer["msg"], pager.parse_header(envelope.header).message_id.hex())
        for client in (bob, bob2):
            await self.wait_for(lambda: client.events.messages, "the message on both of bob's devices")
            self.assertOpened(client.events.messages[0], "alice", b"sealed before the phone", answer["msg"])

    async def test_device_lines(self):
        """
        alice's client tells on_devices_changed when a contact it knows adds a device or revokes one (what the
        chat shows as a line), not on the first look at a contact.  A revoked device gets no more messages.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        changes = []
        alice.on_devices_changed = lambda user, added, revoked: changes.append(
            (user, [d.name for d in added], [d.name for d in revoked]))
        await alice.send("bob", "first look")
        self.assertEqual(changes, [])
        bob2 = await self.link(bob, "bob-phone", name="phone")
        await alice.send("bob", "a new device")
        self.assertEqual(changes, [("bob", ["phone"], [])])
        listed = await bob.revoke_device(bob2.device)
        self.assertTrue([d for d in listed if d.id == bob2.device][0].revoked)
        await self.wait_for(lambda: bob2.protocol.lost is not None, "the revoked device's session to end")
        await alice.send("bob", "after the revocation")
        self.assertEqual(changes[1:], [("bob", [], ["phone"])])
        await self.wait_for(lambda: len(bob.events.messages) == 3, "bob's three messages")
        self.assertEqual(len(bob2.events.messages), 1)

    async def test_own_device_changes_announced(self):
        """
        A device alice links or revokes on her identity device is told at once to her other devices' clients (the
        server's devices_changed push; the client fetches and verifies alice's devices and calls on_devices_changed
        with what was added or revoked), not only at their next send.
        """
        alice = await self.register(self.address, "alice")
        laptop = await self.link(alice, "alice-laptop")
        changes = []
        laptop.on_devices_changed = lambda user, added, revoked: changes.append(
            (user, [d.name for d in added], [d.name for d in revoked]))
        tablet = await self.link(alice, "alice-tablet", name="tablet")
        await self.wait_for(lambda: changes, "the laptop to hear of the tablet")
        self.assertEqual(changes, [("alice", ["tablet"], [])])
        await alice.revoke_device(tablet.device)
        await self.wait_for(lambda: len(changes) == 2, "the laptop to hear of the revocation")
        self.assertEqual(changes[1], ("alice", [], ["tablet"]))

    async def test_own_device_announced_after_rekey(self):
        """
        After alice re-keys, a device linked to her new identity is told to her chat on this machine, though this
        machine's store still held her device list under the old key: the chat's login looks at her devices afresh
        (it used to take that old list for a baseline, and the first device added went unannounced).
        """
        pins = pager.MemoryPins()
        alice = await self.connect(self.address, pins=pins)
        await alice.register("alice", token("alice"), key("alice"))
        await alice.devices()  # this machine keeps alice's device list, under her first key
        await alice.close()
        rekeying = await self.connect(self.address, pins=pins)
        await rekeying.recover("alice", token("alice"), key("alice-new"))
        chat = await self.connect(self.address, pins=pins)
        changes = []
        chat.on_devices_changed = lambda user, added, revoked: changes.append((user, [d.name for d in added]))
        await chat.login("alice", token("alice"), key("alice-new"))
        approver = await self.connect(self.address, pins=pins)  # link-device, run in another terminal
        await approver.login("alice", token("alice"), key("alice-new"), receive=False)
        await self.link(approver, "alice-tablet", name="tablet")
        await self.wait_for(lambda: changes, "the chat to hear of the tablet")
        self.assertEqual(changes, [("alice", ["tablet"])])

    async def test_refresh_devices(self):
        """
        refresh_devices(user) fetches a contact's devices (as when a conversation opens) and calls on_devices_changed
        with the differences from what this client last saw; nothing when nothing changed or on the first look.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        changes = []
        alice.on_devices_changed = lambda user, added, revoked: changes.append(
            (user, [d.name for d in added], [d.name for d in revoked]))
        self.assertEqual([d.name for d in await alice.refresh_devices("bob")], [pager.default_device_name()])
        phone = await self.link(bob, "bob-phone", name="phone")
        listed = await alice.refresh_devices("bob")
        self.assertEqual((changes, len(listed)), ([("bob", ["phone"], [])], 2))
        await alice.refresh_devices("bob")
        self.assertEqual(len(changes), 1)
        await bob.revoke_device(phone.device)
        await alice.refresh_devices("bob")
        self.assertEqual(changes[1:], [("bob", [], ["phone"])])

    async def test_device_revoked_before_it_was_seen(self):
        """A device bob added and revoked between two of alice's looks is not told at all: neither is news to her."""
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        changes = []
        alice.on_devices_changed = lambda user, added, revoked: changes.append(
            (user, [d.name for d in added], [d.name for d in revoked]))
        await alice.refresh_devices("bob")
        phone = await self.link(bob, "bob-phone", name="phone")
        await bob.revoke_device(phone.device)
        await alice.refresh_devices("bob")
        self.assertEqual(changes, [])
        tablet = await self.link(bob, "bob-tablet", name="tablet")
        await alice.refresh_devices("bob")
        await bob.revoke_device(tablet.device)
        await alice.refresh_devices("bob")
        self.assertEqual(changes, [("bob", ["tablet"], []), ("bob", [], ["tablet"])])  # seen, then revoked: told

    async def test_change_seen_first_by_another_command(self):
        """
        Two clients of alice share one machine's store (an open chat, and a command run in another terminal): the
        command looks at bob's devices first and keeps the new list, yet the chat, which saw the old list, still
        tells its on_devices_changed of the device bob added and of the one he revoked.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        command = await self.connect(self.address, seen=alice.seen, pins=alice.pins)
        await command.login("alice", token("alice"), key("alice"))
        changes = []
        alice.on_devices_changed = lambda user, added, revoked: changes.append(
            (user, [d.name for d in added], [d.name for d in revoked]))
        await alice.refresh_devices("bob")
        phone = await self.link(bob, "bob-phone", name="phone")
        await command.devices("bob")  # keeps the list with the phone in the shared store
        await alice.refresh_devices("bob")
        self.assertEqual(changes, [("bob", ["phone"], [])])
        await bob.revoke_device(phone.device)
        await command.devices("bob")
        await alice.refresh_devices("bob")
        self.assertEqual(changes[1:], [("bob", [], ["phone"])])

    async def test_linked_device_cannot_link_or_revoke(self):
        """Only the identity device signs certificates and revocations: a linked device is told so, locally."""
        alice = await self.register(self.address, "alice")
        laptop = await self.link(alice, "alice-laptop")
        _, secret = pager.new_link_code()
        with self.assertRaises(pager.Forbidden):
            await laptop.approve_link(None, None, secret)
        with self.assertRaises(pager.Forbidden):
            await laptop.revoke_device(alice.device)


class PrekeyMaintenanceTests(DeviceClientTestCase):

    async def setUp(self):
        # Server and clients on one clock that the test moves forward: the server checks a signed prekey's dates.
        self.clock = ShiftedClock(reactor)
        options = pager.ServerOptions()
        options.parseOptions(["--listen", LISTEN, "--db", self.mktemp()])
        self.server = pager.makeService(options, self.clock)
        self.server.startService()
        self.addCleanup(self.stop_server, self.server)
        port = await self.server.ready
        self.address = "tcp:127.0.0.1:%d" % port.getHost().port

    async def connect(self, address, **kwargs):
        if kwargs.get("seen") is None:
            kwargs["seen"] = pager.MemorySeen(self.keyring)
        client = await pager.PagerClient.connect(address, self.clock, **kwargs)
        self.addCleanup(client.close)
        client.events = Events(client)
        return client

    async def test_rotation(self):
        """
        The signed prekey is replaced once it is PREKEY_ROTATION old, and bundles give the new one; the replaced
        one keeps its private part for the grace period (the server's expiry and a day), then loses it.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        device = pager.device_id(key("bob"))
        first = bob._prekey_state.signed_id
        self.assertIsNone((await bob.maintain_prekeys())["signed"])
        self.clock.offset += pager.PREKEY_ROTATION
        second = (await bob.maintain_prekeys())["signed"]
        replaced = self.clock.seconds()
        self.assertNotIn(second, (None, first))
        [target] = await alice._targets(["bob"], self.clock.seconds())
        self.assertEqual(target.signed_prekey.prekey_id, second)
        signed = {p.prekey_id: p for p in await bob.seen.local_prekeys(device) if p.kind == "signed"}
        self.assertLessEqual(abs(signed[first].replaced_at - replaced), 5)
        self.assertIsNone(signed[second].replaced_at)
        grace = bob.prekey_grace
        self.assertEqual(grace, self.server.factory.limits.message_expiry + pager.SEEN_MARGIN)
        self.clock.offset += grace - 60
        self.assertEqual((await bob.maintain_prekeys())["deleted"], 0)
        self.assertIn(first, {p.prekey_id for p in await bob.seen.local_prekeys(device)})
        self.clock.offset += 120
        self.assertEqual((await bob.maintain_prekeys())["deleted"], 1)
        left = {p.prekey_id for p in await bob.seen.local_prekeys(device) if p.kind == "signed"}
        self.assertNotIn(first, left)
        self.assertIn(second, left)

    async def test_top_up_when_low(self):
        """
        Bundles drain bob's one-time prekeys; when the server says fewer than 20 are left (prekeys_low), bob's
        client publishes enough for 100 again.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        self.assertEqual(bob._prekey_state.one_time, pager.PREKEY_POOL_SIZE)
        # One requester drains the pool here, as many would: lift the server's per-requester and per-device
        # handout bounds (tests.test_devices.PrekeyTests tests them).
        self.server.factory.one_time = pager._OneTimeHandouts(0, 1, 1000)
        for _ in range(pager.PREKEY_POOL_SIZE - pager.PREKEY_POOL_LOW + 1):
            await alice._bundles(["bob"])
        await self.wait_for(lambda: bob._prekey_state.one_time == pager.PREKEY_POOL_SIZE, "bob's top-up")
        await self.wait_for(lambda: not bob._maintaining.locked, "the top-up to end")
        await alice.send("bob", "still sealed to a one-time prekey")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertNotEqual(bob.events.messages[0].used_prekeys[1], 0)

    async def test_lost_state_replaced(self):
        """
        A session of bob whose state was lost (a fresh store: the server holds prekeys whose private parts are
        gone) replaces the server's signed prekey and whole pool at login, so that what is sealed next opens.
        """
        alice = await self.register(self.address, "alice")
        await self.offline(self.server, await self.register(self.address, "bob"))
        bob = await self.connect(self.address, seen=pager.MemorySeen())
        await bob.login("bob", token("bob"), key("bob"))
        self.assertEqual(bob._prekey_state.one_time, pager.PREKEY_POOL_SIZE)
        await alice.send("bob", "after a fresh start")
        await self.wait_for(lambda: bob.events.messages or bob.events.rejected, "bob's message")
        self.assertEqual(bob.events.rejected, [])
        self.assertOpened(bob.events.messages[0], "alice", b"after a fresh start")


class NoteToSelfTests(DeviceClientTestCase):

    async def test_note_to_self_reaches_every_device(self):
        """A message to oneself is sealed to every device of the user, the sending one too, and each opens it."""
        alice = await self.register(self.address, "alice")
        laptop = await self.link(alice, "alice-laptop")
        laptop.events = type(alice.events)(laptop)
        msg = await alice.send("alice", "remember the milk")
        for client in (alice, laptop):
            await self.wait_for(lambda: client.events.messages, "the note on device %s" % client.device)
            self.assertOpened(client.events.messages[0], "alice", b"remember the milk", msg, ["alice"])


def push(client, envelope, sender):
    """C{envelope} pushed to C{client} as a server would (here: as a hostile one, or one that kept it queued)."""
    msg = pager.parse_header(envelope.header).message_id.hex()
    client.frame_received({"type": "message", "msg": msg, "from": sender, "header": pager.b64(envelope.header),
                           "chunks": [pager.b64(c) for c in envelope.chunks],
                           "signature": pager.b64(envelope.signature)})
    return msg


class ReceivingTests(DeviceClientTestCase):

    async def test_version_one_envelope_opens(self):
        """An envelope of version 1 (queued before the upgrade) still opens with the identity key."""
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        await alice.devices("bob")
        content_key, mid = bytes(range(32)), bytes(range(16))
        recipients = [pager.Recipient("bob", pager.fingerprint(key("bob")),
                                      key("bob").public_key().encrypt(content_key, pager._OAEP))]
        header = pager._encode_header_v1(mid, int(bob.reactor.seconds() * 1000), "alice",
                                         pager.fingerprint(key("alice")), "text", "", pager.CHUNK_SIZE, recipients,
                                         pager._commitment(mid, content_key))
        chunk = pager.AESGCM(content_key).encrypt(pager._nonce(0, True), b"queued in 0.2",
                                                  hashlib.sha256(header).digest())
        signed = pager.signed_bytes(header, 1, len(chunk), hashlib.sha256(chunk).digest())
        signature = key("alice").sign(signed, pager._PSS, pager.hashes.SHA256())
        push(bob, pager.Envelope(header, [chunk], signature), "alice")
        await self.wait_for(lambda: bob.events.messages or bob.events.rejected, "the version 1 message")
        self.assertEqual(bob.events.rejected, [])
        self.assertEqual(bytes(bob.events.messages[0].plaintext), b"queued in 0.2")

    async def test_revoked_device_refused(self):
        """
        A message signed by a device its user revoked (pushed by a server that kept it, say) is rejected: the
        revocation, verified against the pinned identity key, is what the recipient's client goes by.
        """
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        bob2 = await self.link(bob, "bob-phone", name="phone")
        envelope = pager.seal(key("bob-phone"), "bob", await bob2.device_targets(["alice"]), b"from the stolen phone",
                              sender_fingerprint=pager.fingerprint(key("bob")))
        await bob.revoke_device(bob2.device)
        await alice.devices("bob")
        push(alice, envelope, "bob")
        await self.wait_for(lambda: alice.events.rejected, "alice's client to refuse it")
        [(_, sender, error)] = alice.events.rejected
        self.assertEqual(sender, "bob")
        self.assertIsInstance(error, pager.WrongSenderKey)
        self.assertIn("revoked", error.message)
        self.assertEqual(alice.events.messages, [])


class RevocationStickTests(DeviceClientTestCase):
    """A revocation a client verified is kept for good: no server can make the revoked device current again."""

    async def revoked_phone(self):
        """alice knows bob's phone; bob revokes it; alice's client sees the revocation.  Returns (alice, phone id)."""
        alice = await self.register(self.address, "alice")
        bob = await self.register(self.address, "bob")
        phone = await self.link(bob, "bob-phone", name="phone")
        await alice.device_targets("bob")
        await bob.revoke_device(phone.device)
        listed = await alice.devices("bob")
        self.assertEqual([(d.name, d.revoked) for d in listed][1:], [("phone", True)])
        return alice, pager.device_id(key("bob-phone"))

    def edit_devices(self, client, change):
        """Make C{client} see the device list of every devices answer through C{change(list of device objects)}."""
        request = client.protocol.request

        def changed(kind, **fields):
            d = request(kind, **fields)
            if kind == "devices":
                def edit(answer):
                    answer["devices"] = change(answer["devices"])
                    return answer
                d.addCallback(edit)
            return d
        client.protocol.request = changed

    def stolen_phone_prekey(self, alice, phone):
        """A fresh signed prekey the thief of the revoked phone signs with its key, as the server would hand it out."""
        now = int(alice._now())
        return pager.sign_prekey(key("bob-phone"), "bob", 4242, bytes(range(1, 33)), now - 10, now + 14 * pager.DAY)

    async def assertServerBlamed(self, coroutine):
        error = await self.assertFailure(defer.Deferred.fromCoroutine(coroutine), pager.BadCertificate)
        self.assertIn("revoked", error.message)
        self.assertIn("server", error.message)

    async def test_unrevoked_by_the_server_refused(self):
        """
        A server (with the thief of bob's revoked phone) lists the phone as current again, with a fresh signed prekey
        signed by its key: alice's client refuses the bundle and the device list (BadCertificate naming the server),
        seals nothing to the phone, and still rejects what the phone signs.
        """
        alice, phone = await self.revoked_phone()
        spk = self.stolen_phone_prekey(alice, phone)

        def unrevoke(device):
            if device["id"] == phone.hex():
                device["revoked"] = None
                device["signed_prekey"] = spk.to_json()
        self.strip_bundles(alice, unrevoke)
        await self.assertServerBlamed(alice.device_targets("bob"))
        self.edit_devices(alice, lambda devices: [dict(d, revoked=None) for d in devices])
        await self.assertServerBlamed(alice.devices("bob"))
        known = await alice.pins.get_devices("bob")
        self.assertTrue(known.find(phone).revoked)

    async def test_revocation_kept_when_no_longer_listed(self):
        """
        The server forgets the revoked phone (as it does 30 days after a revocation, or a lying one at once): alice's
        client still rejects a message the phone signs, naming the revocation, and refuses a later list that shows
        the phone as current again.
        """
        alice, phone = await self.revoked_phone()
        self.edit_devices(alice, lambda devices: [d for d in devices if d["id"] != phone.hex()])
        listed = await alice.devices("bob")
        self.assertEqual([d.device_id for d in listed], [pager.device_id(key("bob"))])
        self.assertIsNone((await alice.pins.get_devices("bob")).find(phone))
        envelope = pager.seal(key("bob-phone"), "bob", [
            pager.DeviceTarget("alice", pager.device_id(key("alice")), rsa_key=key("alice").public_key())],
            b"from the stolen phone", sender_fingerprint=pager.fingerprint(key("bob")))
        push(alice, envelope, "bob")
        await self.wait_for(lambda: alice.events.rejected, "alice's client to refuse it")
        [(_, sender, error)] = alice.events.rejected
        self.assertIsInstance(error, pager.WrongSenderKey)
        self.assertIn("revoked", error.message)
        self.assertEqual(alice.events.messages, [])
        spk = self.stolen_phone_prekey(alice, phone)
        request = alice.protocol.request

        def relisted(kind, **fields):
            d = request(kind, **fields)
            if kind == "bundle":
                def add(answer):
                    for bundle in answer["bundles"]:
                        if bundle["user"] == "bob":
                            cert = pager.certify_device(key("bob"), "bob", key("bob-phone").public_key(), "phone",
                                                        int(alice._now()) - 100)
                            obj = cert.to_json()
                            obj.update(revoked=None, prekeys=True, signed_prekey=spk.to_json(), one_time_prekey=None)
                            bundle["devices"] = [d for d in bundle["devices"] if d["id"] != phone.hex()] + [obj]
                    return answer
                d.addCallback(add)
            return d
        alice.protocol.request = relisted
        await self.assertServerBlamed(alice.device_targets("bob"))


class LocalStateTests(unittest.TestCase):
    """The prekeys and devices tables of client.sqlite3, and their in-memory equivalents, keep the same things."""

    async def stores(self):
        """C{(prekey store, device store)} pairs: a LocalStore (both), and MemorySeen with MemoryPins."""
        local = pager.LocalStore(os.path.abspath(self.mktemp()), reactor)
        self.addCleanup(local.close)
        await local.open(reactor.seconds())
        return [(local, local), (pager.MemorySeen(), pager.MemoryPins())]

    async def test_prekeys(self):
        """
        A new signed prekey marks the current one replaced; forget_prekeys deletes those replaced at or before the
        time given; recording a message deletes the one-time prekey it used, and only that one.
        """
        device = b"\x01" * 16
        for seen, _ in await self.stores():
            def row(kind, prekey_id):
                return pager.LocalPrekey(kind, prekey_id, b"p" * 32, b"s" * 60, 0 if kind == "signed" else None,
                                         100 if kind == "signed" else None, 1.0)
            await seen.add_prekeys(device, [row("signed", 1), row("one-time", 7), row("one-time", 8)], 1.0)
            await seen.add_prekeys(device, [row("signed", 2)], 10.0)
            kept = {(p.kind, p.prekey_id): p.replaced_at for p in await seen.local_prekeys(device)}
            self.assertEqual(kept, {("signed", 1): 10.0, ("signed", 2): None, ("one-time", 7): None,
                                    ("one-time", 8): None})
            self.assertEqual(await seen.forget_prekeys(device, 9.0), 0)
            self.assertEqual(await seen.forget_prekeys(device, 10.0), 1)
            await seen.add("alice", b"m" * 16, 11.0, (device, 7))
            self.assertTrue(await seen.contains("alice", b"m" * 16))
            signed, one_time = await seen.prekey_privates(device, 2, 7)
            self.assertEqual((signed.prekey_id, one_time), (2, None))
            self.assertEqual({(p.kind, p.prekey_id) for p in await seen.local_prekeys(device)},
                             {("signed", 2), ("one-time", 8)})
            self.assertEqual(await seen.local_prekeys(b"\x02" * 16), [])  # another device's are apart

    async def test_devices(self):
        """A user's devices are replaced as a whole; that a certified device was seen is kept for good."""
        for _, pins in await self.stores():
            self.assertIsNone(await pins.get_devices("bob"))
            phone = pager.DeviceInfo("bob", b"\x01" * 16, b"der", "phone", 1700000000, b"sig", prekeys=True,
                                     first_seen=5.0)
            await pins.set_devices("bob", b"f" * 32, [phone])
            known = await pins.get_devices("bob")
            self.assertEqual((known.identity, known.certified_seen, known.devices), (b"f" * 32, True, (phone,)))
            legacy = pager.DeviceInfo("bob", b"\x02" * 16, b"der2", first_seen=6.0)
            await pins.set_devices("bob", b"g" * 32, [legacy])
            known = await pins.get_devices("bob")
            self.assertEqual((known.identity, known.certified_seen, known.devices), (b"g" * 32, True, (legacy,)))
            self.assertIsNone(known.find(b"\x01" * 16))

    async def test_revocations_kept(self):
        """
        A revoked device's revocation is kept for (user, identity fingerprint, device) for good: when the device
        leaves the list, and when the list is replaced; not for another identity key.
        """
        for _, pins in await self.stores():
            phone = pager.DeviceInfo("bob", b"\x01" * 16, b"der", "phone", 1700000000, b"sig", 1700000500, b"rev",
                                     prekeys=True, first_seen=5.0)
            laptop = pager.DeviceInfo("bob", b"\x02" * 16, b"der2", "laptop", 1700000000, b"sig2", first_seen=5.0)
            self.assertEqual(await pins.get_revocations("bob", b"f" * 32), {})
            await pins.set_devices("bob", b"f" * 32, [phone, laptop])
            await pins.set_devices("bob", b"f" * 32, [laptop])
            await pins.set_devices("bob", b"f" * 32, [laptop, dataclasses.replace(phone, revoked_at=None,
                                                                                    revocation=None)])
            self.assertEqual(await pins.get_revocations("bob", b"f" * 32), {b"\x01" * 16: (1700000500, b"rev")})
            self.assertEqual(await pins.get_revocations("bob", b"g" * 32), {})
            self.assertEqual(await pins.get_revocations("carol", b"f" * 32), {})
