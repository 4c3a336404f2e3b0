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

braid-load (Sources/BraidLoad, issue 16 item 1) is the second generator, beside tsung:
  loadgen   for each offered rate, U sessions log in with real TLS (STARTTLS, the test
            certificates accepted), SCRAM-SHA-256 where the server offers it (else what it
            offers: recorded per step), bind and XEP-0198 stream management, then send chat
            messages to random other sessions at a fixed total rate (open loop: scheduled by
            time), each stamped with its scheduled send time; latency from that stamp to
            arrival in an HdrHistogram. The generator's own CPU (getrusage) and its busiest
            thread's share are recorded, so a saturated generator shows.
  calibration  tsung and braid-load against the same server at one rate both reach:
            braid-load configured as tsung drives (PLAIN, no stream management, initial
            presence), then as it drives by default (SCRAM, stream management); the delivered
            rates must agree within 10 %.
Pinning: with two or more cores the server runs on the first half of them and the generator
(tsung or braid-load) on the rest (`taskset`), in every step; recorded as "pinning".
Stream management: Prosody loads mod_smacks and ejabberd mod_stream_mgmt in every c2s run
(tsung does not enable it, so its runs are unaffected); Braid has it on by default.
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

from common import ROOT, LoopbackNamespace, Sampler, cpu_seconds, log, rss_kib, server_pids, lab
import servers

DOMAIN = "c2s.test"

TUNING = {
    "braid": ["c2s.stanzas_per_second 100000 and stanza_burst 100000 (default 200/s, 1000: a per-session rate limit tsung's senders would hit)",
              "auth.scram_iterations 4096 (default 10000), log_level warning, s2s disabled",
              "message archive off: mam.default_preference never (the peers run without an archive module)"],
    "prosody": ["network_settings.tcp_backlog 1024", "log level warn", "s2s disabled, internal_hashed with password_hash SHA-256 and 4096 iterations (default SHA-1, 10000)",
                "epoll backend (0.12 default)"],
    "ejabberd": ["listen backlog 1024", "open files: the machine's hard limit (20000), ERL_MAX_PORTS 65536, ERL_PROCESSES 2000000",
                 "loglevel warning", "no shaper on c2s (none configured)", "auth_password_format scram, auth_scram_hash sha256, 4096 iterations (default)"],
    "tsung": ["one controller VM that is also the load client (use_controller_vm)", "SASL PLAIN inside STARTTLS (tsung 1.7 has no SCRAM)",
              "stats every 1 s (ERL_ZFLAGS -tsung_controller dumpstats_interval 1000), fullstats backend for latency percentiles"],
    "braid-load": ["one event-loop thread (--threads 1) on the generator's core", "STARTTLS, certificate not verified (self-signed test certificate), TCP_NODELAY",
                   "SASL: SCRAM-SHA-256 if offered, else SCRAM-SHA-1, else PLAIN (the mechanism used is recorded per step)",
                   "stream management enabled, one <r/> per session after the last send (the server's h is checked)",
                   "64-byte bodies, each session sends to random other sessions; latency from the scheduled send time"],
    "stream management": ["Prosody: mod_smacks loaded; ejabberd: mod_stream_mgmt loaded (defaults); Braid: on by default"],
}

# The archive off, as the peers here run without an archive module (bench/mam.py measures
# Braid's archive on and off): with it on, every message was two SQLite commits with an
# fsync, and the c2s figures compared that with servers that store nothing.
BRAID_ENV = {"BRAID_C2S_STANZAS_PER_SECOND": "100000", "BRAID_C2S_STANZA_BURST": "100000", "BRAID_MAM_DEFAULT_PREFERENCE": "never"}

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
    argv = ns.argv(generator_argv(["tsung", "-n", "-I", "127.0.0.1", "-l", logdir, "-f", config, "start"]))
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


