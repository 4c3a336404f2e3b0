#!/usr/bin/python3
"""Cluster scenarios (issue 18): provider A served by three Braid nodes on one PostgreSQL,
federating with a Braid (B) and a Prosody (C), with real processes in network namespaces.

A lab of its own, built after the others (lab.py's main() does it when Braid is in the lab
and a cluster:* scenario is selected):

  PostgreSQL        one, in the work directory, reached by Unix socket from every node's
                    namespace (the socket directory is shared through the file system)
  anode1…anode3     Braid nodes of provider A, one namespace and address each, the same
                    hosted domains a1…a3 (in the shared database), cluster.* keys with node
                    certificates from a cluster CA of their own (not the lab CA that signs
                    the XMPP certificates: any certificate of the cluster CA is a node),
                    heartbeat every 0.5 s, dead after 3 s (short, so that failover is quick)
  braid             provider B: one Braid, b1…b3
  prosody           provider C: Prosody 0.12, p1…p3
  clients           a namespace of their own for A's clients (so that they can reconnect to
                    any node when theirs dies)

A's SRV records (`_xmpp-client._tcp` and `_xmpp-server._tcp` of a1…a3) list the three node
host names anode1.test…anode3.test with EQUAL priority and weight: the nodes are equal (any
may hold the federation lease, c2s load should spread), and a peer must try the targets in a
random order and go on to the next after a refused connection (only the lease holder listens
on the s2s port); distinct priorities would always send peers to node 1 first and hide a peer
that gives up after the first refusal half of the time.

Clients with stream management (XEP-0198, an ack requested after every stanza) are driven by
this file itself (`cluster.py --sm-agent LOG`, a slixmpp process speaking agent.py's JSON
lines): a message counts as acknowledged when the server's <a h=…/> covered it.
"""

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIO_NAMES = ["cluster:chat", "cluster:one-link", "cluster:kill-lease-holder",
                  "cluster:kill-session-node", "cluster:postgres-restart"]
NODE_NAMES = ["anode1", "anode2", "anode3"]
DOMAINS = 3
USERS = 3
HEARTBEAT = 0.5
DEAD_AFTER = 3.0
CLUSTER_PORT = 5271          # node links (5270 is Braid's direct-TLS s2s port)
CLIENTS_HOST = 60            # the clients' namespace address: SUBNET.60
SCENARIO_TIME_LIMIT = 300
DELIVERY_TIMEOUT = 60        # until every message is delivered or bounced
DELIVERY_STALL = 25          # ... or this long without any news
ARCHIVE_QUIET = 3.0          # without news this long, what is missing may be found in the archive
BURST_MESSAGES = 40          # per sender in the kill scenarios
BURST_INTERVAL = 0.05        # seconds between one sender's messages
KILL_AFTER = 0.8             # seconds into a burst
RUN_TAG = f"{random.getrandbits(32):08x}"
# Each batch of messages gets its own number, so a scenario repeated (--repeat) never meets
# a late copy of an earlier run's message under the same id.
BATCHES = itertools.count(1)


# -- the SM client agent (runs inside a namespace; no lab import needed) -------------------

