"""
One secret per login and keys that are easy to manage: the safetoken kept under the key's passphrase, the
registration and new-machine prompts, changing the passphrase and the safetoken, pinned versus verified keys, and
damaged or exposed key and token files.  Sessions run in-process with a scripted prompter.
"""

import contextlib
import dataclasses
import io
import json
import os
import shlex
import stat

from twisted.internet import reactor
from twisted.python import usage
from twisted.trial import unittest

import pager
from tests.test_cli import CLITestCase
from tests.test_e2e import key, token

PASSPHRASE = "a long passphrase"


class ScriptedPrompter(pager.Prompter):
    """A prompter answering from a list; it records every prompt and every sentence said."""

    def __init__(self, answers=(), interactive=True):
        super().__init__(reactor, interactive)
        self.answers = list(answers)
        self.prompts = []
        self.said = []

    def say(self, text):
        self.said.append(text)

    @property
    def typed(self):
        return self.interactive  # answers as if typed at a terminal

    async def _answer(self, prompt, hint):
        if not self.interactive:
            raise usage.UsageError(hint or "Cannot ask: %s" % prompt.strip(": "))
        self.prompts.append(prompt)
        if not self.answers:
            raise pager.Cancelled("No answer scripted for %r." % prompt)
        return self.answers.pop(0)

    async def ask(self, prompt, hint=None):
        return await self._answer(prompt, hint)

    async def secret(self, prompt, hint=None):
        return await self._answer(prompt, hint)

    def text(self):
        return "\n".join(self.prompts + self.said)


class KeysTestCase(CLITestCase):
    """Sessions as the client makes them, with no PAGER_* variables from the environment."""

    def setUp(self):
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("PAGER_")})

    def config(self, home, user="alice", **extra):
        config = {"server": self.host, "home": home, "user": user, "token-file": None, "passphrase-file": None,
                  "no-passphrase": False, "tls": False, "ca": None, "no-history": False, "register": False}
        config.update(extra)
        return config

    async def session(self, home, answers=(), interactive=True, user="alice", **extra):
        """A started Session (closed at cleanup) and its prompter."""
        prompter = ScriptedPrompter(answers, interactive)
        session = pager.Session(reactor, self.config(home, user, **extra), prompter)
        self.addCleanup(session.close)
        await session.start(receive=False)
        return session, prompter

    async def failed_session(self, home, error, answers=(), interactive=True, user="alice", **extra):
        prompter = ScriptedPrompter(answers, interactive)
        session = pager.Session(reactor, self.config(home, user, **extra), prompter)
        self.addCleanup(session.close)
        with self.assertRaises(error) as caught:
            await session.start(receive=False)
        return caught.exception, prompter

    def token_path(self, home, user="alice"):
        return os.path.join(self.user_dir(home, user), pager.TOKEN_FILE_NAME)


class TokenFileTests(unittest.TestCase):
    """The token file: AES-256-GCM under PBKDF2 of the passphrase, bound to its server and user."""

    server_id = "0123456789abcdef0123456789abcdef"

    def test_round_trip_and_binding(self):
        """The token opens with its passphrase, server id and user only; it is not in the file in the clear."""
        data = pager.encrypt_token("correct horse battery", PASSPHRASE, self.server_id, "alice")
        self.assertNotIn(b"correct horse", data)
        self.assertEqual(pager.decrypt_token(data, PASSPHRASE, self.server_id, "alice"), "correct horse battery")
        for args in [("wrong", self.server_id, "alice"), (PASSPHRASE, "f" * 32, "alice"),
                     (PASSPHRASE, self.server_id, "bob")]:
            self.assertRaises(pager.TokenFileError, pager.decrypt_token, data, *args)

    def test_damaged(self):
        """A truncated, altered or foreign file is a TokenFileError (a key-file error: exit code 3)."""
        data = pager.encrypt_token("correct horse battery", PASSPHRASE, self.server_id, "alice")
        flipped = data[:-1] + bytes([data[-1] ^ 1])
        for bad in (data[:40], flipped, b"", b"not a token file at all, really"):
            with self.assertRaises(pager.TokenFileError) as caught:
                pager.decrypt_token(bad, PASSPHRASE, self.server_id, "alice")
            self.assertEqual(pager.exit_code(caught.exception), pager.EXIT_AUTH)

    def test_saved_private(self):
        """save_token writes mode 0600 whatever the umask; load_token refuses the file once others may read it."""
        path = self.mktemp()
        old = os.umask(0)
        try:
            pager.save_token(path, "correct horse battery", PASSPHRASE, self.server_id, "alice")
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(pager.load_token(path, PASSPHRASE, self.server_id, "alice"), "correct horse battery")
        os.chmod(path, 0o640)
        self.assertRaises(pager.KeyFileExposed, pager.load_token, path, PASSPHRASE, self.server_id, "alice")
        self.assertIsNone(pager.load_token(path + ".none", PASSPHRASE, self.server_id, "alice"))


