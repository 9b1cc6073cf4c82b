#!/usr/bin/env python3
"""
Run every benchmark in bench/ and print one combined report.

    python bench/run.py                    # every benchmark that exists, full length
    python bench/run.py --quick            # passes --quick on: a smoke test in a minute or two
    python bench/run.py crypto relay       # only these
    python bench/run.py --timeout 600      # seconds allowed to each benchmark (default 1800, or 300 with --quick)

Each benchmark is a plain script, run here as a subprocess with the same Python: ``python bench/NAME.py --json``
(plus ``--quick`` when given).  A script that does not exist yet is skipped with a note.  The report is the machine
header (bench/machine.py), then one table of every row of every benchmark, its last two columns the row's target
and whether it was met (pass, FAIL, "not judged" for a target the run could not decide, "-" without a target), then
how many targets were met and a line for each one missed or not judged.  The exit status is 0 even when targets are
missed, since this is a report; it is 1 when a script crashed, timed out or broke the contract below.

The JSON contract
-----------------

With ``--json``, a benchmark prints exactly one JSON object on stdout and nothing else there (progress goes to
stderr); it exits 0 whenever it measured something, whether or not targets were met:

    {
      "benchmark": "crypto",                 # short name, usually the script's name
      "rows": [
        {
          "figure": "seal 100 B",            # what was measured, short
          "value": 0.318,                    # pager's figure (a number)
          "unit": "ms",                      # unit of value and reference: "ms", "s", "msg/s", "MiB/s", "MiB", ...
          "reference": 0.269,                # what it is compared with, same unit, or null
          "reference_label": "floor (bare primitives)",   # what the reference is, or null
          "ratio": 1.18,                     # value / reference, or null
          "target": "<= 1.3x floor",         # the goal, as text, or null when there is none
          "pass": true                       # whether the target is met; null when there is no target
        }
      ],
      "notes": ["anything a reader should know: noise, skipped parts, load"]
    }

Optional row keys: ``"ratio_kind": "speedup"`` when ``ratio`` is reference / value instead (how many times faster
pager is); ``n`` (samples), ``spread`` and ``reference_spread`` (relative spread of the samples, e.g. interquartile
range over median).  Readers ignore any other key.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import machine  # noqa: E402

# In the order they run.  A benchmark is bench/<name>.py following the contract above.
BENCHMARKS = ["crypto", "store", "relay", "drain", "concurrency", "large", "load", "group"]
REQUIRED_ROW_KEYS = ("figure", "value", "unit", "reference", "reference_label", "ratio", "target", "pass")


class ContractError(Exception):
    pass


def parse_output(stdout):
    """The benchmark's JSON object, checked against the contract; raises L{ContractError}."""
    text = stdout.strip()
    try:
        data = json.loads(text)
    except ValueError:
        # Tolerate stray lines before the object: take the last line that starts one.
        start = text.rfind("\n{")
        try:
            data = json.loads(text[start + 1:] if start >= 0 else "")
        except ValueError:
            raise ContractError("stdout is not one JSON object")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ContractError('no "rows" list')
    for row in data["rows"]:
        if not isinstance(row, dict):
            raise ContractError("a row is not an object")
        missing = [key for key in REQUIRED_ROW_KEYS if key not in row]
        if missing:
            raise ContractError("a row lacks %s" % ", ".join(missing))
        if not isinstance(row["value"], (int, float)) or isinstance(row["value"], bool):
            raise ContractError("row %r has a non-numeric value" % row.get("figure"))
    if not isinstance(data.get("notes", []), list):
        raise ContractError('"notes" is not a list')
    return data


