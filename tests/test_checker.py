"""
Tests for the server's signature checker: the loop of its process (signature_checker_main), the SignatureChecker
that runs that process from the server, and the store's places kept for checks still waiting (Store.reserve/fill).
"""

import os
import signal

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

import pager

_KEYS = []


def _keys():
    """Two RSA keys, generated once for the whole module."""
    if not _KEYS:
        _KEYS.extend(pager.generate_private_key() for _ in range(2))
    return _KEYS


def _signed(key, recipient_key, text=b"hello"):
    """A sealed envelope from C{key}: C{(its device id as the header names it, digest, signature)}."""
    envelope = pager.seal(key, "alice", {"bob": recipient_key.public_key()}, text)
    verifier = pager.EnvelopeVerifier(envelope.header)
    for chunk in envelope.chunks:
        verifier.update(chunk)
    return verifier.header.sender_device, verifier.digest(), envelope.signature


def _key_record(slot, key):
    der = key.public_key().public_bytes(pager.serialization.Encoding.DER,
                                        pager.serialization.PublicFormat.SubjectPublicKeyInfo)
    return pager._KEY_RECORD.pack(b"K", slot, len(der)) + der


def _check_record(slot, device, digest, signature):
    return pager._KEY_RECORD.pack(b"V", slot, len(signature)) + device + digest + signature


def _run_loop(data, piece=None):
    """What signature_checker_main answers to C{data}, read C{piece} bytes at a time (all at once by default)."""
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)] if piece else [data]
    pieces.append(b"")  # the end of its input
    written = []

    def write(view):
        written.append(bytes(view))
        return len(view)

    pager.signature_checker_main(read=lambda: pieces.pop(0), write=write)
    return b"".join(written), len(written)


class CheckerLoopTests(unittest.SynchronousTestCase):
    """The loop of the checker process, fed records as its pipe would give them."""

    def test_answers(self):
        """
        Each check is answered in order: 1 when the signature verifies against the slot's key, 0 when it does not,
        2 when the slot's key is not the device the header names or no key was given the slot.
        """
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        other = pager.device_id(bob)
        forged = bytes([signature[0] ^ 1]) + signature[1:]
        data = (_key_record(0, alice) + _key_record(1, bob)
                + _check_record(0, device, digest, signature)
                + _check_record(0, device, digest, forged)
                + _check_record(0, device, bytes(32), signature)  # another digest than the one signed
                + _check_record(1, device, digest, signature)  # bob's key, but the header names alice's device
                + _check_record(1, other, digest, signature)  # bob's key and device: the signature is not bob's
                + _check_record(7, device, digest, signature)  # a slot never given a key
                + _check_record(0, device, digest, signature[:10]))  # a signature of the wrong length
        self.assertEqual(_run_loop(data), (b"1002020", 1))

    def test_recordsAcrossReads(self):
        """Records split across reads however the pipe splits them are answered the same, with one write a read."""
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        data = _key_record(3, alice) + _check_record(3, device, digest, signature) * 3
        answers, writes = _run_loop(data, piece=7)
        self.assertEqual(answers, b"111")
        self.assertEqual(writes, 3)  # only reads that completed a check write

    def test_slotGivenAnew(self):
        """A slot given another key checks against that key from then on."""
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        data = (_key_record(0, alice) + _check_record(0, device, digest, signature)
                + _key_record(0, bob) + _check_record(0, device, digest, signature))
        self.assertEqual(_run_loop(data)[0], b"12")

    def test_damagedKey(self):
        """A key record that does not parse leaves its slot keyless: its checks are refused, not a crash."""
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        data = pager._KEY_RECORD.pack(b"K", 0, 5) + b"junk!" + _check_record(0, device, digest, signature)
        self.assertEqual(_run_loop(data)[0], b"2")