class PrivateDirectoryTests(unittest.TestCase):
    """The client's directories: made 0700 whatever the umask; one that exists is made private, never opened up."""

    def mode(self, path):
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_made_private(self):
        old = os.umask(0o277)  # a umask that would leave the owner unable to write
        try:
            path = pager.private_directory(os.path.abspath(self.mktemp()), "a")
        finally:
            os.umask(old)
        self.assertEqual(self.mode(path), 0o700)

    def test_existing_kept_as_its_owner_set_it(self):
        """Group and others lose their access; the owner's own bits stay (a read-only directory is not reopened)."""
        shared, read_only = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.mkdir(shared, 0o755)
        os.chmod(shared, 0o755)
        os.mkdir(read_only)
        os.chmod(read_only, 0o500)
        self.addCleanup(os.chmod, read_only, 0o700)
        self.assertEqual(self.mode(pager.private_directory(shared)), 0o700)
        self.assertEqual(self.mode(pager.private_directory(read_only)), 0o500)


class OneSecretTests(KeysTestCase):
    """Registration asks the safetoken twice and keeps it; later logins ask for the passphrase alone."""

    async def test_register_then_passphrase_only(self):
        """
        A first connect asks before registering, asks the safetoken twice (again when the two differ), this
        device's name (the host name offered; a name that cannot be one asked again) and the passphrase twice; the
        next login asks only for the passphrase, and the token file is 0600 and encrypted.
        """
        await self.serve()
        home = self.home()
        chosen = "my new safetoken"
        session, prompter = await self.session(home, [
            "y", chosen, "a typo token", chosen, chosen, "\tdesk", "desk", PASSPHRASE, PASSPHRASE])
        name_question = "Name of this device, as you and your contacts will see it [%s]: " % pager.default_device_name()
        self.assertEqual(prompter.prompts.count(name_question), 2)
        self.assertIn(pager.DEVICE_NAME_RULE, prompter.said)
        _, devices = await self.server.store.devices("alice")
        self.assertEqual([d.name for d in devices], ["desk"])
        self.assertIn("Choose a safetoken (at least 8 characters): ", prompter.prompts)
        self.assertEqual(prompter.prompts.count("Same safetoken again: "), 2)
        self.assertIn("The two safetokens differ; try again.", prompter.said)
        self.assertEqual(await self.server.store.user_names(), ["alice"])
        path = self.token_path(home)
        self.assertMode(path, 0o600)
        with open(path, "rb") as f:
            self.assertNotIn(chosen.encode(), f.read())
        await session.close()

        again, prompter = await self.session(home, [PASSPHRASE])
        self.assertEqual(prompter.prompts, ["Passphrase for alice's key: "])
        self.assertEqual(again.token, chosen)

    async def test_script_keeps_token(self):
        """A script that gave the token once (PAGER_TOKEN) logs in later with only its passphrase."""
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        os.environ.update(PAGER_TOKEN=token("alice"), PAGER_PASSPHRASE=PASSPHRASE)
        first, _ = await self.session(home, interactive=False)
        await first.close()
        self.assertTrue(os.path.exists(self.token_path(home)))
        del os.environ["PAGER_TOKEN"]
        again, _ = await self.session(home, interactive=False)
        self.assertEqual(again.token, token("alice"))

    async def test_wrong_token_three_tries(self):
        """A typed safetoken gets three tries, as the passphrase does; the one that works is kept."""
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        session, prompter = await self.session(home, [PASSPHRASE, "wrong token 1", "wrong token 2", token("alice")])
        self.assertEqual(prompter.said.count("Wrong safetoken; try again."), 2)
        self.assertEqual(pager.load_token(self.token_path(home), PASSPHRASE, self.server_id, "alice"), token("alice"))
        await session.close()
        home = await self.provision("bob", PASSPHRASE)
        error, prompter = await self.failed_session(home, pager.AuthFailed, [PASSPHRASE] + ["wrong token"] * 3,
                                                    user="bob")
        self.assertIn("Three wrong safetokens", error.message)
        self.assertEqual(prompter.prompts.count("Safetoken for bob: "), 3)
        self.assertFalse(os.path.exists(self.token_path(home, "bob")))

    async def test_token_changed_elsewhere(self):
        """
        A kept token the server refuses: a script is told to give the current one once; the interactive client
        asks for it and keeps the new one.
        """
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        pager.save_token(self.token_path(home), "an old safetoken", PASSPHRASE, self.server_id, "alice")
        os.environ.update(PAGER_PASSPHRASE=PASSPHRASE)
        error, _ = await self.failed_session(home, pager.AuthFailed, interactive=False)
        self.assertIn("PAGER_TOKEN", error.message)
        del os.environ["PAGER_PASSPHRASE"]
        session, prompter = await self.session(home, [PASSPHRASE, token("alice")])
        self.assertIn("changed elsewhere", prompter.text())
        self.assertEqual(pager.load_token(self.token_path(home), PASSPHRASE, self.server_id, "alice"), token("alice"))


