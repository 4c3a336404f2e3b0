"""c2s load with tsung (Debian tsung 1.7, XMPP plugin), for Braid, Prosody and ejabberd.

Everything runs in a loopback-only namespace of ours (braidbench-c2s): the server on
127.0.0.1:5222, tsung's controller VM (which is also its only load client) and its epmd.

Authentication: tsung 1.7's XMPP plugin knows SASL PLAIN, ANONYMOUS, EXTERNAL and
DIGEST-MD5, not SCRAM. Every server is therefore driven with PLAIN inside STARTTLS (TLS
first, then PLAIN: each server verifies the password against its stored SCRAM keys with
4096 PBKDF2 iterations). SCRAM-SHA-256 logins are measured in process by braid-bench.

Two tsung runs per server:
  sessions  users arrive in steps (1k, then to 5k, then to 10k at full size); each logs in
            (STARTTLS, PLAIN, bind, session), fetches the roster, sends initial presence and
            stays idle. During the pause after each step the server's RSS and the number of
            established c2s connections are read: RSS per idle session = (RSS - RSS before
            any client) / sessions. The login rate is the first step's logins divided by the
            time tsung took to complete them (1 s stats intervals).
  messages  for each offered rate, U users log in, then each sends chat messages to random
            online users (tsung's destination="online", 64-byte stamped bodies) every T
            seconds for D seconds. Latency is tsung's xmpp_msg_latency (stamp to arrival),
            from its fullstats log: p50/p99. The sustained rate is the highest step whose
            delivered rate is >= 95 % of the offered rate and whose p99 stays below 100 ms.
            CPU per message = server CPU seconds during the chat window / messages delivered.
"""

import contextlib
import glob
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from common import LoopbackNamespace, Sampler, cpu_seconds, log, rss_kib, server_pids, lab
import servers

DOMAIN = "c2s.test"

TUNING = {
    "braid": ["c2s.stanzas_per_second 100000 and stanza_burst 100000 (default 200/s, 1000: a per-session rate limit tsung's senders would hit)",
              "auth.scram_iterations 4096 (default 10000), log_level warning, s2s disabled"],
    "prosody": ["network_settings.tcp_backlog 1024", "log level warn", "s2s disabled, internal_hashed with 4096 iterations (default 10000)",
                "epoll backend (0.12 default)"],
    "ejabberd": ["listen backlog 1024", "open files: the machine's hard limit (20000), ERL_MAX_PORTS 65536, ERL_PROCESSES 2000000",
                 "loglevel warning", "no shaper on c2s (none configured)", "auth_password_format scram, sha, 4096 iterations (default)"],
    "tsung": ["one controller VM that is also the load client (use_controller_vm)", "SASL PLAIN inside STARTTLS (tsung 1.7 has no SCRAM)",
              "stats every 1 s (ERL_ZFLAGS -tsung_controller dumpstats_interval 1000), fullstats backend for latency percentiles"],
}

BRAID_ENV = {"BRAID_C2S_STANZAS_PER_SECOND": "100000", "BRAID_C2S_STANZA_BURST": "100000"}

LOGIN = """
    <request><jabber type="connect" ack="local"/></request>
    <request><jabber type="starttls" ack="bidi_ack"/></request>
    <request><jabber type="connect" ack="local"/></request>
    <transaction name="authenticate">
      <request><jabber type="auth_sasl" ack="local"/></request>
      <request><jabber type="connect" ack="local"/></request>
      <request><jabber type="auth_sasl_bind" ack="local"/></request>
      <request><jabber type="auth_sasl_session" ack="local"/></request>
    </transaction>
    <transaction name="roster">
      <request><jabber type="iq:roster:get" ack="local"/></request>
    </transaction>
    <request><jabber type="presence:initial" ack="no_ack"/></request>
"""


