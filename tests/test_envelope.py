"""
Tests for the envelope section of L{pager}: sealing, opening, tampering, forgery, keys, auth proofs and user names.

RSA keys are generated once per module (L{_key}); most messages use the smallest chunk size so that multi-chunk
cases stay fast, and L{DefaultChunkRoundTripTests} covers the default 64 KiB chunk.
"""

import dataclasses
import hashlib
import hmac
import os
import shutil
import struct
import subprocess
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import pager

SMALL = pager.MIN_CHUNK_SIZE  # 1024
TAG = pager.GCM_TAG_SIZE
PROPERTY = settings(max_examples=200, deadline=None, database=None)

_KEYS = {}


def _key(name):
    """The module's RSA-2048 private key for C{name}, generated on first use."""
    if name not in _KEYS:
        _KEYS[name] = pager.generate_private_key()
    return _KEYS[name]


def _pub(name):
    return _key(name).public_key()


def _seal(plaintext, recipients=("bob",), sender="alice", chunk_size=SMALL, **kwargs):
    """Seal C{plaintext} from C{sender} to C{recipients} with the module's keys."""
    return pager.seal(_key(sender), sender, {name: _pub(name) for name in recipients}, plaintext,
                      chunk_size=chunk_size, **kwargs)


def _open(envelope, recipient="bob", sender="alice", private_key=None, sender_key=None):
    """Open C{envelope} as C{recipient}, checking it against C{sender}'s public key."""
    return pager.open_envelope(
        envelope, private_key or _key(recipient), recipient, sender_key or _pub(sender))


def _flip(data, index, mask=0x01):
    data = bytearray(data)
    data[index] ^= mask
    return bytes(data)


def _layout(header):
    """
    Name every byte range of a header, walking the documented layout without L{pager.parse_header}: a list of
    C{(name, start, end)} covering the whole header in order.
    """
    fields = []
    pos = 0

    def fixed(name, size):
        nonlocal pos
        fields.append((name, pos, pos + size))
        pos += size
        return header[pos - size:pos]

    def lp(name):
        (n,) = struct.unpack(">I", fixed(name + " length", 4))
        fixed(name, n)

    lp("tag")
    lp("message id")
    fixed("timestamp", 8)
    lp("sender")
    lp("sender fingerprint")
    lp("sender device")
    lp("content type")
    lp("filename")
    fixed("chunk size", 4)
    (count,) = struct.unpack(">I", fixed("recipient count", 4))
    for i in range(count):
        lp("recipient %d name" % i)
        lp("recipient %d device" % i)
        (kind,) = fixed("recipient %d kind" % i, 1)
        if kind == 2:
            fixed("recipient %d signed prekey id" % i, 4)
            fixed("recipient %d one-time prekey id" % i, 4)
            lp("recipient %d ephemeral key" % i)
        lp("recipient %d wrapped key" % i)
    lp("commitment")
    assert pos == len(header), "layout walk did not end at the end of the header"
    return fields


def _field(header, name):
    """The bytes of the header field called C{name} in L{_layout}."""
    for field, start, end in _layout(header):
        if field == name:
            return header[start:end]
    raise KeyError(name)


def _reheader(header, **changes):
    """A header re-encoded with L{pager._encode_header} from C{header}'s fields, some of them changed."""
    h = pager.parse_header(header)
    fields = dict(
        message_id=h.message_id, timestamp_ms=h.timestamp_ms, sender=h.sender, sender_fp=h.sender_fingerprint,
        sender_device=h.sender_device, content_type=h.content_type, filename=h.filename, chunk_size=h.chunk_size,
        entries=list(h.entries), commitment=h.commitment,
    )
    fields.update(changes)
    return pager._encode_header(**fields)


def _encrypt_chunks(header, content_key, plaintext):
    """Chunk ciphertexts for C{plaintext} under C{header}, built from the documented layout without L{pager.Sealer}."""
    size = pager.parse_header(header).chunk_size
    pieces = [plaintext[i:i + size] for i in range(0, len(plaintext), size)] or [b""]
    aead = AESGCM(content_key)
    ad = hashlib.sha256(header).digest()
    return [
        aead.encrypt(i.to_bytes(11, "big") + (b"\x01" if i == len(pieces) - 1 else b"\x00"), piece, ad)
        for i, piece in enumerate(pieces)
    ]


def _sign(private_key, header, chunks):
    """An RSA-PSS signature by C{private_key} over C{header} and C{chunks}, as a sender makes it."""
    data = pager.signed_bytes(header, len(chunks), sum(len(c) for c in chunks),
                              hashlib.sha256(b"".join(chunks)).digest())
    return private_key.sign(data, pager._PSS, hashes.SHA256())


def _unwrap(envelope, name):
    """The content key, as recipient C{name} unwraps it from C{envelope}'s header with their private key."""
    wrapped = _entry(pager.parse_header(envelope.header), name).wrapped
    return _key(name).decrypt(wrapped, pager._OAEP)


def _entry(header, name):
    """The header's entry for C{name}'s device with the module's key for C{name}."""
    return header.entry(name, pager.device_id(_key(name)))


def _wrap(name, content_key):
    return pager.Wrap(name, pager.device_id(_key(name)), pager.WRAP_RSA, _pub(name).encrypt(content_key, pager._OAEP))


def _build(plaintext, keys, committed, signer="alice"):
    """
    A message from alice built from the documented layout without L{pager.Sealer}: C{keys} maps each recipient to
    the content key wrapped for them, C{committed} is the key the header commits to and the chunks are encrypted
    with, and C{signer} signs it.
    """
    mid = os.urandom(16)
    header = pager._encode_header(mid, 1, "alice", pager.fingerprint(_key("alice")), pager.device_id(_key("alice")),
                                  "text", "", SMALL, [_wrap(name, key) for name, key in sorted(keys.items())],
                                  pager._commitment(mid, committed))
    chunks = _encrypt_chunks(header, committed, plaintext)
    return pager.Envelope(header, chunks, _sign(_key(signer), header, chunks))


