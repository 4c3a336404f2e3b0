#!/usr/bin/python3
"""An account and its contacts for the PEP benchmark (bench/pep.py).

Usage: pepdriver.py PLAN.json   (prints one JSON object on stdout; progress on stderr)

PLAN: {"accounts": [{"jid", "password", "host", "port"}...]   index 0 is the publisher, the
       others its contacts (each with a presence subscription both ways to it),
       "node": NODE, "caps_node": URI, "publishes": P, "warmups": W, "probe_timeout": s,
       "publish_interval": s (between publish starts; Braid's default pep.notifications_per_second
       is 1,000 per publishing account),
       "announce_timeout": s, "login_timeout": s, "clients_per_worker": K,
       "caps": {"distinct": D, "steps": [T...], "contacts": [indices], "query_timeout": s, "timeout": s,
                "settle": s, "control": bool},
       "server_pids": {"a": [...], "b": [...]}}

Every account is a real client session (STARTTLS, SASL PLAIN inside TLS, bind, session,
initial presence), the logins and the epoll loop are bench/mucdriver.py's (its Occupant and
Worker); the publisher has a worker process of its own, the contacts are split over the
others. After the logins the decrypted stream is only scanned (regular expressions) for the
benchmark's tokens, for disco#info queries (answered at once) and for IQ results.

Phases:
  announce  every contact sends presence with XEP-0115 caps (hash sha-1, node caps_node,
            ver V0: one client kind, so one ver for all of them) whose features include
            NODE+notify; every disco#info query for caps_node#VER is answered with the
            identity and features that hash to VER. The phase ends when no query has come
            for 2 s (or announce_timeout).
  warm-up   the publisher publishes W items to NODE (the first creates the node); each
            waits until every contact has its notification (or probe_timeout), so the
            servers have learned every contact's interest before timing starts.
  publish   P times, one every publish_interval seconds: one item, whose payload carries
            its send time (CLOCK_MONOTONIC, shared by every process); the time until every contact has the notification, the
            server CPU seconds (server_pids, /proc) from the send until then, and who did
            not get it within probe_timeout.
  caps      the contacts in caps.contacts change their presence, each to a new ver in turn
            (features V0's plus one of its own), until D distinct vers (V0 included) have
            been announced; a contact announces its next ver once the server's disco#info
            query for the last one was answered (or after query_timeout). The server's RSS
            3 s before the first, and 3 s and caps.settle seconds (default 15) after the last,
            also on the way at each of caps.steps distinct vers (e.g. 1,000), so that the cost
            of further entries can be told from what the first queries left behind. With
            caps.control, then as many presence changes again to vers already known (no new
            entries) at the same pace, and the RSS after that: the churn's own share.
"""

import base64
import collections
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mucdriver  # noqa: E402
from mucdriver import Occupant, Worker, Workers, log as _log, percentile  # noqa: E402
from common import cpu_seconds, rss_kib  # noqa: E402

CAPS_NS = "http://jabber.org/protocol/caps"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
PAYLOAD_NS = "urn:braid:bench:pep"
TOKEN = re.compile(rb"pbk(\d+)t(\d+)k")
IQ_START = re.compile(rb"<iq\b")
ATTRIBUTE = re.compile(rb"([\w:]+)=(['\"])(.*?)\2")
QUIET = 2.0


def log(message):
    print(f"[pepdriver {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;").replace('"', "&quot;")


def unescape(text):
    return text.replace("&apos;", "'").replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


class Caps:
    """The XEP-0115 identities and features of ver number K (0: the base set)."""

    identity = ("client", "pc", "", "bench")

    def __init__(self, node):
        self.node = node
        self.base = sorted({CAPS_NS, DISCO_INFO, "urn:xmpp:ping", node, node + "+notify"})
        self.by_ver = {}

    def features(self, k):
        return self.base if k == 0 else sorted(self.base + [f"urn:braid:bench:caps:{k}"])

    def ver(self, k):
        features = self.features(k)
        string = "/".join(self.identity) + "<" + "".join(f + "<" for f in features)
        ver = base64.b64encode(hashlib.sha1(string.encode()).digest()).decode()
        self.by_ver[ver] = k
        return ver

    def answer(self, k, ident, to, node):
        category, kind, _, name = self.identity
        features = "".join(f"<feature var='{xml_escape(f)}'/>" for f in self.features(k))
        return (f"<iq type='result' id='{xml_escape(ident)}' to='{xml_escape(to)}'><query xmlns='{DISCO_INFO}' "
                f"node='{xml_escape(node)}'><identity category='{category}' type='{kind}' name='{name}'/>"
                f"{features}</query></iq>")