def pinning():
    """Cores for the server and for the generator (tsung or braid-load), or None when the
    machine has one core or no taskset: the server takes the first half, the generator the rest."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or not shutil.which("taskset"):
        return None
    half = len(cores) // 2
    return {"server": ",".join(map(str, cores[:half])), "generator": ",".join(map(str, cores[half:]))}


PIN = pinning()


def pinning_record():
    return dict(PIN, tool="taskset") if PIN else {"note": "not pinned (one core, or no taskset)"}


def generator_argv(argv):
    return ["taskset", "-c", PIN["generator"], *argv] if PIN else argv


def pin_server(server):
    """Every thread of every server process onto the server's cores (children started later
    inherit it)."""
    if not PIN:
        return
    for pid in server_pids(server.pid):
        lab.run(["taskset", "-a", "-p", "-c", PIN["server"], str(pid)], check=False)


class _ProsodyWithSM(servers.ProsodyServer):
    """Prosody 0.12 with mod_smacks (XEP-0198) loaded; the rest as servers.py writes it."""

    def write_config(self):
        super().write_config()
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace('"admin_shell" }', '"admin_shell", "smacks" }', 1)
        lab.write_file(self.config, text, 0o640)
        lab.chown_tree(self.directory, "prosody")


class _EjabberdWithSM(servers.EjabberdServer):
    """ejabberd 23.01 with mod_stream_mgmt (XEP-0198) loaded; the rest as servers.py writes it."""

    def write_config(self):
        super().write_config()
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace("modules:\n", "modules:\n  mod_stream_mgmt: {}\n", 1)
        lab.write_file(self.config, text, 0o640)
        lab.chown_tree(self.directory, "ejabberd")


def start_server(kind, ns, workdir, users, braid_binary):
    made = time.monotonic()
    # servers.start_with_users with stream management on the peers (SERVERS swapped for the call).
    saved = dict(servers.SERVERS)
    servers.SERVERS.update({"prosody": _ProsodyWithSM, "ejabberd": _EjabberdWithSM})
    try:
        server = servers.start_with_users(kind, ns.ns, os.path.join(workdir, kind), [DOMAIN], users, braid_binary,
                                          braid_env=BRAID_ENV)
    finally:
        servers.SERVERS.clear()
        servers.SERVERS.update(saved)
    pin_server(server)
    log(f"c2s {kind}: {users} accounts, server up ({time.monotonic() - made:.1f}s), pinning {pinning_record()}")
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


def load_average():
    with open("/proc/loadavg") as handle:
        return [float(x) for x in handle.read().split()[:3]]


def tsung_step(kind, ns, workdir, server, users, rate, seconds):
    """One tsung run at RATE: U users log in, then chat for SECONDS; the step's figures."""
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

    def probe():
        return {"cpu": cpu_seconds(pids)}

    sampler = Sampler(probe, 0.25)
    sampler.start()
    started = time.monotonic()
    logdir = run_tsung(ns, workdir, f"{kind}-rate{rate}", config, duration + 120)
    sampler.stop()
    # CPU in the planned chat window: from the end of the settle time for `seconds`,
    # assuming tsung starts in 1 s (how it was measured before 2026-12-07).
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
    # CPU per message from the chat seconds tsung itself logged: its 1 s intervals with
    # deliveries, without the first and the last (partly outside the chat), against the
    # server's CPU over the same seconds. tsung's start-up varies by seconds, so this is
    # what the step reports; the planned window's figure is kept beside it.
    measured = _chat_window_cpu(intervals, sampler.samples)
    return {
        "generator": "tsung",
        "offered_per_second": rate, "users": users, "interval_seconds": round(think, 4),
        "window_seconds": round(window, 2), "sent": int(sent) if sent is not None else None,
        "delivered": delivered,
        "delivered_per_second": round(delivered / window, 1) if window else None,
        "p50_ms": percentile(samples, 50), "p90_ms": percentile(samples, 90), "p99_ms": percentile(samples, 99),
        "max_ms": max(samples) if samples else None,
        "server_cpu_seconds": round(cpu_window, 2) if cpu_window is not None else None,
        "cpu_us_per_message": measured["cpu_us_per_message"] if measured else
        (round(cpu_window / delivered * 1e6, 1) if cpu_window and delivered else None),
        "cpu_us_per_message_planned_window": round(cpu_window / delivered * 1e6, 1) if cpu_window and delivered else None,
        "cpu_window_from_tsung_stats": measured,
        "tsung_errors": _errors(intervals),
        "load_average_after": load_average(),
    }


