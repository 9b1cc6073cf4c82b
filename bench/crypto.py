#!/usr/bin/env python3
"""
Envelope cost: the time to seal (encrypt and sign) and to open (decrypt and verify) one message through pager's own
functions, L{pager.seal} and L{pager.open_envelope}, with every key already loaded, against:

  - the floor: the bare primitives of the same library over the same bytes.
      seal floor = one RSA-OAEP-SHA256 wrap of a 32-byte key + one RSA-PSS-SHA256 signature
                   + AES-256-GCM over the plaintext + SHA-256 over the ciphertext
                   + the key commitment and the associated data (two SHA-256 of under 400 bytes)
      open floor = one RSA-OAEP unwrap + one RSA-PSS verification
                   + AES-256-GCM decryption + SHA-256 over the ciphertext + the same two SHA-256
  - pure RSA (100 B and 3 KiB only): RSA-OAEP-SHA256 over the plaintext in 190-byte blocks, the approach pager
    replaced (encryption to seal, decryption to open).
  - the original system's stated figure, about 30 ms for a short message ("reference (stated)"; not measured).

Then, per recipient device (the envelope of protocol 3 wraps the content key once per device): a short message
sealed to and opened by a device with prekeys (the X25519 wrap) against its own floor,
      X25519 seal floor = the two prekeys loaded from their bytes + one X25519 key generation + two X25519
                          agreements + HKDF-SHA256 + AES-256-GCM of the 32-byte key + the rest of the seal floor
      X25519 open floor = the ephemeral key loaded from its bytes + two X25519 agreements + HKDF + AES-GCM unwrap
                          + the rest of the open floor
and the cost each further device adds to a seal, X25519 wrap against RSA-OAEP wrap (legacy devices) against the bare
wrap primitives, from messages to 1 and to 16 devices.

Seal and open are measured in rounds of their own that interleave pager and the floor (alternating which goes
first), so that noise from other processes hits both alike; pure RSA gets rounds of its own with pager.  Each figure
is the median over three passes (--passes) of the median of a pass's rounds.

    python bench/crypto.py              # full run, three tables, three passes
    python bench/crypto.py --quick      # fewer rounds, no 64 MiB
    python bench/crypto.py --json       # the bench/run.py contract on stdout
    python bench/crypto.py --profile    # also cProfile pager's path for every size that misses its target
    python bench/crypto.py --no-devices # leave out the per-device table
"""

import argparse
import cProfile
import gc
import hashlib
import hmac
import io
import json
import os
import pstats
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402

import pager  # noqa: E402

KIB = 1024
MIB = 1024 * KIB

# (label, bytes, target as a multiple of the floor or None)
SIZES = [
    ("100 B", 100, 1.3),
    ("3 KiB", 3 * KIB, 1.3),
    ("1 MiB", 1 * MIB, None),
    ("64 MiB", 64 * MIB, 1.5),
]
PURE_RSA_SIZES = ("100 B", "3 KiB")
STATED_MS = 30.0  # the original system's own figure for a short message
STATED_LABEL = "reference (stated)"
FLOOR_LABEL = "floor (bare primitives)"
PURE_RSA_LABEL = "pure RSA-OAEP, 190-byte blocks"
OAEP_BLOCK = 190  # the most RSA-2048 OAEP-SHA256 takes at once: 256 - 2 * 32 - 2
NOISY = 0.10  # a relative spread above this makes a median suspect

# The same parameters pager uses, built here from the library so the floor does not borrow pager's objects.
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
NONCE = bytes(12)
COMMITTED = bytes(len(pager.COMMITMENT_TAG) + pager.MESSAGE_ID_SIZE)  # what the key commitment hashes before the key
WRAP_INFO = bytes(144)  # as long as pager's HKDF info for a one-time prekey wrap
DEVICE_SIZE = ("100 B", 100, 1.3)  # the message of the per-device table, and its target against the X25519 floor
DEVICE_COUNTS = (1, 16)  # per-device cost = (seal to 16 devices - seal to 1) / 15
X25519_FLOOR_LABEL = "floor (bare primitives, X25519 wrap)"


