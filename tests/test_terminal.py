"""
The interactive client: L{pager.Chat} driven line by line through a fake screen with a real L{pager.Session} against
a real in-process server; the file-name helpers; and C{pager.py connect} in a pseudo-terminal.
"""

import io
import re
import select
import signal
import os
import stat
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

import pager
from tests.test_cli import PAGER_PY, CLITestCase, Child, base_env
from tests.test_e2e import free_port, key, token


class FakeUI:
    """
    Records what the chat shows and the prompts it sets.  Like the real screens (L{pager.PlainChat} and the raw-mode
    chat screen, tested in L{tests.test_output.SafeWriterTests}), it shows text through a L{pager.SafeWriter}.
    """

    def __init__(self):
        self.shown = []
        self.prompts = []
        self.out = pager.SafeWriter(self)

    def write(self, text):
        self.shown.append(text)

    def show(self, text):
        self.out.write(text)

    def set_prompt(self, text):
        self.prompts.append(text)

    @property
    def prompt(self):
        return self.prompts[-1] if self.prompts else None

    def text(self, since=0):
        return "\n".join(self.shown[since:])


class ChatTestCase(CLITestCase):
    """A chat for C{alice} (a key on this machine, no passphrase, safetoken in a file) on a fresh server."""

    async def chat_as_registered(self, name):
        """The chat of C{name}, already registered on the server."""
        return await self.chat_as(name, registered=True)

    async def chat_as(self, name="alice", pins=(), registered=False, no_history=False, home=None):
        """
        Start C{name}'s chat: returns C{(chat, ui)}.  C{pins} names users whose module key is pinned in C{name}'s
        local store before the session starts.  With C{home}, the chat uses that PAGER_HOME (where C{name} has a
        key already): another session of the user on the same machine.
        """
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("PAGER_")})
        if not hasattr(self, "server"):
            await self.serve()
        if home is not None:
            pass
        elif registered:
            home = self.home()
            self.install_key(home, name)
        else:
            home = await self.provision(name)
        if pins:
            store = pager.LocalStore(os.path.join(self.user_dir(home, name), pager.LOCAL_DB_NAME), reactor)
            await store.open(reactor.seconds())
            for peer in pins:
                await store.set_pin(peer, pager.public_key_pem(key(peer)), pager.fingerprint(key(peer)),
                                    reactor.seconds())
            store.close()
        token_file = os.path.abspath(self.mktemp())
        with open(token_file, "w") as f:
            f.write(token(name) + "\n")
        os.chmod(token_file, 0o600)  # a token file others may read is refused
        config = {"server": self.host, "home": home, "user": name, "token-file": token_file,
                  "passphrase-file": None, "no-passphrase": False, "tls": False, "ca": None, "no-history": no_history}
        session = pager.Session(reactor, config, pager.Prompter(reactor, interactive=False))
        chat = pager.Chat(session, reactor)
        await session.start()
        self.addCleanup(self.stop_chat, chat)
        ui = FakeUI()
        chat.attach(ui)
        self.home_of_chat = home
        return chat, ui

    async def stop_chat(self, chat):
        if not chat._closing:
            await self.settle(chat)
        chat.quit()
        await self.wait_for(lambda: chat.done.called, "the chat to finish quitting")

    async def settle(self, chat):
        """
        Wait until every message is delivered and acknowledged and the chat's user has received every receipt, so
        that quitting races with nothing (see test_receipt_after_quit for that race).
        """
        server, user = self.server, chat.session.user
        for name in await server.store.user_names():
            if name in server.factory.receivers:
                await self.no_pending(server, name)
        await self.wait_for(lambda: server.store.pending_receipts(user, 0).addCallback(lambda rs: not rs),
                            "%s's receipts to be acknowledged" % user)
        client = chat.session.client
        await self.wait_for(lambda: not chat._busy and not client._working, "the chat to be idle")

    async def idle(self, chat):
        """Wait until the chat has no command in flight."""
        await self.wait_for(lambda: not chat._busy, "the chat's commands to finish")

    async def peer(self, name):
        """An in-process client for C{name}, registered and receiving."""
        return await self.register(self.address, name)

    async def type(self, chat, *lines):
        for line in lines:
            chat.line(line)
        await self.idle(chat)