def _chat_window_cpu(intervals, cpu_samples):
    """Server CPU per delivered message over tsung's inner chat seconds (see tsung_step), or
    None with fewer than four such seconds. tsung stamps each interval with the wall clock
    at its end; the sampler uses the monotonic clock."""
    chat = [(i["at"], i["stats"]["xmpp_msg_latency"][0]) for i in intervals
            if i["stats"].get("xmpp_msg_latency", [0])[0] > 0]
    if len(chat) < 4 or not cpu_samples:
        return None
    inner = chat[1:-1]
    offset = time.time() - time.monotonic()
    start, end = inner[0][0] - 1 - offset, inner[-1][0] - offset
    before = [v["cpu"] for t, v in cpu_samples if t <= start]
    after = [v["cpu"] for t, v in cpu_samples if t <= end]
    messages = sum(count for _, count in inner)
    if not before or not after or not messages:
        return None
    cpu = after[-1] - before[-1]
    return {"seconds": round(end - start, 1), "messages": int(messages), "server_cpu_seconds": round(cpu, 2),
            "cpu_us_per_message": round(cpu / messages * 1e6, 1)}


def summarize(steps):
    """The sustained step: the highest offered rate whose delivered rate is >= 95 % of it
    and whose p99 stays below 100 ms."""
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


def messages_run(kind, ns, workdir, users, rates, seconds, braid_binary):
    """One tsung run per offered rate; latency percentiles and delivered rate per step."""
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    server = start_server(kind, ns, workdir, users, braid_binary)
    steps = []
    try:
        for rate in rates:
            step = tsung_step(kind, ns, workdir, server, users, rate, seconds)
            steps.append(step)
            log(f"c2s {kind} @ {rate}/s: {json.dumps(step)}")
            if step["delivered_per_second"] is not None and step["delivered_per_second"] < 0.5 * rate:
                log(f"c2s {kind}: delivered under half the offered rate; no higher step")
                break
    finally:
        server.stop()
    return summarize(steps)


# -- braid-load ------------------------------------------------------------------------------

def load_binary():
    """braid-load: $BRAID_LOAD_BINARY, else a release build (.build or .build-load), else a
    debug one; copied privately so that a build elsewhere cannot swap it mid-run. None if absent."""
    candidates = [os.environ.get("BRAID_LOAD_BINARY"),
                  os.path.join(ROOT, ".build", "release", "braid-load"),
                  os.path.join(ROOT, ".build-load", "release", "braid-load"),
                  os.path.join(ROOT, ".build", "debug", "braid-load")]
    for path in candidates:
        if path and os.path.exists(path):
            private = os.path.join(tempfile.mkdtemp(prefix="braidbench-load-"), "braid-load")
            shutil.copy2(path, private)
            os.chmod(os.path.dirname(private), 0o755)
            built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(path)))
            return private, {"path": path, "built": built,
                             "config": "debug" if "/debug/" in path else "release"}
    return None, None


def loadgen_args(users, rate, seconds, login_rate, mechanism="auto", sm=True, presence=False, threads=1):
    args = ["--host", servers.ADDRESS, "--port", str(servers.C2S_PORT), "--user", f"user%d@{DOMAIN}",
            "--password", "pass%d", "--sessions", str(users), "--login-rate", str(login_rate),
            "--rate", str(rate), "--duration", str(seconds), "--insecure", "--mechanism", mechanism,
            "--threads", str(threads), "--body-bytes", "64", "--drain", "10"]
    if not sm:
        args.append("--no-stream-management")
    if presence:
        args.append("--presence")
    return args