class Keys:
    """Alice sends, Bob receives; RSA-2048 like every pager key."""

    def __init__(self):
        self.alice = pager.generate_private_key()
        self.bob = pager.generate_private_key()
        self.alice_pub = self.alice.public_key()
        self.bob_pub = self.bob.public_key()
        self.recipients = {"bob": self.bob_pub}
        # Bob's device has published prekeys: the X25519 wrap.  His device key is his identity key.
        now = int(time.time())
        self.spk, self.opk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.spk_bytes, self.opk_bytes = pager.x25519_public_bytes(self.spk), pager.x25519_public_bytes(self.opk)
        self.prekeys = Prekeys({1: self.spk}, {2: self.opk}, {1: (now - 60, now + pager.PREKEY_LIFETIME)})
        signed = pager.sign_prekey(self.bob, "bob", 1, pager.x25519_public_bytes(self.spk), now - 60,
                                   now + pager.PREKEY_LIFETIME)
        self.bob_device = pager.device_id(self.bob)
        self.device_target = pager.DeviceTarget("bob", self.bob_device, signed_prekey=signed,
                                                one_time=pager.OneTimePrekey(2, pager.x25519_public_bytes(self.opk)))
        # Legacy devices (RSA-OAEP) and devices with prekeys, for the per-device cost: distinct ids, shared keys.
        self.rsa_targets = [pager.DeviceTarget("bob", pager.device_id(self.bob), rsa_key=self.bob_pub)] + [
            pager.DeviceTarget("u%02d" % i, pager.device_id(key), rsa_key=key)
            for i, key in enumerate(pager.generate_private_key().public_key() for _ in range(max(DEVICE_COUNTS) - 1))]
        # Bytes as long as pager's headers: the floor hashes as much for the chunks' associated data.
        self.rsa_header = bytes(len(pager.seal(self.alice, "alice", self.recipients, b"").header))
        self.x25519_header = bytes(len(pager.seal(self.alice, "alice", [self.device_target], b"").header))
        self.x25519_targets = [self.device_target] + [
            pager.DeviceTarget("u%02d" % i, t.device_id, signed_prekey=pager.SignedPrekey(
                "u%02d" % i, t.device_id, 1, signed.public, signed.valid_from, signed.valid_until, signed.signature),
                one_time=self.device_target.one_time)
            for i, t in enumerate(self.rsa_targets[1:])]


class Prekeys:
    """A device's prekeys, as pager's Opener asks for them."""

    def __init__(self, signed, one_time, valid):
        self.signed, self.one_time, self.valid = signed, one_time, valid

    def signed_private(self, prekey_id):
        return self.signed.get(prekey_id)

    def one_time_private(self, prekey_id):
        return self.one_time.get(prekey_id)

    def signed_valid(self, prekey_id):
        return self.valid.get(prekey_id)


# The measured operations.  Each returns its result so that freeing it happens inside the timing for everyone alike.

def pager_seal(k, plaintext):
    return pager.seal(k.alice, "alice", k.recipients, plaintext)


def pager_open(k, envelope):
    return pager.open_envelope(envelope, k.bob, "bob", k.alice_pub)


def floor_seal(k, plaintext, header=None, wrap=None):
    """
    The floor of a seal: a content key, its wrap (RSA-OAEP unless C{wrap} is given), its commitment (SHA-256), the
    associated data (SHA-256 of header-sized bytes), AES-256-GCM, SHA-256 of the ciphertext and an RSA-PSS signature.
    """
    key = AESGCM.generate_key(bit_length=256)
    wrapped = wrap(k, key) if wrap is not None else k.bob_pub.encrypt(key, OAEP)
    commitment = hashlib.sha256(COMMITTED + key).digest()
    ad = hashlib.sha256(header if header is not None else k.rsa_header).digest()
    ciphertext = AESGCM(key).encrypt(NONCE, plaintext, ad)
    signature = k.alice.sign(hashlib.sha256(ciphertext).digest(), PSS, hashes.SHA256())
    return wrapped, commitment, ciphertext, signature


def floor_open(k, sealed, header=None, unwrap=None):
    """
    The floor of an open: the unwrap (RSA-OAEP unless C{unwrap} is given), the commitment checked (SHA-256), the
    associated data (SHA-256), AES-256-GCM, SHA-256 of the ciphertext and an RSA-PSS verification.
    """
    wrapped, commitment, ciphertext, signature = sealed
    key = unwrap(k, wrapped) if unwrap is not None else k.bob.decrypt(wrapped, OAEP)
    if not hmac.compare_digest(hashlib.sha256(COMMITTED + key).digest(), commitment):
        raise SystemExit("the floor's key commitment does not match")
    ad = hashlib.sha256(header if header is not None else k.rsa_header).digest()
    plaintext = AESGCM(key).decrypt(NONCE, ciphertext, ad)
    k.alice_pub.verify(signature, hashlib.sha256(ciphertext).digest(), PSS, hashes.SHA256())
    return plaintext