def sm_agent_main(log_path):
    import asyncio
    import logging

    import slixmpp

    logging.basicConfig(filename=log_path, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class SmPool:
        def __init__(self):
            self.clients = {}       # jid -> client (the current one)
            self.received = []      # [to, from, id, body, receiving full JID]
            self.errors = []        # [to, from, id, condition, text]
            self.acked = []         # [from, id]
            self.sent = []          # [from, id, monotonic]
            self.disconnections = []  # [jid, monotonic]
            self.streaming = []

        def _on_message(self, jid, client, message):
            if message["type"] in ("chat", "normal") and message["body"]:
                self.received.append([jid, message["from"].bare, message["id"], message["body"], str(client.boundjid)])

        def _on_error(self, jid, message):
            self.errors.append([jid, message["from"].bare, message["id"],
                                message["error"]["condition"], message["error"]["text"]])

        async def connect(self, clients, password, ca, timeout, sm=True, **_):
            loop = asyncio.get_event_loop()
            limit = asyncio.Semaphore(10)
            outcomes = {}

            async def one(jid, host, port):
                async with limit:
                    client = slixmpp.ClientXMPP(jid, password)
                    client.ca_certs = ca
                    if sm:
                        client.register_plugin("xep_0198", pconfig={"window": 1, "allow_resume": False})
                    started, managed = loop.create_future(), loop.create_future()

                    def settle(future, outcome):
                        if not future.done():
                            future.set_result(outcome)

                    def on_disconnect(_):
                        if self.clients.get(jid) is client:
                            self.disconnections.append([jid, time.monotonic()])
                        settle(started, "disconnected during login")
                        settle(managed, "disconnected during login")

                    client.add_event_handler("session_start", lambda _: settle(started, "ok"))
                    client.add_event_handler("sm_enabled", lambda _: settle(managed, "ok"))
                    client.add_event_handler("sm_failed", lambda _: settle(managed, "stream management refused"))
                    client.add_event_handler("failed_all_auth", lambda _: settle(started, "authentication failed"))
                    client.add_event_handler("connection_failed", lambda error: settle(started, f"connection failed: {error}"))
                    client.add_event_handler("disconnected", on_disconnect)
                    client.add_event_handler("message", lambda message: self._on_message(jid, client, message))
                    client.add_event_handler("message_error", lambda message: self._on_error(jid, message))
                    client.add_event_handler("stanza_acked", lambda stanza: self._on_acked(jid, stanza))
                    self.clients[jid] = client
                    client.connect(address=(host, port))
                    outcome = await asyncio.wait_for(started, timeout)
                    if outcome == "ok" and sm:
                        outcome = await asyncio.wait_for(managed, timeout)
                    if outcome != "ok":
                        raise RuntimeError(f"{jid} at {host}: {outcome}")
                    client.send_presence()
                    outcomes[jid] = str(client.boundjid)

            await asyncio.wait_for(asyncio.gather(*(one(jid, host, port) for jid, host, port in clients)), timeout)
            return {"bound": outcomes}

        def _on_acked(self, jid, stanza):
            if stanza.name == "message" and stanza["id"]:
                self.acked.append([jid, stanza["id"]])

        def _send(self, sender, to, message_id, body):
            client = self.clients[sender]
            message = client.make_message(mto=to, mbody=body, mtype="chat")
            message["id"] = message_id
            self.sent.append([sender, message_id, time.monotonic()])
            message.send()

        def send(self, messages, **_):
            for message in messages:
                self._send(*message)
            return {"sent": len(messages)}

        def stream(self, messages, interval, **_):
            """MESSAGES in rounds: the first of every sender at once, then the second, ...
            one round every INTERVAL seconds."""
            async def run():
                for message in messages:
                    if message is None:
                        await asyncio.sleep(interval)
                        continue
                    with contextlib.suppress(Exception):
                        self._send(*message)
            self.streaming.append(asyncio.ensure_future(run()))
            return {}

        def state(self, clear=False, **_):
            now = time.monotonic()
            reply = {"received": self.received, "errors": self.errors, "acked": self.acked,
                     "sent": [[s, i] for s, i, _ in self.sent],
                     "disconnections": [[jid, round(now - at, 3)] for jid, at in self.disconnections],
                     "connected": sorted(jid for jid, client in self.clients.items() if client.is_connected()),
                     "streaming": sum(1 for task in self.streaming if not task.done()),
                     "now": now}
            if clear:
                self.received, self.errors, self.acked, self.sent, self.disconnections = [], [], [], [], []
            return reply

        def request_acks(self, **_):
            """An <r/> on every SM stream: the server's answer to the <r/> sent right after a
            stanza may predate its handling, and slixmpp asks again only after the next one."""
            for client in self.clients.values():
                with contextlib.suppress(KeyError):
                    if client.is_connected() and client.plugin["xep_0198"].enabled_out:
                        client.plugin["xep_0198"].request_ack()
            return {}

        def drop(self, jids, **_):
            """Forgets the clients of JIDS (their server died): no resumption, no reconnection."""
            for jid in jids:
                client = self.clients.pop(jid, None)
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.abort()
            return {}

        async def disconnect(self, timeout=5, **_):
            for task in self.streaming:
                task.cancel()
            clients, self.clients = list(self.clients.values()), {}
            if clients:
                await asyncio.wait([asyncio.ensure_future(client.disconnect(wait=1.0)) for client in clients],
                                   timeout=timeout)
            return {}

    async def main():
        pool = SmPool()
        loop = asyncio.get_event_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        handlers = {"pool_sm_connect": pool.connect, "pool_sm_send": pool.send, "pool_sm_stream": pool.stream,
                    "pool_sm_state": pool.state, "pool_sm_drop": pool.drop, "pool_sm_request_acks": pool.request_acks,
                    "disconnect": pool.disconnect}
        while True:
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            try:
                handler = handlers[command.pop("cmd")]
                result = handler(**command)
                if asyncio.iscoroutine(result):
                    result = await result
                reply = {"ok": True, **result}
            except Exception as error:  # noqa: BLE001 - reported to the lab
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        await pool.disconnect(3)

    asyncio.run(main())


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--sm-agent":
    sm_agent_main(sys.argv[2])
    sys.exit(0)


import lab as L  # noqa: E402 - not needed by the agent above
import mux as M  # noqa: E402


# -- providers ---------------------------------------------------------------------------

class ClusterNode(L.BraidProvider):
    """One Braid node of provider A: the shared PostgreSQL, the cluster section, SRV records
    of the shared domains pointing at this node's host name (every node adds its own, so the
    zone lists all of them). Domains and users are written once, by the first node."""

    def __init__(self, lab, spec, address):
        super().__init__(lab, spec, address)
        if getattr(lab, "cluster_postgres", None) is None:
            lab.cluster_postgres = L.LabPostgres(os.path.join(lab.workdir, "cluster-pg"))
        self.postgres = lab.cluster_postgres
        self.first = spec.name == NODE_NAMES[0]
        self.last = spec.name == NODE_NAMES[-1]
        self.node_cert = self.node_key = None

    def all_domains(self):
        return list(self.domains)

    def dns_records(self):
        target = f"{self.host}."
        records = [(L.ZONE, self.host, "A", self.ip)]
        for domain in self.domains:
            records.append((L.ZONE, f"_xmpp-server._tcp.{domain}", "SRV", f"0 5 {L.S2S_PORT} {target}"))
            records.append((L.ZONE, f"_xmpp-client._tcp.{domain}", "SRV", f"0 5 {L.C2S_PORT} {target}"))
        return records

    def listen_ports(self):
        # s2s only at the lease holder: not a readiness condition of a node.
        return [L.C2S_PORT, CLUSTER_PORT]

    def prepare(self):
        if not os.access(self.binary, os.X_OK):
            raise L.LabError(f"Braid binary {self.binary} is missing or not executable (set BRAID_BINARY)")
        os.makedirs(self.data, exist_ok=True)
        if self.postgres.service is None:
            self.postgres.start()
        if getattr(self.lab, "cluster_ca", None) is None:
            self.lab.cluster_ca = L.CertificateAuthority(os.path.join(self.lab.workdir, "cluster-pki"))
        self.node_cert, self.node_key = self.lab.cluster_ca.issue(self.name, [self.host])
        self.write_config()
        if self.first:
            L.write_file(os.path.join(self.directory, "domains.txt"), "\n".join(self.all_domains()) + "\n")
            self.cli("domain", "add", "--file", os.path.join(self.directory, "domains.txt"))

    def write_config(self):
        self.spec.settings["cluster"] = {
            "enabled": True, "node_name": self.name, "listen": f"{self.ip}:{CLUSTER_PORT}",
            "tls_certificate_file": self.node_cert, "tls_key_file": self.node_key,
            "tls_ca_file": self.lab.cluster_ca.cert,
            "heartbeat_interval_seconds": HEARTBEAT, "dead_after_seconds": DEAD_AFTER}
        super().write_config()

    def register_users(self):
        if self.first:
            super().register_users()

    def release(self):
        # The last node stops the shared PostgreSQL (teardown stops the providers in order).
        if self.last:
            self.postgres.stop()

    def kill(self):
        """kill -9 of the node's process (its namespace stays: peers get refused connections)."""
        service, self.service = self.service, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=10)
        service.stop(grace=2)   # reaps the group, closes the log

    def running(self):
        return self.service is not None and self.service.running()


def specs():
    nodes = [L.ProviderSpec("braid", name, "a", DOMAINS, USERS, provider_class=ClusterNode) for name in NODE_NAMES]
    return nodes + [L.ProviderSpec("braid", "braid", "b", DOMAINS, USERS),
                    L.ProviderSpec("prosody", "prosody", "p", DOMAINS, USERS)]


def build(args, wanted):
    """Builds the cluster lab, runs WANTED (each args.repeat times); returns (passed, failed)."""
    workdir = os.path.join(args.workdir, "cluster") if args.workdir else None
    with L.Lab(specs(), subnet=args.subnet, workdir=workdir, keep_workdir=args.keep_workdir) as lab:
        clients_ns = L.NS_PREFIX + "clients"
        lab.network.add_provider_namespace(clients_ns, "clients", lab.network.ip(CLIENTS_HOST))
        lab.clients_ns = clients_ns
        L.log(f"cluster: heartbeat {HEARTBEAT}s, dead after {DEAD_AFTER}s; waiting for a federation lease holder")
        L.wait_until(lambda: len(listening_nodes(lab)) == 1 and all_alive(lab)[0], 30,
                     "one node of A listening on the s2s port and every node alive")
        scenarios = [(name, function) for name, function in build_scenarios(lab) if name in wanted]
        passed, failed = L.run_scenarios(lab, L.repeated(scenarios, getattr(args, "repeat", 1)),
                                         time_limit=SCENARIO_TIME_LIMIT)
        lab.failed = failed > 0
        if args.hold:
            L.log("cluster lab is up; Ctrl-C (or SIGTERM) tears it down")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return passed, failed