def tsung_config(phases, session_body, users_max, duration):
    phase_xml = ""
    for number, (seconds, count, rate) in enumerate(phases, 1):
        # Once maxnumber users have started, the phase idles until its duration is over.
        users = f'<users maxnumber="{count}" arrivalrate="{rate}" unit="second"/>'
        phase_xml += f'<arrivalphase phase="{number}" duration="{seconds}" unit="second">{users}</arrivalphase>\n'
    return f"""<?xml version="1.0"?>
<!DOCTYPE tsung SYSTEM "/usr/share/tsung/tsung-1.0.dtd">
<tsung loglevel="warning" dumptraffic="false" version="1.0" backend="fullstats">
  <clients><client host="localhost" use_controller_vm="true" maxusers="{users_max + 100}"/></clients>
  <servers><server host="127.0.0.1" port="5222" type="tcp"/></servers>
  <load duration="{duration}" unit="second">
{phase_xml}  </load>
  <options>
    <option type="ts_jabber" name="global_number" value="{users_max}"/>
    <option type="ts_jabber" name="userid_max" value="{users_max}"/>
    <option type="ts_jabber" name="domain" value="{DOMAIN}"/>
    <option type="ts_jabber" name="username" value="user"/>
    <option type="ts_jabber" name="passwd" value="pass"/>
  </options>
  <sessions>
    <session probability="100" name="xmpp" type="ts_jabber" bidi="true">
{LOGIN}
{session_body}
      <request><jabber type="close" ack="no_ack"/></request>
    </session>
  </sessions>
</tsung>
"""


