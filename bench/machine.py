#!/usr/bin/env python3
"""
The machine a benchmark ran on: CPU model, core count, memory, Python, and the versions of Twisted, cryptography
and the OpenSSL that cryptography is linked against.

    python bench/machine.py           # a few aligned lines
    python bench/machine.py --json    # the same as one JSON object

Other scripts import L{info} and L{describe}.
"""

import argparse
import json
import os
import platform
import sys


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_mib():
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024  # the file gives kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(module_name):
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", None) or "unknown"


def _openssl():
    try:
        from cryptography.hazmat.backends.openssl import backend
        return backend.openssl_version_text()
    except Exception:  # an old or unusual cryptography build: report rather than fail
        return "unknown"


def info():
    """A dict describing this machine and the software under test."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mib": _memory_mib(),
        "os": "%s %s" % (platform.system(), platform.release()),
        "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
        "twisted": _version("twisted"),
        "cryptography": _version("cryptography"),
        "openssl": _openssl(),
        "load_average": list(load) if load else None,
    }


def describe(machine=None):
    """L{info} as aligned text lines."""
    m = machine or info()
    memory = "%.1f GiB" % (m["memory_mib"] / 1024.0) if m["memory_mib"] else "unknown"
    load = " ".join("%.2f" % x for x in m["load_average"]) if m["load_average"] else "unknown"
    lines = [
        ("CPU", m["cpu"]),
        ("cores", str(m["cores"])),
        ("memory", memory),
        ("OS", m["os"]),
        ("Python", m["python"]),
        ("Twisted", m["twisted"]),
        ("cryptography", m["cryptography"]),
        ("OpenSSL", m["openssl"]),
        ("load average", load + " (1, 5, 15 min)"),
    ]
    return "\n".join("%-13s %s" % (k + ":", v) for k, v in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(info(), indent=2))
    else:
        print(describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