def pager_x25519_seal(k, plaintext, targets=None):
    return pager.seal(k.alice, "alice", targets or [k.device_target], plaintext)


def pager_x25519_open(k, envelope):
    return pager.open_envelope(envelope, None, "bob", k.alice_pub, device=k.bob_device, prekeys=k.prekeys)


def x25519_wrap(k, key):
    """
    The bare X25519 wrap of one content key: the two prekeys loaded from their 32 bytes (they come from the server
    as bytes for every message, as the ephemeral key does to the opener), a fresh ephemeral key, two agreements, HKDF,
    AES-GCM.
    """
    spk, opk = X25519PublicKey.from_public_bytes(k.spk_bytes), X25519PublicKey.from_public_bytes(k.opk_bytes)
    ek = X25519PrivateKey.generate()
    ikm = ek.exchange(spk) + ek.exchange(opk)
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=WRAP_INFO).derive(ikm)
    return ek.public_key().public_bytes_raw(), AESGCM(kek).encrypt(NONCE, key, None)


def x25519_unwrap(k, wrapped):
    """The bare X25519 unwrap: the ephemeral key loaded from its 32 bytes, two agreements, HKDF, AES-GCM."""
    ephemeral, wrapped = wrapped
    ek = X25519PublicKey.from_public_bytes(ephemeral)
    ikm = k.spk.exchange(ek) + k.opk.exchange(ek)
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=WRAP_INFO).derive(ikm)
    return AESGCM(kek).decrypt(NONCE, wrapped, None)


def floor_x25519_seal(k, plaintext):
    return floor_seal(k, plaintext, k.x25519_header, x25519_wrap)


def floor_x25519_open(k, sealed):
    return floor_open(k, sealed, k.x25519_header, x25519_unwrap)


def pure_rsa_seal(k, plaintext):
    return [k.bob_pub.encrypt(plaintext[i:i + OAEP_BLOCK], OAEP) for i in range(0, len(plaintext), OAEP_BLOCK)]


def pure_rsa_open(k, blocks):
    return b"".join([k.bob.decrypt(block, OAEP) for block in blocks])


# Statistics.

def spread(samples):
    """Relative spread: interquartile range over median (full range over median below 4 samples)."""
    med = statistics.median(samples)
    if med <= 0:
        return 0.0
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
        return (q3 - q1) / med
    return (max(samples) - min(samples)) / med


def pooled(passes, name):
    """Every sample of C{name} over all passes."""
    return [value for samples in passes for value in samples[name]]


def over_passes(passes, name, reference):
    """
    C{(value, reference value, ratio, ratio of each pass)}: the median over passes of each pass's median, and of each
    pass's ratio of medians.  A pass is a complete run of every size and table: a few seconds of load from other
    processes falls on one pass, and the median of three or more passes leaves it out.
    """
    values = [statistics.median(samples[name]) for samples in passes]
    references = [statistics.median(samples[reference]) for samples in passes]
    ratios = [v / r for v, r in zip(values, references)]
    return statistics.median(values), statistics.median(references), statistics.median(ratios), ratios


def run_rounds(ops, quick, budget):
    """
    Warm up, then run interleaved rounds of C{ops} for about C{budget} seconds (a quarter with C{quick}), at least
    5 and at most 400 rounds (200 with C{quick}); return name -> list of seconds.  The warm-up runs three rounds, or
    one when a round takes over a second, so that the time of the first, cold call (imports, caches, lazily built
    tables) neither counts nor sets the number of rounds.
    """
    low, high = (5, 200) if quick else (5, 400)
    if quick:
        budget /= 4
    start = time.perf_counter()
    interleaved(ops, 1)
    if time.perf_counter() - start < 1.0:
        interleaved(ops, 2)
    return interleaved(ops, high, low, budget)