class ChatSendingTests(ChatTestCase):
    """What is typed at the chat reaches the recipients."""

    async def test_conversation_stays_open(self):
        """
        /to bob opens a conversation: the prompt says bob> and stays so, and every line goes to bob, each as its own
        message, until /to alone leaves it.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        self.assertEqual(ui.prompt, "to> ")
        self.assertIn("Logged in as alice", ui.text())
        await self.type(chat, "/to bob")
        self.assertEqual((chat.conversation, ui.prompt), ("bob", "bob> "))
        await self.type(chat, "hello", "still you")
        self.assertEqual(ui.prompt, "bob> ")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "bob's two messages")
        for message, text in zip(sorted(bob.events.messages, key=lambda m: m.plaintext), (b"hello", b"still you")):
            self.assertOpened(message, "alice", text, recipients=["bob"])
        await self.type(chat, "/to")
        self.assertEqual((chat.conversation, ui.prompt), (None, "to> "))

    async def test_bare_word_is_never_a_recipient(self):
        """
        At the to> prompt, a name and then a text send nothing: each line is refused with a sentence saying how to
        open a conversation, and the prompt stays to>.
        """
        server = await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "bob", "are you there")
        self.assertEqual(ui.text(before).count("Not sent: no conversation is open. Type /to NAME"), 2)
        self.assertEqual((chat.conversation, ui.prompt), (None, "to> "))
        await bob.ping()
        self.assertEqual((bob.events.messages, await self.pending(server, "bob")), ([], []))

    async def test_words_in_a_conversation_are_messages(self):
        """
        In a conversation, 'quit', 'users' and 'help' without a slash are text for bob, and the chat goes on;
        '//' sends a line starting with '/'.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to bob", "quit", "users", "help", "//usr is full")
        await self.wait_for(lambda: len(bob.events.messages) == 4, "bob's four messages")
        self.assertEqual(sorted(m.plaintext for m in bob.events.messages), [b"/usr is full", b"help", b"quit", b"users"])
        self.assertFalse(chat.closing)
        self.assertEqual(ui.prompt, "bob> ")

    async def test_to_checks_the_name(self):
        """
        /to nobody (not registered) says so and opens nothing; /to with two names or a bad name says what to do
        instead; none of them sends anything, and none closes the conversation that was open.
        """
        await self.serve()
        await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "/to nobody")
        self.assertIn("No such user: nobody; no conversation is open", ui.text(before))
        self.assertNotIn("Talking to nobody", ui.text(before))  # announced only once the server knows the name
        self.assertEqual((chat.conversation, ui.prompt), (None, "to> "))
        before = len(ui.shown)
        await self.type(chat, "/to bob,carol")
        self.assertIn("/msg NAME,NAME TEXT", ui.text(before))
        before = len(ui.shown)
        await self.type(chat, "/to bad\x1bname")
        self.assertIn("User names are", ui.text(before))
        self.assertEqual(chat.conversation, None)
        before = len(ui.shown)
        await self.type(chat, "/to bob", "/to nobody")
        self.assertIn("No such user: nobody; the conversation with bob stays open", ui.text(before))
        self.assertEqual((chat.conversation, ui.prompt), ("bob", "bob> "))
        await self.type(chat, "/to bad\x1bname")
        self.assertEqual((chat.conversation, ui.prompt), ("bob", "bob> "))

    async def test_reply_and_marks(self):
        """
        While alice talks to bob, a message from carol is marked (\u00bb) and bob's is not; /r then opens the
        conversation with carol, the last sender, and the next line goes to her.  /r before anyone wrote, or /r
        with text, sends nothing and says why.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "/r", "/r hi")
        self.assertIn("Nobody has written to you", ui.text(before))
        self.assertIn("/r takes no text", ui.text(before))
        await self.type(chat, "/to bob")
        await bob.send("alice", "from bob")
        await self.wait_for(lambda: "from bob" in ui.text(), "bob's message")
        await carol.send("alice", "from carol")
        await self.wait_for(lambda: "from carol" in ui.text(), "carol's message")
        await self.idle(chat)
        [bob_line] = [line for line in ui.shown if "from bob" in line]
        [carol_line] = [line for line in ui.shown if "from carol" in line]
        self.assertNotIn("\u00bb", bob_line)
        self.assertIn("\u00bb carol", carol_line)
        self.assertEqual(ui.prompt, "bob> ")
        await self.type(chat, "/r")
        self.assertEqual((chat.conversation, ui.prompt), ("carol", "carol> "))
        await self.type(chat, "back to you")
        await self.wait_for(lambda: carol.events.messages, "the answer to carol")
        self.assertEqual([m.plaintext for m in carol.events.messages], [b"back to you"])
        self.assertEqual(bob.events.messages, [])

    async def test_msg_to_two(self):
        """/msg bob,carol TEXT sends one message to both, and leaves the conversation as it was."""
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/msg bob,carol hi")
        await self.wait_for(lambda: bob.events.messages and carol.events.messages, "both messages")
        for client in (bob, carol):
            [message] = client.events.messages
            self.assertOpened(message, "alice", b"hi", recipients=["bob", "carol"])
        self.assertEqual(bob.events.messages[0].message_id, carol.events.messages[0].message_id)
        self.assertEqual(ui.prompt, "to> ")

    async def test_paste(self):
        """/paste NAME, some lines, then '.' sends the lines as one message; in a conversation /paste needs no name."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/paste bob")
        self.assertEqual(ui.prompt, "... ")
        for line in ("first line", "  indented second", "", "last"):
            chat.line(line)
        self.assertEqual(bob.events.messages, [])
        await self.type(chat, ".")
        self.assertEqual(ui.prompt, "to> ")
        await self.wait_for(lambda: bob.events.messages, "the pasted message")
        self.assertOpened(bob.events.messages[0], "alice", b"first line\n  indented second\n\nlast")

        before = len(ui.shown)
        await self.type(chat, "/paste")
        self.assertIn("No conversation is open", ui.text(before))
        await self.type(chat, "/to bob", "/paste", "/quit", "two", ".")
        self.assertEqual(ui.prompt, "bob> ")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "the second paste")
        self.assertEqual(bob.events.messages[1].plaintext, b"/quit\ntwo")
        self.assertFalse(chat.closing)

    async def test_file(self):
        """/file NAME PATH sends the file, named by its base name."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "notes.txt")
        data = os.urandom(100 * 1024)
        with open(path, "wb") as f:
            f.write(data)
        await self.type(chat, "/file bob " + path)
        await self.wait_for(lambda: bob.events.messages, "the file")
        [message] = bob.events.messages
        self.assertOpened(message, "alice", data)
        self.assertEqual((message.content_type, message.filename), ("file", "notes.txt"))
        self.assertIn("notes.txt", ui.text())

    async def test_file_paths_with_spaces(self):
        """
        /file takes a quoted path with spaces and a non-ASCII name, a backslash-escaped one, and, in a conversation,
        the path alone, unquoted; a path it cannot split sends nothing and says to quote it.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "Relevé de compte ü.txt")
        with open(path, "wb") as f:
            f.write(b"the file")
        await self.type(chat, '/file bob "%s"' % path)
        await self.type(chat, "/file bob " + path.replace(" ", "\\ "))
        await self.type(chat, "/to bob", "/file " + path)
        await self.wait_for(lambda: len(bob.events.messages) == 3, "the three files")
        self.assertEqual([(m.filename, m.plaintext) for m in bob.events.messages],
                         [("Relevé de compte ü.txt", b"the file")] * 3)
        before = len(ui.shown)
        await self.type(chat, "/file bob %s/no such file.txt" % directory)
        self.assertIn("quotes", ui.text(before))
        await bob.ping()
        self.assertEqual(len(bob.events.messages), 3)

    async def test_unknown_command(self):
        """/nope says it is unknown and sends nothing, even in a conversation; /help lists the commands."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to bob")
        before = len(ui.shown)
        await self.type(chat, "/nope", "/__init__", "/NOPE x")
        self.assertEqual(ui.text(before).count("Unknown command"), 3)
        self.assertIn("Unknown command /nope: nothing was sent", ui.text(before))
        self.assertEqual(ui.prompt, "bob> ")
        before = len(ui.shown)
        await self.type(chat, "/help")
        for word in ("/to", "/r ", "/msg", "/paste", "/file", "/users", "/history", "/fingerprint", "/verify",
                     "/trust", "/whoami", "/quit", "//"):
            self.assertIn(word, ui.text(before))
        await bob.ping()
        self.assertEqual(bob.events.messages, [])

    async def test_two_sessions_of_one_user(self):
        """
        alice runs two chats on one machine (one home, one local database: one device): each of bob's messages is
        shown once in each chat that opens it, recorded once in the history, and never refused.  (They once shared
        one duplicate store, so whichever session recorded a message first hid it from the other.)  A chat that
        gets a message after the other one stored it, and so deleted the one-time prekey it was sealed to, can no
        longer open it (forward secrecy): it acknowledges it without showing it.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat1, ui1 = await self.chat_as("alice")
        chat2, ui2 = await self.chat_as("alice", home=self.home_of_chat)
        texts = ["message %d" % n for n in range(5)]
        for text in texts:
            await bob.send("alice", text)
        await self.wait_for(lambda: all(t in ui1.text() + ui2.text() for t in texts), "every message in a chat")
        await self.settle(chat1)
        await self.settle(chat2)
        for ui in (ui1, ui2):
            self.assertNotIn("could not be opened", ui.text())
            for text in texts:
                self.assertLessEqual(ui.text().count(text), 1, ui.text())
        entries = await chat1.session.store.history("bob")
        self.assertEqual([e.body.decode() for e in entries], texts)

    async def test_long_message_cut(self):
        """
        A message of 5000 lines shows its first 40 and a note naming the file that holds all of it; /history
        shows a few lines of it.  A message of 40 lines is shown whole.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        text = "\n".join("line %d" % n for n in range(5000))
        await bob.send("alice", text)
        await self.wait_for(lambda: "[cut:" in ui.text(), "the cut message")
        await self.idle(chat)
        [shown] = [line for line in ui.shown if "line 0" in line]
        self.assertIn("line 39\n", shown)
        self.assertNotIn("line 40\n", shown)
        self.assertIn("the message has 5000 lines", shown)
        path = shown.rsplit("saved as ", 1)[1].rstrip("]\n")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), text)
        self.assertLess(len(ui.text()), 4000)

        one_line = "x" * 100000
        await bob.send("alice", one_line)
        await self.wait_for(lambda: "100000 characters" in ui.text(), "the long line cut")
        await self.idle(chat)
        self.assertLess(len(ui.text()), 10000)

        short = "\n".join("short %d" % n for n in range(40))
        await bob.send("alice", short)
        await self.wait_for(lambda: "short 39" in ui.text(), "the 40-line message whole")
        await self.idle(chat)
        before = len(ui.shown)
        await self.type(chat, "/history bob")
        shown = ui.text(before)
        self.assertIn("line 4\n", shown)
        self.assertNotIn("line 5\n", shown)
        self.assertIn("5000 lines, 48889 characters in all", shown)
        self.assertLess(len(shown), 4000)

    async def test_empty_line_sends_nothing(self):
        """An empty line, in a conversation or not, sends nothing and shows nothing."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "", "   ", "/to bob", "", "  ")
        self.assertEqual(ui.prompt, "bob> ")
        await self.type(chat, "after the empty lines")
        await self.wait_for(lambda: bob.events.messages, "the next message")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"after the empty lines"])
        self.assertNotIn("Not sent", ui.text(before))

    async def test_receipt_after_quit(self):
        """
        A receipt the client had already queued when the user quit is dropped quietly (the server keeps it for next
        time): handling it must not fail on the closed local store.
        """
        await self.serve()
        chat, ui = await self.chat_as("alice")
        client = chat.session.client
        chat.line("/quit")
        client.frame_received({"type": "receipt", "receipt": 1, "msg": "00" * 16, "from": "bob",
                               "status": "delivered", "reason": "", "at": reactor.seconds()})
        await self.wait_for(lambda: chat.done.called and not client._working, "the chat to quit")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_quit(self):
        """quit ends the session: chat.done fires and alice is no longer online."""
        server = await self.serve()
        chat, ui = await self.chat_as("alice")
        self.assertIn("alice", server.factory.online)
        chat.line("quit")
        await self.wait_for(lambda: chat.done.called, "chat.done after quit")
        await self.wait_for(lambda: "alice" not in server.factory.online, "alice to go offline")