class NewMachineTests(KeysTestCase):
    """An existing account on a machine without its key: asked for the existing safetoken; scripts make no key."""

    async def test_asks_existing_token(self):
        """
        connect says the account exists and offers linking or re-keying; "r" re-keys: it asks for the existing
        safetoken (not a new one; three tries) and keeps it with the new key.
        """
        await self.serve()
        await self.account("alice")
        home = self.home()
        session, prompter = await self.session(home, ["r", "not my token", "desk", PASSPHRASE, PASSPHRASE,
                                                      token("alice")])
        text = prompter.text()
        self.assertIn("Name of this device, as you and your contacts will see it [%s]: "
                      % pager.default_device_name(), prompter.prompts)  # asked, as at registration

        async def named_desk():
            return [d.name for d in (await self.server.store.devices("alice"))[1]] == ["desk"]
        await self.wait_for(named_desk, "the new identity device to certify itself with the name given")
        self.assertIn("alice is registered on", text)
        self.assertIn("Safetoken of your existing account alice: ", prompter.prompts)
        self.assertNotIn("Choose", text)
        self.assertIn("Wrong safetoken; try again.", prompter.said)
        record = await self.server.store.get_user("alice")
        self.assertEqual(bytes(record.fingerprint), pager.fingerprint(session.key))
        self.assertNotEqual(bytes(record.fingerprint), pager.fingerprint(key("alice")))
        self.assertEqual(pager.load_token(self.token_path(home), PASSPHRASE, self.server_id, "alice"), token("alice"))

    async def test_script_makes_no_key(self):
        """send/fetch --register for an existing account: no key is generated, nothing is saved, exit 3."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        made = []
        self.patch(pager, "generate_private_key", lambda: made.append(1))
        os.environ.update(PAGER_TOKEN=token("alice"), PAGER_PASSPHRASE=PASSPHRASE)
        error, prompter = await self.failed_session(home, pager.NoKey, interactive=False, register=True)
        self.assertIn("alice is registered on", error.message)
        self.assertIn("import-key", error.message)
        self.assertEqual(made, [])
        self.assertEqual(pager.exit_code(error), pager.EXIT_AUTH)
        self.assertFalse(os.path.exists(os.path.join(home, self.server_id)))

    async def test_closed_server_asks_existing_token(self):
        """
        On a server with registration closed, exists is refused, and that is no answer: nobody can register there,
        so a new machine is offered only the re-key of an existing account, asked with its existing safetoken (never
        "Choose a safetoken"); a script makes no key and is told to bring the key.
        """
        await self.serve()
        await self.account("alice")
        self.server.factory.limits = dataclasses.replace(self.server.factory.limits, registration="closed")
        made = []
        real = pager.generate_private_key
        self.patch(pager, "generate_private_key", lambda: made.append(1) or real())
        session, prompter = await self.session(self.home(), ["r", token("alice"), "", PASSPHRASE, PASSPHRASE])
        text = prompter.text()
        self.assertIn("Safetoken of your existing account alice: ", prompter.prompts)
        self.assertNotIn("Choose", text)
        self.assertNotIn("does not take new users", text)
        self.assertIn("registration is closed", text)
        record = await self.server.store.get_user("alice")
        self.assertEqual(bytes(record.fingerprint), pager.fingerprint(session.key))
        home = self.home()
        made.clear()
        os.environ.update(PAGER_TOKEN=token("alice"), PAGER_PASSPHRASE=PASSPHRASE)
        error, _ = await self.failed_session(home, pager.Forbidden, interactive=False, register=True)
        self.assertIn("does not take new users", error.message)  # what --register asked for cannot happen
        self.assertIn("import-key", error.message)
        error, _ = await self.failed_session(home, pager.NoKey, interactive=False)
        self.assertIn("import-key", error.message)
        self.assertIn("registration is closed", error.message)
        self.assertEqual(made, [])

    async def test_new_key_cannot_be_saved(self):
        """A new key this machine cannot save is a local failure (exit 7), and nothing is registered."""
        await self.serve()

        def unwritable(path, key, passphrase):
            raise PermissionError(13, "Permission denied", path)
        self.patch(pager, "save_private_key", unwritable)
        chosen = "my new safetoken"
        error, _ = await self.failed_session(self.home(), pager.LocalError,
                                             ["y", chosen, chosen, "", PASSPHRASE, PASSPHRASE])
        self.assertIn("Cannot save the new key", error.message)
        self.assertEqual(pager.exit_code(error), pager.EXIT_LOCAL)
        self.assertEqual(await self.server.store.user_names(), [])

    async def test_exists_request(self):
        """exists answers whether a name is taken; a closed server refuses it as it refuses register."""
        await self.serve()
        await self.account("alice")
        client = await self.connect(self.address)
        self.assertTrue(await client.exists("Alice"))
        self.assertFalse(await client.exists("nobody"))
        self.server.factory.limits = dataclasses.replace(self.server.factory.limits, registration="closed")
        closed = await self.connect(self.address)
        with self.assertRaises(pager.Forbidden):
            await closed.exists("alice")


class PipedSecretTests(unittest.TestCase):

    async def test_input_ended_at_a_question(self):
        """
        Ctrl-D at a question ends the line the prompt left open before the error is written (not on the prompt's
        line), and the error names the question the same way for a plain one and a secret.
        """
        import getpass
        out = io.StringIO()
        prompter = pager.Prompter(reactor, interactive=True, out=out)
        self.patch(pager, "_read_line_unbuffered", lambda fd=0: None)
        with self.assertRaises(pager.Cancelled) as caught:
            await prompter.ask("Server address [localhost]: ")
        self.assertEqual((out.getvalue(), caught.exception.message),
                         ("Server address [localhost]: \n", 'Input ended at the question "Server address [localhost]".'))
        self.patch(os, "isatty", lambda fd: True)

        def eof(prompt, stream):
            stream.write(prompt)
            raise EOFError()
        self.patch(getpass, "getpass", eof)
        with self.assertRaises(pager.Cancelled) as caught:
            await prompter.secret("Passphrase for bob's key: ")
        self.assertTrue(out.getvalue().endswith("Passphrase for bob's key: \n"))
        self.assertEqual(caught.exception.message, 'Input ended at the question "Passphrase for bob\'s key".')

    async def test_no_secret_from_a_pipe(self):
        """
        connect reading a pipe asks no secret from it (a chat line would be taken for the passphrase): the hint
        names PAGER_PASSPHRASE; a plain question (y/N) is still read from the pipe.
        """
        self.patch(os, "isatty", lambda fd: False)
        read = []
        self.patch(pager, "_read_line_unbuffered", lambda fd=0: read.append(fd) or "y\n")
        prompter = pager.Prompter(reactor, interactive=True, out=io.StringIO())
        with self.assertRaises(usage.UsageError) as caught:
            await prompter.secret("Passphrase for alice's key: ",
                                  "Give the passphrase in PAGER_PASSPHRASE or with --passphrase-file.")
        self.assertEqual(str(caught.exception), "Give the passphrase in PAGER_PASSPHRASE or with --passphrase-file "
                                                "(standard input is not a terminal, so pager reads no secret from it).")
        self.assertEqual(read, [])
        self.assertTrue(await prompter.confirm("Make a new key?"))


class CommandTestCase(KeysTestCase):
    """Runs client commands in-process, as C{pager-cli} would, with standard input not a terminal."""

    def setUp(self):
        super().setUp()
        self.patch(os, "isatty", lambda fd: False)

    async def run_command(self, *argv):
        """The command's standard output; its error (a PagerError or UsageError) is raised."""
        options = pager.Options()
        options.parseOptions(list(argv))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                await pager._CLIENT_COMMANDS[options.subCommand](reactor, options.subOptions)
            except SystemExit as e:
                out.write("<exit %s>" % e.code)
        return out.getvalue()

    def private_file(self, text, mode=0o600):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text + "\n")
        os.chmod(path, mode)
        return path

    async def provision_with_token(self, name):
        """A registered user whose key (under PASSPHRASE) and kept safetoken are on this machine."""
        home = await self.provision(name, PASSPHRASE)
        pager.save_token(self.token_path(home, name), token(name), PASSPHRASE, self.server_id, name)
        return home


