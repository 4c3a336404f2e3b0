#!/usr/bin/python3
"""Braid beside Prosody 0.12 and ejabberd 23.01: every scenario, one run, one report.

    sudo bench/run                 full sizes; writes docs/benchmarks.md, docs/benchmarks.json
                                   and docs/benchmarks/*.png
    sudo bench/run --smoke         tiny sizes (CI): writes to /tmp/braid-bench-smoke, checks that
                                   every scenario produced its figures, exits 1 if one did not
    sudo bench/run --only web      some scenarios: they replace their sections in the existing
                                   report of the same mode (full or smoke) in --out, the others
                                   are kept; the run's machine facts are recorded per scenario
    options: --only fanout,newpair,c2s,logins,hosting,muc,mam,pep,web,micro,cluster   --braid PATH   --out DIR   --no-build
             --build-config debug   --wait-for FILE   --report-only (md and plots from the json)

Scenarios (each module's docstring has the details): fanout.py (s2s fan-out over the
federation lab), newpair.py (s2s: latency of a new domain pair's first stanza on a live
link, and of the same pairs warm), c2s.py (tsung and braid-load), logins.py (server CPU per
login and login latency, braid-load), hosting.py (hosted domains), muc.py (group chat: one room
with N occupants, and the MUC service's cost per hosted domain), mam.py (message archive:
query latency at 10^4..10^6 archived messages, messaging with the archive on and off),
pep.py (personal eventing: one publish to 1,000 local and remote contacts, and the caps
cache's memory at 10,000 distinct vers), web.py (XMPP over WebSocket beside TCP, HTTP file
upload throughput and memory), micro.py (braid-bench), cluster.py (Braid only: two nodes on one
PostgreSQL, CPU per message same-node and cross-node, federation takeover after kill -9 of the
lease holder).
--braid PATH runs that binary (nothing is built; with --build-config debug for a debug one).
Needs root (network namespaces) and Debian's prosody, ejabberd, tsung, knot, unbound,
python3-matplotlib (Scripts/setup bench); mam also lua-dbi-sqlite3 and erlang-p1-sqlite3.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import ROOT, log  # noqa: E402

KINDS = ["braid", "prosody", "ejabberd"]
SCENARIOS = ["fanout", "newpair", "c2s", "logins", "hosting", "muc", "mam", "pep", "web", "micro", "cluster"]

FULL = {
    "fanout": {"sizes": [10, 30, 100], "time_limits": {10: 60, 30: 120, 100: 180}, "warm_total": 20000},
    "newpair": {"n": 10, "warm_repeats": 50, "timeout": 10, "warmup_timeout": 30, "give_up_after": 3,
                "combos": [["braid", "braid"], ["braid", "prosody"], ["prosody", "braid"], ["prosody", "prosody"],
                           ["ejabberd", "ejabberd"], ["braid", "ejabberd"], ["ejabberd", "braid"]]},
    "c2s": {"session_steps": [1000, 5000, 10000], "chat_users": 200, "rates": [200, 500, 1000, 2000, 4000, 8000],
            "chat_seconds": 15, "login_rate": 250, "first_rate": 500, "pause": 8,
            "keepalive": {"sessions": 2000, "interval": 15, "rounds": 8}},
    "logins": {"users": 2000, "login_rates": [100, 400], "tsung_users": 200, "tsung_rate": 20},
    "hosting": {"counts": [1000, 10000], "limit": 240},
    "muc": {"occupants": [100, 1000], "probes": 20, "offered_deliveries_per_second": 20000,
            "sustain": {"senders": 10, "seconds": 20, "drain_timeout": 30}, "driver_processes": 2,
            "service_domains": 10000, "service_repeats": 5},
    "mam": {"accounts": 100, "steps": [10000, 100000, 1000000], "populate_limit": 420, "window": 400,
            "queries": 400, "page": 50, "throughput": {"rate": 300, "seconds": 15, "window": 400, "saturate_seconds": 15}},
    "pep": {"local": 750, "remote": 250, "publishes": 20, "warmups": 2, "publish_interval": 1.2, "probe_timeout": 30,
            "driver_processes": 2, "caps": {"distinct": 10000, "steps": [1000], "query_timeout": 10, "timeout": 600, "settle": 15, "control": True}},
    "micro": {"megabytes": 50, "repetitions": 5, "logins": 2000,
              "storage": {"accounts": 2000, "messages": 10000, "contacts": 1000, "domains": 10000}},
    "web": {"pairs": 50, "window": 16, "seconds": 10, "warmup": 2, "drain_timeout": 15, "driver_processes": 2,
            "max_other_cpu_seconds": 2.0,
            "upload": {"transfers": [[1000000, 5], [100000000, 2]]}},
    "cluster": {"senders": 50, "rate": 500, "seconds": 20, "drain": 20, "idle_seconds": 10,
                "heartbeat_seconds": 0.5, "dead_after_seconds": 2.0,
                "stream_interval": 0.02, "stream_warmup": 4, "stream_after": 10, "stream_drain": 20, "takeover_repeats": 5},
}
SMOKE = {
    "fanout": {"sizes": [2], "time_limits": {2: 30}, "warm_total": 100},
    "newpair": {"n": 2, "warm_repeats": 3, "timeout": 5, "warmup_timeout": 20, "give_up_after": 2,
                "combos": [["braid", "braid"], ["braid", "prosody"], ["prosody", "braid"]]},
    "c2s": {"session_steps": [10, 20], "chat_users": 5, "rates": [10], "chat_seconds": 3,
            "login_rate": 20, "first_rate": 20, "pause": 3,
            "keepalive": {"sessions": 10, "interval": 2, "rounds": 2}},
    "logins": {"users": 10, "login_rates": [20], "tsung_users": 10, "tsung_rate": 10},
    "hosting": {"counts": [10, 100], "limit": 60},
    "muc": {"occupants": [10], "probes": 5, "offered_deliveries_per_second": 1000,
            "sustain": {"senders": 3, "seconds": 3, "drain_timeout": 15}, "driver_processes": 2,
            "service_domains": 300, "service_repeats": 1},
    "mam": {"accounts": 10, "steps": [1000], "populate_limit": 60, "window": 100, "queries": 40, "page": 50,
            "throughput": {"rate": 100, "seconds": 2, "window": 100, "saturate_seconds": 2}},
    "pep": {"local": 4, "remote": 2, "publishes": 2, "warmups": 1, "publish_interval": 0.5, "probe_timeout": 10,
            "driver_processes": 2, "caps": {"distinct": 20, "query_timeout": 5, "timeout": 60, "settle": 3, "control": True}},
    "micro": {"megabytes": 2, "repetitions": 1, "logins": 50,
              "storage": {"accounts": 20, "messages": 50, "contacts": 20, "domains": 100}},
    "web": {"pairs": 2, "window": 4, "seconds": 2, "warmup": 1, "drain_timeout": 10, "driver_processes": 1,
            "upload": {"transfers": [[1000000, 2]]}},
    "cluster": {"senders": 3, "rate": 30, "seconds": 2, "drain": 10, "idle_seconds": 2,
                "heartbeat_seconds": 0.5, "dead_after_seconds": 2.0,
                "stream_interval": 0.05, "stream_warmup": 2, "stream_after": 8, "stream_drain": 15, "takeover_repeats": 1},
}


def build_braid(config):
    # braid-load too: c2s and logins drive every server with it, and a stale one measures
    # with yesterday's generator (it once lacked the phase marks the login figures need).
    for product in ("braid", "braid-load"):
        log(f"building {product} ({config})")
        result = subprocess.run(["swift", "build", "-c", config, "--product", product], cwd=ROOT,
                                capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"swift build -c {config} --product {product} failed:\n" + (result.stdout + result.stderr)[-2000:])
    return os.path.join(ROOT, ".build", config, "braid")


def run_scenario(name, function, report):
    started = time.monotonic()
    log(f"=== scenario {name}")
    try:
        report["scenarios"][name] = function()
    except Exception as error:  # noqa: BLE001 - recorded; the check below fails the run
        report["scenarios"][name] = {"error": f"{type(error).__name__}: {error}"}
        log(f"scenario {name} failed: {error}")
    report["scenarios"][name]["wall_seconds"] = round(time.monotonic() - started, 1)


def check(report, wanted):
    """Which scenarios/kinds produced no figures (values are not judged)."""
    missing = []
    s = report["scenarios"]
    if "fanout" in wanted:
        rows = s.get("fanout", {}).get("results", [])
        for kind in KINDS:
            if not any(r["kind"] == kind and r.get("tcp_connections_peak") is not None
                       and (r.get("cold_seconds") is not None or r.get("note")) for r in rows):
                missing.append(f"fanout/{kind}")
    if "logins" in wanted:
        rows = s.get("logins", {}).get("results", {})
        for kind in KINDS:
            if not any(step.get("server_cpu_ms_per_login") is not None and step.get("login_p50_ms") is not None
                       for step in rows.get(kind, {}).get("steps", [])):
                missing.append(f"logins/{kind}")
            if (rows.get(kind, {}).get("tsung") or {}).get("login_mean_ms") is None:
                missing.append(f"logins-tsung/{kind}")
    if "newpair" in wanted:
        rows = s.get("newpair", {}).get("results", [])
        for combo in report["sizes"]["newpair"]["combos"]:
            name = "-".join(combo)
            if not any(r.get("combo") == name and r.get("new_median_ms") is not None for r in rows):
                missing.append(f"newpair/{name}")
    if "c2s" in wanted:
        rows = s.get("c2s", {}).get("results", {})
        for kind in KINDS:
            entry = rows.get(kind, {})
            steps = entry.get("sessions", {}).get("steps", [])
            if not steps or steps[-1].get("rss_per_session_kib") is None or not entry["sessions"].get("login_rate_per_second"):
                missing.append(f"c2s-sessions/{kind}")
            if entry.get("keepalive", {}).get("growth_per_session_per_keepalive_kib") is None:
                missing.append(f"c2s-keepalive/{kind}")
            msteps = entry.get("messages", {}).get("steps", [])
            if not msteps or msteps[0].get("p50_ms") is None:
                missing.append(f"c2s-messages/{kind}")
    if "hosting" in wanted:
        rows = s.get("hosting", {}).get("results", {})
        for kind in KINDS:
            if not any(r.get("start_seconds") is not None and r.get("idle_rss_kib") for r in rows.get(kind, [])):
                missing.append(f"hosting/{kind}")
    if "muc" in wanted:
        m = s.get("muc", {})
        rooms = m.get("rooms", [])
        for n in report["sizes"]["muc"]["occupants"]:
            for kind in KINDS:
                if not any(r["kind"] == kind and r["occupants"] == n and r.get("probe_all_median_ms") is not None
                           and r.get("deliveries_per_cpu_second") for r in rooms):
                    missing.append(f"muc-room-{n}/{kind}")
        service = m.get("service", {})
        if service.get("rss_per_domain_bytes") is None or (service.get("on") or {}).get("start_seconds") is None \
                or (service.get("off") or {}).get("start_seconds") is None:
            missing.append("muc-service/braid")
    if "mam" in wanted:
        rows = s.get("mam", {}).get("results", {})
        for kind in KINDS:
            entry = rows.get(kind, {})
            if not any(step.get("p99_ms") is not None and step.get("archived_rows") for step in entry.get("steps", [])):
                missing.append(f"mam-queries/{kind}")
            for mode in ("on", "off"):
                if not ((entry.get(mode) or {}).get("saturated") or {}).get("delivered_per_second"):
                    missing.append(f"mam-{mode}/{kind}")
    if "pep" in wanted:
        rows = s.get("pep", {}).get("results", [])
        for kind in KINDS:
            if not any(r["kind"] == kind and r.get("all_p50_ms") is not None and r.get("lost") is not None for r in rows):
                missing.append(f"pep-fanout/{kind}")
        if not any(r["kind"] == "braid" and r.get("caps_bytes_per_entry") is not None for r in rows):
            missing.append("pep-caps/braid")
    if "web" in wanted:
        rows = s.get("web", {}).get("results", [])
        for kind in KINDS:
            r = next((r for r in rows if r["kind"] == kind), {})
            for transport in ("tcp", "ws"):
                t = r.get(transport) or {}
                if not t.get("delivered_per_second") or t.get("error"):
                    missing.append(f"web-{transport}/{kind}")
            if not r.get("upload") or not all(u.get("verified") == u.get("repetitions") and u.get("get_mb_per_second")
                                              for u in r["upload"]):
                missing.append(f"web-upload/{kind}")
    if "micro" in wanted:
        m = s.get("micro", {})
        if not m.get("parse", {}).get("braid_mb_per_s"):
            missing.append("micro/parse")
        if not m.get("scram", {}).get("server_logins_per_s"):
            missing.append("micro/scram")
        storage = m.get("storage", {}).get("results", {})
        if not storage.get("sqlite") or not storage.get("postgresql"):
            missing.append("micro/storage")
    if "cluster" in wanted:
        cl = s.get("cluster", {})
        for name in ("same", "cross"):
            if not (cl.get("delivery", {}).get(name) or {}).get("cpu_us_per_message"):
                missing.append(f"cluster-{name}/braid")
        if not any(r.get("takeover_seconds") is not None for r in (cl.get("takeover") or {}).get("runs", [])):
            missing.append("cluster-takeover/braid")
    return missing


def scenario_of(figure):
    """'web-tcp/braid', 'mam-on/x', 'micro/parse' -> the scenario's name."""
    return figure.replace("/", "-").split("-")[0]