class _RoundTripMixin:
    """Round trips at the sizes around one chunk size (set by the subclass)."""

    chunk_size = None

    def assertRoundTrip(self, size, expected_chunks):
        plaintext = os.urandom(size)
        envelope = _seal(plaintext, chunk_size=self.chunk_size)
        self.assertEqual(len(envelope.chunks), expected_chunks)
        self.assertEqual(envelope.size, size)
        for chunk in envelope.chunks[:-1]:
            self.assertEqual(len(chunk), self.chunk_size + TAG)
        opened = _open(envelope)
        self.assertEqual(opened.plaintext, plaintext)
        self.assertEqual(opened.sender, "alice")
        self.assertEqual(opened.recipients, ("bob",))

    def test_empty(self):
        """An empty message seals to one tag-only chunk and opens to empty plaintext."""
        self.assertRoundTrip(0, 1)

    def test_one_byte(self):
        """A one-byte message round-trips in one chunk."""
        self.assertRoundTrip(1, 1)

    def test_chunk_minus_one(self):
        """A message one byte short of a chunk round-trips in one chunk."""
        self.assertRoundTrip(self.chunk_size - 1, 1)

    def test_exactly_one_chunk(self):
        """A message of exactly one chunk round-trips in one (final, full) chunk."""
        self.assertRoundTrip(self.chunk_size, 1)

    def test_chunk_plus_one(self):
        """A message one byte over a chunk round-trips in a full chunk plus a one-byte final chunk."""
        self.assertRoundTrip(self.chunk_size + 1, 2)

    def test_three_kib(self):
        """A 3 KiB message round-trips."""
        self.assertRoundTrip(3 * 1024, -(-3 * 1024 // self.chunk_size))


class SmallChunkRoundTripTests(_RoundTripMixin, SynchronousTestCase):
    chunk_size = SMALL


class DefaultChunkRoundTripTests(_RoundTripMixin, SynchronousTestCase):
    chunk_size = pager.CHUNK_SIZE

    def test_default_chunk_size(self):
        """Sealing without a chunk size uses 64 KiB chunks."""
        envelope = pager.seal(_key("alice"), "alice", {"bob": _pub("bob")}, b"x" * 70000)
        self.assertEqual(pager.parse_header(envelope.header).chunk_size, 65536)
        self.assertEqual([len(c) for c in envelope.chunks], [65536 + TAG, 70000 - 65536 + TAG])

    def test_ten_mib(self):
        """A 10 MiB message round-trips in 160 chunks of the default size."""
        plaintext = os.urandom(10 * 1024 * 1024)
        envelope = pager.seal(_key("alice"), "alice", {"bob": _pub("bob")}, plaintext)
        self.assertEqual(len(envelope.chunks), 160)
        self.assertEqual(_open(envelope).plaintext, plaintext)


class OpenedFieldsTests(SynchronousTestCase):
    def test_text_fields(self):
        """Every field of an opened text message is the one the sender sealed."""
        message_id = bytes(range(16))
        envelope = _seal(b"disk full", recipients=("dave", "bob", "carol"), message_id=message_id,
                         timestamp_ms=1700000000123)
        for name in ("bob", "carol", "dave"):
            opened = _open(envelope, name)
            self.assertEqual(opened.message_id, message_id)
            self.assertEqual(opened.sender, "alice")
            self.assertEqual(opened.sender_fingerprint, pager.fingerprint(_key("alice")))
            self.assertEqual(opened.recipients, ("bob", "carol", "dave"))
            self.assertEqual(opened.timestamp, 1700000000.123)
            self.assertEqual(opened.content_type, "text")
            self.assertEqual(opened.filename, "")
            self.assertEqual(opened.plaintext, b"disk full")
            self.assertIsNone(opened.accepted_at)

    def test_file_fields(self):
        """A file message opens with content type file and its (UTF-8) file name."""
        envelope = _seal(b"%PDF-1.7", content_type="file", filename="r\u00e9sum\u00e9.pdf")
        opened = _open(envelope)
        self.assertEqual(opened.content_type, "file")
        self.assertEqual(opened.filename, "r\u00e9sum\u00e9.pdf")
        self.assertEqual(opened.plaintext, b"%PDF-1.7")

    def test_fresh_message_id_and_time(self):
        """Without a message id or time, each seal gets a fresh 16-byte id and the current time."""
        first, second = _seal(b"a"), _seal(b"a")
        h1, h2 = pager.parse_header(first.header), pager.parse_header(second.header)
        self.assertEqual(len(h1.message_id), 16)
        self.assertNotEqual(h1.message_id, h2.message_id)
        self.assertLess(abs(h1.timestamp_ms / 1000.0 - time.time()), 60)

    def test_sealer_message_id(self):
        """Sealer.message_id is the id written in the header."""
        sealer = pager.Sealer(_key("alice"), "alice", {"bob": _pub("bob")}, message_id=b"m" * 16)
        self.assertEqual(sealer.message_id, b"m" * 16)


class MessageIdTests(SynchronousTestCase):
    """The message id pager makes: the header's timestamp first, so that a queue's ids sit together, then 80 random bits."""

    def test_timestamp_then_random(self):
        envelope = _seal(b"hi", timestamp_ms=1795692390082)
        header = pager.parse_header(envelope.header)
        self.assertEqual(header.message_id[:6], bytes.fromhex("01a2179b66c2"))
        self.assertEqual(header.timestamp_ms, 1795692390082)
        again = pager.parse_header(_seal(b"hi", timestamp_ms=1795692390082).header).message_id
        self.assertEqual(again[:6], header.message_id[:6])
        self.assertNotEqual(again[6:], header.message_id[6:])

    def test_ids_sort_as_their_times(self):
        ids = [pager.new_message_id(ms) for ms in (1, 255, 256, 1795692390082, 2 ** 48 - 1)]
        self.assertEqual(sorted(ids), ids)
        self.assertEqual({len(i) for i in ids}, {pager.MESSAGE_ID_SIZE})
        self.assertEqual(len({pager.new_message_id(7)[6:] for _ in range(1000)}), 1000)


class IncrementalTests(SynchronousTestCase):
    def _seal_in_pieces(self, plaintext, piece, chunk_size=SMALL):
        sealer = pager.Sealer(_key("alice"), "alice", {"bob": _pub("bob")}, chunk_size=chunk_size)
        chunks = []
        for i in range(0, len(plaintext), piece):
            chunks += sealer.update(plaintext[i:i + piece])
            chunks += sealer.update(b"")
        last, signature = sealer.finish()
        return pager.Envelope(sealer.header, chunks + last, signature)

    def test_one_byte_pieces(self):
        """Sealing one byte at a time gives full chunks and an envelope that opens to the same plaintext."""
        plaintext = os.urandom(3 * SMALL + 100)
        envelope = self._seal_in_pieces(plaintext, 1)
        self.assertEqual([len(c) for c in envelope.chunks], [SMALL + TAG] * 3 + [100 + TAG])
        self.assertEqual(_open(envelope).plaintext, plaintext)

    def test_odd_pieces(self):
        """Sealing in 7777-byte pieces gives an envelope that opens to the same plaintext."""
        plaintext = os.urandom(100000)
        envelope = self._seal_in_pieces(plaintext, 7777)
        self.assertEqual(len(envelope.chunks), -(-100000 // SMALL))
        self.assertEqual(_open(envelope).plaintext, plaintext)

    def test_odd_pieces_default_chunk(self):
        """Sealing 200000 bytes in 7777-byte pieces with 64 KiB chunks opens to the same plaintext."""
        plaintext = os.urandom(200000)
        envelope = self._seal_in_pieces(plaintext, 7777, chunk_size=pager.CHUNK_SIZE)
        self.assertEqual(len(envelope.chunks), 4)
        self.assertEqual(_open(envelope).plaintext, plaintext)

    def test_exact_multiple_holds_last_chunk(self):
        """A chunk completed by update is held back until more data comes, so a whole-chunk message ends in finish."""
        sealer = pager.Sealer(_key("alice"), "alice", {"bob": _pub("bob")}, chunk_size=SMALL)
        self.assertEqual(sealer.update(b"x" * SMALL), [])
        self.assertEqual(len(sealer.update(b"y")), 1)
        last, _ = sealer.finish()
        self.assertEqual([len(c) for c in last], [1 + TAG])

    def test_opener_releases_nothing_before_finish(self):
        """Opener.update returns nothing for any chunk; the plaintext comes only from finish."""
        plaintext = os.urandom(5 * SMALL + 3)
        envelope = _seal(plaintext)
        opener = pager.Opener(envelope.header, _key("bob"), "bob")
        for chunk in envelope.chunks:
            self.assertIsNone(opener.update(chunk))
        self.assertEqual(opener.finish(envelope.signature, _pub("alice")).plaintext, plaintext)

    def test_opener_reports_bad_chunk_early(self):
        """A tampered chunk is reported by the update that follows it, before the rest of the stream arrives."""
        envelope = _seal(os.urandom(5 * SMALL))
        opener = pager.Opener(envelope.header, _key("bob"), "bob")
        opener.update(_flip(envelope.chunks[0], 5))
        self.assertRaises(pager.ChunkAuthenticationFailed, opener.update, envelope.chunks[1])


class RecipientTests(SynchronousTestCase):
    def setUp(self):
        self.plaintext = os.urandom(2 * SMALL + 5)
        self.envelope = _seal(self.plaintext, recipients=("bob", "carol", "dave"))

    def test_each_recipient_opens(self):
        """Each of three recipients opens the message with their own key."""
        for name in ("bob", "carol", "dave"):
            self.assertEqual(_open(self.envelope, name).plaintext, self.plaintext)

    def test_recipients_sorted_in_header(self):
        """The header lists the recipients sorted by name, each with their key's fingerprint."""
        header = pager.parse_header(self.envelope.header)
        self.assertEqual(header.recipient_names, ["bob", "carol", "dave"])
        for r in header.entries:
            self.assertEqual((r.device_id, r.kind), (pager.device_id(_key(r.name)), pager.WRAP_RSA))

    def test_non_recipient(self):
        """Someone not among the recipients gets NotAddressedToYou."""
        self.assertRaises(pager.NotAddressedToYou, _open, self.envelope, "mallory")

    def test_recipient_name_with_wrong_key(self):
        """A recipient's name with a different private key gets NotAddressedToYou."""
        self.assertRaises(pager.NotAddressedToYou, _open, self.envelope, "bob", private_key=_key("mallory"))

    def test_recipient_key_under_wrong_name(self):
        """A recipient's key under another recipient's name gets NotAddressedToYou."""
        self.assertRaises(pager.NotAddressedToYou, _open, self.envelope, "carol", private_key=_key("bob"))

    def test_wrong_sender_key(self):
        """Opening with a sender key other than the one the header names raises WrongSenderKey."""
        self.assertRaises(pager.WrongSenderKey, _open, self.envelope, "bob", sender_key=_pub("mallory"))
        self.assertRaises(pager.WrongSenderKey, _open, self.envelope, "bob", sender_key=_pub("carol"))

    def test_max_size(self):
        """An Opener with a max_size smaller than the message raises TooLarge."""
        self.assertRaises(pager.TooLarge, pager.open_envelope, self.envelope, _key("bob"), "bob", _pub("alice"),
                          max_size=2 * SMALL + 4)
        opened = pager.open_envelope(self.envelope, _key("bob"), "bob", _pub("alice"), max_size=2 * SMALL + 5)
        self.assertEqual(opened.plaintext, self.plaintext)


class SealerArgumentTests(SynchronousTestCase):
    def test_no_recipients(self):
        """A message needs at least one recipient."""
        self.assertRaises(ValueError, pager.Sealer, _key("alice"), "alice", {})

    def test_too_many_recipients(self):
        """A message has at most MAX_RECIPIENTS recipients."""
        many = {"u%d" % i: _pub("bob") for i in range(pager.MAX_RECIPIENTS + 1)}
        self.assertRaises(ValueError, pager.Sealer, _key("alice"), "alice", many)

    def test_unknown_content_type(self):
        """A content type other than text or file is refused."""
        self.assertRaises(ValueError, pager.Sealer, _key("alice"), "alice", {"bob": _pub("bob")},
                          content_type="image")

    def test_chunk_size_bounds(self):
        """Chunk sizes outside 1024..65536 are refused."""
        for size in (SMALL - 1, pager.MAX_CHUNK_SIZE + 1):
            self.assertRaises(pager.MalformedEnvelope, pager.Sealer, _key("alice"), "alice", {"bob": _pub("bob")},
                              chunk_size=size)


class StreamTamperingTests(SynchronousTestCase):
    """Chunks and signature altered after sealing; 3000 bytes end in a short chunk, 4096 in a full one."""

    def setUp(self):
        self.short = _seal(os.urandom(3000))  # chunks of 1024, 1024, 952 bytes
        self.full = _seal(os.urandom(4 * SMALL))  # four full chunks

    def _with_chunks(self, envelope, chunks):
        return pager.Envelope(envelope.header, chunks, envelope.signature)

    def test_flip_chunk_byte(self):
        """Flipping a byte anywhere in any chunk raises ChunkAuthenticationFailed."""
        for i, chunk in enumerate(self.short.chunks):
            for offset in (0, len(chunk) // 2, len(chunk) - TAG, len(chunk) - 1):
                chunks = list(self.short.chunks)
                chunks[i] = _flip(chunk, offset)
                self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.short, chunks))

    def test_flip_signature_byte(self):
        """Flipping a byte of the signature raises BadSignature."""
        sig = self.short.signature
        for offset in (0, len(sig) // 2, len(sig) - 1):
            envelope = pager.Envelope(self.short.header, self.short.chunks, _flip(sig, offset))
            self.assertRaises(pager.BadSignature, _open, envelope)

    def test_truncated_signature(self):
        """A shortened or empty signature raises BadSignature."""
        for sig in (self.short.signature[:-1], b""):
            envelope = pager.Envelope(self.short.header, self.short.chunks, sig)
            self.assertRaises(pager.BadSignature, _open, envelope)

    def test_drop_last_chunk(self):
        """Dropping the final chunk raises TruncatedMessage."""
        for envelope in (self.short, self.full):
            self.assertRaises(pager.TruncatedMessage, _open, self._with_chunks(envelope, envelope.chunks[:-1]))

    def test_drop_last_two_chunks(self):
        """Dropping the last two chunks raises TruncatedMessage."""
        self.assertRaises(pager.TruncatedMessage, _open, self._with_chunks(self.full, self.full.chunks[:-2]))

    def test_no_chunks(self):
        """An envelope without chunks raises TruncatedMessage."""
        self.assertRaises(pager.TruncatedMessage, _open, self._with_chunks(self.short, []))
        opener = pager.Opener(self.short.header, _key("bob"), "bob")
        self.assertRaises(pager.TruncatedMessage, opener.finish, self.short.signature, _pub("alice"))

    def test_drop_middle_chunk(self):
        """Dropping a middle chunk raises ChunkAuthenticationFailed."""
        c = self.short.chunks
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.short, [c[0], c[2]]))
        c = self.full.chunks
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, [c[0], c[2], c[3]]))

    def test_drop_first_chunk(self):
        """Dropping the first chunk raises ChunkAuthenticationFailed."""
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, self.full.chunks[1:]))

    def test_duplicate_chunk(self):
        """Repeating a chunk raises ChunkAuthenticationFailed."""
        c = self.full.chunks
        for chunks in ([c[0], c[0], c[1], c[2], c[3]], [c[0], c[1], c[1], c[2], c[3]]):
            self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, chunks))

    def test_duplicate_final_chunk(self):
        """Repeating the final (full) chunk raises ChunkAuthenticationFailed: data after the final chunk."""
        c = self.full.chunks
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, c + [c[-1]]))

    def test_reorder_chunks(self):
        """Swapping two chunks raises ChunkAuthenticationFailed."""
        c = self.full.chunks
        for chunks in ([c[1], c[0], c[2], c[3]], [c[0], c[2], c[1], c[3]], [c[0], c[1], c[3], c[2]],
                       [c[3], c[1], c[2], c[0]]):
            self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, chunks))
        c = self.short.chunks
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.short, [c[1], c[0], c[2]]))

    def test_extra_chunk_after_full_final_chunk(self):
        """A chunk appended after a full final chunk raises ChunkAuthenticationFailed."""
        c = self.full.chunks
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, c + [c[0]]))

    def test_extra_chunk_after_short_final_chunk(self):
        """A chunk appended after a short final chunk is refused as malformed (only the last chunk may be short)."""
        c = self.short.chunks
        self.assertRaises(pager.MalformedEnvelope, _open, self._with_chunks(self.short, c + [c[0]]))

    def test_chunk_from_other_message(self):
        """A chunk taken from another message of the same sender raises ChunkAuthenticationFailed."""
        other = _seal(os.urandom(4 * SMALL))
        chunks = list(self.full.chunks)
        chunks[1] = other.chunks[1]
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, self._with_chunks(self.full, chunks))

    def test_signature_from_other_message(self):
        """Another message's valid signature raises BadSignature."""
        other = _seal(b"other")
        envelope = pager.Envelope(self.short.header, self.short.chunks, other.signature)
        self.assertRaises(pager.BadSignature, _open, envelope)

    def test_oversized_chunk(self):
        """A chunk longer than the header's chunk size plus tag is refused as malformed."""
        c = self.short.chunks
        self.assertRaises(pager.MalformedEnvelope, _open, self._with_chunks(self.short, [c[0] + b"x"] + c[1:]))

    def test_chunk_shorter_than_tag(self):
        """A chunk shorter than a GCM tag is refused as malformed."""
        self.assertRaises(pager.MalformedEnvelope, _open, self._with_chunks(self.short, [b"x" * (TAG - 1)]))


class HeaderTamperingTests(SynchronousTestCase):
    """One byte of the header flipped; Bob opens a 3000-byte file message addressed to him and Carol."""

    expected = {
        "tag": pager.MalformedEnvelope,
        "message id": pager.KeyCommitmentMismatch,
        "timestamp": pager.ChunkAuthenticationFailed,
        "sender": pager.ChunkAuthenticationFailed,  # "alice" -> "alicd", still a valid name
        "sender fingerprint": pager.ChunkAuthenticationFailed,
        "sender device": pager.ChunkAuthenticationFailed,
        "content type": pager.MalformedEnvelope,  # "file" -> "fild"
        "filename": pager.ChunkAuthenticationFailed,  # "report.txt" -> "report.txu"
        "chunk size": pager.MalformedEnvelope,  # 1024 -> 1025: a full 1024-byte chunk is short, then another follows
        "recipient count": pager.MalformedEnvelope,
        "recipient 0 name": pager.NotAddressedToYou,  # "bob" -> "boc"
        "recipient 0 device": pager.NotAddressedToYou,
        "recipient 0 kind": pager.MalformedEnvelope,  # 1 -> 0, no kind
        "recipient 0 wrapped key": pager.KeyUnwrapFailed,
        "recipient 1 name": pager.ChunkAuthenticationFailed,  # "carol" -> "carom"
        "recipient 1 device": pager.ChunkAuthenticationFailed,
        "recipient 1 kind": pager.MalformedEnvelope,
        "recipient 1 wrapped key": pager.ChunkAuthenticationFailed,
        "commitment": pager.KeyCommitmentMismatch,
    }

    def setUp(self):
        self.envelope = _seal(os.urandom(3000), recipients=("bob", "carol"), content_type="file",
                              filename="report.txt")

    def _open_header(self, header):
        return _open(pager.Envelope(header, self.envelope.chunks, self.envelope.signature))

    def test_layout_walk(self):
        """The test's own walk of the header layout names every field the brief lists."""
        names = [name for name, _, _ in _layout(self.envelope.header)]
        self.assertEqual(sorted(n for n in names if not n.endswith(" length")), sorted(self.expected))
        self.assertEqual(_field(self.envelope.header, "tag"), pager.ENVELOPE_TAG)
        self.assertEqual(_field(self.envelope.header, "filename"), b"report.txt")

    def test_each_field(self):
        """Flipping the last byte of each header field raises the error specific to that field."""
        for name, start, end in _layout(self.envelope.header):
            if name.endswith(" length"):
                continue
            header = _flip(self.envelope.header, end - 1)
            try:
                self._open_header(header)
            except pager.EnvelopeError as e:
                self.assertIsInstance(e, self.expected[name], name)
            else:
                self.fail("flipping the %s opened the message" % (name,))

    def test_every_byte(self):
        """Flipping any one bit (low or high) of any header byte raises an EnvelopeError; none opens."""
        header = self.envelope.header
        fields = _layout(header)
        wrong = []
        for offset in range(len(header)):
            field = [name for name, start, end in fields if start <= offset < end][0]
            for mask in (0x01, 0x80):
                try:
                    self._open_header(_flip(header, offset, mask))
                except pager.EnvelopeError:
                    pass
                except Exception as e:
                    wrong.append((offset, field, mask, repr(e)))
                else:
                    wrong.append((offset, field, mask, "opened"))
        self.assertEqual(wrong, [])

    def test_trailing_byte(self):
        """A byte appended to the header raises MalformedEnvelope."""
        self.assertRaises(pager.MalformedEnvelope, self._open_header, self.envelope.header + b"\x00")

    def test_truncated_header(self):
        """Any proper prefix of the header raises MalformedEnvelope."""
        header = self.envelope.header
        for n in range(len(header)):
            self.assertRaises(pager.MalformedEnvelope, pager.parse_header, header[:n])