class PasswdTests(CommandTestCase):

    async def test_passwd(self):
        """
        passwd re-encrypts the key and the kept safetoken under the new passphrase: the old one opens neither, and
        the next command needs only the new one.  A new-passphrase file others may read is refused.
        """
        await self.serve()
        home = await self.provision_with_token("alice")
        os.environ["PAGER_PASSPHRASE"] = PASSPHRASE
        exposed = self.private_file("the new passphrase", 0o644)
        with self.assertRaises(pager.KeyFileExposed):
            await self.run_command("passwd", self.host, "--user", "alice", "--home", home,
                                   "--new-passphrase-file", exposed)
        new = self.private_file("the new passphrase")
        out = await self.run_command("passwd", self.host, "--user", "alice", "--home", home,
                                     "--new-passphrase-file", new)
        self.assertIn("Changed the passphrase", out)
        key_path = os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)
        self.assertMode(key_path, 0o600)
        self.assertRaises(pager.WrongPassphrase, pager.load_private_key, key_path, PASSPHRASE)
        self.assertRaises(pager.TokenFileError, pager.load_token, self.token_path(home), PASSPHRASE,
                          self.server_id, "alice")
        os.environ["PAGER_PASSPHRASE"] = "the new passphrase"
        session, _ = await self.session(home, interactive=False)
        self.assertEqual(session.token, token("alice"))

    async def test_passwd_needs_new_passphrase(self):
        """A script that gives no new passphrase is told how to."""
        await self.serve()
        home = await self.provision_with_token("alice")
        os.environ["PAGER_PASSPHRASE"] = PASSPHRASE
        with self.assertRaises(usage.UsageError) as caught:
            await self.run_command("passwd", self.host, "--user", "alice", "--home", home)
        self.assertIn("--new-passphrase-file", str(caught.exception))


    async def test_passwd_new_passphrase_file_empty_or_contradicted(self):
        """
        An empty new-passphrase file is refused (it would remove the passphrase unasked), and so is one given with
        --no-passphrase; the key keeps its passphrase.
        """
        await self.serve()
        home = await self.provision_with_token("alice")
        os.environ["PAGER_PASSPHRASE"] = PASSPHRASE
        empty, new = self.private_file(""), self.private_file("the new passphrase")
        for extra, words in (([empty], "is empty"), ([new, "--no-passphrase"], "give one")):
            with self.assertRaises(usage.UsageError) as caught:
                await self.run_command("passwd", self.host, "--user", "alice", "--home", home,
                                       "--new-passphrase-file", *extra)
            self.assertIn(words, str(caught.exception))
        key_path = os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)
        self.assertTrue(pager.key_file_is_encrypted(key_path))
        pager.load_private_key(key_path, PASSPHRASE)


