#!/usr/bin/python3
"""Braid in a cluster (issue 18, docs/cluster.md): CPU per message same-node and cross-node,
and the time a surviving node takes to carry federation again after the lease holder dies.

Braid only: Prosody has no cluster, and ejabberd's clustering needs Erlang distribution
between the nodes (a cookie, epmd, mnesia replication), which this harness does not set up.

Set-up (one loopback-only namespace of ours, braidbench-cluster; nothing else sees it):

  PostgreSQL      initdb in the run's directory, Unix socket only, as the postgres user
                  (lab.LabPostgres); provider A's two nodes share its database
  node-1, node-2  Braid nodes of provider A (a.example), c2s on 5222 and 5322, node links on
                  5271 and 5272 with mutual TLS from a throw-away cluster CA (openssl, the lab's
                  CertificateAuthority), heartbeat HEARTBEAT s, dead after DEAD_AFTER s; both
                  configure the same s2s port (5269): only the holder of the s2s lease binds it
                  (as in Tests/ServerTests/ClusterTests.swift)
  provider B      a third Braid (b.example, SQLite), c2s 5422, s2s 5369; A and B find each
                  other by static s2s.peers entries (no DNS) and trust one XMPP CA
  driver          this file with --driver: many minimal XMPP clients (bench/xmppdriver.py's
                  Client: STARTTLS, SASL PLAIN, bind, presence) in one asyncio process

Delivery (same-node, then cross-node): SENDERS accounts log in on node 1, SENDERS receivers on
node 1 and SENDERS more on node 2. Each phase offers RATE messages per second for SECONDS
(open loop, round-robin over the sender→receiver pairs, to the receivers' full JIDs): same-node
to the node-1 receivers, cross-node to the node-2 receivers. CPU: utime + stime of each Braid
process from /proc, read when the phase's first message is written and again when its last
one has arrived (or the drain timed out); cross-node counts both nodes. The idle CPU of the
same window (heartbeats, lease renewals) is measured before the phases and reported apart,
and subtracted in the "net" figure. Latency: the receiving client's read − the sending
client's write, in the one driver process.

Takeover (REPEATS times): one user of A logged in at the node that does NOT hold the s2s lease
sends a numbered message every STREAM_INTERVAL s to a user of B. After STREAM_WARMUP s the
lease holder is killed with SIGKILL (a real process kill: its sockets are reset by the
kernel, no goodbye, no lease release). Measured: the time from the kill until the first
message arrives at B again (takeover), the longest gap between arrivals, when the survivor
holds the lease in the database and listens on the s2s port; every message is numbered, so
lost = sent − distinct received (bounced ones, errors back at the sender, are counted apart)
and duplicates = received − distinct received. The killed node is started again between
repetitions; the sender is always at the node that does not hold the lease.
"""

import asyncio
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the driver (runs inside the namespace) ------------------------------------------------