def interleaved(ops, rounds, at_least=None, budget=None):
    """
    Run every operation of C{ops} (name -> callable) once per round, in the order given in even rounds and in the
    reverse order in odd ones; return name -> list of seconds.  With a C{budget} (seconds), stop once it is spent
    and C{at_least} rounds are done (an even number).  Alternating the order gives every operation each neighbour
    before it as often as after it: with a fixed cycle (or a rotation of one), the floor would always run right
    after pager's same operation, which warms the very code and keys the floor needs, and pager after the floor of
    the other direction.  The garbage collector runs once before and is off while timing: a collection between
    rounds would flush the caches and slow whichever operation comes next.
    """
    names = list(ops)
    orders = (names, names[::-1])
    samples = {name: [] for name in names}
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        end = None if budget is None else clock() + budget
        for i in range(rounds):
            if end is not None and i % 2 == 0 and i >= at_least and clock() > end:
                break  # only after a round in each order, so that both orders count alike
            for name in orders[i % 2]:
                fn = ops[name]
                start = clock()
                fn()
                samples[name].append(clock() - start)
    finally:
        gc.enable()
    return samples


def measure_size(k, label, size, quick, log, share=1.0):
    """
    Measure one message size; return name -> samples (seconds).  Pager and the floor of one direction share their
    rounds (seal with seal, open with open); pager and pure RSA share other rounds, because a pure-RSA open of 3 KiB
    (17 private-key operations, milliseconds) leaves the caches cold for whatever runs next and would skew the
    pager/floor comparison.  C{share} scales the time budget (one pass of several).
    """
    plaintext = os.urandom(size)
    envelope = pager_seal(k, plaintext)
    sealed = floor_seal(k, plaintext)
    if pager_open(k, envelope).plaintext != plaintext or floor_open(k, sealed) != plaintext:
        raise SystemExit("round trip failed for %s" % label)
    log("%-7s pager and floor ..." % label)
    samples = run_rounds({
        "pager seal": lambda: pager_seal(k, plaintext),
        "floor seal": lambda: floor_seal(k, plaintext),
    }, quick, 2.0 * share)
    samples.update(run_rounds({
        "pager open": lambda: pager_open(k, envelope),
        "floor open": lambda: floor_open(k, sealed),
    }, quick, 2.0 * share))
    if label in PURE_RSA_SIZES:
        blocks = pure_rsa_seal(k, plaintext)
        if pure_rsa_open(k, blocks) != plaintext:
            raise SystemExit("pure RSA round trip failed for %s" % label)
        log("%-7s pager and pure RSA ..." % label)
        versus = run_rounds({
            "pager seal": lambda: pager_seal(k, plaintext),
            "pure RSA seal": lambda: pure_rsa_seal(k, plaintext),
        }, quick, 1.0 * share)
        versus.update(run_rounds({
            "pager open": lambda: pager_open(k, envelope),
            "pure RSA open": lambda: pure_rsa_open(k, blocks),
        }, quick, 1.0 * share))
        for name, values in versus.items():
            samples[name.replace("pager", "pager (vs pure RSA)")] = values
    del envelope, sealed
    return samples


def measure_devices(k, quick, log, share=1.0):
    """
    The per-device figures; return name -> samples (seconds).  A short message to Bob's device with prekeys, pager
    and its X25519 floor interleaved as for the sizes above; then seals to 1 and to 16 devices, X25519 and RSA-OAEP,
    and the bare wraps, interleaved in rounds of their own.  C{share} scales the time budget.
    """
    label, size, _ = DEVICE_SIZE
    plaintext = os.urandom(size)
    envelope = pager_x25519_seal(k, plaintext)
    sealed = floor_x25519_seal(k, plaintext)
    if pager_x25519_open(k, envelope).plaintext != plaintext or floor_x25519_open(k, sealed) != plaintext:
        raise SystemExit("X25519 round trip failed")
    log("%-7s X25519 pager and floor ..." % label)
    samples = run_rounds({
        "pager seal": lambda: pager_x25519_seal(k, plaintext),
        "floor seal": lambda: floor_x25519_seal(k, plaintext),
    }, quick, 2.0 * share)
    samples.update(run_rounds({
        "pager open": lambda: pager_x25519_open(k, envelope),
        "floor open": lambda: floor_x25519_open(k, sealed),
    }, quick, 2.0 * share))
    key = os.urandom(32)
    ops = {"x25519 wrap": lambda: x25519_wrap(k, key), "rsa wrap": lambda: k.bob_pub.encrypt(key, OAEP)}
    for n in DEVICE_COUNTS:
        x_targets, r_targets = k.x25519_targets[:n], k.rsa_targets[:n]
        ops["x25519 seal %d" % n] = lambda t=x_targets: pager_x25519_seal(k, plaintext, t)
        ops["rsa seal %d" % n] = lambda t=r_targets: pager.seal(k.alice, "alice", t, plaintext)
    wide = pager_x25519_seal(k, plaintext, k.x25519_targets[:max(DEVICE_COUNTS)])
    if pager_x25519_open(k, wide).plaintext != plaintext:
        raise SystemExit("X25519 round trip to %d devices failed" % max(DEVICE_COUNTS))
    ops["x25519 open of %d" % max(DEVICE_COUNTS)] = lambda: pager_x25519_open(k, wide)
    log("%-7s per device, X25519 and RSA-OAEP ..." % label)
    samples.update(run_rounds(ops, quick, 6.0 * share))
    return samples