def merge_into(json_path, report, wanted, missing):
    """A run of some scenarios (--only) replaces those scenarios in the existing report of the
    same mode and keeps the others; the run's machine facts go to separate_runs[name], which
    the report prints beside the main run's."""
    with open(json_path) as handle:
        merged = json.load(handle)
    if merged.get("mode") != report["mode"]:
        log(f"{json_path} is a {merged.get('mode')} report, this a {report['mode']} run: replaced, not merged")
        return report
    v = report["machine"]["versions"]
    for name in wanted:
        merged["scenarios"][name] = report["scenarios"][name]
        merged.setdefault("sizes", {})[name] = report["sizes"][name]
        merged.setdefault("separate_runs", {})[name] = {
            "machine": report["machine"], "run_seconds": report["run_seconds"],
            "missing_figures": [m for m in missing if scenario_of(m) == name],
            "braid": f"{report['build_config']} build (binary built {v.get('braid_binary_built')}, last Sources/ commit "
                     f"before that {v.get('braid_sources_commit_at_build')}); HEAD {v.get('braid_commit')}"}
    merged["missing_figures"] = [m for m in merged.get("missing_figures", []) if scenario_of(m) not in wanted] + missing
    log(f"merged {', '.join(wanted)} into {json_path} (other scenarios kept)")
    return merged