class ForgedHeaderTests(SynchronousTestCase):
    """Headers re-encoded with other fields while the chunks and signature of Alice's message are kept."""

    def setUp(self):
        self.plaintext = os.urandom(2500)
        self.envelope = _seal(self.plaintext, recipients=("bob", "carol"))
        self.header = pager.parse_header(self.envelope.header)

    def _open_with(self, header, recipient="bob", sender="alice", chunks=None, signature=None):
        envelope = pager.Envelope(header, chunks if chunks is not None else self.envelope.chunks,
                                  signature if signature is not None else self.envelope.signature)
        return _open(envelope, recipient, sender)

    def test_reencoded_header_unchanged(self):
        """Re-encoding the parsed header gives the same bytes, so the forgeries below differ only where intended."""
        self.assertEqual(_reheader(self.envelope.header), self.envelope.header)
        self.assertEqual(self._open_with(_reheader(self.envelope.header)).plaintext, self.plaintext)

    def test_other_sender_name(self):
        """Naming another sender (with Alice's key fingerprint) raises ChunkAuthenticationFailed."""
        header = _reheader(self.envelope.header, sender="mallory")
        self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header)

    def test_other_sender(self):
        """Naming Mallory and his key as the sender raises ChunkAuthenticationFailed even checked with his key."""
        header = _reheader(self.envelope.header, sender="mallory", sender_fp=pager.fingerprint(_key("mallory")),
                           sender_device=pager.device_id(_key("mallory")))
        self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header, sender="mallory")

    def test_other_message_id(self):
        """Another message id (with the old commitment) raises KeyCommitmentMismatch."""
        header = _reheader(self.envelope.header, message_id=b"\x00" * 16)
        self.assertRaises(pager.KeyCommitmentMismatch, self._open_with, header)

    def test_other_message_id_recommitted(self):
        """Another message id with a matching commitment (made by a recipient) raises ChunkAuthenticationFailed."""
        key = _unwrap(self.envelope, "bob")
        mid = b"\x00" * 16
        header = _reheader(self.envelope.header, message_id=mid, commitment=pager._commitment(mid, key))
        self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header)

    def test_other_time(self):
        """Another timestamp raises ChunkAuthenticationFailed."""
        for ts in (0, self.header.timestamp_ms + 1, self.header.timestamp_ms - 86400000, 2 ** 64 - 1):
            header = _reheader(self.envelope.header, timestamp_ms=ts)
            self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header)

    def test_other_content_type(self):
        """Turning a text message into a file raises ChunkAuthenticationFailed."""
        header = _reheader(self.envelope.header, content_type="file", filename="evil.sh")
        self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header)

    def test_recipient_removed(self):
        """Dropping Carol from the recipient list raises ChunkAuthenticationFailed for Bob."""
        header = _reheader(self.envelope.header, entries=[_entry(self.header, "bob")])
        self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header)

    def test_recipient_added(self):
        """Adding a recipient (wrapped by Bob, who knows the key) raises ChunkAuthenticationFailed for both."""
        key = _unwrap(self.envelope, "bob")
        recipients = list(self.header.entries) + [_wrap("dave", key)]
        header = _reheader(self.envelope.header, entries=recipients)
        for name in ("bob", "dave"):
            self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header, name)

    def test_recipient_replaced(self):
        """Replacing Carol by Mallory in the list raises ChunkAuthenticationFailed for Mallory and for Bob."""
        key = _unwrap(self.envelope, "bob")
        header = _reheader(self.envelope.header, entries=[_entry(self.header, "bob"), _wrap("mallory", key)])
        for name in ("bob", "mallory"):
            self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header, name)

    def test_surreptitious_forwarding(self):
        """Bob re-wrapping the content key for Carol alone, keeping Alice's chunks, fails for Carol."""
        envelope = _seal(self.plaintext, recipients=("bob",))
        key = _unwrap(envelope, "bob")
        header = _reheader(envelope.header, entries=[_wrap("carol", key)])
        forwarded = pager.Envelope(header, envelope.chunks, envelope.signature)
        self.assertRaises((pager.ChunkAuthenticationFailed, pager.BadSignature), _open, forwarded, "carol")
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, forwarded, "carol")

    def test_surreptitious_forwarding_reencrypted(self):
        """Bob forwarding to Carol with chunks re-encrypted for his new header still fails: Alice's signature breaks."""
        envelope = _seal(self.plaintext, recipients=("bob",))
        key = _unwrap(envelope, "bob")
        header = _reheader(envelope.header, entries=[_wrap("carol", key)])
        forwarded = pager.Envelope(header, _encrypt_chunks(header, key, self.plaintext), envelope.signature)
        self.assertRaises(pager.BadSignature, _open, forwarded, "carol")

    def test_mallory_resigns_same_header(self):
        """Mallory's signature over Alice's unchanged envelope raises BadSignature or WrongSenderKey."""
        signature = _sign(_key("mallory"), self.envelope.header, self.envelope.chunks)
        self.assertRaises(pager.BadSignature, self._open_with, self.envelope.header, signature=signature)
        self.assertRaises(pager.WrongSenderKey, self._open_with, self.envelope.header, sender="mallory",
                          signature=signature)

    def test_mallory_claims_message(self):
        """Mallory naming himself sender in a rebuilt header and re-signing Alice's chunks fails for Bob."""
        header = _reheader(self.envelope.header, sender="mallory", sender_fp=pager.fingerprint(_key("mallory")),
                           sender_device=pager.device_id(_key("mallory")))
        signature = _sign(_key("mallory"), header, self.envelope.chunks)
        self.assertRaises(pager.ChunkAuthenticationFailed, self._open_with, header, sender="mallory",
                          signature=signature)

    def test_forged_sender_without_key(self):
        """A message Mallory makes from scratch naming Alice as sender raises BadSignature with Alice's key."""
        key = os.urandom(32)
        forged = _build(b"pay mallory", {"bob": key}, key, signer="mallory")
        self.assertRaises(pager.BadSignature, _open, forged)

    def test_independent_construction_opens(self):
        """A message built from the documented layout without Sealer opens, so the forgeries above are faithful."""
        key = os.urandom(32)
        self.assertEqual(_open(_build(self.plaintext, {"bob": key}, key)).plaintext, self.plaintext)

    def test_different_keys_for_different_recipients(self):
        """Bob given another content key than the one committed to (Carol's) raises KeyCommitmentMismatch."""
        bob_key, carol_key = os.urandom(32), os.urandom(32)
        envelope = _build(b"for carol's eyes", {"bob": bob_key, "carol": carol_key}, carol_key)
        self.assertEqual(_open(envelope, "carol").plaintext, b"for carol's eyes")
        self.assertRaises(pager.KeyCommitmentMismatch, _open, envelope, "bob")

    def test_short_content_key(self):
        """A wrapped key that is not 32 bytes raises KeyCommitmentMismatch even with a matching commitment."""
        key = os.urandom(16)
        envelope = _build(b"x", {"bob": key}, key)
        self.assertRaises(pager.KeyCommitmentMismatch, _open, envelope)

    def test_unsorted_recipients(self):
        """A header listing recipients out of order or twice raises MalformedEnvelope."""
        bob, carol = _entry(self.header, "bob"), _entry(self.header, "carol")
        for recipients in ([carol, bob], [bob, bob]):
            header = _reheader(self.envelope.header, entries=recipients)
            self.assertRaises(pager.MalformedEnvelope, pager.parse_header, header)


class VerifierTests(SynchronousTestCase):
    """EnvelopeVerifier: what a server checks without the content key."""

    def setUp(self):
        self.envelope = _seal(os.urandom(3000))

    def _verifier(self, max_size=None):
        verifier = pager.EnvelopeVerifier(self.envelope.header, max_size)
        for chunk in self.envelope.chunks:
            verifier.update(chunk)
        return verifier

    def test_verifies(self):
        """A valid envelope verifies against the sender's key, and the verifier counts its size."""
        verifier = self._verifier()
        verifier.verify(self.envelope.signature, _pub("alice"))
        self.assertEqual((verifier.chunk_count, verifier.size), (3, 3000))

    def test_wrong_sender_key(self):
        """Another sender key raises WrongSenderKey."""
        self.assertRaises(pager.WrongSenderKey, self._verifier().verify, self.envelope.signature, _pub("bob"))

    def test_bad_signature(self):
        """A flipped signature raises BadSignature."""
        self.assertRaises(pager.BadSignature, self._verifier().verify, _flip(self.envelope.signature, 3),
                          _pub("alice"))

    def test_no_chunks(self):
        """A verifier that saw no chunks raises TruncatedMessage."""
        verifier = pager.EnvelopeVerifier(self.envelope.header)
        self.assertRaises(pager.TruncatedMessage, verifier.verify, self.envelope.signature, _pub("alice"))

    def test_too_large(self):
        """More plaintext than max_size raises TooLarge."""
        self.assertRaises(pager.TooLarge, self._verifier, 2999)


def _without_small_factors(bits, top=1):
    """The smallest odd number from C{top << (bits - bit length of top)} with no prime factor below 1000."""
    n = (top << (bits - top.bit_length())) | 1
    while any(n % p == 0 for p in range(3, 1000, 2)):
        n += 2
    return n


class KeyTests(SynchronousTestCase):
    def _pem(self, key):
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def test_accepts_2048(self):
        """A 2048-bit RSA key with exponent 65537 loads from PEM text or bytes."""
        pem = pager.public_key_pem(_key("alice"))
        for data in (pem, pem.encode("ascii")):
            key = pager.load_public_key(data)
            self.assertEqual(pager.fingerprint(key), pager.fingerprint(_key("alice")))

    def test_refuses_1024(self):
        """A 1024-bit RSA key raises BadKey from load_public_key, check_public_key and Sealer."""
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
        self.assertRaises(pager.BadKey, pager.check_public_key, small)
        self.assertRaises(pager.BadKey, pager.load_public_key, self._pem(small))
        self.assertRaises(pager.BadKey, pager.Sealer, _key("alice"), "alice", {"bob": small})
        self.assertRaises(pager.BadKey, pager.seal, _key("alice"), "alice", {"bob": _pub("bob"), "carol": small},
                          b"hi")

    def test_size_bounds(self):
        """Keys of 2047 or 8193 bits raise BadKey; 8192 bits are accepted."""
        for bits, ok in ((2047, False), (8192, True), (8193, False)):
            key = rsa.RSAPublicNumbers(65537, _without_small_factors(bits)).public_key()
            if ok:
                self.assertIs(pager.check_public_key(key), key)
            else:
                self.assertRaises(pager.BadKey, pager.check_public_key, key)
                self.assertRaises(pager.BadKey, pager.load_public_key, self._pem(key))

    def test_refuses_broken_moduli(self):
        """
        2048-bit "RSA" keys whose modulus is even, has a small prime factor (3, 997), or is a perfect square raise
        BadKey naming the problem, from check_public_key and load_public_key; the control, a modulus of the same size
        without small factors, is accepted.
        """
        sound = _without_small_factors(2048)
        root = _without_small_factors(1024, top=3)
        for n, words in (((1 << 2047) + 2, "even"), (3 * _without_small_factors(2047), "small factor"),
                         (997 * _without_small_factors(2039), "small factor"), (root * root, "square")):
            self.assertEqual(n.bit_length(), 2048)
            key = rsa.RSAPublicNumbers(65537, n).public_key()
            with self.assertRaises(pager.BadKey) as caught:
                pager.check_public_key(key)
            self.assertIn(words, caught.exception.message)
            self.assertRaises(pager.BadKey, pager.load_public_key, self._pem(key))
        key = rsa.RSAPublicNumbers(65537, sound).public_key()
        self.assertIs(pager.check_public_key(key), key)

    def test_refuses_exponent_3(self):
        """An RSA key with public exponent 3 raises BadKey."""
        key = rsa.generate_private_key(public_exponent=3, key_size=2048).public_key()
        self.assertRaises(pager.BadKey, pager.check_public_key, key)
        self.assertRaises(pager.BadKey, pager.load_public_key, self._pem(key))
        self.assertRaises(pager.BadKey, pager.Sealer, _key("alice"), "alice", {"bob": key})

    def test_refuses_ec(self):
        """An EC key raises BadKey."""
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        self.assertRaises(pager.BadKey, pager.check_public_key, key)
        self.assertRaises(pager.BadKey, pager.load_public_key, self._pem(key))
        self.assertRaises(pager.BadKey, pager.Sealer, _key("alice"), "alice", {"bob": key})

    def test_refuses_private_key_object(self):
        """An RSA private key object where a public key is expected raises BadKey."""
        self.assertRaises(pager.BadKey, pager.check_public_key, _key("alice"))

    def test_refuses_garbage(self):
        """Garbage, a private key PEM, an empty string and non-ASCII text raise BadKey."""
        private_pem = _key("alice").private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        pem = pager.public_key_pem(_key("alice"))
        for data in (b"", "", b"garbage", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                     private_pem, pem.replace("M", "\u00e9", 1), pem[:100], b"\xff" * 300):
            self.assertRaises(pager.BadKey, pager.load_public_key, data)

    def test_fingerprint(self):
        """The fingerprint is the SHA-256 of the DER SubjectPublicKeyInfo, the same for a private key and its half."""
        der = _pub("alice").public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(pager.fingerprint(_pub("alice")), hashlib.sha256(der).digest())
        self.assertEqual(pager.fingerprint(_key("alice")), hashlib.sha256(der).digest())