class GivenSecretTests(CommandTestCase):
    """Secrets given to a script: an option goes before the environment, and a passphrase file is a secret's."""

    async def test_options_before_environment(self):
        """--passphrase-file and --token-file are used even when PAGER_PASSPHRASE and PAGER_TOKEN say otherwise."""
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        os.environ.update(PAGER_PASSPHRASE="not the passphrase", PAGER_TOKEN="not the safetoken")
        session, _ = await self.session(home, interactive=False, **{
            "passphrase-file": self.private_file(PASSPHRASE), "token-file": self.private_file(token("alice"))})
        self.assertEqual(session.token, token("alice"))

    async def test_passphrase_file_others_may_read(self):
        """A passphrase file others may read is refused (exit 3), as a token file is, with the chmod that fixes it."""
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        os.environ["PAGER_TOKEN"] = token("alice")
        exposed = self.private_file(PASSPHRASE, 0o644)
        error, _ = await self.failed_session(home, pager.KeyFileExposed, interactive=False,
                                             **{"passphrase-file": exposed})
        self.assertEqual(error.message, "The passphrase file %s is readable by other users (mode 644): make it "
                                        "private with 'chmod 600 %s'." % (exposed, exposed))  # one sentence
        self.assertEqual(pager.exit_code(error), pager.EXIT_AUTH)

    async def test_empty_passphrase_file_makes_no_key(self):
        """An empty passphrase file does not register a key without a passphrase: exit 2, no key, no account."""
        await self.serve()
        home = self.home()
        os.environ["PAGER_TOKEN"] = token("alice")
        error, _ = await self.failed_session(home, usage.UsageError, interactive=False, register=True,
                                             **{"passphrase-file": self.private_file("")})
        self.assertIn("is empty", str(error))
        self.assertEqual(await self.server.store.user_names(), [])
        self.assertFalse(os.path.exists(os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)))

    async def test_no_passphrase_before_environment(self):
        """--no-passphrase makes a key without one, with its warning, even when PAGER_PASSPHRASE is set."""
        await self.serve()
        home = self.home()
        os.environ.update(PAGER_TOKEN=token("alice"), PAGER_PASSPHRASE=PASSPHRASE)
        session, prompter = await self.session(home, interactive=False, register=True, **{"no-passphrase": True})
        self.assertFalse(pager.key_file_is_encrypted(session.key_path))
        self.assertTrue(any(said.startswith("Warning: --no-passphrase") for said in prompter.said))

    async def test_no_token_kept_says_why(self):
        """A script with the key but no safetoken kept here or given is told why a safetoken is needed (exit 2)."""
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        os.environ["PAGER_PASSPHRASE"] = PASSPHRASE
        error, _ = await self.failed_session(home, usage.UsageError, interactive=False)
        self.assertEqual(str(error), "This machine keeps no safetoken for alice (it keeps one once a login with it "
                                     "works), and a login needs it: give it in PAGER_TOKEN or with --token-file.")

    async def test_refused_token_says_where_it_was_given(self):
        """
        A given safetoken that fails the login is named in the one sentence (exit 3): PAGER_TOKEN's (say, another
        user's left there), or --token-file's with its path; it is refused at once, on a terminal too.
        """
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        os.environ.update(PAGER_PASSPHRASE=PASSPHRASE, PAGER_TOKEN=token("bob"))
        error, _ = await self.failed_session(home, pager.AuthFailed, interactive=False)
        self.assertEqual(error.message, "Login as alice failed: wrong safetoken (the one given in PAGER_TOKEN), or the "
                                        "server does not know this key (fingerprint %s)."
                         % pager.format_fingerprint(pager.fingerprint(key("alice"))))
        self.assertEqual(pager.exit_code(error), pager.EXIT_AUTH)
        path = self.private_file(token("bob"))
        error, prompter = await self.failed_session(home, pager.AuthFailed, **{"token-file": path})
        self.assertIn("Login as alice failed: wrong safetoken (the one given in --token-file %s), or " % path,
                      error.message)
        self.assertEqual(prompter.prompts, [])

    async def test_key_directory_cannot_be_looked_at(self):
        """
        A user directory whose key cannot be looked at (here a symbolic link to itself) is a local error (exit 7),
        not "no key here", which would advise linking or re-keying an account whose key may be right there.
        """
        await self.serve()
        home = await self.provision("alice", PASSPHRASE)
        directory = self.user_dir(home, "alice")
        os.rename(directory, directory + ".away")
        os.symlink(directory, directory)  # ELOOP, for root too (a mode of 000 would not stop root)
        os.environ.update(PAGER_TOKEN=token("alice"), PAGER_PASSPHRASE=PASSPHRASE)
        error, _ = await self.failed_session(home, pager.LocalError, interactive=False)
        self.assertIn("Cannot look for the key in %s" % directory, error.message)
        self.assertEqual(pager.exit_code(error), pager.EXIT_LOCAL)


