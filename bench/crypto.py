#!/usr/bin/env python3
"""
Envelope cost: the time to seal (encrypt and sign) and to open (decrypt and verify) one message through pager's own
functions, L{pager.seal} and L{pager.open_envelope}, with every key already loaded, against:

  - the floor: the bare primitives of the same library over the same bytes.
      seal floor = one RSA-OAEP-SHA256 wrap of a 32-byte key + one RSA-PSS-SHA256 signature
                   + AES-256-GCM over the plaintext + SHA-256 over the ciphertext
      open floor = one RSA-OAEP unwrap + one RSA-PSS verification
                   + AES-256-GCM decryption + SHA-256 over the ciphertext
  - pure RSA (100 B and 3 KiB only): RSA-OAEP-SHA256 over the plaintext in 190-byte blocks, the approach pager
    replaced (encryption to seal, decryption to open).
  - the original system's stated figure, about 30 ms for a short message ("reference (stated)"; not measured).

Each size is measured in rounds that interleave pager and the floor (the order rotates every round), so that noise
from other processes hits both alike; pure RSA gets rounds of its own with pager.  Each figure is the median of N
rounds, N adapted to the size.

    python bench/crypto.py              # full run, two tables
    python bench/crypto.py --quick      # fewer rounds, no 64 MiB
    python bench/crypto.py --json       # the bench/run.py contract on stdout
    python bench/crypto.py --profile    # also cProfile pager's path for every size that misses its target
"""

import argparse
import cProfile
import gc
import hashlib
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
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

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
AD = bytes(32)


class Keys:
    """Alice sends, Bob receives; RSA-2048 like every pager key."""

    def __init__(self):
        self.alice = pager.generate_private_key()
        self.bob = pager.generate_private_key()
        self.alice_pub = self.alice.public_key()
        self.bob_pub = self.bob.public_key()
        self.recipients = {"bob": self.bob_pub}


# The measured operations.  Each returns its result so that freeing it happens inside the timing for everyone alike.

def pager_seal(k, plaintext):
    return pager.seal(k.alice, "alice", k.recipients, plaintext)


def pager_open(k, envelope):
    return pager.open_envelope(envelope, k.bob, "bob", k.alice_pub)


def floor_seal(k, plaintext):
    key = AESGCM.generate_key(bit_length=256)
    wrapped = k.bob_pub.encrypt(key, OAEP)
    ciphertext = AESGCM(key).encrypt(NONCE, plaintext, AD)
    signature = k.alice.sign(hashlib.sha256(ciphertext).digest(), PSS, hashes.SHA256())
    return wrapped, ciphertext, signature


def floor_open(k, sealed):
    wrapped, ciphertext, signature = sealed
    key = k.bob.decrypt(wrapped, OAEP)
    plaintext = AESGCM(key).decrypt(NONCE, ciphertext, AD)
    k.alice_pub.verify(signature, hashlib.sha256(ciphertext).digest(), PSS, hashes.SHA256())
    return plaintext


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


def rounds_for(seconds_per_round, quick, budget=4.0):
    """How many interleaved rounds to run, from the time one round took and a time budget in seconds."""
    low, high = (5, 200) if quick else (5, 400)
    if quick:
        budget /= 4
    return max(low, min(high, int(budget / max(seconds_per_round, 1e-9))))


def run_rounds(ops, quick, budget):
    """One warm-up round (which also times a round), then as many rounds as the budget allows."""
    start = time.perf_counter()
    interleaved(ops, 1)
    rounds = rounds_for(time.perf_counter() - start, quick, budget)
    return interleaved(ops, rounds)


def interleaved(ops, rounds):
    """
    Run every operation of C{ops} (name -> callable) once per round, rotating the order each round; return
    name -> list of seconds.  The garbage collector runs once before and is off while timing: a collection between
    rounds would flush the caches and slow whichever operation comes next.
    """
    names = list(ops)
    samples = {name: [] for name in names}
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                fn = ops[name]
                start = clock()
                fn()
                samples[name].append(clock() - start)
    finally:
        gc.enable()
    return samples