def build_scenarios(lab):
    functions = {"cluster:chat": scenario_chat, "cluster:one-link": scenario_one_link,
                 "cluster:kill-lease-holder": scenario_kill_lease_holder,
                 "cluster:kill-session-node": scenario_kill_session_node,
                 "cluster:postgres-restart": scenario_postgres_restart}
    return [(name, functions[name]) for name in SCENARIO_NAMES]


# -- helpers -----------------------------------------------------------------------------

def nodes(lab):
    return [provider for provider in lab.providers if isinstance(provider, ClusterNode)]


def named(lab, name):
    return next(provider for provider in lab.providers if provider.name == name)


def psql(lab, sql):
    pg = lab.cluster_postgres
    return L.run(["psql", "-h", pg.directory, "-U", "postgres", "-d", "braid", "-Atc", sql],
                 check=False, timeout=10)


def lease(lab):
    """(holder, still valid) of the s2s lease as the database has it, or (None, False)."""
    result = psql(lab, "SELECT node, (expires_at > now())::text FROM cluster_leases WHERE name = 's2s'")
    if result.returncode != 0 or not result.stdout.strip():
        return None, False
    node, valid = result.stdout.strip().split("|")
    return node, valid == "true"


def listening_nodes(lab):
    return [node.name for node in nodes(lab) if L.listening(node.ns, L.S2S_PORT)]


def cluster_status(lab):
    """(exit status, rows) of `braid cluster status --json` with the first node's config."""
    first = nodes(lab)[0]
    result = L.run([first.binary, "cluster", "status", "--json", "--config", first.config],
                   env=first._env(), cwd=first.directory, check=False, timeout=30)
    try:
        rows = json.loads(result.stdout)
    except ValueError:
        rows = None
    return result.returncode, rows


def all_alive(lab):
    code, rows = cluster_status(lab)
    alive = rows is not None and len(rows) == len(NODE_NAMES) and all(row["alive"] for row in rows)
    return (code == 0 and alive), rows


def status_text(rows):
    if rows is None:
        return "(no answer)"
    return ", ".join(f"{row['node']} {'alive' if row['alive'] else ('left' if row['left'] else 'DEAD')} "
                     f"({row['heartbeat_age_seconds']:g}s, {row['sessions']} sessions)" for row in rows)


def holder(lab, details=None):
    """The node holding the s2s lease, checked against who listens on the s2s port."""
    def valid_lease():
        node, valid = lease(lab)
        return node if node and valid else None

    node = L.wait_until(valid_lease, 15, "a valid s2s lease")
    listening = L.wait_until(lambda: listening_nodes(lab) == [node] and [node], 15,
                             f"only {node} (the lease holder) listening on {L.S2S_PORT}")
    if details is not None:
        details.append(f"s2s lease held by {node} (cluster_leases); listening on {L.S2S_PORT}: {', '.join(listening)}")
    return named(lab, node)


def ensure_nodes(lab, details):
    """Every node running and alive in `braid cluster status` (a node killed by an earlier
    scenario is started again)."""
    restarted = []
    for node in nodes(lab):
        if not node.running():
            node.start()
            node.wait_ready()
            restarted.append(node.name)
    if restarted:
        started = time.monotonic()
        L.wait_until(lambda: all_alive(lab)[0], 30, "every node alive again")
        details.append(f"restarted {', '.join(restarted)} (killed before); all alive after {time.monotonic() - started:.1f}s")


