"""The web side: XMPP over WebSocket (RFC 7395) beside TCP, and HTTP file upload (XEP-0363),
on Braid, Prosody and ejabberd.

Per server, in a loopback-only namespace of ours (braidbench-web, /etc/hosts there naming
web.test and upload.web.test 127.0.0.1), with 2·N accounts on web.test, one server start
for everything below; bench/webdriver.py holds the clients:

  messages  N pairs of accounts exchange chat messages, each side keeping W in flight (every
            message read lets its sender send the next), for T seconds after a warm-up, first
            over TCP (STARTTLS on 5222), then over WebSocket (wss on the HTTPS listener: Braid
            /xmpp-websocket on admin.posh_port, Prosody mod_websocket on https_ports,
            ejabberd ejabberd_http_ws at /ws); both TLS, SASL PLAIN (else SCRAM-SHA-1), the
            same driver, fresh sessions for each transport. Delivered messages/s, latency
            (p50/p99), the server's CPU seconds over the window (messages per CPU-second),
            the driver's own CPU, and what other processes on the machine used (/proc/stat): if
            that is above 2 CPU s, the measurement is repeated once when the load average is
            below 1 (bounded wait). After the window, sending stops and every message sent must
            arrive (lost = sent − read, which fails the figure if not 0).
  upload    one account asks upload.web.test for a slot, PUTs a file of random bytes (1 MB
            and 100 MB; 10^6 bytes) to the slot's URL and GETs it back: MB/s of each, the
            bytes read back compared with those sent, the server's RSS (VmRSS of its
            processes, sampled every 20 ms) before and at its peak during each transfer.
            Braid: its upload module (services.upload) on the HTTPS listener; Prosody 0.12:
            mod_http_file_share (a component upload.web.test); ejabberd 23.01: mod_http_upload
            behind its ejabberd_http listener (tls) at /upload.

Ratios: WS/TCP per server (messages/s and messages per server CPU-second), and Braid/Prosody,
Braid/ejabberd for each figure.
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from common import HERE, PYTHON, LoopbackNamespace, lab, log, rss_kib, server_pids, session_members
import servers

DOMAIN = "web.test"
UPLOAD_DOMAIN = f"upload.{DOMAIN}"
MAX_FILE = 200 * 1024 * 1024
WS = {"braid": {"port": 5443, "path": "/xmpp-websocket"},
      "prosody": {"port": 5281, "path": "/xmpp-websocket"},
      "ejabberd": {"port": 5443, "path": "/ws"}}

TUNING = {
    "braid": ["WebSocket and upload as shipped on the HTTPS listener (admin.posh_port 5443, 127.0.0.1): "
              "/xmpp-websocket, services.upload at upload.web.test, URLs https://upload.web.test:5443/…",
              f"upload.max_file_size {MAX_FILE} (default 100 MiB, below the 10^8-byte file plus nothing to spare), "
              "quotas as shipped (1 GiB per account and per day)",
              "message archive off: mam.default_preference never (bench/mam.py's `off`; the peers run without "
              "mod_mam here, and Braid's archive as shipped commits every message to SQLite with an fsync before "
              "delivery, which the mam section measures)",
              "c2s.stanzas_per_second 1000000 (default 200 per session, which would close a saturating sender's "
              "stream; the peers have no limit configured), auth.scram_iterations 4096, log_level warning, s2s off"],
    "prosody": ['mod_websocket (modules_enabled "websocket"), https_ports {5281} on 127.0.0.1 with the server '
                "certificate; network_settings.nagle = false (as in the other scenarios)",
                f'Component "{UPLOAD_DOMAIN}" "http_file_share" with http_file_share_size_limit {MAX_FILE} and '
                "daily_quota 10 GiB (defaults 10 MiB and 100 MiB); 0.12 streams uploads to a file. Its PUT rate (about 6 MB/s, "
                "the server mostly idle: see its CPU seconds) is not the driver's: curl got the same by hand (20 MB in "
                "3.3 s), and network_settings.read_size 65536 (default 8192) changed nothing",
                "log level warn, internal storage, 4096 iterations"],
    "ejabberd": ["a second listener: ejabberd_http on 5443 with tls: true, request_handlers /ws: ejabberd_http_ws and "
                 "/upload: mod_http_upload",
                 f"mod_http_upload with put_url https://@HOST@:5443/upload, max_size {MAX_FILE}, docroot in the "
                 "server's directory, thumbnail false (no image library here)",
                 "no shapers, loglevel warning"],
    "driver": ["bench/webdriver.py: asyncio, one loop per process, N pairs split over the processes; its own RFC 6455 "
               "client (masked frames, one stanza per text message); TLS for both transports, so the comparison is "
               "the framing and the HTTP-side code, not encryption",
               "the driver shares the 2 cores with the server; its CPU over each window is reported beside the "
               "server's",
               "upload: Python's http.client over TLS, 256 KiB writes, 1 MiB reads, the bytes compared as they "
               "arrive"],
}


class WebBraid(servers.BraidServer):
    http_port = WS["braid"]["port"]


class WebProsody(servers.ProsodyServer):
    http_port = WS["prosody"]["port"]

    def write_config(self):
        super().write_config()
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace('"admin_shell" }', '"admin_shell", "websocket" }', 1)
        text = text.replace("allow_registration = false\n", "allow_registration = false\n"
                            f"https_ports = {{ {self.http_port} }}\nhttps_interfaces = {{ \"{servers.ADDRESS}\" }}\n"
                            "http_ports = { }\n", 1)
        text += (f'Component "{UPLOAD_DOMAIN}" "http_file_share"\n'
                 f"\thttp_file_share_size_limit = {MAX_FILE}\n"
                 f"\thttp_file_share_daily_quota = {10 * 1024 * 1024 * 1024}\n")
        lab.write_file(self.config, text, 0o640)


class WebEjabberd(servers.EjabberdServer):
    http_port = WS["ejabberd"]["port"]

    def write_config(self):
        super().write_config()
        docroot = os.path.join(self.directory, "upload")
        os.makedirs(docroot, exist_ok=True)
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace("auth_method: internal\n", f"""  - port: {self.http_port}
    ip: "{servers.ADDRESS}"
    module: ejabberd_http
    tls: true
    request_handlers:
      /ws: ejabberd_http_ws
      /upload: mod_http_upload
