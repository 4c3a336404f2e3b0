"""s2s: the first stanza of a NEW domain pair on a link that is already up (issue 16).

For each combination (sender's server, receiver's server) the federation lab builds two
providers, A (the sender's kind) and B (the receiver's kind), with N domains each and one
user per domain, real DNSSEC. bench/xmppdriver.py runs inside A's namespace, logs every
user in at its own provider, then, one message at a time (each sent once the previous one
has arrived):
  warm-up  a1 -> b1, which opens the s2s link between A and B (not counted);
  new      one message on every other ordered pair ai -> bj (N² - 1 pairs, none used
           before): the first stanza of a pair the link has not carried, latency = arrival
           at bj's client - send by ai's client;
  warm     warm_repeats more messages round-robin over those pairs, now authorised: the
           reference latency of the same path.
The servers' CPU seconds (/proc) and the s2s TCP connections between A and B (seen from A)
are read at the phase boundaries: the driver stops at each and waits for the harness.

What the figures show: a server that multiplexes domain pairs over one authenticated link
(Braid's XEP-0288 bidi link with XEP-0220 dialback "piggybacking", or a peer's
equivalent) authorises a new pair with one round trip on the open link; a classic server
(Prosody, ejabberd) opens a new TCP connection per pair (TLS, authentication), which the
connection count at the end shows.
"""

import json
import os
import queue
import subprocess
import threading
import time

from common import PYTHON, HERE, cpu_seconds, lab, log, SUBNET
import fanout  # noqa: F401  (registers the benchmark adapters: log levels, limits)
from fanout import PREFIXES, side_pids

COMBOS = [("braid", "braid"), ("braid", "prosody"), ("prosody", "braid"),
          ("prosody", "prosody"), ("ejabberd", "ejabberd"), ("braid", "ejabberd"), ("ejabberd", "braid")]
REQUIRED = [("braid", "braid"), ("braid", "prosody"), ("prosody", "braid")]


def combo_name(combo):
    return f"{combo[0]}-{combo[1]}"


class Driver:
    """The driver as a child process whose stderr is read line by line (sync points)."""

    def __init__(self, argv):
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.stderr = []
        self.stdout = []
        self.readers = [threading.Thread(target=self._read_stderr, daemon=True),
                        threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_stderr(self):
        for line in self.process.stderr:
            self.stderr.append(line)
            if line.startswith('{"sync"'):
                self.lines.put(json.loads(line)["sync"])
        self.lines.put(None)  # closed: the driver ended

    def _read_stdout(self):
        for line in self.process.stdout:
            self.stdout.append(line)

    def wait_sync(self, name, timeout):
        """True at the sync point NAME; False if the driver ended or TIMEOUT passed."""
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        return got == name

    def go(self):
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self, timeout):
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for reader in self.readers:
            reader.join(5)
        text = "".join(self.stdout).strip()
        return json.loads(text.splitlines()[-1]) if text else {}


