"""Personal eventing (XEP-0163): one publish to an account with N contacts, local and remote,
on Braid, Prosody and ejabberd; and the memory of Braid's caps cache (with the peers' beside
it) at 10,000 distinct client capabilities.

Per kind, the federation lab (bench/fanout.py's adapters, namespaces braidbench-pep-*, subnet
10.77.57.0/24, real DNSSEC) builds two providers of that kind: A hosts the publisher
(user1@a1.test) and L local contacts, B hosts R remote contacts (N = L + R). Every contact
has a presence subscription both ways with the publisher, written before the servers start
(Braid: rows in its SQLite roster table beside the account rows; Prosody: its roster files;
ejabberd: mod_admin_extra:add_rosteritem over Erlang distribution, after its start). PEP:
Braid as shipped; Prosody mod_pep; ejabberd mod_pubsub (plugins flat, pep) with mod_caps
(the lab's `pep` switch). bench/pepdriver.py, in A's namespace, logs everyone in (the
contacts at their own server), the contacts announce XEP-0115 caps with NODE+notify (one ver
for all of them: one client kind), and after warm-up publishes
  fan-out  the publisher publishes P items; per publish the time from sending it until every
           contact has its notification, who did not get it (lost), and the CPU seconds of
           A's and B's server processes over that window (/proc), per 1,000 notifications;
  caps     the local contacts change their presence to new vers, one after another, until
           D distinct vers were announced (each answered when the server asks with
           disco#info); A's server RSS 15 s after the last answer (Braid's caps query timeout,
           10 s, has passed) minus 3 s before the first,
           divided by the vers the server asked about: bytes per cache entry. Then, as a
           control, as many presence changes again to vers the server already knows, at the
           same pace: the RSS change they cause is subtracted (net bytes per entry). The same
           for the peers, whose caches differ (Tuning).
"""

import json
import multiprocessing
import os
import sqlite3
import subprocess
import tempfile
import time

from common import HERE, PYTHON, lab, log, rss_kib, server_pids, session_members
import fanout
import servers

NODE = "urn:braid:bench:pep"
CAPS_NODE = "https://braid.example/bench"
PREFIX = "braidbench-pep-"   # a lab of its own prefix: its sweep never touches other benchmarks' namespaces
SUBNET = "10.77.57"
ROSTERS = {}                 # provider name -> {user jid: [contact jids]}, read at registration

TUNING = {
    "braid": ["PEP as shipped (pep.caps_cache_size 10000: one entry per verified ver, shared by all accounts; "
              "pep.notifications_per_second 1000 and notification_burst 10000 per publishing account: the publishes "
              "are 1.2 s apart, within it, so none is refused)",
              "c2s.stanzas_per_second and stanza_burst 100000 and log_level warning (bench/fanout.py's adapter)",
              "accounts and roster rows written into its SQLite database before the start (the first account through "
              "`braid user add`, which creates the schema)"],
    "prosody": ["mod_pep (the lab's pep switch; Debian's default config loads it too), internal storage",
                "roster and account files written before the start, 4096 iterations", "log level warn, mod_s2s_bidi"],
    "ejabberd": ["mod_pubsub with plugins [flat, pep] and mod_caps (the lab's pep switch), default options: mod_caps keeps "
                 "verified features in Mnesia's caps_features table (disc_only_copies) behind a cache of 1,000 entries "
                 "(cache_size), so its RAM does not grow with distinct vers beyond that",
                 "roster items through mod_admin_extra:add_rosteritem (both), loglevel warning, open files 20000"],
    "driver": ["bench/pepdriver.py: mucdriver.py's logins and epoll loop; the publisher in a process of its own, the "
               "contacts split over two more; the timing includes reading N TLS sockets over two processes"],
}


# -- providers: fanout.py's adapters, with accounts and rosters for this scenario ------------