def driver_main(plan_path):
    sys.path.insert(0, HERE)
    import xmppdriver

    with open(plan_path) as handle:
        plan = json.load(handle)

    arrivals = {}     # body -> [monotonic arrival, ...]
    bounces = {}      # id -> condition

    class Client(xmppdriver.Client):
        async def pump(self):
            while True:
                while self.queue:
                    element = self.queue.pop(0)
                    if not element.tag.endswith("message"):
                        continue
                    if element.get("type") == "error":
                        condition = "?"
                        error = element.find("{jabber:client}error")
                        if error is not None:
                            for child in error:
                                if not child.tag.endswith("}text"):
                                    condition = child.tag.split("}")[-1]
                                    break
                        bounces[element.get("id") or "?"] = condition
                        continue
                    body = element.find("{jabber:client}body")
                    if body is not None and body.text:
                        arrivals.setdefault(body.text, []).append(time.monotonic())
                try:
                    data = await self.reader.read(262144)
                except (ConnectionError, OSError):
                    return
                if not data:
                    return
                try:
                    self._feed(data)
                except Exception:  # noqa: BLE001 - a broken stream ends this client
                    return

        def send_numbered(self, to, body):
            self._send(f"<message to='{to}' id='{body}' type='chat'><body>{body}</body></message>")

    async def sync(name):
        print(json.dumps({"sync": name}), file=sys.stderr, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    def summary(values):
        if not values:
            return {"count": 0, "p50": None, "p99": None, "max": None}
        ordered = sorted(values)

        def rank(q):
            return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))]
        return {"count": len(ordered), "p50": round(rank(0.5), 3), "p99": round(rank(0.99), 3), "max": round(ordered[-1], 3)}

    async def main():
        accounts = plan["accounts"]
        clients = [Client(i, account, None) for i, account in enumerate(accounts)]
        out = {"accounts": len(accounts)}
        limit = asyncio.Semaphore(25)
        failures = []

        async def login(client):
            async with limit:
                try:
                    await client.login(plan.get("login_timeout", 60))
                except Exception as error:  # noqa: BLE001 - reported
                    failures.append(f"{client.jid}: {error!r}"[:300])

        started = time.monotonic()
        await asyncio.gather(*(login(c) for c in clients))
        out["login_seconds"] = round(time.monotonic() - started, 3)
        if failures:
            out["login_failed"] = len(failures)
            out["login_failures"] = failures[:5]
            print(json.dumps(out))
            return 1
        pumps = [asyncio.ensure_future(c.pump()) for c in clients]
        await asyncio.sleep(plan.get("settle", 2.0))

        for phase in plan.get("phases", []):
            out[phase["name"]] = await rate_phase(phase, clients, accounts)
        if plan.get("stream"):
            out["stream"] = await stream_phase(plan["stream"], clients, accounts)

        for c in clients:
            try:
                c._send("</stream:stream>")
            except Exception:  # noqa: BLE001
                pass
        await asyncio.sleep(0.2)
        for p in pumps:
            p.cancel()
        print(json.dumps(out))
        return 0

    async def rate_phase(phase, clients, accounts):
        """Open loop: RATE messages/s for SECONDS, round-robin over PAIRS, then the drain."""
        name, pairs, rate, seconds = phase["name"], phase["pairs"], phase["rate"], phase["seconds"]
        total = int(rate * seconds)
        sent_at = {}
        targets = [(clients[s], accounts[r]["jid"] + "/bench") for s, r in pairs]
        bounced_before = len(bounces)
        await sync(f"start-{name}")
        started = time.monotonic()
        k = 0
        while k < total:
            now = time.monotonic()
            due = min(total, int((now - started) * rate) + 1)
            touched = set()
            while k < due:
                client, to = targets[k % len(targets)]
                body = f"{plan.get('tag', '')}{name}{k}"
                client.send_numbered(to, body)
                sent_at[body] = time.monotonic()
                touched.add(client)
                k += 1
            await asyncio.gather(*(c.drain() for c in touched))
            await asyncio.sleep(0.002)
        send_seconds = time.monotonic() - started
        deadline = time.monotonic() + phase.get("drain", 15)
        last_count, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = sum(1 for body in sent_at if body in arrivals)
            if count >= total:
                break
            if count != last_count:
                last_count, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since > phase.get("quiet", 5):
                break
            await asyncio.sleep(0.02)
        ended = time.monotonic()
        await sync(f"end-{name}")
        latencies, delivered, duplicates, last = [], 0, 0, started
        for body, at in sent_at.items():
            got = arrivals.get(body)
            if got:
                delivered += 1
                duplicates += len(got) - 1
                latencies.append((got[0] - at) * 1000)
                last = max(last, got[0])
        lat = summary(latencies)
        return {"sent": total, "delivered": delivered, "lost": total - delivered, "duplicates": duplicates,
                "bounced": len(bounces) - bounced_before, "offered_per_second": rate,
                "send_seconds": round(send_seconds, 3), "window_seconds": round(ended - started, 3),
                "delivered_per_second": round(delivered / (last - started), 1) if last > started else None,
                "p50_ms": lat["p50"], "p99_ms": lat["p99"], "max_ms": lat["max"]}

    async def stream_phase(spec, clients, accounts):
        """One sender, one receiver: a numbered message every INTERVAL s for SECONDS."""
        sender, receiver = clients[spec["sender"]], accounts[spec["receiver"]]["jid"] + "/bench"
        interval, count = spec["interval"], int(spec["seconds"] / spec["interval"])
        sent = []
        prefix = plan.get("tag", "") + "t"
        await sync("stream-ready")
        started = time.monotonic()
        for n in range(count):
            pause = started + n * interval - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            body = f"{prefix}{n}"
            try:
                sender.send_numbered(receiver, body)
                await sender.drain()
            except (ConnectionError, OSError) as error:
                return {"error": f"sender lost its connection at message {n}: {error!r}", "sent": sent}
            sent.append(time.monotonic())
        deadline = time.monotonic() + spec.get("drain", 20)
        while time.monotonic() < deadline:
            if all(f"{prefix}{n}" in arrivals for n in range(count)):
                break
            await asyncio.sleep(0.05)
        return {"sent_at": [round(t, 6) for t in sent],
                "arrivals": {body[len(prefix):]: [round(t, 6) for t in times] for body, times in arrivals.items()
                             if body.startswith(prefix)},
                "bounced": {key[len(prefix):]: value for key, value in bounces.items() if key.startswith(prefix)}}

    return asyncio.run(main())


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--driver":
    sys.exit(driver_main(sys.argv[2]))


