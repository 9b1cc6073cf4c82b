"""
Devices as a person meets them: C{pager-cli link-device} on a new machine and on the machine holding the identity
key, C{revoke-device}, C{devices}, a linked device's logins and the commands it leaves to the identity machine, and
the chat's lines about devices.  Commands run in-process against a real server on a loopback port
(L{tests.test_cli.CLITestCase.run_command}); what only a process shows (Ctrl-C while a link waits) runs as a child.
"""

import dataclasses
import glob
import io
import json
import os
import re
import signal
import sqlite3
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

import pager
from tests.test_cli import PAGER_PY, PROCESS_TIMEOUT, CLITestCase, base_env
from tests.test_e2e import key, token
from tests.test_keys import PASSPHRASE, CommandTestCase, KeysTestCase, ScriptedPrompter
from tests.test_terminal import ChatTestCase, FakeUI

CODE = re.compile(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}")


@dataclasses.dataclass
class Device:
    """What the chat and the listing read of a device (the fields of the client's device records)."""

    device_id: bytes
    name: str = None
    created: float = None
    last_seen: float = None
    revoked_at: float = None


class ShowingTests(unittest.TestCase):
    """How devices and their names are written for a person."""

    def test_names_quoted_and_cut(self):
        """A device's name is quoted and cut to DEVICE_NAME_SHOWN characters; one with no name says so."""
        self.assertEqual(pager.device_name_text("laptop"), "'laptop'")
        long = pager.device_name_text("x" * 64)
        self.assertEqual(len(long), pager.DEVICE_NAME_SHOWN + 2)
        self.assertTrue(long.endswith("\u2026'"))
        self.assertEqual(pager.device_name_text(None), "(no name)")

    def test_device_id_grouped(self):
        """A device id is read as eight groups of four hex digits, from bytes or hex alike."""
        device = bytes(range(16))
        self.assertEqual(pager.format_device_id(device), "0001 0203 0405 0607 0809 0a0b 0c0d 0e0f")
        self.assertEqual(pager.format_device_id(device.hex().upper()), pager.format_device_id(device))

    def test_listing(self):
        """The listing names every device with its id and dates; revoked ones come last and say so."""
        now = 1800000000
        this = Device(b"\x01" * 16, "laptop", now - 86400, now, None)
        home = Device(b"\x02" * 16, "desk", now - 2 * 86400, now - 3600, None)
        lost = Device(b"\x03" * 16, "phone", now - 3 * 86400, None, now - 60)
        text = pager.describe_devices("alice", [lost, this, home], home.device_id, this_device=this.device_id)
        lines = text.split("\n")
        self.assertEqual(lines[0], "alice has 2 devices (and 1 revoked):")
        self.assertIn("'laptop'", lines[1])
        self.assertIn("0101 0101", lines[1])
        self.assertIn("this machine", lines[1])
        self.assertIn("last seen %s" % pager._date_clock(now), lines[1])
        self.assertIn("identity key", lines[2])
        self.assertIn("REVOKED", lines[3])
        self.assertIn("'phone'", lines[3])
        # Names are padded to the longest one listed ('laptop', 8 characters quoted), not to the longest allowed:
        # the ids line up one space after it, and a short listing fits a terminal's width.
        self.assertEqual({line.index(pager.format_device_id(d.device_id)) for line, d in
                          zip(lines[1:], (this, home, lost))}, {2 + 8 + 1})

    def test_own_message_from_another_device(self):
        """A message of the user's own from another device is shown as sent, naming the device and recipients."""
        message = pager.OpenedMessage(
            **{f.name: None for f in dataclasses.fields(pager.OpenedMessage)})
        message = dataclasses.replace(message, sender="alice", recipients=("alice", "bob"), content_type="text",
                                      plaintext=b"on my way", timestamp=1800000000.0, accepted_at=1800000000.0,
                                      key_status="pinned", skewed=False)
        text = pager.describe_message(message, sent_from="'laptop'")
        self.assertIn("you (on 'laptop') \u2192 bob: on my way", text)
        self.assertNotIn("\u2713", text)


class OptionsTests(unittest.TestCase):
    """What link-device, revoke-device and devices take on the command line."""

    def parse(self, *argv):
        options = pager.Options()
        options.parseOptions(list(argv))
        return options.subOptions

    def test_link_code_parsed(self):
        """A link code is read as typed (case, spaces and dashes do not matter); a malformed one is bad usage."""
        text, secret = pager.new_link_code()
        self.assertEqual(self.parse("link-device", "HOST", "--user", "alice", text.lower().replace("-", " "))
                         ["secret"], secret)
        with self.assertRaises(pager.usage.UsageError):
            self.parse("link-device", "HOST", "--user", "alice", "1234")

    def test_flags_belong_to_one_side(self):
        """--yes goes with a code (approving), --force without one (the new machine); a bad --name is refused."""
        text, _ = pager.new_link_code()
        for argv in (["--yes"], ["--force", text], ["--name", " padded "], ["--name", "tab\there"]):
            with self.assertRaises(pager.usage.UsageError):
                self.parse("link-device", "HOST", "--user", "alice", *argv)
        self.assertTrue(self.parse("link-device", "HOST", "--user", "alice", text, "-y")["yes"])

    def test_connect_takes_a_device_name(self):
        """connect --name names the device connect makes of this machine; a name that cannot be one is refused."""
        self.assertEqual(self.parse("connect", "HOST", "--name", "desk two")["name"], "desk two")
        self.assertIsNone(self.parse("connect", "HOST")["name"])
        with self.assertRaises(pager.usage.UsageError) as caught:
            self.parse("connect", "HOST", "--name", "x" * 65)
        self.assertIn("64 bytes", str(caught.exception))

    def test_help_lists_device_commands(self):
        """pager-cli --help lists the device commands, and each has its own help."""
        help_text = str(pager.Options())
        for command in ("devices", "link-device", "revoke-device"):
            self.assertIn(command, help_text)
            options = pager.Options()
            self.patch(sys, "stdout", io.StringIO())
            with self.assertRaises(SystemExit):
                options.parseOptions([command, "--help"])
            self.assertIn("Usage: pager-cli %s" % command, sys.stdout.getvalue())


