"""
Shared pieces of the pager benchmarks: the machine description, the JSON report, the server under test in its own
process (CPU, RSS), RSA keys (generated in parallel, cached), envelopes sealed in advance, user set-up, and a small
non-blocking socket loop that costs the load generator far less CPU than the server it drives.

Everything here talks to loopback addresses only.
"""

import base64
import heapq
import json
import math
import multiprocessing
import os
import platform
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pager  # noqa: E402

from cryptography.hazmat.primitives import serialization  # noqa: E402

PAGER_PY = os.path.join(ROOT, "pager.py")
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOKEN = "bench-safetoken"  # every benchmark account's safetoken
PLAINTEXT_256 = bytes(range(256))

_T0 = time.perf_counter()


def log(text):
    """Progress for people, always on stderr (stdout carries the results, or only the JSON with --json)."""
    sys.stderr.write("[%7.1f s] %s\n" % (time.perf_counter() - _T0, text))
    sys.stderr.flush()


# -- the machine --

def machine():
    info = {"cpu": "unknown", "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cores"] = info["cores"]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return info


def machine_line(info=None):
    info = info or machine()
    try:
        load = " load average %.2f %.2f %.2f at the start;" % os.getloadavg()
    except OSError:
        load = ""
    return "machine: %s, %s cores (%s usable), %s GiB RAM, Linux %s, Python %s;%s generator and server share " \
           "these cores" % (info["cpu"], info["cores"], info["usable_cores"], info.get("memory_gib", "?"),
                            info["kernel"], info["python"], load)


def pager_version():
    """Which pager.py was measured: its version, the SHA-256 of the file, and the checkout's commit when known."""
    import hashlib
    with open(PAGER_PY, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    commit = None
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.decode().strip()
            dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "pager.py"], timeout=10)
            if dirty.returncode == 1:
                commit += " + uncommitted changes to pager.py"
    except (OSError, subprocess.SubprocessError):
        pass
    return "pager %s, pager.py sha256 %s%s" % (pager.__version__, digest, ", commit %s" % commit if commit else "")


def machine_text():
    """The machine for the top of the human output: bench/machine.py's description when it is there."""
    try:
        sys.path.insert(0, HERE)
        import machine as machine_module
        return machine_module.describe()
    except Exception:  # an older checkout without it, or a change in it: the short line will do
        return machine_line()
    finally:
        if sys.path and sys.path[0] == HERE:
            del sys.path[0]


# -- statistics --

def percentile(values, q):
    """Nearest-rank percentile of an unsorted list (q from 0 to 100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(values):
    """p50, p99, max and mean of latencies in seconds, as milliseconds."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered), max(1, math.ceil(q / 100.0 * len(ordered)))) - 1] * 1000
    return {"n": len(ordered), "p50": pick(50), "p99": pick(99), "max": ordered[-1] * 1000,
            "mean": sum(ordered) / len(ordered) * 1000}


def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float) and value >= 100:
        return "{:,.0f}".format(value)
    return "{:,.{}f}".format(value, digits)


# -- the report --

class Report:
    """
    Rows and notes in the shape every benchmark prints with --json:
    {"benchmark", "rows": [{"figure", "value", "unit", "reference", "reference_label", "ratio", "target", "pass"}],
    "notes"}.  Without --json, a table for people, with the machine at the top.
    """

    def __init__(self, name, as_json=False):
        self.name = name
        self.as_json = as_json
        self.rows = []
        self.notes = []
        self.machine = machine()
        self.machine_line = machine_line(self.machine)
        self.version = pager_version()  # at the start: the file may change while a long run goes on
        self.say(machine_text())
        self.say("measuring: " + self.version)

    def say(self, text=""):
        """A line of human output: stdout normally, stderr under --json."""
        stream = sys.stderr if self.as_json else sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def row(self, figure, value, unit, reference=None, reference_label=None, target=None, passed=None,
            ratio=None):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            self.note("%s: not measured." % figure)
            return
        value = float(value)
        if ratio is None and reference not in (None, 0):
            ratio = value / float(reference)
        self.rows.append({
            "figure": figure, "value": round(value, 6), "unit": unit,
            "reference": None if reference is None else float(reference), "reference_label": reference_label,
            "ratio": None if ratio is None else round(float(ratio), 6), "target": target,
            "pass": None if passed is None else bool(passed),
        })

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)

    def failed(self):
        return [r for r in self.rows if r["pass"] is False]

    def finish(self):
        self.note(self.machine_line)
        self.note("measured: " + self.version)
        if self.as_json:
            sys.stdout.write(json.dumps({"benchmark": self.name, "rows": self.rows, "notes": self.notes}, indent=1)
                             + "\n")
            sys.stdout.flush()
            return
        out = sys.stdout
        out.write("\n== %s: results ==\n" % self.name)
        width = max([len(r["figure"]) for r in self.rows] + [10])
        for r in self.rows:
            line = "%-*s %14s %-6s" % (width, r["figure"], fmt(r["value"], 2), r["unit"])
            if r["reference"] is not None:
                line += "  ref %s (%s), ratio %s" % (fmt(r["reference"], 2), r["reference_label"],
                                                      fmt(r["ratio"], 3))
            if r["target"] is not None:
                line += "  target %s: %s" % (r["target"], "PASS" if r["pass"] else "MISS")
            out.write(line + "\n")
        if self.notes:
            out.write("\nnotes:\n")
            for n in self.notes:
                out.write("  - %s\n" % n)
        out.flush()


