#!/usr/bin/python3
"""The occupants of one group-chat room (XEP-0045), for the MUC benchmark (bench/muc.py).

Usage: mucdriver.py PLAN.json   (prints one JSON object on stdout; progress on stderr)

PLAN: {"accounts": [{"jid", "password"}...], "host", "port", "room": "ROOM@conference.DOMAIN",
       "max_users": N, "probes": R, "probe_timeout": s, "join_timeout": s, "login_timeout": s,
       "sustain": {"senders": S, "rate": messages/s per sender, "seconds": T, "drain_timeout": s},
       "clients_per_worker": K, "server_pids": [...]}

Every account is a real client session (STARTTLS, SASL PLAIN inside TLS, bind, session,
initial presence), held by one of ceil(N / K) worker processes. A worker logs its clients in
with blocking sockets in a thread pool, then serves all of them from one epoll loop over
non-blocking TLS sockets: no asyncio, because the cost of each read decides how many
deliveries per second one process can count. This process (the coordinator) drives the
phases over pipes. Every process stamps with CLOCK_MONOTONIC, so a sender's stamp and an
arrival in another process compare. Certificates are not checked (the servers are local).

Phases:
  create   the first account enters the room, which creates it; the status codes of its
           self-presence are kept (201: a new room, locked). A second account tries to enter
           before the room is configured (a locked room refuses it, XEP-0045 §10.1.1). Then
           the owner submits the configuration form (muc#owner, FORM_TYPE and
           muc#roomconfig_maxusers = N) and its answer is kept.
  join     every other account enters (at most 50 joins outstanding per worker); then the
           phase waits until every occupant has seen the available presence of all N
           occupants (itself included), so that no presence is in flight when timing starts.
  probe    R times, one occupant (a different one each time) sends one groupchat message
           whose body carries its send time; the time until every occupant has it (the
           sender too: the room reflects it) is recorded. Each probe waits for the previous
           one to be complete (or probe_timeout).
  sustain  S occupants each send RATE groupchat messages/s for T seconds (offered deliveries
           per second: S * RATE * N). Receivers count the messages per second, their
           latencies, and per sender whether they arrived in order. The window ends when
           every occupant has every message, when nothing has arrived for 5 s after the
           last send, or at T + drain_timeout. The server's CPU seconds over the window
           (server_pids, from /proc) and every driver process's own CPU are reported.

After the create and join phases, stanzas are parsed (expat); during probe and sustain the
decrypted stream is only scanned for the benchmark's tokens (and error stanzas).
"""

import base64
import collections
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import selectors
import signal
import socket
import ssl
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xmppdriver import SASL_NS, STREAM, LoginError  # noqa: E402
from common import cpu_seconds, rss_kib  # noqa: E402

MUC_NS = "http://jabber.org/protocol/muc"
MUC_USER = "{http://jabber.org/protocol/muc#user}"
OWNER_NS = "http://jabber.org/protocol/muc#owner"
# A body token: kind (p probe, s sustained), id (probe number or sender index), sequence,
# send time in ns (CLOCK_MONOTONIC).
TOKEN = re.compile(rb"mbk([ps])(\d+)x(\d+)t(\d+)k")
ERROR_TYPE = re.compile(rb"\btype=['\"]error['\"]")
JOIN_WINDOW = 50
QUIET_SECONDS = 5.0