class SignatureCheckerTests(unittest.TestCase):
    """SignatureChecker with a real checker process."""

    timeout = 60

    def setUp(self):
        self.checker = pager.SignatureChecker(reactor)
        self.checker.RESTART_DELAY = 0.05
        self.checker.start()
        self.addCleanup(self.checker.stop)

    def check(self, device, key, digest, signature, named=None):
        """The answer to a check of C{key}, C{device}'s, the header naming C{named} (C{device} by default)."""
        d = defer.Deferred()
        self.checker.check(device, key, named or device, digest, signature, d.callback)
        return d

    async def test_answers(self):
        """
        A good signature, a forged one, one checked against a device other than the one the header names, and
        another device's signature get their answers, in the order asked.
        """
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        forged = bytes([signature[0] ^ 1]) + signature[1:]
        answers = await defer.gatherResults([
            self.check(device, alice.public_key(), digest, signature),
            self.check(device, alice.public_key(), digest, forged),
            self.check(pager.device_id(bob), bob.public_key(), digest, signature, named=device),
            self.check(pager.device_id(bob), bob.public_key(), digest, signature),
            self.check(device, alice.public_key(), digest, signature),
        ])
        self.assertEqual(answers, [None, pager.BadSignature, pager.WrongSenderKey, pager.BadSignature, None])

    async def test_manyKeysFewSlots(self):
        """More devices than the process keeps keys for: the slots are given anew, and every check is right."""
        self.checker.KEY_SLOTS = 1
        alice, bob = _keys()
        from_alice = _signed(alice, bob)
        from_bob = _signed(bob, alice)
        checks = []
        for _ in range(3):
            checks.append(self.check(from_alice[0], alice.public_key(), *from_alice[1:]))
            checks.append(self.check(from_bob[0], bob.public_key(), *from_bob[1:]))
        self.assertEqual(await defer.gatherResults(checks), [None] * 6)

    async def test_processDies(self):
        """
        When the process dies, the checks it did not answer are answered "unknown" (the server then checks them
        itself); a new process is started, which answers the checks that come after.
        """
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        await self.check(device, alice.public_key(), digest, signature)  # the process is up and answering
        waiting = [self.check(device, alice.public_key(), digest, signature) for _ in range(3)]
        self.checker.transport.signalProcess(signal.SIGKILL)
        answers = await defer.gatherResults(waiting)
        self.assertTrue(set(answers) <= {None, "unknown"}, answers)
        self.assertIn("unknown", answers)
        self.assertFalse(self.checker.running)
        self.assertEqual(await self.check(device, alice.public_key(), digest, signature), "unknown")  # none runs
        while not self.checker.running:
            await task.deferLater(reactor, 0.05)
        self.assertEqual(await self.check(device, alice.public_key(), digest, signature), None)

    async def hang(self, stall_timeout):
        """
        Once the process has answered a check (it has started), stop it (SIGSTOP) with C{stall_timeout}; returns
        a check to ask it: C{(device, key, digest, signature)}.
        """
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        self.assertEqual(await self.check(device, alice.public_key(), digest, signature), None)
        self.checker.STALL_TIMEOUT = stall_timeout
        os.kill(self.checker.transport.pid, signal.SIGSTOP)
        return device, alice.public_key(), digest, signature

    async def test_stalled(self):
        """A process that stops answering while checks wait is killed, and the checks are answered "unknown"."""
        check = await self.hang(0.2)
        self.assertEqual(await self.check(*check), "unknown")

    async def test_answersNotAsked(self):
        """
        A process that answers what it was not asked (a damaged or foreign program) is killed; what waited is
        answered "unknown", for the server to check itself.
        """
        waiting = self.check(*await self.hang(30))
        self.checker.outReceived(b"x")  # not an answer byte
        self.assertEqual(await waiting, "unknown")

    async def test_stopHung(self):
        """A process that does not end when told to (stopped) is killed after STALL_TIMEOUT."""
        await self.hang(0.2)
        await self.checker.stop()
        self.assertFalse(self.checker.running)

    async def test_stop(self):
        """stop lets the process answer what it was asked, then fires once it has ended; no new one is started."""
        alice, bob = _keys()
        device, digest, signature = _signed(alice, bob)
        asked = self.check(device, alice.public_key(), digest, signature)
        await self.checker.stop()
        self.assertEqual(await asked, None)
        self.assertFalse(self.checker.running)
        await task.deferLater(reactor, 0.2)
        self.assertFalse(self.checker.running)


class ReservedPlaceTests(unittest.TestCase):
    """The store keeps the order of operations around a place reserved for one not known yet."""

    timeout = 30

    def setUp(self):
        self.store = pager.Store(self.mktemp(), reactor)
        self.addCleanup(self.store.close)
        return self.store.open()

    async def test_laterOperationsWait(self):
        """Operations submitted after a reserved place run after the operation that fills it, in order."""
        ran = []

        def record(txn, name):
            ran.append(name)
            return name

        done = []
        self.store.submit(record, ("first",), done.append, self.fail)
        place = self.store.reserve()
        self.store.submit(record, ("third",), done.append, self.fail)
        finished = defer.Deferred()
        self.store.submit(record, ("fourth",), lambda name: finished.callback(done.append(name)), self.fail)
        await task.deferLater(reactor, 0.05)
        self.assertEqual(ran, ["first"])  # the others wait for the place
        self.store.fill(place, record, ("second",), done.append, self.fail)
        await finished
        self.assertEqual(ran, ["first", "second", "third", "fourth"])
        self.assertEqual(done, ["first", "second", "third", "fourth"])

    async def test_filledTogether(self):
        """Places filled one after the other in one turn of the reactor run in one batch (one transaction)."""
        batches = []
        original = pager._batch_txn

        def counting(txn, operations):
            batches.append(len(operations))
            return original(txn, operations)

        self.patch(pager, "_batch_txn", counting)
        places = [self.store.reserve() for _ in range(5)]
        finished = defer.Deferred()
        for i, place in enumerate(places):
            self.store.fill(place, pager._nothing_txn, (), (lambda _: finished.callback(None)) if i == 4 else
                            (lambda _: None), self.fail)
        await finished
        self.assertEqual(batches, [5])
