"""
Groups in the terminal UI and the command line: the lines that describe groups, their changes, ticks and /info
(pure functions, with a L{task.Clock} for the ticks), the chat's group commands with a real L{pager.Session} against
a real in-process server, and C{pager-cli group}, C{groups}, C{send --to '#ops'} and C{fetch} end to end.
"""

import io
import json

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial import unittest

import pager
from tests.test_output import evil, harmful
from tests.test_cli import CLITestCase
from tests.test_e2e import key as pager_key, token as pager_token
from tests.test_terminal import ChatTestCase

GID = bytes(range(16)).hex()


def info(name="ops", members=("alice", "bob", "carol"), admins=("alice",), topic="", seq=1, member=True, unread=0,
         broken=None, gid=GID):
    """A L{pager.GroupInfo} as the client makes one."""
    return pager.GroupInfo(gid, name, topic, seq, b"\0" * 32, tuple(members), tuple(sorted(admins)), member, unread,
                           broken)


def event(kind, actor="alice", users=(), name="ops", text=""):
    """A L{pager.GroupEvent} as the client makes one."""
    return pager.GroupEvent(GID, name, 2, kind, actor, tuple(users), text, 0.0)


class Lines:
    def __init__(self):
        self.shown = []
        self.out = pager.SafeWriter(self)

    def write(self, text):
        self.shown.append(text)

    def show(self, text):
        self.out.write(text)


class DescribeGroupTests(unittest.SynchronousTestCase):
    """The words of membership changes, of /group info and of /groups."""

    def test_changes(self):
        """Every kind of change reads as the spec's line, the user's own name as 'you'."""
        cases = [
            (event("create", users=("bob", "carol")), "alice created #ops with bob, carol"),
            (event("create"), "alice created #ops"),
            (event("add", users=("carol",)), "alice added carol"),
            (event("add", users=("carol", "dave")), "alice added carol, dave"),
            (event("remove", users=("carol",)), "carol was removed by alice"),
            (event("remove", users=("carol", "dave")), "carol, dave were removed by alice"),
            (event("leave", actor="bob"), "bob left"),
            (event("rename", name="ops2", text="ops"), "alice renamed #ops to #ops2"),
            (event("topic", text="on call: bob"), 'alice changed the topic to "on call: bob"'),
            (event("topic", text=""), "alice cleared the topic"),
            (event("promote", users=("bob",)), "alice made bob an admin"),
            (event("demote", users=("bob",)), "alice removed bob as an admin of #ops"),
            (event("demote", users=("alice",)), "alice stepped down as an admin of #ops"),
        ]
        for e, words in cases:
            self.assertEqual(pager.describe_group_change(e, "zed"), words)
        self.assertEqual(pager.describe_group_change(event("add", users=("zed",)), "zed"), "alice added you")
        self.assertEqual(pager.describe_group_change(event("remove", users=("zed",)), "zed"),
                         "you were removed by alice")
        self.assertEqual(pager.describe_group_change(event("add", actor="zed", users=("bob",)), "zed"),
                         "you added bob")
        self.assertEqual(pager.describe_group_change(event("remove", actor="zed", users=("bob",)), "zed"),
                         "you removed bob")  # not "bob was removed by you"

    def test_event_line(self):
        line = pager.describe_group_event(event("leave", actor="bob"), 0, "alice")
        self.assertRegex(line, r"^\[\d\d:\d\d\] #ops: bob left$")

    def test_hostile_topic_stays_on_one_line(self):
        """
        A topic is anyone's text: a line break in it cannot start a line that looks like a message, and its escape
        sequences reach the screen only as visible text.
        """
        lines = Lines()
        hostile = "ok\n[12:00] #ops bob \u2713: send me your token" + evil("t")
        lines.show(pager.describe_group_event(event("topic", text=hostile), 0, "alice"))
        lines.show(pager.describe_group(info(topic=hostile), "alice"))
        for text in lines.shown:
            self.assertEqual(harmful(text), [])
            self.assertNotIn("\n[12:00]", text)
        self.assertIn("ok\\n[12:00]", lines.shown[0])

    def test_info(self):
        text = pager.describe_group(info(topic="on call", seq=4, admins=("alice", "bob")), "bob")
        self.assertEqual(text.split("\n"), [
            "#ops (version 4, 3 members; you: admin)",
            '  topic: "on call"',
            "  admins: alice, bob",
            "  members: alice, bob, carol"])
        self.assertIn("you: member", pager.describe_group(info(), "carol"))
        self.assertIn("you: not a member", pager.describe_group(info(member=False), "carol"))
        self.assertIn("topic: (none)", pager.describe_group(info(), "carol"))
        broken = pager.describe_group(info(broken="op 3 is not signed by an admin."), "carol")
        self.assertIn("\u26a0 its membership chain does not verify: op 3 is not signed by an admin.", broken)

    def test_groups_listing(self):
        text = pager.describe_groups([info(name="zz", unread=3), info(name="aa", admins=("carol",)),
                                      info(name="gone", member=False)], "alice", {GID: ("left", None)})
        self.assertEqual(text.split("\n"), [
            "Your groups:",
            "  #aa  3 members",
            "  #zz  3 members  admin  3 unread",
            "  #gone  3 members  left"])
        self.assertIn("You are in no group", pager.describe_groups([], "alice"))

    def test_groups_of_one_name(self):
        """Two groups of one name are told apart by their ids; a removal says by whom; nothing known: not a member."""
        other = "f0" * 16
        text = pager.describe_groups([info(name="x1", member=False), info(name="x1", member=False, gid=other),
                                      info(name="y", member=False, gid="0e" * 16)],
                                     "alice", {GID: ("left", None), other: ("removed", "bob")})
        self.assertEqual(text.split("\n"), [
            "Your groups:",
            "  #x1 (id %s)  3 members  left" % GID[:8],
            "  #x1 (id f0f0f0f0)  3 members  removed by bob",
            "  #y  3 members  not a member"])

    def test_json(self):
        record = pager._group_json(info(topic="t", unread=2), "alice")
        self.assertEqual(record, {"id": GID, "name": "ops", "topic": "t", "version": 1,
                                  "members": ["alice", "bob", "carol"], "admins": ["alice"], "member": True,
                                  "admin": True, "unread": 2, "broken": None})
        json.dumps(record)


