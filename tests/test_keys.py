"""
One secret per login and keys that are easy to manage: the safetoken kept under the key's passphrase, the
registration and new-machine prompts, changing the passphrase and the safetoken, pinned versus verified keys, and
damaged or exposed key and token files.  Sessions run in-process with a scripted prompter.
"""

import dataclasses
import json
import os
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


class OneSecretTests(KeysTestCase):
    """Registration asks the safetoken twice and keeps it; later logins ask for the passphrase alone."""

    async def test_register_then_passphrase_only(self):
        """
        A first connect asks before registering, asks the safetoken twice (again when the two differ) and the
        passphrase twice; the next login asks only for the passphrase, and the token file is 0600 and encrypted.
        """
        await self.serve()
        home = self.home()
        chosen = "my new safetoken"
        session, prompter = await self.session(home, [
            "y", chosen, "a typo token", chosen, chosen, PASSPHRASE, PASSPHRASE])
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
        connect says the account exists, asks before re-keying, then asks for the existing safetoken (not a new
        one; three tries) and keeps it with the new key.
        """
        await self.serve()
        await self.account("alice")
        home = self.home()
        session, prompter = await self.session(home, ["y", "not my token", PASSPHRASE, PASSPHRASE, token("alice")])
        text = prompter.text()
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
