"""
The chat's outbox: every typed message is kept on disk from Enter until the server has it, shown waiting with a
short reference, sent in order once connected (after a server restart too), exactly once; ticks name the message;
receipts of earlier messages pushed at login come as one line.  Driven through L{pager.Chat} with a real
L{pager.Session} against a real server on loopback, as in L{tests.test_terminal}.
"""

import os
import re

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

import pager
from tests.test_e2e import key, token
from tests.test_terminal import ChatTestCase


class OutboxStoreTests(unittest.TestCase):
    """The outbox table of L{pager.LocalStore}."""

    async def open_store(self, history=True):
        store = pager.LocalStore(os.path.abspath(self.mktemp()), reactor, history=history)
        self.addCleanup(store.close)
        await store.open(reactor.seconds())
        return store

    async def test_sealed_envelope_kept_whole(self):
        """
        An envelope of 0, 1, one chunk's, one chunk and one byte's, and three chunks' worth of plaintext comes back
        from the outbox byte for byte (chunks split where the sealer split them), with its message id.
        """
        store = await self.open_store()
        alice, bob = key("alice"), key("bob")
        for size in (0, 1, pager.CHUNK_SIZE, pager.CHUNK_SIZE + 1, 3 * pager.CHUNK_SIZE):
            data = os.urandom(size)
            ref = await store.outbox_add(reactor.seconds(), ["bob"], "file", "f.bin", data)
            envelope = pager.seal(alice, "alice", {"bob": bob.public_key()}, data, content_type="file",
                                  filename="f.bin")
            await store.outbox_sealed(ref, envelope)
            entry = await store.outbox_next()
            self.assertEqual(entry.ref, ref)
            self.assertEqual(entry.body, data)
            self.assertEqual(entry.envelope, envelope, "size %d" % size)
            self.assertEqual(entry.msg_id, pager.parse_header(envelope.header).message_id.hex())
            await store.outbox_sent(ref, entry.msg_id, reactor.seconds())
        self.assertIsNone(await store.outbox_next())

    async def test_order_and_references(self):
        """Messages come out oldest first; references are never reused, even after the newest left the outbox."""
        store = await self.open_store()
        first = await store.outbox_add(1.0, ["bob"], "text", "", b"one")
        second = await store.outbox_add(2.0, ["bob", "carol"], "text", "", b"two")
        self.assertEqual(await store.outbox_waiting(), 2)
        entry = await store.outbox_next()
        self.assertEqual((entry.ref, entry.recipients, entry.body, entry.envelope), (first, ["bob"], b"one", None))
        await store.outbox_sent(first, "aa" * 16, 3.0)
        entry = await store.outbox_next()
        self.assertEqual((entry.ref, entry.recipients), (second, ["bob", "carol"]))
        await store.outbox_refused(second)
        self.assertIsNone(await store.outbox_next())
        self.assertGreater(await store.outbox_add(4.0, ["bob"], "text", "", b"three"), second)

    async def test_sent_text_erased(self):
        """Once accepted, the text and envelope leave the outbox; with no history kept, nothing of the text stays."""
        store = await self.open_store(history=False)
        ref = await store.outbox_add(1.0, ["bob"], "text", "", b"secret words")
        envelope = pager.seal(key("alice"), "alice", {"bob": key("bob").public_key()}, b"secret words")
        await store.outbox_sealed(ref, envelope)
        msg = pager.parse_header(envelope.header).message_id.hex()
        await store.outbox_sent(ref, msg, 2.0, pager.HistoryEntry(1.0, "out", "bob", msg, "text", "", b"x", "sent"))
        row = await store.pool.runQuery("SELECT body, header, chunks, signature FROM outbox WHERE ref = ?", (ref,))
        self.assertEqual([tuple(bytes(v) if v is not None else None for v in r) for r in row],
                         [(b"", None, None, None)])
        self.assertEqual(await store.history(), [])
        self.assertEqual(await store.sent_message(msg), (ref, None))

    def test_preview(self):
        """The first words of a message, on one line, cut at a word with an ellipsis; a file by its name."""
        self.assertEqual(pager.message_preview("text", "", b"short"), '"short"')
        self.assertEqual(pager.message_preview("text", "", b"two\nlines"), '"two lines"')
        self.assertEqual(pager.message_preview("text", "", b"disk full on backup-1, and the nightly job failed"),
                         '"disk full on backup-1, and the\u2026"')
        self.assertEqual(pager.message_preview("file", "report.pdf", b""), "file report.pdf")