def _scram_row(args):
    jid, domain, now, roster_version = args
    salt1, salt256 = os.urandom(16), os.urandom(16)
    s1, k1 = servers.scram_keys(lab.PASSWORD, salt1, "sha1")
    s256, k256 = servers.scram_keys(lab.PASSWORD, salt256, "sha256")
    return (jid, domain, salt1, servers.ITERATIONS, s1, k1, salt256, servers.ITERATIONS, s256, k256, roster_version, now)


def _pool_map(function, items):
    with multiprocessing.Pool(os.cpu_count()) as pool:
        return pool.map(function, items, chunksize=100)


class PepBraid(fanout.BenchBraid):
    def register_users(self):
        domain = self.domains[0]
        users = self.users(domain)
        roster = ROSTERS.get(self.name, {})
        self.cli("user", "add", users[0], "--password", lab.PASSWORD)
        now = int(time.time())
        rows = _pool_map(_scram_row, [(jid, domain, now, 1) for jid in users[1:]])
        db = sqlite3.connect(os.path.join(self.data, "braid.sqlite"), timeout=30)
        with db:
            db.executemany("INSERT INTO users (jid, domain, sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, "
                           "sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, roster_version, created_at) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.execute("UPDATE users SET roster_version = 1 WHERE jid = ?", (users[0],))
            db.executemany("INSERT INTO roster_items (user_jid, contact_jid, name, subscription, pending_out, pending_in, "
                           "approved, groups_json) VALUES (?, ?, NULL, 'both', 0, 0, 0, '[]')",
                           [(user, contact) for user, contacts in roster.items() for contact in contacts])
        db.close()


def _prosody_account(args):
    directory, user = args
    import hashlib
    import hmac
    salt = os.urandom(12).hex()
    salted = hashlib.pbkdf2_hmac("sha1", lab.PASSWORD.encode(), salt.encode(), servers.ITERATIONS)
    stored = hashlib.sha1(hmac.new(salted, b"Client Key", "sha1").digest()).hexdigest()
    server = hmac.new(salted, b"Server Key", "sha1").hexdigest()
    with open(os.path.join(directory, f"{user}.dat"), "w") as handle:
        handle.write('return {\n\t["iteration_count"] = %d;\n\t["salt"] = "%s";\n\t["stored_key"] = "%s";\n'
                     '\t["server_key"] = "%s";\n};\n' % (servers.ITERATIONS, salt, stored, server))


class PepProsody(fanout.BenchProsody):
    def register_users(self):
        domain = self.domains[0]
        encoded = "".join(c if c.isalnum() else "%%%02x" % ord(c) for c in domain)
        accounts = os.path.join(self.data, encoded, "accounts")
        rosters = os.path.join(self.data, encoded, "roster")
        os.makedirs(accounts, exist_ok=True)
        os.makedirs(rosters, exist_ok=True)
        _pool_map(_prosody_account, [(accounts, jid.split("@")[0]) for jid in self.users(domain)])
        for user, contacts in ROSTERS.get(self.name, {}).items():
            items = "".join(f'\t["{c}"] = {{\n\t\t["subscription"] = "both";\n\t\t["groups"] = {{}};\n\t}};\n' for c in contacts)
            with open(os.path.join(rosters, f"{user.split('@')[0]}.dat"), "w") as handle:
                handle.write('return {\n\t[false] = {\n\t\t["version"] = 1;\n\t\t["pending"] = {};\n\t};\n' + items + "};\n")
        lab.chown_tree(self.data, "prosody")


class PepEjabberd(fanout.BenchEjabberd):
    def register_users(self):
        domain = self.domains[0]
        users = ",".join(f'<<"{jid.split("@")[0]}">>' for jid in self.users(domain))
        items = ",".join(f'{{<<"{u.split("@")[0]}">>,<<"{c.split("@")[0]}">>,<<"{c.split("@")[1]}">>}}'
                         for u, contacts in ROSTERS.get(self.name, {}).items() for c in contacts)
        program = (
            f"Node = '{self.node}', D = <<\"{domain}\">>, P = <<\"{lab.PASSWORD}\">>, "
            f"Bad = [U || U <- [{users}], rpc:call(Node, ejabberd_auth, try_register, [U, D, P], 60000) =/= ok], "
            f"BadR = [{{U, CU, CS, R}} || {{U, CU, CS}} <- [{items}], "
            "R <- [rpc:call(Node, mod_admin_extra, add_rosteritem, [U, D, CU, CS, CU, <<\"bench\">>, <<\"both\">>], 60000)], R =/= ok], "
            "io:format(\"~p ~p~n\", [length(Bad), lists:sublist(BadR, 3)]), "
            "halt(case {Bad, BadR} of {[], []} -> 0; _ -> 1 end).")
        import random
        argv = ["erl", "-sname", f"pepreg{random.randint(0, 99999)}@localhost", "-hidden", "-noinput",
                "-erl_epmd_port", str(lab.EJABBERD_DIST_PORT), "-start_epmd", "false", "-dist_listen", "false", "-eval", program]
        result = lab.run(lab.in_netns(self.ns, lab.as_user("ejabberd", argv)), check=False, env=self._env(), cwd=self.spool,
                         timeout=900)
        if result.returncode != 0:
            raise lab.LabError(f"ejabberd accounts/rosters failed: {(result.stdout + result.stderr).strip()[-1500:]}")


CLASSES = {"braid": PepBraid, "prosody": PepProsody, "ejabberd": PepEjabberd}
NAMES = {"braid": ("pbraida", "pbraidb"), "prosody": ("pprosa", "pprosb"), "ejabberd": ("pejaba", "pejabb")}


def domain_of(prefix):
    return f"{prefix}1.{lab.ZONE}".rstrip(".")


def drive(ns, plan_file, limit):
    process = subprocess.Popen(lab.in_netns(ns, [PYTHON, os.path.join(HERE, "pepdriver.py"), plan_file]),
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        lab.stop_pids(session_members(process.pid) + [process.pid], label="pepdriver")
        process.communicate(timeout=30)
        return {"error": f"driver did not finish in {limit} s"}
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"driver exited {process.returncode} without a result"}


def run_one(kind, braid_binary, sizes):
    local, remote = sizes["local"], sizes["remote"]
    figures = {"kind": kind, "contacts": local + remote, "local": local, "remote": remote}
    started = time.monotonic()
    os.environ["BRAID_BINARY"] = braid_binary
    name_a, name_b = NAMES[kind]
    domain_a, domain_b = domain_of("a"), domain_of("r")
    publisher = f"user1@{domain_a}"
    local_jids = [f"user{i}@{domain_a}" for i in range(2, local + 2)]
    remote_jids = [f"user{i}@{domain_b}" for i in range(1, remote + 1)]
    ROSTERS.clear()
    ROSTERS[name_a] = {publisher: local_jids + remote_jids, **{jid: [publisher] for jid in local_jids}}
    ROSTERS[name_b] = {jid: [publisher] for jid in remote_jids}
    specs = [lab.ProviderSpec(kind, name_a, "a", domains=1, users_per_domain=local + 1, direct_tls=(kind == "braid"), pep=True),
             lab.ProviderSpec(kind, name_b, "r", domains=1, users_per_domain=max(1, remote), direct_tls=(kind == "braid"), pep=True)]
    saved_classes = dict(lab.PROVIDER_CLASSES)
    saved_prefix = lab.NS_PREFIX
    lab.PROVIDER_CLASSES.update(CLASSES)
    lab.set_namespace_prefix(PREFIX)
    try:
        with lab.Lab(specs, subnet=SUBNET) as running:
            a, b = running.providers
            figures["setup_seconds"] = round(time.monotonic() - started, 1)
            pids_a, pids_b = server_pids(a.service.pid), server_pids(b.service.pid)
            figures["rss_a_before_clients_kib"] = rss_kib(pids_a)
            accounts = [{"jid": jid, "password": lab.PASSWORD, "host": a.ip, "port": lab.C2S_PORT} for jid in [publisher] + local_jids]
            accounts += [{"jid": jid, "password": lab.PASSWORD, "host": b.ip, "port": lab.C2S_PORT} for jid in remote_jids]
            caps = dict(sizes["caps"])
            caps["contacts"] = list(range(1, local + 1))
            plan = {"accounts": accounts, "node": NODE, "caps_node": CAPS_NODE, "publishes": sizes["publishes"],
                    "warmups": sizes.get("warmups", 2), "probe_timeout": sizes.get("probe_timeout", 30),
                    "publish_interval": sizes.get("publish_interval", 1.2),
                    "announce_timeout": sizes.get("announce_timeout", 60), "login_timeout": 60,
                    "clients_per_worker": -(-(local + remote) // max(1, sizes.get("driver_processes", 2))),
                    "caps": caps, "server_pids": {"a": pids_a, "b": pids_b}}
            plan_file = os.path.join(running.workdir, "pep-plan.json")
            with open(plan_file, "w") as handle:
                json.dump(plan, handle)
            limit = 300 + (local + remote) // 5 + (sizes["publishes"] + 3) * (plan["probe_timeout"] + 30) + caps.get("timeout", 600) + 60
            result = drive(a.ns, plan_file, limit)
            for side, provider in (("a", a), ("b", b)):
                if provider.service is None or not provider.service.running():
                    figures[f"server_{side}_exited"] = provider.log_excerpt(10)
            figures["rss_a_end_kib"] = rss_kib(pids_a)
            figures["rss_b_end_kib"] = rss_kib(pids_b)
    except Exception as error:  # noqa: BLE001 - a failed kind is a result, not a crash
        figures["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
        result = None
    finally:
        lab.set_namespace_prefix(saved_prefix)
        lab.PROVIDER_CLASSES.clear()
        lab.PROVIDER_CLASSES.update(saved_classes)
    if result is not None:
        figures["driver"] = result
        if result.get("error"):
            figures["error"] = result["error"]
        f = result.get("fanout") or {}
        c = result.get("caps") or {}
        figures.update({
            "login_seconds": result.get("login_seconds"),
            "announce": result.get("announce"),
            "warmup_missing": [w.get("missing") for w in result.get("warmups") or []],
            "publishes": f.get("publishes"), "complete": f.get("complete"),
            "all_p50_ms": f.get("all_p50_ms"), "all_max_ms": f.get("all_max_ms"), "all_min_ms": f.get("all_min_ms"),
            "delivery_median_ms": f.get("delivery_median_ms"),
            "expected": f.get("expected"), "delivered": f.get("delivered"), "lost": f.get("lost"),
            "cpu_a_seconds": f.get("cpu_a_seconds"), "cpu_b_seconds": f.get("cpu_b_seconds"),
            "cpu_a_per_1000": f.get("cpu_a_per_1000"), "cpu_total_per_1000": f.get("cpu_total_per_1000"),
            "publish_results": f.get("publish_results"),
            "caps_distinct": c.get("distinct"), "caps_vers_queried": c.get("vers_queried"),
            "caps_timeouts": c.get("timeouts"), "caps_seconds": c.get("seconds"),
            "caps_rss_before_kib": c.get("rss_before_kib"), "caps_rss_after_kib": c.get("rss_after_kib"),
            "caps_rss_after_3s_kib": c.get("rss_after_3s_kib"), "caps_settle_seconds": c.get("settle_seconds"),
            "caps_bytes_per_entry": c.get("bytes_per_entry"), "caps_marginal_bytes_per_entry": c.get("marginal_bytes_per_entry"),
            "caps_steps": c.get("steps"), "caps_net_bytes_per_entry": c.get("net_bytes_per_entry"),
            "caps_control": result.get("caps_control"),
            "duplicates": result.get("duplicates"), "errors_seen": result.get("errors_seen"),
            "unknown_queries": result.get("unknown_queries"), "connections_lost": result.get("connections_lost"),
        })
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    log(f"pep {kind}: {json.dumps({k: v for k, v in figures.items() if k != 'driver'})}")
    return figures


def run(kinds, braid_binary, sizes):
    results = [run_one(kind, braid_binary, sizes) for kind in kinds]
    return {"results": results, "tuning": TUNING, "node": NODE}
