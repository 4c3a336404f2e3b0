"""Group chat (XEP-0045): one room with N occupants on Braid, Prosody and ejabberd, and what
Braid's group-chat service costs per hosted domain.

Room (per server and N, in a loopback-only namespace of ours, braidbench-muc): the server
hosts muc.test with N accounts and a group-chat service at conference.muc.test (Braid: its
default; Prosody: `Component "conference.muc.test" "muc"`; ejabberd: mod_muc with host
conference.@HOST@). bench/mucdriver.py logs N real client sessions in, the first creates
bench@conference.muc.test and configures it (rooms are locked until then), the others join,
and then
  probe    one groupchat message, R times, each from another occupant: the time until every
           occupant (the sender included) has it; median and p95 over the R messages;
  sustain  S occupants send at a fixed offered rate for T seconds; deliveries counted at the
           receivers, the server's CPU seconds over the window (all its processes, /proc),
           deliveries per CPU-second; the driver's own CPU is reported beside it, so that a
           driver-bound run can be told from a server-bound one.
The offered rate is the same for every server (in deliveries per second: senders x rate x N).

Service cost (Braid only, braidbench-mucsvc): bench/hosting_scale.py (start until the first
domain is served; idle RSS 2 s later) with D hosted domains, once with `services: muc:
enabled: true` and once with `enabled: false` in braid.yaml, alternating, R times; the
medians give the start time of each and (RSS on - RSS off) / D, the bytes per domain the
service costs.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

from common import HERE, PYTHON, LoopbackNamespace, lab, log, median, rss_kib, server_pids, session_members
import hosting
import servers

DOMAIN = "muc.test"
ROOM = f"bench@conference.{DOMAIN}"
BRAID_DEFAULT_MAX_OCCUPANTS = 500  # muc.max_occupants_per_room's default

TUNING = {
    "braid": ["group chat as shipped: conference.DOMAIN for every hosted domain, rooms locked until the owner configures them",
              f"muc.max_occupants_per_room N when N > {BRAID_DEFAULT_MAX_OCCUPANTS} (its default; "
              "BRAID_MUC_MAX_OCCUPANTS_PER_ROOM), the room configured with muc#roomconfig_maxusers N (a new room holds 200)",
              "muc.messages_per_second 0 (default 5 per occupant; the peers have no such limit by default)",
              "auth.scram_iterations 4096, log_level warning, s2s disabled; c2s rate limit left at its default (200 stanzas/s; "
              "each sender stays below it)"],
    "prosody": ['`Component "conference.muc.test" "muc"` with its defaults (rooms locked until configured; no occupant limit, '
                "so muc#roomconfig_maxusers is ignored)", "network_settings.nagle = false (default true: with Nagle on, "
                "small stanzas to a client wait for its ACK, tens of ms on loopback); tcp_backlog 1024",
                "log level warn, s2s disabled, internal_hashed with 4096 iterations, no mod_limits"],
    "ejabberd": ['mod_muc, host "conference.@HOST@"; max_users and default_room_options.max_users N (default 200), '
                 "max_users_presence N (default 1000: a room with more occupants stops broadcasting their presence)",
                 "no shapers (none configured), loglevel warning, listen backlog 1024, open files: the hard limit"],
    "driver": ["bench/mucdriver.py: the clients split over P worker processes (driver_processes in the sizes; the machine's "
               "cores), each one epoll loop over non-blocking TLS sockets; SASL PLAIN inside STARTTLS; while timing, the "
               "decrypted stream is only scanned for the benchmark's tokens",
               "an arrival is stamped when the driver reads the socket, so the all-occupants time includes reading N sockets "
               "over P processes (tens of µs per read here)"],
}


def server_options(kind, n):
    """(Braid's extra environment, the peer's constructor options) for a room of N occupants."""
    if kind == "braid":
        env = {"BRAID_MUC_MAX_OCCUPANTS_PER_ROOM": str(n)} if n > BRAID_DEFAULT_MAX_OCCUPANTS else {}
        # The per-occupant message rate (muc.messages_per_second, default 5/s) is off, as the
        # peers have none by default (Prosody without mod_muc_limits, ejabberd's
        # min_message_interval 0); the senders here exceed 5/s at small N.
        env["BRAID_MUC_MESSAGES_PER_SECOND"] = "0"
        return env, None
    if kind == "prosody":
        return None, {"muc": {}, "network": {"nagle": False}}
    return None, {"muc": {"max_users": n, "max_users_presence": n, "default_room_options": {"max_users": n}}}


def drive(ns, plan_file, limit):
    """Runs the driver in NS (its own session, stopped by PID if it overruns); returns its JSON."""
    process = subprocess.Popen(ns.argv([PYTHON, os.path.join(HERE, "mucdriver.py"), plan_file]),
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        lab.stop_pids(session_members(process.pid) + [process.pid], label="mucdriver")
        process.communicate(timeout=30)
        return {"error": f"driver did not finish in {limit} s"}
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"driver exited {process.returncode} without a result"}


def room_run(kind, n, braid_binary, sizes):
    figures = {"kind": kind, "occupants": n}
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"braidbench-muc-{kind}-")
    os.chmod(workdir, 0o755)
    try:
        with LoopbackNamespace("muc") as ns:
            braid_env, options = server_options(kind, n)
            server = servers.start_with_users(kind, ns.ns, os.path.join(workdir, kind), [DOMAIN], n, braid_binary,
                                              braid_env=braid_env, options=options)
            try:
                pids = server_pids(server.pid)
                figures["rss_before_clients_kib"] = rss_kib(pids)
                sustain = dict(sizes["sustain"])
                senders = max(1, min(sustain["senders"], n))
                sustain["senders"] = senders
                sustain["rate"] = round(sizes["offered_deliveries_per_second"] / (senders * n), 3)
                plan = {"accounts": [{"jid": f"user{i}@{DOMAIN}", "password": f"pass{i}"} for i in range(1, n + 1)],
                        "host": servers.ADDRESS, "port": servers.C2S_PORT, "room": ROOM, "max_users": n,
                        "probes": sizes["probes"], "probe_timeout": sizes.get("probe_timeout", 30),
                        "join_timeout": sizes.get("join_timeout", 300), "login_timeout": 60,
                        "sustain": sustain, "server_pids": pids,
                        "clients_per_worker": -(-n // max(1, sizes.get("driver_processes", 2)))}
                plan_file = os.path.join(workdir, "plan.json")
                with open(plan_file, "w") as handle:
                    json.dump(plan, handle)
                limit = (600 + n + sizes["probes"] * (plan["probe_timeout"] + 30) + sustain["seconds"]
                         + sustain["drain_timeout"] + 60)
                result = drive(ns, plan_file, limit)
                if not server.service.running():
                    figures["server_exited"] = lab.log_tail(server.service.log_path, 10)
            finally:
                server.stop()
        figures["driver"] = result
        with_room = (result.get("join") or {}).get("server_rss_kib")
        if with_room:
            # Each occupant's session and its place in the room, once everyone is in.
            figures["rss_with_room_kib"] = with_room
            figures["rss_per_occupant_kib"] = round((with_room - figures["rss_before_clients_kib"]) / n, 1)
        if result.get("error"):
            figures["error"] = result["error"]
        probes = result.get("probes") or {}
        sustained = result.get("sustain") or {}
        figures.update({
            "room_locked_on_creation": (result.get("room") or {}).get("locked"),
            "second_before_configuration": (result.get("room") or {}).get("second_before_configuration"),
            "configuration": (result.get("room") or {}).get("configuration"),
            "login_seconds": result.get("login_seconds"),
            "join_seconds": (result.get("join") or {}).get("seconds"),
            "probe_all_median_ms": probes.get("all_occupants_median_ms"),
            "probe_all_p95_ms": probes.get("all_occupants_p95_ms"),
            "probe_delivery_median_ms": probes.get("delivery_median_ms"),
            "probes_complete": f"{probes.get('complete')}/{probes.get('count')}" if probes else None,
            "offered_deliveries_per_second": sustained.get("offered_deliveries_per_second"),
            "deliveries_per_second": sustained.get("deliveries_per_second"),
            "deliveries_per_cpu_second": sustained.get("deliveries_per_cpu_second"),
            "lost": sustained.get("lost"),
            "out_of_order": sustained.get("out_of_order"),
            "latency_p50_ms": sustained.get("latency_p50_ms"),
            "latency_p99_ms": sustained.get("latency_p99_ms"),
            "server_cpu_seconds": sustained.get("server_cpu_seconds"),
            "driver_cpu_seconds": sustained.get("driver_cpu_seconds"),
            "driver_busiest_process_share": sustained.get("driver_busiest_process_share"),
            "server_cores_busy": sustained.get("server_cores_busy"),
            "errors_seen": sustained.get("errors_seen"),
            "connections_lost": sustained.get("connections_lost"),
        })
    except Exception as error:  # noqa: BLE001 - a failed kind/size is a result, not a crash
        figures["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    log(f"muc {kind} N={n}: {json.dumps({k: v for k, v in figures.items() if k != 'driver'})}")
    return figures


def service_cost(braid_binary, domains, repeats, limit):
    """Braid with DOMAINS hosted domains, the group-chat service on and off (hosting_scale.py)."""
    directory = tempfile.mkdtemp(prefix="braidbench-mucsvc-")
    os.chmod(directory, 0o755)
    configs = {}
    for mode, enabled in (("on", "true"), ("off", "false")):
        configs[mode] = os.path.join(directory, f"braid-muc-{mode}.yaml")
        with open(configs[mode], "w") as handle:
            handle.write(f"services:\n  muc:\n    enabled: {enabled}\n")
        os.chmod(configs[mode], 0o644)
    samples = {"on": [], "off": []}
    figures = {"domains": domains, "repeats": repeats}
    try:
        with LoopbackNamespace("mucsvc") as ns:
            for repeat in range(repeats):
                for mode in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
                    row = hosting.measure_braid(ns, braid_binary, [domains], limit, config=configs[mode])[0]
                    row.pop("rss_per_domain_bytes", None)  # against itself: meaningless here
                    samples[mode].append(row)
                    if row.get("error"):
                        figures["error"] = f"{mode}: {row['error']}"
                        raise RuntimeError(figures["error"])
    except Exception as error:  # noqa: BLE001
        figures.setdefault("error", f"{type(error).__name__}: {str(error)[-400:]}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for mode in ("on", "off"):
        figures[mode] = {"start_seconds": median([r.get("start_seconds") for r in samples[mode]]),
                         "idle_rss_kib": median([r.get("idle_rss_kib") for r in samples[mode]]),
                         "samples": samples[mode]}
    on, off = figures["on"], figures["off"]
    if on["idle_rss_kib"] is not None and off["idle_rss_kib"] is not None:
        figures["rss_per_domain_bytes"] = round((on["idle_rss_kib"] - off["idle_rss_kib"]) * 1024 / domains, 1)
    if on["start_seconds"] is not None and off["start_seconds"] is not None:
        figures["start_delta_seconds"] = round(on["start_seconds"] - off["start_seconds"], 3)
    log(f"muc service cost, {domains} domains: {json.dumps({k: v for k, v in figures.items() if k not in ('on', 'off')})}; "
        f"on {on['start_seconds']} s / {on['idle_rss_kib']} KiB, off {off['start_seconds']} s / {off['idle_rss_kib']} KiB")
    return figures


def run(kinds, braid_binary, sizes):
    rooms = []
    for n in sizes["occupants"]:
        for kind in kinds:
            rooms.append(room_run(kind, n, braid_binary, sizes))
    service = service_cost(braid_binary, sizes["service_domains"], sizes["service_repeats"], sizes.get("service_limit", 120))
    return {"rooms": rooms, "service": service, "tuning": TUNING}