class LinkedMachineTestCase(KeysTestCase):
    """A machine that holds a linked device's key (device.p12) for alice, and no key.p12."""

    def install_device_key(self, home, name="alice", passphrase=""):
        directory = pager.user_directory(home, self.server_id, name)
        path = os.path.join(directory, pager.DEVICE_FILE_NAME)
        pager.save_private_key(path, key(name + "-device"), passphrase)
        return path


class IdentityOnlyTests(LinkedMachineTestCase):
    """What needs the identity key says so, on a linked device, in one sentence and before logging in."""

    async def test_token_and_export_refused(self):
        """token and export-key on a linked device: one sentence naming the identity machine, exit 3."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        self.install_device_key(home)
        os.environ.update(PAGER_TOKEN=token("alice"))
        new_token = os.path.abspath(self.mktemp())
        with open(new_token, "w") as f:
            f.write("a new safetoken\n")
        os.chmod(new_token, 0o600)
        out = os.path.abspath(self.mktemp())
        for argv in (["token", self.host, "--user", "alice", "--new-token-file", new_token, "--home", home],
                     ["export-key", self.host, "--user", "alice", "--out", out, "--home", home]):
            result = await self.cli(*argv)
            line = self.assertOneErrorLine(result, pager.EXIT_AUTH)
            self.assertIn("linked device of alice", line)
            self.assertIn("identity key", line)
        self.assertFalse(os.path.exists(out))
        client = await self.login(self.address, "alice")  # the safetoken did not change
        await client.close()

    async def test_import_over_a_linked_device_needs_force(self):
        """import-key on a linked device says it would become the identity device, and needs --force."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        self.install_device_key(home)
        path = os.path.abspath(self.mktemp())
        pager.save_private_key(path, key("alice"), "")
        result = await self.cli("import-key", self.host, "--user", "alice", path, "--home", home,
                                "--no-passphrase", env={"PAGER_TOKEN": token("alice")})
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertIn("--force", line)
        self.assertFalse(os.path.exists(os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)))
        result = await self.cli("import-key", self.host, "--user", "alice", path, "--home", home,
                                "--no-passphrase", "--force", env={"PAGER_TOKEN": token("alice")})
        self.assertExit(result, 0)
        self.assertIn("identity device", result.err)
        self.assertIn("link-device", result.err)

    async def test_passwd_on_a_linked_device(self):
        """passwd changes the passphrase of the device key a linked machine holds."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        path = self.install_device_key(home)
        new = os.path.abspath(self.mktemp())
        with open(new, "w") as f:
            f.write("a new passphrase\n")
        os.chmod(new, 0o600)
        result = await self.cli("passwd", self.host, "--user", "alice", "--new-passphrase-file", new, "--home", home)
        self.assertExit(result, 0)
        self.assertIn(pager.DEVICE_FILE_NAME, result.out)
        self.assertEqual(pager.device_id(pager.load_private_key(path, "a new passphrase")),
                         pager.device_id(key("alice-device")))
        # Without a passphrase from now on: the warning names the key this machine holds, the device's own.
        result = await self.cli("passwd", self.host, "--user", "alice", "--no-passphrase", "--home", home,
                                env={"PAGER_PASSPHRASE": "a new passphrase"})
        self.assertExit(result, 0)
        self.assertIn("this device's key is now kept without a passphrase", result.err)

    async def test_export_suggests_link_device(self):
        """export-key says the importing machine becomes the identity device, and suggests link-device."""
        await self.serve()
        home = await self.provision("alice")
        out = os.path.abspath(self.mktemp())
        result = await self.cli("export-key", self.host, "--user", "alice", "--out", out, "--home", home,
                                "--no-passphrase")
        self.assertExit(result, 0)
        self.assertIn("becomes alice's identity device", result.err)
        self.assertIn("link-device", result.err)
        self.assertTrue(os.path.exists(out))

    async def cli(self, *argv, env=None):
        """Run C{pager-cli ARGV} in-process (CLITestCase.run_command), standard input not a terminal."""
        saved = dict(os.environ)
        extra = dict(env or {})
        if "PAGER_TOKEN" in os.environ:
            extra.setdefault("PAGER_TOKEN", os.environ["PAGER_TOKEN"])
        try:
            return await CLITestCase.run_command(self, *argv, env=extra)
        finally:
            os.environ.clear()
            os.environ.update(saved)


class NewMachineQuestionTests(KeysTestCase):
    """An existing account on a machine with no key: linking is offered first; scripts are told of link-device."""

    async def test_script_names_link_device(self):
        """A script command's NoKey sentence names 'pager-cli link-device' with the address and user."""
        await self.serve()
        await self.account("alice")
        error, _ = await self.failed_session(self.home(), pager.NoKey, interactive=False)
        self.assertIn("pager-cli link-device %s --user alice" % self.host, error.message)
        self.assertIn("import-key", error.message)

    async def test_connect_offers_link_first(self):
        """connect's question offers linking (the default), re-keying and neither; "n" makes nothing."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        made = []
        self.patch(pager, "generate_private_key", lambda: made.append(1))
        error, prompter = await self.failed_session(home, pager.NoKey, ["what?", "n"])
        self.assertEqual(prompter.prompts, ["Link, re-key or neither? [L/r/n] "] * 2)
        text = prompter.text()
        self.assertLess(text.index("link this machine"), text.index("re-key the account"))
        self.assertIn("recommended", text)
        self.assertIn("Answer l", text)
        self.assertIn("link-device", error.message)
        self.assertEqual(made, [])
        self.assertFalse(os.path.exists(os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)))


class ChatDeviceTests(ChatTestCase):
    """The chat's lines about devices, and messages the user sent from another device."""

    async def test_device_lines(self):
        """A contact's added and revoked devices are lines naming the device (quoted, cut) and its id."""
        chat, ui = await self.chat_as("alice")
        laptop = Device(b"\x1a\x2b\x3c\x4d" * 4, "laptop")
        evil = Device(b"\x05" * 16, "\x1b[31mred\x1b[0m " + "x" * 60)
        chat.devices_changed("bob", [laptop, evil], [])
        chat.devices_changed("bob", [], [laptop])
        chat.devices_changed("alice", [Device(b"\x06" * 16, "cron")], [])
        text = ui.text()
        self.assertIn("bob added a device 'laptop' (id 1a2b 3c4d 1a2b 3c4d", text)
        self.assertIn("bob revoked the device 'laptop' (id 1a2b 3c4d", text)
        self.assertIn("you added a device 'cron'", text)
        self.assertNotIn("\x1b", text)
        self.assertIn("\\x1b[31mred", text)
        self.assertNotIn("x" * 60, text)

    async def test_own_message_from_another_device(self):
        """
        A message alice sent from her laptop arrives in her chat here as sent, naming the laptop and bob; it is
        kept in the history as outgoing, and /r still answers whoever last wrote to her.
        """
        chat, ui = await self.chat_as("alice")
        laptop = b"\x1a" * 16
        await chat.session.store.set_devices("alice", pager.fingerprint(key("alice")), [pager.DeviceInfo(
            "alice", laptop, b"", "laptop")])
        message = pager.OpenedMessage(
            message_id=b"\x01" * 16, sender="alice", sender_fingerprint=pager.fingerprint(key("alice")),
            recipients=("alice", "bob"), timestamp=reactor.seconds(), content_type="text", filename="",
            plaintext=bytearray(b"on my way"), accepted_at=reactor.seconds(), sender_device=laptop)
        await chat.message_received(message)
        self.assertIn("you (on 'laptop') \u2192 bob: on my way", ui.text())
        self.assertIsNone(chat.last_sender)
        [entry] = await chat.session.store.history("bob")
        self.assertEqual((entry.direction, entry.body, entry.status), ("out", b"on my way", "sent from 'laptop'"))

    async def test_help_names_devices(self):
        """/help lists /devices."""
        chat, ui = await self.chat_as("alice")
        await self.type(chat, "/help")
        self.assertIn("/devices [NAME]", ui.text())