# -- the benchmark --------------------------------------------------------------------------

import contextlib  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

from common import PYTHON, LoopbackNamespace, cpu_seconds, lab, log, server_pids  # noqa: E402
import servers  # noqa: E402

A, B = "a.example", "b.example"
ADDRESS = "127.0.0.1"
S2S_A, S2S_B = 5269, 5369
NODES = [{"name": "node-1", "c2s": 5222, "link": 5271, "admin": 5281},
         {"name": "node-2", "c2s": 5322, "link": 5272, "admin": 5282}]
PROVIDER_B = {"name": "provider-b", "c2s": 5422, "admin": 5283}
PASSWORD = "pass{}"
TUNING = [
    "log_level warning",
    "message archive off (mam.default_preference never): the figures are routing, not the archive's writes "
    "to PostgreSQL (the mam section measures those)",
    "c2s.stanzas_per_second and stanza_burst 100000 (the default 200/s would not limit these rates either)",
    "stream management not used by the driver's clients",
    "auth.scram_iterations 4096 (as the other sections); clients log in with PLAIN inside STARTTLS",
    "PostgreSQL with fsync=off (lab.LabPostgres), on a Unix socket",
]


def q(value):
    return json.dumps(value)


def yaml_config(path, *, data, domain, c2s, admin, s2s_port, peer, peer_port, cert, key, trust, storage_url=None,
                cluster=None):
    lines = [
        "# bench/cluster.py: generated",
        f"data_directory: {q(data)}",
        f"default_domain: {q(domain)}",
        f"log_level: {os.environ.get('BRAID_BENCH_CLUSTER_LOG_LEVEL', 'warning')}",
        "c2s:",
        f"  address: {q(ADDRESS)}",
        f"  starttls_port: {c2s}",
        "  direct_tls_port: null",
        "  stanzas_per_second: 100000.0",
        "  stanza_burst: 100000.0",
        "auth:",
        "  scram_iterations: 4096",
        "tls:",
        "  self_sign_missing: true",
        "  certificates:",
        f"    - certificate: {q(cert)}",
        f"      key: {q(key)}",
        "s2s:",
        "  enabled: true",
        f"  address: {q(ADDRESS)}",
        f"  starttls_port: {s2s_port}",
        "  direct_tls_port: null",
        f"  trust_anchor_files: [{q(trust)}]",
        "  use_system_trust_store: false",
        "  negotiation_timeout_seconds: 10",
        "  connect_timeout_seconds: 2",
        "  peers:",
    ]
    lines += [f"    {q(peer)}:", f"      host: {q(ADDRESS)}", f"      port: {peer_port}"]
    lines += [
        "dns:",
        "  forwarders: [\"127.0.0.1@9\"]",
        "  timeout_seconds: 1",
        "admin:",
        f"  admin_address: {q(ADDRESS)}",
        f"  admin_port: {admin}",
        "  posh_port: null",
        "mam:",
        "  default_preference: never",
    ]
    if storage_url:
        lines += ["storage:", "  backend: postgresql", f"  url: {q(storage_url)}"]
    if cluster:
        lines.append("cluster:")
        lines += [f"  {k}: {q(v)}" for k, v in cluster.items()]
    lab.write_file(path, "\n".join(lines) + "\n", 0o600)