class GroupTicksTests(unittest.SynchronousTestCase):
    """A group message's receipts become one tick line per second at most, and ✓✓ at once when all have it."""

    def setUp(self):
        self.clock = task.Clock()
        self.lines = []
        self.ticks = pager.GroupTicks(self.lines.append, self.clock)

    def test_coalesced(self):
        """Three receipts within a second are one line, 3/5; the fourth a second later is the next line."""
        for n in (1, 2, 3):
            self.ticks.delivered("m1", "ops", n, 5, 12, '"disk full"')
            self.clock.advance(0.2)
        self.assertEqual(self.lines, [])
        self.clock.advance(0.4)
        self.assertEqual(len(self.lines), 1)
        self.assertRegex(self.lines[0], r'^\[\d\d:\d\d\] \u2713 3/5 #12 "disk full" in #ops$')
        self.ticks.delivered("m1", "ops", 4, 5, 12, '"disk full"')
        self.clock.advance(0.999)
        self.assertEqual(len(self.lines), 1)
        self.clock.advance(0.001)
        self.assertRegex(self.lines[1], r"\u2713 4/5 #12")

    def test_all_at_once(self):
        """The last member's receipt shows ✓✓ 5/5 at once, and the pending 4/5 line never comes."""
        for n in (1, 2, 3, 4, 5):
            self.ticks.delivered("m1", "ops", n, 5, 12, None)
        self.assertEqual(len(self.lines), 1)
        self.assertRegex(self.lines[0], r"^\[\d\d:\d\d\] \u2713\u2713 5/5 #12 in #ops$")
        self.clock.advance(5)
        self.assertEqual(len(self.lines), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_never_backwards(self):
        """A count that did not grow (a receipt seen again) shows nothing."""
        self.ticks.delivered("m1", "ops", 2, 5, 1, None)
        self.clock.advance(1)
        self.ticks.delivered("m1", "ops", 2, 5, 1, None)
        self.ticks.delivered("m1", "ops", 1, 5, 1, None)
        self.clock.advance(2)
        self.assertEqual(len(self.lines), 1)

    def test_messages_apart(self):
        """Two messages' receipts are counted apart."""
        self.ticks.delivered("m1", "ops", 1, 2, 1, None)
        self.ticks.delivered("m2", "dev", 1, 3, 2, None)
        self.clock.advance(1)
        self.assertEqual(sorted(line.split("] ")[1] for line in self.lines),
                         ["\u2713 1/2 #1 in #ops", "\u2713 1/3 #2 in #dev"])

    def test_close_shows_what_waits(self):
        self.ticks.delivered("m1", "ops", 1, 2, 1, None)
        self.ticks.close()
        self.assertEqual(len(self.lines), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DescribeDeliveryTests(unittest.SynchronousTestCase):
    """/info: delivered, refused and waiting members."""

    def test_lines(self):
        text = pager.describe_group_delivery(
            "ops", ["bob", "carol", "dave", "erin"],
            {"bob": ("delivered", 0), "carol": ("rejected", 0, "bad\nline"), "zed": ("delivered", 0)},
            12, '"disk full"')
        lines = text.split("\n")
        self.assertEqual(lines[0], 'Your message #12 "disk full" to #ops: 1 of 4 have it.')
        self.assertRegex(lines[1], r"^  delivered: bob \d\d:\d\d$")
        self.assertRegex(lines[2], r"^  refused: carol \d\d:\d\d \(bad\\nline\)$")
        self.assertEqual(lines[3], "  waiting: dave, erin")
        self.assertEqual(len(lines), 4)

    def test_login_summary_names_the_group(self):
        """The summary of receipts at login names a group message's group, not only the member who has it."""
        def receipt(peer, status="delivered", reason=""):
            return pager.DeliveryReceipt(1, "ab" * 16, peer, status, reason, 0.0)
        line = pager.summarise_receipts([(receipt("frank"), 1, None, "ops"), (receipt("bob"), 2, None),
                                         (receipt("carol", "rejected", "no key"), 3, None, "ops")], 0.0)
        self.assertIn("2 delivered (#1 in #ops to frank, #2 to bob), 1 could not be opened (#3 in #ops by carol: "
                      "no key)", line)


class GroupOptionsTests(unittest.SynchronousTestCase):
    """pager-cli group and groups parse their actions; send --to takes one '#group'."""

    def parse(self, *argv):
        options = pager.Options()
        options.parseOptions(list(argv))
        return options.subOptions

    def test_actions(self):
        config = self.parse("group", "h", "create", "#ops", "bob", "carol", "--user", "alice")
        self.assertEqual((config["action"], config["group"], config["args"]), ("create", "#ops", ["bob", "carol"]))
        config = self.parse("group", "h", "admin", "ops", "bob", "--off", "--user", "alice")
        self.assertTrue(config["off"])
        config = self.parse("group", "h", "topic", "ops", "", "--user", "alice")
        self.assertEqual(config["args"], [""])
        self.assertTrue(self.parse("group", "h", "info", "ops", "--json", "-u", "a")["json"])

    def test_usage_errors(self):
        for argv in (["group", "h"], ["group", "h", "create"], ["group", "h", "frob", "ops"],
                     ["group", "h", "leave", "ops", "bob"], ["group", "h", "rename", "ops"],
                     ["group", "h", "rename", "ops", "a", "b"], ["group", "h", "add", "ops"],
                     ["group", "h", "topic", "ops", "a", "b"], ["group", "h", "admin", "ops"],
                     ["group", "h", "add", "ops", "bob", "--off"], ["group", "h", "add", "ops", "bob", "--json"],
                     ["groups"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_send_to_group(self):
        config = self.parse("send", "h", "--to", "#Ops", "hi", "-u", "alice")
        self.assertEqual((config["group"], config["to"]), ("ops", ["#ops"]))
        config = self.parse("send", "h", "--to", "bob,carol", "hi", "-u", "alice")
        self.assertEqual((config["group"], config["to"]), (None, ["bob", "carol"]))
        for to in ("#ops,bob", "#ops,#dev", "#", "#bad name"):
            self.assertRaises(usage.UsageError, self.parse, "send", "h", "--to", to, "hi", "-u", "alice")

    def test_exit_codes(self):
        self.assertEqual(pager.exit_code(pager.UnknownGroup("no")), pager.EXIT_USAGE)
        self.assertEqual(pager.exit_code(pager.GroupRefused("no")), pager.EXIT_AUTH)
        self.assertEqual(pager.exit_code(pager.GroupFull("no")), pager.EXIT_AUTH)


class DescribeGroupMessageTests(unittest.SynchronousTestCase):
    """How a group message is shown: received, and sent from another of the user's devices."""

    def message(self, **kwargs):
        fields = dict(message_id=b"\1" * 16, sender="alice", sender_fingerprint=b"\0" * 32,
                      recipients=("alice", "bob", "carol"), timestamp=0.0, content_type="text", filename="",
                      plaintext=bytearray(b"disk full"), accepted_at=0.0, group_id=bytes.fromhex(GID),
                      group_name="ops")
        fields.update(kwargs)
        return pager.OpenedMessage(**fields)

    def test_received(self):
        self.assertRegex(pager.describe_message(self.message()), r"^\[\d\d:\d\d\] #ops alice \u2713: disk full$")
        self.assertRegex(pager.describe_message(self.message(), elsewhere=True),
                         r"^\[\d\d:\d\d\] \u00bb #ops alice \u2713: disk full$")

    def test_windows_lines(self):
        """A text with CRLF line ends is shown as lines, with no control character left at their ends."""
        text = pager.describe_message(self.message(plaintext=bytearray(b"disk full\r\non /var\r\n")))
        self.assertRegex(text, r"#ops alice \u2713:\n    disk full\n    on /var$")

    def test_file_of_one_byte(self):
        text = pager.describe_message(self.message(content_type="file", filename="x", plaintext=bytearray(b"1")),
                                      saved_path="/tmp/x")
        self.assertIn("the file x (1 byte), saved as /tmp/x", text)

    def test_changed_key(self):
        """A changed key's warning ends before the text: the text is not read as part of its /trust hint."""
        self.assertRegex(pager.describe_message(self.message(key_status="changed")),
                         r"^\[\d\d:\d\d\] #ops alice \u26a0 KEY CHANGED, NOT VERIFIED \(see /fingerprint alice, "
                         r"then /trust alice\): disk full$")

    def test_note(self):
        text = pager.describe_message(self.message(group_note="sealed for version 5 of #ops; yours is 7"))
        self.assertRegex(text, r"#ops alice \u2713 \(sealed for version 5 of #ops; yours is 7\): disk full$")

    def test_own_other_device(self):
        text = pager.describe_message(self.message(), sent_from="'laptop'")
        self.assertRegex(text, r"^\[\d\d:\d\d\] you \(on 'laptop'\) \u2192 #ops: disk full$")

    def test_one_to_one_unchanged(self):
        text = pager.describe_message(self.message(group_id=None, group_name=None, recipients=("bob",)))
        self.assertRegex(text, r"^\[\d\d:\d\d\] alice \u2713 disk full$")


class GroupChatTestCase(ChatTestCase):
    """A chat and peers that record their group events."""

    async def peer(self, name):
        """An in-process client for C{name}, registered and receiving, recording its group events."""
        client = await self.register(self.address, name)
        client.group_events = []
        client.on_group_event = client.group_events.append
        return client

    async def type(self, chat, *lines):
        for line in lines:
            chat.line(line)
            await self.idle(chat)

    async def shown(self, ui, text, since=0):
        """Wait until C{text} is on the chat's screen (after line C{since}); returns the screen's text since then."""
        await self.wait_for(lambda: text in ui.text(since), repr(text) + " on the screen")
        return ui.text(since)


class GroupChatTests(GroupChatTestCase):
    """The chat's group commands and lines, with a real session against a real in-process server."""

    async def test_create_talk_and_ticks(self):
        """
        /group create makes #ops; /to #ops opens it (prompt #ops> ); each line goes to every member; the receipts
        become one tick line, then ✓✓ 2/2; /info lists who has it.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/group create ops bob carol")
        self.assertRegex(ui.text(), r"\[\d\d:\d\d\] #ops: you created #ops with bob, carol")
        self.assertNotIn("Created #ops", ui.text())  # the change's own line says it: not twice
        await self.type(chat, "/to #ops")
        self.assertEqual((chat.conversation, ui.prompt), ("#ops", "#ops> "))
        self.assertIn("Talking in #ops", ui.text())
        await self.type(chat, "hello all")
        await self.wait_for(lambda: bob.events.messages and carol.events.messages, "the message at bob's and carol's")
        for client in (bob, carol):
            [message] = client.events.messages
            self.assertEqual((message.sender, bytes(message.plaintext), message.group_name),
                             ("alice", b"hello all", "ops"))
        text = await self.shown(ui, "\u2713\u2713 2/2")
        self.assertRegex(text, r'\u2713\u2713 2/2 #\d+ "hello all" in #ops')
        before = len(ui.shown)
        await self.type(chat, "/info")
        info_text = ui.text(before)
        self.assertIn("to #ops: 2 of 2 have it.", info_text)
        self.assertRegex(info_text, r"delivered: bob \d\d:\d\d, carol \d\d:\d\d")
        before = len(ui.shown)
        await self.type(chat, "/history #ops")
        self.assertIn("-> #ops: hello all", ui.text(before))
        before = len(ui.shown)
        await self.type(chat, "/whoami")  # the conversation is a group's, not a user's to look a key up for
        self.assertIn("Talking in #ops, with bob, carol.", ui.text(before))

    async def test_waiting_member_and_partial_tick(self):
        """With carol offline, the tick stops at 1/2 and /info says carol is waited for."""
        server = await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/group create ops bob carol")
        await self.offline(server, carol)
        await self.type(chat, "/msg #ops one for the log")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        text = await self.shown(ui, "\u2713 1/2")
        self.assertNotIn("\u2713\u2713", text)
        self.assertIn("carol is offline", text)
        before = len(ui.shown)
        await self.type(chat, "/info")
        self.assertIn("1 of 2 have it", ui.text(before))
        self.assertIn("waiting: carol", ui.text(before))

    async def test_info_in_a_later_chat(self):
        """
        /info #REF finds a group message sent in an earlier chat on this machine, with a refusal's reason (carol,
        removed while it waited for her); /info alone names the last one sent from here.
        """
        server = await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/group create ops bob carol")
        await self.offline(server, carol)
        await self.type(chat, "/msg #ops before the change")
        await self.shown(ui, "\u2713 1/2")
        await self.type(chat, "/group remove ops carol")
        [msg] = chat.outbox.sent

        async def refused():
            _, _, receipts = await chat.session.client.group_delivery(msg)
            return "carol" in receipts
        await self.wait_for(refused, "carol's refusal")
        await self.stop_chat(chat)
        chat, ui = await self.chat_as("alice", home=self.home_of_chat)
        for command in ("/info #1", "/info"):
            before = len(ui.shown)
            await self.type(chat, command)
            text = ui.text(before)
            self.assertIn('Your message #1 "before the change" to #ops: 1 of 2 have it.', text)
            self.assertRegex(text, r"refused: carol \d\d:\d\d \(.*removed.*\)")
        before = len(ui.shown)
        await self.type(chat, "/info #7")
        self.assertIn("#7 is not a group message you sent from here (or the server has not taken it yet).",
                      ui.text(before))

    async def test_incoming_lines_and_unread(self):
        """
        bob's group and its messages reach alice's screen as #ops lines; while another conversation is open they
        count as unread in /groups, until /to #ops.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/to carol")
        await bob.group_create("ops", ["alice", "carol"])
        await self.shown(ui, "#ops: bob created #ops with you, carol")
        gid = (await bob.group("ops")).id
        await bob.send_group(gid, "first")
        await bob.send_group(gid, "second")
        text = await self.shown(ui, "second")
        self.assertRegex(text, r"\u00bb #ops bob \u2713: first")
        await self.wait_for(lambda: self._unread(chat, 2), "two unread")
        before = len(ui.shown)
        await self.type(chat, "/groups")
        self.assertIn("#ops  3 members  2 unread", ui.text(before))
        await self.type(chat, "/to #ops")
        self.assertEqual(ui.prompt, "#ops> ")
        before = len(ui.shown)
        await self.type(chat, "/groups")
        self.assertNotIn("unread", ui.text(before))
        await bob.send_group(gid, "third")
        text = await self.shown(ui, "third")
        self.assertRegex(text, r"\] #ops bob \u2713: third")  # no \u00bb: the open conversation
        self.assertEqual((await chat.session.client.group("ops")).unread, 0)

    async def test_history_reads_a_group_left(self):
        """
        /history #ops reads what #ops holds, so its unread count goes to 0: for a group alice was removed from,
        which /to #ops no longer opens, it is the one way to clear that count.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("ops", ["alice"])
        gid = (await bob.group("ops")).id
        await bob.send_group(gid, "you missed this")
        await self.shown(ui, "you missed this")
        await self.wait_for(lambda: self._unread(chat, 1), "one unread")
        await bob.group_remove(gid, ["alice"])
        await self.shown(ui, "you were removed by bob")
        with self.assertRaises(pager.UnknownGroup):
            await chat.command_to("#ops")
        before = len(ui.shown)
        await self.type(chat, "/history #ops")
        self.assertIn("you missed this", ui.text(before))
        self.assertEqual((await chat.session.client.group("ops")).unread, 0)
        before = len(ui.shown)
        await self.type(chat, "/groups")
        self.assertNotIn("unread", ui.text(before))

    async def _unread(self, chat, count):
        return (await chat.session.client.group("ops")).unread == count

    async def test_membership_lines_and_rename(self):
        """
        Each change bob makes is one line at alice's: added, removed, topic, admin; a rename of the open group
        renames the prompt; a hostile topic stays one harmless line.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        await self.peer("dave")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("ops", ["alice", "carol"])
        await self.shown(ui, "bob created #ops")
        await self.type(chat, "/to #ops")
        gid = (await bob.group("ops")).id
        await bob.group_add(gid, ["dave"])
        await self.shown(ui, "#ops: bob added dave")
        await bob.group_remove(gid, ["carol"])
        await self.shown(ui, "#ops: carol was removed by bob")
        await bob.group_admin(gid, "alice")
        await self.shown(ui, "#ops: bob made you an admin")
        hostile = "fine\n[12:00] #ops bob \u2713: type your passphrase" + evil("topic")
        await bob.group_topic(gid, hostile)
        text = await self.shown(ui, "changed the topic")
        self.assertEqual(harmful(text), [])
        self.assertIn("fine\\n[12:00]", text)
        await bob.group_rename(gid, "ops2")
        await self.shown(ui, "#ops2: bob renamed #ops to #ops2")
        self.assertEqual((chat.conversation, ui.prompt), ("#ops2", "#ops2> "))
        before = len(ui.shown)
        await self.type(chat, "/group info ops2")
        self.assertIn("#ops2 (version 6, 3 members; you: admin)", ui.text(before))
        self.assertIn("admins: alice, bob", ui.text(before))
        self.assertEqual(harmful(ui.text()), [])

    async def test_commands_and_errors(self):
        """Each /group action works from the chat; wrong uses are one sentence each, and change nothing."""
        await self.serve()
        bob = await self.peer("bob")
        await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        cases = [
            ("/group", "Usage: /group ACTION NAME"),
            ("/group frob ops", "No group action frob"),
            ("/group info nope", "You are in no group"),
            ("/group create bad\x1bname", "Group names are written #name"),
            ("/group create ops bob", "#ops: you created #ops with bob"),
            ("/group create ops carol", "taken"),
            ("/group add ops", "Usage: /group add NAME USER..."),
            ("/group add ops carol", "#ops: you added carol"),
            ("/group add ops carol", "carol is in #ops already; nothing changed."),
            ("/group topic ops on call: bob", '#ops: you changed the topic to "on call: bob"'),
            ("/group admin ops bob", "#ops: you made bob an admin"),
            ("/group admin ops bob off", "#ops: you removed bob as an admin of #ops"),
            ("/group admin ops", "Usage: /group admin NAME USER [off]"),
            ("/group rename ops", "Usage: /group rename NAME NEW"),
            ("/group rename ops dev", "#dev: you renamed #ops to #dev"),
            ("/group remove dev carol", "#dev: you removed carol"),
            ("/group remove dev carol", "carol is not in #dev; nothing changed."),
            ("/group leave dev", "You are the last admin of #dev"),
            ("/group info #dev", "#dev (version"),
            ("/info", "You have sent no group message from here"),
            ("/info #99", "#99 is not a group message"),
            ("/to #nope", "You are in no group #nope"),
            ("/msg #dev,bob hi", "one group or to users, not both"),
        ]
        for line, expected in cases:
            before = len(ui.shown)
            await self.type(chat, line)
            self.assertIn(expected, ui.text(before), line)
        self.assertEqual(ui.prompt, "to> ")
        info = await chat.session.client.group("dev")
        self.assertEqual((info.members, info.admins, info.topic), (("alice", "bob"), ("alice",), "on call: bob"))
        await self.wait_for(lambda: self._member_of(bob, "dev"), "bob's client to see #dev")

    async def _member_of(self, client, name):
        try:
            return client.user in (await client.group(name)).members
        except pager.UnknownGroup:
            return False

    async def test_help_lists_group_commands(self):
        await self.serve()
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/help")
        for word in ("/to #GROUP", "/groups", "/group create", "/group add|remove", "/group leave", "/group rename",
                     "/group topic", "/group admin NAME USER [off]", "/group info", "/info [#REF]"):
            self.assertIn(word, ui.text())

    async def test_left_group_closes_conversation(self):
        """Being removed from the open group closes its conversation: what is typed then goes nowhere."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("ops", ["alice"])
        await self.shown(ui, "bob created #ops")
        await self.type(chat, "/to #ops")
        await bob.group_remove((await bob.group("ops")).id, ["alice"])
        await self.shown(ui, "you were removed by bob")
        await self.shown(ui, "You are no longer in #ops")
        self.assertEqual((chat.conversation, ui.prompt), (None, "to> "))


class GroupCommandTests(CLITestCase):
    """pager-cli group, groups, send --to '#ops' and fetch, in-process over loopback."""

    async def cli(self, home, user, *argv, code=0):
        result = await self.run_command(*argv, "--user", user, home=home, token_of=user)
        self.assertExit(result, code)
        if code:
            self.assertOneErrorLine(result, code)
        return result

    async def test_group_end_to_end(self):
        """Every action from the command line, then a group message sent with --to '#ops' and fetched."""
        await self.serve()
        alice, bob = await self.provision("alice"), await self.provision("bob")
        await self.account("carol")
        result = await self.cli(alice, "alice", "group", "HOST", "create", "#ops", "bob")
        self.assertEqual(result.out, "Created #ops with bob; you are its admin.\n")
        result = await self.cli(alice, "alice", "group", "HOST", "add", "ops", "carol")
        self.assertEqual(result.out, "Added carol to #ops.\n")
        result = await self.cli(alice, "alice", "group", "HOST", "topic", "ops", "on call: bob")
        self.assertEqual(result.out, 'The topic of #ops is now "on call: bob".\n')
        result = await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "bob")
        self.assertEqual(result.out, "bob is now an admin of #ops.\n")
        result = await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "bob", "--off")
        self.assertEqual(result.out, "bob is no longer an admin of #ops.\n")
        result = await self.cli(alice, "alice", "group", "HOST", "info", "ops", "--json")
        record = json.loads(result.out)
        self.assertEqual({k: record[k] for k in ("name", "topic", "version", "members", "admins", "member", "admin")},
                         {"name": "ops", "topic": "on call: bob", "version": 5,
                          "members": ["alice", "bob", "carol"], "admins": ["alice"], "member": True, "admin": True})
        gid = record["id"]
        result = await self.cli(alice, "alice", "group", "HOST", "info", "ops")
        self.assertIn("#ops (version 5, 3 members; you: admin)", result.out)
        result = await self.cli(bob, "bob", "groups", "HOST", "--json")
        [listed] = json.loads(result.out)["groups"]
        self.assertEqual((listed["id"], listed["name"], listed["admin"]), (gid, "ops", False))
        result = await self.cli(bob, "bob", "groups", "HOST")
        self.assertIn("#ops  3 members", result.out)

        result = await self.cli(alice, "alice", "send", "HOST", "--to", "#ops", "disk full")
        msg = result.out.strip()
        self.assertRegex(msg, "^[0-9a-f]{32}$")
        result = await self.cli(bob, "bob", "fetch", "HOST")
        self.assertRegex(result.out, r"^\[\d\d:\d\d\] #ops alice \u2713.*: disk full\n$")
        await self.cli(alice, "alice", "send", "HOST", "--to", "#OPS", "second")
        result = await self.cli(bob, "bob", "fetch", "HOST", "--json")
        record = json.loads(result.out)
        self.assertEqual((record["text"], record["from"], record["group"]), ("second", "alice",
                                                                             {"id": gid, "name": "ops"}))

        result = await self.cli(alice, "alice", "group", "HOST", "remove", "ops", "carol")
        self.assertEqual(result.out, "Removed carol from #ops.\n")
        result = await self.cli(alice, "alice", "group", "HOST", "rename", "ops", "dev")
        self.assertEqual(result.out, "Renamed #ops to #dev.\n")
        result = await self.cli(bob, "bob", "group", "HOST", "leave", "dev")
        self.assertIn("You left #dev", result.out)

    async def test_exit_codes(self):
        """Each failure is one sentence with its documented code: 2 usage or unknown group, 3 refused."""
        await self.serve()
        alice, bob = await self.provision("alice"), await self.provision("bob")
        await self.cli(alice, "alice", "group", "HOST", "create", "ops", "bob")
        line = (await self.cli(alice, "alice", "group", "HOST", "info", "nope", code=2)).err
        self.assertIn("You are in no group named #nope", line)
        line = (await self.cli(bob, "bob", "group", "HOST", "remove", "ops", "alice", code=3)).err
        self.assertIn("admin", line)
        line = (await self.cli(alice, "alice", "group", "HOST", "leave", "ops", code=3)).err
        self.assertIn("You are the last admin of #ops", line)
        await self.cli(alice, "alice", "send", "HOST", "--to", "#ops,bob", "hi", code=2)
        await self.cli(alice, "alice", "send", "HOST", "--to", "#nope", "hi", code=2)
        await self.cli(alice, "alice", "group", "HOST", "frob", "ops", code=2)
        await self.cli(alice, "alice", "group", "HOST", "rename", "ops", "bad name!", code=2)
        await self.cli(alice, "alice", "group", "HOST", "create", "ops", code=1)  # the name is taken
        await self.cli(bob, "bob", "group", "HOST", "leave", "ops")
        line = (await self.cli(bob, "bob", "send", "HOST", "--to", "#ops", "hi", code=2)).err
        self.assertIn("you are no longer a member of #ops", line)

    async def test_added_by_a_rekeyed_admin(self):
        """
        frank, added to #ops by alice after she re-keyed, is no member here until he compares her new key: groups
        lists #ops as not verifying yet, and a send to it says why (exit 3), not that he is no longer a member.
        """
        await self.serve()
        frank = await self.provision("frank")
        alice, _ = await self.register(self.address, "alice"), await self.register(self.address, "bob")
        await alice.group_create("ops", ["bob"])
        await alice.rekey("alice", pager_token("alice"), pager_key("alice"), pager_key("alice-new"))
        await alice.group_add("ops", ["frank"])
        result = await self.cli(frank, "frank", "groups", "HOST")
        self.assertIn("#ops  \u26a0 does not verify yet (nothing is sent to it)", result.out)
        line = (await self.cli(frank, "frank", "send", "HOST", "--to", "#ops", "frank here", code=3)).err
        self.assertIn("Not sent: #ops's membership chain does not verify: version 2 (add by alice)", line)
        self.assertNotIn("no longer a member", line)

    async def test_help(self):
        for command, words in ((("group",), ["create", "add", "remove", "leave", "rename", "topic", "admin", "info",
                                             "--off", "--json", "--user", "identity"]),
                               (("groups",), ["--json", "--user", "unread"]),
                               (("send",), ["#GROUP", "'#NAME'"]),
                               ((), ["group", "groups"])):
            result = await self.run_command(*(command + ("--help",)), home=self.home())
            self.assertExit(result, 0)
            for word in words:
                self.assertIn(word, result.out, "%r missing from pager-cli %s --help" % (word, " ".join(command)))


class GroupChatMoreTests(GroupChatTestCase):
    """Ticks on the chat's clock, warnings, /r, /paste and /file to a group, and the group's history."""

    async def test_ticks_coalesced_on_the_chat_clock(self):
        """
        Three of five members' receipts within the chat's second are one line, ✓ 3/5, shown when its clock has
        moved on by a second and not before; the two members offline are waited for.
        """
        await self.serve()
        peers = [await self.peer(name) for name in ("bob", "carol", "dave")]
        for name in ("erin", "frank"):
            await self.account(name)
        chat, ui = await self.chat_as("alice")
        clock = task.Clock()
        chat.reactor = clock
        chat.ticks = pager.GroupTicks(chat.show, clock)
        await self.type(chat, "/group create ops bob carol dave erin frank", "/msg #ops hi all")
        await self.wait_for(lambda: all(p.events.messages for p in peers), "the three online members' messages")
        [msg] = chat.outbox.sent

        async def three():
            _, _, receipts = await chat.session.client.group_delivery(msg)
            return len(receipts) == 3
        await self.wait_for(three, "three receipts")
        # Each is acknowledged once the chat has taken it: then all three are counted.
        await self.wait_for(lambda: self.server.store.pending_receipts("alice", 0).addCallback(lambda rs: not rs),
                            "alice's receipts to be taken")
        self.assertNotIn("3/5", ui.text())
        clock.advance(0.999)
        self.assertNotIn("3/5", ui.text())
        clock.advance(0.001)
        [line] = [line for line in ui.shown if "/5" in line]
        self.assertRegex(line, r'^\[\d\d:\d\d\] \u2713 3/5 #1 "hi all" in #ops$')
        before = len(ui.shown)
        await self.type(chat, "/info #1")
        self.assertIn("3 of 5 have it", ui.text(before))
        self.assertIn("waiting: erin, frank", ui.text(before))

    async def test_warning_line(self):
        """A warning about a group is one line with ⚠ and the group's name, harmless whatever it says."""
        await self.serve()
        chat, ui = await self.chat_as("alice")
        chat.group_warning(GID, "ops", "the server lists eve as a member" + evil("w"))
        await self.shown(ui, "\u26a0 #ops: the server lists eve as a member")
        self.assertEqual(harmful(ui.text()), [])

    async def test_added_by_a_rekeyed_admin(self):
        """
        alice re-keyed, then added carol to #ops: carol's chain does not verify until she compares alice's new key.
        The warning and /to #ops name the group as its ops do, and /to says why nothing can be sent to it.
        """
        await self.serve()
        alice, bob = await self.peer("alice"), await self.peer("bob")
        await alice.group_create("ops", ["bob"])
        chat, ui = await self.chat_as("carol")
        await alice.rekey("alice", pager_token("alice"), pager_key("alice"), pager_key("alice-new"))
        await alice.group_add("ops", ["carol"])
        await self.shown(ui, "\u26a0 #ops: #ops's membership chain does not verify")
        before = len(ui.shown)
        await self.type(chat, "/to #ops")
        self.assertIn("#ops's membership chain does not verify: version 2 (add by alice)", ui.text(before))
        self.assertIn("Nothing can be sent to it; no conversation is open.", ui.text(before))
        self.assertNotIn("no longer a member", ui.text(before))
        self.assertIsNone(chat.conversation)

    async def test_trust_said_before_what_groups_say(self):
        """
        bob's #ops stopped at alice's new key; /trust alice says the key is trusted first, then what #ops says now
        (its new reason: compare it, then /verify).
        """
        await self.serve()
        alice, _ = await self.peer("alice"), await self.peer("carol")
        chat, ui = await self.chat_as("bob")
        await alice.group_create("ops", ["bob"])
        await self.shown(ui, "#ops: alice created #ops")
        await alice.rekey("alice", pager_token("alice"), pager_key("alice"), pager_key("alice-new"))
        await alice.group_add("ops", ["carol"])
        await self.shown(ui, "#ops's membership chain does not verify")
        before = len(ui.shown)
        await self.type(chat, "/trust alice")
        text = await self.shown(ui, "was not compared with alice", before)
        self.assertLess(text.index("Now trusting alice's key"), text.index("was not compared with alice"))

    async def test_change_shown_at_its_time(self):
        """
        A change made while this user was away shows the time its actor signed it, not when it came; one dated in
        the future (a wrong clock) shows when it came.
        """
        await self.serve()
        chat, ui = await self.chat_as("alice")
        now = chat.reactor.seconds()
        for at in (now - 7200, now + 3600):
            before = len(ui.shown)
            chat.group_event(pager.GroupEvent(GID, "ops", 2, "topic", "bob", (), "on call", at))
            [line] = ui.shown[before:]
            self.assertTrue(line.startswith("[%s] #ops: bob changed the topic" % pager._clock(min(at, now))), line)

    async def test_reply_paste_and_file_to_group(self):
        """/r after a group message opens the group; /paste #ops and /file #ops send to its members."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("ops", ["alice"])
        gid = (await bob.group("ops")).id
        await bob.send_group(gid, "anyone?")
        await self.shown(ui, "#ops bob \u2713: anyone?")
        await self.type(chat, "/r")
        self.assertEqual((chat.conversation, ui.prompt), ("#ops", "#ops> "))
        await self.type(chat, "/to")
        await self.type(chat, "/paste #ops", "line one", "line two", ".")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"report")
        await self.type(chat, "/file #ops %s" % path)
        await self.wait_for(lambda: len(bob.events.messages) == 2, "bob's two messages")
        first, second = bob.events.messages
        self.assertEqual((bytes(first.plaintext), first.group_name), (b"line one\nline two", "ops"))
        self.assertEqual((second.content_type, bytes(second.plaintext), second.group_name), ("file", b"report", "ops"))
        before = len(ui.shown)
        await self.type(chat, "/history #ops")
        text = ui.text(before)
        self.assertIn("<- bob in #ops: anyone?", text)
        self.assertIn("-> #ops: line one", text)
        before = len(ui.shown)
        await self.type(chat, "/history bob")
        self.assertNotIn("anyone?", ui.text(before))  # a group's messages are the group's history, not bob's


class GroupLinkedDeviceTests(GroupChatTestCase):
    """A linked device reads and posts to a group; its changes are refused; its messages show as sent elsewhere."""

    from tests.test_link import LinkedChatTests
    linked_chat = LinkedChatTests.linked_chat
    del LinkedChatTests

    async def test_linked_device(self):
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        laptop, laptop_ui = await self.linked_chat(chat)
        before = len(laptop_ui.shown)
        await self.type(laptop, "/group create ops bob")
        self.assertIn("Group changes are signed with your identity key: make them on your identity device.",
                      laptop_ui.text(before))
        await self.type(chat, "/group create ops bob")
        await self.shown(laptop_ui, "#ops: you created #ops with bob")  # the same user, another device
        await self.type(laptop, "/to #ops", "from the laptop")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertEqual(bob.events.messages[0].group_name, "ops")
        text = await self.shown(ui, "from the laptop")
        self.assertRegex(text, r"\[\d\d:\d\d\] you \(on 'laptop'\) \u2192 #ops: from the laptop")

    async def test_history_of_a_group_message_sent_elsewhere(self):
        """
        The other device's history of a group message sent from the laptop says where it was sent from and where
        to ask who has it: no member's receipt is taken for a count of who has it, nor shown as a line.
        """
        await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        laptop, laptop_ui = await self.linked_chat(chat)
        await self.type(chat, "/group create ops bob carol")
        await self.shown(laptop_ui, "#ops: you created #ops with bob, carol")
        await self.type(laptop, "/msg #ops from the laptop")
        await self.shown(laptop_ui, "\u2713\u2713 2/2")
        await self.wait_for(lambda: bob.events.messages and carol.events.messages, "both members' messages")
        await self.settle(chat)  # the receipts of both members have come to alice's identity device too
        before = len(ui.shown)
        await self.type(chat, "/history #ops")
        [line] = [line for line in ui.text(before).splitlines() if "from the laptop" in line]
        self.assertIn("-> #ops: from the laptop (sent from 'laptop', who has it: /info on that device)", line)
        self.assertNotIn("delivered to bob", ui.text())  # each member's receipt is no line here: the laptop counts
        self.assertNotIn("delivered to carol", ui.text())
        before = len(laptop_ui.shown)
        await self.type(laptop, "/history #ops")
        self.assertIn("-> #ops: from the laptop (delivered to 2 of 2)", laptop_ui.text(before))


    async def test_member_receipt_at_the_other_device(self):
        """
        A member's receipt of a group message the laptop sent, arriving while the laptop is off, is no line on the
        identity device: one member's receipt is no count of who has it (the laptop counts); the history keeps
        saying where to ask.
        """
        server = await self.serve()
        bob, carol = await self.peer("bob"), await self.peer("carol")
        chat, ui = await self.chat_as("alice")
        laptop, laptop_ui = await self.linked_chat(chat)
        await self.type(chat, "/group create ops bob carol")
        await self.shown(laptop_ui, "#ops: you created #ops with bob, carol")
        await self.offline(server, carol)
        await self.type(laptop, "/msg #ops while carol is away")
        await self.shown(laptop_ui, "\u2713 1/2")
        await self.shown(ui, "while carol is away")
        await self.stop_chat(laptop)
        before = len(ui.shown)
        carol = await self.login(self.address, "carol")
        await self.wait_for(lambda: carol.events.messages, "carol's message")
        await self.wait_for(lambda: server.store.pending_receipts("alice", 0).addCallback(lambda rs: not rs),
                            "alice's identity device to take carol's receipt")
        await self.settle(chat)
        self.assertNotIn("delivered to carol", ui.text(before))
        before = len(ui.shown)
        await self.type(chat, "/history #ops")
        self.assertIn("(sent from 'laptop', who has it: /info on that device)", ui.text(before))


class ChatOrderTests(GroupChatTestCase):
    """
    Lines are handled strictly in order, each once the one before is done; a /to that fails changes nothing; a
    /paste or /file to a group that cannot take a message fails before anything is taken for it.
    """

    async def test_piped_lines_in_order(self):
        """
        Piped '/to #dev2', a line and '/info': the conversation opens before the line is sent, and /info answers
        about that line, after it; '/groups' right after '/to #g' counts its messages read.  The end of input
        comes at once, and quits only once every line before it has been handled.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("dev2", ["alice"])
        gid = (await bob.group("dev2")).id
        await bob.send_group(gid, "one")
        await bob.send_group(gid, "two")
        await self.shown(ui, "#dev2 bob \u2713: two")
        await self.wait_for(lambda: self._unread(chat, "dev2", 2), "two unread in #dev2")
        out = io.StringIO()
        plain = pager.PlainChat(chat, out)
        plain.makeConnection(StringTransport())
        plain.dataReceived(b"/to #dev2\n/groups\nsecond pipe\n/info\n")
        plain.connectionLost(None)
        await self.wait_for(lambda: chat.done.called, "the chat to end once its lines are handled")
        text = out.getvalue()
        talking = text.index("Talking in #dev2")
        listed = text.index("Your groups:")
        waiting = text.index("\u23f3 #1 to #dev2")
        info_at = text.index('Your message #1 "second pipe" to #dev2')
        self.assertLess(talking, listed)
        self.assertLess(listed, waiting)
        self.assertLess(waiting, info_at)
        self.assertNotIn("unread", text[listed:waiting])
        self.assertNotIn("is not a group message", text)
        await self.wait_for(lambda: len(bob.events.messages) == 1, "bob's message")
        self.assertEqual(bytes(bob.events.messages[0].plaintext), b"second pipe")

    async def _unread(self, chat, name, count):
        return (await chat.session.client.group(name)).unread == count

    async def test_failed_to_keeps_the_conversation(self):
        """/to a group this user is not in, or left, keeps the conversation that was open (and its prompt)."""
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("x1", ["alice"])
        await self.shown(ui, "bob created #x1")
        await self.type(chat, "/group leave x1", "/to bob")
        for line, said in (("/to #x1", "You are no longer a member of #x1; the conversation with bob stays open"),
                           ("/to #nope", "You are in no group #nope; the conversation with bob stays open")):
            before = len(ui.shown)
            await self.type(chat, line)
            self.assertIn(said, ui.text(before))
            self.assertEqual((chat.conversation, chat.group, ui.prompt), ("bob", None, "bob> "))
        await bob.group_create("ops", ["alice"])
        await self.shown(ui, "bob created #ops")
        await self.type(chat, "/to #ops", "/to #x1")
        self.assertIn("the conversation in #ops stays open", ui.text())
        self.assertEqual((chat.conversation, ui.prompt), ("#ops", "#ops> "))

    async def test_quit_typed_behind_a_stalled_command(self):
        """
        A /quit typed while a command before it has not finished waits for it, but QUIT_WAIT at the most; a line
        that is not a /quit does not leave the chat however long it waits.
        """
        await self.serve()
        chat, ui = await self.chat_as("alice")
        clock = task.Clock()
        chat.reactor = clock
        stalled = defer.Deferred()

        async def command_stall(rest):
            await stalled
        chat.command_stall = command_stall
        chat.line("/stall")
        chat.line("not sent anywhere")
        clock.advance(pager.QUIT_WAIT * 2)
        self.assertFalse(chat.closing)
        chat.line("/quit")
        clock.advance(pager.QUIT_WAIT - 0.1)
        self.assertFalse(chat.closing)
        clock.advance(0.1)
        self.assertTrue(chat.closing)
        stalled.callback(None)
        await self.wait_for(lambda: chat.done.called, "the chat to end")
        self.assertNotIn("Not sent: no conversation is open", ui.text())  # dropped, not handled after the quit

    async def test_paste_and_file_check_the_group_first(self):
        """
        /paste to a group this user is not in (or left) says so at once, before a line is taken for it: the lines
        after it are not swallowed into a paste; /file to one says so before reading or announcing the file.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("x1", ["alice"])
        await self.shown(ui, "bob created #x1")
        await self.type(chat, "/group leave x1")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"report")
        for target, said in (("#nope", "You are in no group named #nope"),
                             ("#x1", "Not sent: you are no longer a member of #x1")):
            before = len(ui.shown)
            await self.type(chat, "/paste " + target)
            self.assertIn(said, ui.text(before))
            self.assertEqual((chat.pasting, ui.prompt), (None, "to> "))
            await self.type(chat, "a line after it", ".")
            self.assertIn("Not sent: no conversation is open", ui.text(before))  # not kept for a paste
            self.assertNotIn("Type the message for", ui.text(before))
            before = len(ui.shown)
            await self.type(chat, "/file %s %s" % (target, path))
            self.assertIn(said, ui.text(before))
            self.assertNotIn("Sending", ui.text(before))
        await bob.ping()
        self.assertEqual(bob.events.messages, [])


class GroupNoChangeChatTests(GroupChatTestCase):
    """
    A change that is so already is told, not claimed, and signs nothing; leaving a group one is not in, and making
    or unmaking an admin of a non-member, are refused with a sentence; topics clear with "" or no text.
    """

    async def test_no_change_is_said(self):
        await self.serve()
        await self.peer("bob")
        await self.peer("carol")
        await self.peer("dave")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/group create x1 bob carol", "/group admin x1 carol")
        await self.shown(ui, "#x1: you made carol an admin")
        client = chat.session.client
        version = (await client.group("x1")).seq
        cases = [
            ("/group admin x1 carol", "carol is an admin of #x1 already; nothing changed."),
            ("/group admin x1 bob off", "bob is not an admin of #x1; nothing changed."),
            ("/group admin x1 dave off", "dave is not a member of #x1."),
            ("/group admin x1 dave", "dave is not a member of #x1."),
            ("/group rename x1 x1", "#x1 is called #x1 already; nothing changed."),
            ("/group add x1 bob", "bob is in #x1 already; nothing changed."),
            ("/group remove x1 dave", "dave is not in #x1; nothing changed."),
            ("/group topic x1 \"\"", "#x1 has no topic already; nothing changed."),
            ("/group remove x1 alice", "You leave #x1 with /group leave x1, not remove."),
            ("/group remove x1 bob,alice", "You leave #x1 with /group leave x1, not remove."),
        ]
        for line, said in cases:
            before = len(ui.shown)
            await self.type(chat, line)
            self.assertIn(said, ui.text(before), line)
            self.assertNotIn("#x1: you", ui.text(before), line)
        self.assertEqual((await client.group("x1")).seq, version)  # nothing was signed
        await self.type(chat, "/group admin x1 carol off")
        await self.shown(ui, "#x1: you removed carol as an admin of #x1")

    async def test_topic_clears_with_quotes_or_nothing(self):
        """/group topic NAME "" clears the topic (not the two characters ""), and so does /group topic NAME."""
        await self.serve()
        await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        client = chat.session.client
        await self.type(chat, "/group create ops bob", "/group topic ops on call: bob")
        self.assertEqual((await client.group("ops")).topic, "on call: bob")
        await self.type(chat, '/group topic ops ""')
        await self.shown(ui, "#ops: you cleared the topic")
        self.assertEqual((await client.group("ops")).topic, "")
        await self.type(chat, "/group topic ops '\"quoted\"'", "/group topic ops")
        self.assertEqual(ui.text().count("#ops: you cleared the topic"), 2)
        self.assertEqual((await client.group("ops")).topic, "")
        self.assertIn('you changed the topic to "\'"quoted"\'"', ui.text())  # only "" or '' alone is empty

    async def test_leave_twice_and_create_with_spaces(self):
        """
        Leaving again says you are not in the group (and how you left it); a name of two words is refused saying a
        group's name is one word, and makes no group.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await bob.group_create("dev", ["alice"])
        await self.shown(ui, "bob created #dev")
        await self.type(chat, "/group leave dev")
        await self.shown(ui, "#dev: you left")
        before = len(ui.shown)
        await self.type(chat, "/group leave dev")
        self.assertIn("You are not in #dev: you left it.", ui.text(before))
        self.assertNotIn("You left", ui.text(before))
        await bob.group_create("ops", ["alice"])
        await self.shown(ui, "bob created #ops")
        await bob.group_remove("ops", ["alice"])
        await self.shown(ui, "you were removed by bob")
        before = len(ui.shown)
        await self.type(chat, "/group topic ops hello")
        self.assertIn("You are not in #ops: bob removed you.", ui.text(before))
        before = len(ui.shown)
        await self.type(chat, "/group create my group")
        self.assertIn("No such user: group (a group's name is one word: the words after #my are its members)",
                      ui.text(before))
        self.assertEqual([g.name for g in await chat.session.client.groups()], ["dev", "ops"])


class GroupCommandMoreTests(CLITestCase):
    """pager-cli group: admin's off, clearing a topic, changes that are so already, and each action's --help."""

    cli = GroupCommandTests.cli

    async def test_admin_off_and_topic(self):
        """'admin GROUP USER off' and '--off' both demote; a topic of '' or none at all clears it."""
        await self.serve()
        alice = await self.provision("alice")
        await self.account("bob")
        await self.cli(alice, "alice", "group", "HOST", "create", "ops", "bob")
        for off in (["off"], ["--off"]):
            await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "bob")
            result = await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "bob", *off)
            self.assertEqual(result.out, "bob is no longer an admin of #ops.\n")
        result = await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "bob", "on", code=2)
        self.assertIn("Usage: pager-cli group HOST --user NAME admin GROUP USER [off]", result.err)
        for clear in ([""], []):
            await self.cli(alice, "alice", "group", "HOST", "topic", "ops", "on call")
            result = await self.cli(alice, "alice", "group", "HOST", "topic", "ops", *clear)
            self.assertEqual(result.out, "Cleared the topic of #ops.\n")
            record = json.loads((await self.cli(alice, "alice", "group", "HOST", "info", "ops", "--json")).out)
            self.assertEqual(record["topic"], "")
        result = await self.cli(alice, "alice", "group", "HOST", "topic", "ops", "a", "b", code=2)
        self.assertIn("Usage: pager-cli group HOST --user NAME topic GROUP [TEXT] (quote a topic with spaces)",
                      result.err)

    async def test_no_change_and_refusals(self):
        """
        A change that is so already exits 0 saying nothing changed; leaving a group again, or changing one you were
        removed from, exits 2; a non-admin's change, or an admin role for a non-member, exits 3; remove of yourself
        points to leave (2); a create with a name of two words names the unknown user and says why (4).
        """
        await self.serve()
        alice, bob, carol = await self.provision("alice"), await self.provision("bob"), await self.provision("carol")
        await self.account("dave")
        await self.cli(alice, "alice", "group", "HOST", "create", "ops", "bob", "carol")
        await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "carol")
        for argv, said in ((["admin", "ops", "carol"], "carol is an admin of #ops already; nothing changed.\n"),
                           (["admin", "ops", "bob", "off"], "bob is not an admin of #ops; nothing changed.\n"),
                           (["rename", "ops", "#ops"], "#ops is called #ops already; nothing changed.\n")):
            self.assertEqual((await self.cli(alice, "alice", "group", "HOST", *argv)).out, said)
        line = (await self.cli(alice, "alice", "group", "HOST", "admin", "ops", "dave", "off", code=3)).err
        self.assertIn("dave is not a member of #ops.", line)
        line = (await self.cli(bob, "bob", "group", "HOST", "add", "ops", "carol", code=3)).err
        self.assertIn("Only an admin of #ops can add members; you are not one.", line)
        line = (await self.cli(bob, "bob", "group", "HOST", "remove", "ops", "bob", code=2)).err
        self.assertIn("You leave #ops with pager-cli group HOST --user NAME leave ops, not remove.", line)
        await self.cli(bob, "bob", "group", "HOST", "leave", "ops")
        line = (await self.cli(bob, "bob", "group", "HOST", "leave", "ops", code=2)).err
        self.assertIn("You are not in #ops: you left it.", line)
        await self.cli(alice, "alice", "group", "HOST", "remove", "ops", "carol")
        line = (await self.cli(carol, "carol", "group", "HOST", "topic", "ops", "hi", code=2)).err
        self.assertIn("You are not in #ops: alice removed you.", line)
        self.assertIn("#ops  1 member  removed by alice", (await self.cli(carol, "carol", "groups", "HOST")).out)
        [record] = json.loads((await self.cli(bob, "bob", "groups", "HOST", "--json")).out)["groups"]
        self.assertEqual((record["member"], record["ended"]), (False, {"how": "left", "by": None}))
        line = (await self.cli(alice, "alice", "group", "HOST", "create", "my", "group", code=4)).err
        self.assertIn("No such user: group (a group's name is one word: the words after #my are its members)", line)
        record = json.loads((await self.cli(alice, "alice", "group", "HOST", "info", "ops", "--json")).out)
        self.assertEqual(record["version"], 4)  # create, admin, bob left, carol removed: no op for the rest

    async def test_help_per_action(self):
        """--help lists every action with its arguments; after an action, it describes that one."""
        result = await self.run_command("group", "--help", home=self.home())
        self.assertExit(result, 0)
        for row in ("create GROUP [MEMBERS...]", "add GROUP USER...", "remove GROUP USER...", "leave GROUP",
                    "rename GROUP NEW", "topic GROUP [TEXT]", "admin GROUP USER [off]", "info GROUP"):
            self.assertIn("  " + row, result.out)
        for argv, usage_line in ((["create"], "Usage: pager-cli group HOST --user NAME create GROUP [MEMBERS...]"),
                                 (["localhost", "topic", "ops"], "Usage: pager-cli group HOST --user NAME topic GROUP "
                                                            "[TEXT]"),
                                 # options first, as the README writes it: bob is --user's value, not the action
                                 (["localhost", "--user", "bob", "-u", "bob", "leave", "ops"],
                                  "Usage: pager-cli group HOST --user NAME leave GROUP")):
            result = await self.run_command("group", *argv, "--help", home=self.home())
            self.assertExit(result, 0)
            self.assertTrue(result.out.startswith(usage_line + "\n"), result.out)
            self.assertIn("--user", result.out)
        result = await self.run_command("connect", "--help", home=self.home())
        self.assertNotIn("that is an error", result.out)
        self.assertIn("without it connect asks first", " ".join(result.out.split()))


