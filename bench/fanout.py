"""s2s fan-out: two providers of one kind with N domains each, built with the federation lab.

For each kind (braid, prosody, ejabberd) and N: the lab builds two providers of that kind
(one user per domain) with real DNSSEC; bench/xmppdriver.py, run inside the first
provider's namespace, logs every user in at its own provider and then
  cold: sends one message on every ordered domain pair (2·N² messages) at once and times
        until every one has arrived;
  warm: sends a burst over the same pairs as fast as the sockets take it.
Meanwhile a sampler polls the s2s TCP connections between the providers and each side's
RSS and CPU time.

Tuning written down per kind (TUNING): log levels lowered to warning for all three (the
lab's debug logging would dominate), Prosody with mod_s2s_bidi and a 1024 listen backlog,
ejabberd with a 1024 backlog, 20000 open files (the machine's hard limit) and 65536 Erlang ports, Braid with its
defaults (bidi and multiplexing are built in).
"""

import json
import os
import re
import subprocess
import tempfile
import time

from common import PYTHON, HERE, Sampler, cpu_seconds, hwm_kib, lab, log, rss_kib, server_pids, SUBNET

NOFILE = 20000  # this machine's hard limit (no CAP_SYS_RESOURCE to go higher)

TUNING = {
    "braid": ["log_level warning (the lab writes debug)", "c2s.stanzas_per_second and stanza_burst 100000 (default 200/s, burst 1000: the driver's clients send faster)", "everything else default: XEP-0288 bidi and one link per provider pair are built in",
              "open files 20000 (inherited; the hard limit here)",
              "message archive off: mam.default_preference never (the peers run without an archive here; Braid's as shipped commits every message before delivery, which the mam section measures)"],
    "prosody": ["mod_s2s_bidi loaded (XEP-0288)", "accounts written as internal_hashed files, 4096 iterations", "network_settings.tcp_backlog = 1024",
                "log level warn (the lab writes debug)", "open files 20000 (inherited; the hard limit here)", "lua-unbound hidden, net.adns against the lab's validating unbound (lab default)"],
    "ejabberd": ["listen backlog 1024 on c2s and s2s", "open files 20000 (RLIMIT_NOFILE; the machine's hard limit), ERL_MAX_PORTS 65536",
                 "loglevel warning (the lab writes info)", "s2s_dns_timeout 2, s2s_dns_retries 1 (lab defaults)"],
}


# -- adapters: the lab's providers with benchmark log levels and limits ---------------------

class BenchBraid(lab.BraidProvider):
    def write_config(self):
        super().write_config()
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace("log_level: debug", "log_level: warning")
        # Braid's per-session c2s rate limit (200 stanzas/s) would throttle the driver's
        # clients, which send far faster than people do.
        text = text.replace(f"  direct_tls_port: {lab.C2S_DIRECT_TLS_PORT}\n",
                            f"  direct_tls_port: {lab.C2S_DIRECT_TLS_PORT}\n  stanzas_per_second: 100000\n  stanza_burst: 100000\n", 1)
        # Like the peers here, no message archive: with Braid's on (the default since the
        # archive issue) every message waits for its SQLite commit on both servers, which
        # the mam section measures on its own (archive on ÷ off).
        if "\nmam:" not in text:
            text += "mam:\n  default_preference: never\n"
        lab.write_file(self.config, text, 0o600)


class BenchProsody(lab.ProsodyProvider):
    def write_config(self):
        super().write_config()
        with open(self.config) as handle:
            text = handle.read()
        lab.write_file(self.config, text.replace('min = "debug"', 'min = "warn"'), 0o640)
        lab.chown_tree(self.directory, "prosody")


    def register_users(self):
        """Account files written directly (prosodyctl register takes ~0.5 s per account);
        SCRAM-SHA-1 with 4096 iterations, as bench/servers.py writes them."""
        import hashlib, hmac
        for jid in self.all_users():
            user, domain = jid.split("@")
            encoded = "".join(c if c.isalnum() else "%%%02x" % ord(c) for c in domain)
            directory = os.path.join(self.data, encoded, "accounts")
            os.makedirs(directory, exist_ok=True)
            salt = os.urandom(12).hex()
            salted = hashlib.pbkdf2_hmac("sha1", lab.PASSWORD.encode(), salt.encode(), 4096)
            stored = hashlib.sha1(hmac.new(salted, b"Client Key", "sha1").digest()).hexdigest()
            server = hmac.new(salted, b"Server Key", "sha1").hexdigest()
            with open(os.path.join(directory, f"{user}.dat"), "w") as handle:
                handle.write('return {\n\t["iteration_count"] = 4096;\n\t["salt"] = "%s";\n\t["stored_key"] = "%s";\n'
                             '\t["server_key"] = "%s";\n};\n' % (salt, stored, server))
        lab.chown_tree(self.data, "prosody")


class BenchEjabberd(lab.EjabberdProvider):
    def write_config(self):
        super().write_config()
        with open(self.config) as handle:
            text = handle.read()
        lab.write_file(self.config, text.replace("loglevel: info", "loglevel: warning"), 0o640)
        lab.chown_tree(self.directory, "ejabberd")

    def start(self):
        argv = ["ejabberdctl", "--config-dir", self.config_dir, "--ctl-config", self.ctl_config,
                "--config", self.config, "--spool", self.spool, "--logs", self.logs,
                "--node", self.node, "foreground"]
        self.service = lab.Service("ejabberd", lab.in_netns(self.ns, lab.as_user("ejabberd", argv)),
                                   os.path.join(self.logs, "ejabberd.out"), env=self._env(),
                                   cwd=self.spool, nofile=NOFILE)