class Braid:
    """One Braid process of the run (a node of A, or provider B)."""

    def __init__(self, binary, ns, directory, name, c2s, domain, cpus=None):
        self.binary, self.ns, self.directory, self.name = binary, ns, directory, name
        self.c2s, self.domain, self.cpus = c2s, domain, cpus
        self.config = os.path.join(directory, "braid.yaml")
        self.service = None
        os.makedirs(os.path.join(directory, "data"), exist_ok=True)
        os.chmod(directory, 0o755)

    def env(self):
        return {k: v for k, v in os.environ.items() if not k.startswith("BRAID_")}

    def cli(self, *args, check=True):
        return lab.run([self.binary, *args, "--config", self.config], env=self.env(), cwd=self.directory,
                       timeout=120, check=check)

    def start(self):
        argv = [self.binary, "serve", "--config", self.config]
        if self.cpus:
            argv = ["taskset", "-c", self.cpus] + argv
        self.service = lab.Service(self.name, lab.in_netns(self.ns, argv), os.path.join(self.directory, "braid.log"),
                                   env=self.env(), cwd=self.directory)

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise lab.LabError(f"{self.name} exited during start-up: {lab.log_tail(self.service.log_path, 20)}")
            if servers.stream_answer(self.ns, self.c2s, self.domain, timeout=1.0) == "features":
                return
            time.sleep(0.1)
        raise lab.LabError(f"{self.name} did not answer on {self.c2s} in {timeout}s")

    def running(self):
        return self.service is not None and self.service.running()

    def pids(self):
        return server_pids(self.service.pid) if self.running() else []

    def cpu(self):
        return cpu_seconds(self.pids())

    def kill(self):
        """kill -9 of the process (group); returns the monotonic time of the signal."""
        service, self.service = self.service, None
        at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=10)
        service.stop(grace=2)
        return at

    def stop(self):
        if self.service is not None:
            self.service.stop()
            self.service = None


class Driver:
    """cluster.py --driver PLAN inside the namespace, pinned when asked; sync lines on stderr."""

    def __init__(self, ns, directory, plan, label, cpus=None):
        path = os.path.join(directory, f"driver-{label}.json")
        with open(path, "w") as handle:
            json.dump(plan, handle)
        argv = [PYTHON, os.path.abspath(__file__), "--driver", path]
        if cpus:
            argv = ["taskset", "-c", cpus] + argv
        self.log = os.path.join(directory, f"driver-{label}.err")
        self.process = subprocess.Popen(lab.in_netns(ns, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stderr_lines = []

    def wait_sync(self, name, timeout):
        """Waits for {"sync": NAME} on the driver's stderr (other lines are kept)."""
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stderr], [], [], 1.0)
            if not ready:
                if self.process.poll() is not None:
                    break
                continue
            line = self.process.stderr.readline()
            if not line:
                break
            with contextlib.suppress(ValueError):
                if json.loads(line).get("sync") == name:
                    return True
            self.stderr_lines.append(line.rstrip()[:300])
        raise lab.LabError(f"driver: no sync {name} ({'; '.join(self.stderr_lines[-5:])}; "
                           f"exit {self.process.poll()}; stdout {self.process.stdout.read()[:500] if self.process.poll() is not None else ''})")

    def go(self):
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self, timeout):
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise lab.LabError("driver did not finish")
        with open(self.log, "a") as handle:
            handle.write("\n".join(self.stderr_lines) + "\n" + err)
        with open(self.log.replace(".err", ".out"), "w") as handle:
            handle.write(out)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise lab.LabError(f"driver printed nothing (exit {self.process.returncode}): {err[-500:]}")
        return json.loads(lines[-1])

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.process.wait(timeout=5)