class LinkDeviceTests(CLITestCase):
    """
    link-device on a new machine (a child process: it waits for the approval) and on the machine with the key (in
    this process), then devices, revoke-device, and a linked device's own logins.
    """

    async def start_link(self, home, *extra):
        """Start C{link-device} for alice on the new machine C{home}; returns the child and the code it shows."""
        child = self.spawn([sys.executable, PAGER_PY, "link-device", self.host, "--user", "alice", "--name", "laptop",
                            "--no-passphrase"] + list(extra), base_env(PAGER_HOME=home))
        found = await self.wait_for(lambda: CODE.search(child.out.decode("utf-8", "replace")),
                                    "the new machine to show a code", tries=int(PROCESS_TIMEOUT / 0.01))
        return child, found.group()

    async def registered(self, name):
        """
        A home where C{name} registered with the command line (so that its device's prekeys are kept there, as a
        user's are: an account registered in-process keeps its prekeys nowhere this home can open them).
        """
        home = self.home()
        result = await self.run_command("users", "HOST", "--user", name, "--register", "--no-passphrase",
                                        home=home, token_of=name)
        self.assertExit(result, 0)
        return home

    async def device_count(self, name="alice"):
        _, devices = await self.server.store.devices(name)
        return len([d for d in devices if d.revoked_at is None])

    async def test_link_devices_revoke(self):
        """
        The new machine shows a code and the command to run; a wrong code approves nothing (exit 3); the right one,
        with --yes, adds the device, which saves its key, logs in with it alone and gets alice's messages.  devices
        lists it for alice (with last seen) and for bob (without); revoke-device by its name removes it, and it can
        no longer log in; the identity device and unknown names are refused with a sentence.
        """
        await self.serve()
        identity_home = await self.registered("alice")
        bob_home = await self.registered("bob")
        laptop_home = self.home()
        child, code = await self.start_link(laptop_home)
        shown = child.out.decode()
        self.assertIn("pager-cli link-device %s --user alice %s" % (self.host, code), shown)
        self.assertIn("'laptop'", shown)

        wrong, _ = pager.new_link_code()
        refused = await self.run_command("link-device", "HOST", "--user", "alice", wrong, "--yes",
                                         home=identity_home, token_of="alice")
        self.assertIn("nothing was approved", self.assertOneErrorLine(refused, pager.EXIT_AUTH))
        self.assertEqual(await self.device_count(), 1)

        approved = await self.run_command("link-device", "HOST", "--user", "alice", code.lower(), "--yes",
                                          home=identity_home, token_of="alice")
        self.assertExit(approved, 0)
        self.assertIn("Added the device 'laptop'", approved.out)
        self.assertIn("'laptop'", approved.err)  # what it approved, shown before approving
        linked = await self.finish(child, "link-device on the new machine")
        self.assertEqual(linked.code, 0, linked)
        self.assertIn("Linked", linked.out)
        directory = self.user_dir(laptop_home, "alice")
        self.assertTrue(os.path.exists(os.path.join(directory, pager.DEVICE_FILE_NAME)))
        self.assertFalse(os.path.exists(os.path.join(directory, pager.KEY_FILE_NAME)))
        self.assertFalse(os.path.exists(os.path.join(directory, pager.DEVICE_FILE_NAME + ".new")))

        own = await self.run_command("devices", "HOST", "--user", "alice", "--json", home=laptop_home)
        self.assertExit(own, 0)
        listing = json.loads(own.out)
        self.assertEqual(sorted((d["name"], d["identity"], d["this_device"]) for d in listing["devices"]),
                         [("laptop", False, True), (pager.default_device_name(), True, False)])
        self.assertTrue(all(d["last_seen"] is not None for d in listing["devices"]))
        text = await self.run_command("devices", "HOST", "--user", "alice", home=identity_home, token_of="alice")
        self.assertIn("alice has 2 devices:", text.out)
        self.assertIn("last seen", text.out)
        theirs = await self.run_command("devices", "HOST", "--user", "bob", "--of", "alice", home=bob_home,
                                        token_of="bob")
        self.assertExit(theirs, 0)
        self.assertIn("'laptop'", theirs.out)
        self.assertNotIn("last seen", theirs.out)

        sent = await self.run_command("send", "HOST", "--user", "bob", "--to", "alice", "hello both", home=bob_home,
                                      token_of="bob")
        self.assertExit(sent, 0)
        for home, token_of in ((laptop_home, None), (identity_home, "alice")):
            fetched = await self.run_command("fetch", "HOST", "--user", "alice", home=home, token_of=token_of)
            self.assertExit(fetched, 0)
            self.assertIn("hello both", fetched.out, fetched)

        from_laptop = await self.run_command("send", "HOST", "--user", "alice", "--to", "bob", "on my way",
                                             home=laptop_home)
        self.assertExit(from_laptop, 0)
        mine = await self.run_command("fetch", "HOST", "--user", "alice", home=identity_home, token_of="alice")
        self.assertIn("you (on 'laptop') \u2192 bob: on my way", mine.out)
        # ...and keeps it in its history as sent to bob from the laptop, not as received from alice.
        [db] = glob.glob(os.path.join(identity_home, "*", "alice", pager.LOCAL_DB_NAME))
        conn = sqlite3.connect(db)
        try:
            rows = conn.execute("SELECT direction, peer, status FROM history WHERE body = ?", (b"on my way",)).fetchall()
        finally:
            conn.close()
        self.assertEqual(rows, [("out", "bob", pager.SENT_FROM + "'laptop'")])

        prints = []
        for home, token_of in ((laptop_home, None), (identity_home, "alice")):
            result = await self.run_command("fingerprint", "HOST", "--user", "alice", "--json", home=home,
                                            token_of=token_of)
            self.assertExit(result, 0)
            prints.append(json.loads(result.out)["fingerprint"])
        self.assertEqual(prints[0], prints[1])  # the identity key's, which contacts compare, on every device

        not_here = await self.run_command("revoke-device", "HOST", "--user", "alice", "laptop", "--yes",
                                          home=laptop_home)
        self.assertIn("identity key", self.assertOneErrorLine(not_here, pager.EXIT_AUTH))
        identity_id = [d["id"] for d in listing["devices"] if d["identity"]][0]
        itself = await self.run_command("revoke-device", "HOST", "--user", "alice", identity_id[:8], "--yes",
                                        home=identity_home, token_of="alice")
        self.assertIn("cannot be revoked", self.assertOneErrorLine(itself, pager.EXIT_USAGE))
        unknown = await self.run_command("revoke-device", "HOST", "--user", "alice", "phone", "--yes",
                                         home=identity_home, token_of="alice")
        self.assertIn("no device", self.assertOneErrorLine(unknown, pager.EXIT_UNKNOWN_USER))
        asked = await self.run_command("revoke-device", "HOST", "--user", "alice", "laptop", home=identity_home,
                                       token_of="alice")
        self.assertIn("--yes", self.assertOneErrorLine(asked, pager.EXIT_USAGE))
        self.assertEqual(await self.device_count(), 2)
        revoked = await self.run_command("revoke-device", "HOST", "--user", "alice", "laptop", "--yes",
                                         home=identity_home, token_of="alice")
        self.assertExit(revoked, 0)
        self.assertIn("Revoked alice's device 'laptop'", revoked.out)
        self.assertEqual(await self.device_count(), 1)
        gone = await self.run_command("fetch", "HOST", "--user", "alice", home=laptop_home)
        self.assertIn("link-device", self.assertOneErrorLine(gone, pager.EXIT_AUTH))
        after = await self.run_command("devices", "HOST", "--user", "alice", home=identity_home, token_of="alice")
        self.assertIn("alice has 1 device (and 1 revoked):", after.out)
        self.assertIn("REVOKED", after.out)

    async def test_link_again_after_revoke(self):
        """
        The way back its login names for a revoked device, 'link-device ... --force', works: the machine gets a new
        device key, is approved, and fetches what is sent to alice from then on.
        """
        await self.serve()
        identity_home = await self.registered("alice")
        bob_home = await self.registered("bob")
        laptop_home = self.home()
        child, code = await self.start_link(laptop_home)
        approved = await self.run_command("link-device", "HOST", "--user", "alice", code, "--yes",
                                          home=identity_home, token_of="alice")
        self.assertExit(approved, 0)
        self.assertEqual((await self.finish(child, "the first link")).code, 0)
        revoked = await self.run_command("revoke-device", "HOST", "--user", "alice", "laptop", "--yes",
                                         home=identity_home, token_of="alice")
        self.assertExit(revoked, 0)
        gone = await self.run_command("fetch", "HOST", "--user", "alice", home=laptop_home)
        self.assertIn("--force", self.assertOneErrorLine(gone, pager.EXIT_AUTH))
        child, code = await self.start_link(laptop_home, "--force")
        approved = await self.run_command("link-device", "HOST", "--user", "alice", code, "--yes",
                                          home=identity_home, token_of="alice")
        self.assertExit(approved, 0)
        self.assertEqual((await self.finish(child, "linking again")).code, 0)
        sent = await self.run_command("send", "HOST", "--user", "bob", "--to", "alice", "welcome back",
                                      home=bob_home, token_of="bob")
        self.assertExit(sent, 0)
        fetched = await self.run_command("fetch", "HOST", "--user", "alice", home=laptop_home)
        self.assertExit(fetched, 0)
        self.assertIn("welcome back", fetched.out)

    async def test_interrupted_while_waiting(self):
        """
        Ctrl-C while the new machine waits for the approval: exit 130, saying the request was cancelled and no key
        kept, and no key (nor directory) is left behind.
        """
        await self.serve()
        await self.account("alice")
        laptop_home = self.home()
        child, code = await self.start_link(laptop_home)
        directory = self.user_dir(laptop_home, "alice")
        self.assertTrue(os.path.exists(os.path.join(directory, pager.DEVICE_FILE_NAME + ".new")))
        child.transport.signalProcess("INT")
        result = await self.finish(child, "link-device after Ctrl-C")
        self.assertEqual(result.code, pager.EXIT_INTERRUPTED, result)
        self.assertNotIn("Traceback", result.err)
        self.assertEqual(result.err.splitlines()[-1], "pager: " + pager.LINK_CANCELLED)
        self.assertIn("no key was kept", pager.LINK_CANCELLED)
        self.assertFalse(os.path.exists(directory))  # no key, no local database: nothing of alice's is left

    async def test_new_machine_needs_a_passphrase(self):
        """A script linking a machine says where the new key's passphrase comes from (exit 2); nothing is kept."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        result = await self.run_command("link-device", "HOST", "--user", "alice", home=home)
        self.assertIn("PAGER_PASSPHRASE", self.assertOneErrorLine(result, pager.EXIT_USAGE))
        self.assertFalse(os.path.exists(self.user_dir(home, "alice")))  # nothing of alice's is left

    async def test_already_holds_a_key(self):
        """link-device on a machine with the user's key refuses, pointing to the approving side (exit 2)."""
        await self.serve()
        home = await self.provision("alice")
        result = await self.run_command("link-device", "HOST", "--user", "alice", home=home, token_of="alice")
        self.assertIn("CODE", self.assertOneErrorLine(result, pager.EXIT_USAGE))
        self.assertFalse(os.path.exists(os.path.join(self.user_dir(home, "alice"), pager.DEVICE_FILE_NAME)))