class SmPool(L.Agent):
    """A cluster.py --sm-agent process in the clients' (or a provider's) namespace, holding
    clients that may be connected to different servers."""

    def __init__(self, lab, ns, label):
        self.lab = lab
        self.provider = None
        self.jid = label
        self.full_jid = None
        self.log_path = os.path.join(lab.workdir, "agents", f"{label}-{len(lab.agents)}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._stderr = open(self.log_path + ".err", "ab")
        self.process = subprocess.Popen(
            L.in_netns(ns, [L.PYTHON, os.path.abspath(__file__), "--sm-agent", self.log_path]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True)
        self._buffer = b""
        self.sm = True
        lab.agents.append(self)

    def connect_clients(self, placement, sm=True, timeout=60):
        """PLACEMENT: [(jid, provider)], each client logged in at that provider's address."""
        self.sm = sm
        return L.step(f"log in {len(placement)} clients ({self.jid})", self.call, "pool_sm_connect", timeout=timeout,
                      clients=[[jid, provider.ip, L.C2S_PORT] for jid, provider in placement],
                      password=L.PASSWORD, ca=self.lab.ca.cert, sm=sm)["bound"]

    def send(self, messages):
        return self.call("pool_sm_send", messages=messages)

    def stream(self, messages, interval):
        return self.call("pool_sm_stream", messages=messages, interval=interval)

    def state(self, clear=False):
        return self.call("pool_sm_state", clear=clear)

    def drop(self, jids):
        return self.call("pool_sm_drop", jids=jids)


def messages(pairs, label):
    out, batch = [], next(BATCHES)
    for sender, receiver in pairs:
        message_id = f"{label}-{RUN_TAG}-{batch}-{len(out)}"
        out.append([sender, receiver, message_id, f"cluster {message_id} {sender} → {receiver}"])
    return out


def collect(pools, ids, timeout=DELIVERY_TIMEOUT, stall=DELIVERY_STALL, on_poll=None, ack_settle=5.0, in_archive=None):
    """Polls POOLS until every message id in IDS was received or bounced (an error back at
    its sender), bounded by TIMEOUT and by STALL seconds without news; returns the
    accumulated (received, errors, acked, sent, disconnections, seconds or None). Once all
    are accounted for, waits up to ACK_SETTLE more seconds for the servers' last acks of
    what the SM clients sent (an ack can trail the delivery). IN_ARCHIVE, given the ids not
    accounted for, returns those that are in their recipient's archive: after ARCHIVE_QUIET
    seconds without news, ids that are there count as accounted for (a client syncs them
    from there; the caller reports them), instead of waiting out STALL."""
    received, errors, acked, sent, disconnections = [], [], [], [], []
    started = moved = time.monotonic()
    count = -1
    ids = set(ids)
    accounted_at = None
    archive_checked = 0.0
    while True:
        for pool in pools:
            state = pool.state(clear=True)
            received += state["received"]
            errors += state["errors"]
            acked += state["acked"]
            sent += [entry + [pool.sm] for entry in state["sent"]]
            disconnections += state["disconnections"]
        accounted = {message[2] for message in received} | {error[2] for error in errors}
        if on_poll:
            on_poll()
        awaiting = {entry[1] for entry in sent if entry[2] and entry[1] in ids} - {entry[1] for entry in acked}
        if awaiting:
            for pool in pools:
                if pool.sm:
                    pool.call("pool_sm_request_acks")
        if ids <= accounted:
            if accounted_at is None:
                accounted_at = time.monotonic() - started
            if not awaiting or time.monotonic() - started - accounted_at >= ack_settle:
                return received, errors, acked, sent, disconnections, accounted_at
            time.sleep(0.3)
            continue
        if len(accounted & ids) != count:
            count, moved = len(accounted & ids), time.monotonic()
        now = time.monotonic()
        if in_archive and now - moved > ARCHIVE_QUIET and now - archive_checked > 1.0:
            archive_checked = now
            outstanding = ids - accounted
            if outstanding <= in_archive(outstanding):
                return received, errors, acked, sent, disconnections, now - started
        if now - started > timeout or now - moved > stall:
            return received, errors, acked, sent, disconnections, None
        time.sleep(0.3)


def tally(sent_messages, received, errors, acked=None):
    """By message id: delivered, bounced, lost, duplicated; with ACKED (ids the senders' servers
    acknowledged): which acknowledged ones were lost."""
    expected = {message[2]: message for message in sent_messages}
    seen = {}
    wrong = []
    for to, sender, message_id, *_ in received:
        if message_id in expected:
            seen[message_id] = seen.get(message_id, 0) + 1
            if (sender, to) != (expected[message_id][0].split("/")[0], expected[message_id][1].split("/")[0]):
                wrong.append(message_id)
    bounced = {}
    for error in errors:
        if error[2] in expected and error[2] not in seen:
            bounced[error[2]] = error[3]
    lost = [message_id for message_id in expected if message_id not in seen and message_id not in bounced]
    result = {"sent": len(expected), "delivered": len(seen), "bounced": len(bounced),
              "conditions": sorted({condition for condition in bounced.values()}),
              "lost": lost, "duplicated": sorted(message_id for message_id, n in seen.items() if n > 1),
              "wrong": wrong}
    if acked is not None:
        acked = set(acked) & set(expected)
        result["acked"] = len(acked)
        result["acked_lost"] = [message_id for message_id in lost if message_id in acked]
        result["unacked"] = len(expected) - len(acked)
    return result


def tally_text(label, counts):
    text = (f"{label}: {counts['sent']} sent"
            + (f", {counts['acked']} acknowledged by the server" if "acked" in counts else "")
            + f", {counts['delivered']} delivered, {counts['bounced']} bounced"
            + (f" ({', '.join(counts['conditions'])})" if counts["conditions"] else "")
            + f", {len(counts['lost'])} lost"
            + (f" ({len(counts['acked_lost'])} of them acknowledged)" if "acked_lost" in counts else "")
            + f", {len(counts['duplicated'])} duplicated")
    return text


def s2s_connections(lab, peer):
    """Established TCP connections between A's nodes and PEER's s2s ports (either direction),
    counted in PEER's namespace, and counted in A's namespaces."""
    node_ips = {node.ip: node.name for node in nodes(lab)}
    at_peer = [c for c in L.tcp_connections(peer.ns)
               if c[2] in node_ips and (c[1] in L.S2S_PORTS or c[3] in L.S2S_PORTS)]
    at_nodes = {}
    for node in nodes(lab):
        at_nodes[node.name] = len([c for c in L.tcp_connections(node.ns)
                                   if c[2] == peer.ip and (c[1] in L.S2S_PORTS or c[3] in L.S2S_PORTS)])
    by_node = {}
    for connection in at_peer:
        by_node[node_ips[connection[2]]] = by_node.get(node_ips[connection[2]], 0) + 1
    return len(at_peer), by_node, at_nodes


def a_users(lab):
    return [jid for domain in nodes(lab)[0].domains for jid in nodes(lab)[0].users(domain)]


def spread(jids, targets):
    """[(jid, target)] round robin."""
    return [(jid, targets[index % len(targets)]) for index, jid in enumerate(jids)]


def node_log_lines(node, patterns, limit=3):
    lines = [line.strip()[:300] for line in node.log_since_mark().splitlines() if any(p in line for p in patterns)]
    return lines[:limit], len(lines)


# -- scenarios ---------------------------------------------------------------------------

def scenario_chat(lab, details):
    """Users spread over A's three nodes chat with each other, with B and with C, both ways:
    everything delivered exactly once."""
    ensure_nodes(lab, details)
    b, c = named(lab, "braid"), named(lab, "prosody")
    holder(lab, details)
    users_a = a_users(lab)
    placement = spread(users_a, nodes(lab))
    users_b = [jid for domain in b.domains for jid in b.users(domain)][:3]
    users_c = [jid for domain in c.domains for jid in c.users(domain)][:3]
    pool_a, pool_b, pool_c = SmPool(lab, lab.clients_ns, "a"), SmPool(lab, b.ns, "b"), SmPool(lab, c.ns, "c")
    pool_a.connect_clients(placement)
    pool_b.connect_clients([(jid, b) for jid in users_b])
    pool_c.connect_clients([(jid, c) for jid in users_c], sm=False)
    details.append("A's users: " + "; ".join(f"{node.name}: {', '.join(j for j, n in placement if n is node)}"
                                            for node in nodes(lab)))
    on_node = {jid: node.name for jid, node in placement}
    groups = {
        "A→A same node": [(x, y) for x in users_a for y in users_a if x != y and on_node[x] == on_node[y]],
        "A→A across nodes": [(x, y) for x in users_a for y in users_a if on_node[x] != on_node[y]],
        "A→B": [(x, y) for x in users_a for y in users_b],
        "B→A": [(y, x) for x in users_a for y in users_b],
        "A→C": [(x, y) for x in users_a for y in users_c],
        "C→A": [(y, x) for x in users_a for y in users_c],
    }
    sent = {label: messages(pairs, f"chat-{label.replace(' ', '').replace('→', '2')}") for label, pairs in groups.items()}
    for label, batch in sent.items():
        pool = pool_b if label.startswith("B") else pool_c if label.startswith("C") else pool_a
        pool.send(batch)
    everything = [m for batch in sent.values() for m in batch]
    received, errors, _, _, _, seconds = collect([pool_a, pool_b, pool_c], [m[2] for m in everything])
    details.append(f"{len(everything)} messages, " + (f"all accounted for in {seconds:.1f}s" if seconds is not None
                                                     else "NOT all delivered or bounced"))
    problems = []
    for label, batch in sent.items():
        counts = tally(batch, received, errors)
        details.append("  " + tally_text(label, counts))
        if counts["delivered"] != counts["sent"] or counts["duplicated"] or counts["wrong"]:
            problems.append(f"{label}: {counts['delivered']}/{counts['sent']} delivered, {counts['bounced']} bounced, "
                            f"{len(counts['duplicated'])} duplicated, e.g. lost {counts['lost'][:3]}")
    L.expect(not problems, "; ".join(problems))


def scenario_one_link(lab, details):
    """Exactly one TCP connection between A (three nodes) and B, whichever node each A user is
    on: from cold, A→B from users on every node, then B→A, then both at once."""
    ensure_nodes(lab, details)
    b, c = named(lab, "braid"), named(lab, "prosody")
    lease_node = holder(lab, details)
    # From cold: every s2s connection of B and C cut (B's and C's namespaces), none left.
    for peer in (b, c):
        L.run(L.in_netns(peer.ns, ["ss", "-K", "-tn", "state", "established", *M.S2S_FILTER]), check=False)
    L.wait_until(lambda: s2s_connections(lab, b)[0] == 0 and s2s_connections(lab, c)[0] == 0, 20,
                 "no s2s connection left between A and B or C")
    users_a = a_users(lab)
    placement = spread(users_a, nodes(lab))
    users_b = [b.users(domain)[0] for domain in b.domains]
    users_c = [c.users(domain)[0] for domain in c.domains]
    pool_a, pool_b, pool_c = SmPool(lab, lab.clients_ns, "a"), SmPool(lab, b.ns, "b"), SmPool(lab, c.ns, "c")
    pool_a.connect_clients(placement)
    pool_b.connect_clients([(jid, b) for jid in users_b])
    pool_c.connect_clients([(jid, c) for jid in users_c], sm=False)
    problems = []
    peak = {"b": 0, "c": 0}

    def sample():
        peak["b"] = max(peak["b"], s2s_connections(lab, b)[0])
        peak["c"] = max(peak["c"], s2s_connections(lab, c)[0])

    for index, (phase, pairs_b, pairs_c) in enumerate((
            ("cold A→B, A→C", [(x, y) for x in users_a for y in users_b], [(x, y) for x in users_a for y in users_c]),
            ("B→A, C→A", [(y, x) for x in users_a for y in users_b], [(y, x) for x in users_a for y in users_c]),
            ("both ways at once", [(x, y) for x in users_a for y in users_b] + [(y, x) for x in users_a for y in users_b],
             [(x, y) for x in users_a for y in users_c] + [(y, x) for x in users_a for y in users_c]))):
        tag = f"link{index}"
        batch_b = messages(pairs_b, tag + "-b")
        batch_c = messages(pairs_c, tag + "-c")
        for batch, peer_pool in ((batch_b, pool_b), (batch_c, pool_c)):
            from_a = [m for m in batch if m[0] in users_a]
            from_peer = [m for m in batch if m[0] not in users_a]
            if from_a:
                pool_a.send(from_a)
            if from_peer:
                peer_pool.send(from_peer)
        received, errors, _, _, _, seconds = collect([pool_a, pool_b, pool_c], [m[2] for m in batch_b + batch_c],
                                                     on_poll=sample)
        count_b, by_node_b, at_nodes_b = s2s_connections(lab, b)
        count_c, by_node_c, _ = s2s_connections(lab, c)
        counts_b, counts_c = tally(batch_b, received, errors), tally(batch_c, received, errors)
        details.append(f"{phase}: " + (f"{seconds:.1f}s" if seconds is not None else "NOT complete")
                       + f"; A⇄B s2s connections {count_b} (at B, by A node: {by_node_b or '-'}; "
                       f"at A's nodes: {at_nodes_b}), peak {peak['b']}; A⇄C {count_c} ({by_node_c or '-'}), peak {peak['c']}")
        details.append("  " + tally_text("A⇄B", counts_b))
        details.append("  " + tally_text("A⇄C", counts_c))
        for label, counts in (("A⇄B", counts_b), ("A⇄C", counts_c)):
            if counts["delivered"] != counts["sent"] or counts["duplicated"]:
                problems.append(f"{phase} {label}: {counts['delivered']}/{counts['sent']} delivered")
        if count_b != 1:
            problems.append(f"{phase}: {count_b} TCP connections between A and B, not 1 ({by_node_b})")
        if set(by_node_b) - {lease_node.name}:
            problems.append(f"{phase}: a node other than the lease holder {lease_node.name} has a connection to B: {by_node_b}")
    details.append(f"peak A⇄B connections over the scenario: {peak['b']} (A⇄C: {peak['c']}, not asserted: "
                   "Prosody 0.12 keeps one s2s connection per domain pair)")
    if peak["b"] > 1:
        problems.append(f"up to {peak['b']} TCP connections between A and B while sampling, not 1")
    L.expect(not problems, "; ".join(problems))


def burst(senders, receivers, label):
    """Rounds of one message per (sender, receiver) pair, BURST_MESSAGES per sender; None marks
    the pause between rounds (SmPool.stream)."""
    stream, out, batch = [], [], next(BATCHES)
    pairs = [(sender, receivers[index % len(receivers)]) for index, sender in enumerate(senders)]
    for round_index in range(BURST_MESSAGES):
        for pair_index, (sender, _) in enumerate(pairs):
            receiver = receivers[(pair_index + round_index) % len(receivers)]
            message_id = f"{label}-{RUN_TAG}-{batch}-{len(out)}"
            message = [sender, receiver, message_id, f"cluster burst {message_id} {sender} → {receiver}"]
            out.append(message)
            stream.append(message)
        stream.append(None)
    return stream, out


def scenario_kill_lease_holder(lab, details):
    """kill -9 of the s2s lease holder during a burst from A users on the other nodes to B and
    C: another node takes the lease; every message the senders' servers acknowledged is
    delivered (or bounced back), none twice."""
    ensure_nodes(lab, details)
    b, c = named(lab, "braid"), named(lab, "prosody")
    victim = holder(lab, details)
    others = [node for node in nodes(lab) if node is not victim]
    users_a = a_users(lab)
    placement = spread(users_a, others)
    users_b = [jid for domain in b.domains for jid in b.users(domain)][:3]
    users_c = [jid for domain in c.domains for jid in c.users(domain)][:3]
    pool_a, pool_b, pool_c = SmPool(lab, lab.clients_ns, "a"), SmPool(lab, b.ns, "b"), SmPool(lab, c.ns, "c")
    pool_a.connect_clients(placement)
    pool_b.connect_clients([(jid, b) for jid in users_b])
    pool_c.connect_clients([(jid, c) for jid in users_c], sm=False)
    # Warm: the links to B and C are up before the burst (through the holder).
    warm = messages([(users_a[0], users_b[0]), (users_a[0], users_c[0])], "kl-warm")
    pool_a.send(warm)
    received, errors, *_ = collect([pool_a, pool_b, pool_c], [m[2] for m in warm], timeout=30)
    L.expect(tally(warm, received, errors)["delivered"] == 2, "warm-up messages to B and C not delivered")
    for node in nodes(lab):
        node.mark_log()
    stream, sent = burst(users_a, users_b + users_c, "kl")
    details.append(f"burst: {len(sent)} messages from {len(users_a)} A users on {', '.join(n.name for n in others)} "
                   f"to {len(users_b)} B and {len(users_c)} C users, {BURST_MESSAGES} per sender every "
                   f"{BURST_INTERVAL}s; kill -9 of {victim.name} {KILL_AFTER}s in "
                   f"(heartbeat {HEARTBEAT}s, dead after {DEAD_AFTER}s)")
    pool_a.stream(stream, BURST_INTERVAL)
    time.sleep(KILL_AFTER)  # the burst is under way: the moment of the kill, not a wait for a condition
    killed_at = time.monotonic()
    kill_clock = wall_clock()
    victim.kill()
    new_holder = listen_at = lease_at = None
    deadline = killed_at + 6 * DEAD_AFTER + 10
    while time.monotonic() < deadline and (listen_at is None or lease_at is None):
        if lease_at is None:
            node, valid = lease(lab)
            if node and node != victim.name and valid:
                new_holder, lease_at = node, time.monotonic() - killed_at
        if listen_at is None:
            listening = [n.name for n in others if L.listening(n.ns, L.S2S_PORT)]
            if listening:
                listen_at = time.monotonic() - killed_at
        time.sleep(0.05)
    details.append(f"killed at {kill_clock}; takeover: lease taken by {new_holder or 'NOBODY'} "
                   + (f"{lease_at:.2f}s after the kill" if lease_at is not None else "")
                   + (f", its s2s port bound {listen_at:.2f}s after the kill" if listen_at is not None
                      else ", NO node listening on the s2s port")
                   + f" (dead_after_seconds {DEAD_AFTER:g}, goal under {2 * DEAD_AFTER:g}s)")
    # Until the burst is sent and the senders' servers have answered it.
    L.wait_until(lambda: pool_a.call("pool_sm_state")["streaming"] == 0, 60, "the burst to be sent")
    received, errors, acked, _, disconnections, seconds = collect([pool_a, pool_b, pool_c], [m[2] for m in sent])
    counts = tally(sent, received, errors, [message_id for _, message_id in acked])
    details.append(("all accounted for " + f"{seconds:.1f}s after the burst" if seconds is not None
                    else "NOT all delivered or bounced"))
    by_peer = {}
    for label, subset in (("A→B", [m for m in sent if m[1] in users_b]), ("A→C", [m for m in sent if m[1] in users_c])):
        by_peer[label] = tally(subset, received, errors, [i for _, i in acked])
        details.append("  " + tally_text(label, by_peer[label]))
    details.append(tally_text("total", counts))
    if disconnections:
        details.append(f"  senders disconnected: {disconnections}")
    lines, count = node_log_lines(named(lab, new_holder) if new_holder else others[0],
                                  ["federation lease", "cluster node gone", "sessions of a gone node"])
    details.append(f"  {new_holder or others[0].name} log ({count} lines on lease/gone node):")
    details.extend(f"    {line}" for line in lines)
    problems = []
    if new_holder is None or listen_at is None:
        problems.append("no node took over the s2s lease and port")
    if counts["acked_lost"]:
        problems.append(f"{len(counts['acked_lost'])} acknowledged messages lost, e.g. {counts['acked_lost'][:5]}")
    if by_peer["A→B"]["duplicated"]:
        problems.append(f"{len(by_peer['A→B']['duplicated'])} duplicated to B, e.g. {by_peer['A→B']['duplicated'][:5]}")
    if by_peer["A→C"]["duplicated"]:
        # Prosody's s2s has no stream management here, so the holder confirms a stanza once
        # written; killed after writing it but before the confirmation left, the originating
        # node sends it again on the new link. A Braid peer drops that copy by its id
        # (docs/cluster.md); Prosody cannot know it is one. Reported, not a failure.
        details.append(f"  {len(by_peer['A→C']['duplicated'])} duplicated to C (Prosody), written by the killed holder "
                       f"just before the kill and sent again by their origin: {by_peer['A→C']['duplicated'][:5]}")
    if counts["lost"] and not counts["acked_lost"]:
        details.append(f"  ({len(counts['lost'])} lost were never acknowledged by the server: not a broken promise)")
    L.expect(not problems, "; ".join(problems))
    ensure_nodes(lab, details)


def scenario_kill_session_node(lab, details):
    """kill -9 of a node holding client sessions during a burst to those clients (from A users
    on the other nodes and from B): the clients log in again at a surviving node; every
    message the senders' servers acknowledged is delivered (live or from offline storage) or
    bounced, none twice. Two rounds: the clients log in again at once (as a client does,
    going on to the next SRV target), and only once the cluster has declared the node dead."""
    problems = []
    for round_name, wait_for_dead in (("immediate reconnect", False), ("reconnect after the node is declared dead", True)):
        problems += kill_session_round(lab, details, round_name, wait_for_dead)
    L.expect(not problems, "; ".join(problems))


def kill_session_round(lab, details, round_name, wait_for_dead):
    ensure_nodes(lab, details)
    b = named(lab, "braid")
    lease_node = holder(lab)
    victim = next(node for node in nodes(lab) if node is not lease_node)
    survivors = [node for node in nodes(lab) if node is not victim]
    users_a = a_users(lab)
    receivers = users_a[:3]
    senders_a = users_a[3:]
    senders_b = [jid for domain in b.domains for jid in b.users(domain)][:3]
    pool_r, pool_s, pool_b = SmPool(lab, lab.clients_ns, "receivers"), SmPool(lab, lab.clients_ns, "a"), SmPool(lab, b.ns, "b")
    try:
        old = pool_r.connect_clients([(jid, victim) for jid in receivers])
        pool_s.connect_clients(spread(senders_a, survivors))
        pool_b.connect_clients([(jid, b) for jid in senders_b])
        # The warm-up makes sure the receivers' sessions are known to every node.
        tag = "ks1" if not wait_for_dead else "ks2"
        warm = messages([(senders_a[0], receivers[0]), (senders_b[0], receivers[1])], f"{tag}-warm")
        pool_s.send(warm[:1])
        pool_b.send(warm[1:])
        received, errors, *_ = collect([pool_r, pool_s, pool_b], [m[2] for m in warm], timeout=30, ack_settle=0)
        L.expect(tally(warm, received, errors)["delivered"] == 2, "warm-up messages to the victim's clients not delivered")
        for node in nodes(lab):
            node.mark_log()
        stream_a, sent_a = burst(senders_a, receivers, f"{tag}-a")
        stream_b, sent_b = burst(senders_b, receivers, f"{tag}-b")
        sent = sent_a + sent_b
        details.append(f"{round_name}: {len(sent)} messages to {len(receivers)} users on {victim.name} (bare JIDs) from "
                       f"{len(senders_a)} A users on {', '.join(n.name for n in survivors)} and {len(senders_b)} B users; "
                       f"kill -9 of {victim.name} {KILL_AFTER}s in; its clients log in again at {survivors[0].name}")
        pool_s.stream(stream_a, BURST_INTERVAL)
        pool_b.stream(stream_b, BURST_INTERVAL)
        time.sleep(KILL_AFTER)  # the moment of the kill, in the burst
        killed_at = time.monotonic()
        kill_clock = wall_clock()
        victim.kill()
        # The clients notice (their TCP connection ends with the process) and log in
        # elsewhere: a new session, no resumption (XEP-0198 state lived in the dead node).
        L.wait_until(lambda: not pool_r.call("pool_sm_state")["connected"], 30, "the victim's clients to notice")
        noticed = time.monotonic() - killed_at
        pool_r.drop(receivers)
        dead_at = None
        if wait_for_dead:
            # Every survivor has removed the dead node's sessions (its log says so).
            L.wait_until(lambda: all(any(f"peer={victim.name}" in line for line in
                                         node_log_lines(node, ["sessions of a gone node removed"])[0])
                                     for node in survivors), 4 * DEAD_AFTER + 10,
                         f"the survivors to remove {victim.name}'s sessions", interval=0.1)
            dead_at = time.monotonic() - killed_at
        new = pool_r.connect_clients([(jid, survivors[0]) for jid in receivers])
        details.append(f"  killed at {kill_clock}; clients disconnected {noticed:.2f}s after the kill"
                       + (f", its sessions removed by the survivors {dead_at:.2f}s after it" if dead_at else "")
                       + f"; logged in again at {survivors[0].name} {time.monotonic() - killed_at:.2f}s after it")
        L.wait_until(lambda: pool_s.call("pool_sm_state")["streaming"] == 0 and
                     pool_b.call("pool_sm_state")["streaming"] == 0, 60, "the burst to be sent")
        received, errors, acked, _, _, seconds = collect([pool_r, pool_s, pool_b], [m[2] for m in sent],
                                                         in_archive=lambda outstanding: archived_ids(lab, sent, outstanding))
    finally:
        for pool in (pool_r, pool_s, pool_b):
            pool.close()
    acked_ids = [message_id for _, message_id in acked]
    details.append("  " + (f"all accounted for {seconds:.1f}s after the burst" if seconds is not None
                           else "NOT all delivered or bounced"))
    for label, subset in (("A→A", sent_a), ("B→A", sent_b)):
        details.append("    " + tally_text(label, tally(subset, received, errors, acked_ids)))
    counts = tally(sent, received, errors, acked_ids)
    details.append("    " + tally_text("total", counts))
    if counts["duplicated"]:
        # Where the two copies went: the old session (on the killed node) or the new one.
        old_jids, new_jids = set(old.values()), set(new.values())
        kinds = {}
        for message_id in counts["duplicated"]:
            where = tuple(sorted("old" if r[4] in old_jids else "new" if r[4] in new_jids else "?"
                                 for r in received if r[2] == message_id))
            kinds[where] = kinds.get(where, 0) + 1
        details.append("    duplicates by receiving session: "
                       + ", ".join(f"{'+'.join(where)} ×{n}" for where, n in sorted(kinds.items())))
    if counts["lost"]:
        in_offline = offline_ids(lab, counts["lost"])
        archived = archived_ids(lab, sent, counts["lost"]) - in_offline
        details.append(f"    of the {len(counts['lost'])} not delivered, {len(in_offline)} are still in offline storage, "
                       f"{len(archived)} more only in the recipient's archive (XEP-0313; the lab's clients do not "
                       f"query it): {where_text(sent, counts['lost'], {jid: victim.name for jid in receivers})}")
    for node in survivors:
        lines, _ = node_log_lines(node, ["cluster node gone", "sessions of a gone node"])
        details.extend(f"    {node.name}: {line}" for line in lines[:2])
    problems = []
    # Issue 18: the clients of a dead node "resume or get their messages from offline
    # storage or the archive". A message the dead node had handed to its client's TCP
    # connection but that never arrived is in the recipient's archive (XEP-0313, the
    # shared database), which is where such a client fetches it: reported, not a loss.
    # Acknowledged messages in none of live delivery, offline storage or the archive are.
    from_archive = archived_ids(lab, sent, counts["acked_lost"]) - offline_ids(lab, counts["acked_lost"]) if counts["acked_lost"] else set()
    unrecovered = [message_id for message_id in counts["acked_lost"] if message_id not in from_archive]
    if from_archive:
        details.append(f"    {len(from_archive)} acknowledged, not delivered live, in the recipient's archive "
                       f"(a reconnecting client syncs them from there): {sorted(from_archive)[:5]}")
    if unrecovered:
        problems.append(f"{round_name}: {len(unrecovered)} acknowledged messages lost (not delivered, not in offline storage, "
                        f"not in the archive), e.g. {unrecovered[:5]}")
    if counts["duplicated"]:
        problems.append(f"{round_name}: {len(counts['duplicated'])} duplicated, e.g. {counts['duplicated'][:3]}")
    return problems


def archived_ids(lab, sent, ids):
    """Which of the message IDS are in their recipient's archive (XEP-0313, shared database)."""
    if not ids:
        return set()
    recipient = {m[2]: m[1] for m in sent}
    result = psql(lab, "SELECT user_jid, stamp, stanza FROM archive WHERE stanza LIKE '%" + RUN_TAG + "%'")
    found = set()
    for line in (result.stdout.splitlines() if result.returncode == 0 else []):
        user, stamp, stanza = line.split("|", 2)
        for message_id in ids:
            if user == recipient[message_id] and (f"'{message_id}'" in stanza or f'"{message_id}"' in stanza):
                found.add(message_id)
                if stamp.isdigit():
                    ARCHIVE_STAMPS[message_id] = stamp
    return found


ARCHIVE_STAMPS = {}   # message id -> its archive stamp (ms since 1970), as archived_ids found it


def wall_clock():
    """UTC time of day with milliseconds, to compare with the nodes' logs and archive stamps."""
    now = time.time()
    return time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


def offline_ids(lab, ids):
    """Which of the message IDS sit in offline storage (the shared database)."""
    if not ids:
        return set()
    result = psql(lab, "SELECT stanza FROM offline_messages")
    text = result.stdout if result.returncode == 0 else ""
    return {message_id for message_id in ids if f"'{message_id}'" in text or f'"{message_id}"' in text}


def where_text(sent, lost, on_node, limit=4):
    by_id = {m[2]: m for m in sent}
    def stamp(message_id):
        if message_id not in ARCHIVE_STAMPS:
            return ""
        ms = int(ARCHIVE_STAMPS[message_id])
        return f" (archived {time.strftime('%H:%M:%S', time.gmtime(ms / 1000))}.{ms % 1000:03d})"
    return ", ".join(f"{i} {by_id[i][0]}@{on_node.get(by_id[i][0], '?')}→{by_id[i][1]}@{on_node.get(by_id[i][1], '?')}"
                     + stamp(i) for i in lost[:limit])


def scenario_postgres_restart(lab, details):
    """PostgreSQL stopped (fast shutdown) for twice dead_after_seconds, then started again:
    established sessions on different nodes keep exchanging messages meanwhile (reported),
    no node is declared dead on stale data, and `braid cluster status` shows every node alive
    within dead_after_seconds of the database being back."""
    ensure_nodes(lab, details)
    b = named(lab, "braid")
    holder(lab, details)
    users_a = a_users(lab)[:6]
    placement = spread(users_a, nodes(lab))
    users_b = [b.users(domain)[0] for domain in b.domains][:2]
    pool_a, pool_b = SmPool(lab, lab.clients_ns, "a"), SmPool(lab, b.ns, "b")
    pool_a.connect_clients(placement)
    pool_b.connect_clients([(jid, b) for jid in users_b])
    on_node = {jid: node.name for jid, node in placement}
    cross = [(x, y) for x in users_a for y in users_a if on_node[x] != on_node[y]]
    pg = lab.cluster_postgres
    for node in nodes(lab):
        node.mark_log()
    # Fast shutdown (SIGINT): a smart one (SIGTERM) would wait for the nodes to disconnect.
    stopped_at = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pg.service.pid, signal.SIGINT)
    L.wait_until(lambda: not pg.service.running(), 20, "PostgreSQL to stop")
    pg.stop()
    details.append(f"PostgreSQL stopped (fast shutdown) in {time.monotonic() - stopped_at:.1f}s")
    down = messages(cross, "pg-down-aa") + messages([(x, y) for x in users_a for y in users_b], "pg-down-ab")
    pool_a.send(down)
    received, errors, acked, _, disconnections, _ = collect(
        [pool_a, pool_b], [m[2] for m in down], timeout=2 * DEAD_AFTER, stall=2 * DEAD_AFTER, ack_settle=0)
    counts_down = tally(down, received, errors, [i for _, i in acked])
    details.append(f"while PostgreSQL is down ({2 * DEAD_AFTER:g}s): "
                   + tally_text("A→A across nodes and A→B", counts_down))
    # Down for at least twice dead_after_seconds in all.
    remaining = 2 * DEAD_AFTER - (time.monotonic() - stopped_at)
    if remaining > 0:
        time.sleep(remaining)  # the outage's length is the point: nothing to poll for
    still_running = [node.name for node in nodes(lab) if node.running()]
    pg.start()
    back_at = time.monotonic()
    details.append(f"PostgreSQL accepting connections again after {back_at - stopped_at:.1f}s down")
    status_seen = []

    def alive_again():
        ok, rows = all_alive(lab)
        status_seen.append(rows)
        return ok

    recovered = None
    with contextlib.suppress(L.LabError):
        L.wait_until(alive_again, 4 * DEAD_AFTER + 10, "every node alive in `braid cluster status`", interval=0.1)
        recovered = time.monotonic() - back_at
    details.append("braid cluster status: " + (f"all {len(NODE_NAMES)} alive {recovered:.2f}s after PostgreSQL was back"
                                               if recovered is not None else "NOT all alive")
                   + f"; first answer: {status_text(status_seen[0] if status_seen else None)}")
    received2, errors2, acked2, _, disconnections2, _ = collect([pool_a, pool_b], [m[2] for m in down], timeout=15, stall=10)
    counts_all = tally(down, received + received2, errors + errors2, [i for _, i in acked + acked2])
    details.append("after it is back: " + tally_text("messages sent while down", counts_all))
    if counts_all["lost"]:
        stored = offline_ids(lab, counts_all["lost"])
        archived = archived_ids(lab, down, counts_all["lost"]) - stored
        details.append(f"  not delivered: {where_text(down, counts_all['lost'], on_node)}; {len(stored)} of the "
                       f"{len(counts_all['lost'])} in offline storage although their recipients are online, "
                       f"{len(archived)} more only in the recipient's archive")
    if counts_all["duplicated"]:
        details.append(f"  duplicated: {where_text(down, counts_all['duplicated'], on_node)}")
    after = messages(cross, "pg-after-aa")
    pool_a.send(after)
    received3, errors3, *_ = collect([pool_a, pool_b], [m[2] for m in after], timeout=15, stall=10)
    counts_after = tally(after, received3, errors3)
    details.append(tally_text("A→A across nodes after the restart", counts_after))
    if counts_after["lost"]:
        stored = offline_ids(lab, counts_after["lost"])
        archived = archived_ids(lab, after, counts_after["lost"]) - stored
        details.append(f"  not delivered: {where_text(after, counts_after['lost'], on_node)}; {len(stored)} of the "
                       f"{len(counts_after['lost'])} in offline storage although their recipients are online, "
                       f"{len(archived)} more only in the recipient's archive (not delivered live)")
    for node in nodes(lab):
        lines, count = node_log_lines(node, ["membership check failed", "session directory write failed",
                                             "cluster node gone", "federation lease"])
        details.append(f"  {node.name}: {count} log lines on membership/lease" + (f", e.g. {lines[0]}" if lines else ""))
    gone = [line for node in nodes(lab) for line in node_log_lines(node, ["cluster node gone"], 5)[0]]
    problems = []
    if len(still_running) != len(NODE_NAMES):
        problems.append(f"nodes exited while PostgreSQL was down: {set(NODE_NAMES) - set(still_running)}")
    if disconnections or disconnections2:
        problems.append(f"clients disconnected: {disconnections + disconnections2}")
    if recovered is None or recovered > DEAD_AFTER:
        problems.append("membership not recovered within dead_after_seconds "
                        f"({'never' if recovered is None else f'{recovered:.2f}s'})")
    if gone:
        problems.append(f"nodes declared others gone on heartbeats that aged while PostgreSQL was down: {gone[0]}")
    if counts_all["lost"] or counts_all["duplicated"]:
        problems.append(f"messages sent while PostgreSQL was down: {len(counts_all['lost'])} lost, "
                        f"{len(counts_all['duplicated'])} duplicated")
    if counts_after["delivered"] != counts_after["sent"]:
        problems.append(f"after the restart {counts_after['delivered']}/{counts_after['sent']} delivered")
    L.expect(not problems, "; ".join(problems))