def psql(pg, sql):
    return lab.run(["psql", "-h", pg.directory, "-U", "postgres", "-d", "braid", "-Atc", sql], check=False, timeout=10)


def lease_holder(pg):
    """Name of the node holding a valid s2s lease, or None."""
    result = psql(pg, "SELECT node FROM cluster_leases WHERE name = 's2s' AND expires_at > now()")
    return result.stdout.strip() or None if result.returncode == 0 else None


def cluster_alive(node, count):
    result = node.cli("cluster", "status", "--json", check=False)
    try:
        rows = json.loads(result.stdout)
    except ValueError:
        return False
    return len([r for r in rows if r.get("alive")]) == count


def pinning():
    """Servers on the last core, the driver on the others (when there are at least 2)."""
    cores = os.cpu_count() or 1
    if cores < 2 or not shutil.which("taskset"):
        return None, None, f"not pinned ({cores} core(s))"
    servers_cpu = str(cores - 1)
    driver_cpu = "0" if cores == 2 else f"0-{cores - 2}"
    return servers_cpu, driver_cpu, (f"every Braid process (both nodes and provider B) on core {servers_cpu} with taskset; "
                                     f"the driver on core(s) {driver_cpu}; PostgreSQL unpinned")


def setup(binary, ns, directory, sizes, servers_cpu):
    pg = lab.LabPostgres(os.path.join(directory, "pg"))
    pg.start()
    cluster_ca = lab.CertificateAuthority(os.path.join(directory, "cluster-ca"))
    xmpp_ca = lab.CertificateAuthority(os.path.join(directory, "xmpp-ca"))
    a_cert, a_key = xmpp_ca.issue("a", [A, f"*.{A}"])
    b_cert, b_key = xmpp_ca.issue("b", [B, f"*.{B}"])
    nodes = []
    for spec in NODES:
        node = Braid(binary, ns, os.path.join(directory, spec["name"]), spec["name"], spec["c2s"], A, servers_cpu)
        cert, key = cluster_ca.issue(spec["name"], [f"{spec['name']}.cluster.invalid"])
        yaml_config(node.config, data=os.path.join(node.directory, "data"), domain=A, c2s=spec["c2s"], admin=spec["admin"],
                    s2s_port=S2S_A, peer=B, peer_port=S2S_B, cert=a_cert, key=a_key, trust=xmpp_ca.cert,
                    storage_url=pg.url,
                    cluster={"enabled": True, "node_name": spec["name"], "listen": f"{ADDRESS}:{spec['link']}",
                             "tls_certificate_file": cert, "tls_key_file": key, "tls_ca_file": cluster_ca.cert,
                             "heartbeat_interval_seconds": sizes["heartbeat_seconds"],
                             "dead_after_seconds": sizes["dead_after_seconds"]})
        nodes.append(node)
    b = Braid(binary, ns, os.path.join(directory, PROVIDER_B["name"]), PROVIDER_B["name"], PROVIDER_B["c2s"], B, servers_cpu)
    yaml_config(b.config, data=os.path.join(b.directory, "data"), domain=B, c2s=PROVIDER_B["c2s"], admin=PROVIDER_B["admin"],
                s2s_port=S2S_B, peer=A, peer_port=S2S_A, cert=b_cert, key=b_key, trust=xmpp_ca.cert)
    # Domains and accounts: A's once, in the shared database (node 1's configuration).
    nodes[0].cli("domain", "add", A)
    users = 3 * sizes["senders"] + 1
    started = time.monotonic()
    for i in range(1, users + 1):
        nodes[0].cli("user", "add", f"user{i}@{A}", "--password", PASSWORD.format(i))
    b.cli("domain", "add", B)
    b.cli("user", "add", f"user1@{B}", "--password", PASSWORD.format(1))
    log(f"cluster: {users} accounts of {A} and 1 of {B} in {time.monotonic() - started:.1f}s")
    return pg, nodes, b


