"""Message archive (XEP-0313): MAM query latency at growing archive sizes, and messaging with
the archive on and off, on Braid, Prosody (mod_mam) and ejabberd (mod_mam).

Per server, in a loopback-only namespace of ours (braidbench-mam), with A accounts on
mam.test (user1..userA), bench/mamdriver.py holds A real client sessions (SASL PLAIN inside
STARTTLS):

  archive   the server with its archive on, on SQLite for all three (Braid: its default
            storage; Prosody: mod_mam with `storage = { archive = "sql" }`, SQLite3 through
            lua-dbi; ejabberd: mod_mam with `db_type: sql`, `sql_type: sqlite`, the schema
            of Debian's lite.sql). Messages between the accounts fill the archives step by
            step (steps in archived rows: each message is archived twice, for its sender and
            its recipient, so 10^6 rows are 500,000 messages, 10,000 rows per account at 100
            accounts), sent through the server as fast as it takes them (W in flight); at each
            step the rows are counted in the database and Q queries for a page of 50 are timed
            (four kinds: the latest page, the latest page with one contact, the first page
            after the middle of the archive by `start`, the page before that one by RSM
            `before` id). Population has an overall time limit per server: a server that does
            not reach a step in it is reported with the size it reached.
  on / off  two fresh servers, archive on and archive off (Braid: `mam.default_preference:
            never`, the module's only switch; Prosody and ejabberd: without mod_mam), the same
            load: a fixed offered rate for T s (delivered/s, latency, server CPU), then W
            messages in flight for T2 s (delivered messages/s, server CPU, messages per
            server CPU-second).
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

from common import HERE, PYTHON, LoopbackNamespace, lab, log, server_pids, session_members
import servers

DOMAIN = "mam.test"

TUNING = {
    "braid": ["archive as shipped: `mam` on, SQLite (WAL) in the data directory, default_preference always, retention 0 "
              "(kept for good); archive off: `mam.default_preference: never` (BRAID_MAM_DEFAULT_PREFERENCE; the module has "
              "no enabled switch, so it still runs and looks up each account's preferences, cached)",
              "c2s.stanzas_per_second 1000000 (default 200 per session, which closes the stream of a saturating sender; "
              "the peers have no limit configured); auth.scram_iterations 4096, log_level warning, s2s disabled",
              "SQLite durability as shipped: WAL with synchronous FULL (an fsync of the WAL per commit), one commit per "
              "archived copy"],
    "prosody": ['mod_mam with `storage = { archive = "sql" }` and `sql = { driver = "SQLite3" }` (lua-dbi-sqlite3 0.7.2 '
                "from Debian; the default `internal` store keeps an account's archive in flat files), everything else "
                "internal; mod_mam's defaults (archive_expires_after 1w, so it counts the total for RSM; nothing expires "
                "in a run; max_archive_query_results 50); archive off: no mod_mam; SQLite as LuaDBI opens it (rollback journal, "
                "synchronous FULL)",
                "network_settings.nagle = false (as in the group-chat scenario); log level warn, s2s disabled, "
                "internal_hashed with 4096 iterations, no mod_limits"],
    "ejabberd": ["mod_mam with `db_type: sql` and `default: always` (its default is never), `sql_type: sqlite`, the "
                 "database created from Debian's /usr/share/ejabberd/sql/lite.sql (erlang-p1-sqlite3 1.1.14); everything "
                 "else on mnesia. Not mnesia for the archive: mod_mam_mnesia keeps it in a disc_only_copies table (dets, "
                 "2 GB per table file), which is not meant for 10^6 messages; archive off: no mod_mam",
                 "no shapers (none configured), loglevel warning, listen backlog 1024"],
    "driver": ["bench/mamdriver.py: one process, one epoll loop over the non-blocking TLS sessions (mucdriver's "
               "login, read and write); SASL PLAIN inside STARTTLS; queries one at a time, timed to the arrival of the "
               "final <iq/> (read from the socket; parsed after the timing)",
               "the driver shares the 2 cores with the server; its CPU share over each throughput window is reported"],
}


class MamProsody(servers.ProsodyServer):
    """Prosody with mod_mam, its archive in SQLite (archive=True), or without mod_mam."""

    def __init__(self, ns, directory, domains, archive=True, **options):
        self.archive = archive
        super().__init__(ns, directory, domains, **options)

    def write_config(self):
        super().write_config()
        if not self.archive:
            return
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace('"admin_shell" }', '"admin_shell", "mam" }', 1)
        text = text.replace('storage = "internal"\n', 'storage = { archive = "sql" }\n'
                            'sql = { driver = "SQLite3", database = "prosody.sqlite" }\n', 1)
        lab.write_file(self.config, text, 0o640)

    @property
    def database(self):
        return os.path.join(self.data, "prosody.sqlite")


class MamEjabberd(servers.EjabberdServer):
    """ejabberd with mod_mam on SQLite (archive=True), or without mod_mam."""

    def __init__(self, ns, directory, domains, archive=True, **options):
        self.archive = archive
        self.database = os.path.join(directory, "ejabberd-archive.sqlite")
        super().__init__(ns, directory, domains, **options)
        if archive:
            lab.run(["sh", "-c", f"sqlite3 '{self.database}' < /usr/share/ejabberd/sql/lite.sql"])
            lab.chown_tree(directory, "ejabberd")

    def write_config(self):
        super().write_config()
        if not self.archive:
            return
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace("modules:\n", f'sql_type: sqlite\nsql_database: "{self.database}"\nmodules:\n', 1)
        text += "  mod_mam:\n    db_type: sql\n    default: always\n"
        lab.write_file(self.config, text, 0o640)
        lab.chown_tree(self.directory, "ejabberd")


def start(kind, ns, directory, users, braid_binary, archive):
    """servers.start_with_users for this scenario's server classes."""
    if kind == "braid":
        # The per-session rate limit (c2s.stanzas_per_second, default 200/s) would close a
        # saturating sender's stream; the peers have no limit configured.
        env = {"BRAID_C2S_STANZAS_PER_SECOND": "1000000"}
        if not archive:
            env["BRAID_MAM_DEFAULT_PREFERENCE"] = "never"

        return servers.start_with_users("braid", ns, directory, [DOMAIN], users, braid_binary, braid_env=env)
    if kind == "prosody":
        server = MamProsody(ns, directory, [DOMAIN], archive=archive, network={"nagle": False})
    else:
        server = MamEjabberd(ns, directory, [DOMAIN], archive=archive)
    if kind != "ejabberd":
        server.add_users(users)
    server.start()
    if not server.wait_ready(120):
        server.stop()
        raise lab.LabError(f"{kind} did not answer on {servers.C2S_PORT}: {lab.log_tail(server.service.log_path, 20)}")
    if kind == "ejabberd":
        try:
            server.add_users(users)
        except Exception:
            server.stop()
            raise
    return server


