# -*- test-case-name: tests -*-
"""
pager: a self-hosted, end-to-end encrypted messenger for the terminal and for scripts.

One module holds both roles.  A pager server routes and stores messages it cannot read; only a recipient's private
key opens them, and the recipient knows for sure who sent them.  The module reads top to bottom, in the order data
flows through it:

    Constants and limits, Errors, Envelope (pure crypto), Accounts (names, auth proofs, token hashing),
    Frames (wire protocol, flow control), Store (SQLite, admin transactions too), Server, Client (protocol,
    PagerClient, the client's local stores), Key files, Sessions (known servers, connecting, logging in),
    Terminal UI (the only code that writes to a terminal), Command line.

Run ``twistd pager server`` or ``python pager.py --help``.  PROTOCOL.md is the wire and envelope contract.

Licence: MIT.
"""

__version__ = "0.5.5"

import sys

if __name__ == "__main__":
    # Running as a script: make ``import pager`` (the twistd plugin, the tests) find this very module instead of
    # importing a second copy with its own classes.
    sys.modules.setdefault("pager", sys.modules["__main__"])

import base64
import codecs
import collections
import dataclasses
import errno
import functools
import gc
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import shlex
import sqlite3
import struct
import textwrap
import time
import traceback
import types
import typing
import unicodedata

try:
    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils as asym_utils, x25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from twisted.application import service
    from twisted.enterprise import adbapi
    from twisted.internet import defer, endpoints, interfaces, protocol, task, threads
    from twisted.internet.defer import Deferred
    from twisted.logger import Logger
    from twisted.protocols.basic import LineReceiver
    from twisted.protocols.policies import TimeoutMixin
    from twisted.python import usage
    from twisted.python.failure import Failure
except ImportError as e:
    if __name__ != "__main__":
        raise
    # 'python pager.py' with a Python that lacks Twisted or cryptography (in a checkout, the repository's own
    # twisted/ folder, which holds only the twistd plugin, then stands in for the package): say what to do.
    sys.stderr.write("pager: pager's dependencies are not installed for %s (%s): install them with "
                     "'python3 -m pip install .' in a virtual environment (the README's first lines show how), then "
                     "run pager with that environment's Python.\n" % (sys.executable, e))
    sys.exit(1)  # EXIT_FAILURE


#### Constants and limits ####

PROTOCOL_VERSION = 4  # 4: groups (see PROTOCOL.md, "Changes from version 3")
SOFTWARE = "pager/" + __version__
DEFAULT_PORT = 5050
DEFAULT_LISTEN = "tcp:%d:backlog=1024" % DEFAULT_PORT
DEFAULT_DB = "pager.sqlite3"
PAGE_SIZE = 8192  # bytes of a new database's pages: a drain settles 6-9% faster than with 4 KiB, the relay no slower

RSA_BITS = 2048  # keys shorter than this are refused everywhere
RSA_MAX_BITS = 8192  # longer keys are refused too: they only cost the server time
RSA_EXPONENT = 65537
PSS_SALT_LENGTH = 32  # fixed by the format, so that OpenSSL can verify with rsa_pss_saltlen:32

ENVELOPE_TAG = b"pager-envelope-v2"  # what a sender writes
ENVELOPE_TAG_V1 = b"pager-envelope-v1"  # queued before version 3: still opened, never sent
DEVICE_TAG = b"pager-device-v1"  # a device certificate, signed by the identity key
REVOCATION_TAG = b"pager-device-revoked-v1"  # a device revocation, signed by the identity key
SIGNED_PREKEY_TAG = b"pager-signed-prekey-v1"  # a signed prekey, signed by the device key
WRAP_TAG = b"pager-x25519-wrap-v1"  # the HKDF info of an X25519 key wrap
LINK_REQUEST_TAG = b"pager-link-request-v1"  # the MAC of a new device's link request
LINK_ANSWER_TAG = b"pager-link-answer-v1"  # the MAC of the identity device's answer
GROUP_OP_TAG = b"pager-group-op-v1"  # a group operation, signed by its actor's identity key
GROUP_ENVELOPE_TAG = b"pager-group-envelope-v1"  # the header of a group message: never taken for a 1:1 one
SIGNATURE_TAG = b"pager-signature-v1"
COMMITMENT_TAG = b"pager-key-commitment-v1"
AUTH_TAG = b"pager-auth-v2"  # proof-of-possession signatures; distinct from every envelope tag (v2 names the server)
AUTH_PURPOSES = ("register", "login", "rekey", "recover")

PROBE = b"\n" * 6  # what a client sends first (see PagerClientProtocol.connectionMade)
CHUNK_SIZE = 65536  # plaintext bytes per AES-GCM chunk
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 65536  # the largest chunk a server accepts; one chunk frame must fit in a line
GCM_TAG_SIZE = 16
MESSAGE_ID_SIZE = 16
CHALLENGE_SIZE = 32
SERVER_ID_LENGTH = 32  # hex digits of the id a server's hello gives (16 random bytes, made with its database)
SERVER_ID_RE = re.compile("[0-9a-f]{%d}" % SERVER_ID_LENGTH)
MAX_RECIPIENTS = 64
MAX_RETRY_AFTER = 3600  # the longest wait a client takes from a rate_limited error's retry_after
RECONNECT_MAX_DELAY = 30.0  # the longest pause between a client's reconnection attempts, unless told to wait
MAX_ACK_BATCH = 1000  # message ids, or receipt ids, that one ack frame may list
MAX_USERS_PAGE = 1000  # names one users answer lists (about 35 KB at most, so one answer fits the shortest max_line)
MAX_USERS_LISTED = 1000000  # names a client reads in one listing of every user, whatever the server's count says
MAX_USERS_PAGES = 10000  # users answers a client reads in one listing
CONNECT_TIMEOUT = 15  # seconds a client waits for the TCP connection, then as long for the server's hello
PING_TIMEOUT = 30  # seconds a client waits for the answer to a keepalive ping before it drops the connection
FRAME_MARGIN = 1024  # bytes of a message frame besides its header and chunks (the other fields, quotes, commas)
DAY = 86400  # seconds
DEVICE_ID_SIZE = 16  # bytes of a device id: the first half of its key's fingerprint (32 hex digits on the wire)
MAX_DEVICE_NAME_BYTES = 64  # UTF-8 bytes of a device's name ("laptop", "cron box")
PREKEY_ROTATION = 7 * DAY  # seconds between a device's signed prekeys
PREKEY_LIFETIME = 14 * DAY  # seconds a signed prekey is valid for (valid_until - valid_from)
PREKEY_SKEW = DAY  # seconds a signed prekey may be used before its valid_from (clocks differ)
X25519_KEY_SIZE = 32
MAX_WRAPS = 512  # wrapped keys (recipient devices) one envelope holds
GROUP_ID_SIZE = 16  # bytes of a group id, made at random by its creator's client (32 hex digits on the wire)
GROUP_OP_KINDS = ("create", "add", "remove", "leave", "rename", "topic", "promote", "demote")
DEFAULT_MAX_GROUP_MEMBERS = 256  # members of one group, its creator included; the largest group header holds
MAX_GROUP_TOPIC_BYTES = 256  # UTF-8 bytes of a group's topic
MAX_GROUP_OPS = 4096  # operations in one group's chain; then a new group must be created
MAX_GROUP_OP_BYTES = 32768  # bytes of one encoded group operation
MAX_GROUP_WRAPS = 2048  # wrapped keys (member devices) one group envelope holds
GROUP_OP_RATE = 1.0  # group operations per second per account (after a burst of GROUP_OP_BURST)
GROUP_OP_BURST = 30
GROUP_FANOUT_BURST = 2 * MAX_GROUP_WRAPS  # member devices an account's group messages may reach at once
MAX_FORMER_GROUPS = 64  # groups a user left or was removed from whose end the server still lets them read
LINK_SECRET_SIZE = 10  # bytes (80 bits) of the one-time code that links a new device
SEEN_MARGIN = DAY  # seconds a client remembers a message id past the server's message expiry
CLIENT_CLOSE_GRACE = 3.0  # seconds a client's close waits for the server to read what it wrote; then it aborts
_MSG_ID_RE = re.compile("[0-9a-fA-F]{%d}" % (MESSAGE_ID_SIZE * 2))
MAX_FILENAME_BYTES = 255
CONTENT_TYPES = ("text", "file")

USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
SOFTWARE_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,63}")  # a hello's software name and version, e.g. pager/0.2.0
MIN_TOKEN_LENGTH = 8
MAX_TOKEN_LENGTH = 1024
MAX_REQUEST_ID_LENGTH = 64
LINK_TTL = 600  # seconds the server keeps a new device's link request, and the connection that waits for its answer
LINK_ID_SIZE = 8  # bytes of a link request's id (16 hex digits on the wire)
MAX_LINKS_PER_ADDRESS = 2  # link requests waiting at once from one IP address (IPv4) or /64 prefix (IPv6)
MAX_LINKS_PER_USER = 4  # link requests waiting at once for one account (a newer one takes an older one's place)
MAX_LINKS = 10000  # link requests waiting at once on the whole server
MAX_ONE_TIME_PREKEYS = 200  # one-time prekeys the server stores for one device
MAX_PREKEYS_PER_FRAME = 100  # one-time prekeys one publish_prekeys frame may carry
PREKEYS_LOW = 20  # below this many one-time prekeys left, a device is told to publish more
BUNDLE_BURST = 100  # bundle requests an account may make at once before bundle_rate paces it
ONE_TIME_INTERVAL = 300  # seconds: one account gets at most one of a device's one-time prekeys this often
ONE_TIME_DEVICE_RATE = 1 / 60  # one-time prekeys a device hands out a second, to all requesters (after a burst)
ONE_TIME_DEVICE_BURST = 50  # one-time prekeys a device may hand out at once before ONE_TIME_DEVICE_RATE paces it
REVOKED_KEPT = 30 * DAY  # seconds the server keeps a revoked device's row (and revocation) for contacts to see
REVOKED_REJECT_REASON = "The recipient's device that still held it was revoked; the others had refused it."
DEVICE_ROWS_PER_DEVICE = 4  # an account's device rows, revoked ones included, are at most this many x max_devices

# OWASP's Argon2id parameters: 19 MiB, 2 passes, one lane.
ARGON2_MEMORY_KIB = 19456
ARGON2_ITERATIONS = 2
ARGON2_LANES = 1
ARGON2_SALT_SIZE = 16
ARGON2_HASH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Limits:
    """
    Every bound the server enforces.  Each is a command-line option of ``pager server``; the hello frame tells clients
    the ones they need.
    """

    max_line_unauthenticated: int = 16 * 1024  # bytes per line before login: holds the largest valid register
    max_line: int = 256 * 1024  # bytes per line after login; must hold one chunk frame and a full group's header
    max_message: int = 64 * 1024 * 1024  # plaintext bytes per message
    max_pending_messages: int = 10000  # per recipient
    max_pending_bytes: int = 256 * 1024 * 1024  # per recipient
    login_timeout: float = 30.0  # seconds an unauthenticated connection may stay open
    idle_timeout: float = 300.0  # seconds without any frame before the server closes the connection
    message_expiry: float = 30.0 * DAY  # seconds a pending delivery is kept
    max_in_flight: int = 64  # requests one connection may have outstanding before the server stops reading it
    argon2_concurrency: int = 2  # Argon2id hashes computed at once
    argon2_queue: int = 256  # further logins waiting for a hash; past it the server answers rate_limited
    argon2_per_account: int = 2  # hashes running or waiting for one account (its recoveries counted apart)
    argon2_per_address: int = 8  # hashes running or waiting for one IP address
    recovery_interval: float = 3600.0  # seconds between two lost-key recoveries of one account
    rekey_interval: float = 60.0  # seconds after a re-key before the same account may re-key again
    allow_recovery: bool = True
    max_connections_per_address: int = 64  # connections open at once from one IP address
    account_free_failures: int = 3  # wrong tokens for one account from one address before it is slowed down
    account_max_delay: float = 60.0  # the longest wait imposed on one account at one address
    address_free_failures: int = 10  # failed attempts from one address (or one connection) before it is slowed down
    address_max_delay: float = 900.0  # the longest wait imposed on one address
    registration: str = "open"  # open, invite or closed
    max_sender_pending_messages: int = 5000  # per sender: messages it has stored and not yet delivered to everyone
    max_sender_pending_bytes: int = 128 * 1024 * 1024  # per sender, the same in plaintext bytes
    max_pending_receipts: int = 5000  # receipts stored for one user and not yet acknowledged; past it the oldest go
    max_open_uploads: int = 4  # multi-frame uploads one user may have open at once, over all their connections
    upload_idle_timeout: float = 60.0  # seconds an open upload may wait for its next chunk frame before it is dropped
    max_db_bytes: int = 4 * 1024 * 1024 * 1024  # the database's budget: stored pages plus open uploads' declared sizes
    account_check_interval: float = 5.0  # seconds between checks that logged-in accounts still exist with their key
    max_unread_output: int = 1024 * 1024  # bytes written to a connection that stopped reading before it is cut off
    close_grace: float = 3.0  # seconds a connection the server closes may still read; then it is aborted
    max_devices: int = 8  # devices of one account, not counting revoked ones
    bundle_rate: float = 20.0  # bundle requests per second per account (a burst of BUNDLE_BURST first)
    max_group_members: int = DEFAULT_MAX_GROUP_MEMBERS  # members of one group, its creator included (at most that)
    max_groups: int = 64  # groups one user is a current member of
    group_fanout_rate: float = 2000.0  # member devices per second an account's group messages reach (after a burst)

    @property
    def max_groups_by_one(self):
        """
        Groups of one user's that another user may have put them in (by a create or an add, which need no consent):
        an eighth of C{max_groups}, at least 4, but at most half of it (and at least 1), so that no one user fills
        another's C{max_groups}.
        """
        return max(1, min(self.max_groups // 2, max(4, self.max_groups // 8)))

    def public(self):
        """The limits a client needs to know, as sent in ``hello``."""
        return {
            "max_line_unauthenticated": self.max_line_unauthenticated,
            "max_line": self.max_line,
            "max_message": self.max_message,
            "max_chunk": MAX_CHUNK_SIZE,
            "max_recipients": MAX_RECIPIENTS,
            "max_ack_batch": MAX_ACK_BATCH,
            "max_users_page": MAX_USERS_PAGE,
            "max_unread_output": self.max_unread_output,
            "max_pending_messages": self.max_pending_messages,
            "max_pending_bytes": self.max_pending_bytes,
            "login_timeout": self.login_timeout,
            "idle_timeout": self.idle_timeout,
            "message_expiry": self.message_expiry,
            "registration": self.registration,
            "max_sender_pending_messages": self.max_sender_pending_messages,
            "max_sender_pending_bytes": self.max_sender_pending_bytes,
            "max_open_uploads": self.max_open_uploads,
            "upload_idle_timeout": self.upload_idle_timeout,
            "max_devices": self.max_devices,
            "bundle_rate": self.bundle_rate,
            "max_group_members": self.max_group_members,
            "max_groups": self.max_groups,
            "group_fanout_rate": self.group_fanout_rate,
        }


#### Errors ####

class PagerError(Exception):
    """Something went wrong in pager."""

    code = "internal"

    def __init__(self, message=None):
        if message is None:
            message = (self.__doc__ or "").strip()
        super().__init__(message)

    @property
    def message(self):
        return self.args[0]


class EnvelopeError(PagerError):
    """The message envelope is not valid."""

    code = "bad_envelope"


class MalformedEnvelope(EnvelopeError):
    """The message envelope is malformed."""


class NotAddressedToYou(EnvelopeError):
    """The message is not addressed to you."""


class KeyUnwrapFailed(EnvelopeError):
    """The message key does not unwrap with your private key."""


class KeyCommitmentMismatch(EnvelopeError):
    """The message key does not match the sender's commitment: recipients were given different keys."""


class ChunkAuthenticationFailed(EnvelopeError):
    """A chunk of the message does not authenticate: it was altered, reordered or duplicated."""


class TruncatedMessage(EnvelopeError):
    """The message is truncated."""


class WrongSenderKey(EnvelopeError):
    """The message names a sender key other than the one given for the sender."""


class BadSignature(EnvelopeError):
    """The signature does not verify."""


class PrekeyUnavailable(EnvelopeError):
    """The prekey this message was sealed for is gone from this device: it was used by another message or expired."""


class PrekeyUnusable(EnvelopeError):
    """The signed prekey is expired or not yet valid, or no X25519 key: no message is sealed or opened with it."""


class BadCertificate(PagerError):
    """A device certificate, revocation or signed prekey does not verify against the key that should have signed it."""

    code = "bad_certificate"


class NoPrekeys(PagerError):
    """A recipient device has no usable signed prekey on the server, so the message was not sent."""

    code = "no_prekeys"


class BadLinkCode(PagerError):
    """The link code is not the 16 letters and digits the new device shows (like 7K3M-Q2ZR-8D1X-VH4B)."""

    code = "bad_link_code"


class BadKey(PagerError):
    """The key is not a valid RSA public key of 2048 to 8192 bits."""

    code = "bad_key"


class ProtocolError(PagerError):
    """A request could not be carried out; ``code`` says why, in the protocol's words."""


class BadRequest(ProtocolError):
    """The request is malformed."""

    code = "bad_request"


class NotAuthenticated(ProtocolError):
    """Log in first."""

    code = "not_authenticated"


class AuthFailed(ProtocolError):
    """Unknown user, wrong token or wrong key."""

    code = "auth_failed"


class UserExists(ProtocolError):
    """That user name is taken."""

    code = "user_exists"


class UnknownUser(ProtocolError):
    """No such user."""

    code = "unknown_user"


class UnknownMessage(ProtocolError):
    """No pending delivery of that message for you."""

    code = "unknown_message"


class TooLarge(ProtocolError):
    """Too large."""

    code = "too_large"


class QuotaExceeded(ProtocolError):
    """The recipient has too many pending messages."""

    code = "quota_exceeded"


class StorageFull(ProtocolError):
    """The server's storage is at its operator's limit; try again later."""

    code = "storage_full"


class RateLimited(ProtocolError):
    """Too many requests; try again later."""

    code = "rate_limited"

    def __init__(self, message=None, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds before a retry can succeed, when the server knows it


class IdleTimeout(ProtocolError):
    """The connection was idle for too long."""

    code = "timeout"


class Forbidden(ProtocolError):
    """The server does not allow that."""

    code = "forbidden"


class DevicesChanged(ProtocolError):
    """The recipients' devices have changed since the message was sealed: fetch them again and seal it anew."""

    code = "devices_changed"


class GroupOpError(BadRequest):
    """The group operation is malformed."""


class GroupRefused(Forbidden):
    """The group's rules refuse that operation."""


class GroupFull(GroupRefused):
    """The group would have more members than it may."""

    code = "too_large"


class InternalError(ProtocolError):
    """The server failed to carry out the request."""

    code = "internal"


class UnknownGroup(ProtocolError):
    """No such group, or you are not a member of it."""

    code = "unknown_group"


class GroupExists(ProtocolError):
    """That group name is taken on this server."""

    code = "group_exists"


class GroupChanged(ProtocolError):
    """The group's membership changed since that was made: fetch its new operations, then try again."""

    code = "group_changed"

    def __init__(self, message=None, seq=None, head=None):
        super().__init__(message)
        self.seq, self.head = seq, head  # the group's current version and head (32 bytes), when the server knows them


class KeyChanged(PagerError):
    """A user's key differs from the one pinned on this machine."""

    code = "key_changed"

    def __init__(self, user, pinned, current, message=None):
        super().__init__(message or
            "The key of %s has changed: pinned %s, the server now gives %s. Check the new fingerprint with %s "
            "(for example by phone), then accept it with 'trust %s' (and 'verify %s' records that you compared it)."
            % (user, format_fingerprint(pinned), format_fingerprint(current), user, user, user))
        self.user, self.pinned, self.current = user, pinned, current


class ConnectionLost(PagerError):
    """The connection to the server was lost."""

    code = "connection_lost"


class LocalError(PagerError):
    """A file or directory on this machine cannot be used: it cannot be read or written, or is no certificate."""

    code = "local"


ERROR_CODES = {
    cls.code: cls
    for cls in (
        BadRequest, NotAuthenticated, AuthFailed, UserExists, UnknownUser, UnknownMessage, TooLarge,
        QuotaExceeded, StorageFull, RateLimited, Forbidden, InternalError, BadKey, IdleTimeout, DevicesChanged,
        BadCertificate, UnknownGroup, GroupExists, GroupChanged,
    )
}


def error_for_code(code, message):
    """
    The exception for an ``error`` frame: the class registered for ``code`` (or L{ProtocolError}), carrying the
    server's sentence and its ``code`` even when this client does not know it.
    """
    cls = ERROR_CODES.get(code, ProtocolError)
    error = cls(message)
    error.code = code
    return error


#### Envelope ####

# Pure functions and small incremental objects: bytes in, bytes out, no I/O, no Twisted.  PROTOCOL.md gives the byte
# layout; everything here is standard RSA-OAEP, RSA-PSS, AES-256-GCM and SHA-256.

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
_PREHASHED_SHA256 = asym_utils.Prehashed(hashes.SHA256())


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _lp(data):
    """A length-prefixed field: a 4-byte big-endian length, then the bytes."""
    return _U32.pack(len(data)) + data


class _Reader:
    """
    Reads the fields written by L{_lp} and C{struct}, raising L{MalformedEnvelope} on any shortfall.  Every message
    opened is parsed here, so it keeps to slots and precompiled structs.
    """

    __slots__ = ("data", "offset", "size")

    def __init__(self, data):
        self.data = data if isinstance(data, bytes) else bytes(data)
        self.offset = 0
        self.size = len(self.data)

    def fixed(self, unpacker):
        """The next fields of fixed sizes, as a tuple read with C{unpacker} (a C{struct.Struct})."""
        start = self.offset
        end = self.offset = start + unpacker.size
        if end > self.size:
            raise MalformedEnvelope("The message header is truncated.")
        return unpacker.unpack_from(self.data, start)

    def field(self, max_length):
        data, start = self.data, self.offset
        body = start + 4
        if body > self.size:
            raise MalformedEnvelope("The message header is truncated.")
        n = _U32.unpack_from(data, start)[0]
        if n > max_length:
            raise MalformedEnvelope("A field of the message header is too long.")
        end = body + n
        if end > self.size:
            raise MalformedEnvelope("The message header is truncated.")
        self.offset = end
        return data[body:end]

    def end(self):
        if self.offset != self.size:
            raise MalformedEnvelope("The message header has trailing bytes.")


_USERNAME_BYTES_FULLMATCH = re.compile(USERNAME_RE.pattern.encode("ascii")).fullmatch


def generate_private_key():
    """A new RSA-2048 private key with public exponent 65537.  Slow: call it off the reactor thread."""
    return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)


# The product of the odd primes below 1000, as in OpenSSL's public-key check (SP 800-89 partial validation): one
# gcd with it finds any of them in a modulus, in microseconds.
_SMALL_PRIMES_PRODUCT = math.prod(p for p in range(3, 1000, 2) if all(p % q for q in range(3, math.isqrt(p) + 1, 2)))


class _KeyMemo:
    """
    Facts about public key objects, remembered per object so that a key used for message after message (a session's
    key, a contact's key held by a client) is not serialised and hashed, or checked, each time.  cryptography's key
    objects are immutable, and neither weak references nor hashes of them exist, so an entry holds its key: while it
    is here no other object can have its C{id}, and a look-up also checks that the object is the very same one.  At
    most C{size} keys are held; the whole memo is dropped when full (one C{dict} operation: safe across threads).
    """

    def __init__(self, size=256):
        self._entries = {}
        self._size = size

    def get(self, key):
        """What was remembered for this very object, or C{None}."""
        entry = self._entries.get(id(key))
        if entry is not None and entry[0] is key:
            return entry[1]
        return None

    def put(self, key, value):
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(key)] = (key, value)
        return value


_FINGERPRINTS = _KeyMemo()  # public key object -> its fingerprint
_CHECKED_KEYS = _KeyMemo()  # public key object -> True: it passed check_public_key


def check_public_key(key):
    """
    Return C{key} if it is an RSA public key pager accepts (2048 to 8192 bits, exponent 65537, a modulus that is
    odd, has no prime factor below 1000 and is not a square); raise L{BadKey}.  Whether the modulus is a product of
    two large primes cannot be checked cheaply; a bad one only weakens its own owner.  A key object that passed is
    remembered (L{_KeyMemo}), so checking it again costs a look-up.
    """
    if _CHECKED_KEYS.get(key):
        return key
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("The key is not an RSA public key.")
    if key.key_size < RSA_BITS:
        raise BadKey("The key has %d bits; pager needs at least %d." % (key.key_size, RSA_BITS))
    if key.key_size > RSA_MAX_BITS:
        raise BadKey("The key has %d bits; pager accepts at most %d." % (key.key_size, RSA_MAX_BITS))
    numbers = key.public_numbers()
    if numbers.e != RSA_EXPONENT:
        raise BadKey("The key's public exponent is not 65537.")
    n = numbers.n
    if n % 2 == 0:
        raise BadKey("The key's modulus is even, so it is not an RSA modulus.")
    if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        raise BadKey("The key's modulus has a small factor, so it is not an RSA modulus.")
    if math.isqrt(n) ** 2 == n:
        raise BadKey("The key's modulus is a square, so it is not an RSA modulus.")
    _CHECKED_KEYS.put(key, True)
    return key


def load_public_key(pem):
    """Parse an SPKI PEM public key (C{str} or C{bytes}) and check it with L{check_public_key}."""
    if isinstance(pem, str):
        pem = pem.encode("ascii", "replace")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, AssertionError):
        raise BadKey("The public key is not a valid PEM SubjectPublicKeyInfo.")
    except Exception:  # cryptography raises UnsupportedAlgorithm and others for exotic input
        raise BadKey("The public key is not a valid PEM SubjectPublicKeyInfo.")
    return check_public_key(key)


def public_key_pem(key):
    """The SPKI PEM text of a public key (or of a private key's public half)."""
    if isinstance(key, rsa.RSAPrivateKey):
        key = key.public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(key):
    """
    The key fingerprint: SHA-256 of the DER SubjectPublicKeyInfo, 32 bytes.  A public key object's is remembered
    (L{_KeyMemo}); a private key's never is, so that no private key is kept alive here.
    """
    known = _FINGERPRINTS.get(key)
    if known is not None:
        return known
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    fp = hashlib.sha256(der).digest()
    if public is key and isinstance(key, rsa.RSAPublicKey):
        _FINGERPRINTS.put(key, fp)
    return fp


def format_fingerprint(fp):
    """A fingerprint for reading aloud: 16 groups of four hex digits."""
    text = fp.hex()
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


def device_id(key):
    """A device's id: the first L{DEVICE_ID_SIZE} bytes of its RSA key's fingerprint (public or private key)."""
    return fingerprint(key)[:DEVICE_ID_SIZE]


def valid_device_name(name):
    """
    Whether C{name} can name a device: 1 to 64 bytes of UTF-8, printable (no control, format or separator character
    but the space), no space at either end.
    """
    return (isinstance(name, str) and 1 <= len(name.encode("utf-8", "replace")) <= MAX_DEVICE_NAME_BYTES
            and name.isprintable() and name == name.strip())


def _b64text(data):
    return base64.b64encode(data).decode("ascii")


def _seconds(value):
    """Whether C{value} is a whole number of seconds that fits a u64 (booleans are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 64


def _prekey_id(value):
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2 ** 32


def _pss_verify(public_key, signature, data, what):
    """Check an RSA-PSS-SHA256 signature over C{data}; raise L{BadCertificate} naming C{what}."""
    if not isinstance(signature, bytes):
        raise BadCertificate("The %s's signature is not bytes." % what)
    try:
        public_key.verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise BadCertificate("The %s's signature does not verify." % what)


def _json_field(obj, name, kind, what):
    """C{obj[name]} if C{obj} is a dict holding a value of type C{kind} there; else L{BadCertificate}."""
    if not isinstance(obj, dict):
        raise BadCertificate("The %s is not a JSON object." % what)
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadCertificate("The %s's %r field is missing or of the wrong type." % (what, name))
    return value


def _json_b64(obj, name, what, size=None, max_size=1024):
    value = _json_field(obj, name, str, what)
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise BadCertificate("The %s's %r field is not base64." % (what, name))
    if (size is not None and len(data) != size) or len(data) > max_size:
        raise BadCertificate("The %s's %r field has the wrong length." % (what, name))
    return data


def _json_device_id(value, what):
    if not isinstance(value, str) or len(value) != 2 * DEVICE_ID_SIZE or not re.fullmatch("[0-9a-f]*", value):
        raise BadCertificate("The %s's device id is not %d lower-case hex digits." % (what, 2 * DEVICE_ID_SIZE))
    return bytes.fromhex(value)


def _json_user(user, what):
    if not valid_username(user):
        raise BadCertificate("The %s names no valid user." % what)
    return user


def _check_device_fields(user, device, what):
    if not valid_username(user):
        raise BadCertificate("The %s names no valid user." % what)
    if not isinstance(device, bytes) or len(device) != DEVICE_ID_SIZE:
        raise BadCertificate("The %s's device id is not %d bytes." % (what, DEVICE_ID_SIZE))


@dataclasses.dataclass(frozen=True)
class DeviceCertificate:
    """
    The identity key's statement that a device key belongs to C{user}: user, device id, the device's public key (DER
    SubjectPublicKeyInfo), its name and creation time (whole seconds), signed by the identity key.
    """

    user: str
    device_id: bytes
    public_key_der: bytes
    name: str
    created: int
    signature: bytes

    def signed_bytes(self):
        """The exact bytes the identity key signs (PROTOCOL.md, "Device certificates")."""
        _check_device_fields(self.user, self.device_id, "device certificate")
        if not valid_device_name(self.name):
            raise BadCertificate("The device's name is not 1-64 bytes of printable text.")
        if not _seconds(self.created):
            raise BadCertificate("The device certificate's creation time is not a number of seconds.")
        if not isinstance(self.public_key_der, bytes):
            raise BadCertificate("The device certificate's key is not bytes.")
        return (_lp(DEVICE_TAG) + _lp(self.user.encode("ascii")) + _lp(self.device_id) + _lp(self.public_key_der)
                + _lp(self.name.encode("utf-8")) + _U64.pack(self.created))

    def public_key(self):
        """The device's RSA public key, checked with L{check_public_key}; L{BadCertificate} if it is none."""
        try:
            return check_public_key(serialization.load_der_public_key(self.public_key_der))
        except BadKey as e:
            raise BadCertificate("The device key is not usable: %s" % e.message)
        except Exception:  # ValueError, UnsupportedAlgorithm and others for garbage
            raise BadCertificate("The device key is not a DER SubjectPublicKeyInfo.")

    def verify(self, identity_public_key):
        """Check the certificate against the user's identity key; return the device's public key."""
        data = self.signed_bytes()
        key = self.public_key()
        if not hmac.compare_digest(device_id(key), self.device_id):
            raise BadCertificate("The device id is not the one of the device key.")
        _pss_verify(identity_public_key, self.signature, data, "device certificate")
        return key

    def to_json(self):
        """The device's fields of the wire's device object (the user is named by the frame around it)."""
        return {"id": self.device_id.hex(), "public_key": public_key_pem(self.public_key()), "name": self.name,
                "created": self.created, "certificate": _b64text(self.signature)}

    @classmethod
    def from_json(cls, obj, user):
        """
        The certificate of C{user}'s device from a wire device object; L{BadCertificate} for any missing or malformed
        field (the signature is not checked here: call L{verify}).
        """
        what = "device certificate"
        device = _json_device_id(_json_field(obj, "id", str, what), what)
        try:
            key = load_public_key(_json_field(obj, "public_key", str, what))
        except BadKey as e:
            raise BadCertificate("The device key is not usable: %s" % e.message)
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        name = _json_field(obj, "name", str, what)
        if not valid_device_name(name):
            raise BadCertificate("The device's name is not 1-64 bytes of printable text.")
        created = _json_field(obj, "created", int, what)
        if not _seconds(created):
            raise BadCertificate("The device certificate's creation time is not a number of seconds.")
        signature = _json_b64(obj, "certificate", what)
        certificate = cls(_json_user(user, what), device, der, name, created, signature)
        certificate.signed_bytes()
        return certificate


def certify_device(identity_private_key, user, device_public_key, name, created):
    """The identity key's L{DeviceCertificate} for C{device_public_key}.  An RSA signature: off the reactor thread."""
    if isinstance(device_public_key, rsa.RSAPrivateKey):
        device_public_key = device_public_key.public_key()
    der = check_public_key(device_public_key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    unsigned = DeviceCertificate(user, device_id(device_public_key), der, name, created, b"")
    signature = identity_private_key.sign(unsigned.signed_bytes(), _PSS, hashes.SHA256())
    return dataclasses.replace(unsigned, signature=signature)


@dataclasses.dataclass(frozen=True)
class DeviceRevocation:
    """The identity key's statement that C{user}'s device C{device_id} is revoked since C{revoked_at} (seconds)."""

    user: str
    device_id: bytes
    revoked_at: int
    signature: bytes

    def signed_bytes(self):
        """The exact bytes the identity key signs (PROTOCOL.md, "Device revocations")."""
        _check_device_fields(self.user, self.device_id, "device revocation")
        if not _seconds(self.revoked_at):
            raise BadCertificate("The revocation time is not a number of seconds.")
        return (_lp(REVOCATION_TAG) + _lp(self.user.encode("ascii")) + _lp(self.device_id)
                + _U64.pack(self.revoked_at))

    def verify(self, identity_public_key):
        """Check the revocation against the user's identity key; raises L{BadCertificate}."""
        _pss_verify(identity_public_key, self.signature, self.signed_bytes(), "device revocation")

    def to_json(self):
        """The wire form: C{{"device", "at", "signature"}} (a device object's C{revoked} holds "at" and "signature")."""
        return {"device": self.device_id.hex(), "at": self.revoked_at, "signature": _b64text(self.signature)}

    @classmethod
    def from_json(cls, obj, user, device=None):
        """
        C{user}'s revocation from its wire form; the device id is C{obj["device"]} or, for a device object's
        C{revoked} member, the C{device} given (bytes).  L{BadCertificate} for any malformed field.
        """
        what = "device revocation"
        if device is None:
            device = _json_device_id(_json_field(obj, "device", str, what), what)
        at = _json_field(obj, "at", int, what)
        revocation = cls(_json_user(user, what), device, at, _json_b64(obj, "signature", what))
        revocation.signed_bytes()
        return revocation


def revoke_device(identity_private_key, user, device, at):
    """The identity key's L{DeviceRevocation} of C{user}'s device C{device} (bytes) at C{at} (whole seconds)."""
    unsigned = DeviceRevocation(user, device, at, b"")
    return dataclasses.replace(unsigned, signature=identity_private_key.sign(unsigned.signed_bytes(), _PSS,
                                                                             hashes.SHA256()))


def _x25519_public(data, what="prekey"):
    """An X25519 public key from its 32 raw bytes; L{BadCertificate} otherwise."""
    if not isinstance(data, bytes) or len(data) != X25519_KEY_SIZE:
        raise BadCertificate("The %s is not %d bytes." % (what, X25519_KEY_SIZE))
    return x25519.X25519PublicKey.from_public_bytes(data)


def x25519_public_bytes(key):
    """The 32 raw bytes of an X25519 public key (or of a private key's public half)."""
    if isinstance(key, x25519.X25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclasses.dataclass(frozen=True)
class SignedPrekey:
    """
    A device's medium-term X25519 key, signed by the device key: C{public} (32 raw bytes) under a random
    C{prekey_id} (1 to 2**32-1), valid from C{valid_from} to C{valid_until} (whole seconds).
    """

    user: str
    device_id: bytes
    prekey_id: int
    public: bytes
    valid_from: int
    valid_until: int
    signature: bytes

    def signed_bytes(self):
        """The exact bytes the device key signs (PROTOCOL.md, "Signed prekeys")."""
        _check_device_fields(self.user, self.device_id, "signed prekey")
        if not _prekey_id(self.prekey_id):
            raise BadCertificate("The signed prekey's id is not 1 to 2**32-1.")
        _x25519_public(self.public, "signed prekey")
        if not (_seconds(self.valid_from) and _seconds(self.valid_until) and self.valid_from < self.valid_until):
            raise BadCertificate("The signed prekey's validity is not a span of seconds.")
        return (_lp(SIGNED_PREKEY_TAG) + _lp(self.user.encode("ascii")) + _lp(self.device_id)
                + _U32.pack(self.prekey_id) + _lp(self.public) + _U64.pack(self.valid_from)
                + _U64.pack(self.valid_until))

    def verify(self, device_public_key):
        """Check the signature with the device's key; raises L{BadCertificate}."""
        _pss_verify(device_public_key, self.signature, self.signed_bytes(), "signed prekey")

    def usable_at(self, t):
        """Whether a message may be sealed to it at time C{t}: from a day before valid_from to valid_until."""
        return self.valid_from - PREKEY_SKEW <= t <= self.valid_until

    def to_json(self):
        return {"id": self.prekey_id, "public": _b64text(self.public), "valid_from": self.valid_from,
                "valid_until": self.valid_until, "signature": _b64text(self.signature)}

    @classmethod
    def from_json(cls, obj, user, device):
        """C{user}'s device C{device} (bytes)'s signed prekey from its wire form; L{BadCertificate} if malformed."""
        what = "signed prekey"
        prekey = cls(
            _json_user(user, what), device, _json_field(obj, "id", int, what),
            _json_b64(obj, "public", what, X25519_KEY_SIZE), _json_field(obj, "valid_from", int, what),
            _json_field(obj, "valid_until", int, what), _json_b64(obj, "signature", what),
        )
        prekey.signed_bytes()
        return prekey


def sign_prekey(device_private_key, user, prekey_id, public, valid_from, valid_until):
    """The device key's L{SignedPrekey} over the X25519 public key C{public} (32 raw bytes)."""
    unsigned = SignedPrekey(user, device_id(device_private_key), prekey_id, public, valid_from, valid_until, b"")
    return dataclasses.replace(unsigned, signature=device_private_key.sign(unsigned.signed_bytes(), _PSS,
                                                                           hashes.SHA256()))


@dataclasses.dataclass(frozen=True)
class OneTimePrekey:
    """A device's single-use X25519 public key (unsigned, as in X3DH): the server hands each out at most once."""

    prekey_id: int
    public: bytes

    def to_json(self):
        return {"id": self.prekey_id, "public": _b64text(self.public)}

    @classmethod
    def from_json(cls, obj):
        what = "one-time prekey"
        prekey_id = _json_field(obj, "id", int, what)
        if not _prekey_id(prekey_id):
            raise BadCertificate("The one-time prekey's id is not 1 to 2**32-1.")
        return cls(prekey_id, _json_b64(obj, "public", what, X25519_KEY_SIZE))


@dataclasses.dataclass(frozen=True)
class Recipient:
    """A recipient of a version 1 header (still opened, never sent): name, key fingerprint, RSA-OAEP wrapped key."""

    name: str
    fingerprint: bytes
    wrapped_key: bytes


WRAP_RSA = 1  # the content key under RSA-OAEP to a legacy device's key
WRAP_X25519 = 2  # the content key under a key derived from an ephemeral X25519 key and the device's prekeys
_X25519_WRAPPED_SIZE = 32 + GCM_TAG_SIZE
_WRAP_NONCE = bytes(12)  # every wrap has its own key, so one fixed nonce is safe


@dataclasses.dataclass(frozen=True)
class Wrap:
    """
    One entry of a header: the content key wrapped for the device C{device_id} of the user C{name}.  C{kind} is
    L{WRAP_RSA} or L{WRAP_X25519}; the prekey ids and the ephemeral key are only for the second (0, 0 and empty
    for the first).
    """

    name: str
    device_id: bytes
    kind: int
    wrapped: bytes
    spk_id: int = 0
    opk_id: int = 0
    ephemeral: bytes = b""

    def encode(self):
        head = _lp(self.name.encode("ascii")) + _lp(self.device_id) + bytes([self.kind])
        if self.kind == WRAP_RSA:
            return head + _lp(self.wrapped)
        return head + _U32.pack(self.spk_id) + _U32.pack(self.opk_id) + _lp(self.ephemeral) + _lp(self.wrapped)


@dataclasses.dataclass(frozen=True)
class DeviceTarget:
    """
    A device to seal a message to: its user and id, and either its signed prekey (with a one-time prekey when the
    server had one left) or, only for a legacy device that never published prekeys, its RSA key.
    """

    user: str
    device_id: bytes
    rsa_key: object = None
    signed_prekey: SignedPrekey = None
    one_time: OneTimePrekey = None


@dataclasses.dataclass(frozen=True)
class EnvelopeHeader:
    """
    The parsed header of an envelope; C{raw} is the exact bytes that were parsed (and are signed).  A version 1
    header parses into the same fields: each recipient becomes an RSA entry for the device named by the first half of
    its key's fingerprint, and so does the sender's device.  A group message's header (tag L{GROUP_ENVELOPE_TAG})
    also names its group and the membership version it was sealed for; both are C{None} for any other.
    """

    raw: bytes
    version: int
    message_id: bytes
    timestamp_ms: int
    sender: str
    sender_fingerprint: bytes  # the sender's identity key
    sender_device: bytes  # the device whose key signed
    content_type: str
    filename: str
    chunk_size: int
    entries: tuple  # of Wrap, sorted by (name, device id)
    commitment: bytes
    group_id: bytes = None  # a group message's group (GROUP_ID_SIZE bytes)
    group_head: bytes = None  # the hash of the last group operation the sender had verified (32 bytes)

    @property
    def recipient_names(self):
        """The distinct user names of the entries, sorted (the sender's own when it wrapped for its other devices)."""
        return sorted({e.name for e in self.entries})

    @property
    def addressed_names(self):
        """
        The users the sender addressed, sorted: the entries' names without the sender's own, whose entries are its
        other devices (so that they read the conversation too), unless the sending device has an entry as well (a
        note to self).
        """
        note_to_self = self.entry(self.sender, self.sender_device) is not None
        return sorted({e.name for e in self.entries if e.name != self.sender or note_to_self})

    def entry(self, name, device):
        """The L{Wrap} for C{name}'s device C{device} (bytes), or C{None}."""
        for e in self.entries:
            if e.name == name and e.device_id == device:
                return e
        return None

    def devices_of(self, name):
        """The ids of C{name}'s devices the message is wrapped for, in header order."""
        return [e.device_id for e in self.entries if e.name == name]


def _wrap_order(entry):
    return entry.name.encode("ascii"), entry.device_id


def _encode_header(message_id, timestamp_ms, sender, sender_fp, sender_device, content_type, filename, chunk_size,
                   entries, commitment, group=None):
    """
    A version 2 header; C{entries} (L{Wrap}s) are written in the order given.  With C{group} (group id, head) it is a
    group message's header: the group tag, and the two fields after the sender device.
    """
    parts = [
        _lp(ENVELOPE_TAG if group is None else GROUP_ENVELOPE_TAG), _lp(message_id), _U64.pack(timestamp_ms),
        _lp(sender.encode("ascii")), _lp(sender_fp), _lp(sender_device),
    ]
    if group is not None:
        parts += [_lp(group[0]), _lp(group[1])]
    parts += [
        _lp(content_type.encode("ascii")), _lp(filename.encode("utf-8")), _U32.pack(chunk_size),
        _U32.pack(len(entries)),
    ]
    parts += [e.encode() for e in entries]
    parts.append(_lp(commitment))
    return b"".join(parts)


def _encode_header_v1(message_id, timestamp_ms, sender, sender_fp, content_type, filename, chunk_size, recipients,
                      commitment):
    """A version 1 header (L{Recipient}s): what clients before version 3 sent, for the tests that open one."""
    parts = [
        _lp(ENVELOPE_TAG_V1), _lp(message_id), _U64.pack(timestamp_ms), _lp(sender.encode("ascii")),
        _lp(sender_fp), _lp(content_type.encode("ascii")), _lp(filename.encode("utf-8")),
        _U32.pack(chunk_size), _U32.pack(len(recipients)),
    ]
    for r in recipients:
        parts += [_lp(r.name.encode("ascii")), _lp(r.fingerprint), _lp(r.wrapped_key)]
    parts.append(_lp(commitment))
    return b"".join(parts)


def parse_header(raw):
    """
    Parse and check an envelope header, version 2 (1:1 or group) or 1: every field present with its exact length,
    names valid, entries sorted by (name, device id) without duplicates, nothing after the end.  Raises
    L{MalformedEnvelope}.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise MalformedEnvelope("The message header is not bytes.")
    r = _Reader(raw)
    tag = r.field(64)
    if tag not in (ENVELOPE_TAG, GROUP_ENVELOPE_TAG, ENVELOPE_TAG_V1):
        raise MalformedEnvelope("The message is not a pager v2 (or v1) envelope.")
    version = 1 if tag == ENVELOPE_TAG_V1 else 2
    group = tag == GROUP_ENVELOPE_TAG
    # Runs of fields of fixed sizes are read at once, length prefixes included, and each length is then checked.
    id_size, message_id, timestamp_ms = r.fixed(_ID_AND_TIME)
    if id_size != MESSAGE_ID_SIZE:
        raise MalformedEnvelope("The message id is not %d bytes." % MESSAGE_ID_SIZE)
    sender = _header_name(r)
    if version == 2:
        fp_size, sender_fp, device_size, sender_device = r.fixed(_FINGERPRINT_AND_DEVICE)
        if fp_size != 32 or device_size != DEVICE_ID_SIZE:
            raise MalformedEnvelope("The sender's key fingerprint or device id has the wrong length.")
        if group:
            group_id_size, group_id, head_size, group_head = r.fixed(_GROUP_AND_HEAD)
            if group_id_size != GROUP_ID_SIZE or head_size != 32:
                raise MalformedEnvelope("The group id or the membership head has the wrong length.")
    else:
        sender_fp = _header_fingerprint(r)
        sender_device = sender_fp[:DEVICE_ID_SIZE]
    try:
        content_type = r.field(16).decode("ascii")
        filename = r.field(MAX_FILENAME_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelope("The content type or file name is not valid text.")
    if content_type not in CONTENT_TYPES:
        raise MalformedEnvelope("The content type is neither text nor file.")
    if (content_type == "file") != bool(filename):
        raise MalformedEnvelope("A file needs a file name, and only a file has one.")
    chunk_size, count = r.fixed(_CHUNK_SIZE_AND_COUNT)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise MalformedEnvelope("The chunk size is out of range.")
    if version == 1 and not 1 <= count <= MAX_RECIPIENTS:
        raise MalformedEnvelope("A message has 1 to %d recipients." % MAX_RECIPIENTS)
    max_wraps = MAX_GROUP_WRAPS if group else MAX_WRAPS
    if not 1 <= count <= max_wraps:
        raise MalformedEnvelope("A %smessage has 1 to %d wrapped keys." % ("group " if group else "", max_wraps))
    entries = []
    read_entry = _header_entry if version == 2 else _header_recipient_v1
    previous = None
    for _ in range(count):
        entry = read_entry(r)
        order = (entry.name, entry.device_id)  # names are ASCII: str order is byte order
        if previous is not None and order <= previous:
            raise MalformedEnvelope("The wrapped keys are not sorted by name and device without duplicates.")
        previous = order
        entries.append(entry)
    if group:
        if len({e.name for e in entries} | {sender}) > DEFAULT_MAX_GROUP_MEMBERS:
            raise MalformedEnvelope("A group message names at most %d members, its sender included."
                                    % DEFAULT_MAX_GROUP_MEMBERS)
    elif len({e.name for e in entries} - {sender}) > MAX_RECIPIENTS:
        raise MalformedEnvelope("A message has at most %d recipients besides its sender." % MAX_RECIPIENTS)
    commitment_size, commitment = r.fixed(_COMMITMENT_FIELD)
    if commitment_size != 32:
        raise MalformedEnvelope("The key commitment is not 32 bytes.")
    r.end()
    if not group:
        return EnvelopeHeader(bytes(raw), version, message_id, timestamp_ms, sender, sender_fp, sender_device,
                              content_type, filename, chunk_size, tuple(entries), commitment)
    return EnvelopeHeader(bytes(raw), version, message_id, timestamp_ms, sender, sender_fp, sender_device,
                          content_type, filename, chunk_size, tuple(entries), commitment, group_id, group_head)


# Runs of fixed-size fields of a version 2 header, each length-prefixed field with its u32 length.
_ID_AND_TIME = struct.Struct(">I%dsQ" % MESSAGE_ID_SIZE)  # lp(message id) u64(timestamp)
_FINGERPRINT_AND_DEVICE = struct.Struct(">I32sI%ds" % DEVICE_ID_SIZE)  # lp(sender fingerprint) lp(sender device)
_GROUP_AND_HEAD = struct.Struct(">I%dsI32s" % GROUP_ID_SIZE)  # a group header's lp(group id) lp(membership head)
_CHUNK_SIZE_AND_COUNT = struct.Struct(">II")
_DEVICE_AND_KIND = struct.Struct(">I%dsB" % DEVICE_ID_SIZE)  # an entry's lp(device id) u8(kind)
_X25519_ENTRY = struct.Struct(">III%dsI%ds" % (X25519_KEY_SIZE, _X25519_WRAPPED_SIZE))  # spk, opk, lp(ek), lp(wrapped)
_COMMITMENT_FIELD = struct.Struct(">I32s")


def _header_entry(r):
    name = _header_name(r)
    device_size, device, kind = r.fixed(_DEVICE_AND_KIND)
    if device_size != DEVICE_ID_SIZE:
        raise MalformedEnvelope("A device id in the message header is not %d bytes." % DEVICE_ID_SIZE)
    if kind == WRAP_RSA:
        return Wrap(name, device, kind, _header_rsa_wrapped(r))
    if kind != WRAP_X25519:
        raise MalformedEnvelope("A wrapped key is of an unknown kind.")
    spk_id, opk_id, ephemeral_size, ephemeral, wrapped_size, wrapped = r.fixed(_X25519_ENTRY)
    if spk_id == 0:
        raise MalformedEnvelope("A wrapped key names no signed prekey.")
    if ephemeral_size != X25519_KEY_SIZE or wrapped_size != _X25519_WRAPPED_SIZE:
        raise MalformedEnvelope("An X25519 wrapped key or its ephemeral key has the wrong length.")
    return Wrap(name, device, kind, wrapped, spk_id, opk_id, ephemeral)


def _header_recipient_v1(r):
    name = _header_name(r)
    fp = _header_fingerprint(r)
    return Wrap(name, fp[:DEVICE_ID_SIZE], WRAP_RSA, _header_rsa_wrapped(r))


def _header_rsa_wrapped(r):
    wrapped = r.field(RSA_MAX_BITS // 8)
    if len(wrapped) * 8 < RSA_BITS:
        raise MalformedEnvelope("A wrapped key is too short.")
    return wrapped


def _header_name(r):
    name = r.field(32)
    if _USERNAME_BYTES_FULLMATCH(name) is None:  # valid_username, on the bytes
        raise MalformedEnvelope("A user name in the message header is not valid.")
    return name.decode("ascii")


def _header_fingerprint(r):
    fp = r.field(32)
    if len(fp) != 32:
        raise MalformedEnvelope("A key fingerprint in the message header is not 32 bytes.")
    return fp


def _commitment(message_id, content_key):
    return hashlib.sha256(COMMITMENT_TAG + message_id + content_key).digest()


def _nonce(counter, last):
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


_SIGNATURE_TAG_FIELD = _lp(SIGNATURE_TAG)
_COUNTS_AND_DIGEST = struct.Struct(">QQI")  # u64(chunks) u64(ciphertext length) and the digest's u32 length


def signed_bytes(header_raw, chunk_count, ciphertext_length, ciphertext_digest):
    """
    The exact bytes the sender signs: the signature tag, the header, the number of chunks, the total ciphertext
    length and the SHA-256 of all chunk ciphertexts in order.
    """
    return b"".join((_SIGNATURE_TAG_FIELD, _lp(header_raw),
                     _COUNTS_AND_DIGEST.pack(chunk_count, ciphertext_length, len(ciphertext_digest)),
                     ciphertext_digest))


@dataclasses.dataclass
class Envelope:
    """A whole sealed message: header bytes, chunk ciphertexts in order, signature."""

    header: bytes
    chunks: list
    signature: bytes

    @property
    def size(self):
        """The plaintext size, in bytes."""
        return sum(len(c) for c in self.chunks) - GCM_TAG_SIZE * len(self.chunks)


def _wrap_info(message_id, sender, sender_device, recipient, recipient_device, spk_id, opk_id, ephemeral):
    """The HKDF info of an X25519 wrap: it binds the message, both ends (users and devices), the prekeys and C{ek}."""
    return b"".join((_WRAP_TAG_FIELD, _lp(message_id), _lp(sender.encode("ascii")), _lp(sender_device),
                     _lp(recipient.encode("ascii")), _lp(recipient_device), _TWO_U32.pack(spk_id, opk_id),
                     _lp(ephemeral)))


_WRAP_TAG_FIELD = _lp(WRAP_TAG)
_TWO_U32 = struct.Struct(">II")


def _wrap_key(ikm, info):
    """The key-encryption key of one X25519 wrap: HKDF-SHA256 of the agreements, no salt, 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def _ephemeral_key():
    """A fresh X25519 key for one wrap (a function of its own, so tests can patch it to get exact vectors)."""
    return x25519.X25519PrivateKey.generate()


def _targets(recipients):
    """The L{DeviceTarget}s of a Sealer's C{recipients}: a list of them, or the older mapping of name to RSA key."""
    if isinstance(recipients, dict):
        return [DeviceTarget(name, device_id(key), rsa_key=key) for name, key in recipients.items()]
    return list(recipients)


def _x25519_wrap(content_key, info_fields, target):
    """The L{Wrap} of C{content_key} to C{target}'s prekeys; C{info_fields} are the message's part of the info."""
    spk, opk = target.signed_prekey, target.one_time
    opk_id = opk.prekey_id if opk is not None else 0
    ek = _ephemeral_key()
    ephemeral = x25519_public_bytes(ek)
    message_id, sender, sender_device = info_fields
    info = _wrap_info(message_id, sender, sender_device, target.user, target.device_id, spk.prekey_id, opk_id,
                      ephemeral)
    try:
        ikm = ek.exchange(_x25519_public(spk.public, "signed prekey"))
        if opk is not None:
            ikm += ek.exchange(_x25519_public(opk.public, "one-time prekey"))
    except (ValueError, BadCertificate):  # cryptography refuses a low-order point's all-zero agreement
        raise PrekeyUnusable("A prekey of %s's device %s is not a usable X25519 key." % (
            target.user, target.device_id.hex()))
    wrapped = AESGCM(_wrap_key(ikm, info)).encrypt(_WRAP_NONCE, content_key, None)
    return Wrap(target.user, target.device_id, WRAP_X25519, wrapped, spk.prekey_id, opk_id, ephemeral)


def new_message_id(timestamp_ms):
    """
    A fresh message id: the header's timestamp (48 bits of milliseconds, big-endian) then 80 random bits.  Unique
    as a random id is (two ids collide only among about 2**40 messages sealed in one millisecond), and it tells
    the server nothing the header's timestamp does not: it is there so that the ids of a queue sit together in
    the server's index, in the order the queue settles, instead of one index page touched per message.
    """
    return (timestamp_ms % 2 ** 48).to_bytes(6, "big") + secrets.token_bytes(MESSAGE_ID_SIZE - 6)


class Sealer:
    """
    Seal one message incrementally: L{update} takes plaintext and returns the chunk ciphertexts completed so far,
    L{finish} returns the last chunks and the signature.  The header is ready from the start.

    RSA (wrapping, signing), X25519 and bulk AES happen here: use it off the reactor thread.
    """

    def __init__(self, private_key, sender, recipients, content_type="text", filename="", chunk_size=CHUNK_SIZE,
                 message_id=None, timestamp_ms=None, content_key=None, sender_fingerprint=None, sender_device=None,
                 now=None, group=None):
        """
        @param private_key: the sending device's RSA key: it signs.
        @param recipients: a list of L{DeviceTarget}s, one per device (the sender's other devices under its own
            name), or a mapping of name to RSA public key, each name then being one legacy device with that key.
        @param sender_fingerprint: the fingerprint of the sender's identity key (default: C{private_key}'s).
        @param sender_device: the sending device's id (default: C{private_key}'s).
        @param now: the time (seconds) at which signed prekeys must be valid, besides the message's timestamp.
        @param group: C{(group id, head)} for a group message: the group's id (L{GROUP_ID_SIZE} bytes) and the hash
            of the last operation of its chain the sender verified (32 bytes); the recipients are then every current
            device of every member but the sending one (up to L{MAX_GROUP_WRAPS} devices and
            L{DEFAULT_MAX_GROUP_MEMBERS} users, the sender included).
        @raise PrekeyUnusable: a target's signed prekey is expired or not yet valid, or no X25519 key.
        @raise NoPrekeys: a target has neither a signed prekey nor an RSA key.
        """
        if content_type not in CONTENT_TYPES:
            raise ValueError("content_type must be one of %r" % (CONTENT_TYPES,))
        targets = _targets(recipients)
        if group is not None:
            group_id, head = group
            if not (isinstance(group_id, bytes) and len(group_id) == GROUP_ID_SIZE
                    and isinstance(head, bytes) and len(head) == 32):
                raise ValueError("group is (a %d-byte group id, a 32-byte head)" % GROUP_ID_SIZE)
            group = (group_id, head)
            if not 1 <= len(targets) <= MAX_GROUP_WRAPS:
                raise ValueError("a group message has 1 to %d recipient devices" % MAX_GROUP_WRAPS)
            if len({t.user for t in targets} | {sender}) > DEFAULT_MAX_GROUP_MEMBERS:
                raise ValueError("a group message has at most %d members, its sender included"
                                 % DEFAULT_MAX_GROUP_MEMBERS)
        else:
            if not 1 <= len(targets) <= MAX_WRAPS:
                raise ValueError("a message has 1 to %d recipient devices" % MAX_WRAPS)
            if len({t.user for t in targets} - {sender}) > MAX_RECIPIENTS:
                raise ValueError("a message has 1 to %d recipients" % MAX_RECIPIENTS)
        if len({(t.user, t.device_id) for t in targets}) != len(targets):
            raise ValueError("a device is named twice among the recipients")
        self._private_key = private_key
        self._content_key = content_key if content_key is not None else AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(self._content_key)
        timestamp_ms = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        message_id = message_id if message_id is not None else new_message_id(timestamp_ms)
        now = time.time() if now is None else now
        if sender_fingerprint is None or sender_device is None:
            own = fingerprint(private_key)  # a private key's is never remembered: compute it once here
            sender_fingerprint = sender_fingerprint if sender_fingerprint is not None else own
            sender_device = sender_device if sender_device is not None else own[:DEVICE_ID_SIZE]
        entries = []
        for target in targets:
            spk = target.signed_prekey
            if spk is not None:
                if spk.user != target.user or spk.device_id != target.device_id:
                    raise BadCertificate("The signed prekey given for %s's device %s is another device's." % (
                        target.user, target.device_id.hex()))
                if not (spk.usable_at(now) and spk.usable_at(timestamp_ms / 1000)):
                    raise PrekeyUnusable("The signed prekey of %s's device %s is expired or not yet valid." % (
                        target.user, target.device_id.hex()))
                entries.append(_x25519_wrap(self._content_key, (message_id, sender, sender_device), target))
            elif target.rsa_key is not None:
                key = check_public_key(target.rsa_key)
                if device_id(key) != target.device_id:
                    raise ValueError("the RSA key given for %s's device is another device's key" % target.user)
                entries.append(Wrap(target.user, target.device_id, WRAP_RSA, key.encrypt(self._content_key, _OAEP)))
            else:
                raise NoPrekeys("%s's device %s has no signed prekey to seal the message to." % (
                    target.user, target.device_id.hex()))
        entries.sort(key=_wrap_order)
        self.header = _encode_header(
            message_id, timestamp_ms, sender, sender_fingerprint, sender_device, content_type, filename, chunk_size,
            entries, _commitment(message_id, self._content_key), group,
        )
        self.parsed = parse_header(self.header)
        self._ad = hashlib.sha256(self.header).digest()
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._counter = 0
        self._digest = hashlib.sha256()
        self._length = 0

    @property
    def message_id(self):
        return self.parsed.message_id

    def _seal(self, plaintext, last):
        ciphertext = self._aead.encrypt(_nonce(self._counter, last), plaintext, self._ad)
        self._counter += 1
        self._digest.update(ciphertext)
        self._length += len(ciphertext)
        return ciphertext

    def update(self, data):
        """
        Add plaintext; return the chunk ciphertexts completed.  The last full chunk is held back until more comes,
        since only then is it known not to be the final one.  Chunks are sealed straight from C{data}: only a
        partial chunk is ever copied.
        """
        out = []
        size = self._chunk_size
        view = memoryview(data)
        if self._buffer:
            take = min(size - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
            if not view:
                return out
            out.append(self._seal(self._buffer, False))  # full, and more data follows
            self._buffer = bytearray()
        while len(view) > size:
            out.append(self._seal(view[:size], False))
            view = view[size:]
        self._buffer = bytearray(view)
        return out

    def finish(self):
        """Return C{(chunks, signature)}: the final chunk ciphertext(s) and the RSA-PSS signature trailer."""
        last = [self._seal(self._buffer, True)]
        self._buffer = bytearray()
        data = signed_bytes(self.header, self._counter, self._length, self._digest.digest())
        return last, self._private_key.sign(data, _PSS, hashes.SHA256())


def seal(private_key, sender, recipients, plaintext, **kwargs):
    """Seal a whole message at once; return an L{Envelope}.  See L{Sealer} for the arguments."""
    sealer = Sealer(private_key, sender, recipients, **kwargs)
    chunks = sealer.update(plaintext)
    last, signature = sealer.finish()
    return Envelope(sealer.header, chunks + last, signature)


class EnvelopeVerifier:
    """
    What a server can check without reading the content: the header parses, chunk sizes fit the header, and the
    signature verifies against the sender's key.  Memory is constant whatever the message size.
    """

    def __init__(self, header_raw, max_size=None):
        self.header = parse_header(header_raw)
        self.max_size = max_size
        self._digest = hashlib.sha256()
        self.chunk_count = 0
        self.ciphertext_length = 0
        self.size = 0  # plaintext bytes
        self._short_seen = False

    def update(self, chunk):
        """Account for the next chunk ciphertext.  Raises L{MalformedEnvelope} or L{TooLarge}."""
        n = len(chunk)
        if not GCM_TAG_SIZE <= n <= self.header.chunk_size + GCM_TAG_SIZE:
            raise MalformedEnvelope("A chunk has a size the header does not allow.")
        if self._short_seen:
            raise MalformedEnvelope("Only the last chunk may be shorter than the chunk size.")
        if n < self.header.chunk_size + GCM_TAG_SIZE:
            self._short_seen = True
        self.size += n - GCM_TAG_SIZE
        if self.max_size is not None and self.size > self.max_size:
            raise TooLarge("The message is larger than %d bytes." % self.max_size)
        self._digest.update(chunk)
        self.chunk_count += 1
        self.ciphertext_length += n

    def signed_bytes(self):
        if self.chunk_count == 0:
            raise TruncatedMessage("The message has no chunks.")
        return signed_bytes(self.header.raw, self.chunk_count, self.ciphertext_length, self._digest.digest())

    def digest(self):
        """The SHA-256 of the signed bytes: what the signature signs."""
        return hashlib.sha256(self.signed_bytes()).digest()

    def verify(self, signature, sender_key):
        """
        Check C{signature} with C{sender_key}, the key of the device the header names as the one that signed; raises
        L{WrongSenderKey} or L{BadSignature}.
        """
        if not hmac.compare_digest(device_id(sender_key), self.header.sender_device):
            raise WrongSenderKey()
        try:
            # The same check as verify(signed bytes, SHA256()), with the digest taken by hashlib: 15% cheaper.
            sender_key.verify(signature, self.digest(), _PSS, _PREHASHED_SHA256)
        except InvalidSignature:
            raise BadSignature()


# The records a server writes to its signature checker (L{SignatureChecker}, L{signature_checker_main}), each a tag,
# a key slot and a length, then: for a key, its DER (SubjectPublicKeyInfo) that many bytes long, kept in that slot;
# for a check, the signing device's id as the header names it, the digest signed (L{EnvelopeVerifier.digest}) and
# the signature, that many bytes long, checked against the slot's key.  The checker answers each check, in order,
# with one byte of _CHECK_ANSWERS.
_KEY_RECORD = struct.Struct(">cHH")
_CHECK_ANSWERS = {b"1"[0]: None, b"0"[0]: BadSignature, b"2"[0]: WrongSenderKey}


def signature_checker_main(read=functools.partial(os.read, 0, 1 << 16), write=functools.partial(os.write, 1)):
    """
    The loop of a server's signature checker process: reads records (above) until its input ends, answering the
    checks of all it read at once with one write.  It holds no secret: only public keys, digests and signatures.
    """
    keys = {}  # slot -> (public key, its device id), or None for a key that did not load
    pending = b""
    while True:
        data = read()
        if not data:
            return
        pending += data
        answers = bytearray()
        at = 0
        while len(pending) - at >= _KEY_RECORD.size:
            tag, slot, length = _KEY_RECORD.unpack_from(pending, at)
            end = at + _KEY_RECORD.size + length + (DEVICE_ID_SIZE + 32 if tag == b"V" else 0)
            if end > len(pending):
                break
            body = pending[at + _KEY_RECORD.size:end]
            at = end
            if tag == b"K":
                try:
                    key = serialization.load_der_public_key(body)
                    keys[slot] = (key, device_id(key))
                except Exception:  # a session's key, loaded and checked at login: only a damaged record
                    keys[slot] = None
                continue
            answers += _check_signature(keys.get(slot), body[:DEVICE_ID_SIZE], body[DEVICE_ID_SIZE:DEVICE_ID_SIZE + 32],
                                        body[DEVICE_ID_SIZE + 32:])
        pending = pending[at:]
        view = memoryview(answers)
        while view:
            view = view[write(view):]


def _check_signature(entry, device, digest, signature):
    """One check of L{signature_checker_main}: its answer byte."""
    if entry is None or not hmac.compare_digest(entry[1], device):
        return b"2"
    try:
        entry[0].verify(signature, digest, _PSS, _PREHASHED_SHA256)
    except (InvalidSignature, ValueError, TypeError):
        return b"0"
    return b"1"


@dataclasses.dataclass(frozen=True)
class OpenedMessage:
    """A verified, decrypted message."""

    message_id: bytes
    sender: str
    sender_fingerprint: bytes  # the sender's identity key
    recipients: tuple  # the addressed users, sorted (EnvelopeHeader.addressed_names): the sender only in a note to self
    timestamp: float  # seconds since the epoch, as the sender's clock said
    content_type: str
    filename: str
    plaintext: bytearray  # bytes-like; a bytearray, so a large message is never copied once more at the end
    accepted_at: float = None  # when the server accepted it, as the server says (not signed)
    key_status: str = "pinned"  # see key_status(): new (first key seen: now pinned), pinned, verified, changed
    skewed: bool = False  # the signed time is far from when the server accepted it
    sender_device: bytes = b""  # the id of the device that signed
    used_prekeys: tuple = (0, 0)  # (signed prekey id, one-time prekey id) this device's key was wrapped with; 0: none
    group_id: bytes = None  # a group message's group, from its signed header; None for a 1:1 message
    group_head: bytes = None  # the membership version (head) the group message was sealed for
    group_name: str = None  # that group's name (without the #), as this client's verified chain has it
    group_note: str = None  # set when the message names another membership version than this client's current one


class Opener:
    """
    Open one message incrementally: construct with the header (this unwraps the key), L{update} with each chunk
    ciphertext in order, L{finish} with the signature and the sender device's public key.  Plaintext is released only
    by L{finish}, after the signature has verified.  Private-key and AES work: use it off the reactor thread.
    """

    def __init__(self, header_raw, private_key, recipient, max_size=None, device=None, prekeys=None):
        """
        @param private_key: this device's RSA key (for an RSA entry; may be C{None} with C{device} given).
        @param device: this device's id (default: C{private_key}'s).
        @param prekeys: this device's prekeys, for an X25519 entry: C{signed_private(id)} and
            C{one_time_private(id)} give an C{X25519PrivateKey} or C{None} (gone), C{signed_valid(id)} gives
            C{(valid_from, valid_until)} or C{None}.
        """
        self._verifier = EnvelopeVerifier(header_raw, max_size)
        header = self.header = self._verifier.header
        own = None  # private_key's device id, computed at most once (a private key's is never remembered)
        if device is None:
            own = device = device_id(private_key)
        mine = header.entry(recipient, device)
        if mine is not None and mine.kind == WRAP_RSA and own is None and private_key is not None:
            own = device_id(private_key)
        if mine is None or (mine.kind == WRAP_RSA and (own is None or not hmac.compare_digest(own, device))):
            raise NotAddressedToYou("The message is not addressed to %s with this key." % recipient)
        if mine.kind == WRAP_RSA:
            try:
                content_key = private_key.decrypt(mine.wrapped, _OAEP)
            except ValueError:
                raise KeyUnwrapFailed()
        else:
            content_key = self._x25519_unwrap(header, recipient, mine, prekeys)
        self.used_prekeys = (mine.spk_id, mine.opk_id)
        if len(content_key) != 32 or not hmac.compare_digest(
                _commitment(header.message_id, content_key), header.commitment):
            raise KeyCommitmentMismatch()
        self._aead = AESGCM(content_key)
        self._ad = hashlib.sha256(header.raw).digest()
        self._held = None
        self._counter = 0
        self._plaintext = bytearray()  # grown chunk by chunk while each is still in cache

    @staticmethod
    def _x25519_unwrap(header, recipient, mine, prekeys):
        validity = prekeys.signed_valid(mine.spk_id) if prekeys is not None else None
        spk = prekeys.signed_private(mine.spk_id) if validity is not None else None
        if spk is None:
            raise PrekeyUnavailable(
                "The prekey this message was sealed for is gone from this device: signed prekey %d." % mine.spk_id)
        valid_from, valid_until = validity
        if not valid_from - PREKEY_SKEW <= header.timestamp_ms / 1000 <= valid_until:
            raise PrekeyUnusable("The message was sealed to signed prekey %d at a time it was not valid." % mine.spk_id)
        opk = None
        if mine.opk_id:
            opk = prekeys.one_time_private(mine.opk_id)
            if opk is None:
                raise PrekeyUnavailable("The prekey this message was sealed for is gone from this device: one-time "
                                        "prekey %d (used by another message, or this one is a replay)." % mine.opk_id)
        ek = x25519.X25519PublicKey.from_public_bytes(mine.ephemeral)
        try:
            ikm = spk.exchange(ek) + (opk.exchange(ek) if opk is not None else b"")
        except ValueError:  # an all-zero agreement: the ephemeral key is a low-order point
            raise KeyUnwrapFailed("The message's ephemeral key is not a usable X25519 key.")
        info = _wrap_info(header.message_id, header.sender, header.sender_device, recipient, mine.device_id,
                          mine.spk_id, mine.opk_id, mine.ephemeral)
        try:
            return AESGCM(_wrap_key(ikm, info)).decrypt(_WRAP_NONCE, mine.wrapped, None)
        except InvalidTag:
            raise KeyUnwrapFailed("The message key does not unwrap with this device's prekeys.")

    def _open(self, chunk, last):
        try:
            return self._aead.decrypt(_nonce(self._counter, last), chunk, self._ad)
        except InvalidTag:
            return None

    def update(self, chunk):
        """Take the next chunk ciphertext.  Raises an L{EnvelopeError} as soon as the stream is known to be bad."""
        chunk = bytes(chunk)
        self._verifier.update(chunk)
        if self._held is not None:
            plain = self._open(self._held, False)
            if plain is None:
                if self._open(self._held, True) is not None:
                    raise ChunkAuthenticationFailed("The message has data after its final chunk.")
                raise ChunkAuthenticationFailed(
                    "Chunk %d does not authenticate: it was altered, reordered or duplicated." % self._counter)
            self._plaintext += plain
            self._counter += 1
        self._held = chunk

    def finish(self, signature, sender_key):
        """
        Check the last chunk and the signature with C{sender_key}, the sending device's key; return the
        L{OpenedMessage}.
        """
        if self._held is None:
            raise TruncatedMessage("The message has no chunks.")
        plain = self._open(self._held, True)
        if plain is None:
            if self._open(self._held, False) is not None:
                raise TruncatedMessage("The message is truncated: its final chunk is missing.")
            raise ChunkAuthenticationFailed(
                "Chunk %d does not authenticate: it was altered, reordered or duplicated." % self._counter)
        self._verifier.verify(signature, sender_key)
        self._plaintext += plain
        header = self.header
        plaintext, self._plaintext = self._plaintext, bytearray()
        return OpenedMessage(
            header.message_id, header.sender, header.sender_fingerprint, tuple(header.addressed_names),
            header.timestamp_ms / 1000.0, header.content_type, header.filename, plaintext,
            sender_device=header.sender_device, used_prekeys=self.used_prekeys, group_id=header.group_id,
            group_head=header.group_head,
        )


def open_envelope(envelope, private_key, recipient, sender_key, max_size=None, device=None, prekeys=None):
    """Open a whole L{Envelope} at once; return an L{OpenedMessage} or raise an L{EnvelopeError}.  See L{Opener}."""
    opener = Opener(envelope.header, private_key, recipient, max_size, device, prekeys)
    for chunk in envelope.chunks:
        opener.update(chunk)
    return opener.finish(envelope.signature, sender_key)


# -- group operations --
# A group's membership is a chain of operations, each signed by its actor's identity key and naming the hash of the
# one before it (PROTOCOL.md, "Group operations").  Everything here is pure: bytes in, states out.

_ZERO_HEAD = bytes(32)
_GROUP_OP_TAG_FIELD = _lp(GROUP_OP_TAG)
_OP_SEQ = struct.Struct(">I")


class _OpReader:
    """Reads a group operation's fields (written by L{_lp} and C{struct}), raising L{GroupOpError} on any fault."""

    def __init__(self, data):
        self.data = bytes(data)
        self.offset = 0
        self.size = len(self.data)

    def fixed(self, unpacker):
        start = self.offset
        self.offset += unpacker.size
        if self.offset > self.size:
            raise GroupOpError("The group operation is truncated.")
        return unpacker.unpack_from(self.data, start)

    def field(self, max_length, too_long="A field of the group operation is too long."):
        (n,) = self.fixed(_U32)
        if n > max_length:
            raise GroupOpError(too_long)
        start = self.offset
        self.offset += n
        if self.offset > self.size:
            raise GroupOpError("The group operation is truncated.")
        return self.data[start:self.offset]

    def exact(self, size, what):
        data = self.field(64)
        if len(data) != size:
            raise GroupOpError("The group operation's %s is not %d bytes." % (what, size))
        return data

    def name(self, what):
        name = self.field(32)
        if _USERNAME_BYTES_FULLMATCH(name) is None:
            raise GroupOpError("The group operation's %s is not a valid name." % what)
        return name.decode("ascii")

    def topic(self):
        topic = self.field(MAX_GROUP_TOPIC_BYTES,
                           "A group's topic is at most %d bytes of UTF-8." % MAX_GROUP_TOPIC_BYTES)
        try:
            return topic.decode("utf-8")
        except UnicodeDecodeError:
            raise GroupOpError("The group's topic is not valid UTF-8.")

    def count(self, smallest, entry_size):
        (n,) = self.fixed(_U32)
        if n < smallest:
            raise GroupOpError("The group operation lists no user.")
        if n * entry_size > self.size - self.offset:
            raise GroupOpError("The group operation is truncated.")
        return n

    def users(self, with_fp, smallest=1):
        """At least C{smallest} users (with their fingerprints when C{with_fp}), sorted and without a name twice."""
        n = self.count(smallest, 5 + (4 if with_fp else 0))  # the shortest entry: one-letter name, empty fp
        out, previous = [], None
        for _ in range(n):
            user = self.name("user")
            if previous is not None and user <= previous:  # ASCII: str order is byte order
                raise GroupOpError("The group operation's users are not sorted without a name twice.")
            previous = user
            out.append((user, self.exact(32, "key fingerprint")) if with_fp else user)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class GroupOp:
    """
    One parsed group operation; C{raw} is the exact bytes parsed (and signed).  Only the fields of its C{kind} are
    set: C{name} (create, rename), C{topic} (create, topic), C{members} (create, add: C{(user, fingerprint)} pairs,
    sorted), C{users} (remove: names, sorted), C{user} (promote, demote).
    """

    raw: bytes
    group_id: bytes
    seq: int
    prev: bytes
    kind: str
    actor: str
    actor_fp: bytes
    timestamp_ms: int
    name: str = None
    topic: str = None
    members: tuple = ()
    users: tuple = ()
    user: str = None

    @functools.cached_property
    def hash(self):
        """SHA-256 of the operation's bytes: the next operation's C{prev}, and the head while it is the last."""
        return hashlib.sha256(self.raw).digest()


def parse_group_op(raw):
    """
    Parse and check a group operation: the tag, every field with its exact length, names valid, lists sorted without
    a name twice, nothing after the body, at most L{MAX_GROUP_OP_BYTES}.  Whether the group's rules allow it is
    L{GroupState.apply}'s business.  Raises L{GroupOpError}.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise GroupOpError("The group operation is not bytes.")
    if len(raw) > MAX_GROUP_OP_BYTES:
        raise GroupOpError("A group operation is at most %d bytes." % MAX_GROUP_OP_BYTES)
    r = _OpReader(raw)
    if r.field(64) != GROUP_OP_TAG:
        raise GroupOpError("This is not a pager group operation.")
    group_id = r.exact(GROUP_ID_SIZE, "group id")
    (seq,) = r.fixed(_OP_SEQ)
    if seq < 1:
        raise GroupOpError("A group operation's sequence number starts at 1.")
    prev = r.exact(32, "previous hash")
    kind = r.field(16)
    if kind not in _GROUP_OP_KIND_BYTES:
        raise GroupOpError("The group operation is of an unknown kind.")
    kind = kind.decode("ascii")
    actor = r.name("actor")
    actor_fp = r.exact(32, "actor's key fingerprint")
    (timestamp_ms,) = r.fixed(_U64)
    fields = {}
    if kind == "create":
        fields = dict(name=r.name("group name"), topic=r.topic(), members=r.users(True, 0))
    elif kind == "add":
        fields = dict(members=r.users(True))
    elif kind == "remove":
        fields = dict(users=r.users(False))
    elif kind == "rename":
        fields = dict(name=r.name("group name"))
    elif kind == "topic":
        fields = dict(topic=r.topic())
    elif kind in ("promote", "demote"):
        fields = dict(user=r.name("user"))
    if r.offset != r.size:
        raise GroupOpError("The group operation has trailing bytes.")
    return GroupOp(bytes(raw), group_id, seq, prev, kind, actor, actor_fp, timestamp_ms, **fields)


_GROUP_OP_KIND_BYTES = frozenset(kind.encode("ascii") for kind in GROUP_OP_KINDS)


def _group_user_field(user):
    if not valid_username(user):
        raise GroupOpError("%r is not a valid user name." % (user,))
    return _lp(user.encode("ascii"))


def encode_group_op(group_id, seq, prev, kind, actor, actor_fp, timestamp_ms, *, name=None, topic=None, members=(),
                    users=(), user=None):
    """
    The bytes of a group operation (PROTOCOL.md, "Group operations"), checked by parsing them back.  C{members} are
    C{(user, fingerprint)} pairs (or a mapping), C{users} names; both are sorted here.  Give only the fields of
    C{kind}.  Raises L{GroupOpError}.
    """
    if kind not in GROUP_OP_KINDS:
        raise GroupOpError("%r is not a kind of group operation." % (kind,))
    if hasattr(members, "items"):
        members = members.items()
    try:
        members, users = sorted(members), sorted(users)
    except (TypeError, ValueError):
        raise GroupOpError("The members are (name, fingerprint) pairs, the users names.")
    wanted = {"create": {"name", "topic", "members"}, "add": {"members"}, "remove": {"users"}, "leave": set(),
              "rename": {"name"}, "topic": {"topic"}, "promote": {"user"}, "demote": {"user"}}[kind]
    given = {field for field, value in (("name", name), ("topic", topic), ("user", user)) if value is not None}
    given |= {field for field, value in (("members", members), ("users", users)) if value}
    if kind == "create":  # the topic may be left out, and the list empty
        topic = "" if topic is None else topic
        given |= {"topic", "members"}
    if given - wanted:
        raise GroupOpError("The %s operation takes no %s." % (kind, ", ".join(sorted(given - wanted))))
    if wanted - given:
        raise GroupOpError("The %s operation needs %s." % (kind, ", ".join(sorted(wanted - given))))
    if not (isinstance(seq, int) and 0 <= seq < 2 ** 32 and _seconds(timestamp_ms)):
        raise GroupOpError("The sequence number or the time is out of range.")
    if not isinstance(actor, str) or not all(isinstance(b, bytes) for b in (group_id, prev, actor_fp)):
        raise GroupOpError("The group id, the previous hash and the fingerprint are bytes, the actor a str.")
    parts = [_GROUP_OP_TAG_FIELD, _lp(group_id), _OP_SEQ.pack(seq), _lp(prev), _lp(kind.encode("ascii")),
             _group_user_field(actor), _lp(actor_fp), _U64.pack(timestamp_ms)]
    if name is not None:
        if not valid_username(name):
            raise GroupOpError("%r is not a valid group name (canonical_group_name gives it)." % (name,))
        parts.append(_lp(name.encode("ascii")))
    if topic is not None:
        try:
            parts.append(_lp(topic.encode("utf-8")))
        except (AttributeError, UnicodeEncodeError):
            raise GroupOpError("The topic is not text that UTF-8 can encode.")
    if kind in ("create", "add"):
        parts.append(_U32.pack(len(members)))
        for member, fp in members:
            if not isinstance(fp, bytes):
                raise GroupOpError("%s's key fingerprint is not bytes." % (member,))
            parts += [_group_user_field(member), _lp(fp)]
    elif kind == "remove":
        parts.append(_U32.pack(len(users)))
        parts += [_group_user_field(u) for u in users]
    elif user is not None:
        parts.append(_group_user_field(user))
    raw = b"".join(parts)
    parse_group_op(raw)
    return raw


def sign_group_op(private_key, raw):
    """The actor's RSA-PSS-SHA256 signature (salt 32) over the operation's bytes, exactly.  Off the reactor thread."""
    return private_key.sign(bytes(raw), _PSS, hashes.SHA256())


def verify_group_op(public_key, op, signature):
    """
    Check C{signature} over C{op} (a L{GroupOp} or its bytes) with C{public_key}, which must be the key the operation
    names (its fingerprint is C{op.actor_fp}); raises L{BadSignature}.
    """
    if not isinstance(op, GroupOp):
        op = parse_group_op(op)
    if not hmac.compare_digest(fingerprint(public_key), op.actor_fp):
        raise BadSignature("The group operation names another key than the one given for %s." % op.actor)
    if not isinstance(signature, bytes):
        raise BadSignature("The group operation's signature is not bytes.")
    try:
        public_key.verify(signature, op.raw, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise BadSignature("The group operation's signature does not verify.")


def canonical_group_name(text):
    """
    The canonical name of a group as typed, C{ops} or C{#ops} (one leading C{#} is dropped; the rules are those of
    user names).  Raises L{BadRequest}.
    """
    if isinstance(text, str) and text.startswith("#"):
        text = text[1:]
    try:
        return canonical_username(text)
    except BadRequest:
        raise BadRequest("Group names are written #name: 1-32 characters of a-z, 0-9, '_', '.', '-' after the '#', "
                         "starting with a letter or digit.")


_NO_MEMBERS = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class GroupState:
    """
    A group's membership after the operations of its chain up to C{seq}: C{head} is the last one's hash (32 zero
    bytes before the first), C{members} maps each member to the fingerprint of their identity key as the operation
    that added them gave it, C{admins} is the members who may change the group, C{joined} maps each member to the
    C{seq} of the operation that (last) added them.  Immutable: L{apply} returns the next state.
    """

    group_id: bytes
    seq: int = 0
    head: bytes = _ZERO_HEAD
    name: str = None
    topic: str = ""
    members: types.MappingProxyType = dataclasses.field(default_factory=lambda: _NO_MEMBERS)
    admins: frozenset = frozenset()
    joined: types.MappingProxyType = dataclasses.field(default_factory=lambda: _NO_MEMBERS)

    @classmethod
    def empty(cls, group_id):
        """The state before a group's first operation."""
        return cls(group_id)

    def is_member(self, user):
        return user in self.members

    def is_admin(self, user):
        return user in self.admins

    @property
    def ended(self):
        """Whether the group was created and has no members left (its last member left): no operation follows."""
        return self.seq > 0 and not self.members

    @property
    def label(self):
        """The group as people see it: C{#name}."""
        return "#%s" % self.name

    def apply(self, op, max_members=DEFAULT_MAX_GROUP_MEMBERS):
        """
        The state after C{op} (a L{GroupOp}), if it extends this state's chain and the group's rules allow it; else
        L{GroupRefused} (L{GroupFull} for the member limit) with the sentence that says why.  The rules are
        PROTOCOL.md's ("Group operations"); C{max_members} is the server's limit (its creator included).
        """
        if not isinstance(op, GroupOp):
            raise GroupOpError("Only a parsed group operation can be applied.")
        if op.group_id != self.group_id:
            raise GroupRefused("The operation is for another group.")
        label = self.label if self.seq else "#%s" % op.name if op.kind == "create" else "the group"
        if op.seq != self.seq + 1:
            raise GroupRefused("The operation does not extend the chain of %s: it follows version %d, and %s is at "
                               "version %d." % (label, op.seq - 1, label, self.seq))
        if not hmac.compare_digest(op.prev, self.head):
            raise GroupRefused("The operation does not extend the chain of %s: its previous hash is not that of "
                               "version %d." % (label, self.seq))
        if op.kind == "create":
            if self.seq:
                raise GroupRefused("%s exists already: only a group's first operation creates it." % label)
            listed = dict(op.members)
            if op.actor in listed:
                raise GroupRefused("The creator of %s is a member of it already: list the others only." % label)
            if 1 + len(listed) > max_members:
                raise GroupFull("%s would have %d members; a group has at most %d." % (label, 1 + len(listed),
                                                                                       max_members))
            listed[op.actor] = op.actor_fp
            return self._next(op, name=op.name, topic=op.topic, members=listed, admins=frozenset((op.actor,)),
                              joined=dict.fromkeys(listed, op.seq))
        if not self.seq:
            raise GroupRefused("A group's first operation must create it.")
        if not self.members:
            raise GroupRefused("%s has no members left." % label)
        if op.actor not in self.members:
            raise GroupRefused("%s is not a member of %s." % (op.actor, label))
        if op.kind == "leave":
            return self._leave(op, label)
        if op.actor not in self.admins:
            raise GroupRefused("Only an admin of %s can %s; %s is not one." % (
                label, _GROUP_OP_WORDS[op.kind], op.actor))
        return getattr(self, "_apply_" + op.kind)(op, label, max_members)

    def _next(self, op, **changes):
        for field in ("members", "joined"):
            if field in changes:
                changes[field] = types.MappingProxyType(dict(sorted(changes[field].items())))
        return dataclasses.replace(self, seq=op.seq, head=op.hash, **changes)

    def _leave(self, op, label):
        others = set(self.members) - {op.actor}
        if others and self.admins == {op.actor}:
            raise GroupRefused("You are the last admin of %s: make another member an admin first, then leave."
                               % label)
        return self._without(op, (op.actor,))

    def _without(self, op, users):
        members, joined = dict(self.members), dict(self.joined)
        for user in users:
            del members[user]
            joined.pop(user, None)
        return self._next(op, members=members, joined=joined, admins=self.admins - set(users))

    def _apply_add(self, op, label, max_members):
        for user, _ in op.members:
            if user in self.members:
                raise GroupRefused("%s is a member of %s already." % (user, label))
        size = len(self.members) + len(op.members)
        if size > max_members:
            raise GroupFull("%s would have %d members; a group has at most %d." % (label, size, max_members))
        members, joined = dict(self.members), dict(self.joined)
        for user, fp in op.members:
            members[user] = fp
            joined[user] = op.seq
        return self._next(op, members=members, joined=joined)

    def _apply_remove(self, op, label, max_members):
        for user in op.users:
            if user == op.actor:
                raise GroupRefused("An admin does not remove themselves from %s: leave it instead (/group leave %s)."
                                   % (label, label))
            if user not in self.members:
                raise GroupRefused("%s is not a member of %s." % (user, label))
        return self._without(op, op.users)

    def _apply_rename(self, op, label, max_members):
        if op.name == self.name:
            raise GroupRefused("%s is called that already." % label)
        return self._next(op, name=op.name)

    def _apply_topic(self, op, label, max_members):
        return self._next(op, topic=op.topic)

    def _apply_promote(self, op, label, max_members):
        if op.user not in self.members:
            raise GroupRefused("%s is not a member of %s." % (op.user, label))
        if op.user in self.admins:
            raise GroupRefused("%s is an admin of %s already." % (op.user, label))
        return self._next(op, admins=self.admins | {op.user})

    def _apply_demote(self, op, label, max_members):
        if op.user not in self.admins:
            raise GroupRefused("%s is not an admin of %s." % (op.user, label))
        if self.admins == {op.user}:
            raise GroupRefused("%s is the last admin of %s: make another member an admin first." % (op.user, label))
        return self._next(op, admins=self.admins - {op.user})


_GROUP_OP_WORDS = {"add": "add members", "remove": "remove members", "rename": "rename it",
                   "topic": "change its topic", "promote": "make a member an admin", "demote": "take a member's admin "
                   "role away"}


def fold_group_ops(group_id, ops, max_members=DEFAULT_MAX_GROUP_MEMBERS):
    """
    Apply a chain's operations (L{GroupOp}s or their bytes) in order from the empty state: the list of states, the
    one at index i after the operation of seq i + 1.  Raises at the first operation that does not apply.
    """
    state, states = GroupState.empty(group_id), []
    for op in ops:
        state = state.apply(op if isinstance(op, GroupOp) else parse_group_op(op), max_members)
        states.append(state)
    return states


#### Accounts ####

def valid_username(name):
    """
    Whether C{name} is a canonical user name: 1-32 ASCII characters of C{[a-z0-9_.-]}, starting with a letter or a digit.
    """
    return isinstance(name, str) and name.isascii() and USERNAME_RE.fullmatch(name) is not None


_CANONICAL_USERNAME = USERNAME_RE.fullmatch  # a name already canonical (ASCII, lower case) needs nothing else


def canonical_username(name):
    """
    The canonical form of a user name as typed: ASCII is checked first, then lowercased (non-ASCII is never folded,
    so the Kelvin sign cannot become a C{k}).  Raises L{BadRequest} for anything that is not a valid name.
    """
    if not isinstance(name, str) or not name.isascii():
        raise BadRequest("User names are 1-32 ASCII characters: a-z, 0-9, '_', '.', '-'.")
    name = name.lower()
    if USERNAME_RE.fullmatch(name) is None:
        raise BadRequest("User names are 1-32 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit.")
    return name


def auth_message(purpose, server_id, user, challenge, key_fingerprint):
    """
    The bytes a client signs to prove it holds a private key: the auth tag, the purpose, the id of the server the
    proof is for (from its C{hello}), the user name, the server's 32-byte challenge and the fingerprint of the key
    concerned (the registered key for login, the new key for register, rekey and recover).  Naming the server keeps
    a proof made for one server from logging in at another.
    """
    if purpose not in AUTH_PURPOSES:
        raise ValueError("unknown purpose %r" % (purpose,))
    if not isinstance(server_id, str) or not SERVER_ID_RE.fullmatch(server_id):
        raise BadRequest("The server id is not %d hex digits; refusing to sign for it." % SERVER_ID_LENGTH)
    if not isinstance(challenge, bytes) or len(challenge) != CHALLENGE_SIZE:
        raise BadRequest("The server's challenge is not exactly %d bytes." % CHALLENGE_SIZE)
    return (
        _lp(AUTH_TAG) + _lp(purpose.encode("ascii")) + _lp(server_id.encode("ascii")) + _lp(user.encode("ascii"))
        + _lp(challenge) + _lp(key_fingerprint)
    )


def sign_auth(private_key, purpose, server_id, user, challenge, key_fingerprint=None):
    """Sign L{auth_message} with RSA-PSS.  A private-key operation: call it off the reactor thread."""
    if key_fingerprint is None:
        key_fingerprint = fingerprint(private_key)
    return private_key.sign(auth_message(purpose, server_id, user, challenge, key_fingerprint), _PSS,
                            hashes.SHA256())


def verify_auth(public_key, signature, purpose, server_id, user, challenge, key_fingerprint=None):
    """Whether C{signature} is C{public_key}'s proof for these fields."""
    if key_fingerprint is None:
        key_fingerprint = fingerprint(public_key)
    try:
        public_key.verify(signature, auth_message(purpose, server_id, user, challenge, key_fingerprint), _PSS,
                          hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def hash_token(token, salt):
    """Argon2id of a safetoken with OWASP parameters.  Costs about 25 ms and 19 MiB: call it off the reactor thread."""
    kdf = Argon2id(
        salt=salt, length=ARGON2_HASH_SIZE, iterations=ARGON2_ITERATIONS, lanes=ARGON2_LANES,
        memory_cost=ARGON2_MEMORY_KIB,
    )
    return kdf.derive(token.encode("utf-8"))


def check_token(token, salt, expected):
    """Whether C{token} hashes to C{expected}, compared in constant time."""
    return hmac.compare_digest(hash_token(token, salt), expected)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32: no I, L, O, U
_CROCKFORD_TYPOS = str.maketrans({"O": "0", "I": "1", "L": "1"})
_LINK_CODE_LENGTH = LINK_SECRET_SIZE * 8 // 5  # 16 characters of 5 bits


def new_link_code():
    """
    A fresh one-time link code: C{(text, secret)}, the text being the L{LINK_SECRET_SIZE}-byte secret in 16
    characters of Crockford's base32, four groups of four joined by dashes, for a person to read and type.
    """
    secret = secrets.token_bytes(LINK_SECRET_SIZE)
    n = int.from_bytes(secret, "big")
    chars = "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(_LINK_CODE_LENGTH)))
    return "-".join(chars[i:i + 4] for i in range(0, _LINK_CODE_LENGTH, 4)), secret


def parse_link_code(text):
    """
    The secret of a link code as typed: case does not matter, spaces and dashes are ignored, O reads as 0 and I or L
    as 1.  Raises L{BadLinkCode}.  A mistyped character that is still a code character gives another secret, which
    the other device's MAC check then refuses.
    """
    if not isinstance(text, str):
        raise BadLinkCode()
    chars = "".join(text.split()).replace("-", "").upper().translate(_CROCKFORD_TYPOS)
    if len(chars) != _LINK_CODE_LENGTH or not all(c in _CROCKFORD for c in chars):
        raise BadLinkCode()
    n = 0
    for c in chars:
        n = n << 5 | _CROCKFORD.index(c)
    return n.to_bytes(LINK_SECRET_SIZE, "big")


def link_request_mac(secret, server_id, user, device_public_der, name):
    """
    The new device's MAC over its link request (the user, its key's DER SubjectPublicKeyInfo and its name, on that
    server), keyed with the link code's secret: the identity device accepts only the key whose code it was told.
    """
    return hmac.new(secret, _lp(LINK_REQUEST_TAG) + _lp(server_id.encode("ascii")) + _lp(user.encode("ascii"))
                    + _lp(device_public_der) + _lp(name.encode("utf-8")), hashlib.sha256).digest()


def link_answer_mac(secret, server_id, identity_fp, certificate):
    """
    The identity device's MAC over the fingerprint of the identity key that certifies (C{identity_fp}, 32 bytes)
    and the certificate it made for the new device, keyed with the same secret: the new device accepts only a
    certificate from whoever was told the code, under the identity key that person's device holds.
    """
    return hmac.new(secret, _lp(LINK_ANSWER_TAG) + _lp(server_id.encode("ascii")) + _lp(identity_fp)
                    + _lp(certificate.signed_bytes()) + _lp(certificate.signature), hashlib.sha256).digest()


#### Frames ####

# One JSON object per line, UTF-8, "\n" at the end.  PROTOCOL.md is the contract; in short (-> client to server):
#
#   <- hello {protocol, server, server_id, challenge, limits}
#   -> register {id, user, public_key, token, proof, [invite], device {name, created, certificate}}
#                                                               <- ok {user, device, challenge} | error {code, message}
#   -> login {id, user, [token], proof, receive, [device]}      <- ok {user, pending, device, certified, prekeys,
#                                                                      challenge}
#   -> rekey {id, user, token, public_key, proof_old, proof_new} <- ok {user, fingerprint, challenge}
#   -> recover {id, user, token, public_key, proof}              <- ok {user, fingerprint, challenge}
#   -> users {id, [after], [limit], [online]}                   <- ok {registered, online, count, online_count, next}
#   -> key {id, user}                                           <- ok {user, public_key, fingerprint, key_set_at}
#   -> send {id, to, size, header, chunks, [signature]}         (then) -> chunk {id, chunks, [signature]}
#                                                               <- ok {msg, accepted_at, duplicate, queued}
#   <- message {msg, from, size, accepted_at, header, chunks, [signature]}  (then) <- message_chunk {msg, ...}
#   -> ack {id, msg} / reject {id, msg, reason}                 <- ok
#   <- receipt {receipt, msg, from, status, reason, at}         -> ack {id, receipt}
#   -> ping {id}                                                <- ok
#   -> certify {id, name, created, certificate}                 <- ok {device}           (identity device only)
#   -> publish_prekeys {id, [signed], [one_time]}               <- ok {one_time}; later <- prekeys_low {one_time}
#   -> devices {id, user}                                       <- ok {user, identity_key, devices}
#   -> bundle {id, users}                                       <- ok {bundles: [{user, identity_key, devices}]}
#   -> link_request {id, user, public_key, name, mac}           <- ok {link}; later <- linked {link, device,
#                                                                  answer_mac} | link_expired {link}  (no login)
#   -> link_pending {id} / link_approve {id, link, name, created, certificate, answer_mac} / link_decline {id, link}
#   -> revoke_device {id, device, at, signature}                <- ok {device}           (identity device only)
#   -> group_op {id, group, op, signature}                      <- ok {group, seq, head}  (identity device only);
#                                                                  then <- group_changed {group, seq, head} to members
#   -> group_ops {id, group, after}                             <- ok {group, ops, seq, head, [members], more}
#   -> groups {id}                                              <- ok {groups: [{group, name, seq, head, member}]}
#   -> send {id, group, size, header, chunks, [signature]}      a group message: "group" instead of "to"
#
# register, login, rekey and recover go one at a time per connection; each well-formed one takes the challenge and
# its answer carries the next; each proof signs the server_id of the hello (auth_message).


class _RepeatedMember(ValueError):
    """An object names one member twice: JSON parsers disagree on which value wins, so pager takes neither."""


_FRAME_TYPE_RE = re.compile(r"[a-z][a-z_]{0,31}")


_FRAME_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once: json.dumps makes one a call


def encode_frame(frame):
    """A frame as one line of compact ASCII JSON, without the delimiter."""
    return _FRAME_ENCODER.encode(frame).encode("ascii")


_SEND_OK = b'{"type":"ok","id":%s,"msg":"%s","accepted_at":%s,"duplicate":%s,"queued":%s}\n'


def _send_ok_line(rid, fields):
    """
    The answer to a send, C{fields} those of L{PagerServerProtocol._accepted}: the line encode_frame would make
    (with its delimiter), built by hand: it is written once for every message, and the encoder took 3.3 µs to
    make it, against 0.7 µs.
    """
    queued = fields["queued"]
    return _SEND_OK % (b"%d" % rid if rid.__class__ is int else encode_frame(rid), fields["msg"].encode(),
                       _json_number(fields["accepted_at"]), b"true" if fields["duplicate"] else b"false",
                       encode_frame(queued) if queued else b"[]")


def _no_constants(name):
    raise ValueError("%s is not JSON" % name)


def _object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for name, _ in pairs:
            if name in seen:
                raise _RepeatedMember(name)
            seen.add(name)
    return obj


# One decoder: building one per frame costs 7%.  The pairs hook adds about 0.3 us to a 2.7 kB send frame (~4.5 us).
_DECODER = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_object)


def decode_frame(line):
    """
    Parse one line into a frame: valid UTF-8, valid JSON (no NaN or Infinity, no object naming a member twice), an
    object with a string C{type}.  Raises L{BadRequest} saying which of these failed.
    """
    try:
        text = bytes(line).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The frame is not valid UTF-8.")
    try:
        frame = _DECODER.decode(text)
    except RecursionError:
        raise BadRequest("The frame is nested too deeply.")
    except _RepeatedMember as e:
        raise BadRequest('The frame repeats the member "%s".' % e.args[0][:64])
    except ValueError:
        raise BadRequest("The frame is not valid JSON.")
    if not isinstance(frame, dict):
        raise BadRequest("The frame is not a JSON object.")
    kind = frame.get("type")
    if not isinstance(kind, str) or _FRAME_TYPE_RE.fullmatch(kind) is None:
        raise BadRequest('The frame has no valid "type".')
    return frame


def request_id(frame):
    """The frame's C{id}: a string of at most 64 characters or an integer that JSON carries exactly, else None."""
    rid = frame.get("id")
    if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_LENGTH:
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool) and -2 ** 53 <= rid <= 2 ** 53:
        return rid
    return None


def _missing(name, what):
    return BadRequest('The field "%s" must be %s.' % (name, what))


def field_str(frame, name, max_length, required=True, default=None):
    value = frame.get(name)
    if value is None and not required:
        return default
    if not isinstance(value, str) or len(value) > max_length:
        raise _missing(name, "a string of at most %d characters" % max_length)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _missing(name, "valid Unicode text (no lone surrogates)")
    return value


def field_int(frame, name, low, high, required=True, default=None):
    value = frame.get(name)
    if value is None and not required:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _missing(name, "an integer from %d to %d" % (low, high))
    return value


def field_bool(frame, name, default):
    value = frame.get(name, default)
    if not isinstance(value, bool):
        raise _missing(name, "true or false")
    return value


def field_b64(frame, name, max_bytes, required=True):
    value = frame.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > (max_bytes + 2) // 3 * 4:
        raise _missing(name, "base64 of at most %d bytes" % max_bytes)
    data = _b64decode(value, name)
    if len(data) > max_bytes:
        raise _missing(name, "base64 of at most %d bytes" % max_bytes)
    return data


def _b64decode(value, name):
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise _missing(name, "standard base64")


def field_b64_list(frame, name, max_items, max_bytes):
    value = frame.get(name, [])
    if not isinstance(value, list) or len(value) > max_items:
        raise _missing(name, "a list of at most %d base64 strings" % max_items)
    out = []
    for item in value:
        data = _b64decode(item, name) if isinstance(item, str) and len(item) <= (max_bytes + 2) // 3 * 4 else None
        if data is None or len(data) > max_bytes:
            raise _missing(name, "a list of base64 strings of at most %d bytes each" % max_bytes)
        out.append(data)
    return out


def field_username(frame, name="user"):
    return canonical_username(field_str(frame, name, 64))


def field_usernames(frame, name):
    value = frame.get(name)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RECIPIENTS:
        raise _missing(name, "a list of 1 to %d user names" % MAX_RECIPIENTS)
    names = [v for v in value if type(v) is str and _CANONICAL_USERNAME(v)]  # as clients send them: canonical
    if len(names) != len(value):
        names = [canonical_username(v) for v in value]
    if len(set(names)) != len(names):
        raise BadRequest('The field "%s" names a user twice.' % name)
    return sorted(names)


def b64(data):
    return base64.b64encode(data).decode("ascii")


def _set_nodelay(transport):
    """Turn off Nagle's algorithm: without it, Nagle and delayed ACKs add ~40 ms to every page."""
    for candidate in (transport, getattr(transport, "transport", None)):
        if candidate is not None and hasattr(candidate, "setTcpNoDelay"):
            try:
                candidate.setTcpNoDelay(True)
            except OSError:
                pass
            return


def _lose(transport):
    """
    Close a connection politely: what was written is still sent, as far as the peer reads it.  Our flow producer is
    unregistered first: a TLS transport postpones its shutdown for as long as a producer is registered.
    """
    if transport is None:
        return
    if getattr(transport, "producer", None) is not None or getattr(transport, "_producer", None) is not None:
        try:
            transport.unregisterProducer()
        except (AttributeError, RuntimeError):
            pass
    transport.loseConnection()


class _Flow:
    """
    The transport's view of our output: registered as a streaming producer, it is paused when the peer reads slower
    than we write (a TCP transport: once it buffers over 64 KiB), and resumed once the transport has handed all of
    it to the kernel.  L{wait} gives a Deferred that fires when writing may go on; C{unread} counts the bytes
    written while paused, on top of what the transport already held.  Up to C{slack} such bytes, live items are
    still pushed while paused (L{_Feed.offer}): one batch's pushes often pass the transport's 64 KiB on their own,
    and reading them back from the store would cost far more than holding them.
    """

    def __init__(self, on_pause=None, on_resume=None, slack=0):
        self.paused = False
        self.unread = 0
        self.slack = slack
        self._waiting = []
        self._on_pause, self._on_resume = on_pause, on_resume

    def wait(self):
        if not self.paused:
            return defer.succeed(None)
        d = Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self):
        self.paused = True
        if self._on_pause is not None:
            self._on_pause()

    def resumeProducing(self):
        self.paused = False
        self.unread = 0
        if self._on_resume is not None:
            self._on_resume()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self):
        self.resumeProducing()


#### Store ####

# SQLite through adbapi: one connection, WAL, synchronous=FULL.  Functions named *_txn run inside one transaction
# on the pool's thread; the Store methods of the same name without the suffix return Deferreds.  The REFERENCES
# clauses below document the tables' relations; SQLite is not asked to enforce them (see prepare_connection).
# Quotas are counters kept with the rows they count: users.pending_* are the deliveries waiting for that user, an
# open upload's included from the moment it begins; users.sent_* are the messages that user has stored (accepted
# and not yet settled by every recipient, or still uploading).  An open upload's row has accepted_at NULL and
# names in messages.reserved the recipients it is counted against; the counter 'reserved' holds the declared
# sizes of all open uploads, which the disk budget counts before their chunks arrive.


class StoreError(PagerError):
    """The database cannot be used."""


class KeyReplaced(Forbidden):
    """This account was deleted, or its key replaced, since this session logged in."""


SCHEMA_VERSION = 6
PENDING_PAGE_BYTES = 4 * 1024 * 1024  # bytes of chunks one read of pending messages holds in memory
EXPIRE_BATCH = 1000  # deliveries one expiry transaction settles; the server repeats until fewer come back

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    token_salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    key_set_at REAL NOT NULL,
    registered_at REAL NOT NULL,
    recovered_at REAL,
    pending_count INTEGER NOT NULL DEFAULT 0,
    pending_bytes INTEGER NOT NULL DEFAULT 0,
    sent_count INTEGER NOT NULL DEFAULT 0,
    sent_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    header BLOB NOT NULL,
    signature BLOB,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    accepted_at REAL,
    expires_at REAL,
    ord INTEGER UNIQUE,
    reserved TEXT,
    gid BLOB,
    body BLOB,
    line BLOB
);
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (seq, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    recipient TEXT NOT NULL,
    ord INTEGER NOT NULL,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    told INTEGER NOT NULL DEFAULT 0,
    shared INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipient, ord, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries(seq);
CREATE INDEX IF NOT EXISTS messages_expiry ON messages(expires_at);
CREATE TABLE IF NOT EXISTS receipts (
    rid INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    peer TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_user ON receipts(user, rid);
CREATE TABLE IF NOT EXISTS devices (
    user TEXT NOT NULL,
    device_id BLOB NOT NULL,
    public_key TEXT NOT NULL,
    name TEXT,
    created INTEGER,
    certificate BLOB,
    revoked_at INTEGER,
    revocation BLOB,
    prekeys INTEGER NOT NULL DEFAULT 0,
    added_at REAL NOT NULL,
    last_seen REAL,
    PRIMARY KEY (user, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signed_prekeys (
    user TEXT NOT NULL,
    device_id BLOB NOT NULL,
    prekey_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    valid_from INTEGER NOT NULL,
    valid_until INTEGER NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (user, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    user TEXT NOT NULL,
    device_id BLOB NOT NULL,
    prekey_id INTEGER NOT NULL,
    public BLOB NOT NULL,
    PRIMARY KEY (user, device_id, prekey_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS invites (
    code_hash BLOB PRIMARY KEY,
    created_at REAL NOT NULL,
    used_by TEXT,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS groups (
    gid BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    members INTEGER NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS groups_live_name ON groups(name) WHERE members > 0;
CREATE TABLE IF NOT EXISTS group_ops (
    gid BLOB NOT NULL REFERENCES groups(gid),
    seq INTEGER NOT NULL,
    op BLOB NOT NULL,
    signature BLOB NOT NULL,
    signer TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (gid, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    gid BLOB NOT NULL REFERENCES groups(gid),
    user TEXT NOT NULL,
    since INTEGER NOT NULL,
    added_by TEXT,
    PRIMARY KEY (gid, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_user ON group_members(user);
CREATE TABLE IF NOT EXISTS former_members (
    user TEXT NOT NULL,
    gid BLOB NOT NULL REFERENCES groups(gid),
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    name TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (user, gid)
);
"""


def create_private_file(path):
    """Create C{path} (if missing) readable and writable by its owner only, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def prepare_connection(conn):
    """
    Pragmas for every connection: pages of L{PAGE_SIZE} for a new database, WAL, fsync at every commit (FULL), a
    busy timeout, and deleted rows overwritten with zeros (C{secure_delete}, which some builds of SQLite have on by
    default and others off): a delivered message's header (who wrote to whom, when) leaves no copy in the file's
    free space, nor in the free pages that auto-vacuum gives back to the file system.  Foreign keys are not
    enforced: the store deletes a message's chunks itself (L{_drop_messages_txn}), since SQLite's foreign key
    actions cost more than all the rest of deleting an acknowledged message.
    """
    conn.execute("PRAGMA page_size=%d" % PAGE_SIZE)  # a new database's; one made before keeps its own
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA secure_delete=ON")


@dataclasses.dataclass(frozen=True)
class UserRecord:
    name: str
    public_key: str
    fingerprint: bytes
    token_salt: bytes
    token_hash: bytes
    key_set_at: float
    registered_at: float
    recovered_at: float
    pending_count: int
    pending_bytes: int


@dataclasses.dataclass
class StoredMessage:
    """
    A pending delivery as read back: C{chunks} is None when the message is too large to read in one go.  C{seq}
    identifies the stored message (given when its upload began); C{ord} is its place in delivery order (given when
    it was accepted, from the messages' sequence, which never goes back).  Not changed once made, but not frozen:
    one is made for every message accepted, and a frozen dataclass takes four times as long to make (1.3 µs).
    (Nor with slots, which Python 3.9 lacks and which would save nothing here.)
    """

    seq: int
    msg_id: bytes
    sender: str
    header: bytes
    signature: bytes
    size: int
    chunk_count: int
    accepted_at: float
    chunks: list
    ord: int = 0
    # The push frame as encoded for a max_line, built once for all the devices a message fans out to.
    lines: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


# A message push that fits one line is encoded once, when the message is accepted: all of it after its "msg" and
# "seq" (the tail) is stored with a message that waits for a device that is not connected, so that a queue drains
# by reading lines and writing them out (PagerServerProtocol._stored_tail).
_MESSAGE_HEAD = b'{"type":"message","msg":"%s","seq":%d'
_MESSAGE_TAIL = b',"from":"%s","size":%d,"accepted_at":%s,"header":"%s","chunks":[%s],"signature":"%s"}\n'


def _json_number(value):
    """An int or a finite float as encode_frame writes it."""
    return (repr(value) if isinstance(value, float) else "%d" % value).encode("ascii")


def push_tail(sender, size, accepted_at, header, chunks, signature, max_line):
    """
    The push of a message with its chunks and signature, from after its "seq" to the line's end: C{_push_line}
    makes it the line encode_frame would write (with its delimiter).  None if the line would not fit in
    C{max_line}: the message then goes as a push without chunks and one chunk frame each.  Built by hand: every
    string in it is base64, hex or a user name, which JSON takes as it is, and scanning some kilobytes of them for
    characters to escape was most of the cost of a push.
    """
    encoded_header = base64.b64encode(header)
    encoded = [base64.b64encode(c) for c in chunks]
    if sum(len(c) + 3 for c in encoded) + len(encoded_header) + FRAME_MARGIN >= max_line:
        return None
    return _MESSAGE_TAIL % (sender.encode(), size, _json_number(accepted_at), encoded_header,
                            b'"%s"' % b'","'.join(encoded) if encoded else b"", base64.b64encode(signature))


def _push_line(msg_id, ord_, tail):
    """The whole push line of the message C{msg_id} at delivery position C{ord_}, from its L{push_tail}."""
    return _MESSAGE_HEAD % (msg_id.hex().encode(), ord_) + tail


def _message_from_tail(seq, msg_id, ord_, chunk_count, tail):
    """The L{StoredMessage} a stored push tail holds (a message stored as its line keeps its fields only there)."""
    frame = decode_frame(b'{"type":"message"' + tail)
    return StoredMessage(seq, msg_id, frame["from"], base64.b64decode(frame["header"]),
                         base64.b64decode(frame["signature"]), frame["size"], chunk_count, frame["accepted_at"],
                         [base64.b64decode(c) for c in frame["chunks"]], ord_)


@dataclasses.dataclass(frozen=True)
class DeviceRecord:
    """
    One device of an account as stored: a legacy device (the identity device of an account made before devices)
    has no certificate; a revoked one keeps its row, with the signed revocation, for a while.
    """

    user: str
    device_id: bytes
    public_key: str  # PEM
    name: str
    created: int
    certificate: bytes  # the identity key's signature, or None
    revoked_at: int
    revocation: bytes
    prekeys: bool  # it has ever published prekeys: never wrapped to with RSA-OAEP again
    added_at: float
    last_seen: float


class Receipt(typing.NamedTuple):
    """A receipt as stored: a named tuple, since a drain makes one for every message it settles."""

    rid: int
    msg_id: bytes
    peer: str  # the recipient the receipt is about
    status: str  # delivered, rejected or expired
    reason: str
    at: float


_MIGRATIONS = {
    # schema version: the statements that bring a database of that version to the next
    1: [
        "ALTER TABLE users ADD COLUMN sent_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE users ADD COLUMN sent_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN reserved TEXT",
        "UPDATE users SET (sent_count, sent_bytes) = (SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
        " WHERE sender = users.name AND accepted_at IS NOT NULL)",
    ],
    # Devices: every account gets its identity device as a legacy (uncertified) device, and what waited for the
    # account now waits for that device, a receipt still owed for each.
    2: [
        "INSERT OR IGNORE INTO devices (user, device_id, public_key, added_at) SELECT name, substr(fingerprint, 1, %d),"
        " public_key, key_set_at FROM users" % DEVICE_ID_SIZE,
        "CREATE TABLE deliveries_v3 (recipient TEXT NOT NULL, ord INTEGER NOT NULL, device BLOB NOT NULL,"
        " seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE, told INTEGER NOT NULL DEFAULT 0,"
        " shared INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (recipient, ord, device)) WITHOUT ROWID",
        "INSERT INTO deliveries_v3 (recipient, ord, device, seq) SELECT d.recipient, d.ord, substr(u.fingerprint, 1,"
        " %d), d.seq FROM deliveries d JOIN users u ON u.name = d.recipient" % DEVICE_ID_SIZE,
        "DROP TABLE deliveries",
        "ALTER TABLE deliveries_v3 RENAME TO deliveries",
        "CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries(seq)",
    ],
    # Groups: their tables are new (made by _SCHEMA); a message names the group it was sent to.
    3: [
        "ALTER TABLE messages ADD COLUMN gid BLOB",
    ],
    # The lean layout: a message of one chunk keeps it in its row (body), and the delivery order is the messages'
    # AUTOINCREMENT sequence, which must start past every position the old counter gave out.
    4: [
        "ALTER TABLE messages ADD COLUMN body BLOB",
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'messages', 0 WHERE NOT EXISTS"
        " (SELECT 1 FROM sqlite_sequence WHERE name = 'messages')",
        "UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT value FROM counters WHERE name = 'ord'), 0))"
        " WHERE name = 'messages'",
        "DELETE FROM counters WHERE name = 'ord'",
    ],
    # A message that fits one push line and waits for a device that is not connected is stored as that line's tail
    # (push_tail), its header, signature and body being in it; other messages, and those stored before, keep their
    # fields, and their pushes are built as they are sent.
    5: [
        "ALTER TABLE messages ADD COLUMN line BLOB",
    ],
}


def create_schema_txn(txn, drop_unfinished=True):
    """
    Create the tables, or bring an older database to L{SCHEMA_VERSION}; returns the server id.  A new database
    gets incremental auto-vacuum (see L{vacuum_step_txn}); that must be chosen before its first table exists.
    """
    if txn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        txn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    txn.executescript(_SCHEMA)
    row = txn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        txn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        txn.execute("INSERT INTO meta VALUES ('server_id', ?)", (secrets.token_hex(16),))
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError("The database was written by a newer pager (schema %s); upgrade pager." % row[0])
    else:
        for version in range(int(row[0]), SCHEMA_VERSION):
            for statement in _MIGRATIONS[version]:
                txn.execute(statement)
        txn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    row = txn.execute("SELECT value FROM meta WHERE key = 'server_id'").fetchone()
    if row is None or not isinstance(row[0], str) or not SERVER_ID_RE.fullmatch(row[0]):
        # Clients file their keys under this id and refuse a hello without a valid one: nobody could log in.
        raise StoreError("The database's server id is not 32 hexadecimal digits (it was changed by hand, or the"
                         " file is not a pager database); restore the database from a backup.")
    txn.execute("INSERT OR IGNORE INTO counters VALUES ('reserved', 0)")
    if drop_unfinished:
        # At server start: uploads that never completed (the server stopped mid-message) were never accepted.
        for (seq,) in txn.execute("SELECT seq FROM messages WHERE accepted_at IS NULL").fetchall():
            abort_upload_txn(txn, seq)
    return row[0]


def enable_auto_vacuum(conn):
    """
    Turn incremental auto-vacuum on for a database made before pager used it: a VACUUM, which rewrites the whole
    file once (and needs as much free disk space for a while).  Runs outside any transaction, at server start.
    """
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")


def vacuum_step_txn(txn, pages):
    """
    Give up to C{pages} free pages back to the file system (incremental auto-vacuum): returns how many free pages
    are left.  In WAL mode the file shrinks at the next checkpoint, which L{checkpoint} forces.
    """
    txn.execute("PRAGMA incremental_vacuum(%d)" % int(pages)).fetchall()
    return txn.execute("PRAGMA freelist_count").fetchone()[0]


def free_pages_txn(txn):
    """How many pages of the database are free (given back by L{vacuum_step_txn})."""
    return txn.execute("PRAGMA freelist_count").fetchone()[0]


def checkpoint(conn):
    """Copy the WAL into the database file and truncate both to what they hold (outside any transaction)."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def invite_hash(code):
    """Invite codes are stored only as SHA-256 hashes: a copy of the database does not hold usable codes."""
    return hashlib.sha256(b"pager-invite-v1" + code.strip().encode("utf-8")).digest()


def create_invites_txn(txn, count, now):
    codes = [secrets.token_urlsafe(12) for _ in range(count)]
    txn.executemany("INSERT INTO invites (code_hash, created_at) VALUES (?, ?)",
                    [(invite_hash(c), now) for c in codes])
    return codes


def add_user_txn(txn, name, pem, fp, salt, token_hash, now, invite=None, device=None):
    """
    Add the account C{name} with its identity device (whose key is the account's): C{device} is its certificate's
    C{(name, created, signature)}, or None for a legacy device (never certified).
    """
    if invite is not None:
        txn.execute("UPDATE invites SET used_by = ?, used_at = ? WHERE code_hash = ? AND used_by IS NULL",
                    (name, now, invite_hash(invite)))
        if txn.rowcount != 1:
            raise Forbidden("That invite code is not valid, or was already used.")
    try:
        txn.execute(
            "INSERT INTO users (name, public_key, fingerprint, token_salt, token_hash, key_set_at, registered_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (name, pem, fp, salt, token_hash, now, now))
    except sqlite3.IntegrityError:
        raise UserExists("The user name %r is taken." % name)
    device_name, created, certificate = device or (None, None, None)
    txn.execute("INSERT OR REPLACE INTO devices (user, device_id, public_key, name, created, certificate, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", (name, fp[:DEVICE_ID_SIZE], pem, device_name, created, certificate,
                                                  now))


def get_user_txn(txn, name):
    row = txn.execute(
        "SELECT name, public_key, fingerprint, token_salt, token_hash, key_set_at, registered_at, recovered_at,"
        " pending_count, pending_bytes FROM users WHERE name = ?", (name,)).fetchone()
    return UserRecord(*row) if row else None


def user_names_txn(txn):
    return [row[0] for row in txn.execute("SELECT name FROM users ORDER BY name").fetchall()]


def user_page_txn(txn, after, limit):
    """C{(names, count)}: at most C{limit} user names after C{after} (or from the first), sorted; all users' count."""
    names = [row[0] for row in txn.execute("SELECT name FROM users WHERE name > ? ORDER BY name LIMIT ?",
                                           (after or "", limit)).fetchall()]
    return names, txn.execute("SELECT COUNT(*) FROM users").fetchone()[0]


def set_key_txn(txn, name, pem, fp, now, recovered):
    """
    Give the account C{name} a new identity key, which replaces all of its devices with one: the new identity
    device, not certified until its client certifies it.  What waited for the old identity device waits for the new
    one (it cannot open it, and rejects it, as before devices); what waited for the other devices is dropped.
    """
    row = txn.execute("SELECT fingerprint FROM users WHERE name = ?", (name,)).fetchone()
    if recovered:
        txn.execute("UPDATE users SET public_key = ?, fingerprint = ?, key_set_at = ?, recovered_at = ?"
                    " WHERE name = ?", (pem, fp, now, now, name))
    else:
        txn.execute("UPDATE users SET public_key = ?, fingerprint = ?, key_set_at = ? WHERE name = ?",
                    (pem, fp, now, name))
    new = fp[:DEVICE_ID_SIZE]
    if row is not None and bytes(row[0])[:DEVICE_ID_SIZE] != new:
        txn.execute("UPDATE OR IGNORE deliveries SET device = ? WHERE recipient = ? AND device = ?",
                    (new, name, bytes(row[0])[:DEVICE_ID_SIZE]))
    others = [bytes(r[0]) for r in txn.execute("SELECT DISTINCT device FROM deliveries WHERE recipient = ?"
                                                " AND device != ?", (name, new))]
    _drop_device_deliveries_txn(txn, name, others)
    txn.execute("DELETE FROM devices WHERE user = ?", (name,))
    txn.execute("DELETE FROM signed_prekeys WHERE user = ?", (name,))
    txn.execute("DELETE FROM one_time_prekeys WHERE user = ?", (name,))
    txn.execute("INSERT INTO devices (user, device_id, public_key, added_at) VALUES (?, ?, ?, ?)",
                (name, new, pem, now))


def set_token_txn(txn, name, salt, token_hash):
    txn.execute("UPDATE users SET token_salt = ?, token_hash = ? WHERE name = ?", (salt, token_hash, name))


_DEVICE_COLUMNS = ("user, device_id, public_key, name, created, certificate, revoked_at, revocation, prekeys,"
                   " added_at, last_seen")


def _blob(value):
    return None if value is None else bytes(value)


def _device_record(row):
    return DeviceRecord(row[0], bytes(row[1]), row[2], row[3], row[4], _blob(row[5]), row[6], _blob(row[7]),
                        bool(row[8]), row[9], row[10])


def devices_txn(txn, user):
    """
    C{(identity key PEM, [DeviceRecord])}: C{user}'s devices, revoked ones too, the identity device first, then
    the oldest first; L{UnknownUser}.
    """
    row = txn.execute("SELECT public_key, fingerprint FROM users WHERE name = ?", (user,)).fetchone()
    if row is None:
        raise UnknownUser("No such user: %s." % user)
    identity = bytes(row[1])[:DEVICE_ID_SIZE]
    records = [_device_record(r) for r in txn.execute("SELECT %s FROM devices WHERE user = ?" % _DEVICE_COLUMNS,
                                                      (user,))]
    records.sort(key=lambda r: (r.device_id != identity, r.added_at, r.device_id))
    return row[0], records


def device_status_txn(txn, user, device_id):
    """
    C{(DeviceRecord or None, signed prekey (id, valid_until) or None, one-time prekeys stored)} of one device, as
    a login answer tells its client.
    """
    row = txn.execute("SELECT %s FROM devices WHERE user = ? AND device_id = ?" % _DEVICE_COLUMNS,
                      (user, device_id)).fetchone()
    if row is None:
        return None, None, 0
    signed = txn.execute("SELECT prekey_id, valid_until FROM signed_prekeys WHERE user = ? AND device_id = ?",
                         (user, device_id)).fetchone()
    count = txn.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE user = ? AND device_id = ?",
                        (user, device_id)).fetchone()[0]
    return _device_record(row), tuple(signed) if signed else None, count


def certify_device_txn(txn, user, device_id, name, created, certificate, user_fp=None):
    """Give C{user}'s legacy device its certificate; L{BadRequest} if it has one already or is revoked."""
    _check_session_key_txn(txn, user, user_fp)
    txn.execute("UPDATE devices SET name = ?, created = ?, certificate = ? WHERE user = ? AND device_id = ?"
                " AND certificate IS NULL AND revoked_at IS NULL", (name, created, certificate, user, device_id))
    if txn.rowcount != 1:
        raise BadRequest("This device is certified already.")


def device_rows_allowed(max_devices):
    """The device rows (revoked ones included) one account may have: a list no client refuses (MAX_LISTED_DEVICES)."""
    return min(DEVICE_ROWS_PER_DEVICE * max_devices, MAX_LISTED_DEVICES)


def add_device_txn(txn, user, device_id, pem, name, created, certificate, now, max_devices, user_fp=None):
    """
    Add a certified device to C{user}'s account: L{Forbidden} past C{max_devices} devices not revoked, or past
    L{device_rows_allowed} rows revoked ones included; L{BadRequest} for a device key the account has (or had: a
    revoked key stays revoked).
    """
    _check_session_key_txn(txn, user, user_fp)
    count = txn.execute("SELECT COUNT(*) FROM devices WHERE user = ? AND revoked_at IS NULL", (user,)).fetchone()[0]
    if count >= max_devices:
        raise Forbidden("This account has %d devices, the most allowed; revoke one first." % max_devices)
    # Revoked rows stay listed REVOKED_KEPT for contacts to see; without this bound, linking and revoking over and
    # over would list more devices than a client accepts (MAX_LISTED_DEVICES), and the user would be unreachable.
    rows, oldest = txn.execute("SELECT COUNT(*), MIN(revoked_at) FROM devices WHERE user = ?", (user,)).fetchone()
    if rows >= device_rows_allowed(max_devices):
        if oldest is None:
            raise Forbidden("This account lists %d devices, the most allowed; revoke one first." % rows)
        raise Forbidden("This account lists %d devices, revoked ones included, the most allowed; the oldest revoked"
                        " one is forgotten %s." % (rows, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(
                            oldest + REVOKED_KEPT))))
    try:
        txn.execute("INSERT INTO devices (user, device_id, public_key, name, created, certificate, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (user, device_id, pem, name, created, certificate, now))
    except sqlite3.IntegrityError:
        raise BadRequest("This account has (or had) a device with that key; the new device must make a new key.")


def revoke_device_txn(txn, user, device_id, revoked_at, revocation, user_fp=None, now=None):
    """
    Revoke one of C{user}'s devices: its row stays (with the signed revocation, for contacts to see), its prekeys
    and what waited for it go.  L{BadRequest} for an unknown or already revoked device.  Returns C{(sender,
    Receipt)} pairs: a message the revoked device was the last of the user's devices to hold, none of them having
    acked it (the others rejected it: the identity device, which cannot be revoked, always gets a copy), settles
    as C{rejected} (L{REVOKED_REJECT_REASON}) at C{now}, so its sender hears of it; the rest go without a receipt
    (other devices still hold them, or the user's receipt was made already).
    """
    _check_session_key_txn(txn, user, user_fp)
    txn.execute("UPDATE devices SET revoked_at = ?, revocation = ? WHERE user = ? AND device_id = ?"
                " AND revoked_at IS NULL", (revoked_at, revocation, user, device_id))
    if txn.rowcount != 1:
        raise BadRequest("This account has no such device, or it is revoked already.")
    txn.execute("DELETE FROM signed_prekeys WHERE user = ? AND device_id = ?", (user, device_id))
    txn.execute("DELETE FROM one_time_prekeys WHERE user = ? AND device_id = ?", (user, device_id))
    last = [bytes(r[0]) for r in txn.execute(
        "SELECT m.msg_id FROM deliveries d JOIN messages m ON m.seq = d.seq WHERE d.recipient = ?1 AND d.device = ?2"
        " AND d.told = 0 AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.recipient = ?1 AND o.ord = d.ord AND"
        " o.device != ?2)", (user, device_id))]
    receipts = []
    if last:
        receipts, _ = settle_txn(txn, user, last, "rejected", REVOKED_REJECT_REASON, now, None, device_id)
    _drop_device_deliveries_txn(txn, user, [device_id])
    return receipts


def forget_revoked_txn(txn, older_than):
    """Forget devices revoked before C{older_than}: contacts have had time to see the revocation."""
    txn.execute("DELETE FROM devices WHERE revoked_at IS NOT NULL AND revoked_at < ?", (older_than,))
    return txn.rowcount


def login_record_txn(txn, user, device_id):
    """
    C{(UserRecord or None, device status, current devices)} for a login: the account, L{device_status_txn} of
    C{device_id} (the identity device's when None), and the account's devices not revoked (id -> published prekeys),
    for the server's cache, in one step.
    """
    record = get_user_txn(txn, user)
    if record is None:
        return None, (None, None, 0), {}
    current = {bytes(d): bool(p) for d, p in txn.execute(
        "SELECT device_id, prekeys FROM devices WHERE user = ? AND revoked_at IS NULL", (user,))}
    return record, device_status_txn(txn, user, device_id or bytes(record.fingerprint)[:DEVICE_ID_SIZE]), current


def set_last_seen_txn(txn, user, device_id, at):
    txn.execute("UPDATE devices SET last_seen = ? WHERE user = ? AND device_id = ?", (at, user, device_id))


def publish_prekeys_txn(txn, user, device_id, signed, one_time, max_pool, user_fp=None, replace=False):
    """
    Store a device's prekeys: C{signed} (prekey id, public, valid_from, valid_until, signature) replaces its signed
    prekey, C{one_time} ((id, public) pairs) join its pool (or, with C{replace}, take the place of the whole pool),
    which holds at most C{max_pool} (L{BadRequest} past it; an id already in the pool replaces that prekey).  The
    device is marked as one that publishes prekeys, for good.  Returns the pool's size.
    """
    _check_session_key_txn(txn, user, user_fp)
    if txn.execute("UPDATE devices SET prekeys = 1 WHERE user = ? AND device_id = ? AND revoked_at IS NULL",
                   (user, device_id)).rowcount != 1:
        raise Forbidden("This device is revoked.")
    if replace:
        txn.execute("DELETE FROM one_time_prekeys WHERE user = ? AND device_id = ?", (user, device_id))
    if signed is not None:
        txn.execute("INSERT OR REPLACE INTO signed_prekeys (user, device_id, prekey_id, public, valid_from,"
                    " valid_until, signature) VALUES (?, ?, ?, ?, ?, ?, ?)", (user, device_id, *signed))
    if one_time:
        txn.executemany("INSERT OR REPLACE INTO one_time_prekeys (user, device_id, prekey_id, public)"
                        " VALUES (?, ?, ?, ?)", [(user, device_id, i, public) for i, public in one_time])
    count = txn.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE user = ? AND device_id = ?",
                        (user, device_id)).fetchone()[0]
    if count > max_pool:
        raise BadRequest("A device stores at most %d one-time prekeys; this would make %d." % (max_pool, count))
    return count


def bundle_txn(txn, users, requester, requester_device, one_time=None):
    """
    Prekey bundles: for each of C{users}, C{(user, identity key PEM, [(DeviceRecord, signed prekey row or None,
    one-time prekey (id, public) or None)])} with every device (the requesting device left out of its own user's),
    revoked ones without prekeys; and C{low}: C{(user, device_id, pool size)} of each pool a prekey was taken from.
    Each device's one-time prekey is taken (deleted) here, so no two bundles ever carry the same one; with
    C{one_time} (a set of C{(user, device_id)}), only those devices' (the others' bundles carry the signed prekey
    alone).  L{UnknownUser} names every unknown user.
    """
    bundles, low, unknown = [], [], []
    one_time_for = one_time
    for user in users:
        try:
            identity_key, records = devices_txn(txn, user)
        except UnknownUser:
            unknown.append(user)
            continue
        devices = []
        for record in records:
            if user == requester and record.device_id == requester_device:
                continue
            signed = one_time = None
            if record.revoked_at is None and record.prekeys:
                signed = txn.execute("SELECT prekey_id, public, valid_from, valid_until, signature FROM signed_prekeys"
                                     " WHERE user = ? AND device_id = ?", (user, record.device_id)).fetchone()
            if (record.revoked_at is None and record.prekeys
                    and (one_time_for is None or (user, record.device_id) in one_time_for)):
                one_time = txn.execute(
                    "DELETE FROM one_time_prekeys WHERE user = ?1 AND device_id = ?2 AND prekey_id = (SELECT"
                    " MIN(prekey_id) FROM one_time_prekeys WHERE user = ?1 AND device_id = ?2)"
                    " RETURNING prekey_id, public", (user, record.device_id)).fetchone()
                if one_time is not None:
                    low.append((user, record.device_id, txn.execute(
                        "SELECT COUNT(*) FROM one_time_prekeys WHERE user = ? AND device_id = ?",
                        (user, record.device_id)).fetchone()[0]))
            devices.append((record, tuple(signed) if signed else None,
                            (one_time[0], bytes(one_time[1])) if one_time else None))
        bundles.append((user, identity_key, devices))
    if unknown:
        raise UnknownUser("No such user: %s." % ", ".join(unknown))
    return bundles, low


def _drop_device_deliveries_txn(txn, user, devices):
    """
    Drop what waits for C{user}'s C{devices} (revoked, or replaced by a new identity), without a receipt: a
    message the user's other devices still wait for stays for them; one that nothing of the user waits for any
    more comes off the user's counts (as if rejected).  Returns how many deliveries were dropped.
    """
    dropped = []
    for part in _in_pages(list(devices)):
        dropped += txn.execute("DELETE FROM deliveries WHERE recipient = ? AND device IN (%s) RETURNING ord, seq"
                               % _marks(part), (user, *part)).fetchall()
    if not dropped:
        return 0
    ords = {ord_: seq for ord_, seq in dropped}
    left = set()
    for part in _in_pages(list(ords)):
        left.update(r[0] for r in txn.execute("SELECT ord FROM deliveries WHERE recipient = ? AND ord IN (%s)"
                                              % _marks(part), (user, *part)))
    done = [seq for ord_, seq in ords.items() if ord_ not in left]
    size = 0
    for part in _in_pages(done):
        size += txn.execute("SELECT COALESCE(SUM(size), 0) FROM messages WHERE seq IN (%s)" % _marks(part),
                            part).fetchone()[0]
    txn.execute("UPDATE users SET pending_count = MAX(0, pending_count - ?), pending_bytes = MAX(0, pending_bytes"
                " - ?) WHERE name = ?", (len(done), size, user))
    _drop_messages_txn(txn, done)
    return len(dropped)


def _existing_message_txn(txn, msg_id, sender):
    """The seq of an already accepted message C{msg_id} by C{sender}, or None; L{BadRequest} if the id is taken."""
    row = txn.execute("SELECT seq, sender, accepted_at FROM messages WHERE msg_id = ?", (msg_id,)).fetchone()
    if row is None:
        return None
    if row[1] != sender or row[2] is None:
        raise BadRequest("That message id is already in use.")
    return row[0], row[2]


def _check_budget_txn(txn, size, limits):
    """
    Raise L{StorageFull} unless C{size} more bytes fit the database's budget: the pages in use (free pages do not
    count), plus what the open uploads declared and have not stored yet (L{upload_chunks_txn}).  Within one batch of
    L{_batch_txn} the database is measured once, and each message checked adds its size to that measure.
    """
    used = getattr(txn, "budget_used", None)
    if used is None:
        used = txn.execute(
            "SELECT ((SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM"
            " pragma_freelist_count())) * (SELECT page_size FROM pragma_page_size())"
            " + (SELECT value FROM counters WHERE name = 'reserved')").fetchone()[0]
    if used + size > limits.max_db_bytes:
        raise StorageFull("The server's storage is full (its limit is %d bytes); try again later."
                          % limits.max_db_bytes)
    try:
        txn.budget_used = used + size
    except AttributeError:  # a bare cursor (the admin commands, the benchmarks): measured every time
        pass


def _charge_sender_txn(txn, sender, sender_fp, size, limits):
    """
    Count one more stored message of C{size} against C{sender}'s own quota.  With C{sender_fp}, the account must
    still have that key: a session whose account was deleted, or whose key was replaced, stores nothing more.
    """
    if txn.execute("UPDATE users SET sent_count = sent_count + 1, sent_bytes = sent_bytes + ?1 WHERE name = ?2"
                   " AND (?3 IS NULL OR fingerprint = ?3) AND sent_count < ?4 AND sent_bytes + ?1 <= ?5",
                   (size, sender, sender_fp, limits.max_sender_pending_messages,
                    limits.max_sender_pending_bytes)).rowcount == 1:
        return
    row = txn.execute("SELECT fingerprint FROM users WHERE name = ?", (sender,)).fetchone()
    if row is None or (sender_fp is not None and bytes(row[0]) != sender_fp):
        raise Forbidden("This account was deleted, or its key replaced, since this session logged in.")
    raise QuotaExceeded("You have too many messages waiting for delivery (at most %d messages and %d bytes)."
                        % (limits.max_sender_pending_messages, limits.max_sender_pending_bytes))


def _charge_recipients_txn(txn, recipients, size, limits):
    """
    Count a message of C{size} against each recipient's quota.  Each recipient's counters go up only if its quota
    holds; if one does not, find out why and refuse the whole message (raising undoes everything this step did).
    """
    for index, name in enumerate(recipients):
        if txn.execute("UPDATE users SET pending_count = pending_count + 1, pending_bytes = pending_bytes + ?"
                       " WHERE name = ? AND pending_count < ? AND pending_bytes + ? <= ?",
                       (size, name, limits.max_pending_messages, size, limits.max_pending_bytes)).rowcount != 1:
            check_recipients_txn(txn, recipients, size, limits, counted=recipients[:index])


def _release_txn(txn, sender, size, recipients=()):
    """Undo what a stored message of C{size} counted against its sender and C{recipients}."""
    txn.execute("UPDATE users SET sent_count = MAX(0, sent_count - 1), sent_bytes = MAX(0, sent_bytes - ?)"
                " WHERE name = ?", (size, sender))
    txn.executemany("UPDATE users SET pending_count = MAX(0, pending_count - 1),"
                    " pending_bytes = MAX(0, pending_bytes - ?) WHERE name = ?", [(size, r) for r in recipients])


def begin_upload_txn(txn, msg_id, sender, header, size, recipients, limits, sender_fp=None):
    """
    Start storing a message that comes in several frames: C{(seq, duplicate, accepted_at)}.  A resend of a message
    already accepted is recognised first; otherwise the declared C{size} is reserved at once against the
    recipients' quotas, the sender's and the database's budget, before any chunk is stored, and stays reserved
    until the message is accepted (the reservation becomes its count) or the upload is dropped.
    """
    existing = _existing_message_txn(txn, msg_id, sender)
    if existing is not None:
        return existing[0], True, existing[1]
    _charge_recipients_txn(txn, recipients, size, limits)
    _charge_sender_txn(txn, sender, sender_fp, size, limits)
    _check_budget_txn(txn, size, limits)
    txn.execute("UPDATE counters SET value = value + ? WHERE name = 'reserved'", (size,))
    txn.execute("INSERT INTO messages (msg_id, sender, header, size, chunk_count, reserved) VALUES (?, ?, ?, ?, 0, ?)",
                (msg_id, sender, header, size, ",".join(recipients)))
    return txn.lastrowid, False, None


def add_chunks_txn(txn, seq, start, chunks):
    txn.executemany("INSERT INTO chunks (seq, idx, data) VALUES (?, ?, ?)",
                    [(seq, start + i, c) for i, c in enumerate(chunks)])


def upload_chunks_txn(txn, seq, start, chunks):
    """
    L{add_chunks_txn} for an upload begun with L{begin_upload_txn}, unless it was dropped meanwhile.  The chunks'
    plaintext bytes come off the database's reservation as they are stored (their pages count from now on), so
    the budget counts the upload's declared size once: stored pages plus what is still to come.
    """
    if txn.execute("SELECT 1 FROM messages WHERE seq = ? AND accepted_at IS NULL", (seq,)).fetchone() is None:
        raise BadRequest("That upload was abandoned.")
    add_chunks_txn(txn, seq, start, chunks)
    stored = sum(max(0, len(c) - GCM_TAG_SIZE) for c in chunks)
    txn.execute("UPDATE counters SET value = MAX(0, value - ?) WHERE name = 'reserved'", (stored,))


def _still_reserved_txn(txn, seq, size):
    """What an open upload of C{size} declared bytes still holds of the database's reservation."""
    stored = txn.execute("SELECT COALESCE(SUM(MAX(0, LENGTH(data) - ?)), 0) FROM chunks WHERE seq = ?",
                         (GCM_TAG_SIZE, seq)).fetchone()[0]
    return max(0, size - stored)


def abort_upload_txn(txn, seq):
    """Drop an upload that was never accepted, with its chunks, and give back what it reserved."""
    row = txn.execute("SELECT sender, size, reserved FROM messages WHERE seq = ? AND accepted_at IS NULL",
                      (seq,)).fetchone()
    if row is None:
        return
    sender, size, reserved = row
    if reserved is not None:  # an upload begun by a pager that did not reserve (schema 1) counted nothing
        _release_txn(txn, sender, size, reserved.split(","))
        txn.execute("UPDATE counters SET value = MAX(0, value - ?) WHERE name = 'reserved'",
                    (_still_reserved_txn(txn, seq, size),))
    txn.execute("DELETE FROM chunks WHERE seq = ?", (seq,))
    txn.execute("DELETE FROM messages WHERE seq = ?", (seq,))


def check_recipients_txn(txn, recipients, size, limits, counted=()):
    """
    Raise L{UnknownUser} or L{QuotaExceeded} naming every recipient that cannot take a message of C{size}.  The
    recipients in C{counted} already have this message in their counters (the caller undoes that by raising).
    """
    unknown, full = [], []
    for name in recipients:
        row = txn.execute("SELECT pending_count, pending_bytes FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            unknown.append(name)
            continue
        count, size_pending = row
        if name in counted:
            count, size_pending = count - 1, size_pending - size
        if count + 1 > limits.max_pending_messages or size_pending + size > limits.max_pending_bytes:
            full.append(name)
    if unknown:
        raise UnknownUser("No such user: %s." % ", ".join(unknown))
    if full:
        raise QuotaExceeded("Too many pending messages for: %s." % ", ".join(full))


def accept_message_txn(txn, msg_id, sender, header, signature, size, chunks, recipients, now, limits, seq=None,
                       check=None, sender_fp=None, targets=None, group=None, tail=None):
    """
    Commit a complete message for all of its recipients, or for none: returns C{(seq, accepted_at, duplicate,
    ord)}, C{ord} being its place in delivery order, taken now, at acceptance.  C{recipients} are the users it
    counts against (once each, however many of their devices get it); C{targets} the devices it waits for:
    C{(user, device_id, told)}, C{told} true for the sender's own other devices, for which no receipt is made.
    Without C{targets}, every device of each recipient not revoked gets it, a receipt owed.
    C{seq} is that of an upload begun with L{begin_upload_txn}, whose chunks are already stored and whose size is
    already counted; otherwise the message is new and C{chunks} are all of its chunk ciphertexts, and it is
    counted now against the recipients', the sender's and the database's limits.  C{check()}, if given, runs first
    (the signature check) and refuses the message by raising.  With C{sender_fp}, the sender's account must still
    have that key.  A group message has C{group}, its C{(group id, head)}: that must still be the group's stored
    head (L{GroupChanged}), so that a message and an op that removes a member are committed in one order or the
    other, never a message sealed for the old version after the op (see L{add_group_op_txn}).  A new message may
    come with C{tail}, its push as encoded after its seq (L{push_tail}, with C{now}): it is stored as that alone,
    its header, signature and chunk being in it.
    """
    if check is not None:
        check()
    expires_at = now + limits.message_expiry
    if seq is None:
        # Its place in delivery order is its seq: a message accepted whole is inserted as it is accepted, and the
        # AUTOINCREMENT sequence never goes back.  Its push line (given for a message that waits for a device
        # not connected), or else its one chunk (most messages), is kept in the row itself.
        body = chunks[0] if len(chunks) == 1 and tail is None else None
        try:
            txn.execute(
                "INSERT INTO messages (msg_id, sender, header, signature, size, chunk_count, accepted_at,"
                " expires_at, gid, body, line) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg_id, sender, header if tail is None else b"", signature if tail is None else None, size,
                 len(chunks), now, expires_at, None if group is None else group[0], body, tail))
        except sqlite3.IntegrityError:  # the message id is taken: a resend of ours, or someone else's id
            existing = _existing_message_txn(txn, msg_id, sender)
            return existing[0], existing[1], True, None
        seq = ord_ = txn.lastrowid
        if group is not None:
            _check_group_head_txn(txn, *group)
        _charge_recipients_txn(txn, recipients, size, limits)
        _charge_sender_txn(txn, sender, sender_fp, size, limits)
        _check_budget_txn(txn, size, limits)
        if body is None and tail is None:
            add_chunks_txn(txn, seq, 0, chunks)
    else:
        # An upload's seq was given when it began: its place comes now, the next number of the same sequence.
        ord_ = txn.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'messages' RETURNING seq"
                           ).fetchone()[0]
        row = txn.execute("SELECT size FROM messages WHERE seq = ? AND accepted_at IS NULL", (seq,)).fetchone()
        if row is None:  # dropped meanwhile (its connection closed): nothing may refer to it
            raise BadRequest("That upload was abandoned before its last frame.")
        if row[0] != size:
            raise BadRequest("The message is %d bytes, not the %d declared." % (size, row[0]))
        if group is not None:
            _check_group_head_txn(txn, *group)
            txn.execute("UPDATE messages SET gid = ? WHERE seq = ?", (group[0], seq))
        if sender_fp is not None and txn.execute("SELECT 1 FROM users WHERE name = ? AND fingerprint = ?",
                                                 (sender, sender_fp)).fetchone() is None:
            raise Forbidden("This account was deleted, or its key replaced, since this session logged in.")
        known = txn.execute("SELECT COUNT(*) FROM users WHERE name IN (%s)" % _marks(recipients),
                            recipients).fetchone()[0]
        if known != len(recipients):  # a recipient deleted while the upload ran
            check_recipients_txn(txn, recipients, 0, limits, counted=recipients)
        count = txn.execute("SELECT COUNT(*) FROM chunks WHERE seq = ?", (seq,)).fetchone()[0]
        txn.execute("UPDATE counters SET value = MAX(0, value - ?) WHERE name = 'reserved'",
                    (_still_reserved_txn(txn, seq, size),))
        txn.execute("UPDATE messages SET signature = ?, chunk_count = ?, accepted_at = ?, expires_at = ?, ord = ?,"
                    " reserved = NULL WHERE seq = ?", (signature, count, now, expires_at, ord_, seq))
    # "shared": other devices of the same user get it too, so settling it must look at them (settle_txn).
    if targets is None:
        txn.execute("INSERT INTO deliveries (recipient, ord, device, seq, shared) SELECT user, ?, device_id, ?,"
                    " (SELECT COUNT(*) FROM devices o WHERE o.user = devices.user AND o.revoked_at IS NULL) > 1"
                    " FROM devices WHERE user IN (%s) AND revoked_at IS NULL" % _marks(recipients),
                    (ord_, seq, *recipients))
    else:
        if len(targets) == len(recipients):  # one device each (the common case)
            rows = [(r, ord_, device, seq, told, False) for r, device, told in targets]
        else:
            copies = collections.Counter(r for r, _, _ in targets)
            rows = [(r, ord_, device, seq, told, copies[r] > 1) for r, device, told in targets]
        txn.executemany("INSERT INTO deliveries (recipient, ord, device, seq, told, shared) VALUES (?, ?, ?, ?, ?, ?)",
                        rows)
    return seq, now, False, ord_


def _check_session_key_txn(txn, user, user_fp):
    """
    With C{user_fp}, raise L{KeyReplaced} unless C{user}'s account still has that key: a session logged in with
    a replaced key (or of a deleted account) may neither read nor settle what waits for the account.  One indexed
    lookup per transaction step, whatever the number of messages it handles.
    """
    if user_fp is not None and txn.execute("SELECT 1 FROM users WHERE name = ? AND fingerprint = ?",
                                           (user, user_fp)).fetchone() is None:
        raise KeyReplaced()


def _pending_rows_txn(txn, user, after_ord, limit, inline_bytes, page_bytes, user_fp, device):
    """
    The rows of L{pending_txn} and L{pending_pushes_txn}: C{(seq, msg_id, sender, header, signature, size,
    chunk_count, accepted_at, ord, body, tail)}, and the chunks of the inline ones without a tail, by seq.
    """
    _check_session_key_txn(txn, user, user_fp)
    rows = txn.execute(
        "SELECT m.seq, m.msg_id, m.sender, m.header, m.signature, m.size, m.chunk_count, m.accepted_at, d.ord, m.body,"
        " m.line FROM deliveries d JOIN messages m ON m.seq = d.seq"
        " WHERE d.recipient = ?1 AND d.ord > ?2 AND (?4 IS NULL OR d.device = ?4) ORDER BY d.ord LIMIT ?3",
        (user, after_ord, limit, device)).fetchall()
    held = 0
    for end, row in enumerate(rows):
        if row[10] is not None:
            held += len(row[10])
        else:
            held += len(row[3]) + len(row[4] or b"")
            if row[5] <= inline_bytes:
                held += row[5] + row[6] * GCM_TAG_SIZE
        if held > page_bytes and end > 0:
            del rows[end:]
            break
    inline = [row[0] for row in rows if row[5] <= inline_bytes and row[9] is None and row[10] is None]
    chunks = collections.defaultdict(list)
    for part in _in_pages(inline):  # within SQLite's limit on parameters
        for seq, data in txn.execute("SELECT seq, data FROM chunks WHERE seq IN (%s) ORDER BY seq, idx"
                                     % _marks(part), part):
            chunks[seq].append(bytes(data))
    return rows, chunks


def _pending_message(row, chunks, inline_bytes):
    """The L{StoredMessage} of a row of L{_pending_rows_txn}."""
    if row[10] is not None:
        return _message_from_tail(row[0], bytes(row[1]), row[8], row[6], row[10])
    if row[5] > inline_bytes:
        return StoredMessage(*row[:8], None, ord=row[8])
    # a message of one chunk keeps it in its row
    return StoredMessage(*row[:8], [bytes(row[9])] if row[9] is not None else chunks[row[0]], ord=row[8])


def pending_txn(txn, user, after_ord, limit, inline_bytes, page_bytes=PENDING_PAGE_BYTES, user_fp=None, device=None):
    """
    Up to C{limit} pending deliveries for C{user} after delivery position C{after_ord}, in the order they were
    accepted, small ones (up to C{inline_bytes}) with their chunks: L{StoredMessage}s.  The page ends early rather
    than hold more than C{page_bytes} of headers, signatures and inline chunks (it always has at least one
    delivery, if there is one).  With C{user_fp}, see L{_check_session_key_txn}.  With C{device}, only what waits
    for that device (one device's rows come in the same index walk as the user's: a user has at most
    C{max_devices}).
    """
    rows, chunks = _pending_rows_txn(txn, user, after_ord, limit, inline_bytes, page_bytes, user_fp, device)
    return [_pending_message(row, chunks, inline_bytes) for row in rows]


def pending_pushes_txn(txn, user, after_ord, limit, inline_bytes, max_line, user_fp=None, device=None):
    """
    L{pending_txn} as a session's feed takes it: C{(ord, item)} pairs, the item the message's push line as
    stored when it has one that fits in C{max_line}, else its L{StoredMessage}.
    """
    rows, chunks = _pending_rows_txn(txn, user, after_ord, limit, inline_bytes, PENDING_PAGE_BYTES, user_fp, device)
    pushes = []
    for row in rows:
        if row[10] is not None:
            line = _push_line(row[1], row[8], row[10])
            if len(line) <= max_line:  # it may not, if the server was restarted with a shorter max_line
                pushes.append((row[8], line))
                continue
        pushes.append((row[8], _pending_message(row, chunks, inline_bytes)))
    return pushes


def chunks_txn(txn, seq, start, count):
    row = txn.execute("SELECT body FROM messages WHERE seq = ?", (seq,)).fetchone()
    if row is not None and row[0] is not None:
        return [bytes(row[0])] if start == 0 and count > 0 else []
    return [bytes(r[0]) for r in txn.execute(
        "SELECT data FROM chunks WHERE seq = ? AND idx >= ? ORDER BY idx LIMIT ?", (seq, start, count)).fetchall()]


def _nothing_txn(txn):
    """An operation that does nothing: what fills a place in the store's order kept for a send that was refused."""


def _ignore(outcome):
    """The callback of an operation whose outcome nobody waits for."""


def _drop_messages_txn(txn, seqs):
    """
    Delete those of the accepted messages C{seqs} that no delivery refers to any more, with their chunks, and give
    their senders' quotas back.
    """
    dropped = []
    for part in _in_pages(list(seqs)):
        rows = txn.execute(
            "DELETE FROM messages WHERE seq IN (%s) AND accepted_at IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.seq = messages.seq)"
            " RETURNING seq, sender, size, body IS NULL AND line IS NULL" % _marks(part), part).fetchall()
        chunked = [row[0] for row in rows if row[3]]  # the others kept their chunk in their row or line
        if chunked:
            txn.execute("DELETE FROM chunks WHERE seq IN (%s)" % _marks(chunked), chunked)
        dropped += rows
    _give_back_sent_txn(txn, dropped)


def _drop_settled_txn(txn, settled):
    """
    L{_drop_messages_txn} for messages a settle has just read: C{(seq, sender, size, ord, devices, told, shared,
    chunked)} each, accepted and with no delivery to the settling device left.  Knowing their rows, it asks only
    which of them another delivery still refers to, and deletes the others without RETURNING (which costs SQLite
    more than that question: about 1 µs a message of a drain).
    """
    kept = set()
    for part in _in_pages([entry[0] for entry in settled]):
        kept.update(row[0] for row in txn.execute("SELECT DISTINCT seq FROM deliveries WHERE seq IN (%s)"
                                                  % _marks(part), part))
    dropped = [entry for entry in settled if entry[0] not in kept]
    for part in _in_pages([entry[0] for entry in dropped]):
        txn.execute("DELETE FROM messages WHERE seq IN (%s)" % _marks(part), part)
    for part in _in_pages([entry[0] for entry in dropped if entry[7]]):  # the others' chunk is in their row
        txn.execute("DELETE FROM chunks WHERE seq IN (%s)" % _marks(part), part)
    _give_back_sent_txn(txn, dropped)


def _give_back_sent_txn(txn, dropped):
    """Give the senders of the deleted messages C{dropped} (C{(seq, sender, size, ...)} each) their quota back."""
    senders = collections.defaultdict(lambda: [0, 0])
    for entry in dropped:
        counts = senders[entry[1]]
        counts[0] += 1
        counts[1] += entry[2]
    txn.executemany("UPDATE users SET sent_count = MAX(0, sent_count - ?), sent_bytes = MAX(0, sent_bytes - ?)"
                    " WHERE name = ?", [(count, size, sender) for sender, (count, size) in senders.items()])


def _in_pages(items, size=500):
    """C{items} in slices small enough for one statement's parameters."""
    return (items[start:start + size] for start in range(0, len(items), size))


def _marks(items):
    return ",".join("?" * len(items))


def settle_txn(txn, user, msg_ids, status, reason, now, user_fp=None, device=None):
    """
    Delete the deliveries of C{msg_ids} to C{user}'s C{device} (to every device of C{user} when None; never another
    user's) and store the receipts they settle, a whole list in a few statements.  Returns C{(receipts, unknown)}:
    C{(sender, Receipt)} pairs in the order of C{msg_ids}, and the ids the device has no pending delivery of.
    A user's receipt: C{delivered} at the first of its devices' acks; C{rejected} (or C{expired}) once the last
    of its devices that got the message settles it so, none having acked; none for the sender's own devices
    (their deliveries are stored as told), nor for a message its sender wanted none of (stored as told too).
    A message counts against the user until the last of its devices settles it.  With C{user_fp}, see
    L{_check_session_key_txn}.
    """
    _check_session_key_txn(txn, user, user_fp)
    found = {}
    for part in _in_pages(msg_ids):
        for seq, msg_id, sender, size, ord_, dev, told, shared, chunked in txn.execute(
                # CROSS JOIN keeps SQLite to this order: each id through the msg_id index, then its deliveries
                # through theirs, never a scan of the user's whole queue
                "SELECT m.seq, m.msg_id, m.sender, m.size, d.ord, d.device, d.told, d.shared,"
                " m.body IS NULL AND m.line IS NULL FROM messages m CROSS JOIN deliveries d ON d.seq = m.seq"
                " AND d.recipient = ?1 AND (?2 IS NULL OR d.device = ?2)"
                " WHERE m.msg_id IN (%s)" % ",".join("?%d" % (i + 3) for i in range(len(part))),
                (user, device, *part)):
            entry = found.setdefault(bytes(msg_id), [seq, sender, size, ord_, [], False, False, chunked])
            entry[4].append(bytes(dev))
            entry[5] = entry[5] or bool(told)
            entry[6] = entry[6] or bool(shared)
    unknown = [m for m in msg_ids if m not in found]
    settled = [m for m in dict.fromkeys(msg_ids) if m in found]  # each once, in the order asked
    if not settled:
        return [], unknown
    txn.executemany("DELETE FROM deliveries WHERE recipient = ? AND ord = ? AND device = ?",
                    [(user, found[m][3], dev) for m in settled for dev in found[m][4]])
    return _settled_txn(txn, user, found, settled, status, reason, now), unknown


def settle_upto_txn(txn, user, device, upto, now, user_fp=None):
    """
    The cumulative ack: settle as delivered every delivery to C{user}'s C{device} at a delivery position up to
    C{upto}, found and deleted as one range of the deliveries' key, not one lookup per message.  Returns
    C{(receipts, settled)}: as L{settle_txn}'s, in delivery order, and how many deliveries were settled.
    """
    _check_session_key_txn(txn, user, user_fp)
    rows = txn.execute(
        "SELECT m.seq, m.msg_id, m.sender, m.size, d.ord, d.told, d.shared, m.body IS NULL AND m.line IS NULL"
        " FROM deliveries d JOIN messages m ON m.seq = d.seq WHERE d.recipient = ?1 AND d.ord <= ?2 AND d.device = ?3"
        " ORDER BY d.ord", (user, upto, device))
    devices = (device,)
    found = {msg_id: (seq, sender, size, ord_, devices, told, shared, chunked)
             for seq, msg_id, sender, size, ord_, told, shared, chunked in rows}
    if not found:
        return [], 0
    txn.execute("DELETE FROM deliveries WHERE recipient = ? AND ord <= ? AND device = ?", (user, upto, device))
    return _settled_txn(txn, user, found, list(found), "delivered", "", now), len(found)


def _settled_txn(txn, user, found, settled, status, reason, now):
    """
    The rest of settling C{settled} (message ids, each a key of C{found}: C{(seq, sender, size, ord, devices, told,
    shared, chunked)}), whose deliveries were just deleted: the user's quota, the messages nobody waits for any
    more, and the receipts owed (see L{settle_txn}), returned as C{(sender, Receipt)} pairs.
    """
    left = set()  # the positions other devices of the user still wait for (only shared ones can be: no SQL otherwise)
    for part in _in_pages([found[m][3] for m in settled if found[m][6]]):
        left.update(r[0] for r in txn.execute("SELECT ord FROM deliveries WHERE recipient = ? AND ord IN (%s)"
                                              % _marks(part), (user, *part)))
    if left:
        done = [m for m in settled if found[m][3] not in left]
        told = [m for m in settled if found[m][3] in left and status == "delivered" and not found[m][5]]
    else:
        done, told = settled, ()
    if told:  # the user's receipt is made now: the other devices' acks make none
        txn.executemany("UPDATE deliveries SET told = 1 WHERE recipient = ? AND ord = ?",
                        [(user, found[m][3]) for m in told])
    if done:
        txn.execute("UPDATE users SET pending_count = pending_count - ?, pending_bytes = pending_bytes - ?"
                    " WHERE name = ?", (len(done), sum(found[m][2] for m in done), user))
        _drop_settled_txn(txn, [found[m] for m in done])
    owed = [m for m in settled if not found[m][5] and (status == "delivered" or found[m][3] not in left)]
    if not owed:
        return []
    rid = _last_receipt_id_txn(txn)
    receipts = []
    for part in _in_pages(owed, 100):  # several rows an INSERT
        values = []
        for m in part:
            rid += 1
            sender = found[m][1]
            values += (rid, sender, m, user, status, reason, now)
            receipts.append((sender, Receipt(rid, m, user, status, reason, now)))
        txn.execute("INSERT INTO receipts (rid, user, msg_id, peer, status, reason, at) VALUES %s"
                    % ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(part)), values)
    return receipts


def _last_receipt_id_txn(txn):
    """
    The largest receipt id ever given (0 before the first): a settle numbers its receipts itself from there, in
    the order it makes them, rather than have the INSERT return the ids SQLite chose (RETURNING cost a drain about
    a microsecond a receipt).  The store's transactions begin IMMEDIATE, so no other writer can take an id between
    this read and the INSERT; the receipts table is AUTOINCREMENT, so SQLite records the ids given here as used
    and never gives one of a deleted receipt again (a client's cursor over its receipts relies on that).
    """
    return txn.execute("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'receipts'), 0),"
                       " COALESCE((SELECT MAX(rid) FROM receipts), 0))").fetchone()[0]


def trim_receipts_txn(txn, user, keep):
    """
    Drop the oldest stored receipts of C{user} beyond its C{keep} newest.  Receipts are the one thing a user
    stores on the server that is not counted against a quota (they cost their recipient nothing), so without this
    bound a user who sends to itself and rejects with long reasons, never acknowledging, fills the database.  A
    client that acknowledges its receipts never has more than a handful; one that does not loses only its own
    oldest news.  It walks C{keep} index entries (about 0.2 ms for 5000), so the server runs it once per batch of
    new receipts of a user, not with every settle (L{PagerServerFactory.receipt_created}).
    """
    txn.execute("DELETE FROM receipts WHERE user = ?1 AND rid <= (SELECT rid FROM receipts WHERE user = ?1"
                " ORDER BY rid DESC LIMIT 1 OFFSET ?2)", (user, keep))
    return txn.rowcount


def ack_txn(txn, user, msg_id, status, reason, now, user_fp=None, device=None):
    """
    L{settle_txn} for one message: returns C{(sender, receipt)}, or None when it makes no receipt (another device
    of the user settles it); raises L{UnknownMessage} if the device has no such delivery.
    """
    receipts, unknown = settle_txn(txn, user, [msg_id], status, reason, now, user_fp, device)
    if unknown:
        raise UnknownMessage()
    return receipts[0] if receipts else None


def pending_receipts_txn(txn, user, after_rid, limit, user_fp=None):
    _check_session_key_txn(txn, user, user_fp)
    return [Receipt(r[0], bytes(r[1]), *r[2:]) for r in txn.execute(
        "SELECT rid, msg_id, peer, status, reason, at FROM receipts WHERE user = ? AND rid > ? ORDER BY rid LIMIT ?",
        (user, after_rid, limit)).fetchall()]


def ack_receipts_txn(txn, user, rids):
    """Delete C{user}'s receipts C{rids}; returns those that were not stored for C{user}."""
    gone = set()
    for part in _in_pages(rids):
        gone.update(row[0] for row in txn.execute(
            "DELETE FROM receipts WHERE user = ? AND rid IN (%s) RETURNING rid" % _marks(part), (user, *part)))
    return [rid for rid in rids if rid not in gone]


def ack_many_txn(txn, user, msg_ids, rids, now, user_fp=None, device=None):
    """
    The list form of ack, in one transaction: C{(receipts, unknown message ids, unknown receipt ids)}, settling
    C{msg_ids} as delivered to C{device} (see L{settle_txn}) and deleting the receipts C{rids}; either list may be
    None.
    """
    _check_session_key_txn(txn, user, user_fp)
    receipts, unknown_msgs = (settle_txn(txn, user, msg_ids, "delivered", "", now, None, device) if msg_ids
                              else ([], []))
    return receipts, unknown_msgs, ack_receipts_txn(txn, user, rids) if rids else []


def ack_upto_txn(txn, user, device, upto, rids, now, user_fp=None):
    """
    The cumulative form of ack, in one transaction: C{(receipts, settled, unknown receipt ids)}, settling every
    delivery to C{device} up to position C{upto} (L{settle_upto_txn}) and deleting the receipts C{rids} (or None).
    """
    receipts, settled = settle_upto_txn(txn, user, device, upto, now, user_fp)
    return receipts, settled, ack_receipts_txn(txn, user, rids) if rids else []


def ack_receipt_txn(txn, user, rid, user_fp=None):
    _check_session_key_txn(txn, user, user_fp)
    if ack_receipts_txn(txn, user, [rid]):
        raise UnknownMessage("No pending receipt %d for you." % rid)


def expire_receipts_txn(txn, older_than):
    """Drop receipts nobody collected before C{older_than}; returns how many."""
    txn.execute("DELETE FROM receipts WHERE at < ?", (older_than,))
    return txn.rowcount


def account_keys_txn(txn, names):
    """The key fingerprint of each of the accounts C{names} that exists: C{{name: fingerprint}}."""
    keys = {}
    for part in _in_pages(names):
        keys.update((name, bytes(fp)) for name, fp in txn.execute(
            "SELECT name, fingerprint FROM users WHERE name IN (%s)" % _marks(part), part))
    return keys


def expire_txn(txn, now, limit=EXPIRE_BATCH):
    """Drop deliveries past their expiry time; returns C{(sender, receipt)} pairs telling each sender."""
    expired = collections.defaultdict(list)  # (recipient, device) -> message ids
    for recipient, device, msg_id in txn.execute(
            "SELECT d.recipient, d.device, m.msg_id FROM messages m JOIN deliveries d ON d.seq = m.seq"
            " WHERE m.expires_at < ? LIMIT ?", (now, limit)).fetchall():
        expired[recipient, bytes(device)].append(bytes(msg_id))
    out = []
    for (recipient, device), msg_ids in expired.items():
        out += settle_txn(txn, recipient, msg_ids, "expired", "The message expired before it was delivered.", now,
                          None, device)[0]
    return out


# -- groups --
# A group's chain of signed operations is stored as it came, each op with the PEM of the identity key that signed it
# (the server checked the signature then).  Beside the chain, what the server needs without reading it: the group's
# name, version (seq) and head, with its member count (groups: a name is taken while its group has members), its
# current members (group_members: the group limit per user, the listing, and who put each member in), and for each
# user who left or was removed, the op that ended their membership (former_members: they may still read the chain up
# to it).  The rules themselves (GroupState.apply) run in the server, on the state its cache holds; the transaction
# that stores an op checks again that it extends the stored head, so that of two ops on one head only the first
# lands.

GROUP_CHAIN_PAGE = 256  # ops one read of a group's chain holds (the server's cache folds a chain page by page)


def _group_row_txn(txn, gid):
    """C{(name, seq, head, members)} of group C{gid}, or None."""
    row = txn.execute("SELECT name, seq, head, members FROM groups WHERE gid = ?", (gid,)).fetchone()
    return None if row is None else (row[0], row[1], bytes(row[2]), row[3])


def group_access_txn(txn, gid, user):
    """
    What a request of C{user}'s naming group C{gid} may do, from a few rows and without the chain: C{(name, members,
    member, former)}, the group's name and member count, whether C{user} is a current member, and whether a former
    one (who may read the chain up to the op that ended it); None if there is no such group.
    """
    row = txn.execute("SELECT name, members, EXISTS (SELECT 1 FROM group_members WHERE gid = ?1 AND user = ?2),"
                      " EXISTS (SELECT 1 FROM former_members WHERE user = ?2 AND gid = ?1) FROM groups WHERE gid = ?1",
                      (gid, user)).fetchone()
    return None if row is None else (row[0], row[1], bool(row[2]), bool(row[3]))


def group_chain_txn(txn, gid, after, limit=GROUP_CHAIN_PAGE):
    """The encoded ops of group C{gid} after version C{after}, in order, at most C{limit}."""
    return [bytes(r[0]) for r in txn.execute("SELECT op FROM group_ops WHERE gid = ? AND seq > ? ORDER BY seq LIMIT ?",
                                             (gid, after, limit)).fetchall()]


def check_group_name_txn(txn, gid, name):
    """L{GroupExists} if a group other than C{gid} that still has members is called C{name}."""
    row = txn.execute("SELECT gid FROM groups WHERE name = ? AND members > 0 AND gid != ?", (name, gid)).fetchone()
    if row is not None:
        raise GroupExists("The group name #%s is taken on this server; choose another." % name)


def check_group_users_txn(txn, members, max_groups, actor=None, by_one=None):
    """
    The users an op makes members (C{(user, fingerprint)} pairs; the creator too, for a create) exist, have those
    identity keys now, and are each in fewer than C{max_groups} groups: else L{UnknownUser}, L{BadRequest} or
    L{QuotaExceeded}, naming them all.  With C{actor} and C{by_one}, each user but the C{actor} must also be in
    fewer than C{by_one} groups that the C{actor} put them in (L{Limits.max_groups_by_one}), else L{QuotaExceeded}:
    an add needs no consent, and one user must not fill another's C{max_groups}.
    """
    names = [user for user, _ in members]
    keys, counts = {}, collections.Counter()
    for part in _in_pages(names):
        keys.update((name, bytes(fp)) for name, fp in txn.execute(
            "SELECT name, fingerprint FROM users WHERE name IN (%s)" % _marks(part), part))
        counts.update(dict(txn.execute("SELECT user, COUNT(*) FROM group_members WHERE user IN (%s) GROUP BY user"
                                       % _marks(part), part).fetchall()))
    unknown = [user for user in names if user not in keys]
    if unknown:
        raise UnknownUser("No such user: %s." % ", ".join(unknown))
    stale = [user for user, fp in members if not hmac.compare_digest(keys[user], bytes(fp))]
    if stale:
        raise BadRequest("The operation names a key of %s that is not the current one; fetch it again and make the"
                         " operation anew." % ", ".join(stale))
    if actor is not None and by_one is not None:
        others, placed = [user for user in names if user != actor], collections.Counter()
        for part in _in_pages(others):
            placed.update(dict(txn.execute(
                "SELECT user, COUNT(*) FROM group_members WHERE user IN (%s) AND added_by = ? GROUP BY user"
                % _marks(part), (*part, actor)).fetchall()))
        over = [user for user in others if placed[user] >= by_one]
        if over:
            raise QuotaExceeded("You have put %s in %d groups already, the most one user may put another in (of the"
                                " %d groups a user may be in)." % (", ".join(over), by_one, max_groups))
    full = [user for user in names if counts[user] >= max_groups]
    if full:
        raise QuotaExceeded("%s %s in %d group%s already, the most a user may be in." % (
            ", ".join(full), "is" if len(full) == 1 else "are", max_groups, "" if max_groups == 1 else "s"))


def _group_departed_txn(txn, gid, users, reason, now):
    """
    Settle every delivery of group C{gid}'s messages still waiting for C{users} as C{rejected} with C{reason} (a
    format taking the user's name): they left the group before receiving them.  A departing user's own messages,
    waiting for their other devices, stay: they were sealed while the user was a member, and the user's devices
    should read the same conversation.  Returns C{(sender, Receipt)} pairs.
    """
    receipts = []
    for user in users:
        msg_ids = [bytes(r[0]) for r in txn.execute(
            "SELECT DISTINCT m.msg_id FROM deliveries d JOIN messages m ON m.seq = d.seq WHERE d.recipient = ?1"
            " AND m.gid = ?2 AND m.sender != ?1", (user, gid)).fetchall()]
        if msg_ids:
            receipts += settle_txn(txn, user, msg_ids, "rejected", reason % user, now)[0]
    return receipts


def _group_forget_former_txn(txn, users):
    """
    Keep the C{MAX_FORMER_GROUPS} latest groups each of C{users} left; a group without members that nobody may
    read any more is deleted with its chain.
    """
    forgotten = set()
    for user in users:
        rows = txn.execute("DELETE FROM former_members WHERE rowid IN (SELECT rowid FROM former_members WHERE"
                           " user = ? ORDER BY rowid DESC LIMIT -1 OFFSET ?) RETURNING gid",
                           (user, MAX_FORMER_GROUPS)).fetchall()
        forgotten.update(bytes(r[0]) for r in rows)
    for gid in forgotten:
        if txn.execute("SELECT 1 FROM groups WHERE gid = ?1 AND members = 0 AND NOT EXISTS (SELECT 1 FROM"
                       " former_members WHERE gid = ?1)", (gid,)).fetchone() is not None:
            txn.execute("DELETE FROM group_ops WHERE gid = ?", (gid,))
            txn.execute("DELETE FROM groups WHERE gid = ?", (gid,))


def add_group_op_txn(txn, gid, seq, prev, head, raw, signature, signer, actor, actor_fp, name, added, departed,
                     reason, members, now, limits):
    """
    Store op C{seq} of group C{gid} (C{raw}, its C{signature} and the C{signer}'s PEM), which the server has
    checked against the group's state: it must still extend the stored head (C{prev} at version C{seq} - 1), else
    L{GroupChanged}; a create (C{seq} 1) needs an unused id, else L{GroupExists}.  C{name} and C{members} (a
    count) are the group's after the op; C{added} the C{(user, fingerprint)} pairs it makes members (checked
    again, L{check_group_users_txn}), C{departed} the users it removes (or who leave): their pending deliveries of
    the group's messages are settled as rejected with C{reason} (see L{_group_departed_txn}), and they become
    former members, who may still read the chain up to this op.  The C{actor} must still have the identity key
    C{actor_fp}.  An op that takes nobody out must fit the database's budget (L{StorageFull}, as a message).
    Returns the receipts made, as C{(sender, Receipt)} pairs.
    """
    _check_session_key_txn(txn, actor, actor_fp)
    row = _group_row_txn(txn, gid)
    if seq == 1:
        if row is not None:
            raise GroupExists("A group with that id exists already; make the group with a new id.")
        txn.execute("INSERT INTO groups (gid, name, seq, head, members, created_at) VALUES (?, ?, 0, ?, 0, ?)",
                    (gid, name, bytes(32), now))
    elif row is None or row[3] == 0:
        raise UnknownGroup()
    elif (row[1], row[2]) != (seq - 1, prev):
        raise GroupChanged("#%s changed meanwhile: its version is now %d; fetch it and make the operation anew."
                           % (row[0], row[1]), row[1], row[2])
    if row is None or name != row[0]:
        check_group_name_txn(txn, gid, name)
    if added:
        check_group_users_txn(txn, added, limits.max_groups, actor, limits.max_groups_by_one)
    if not departed:  # a leave or a remove still lands on a full server: it frees what waited for them
        _check_budget_txn(txn, len(raw) + len(signature) + len(signer), limits)
    txn.execute("INSERT INTO group_ops (gid, seq, op, signature, signer, at) VALUES (?, ?, ?, ?, ?, ?)",
                (gid, seq, raw, signature, signer, now))
    txn.executemany("INSERT INTO group_members (gid, user, since, added_by) VALUES (?, ?, ?, ?)",
                    [(gid, user, seq, actor) for user, _ in added])
    txn.executemany("DELETE FROM former_members WHERE user = ? AND gid = ?", [(user, gid) for user, _ in added])
    receipts = []
    if departed:
        txn.executemany("DELETE FROM group_members WHERE gid = ? AND user = ?", [(gid, user) for user in departed])
        txn.executemany("INSERT OR REPLACE INTO former_members (user, gid, seq, head, name, at) VALUES"
                        " (?, ?, ?, ?, ?, ?)", [(user, gid, seq, head, name, now) for user in departed])
        receipts = _group_departed_txn(txn, gid, departed, reason, now)
    txn.execute("UPDATE groups SET name = ?, seq = ?, head = ?, members = ? WHERE gid = ?",
                (name, seq, head, members, gid))
    if departed:
        _group_forget_former_txn(txn, departed)
    return receipts


def _check_group_op_txn(txn, gid, name, members, max_groups, actor=None, by_one=None):
    if name is not None:
        check_group_name_txn(txn, gid, name)
    if members:
        check_group_users_txn(txn, members, max_groups, actor, by_one)


def _check_group_head_txn(txn, gid, head):
    """A group message sealed for version C{head} of group C{gid}: L{GroupChanged} unless that is the stored head."""
    row = _group_row_txn(txn, gid)
    if row is None or row[3] == 0:
        raise UnknownGroup()
    if row[2] != head:
        raise GroupChanged("#%s changed since the message was sealed: its version is now %d; seal it anew."
                           % (row[0], row[1]), row[1], row[2])


def groups_txn(txn, user):
    """
    C{user}'s groups: C{(gid, name, seq, head, member)}, first those it is a member of (by name), then up to
    C{MAX_FORMER_GROUPS} it left or was removed from (the latest first), with the version that ended it.
    """
    current = [(bytes(g), n, s, bytes(h), True) for g, n, s, h in txn.execute(
        "SELECT g.gid, g.name, g.seq, g.head FROM group_members m JOIN groups g ON g.gid = m.gid WHERE m.user = ?"
        " ORDER BY g.name", (user,)).fetchall()]
    former = [(bytes(g), n, s, bytes(h), False) for g, n, s, h in txn.execute(
        "SELECT gid, name, seq, head FROM former_members WHERE user = ? ORDER BY rowid DESC LIMIT ?",
        (user, MAX_FORMER_GROUPS)).fetchall()]
    return current + former


def group_ops_txn(txn, gid, user, after, max_line, user_fp=None):
    """
    What C{user} may read of group C{gid}'s chain after version C{after}: C{(ops, seq, head, members, more)}, the
    ops as C{(seq, op, signature, signer PEM)} in order, as many as fit half of C{max_line} in a frame (at least
    one).  A member reads the whole chain, and gets the current member list; a former member reads up to the op that
    ended its membership (C{seq} and C{head} are that op's, C{members} None); anyone else gets L{UnknownGroup}.
    With C{user_fp}, see L{_check_session_key_txn}.
    """
    _check_session_key_txn(txn, user, user_fp)
    row = _group_row_txn(txn, gid)
    if row is None:
        raise UnknownGroup()
    members = None
    if txn.execute("SELECT 1 FROM group_members WHERE gid = ? AND user = ?", (gid, user)).fetchone() is not None:
        seq, head = row[1], row[2]
        members = [r[0] for r in txn.execute("SELECT user FROM group_members WHERE gid = ? ORDER BY user",
                                             (gid,)).fetchall()]
    else:
        former = txn.execute("SELECT seq, head FROM former_members WHERE user = ? AND gid = ?", (user, gid)).fetchone()
        if former is None:
            raise UnknownGroup()
        seq, head = former[0], bytes(former[1])
    budget = min(max_line // 2, max_line - FRAME_MARGIN - sum(len(name) + 3 for name in members or ()))
    ops, used = [], 0
    for op_seq, op, signature, signer in txn.execute(
            "SELECT seq, op, signature, signer FROM group_ops WHERE gid = ? AND seq > ? AND seq <= ? ORDER BY seq",
            (gid, after, seq)):
        used += (len(op) + 2) // 3 * 4 + (len(signature) + 2) // 3 * 4 + len(signer) + 64  # its JSON, roughly
        if used > budget and ops:
            break
        ops.append((op_seq, bytes(op), bytes(signature), signer))
    more = bool(ops) and ops[-1][0] < seq
    return ops, seq, head, members, more


class _SyncTransaction:
    """A plain connection's cursor as the C{txn} of a C{*_txn} function (the admin commands run them so)."""

    def __init__(self, conn):
        self._cursor = conn.cursor()

    def __getattr__(self, name):
        return getattr(self._cursor, name)

    def executescript(self, script):
        for statement in script.split(";"):
            if statement.strip():
                self._cursor.execute(statement)


class _StoreCursor(sqlite3.Cursor):
    """A cursor that can keep a batch's measures (L{_check_budget_txn}): the C{txn} of a batch's operations."""


class _StoreConnection(sqlite3.Connection):
    """The server's connection: its cursors are L{_StoreCursor}s."""

    def cursor(self, factory=None):
        return super().cursor(factory or _StoreCursor)


def _batch_connection(conn, operations):
    """L{_batch_txn} on a cursor of its own: the batch needs none of adbapi's per-call transaction wrapping."""
    return _batch_txn(conn.cursor(), operations)


def _prepare_server_connection(conn):
    prepare_connection(conn)
    conn.isolation_level = None  # transactions are begun and committed explicitly, by _batch_txn


def _batch_txn(txn, operations):
    """
    Run many store operations in one transaction (group commit); the whole batch becomes durable with the single
    COMMIT at the end.  Returns one C{(succeeded, result or exception)} per operation.  The batch is first tried
    as it is; if any operation fails, it is rolled back and run again with each operation under its own
    savepoint, so the one that failed is undone alone.  (Operations are pure functions of their arguments and the
    database, so running one twice is safe.)  Operations may keep a measure for the whole batch on C{txn} (the
    database's size, L{_check_budget_txn}); each pass starts it afresh.
    """
    txn.execute("BEGIN IMMEDIATE")
    txn.budget_used = None  # see _check_budget_txn
    try:
        results = [(True, fn(txn, *args)) for fn, args in operations]
    except Exception:
        txn.execute("ROLLBACK")
    else:
        txn.execute("COMMIT")
        return results
    txn.execute("BEGIN IMMEDIATE")
    txn.budget_used = None
    results = []
    for fn, args in operations:
        txn.execute("SAVEPOINT op")
        try:
            result = fn(txn, *args)
        except Exception as e:
            txn.execute("ROLLBACK TO op")
            txn.execute("RELEASE op")
            results.append((False, e))
        else:
            txn.execute("RELEASE op")
            results.append((True, result))
    txn.execute("COMMIT")
    return results


class Store:
    """
    The server's database: users, devices, pending messages and receipts, groups.  Every method returns a Deferred that fires once
    its transaction has committed.  Operations run in the order they were asked for, on the pool's single thread;
    those that arrive while a transaction is in flight are committed together in the next one, so the cost of
    an fsync is shared by every message accepted in the meantime.
    """

    MAX_BATCH = 1000
    log = Logger()

    def __init__(self, path, reactor=None, pool=None):
        if pool is not None:
            # A stand-in pool (the tests' runs each interaction at once): each operation commits on its own.
            self.pool = pool
        else:
            if path != ":memory:" and not os.path.exists(path):
                create_private_file(path)  # 0600 whatever the umask; SQLite gives its -wal and -shm the same mode
            kwargs = {"cp_reactor": reactor} if reactor is not None else {}
            self.pool = adbapi.ConnectionPool(
                "sqlite3", path, cp_min=1, cp_max=1, check_same_thread=False, factory=_StoreConnection,
                cp_openfun=_prepare_server_connection, **kwargs)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.synchronous = pool is not None
        self.path = path
        self._queue = collections.deque()
        self._in_flight = False
        self._flush_call = None  # the flush due once the places filled in this turn of the reactor are all filled

    def _run(self, fn, *args):
        if self.synchronous:
            return self.pool.runInteraction(fn, *args)
        d = Deferred()
        self.submit(fn, args, d.callback, d.errback)
        return d

    def submit(self, fn, args, done, failed):
        """
        L{_run} without a Deferred, for the hot path: once the batch holding C{fn(txn, *args)} has committed,
        C{done(result)} is called, or C{failed(exception)} if it raised (its work undone, the batch's kept).
        """
        if self.synchronous:
            self.pool.runInteraction(fn, *args).addCallbacks(done, lambda failure: failed(failure.value))
            return
        self._queue.append((fn, args, done, failed))
        if not self._in_flight:
            self._flush()

    def reserve(self):
        """
        A place in the queue for an operation not known yet, which L{fill} gives: the operations submitted after it
        wait for it, so that the store still runs them in the order they were asked for.
        """
        place = [None, None, None, None]
        if not self.synchronous:
            self._queue.append(place)
        return place

    def fill(self, place, fn, args, done, failed):
        """
        L{submit} C{fn} in the C{place} L{reserve} kept for it.  Places are often filled several in a row (the
        signature checks answered by one read): an idle store starts its next batch once the reactor's turn is
        over, with all of them, not with the first alone.
        """
        if self.synchronous:
            self.submit(fn, args, done, failed)
            return
        place[:] = fn, args, done, failed
        if not self._in_flight and self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._filled)

    def _filled(self):
        self._flush_call = None
        if not self._in_flight:
            self._flush()

    def _flush(self):
        queue = self._queue
        batch = []
        while queue and len(batch) < self.MAX_BATCH and queue[0][0] is not None:  # up to a place still reserved
            batch.append(queue.popleft())
        if not batch:
            self._in_flight = False
            return
        self._in_flight = True
        committed = self.pool.runWithConnection(_batch_connection, [(fn, args) for fn, args, _, _ in batch])
        committed.addCallbacks(self._committed, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _committed(self, results, batch):
        self._flush()  # the next batch starts before this one's callbacks run
        for (_, _, done, failed), (succeeded, value) in zip(batch, results):
            self._tell(done if succeeded else failed, value)

    def _failed(self, failure, batch):
        # The transaction itself failed (say the disk is full at COMMIT): nothing in it was committed.
        self._flush()
        for _, _, _, failed in batch:
            self._tell(failed, failure.value)

    def _tell(self, callback, value):
        """One operation's outcome to its callback; one that fails is logged, and the batch's others still run."""
        try:
            callback(value)
        except Exception:
            self.log.failure("Handling a stored operation's outcome failed")

    def open(self):
        """
        Create, check or migrate the schema; fires with the server id.  Runs alone: executescript commits by
        itself.  A database without incremental auto-vacuum gets it here, once.
        """
        return Deferred.fromCoroutine(self._open())

    async def _open(self):
        server_id = await self.pool.runInteraction(create_schema_txn)
        await self.pool.runWithConnection(enable_auto_vacuum)
        return server_id

    def close(self):
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        self.pool.close()

    def add_user(self, name, pem, fp, salt, token_hash, now, invite=None, device=None):
        return self._run(add_user_txn, name, pem, fp, salt, token_hash, now, invite, device)

    def create_invites(self, count, now):
        return self._run(create_invites_txn, count, now)

    def get_user(self, name):
        return self._run(get_user_txn, name)

    def user_names(self):
        return self._run(user_names_txn)

    def user_page(self, after, limit):
        return self._run(user_page_txn, after, limit)

    def set_key(self, name, pem, fp, now, recovered=False):
        return self._run(set_key_txn, name, pem, fp, now, recovered)

    def set_token(self, name, salt, token_hash):
        return self._run(set_token_txn, name, salt, token_hash)

    def begin_upload(self, msg_id, sender, header, size, recipients, limits, sender_fp=None):
        return self._run(begin_upload_txn, msg_id, sender, header, size, recipients, limits, sender_fp)

    def add_chunks(self, seq, start, chunks):
        return self._run(upload_chunks_txn, seq, start, chunks)

    def abort_upload(self, seq):
        return self._run(abort_upload_txn, seq)

    def accept_message(self, msg_id, sender, header, signature, size, chunks, recipients, now, limits, seq=None,
                       check=None, sender_fp=None, targets=None, group=None, tail=None):
        return self._run(accept_message_txn, msg_id, sender, header, signature, size, chunks, recipients, now,
                         limits, seq, check, sender_fp, targets, group, tail)

    def pending(self, user, after_seq, limit=100, inline_bytes=256 * 1024, user_fp=None, device=None):
        return self._run(pending_txn, user, after_seq, limit, inline_bytes, PENDING_PAGE_BYTES, user_fp, device)

    def pending_pushes(self, user, after_seq, limit, inline_bytes, max_line, user_fp=None, device=None):
        return self._run(pending_pushes_txn, user, after_seq, limit, inline_bytes, max_line, user_fp, device)

    def chunks(self, seq, start, count):
        return self._run(chunks_txn, seq, start, count)

    def ack(self, user, msg_id, status, reason, now, user_fp=None, device=None):
        return self._run(ack_txn, user, msg_id, status, reason, now, user_fp, device)

    def pending_receipts(self, user, after_rid, limit=500, user_fp=None):
        return self._run(pending_receipts_txn, user, after_rid, limit, user_fp)

    def ack_receipt(self, user, rid, user_fp=None):
        return self._run(ack_receipt_txn, user, rid, user_fp)

    def ack_many(self, user, msg_ids, rids, now, user_fp=None, device=None):
        return self._run(ack_many_txn, user, msg_ids, rids, now, user_fp, device)

    def ack_upto(self, user, device, upto, rids, now, user_fp=None):
        return self._run(ack_upto_txn, user, device, upto, rids, now, user_fp)

    def devices(self, user):
        return self._run(devices_txn, user)

    def device_status(self, user, device_id):
        return self._run(device_status_txn, user, device_id)

    def certify_device(self, user, device_id, name, created, certificate, user_fp=None):
        return self._run(certify_device_txn, user, device_id, name, created, certificate, user_fp)

    def add_device(self, user, device_id, pem, name, created, certificate, now, max_devices, user_fp=None):
        return self._run(add_device_txn, user, device_id, pem, name, created, certificate, now, max_devices, user_fp)

    def revoke_device(self, user, device_id, revoked_at, revocation, user_fp=None, now=None):
        return self._run(revoke_device_txn, user, device_id, revoked_at, revocation, user_fp, now)

    def forget_revoked(self, older_than):
        return self._run(forget_revoked_txn, older_than)

    def login_record(self, user, device_id):
        return self._run(login_record_txn, user, device_id)

    def set_last_seen(self, user, device_id, at):
        return self._run(set_last_seen_txn, user, device_id, at)

    def publish_prekeys(self, user, device_id, signed, one_time, max_pool, user_fp=None, replace=False):
        return self._run(publish_prekeys_txn, user, device_id, signed, one_time, max_pool, user_fp, replace)

    def bundle(self, users, requester, requester_device, one_time=None):
        return self._run(bundle_txn, users, requester, requester_device, one_time)

    def trim_receipts(self, user, keep):
        return self._run(trim_receipts_txn, user, keep)

    def expire(self, now):
        return self._run(expire_txn, now)

    def free_pages(self):
        return self._run(free_pages_txn)

    def expire_receipts(self, older_than):
        return self._run(expire_receipts_txn, older_than)

    def account_keys(self, names):
        return self._run(account_keys_txn, names)

    def vacuum_step(self, pages):
        return self._run(vacuum_step_txn, pages)

    def group_access(self, gid, user):
        return self._run(group_access_txn, gid, user)

    def group_chain(self, gid, after, limit=GROUP_CHAIN_PAGE):
        return self._run(group_chain_txn, gid, after, limit)

    def check_group_op(self, gid, name, members, max_groups, actor=None, by_one=None):
        """The checks of L{add_group_op_txn} that come before the signature's: the name, the users it adds."""
        return self._run(_check_group_op_txn, gid, name, members, max_groups, actor, by_one)

    def add_group_op(self, gid, seq, prev, head, raw, signature, signer, actor, actor_fp, name, added, departed,
                     reason, members, now, limits):
        return self._run(add_group_op_txn, gid, seq, prev, head, raw, signature, signer, actor, actor_fp, name,
                         added, departed, reason, members, now, limits)

    def groups(self, user):
        return self._run(groups_txn, user)

    def group_ops(self, gid, user, after, max_line, user_fp=None):
        return self._run(group_ops_txn, gid, user, after, max_line, user_fp)

    def checkpoint(self):
        return self.pool.runWithConnection(checkpoint)


def _admin_connect(path):
    if not os.path.exists(path):
        raise StoreError("There is no database at %s (give the server's with --db)." % path)
    try:
        conn = sqlite3.connect("file:%s?mode=rw" % path, uri=True, isolation_level=None)
        prepare_connection(conn)
    except sqlite3.Error as e:
        raise StoreError("Cannot open the database %s: %s." % (path, e))
    return conn


def _admin_txn(conn, fn, *args):
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(_SyncTransaction(conn), *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def admin_users_txn(txn):
    return txn.execute("SELECT name, registered_at, key_set_at, recovered_at, pending_count, pending_bytes,"
                       " fingerprint FROM users ORDER BY name").fetchall()


def delete_user_txn(txn, name):
    """
    Delete the account C{name} and everything pending that belongs to it, so that nothing of it reaches whoever
    registers the name next: the deliveries waiting for it, its stored receipts, the messages it sent that are
    still pending for others (no receipt could reach it any more), and every open upload from it or to it.
    Returns how many deliveries for C{name} were dropped.
    """
    if txn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
        raise UnknownUser("No such user: %s." % name)
    for (seq,) in txn.execute(
            "SELECT seq FROM messages WHERE accepted_at IS NULL AND (sender = ?1 OR instr(',' || reserved || ',',"
            " ',' || ?1 || ',') > 0)", (name,)).fetchall():
        abort_upload_txn(txn, seq)
    seqs = [r[0] for r in txn.execute("SELECT DISTINCT seq FROM deliveries WHERE recipient = ?", (name,)).fetchall()]
    txn.execute("DELETE FROM deliveries WHERE recipient = ?", (name,))
    _drop_messages_txn(txn, seqs)
    sent = txn.execute("SELECT DISTINCT d.recipient, d.ord, m.size FROM messages m JOIN deliveries d"
                       " ON d.seq = m.seq WHERE m.sender = ?", (name,)).fetchall()
    txn.executemany("DELETE FROM deliveries WHERE recipient = ? AND ord = ?", [(r, o) for r, o, _ in sent])
    txn.executemany("UPDATE users SET pending_count = MAX(0, pending_count - 1), pending_bytes = MAX(0,"
                    " pending_bytes - ?) WHERE name = ?", [(size, r) for r, _, size in sent])
    txn.execute("DELETE FROM chunks WHERE seq IN (SELECT seq FROM messages WHERE sender = ?)", (name,))
    txn.execute("DELETE FROM messages WHERE sender = ?", (name,))
    txn.execute("DELETE FROM receipts WHERE user = ?", (name,))
    for table in ("devices", "signed_prekeys", "one_time_prekeys"):
        txn.execute("DELETE FROM %s WHERE user = ?" % table, (name,))
    txn.execute("DELETE FROM users WHERE name = ?", (name,))
    return len(seqs)


def stats_txn(txn):
    one = lambda sql: txn.execute(sql).fetchone()[0]  # noqa: E731
    return {
        "users": one("SELECT COUNT(*) FROM users"),
        "pending_deliveries": one("SELECT COUNT(*) FROM deliveries"),
        "pending_messages": one("SELECT COUNT(*) FROM messages WHERE accepted_at IS NOT NULL"),
        "pending_bytes": one("SELECT COALESCE(SUM(pending_bytes), 0) FROM users"),
        "stored_receipts": one("SELECT COUNT(*) FROM receipts"),
        "unused_invites": one("SELECT COUNT(*) FROM invites WHERE used_by IS NULL"),
        "open_uploads": one("SELECT COUNT(*) FROM messages WHERE accepted_at IS NULL"),
        "open_upload_bytes": one("SELECT COALESCE(SUM(size), 0) FROM messages WHERE accepted_at IS NULL"),
        "free_bytes": one("SELECT (SELECT freelist_count FROM pragma_freelist_count())"
                          " * (SELECT page_size FROM pragma_page_size())"),
    }


def _create_backup_file(path):
    """
    Create the empty file a backup goes to, mode 0600 from the start: a new file only (never an existing one, nor
    the target of a symbolic link), so the copy is never readable by others, not even for a moment.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise usage.UsageError("%s exists; choose a new file for the backup." % path)
    except OSError as e:
        raise StoreError("Cannot create the backup %s: %s." % (path, e.strerror))
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
    finally:
        os.close(fd)


#### Server ####

def _is_local(address):
    """Whether a peer address is on this machine (loopback IP or a UNIX socket)."""
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) is not None or address.__class__.__name__ == "UNIXAddress"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Feed:
    """
    One session's ordered feed of pending items (messages, or receipts): live items are pushed at once while the
    feed is caught up and the peer keeps reading; otherwise the feed drains from the store in pages, in key order,
    never pushing an item twice and never holding more than a page in memory.  Items that are push lines (bytes)
    and come one after another in a page are pushed together, up to C{WRITE_BYTES} at a time: the transport's work
    per write is then paid once for dozens of messages.
    """

    WRITE_BYTES = 65536  # the transport's own buffer size, past which it pauses us

    def __init__(self, fetch, push, flow, log):
        self._fetch = fetch  # after_key -> Deferred[list of items], oldest first
        self._push = push  # item -> None or awaitable
        self._flow = flow
        self._log = log
        self.cursor = 0
        self.draining = False
        self._more = False
        self.closed = False

    def offer(self, key, item):
        """A new item was committed; C{item} is None when it must be read back from the store."""
        if key <= self.cursor or self.closed:
            return
        flow = self._flow
        if self.draining or item is None or flow.paused and flow.unread >= flow.slack:
            self.start()
            return
        self.cursor = key
        result = self._push(item)
        if result is not None:  # it streams: later items wait for it, through the drain
            self.draining = True
            result.addErrback(lambda f: self._log.failure("Streaming a message failed", f))
            result.addBoth(self._streamed)

    def _streamed(self, _):
        self.draining = False
        if self._more:
            self.start()

    def start(self):
        self._more = True
        if not self.draining and not self.closed:
            self.draining = True
            Deferred.fromCoroutine(self._drain()).addErrback(
                lambda f: self._log.failure("Draining a feed failed", f))

    async def _drain(self):
        try:
            while not self.closed:
                self._more = False
                items = await self._fetch(self.cursor)
                if not items:
                    if self._more:
                        continue
                    return
                lines, held = [], 0  # consecutive push lines of the page, to be pushed as one
                for index, (key, item) in enumerate(items):
                    if key <= self.cursor:
                        continue
                    if item.__class__ is bytes:
                        lines.append(item)
                        held += len(item)
                        if (held < self.WRITE_BYTES and index + 1 < len(items)
                                and items[index + 1][1].__class__ is bytes):
                            continue
                        item, lines, held = b"".join(lines), [], 0
                    if self._flow.paused:
                        await self._flow.wait()
                    if self.closed:
                        return
                    result = self._push(item)
                    if result is not None:
                        await result
                    self.cursor = key
        finally:
            self.draining = False


class _Recent:
    """The last C{size} distinct items added, with a membership test that does not scan them."""

    def __init__(self, size):
        self.size = size
        self._items = {}  # insertion-ordered: the oldest first

    def add(self, item):
        self._items.pop(item, None)
        self._items[item] = None
        if len(self._items) > self.size:
            del self._items[next(iter(self._items))]

    def __contains__(self, item):
        return item in self._items

    def __len__(self):
        return len(self._items)


@dataclasses.dataclass
class _Upload:
    """
    A multi-frame upload in progress on one connection.  It holds one of its user's C{max_open_uploads} places
    from before it begins in the store until L{PagerServerProtocol._end_upload}, and C{timer} drops it when no
    chunk frame comes for C{upload_idle_timeout} seconds.
    """

    rid: object
    verifier: EnvelopeVerifier
    recipients: list
    declared_size: int
    seq: int = None  # None until the store has begun it
    duplicate: bool = False
    accepted_at: float = None  # of the message already accepted, for a duplicate
    count: int = 0
    timer: object = None
    ended: bool = False


ANSWERED_LATER = object()  # what a request handler returns when its store callbacks write the answer


@dataclasses.dataclass
class _SendRequest:
    """A C{send} frame's fields, checked (L{PagerServerProtocol._read_send})."""

    group: bytes  # a group message's group id, or None
    to: list  # the user names of a 1:1 message, or None
    receipt: bool  # the sender wants receipts
    size: int
    header: bytes
    chunks: list
    signature: bytes  # None: chunk frames follow
    verifier: EnvelopeVerifier


class PagerServerProtocol(LineReceiver, TimeoutMixin):
    """
    One client connection: unauthenticated, then logged in as one user, then closed.  Each request type has a
    C{handle_<type>} coroutine that returns the fields of its C{ok} answer (or None for no answer yet) or raises a
    L{PagerError}, which becomes an C{error} frame in L{_answer}.  On the hot path (a message in one frame, a
    cumulative ack) the handler is a plain function that hands the request to the store's next batch with
    callbacks, which answer through L{_answer} or L{_answer_error}; it returns L{ANSWERED_LATER}.
    """

    delimiter = b"\n"
    log = Logger()
    PUBLIC = frozenset(["register", "login", "rekey", "recover", "ping", "exists", "link_request"])
    PAGE = 1000  # pending messages read from the store at a time (at most PENDING_PAGE_BYTES of their chunks)
    AUTH = frozenset(["register", "login", "rekey", "recover", "change_token"])

    def __init__(self):
        self.user = None
        self.key = None
        self.receive = False
        self.challenge = None
        self._authenticating = False  # an authentication request is being answered: one at a time per connection
        self._challenge_taken = False  # ... and it took the challenge, so its answer carries the next one
        self.closed = False  # nothing more is read or written
        self._abort = None  # the call that aborts the connection once a close's grace is over
        self._lost = False
        self._in_flight = 0
        self._holds = set()
        self._upload = None
        self._aborted_upload = None
        # While the peer does not read what we write, we stop reading what it sends: answers cannot pile up.
        self.flow = _Flow(self._output_paused, lambda: self._release("output"))
        self._lines_seen = False
        self.messages = self.receipts = None
        self._seen_data = False
        self.sent = _Recent(1024)  # a send-only session's recent message ids: it gets their receipts
        self.device = None  # the logged-in device's id (16 bytes)
        self.link = None  # the link request this unauthenticated connection waits on, if any

    # -- connection --

    def connectionMade(self):
        factory = self.factory
        self.limits = factory.limits
        self.callLater = factory.reactor.callLater
        self.MAX_LENGTH = self.limits.max_line_unauthenticated
        self.flow.slack = self.limits.max_unread_output // 4  # live pushes while the transport's buffer is full
        self.peer = self.transport.getPeer()
        _set_nodelay(self.transport)
        self.transport.registerProducer(self.flow, True)
        self.setTimeout(self.limits.login_timeout)
        self.challenge = secrets.token_bytes(CHALLENGE_SIZE)
        # Failed authentication attempts on this connection, counted like an address's (which a UNIX socket lacks).
        self.auth_failures = _Throttle(self.limits.address_free_failures, self.limits.address_max_delay, size=1)
        factory.connections += 1
        factory.protocols.add(self)
        if not factory.address_connected(self):
            self.send_error(None, RateLimited("Too many connections from your address (limit %d)."
                                              % self.limits.max_connections_per_address))
            self.close()
            return
        self.send_frame({
            "type": "hello", "protocol": PROTOCOL_VERSION, "server": SOFTWARE, "server_id": factory.server_id,
            "challenge": b64(self.challenge), "limits": self.limits.public(),
        })

    def connectionLost(self, reason):
        self.closed = self._lost = True
        self.setTimeout(None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self.factory.connections -= 1
        self.factory.address_disconnected(self)
        for feed in (self.messages, self.receipts):
            if feed is not None:
                feed.closed = True
        self.flow.stopProducing()
        self.factory.link_dropped(self)
        if self.user is not None:
            self.factory.session_ended(self)
            self.factory.store.set_last_seen(self.user, self.device, self.factory.now()).addErrback(
                lambda f: self.log.failure("Storing a device's last use failed", f))
            self.log.info("{user} disconnected", user=self.user)
        upload, self._upload = self._upload, None
        if upload is not None:
            self._end_upload(upload, abort=True)
        self.factory.connection_closed(self)

    def account_gone(self, message="This account was deleted, or its key replaced, by the server's operator."):
        """The account was deleted, or given another key: this session, logged in with the old one, ends."""
        if self.closed:
            return
        self.log.info("Closing a session of {user}: the account was deleted or its key replaced", user=self.user)
        self.send_error(None, AuthFailed(message))
        self.close()

    def timeoutConnection(self):
        self.send_error(None, IdleTimeout(
            "Closing the connection: no login within %d seconds." % self.limits.login_timeout if self.user is None
            else "Closing the connection: idle for %d seconds." % self.limits.idle_timeout))
        self.close()

    def close(self):
        """
        Close the connection: what was written still reaches a peer that reads it within C{close_grace} seconds;
        then the connection is aborted, read or not.  Every close the server starts comes here.
        """
        self.closed = True
        if self._abort is None and not self._lost:
            self.setTimeout(None)
            self._abort = self.callLater(self.limits.close_grace, self.transport.abortConnection)
            _lose(self.transport)

    def lineLengthExceeded(self, line):
        self.send_error(None, TooLarge("The line is longer than the limit of %d bytes." % self.MAX_LENGTH))
        self.close()

    # -- frames --

    def send_frame(self, frame):
        self.send_line(encode_frame(frame) + b"\n")

    def send_line(self, data):
        """Write one encoded frame with its delimiter, counting it while the peer is not reading."""
        if self.closed:
            return
        self.transport.write(data)
        if self.flow.paused:
            self.flow.unread += len(data)
            if self.flow.unread > self.limits.max_unread_output:
                self._cut_off()

    def _cut_off(self):
        """The peer leaves more than C{max_unread_output} bytes unread: write nothing more, and close."""
        self.log.info("Closing the connection from {peer}: it left {n} bytes unread", peer=_peer_text(self.peer),
                      n=self.flow.unread)
        self.closed = True
        error = TooLarge("Closing the connection: more than %d bytes of answers are unread."
                         % self.limits.max_unread_output)
        self.transport.write(encode_frame(_error_frame(None, error)) + b"\n")
        self.close()

    def send_error(self, rid, error, **extra):
        self.send_frame(_error_frame(rid, error, **extra))

    def _output_paused(self):
        # TLS also pauses us while its handshake is under way (our hello waits for it): reading must go on then,
        # or the handshake could never finish.  Answers can only pile up once the peer has sent a request.
        if self._lines_seen:
            self._hold("output")

    def _hold(self, reason):
        """
        Stop reading requests until L{_release}: bounds what one connection can make the server buffer.  While the
        server holds reading for its own reasons (not because the peer stopped reading), an open upload's idle
        clock stands still: the wait is not the client's.
        """
        if not self._holds:
            self.pauseProducing()
        self._holds.add(reason)
        upload = self._upload
        if reason != "output" and upload is not None and upload.timer is not None and upload.timer.active():
            upload.timer.cancel()

    def _release(self, reason):
        self._holds.discard(reason)
        if not self._holds and not self.closed:
            self.resumeProducing()
        upload = self._upload
        if (not self._holds - {"output"} and not self.closed and upload is not None
                and (upload.timer is None or not upload.timer.active())):
            self._await_chunk(upload)  # reading resumes: the upload has its whole idle time again

    def dataReceived(self, data):
        if not self._seen_data:
            self._seen_data = True
            if data[:2] == b"\x16\x03" and not interfaces.ISSLTransport.providedBy(self.transport):
                self.log.info("A TLS client reached the plain port from {peer}", peer=_peer_text(self.peer))
                self.close()  # a TLS handshake on a plain port: the client will explain it to its user
                return
        self._receive_lines(data)

    def _receive_lines(self, data):
        """
        LineReceiver.dataReceived, to the same rules (C{MAX_LENGTH}, C{paused}, a closing transport, data that comes
        while a line is handled), but finding each line in the read where it is: LineReceiver splits the rest of
        its buffer off anew for every line, which copies a read of a hundred lines a hundred times.
        """
        if self._busyReceiving:
            self._buffer += data
            return
        self._busyReceiving = True
        try:
            buffer, self._buffer, start = self._buffer + data, b"", 0
            while not self.paused:
                end = buffer.find(b"\n", start)
                if end < 0:
                    if self._buffer:  # came while a line was handled: it may end a line
                        buffer, self._buffer, start = buffer[start:] + self._buffer, b"", 0
                        continue
                    if len(buffer) - start >= self.MAX_LENGTH + 1:
                        return self.lineLengthExceeded(buffer[start:])
                    break
                line, start = buffer[start:end], end + 1
                if len(line) > self.MAX_LENGTH:
                    exceeded, buffer, start, self._buffer = buffer[end - len(line):] + self._buffer, b"", 0, b""
                    return self.lineLengthExceeded(exceeded)
                why = self.lineReceived(line)
                if why or self.transport and self.transport.disconnecting:
                    self._buffer = buffer[start:] + self._buffer
                    return why
            self._buffer = buffer[start:] + self._buffer
        finally:
            self._busyReceiving = False

    def lineReceived(self, line):
        if self.closed:
            return
        self._lines_seen = True
        if self.user is not None:
            self.resetTimeout()  # before login, nothing extends the login timeout
        if not line.strip():
            return  # blank lines are allowed (clients send one first, which a TLS port rejects at once)
        try:
            frame = decode_frame(line)
        except PagerError as e:
            self.send_error(request_id_of_raw(line), e)
            return
        kind = frame["type"]
        rid = request_id(frame)
        try:
            handler = getattr(self, "handle_" + kind, None)
            if handler is None:
                raise BadRequest("Unknown frame type %r." % kind)
            if rid is None:
                raise BadRequest('A request needs an "id": a string of at most 64 characters or an integer.')
            if self.user is None and kind not in self.PUBLIC:
                raise NotAuthenticated()
            if kind in self.AUTH:
                if self._authenticating:
                    raise BadRequest("Another authentication request is still being answered on this connection; "
                                     "send them one at a time.")
                self._authenticating = True
        except PagerError as e:
            self.send_error(rid, e)  # nothing was taken: no challenge in the answer
            return
        self._in_flight += 1
        if self._in_flight >= self.limits.max_in_flight:
            self._hold("in_flight")
        try:
            answer = handler(frame, rid)  # a coroutine, or (the hot path) ANSWERED_LATER
        except Exception as e:  # refused before it reached the store: answered as if it had come back so
            self._answer_error(e, kind, rid)
            return
        if answer is not ANSWERED_LATER:
            d = Deferred.fromCoroutine(answer)
            d.addCallbacks(self._answer, self._answer_failure, callbackArgs=(kind, rid), errbackArgs=(kind, rid))

    def _answer(self, fields, kind, rid):
        challenge = self._done(kind)
        if fields is not None:
            frame = {"type": "ok", "id": rid}
            frame.update(fields)
            if challenge:
                frame["challenge"] = b64(self.challenge)
            self.send_frame(frame)

    def _answer_failure(self, failure, kind, rid):
        self._answer_error(failure.value, kind, rid, failure)

    def _answer_error(self, error, kind, rid, failure=None):
        challenge = self._done(kind)
        if not isinstance(error, PagerError):
            self.log.failure("Handling a {kind} request failed", failure or Failure(error), kind=kind)
            error = InternalError()
        elif isinstance(error, EnvelopeError):
            error = BadRequest(error.message)
        if challenge:
            self.send_error(rid, error, challenge=b64(self.challenge))
        else:
            self.send_error(rid, error)
        if isinstance(error, KeyReplaced):
            self.close()  # the session's key is not the account's any more: it ends here, as at the account check

    def _done(self, kind):
        """
        A request is answered.  Returns whether it was an authentication request that took the challenge, whose
        answer must then carry the next one.
        """
        self._in_flight -= 1
        if self._in_flight < self.limits.max_in_flight:
            self._release("in_flight")
        if kind not in self.AUTH:
            return False
        taken = self._challenge_taken
        self._authenticating = self._challenge_taken = False
        return taken

    # -- authentication --
    # Each handler first checks every field's format: a malformed request takes nothing and its answer carries no
    # challenge.  Only then does it take the challenge, and look at the account.  A failure that shows only that the
    # requester lacks a key (an unknown user, a proof that does not verify) is charged to the requester: its address
    # and this connection, never the account it names.  A wrong token, which needs the key first, is charged to the
    # requester and to the account at this address (for recover, to the account's recoveries).

    def _take_challenge(self):
        """The challenge to check this request's proof against; a fresh one replaces it, for the answer to carry."""
        challenge, self.challenge = self.challenge, secrets.token_bytes(CHALLENGE_SIZE)
        self._challenge_taken = True
        return challenge

    def _token(self, frame):
        token = field_str(frame, "token", MAX_TOKEN_LENGTH)
        if len(token) < MIN_TOKEN_LENGTH:
            raise BadRequest("A safetoken has at least %d characters." % MIN_TOKEN_LENGTH)
        return token

    def _require_logged_out(self):
        if self.user is not None:
            raise BadRequest("This connection is already logged in as %s." % self.user)

    def _require_same_user(self, user):
        if self.user is not None and self.user != user:
            raise BadRequest("This connection is logged in as %s." % self.user)

    async def _check_proof(self, key, proof, purpose, user, challenge, key_fp, error=None):
        """The proof verifies for this server, or the request fails with C{error}, charged to the requester."""
        if not await self.factory.in_thread(verify_auth, key, proof, purpose, self.factory.server_id, user,
                                            challenge, key_fp):
            self.factory.proof_failed(self, user)
            raise error or AuthFailed("The proof of key possession does not verify.")

    async def _account(self, user, purpose, device=False):
        """
        C{(record, registered key)} of the account a request names.  While the requester (or, for login and rekey,
        this account at this address; for recover, this account's recoveries) is slowed down, the request is refused
        at once, before any work.  An unknown user gets the same answer as a wrong token.  With C{device} (an id, or
        None for the identity device), C{(record, key, device status)}, read in the same step (L{login_record_txn}).
        """
        self.factory.check_throttle(self, user, purpose)
        if device is not False:
            record, status, current = await self.factory.store.login_record(user, device)
            if record is None:
                self.factory.proof_failed(self, user)
                raise AuthFailed()
            self.factory.devices_read(user, current)  # a user who logs in is likely to send, or be sent to, soon
            return record, load_public_key(record.public_key), status
        record = await self.factory.store.get_user(user)
        if record is None:
            self.factory.proof_failed(self, user)
            raise AuthFailed()
        return record, load_public_key(record.public_key)

    async def _check_token(self, token, record, purpose):
        account = ("recover", record.name) if purpose == "recover" else record.name
        digest = await self.factory.hash_token_for(self, account, token, bytes(record.token_salt))
        if not hmac.compare_digest(digest, bytes(record.token_hash)):
            self.factory.token_failed(self, record.name, purpose)
            raise AuthFailed()
        self.factory.token_matched(self, record.name, purpose)

    async def handle_register(self, frame, rid):
        user = field_username(frame)
        key = load_public_key(field_str(frame, "public_key", 16384))
        token = self._token(frame)
        proof = field_b64(frame, "proof", RSA_MAX_BITS // 8)
        invite = field_str(frame, "invite", 128, required=False)
        certificate = self._certificate(frame.get("device"), user, key, "device")
        challenge = self._take_challenge()
        self._require_logged_out()
        policy = self.limits.registration
        if policy == "closed":
            raise Forbidden("This server does not take new users; ask its operator.")
        if policy == "invite" and not invite:
            raise Forbidden("This server needs an invite code to register; ask its operator for one.")
        fp = fingerprint(key)
        store = self.factory.store
        self.factory.check_throttle(self, user, "register")  # a proof that failed before was charged like a login's
        await self._check_proof(key, proof, "register", user, challenge, fp)
        await self.factory.in_thread(certificate.verify, key)
        if await store.get_user(user) is not None:
            raise UserExists("The user name %r is taken." % user)
        salt = secrets.token_bytes(ARGON2_SALT_SIZE)
        token_hash = await self.factory.hash_token_for(self, user, token, salt)
        await store.add_user(user, public_key_pem(key), fp, salt, token_hash, self.factory.now(),
                             invite if policy == "invite" else None,
                             (certificate.name, certificate.created, certificate.signature))
        self.factory.devices_replaced(user, key, certified=True)
        self.log.info("{user} registered from {peer}", user=user, peer=_peer_text(self.peer))
        self._logged_in(user, key, receive=True, device=certificate.device_id, identity_fp=fp)
        return {"user": user, "device": certificate.device_id.hex()}

    async def handle_login(self, frame, rid):
        proof = field_b64(frame, "proof", RSA_MAX_BITS // 8)
        receive = field_bool(frame, "receive", True)
        user = field_username(frame)
        device = _field_device(frame, "device", required=False)
        token = self._token(frame) if device is None or "token" in frame else None
        challenge = self._take_challenge()
        self._require_logged_out()
        record, key, status = await self._account(user, "login", device)
        identity_fp = bytes(record.fingerprint)
        if device is None or device == identity_fp[:DEVICE_ID_SIZE]:
            device = identity_fp[:DEVICE_ID_SIZE]
            if token is None:
                raise _missing("token", "the safetoken (only a linked device logs in without it)")
            # The proof is cheap to check and needs no secret: a failed proof costs the server no Argon2id work.
            await self._check_proof(key, proof, "login", user, challenge, identity_fp, AuthFailed())
            await self._check_token(token, record, "login")
        else:
            # A linked device proves it holds its own key; the safetoken belongs to the identity device.
            if token is not None:
                raise BadRequest("A linked device logs in without the safetoken.")
            if status[0] is None or status[0].revoked_at is not None:
                self.factory.proof_failed(self, user, "%s device %s" % (
                    "unknown" if status[0] is None else "revoked", device.hex()))
                raise AuthFailed()
            key = load_public_key(status[0].public_key)
            await self._check_proof(key, proof, "login", user, challenge, fingerprint(key), AuthFailed())
        record_device, signed, one_time = status
        self.log.info("{user} logged in from {peer} on {which}{mode}", user=user, peer=_peer_text(self.peer),
                      which="the identity device %s" % device.hex() if device == identity_fp[:DEVICE_ID_SIZE] else
                      "the linked device %s %s" % (device_name_text(record_device.name), device.hex()),
                      mode="" if receive else " (send-only)")
        self._logged_in(user, key, receive, device=device, identity_fp=identity_fp)
        return {"user": user, "pending": record.pending_count if receive else 0, "device": device.hex(),
                "certified": record_device is not None and record_device.certificate is not None,
                "prekeys": {"signed_id": signed[0] if signed else None,
                            "signed_valid_until": signed[1] if signed else None, "one_time": one_time}}

    async def handle_rekey(self, frame, rid):
        new_key = load_public_key(field_str(frame, "public_key", 16384))
        proof_old = field_b64(frame, "proof_old", RSA_MAX_BITS // 8)
        proof_new = field_b64(frame, "proof_new", RSA_MAX_BITS // 8)
        user = field_username(frame)
        token = self._token(frame)
        challenge = self._take_challenge()
        self._require_same_user(user)
        record, old_key = await self._account(user, "rekey")
        new_fp = fingerprint(new_key)
        await self._check_proof(old_key, proof_old, "rekey", user, challenge, new_fp, AuthFailed())
        await self._check_proof(new_key, proof_new, "rekey", user, challenge, new_fp)
        self.factory.rekey_started(user)  # only the holder of the current key learns that it must wait
        done = False
        try:
            await self._check_token(token, record, "rekey")
            await self.factory.store.set_key(user, public_key_pem(new_key), new_fp, self.factory.now())
            done = True
        finally:
            self.factory.rekey_ended(user, done)
        self.log.info("{user} replaced their key (new fingerprint {fp})", user=user, fp=new_fp.hex())
        self.factory.key_changed(user, new_key, self)
        return {"user": user, "fingerprint": new_fp.hex()}

    async def handle_recover(self, frame, rid):
        new_key = load_public_key(field_str(frame, "public_key", 16384))
        proof = field_b64(frame, "proof", RSA_MAX_BITS // 8)
        user = field_username(frame)
        token = self._token(frame)
        challenge = self._take_challenge()
        limits = self.limits
        if not limits.allow_recovery:
            raise Forbidden("This server does not allow lost-key recovery; ask its operator.")
        if not (interfaces.ISSLTransport.providedBy(self.transport) or _is_local(self.peer)):
            raise Forbidden("Lost-key recovery needs TLS when not connecting from this machine.")
        self._require_same_user(user)
        record, _ = await self._account(user, "recover")
        now = self.factory.now()
        new_fp = fingerprint(new_key)
        await self._check_proof(new_key, proof, "recover", user, challenge, new_fp)
        await self._check_token(token, record, "recover")
        # Checked after the token, so that nobody else learns whether the account recovered lately.
        if record.recovered_at is not None and now - record.recovered_at < limits.recovery_interval:
            wait = limits.recovery_interval - (now - record.recovered_at)
            raise RateLimited("This account recovered its key in the last %d minutes, the shortest time between two "
                              "recoveries on this server: try again in %d minutes."
                              % (math.ceil(limits.recovery_interval / 60), math.ceil(wait / 60)), retry_after=wait)
        await self.factory.store.set_key(user, public_key_pem(new_key), new_fp, now, recovered=True)
        self.log.warn("{user} recovered their account with the safetoken alone from {peer} (new fingerprint {fp})",
                      user=user, peer=_peer_text(self.peer), fp=new_fp.hex())
        self.factory.key_changed(user, new_key, self)
        return {"user": user, "fingerprint": new_fp.hex()}

    async def handle_exists(self, frame, rid):
        # What register would tell anyone who asks (it answers user_exists before hashing a token), without the key
        # a new user would otherwise make first: a client on a new machine learns whether to register or re-key.
        user = field_username(frame)
        if self.limits.registration == "closed":
            raise Forbidden("This server does not take new users; ask its operator.")
        return {"user": user, "exists": await self.factory.store.get_user(user) is not None}

    async def handle_change_token(self, frame, rid):
        token = self._token(frame)
        new_token = field_str(frame, "new_token", MAX_TOKEN_LENGTH)
        if len(new_token) < MIN_TOKEN_LENGTH:
            raise BadRequest("A safetoken has at least %d characters." % MIN_TOKEN_LENGTH)
        user = self.user
        record, _ = await self._account(user, "login")
        await self._check_token(token, record, "login")
        salt = secrets.token_bytes(ARGON2_SALT_SIZE)
        token_hash = await self.factory.hash_token_for(self, user, new_token, salt)
        await self.factory.store.set_token(user, salt, token_hash)
        self.log.info("{user} changed their safetoken from {peer}", user=user, peer=_peer_text(self.peer))
        return {"user": user}

    def _logged_in(self, user, key, receive, device=None, identity_fp=None):
        """
        The connection is now a session of C{user}'s C{device} (the identity device by default), whose C{key}
        verifies what it signs; C{identity_fp}, the account's identity key when it logged in, is what the account
        must still have for the session to go on.
        """
        self.user, self.key, self.receive = user, key, receive
        self.key_fingerprint = identity_fp or fingerprint(key)
        self.device = device or fingerprint(key)[:DEVICE_ID_SIZE]
        self.factory.link_dropped(self)
        self.MAX_LENGTH = self.limits.max_line
        self.setTimeout(self.limits.idle_timeout)
        store = self.factory.store
        if receive:
            self.messages = _Feed(
                lambda after: self._checked(store.pending_pushes(
                    user, after, self.PAGE, self.factory.inline_bytes, self.limits.max_line, self.key_fingerprint,
                    self.device)),
                self._push_pending, self.flow, self.log)
            self.receipts = _Feed(
                lambda after: self._checked(store.pending_receipts(user, after, user_fp=self.key_fingerprint)
                                            .addCallback(lambda rs: [(r.rid, r) for r in rs])),
                self._push_receipt, self.flow, self.log)
        self.factory.session_started(self)
        if receive:
            self.messages.start()
            self.receipts.start()

    def _checked(self, page):
        """A feed's page, or none when the session's key is not the account's any more: then the session ends."""
        def replaced(failure):
            failure.trap(KeyReplaced)
            self.account_gone()
            return []
        return page.addErrback(replaced)

    # -- directory --

    async def handle_ping(self, frame, rid):
        return {}

    async def handle_users(self, frame, rid):
        after = field_str(frame, "after", 64, required=False)
        if after is not None:
            after = canonical_username(after)
        limit = field_int(frame, "limit", 1, MAX_USERS_PAGE, required=False, default=MAX_USERS_PAGE)
        only_online = field_bool(frame, "online", False)
        online = self.factory.online
        if only_online:
            names = sorted(name for name in online if after is None or name > after)
            count = len(online)
        else:
            names, count = await self.factory.store.user_page(after, limit + 1)
        page = names[:limit]
        return {"registered": page, "online": [name for name in page if name in online], "count": count,
                "online_count": len(online), "next": page[-1] if len(names) > limit else None}

    async def handle_key(self, frame, rid):
        user = field_username(frame)
        record = await self.factory.store.get_user(user)
        if record is None:
            raise UnknownUser("No such user: %s." % user)
        return {"user": user, "public_key": record.public_key, "fingerprint": bytes(record.fingerprint).hex(),
                "key_set_at": record.key_set_at}

    # -- devices --
    # A device's own requests (certify, publish_prekeys) come from its session; those that change the account's
    # devices (link_pending, link_approve, link_decline, revoke_device) only from a session of the identity device,
    # which holds the identity key that signs certificates and revocations: a linked device cannot add or remove
    # devices, and neither can the server, which cannot sign.

    def _certificate(self, obj, user, key, name):
        """The L{DeviceCertificate} of C{key} for C{user} that C{obj} (a frame's C{name} field) carries, unchecked."""
        if not isinstance(obj, dict):
            raise _missing(name, 'an object {"name", "created", "certificate"}: the device\'s certificate')
        fields = {k: obj.get(k) for k in ("name", "created", "certificate")}
        fields.update(id=device_id(key).hex(), public_key=public_key_pem(key))
        return DeviceCertificate.from_json(fields, user)

    @property
    def identity_device(self):
        """Whether this session is of the account's identity device (whose key is the identity key)."""
        return self.device == self.key_fingerprint[:DEVICE_ID_SIZE]

    def _require_identity(self):
        if not self.identity_device:
            raise Forbidden("Only the device that holds the account's identity key can do that.")

    def _device_object(self, record, own=False):
        """The wire's device object for C{record}; C{last_seen} only for the requester's own devices."""
        obj = {
            "id": record.device_id.hex(), "public_key": record.public_key, "name": record.name,
            "created": record.created, "certificate": None if record.certificate is None else b64(record.certificate),
            "revoked": None if record.revoked_at is None else {"at": record.revoked_at,
                                                                "signature": b64(record.revocation)},
            "prekeys": record.prekeys,
        }
        if own:  # a device with a session open is seen now; the store has when its last session closed
            online = any(s.device == record.device_id for s in self.factory.online.get(record.user, ()))
            seen = self.factory.now() if online else record.last_seen
            obj["last_seen"] = None if seen is None else int(seen)  # whole seconds, like created and revoked
        return obj

    async def handle_certify(self, frame, rid):
        self._require_identity()
        certificate = self._certificate(frame, self.user, self.key, "certificate")
        await self.factory.in_thread(certificate.verify, self.key)
        await self.factory.store.certify_device(self.user, self.device, certificate.name, certificate.created,
                                                certificate.signature, self.key_fingerprint)
        self.factory.device_updated(self.user, self.device, certified=True)
        self.factory.devices_changed(self.user, self)
        return {"device": self.device.hex()}

    async def handle_publish_prekeys(self, frame, rid):
        signed = frame.get("signed")
        if signed is not None:
            signed = SignedPrekey.from_json(signed, self.user, self.device)
        one_time = frame.get("one_time", [])
        if not isinstance(one_time, list) or len(one_time) > MAX_PREKEYS_PER_FRAME:
            raise _missing("one_time", "a list of at most %d one-time prekeys" % MAX_PREKEYS_PER_FRAME)
        one_time = [OneTimePrekey.from_json(item) for item in one_time]
        if len({p.prekey_id for p in one_time}) != len(one_time):
            raise BadRequest("The one-time prekeys repeat an id.")
        replace = field_bool(frame, "replace", False)
        if signed is not None:
            now = self.factory.now()
            if signed.valid_until <= now or signed.valid_from > now + PREKEY_SKEW:
                raise BadRequest("The signed prekey is not valid now (valid_until past, or valid_from more than a"
                                 " day ahead).")
            await self.factory.in_thread(signed.verify, self.key)
            signed = (signed.prekey_id, signed.public, signed.valid_from, signed.valid_until, signed.signature)
        count = await self.factory.store.publish_prekeys(
            self.user, self.device, signed, [(p.prekey_id, p.public) for p in one_time], MAX_ONE_TIME_PREKEYS,
            self.key_fingerprint, replace)
        self.factory.device_updated(self.user, self.device, prekeys=True)
        return {"one_time": count}

    async def handle_devices(self, frame, rid):
        user = field_username(frame)
        identity_key, records = await self.factory.store.devices(user)
        own = user == self.user
        return {"user": user, "identity_key": identity_key,
                "devices": [self._device_object(r, own) for r in records]}

    async def handle_bundle(self, frame, rid):
        users = field_usernames(frame, "users")
        self.factory.bundle_requested(self.user)
        allowed = self.factory.one_time_allowed(self.user, self.device, await self.factory.device_sets(users))
        try:
            bundles, low = await self.factory.store.bundle(users, self.user, self.device, allowed)
        except BaseException:
            self.factory.one_time_unused(self.user, allowed)
            raise
        self.factory.one_time_unused(self.user, allowed - {(user, device) for user, device, _ in low})
        for user, device, left in low:
            if left < PREKEYS_LOW:
                self.factory.prekeys_low(user, device, left)
        out = []
        for user, identity_key, devices in bundles:
            objects = []
            for record, signed, one_time in devices:
                obj = self._device_object(record, user == self.user)
                obj["signed_prekey"] = None if signed is None else {
                    "id": signed[0], "public": b64(signed[1]), "valid_from": signed[2], "valid_until": signed[3],
                    "signature": b64(signed[4])}
                obj["one_time_prekey"] = None if one_time is None else {"id": one_time[0], "public": b64(one_time[1])}
                objects.append(obj)
            out.append({"user": user, "identity_key": identity_key, "devices": objects})
        return {"bundles": out}

    async def handle_revoke_device(self, frame, rid):
        self._require_identity()
        device = _field_device(frame, "device")
        revocation = DeviceRevocation.from_json(frame, self.user)
        if device == self.device:
            raise BadRequest("The identity device cannot be revoked; replace the identity key instead (rekey).")
        await self.factory.in_thread(revocation.verify, self.key)
        receipts = await self.factory.store.revoke_device(self.user, device, revocation.revoked_at,
                                                          revocation.signature, self.key_fingerprint,
                                                          self.factory.now())
        self.log.info("{user} revoked a device ({device})", user=self.user, device=device.hex())
        self.factory.device_revoked(self.user, device)
        self.factory.receipts_created(receipts)
        self.factory.devices_changed(self.user, self)
        self.factory.settled()
        return {"device": device.hex()}

    # -- linking a new device --

    async def handle_link_request(self, frame, rid):
        user = field_username(frame)
        key = load_public_key(field_str(frame, "public_key", 16384))
        name = field_str(frame, "name", MAX_DEVICE_NAME_BYTES)
        if not valid_device_name(name):
            raise BadRequest("A device name is 1 to %d bytes of printable text." % MAX_DEVICE_NAME_BYTES)
        mac = field_b64(frame, "mac", 32)
        if len(mac) != 32:
            raise _missing("mac", "base64 of 32 bytes (HMAC-SHA256)")
        self._require_logged_out()
        if self.link is not None:
            raise BadRequest("This connection already waits for a link request's answer.")
        factory = self.factory
        factory.check_throttle(self, user, "register")
        if await factory.store.get_user(user) is None:
            factory.proof_failed(self, user)  # charged to the requester, like a login for an unknown user
            raise UnknownUser("No such user: %s." % user)
        link = factory.link_requested(self, user, key, name, mac)
        self.setTimeout(LINK_TTL + self.limits.login_timeout)  # the answer comes first, then the time to log in
        return {"link": link.link_id}

    async def handle_link_pending(self, frame, rid):
        self._require_identity()
        return {"requests": [{"link": link.link_id, "public_key": public_key_pem(link.key), "name": link.name,
                              "mac": b64(link.mac), "at": link.at} for link in self.factory.links_of(self.user)]}

    def _link(self, frame):
        link_id = field_str(frame, "link", LINK_ID_SIZE * 2)
        link = self.factory.links.get(link_id)
        if link is None or link.user != self.user:
            raise BadRequest("No such link request: it expired, or was answered.")
        return link

    async def handle_link_approve(self, frame, rid):
        self._require_identity()
        link = self._link(frame)
        answer_mac = field_b64(frame, "answer_mac", 32)
        if len(answer_mac) != 32:
            raise _missing("answer_mac", "base64 of 32 bytes (HMAC-SHA256)")
        certificate = self._certificate(frame, self.user, link.key, "certificate")
        await self.factory.in_thread(certificate.verify, self.key)
        if self.factory.links.get(link.link_id) is not link:
            raise BadRequest("No such link request: it expired, or was answered.")
        await self.factory.store.add_device(
            self.user, certificate.device_id, public_key_pem(link.key), certificate.name, certificate.created,
            certificate.signature, self.factory.now(), self.limits.max_devices, self.key_fingerprint)
        self.factory.device_added(self.user, certificate.device_id, link.key)
        record = DeviceRecord(self.user, certificate.device_id, public_key_pem(link.key), certificate.name,
                              certificate.created, certificate.signature, None, None, False, self.factory.now(),
                              None)
        self.factory.link_answered(link, {"type": "linked", "link": link.link_id,
                                          "device": self._device_object(record), "answer_mac": b64(answer_mac),
                                          "identity_key": public_key_pem(self.key)})
        self.log.info("{user} linked a new device ({device})", user=self.user, device=certificate.device_id.hex())
        self.factory.devices_changed(self.user, self)
        return {"device": certificate.device_id.hex()}

    async def handle_link_decline(self, frame, rid):
        self._require_identity()
        link = self._link(frame)
        self.factory.link_answered(link, {"type": "link_expired", "link": link.link_id, "declined": True})
        return {}

    # -- groups --
    # A group changes by ops signed with a member's identity key (group_op: from the identity device only); the
    # server checks each against the group's rules and stores the chain, which every member's client verifies again.
    # Any device of a member reads the chain (group_ops) and lists its groups (groups); a group message is a send
    # with "group" (see _send).

    async def handle_group_op(self, frame, rid):
        gid = _field_group(frame)
        raw = field_b64(frame, "op", MAX_GROUP_OP_BYTES)
        signature = field_b64(frame, "signature", RSA_MAX_BITS // 8)
        op = parse_group_op(raw)
        if op.group_id != gid:
            raise BadRequest('The operation is for another group than "group" names.')
        if op.actor != self.user:
            raise Forbidden("The operation's actor is %s, not you." % op.actor)
        if not hmac.compare_digest(op.actor_fp, self.key_fingerprint):
            raise Forbidden("The operation names an identity key other than your account's.")
        if not self.identity_device:
            raise Forbidden("Group changes are signed with your identity key: make them on your identity device.")
        factory, limits = self.factory, self.limits
        factory.group_op_requested(self.user)
        if op.kind == "create":
            if await factory.group_taken(gid):
                raise GroupExists("A group with that id exists already; make the group with a new id.")
            state = GroupState.empty(gid)
        else:
            state = await factory.member_group(gid, self.user)
            if op.seq != state.seq + 1 or not hmac.compare_digest(op.prev, state.head):
                raise GroupChanged("%s changed meanwhile: its version is now %d; fetch it and make the operation"
                                   " anew." % (state.label, state.seq), state.seq, state.head)
        if op.seq > MAX_GROUP_OPS:
            raise QuotaExceeded("%s has %d operations, the most one group may have: create a new group."
                                % (state.label, MAX_GROUP_OPS))
        new = state.apply(op, limits.max_group_members)
        added = (((self.user, op.actor_fp),) + tuple(op.members) if op.kind == "create"
                 else tuple(op.members) if op.kind == "add" else ())
        departed = tuple(op.users) if op.kind == "remove" else (self.user,) if op.kind == "leave" else ()
        name = new.name if op.kind in ("create", "rename") else None
        if name is not None or added:
            await factory.store.check_group_op(gid, name, added, limits.max_groups, self.user,
                                               limits.max_groups_by_one)
        try:
            await factory.in_thread(verify_group_op, self.key, op, signature)
        except BadSignature:
            raise BadRequest("The operation's signature does not verify.")
        # the reason of the rejected receipts for what still waited for the departing users (a format of their name)
        reason = "%%s %s %s before receiving it." % ("left" if op.kind == "leave" else "was removed from", new.label)
        receipts = await factory.store.add_group_op(
            gid, op.seq, op.prev, op.hash, raw, signature, public_key_pem(self.key), self.user, self.key_fingerprint,
            new.name, added, departed, reason, len(new.members), factory.now(), limits)
        self.log.info("{user} changed group {group} ({kind}, version {seq})", user=self.user, group=gid.hex(),
                      kind=op.kind, seq=op.seq)
        factory.group_committed(new, departed, self)
        factory.receipts_created(receipts)
        if receipts:
            factory.settled()
        return {"group": gid.hex(), "seq": new.seq, "head": new.head.hex()}

    async def handle_group_ops(self, frame, rid):
        gid = _field_group(frame)
        after = field_int(frame, "after", 0, 2 ** 53)
        ops, seq, head, members, more = await self.factory.store.group_ops(gid, self.user, after, self.limits.max_line,
                                                                           self.key_fingerprint)
        answer = {"group": gid.hex(), "ops": [{"seq": op_seq, "op": b64(op), "signature": b64(signature), "key": key}
                                             for op_seq, op, signature, key in ops],
                  "seq": seq, "head": head.hex(), "more": more}
        if members is not None:
            answer["members"] = members
        return answer

    async def handle_groups(self, frame, rid):
        return {"groups": [{"group": gid.hex(), "name": name, "seq": seq, "head": head.hex(), "member": member}
                           for gid, name, seq, head, member in await self.factory.store.groups(self.user)]}

    async def _group_members(self, header, gid):
        """
        The members a group message goes to (all but the sender), from the server's cache of the group: the sender
        must be a member (L{PagerServerFactory.member_group}: L{Forbidden} for a former member, L{UnknownGroup} for
        anyone else), and the envelope sealed for the group's current head (else L{GroupChanged}).
        """
        if header.group_id is None:
            raise BadRequest('The envelope is not a group message: send it with "to", not "group".')
        if header.group_id != gid:
            raise BadRequest('The envelope is sealed for another group than "group" names.')
        state = await self.factory.member_group(gid, self.user, former=True)
        if not hmac.compare_digest(header.group_head, state.head):
            raise GroupChanged("%s changed since the message was sealed: its version is now %d; seal it anew."
                               % (state.label, state.seq), state.seq, state.head)
        return sorted(state.members.keys() - {self.user})

    # -- sending --

    def _chunks(self, frame):
        return field_b64_list(frame, "chunks", self.limits.max_line // 4, MAX_CHUNK_SIZE + GCM_TAG_SIZE)

    def _signature(self, frame):
        return field_b64(frame, "signature", RSA_MAX_BITS // 8, required=False)

    def handle_send(self, frame, rid):
        """
        A message in one frame to users whose devices the server has cached (the common case) joins the store's
        next batch at once, with callbacks instead of a coroutine (L{_accept_batched}); any other goes through
        L{_send}, which may read from the store first.
        """
        if self._upload is not None:
            raise BadRequest("Another message is still being uploaded on this connection.")
        try:
            send = self._read_send(frame)
            if send.signature is not None and send.group is None:
                delivery = self._cached_delivery(send)
                if delivery is not None:
                    return self._accept_batched(send, delivery, rid)
        except BaseException:
            if frame.get("signature") is None:
                self._aborted_upload = rid  # its chunk frames follow: drop them quietly, the error says it all
            raise
        return self._send_or_drop(send, frame, rid)

    async def _send_or_drop(self, send, frame, rid):
        try:
            return await self._send(send, rid)
        except BaseException:
            if frame.get("signature") is None and self._upload is None:
                self._aborted_upload = rid
            raise

    def _count(self, verifier, chunks, declared):
        for chunk in chunks:
            verifier.update(chunk)
            if verifier.size > declared:
                raise BadRequest("The message is larger than the %d bytes declared." % declared)

    def _read_send(self, frame):
        """The fields of a C{send} frame, checked, with its envelope's header parsed: a L{_SendRequest}."""
        group = to = None
        if "group" in frame:
            if "to" in frame:
                raise BadRequest('A message goes to the users "to" names or to the group "group" names, not both.')
            group = _field_group(frame)
        else:
            to = field_usernames(frame, "to")
        receipt = frame.get("receipt", True)  # false: the sender wants no receipt of this message
        if type(receipt) is not bool:
            raise _missing("receipt", "true or false")
        size = field_int(frame, "size", 0, 2 ** 53)
        if size > self.limits.max_message:
            raise TooLarge("The message is larger than the limit of %d bytes." % self.limits.max_message)
        header = field_b64(frame, "header", self.limits.max_line)
        chunks = self._chunks(frame)
        signature = self._signature(frame)
        verifier = EnvelopeVerifier(header, self.limits.max_message)
        parsed = verifier.header
        if parsed.version < 2:
            raise BadRequest("Send a version 2 envelope (one wrapped key per device); version 1 is only read.")
        if parsed.sender != self.user:
            raise Forbidden("The envelope's sender is %s, not you." % parsed.sender)
        if not hmac.compare_digest(parsed.sender_fingerprint, self.key_fingerprint):
            raise Forbidden("The envelope names an identity key other than your account's.")
        if parsed.sender_device != self.device:
            raise Forbidden("The envelope names a sending device other than this session's.")
        if group is None and parsed.group_id is not None:
            raise BadRequest('The envelope is a group message: send it with "group", not "to".')
        return _SendRequest(group, to, receipt, size, header, chunks, signature, verifier)

    def _cached_delivery(self, send):
        """
        L{_delivery} of a 1:1 C{send} from the cache alone; None when a device set must be read (not cached, or
        different from the envelope's: the cache may be what is old, see L{_targets}).
        """
        factory = self.factory
        if not factory.devices_cached(send.to, self.user):
            return None
        named, got = self._entries(send.verifier.header, send.to, False)
        sets = factory.cached_device_sets(named | {self.user})
        if self._changed(sets, named, got):
            return None
        return self._delivery(send, *self._target_list(send.verifier.header, sets, named), send.to)

    def _delivery(self, send, recipients, targets, to):
        """
        C{(recipients, targets, to, group, receipt)}: where C{send} goes (see L{_targets}), its chunks counted
        against its declared size.
        """
        self._count(send.verifier, send.chunks, send.size)
        if not send.receipt:  # stored as told already: no receipt is made, stored or pushed for any of them
            targets = [(name, device, True) for name, device, _ in targets]
        group = None if send.group is None else (send.group, send.verifier.header.group_head)
        return recipients, targets, to, group, send.receipt

    async def _send(self, send, rid):
        group, to, size, header, chunks, signature, verifier = (
            send.group, send.to, send.size, send.header, send.chunks, send.signature, send.verifier)
        parsed = verifier.header
        # A group or a device set not in the cache is read from the store first: meanwhile an upload's chunk frames
        # must wait unread, until the upload has begun (or been refused).
        try:
            if group is not None:
                if not self.factory.group_cached(group, self.user):
                    self._hold("targets")
                to = await self._group_members(parsed, group)
            if not self.factory.devices_cached(to, self.user):
                self._hold("targets")
            recipients, targets = await self._targets(parsed, to, group is not None)
            if group is not None:
                if not targets:
                    raise BadRequest("Nobody else is in the group, and you have no other device: there is nobody to"
                                     " send the message to.")
                self.factory.group_fanout(self.user, len(targets))
                to = [name for name in to if name in recipients]  # not those whose account was deleted
            delivery = self._delivery(send, recipients, targets, to)
            if signature is None:
                upload = _Upload(rid, verifier, delivery, size)
                self.factory.upload_opened(self.user)
                self._hold("upload")
        finally:
            if "targets" in self._holds:
                self._release("targets")
        if signature is not None:
            return await self._accept(verifier, delivery, size, chunks, signature, None)
        # A message in several frames: its declared size is reserved when it begins, and its chunks are stored as
        # they come, reading one frame at a time.
        try:
            store = self.factory.store
            upload.seq, upload.duplicate, upload.accepted_at = await store.begin_upload(
                parsed.message_id, self.user, header, size, recipients, self.limits, self.key_fingerprint)
            if not upload.duplicate:
                await store.add_chunks(upload.seq, 0, chunks)
            upload.count = len(chunks)
            if self.closed:  # connectionLost had no upload to drop yet
                self._end_upload(upload, abort=True)
                return None
            self._upload = upload  # its idle clock starts when reading resumes, in _release
        except BaseException:
            self._end_upload(upload, abort=True)
            raise
        finally:
            self._release("upload")
        return None

    def _await_chunk(self, upload):
        """
        (Re)start the wait for the upload's next chunk frame, unless the server holds reading: then L{_release}
        starts it once reading resumes.
        """
        if not self._holds - {"output"}:
            upload.timer = self.callLater(self.limits.upload_idle_timeout, self._upload_idle, upload)

    def _upload_idle(self, upload):
        if self._upload is not upload:
            return
        self._upload = None
        self._aborted_upload = upload.rid  # its chunk frames may still come: drop them quietly
        self._end_upload(upload, abort=True)
        self.log.info("Dropped an upload by {user} idle for {seconds} s", user=self.user,
                      seconds=self.limits.upload_idle_timeout)
        self.send_error(upload.rid, IdleTimeout("The upload had no chunk frame for %d seconds; it was dropped."
                                                % self.limits.upload_idle_timeout))

    def _end_upload(self, upload, abort):
        """
        The upload is over (once): stop its timer, give its user's open-upload place back and, with C{abort},
        drop what the store holds of it, which gives its reservation back.
        """
        if upload.ended:
            return
        upload.ended = True
        if upload.timer is not None and upload.timer.active():
            upload.timer.cancel()
        self.factory.upload_closed(self.user)
        if abort and upload.seq is not None and not upload.duplicate:
            self.factory.store.abort_upload(upload.seq).addErrback(
                lambda f: self.log.failure("Dropping an unfinished upload failed", f))

    async def handle_chunk(self, frame, rid):
        upload = self._upload
        last = frame.get("signature") is not None
        if upload is None or upload.rid != rid:
            if self._aborted_upload == rid:
                if last:
                    self._aborted_upload = None
                return None  # the rest of an upload already refused: its error was sent
            raise BadRequest("No upload with that id is in progress.")
        self._hold("upload")  # stops the upload's idle clock until this frame is stored
        signature = None
        try:
            signature = self._signature(frame)
            chunks = self._chunks(frame)
            self._count(upload.verifier, chunks, upload.declared_size)
            if not upload.duplicate:
                await self.factory.store.add_chunks(upload.seq, upload.count, chunks)
            upload.count += len(chunks)
            if signature is None:
                return None  # the idle clock starts again when reading resumes, in _release
            self._upload = None
            answer = await self._accept(upload.verifier, upload.recipients, upload.declared_size, None, signature,
                                        upload)
            self._end_upload(upload, abort=False)
            return answer
        except BaseException:
            if self._upload is upload:
                self._upload = None
                if not last:
                    self._aborted_upload = rid
            self._end_upload(upload, abort=True)
            raise
        finally:
            self._release("upload")

    async def _targets(self, header, to, group=False):
        """
        C{(recipients, targets)} of an envelope: the users it counts against and the devices it waits for (see
        L{accept_message_txn}).  The entries must name exactly the current devices of every user in C{to}, and the
        sender's own other devices (all of them, this one too, when the sender is in C{to}: a note to self); else
        L{DevicesChanged}, naming the users whose devices differ.  No device that ever published prekeys is
        wrapped to with RSA-OAEP.  The device sets come from the factory's cache: no SQL for a known user.  For a
        C{group} message C{to} is the other members: one whose account was deleted has no devices, so no entries.
        """
        named, got = self._entries(header, to, group)
        for fresh in (False, True):
            sets = await self.factory.device_sets(sorted(named | {self.user}), deleted_ok=group)
            changed = self._changed(sets, named, got)
            if not changed:
                break
            # The cache may be what is old (the operator's admin commands change the database from another
            # process): read those users' devices once more before telling the sender (see _send for the hold).
            self.factory.forget_devices(changed)
            self._hold("targets")
        if changed:
            raise DevicesChanged("The devices of %s are not the ones the message was sealed for; fetch them again"
                                 " and seal it anew." % ", ".join(sorted(changed)))
        return self._target_list(header, sets, named)

    def _entries(self, header, to, group):
        """
        C{(named, got)}: the users C{to} names, and the devices the envelope has entries for by user, which must be
        those users (and the sender's other devices) or, for a C{group} message, members; else L{BadRequest}.
        """
        user, device = self.user, self.device
        named = set(to)
        got = {}
        for entry in header.entries:
            got.setdefault(entry.name, set()).add(entry.device_id)
        if group:
            if got.keys() - named - {user} or device in got.get(user, ()):
                raise BadRequest("The envelope has entries for users who are not members of the group (or for the"
                                 " sending device).")
        elif (got.keys() - {user} != named - {user} or (user in named and user not in got)
                or user not in named and device in got.get(user, ())):
            raise BadRequest('The envelope\'s recipients are not exactly the "to" list (and the sender\'s other'
                             ' devices).')
        return named, got

    def _changed(self, sets, named, got):
        """The users whose current devices (in C{sets}) are not the ones the envelope's entries (C{got}) name."""
        changed = []
        for name in named | got.keys() | {self.user}:
            current = sets[name].current.keys()
            if name not in named:  # the sender's own other devices
                current = current - {self.device}
            if got.get(name, set()) != current:
                changed.append(name)
        return changed

    def _target_list(self, header, sets, named):
        """C{(recipients, targets)} of an envelope whose entries are the current devices (see L{_targets})."""
        user = self.user
        targets = []
        for entry in header.entries:
            if entry.kind == 1 and sets[entry.name].current[entry.device_id]:
                raise BadRequest("The envelope wraps a key with RSA-OAEP for a device that publishes prekeys"
                                 " (a downgrade); seal it with the device's prekeys.")
            targets.append((entry.name, entry.device_id, entry.name == user and user not in named))
        return sorted({entry.name for entry in header.entries}), targets

    async def _accept(self, verifier, recipients, size, chunks, signature, upload):
        """
        Check the signature, commit the message for all recipients, and only then answer accepted.  The signature
        is checked on the store's thread, inside the message's own transaction step: off the reactor, without a
        thread hop of its own, and committed in the order messages arrived.  C{recipients} is C{(users, targets,
        to, group)}, see L{_targets} and L{_send}.
        """
        recipients, targets, to, group, receipt = recipients
        header = verifier.header
        check = self._signature_check(verifier, size, signature)
        if upload is not None and upload.duplicate:
            await self.factory.in_thread(check)
            if not self.receive and receipt:
                self.sent.add(header.message_id)
            return {"msg": header.message_id.hex(), "accepted_at": upload.accepted_at, "duplicate": True,
                    "queued": [name for name in to if name not in self.factory.receivers]}
        now = self.factory.now()
        tail = None if upload is not None else self._push_tail(verifier, size, chunks, signature, now)
        committed = await self.factory.store.accept_message(
            header.message_id, self.user, header.raw, signature, size, chunks, recipients, now, self.limits,
            None if upload is None else upload.seq, check, self.key_fingerprint, targets, group,
            self._stored_tail(tail, targets))
        return self._accepted(committed, verifier, (recipients, targets, to, group, receipt), size, chunks, signature,
                              tail)

    def _signature_check(self, verifier, size, signature):
        """
        The check of a complete message's signature, to run off the reactor; L{BadRequest} if the message is not
        the size it declared.
        """
        if verifier.size != size:
            raise BadRequest("The message is %d bytes, not the %d declared." % (verifier.size, size))
        return functools.partial(verifier.verify, signature, self.key)

    def _push_tail(self, verifier, size, chunks, signature, now):
        """
        The push of a new message accepted at C{now} (L{push_tail}); None for one too large to push from memory
        (over C{inline_bytes}) or in one line.
        """
        if chunks is None or size > self.factory.inline_bytes:
            return None
        return push_tail(self.user, size, now, verifier.header.raw, chunks, signature, self.limits.max_line)

    def _stored_tail(self, tail, targets):
        """
        The push C{tail} if the message is to be stored as it (L{accept_message_txn}): when a device it waits for
        has no session taking messages now, so that it will be read back, in a drain.  A message every device takes
        at once is stored as its fields, a third smaller than their base64, and read back only if a session drops
        before acknowledging it.
        """
        return None if tail is None or self.factory.all_receiving(targets) else tail

    def _accept_batched(self, send, delivery, rid):
        """
        L{_accept} for a message in one frame, without a coroutine or a Deferred: it joins the store's next batch
        (L{Store.submit}), and its answer is written when that batch has committed.  Returns L{ANSWERED_LATER}.
        """
        recipients, targets, to, group, receipt = delivery
        verifier, size, chunks, signature = send.verifier, send.size, send.chunks, send.signature
        header = verifier.header
        check = self._signature_check(verifier, size, signature)
        now = self.factory.now()
        tail = self._push_tail(verifier, size, chunks, signature, now)
        store = self.factory.store

        def committed(result):
            fields = self._accepted(result, verifier, delivery, size, chunks, signature, tail)
            self._done("send")  # not an authentication request: no challenge to add
            self.send_line(_send_ok_line(rid, fields))

        def failed(error):
            self._answer_error(error, "send", rid)

        args = [header.message_id, self.user, header.raw, signature, size, chunks, recipients, now, self.limits, None,
                check, self.key_fingerprint, targets, group, self._stored_tail(tail, targets)]
        checker = self.factory.signatures
        if checker is None or not checker.running:  # the store's thread checks it, as the transaction begins
            store.submit(accept_message_txn, args, committed, failed)
            return ANSWERED_LATER
        # The checker process checks it; the store keeps the message's place in its order meanwhile.  Whatever
        # may refuse the message here does so before the place is kept: a place never filled would stop the store.
        digest = verifier.digest()  # TruncatedMessage for a message without chunks
        place = store.reserve()

        def checked(outcome):
            if outcome is None:
                args[10] = None  # checked already
                store.fill(place, accept_message_txn, args, committed, failed)
            elif outcome == "unknown":  # the checker ended before answering: the store's thread checks it after all
                store.fill(place, accept_message_txn, args, committed, failed)
            else:  # refused without touching the store, answered in its turn
                store.fill(place, _nothing_txn, (), lambda _: failed(outcome()), failed)

        try:
            checker.check(self.device, self.key, header.sender_device, digest, signature, checked)
        except Exception:
            store.fill(place, _nothing_txn, (), _ignore, _ignore)  # the place goes; the request gets the error
            raise
        return ANSWERED_LATER

    def _accepted(self, committed, verifier, delivery, size, chunks, signature, tail):
        """
        A message was committed (C{committed}: L{accept_message_txn}'s answer, C{tail} its push, L{push_tail}, or
        None): offer it to the sessions of the devices it waits for, and return the fields of the sender's C{ok}.
        """
        seq, accepted_at, duplicate, ord_ = committed
        recipients, targets, to, group, receipt = delivery
        header = verifier.header
        if not self.receive and receipt:
            self.sent.add(header.message_id)
        if not duplicate:
            inline = chunks if chunks is not None and size <= self.factory.inline_bytes else None
            message = StoredMessage(seq, header.message_id, self.user, header.raw, signature, size,
                                    verifier.chunk_count, accepted_at, inline, ord_)
            if tail is not None:
                message.lines[self.limits.max_line] = _push_line(header.message_id, ord_, tail)
            self.factory.message_accepted(message, targets)
        return {"msg": header.message_id.hex(), "accepted_at": accepted_at, "duplicate": duplicate,
                "queued": [name for name in to if name not in self.factory.receivers]}

    # -- receiving --

    def _push_message(self, message):
        """
        Send one pending message; returns a Deferred when its chunks must be streamed from the store.  A message
        that fits one line is encoded once, for every device it fans out to (a group's members, a user's devices).
        """
        line = message.lines.get(self.limits.max_line)
        if line is None:
            line = message.lines[self.limits.max_line] = self._message_line(message)
        if line:
            self.send_line(line)
            return None
        self.send_frame({
            "type": "message", "msg": message.msg_id.hex(), "seq": message.ord, "from": message.sender,
            "size": message.size, "accepted_at": message.accepted_at, "header": b64(message.header), "chunks": [],
        })
        return Deferred.fromCoroutine(self._stream_chunks(message))

    def _message_line(self, message):
        """The C{message} push with its chunks and signature as one encoded line, or C{b""} if it does not fit."""
        if message.chunks is None:
            return b""
        tail = push_tail(message.sender, message.size, message.accepted_at, message.header, message.chunks,
                         message.signature, self.limits.max_line)
        return b"" if tail is None else _push_line(message.msg_id, message.ord, tail)

    def _push_pending(self, item):
        """Push an item of the message feed: lines as the store keeps them (one or several), or a L{StoredMessage}."""
        if item.__class__ is bytes:
            self.send_line(item)
            return None
        return self._push_message(item)

    async def _stream_chunks(self, message):
        """Send a large message's chunks one frame each, as fast as the recipient reads them."""
        store = self.factory.store
        for index in range(message.chunk_count):
            await self.flow.wait()
            if self.closed:
                return
            if message.chunks is not None:
                chunk = message.chunks[index]
            else:
                chunk = (await store.chunks(message.seq, index, 1))[0]
            frame = {"type": "message_chunk", "msg": message.msg_id.hex(), "chunks": [b64(chunk)]}
            if index == message.chunk_count - 1:
                frame["signature"] = b64(message.signature)
            self.send_frame(frame)

    def _push_receipt(self, receipt):
        self.send_frame({
            "type": "receipt", "receipt": receipt.rid, "msg": receipt.msg_id.hex(), "from": receipt.peer,
            "status": receipt.status, "reason": receipt.reason, "at": receipt.at,
        })

    def _msg_id(self, frame):
        msg = field_str(frame, "msg", MESSAGE_ID_SIZE * 2)
        try:
            msg_id = bytes.fromhex(msg)
        except ValueError:
            msg_id = b""
        if len(msg_id) != MESSAGE_ID_SIZE:
            raise BadRequest('The field "msg" must be a message id: %d hex digits.' % (MESSAGE_ID_SIZE * 2))
        return msg_id

    def _msg_ids(self, frame):
        value = frame.get("msgs")
        if (not isinstance(value, list) or not 1 <= len(value) <= MAX_ACK_BATCH
                or not all(isinstance(v, str) and _MSG_ID_RE.fullmatch(v) for v in value)):
            raise _missing("msgs", "a list of 1 to %d message ids of %d hex digits"
                           % (MAX_ACK_BATCH, MESSAGE_ID_SIZE * 2))
        return [bytes.fromhex(v) for v in value]

    def _receipt_ids(self, frame):
        value = frame.get("receipts")
        if (not isinstance(value, list) or not 1 <= len(value) <= MAX_ACK_BATCH
                or not all(type(v) is int and 1 <= v < 2 ** 63 for v in value)):
            raise _missing("receipts", "a list of 1 to %d receipt ids (integers from 1 to 2^63 - 1)" % MAX_ACK_BATCH)
        return value

    def handle_ack(self, frame, rid):
        if "upto" in frame:  # the cumulative form: everything pushed to this device up to a delivery position
            return self._ack_upto(frame, rid)
        return self._ack(frame, rid)

    def _ack_upto(self, frame, rid):
        """The cumulative ack, on the hot path: it joins the store's next batch with callbacks (L{Store.submit})."""
        if "msg" in frame or "msgs" in frame:
            raise BadRequest('An ack names messages by "upto" or by "msg"/"msgs", not both.')
        upto = field_int(frame, "upto", 1, 2 ** 63 - 1)
        rids = self._receipt_ids(frame) if "receipts" in frame else None

        def committed(result):
            receipts, settled, unknown_rids = result
            self._settled(receipts, settled)
            answer = {"settled": settled}
            if rids is not None:
                answer["unknown_receipts"] = unknown_rids
            self._answer(answer, "ack", rid)

        self.factory.store.submit(ack_upto_txn, (self.user, self.device, upto, rids, self.factory.now(),
                                                 self.key_fingerprint),
                                  committed, lambda error: self._answer_error(error, "ack", rid))
        return ANSWERED_LATER

    async def _ack(self, frame, rid):
        store = self.factory.store
        if "msgs" in frame or "receipts" in frame:  # the list form: many at once, the unknown ones reported
            msg_ids = self._msg_ids(frame) if "msgs" in frame else None
            rids = self._receipt_ids(frame) if "receipts" in frame else None
            receipts, unknown_msgs, unknown_rids = await store.ack_many(
                self.user, msg_ids, rids, self.factory.now(), self.key_fingerprint, self.device)
            self._settled(receipts, msg_ids is not None and len(unknown_msgs) < len(msg_ids))
            answer = {}
            if msg_ids is not None:
                unknown = set(unknown_msgs)
                answer["unknown_msgs"] = [text for text, m in zip(frame["msgs"], msg_ids) if m in unknown]
            if rids is not None:
                answer["unknown_receipts"] = unknown_rids
            return answer
        if "receipt" in frame:
            await store.ack_receipt(self.user, field_int(frame, "receipt", 1, 2 ** 63 - 1), self.key_fingerprint)
            return {}
        return await self._settle(self._msg_id(frame), "delivered", "")

    def _settled(self, receipts, settled):
        """C{settled} deliveries were settled, making C{receipts} (C{(sender, Receipt)} pairs)."""
        self.factory.receipts_created(receipts)
        if settled:
            self.factory.settled()

    async def handle_reject(self, frame, rid):
        msg_id = self._msg_id(frame)
        reason = field_str(frame, "reason", 500)
        return await self._settle(msg_id, "rejected", reason)

    async def _settle(self, msg_id, status, reason):
        made = await self.factory.store.ack(self.user, msg_id, status, reason, self.factory.now(),
                                            self.key_fingerprint, self.device)
        if made is not None:  # None: the user's receipt was made before, or waits for its other devices
            self.factory.receipt_created(*made)
        self.factory.settled()
        return {}


def _field_device(frame, name, required=True):
    """A device id field: 32 lower-case hex digits, as bytes (None when absent and not C{required})."""
    value = frame.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not re.fullmatch("[0-9a-f]{%d}" % (2 * DEVICE_ID_SIZE), value):
        raise _missing(name, "a device id: %d lower-case hex digits" % (2 * DEVICE_ID_SIZE))
    return bytes.fromhex(value)


def _field_group(frame, name="group"):
    """A group id field: 32 lower-case hex digits, as bytes."""
    value = frame.get(name)
    if not isinstance(value, str) or not re.fullmatch("[0-9a-f]{%d}" % (2 * GROUP_ID_SIZE), value):
        raise _missing(name, "a group id: %d lower-case hex digits" % (2 * GROUP_ID_SIZE))
    return bytes.fromhex(value)


def _whole_seconds(wait):
    """A wait as the whole seconds a person or a client is told: rounded up (a thousandth spared), at least 1."""
    return max(1, math.ceil(wait - 0.001))


def _error_frame(rid, error, **extra):
    frame = {"type": "error", "code": error.code, "message": error.message}
    if rid is not None:
        frame["id"] = rid
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        frame["retry_after"] = _whole_seconds(retry_after)
    if isinstance(error, GroupChanged) and error.head is not None:
        frame["seq"], frame["head"] = error.seq, error.head.hex()  # the group's current version
    frame.update(extra)
    return frame


class _Members(list):
    """A JSON object's members as read, in order, repeated names included."""


def request_id_of_raw(line):
    """The request id of a frame that failed validation, when it can still be read, so the error can echo it."""
    try:
        members = json.loads(bytes(line).decode("utf-8"), object_pairs_hook=_Members)
    except (ValueError, RecursionError):
        return None
    if not isinstance(members, _Members):
        return None
    ids = [value for name, value in members if name == "id"]
    return request_id({"id": ids[0]}) if len(ids) == 1 else None  # a repeated id names no one request


def _address_host(address):
    """The IP address a connection's peer is counted by, or None (a UNIX socket)."""
    return getattr(address, "host", None)


def _link_prefix(host):
    """
    What link requests are counted by: an IPv4 address itself (an IPv4-mapped IPv6 address as IPv4), an IPv6
    address's /64 (one subscriber usually holds a whole /64); anything else as it is.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 6:
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


def _count_down(counter, key):
    """One fewer C{key} in C{counter}; a key that falls to zero is removed, so the table holds only what is open."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _peer_text(address):
    host = getattr(address, "host", None)
    return "%s:%s" % (host, address.port) if host is not None else str(address)


class _Throttle:
    """
    Failed attempts per key (an address, a connection, an account at an address): after C{free} failures, each
    further one doubles the wait before the next attempt, up to C{max_delay}.  Failures older than an hour are
    forgotten, and the table holds at most C{size} keys, so an attacker cannot lock anyone out for long nor grow the
    server's memory.
    """

    FORGET_AFTER = 3600.0

    def __init__(self, free, max_delay, size=100000):
        self.free, self.max_delay, self.size = free, max_delay, size
        self._entries = collections.OrderedDict()  # key -> (failures, time of the last one)

    def wait(self, key, now):
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.FORGET_AFTER:
            del self._entries[key]
            return 0.0
        if count < self.free:
            return 0.0
        delay = min(self.max_delay, 2.0 ** (count - self.free))
        return max(0.0, last + delay - now)

    def failed(self, key, now):
        count, last = self._entries.pop(key, (0, now))
        if now - last > self.FORGET_AFTER:
            count = 0
        self._entries[key] = (count + 1, now)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, key):
        self._entries.pop(key, None)


@dataclasses.dataclass
class _DeviceSet:
    """One user's current (not revoked) devices as the server's cache holds them: device id -> published prekeys."""

    current: dict


@dataclasses.dataclass
class _GroupLoad:
    """A group's chain being read into the server's cache: who else waits for it, and whether an op landed meanwhile."""

    waiting: list = dataclasses.field(default_factory=list)
    stale: bool = False


def _fold_stored(state, raws):
    """
    C{state} after the stored ops C{raws}, which the server checked when it took them: no member limit applies now
    (the operator may have lowered it since).
    """
    for raw in raws:
        state = state.apply(parse_group_op(raw), sys.maxsize)
    return state


@dataclasses.dataclass
class _LinkRequest:
    """A new device's request to join C{user}'s account, kept in memory while its connection waits for the answer."""

    link_id: str
    user: str
    key: object  # the new device's RSA public key
    name: str
    mac: bytes
    at: float
    connection: object
    host: object  # the address it is counted against, or None
    timer: object = None


class _Bucket:
    """A token bucket per key: C{rate} a second, C{burst} at once; at most C{size} keys (the oldest forgotten)."""

    def __init__(self, rate, burst, size=100000):
        self.rate, self.burst, self.size = rate, burst, size
        self._entries = collections.OrderedDict()  # key -> (tokens, time)

    def take(self, key, now, cost=1):
        """0 if C{key} may go on now (C{cost} tokens are taken, at most C{burst}), else the seconds until it may."""
        cost = min(cost, self.burst)
        tokens, last = self._entries.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / self.rate
        self._entries[key] = (tokens, now)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return wait

    def give_back(self, key):
        """A token taken by L{take} that was not used."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (min(self.burst, entry[0] + 1), entry[1])


class _OneTimeHandouts:
    """
    Who may take a device's one-time prekey now: one requesting account at most one of a device's every
    C{interval} seconds, and a device at most C{burst} at once then C{rate} a second to all requesters together.
    Beyond that a bundle carries the device's signed prekey alone (X3DH allows it: still forward secret once that
    prekey is deleted).  Both tables hold at most C{size} keys (the oldest forgotten), so memory stays bounded.
    """

    def __init__(self, interval, rate, burst, size=100000):
        self.interval, self.size = interval, size
        self._given = collections.OrderedDict()  # (requester, user, device) -> time of the last handout, oldest first
        self._devices = _Bucket(rate, burst, size)  # (user, device) -> its handouts to everyone

    def take(self, requester, user, device, now):
        """Whether C{requester} may take one of C{user}'s C{device}'s one-time prekeys now (counted if so)."""
        given = self._given
        while given:
            oldest = next(iter(given.values()))
            if now - oldest < self.interval:
                break
            given.popitem(last=False)
        key = (requester, user, device)
        if key in given or self._devices.take((user, device), now) > 0:
            return False
        given[key] = now
        while len(given) > self.size:
            given.popitem(last=False)
        return True

    def give_back(self, requester, user, device):
        """A handout counted by L{take} that did not happen (the pool was empty)."""
        if self._given.pop((requester, user, device), None) is not None:
            self._devices.give_back((user, device))


class SignatureChecker(protocol.ProcessProtocol):
    """
    Checks the signatures of sends in a process of its own (L{signature_checker_main}), so that they take the
    machine's other core.  The RSA check holds the interpreter's lock for its whole 20 µs or so, so in a thread of
    the server it runs one at a time with everything else the server does (in the store's thread it was a sixth of
    the server's time at full load); the records crossing the pipe cost the server a few microseconds a message.
    Checks are answered in the order asked.  If the process dies or stops answering, the checks still waiting are
    answered C{"unknown"}, for the server to make itself, and the process is started again a little later.
    """

    log = Logger()
    KEY_SLOTS = 4096  # keys the process keeps (when all are taken, they are all given anew)
    STALL_TIMEOUT = 10.0  # seconds without an answer while checks wait before the process is killed
    RESTART_DELAY = 1.0  # seconds after the process ended before another is started

    def __init__(self, reactor, argv=None):
        self.reactor = reactor
        here = os.path.dirname(os.path.abspath(__file__))
        # The terminal's Ctrl-C reaches the whole process group: the checker ignores it, and ends when its input
        # does, as the server stops (or dies).
        self.argv = argv or [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN);"
                                                   " sys.path.insert(0, %r); import pager; "
                                                   "pager.signature_checker_main()" % here]
        self.running = False  # a process is started and takes checks
        self._stopping = False
        self._waiting = collections.deque()  # the answer callbacks of the checks written, in order
        self._slots = {}  # device id -> the slot in the process that holds its key
        self._answered = 0  # checks answered so far: the stall check looks for progress
        self._records = []  # what is to be written to the process at the end of this turn of the reactor
        self._stall_call = self._restart_call = self._write_call = None
        self._ended = []  # Deferreds waiting for the process to end (stop)

    def start(self):
        self._slots.clear()
        try:
            self.reactor.spawnProcess(self, self.argv[0], self.argv, env=dict(os.environ),
                                      childFDs={0: "w", 1: "r", 2: 2})
        except OSError as e:
            self.log.error("The signature checker could not start ({error}); the server checks signatures itself",
                           error=e)
            return
        self.running = True
        self.log.info("Signature checker started (process {pid})", pid=self.transport.pid)

    def check(self, device, key, named, digest, signature, answer):
        """
        Check C{signature} of C{digest} by C{key}, the key of the session's device C{device}, the envelope's header
        naming the device C{named}: C{answer} is later called with None (it verified), an exception class
        (L{WrongSenderKey} if C{named} is not C{key}'s device, L{BadSignature}), or C{"unknown"} when the process
        ended before answering (at once if none is running).
        """
        if not self.running:
            self._tell(answer, "unknown")
            return
        slot = self._slots.get(device)
        if slot is None:
            if len(self._slots) >= self.KEY_SLOTS:  # the slots are given anew, to the keys of the checks to come
                self._slots.clear()
            slot = self._slots[device] = len(self._slots)
            der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            self._records += (_KEY_RECORD.pack(b"K", slot, len(der)), der)
        self._records += (_KEY_RECORD.pack(b"V", slot, len(signature)), named, digest, signature)
        self._waiting.append(answer)
        if self._write_call is None:  # one write a turn of the reactor, for all the checks asked in it
            self._write_call = self.reactor.callLater(0, self._write)
        if self._stall_call is None:
            self._stall_call = self.reactor.callLater(self.STALL_TIMEOUT, self._stalled, self._answered)

    def _write(self):
        self._write_call = None
        records, self._records = self._records, []
        if self.running:
            self.transport.writeSequence(records)

    def outReceived(self, data):
        waiting = self._waiting
        if len(data) > len(waiting) or not _CHECK_ANSWERS.keys() >= set(data):
            self.log.error("The signature checker answered what it was not asked: stopping it")
            self.transport.signalProcess("KILL")  # what waits is then answered "unknown" (processEnded)
            return
        self._answered += len(data)
        for byte in data:
            try:
                waiting.popleft()(_CHECK_ANSWERS[byte])
            except Exception:
                self.log.failure("Handling a signature check's answer failed")

    def _tell(self, answer, value):
        try:
            answer(value)
        except Exception:
            self.log.failure("Handling a signature check's answer failed")

    def _stalled(self, answered):
        self._stall_call = None
        if not self._waiting:
            return
        if self._answered == answered:
            self.log.error("The signature checker answered nothing for {seconds} s: stopping it",
                           seconds=self.STALL_TIMEOUT)
            self.transport.signalProcess("KILL")
            return
        self._stall_call = self.reactor.callLater(self.STALL_TIMEOUT, self._stalled, self._answered)

    def processEnded(self, reason):
        self.running = False
        self._records = []
        for call in (self._stall_call, self._write_call):
            if call is not None:
                call.cancel()
        self._stall_call = self._write_call = None
        waiting, self._waiting = self._waiting, collections.deque()
        if not self._stopping:
            code, sig = getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)
            self.log.error("The signature checker process ended ({how}); the server checks signatures itself until"
                           " another starts", how="signal %s" % sig if sig else "exit code %s" % code)
            self._restart_call = self.reactor.callLater(self.RESTART_DELAY, self._restart)
        for answer in waiting:
            self._tell(answer, "unknown")
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)

    def _restart(self):
        self._restart_call = None
        if not self._stopping:
            self.start()

    def stop(self):
        """
        Let the process end once it has answered what it was asked (killed if it has not ended within
        C{STALL_TIMEOUT}); a Deferred that fires when it has ended.
        """
        self._stopping = True
        if self._restart_call is not None:
            self._restart_call.cancel()
            self._restart_call = None
        if not self.running:
            return defer.succeed(None)
        if self._write_call is not None:
            self._write_call.cancel()
            self._write()
        d = Deferred()
        self._ended.append(d)
        self.transport.closeStdin()
        if self._stall_call is not None:
            self._stall_call.cancel()
        self._stall_call = self.reactor.callLater(self.STALL_TIMEOUT, self._kill)
        return d

    def _kill(self):
        self._stall_call = None
        if self.running:
            self.transport.signalProcess("KILL")


class PagerServerFactory(protocol.Factory):
    """
    The server's shared state: the store, the limits, the sessions online, and the thread pool that does RSA and
    Argon2id work off the reactor.
    """

    protocol = PagerServerProtocol
    log = Logger()
    noisy = False
    inline_bytes = 48 * 1024  # messages up to this size are pushed from memory and read back with their chunks
    VACUUM_PAGES = 4096  # free pages given back per store step (16 MiB of 4 KiB pages), so sends wait little
    HASH_RETRY_AFTER = 1.0  # seconds a request refused by the per-account or per-address hashing bound is told to wait
    RECLAIM_DELAY = 1.0  # seconds after an ack before the free pages are counted (at most one count per delay)
    RECLAIM_PAGES = 2048  # free pages (8 MiB of 4 KiB pages) from which the count gives them back at once
    RECEIPT_TRIM_EVERY = 100  # new receipts of one user between two trims of its stored receipts
    DEVICE_CACHE = 20000  # users whose device sets are kept in memory (the least recently used are forgotten)
    GROUP_CACHE = 2000  # groups whose state (members, admins, head) is kept in memory (the least recently used go)

    def __init__(self, store, limits=None, reactor=None, in_thread=None, server_id=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.store = store
        self.limits = limits or Limits()
        self.server_id = server_id
        self._threads_given = in_thread is not None  # tests pass one that runs thread work synchronously
        self.in_thread = in_thread if in_thread is not None else self._default_in_thread
        self._hash_pool = None
        self.signatures = None  # the SignatureChecker of sends, if the server runs one (else the store's thread checks)
        self.online = {}  # user -> set of sessions
        self.receivers = {}  # user -> set of sessions that take messages
        self.connections = 0
        self.protocols = set()
        self._all_closed = []  # Deferreds that fire once no connection is open
        self.per_address = collections.Counter()
        limits = self.limits
        # Failed authentication attempts, charged to whoever made them (see PagerServerProtocol's authentication):
        self.address_failures = _Throttle(limits.address_free_failures, limits.address_max_delay)
        self.token_failures = _Throttle(limits.account_free_failures, limits.account_max_delay)  # (account, address)
        self.recover_failures = _Throttle(limits.account_free_failures, limits.recovery_interval)  # account
        self._hashing = defer.DeferredSemaphore(limits.argon2_concurrency)
        self._hashing_accounts = collections.Counter()  # account -> hashes running or waiting for it
        self._hashing_addresses = collections.Counter()  # address -> hashes running or waiting for it
        self._rekeying = set()  # accounts with a re-key under way
        self._rekeyed = collections.OrderedDict()  # account -> time of its last re-key, oldest first
        self._expiry = None
        self._account_check = None
        self._reclaim_call = None  # the free-page count due after recent acks, if any
        self._reclaim_stopped = False  # stop_expiry was called: an ack settled while stopping schedules nothing
        self._new_receipts = collections.Counter()  # user -> receipts made for it since its last trim
        self._trimming = set()  # users with a trim of their receipts in the store's queue, or running
        self.open_uploads = collections.Counter()  # user -> multi-frame uploads open, over all their connections
        self._device_sets = collections.OrderedDict()  # user -> _DeviceSet, the most recently used last
        self._bundles = _Bucket(limits.bundle_rate, BUNDLE_BURST)  # bundle requests per account
        self._fanout = _Bucket(limits.group_fanout_rate, GROUP_FANOUT_BURST)  # group deliveries per account
        self._groups = collections.OrderedDict()  # group id -> GroupState, the most recently used last
        self._group_loads = {}  # group id -> _GroupLoad, while its chain is read into the cache
        self._group_ops = _Bucket(GROUP_OP_RATE, GROUP_OP_BURST)  # group ops per account
        self.one_time = _OneTimeHandouts(ONE_TIME_INTERVAL, ONE_TIME_DEVICE_RATE, ONE_TIME_DEVICE_BURST)
        self.links = {}  # link id -> _LinkRequest
        self._links_per_address = collections.Counter()
        self._links_per_user = collections.Counter()

    def now(self):
        return self.reactor.seconds()

    def connection_closed(self, connection):
        self.protocols.discard(connection)
        if not self.protocols:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def all_closed(self):
        """A Deferred that fires once no connection is open."""
        if not self.protocols:
            return defer.succeed(None)
        d = Deferred()
        self._all_closed.append(d)
        return d

    def _default_in_thread(self, f, *args, **kwargs):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args, **kwargs)

    def hash_token(self, token, salt):
        """
        Argon2id, at most C{argon2_concurrency} at once, refusing logins past the queue.  The hashes run in a pool of
        their own with just that many threads: each hash takes 19 MiB, and every thread that ever ran one keeps
        that memory in its allocator, so a shared pool of ten would hold ten times as much after a login burst.
        """
        if len(self._hashing.waiting) >= self.limits.argon2_queue:
            raise RateLimited("The server is busy with other logins; try again in a moment.")
        return self._hashing.run(self._hash_in_thread, token, salt)

    def _hash_in_thread(self, token, salt):
        if self._threads_given:
            return self.in_thread(hash_token, token, salt)
        if self._hash_pool is None:
            from twisted.python import threadpool
            self._hash_pool = threadpool.ThreadPool(0, self.limits.argon2_concurrency, "pager-argon2")
            self._hash_pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop_hashing)
        return threads.deferToThreadPool(self.reactor, self._hash_pool, hash_token, token, salt)

    def stop_hashing(self):
        pool, self._hash_pool = self._hash_pool, None
        if pool is not None:
            pool.stop()

    async def hash_token_for(self, connection, account, token, salt):
        """
        L{hash_token} for a request from C{connection} about C{account}.  One account (its recoveries counted
        apart) may have at most C{argon2_per_account} hashes running or waiting, and one address at most
        C{argon2_per_address}: past either, the request is answered rate_limited at once, with a short
        C{retry_after}.  That refusal is not a failed attempt: the bound already limits what the requester costs,
        and charging it would let a few simultaneous logins of one account (cron jobs) lock out their whole
        address.  With one authentication request at a time per connection, nobody can fill the queue alone, and
        everyone else's hash waits behind at most those few of theirs.
        """
        host = _address_host(connection.peer)
        if (self._hashing_accounts[account] >= self.limits.argon2_per_account
                or host is not None and self._hashing_addresses[host] >= self.limits.argon2_per_address):
            raise RateLimited("Too many logins of this account or from your address are being checked; "
                              "try again in a moment.", retry_after=self.HASH_RETRY_AFTER)
        hashed = self.hash_token(token, salt)
        self._hashing_accounts[account] += 1
        if host is not None:
            self._hashing_addresses[host] += 1
        try:
            return await hashed
        finally:
            _count_down(self._hashing_accounts, account)
            if host is not None:
                _count_down(self._hashing_addresses, host)

    def address_connected(self, connection):
        """Count a new connection; False when its address already has as many as allowed."""
        host = getattr(connection.peer, "host", None)
        if host is None:
            return True
        if self.per_address[host] >= self.limits.max_connections_per_address:
            connection.counted_address = None
            return False
        self.per_address[host] += 1
        connection.counted_address = host
        return True

    def address_disconnected(self, connection):
        host = getattr(connection, "counted_address", None)
        if host is not None:
            _count_down(self.per_address, host)

    def check_throttle(self, connection, user, purpose):
        """
        Refuse an authentication attempt at once (no work, no waiting) while its address or connection is slowed
        down, or, for login and rekey, the account at this address, or, for recover, the account's recoveries (a
        register has no account yet: only its address and connection count).  A
        refusal counts as a failure of the address and the connection: polling does not outlast a wait.
        """
        wait = self._wait(connection, user, purpose)
        if wait > 0:
            self._charge(connection, self.now())
            wait = self._wait(connection, user, purpose)
            raise RateLimited("Too many failed logins; try again in %d s." % _whole_seconds(wait), retry_after=wait)

    def _wait(self, connection, user, purpose):
        now = self.now()
        host = _address_host(connection.peer)
        account = (self.recover_failures.wait(user, now) if purpose == "recover"
                   else 0.0 if purpose == "register" else self.token_failures.wait((user, host), now))
        return max(account, connection.auth_failures.wait(None, now),
                   self.address_failures.wait(host, now) if host is not None else 0.0)

    def _charge(self, connection, now):
        """One failed or refused attempt by C{connection}: counted for it and for its address."""
        connection.auth_failures.failed(None, now)
        host = _address_host(connection.peer)
        if host is not None:
            self.address_failures.failed(host, now)

    def proof_failed(self, connection, user, reason="unknown user or wrong key"):
        """
        A request naming C{user} by someone who does not hold its key (an unknown user, a proof that does not
        verify, a revoked or unknown device): it says nothing about the account, so only the requester is charged.
        C{reason} goes to the server's log only; the requester learns nothing more than auth_failed.
        """
        self._charge(connection, self.now())
        self.log.info("Failed login for {user} from {peer}: {reason}", user=user, peer=_peer_text(connection.peer),
                      reason=reason)

    def token_failed(self, connection, user, purpose):
        """A wrong token: charged to the requester, and to the account at this address (or to its recoveries)."""
        now = self.now()
        self._charge(connection, now)
        if purpose == "recover":
            self.recover_failures.failed(user, now)
        else:
            self.token_failures.failed((user, _address_host(connection.peer)), now)
        self.log.info("Failed login for {user} from {peer}: wrong token", user=user, peer=_peer_text(connection.peer))

    def token_matched(self, connection, user, purpose):
        """The right token clears the account's count at this address (or its recoveries'), not the address's."""
        if purpose == "recover":
            self.recover_failures.forget(user)
        else:
            self.token_failures.forget((user, _address_host(connection.peer)))

    def rekey_started(self, user):
        """Refuse a re-key while another of the same account is under way, or within rekey_interval of the last."""
        now = self.now()
        while self._rekeyed and now - next(iter(self._rekeyed.values())) >= self.limits.rekey_interval:
            self._rekeyed.popitem(last=False)
        if user in self._rekeying:
            raise RateLimited("This account is already changing its key; try again in a moment.")
        last = self._rekeyed.get(user)
        if last is not None:
            wait = last + self.limits.rekey_interval - now
            raise RateLimited("This account changed its key moments ago; try again in %d s." % _whole_seconds(wait),
                              retry_after=wait)
        self._rekeying.add(user)

    def rekey_ended(self, user, succeeded):
        self._rekeying.discard(user)
        if succeeded:
            self._rekeyed.pop(user, None)
            self._rekeyed[user] = self.now()

    def session_started(self, session):
        self.online.setdefault(session.user, set()).add(session)
        if session.receive:
            self.receivers.setdefault(session.user, set()).add(session)

    def session_ended(self, session):
        for table in (self.online, self.receivers):
            sessions = table.get(session.user)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del table[session.user]

    def upload_opened(self, user):
        """Count an upload of C{user}'s beginning; L{RateLimited} when they already have C{max_open_uploads}."""
        if self.open_uploads[user] >= self.limits.max_open_uploads:
            raise RateLimited("You have %d uploads open at once, the most allowed; finish one first."
                              % self.limits.max_open_uploads)
        self.open_uploads[user] += 1

    def upload_closed(self, user):
        _count_down(self.open_uploads, user)

    def key_changed(self, user, key, requester=None):
        """
        C{user}'s own rekey or recover, asked for by connection C{requester}, gave the account C{key}: the
        requester, if it is a session of the user, goes on with the new key; every other session of the user, logged
        in with the old key, ends (whoever replaced a key, perhaps because it was stolen, does not want sessions
        with the old one to go on reading and settling the account's messages).
        """
        new_fp = fingerprint(key)
        self.devices_replaced(user, key)
        if requester is not None and requester.user == user:
            requester.key, requester.key_fingerprint, requester.device = key, new_fp, new_fp[:DEVICE_ID_SIZE]
        for session in list(self.online.get(user, ())):
            if session is not requester and session.key_fingerprint != new_fp:
                session.account_gone("This account's key was replaced; log in again with the new key.")

    def all_receiving(self, targets):
        """
        Whether every device of C{targets} (see L{accept_message_txn}) has a session that takes messages, so that
        a new message for them is pushed at once, from memory.
        """
        if targets is None:
            return False
        for name, device, _ in targets:
            if not any(session.device == device for session in self.receivers.get(name, ())):
                return False
        return True

    def message_accepted(self, message, targets):
        """Offer a new message to the sessions of the devices it waits for (C{targets}, see L{accept_message_txn})."""
        for name, device, _ in targets:
            for session in list(self.receivers.get(name, ())):
                if session.device == device:
                    session.messages.offer(message.ord, message)

    # -- devices --

    async def device_sets(self, names, deleted_ok=False):
        """
        C{{name: _DeviceSet}} for C{names}, from the cache (reading what it lacks); L{UnknownUser} if unknown, or
        with C{deleted_ok} (a group's members: the operator may have deleted an account) an empty set, not cached.
        """
        sets, unknown = {}, []
        for name in names:
            known = self._device_sets.get(name)
            if known is None:
                try:
                    _, records = await self.store.devices(name)
                except UnknownUser:
                    if deleted_ok:
                        sets[name] = _DeviceSet({})
                    else:
                        unknown.append(name)
                    continue
                known = self.devices_read(name, {r.device_id: r.prekeys for r in records if r.revoked_at is None})
            else:
                self._device_sets.move_to_end(name)
            sets[name] = known
        if unknown:
            raise UnknownUser("No such user: %s." % ", ".join(unknown))
        return sets

    def devices_read(self, user, current):
        """Cache C{user}'s current devices as just read from the store (id -> published prekeys)."""
        known = self._device_sets[user] = _DeviceSet(current)
        self._device_sets.move_to_end(user)
        while len(self._device_sets) > self.DEVICE_CACHE:
            self._device_sets.popitem(last=False)
        return known

    def cached_device_sets(self, names):
        """C{{name: _DeviceSet}} for C{names}, all of which are cached (L{devices_cached})."""
        cache = self._device_sets
        return {name: cache[name] for name in names}

    def devices_cached(self, names, user):
        """Whether the device sets of C{user} and all of C{names} are cached (L{device_sets} then reads nothing)."""
        cache = self._device_sets
        return user in cache and all(name in cache for name in names)

    def forget_devices(self, names):
        for name in names:
            self._device_sets.pop(name, None)

    def devices_replaced(self, user, key, certified=False):
        """C{user}'s devices are now one: the identity device of C{key} (registered, re-keyed or recovered)."""
        self._device_sets.pop(user, None)
        self._device_sets[user] = _DeviceSet({device_id(key): False})

    def device_updated(self, user, device, certified=None, prekeys=None):
        known = self._device_sets.get(user)
        if known is not None and device in known.current and prekeys:
            known.current[device] = True

    def device_added(self, user, device, key):
        known = self._device_sets.get(user)
        if known is not None:
            known.current[device] = False

    def devices_changed(self, user, origin):
        """
        C{user}'s devices changed (one added, certified or revoked, by the session C{origin}): push
        C{devices_changed} to every other receiving session of the user, so that its other devices say so.  Only to
        the user's own: the server does not know a user's contacts, and telling every user would tell everyone.
        """
        for session in list(self.online.get(user, ())):
            if session is not origin and session.receive and not session.closed:
                session.send_frame({"type": "devices_changed", "user": user})

    def device_revoked(self, user, device):
        """C{user}'s C{device} is revoked: it leaves the cache, and its sessions end."""
        known = self._device_sets.get(user)
        if known is not None:
            known.current.pop(device, None)
        for session in list(self.online.get(user, ())):
            if session.device == device:
                session.account_gone("This device was revoked by the account's identity device.")

    def group_fanout(self, user, devices):
        """
        Count a group message of C{user} to C{devices} member devices (each costs the server a delivery row and a
        push); L{RateLimited} past C{group_fanout_rate} a second (after a burst of L{GROUP_FANOUT_BURST}).  Counted
        when the message is checked, whether or not it is then stored: a refused one cost the server too.
        """
        wait = self._fanout.take(user, self.now(), devices)
        if wait > 0:
            raise RateLimited("Your group messages reach more member devices than the server takes in a moment "
                              "(%d a second); try again in %d s." % (self.limits.group_fanout_rate,
                                                                     _whole_seconds(wait)), retry_after=wait)

    def bundle_requested(self, user):
        """Count one bundle request of C{user}; L{RateLimited} past C{bundle_rate} a second (after a burst)."""
        wait = self._bundles.take(user, self.now())
        if wait > 0:
            raise RateLimited("Too many prekey bundle requests; try again in %d s." % _whole_seconds(wait),
                              retry_after=wait)

    def one_time_allowed(self, requester, requester_device, sets):
        """
        The C{(user, device)} pairs of C{sets} (L{device_sets}) whose one-time prekey C{requester}'s bundle may take
        (L{_OneTimeHandouts}); each is counted now, and given back with L{one_time_unused} if its pool was empty.
        """
        now = self.now()
        return {(user, device) for user, known in sets.items() for device, published in known.current.items()
                if published and not (user == requester and device == requester_device)
                and self.one_time.take(requester, user, device, now)}

    def one_time_unused(self, requester, pairs):
        for user, device in pairs:
            self.one_time.give_back(requester, user, device)

    def prekeys_low(self, user, device, left):
        for session in list(self.online.get(user, ())):
            if session.device == device:
                session.send_frame({"type": "prekeys_low", "one_time": left})

    # -- groups --

    def group_op_requested(self, user):
        """Count one group op of C{user}; L{RateLimited} past GROUP_OP_RATE a second (after GROUP_OP_BURST)."""
        wait = self._group_ops.take(user, self.now())
        if wait > 0:
            raise RateLimited("Too many group changes; try again in %d s." % _whole_seconds(wait), retry_after=wait)

    def group_cached(self, gid, user=None):
        """
        Whether L{group_state} gives C{gid}'s state without reading the store (and, with C{user}, L{member_group}:
        the group is cached and C{user} one of its members).
        """
        state = self._groups.get(gid)
        return state is not None and (user is None or user in state.members)

    async def group_taken(self, gid):
        """Whether a group with the id C{gid} exists (or existed: an ended group keeps its id), without its chain."""
        return gid in self._groups or await self.store.group_access(gid, None) is not None

    async def member_group(self, gid, user, former=False):
        """
        The L{GroupState} of group C{gid}, of which C{user} is a current member; else L{UnknownGroup} (the sentence
        for a group that does not exist), or, with C{former}, L{Forbidden} naming the group for one of its former
        members while it has members left.  A group the cache lacks is folded from its chain (L{group_state}) only
        once the store has said that C{user} is one of its current members: a request naming a group that ended,
        that its user left, or whose id it learnt, costs a look-up of a few rows (L{group_access_txn}) and never a
        fold.  So only a member makes the server fold a chain, once: the state then stays cached (each op's new state
        replacing it, L{group_committed}) until it is the least recently used of C{GROUP_CACHE}.
        """
        state = self._groups.get(gid)
        if state is not None and user in state.members:
            self._groups.move_to_end(gid)
            return state
        access = await self.store.group_access(gid, user)
        if access is not None and access[1]:
            name, _, member, was_member = access
            if member:
                state = await self.group_state(gid)
                if state is not None and user in state.members:
                    return state
            elif former and was_member:
                raise Forbidden("You are not a member of #%s." % name)
        raise UnknownGroup()

    async def group_state(self, gid):
        """
        The L{GroupState} of group C{gid} (None if there is none): from the cache, or folded from the stored chain
        (off the reactor), once however many ask at the same time (requests ask L{member_group}, which folds only
        for a member).  A state read while an op of the group landed is
        given to those who asked but not cached: it may be the one before the op.  The transactions that store an op
        or a group message check the head again, so an old state can only make them refused (group_changed).
        """
        state = self._groups.get(gid)
        if state is not None:
            self._groups.move_to_end(gid)
            return state
        load = self._group_loads.get(gid)
        if load is not None:
            d = Deferred()
            load.waiting.append(d)
            return await d
        load = self._group_loads[gid] = _GroupLoad()
        try:
            state = GroupState.empty(gid)
            while True:
                raws = await self.store.group_chain(gid, state.seq)
                if raws:
                    state = await self.in_thread(_fold_stored, state, raws)
                if len(raws) < GROUP_CHAIN_PAGE:
                    break
        except BaseException as e:
            del self._group_loads[gid]
            for d in load.waiting:
                d.errback(e)
            raise
        del self._group_loads[gid]
        state = state if state.seq else None
        if state is not None and state.members and not load.stale:
            self._cache_group(state)
        for d in load.waiting:
            d.callback(state)
        return state

    def _cache_group(self, state):
        self._groups[state.group_id] = state
        self._groups.move_to_end(state.group_id)
        while len(self._groups) > self.GROUP_CACHE:
            self._groups.popitem(last=False)

    def group_committed(self, state, departed, origin=None):
        """
        An op was stored, making its group C{state}: the cache takes it (a group without members leaves it), and
        every session of a member and of each of the C{departed} users (removed, or who left), but C{origin}'s,
        is pushed C{group_changed}.
        """
        gid = state.group_id
        load = self._group_loads.get(gid)
        if load is not None:
            load.stale = True
        if state.members:
            self._cache_group(state)
        else:
            self._groups.pop(gid, None)
        line = {"type": "group_changed", "group": gid.hex(), "seq": state.seq, "head": state.head.hex()}
        for user in sorted(state.members.keys() | set(departed)):
            for session in list(self.online.get(user, ())):
                if session is not origin:
                    session.send_frame(line)

    # -- link requests --

    def link_requested(self, connection, user, key, name, mac):
        """
        Keep a new device's link request for C{LINK_TTL} seconds, while C{connection} waits for its answer: at most
        C{MAX_LINKS_PER_ADDRESS} from one address prefix (L{_link_prefix}) and C{MAX_LINKS} on the server
        (L{RateLimited}).  An account has at most C{MAX_LINKS_PER_USER}: past it the newcomer takes the place of the
        oldest request of the prefix holding the most of the account's requests (told C{link_expired}), so that a
        passer-by holding the places cannot keep the real new device out.
        """
        host = _address_host(connection.peer)
        if host is not None:
            host = _link_prefix(host)
            if self._links_per_address[host] >= MAX_LINKS_PER_ADDRESS:
                raise RateLimited("Your address has %d link requests waiting, the most allowed."
                                  % MAX_LINKS_PER_ADDRESS, retry_after=LINK_TTL)
        if self._links_per_user[user] >= MAX_LINKS_PER_USER:
            waiting = self.links_of(user)  # the oldest first
            per_prefix = collections.Counter(link.host for link in waiting)
            most = max(per_prefix.values())
            victim = next(link for link in waiting if per_prefix[link.host] == most)
            self.link_answered(victim, {"type": "link_expired", "link": victim.link_id, "evicted": True})
        elif len(self.links) >= MAX_LINKS:
            raise RateLimited("The server has %d link requests waiting, the most it keeps; try again later."
                              % MAX_LINKS, retry_after=LINK_TTL)
        link = _LinkRequest(secrets.token_bytes(LINK_ID_SIZE).hex(), user, key, name, mac, self.now(), connection,
                            host)
        link.timer = self.reactor.callLater(LINK_TTL, self.link_answered, link, {"type": "link_expired",
                                                                                 "link": link.link_id})
        self.links[link.link_id] = link
        if host is not None:
            self._links_per_address[host] += 1
        self._links_per_user[user] += 1
        connection.link = link
        return link

    def links_of(self, user):
        return sorted((link for link in self.links.values() if link.user == user), key=lambda link: link.at)

    def link_answered(self, link, frame):
        """Tell the waiting connection C{frame} (linked, or link_expired) and forget the request."""
        connection = link.connection
        self._forget_link(link)
        if not connection.closed:
            connection.send_frame(frame)
            if connection.user is None:
                connection.setTimeout(self.limits.login_timeout)  # it logs in next, or goes

    def link_dropped(self, connection):
        """The connection waiting on a link request closed, or logged in: the request goes."""
        if connection.link is not None:
            self._forget_link(connection.link)

    def _forget_link(self, link):
        if self.links.pop(link.link_id, None) is None:
            return
        link.connection.link = None
        if link.timer is not None and link.timer.active():
            link.timer.cancel()
        if link.host is not None:
            _count_down(self._links_per_address, link.host)
        _count_down(self._links_per_user, link.user)

    def receipt_created(self, user, receipt):
        """
        Push a new receipt to C{user}'s sessions that take it; and after every C{min(RECEIPT_TRIM_EVERY,
        max_pending_receipts)} new receipts of a user, drop its oldest beyond C{max_pending_receipts}
        (L{trim_receipts_txn}), so a user stores at most about twice that many at any time.  A user has one trim
        at a time in the store's queue: the receipts of a batch are told of only once it has committed, and the
        store runs in order, so a trim still waiting for its outcome then runs after them, or ran after them in
        that batch, and trims them too.  (A drain of many acks a batch would otherwise queue one trim for every
        C{RECEIPT_TRIM_EVERY} of its receipts, each walking the C{max_pending_receipts} kept.)  The receipts one
        settle makes are counted together (L{receipts_created}): they queue at most one trim a user.
        """
        self._count_receipts(user, 1)
        if user in self.online:
            self._offer_receipt(user, receipt)

    def receipts_created(self, receipts):
        """
        L{receipt_created} for each of C{receipts} (C{(user, Receipt)} pairs, in the order made), counted once for
        each user: a drain's ack makes one receipt for each message it settles, most often all for one sender.
        """
        if not receipts:
            return
        for user, count in collections.Counter(user for user, _ in receipts).items():
            self._count_receipts(user, count)
        online = self.online
        for user, receipt in receipts:
            if user in online:
                self._offer_receipt(user, receipt)

    def _count_receipts(self, user, count):
        keep = self.limits.max_pending_receipts
        self._new_receipts[user] += count
        if self._new_receipts[user] >= min(self.RECEIPT_TRIM_EVERY, keep):
            del self._new_receipts[user]
            if user not in self._trimming:
                self._trimming.add(user)
                trimmed = self.store.trim_receipts(user, keep)
                trimmed.addErrback(lambda f: self.log.failure("Dropping old receipts failed", f))
                trimmed.addBoth(lambda _: self._trimming.discard(user))

    def _offer_receipt(self, user, receipt):
        for session in list(self.online[user]):
            if session.receive:
                session.receipts.offer(receipt.rid, receipt)
            elif receipt.msg_id in session.sent:
                session._push_receipt(receipt)  # a send-only session waiting for its own message's receipt

    def start_expiry(self, interval=None):
        """Drop expired deliveries now and then, telling their senders."""
        if interval is None:
            interval = min(3600.0, self.limits.message_expiry / 10)
        self._expiry = self._every(interval, self.expire, "Message expiry failed", now=True)

    def _every(self, interval, f, failed, now):
        """Run coroutine function C{f} every C{interval} seconds; a run that fails is logged, and the next one comes."""
        async def run():
            try:
                await f()
            except Exception:
                self.log.failure(failed)
        loop = task.LoopingCall(run)
        loop.clock = self.reactor
        loop.start(interval, now=now).addErrback(lambda failure: self.log.failure(failed, failure))
        return loop

    def stop_expiry(self):
        """Stop the expiry sweep, and the reclaiming that acks schedule (from now on: the server is stopping)."""
        self._reclaim_stopped = True
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        call, self._reclaim_call = self._reclaim_call, None
        if call is not None and call.active():
            call.cancel()

    def stop_account_check(self):
        if self._account_check is not None and self._account_check.running:
            self._account_check.stop()

    async def expire(self):
        """Drop expired deliveries and receipts, then give the space they took back to the file system."""
        while True:
            expired = await self.store.expire(self.now())
            for sender, receipt in expired:
                self.log.info("A message from {sender} to {peer} expired undelivered", sender=sender,
                              peer=receipt.peer)
                self.receipt_created(sender, receipt)
            if len(expired) < EXPIRE_BATCH:
                break
        await self.store.expire_receipts(self.now() - self.limits.message_expiry)
        await self.store.forget_revoked(self.now() - REVOKED_KEPT)
        await self.reclaim()

    def settled(self):
        """
        Deliveries were settled, so space may be free: RECLAIM_DELAY seconds later (once, however many acks come
        meanwhile) the free pages are counted, and from RECLAIM_PAGES on they are given back at once.  The hourly
        sweep gives back the rest.
        """
        if self._reclaim_call is None and not self._reclaim_stopped:
            self._reclaim_call = self.reactor.callLater(self.RECLAIM_DELAY, self._reclaim_if_free)

    def _reclaim_if_free(self):
        async def run():
            try:
                if await self.store.free_pages() >= self.RECLAIM_PAGES:
                    await self.reclaim()
            finally:
                self._reclaim_call = None
        Deferred.fromCoroutine(run()).addErrback(lambda f: self.log.failure("Giving space back failed", f))

    async def reclaim(self):
        """
        Give the database's free pages (those of deleted messages) back to the file system, a bounded step at a
        time between other store work, then checkpoint so that the file shrinks.
        """
        left = None
        while left != 0:
            before, left = left, await self.store.vacuum_step(self.VACUUM_PAGES)
            if before is not None and left >= before:
                break  # a database without auto-vacuum gives nothing back
        await self.store.checkpoint()

    def start_account_check(self, interval=None):
        """
        Now and then, close the sessions whose account no longer exists with the key they logged in with: the
        operator's C{admin delete-user} and C{admin reset-key} change the database from another process.
        """
        self._account_check = self._every(interval or self.limits.account_check_interval, self.check_accounts,
                                          "Checking the logged-in accounts failed", now=False)

    async def check_accounts(self):
        names = sorted(self.online)
        if not names:
            return
        keys = await self.store.account_keys(names)
        for name in names:
            for session in list(self.online.get(name, ())):
                if keys.get(name) != session.key_fingerprint:
                    self.forget_devices([name])
                    session.account_gone()


def _exit_now(code):
    """End the process with C{code} at once, after flushing what is buffered for standard output and error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


class PagerService(service.Service):
    """Opens the store, then listens; on stop, stops listening, then closes the store."""

    log = Logger()

    def __init__(self, endpoint, store, factory, description, exit_on_failure=False):
        self.endpoint, self.store, self.factory, self.description = endpoint, store, factory, description
        self.exit_on_failure = exit_on_failure  # under twistd, which otherwise exits 0 whatever happened
        self.port = None
        self.ready = None

    def startService(self):
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())
        self.ready.addErrback(self._failed)

    async def _start(self):
        self.factory.server_id = await self.store.open()
        if self.factory.signatures is not None:
            self.factory.signatures.start()
        self.port = await self.endpoint.listen(self.factory)
        self.factory.start_expiry()
        self.factory.start_account_check()
        self.log.info("pager {version} listening on {address}, database {db}, server id {server_id}",
                      version=__version__, address=self.description, db=self.store.path,
                      server_id=self.factory.server_id)
        host = getattr(self.port.getHost(), "host", None)
        if not self.description.startswith("ssl:") and host is not None and not _is_local(self.port.getHost()):
            self.log.warn(
                "WARNING: listening without TLS on {host}: safetokens and who-pages-whom cross the network in "
                "clear text (message contents stay end-to-end encrypted). Use --tls-cert/--tls-key, or "
                "--listen tcp:{port}:interface=127.0.0.1 for local use.", host=host, port=self.port.getHost().port)
        return self.port

    def _failed(self, failure):
        error = failure.value
        self.log.critical("pager could not start: {error}",
                          error=error.message if isinstance(error, PagerError) else failure.getErrorMessage())
        reactor = self.factory.reactor
        if self.exit_on_failure:
            # twistd returns normally once the reactor stops, and its process then exits 0: exit 1 instead, last
            # of all, once twistd has removed its pid file and stopped its log.
            import atexit
            atexit.register(_exit_now, 1)
        if reactor.running:
            reactor.stop()
        return failure

    async def _stop(self):
        self.factory.stop_expiry()
        self.factory.stop_account_check()
        self.factory.stop_hashing()
        if self.port is not None:
            await self.port.stopListening()
        for connection in list(self.factory.protocols):
            connection.close()  # each is aborted after close_grace if its peer does not let it close sooner
        await self.factory.all_closed()
        if self.factory.signatures is not None:
            await self.factory.signatures.stop()
        self.store.close()

    def stopService(self):
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


#### Client ####

class Cancelled(PagerError):
    """Input ended before the command finished."""

    code = "cancelled"


RECEIPT_STATUSES = ("delivered", "rejected", "expired")


@dataclasses.dataclass(frozen=True)
class UsersPage:
    """
    One C{users} answer: up to a page of registered names (or of online names, when asked for those), which of them
    are online, how many names the listing has in all (registered, or online), how many users are online, and the
    name to ask after for the next page (None on the last).
    """

    registered: list
    online: list
    count: int
    online_count: int
    next: str = None


@dataclasses.dataclass(frozen=True)
class DeliveryReceipt:
    """What became of a message this client sent: C{status} is one of L{RECEIPT_STATUSES}."""

    rid: int
    message_id: str  # hex
    peer: str
    status: str
    reason: str
    at: float


class PagerClientProtocol(LineReceiver):
    """
    The client side of one connection: sends requests with fresh ids and fires their Deferreds with the answers;
    hands pushed frames (message, message_chunk, receipt) to its C{listener}.  Never prints.
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024  # until the server's hello says more
    log = Logger()

    def __init__(self):
        self.hello = Deferred()
        self.done = Deferred()  # fires with the reason when the connection is gone
        self.server_error = None  # an error frame without an id: why the server closed the connection
        self.challenge = None
        self.limits = {}
        self.listener = None
        self.flow = _Flow()
        self._pending = {}
        self._next_id = 0
        self.lost = None  # the error the connection ended with, once it has
        self.tls_failure = None  # a sentence, when the connection ended because TLS failed

    def connectionMade(self):
        _set_nodelay(self.transport)
        self.transport.registerProducer(self.flow, True)
        # Blank lines first: a pager server ignores them, a TLS port fails the handshake at once (six bytes fill a
        # TLS record header), so a plain client at a TLS port learns it in milliseconds, not after a timeout.
        self.transport.write(PROBE)

    def connectionLost(self, reason):
        self.tls_failure = _tls_failure(reason)
        error = self.lost = self.server_error or ConnectionLost()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(error)
        if not self.hello.called:
            self.hello.errback(error)
        self.flow.stopProducing()
        if self.listener is not None:
            self.listener.connection_lost(error)
        self.done.callback(error)

    def lineLengthExceeded(self, line):
        self.server_error = TooLarge("The server sent a line longer than %d bytes." % self.MAX_LENGTH)
        _lose(self.transport)

    def _refuse(self, why):
        # Not a warning: the reason becomes the connection's error, which whoever uses the connection reports.
        self.log.info("Closing the connection: {why}", why=why)
        self.server_error = BadRequest(why)
        _lose(self.transport)

    def lineReceived(self, line):
        try:
            frame = decode_frame(line)
        except BadRequest as e:
            return self._refuse("the server sent a bad frame: " + e.message)
        kind = frame["type"]
        if "challenge" in frame and kind != "hello":
            self._take_challenge(frame)
        if kind in ("ok", "error"):
            d = self._pending.pop(frame.get("id"), None)
            if kind == "ok" and d is not None:
                d.callback(frame)
            elif kind == "error":
                error = error_for_code(str(frame.get("code")), _error_sentence(frame.get("message")))
                if isinstance(error, RateLimited):
                    error.retry_after = _retry_after(frame.get("retry_after"))
                if d is not None:
                    d.errback(error)
                else:
                    self.server_error = error
        elif kind == "hello":
            self._hello(frame)
        elif kind in ("message", "message_chunk", "receipt", "prekeys_low", "linked", "link_expired",
                      "devices_changed", "group_changed") \
                and self.listener is not None:
            self.listener.frame_received(frame)

    def _take_challenge(self, frame):
        value = frame.get("challenge")
        try:
            challenge = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
        except ValueError:
            challenge = b""
        # A challenge that is not exactly 32 random bytes could be data a hostile server wants signed: never use it.
        self.challenge = challenge if len(challenge) == CHALLENGE_SIZE else None

    def _hello(self, frame):
        if self.hello.called:
            return
        version = frame.get("protocol")
        if type(version) is not int or version != PROTOCOL_VERSION:
            return self._refuse(_version_mismatch(version))
        self._take_challenge(frame)
        if self.challenge is None:
            return self._refuse("the server's login challenge is not %d bytes" % CHALLENGE_SIZE)
        limits = frame.get("limits")
        server_id, software = frame.get("server_id"), frame.get("server", "")
        if not isinstance(limits, dict) or not isinstance(server_id, str) or not SERVER_ID_RE.fullmatch(server_id) \
                or not isinstance(software, str) or (software and not SOFTWARE_RE.fullmatch(software)):
            return self._refuse("the server's hello is malformed")
        self.limits = limits
        max_line = limits.get("max_line")
        if isinstance(max_line, int) and not isinstance(max_line, bool):
            # Answers such as the user list may exceed the request limit: allow a generous margin.
            self.MAX_LENGTH = max(self.MAX_LENGTH, min(max_line, 64 * 1024 * 1024) + 4 * 1024 * 1024)
        self.hello.callback(frame)

    def send_frame(self, frame):
        self.transport.write(encode_frame(frame) + b"\n")

    def new_id(self):
        self._next_id += 1
        return self._next_id

    def request(self, kind, **fields):
        """Send a request; the Deferred fires with the C{ok} frame or fails with the error's exception."""
        rid = fields.pop("id", None) or self.new_id()
        if self.lost is not None:
            return defer.fail(self.lost)
        d = self._pending[rid] = Deferred()
        frame = {"type": kind, "id": rid}
        frame.update(fields)
        self.send_frame(frame)
        return d


def _version_mismatch(version):
    """Why this client refuses a server whose hello names protocol C{version}, and what to do about it."""
    ours = "this client (pager %s) speaks version %d" % (__version__, PROTOCOL_VERSION)
    if type(version) is not int:
        return ("the server's hello names no protocol version, and %s: it is not a pager server of this version"
                % ours)
    if version < PROTOCOL_VERSION:
        return ("the server speaks protocol version %d and %s: upgrade the server to pager %s or later"
                % (version, ours, __version__))
    return "the server speaks protocol version %d and %s: upgrade this client" % (version, ours)


def _error_sentence(message, limit=1000):
    """
    An error frame's C{message} as this client passes it on: one line (line breaks and runs of white space become
    one space, so a server cannot add lines of its own to a command's one-sentence error), at most C{limit}
    characters.  Control characters are left to the terminal's writer (L{SafeWriter}), like all text shown.
    """
    if not isinstance(message, str):
        return "(the server gave no reason)"
    message = " ".join(re.split(r"[\s\x1c-\x1f\x85\u2028\u2029]+", message)).strip()
    return message if len(message) <= limit else message[:limit] + "..."


def certificate_date_problem(host, port, timeout=5):
    """
    Why a server's certificate failed verification when it is a matter of dates (OpenSSL 3 only says "certificate
    verify failed"): the certificate is fetched again without verification, only to read its validity.  Blocking:
    call it off the reactor thread.  None when the dates are fine or it cannot be fetched.
    """
    import datetime
    import ssl
    from cryptography import x509
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (OSError, ValueError):
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        return "The server's TLS certificate expired on %s." % cert.not_valid_after_utc.strftime("%Y-%m-%d")
    if cert.not_valid_before_utc > now:
        return "The server's TLS certificate is not valid before %s." % cert.not_valid_before_utc.strftime(
            "%Y-%m-%d")
    return None


def _tls_failure(reason):
    """One sentence for a connection that ended because of TLS, or None."""
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - twisted[tls] is a dependency
        return None
    if reason.check(VerificationError):
        names = []
        for mismatch in getattr(reason.value, "errors", ()):
            wanted = getattr(mismatch, "mismatched_id", None)
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            if isinstance(name, bytes):
                name = name.decode("ascii", "replace")
            if name is not None and str(name) not in names:
                names.append(str(name))
        return ("The server's certificate is not valid for the host name %s; connect with a name the certificate "
                "was made for (its make-cert HOSTNAME or --ip)." % (" or ".join(names) or "connected to"))
    if not reason.check(SSL.Error):
        return None
    text = reason.getErrorMessage().lower()
    if "certificate has expired" in text or "certificate expired" in text:
        return "The server's TLS certificate has expired."
    if "certificate verify failed" in text or "self-signed" in text or "unable to get" in text:
        return ("The server's TLS certificate is not trusted: pass the certificate of the authority that signed "
                "it with --ca FILE.")
    if "wrong version number" in text or "packet length too long" in text or "record layer" in text \
            or "unexpected eof" in text or "http request" in text:
        return "The server does not speak TLS on this port: connect without --tls, or to its TLS port."
    return "The TLS handshake failed: %s." % reason.getErrorMessage()


def _abort_and_time_out(proto):
    if proto.transport is not None:
        proto.transport.abortConnection()
    raise defer.TimeoutError()


PREKEY_POOL_SIZE = 100  # one-time prekeys a device keeps on the server (PROTOCOL.md: at most 200)
PREKEY_POOL_LOW = 20  # below this many on the server (login answer, prekeys_low push), the device tops them up
PREKEY_BATCH = 100  # one-time prekeys one publish_prekeys frame carries
PREKEY_CHECK_INTERVAL = DAY / 4  # seconds between two looks at a logged-in device's prekeys (rotation, deletion)
PREKEY_VAULT_INFO = b"pager-prekey-vault-v1"
PREKEY_KINDS = ("signed", "one-time")
RESEAL_TRIES = 2  # times a message is sealed anew when the server says the recipients' devices changed


def prekey_vault_key(private_key):
    """
    The key that seals this device's prekey private parts at rest: HKDF-SHA256 of the device's private key (PKCS#8
    DER), so they are protected exactly like the key file (by its passphrase, or not at all with C{--no-passphrase}).
    """
    der = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PREKEY_VAULT_INFO).derive(der)


def _vault_ad(device, kind, prekey_id):
    return _lp(PREKEY_VAULT_INFO) + _lp(device) + _lp(kind.encode("ascii")) + _U32.pack(prekey_id)


def seal_prekey_private(vault, device, kind, prekey_id, private_key):
    """A prekey's X25519 private part sealed with AES-256-GCM under C{vault}: 12 bytes of nonce, then 48."""
    raw = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(vault).encrypt(nonce, raw, _vault_ad(device, kind, prekey_id))


def open_prekey_private(vault, device, kind, prekey_id, sealed):
    """The X25519 private key L{seal_prekey_private} sealed; L{PrekeyUnavailable} if it does not open."""
    try:
        raw = AESGCM(vault).decrypt(bytes(sealed[:12]), bytes(sealed[12:]), _vault_ad(device, kind, prekey_id))
    except InvalidTag:
        raise PrekeyUnavailable("The %s prekey %d kept on this machine does not open with this device's key."
                                % (kind, prekey_id))
    return x25519.X25519PrivateKey.from_private_bytes(raw)


@dataclasses.dataclass(frozen=True)
class LocalPrekey:
    """
    One of this device's prekeys as this machine keeps it: C{kind} is C{signed} or C{one-time}, C{private_enc} its
    private part sealed under the vault key (L{seal_prekey_private}).  A signed prekey has its validity and, once a
    newer one took its place, C{replaced_at}; its private part is deleted a grace period after that.
    """

    kind: str
    prekey_id: int
    public: bytes
    private_enc: bytes
    valid_from: int = None
    valid_until: int = None
    created: float = 0.0
    replaced_at: float = None


class OpeningPrekeys:
    """
    The private prekeys one message needs, decrypted, as the L{Opener} asks for them: C{signed_private(id)},
    C{signed_valid(id)} and C{one_time_private(id)}, each None when the prekey is gone.  A private part is
    decrypted when the Opener asks for it, so on the thread that opens the message, not where this is made.
    """

    def __init__(self, vault, device, signed=None, one_time=None):
        self._vault, self._device = vault, device
        self._signed = signed if signed is not None and signed.private_enc is not None else None
        self._one_time = one_time if one_time is not None and one_time.private_enc is not None else None

    def signed_private(self, prekey_id):
        signed = self._signed
        if signed is None or signed.prekey_id != prekey_id:
            return None
        return open_prekey_private(self._vault, self._device, "signed", prekey_id, signed.private_enc)

    def signed_valid(self, prekey_id):
        signed = self._signed
        return (signed.valid_from, signed.valid_until) if signed is not None and signed.prekey_id == prekey_id else None

    def one_time_private(self, prekey_id):
        one_time = self._one_time
        if one_time is None or one_time.prekey_id != prekey_id:
            return None
        return open_prekey_private(self._vault, self._device, "one-time", prekey_id, one_time.private_enc)


def make_prekeys(device_key, user, vault, now, signed=True, one_time=0, taken=()):
    """
    Fresh prekeys for the device of C{device_key}: C{(signed prekey or None, [OneTimePrekey], [LocalPrekey])}, the
    signed one valid from C{now} for L{PREKEY_LIFETIME}, each under a random id not in C{taken}.  X25519 and an RSA
    signature: off the reactor thread.
    """
    device = device_id(device_key)
    taken = set(taken)

    def new_id():
        while True:
            prekey_id = secrets.randbelow(2 ** 32 - 1) + 1
            if prekey_id not in taken:
                taken.add(prekey_id)
                return prekey_id

    now = int(now)
    rows, spk, opks = [], None, []
    if signed:
        private = x25519.X25519PrivateKey.generate()
        spk = sign_prekey(device_key, user, new_id(), x25519_public_bytes(private), now, now + PREKEY_LIFETIME)
        rows.append(LocalPrekey("signed", spk.prekey_id, spk.public,
                                seal_prekey_private(vault, device, "signed", spk.prekey_id, private),
                                spk.valid_from, spk.valid_until, now))
    for _ in range(one_time):
        private = x25519.X25519PrivateKey.generate()
        opk = OneTimePrekey(new_id(), x25519_public_bytes(private))
        opks.append(opk)
        rows.append(LocalPrekey("one-time", opk.prekey_id, opk.public,
                                seal_prekey_private(vault, device, "one-time", opk.prekey_id, private), created=now))
    return spk, opks, rows


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """
    One of a user's devices as this client verified it against the user's pinned identity key: C{certificate} (the
    identity key's signature, None for a legacy device, whose key is the identity key itself), C{revoked_at} and
    C{revocation} once revoked, C{prekeys} whether it ever published prekeys, C{first_seen} when this client first
    saw it, C{last_seen} (only for the user's own devices, as the server says).
    """

    user: str
    device_id: bytes
    public_key_der: bytes
    name: str = None
    created: int = None
    certificate: bytes = None
    revoked_at: int = None
    revocation: bytes = None
    prekeys: bool = False
    first_seen: float = 0.0
    last_seen: float = None

    @property
    def id(self):
        """The device id as the wire writes it: 32 hex digits."""
        return self.device_id.hex()

    @property
    def short_id(self):
        """The first 8 hex digits of the id in two groups (C{1a2b 3c4d}), to name a device in a line of text."""
        return "%s %s" % (self.id[:4], self.id[4:8])

    @property
    def certified(self):
        return self.certificate is not None

    @property
    def revoked(self):
        return self.revoked_at is not None

    def public_key(self):
        return serialization.load_der_public_key(self.public_key_der)


@dataclasses.dataclass(frozen=True)
class KnownDevices:
    """
    What a client keeps about one user's devices: the fingerprint of the identity key they were verified against,
    whether a certified device of the user was ever seen (from then on, no device of theirs is RSA-wrapped) and the
    devices (L{DeviceInfo}, revoked ones included).
    """

    identity: bytes
    certified_seen: bool
    devices: tuple

    def find(self, device):
        for info in self.devices:
            if info.device_id == device:
                return info
        return None


class MemoryPrekeys:
    """
    Prekeys kept in memory only, per device id: the state a test gives every session of one device (and the
    default of a L{MemorySeen}, for a client that never opens a L{LocalStore}).
    """

    def __init__(self):
        self._rows = {}  # (device, kind, id) -> LocalPrekey
        self.handed = set()  # (sender, message id) that a session of one of these devices stored

    def local_prekeys(self, device):
        return defer.succeed([p for (d, _, _), p in sorted(self._rows.items()) if d == device])

    def add_prekeys(self, device, prekeys, now):
        if any(p.kind == "signed" for p in prekeys):
            for key, p in list(self._rows.items()):
                if key[0] == device and p.kind == "signed" and p.replaced_at is None:
                    self._rows[key] = dataclasses.replace(p, replaced_at=now)
        for p in prekeys:
            self._rows[(device, p.kind, p.prekey_id)] = p
        return defer.succeed(None)

    def prekey_privates(self, device, signed_id, one_time_id):
        return defer.succeed((self._rows.get((device, "signed", signed_id)),
                              self._rows.get((device, "one-time", one_time_id))))

    def forget_prekeys(self, device, replaced_before):
        gone = [key for key, p in self._rows.items() if key[0] == device and p.kind == "signed"
                and p.replaced_at is not None and p.replaced_at <= replaced_before]
        for key in gone:
            del self._rows[key]
        return defer.succeed(len(gone))

    def use_one_time(self, device, prekey_id):
        self._rows.pop((device, "one-time", prekey_id), None)


class MemorySeen:
    """
    The duplicate store kept in memory only: a L{PagerClient}'s until its session opens the user's L{LocalStore}
    (and for scripts without a home directory).  Its device's prekeys are kept in C{prekeys} (a L{MemoryPrekeys},
    which tests share between the sessions of one device).
    """

    window = None  # it forgets nothing while the process lives

    def __init__(self, prekeys=None):
        self._seen = set()
        self.prekeys = prekeys if prekeys is not None else MemoryPrekeys()

    def contains(self, sender, msg_id, anywhere=False):
        """Whether this store recorded the pair; with C{anywhere}, whether any session of its device did."""
        pair = (sender, bytes(msg_id))
        return defer.succeed(pair in self._seen or (anywhere and pair in self.prekeys.handed))

    def add(self, sender, msg_id, now, used=None):
        """
        Record the message as handed off; C{used} is C{(device, one-time prekey id)} whose private part goes with it
        (in the same transaction, for a store on disk).
        """
        self._seen.add((sender, bytes(msg_id)))
        self.prekeys.handed.add((sender, bytes(msg_id)))
        if used is not None:
            self.prekeys.use_one_time(*used)
        return defer.succeed(None)

    def hold_history(self, msg_id):
        """Nothing to hold: a store in memory keeps no history."""

    def release_history(self):
        pass

    def local_prekeys(self, device):
        return self.prekeys.local_prekeys(device)

    def add_prekeys(self, device, prekeys, now):
        return self.prekeys.add_prekeys(device, prekeys, now)

    def prekey_privates(self, device, signed_id, one_time_id):
        return self.prekeys.prekey_privates(device, signed_id, one_time_id)

    def forget_prekeys(self, device, replaced_before):
        return self.prekeys.forget_prekeys(device, replaced_before)

    def close(self):
        pass


class MemoryPins:
    """Pinned keys (and the devices verified against them) kept in memory only: trust on first use for one process."""

    def __init__(self):
        self._pins = {}
        self._former = {}  # user -> {fingerprint: at}: identity keys the user had before (L{LocalStore.former_keys})
        self._devices = {}  # user -> KnownDevices
        self._revocations = {}  # (user, identity fingerprint) -> {device id: (revoked at, signature)}, kept for good
        self._groups = {}  # gid -> (gid, name, seq, head, member, broken, unread, [(seq, op, signature, key)])
        self._group_sent = {}  # msg id (hex) -> (gid, members)
        self._group_refused = {}  # gid -> (seq, digest) of the op refused after the verified head
        self._group_receipts = {}  # msg id (hex) -> {user: (status, at, reason)}

    def get_pin(self, user):
        return defer.succeed(self._pins.get(user))

    def set_pin(self, user, pem, fp, now):
        self._pins[user] = (pem, fp, now, False)
        return defer.succeed(None)

    def set_verified(self, user, fp):
        pin = self._pins.get(user)
        if pin is None or pin[1] != fp:
            return defer.succeed(False)
        self._pins[user] = pin[:3] + (True,)
        return defer.succeed(True)

    def former_keys(self, user):
        return defer.succeed(frozenset(self._former.get(user, ())))

    def add_former_key(self, user, fp, now):
        self._former.setdefault(user, {}).setdefault(bytes(fp), now)
        return defer.succeed(None)

    def get_devices(self, user):
        """The L{KnownDevices} of C{user}, or None."""
        return defer.succeed(self._devices.get(user))

    def set_devices(self, user, identity, devices):
        """Replace C{user}'s devices with C{devices}, verified against the identity key of fingerprint C{identity}."""
        old = self._devices.get(user)
        seen = (old is not None and old.certified_seen) or any(d.certified for d in devices)
        self._devices[user] = KnownDevices(identity, seen, tuple(devices))
        kept = self._revocations.setdefault((user, identity), {})
        for d in devices:
            if d.revocation is not None:
                kept.setdefault(d.device_id, (d.revoked_at, d.revocation))
        return defer.succeed(None)

    def get_revocations(self, user, identity):
        """The revocations of C{user}'s devices verified against the identity C{identity}, kept for good."""
        return defer.succeed(dict(self._revocations.get((user, identity), {})))

    # -- groups, as L{LocalStore} keeps them --

    def group_rows(self):
        return defer.succeed(sorted((row[:7] for row in self._groups.values()), key=lambda r: (r[1], r[0])))

    def group_ops(self, gid):
        return defer.succeed(list(self._groups[gid][7]) if gid in self._groups else [])

    def group_refused(self, gid):
        return defer.succeed(self._group_refused.get(gid))

    def set_group_refused(self, gid, refused):
        if refused is None:
            self._group_refused.pop(gid, None)
        else:
            self._group_refused[gid] = tuple(refused)
        return defer.succeed(None)

    def save_group(self, gid, name, seq, head, member, broken, ops):
        old = self._groups.get(gid)
        kept = {op[0]: op for op in (old[7] if old else [])}
        kept.update((op[0], op) for op in ops)
        ops = [kept[n] for n in sorted(kept) if n <= seq]
        self._groups[gid] = (gid, name, seq, head, bool(member), broken, old[6] if old else 0, ops)
        return defer.succeed(None)

    def group_unread(self, gid, count=None, add=0):
        row = self._groups.get(gid)
        if row is None:
            return defer.succeed(0)
        unread = count if count is not None else row[6] + add
        self._groups[gid] = row[:6] + (unread, row[7])
        return defer.succeed(unread)

    def add_group_sent(self, msg_id, gid, members):
        self._group_sent[msg_id] = (gid, sorted(members))
        return defer.succeed(None)

    def group_sent(self, msg_id):
        return defer.succeed(self._group_sent.get(msg_id))

    def add_group_receipt(self, msg_id, user, status, at, reason=""):
        self._group_receipts.setdefault(msg_id, {})[user] = (status, at, reason)
        return defer.succeed(None)

    def group_receipts(self, msg_id):
        return defer.succeed(dict(sorted(self._group_receipts.get(msg_id, {}).items())))


KEY_STATUSES = ("new", "pinned", "verified", "changed")


def key_status(pin, fp):
    """
    How the key C{fp} compares with C{pin} (a pins store's C{(pem, fingerprint, pinned_at, verified)}, or None):
    C{new} (nothing pinned yet), C{pinned} (the pinned key, trusted on first use or with C{trust}), C{verified}
    (the pinned key, and its fingerprint was compared out of band: C{verify}) or C{changed} (not the pinned key).
    """
    if pin is None:
        return "new"
    if bytes(pin[1]) != fp:
        return "changed"
    return "verified" if pin[3] else "pinned"


_PREKEYS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS prekeys (device BLOB NOT NULL, kind TEXT NOT NULL, id INTEGER NOT NULL,"
    " public BLOB NOT NULL, private_enc BLOB NOT NULL, valid_from INTEGER, valid_until INTEGER, created REAL NOT NULL,"
    " replaced_at REAL, PRIMARY KEY (device, kind, id)) WITHOUT ROWID")


def _seen_schema_txn(txn, keep_until):
    txn.execute("CREATE TABLE IF NOT EXISTS seen (sender TEXT NOT NULL, msg_id BLOB NOT NULL, at REAL NOT NULL,"
                " PRIMARY KEY (sender, msg_id)) WITHOUT ROWID")
    txn.execute("DELETE FROM seen WHERE at < ?", (keep_until,))
    txn.execute(_PREKEYS_SCHEMA)


def _seen_contains_txn(txn, sender, msg_id, before):
    return txn.execute("SELECT 1 FROM seen WHERE sender = ? AND msg_id = ? AND at < ?",
                       (sender, msg_id, before)).fetchone() is not None


def _seen_add_txn(txn, sender, msg_id, now, used=None, history=()):
    """
    Record a message handed off, its C{history} entries, and delete the one-time prekey it used (C{used}: device,
    id), in one transaction: a failure leaves none of them done.
    """
    for entry in history:
        _add_history_txn(txn, entry)
    txn.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (sender, msg_id, now))
    if used is None:
        return 0
    txn.execute("DELETE FROM prekeys WHERE device = ? AND kind = 'one-time' AND id = ?", used)
    return txn.rowcount


_PREKEY_COLUMNS = "kind, id, public, private_enc, valid_from, valid_until, created, replaced_at"


def _local_prekey(row):
    return LocalPrekey(row[0], row[1], bytes(row[2]), bytes(row[3]), row[4], row[5], row[6], row[7])


def _local_prekeys_txn(txn, device):
    return [_local_prekey(row) for row in txn.execute(
        "SELECT " + _PREKEY_COLUMNS + " FROM prekeys WHERE device = ? ORDER BY kind, id", (device,))]


def _add_prekeys_txn(txn, device, prekeys, now):
    if any(p.kind == "signed" for p in prekeys):
        txn.execute("UPDATE prekeys SET replaced_at = ? WHERE device = ? AND kind = 'signed' AND replaced_at IS NULL",
                    (now, device))
    txn.executemany("INSERT OR REPLACE INTO prekeys (device, " + _PREKEY_COLUMNS + ")"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(device, p.kind, p.prekey_id, p.public, p.private_enc, p.valid_from, p.valid_until, p.created,
                      p.replaced_at) for p in prekeys])


def _prekey_privates_txn(txn, device, signed_id, one_time_id):
    found = []
    for kind, prekey_id in (("signed", signed_id), ("one-time", one_time_id)):
        row = txn.execute("SELECT " + _PREKEY_COLUMNS + " FROM prekeys WHERE device = ? AND kind = ? AND id = ?",
                          (device, kind, prekey_id)).fetchone()
        found.append(None if row is None else _local_prekey(row))
    return tuple(found)


def _forget_prekeys_txn(txn, device, replaced_before):
    txn.execute("DELETE FROM prekeys WHERE device = ? AND kind = 'signed' AND replaced_at IS NOT NULL"
                " AND replaced_at <= ?", (device, replaced_before))
    return txn.rowcount


class SeenStore:
    """
    The client's persistent duplicate store: the (verified sender, message id) pairs already handed to the user,
    kept as long as the server may still redeliver them (its message expiry, plus a day).

    Several sessions of one user on one machine share the file, and the server pushes each message to every one
    of them: a pair another session recorded after this store was opened is one this session is being handed too,
    not a duplicate, so each session shows every message once.  A duplicate is a pair recorded before this store
    was opened (by an earlier session), or one this store recorded itself (kept in memory while the server may
    still redeliver it).
    """

    def __init__(self, path, reactor=None):
        kwargs = {"cp_reactor": reactor} if reactor is not None else {}
        self.pool = adbapi.ConnectionPool("sqlite3", path, cp_min=1, cp_max=1, check_same_thread=False,
                                          cp_openfun=prepare_connection, **kwargs)
        self.opened_at = math.inf  # pairs recorded before this are duplicates
        self._keep = seen_keep({})
        self._handed = {}  # (sender, message id) -> when this store recorded it
        self._prune_at = 1000
        self._held = None  # (message id hex, [HistoryEntry]): what add() writes in its transaction (hold_history)

    @property
    def window(self):
        """Seconds this store remembers a pair (L{seen_keep}): a message signed longer ago may be a forgotten one."""
        return self._keep

    def _opening(self, now, keep):
        if keep is None:
            keep = seen_keep({})
        elif isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep):
            keep = Limits.message_expiry + SEEN_MARGIN
        # Never shorter than the default window, nor longer than MAX_SEEN_KEEP: whatever the caller took from a hello.
        keep = min(max(keep, Limits.message_expiry + SEEN_MARGIN), MAX_SEEN_KEEP)
        self.opened_at, self._keep = now, keep
        return now - keep

    def open(self, now, keep=None):
        """Open the store at C{now}, forgetting pairs older than C{keep} seconds (L{seen_keep} of the hello)."""
        return self.pool.runInteraction(_seen_schema_txn, self._opening(now, keep))

    def contains(self, sender, msg_id, anywhere=False):
        """Whether the pair is a duplicate (see above); with C{anywhere}, whether any session recorded it."""
        if (sender, bytes(msg_id)) in self._handed:
            return defer.succeed(True)
        return self.pool.runInteraction(_seen_contains_txn, sender, msg_id, math.inf if anywhere else self.opened_at)

    def add(self, sender, msg_id, now, used=None):
        """
        Record the message as handed off; C{used} is C{(device, one-time prekey id)}: that prekey's private part is
        deleted in the same transaction (with the history entries held for it, L{hold_history}), and the WAL then
        emptied, so that no copy of it stays on disk.
        """
        history = self._held[1] if self._held is not None and self._held[0] == bytes(msg_id).hex() else ()
        self._held = None
        self._handed[(sender, bytes(msg_id))] = now
        if len(self._handed) > self._prune_at:  # forget what the server can no longer redeliver
            self._handed = {pair: at for pair, at in self._handed.items() if at >= now - self._keep}
            self._prune_at = 2 * len(self._handed) + 1000
        d = self.pool.runInteraction(_seen_add_txn, sender, msg_id, now, used, history)
        d.addCallback(self._wipe_if, None)
        return d

    def hold_history(self, msg_id):
        """
        While message C{msg_id} (hex) is handed off: the history entries recorded for it wait, to be written by
        L{add} in the transaction that records it as seen and deletes its one-time prekey (see L{release_history}).
        """
        self._held = (msg_id, [])

    def release_history(self):
        """The hand-off failed: the held history entries are dropped (the message is not stored; it comes again)."""
        self._held = None

    def _wipe_if(self, deleted, result):
        """After private parts were deleted: copy the WAL into the database and truncate it (secure_delete zeroed the
        rows in the database; the WAL still held the pages as they were)."""
        if not deleted:
            return result
        d = self.pool.runWithConnection(checkpoint)
        d.addCallback(lambda _: result)
        return d

    def local_prekeys(self, device):
        """This device's prekeys kept here (L{LocalPrekey}s)."""
        return self.pool.runInteraction(_local_prekeys_txn, device)

    def add_prekeys(self, device, prekeys, now):
        """Keep new prekeys; a new signed one marks the current one replaced at C{now}."""
        return self.pool.runInteraction(_add_prekeys_txn, device, prekeys, now)

    def prekey_privates(self, device, signed_id, one_time_id):
        """C{(signed, one-time)}: the L{LocalPrekey}s of those ids kept here, each None when gone."""
        return self.pool.runInteraction(_prekey_privates_txn, device, signed_id, one_time_id)

    def forget_prekeys(self, device, replaced_before):
        """Delete the signed prekeys replaced at or before C{replaced_before} (then empty the WAL); returns how many."""
        d = self.pool.runInteraction(_forget_prekeys_txn, device, replaced_before)
        d.addCallback(lambda count: self._wipe_if(count, count))
        return d

    def close(self):
        self.pool.close()


_LOCAL_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS pins (user TEXT PRIMARY KEY, public_key TEXT NOT NULL, fingerprint BLOB NOT NULL,"
    " pinned_at REAL NOT NULL, verified INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
    " direction TEXT NOT NULL, peer TEXT NOT NULL, msg_id TEXT NOT NULL, content_type TEXT NOT NULL,"
    " filename TEXT NOT NULL, body BLOB NOT NULL, status TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS history_peer ON history(peer, id)",
    "CREATE INDEX IF NOT EXISTS history_msg ON history(msg_id)",  # receipts update their message's entry
    # The outbox: each message typed in the chat, from Enter until the server accepts or refuses it.  ref is the
    # short reference the chat shows (#12); the envelope is sealed once, just before the first try, and kept, so
    # that a try whose answer was lost is resent as the same message (the server's idempotent resend).  Once
    # accepted, the text and envelope are erased and the row stays, with sent_at, to name the message in receipts.
    "CREATE TABLE IF NOT EXISTS outbox (ref INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
    " recipients TEXT NOT NULL, content_type TEXT NOT NULL, filename TEXT NOT NULL, body BLOB NOT NULL,"
    " msg_id TEXT, header BLOB, chunks BLOB, signature BLOB, sent_at REAL)",
    "CREATE INDEX IF NOT EXISTS outbox_msg ON outbox(msg_id)",
    # Contacts' devices (and the user's own), each verified against the identity key of fingerprint
    # device_owners.identity before it was stored; device_owners.certified: a certified device of the user was seen,
    # so none of theirs is ever wrapped with RSA-OAEP again (no downgrade by a server that withholds prekeys).
    "CREATE TABLE IF NOT EXISTS devices (user TEXT NOT NULL, device_id BLOB NOT NULL, public_key BLOB NOT NULL,"
    " name TEXT, created INTEGER, certificate BLOB, revoked_at INTEGER, revocation BLOB, prekeys INTEGER NOT NULL,"
    " first_seen REAL NOT NULL, PRIMARY KEY (user, device_id))",
    "CREATE TABLE IF NOT EXISTS device_owners (user TEXT PRIMARY KEY, identity BLOB NOT NULL,"
    " certified INTEGER NOT NULL)",
    # Every revocation verified against a user's identity key (of fingerprint identity), kept for good: also once the
    # server stops listing the device, so that no server can make a revoked device current again.
    "CREATE TABLE IF NOT EXISTS device_revocations (user TEXT NOT NULL, identity BLOB NOT NULL,"
    " device_id BLOB NOT NULL, revoked_at INTEGER NOT NULL, revocation BLOB NOT NULL,"
    " PRIMARY KEY (user, identity, device_id)) WITHOUT ROWID",
    # The revocations a store of before that table holds in its devices table.
    "INSERT OR IGNORE INTO device_revocations SELECT d.user, o.identity, d.device_id, d.revoked_at, d.revocation"
    " FROM devices d JOIN device_owners o ON o.user = d.user WHERE d.revocation IS NOT NULL",
    # Groups: each one's membership chain as far as this client verified it (group_ops: every op with its signature
    # and the PEM of the key that signed it), its head (the last verified op's hash), whether this user is a member
    # at that head, and why the chain stopped verifying (broken: a sentence, or NULL).
    "CREATE TABLE IF NOT EXISTS groups (gid BLOB PRIMARY KEY, name TEXT NOT NULL, seq INTEGER NOT NULL,"
    " head BLOB NOT NULL, member INTEGER NOT NULL, broken TEXT, unread INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS group_ops (gid BLOB NOT NULL, seq INTEGER NOT NULL, op BLOB NOT NULL,"
    " signature BLOB NOT NULL, key TEXT NOT NULL, PRIMARY KEY (gid, seq)) WITHOUT ROWID",
    # The group messages this user sent: the members each was sealed for (JSON), and what each member's receipt said.
    "CREATE TABLE IF NOT EXISTS group_sent (msg_id TEXT PRIMARY KEY, gid BLOB NOT NULL, members TEXT NOT NULL)",
    # The op refused right after a group's verified head (its SHA-256): only that op can take the chain on.
    "CREATE TABLE IF NOT EXISTS group_refused (gid BLOB PRIMARY KEY, seq INTEGER NOT NULL, digest BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS group_receipts (msg_id TEXT NOT NULL, user TEXT NOT NULL, status TEXT NOT NULL,"
    " at REAL NOT NULL, reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (msg_id, user)) WITHOUT ROWID",
    # The identity keys this machine's user had before the one of now: each replaced by a re-key or recovery made
    # here, or taken on first use from a group chain read here from its start.  A group op the user signed with one
    # of them is the user's own, up to the first op in the chain signed with the key of now
    # (L{PagerClient._own_op_trusted}).
    "CREATE TABLE IF NOT EXISTS former_keys (user TEXT NOT NULL, fingerprint BLOB NOT NULL, at REAL NOT NULL,"
    " PRIMARY KEY (user, fingerprint)) WITHOUT ROWID",
]


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    at: float
    direction: str  # "in" or "out"
    peer: str  # the sender of an incoming message, the recipients (comma-separated) of an outgoing one
    msg_id: str
    content_type: str
    filename: str
    body: bytes
    status: str
    group: str = None  # a group message's group id (32 hex digits); None for a 1:1 message


@dataclasses.dataclass(frozen=True)
class OutboxEntry:
    """A message in the outbox: C{envelope} is None until it has been sealed, C{msg_id} (hex) too."""

    ref: int
    at: float
    recipients: list
    content_type: str
    filename: str
    body: bytes
    msg_id: str = None
    envelope: Envelope = None


def _local_schema_txn(txn, keep_until):
    _seen_schema_txn(txn, keep_until)
    for statement in _LOCAL_SCHEMA:
        txn.execute(statement)
    if "verified" not in [row[1] for row in txn.execute("PRAGMA table_info(pins)")]:
        txn.execute("ALTER TABLE pins ADD COLUMN verified INTEGER NOT NULL DEFAULT 0")  # 1: compared out of band
    if not txn.execute("SELECT 1 FROM sqlite_master WHERE name = 'history_in'").fetchone():
        # Each incoming message once, however many sessions of the user on this machine were handed it.
        txn.execute("DELETE FROM history WHERE direction = 'in' AND id NOT IN"
                    " (SELECT MIN(id) FROM history WHERE direction = 'in' GROUP BY msg_id, peer)")
        txn.execute("CREATE UNIQUE INDEX IF NOT EXISTS history_in ON history(msg_id, peer) WHERE direction = 'in'")
    if "grp" not in [row[1] for row in txn.execute("PRAGMA table_info(history)")]:
        txn.execute("ALTER TABLE history ADD COLUMN grp TEXT")  # a group message's group id (hex), else NULL
    if "reason" not in [row[1] for row in txn.execute("PRAGMA table_info(group_receipts)")]:
        txn.execute("ALTER TABLE group_receipts ADD COLUMN reason TEXT NOT NULL DEFAULT ''")  # why a member refused
    # Sent messages are named in receipts for as long as the server may send one (its expiry, plus a day).
    txn.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (keep_until,))


def _outbox_add_txn(txn, at, recipients, content_type, filename, body):
    txn.execute("INSERT INTO outbox (at, recipients, content_type, filename, body) VALUES (?, ?, ?, ?, ?)",
                (at, ",".join(recipients), content_type, filename, body))
    return txn.lastrowid


def _split_chunks(header, data):
    """The chunk ciphertexts of an envelope stored end to end: all full (chunk size + tag) but the last."""
    size = parse_header(header).chunk_size + GCM_TAG_SIZE
    return [data[i:i + size] for i in range(0, len(data), size)]


def _outbox_entry(row):
    envelope = None
    if row[7] is not None:
        header = bytes(row[7])
        envelope = Envelope(header, _split_chunks(header, bytes(row[8])), bytes(row[9]))
    return OutboxEntry(row[0], row[1], row[2].split(","), row[3], row[4], bytes(row[5]), row[6], envelope)


_OUTBOX_COLUMNS = "ref, at, recipients, content_type, filename, body, msg_id, header, chunks, signature"


def _outbox_next_txn(txn):
    row = txn.execute("SELECT " + _OUTBOX_COLUMNS + " FROM outbox WHERE sent_at IS NULL ORDER BY ref LIMIT 1"
                      ).fetchone()
    return None if row is None else _outbox_entry(row)


def _outbox_waiting_txn(txn):
    return txn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0]


def _outbox_sealed_txn(txn, ref, envelope, replace=False):
    # Only the first envelope sealed for a message is kept (another chat of this user on this machine, sharing the
    # file, may have sealed it meanwhile): every flusher then sends that one, which the server takes as one message.
    # With replace (the message sealed anew, same id, for devices that changed) the new envelope takes its place.
    msg_id = parse_header(envelope.header).message_id.hex()
    txn.execute("UPDATE outbox SET msg_id = ?, header = ?, chunks = ?, signature = ?"
                " WHERE ref = ? AND sent_at IS NULL" + ("" if replace else " AND header IS NULL"),
                (msg_id, envelope.header, b"".join(envelope.chunks), envelope.signature, ref))
    row = txn.execute("SELECT " + _OUTBOX_COLUMNS + " FROM outbox WHERE ref = ? AND sent_at IS NULL",
                      (ref,)).fetchone()
    return None if row is None else _outbox_entry(row).envelope


def _outbox_sent_txn(txn, ref, msg_id, now, history):
    txn.execute("UPDATE outbox SET msg_id = ?, sent_at = ?, body = x'', header = NULL, chunks = NULL,"
                " signature = NULL WHERE ref = ? AND sent_at IS NULL", (msg_id, now, ref))
    if history is not None and txn.rowcount:  # recorded once, by whichever chat heard the server accept it first
        _add_history_txn(txn, history)


def _outbox_refused_txn(txn, ref, history):
    txn.execute("DELETE FROM outbox WHERE ref = ? AND sent_at IS NULL", (ref,))
    if history is not None and txn.rowcount:
        _add_history_txn(txn, history)


def _sent_message_txn(txn, msg_id):
    """C{(ref, preview)} of a message this user sent: its outbox reference and its history entry (each or None)."""
    row = txn.execute("SELECT ref FROM outbox WHERE msg_id = ?", (msg_id,)).fetchone()
    entry = txn.execute("SELECT content_type, filename, body FROM history WHERE msg_id = ? AND direction = 'out'"
                        " ORDER BY id LIMIT 1", (msg_id,)).fetchone()
    return (row[0] if row else None,
            message_preview(entry[0], entry[1], bytes(entry[2])) if entry else None)


PREVIEW_LENGTH = 30  # characters of a message's text that name it in the chat's ticks


def message_preview(content_type, filename, body, length=PREVIEW_LENGTH):
    """The first words of a message, on one line, to name it: C{"disk full on…"}, or C{file NAME}."""
    if content_type == "file":
        return "file " + filename
    text = " ".join(body.decode("utf-8", "replace").split())
    if len(text) <= length:
        return '"%s"' % text
    cut = text[:length]
    if text[length] != " " and " " in cut[length // 2:]:
        cut = cut[:cut.rindex(" ")]  # not in the middle of a word
    return '"%s\u2026"' % cut


def _get_pin_txn(txn, user):
    row = txn.execute("SELECT public_key, fingerprint, pinned_at, verified FROM pins WHERE user = ?",
                      (user,)).fetchone()
    return (row[0], bytes(row[1]), row[2], bool(row[3])) if row else None


def _set_pin_txn(txn, user, pem, fp, now):
    # A new pin is not verified: whoever verified the old key compared another fingerprint.
    txn.execute("INSERT OR REPLACE INTO pins (user, public_key, fingerprint, pinned_at, verified)"
                " VALUES (?, ?, ?, ?, 0)", (user, pem, fp, now))


def _set_verified_txn(txn, user, fp):
    return txn.execute("UPDATE pins SET verified = 1 WHERE user = ? AND fingerprint = ?", (user, fp)).rowcount == 1


def _former_keys_txn(txn, user):
    return frozenset(bytes(r[0]) for r in txn.execute("SELECT fingerprint FROM former_keys WHERE user = ?", (user,)))


def _add_former_key_txn(txn, user, fp, now):
    txn.execute("INSERT OR IGNORE INTO former_keys (user, fingerprint, at) VALUES (?, ?, ?)", (user, fp, now))


def _key_status_txn(txn, user, current):
    return key_status(_get_pin_txn(txn, user), current)


def _add_history_txn(txn, entry):
    # OR IGNORE: another session of the user on this machine may have recorded the incoming message already.
    txn.execute("INSERT OR IGNORE INTO history (at, direction, peer, msg_id, content_type, filename, body, status,"
                " grp) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(entry))


def _set_history_status_txn(txn, msg_id, status):
    txn.execute("UPDATE history SET status = ? WHERE msg_id = ? AND direction = 'out'", (status, msg_id))


def _like_literal(text):
    """C{text} as an SQL LIKE pattern that matches only itself (with C{ESCAPE '\\'}): '_' and '%' are not wildcards."""
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


def _history_status_txn(txn, msg_id):
    row = txn.execute("SELECT status FROM history WHERE msg_id = ? AND direction = 'out'", (msg_id,)).fetchone()
    return None if row is None else row[0]


_HISTORY_COLUMNS = "at, direction, peer, msg_id, content_type, filename, body, status, grp"


def _history_txn(txn, peer, limit, group=None):
    if group is not None:
        rows = txn.execute("SELECT " + _HISTORY_COLUMNS + " FROM history WHERE grp = ? ORDER BY id DESC LIMIT ?",
                           (group, limit)).fetchall()
    elif peer is None:
        rows = txn.execute("SELECT " + _HISTORY_COLUMNS + " FROM history ORDER BY id DESC LIMIT ?",
                           (limit,)).fetchall()
    else:
        rows = txn.execute(
            "SELECT " + _HISTORY_COLUMNS + " FROM history WHERE grp IS NULL AND"
            " (peer = ? OR ',' || peer || ',' LIKE ? ESCAPE '\\') ORDER BY id DESC LIMIT ?",
            (peer, "%," + _like_literal(peer) + ",%", limit)).fetchall()
    return [HistoryEntry(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), r[7], r[8]) for r in reversed(rows)]


_LOCAL_DEVICE_COLUMNS = "device_id, public_key, name, created, certificate, revoked_at, revocation, prekeys, first_seen"


def _get_devices_txn(txn, user):
    owner = txn.execute("SELECT identity, certified FROM device_owners WHERE user = ?", (user,)).fetchone()
    if owner is None:
        return None
    devices = tuple(
        DeviceInfo(user, bytes(r[0]), bytes(r[1]), r[2], r[3], None if r[4] is None else bytes(r[4]), r[5],
                   None if r[6] is None else bytes(r[6]), bool(r[7]), r[8])
        for r in txn.execute("SELECT " + _LOCAL_DEVICE_COLUMNS + " FROM devices WHERE user = ? ORDER BY first_seen,"
                             " device_id", (user,)))
    return KnownDevices(bytes(owner[0]), bool(owner[1]), devices)


def _set_devices_txn(txn, user, identity, devices):
    old = txn.execute("SELECT certified FROM device_owners WHERE user = ?", (user,)).fetchone()
    certified = bool(old and old[0]) or any(d.certified for d in devices)
    txn.execute("INSERT OR REPLACE INTO device_owners VALUES (?, ?, ?)", (user, identity, int(certified)))
    txn.execute("DELETE FROM devices WHERE user = ?", (user,))
    txn.executemany("INSERT INTO devices (user, " + _LOCAL_DEVICE_COLUMNS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(user, d.device_id, d.public_key_der, d.name, d.created, d.certificate, d.revoked_at,
                      d.revocation, int(d.prekeys), d.first_seen) for d in devices])
    txn.executemany("INSERT OR IGNORE INTO device_revocations VALUES (?, ?, ?, ?, ?)",
                    [(user, identity, d.device_id, d.revoked_at, d.revocation) for d in devices
                     if d.revocation is not None])


def _group_rows_txn(txn):
    return [(bytes(r[0]), r[1], r[2], bytes(r[3]), bool(r[4]), r[5], r[6]) for r in txn.execute(
        "SELECT gid, name, seq, head, member, broken, unread FROM groups ORDER BY name, gid")]


def _group_ops_txn(txn, gid):
    return [(r[0], bytes(r[1]), bytes(r[2]), r[3]) for r in txn.execute(
        "SELECT seq, op, signature, key FROM group_ops WHERE gid = ? ORDER BY seq", (gid,))]


def _save_group_txn(txn, gid, name, seq, head, member, broken, ops):
    txn.executemany("INSERT OR REPLACE INTO group_ops VALUES (?, ?, ?, ?, ?)",
                    [(gid, op_seq, op, signature, key) for op_seq, op, signature, key in ops])
    txn.execute("DELETE FROM group_ops WHERE gid = ? AND seq > ?", (gid, seq))  # never ops past the verified head
    txn.execute("INSERT INTO groups (gid, name, seq, head, member, broken) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (gid) DO UPDATE SET name = excluded.name, seq = excluded.seq, head = excluded.head,"
                " member = excluded.member, broken = excluded.broken", (gid, name, seq, head, int(member), broken))


def _group_refused_txn(txn, gid):
    row = txn.execute("SELECT seq, digest FROM group_refused WHERE gid = ?", (gid,)).fetchone()
    return None if row is None else (row[0], bytes(row[1]))


def _set_group_refused_txn(txn, gid, refused):
    if refused is None:
        txn.execute("DELETE FROM group_refused WHERE gid = ?", (gid,))
    else:
        txn.execute("INSERT OR REPLACE INTO group_refused (gid, seq, digest) VALUES (?, ?, ?)", (gid,) + tuple(refused))


def _group_unread_txn(txn, gid, count, add):
    if count is not None:
        txn.execute("UPDATE groups SET unread = ? WHERE gid = ?", (count, gid))
    else:
        txn.execute("UPDATE groups SET unread = unread + ? WHERE gid = ?", (add, gid))
    row = txn.execute("SELECT unread FROM groups WHERE gid = ?", (gid,)).fetchone()
    return row[0] if row else 0


def _add_group_sent_txn(txn, msg_id, gid, members):
    txn.execute("INSERT OR REPLACE INTO group_sent VALUES (?, ?, ?)", (msg_id, gid, json.dumps(sorted(members))))


def _group_sent_txn(txn, msg_id):
    row = txn.execute("SELECT gid, members FROM group_sent WHERE msg_id = ?", (msg_id,)).fetchone()
    return None if row is None else (bytes(row[0]), json.loads(row[1]))


def _add_group_receipt_txn(txn, msg_id, user, status, at, reason):
    txn.execute("INSERT OR REPLACE INTO group_receipts (msg_id, user, status, at, reason) VALUES (?, ?, ?, ?, ?)",
                (msg_id, user, status, at, reason))


def _group_receipts_txn(txn, msg_id):
    return {r[0]: (r[1], r[2], r[3]) for r in txn.execute(
        "SELECT user, status, at, reason FROM group_receipts WHERE msg_id = ? ORDER BY user", (msg_id,))}


def _sent_by_ref_txn(txn, ref):
    row = txn.execute("SELECT msg_id FROM outbox WHERE ref = ? AND msg_id IS NOT NULL", (ref,)).fetchone()
    return row[0] if row else None


def _last_group_sent_txn(txn):
    row = txn.execute("SELECT msg_id FROM group_sent ORDER BY rowid DESC LIMIT 1").fetchone()
    return row[0] if row else None


def _get_revocations_txn(txn, user, identity):
    return {bytes(r[0]): (r[1], bytes(r[2])) for r in txn.execute(
        "SELECT device_id, revoked_at, revocation FROM device_revocations WHERE user = ? AND identity = ?",
        (user, identity))}


class LocalStore(SeenStore):
    """
    One user's local database on one machine (C{client.sqlite3}, mode 0600): the duplicate store, this device's
    prekeys (L{SeenStore}), the pinned keys (trust on first use), contacts' devices as verified against them and,
    unless turned off, the message history.  Deleted rows are overwritten on disk (C{secure_delete}).
    """

    def __init__(self, path, reactor=None, history=True):
        create_private_file(path)
        super().__init__(path, reactor)
        self.keep_history = history

    def open(self, now, keep=None):
        return self.pool.runInteraction(_local_schema_txn, self._opening(now, keep))

    def get_pin(self, user):
        return self.pool.runInteraction(_get_pin_txn, user)

    def set_pin(self, user, pem, fp, now):
        return self.pool.runInteraction(_set_pin_txn, user, pem, fp, now)

    def set_verified(self, user, fp):
        """
        Record that the user compared C{user}'s fingerprint C{fp} out of band.  Only the pinned key can be verified:
        returns False (changing nothing) unless C{fp} is pinned for C{user}.
        """
        return self.pool.runInteraction(_set_verified_txn, user, fp)

    def key_status(self, user, current):
        """How C{user}'s key C{current} compares with the pin: C{new}, C{pinned}, C{verified} or C{changed}."""
        return self.pool.runInteraction(_key_status_txn, user, current)

    def former_keys(self, user):
        """The fingerprints of the identity keys C{user} had before (see C{former_keys} in L{_LOCAL_SCHEMA})."""
        return self.pool.runInteraction(_former_keys_txn, user)

    def add_former_key(self, user, fp, now):
        return self.pool.runInteraction(_add_former_key_txn, user, fp, now)

    def get_devices(self, user):
        """The L{KnownDevices} of C{user}, or None."""
        return self.pool.runInteraction(_get_devices_txn, user)

    def set_devices(self, user, identity, devices):
        """Replace C{user}'s devices with C{devices}, verified against the identity key of fingerprint C{identity}."""
        return self.pool.runInteraction(_set_devices_txn, user, identity, devices)

    def get_revocations(self, user, identity):
        """
        C{{device id: (revoked at, revocation signature)}}: every revocation of C{user}'s devices verified against
        the identity key of fingerprint C{identity} and kept (for good: listed by the server now or not).
        """
        return self.pool.runInteraction(_get_revocations_txn, user, identity)

    def add_history(self, entry):
        if not self.keep_history:
            return defer.succeed(None)
        if self._held is not None and entry.msg_id == self._held[0]:
            self._held[1].append(entry)  # written with the seen row (L{hold_history})
            return defer.succeed(None)
        return self.pool.runInteraction(_add_history_txn, entry)

    def set_history_status(self, msg_id, status):
        return self.pool.runInteraction(_set_history_status_txn, msg_id, status)

    def history(self, peer=None, limit=20, group=None):
        """The last C{limit} L{HistoryEntry}s: all, a 1:1 conversation's with C{peer}, or a group's (C{group}: hex)."""
        return self.pool.runInteraction(_history_txn, peer, limit, group)

    def history_status(self, msg_id):
        """The status the history gives the outgoing message C{msg_id} (hex), or None."""
        return self.pool.runInteraction(_history_status_txn, msg_id)

    # -- the outbox --

    def outbox_add(self, at, recipients, content_type, filename, body):
        """Keep a message until the server has it; returns its reference (a number that is never used again)."""
        return self.pool.runInteraction(_outbox_add_txn, at, recipients, content_type, filename, body)

    def outbox_next(self):
        """The oldest message still waiting (an L{OutboxEntry}), or None."""
        return self.pool.runInteraction(_outbox_next_txn)

    def outbox_waiting(self):
        """How many messages wait in the outbox."""
        return self.pool.runInteraction(_outbox_waiting_txn)

    def outbox_sealed(self, ref, envelope, replace=False):
        """
        Keep the envelope sealed for message C{ref} unless one is kept already (with C{replace}: in its place, for
        the same message sealed anew): returns the kept one, which every try sends (None when the message has left
        the outbox meanwhile: sent or refused by another chat).
        """
        return self.pool.runInteraction(_outbox_sealed_txn, ref, envelope, replace)

    def outbox_sent(self, ref, msg_id, now, history=None):
        """The server accepted message C{ref}: erase its text and envelope, record C{history} (unless turned off)."""
        return self.pool.runInteraction(_outbox_sent_txn, ref, msg_id, now, history if self.keep_history else None)

    def outbox_refused(self, ref, history=None):
        """The server (or this client) refused message C{ref}: it leaves the outbox; C{history} says why."""
        return self.pool.runInteraction(_outbox_refused_txn, ref, history if self.keep_history else None)

    def sent_message(self, msg_id):
        """C{(ref, preview)} naming a message this user sent (see L{message_preview}); either may be None."""
        return self.pool.runInteraction(_sent_message_txn, msg_id)

    # -- groups (see PagerClient's groups: these keep only chains it verified) --

    def group_rows(self):
        """Every group known here: C{(gid, name, seq, head, member, broken, unread)} tuples, by name."""
        return self.pool.runInteraction(_group_rows_txn)

    def group_ops(self, gid):
        """The verified ops of group C{gid} (bytes): C{(seq, op, signature, key PEM)} tuples in order."""
        return self.pool.runInteraction(_group_ops_txn, gid)

    def save_group(self, gid, name, seq, head, member, broken, ops):
        """Add the newly verified C{ops} and set the group's row (its unread count is kept)."""
        return self.pool.runInteraction(_save_group_txn, gid, name, seq, head, member, broken, ops)

    def group_refused(self, gid):
        """C{(seq, digest)} of the op of group C{gid} refused after its verified head, or None."""
        return self.pool.runInteraction(_group_refused_txn, gid)

    def set_group_refused(self, gid, refused):
        """Remember C{(seq, digest)} of the op refused after group C{gid}'s verified head (None: forget it)."""
        return self.pool.runInteraction(_set_group_refused_txn, gid, refused)

    def group_unread(self, gid, count=None, add=0):
        """Set the group's unread count to C{count}, or add C{add} to it; returns the new count."""
        return self.pool.runInteraction(_group_unread_txn, gid, count, add)

    def add_group_sent(self, msg_id, gid, members):
        """Record that message C{msg_id} (hex) went to group C{gid} sealed for C{members}."""
        return self.pool.runInteraction(_add_group_sent_txn, msg_id, gid, members)

    def group_sent(self, msg_id):
        """C{(gid, members)} of a group message this user sent, or None."""
        return self.pool.runInteraction(_group_sent_txn, msg_id)

    def add_group_receipt(self, msg_id, user, status, at, reason=""):
        return self.pool.runInteraction(_add_group_receipt_txn, msg_id, user, status, at, reason)

    def group_receipts(self, msg_id):
        """C{{user: (status, at, reason)}} of the receipts of group message C{msg_id}."""
        return self.pool.runInteraction(_group_receipts_txn, msg_id)

    def sent_by_ref(self, ref):
        """The id (hex) of the message this user sent as outbox reference C{ref}, or None (never, or forgotten)."""
        return self.pool.runInteraction(_sent_by_ref_txn, ref)

    def last_group_sent(self):
        """The id (hex) of the group message this user sent last from here, or None."""
        return self.pool.runInteraction(_last_group_sent_txn)


def _retry_after(value):
    """An error frame's C{retry_after}: a number of seconds up to L{MAX_RETRY_AFTER}, or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_RETRY_AFTER:
        return None
    return float(value)


def _user_count(answer, field):
    """The non-negative integer in C{answer[field]}; anything else is a protocol error."""
    value = answer.get(field)
    if type(value) is not int or value < 0:
        raise BadRequest("The server's users answer has no %s that is a whole number of users." % field)
    return value


def _user_names(answer, field):
    """The list of user names in C{answer[field]}; anything in it that is not a user name is a protocol error."""
    names = answer.get(field, [])
    if not isinstance(names, list) or not all(valid_username(name) for name in names):
        raise BadRequest("The server's list of %s users holds something that is not a user name." % field)
    return names


@dataclasses.dataclass
class _Incoming:
    msg: str
    sender: str
    accepted_at: float
    header: bytes
    chunks: list
    signature: bytes = None
    size: int = 0
    seq: int = None  # the delivery sequence number the push carried (PROTOCOL.md 4.11), if any


class _Settled:
    """
    The messages pushed on one connection, in push order, each until it and every one before it is settled
    (acknowledged or rejected): the prefix that is can be acknowledged with one cumulative ack (PROTOCOL.md 4.12).
    A message held or not handed over (it stays on the server) keeps everything after it out of that prefix.
    """

    MAX = 10000  # messages tracked behind an unsettled one; past it, this connection acknowledges by lists only

    def __init__(self):
        self._order = collections.deque()  # [seq, msg id, settled]
        self._by_msg = {}
        self.broken = False

    def pushed(self, seq, msg):
        if self.broken:
            return
        if seq is None or (self._order and seq <= self._order[-1][0]) or len(self._order) >= self.MAX:
            self.broken = True  # no number, or not increasing (not a server of PROTOCOL.md), or too many behind
            self._order.clear()
            self._by_msg.clear()
            return
        entry = self._by_msg[msg] = [seq, msg, False]
        self._order.append(entry)

    def settle(self, msg):
        entry = self._by_msg.get(msg)
        if entry is not None:
            entry[2] = True

    def take_prefix(self):
        """C{(upto, msg ids)}: the settled messages at the front, forgotten now, and the last one's number."""
        upto, taken = None, set()
        order = self._order
        while order and order[0][2]:
            upto, msg, _ = order.popleft()
            del self._by_msg[msg]
            taken.add(msg)
        return upto, taken


async def within(reactor, d, seconds):
    """Whether the Deferred C{d} fired within C{seconds}; if it did not, it is cancelled."""
    timed_out = []
    d.addTimeout(seconds, reactor, onTimeoutCancel=lambda result, timeout: timed_out.append(True))
    await d
    return not timed_out


MAX_HELD = 256  # group messages held (GroupHeld) that this client tries again in this session
MAX_HOLD = 7 * DAY  # seconds after its acceptance that a group message may stay held; then it is refused
MAX_RESEALABLE = 16  # messages sealed in this process that can still be sealed anew (RESEAL_TRIES)
MAX_LISTED_DEVICES = 256  # devices one devices or bundle answer may list for a user (current and revoked)


MAX_PREKEY_GRACE = 30 * DAY + SEEN_MARGIN  # the longest a replaced signed prekey is kept, whatever the server says
MAX_SEEN_KEEP = MAX_PREKEY_GRACE + PREKEY_LIFETIME  # the longest window of the duplicate store (seen_keep)


def _message_expiry(limits):
    """The server's message expiry as its hello says, or the default when it is not a number of seconds >= 0."""
    expiry = limits.get("message_expiry")
    if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or not math.isfinite(expiry) or expiry < 0:
        return Limits.message_expiry
    return expiry


def prekey_grace(limits):
    """
    Seconds a replaced signed prekey's private part is kept: the server's message expiry (C{limits}: its hello's)
    plus L{SEEN_MARGIN}, so that every message the server may still deliver sealed to it can be opened, but never
    more than L{MAX_PREKEY_GRACE}: a server cannot make a device keep its old prekeys (and lose forward secrecy).
    """
    return min(_message_expiry(limits) + SEEN_MARGIN, MAX_PREKEY_GRACE)


def seen_keep(limits):
    """
    Seconds the duplicate store remembers a message handed off: never less than the default expiry's window, nor
    than a signed prekey's grace plus its lifetime (so that a message that used a signed prekey alone is remembered
    as long as that prekey can open it), and at most L{MAX_SEEN_KEEP}, whatever the hello says.
    """
    window = max(_message_expiry(limits) + SEEN_MARGIN, prekey_grace(limits) + PREKEY_LIFETIME,
                 Limits.message_expiry + SEEN_MARGIN)
    return min(window, MAX_SEEN_KEEP)


class StaleMessage(EnvelopeError):
    """The message was signed before the duplicate store's window: it may be a replay this device forgot."""


class LinkFailed(PagerError):
    """Linking this device failed: nobody approved it in time, or the answer was not made with this device's code."""

    code = "link_failed"


def default_device_name():
    """This machine's host name as a device's name (cut to 64 bytes), or C{pager} when it has none that fits."""
    import platform
    name = platform.node().encode("utf-8", "replace")[:MAX_DEVICE_NAME_BYTES].decode("utf-8", "ignore").strip()
    return name if valid_device_name(name) else "pager"


def verify_devices(user, identity_key, objects, bundle=False):
    """
    C{user}'s devices from a C{devices} or C{bundle} answer, each checked against C{identity_key}: a list of
    C{(DeviceInfo, SignedPrekey or None, OneTimePrekey or None)}, the prekeys only from a bundle and never for a
    revoked device.  A certificate, revocation or signed prekey that does not verify, or a device without a
    certificate whose key is not the identity key itself (only a legacy identity device has none), raises
    L{BadCertificate}: the server is lying, and nothing is sent to or taken from that device.  RSA: off the reactor.
    """
    if not isinstance(objects, list) or len(objects) > MAX_LISTED_DEVICES:
        raise BadCertificate("The server's list of %s's devices is not a list of at most %d devices."
                             % (user, MAX_LISTED_DEVICES))
    identity_fp = fingerprint(identity_key)
    out, ids = [], set()
    for obj in objects:
        device = _json_device_id(_json_field(obj, "id", str, "device"), "device")
        if device in ids:
            raise BadCertificate("The server lists %s's device %s twice." % (user, device.hex()))
        ids.add(device)
        if obj.get("certificate") is None:
            try:
                key = load_public_key(_json_field(obj, "public_key", str, "device"))
            except BadKey as e:
                raise BadCertificate("%s's device %s has no usable key: %s" % (user, device.hex(), e.message))
            if fingerprint(key) != identity_fp or device_id(key) != device:
                raise BadCertificate("The server lists a device of %s without a certificate that is not their "
                                     "identity key: refused." % user)
            name = created = signature = None
        else:
            certificate = DeviceCertificate.from_json(obj, user)
            key = certificate.verify(identity_key)
            name, created, signature = certificate.name, certificate.created, certificate.signature
        revoked_at = revocation = None
        if obj.get("revoked") is not None:
            revoked = DeviceRevocation.from_json(obj["revoked"], user, device)
            revoked.verify(identity_key)
            revoked_at, revocation = revoked.revoked_at, revoked.signature
        last_seen = obj.get("last_seen")
        if isinstance(last_seen, bool) or not isinstance(last_seen, (int, float)) or not math.isfinite(last_seen):
            last_seen = None
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        info = DeviceInfo(user, device, der, name, created, signature, revoked_at, revocation,
                          obj.get("prekeys") is True, 0.0, last_seen)
        spk = opk = None
        if bundle and revoked_at is None:
            if obj.get("signed_prekey") is not None:
                spk = SignedPrekey.from_json(obj["signed_prekey"], user, device)
                spk.verify(key)
            if obj.get("one_time_prekey") is not None:
                opk = OneTimePrekey.from_json(obj["one_time_prekey"])
        out.append((info, spk, opk))
    return out


@dataclasses.dataclass(frozen=True)
class LinkRequest:
    """A new device's request to be linked, as the identity device gets it from C{link_pending}."""

    link: str  # the request's id, hex
    public_key_der: bytes
    name: str
    mac: bytes
    at: float

    def public_key(self):
        return serialization.load_der_public_key(self.public_key_der)

    @property
    def device_id(self):
        """The id the new device will have (bytes)."""
        return device_id(self.public_key())

    @property
    def short_id(self):
        text = self.device_id.hex()
        return "%s %s" % (text[:4], text[4:8])

    @classmethod
    def from_json(cls, obj):
        what = "link request"
        link = _json_field(obj, "link", str, what)
        if not re.fullmatch("[0-9a-f]{1,64}", link):
            raise BadCertificate("The link request's id is not hex.")
        key = load_public_key(_json_field(obj, "public_key", str, what))
        name = _json_field(obj, "name", str, what)
        if not valid_device_name(name):
            raise BadCertificate("The device's name is not 1-64 bytes of printable text.")
        at = obj.get("at")
        at = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0
        return cls(link, key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
                   name, _json_b64(obj, "mac", what, 32), at)


@dataclasses.dataclass
class _LinkWait:
    user: str
    key: object
    name: str
    secret: bytes
    done: Deferred
    link: str = None
    waited: bool = False


@dataclasses.dataclass
class _PrekeyState:
    """What the server last said of this device: whether it is certified, its signed prekey, its one-time pool."""

    certified: bool
    signed_id: int
    one_time: int


class NotInGroup(EnvelopeError):
    """The group message names a membership version that does not hold its sender, or this user."""


class GroupHeld(PagerError):
    """
    A group message this client cannot verify yet: its group's chain stops at a change it has not accepted, or its
    sender signed with a key this user has not compared.  It is left on the server (neither acknowledged nor refused)
    and tried again when its user trusts or verifies a key, or at the next login.
    """


class _ChainRefused(PagerError):
    """A group operation this client does not accept (its sentence says why): the chain stops verifying there."""


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """
    A group as this client verified its membership chain: C{id} (32 hex digits), C{name} (without the C{#}; see
    L{label}), C{topic}, C{seq} (the version: the last verified op's seq) and C{head} (its hash), C{members} and
    C{admins} (sorted names at that version), C{member} (whether this user is one), C{unread} (what the UI counted,
    L{PagerClient.group_read}), C{broken} (None, or the sentence saying why the chain stopped verifying: nothing is
    sent to the group then) and C{state} (the L{GroupState}, with each member's fingerprint and join version).
    """

    id: str
    name: str
    topic: str
    seq: int
    head: bytes
    members: tuple
    admins: tuple
    member: bool
    unread: int = 0
    broken: str = None
    state: object = None

    @property
    def label(self):
        """The name as people see it: C{#ops}."""
        return "#" + self.name


@dataclasses.dataclass(frozen=True)
class GroupEvent:
    """
    One newly verified group operation, as C{on_group_event} gets it.  C{group_id}: 32 hex digits; C{name}: the
    group's name after the op (without the C{#}); C{seq}: the op's version; C{kind}: one of create, add, remove,
    leave, rename, topic, promote, demote; C{actor}: who signed it; C{users}: the names it is about (create: the
    members listed besides the actor; add; remove; promote and demote: the one user; leave: empty); C{text}: the
    topic (create, topic) or, for rename, the name before it; C{at}: the actor's clock (seconds, not checked).
    """

    group_id: str
    name: str
    seq: int
    kind: str
    actor: str
    users: tuple
    text: str
    at: float


class _GroupChain:
    """A group's verified chain in memory: the ops (seq, raw, signature, key PEM) and the state after each."""

    def __init__(self, gid, ops=(), states=(), broken=None, unread=0):
        self.gid = gid
        self.ops = list(ops)
        self.states = list(states)
        self.broken = broken
        self.unread = unread
        self.server_extra = ()  # names the server lists as members that no verified op made members
        self.unverified_name = None  # a chain refused before any op was kept: the name its ops gave it as read
        self.refused = None  # (seq, SHA-256 of its "op") of the op refused after the verified head

    @property
    def state(self):
        return self.states[-1] if self.states else GroupState.empty(self.gid)

    @property
    def seq(self):
        return self.state.seq

    def at_head(self, head):
        """The state whose head is C{head}, or None."""
        for state in reversed(self.states):
            if state.head == head:
                return state
        return None


@dataclasses.dataclass
class _OwnOps:
    """
    What verifying a chain learns of this user's own ops (L{PagerClient._own_op_trusted}): whether the chain is read
    here from its start, whether an op so far is signed with the user's key of now (None: not looked at yet), and
    the ops (seq, fingerprint) signed with another key of theirs taken on first use.
    """

    fresh: bool
    signed_now: bool = None
    first_use: list = dataclasses.field(default_factory=list)


def _member_names(state):
    """The member names of a L{GroupState}, sorted."""
    return sorted(state.members)


def _op_digest(obj):
    """What names an op as a server gave it (an item of C{group_ops}' list), to know it again: a SHA-256."""
    raw = obj.get("op") if isinstance(obj, dict) else None
    if not isinstance(raw, str):
        raw = json.dumps(obj, sort_keys=True, default=repr)
    return hashlib.sha256(raw.encode("utf-8", "replace")).digest()


def _group_event(op, state, before):
    users, text = (), ""
    if op.kind == "create":
        users, text = tuple(u for u, _ in op.members), op.topic or ""
    elif op.kind == "add":
        users = tuple(u for u, _ in op.members)
    elif op.kind == "remove":
        users = tuple(op.users)
    elif op.kind in ("promote", "demote"):
        users = (op.user,)
    elif op.kind == "topic":
        text = op.topic or ""
    elif op.kind == "rename":
        text = before.name
    return GroupEvent(op.group_id.hex(), state.name, op.seq, op.kind, op.actor, users, text,
                      op.timestamp_ms / 1000.0)



class PagerClient:
    """
    The client API the terminal client, the script commands and the tests use.  Every method is a coroutine;
    server errors are raised as the L{ProtocolError} subclass for their code.

    Incoming messages are verified and decrypted in a thread, handed to C{on_message(message)} (an
    L{OpenedMessage}; it may return a Deferred), and acknowledged only after that hand-off succeeded; a message
    that cannot be opened is rejected with the reason, and C{on_rejected(msg_id, sender, error)} is told.  Delivery
    receipts go to C{on_receipt(receipt)}.  Duplicates (same verified sender and message id) are acknowledged without
    being handed off twice.  A hand-off that raises leaves the item on the server (it comes again at the next login);
    the error is kept in C{failures} and given to C{on_failure(error, sender)} when set (else logged).
    """

    log = Logger()

    skew_window = 600.0  # seconds between the signed time and the server's acceptance before a message is flagged

    @staticmethod
    def command_hint(command, name):
        """
        How a sentence names the command C{trust} or C{verify} for user C{name}: the chat sets C{/trust NAME}, the
        command line the whole C{pager-cli} line (L{Session.command_line}).
        """
        return "'%s %s'" % (command, name)

    def _key_changed(self, user, pinned, current):
        return KeyChanged(user, pinned, current, message=(
            "The key of %s has changed: pinned %s, the server now gives %s. Check the new fingerprint with %s (for "
            "example by phone), then accept it with %s (and %s records that you compared it)."
            % (user, format_fingerprint(pinned), format_fingerprint(current), user,
               self.command_hint("trust", user), self.command_hint("verify", user))))

    def __init__(self, protocol, reactor=None, in_thread=None, seen=None, pins=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.protocol = protocol
        protocol.listener = self
        self.hello = protocol.hello.result if protocol.hello.called else None
        if in_thread is None:
            def in_thread(f, *args, **kwargs):
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)
        self.in_thread = in_thread
        self.seen = seen if seen is not None else MemorySeen()
        self.pins = pins if pins is not None else MemoryPins()
        self.user = None
        self.private_key = None
        self.on_message = None
        self.on_receipt = None
        self.on_rejected = None
        self.on_disconnect = None
        self.on_failure = None  # on_failure(error, sender): a hand-off raised (sender None for a receipt)
        self.on_devices_changed = None  # on_devices_changed(user, added, revoked): lists of DeviceInfo
        self.identity_device_name = None  # the name this identity device certifies itself with (L{recover})
        self.on_group_event = None  # on_group_event(GroupEvent): a newly verified op of a group
        self.on_group_warning = None  # on_group_warning(group id hex, name, sentence): what a person must be told
        self.receipts_wanted = True  # false: messages are sent asking for no receipts (a script that does not wait)
        self._chains = {}  # group id -> _GroupChain verified here
        self._group_lock = defer.DeferredLock()  # one group refresh at a time
        self._group_warned = set()  # (group id, sentence) told already
        self.identity_key = self.identity_fp = None  # the account's identity key (this device's on the identity device)
        self.is_identity = True  # whether this device holds the identity key
        self._prekey_state = None  # what the server said of this device's prekeys (_PrekeyState)
        self._grace_warned = False  # whether the server's message expiry was said to exceed MAX_PREKEY_GRACE
        self._maintaining = defer.DeferredLock()
        self._maintenance = None  # the LoopingCall of maintain_prekeys
        self._vault = None  # the key this device's prekey private parts are sealed under
        self._link = None  # the link request waiting for an answer (_LinkWait)
        self._sealed = collections.OrderedDict()  # message id -> what seal() sealed, to seal it anew
        self._keys = {}  # user -> (public key, fingerprint)
        self._device_views = {}  # user -> (identity fingerprint, {device id: revoked}) as this client last saw them
        self._incoming = {}  # msg id (hex) -> _Incoming still receiving chunks
        self._held = collections.OrderedDict()  # msg id (hex) -> _Incoming of a group message held (GroupHeld)
        self._queue = collections.deque()
        self._working = False
        self._acks = {"msgs": [], "receipts": []}  # waiting for the acknowledgement in flight to be answered
        self._settled = _Settled()  # what a cumulative ack may cover
        self._ack_in_flight = False
        self._single_acks = 0  # one-id acks unanswered, for a server that takes no lists
        self._keepalive = None
        self._abort = None  # the call that aborts the connection if the server does not let a close complete
        self.processed = 0  # pushed messages fully dealt with: shown and acknowledged, skipped as seen, or rejected
        self.failures = []  # hand-offs that raised (the message stays on the server)
        self._waiters = []  # (ready, Deferred): fired once ready() holds, checked whenever the above change

    @classmethod
    async def connect(cls, endpoint, reactor=None, timeout=30, made=None, **kwargs):
        """
        Connect to a client endpoint (or endpoint string like C{tcp:host:5050}) and wait for the hello.
        C{made(protocol)} is called with the protocol first, so a caller can see why a failed connection ended.
        """
        if reactor is None:
            from twisted.internet import reactor
        if isinstance(endpoint, str):
            endpoint = endpoints.clientFromString(reactor, endpoint)
        proto = PagerClientProtocol()
        if made is not None:
            made(proto)
        await endpoints.connectProtocol(endpoint, proto)
        hello = proto.hello
        hello.addTimeout(timeout, reactor, onTimeoutCancel=lambda result, t: _abort_and_time_out(proto))
        await hello
        return cls(proto, reactor, **kwargs)

    @property
    def server_id(self):
        return self.hello["server_id"]

    @property
    def limits(self):
        return self.protocol.limits

    @property
    def idle(self):
        """
        Whether nothing pushed is being received, handled or waiting to be, and no acknowledgement is waiting or
        unanswered: what the server sent so far is dealt with on both sides.
        """
        return not (self._working or self._queue or self._incoming or self._ack_in_flight or self._single_acks
                    or any(self._acks.values()))

    def _wait_for(self, ready):
        """A Deferred that fires once C{ready()} holds (at once if it does now); cancelling it stops the wait."""
        if ready():
            return defer.succeed(None)
        d = Deferred(lambda d: self._waiters.remove((ready, d)))
        self._waiters.append((ready, d))
        return d

    def _changed(self):
        for ready, d in list(self._waiters):
            if ready():
                self._waiters.remove((ready, d))
                d.callback(None)

    def when_handled(self):
        """A Deferred that fires once no pushed frame is being handled or waiting to be (at once if none is)."""
        return self._wait_for(lambda: not self._working)

    def when_processed(self, count):
        """
        A Deferred that fires once C{count} pushed messages have been dealt with (L{processed}), a hand-off has
        failed, or the connection has ended: whichever comes first.
        """
        return self._wait_for(lambda: self.processed >= count or self.failures or self.protocol.lost is not None)

    def close(self):
        """
        Close the connection; the Deferred fires once it is closed.  What was written still reaches a server that
        reads it within L{CLIENT_CLOSE_GRACE} seconds; then the connection is aborted, so that a server that never
        reads cannot keep a script from ending.
        """
        self._stop_keepalive()
        self._stop_maintenance()
        if any(self._acks.values()):
            self._send_acks()  # written before the connection closes: what was handed over is not delivered again
        transport = self.protocol.transport
        if transport is not None and transport.connected and self._abort is None:
            self._abort = self.reactor.callLater(CLIENT_CLOSE_GRACE, transport.abortConnection)
            self.protocol.done.addBoth(self._closed)
            _lose(transport)
        return self.protocol.done

    def _closed(self, result):
        if self._abort.active():
            self._abort.cancel()
        return result

    # -- accounts --

    def _challenge(self):
        if self.protocol.challenge is None:
            raise BadRequest("The server's login challenge is missing or malformed; refusing to sign it.")
        return self.protocol.challenge

    async def register(self, user, token, private_key, device_name=None):
        """
        Create the account C{user} with this key and safetoken; the connection is then logged in.  This machine is
        the account's identity device, named C{device_name} (L{default_device_name} when None): the request carries
        the device's self-certificate, and its prekeys are published at once (L{maintain_prekeys}).
        """
        user = canonical_username(user)
        challenge = self._challenge()
        name = device_name if device_name is not None else default_device_name()
        if not valid_device_name(name):
            raise BadRequest("A device's name is 1-64 bytes of printable text.")
        created = int(self._now())
        proof = await self.in_thread(sign_auth, private_key, "register", self.server_id, user, challenge)
        certificate = await self.in_thread(certify_device, private_key, user, private_key.public_key(), name, created)
        answer = await self.protocol.request(
            "register", user=user, public_key=public_key_pem(private_key), token=token, proof=b64(proof),
            device={"name": name, "created": created, "certificate": b64(certificate.signature)})
        self._logged_in(user, private_key, True)
        await self._device_ready(answer, private_key.public_key(), fresh=True)

    async def login(self, user, token, private_key, receive=True, device=None):
        """
        Log in; with C{receive=False} the session only sends and never takes the user's incoming messages.

        On the account's identity device C{private_key} is the identity key and C{token} the safetoken.  On a linked
        device C{private_key} is the device's own key, C{device} its id (hex, as L{device} gives it, or True) and
        C{token} None: the device's proof alone logs it in.  Either way the device's prekeys are then kept up
        (L{maintain_prekeys}) before this returns the number of messages waiting.
        """
        user = canonical_username(user)
        challenge = self._challenge()
        fields = {}
        if device is None:
            proof = await self.in_thread(sign_auth, private_key, "login", self.server_id, user, challenge)
            fields["token"] = token
        else:
            mine = device_id(private_key).hex()
            if device is not True and device != mine:
                raise LocalError("The device id %s is not the id of this device's key (%s)." % (device, mine))
            proof = await self.in_thread(sign_auth, private_key, "login", self.server_id, user, challenge,
                                         fingerprint(private_key))
            fields["device"] = mine
        answer = await self.protocol.request("login", user=user, proof=b64(proof), receive=receive, **fields)
        self._logged_in(user, private_key, receive)
        identity = private_key.public_key() if device is None else await self._own_identity()
        await self._device_ready(answer, identity)
        if receive:
            await self._own_devices_baseline()
        await self._sync_groups_quietly()
        pending = answer.get("pending")
        return pending if isinstance(pending, int) and not isinstance(pending, bool) else 0

    async def rekey(self, user, token, old_key, new_key):
        """Replace the account's key: needs the safetoken and proofs by both keys."""
        user = canonical_username(user)
        challenge = self._challenge()
        new_fp = fingerprint(new_key)
        proof_old = await self.in_thread(sign_auth, old_key, "rekey", self.server_id, user, challenge, new_fp)
        proof_new = await self.in_thread(sign_auth, new_key, "rekey", self.server_id, user, challenge, new_fp)
        await self.protocol.request("rekey", user=user, token=token, public_key=public_key_pem(new_key),
                                    proof_old=b64(proof_old), proof_new=b64(proof_new))
        if self.user in (None, user):  # this machine's user: their groups' ops signed with the old key stay theirs
            await self.pins.add_former_key(user, fingerprint(old_key), self._now())
        if self.user == user:
            await self._rekeyed(new_key)

    async def recover(self, user, token, new_key, device_name=None):
        """
        Replace a lost key with the safetoken alone (throttled, and refused over plain TCP from afar).  The new
        identity device certifies itself as C{device_name} (L{default_device_name} when None) once it logs in.
        """
        user = canonical_username(user)
        self.identity_device_name = device_name
        challenge = self._challenge()
        proof = await self.in_thread(sign_auth, new_key, "recover", self.server_id, user, challenge)
        await self.protocol.request("recover", user=user, token=token, public_key=public_key_pem(new_key),
                                    proof=b64(proof))
        if self.user == user:
            if self.identity_fp is not None and self.identity_fp != fingerprint(new_key):
                await self.pins.add_former_key(user, self.identity_fp, self._now())
            await self._rekeyed(new_key)

    async def _rekeyed(self, new_key):
        """
        This session's account has the identity key C{new_key} now: the server replaced all its devices with the new
        identity device (this one, still uncertified and without prekeys), which certifies itself and publishes
        prekeys at once.
        """
        self.private_key = new_key
        await self._device_ready({"certified": False, "prekeys": {"signed_id": None, "one_time": 0}},
                                 new_key.public_key())

    async def exists(self, user):
        """Whether the server has an account named C{user} (what C{register} would say; refused when closed)."""
        answer = await self.protocol.request("exists", user=canonical_username(user))
        return answer.get("exists") is True

    async def change_token(self, token, new_token):
        """Replace the logged-in account's safetoken C{token} with C{new_token}."""
        await self.protocol.request("change_token", token=token, new_token=new_token)

    def _logged_in(self, user, private_key, receive):
        self.user, self.private_key, self.receive = user, private_key, receive
        self.identity_key = self.identity_fp = None
        self._start_keepalive()

    def _start_keepalive(self):
        idle = self.limits.get("idle_timeout")
        if isinstance(idle, (int, float)) and idle > 0 and self._keepalive is None:
            self._keepalive = task.LoopingCall(self._ping_quietly)
            self._keepalive.clock = self.reactor
            self._keepalive.start(max(idle / 3.0, 1.0), now=False)

    def _stop_keepalive(self):
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None

    def _ping_quietly(self):
        d = self.protocol.request("ping")
        d.addTimeout(PING_TIMEOUT, self.reactor, onTimeoutCancel=lambda result, timeout: self._unresponsive())
        d.addErrback(lambda f: None)

    def _unresponsive(self):
        self.log.warn("The server did not answer a ping within {timeout} s; dropping the connection", timeout=PING_TIMEOUT)
        self.protocol.server_error = ConnectionLost("The server stopped answering.")
        if self.protocol.transport is not None:
            self.protocol.transport.abortConnection()

    # -- this device and its prekeys --

    @property
    def device(self):
        """This device's id (32 hex digits) once logged in, else None."""
        return None if self.private_key is None else device_id(self.private_key).hex()

    @property
    def prekey_grace(self):
        """
        Seconds a replaced signed prekey's private part is kept: L{prekey_grace} of the server's hello (at most
        L{MAX_PREKEY_GRACE}; a warning is logged once when the server's message expiry is longer).
        """
        expiry = _message_expiry(self.limits)
        if expiry + SEEN_MARGIN > MAX_PREKEY_GRACE and not self._grace_warned:
            self._grace_warned = True
            self.log.warn("The server says it keeps messages {days:.0f} days; replaced signed prekeys are kept at most "
                          "{cap:.0f} days all the same (its message expiry is capped), so older messages sealed to "
                          "them will not open.", days=expiry / DAY, cap=MAX_PREKEY_GRACE / DAY)
        return prekey_grace(self.limits)

    def _now(self):
        return self.reactor.seconds()

    async def _own_identity(self):
        """The account's identity key: this device's own on the identity device, else the one pinned when it was
        linked (or, for a device linked before this machine kept pins, the server's, pinned now)."""
        if self.identity_key is not None:
            return self.identity_key
        pin = await self.pins.get_pin(self.user)
        key = load_public_key(pin[0]) if pin is not None else await self.recipient_key(self.user)
        self.identity_key, self.identity_fp = key, fingerprint(key)
        return key

    async def _device_ready(self, answer, identity, fresh=False):
        """
        Logged in (C{answer}: the server's answer, C{fresh}: a registration) as a device of the account whose
        identity key is C{identity}: take what the server says of this device's prekeys, keep them up now
        (L{maintain_prekeys}) and every L{PREKEY_CHECK_INTERVAL} seconds while the connection lasts.
        """
        self.identity_key, self.identity_fp = identity, fingerprint(identity)
        self.is_identity = self.identity_fp == fingerprint(self.private_key)
        self._vault = None
        prekeys = answer.get("prekeys") if isinstance(answer.get("prekeys"), dict) else {}
        signed_id = prekeys.get("signed_id")
        self._prekey_state = _PrekeyState(
            certified=fresh or answer.get("certified") is not False,
            signed_id=signed_id if _prekey_id(signed_id) else None,
            one_time=prekeys.get("one_time") if _seconds(prekeys.get("one_time")) else 0)  # a count: int >= 0
        await self.maintain_prekeys()
        if self._maintenance is None:
            self._maintenance = task.LoopingCall(self._maintain_quietly)
            self._maintenance.clock = self.reactor
            self._maintenance.start(PREKEY_CHECK_INTERVAL, now=False)

    def _stop_maintenance(self):
        if self._maintenance is not None and self._maintenance.running:
            self._maintenance.stop()
        self._maintenance = None

    def _maintain_quietly(self):
        d = Deferred.fromCoroutine(self.maintain_prekeys())
        d.addErrback(lambda f: None if f.check(ConnectionLost, defer.CancelledError) or self.protocol.lost else
                     self.log.failure("Keeping this device's prekeys up failed", f))
        return None  # the LoopingCall goes on whatever happened

    async def _vault_key(self):
        if self._vault is None:
            self._vault = await self.in_thread(prekey_vault_key, self.private_key)
        return self._vault

    async def maintain_prekeys(self, now=None):
        """
        Keep this device's prekeys as PROTOCOL.md says; run after every login, on the server's C{prekeys_low} and
        every L{PREKEY_CHECK_INTERVAL} seconds.  In order: a legacy identity device (upgraded from 0.2) certifies
        itself; a new signed prekey is published when the server has none of this device's, or the current one is
        L{PREKEY_ROTATION} old (the one it replaces is kept for L{prekey_grace} from now); signed prekeys replaced
        longer than the grace ago lose their private parts (gone from disk); the one-time prekeys are topped up to
        L{PREKEY_POOL_SIZE} when the server has fewer than L{PREKEY_POOL_LOW}.  C{now}: the time in seconds (the
        reactor's when None).  When the server holds prekeys this machine does not keep (its state directory was lost
        or started afresh), a new signed prekey and a whole new pool take their place.  Returns a dict saying what
        was done: C{certified}, C{signed} (the new id or None), C{one_time} (how many published), C{replaced} (the
        server's pool was replaced) and C{deleted} (signed prekeys whose private part was deleted).
        """
        if self.user is None or self._prekey_state is None:
            raise NotAuthenticated()
        await self._maintaining.acquire()
        try:
            return await self._maintain(self._now() if now is None else now)
        finally:
            self._maintaining.release()

    async def _maintain(self, now):
        state, key = self._prekey_state, self.private_key
        device = device_id(key)
        done = {"certified": False, "signed": None, "one_time": 0, "deleted": 0, "replaced": False}
        if self.is_identity and not state.certified:
            await self.certify(now=now)
            done["certified"] = True
        vault = await self._vault_key()
        local = await self.seen.local_prekeys(device)
        current = [p for p in local if p.kind == "signed" and p.replaced_at is None]
        current = max(current, key=lambda p: p.valid_from) if current else None
        # The server holds prekeys this machine does not (its state was lost, or started afresh): replace them all.
        lost = ((state.signed_id is not None and state.signed_id not in {p.prekey_id for p in local
                                                                          if p.kind == "signed"})
                or state.one_time > sum(1 for p in local if p.kind == "one-time"))
        rotate = (lost or current is None or current.prekey_id != state.signed_id
                  or now - current.valid_from >= PREKEY_ROTATION)
        if lost:
            top_up = PREKEY_POOL_SIZE
        else:
            top_up = PREKEY_POOL_SIZE - state.one_time if state.one_time < PREKEY_POOL_LOW else 0
        if rotate or top_up:
            spk, opks, rows = await self.in_thread(make_prekeys, key, self.user, vault, now, rotate, top_up,
                                                   [p.prekey_id for p in local])
            # Kept here before the server has them: never a public part on the server whose private part is nowhere.
            await self.seen.add_prekeys(device, rows, now)
            for start in range(0, max(len(opks), 1), PREKEY_BATCH):
                fields = {"replace": True} if lost and start == 0 else {}
                if opks:
                    fields["one_time"] = [o.to_json() for o in opks[start:start + PREKEY_BATCH]]
                if spk is not None and start == 0:
                    fields["signed"] = spk.to_json()
                answer = await self.protocol.request("publish_prekeys", **fields)
                count = answer.get("one_time")
                state.one_time = count if _seconds(count) else state.one_time + len(fields.get("one_time", ()))
            if spk is not None:
                state.signed_id = done["signed"] = spk.prekey_id
            done["one_time"], done["replaced"] = len(opks), lost
        done["deleted"] = await self.seen.forget_prekeys(device, now - self.prekey_grace)
        return done

    async def certify(self, name=None, now=None):
        """
        Certify this identity device with its own key (the self-certificate a 0.2 account's device lacks): from now
        on no sender wraps a message to it with RSA-OAEP.  Done by L{maintain_prekeys} when the server says so.
        """
        if not self.is_identity:
            raise Forbidden("Only the device that holds the identity key certifies devices.")
        name = name if name is not None else self.identity_device_name or default_device_name()
        created = int(self._now() if now is None else now)
        certificate = await self.in_thread(certify_device, self.private_key, self.user,
                                           self.private_key.public_key(), name, created)
        await self.protocol.request("certify", name=name, created=created, certificate=b64(certificate.signature))
        self._prekey_state.certified = True

    def _prekeys_low(self, frame):
        count = frame.get("one_time")
        if self._prekey_state is None or not _seconds(count):
            return
        self._prekey_state.one_time = count
        if count < PREKEY_POOL_LOW:
            self._maintain_quietly()

    # -- devices --

    async def _identity_of(self, user, pem, expected=None):
        """
        C{user}'s identity key as a devices or bundle answer gives it, checked like L{recipient_key}: pinned on
        first use, L{KeyChanged} when it is not the pinned key (for this user's own account: not its identity key).
        C{expected}: C{(fingerprint, group name)}, the key a group's verified chain names for C{user}; not pinned
        yet, C{user} is pinned only to that key (L{KeyChanged} if the server gives another).
        """
        if not isinstance(pem, str):
            raise BadKey("The server's answer gives no identity key for %s." % user)
        key = load_public_key(pem)
        fp = fingerprint(key)
        if user == self.user:
            identity = await self._own_identity()
            if fp != self.identity_fp:
                raise KeyChanged(user, self.identity_fp, fp, message=(
                    "The server gives another identity key for your own account %s (%s) than this device's; "
                    "nothing was sent." % (user, format_fingerprint(fp))))
            return identity
        pin = await self.pins.get_pin(user)
        if expected is not None:  # a group's member: the group's rule (L{_group_key_ok}) decides
            ok, why = await self._group_key_ok(user, fp, expected[0], pin, expected[1])
            if not ok:
                raise KeyChanged(user, bytes(pin[1]) if pin is not None else expected[0], fp, message=(
                    "Nothing was sent: the server gives %s's key as %s, which is not %s." % (
                        user, format_fingerprint(fp), why)))
        if pin is None:
            await self.pins.set_pin(user, public_key_pem(key), fp, self._now())
        elif bytes(pin[1]) != fp:
            raise self._key_changed(user, bytes(pin[1]), fp)
        self._keys[user] = (key, fp)
        return key

    async def _record_devices(self, user, identity, infos):
        """
        Keep C{user}'s devices as just verified against C{identity}; tell C{on_devices_changed} about devices added
        or revoked since they were last seen (not on the first look at a user, nor after their identity changed).
        Returns C{(devices, certified_seen)}.
        """
        fp = fingerprint(identity)
        revoked_here = await self.pins.get_revocations(user, fp)
        for info in infos:
            if not info.revoked and info.device_id in revoked_here:
                # A revocation verified here is kept for good: a list without it is the server's lie (or an old
                # list replayed), and the device's key may be in a thief's hands.
                raise BadCertificate(
                    "The server lists %s's device %s (id %s) as current, but it was revoked: this client holds its "
                    "revocation, signed by %s's identity key. The server is lying or replaying an old list, so "
                    "nothing was sent to or taken from %s's devices." % (
                        user, device_name_text(info.name), info.short_id, user, user))
        old = await self.pins.get_devices(user)
        before = {d.device_id: d for d in old.devices} if old is not None and old.identity == fp else {}
        now = self._now()
        merged = [dataclasses.replace(info, first_seen=before[info.device_id].first_seen
                                      if info.device_id in before else now) for info in infos]
        kept = [dataclasses.replace(info, last_seen=None) for info in merged]
        if old is None or old.identity != fp or [dataclasses.astuple(d) for d in old.devices] != \
                [dataclasses.astuple(d) for d in kept]:
            await self.pins.set_devices(user, fp, kept)
        certified_seen = (old is not None and old.certified_seen) or any(d.certified for d in merged)
        # Changes are told against what this client saw last, when it has seen the user's devices: the stored list
        # is shared by every command on this machine, and one that looked first (an approval or revocation made in
        # another terminal) must not hide the change from a chat that is open.
        view = self._device_views.get(user)
        seen = view[1] if view is not None and view[0] == fp else {d: before[d].revoked for d in before}
        self._device_views[user] = (fp, {d.device_id: d.revoked for d in merged})
        if seen and self.on_devices_changed is not None:
            mine = device_id(self.private_key)
            added = [d for d in merged if d.device_id not in seen and not d.revoked and d.device_id != mine]
            # A device revoked before this client ever saw it is no news (a re-linked machine would read "you
            # revoked the device 'laptop'" about its own former key, long after).
            revoked = [d for d in merged if d.revoked and seen.get(d.device_id) is False]
            if added or revoked:
                self.on_devices_changed(user, added, revoked)
        return merged, certified_seen

    async def _fetch_devices(self, user, identity=None):
        """C{user}'s devices from the server, verified (against C{identity} when given, else the pinned key)."""
        answer = await self.protocol.request("devices", user=user)
        if answer.get("user") != user:
            raise BadKey("The server answered a request for %s's devices with another user's." % user)
        if identity is None:
            identity = await self._identity_of(user, answer.get("identity_key"))
        elif not isinstance(answer.get("identity_key"), str) or \
                fingerprint(load_public_key(answer["identity_key"])) != fingerprint(identity):
            raise WrongSenderKey("The server no longer lists %s's identity key that signed the message." % user)
        verified = await self.in_thread(verify_devices, user, identity, answer.get("devices"))
        merged, _ = await self._record_devices(user, identity, [info for info, _, _ in verified])
        return merged

    async def devices(self, user=None):
        """
        The devices of C{user} (this user's own when None) as the server lists them, each verified against the
        pinned identity key (a new user's is pinned now; a changed one raises L{KeyChanged}): a list of
        L{DeviceInfo}, revoked ones included, C{last_seen} given only for one's own devices.
        """
        if self.user is None:
            raise NotAuthenticated()
        return await self._fetch_devices(canonical_username(user) if user is not None else self.user)

    async def refresh_devices(self, user):
        """
        Fetch C{user}'s devices now (as when a conversation with them opens), verified as L{devices} says, and call
        C{on_devices_changed} with those added or revoked since this client last saw them (nothing on the first look
        at a user).  Returns the list of L{DeviceInfo}.  One request and a signature check per device: cheap.
        """
        return await self.devices(user)

    def _own_devices_changed(self, frame):
        """The server says this user's devices changed (linked, certified or revoked elsewhere): look again."""
        if frame.get("user") != self.user or self.user is None:
            raise BadRequest("The devices_changed push names another user than this session's.")
        d = Deferred.fromCoroutine(self.refresh_devices(self.user))
        d.addErrback(lambda f: None if f.check(ConnectionLost, defer.CancelledError) or self.protocol.lost else
                     self.log.failure("Looking at this user's devices again failed", f))

    async def _own_devices_baseline(self):
        """
        On a receiving login: this user's devices as they are now, kept for a later C{devices_changed} to compare
        with, unless this machine keeps them already, under the identity key it has now (from a send, a link or an
        earlier session: no request then).
        """
        known = await self.pins.get_devices(self.user)
        if known is not None and known.identity == self.identity_fp:  # not a list kept from before a re-key
            return
        try:
            await self._fetch_devices(self.user)
        except ConnectionLost:
            return  # the login itself succeeded; the connection's end is told to on_disconnect, as at any time
        except defer.CancelledError:
            raise
        except PagerError as e:
            self.log.warn("Could not list this user's devices after logging in: {why}", why=e.message)

    async def _device_of(self, user, identity, device):
        """The L{DeviceInfo} of C{user}'s device C{device} (bytes) that signed a message: known here or fetched."""
        known = await self.pins.get_devices(user)
        info = known.find(device) if known is not None and known.identity == fingerprint(identity) else None
        if device in await self.pins.get_revocations(user, fingerprint(identity)):
            # Revoked, as verified here once: whatever the server lists now.
            named = "%s " % device_name_text(info.name) if info is not None else ""
            raise WrongSenderKey("The message is signed by %s's device %s(id %s %s), which was revoked." % (
                user, named, device.hex()[:4], device.hex()[4:8]))
        if info is None:
            try:
                info = next((d for d in await self._fetch_devices(user, identity) if d.device_id == device), None)
            except UnknownUser:
                info = None
        if info is None:
            raise WrongSenderKey("The message is signed by a device the server does not list for %s." % user)
        if info.revoked:
            raise WrongSenderKey("The message is signed by %s's device %s (id %s), which was revoked."
                                 % (user, info.name, info.short_id))
        return info

    async def revoke_device(self, device):
        """
        Revoke this user's device C{device} (its id: 32 hex digits, or bytes), from the identity device: the server
        closes its sessions and forgets its prekeys, and contacts' clients refuse what it signs.  Returns the user's
        devices as the server then lists them.
        """
        if self.user is None:
            raise NotAuthenticated()
        if not self.is_identity:
            raise Forbidden("Only the device that holds the identity key can revoke a device.")
        if isinstance(device, str):
            if not re.fullmatch("[0-9a-fA-F]{%d}" % (2 * DEVICE_ID_SIZE), device):
                raise BadRequest("A device id is %d hex digits." % (2 * DEVICE_ID_SIZE))
            device = bytes.fromhex(device)
        at = int(self._now())
        revocation = await self.in_thread(revoke_device, self.private_key, self.user, device, at)
        await self.protocol.request("revoke_device", device=device.hex(), at=at,
                                    signature=b64(revocation.signature))
        return await self._fetch_devices(self.user)

    # -- linking a device --

    async def link_request(self, user, key, name, secret):
        """
        On a new device: ask to be linked to C{user}'s account.  C{key} is the new device's private key, C{name}
        its name, C{secret} the secret of the link code this device shows (L{new_link_code}) for the user to type
        on the identity device.  The request carries a MAC with the secret over the key and the name, so the
        identity device signs only this key.  Returns the request's id (hex); L{wait_linked} waits for the answer.
        The connection stays open, unauthenticated, until then.
        """
        user = canonical_username(user)
        if not valid_device_name(name):
            raise BadRequest("A device's name is 1-64 bytes of printable text.")
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        waiting = self._link = _LinkWait(user, key, name, secret, Deferred())
        answer = await self.protocol.request("link_request", user=user, public_key=public_key_pem(key), name=name,
                                             mac=b64(link_request_mac(secret, self.server_id, user, der, name)))
        waiting.link = answer.get("link") if isinstance(answer.get("link"), str) else None
        return waiting.link

    def _link_answered(self, frame):
        waiting = self._link
        if waiting is None or waiting.done.called or frame.get("link", waiting.link) != waiting.link:
            return
        if frame["type"] == "linked":
            waiting.done.callback(frame)
        elif frame.get("declined") is True:
            waiting.done.errback(LinkFailed(
                "The link request was declined on the machine that holds %s's identity key: nothing was linked."
                % waiting.user))
        elif frame.get("evicted") is True:
            waiting.done.errback(LinkFailed(
                "The server dropped the link request to make room for newer requests for %s (someone may be "
                "flooding them); ask again." % waiting.user))
        else:
            waiting.done.errback(LinkFailed("Nobody approved the link request within %d minutes; ask again."
                                            % (LINK_TTL // 60)))

    async def wait_linked(self):
        """
        On the new device, after L{link_request}: wait for the identity device's answer and check it.  The answer's
        MAC (keyed with the code's secret) must cover the certificate, the certificate must be for this device's key
        and verify against the identity key the server gives: the server cannot put in a certificate of its own.
        The identity key is then pinned as this user's.  Returns this device's L{DeviceInfo}; raises L{LinkFailed}.
        """
        waiting = self._link
        if waiting is None:
            raise LocalError("No link request waits for an answer.")
        waiting.waited = True
        frame = await waiting.done
        self._link = None
        user = waiting.user
        try:
            certificate = DeviceCertificate.from_json(frame.get("device"), user)
            mac = _json_b64(frame, "answer_mac", "link answer", 32)
            pem = frame.get("identity_key")
            identity = load_public_key(pem) if isinstance(pem, str) else (await self.public_key(user, True))[0]
        except (BadCertificate, BadKey) as e:
            raise LinkFailed("The server's answer to the link request is malformed (%s): refused." % e.message)
        if not hmac.compare_digest(link_answer_mac(waiting.secret, self.server_id, fingerprint(identity), certificate),
                                   mac):
            raise LinkFailed("The answer to the link request was not made with this device's code: refused.")
        mine = waiting.key.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        if certificate.public_key_der != mine:
            raise LinkFailed("The certificate in the answer is for another key than this device's: refused.")
        try:
            await self.in_thread(certificate.verify, identity)
        except BadCertificate as e:
            raise LinkFailed("The certificate in the answer does not verify against %s's identity key (%s): refused."
                             % (user, e.message.rstrip(".")))
        now = self._now()
        await self.pins.set_pin(user, public_key_pem(identity), fingerprint(identity), now)
        return DeviceInfo(user, certificate.device_id, certificate.public_key_der, certificate.name,
                          certificate.created, certificate.signature, first_seen=now)

    async def link_pending(self):
        """On the identity device: the link requests waiting on the server (malformed ones left out)."""
        answer = await self.protocol.request("link_pending")
        requests = []
        for obj in answer.get("requests") if isinstance(answer.get("requests"), list) else []:
            try:
                requests.append(LinkRequest.from_json(obj))
            except (BadKey, BadCertificate) as e:
                self.log.warn("Ignoring a malformed link request from the server: {why}", why=e.message)
        return requests

    async def approve_link(self, request, name, secret):
        """
        On the identity device: certify the new device whose request carries a MAC made with C{secret} (the code
        the new device shows, as typed here: L{parse_link_code}).  C{request} is one L{LinkRequest}, or None to take
        the pending request that matches.  The MAC is checked before anything is signed: with no matching request,
        or with more than one, this raises L{BadLinkCode} and signs nothing, so neither the server nor a passer-by
        can add a device.
        C{name} names the device (the name it asked for when None).  Returns the new device's L{DeviceInfo}.
        """
        if self.user is None:
            raise NotAuthenticated()
        if not self.is_identity:
            raise Forbidden("Only the device that holds the identity key can link a device.")
        candidates = [request] if request is not None else await self.link_pending()
        matches = [r for r in candidates if hmac.compare_digest(
            link_request_mac(secret, self.server_id, self.user, r.public_key_der, r.name), r.mac)]
        if not matches:
            raise BadLinkCode("No device asks to be linked to %s with this code: check the code the new device "
                              "shows (nothing was signed)." % self.user)
        if len(matches) > 1:
            raise BadLinkCode("More than one pending request to link a device to %s carries this code (%s), so "
                              "none was approved and nothing was signed: decline them and link the new device again."
                              % (self.user, ", ".join("%s id %s" % (device_name_text(r.name), r.short_id)
                                                      for r in matches)))
        match = matches[0]
        name = name if name is not None else match.name
        if not valid_device_name(name):
            raise BadRequest("A device's name is 1-64 bytes of printable text.")
        created = int(self._now())
        certificate = await self.in_thread(certify_device, self.private_key, self.user, match.public_key(), name,
                                           created)
        await self.protocol.request("link_approve", link=match.link, name=name, created=created,
                                    certificate=b64(certificate.signature),
                                    answer_mac=b64(link_answer_mac(secret, self.server_id, self.identity_fp,
                                                                   certificate)))
        info = DeviceInfo(self.user, certificate.device_id, certificate.public_key_der, name, created,
                          certificate.signature, first_seen=self._now())
        await self._fetch_devices(self.user)
        return info

    async def decline_link(self, request):
        """
        On the identity device: decline the link request C{request} (a L{LinkRequest}, or its id in hex), as when
        the person answers no: the server forgets it and the waiting device's L{wait_linked} raises L{LinkFailed}
        at once.  A request that expired or was answered already raises L{BadRequest}.
        """
        if self.user is None:
            raise NotAuthenticated()
        if not self.is_identity:
            raise Forbidden("Only the device that holds the identity key can answer a link request.")
        await self.protocol.request("link_decline", link=request.link if isinstance(request, LinkRequest) else request)

    # -- directory --

    async def ping(self):
        await self.protocol.request("ping")

    async def users_page(self, after=None, limit=None, online=False):
        """
        One L{UsersPage}: at most C{limit} (the server's page size when None) registered names after C{after}, or,
        with C{online}, online names.
        """
        fields = {"online": True} if online else {}
        if after is not None:
            fields["after"] = after
        if limit is not None:
            fields["limit"] = limit
        answer = await self.protocol.request("users", **fields)
        registered, online_names = _user_names(answer, "registered"), _user_names(answer, "online")
        if not set(online_names) <= set(registered):
            raise BadRequest("The server's users answer lists online users that are not among the names it lists.")
        following = answer.get("next")
        if following is not None and (not registered or following != registered[-1]
                                      or (after is not None and following <= after)):
            raise BadRequest("The server's users answer does not go on from its last name.")
        return UsersPage(registered, online_names, _user_count(answer, "count"), _user_count(answer, "online_count"),
                         following)

    async def users(self):
        """
        C{(online, registered)}: two sorted lists of every user name, read page by page until the server says
        there is no more, or the names read reach the count it gives.  A listing that goes on past
        L{MAX_USERS_LISTED} names or L{MAX_USERS_PAGES} pages is a protocol error.
        """
        online, registered, after = [], [], None
        for _ in range(MAX_USERS_PAGES):
            page = await self.users_page(after)
            online += page.online
            registered += page.registered
            if page.next is None or len(registered) >= page.count:
                return online, registered
            if len(registered) >= MAX_USERS_LISTED:
                break
            after = page.next
        raise BadRequest("The server's list of users goes on past %s names or %s pages; stopped reading it."
                            % (format(MAX_USERS_LISTED, ","), format(MAX_USERS_PAGES, ",")))

    async def public_key(self, user, refresh=False):
        """C{(key, fingerprint)} for C{user}, from the server (cached for this connection)."""
        user = canonical_username(user)
        if user not in self._keys or refresh:
            answer = await self.protocol.request("key", user=user)
            if answer.get("user") != user:
                raise BadKey("The server answered a request for %s's key with another user's key." % user)
            key = load_public_key(answer.get("public_key", ""))
            fp = fingerprint(key)
            if answer.get("fingerprint") != fp.hex():
                raise BadKey("The server's fingerprint for %s does not match the key it sent." % user)
            self._keys[user] = (key, fp)
        return self._keys[user]

    async def recipient_key(self, user):
        """
        The key to encrypt to: the server's key for C{user}, which must be the one pinned on this machine.  The first
        key seen is pinned (trust on first use); a different one raises L{KeyChanged} until L{trust} accepts it.
        """
        key, fp = await self.public_key(user, refresh=True)  # never a key cached before a re-key
        pin = await self.pins.get_pin(user)
        if pin is None:
            await self.pins.set_pin(user, public_key_pem(key), fp, self.reactor.seconds())
        elif bytes(pin[1]) != fp:
            raise self._key_changed(user, bytes(pin[1]), fp)
        return key

    async def trust(self, user, recheck=True):
        """
        Pin the key the server now gives for C{user}; returns its fingerprint.  The key pinned already is left as it
        is, so trusting it again does not undo a verification.  A key pinned anew reads the broken groups again
        (L{recheck_broken_groups}) -- unless not C{recheck}: the caller then does, once it has said the key is
        trusted, so that what the groups say next comes after that.
        """
        key, fp = await self.public_key(user, refresh=True)
        if key_status(await self.pins.get_pin(user), fp) in ("new", "changed"):
            await self.pins.set_pin(user, public_key_pem(key), fp, self.reactor.seconds())
            if recheck:
                await self.recheck_broken_groups()
        return fp

    async def recheck_broken_groups(self):
        """
        A key was trusted or verified here: read again the groups whose chain stopped at a key (each may go on), and
        try again the group messages held for want of a verified chain or key.
        """
        for row in await self.pins.group_rows():
            if row[5] is not None:
                try:
                    await self.refresh_group(bytes(row[0]))
                except (UnknownGroup, Forbidden):
                    continue
        held, self._held = self._held, collections.OrderedDict()
        for incoming in held.values():
            self._enqueue(self._handle_message, incoming)

    async def key_status(self, user):
        """C{(fingerprint, status)} of the key the server now gives for C{user}: see L{key_status}."""
        _, fp = await self.public_key(user, refresh=True)
        return fp, key_status(await self.pins.get_pin(user), fp)

    async def verify(self, user, fp):
        """
        Mark C{user}'s key verified, the user having compared the fingerprint C{fp} out of band: it must be the key
        the server gives now, and, if a key is pinned, the pinned one: a changed key is accepted with C{trust}
        first, as a deliberate step of its own (else L{KeyChanged}, changing nothing).  A key not pinned yet is
        pinned.  The one rule of the chat's C{/verify} and of C{pager-cli verify}.
        """
        key, current = await self.public_key(user, refresh=True)
        if current != fp:
            raise KeyChanged(user, fp, current, message=(
                "The fingerprint you compared is not %s's key as the server gives it now (%s); nothing was marked "
                "verified." % (user, format_fingerprint(current))))
        pin = await self.pins.get_pin(user)
        if pin is not None and bytes(pin[1]) != fp:
            raise KeyChanged(user, bytes(pin[1]), fp, message=(
                "%s's key changed since you pinned it: compare the new one (%s) and accept it with %s before "
                "verifying it; nothing was marked verified."
                % (user, format_fingerprint(fp), self.command_hint("trust", user))))
        if pin is None:
            await self.pins.set_pin(user, public_key_pem(key), fp, self.reactor.seconds())
        await self.pins.set_verified(user, fp)
        await self.recheck_broken_groups()

    # -- sending --

    async def send(self, recipients, data, content_type="text", filename=""):
        """
        Encrypt and sign C{data} (C{str} or C{bytes}) for each recipient and send it; returns the message id (hex)
        once the server has committed it.
        """
        return (await self.post(recipients, data, content_type, filename))["msg"]

    async def post(self, recipients, data, content_type="text", filename=""):
        """Like L{send}, but returns the server's whole answer: C{msg}, C{duplicate} and C{queued} (offline names)."""
        names, envelope = await self.seal(recipients, data, content_type, filename)
        return await self.send_envelope(names, envelope)

    async def seal(self, recipients, data, content_type="text", filename="", message_id=None):
        """
        C{(names, envelope)}: C{data} sealed for every current device of each recipient and for this user's other
        devices, as the server's bundles give them now.  Each bundle's identity key must be the one pinned here
        (L{KeyChanged} otherwise, as L{recipient_key}); each device's certificate must verify against it and each
        signed prekey against its device's key (L{BadCertificate}).  A device that is certified, ever published
        prekeys, or belongs to a user seen with a certified device is sealed to only with its prekeys: without a
        usable signed prekey the message is not sealed (L{NoPrekeys}), never wrapped with RSA-OAEP instead.
        C{message_id} (bytes): seal anew a message sealed before, as the same message.  L{send_envelope} sends it.
        """
        if self.user is None:
            raise NotAuthenticated()
        if isinstance(data, str):
            data = data.encode("utf-8")
        names = sorted({canonical_username(n) for n in ([recipients] if isinstance(recipients, str) else recipients)})
        now = self._now()
        targets = await self._targets(names, now)
        envelope = await self.in_thread(
            seal, self.private_key, self.user, targets, data, content_type=content_type, filename=filename,
            message_id=message_id, timestamp_ms=int(now * 1000), sender_fingerprint=self.identity_fp,
            sender_device=device_id(self.private_key), now=now)
        message_id = parse_header(envelope.header).message_id
        self._sealed[message_id] = (names, data, content_type, filename)
        while len(self._sealed) > MAX_RESEALABLE:
            self._sealed.popitem(last=False)
        return names, envelope

    async def _bundles(self, users):
        bundles = {}
        for start in range(0, len(users), MAX_RECIPIENTS):
            part = users[start:start + MAX_RECIPIENTS]
            answer = await self.protocol.request("bundle", users=part)
            listed = answer.get("bundles")
            for bundle in listed if isinstance(listed, list) else []:
                user = bundle.get("user") if isinstance(bundle, dict) else None
                if user not in part or user in bundles:
                    raise BadRequest("The server's bundle answer names a user that was not asked for, or one twice.")
                bundles[user] = bundle
            missing = [user for user in part if user not in bundles]
            if missing:
                raise BadRequest("The server's bundle answer leaves out %s." % ", ".join(missing))
        return bundles

    async def _targets(self, names, now, group=None):
        """
        The L{DeviceTarget}s to seal to: every current device of C{names}, and this user's other devices.
        C{group}: the L{GroupState} they are members of, whose signed fingerprints a member not pinned here must have.
        """
        users = names + ([self.user] if self.user not in names else [])
        bundles = await self._bundles(users)
        mine = device_id(self.private_key)
        targets = []
        for user in users:
            expected = (group.members[user], group.name) if group is not None and user in group.members else None
            identity = await self._identity_of(user, bundles[user].get("identity_key"), expected)
            verified = await self.in_thread(verify_devices, user, identity, bundles[user].get("devices"), True)
            _, certified_seen = await self._record_devices(user, identity, [info for info, _, _ in verified])
            for info, spk, opk in verified:
                if info.revoked or (user == self.user and info.device_id == mine):
                    continue
                if spk is not None and spk.usable_at(now):
                    targets.append(DeviceTarget(user, info.device_id, signed_prekey=spk, one_time=opk))
                elif info.certified or info.prekeys or certified_seen:
                    raise NoPrekeys(
                        "The server gives no usable signed prekey for %s's device %s (id %s), so the message was "
                        "not sent: it is never sealed to a device's RSA key once it has published prekeys. Ask %s to "
                        "run pager on that device, or to revoke it." % (user, info.name or "identity device",
                                                                         info.short_id, user))
                else:
                    # A legacy device: the identity device of an account whose 0.3 client has not logged in yet
                    # (verify_devices checked that its key is the identity key).
                    targets.append(DeviceTarget(user, info.device_id, rsa_key=identity))
        if self.user in names:
            # A note to self: this device gets it too, sealed to its own current signed prekey.
            targets.append(DeviceTarget(self.user, mine, signed_prekey=await self._own_signed_prekey(now)))
        return targets

    async def _own_signed_prekey(self, now):
        device = device_id(self.private_key)
        current = [p for p in await self.seen.local_prekeys(device) if p.kind == "signed" and p.replaced_at is None
                   and p.valid_from - PREKEY_SKEW <= now <= p.valid_until]
        if not current:
            raise NoPrekeys("This device has no usable signed prekey of its own to seal a note to self to.")
        p = max(current, key=lambda p: p.valid_from)
        # Unsigned: the sealer does not check signatures, and this device made it itself.
        return SignedPrekey(self.user, device, p.prekey_id, p.public, p.valid_from, p.valid_until, b"")

    async def device_targets(self, recipients):
        """
        The L{DeviceTarget}s L{seal} would seal to now: every current device of C{recipients} and this user's other
        devices, verified as L{seal} says.  For a tool (or a test) that seals an envelope itself.
        """
        if self.user is None:
            raise NotAuthenticated()
        names = sorted({canonical_username(n) for n in ([recipients] if isinstance(recipients, str) else recipients)})
        return await self._targets(names, self._now())

    async def send_envelope(self, names, envelope):
        """
        Send an already sealed L{Envelope}, in one frame or as a header and chunk frames.  When the server says the
        recipients' devices changed since it was sealed, a message this client sealed (L{seal}, in this process) is
        sealed anew for them as the same message (same id), up to L{RESEAL_TRIES} times; else L{DevicesChanged}.
        """
        message_id = parse_header(envelope.header).message_id
        for attempt in range(RESEAL_TRIES + 1):
            try:
                answer = await self._send_envelope(names, envelope)
            except DevicesChanged:
                again = self._sealed.get(message_id)
                if again is None or attempt == RESEAL_TRIES:
                    raise
                _, envelope = await self.seal(*again, message_id=message_id)
            else:
                self._sealed.pop(message_id, None)
                return answer

    async def _send_envelope(self, names, envelope, group=None):
        proto = self.protocol
        max_line = self.limits.get("max_line", 0)
        header = b64(envelope.header)
        frame = {"to": names} if group is None else {"group": group.hex()}
        if not self.receipts_wanted:
            frame["receipt"] = False
        frame.update(size=envelope.size, header=header)
        encoded = sum((len(c) + 2) // 3 * 4 + 3 for c in envelope.chunks)  # base64 sizes, without encoding yet
        if len(header) + encoded + FRAME_MARGIN < max_line:
            return await proto.request("send", chunks=[b64(c) for c in envelope.chunks],
                                       signature=b64(envelope.signature), **frame)
        # Chunk by chunk, as the server reads them: a large message is never encoded whole on the reactor thread.
        rid = proto.new_id()
        answer = proto.request("send", id=rid, chunks=[], **frame)
        last = len(envelope.chunks) - 1
        for index, chunk in enumerate(envelope.chunks):
            await proto.flow.wait()
            if answer.called:  # refused part-way: stop sending
                break
            part = {"type": "chunk", "id": rid, "chunks": [b64(chunk)]}
            if index == last:
                part["signature"] = b64(envelope.signature)
            proto.send_frame(part)
        return await answer

    # -- groups --
    #
    # This client keeps each group's membership chain as far as it verified it (in C{pins}: a L{LocalStore} or
    # L{MemoryPins}); C{_chains} caches it, with the state after every op.  The server's word on membership is never
    # taken: messages are sealed to the members the verified chain names, and a difference is a warning.

    def _max_group_members(self):
        value = self.limits.get("max_group_members")
        return value if type(value) is int and value >= 1 else DEFAULT_MAX_GROUP_MEMBERS

    def _group_warn(self, gid, name, sentence):
        """Tell C{on_group_warning(group_id hex, name, sentence)}, once per sentence and connection."""
        if (gid, sentence) in self._group_warned:
            return
        self._group_warned.add((gid, sentence))
        if self.on_group_warning is not None:
            self.on_group_warning(gid.hex(), name, sentence)
        else:
            self.log.warn("{group}: {why}", group="#" + name if name else gid.hex(), why=sentence)

    def _group_info(self, chain):
        state = chain.state
        return GroupInfo(chain.gid.hex(), state.name or chain.unverified_name or "", state.topic or "", state.seq,
                         state.head, tuple(_member_names(state)), tuple(sorted(state.admins)),
                         self.user in state.members, chain.unread, chain.broken, state)

    async def _chain(self, gid):
        """The verified chain of group C{gid} (bytes) kept here, or None when this client knows no such group."""
        chain = self._chains.get(gid)
        if chain is not None:
            return chain
        rows = [row for row in await self.pins.group_rows() if row[0] == gid]
        if not rows:
            return None
        _, name, _, _, _, broken, unread = rows[0]
        ops = await self.pins.group_ops(gid)
        # Verified when they were stored: folded again without their signatures.
        states = fold_group_ops(gid, [parse_group_op(op) for _, op, _, _ in ops], max_members=MAX_GROUP_WRAPS)
        chain = self._chains[gid] = _GroupChain(gid, ops, states, broken, unread)
        if not states and name != gid.hex():
            chain.unverified_name = name
        chain.refused = await self.pins.group_refused(gid)
        return chain

    async def _resolve_group(self, group, sync=True):
        """The id (bytes) of C{group}: an id (16 bytes or 32 hex digits) or a name (C{ops} or C{#ops})."""
        if isinstance(group, (bytes, bytearray)):
            if len(group) != GROUP_ID_SIZE:
                raise BadRequest("A group id is %d bytes." % GROUP_ID_SIZE)
            return bytes(group)
        if not isinstance(group, str):
            raise BadRequest("A group is named by its name or its id.")
        rows = await self.pins.group_rows()
        if not group.startswith("#") and re.fullmatch("[0-9a-f]{%d}" % (2 * GROUP_ID_SIZE), group):
            gid = bytes.fromhex(group)
            if any(row[0] == gid for row in rows) or not sync:
                return gid
        name = canonical_group_name(group)
        found = sorted((not row[4], -row[2], row[0]) for row in rows if row[1] == name)
        if found:
            return found[0][2]
        if sync:
            await self.sync_groups()
            return await self._resolve_group(group, sync=False)
        if re.fullmatch("[0-9a-f]{%d}" % (2 * GROUP_ID_SIZE), group):
            return bytes.fromhex(group)
        for chain in self._chains.values():  # the chains read this session (every group's, at login): their names
            if any(state.name == name for state in chain.states[:-1]):
                raise UnknownGroup("You are in no group named #%s (#%s was renamed %s)."
                                   % (name, name, group_label(chain.state.name)))
        raise UnknownGroup("You are in no group named #%s." % name)

    async def groups(self):
        """Every group this client knows (current and former), as L{GroupInfo}s sorted by name."""
        infos = []
        for row in await self.pins.group_rows():
            chain = await self._chain(row[0])
            chain.unread = row[6]
            infos.append(self._group_info(chain))
        return infos

    async def group(self, group):
        """
        The L{GroupInfo} of C{group} (a name, C{#name}, or an id), synced from the server first when this client
        does not know it; L{UnknownGroup} when it is not found then either.
        """
        gid = await self._resolve_group(group)
        chain = await self._chain(gid)
        if chain is None:
            await self.refresh_group(gid)
            chain = await self._chain(gid)
            if chain is None:
                raise UnknownGroup("You are in no group %s." % (group if isinstance(group, str) else gid.hex()))
        return self._group_info(chain)

    async def group_read(self, group, count=0):
        """Set C{group}'s unread count (0: the user has read it; the UI counts with L{group_unread_add})."""
        gid = await self._resolve_group(group)
        unread = await self.pins.group_unread(gid, count=count)
        if gid in self._chains:
            self._chains[gid].unread = unread
        return unread

    async def group_unread_add(self, group, count=1):
        """Add C{count} to C{group}'s unread count; returns the new count."""
        gid = await self._resolve_group(group)
        unread = await self.pins.group_unread(gid, add=count)
        if gid in self._chains:
            self._chains[gid].unread = unread
        return unread

    async def sync_groups(self):
        """
        Ask the server for this user's groups (C{groups}) and read each (L{refresh_group}): every group this user is
        a member of (its new ops if any, and the server's member list, compared with the chain's), and each former
        group whose head is not the one verified here.  Done at every login.  A group whose chain fails to verify is
        marked broken and warned of; it does not stop the others.  Returns L{groups}.
        """
        if self.user is None:
            raise NotAuthenticated()
        answer = await self.protocol.request("groups")
        listed = answer.get("groups")
        if not isinstance(listed, list) or len(listed) > 4 * MAX_FORMER_GROUPS + self._limit_groups():
            raise BadRequest("The server's groups answer is not a list of groups.")
        for obj in listed:
            if not isinstance(obj, dict) or not isinstance(obj.get("group"), str) or \
                    not re.fullmatch("[0-9a-f]{%d}" % (2 * GROUP_ID_SIZE), obj["group"]):
                raise BadRequest("The server's groups answer holds something that is not a group.")
            gid = bytes.fromhex(obj["group"])
            chain = await self._chain(gid)
            head = obj.get("head")
            # A group this user is in is read again even when its head is the one verified here: the answer's
            # member list is compared with the chain's (a reader the server added is found at login).
            if chain is not None and isinstance(head, str) and head == chain.state.head.hex() and \
                    not chain.broken and obj.get("member") is not True:
                continue
            try:
                await self.refresh_group(gid)
            except UnknownGroup:
                continue  # gone between the two answers
        return await self.groups()

    def _limit_groups(self):
        value = self.limits.get("max_groups")
        return value if type(value) is int and value >= 1 else Limits.max_groups

    async def refresh_group(self, group):
        """
        Fetch group C{group}'s ops after the version verified here (C{group_ops}, page by page) and verify them
        (L{_verify_group_ops}): each new op is told to C{on_group_event}; a forged or refused op stops the chain
        there (the group is then broken: warned of, and nothing is sent to it).  The server's member list is then
        compared with the chain's: a difference is a warning.  Returns the L{GroupInfo}.
        """
        if self.user is None:
            raise NotAuthenticated()
        gid = await self._resolve_group(group, sync=False)
        await self._group_lock.acquire()
        try:
            return await self._refresh_group(gid)
        finally:
            self._group_lock.release()

    async def _refresh_group(self, gid):
        chain = await self._chain(gid) or _GroupChain(gid)
        after, objs = chain.seq, []
        while True:
            answer = await self.protocol.request("group_ops", group=gid.hex(), after=after)
            page = answer.get("ops")
            if answer.get("group") != gid.hex() or not isinstance(page, list) or \
                    len(objs) + len(page) > MAX_GROUP_OPS:
                raise BadRequest("The server's group_ops answer is malformed.")
            objs += page
            last = page[-1].get("seq") if page and isinstance(page[-1], dict) else None
            if answer.get("more") is not True or type(last) is not int or last <= after:
                break
            after = last
        await self._verify_group_ops(chain, objs, answer)
        return self._group_info(chain)

    async def _op_signer_trusted(self, op, pem, join_seq, state, first_use, chain, own):
        """
        Whether the key that signed C{op} (fingerprint C{op.actor_fp}) is its actor's: for an actor the verified
        chain (C{state}, the group before C{op}) names, the key it names (signed by the admin who added them), which
        must also be the key pinned here unless this client's user verified the pinned one out of band (L{verify});
        for an actor it does not name (a create's), the key pinned here, or else the server's (trust on first use,
        as for a first message); for this user's own op, L{_own_op_trusted} (C{chain}: the chain verified so far,
        C{own}: its L{_OwnOps}).  Keys trusted on first use are put in C{first_use} (user -> (PEM, fingerprint)),
        pinned only if the chain is kept.  Returns True, or False for an op accepted only under the history rule
        (see L{_verify_group_ops}); raises L{_ChainRefused} otherwise.
        """
        named = state.members.get(op.actor)
        if op.actor == self.user:
            trusted, expected = await self._own_op_trusted(op, chain, own)
        else:
            pin = await self.pins.get_pin(op.actor)
            if pin is None and op.actor in first_use:
                pin = first_use[op.actor] + (None, False)
            trusted, expected = await self._group_key_ok(op.actor, op.actor_fp, named, pin, state.name)
            if pin is None and trusted is None:
                try:
                    key, fp = await self.public_key(op.actor, refresh=True)
                except UnknownUser:
                    key = fp = None
                trusted, expected = fp == op.actor_fp, "%s's key on the server" % op.actor
            if pin is None and trusted:
                first_use[op.actor] = (pem, op.actor_fp)
        if trusted:
            return True
        # The history rule: when this client joins, the ops before the one that added this user are vouched for by
        # the admin who added it (the add commits to them by hash), even if a signer's key changed since.
        if join_seq is not None and op.seq < join_seq:
            return False
        raise _ChainRefused("version %d (%s by %s) is signed with a key (%s) that is not %s"
                            % (op.seq, op.kind, op.actor, format_fingerprint(op.actor_fp), expected))

    async def _own_op_trusted(self, op, chain, own):
        """
        C{(ok, expected)} for an op of this user's (L{_op_signer_trusted}): signed with the identity key of now, or
        with a key the user had before, as long as no op of the chain before it is signed with the key of now.  A key
        from before is one replaced by a re-key or recovery made on this machine, or taken on first use before
        (L{LocalStore.former_keys}); or, in a chain read here from its start (a machine set up after a recovery), any
        other: taken on first use, as a contact's key is, noted in C{own} (an L{_OwnOps}), then kept and warned of
        once the chain is (L{_keep_own_first_use}).
        """
        await self._own_identity()
        if op.actor_fp == self.identity_fp:
            return True, None
        if own.signed_now is None:
            own.signed_now = any(o.actor == self.user and o.actor_fp == self.identity_fp
                                 for o in (parse_group_op(raw) for _, raw, _, _ in chain.ops))
        if own.signed_now:
            return False, ("your key: an earlier version is signed with your key of now, so this one is not from "
                           "before a key change")
        if op.actor_fp in await self.pins.former_keys(self.user):
            return True, None
        if own.fresh:
            own.first_use.append((op.seq, op.actor_fp))
            return True, None
        return False, "your key, nor one this machine knew you by before"

    async def _group_key_ok(self, user, fp, named, pin, group):
        """
        C{(ok, expected)}: whether C{fp} is C{user}'s key in a group whose chain names C{named} for them (None: it
        does not name them), with C{pin} (a pins store's tuple, or None) pinned here; C{expected} says what was
        expected, for a sentence.  The chain's key wins over a pin made on first use (a server could have given
        that one), not over one this client's user verified out of band.  C{ok} is None when neither a pin nor the
        chain says (the caller may then trust the server on first use).
        """
        if pin is None and named is None:
            return None, None
        trust, verify = self.command_hint("trust", user), self.command_hint("verify", user)
        if pin is None:
            return fp == named, ("the key #%s's signed membership names for %s (%s, as the signed change that made "
                                 "them a member gives it): if %s's key changed, compare the new one with them: %s, "
                                 "then %s"
                                 % (group, user, format_fingerprint(named), user, trust, verify))
        if bytes(pin[1]) != fp:
            return False, ("%s's key as pinned here (if %s's key changed, compare the new one with them: %s, then "
                           "%s)" % (user, user, trust, verify))
        if named is not None and named != fp and not pin[3]:
            return False, ("the key #%s's signed membership names for %s (%s); the one pinned here was not compared "
                           "with %s: compare it, and %s makes it %s's key here"
                           % (group, user, format_fingerprint(named), user, verify, user))
        return True, None

    async def _check_listed_keys(self, op, state):
        """Warn of a member whose key in a create or add op is not the one pinned here (or, for this user, theirs)."""
        for user, fp in op.members:
            if user == self.user:
                await self._own_identity()
                if fp != self.identity_fp:
                    self._group_warn(op.group_id, state.name, (
                        "%s added you to #%s (version %d) with a key of yours that is not this device's (%s), as "
                        "before a key change: the members' clients hold your messages and changes to #%s until they "
                        "compare your new key with you." % (op.actor, state.name, op.seq, format_fingerprint(fp),
                                                            state.name)))
                continue
            pin = await self.pins.get_pin(user)
            if pin is not None and bytes(pin[1]) != fp:
                self._group_warn(op.group_id, state.name, (
                    "%s added %s to #%s (version %d) with the key %s, which is not %s's key as pinned here (%s): %s"
                    % (op.actor, user, state.name, op.seq, format_fingerprint(fp), user,
                       format_fingerprint(bytes(pin[1])),
                       "you verified the one pinned here, so it is the one used." if pin[3] else
                       "nothing is sent to #%s until you compare %s's key with them and mark it verified ('verify "
                       "%s')." % (state.name, user, user))))

    async def _verify_group_ops(self, chain, objs, answer):
        """
        Verify the server's ops C{objs} (C{group_ops}' list) in order on top of C{chain}: each op parses, extends
        the chain (group id, seq, prev), its key's fingerprint is its C{actor_fp}, its signature verifies under that
        key, the key is the actor's (L{_op_signer_trusted}; or, for an op before the one that added this user when
        this client was not a member, vouched for by that add: the history rule), and the group's rules accept it
        (L{GroupState.apply}).  Verified ops are stored, the keys trusted on first use pinned, and the ops made while
        this user is a member (from the one that added them) told to C{on_group_event}; the first that fails leaves
        the chain at the op before, marked broken with the sentence, and warned of.  History taken under the history
        rule is kept only when the read completes and the add that vouches for it verified: else none of this
        read is kept, so that the next read judges it again (and warns of it).
        """
        gid, before = chain.gid, chain.state
        state, new, events, broken = before, [], [], None
        join_seq, vouched_only, kept, history_signers = None, False, (len(chain.states), len(chain.ops)), set()
        adder, first_use, own, seen_name = None, {}, _OwnOps(fresh=before.seq == 0), None
        refused = chain.refused if chain.refused is not None and chain.refused[0] == before.seq + 1 else None
        if refused is not None and (not objs or _op_digest(objs[0]) != refused[1]):
            # Once an op is refused here, only that op can take the chain on: a server that withholds it or shows
            # another in its place does not make the warning go away.
            if objs:
                broken = ("the server now shows another operation as version %d than the one refused here: it may "
                          "be showing the group's members different histories" % refused[0])
            else:
                broken = chain.broken or "version %d was refused here, and the server no longer shows it" % refused[0]
            objs = []
        try:
            items, malformed = [], None
            for obj in objs:  # the ops before a malformed one are still verified and kept
                try:
                    if not isinstance(obj, dict):
                        raise _ChainRefused("the server sent something that is not an operation")
                    raw = _json_b64(obj, "op", "group operation", max_size=MAX_GROUP_OP_BYTES)
                    signature = _json_b64(obj, "signature", "group operation", max_size=RSA_MAX_BITS // 8)
                    pem = _json_field(obj, "key", str, "group operation")
                    items.append((parse_group_op(raw), raw, signature, pem))
                except (_ChainRefused, GroupOpError, BadCertificate) as e:
                    malformed = _ChainRefused("the operation after version %d is malformed: %s"
                                              % (chain.seq + len(items), e.message.rstrip(".")))
                    break
            if self.user not in before.members:  # joining (or joining again): what came before is history
                for op, _, _, _ in items:
                    if (op.kind == "create" and op.actor == self.user) or \
                            (op.kind in ("create", "add") and self.user in [u for u, _ in op.members]):
                        join_seq = op.seq
            for op, raw, signature, pem in items:
                if op.group_id != gid or op.seq != state.seq + 1 or op.prev != state.head:
                    raise _ChainRefused("the operation the server gives as version %d does not extend the chain "
                                        "verified here (version %d)" % (op.seq, state.seq))
                key = load_public_key(pem)
                if fingerprint(key) != op.actor_fp:
                    raise _ChainRefused("version %d is given with a key that is not the one it names" % op.seq)
                try:
                    await self.in_thread(verify_group_op, key, op, signature)
                except BadSignature:
                    raise _ChainRefused("the signature of version %d (%s by %s) does not verify"
                                        % (op.seq, op.kind, op.actor))
                trusted_here = dict(first_use)
                if not await self._op_signer_trusted(op, pem, join_seq, state, trusted_here, chain, own):
                    vouched_only = True
                    history_signers.add(op.actor)
                if op.seq == join_seq:
                    adder = op.actor
                try:
                    after = state.apply(op, max_members=max(self._max_group_members(), len(state.members)))
                except GroupRefused as e:
                    raise _ChainRefused("version %d (%s by %s) breaks the group's rules: %s"
                                        % (op.seq, op.kind, op.actor, e.message))
                if op.kind in ("create", "add"):
                    await self._check_listed_keys(op, after)
                first_use = trusted_here
                seen_name = after.name or seen_name
                if op.actor == self.user and op.actor_fp == self.identity_fp:
                    own.signed_now = True
                if self.user in state.members or self.user in after.members:
                    events.append(_group_event(op, after, state))  # not history from before this user's add
                state = after
                new.append((op.seq, raw, signature, pem))
                chain.states.append(state)
                chain.ops.append((op.seq, raw, signature, pem))
            if malformed is not None:
                raise malformed
        except (_ChainRefused, GroupOpError, BadKey, BadCertificate, EnvelopeError) as e:
            broken = e.message.rstrip(".")
            if vouched_only and state.seq < join_seq:
                # Ops taken only as history vouched for by the add of this user, and that add did not verify: the
                # history is vouched for by nobody, and none of it is kept.
                state, new, events, first_use = before, [], [], {}
                del chain.states[kept[0]:], chain.ops[kept[1]:]
            if state.seq - before.seq < len(objs):
                refused = (state.seq + 1, _op_digest(objs[state.seq - before.seq]))
        except BaseException:
            # Cut short (the connection, say): what was verified so far is kept, with the chain as it was -- but
            # not history taken under the history rule: the next read judges it again, and warns of it.
            if vouched_only:
                del chain.states[kept[0]:], chain.ops[kept[1]:]
                raise
            if new:
                await self._pin_first_use(first_use)
                await self._keep_own_first_use(gid, state.name, own, state.seq)
                await self.pins.save_group(gid, state.name, state.seq, state.head, self.user in state.members,
                                           chain.broken, new)
                self._chains[gid] = chain
                self._tell_group_events(events)
            raise
        # A chain refused before any op is kept still goes by the name its ops gave it as read (history the add of
        # this user would have vouched for, say): what its warnings say, and what "#ops" finds, to say it is broken.
        name = state.name or (before.name if before.seq else "") or (seen_name if broken is not None else "")
        if broken is None and state.seq == before.seq and chain.broken is None:
            server_seq = answer.get("seq")
            if type(server_seq) is int and server_seq < state.seq:
                self._group_warn(gid, name, "The server shows version %d of #%s, older than version %d verified "
                                            "here: it may be holding changes back." % (server_seq, name, state.seq))
        await self._keep_own_first_use(gid, name, own, state.seq)
        if vouched_only and state.seq >= join_seq:
            self._group_warn(gid, name, (
                "#%s's changes from before you were added include some signed with a key that is not the one known "
                "here for %s (a key changed since, or a history made up): %s vouched for them by adding you."
                % (name, ", ".join(sorted(history_signers)), adder)))
        if broken is not None and broken != chain.broken:
            # Said when the chain stops verifying, or for another reason: not again at each read of it (every
            # command's login reads the groups) -- the list marks it, and whatever would go to it says why not.
            self._group_warn(gid, name, "#%s's membership chain does not verify: %s. Nothing is sent to #%s until it "
                                        "does." % (name or gid.hex(), broken, name or gid.hex()))
        chain.broken = broken
        if broken is None:
            refused = None
        if refused != chain.refused:
            chain.refused = refused
            await self.pins.set_group_refused(gid, refused)
        await self._pin_first_use(first_use)
        chain.unverified_name = name if not state.seq and name else None
        await self.pins.save_group(gid, name or gid.hex(), state.seq, state.head, self.user in state.members,
                                   broken, new)
        self._chains[gid] = chain
        self._tell_group_events(events)
        listed = answer.get("members")
        if broken is None and isinstance(listed, list) and answer.get("head") == state.head.hex():
            server = {n for n in listed if isinstance(n, str)}
            chain.server_extra = tuple(sorted(server - set(state.members)))
            for user in chain.server_extra:
                self._group_warn(gid, name, (
                    "The server lists %s as a member of #%s, but no signed operation made %s one; nothing is sealed "
                    "to %s." % (user, name, user, user)))
            for user in sorted(set(state.members) - server):
                self._group_warn(gid, name, (
                    "The server does not list %s as a member of #%s, though the signed operations make %s one (was "
                    "the account deleted?)." % (user, name, user)))

    async def _keep_own_first_use(self, gid, name, own, seq):
        """
        A chain verified up to version C{seq} is kept: the other keys of this user's that its ops up to there were
        taken with on first use (C{own}, an L{_OwnOps}) are kept as former keys of theirs, and warned of.
        """
        taken = [(n, fp) for n, fp in own.first_use if n <= seq]
        if not taken:
            return
        keys = sorted({fp for _, fp in taken})
        for fp in keys:
            await self.pins.add_former_key(self.user, fp, self._now())
        one = len(keys) == 1
        self._group_warn(gid, name, (
            "#%s's changes made in your name up to version %d are signed with %s of yours that this machine never "
            "held (%s): they are taken as yours, made before you replaced your key. If you never had %s, someone "
            "else made them." % (name, taken[-1][0], "a key" if one else "keys",
                                 ", ".join(map(format_fingerprint, keys)), "that key" if one else "those keys")))

    async def _pin_first_use(self, first_use):
        """Pin the keys a kept chain trusted on first use (user -> (PEM, fingerprint)), unless pinned meanwhile."""
        for user, (pem, fp) in first_use.items():
            if await self.pins.get_pin(user) is None:
                await self.pins.set_pin(user, pem, fp, self._now())

    def _tell_group_events(self, events):
        if self.on_group_event is not None:
            for event in events:
                self.on_group_event(event)

    def _group_changed(self, frame):
        """The server says a group changed: fetch and verify its new ops."""
        gid = frame.get("group")
        if not isinstance(gid, str) or not re.fullmatch("[0-9a-f]{%d}" % (2 * GROUP_ID_SIZE), gid):
            raise BadRequest("The group_changed push names no group.")
        d = Deferred.fromCoroutine(self.refresh_group(bytes.fromhex(gid)))
        d.addErrback(lambda f: None if f.check(ConnectionLost, defer.CancelledError) or self.protocol.lost else
                     self.log.warn("Fetching a group's changes failed: {why}", why=f.getErrorMessage()))

    async def _sync_groups_quietly(self):
        """At login: L{sync_groups}; a failure is logged, never the login's."""
        try:
            await self.sync_groups()
        except (ConnectionLost, defer.CancelledError):
            return
        except PagerError as e:
            self.log.warn("Could not fetch this user's groups after logging in: {why}", why=e.message)

    # -- changing a group (identity device only) --

    async def _change_group(self, gid, kind, build):
        """
        Build the op C{kind} on the verified head (C{build(state)} gives its fields, or None when there is nothing
        left to do), check it against the group's rules here, sign it off the reactor and send it.  When another
        change got there first (C{group_changed}), fetch it and build the op again on the new head (up to
        L{RESEAL_TRIES} times).  Returns the L{GroupInfo} after it.
        """
        if self.user is None:
            raise NotAuthenticated()
        if not self.is_identity:
            raise NotIdentityDevice("Group changes are signed with your identity key: make them on your identity "
                                    "device.")
        await self._own_identity()
        for attempt in range(RESEAL_TRIES + 1):
            chain = await self._chain(gid) or _GroupChain(gid)
            if chain.broken:
                raise GroupRefused("Not changed: #%s's membership chain does not verify: %s."
                                   % (chain.state.name or gid.hex(), chain.broken))
            state = chain.state
            fields = await build(state)
            if fields is None:
                return self._group_info(chain)
            raw = encode_group_op(gid, state.seq + 1, state.head, kind, self.user, self.identity_fp,
                                  int(self._now() * 1000), **fields)
            state.apply(parse_group_op(raw), max_members=self._max_group_members())  # the rules' sentence, here
            signature = await self.in_thread(sign_group_op, self.private_key, raw)
            try:
                await self.protocol.request("group_op", group=gid.hex(), op=b64(raw), signature=b64(signature))
            except GroupChanged:
                if attempt == RESEAL_TRIES:
                    raise
                await self.refresh_group(gid)  # another change got there first: build it again on top of that
                continue
            await self.refresh_group(gid)
            return self._group_info(await self._chain(gid))

    async def _listed_keys(self, users):
        """C{[(user, fingerprint)]}: each user's key as pinned here (first use pins it; L{KeyChanged} if it changed)."""
        return [(user, fingerprint(await self.recipient_key(user))) for user in users]

    def _names(self, users):
        return sorted({canonical_username(u) for u in ([users] if isinstance(users, str) else users)})

    async def group_create(self, name, members=(), topic=""):
        """
        Create the group C{name} (C{ops} or C{#ops}) with this user as its admin and C{members}, each with their key
        as pinned here (L{recipient_key}), and C{topic}.  Returns its L{GroupInfo}.  L{GroupExists} when the name is
        taken on the server.
        """
        name = canonical_group_name(name)
        users = [u for u in self._names(members) if u != self.user]
        gid = secrets.token_bytes(GROUP_ID_SIZE)

        async def build(state):
            if state.seq:
                return None
            return {"name": name, "topic": topic, "members": await self._listed_keys(users)}
        return await self._change_group(gid, "create", build)

    async def group_add(self, group, users):
        """Add C{users} (their keys as pinned here) to C{group}; those who are members already are left out."""
        gid, users = await self._resolve_group(group), self._names(users)

        async def build(state):
            todo = [u for u in users if u not in state.members]
            return {"members": await self._listed_keys(todo)} if todo else None
        return await self._change_group(gid, "add", build)

    async def group_remove(self, group, users):
        """Remove C{users} from C{group} (an admin's op); those who are no longer members are left out."""
        gid, users = await self._resolve_group(group), self._names(users)

        async def build(state):
            todo = [u for u in users if u in state.members]
            return {"users": todo} if todo else None
        return await self._change_group(gid, "remove", build)

    async def group_leave(self, group):
        """Leave C{group} (refused while this user is its last admin and others remain)."""
        gid = await self._resolve_group(group)

        async def build(state):
            return {} if self.user in state.members else None
        return await self._change_group(gid, "leave", build)

    async def group_rename(self, group, name):
        """Rename C{group} to C{name} (an admin's op)."""
        gid, name = await self._resolve_group(group), canonical_group_name(name)

        async def build(state):
            return {"name": name} if state.name != name else None
        return await self._change_group(gid, "rename", build)

    async def group_topic(self, group, text):
        """Set C{group}'s topic to C{text} (at most L{MAX_GROUP_TOPIC_BYTES} bytes of UTF-8; empty clears it)."""
        gid = await self._resolve_group(group)

        async def build(state):
            return {"topic": text} if (state.topic or "") != text else None
        return await self._change_group(gid, "topic", build)

    async def group_admin(self, group, user, admin=True):
        """Make C{user} an admin of C{group} (C{admin=False}: no longer one)."""
        gid, user = await self._resolve_group(group), canonical_username(user)

        async def build(state):
            return {"user": user} if (user in state.admins) != admin else None
        return await self._change_group(gid, "promote" if admin else "demote", build)

    async def membership_end(self, group):
        """
        How this user's membership of C{group} ended, from the verified chain: C{("left", None)}, C{("removed",
        ACTOR)}, or None while this user is a member (or when no op here ended it: a group never joined).
        """
        gid = await self._resolve_group(group, sync=False)
        chain = await self._chain(gid)
        if chain is None or self.user in chain.state.members:
            return None
        for _, raw, _, _ in reversed(chain.ops):
            op = parse_group_op(raw)
            if op.kind == "leave" and op.actor == self.user:
                return ("left", None)
            if op.kind == "remove" and self.user in op.users:
                return ("removed", op.actor)
        return None

    # -- group messages --

    def _check_sendable(self, chain, gid):
        if chain is not None and chain.seq == 0 and chain.broken and chain.unverified_name:
            raise GroupRefused("Not sent: #%s's membership chain does not verify: %s."
                               % (chain.unverified_name, chain.broken))
        if chain is None or chain.seq == 0:
            raise UnknownGroup("Not sent: this client knows no group %s." % gid.hex())
        name = chain.state.name
        if chain.broken:
            raise GroupRefused("Not sent: #%s's membership chain does not verify: %s." % (name, chain.broken))
        if self.user not in chain.state.members:
            raise Forbidden("Not sent: you are not a member of #%s." % name)

    async def _group_targets(self, gid, state, members, now):
        """
        The targets of L{_targets} for C{members} of the group whose verified state is C{state}; a member whose
        account is gone is left out, with a warning.
        """
        name = state.name
        try:
            return await self._targets(members, now, state), members
        except UnknownUser:
            pass
        kept = []
        for user in members:
            try:
                await self.protocol.request("bundle", users=[user])
            except UnknownUser:
                self._group_warn(gid, name, "%s's account is gone from the server (deleted by its operator?): "
                                            "#%s's messages are not sealed to %s." % (user, name, user))
                continue
            kept.append(user)
        return await self._targets(kept, now, state), kept

    async def seal_group(self, group, data, content_type="text", filename="", message_id=None):
        """
        C{(members, envelope)}: C{data} sealed as a group message of C{group} for its verified head: one envelope
        whose header carries the group id and the head, wrapped for every current device of each member of the
        verified chain but this user (and for this user's other devices), verified as L{seal} says.  Refused when
        this client does not know the group, its chain is broken, or this user is not a member; a member whose
        account is gone is left out (and warned of).  L{TooLarge} when the header would not fit one line of the
        server's.  C{message_id}: seal anew a message sealed before.  L{send_group_envelope} sends it.
        """
        if self.user is None:
            raise NotAuthenticated()
        gid = await self._resolve_group(group)
        chain = await self._chain(gid)
        self._check_sendable(chain, gid)
        state = chain.state
        if isinstance(data, str):
            data = data.encode("utf-8")
        now = self._now()
        targets, members = await self._group_targets(gid, state, sorted(set(state.members) - {self.user}), now)
        if not targets:
            raise BadRequest("Not sent: nobody else is in #%s, and you have no other device." % state.name)
        envelope = await self.in_thread(
            seal, self.private_key, self.user, targets, data, content_type=content_type, filename=filename,
            message_id=message_id, timestamp_ms=int(now * 1000), sender_fingerprint=self.identity_fp,
            sender_device=device_id(self.private_key), now=now, group=(gid, state.head))
        max_line = self.limits.get("max_line")
        header_line = (len(envelope.header) + 2) // 3 * 4 + FRAME_MARGIN
        if type(max_line) is int and header_line >= max_line:
            raise TooLarge("Not sent: #%s's message header holds %d wrapped key%s (%d KiB encoded), more than one "
                           "line of the server's takes (max_line %d KiB)." % (
                               state.name, len(targets), "" if len(targets) == 1 else "s", header_line // 1024,
                               max_line // 1024))
        message_id = parse_header(envelope.header).message_id
        self._sealed[message_id] = (("#", gid), data, content_type, filename)
        while len(self._sealed) > MAX_RESEALABLE:
            self._sealed.popitem(last=False)
        return members, envelope

    async def send_group_envelope(self, group, envelope):
        """
        Send a group envelope (L{seal_group}) to C{group}.  When the server says the group changed (C{group_changed})
        its ops are fetched and verified and the message sealed anew for the new head; when the members' devices
        changed, sealed anew for them; each as the same message, up to L{RESEAL_TRIES} times.  The members it was
        sealed for are kept (L{group_delivery}).  Returns the server's answer (C{msg}, C{duplicate}, C{queued}).
        """
        gid = await self._resolve_group(group)
        message_id = parse_header(envelope.header).message_id
        for attempt in range(RESEAL_TRIES + 1):
            try:
                answer = await self._send_envelope(None, envelope, group=gid)
            except (GroupChanged, DevicesChanged) as e:
                again = self._sealed.get(message_id)
                chain = await self._chain(gid)
                if again is None or attempt == RESEAL_TRIES:
                    if isinstance(e, DevicesChanged) and chain is not None and chain.server_extra:
                        raise Forbidden(
                            "Not sent: the server lists %s as member%s of #%s, but no signed operation made %s "
                            "one, so nothing is sealed to %s and the server refuses the message." % (
                                ", ".join(chain.server_extra), "s" if len(chain.server_extra) > 1 else "",
                                chain.state.name, "them" if len(chain.server_extra) > 1 else "that user",
                                "them" if len(chain.server_extra) > 1 else "that user"))
                    raise
                if isinstance(e, GroupChanged):
                    await self.refresh_group(gid)
                else:
                    await self._refresh_group_members(gid)
                _, envelope = await self.seal_group(gid, *again[1:], message_id=message_id)
            else:
                self._sealed.pop(message_id, None)
                header = parse_header(envelope.header)
                members = sorted({e.name for e in header.entries} - {self.user})
                await self.pins.add_group_sent(answer["msg"], gid, members)
                return answer

    async def _refresh_group_members(self, gid):
        """After C{devices_changed}: see whether the server's member list differs from the chain's (a warning)."""
        try:
            await self.refresh_group(gid)
        except UnknownGroup:
            pass

    async def post_group(self, group, data, content_type="text", filename=""):
        """L{seal_group} then L{send_group_envelope}: returns the server's answer."""
        _, envelope = await self.seal_group(group, data, content_type, filename)
        return await self.send_group_envelope(group, envelope)

    async def send_group(self, group, data, content_type="text", filename=""):
        """Send C{data} to C{group} (see L{seal_group}); returns the message id (hex) once the server has it."""
        return (await self.post_group(group, data, content_type, filename))["msg"]

    async def group_delivery(self, msg_id):
        """
        C{(group, members, receipts)} of a group message this user sent: its L{GroupInfo} (None if no longer
        known), the members it was sealed for, and C{{user: (status, at, reason)}} of the receipts so far.  None when
        C{msg_id} (hex) is not a group message sent from here.
        """
        sent = await self.pins.group_sent(msg_id)
        if sent is None:
            return None
        gid, members = sent
        chain = await self._chain(gid)
        return (self._group_info(chain) if chain is not None else None, members,
                await self.pins.group_receipts(msg_id))

    async def _group_message(self, header):
        """
        C{(chain, note)} for a group message's header: the group must be known (fetched once when the head it names
        is not), this user and the sender members at the version it names; a head unknown even then is warned of,
        and the message is taken only if both are current members.  Raises L{NotInGroup} otherwise, or
        L{GroupHeld} while the group's chain is broken here and does not hold the head named.
        """
        gid = header.group_id
        chain = await self._chain(gid)
        if chain is None or chain.at_head(header.group_head) is None:
            try:
                await self.refresh_group(gid)
            except UnknownGroup:
                pass
            chain = await self._chain(gid)
        if chain is not None and chain.broken is not None and chain.at_head(header.group_head) is None:
            raise GroupHeld("A message from %s to %s is kept on the server until the group's changes verify here."
                            % (header.sender, "#" + chain.state.name if chain.seq else "a group you were added to"))
        if chain is None or chain.seq == 0:
            raise NotInGroup("The message from %s is for a group you are not in (%s)." % (header.sender, gid.hex()))
        current, name = chain.state, "#" + chain.state.name
        at = chain.at_head(header.group_head)
        if at is None:
            self._group_warn(gid, chain.state.name, (
                "%s sent a message to %s for a membership version this client cannot verify (yours is version %d)."
                % (header.sender, name, current.seq)))
            if header.sender not in current.members or self.user not in current.members:
                raise NotInGroup("%s is not a member of %s, and the message names a version of %s this client "
                                 "cannot verify." % (header.sender, name, name))
            await self._check_group_sender_key(header, current, name)
            return chain, "sealed for a version of %s this client does not know; yours is %d" % (name, current.seq)
        if self.user not in at.members:
            raise NotInGroup("The message from %s names version %d of %s, in which you are not a member."
                             % (header.sender, at.seq, name))
        if header.sender not in at.members:
            raise NotInGroup("%s was not a member of %s in the version the message names." % (header.sender, name))
        await self._check_group_sender_key(header, at, name)
        note = None
        if header.sender not in current.members:
            # Accepted by the server before the change that ended the sender's membership, as the server says: the
            # one case a member's message is shown though the sender is no longer one.
            note = "sealed for version %d of %s, before %s left or was removed (version %d is yours)" % (
                at.seq, name, header.sender, current.seq)
        return chain, note

    async def _check_group_sender_key(self, header, at, name):
        """
        A group message's sender must have signed with the key the chain names for them (the one the admin who
        added them signed), or with the key pinned here if this client's user verified it out of band: else the
        message is held (L{GroupHeld}).  The key is then checked against the pin, as for every message.
        """
        if header.sender == self.user:
            return
        pin = await self.pins.get_pin(header.sender)
        named = at.members[header.sender]
        if header.sender_fingerprint != named and not (pin is not None and pin[3]
                                                       and bytes(pin[1]) == header.sender_fingerprint):
            raise GroupHeld(
                "A message from %s to %s is signed with a key (%s) that is not the one %s's signed membership names "
                "for %s (%s); it is kept on the server until you compare %s's key with them (%s, then %s)." % (
                    header.sender, name, format_fingerprint(header.sender_fingerprint), name, header.sender,
                    format_fingerprint(named), header.sender, self.command_hint("trust", header.sender),
                    self.command_hint("verify", header.sender)))

    # -- receiving --

    def frame_received(self, frame):
        kind = frame["type"]
        try:
            if kind == "message":
                self._message_started(frame)
            elif kind == "message_chunk":
                self._message_continued(frame)
            elif kind == "receipt":
                self._enqueue(self._handle_receipt, frame)
            elif kind == "prekeys_low":
                self._prekeys_low(frame)
            elif kind in ("linked", "link_expired"):
                self._link_answered(frame)
            elif kind == "devices_changed":
                self._own_devices_changed(frame)
            elif kind == "group_changed":
                self._group_changed(frame)
        except PagerError as e:
            self.log.warn("Ignoring a malformed {kind} frame from the server: {why}", kind=kind, why=e.message)

    def _message_started(self, frame):
        seq = frame.get("seq")
        incoming = _Incoming(
            msg=field_str(frame, "msg", MESSAGE_ID_SIZE * 2), sender=field_str(frame, "from", 64),
            accepted_at=frame.get("accepted_at") if isinstance(frame.get("accepted_at"), (int, float)) else None,
            header=field_b64(frame, "header", 1024 * 1024), chunks=[],
            seq=seq if type(seq) is int and 1 <= seq < 2 ** 63 else None,
        )
        self._settled.pushed(incoming.seq, incoming.msg)
        self._add_chunks(incoming, frame)

    def _message_continued(self, frame):
        incoming = self._incoming.get(frame.get("msg"))
        if incoming is None:
            raise BadRequest("a chunk for a message that was not started")
        self._add_chunks(incoming, frame)

    def _add_chunks(self, incoming, frame):
        chunks = field_b64_list(frame, "chunks", 1 << 20, MAX_CHUNK_SIZE + GCM_TAG_SIZE)
        incoming.chunks.extend(chunks)
        incoming.size += sum(len(c) - GCM_TAG_SIZE for c in chunks)
        limit = self.limits.get("max_message")
        if not isinstance(limit, int) or isinstance(limit, bool):
            limit = Limits.max_message
        if incoming.size > limit:
            self._incoming.pop(incoming.msg, None)
            self.protocol._refuse("the server sent a message larger than its own limit of %d bytes" % limit)
            return
        signature = field_b64(frame, "signature", RSA_MAX_BITS // 8, required=False)
        if signature is None:
            self._incoming[incoming.msg] = incoming
        else:
            self._incoming.pop(incoming.msg, None)
            incoming.signature = signature
            self._enqueue(self._handle_message, incoming)

    def _enqueue(self, handler, item):
        """Handle pushed items one at a time, in the order the server sent them."""
        self._queue.append((handler, item))
        if not self._working:
            self._working = True
            Deferred.fromCoroutine(self._work()).addErrback(
                lambda f: self.log.failure("Handling an incoming frame failed", f))

    async def _work(self):
        try:
            while self._queue:
                handler, item = self._queue.popleft()
                try:
                    await handler(item)
                except (ConnectionLost, defer.CancelledError):
                    pass  # the server will deliver it again
                except Exception as e:
                    self.failures.append(e)
                    if self.on_failure is not None:  # whoever handed it off shows why
                        self.on_failure(e, item.sender if handler == self._handle_message else None)
                    elif isinstance(e, LocalError):
                        pass  # whoever handed it off says why: this machine cannot take it now
                    elif isinstance(e, PagerError):
                        self.log.warn("Could not handle an incoming message: {why}", why=e.message)
                    else:
                        self.log.failure("Handing off an incoming message failed; it stays on the server")
                finally:
                    if handler == self._handle_message:
                        self.processed += 1
                        self._changed()
        finally:
            self._working = False
            self._changed()

    async def _sender_key(self, header):
        """
        C{(key, status)}: the sender's key from the server, checked against the fingerprint the envelope names,
        and how it compares with the pinned key (verified, new, or changed).
        """
        key, fp = await self.public_key(header.sender)
        if fp != header.sender_fingerprint:
            key, fp = await self.public_key(header.sender, refresh=True)
        pin = await self.pins.get_pin(header.sender)
        if fp != header.sender_fingerprint:
            if pin is not None and bytes(pin[1]) == header.sender_fingerprint:
                # Signed with the key pinned here, which the sender has replaced since: the message was sent
                # before the re-key and is still theirs.
                return load_public_key(pin[0]), key_status(pin, header.sender_fingerprint)
            raise WrongSenderKey("The message is signed with a key the server does not list for %s." % header.sender)
        if pin is None:
            await self.pins.set_pin(header.sender, public_key_pem(key), fp, self.reactor.seconds())
        return key, key_status(pin, fp)

    async def _sender_device_key(self, header):
        """
        C{(key, status)}: the key of the device that signed the message, and how the sender's identity key compares
        with the pinned one.  The identity is checked as L{_sender_key} does (for this user's own other devices:
        against this account's identity key); a device other than the identity device must be certified by it,
        known here or listed by the server (L{devices}), and not revoked.
        """
        if header.sender == self.user:
            identity, status = await self._own_identity(), "verified"
            if header.sender_fingerprint != self.identity_fp:
                raise WrongSenderKey("The message is signed as from your own account, but not by its identity key.")
        else:
            identity, status = await self._sender_key(header)
        if header.version == 1 or header.sender_device == device_id(identity):
            return identity, status
        info = await self._device_of(header.sender, identity, header.sender_device)
        return info.public_key(), status

    async def _opening_prekeys(self, entry):
        """The private prekeys this device's entry of a message was sealed to (an L{OpeningPrekeys}), or None."""
        if entry.kind != WRAP_X25519:
            return None
        device = device_id(self.private_key)
        signed, one_time = await self.seen.prekey_privates(device, entry.spk_id, entry.opk_id)
        return OpeningPrekeys(await self._vault_key(), device, signed, one_time if entry.opk_id else None)

    async def _handle_message(self, incoming):
        if not valid_username(incoming.sender):
            # Nothing to verify it against and nobody to show: refuse it, so that it is not delivered again.
            self.log.warn("Rejecting message {msg}: the server named a sender that is not a user name",
                          msg=incoming.msg)
            await self.protocol.request("reject", msg=incoming.msg, reason="The server named a sender that is not "
                                        "a user name.")
            return
        device = device_id(self.private_key)
        try:
            header = parse_header(incoming.header)
            if header.sender != incoming.sender:
                raise WrongSenderKey("The server says the message is from %s, but it is signed as from %s."
                                     % (incoming.sender, header.sender))
            mine = header.entry(self.user, device)
            if mine is None:
                raise NotAddressedToYou("The message was sealed for %s's devices as they were when it was sent, and "
                                        "this one was not among them (a key change or a device linked since)."
                                        % self.user)
            # Before unwrapping: a message handed off already may have used a one-time prekey that is gone since.
            if await self.seen.contains(header.sender, header.message_id):
                self._ack("msgs", incoming.msg)
                return
            # Signed before the duplicate store's window: it may be one handed off already and forgotten since
            # (its signed prekey may still be kept), so it is refused, never shown.
            window = self.seen.window
            if window is not None and header.timestamp_ms / 1000 < self._now() - window + PREKEY_SKEW:
                raise StaleMessage(
                    "The message from %s was signed %s, longer ago than this device remembers the messages it was "
                    "handed (%.0f days): it may be a replay, so it is refused." % (
                        header.sender, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(header.timestamp_ms / 1000)),
                        window / DAY))
            group = await self._group_message(header) if header.group_id is not None else None
            sender_key, key_status = await self._sender_device_key(header)
            prekeys = await self._opening_prekeys(mine)
            envelope = Envelope(incoming.header, incoming.chunks, incoming.signature)
            opened = await self.in_thread(open_envelope, envelope, self.private_key, self.user, sender_key,
                                          device=device, prekeys=prekeys)
        except PrekeyUnavailable as e:
            if await self.seen.contains(header.sender, header.message_id, anywhere=True):
                # Another session of this device (sharing its store) handed it off and deleted the prekey since.
                self._ack("msgs", incoming.msg)
                return
            await self._reject(incoming, e)
            return
        except (EnvelopeError, UnknownUser, BadKey, BadCertificate) as e:
            await self._reject(incoming, e)
            return
        except GroupHeld as e:
            if incoming.accepted_at is not None and self._now() - incoming.accepted_at > MAX_HOLD:
                # Held long enough: it counts against this user's pending quota for as long as it waits, so it is
                # refused now, and its sender told why.
                await self._reject(incoming, GroupHeld("Not verified within %d days, so refused: %s"
                                                       % (MAX_HOLD // DAY, e.message)))
                return
            self._held[incoming.msg] = incoming
            while len(self._held) > MAX_HELD:
                self._held.popitem(last=False)  # still on the server: it comes again at the next login
            chain = self._chains.get(header.group_id)
            self._group_warn(header.group_id, chain.state.name if chain is not None else "", e.message)
            return
        skewed = incoming.accepted_at is not None and abs(incoming.accepted_at - opened.timestamp) > self.skew_window
        opened = dataclasses.replace(opened, accepted_at=incoming.accepted_at, key_status=key_status, skewed=skewed)
        if group is not None:
            chain, note = group
            opened = dataclasses.replace(opened, group_name=chain.state.name, group_note=note)
        if self.on_message is None:
            return  # nobody to hand it to: leave it on the server for the next session
        # The history entry the hand-off records waits, to be written with the seen row: one transaction.
        self.seen.hold_history(opened.message_id.hex())
        try:
            await defer.maybeDeferred(self.on_message, opened)
        except BaseException:
            self.seen.release_history()
            raise
        # The message is stored (handed off): its history entry, its seen row and the deletion of its one-time
        # prekey's private part are one transaction, so a crash leaves either all of them or none.
        used = (device, mine.opk_id) if mine.kind == WRAP_X25519 and mine.opk_id else None
        await self.seen.add(opened.sender, opened.message_id, self._now(), used)
        # Not awaited: acknowledgements are pipelined, so the next message is handled while this one commits.
        self._ack("msgs", incoming.msg)

    async def _reject(self, incoming, error):
        try:
            await self.protocol.request("reject", msg=incoming.msg, reason=error.message)
        except UnknownMessage:
            pass  # settled already (by another session of this device), or never held by the server: still told
        self._settled.settle(incoming.msg)
        if self.on_rejected is not None:
            self.on_rejected(incoming.msg, incoming.sender, error)

    def _ack(self, field, value):
        """
        Acknowledge one pushed item without waiting for the answer.  While an acknowledgement is in flight, the
        next ones wait for its answer and then go out together in one ack (PROTOCOL.md 4.12): a client handling a
        burst sends a few frames, not one per item, and one handling an item now and then sends each at once.  The
        messages go as one cumulative ack (C{upto}) when they and every message pushed before them are settled,
        else as a list.  A server that does not announce max_ack_batch gets one ack per item.
        """
        if field == "msgs":
            self._settled.settle(value)
        if self._ack_batch() is None:
            single = {"msgs": "msg", "receipts": "receipt"}[field]
            self._single_acks += 1
            d = self.protocol.request("ack", **{single: value})
            d.addErrback(self._ack_failed)
            d.addBoth(self._single_ack_answered)
            return
        self._acks[field].append(value)
        if not self._ack_in_flight:
            self._send_acks()

    def _single_ack_answered(self, _):
        self._single_acks -= 1

    def _ack_batch(self):
        """How many ids one ack may list, as the server announced it; None if it takes one at a time."""
        batch = self.limits.get("max_ack_batch")
        return batch if type(batch) is int and batch >= 1 else None

    def _send_acks(self):
        batch = self._ack_batch() or 1
        fields = {}
        upto, covered = self._settled.take_prefix()
        waiting = self._acks["msgs"]
        if upto is not None and waiting and all(m in covered for m in waiting):
            fields["upto"], self._acks["msgs"] = upto, []  # those waiting, and nothing pushed before them, is open
        for field, waiting in self._acks.items():
            if waiting:
                fields[field], self._acks[field] = waiting[:batch], waiting[batch:]
        if not fields:
            self._ack_in_flight = False
            return
        self._ack_in_flight = True
        d = self.protocol.request("ack", **fields)
        d.addErrback(self._ack_failed)
        d.addBoth(lambda _: self._send_acks())

    def _ack_failed(self, failure):
        # UnknownMessage: another session of ours acknowledged it first.  ConnectionLost: the server keeps the
        # message and delivers it again, and the duplicate store keeps it from being shown twice.  Whatever else
        # ended the connection (a revoked device's, say) is the connection's error, which its user is told.
        if not failure.check(UnknownMessage, ConnectionLost) and self.protocol.lost is None:
            self.log.failure("Acknowledging a message failed", failure)

    async def _handle_receipt(self, frame):
        receipt = DeliveryReceipt(
            field_int(frame, "receipt", 1, 2 ** 63 - 1), field_str(frame, "msg", 64), field_str(frame, "from", 64),
            field_str(frame, "status", 32), field_str(frame, "reason", 1000, required=False, default=""),
            frame.get("at") if isinstance(frame.get("at"), (int, float)) else 0.0)
        if not valid_username(receipt.peer) or receipt.status not in RECEIPT_STATUSES:
            # Acknowledged, so that it is not delivered again, but never shown: its name or status is garbage.
            self.log.warn("Dropping receipt {rid}: not a user name or not a receipt status", rid=receipt.rid)
            self._ack("receipts", receipt.rid)
            return
        if await self.pins.group_sent(receipt.message_id) is not None:
            await self.pins.add_group_receipt(receipt.message_id, receipt.peer, receipt.status, receipt.at,
                                              receipt.reason)
        if self.on_receipt is not None:
            await defer.maybeDeferred(self.on_receipt, receipt)
        self._ack("receipts", receipt.rid)

    def connection_lost(self, error):
        self._stop_keepalive()
        self._stop_maintenance()
        if self._link is not None and not self._link.done.called:
            self._link.done.errback(error)
            if not self._link.waited:
                self._link.done.addErrback(lambda f: None)  # nobody waits for the answer: nothing to tell
        self._incoming.clear()
        self._held.clear()  # the server hands them again at the next login
        for waiting in self._acks.values():
            waiting.clear()  # the server delivers these again; the duplicate store recognises them
        self._changed()
        if self.on_disconnect is not None:
            self.on_disconnect(error)


#### Key files ####

# A user's private key lives in HOME/<server id>/<user>/key.p12: PKCS#12 that openssl reads, encrypted with
# PBES2 (AES-256-CBC, PBKDF2-HMAC-SHA256, 600,000 iterations), mode 0600 in a 0700 directory.  That is the
# identity key, on the account's identity device.  A machine linked to the account as another device holds its own
# device key instead, in HOME/<server id>/<user>/device.p12 (same format, same passphrase rules) and no key.p12.
# HOME/known_servers (mode 0600) says which server id each address presented, as ssh's known_hosts does for host
# keys.


class KeyFileError(PagerError):
    """The key file cannot be used."""

    code = "bad_key_file"


class WrongPassphrase(KeyFileError):
    """The passphrase is wrong, or the key file is damaged."""


class KeyFileExposed(KeyFileError):
    """The key file is readable by other users."""


class TokenFileError(KeyFileError):
    """The stored safetoken cannot be read: its file is damaged, or the passphrase does not open it."""


KEY_FILE_NAME = "key.p12"
DEVICE_FILE_NAME = "device.p12"  # a linked device's own key (see Session.start)
TOKEN_FILE_NAME = "token.enc"
PBKDF2_ROUNDS = 600000


def default_home():
    """C{$PAGER_HOME}, else the platform's per-user data directory (e.g. C{~/.local/share/pager})."""
    if os.environ.get("PAGER_HOME"):
        return os.environ["PAGER_HOME"]
    if sys.platform == "win32":
        return os.path.join(os.environ.get("APPDATA") or os.path.expanduser("~"), "pager")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Application Support/pager")
    return os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "pager")


def private_directory(*parts):
    """
    Create the directory C{os.path.join(*parts)} (and missing parents) with mode 0700, whatever the umask; one that
    exists loses any access of group and others, and keeps its owner's as they are (a directory its owner made
    read-only stays so, and one on a read-only file system that is private already is used as it is).  Returns its
    path.
    """
    path = os.path.join(*parts)
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


def user_directory(home, server_id, user):
    """HOME/<server id>/<user>, created 0700.  Both names are validated so they cannot walk out of HOME."""
    if not valid_server_id(server_id):
        raise KeyFileError("The server sent a malformed server id.")
    if not valid_username(user):
        raise BadRequest("Not a valid user name: %r." % (user,))
    private_directory(home)
    private_directory(home, server_id)
    return private_directory(home, server_id, user)


def holds_key(directory):
    """Whether a user directory holds a key: the identity key (key.p12) or a linked device's (device.p12)."""
    return any(os.path.lexists(os.path.join(directory, name)) for name in (KEY_FILE_NAME, DEVICE_FILE_NAME))


def format_device_id(device):
    """A device id (16 bytes, or their 32 hex digits) for reading: eight groups of four hex digits."""
    text = device.hex() if isinstance(device, bytes) else device.lower()
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


DEVICE_NAME_SHOWN = 40  # characters of a device name shown: its owner chose it, and it may be long
DEVICE_NAME_RULE = ("A device name is 1 to %d bytes of printable text (as UTF-8), with no space at either end."
                    % MAX_DEVICE_NAME_BYTES)


def device_name_text(name):
    """A device's name as shown: quoted and cut to L{DEVICE_NAME_SHOWN} characters; C{(no name)} for none."""
    if not name:
        return "(no name)"
    if len(name) > DEVICE_NAME_SHOWN:
        name = name[:DEVICE_NAME_SHOWN - 1] + "\u2026"
    return "'%s'" % name


def _remove_quietly(path):
    """Remove the file C{path} if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def valid_server_id(server_id):
    """Whether C{server_id} is what a server's hello may state: L{SERVER_ID_LENGTH} lower-case hex digits."""
    return isinstance(server_id, str) and SERVER_ID_RE.fullmatch(server_id) is not None


# HOME/<server id>/<user>/token.enc keeps the safetoken under the key's passphrase, so that logging in asks for one
# secret.  Layout: TOKEN_FILE_MAGIC, a 16-byte salt, a 12-byte nonce, then AES-256-GCM of the UTF-8 token under
# PBKDF2-HMAC-SHA256(passphrase, salt, PBKDF2_ROUNDS) with the magic, salt, server id and user name as associated
# data (a token file copied into another user's directory does not open there).
TOKEN_FILE_MAGIC = b"pager-token-v1\n"
TOKEN_SALT_SIZE = 16
TOKEN_NONCE_SIZE = 12


def _token_file_key(passphrase, salt):
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=PBKDF2_ROUNDS)
    return kdf.derive(passphrase.encode("utf-8"))


def _token_file_aad(salt, server_id, user):
    return TOKEN_FILE_MAGIC + salt + _lp(server_id.encode("ascii")) + _lp(user.encode("ascii"))


def encrypt_token(token, passphrase, server_id, user):
    """The bytes of a token file holding C{token}.  Slow (PBKDF2_ROUNDS rounds): call it off the reactor thread."""
    salt, nonce = secrets.token_bytes(TOKEN_SALT_SIZE), secrets.token_bytes(TOKEN_NONCE_SIZE)
    sealed = AESGCM(_token_file_key(passphrase, salt)).encrypt(
        nonce, token.encode("utf-8"), _token_file_aad(salt, server_id, user))
    return TOKEN_FILE_MAGIC + salt + nonce + sealed


def decrypt_token(data, passphrase, server_id, user, path="the token file"):
    """The safetoken in a token file's C{data}; L{TokenFileError} if it is damaged or the passphrase is wrong."""
    head = len(TOKEN_FILE_MAGIC) + TOKEN_SALT_SIZE + TOKEN_NONCE_SIZE
    if not data.startswith(TOKEN_FILE_MAGIC) or len(data) < head + 16 + MIN_TOKEN_LENGTH:
        raise TokenFileError("%s is damaged (not a pager token file); remove it and give the safetoken once more."
                             % path)
    salt = data[len(TOKEN_FILE_MAGIC):len(TOKEN_FILE_MAGIC) + TOKEN_SALT_SIZE]
    nonce, sealed = data[head - TOKEN_NONCE_SIZE:head], data[head:]
    try:
        token = AESGCM(_token_file_key(passphrase, salt)).decrypt(nonce, sealed,
                                                                 _token_file_aad(salt, server_id, user))
        return token.decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        raise TokenFileError("%s does not open with the key's passphrase (it is damaged, or was saved under "
                             "another passphrase); remove it and give the safetoken once more." % path)


def save_token(path, token, passphrase, server_id, user):
    """Save C{token} encrypted to C{path}, mode 0600.  Slow: call it off the reactor thread."""
    write_private_file(path, encrypt_token(token, passphrase, server_id, user))


def load_token(path, passphrase, server_id, user):
    """The safetoken saved in C{path}, or None if there is none.  Slow: call it off the reactor thread."""
    try:
        check_private_file_permissions(path, "token file")
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TokenFileError("Cannot read %s: %s." % (path, e.strerror))
    return decrypt_token(data, passphrase, server_id, user, path)


def encode_private_key(key, passphrase, name=b"pager"):
    """PKCS#12 bytes holding C{key}; encrypted with C{passphrase} (PBES2/AES-256/600,000 rounds) unless it is empty."""
    from cryptography.hazmat.primitives.serialization import pkcs12
    if passphrase:
        encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                      .kdf_rounds(PBKDF2_ROUNDS)
                      .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
                      .hmac_hash(hashes.SHA256())
                      .build(passphrase.encode("utf-8")))
    else:
        encryption = serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(name, key, None, None, encryption)


def write_private_file(path, data):
    """Write C{data} to C{path} atomically, mode 0600 whatever the umask."""
    temporary = "%s.%s.tmp" % (path, secrets.token_hex(6))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def save_private_key(path, key, passphrase):
    """Save C{key} to C{path} as PKCS#12.  Slow (600,000 PBKDF2 rounds): call it off the reactor thread."""
    write_private_file(path, encode_private_key(key, passphrase))


def check_private_file_permissions(path, what="key file"):
    """Refuse a secret's file that group or others may read or write, as ssh does with its keys."""
    mode = os.stat(path).st_mode
    if os.name == "posix" and mode & 0o077:
        raise KeyFileExposed("The %s %s is readable by other users (mode %03o): make it private with 'chmod 600 %s'."
                             % (what, path, mode & 0o777, shlex.quote(path)))


def check_key_file_permissions(path):
    """Refuse a key file that group or others may read, as ssh does, and a key "file" that is not a file."""
    if not os.path.lexists(path):
        raise KeyFileError("The key file %s is missing." % path)
    if not os.path.isfile(path):  # before its mode: a directory's 0755 is not what is wrong with it
        raise KeyFileError("The key file %s is damaged: it is not a file. Move it away and bring the key back with "
                           "'pager-cli import-key'." % path)
    try:
        check_private_file_permissions(path)
    except FileNotFoundError:
        raise KeyFileError("The key file %s is missing." % path)


_PKCS12_SHROUDED_KEY_BAG = bytes.fromhex("060b2a864886f70d010c0a0102")  # OID 1.2.840.113549.1.12.10.1.2
_PKCS12_KEY_BAG = bytes.fromhex("060b2a864886f70d010c0a0101")  # OID 1.2.840.113549.1.12.10.1.1


def _der_whole(data):
    """Whether C{data} is exactly one DER SEQUENCE: its stated length is what the file holds (not truncated)."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    if data[1] < 0x80:
        return 2 + data[1] == len(data)
    n = data[1] & 0x7F
    if not 1 <= n <= 4 or len(data) < 2 + n:
        return False
    return 2 + n + int.from_bytes(data[2:2 + n], "big") == len(data)


def key_file_is_encrypted(path):
    """
    Whether the key file at C{path} needs a passphrase, read from its structure: L{KeyFileError} ("damaged") for a
    file that is truncated, is not a key file, or holds no key, rather than a passphrase prompt it can never pass.
    """
    check_key_file_permissions(path)
    with open(path, "rb") as f:
        data = f.read()
    damaged = ("The key file %s is damaged (%%s): restore it from a backup, or move it away and bring the key back "
               "with 'pager-cli import-key'." % path)
    if b"-----BEGIN" in data:
        if b"-----END" not in data:
            raise KeyFileError(damaged % "truncated")
        return b"ENCRYPTED" in data
    if not data:
        raise KeyFileError(damaged % "empty")
    if not _der_whole(data):
        raise KeyFileError(damaged % "truncated, or not PKCS#12")
    if _PKCS12_SHROUDED_KEY_BAG in data:
        return True
    if _PKCS12_KEY_BAG in data:
        return False
    try:
        load_private_key(path, "")
    except WrongPassphrase:
        return True
    return False


def load_private_key(path, passphrase):
    """
    Load the private key saved by L{save_private_key}.  Raises L{KeyFileExposed}, L{WrongPassphrase} or
    L{KeyFileError}.  Slow: call it off the reactor thread.
    """
    check_key_file_permissions(path)
    with open(path, "rb") as f:
        data = f.read()
    return decode_private_key(data, passphrase, path)


def decode_private_key(data, passphrase, path="the key file"):
    """
    A private key from PKCS#12 (pager's format) or PEM (PKCS#8 or PKCS#1, encrypted or not; the original pager wrote
    unencrypted C{{username}_private_key.pem} files).  It must be an RSA key pager accepts.
    """
    from cryptography.hazmat.primitives.serialization import pkcs12
    secret = passphrase.encode("utf-8") if passphrase else None
    if b"-----BEGIN" not in data and not data.startswith(b"\x30"):  # neither PEM nor DER (PKCS#12)
        raise KeyFileError("%s is not a key file (PKCS#12 or PEM)." % path)
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, secret)
        except TypeError:
            key = None
            if secret is None:
                raise WrongPassphrase("%s is encrypted: a passphrase is needed." % path)
            raise WrongPassphrase("%s is not encrypted; leave the passphrase empty." % path)
        except ValueError:
            raise WrongPassphrase("The passphrase for %s is wrong, or the file is damaged." % path)
    else:
        try:
            key, _, _ = pkcs12.load_key_and_certificates(data, secret)
        except ValueError:
            if secret is not None:
                raise WrongPassphrase("The passphrase for %s is wrong, or the file is damaged." % path)
            # An unencrypted PKCS#12 file may still be read with an empty password.
            try:
                key, _, _ = pkcs12.load_key_and_certificates(data, b"")
            except ValueError:
                raise WrongPassphrase("%s needs a passphrase (or is damaged)." % path)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError("%s does not hold an RSA private key." % path)
    try:
        check_public_key(key.public_key())
    except BadKey as e:
        raise KeyFileError("%s: %s" % (path, e.message))
    return key


#### Sessions ####

class ServerChanged(PagerError):
    """The server at an address this machine knows presents another server id."""

    code = "server_changed"

    def __init__(self, address, known, presented, command, message=None):
        if message is None:
            message = ("%s now presents the server id %s, but this machine knows it as %s, so pager refuses to use it "
                       "(it is another server, or someone in between): a server restored from backup keeps its id, "
                       "so if its operator confirms it was rebuilt with the id %s, accept it with '%s --id %s'."
                       % (address, presented, known, presented, command, presented))
        super().__init__(message)
        self.address, self.known, self.presented = address, known, presented


class NoKey(PagerError):
    """This machine has no key for the user."""

    code = "no_key"


class NotIdentityDevice(NoKey):
    """This machine is a linked device of the account: what was asked needs the identity key, which is elsewhere."""

    code = "not_identity_device"


class NetworkError(PagerError):
    """The server cannot be reached."""

    code = "network"


class IncompatibleServer(NetworkError):
    """The address answers, but not as a pager server this client can talk to: trying again will not help."""


LOCAL_DB_NAME = "client.sqlite3"
KNOWN_SERVERS_NAME = "known_servers"


def host_port(host, port):
    """C{HOST:PORT} as a user reads and types it, an IPv6 address in brackets (C{[::1]:5050})."""
    return "%s:%d" % (host, port) if ":" not in host else "[%s]:%d" % (host, port)


def server_address(host, port, tls):
    """
    The name known_servers files an address under: the host as the user gave it (lower case), the port, and
    whether the connection uses TLS (C{tcp:localhost:5050}, C{tls:[::1]:5051}).
    """
    return "%s:%s" % ("tls" if tls else "tcp", host_port(host.lower(), port))


class KnownServers:
    """
    HOME/known_servers: which server id each address presented, one C{ADDRESS SERVER_ID} line per address
    (L{server_address} names it).  A known address that presents another id is refused (L{ServerChanged}) until
    the user accepts the move with C{trust-server}.  C{forget-server} turns the line into
    C{ADDRESS SERVER_ID forgotten}: the address is unknown again, but the keys kept under that id still count, so
    no new key is made for their users at that address without C{trust-server} (L{Session.may_make_key}).
    The file is small and rewritten whole (atomically, mode 0600); lines starting with # are comments.
    """

    FORGOTTEN = "forgotten"

    def __init__(self, home):
        self.path = os.path.join(home, KNOWN_SERVERS_NAME)

    def _read(self):
        """The entries, as C{[address, server id, forgotten]} lists in file order."""
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            # A file on this machine (or a PAGER_HOME that is no directory), not a key: exit 7.
            raise LocalError("Cannot read %s: %s." % (self.path, getattr(e, "strerror", None) or e))
        entries = []
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if (len(words) not in (2, 3) or not valid_server_id(words[1])
                    or (len(words) == 3 and words[2] != self.FORGOTTEN)):
                raise LocalError("Line %d of %s is not 'ADDRESS SERVER_ID' (or 'ADDRESS SERVER_ID forgotten'): "
                                   "fix or remove that line." % (number, self.path))
            entries.append([words[0], words[1], len(words) == 3])
        return entries

    def _write(self, entries):
        lines = ["# pager: the server id each address presented (see 'pager-cli trust-server --help')"]
        lines += ["%s %s%s" % (address, server_id, " " + self.FORGOTTEN if forgotten else "")
                  for address, server_id, forgotten in entries]
        try:
            private_directory(os.path.dirname(self.path))
            write_private_file(self.path, ("\n".join(lines) + "\n").encode("utf-8"))
        except OSError as e:
            raise LocalError("Cannot write %s: %s." % (self.path, e.strerror))

    def known(self, address):
        """The server id C{address} is known by, or None."""
        for entry_address, server_id, forgotten in self._read():
            if entry_address == address and not forgotten:
                return server_id
        return None

    def forgotten(self, address):
        """The ids C{address} was known by before a C{forget-server}."""
        return [server_id for a, server_id, forgotten in self._read() if a == address and forgotten]

    def check(self, address, server_id, command="pager-cli trust-server"):
        """Raise L{ServerChanged} if C{address} is known by another id than C{server_id}."""
        known = self.known(address)
        if known is not None and known != server_id:
            raise ServerChanged(address.split(":", 1)[1], known, server_id, command)

    def remember(self, address, server_id):
        """Record that C{address} presented C{server_id}, if it is not known yet (L{check} it first)."""
        entries = self._read()
        if not any(a == address and not forgotten for a, _, forgotten in entries):
            self._write([e for e in entries if e[:2] != [address, server_id]] + [[address, server_id, False]])

    def forget(self, address):
        """Forget which id C{address} has (keeping the line as forgotten); returns that id, or None."""
        entries, known = self._read(), None
        for entry in entries:
            if entry[0] == address and not entry[2]:
                known, entry[2] = entry[1], True
        if known is not None:
            self._write([e for i, e in enumerate(entries) if e not in entries[:i]])  # no duplicate lines
        return known

    def trust(self, address, server_id):
        """Know C{address} as C{server_id} from now on, whatever it was and forgot; returns the id it had, or None."""
        entries = self._read()
        known = self.known(address)
        self._write([e for e in entries if e[0] != address] + [[address, server_id, False]])
        return known


def parse_address(text, default_port=DEFAULT_PORT):
    """C{(host, port)} from C{HOST}, C{HOST:PORT}, C{[IPv6]} or C{[IPv6]:PORT}.  Raises L{usage.UsageError}."""
    text = (text or "").strip() or "localhost"
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if match:
        host, port = match.group(1), match.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:
        host, port = text, None  # a bare IPv6 address
    else:
        host, port = text, None
    if not host:
        raise usage.UsageError("The server address %r has no host name." % text)
    if re.search(r"\s", host):
        raise usage.UsageError("The server address %r has a space in its host name: is HOST missing, so that the "
                               "first words after the command were taken for it?" % text)
    if port is None:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError("The port in %r is not a number from 1 to 65535." % text)
    return host, int(port)


def client_endpoint(reactor, host, port, tls=False, ca=None):
    """
    A client endpoint for a pager server.  With C{tls}, the certificate is verified against C{ca} (a PEM file) or
    the system's trust store, and the host name is checked (service-identity).
    """
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if not tls:
        return endpoint
    from twisted.internet import ssl
    if ca:
        with open(ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
    else:
        trust = ssl.platformTrust()
    return endpoints.wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), endpoint)


def _first_line_of(path, private=None):
    """The first line of the file C{path}; with C{private} (what it holds), refused if others may read it."""
    try:
        if private is not None:
            check_private_file_permissions(path, private)
        with open(path, "r", encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise LocalError("Cannot read %s: %s." % (path, e.strerror))
    except UnicodeDecodeError:
        raise LocalError("%s is not UTF-8 text: save the secret in it as UTF-8." % path)


CLOSE_HANDLING_WAIT = 5.0  # seconds closing waits for a message or receipt being handled to be written down
LINK_CANCELLED = "Cancelled: the link request was withdrawn, and no key was kept on this machine."


class Session:
    """
    One user logged in to one server from this machine: checks the server is the one this machine knows at that
    address, finds (or, when told to, creates) the user's key and local store, logs in, and logs in again after the
    connection drops.  Used by every client command.
    """

    log = Logger()

    def __init__(self, reactor, config, prompter):
        self.reactor = reactor
        self.config = config
        self.prompter = prompter
        self.host, self.port = parse_address(config["server"])
        self.home = config["home"] or default_home()
        self.user = None
        self.key = None
        self.token = None
        self.passphrase = None  # the key's, once it is unlocked: the safetoken kept on disk is saved under it
        self.store = None
        self.client = None
        self.directory = None
        self.in_chat = False  # set by the Chat: sentences then name its /commands (L{command_hint})
        self.receive = True
        self.pending = 0  # messages waiting when we logged in
        self.wire = None  # called with each new PagerClient before it logs in, to set its handlers
        self.login_attempt = None  # called with each login attempt (a coroutine function) to make it, when set
        self._last_protocol = None
        self.closing = False
        self._backoff = None  # the wait before the next reconnection attempt
        self.server_id = None  # the id of the server whose directory this session uses
        self.known = KnownServers(self.home)
        self.linked = False  # whether this machine is a linked device of the account (device.p12, no key.p12)
        self.needs_identity = None  # what the command does, when it needs the identity key (not a linked device's)

    def _made(self, protocol):
        self._last_protocol = protocol

    @property
    def address(self):
        return host_port(self.host, self.port)

    @property
    def known_address(self):
        """The address as known_servers files it: host, port, and TLS or not."""
        return server_address(self.host, self.port, self.config["tls"])

    def command_line(self, command, *args, user=True):
        """
        C{pager-cli COMMAND ADDRESS} (and C{--user} this user, unless not C{user}) on this machine, with the options
        this one was given, then C{args}: a command to print that runs as printed.
        """
        words = ["pager-cli", command, self.address] + (["--user", self.user] if user else [])
        if self.config.get("home"):
            words += ["--home", self.config["home"]]
        if self.config["tls"]:
            words.append("--tls")
            if self.config.get("ca"):
                words += ["--ca", self.config["ca"]]
        return " ".join(shlex.quote(word) for word in words + list(args))

    @property
    def trust_command(self):
        """The command that accepts a new server id at this address, with the options this one was given."""
        return self.command_line("trust-server", user=False)

    def in_thread(self, f, *args, **kwargs):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args, **kwargs)

    def check_server(self, client):
        """
        Refuse a server whose id is not the one this machine knows at this address (L{ServerChanged}); an address
        seen for the first time is remembered only once its directory is used (L{open_local}).  (The id's format
        was checked with the hello: L{PagerClientProtocol} refuses a malformed one.)
        """
        self.known.check(self.known_address, client.server_id, self.trust_command)

    async def connect(self, check=True):
        """
        A connected L{PagerClient} (not logged in), or L{NetworkError} in one sentence.  With C{check}, a server
        this machine knows by another id at this address is refused (L{check_server}).
        """
        from twisted.internet import error
        try:
            endpoint = client_endpoint(self.reactor, self.host, self.port, self.config["tls"], self.config["ca"])
        except OSError as e:
            raise LocalError("Cannot read the CA file %s: %s." % (self.config["ca"], e.strerror))
        except Exception as e:  # a CA file that is not a PEM certificate, or no usable system trust store
            if self.config["ca"]:
                raise LocalError("Cannot use the CA file %s: it holds no certificate in PEM form (a block that "
                                 "begins '-----BEGIN CERTIFICATE-----')." % self.config["ca"])
            raise LocalError("Cannot load the system's trust store for TLS (%s); give the server's CA with "
                             "--ca FILE." % e)
        self._last_protocol = None
        try:
            client = await PagerClient.connect(endpoint, self.reactor, timeout=CONNECT_TIMEOUT, made=self._made)
        except defer.TimeoutError:
            raise NetworkError("%s accepted the connection but sent no pager greeting within %d s (is it a pager "
                               "server? %s)" % (self.address, CONNECT_TIMEOUT, "does it use TLS?" if not
                                                self.config["tls"] else "does it use TLS at all?"))
        except error.DNSLookupError:
            raise NetworkError("Cannot find the server %s: no such host name." % self.host)
        except error.ConnectionRefusedError:
            raise NetworkError("Cannot reach %s: connection refused (is the server running?)." % self.address)
        except (error.ConnectError, error.TimeoutError) as e:
            raise NetworkError("Cannot reach %s: %s." % (self.address, e.__class__.__name__))
        except ConnectionLost as e:
            failure = self._last_protocol.tls_failure if self._last_protocol is not None else None
            if failure:
                if "not trusted" in failure:
                    failure = await self.in_thread(certificate_date_problem, self.host, self.port) or (
                        "The server's TLS certificate is not trusted: it is not the certificate in the CA file %s, "
                        "nor signed by it; is that the file for this server?" % self.config["ca"]
                        if self.config["ca"] else failure)
                raise NetworkError("%s: %s" % (self.address, failure))
            if e.code != "connection_lost":
                raise NetworkError("%s closed the connection: %s" % (self.address, e.message))
            if not self.config["tls"]:
                raise NetworkError("%s closed the connection before the pager greeting: it probably expects "
                                   "TLS; connect with --tls." % self.address)
            raise NetworkError("%s closed the connection before the pager greeting." % self.address)
        except BadRequest as e:
            raise IncompatibleServer("%s is not a compatible pager server: %s" % (self.address, e.message))
        if check:
            try:
                self.check_server(client)
            except BaseException:
                client.close()  # not wired yet: nobody hears of its end
                raise
        if self.store is not None:
            client.seen = client.pins = self.store
        client.skew_window = self.config.get("skew-window", PagerClient.skew_window)
        client.command_hint = self.command_hint
        if self.wire is not None:
            self.wire(client)
        return client

    def command_hint(self, command, name):
        """L{PagerClient.command_hint}: in the chat, C{/trust NAME}; else the command line that runs as printed."""
        if self.in_chat:
            return "/%s %s" % (command, name)
        if self.user is None:
            return PagerClient.command_hint(command, name)
        return "'%s'" % self.command_line(command, name)

    async def _username(self):
        user = self.config["user"]
        while True:
            if user is None:
                user = await self.prompter.ask("Username: ", "Give the user name with --user.")
            try:
                return canonical_username(user)
            except BadRequest as e:
                if not self.prompter.interactive:
                    raise usage.UsageError(e.message)
                self.prompter.say(e.message)
                user = None

    def _given_token(self):
        """
        The safetoken from --token-file (a file others may read is refused), else from PAGER_TOKEN, or None: an
        option given on the command line goes before the environment.
        """
        if self.config.get("token-file"):  # commands that never log in have no --token-file
            token = _first_line_of(self.config["token-file"], "token file")
        elif os.environ.get("PAGER_TOKEN"):
            token = os.environ["PAGER_TOKEN"]
        else:
            return None
        if len(token) < MIN_TOKEN_LENGTH:
            raise usage.UsageError("A safetoken has at least %d characters." % MIN_TOKEN_LENGTH)
        return token

    def _given_token_origin(self):
        """Where L{_given_token} takes the safetoken from, as a sentence refusing it names it."""
        if self.config.get("token-file"):
            return "the one given in --token-file %s" % self.config["token-file"]
        return "the one given in PAGER_TOKEN"

    async def _ask_token(self, prompt, hint="Give the safetoken in PAGER_TOKEN or with --token-file."):
        while True:
            token = await self.prompter.secret(prompt, hint)
            if len(token) >= MIN_TOKEN_LENGTH:
                return token
            self.prompter.say("A safetoken has at least %d characters." % MIN_TOKEN_LENGTH)

    async def new_token(self, what="Choose a safetoken", given=False):
        """
        A safetoken for a new account: C{given} (by default the one given in PAGER_TOKEN or --token-file), or typed
        twice so that a typo cannot lock the user out.
        """
        if given is False:
            given = self._given_token()
        if given is not None:
            return given
        while True:
            first = await self._ask_token("%s (at least %d characters): " % (what, MIN_TOKEN_LENGTH))
            if await self.prompter.secret("Same safetoken again: ", "") == first:
                return first
            self.prompter.say("The two safetokens differ; try again.")

    @property
    def token_path(self):
        return os.path.join(self.directory, TOKEN_FILE_NAME)

    async def save_token(self, token, passphrase):
        """Keep C{token} on this machine, encrypted under the key's passphrase, so later logins ask for one secret."""
        try:
            await self.in_thread(save_token, self.token_path, token, passphrase, self.server_id, self.user)
        except OSError as e:
            self.prompter.say("Could not keep the safetoken in %s (%s): it will be asked for again."
                              % (self.token_path, e.strerror))

    async def _login_with_token(self, client, passphrase):
        """
        Log in with the safetoken given (PAGER_TOKEN, --token-file) or kept on this machine under the key's
        passphrase, else asked for (three tries, as for the passphrase).  A token that logs in and is not the one
        kept is kept from then on.
        """
        given, stored = self._given_token(), None
        if given is None:
            try:
                stored = await self.in_thread(load_token, self.token_path, passphrase, self.server_id, self.user)
            except TokenFileError as e:
                if not self.prompter.interactive:
                    raise
                self.prompter.say(e.message)
        token, tries = given or stored, 0
        while True:
            if token is None:
                tries += 1
                token = await self._ask_token("Safetoken for %s: " % self.user, hint=(
                    "This machine keeps no safetoken for %s (it keeps one once a login with it works), and a "
                    "login needs it: give it in PAGER_TOKEN or with --token-file." % self.user))
            self.token = token
            try:
                # A safetoken given is named when refused: one left in PAGER_TOKEN for another user is the usual cause.
                await self._login(client, self._given_token_origin() if given is not None else None)
                break
            except AuthFailed:
                if tries >= 3:
                    raise AuthFailed("Three wrong safetokens for %s; giving up." % self.user)
                if given is None and token == stored and not self.prompter.interactive:
                    raise AuthFailed("Login as %s failed with the safetoken kept on this machine: either it was "
                                     "changed elsewhere (give the current one once in PAGER_TOKEN or with "
                                     "--token-file, and it is kept from then on), or the account's key was replaced "
                                     "from another machine (then link this one again: link-device --force)."
                                     % self.user)
                if given is not None or not self.prompter.interactive:
                    raise
                self.prompter.say("The safetoken kept on this machine was refused: was it changed elsewhere? Type "
                                  "the current one. (If the account's key was replaced from another machine, this "
                                  "machine's key is no longer the account's: link it again with link-device "
                                  "--force.)" if token == stored else "Wrong safetoken; try again.")
                token = None
        if token != stored:
            await self.save_token(token, passphrase)

    def _given_passphrase(self):
        """
        The passphrase from --passphrase-file, else from PAGER_PASSPHRASE, or None.  The file is a secret's, refused
        if others may read it, and an empty one is refused: it would make a key without a passphrase unasked.
        """
        path = self.config["passphrase-file"]
        if path:
            passphrase = _first_line_of(path, "passphrase file")
            if not passphrase:
                raise usage.UsageError("The passphrase file %s is empty: write the passphrase on its first line "
                                       "(for a key without one, choose --no-passphrase)." % path)
            return passphrase
        return os.environ.get("PAGER_PASSPHRASE") or None

    async def new_passphrase(self, what="your private key", given=None):
        """
        A passphrase for a new key file: C{given}, else none with --no-passphrase (after a warning), else the one
        given (L{_given_passphrase}), else asked twice; an empty one only after an explicit warning.
        """
        if given is not None:
            return given
        # --no-passphrase is about this new key alone, so it goes before a passphrase given for the existing one
        # (import-key and export-key read a key with one and write the new file without).
        if self.config.get("no-passphrase"):  # commands that make no key have no --no-passphrase
            self.prompter.say("Warning: --no-passphrase leaves %s unencrypted on disk: whoever can read the file can "
                              "read your messages and page as you." % what)
            return ""
        given = self._given_passphrase()
        if given is not None:
            return given
        warning = ("An empty passphrase leaves %s unencrypted on disk: whoever can read the file can read your "
                   "messages and page as you." % what)
        hint = "Give a passphrase in PAGER_PASSPHRASE or with --passphrase-file, or choose --no-passphrase."
        while True:
            first = await self.prompter.secret("New passphrase for %s: " % what, hint)
            if not first:
                self.prompter.say(warning)
                if await self.prompter.confirm("Really keep it without a passphrase?"):
                    return ""
                continue
            if await self.prompter.secret("Same passphrase again: ", hint) == first:
                return first
            self.prompter.say("The two passphrases differ; try again.")

    async def load_key(self, path):
        """The key in C{path}, asking for its passphrase (three tries) when it is encrypted."""
        return (await self.unlock_key(path))[0]

    async def unlock_key(self, path):
        """C{(key, passphrase)}: the key in C{path}, asking for its passphrase (three tries) when it is encrypted."""
        try:
            encrypted = await self.in_thread(key_file_is_encrypted, path)
        except OSError as e:
            raise LocalError("Cannot read the key file %s: %s." % (path, e.strerror))
        if not encrypted:
            try:
                return await self.in_thread(load_private_key, path, ""), ""
            except WrongPassphrase:
                raise KeyFileError("The key file %s is damaged (it is not encrypted, yet holds no readable key): "
                                   "restore it from a backup, or move it away and bring the key back with "
                                   "'pager-cli import-key'." % path)
        given = self._given_passphrase()
        if given is not None:
            return await self.in_thread(load_private_key, path, given), given
        hint = "The key is encrypted: give its passphrase in PAGER_PASSPHRASE or with --passphrase-file."
        # A linked device's key is its own, as when it was made ("this device's key"), not the user's identity key.
        whose = ("this device's key (%s's device)" if self.directory is not None and path == self.device_path
                 else "%s's key") % self.user
        for attempt in range(3):
            passphrase = await self.prompter.secret("Passphrase for %s: " % whose, hint)
            try:
                return await self.in_thread(load_private_key, path, passphrase), passphrase
            except WrongPassphrase:
                if attempt < 2:
                    self.prompter.say("Wrong passphrase; try again.")
        raise WrongPassphrase("Three wrong passphrases for %s; giving up." % whose)

    @property
    def key_path(self):
        return os.path.join(self.directory, KEY_FILE_NAME)

    @property
    def device_path(self):
        return os.path.join(self.directory, DEVICE_FILE_NAME)

    async def own_device_name(self, device):
        """
        The name (as L{device_name_text} shows it) of the user's device C{device}, which sent a message of theirs:
        as the local store keeps it, verified when the message was (L{PagerClient.devices}).
        """
        known = await self.store.get_devices(self.user) if self.store is not None else None
        info = known.find(device) if known is not None else None
        return device_name_text(info.name) if info is not None else "another device"

    def refuse_linked(self, what):
        """L{NotIdentityDevice}, in one sentence: C{what} (a verb phrase) runs on the machine with the identity key."""
        return NotIdentityDevice(
            "This machine is a linked device of %s, not the one that holds %s's identity key: %s on that machine."
            % (self.user, self.user, what))

    async def locate(self, client):
        """Ask for the user name if needed; find (not create) the user's directory for this server, by its id."""
        if self.user is None:
            self.user = await self._username()
        self.server_id = client.server_id  # 32 hex digits, as the hello was refused otherwise
        self.directory = os.path.join(self.home, self.server_id, self.user)

    async def open_local(self, client):
        """
        Create the user's directory for this server (by the server id, not the address) and open its store; the
        address is remembered by that id from now on.
        """
        await self.locate(client)
        try:
            self.directory = user_directory(self.home, client.server_id, self.user)
        except OSError as e:
            raise LocalError("Cannot create or use the directory %s: %s." % (
                e.filename or os.path.join(self.home, client.server_id, self.user), e.strerror))
        self.known.remember(self.known_address, client.server_id)
        if self.store is None:
            path = os.path.join(self.directory, LOCAL_DB_NAME)
            store = None
            try:
                store = LocalStore(path, self.reactor, history=not self.config.get("no-history", False))
                await store.open(self.reactor.seconds(), seen_keep(client.limits))
            except (sqlite3.Error, OSError) as e:
                if store is not None:
                    store.close()
                raise LocalError("The local database %s cannot be used (%s): move it away to start it afresh, "
                                 "which forgets the pinned keys and history it holds."
                                 % (path, getattr(e, "strerror", None) or e))
            self.store = store
        client.seen = client.pins = self.store

    async def start(self, receive=True):
        """Connect and log in, registering a new user (or re-keying on a new machine) when needed."""
        self.receive = receive
        client = await self.connect()
        try:
            await self.locate(client)
            self._check_key_paths()
            if not os.path.exists(self.key_path) and os.path.exists(self.key_path + ".new"):
                # A key saved by a registration that was interrupted before it could take its final name.
                os.replace(self.key_path + ".new", self.key_path)
                self.prompter.say("Using the key saved by an interrupted registration: %s." % self.key_path)
            if os.path.lexists(self.key_path):
                await self.open_local(client)
                self.key, passphrase = await self.unlock_key(self.key_path)
                await self._login_with_token(client, passphrase)
                self.passphrase = passphrase
            elif os.path.lexists(self.device_path):
                # A linked device: its own key, no safetoken (that belongs to the identity device).
                if self.needs_identity is not None:
                    raise self.refuse_linked(self.needs_identity)
                await self.open_local(client)
                self.key, passphrase = await self.unlock_key(self.device_path)
                self.linked = True
                await self._login(client)
                self.passphrase = passphrase
            elif self.needs_identity is not None:
                # No key at all: making one (or linking this machine) is not what was asked for.
                raise NoKey("To %s you need %s's identity key, which this machine does not hold: run the command on "
                            "the machine that holds it." % (self.needs_identity, self.user))
            else:
                way = await self.may_make_key(client)
                await self.open_local(client)
                if way == "link":
                    await self.link(client, await self.device_name())
                    await self._login(client)
                else:
                    await self._first_use(client, way == "rekey")
        except BaseException:
            self._abandon(client)
            raise
        self.client = client
        return client

    def _check_key_paths(self):
        """
        Refuse key paths that cannot be looked at (a directory this user may not search): they would look like no
        key at all, and this machine would be told to link or re-key an account whose key is right there.
        """
        for path in (self.key_path, self.key_path + ".new", self.device_path):
            try:
                os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as e:
                raise LocalError("Cannot look for the key in %s: %s." % (os.path.dirname(path), e.strerror))

    @staticmethod
    def _abandon(client):
        """Close a connection this session will not use, without its end being taken for a lost session."""
        client.on_disconnect = None
        client.close()

    async def _login(self, client, token_origin=None):
        """Log in with the key and safetoken (or as a linked device); C{token_origin}: where the safetoken was given."""
        attempt = self.login_attempt or (lambda login: login())
        if self.linked:
            device = device_id(self.key).hex()
            try:
                self.pending = await attempt(
                    lambda: client.login(self.user, None, self.key, self.receive, device=device))
                return self.pending
            except AuthFailed:
                raise AuthFailed("Login as %s from this device (id %s) failed: the account no longer has it (it was "
                                 "revoked, or the account was re-keyed); link this machine again with '%s --force'."
                                 % (self.user, format_device_id(device), self.link_command))
        try:
            self.pending = await attempt(lambda: client.login(self.user, self.token, self.key, self.receive))
            return self.pending
        except AuthFailed:
            raise AuthFailed("Login as %s failed: wrong safetoken%s, or the server does not know this key "
                             "(fingerprint %s)." % (self.user, " (%s)" % token_origin if token_origin else "",
                                                    format_fingerprint(fingerprint(self.key))))

    def _keys_elsewhere(self, server_id):
        """The other server ids this machine holds the user's key under (HOME/<id>/<user>/key.p12), sorted."""
        try:
            names = os.listdir(self.home)
        except OSError:
            return []
        return sorted(name for name in names if valid_server_id(name) and name != server_id
                      and holds_key(os.path.join(self.home, name, self.user)))

    async def may_make_key(self, client):
        """
        Before making a key for a user this machine has none for at this server: refuse when the address, before a
        C{forget-server}, was another server where this machine holds the user's key.  An address known_servers
        does not list (a home from before it) where this machine holds the user's key under another id gets a
        warning: the server there may have been replaced.  Then ask the server whether the account exists, before
        any key is made.  For an existing account the interactive client offers to link this machine as a new
        device (the default) or to re-key the account; a new one is registered by a script with C{--register}, or by
        the interactive client after asking.  Returns what to do: C{"link"}, C{"rekey"} or C{"register"}; raises
        L{ServerChanged} or L{NoKey}.
        """
        for old in self.known.forgotten(self.known_address):
            if old != client.server_id and holds_key(os.path.join(self.home, old, self.user)):
                raise ServerChanged(self.address, old, client.server_id, self.trust_command, message=(
                    "This machine already holds a key for %s at %s under the server id %s, which that address "
                    "presented before 'forget-server'; it now presents %s, so pager makes no new key there: a "
                    "server restored from backup keeps its id, so if its operator confirms it was rebuilt, accept "
                    "the new id with '%s' and run the command again."
                    % (self.user, self.address, old, client.server_id, self.trust_command)))
        others = self._keys_elsewhere(client.server_id) if self.known.known(self.known_address) is None else []
        if others:
            self.prompter.say(
                "Warning: this machine holds a key for %s under the server id%s %s, but %s, which this machine has "
                "no record of, presents the server id %s: if this address used to be %s, the server was replaced "
                "(or someone stands in for it), so stop and ask its operator; if %s is on another server too, go on."
                % (self.user, "s" if len(others) > 1 else "", " and ".join(others), self.address, client.server_id,
                   "that server" if len(others) == 1 else "one of those servers", self.user))
        closed = False
        try:
            exists = await client.exists(self.user)
        except Forbidden:
            # Registration is closed, and a closed server names no accounts: nobody can register there, so the
            # only way on is an existing account's key, brought here or replaced with its safetoken.
            exists = closed = True
        except BadRequest:
            exists = False  # a server older than "exists": registering then tells whether the name is taken
        copy = "copy it here with 'pager-cli export-key' there and 'pager-cli import-key' here"
        link = "pager-cli link-device %s --user %s" % (self.address, self.user)
        registered = ("%s's registration is closed, so %s can only be an existing account there" if closed
                      else "%s is registered on %s") % ((self.address, self.user) if closed
                                                        else (self.user, self.address))
        if exists:
            if closed and self.config.get("register") and not self.prompter.interactive:
                # What was asked for cannot happen there: say so first, as registering would (exit 1).
                raise Forbidden("This server does not take new users; ask its operator. If %s has an account "
                                "there, %s." % (self.user, copy))
            if not self.prompter.interactive:
                raise NoKey("%s, but this machine has no key for it: link this machine to the account as a new "
                            "device with '%s' (approved on the machine that holds %s's key), or %s (or, if the key "
                            "is lost, re-key the account with its safetoken in 'pager-cli connect')."
                            % (registered, link, self.user, copy))
            self.prompter.say(
                "%s (server id %s), but this machine has no key for it. It can:\n"
                "  l  link this machine to %s as a new device (recommended): it gets its own key, and you approve it "
                "on the machine that holds %s's key with the code shown here;\n"
                "  r  make a new key and re-key the account with its safetoken, if the key is lost: messages sent "
                "to the old key can then never be read, %s's other devices are dropped, and everyone who pinned "
                "the key is warned;\n"
                "  n  neither (to use the same key here instead, %s)."
                % (registered, client.server_id, self.user, self.user, self.user, copy))
            while True:
                answer = (await self.prompter.ask("Link, re-key or neither? [L/r/n] ")).lower()
                if answer in ("", "l", "link"):
                    return "link"
                if answer in ("r", "re-key", "rekey"):
                    return "rekey"
                if answer in ("n", "no", "neither"):
                    raise NoKey("No key made: %s has no key on this machine (link it with '%s', or %s)."
                                % (self.user, link, copy))
                self.prompter.say("Answer l (link this machine), r (re-key the account) or n (neither).")
        if self.config.get("register"):
            return "register"
        if not self.prompter.interactive:
            raise NoKey("This machine has no key for %s on %s (server id %s): if %s has a key on another machine, "
                        "copy it here with 'pager-cli export-key' and 'pager-cli import-key'; to make a new key and "
                        "register %s, run the command again with --register (and the new key's passphrase in "
                        "PAGER_PASSPHRASE, or --no-passphrase)."
                        % (self.user, self.address, client.server_id, self.user, self.user))
        self.prompter.say("This machine has no key for %s on %s (server id %s)." % (
            self.user, self.address, client.server_id))
        if not await self.prompter.confirm("Make a new key for %s and register it there?" % self.user):
            raise NoKey("No key made: %s is not registered on %s from this machine (or bring an existing key with "
                        "'pager-cli import-key')." % (self.user, self.address))
        return "register"

    async def _first_use(self, client, existing=False):
        """
        Make the user's key and register it (C{existing}: re-key the existing account with its safetoken, asked as
        the existing one); the safetoken is then kept under the new key's passphrase.
        """
        prompter = self.prompter
        if self.config.get("register") and not existing and prompter.interactive:
            prompter.say("This machine has no key for %s on %s." % (self.user, self.address))
        if existing:
            token = self._given_token() or await self._ask_token(
                "Safetoken of your existing account %s: " % self.user)
            name = await self.device_name()  # re-keying makes this machine the account's one device
        else:
            token = await self.new_token()
            # The identity device's, in its self-certificate; --register answers the questions in advance.
            name = await self.device_name(ask=not self.config.get("register"))
        try:
            passphrase = await self.new_passphrase()
        except usage.UsageError:
            if self.config.get("passphrase-file"):
                raise  # given, and refused: its own sentence says why
            # A missing answer, as when an existing key's passphrase is not given (exit 2).
            raise usage.UsageError(
                "This machine has no key for %s on %s: to make one, give its passphrase in PAGER_PASSPHRASE or "
                "--passphrase-file (or choose --no-passphrase); if %s already has a key on another machine, link "
                "this one to the account instead, with 'pager-cli link-device %s --user %s'."
                % (self.user, self.address, self.user, self.address, self.user))
        prompter.say("Generating a %d-bit RSA key..." % RSA_BITS)
        key = await self.in_thread(generate_private_key)
        # Saved before the account exists, so that a failure to save can never leave the server with a key that is
        # nowhere; it takes its final name only once the server has it.
        pending_path = self.key_path + ".new"
        try:
            await self.in_thread(save_private_key, pending_path, key, passphrase)
        except OSError as e:
            raise LocalError("Cannot save the new key in %s: %s." % (self.directory, e.strerror))
        try:
            if existing:
                token = await self._recover(client, token, key, name)
            else:
                await self._register(client, token, key, name)
        except BaseException:
            os.unlink(pending_path)
            raise
        self.key, self.token, self.passphrase = key, token, passphrase
        await self.save_token(token, passphrase)
        os.replace(pending_path, self.key_path)
        prompter.say("Saved your key in %s (fingerprint %s)." % (self.key_path, format_fingerprint(fingerprint(key))))

    async def device_name(self, ask=True):
        """
        The name of the device this machine becomes: C{--name} when given; else asked at a terminal (unless
        not C{ask}), the host name being the default shown in the question (so that two machines of one user need
        not share a name); else the host name.
        """
        given = self.config.get("device-name")
        if given is not None:
            return given
        default = default_device_name()
        if not self.prompter.typed or not ask:
            return default
        while True:
            answer = await self.prompter.ask("Name of this device, as you and your contacts will see it [%s]: "
                                             % default)
            if not answer:
                return default
            if valid_device_name(answer):
                return answer
            self.prompter.say(DEVICE_NAME_RULE)

    async def _register(self, client, token, key, name=None):
        try:
            await client.register(self.user, token, key, device_name=name)
        except UserExists:
            raise NoKey("%s was registered on %s moments ago, from somewhere else; if that was you, copy the key "
                        "here with 'pager-cli export-key' and 'pager-cli import-key'." % (self.user, self.address))
        self.prompter.say("Registered %s on %s." % (self.user, self.address))

    async def _recover(self, client, token, key, name=None):
        """
        Re-key the account with its safetoken (three tries when typed), this machine becoming its identity device
        named C{name}, and log in; returns the token that worked.
        """
        for attempt in range(3):
            try:
                await client.recover(self.user, token, key, device_name=name)
                break
            except AuthFailed:
                if self._given_token() is not None or not self.prompter.interactive or attempt == 2:
                    raise AuthFailed("Re-keying %s failed: wrong safetoken." % self.user)
                self.prompter.say("Wrong safetoken; try again.")
                token = await self._ask_token("Safetoken of your existing account %s: " % self.user)
        self.prompter.say("Re-keyed %s: everyone who pinned your old key will be warned." % self.user)
        self.key, self.token = key, token
        await self._login(client)
        return token

    @property
    def link_command(self):
        """The command that approves a link request of this user on the identity machine, without its code."""
        words = ["pager-cli", "link-device", self.address, "--user", self.user]
        if self.config["tls"]:
            words.append("--tls")
        return " ".join(shlex.quote(word) for word in words)

    async def link(self, client, name, show=None):
        """
        Link this machine to the account as a new device: make its key (under a new passphrase, as at
        registration), send the server a link request authenticated by a one-time code, show the code with the
        command that approves it on the machine holding the identity key, and wait for the approval (the server
        keeps a request L{LINK_TTL} seconds).  Meanwhile the key waits in C{device.p12.new}; it takes its final name
        only once approved, and a request that expires, fails or is interrupted (Ctrl-C) leaves no key behind.  The
        connection can then log in as the device (L{_login}).
        """
        show = show or self.prompter.say
        try:
            passphrase = await self.new_passphrase("this device's key")
        except usage.UsageError:
            raise usage.UsageError(
                "Linking this machine to %s makes it a key of its own: give that key's new passphrase in "
                "PAGER_PASSPHRASE or --passphrase-file (or choose --no-passphrase)." % self.user)
        self.prompter.say("Generating a %d-bit RSA key for this device..." % RSA_BITS)
        key = await self.in_thread(generate_private_key)
        pending = self.device_path + ".new"
        try:
            await self.in_thread(save_private_key, pending, key, passphrase)
        except OSError as e:
            raise LocalError("Cannot save the new device key in %s: %s." % (self.directory, e.strerror))
        stopping = []
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", lambda: stopping.append(True) or
                                                     _remove_quietly(pending))
        try:
            text, secret = new_link_code()
            await client.link_request(self.user, key, name, secret)
            show("To link this machine to %s, run this on the machine that holds %s's key within %d minutes:\n\n"
                 "    %s %s\n\nIt shows this device as %s (id %s): check that before approving it. Waiting "
                 "for the approval (Ctrl-C cancels)..."
                 % (self.user, self.user, LINK_TTL // 60, self.link_command, text, device_name_text(name),
                    format_device_id(device_id(key))))
            info = await client.wait_linked()
            os.replace(pending, self.device_path)
        except BaseException:
            _remove_quietly(pending)
            if stopping:  # Ctrl-C (or SIGTERM): the closing connection withdraws the request
                raise Interrupted(LINK_CANCELLED)
            raise
        finally:
            if not stopping:
                self.reactor.removeSystemEventTrigger(trigger)
        self.key, self.passphrase, self.linked = key, passphrase, True
        # The name the identity device approved it under (in the certificate), which may not be the one it asked for.
        show("Linked: this machine is now %s's device %s (id %s); its key is saved in %s. It reads the messages "
             "sent from now on, not older ones." % (self.user, device_name_text(info.name),
                                                    format_device_id(device_id(key)), self.device_path))

    async def reconnect(self, say):
        """
        Connect and log in again with the same key and token, backing off from 1 s to L{RECONNECT_MAX_DELAY}
        between tries, or longer when a throttled login is told to wait longer (C{retry_after}).
        """
        delay = 1.0
        say("Connection to %s lost." % self.address)
        while not self.closing:
            say("Reconnecting in %d s..." % delay)
            self._backoff = task.deferLater(self.reactor, delay, lambda: None)
            try:
                await self._backoff
            except defer.CancelledError:
                break  # closing
            finally:
                self._backoff = None
            if self.closing:
                break
            client = None
            try:
                client = await self.connect()
                if client.server_id != self.server_id:
                    raise ServerChanged(self.address, self.server_id, client.server_id, self.trust_command)
                await self._login(client)
            except IncompatibleServer:
                if client is not None:
                    self._abandon(client)
                raise
            except (NetworkError, ConnectionLost, RateLimited) as e:
                # rate_limited: the server is busy or throttling logins, which passes like a network fault; a
                # throttled login waits as long as the server says, since each refused try lengthens the wait.
                if client is not None:
                    self._abandon(client)
                say(e.message)
                delay = max(min(delay * 2, RECONNECT_MAX_DELAY), getattr(e, "retry_after", None) or 0)
                continue
            except BaseException:
                if client is not None:
                    self._abandon(client)
                raise
            if self.closing:
                self._abandon(client)
                break
            self.client = client
            return client
        raise Cancelled("Stopped reconnecting: the client is quitting.")

    def close(self):
        """Close the connection, let incoming work in hand finish, then close the local store."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self):
        self.closing = True
        if self._backoff is not None:
            self._backoff.cancel()
        client = self.client
        if client is not None:
            await client.close()
            # A message or receipt being handled still writes to the store.
            await within(self.reactor, client.when_handled(), CLOSE_HANDLING_WAIT)
        if self.store is not None:
            self.store.close()
            self.store = None


#### Terminal UI ####

# The only code that writes to the terminal: prompts before login, the chat screen after it, and the script
# commands' output.  All of it goes through one SafeWriter: main() puts one around standard output and standard
# error, the chat screen and the Prompter write through one, so nothing a server or a sender chooses (names,
# reasons, error sentences, message text) can carry escape sequences to the terminal, wherever it is printed.


class Interrupted(PagerError):
    """interrupted before the command finished."""

    code = "interrupted"


class OutputClosed(LocalError):
    """Standard output was closed (its reader stopped reading) before every message was printed."""


# What must never reach a terminal as it is: the C0 controls but tab and newline (ESC starts every escape sequence,
# CR overwrites a line), DEL and the C1 controls (0x9b is a one-byte CSI), and every Unicode format character,
# line or paragraph separator and lone surrogate (categories Cf, Zl, Zp, Cs): the bidirectional overrides, isolates
# and marks reorder what is shown, the invisible ones hide text.  Only the zero-width non-joiner and joiner (U+200C,
# U+200D), which some scripts and emoji need, pass.  tests.test_output checks these classes against unicodedata.
# The few such characters beyond U+FFFF have their own class, looked for only in text that has any: a class with
# them costs every character of every text five times as much.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b\u200e"
    "\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb]")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_UNSAFE_ASTRAL = re.compile(
    "[\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f]")


def _visible(match):
    code = ord(match.group())
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code


class SafeWriter:
    """
    The one way text reaches a terminal or standard error: a text stream that writes everything through L{clean}, so
    an escape sequence or a bidirectional override arrives as visible, harmless text (ESC as C{\\x1b}).  Anything
    else (C{fileno}, C{encoding}, C{isatty}) is the wrapped stream's.
    """

    def __init__(self, stream):
        self.stream = stream

    @classmethod
    def wrap(cls, stream):
        """C{stream} behind a SafeWriter, unless it already is one."""
        return stream if isinstance(stream, cls) else cls(stream)

    @staticmethod
    def clean(text):
        """C{text} with everything in L{_UNSAFE} and L{_UNSAFE_ASTRAL} made visible as a Python-style escape."""
        text = _UNSAFE.sub(_visible, text)
        if not text.isascii() and _ASTRAL.search(text):
            text = _UNSAFE_ASTRAL.sub(_visible, text)
        return text

    def write(self, text):
        self.stream.write(self.clean(text))
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _clock(t):
    return time.strftime("%H:%M", time.localtime(t))


def _date_clock(t):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _size_text(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            if unit == "bytes":
                return "1 byte" if n == 1 else "%d bytes" % n
            return "%.1f %s" % (n, unit)
        n /= 1024.0


SAFE_FILENAME_BYTES = 200  # a saved file's name at most, in UTF-8, leaving room for "-9999" under the usual 255


def _filename_character(c):
    """A character a saved file's name keeps: letters, digits and combining marks of any script, and ._ -()+,@"""
    return c in "._ -()+,@" or unicodedata.category(c)[0] in "LNM"


def safe_filename(name):
    """
    A file name that is safe to create in a directory: no path, no leading dot, no control, format or separator
    characters; letters of every script are kept (NFC), and the name is cut to L{SAFE_FILENAME_BYTES} in UTF-8,
    keeping its extension.
    """
    name = os.path.basename(unicodedata.normalize("NFC", name).replace("\\", "/"))
    name = "".join(c if _filename_character(c) else "_" for c in name).strip(" .")
    base, ext = os.path.splitext(name)
    if len(ext.encode("utf-8")) > 20:
        base, ext = name, ""
    while base and len((base + ext).encode("utf-8")) > SAFE_FILENAME_BYTES:
        base = base[:-1]
    name = (base.rstrip(" .") + ext).strip(" .")
    return name or "file"


def save_incoming_file(directory, filename, data):
    """Save a received file under C{directory} with a safe, unused name (mode 0600); return its path."""
    base, ext = os.path.splitext(safe_filename(filename))
    for n in range(10000):
        path = os.path.join(directory, base + ("" if n == 0 else "-%d" % n) + ext)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return path
    raise LocalError("Too many files named %s in %s." % (filename, directory))


def _read_line_unbuffered(fd=0):
    """One line from a file descriptor, byte by byte so that nothing after it is consumed; None at end of input."""
    data = bytearray()
    while True:
        byte = os.read(fd, 1)
        if not byte:
            return bytes(data).decode("utf-8", "replace") if data else None
        if byte == b"\n":
            return bytes(data).decode("utf-8", "replace").rstrip("\r")
        data += byte


def _in_daemon_thread(reactor, f, *args):
    """Run a blocking read in a daemon thread, so an interrupted prompt never keeps the process alive."""
    import threading
    d = Deferred()

    def run():
        try:
            result = f(*args)
        except BaseException as e:
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, result)
    threading.Thread(target=run, daemon=True).start()
    return d


class Prompter:
    """
    Questions asked on the terminal before the chat starts.  Standard input is read unbuffered in a thread, so the
    reactor keeps running and nothing typed ahead is lost; secrets are read without echo when it is a terminal.
    With C{interactive=False} (a command off a terminal, L{_on_terminal}) every question is an error naming the
    option to use instead.
    """

    def __init__(self, reactor, interactive=True, out=None):
        self.reactor = reactor
        self.interactive = interactive
        self.out = SafeWriter.wrap(out or sys.stderr)

    def say(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    @property
    def typed(self):
        """
        Whether answers are typed at a terminal: a question that has a default (a device's name) is asked only then,
        never of a pipe into connect, whose lines are chat lines.
        """
        return self.interactive and os.isatty(0)

    async def ask(self, prompt, hint=None):
        if not self.interactive:
            raise usage.UsageError(hint or "Cannot ask: %s" % prompt.strip(": "))
        self.out.write(prompt)
        self.out.flush()
        line = await self._answer(_read_line_unbuffered)
        if line is None:
            raise self._input_ended(prompt)
        return line.strip()

    def _input_ended(self, prompt):
        """Ctrl-D (or the end of a pipe) at C{prompt}: the line the prompt left open is ended before the error."""
        self.out.write("\n")
        self.out.flush()
        return Cancelled('Input ended at the question "%s".' % prompt.strip().rstrip(":"))

    async def secret(self, prompt, hint=None):
        if not self.interactive:
            raise usage.UsageError(hint or "Cannot ask: %s" % prompt.strip(": "))
        if not os.isatty(0):
            # A pipe into connect holds chat lines: one would be taken for the secret, and lost from the chat.
            hint = hint or "Give it in the environment (PAGER_PASSPHRASE, PAGER_TOKEN)."
            raise usage.UsageError("%s (standard input is not a terminal, so pager reads no secret from it)."
                                   % hint.rstrip("."))
        import getpass

        def read():
            try:
                return getpass.getpass(prompt, stream=self.out)
            except EOFError:
                return None
        value = await self._answer(read)
        if value is None:
            raise self._input_ended(prompt)
        return value

    async def _answer(self, read):
        """What C{read} reads in a thread; meanwhile the terminal's guard knows a question is open on the screen."""
        guard = TerminalGuard._installed
        if guard is not None:
            guard.question_open = True
        try:
            return await _in_daemon_thread(self.reactor, read)
        finally:
            if guard is not None:
                guard.question_open = False

    async def confirm(self, question):
        answer = await self.ask(question + " [y/N] ")
        return answer.lower() in ("y", "yes")


CHAT_SHOWN_LINES = 40  # a longer incoming text is cut in the chat after this many lines...
CHAT_SHOWN_CHARS = 4000  # ...or this many characters, and saved whole to a file
HISTORY_SHOWN_LINES = 5  # /history shows at most this many lines...
HISTORY_SHOWN_CHARS = 400  # ...and characters of each message


def cut_text(text, lines=CHAT_SHOWN_LINES, chars=CHAT_SHOWN_CHARS):
    """C{text} cut after C{lines} lines or C{chars} characters, whichever comes first (C{text} itself if shorter)."""
    return "\n".join(text.split("\n", lines)[:lines])[:chars]


def _lines_text(text):
    lines = text.count("\n") + 1
    return "%d line%s" % (lines, "" if lines == 1 else "s")


def describe_message(message, saved_path=None, elsewhere=False, cut=False, sent_from=None, hint=None):
    """
    How an incoming message is shown: time, sender, trust mark, then the text (indented when it has lines).
    C{elsewhere} marks a message from outside the chat's current conversation (a leading \u00bb); with C{cut},
    a long text shows only its first lines and a note that it is saved whole in C{saved_path}.  A message the user
    sent from another of their devices (C{sent_from}: that device's name, as L{device_name_text} shows it) is shown
    as sent: C{you (on 'laptop') \u2192 bob: ...}.  A changed key's mark names the commands that check and accept
    it as C{hint(command, user)} does (L{Session.command_hint}: the whole C{pager-cli} line outside the chat); by
    default as the chat's C{/fingerprint} and C{/trust}.
    """
    group = getattr(message, "group_name", None)
    if sent_from is not None:
        mark = "you (on %s) \u2192 %s:" % (sent_from, group_label(group) if group is not None else ", ".join(
            r for r in message.recipients if r != message.sender) or "your other devices")
    elif message.key_status in ("pinned", "verified"):
        mark = "\u2713"
    elif message.key_status == "new":
        mark = "\u2713 (first message: key pinned)"
    else:
        # Ends with a colon, as a group message's head does: the text that follows is the sender's, not the hint's.
        hint = hint or (lambda command, name: "/%s %s" % (command, name))
        mark = "\u26a0 KEY CHANGED, NOT VERIFIED (see %s, then %s):" % (
            hint("fingerprint", message.sender), hint("trust", message.sender))
    when = message.accepted_at if message.accepted_at is not None else message.timestamp
    if sent_from is not None:
        head = "[%s] %s%s" % (_clock(when), "\u00bb " if elsewhere else "", mark)
    elif group is not None:
        head = "[%s] %s%s %s %s" % (_clock(when), "\u00bb " if elsewhere else "", group_label(group), message.sender,
                                    mark)
    else:
        head = "[%s] %s%s %s" % (_clock(when), "\u00bb " if elsewhere else "", message.sender, mark)
    if message.skewed:
        head += " (signed at %s by the sender's clock)" % _date_clock(message.timestamp)
    others = [r for r in message.recipients if r != message.sender]
    if len(others) > 1 and sent_from is None and group is None:
        head += " (to %s)" % ", ".join(others)
    if getattr(message, "group_note", None):
        head += " (%s)" % message.group_note
    if group is not None and sent_from is None and not head.endswith(":"):
        head += ":"
    if message.content_type == "file":
        return "%s%s the file %s (%s), saved as %s" % (
            head, " sent" if sent_from is None else "", message.filename, _size_text(len(message.plaintext)),
            saved_path)
    # Lines ended the Windows way read as lines too, not as lines that each end in a control character.
    text = message.plaintext.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    note = None
    if cut:
        shown = cut_text(text)
        if shown != text:
            note = "[cut: the message has %s, %d characters; all of it is saved as %s]" % (
                _lines_text(text), len(text), saved_path)
            text = shown
    if "\n" in text or note:
        return head + "\n" + "\n".join("    " + line for line in text.split("\n") + ([note] if note else []))
    return head + " " + text


def _label(ref, preview):
    """How the chat names a message it sent: its reference and first words, when known."""
    return " ".join(part for part in ("#%d" % ref if ref is not None else None, preview) if part)


def describe_receipt(receipt, ref=None, preview=None):
    """
    How a receipt is shown, naming the message by its outbox reference (C{ref}) and first words (C{preview}) when
    they are known (see L{LocalStore.sent_message}).
    """
    label = _label(ref, preview)
    message = "your message " + label if label else "your message"
    if receipt.status == "delivered":
        return "[%s] \u2713\u2713 %sdelivered to %s" % (_clock(receipt.at), label + " " if label else "", receipt.peer)
    if receipt.status == "rejected":
        return "[%s] \u2717 %s could not open %s: %s" % (_clock(receipt.at), receipt.peer, message, receipt.reason)
    return "[%s] \u2717 %s to %s expired undelivered" % (_clock(receipt.at), message, receipt.peer)


SUMMARY_NAMED = 10  # messages a summary of receipts names, per outcome, before it says "and N more"
SUMMARY_REASON = 200  # characters of a recipient's reason for refusing a message that a summary shows


def summarise_receipts(items, now):
    """
    One line for the receipts of earlier messages that arrive at login: C{items} are C{(receipt, ref, preview)},
    or C{(receipt, ref, preview, group)} for a group message's (C{group}: the group's name as the chat shows it).
    Messages are named by reference, else by their first words, else by the start of their id.
    """
    outcomes = (("delivered", "delivered", "to"), ("rejected", "could not be opened", "by"),
                ("expired", "expired undelivered", "to"))
    parts = []
    for status, said, word in outcomes:
        named = ["%s%s %s %s%s" % ("#%d" % ref if ref is not None else preview or receipt.message_id[:8],
                                   " in " + group_label(group[0]) if group else "", word, receipt.peer,
                                   ": " + _error_sentence(receipt.reason, SUMMARY_REASON)
                                   if status == "rejected" else "")
                 for receipt, ref, preview, *group in items if receipt.status == status]
        if named:
            more = len(named) - SUMMARY_NAMED
            listed = ", ".join(named[:SUMMARY_NAMED]) + (" and %d more" % more if more > 0 else "")
            parts.append("%d %s (%s)" % (len(named), said, listed))
    return "[%s] Since you were last here, of your messages: %s; /history shows them." % (
        _clock(now), ", ".join(parts))


def group_label(name):
    """How a group is named wherever a person sees it: C{#ops}."""
    return "#" + name


def _one_line(text):
    """
    Text someone else chose (a group's topic) on one line: a line break or tab in it is shown as C{\\n} or C{\\t},
    so it cannot start a line that looks like another message.  Everything else is the L{SafeWriter}'s to clean.
    """
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def describe_group_change(event, me=None):
    """
    The words of a membership change (a L{GroupEvent}): C{alice added carol}, C{bob left}, C{carol was removed by
    alice}, C{alice changed the topic to "..."}, C{alice renamed #ops to #ops2}, C{alice made bob an admin},
    C{alice removed bob as an admin of #ops}, C{alice stepped down as an admin of #ops}, C{alice created #ops with
    bob, carol}.  C{me} (this user) is called C{you}.  (C{event.text} is the topic of a topic change, the name
    before a rename.)
    """
    def who(name):
        return "you" if name == me else name

    actor, users = who(event.actor), ", ".join(who(u) for u in event.users)
    kind = event.kind
    if kind == "create":
        return "%s created %s%s" % (actor, group_label(event.name), " with " + users if users else "")
    if kind == "add":
        return "%s added %s" % (actor, users)
    if kind == "remove":
        if actor == "you":
            return "you removed %s" % users
        return "%s %s removed by %s" % (users, "was" if len(event.users) == 1 and users != "you" else "were",
                                        actor)
    if kind == "leave":
        return "%s left" % actor
    if kind == "rename":
        return "%s renamed %s to %s" % (actor, group_label(event.text), group_label(event.name))
    if kind == "topic":
        if not event.text:
            return "%s cleared the topic" % actor
        return '%s changed the topic to "%s"' % (actor, _one_line(event.text))
    if kind == "promote":
        return "%s made %s an admin" % (actor, users)
    if kind == "demote" and event.users == (event.actor,):
        return "%s stepped down as an admin of %s" % (actor, group_label(event.name))
    if kind == "demote":
        return "%s removed %s as an admin of %s" % (actor, users, group_label(event.name))
    return "%s changed %s (%s)" % (actor, group_label(event.name), kind)


def describe_group_event(event, at, me=None):
    """A membership change as the chat shows it: C{[12:00] #ops: alice added carol}."""
    return "[%s] %s: %s" % (_clock(at), group_label(event.name), describe_group_change(event, me))


def describe_group(info, me):
    """
    The lines of C{/group info} and C{pager-cli group info}: name, topic, version, your role, admins and members,
    and whether the membership chain verifies.
    """
    role = ("admin" if me in info.admins else "member") if info.member and me in info.members else "not a member"
    lines = ["%s (version %d, %d member%s; you: %s)" % (
        group_label(info.name), info.seq, len(info.members), "" if len(info.members) == 1 else "s", role)]
    lines.append("  topic: %s" % ('"%s"' % _one_line(info.topic) if info.topic else "(none)"))
    lines.append("  admins: %s" % (", ".join(sorted(info.admins)) or "nobody"))
    lines.append("  members: %s" % (", ".join(sorted(info.members)) or "nobody"))
    if info.broken:
        lines.append("  \u26a0 its membership chain does not verify: %s. Nothing is sent to it." % info.broken)
    return "\n".join(lines)


def _group_json(info, me):
    """A group as C{group info --json} and C{groups --json} print it."""
    return {"id": info.id, "name": info.name, "topic": info.topic, "version": info.seq,
            "members": sorted(info.members), "admins": sorted(info.admins), "member": bool(info.member),
            "admin": me in info.admins and bool(info.member), "unread": info.unread, "broken": info.broken}


GROUP_SHORT_ID = 8  # hex digits of a group's id shown to tell apart groups of one name


def group_short_id(info):
    """The first digits of a group's id: what tells apart two groups of one name (C{#x1 (id 0f3a9c2e)})."""
    return info.id[:GROUP_SHORT_ID]


def _membership_ended(how):
    """How a membership ended, as L{PagerClient.membership_end} gives it: C{left}, C{removed by alice}."""
    if how is None:
        return "not a member"
    return "left" if how[0] == "left" else "removed by %s" % how[1]


def describe_groups(groups, me, ended=None):
    """
    The lines of C{/groups} and C{pager-cli groups}: one per group, with its unread count; a group one is no longer
    in says how that ended (C{ended}: C{{id: L{PagerClient.membership_end}'s answer}}); groups of one name are told
    apart by their ids' first digits.
    """
    if not groups:
        return "You are in no group; /group create NAME [MEMBERS...] makes one."
    ended = ended or {}
    named = collections.Counter(g.name for g in groups)
    lines = []
    for info in sorted(groups, key=lambda g: (not g.member, g.name, g.id)):
        label = group_label(info.name)
        if named[info.name] > 1:
            label += " (id %s)" % group_short_id(info)
        if info.broken and not info.seq:  # nothing of it verified here yet: no members, no membership to tell of
            lines.append("  %s  \u26a0 does not verify yet (nothing is sent to it)" % label)
            continue
        parts = [label, "%d member%s" % (len(info.members), "" if len(info.members) == 1 else "s")]
        if info.member and me in info.admins:
            parts.append("admin")
        if not info.member:
            parts.append(_membership_ended(ended.get(info.id)))
        if info.unread:
            parts.append("%d unread" % info.unread)
        if info.broken:
            parts.append("\u26a0 chain does not verify")
        lines.append("  " + "  ".join(parts))
    return "Your groups:\n" + "\n".join(lines)


async def groups_ended(client):
    """C{(groups, ended)}: the client's groups, and how this user's membership ended in each it is no longer in."""
    groups = await client.groups()
    return groups, {g.id: await client.membership_end(g.id) for g in groups if not g.member}


def describe_group_ticks(name, delivered, total, ref, preview, at):
    """
    The tick of a group message: C{[12:00] \u2713 3/5 #12 "disk full" in #ops}, or C{\u2713\u2713 5/5 ...} once
    every member it was sealed for has it.
    """
    label = _label(ref, preview)
    return "[%s] %s %d/%d %sin %s" % (_clock(at), "\u2713\u2713" if delivered >= total else "\u2713", delivered, total,
                                      label + " " if label else "", group_label(name))


GROUP_ACTIONS = {
    # action: (arguments after the group's NAME, as the chat's /group and pager-cli group take them; what it does)
    "create": ("[MEMBERS...]", "make the group #NAME with those members (one word each); you are its admin"),
    "add": ("USER...", "add members (admins)"),
    "remove": ("USER...", "remove members (admins; to leave yourself: leave)"),
    "leave": ("", "leave the group: nothing sent to it reaches you from then on"),
    "rename": ("NEW", "rename it (admins)"),
    "topic": ("[TEXT]", "set its topic (admins); no TEXT, or \"\", clears it"),
    "admin": ("USER [off]", "make USER an admin (admins); off: no longer one"),
    "info": ("", "its members, admins, topic, version and your role"),
}
CLI_GROUP_PREFIX = "pager-cli group HOST --user NAME"  # how pager-cli group's usage lines begin (the group: GROUP)


def group_usage(action=None, prefix="/group"):
    """
    The usage sentence of one group action (or of them all): C{/group topic NAME [TEXT]} in the chat, C{pager-cli
    group HOST --user NAME topic GROUP [TEXT]} from a script (C{prefix} L{CLI_GROUP_PREFIX}).
    """
    group = "GROUP" if prefix == CLI_GROUP_PREFIX else "NAME"
    if action in GROUP_ACTIONS:
        arguments = GROUP_ACTIONS[action][0]
        return "Usage: %s %s %s%s" % (prefix, action, group, " " + arguments if arguments else "")
    return "Usage: %s ACTION %s ..., ACTION one of %s." % (prefix, group, ", ".join(GROUP_ACTIONS))


def group_actions_text(prefix="/group", width=None):
    """
    Every group action with its arguments and what it does (C{pager-cli group --help}), what it does wrapped to
    C{width} columns (80 when None) beside the column of actions.
    """
    group = "GROUP" if prefix == CLI_GROUP_PREFIX else "NAME"
    rows = [("%s %s %s" % (action, group, arguments)).rstrip() for action, (arguments, _) in GROUP_ACTIONS.items()]
    column = max(len(row) for row in rows) + 4
    return "\n".join(textwrap.fill(what.replace("#NAME", "#" + group), (width or 80) - 1,
                                   initial_indent="  %-*s  " % (column - 4, row), subsequent_indent=" " * column,
                                   break_on_hyphens=False)
                     for row, (_, what) in zip(rows, GROUP_ACTIONS.values()))


def _one_group_only(names, how):
    """Why recipients C{names} that hold a group are refused: one group at a time, and never with users."""
    if all(n.startswith("#") for n in names):
        return "A message goes to one group at a time, not to %s: %s once for each." % (", ".join(names), how)
    return "A message goes to one group or to users, not both: %s." % ", ".join(names)


def _group_users(words):
    """User names given as words, each perhaps a list with commas; sorted, once each."""
    try:
        return sorted({canonical_username(name) for word in words for name in word.split(",") if name})
    except BadRequest as e:
        raise usage.UsageError(e.message)


def _topic_text(text):
    """A topic as typed in the chat: C{""} (or C{''}) alone is the empty topic, which clears it."""
    return "" if text.strip() in ('""', "''") else text


async def group_action(client, action, name, words, off=False, topic=None, prefix="/group"):
    """
    Do one group action for the chat's C{/group} and for C{pager-cli group}, and return the sentence that says what
    was done.  C{words} are the arguments after the group's NAME (C{topic}: the topic's text as typed, spaces and all);
    C{off} demotes with C{admin}.  Before anything is signed, the request is checked against the group as verified
    here: a change in a group this user is not in is L{UnknownGroup} ("You are not in #dev: you left it."), one only
    admins make, by someone who is not one, L{GroupRefused}, and so is making or unmaking an admin of someone who is
    not a member; a change that is so already changes nothing and says so.  The client checks the rest (the
    identity device, the chain, the group's rules).
    """
    if action not in GROUP_ACTIONS:
        raise usage.UsageError("No group action %s: %s" % (action, group_usage(None, prefix)[len("Usage: "):]))
    try:
        name = canonical_group_name(name)
    except BadRequest as e:
        raise usage.UsageError(e.message)
    if action == "create":
        members = _group_users(words)
        if client.user in members:
            members.remove(client.user)
        try:
            await client.group_create(name, members)
        except UnknownUser as e:
            raise UnknownUser("%s (a group's name is one word: the words after %s are its members)"
                              % (e.message.rstrip("."), group_label(name)))
        return "Created %s%s; you are its admin." % (
            group_label(name), " with " + ", ".join(members) if members else " (add members with '%s add %s USER...')"
            % (prefix, name))
    info = await client.group(name)
    label = group_label(info.name)
    me = client.user
    if action == "info":
        if words:
            raise usage.UsageError(group_usage(action, prefix))
        return describe_group(info, me)
    if not info.member:
        ended = await client.membership_end(info.id)
        raise UnknownGroup("You are not in %s%s." % (label, "" if ended is None else ": you left it" if
                                                      ended[0] == "left" else ": %s removed you" % ended[1]))
    if action == "remove" and me in _group_users(words):
        raise usage.UsageError("You leave %s with %s leave %s, not remove." % (label, prefix, info.name))
    if action != "leave" and me not in info.admins:
        kind = "demote" if action == "admin" and (off or words[1:] == ["off"]) else \
            {"admin": "promote"}.get(action, action)
        raise GroupRefused("Only an admin of %s can %s; you are not one." % (label, _GROUP_OP_WORDS[kind]))
    if action in ("add", "remove"):
        users = _group_users(words)
        if not users:
            raise usage.UsageError(group_usage(action, prefix))
        if action == "add" and all(u in info.members for u in users):
            return "%s %s in %s already; nothing changed." % (", ".join(users), "is" if len(users) == 1 else "are",
                                                               label)
        if action == "remove" and not any(u in info.members for u in users):
            return "%s %s not in %s; nothing changed." % (", ".join(users), "is" if len(users) == 1 else "are", label)
        await (client.group_add if action == "add" else client.group_remove)(info.id, users)
        return "%s %s %s %s." % ("Added" if action == "add" else "Removed", ", ".join(users),
                                 "to" if action == "add" else "from", label)
    if action == "leave":
        if words:
            raise usage.UsageError(group_usage(action, prefix))
        await client.group_leave(info.id)
        return "You left %s: you receive nothing sent to it from now on." % label
    if action == "rename":
        if len(words) != 1:
            raise usage.UsageError(group_usage(action, prefix))
        try:
            new = canonical_group_name(words[0])
        except BadRequest as e:
            raise usage.UsageError(e.message)
        if new == info.name:
            return "%s is called %s already; nothing changed." % (label, label)
        await client.group_rename(info.id, new)
        return "Renamed %s to %s." % (label, group_label(new))
    if action == "topic":
        text = _topic_text(topic) if topic is not None else " ".join(words)
        if len(text.encode("utf-8")) > MAX_GROUP_TOPIC_BYTES:
            raise usage.UsageError("A topic has at most %d bytes (as UTF-8); this one has %d." % (
                MAX_GROUP_TOPIC_BYTES, len(text.encode("utf-8"))))
        if text == (info.topic or ""):
            return ('The topic of %s is "%s" already; nothing changed.' % (label, _one_line(text)) if text else
                    "%s has no topic already; nothing changed." % label)
        await client.group_topic(info.id, text)
        return ('The topic of %s is now "%s".' % (label, _one_line(text)) if text else
                "Cleared the topic of %s." % label)
    # admin
    if words[1:] == ["off"]:
        off, words = True, words[:1]
    if len(words) != 1:
        raise usage.UsageError(group_usage(action, prefix))
    [user] = _group_users(words)
    if user not in info.members:
        raise GroupRefused("%s is not a member of %s." % (user, label))
    if (user in info.admins) != off:
        return ("%s is not an admin of %s; nothing changed." if off else
                "%s is an admin of %s already; nothing changed.") % (user, label)
    await client.group_admin(info.id, user, admin=not off)
    return ("%s is no longer an admin of %s." if off else "%s is now an admin of %s.") % (user, label)


GROUP_TICKS_QUIET = 1.0  # seconds a group message's receipts are gathered before its count is shown


class GroupTicks:
    """
    The ticks of the group messages a chat sent: the receipts of one message are counted and shown as one line,
    C{\u2713 3/5}, at most once per L{GROUP_TICKS_QUIET} (the first receipt starts the wait on the reactor's clock;
    what arrives meanwhile joins that line), and only when the count has grown; C{\u2713\u2713 5/5} is shown at once
    when every member has it.
    """

    def __init__(self, show, reactor):
        self.show = show
        self.reactor = reactor
        self._pending = {}  # msg id -> [timer, name, delivered, total, ref, preview]
        self._shown = {}  # msg id -> the count last shown

    def delivered(self, msg_id, name, delivered, total, ref, preview):
        """C{delivered} of C{total} members now have message C{msg_id} (of the group C{name})."""
        if delivered <= self._shown.get(msg_id, 0):
            return
        pending = self._pending.get(msg_id)
        if delivered >= total:
            if pending is not None and pending[0].active():
                pending[0].cancel()
            self._pending.pop(msg_id, None)
            self._shown[msg_id] = delivered
            self.show(describe_group_ticks(name, delivered, total, ref, preview, self.reactor.seconds()))
            return
        if pending is None:
            timer = self.reactor.callLater(GROUP_TICKS_QUIET, self._flush, msg_id)
            self._pending[msg_id] = [timer, name, delivered, total, ref, preview]
        else:
            pending[1:] = [name, delivered, total, ref, preview]

    def _flush(self, msg_id):
        _, name, delivered, total, ref, preview = self._pending.pop(msg_id)
        if delivered > self._shown.get(msg_id, 0):
            self._shown[msg_id] = delivered
            self.show(describe_group_ticks(name, delivered, total, ref, preview, self.reactor.seconds()))

    def close(self):
        """Show now what waits (the chat is quitting), and stop the timers."""
        for msg_id in list(self._pending):
            self._pending[msg_id][0].cancel()
            self._flush(msg_id)


def describe_group_delivery(name, members, receipts, ref=None, preview=None):
    """
    The lines of C{/info}: who of the C{members} a group message was sealed for have it (with the time), who
    refused it (with the reason) and who it still waits for.  C{receipts}: C{{user: (status, at[, reason])}}.
    """
    label = _label(ref, preview)
    delivered = sorted((u, r) for u, r in receipts.items() if r[0] == "delivered" and u in members)
    refused = sorted((u, r) for u, r in receipts.items() if r[0] != "delivered" and u in members)
    waiting = sorted(u for u in members if u not in receipts)
    lines = ["Your message %sto %s: %d of %d have it." % (label + " " if label else "", group_label(name),
                                                          len(delivered), len(members))]
    if delivered:
        lines.append("  delivered: " + ", ".join("%s %s" % (u, _clock(r[1])) for u, r in delivered))
    for user, r in refused:
        reason = r[2] if len(r) > 2 and r[2] else ""
        lines.append("  %s: %s %s%s" % ("refused" if r[0] == "rejected" else r[0], user, _clock(r[1]),
                                        " (%s)" % _one_line(reason) if reason else ""))
    if waiting:
        lines.append("  waiting: " + ", ".join(waiting))
    return "\n".join(lines)


OUTBOX_RETRY = 10.0  # seconds before the outbox tries again after a busy server (rate_limited without a wait, internal)


def outbox_group(recipients):
    """The group id (hex) of an outbox entry's recipients when they are a group (C{["#<group id hex>"]}), else None."""
    if len(recipients) == 1 and re.fullmatch("#[0-9a-f]{%d}" % (2 * GROUP_ID_SIZE), recipients[0]):
        return recipients[0][1:]
    return None


class Outbox:
    """
    The chat's messages from Enter until the server has them.  L{add} keeps a message on disk (L{LocalStore}'s
    outbox) and shows it waiting with its reference; L{flush} sends what waits, oldest first and one at a time, so
    that the server accepts them in the order they were typed.  Each message is sealed once, before its first try,
    and that envelope is kept: a try whose answer was lost is sent again as the same message, which the server
    recognises (PROTOCOL.md 8.6) and recipients show once.  Two chats of one user on one machine share the outbox
    and may flush the same message at once: only the first envelope stored for it is kept, and both send that one.
    A dropped connection leaves the rest waiting until the
    chat has logged in again and flushes; a refusal (an unknown user, a changed key, too large, over quota) is said
    with its reason and takes the message out of the outbox (into the history, marked not sent).
    """

    log = Logger()

    def __init__(self, session, show, reactor):
        self.session = session
        self.show = show
        self.reactor = reactor
        self.sent = set()  # ids (hex) of the messages accepted for this process: their receipts are live news
        self._pass = None  # the flush under way
        self._again = False  # a message was added while it ran
        self._waiters = []
        self._retry = None
        self._paused_until = 0.0  # when the server's last pause (rate_limited) is over

    def connected(self):
        client = self.session.client
        return (client is not None and client.user is not None and client.protocol.lost is None
                and not self.session.closing and self.session.store is not None)

    async def add(self, names, data, content_type="text", filename=""):
        """Keep the message on disk, show it waiting, and send it (and any older one) if connected."""
        names = sorted({canonical_username(n) for n in names})
        if not names or len(names) > MAX_RECIPIENTS:
            raise BadRequest("A message has 1 to %d recipients." % MAX_RECIPIENTS)
        store = self.session.store
        if store is None:
            raise Cancelled("Not sent: the client is quitting.")
        ref = await store.outbox_add(self.reactor.seconds(), names, content_type, filename, data)
        if self.connected():
            self.show("\u23f3 #%d to %s" % (ref, ", ".join(names)))
        else:
            self.show("\u23f3 #%d to %s waits for the connection: it is sent when the client has reconnected."
                      % (ref, ", ".join(names)))
        await self.flush()

    async def add_group(self, info, data, content_type="text", filename=""):
        """
        Keep a message to the group C{info} (a L{GroupInfo}) on disk, show it waiting, and send it; returns its
        reference.  The outbox names the group by its id (C{["#<group id hex>"]}), so a rename meanwhile changes
        nothing.
        """
        store = self.session.store
        if store is None:
            raise Cancelled("Not sent: the client is quitting.")
        if not info.member:
            raise Forbidden("Not sent: you are no longer a member of %s." % info.label)
        ref = await store.outbox_add(self.reactor.seconds(), ["#" + info.id], content_type, filename, data)
        if self.connected():
            self.show("\u23f3 #%d to %s" % (ref, info.label))
        else:
            self.show("\u23f3 #%d to %s waits for the connection: it is sent when the client has reconnected."
                      % (ref, info.label))
        await self.flush()
        return ref

    async def resume(self):
        """After logging in: say what an earlier run left waiting, and send it."""
        store = self.session.store
        waiting = await store.outbox_waiting() if store is not None else 0
        if waiting:
            self.show("\u23f3 %d message%s in the outbox; sending now." % (
                waiting, " waits" if waiting == 1 else "s wait"))
        await self.flush()

    def flush(self):
        """
        Send what waits, if connected; the Deferred fires once the outbox is empty, the connection is down, or the
        server asked for a pause.
        """
        d = Deferred()
        self._waiters.append(d)
        if self._pass is None:
            self._pass = Deferred.fromCoroutine(self._flush())
            self._pass.addCallbacks(self._passed, self._passed, errbackArgs=(True,))
        else:
            self._again = True
        return d

    def _passed(self, result, failed=False):
        self._pass = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if failed:
                d.errback(result)
            else:
                d.callback(None)

    async def _flush(self):
        while self.connected():
            if self._retry is not None and self._retry.active():
                return  # the server asked for a pause: what was added meanwhile waits for the retry, behind the rest
            self._again = False
            store, client = self.session.store, self.session.client
            entry = await store.outbox_next()
            if entry is None:
                if self._again:
                    continue
                return
            if not await self._try(store, client, entry):
                return

    async def _try(self, store, client, entry):
        """Send one message; False when the rest must wait (the connection is down, the server is busy)."""
        names, label = ", ".join(entry.recipients), "#%d" % entry.ref
        group = outbox_group(entry.recipients)
        if group is not None:  # a group message: recipients ["#<group id hex>"]
            info = next((g for g in await client.groups() if g.id == group), None)
            names = info.label if info is not None else "#" + group

            async def seal_it(message_id=None):
                return (await client.seal_group(group, entry.body, entry.content_type, entry.filename,
                                                message_id=message_id))[1]

            def send_it(envelope):
                return client.send_group_envelope(group, envelope)
        else:
            async def seal_it(message_id=None):
                again = {"message_id": message_id} if message_id is not None else {}
                return (await client.seal(entry.recipients, entry.body, entry.content_type, entry.filename,
                                          **again))[1]

            def send_it(envelope):
                return client.send_envelope(entry.recipients, envelope)
        try:
            envelope = entry.envelope
            if envelope is None:
                envelope = await store.outbox_sealed(entry.ref, await seal_it())
                if envelope is None:
                    return True  # another chat of this user on this machine sent it (or it was refused) meanwhile
            try:
                answer = await send_it(envelope)
            except (DevicesChanged, GroupChanged):
                # Sealed by an earlier run (this process would have sealed it anew itself): seal it anew for the
                # devices (or the group's version) the recipients have now, as the same message, and keep that
                # envelope instead.
                if group is not None:
                    await client.refresh_group(group)
                message_id = parse_header(envelope.header).message_id
                envelope = await store.outbox_sealed(entry.ref, await seal_it(message_id), replace=True)
                if envelope is None:
                    return True
                answer = await send_it(envelope)
        except (ConnectionLost, defer.CancelledError):
            return False  # still waiting: sent again, as the same message, after the reconnection
        except (RateLimited, InternalError) as e:
            delay = getattr(e, "retry_after", None) or OUTBOX_RETRY
            self.show("\u23f3 %s to %s waits %d s: %s" % (label, names, _whole_seconds(delay), e.message))
            self._paused_until = self.reactor.seconds() + delay
            if self._retry is None or not self._retry.active():
                self._retry = self.reactor.callLater(delay, self._retry_now)
            return False
        except Exception as e:
            if isinstance(e, UnknownUser) and group is None and len(entry.recipients) == 1:
                reason = e.message.rstrip(".") + await _group_hint(client, entry.recipients, "/msg %s TEXT") + "."
            elif isinstance(e, PagerError):
                reason = e.message
            else:
                reason = "this client failed to send it (%s)" % e
                self.log.failure("Sending message {ref} failed", ref=entry.ref)
            await store.outbox_refused(entry.ref, HistoryEntry(
                entry.at, "out", ",".join(entry.recipients), entry.msg_id or "", entry.content_type, entry.filename,
                entry.body if entry.content_type == "text" else b"", "not sent: " + reason, group))
            self.show("\u2717 %s to %s was not sent: %s" % (label, names, reason))
            return True
        msg = answer["msg"]
        self.sent.add(msg)
        await store.outbox_sent(entry.ref, msg, self.reactor.seconds(), HistoryEntry(
            entry.at, "out", ",".join(entry.recipients), msg, entry.content_type, entry.filename,
            entry.body if entry.content_type == "text" else b"", "sent", group))
        queued = [n for n in answer.get("queued", []) if n in entry.recipients
                  or (group is not None and valid_username(n))]
        self.show("\u2713 %s sent%s" % (label, "; %s %s offline: the server keeps it until they log in" % (
            ", ".join(queued), "is" if len(queued) == 1 else "are") if queued else ""))
        return True

    def _retry_now(self):
        self._retry = None
        self.flush().addErrback(lambda f: self.log.failure("Sending the outbox failed", f))

    def close(self):
        """Stop trying again later: what waits stays on disk for the next run."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    async def drain(self, deadline):
        """
        At quitting: go on sending what waits, pausing as the server asks, until the outbox is empty, the
        connection is down or the reactor's clock passes C{deadline}.  Returns C{(waiting, connected)}: how many
        messages still wait, and whether the connection was still up.
        """
        store = self.session.store
        try:
            while True:
                waiting = await store.outbox_waiting() if store is not None else 0
                now = self.reactor.seconds()
                left = deadline - now
                if not waiting or left <= 0 or not self.connected():
                    return waiting, self.connected()
                if self._paused_until > now:  # the server's pause is not over: asking again would be refused
                    await task.deferLater(self.reactor, min(left, self._paused_until - now), lambda: None)
                    continue
                self.close()  # this loop tries again itself, once a pause is over
                await self.flush()
                self.close()
        finally:
            self.close()


QUIT_WAIT = 5.0  # seconds /quit waits for the commands in flight (a stalled server) before closing anyway
RECEIPTS_AT_LOGIN_QUIET = 1.0  # seconds without a receipt (from the screen being up) that end those pushed at login


SENT_FROM = "sent from "  # the history's mark on a message the user sent from another device: "sent from 'laptop'"
# ...and, for a group message, the line after it: which members have it is known to the device that sent it (its
# receipts come to the devices online then, one member's at a time), so this one claims no count.
GROUP_RECEIPTS_THERE = "who has it: /info on that device"


def sent_elsewhere_status(sent_from, group):
    """The history's status of a message this user sent from the device C{sent_from} (C{group}: a group's, or None)."""
    return SENT_FROM + sent_from + ("\n" + GROUP_RECEIPTS_THERE if group is not None else "")


_RECEIPT_WORDS = {"delivered": "delivered to ", "rejected": "rejected by ", "expired": "expired for "}


def _with_receipt(old, receipt):
    """
    The history's status of a sent message once C{receipt} came, its status before being C{old} (or None): one
    line for each recipient's latest receipt (C{delivered to bob}, C{rejected by carol: REASON}), in the order they
    came, after the mark of a message sent from another device (L{SENT_FROM}), if any.
    """
    def peer(line):
        for words in _RECEIPT_WORDS.values():
            if line.startswith(words):
                return line[len(words):].partition(":")[0]
        return None
    lines = [line for line in (old or "").split("\n")
             if line.startswith(SENT_FROM) or peer(line) not in (None, receipt.peer)]
    return "\n".join(lines + [_RECEIPT_WORDS[receipt.status] + receipt.peer + (
        # The reason, its sender's words, on the line: a line break in it would read as another receipt.
        ": " + " ".join(receipt.reason.split()) if receipt.status == "rejected" else "")])


class Chat:
    """
    The interactive client's logic, apart from how lines are read and shown: the UI passes each typed line to
    L{line}; the chat shows events with C{ui.show(text)} and changes the prompt with C{ui.set_prompt(text)}.

    A line starting with C{/} is a command; any other line goes to the open conversation (C{conversation}, one user
    name, shown as the prompt C{NAME> }), or, when none is open (the prompt C{to> }), is refused with a sentence:
    a typed word is never taken as a recipient.  C{users}, C{quit} and C{help} also work without the C{/} there.
    """

    BARE_COMMANDS = ("users", "quit", "exit", "help")  # taken without "/" at the to> prompt, as they always were
    HELP = """\
Every line you type goes to the open conversation (its name is the prompt); commands start with "/".
  /to NAME                   talk to NAME: each line you type from now on goes to NAME (/to alone: to nobody)
  /r                         talk to whoever wrote to you last (lines from others are marked \u00bb)
  /msg NAME[,NAME...] TEXT   send TEXT once, without changing the conversation
  /paste [NAME[,NAME...]]    send several lines as one message; end with a line holding only "."
  /file [NAME[,NAME...]] PATH  send a file (quote a PATH with spaces: /file bob "my notes.txt")
  /users [NAME]              who is online, who is registered (with NAME: the names after it)
  /history [NAME]            the last messages (with NAME: with that user)
  /fingerprint [NAME]        your key's fingerprint, or NAME's and whether it is pinned, verified or changed
  /verify NAME [DIGITS]      show NAME's fingerprint to compare with NAME (by phone or in person); with its
                             first four digits, record that you did
  /trust NAME                accept NAME's new key after checking its fingerprint
  /devices [NAME]            your devices, or NAME's (pager-cli link-device adds one, revoke-device removes one)
  /whoami                    who you are, on which server
  /to #GROUP                 talk in a group: each line you type goes to every member of #GROUP
  /groups                    your groups, with how many of their messages you have not read
  /group create NAME [MEMBERS...]   make the group #NAME, a one-word name (you are its admin)
  /group add|remove NAME USER...    add or remove members (admins)
  /group leave NAME          leave #NAME: nothing sent to it reaches you from then on
  /group rename NAME NEW     rename #NAME (admins)
  /group topic NAME [TEXT]   set its topic (admins); without TEXT, or with "", clear it
  /group admin NAME USER [off]      make USER an admin of #NAME (off: no longer one)
  /group info NAME           its members, admins, topic, version and your role
  /info [#REF]               who has your group message #REF (alone: the last one you sent)
  /help                      this text
  /quit                      leave (Ctrl-D too)
To send a line that starts with "/", type "//" instead: "//usr is full" sends "/usr is full"."""

    def __init__(self, session, reactor):
        self.session = session
        session.in_chat = True  # its sentences name /trust and /verify, not pager-cli's commands
        self.reactor = reactor
        self.ui = None
        self.conversation = None  # the user each typed line goes to, or "#name" for a group, or None (to>)
        self.group = None  # the id (hex) of the open group conversation, or None
        self.last_sender = None  # whom /r answers
        self.pasting = None  # lines of a /paste so far
        self._paste_to = None  # and whom they are for
        self.confirming = None  # (name, text) of a long paste waiting for y or n
        self.done = Deferred()
        self.ended_by = None  # the error that ended the chat when it could not reconnect
        self._closing = False
        self._busy = {}  # commands in flight (Deferred -> what it does): quitting waits for them, QUIT_WAIT at most
        self._input = collections.deque()  # what was typed (or piped, or pasted) and is not handled yet, in order
        self._taking = False  # whether the loop that handles it (L{_take_input}) runs
        self._quit_asked = None  # when quitting was first asked for (the reactor's seconds)
        self._quit_timer = None  # what quits if a /quit typed waits QUIT_WAIT behind a stalled command
        self._early = []
        self.outbox = Outbox(session, self.show, reactor)
        self._old_receipts = []  # receipts of earlier messages pushed at login, summed up in one line
        self._gathering = False  # whether receipts of earlier messages are being gathered for that line
        self._receipts_quiet = None  # the timer that ends the gathering
        self.ticks = GroupTicks(self.show, reactor)
        self._last_group_sent = None  # the ref of the last group message this chat sent, for /info
        self._group_events = 0  # membership changes shown so far
        self._client = None  # the client whose arrivals the handlers below take
        session.wire = self._wire

    # -- wiring --

    def attach(self, ui):
        self.ui = ui
        self._prompt()
        self.ui.show("Logged in as %s on %s. Type /to NAME to start talking, /help for help."
                     % (self.session.user, self.session.address))
        early, self._early = self._early, []
        for text in early:
            self.ui.show(text)
        self._logged_in()

    def _wire(self, client):
        self._client = client  # the one that hands off what arrives (session.client only once logged in)
        client.on_message = self.message_received
        client.on_receipt = self.receipt_received
        client.on_rejected = self.message_rejected
        client.on_disconnect = self.disconnected
        client.on_failure = self.hand_off_failed
        client.on_devices_changed = self.devices_changed
        client.on_group_event = self.group_event
        client.on_group_warning = self.group_warning
        self._gathering = True  # a login begins: the receipts the server kept for us come first

    def _logged_in(self):
        """After each login: end the receipts of earlier messages once they stop coming, and send the outbox."""
        if self._receipts_quiet is not None and self._receipts_quiet.active():
            self._receipts_quiet.cancel()
        self._receipts_quiet = self.reactor.callLater(RECEIPTS_AT_LOGIN_QUIET, self._summarise_receipts)
        self._run(self.outbox.resume())

    def show(self, text):
        if self.done.called:
            return  # the chat has left: nothing is written after it
        if self.ui is not None:
            self.ui.show(text)
        else:
            self._early.append(text)  # arrived between login and the screen: shown once it is up

    @property
    def prompt(self):
        """The prompt for the next line: C{... } in a /paste, C{NAME> } in a conversation, C{to> } outside one."""
        if self.pasting is not None:
            return "... "
        return "%s> " % (self.conversation or "to")

    def _prompt(self):
        if self.ui is not None and not self._closing:
            self.ui.set_prompt(self.prompt)

    @property
    def closing(self):
        """True once the chat is quitting: the screen draws no prompt any more."""
        return self._closing

    def quit(self):
        if not self._closing:
            self._closing = True
            if self._quit_asked is None:
                self._quit_asked = self.reactor.seconds()
            if self._quit_timer is not None and self._quit_timer.active():
                self._quit_timer.cancel()
            if self.pasting:
                self.show("(the /paste of %d line%s to %s was not sent)" % (
                    len(self.pasting), "" if len(self.pasting) == 1 else "s", ", ".join(self._paste_to)))
            if self.confirming is not None:
                name, text = self.confirming
                self.show("(the paste of %d lines to %s was not sent)" % (len(text.split("\n")), name))
            self.outbox.close()
            self.ticks.close()
            if self._receipts_quiet is not None and self._receipts_quiet.active():
                self._receipts_quiet.cancel()
            self._summarise_receipts()  # they are acknowledged: shown now, not dropped
            Deferred.fromCoroutine(self._close())

    async def _close(self):
        left_early = False
        if self._busy:
            # What is in flight gets QUIT_WAIT from when quitting was asked (a /quit typed behind a stalled command
            # is taken then: L{_quit_typed}).
            wait = self._quit_asked + QUIT_WAIT - self.reactor.seconds()
            waited = Deferred()
            defer.DeferredList(list(self._busy)).addBoth(lambda _: waited.called or waited.callback(None))
            if wait <= 0 or not await within(self.reactor, waited, wait):
                self.show("Left without waiting longer for %s (%d s): a message waiting in the outbox stays on "
                          "disk and is sent at the next connect." % (
                              ", ".join(sorted({label for label in self._busy.values() if label})
                                        or ["the lines typed"]), QUIT_WAIT))
                left_early = True
        if not left_early:
            # The server may have asked for a pause (rate_limited): what waits is sent meanwhile, for as long.
            waiting, connected = await self.outbox.drain(self._quit_asked + QUIT_WAIT)
            if waiting:
                self.show("%s%d message%s in the outbox stay%s on disk and %s sent at the next connect." % (
                    "Left without waiting longer (%d s): " % QUIT_WAIT if connected else "", waiting,
                    "" if waiting == 1 else "s", "s" if waiting == 1 else "", "is" if waiting == 1 else "are"))
        try:
            await self.session.close()
        finally:
            self.done.callback(None)

    # What quitting names as still in flight (any other command by its /NAME).
    _LABELS = {"send": "a message being sent", "command_msg": "a message being sent",
               "command_file": "a file being sent", "resume": "the outbox being sent"}

    def _run(self, coroutine, label=None):
        """Run C{coroutine}, its failure shown as a sentence; quitting waits for it.  Returns its Deferred."""
        name = getattr(coroutine, "__name__", "")
        if label is None:
            label = self._LABELS.get(name) or ("/" + name[len("command_"):] if name.startswith("command_") else
                                               "a command")
        d = Deferred.fromCoroutine(coroutine).addErrback(self._failed)
        if not d.called:
            self._busy[d] = label
            d.addBoth(lambda result: (self._busy.pop(d, None), result)[1])
        return d

    def _failed(self, failure):
        if failure.check(PagerError):
            self.show(failure.value.message)
        elif failure.check(usage.UsageError):
            self.show(str(failure.value))
        else:
            self.show("Something went wrong: %s" % failure.getErrorMessage())
            Logger().failure("Chat command failed", failure)

    # -- input --

    def line(self, text):
        """
        One typed (or piped) line: a /command, a line of a /paste, or a message to the open conversation.  Lines
        are handled strictly in the order they came, each once the one before is done (its command finished, its
        message sent or waiting in the outbox): a /to changes where the next line goes, and an /info or /groups
        after it answers about what came before.  (A long paste waiting for y or n is answered through L{confirm}:
        the screen that pasted it takes those keys itself.)
        """
        handle = functools.partial(self._line, text)
        self._queue_input(handle)
        if text.strip().lower() in ("/quit", "/exit") and self._input and handle in self._input:
            self._quit_typed(handle)

    def _quit_typed(self, handle):
        """
        /quit came while the lines before it are still being handled: it is taken in its turn, but QUIT_WAIT at the
        latest (a stalled command before it does not keep the chat from leaving), the lines still waiting dropped.
        """
        if self._quit_asked is None:
            self._quit_asked = self.reactor.seconds()
        if self._quit_timer is None:
            self._quit_timer = self.reactor.callLater(
                QUIT_WAIT, lambda: handle in self._input and self.quit())

    def end_of_input(self):
        """Standard input has ended (piped lines): quit once every line before the end has been handled."""
        self._queue_input(self.quit)

    def _queue_input(self, handle):
        """Handle C{handle()} (which may return a coroutine to wait for) after everything queued before it."""
        self._input.append(handle)
        if not self._taking:
            self._taking = True
            self._run(self._take_input(), label="")

    async def _take_input(self):
        try:
            while self._input and not self._closing:
                handle = self._input.popleft()
                try:
                    coroutine = handle()
                except Exception:
                    self._failed(Failure())
                    continue
                if coroutine is not None:
                    await self._run(coroutine)
        finally:
            self._taking = False
            dropped = sum(1 for handle in self._input if handle != self.quit)  # the end of input is no line
            self._input = collections.deque()
            if dropped:
                self.show("(the chat left before handling %d more line%s)" % (dropped, "" if dropped == 1 else "s"))

    def _line(self, text):
        """L{line}'s work, in its turn: returns the coroutine that sends or runs it, if any."""
        if self.pasting is not None:
            if text == ".":
                names, lines, self.pasting, self._paste_to = self._paste_to, self.pasting, None, None
                self._prompt()
                if not "".join(lines).strip():
                    self.show(NOTHING_TO_SEND)
                    return None
                return self.send(names, "\n".join(lines))
            self.pasting.append(text)
            return None
        stripped = text.strip()
        if not stripped:
            return None
        if stripped.startswith("/") and not stripped.startswith("//"):
            word, _, rest = stripped.partition(" ")
            return self._command(word, rest.strip())
        if self.conversation is None:
            word, _, rest = stripped.partition(" ")
            if word in self.BARE_COMMANDS:
                return self._command(word, rest.strip())
            self.show("Not sent: no conversation is open. Type /to NAME first (then every line goes to NAME), "
                      "or /msg NAME TEXT.")
            return None
        if stripped.startswith("//"):
            text = text.replace("/", "", 1)
        return self.send([self.conversation], text)

    def _command(self, word, rest):
        name = word.lstrip("/").lower()
        handler = getattr(self, "command_" + name, None) if name.isidentifier() else None
        if handler is None:
            self.show("Unknown command %s: nothing was sent. Type /help for the commands (and // to send a line "
                      "that starts with /)." % word)
            return None
        return handler(rest)

    def _names(self, text):
        """
        The recipients a /msg, /paste or /file names: users separated by commas, or one group, C{#ops} (as a list
        holding C{"#ops"}).
        """
        names = [n.strip() for n in text.split(",") if n.strip()]
        if any(n.startswith("#") for n in names):
            if len(names) > 1:
                raise usage.UsageError(_one_group_only(names, "/msg"))
            return [group_label(canonical_group_name(names[0]))]
        names = [canonical_username(n) for n in names]
        if not names:
            raise BadRequest("Name at least one recipient.")
        return sorted(set(names))

    def open_conversation(self, user, announce=True, group=None):
        """
        Make C{user} (or C{#name}, with C{group} its id) the current conversation: the prompt shows the name and each
        typed line goes there.
        """
        self.conversation, self.group = user, group
        self._prompt()
        if announce:
            self._announce(user)

    def _announce(self, user):
        if self.group is not None and user == self.conversation:
            self.show("Talking in %s: each line you type goes to its members (/to NAME to switch)." % user)
            return
        self.show("Talking to %s: each line you type goes to %s (/to NAME to switch)." % (user, user))

    def _still_open(self):
        """What a failed /to leaves: the conversation that stays open, or none."""
        if self.conversation is None:
            return "no conversation is open"
        return "the conversation %s %s stays open" % ("in" if self.group is not None else "with", self.conversation)

    async def command_to(self, rest):
        if not rest:
            if self.conversation is None:
                raise usage.UsageError("Usage: /to NAME (each line you type then goes to NAME), or /to #GROUP.")
            left, self.conversation, self.group = self.conversation, None, None
            self._prompt()
            self.show("Left the conversation %s %s: lines you type go nowhere until /to NAME." % (
                "in" if left.startswith("#") else "with", left))
            return
        if rest.startswith("#"):
            await self._open_group(rest)
            return
        if "," in rest or " " in rest:
            raise usage.UsageError("A conversation is with one user (/to NAME); send one message to several with "
                                   "/msg NAME,NAME TEXT.")
        user = canonical_username(rest)
        # Opened once the server knows the name (or cannot be asked now: it names an unknown user when the message
        # goes out); the lines after it wait until then (L{line}).  A name it does not know changes nothing.
        try:
            await self.session.client.public_key(user)
        except UnknownUser:
            raise UnknownUser("No such user: %s%s; %s (/users lists who is registered)." % (
                user, await self._group_hint(user, "/to #%s" % user), self._still_open()))
        except (ConnectionLost, NetworkError):
            pass
        self.open_conversation(user)
        # A device the peer added or revoked since this client last looked is a line now, not only at the next
        # exchange: a user who only reads would otherwise never see it (on_devices_changed shows it).
        try:
            await self.session.client.refresh_devices(user)
        except (ConnectionLost, NetworkError):
            pass

    async def _group_hint(self, name, how):
        """For a user name nobody has: C{" (did you mean the group #NAME? HOW)"} when this user is in such a group."""
        try:
            info = await self.session.client.group(name)
        except (PagerError, BadRequest):
            return ""
        return " (did you mean the group %s? %s)" % (info.label, how) if info.member else ""

    async def _open_group(self, text):
        """
        /to #ops: the group's conversation is opened once the group is known here and this user is a member (the
        prompt is then C{#ops> }); otherwise the conversation that was open stays open.  Its messages are read from
        then on: unread none.
        """
        if " " in text.strip() or "," in text:
            raise usage.UsageError("A conversation is with one group (/to #GROUP); /msg sends one message.")
        name = canonical_group_name(text.strip())
        try:
            info = await self.session.client.group(name)
        except UnknownGroup:
            raise UnknownGroup("You are in no group %s; %s (/groups lists yours)." % (group_label(name),
                                                                                       self._still_open()))
        if not info.member and info.broken and not info.seq:  # known only by the name its unverified ops give it
            raise GroupRefused("%s's membership chain does not verify: %s. Nothing can be sent to it; %s." % (
                info.label, info.broken, self._still_open()))
        if not info.member:
            raise UnknownGroup("You are no longer a member of %s; %s (/groups lists yours)." % (
                info.label, self._still_open()))
        self.open_conversation(info.label, group=info.id)  # as the client knows it (the name typed may be old)
        if info.topic:
            self.show('Topic of %s: "%s"' % (self.conversation, _one_line(info.topic)))
        if info.broken:
            self.show("\u26a0 %s's membership chain does not verify: %s Nothing can be sent to it."
                      % (self.conversation, info.broken))
        await self.session.client.group_read(info.id)

    async def command_r(self, rest):
        if rest:
            raise usage.UsageError("/r takes no text: it makes the last sender the conversation; then type the "
                                   "message.")
        if self.last_sender is None:
            raise usage.UsageError("Nobody has written to you since you logged in; /to NAME opens a conversation.")
        if self.last_sender.startswith("#"):
            await self._open_group(self.last_sender)
            return
        self.open_conversation(self.last_sender)

    command_reply = command_r

    # -- sending --

    async def send(self, names, text, content_type="text", filename="", data=None):
        """
        Send C{text} (or C{data}, for a file) to C{names} through the outbox: kept on disk and shown waiting with
        its reference at once, sent now if connected, else once the client has reconnected (L{Outbox}).
        """
        if data is None:
            data = text.encode("utf-8")
        if len(names) == 1 and names[0].startswith("#"):
            info = await self._sendable_group(names[0])
            ref = await self.outbox.add_group(info, data, content_type, filename)
            if ref is not None:
                self._last_group_sent = ref
            return
        await self.outbox.add(names, data, content_type, filename)

    async def _sendable_group(self, label):
        """
        The L{GroupInfo} of the group C{label} (C{#name}; the open group's id when it is the conversation's label)
        when a message can go to it now: known here, this user a member, its chain verified; else the sentence why
        not, before anything is read, typed or kept for it.
        """
        ref = self.group if label == self.conversation and self.group is not None else label[1:]
        info = await self.session.client.group(ref)
        if info.broken:  # said first: one added by a change that does not verify here is no member here yet
            raise GroupRefused("Not sent: %s's membership chain does not verify: %s." % (info.label, info.broken))
        if not info.member:
            raise Forbidden("Not sent: you are no longer a member of %s." % info.label)
        return info

    PASTE_SHOWN = 5  # a paste of more lines is shown (these first lines) and sent only once confirmed

    def paste(self, text):
        """
        Text pasted in a raw terminal (bracketed paste): one message to the current conversation, never taken line
        by line, so no line of it is ever read as a recipient or a command.  A paste of more than L{PASTE_SHOWN}
        lines is shown first and waits for L{confirm}.  While a C{/paste} is open, the pasted lines join it.  Taken
        in its turn, after the lines typed before it.
        """
        self._queue_input(functools.partial(self._paste, text))

    def _paste(self, text):
        if self.pasting is not None:
            lines = text.split("\n")
            self.pasting.extend(lines)
            self.show("(%d pasted lines added to the /paste for %s)" % (len(lines), ", ".join(self._paste_to)))
            return None
        if self.conversation is None:
            self.show("The paste was not sent: open a conversation first with /to NAME.")
            return None
        if self.confirming is not None:
            self.show("(this paste was not used: answer y or n about the one before it first)")
            return None
        lines = text.split("\n")
        if len(lines) <= self.PASTE_SHOWN:
            return self.send([self.conversation], text)
        self.confirming = (self.conversation, text)
        self.show("\n".join(["A paste of %d lines for %s:" % (len(lines), self.conversation)] +
                             ["  | " + line for line in lines[:self.PASTE_SHOWN]] +
                             ["  | ... and %d more lines" % (len(lines) - self.PASTE_SHOWN)]))
        self.ui.set_prompt("Send it to %s? [Y/n] " % self.conversation)
        return None

    def confirm(self, yes):
        """The answer about a long paste: send it (y or Enter) or drop it (n, Esc or Ctrl-C), saying so."""
        (name, text), self.confirming = self.confirming, None
        self._prompt()
        if yes:
            self._queue_input(functools.partial(self.send, [name], text))
        else:
            self.show("(paste cancelled: nothing sent)")

    async def command_msg(self, rest):
        names, _, text = rest.partition(" ")
        if not names or not text:
            raise usage.UsageError("Usage: /msg NAME[,NAME...] TEXT")
        await self.send(self._names(names), text)

    def _to_conversation(self, usage_text):
        if self.conversation is None:
            raise usage.UsageError("No conversation is open: %s" % usage_text)
        return [self.conversation]

    async def command_paste(self, rest):
        names = self._names(rest) if rest else self._to_conversation("use /paste NAME[,NAME...] or /to NAME first.")
        if names[0].startswith("#"):
            names = [(await self._sendable_group(names[0])).label]  # before a line is typed for it
        self._paste_to, self.pasting = names, []
        self._prompt()
        self.show('Type the message for %s; end it with a line holding only ".".' % ", ".join(names))

    def _file_arguments(self, rest):
        """C{(names, path)} of a /file command: C{[NAMES] PATH}, the path quoted (or backslash-escaped) as in a shell."""
        usage_text = 'Usage: /file [NAME[,NAME...]] PATH, with a PATH that has spaces in quotes: /file bob "my notes.txt"'
        if self.conversation is not None and os.path.isfile(os.path.expanduser(rest)):
            return [self.conversation], rest  # the whole line is a file's name, spaces and all
        try:
            words = shlex.split(rest)
        except ValueError as e:
            raise usage.UsageError("%s (%s)." % (usage_text, e))
        if len(words) == 1:
            return self._to_conversation(usage_text), words[0]
        if len(words) == 2:
            return self._names(words[0]), words[1]
        if len(words) > 2:
            names, _, path = rest.partition(" ")
            if os.path.isfile(os.path.expanduser(path.strip())):
                return self._names(names), path.strip()
        raise usage.UsageError(usage_text)

    async def command_file(self, rest):
        names, path = self._file_arguments(rest)
        if names[0].startswith("#"):
            await self._sendable_group(names[0])  # before the file is read or announced
        path = os.path.expanduser(path)
        try:
            data = await self.session.in_thread(_read_file, path)
        except OSError as e:
            raise usage.UsageError("Cannot read %s: %s." % (path, e.strerror))
        self.show("Sending %s (%s) to %s..." % (os.path.basename(path), _size_text(len(data)), ", ".join(names)))
        await self.send(names, "", "file", os.path.basename(path), data)

    # -- other commands --

    async def command_help(self, rest):
        self.show(self.HELP)

    async def command_quit(self, rest):
        self.quit()

    command_exit = command_quit

    USERS_SHOWN = 100  # names the users command lists at a time

    async def command_users(self, rest):
        client = self.session.client
        after = canonical_username(rest) if rest else None
        online = await client.users_page(after, self.USERS_SHOWN, online=True)
        registered = await client.users_page(after, self.USERS_SHOWN)
        lines = []
        for label, page, count in (("online", online, online.online_count),
                                   ("registered", registered, registered.count)):
            line = "%s: %s" % (label, ", ".join(page.registered) or "nobody")
            if page.next is not None or after is not None:
                line += " (%d in all%s)" % (count, "; more: /users " + page.next if page.next else "")
            lines.append(line)
        self.show("\n".join(lines))

    KEY_STATUS_TEXT = {
        "new": "new: not pinned yet (pinned when you first write to or hear from %(user)s)",
        "pinned": "pinned, not verified: compare it with %(user)s by phone or in person, then /verify %(user)s",
        "verified": "verified: you compared it with %(user)s",
        "changed": "CHANGED since you pinned it",
    }

    async def _peer_key(self, user):
        """C{(fingerprint, status, pin)} of C{user}'s key as the server gives it now."""
        s = self.session
        _, current = await s.client.public_key(user, refresh=True)
        return current, await s.store.key_status(user, current), await s.store.get_pin(user)

    async def _own_fingerprint(self):
        """The fingerprint of the user's identity key: this machine's key, or, on a linked device, the one it joined."""
        s = self.session
        return (await s.client.public_key(s.user))[1] if s.linked else fingerprint(s.key)

    async def command_whoami(self, rest):
        s = self.session
        lines = ["%s on %s (server id %s); your key's fingerprint:" % (s.user, s.address, s.client.server_id),
                 format_fingerprint(await self._own_fingerprint())]  # whole on 80 columns
        if s.linked:
            mine = device_id(s.key)
            info = next((d for d in await s.client.devices(s.user) if d.device_id == mine), None)
            lines.append("This machine is your linked device %s (id %s; its own key, the identity key is on another "
                         "machine)." % (device_name_text(info.name if info is not None else None),
                                        format_device_id(mine)))
        if self.group is not None:
            info = await s.client.group(bytes.fromhex(self.group))
            lines.append("Talking in %s, with %s." % (info.label, ", ".join(m for m in info.members if m != s.user)
                                                       or "no other member"))
        elif self.conversation is not None:
            _, status, _ = await self._peer_key(self.conversation)
            lines.append("Talking to %s, whose key is %s." % (
                self.conversation, self.KEY_STATUS_TEXT[status] % {"user": self.conversation}))
        self.show("\n".join(lines))

    async def command_fingerprint(self, rest):
        s = self.session
        if not rest or canonical_username(rest) == s.user:
            self.show("Your key (%s):\n%s" % (s.user, format_fingerprint(await self._own_fingerprint())))
            return
        user = canonical_username(rest)
        current, status, pin = await self._peer_key(user)
        if status == "changed":
            self.show("%s's key CHANGED. Pinned:\n%s\nThe server gives:\n%s\nCheck the new one with %s, then "
                      "/trust %s." % (user, format_fingerprint(pin[1]), format_fingerprint(current), user, user))
            return
        self.show("%s's key: %s\n%s"
                  % (user, self.KEY_STATUS_TEXT[status] % {"user": user}, format_fingerprint(current)))

    async def command_verify(self, rest):
        """
        /verify NAME shows the key to compare and marks nothing; /verify NAME DIGITS (the first four digits shown, or
        the whole fingerprint) records that it was compared, as pager-cli verify asks before it records.
        """
        name, _, given = rest.strip().partition(" ")
        if not name:
            raise usage.UsageError("Usage: /verify NAME shows NAME's fingerprint to compare with NAME; /verify NAME "
                                   "DIGITS, with its first four digits, records that you compared it.")
        user = canonical_username(name)
        if user == self.session.user:
            raise usage.UsageError("Your own key needs no verifying; /fingerprint shows it to read to others.")
        current, status, _ = await self._peer_key(user)
        if status == "changed":
            await self.session.client.verify(user, current)  # refused: a changed key is accepted with /trust first
        shown = format_fingerprint(current)
        digits = "".join(given.split()).lower()
        if not digits:
            self.show("%s's key, as the server gives it (%s):\n%s\nIf it reads the same as what %s reads to you "
                      "from their own /fingerprint, record that with /verify %s %s (its first four digits)."
                      % (user, {"new": "new", "pinned": "pinned, not verified"}.get(status, status), shown, user,
                         user, shown[:4]))
            return
        if digits != current.hex() and (len(digits) != 4 or not current.hex().startswith(digits)):
            raise KeyChanged(user, current, current, message=(
                "%s is not how %s's key begins (%s): nothing was marked verified; /verify %s shows it again."
                % (given.strip(), user, shown[:4], user)))
        await self.session.client.verify(user, current)
        self.show("%s's key is %s verified (you compared it with %s):\n%s"
                  % (user, "already" if status == "verified" else "now", user, shown))

    async def command_trust(self, rest):
        if not rest:
            raise usage.UsageError("Usage: /trust NAME")
        user = canonical_username(rest)
        _, status, _ = await self._peer_key(user)
        fp = await self.session.client.trust(user, recheck=False)
        if status in ("pinned", "verified"):
            self.show("%s's key is the one you pinned (%s); nothing changed:\n%s"
                      % (user, "verified" if status == "verified" else "pinned, not verified", format_fingerprint(fp)))
            return
        self.show("Now trusting %s's key (pinned, not verified: /verify %s once you have compared it):\n%s"
                  % (user, user, format_fingerprint(fp)))
        await self.session.client.recheck_broken_groups()  # what its groups say now, after that

    async def command_devices(self, rest):
        s = self.session
        user = canonical_username(rest) if rest else s.user
        devices = await s.client.devices(user)
        identity = (await s.client.public_key(user))[1][:DEVICE_ID_SIZE]
        self.show(describe_devices(user, devices, identity, device_id(s.key) if user == s.user else None))

    async def command_group(self, rest):
        action, _, rest = rest.strip().partition(" ")
        if not action:
            raise usage.UsageError(group_usage())
        action = action.lower()
        name, _, rest = rest.strip().partition(" ")
        if not name:
            raise usage.UsageError(group_usage(action))
        # A topic is the rest of the line as typed; every other action takes words (user names, a new name).
        events = self._group_events
        done = await group_action(self.session.client, action, name, rest.split(),
                                  topic=rest.strip() if action == "topic" else None)
        if self._group_events == events:  # a change already shows as its own line (group_event): not twice
            self.show(done)

    async def command_groups(self, rest):
        if rest:
            raise usage.UsageError("/groups takes nothing: it lists your groups (/group info NAME: one of them).")
        groups, ended = await groups_ended(self.session.client)
        self.show(describe_groups(groups, self.session.user, ended))

    async def command_info(self, rest):
        rest = rest.strip()
        if rest:
            try:
                ref = int(rest.lstrip("#"))
            except ValueError:
                raise usage.UsageError("Usage: /info [#REF]: who has your group message #REF (alone: the last one).")
        else:
            ref = self._last_group_sent
        client, store = self.session.client, self.session.store
        if ref is not None:
            msg_id = await store.sent_by_ref(ref)
        else:
            msg_id = await store.last_group_sent()
            if msg_id is None:
                raise usage.UsageError("You have sent no group message from here; /info #REF names one.")
        delivery = await client.group_delivery(msg_id) if msg_id is not None else None
        if delivery is None:
            raise usage.UsageError("#%d is not a group message you sent from here (or the server has not taken it "
                                   "yet)." % ref)
        group, members, receipts = delivery
        ref, preview = await store.sent_message(msg_id)
        self.show(describe_group_delivery(group.name if group is not None else "(a group you left)",
                                          [m for m in members if m != self.session.user], receipts, ref, preview))

    async def command_history(self, rest):
        if rest.strip().startswith("#"):
            await self._group_history(rest.strip())
            return
        peer = canonical_username(rest) if rest else None
        entries = await self.session.store.history(peer)
        if not entries:
            self.show("No history%s." % (" with " + peer if peer else ""))
            return
        self.show(self._history_lines(entries, await self._group_labels()))

    async def _group_labels(self):
        """C{{group id (hex): "#name"}} of the groups this client knows, for the history's lines."""
        return {g.id: g.label for g in await self.session.client.groups()}

    async def _group_history(self, text):
        """/history #ops: the group's last messages, sent and received."""
        info = await self.session.client.group(canonical_group_name(text))
        entries = await self.session.store.history(group=info.id)
        if not entries:
            self.show("No history in %s." % info.label)
        else:
            self.show(self._history_lines(entries, {info.id: info.label}))
        # Read now: for a group this user was removed from or left, the one way to read what it missed.
        await self.session.client.group_read(info.id)

    def _history_lines(self, entries, groups):
        lines = []
        for e in entries:
            arrow = "->" if e.direction == "out" else "<-"
            body = ("file %s" % e.filename) if e.content_type == "file" else e.body.decode("utf-8", "replace")
            shown = cut_text(body, HISTORY_SHOWN_LINES, HISTORY_SHOWN_CHARS)
            if shown != body:
                shown += "\n[cut: %s, %d characters in all]" % (_lines_text(body), len(body))
            # A message sent from another device keeps that mark on its first line, receipts after it.
            status = " (%s)" % e.status.replace("\n", ", ") if e.direction == "out" else ""
            peer = e.peer
            if e.group is not None:  # an outgoing one names the group by its id: by its name now
                label = groups.get(e.group, "a group")
                peer = "%s in %s" % (e.peer, label) if e.direction == "in" else label
            lines.append("[%s] %s %s: %s%s" % (_date_clock(e.at), arrow, peer, shown.replace("\n", "\n    "),
                                               status))
        return "\n".join(lines)

    # -- events --

    async def message_received(self, message):
        """Show (and record) a verified incoming message; the client acknowledges it once this returns."""
        saved = None
        if message.content_type == "file":
            directory = private_directory(self.session.directory, "files")
            saved = await self.session.in_thread(save_incoming_file, directory, message.filename, message.plaintext)
        elif len(message.plaintext) > CHAT_SHOWN_CHARS or message.plaintext.count(b"\n") >= CHAT_SHOWN_LINES:
            text = message.plaintext.decode("utf-8", "replace").rstrip("\n")
            if cut_text(text) != text:  # too long to show whole: saved to a file the note names
                directory = private_directory(self.session.directory, "files")
                name = "message from %s %s.txt" % (message.sender, time.strftime(
                    "%Y-%m-%d %H.%M.%S", time.localtime(message.accepted_at or message.timestamp)))
                saved = await self.session.in_thread(save_incoming_file, directory, name, message.plaintext)
        s = self.session
        own = message.sender == s.user and message.sender_device != device_id(s.key)
        group = message.group_id.hex() if message.group_id is not None else None  # as GroupInfo.id
        in_group = group is not None and self.group == group
        if own:
            # Sent by this user from another of their devices: shown, and kept in the history, as sent.
            sent_from = await s.own_device_name(message.sender_device)
            peers = [r for r in message.recipients if r != s.user]
            elsewhere = self.conversation is not None and (not in_group if group is not None
                                                           else self.conversation not in peers)
            self.show(describe_message(message, saved, elsewhere=elsewhere, cut=True, sent_from=sent_from))
            await s.store.add_history(HistoryEntry(
                message.accepted_at or message.timestamp, "out",
                group_label(message.group_name) if group is not None else ",".join(peers) or s.user,
                message.message_id.hex(), message.content_type, message.filename,
                message.plaintext if message.content_type == "text" else b"",
                sent_elsewhere_status(sent_from, group), group))
            return
        if group is not None:
            self.last_sender = group_label(message.group_name)
            elsewhere = self.conversation is not None and not in_group
            if not in_group:
                await self._client.group_unread_add(group)  # read once /to opens the group
        else:
            if message.sender != s.user:
                self.last_sender = message.sender
            elsewhere = self.conversation is not None and message.sender != self.conversation
        self.show(describe_message(message, saved, elsewhere=elsewhere, cut=True))
        await s.store.add_history(HistoryEntry(
            message.accepted_at or message.timestamp, "in", message.sender, message.message_id.hex(),
            message.content_type, message.filename, message.plaintext if message.content_type == "text" else b"",
            message.key_status, group))

    def devices_changed(self, user, added, revoked):
        """A line for each device C{user} added or revoked (each certified by, or revoked with, the pinned key)."""
        who = "you" if user == self.session.user else user
        for device in added:
            self.show("[%s] %s added a device %s (id %s)" % (
                _clock(self.reactor.seconds()), who, device_name_text(device.name),
                format_device_id(device.device_id)))
        for device in revoked:
            self.show("[%s] %s revoked the device %s (id %s)" % (
                _clock(self.reactor.seconds()), who, device_name_text(device.name),
                format_device_id(device.device_id)))

    def group_event(self, event):
        """
        A membership change the client verified: one line, C{[12:00] #ops: alice added carol}, at the time its actor
        signed it (a change made while this user was away shows when it was made; a clock in the future shows the
        time it came).  A rename of the open group renames the conversation (and the prompt); this user's leaving or
        removal closes it.
        """
        s = self.session
        self._group_events += 1
        now = self.reactor.seconds()
        self.show(describe_group_event(event, event.at if 0 < event.at <= now + 60 else now, s.user))
        if self.group is None or event.group_id != self.group:
            return
        if event.kind == "rename":
            self.conversation = group_label(event.name)
            self._prompt()
        elif (event.kind == "leave" and event.actor == s.user) or (event.kind == "remove" and s.user in event.users):
            self.conversation = self.group = None
            self._prompt()
            self.show("You are no longer in %s: lines you type go nowhere until /to NAME." % group_label(event.name))

    def group_warning(self, group_id, name, sentence):
        """Something about a group this user should know (a chain that does not verify, a server's member list)."""
        self.show("[%s] \u26a0 %s: %s" % (_clock(self.reactor.seconds()), group_label(name) if name else "a group",
                                          sentence))

    def hand_off_failed(self, error, sender):
        """An incoming message (or receipt) could not be saved, shown or recorded: it stays on the server."""
        if self._closing:
            return  # quitting: what was not acknowledged comes again at the next login, as always
        reason = error.message if isinstance(error, PagerError) else (
            "%s: %s" % (error.strerror, error.filename) if isinstance(error, OSError) and error.filename
            else str(error) or type(error).__name__)
        what = "A message from %s" % sender if sender is not None else "A receipt"
        self.show("\u2717 %s could not be saved or shown (%s); it stays on the server and comes again at your next "
                  "login." % (what, reason))

    async def receipt_received(self, receipt):
        """
        Show what became of a message, naming it (L{describe_receipt}), and record it in the history.  Receipts of
        messages sent before this chat started that the server pushes at login are gathered into one line.
        """
        store = self.session.store
        if store is None:
            raise ConnectionLost()  # quitting: not acknowledged, so the server keeps it for the next session
        ref, preview = await store.sent_message(receipt.message_id)
        delivery = await self._client.group_delivery(receipt.message_id)
        if delivery is not None:
            await self._group_receipt(receipt, ref, preview, delivery)
            return
        old = await store.history_status(receipt.message_id)
        if ref is None and old is not None and old.startswith(SENT_FROM) and \
                old.split("\n")[1:2] == [GROUP_RECEIPTS_THERE]:
            # A group message sent from another device: one member's receipt is no count of who has it; the device
            # that sent it shows the count, so a delivery is not a line here either (a refusal still is).
            if receipt.status != "delivered":
                self.show(describe_receipt(receipt, ref, preview))
            return
        await store.set_history_status(receipt.message_id, _with_receipt(old, receipt))
        if self._gathering and not self._closing and receipt.message_id not in self.outbox.sent:
            self._old_receipts.append((receipt, ref, preview))
            if self._receipts_quiet is not None and self._receipts_quiet.active():
                self._receipts_quiet.reset(RECEIPTS_AT_LOGIN_QUIET)
        else:
            self.show(describe_receipt(receipt, ref, preview))

    async def _group_receipt(self, receipt, ref, preview, delivery):
        """
        A receipt of a group message: the history says how many members have it; a delivery joins the message's
        tick (L{GroupTicks}: C{\u2713 3/5}), a refusal or an expiry is a line of its own, as for a 1:1 message.
        """
        group, members, receipts = delivery
        name = group.name if group is not None else "(a group you left)"
        members = [m for m in members if m != self.session.user]
        delivered = sum(1 for u, r in receipts.items() if r[0] == "delivered" and u in members)
        refused = sorted(u for u, r in receipts.items() if r[0] != "delivered" and u in members)
        # The history's line names the group by its name then: the status does not (a rename would make it wrong).
        status = "delivered to %d of %d" % (delivered, len(members)) + (
            "; not to %s" % ", ".join(refused) if refused else "")
        await self.session.store.set_history_status(receipt.message_id, status)
        if self._gathering and not self._closing and receipt.message_id not in self.outbox.sent:
            self._old_receipts.append((receipt, ref, preview, name))
            if self._receipts_quiet is not None and self._receipts_quiet.active():
                self._receipts_quiet.reset(RECEIPTS_AT_LOGIN_QUIET)
        elif receipt.status == "delivered":
            self.ticks.delivered(receipt.message_id, name, delivered, len(members), ref, preview)
        else:
            self.show(describe_receipt(receipt, ref, preview))

    def _summarise_receipts(self):
        self._gathering = False
        items, self._old_receipts = self._old_receipts, []
        if items:
            self.show(summarise_receipts(items, self.reactor.seconds()))

    def message_rejected(self, msg, sender, error):
        self.show("\u2717 A message from %s could not be opened and was refused: %s" % (sender, error.message))

    def disconnected(self, error):
        if self._closing:
            return
        # Not one of the commands that quitting waits for: quitting stops it instead.
        Deferred.fromCoroutine(self._reconnect()).addErrback(self._reconnect_failed)

    def _reconnect_failed(self, failure):
        """
        Reconnecting stopped for good: another server at the address, one this client cannot talk to, or a key
        this machine can no longer use.  The chat ends, and the command with that error's sentence and exit code.
        """
        if failure.check(Cancelled):
            return
        if not failure.check(PagerError):
            self._failed(failure)
            return
        self.ended_by = failure.value
        self.quit()

    async def _reconnect(self):
        await self.session.reconnect(self.show)
        self.show("Reconnected.")
        self._logged_in()


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


class _ScreenText:
    """The text stream of the raw-mode chat screen: the terminal is raw, so each line ends with CR LF."""

    def __init__(self, transport):
        self.transport = transport

    def write(self, text):
        self.transport.write(text.replace("\n", "\r\n").encode("utf-8"))

    def flush(self):
        pass


def _char_width(c):
    """The screen columns one character takes: 0 for a combining mark, 2 for a wide (East Asian) character."""
    import unicodedata
    shown = SafeWriter.clean(c)
    if shown != c:
        return len(shown)  # an unsafe character is shown as its visible escape
    if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


class LineEditor:
    """
    The line being typed in the raw-mode chat screen, apart from the terminal: its characters, the cursor (an index
    into them; L{columns} turns it into screen columns, wide characters counting two), the kill commands and the
    history of lines entered, browsed with L{up} and L{down}.
    """

    HISTORY = 500  # lines kept for Up/Down

    def __init__(self):
        self.chars = []
        self.cursor = 0
        self.history = []
        self._browsing = None  # the history index shown, or None while editing a new line
        self._draft = ""  # the new line set aside while browsing

    @property
    def text(self):
        return "".join(self.chars)

    def columns(self, start=0, end=None):
        """The screen columns the characters from C{start} to C{end} take."""
        return sum(_char_width(c) for c in self.chars[start:end])

    def set(self, text):
        self.chars = list(text)
        self.cursor = len(self.chars)

    def insert(self, text):
        self.chars[self.cursor:self.cursor] = list(text)
        self.cursor += len(text)

    def _previous(self):
        """Where the character before the cursor starts, with the combining marks that follow it."""
        at = max(0, self.cursor - 1)
        while at and _char_width(self.chars[at]) == 0:
            at -= 1
        return at

    def _next(self):
        """Where the character after the cursor ends, with the combining marks that follow it."""
        at = min(len(self.chars), self.cursor + 1)
        while at < len(self.chars) and _char_width(self.chars[at]) == 0:
            at += 1
        return at

    def left(self):
        self.cursor = self._previous()

    def right(self):
        self.cursor = self._next()

    def home(self):
        self.cursor = 0

    def end(self):
        self.cursor = len(self.chars)

    def backspace(self):
        start = self._previous()
        del self.chars[start:self.cursor]
        self.cursor = start

    def delete(self):
        del self.chars[self.cursor:self._next()]

    def kill_start(self):
        """Ctrl-U: delete from the start of the line to the cursor."""
        del self.chars[:self.cursor]
        self.cursor = 0

    def kill_end(self):
        """Ctrl-K: delete from the cursor to the end of the line."""
        del self.chars[self.cursor:]

    def kill_word(self):
        """Ctrl-W: delete the word before the cursor and the spaces after it."""
        start = self.cursor
        while start and self.chars[start - 1].isspace():
            start -= 1
        while start and not self.chars[start - 1].isspace():
            start -= 1
        del self.chars[start:self.cursor]
        self.cursor = start

    def up(self):
        if self._browsing is None:
            if not self.history:
                return
            self._draft, self._browsing = self.text, len(self.history)
        if self._browsing:
            self._browsing -= 1
            self.set(self.history[self._browsing])

    def down(self):
        if self._browsing is None:
            return
        self._browsing += 1
        if self._browsing < len(self.history):
            self.set(self.history[self._browsing])
        else:
            self._browsing = None
            self.set(self._draft)

    def clear(self):
        self.chars, self.cursor, self._browsing = [], 0, None

    def take(self):
        """The line entered (Enter): remembered in the history unless empty or the same as the last one."""
        text = self.text
        if text.strip() and (not self.history or self.history[-1] != text):
            self.history = (self.history + [text])[-self.HISTORY:]
        self.clear()
        return text


# What the raw-mode screen reads: the escape sequences terminals send for keys (xterm's, and the VT220 "~" forms),
# and the markers of bracketed paste mode, in which the terminal wraps pasted text so that it is not taken as typing.
_KEY_SEQUENCES = {
    b"[A": "up", b"OA": "up", b"[B": "down", b"OB": "down", b"[C": "right", b"OC": "right",
    b"[D": "left", b"OD": "left", b"[H": "home", b"OH": "home", b"[1~": "home", b"[7~": "home",
    b"[F": "end", b"OF": "end", b"[4~": "end", b"[8~": "end", b"[3~": "delete", b"[200~": "paste",
}
_CONTROL_KEYS = {
    b"\x01": "home", b"\x02": "left", b"\x03": "interrupt", b"\x04": "eof", b"\x05": "end", b"\x06": "right",
    b"\x08": "backspace", b"\x0b": "kill_end", b"\x0c": "redraw", b"\x0d": "enter", b"\x0a": "enter",
    b"\x0e": "down", b"\x10": "up", b"\x15": "kill_start", b"\x17": "kill_word", b"\x7f": "backspace",
}
BRACKETED_PASTE_ON, BRACKETED_PASTE_OFF = b"\x1b[?2004h", b"\x1b[?2004l"
PASTE_END = b"\x1b[201~"
MAX_PASTE = 1024 * 1024  # bytes of one paste kept; past it the paste is refused with a sentence
MAX_ESCAPE = 32  # bytes of an escape sequence read before an unfinished one is dropped
ESCAPE_WAIT = 0.05  # seconds a lone ESC waits for the rest of an escape sequence before it counts as the Esc key


class ChatScreen(protocol.Protocol):
    """
    The chat in a raw-mode terminal (standard input and output through L{stdio.StandardIO}): reads keys, edits the
    line with a L{LineEditor} and draws it after the prompt, shows incoming text above it, and hands a bracketed
    paste to the chat as one event (L{Chat.paste}).  It writes its own escape sequences (erase the line, move the
    cursor, bracketed paste on and off); every text it shows or prompts with goes through a L{SafeWriter}.

    Ctrl-C clears the line; a second Ctrl-C on the empty line, or Ctrl-D on an empty line, leaves.
    """

    def __init__(self, chat, reactor=None, width=None):
        self.chat = chat
        self.reactor = reactor if reactor is not None else chat.reactor
        self.width = width  # screen columns, or None to ask the terminal at each draw
        self.editor = LineEditor()
        self.prompt = "to> "
        self._pending = b""  # the bytes of an unfinished escape sequence
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._escape_timer = None
        self._paste = None  # the bytes of a paste being received
        self._armed = False  # the last key was a Ctrl-C that left the line empty
        self._stray = False  # a key other than an answer was typed while the chat asks about a paste
        self._offset = 0  # the first character shown, when the line is wider than the screen
        self.closed = False

    # -- wiring --

    def connectionMade(self):
        self.out = SafeWriter(_ScreenText(self.transport))
        self.chat.attach(self)
        self._draw()

    def connectionLost(self, reason):
        self._cancel_escape_timer()
        self.closed = True
        self.chat.quit()

    def set_prompt(self, text):
        self.prompt = text
        if not self.closed:
            self._draw()

    def show(self, text):
        """Show C{text} above the line being typed, which is drawn again after it, as it was."""
        self.transport.write(b"\r\x1b[K")
        self.out.write(text + "\n")
        if not self.closed:
            self._draw()

    def leave(self):
        """Leave the chat: the prompt line is erased, nothing is drawn again."""
        if not self.closed:
            self.closed = True
            self.transport.write(b"\r\x1b[K")
            self.chat.quit()

    # -- drawing --

    def _columns(self):
        if self.width is not None:
            return self.width
        try:
            columns = os.get_terminal_size(1).columns
        except OSError:
            columns = 0
        return columns or 80  # a terminal that does not say its size (0) is taken to be 80 wide

    def _draw(self):
        """Draw the prompt and the line, scrolled sideways if it is wider than the screen, with the cursor in it."""
        editor = self.editor
        prompt = SafeWriter.clean(self.prompt)
        room = max(self._columns() - len(prompt) - 1, 8)
        self._offset = min(self._offset, editor.cursor)
        while editor.columns(self._offset, editor.cursor) > room:
            self._offset += 1
        end = self._offset
        while end < len(editor.chars) and editor.columns(self._offset, end + 1) <= room:
            end += 1
        self.transport.write(b"\r\x1b[K")
        self.out.write(prompt + "".join(editor.chars[self._offset:end]))
        back = editor.columns(editor.cursor, end)
        if back:
            self.transport.write(b"\x1b[%dD" % back)

    # -- reading --

    def dataReceived(self, data):
        self._cancel_escape_timer()
        data = self._pending + data
        self._pending = b""
        while data and not self.closed:
            if self._paste is not None:
                data = self._paste_data(data)
                continue
            if data[:1] == b"\x1b":
                key, data = self._escape(data)
                if key is None:  # unfinished: wait for the rest
                    self._pending = data
                    self._escape_timer = self.reactor.callLater(ESCAPE_WAIT, self._lone_escape)
                    return
                self.key(key)
            elif data[0] < 0x20 or data[0] == 0x7f:
                self.key(_CONTROL_KEYS.get(data[:1], "ignored"))
                data = data[2:] if data[:2] == b"\r\n" else data[1:]  # CR LF (from a pipe-like paste): one Enter
            else:
                end = 1
                while end < len(data) and data[end] >= 0x20 and data[end] != 0x7f:
                    end += 1
                chars = self._decoder.decode(data[:end])  # holds a character split between two reads
                data = data[end:]
                if chars:
                    self.typed(chars)

    def _escape(self, data):
        """The key an escape sequence at the start of C{data} stands for, and the rest; (None, data) if unfinished."""
        if len(data) == 1:
            return None, data
        if data[1:2] == b"O":  # SS3: one final byte
            if len(data) == 2:
                return None, data
            return _KEY_SEQUENCES.get(data[1:3], "ignored"), data[3:]
        if data[1:2] != b"[":
            return "escape", data[1:]  # Esc alone, or Alt with a key: the key is read next
        end = 2  # CSI: parameter and intermediate bytes, then one final byte
        while end < len(data) and 0x20 <= data[end] <= 0x3f:
            end += 1
        if end == len(data):
            return (None, data) if end < MAX_ESCAPE else ("ignored", b"")
        return _KEY_SEQUENCES.get(data[1:end + 1], "ignored"), data[end + 1:]

    def _lone_escape(self):
        self._escape_timer = None
        data, self._pending = self._pending, b""
        self.key("escape")
        if data[1:]:
            self.dataReceived(data[1:])

    def _cancel_escape_timer(self):
        if self._escape_timer is not None:
            if self._escape_timer.active():
                self._escape_timer.cancel()
            self._escape_timer = None

    def _paste_data(self, data):
        """Gather pasted bytes up to the end marker; then hand the paste on.  Returns the bytes after it."""
        end = data.find(PASTE_END)
        if end < 0:
            keep = len(data) - (len(PASTE_END) - 1)  # the end marker may be split between two reads
            self._paste += data[:max(keep, 0)]
            rest = data[max(keep, 0):]
            self._paste = self._paste[:MAX_PASTE + 1]  # past the bound only the fact that it is too long is kept
            self._pending = rest
            return b""
        self._paste += data[:end]
        paste, self._paste = self._paste, None
        self.pasted(paste)
        return data[end + len(PASTE_END):]

    # -- what keys do --

    PASTE_ANSWERS = "(the paste is waiting for an answer, and what you typed was not used: y sends it, n drops it)"

    def _answer(self, yes):
        self._stray = False
        self.chat.confirm(yes)

    def typed(self, chars):
        if self.chat.confirming is not None:
            if chars.lower() in ("y", "n"):
                self._answer(chars.lower() == "y")
            elif not self._stray:
                # Typed as if the question were not there (/quit, say): what follows must not answer it by chance.
                self._stray = True
                self.show(self.PASTE_ANSWERS)
            return
        self._armed = False
        self.editor.insert(chars)
        self._draw()

    def key(self, name):
        """Act on a named key (see L{_KEY_SEQUENCES} and L{_CONTROL_KEYS})."""
        editor = self.editor
        if name == "paste":
            self._paste = b""
            return
        if self.chat.confirming is not None:
            if name == "enter" and self._stray:
                self.show(self.PASTE_ANSWERS)  # Enter after other keys is no answer: the keys were not one
            elif name in ("enter", "escape", "interrupt", "eof"):
                self._answer(name == "enter")
            return
        armed, self._armed = self._armed, False
        if name == "interrupt":
            if not editor.chars and armed:
                self.leave()
                return
            if not editor.chars:
                self.show("(Ctrl-C again, Ctrl-D or /quit to leave)")
            editor.clear()
            self._armed = True
        elif name == "eof":
            if not editor.chars:
                self.leave()
                return
            editor.delete()
        elif name == "enter":
            self._enter()
            return
        elif name in ("left", "right", "home", "end", "backspace", "delete", "up", "down",
                      "kill_start", "kill_end", "kill_word"):
            getattr(editor, name)()
        elif name != "redraw":
            return  # a key the chat has no use for
        self._draw()

    def _enter(self):
        editor = self.editor
        editor.end()
        self._draw()
        self.transport.write(b"\r\n")
        self._offset = 0
        self.chat.line(editor.take())
        if not self.closed and not self.chat.closing:  # no prompt once the line has made the chat quit
            self._draw()

    def pasted(self, data):
        """
        A bracketed paste: text of several lines goes to the chat as one event (L{Chat.paste}), never line by line;
        text without a line break is inserted at the cursor, to be edited and sent with Enter.
        """
        if len(data) > MAX_PASTE:
            self.show("The paste was not used: it is over %s; send it with /file." % _size_text(MAX_PASTE))
            return
        text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
        if "\n" in text:
            self.chat.paste(text)
        elif text:
            self.typed("".join(" " if c == "\t" else c for c in text if c == "\t" or c >= " "))


def stop_on_hangup(reactor):
    """
    Make SIGHUP stop the reactor, as Twisted makes SIGINT and SIGTERM do, instead of killing the process at once:
    a command ends through its usual way out (the terminal given back, one sentence, exit 130).
    """
    import signal

    def hangup(signum, frame):
        reactor.callFromThread(lambda: reactor.running and reactor.stop())
    signal.signal(signal.SIGHUP, hangup)


class TerminalGuard:
    """
    Gives the terminal back as it was found, on every way out of a command that reads from it: the modes saved at
    the start (echo and canonical mode, which a prompt for a secret or the raw-mode chat turn off) are set again,
    and bracketed paste is turned off, when the command ends, when the reactor stops (Ctrl-C at a prompt, SIGTERM,
    and SIGHUP, which the guard makes stop the reactor too) and at exit, whatever thread was reading at the time.
    """

    _installed = None  # the process's guard, once one is installed

    def __init__(self, fd=0, out=1):
        import termios
        self.fd, self.out = fd, out
        self.saved = termios.tcgetattr(fd)
        self.raw_mode = False
        self.question_open = False  # a prompt is waiting for its answer: a way out ends its line first

    @classmethod
    def install(cls, reactor, fd=0):
        """The process's guard (made at the first call), or None when C{fd} is not a terminal."""
        if cls._installed is None and os.isatty(fd):
            import atexit
            guard = cls._installed = cls(fd)
            reactor.addSystemEventTrigger("after", "shutdown", guard.restore)
            atexit.register(guard.restore)
            stop_on_hangup(reactor)
        return cls._installed

    def raw(self):
        """Raw mode with bracketed paste, for the chat screen."""
        import tty
        tty.setraw(self.fd)
        self.raw_mode = True
        self._write(BRACKETED_PASTE_ON)

    def restore(self):
        import termios
        if self.raw_mode:
            self.raw_mode = False
            self._write(b"\r\x1b[K" + BRACKETED_PASTE_OFF)  # the prompt line erased: nothing drawn after leaving
        if self.question_open:
            self.question_open = False
            self._write(b"\r\n")
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
        except (termios.error, OSError):
            pass  # the terminal hung up: there is nothing left to restore

    def _write(self, data):
        try:
            if os.isatty(self.out):
                os.write(self.out, data)
        except OSError:
            pass


class PlainChat(LineReceiver):
    """The chat when standard input is not a terminal: plain lines in, plain lines out, no prompts."""

    delimiter = b"\n"

    def __init__(self, chat, out=None):
        self.chat = chat
        self.out = SafeWriter.wrap(out or sys.stdout)

    def connectionMade(self):
        self.chat.attach(self)

    def lineReceived(self, line):
        self.chat.line(line.decode("utf-8", "replace").rstrip("\r"))

    def set_prompt(self, text):
        pass

    def show(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    def connectionLost(self, reason):
        self.chat.end_of_input()  # the lines read before the end are handled first


NOTHING_TO_SEND = "Nothing to send: the message is empty."


#### Command line ####

class NotDelivered(PagerError):
    """The message was not delivered."""

    code = "not_delivered"


class UnknownDevice(PagerError):
    """No device of the user has that id or name."""

    code = "unknown_device"


EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_AUTH, EXIT_UNKNOWN_USER, EXIT_KEY_TRUST, EXIT_NETWORK, EXIT_LOCAL = range(8)
EXIT_INTERRUPTED = 130  # stopped by SIGINT, SIGTERM or SIGHUP before the command finished


def _print_version(options):
    """Print the version and exit."""
    print("pager", __version__)
    sys.exit(EXIT_OK)


# Twisted wraps option help with textwrap, which also breaks a line after a hyphen ("link-" ending one line, "device"
# starting the next).  pager's help names commands and options that have hyphens: its lines break at spaces only.
usage.textwrap = types.SimpleNamespace(wrap=functools.partial(textwrap.wrap, break_on_hyphens=False))


class _GnuOptions(usage.Options):
    """Options that may follow the positional arguments (C{send HOST --to bob}), as GNU tools allow."""

    opt_version = _print_version

    def parseOptions(self, options=None):
        """Allow options after the positional arguments (C{send HOST --to bob}), as GNU tools do."""
        import getopt
        options = sys.argv[1:] if options is None else options
        try:
            opts, args = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e))
        ordered = []
        for opt, value in opts:
            takes_value = (opt[2:] + "=") in self.longOpt if opt.startswith("--") else (opt[1] + ":") in self.shortOpt
            ordered += [opt, value] if takes_value else [opt]
        super().parseOptions(ordered + ["--"] + args)



_LIMIT_OPTIONS = [
    # (option, Limits field, type, help)
    ("max-line-unauthenticated", "max_line_unauthenticated", int,
     "Longest line, in bytes, before login (12288 to --max-line)."),
    ("max-line", "max_line", int, "Longest line, in bytes, after login (at least 96 KiB: one chunk frame)."),
    ("max-message", "max_message", int, "Largest message, in plaintext bytes."),
    ("max-pending-messages", "max_pending_messages", int, "Pending messages per recipient."),
    ("max-pending-bytes", "max_pending_bytes", int, "Pending plaintext bytes per recipient."),
    ("login-timeout", "login_timeout", float, "Seconds a connection may stay unauthenticated."),
    ("idle-timeout", "idle_timeout", float, "Seconds without a frame before a connection is closed."),
    ("message-expiry", "message_expiry", float, "Seconds an undelivered message is kept."),
    ("max-in-flight", "max_in_flight", int, "Requests one connection may have outstanding."),
    ("argon2-concurrency", "argon2_concurrency", int, "Argon2id token hashes computed at once."),
    ("argon2-queue", "argon2_queue", int, "Logins that may wait for a hash before rate_limited."),
    ("argon2-per-account", "argon2_per_account", int, "Token hashes one account may have running or waiting."),
    ("argon2-per-address", "argon2_per_address", int, "Token hashes one IP address may have running or waiting."),
    ("recovery-interval", "recovery_interval", float, "Seconds between two lost-key recoveries of one account."),
    ("rekey-interval", "rekey_interval", float, "Seconds after a re-key before the account may re-key again."),
    ("max-connections-per-address", "max_connections_per_address", int, "Connections open at once from one IP."),
    ("account-free-failures", "account_free_failures", int,
     "Wrong tokens for one account from one address before waits begin."),
    ("account-max-delay", "account_max_delay", float,
     "Longest wait, in seconds, imposed on one account at one address."),
    ("address-free-failures", "address_free_failures", int, "Failed logins from one address before waits begin."),
    ("address-max-delay", "address_max_delay", float, "Longest wait, in seconds, imposed on one address."),
    ("max-sender-pending-messages", "max_sender_pending_messages", int,
     "Messages one sender may have stored and not yet delivered, over all recipients."),
    ("max-sender-pending-bytes", "max_sender_pending_bytes", int,
     "Plaintext bytes one sender may have stored and not yet delivered."),
    ("max-pending-receipts", "max_pending_receipts", int,
     "Receipts stored for one user and not yet acknowledged; past it the oldest are dropped."),
    ("max-open-uploads", "max_open_uploads", int, "Multi-frame uploads one user may have open at once."),
    ("upload-idle-timeout", "upload_idle_timeout", float,
     "Seconds an upload may wait for its next chunk frame before it is dropped."),
    ("max-db-bytes", "max_db_bytes", int,
     "The database's budget in bytes (pages in use plus open uploads); past it sends get storage_full."),
    ("account-check-interval", "account_check_interval", float,
     "Seconds between checks that close the sessions of accounts deleted or re-keyed by 'admin'."),
    ("max-unread-output", "max_unread_output", int,
     "Bytes of answers a connection that stopped reading may leave unread before it is cut off (at least "
     "--max-line)."),
    ("close-grace", "close_grace", float, "Seconds a connection the server closes may still read before it is cut off."),
    ("max-devices", "max_devices", int,
     "Devices one account may have, not counting revoked ones (with them, 4 times as many, at most 256)."),
    ("bundle-rate", "bundle_rate", float,
     "Prekey bundle requests per second one account may make (after a burst of %d)." % BUNDLE_BURST),
    ("max-group-members", "max_group_members", int,
     "Members one group may have, its creator included (at most %d: the names one group message holds)."
     % DEFAULT_MAX_GROUP_MEMBERS),
    ("max-groups", "max_groups", int, "Groups one user may be a current member of."),
    ("group-fanout-rate", "group_fanout_rate", float,
     "Member devices per second one account's group messages may reach (after a burst of %d)." % GROUP_FANOUT_BURST),
]
MIN_MAX_LINE = 96 * 1024


def _endpoint_escape(text):
    """Escape a value for a Twisted endpoint string, where ':', '=' and '\\' are special."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _positive(kind, option=None, zero=False):
    """An option's coercer to a positive finite number (with C{zero}, 0 too), whose error names the option."""
    rule = "a finite number, 0 or more" if zero else "a positive finite number"

    def coerce(value):
        what = "%s must be %s, not %r" % (option, rule, value) if option else "must be %s" % rule
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(what)
        if not math.isfinite(number) or number < 0 or number == 0 and not zero:
            raise ValueError(what)
        return number
    coerce.coerceDoc = "Must be a number, 0 or more." if zero else "Must be a positive number."
    return coerce


class ServerOptions(_GnuOptions):
    synopsis = "[--listen ENDPOINT] [--db PATH]"  # and the limits: under Options
    longdesc = ("Run a pager server: it routes and stores end-to-end encrypted messages it cannot read. "
                "Logs go to standard error (or twistd's log).")
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN,
         "Where to listen: a Twisted server endpoint string. tcp:PORT listens on every interface; add "
         ":interface=127.0.0.1 for this machine only, and keep :backlog=1024 (without it the queue of "
         "connections not yet accepted holds only 50). For TLS, add --tls-cert and --tls-key, or give an "
         "ssl: endpoint with privateKey= and certKey=."],
        ["db", "d", DEFAULT_DB, "SQLite database file (created if missing)."],
        ["tls-cert", None, None, "Serve TLS with this certificate (PEM; e.g. from 'pager-cli make-cert'). "
                                 "Turns a tcp: --listen into ssl: on the same port."],
        ["tls-key", None, None, "The private key (PEM) of --tls-cert."],
        ["registration", None, Limits.registration, "Who may register: open, invite (needs a code from "
                                                    "'pager-cli admin invite') or closed."],
    ] + [[name, None, getattr(Limits, field), text, _positive(kind, "--" + name)]
         for name, field, kind, text in _LIMIT_OPTIONS]
    optFlags = [["no-recovery", None, "Refuse lost-key recovery with the safetoken alone."],
                ["signatures-in-process", None, "Check the signatures of messages in the server's own process, not in "
                                                "its signature checker process (which puts the checks on another "
                                                "core; on a machine with one core it only adds a pipe)."]]

    def postOptions(self):
        values = {field: self[name] for name, field, _, _ in _LIMIT_OPTIONS}
        if values["max_line"] < MIN_MAX_LINE:
            raise usage.UsageError("--max-line must be at least %d bytes to carry one chunk frame." % MIN_MAX_LINE)
        if not 12 * 1024 <= values["max_line_unauthenticated"] <= values["max_line"]:
            raise usage.UsageError("--max-line-unauthenticated must be from 12288 bytes (a register request) to "
                                   "--max-line.")
        if values["max_unread_output"] < values["max_line"]:
            raise usage.UsageError("--max-unread-output must be at least --max-line: one frame must fit.")
        if values["max_group_members"] > DEFAULT_MAX_GROUP_MEMBERS:
            raise usage.UsageError("--max-group-members is at most %d: a group message names at most that many"
                                   " users." % DEFAULT_MAX_GROUP_MEMBERS)
        if self["registration"] not in ("open", "invite", "closed"):
            raise usage.UsageError("--registration is open, invite or closed.")
        directory = os.path.dirname(os.path.abspath(self["db"]))
        if not os.path.isdir(directory):
            raise usage.UsageError("--db %s: there is no directory %s (create it first)." % (self["db"], directory))
        self.limits = Limits(allow_recovery=not self["no-recovery"], registration=self["registration"], **values)
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together.")
        if self["tls-cert"]:
            for name in ("tls-cert", "tls-key"):
                if not os.path.isfile(self[name]):
                    raise usage.UsageError("--%s %s: no such file." % (name, self[name]))
            listen = self["listen"]
            if not listen.startswith("tcp:"):
                raise usage.UsageError("--tls-cert needs a tcp: --listen (or give an ssl: endpoint instead).")
            self["listen"] = "ssl:%s:privateKey=%s:certKey=%s" % (
                listen[4:], _endpoint_escape(self["tls-key"]), _endpoint_escape(self["tls-cert"]))
        from twisted.internet import reactor
        try:
            server_endpoint(reactor, self["listen"])
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError("--listen %r is not a server endpoint string: %s" % (self["listen"], e))
        except OSError as e:
            raise usage.UsageError("--listen %r: cannot read %s: %s." % (self["listen"], e.filename, e.strerror))
        except Exception as e:  # pyOpenSSL's errors for a certificate or key it cannot load
            if self["tls-cert"]:  # said in the options the user gave, not in the endpoint made of them
                reason = ("the key is not the certificate's." if "do not match" in str(e) else
                          "is each a PEM file, the certificate and its private key?")
                raise usage.UsageError("--tls-cert %s and --tls-key %s cannot be served: %s"
                                       % (self["tls-cert"], self["tls-key"], reason))
            raise usage.UsageError("--listen %r: the TLS certificate or key cannot be loaded (%s)."
                                   % (self["listen"], e))


_HOME_HELP = ("Directory for keys, pinned keys, known servers and history "
              "[default: $PAGER_HOME, else ~/.local/share/pager].")
_CA_HELP = ("With --tls: trust the server certificate signed by this CA (PEM file) instead of the system's trust "
            "store.")


class _ClientOptions(_GnuOptions):
    """Options every client command shares."""

    optParameters = [
        ["user", "u", None, "Your user name."],
        ["home", None, None, _HOME_HELP],
        ["token-file", None, None, "Read the safetoken from this file, which others must not read. Else "
                                   "$PAGER_TOKEN, else the one kept on this machine; else connect asks for it, "
                                   "and so does every other command that logs in with it on a terminal (standard "
                                   "input and error)."],
        ["passphrase-file", None, None, "Read the key passphrase from this file, which others must not read. Else "
                                        "$PAGER_PASSPHRASE; else connect asks for it, and so does every other "
                                        "command on a terminal (standard input and error)."],
        ["ca", None, None, _CA_HELP],
        ["skew-window", None, PagerClient.skew_window, "Flag a message whose signed time is further than this many "
                                                       "seconds from when the server accepted it.",
                  _positive(float, "--skew-window")],
    ]
    optFlags = [
        ["tls", None, "Connect with TLS, checking the server's certificate and host name."],
        ["no-history", None, "Do not keep a message history on this machine."],
        ["no-passphrase", None, "Store a new key without a passphrase (for unattended use; anyone who can read "
                                "the file can use the key)."],
    ]

    not_applicable = ()  # options above that a command has no use for: its --help does not list them
    option_help = {}  # what an option above does for this command, where that is not what its help says above

    def _gather_parameters(self):
        return self._applicable(super()._gather_parameters())

    def _gather_flags(self):
        return self._applicable(super()._gather_flags())

    def _applicable(self, gathered):
        """usage.Options' gathered options without those in L{not_applicable} (none of which has a short form)."""
        long_options, short, docs, settings, synonyms, dispatch = gathered
        long_options = [o for o in long_options if o.rstrip("=") not in self.not_applicable]
        docs.update((name, text) for name, text in self.option_help.items() if name in docs)
        for table in (docs, settings, synonyms, dispatch):
            for name in self.not_applicable:
                table.pop(name, None)
        return long_options, short, docs, settings, synonyms, dispatch

    def postOptions(self):
        if self["ca"] and not self["tls"]:
            raise usage.UsageError("--ca only makes sense with --tls.")
        parse_address(self["server"])


def _device_name_option(name):
    if name is not None and not valid_device_name(name):
        raise usage.UsageError(DEVICE_NAME_RULE)
    return name


_REGISTER = ["register", None, "If this machine has no key for the user on this server, make one and register "
                              "the user (or, if the name is taken, say so); without it that is an error (on a "
                              "terminal, a question, as connect asks)."]
_REGISTER_NAME = ["name", None, None, "With --register: the name this machine gets as a device of the account when "
                                      "it registers it (1 to %d bytes; a machine that has the key already keeps its "
                                      "name) [default: this machine's host name]." % MAX_DEVICE_NAME_BYTES]


def _register_name_option(options):
    """
    Check C{--name}, which names the device C{--register} makes of this machine (and is refused without it), and
    hand it to the session as its C{device-name} (L{Session.device_name}).
    """
    if options["name"] is not None and not options["register"]:
        raise usage.UsageError("--name only names this machine as a device being registered: give it with "
                               "--register.")
    options["device-name"] = _device_name_option(options["name"])


class ConnectOptions(_ClientOptions):
    synopsis = "[HOST[:PORT]] [options]"
    longdesc = ("Chat interactively: asks for the server (Enter = localhost), user name and the key's passphrase (the "
                "safetoken only when this machine does not keep it yet); on first use asks before making a key and "
                "registering (--register: without asking) and this device's name (--name), or, for an account that "
                "has its key elsewhere, offers to link this machine as a new device (see link-device) or to re-key "
                "the account. Type '/help' once "
                "connected. In a terminal the line is edited as in a shell (Ctrl-A/E/U/W/K, arrows, Up/Down for "
                "history); Ctrl-C clears the line, a second Ctrl-C or Ctrl-D on an empty line leaves; a pasted block "
                "of lines is one message to the current conversation.")
    optFlags = [["register", None, "If this machine has no key for the user on this server and the server has no "
                                   "such account, make a key and register the user without asking; without it "
                                   "connect asks first (reading a pipe, it takes the pipe's first line for the "
                                   "answer: y registers). For an existing account it offers to link this machine "
                                   "either way."]]
    optParameters = [["name", None, None, "The name this machine gets as a device of the account when connect "
                                          "registers it or links it (1 to 64 bytes) [default: asked, offering this "
                                          "machine's host name]."]]

    def parseArgs(self, server=None):
        self["server"] = server

    def postOptions(self):
        self["name"] = _device_name_option(self["name"])
        if self["server"] is not None:
            super().postOptions()


STDIN_FILE_NAME = "stdin.bin"  # the name binary standard input is sent under


SEND_DELIVERY_TIMEOUT = 60.0  # seconds send --wait-delivered waits for every receipt when --timeout is not given


class SendOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME --to NAME,...|#GROUP [MESSAGE...]"  # its usage line fits 80 columns
    longdesc = ("Send a page and exit once the server has accepted it; prints the message id. Without MESSAGE, "
                "the message is read from standard input. Logs in send-only: never takes your incoming messages. "
                "A busy server (rate_limited, for the login or the message) is waited for, up to 60 s in all. "
                "--to '#ops' sends it to every member of the group #ops (quote the #: shells take it for a comment).")
    not_applicable = ("skew-window",)  # send receives no message
    optParameters = [
        ["to", "t", None, "Recipients, separated by commas, or one group: '#NAME'."],
        ["file", "f", None, "Send this file instead of a text message."],
        ["timeout", None, None, "With --wait-delivered: seconds to wait (60 if not given)",
         _positive(float, "--timeout")],
        _REGISTER_NAME,
    ]
    optFlags = [
        ["wait-delivered", "w", "Wait until every recipient's client has confirmed delivery (without it, no "
                                "receipt is asked for: the sender is not told of a delivery, refusal or expiry). "
                                "If the connection is lost meanwhile, exit 6 at once: the message was accepted, "
                                "whether it was delivered is unknown."],
        _REGISTER]

    def parseArgs(self, server, *message):
        self["server"] = server
        self["message"] = " ".join(message) if message else None

    def postOptions(self):
        super().postOptions()
        _register_name_option(self)
        if not self["to"]:
            raise usage.UsageError("Name the recipients with --to NAME[,NAME...] (or a group: --to '#NAME').")
        names = [n.strip() for n in self["to"].split(",") if n.strip()]
        self["group"] = None
        try:
            if any(n.startswith("#") for n in names):
                if len(names) > 1:
                    raise usage.UsageError(_one_group_only(names, "--to"))
                self["group"] = canonical_group_name(names[0])
            self["to"] = sorted({canonical_username(n) for n in names if not n.startswith("#")})
        except BadRequest as e:
            raise usage.UsageError(e.message)
        if self["group"] is not None:
            self["to"] = [group_label(self["group"])]
        if not self["to"]:
            raise usage.UsageError("Name the recipients with --to NAME[,NAME...].")
        if self["file"] and self["message"] is not None:
            raise usage.UsageError("Give either --file or a message, not both.")
        if self["file"] == "-":
            raise usage.UsageError("--file - is not standard input: to send standard input, give neither --file nor "
                                   "a message (bytes that are not text go as the file stdin.bin).")
        if self["timeout"] is not None and not self["wait-delivered"]:
            raise usage.UsageError("--timeout is how long --wait-delivered waits; without --wait-delivered, send "
                                   "does not wait for delivery at all.")
        if self["timeout"] is None:
            self["timeout"] = SEND_DELIVERY_TIMEOUT
        if self["message"] is not None:
            if not self["message"].strip():
                raise usage.UsageError(NOTHING_TO_SEND)
            try:
                self["message"].encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8, as the file system encoding carried them
                raise usage.UsageError("The message is not UTF-8 text; send bytes with --file FILE.")


class FetchOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--json] [--wait SECONDS]"
    longdesc = ("Print the messages waiting for you, and acknowledge each once it is printed (files are saved "
                "under your pager directory). A group's messages name the group (#ops alice: ...), and the changes "
                "to your groups verified meanwhile are lines of their own. Exits when they are all printed (or when "
                "none has come for 10 s), or after --wait more seconds with no new message.")
    optParameters = [
        ["wait", None, 0.0, "Keep waiting this many seconds for more messages; a connection lost meanwhile is "
                            "exit 6, a signal (SIGINT, SIGTERM, SIGHUP) exit 130.",
         _positive(float, "--wait", zero=True)], _REGISTER_NAME]
    optFlags = [["json", None, "Print one JSON object per message (with \"group\" for a group's), one per group "
                               "change (\"type\": \"group_change\") and one per receipt of a message you sent with "
                               "send --wait-delivered that came after it stopped waiting (\"type\": \"receipt\")."],
                _REGISTER]

    def parseArgs(self, server):
        self["server"] = server

    def postOptions(self):
        super().postOptions()
        _register_name_option(self)


class GroupOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME ACTION GROUP [ARGS...]"
    longdesc = ("Change or show a group (written #NAME; GROUP may be given with or without the #), one ACTION of "
                "those below. Changes are signed with your identity key, so they run on your identity device; "
                "adding, removing, renaming, the topic and admins are for the group's admins. A change that is so "
                "already changes nothing and says so (exit 0). 'pager-cli group ACTION --help' shows one action.")
    not_applicable = ("skew-window", "no-history", "no-passphrase")
    optFlags = [["off", None, "With admin: make USER no longer an admin (the same as the word off after USER)."],
                ["json", None, "With info: print one JSON object."]]

    def parseOptions(self, options=None):
        # The action named among the arguments, if any: --help then describes that action (before parseArgs runs).
        # Option values are not words: in "HOST --user bob leave ops --help" the action is leave.
        words, value_next = [], False
        for word in sys.argv[1:] if options is None else options:
            if value_next:
                value_next = False
            elif word.startswith("--"):
                value_next = "=" not in word and word[2:] + "=" in self.longOpt
            elif word.startswith("-") and len(word) == 2:
                value_next = word[1] + ":" in self.shortOpt
            elif not word.startswith("-"):
                words.append(word.lower())
        self._asked = next((w for w in words[:2] if w in GROUP_ACTIONS), None)
        super().parseOptions(options)

    def getSynopsis(self):
        action = getattr(self, "_asked", None)
        if action is not None:
            return group_usage(action, CLI_GROUP_PREFIX)
        return super().getSynopsis()

    def getUsage(self, width=None):
        action = getattr(self, "_asked", None)
        if action is not None:
            text = GROUP_ACTIONS[action][1].replace("#NAME", "#GROUP")
            return "%s.\n%s" % (text[0].upper() + text[1:], super().getUsage(width))
        return super().getUsage(width) + "\nActions:\n%s\n" % group_actions_text(CLI_GROUP_PREFIX, width)

    def parseArgs(self, server, action=None, group=None, *args):
        if action is None or group is None:
            raise usage.UsageError("Name an action and a group: %s." % group_usage(None, CLI_GROUP_PREFIX)[7:])
        self["server"], self["action"], self["group"], self["args"] = server, action.lower(), group, list(args)

    def postOptions(self):
        super().postOptions()
        action, args = self["action"], self["args"]
        if action not in GROUP_ACTIONS:
            raise usage.UsageError("No group action %s: %s" % (action, group_usage(None, CLI_GROUP_PREFIX)[7:]))
        if self["off"] and action != "admin":
            raise usage.UsageError("--off goes with admin.")
        if self["json"] and action != "info":
            raise usage.UsageError("--json goes with info.")
        wanted = {"leave": (0, 0), "info": (0, 0), "rename": (1, 1), "topic": (0, 1), "admin": (1, 2),
                  "add": (1, None), "remove": (1, None), "create": (0, None)}[action]
        if len(args) < wanted[0] or (wanted[1] is not None and len(args) > wanted[1]) or \
                (action == "admin" and args[1:] not in ([], ["off"])):
            hint = " (quote a topic with spaces)" if action == "topic" else ""
            raise usage.UsageError(group_usage(action, CLI_GROUP_PREFIX) + hint)


class GroupsOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--json]"
    longdesc = ("List your groups: name, members, whether you are an admin, and how many of their messages are "
                "unread (not yet seen in the chat with /to #NAME); groups you left or were removed from are listed "
                "as left.")
    not_applicable = ("skew-window", "no-history", "no-passphrase")
    optFlags = [["json", None, "Print one JSON object."]]

    def parseArgs(self, server):
        self["server"] = server


class UsersOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--json]"
    longdesc = "List the users online and registered."
    not_applicable = ("skew-window", "no-history")
    optFlags = [["json", None, "Print one JSON object."], _REGISTER]
    optParameters = [_REGISTER_NAME]

    def parseArgs(self, server):
        self["server"] = server

    def postOptions(self):
        super().postOptions()
        _register_name_option(self)


class ExportKeyOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME --out FILE"
    longdesc = ("Write your private key for this server to FILE (PKCS#12, encrypted with a passphrase you choose), "
                "to copy it to another machine with import-key.")
    not_applicable = ("token-file", "skew-window", "no-history")  # never logs in, sends or receives
    option_help = {"no-passphrase": "Write the file without a passphrase (anyone who can read it can use the key)."}
    optParameters = [["out", "o", None, "The file to write."]]

    def parseArgs(self, server):
        self["server"] = server

    def postOptions(self):
        super().postOptions()
        if not self["out"]:
            raise usage.UsageError("Name the file to write with --out FILE.")


class ImportKeyOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME FILE"
    longdesc = ("Install a private key on this machine: a file from export-key, or the unencrypted "
                "{username}_private_key.pem of the original pager. It first logs in with the key and the account's "
                "safetoken, so a key the server does not have registered for the user is refused; the safetoken is "
                "then kept with the key.")
    not_applicable = ("skew-window", "no-history")  # logs in send-only to check the key; sends and receives nothing
    option_help = {"no-passphrase": "Store the imported key without a passphrase on this machine (for unattended "
                                    "use; anyone who can read the file can use the key)."}
    optFlags = [["force", None, "Replace a key this machine already has for the user."]]

    def parseArgs(self, server, path):
        self["server"], self["file"] = server, path


class PasswdOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--new-passphrase-file FILE]"
    longdesc = ("Change the passphrase of your key for this server on this machine; the safetoken kept with it is "
                "re-encrypted under the new one. Nothing changes on the server. The current passphrase comes from "
                "a prompt, PAGER_PASSPHRASE or --passphrase-file; the new one from a prompt (twice) or "
                "--new-passphrase-file; --no-passphrase removes it.")
    # Changes a file on this machine, with the safetoken kept there: sends and receives nothing, takes no safetoken.
    not_applicable = ("token-file", "skew-window", "no-history")
    option_help = {"no-passphrase": "Remove the key's passphrase (for unattended use; anyone who can read the file "
                                    "can then use the key)."}
    optParameters = [
        ["new-passphrase-file", None, None, "Read the new passphrase from this file (which others must not read)."]]

    def parseArgs(self, server):
        self["server"] = server


class TokenOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--new-token-file FILE]"
    longdesc = ("Change your safetoken on the server (it needs the current one, kept on this machine or given as "
                "for any command); the new one is kept on this machine under your key's passphrase. Other "
                "machines ask for it once. The new safetoken comes from a prompt (twice) or --new-token-file.")
    not_applicable = ("no-passphrase", "skew-window", "no-history")  # makes no key, sends and receives no message
    optParameters = [
        ["new-token-file", None, None, "Read the new safetoken from this file (which others must not read)."]]

    def parseArgs(self, server):
        self["server"] = server


class _PeerOptions(_ClientOptions):
    not_applicable = ("no-passphrase", "skew-window", "no-history")  # makes no key, sends and receives no message

    def parseArgs(self, server, name):
        self["server"] = server
        try:
            self["name"] = canonical_username(name)
        except BadRequest as e:
            raise usage.UsageError(e.message)


class VerifyOptions(_PeerOptions):
    synopsis = "HOST[:PORT] --user NAME PEER [--fingerprint HEX]"
    longdesc = ("Mark PEER's key verified after comparing its fingerprint with PEER out of band (in person or by "
                "phone): shows the fingerprint and asks whether it matches, or, for scripts, checks it against "
                "--fingerprint. A key seen for the first time is pinned by verifying it; a changed key is accepted "
                "with trust first (verify refuses it, exit 5).")
    optParameters = [
        ["fingerprint", None, None, "The fingerprint PEER read to you (64 hex digits; spaces are ignored)."]]

    def postOptions(self):
        super().postOptions()
        if self["fingerprint"] is not None:
            digits = "".join(self["fingerprint"].split()).lower()
            if not re.fullmatch("[0-9a-f]{64}", digits):
                raise usage.UsageError("A fingerprint is 64 hex digits.")
            self["fingerprint"] = bytes.fromhex(digits)


class TrustOptions(_PeerOptions):
    synopsis = "HOST[:PORT] --user NAME PEER"
    longdesc = ("Pin the key the server now gives for PEER (after a key change, once you checked the new "
                "fingerprint), without marking it verified: for scripts, as the chat's /trust.")


class FingerprintOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [PEER] [--json]"
    longdesc = ("Show your key's fingerprint, or PEER's as the server gives it with its status on this machine: "
                "new (not pinned yet), pinned, verified or changed. Exits 5 when it changed.")
    not_applicable = ("no-passphrase", "skew-window", "no-history")  # makes no key, sends and receives no message
    optFlags = [["json", None, "Print one JSON object."]]

    def parseArgs(self, server, name=None):
        self["server"] = server
        try:
            self["name"] = canonical_username(name) if name is not None else None
        except BadRequest as e:
            raise usage.UsageError(e.message)


class LinkDeviceOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--name DEVICE_NAME] [CODE]"
    longdesc = ("Add a device (a laptop, a cron box) to your account, in two steps. On the NEW machine, without CODE: "
                "makes this machine's own key (under a new passphrase, as at registration), prints a one-time code "
                "and the command to run with it, and waits up to 10 minutes for the approval (Ctrl-C cancels, and "
                "then nothing is kept); once approved, the key is saved and this machine logs in as that device. On "
                "the machine that holds your key, with the CODE the new machine printed: shows the new device's "
                "name and id, asks to confirm (--yes for scripts) and approves it. Neither the server nor anyone "
                "without the code can add a device. The new device reads messages sent from then on.")
    not_applicable = ("skew-window", "no-history")
    option_help = {"no-passphrase": "Store the new device's key without a passphrase (for unattended use; anyone "
                                    "who can read the file can use the key)."}
    optParameters = [["name", None, None, "The new device's name, as its owner and contacts see it (1 to 64 bytes) "
                                          "[default: asked on a terminal, offering this machine's host name; in a "
                                          "script, the host name]; with CODE, the name to give the device instead "
                                          "of the one it asked for (one another current device has is refused)."]]
    optFlags = [["yes", "y", "With CODE: approve without asking (check the device's name and id first)."],
                ["force", None, "Without CODE: link this machine again with a new key though it already is a device "
                                "of the user (one that was revoked)."]]

    def parseArgs(self, server, code=None):
        self["server"], self["code"] = server, code

    def postOptions(self):
        super().postOptions()
        self["name"] = _device_name_option(self["name"])
        if self["code"] is not None:
            try:
                self["secret"] = parse_link_code(self["code"])
            except BadLinkCode:
                raise usage.UsageError("%r is not a link code: give the 16 letters and digits the new device shows, "
                                       "like 7K3M-Q2ZR-8D1X-VH4B." % self["code"])
            if self["force"]:
                raise usage.UsageError("--force goes with linking the new machine (without CODE).")
        elif self["yes"]:
            raise usage.UsageError("--yes goes with approving a device (with the CODE it shows).")


class RevokeDeviceOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME DEVICE [--yes]"
    longdesc = ("Remove one of your devices (a lost laptop), on the machine that holds your key: DEVICE is its id "
                "(as 'devices' lists it; an unambiguous start of it, at least 4 hex digits, is enough) or its name. "
                "Asks to confirm (--yes for scripts). The device can no longer log in, gets no new message, and "
                "your contacts' clients show that it was revoked. The identity device itself cannot be revoked.")
    not_applicable = ("no-passphrase", "skew-window", "no-history")
    optFlags = [["yes", "y", "Revoke without asking."]]

    def parseArgs(self, server, device):
        self["server"], self["device"] = server, device


class DevicesOptions(_ClientOptions):
    synopsis = "HOST[:PORT] --user NAME [--of USER] [--json]"
    longdesc = ("List your devices (or --of USER's), each certified by the user's identity key: name, id, when it "
                "was added, when it was last seen (your own devices only) and whether it was revoked.")
    not_applicable = ("no-passphrase", "skew-window", "no-history")
    optParameters = [["of", None, None, "List this user's devices instead of yours."]]
    optFlags = [["json", None, "Print one JSON object."]]

    def parseArgs(self, server):
        self["server"] = server

    def postOptions(self):
        super().postOptions()
        if self["of"] is not None:
            try:
                self["of"] = canonical_username(self["of"])
            except BadRequest as e:
                raise usage.UsageError(e.message)


class TrustServerOptions(_GnuOptions):
    synopsis = "HOST[:PORT] [--tls [--ca FILE]] [--id SERVER_ID]"
    longdesc = ("Accept the server id that HOST[:PORT] presents now, after its operator confirmed a deliberate move: "
                "a server rebuilt with a new database has a new id (one restored from backup keeps its id). Keys "
                "kept under the old id stay on this machine; a user with no key under the new id can then register "
                "there (--register, or connect). --id refuses unless the server presents exactly that id "
                "(ask the operator for it: the server logs it when it starts).")
    optParameters = [
        ["home", None, None, _HOME_HELP],
        ["ca", None, None, _CA_HELP],
        ["id", None, None, "The server id the operator gave you: refuse any other."],
    ]
    optFlags = [["tls", None, "The address is reached with TLS (known servers are told apart by TLS or not)."]]

    def parseArgs(self, server):
        self["server"] = server

    def postOptions(self):
        _ClientOptions.postOptions(self)
        if self["id"] is not None:
            self["id"] = "".join(self["id"].split()).lower()  # as pasted: spaces and case do not matter
            if not valid_server_id(self["id"]):
                raise usage.UsageError("A server id is %d hex digits, as the server logs it when it starts."
                                       % SERVER_ID_LENGTH)


class ForgetServerOptions(_GnuOptions):
    synopsis = "HOST[:PORT] [--tls]"
    longdesc = ("Forget which server id HOST[:PORT] presented (no connection is made): the next command remembers "
                "the id it presents then. Keys kept under the old id stay, and no new key is made at this address "
                "for a user who has one there; use trust-server to register anew on a rebuilt server.")
    optParameters = [["home", None, None, _HOME_HELP]]
    optFlags = [["tls", None, "The address is reached with TLS."]]

    def parseArgs(self, server):
        self["server"] = server

    def postOptions(self):
        parse_address(self["server"])


class MakeCertOptions(_GnuOptions):
    synopsis = "HOSTNAME [--ip ADDRESS]... [--out DIR] [--days N]"
    longdesc = ("Make a self-signed TLS certificate and key for a pager server (cert.pem and key.pem in --out). "
                "Serve them with 'twistd -n pager server --tls-cert cert.pem --tls-key key.pem'; clients trust "
                "them with 'pager-cli connect HOSTNAME --tls --ca cert.pem'.")
    optParameters = [
        ["out", "o", ".", "Directory to write cert.pem and key.pem to."],
        ["days", None, 825, "Days the certificate is valid.", _positive(int)],
    ]
    optFlags = [["force", None, "Replace a cert.pem or key.pem that --out already has."]]

    def __init__(self):
        super().__init__()
        self["ip"] = []

    def opt_ip(self, address):
        """An IP address clients may connect to (repeatable)."""
        try:
            self["ip"].append(ipaddress.ip_address(address))
        except ValueError:
            raise usage.UsageError("--ip %r is not an IP address." % address)

    def parseArgs(self, hostname):
        self["hostname"] = hostname


class _CommandOptions(usage.Options):
    """Options whose first argument must name one of their C{subCommands}."""

    opt_version = _print_version

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("Name a command: %s." % ", ".join(c[0] for c in self.subCommands))


class _AdminCommandOptions(_GnuOptions):
    """An admin command: takes C{--db} after its own name too (C{admin users --db X}), as GNU tools allow."""

    optParameters = [["db", "d", None, "The server's SQLite database [default: admin's --db]."]]

    def postOptions(self):
        if self["db"] is not None:
            self.parent["db"] = self["db"]


class AdminUsersOptions(_AdminCommandOptions):
    longdesc = "List users with key age, last recovery and pending messages."


class AdminDeleteUserOptions(_AdminCommandOptions):
    synopsis = "NAME"
    longdesc = "Delete a user, the messages waiting for them and their receipts."

    def parseArgs(self, name):
        self["name"] = name


class AdminResetKeyOptions(_AdminCommandOptions):
    synopsis = "NAME PUBLIC_KEY.pem"
    longdesc = ("Replace a user's key with the public key they sent you (after you checked its fingerprint with "
                "them): lost-key recovery that does not rest on the safetoken alone.")

    def parseArgs(self, name, path):
        self["name"], self["path"] = name, path


class AdminInviteOptions(_AdminCommandOptions):
    longdesc = "Create single-use invite codes for --registration invite."
    optParameters = [["count", "n", 1, "How many codes.", _positive(int)]]


class AdminBackupOptions(_AdminCommandOptions):
    synopsis = "DEST"
    longdesc = ("Write a consistent copy of the database to DEST with SQLite's online backup, safe while the server "
                "runs (copying the file alone can miss committed messages still in the WAL).")

    def parseArgs(self, dest):
        self["dest"] = dest


class AdminStatsOptions(_AdminCommandOptions):
    longdesc = "Counts of users, pending messages and receipts, and the database size."


class AdminOptions(_CommandOptions):
    optParameters = [["db", "d", DEFAULT_DB, "The server's SQLite database."]]

    @property
    def synopsis(self):
        return "[--db PATH]" if self.subCommand else "[--db PATH] COMMAND"

    longdesc = "Operator commands on a pager server's database (safe while the server runs)."
    subCommands = [
        ["users", None, AdminUsersOptions, "List users."],
        ["delete-user", None, AdminDeleteUserOptions, "Delete a user."],
        ["reset-key", None, AdminResetKeyOptions, "Replace a user's lost key."],
        ["invite", None, AdminInviteOptions, "Create invite codes."],
        ["backup", None, AdminBackupOptions, "Back up the database."],
        ["stats", None, AdminStatsOptions, "Show statistics."],
    ]


class Options(_CommandOptions):
    _LONGDESC = ("pager: a self-hosted, end-to-end encrypted messenger for the terminal and for scripts "
                "(also run as 'python pager.py COMMAND', 'python -m pager COMMAND' and 'twistd pager server'). "
                "'pager-cli COMMAND --help' describes each command. Exit codes: 0 success, 1 failure, 2 bad usage, "
                "3 authentication failed (safetoken, passphrase or key; no key for the user here without "
                "--register; a link code that matches no request; what needs the identity key run on a linked "
                "device) or a group change refused (not an admin, the last admin leaving, a full group), 4 unknown "
                "user or device (2 for an unknown group), 5 a user's key or the server's id changed and is not trusted, "
                "6 network failure, 7 a local file or directory cannot be used (read, written or understood), 130 "
                "interrupted before finishing.")
    _SUBCOMMANDS = [
        ["server", None, ServerOptions, "Run a pager server."],
        ["connect", None, ConnectOptions, "Chat interactively."],
        ["send", None, SendOptions, "Send a page (for scripts)."],
        ["fetch", None, FetchOptions, "Print waiting messages (for scripts)."],
        ["users", None, UsersOptions, "List users."],
        ["group", None, GroupOptions, "Create, change or show a group."],
        ["groups", None, GroupsOptions, "List your groups."],
        ["export-key", None, ExportKeyOptions, "Write your key to a file for another machine."],
        ["import-key", None, ImportKeyOptions, "Install a key from a file."],
        ["passwd", None, PasswdOptions, "Change your key's passphrase on this machine."],
        ["token", None, TokenOptions, "Change your safetoken on the server."],
        ["fingerprint", None, FingerprintOptions, "Show a key's fingerprint and whether it is verified."],
        ["verify", None, VerifyOptions, "Mark a user's key verified after comparing fingerprints."],
        ["trust", None, TrustOptions, "Accept a user's changed key."],
        ["devices", None, DevicesOptions, "List a user's devices."],
        ["link-device", None, LinkDeviceOptions, "Add a device to your account (run on both machines)."],
        ["revoke-device", None, RevokeDeviceOptions, "Remove one of your devices."],
        ["trust-server", None, TrustServerOptions, "Accept a server's new id at a known address."],
        ["forget-server", None, ForgetServerOptions, "Forget which server id an address presented."],
        ["make-cert", None, MakeCertOptions, "Make a self-signed TLS certificate for a server."],
        ["admin", None, AdminOptions, "Operator commands on the server's database."],
    ]

    _TWISTD_LONGDESC = ("pager's server, run by twistd: 'twistd pager server --help' lists its options. The "
                        "client's commands are pager-cli's ('pager-cli --help').")

    @property
    def subCommands(self):
        """Every command for C{pager-cli}; under twistd (which sets C{parent}) only C{server}, all it can run."""
        return self._SUBCOMMANDS if self.parent is None else self._SUBCOMMANDS[:1]

    @property
    def longdesc(self):
        """pager-cli's description, with the exit codes of its commands; under twistd, the server's alone."""
        return self._LONGDESC if self.parent is None else self._TWISTD_LONGDESC

    def parseOptions(self, options=None):
        """
        Under twistd, which would print its whole help page before a usage error and exit 1, the error is one
        sentence on standard error and the exit status 2 (bad usage), as with pager-cli.
        """
        if self.parent is None:
            return super().parseOptions(options)
        try:
            return super().parseOptions(options)
        except usage.UsageError as e:
            sys.exit(report(_usage_error(self, e, "twistd pager")))

    def getSynopsis(self):
        if self.parent is not None:  # under twistd
            return super().getSynopsis()
        return "Usage: pager-cli" if self.subCommand else "Usage: pager-cli COMMAND [options]"


# What a TLS 1.2 client may negotiate: ECDHE key exchange (forward secrecy) with an AEAD cipher.  Static-RSA key
# exchange and CBC suites are refused.  TLS 1.3 suites all qualify and are left as OpenSSL sets them.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"


def server_endpoint(reactor, description):
    """
    L{endpoints.serverFromString}, with an C{ssl:} endpoint's TLS context held to TLS 1.2 or newer and, in TLS 1.2,
    to L{TLS12_CIPHERS} (whatever C{sslmethod=} the description gives).
    """
    endpoint = endpoints.serverFromString(reactor, description)
    # Twisted's ssl: parser takes no cipher option; its endpoint keeps one CertificateOptions whose context (made
    # once, shared by every connection) we adjust here.
    options = getattr(endpoint, "_sslContextFactory", None)
    if options is not None:
        from OpenSSL import SSL
        context = options.getContext()
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(TLS12_CIPHERS)
    return endpoint


# The server's cyclic garbage collector thresholds (Python's are 700, 10, 10).  A busy server allocates a few hundred
# short-lived, acyclic objects a message, which reference counting frees; at the default it ran a collection every
# few messages, each walking every young object, and a full one (every live connection's objects) every few
# thousand: 4-10% of its CPU in the relay benchmark.  Cycles are still collected, later.
SERVER_GC_THRESHOLDS = (50000, 20, 100)


def makeService(options, reactor=None):
    """
    The pager server as a twistd service: C{options} is an L{Options} (from twistd) or a L{ServerOptions}.  Sets the
    process's garbage collector thresholds to L{SERVER_GC_THRESHOLDS}.
    """
    if reactor is None:
        from twisted.internet import reactor
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
    config = options.subOptions if isinstance(options, Options) else options
    store = Store(config["db"], reactor)
    factory = PagerServerFactory(store, config.limits, reactor)
    if not config["signatures-in-process"]:
        factory.signatures = SignatureChecker(reactor)
    endpoint = server_endpoint(reactor, config["listen"])
    under_twistd = isinstance(options, Options) and options.parent is not None
    return PagerService(endpoint, store, factory, config["listen"], exit_on_failure=under_twistd)


async def _serve(reactor, config):
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    server = makeService(config, reactor)
    server.startService()
    try:
        await server.ready
    except Exception:
        raise SystemExit(EXIT_FAILURE)  # PagerService logged the reason
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    await Deferred()  # serve until interrupted


def exit_code(error):
    """The documented exit code for an error a client command ends with."""
    if isinstance(error, Interrupted):
        return EXIT_INTERRUPTED
    if isinstance(error, (usage.UsageError, Cancelled, UnknownGroup)):
        return EXIT_USAGE
    if isinstance(error, (AuthFailed, KeyFileError, NoKey, GroupRefused)):
        return EXIT_AUTH
    if isinstance(error, (UnknownUser, UnknownDevice)):
        return EXIT_UNKNOWN_USER
    if isinstance(error, (KeyChanged, ServerChanged)):
        return EXIT_KEY_TRUST
    if isinstance(error, (NetworkError, ConnectionLost)):
        return EXIT_NETWORK
    if isinstance(error, LocalError):
        return EXIT_LOCAL
    return EXIT_FAILURE


def _debugging():
    """Whether PAGER_DEBUG asks for the traceback of an internal error (any value but empty or 0)."""
    return os.environ.get("PAGER_DEBUG", "") not in ("", "0")


def report(error, hint=""):
    """
    The one place where an error a command ends with becomes its sentence: write C{pager: SENTENCE} (and C{hint})
    to standard error, and return the documented exit code.  A L{PagerError}'s sentence is its message; a usage
    error's is its text.
    """
    sentence = error.message if isinstance(error, PagerError) else str(error)
    sentence = sentence.replace("Parameter type enforcement failed: ", "")  # usage.Options' prefix to a bad value
    if hint:
        sentence = "%s (%s)." % (sentence.rstrip("."), hint)
    sys.stderr.write("pager: %s\n" % sentence)
    return exit_code(error)


async def _connect_command(reactor, config):
    session = Session(reactor, dict(config, server=config["server"], **{"device-name": config["name"]}),
                      Prompter(reactor))
    if config["server"] is None:
        address = await session.prompter.ask("Server address [localhost]: ")
        session.host, session.port = parse_address(address)
    chat = Chat(session, reactor)
    await session.start(receive=True)
    stopping = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    guard = TerminalGuard.install(reactor)
    if guard is not None:
        from twisted.internet import stdio
        guard.raw()
        try:
            stdio.StandardIO(ChatScreen(chat, reactor), reactor=reactor)
            await chat.done
        finally:
            guard.restore()
    else:
        from twisted.internet import stdio
        stdio.StandardIO(PlainChat(chat), reactor=reactor)
        await chat.done
    if stopping:  # a signal (SIGINT, SIGTERM, SIGHUP) stopped the reactor, which closed the chat's input
        raise Cancelled("The chat was interrupted.")
    if chat.ended_by is not None:
        raise chat.ended_by


FETCH_SETTLE = 10.0  # seconds fetch waits for the next of the messages the login said were waiting


def _read_stdin():
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def _send_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    content_type, filename = "text", ""
    if config["file"]:
        try:
            data = await session.in_thread(_read_file, config["file"])
        except OSError as e:
            raise LocalError("Cannot read %s: %s." % (config["file"], e.strerror))
        content_type, filename = "file", os.path.basename(config["file"])
    elif config["message"] is not None:
        data = config["message"].encode("utf-8")  # SendOptions checked that it is text
    else:
        if sys.stdin is not None and sys.stdin.isatty():
            sys.stderr.write("pager: reading the message from standard input; end it with Ctrl-D.\n")
        data = await _in_daemon_thread(reactor, _read_stdin)
        if not data.strip():
            # Said with what was taken as HOST: a forgotten HOST makes the message's first word the address.
            raise usage.UsageError("Nothing to send: no message follows HOST (here %s) and standard input is empty."
                                   % shlex.quote(config["server"]))
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            # Bytes that are not text would arrive mangled as a text message: they go as the file they are.
            content_type, filename = "file", STDIN_FILE_NAME
            sys.stderr.write("pager: standard input is not UTF-8 text: sending it as the file %s.\n" % filename)
    receipts, wanted = {}, {}  # msg id -> {peer: receipt}; msg id -> Deferred fired once every recipient answered
    recipients = list(config["to"])  # for a group: its members but the sender, once known

    def receipt_received(receipt):
        answered = receipts.setdefault(receipt.message_id, {})
        answered[receipt.peer] = receipt
        d = wanted.get(receipt.message_id)
        if d is not None and not d.called and len(answered) >= len(recipients):
            d.callback(None)
    def disconnected(error):
        # The session's receipts come only while it is connected (PROTOCOL.md, receipts): the wait ends with it.
        for d in wanted.values():
            if not d.called:
                d.callback(None)
    def wire(client):
        if config["wait-delivered"]:
            client.on_receipt, client.on_disconnect = receipt_received, disconnected
        else:
            client.receipts_wanted = False  # nobody would read them: the server makes, stores and pushes none
    session.wire = wire
    session.login_attempt = when_not_busy = _BusyWait(reactor)
    client = await session.start(receive=False)
    try:
        if config["group"] is not None:
            info = await client.group(config["group"])
            # A chain that does not verify is refused by post_group, which says why: one added by a change that
            # does not verify here is no member here yet, not one who is no longer a member.
            if not info.member and not info.broken:
                raise UnknownGroup("Not sent: you are no longer a member of %s." % info.label)
            answer = await when_not_busy(lambda: client.post_group(info.id, data, content_type, filename))
            sent = await client.group_delivery(answer["msg"])
            recipients[:] = [m for m in (sent[1] if sent else info.members) if m != session.user]
            entry = HistoryEntry(reactor.seconds(), "out", group_label(info.name), answer["msg"], content_type,
                                 filename, data if content_type == "text" else b"", "sent", info.id)
        else:
            try:
                answer = await when_not_busy(lambda: client.post(config["to"], data, content_type, filename))
            except UnknownUser as e:
                listed = {w.rstrip(".") for w in e.message.partition(":")[2].replace(",", " ").split()}
                unknown = [n for n in config["to"] if n in listed]  # those the sentence names
                raise UnknownUser(e.message.rstrip(".") + await _group_hint(client, unknown) + ".")
            entry = HistoryEntry(reactor.seconds(), "out", ",".join(config["to"]), answer["msg"], content_type,
                                 filename, data if content_type == "text" else b"", "sent")
        await session.store.add_history(entry)
        print(answer["msg"])
        sys.stdout.flush()
        if config["wait-delivered"]:
            answered = receipts.setdefault(answer["msg"], {})
            everyone = wanted[answer["msg"]] = Deferred()
            if len(answered) >= len(recipients) or client.protocol.lost is not None:
                everyone.callback(None)  # every receipt came before the answer to the send, or the connection went
            if not await within(reactor, everyone, config["timeout"]):
                missing = [n for n in recipients if n not in answered]
                raise NotDelivered("Not delivered to %s within %g s; the message stays queued on the server."
                                   % (", ".join(missing), config["timeout"]))
            await client.when_handled()  # a receipt being handled as the connection ended still counts
            missing = [n for n in recipients if n not in answered]
            if missing:
                # The wait ended with the connection.  A new session would not be told of the receipts made
                # meanwhile (a send-only session gets only those that come while it is connected), so waiting on
                # could only end in a wrong "not delivered": say what is known instead, at once.
                raise NetworkError("The connection to %s was lost while waiting for delivery to %s: the message %s "
                                   "was accepted, but whether it was delivered is unknown."
                                   % (session.address, ", ".join(missing), answer["msg"]))
            failed = [describe_receipt(r) for r in answered.values() if r.status != "delivered"]
            if failed:
                raise NotDelivered("; ".join(failed))
    finally:
        await session.close()


SEND_BUSY_WAIT = 60.0  # seconds send waits in all for a busy server (rate_limited with a wait) before it gives up


class _BusyWait:
    """
    Calling it with C{attempt} returns C{await attempt()}, tried again while the server refuses it as busy
    (L{RateLimited}) and says how long to wait, up to L{SEND_BUSY_WAIT} seconds of waiting in all, over every attempt
    one send makes: its login (several sends of one user at once are told that too many of its logins are being
    checked) and the message itself (a script's loop of sends, which asks for the recipients' keys each time, gets
    its messages through at the server's pace instead of failing).  A refused attempt changed nothing, so trying
    again logs in once and sends the message once.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.waited = 0.0

    async def __call__(self, attempt):
        while True:
            try:
                return await attempt()
            except RateLimited as e:
                if e.retry_after is None:
                    raise
                if self.waited + e.retry_after > SEND_BUSY_WAIT:
                    raise RateLimited("The server %s; the message was not sent (try again in %d s)."
                                      % ("stayed busy for %d s of waiting" % _whole_seconds(self.waited)
                                         if self.waited else "is busy for longer than %g s" % SEND_BUSY_WAIT,
                                         _whole_seconds(e.retry_after)), retry_after=e.retry_after)
                sys.stderr.write("pager: the server is busy; trying again in %d s.\n"
                                 % _whole_seconds(e.retry_after))
                await task.deferLater(self.reactor, e.retry_after, lambda: None)
                self.waited += e.retry_after


async def _group_hint(client, names, how="--to '%s'"):
    """
    For recipients the server does not know: C{" (did you mean the group #dev? --to '#dev')"} for your group
    (C{how} % the group's label says how to name it).
    """
    for name in names:
        try:
            info = await client.group(name)
        except (PagerError, BadRequest):
            continue
        if info.member:
            return " (did you mean the group %s? %s)" % (info.label, how % info.label)
    return ""


async def _fetch_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    output_closed = []  # once the reader has gone, no message is printed (to /dev/null) or acknowledged

    def reader_gone(error):
        # Our output cannot be written any more (its reader left, it was closed, its disk is full): stop printing
        # (and acknowledging), quietly from here on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        output_closed.append(OutputClosed(
            "Standard output was closed (its reader stopped reading) before every message was printed; the "
            "messages not printed stay on the server." if isinstance(error, BrokenPipeError) else
            "Cannot write to standard output (%s); the messages not printed stay on the server." % error.strerror))
        return output_closed[0]

    async def show(message):
        if output_closed:
            raise output_closed[0]
        saved = None
        if message.content_type == "file":
            try:
                directory = private_directory(session.directory, "files")
                saved = await session.in_thread(save_incoming_file, directory, message.filename, message.plaintext)
            except OSError as e:
                raise LocalError("Cannot save the file %s from %s in %s: %s; it stays on the server." % (
                    safe_filename(message.filename), message.sender, os.path.join(session.directory, "files"),
                    e.strerror))
        sent_from = None
        if message.sender == session.user and message.sender_device != device_id(session.key):
            sent_from = await session.own_device_name(message.sender_device)
        try:
            _print_message(message, saved, config["json"], sent_from, session.command_hint)
        except OSError as e:  # a closed pipe, a closed or full standard output
            raise reader_gone(e)
        group = message.group_id.hex() if message.group_id is not None else None  # as the history keeps it
        if sent_from is not None:
            # Sent by this user from another of their devices: kept in the history as sent, as the chat keeps it.
            peers = [r for r in message.recipients if r != session.user]
            await session.store.add_history(HistoryEntry(
                message.accepted_at or message.timestamp, "out",
                group_label(message.group_name) if group is not None else ",".join(peers) or session.user,
                message.message_id.hex(), message.content_type, message.filename,
                message.plaintext if message.content_type == "text" else b"",
                sent_elsewhere_status(sent_from, group), group))
            return
        await session.store.add_history(HistoryEntry(
            message.accepted_at or message.timestamp, "in", message.sender, message.message_id.hex(),
            message.content_type, message.filename, message.plaintext if message.content_type == "text" else b"",
            message.key_status, group))

    def rejected(msg, sender, error):
        sys.stderr.write("pager: refused a message from %s that could not be opened: %s\n" % (sender, error.message))

    def group_changed(event):
        if not output_closed:
            try:
                _print_group_event(event, config["json"], session.user)
            except OSError as e:
                reader_gone(e)

    def group_warning(group_id, name, sentence):
        sys.stderr.write("pager: \u26a0 %s: %s\n" % (group_label(name) if name else group_id, sentence))

    def receipt_received(receipt):
        # The receipt of a message this user sent with send --wait-delivered, kept by the server until a session of
        # theirs took it: a JSON record with --json, else a line on standard error, naming the message by its id.
        if config["json"]:
            if not output_closed:
                try:
                    _print_receipt_record(receipt)
                except OSError as e:
                    reader_gone(e)
        else:
            sys.stderr.write("pager: %s\n" % describe_receipt(receipt, preview=receipt.message_id))

    def wire(client):  # before login: the server starts pushing as soon as it has logged us in
        client.on_message, client.on_rejected = show, rejected
        client.on_receipt = receipt_received
        # The changes to the user's groups this machine learns meanwhile (at login, or pushed): a script removed
        # from a group learns it here.
        client.on_group_event, client.on_group_warning = group_changed, group_warning
    session.wire = wire
    client = await session.start(receive=True)

    def lost():
        return client.protocol.lost is not None
    try:
        pending = session.pending
        # The count at login is an upper bound (another session may acknowledge some first): stop waiting once
        # nothing has come for FETCH_SETTLE seconds.
        while client.processed < pending and not client.failures and not lost():
            if not await within(reactor, client.when_processed(client.processed + 1), FETCH_SETTLE):
                break
        while config["wait"] > 0 and not client.failures and not lost():
            if not await within(reactor, client.when_processed(client.processed + 1), config["wait"]):
                break  # --wait seconds without a new message
        await client.when_handled()  # let a message being shown finish and be acknowledged
        if lost() and client.processed < pending:
            raise NetworkError("The connection to %s was lost before every waiting message arrived; the rest stay "
                               "on the server." % session.address)
        if client.failures:
            error = client.failures[0]
            if isinstance(error, LocalError):
                raise error
            raise PagerError("Could not print a message, so it stays on the server: %s"
                             % (error.message if isinstance(error, PagerError) else error))
        if output_closed:
            raise output_closed[0]  # closed while a group's change was printed
        if lost() and config["wait"] > 0:
            raise NetworkError("The connection to %s was lost while waiting for more messages (--wait)."
                               % session.address)
    finally:
        await session.close()


def _print_message(message, saved, as_json, sent_from=None, hint=None):
    """
    Print a message fetched, as one JSON object or as text, and flush it before it is acknowledged; one the user
    sent from another of their devices (C{sent_from}: its name as shown) is printed as sent, and a changed key's
    mark names the commands as C{hint} does (L{describe_message}).
    """
    if as_json:
        record = {
            "id": message.message_id.hex(), "from": message.sender, "to": list(message.recipients),
            "from_device": message.sender_device.hex(), "time": message.timestamp,
            "accepted_at": message.accepted_at, "type": message.content_type, "key_status": message.key_status,
            "skewed": message.skewed,
        }
        if message.group_id is not None:
            record["group"] = {"id": message.group_id.hex(), "name": message.group_name}
        if message.content_type == "file":
            record.update(filename=message.filename, saved_to=saved, size=len(message.plaintext))
        else:
            record["text"] = message.plaintext.decode("utf-8", "replace")
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write(describe_message(message, saved, sent_from=sent_from, hint=hint) + "\n")
    sys.stdout.flush()


def _print_receipt_record(receipt):
    """fetch --json's record of a receipt: C{{"type": "receipt", "msg": ID, "peer": ..., "status": ...}}."""
    record = {"type": "receipt", "msg": receipt.message_id, "peer": receipt.peer, "status": receipt.status,
              "time": receipt.at}
    if receipt.status == "rejected":
        record["reason"] = receipt.reason
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _print_group_event(event, as_json, me):
    """
    Print a change to one of the user's groups that fetch learned (a L{GroupEvent}): the chat's line, C{[12:00] #ops:
    alice added you}, or one JSON object with C{"type": "group_change"}.  Its time is the changer's clock.
    """
    if as_json:
        record = {"type": "group_change", "group": {"id": event.group_id, "name": event.name},
                  "version": event.seq, "change": event.kind, "by": event.actor, "users": list(event.users),
                  "time": event.at, "text": describe_group_change(event, me)}
        if event.kind in ("create", "topic"):
            record["topic"] = event.text
        elif event.kind == "rename":
            record["old_name"] = event.text
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write(describe_group_event(event, event.at, me) + "\n")
    sys.stdout.flush()


def _on_terminal():
    """
    Whether a command that may ask (for a passphrase or safetoken not given, or a confirmation) asks: when standard
    input and standard error (where the question is written) are a terminal.  Scripts are never asked anything.
    """
    return os.isatty(0) and os.isatty(2)


async def _users_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.start(receive=False)
    try:
        online, registered = await client.users()
    finally:
        await session.close()
    if config["json"]:
        print(json.dumps({"online": online, "registered": registered}))
    else:
        print("online: %s" % (", ".join(online) or "nobody"))
        print("registered: %s" % ", ".join(registered))


async def _group_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.start(receive=False)
    try:
        if config["action"] == "info" and config["json"]:
            info = await client.group(canonical_group_name(config["group"]))
            print(json.dumps(_group_json(info, session.user)))
            return
        try:
            print(await group_action(client, config["action"], config["group"], config["args"], off=config["off"],
                                     prefix=CLI_GROUP_PREFIX))
        except (Forbidden, TooLarge) as e:
            if isinstance(e, GroupRefused):
                raise
            raise GroupRefused(e.message)  # the server refused what the rules refuse: exit 3, as the client would
    finally:
        await session.close()


async def _groups_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.start(receive=False)
    try:
        groups, ended = await groups_ended(client)
    finally:
        await session.close()
    if config["json"]:
        records = []
        for g in groups:
            how = ended.get(g.id)
            records.append(dict(_group_json(g, session.user), ended=None if g.member else {
                "how": how[0] if how else None, "by": how[1] if how else None}))
        print(json.dumps({"groups": records}))
    else:
        print(describe_groups(groups, session.user, ended))


async def _export_key_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.connect()
    try:
        await session.locate(client)
    finally:
        await client.close()
    if not os.path.exists(session.key_path):
        if os.path.lexists(session.device_path):
            raise session.refuse_linked("export the key")
        raise NoKey("This machine has no key for %s on %s (server id %s)." % (
            session.user, session.address, session.server_id))
    key = await session.load_key(session.key_path)
    passphrase = await session.new_passphrase("the exported key")
    data = await session.in_thread(encode_private_key, key, passphrase)
    try:
        await session.in_thread(write_private_file, config["out"], data)
    except OSError as e:
        raise LocalError("Cannot write %s: %s." % (config["out"], e.strerror))
    session.prompter.say("Wrote %s's key (fingerprint %s) to %s." % (
        session.user, format_fingerprint(fingerprint(key)), config["out"]))
    session.prompter.say(IMPORT_MAKES_IDENTITY % {"user": session.user})


IMPORT_MAKES_IDENTITY = (
    "The machine that imports it becomes %(user)s's identity device in place of this one (its prekeys "
    "replace this machine's, so this one then reads no new message); to use pager on both machines, add the other "
    "one with 'pager-cli link-device' instead.")


async def _import_key_command(reactor, config):
    prompter = Prompter(reactor, interactive=_on_terminal())
    session = Session(reactor, config, prompter)
    session.receive = False  # its check logs in send-only: no incoming message is taken
    try:
        with open(config["file"], "rb") as f:
            data = f.read()
    except OSError as e:
        raise LocalError("Cannot read %s: %s." % (config["file"], e.strerror))
    client = await session.connect()
    try:
        await session.open_local(client)
        if os.path.lexists(session.key_path) and not config["force"]:
            raise usage.UsageError("This machine already has a key for %s; use --force to replace it." % session.user)
        if os.path.lexists(session.device_path) and not config["force"]:
            raise usage.UsageError("This machine is a linked device of %s already (%s): use --force to make it the "
                                   "identity device instead, then revoke the device it was." % (
                                       session.user, session.device_path))
        try:
            key = await session.in_thread(decode_private_key, data, "", config["file"])
        except WrongPassphrase:
            passphrase = session._given_passphrase()
            if passphrase is None:
                passphrase = await prompter.secret("Passphrase of %s: " % config["file"],
                                                   "Give its passphrase in PAGER_PASSPHRASE or --passphrase-file.")
            key = await session.in_thread(decode_private_key, data, passphrase, config["file"])
        token = await _check_imported_key(session, client, key)
        passphrase = await session.new_passphrase()
        await session.in_thread(save_private_key, session.key_path, key, passphrase)
        session.server_id = client.server_id
        await session.save_token(token, passphrase)
    finally:
        await client.close()
        if session.store is not None:  # None when no user name could be had
            session.store.close()
    prompter.say("Installed %s's key (fingerprint %s) in %s." % (
        session.user, format_fingerprint(fingerprint(key)), session.key_path))
    prompter.say("This machine is now %s's identity device: its prekeys replace those of the machine the key came "
                 "from, which then reads no new message; to use both machines, keep the key on one and add the other "
                 "with 'pager-cli link-device'." % session.user)


async def _check_imported_key(session, client, key):
    """
    Log in with the key to be imported and the account's safetoken (given, or asked: three tries): the server
    accepts only the key registered for the user, so a mismatch is refused before anything is installed.  Returns
    the safetoken, to keep with the key.
    """
    hint = ("Give %s's safetoken in PAGER_TOKEN or with --token-file: import-key logs in with the key to check "
            "that it is the one registered on the server." % session.user)
    given = session._given_token()
    session.key = key
    for attempt in range(3):
        session.token = given or await session._ask_token("Safetoken of your account %s: " % session.user, hint)
        try:
            await session._login(client)
            return session.token
        except AuthFailed:
            if given is not None or not session.prompter.interactive or attempt == 2:
                raise AuthFailed("%s refused to log %s in with this key (fingerprint %s) and that safetoken: it is "
                                 "not the key registered for %s there, or the safetoken is wrong; nothing was "
                                 "installed." % (session.address, session.user, format_fingerprint(fingerprint(key)),
                                                 session.user))
            session.prompter.say("Not accepted: wrong safetoken, or not %s's registered key; try again."
                                 % session.user)


async def _passwd_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.connect()
    try:
        await session.locate(client)
    finally:
        await client.close()
    path = session.key_path
    if not os.path.lexists(path) and os.path.lexists(session.device_path):
        path = session.device_path  # a linked device's key: no safetoken is kept with it
    if not os.path.lexists(path):
        raise NoKey("This machine has no key for %s on %s (server id %s)." % (
            session.user, session.address, session.server_id))
    key, old = await session.unlock_key(path)
    try:
        token = await session.in_thread(load_token, session.token_path, old, session.server_id, session.user)
    except TokenFileError as e:
        session.prompter.say("%s It is dropped: the next login asks for the safetoken once." % e.message)
        token = None
    given = "" if config["no-passphrase"] else None
    if config["new-passphrase-file"]:
        if config["no-passphrase"]:
            raise usage.UsageError("--new-passphrase-file and --no-passphrase ask for opposite things: give one.")
        given = _first_line_of(config["new-passphrase-file"], "passphrase file")
        if not given:
            raise usage.UsageError("The passphrase file %s is empty: write the new passphrase on its first line (to "
                                   "remove the passphrase, choose --no-passphrase)." % config["new-passphrase-file"])
    elif given is None and not session.prompter.interactive:
        raise usage.UsageError("Give the new passphrase with --new-passphrase-file (or --no-passphrase).")
    what = "your private key" if path == session.key_path else "this device's key"
    new = await session.new_passphrase(what, given=given)
    if config["no-passphrase"]:
        session.prompter.say("Warning: %s is now kept without a passphrase: whoever can read the file can read "
                             "your messages and page as you." % what)
    await session.in_thread(save_private_key, path, key, new)
    if token is not None:
        await session.in_thread(save_token, session.token_path, token, new, session.server_id, session.user)
    elif os.path.exists(session.token_path):
        os.unlink(session.token_path)
    print("Changed the passphrase of %s's key on this machine (%s)." % (session.user, path))


async def _token_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    new = None
    if config["new-token-file"]:
        new = _first_line_of(config["new-token-file"], "token file")
        if len(new) < MIN_TOKEN_LENGTH:
            raise usage.UsageError("A safetoken has at least %d characters." % MIN_TOKEN_LENGTH)
    elif not session.prompter.interactive:
        await _refuse_on_linked_device(session, "change the safetoken")  # what is wrong first, then what is missing
        raise usage.UsageError("Give the new safetoken with --new-token-file.")
    session.needs_identity = "change the safetoken"
    client = await session.start(receive=False)
    try:
        if new is None:
            new = await session.new_token("Choose a new safetoken", given=None)
        try:
            await client.change_token(session.token, new)
        except AuthFailed:
            raise AuthFailed("The server refused the current safetoken; nothing changed.")
        session.token = new
        await session.save_token(new, session.passphrase)
    finally:
        await session.close()
    print("Changed %s's safetoken on %s; this machine keeps the new one under your key's passphrase, other "
          "machines ask for it once." % (session.user, session.address))


async def _refuse_on_linked_device(session, what):
    """Raise L{NotIdentityDevice} if this machine is a linked device of the user (C{what}: what needs the identity)."""
    client = await session.connect()
    try:
        await session.locate(client)
    finally:
        await client.close()
    if not os.path.lexists(session.key_path) and os.path.lexists(session.device_path):
        raise session.refuse_linked(what)


def _fingerprint_record(name, fp, status):
    return {"user": name, "fingerprint": fp.hex(), "status": status}


async def _fingerprint_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.start(receive=False)
    try:
        if config["name"] is None or config["name"] == session.user:
            # On a linked device, the identity key's fingerprint: the one contacts compare, not the device's.
            own = (await client.public_key(session.user))[1] if session.linked else fingerprint(session.key)
            name, fp, status = session.user, own, "own"
        else:
            name = config["name"]
            fp, status = await client.key_status(name)
    finally:
        await session.close()
    if config["json"]:
        print(json.dumps(_fingerprint_record(name, fp, status)))
    else:
        print("%s %s (%s)" % (name, format_fingerprint(fp), {
            "own": "your key", "new": "new: not pinned yet", "pinned": "pinned, not verified",
            "verified": "verified", "changed": "CHANGED: not the pinned key"}[status]))
    if status == "changed":
        raise SystemExit(report(KeyChanged(name, fp, fp, message=(
            "%s's key is not the one pinned on this machine: check the fingerprint above with %s (for example by "
            "phone), then accept it with '%s' (and '%s' records that you compared it)."
            % (name, name, session.command_line("trust", name), session.command_line("verify", name))))))


async def _verify_command(reactor, config):
    prompter = Prompter(reactor, interactive=_on_terminal())
    if config["fingerprint"] is None and not prompter.interactive:
        raise usage.UsageError("Give the fingerprint %s read to you with --fingerprint." % config["name"])
    session = Session(reactor, config, prompter)
    client = await session.start(receive=False)
    name = config["name"]
    try:
        fp, status = await client.key_status(name)
        compared = config["fingerprint"]
        if compared is None and status == "changed":
            compared = fp  # refused below, before asking: a changed key is accepted with trust first
        elif compared is None:
            prompter.say("%s's key, as the server gives it (%s):\n%s" % (name, status, format_fingerprint(fp)))
            if not await prompter.confirm("Does it read the same as what %s reads to you from their own "
                                          "'pager-cli fingerprint'?" % name):
                raise KeyChanged(name, fp, fp, message="Not verified: if the fingerprints differ, someone may be "
                                 "in between; do not trust this key until you know why.")
            compared = fp
        await client.verify(name, compared)  # a changed key is refused, naming the trust command (command_hint)
    finally:
        await session.close()
    print("%s's key is verified on this machine:\n%s" % (name, format_fingerprint(fp)))


async def _trust_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.start(receive=False)
    try:
        _, status = await client.key_status(config["name"])
        fp = await client.trust(config["name"], recheck=False)
        if status in ("pinned", "verified"):
            print("%s's key is the one pinned here (%s); nothing changed:\n%s" % (
                config["name"], "verified" if status == "verified" else "pinned, not verified",
                format_fingerprint(fp)))
        else:
            print("Now trusting %s's key (pinned, not verified):\n%s" % (config["name"], format_fingerprint(fp)))
            sys.stdout.flush()
            await client.recheck_broken_groups()  # what its groups say now (on standard error), after that
    finally:
        await session.close()


async def _trust_server_command(reactor, config):
    config = dict(config, user=None)
    session = Session(reactor, config, Prompter(reactor, interactive=False))
    client = await session.connect(check=False)
    presented = client.server_id
    await client.close()
    if config["id"] is not None and config["id"] != presented:
        raise ServerChanged(session.address, config["id"], presented, session.trust_command, message=(
            "%s presents the server id %s, not %s as you were told: nothing changed; ask the server's operator "
            "which id it has." % (session.address, presented, config["id"])))
    previous = session.known.trust(session.known_address, presented)
    if previous == presented:
        print("%s is already known as the server id %s." % (session.address, presented))
    else:
        print("%s is now known as the server id %s (it was %s)." % (session.address, presented, previous or "unknown"))


async def _forget_server_command(reactor, config):
    host, port = parse_address(config["server"])
    known = KnownServers(config["home"] or default_home())
    address = host_port(host, port)
    previous = known.forget(server_address(host, port, config["tls"]))
    if previous is None:
        print("%s%s is not a known server address; nothing changed." % (address, " (TLS)" if config["tls"] else ""))
    else:
        print("Forgot that %s is the server id %s: the next command remembers the id it presents then (keys kept "
              "under %s stay on this machine)." % (address, previous, previous))


def _device_json(info, identity, this_device=None):
    """A device as C{devices --json} prints it."""
    return {"id": info.device_id.hex(), "name": info.name, "created": info.created, "last_seen": info.last_seen,
            "revoked": info.revoked_at, "identity": info.device_id == identity,
            "this_device": info.device_id == this_device}


def describe_device(info, identity, this_device=None, width=0):
    """
    One line about a device: name (padded to C{width} characters, so that a listing's ids line up), id, when it was
    added, last seen (own devices only), revoked, which it is.
    """
    parts = ["%-*s %s" % (width, device_name_text(info.name), format_device_id(info.device_id))]
    parts.append("added %s" % (_date_clock(info.created) if info.created else "before devices were certified"))
    if info.last_seen is not None:
        parts.append("last seen %s" % _date_clock(info.last_seen))
    if info.revoked_at is not None:
        parts.append("REVOKED %s" % _date_clock(info.revoked_at))
    if info.device_id == identity:
        parts.append("identity key")
    if this_device is not None and info.device_id == this_device:
        parts.append("this machine")
    return "  ".join(parts)


def describe_devices(user, devices, identity, this_device=None):
    """
    The lines of C{devices} and the chat's C{/devices}: current devices first, then revoked ones.  C{identity} is
    the id of the identity device (the first half of the identity key's fingerprint), C{this_device} this machine's.
    """
    current = [d for d in devices if d.revoked_at is None]
    revoked = [d for d in devices if d.revoked_at is not None]
    head = "%s has %d device%s%s:" % (user, len(current), "" if len(current) == 1 else "s",
                                      " (and %d revoked)" % len(revoked) if revoked else "")
    width = max((len(device_name_text(d.name)) for d in devices), default=0)  # the longest name here, not 40
    return "\n".join([head] + ["  " + describe_device(d, identity, this_device, width) for d in current + revoked])


async def _devices_command(reactor, config):
    session = Session(reactor, config, Prompter(reactor, interactive=_on_terminal()))
    client = await session.start(receive=False)
    try:
        user = config["of"] or session.user
        devices = await client.devices(user)
        identity = (await client.public_key(user))[1][:DEVICE_ID_SIZE]
    finally:
        await session.close()
    this = device_id(session.key) if user == session.user else None
    if config["json"]:
        print(json.dumps({"user": user, "devices": [_device_json(d, identity, this) for d in devices]}))
    else:
        print(describe_devices(user, devices, identity, this))


async def _link_device_command(reactor, config):
    if config["code"] is not None:
        await _approve_link_command(reactor, config)
        return
    prompter = Prompter(reactor, interactive=_on_terminal())
    session = Session(reactor, config, prompter)
    session.receive = False  # its first login takes no message: the next command or chat does
    client = session.client = await session.connect()
    try:
        await session.locate(client)
        if os.path.lexists(session.key_path):
            raise usage.UsageError(
                "This machine already holds %s's key: link a new machine by running 'pager-cli link-device' there, "
                "then '%s CODE' here with the code it shows." % (session.user, session.link_command))
        if os.path.lexists(session.device_path) and not config["force"]:
            raise usage.UsageError(
                "This machine already is a device of %s (%s); if that device was revoked, link this machine again "
                "with '%s --force'." % (session.user, session.device_path, session.link_command))
        await _check_account_exists(session, client)
        made = [path for path in (os.path.dirname(session.directory), session.directory)
                if not os.path.lexists(path)]
        try:
            await session.open_local(client)
            name = config["name"] if config["name"] is not None else await session.device_name()
            await session.link(client, name, show=lambda text: print(text, flush=True))
        except BaseException:
            await session.close()
            _remove_made_directories(made)  # a failed link leaves no trace of the user on this machine
            raise
        await session._login(client)
    finally:
        await session.close()


async def _check_account_exists(session, client):
    """Before a key is made to link this machine: refuse a name that has no account on the server (L{UnknownUser})."""
    try:
        exists = await client.exists(session.user)
    except (Forbidden, BadRequest):
        return  # registration closed (no account is named), or a server without "exists": the link request tells
    if not exists:
        raise UnknownUser("No such user on %s: %s (link-device adds this machine to an existing account; nothing "
                          "was made)." % (session.address, session.user))


def _remove_made_directories(made):
    """Remove the directories in C{made} (parents first), which this command made, with what it put in them."""
    import shutil
    for path in reversed(made):
        shutil.rmtree(path, ignore_errors=True)


def _request_for_code(requests, secret, server_id, user):
    """The link request (of those pending) whose MAC the code's secret makes, or None."""
    for request in requests:
        if hmac.compare_digest(request.mac, link_request_mac(secret, server_id, user, request.public_key_der,
                                                             request.name)):
            return request
    return None


async def _approve_link_command(reactor, config):
    prompter = Prompter(reactor, interactive=_on_terminal())
    if not config["yes"] and not prompter.interactive:
        raise usage.UsageError("Approving a device asks first: run it on a terminal, or give --yes once you have "
                               "checked the new device's name and id.")
    session = Session(reactor, config, prompter)
    session.needs_identity = "approve the new device with its code"
    client = await session.start(receive=False)
    try:
        request = _request_for_code(await client.link_pending(), config["secret"], client.server_id, session.user)
        if request is None:
            raise AuthFailed("No device is waiting to join %s with that code (it was mistyped, used already, or "
                             "older than %d minutes): nothing was approved." % (session.user, LINK_TTL // 60))
        new = request.device_id
        name = config["name"] or request.name
        taken = [d for d in await client.devices(session.user) if d.revoked_at is None and d.name is not None
                 and d.name.casefold() == name.casefold()]
        if taken:
            # Two devices of one name could not be told apart in a listing, nor named to revoke-device.
            raise usage.UsageError("%s already has a device named %s (id %s): approve this one under another name "
                                   "with '%s CODE --name NAME'." % (
                                       session.user, device_name_text(taken[0].name),
                                       format_device_id(taken[0].device_id), session.link_command))
        prompter.say("A new device asks to join %s: %s, id %s%s." % (
            session.user, device_name_text(request.name), format_device_id(new),
            " (to be named %s)" % device_name_text(name) if name != request.name else ""))
        if not config["yes"] and not await prompter.confirm(
                "Is that the device you are linking, with that id shown on its screen? Add it to %s?" % session.user):
            try:
                await client.decline_link(request)
            except BadRequest:
                pass  # it expired (or was answered) meanwhile: the new machine has been told already
            raise Cancelled("Not approved: the request was declined, and the new machine is told so; nothing was "
                            "added to %s." % session.user)
        await client.approve_link(request, name, config["secret"])
    finally:
        await session.close()
    print("Added the device %s (id %s) to %s: it reads the messages sent to %s from now on; 'pager-cli "
          "revoke-device' removes it." % (device_name_text(name), format_device_id(new), session.user, session.user))


MIN_DEVICE_PREFIX = 4  # hex digits of a device id that may name it (fewer would match too much by chance)


def _find_device(devices, text):
    """The device C{text} names: its id (spaces ignored), an unambiguous start of it, or its name."""
    digits = "".join(text.split()).lower()
    named = [d for d in devices if d.name == text]
    if not named and re.fullmatch("[0-9a-f]{%d,%d}" % (MIN_DEVICE_PREFIX, DEVICE_ID_SIZE * 2), digits):
        named = [d for d in devices if d.device_id.hex().startswith(digits)]
    if not named:
        named = [d for d in devices if d.name is not None and d.name.casefold() == text.casefold()]
    current = [d for d in named if d.revoked_at is None]
    if len(current) > 1:
        raise usage.UsageError("%r names %d devices (%s): give more of the id." % (
            text, len(current), ", ".join("%s %s" % (device_name_text(d.name), format_device_id(d.device_id))
                                          for d in current)))
    return current[0] if current else named[0] if named else None


async def _revoke_device_command(reactor, config):
    prompter = Prompter(reactor, interactive=_on_terminal())
    if not config["yes"] and not prompter.interactive:
        raise usage.UsageError("Revoking a device asks first: run it on a terminal, or give --yes.")
    session = Session(reactor, config, prompter)
    session.needs_identity = "revoke the device"
    client = await session.start(receive=False)
    try:
        device = _find_device(await client.devices(session.user), config["device"])
        identity = device_id(session.key)
        if device is None:
            raise UnknownDevice("%s has no device with the id or name %r: give at least %d hex digits of the id, "
                                "or the device's name ('pager-cli devices' lists them)."
                                % (session.user, config["device"], MIN_DEVICE_PREFIX))
        shown = "%s (id %s)" % (device_name_text(device.name), format_device_id(device.device_id))
        if device.device_id == identity:
            raise usage.UsageError("%s is the identity device, which holds %s's key, and cannot be revoked: to "
                                   "replace a lost key, re-key the account with its safetoken in 'pager-cli "
                                   "connect'." % (shown, session.user))
        if device.revoked_at is not None:
            raise usage.UsageError("%s was revoked already, at %s." % (shown, _date_clock(device.revoked_at)))
        if not config["yes"] and not await prompter.confirm("Revoke %s's device %s?" % (session.user, shown)):
            raise Cancelled("Not revoked: nothing changed.")
        await client.revoke_device(device.device_id)
    finally:
        await session.close()
    print("Revoked %s's device %s: it can no longer log in or receive messages, and your contacts see that it was "
          "revoked." % (session.user, shown))


def make_certificate(hostname, addresses=(), days=825, now=None):
    """
    C{(cert_pem, key_pem)}: a self-signed RSA-2048 certificate whose subjectAltName lists C{hostname} (DNS) and
    each address (IP), which is what service-identity checks; the common name is ignored by it.  It is not a CA
    (it can sign no other certificate); a client trusts it by naming it as its own trust root (C{--ca}).
    """
    import datetime
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = generate_private_key()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(hostname)] + [x509.IPAddress(a) for a in addresses]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         content_commitment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _make_cert_command(config):
    hostname = config["hostname"]
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", hostname):
        raise usage.UsageError("%r is not a host name (give IP addresses with --ip)." % hostname)
    cert_pem, key_pem = make_certificate(hostname, config["ip"], config["days"])
    cert_path = os.path.join(config["out"], "cert.pem")
    key_path = os.path.join(config["out"], "key.pem")
    existing = [p for p in (cert_path, key_path) if os.path.lexists(p)]
    if existing and not config["force"]:
        raise usage.UsageError("%s already exist%s; use --force to replace %s." % (
            " and ".join(existing), "s" if len(existing) == 1 else "", "it" if len(existing) == 1 else "them"))
    try:
        os.makedirs(config["out"], exist_ok=True)
        for path in existing:
            os.unlink(path)  # a new file, never written through a link someone left there
        write_private_file(key_path, key_pem)
        with open(cert_path, "xb") as f:
            f.write(cert_pem)
    except OSError as e:
        raise LocalError("Cannot write to %s: %s." % (config["out"], e.strerror))
    names = ", ".join([hostname] + [str(a) for a in config["ip"]])
    print("Wrote %s (for %s, valid %d days) and %s (keep it secret)." % (cert_path, names, config["days"], key_path))
    print("Serve: twistd -n pager server --tls-cert %s --tls-key %s" % (cert_path, key_path))
    print("Connect: pager-cli connect %s --tls --ca %s" % (hostname, cert_path))


def _admin_name(text):
    try:
        return canonical_username(text)
    except BadRequest as e:
        raise usage.UsageError(e.message)


def _admin_command(config):
    name, sub = config.subCommand, config.subOptions
    conn = _admin_connect(config["db"])
    try:
        _admin_txn(conn, create_schema_txn, False)  # the server may be running: leave its uploads alone
        now = time.time()
        if name == "users":
            rows = _admin_txn(conn, admin_users_txn)
            print("%-32s %-16s %9s %9s %8s %10s" % ("user", "registered", "key age", "recovered", "pending",
                                                      "bytes"))
            for user, registered, key_set, recovered, count, size, fp in rows:
                print("%-32s %-16s %8.0fd %9s %8d %10d" % (
                    user, _date_clock(registered), (now - key_set) / DAY,
                    _date_clock(recovered)[:10] if recovered else "-", count, size))
        elif name == "delete-user":
            user = _admin_name(sub["name"])
            dropped = _admin_txn(conn, delete_user_txn, user)
            print("Deleted %s and %d message(s) waiting for them." % (user, dropped))
        elif name == "reset-key":
            user = _admin_name(sub["name"])
            try:
                with open(sub["path"], "rb") as f:
                    key = load_public_key(f.read())
            except OSError as e:
                raise LocalError("Cannot read %s: %s." % (sub["path"], e.strerror))
            if _admin_txn(conn, get_user_txn, user) is None:
                raise UnknownUser("No such user: %s." % user)
            _admin_txn(conn, set_key_txn, user, public_key_pem(key), fingerprint(key), now, True)
            print("%s's key is now %s.\nTheir contacts will see a changed key and should check it with them."
                  % (user, format_fingerprint(fingerprint(key))))
        elif name == "invite":
            for code in _admin_txn(conn, create_invites_txn, sub["count"], now):
                print(code)
        elif name == "backup":
            _create_backup_file(sub["dest"])
            dest = sqlite3.connect(sub["dest"])
            try:
                conn.backup(dest)
            finally:
                dest.close()
            print("Backed up %s to %s." % (config["db"], sub["dest"]))
        elif name == "stats":
            for key, value in _admin_txn(conn, stats_txn).items():
                print("%-20s %d" % (key, value))
            for key, path in (("database_bytes", config["db"]), ("wal_bytes", config["db"] + "-wal")):
                print("%-20s %d" % (key, os.path.getsize(path) if os.path.exists(path) else 0))
    except sqlite3.Error as e:
        raise StoreError("The database %s cannot be used: %s." % (config["db"], e))
    finally:
        conn.close()


_CLIENT_COMMANDS = {
    "connect": _connect_command, "send": _send_command, "fetch": _fetch_command, "users": _users_command,
    "group": _group_command, "groups": _groups_command,
    "export-key": _export_key_command, "import-key": _import_key_command, "passwd": _passwd_command,
    "token": _token_command, "fingerprint": _fingerprint_command, "verify": _verify_command,
    "trust": _trust_command, "devices": _devices_command, "link-device": _link_device_command,
    "revoke-device": _revoke_device_command,
    "trust-server": _trust_server_command, "forget-server": _forget_server_command,
}


async def _run_client_command(reactor, name, config):
    """
    Run one client command; every known error becomes one sentence on stderr and its documented exit code.  A
    command stopped by SIGINT, SIGTERM or SIGHUP (the reactor shuts down, closing its connection) exits 130, never
    with the error its connection's closing caused, nor with success when that ended a wait early (fetch --wait).
    """
    running = Deferred()
    reactor.callWhenRunning(running.callback, None)
    await running  # task.react starts us before the reactor runs: a question asked then is open to a bare SIGINT
    stopping = []
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    guard = TerminalGuard.install(reactor)  # a prompt for a secret turns echo off: every way out turns it on
    try:
        await _CLIENT_COMMANDS[name](reactor, config)
        if stopping:
            raise Interrupted()
    except (PagerError, usage.UsageError) as e:
        if stopping:  # what stopped it, in the command's own words when it has them (Interrupted), else in general
            raise SystemExit(report(e if isinstance(e, Interrupted) else Interrupted()))
        raise SystemExit(report(e))
    except Exception as e:
        # A fault no path expects: still one sentence (and the traceback only when PAGER_DEBUG asks for it).
        if _debugging():
            traceback.print_exc(file=sys.stderr)
        raise SystemExit(report(PagerError("internal error: %s: %s" % (type(e).__name__, e))))
    finally:
        if not stopping:
            reactor.removeSystemEventTrigger(trigger)
        if guard is not None:
            guard.restore()


def main(argv=None):
    """The command line: C{pager-cli}, C{python pager.py} and C{python -m pager}."""
    try:
        _main(argv)
    except BrokenPipeError:
        # Whoever read our output stopped (say `pager-cli fetch ... | head`): there is nobody left to tell.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILURE)


def _main(argv):
    """
    Run the command with standard output and standard error behind a L{SafeWriter}: the output boundary, where
    everything any command prints (messages, names, a server's error sentences) is made harmless for a terminal.
    """
    saved = sys.stdout, sys.stderr
    if sys.stdout is None:  # started with standard output closed (>&-)
        sys.stdout = _ClosedOutput()
    for stream in saved:
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a terminal that cannot show a character never loses a message
    sys.stdout, sys.stderr = SafeWriter.wrap(sys.stdout), SafeWriter.wrap(sys.stderr)
    try:
        _command(sys.argv[1:] if argv is None else argv)
    finally:
        sys.stdout, sys.stderr = saved


class _ClosedOutput:
    """
    Standard output for a command started with it closed: every write fails (C{OSError}), as on a pipe whose reader
    has left, so fetch leaves its messages on the server instead of printing them nowhere.  File descriptor 1 is
    taken by /dev/null meanwhile, so no file or connection the command opens gets it.
    """

    def __init__(self):
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 1:
            os.dup2(fd, 1)
            os.close(fd)

    def write(self, text):
        raise OSError(errno.EBADF, "it is closed")

    def flush(self):
        pass

    def fileno(self):
        return 1

    def isatty(self):
        return False


def _usage_error(options, error, program):
    """
    A usage error of C{options} (an L{Options} that failed to parse) as the sentence to report: Twisted's "Wrong
    number of arguments." becomes the command's synopsis, and the command's --help is named.
    """
    command = options.subCommand if getattr(options, "subCommand", None) else None
    synopsis = getattr(getattr(options, "subOptions", None), "synopsis", None) if command else None
    text = str(error)
    if text == "Wrong number of arguments." and synopsis:
        text = "Wrong number of arguments: the command is '%s %s %s'" % (program, command, synopsis)
    return usage.UsageError("%s (see '%s%s --help')." % (text.rstrip("."), program, " " + command if command else ""))


def _command(argv):
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.exit(report(_usage_error(options, e, "pager-cli")))
    if options.subCommand == "server":
        task.react(lambda reactor: Deferred.fromCoroutine(_serve(reactor, options.subOptions)))
    elif options.subCommand in ("make-cert", "admin"):
        try:
            (_make_cert_command if options.subCommand == "make-cert" else _admin_command)(options.subOptions)
        except (PagerError, usage.UsageError) as e:
            sys.exit(report(e))
    else:
        if options.subCommand != "connect" or not os.isatty(0):
            _log_warnings_to_stderr()  # the chat screen owns a terminal: a line of log would break it
        finished = []

        def run(reactor):
            stop_on_hangup(reactor)  # SIGHUP ends a command as SIGINT and SIGTERM do: exit 130, one sentence
            d = Deferred.fromCoroutine(_run_client_command(reactor, options.subCommand, options.subOptions))
            return d.addBoth(lambda result: finished.append(True) or result)
        try:
            task.react(run)
        except SystemExit as e:
            if not finished and e.code in (0, None):
                # The reactor stopped (Ctrl-C, SIGTERM) before the command finished: that is not success.
                sys.exit(report(Interrupted()))
            raise


def _log_warnings_to_stderr():
    """
    Show a client command's warnings and errors (a malformed frame ignored, a receipt dropped, ...) as one line
    each on standard error, C{pager: ...}, through the L{SafeWriter} there; what is below a warning stays quiet.
    """
    from twisted.logger import globalLogBeginner
    globalLogBeginner.beginLoggingTo([client_log_observer()], redirectStandardIO=False)


def client_log_observer():
    """A log observer that writes events of level warn and above, one line each, to the current standard error."""
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, formatEvent

    def write(event):
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = "%s: %s" % (text, failure.getErrorMessage())
        sys.stderr.write("pager: %s\n" % " ".join(text.split()))
    return FilteringLogObserver(write, [LogLevelFilterPredicate(LogLevel.warn)])


if __name__ == "__main__":
    main()