class ChatPasteTests(ChatTestCase):
    """Chat.paste: what the raw-mode screen hands on for a bracketed paste."""

    async def test_paste_without_a_conversation(self):
        """With no conversation open, a paste is not sent anywhere, and the chat says what to do."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        chat.paste("bob\nhello")
        await self.idle(chat)
        self.assertIn("The paste was not sent: open a conversation first with /to NAME.", ui.text(before))
        await self.settle(chat)
        self.assertEqual(bob.events.messages, [])

    async def test_paste_goes_to_the_conversation(self):
        """
        A paste of a few lines is one message to the current conversation, even when its first line names
        someone else.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to bob")
        self.assertEqual(chat.conversation, "bob")
        chat.paste("carol\nsecond line\n/quit")
        await self.idle(chat)
        await self.wait_for(lambda: bob.events.messages, "the pasted message")
        await self.settle(chat)
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"carol\nsecond line\n/quit"])
        self.assertEqual(carol.events.messages, [])
        self.assertFalse(chat._closing)

    async def test_long_paste_is_confirmed(self):
        """
        A bracketed paste of more than 5 lines, in the raw-mode screen over a real chat, is shown first; n cancels it
        (saying so), keys other than y, n, Enter, Esc and Ctrl-C are ignored, and Enter sends it.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to bob")
        transport = StringTransport()
        screen = pager.ChatScreen(chat, width=80)
        screen.makeConnection(transport)
        text = "\n".join("line %d" % n for n in range(1, 9))
        pasted = PASTE_START + text.replace("\n", "\r").encode() + PASTE_END
        transport.clear()
        screen.dataReceived(pasted)
        shown = transport.value().decode()
        self.assertIn("8 lines", shown)
        self.assertIn("line 5", shown)
        self.assertNotIn("line 6", shown)
        self.assertIn("3 more lines", shown)
        self.assertEqual(screen.prompt, "Send it to bob? [Y/n] ")
        screen.dataReceived(b"n")
        self.assertIn("nothing sent", transport.value().decode())
        self.assertIsNone(chat.confirming)
        self.assertEqual(screen.prompt, "bob> ")  # the conversation stays open
        screen.dataReceived(pasted)
        screen.dataReceived(b"maybe")
        self.assertIsNotNone(chat.confirming)
        self.assertEqual(screen.editor.text, "")
        screen.dataReceived(b"\r")  # Enter after other keys is no answer: they were typed as if not asked
        self.assertIsNotNone(chat.confirming)
        self.assertIn("what you typed was not used: y sends it", transport.value().decode())
        screen.dataReceived(b"y")
        self.assertIsNone(chat.confirming)
        await self.idle(chat)
        await self.wait_for(lambda: bob.events.messages, "the confirmed paste")
        await self.settle(chat)
        self.assertEqual([m.plaintext for m in bob.events.messages], [text.encode()])

    async def test_paste_into_an_open_slash_paste(self):
        """
        A bracketed paste while a /paste is open joins that /paste: after /to bob and /paste carol, the pasted lines
        and the lines typed after them are one message to carol, and bob gets nothing; with no conversation open
        the paste is taken too.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to bob", "/paste carol", "typed first")
        chat.paste("pasted one\npasted two")
        await self.type(chat, "typed after", ".")
        await self.wait_for(lambda: carol.events.messages, "the /paste to carol")
        await self.type(chat, "/to", "/paste carol")
        chat.paste("no conversation\nis open")
        await self.type(chat, ".")
        await self.wait_for(lambda: len(carol.events.messages) == 2, "the second /paste to carol")
        await self.settle(chat)
        self.assertEqual([m.plaintext for m in carol.events.messages],
                         [b"typed first\npasted one\npasted two\ntyped after", b"no conversation\nis open"])
        self.assertEqual(bob.events.messages, [])

    async def test_empty_paste_refused(self):
        """A /paste ended at once (or holding only blank lines) is refused with the command line's sentence."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "/paste bob", ".", "/paste bob", "  ", "", ".")
        self.assertEqual(ui.text(before).count(pager.NOTHING_TO_SEND), 2)
        self.assertEqual(await chat.session.store.outbox_waiting(), 0)
        await self.settle(chat)
        self.assertEqual(bob.events.messages, [])

    async def test_quit_says_the_open_paste_was_not_sent(self):
        """Quitting (Ctrl-D, Ctrl-C twice, the end of a pipe) with a /paste open says its lines were not sent."""
        await self.serve()
        await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/paste bob", "one", "two")
        before = len(ui.shown)
        chat.quit()
        self.assertIn("(the /paste of 2 lines to bob was not sent)", ui.text(before))

    async def test_quit_says_the_long_paste_was_not_sent(self):
        """Quitting while a long paste waits for y or n says it was not sent."""
        await self.serve()
        await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to bob")
        chat.paste("\n".join("line %d" % n for n in range(1, 9)))
        before = len(ui.shown)
        chat.quit()
        self.assertIn("(the paste of 8 lines to bob was not sent)", ui.text(before))


class ChatCommandTests(ChatTestCase):
    """users, whoami, fingerprint, history and trust."""

    async def test_users_paged(self):
        """
        With 150 more users, users lists the first 100 registered names with the total and the command that shows
        the next ones; that command lists the remaining 51 with the total and no further command.
        """
        await self.serve()
        public = key("alice").public_key()
        pem, fp = pager.public_key_pem(public), pager.fingerprint(public)
        names = ["user%03d" % n for n in range(150)]
        for name in names:
            await self.server.store.add_user(name, pem, fp, b"s" * 16, b"h" * 32, 0.0)
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "users")
        online, registered = ui.text(before).splitlines()
        self.assertEqual(online, "online: alice")
        self.assertEqual(registered, "registered: %s (151 in all; more: /users %s)"
                         % (", ".join(["alice"] + names[:99]), names[98]))
        before = len(ui.shown)
        await self.type(chat, "users " + names[98])
        online, registered = ui.text(before).splitlines()
        self.assertEqual(online, "online: nobody (1 in all)")
        self.assertEqual(registered, "registered: %s (151 in all)" % ", ".join(names[99:]))

    async def test_users_and_whoami(self):
        await self.serve()
        await self.peer("bob")
        await self.account("carol")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "users")
        shown = ui.text(before)
        self.assertIn("online: alice, bob", shown)
        self.assertIn("registered: alice, bob, carol", shown)

        before = len(ui.shown)
        await self.type(chat, "/whoami")
        shown = ui.text(before)
        self.assertIn("alice", shown)
        self.assertIn(self.host, shown)
        self.assertIn(self.server_id, shown)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("alice"))), shown)

    async def test_fingerprints(self):
        """fingerprint shows alice's own; fingerprint bob shows bob's, first unpinned, then pinned after a send."""
        await self.serve()
        await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "/fingerprint")
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("alice"))), ui.text(before))
        # Whole on one line of an 80-column terminal, to be read aloud group by group.
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("alice"))), ui.text(before).splitlines())

        bob_fp = pager.format_fingerprint(pager.fingerprint(key("bob")))
        before = len(ui.shown)
        await self.type(chat, "/fingerprint bob")
        self.assertIn(bob_fp, ui.text(before))
        self.assertIn("not pinned", ui.text(before))

        await self.type(chat, "/msg bob pin it")
        before = len(ui.shown)
        await self.type(chat, "/fingerprint bob")
        self.assertIn(bob_fp, ui.text(before))
        self.assertIn("pinned, not verified", ui.text(before))

    async def test_verify(self):
        """
        /fingerprint bob says new, then pinned after a message; /verify bob shows what to compare and marks
        nothing, a wrong first four digits mark nothing, the right ones verify it, and /whoami in bob's conversation
        says the same.  When bob re-keys, /fingerprint says CHANGED and /verify refuses; /trust
        pins the new key as pinned, not verified, until /verify again.  /verify of a new key pins and verifies it.
        """
        await self.serve()
        bob = await self.peer("bob")
        await self.peer("carol")
        chat, ui = await self.chat_as("alice")

        async def shown(*lines):
            before = len(ui.shown)
            await self.type(chat, *lines)
            return ui.text(before)

        self.assertIn("bob's key: new", await shown("/fingerprint bob"))
        await self.type(chat, "/msg bob pin it")
        self.assertIn("bob's key: pinned, not verified", await shown("/fingerprint bob"))
        bob_fp = pager.format_fingerprint(pager.fingerprint(key("bob")))
        text = await shown("/verify bob")  # shows what to compare, and marks nothing yet
        self.assertIn(bob_fp, text)
        self.assertIn("record that with /verify bob %s (its first four digits)" % bob_fp[:4], text)
        self.assertIn("bob's key: pinned, not verified", await shown("/fingerprint bob"))
        wrong = "0000" if bob_fp[:4] != "0000" else "1111"
        self.assertIn("%s is not how bob's key begins (%s): nothing was marked verified" % (wrong, bob_fp[:4]),
                      await shown("/verify bob " + wrong))
        self.assertIn("bob's key: pinned, not verified", await shown("/fingerprint bob"))
        text = await shown("/verify bob " + bob_fp[:4])
        self.assertIn("bob's key is now verified", text)
        self.assertIn(bob_fp, text)
        self.assertIn("bob's key: verified", await shown("/fingerprint bob"))
        self.assertIn("bob's key is already verified", await shown("/verify bob " + bob_fp[:4]))
        self.assertIn("nothing changed", await shown("/trust bob"))  # trusting the pinned key again undoes nothing
        self.assertIn("bob's key: verified", await shown("/fingerprint bob"))
        self.assertIn("Talking to bob, whose key is verified", await shown("/to bob", "/whoami"))

        new_key = key("bob-new")
        await bob.rekey("bob", token("bob"), key("bob"), new_key)
        self.assertIn("CHANGED", await shown("/fingerprint bob"))
        self.assertIn("changed since you pinned it", await shown("/verify bob"))
        self.assertIn("pinned, not verified", await shown("/trust bob"))
        text = await shown("/fingerprint bob")
        self.assertIn("bob's key: pinned, not verified", text)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), text)
        self.assertIn("bob's key is now verified", await shown("/verify bob " + pager.fingerprint(new_key).hex()))

        carol_fp = pager.format_fingerprint(pager.fingerprint(key("carol")))
        self.assertIn("carol's key is now verified", await shown("/verify carol " + carol_fp))  # spaced, whole
        self.assertIn("carol's key: verified", await shown("/fingerprint carol"))
        self.assertIn("Usage: /verify NAME", await shown("/verify"))
        self.assertIn("needs no verifying", await shown("/verify alice"))

    async def test_verified_column_added_to_an_old_store(self):
        """A client.sqlite3 made before keys could be verified opens, keeps its pins, and records verification."""
        path = os.path.abspath(self.mktemp())
        conn = __import__("sqlite3").connect(path)
        conn.execute("CREATE TABLE pins (user TEXT PRIMARY KEY, public_key TEXT NOT NULL, fingerprint BLOB NOT NULL,"
                     " pinned_at REAL NOT NULL)")
        fp = pager.fingerprint(key("bob"))
        conn.execute("INSERT INTO pins VALUES (?, ?, ?, ?)", ("bob", pager.public_key_pem(key("bob")), fp, 1.0))
        conn.commit()
        conn.close()
        store = pager.LocalStore(path, reactor)
        self.addCleanup(store.close)
        await store.open(reactor.seconds())
        self.assertEqual(await store.key_status("bob", fp), "pinned")
        self.assertEqual(await store.key_status("bob", b"x" * 32), "changed")
        self.assertEqual(await store.key_status("carol", fp), "new")
        self.assertTrue(await store.set_verified("bob", fp))
        self.assertFalse(await store.set_verified("bob", b"x" * 32))
        self.assertEqual(await store.key_status("bob", fp), "verified")

    async def test_history(self):
        """history bob lists what alice sent bob and what bob sent her; history carol has nothing."""
        await self.serve()
        bob = await self.peer("bob")
        await self.account("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/msg bob how are you")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        await bob.send("alice", "fine, and you")
        await self.wait_for(lambda: "fine, and you" in ui.text(), "bob's answer on alice's screen")
        await self.idle(chat)
        before = len(ui.shown)
        await self.type(chat, "/history bob")
        shown = ui.text(before)
        self.assertIn("-> bob: how are you", shown)
        self.assertIn("<- bob: fine, and you", shown)
        self.assertLess(shown.index("how are you"), shown.index("fine, and you"))
        before = len(ui.shown)
        await self.type(chat, "/history carol")
        self.assertIn("No history with carol", ui.text(before))

    async def test_history_names_each_delivery(self):
        """/history names every recipient's receipt of a message sent to two, not only the last one's."""
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/msg bob,carol meeting at noon")
        await self.wait_for(lambda: bob.events.messages and carol.events.messages, "both messages")
        [entry] = await chat.session.store.history()

        async def both():
            status = await chat.session.store.history_status(entry.msg_id)
            return sorted(status.split("\n")) == ["delivered to bob", "delivered to carol"]
        await self.wait_for(both, "both receipts in the history")
        await self.idle(chat)
        before = len(ui.shown)
        await self.type(chat, "/history")
        self.assertRegex(ui.text(before), r"-> (bob,carol|carol,bob): meeting at noon \(delivered to (bob|carol), "
                                          r"delivered to (bob|carol)\)")

    def test_receipt_lines(self):
        """
        The history's status keeps each recipient's latest receipt on a line, after another device's mark; a
        refusal's reason, its sender's words, stays on its line (a line break in it cannot forge another receipt).
        """
        def receipt(peer, status, reason=""):
            return pager.DeliveryReceipt(1, "ab" * 16, peer, status, reason, 0.0)
        status = pager._with_receipt(pager.SENT_FROM + "'laptop'", receipt("bob", "delivered"))
        status = pager._with_receipt(status, receipt("carol", "rejected", "full\ndelivered to dave"))
        status = pager._with_receipt(status, receipt("bob", "expired"))
        self.assertEqual(status.split("\n"), ["sent from 'laptop'", "rejected by carol: full delivered to dave",
                                              "expired for bob"])

    async def test_no_history(self):
        """With no-history, nothing sent or received is kept."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice", no_history=True)
        await self.type(chat, "/msg bob not for the record")
        await bob.send("alice", "me neither")
        await self.wait_for(lambda: "me neither" in ui.text(), "bob's message")
        await self.idle(chat)
        before = len(ui.shown)
        await self.type(chat, "/history")
        self.assertIn("No history", ui.text(before))
        self.assertEqual(await chat.session.store.history(), [])

    async def test_trust_after_key_swap(self):
        """
        alice has bob's old key pinned; the server now gives another key for bob.  Sending says the key changed
        (naming 'trust bob') and sends nothing; fingerprint bob shows both; after 'trust bob' sending works.
        """
        server = await self.serve()
        bob = await self.peer("bob")
        new_key = key("bob-new")
        await bob.rekey("bob", token("bob"), key("bob"), new_key)
        chat, ui = await self.chat_as("alice", pins=["bob"])

        before = len(ui.shown)
        await self.type(chat, "/msg bob are you really bob")
        shown = ui.text(before)
        self.assertIn("accept it with /trust bob (and /verify bob records", shown)  # the chat's commands, not pager-cli's
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), shown)
        self.assertEqual(await self.pending(server, "bob"), [])
        self.assertEqual(bob.events.messages, [])

        before = len(ui.shown)
        await self.type(chat, "/fingerprint bob")
        shown = ui.text(before)
        self.assertIn("CHANGED", shown)
        lines = shown.splitlines()  # each fingerprint whole on a line of its own: 79 characters, for 80 columns
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("bob"))), lines)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), lines)

        before = len(ui.shown)
        await self.type(chat, "/trust bob")
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), ui.text(before))
        await self.type(chat, "/msg bob now I trust you")
        await self.wait_for(lambda: bob.events.messages, "the message after trust")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"now I trust you"])
        self.assertEqual(bob.events.rejected, [])

    async def test_key_change_during_session(self):
        """
        bob re-keys while alice's chat is running with his old key pinned: her next message must not go to the old
        key (which bob may have replaced because it leaked); she is told the key changed instead.
        """
        server = await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/msg bob one")
        await self.wait_for(lambda: bob.events.messages, "the first message")

        new_key = key("bob-new")
        await bob.rekey("bob", token("bob"), key("bob"), new_key)
        before = len(ui.shown)
        await self.type(chat, "/msg bob two")
        await bob.ping()
        shown = ui.text(before)
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"one"])
        self.assertEqual(bob.events.rejected, [], "alice's message was encrypted to bob's replaced key")
        self.assertIn("trust bob", shown)
        self.assertEqual(await self.pending(server, "bob"), [])