def start_all(nodes, b, pg):
    for server in nodes + [b]:
        server.start()
    for server in nodes + [b]:
        server.wait_ready()
    lab.wait_until(lambda: cluster_alive(nodes[0], len(nodes)) and lease_holder(pg), 60,
                   "both nodes alive and an s2s lease holder")


def account(i, node_or_port, domain=A):
    port = node_or_port if isinstance(node_or_port, int) else node_or_port.c2s
    return {"jid": f"user{i}@{domain}", "password": PASSWORD.format(i), "host": ADDRESS, "port": port}


def delivery(ns, directory, nodes, sizes, driver_cpu):
    n = sizes["senders"]
    # user1..n senders (node 1), n+1..2n receivers on node 1, 2n+1..3n receivers on node 2.
    accounts = [account(i, nodes[0]) for i in range(1, 2 * n + 1)] + [account(i, nodes[1]) for i in range(2 * n + 1, 3 * n + 1)]
    phases = [{"name": "same", "pairs": [[i, n + i] for i in range(n)]},
              {"name": "cross", "pairs": [[i, 2 * n + i] for i in range(n)]}]
    for phase in phases:
        phase.update(rate=sizes["rate"], seconds=sizes["seconds"], drain=sizes["drain"], quiet=5)
    plan = {"accounts": accounts, "phases": phases, "settle": 3.0, "tag": f"{random.getrandbits(32):08x}-"}
    driver = Driver(ns, directory, plan, "delivery", driver_cpu)
    out = {"senders": n, "receivers_per_node": n, "offered_per_second": sizes["rate"], "seconds": sizes["seconds"]}
    try:
        for phase in phases:
            name = phase["name"]
            driver.wait_sync(f"start-{name}", 300)
            # Idle CPU over a window as long as the phase, just before it.
            idle_start = [node.cpu() for node in nodes]
            time.sleep(min(sizes["idle_seconds"], sizes["seconds"]))
            idle_end = [node.cpu() for node in nodes]
            idle_window = min(sizes["idle_seconds"], sizes["seconds"])
            before = [node.cpu() for node in nodes]
            driver.go()
            driver.wait_sync(f"end-{name}", sizes["seconds"] + sizes["drain"] + 120)
            after = [node.cpu() for node in nodes]
            driver.go()
            out[name] = {"cpu_seconds": [round(a - b_, 3) for a, b_ in zip(after, before)],
                         "idle_cpu_per_second": [round((e - s) / idle_window, 4) for s, e in zip(idle_start, idle_end)]}
        result = driver.result(120)
    finally:
        if driver.process.poll() is None:
            driver.kill()
    if result.get("login_failed"):
        raise lab.LabError(f"logins failed: {result.get('login_failures')}")
    out["login_seconds"] = result.get("login_seconds")
    for name in ("same", "cross"):
        phase = {**result[name], **out[name]}
        counted = [0] if name == "same" else [0, 1]   # node 1 only / both nodes
        cpu = sum(phase["cpu_seconds"][i] for i in counted)
        idle = sum(phase["idle_cpu_per_second"][i] for i in counted) * phase["window_seconds"]
        delivered = phase["delivered"]
        phase["nodes_counted"] = [NODES[i]["name"] for i in counted]
        phase["cpu_us_per_message"] = round(cpu / delivered * 1e6, 1) if delivered else None
        phase["cpu_us_per_message_net_of_idle"] = round((cpu - idle) / delivered * 1e6, 1) if delivered else None
        phase["cpu_us_per_message_all_nodes"] = round(sum(phase["cpu_seconds"]) / delivered * 1e6, 1) if delivered else None
        out[name] = phase
    if out["same"].get("cpu_us_per_message") and out["cross"].get("cpu_us_per_message"):
        out["cross_over_same"] = round(out["cross"]["cpu_us_per_message"] / out["same"]["cpu_us_per_message"], 2)
    return out