def run_loadgen(ns, workdir, name, binary, args, limit):
    """Runs braid-load (pinned) to completion; returns (report or None, phase marks as
    monotonic times: messages, sent, drained)."""
    out = os.path.join(workdir, f"{name}.json")
    argv = ns.argv(generator_argv([binary, *args, "--output", out, "--verbose"]))
    marks = {}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)

    def reader():
        with open(os.path.join(workdir, f"{name}.err"), "w") as errlog:
            for line in process.stderr:
                errlog.write(line)
                match = re.search(r"phase: (\w+)", line)
                if match:
                    marks[match.group(1)] = time.monotonic()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        log(f"braid-load {name} exceeded {limit}s; stopping it")
        lab.stop_pids([process.pid])
        process.wait(timeout=20)
    thread.join(timeout=5)
    if not os.path.exists(out):
        return None, marks
    with open(out) as handle:
        return json.load(handle), marks


def loadgen_step(kind, ns, workdir, server, users, rate, seconds, binary, login_rate, **options):
    """One braid-load run at RATE (fresh logins, then SECONDS of messages); the step's figures,
    in the same shape as tsung_step's plus the generator's own."""
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    pids = server_pids(server.pid)

    def probe():
        return {"cpu": cpu_seconds(pids)}

    sampler = Sampler(probe, 0.1)  # finer than the 0.3 s gap after the logins
    sampler.start()
    name = f"{kind}-load{rate}" + "".join(f"-{k}{v}" for k, v in sorted(options.items()))
    limit = users / login_rate + seconds + 120
    report, marks = run_loadgen(ns, workdir, name, binary, loadgen_args(users, rate, seconds, login_rate, **options), limit)
    sampler.stop()
    step = {"generator": "braid-load", "offered_per_second": rate, "users": users, "window_seconds": seconds,
            "options": options, "load_average_after": load_average(), "report": os.path.join(workdir, f"{name}.json")}
    if report is None:
        step["error"] = "braid-load wrote no report (see the .err file beside it)"
        step.update({"delivered_per_second": None, "p50_ms": None, "p99_ms": None, "cpu_us_per_message": None})
        return step
    m, lg, cpu, sm = report["messages"], report["logins"], report["generator_cpu"], report["stream_management"]
    latency = m["latency_ms"]
    cpu_window = None
    if "messages" in marks and "sent" in marks:
        # The sending window: braid-load starts sending 0.1 s after it prints the mark.
        start, end = marks["messages"] + 0.1, marks["sent"]
        before = [v["cpu"] for t, v in sampler.samples if t <= start]
        after = [v["cpu"] for t, v in sampler.samples if t <= end]
        cpu_window = (after[-1] - before[-1]) if before and after else None
    cpu_per_login_ms = None
    if "logins" in marks and "messages" in marks and lg["succeeded"]:
        # From just before the first login to the quiet gap braid-load leaves after the last
        # (300 ms, longer than the sampling interval): TLS, SASL, bind, presence and XEP-0198.
        before = [v["cpu"] for t, v in sampler.samples if t <= marks["logins"]]
        after = [v["cpu"] for t, v in sampler.samples if t <= marks["messages"]]
        if before and after:
            cpu_per_login_ms = round((after[-1] - before[-1]) / lg["succeeded"] * 1000, 3)
    step.update({
        "sessions_logged_in": lg["succeeded"], "login_failures": lg["failed"], "login_errors": lg["errors"],
        "mechanism": lg["mechanism"], "mechanisms": lg["mechanisms"],
        "logins_per_second": lg["achieved_per_second"], "login_p50_ms": lg["latency_ms"].get("p50"),
        "login_p99_ms": lg["latency_ms"].get("p99"), "generator_cpu_ms_per_login": lg["generator_cpu_ms_per_login"],
        "server_cpu_ms_per_login": cpu_per_login_ms,
        "sent": m["sent"], "sent_per_second": m["sent_per_second"], "delivered": m["received"], "lost": m["lost"],
        "delivered_per_second": m["delivered_per_second"],
        "p50_ms": latency.get("p50"), "p90_ms": latency.get("p90"), "p99_ms": latency.get("p99"),
        "p99_9_ms": latency.get("p99_9"), "max_ms": latency.get("max"),
        "send_lag_p99_ms": m["send_lag_ms"].get("p99"),
        "p50_from_schedule_ms": m.get("latency_from_schedule_ms", {}).get("p50"),
        "p99_from_schedule_ms": m.get("latency_from_schedule_ms", {}).get("p99"),
        "server_cpu_seconds": round(cpu_window, 2) if cpu_window is not None else None,
        "cpu_us_per_message": round(cpu_window / m["received"] * 1e6, 1) if cpu_window and m["received"] else None,
        "generator_cores": cpu["message_phase_cores"], "generator_busiest_thread_share": cpu["busiest_thread_share"],
        "generator_us_per_message": cpu["us_per_message_sent_and_received"],
        "sm_sessions": sm["enabled_sessions"], "sm_final_acked": sm["final_acked_stanzas"],
        "sm_final_expected": sm["final_expected_stanzas"], "disconnects": report["disconnects"], "errors": report["errors"],
    })
    return step