class ChatReceivingTests(ChatTestCase):
    """What arrives is shown safely."""

    async def test_failed_hand_off_is_shown(self):
        """
        A file alice's chat cannot save (her files directory is not a directory) is not lost in silence: one line
        names the sender and the reason and says the message stays on the server; it is not acknowledged.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        files = os.path.join(self.user_dir(self.home_of_chat, "alice"), "files")
        with open(files, "w") as f:
            f.write("in the way\n")
        await bob.send("alice", b"report", content_type="file", filename="report.txt")
        await self.wait_for(lambda: "could not be saved" in ui.text(), "the failure on alice's screen")
        [line] = [line for line in ui.shown if "could not be saved" in line]
        self.assertIn("from bob", line)
        self.assertIn("stays on the server", line)
        self.assertEqual(len(await self.pending(self.server, "alice")), 1)
        chat.quit()
        await self.wait_for(lambda: chat.done.called, "the chat to finish quitting")

    async def test_changed_key_names_chat_commands(self):
        """A message signed by a changed key is marked in the chat with its /fingerprint and /trust, not pager-cli."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice", pins=("bob",))
        await bob.rekey("bob", token("bob"), key("bob"), key("bob-new"))
        await bob.send("alice", "new key here")
        await self.wait_for(lambda: "new key here" in ui.text(), "bob's message on alice's screen")
        [line] = [line for line in ui.shown if "new key here" in line]
        self.assertRegex(line, r"^\[\d\d:\d\d\] bob \u26a0 KEY CHANGED, NOT VERIFIED \(see /fingerprint bob, then "
                               r"/trust bob\): new key here")
        self.assertNotIn("pager-cli", line)

    async def test_terminal_escapes_neutralised(self):
        """A message full of terminal escapes reaches the screen with every escape made harmless and visible."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        evil = "\x1b[2J\x1b]0;pwned\x07 hello \x9b31m\u202eevil"
        await bob.send("alice", evil)
        await self.wait_for(lambda: "hello" in ui.text(), "bob's message on alice's screen")
        await self.idle(chat)
        shown = ui.text()
        for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
            self.assertNotIn(bad, shown)
        self.assertIn("\\x1b[2J", shown)
        self.assertIn("pwned", shown)

        await self.wait_for(lambda: chat.session.store.history("bob").addCallback(bool), "the history entry")
        before = len(ui.shown)
        await self.type(chat, "/history bob")
        self.assertNotIn("\x1b", ui.text(before))
        self.assertIn("pwned", ui.text(before))

    async def test_incoming_file_saved_safely(self):
        """A file named '../../.bashrc' with an escape is saved as files/bashrc (mode 0600) under alice's directory."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        data = b"alias ls='rm -rf ~'\n"
        await bob.send("alice", data, content_type="file", filename="../../.bash\x1b[2Jrc")
        await self.wait_for(lambda: "saved as" in ui.text(), "the file on alice's screen")
        files = os.path.join(self.user_dir(self.home_of_chat, "alice"), "files")
        [name] = os.listdir(files)
        self.assertNotIn("/", name)
        self.assertFalse(name.startswith("."))
        self.assertNotIn("\x1b", name)
        path = os.path.join(files, name)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertNotIn("\x1b", ui.text())
        self.assertIn(path, ui.text())


    async def test_incoming_file_keeps_non_ascii_name(self):
        """A file named 'Relevé 報告.pdf' is saved under that name, and the chat says where."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.send("alice", b"%PDF", content_type="file", filename="Relev\u00e9 \u5831\u544a.pdf")
        await self.wait_for(lambda: "saved as" in ui.text(), "the file on alice's screen")
        path = os.path.join(self.user_dir(self.home_of_chat, "alice"), "files", "Relev\u00e9 \u5831\u544a.pdf")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"%PDF")
        self.assertIn(path, ui.text())


class ChatConnectionTests(ChatTestCase):
    """Messages waiting at login are shown; a dropped connection is re-established."""

    async def test_waiting_message_shown_at_login(self):
        await self.serve()
        bob = await self.peer("bob")
        home = await self.provision("alice")  # registered from this home: the device the message is sealed to
        await bob.send("alice", "while you were away")
        chat, ui = await self.chat_as("alice", home=home)
        await self.wait_for(lambda: "while you were away" in ui.text(), "the waiting message on alice's screen")
        await self.no_pending(self.server, "alice")

    async def test_reconnects_after_drop(self):
        """The server drops alice's connection: the chat says so, logs in again, and sending and receiving work."""
        server = await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        [connection] = [p for p in server.factory.protocols if p.user == "alice"]
        connection.transport.loseConnection()
        await self.wait_for(lambda: "Reconnected." in ui.text(), "the chat to reconnect", tries=1000)
        self.assertIn("lost", ui.text())
        await self.type(chat, "/msg bob back again")
        await self.wait_for(lambda: bob.events.messages, "the message after reconnecting")
        self.assertOpened(bob.events.messages[0], "alice", b"back again")
        await bob.send("alice", "welcome back")
        await self.wait_for(lambda: "welcome back" in ui.text(), "bob's message after reconnecting")


    async def test_quit_while_reconnecting(self):
        """With the server gone and the chat retrying, quit ends the chat at once instead of waiting for a server."""
        server = await self.serve()
        chat, ui = await self.chat_as("alice")
        await server.stopService()  # closes alice's connection and stops listening
        await self.wait_for(lambda: "Reconnecting" in ui.text(), "the chat to start reconnecting", tries=1000)
        chat.line("quit")
        await self.wait_for(lambda: chat.done.called, "quit to finish while the server is down", tries=300)