def wait_quiet(flag, limit):
    """Waits (bounded) for FLAG to exist and the 1-minute load average to drop below 1.0."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open("/proc/loadavg") as handle:
            load = float(handle.read().split()[0])
        if (not flag or os.path.exists(flag)) and load < 1.0:
            return True
        time.sleep(15)
    log(f"machine not quiet after {limit}s; running anyway (the load average is recorded)")
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--braid", help="braid binary (default: build .build/release/braid)")
    parser.add_argument("--out", help="output directory (default docs/ for a full run, /tmp/braid-bench-smoke for --smoke)")
    parser.add_argument("--no-build", action="store_true", help="use the existing binaries in .build/CONFIG")
    parser.add_argument("--build-config", default="release", choices=["release", "debug"],
                        help="release (default; real numbers) or debug (smoke runs in CI: checks the harness only)")
    parser.add_argument("--wait-for", help="before starting, wait (bounded) for this file and a load average < 1.0")
    parser.add_argument("--wait-limit", type=int, default=2400)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite benchmarks.md and the plots from the existing benchmarks.json in --out")
    args = parser.parse_args()
    if args.report_only:
        import report as writer
        out = args.out or os.path.join(ROOT, "docs")
        with open(os.path.join(out, "benchmarks.json")) as handle:
            writer.write(json.load(handle), out)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench/run needs root (network namespaces, servers run as their own users)")
    wanted = [w for w in args.only.split(",") if w]
    sizes = SMOKE if args.smoke else FULL
    out = args.out or ("/tmp/braid-bench-smoke" if args.smoke else os.path.join(ROOT, "docs"))
    os.makedirs(out, exist_ok=True)
    nofile = common.raise_file_limit()

    config = args.build_config
    braid = args.braid or (os.path.join(ROOT, ".build", config, "braid") if args.no_build else build_braid(config))
    import micro
    bench_binary = micro.bench_binary(config) if args.no_build else (micro.build(config) if "micro" in wanted else None)
    # Run a private copy: a build elsewhere must not swap the binary in the middle of the run.
    import shutil
    import tempfile
    private = os.path.join(tempfile.mkdtemp(prefix="braidbench-bin-"), "braid")
    shutil.copy2(braid, private)
    os.chmod(os.path.dirname(private), 0o755)
    braid_source = braid
    braid = private
    if bench_binary and ("micro" in wanted or os.path.exists(bench_binary)):
        private_bench = os.path.join(os.path.dirname(private), "braid-bench")
        shutil.copy2(bench_binary, private_bench)
        bench_binary = private_bench
    if args.wait_for:
        wait_quiet(args.wait_for, args.wait_limit)

    started = time.monotonic()
    report = {"mode": "smoke" if args.smoke else "full", "build_config": config, "sizes": json.loads(json.dumps(sizes, default=str)),
              "machine": common.machine_facts(braid_source), "open_files_limit": nofile, "scenarios": {}}
    log(f"machine: {json.dumps(report['machine'])}")

    if "fanout" in wanted:
        import fanout
        f = sizes["fanout"]
        run_scenario("fanout", lambda: fanout.run(KINDS, f["sizes"], braid, f["time_limits"], lambda n: f["warm_total"]), report)
    if "newpair" in wanted:
        import newpair
        z = sizes["newpair"]
        run_scenario("newpair", lambda: newpair.run(z["combos"], z["n"], braid, z["warm_repeats"], z["timeout"],
                                                    z["warmup_timeout"], z["give_up_after"]), report)
    if "c2s" in wanted:
        import c2s
        c = sizes["c2s"]
        run_scenario("c2s", lambda: c2s.run(KINDS, c["session_steps"], c["chat_users"], c["rates"], c["chat_seconds"],
                                            braid, login_rate=c["login_rate"], pause=c["pause"], first_rate=c["first_rate"],
                                            keepalive=c.get("keepalive")), report)
    if "logins" in wanted:
        import logins
        g = sizes["logins"]
        run_scenario("logins", lambda: logins.run(KINDS, g["users"], g["login_rates"], braid, g["tsung_users"], g["tsung_rate"]), report)
    if "hosting" in wanted:
        import hosting
        h = sizes["hosting"]
        run_scenario("hosting", lambda: hosting.run(KINDS, h["counts"], braid, h["limit"]), report)
    if "muc" in wanted:
        import muc
        run_scenario("muc", lambda: muc.run(KINDS, braid, sizes["muc"]), report)
    if "mam" in wanted:
        import mam
        run_scenario("mam", lambda: mam.run(KINDS, braid, sizes["mam"]), report)
    if "pep" in wanted:
        import pep
        run_scenario("pep", lambda: pep.run(KINDS, braid, sizes["pep"]), report)
    if "web" in wanted:
        import web
        run_scenario("web", lambda: web.run(KINDS, braid, sizes["web"]), report)
    if "cluster" in wanted:
        # By path: common puts the federation lab first on sys.path, and the lab has a cluster.py of its own.
        import importlib.util
        spec = importlib.util.spec_from_file_location("bench_cluster", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster.py"))
        cluster = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cluster)
        run_scenario("cluster", lambda: cluster.run(braid, sizes["cluster"]), report)
    if "micro" in wanted:
        m = sizes["micro"]
        run_scenario("micro", lambda: micro.run(m["megabytes"], m["repetitions"], m["logins"], bench_binary, m.get("storage")), report)

    report["run_seconds"] = round(time.monotonic() - started, 1)
    with open("/proc/loadavg") as handle:
        report["machine"]["load_average_at_end"] = [float(x) for x in handle.read().split()[:3]]
    missing = check(report, wanted)
    report["missing_figures"] = missing

    import report as writer
    json_path = os.path.join(out, "benchmarks.json")
    if set(wanted) != set(SCENARIOS) and os.path.exists(json_path):
        report = merge_into(json_path, report, wanted, missing)
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    writer.write(report, out)
    shutil.rmtree(os.path.dirname(private), ignore_errors=True)
    log(f"wrote {json_path} and {os.path.join(out, 'benchmarks.md')}; this run took {round(time.monotonic() - started, 1)}s")
    leftovers = common.lab.lab_namespaces()
    if leftovers:
        log(f"namespaces left behind: {leftovers}")
    if missing:
        log(f"scenarios without figures: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