def takeover_once(ns, directory, pg, nodes, b, sizes, driver_cpu, label):
    holder_name = lease_holder(pg)
    holder = next(node for node in nodes if node.name == holder_name)
    survivor = next(node for node in nodes if node is not holder)
    sender_index = 3 * sizes["senders"] + 1
    # Message ids unique to the run: a Braid peer drops a stanza whose (from, to, type, id)
    # it had on another link shortly before, as a re-send (see the findings).
    plan = {"accounts": [account(sender_index, survivor), account(1, b.c2s, B)], "settle": 1.0,
            "tag": f"{random.getrandbits(32):08x}-",
            "stream": {"sender": 0, "receiver": 1, "interval": sizes["stream_interval"],
                       "seconds": sizes["stream_warmup"] + sizes["stream_after"], "drain": sizes["stream_drain"]}}
    driver = Driver(ns, directory, plan, f"takeover-{label}", driver_cpu)
    events = {}
    try:
        driver.wait_sync("stream-ready", 120)
        driver.go()
        go_at = time.monotonic()
        time.sleep(sizes["stream_warmup"])
        kill_at = holder.kill()
        log(f"cluster takeover {label}: killed {holder.name} (lease holder), sender at {survivor.name}")
        # Poll who holds the lease and who listens on the s2s port until both say the survivor.
        deadline = time.monotonic() + sizes["stream_after"]
        while time.monotonic() < deadline and ("lease" not in events or "listening" not in events):
            if "lease" not in events and lease_holder(pg) == survivor.name:
                events["lease"] = round(time.monotonic() - kill_at, 3)
            if "listening" not in events and lab.listening(ns, S2S_A):
                events["listening"] = round(time.monotonic() - kill_at, 3)
            time.sleep(0.05)
        result = driver.result(sizes["stream_warmup"] + sizes["stream_after"] + sizes["stream_drain"] + 60)
    finally:
        if driver.process.poll() is None:
            driver.kill()
    stream = result.get("stream") or {}
    if result.get("login_failed") or stream.get("error"):
        raise lab.LabError(f"takeover driver: {result.get('login_failures') or stream.get('error')}")
    sent_at = stream["sent_at"]
    arrivals = {int(k): v for k, v in stream["arrivals"].items()}
    bounced = {int(k): v for k, v in stream["bounced"].items()}
    firsts = sorted(times[0] for times in arrivals.values())
    after_kill = [t for t in firsts if t > kill_at]
    before_kill = [t for t in firsts if t <= kill_at]
    gaps = [b_ - a for a, b_ in zip(firsts, firsts[1:])]
    delays = [(arrivals[n][0] - sent_at[n]) * 1000 for n in range(len(sent_at)) if n in arrivals]
    lost = [n for n in range(len(sent_at)) if n not in arrivals and n not in bounced]
    in_flight = [n for n in range(len(sent_at)) if sent_at[n] <= kill_at]
    return {
        "killed": holder.name, "survivor": survivor.name,
        "kill_after_seconds": round(kill_at - go_at, 3),
        "sent": len(sent_at), "received_distinct": len(arrivals),
        "duplicates": sum(len(v) - 1 for v in arrivals.values()),
        "lost": len(lost), "lost_numbers": lost[:20], "bounced": len(bounced),
        "bounce_conditions": sorted(set(bounced.values())),
        "sent_before_kill": len(in_flight),
        "takeover_seconds": round(after_kill[0] - kill_at, 3) if after_kill else None,
        "last_arrival_before_kill_ms": round((kill_at - before_kill[-1]) * 1000, 1) if before_kill else None,
        "longest_gap_seconds": round(max(gaps), 3) if gaps else None,
        "max_delay_seconds": round(max(delays) / 1000, 3) if delays else None,
        "lease_taken_seconds": events.get("lease"), "s2s_listening_seconds": events.get("listening"),
        "held_back": sum(1 for n in range(len(sent_at)) if n in arrivals and sent_at[n] > kill_at
                         and arrivals[n][0] - sent_at[n] > 0.5),
    }, holder


