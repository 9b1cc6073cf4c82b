"""
The interactive client: L{pager.Chat} driven line by line through a fake screen with a real L{pager.Session} against
a real in-process server; the file-name helpers; and C{pager.py connect} in a pseudo-terminal.
"""

import io
import os
import stat
import sys

from twisted.internet import reactor, task
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

    async def chat_as(self, name="alice", pins=(), registered=False, no_history=False):
        """
        Start C{name}'s chat: returns C{(chat, ui)}.  C{pins} names users whose module key is pinned in C{name}'s
        local store before the session starts.
        """
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("PAGER_")})
        if not hasattr(self, "server"):
            await self.serve()
        if registered:
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

    async def test_name_then_text(self):
        """A name, Enter, then the text: bob gets it from alice; the prompt says who the next line is for."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        self.assertEqual(ui.prompt, "to> ")
        self.assertIn("Logged in as alice", ui.text())
        chat.line("bob")
        self.assertEqual(ui.prompt, "bob> ")
        await self.type(chat, "hello")
        self.assertEqual(ui.prompt, "to> ")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        [message] = bob.events.messages
        self.assertOpened(message, "alice", b"hello", recipients=["bob"])

    async def test_msg_to_two(self):
        """/msg bob,carol TEXT sends one message to both."""
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/msg bob,carol hi")
        await self.wait_for(lambda: bob.events.messages and carol.events.messages, "both messages")
        for client in (bob, carol):
            [message] = client.events.messages
            self.assertOpened(message, "alice", b"hi", recipients=["bob", "carol"])
        self.assertEqual(bob.events.messages[0].message_id, carol.events.messages[0].message_id)

    async def test_paste(self):
        """/paste NAME, some lines, then '.' sends the lines as one message."""
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

    async def test_empty_line_cancels(self):
        """An empty line at the message prompt cancels: nothing is sent."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        chat.line("bob")
        await self.type(chat, "")
        self.assertEqual(ui.prompt, "to> ")
        self.assertIn("cancelled", ui.text())
        await self.type(chat, "/msg bob after the cancel")
        await self.wait_for(lambda: bob.events.messages, "the next message")
        self.assertEqual([m.plaintext for m in bob.events.messages], [b"after the cancel"])

    async def test_unknown_command(self):
        """/nope says it is unknown and sends nothing."""
        await self.serve()
        chat, ui = await self.chat_as("alice")
        before = len(ui.shown)
        await self.type(chat, "/nope")
        self.assertIn("Unknown command /nope", ui.text(before))
        self.assertEqual(ui.prompt, "to> ")
        before = len(ui.shown)
        await self.type(chat, "help")
        for word in ("/msg", "/paste", "/file", "users", "history", "fingerprint", "trust", "whoami", "quit"):
            self.assertIn(word, ui.text(before))

    async def test_receipt_after_quit(self):
        """
        A receipt the client had already queued when the user quit is dropped quietly (the server keeps it for next
        time): handling it must not fail on the closed local store.
        """
        await self.serve()
        chat, ui = await self.chat_as("alice")
        client = chat.session.client
        chat.line("quit")
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
        self.assertEqual(registered, "registered: %s (151 in all; more: users %s)"
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
        await self.type(chat, "whoami")
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
        await self.type(chat, "fingerprint")
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("alice"))), ui.text(before))

        bob_fp = pager.format_fingerprint(pager.fingerprint(key("bob")))
        before = len(ui.shown)
        await self.type(chat, "fingerprint bob")
        self.assertIn(bob_fp, ui.text(before))
        self.assertIn("not pinned", ui.text(before))

        await self.type(chat, "/msg bob pin it")
        before = len(ui.shown)
        await self.type(chat, "fingerprint bob")
        self.assertIn(bob_fp, ui.text(before))
        self.assertIn("(pinned)", ui.text(before))

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
        await self.type(chat, "history bob")
        shown = ui.text(before)
        self.assertIn("-> bob: how are you", shown)
        self.assertIn("<- bob: fine, and you", shown)
        self.assertLess(shown.index("how are you"), shown.index("fine, and you"))
        before = len(ui.shown)
        await self.type(chat, "history carol")
        self.assertIn("No history with carol", ui.text(before))

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
        await self.type(chat, "history")
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
        self.assertIn("trust bob", shown)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), shown)
        self.assertEqual(await self.pending(server, "bob"), [])
        self.assertEqual(bob.events.messages, [])

        before = len(ui.shown)
        await self.type(chat, "fingerprint bob")
        shown = ui.text(before)
        self.assertIn("CHANGED", shown)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(key("bob"))), shown)
        self.assertIn(pager.format_fingerprint(pager.fingerprint(new_key)), shown)

        before = len(ui.shown)
        await self.type(chat, "trust bob")
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
        await self.type(chat, "history bob")
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


class ChatConnectionTests(ChatTestCase):
    """Messages waiting at login are shown; a dropped connection is re-established."""

    async def test_waiting_message_shown_at_login(self):
        await self.serve()
        bob = await self.peer("bob")
        await self.account("alice")
        await bob.send("alice", "while you were away")
        chat, ui = await self.chat_as_registered("alice")
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
        plain.dataReceived(b"bob\r\nhello from a pipe\n")
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
                                  stdin=b"bob\nhello via a pipe\n/msg bob and a second line\n")
        self.assertExit(result, 0)
        self.assertIn("Logged in as alice", result.out)
        self.assertNotIn("Traceback", result.err)
        await self.wait_for(lambda: len(bob.events.messages) == 2, "both piped messages")
        self.assertEqual(sorted(m.plaintext for m in bob.events.messages),
                         [b"and a second line", b"hello via a pipe"])

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