def run_tsung(ns, workdir, name, config_text, limit):
    """Runs tsung to completion (bounded); returns its log directory."""
    config = os.path.join(workdir, f"{name}.xml")
    with open(config, "w") as handle:
        handle.write(config_text)
    logdir = os.path.join(workdir, f"log-{name}")
    os.makedirs(logdir, exist_ok=True)
    env = dict(os.environ, HOME=workdir, ERL_ZFLAGS="-tsung_controller dumpstats_interval 1000")
    argv = ns.argv(["tsung", "-n", "-I", "127.0.0.1", "-l", logdir, "-f", config, "start"])
    with open(os.path.join(workdir, f"{name}.out"), "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                   start_new_session=True)
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            log(f"tsung {name} exceeded {limit}s; stopping it")
            lab.stop_pids([process.pid] + [p for p in lab.namespace_pids(ns.ns) if _comm(p) in ("beam.smp",)])
            process.wait(timeout=20)
    runs = sorted(glob.glob(os.path.join(logdir, "*", "tsung.log")))
    return os.path.dirname(runs[-1]) if runs else None


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def parse_stats(logdir):
    """tsung.log: per 1 s interval, {name: (count, mean)} for every stats line."""
    intervals = []
    current = None
    with open(os.path.join(logdir, "tsung.log")) as handle:
        for line in handle:
            if line.startswith("# stats: dump at"):
                current = {"at": int(line.split()[-1]), "stats": {}}
                intervals.append(current)
            elif line.startswith("stats:") and current is not None:
                fields = line.split()
                try:
                    current["stats"][fields[1]] = [float(x) for x in fields[2:]]
                except ValueError:
                    pass
    return intervals


def latency_samples(logdir):
    """Every xmpp_msg_latency sample (ms) from tsung-fullstats.log."""
    samples = []
    path = os.path.join(logdir, "tsung-fullstats.log")
    if not os.path.exists(path):
        return samples
    pattern = re.compile(r"\{sample,xmpp_msg_latency,([0-9.e+\-]+)\}")
    with open(path) as handle:
        for match in pattern.finditer(handle.read()):
            samples.append(float(match.group(1)))
    return samples


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return values[k]


def count_stat(intervals, name, column=0):
    return sum(i["stats"][name][column] for i in intervals if name in i["stats"])


def established(ns):
    out = lab.run(ns.argv(["ss", "-tnH", "state", "established", "( sport = :5222 )"]), check=False)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def start_server(kind, ns, workdir, users, braid_binary):
    made = time.monotonic()
    server = servers.start_with_users(kind, ns.ns, os.path.join(workdir, kind), [DOMAIN], users, braid_binary,
                                      braid_env=BRAID_ENV)
    log(f"c2s {kind}: {users} accounts, server up ({time.monotonic() - made:.1f}s)")
    return server


@contextlib.contextmanager
def measured_server(kind, ns, workdir, users, braid_binary):
    """Starts the server and yields it with its RSS before any client (KiB); stops it."""
    server = start_server(kind, ns, workdir, users, braid_binary)
    try:
        time.sleep(2)
        yield server, rss_kib(server_pids(server.pid))
    finally:
        server.stop()


def tsung_with_samples(ns, workdir, name, config, duration, offsets, sample):
    """Runs tsung in the background and calls `sample(index)` at each offset (seconds after
    the start) while it runs; returns tsung's log directory once it has ended."""
    started = time.monotonic()
    result = {}

    def tsung():
        result["logdir"] = run_tsung(ns, workdir, name, config, duration + 120)

    thread = threading.Thread(target=tsung, daemon=True)
    thread.start()
    for index, offset in enumerate(offsets):
        wait = started + offset - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sample(index)
    thread.join(timeout=duration + 180)
    return result.get("logdir")


def sessions_run(kind, ns, workdir, steps, braid_binary, rate, pause, first_rate):
    """Idle sessions in steps; RSS per session at each step, and the login rate."""
    total = steps[-1]
    figures = {"steps": []}
    with measured_server(kind, ns, workdir, total, braid_binary) as (server, base_rss):
        figures["rss_before_clients_kib"] = base_rss
        phases, previous = [], 0
        for step in steps:
            count = step - previous
            # The first step arrives faster than any server here logs in: its completions
            # give the login rate.
            r = first_rate if not phases else rate
            phases.append((math.ceil(count / r) + pause, count, r))
            previous = step
        duration = sum(p[0] for p in phases) + 5
        body = f'<thinktime value="{duration + 60}" random="false"/>'
        config = tsung_config(phases, body, total + 10, duration)
        # The RSS is read at the end of each pause.
        offsets = [sum(p[0] for p in phases[:index + 1]) - 1.5 for index in range(len(phases))]

        def sample(index):
            sessions = established(ns)
            rss = rss_kib(server_pids(server.pid))
            per = (rss - base_rss) / sessions if sessions else None
            figures["steps"].append({"target": steps[index], "sessions": sessions, "rss_kib": rss,
                                     "rss_per_session_kib": round(per, 2) if per is not None else None})
            log(f"c2s {kind}: {sessions} sessions, RSS {rss} KiB, {per and round(per, 2)} KiB/session")

        logdir = tsung_with_samples(ns, workdir, f"{kind}-sessions", config, duration, offsets, sample)
        figures["cpu_seconds"] = round(cpu_seconds(server_pids(server.pid)), 2)
        if logdir:
            intervals = parse_stats(logdir)
            first_step = steps[0]
            # Login rate: the first step's logins over the seconds in which they completed.
            done, seconds = 0, 0
            for interval in intervals:
                n = interval["stats"].get("tr_authenticate", [0])[0]
                if n:
                    done += n
                    seconds += 1
                if done >= first_step:
                    break
            figures["logins_first_step"] = done
            figures["login_rate_per_second"] = round(done / seconds, 1) if seconds else None
            figures["login_mean_ms"] = _mean_of(intervals, "tr_authenticate")
            figures["authenticated_total"] = count_stat(intervals, "tr_authenticate")
            figures["tsung_errors"] = {k: v for k, v in _errors(intervals).items()}
            figures["tsung_log"] = logdir
    return figures


def keepalive_run(kind, ns, workdir, sessions, interval, rounds, braid_binary, rate):
    """Idle sessions that send a whitespace keepalive (RFC 6120 §4.6.1) every `interval`
    seconds, as most mobile and desktop clients do: RSS per session after login and after
    `rounds` keepalives, and the growth per keepalive (issue 10, item 10: it used to grow by
    about 31 KB per keepalive per session)."""
    figures = {"sessions_target": sessions, "interval_seconds": interval, "rounds": rounds}
    with measured_server(kind, ns, workdir, sessions, braid_binary) as (server, base_rss):
        figures["rss_before_clients_kib"] = base_rss
        login_seconds = math.ceil(sessions / rate) + 3
        duration = login_seconds + interval * rounds + 5
        body = (f'<for from="1" to="{rounds}" incr="1" var="round">'
                f'<thinktime value="{interval}" random="false"/>'
                f'<request><jabber type="raw" data=" " ack="no_ack"/></request></for>'
                f'<thinktime value="60" random="false"/>')
        config = tsung_config([(login_seconds, sessions, rate)], body, sessions + 10, duration)
        # After the logins, before the first keepalive lands everywhere; and after the last
        # round (each session sends its last one `interval` seconds after the one before;
        # allow a second for the last to be read).
        offsets = [login_seconds, login_seconds + interval * rounds + 1]
        samples = []

        def sample(index):
            samples.append((established(ns), rss_kib(server_pids(server.pid))))

        logdir = tsung_with_samples(ns, workdir, f"{kind}-keepalive", config, duration, offsets, sample)
        (logged_in, after_login), (still, after_rounds) = samples
        figures.update({
            "sessions": logged_in, "sessions_at_end": still,
            "rss_after_login_kib": after_login, "rss_after_keepalives_kib": after_rounds,
            "rss_per_session_after_login_kib": round((after_login - base_rss) / logged_in, 2) if logged_in else None,
            "rss_per_session_after_keepalives_kib": round((after_rounds - base_rss) / still, 2) if still else None,
            "growth_per_session_per_keepalive_kib": round((after_rounds - after_login) / still / rounds, 3) if still else None,
        })
        log(f"c2s {kind} keepalive: {logged_in} sessions, RSS {after_login} KiB after login, {after_rounds} KiB after "
            f"{rounds} keepalives, {figures['growth_per_session_per_keepalive_kib']} KiB per session per keepalive")
        figures["tsung_log"] = logdir
    return figures


def _mean_of(intervals, name):
    total = weighted = 0
    for i in intervals:
        if name in i["stats"]:
            count, mean = i["stats"][name][0], i["stats"][name][1]
            total += count
            weighted += count * mean
    return round(weighted / total, 2) if total else None


def _errors(intervals):
    errors = {}
    for i in intervals:
        for name, values in i["stats"].items():
            if name.startswith("error") and values:
                errors[name] = errors.get(name, 0) + values[0]
    return errors


def messages_run(kind, ns, workdir, users, rates, seconds, braid_binary):
    """One tsung run per offered rate; latency percentiles and delivered rate per step."""
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    server = start_server(kind, ns, workdir, users, braid_binary)
    steps = []
    try:
        baseline_p99 = None
        for rate in rates:
            think = users / rate
            loops = max(1, int(seconds / think))
            login_rate = 200
            login_seconds = math.ceil(users / login_rate) + 2
            settle = login_seconds + 3
            body = (f'<thinktime value="{settle}" random="false"/>\n'
                    f'<for from="1" to="{loops}" var="i">\n'
                    f'  <request><jabber type="chat" ack="no_ack" size="64" destination="online" stamped="true"/></request>\n'
                    f'  <thinktime value="{think:.4f}" random="false"/>\n'
                    f'</for>\n<thinktime value="3" random="false"/>')
            duration = login_seconds + settle + seconds + 30
            config = tsung_config([(login_seconds, users, login_rate)], body, users, duration)
            pids = server_pids(server.pid)
            cpu_marks = {}

            def probe():
                return {"cpu": cpu_seconds(pids)}

            sampler = Sampler(probe, 0.5)
            sampler.start()
            started = time.monotonic()
            logdir = run_tsung(ns, workdir, f"{kind}-rate{rate}", config, duration + 120)
            sampler.stop()
            # CPU in the chat window: from the end of the settle time for `seconds`.
            window_start = started + 1 + settle
            window_end = window_start + loops * think
            before = [v["cpu"] for t, v in sampler.samples if t <= window_start]
            after = [v["cpu"] for t, v in sampler.samples if t <= window_end]
            cpu_window = (after[-1] - before[-1]) if before and after else None
            samples = latency_samples(logdir) if logdir else []
            intervals = parse_stats(logdir) if logdir else []
            sent = users * loops  # planned: tsung does not count chat requests by type
            delivered = len(samples)
            window = loops * think
            step = {
                "offered_per_second": rate, "users": users, "interval_seconds": round(think, 4),
                "window_seconds": round(window, 2), "sent": int(sent) if sent is not None else None,
                "delivered": delivered,
                "delivered_per_second": round(delivered / window, 1) if window else None,
                "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
                "max_ms": max(samples) if samples else None,
                "server_cpu_seconds": round(cpu_window, 2) if cpu_window is not None else None,
                "cpu_us_per_message": round(cpu_window / delivered * 1e6, 1) if cpu_window and delivered else None,
                "tsung_errors": _errors(intervals),
            }
            if baseline_p99 is None and step["p99_ms"] is not None:
                baseline_p99 = step["p99_ms"]
            steps.append(step)
            log(f"c2s {kind} @ {rate}/s: {json.dumps(step)}")
            if step["delivered_per_second"] is not None and step["delivered_per_second"] < 0.5 * rate:
                log(f"c2s {kind}: delivered under half the offered rate; no higher step")
                break
    finally:
        server.stop()
    sustained = None
    for step in steps:
        ok = (step["delivered_per_second"] or 0) >= 0.95 * step["offered_per_second"] and \
             step["p99_ms"] is not None and step["p99_ms"] < 100
        if ok:
            sustained = step
    return {"steps": steps, "sustained_per_second": sustained["delivered_per_second"] if sustained else None,
            "sustained_step": sustained["offered_per_second"] if sustained else None,
            "p50_ms_at_sustained": sustained["p50_ms"] if sustained else None,
            "p99_ms_at_sustained": sustained["p99_ms"] if sustained else None,
            "cpu_us_per_message_at_sustained": sustained["cpu_us_per_message"] if sustained else None}


def run(kinds, session_steps, chat_users, rates, chat_seconds, braid_binary, login_rate=200, pause=8, first_rate=500,
        keepalive=None):
    results = {}
    for kind in kinds:
        workdir = tempfile.mkdtemp(prefix=f"braidbench-c2s-{kind}-")
        os.chmod(workdir, 0o755)
        entry = {"kind": kind}
        try:
            with LoopbackNamespace("c2s") as ns:
                try:
                    entry["sessions"] = sessions_run(kind, ns, workdir, session_steps, braid_binary, login_rate, pause, first_rate)
                except Exception as error:  # noqa: BLE001
                    entry["sessions_error"] = f"{type(error).__name__}: {str(error)[-500:]}"
                    log(f"c2s {kind} sessions: {entry['sessions_error']}")
            if keepalive:
                with LoopbackNamespace("c2s") as ns:
                    try:
                        entry["keepalive"] = keepalive_run(kind, ns, os.path.join(workdir, "k"), keepalive["sessions"],
                                                           keepalive["interval"], keepalive["rounds"], braid_binary, login_rate)
                    except Exception as error:  # noqa: BLE001
                        entry["keepalive_error"] = f"{type(error).__name__}: {str(error)[-500:]}"
                        log(f"c2s {kind} keepalive: {entry['keepalive_error']}")
            with LoopbackNamespace("c2s") as ns:
                try:
                    entry["messages"] = messages_run(kind, ns, os.path.join(workdir, "m"), chat_users, rates, chat_seconds, braid_binary)
                except Exception as error:  # noqa: BLE001
                    entry["messages_error"] = f"{type(error).__name__}: {str(error)[-500:]}"
                    log(f"c2s {kind} messages: {entry['messages_error']}")
        finally:
            entry["workdir"] = workdir
        results[kind] = entry
    return {"results": results, "tuning": TUNING}