class PlainChatTests(ChatTestCase):
    """Without a terminal, the chat reads plain lines and writes plain lines."""

    async def test_plain_lines(self):
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        out = io.StringIO()
        plain = pager.PlainChat(chat, out)
        plain.makeConnection(StringTransport())
        self.assertIn("Logged in as alice", out.getvalue())
        plain.dataReceived(b"/to bob\r\nhello from a pipe\n")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertOpened(bob.events.messages[0], "alice", b"hello from a pipe")
        await bob.send("alice", "got it")
        await self.wait_for(lambda: "got it" in out.getvalue(), "bob's answer on standard output")
        plain.connectionLost(None)
        await self.wait_for(lambda: chat.done.called, "the chat to end with its input")


class PipeTests(CLITestCase):
    """pager.py connect with standard input not a terminal: plain lines in and out."""

    async def test_connect_reading_a_pipe(self):
        """Lines piped to connect are typed at the chat; at the end of input it sends what it has, then exits 0."""
        await self.serve()
        home = await self.provision("alice")
        bob = await self.peer("bob")
        result = await self.pager("connect", self.host, "--user", "alice", home=home, token_of="alice",
                                  stdin=b"/to bob\nhello via a pipe\n/msg bob and a second line\n")
        self.assertExit(result, 0)
        self.assertIn("Logged in as alice", result.out)
        self.assertNotIn("Traceback", result.err)
        await self.wait_for(lambda: len(bob.events.messages) == 2, "both piped messages")
        self.assertEqual(sorted(m.plaintext for m in bob.events.messages),
                         [b"and a second line", b"hello via a pipe"])

    async def test_piped_quit(self):
        """
        A piped /quit at the end of the input leaves no line unhandled, and says nothing of one; a line after it
        is named once as not handled.
        """
        await self.serve()
        home = await self.provision("alice")
        for piped, said in ((b"/quit\n", []), (b"/quit\n/whoami\n", ["(the chat left before handling 1 more line)"])):
            result = await self.pager("connect", self.host, "--user", "alice", home=home, token_of="alice",
                                      stdin=piped)
            self.assertExit(result, 0)
            self.assertEqual([line for line in result.out.splitlines() if "left before handling" in line], said)

    async def peer(self, name):
        return await self.register(self.address, name)


class FileNameTests(unittest.TestCase):
    """safe_filename and save_incoming_file."""

    def test_safe_filename(self):
        self.assertEqual(pager.safe_filename("../../etc/passwd"), "passwd")
        self.assertEqual(pager.safe_filename(".bashrc"), "bashrc")
        self.assertEqual(pager.safe_filename("a/b\\c"), "c")
        self.assertEqual(pager.safe_filename(""), "file")
        self.assertEqual(pager.safe_filename(".."), "file")
        self.assertEqual(pager.safe_filename("report 2024.pdf"), "report 2024.pdf")
        for name in ("evil\x00name.txt", "bell\x07\x1b[2J.txt", "line\nbreak\r.txt", "\u202etxt.exe", "tab\there"):
            safe = pager.safe_filename(name)
            self.assertTrue(safe, name)
            self.assertFalse(any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c in "/\\\u202e" for c in safe),
                             "%r -> %r" % (name, safe))
            self.assertFalse(safe.startswith("."))
        self.assertLessEqual(len(pager.safe_filename("x" * 1000 + ".txt")), 255)

    def test_non_ascii_names_kept(self):
        """
        Letters of every script, accents (composed to NFC) and digits are kept; controls, bidi and format characters
        and separators are not; a long name is cut to at most SAFE_FILENAME_BYTES bytes of UTF-8, keeping its
        extension.
        """
        self.assertEqual(pager.safe_filename("Relevé de compte.pdf"), "Relevé de compte.pdf")
        self.assertEqual(pager.safe_filename("Rele\u0301ve\u0301.pdf"), "Rel\u00e9v\u00e9.pdf")
        self.assertEqual(pager.safe_filename("報告書 2024.txt"), "報告書 2024.txt")
        self.assertEqual(pager.safe_filename("Ünïcödé/../../отчёт.doc"), "отчёт.doc")
        self.assertEqual(pager.safe_filename("a\u200fb\u2028c\u00a0d\ufeff.txt"), "a_b_c_d_.txt")
        long = pager.safe_filename("日" * 300 + ".txt")
        self.assertTrue(long.endswith("日.txt"), long)
        self.assertLessEqual(len(long.encode("utf-8")), pager.SAFE_FILENAME_BYTES)

    def test_save_never_overwrites(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        first = pager.save_incoming_file(directory, "report.txt", b"first")
        second = pager.save_incoming_file(directory, "../report.txt", b"second")
        third = pager.save_incoming_file(directory, "report.txt", b"third")
        self.assertEqual([os.path.basename(p) for p in (first, second, third)],
                         ["report.txt", "report-1.txt", "report-2.txt"])
        for path, data in ((first, b"first"), (second, b"second"), (third, b"third")):
            self.assertEqual(os.path.dirname(path), directory)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)