def measure_size(k, label, size, quick, log):
    """
    Measure one message size; return name -> samples (seconds).  Pager and the floor share their rounds; pager and
    pure RSA share other rounds, because a pure-RSA open of 3 KiB (17 private-key operations, milliseconds) leaves
    the caches cold for whatever runs next and would skew the pager/floor comparison.
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
        "pager open": lambda: pager_open(k, envelope),
        "floor open": lambda: floor_open(k, sealed),
    }, quick, 4.0)
    if label in PURE_RSA_SIZES:
        blocks = pure_rsa_seal(k, plaintext)
        if pure_rsa_open(k, blocks) != plaintext:
            raise SystemExit("pure RSA round trip failed for %s" % label)
        log("%-7s pager and pure RSA ..." % label)
        versus = run_rounds({
            "pager seal": lambda: pager_seal(k, plaintext),
            "pure RSA seal": lambda: pure_rsa_seal(k, plaintext),
            "pager open": lambda: pager_open(k, envelope),
            "pure RSA open": lambda: pure_rsa_open(k, blocks),
        }, quick, 2.0)
        for name, values in versus.items():
            samples[name.replace("pager", "pager (vs pure RSA)")] = values
    del envelope, sealed
    return samples


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
        samples = measured.get(label)
        if samples is None:
            continue
        for direction in ("seal", "open"):
            p, f = samples["pager " + direction], samples["floor " + direction]
            pm, fm = statistics.median(p), statistics.median(f)
            ratio = pm / fm
            paired = statistics.median([a / b for a, b in zip(p, f)])
            row = {
                "size": label, "bytes": size, "direction": direction, "n": len(p),
                "pager_ms": pm * 1000, "floor_ms": fm * 1000, "ratio": ratio, "paired_ratio": paired,
                "pager_spread": spread(p), "floor_spread": spread(f), "target": target,
                "pass": None if target is None else round(ratio, 2) <= target,  # judged at the precision shown
            }
            main_rows.append(row)
            if max(row["pager_spread"], row["floor_spread"]) > NOISY:
                noisy.append("%s %s" % (label, direction))
            if "pure RSA " + direction in samples:
                q, r = samples["pager (vs pure RSA) " + direction], samples["pure RSA " + direction]
                qm, rm = statistics.median(q), statistics.median(r)
                rsa_rows.append({
                    "size": label, "direction": direction, "n": len(r), "pager_ms": qm * 1000,
                    "pure_rsa_ms": rm * 1000, "speedup": rm / qm, "pager_spread": spread(q),
                    "pure_rsa_spread": spread(r), "blocks": -(-size // OAEP_BLOCK),
                })
                if max(spread(q), spread(r)) > NOISY:
                    noisy.append("%s %s (vs pure RSA)" % (label, direction))
    return main_rows, rsa_rows, noisy


def _target_text(target):
    return "<= %.1fx floor" % target if target is not None else None


def to_contract(main_rows, rsa_rows, notes):
    rows = []
    for r in main_rows:
        rows.append({
            "figure": "%s %s" % (r["direction"], r["size"]), "value": round(r["pager_ms"], 4), "unit": "ms",
            "reference": round(r["floor_ms"], 4), "reference_label": FLOOR_LABEL, "ratio": round(r["ratio"], 4),
            "target": _target_text(r["target"]), "pass": r["pass"],
            "n": r["n"], "spread": round(r["pager_spread"], 4), "reference_spread": round(r["floor_spread"], 4),
            "paired_ratio": round(r["paired_ratio"], 4),
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
    return {"benchmark": "crypto", "rows": rows, "notes": notes}


def _pct(x):
    return "%.0f%%" % (100 * x) if x < 10 else ">999%"


def print_tables(main_rows, rsa_rows, notes, out=sys.stdout):
    w = out.write
    w("Seal and open, per message: pager against the floor (median of n interleaved rounds)\n\n")
    head = ("size", "direction", "pager ms", "floor ms", "ratio", "target", "result", "n", "spread p/f")
    fmt = "%-7s %-9s %10s %10s %6s %-14s %-6s %4s %11s\n"
    w(fmt % head)
    w(fmt % tuple("-" * len(h) for h in head))
    for r in main_rows:
        result = "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        w(fmt % (r["size"], r["direction"], "%.3f" % r["pager_ms"], "%.3f" % r["floor_ms"], "%.2fx" % r["ratio"],
                 _target_text(r["target"]) or "- (none)", result, r["n"],
                 "%s/%s" % (_pct(r["pager_spread"]), _pct(r["floor_spread"]))))
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
    args = parser.parse_args(argv)

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
    measured = {}
    for label, size, _ in sizes:
        measured[label] = measure_size(k, label, size, args.quick, log)
        gc.collect()

    notes = []
    main_rows, rsa_rows, noisy = build_results(measured)
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
    if misses:
        notes.append("missed: " + ", ".join("%s %s %.2fx > %.1fx" % (r["direction"], r["size"], r["ratio"],
                                                                     r["target"]) for r in misses))

    if args.json:
        print(json.dumps(to_contract(main_rows, rsa_rows, notes), indent=1))
    else:
        print_tables(main_rows, rsa_rows, notes)
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