def device_results(passes):
    """The per-device table's rows (dicts) and the noisy figures, from the samples of each pass."""
    label, size, target = DEVICE_SIZE
    rows, noisy = [], []
    samples = {name: pooled(passes, name) for name in passes[0]}
    for direction in ("seal", "open"):
        p, f = samples["pager " + direction], samples["floor " + direction]
        pm, fm, ratio, ratios = over_passes(passes, "pager " + direction, "floor " + direction)
        rows.append({
            "figure": "%s %s, one device with prekeys (X25519)" % (direction, label), "pager_ms": pm * 1000,
            "reference_ms": fm * 1000, "reference_label": X25519_FLOOR_LABEL, "ratio": ratio, "pass_ratios": ratios,
            "best_ratio": min(p) / min(f),
            "target": target, "pass": round(ratio, 2) <= target, "n": len(p), "spread": spread(p),
            "reference_spread": spread(f),
        })
    low, high = DEVICE_COUNTS
    per = {}
    for kind in ("x25519", "rsa"):
        a, b = samples["%s seal %d" % (kind, low)], samples["%s seal %d" % (kind, high)]
        per[kind] = statistics.median([(statistics.median(one["%s seal %d" % (kind, high)])
                                        - statistics.median(one["%s seal %d" % (kind, low)])) / (high - low)
                                       for one in passes])
        noisy += ["%s seal to %d devices" % (kind, n) for n, s in ((low, a), (high, b)) if spread(s) > NOISY]
    wraps = {kind: statistics.median([statistics.median(one[kind + " wrap"]) for one in passes])
             for kind in ("x25519", "rsa")}
    for kind, name in (("x25519", "X25519"), ("rsa", "RSA-OAEP")):
        rows.append({
            "figure": "seal, each further device (%s wrap)" % name, "pager_ms": per[kind] * 1000,
            "reference_ms": wraps[kind] * 1000, "reference_label": "bare %s wrap" % name,
            "ratio": per[kind] / wraps[kind], "target": None, "pass": None, "n": len(samples["rsa wrap"]),
            "spread": None, "reference_spread": spread(samples[kind + " wrap"]),
        })
    rows.append({
        "figure": "seal, each further device: X25519 against RSA-OAEP", "pager_ms": per["x25519"] * 1000,
        "reference_ms": per["rsa"] * 1000, "reference_label": "pager's RSA-OAEP wrap per device",
        "ratio": per["x25519"] / per["rsa"], "target": None, "pass": None, "n": len(samples["rsa wrap"]),
        "spread": None, "reference_spread": None,
    })
    wide = samples["x25519 open of %d" % high]
    wm, om, ratio, _ = over_passes(passes, "x25519 open of %d" % high, "pager open")
    rows.append({
        "figure": "open %s as one of %d devices (X25519)" % (label, high), "pager_ms": wm * 1000,
        "reference_ms": om * 1000, "reference_label": "pager open as the only device", "ratio": ratio,
        "target": None, "pass": None, "n": len(wide), "spread": spread(wide),
        "reference_spread": spread(samples["pager open"]),
    })
    for row in rows:
        if max(row["spread"] or 0, row["reference_spread"] or 0) > NOISY:
            noisy.append(row["figure"])
    return rows, noisy