auth_method: internal
""", 1)
        text += f"""  mod_http_upload:
    put_url: "https://@HOST@:{self.http_port}/upload"
    docroot: "{docroot}"
    max_size: {MAX_FILE}
    thumbnail: false
"""
        lab.write_file(self.config, text, 0o640)
        lab.chown_tree(self.directory, "ejabberd")


def start(kind, ns, directory, users, braid_binary):
    if kind == "braid":
        server = WebBraid(ns, directory, [DOMAIN], braid_binary,
                          extra_env={"BRAID_C2S_STANZAS_PER_SECOND": "1000000", "BRAID_MAM_DEFAULT_PREFERENCE": "never",
                                     "BRAID_UPLOAD_MAX_FILE_SIZE": str(MAX_FILE)})
    elif kind == "prosody":
        server = WebProsody(ns, directory, [DOMAIN], network={"nagle": False})
    else:
        server = WebEjabberd(ns, directory, [DOMAIN])
    if kind != "ejabberd":
        server.add_users(users)
    server.start()
    try:
        if not server.wait_ready(120):
            raise lab.LabError(f"{kind} did not answer on {servers.C2S_PORT}: {lab.log_tail(server.service.log_path, 20)}")
        lab.wait_until(lambda: lab.listening(ns, server.http_port) or not server.service.running(), 60,
                       f"{kind} listening on {server.http_port}", interval=0.1)
        if not server.service.running():
            raise lab.LabError(f"{kind} exited: {lab.log_tail(server.service.log_path, 20)}")
        if kind == "ejabberd":
            server.add_users(users)
    except Exception:
        server.stop()
        raise
    return server


def wait_for_load(level, limit):
    """Polls (bounded) until the 1-minute load average is below LEVEL; False if it was not."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open("/proc/loadavg") as handle:
            if float(handle.read().split()[0]) < level:
                return True
        time.sleep(5)
    return False