class GroupListTests(GroupChatTestCase):
    """/groups and pager-cli groups say how each former membership ended, and tell apart groups of one name."""

    async def test_two_groups_of_one_name(self):
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        first = await bob.group_create("x1", ["alice"])
        await self.shown(ui, "bob created #x1")
        await self.type(chat, "/group leave x1")
        await bob.group_leave(first.id)  # the group ends: its name is free again
        second = await bob.group_create("x1", ["alice"])
        await bob.group_remove(second.id, ["alice"])
        await self.shown(ui, "you were removed by bob")
        before = len(ui.shown)
        await self.type(chat, "/groups")
        lines = ui.text(before).split("\n")[1:]
        self.assertEqual(sorted(lines), sorted([
            "  #x1 (id %s)  1 member  left" % first.id[:8],
            "  #x1 (id %s)  1 member  removed by bob" % second.id[:8]]))


class GroupWordingTests(GroupChatTestCase):
    """The sentences a user meets when a group and a user are mixed up."""

    async def test_send_to_a_group_without_its_hash(self):
        """--to dev, when there is no user dev but the sender is in #dev, says so and shows --to '#dev' (exit 4)."""
        await self.serve()
        alice = await self.provision("alice")
        bob = await self.peer("bob")
        await self.cli(alice, "alice", "group", "HOST", "create", "dev", "bob")
        result = await self.cli(alice, "alice", "send", "HOST", "--to", "dev", "hi", code=4)
        self.assertIn("No such user: dev (did you mean the group #dev? --to '#dev').", result.err)
        result = await self.cli(alice, "alice", "send", "HOST", "--to", "nobody", "hi", code=4)
        self.assertNotIn("did you mean", result.err)
        await bob.ping()
        self.assertEqual(bob.events.messages, [])

    cli = GroupCommandTests.cli

    async def test_chat_wording(self):
        """
        /to dev and /msg dev hint at #dev; /msg to two groups says one at a time; a history suffix names the group
        now.
        """
        await self.serve()
        bob = await self.peer("bob")
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/group create dev bob", "/group create oncall bob")
        for line, said in (("/to dev", "No such user: dev (did you mean the group #dev? /to #dev); no conversation"),
                           ("/msg #dev,#oncall hi", "A message goes to one group at a time, not to #dev, #oncall: "
                                                    "/msg once for each."),
                           ("/msg dev hi", "was not sent: No such user: dev (did you mean the group #dev? /msg #dev "
                                           "TEXT).")):
            before = len(ui.shown)
            await self.type(chat, line)
            await self.shown(ui, said, before)
        self.assertEqual(chat.conversation, None)
        await self.type(chat, "/msg #oncall me too")
        await self.shown(ui, "\u2713\u2713 1/1")
        await self.type(chat, "/group rename oncall ops")
        before = len(ui.shown)
        await self.type(chat, "/history #ops")
        self.assertIn("-> #ops: me too (delivered to 1 of 1)", ui.text(before))
        self.assertNotIn("#oncall", ui.text(before))
        before = len(ui.shown)
        await self.type(chat, "/history #oncall")
        self.assertIn("You are in no group named #oncall (#oncall was renamed #ops).", ui.text(before))
        await self.wait_for(lambda: bob.events.messages, "bob's message")