class PepClient(Occupant):
    def __init__(self, index, account, plan):
        super().__init__(index, account, {**plan, "host": account["host"], "port": account["port"], "room": "-"})
        self.caps = Caps(plan["node"]) if plan.get("node") else None
        self.caps_node = plan["caps_node"]
        self.arrivals = {}           # publish number -> latency in µs
        self.duplicates = 0
        self.queries = collections.Counter()   # ver number -> disco#info queries answered
        self.unknown_queries = 0
        self.last_query = None
        self.iq_results = {}
        self.announced = []          # ver numbers announced, in order
        self.counting = True         # notifications counted (not during the caps phase: last items)

    def presence(self, k):
        ver = self.caps.ver(k)
        self.announced.append(k)
        self.send(f"<presence><c xmlns='{CAPS_NS}' hash='sha-1' node='{self.caps_node}' ver='{ver}'/></presence>")

    def _iq(self, buffer, start, end, now):
        tag_end = buffer.find(b">", start)
        attributes = {m.group(1): m.group(3) for m in ATTRIBUTE.finditer(buffer, start, tag_end)}
        kind = attributes.get(b"type")
        ident = unescape(attributes.get(b"id", b"").decode())
        sender = unescape(attributes.get(b"from", b"").decode())
        body = buffer[start:end]
        if kind == b"get":
            if b"disco#info" in body:
                node = re.search(rb"node=(['\"])(.*?)\1", body)
                node = unescape(node.group(2).decode()) if node else ""
                k = self.caps.by_ver.get(node.split("#", 1)[1]) if node.startswith(self.caps_node + "#") else None
                if k is None:
                    self.unknown_queries += 1
                    self.send(f"<iq type='error' id='{xml_escape(ident)}' to='{xml_escape(sender)}'><error type='cancel'>"
                              "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
                else:
                    self.queries[k] += 1
                    self.last_query = time.monotonic()
                    self.send(self.caps.answer(k, ident, sender, node))
            elif b"urn:xmpp:ping" in body:
                self.send(f"<iq type='result' id='{xml_escape(ident)}' to='{xml_escape(sender)}'/>")
            else:
                self.send(f"<iq type='error' id='{xml_escape(ident)}' to='{xml_escape(sender)}'><error type='cancel'>"
                          "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
        elif kind in (b"result", b"error"):
            self.iq_results[ident] = "result" if kind == b"result" else "error: " + body[:400].decode("utf-8", "replace")

    def scan_tokens(self, data, now, worker):
        """Tokens in notifications, disco#info queries, IQ results; errors counted."""
        buffer = self.tail + data if self.tail else data
        cut = buffer.rfind(b">") + 1
        position = 0
        for match in IQ_START.finditer(buffer, 0, cut):
            if match.start() < position:
                continue
            tag_end = buffer.find(b">", match.start())
            if tag_end < 0:
                cut = match.start()
                break
            if buffer[tag_end - 1:tag_end] == b"/":
                end = tag_end + 1
            else:
                close = buffer.find(b"</iq>", tag_end)
                if close < 0:
                    cut = match.start()     # the rest of this IQ has not arrived yet
                    break
                end = close + 5
            self._iq(buffer, match.start(), end, now)
            position = end
        for match in (TOKEN.finditer(buffer, 0, cut) if self.counting else ()):
            start = buffer.rfind(b"<message", 0, match.start())
            if start >= 0 and b"error" in buffer[start:match.start()] and \
                    mucdriver.ERROR_TYPE.search(buffer, start, buffer.find(b">", start) + 1):
                self.errors["message:bounced"] += 1
                continue
            ident, stamp = int(match.group(1)), int(match.group(2))
            if ident in self.arrivals:
                self.duplicates += 1
            else:
                self.arrivals[ident] = (now - stamp) / 1000.0
        chunk = buffer[:cut]
        if b"stream:error" in chunk or b"</stream:stream>" in chunk:
            self.errors["stream:closed"] += 1
        self.tail = buffer[cut:]
        if self.out:
            worker.flush(self)


class PepWorker(Worker):
    def __init__(self, conn, accounts, first, plan):
        self.conn = conn
        self.plan = plan
        self.clients = [PepClient(first + i, a, plan) for i, a in enumerate(accounts)]
        self.by_index = {c.index: c for c in self.clients}
        self.selector = None
        self.operation = None
        self.sending = []
        self.sustain = None
        self.publishes = 0

    def login_all(self, timeout):
        reply = super().login_all(timeout)
        for client in self.clients:
            client.scan = True
        return reply

    def start_operation(self, message):
        cmd = message["cmd"]
        if cmd == "announce":
            return self.op_announce(message["timeout"])
        if cmd == "publish":
            return self.op_publish(message["id"])
        if cmd == "await":
            return self.op_await(message["id"], message["timeout"])
        if cmd == "caps":
            return self.op_caps(message["assign"], message["query_timeout"], message["timeout"])
        if cmd == "recaps":
            return self.op_recaps(message["assign"], message["interval"], message["timeout"])
        if cmd == "flush_stats":
            return self.op_stats()
        raise ValueError(f"unknown command {cmd}")

    def contacts(self):
        return [c for c in self.active() if c.index != 0]

    def op_announce(self, timeout):
        started = time.monotonic()
        for client in self.contacts():
            client.presence(0)
            self.flush(client)
        deadline = started + timeout
        while time.monotonic() < deadline:
            last = max([c.last_query or 0 for c in self.clients] + [started])
            if time.monotonic() - last > QUIET:
                break
            yield from self.every(0.05)
        return {"queries": sum(sum(c.queries.values()) for c in self.clients),
                "unknown_queries": sum(c.unknown_queries for c in self.clients),
                "seconds": round(time.monotonic() - started, 3)}

    def op_publish(self, ident):
        owner = self.by_index[0]
        stamp = time.monotonic_ns()
        owner.send(f"<iq type='set' id='pub{ident}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                   f"<publish node='{xml_escape(self.plan['node'])}'><item id='i{ident}'>"
                   f"<entry xmlns='{PAYLOAD_NS}'>pbk{ident}t{stamp}k</entry></item></publish></pubsub></iq>")
        self.flush(owner)
        return {"sent_ns": stamp}
        yield  # noqa: unreachable - a generator like the others

    def op_await(self, ident, timeout):
        deadline = time.monotonic() + timeout
        contacts = self.contacts()
        owner = self.by_index.get(0)
        while time.monotonic() < deadline:
            done = all(ident in c.arrivals for c in contacts)
            if owner is not None:
                done = done and f"pub{ident}" in owner.iq_results
            if done:
                break
            yield from self.every(0.001)
        reply = {"lat_us": [c.arrivals[ident] for c in contacts if ident in c.arrivals],
                 "missing": [c.index for c in contacts if ident not in c.arrivals][:20],
                 "missing_count": sum(ident not in c.arrivals for c in contacts)}
        if owner is not None:
            reply["publish_result"] = owner.iq_results.get(f"pub{ident}", "no answer")
        return reply

    def op_caps(self, assign, query_timeout, timeout):
        """ASSIGN: {client index: [ver numbers]}; each client announces them one after another."""
        started = time.monotonic()
        queues = {self.by_index[int(i)]: list(ks) for i, ks in assign.items() if int(i) in self.by_index}
        assigned = {client: set(ks) for client, ks in queues.items()}
        for client in self.clients:
            client.counting = False
        waiting = {}   # client -> (ver number, sent at)
        timeouts = 0
        deadline = started + timeout
        for client, ks in queues.items():
            if ks and client.dropped is None:
                k = ks.pop(0)
                client.presence(k)
                self.flush(client)
                waiting[client] = (k, time.monotonic())
        while waiting and time.monotonic() < deadline:
            now = time.monotonic()
            for client, (k, sent) in list(waiting.items()):
                answered = client.queries.get(k, 0) > 0
                if answered or now - sent > query_timeout or client.dropped is not None:
                    if not answered:
                        timeouts += 1
                    del waiting[client]
                    ks = queues[client]
                    if ks and client.dropped is None:
                        k = ks.pop(0)
                        client.presence(k)
                        self.flush(client)
                        waiting[client] = (k, now)
            yield from self.every(0.005)
        announced = sum(len(ks) for ks in assigned.values())
        answered_vers = sum(1 for c, ks in assigned.items() for k in ks if c.queries.get(k))
        return {"announced": announced, "answered_vers": answered_vers, "timeouts": timeouts,
                "left": sum(len(ks) for ks in queues.values()) + len(waiting),
                "seconds": round(time.monotonic() - started, 3)}

    def op_recaps(self, assign, interval, timeout):
        """ASSIGN: {client index: [ver numbers already announced]}; each client announces
        them again, one every INTERVAL seconds: presence changes without new vers."""
        started = time.monotonic()
        queues = {self.by_index[int(i)]: list(ks) for i, ks in assign.items() if int(i) in self.by_index}
        queries_before = sum(sum(c.queries.values()) + c.unknown_queries for c in self.clients)
        due = {client: started + (n % 100) * interval / 100 for n, client in enumerate(queues)}
        sent = 0
        deadline = started + timeout
        while any(queues.values()) and time.monotonic() < deadline:
            now = time.monotonic()
            for client, ks in queues.items():
                if ks and now >= due[client] and client.dropped is None:
                    client.presence(ks.pop(0))
                    self.flush(client)
                    sent += 1
                    due[client] += interval
                elif client.dropped is not None:
                    ks.clear()
            yield from self.every(0.002)
        return {"sent": sent, "queries": sum(sum(c.queries.values()) + c.unknown_queries for c in self.clients) - queries_before,
                "seconds": round(time.monotonic() - started, 3)}

    def op_stats(self):
        errors = collections.Counter()
        for c in self.clients:
            errors.update(c.errors)
        return {"errors": dict(errors), "duplicates": sum(c.duplicates for c in self.clients),
                "duplicate_clients": [[c.index, c.duplicates] for c in self.clients if c.duplicates][:10],
                "unknown_queries": sum(c.unknown_queries for c in self.clients),
                "dropped": [c.dropped for c in self.clients if c.dropped][:10]}
        yield  # noqa: unreachable


def pep_worker_main(conn, accounts, first, plan):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        PepWorker(conn, accounts, first, plan).run()
    except Exception as error:  # noqa: BLE001 - reported to the coordinator
        conn.send({"fatal": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-1500:]})


class PepWorkers(Workers):
    """Worker 0 holds the publisher alone; the contacts are split over the others."""

    def __init__(self, plan):  # noqa: super().__init__ not called: other ranges, other target
        accounts = plan["accounts"]
        per = max(1, plan.get("clients_per_worker", 500))
        context = multiprocessing.get_context("fork")
        self.pipes, self.processes, self.ranges = [], [], []
        ranges = [range(0, 1)] + [range(first, min(len(accounts), first + per)) for first in range(1, len(accounts), per)]
        for r in ranges:
            parent, child = context.Pipe()
            process = context.Process(target=pep_worker_main, args=(child, accounts[r.start:r.stop], r.start, plan), daemon=True)
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)
            self.ranges.append(r)