class ConnectLinksTests(KeysTestCase):
    """connect on a new machine for an existing account links it as a device when the user chooses (the default)."""

    async def test_connect_links(self):
        """
        Enter at connect's question links, Enter at the name question takes the host name: the code is shown, the
        identity device approves, the chat logs in.
        """
        await self.serve()
        await self.account("alice")
        home = self.home()
        prompter = ScriptedPrompter(["", ""])
        session = pager.Session(reactor, self.config(home, **{"no-passphrase": True}), prompter)
        self.addCleanup(session.close)
        started = defer.Deferred.fromCoroutine(session.start(receive=False))
        found = await self.wait_for(lambda: CODE.search("\n".join(prompter.said)), "the code", tries=3000)
        identity = await self.login(self.address, "alice")
        info = await identity.approve_link(None, None, pager.parse_link_code(found.group()))
        await started
        self.assertTrue(session.linked)
        self.assertEqual(info.device_id, pager.device_id(session.key))
        self.assertTrue(os.path.exists(os.path.join(self.user_dir(home, "alice"), pager.DEVICE_FILE_NAME)))
        self.assertIn("Linked", prompter.text())
        self.assertEqual(session.client.device, info.device_id.hex())


class ChatDevicesCommandTests(ChatTestCase):
    """/devices in the chat, and the line a contact's new device makes once the chat's client sees it."""

    async def test_devices_and_new_device_line(self):
        """
        /devices lists alice's own devices and bob's; once bob links a laptop, the next look at bob's devices shows
        "bob added a device 'laptop'" in alice's chat.
        """
        chat, ui = await self.chat_as("alice")
        bob = await self.peer("bob")
        await self.type(chat, "/devices")
        self.assertIn("alice has 1 device:", ui.text())
        self.assertIn("this machine", ui.text())
        await self.type(chat, "/devices bob")
        self.assertIn("bob has 1 device:", ui.text())
        laptop = await self.connect(self.address)
        text, secret = pager.new_link_code()
        await laptop.link_request("bob", key("bob-laptop"), "laptop", secret)
        await bob.approve_link(None, None, secret)
        await laptop.wait_linked()
        since = len(ui.shown)
        await self.type(chat, "/devices bob")
        shown = ui.text(since)
        added = pager.format_device_id(pager.device_id(key("bob-laptop")))
        self.assertIn("bob added a device 'laptop' (id %s)" % added, shown)
        self.assertIn("bob has 2 devices:", shown)

    async def test_sent_from_laptop_shown_as_sent(self):
        """
        alice's laptop (a linked device) sends bob a message: her chat on the identity machine shows it as sent from
        'laptop', to bob, and keeps it in the history as outgoing; bob's shows it from alice as usual.
        """
        chat, ui = await self.chat_as("alice")
        bob = await self.peer("bob")
        laptop = await self.connect(self.address)
        text, secret = pager.new_link_code()
        await laptop.link_request("alice", key("alice-laptop"), "laptop", secret)
        await chat.session.client.approve_link(None, None, secret)
        await laptop.wait_linked()
        await laptop.login("alice", None, key("alice-laptop"), device=True)
        await laptop.send("bob", "on my way")
        await self.wait_for(lambda: "on my way" in ui.text(), "the laptop's message in alice's chat")
        self.assertIn("you (on 'laptop') \u2192 bob: on my way", ui.text())
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        self.assertEqual(bob.events.messages[0].sender, "alice")
        await self.settle(chat)
        [entry] = await chat.session.store.history("bob")
        self.assertEqual((entry.direction, entry.body), ("out", b"on my way"))
        # bob's receipt may be in already: it keeps the mark of the device the message was sent from
        self.assertIn(entry.status, ("sent from 'laptop'", "sent from 'laptop'\ndelivered to bob"))