def loadgen_messages_run(kind, ns, workdir, users, rates, seconds, braid_binary, binary, login_rate):
    """braid-load at each offered rate against one server; summarized like messages_run."""
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    server = start_server(kind, ns, workdir, users, braid_binary)
    steps = []
    try:
        for rate in rates:
            step = loadgen_step(kind, ns, workdir, server, users, rate, seconds, binary, login_rate)
            steps.append(step)
            log(f"c2s {kind} braid-load @ {rate}/s: {json.dumps(step)}")
            if step["delivered_per_second"] is None or step["delivered_per_second"] < 0.5 * rate:
                log(f"c2s {kind}: braid-load delivered under half the offered rate; no higher step")
                break
    finally:
        server.stop()
    return summarize(steps)


def calibration_run(kind, ns, workdir, users, rate, seconds, braid_binary, binary, login_rate):
    """tsung and braid-load against the same server at RATE: braid-load first as tsung drives
    (PLAIN, no stream management, initial presence), then as it drives by default. The
    delivered rates should agree within 10 % (issue 16)."""
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    server = start_server(kind, ns, workdir, users, braid_binary)
    try:
        tsung = tsung_step(kind, ns, workdir, server, users, rate, seconds)
        alike = loadgen_step(kind, ns, workdir, server, users, rate, seconds, binary, login_rate,
                             mechanism="PLAIN", sm=False, presence=True)
        default = loadgen_step(kind, ns, workdir, server, users, rate, seconds, binary, login_rate)
    finally:
        server.stop()

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    delivered = ratio(alike["delivered_per_second"], tsung["delivered_per_second"])
    result = {"offered_per_second": rate, "users": users, "seconds": seconds, "tsung": tsung,
              "braid_load_like_tsung": alike, "braid_load_default": default,
              "delivered_ratio": delivered,
              "delivered_ratio_default": ratio(default["delivered_per_second"], tsung["delivered_per_second"]),
              "p50_ratio": ratio(alike["p50_ms"], tsung["p50_ms"]), "p99_ratio": ratio(alike["p99_ms"], tsung["p99_ms"]),
              "cpu_per_message_ratio": ratio(alike["cpu_us_per_message"], tsung["cpu_us_per_message"]),
              "agree_within_10_percent": delivered is not None and abs(delivered - 1) <= 0.10}
    log(f"c2s {kind} calibration @ {rate}/s: tsung {tsung['delivered_per_second']}/s p50 {tsung['p50_ms']} p99 {tsung['p99_ms']}; "
        f"braid-load {alike['delivered_per_second']}/s p50 {alike['p50_ms']} p99 {alike['p99_ms']}; ratio {delivered}")
    return result


def default_loadgen(chat_users, rates, chat_seconds, login_rate):
    """braid-load's sizes from tsung's: the same users, rates and window, plus two rates
    beyond tsung's ceiling here (twice and four times the highest) on a full run; the
    calibration at the highest rate both reach on these 2 cores (2,000/s, or the smoke rate)."""
    full = max(rates) >= 1000  # not a smoke run: the smoke run does one short braid-load step, no calibration
    extra = [max(rates) * 2, max(rates) * 4] if full else []
    reachable = [r for r in rates if r <= 2000]
    calibration = {"rate": max(reachable) if reachable else min(rates), "users": chat_users, "seconds": chat_seconds}
    return {"users": chat_users, "rates": list(rates) + extra, "seconds": chat_seconds, "login_rate": login_rate,
            "calibration": calibration if full else None}