def _spki_digest(key):
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


class KeyMemoTests(SynchronousTestCase):
    """The per-object memo of fingerprints and key checks never answers for another key."""

    def test_each_key_its_own_fingerprint(self):
        """Keys fingerprinted one after another, each several times, each get their own fingerprint."""
        keys = [_pub(name) for name in ("alice", "bob", "carol")] + [pager.load_public_key(pager.public_key_pem(
            _key(name))) for name in ("alice", "bob")]
        for _ in range(3):
            for key in keys:
                self.assertEqual(pager.fingerprint(key), _spki_digest(key))
                self.assertEqual(pager.device_id(key), _spki_digest(key)[:pager.DEVICE_ID_SIZE])

    def test_stale_entry_under_reused_id(self):
        """
        An entry left under the id another object now has (what id reuse after a key is freed would give) is not
        used: the memo answers only for the very object it holds, for fingerprints and key checks alike.
        """
        alice, bob = _pub("alice"), _pub("bob")
        self.patch(pager, "_FINGERPRINTS", pager._KeyMemo())
        self.patch(pager, "_CHECKED_KEYS", pager._KeyMemo())
        pager._FINGERPRINTS._entries[id(bob)] = (alice, pager.fingerprint(alice))
        self.assertEqual(pager.fingerprint(bob), _spki_digest(bob))
        bad = rsa.RSAPublicNumbers(3, bob.public_numbers().n).public_key()  # exponent 3: refused
        pager._CHECKED_KEYS._entries[id(bad)] = (bob, True)
        self.assertRaises(pager.BadKey, pager.check_public_key, bad)

    def test_holds_its_keys(self):
        """
        The memo holds every key it answers for, so no other object can take the id of one while it is there; a
        key dropped by everyone else and a new key made afterwards each get their own fingerprint.
        """
        memo = pager._KeyMemo()
        self.patch(pager, "_FINGERPRINTS", memo)
        seen = {}
        for name in ("alice", "bob", "carol", "alice", "bob"):
            key = pager.load_public_key(pager.public_key_pem(_key(name)))  # a new object each time
            seen[id(key)] = name
            self.assertEqual(pager.fingerprint(key), _spki_digest(_pub(name)))
            self.assertIs(memo._entries[id(key)][0], key)
            del key
        self.assertEqual(len(seen), 5)  # no id was reused while the memo held the keys

    def test_bounded(self):
        """The memo holds at most its size of keys, starting afresh when full, and stays right after."""
        memo = pager._KeyMemo(size=2)
        self.patch(pager, "_FINGERPRINTS", memo)
        keys = [pager.load_public_key(pager.public_key_pem(_key(name))) for name in ("alice", "bob", "carol")]
        for key in keys + keys:
            self.assertEqual(pager.fingerprint(key), _spki_digest(key))
            self.assertLessEqual(len(memo._entries), 2)

    def test_private_keys_not_held(self):
        """A private key's fingerprint is computed each time and the private key is never kept by the memo."""
        memo = pager._KeyMemo()
        self.patch(pager, "_FINGERPRINTS", memo)
        self.assertEqual(pager.fingerprint(_key("alice")), _spki_digest(_pub("alice")))
        self.assertEqual(memo._entries, {})

    def test_refused_key_not_remembered(self):
        """A key that check_public_key refuses is refused every time, and only keys that passed are remembered."""
        memo = pager._KeyMemo()
        self.patch(pager, "_CHECKED_KEYS", memo)
        bad = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
        for _ in range(2):
            self.assertRaises(pager.BadKey, pager.check_public_key, bad)
        self.assertEqual(memo._entries, {})
        good = _pub("alice")
        self.assertIs(pager.check_public_key(good), good)
        self.assertIs(pager.check_public_key(good), good)
        self.assertEqual(list(memo._entries), [id(good)])


class OpenSSLInteroperabilityTests(SynchronousTestCase):
    """The documented layout checked with the openssl command and raw AES-GCM, independently of Opener."""

    def setUp(self):
        self.content_key = bytes(range(100, 132))
        self.plaintext = os.urandom(3000)
        sealer = pager.Sealer(_key("alice"), "alice", {"bob": _pub("bob"), "carol": _pub("carol")},
                              chunk_size=SMALL, content_key=self.content_key, message_id=b"M" * 16)
        chunks = sealer.update(self.plaintext)
        last, self.signature = sealer.finish()
        self.header, self.chunks = sealer.header, chunks + last
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def _write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _openssl(self, *args):
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        return subprocess.run(("openssl",) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)

    def test_unwrap_with_openssl(self):
        """openssl pkeyutl with OAEP-SHA256 unwraps Bob's wrapped key to the content key."""
        self._openssl("version")
        bob_pem = self._write("bob.pem", _key("bob").private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        wrapped = self._write("wrapped.bin", _field(self.header, "recipient 0 wrapped key"))
        result = self._openssl(
            "pkeyutl", "-decrypt", "-inkey", bob_pem, "-pkeyopt", "rsa_padding_mode:oaep",
            "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256", "-in", wrapped)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, self.content_key)

    def test_signature_with_openssl(self):
        """openssl dgst verifies the RSA-PSS (salt 32) signature over signed_bytes, and rejects altered bytes."""
        self._openssl("version")
        digest = hashlib.sha256(b"".join(self.chunks)).digest()
        length = sum(len(c) for c in self.chunks)
        data = pager.signed_bytes(self.header, len(self.chunks), length, digest)
        expected = (struct.pack(">I", len(pager.SIGNATURE_TAG)) + pager.SIGNATURE_TAG
                    + struct.pack(">I", len(self.header)) + self.header + struct.pack(">QQ", 3, length)
                    + struct.pack(">I", 32) + digest)
        self.assertEqual(data, expected)
        pub = self._write("alice_pub.pem", pager.public_key_pem(_key("alice")).encode("ascii"))
        sig = self._write("sig.bin", self.signature)
        args = ("dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32",
                "-sigopt", "rsa_mgf1_md:sha256", "-verify", pub, "-signature", sig)
        result = self._openssl(*args + (self._write("signed.bin", data),))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"Verified OK", result.stdout)
        result = self._openssl(*args + (self._write("altered.bin", _flip(data, len(data) - 1)),))
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn(b"Verified OK", result.stdout)

    def test_chunks_with_aesgcm(self):
        """Chunks decrypt with AES-256-GCM, nonce = 11-byte counter + last flag, AD = SHA-256 of the header."""
        aead = AESGCM(self.content_key)
        ad = hashlib.sha256(self.header).digest()
        self.assertEqual(aead.decrypt(b"\x00" * 11 + b"\x00", self.chunks[0], ad), self.plaintext[:SMALL])
        self.assertEqual(aead.decrypt(b"\x00" * 10 + b"\x01" + b"\x00", self.chunks[1], ad),
                         self.plaintext[SMALL:2 * SMALL])
        self.assertEqual(aead.decrypt(b"\x00" * 10 + b"\x02" + b"\x01", self.chunks[2], ad),
                         self.plaintext[2 * SMALL:])

    def test_commitment(self):
        """The commitment is SHA-256 of the commitment tag, the message id and the content key."""
        self.assertEqual(_field(self.header, "commitment"),
                         hashlib.sha256(pager.COMMITMENT_TAG + b"M" * 16 + self.content_key).digest())


class AuthTests(SynchronousTestCase):
    SERVER = "e9ac63d1596c137b4d0e95f52b12d9ac"

    def setUp(self):
        self.challenge = os.urandom(32)
        self.proof = pager.sign_auth(_key("alice"), "login", self.SERVER, "alice", self.challenge)

    def test_round_trip(self):
        """A proof verifies with the signer's public key for the same purpose, user and challenge."""
        self.assertTrue(pager.verify_auth(_pub("alice"), self.proof, "login", self.SERVER, "alice", self.challenge))

    def test_other_purpose(self):
        """A login proof does not verify as any other purpose."""
        for purpose in ("register", "rekey", "recover"):
            self.assertFalse(pager.verify_auth(_pub("alice"), self.proof, purpose, self.SERVER, "alice",
                                               self.challenge))

    def test_other_server(self):
        """A proof for one server id does not verify for another, and a malformed server id is never signed."""
        self.assertFalse(pager.verify_auth(_pub("alice"), self.proof, "login", "0" * 32, "alice", self.challenge))
        for server_id in ("", "E9AC63D1596C137B4D0E95F52B12D9AC", self.SERVER + "0", self.SERVER[:-1],
                          "alice", None, b"0" * 32):
            self.assertRaises(pager.BadRequest, pager.auth_message, "login", server_id, "alice", self.challenge,
                              b"f" * 32)

    def test_vector(self):
        """The bytes of the worked example in PROTOCOL.md section 5.5."""
        message = pager.auth_message("login", self.SERVER, "alice", bytes(range(32)), bytes(range(32, 64)))
        self.assertEqual(len(message), 143)
        self.assertEqual(message.hex(), (
            "0000000d" + b"pager-auth-v2".hex() + "00000005" + b"login".hex()
            + "00000020" + self.SERVER.encode().hex() + "00000005" + b"alice".hex()
            + "00000020" + bytes(range(32)).hex() + "00000020" + bytes(range(32, 64)).hex()))

    def test_other_user(self):
        """A proof for alice does not verify for another user."""
        self.assertFalse(pager.verify_auth(_pub("alice"), self.proof, "login", self.SERVER, "bob", self.challenge))

    def test_other_challenge(self):
        """A proof does not verify against another challenge."""
        self.assertFalse(pager.verify_auth(_pub("alice"), self.proof, "login", self.SERVER, "alice", os.urandom(32)))

    def test_other_fingerprint(self):
        """A proof does not verify for another key fingerprint, nor with another key."""
        self.assertFalse(pager.verify_auth(_pub("alice"), self.proof, "login", self.SERVER, "alice", self.challenge,
                                           pager.fingerprint(_key("bob"))))
        self.assertFalse(pager.verify_auth(_pub("bob"), self.proof, "login", self.SERVER, "alice", self.challenge))

    def test_explicit_fingerprint(self):
        """A rekey proof signed by the old key over the new key's fingerprint verifies only with that fingerprint."""
        new_fp = pager.fingerprint(_key("bob"))
        proof = pager.sign_auth(_key("alice"), "rekey", self.SERVER, "alice", self.challenge, new_fp)
        self.assertTrue(pager.verify_auth(_pub("alice"), proof, "rekey", self.SERVER, "alice", self.challenge, new_fp))
        self.assertFalse(pager.verify_auth(_pub("alice"), proof, "rekey", self.SERVER, "alice", self.challenge))

    def test_garbage_proof(self):
        """A flipped, empty or oversized proof does not verify."""
        for proof in (_flip(self.proof, 0), b"", self.proof + b"\x00"):
            self.assertFalse(pager.verify_auth(_pub("alice"), proof, "login", self.SERVER, "alice", self.challenge))

    def test_challenge_length(self):
        """auth_message refuses a challenge of 31 or 33 bytes, or one that is not bytes, with BadRequest."""
        fp = pager.fingerprint(_key("alice"))
        for challenge in (b"x" * 31, b"x" * 33, b"", "x" * 32):
            self.assertRaises(pager.BadRequest, pager.auth_message, "login", self.SERVER, "alice", challenge, fp)

    def test_unknown_purpose(self):
        """auth_message refuses an unknown purpose with ValueError."""
        self.assertRaises(ValueError, pager.auth_message, "logout", self.SERVER, "alice", b"x" * 32,
                          pager.fingerprint(_key("alice")))

    def test_domain_separation(self):
        """An auth message starts with the auth tag, which no envelope signature starts with."""
        message = pager.auth_message("login", self.SERVER, "alice", b"x" * 32, b"f" * 32)
        self.assertTrue(message.startswith(struct.pack(">I", len(pager.AUTH_TAG)) + pager.AUTH_TAG))
        self.assertNotEqual(pager.AUTH_TAG, pager.SIGNATURE_TAG)


class UsernameTests(SynchronousTestCase):
    def test_accepted(self):
        """Valid names are returned in canonical (lower-case) form."""
        for name, canonical in (("Alice", "alice"), ("a", "a"), ("a" * 32, "a" * 32), ("a.b-c_d", "a.b-c_d"),
                                ("0day", "0day"), ("ALICE", "alice")):
            self.assertEqual(pager.canonical_username(name), canonical)
            self.assertTrue(pager.valid_username(canonical))

    def test_refused(self):
        """Empty, over-long, badly started, spaced, non-ASCII and injection-shaped names raise BadRequest."""
        for name in ("", "a" * 33, "_a", ".a", "-a", "a b", "alice\n", "\nalice", "\u212aelvin", "\uff41lice",
                     "../../etc/passwd", "a'; DROP TABLE users;--", "al\x00ice", "alice\u0301", None, b"alice"):
            self.assertRaises(pager.BadRequest, pager.canonical_username, name)

    def test_kelvin_sign_not_folded(self):
        """The Kelvin sign is not folded to k, although Python's lower() would fold it."""
        self.assertEqual("\u212a".lower(), "k")
        self.assertRaises(pager.BadRequest, pager.canonical_username, "\u212aelvin")
        self.assertFalse(pager.valid_username("\u212aelvin"))