class TerminalProcess(Child):
    """A child in a pseudo-terminal: everything it writes arrives as output; input is typed with L{type}."""

    def __init__(self):
        super().__init__(stdin=None)

    def output(self):
        return self.out.decode("utf-8", "replace")


class PseudoTerminalTests(CLITestCase):
    """pager.py connect in a pseudo-terminal."""

    def start_terminal(self, *args, env):
        child = TerminalProcess()
        argv = [sys.executable, PAGER_PY, "connect"] + list(args)
        self.spawn(argv, base_env(TERM="xterm", **env), usePTY=True, child=child)
        return child

    async def wait_output(self, child, text, since=0, what=None):
        """Wait until C{text} appears in the output after offset C{since}; returns its offset."""
        def seen():
            if child.finished and text not in child.output()[since:]:
                self.fail("The client exited (%r) before showing %r:\n%s" % (child.code, text, child.output()))
            return text in child.output()[since:]
        await self.wait_for(seen, what or "%r on the terminal" % text, tries=2000)
        return child.output().index(text, since)

    async def type_slowly(self, child, text):
        for character in text:
            child.transport.write(character.encode("utf-8"))
            await task.deferLater(reactor, 0.005, lambda: None)

    async def test_half_typed_line_survives_a_message(self):
        """
        bob (new: registered with --register from PAGER_TOKEN and PAGER_PASSPHRASE, no prompts) half-types a /msg; alice's message
        arrives and is drawn above it; the half line is drawn again, intact, after it; finishing the line sends
        exactly what was typed; Ctrl-D exits 0.
        """
        await self.serve()
        alice = await self.register(self.address, "alice")
        child = self.start_terminal(self.host, "--user", "bob", "--register", env=dict(
            PAGER_HOME=self.home(), PAGER_TOKEN=token("bob"), PAGER_PASSPHRASE="bob's passphrase"))
        await self.wait_output(child, "to> ", what="the chat prompt")
        self.assertNotIn("Traceback", child.output())
        await self.type_slowly(child, "/msg alice fine th")
        await self.wait_output(child, "fine th", what="the typed characters echoed")

        await alice.send("bob", "are you typing?")
        at = await self.wait_output(child, "are you typing?")
        await self.wait_output(child, "to> /msg alice fine th", since=at,
                               what="the half line drawn again after the message")

        await self.type_slowly(child, "anks!\r")
        await self.wait_for(lambda: alice.events.messages, "bob's answer")
        self.assertEqual([m.plaintext for m in alice.events.messages], [b"fine thanks!"])
        self.assertEqual(alice.events.messages[0].sender, "bob")

        child.transport.write(b"\x04")
        result = await self.finish(child, "the chat after Ctrl-D")
        self.assertEqual(result.code, 0, child.output())
        self.assertNotIn("Traceback", child.output())

    async def test_prompts_drawn_once(self):
        """
        In a terminal, each Enter moves to one new line (no blank line), an answer shown at once (an unknown command)
        is followed by one prompt, not two, /to changes the prompt to the name, and /quit leaves with no prompt
        drawn after it.
        """
        await self.serve()
        alice = await self.register(self.address, "alice")
        child = self.start_terminal(self.host, "--user", "bob", "--register", env=dict(
            PAGER_HOME=self.home(), PAGER_TOKEN=token("bob"), PAGER_PASSPHRASE="bob's passphrase"))
        at = await self.wait_output(child, "Type /to NAME", what="the greeting")
        await self.type_slowly(child, "/nope\r")
        at = await self.wait_output(child, "Unknown command /nope", since=at)
        await self.type_slowly(child, "/to alice\r")
        at = await self.wait_output(child, "Talking to alice", since=at)
        await self.wait_output(child, "alice> ", since=at)
        await self.type_slowly(child, "hi there\r")
        await self.wait_for(lambda: alice.events.messages, "bob's message")
        await self.type_slowly(child, "/quit\r")
        result = await self.finish(child, "the chat after /quit")
        self.assertEqual(result.code, 0, child.output())
        # What the screen looks like: each line as last drawn (after a carriage return or an erase).
        screen = [line.rsplit("\r", 1)[-1].replace("\x1b[2K", "").replace("\x1b[K", "")
                  for line in child.output().split("\r\n")]
        start = next(n for n, line in enumerate(screen) if "Type /to NAME" in line)
        screen = screen[start:]
        self.assertNotIn("", screen[:-1], screen)
        self.assertFalse([line for line in screen if line.count("> ") > 1], screen)
        self.assertIn("to> /nope", screen)
        self.assertIn("alice> hi there", screen)
        self.assertEqual(screen[-2:], ["alice> /quit", "\x1b[?2004l"], screen)  # then bracketed paste turned off
        self.assertTrue(child.output().endswith("alice> /quit\r\n\r\x1b[K\x1b[?2004l"), repr(child.output()[-100:]))

    async def test_three_wrong_passphrases(self):
        """A key with a passphrase and none given: three wrong answers at the prompt end the client with exit 3."""
        await self.serve()
        home = await self.provision("bob", passphrase="the right one")
        child = self.start_terminal(self.host, "--user", "bob", env=dict(PAGER_HOME=home, PAGER_TOKEN=token("bob")))
        since = 0
        for attempt in range(3):
            since = await self.wait_output(child, "Passphrase for bob's key", since,
                                           what="passphrase prompt %d" % (attempt + 1)) + 1
            child.transport.write(b"wrong %d\r" % attempt)
        result = await self.finish(child, "the client after three wrong passphrases")
        output = child.output()
        self.assertEqual(result.code, pager.EXIT_AUTH, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("wrong 0", output)  # not echoed
        self.assertEqual(len([line for line in output.splitlines() if line.startswith("pager: ")]), 1, output)

    async def test_unreachable_server(self):
        """connect to a closed port exits 6 with one sentence."""
        child = self.start_terminal("127.0.0.1:%d" % free_port(), "--user", "bob",
                                    env=dict(PAGER_HOME=self.home(), PAGER_TOKEN=token("bob")))
        result = await self.finish(child, "connect to a closed port")
        output = child.output()
        self.assertEqual(result.code, pager.EXIT_NETWORK, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertTrue(lines[0].startswith("pager: "), output)


class _RecordingChat:
    """What the chat screen calls on its chat, recorded."""

    def __init__(self):
        self.reactor = task.Clock()
        self.lines, self.pastes, self.answers = [], [], []
        self.quits = 0
        self.confirming = None
        self.closing = False

    def attach(self, ui):
        self.ui = ui

    def line(self, text):
        self.lines.append(text)

    def paste(self, text):
        self.pastes.append(text)

    def confirm(self, yes):
        self.answers.append(yes)
        self.confirming = None

    def quit(self):
        self.quits += 1


LEFT, RIGHT, UP, DOWN, HOME, END, DELETE = b"\x1b[D", b"\x1b[C", b"\x1b[A", b"\x1b[B", b"\x1b[H", b"\x1b[F", b"\x1b[3~"
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"


class ChatScreenTests(unittest.SynchronousTestCase):
    """The raw-mode chat screen's keys, fed as a terminal sends them (no process, no terminal)."""

    def setUp(self):
        self.chat = _RecordingChat()
        self.transport = StringTransport()
        self.screen = pager.ChatScreen(self.chat, width=80)
        self.screen.makeConnection(self.transport)

    def feed(self, *chunks):
        for chunk in chunks:
            self.screen.dataReceived(chunk)

    def test_editing_keys(self):
        """Ctrl-A/E, Left/Right, Home/End (every form), Backspace and Delete edit in the middle of the line."""
        self.feed(b"hello world", b"\x01", b"X", b"\x05", b"Y", LEFT, LEFT, b"Z", HOME, RIGHT, b"-", END, b"!",
                  b"\x1b[1~", DELETE, b"\x1bOF", b"\x7f", b"\r")
        self.assertEqual(self.chat.lines, ["-hello worlZdY"])
        self.feed(b"one two  three", b"\x17", b"\r")  # Ctrl-W: the word before the cursor
        self.feed(b"one two  three", LEFT * 5, b"\x17", b"\r")  # and the spaces after a word
        self.feed(b"one two", LEFT * 3, b"\x0b", b"\r")  # Ctrl-K: to the end
        self.feed(b"one two", LEFT * 3, b"\x15", b"\r")  # Ctrl-U: to the start
        self.assertEqual(self.chat.lines[1:], ["one two  ", "one three", "one ", "two"])

    def test_unknown_and_broken_sequences(self):
        """
        Keys the chat has no use for (F5, Ctrl-Left, Alt-x's ESC) are ignored; CR LF is one Enter; an escape sequence
        that never ends is dropped after 32 bytes instead of holding back what follows.
        """
        self.feed(b"a\x1b[15~\x1b[1;5Db\x1bxc\r\nd\r")
        self.assertEqual(self.chat.lines, ["abxc", "d"])
        self.feed(b"\x1b[" + b"1" * 40, b"ok\r")
        self.assertEqual(self.chat.lines[2:], ["ok"])

    def test_history(self):
        """Up and Down browse the lines entered; going back down past the last gives back the half-typed line."""
        self.feed(b"first\r", b"second\r", b"draft", UP, UP, UP)
        self.assertEqual(self.screen.editor.text, "first")
        self.feed(DOWN)
        self.assertEqual(self.screen.editor.text, "second")
        self.feed(DOWN)
        self.assertEqual(self.screen.editor.text, "draft")
        self.feed(UP, b" again\r")
        self.assertEqual(self.chat.lines, ["first", "second", "second again"])

    def test_wide_characters(self):
        """
        Non-ASCII text, even split between reads byte by byte, is edited by character and the cursor placed by
        screen column: wide characters count two, combining marks none.
        """
        for byte in "日本語".encode("utf-8"):
            self.feed(bytes([byte]))
        self.feed(LEFT, LEFT)
        self.transport.clear()
        self.feed("x".encode("utf-8"))
        drawn = self.transport.value()
        self.assertTrue(drawn.endswith("to> 日x本語\x1b[4D".encode("utf-8")), drawn)
        self.feed(END, "e\u0301".encode("utf-8"), LEFT)  # e and a combining accent: one column, one step
        self.assertEqual(self.screen.editor.columns(self.screen.editor.cursor), 1)
        self.feed(RIGHT, b"\x7f", b"e")
        self.assertEqual(self.screen.editor.text, "日x本語e")
        self.feed(b"\r")
        self.assertEqual(self.chat.lines, ["日x本語e"])

    def test_long_line_scrolls(self):
        """A line wider than the screen scrolls sideways so the cursor stays on it."""
        self.screen.width = 20
        self.transport.clear()
        self.feed(b"abcdefghijklmnopqrstuvwxyz")
        last = self.transport.value().rsplit(b"\r\x1b[K", 1)[1]
        self.assertEqual(last, b"to> lmnopqrstuvwxyz")
        self.feed(HOME)
        last = self.transport.value().rsplit(b"\r\x1b[K", 1)[1]
        self.assertTrue(last.startswith(b"to> abcdefghijklmno"), last)

    def test_ctrl_c(self):
        """Ctrl-C clears the line (nothing sent); a second Ctrl-C on the empty line leaves."""
        self.feed(b"half a line", b"\x03")
        self.assertEqual((self.screen.editor.text, self.chat.lines, self.chat.quits), ("", [], 0))
        self.feed(b"\x03")
        self.assertEqual(self.chat.quits, 1)
        self.assertTrue(self.transport.value().endswith(b"\r\x1b[K"), "the prompt erased")

    def test_ctrl_c_on_an_empty_line(self):
        """On an empty line, one Ctrl-C says how to leave; a key in between starts over."""
        self.feed(b"\x03")
        self.assertIn(b"Ctrl-C again", self.transport.value())
        self.feed(b"a", b"\x7f", b"\x03")
        self.assertEqual(self.chat.quits, 0)
        self.feed(b"\x03")
        self.assertEqual(self.chat.quits, 1)

    def test_ctrl_d(self):
        """Ctrl-D deletes the character under the cursor; on an empty line it leaves."""
        self.feed(b"abc", LEFT, LEFT, b"\x04")
        self.assertEqual((self.screen.editor.text, self.chat.quits), ("ac", 0))
        self.feed(b"\x01\x0b", b"\x04")
        self.assertEqual(self.chat.quits, 1)

    def test_paste_is_one_event(self):
        """A bracketed paste of several lines, in reads of any size, reaches the chat as one paste, not as lines."""
        data = b"half" + PASTE_START + b"carol\r\nhello \xc3\xa9\r\n\tthree\r\n" + PASTE_END + b" typed"
        for size in range(1, len(data) + 1):
            self.setUp()
            self.feed(*[data[i:i + size] for i in range(0, len(data), size)])
            self.assertEqual(self.chat.pastes, ["carol\nhello \u00e9\n\tthree"], size)
            self.assertEqual(self.chat.lines, [], size)
            self.assertEqual(self.screen.editor.text, "half typed", size)

    def test_one_line_paste_is_typed(self):
        """A paste without a line break is inserted at the cursor, to be edited; nothing is sent."""
        self.feed(b"ab", LEFT, PASTE_START + b"X\tY\x1b[2J" + PASTE_END)
        self.assertEqual((self.screen.editor.text, self.chat.pastes, self.chat.lines), ("aX Y[2Jb", [], []))

    def test_paste_too_long(self):
        """A paste over the bound is refused with a sentence; nothing is sent and the screen goes on."""
        self.feed(PASTE_START, b"x\n" * (pager.MAX_PASTE // 2 + 10), PASTE_END, b"ok\r")
        self.assertEqual(self.chat.pastes, [])
        self.assertIn(b"The paste was not used", self.transport.value())
        self.assertEqual(self.chat.lines, ["ok"])
        self.assertLessEqual(len(self.screen._paste or b""), pager.MAX_PASTE + 1)

    def test_confirming(self):
        """
        While the chat waits for an answer about a paste: y or Enter sends, n, Esc or Ctrl-C cancels.  Other keys
        are not used, and said so once; an Enter after them is no answer (it would send what /quit, typed as if the
        question were not there, meant to leave).
        """
        for keys, answer in (((b"q", b"y"), True), ((b"\r",), True), ((b"q", b"n"), False), ((b"q", b"\x03"), False)):
            self.chat.confirming = ("bob", "text")
            self.feed(*keys)
            self.assertEqual(self.chat.answers[-1:], [answer])
            self.assertEqual(self.chat.lines, [])
        before, hint = len(self.chat.answers), pager.ChatScreen.PASTE_ANSWERS.encode()
        said = self.transport.value().count(hint)
        self.chat.confirming = ("bob", "text")
        self.feed(b"/", b"q", b"u", b"i", b"t", b"\r")
        self.assertEqual((len(self.chat.answers), self.chat.lines, self.chat.quits), (before, [], 0))
        self.assertEqual(self.transport.value().count(hint), said + 2)  # at the first key, and at Enter
        self.feed(b"\r")
        self.assertEqual(len(self.chat.answers), before)  # still no answer
        self.feed(b"n")
        self.assertEqual(self.chat.answers[-1], False)
        self.chat.confirming = ("bob", "text")
        self.feed(b"\r")  # the next question starts afresh
        self.assertEqual(self.chat.answers[-1], True)
        self.chat.answers[before:] = []
        self.chat.confirming = ("bob", "text")
        self.feed(b"\x1b")
        self.assertEqual(len(self.chat.answers), 4)  # a lone ESC waits for the rest of a sequence...
        self.chat.reactor.advance(pager.ESCAPE_WAIT)
        self.assertEqual(self.chat.answers[-1], False)  # ...then counts as Esc
        self.assertEqual(self.chat.quits, 0)


class TerminalRestoredTests(CLITestCase):
    """
    pager.py connect in a pseudo-terminal under a shell that runs C{stty -a} once it has ended: on every way out the
    terminal is given back with echo and canonical mode on and bracketed paste off.
    """

    def start_wrapped(self, *args, env):
        """Start C{pager.py connect ARGS} in a pseudo-terminal, under C{sh}, which prints its exit code, then stty."""
        child = TerminalProcess()
        script = 'trap : INT TERM HUP; "$@"; echo "exited with $?"; stty -a'
        argv = ["/bin/sh", "-c", script, "sh", sys.executable, PAGER_PY, "connect"] + list(args)
        self.spawn(argv, base_env(TERM="xterm", **env), usePTY=True, child=child)
        return child

    wait_output = PseudoTerminalTests.wait_output
    type_slowly = PseudoTerminalTests.type_slowly

    async def assertRestored(self, child, code, what):
        """C{child} ends with the client's exit C{code}, and stty then shows echo and canonical mode on."""
        result = await self.finish(child, what)
        output = child.output()
        self.assertEqual(result.code, 0, output)
        self.assertIn("exited with %d" % code, output, "%s:\n%s" % (what, output))
        words = re.split(r"[\s;]+", output[output.index("exited with"):])
        self.assertIn("echo", words, "%s:\n%s" % (what, output))
        self.assertIn("icanon", words, "%s:\n%s" % (what, output))
        if "\x1b[?2004h" in output:
            self.assertGreater(output.rfind("\x1b[?2004l"), output.rfind("\x1b[?2004h"), what)
        self.assertNotIn("Traceback", output)
        return output

    async def test_interrupt_at_each_prompt(self):
        """
        Ctrl-C at the server address, user name, safetoken and passphrase prompts: exit 130 with its sentence on a
        line of its own, terminal back.
        """
        await self.serve()
        token_home = await self.provision("bob")
        passphrase_home = await self.provision("carol", passphrase="carol's passphrase")
        cases = [
            ("Server address", (), dict(PAGER_HOME=self.home())),
            ("Username: ", (self.host,), dict(PAGER_HOME=self.home())),
            ("Safetoken for bob: ", (self.host, "--user", "bob"), dict(PAGER_HOME=token_home)),  # none kept yet
            ("Passphrase for carol's key", (self.host, "--user", "carol"),
             dict(PAGER_HOME=passphrase_home, PAGER_TOKEN=token("carol"))),
        ]
        for prompt, args, env in cases:
            child = self.start_wrapped(*args, env=env)
            await self.wait_output(child, prompt)
            child.transport.write(b"\x03")
            output = await self.assertRestored(child, pager.EXIT_INTERRUPTED, "Ctrl-C at %r" % prompt)
            self.assertIn("pager: interrupted", [line[:18] for line in output.splitlines()], output)

    async def test_paste(self):
        """
        Three lines pasted (bracketed) into the chat, the first naming another user: bob, the conversation, gets
        one message of three lines, carol nothing.  Then Ctrl-C clears a half line and a second Ctrl-C leaves
        (exit 0), with the terminal given back.
        """
        await self.serve()
        bob, carol = await self.register(self.address, "bob"), await self.register(self.address, "carol")
        home = await self.provision("alice")
        child = self.start_wrapped(self.host, "--user", "alice", env=dict(PAGER_HOME=home, PAGER_TOKEN=token("alice")))
        await self.wait_output(child, "to> ", what="the chat prompt")
        self.assertIn("\x1b[?2004h", child.output())  # bracketed paste on
        await self.type_slowly(child, "/to bob\r")
        await self.wait_output(child, "Talking to bob")
        child.transport.write(b"\x1b[200~carol\r\nline two\r\nline three\r\n\x1b[201~")
        await self.wait_for(lambda: bob.events.messages, "the pasted message")
        await self.type_slowly(child, "/msg bob end\r")
        await self.wait_for(lambda: len(bob.events.messages) == 2, "the message after the paste")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"carol\nline two\nline three", b"end"])
        self.assertEqual(carol.events.messages, [])

        await self.type_slowly(child, "half a line")
        child.transport.write(b"\x03")
        await self.wait_for(lambda: child.output().endswith("bob> "), "the line cleared")
        child.transport.write(b"\x03")
        output = await self.assertRestored(child, 0, "two Ctrl-C")
        self.assertEqual(len(bob.events.messages), 2)
        self.assertNotIn("half a line\r\n", output)

    async def test_signals(self):
        """SIGTERM and SIGHUP to the chat: exit 130, terminal back."""
        await self.serve()
        home = await self.provision("bob")
        for name in ("SIGTERM", "SIGHUP"):
            child = self.start_wrapped(self.host, "--user", "bob", env=dict(PAGER_HOME=home, PAGER_TOKEN=token("bob")))
            await self.wait_output(child, "to> ", what="the chat prompt")
            os.killpg(child.transport.pid, getattr(signal, name))
            await self.assertRestored(child, pager.EXIT_INTERRUPTED, name)

    async def test_server_gone(self):
        """The server stops while the chat runs: the chat says so and keeps trying; Ctrl-D leaves, terminal back."""
        await self.serve()
        home = await self.provision("bob")
        child = self.start_wrapped(self.host, "--user", "bob", env=dict(PAGER_HOME=home, PAGER_TOKEN=token("bob")))
        await self.wait_output(child, "to> ", what="the chat prompt")
        await self.server.stopService()
        await self.wait_output(child, "Reconnecting in")
        child.transport.write(b"\x04")
        await self.assertRestored(child, 0, "Ctrl-D with the server gone")


class TerminalGuardTests(unittest.SynchronousTestCase):
    """L{pager.TerminalGuard} on a pseudo-terminal of this process."""

    def test_raw_then_restore(self):
        """raw() turns echo and canonical mode off and bracketed paste on; restore() gives back all three."""
        import termios
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        guard = pager.TerminalGuard(slave, out=slave)
        guard.raw()
        lflag = termios.tcgetattr(slave)[3]
        self.assertFalse(lflag & (termios.ECHO | termios.ICANON))
        guard.restore()
        guard.restore()  # twice (at the end of the command, then at exit) is harmless
        lflag = termios.tcgetattr(slave)[3]
        self.assertEqual(lflag & (termios.ECHO | termios.ICANON), termios.ECHO | termios.ICANON)
        expected = b"\x1b[?2004h\r\x1b[K\x1b[?2004l"
        written = b""
        while len(written) < len(expected) and select.select([master], [], [], 5)[0]:
            written += os.read(master, 1000)
        self.assertEqual(written, expected)

    def test_not_a_terminal(self):
        """Without a terminal there is nothing to guard."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        self.assertIsNone(pager.TerminalGuard.install(task.Clock(), read))


class _StalledStore:
    """A local store whose outbox never finishes keeping a message (a stalled disk or server, to the chat)."""

    def __init__(self):
        self.stalled = Deferred()

    def outbox_add(self, at, recipients, content_type, filename, body):
        return self.stalled

    def outbox_waiting(self):
        return defer.succeed(0)


class _QuietSession:
    """What L{pager.Chat} needs of a session, for a chat on a L{task.Clock}: logged in, never connected."""

    user, address, client, closing, wire = "alice", "127.0.0.1:5050", None, False, None

    def __init__(self):
        self.store = _StalledStore()
        self.closed = False

    def close(self):
        self.closed = True
        return defer.succeed(None)


class ChatQuitTests(unittest.SynchronousTestCase):
    """How long /quit waits for what is in flight."""

    def test_quit_waits_a_bounded_time(self):
        """
        /quit while a message is still being kept waits at most QUIT_WAIT seconds, then closes anyway, saying what
        was still in flight and that messages in the outbox stay on disk.
        """
        clock = task.Clock()
        session = _QuietSession()
        chat = pager.Chat(session, clock)
        ui = FakeUI()
        chat.attach(ui)
        chat.line("/msg bob are you there?")
        before = len(ui.shown)
        chat.line("/quit")
        clock.advance(pager.QUIT_WAIT - 0.1)
        self.assertFalse(session.closed)
        self.assertFalse(chat.done.called)
        clock.advance(0.1)
        self.assertTrue(session.closed)
        self.assertTrue(chat.done.called)
        shown = ui.text(before)
        self.assertIn("a message being sent", shown)
        self.assertIn("stays on disk", shown)
        session.store.stalled.callback(1)  # the late answer changes nothing
        self.assertEqual(ui.text(before), shown)

    def test_quit_at_once_when_idle(self):
        """With nothing in flight /quit closes at once and says nothing more."""
        clock = task.Clock()
        session = _QuietSession()
        chat = pager.Chat(session, clock)
        ui = FakeUI()
        chat.attach(ui)
        before = len(ui.shown)
        chat.line("/quit")
        self.assertTrue(chat.done.called)
        self.assertEqual(ui.text(before), "")
        self.assertEqual(clock.getDelayedCalls(), [])