def run(kinds, session_steps, chat_users, rates, chat_seconds, braid_binary, login_rate=200, pause=8, first_rate=500,
        keepalive=None, loadgen=None):
    results = {}
    loadgen = loadgen or default_loadgen(chat_users, rates, chat_seconds, login_rate)
    binary, binary_facts = load_binary()
    if binary is None:
        log("c2s: braid-load is not built (swift build -c release --product braid-load); its steps are skipped")
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
            if binary:
                with LoopbackNamespace("c2s") as ns:
                    try:
                        entry["loadgen"] = loadgen_messages_run(kind, ns, os.path.join(workdir, "l"), loadgen["users"],
                                                                loadgen["rates"], loadgen["seconds"], braid_binary, binary,
                                                                loadgen["login_rate"])
                    except Exception as error:  # noqa: BLE001
                        entry["loadgen_error"] = f"{type(error).__name__}: {str(error)[-500:]}"
                        log(f"c2s {kind} braid-load: {entry['loadgen_error']}")
                calibration = loadgen.get("calibration")
                if calibration:
                    with LoopbackNamespace("c2s") as ns:
                        try:
                            entry["calibration"] = calibration_run(kind, ns, os.path.join(workdir, "c"), calibration["users"],
                                                                   calibration["rate"], calibration["seconds"], braid_binary,
                                                                   binary, loadgen["login_rate"])
                        except Exception as error:  # noqa: BLE001
                            entry["calibration_error"] = f"{type(error).__name__}: {str(error)[-500:]}"
                            log(f"c2s {kind} calibration: {entry['calibration_error']}")
        finally:
            entry["workdir"] = workdir
        results[kind] = entry
    if binary:
        shutil.rmtree(os.path.dirname(binary), ignore_errors=True)
    return {"results": results, "tuning": TUNING, "pinning": pinning_record(), "braid_load": binary_facts,
            "loadgen_sizes": loadgen if binary else None}


def main():
    """Only the braid-load parts, for one server kind (needs root):
    bench/c2s.py KIND [--users U] [--rates R,R] [--seconds S] [--calibrate RATE] [--braid PATH]"""
    import argparse
    import common
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=["braid", "prosody", "ejabberd"])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rates", default="1000")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--login-rate", type=int, default=200)
    parser.add_argument("--calibrate", type=int, help="run the tsung calibration at this rate instead")
    parser.add_argument("--braid", default=os.path.join(ROOT, ".build", "release", "braid"))
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()
    common.raise_file_limit()
    binary, facts = load_binary()
    if binary is None:
        raise SystemExit("braid-load is not built")
    private = os.path.join(tempfile.mkdtemp(prefix="braidbench-bin-"), "braid")
    shutil.copy2(args.braid, private)
    os.chmod(os.path.dirname(private), 0o755)
    workdir = tempfile.mkdtemp(prefix=f"braidbench-c2s-{args.kind}-")
    os.chmod(workdir, 0o755)
    result = {"kind": args.kind, "pinning": pinning_record(), "braid_load": facts, "load_average_at_start": load_average(),
              "braid_binary": args.braid}
    try:
        with LoopbackNamespace("c2s") as ns:
            if args.calibrate:
                result["calibration"] = calibration_run(args.kind, ns, workdir, args.users, args.calibrate, args.seconds,
                                                        private, binary, args.login_rate)
            else:
                rates = [int(r) for r in args.rates.split(",")]
                result["loadgen"] = loadgen_messages_run(args.kind, ns, workdir, args.users, rates, args.seconds, private,
                                                         binary, args.login_rate)
    finally:
        shutil.rmtree(os.path.dirname(private), ignore_errors=True)
        shutil.rmtree(os.path.dirname(binary), ignore_errors=True)
    result["load_average_at_end"] = load_average()
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