class TokenTests(CommandTestCase):

    async def test_token(self):
        """token changes the safetoken on the server and keeps the new one here; the old one no longer logs in."""
        await self.serve()
        home = await self.provision_with_token("alice")
        os.environ["PAGER_PASSPHRASE"] = PASSPHRASE
        out = await self.run_command("token", self.host, "--user", "alice", "--home", home,
                                     "--new-token-file", self.private_file("a brand new safetoken"))
        self.assertIn("Changed alice's safetoken", out)
        self.assertEqual(pager.load_token(self.token_path(home), PASSPHRASE, self.server_id, "alice"),
                         "a brand new safetoken")
        client = await self.connect(self.address)
        with self.assertRaises(pager.AuthFailed):
            await client.login("alice", token("alice"), key("alice"))
        await client.login("alice", "a brand new safetoken", key("alice"))

    async def test_change_token_request(self):
        """change_token needs a login and the current safetoken; a short new one is bad_request."""
        await self.serve()
        await self.account("alice")
        client = await self.connect(self.address)
        with self.assertRaises(pager.NotAuthenticated):
            await client.change_token(token("alice"), "a brand new safetoken")
        await client.login("alice", token("alice"), key("alice"))
        with self.assertRaises(pager.BadRequest):
            await client.change_token(token("alice"), "short")
        with self.assertRaises(pager.AuthFailed):
            await client.change_token("not the token", "a brand new safetoken")
        record = await self.server.store.get_user("alice")
        self.assertTrue(pager.check_token(token("alice"), bytes(record.token_salt), bytes(record.token_hash)))