def drive(ns, plan, workdir, name, limit):
    """Runs the driver in NS (its own session, stopped by PID if it overruns); returns its JSON."""
    plan_file = os.path.join(workdir, f"{name}.json")
    with open(plan_file, "w") as handle:
        json.dump(plan, handle)
    process = subprocess.Popen(ns.argv([PYTHON, os.path.join(HERE, "webdriver.py"), plan_file]),
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        lab.stop_pids(session_members(process.pid) + [process.pid], label="webdriver")
        process.communicate(timeout=30)
        return {"error": f"driver did not finish in {limit} s"}
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"driver exited {process.returncode} without a result"}


def summarize_upload(transfers):
    """Per size: median MB/s of PUT and GET over the verified repetitions, the highest peaks."""
    out = []
    for size in sorted({t["bytes"] for t in transfers}):
        rows = [t for t in transfers if t["bytes"] == size]
        good = [t for t in rows if t.get("verified")]
        entry = {"bytes": size, "repetitions": len(rows), "verified": len(good),
                 "errors": [t["error"] for t in rows if t.get("error")][:3]}
        if good:
            entry["put_mb_per_second"] = round(statistics.median(t["put_mb_per_second"] for t in good), 1)
            entry["get_mb_per_second"] = round(statistics.median(t["get_mb_per_second"] for t in good), 1)
            entry["put_mb_per_second_all"] = [t["put_mb_per_second"] for t in good]
            entry["get_mb_per_second_all"] = [t["get_mb_per_second"] for t in good]
            entry["rss_before_kib"] = min(t["rss_before_kib"] for t in good)
            entry["put_peak_rss_kib"] = max(t["put_peak_rss_kib"] for t in good)
            entry["get_peak_rss_kib"] = max(t["get_peak_rss_kib"] for t in good)
            entry["put_peak_growth_kib"] = max(t["put_peak_rss_kib"] - t["rss_before_kib"] for t in good)
            entry["get_peak_growth_kib"] = max(t["get_peak_rss_kib"] - t["rss_between_kib"] for t in good)
            entry["put_server_cpu_seconds"] = round(statistics.median(t["put_server_cpu_seconds"] for t in good), 3)
            entry["get_server_cpu_seconds"] = round(statistics.median(t["get_server_cpu_seconds"] for t in good), 3)
        out.append(entry)
    return out


