"""Logins: the server's CPU per login and login latency, Braid beside Prosody and ejabberd
(issue 16's rows "CPU per login" and "login latency").

braid-load logs USERS fresh sessions in at LOGIN_RATE per second against one server at a time,
pinned (server and generator on cores of their own, as in c2s.py): TCP, STARTTLS, SASL
SCRAM-SHA-256 against stored keys (4096 iterations everywhere), resource binding, XEP-0198
enabled; then a short message phase so the run ends as c2s's do. Server CPU per login is the
server's CPU from just before the first login to the quiet gap braid-load leaves after the
last, over the sessions logged in; latency is from connect to the bound, SM-enabled session,
as braid-load measures it (TCP_NODELAY on its side).

Then tsung (a client that leaves Nagle on, SASL PLAIN inside STARTTLS, as in c2s.py) logs
TSUNG_USERS sessions in at TSUNG_RATE per second, a rate one core serves without queueing:
the mean of its `authenticate` transaction (SASL, stream restart, bind, session). The c2s
session steps measure tsung's logins too, but arriving faster than the server logs them in,
so their mean is mostly queueing.

The same server and accounts serve every login rate in turn, so the later steps log the same
accounts in again (each step's sessions are closed at its end).
"""

import os
import shutil
import tempfile

import c2s
from common import LoopbackNamespace, log


def run(kinds, users, login_rates, braid_binary, tsung_users=200, tsung_rate=20):
    binary, facts = c2s.load_binary()
    if binary is None:
        return {"error": "braid-load is not built (swift build -c release --product braid-load)"}
    try:
        return _run(kinds, users, login_rates, braid_binary, binary, facts, tsung_users, tsung_rate)
    finally:
        shutil.rmtree(os.path.dirname(binary), ignore_errors=True)


def _run(kinds, users, login_rates, braid_binary, binary, facts, tsung_users, tsung_rate):
    results = {}
    for kind in kinds:
        workdir = tempfile.mkdtemp(prefix=f"braidbench-logins-{kind}-")
        os.chmod(workdir, 0o755)
        steps = []
        try:
            with LoopbackNamespace("logins") as ns:
                server = c2s.start_server(kind, ns, workdir, users, braid_binary)
                try:
                    for login_rate in login_rates:
                        step = c2s.loadgen_step(kind, ns, workdir, server, users, 100, 2, binary, login_rate)
                        figures = {key: step.get(key) for key in (
                            "sessions_logged_in", "login_failures", "mechanism", "logins_per_second", "login_p50_ms",
                            "login_p99_ms", "server_cpu_ms_per_login", "generator_cpu_ms_per_login", "load_average_after", "error")}
                        figures["login_rate"] = login_rate
                        figures["users"] = users
                        steps.append(figures)
                        log(f"logins {kind} @ {login_rate}/s: {figures}")
                finally:
                    server.stop()
        except Exception as error:  # noqa: BLE001
            results[kind] = {"steps": steps, "error": f"{type(error).__name__}: {str(error)[-400:]}"}
            log(f"logins {kind}: {results[kind]['error']}")
            continue
        entry = {"steps": steps, "workdir": workdir}
        try:
            with LoopbackNamespace("logins") as ns:
                figures = c2s.sessions_run(kind, ns, os.path.join(workdir, "tsung"), [tsung_users], braid_binary,
                                           tsung_rate, 3, tsung_rate)
            entry["tsung"] = {"users": tsung_users, "login_rate": tsung_rate, "login_mean_ms": figures.get("login_mean_ms"),
                              "logins_per_second": figures.get("login_rate_per_second"),
                              "authenticated": figures.get("authenticated_total")}
            log(f"logins {kind} tsung @ {tsung_rate}/s: {entry['tsung']}")
        except Exception as error:  # noqa: BLE001
            entry["tsung_error"] = f"{type(error).__name__}: {str(error)[-400:]}"
            log(f"logins {kind} tsung: {entry['tsung_error']}")
        results[kind] = entry
    return {"results": results, "pinning": c2s.pinning_record(), "braid_load": facts}