class LinkExpiryTests(KeysTestCase):
    """A link request nobody approves in time."""

    async def test_expired_request_keeps_no_key(self):
        """When the server lets the request expire, linking fails in one sentence (exit 1) and keeps no key."""
        self.patch(pager, "LINK_TTL", 0.5)
        await self.serve()
        await self.account("alice")
        home = self.home()
        error, prompter = await self.failed_session(home, pager.LinkFailed, ["l", ""], **{"no-passphrase": True})
        self.assertIn("Nobody approved", error.message)
        self.assertEqual(pager.exit_code(error), pager.EXIT_FAILURE)
        self.assertTrue(CODE.search(prompter.text()))
        directory = self.user_dir(home, "alice")
        self.assertEqual([n for n in os.listdir(directory) if n.startswith(("device", "key"))], [])


class DeviceCommandSentenceTests(LinkedMachineTestCase):
    """What the device commands say when they cannot go on: one sentence, with the way forward."""

    async def cli(self, *argv, env=None, home=None):
        return await CLITestCase.run_command(self, *argv, env=env, home=home)

    async def test_short_id_prefix_names_the_minimum(self):
        """A device named by fewer hex digits than an id prefix needs is refused with the minimum to give."""
        await self.serve()
        home = await self.provision("alice")
        result = await self.cli("revoke-device", "HOST", "--user", "alice", "6f", "--yes", home=home,
                                env={"PAGER_TOKEN": token("alice")})
        line = self.assertOneErrorLine(result, pager.EXIT_UNKNOWN_USER)
        self.assertIn("at least 4 hex digits of the id, or the device's name", line)

    async def test_approving_without_the_identity_key(self):
        """Approving a code on a machine with no key of the user says it needs the identity key (exit 3)."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        code, _ = pager.new_link_code()
        result = await self.cli("link-device", "HOST", "--user", "alice", code, "--yes", home=home)
        line = self.assertOneErrorLine(result, pager.EXIT_AUTH)
        self.assertIn("alice's identity key", line)
        self.assertIn("machine that holds it", line)
        self.assertNotIn("link this machine", line)

    async def test_revoked_device_one_way_back(self):
        """A device the account no longer has, and link-device there, both name 'link-device ... --force'."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        path = self.install_device_key(home)
        again = "'pager-cli link-device %s --user alice --force'" % self.host
        fetched = await self.cli("fetch", "HOST", "--user", "alice", home=home)
        line = self.assertOneErrorLine(fetched, pager.EXIT_AUTH)
        self.assertIn(again, line)
        self.assertNotIn("move", line)
        linked = await self.cli("link-device", "HOST", "--user", "alice", home=home)
        self.assertIn(again, self.assertOneErrorLine(linked, pager.EXIT_USAGE))
        self.assertTrue(os.path.exists(path))

    async def test_link_for_unknown_user_makes_nothing(self):
        """link-device for a name with no account says so (exit 4) before making a key, and leaves no directory."""
        await self.serve()
        home = self.home()
        made = []
        self.patch(pager, "generate_private_key", lambda: made.append(1))
        result = await self.cli("link-device", "HOST", "--user", "carol", "--no-passphrase", home=home)
        self.assertIn("carol", self.assertOneErrorLine(result, pager.EXIT_UNKNOWN_USER))
        self.assertEqual(made, [])
        self.assertFalse(os.path.exists(os.path.join(home, self.server_id, "carol")))

    async def test_token_on_a_linked_device_says_so_first(self):
        """token on a linked device without --new-token-file says first that it is a linked device (exit 3)."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        self.install_device_key(home)
        result = await self.cli("token", "HOST", "--user", "alice", home=home)
        self.assertIn("linked device of alice", self.assertOneErrorLine(result, pager.EXIT_AUTH))

    async def test_malformed_code_sentence(self):
        """A malformed link code is one sentence, its example not in doubled brackets, ending with a full stop."""
        self.host = "localhost:5050"  # refused before any connection
        result = await self.cli("link-device", "HOST", "--user", "alice", "1234")
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertNotIn(") (", line)
        self.assertTrue(line.endswith("."), line)
        self.assertIn("7K3M-Q2ZR-8D1X-VH4B", line)

    async def test_linked_device_passphrase_prompt(self):
        """A linked device asks for "this device's key" passphrase, as it did when the key was made."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        self.install_device_key(home, passphrase=PASSPHRASE)
        _, prompter = await self.failed_session(home, pager.WrongPassphrase, ["wrong"] * 3)
        self.assertEqual(prompter.prompts, ["Passphrase for this device's key (alice's device): "] * 3)
        self.assertIn("this device's key", prompter.text())