def takeover(ns, directory, pg, nodes, b, sizes, driver_cpu):
    runs = []
    for repeat in range(sizes["takeover_repeats"]):
        try:
            run, killed = takeover_once(ns, directory, pg, nodes, b, sizes, driver_cpu, str(repeat + 1))
        except Exception as error:  # noqa: BLE001 - recorded
            runs.append({"error": f"{type(error).__name__}: {error}"[:500]})
            break
        runs.append(run)
        log(f"cluster takeover {repeat + 1}: {json.dumps(run)}")
        # The killed node starts again (as the one without the lease) for the next repetition.
        if repeat + 1 < sizes["takeover_repeats"]:
            killed.start()
            killed.wait_ready()
            lab.wait_until(lambda: cluster_alive(nodes[0] if nodes[0].running() else nodes[1], len(nodes))
                           and lease_holder(pg), 60, "both nodes alive again")
            time.sleep(2)
    good = [r for r in runs if r.get("takeover_seconds") is not None]
    out = {"runs": runs, "heartbeat_seconds": sizes["heartbeat_seconds"], "dead_after_seconds": sizes["dead_after_seconds"],
           "goal_seconds": 2 * sizes["dead_after_seconds"], "interval_seconds": sizes["stream_interval"]}
    if good:
        out["takeover_max_seconds"] = max(r["takeover_seconds"] for r in good)
        out["takeover_median_seconds"] = sorted(r["takeover_seconds"] for r in good)[len(good) // 2]
    out["lost_total"] = sum(r.get("lost", 0) for r in runs if "error" not in r)
    out["duplicates_total"] = sum(r.get("duplicates", 0) for r in runs if "error" not in r)
    out["bounced_total"] = sum(r.get("bounced", 0) for r in runs if "error" not in r)
    return out


def run(braid, sizes):
    directory = tempfile.mkdtemp(prefix="braidbench-cluster-")
    os.chmod(directory, 0o755)
    servers_cpu, driver_cpu, pinned = pinning()
    out = {"tuning": TUNING, "pinning": pinned, "workdir": directory}
    # The binary's provenance when the run's machine facts cannot know it (a copy built
    # from a snapshot elsewhere: its mtime says nothing about its sources).
    if os.environ.get("BRAID_BENCH_BUILD"):
        out["braid_build"] = os.environ["BRAID_BENCH_BUILD"]
    pg = None
    nodes, b = [], None
    with open("/proc/loadavg") as handle:
        out["load_average_at_start"] = [float(x) for x in handle.read().split()[:3]]
    failed = False
    with LoopbackNamespace("cluster") as ns:
        try:
            pg, nodes, b = setup(braid, ns.ns, directory, sizes, servers_cpu)
            start_all(nodes, b, pg)
            log(f"cluster: nodes up, s2s lease held by {lease_holder(pg)}")
            try:
                out["delivery"] = delivery(ns.ns, directory, nodes, sizes, driver_cpu)
            except Exception as error:  # noqa: BLE001 - recorded; the takeover still runs
                failed = True
                out["delivery"] = {"error": f"{type(error).__name__}: {error}"[:800]}
            log(f"cluster delivery: {json.dumps(out['delivery'])[:600]}")
            with open("/proc/loadavg") as handle:
                out["load_average_after_delivery"] = [float(x) for x in handle.read().split()[:3]]
            for node in nodes:
                if not node.running():
                    node.start()
                    node.wait_ready()
            out["takeover"] = takeover(ns.ns, directory, pg, nodes, b, sizes, driver_cpu)
            failed = failed or any("error" in r for r in out["takeover"]["runs"])
        except Exception:
            failed = True
            raise
        finally:
            for server in nodes + ([b] if b else []):
                with contextlib.suppress(Exception):
                    server.stop()
            if pg is not None:
                with contextlib.suppress(Exception):
                    pg.stop()
            with open("/proc/loadavg") as handle:
                out["load_average_at_end"] = [float(x) for x in handle.read().split()[:3]]
            if failed or os.environ.get("BRAID_BENCH_KEEP"):
                log(f"cluster: work directory kept: {directory}")
            else:
                shutil.rmtree(directory, ignore_errors=True)
                out.pop("workdir", None)
    return out


if __name__ == "__main__":
    # Direct run for development: cluster.py BRAID_BINARY (root).
    import benchmarks
    result = run(sys.argv[1], benchmarks.FULL["cluster"] if len(sys.argv) < 3 else json.loads(sys.argv[2]))
    print(json.dumps(result, indent=1))