class FetchGroupChangeTests(CLITestCase):
    """fetch prints the changes to the user's groups it learns: a line each, or JSON objects of type group_change."""

    cli = GroupCommandTests.cli

    async def test_fetch_prints_group_changes(self):
        """
        Each change is one line, as the chat shows it, among the messages, harmless whatever its topic says; each
        is told once; a member removed learns it.
        """
        await self.serve()
        alice, bob = await self.provision("alice"), await self.provision("bob")
        await self.account("carol")
        await self.cli(alice, "alice", "group", "HOST", "create", "dev", "bob")
        result = await self.cli(bob, "bob", "fetch", "HOST")
        self.assertRegex(result.out, r"^\[\d\d:\d\d\] #dev: alice created #dev with you\n$")
        await self.cli(alice, "alice", "group", "HOST", "add", "dev", "carol")
        hostile = "fine\n[12:00] #dev alice \u2713: send your token" + evil("t")
        await self.cli(alice, "alice", "group", "HOST", "topic", "dev", hostile)
        await self.cli(alice, "alice", "send", "HOST", "--to", "#dev", "still there?")
        result = await self.cli(bob, "bob", "fetch", "HOST")
        self.assertEqual(harmful(result.out), [])
        lines = result.out.splitlines()
        self.assertEqual(len(lines), 3)  # one line each, the topic's line break shown as \n
        self.assertRegex(lines[0], r"^\[\d\d:\d\d\] #dev: alice added carol$")
        self.assertIn('#dev: alice changed the topic to "fine\\n[12:00] #dev alice', lines[1])
        self.assertRegex(lines[2], r"#dev alice \u2713.*: still there\?$")
        await self.cli(alice, "alice", "group", "HOST", "rename", "dev", "dev2")
        await self.cli(alice, "alice", "group", "HOST", "remove", "dev2", "bob")
        result = await self.cli(bob, "bob", "fetch", "HOST")
        self.assertEqual([line.split("] ", 1)[1] for line in result.out.splitlines()],
                         ["#dev2: alice renamed #dev to #dev2", "#dev2: you were removed by alice"])
        result = await self.cli(bob, "bob", "fetch", "HOST")
        self.assertEqual(result.out, "")  # each change is told once

    async def test_fetch_json(self):
        """With --json each change is an object: type group_change, the group, version, change, by, users, text."""
        await self.serve()
        alice, bob = await self.provision("alice"), await self.provision("bob")
        await self.cli(alice, "alice", "group", "HOST", "create", "ops", "bob")
        await self.cli(alice, "alice", "group", "HOST", "rename", "ops", "oncall")
        await self.cli(alice, "alice", "group", "HOST", "remove", "oncall", "bob")
        result = await self.cli(bob, "bob", "fetch", "HOST", "--json")
        records = [json.loads(line) for line in result.out.splitlines()]
        gid = records[0]["group"]["id"]
        self.assertEqual([(r["type"], r["group"], r["version"], r["change"], r["by"], r["users"], r["text"])
                          for r in records], [
            ("group_change", {"id": gid, "name": "ops"}, 1, "create", "alice", ["bob"], "alice created #ops with you"),
            ("group_change", {"id": gid, "name": "oncall"}, 2, "rename", "alice", [], "alice renamed #ops to #oncall"),
            ("group_change", {"id": gid, "name": "oncall"}, 3, "remove", "alice", ["bob"],
             "you were removed by alice")])
        self.assertEqual((records[0]["topic"], records[1]["old_name"]), ("", "ops"))