class TerminalPromptTests(CommandTestCase):
    """The device commands ask for a passphrase not given when standard input and standard error are a terminal."""

    def terminal(self, stdin=True, stderr=True):
        self.patch(os, "isatty", lambda fd: {0: stdin, 2: stderr}.get(fd, False))
        asked = []

        async def secret(prompter, prompt, hint=None):
            if not prompter.interactive:
                raise pager.usage.UsageError(hint)
            asked.append(prompt)
            return PASSPHRASE
        self.patch(pager.Prompter, "secret", secret)
        return asked

    async def test_devices_asks_on_a_terminal(self):
        """devices asks for the key's passphrase on a terminal; a script (or stderr not a terminal) is told how."""
        await self.serve()
        home = await self.provision_with_token("alice")
        asked = self.terminal()
        out = await self.run_command("devices", self.host, "--user", "alice", "--home", home)
        self.assertIn("alice has 1 device:", out)
        self.assertEqual(asked, ["Passphrase for alice's key: "])
        for stdin, stderr in ((False, True), (True, False)):
            asked = self.terminal(stdin, stderr)
            with self.assertRaises(pager.usage.UsageError) as caught:
                await self.run_command("devices", self.host, "--user", "alice", "--home", home)
            self.assertIn("PAGER_PASSPHRASE", str(caught.exception))
            self.assertEqual(asked, [])

    def test_help_names_the_commands_that_ask(self):
        """--help says that every command (devices too) may ask on a terminal for a passphrase or safetoken."""
        for option in ("passphrase-file", "token-file"):
            text = " ".join(str(pager.DevicesOptions()).split())
            self.assertIn("so does every other command", text[text.index("--" + option):].split("--", 2)[1])

    async def test_no_declines_at_once(self):
        """Answering n when approving declines the request: the waiting machine is told at once, not in 10 minutes."""
        await self.serve()
        home = await self.provision_with_token("alice")
        laptop = await self.connect(self.address)
        text, secret = pager.new_link_code()
        await laptop.link_request("alice", key("alice-laptop"), "laptop", secret)
        waiting = defer.Deferred.fromCoroutine(laptop.wait_linked())
        self.terminal()
        questions = []

        async def ask(prompter, prompt, hint=None):
            questions.append(prompt)
            return "n"
        self.patch(pager.Prompter, "ask", ask)
        with self.assertRaises(pager.Cancelled) as caught:
            await self.run_command("link-device", self.host, "--user", "alice", text, "--home", home)
        self.assertIn("declined", caught.exception.message)
        self.assertEqual(len(questions), 1)
        with self.assertRaises(pager.LinkFailed):
            await waiting
        self.assertEqual(await self.server.store.devices("alice") and len(
            [d for d in (await self.server.store.devices("alice"))[1] if d.revoked_at is None]), 1)