def run(plan, workers, result):
    n = len(plan["accounts"]) - 1
    pids = plan.get("server_pids", {})
    pids_a, pids_b = pids.get("a", []), pids.get("b", [])
    phase_timeout = plan.get("phase_timeout", 900)

    log(f"publisher and {n} contacts in {len(workers.pipes)} worker process(es): logging in")
    started = time.monotonic()
    owner = workers.call({"cmd": "login", "timeout": plan.get("login_timeout", 60)}, phase_timeout, only=0)[0]
    replies = [owner]
    for i in range(1, len(workers.pipes)):
        replies += workers.call({"cmd": "login", "timeout": plan.get("login_timeout", 60)}, phase_timeout, only=i)
    result["login_seconds"] = round(time.monotonic() - started, 3)
    failed = sum(r["failed"] for r in replies)
    if failed:
        result["login_failed"] = failed
        result["error"] = f"{failed} logins failed: {[f for r in replies for f in r['failures']][:5]}"
        return

    log("announcing caps")
    replies = workers.call({"cmd": "announce", "timeout": plan.get("announce_timeout", 60)}, phase_timeout)
    result["announce"] = {"queries": sum(r["queries"] for r in replies), "unknown_queries": sum(r["unknown_queries"] for r in replies),
                          "seconds": max(r["seconds"] for r in replies)}
    result["rss_a_after_announce_kib"] = rss_kib(pids_a)

    timeout = plan.get("probe_timeout", 30)

    def publish(ident):
        cpu_a, cpu_b = cpu_seconds(pids_a), cpu_seconds(pids_b)
        sent = workers.call({"cmd": "publish", "id": ident}, 30, only=0)[0]["sent_ns"]
        replies = workers.call({"cmd": "await", "id": ident, "timeout": timeout}, timeout + 30)
        done_ns = time.monotonic_ns()
        latencies = [x for r in replies for x in r["lat_us"]]
        missing = sum(r["missing_count"] for r in replies)
        return {"id": ident, "delivered": len(latencies), "missing": missing,
                "missing_first": [m for r in replies for m in r["missing"]][:10],
                "publish_result": replies[0].get("publish_result"),
                "all_ms": round(max(latencies) / 1000, 3) if latencies and not missing else None,
                "last_ms": round(max(latencies) / 1000, 3) if latencies else None,
                "median_ms": round(percentile(latencies, 50) / 1000, 3) if latencies else None,
                "cpu_a_seconds": round(cpu_seconds(pids_a) - cpu_a, 3), "cpu_b_seconds": round(cpu_seconds(pids_b) - cpu_b, 3),
                "window_ms": round((done_ns - sent) / 1e6, 3)}

    warmups = []
    for w in range(plan.get("warmups", 2)):
        log(f"warm-up publish {w + 1}")
        warmups.append(publish(100000 + w))
        time.sleep(plan.get("publish_interval", 1.2))
    result["warmups"] = warmups
    if warmups and warmups[-1]["missing"]:
        # Whoever the servers had not learned yet gets one more chance (the same time again).
        log(f"warm-up: {warmups[-1]['missing']} contacts without the notification; one more")
        warmups.append(publish(100000 + len(warmups)))

    probes = []
    log(f"{plan['publishes']} publishes")
    phase_a, phase_b, phase_started = cpu_seconds(pids_a), cpu_seconds(pids_b), time.monotonic()
    interval = plan.get("publish_interval", 1.2)
    for i in range(plan["publishes"]):
        begun = time.monotonic()
        probes.append(publish(i))
        time.sleep(max(0.2, interval - (time.monotonic() - begun)))
    phase = {"seconds": round(time.monotonic() - phase_started, 3), "cpu_a_seconds": round(cpu_seconds(pids_a) - phase_a, 3),
             "cpu_b_seconds": round(cpu_seconds(pids_b) - phase_b, 3)}
    complete = [p["all_ms"] for p in probes if p["all_ms"] is not None]
    cpu_a = sum(p["cpu_a_seconds"] for p in probes)
    cpu_b = sum(p["cpu_b_seconds"] for p in probes)
    delivered = sum(p["delivered"] for p in probes)
    result["fanout"] = {
        "publishes": len(probes), "complete": len(complete), "contacts": n,
        "expected": n * len(probes), "delivered": delivered, "lost": n * len(probes) - delivered,
        "all_p50_ms": percentile(complete, 50), "all_max_ms": max(complete, default=None),
        "all_min_ms": min(complete, default=None),
        "delivery_median_ms": percentile([p["median_ms"] for p in probes if p["median_ms"] is not None], 50),
        "cpu_a_seconds": round(cpu_a, 3), "cpu_b_seconds": round(cpu_b, 3),
        "cpu_a_per_1000": round(cpu_a / delivered * 1000, 4) if delivered else None,
        "cpu_total_per_1000": round((cpu_a + cpu_b) / delivered * 1000, 4) if delivered else None,
        "whole_phase": phase,
        "publish_results": dict(collections.Counter((p["publish_result"] or "none")[:120] for p in probes)),
        "each": probes,
    }

    caps = plan.get("caps") or {}
    if caps.get("distinct"):
        contacts = caps["contacts"]
        settle = caps.get("settle", 15)
        steps = sorted({t for t in caps.get("steps", []) if 1 < t < caps["distinct"]} | {caps["distinct"]})
        time.sleep(3)
        before = rss_kib(pids_a)
        log(f"caps: {caps['distinct'] - 1} new vers over {len(contacts)} contacts, RSS at {steps}")
        limit = caps.get("timeout", 600)
        deadline = time.monotonic() + limit
        rows, first, learned, announced, timeouts, left, seconds = [], 1, 0, 0, 0, 0, 0.0
        for target in steps:
            assign = collections.defaultdict(list)
            for k in range(first, target):
                assign[str(contacts[(k - 1) % len(contacts)])].append(k)
            first = target
            remaining = max(10, deadline - time.monotonic())
            replies = workers.call({"cmd": "caps", "assign": assign, "query_timeout": caps.get("query_timeout", 10),
                                    "timeout": remaining}, remaining + 60)
            learned += sum(r["answered_vers"] for r in replies)
            announced += sum(r["announced"] for r in replies)
            timeouts += sum(r["timeouts"] for r in replies)
            left += sum(r["left"] for r in replies)
            seconds += max(r["seconds"] for r in replies)
            time.sleep(3)
            after_3s = rss_kib(pids_a)
            # The server's own query timeout (Braid: a task per query sleeps
            # caps_query_timeout_seconds, 10 s) must have passed too: idle is after that.
            time.sleep(max(0, settle - 3))
            rows.append({"distinct": target, "vers_learned": learned + 1, "rss_after_3s_kib": after_3s,
                         "rss_kib": rss_kib(pids_a)})
        last = rows[-1]
        result["caps"] = {"rss_before_kib": before, "rss_after_3s_kib": last["rss_after_3s_kib"], "rss_after_kib": last["rss_kib"],
                          "settle_seconds": settle, "steps": rows, "announced": announced,
                          "vers_queried": learned + 1, "distinct": caps["distinct"], "timeouts": timeouts, "left": left,
                          "seconds": round(seconds, 3),
                          "bytes_per_entry": round((last["rss_kib"] - before) * 1024 / learned, 1) if learned else None}
        if caps.get("control") and learned:
            # Control: as many presence changes again, to vers the server already knows, at the
            # same pace; what RSS does then is the churn's share, not the cache's.
            rate = announced / seconds if seconds else 1000.0
            interval = max(0.001, len(contacts) / rate)
            assign = collections.defaultdict(list)
            for k in range(1, caps["distinct"]):
                assign[str(contacts[(k - 1) % len(contacts)])].append(k)
            remaining = max(10, deadline - time.monotonic())
            log(f"caps control: {caps['distinct'] - 1} presence changes to known vers, one per contact every {interval:.3f} s")
            replies = workers.call({"cmd": "recaps", "assign": assign, "interval": interval, "timeout": remaining}, remaining + 60)
            time.sleep(settle)
            control_after = rss_kib(pids_a)
            result["caps_control"] = {"presences": sum(r["sent"] for r in replies), "queries": sum(r["queries"] for r in replies),
                                      "seconds": max(r["seconds"] for r in replies), "rss_before_kib": last["rss_kib"],
                                      "rss_after_kib": control_after}
            result["caps"]["net_bytes_per_entry"] = round(
                ((last["rss_kib"] - before) - (control_after - last["rss_kib"])) * 1024 / learned, 1)
        if len(rows) > 1 and last["vers_learned"] > rows[0]["vers_learned"]:
            # From the first step to the last: what each further entry costs, without what
            # the first queries' transient state (tasks, buffers) left in the allocator.
            result["caps"]["marginal_bytes_per_entry"] = round(
                (last["rss_kib"] - rows[0]["rss_kib"]) * 1024 / (last["vers_learned"] - rows[0]["vers_learned"]), 1)
    stats = workers.call({"cmd": "flush_stats"}, 30)
    errors = collections.Counter()
    for s in stats:
        errors.update(s["errors"])
    result["errors_seen"] = dict(errors)
    result["duplicates"] = sum(s["duplicates"] for s in stats)
    result["duplicate_clients"] = [d for s in stats for d in s["duplicate_clients"]][:20]
    result["unknown_queries"] = sum(s["unknown_queries"] for s in stats)
    result["connections_lost"] = [d for s in stats for d in s["dropped"]][:10]


def main(path):
    with open(path) as handle:
        plan = json.load(handle)
    result = {"contacts": len(plan["accounts"]) - 1}
    workers = PepWorkers(plan)
    result["worker_processes"] = len(workers.pipes)
    try:
        run(plan, workers, result)
    except Exception as error:  # noqa: BLE001 - reported in the JSON
        result["error"] = f"{type(error).__name__}: {str(error)[-800:]}"
        log(traceback.format_exc()[-1500:])
    finally:
        workers.close()
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