class VerifyTests(CommandTestCase):

    async def test_fingerprint_trust_verify(self):
        """
        fingerprint shows new, then pinned after trust, verified after verify with the right fingerprint (a wrong
        one changes nothing), and changed (exit 5) after bob re-keys; fetch --json reports the same status.
        """
        await self.serve()
        await self.account("bob")
        home = await self.provision_with_token("alice")
        os.environ["PAGER_PASSPHRASE"] = PASSPHRASE
        common = (self.host, "--user", "alice", "--home", home)
        bob_fp = pager.fingerprint(key("bob"))

        async def status():
            out = await self.run_command("fingerprint", *common, "bob", "--json")
            return json.loads(out.split("<exit")[0]), out

        self.assertEqual((await status())[0], {"user": "bob", "fingerprint": bob_fp.hex(), "status": "new"})
        self.assertIn("pinned", await self.run_command("trust", *common, "bob"))
        self.assertEqual((await status())[0]["status"], "pinned")
        with self.assertRaises(pager.KeyChanged):
            await self.run_command("verify", *common, "bob", "--fingerprint", "00" * 32)
        self.assertEqual((await status())[0]["status"], "pinned")
        with self.assertRaises(usage.UsageError):
            await self.run_command("verify", *common, "bob")  # a script must say what it compared
        spaced = pager.format_fingerprint(bob_fp)
        self.assertIn("verified", await self.run_command("verify", *common, "bob", "--fingerprint", spaced))
        self.assertEqual((await status())[0]["status"], "verified")
        self.assertIn("nothing changed", await self.run_command("trust", *common, "bob"))
        self.assertEqual((await status())[0]["status"], "verified")  # trusting the pinned key undoes no verify

        bob = await self.login(self.address, "bob")
        await bob.send("alice", "hello alice")
        await bob.close()
        fetched = await self.run_command("fetch", *common, "--json")
        self.assertEqual(json.loads(fetched)["key_status"], "verified")

        rekeyed = await self.connect(self.address)
        await rekeyed.rekey("bob", token("bob"), key("bob"), key("bob-new"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            record, out = await status()
        self.assertEqual(record["status"], "changed")
        self.assertIn("<exit %d>" % pager.EXIT_KEY_TRUST, out)
        [line] = err.getvalue().splitlines()  # exit 5 says why, in one sentence
        self.assertIn("pager: bob's key is not the one pinned on this machine", line)
        command = "pager-cli trust %s --user alice --home %s bob" % (self.host, home)
        self.assertIn("accept it with '%s'" % command, line)  # a command that runs as it is printed
        self.assertIn("'pager-cli verify %s --user alice --home %s bob'" % (self.host, home), line)
        new_fp = pager.fingerprint(key("bob-new"))
        # The chat's rule: a changed key is accepted with trust before it can be verified (exit 5, nothing marked).
        with self.assertRaises(pager.KeyChanged) as caught:
            await self.run_command("verify", *common, "bob", "--fingerprint", new_fp.hex())
        self.assertIn("changed since you pinned it", caught.exception.message)
        self.assertIn("accept it with '%s'" % command, caught.exception.message)
        self.assertEqual((await status())[0]["status"], "changed")
        self.assertIn("pinned", await self.run_command(*shlex.split(command)[1:]))
        self.assertEqual((await status())[0]["status"], "pinned")  # a new pin is not verified
        self.assertIn("verified", await self.run_command("verify", *common, "bob", "--fingerprint", new_fp.hex()))
        self.assertEqual((await status())[0]["status"], "verified")

    async def test_store_set_verified(self):
        """set_verified marks only the pinned fingerprint; a new pin clears it; an old store gains the column."""
        path = os.path.abspath(self.mktemp())
        import sqlite3
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE pins (user TEXT PRIMARY KEY, public_key TEXT NOT NULL, fingerprint BLOB NOT NULL,"
                     " pinned_at REAL NOT NULL)")
        conn.execute("INSERT INTO pins VALUES ('bob', 'pem', ?, 1.0)", (b"\x01" * 32,))
        conn.commit()
        conn.close()
        store = pager.LocalStore(path, reactor)
        self.addCleanup(store.close)
        await store.open(reactor.seconds())
        self.assertEqual(pager.key_status(await store.get_pin("bob"), b"\x01" * 32), "pinned")
        self.assertFalse(await store.set_verified("bob", b"\x02" * 32))
        self.assertFalse(await store.set_verified("carol", b"\x01" * 32))
        self.assertTrue(await store.set_verified("bob", b"\x01" * 32))
        self.assertEqual(pager.key_status(await store.get_pin("bob"), b"\x01" * 32), "verified")
        self.assertEqual(pager.key_status(await store.get_pin("bob"), b"\x02" * 32), "changed")
        await store.set_pin("bob", "pem", b"\x02" * 32, 2.0)
        self.assertEqual(pager.key_status(await store.get_pin("bob"), b"\x02" * 32), "pinned")


class LoginCommandPromptTests(CommandTestCase):
    """Every command that logs in asks for the key's passphrase on a terminal, and off one says how to give it."""

    def terminal(self, stdin=True, stderr=True):
        self.patch(os, "isatty", lambda fd: {0: stdin, 2: stderr}.get(fd, False))
        asked = []

        async def secret(prompter, prompt, hint=None):
            if not prompter.interactive:
                raise usage.UsageError(hint)
            asked.append(prompt)
            return PASSPHRASE
        self.patch(pager.Prompter, "secret", secret)
        return asked

    async def test_asks_on_a_terminal(self):
        """
        send, fetch, users, group, groups, fingerprint and trust ask for the passphrase on a terminal, as verify
        does; with standard input or standard error not a terminal, each refuses naming PAGER_PASSPHRASE, unasked.
        """
        await self.serve()
        await self.account("carol")
        home = await self.provision_with_token("alice")
        common = (self.host, "--user", "alice", "--home", home)
        commands = [("send", *common, "--to", "carol", "hi"), ("fetch", *common), ("users", *common),
                    ("group", *common, "create", "ops"), ("groups", *common), ("fingerprint", *common, "carol"),
                    ("trust", *common, "carol")]
        for argv in commands:
            asked = self.terminal()
            await self.run_command(*argv)
            self.assertEqual(asked, ["Passphrase for alice's key: "], argv[0])
            for stdin, stderr in ((False, True), (True, False)):
                asked = self.terminal(stdin, stderr)
                with self.assertRaises(usage.UsageError) as caught:
                    await self.run_command(*argv)
                self.assertEqual(str(caught.exception), "The key is encrypted: give its passphrase in "
                                                        "PAGER_PASSPHRASE or with --passphrase-file.", argv[0])
                self.assertEqual(asked, [], argv[0])

    def test_help_says_every_command_asks(self):
        """--help says that every command asks on a terminal for a passphrase not given."""
        for command in ("send", "fetch", "users", "group", "groups", "fingerprint", "trust"):
            options = dict((name, o) for name, _, o, _ in pager.Options().subCommands)[command]()
            text = " ".join(str(options).split())
            self.assertIn("connect asks for it, and so does every other command on a terminal", text, command)


class DamagedKeyFileTests(KeysTestCase):
    """A damaged key file says so and exits 3, without asking for a passphrase it could never take."""

    async def test_damaged(self):
        await self.serve()
        await self.account("alice")
        encrypted = pager.encode_private_key(key("alice"), PASSPHRASE)
        plain = bytearray(pager.encode_private_key(key("alice"), ""))
        plain[len(plain) // 2] ^= 0xFF
        cases = {"truncated": encrypted[:len(encrypted) // 2], "corrupt, no passphrase": bytes(plain),
                 "empty": b"", "truncated PEM": pager.public_key_pem(key("alice").public_key()).encode()[:100]
                 .replace(b"PUBLIC", b"PRIVATE"), "directory": None}
        for what, data in cases.items():
            home = self.home()
            directory = pager.user_directory(home, self.server_id, "alice")
            path = os.path.join(directory, pager.KEY_FILE_NAME)
            if data is None:
                os.mkdir(path)
                os.chmod(path, 0o755)  # as mkdir leaves it under the usual umask: the mode is not the fault
            else:
                pager.write_private_file(path, data)
            error, prompter = await self.failed_session(home, pager.KeyFileError, ["a passphrase"] * 3)
            # The phrase, not the word: the test's own temporary path holds "damaged" too.
            self.assertIn("The key file %s is damaged" % path, error.message, what)
            self.assertNotIn("chmod", error.message, what)
            self.assertFalse(isinstance(error, pager.WrongPassphrase), what)
            self.assertEqual(prompter.prompts, [], what)
            self.assertEqual(pager.exit_code(error), pager.EXIT_AUTH, what)


class ImportKeyTests(CommandTestCase):

    async def test_import_checks_registered_key(self):
        """
        import-key of a key that is not alice's registered key is refused and installs nothing; her own key is
        installed with the safetoken kept, so the next command needs only the passphrase.
        """
        await self.serve()
        await self.account("alice")
        home = self.home()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        files = {}
        for name in ("alice", "mallory"):
            files[name] = os.path.join(directory, name + ".p12")
            pager.write_private_file(files[name], pager.encode_private_key(key(name), ""))
        os.environ.update(PAGER_TOKEN=token("alice"), PAGER_PASSPHRASE=PASSPHRASE)
        with self.assertRaises(pager.AuthFailed) as caught:
            await self.run_command("import-key", self.host, "--user", "alice", "--home", home, files["mallory"])
        self.assertIn("not the key registered for alice", caught.exception.message)
        key_path = os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)
        self.assertFalse(os.path.exists(key_path))
        self.assertFalse(os.path.exists(self.token_path(home)))
        self.assertEqual(bytes((await self.server.store.get_user("alice")).fingerprint),
                         pager.fingerprint(key("alice")))

        await self.run_command("import-key", self.host, "--user", "alice", "--home", home, files["alice"])
        installed = pager.load_private_key(key_path, PASSPHRASE)
        self.assertEqual(pager.fingerprint(installed), pager.fingerprint(key("alice")))
        del os.environ["PAGER_TOKEN"]
        session, _ = await self.session(home, interactive=False)
        self.assertEqual(session.token, token("alice"))

    async def test_import_needs_token(self):
        """A script importing a key without the safetoken is told to give it; nothing is installed."""
        await self.serve()
        await self.account("alice")
        home = self.home()
        path = os.path.abspath(self.mktemp())
        pager.write_private_file(path, pager.encode_private_key(key("alice"), ""))
        with self.assertRaises(usage.UsageError) as caught:
            await self.run_command("import-key", self.host, "--user", "alice", "--home", home, "--no-passphrase",
                                   path)
        self.assertIn("PAGER_TOKEN", str(caught.exception))
        self.assertFalse(os.path.exists(os.path.join(self.user_dir(home, "alice"), pager.KEY_FILE_NAME)))


class HelpTests(unittest.TestCase):

    def test_help(self):
        """Each key command's --help describes its own options."""
        cases = {"passwd": ["--new-passphrase-file", "--no-passphrase", "--passphrase-file"],
                 "token": ["--new-token-file", "--token-file"], "verify": ["--fingerprint", "PEER"],
                 "trust": ["PEER"], "fingerprint": ["--json", "PEER"], "import-key": ["safetoken"]}
        commands = dict((name, options) for name, _, options, _ in pager.Options().subCommands)
        for name, words in cases.items():
            text = str(commands[name]())
            for word in words:
                self.assertIn(word, text, "%s missing from %s --help" % (word, name))