def run_one(combo, n, braid_binary, warm_repeats, timeout, warmup_timeout, give_up_after):
    sender, receiver = combo
    os.environ["BRAID_BINARY"] = braid_binary
    name_a, prefix_a = PREFIXES[sender][0], PREFIXES[sender][1]
    name_b, prefix_b = PREFIXES[receiver][2], PREFIXES[receiver][3]
    specs = [lab.ProviderSpec(sender, name_a, prefix_a, domains=n, users_per_domain=1, direct_tls=(sender == "braid")),
             lab.ProviderSpec(receiver, name_b, prefix_b, domains=n, users_per_domain=1, direct_tls=(receiver == "braid"))]
    figures = {"combo": combo_name(combo), "sender": sender, "receiver": receiver, "n": n,
               "new_pairs": n * n - 1, "warm_repeats": warm_repeats}
    started = time.monotonic()
    try:
        with lab.Lab(specs, subnet=SUBNET) as running:
            a, b = running.providers
            figures["setup_seconds"] = round(time.monotonic() - started, 1)
            accounts = [{"jid": a.users(d)[0], "password": lab.PASSWORD, "host": a.ip, "port": lab.C2S_PORT} for d in a.domains]
            accounts += [{"jid": b.users(d)[0], "password": lab.PASSWORD, "host": b.ip, "port": lab.C2S_PORT} for d in b.domains]
            pairs = [[i, n + j] for i in range(n) for j in range(n) if (i, j) != (0, 0)]
            plan = {"accounts": accounts, "pairs": [], "login_timeout": 60,
                    "sequential": {"warmup": [[0, n]], "pairs": pairs, "warm_repeats": warm_repeats,
                                   "timeout": timeout, "warmup_timeout": warmup_timeout,
                                   "give_up_after": give_up_after, "sync": True}}
            plan_file = os.path.join(running.workdir, "newpair-plan.json")
            with open(plan_file, "w") as handle:
                json.dump(plan, handle)

            def snapshot():
                out, into = running.connections(a, b)
                return {"connections": len(out) + len(into), "out": len(out), "in": len(into),
                        "cpu_a": cpu_seconds(side_pids(a)), "cpu_b": cpu_seconds(side_pids(b))}

            driver = Driver(lab.in_netns(a.ns, [PYTHON, os.path.join(HERE, "xmppdriver.py"), plan_file]))
            marks = {}
            # login (60 s at most) and the warm-up message, then each phase's worst case
            limits = {"new-start": 90 + warmup_timeout,
                      "warm-start": 30 + len(pairs) * timeout,
                      "warm-end": 30 + warm_repeats * timeout}
            for name in ("new-start", "warm-start", "warm-end"):
                if not driver.wait_sync(name, limits[name]):
                    figures["error"] = f"driver did not reach {name}: " + "".join(driver.stderr)[-400:].strip()
                    break
                marks[name] = snapshot()
                driver.go()
            result = driver.finish(30 if "error" not in figures else 5)
            if not result and "error" not in figures:
                figures["error"] = f"driver exited {driver.process.returncode}: " + "".join(driver.stderr)[-400:].strip()
            if result.get("login_failed"):
                figures["error"] = f"{result['login_failed']} logins failed: {result.get('login_failures')}"
            seq = result.get("sequential") or {}
            figures["login_seconds"] = result.get("login_seconds")
            figures["warmup"] = seq.get("warmup")
            figures["warmup_ms"] = (seq.get("warmup") or [{}])[0].get("ms")
            if seq and not seq.get("warmup_delivered"):
                figures["note"] = "the warm-up message did not arrive: the link was not up before the new pairs"
            new, warm = seq.get("new_pair") or {}, seq.get("warm") or {}
            for key in ("median", "p90", "p99", "max", "min"):
                figures[f"new_{key}_ms"] = new.get(key)
                figures[f"warm_{key}_ms"] = warm.get(key)
            figures["new_delivered"] = new.get("count")
            figures["warm_delivered"] = warm.get("count")
            figures["new_ms"] = seq.get("new_pair_ms")
            figures["warm_ms"] = seq.get("warm_ms")
            figures["new_lost"], figures["new_errors"] = seq.get("lost"), seq.get("errors")
            figures["warm_lost"], figures["warm_errors"] = seq.get("warm_lost"), seq.get("warm_errors")
            figures["new_problems"] = seq.get("new_pair_problems")
            figures["gave_up"] = seq.get("gave_up")
            figures["new_phase_seconds"] = seq.get("new_pair_seconds")
            figures["warm_phase_seconds"] = seq.get("warm_seconds")
            figures["error_conditions"] = result.get("error_conditions")
            if figures["new_median_ms"] and figures["warm_median_ms"]:
                figures["new_over_warm"] = round(figures["new_median_ms"] / figures["warm_median_ms"], 2)
            m0, m1, m2 = marks.get("new-start"), marks.get("warm-start"), marks.get("warm-end")
            if m0:
                figures["connections_after_warmup"] = m0["connections"]
            if m1:
                figures["connections_after_new"] = m1["connections"]
                figures["cpu_new_a_seconds"] = round(m1["cpu_a"] - m0["cpu_a"], 2)
                figures["cpu_new_b_seconds"] = round(m1["cpu_b"] - m0["cpu_b"], 2)
                if new.get("count"):
                    figures["cpu_ms_per_new_pair"] = round(1000 * (m1["cpu_a"] - m0["cpu_a"] + m1["cpu_b"] - m0["cpu_b"])
                                                           / new["count"], 2)
            if m2:
                figures["connections_end"] = m2["connections"]
                figures["connections_end_out"] = m2["out"]
                figures["connections_end_in"] = m2["in"]
                figures["cpu_warm_a_seconds"] = round(m2["cpu_a"] - m1["cpu_a"], 2)
                figures["cpu_warm_b_seconds"] = round(m2["cpu_b"] - m1["cpu_b"], 2)
                if warm.get("count"):
                    figures["cpu_ms_per_warm_message"] = round(1000 * (m2["cpu_a"] - m1["cpu_a"] + m2["cpu_b"] - m1["cpu_b"])
                                                               / warm["count"], 2)
    except Exception as error:  # noqa: BLE001 - a failed combination is a result, not a crash
        figures["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    log(f"newpair {combo_name(combo)} {n}x{n}: "
        + json.dumps({k: v for k, v in figures.items() if k not in ("new_ms", "warm_ms", "warmup", "new_problems")}))
    return figures


def run(combos, n, braid_binary, warm_repeats=50, timeout=10, warmup_timeout=30, give_up_after=3):
    results = [run_one(tuple(combo), n, braid_binary, warm_repeats, timeout, warmup_timeout, give_up_after)
               for combo in combos]
    return {"results": results, "n": n, "tuning": fanout.TUNING,
            "timeout_seconds": timeout, "warmup_timeout_seconds": warmup_timeout, "give_up_after": give_up_after}