def profile_pager(k, label, size, direction, top=12):
    """cProfile pager's path for one size and direction; return the report text (share of the profiled total)."""
    plaintext = os.urandom(size)
    envelope = pager_seal(k, plaintext)
    fn = (lambda: pager_seal(k, plaintext)) if direction == "seal" else (lambda: pager_open(k, envelope))
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3 if size >= 16 * MIB else 50):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values()) or 1e-12  # sum of tottime
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    out = io.StringIO()
    out.write("profile: pager %s %s (tottime = time inside the function itself; builtins such as bytes() and\n"
              "bytearray += have no entry of their own and count in their caller)\n" % (direction, label))
    out.write("  %6s  %9s  %9s  %7s  %s\n" % ("share", "tottime", "cumtime", "calls", "function"))
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in rows:
        where = "%s:%d(%s)" % (os.path.basename(filename), line, name) if line else name
        out.write("  %5.1f%%  %7.1fms  %7.1fms  %7d  %s\n" % (
            100.0 * tottime / total, tottime * 1000, cumtime * 1000, ncalls, where))
    return out.getvalue()


# Results.

def build_results(measured):
    """The rows of both tables, as dicts."""
    main_rows, rsa_rows, noisy = [], [], []
    for label, size, target in SIZES:
        passes = measured.get(label)
        if passes is None:
            continue
        samples = {name: pooled(passes, name) for name in passes[0]}
        for direction in ("seal", "open"):
            p, f = samples["pager " + direction], samples["floor " + direction]
            pm, fm, ratio, ratios = over_passes(passes, "pager " + direction, "floor " + direction)
            paired = statistics.median([a / b for a, b in zip(p, f)])
            row = {
                "size": label, "bytes": size, "direction": direction, "n": len(p), "pass_ratios": ratios,
                "best_ratio": min(p) / min(f),
                "pager_ms": pm * 1000, "floor_ms": fm * 1000, "ratio": ratio, "paired_ratio": paired,
                "pager_spread": spread(p), "floor_spread": spread(f), "target": target,
                "pass": None if target is None else round(ratio, 2) <= target,  # judged at the precision shown
            }
            main_rows.append(row)
            if max(row["pager_spread"], row["floor_spread"]) > NOISY:
                noisy.append("%s %s" % (label, direction))
            if "pure RSA " + direction in samples:
                q, r = samples["pager (vs pure RSA) " + direction], samples["pure RSA " + direction]
                qm, rm, ratio, _ = over_passes(passes, "pager (vs pure RSA) " + direction, "pure RSA " + direction)
                rsa_rows.append({
                    "size": label, "direction": direction, "n": len(r), "pager_ms": qm * 1000,
                    "pure_rsa_ms": rm * 1000, "speedup": 1 / ratio, "pager_spread": spread(q),
                    "pure_rsa_spread": spread(r), "blocks": -(-size // OAEP_BLOCK),
                })
                if max(spread(q), spread(r)) > NOISY:
                    noisy.append("%s %s (vs pure RSA)" % (label, direction))
    return main_rows, rsa_rows, noisy


def _target_text(target):
    return "<= %.1fx floor" % target if target is not None else None


def to_contract(main_rows, rsa_rows, notes, device_rows=()):
    rows = []
    for r in main_rows:
        rows.append({
            "figure": "%s %s" % (r["direction"], r["size"]), "value": round(r["pager_ms"], 4), "unit": "ms",
            "reference": round(r["floor_ms"], 4), "reference_label": FLOOR_LABEL, "ratio": round(r["ratio"], 4),
            "target": _target_text(r["target"]), "pass": r["pass"],
            "n": r["n"], "spread": round(r["pager_spread"], 4), "reference_spread": round(r["floor_spread"], 4),
            "paired_ratio": round(r["paired_ratio"], 4), "pass_ratios": [round(x, 4) for x in r["pass_ratios"]],
            "best_ratio": round(r["best_ratio"], 4),
        })
    for r in rsa_rows:
        rows.append({
            "figure": "%s %s vs pure RSA" % (r["direction"], r["size"]), "value": round(r["pager_ms"], 4),
            "unit": "ms", "reference": round(r["pure_rsa_ms"], 4), "reference_label": PURE_RSA_LABEL,
            "ratio": round(r["speedup"], 2), "ratio_kind": "speedup", "target": None, "pass": None,
            "n": r["n"], "spread": round(r["pager_spread"], 4), "reference_spread": round(r["pure_rsa_spread"], 4),
        })
    for r in main_rows:
        if r["size"] == "100 B":
            rows.append({
                "figure": "%s %s vs stated" % (r["direction"], r["size"]), "value": round(r["pager_ms"], 4),
                "unit": "ms", "reference": STATED_MS, "reference_label": STATED_LABEL,
                "ratio": round(STATED_MS / r["pager_ms"], 2), "ratio_kind": "speedup", "target": None,
                "pass": None,
            })
    for r in device_rows:
        rows.append({
            "figure": r["figure"], "value": round(r["pager_ms"], 4), "unit": "ms",
            "reference": round(r["reference_ms"], 4), "reference_label": r["reference_label"],
            "ratio": round(r["ratio"], 4), "target": _target_text(r["target"]), "pass": r["pass"], "n": r["n"],
            "spread": None if r["spread"] is None else round(r["spread"], 4),
            "reference_spread": None if r["reference_spread"] is None else round(r["reference_spread"], 4),
            "pass_ratios": [round(x, 4) for x in r.get("pass_ratios", [])],
            "best_ratio": round(r["best_ratio"], 4) if "best_ratio" in r else None,
        })
    return {"benchmark": "crypto", "rows": rows, "notes": notes}


def _ratios_text(ratios):
    return "/".join("%.2f" % x for x in ratios)


def _pct(x):
    return "%.0f%%" % (100 * x) if x < 10 else ">999%"


def print_tables(main_rows, rsa_rows, notes, out=sys.stdout, device_rows=()):
    w = out.write
    w("Seal and open, per message: pager against the floor (median over passes of the median of interleaved "
      "rounds)\n\n")
    head = ("size", "direction", "pager ms", "floor ms", "ratio", "target", "result", "n", "spread p/f",
            "ratio per pass", "best")
    fmt = "%-7s %-9s %10s %10s %6s %-14s %-6s %4s %11s %-14s %s\n"
    w(fmt % head)
    w(fmt % tuple("-" * len(h) for h in head))
    for r in main_rows:
        result = "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        w(fmt % (r["size"], r["direction"], "%.3f" % r["pager_ms"], "%.3f" % r["floor_ms"], "%.2fx" % r["ratio"],
                 _target_text(r["target"]) or "- (none)", result, r["n"],
                 "%s/%s" % (_pct(r["pager_spread"]), _pct(r["floor_spread"])), _ratios_text(r["pass_ratios"]),
                 "%.2fx" % r["best_ratio"]))
    if rsa_rows:
        w("\nPager against the seed's pure RSA (RSA-OAEP-SHA256 over 190-byte blocks; own interleaved rounds)\n\n")
        head = ("size", "direction", "blocks", "pager ms", "pure RSA ms", "speed-up", "n", "spread p/r")
        fmt = "%-7s %-9s %6s %10s %12s %9s %4s %11s\n"
        w(fmt % head)
        w(fmt % tuple("-" * len(h) for h in head))
        for r in rsa_rows:
            w(fmt % (r["size"], r["direction"], r["blocks"], "%.3f" % r["pager_ms"], "%.3f" % r["pure_rsa_ms"],
                     "%.2fx" % r["speedup"], r["n"], "%s/%s" % (_pct(r["pager_spread"]), _pct(r["pure_rsa_spread"]))))
        w("(speed-up = pure RSA time / pager time; below 1x pure RSA is faster)\n")
    short = [r for r in main_rows if r["size"] == "100 B"]
    if short:
        w("\n%s: about %.0f ms for a short message; pager 100 B: %s\n" % (
            STATED_LABEL, STATED_MS,
            ", ".join("%s %.3f ms (%.0fx faster)" % (r["direction"], r["pager_ms"], STATED_MS / r["pager_ms"])
                      for r in short)))
    if device_rows:
        w("\nPer recipient device (median of n interleaved rounds; per-device cost = (seal to %d - seal to %d) / %d)\n\n"
          % (DEVICE_COUNTS[1], DEVICE_COUNTS[0], DEVICE_COUNTS[1] - DEVICE_COUNTS[0]))
        head = ("figure", "pager ms", "reference ms", "ratio", "target", "result", "reference")
        fmt = "%-50s %9s %12s %6s %-14s %-6s %s\n"
        w(fmt % head)
        w(fmt % tuple("-" * len(h) for h in head))
        for r in device_rows:
            result = "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
            w(fmt % (r["figure"], "%.3f" % r["pager_ms"], "%.3f" % r["reference_ms"], "%.2fx" % r["ratio"],
                     _target_text(r["target"]) or "- (none)", result, r["reference_label"]))
            if r.get("pass_ratios") and len(r["pass_ratios"]) > 1:
                w("%-50s %s; best %.2fx\n" % ("  ratio per pass", _ratios_text(r["pass_ratios"]), r["best_ratio"]))
    if notes:
        w("\nNotes:\n")
        for note in notes:
            w("  - %s\n" % note)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Seal and open cost of pager's envelope against the floor.")
    parser.add_argument("--json", action="store_true", help="print the bench/run.py JSON contract on stdout")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, and no 64 MiB message")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile pager's path for every size and direction that misses its target")
    parser.add_argument("--sizes", help="comma-separated subset of: " + ", ".join(s[0] for s in SIZES))
    parser.add_argument("--no-devices", action="store_true", help="leave out the per-device table")
    parser.add_argument("--passes", type=int, default=None,
                        help="complete runs of every measurement, each with its share of the time; a figure is the "
                             "median over passes (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    passes = args.passes if args.passes is not None else (1 if args.quick else 3)
    if passes < 1:
        parser.error("--passes must be at least 1")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    sizes = SIZES
    if args.sizes:
        wanted = {s.strip().replace(" ", "").lower() for s in args.sizes.split(",")}
        sizes = [s for s in SIZES if s[0].replace(" ", "").lower() in wanted]
        if not sizes:
            parser.error("no such size: %s" % args.sizes)
    if args.quick:
        sizes = [s for s in sizes if s[1] < 64 * MIB]

    try:
        load_before = os.getloadavg()
    except OSError:
        load_before = None
    log("generating keys ...")
    k = Keys()
    measured = {label: [] for label, _, _ in sizes}
    device_passes = []
    for number in range(passes):
        if passes > 1:
            log("pass %d of %d" % (number + 1, passes))
        for label, size, _ in sizes:
            measured[label].append(measure_size(k, label, size, args.quick, log, 1.0 / passes))
            gc.collect()
        if not args.no_devices:
            device_passes.append(measure_devices(k, args.quick, log, 1.0 / passes))
            gc.collect()

    device_rows, device_noisy = [], []
    if device_passes:
        device_rows, device_noisy = device_results(device_passes)

    notes = ["each figure is the median over %d pass%s of the median of its interleaved rounds (n counts the rounds "
             "of every pass)" % (passes, "" if passes == 1 else "es")]
    main_rows, rsa_rows, noisy = build_results(measured)
    noisy += device_noisy
    if args.quick:
        notes.append("quick run: fewer rounds and no 64 MiB message; figures are indicative only")
    if noisy:
        notes.append("noisy: relative spread (interquartile range / median) above %d%% for %s; another process "
                     "was probably busy, so re-run before trusting those ratios"
                     % (NOISY * 100, ", ".join(noisy)))
    else:
        notes.append("spread (interquartile range / median) at most %d%% for every size and direction"
                     % (NOISY * 100))
    if load_before is not None:
        cores = os.cpu_count() or 1
        load_after = os.getloadavg()
        busy = max(load_before[0], load_after[0]) > 1 + 0.5 * (cores - 1)  # this process counts for 1
        notes.append("load average (1 min) %.2f before, %.2f after, on %d cores%s" % (
            load_before[0], load_after[0], cores, ": the machine was shared" if busy else ""))
    misses = [r for r in main_rows if r["pass"] is False]
    device_misses = [r for r in device_rows if r["pass"] is False]
    if misses or device_misses:
        notes.append("missed: " + ", ".join(["%s %s %.2fx > %.1fx" % (r["direction"], r["size"], r["ratio"],
                                                                      r["target"]) for r in misses]
                                            + ["%s %.2fx > %.1fx" % (r["figure"], r["ratio"], r["target"])
                                               for r in device_misses]))

    if args.json:
        print(json.dumps(to_contract(main_rows, rsa_rows, notes, device_rows), indent=1))
    else:
        print_tables(main_rows, rsa_rows, notes, device_rows=device_rows)
    if args.profile:
        stream = sys.stderr if args.json else sys.stdout
        by_label = {label: size for label, size, _ in SIZES}
        for r in misses:
            stream.write("\n" + profile_pager(k, r["size"], by_label[r["size"]], r["direction"]))
        if not misses:
            stream.write("\nprofile: every target met; nothing to profile\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