_PROPERTY_ENVELOPE = []


def _property_envelope():
    """One sealed 2500-byte message from Alice to Bob, shared by the property tests."""
    if not _PROPERTY_ENVELOPE:
        _PROPERTY_ENVELOPE.append(_seal(os.urandom(2500)))
    return _PROPERTY_ENVELOPE[0]


class PropertyTests(SynchronousTestCase):
    @PROPERTY
    @given(st.binary(max_size=5000), st.integers(min_value=1, max_value=3000))
    def test_round_trip_any_pieces(self, plaintext, piece):
        """Any plaintext sealed in pieces of any size opens to the same plaintext."""
        sealer = pager.Sealer(_key("alice"), "alice", {"bob": _pub("bob")}, chunk_size=SMALL)
        chunks = []
        for i in range(0, len(plaintext), piece):
            chunks += sealer.update(plaintext[i:i + piece])
        last, signature = sealer.finish()
        envelope = pager.Envelope(sealer.header, chunks + last, signature)
        self.assertEqual(len(envelope.chunks), max(1, -(-len(plaintext) // SMALL)))
        self.assertEqual(_open(envelope).plaintext, plaintext)

    @PROPERTY
    @given(st.binary(max_size=2048))
    def test_parse_arbitrary_bytes(self, data):
        """parse_header on arbitrary bytes returns a header or raises MalformedEnvelope, nothing else."""
        try:
            header = pager.parse_header(data)
        except pager.MalformedEnvelope:
            return
        self.assertEqual(header.raw, data)

    @PROPERTY
    @given(st.integers(min_value=0), st.integers(min_value=0, max_value=64), st.binary(max_size=64))
    def test_parse_spliced_header(self, position, cut, insert):
        """parse_header on a valid header with a slice replaced by arbitrary bytes raises only MalformedEnvelope."""
        header = _property_envelope().header
        position %= len(header) + 1
        data = header[:position] + insert + header[position + cut:]
        try:
            parsed = pager.parse_header(data)
        except pager.MalformedEnvelope:
            return
        self.assertEqual(parsed.raw, data)

    @PROPERTY
    @given(st.lists(st.binary(max_size=SMALL + TAG + 8), max_size=5), st.binary(max_size=300),
           st.one_of(st.none(), st.integers(min_value=0, max_value=5000)))
    def test_opener_arbitrary_stream(self, chunks, signature, max_size):
        """An Opener fed arbitrary chunks and signature for a valid header raises an EnvelopeError or TooLarge."""
        envelope = _property_envelope()
        opener = pager.Opener(envelope.header, _key("bob"), "bob", max_size)
        try:
            for chunk in chunks:
                self.assertIsNone(opener.update(chunk))
            opener.finish(signature, _pub("alice"))
        except (pager.EnvelopeError, pager.TooLarge):
            return
        self.fail("arbitrary chunks opened")

    @PROPERTY
    @given(st.data())
    def test_opener_spliced_real_chunks(self, data):
        """An Opener fed any sequence of the real chunks other than the real one never returns plaintext."""
        envelope = _property_envelope()
        indexes = data.draw(st.lists(st.integers(0, len(envelope.chunks) - 1), max_size=6))
        if indexes == list(range(len(envelope.chunks))):
            return
        try:
            _open(pager.Envelope(envelope.header, [envelope.chunks[i] for i in indexes], envelope.signature))
        except pager.EnvelopeError:
            return
        self.fail("chunks %r opened" % (indexes,))

    @PROPERTY
    @given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
    def test_mutated_envelope(self, position, mask):
        """Changing any one byte of a serialized envelope (header, chunks, signature) never opens."""
        envelope = _property_envelope()
        parts = [envelope.header] + list(envelope.chunks) + [envelope.signature]
        position %= sum(len(p) for p in parts)
        for i, part in enumerate(parts):
            if position < len(part):
                parts[i] = _flip(part, position, mask)
                break
            position -= len(part)
        mutated = pager.Envelope(parts[0], parts[1:-1], parts[-1])
        try:
            _open(mutated)
        except pager.EnvelopeError:
            return
        self.fail("a mutated envelope opened")


# Devices and the X25519 wrap.

NOW = 1700000000  # whole seconds: the time of the device tests' messages
SERVER_ID = "e9ac63d1596c137b4d0e95f52b12d9ac"


def _x25519(seed):
    """A deterministic X25519 private key from a one-byte seed."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(b"x25519 %d" % seed).digest())


class _Prekeys:
    """A device's prekeys as the Opener asks for them: private parts by id, signed prekeys' validity."""

    def __init__(self):
        self.signed, self.one_time, self.valid = {}, {}, {}

    def signed_private(self, prekey_id):
        return self.signed.get(prekey_id)

    def one_time_private(self, prekey_id):
        return self.one_time.get(prekey_id)

    def signed_valid(self, prekey_id):
        return self.valid.get(prekey_id)


class _Device:
    """One device of a user: its RSA key, its signed prekey and, unless told otherwise, one one-time prekey."""

    def __init__(self, user, key_name, seed, one_time=True, valid_from=NOW - pager.DAY):
        self.user, self.key = user, _key(key_name)
        self.id = pager.device_id(self.key)
        self.prekeys = _Prekeys()
        spk = _x25519(seed)
        self.spk_id, self.opk_id = 1000 + seed, (2000 + seed if one_time else 0)
        self.signed = pager.sign_prekey(self.key, user, self.spk_id, pager.x25519_public_bytes(spk), valid_from,
                                        valid_from + pager.PREKEY_LIFETIME)
        self.prekeys.signed[self.spk_id] = spk
        self.prekeys.valid[self.spk_id] = (self.signed.valid_from, self.signed.valid_until)
        self.one_time = None
        if one_time:
            opk = _x25519(seed + 100)
            self.prekeys.one_time[self.opk_id] = opk
            self.one_time = pager.OneTimePrekey(self.opk_id, pager.x25519_public_bytes(opk))

    def target(self, **changes):
        fields = dict(signed_prekey=self.signed, one_time=self.one_time)
        fields.update(changes)
        return pager.DeviceTarget(self.user, self.id, **fields)

    def open(self, envelope, sender_key, recipient=None, prekeys=None):
        return pager.open_envelope(envelope, self.key, recipient or self.user, sender_key, device=self.id,
                                   prekeys=prekeys or self.prekeys)


def _legacy(name):
    """The target of C{name}'s legacy device: its identity key, RSA-wrapped."""
    return pager.DeviceTarget(name, pager.device_id(_key(name)), rsa_key=_pub(name))


class _DevicesMixin:
    """Alice sends from her laptop (a linked device) to Bob's two devices, Carol's legacy device and her own desk."""

    def setUp(self):
        self.bob_desk = _Device("bob", "bob", 1)
        self.bob_phone = _Device("bob", "bob-phone", 2, one_time=False)
        self.alice_desk = _Device("alice", "alice", 3)
        self.laptop = _key("alice-laptop")
        self.plaintext = os.urandom(2500)
        self.envelope = self.seal(self.plaintext)

    def targets(self):
        return [self.bob_desk.target(), self.bob_phone.target(), _legacy("carol"), self.alice_desk.target()]

    def seal(self, plaintext, targets=None, **kwargs):
        kwargs.setdefault("timestamp_ms", NOW * 1000)
        kwargs.setdefault("now", NOW)
        return pager.seal(self.laptop, "alice", targets if targets is not None else self.targets(), plaintext,
                          chunk_size=SMALL, sender_fingerprint=pager.fingerprint(_key("alice")), **kwargs)

    def entry(self, device, header=None):
        return pager.parse_header(header or self.envelope.header).entry(device.user, device.id)

    def replace_entry(self, device, header=None, **changes):
        """The envelope's header with C{device}'s entry changed (other fields kept, order as it comes)."""
        h = pager.parse_header(header or self.envelope.header)
        entries = [dataclasses.replace(e, **changes) if e.device_id == device.id else e for e in h.entries]
        return _reheader(h.raw, entries=entries)

    def open_header(self, device, header, **kwargs):
        envelope = pager.Envelope(header, self.envelope.chunks, self.envelope.signature)
        return device.open(envelope, self.laptop.public_key(), **kwargs)


class DeviceRoundTripTests(_DevicesMixin, SynchronousTestCase):
    def test_each_device_opens(self):
        """
        Every recipient device opens the message: Bob's two (X25519, with and without a one-time prekey), Carol's
        legacy device (RSA-OAEP) and Alice's other device; each learns which prekeys it used and who signed.
        """
        header = pager.parse_header(self.envelope.header)
        self.assertEqual((header.version, header.sender_device), (2, pager.device_id(self.laptop)))
        self.assertEqual(header.sender_fingerprint, pager.fingerprint(_key("alice")))
        self.assertEqual(header.recipient_names, ["alice", "bob", "carol"])
        self.assertEqual(sorted(header.devices_of("bob")), sorted([self.bob_desk.id, self.bob_phone.id]))
        for device, used in ((self.bob_desk, (1001, 2001)), (self.bob_phone, (1002, 0)),
                             (self.alice_desk, (1003, 2003))):
            opened = device.open(self.envelope, self.laptop.public_key())
            self.assertEqual(opened.plaintext, self.plaintext)
            self.assertEqual((opened.used_prekeys, opened.sender_device), (used, pager.device_id(self.laptop)))
            self.assertEqual(opened.recipients, ("bob", "carol"))  # the addressed users: not alice's other device
            self.assertEqual(self.entry(device).kind, pager.WRAP_X25519)
        opened = pager.open_envelope(self.envelope, _key("carol"), "carol", self.laptop.public_key())
        self.assertEqual((opened.plaintext, opened.used_prekeys), (self.plaintext, (0, 0)))

    def test_recipients_are_the_addressed_users(self):
        """
        C{recipients} names the users the sender addressed: the entries for the sender's own other devices do not
        add the sender, unless the sending device itself has an entry (a note to self, which names the sender).
        """
        header = pager.parse_header(self.envelope.header)
        self.assertEqual((header.recipient_names, header.addressed_names),
                         (["alice", "bob", "carol"], ["bob", "carol"]))
        laptop = _Device("alice", "alice-laptop", 4)
        note = self.seal(b"note", targets=[self.alice_desk.target(), laptop.target()])
        self.assertEqual(pager.parse_header(note.header).addressed_names, ["alice"])
        self.assertEqual(self.alice_desk.open(note, self.laptop.public_key()).recipients, ("alice",))
        both = self.seal(b"both", targets=[self.bob_desk.target(), self.alice_desk.target(), laptop.target()])
        self.assertEqual(self.bob_desk.open(both, self.laptop.public_key()).recipients, ("alice", "bob"))

    def test_one_to_many_devices(self):
        """Messages to 1 to 12 devices, mixing kinds, are sorted by (name, device id) and open on every device."""
        devices = [_Device("u%d" % (i % 4), "device %d" % i, 10 + i, one_time=i % 3 != 0) for i in range(12)]
        for n in range(1, 13):
            targets = [d.target() for d in devices[:n]] + [_legacy("carol")] * (n % 2)
            plaintext = b"to %d devices" % n
            envelope = self.seal(plaintext, targets)
            header = pager.parse_header(envelope.header)
            self.assertEqual([(e.name.encode(), e.device_id) for e in header.entries],
                             sorted((t.user.encode(), t.device_id) for t in targets))
            for device in devices[:n]:
                self.assertEqual(device.open(envelope, self.laptop.public_key()).plaintext, plaintext)
            if n % 2:
                self.assertEqual(_open(envelope, "carol", sender_key=self.laptop.public_key()).plaintext, plaintext)

    def test_legacy_mapping_is_one_rsa_device_each(self):
        """The older form, a mapping of name to RSA key, seals to one RSA entry per name under its key's device id."""
        header = pager.parse_header(_seal(b"x", recipients=("bob", "carol")).header)
        self.assertEqual([(e.name, e.device_id, e.kind) for e in header.entries],
                         [(n, pager.device_id(_key(n)), pager.WRAP_RSA) for n in ("bob", "carol")])
        self.assertEqual(header.sender_device, pager.device_id(_key("alice")))

    def test_fresh_ephemeral_per_wrap(self):
        """Each X25519 entry has its own ephemeral key, and so does each message."""
        header = pager.parse_header(self.envelope.header)
        again = pager.parse_header(self.seal(self.plaintext).header)
        ephemerals = [e.ephemeral for h in (header, again) for e in h.entries if e.kind == pager.WRAP_X25519]
        self.assertEqual(len(set(ephemerals)), 6)

    def test_no_prekey_no_rsa(self):
        """A target with neither a signed prekey nor an RSA key raises NoPrekeys: nothing is sealed."""
        target = pager.DeviceTarget("bob", self.bob_desk.id)
        self.assertRaises(pager.NoPrekeys, self.seal, b"x", [target])

    def test_duplicate_target(self):
        """Naming a device twice raises ValueError."""
        self.assertRaises(ValueError, self.seal, b"x", [self.bob_desk.target(), self.bob_desk.target()])

    def test_too_many_wraps(self):
        """More than MAX_WRAPS targets raise ValueError."""
        targets = [pager.DeviceTarget("u%d" % (i % 60), i.to_bytes(16, "big"), signed_prekey=None)
                   for i in range(pager.MAX_WRAPS + 1)]
        self.assertRaises(ValueError, self.seal, b"x", targets)

    def test_rsa_key_of_other_device(self):
        """An RSA target whose key is not the device's raises ValueError."""
        target = pager.DeviceTarget("carol", self.bob_desk.id, rsa_key=_pub("carol"))
        self.assertRaises(ValueError, self.seal, b"x", [target])

    def test_prekey_of_other_device(self):
        """A signed prekey given for a device it was not signed for raises BadCertificate."""
        target = pager.DeviceTarget("bob", self.bob_phone.id, signed_prekey=self.bob_desk.signed)
        self.assertRaises(pager.BadCertificate, self.seal, b"x", [target])


class DeviceTamperingTests(_DevicesMixin, SynchronousTestCase):
    """Every field of an X25519 entry, and the entries themselves, changed after sealing."""

    def test_entries_out_of_order(self):
        """Swapping two entries, or repeating one, raises MalformedEnvelope."""
        h = pager.parse_header(self.envelope.header)
        entries = list(h.entries)
        for changed in ([entries[1], entries[0]] + entries[2:], entries[:1] + entries):
            self.assertRaises(pager.MalformedEnvelope, pager.parse_header, _reheader(h.raw, entries=changed))

    def test_wrong_device(self):
        """Bob's phone opening Bob's desk's entry with its own prekeys, or an unknown device, gets an error."""
        envelope = self.envelope
        self.assertRaises(pager.NotAddressedToYou, pager.open_envelope, envelope, self.bob_phone.key, "bob",
                          self.laptop.public_key(), device=b"\x00" * 16, prekeys=self.bob_phone.prekeys)
        self.assertRaises(pager.PrekeyUnavailable, pager.open_envelope, envelope, self.bob_phone.key, "bob",
                          self.laptop.public_key(), device=self.bob_desk.id, prekeys=self.bob_phone.prekeys)
        self.assertRaises(pager.NotAddressedToYou, self.bob_desk.open, envelope, self.laptop.public_key(), "carol")

    def test_wrong_signed_prekey_private(self):
        """The right ids holding other private keys raise KeyUnwrapFailed (signed and one-time alike)."""
        for attribute in ("signed", "one_time"):
            prekeys = _Prekeys()
            prekeys.signed, prekeys.one_time, prekeys.valid = (
                dict(self.bob_desk.prekeys.signed), dict(self.bob_desk.prekeys.one_time), self.bob_desk.prekeys.valid)
            table = getattr(prekeys, attribute)
            for prekey_id in table:
                table[prekey_id] = _x25519(99)
            self.assertRaises(pager.KeyUnwrapFailed, self.bob_desk.open, self.envelope, self.laptop.public_key(),
                              prekeys=prekeys)

    def test_prekey_gone(self):
        """A deleted one-time prekey (a replay), or signed prekey, raises PrekeyUnavailable naming the gone key."""
        del self.bob_desk.prekeys.one_time[2001]
        with self.assertRaises(pager.PrekeyUnavailable) as caught:
            self.bob_desk.open(self.envelope, self.laptop.public_key())
        self.assertIn("one-time prekey 2001", caught.exception.message)
        del self.bob_phone.prekeys.signed[1002]
        self.assertRaises(pager.PrekeyUnavailable, self.bob_phone.open, self.envelope, self.laptop.public_key())
        self.assertRaises(pager.PrekeyUnavailable, pager.open_envelope, self.envelope, None, "bob",
                          self.laptop.public_key(), device=self.bob_phone.id)

    def test_swap_prekey_ids(self):
        """An entry naming another signed or one-time prekey the device holds raises KeyUnwrapFailed."""
        other = _x25519(50)
        self.bob_desk.prekeys.signed[77] = other
        self.bob_desk.prekeys.valid[77] = self.bob_desk.prekeys.valid[1001]
        self.bob_desk.prekeys.one_time[78] = _x25519(51)
        for changes in ({"spk_id": 77}, {"opk_id": 78}, {"opk_id": 0}):
            header = self.replace_entry(self.bob_desk, **changes)
            self.assertRaises(pager.KeyUnwrapFailed, self.open_header, self.bob_desk, header)
        header = self.replace_entry(self.bob_phone, opk_id=2001)
        self.assertRaises(pager.PrekeyUnavailable, self.open_header, self.bob_phone, header)

    def test_swapped_ephemeral(self):
        """Bob's two entries with their ephemeral keys swapped, or another message's, raise KeyUnwrapFailed."""
        desk, phone = self.entry(self.bob_desk), self.entry(self.bob_phone)
        header = self.replace_entry(self.bob_desk, ephemeral=phone.ephemeral)
        header = self.replace_entry(self.bob_phone, header, ephemeral=desk.ephemeral)
        for device in (self.bob_desk, self.bob_phone):
            self.assertRaises(pager.KeyUnwrapFailed, self.open_header, device, header)
        other = self.entry(self.bob_desk, self.seal(b"other").header)
        header = self.replace_entry(self.bob_desk, ephemeral=other.ephemeral)
        self.assertRaises(pager.KeyUnwrapFailed, self.open_header, self.bob_desk, header)
        header = self.replace_entry(self.bob_desk, ephemeral=other.ephemeral, wrapped=other.wrapped)
        self.assertRaises(pager.KeyUnwrapFailed, self.open_header, self.bob_desk, header)

    def test_all_zero_point(self):
        """An all-zero (low-order) ephemeral key raises KeyUnwrapFailed; a sender refuses an all-zero prekey."""
        header = self.replace_entry(self.bob_desk, ephemeral=bytes(32))
        self.assertRaises(pager.KeyUnwrapFailed, self.open_header, self.bob_desk, header)
        signed = pager.sign_prekey(self.bob_desk.key, "bob", 5, bytes(32), NOW, NOW + pager.DAY)
        self.assertRaises(pager.PrekeyUnusable, self.seal, b"x", [self.bob_desk.target(signed_prekey=signed)])
        zero = pager.OneTimePrekey(9, bytes(32))
        self.assertRaises(pager.PrekeyUnusable, self.seal, b"x", [self.bob_desk.target(one_time=zero)])

    def test_entry_moved_to_other_device(self):
        """Bob's desk's entry relabelled as his phone's (and so on) does not open: the info binds the device."""
        desk = self.entry(self.bob_desk)
        header = self.replace_entry(self.bob_phone, spk_id=desk.spk_id, opk_id=0, ephemeral=desk.ephemeral,
                                    wrapped=desk.wrapped)
        self.bob_phone.prekeys.signed[1001] = self.bob_desk.prekeys.signed[1001]
        self.bob_phone.prekeys.valid[1001] = self.bob_desk.prekeys.valid[1001]
        self.assertRaises(pager.KeyUnwrapFailed, self.open_header, self.bob_phone, header)

    def test_expired_or_future_prekey_refused_by_sealer(self):
        """A signed prekey expired, or valid only from more than a day ahead, raises PrekeyUnusable when sealing."""
        for valid_from in (NOW - pager.PREKEY_LIFETIME - 1, NOW + pager.DAY + 1):
            device = _Device("bob", "bob", 1, valid_from=valid_from)
            self.assertRaises(pager.PrekeyUnusable, self.seal, b"x", [device.target()])
        for valid_from in (NOW - pager.PREKEY_LIFETIME, NOW + pager.DAY):  # the edges are usable
            device = _Device("bob", "bob", 1, valid_from=valid_from)
            self.assertEqual(device.open(self.seal(b"x", [device.target()]), self.laptop.public_key()).plaintext,
                             b"x")
        later = dict(now=NOW + pager.PREKEY_LIFETIME)  # valid at the message's time, expired by the sealer's clock
        self.assertRaises(pager.PrekeyUnusable, self.seal, b"x", [self.bob_desk.target()], **later)

    def test_expired_or_future_prekey_refused_by_opener(self):
        """A message whose timestamp its signed prekey's validity does not cover raises PrekeyUnusable."""
        valid_from, valid_until = self.bob_desk.prekeys.valid[1001]
        for window in ((NOW + pager.DAY + 1, valid_until), (valid_from, NOW - 1)):
            self.bob_desk.prekeys.valid[1001] = window
            self.assertRaises(pager.PrekeyUnusable, self.bob_desk.open, self.envelope, self.laptop.public_key())
        self.bob_desk.prekeys.valid[1001] = (NOW + pager.DAY, NOW)
        self.assertEqual(self.bob_desk.open(self.envelope, self.laptop.public_key()).plaintext, self.plaintext)

    def test_device_dropped_or_added(self):
        """Dropping Carol's or Bob's phone's entry, or adding one for Dave, makes Bob's chunks fail to authenticate."""
        h = pager.parse_header(self.envelope.header)
        for entries in ([e for e in h.entries if e.name != "carol"],
                        [e for e in h.entries if e.device_id != self.bob_phone.id],
                        sorted(list(h.entries) + [_wrap("dave", os.urandom(32))], key=pager._wrap_order)):
            self.assertRaises(pager.ChunkAuthenticationFailed, self.open_header, self.bob_desk,
                              _reheader(h.raw, entries=entries))

    def test_wrong_sender_device_key(self):
        """Checking the laptop's message with Alice's identity key (or another) raises WrongSenderKey."""
        for key in (_pub("alice"), _pub("bob")):
            self.assertRaises(pager.WrongSenderKey, self.bob_desk.open, self.envelope, key)
        verifier = pager.EnvelopeVerifier(self.envelope.header)
        for chunk in self.envelope.chunks:
            verifier.update(chunk)
        self.assertRaises(pager.WrongSenderKey, verifier.verify, self.envelope.signature, _pub("alice"))
        verifier.verify(self.envelope.signature, self.laptop.public_key())

    def test_sender_device_swapped(self):
        """
        A header naming Alice's desk as the signing device raises KeyUnwrapFailed for an X25519 entry (the wrap binds
        the sending device) and ChunkAuthenticationFailed for Carol's RSA entry.
        """
        header = _reheader(self.envelope.header, sender_device=self.alice_desk.id)
        self.assertRaises(pager.KeyUnwrapFailed, self.open_header, self.bob_desk, header)
        envelope = pager.Envelope(header, self.envelope.chunks, self.envelope.signature)
        self.assertRaises(pager.ChunkAuthenticationFailed, _open, envelope, "carol", sender_key=_pub("alice"))

    def test_unknown_kind_and_lengths(self):
        """An entry of kind 3, a signed prekey id 0, or a short ephemeral or wrapped key raises MalformedEnvelope."""
        for changes in ({"kind": 3}, {"spk_id": 0}, {"ephemeral": bytes(31)}, {"wrapped": bytes(47)},
                        {"wrapped": bytes(49)}):
            header = self.replace_entry(self.bob_desk, **changes)
            self.assertRaises(pager.MalformedEnvelope, pager.parse_header, header)

    def test_every_byte_of_x25519_entry(self):
        """Flipping any bit of Bob's desk's entry gives an EnvelopeError for Bob's desk, never plaintext."""
        raw = self.envelope.header
        start = raw.index(_lp_bytes(b"bob") + _lp_bytes(self.bob_desk.id))
        length = len(self.entry(self.bob_desk).encode())
        for offset in range(start, start + length):
            for mask in (0x01, 0x80):
                try:
                    self.open_header(self.bob_desk, _flip(raw, offset, mask))
                except pager.EnvelopeError:
                    continue
                self.fail("flipping byte %d of the entry opened" % (offset - start))


def _lp_bytes(data):
    return struct.pack(">I", len(data)) + data


class VersionOneTests(SynchronousTestCase):
    """Headers of version 1, queued before an upgrade: still opened, never sent."""

    def setUp(self):
        content_key, self.mid = os.urandom(32), os.urandom(16)
        recipients = [pager.Recipient(n, pager.fingerprint(_key(n)), _pub(n).encrypt(content_key, pager._OAEP))
                      for n in ("bob", "carol")]
        self.header = pager._encode_header_v1(self.mid, 1700000000123, "alice", pager.fingerprint(_key("alice")),
                                              "text", "", SMALL, recipients, pager._commitment(self.mid, content_key))
        chunks = _encrypt_chunks(self.header, content_key, b"queued before the upgrade")
        self.envelope = pager.Envelope(self.header, chunks, _sign(_key("alice"), self.header, chunks))

    def test_parses_as_rsa_entries(self):
        """A v1 header parses with version 1, each recipient an RSA entry under its fingerprint's first half."""
        h = pager.parse_header(self.header)
        self.assertEqual((h.version, h.sender_device), (1, pager.fingerprint(_key("alice"))[:16]))
        self.assertEqual([(e.name, e.device_id, e.kind) for e in h.entries],
                         [(n, pager.device_id(_key(n)), pager.WRAP_RSA) for n in ("bob", "carol")])
        self.assertEqual(h.recipient_names, ["bob", "carol"])

    def test_opens(self):
        """Each recipient opens a v1 message with their key, checked against the sender's key."""
        for name in ("bob", "carol"):
            opened = _open(self.envelope, name)
            self.assertEqual((opened.plaintext, opened.sender_device), (b"queued before the upgrade",
                                                                       pager.device_id(_key("alice"))))
        self.assertRaises(pager.WrongSenderKey, _open, self.envelope, sender_key=_pub("mallory"))

    def test_every_byte(self):
        """Flipping any bit of a v1 header gives an EnvelopeError, never plaintext."""
        for offset in range(len(self.header)):
            for mask in (0x01, 0x80):
                envelope = pager.Envelope(_flip(self.header, offset, mask), self.envelope.chunks,
                                          self.envelope.signature)
                self.assertRaises(pager.EnvelopeError, _open, envelope)

    def test_sender_writes_v2(self):
        """Whatever the recipients' form, a sender writes the v2 tag."""
        self.assertEqual(_field(_seal(b"x").header, "tag"), pager.ENVELOPE_TAG)
        self.assertEqual(pager.ENVELOPE_TAG, b"pager-envelope-v2")
        self.assertEqual(pager.ENVELOPE_TAG_V1, b"pager-envelope-v1")


class WrapVectorTests(SynchronousTestCase):
    """The X25519 wrap's exact bytes, with every random input fixed: the worked example of PROTOCOL.md."""

    EK, SPK, OPK = bytes(range(1, 33)), bytes(range(33, 65)), bytes(range(65, 97))
    CONTENT_KEY = bytes(range(100, 132))
    EK_PUBLIC = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
    KEK = "7aea3c09a86add1001b336edde8f5344b48d284d2481c0683562d59cab5df18e"
    WRAPPED = "6122125405c393a1bddbe00f821808dd91c6445c80e65ac13db93919d62fc1655410f946cb10dfaee6378070fc2dbcb4"

    def setUp(self):
        self.patch(pager, "_ephemeral_key", lambda: X25519PrivateKey.from_private_bytes(self.EK))
        spk_public = pager.x25519_public_bytes(X25519PrivateKey.from_private_bytes(self.SPK))
        opk_public = pager.x25519_public_bytes(X25519PrivateKey.from_private_bytes(self.OPK))
        signed = pager.SignedPrekey("bob", bytes(range(32, 48)), 1, spk_public, NOW, NOW + pager.PREKEY_LIFETIME, b"")
        target = pager.DeviceTarget("bob", bytes(range(32, 48)), signed_prekey=signed,
                                    one_time=pager.OneTimePrekey(2, opk_public))
        self.envelope = pager.seal(_key("alice"), "alice", [target], b"hi", message_id=bytes(range(16)),
                                   timestamp_ms=NOW * 1000, now=NOW, content_key=self.CONTENT_KEY,
                                   sender_device=bytes(range(16, 32)))

    def test_info(self):
        """The HKDF info is the wrap tag and the length-prefixed fields, the prekey ids as u32: 144 bytes."""
        info = pager._wrap_info(bytes(range(16)), "alice", bytes(range(16, 32)), "bob", bytes(range(32, 48)), 1, 2,
                                bytes.fromhex(self.EK_PUBLIC))
        self.assertEqual(info.hex(), (
            "00000014" + b"pager-x25519-wrap-v1".hex() + "00000010" + bytes(range(16)).hex()
            + "00000005" + b"alice".hex() + "00000010" + bytes(range(16, 32)).hex() + "00000003" + b"bob".hex()
            + "00000010" + bytes(range(32, 48)).hex() + "00000001" + "00000002" + "00000020" + self.EK_PUBLIC))
        self.assertEqual(len(info), 144)

    def test_entry(self):
        """The sealed entry holds the vector's ephemeral key and wrapped key, which the recipient's prekeys open."""
        [entry] = pager.parse_header(self.envelope.header).entries
        self.assertEqual((entry.kind, entry.spk_id, entry.opk_id), (pager.WRAP_X25519, 1, 2))
        self.assertEqual((entry.ephemeral.hex(), entry.wrapped.hex()), (self.EK_PUBLIC, self.WRAPPED))
        self.assertEqual(entry.encode(), _lp_bytes(b"bob") + _lp_bytes(bytes(range(32, 48))) + b"\x02"
                         + struct.pack(">II", 1, 2) + _lp_bytes(entry.ephemeral) + _lp_bytes(entry.wrapped))

    def test_independent_unwrap(self):
        """The documented steps, with cryptography's primitives and not pager's, unwrap the content key."""
        ek = X25519PublicKey.from_public_bytes(bytes.fromhex(self.EK_PUBLIC))
        ikm = (X25519PrivateKey.from_private_bytes(self.SPK).exchange(ek)
               + X25519PrivateKey.from_private_bytes(self.OPK).exchange(ek))
        info = (_lp_bytes(b"pager-x25519-wrap-v1") + _lp_bytes(bytes(range(16))) + _lp_bytes(b"alice")
                + _lp_bytes(bytes(range(16, 32))) + _lp_bytes(b"bob") + _lp_bytes(bytes(range(32, 48)))
                + struct.pack(">II", 1, 2) + _lp_bytes(ek.public_bytes_raw()))
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)
        self.assertEqual(kek.hex(), self.KEK)
        self.assertEqual(AESGCM(kek).decrypt(bytes(12), bytes.fromhex(self.WRAPPED), None), self.CONTENT_KEY)

    def test_signed_prekey_only(self):
        """Without a one-time prekey, the key material is the one agreement and the info's opk id is 0."""
        spk_public = pager.x25519_public_bytes(X25519PrivateKey.from_private_bytes(self.SPK))
        signed = pager.SignedPrekey("bob", bytes(range(32, 48)), 1, spk_public, NOW, NOW + pager.PREKEY_LIFETIME, b"")
        envelope = pager.seal(_key("alice"), "alice", [pager.DeviceTarget("bob", signed.device_id,
                                                                          signed_prekey=signed)], b"hi",
                              now=NOW, timestamp_ms=NOW * 1000, content_key=self.CONTENT_KEY)
        [entry] = pager.parse_header(envelope.header).entries
        ek = X25519PublicKey.from_public_bytes(entry.ephemeral)
        info = pager._wrap_info(pager.parse_header(envelope.header).message_id, "alice",
                                pager.device_id(_key("alice")), "bob", signed.device_id, 1, 0, entry.ephemeral)
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
            X25519PrivateKey.from_private_bytes(self.SPK).exchange(ek))
        self.assertEqual((entry.opk_id, AESGCM(kek).decrypt(bytes(12), entry.wrapped, None)),
                         (0, self.CONTENT_KEY))


class CertificateTests(SynchronousTestCase):
    """Device certificates, revocations and signed prekeys: signing, checking, wire forms."""

    def setUp(self):
        self.identity, self.device = _key("alice"), _key("alice-laptop")
        self.cert = pager.certify_device(self.identity, "alice", self.device.public_key(), "laptop", NOW)
        self.revocation = pager.revoke_device(self.identity, "alice", self.cert.device_id, NOW + 60)
        self.spk = pager.sign_prekey(self.device, "alice", 7, pager.x25519_public_bytes(_x25519(1)), NOW,
                                     NOW + pager.PREKEY_LIFETIME)

    def test_certificate_verifies(self):
        """A certificate verifies with the identity key and gives the device key; the id is the key's."""
        self.assertEqual(pager.fingerprint(self.cert.verify(_pub("alice"))), pager.fingerprint(self.device))
        self.assertEqual(self.cert.device_id, pager.fingerprint(self.device)[:16])
        self.assertEqual(len(self.cert.device_id), pager.DEVICE_ID_SIZE)

    def test_certificate_refused(self):
        """Another identity key, or any field changed after signing, raises BadCertificate."""
        self.assertRaises(pager.BadCertificate, self.cert.verify, _pub("bob"))
        self.assertRaises(pager.BadCertificate, self.cert.verify, self.device.public_key())
        other_der = _pub("bob").public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for changes in ({"user": "mallory"}, {"name": "laptop2"}, {"created": NOW + 1},
                        {"device_id": pager.device_id(_key("bob"))}, {"public_key_der": other_der},
                        {"signature": _flip(self.cert.signature, 0)}, {"signature": b""}, {"name": "a\nb"},
                        {"created": -1}, {"created": True}, {"public_key_der": b"DER"}, {"device_id": b"x" * 15}):
            self.assertRaises(pager.BadCertificate, dataclasses.replace(self.cert, **changes).verify, _pub("alice"))

    def test_key_swapped_with_matching_id(self):
        """Bob's key and id in Alice's certificate for her laptop (a server's substitution) raise BadCertificate."""
        other_der = _pub("bob").public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        forged = dataclasses.replace(self.cert, public_key_der=other_der, device_id=pager.device_id(_key("bob")))
        self.assertRaises(pager.BadCertificate, forged.verify, _pub("alice"))

    def test_short_device_key_refused(self):
        """certify_device refuses a 1024-bit device key (BadKey); a certificate carrying one raises BadCertificate."""
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.assertRaises(pager.BadKey, pager.certify_device, self.identity, "alice", small.public_key(), "x", NOW)
        der = small.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        cert = pager.DeviceCertificate("alice", pager.device_id(small), der, "x", NOW, b"")
        cert = dataclasses.replace(cert, signature=self.identity.sign(cert.signed_bytes(), pager._PSS,
                                                                      hashes.SHA256()))
        self.assertRaises(pager.BadCertificate, cert.verify, _pub("alice"))

    def test_revocation(self):
        """A revocation verifies with the identity key only, and not with a field changed."""
        self.revocation.verify(_pub("alice"))
        self.assertRaises(pager.BadCertificate, self.revocation.verify, _pub("bob"))
        for changes in ({"user": "bob"}, {"device_id": bytes(16)}, {"revoked_at": NOW}, {"revoked_at": 2 ** 64},
                        {"signature": _flip(self.revocation.signature, 9)}):
            self.assertRaises(pager.BadCertificate, dataclasses.replace(self.revocation, **changes).verify,
                              _pub("alice"))

    def test_signed_prekey(self):
        """A signed prekey verifies with the device key, not the identity key, and not with a field changed."""
        self.spk.verify(self.device.public_key())
        self.assertEqual(self.spk.device_id, self.cert.device_id)
        self.assertRaises(pager.BadCertificate, self.spk.verify, _pub("alice"))
        for changes in ({"user": "bob"}, {"device_id": bytes(16)}, {"prekey_id": 8}, {"prekey_id": 0},
                        {"prekey_id": 2 ** 32}, {"public": pager.x25519_public_bytes(_x25519(2))},
                        {"public": bytes(31)}, {"valid_from": NOW + 1}, {"valid_until": NOW + 1},
                        {"valid_until": NOW}, {"signature": _flip(self.spk.signature, 1)}):
            self.assertRaises(pager.BadCertificate, dataclasses.replace(self.spk, **changes).verify,
                              self.device.public_key())

    def test_usable_at(self):
        """A signed prekey is usable from a day before valid_from to valid_until, both included."""
        start, end = self.spk.valid_from, self.spk.valid_until
        self.assertEqual([self.spk.usable_at(t) for t in (start - pager.DAY - 1, start - pager.DAY, start, end,
                                                          end + 1)], [False, True, True, True, False])
        self.assertEqual((pager.PREKEY_ROTATION, pager.PREKEY_LIFETIME), (7 * 86400, 14 * 86400))

    def test_domain_separation(self):
        """
        Each signature verifies only as what it was made for: a certificate's is no revocation, prekey, envelope or
        auth signature, and the other way round, even over fields chosen to collide.
        """
        tags = [pager.DEVICE_TAG, pager.REVOCATION_TAG, pager.SIGNED_PREKEY_TAG, pager.SIGNATURE_TAG,
                pager.AUTH_TAG, pager.WRAP_TAG, pager.LINK_REQUEST_TAG, pager.LINK_ANSWER_TAG, pager.ENVELOPE_TAG,
                pager.COMMITMENT_TAG]
        self.assertEqual(len(set(tags)), len(tags))
        certified = pager.certify_device(self.identity, "alice", self.identity.public_key(), "desk", NOW)
        as_revocation = pager.DeviceRevocation("alice", certified.device_id, NOW, certified.signature)
        self.assertRaises(pager.BadCertificate, as_revocation.verify, _pub("alice"))
        revoked = pager.revoke_device(self.identity, "alice", certified.device_id, NOW)
        self.assertRaises(pager.BadCertificate, dataclasses.replace(certified, signature=revoked.signature).verify,
                          _pub("alice"))
        # The identity device's own prekey (its device key is the identity key) is no certificate either.
        own = pager.sign_prekey(self.identity, "alice", 7, self.spk.public, NOW, NOW + 1)
        self.assertRaises(pager.BadCertificate, dataclasses.replace(certified, signature=own.signature).verify,
                          _pub("alice"))
        self.assertRaises(pager.BadCertificate, dataclasses.replace(own, signature=certified.signature).verify,
                          _pub("alice"))
        self.assertFalse(pager.verify_auth(_pub("alice"), certified.signature, "login", SERVER_ID, "alice",
                                           bytes(32)))
        for signed in (certified, revoked, own):
            self.assertFalse(signed.signed_bytes().startswith(_lp_bytes(pager.SIGNATURE_TAG)))

    def test_signed_bytes_layout(self):
        """The signed bytes of a certificate, a revocation and a signed prekey, as PROTOCOL.md lays them out."""
        device = bytes(range(16))
        cert = pager.DeviceCertificate("alice", device, b"DER", "laptop", 1700000000, b"")
        self.assertEqual(cert.signed_bytes().hex(), (
            "0000000f70616765722d6465766963652d763100000005616c69636500000010000102030405060708090a0b0c0d0e0f"
            "00000003444552000000066c6170746f70000000006553f100"))
        revocation = pager.DeviceRevocation("alice", device, 1700000000, b"")
        self.assertEqual(revocation.signed_bytes().hex(), (
            "0000001770616765722d6465766963652d7265766f6b65642d763100000005616c69636500000010000102030405060708090a0b"
            "0c0d0e0f000000006553f100"))
        public = pager.x25519_public_bytes(X25519PrivateKey.from_private_bytes(bytes(range(33, 65))))
        spk = pager.SignedPrekey("alice", device, 1, public, 1700000000, 1700000000 + pager.PREKEY_LIFETIME, b"")
        self.assertEqual(spk.signed_bytes().hex(), (
            "0000001670616765722d7369676e65642d7072656b65792d763100000005616c69636500000010000102030405060708090a0b0c"
            "0d0e0f00000001000000205869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b000000006553f100"
            "0000000065666600"))


class WireFormTests(SynchronousTestCase):
    """to_json and from_json: the wire objects round-trip, and anything malformed raises BadCertificate only."""

    def setUp(self):
        self.identity, self.device = _key("alice"), _key("alice-laptop")
        self.cert = pager.certify_device(self.identity, "alice", self.device.public_key(), "laptop", NOW)
        self.revocation = pager.revoke_device(self.identity, "alice", self.cert.device_id, NOW + 60)
        self.spk = pager.sign_prekey(self.device, "alice", 7, pager.x25519_public_bytes(_x25519(1)), NOW,
                                     NOW + pager.PREKEY_LIFETIME)
        self.opk = pager.OneTimePrekey(9, pager.x25519_public_bytes(_x25519(2)))

    def test_round_trips(self):
        """Each object's to_json reads back, through JSON text, as the same object, which still verifies."""
        import json
        cert = pager.DeviceCertificate.from_json(json.loads(json.dumps(self.cert.to_json())), "alice")
        self.assertEqual(cert, self.cert)
        cert.verify(_pub("alice"))
        self.assertEqual(sorted(self.cert.to_json()), ["certificate", "created", "id", "name", "public_key"])
        self.assertEqual(pager.DeviceRevocation.from_json(self.revocation.to_json(), "alice"), self.revocation)
        revoked = {"at": self.revocation.revoked_at, "signature": self.revocation.to_json()["signature"]}
        self.assertEqual(pager.DeviceRevocation.from_json(revoked, "alice", self.cert.device_id), self.revocation)
        self.assertEqual(pager.SignedPrekey.from_json(self.spk.to_json(), "alice", self.cert.device_id), self.spk)
        self.assertEqual(pager.OneTimePrekey.from_json(self.opk.to_json()), self.opk)

    def _malformed(self, good, parse):
        """
        Every field of C{good} removed, or replaced by a value of the wrong type or form, raises BadCertificate from
        C{parse}; other odd values either parse or raise BadCertificate, never anything else.
        """
        odd_values = ["", "QUJD", "\u00e9", "x" * 70, "0" * 31, "A" * 32, "AA==", 0, 2 ** 32, 2 ** 63]
        for name in good:
            broken = dict(good)
            del broken[name]
            self.assertRaises(pager.BadCertificate, parse, broken)
            wrong = [None, True, 1.5, [], {}] + ([-1, 2 ** 64, "1"] if isinstance(good[name], int) else [1, "a\nb!"])
            for value in wrong:
                broken[name] = value
                self.assertRaises(pager.BadCertificate, parse, broken)
            for value in odd_values:
                broken[name] = value
                try:
                    parse(broken)
                except pager.BadCertificate:
                    pass
        for obj in (None, [], "x", 1):
            self.assertRaises(pager.BadCertificate, parse, obj)

    def test_certificate_malformed(self):
        """A device object with a field missing, of the wrong type, length or form raises BadCertificate."""
        self._malformed(self.cert.to_json(), lambda obj: pager.DeviceCertificate.from_json(obj, "alice"))
        self.assertRaises(pager.BadCertificate, pager.DeviceCertificate.from_json, self.cert.to_json(), "Alice!")
        upper = dict(self.cert.to_json(), id=self.cert.device_id.hex().upper())
        self.assertRaises(pager.BadCertificate, pager.DeviceCertificate.from_json, upper, "alice")

    def test_revocation_malformed(self):
        """A revocation with a field missing or wrong raises BadCertificate."""
        self._malformed(self.revocation.to_json(), lambda obj: pager.DeviceRevocation.from_json(obj, "alice"))

    def test_prekeys_malformed(self):
        """A signed or one-time prekey with a field missing or wrong raises BadCertificate."""
        self._malformed(self.spk.to_json(),
                        lambda obj: pager.SignedPrekey.from_json(obj, "alice", self.cert.device_id))
        self._malformed(self.opk.to_json(), pager.OneTimePrekey.from_json)
        backwards = dict(self.spk.to_json(), valid_from=NOW + pager.PREKEY_LIFETIME, valid_until=NOW)
        self.assertRaises(pager.BadCertificate, pager.SignedPrekey.from_json, backwards, "alice",
                          self.cert.device_id)

    def test_device_names(self):
        """Device names are 1-64 bytes of printable text without spaces at the ends."""
        for name in ("laptop", "cron box", "Kofi's ThinkPad", "\u00e9t\u00e9", "x" * 64, "\u00e9" * 32):
            self.assertTrue(pager.valid_device_name(name), name)
        for name in ("", " laptop", "laptop ", "x" * 65, "\u00e9" * 33, "a\nb", "a\x1bb", "a\u202eb", "a\u2028b",
                     "a\x00", None, b"laptop", 5):
            self.assertFalse(pager.valid_device_name(name), repr(name))


class LinkCodeTests(SynchronousTestCase):
    """One-time link codes: readable, forgiving to type, and keying the MACs of both halves of linking."""

    def test_format(self):
        """A code is four groups of four Crockford base32 characters for an 80-bit secret, fresh each time."""
        text, secret = pager.new_link_code()
        self.assertRegex(text, "^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$")
        self.assertEqual(len(secret), pager.LINK_SECRET_SIZE)
        self.assertEqual(pager.parse_link_code(text), secret)
        self.assertNotEqual(pager.new_link_code()[1], secret)

    def test_vector(self):
        """The secret 00 01 .. 09 reads 000G-40R4-0M30-E209 (PROTOCOL.md's example)."""
        class Fixed:
            @staticmethod
            def token_bytes(n):
                return bytes(range(n))
        self.patch(pager, "secrets", Fixed)
        self.assertEqual(pager.new_link_code(), ("000G-40R4-0M30-E209", bytes(range(10))))

    def test_forgiving(self):
        """Lower case, spaces instead of dashes, none at all, O for 0 and I or L for 1 read as the same code."""
        secret = bytes(range(10))
        for text in ("000G-40R4-0M30-E209", "000g-40r4-0m30-e209", "000G 40R4 0M30 E209", "000G40R40M30E209",
                     " 000G-40R4-0M30-E209\n", "OOOG-4OR4-OM3O-E2O9", "ooog-4or4-om3o-e2o9"):
            self.assertEqual(pager.parse_link_code(text), secret, text)
        self.assertEqual(pager.parse_link_code("1111-1111-1111-1111"), pager.parse_link_code("IlL1-iiii-llll-1LIl"))

    def test_refused(self):
        """Too short or long, letters outside the alphabet (U, punctuation), or no text raise BadLinkCode."""
        for text in ("", "000G-40R4-0M30-E20", "000G-40R4-0M30-E2099", "000G-40R4-0M30-E20U", "000G-40R4-0M30-E20!",
                     "000G_40R4_0M30_E209", "\u0660" * 16, None, b"000G40R40M30E209"):
            self.assertRaises(pager.BadLinkCode, pager.parse_link_code, text)
        self.assertIn("16 letters and digits", pager.BadLinkCode().message)

    def test_macs(self):
        """The MACs are HMAC-SHA256 of the documented bytes (PROTOCOL.md's example values)."""
        secret = bytes(range(10))
        request = pager.link_request_mac(secret, SERVER_ID, "alice", b"DER", "laptop")
        expected = hmac.new(secret, _lp_bytes(b"pager-link-request-v1") + _lp_bytes(SERVER_ID.encode())
                            + _lp_bytes(b"alice") + _lp_bytes(b"DER") + _lp_bytes(b"laptop"), "sha256").digest()
        self.assertEqual(request, expected)
        self.assertEqual(request.hex(), "af8fe0053910889a73d3b3ce74596dfb83ce00253710920f06e0d9dffc958f0d")
        cert = pager.DeviceCertificate("alice", bytes(range(16)), b"DER", "laptop", 1700000000, bytes(range(8)))
        identity_fp = bytes(range(32, 64))
        answer = pager.link_answer_mac(secret, SERVER_ID, identity_fp, cert)
        self.assertEqual(answer, hmac.new(secret, _lp_bytes(b"pager-link-answer-v1") + _lp_bytes(SERVER_ID.encode())
                                          + _lp_bytes(identity_fp) + _lp_bytes(cert.signed_bytes())
                                          + _lp_bytes(bytes(range(8))), "sha256").digest())
        self.assertEqual(answer.hex(), "15aa0418504565605eb75b4fbd9a3fbeef9d1c51560dc8b5f503cbf6a302761a")

    def test_macs_bind_every_field(self):
        """Another secret (a typo in the code), server, user, key or name gives another MAC; so does another cert."""
        secret = pager.parse_link_code("000G-40R4-0M30-E209")
        typo = pager.parse_link_code("000G-40R4-0M30-E208")
        base = pager.link_request_mac(secret, SERVER_ID, "alice", b"DER", "laptop")
        for args in ((typo, SERVER_ID, "alice", b"DER", "laptop"), (secret, "0" * 32, "alice", b"DER", "laptop"),
                     (secret, SERVER_ID, "bob", b"DER", "laptop"), (secret, SERVER_ID, "alice", b"DEX", "laptop"),
                     (secret, SERVER_ID, "alice", b"DER", "laptop2")):
            self.assertFalse(hmac.compare_digest(pager.link_request_mac(*args), base), args)
        cert = pager.DeviceCertificate("alice", bytes(range(16)), b"DER", "laptop", 1700000000, bytes(range(8)))
        identity_fp = pager.fingerprint(_key("alice"))
        answer = pager.link_answer_mac(secret, SERVER_ID, identity_fp, cert)
        for other in (dataclasses.replace(cert, signature=bytes(8)), dataclasses.replace(cert, created=1),
                      dataclasses.replace(cert, name="phone")):
            self.assertNotEqual(pager.link_answer_mac(secret, SERVER_ID, identity_fp, other), answer)
        self.assertNotEqual(pager.link_answer_mac(typo, SERVER_ID, identity_fp, cert), answer)
        # Another identity key (one the server substituted) gives another MAC: the answer binds the key that certified.
        self.assertNotEqual(pager.link_answer_mac(secret, SERVER_ID, pager.fingerprint(_key("bob")), cert), answer)


class OpenSSLX25519Tests(SynchronousTestCase):
    """PROTOCOL.md section 7.5's X25519 unwrap, with the openssl command: two derivations and openssl kdf."""

    def setUp(self):
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.device = _Device("bob", "bob", 7)
        self.content_key = os.urandom(32)
        self.envelope = pager.seal(_key("alice"), "alice", [self.device.target()], b"hi", now=NOW,
                                   timestamp_ms=NOW * 1000, content_key=self.content_key)
        self.header = pager.parse_header(self.envelope.header)

    def _write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _openssl(self, *args):
        result = subprocess.run(("openssl",) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if result.returncode != 0 and args[0] == "kdf" and b"nvalid command" in result.stderr:
            raise SkipTest("this openssl has no kdf command (OpenSSL 3 has)")
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def _private_pem(self, name, key):
        return self._write(name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))

    def test_unwrap_with_openssl(self):
        """openssl derives both agreements and the key-encryption key; AES-GCM then gives the content key."""
        entry = self.header.entries[0]
        ek = self._write("ek.der", bytes.fromhex("302a300506032b656e032100") + entry.ephemeral)
        ek_pem = os.path.join(self.dir, "ek.pem")
        self._openssl("pkey", "-pubin", "-inform", "DER", "-in", ek, "-out", ek_pem)
        ikm = b""
        for name, prekey_id, table in (("spk", entry.spk_id, self.device.prekeys.signed),
                                       ("opk", entry.opk_id, self.device.prekeys.one_time)):
            out = os.path.join(self.dir, name + ".bin")
            self._openssl("pkeyutl", "-derive", "-inkey", self._private_pem(name + ".pem", table[prekey_id]),
                          "-peerkey", ek_pem, "-out", out)
            with open(out, "rb") as f:
                ikm += f.read()
        info = (_lp_bytes(b"pager-x25519-wrap-v1") + _lp_bytes(self.header.message_id) + _lp_bytes(b"alice")
                + _lp_bytes(self.header.sender_device) + _lp_bytes(b"bob") + _lp_bytes(self.device.id)
                + struct.pack(">II", entry.spk_id, entry.opk_id) + _lp_bytes(entry.ephemeral))
        kek = os.path.join(self.dir, "kek.bin")
        self._openssl("kdf", "-keylen", "32", "-kdfopt", "digest:SHA256", "-kdfopt", "hexkey:" + ikm.hex(),
                      "-kdfopt", "hexinfo:" + info.hex(), "-binary", "-out", kek, "HKDF")
        with open(kek, "rb") as f:
            key = AESGCM(f.read()).decrypt(bytes(12), entry.wrapped, None)
        self.assertEqual(key, self.content_key)