lab.PROVIDER_CLASSES.update({"braid": BenchBraid, "prosody": BenchProsody, "ejabberd": BenchEjabberd})

PREFIXES = {"braid": ("braid1", "b", "braid2", "c"), "prosody": ("prosody1", "p", "prosody2", "q"),
            "ejabberd": ("ejabd1", "e", "ejabd2", "f")}


def side_pids(provider):
    return server_pids(provider.service.pid) if provider.service else []


def run_one(kind, n, time_limit, warm_total, braid_binary):
    """One kind at one size; returns a dict of figures (or an honest failure)."""
    os.environ["BRAID_BINARY"] = braid_binary
    name1, prefix1, name2, prefix2 = PREFIXES[kind]
    specs = [lab.ProviderSpec(kind, name1, prefix1, domains=n, users_per_domain=1, direct_tls=(kind == "braid")),
             lab.ProviderSpec(kind, name2, prefix2, domains=n, users_per_domain=1, direct_tls=(kind == "braid"))]
    figures = {"kind": kind, "n": n, "time_limit_seconds": time_limit}
    started = time.monotonic()
    try:
        with lab.Lab(specs, subnet=SUBNET) as running:
            a, b = running.providers
            figures["setup_seconds"] = round(time.monotonic() - started, 1)
            accounts = [{"jid": a.users(d)[0], "password": lab.PASSWORD, "host": a.ip, "port": lab.C2S_PORT} for d in a.domains]
            accounts += [{"jid": b.users(d)[0], "password": lab.PASSWORD, "host": b.ip, "port": lab.C2S_PORT} for d in b.domains]
            pairs = [[i, n + j] for i in range(n) for j in range(n)] + [[n + j, i] for j in range(n) for i in range(n)]
            plan = {"accounts": accounts, "pairs": pairs, "cold_timeout": time_limit,
                    "warm_total": warm_total, "warm_timeout": time_limit, "login_timeout": 60}
            plan_file = os.path.join(running.workdir, "plan.json")
            with open(plan_file, "w") as handle:
                json.dump(plan, handle)

            base_cpu = {side: cpu_seconds(side_pids(p)) for side, p in (("a", a), ("b", b))}

            def probe():
                out, into = running.connections(a, b)
                return {"connections": len(out) + len(into),
                        "rss_a_kib": rss_kib(side_pids(a)), "rss_b_kib": rss_kib(side_pids(b))}

            sampler = Sampler(probe, 0.2)
            sampler.start()
            try:
                driver = subprocess.run(lab.in_netns(a.ns, [PYTHON, os.path.join(HERE, "xmppdriver.py"), plan_file]),
                                        capture_output=True, text=True, timeout=2 * time_limit + 180)
                result = json.loads(driver.stdout.strip().splitlines()[-1]) if driver.stdout.strip() else {}
                if not result:
                    figures["error"] = f"driver exited {driver.returncode}: {driver.stderr.strip()[-500:]}"
            except subprocess.TimeoutExpired:
                result = {}
                figures["error"] = f"driver did not finish in {2 * time_limit + 180}s"
            finally:
                peak = sampler.stop()
            final = probe()
            figures["driver"] = result
            figures["tcp_connections_peak"] = max(peak.get("connections", 0), final["connections"])
            figures["tcp_connections_end"] = final["connections"]
            figures["login_seconds"] = result.get("login_seconds")
            if result.get("login_failed"):
                figures["error"] = f"{result['login_failed']} logins failed: {result.get('login_failures')}"
            cold = result.get("cold") or {}
            warm = result.get("warm") or {}
            figures["cold_complete"] = cold.get("complete")
            figures["cold_seconds"] = cold.get("seconds")
            figures["cold_delivered"] = cold.get("delivered")
            figures["cold_sent"] = cold.get("sent")
            figures["cold_errors"] = cold.get("errors")
            if cold and not cold.get("complete"):
                figures["note"] = (f"did not finish in {time_limit} s: {cold.get('delivered')} of "
                                   f"{cold.get('sent')} first messages delivered")
            figures["warm_messages_per_second"] = warm.get("messages_per_second")
            figures["warm_sent"] = warm.get("sent")
            figures["warm_lost"] = warm.get("lost")
            figures["warm_errors"] = warm.get("errors")
            lost = (cold.get("sent", 0) - cold.get("delivered", 0)) + warm.get("lost", 0) if cold else None
            figures["messages_lost"] = lost
            for side, p in (("a", a), ("b", b)):
                pids = side_pids(p)
                figures[f"peak_rss_{side}_kib"] = max(hwm_kib(pids), peak.get(f"rss_{side}_kib", 0))
                figures[f"cpu_{side}_seconds"] = round(cpu_seconds(pids) - base_cpu[side], 2)
    except Exception as error:  # noqa: BLE001 - a failed kind/size is a result, not a crash
        figures["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    log(f"fanout {kind} {n}x{n}: {json.dumps({k: v for k, v in figures.items() if k != 'driver'})}")
    return figures


def run(kinds, sizes, braid_binary, time_limits, warm_total):
    results = []
    for n in sizes:
        for kind in kinds:
            results.append(run_one(kind, n, time_limits.get(n, 120), warm_total(n), braid_binary))
    return {"results": results, "tuning": TUNING}