# -- CPU and memory of the processes --

def self_cpu():
    """CPU seconds (user + system) of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid):
    """CPU seconds (utime + stime) of another process, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid):
    """
    CPU seconds of process C{pid} and of its children (a pager server's signature checker process): what the
    server costs the machine.
    """
    total = proc_cpu(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy():
    """CPU seconds the whole machine spent busy (every core, every process), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user and nice
    return (sum(fields) - idle - guest) / CLK_TCK


class CpuMeter:
    """
    CPU used by the generator (this process) and the server (with its signature checker process) between start
    and stop, with the wall time, and what the rest of the machine used meanwhile (other processes compete for the
    same cores).
    """

    def __init__(self, server_pid=None):
        self.server_pid = server_pid
        self.wall0 = time.perf_counter()
        self.self0 = self_cpu()
        self.server0 = tree_cpu(server_pid) if server_pid else None
        self.busy0 = machine_busy()
        self.result = None

    def stop(self):
        wall = time.perf_counter() - self.wall0
        gen = self_cpu() - self.self0
        srv = tree_cpu(self.server_pid) - self.server0 if self.server_pid else None
        busy = machine_busy()
        others = None
        if busy is not None and self.busy0 is not None:
            others = max(0.0, busy - self.busy0 - gen - (srv or 0))
        self.result = {"wall": wall, "generator": gen, "server": srv, "others": others}
        return self.result


def others_row(report, figure, cpu):
    """A row with the share of a core other processes used during a measurement (they compete for the cores)."""
    if cpu.get("others") is not None and cpu["wall"] > 0:
        report.row(figure, 100 * cpu["others"] / cpu["wall"], "% core")


def cpu_text(cpu, per=None, unit_name="message", scale=1e6, scale_unit="us"):
    """One line about a CpuMeter result, optionally per unit of work (in microseconds unless told)."""
    text = "CPU over %.2f s: generator %.2f s (%.0f%% of a core), server %.2f s (%.0f%% of a core)" % (
        cpu["wall"], cpu["generator"], 100 * cpu["generator"] / cpu["wall"], cpu["server"] or 0,
        100 * (cpu["server"] or 0) / cpu["wall"])
    if cpu.get("others") is not None:
        text += ", other processes %.0f%% of a core" % (100 * cpu["others"] / cpu["wall"])
    if per:
        text += "; per %s: generator %.1f %s, server %.1f %s" % (
            unit_name, cpu["generator"] / per * scale, scale_unit, (cpu["server"] or 0) / per * scale, scale_unit)
    return text


class RssSampler:
    """Samples a process's VmRSS every C{interval} seconds in a thread; C{peak}, C{first} and C{samples} in KiB."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.samples.append(proc_rss_kib(self.pid))
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(proc_rss_kib(self.pid))
            except OSError:
                return

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        try:
            self.samples.append(proc_rss_kib(self.pid))
        except OSError:
            pass
        return self

    @property
    def first(self):
        return self.samples[0]

    @property
    def peak(self):
        return max(self.samples)


def raise_nofile(wanted=None):
    """Raise this process's soft RLIMIT_NOFILE up to C{wanted} (or the hard limit); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None or hard != resource.RLIM_INFINITY and wanted > hard else wanted
    if target == resource.RLIM_INFINITY:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- the servers under test --

def free_port():
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


PAGER_BENCH_ARGS = [
    "--max-connections-per-address", "100000", "--address-free-failures", "1000000", "--max-in-flight", "1024",
    "--max-pending-messages", "1000000", "--max-pending-bytes", "10000000000",
    "--max-sender-pending-messages", "1000000", "--max-sender-pending-bytes", "10000000000",
    "--max-db-bytes", "100000000000",
    "--argon2-per-address", "100000", "--argon2-per-account", "100000",
    "--group-fanout-rate", "1000000000",
]
RAISED_LIMITS_NOTE = ("The server ran with its per-address and per-user limits raised, since every connection comes "
                      "from 127.0.0.1: --max-connections-per-address 100000, --address-free-failures 1000000, "
                      "--max-in-flight 1024, --max-pending-messages 1000000, --max-pending-bytes 10000000000, "
                      "--max-sender-pending-messages 1000000, --max-sender-pending-bytes 10000000000, "
                      "--max-db-bytes 100000000000, "
                      "--argon2-per-address 100000, --argon2-per-account 100000, --group-fanout-rate 1000000000.")


class ServerProcess:
    """A server under test in its own process: started, polled until it answers, stopped with SIGTERM (then KILL)."""

    def __init__(self, argv, port, workdir, name, nofile=None, expect_hello=True):
        self.argv, self.port, self.workdir, self.name = argv, port, workdir, name
        self.nofile = nofile
        self.expect_hello = expect_hello
        self.proc = None
        self.log_path = os.path.join(workdir, name + ".log")

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=60.0):
        nofile = self.nofile

        def limits():
            if nofile:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, preexec_fn=limits if nofile else None)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s at start; see %s:\n%s" % (
                    self.name, self.proc.returncode, self.log_path, self.log_tail()))
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("%s did not answer within %.0f s; see %s" % (self.name, timeout, self.log_path))
            time.sleep(0.05)

    def _answers(self):
        try:
            s = socket.create_connection((LOOPBACK, self.port), timeout=1)
        except OSError:
            return False
        try:
            if not self.expect_hello:
                return True
            s.settimeout(5)
            data = b""
            while b"\n" not in data:
                piece = s.recv(65536)
                if not piece:
                    return False
                data += piece
            return data.startswith(b'{"type":"hello"')
        except OSError:
            return False
        finally:
            s.close()

    def cpu(self):
        return tree_cpu(self.pid)

    def rss_kib(self):
        return proc_rss_kib(self.pid)

    def log_tail(self, n=20):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=15.0):
        """SIGTERM, then SIGKILL after C{timeout}; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("%s did not stop on SIGTERM within %.0f s: SIGKILL" % (self.name, timeout))
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def start_pager(workdir, extra=(), nofile=None, db=None, name="pager-server"):
    """The pager server under test on a free loopback port, with the benchmark limits plus C{extra} options."""
    port = free_port()
    db = db or os.path.join(workdir, "bench.db")
    argv = [sys.executable, PAGER_PY, "server", "--listen", "tcp:%d:interface=%s:backlog=4096" % (port, LOOPBACK),
            "--db", db] + PAGER_BENCH_ARGS + list(extra)
    return ServerProcess(argv, port, workdir, name, nofile=nofile).start()


def workdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


def start_profile(path, pid, seconds=None):
    """
    Sample a server with py-spy into C{path} (.svg: flame graph; .txt: collapsed stacks; .json: speedscope), for
    C{seconds} or until it exits, only while a thread holds the GIL.  Non-blocking sampling: the server is not
    paused.
    """
    import shutil
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    fmt = "raw" if path.endswith(".txt") else "speedscope" if path.endswith(".json") else "flamegraph"
    # --gil: only the samples of the thread holding the GIL, which is what bounds a CPython server's throughput.
    argv = [spy, "record", "--pid", str(pid), "--output", path, "--format", fmt, "--rate", "250", "--threads",
            "--nonblocking", "--gil"]
    if seconds:
        argv += ["--duration", str(int(math.ceil(seconds)))]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_profile(proc, report, path, what):
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = b"py-spy did not finish"
    if proc.returncode == 0:
        report.note("py-spy profile of the server during %s: %s" % (what, path))
    else:
        report.note("py-spy failed: %s" % err.decode("utf-8", "replace").strip()[-300:])


# -- RSA keys: generated in parallel once, cached between runs --

def default_key_cache():
    return os.path.join(tempfile.gettempdir(), "pager-bench-keys-%d.pem" % os.getuid())


def _generate_key_pem(_):
    key = pager.generate_private_key()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_blocks(data):
    end = b"-----END PRIVATE KEY-----\n"
    return [block + end for block in data.split(end) if block.strip()]


def load_keys(n, cache=None, processes=None):
    """
    C{n} RSA-2048 private keys.  Keys already in the cache file are reused; missing ones are generated in
    C{processes} worker processes and appended.  C{cache=""} turns the cache off.
    """
    if cache is None:
        cache = default_key_cache()
    pems = []
    if cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            pems = _pem_blocks(f.read())[:n]
    missing = n - len(pems)
    if missing > 0:
        log("generating %d RSA-2048 keys (%d cached)" % (missing, len(pems)))
        if missing >= 8:
            with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
                new = pool.map(_generate_key_pem, range(missing), chunksize=max(1, missing // 64))
        else:
            new = [_generate_key_pem(i) for i in range(missing)]
        if cache:
            fd = os.open(cache, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(b"".join(new))
        pems += new
    return [serialization.load_pem_private_key(p, None, unsafe_skip_rsa_key_validation=True) for p in pems]


# -- envelopes sealed in advance --

_SEAL_JOBS = {}


def _seal_job(job):
    sender_index, recipient_index, count = job
    keys, names, plaintext = _SEAL_JOBS["keys"], _SEAL_JOBS["names"], _SEAL_JOBS["plaintext"]
    priv, name = keys[sender_index], names[sender_index]
    rname, rkey = names[recipient_index], keys[recipient_index]
    prekey = (_SEAL_JOBS.get("prekeys") or {}).get(rname)
    if prekey is not None:  # as a 0.3 client seals: an X25519 wrap to the recipient's signed prekey
        recipients = [pager.DeviceTarget(rname, pager.device_id(rkey), signed_prekey=prekey)]
    else:  # a legacy device (an account made straight in the database): RSA-OAEP
        recipients = {rname: rkey.public_key()}
    out = []
    for _ in range(count):
        sealer = pager.Sealer(priv, name, recipients)
        chunks = sealer.update(plaintext)
        last, signature = sealer.finish()
        chunks += last
        if _SEAL_JOBS.get("envelopes"):
            out.append(pager.Envelope(sealer.header, chunks, signature))
            continue
        tail = b'"size":%d,"header":"%s","chunks":[%s],"signature":"%s"}\n' % (
            len(plaintext), pager.b64(sealer.header).encode(),
            b",".join(b'"%s"' % pager.b64(c).encode() for c in chunks), pager.b64(signature).encode())
        out.append((sealer.message_id.hex().encode(), tail))
    return out


def signed_prekeys(keys, names):
    """
    A signed prekey for each of C{names} (with C{keys}), made here so that envelopes can be sealed to it before the
    server starts: L{register_with_clients} publishes it in place of the one the client made.
    """
    from cryptography.hazmat.primitives.asymmetric import x25519
    now = int(time.time())
    out = {}
    for i, (name, key) in enumerate(zip(names, keys)):
        public = pager.x25519_public_bytes(x25519.X25519PrivateKey.generate().public_key())
        out[name] = pager.sign_prekey(key, name, 1000 + i, public, now - 60, now + pager.PREKEY_LIFETIME)
    return out


def seal_envelopes(keys, names, jobs, plaintext=PLAINTEXT_256, processes=None):
    """Like L{seal_tails}, but each job gives a list of L{pager.Envelope}."""
    return seal_tails(keys, names, jobs, plaintext, processes, envelopes=True)


def seal_tails(keys, names, jobs, plaintext=PLAINTEXT_256, processes=None, envelopes=False, prekeys=None):
    """
    Seal real envelopes in worker processes.  C{jobs} is a list of (sender index, recipient index, count) into
    C{keys}/C{names}; returns, per job, a list of C{(message id hex bytes, tail)} where the tail is the JSON text
    of a send frame from C{"size"} to the end of the line.  Call before any thread is started (workers fork).
    """
    _SEAL_JOBS.update(keys=keys, names=names, plaintext=plaintext, envelopes=envelopes, prekeys=prekeys)
    pieces = []
    index = []
    for j, (s, r, count) in enumerate(jobs):  # split big jobs so both cores stay busy
        step = 500
        for start in range(0, count, step):
            pieces.append((s, r, min(step, count - start)))
            index.append(j)
    total = sum(c for _, _, c in jobs)
    log("sealing %d envelopes of %d bytes" % (total, len(plaintext)))
    if total >= 200:
        with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
            results = pool.map(_seal_job, pieces, chunksize=1)
    else:
        results = [_seal_job(p) for p in pieces]
    out = [[] for _ in jobs]
    for j, result in zip(index, results):
        out[j].extend(result)
    _SEAL_JOBS.clear()
    return out


def envelope_tail(env):
    """The JSON text of a send frame from C{"size"} to the end of the line, for a whole L{pager.Envelope}."""
    return b'"size":%d,"header":"%s","chunks":[%s],"signature":"%s"}\n' % (
        env.size, pager.b64(env.header).encode(), b",".join(b'"%s"' % pager.b64(c).encode() for c in env.chunks),
        pager.b64(env.signature).encode())


def send_frame(rid, recipient, tail, receipt=False):
    """
    A pre-encoded pager send frame (one line, with its newline).  By default it carries C{"receipt":false}:
    benchmark senders ignore receipts, so a server that knows the flag makes none for them, and an older one ignores
    the member.  With C{receipt}, the sender asks for receipts, as an interactive client does.
    """
    flag = b"" if receipt else b'"receipt":false,'
    return b'{"type":"send","id":%d,"to":["%s"],%s' % (rid, recipient.encode(), flag) + tail


# -- accounts --

def seed_users_db(db, users, token=TOKEN):
    """
    Create accounts straight in a new server database with pager's own store functions, before the server starts:
    C{users} is a list of (name, private key).  One Argon2id hash (one salt) serves every account, since they all
    share the safetoken; logins still compute Argon2id each time.
    """
    import sqlite3
    conn = sqlite3.connect(db, isolation_level=None)
    pager.prepare_connection(conn)
    txn = conn.cursor()
    pager.create_schema_txn(txn)  # executescript: commits by itself
    txn.execute("BEGIN")
    salt = os.urandom(pager.ARGON2_SALT_SIZE)
    token_hash = pager.hash_token(token, salt)
    now = time.time()
    pems = {}
    for name, key in users:
        pem = pems.get(id(key))
        if pem is None:
            pem = pems[id(key)] = (pager.public_key_pem(key), pager.fingerprint(key))
        pager.add_user_txn(txn, name, pem[0], pem[1], salt, token_hash, now)
    txn.execute("COMMIT")
    conn.close()


def store_messages_db(db, sender, recipients_of, envelopes, batch=5000, receipt=True):
    """
    Queue already sealed messages straight in the database with pager's own C{accept_message_txn}, as if the
    server had accepted them: C{envelopes} is a list of L{pager.Envelope}.  Without C{receipt}, they are stored as
    the server stores a send with "receipt": false (every delivery told: no receipt owed).
    """
    import sqlite3
    limits = pager.Limits(max_pending_messages=10 ** 9, max_pending_bytes=10 ** 15, max_sender_pending_messages=10 ** 9,
                          max_sender_pending_bytes=10 ** 15, max_db_bytes=10 ** 15)
    conn = sqlite3.connect(db, isolation_level=None)
    pager.prepare_connection(conn)
    txn = conn.cursor()
    now = time.time()
    for start in range(0, len(envelopes), batch):
        txn.execute("BEGIN")
        for env in envelopes[start:start + batch]:
            header = pager.parse_header(env.header)
            tail = None  # the push line, stored as the server stores a message it pushes from memory
            if env.size <= pager.PagerServerFactory.inline_bytes:
                tail = pager.push_tail(sender, env.size, now, env.header, env.chunks, env.signature, limits.max_line)
            pager.accept_message_txn(txn, header.message_id, sender, env.header, env.signature, env.size,
                                     env.chunks, recipients_of(header), now, limits, tail=tail)
        if not receipt:
            txn.execute("UPDATE deliveries SET told = 1")
        txn.execute("COMMIT")
    conn.close()


class ReactorThread:
    """Twisted's reactor in a daemon thread, for the set-up steps that use pager.PagerClient."""

    def __init__(self):
        from twisted.internet import reactor
        self.reactor = reactor
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self.thread.start()

    def run(self, coroutine_function, *args, timeout=600):
        from twisted.internet.defer import Deferred
        from twisted.internet.threads import blockingCallFromThread

        def start():
            d = Deferred.fromCoroutine(coroutine_function(self.reactor, *args))
            d.addTimeout(timeout, self.reactor)
            return d
        return blockingCallFromThread(self.reactor, start)

    def stop(self):
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(10)


async def register_with_clients(reactor, port, users, parallel=48, token=TOKEN, prekeys=None):
    """
    Register C{users} (name, private key) through pager.PagerClient, C{parallel} at a time, retrying when busy; a
    user named in C{prekeys} (see L{signed_prekeys}) then publishes that signed prekey in place of the client's own.
    """
    from twisted.internet import defer, task
    semaphore = defer.DeferredSemaphore(parallel)
    address = "tcp:%s:%d" % (LOOPBACK, port)
    retries = [0]

    async def one(name, key):
        for attempt in range(60):
            client = await pager.PagerClient.connect(address, reactor)
            try:
                await client.register(name, token, key)
                if prekeys and name in prekeys:
                    await client.protocol.request("publish_prekeys", signed=prekeys[name].to_json(), replace=True)
                return
            except pager.RateLimited:
                retries[0] += 1
            finally:
                await client.close()
            await task.deferLater(reactor, 0.2 + 0.05 * attempt, lambda: None)
        raise RuntimeError("could not register %s: the server stayed busy" % name)

    def limited(name, key):
        return semaphore.run(lambda: defer.Deferred.fromCoroutine(one(name, key)))

    await defer.gatherResults([limited(n, k) for n, k in users], consumeErrors=True)
    return retries[0]


# -- the load generator's socket loop --

OK_PREFIX = b'{"type":"ok","id":'
ERROR_PREFIX = b'{"type":"error"'
MESSAGE_PREFIX = b'{"type":"message","msg":"'
CHUNK_PREFIX = b'{"type":"message_chunk","msg":"'
SEQ_MEMBER = b'"seq":'
SETTLED_MEMBER = b'"settled":'
OK_LEN = len(OK_PREFIX)
MESSAGE_LEN = len(MESSAGE_PREFIX)
CHUNK_LEN = len(CHUNK_PREFIX)
MAX_ACK_LIST = 1000  # message ids in one list-form ack: the server's max_ack_batch


def ok_id(line):
    """The id of an C{ok} line as raw JSON bytes (b'12' or b'"k"'), without parsing the line."""
    end = line.find(b",", OK_LEN)
    if end < 0:
        end = line.rfind(b"}")
    return line[OK_LEN:end]


def _int_member(line, member, start=0):
    """The integer value of C{member} (b'"name":') in a line, found from C{start}, without parsing it; or None."""
    i = line.find(member, start)
    if i < 0:
        return None
    i += len(member)
    end = i
    while end < len(line) and line[end] in b"-0123456789":
        end += 1
    try:
        return int(line[i:end])
    except ValueError:
        return None


def message_seq(line):
    """The delivery sequence number (C{"seq"}) of a C{message} push, or None when the server sends none."""
    return _int_member(line, SEQ_MEMBER, MESSAGE_LEN + 32)


def settled(line):
    """How many messages an C{ok} to an C{upto} ack says it settled, or None when it does not say."""
    return _int_member(line, SETTLED_MEMBER, OK_LEN)


class Acker:
    """
    A receiver's acknowledgement of the messages one read brought, in the form given: C{upto} (one cumulative ack
    up to the largest delivery sequence number of the read), C{batch} (list-form acks of at most L{MAX_ACK_LIST}
    ids) or C{single} (one ack per message).  A read whose pushes carry no C{"seq"} (a server without cumulative
    acks) is acknowledged with list-form acks instead of C{upto}.

    C{frames(ids, top)} takes the read's message ids (32 hex bytes each) and the largest C{seq} of the read (None
    when the server sends none; pushes come in C{seq} order, so it is the last push's) and returns a list of
    C{(request id bytes, start, end, form, frame bytes)}: the frame acknowledges C{ids[start:end]}, in C{form}, one
    of C{"upto"}, C{"batch"}, C{"single"}.  C{used} counts the frames sent in each form.
    """

    def __init__(self, form):
        if form not in ("upto", "batch", "single"):
            raise ValueError("unknown ack form %r" % (form,))
        self.form = form
        self.next = 0
        self.used = {"upto": 0, "batch": 0, "single": 0}

    def _rid(self):
        self.next += 1
        return b"%d" % self.next

    def frames(self, ids, top):
        out = []
        if not ids:
            return out
        if self.form == "single":
            for i, msg in enumerate(ids):
                rid = self._rid()
                out.append((rid, i, i + 1, "single", b'{"type":"ack","id":%s,"msg":"%s"}\n' % (rid, msg)))
        elif self.form == "upto" and top is not None:
            rid = self._rid()
            out.append((rid, 0, len(ids), "upto", b'{"type":"ack","id":%s,"upto":%d}\n' % (rid, top)))
        else:
            for start in range(0, len(ids), MAX_ACK_LIST):
                end = min(len(ids), start + MAX_ACK_LIST)
                rid = self._rid()
                out.append((rid, start, end, "batch",
                            b'{"type":"ack","id":%s,"msgs":["%s"]}\n' % (rid, b'","'.join(ids[start:end]))))
        self.used[out[0][3]] += len(out)
        return out


class Conn:
    """One non-blocking TCP connection of the L{Loop}: queued writes are coalesced, complete lines are handed on."""

    def __init__(self, loop, sock, on_lines, name=None):
        self.loop, self.sock, self.on_lines, self.name = loop, sock, on_lines, name
        self.fd = sock.fileno()
        self.rbuf = b""
        self.out = []  # queued this round, written by Loop.flush
        self.wbuf = None  # a memoryview the kernel has not taken yet
        self.connecting = True
        self.closed = False
        self.close_reason = None
        self.on_close = None
        self.on_connect = None
        self.read_bytes = 0

    def queue(self, data):
        self.out.append(data)
        if len(self.out) == 1:
            self.loop.dirty.append(self)

    def buffered(self):
        return (len(self.wbuf) if self.wbuf is not None else 0) + sum(len(d) for d in self.out)

    def _flush(self):
        if not self.out or self.closed:
            self.out = []
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out = []
        if self.wbuf is not None or self.connecting:
            self.wbuf = memoryview(bytes(self.wbuf) + data) if self.wbuf is not None else memoryview(data)
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            return self.close(e)
        if n < len(data):
            self.wbuf = memoryview(data)[n:]
            self.loop._want_write(self, True)

    def _writable(self):
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.close(OSError(err, os.strerror(err)))
            self.connecting = False
            if self.on_connect is not None:
                self.on_connect(self)
            if self.wbuf is None:
                self.loop._want_write(self, False)
                return
        if self.wbuf is None:
            self.loop._want_write(self, False)
            return
        try:
            n = self.sock.send(self.wbuf)
        except BlockingIOError:
            return
        except OSError as e:
            return self.close(e)
        if n == len(self.wbuf):
            self.wbuf = None
            self.loop._want_write(self, False)
        else:
            self.wbuf = self.wbuf[n:]

    def _readable(self):
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self.close(e)
        if not data:
            return self.close(EOFError("closed by the peer"))
        self.read_bytes += len(data)
        if self.rbuf:
            data = self.rbuf + data
        lines = data.split(b"\n")
        self.rbuf = lines.pop()
        if lines:
            self.on_lines(self, lines)

    def close(self, reason=None):
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        try:
            self.loop.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        if self.on_close is not None:
            self.on_close(self, reason)


class Loop:
    """A minimal epoll loop for many raw connections, with timers.  Not Twisted: the generator must stay cheap."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.dirty = []
        self._timers = []
        self._seq = 0

    def connect(self, port, on_lines, name=None, host=LOOPBACK):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
        conn = Conn(self, sock, on_lines, name)
        if err not in (0, 115):  # EINPROGRESS
            sock.close()
            raise OSError(err, os.strerror(err))
        self.sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        return conn

    def _want_write(self, conn, on):
        if conn.closed:
            return
        self.sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), conn)

    def call_later(self, delay, fn, *args):
        self._seq += 1
        heapq.heappush(self._timers, (time.perf_counter() + delay, self._seq, fn, args))

    def flush(self):
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                conn._flush()

    def poll(self, timeout):
        self.flush()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - time.perf_counter()))
        for key, mask in self.sel.select(timeout):
            conn = key.data
            if mask & selectors.EVENT_WRITE:
                conn._writable()
            if mask & selectors.EVENT_READ and not conn.closed:
                conn._readable()
        if self._timers:
            now = time.perf_counter()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._timers)
                fn(*args)
        self.flush()

    def run_until(self, done, timeout, tick=None, interval=0.005):
        """Poll until C{done()} is true (True) or C{timeout} seconds pass (False); C{tick(now)} after each poll."""
        deadline = time.perf_counter() + timeout
        while not done():
            now = time.perf_counter()
            if now >= deadline:
                return False
            self.poll(min(interval, deadline - now))
            if tick is not None:
                tick(time.perf_counter())
        return True

    def close(self):
        for key in list(self.sel.get_map().values()):
            key.data.close()
        self.sel.close()


class LoginError(Exception):
    pass


def login_all(loop, port, accounts, window=200, timeout=600, tick=None, on_progress=None, token=TOKEN):
    """
    Connect and log in raw connections, at most C{window} connecting or logging in at once (the server queues at
    most --argon2-queue token hashes).  C{accounts} is a list of (name, private key, receive).  The proof is signed
    here over each connection's challenge.  A login answered C{rate_limited} is retried with the new challenge.

    Returns (connections, stats): each connection has C{t_start}, C{t_hello}, C{t_ok}, C{early} (lines that came
    before the scenario took over); stats counts retries.
    """
    conns = [None] * len(accounts)
    fps = {}
    state = {"next": 0, "active": 0, "done": 0, "retries": 0, "errors": []}

    def send_login(conn):
        name, key, receive = accounts[conn.index]
        fp = fps.get(id(key))
        if fp is None:
            fp = fps[id(key)] = pager.fingerprint(key)
        proof = pager.sign_auth(key, "login", conn.server_id, name, conn.challenge, fp)
        conn.queue(pager.encode_frame({"type": "login", "id": "login", "user": name, "token": token,
                                       "proof": pager.b64(proof), "receive": receive}) + b"\n")

    def take_challenge(conn, frame):
        conn.challenge = base64.b64decode(frame["challenge"])

    def on_lines(conn, lines):
        for line in lines:
            if conn.t_ok is not None:
                conn.early.append(line)
                continue
            if not line.strip():
                continue
            frame = json.loads(line)
            kind = frame.get("type")
            if kind == "hello":
                conn.t_hello = time.perf_counter()
                conn.server_id = frame["server_id"]
                take_challenge(conn, frame)
                send_login(conn)
            elif kind == "ok" and frame.get("id") == "login":
                conn.t_ok = time.perf_counter()
                state["active"] -= 1
                state["done"] += 1
                if on_progress is not None:
                    on_progress(state["done"])
            elif kind == "error" and frame.get("id") == "login" and frame.get("code") == "rate_limited":
                state["retries"] += 1
                take_challenge(conn, frame)
                loop.call_later(0.25, send_login, conn)
            elif kind == "error" and frame.get("id") == "login":
                raise LoginError("login of %s failed: %s" % (accounts[conn.index][0], frame))
            elif kind in ("message", "message_chunk", "receipt"):
                conn.early.append(line)
            else:
                raise LoginError("unexpected frame while logging in %s: %r" % (accounts[conn.index][0], line[:200]))

    def on_close(conn, reason):
        if conn.t_ok is None:
            state["errors"].append("%s: %s" % (accounts[conn.index][0], reason))

    def start_more():
        while state["active"] < window and state["next"] < len(accounts):
            i = state["next"]
            state["next"] += 1
            state["active"] += 1
            conn = loop.connect(port, on_lines, name=accounts[i][0])
            conn.index, conn.t_start, conn.t_hello, conn.t_ok, conn.early = i, time.perf_counter(), None, None, []
            conn.on_close = on_close
            conns[i] = conn

    def step(now):
        start_more()
        if tick is not None:
            tick(now)
        if state["errors"]:
            raise LoginError("connections closed while logging in: %s" % "; ".join(state["errors"][:5]))

    start_more()
    if not loop.run_until(lambda: state["done"] == len(accounts), timeout, tick=step, interval=0.01):
        raise LoginError("only %d of %d logins done within %.0f s" % (state["done"], len(accounts), timeout))
    for conn in conns:
        conn.on_close = None
    return conns, {"retries": state["retries"]}


def ping_all(loop, conns, timeout=60):
    """A ping on every connection, waiting for every answer: keeps idle connections alive between scenarios."""
    waiting = set()
    saved = {}

    def on_lines(conn, lines):
        for line in lines:
            if line.startswith(OK_PREFIX) and ok_id(line) == b'"keepalive"':
                waiting.discard(conn)

    for conn in conns:
        if conn.closed:
            continue
        saved[conn] = conn.on_lines
        conn.on_lines = on_lines
        waiting.add(conn)
        conn.queue(b'{"type":"ping","id":"keepalive"}\n')
    ok = loop.run_until(lambda: not waiting, timeout)
    for conn, handler in saved.items():
        conn.on_lines = handler
    return ok