def run_one(name, quick, timeout):
    """Run bench/<name>.py; return C{(status, data, message)}, status one of ok, skipped, crashed."""
    path = os.path.join(HERE, name + ".py")
    if not os.path.exists(path):
        return "skipped", None, "bench/%s.py does not exist yet" % name
    command = [sys.executable, path, "--json"] + (["--quick"] if quick else [])
    start = time.monotonic()
    # A session of its own, so that on a timeout the servers a benchmark started go down with it.
    process = subprocess.Popen(command, cwd=os.path.dirname(HERE), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        return "crashed", None, "timed out after %d s%s" % (timeout, _tail(tail))
    except BaseException:
        _kill_group(process)
        raise
    elapsed = time.monotonic() - start
    stderr = stderr.decode("utf-8", "replace").strip().splitlines()
    try:
        data = parse_output(stdout.decode("utf-8", "replace"))
    except ContractError as e:
        if process.returncode != 0:
            return "crashed", None, "exit status %d after %.0f s%s" % (process.returncode, elapsed,
                                                                      _tail(stderr[-8:]))
        return "crashed", None, "broke the JSON contract: %s%s" % (e, _tail(stderr[-5:]))
    if process.returncode != 0:
        # A script that measured and then failed its own check (load.py when a message was lost) still reports
        # its rows: they show what failed.
        data.setdefault("notes", []).append("exited with status %d: its own check failed" % process.returncode)
    return "ok", data, "%.0f s" % elapsed


def _kill_group(process):
    """Stop the process group led by C{process} (which run_one started): SIGTERM, then SIGKILL after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(lines):
    return "".join("\n      | " + line for line in lines)


def _number(x):
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 100:
        return "%.0f" % x
    if abs(x) >= 10:
        return "%.1f" % x
    if abs(x) >= 1:
        return "%.2f" % x
    return "%#.3g" % x


def _ratio(row):
    ratio = row.get("ratio")
    if ratio is None:
        return "-"
    if row.get("ratio_kind") == "speedup":
        if ratio >= 1 or ratio <= 0:
            return "%sx faster" % _number(ratio)
        return "%sx slower" % _number(1.0 / ratio)
    return "%.2fx" % ratio


def _pass(row):
    if row.get("pass") is None:
        return "not judged" if row.get("target") else "-"
    return "pass" if row["pass"] else "FAIL"


def table(results):
    """The combined table as text."""
    head = ("benchmark", "figure", "pager", "reference", "ratio", "target", "pass")
    lines = []
    for name, data in results:
        for row in data["rows"]:
            unit = row.get("unit") or ""
            value = ("%s %s" % (_number(row["value"]), unit)).strip()
            if row.get("reference") is None:
                reference = "-"
            else:
                reference = ("%s %s" % (_number(row["reference"]), unit)).strip()
                if row.get("reference_label"):
                    reference += ", " + row["reference_label"]
            lines.append((data.get("benchmark") or name, str(row["figure"]), value, reference, _ratio(row),
                          row.get("target") or "-", _pass(row)))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = []
    for line in [head, tuple("-" * w for w in widths)] + lines:
        out.append("  ".join(cell.ljust(w) if i != 2 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run pager's benchmarks and print one report.")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: %s)" % ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark (default 1800, 300 with --quick)")
    args = parser.parse_args(argv)
    names = [n[:-3] if n.endswith(".py") else n for n in args.names] or BENCHMARKS
    timeout = args.timeout or (300 if args.quick else 1800)

    print(machine.describe())
    print()
    results, notes, crashed = [], [], []
    for name in names:
        print("running %s ..." % name, file=sys.stderr, flush=True)
        status, data, message = run_one(name, args.quick, timeout)
        if status == "ok":
            results.append((name, data))
            notes.extend("%s: %s" % (data.get("benchmark") or name, note) for note in data.get("notes", []))
            print("  %s done in %s" % (name, message), file=sys.stderr, flush=True)
        elif status == "skipped":
            notes.append("%s: skipped, %s" % (name, message))
        else:
            crashed.append(name)
            notes.append("%s: CRASHED, %s" % (name, message))

    print(table(results) if results else "(no benchmark produced results)")
    failed = sum(1 for _, data in results for row in data["rows"] if row.get("pass") is False)
    judged = sum(1 for _, data in results for row in data["rows"] if row.get("pass") is not None)
    print()
    print("targets: %d of %d met%s%s" % (judged - failed, judged, "" if not args.quick else " (quick run)",
                                         "; %d benchmark(s) crashed" % len(crashed) if crashed else ""))
    for name, data in results:
        for row in data["rows"]:
            if row.get("target") and row.get("pass") is not True:
                print("  %s %s: %s (target %s)" % ("FAIL      " if row.get("pass") is False else "not judged",
                                                  data.get("benchmark") or name, row["figure"], row["target"]))
    if notes:
        print()
        print("Notes:")
        for note in notes:
            print("  - " + note)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