class LinkedNameTests(KeysTestCase):
    """The name a device is linked under is the one the identity device approved."""

    async def test_told_the_approved_name(self):
        """Approved under another name than it asked for, the new machine says it is now that name's device."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        prompter = ScriptedPrompter(["l", ""])
        session = pager.Session(reactor, self.config(home, **{"no-passphrase": True}), prompter)
        self.addCleanup(session.close)
        started = defer.Deferred.fromCoroutine(session.start(receive=False))
        found = await self.wait_for(lambda: CODE.search("\n".join(prompter.said)), "the code", tries=3000)
        identity = await self.login(self.address, "alice")
        await identity.approve_link(None, "desk two", pager.parse_link_code(found.group()))
        await started
        linked = [line for line in prompter.said if line.startswith("Linked")]
        self.assertEqual(len(linked), 1)
        self.assertIn("device 'desk two'", linked[0])

    async def test_approving_refuses_a_name_in_use(self):
        """Approving under the name of another current device of the user is refused, suggesting --name (exit 2)."""
        await self.serve()
        home = await self.provision("alice")
        laptop = await self.connect(self.address)
        text, secret = pager.new_link_code()
        _, [identity] = await self.server.store.devices("alice")
        await laptop.link_request("alice", key("alice-laptop"), identity.name, secret)
        result = await CLITestCase.run_command(self, "link-device", "HOST", "--user", "alice", text, "--yes",
                                               home=home, token_of="alice")
        line = self.assertOneErrorLine(result, pager.EXIT_USAGE)
        self.assertIn("already has a device named '%s'" % identity.name, line)
        self.assertIn("--name", line)
        self.assertEqual(len((await self.server.store.devices("alice"))[1]), 1)
        result = await CLITestCase.run_command(self, "link-device", "HOST", "--user", "alice", text, "--yes",
                                               "--name", "laptop", home=home, token_of="alice")
        self.assertExit(result, 0)
        info = await laptop.wait_linked()
        self.assertEqual(info.name, "laptop")


class LinkedChatTests(ChatTestCase):
    """The chat on a linked device, and what the identity device's chat shows of it."""

    async def linked_chat(self, identity_chat, name="alice", device_name="laptop"):
        """A chat of C{name} on a new machine linked (as C{device_name}) from C{identity_chat}: C{(chat, ui)}."""
        home = self.home()
        directory = pager.user_directory(home, self.server_id, name)
        device_key = key(name + "-" + device_name)
        pager.save_private_key(os.path.join(directory, pager.DEVICE_FILE_NAME), device_key, "")
        linking = await self.connect(self.address)
        _, secret = pager.new_link_code()
        await linking.link_request(name, device_key, device_name, secret)
        await identity_chat.session.client.approve_link(None, None, secret)
        await linking.wait_linked()
        await linking.close()
        config = {"server": self.host, "home": home, "user": name, "token-file": None, "passphrase-file": None,
                  "no-passphrase": False, "tls": False, "ca": None, "no-history": False}
        session = pager.Session(reactor, config, pager.Prompter(reactor, interactive=False))
        chat = pager.Chat(session, reactor)
        await session.start()
        self.addCleanup(self.stop_chat, chat)
        ui = FakeUI()
        chat.attach(ui)
        self.assertTrue(session.linked)
        return chat, ui

    async def test_whoami_names_this_device(self):
        """/whoami on a linked device names it, with its id."""
        chat, _ = await self.chat_as("alice")
        laptop, ui = await self.linked_chat(chat)
        await self.type(laptop, "/whoami")
        self.assertIn("linked device 'laptop' (id %s;" % pager.format_device_id(pager.device_id(key("alice-laptop"))),
                      ui.text())

    async def test_history_marks_another_device(self):
        """/history marks a message sent from another of the user's devices, also once its receipt came in."""
        chat, ui = await self.chat_as("alice")
        bob = await self.peer("bob")
        laptop, _ = await self.linked_chat(chat)
        await self.type(laptop, "/to bob", "on my way")
        await self.wait_for(lambda: "on my way" in ui.text(), "the laptop's message in alice's chat")
        await self.wait_for(lambda: bob.events.messages, "bob's message")
        await self.settle(chat)
        await self.wait_for(lambda: chat.session.store.history("bob").addCallback(
            lambda entries: "delivered" in entries[-1].status), "bob's receipt in the history")
        since = len(ui.shown)
        await self.type(chat, "/history")
        [line] = [line for line in ui.text(since).splitlines() if "on my way" in line]
        self.assertIn("-> bob: on my way (sent from 'laptop', delivered to bob)", line)

    async def test_opening_a_conversation_shows_device_changes(self):
        """
        /to bob looks at bob's devices: once bob links a laptop, opening the conversation again shows the line,
        though alice sent nothing and bob wrote nothing.
        """
        chat, ui = await self.chat_as("alice")
        bob = await self.peer("bob")
        await self.type(chat, "/to bob")
        await self.type(chat, "/to")
        laptop = await self.connect(self.address)
        _, secret = pager.new_link_code()
        await laptop.link_request("bob", key("bob-laptop"), "laptop", secret)
        await bob.approve_link(None, None, secret)
        await laptop.wait_linked()
        since = len(ui.shown)
        await self.type(chat, "/to bob")
        added = pager.format_device_id(pager.device_id(key("bob-laptop")))
        self.assertIn("bob added a device 'laptop' (id %s)" % added, ui.text(since))