class OutboxChatTests(ChatTestCase):
    """What is typed in the chat reaches the server through the outbox."""

    async def restart_server(self, db, port):
        """A new server on the same database and the same loopback port, as an operator's restart gives."""
        options = pager.ServerOptions()
        options.parseOptions(["--listen", "tcp:%d:interface=127.0.0.1" % port, "--db", db])
        server = pager.makeService(options, reactor)
        server.startService()
        self.addCleanup(self.stop_server, server)
        await server.ready
        self.server = server
        return server

    async def serve_on_file(self):
        """A server whose database is a file this test names: C{(server, db path, port)}."""
        db = os.path.abspath(self.mktemp())
        self.server, self.address = await self.start_server(db)
        port = self.server.port.getHost().port
        self.host = "127.0.0.1:%d" % port
        return self.server, db, port

    async def test_two_messages_across_a_server_restart(self):
        """
        The server stops; alice types two messages: both are shown waiting (with references #1 and #2) and kept on
        disk.  The server starts again on the same port and database; the chat reconnects by itself and sends
        them: bob gets both, once each, in the order typed, and alice sees each accepted and delivered.
        """
        server, db, port = await self.serve_on_file()
        await self.account("bob")
        chat, ui = await self.chat_as("alice")
        await server.stopService()
        await self.wait_for(lambda: "Reconnecting" in ui.text(), "the chat to notice the server is gone")
        before = len(ui.shown)
        await self.type(chat, "/msg bob first, typed while the server is down")
        await self.type(chat, "/msg bob second, typed while the server is down")
        shown = ui.text(before)
        self.assertIn("\u23f3 #1 to bob waits for the connection", shown)
        self.assertIn("\u23f3 #2 to bob waits for the connection", shown)
        self.assertEqual(await chat.session.store.outbox_waiting(), 2)

        server = await self.restart_server(db, port)
        await self.wait_for(lambda: "\u2713 #2 sent" in ui.text(before), "both messages accepted", tries=3000)
        self.assertEqual(await chat.session.store.outbox_waiting(), 0)
        bob = await self.login(self.address_of(server), "bob")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "bob's two messages")
        await self.wait_for(lambda: re.search("#2 .*delivered to bob", ui.text(before)), "the second delivered tick")
        await self.settle(chat)
        self.assertEqual([m.plaintext for m in bob.events.messages],
                         [b"first, typed while the server is down", b"second, typed while the server is down"])
        shown = ui.text(before)
        self.assertLess(shown.index("\u2713 #1 sent"), shown.index("\u2713 #2 sent"))
        self.assertIn('\u2713\u2713 #1 "first, typed while the server\u2026" delivered to bob', shown)
        self.assertEqual(await self.pending(server, "bob"), [])
        self.assertEqual(len(bob.events.messages), 2)
        await self.stop_chat(chat)  # before this server stops: the chat would start reconnecting again
        await self.offline(server, bob)

    def address_of(self, server):
        return "tcp:127.0.0.1:%d" % server.port.getHost().port

    async def test_left_in_the_outbox_sent_next_time(self):
        """
        A message typed while the server is down, then the chat quits: it stays on disk, and the next chat says so
        and sends it; bob gets it once.
        """
        server, db, port = await self.serve_on_file()
        await self.account("bob")
        chat, ui = await self.chat_as("alice")
        home = self.home_of_chat
        await server.stopService()
        await self.wait_for(lambda: "Reconnecting" in ui.text(), "the chat to notice the server is gone")
        await self.type(chat, "/msg bob see you tomorrow")
        chat.line("/quit")
        await self.wait_for(lambda: chat.done.called, "the chat to quit")

        await self.restart_server(db, port)
        chat, ui = await self.chat_again("alice", home)
        await self.wait_for(lambda: "\u2713 #1 sent" in ui.text(), "the message left from last time, sent")
        self.assertIn("1 message waits in the outbox", ui.text())
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        await self.settle(chat)
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"see you tomorrow"])

    async def chat_again(self, name, home):
        """A new chat for C{name} with the same home (the same local store) as an earlier one."""
        return await self.chat_as(name, home=home)

    async def test_resend_after_lost_answer_is_the_same_message(self):
        """
        The server accepted a message but its answer never came (the connection dropped): the outbox still holds
        the sealed envelope and sends it again; the server recognises it (duplicate) and bob gets it once.
        """
        await self.serve()
        # Bob reads only after the resend: the first try is still held then, whatever the machine's load (were it
        # acknowledged first, the resend would be a new message, shown once all the same by bob's seen store).
        await self.offline(self.server, await self.peer("bob"))
        chat, ui = await self.chat_as("alice")
        await self.idle(chat)  # the outbox's first flush, at login, is over
        store, client = chat.session.store, chat.session.client
        ref = await store.outbox_add(reactor.seconds(), ["bob"], "text", "", b"said once")
        _, envelope = await client.seal(["bob"], b"said once")
        await store.outbox_sealed(ref, envelope)
        first = await client.send_envelope(["bob"], envelope)  # the try whose answer was lost
        self.assertFalse(first["duplicate"])
        sent = []
        original = client.send_envelope

        async def send_envelope(names, envelope):
            answer = await original(names, envelope)
            sent.append(answer)
            return answer
        client.send_envelope = send_envelope
        await chat.outbox.flush()
        self.assertEqual([(a["msg"], a["duplicate"]) for a in sent], [(first["msg"], True)])
        self.assertIn("\u2713 #%d sent" % ref, ui.text())
        await self.settle(chat)
        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        await bob.ping()
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"said once"])

    async def test_devices_changed_after_a_restart_sealed_anew(self):
        """
        A message sealed by an earlier run (kept in the outbox; this process never sealed it) whose recipient added
        a device meanwhile: the server says devices_changed, and the outbox seals it anew for bob's devices now, as
        the same message (the stored id), keeps the new envelope and sends it: both of bob's devices get it once.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.idle(chat)
        store, client = chat.session.store, chat.session.client
        ref = await store.outbox_add(reactor.seconds(), ["bob"], "text", "", b"sealed last time")
        _, envelope = await client.seal(["bob"], b"sealed last time")
        client._sealed.clear()  # what the earlier run's memory held is gone: only the outbox remembers the message
        await store.outbox_sealed(ref, envelope)
        msg = pager.parse_header(envelope.header).message_id
        # bob links a second device after the message was sealed.
        newcomer = await self.connect(self.address)
        text, secret = pager.new_link_code()
        await newcomer.link_request("bob", key("bob-phone"), "phone", secret)
        linked = Deferred.fromCoroutine(newcomer.wait_linked())
        await bob.approve_link(None, None, secret)
        await linked
        await newcomer.close()
        phone = await self.connect(self.address)
        phone.events = type(bob.events)(phone)
        await phone.login("bob", None, key("bob-phone"), device=True)
        await chat.outbox.flush()
        self.assertIn("\u2713 #%d sent" % ref, ui.text())
        self.assertNotIn("not sent", ui.text())
        for client_ in (bob, phone):
            await self.wait_for(lambda: client_.events.messages, "the message on bob's device %s" % client_.device)
            self.assertEqual([(m.message_id, bytes(m.plaintext)) for m in client_.events.messages],
                             [(msg, b"sealed last time")])
        await self.settle(chat)
        await phone.close()

    async def test_refusal_says_why_and_the_rest_goes_on(self):
        """
        A message to a user who does not exist is refused with the reason and leaves the outbox (marked not sent
        in the history); the next message is sent.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "/msg nobody are you there")
        await self.type(chat, "/msg bob are you there")
        shown = ui.text(before)
        self.assertRegex(shown, "\u2717 #1 to nobody was not sent: .*nobody")
        await self.wait_for(lambda: bob.events.messages, "the next message")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"are you there"])
        self.assertEqual(await chat.session.store.outbox_waiting(), 0)
        [refused] = [e for e in await chat.session.store.history() if e.peer == "nobody"]
        self.assertTrue(refused.status.startswith("not sent: "), refused.status)
        self.assertEqual(refused.body, b"are you there")

    async def test_busy_server_tried_again(self):
        """A rate_limited answer keeps the message waiting, says so, and it is sent when the wait is over."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        client = chat.session.client
        original = client.send_envelope
        refusals = [pager.RateLimited("Too many uploads at once.", retry_after=0.2)]

        async def send_envelope(names, envelope):
            if refusals:
                raise refusals.pop()
            return await original(names, envelope)
        client.send_envelope = send_envelope
        before = len(ui.shown)
        await self.type(chat, "/msg bob patience")
        self.assertIn("\u23f3 #1 to bob waits 1 s: Too many uploads at once.", ui.text(before))
        await self.wait_for(lambda: "\u2713 #1 sent" in ui.text(before), "the message sent after the wait")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"patience"])


    async def pause_sends(self, client, seconds):
        """For C{seconds} from now, C{client}'s sends are refused as a busy server would (rate_limited)."""
        original = client.send_envelope
        until = reactor.seconds() + seconds
        tried = []

        async def send_envelope(names, envelope):
            tried.append(names)
            if reactor.seconds() < until:
                raise pager.RateLimited("Slow down.", retry_after=until - reactor.seconds())
            return await original(names, envelope)
        client.send_envelope = send_envelope
        return tried

    async def test_pause_said_once_and_kept_at_quit(self):
        """
        While the server's pause lasts, messages typed meanwhile wait behind it without asking the server again (one
        line says so, not one per message); quitting at once still sends them when the pause is over, in order.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        tried = await self.pause_sends(chat.session.client, 0.5)
        before = len(ui.shown)
        for n in range(3):
            chat.line("/msg bob line %d" % n)
        chat.line("/quit")
        await self.wait_for(lambda: chat.done.called, "the chat to quit")
        shown = ui.text(before)
        self.assertEqual(shown.count("waits 1 s: Slow down."), 1, shown)
        self.assertNotIn("Left without", shown)
        self.assertEqual(len(tried), 4)  # one refused, then the three
        await self.wait_for(lambda: len(bob.events.messages) == 3, "bob's three messages")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"line 0", b"line 1", b"line 2"])

    async def test_long_pause_at_quit_said(self):
        """A pause longer than quitting waits: the chat says how many messages stay in the outbox for next time."""
        self.patch(pager, "QUIT_WAIT", 0.5)
        await self.serve()
        await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.pause_sends(chat.session.client, 60)
        before = len(ui.shown)
        chat.line("/msg bob one")
        chat.line("/msg bob two")
        chat.line("/quit")
        await self.wait_for(lambda: chat.done.called, "the chat to quit")
        self.assertIn("Left without waiting longer (0 s): 2 messages in the outbox stay on disk and are sent at the "
                      "next connect.", ui.text(before))


class TickTests(ChatTestCase):
    """Ticks and receipts name the message they are about."""

    async def test_receipts_name_the_message(self):
        """Delivered, rejected and expired receipts name the message by its reference and first words."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/msg bob disk full on backup-1, and the nightly job failed")
        await self.wait_for(lambda: "delivered to bob" in ui.text(), "the delivered tick")
        self.assertIn('\u2713\u2713 #1 "disk full on backup-1, and the\u2026" delivered to bob', ui.text())
        msg = bob.events.messages[0].message_id.hex()
        receipt = pager.DeliveryReceipt(1, msg, "carol", "rejected", "no key for you", 0.0)
        self.assertIn('carol could not open your message #1 "disk full on backup-1, and the\u2026": no key for you',
                      pager.describe_receipt(receipt, 1, '"disk full on backup-1, and the\u2026"'))
        expired = pager.DeliveryReceipt(2, msg, "dave", "expired", "", 0.0)
        self.assertIn("your message #1 to dave expired undelivered", pager.describe_receipt(expired, 1))
        self.assertIn("\u2713\u2713 delivered to bob", pager.describe_receipt(
            pager.DeliveryReceipt(3, msg, "bob", "delivered", "", 0.0)))

    async def test_receipts_at_login_in_one_line(self):
        """
        alice sends three messages to bob (offline) and one to carol, and quits; bob reads his, carol's client
        refuses hers.  At alice's next login the four receipts are one line; a message sent then gets its own tick.
        """
        await self.serve()
        await self.account("bob")
        carol = await self.peer("carol")
        carol.on_message = None  # carol's client takes the message but neither shows nor acknowledges it
        chat, ui = await self.chat_as("alice")
        home = self.home_of_chat
        for n in range(3):
            await self.type(chat, "/msg bob news %d" % n)
        await self.type(chat, "/msg carol for your eyes")
        await self.wait_for(lambda: "\u2713 #4 sent" in ui.text(), "the four messages accepted")
        chat.line("/quit")
        await self.wait_for(lambda: chat.done.called, "the chat to quit")

        bob = await self.login(self.address, "bob")
        await self.wait_for(lambda: len(bob.events.messages) == 3, "bob's messages")
        await self.no_pending(self.server, "bob")
        [held] = await self.pending(self.server, "carol")
        await carol.protocol.request("reject", msg=held.msg_id.hex(), reason="no key for this message")
        await self.offline(self.server, bob, carol)

        chat, ui = await self.chat_again_as(home)
        await self.wait_for(lambda: "Since you were last here" in ui.text(), "the summary of receipts")
        lines = [line for line in ui.text().splitlines() if "#" in line]
        [summary] = [line for line in lines if "Since you were last here" in line]
        self.assertIn("3 delivered (#1 to bob, #2 to bob, #3 to bob)", summary)
        self.assertIn("1 could not be opened (#4 by carol: no key for this message)", summary)
        self.assertEqual([line for line in lines if "delivered to" in line], [])
        before = len(ui.shown)
        bob = await self.login(self.address, "bob")
        await self.type(chat, "/msg bob and now live")
        await self.wait_for(lambda: "#5 \"and now live\" delivered to bob" in ui.text(before), "the live tick")
        self.assertNotIn("Since you were last here", ui.text(before))

    async def chat_again_as(self, home):
        return await self.chat_as("alice", home=home)


