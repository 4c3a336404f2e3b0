"""Shared pieces of the benchmark harness: the federation lab as a library, process
metrics from /proc, namespaces of our own, machine facts.

Every namespace the benchmarks create starts with "braidbench-"; the lab library is told
so (set_namespace_prefix) before anything is built, and the subnet is 10.77.55.
"""

import contextlib
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "Tests", "Federation", "lab"))
import lab  # noqa: E402  (the federation lab, used as a library and never changed)

PREFIX = "braidbench-"
SUBNET = "10.77.55"
PYTHON = "/usr/bin/python3"
lab.set_namespace_prefix(PREFIX)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def median(values):
    """The median of the values that are not None; None when there are none."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_file_limit(n=1048576):
    """Children (servers, tsung) inherit it; setpriv keeps it across the user switch."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- processes ---------------------------------------------------------------------------

def _stat(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def session_members(sid):
    """Live processes of session SID (a Service's pid: the lab starts each in a new session)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(int(entry))
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                members.append(int(entry))
    return members


def rss_kib(pids):
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
    return total


def hwm_kib(pids):
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
    return total


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def server_pids(sid):
    """The server processes of a service, without the wrappers (setpriv, ip, sh, erl helpers
    that are sleeping shells): every member whose command is a real server."""
    pids = []
    for pid in session_members(sid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/comm") as handle:
                comm = handle.read().strip()
            if comm in ("beam.smp", "lua5.4", "lua5.3", "lua5.2", "lua", "prosody", "braid",
                        "braid-release", "epmd", "erl_child_setup", "inet_gethost") or comm.startswith("braid"):
                pids.append(pid)
    return pids or session_members(sid)


class Sampler(threading.Thread):
    """Polls a callable every INTERVAL seconds and keeps the maximum of each key."""

    def __init__(self, probe, interval=0.5):
        super().__init__(daemon=True)
        self.probe = probe
        self.interval = interval
        self.peak = {}
        self.samples = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                values = self.probe()
                self.samples.append((time.monotonic(), values))
                for key, value in values.items():
                    if value is not None and value > self.peak.get(key, float("-inf")):
                        self.peak[key] = value
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)
        return self.peak


# -- namespaces of our own (loopback only) -----------------------------------------------

class LoopbackNamespace:
    """A namespace with only `lo`: servers and load generators inside cannot reach anything,
    and nothing outside sees them. Removed (every process in it stopped by PID) on exit."""

    def __init__(self, name):
        self.ns = PREFIX + name

    def __enter__(self):
        lab.remove_namespace(self.ns)
        lab.run(["ip", "netns", "add", self.ns])
        lab.run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        os.makedirs(f"/etc/netns/{self.ns}", exist_ok=True)
        lab.write_file(f"/etc/netns/{self.ns}/hosts", "127.0.0.1 localhost\n::1 localhost\n")
        lab.write_file(f"/etc/netns/{self.ns}/resolv.conf", "nameserver 127.0.0.1\n")
        return self

    def __exit__(self, *exc):
        lab.remove_namespace(self.ns)
        return False

    def argv(self, argv):
        return lab.in_netns(self.ns, argv)


# -- facts -------------------------------------------------------------------------------

def _first_line(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def dpkg_version(package):
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or None


def machine_facts(braid_binary):
    cpu = None
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", handle.read()).group(1))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    with open("/proc/loadavg") as handle:
        load = [float(x) for x in handle.read().split()[:3]]
    # The binary may be older than HEAD (--no-build, --braid): record when it was built, and
    # the last commit touching Sources/ before then.
    built = os.path.getmtime(braid_binary) if os.path.exists(braid_binary) else None
    sources_commit = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %cI",
                                     f"--until=@{int(built)}" if built else "HEAD", "--", "Sources/"],
                                    capture_output=True, text=True).stdout.strip() if built else None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "load_average_at_start": load,
        "versions": {
            "braid_commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "braid_binary": braid_binary,
            "braid_binary_built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(built)) if built else None,
            "braid_sources_commit_at_build": sources_commit,
            "prosody": dpkg_version("prosody"),
            "ejabberd": dpkg_version("ejabberd"),
            "tsung": dpkg_version("tsung"),
            "erlang": dpkg_version("erlang-base"),
            "lua": dpkg_version("lua5.4"),
            "python": platform.python_version(),
        },
    }