def database_of(kind, server):
    if kind == "braid":
        return {"path": os.path.join(server.directory, "data", "braid.sqlite"), "count_sql": "SELECT count(*) FROM archive"}
    if kind == "prosody":
        return {"path": server.database, "count_sql": "SELECT count(*) FROM prosodyarchive WHERE store = 'archive'"}
    return {"path": server.database, "count_sql": "SELECT count(*) FROM archive"}


def drive(ns, plan_file, limit):
    """Runs the driver in NS (its own session, stopped by PID if it overruns); returns its JSON."""
    process = subprocess.Popen(ns.argv([PYTHON, os.path.join(HERE, "mamdriver.py"), plan_file]),
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        lab.stop_pids(session_members(process.pid) + [process.pid], label="mamdriver")
        process.communicate(timeout=30)
        return {"error": f"driver did not finish in {limit} s"}
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"driver exited {process.returncode} without a result"}


def one_run(kind, mode, braid_binary, sizes):
    """mode: 'archive' (population and queries), 'on' or 'off' (throughput)."""
    figures = {"kind": kind, "mode": mode}
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"braidbench-mam-{kind}-")
    os.chmod(workdir, 0o755)
    n = sizes["accounts"]
    try:
        with LoopbackNamespace("mam") as ns:
            server = start(kind, ns.ns, os.path.join(workdir, kind), n, braid_binary, archive=(mode != "off"))
            try:
                pids = server_pids(server.pid)
                plan = {"accounts": [{"jid": f"user{i}@{DOMAIN}", "password": f"pass{i}"} for i in range(1, n + 1)],
                        "host": servers.ADDRESS, "port": servers.C2S_PORT, "login_timeout": 60,
                        "server_pids": pids, "page": sizes["page"], "queries": sizes["queries"],
                        "window": sizes["window"], "populate_limit": sizes["populate_limit"],
                        "steps": sizes["steps"] if mode == "archive" else [],
                        "throughput": sizes["throughput"] if mode != "archive" else None,
                        "db": database_of(kind, server) if mode == "archive" else None}
                plan_file = os.path.join(workdir, "plan.json")
                with open(plan_file, "w") as handle:
                    json.dump(plan, handle)
                t = sizes["throughput"]
                limit = (sizes["populate_limit"] + 300 + 120 * len(sizes["steps"]) if mode == "archive"
                         else t["seconds"] + t["saturate_seconds"] + 180)
                figures["driver"] = drive(ns, plan_file, limit)
                if not server.service.running():
                    figures["server_exited"] = lab.log_tail(server.service.log_path, 10)
            finally:
                server.stop()
        if figures["driver"].get("error"):
            figures["error"] = figures["driver"]["error"]
    except Exception as error:  # noqa: BLE001 - a failed kind/mode is a result, not a crash
        figures["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    summary = {k: v for k, v in figures.items() if k != "driver"}
    log(f"mam {kind} {mode}: {json.dumps(summary)}")
    return figures


def summarize(runs, kinds):
    """The tables' figures: per kind, per step, and on/off."""
    out = {}
    for kind in kinds:
        entry = {}
        archive = next((r for r in runs if r["kind"] == kind and r["mode"] == "archive"), {})
        d = archive.get("driver") or {}
        entry["steps"] = []
        for step in d.get("steps", []):
            q = step.get("queries") or {}
            row = {"target_rows": step["target_rows"], "reached": step.get("reached"),
                   "not_started": step.get("not_started"),
                   "archived_rows": step.get("archived_rows"), "messages_sent": step.get("messages_sent"),
                   "elapsed_populating_seconds": step.get("elapsed_populating_seconds"),
                   "populate_messages_per_second": step.get("populate_messages_per_second"),
                   "db_bytes": step.get("db_bytes"), "rss_kib": step.get("rss_kib"),
                   "bounced": step.get("bounced"), "stalled": step.get("stalled"),
                   "p50_ms": (q.get("all") or {}).get("p50_ms"), "p99_ms": (q.get("all") or {}).get("p99_ms"),
                   "max_ms": (q.get("all") or {}).get("max_ms"), "queries": (q.get("all") or {}).get("n"),
                   "query_errors": q.get("errors"), "query_first_errors": q.get("first_errors"),
                   "rsm_count_median": q.get("rsm_count_median"),
                   "by_kind": {k: q.get(k) for k in ("latest", "with", "start", "before") if q.get(k)}}
            entry["steps"].append(row)
        if archive.get("error"):
            entry["archive_error"] = archive["error"]
        for mode in ("on", "off"):
            r = next((r for r in runs if r["kind"] == kind and r["mode"] == mode), {})
            d = r.get("driver") or {}
            entry[mode] = {"fixed": d.get("fixed"), "saturated": d.get("saturated"), "error": r.get("error")}
        on, off = (entry["on"].get("saturated") or {}), (entry["off"].get("saturated") or {})
        if on.get("delivered_per_second") and off.get("delivered_per_second"):
            entry["on_over_off_messages_per_second"] = round(on["delivered_per_second"] / off["delivered_per_second"], 3)
        if on.get("messages_per_cpu_second") and off.get("messages_per_cpu_second"):
            entry["on_over_off_messages_per_cpu_second"] = round(on["messages_per_cpu_second"] / off["messages_per_cpu_second"], 3)
        fon, foff = (entry["on"].get("fixed") or {}), (entry["off"].get("fixed") or {})
        if fon.get("messages_per_cpu_second") and foff.get("messages_per_cpu_second"):
            entry["fixed_on_over_off_messages_per_cpu_second"] = round(fon["messages_per_cpu_second"] / foff["messages_per_cpu_second"], 3)
        out[kind] = entry
    return out


def run(kinds, braid_binary, sizes):
    runs = []
    for kind in kinds:
        for mode in ("on", "off", "archive"):
            runs.append(one_run(kind, mode, braid_binary, sizes))
    return {"results": summarize(runs, kinds), "runs": runs, "tuning": TUNING}