def run_one(kind, braid_binary, sizes):
    figures = {"kind": kind}
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"braidbench-web-{kind}-")
    os.chmod(workdir, 0o755)
    pairs = sizes["pairs"]
    try:
        with LoopbackNamespace("web") as ns:
            with open(f"/etc/netns/{ns.ns}/hosts", "a") as handle:
                handle.write(f"127.0.0.1 {DOMAIN} {UPLOAD_DOMAIN}\n")
            server = start(kind, ns.ns, os.path.join(workdir, kind), 2 * pairs, braid_binary)
            try:
                pids = server_pids(server.pid)
                figures["rss_idle_kib"] = rss_kib(pids)
                base = {"domain": DOMAIN, "host": servers.ADDRESS, "tcp_port": servers.C2S_PORT, "ws": WS[kind],
                        "accounts": [{"jid": f"user{i}@{DOMAIN}", "password": f"pass{i}"} for i in range(1, 2 * pairs + 1)],
                        "login_timeout": 60, "server_pids": pids}
                for transport in ("tcp", "ws"):
                    plan = dict(base, mode="messages", transport=transport, pairs=pairs, window=sizes["window"],
                                seconds=sizes["seconds"], warmup=sizes["warmup"], drain_timeout=sizes["drain_timeout"],
                                processes=sizes["driver_processes"])
                    limit = 60 + 30 + sizes["warmup"] + sizes["seconds"] + sizes["drain_timeout"] + 60
                    for attempt in (1, 2):
                        result = drive(ns, plan, workdir, f"messages-{transport}", limit)
                        result["attempt"] = attempt
                        figures[transport] = result
                        log(f"web {kind} {transport}: {json.dumps(result)}")
                        other = result.get("other_cpu_seconds") or 0
                        threshold = sizes.get("max_other_cpu_seconds")   # None (smoke): never again
                        if attempt == 2 or threshold is None or other <= threshold or not server.service.running():
                            break
                        # Someone else's work shared the cores: once more, when the load is down.
                        log(f"web {kind} {transport}: other processes used {other} CPU s in the window; again")
                        wait_for_load(1.0, 180)
                    if not server.service.running():
                        break
                if server.service.running():
                    transfers = [[size, reps] for size, reps in sizes["upload"]["transfers"]]
                    plan = dict(base, mode="upload", upload={"service": UPLOAD_DOMAIN, "transfers": transfers,
                                                              "rss_interval": 0.02, "http_timeout": 300})
                    limit = 120 + sum(reps * (20 + size / 2e6) for size, reps in transfers)
                    result = drive(ns, plan, workdir, "upload", limit)
                    figures["upload_transfers"] = result.get("transfers")
                    if result.get("error"):
                        figures["upload_error"] = result["error"]
                    figures["upload"] = summarize_upload(result.get("transfers") or [])
                if not server.service.running():
                    figures["server_exited"] = lab.log_tail(server.service.log_path, 15)
                figures["log_tail"] = lab.log_tail(server.service.log_path, 8)
            finally:
                server.stop()
    except Exception as error:  # noqa: BLE001 - a failed kind is a result, not a crash
        figures["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    tcp, ws = figures.get("tcp") or {}, figures.get("ws") or {}
    if tcp.get("delivered_per_second") and ws.get("delivered_per_second") and not tcp.get("error") and not ws.get("error"):
        figures["ws_over_tcp"] = round(ws["delivered_per_second"] / tcp["delivered_per_second"], 3)
        if tcp.get("messages_per_server_cpu_second") and ws.get("messages_per_server_cpu_second"):
            figures["ws_over_tcp_per_cpu"] = round(ws["messages_per_server_cpu_second"] / tcp["messages_per_server_cpu_second"], 3)
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    log(f"web {kind}: {json.dumps({k: v for k, v in figures.items() if k not in ('upload_transfers', 'tcp', 'ws')})}")
    return figures


def ratios(results):
    """Braid / Prosody and Braid / ejabberd for each headline figure (rates: higher is better;
    peak RSS during a transfer: lower is better)."""
    by_kind = {r["kind"]: r for r in results}
    braid = by_kind.get("braid")
    if not braid:
        return {}

    def figures(r):
        out = {}
        for transport in ("tcp", "ws"):
            t = r.get(transport) or {}
            if not t.get("error"):
                out[f"{transport}_messages_per_second"] = t.get("delivered_per_second")
                out[f"{transport}_messages_per_server_cpu_second"] = t.get("messages_per_server_cpu_second")
        out["ws_over_tcp"] = r.get("ws_over_tcp")
        for entry in r.get("upload") or []:
            mb = entry["bytes"] // 1_000_000
            for key in ("put_mb_per_second", "get_mb_per_second", "put_peak_rss_kib", "get_peak_rss_kib"):
                out[f"upload_{mb}mb_{key}"] = entry.get(key)
        return out

    mine = figures(braid)
    out = {}
    for peer in ("prosody", "ejabberd"):
        if peer not in by_kind:
            continue
        theirs = figures(by_kind[peer])
        out[peer] = {key: round(value / theirs[key], 3) for key, value in mine.items()
                     if value and theirs.get(key)}
    return out


def run(kinds, braid_binary, sizes):
    results = [run_one(kind, braid_binary, sizes) for kind in kinds]
    return {"results": results, "ratios": ratios(results), "tuning": TUNING, "domain": DOMAIN}