class _SharedOutboxClient:
    """A logged-in client whose C{seal} waits until the test lets it go; records every envelope sent."""

    def __init__(self, sealing, sent):
        self.user = "alice"
        self.protocol = type("P", (), {"lost": None})()
        self.sealing = sealing
        self.sent = sent

    async def seal(self, recipients, data, content_type="text", filename=""):
        d = Deferred()
        self.sealing.append(d)
        if len(self.sealing) == 2:
            self.both.callback(None)
        envelope = await d
        return None, envelope

    async def send_envelope(self, names, envelope):
        self.sent.append(envelope)
        return {"msg": pager.parse_header(envelope.header).message_id.hex(), "queued": []}


class SharedOutboxTests(unittest.TestCase):
    """Two chats of one user on one machine share C{client.sqlite3}'s outbox."""

    async def test_two_flushers_send_one_message(self):
        """
        Both chats flush at once (as after a server restart) and both take the same unsealed message: each seals
        its own envelope, but only the first one stored is sent (the second chat sends that one again, which the
        server takes as a resend), so bob gets one message; the history records it once.
        """
        path = os.path.abspath(self.mktemp())
        stores, outboxes, sealing, sent, shown = [], [], [], [], []
        both = Deferred()
        for _ in range(2):
            store = pager.LocalStore(path, reactor)
            self.addCleanup(store.close)
            await store.open(reactor.seconds())
            client = _SharedOutboxClient(sealing, sent)
            client.both = both
            session = type("S", (), {"client": client, "store": store, "closing": False})()
            stores.append(store)
            outboxes.append(pager.Outbox(session, shown.append, reactor))
        await stores[0].outbox_add(1.0, ["bob"], "text", "", b"hello once")
        flushes = [Deferred.fromCoroutine(_flush(o)) for o in outboxes]
        await both
        alice, bob = key("alice"), key("bob")
        for d in list(sealing):
            d.callback(pager.seal(alice, "alice", {"bob": bob.public_key()}, b"hello once"))
        for d in flushes:
            await d
        self.assertEqual(len({pager.parse_header(e.header).message_id for e in sent}), 1, "two messages sent")
        self.assertEqual(await stores[1].outbox_waiting(), 0)
        self.assertEqual(len([h for h in await stores[0].history() if h.direction == "out"]), 1)


async def _flush(outbox):
    await outbox.flush()