def log(message):
    print(f"[mucdriver {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def condition_of(element):
    """The defined condition of an error stanza, or '?'."""
    for child in element:
        if child.tag.split("}")[-1] == "error":
            for inner in child:
                name = inner.tag.split("}")[-1]
                if name != "text":
                    return name
    return "?"


def cpu_self():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Occupant:
    """One client session and what it has seen of the room."""

    def __init__(self, index, account, plan):
        self.index = index
        self.jid = account["jid"]
        self.local, self.domain = self.jid.split("@")
        self.password = account["password"]
        self.host, self.port = plan["host"], plan["port"]
        self.room = plan["room"]
        self.nick = f"u{index}"
        self.occupant_jid = f"{self.room}/{self.nick}"
        self.sock = None
        self.parser = None
        self.depth = 0
        self.queue = []
        self.scan = False
        self.tail = b""
        self.out = bytearray()
        self.writing = False
        self.dropped = None
        # the room, as this client saw it
        self.join_sent = None
        self.joined = False
        self.statuses = []
        self.join_error = None
        self.presences = 0
        self.iq = {}
        self.errors = collections.Counter()
        # tokens
        self.probes = {}
        self.last_seq = {}
        self.sustained = 0
        self.out_of_order = 0
        self.last_token = None

    # -- blocking login -------------------------------------------------------------------

    def _new_parser(self):
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.queue = []

    def feed(self, data):
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 1:
                    self.queue.append(element)

    def _stanza(self, deadline):
        while not self.queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoginError(f"{self.jid}: no answer before the login timeout")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise LoginError(f"{self.jid}: the server closed the connection")
            self.feed(data)
        return self.queue.pop(0)

    def _open(self, deadline):
        self._new_parser()
        self.sock.sendall(STREAM.format(domain=self.domain).encode())
        features = self._stanza(deadline)
        if not features.tag.endswith("features"):
            raise LoginError(f"{self.jid}: expected stream features, got {features.tag}")
        return features

    def _until_id(self, ident, deadline):
        while True:
            answer = self._stanza(deadline)
            if answer.get("id") == ident:
                return answer

    def login(self, context, timeout):
        deadline = time.monotonic() + timeout
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = raw
        features = self._open(deadline)
        if features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None:
            raise LoginError(f"{self.jid}: no STARTTLS offered")
        raw.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        if not self._stanza(deadline).tag.endswith("proceed"):
            raise LoginError(f"{self.jid}: STARTTLS refused")
        raw.settimeout(max(0.1, deadline - time.monotonic()))
        self.sock = context.wrap_socket(raw, server_hostname=self.domain)
        features = self._open(deadline)
        mechanisms = [m.text for m in features.iter(f"{{{SASL_NS}}}mechanism")]
        if "PLAIN" not in mechanisms:
            raise LoginError(f"{self.jid}: PLAIN not offered ({mechanisms})")
        token = base64.b64encode(b"\0" + self.local.encode() + b"\0" + self.password.encode()).decode()
        self.sock.sendall(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>".encode())
        if not self._stanza(deadline).tag.endswith("success"):
            raise LoginError(f"{self.jid}: authentication failed")
        self._open(deadline)
        self.sock.sendall(b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                          b"<resource>bench</resource></bind></iq>")
        if self._until_id("bind1", deadline).get("type") != "result":
            raise LoginError(f"{self.jid}: bind failed")
        self.sock.sendall(b"<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        self._until_id("sess1", deadline)
        self.sock.sendall(b"<presence/>")
        self.queue = []
        self.sock.setblocking(False)

    # -- the room -------------------------------------------------------------------------

    def send(self, text):
        self.out += text.encode()

    def send_join(self):
        self.join_sent = time.monotonic()
        self.send(f"<presence to='{self.occupant_jid}'><x xmlns='{MUC_NS}'><history maxstanzas='0'/></x></presence>")

    def handle(self, element):
        tag = element.tag.split("}")[-1]
        kind = element.get("type")
        sender = element.get("from", "")
        if tag == "presence" and sender.startswith(self.room + "/"):
            if kind == "error":
                self.errors["presence:" + condition_of(element)] += 1
                if sender == self.occupant_jid and not self.joined:
                    self.join_error = condition_of(element)
                return
            if kind == "unavailable":
                return
            self.presences += 1
            x = element.find(f"{MUC_USER}x")
            codes = [s.get("code") for s in x.findall(f"{MUC_USER}status")] if x is not None else []
            if "110" in codes or sender == self.occupant_jid:
                self.joined = True
                self.statuses = codes
        elif tag == "iq":
            self.iq[element.get("id")] = "result" if kind == "result" else f"{kind}:{condition_of(element)}"
        elif kind == "error":
            self.errors[f"{tag}:{condition_of(element)}"] += 1

    def scan_tokens(self, data, now, worker):
        buffer = self.tail + data if self.tail else data
        cut = buffer.rfind(b">") + 1
        if cut == 0:
            self.tail = buffer
            return
        errors = b"error" in buffer
        for match in TOKEN.finditer(buffer, 0, cut):
            if errors:
                start = buffer.rfind(b"<message", 0, match.start())
                if start >= 0 and ERROR_TYPE.search(buffer, start, buffer.find(b">", start) + 1):
                    self.errors["message:bounced"] += 1
                    continue
            kind, ident, seq, stamp = match.groups()
            latency_us = (now - int(stamp)) / 1000.0
            if kind == b"p":
                self.probes.setdefault(int(ident), latency_us)
            else:
                sender, seq = int(ident), int(seq)
                if seq <= self.last_seq.get(sender, -1):
                    self.out_of_order += 1
                else:
                    self.last_seq[sender] = seq
                self.sustained += 1
                self.last_token = now
                worker.record(now, latency_us)
        if errors:
            for start in (m.start() for m in re.finditer(rb"<(?:iq|presence)\b", buffer[:cut])):
                if ERROR_TYPE.search(buffer, start, buffer.find(b">", start) + 1):
                    self.errors["other:error"] += 1
        if b"stream:error" in buffer[:cut] or b"</stream:stream>" in buffer[:cut]:
            self.errors["stream:closed"] += 1
        self.tail = buffer[cut:]


class Worker:
    """Clients [first, first + len(accounts)) of the room, in one process."""

    def __init__(self, conn, accounts, first, plan):
        self.conn = conn
        self.plan = plan
        self.clients = [Occupant(first + i, a, plan) for i, a in enumerate(accounts)]
        self.by_index = {c.index: c for c in self.clients}
        self.selector = None
        self.operation = None
        self.sending = []
        self.sustain = None

    # -- I/O ------------------------------------------------------------------------------

    def active(self):
        return [c for c in self.clients if c.dropped is None]

    def drop(self, client, reason):
        if client.dropped is None:
            client.dropped = reason[:200]
            log(f"{client.jid}: connection lost ({client.dropped})")
            try:
                self.selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass

    def read(self, client):
        while True:
            try:
                data = client.sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except (OSError, ssl.SSLError) as error:
                self.drop(client, repr(error))
                return
            if not data:
                self.drop(client, "closed by the server")
                return
            if client.scan:
                client.scan_tokens(data, time.monotonic_ns(), self)
            else:
                try:
                    client.feed(data)
                except ET.ParseError as error:
                    self.drop(client, f"XML: {error}")
                    return
                for element in client.queue:
                    client.handle(element)
                client.queue = []
            if not client.sock.pending():
                # Nothing decrypted is left in the TLS object; epoll (level-triggered) reports
                # the socket again if more bytes are in the kernel's buffer.
                return

    def flush(self, client):
        while client.out and client.dropped is None:
            try:
                sent = client.sock.send(client.out)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                if not client.writing:
                    client.writing = True
                    self.selector.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                return
            except (OSError, ssl.SSLError) as error:
                self.drop(client, repr(error))
                return
            del client.out[:sent]
        if client.writing and client.dropped is None:
            client.writing = False
            self.selector.modify(client.sock, selectors.EVENT_READ, client)

    # -- phases (generators: each yield gives the loop back; the return value is the reply) --

    def op_create(self, timeout):
        owner = self.clients[0]
        deadline = time.monotonic() + timeout
        owner.send_join()
        self.flush(owner)
        while not (owner.joined or owner.join_error) and time.monotonic() < deadline:
            yield
        reply = {"owner_joined": owner.joined, "owner_statuses": owner.statuses, "owner_error": owner.join_error,
                 "locked": "201" in owner.statuses}
        if not owner.joined:
            return reply
        if len(self.clients) > 1:
            # Before the owner configures the room: may someone else enter?
            tester = self.clients[1]
            tester.send_join()
            self.flush(tester)
            while not (tester.joined or tester.join_error) and time.monotonic() < deadline:
                yield
            reply["second_before_configuration"] = ("entered" if tester.joined else
                                                    f"refused: {tester.join_error}" if tester.join_error else "no answer")
            if tester.join_error:
                tester.join_error = None
                tester.join_sent = None
        form = (f"<iq type='set' id='config1' to='{owner.room}'><query xmlns='{OWNER_NS}'>"
                "<x xmlns='jabber:x:data' type='submit'>"
                "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>"
                f"<field var='muc#roomconfig_maxusers'><value>{self.plan['max_users']}</value></field>"
                "</x></query></iq>")
        sent = time.monotonic()
        owner.send(form)
        self.flush(owner)
        while "config1" not in owner.iq and time.monotonic() < deadline:
            yield
        reply["configuration"] = owner.iq.get("config1", "no answer")
        reply["configuration_ms"] = round((time.monotonic() - sent) * 1000, 2)
        return reply

    def op_join(self, timeout):
        started = time.monotonic()
        deadline = started + timeout
        waiting = [c for c in self.active() if not c.joined and c.join_sent is None]
        outstanding = []
        while time.monotonic() < deadline:
            outstanding = [c for c in outstanding if not (c.joined or c.join_error or c.dropped)]
            while waiting and len(outstanding) < JOIN_WINDOW:
                client = waiting.pop(0)
                client.send_join()
                self.flush(client)
                outstanding.append(client)
            if not waiting and not outstanding:
                break
            yield
        clients = self.active()
        return {"joined": sum(c.joined for c in clients), "clients": len(self.clients),
                "errors": dict(collections.Counter(c.join_error for c in clients if c.join_error)),
                "seconds": round(time.monotonic() - started, 3)}

    def every(self, seconds):
        """Yields (giving the loop back) until SECONDS have passed since the last check: the
        conditions below look at every client, which would cost more than the reads if done
        after each one. Arrival times are taken on reading, so they do not depend on it."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            yield

    def op_settle(self, expected, timeout):
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if all(c.presences >= expected for c in self.active() if c.joined):
                break
            yield from self.every(0.01)
        counts = [c.presences for c in self.active() if c.joined]
        for client in self.clients:
            client.scan = True
            client.errors = collections.Counter()  # from here on: errors while timing
        return {"settled": bool(counts) and min(counts) >= expected, "min_presences": min(counts, default=None),
                "max_presences": max(counts, default=None), "seconds": round(time.monotonic() - started, 3)}

    def op_probe(self, ident, sender):
        client = self.by_index[sender]
        client.send(f"<message to='{client.room}' type='groupchat' id='p{ident}'>"
                    f"<body>mbkp{ident}x0t{time.monotonic_ns()}k</body></message>")
        self.flush(client)
        return {"sent": True}
        yield  # noqa: unreachable - makes this a generator like the others

    def op_await_probe(self, ident, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(ident in c.probes for c in self.active() if c.joined):
                break
            yield from self.every(0.002)
        latencies = [c.probes[ident] for c in self.active() if ident in c.probes]
        return {"count": len(latencies), "lat_us": latencies}

    def record(self, now, latency_us):
        s = self.sustain
        s["bins"][int((now - s["start_ns"]) // 1_000_000_000)] += 1
        s["latency"][int(latency_us // 100)] += 1
        if s["first"] is None:
            s["first"] = now
        s["last"] = now

    def op_sustain(self, start_ns, senders, rate, seconds, expected, drain_timeout):
        cpu_before = cpu_self()
        count = int(round(rate * seconds))
        period = int(1e9 / rate)
        mine = [g for g in senders if g in self.by_index]
        for client in self.clients:
            client.sustained = 0
            client.out_of_order = 0
            client.last_seq = {}
        self.sustain = {"start_ns": start_ns, "bins": collections.Counter(), "latency": collections.Counter(),
                        "first": None, "last": None}
        # Senders spread evenly over the period, so the room sees a steady stream.
        plan = [[self.by_index[g], start_ns + int(senders.index(g) * period / len(senders)), 0] for g in mine]
        send_times = []
        deadline = start_ns + int((seconds + drain_timeout) * 1e9)
        while True:
            now = time.monotonic_ns()
            busy = False
            for entry in plan:
                client, first, seq = entry
                while seq < count and first + seq * period <= now and client.dropped is None:
                    stamp = time.monotonic_ns()
                    client.send(f"<message to='{client.room}' type='groupchat' id='s{client.index}x{seq}'>"
                                f"<body>mbks{client.index}x{seq}t{stamp}k</body></message>")
                    send_times.append(stamp)
                    seq += 1
                entry[2] = seq
                self.flush(client)
                busy = busy or (seq < count and client.dropped is None)
            self.next_due = min((e[1] + e[2] * period for e in plan if e[2] < count), default=None)
            if not busy:
                active = [c for c in self.active() if c.joined]
                if all(c.sustained >= expected for c in active):
                    break
                last = max([c.last_token or 0 for c in active] + [max(send_times, default=0)])
                if now - last > QUIET_SECONDS * 1e9 or now > deadline:
                    break
                yield from self.every(0.01)
            elif now > deadline:
                break
            yield
        self.next_due = None
        active = [c for c in self.active() if c.joined]
        s = self.sustain
        errors = collections.Counter()
        for client in self.clients:
            errors.update(client.errors)
        return {"sent": {str(g): e[2] for g, e in zip(mine, plan)},
                "errors": dict(errors), "dropped": [c.dropped for c in self.clients if c.dropped],
                "first_send_ns": min(send_times, default=None), "last_send_ns": max(send_times, default=None),
                "delivered": sum(c.sustained for c in self.clients), "out_of_order": sum(c.out_of_order for c in self.clients),
                "short": sum(max(0, expected - c.sustained) for c in active), "clients": len(active),
                "bins": dict(s["bins"]), "latency_100us": dict(s["latency"]),
                "first_arrival_ns": s["first"], "last_arrival_ns": s["last"],
                "cpu_seconds": round(cpu_self() - cpu_before, 3)}

    # -- the loop -------------------------------------------------------------------------

    def login_all(self, timeout):
        started = time.monotonic()
        context = tls_context()
        failures = []

        def one(client):
            try:
                client.login(context, timeout)
            except (LoginError, OSError, ssl.SSLError) as error:
                failures.append(f"{client.jid}: {error!r}"[:300])
                client.dropped = "login failed"

        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(one, self.clients))
        return {"logged_in": len(self.clients) - len(failures), "failures": failures[:5], "failed": len(failures),
                "seconds": round(time.monotonic() - started, 3)}

    def start_operation(self, message):
        cmd = message["cmd"]
        if cmd == "create":
            return self.op_create(message["timeout"])
        if cmd == "join":
            return self.op_join(message["timeout"])
        if cmd == "settle":
            return self.op_settle(message["expected"], message["timeout"])
        if cmd == "probe":
            return self.op_probe(message["id"], message["sender"])
        if cmd == "await_probe":
            return self.op_await_probe(message["id"], message["timeout"])
        if cmd == "sustain":
            return self.op_sustain(message["start_ns"], message["senders"], message["rate"], message["seconds"],
                                   message["expected"], message["drain_timeout"])
        raise ValueError(f"unknown command {cmd}")

    def run(self):
        message = self.conn.recv()
        assert message["cmd"] == "login"
        self.conn.send(self.login_all(message["timeout"]))
        self.selector = selectors.EpollSelector()
        for client in self.active():
            self.selector.register(client.sock, selectors.EVENT_READ, client)
        self.selector.register(self.conn.fileno(), selectors.EVENT_READ, None)
        self.next_due = None
        while True:
            timeout = 0.02
            if self.next_due is not None:
                timeout = max(0.0, min(timeout, (self.next_due - time.monotonic_ns()) / 1e9))
            for key, mask in self.selector.select(timeout):
                client = key.data
                if client is None:
                    continue
                if mask & selectors.EVENT_READ:
                    self.read(client)
                if mask & selectors.EVENT_WRITE:
                    self.flush(client)
            if self.operation is None and self.conn.poll():
                message = self.conn.recv()
                if message["cmd"] == "quit":
                    break
                self.operation = self.start_operation(message)
            if self.operation is not None:
                try:
                    next(self.operation)
                except StopIteration as done:
                    self.operation = None
                    self.conn.send(done.value)
        for client in self.clients:
            if client.sock is not None:
                try:
                    client.sock.setblocking(True)
                    client.sock.settimeout(1)
                    client.sock.sendall(b"</stream:stream>")
                except (OSError, ssl.SSLError):
                    pass
                try:
                    client.sock.close()
                except OSError:
                    pass
        self.conn.send({"bye": True})


def worker_main(conn, accounts, first, plan):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        Worker(conn, accounts, first, plan).run()
    except Exception as error:  # noqa: BLE001 - reported to the coordinator
        conn.send({"fatal": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-1500:]})


# -- coordinator -----------------------------------------------------------------------------

class Workers:
    def __init__(self, plan):
        accounts = plan["accounts"]
        per = max(1, plan.get("clients_per_worker", 500))
        context = multiprocessing.get_context("fork")
        self.pipes, self.processes, self.ranges = [], [], []
        for first in range(0, len(accounts), per):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child, accounts[first:first + per], first, plan), daemon=True)
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)
            self.ranges.append(range(first, min(len(accounts), first + per)))

    def owner_of(self, index):
        return next(i for i, r in enumerate(self.ranges) if index in r)

    def call(self, message, timeout, only=None):
        """Sends MESSAGE to every worker (or ONLY), returns their replies in order."""
        targets = range(len(self.pipes)) if only is None else [only]
        for i in targets:
            self.pipes[i].send(message)
        replies = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(targets):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{message['cmd']}: {len(targets) - len(replies)} worker(s) did not answer in {timeout:.0f}s")
            ready = multiprocessing.connection.wait([self.pipes[i] for i in targets if i not in replies], remaining)
            for pipe in ready:
                i = self.pipes.index(pipe)
                try:
                    reply = pipe.recv()
                except EOFError:
                    raise RuntimeError(f"worker {i} exited during {message['cmd']}") from None
                if "fatal" in reply:
                    raise RuntimeError(f"worker {i}: {reply['fatal']}\n{reply.get('trace', '')}")
                replies[i] = reply
        return [replies[i] for i in targets]

    def close(self):
        for i, pipe in enumerate(self.pipes):
            if self.processes[i].is_alive():
                try:
                    pipe.send({"cmd": "quit"})
                except OSError:
                    pass
        deadline = time.monotonic() + 15
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join(5)


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))]


def histogram_percentile(histogram, p):
    """P-th percentile (ms) of a {bucket of 100 µs: count} histogram (the bucket's upper edge)."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = math.ceil(p / 100 * total)
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round((bucket + 1) / 10, 1)
    return None


def run(plan, workers, result):
    n = len(plan["accounts"])
    phase_timeout = plan.get("phase_timeout", 600)

    log(f"{n} clients in {len(workers.pipes)} worker process(es): logging in")
    replies = workers.call({"cmd": "login", "timeout": plan.get("login_timeout", 60)}, phase_timeout)
    result["login_seconds"] = max(r["seconds"] for r in replies)
    failed = sum(r["failed"] for r in replies)
    if failed:
        result["login_failed"] = failed
        result["error"] = f"{failed} logins failed: {[f for r in replies for f in r['failures']][:5]}"
        return

    log("creating the room")
    room = workers.call({"cmd": "create", "timeout": plan.get("join_timeout", 120)}, phase_timeout, only=0)[0]
    result["room"] = room
    if not room["owner_joined"]:
        result["error"] = f"the owner could not enter the room: {room.get('owner_error') or 'no answer'}"
        return

    log("joining")
    replies = workers.call({"cmd": "join", "timeout": plan.get("join_timeout", 120)}, phase_timeout)
    joined = sum(r["joined"] for r in replies)
    errors = collections.Counter()
    for r in replies:
        errors.update(r["errors"])
    result["join"] = {"occupants": joined, "seconds": max(r["seconds"] for r in replies), "errors": dict(errors)}
    if joined < n:
        result["error"] = f"only {joined} of {n} clients entered the room ({dict(errors)})"
        return
    replies = workers.call({"cmd": "settle", "expected": n, "timeout": plan.get("join_timeout", 120)}, phase_timeout)
    result["join"]["presences_settled"] = all(r["settled"] for r in replies)
    result["join"]["min_presences_seen"] = min(r["min_presences"] for r in replies if r["min_presences"] is not None)
    result["join"]["settle_seconds"] = max(r["seconds"] for r in replies)
    result["join"]["server_rss_kib"] = rss_kib(plan.get("server_pids", []))

    log(f"{plan['probes']} probes")
    probes = []
    stride = max(1, n // max(1, plan["probes"])) if n > 1 else 1
    for i in range(plan["probes"]):
        sender = (i * stride) % n
        workers.call({"cmd": "probe", "id": i, "sender": sender}, 30, only=workers.owner_of(sender))
        replies = workers.call({"cmd": "await_probe", "id": i, "timeout": plan.get("probe_timeout", 30)},
                               plan.get("probe_timeout", 30) + 30)
        latencies = [x for r in replies for x in r["lat_us"]]
        probes.append({"sender": sender, "delivered": len(latencies),
                       "all_ms": round(max(latencies) / 1000, 3) if len(latencies) == n else None,
                       "median_ms": round(percentile(latencies, 50) / 1000, 3) if latencies else None})
    complete = [p["all_ms"] for p in probes if p["all_ms"] is not None]
    result["probes"] = {"count": len(probes), "complete": len(complete),
                        "all_occupants_median_ms": percentile(complete, 50), "all_occupants_p95_ms": percentile(complete, 95),
                        "all_occupants_max_ms": max(complete, default=None),
                        "delivery_median_ms": percentile([p["median_ms"] for p in probes if p["median_ms"] is not None], 50),
                        "each": probes}

    s = plan["sustain"]
    count = max(1, min(s["senders"], n))
    senders = sorted({k * n // count for k in range(count)})
    per_sender = int(round(s["rate"] * s["seconds"]))
    expected = per_sender * len(senders)
    log(f"sustain: {len(senders)} senders x {s['rate']} msg/s for {s['seconds']} s to {n} occupants")
    pids = plan.get("server_pids", [])
    server_before = cpu_seconds(pids)
    own_before = cpu_self()
    start_ns = time.monotonic_ns() + 300_000_000
    replies = workers.call({"cmd": "sustain", "start_ns": start_ns, "senders": senders, "rate": s["rate"],
                            "seconds": s["seconds"], "expected": expected, "drain_timeout": s["drain_timeout"]},
                           s["seconds"] + s["drain_timeout"] + 60)
    server_cpu = cpu_seconds(pids) - server_before
    sent = sum(sum(r["sent"].values()) for r in replies)
    delivered = sum(r["delivered"] for r in replies)
    first_send = min(r["first_send_ns"] for r in replies if r["first_send_ns"] is not None)
    last_send = max(r["last_send_ns"] for r in replies if r["last_send_ns"] is not None)
    last_arrival = max((r["last_arrival_ns"] for r in replies if r["last_arrival_ns"]), default=None)
    window = (last_arrival - start_ns) / 1e9 if last_arrival else None
    bins = collections.Counter()
    histogram = collections.Counter()
    for r in replies:
        bins.update({int(k): v for k, v in r["bins"].items()})
        histogram.update({int(k): v for k, v in r["latency_100us"].items()})
    steady = [bins.get(second, 0) for second in range(1, int(s["seconds"]) - 1)]
    driver_cpu = sum(r["cpu_seconds"] for r in replies) + (cpu_self() - own_before)
    errors = collections.Counter()
    for r in replies:
        errors.update(r["errors"])
    result["sustain"] = {
        "errors_seen": dict(errors), "connections_lost": [d for r in replies for d in r["dropped"]][:10],
        "senders": len(senders), "rate_per_sender": s["rate"], "seconds": s["seconds"],
        "offered_messages_per_second": len(senders) * s["rate"],
        "offered_deliveries_per_second": len(senders) * s["rate"] * n,
        "sent": sent, "send_seconds": round((last_send - first_send) / 1e9, 3),
        "expected_deliveries": sent * n, "delivered": delivered, "lost": sent * n - delivered,
        "out_of_order": sum(r["out_of_order"] for r in replies),
        "window_seconds": round(window, 3) if window else None,
        "deliveries_per_second": round(delivered / window, 1) if window else None,
        "steady_deliveries_per_second": percentile(steady, 50) if steady else None,
        "latency_p50_ms": histogram_percentile(histogram, 50), "latency_p99_ms": histogram_percentile(histogram, 99),
        "latency_max_ms": round((max(histogram) + 1) / 10, 1) if histogram else None,
        "server_cpu_seconds": round(server_cpu, 3),
        "deliveries_per_cpu_second": round(delivered / server_cpu, 1) if server_cpu > 0 else None,
        "server_cores_busy": round(server_cpu / window, 3) if window else None,
        "driver_cpu_seconds": round(driver_cpu, 3),
        "driver_busiest_process_share": round(max(r["cpu_seconds"] for r in replies) / window, 3) if window else None,
    }


def main(path):
    with open(path) as handle:
        plan = json.load(handle)
    result = {"occupants": len(plan["accounts"])}
    workers = Workers(plan)
    result["worker_processes"] = len(workers.pipes)
    try:
        run(plan, workers, result)
    except Exception as error:  # noqa: BLE001 - reported in the JSON
        result["error"] = f"{type(error).__name__}: {str(error)[-800:]}"
    finally:
        workers.close()
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
