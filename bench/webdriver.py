#!/usr/bin/python3
"""The clients of the web benchmark (bench/web.py): XMPP over WebSocket beside TCP, and HTTP
file upload (XEP-0363).

Usage: webdriver.py PLAN.json   (prints one JSON object on stdout; progress on stderr)

PLAN: {"mode": "messages" or "upload", "domain", "host", "accounts": [{"jid", "password"}...],
       "transport": "tcp" or "ws", "tcp_port", "ws": {"port", "path"},
       "pairs": N, "window": W, "seconds": T, "warmup": s, "drain_timeout": s, "processes": P,
       "login_timeout": s, "server_pids": [...],
       "upload": {"service": "upload.DOMAIN", "transfers": [[bytes, repetitions]...],
                  "rss_interval": s, "http_timeout": s}}

Every account is a real client session: over TCP, STARTTLS and then SASL inside TLS; over
WebSocket (RFC 7395), a TLS connection to wss://DOMAIN:PORT/PATH upgraded with subprotocol
`xmpp` (RFC 6455 client written here on asyncio + ssl: client frames masked, one stanza per
text message, <open/>/<close/> framing). SASL PLAIN when offered, else SCRAM-SHA-1; then
bind, session, initial presence. Certificates are not checked (the servers are local).

messages  N pairs of accounts (user2i-1, user2i) split over P processes, one asyncio loop
          each. Each side of a pair keeps W chat messages in flight to the other: every
          message the receiver reads lets its sender send one more (in the same process, so
          no extra round trip), as fast as the server delivers. After `warmup` seconds the
          window of T seconds counts the messages read (delivered/s), their latencies (send
          stamp in the body, CLOCK_MONOTONIC shared by the processes), the server's CPU
          seconds (server_pids, /proc) and the driver's own, and the CPU seconds all processes
          used (/proc/stat: what is neither is other work on the machine). Then sending stops and the
          driver waits (at most drain_timeout) until every message sent has arrived: sent −
          received = lost, reported, and error stanzas or closed streams are counted.
upload    one session over TCP asks upload.DOMAIN for a slot (XEP-0363 <request/>) per
          transfer, PUTs that many random bytes to the slot's PUT URL (its headers included)
          and GETs the GET URL; the seconds of each (from the request line to the last byte of
          the answer), MB/s (10^6 bytes), and the server's RSS (VmRSS of server_pids) sampled
          every rss_interval seconds during each transfer (peak) and before it, and the server's
          CPU seconds over each (/proc). The bytes
          read back must equal the bytes sent (compared chunk by chunk); a mismatch, a short
          read or an HTTP error is an error of that transfer.
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import http.client
import json
import multiprocessing
import os
import re
import resource
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_seconds, rss_kib  # noqa: E402

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
UPLOAD = "urn:xmpp:http:upload:0"
TOKEN = re.compile(rb"wbk(\d+)t(\d+)k")
ERROR_TYPE = re.compile(rb"<(message|iq|presence)\b[^>]*\btype=['\"]error['\"]")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def log(message):
    print(f"[webdriver {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class LoginError(Exception):
    pass


def tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def cpu_self():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mask(payload, key):
    """RFC 6455 §5.3 masking, as one big-integer XOR (fast in CPython)."""
    n = len(payload)
    if n == 0:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def ws_frame(opcode, payload):
    """One final, masked client frame."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + key + mask(payload, key)


class Connection:
    """One client session over TCP (STARTTLS) or WebSocket; elements during login, raw text
    (stanza bytes) in the timed phase."""

    def __init__(self, account, plan, transport):
        self.jid = account["jid"]
        self.local, self.domain = self.jid.split("@")
        self.password = account["password"]
        self.plan = plan
        self.transport = transport
        self.reader = self.writer = None
        self.parser = None
        self.depth = 0
        self.queue = collections.deque()
        self.buffer = b""       # WebSocket: bytes not yet framed
        self.fragments = []     # WebSocket: a message in fragments
        self.closed = None

    # -- framing --------------------------------------------------------------------------

    def send(self, text):
        data = text.encode()
        self.writer.write(ws_frame(1, data) if self.transport == "ws" else data)

    def send_many(self, texts):
        if self.transport == "ws":
            self.writer.write(b"".join(ws_frame(1, t.encode()) for t in texts))
        else:
            self.writer.write("".join(texts).encode())

    def ws_messages(self, data):
        """Complete text messages in DATA (plus what was buffered); answers pings, notes closes."""
        self.buffer += data
        out = []
        buffer = self.buffer
        position = 0
        while True:
            if len(buffer) - position < 2:
                break
            b0, b1 = buffer[position], buffer[position + 1]
            n = b1 & 0x7F
            header = 2
            if n == 126:
                if len(buffer) - position < 4:
                    break
                n = int.from_bytes(buffer[position + 2:position + 4], "big")
                header = 4
            elif n == 127:
                if len(buffer) - position < 10:
                    break
                n = int.from_bytes(buffer[position + 2:position + 10], "big")
                header = 10
            masked = b1 & 0x80
            if masked:
                header += 4
            if len(buffer) - position < header + n:
                break
            payload = buffer[position + header:position + header + n]
            if masked:
                payload = mask(payload, buffer[position + header - 4:position + header])
            position += header + n
            opcode, final = b0 & 0x0F, b0 & 0x80
            if opcode in (0, 1, 2):
                self.fragments.append(payload)
                if final:
                    out.append(b"".join(self.fragments))
                    self.fragments = []
            elif opcode == 8:
                self.closed = self.closed or f"close frame {payload[:2].hex()} {payload[2:200]!r}"
            elif opcode == 9:
                self.writer.write(ws_frame(10, payload))
        self.buffer = buffer[position:]
        return out

    def feed(self, data):
        """Login phase: elements into the queue."""
        if self.transport == "ws":
            for message in self.ws_messages(data):
                self.queue.append(ET.fromstring(message))
            return
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 1:
                    self.queue.append(element)

    async def element(self, deadline):
        while not self.queue:
            if self.closed:
                raise LoginError(f"{self.jid}: {self.closed}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoginError(f"{self.jid}: no answer before the login timeout")
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except asyncio.TimeoutError:
                raise LoginError(f"{self.jid}: no answer before the login timeout") from None
            if not data:
                raise LoginError(f"{self.jid}: the server closed the connection")
            self.feed(data)
        return self.queue.popleft()

    async def open_stream(self, deadline):
        """Opens (or restarts) the stream; returns the features element."""
        if self.transport == "ws":
            self.send(f"<open xmlns='{FRAMING}' to='{self.domain}' version='1.0'/>")
        else:
            self.parser = ET.XMLPullParser(events=("start", "end"))
            self.depth = 0
            self.queue.clear()
            self.send(f"<?xml version='1.0'?><stream:stream to='{self.domain}' xmlns='jabber:client' "
                      "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
        while True:
            element = await self.element(deadline)
            tag = element.tag.split("}")[-1]
            if tag == "open":
                continue
            if tag != "features":
                raise LoginError(f"{self.jid}: expected stream features, got {element.tag}: "
                                 f"{ET.tostring(element)[:300]!r}")
            return element

    async def until_id(self, ident, deadline):
        while True:
            element = await self.element(deadline)
            if element.get("id") == ident:
                return element

    # -- login ----------------------------------------------------------------------------

    async def connect(self, context, timeout):
        deadline = time.monotonic() + timeout
        host = self.plan["host"]
        if self.transport == "ws":
            ws = self.plan["ws"]
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(host, ws["port"], ssl=context, server_hostname=self.domain), timeout)
            key = base64.b64encode(os.urandom(16)).decode()
            self.writer.write((f"GET {ws['path']} HTTP/1.1\r\nHost: {self.domain}:{ws['port']}\r\n"
                               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                               "Sec-WebSocket-Protocol: xmpp\r\n\r\n").encode())
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), max(0.1, deadline - time.monotonic()))
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if " 101 " not in lines[0] + " ":
                raise LoginError(f"{self.jid}: WebSocket upgrade refused: {lines[0]}")
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            if headers.get("sec-websocket-accept") != accept:
                raise LoginError(f"{self.jid}: bad Sec-WebSocket-Accept {headers.get('sec-websocket-accept')}")
            if headers.get("sec-websocket-protocol", "").lower() != "xmpp":
                raise LoginError(f"{self.jid}: subprotocol {headers.get('sec-websocket-protocol')!r}, not xmpp")
            features = await self.open_stream(deadline)
        else:
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, self.plan["tcp_port"]), timeout)
            features = await self.open_stream(deadline)
            if features.find(f"{{{TLS_NS}}}starttls") is None:
                raise LoginError(f"{self.jid}: no STARTTLS offered")
            self.send(f"<starttls xmlns='{TLS_NS}'/>")
            if not (await self.element(deadline)).tag.endswith("proceed"):
                raise LoginError(f"{self.jid}: STARTTLS refused")
            await self.writer.start_tls(context, server_hostname=self.domain)
            features = await self.open_stream(deadline)
        self.writer.transport.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY
        mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + self.local.encode() + b"\0" + self.password.encode()).decode()
            self.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
            outcome = await self.element(deadline)
            self.mechanism = "PLAIN"
        elif "SCRAM-SHA-1" in mechanisms:
            outcome = await self.scram(deadline)
            self.mechanism = "SCRAM-SHA-1"
        else:
            raise LoginError(f"{self.jid}: neither PLAIN nor SCRAM-SHA-1 offered ({mechanisms})")
        if not outcome.tag.endswith("success"):
            raise LoginError(f"{self.jid}: authentication failed: {ET.tostring(outcome)[:200]!r}")
        await self.open_stream(deadline)
        self.send("<iq type='set' id='bind1' xmlns='jabber:client'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  "<resource>bench</resource></bind></iq>")
        if (await self.until_id("bind1", deadline)).get("type") != "result":
            raise LoginError(f"{self.jid}: bind failed")
        self.send("<iq type='set' id='sess1' xmlns='jabber:client'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        await self.until_id("sess1", deadline)
        self.send("<presence xmlns='jabber:client'/>")

    async def scram(self, deadline):
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={self.local},r={nonce}"
        self.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'>{base64.b64encode(('n,,' + first_bare).encode()).decode()}</auth>")
        challenge = await self.element(deadline)
        if not challenge.tag.endswith("challenge"):
            return challenge
        server_first = base64.b64decode(challenge.text or "").decode()
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha1", self.password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", "sha1").digest()
        without_proof = f"c=biws,r={fields['r']}"
        message = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(hashlib.sha1(client_key).digest(), message, "sha1").digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
        final = base64.b64encode(f"{without_proof},p={proof}".encode()).decode()
        self.send(f"<response xmlns='{SASL}'>{final}</response>")
        return await self.element(deadline)

    async def close(self):
        if self.writer is None:
            return
        try:
            if self.transport == "ws":
                self.send(f"<close xmlns='{FRAMING}'/>")
                self.writer.write(ws_frame(8, (1000).to_bytes(2, "big")))
            else:
                self.send("</stream:stream>")
            await asyncio.wait_for(self.writer.drain(), 2)
            self.writer.close()
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass


# -- messages ------------------------------------------------------------------------------

class Side:
    """One account of a pair: sends to its partner, counts what it reads."""

    def __init__(self, connection, number):
        self.c = connection
        self.number = number
        self.partner = None
        self.seq = 0
        self.sent = 0
        self.received = 0
        self.tail = b""
        self.errors = collections.Counter()

    def send(self, count, run):
        if count <= 0 or not run.sending:
            return
        to = self.partner.c.jid
        now = time.monotonic_ns()
        texts = []
        for _ in range(count):
            self.seq += 1
            texts.append(f"<message xmlns='jabber:client' to='{to}' type='chat' id='w{self.number}x{self.seq}'>"
                         f"<body>web bench: an ordinary chat message, about sixty bytes long wbk{self.seq}t{now}k</body></message>")
        self.sent += count
        self.c.send_many(texts)

    def scan(self, data, run):
        """Counts the tokens in DATA (stanza bytes), lets the partner send as many more."""
        buffer = self.tail + data if self.tail else data
        cut = buffer.rfind(b">") + 1
        now = time.monotonic_ns()
        chunk = buffer[:cut]
        found = 0
        for match in TOKEN.finditer(chunk):
            found += 1
            if run.counting:
                run.window_received += 1
                run.histogram[int((now - int(match.group(2))) // 100_000)] += 1
        if b"error" in chunk:
            for match in ERROR_TYPE.finditer(chunk):
                self.errors[match.group(1).decode() + ":error"] += 1
        if b"stream:error" in chunk or b"</stream:stream>" in chunk or (b"<close" in chunk and FRAMING.encode() in chunk):
            self.errors["stream:closed"] += 1
        self.tail = buffer[cut:]
        self.received += found
        self.partner.send(found, run)

    async def pump(self, run):
        c = self.c
        try:
            while True:
                data = await c.reader.read(262144)
                if not data:
                    c.closed = c.closed or "closed by the server"
                    break
                if c.transport == "ws":
                    messages = c.ws_messages(data)
                    if messages:
                        self.scan(b"".join(messages), run)
                else:
                    self.scan(data, run)
                if c.closed:
                    break
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as error:
            c.closed = c.closed or repr(error)[:200]
        except asyncio.CancelledError:
            pass


class Run:
    def __init__(self):
        self.sending = True
        self.counting = False
        self.window_received = 0
        self.histogram = collections.Counter()
        self.cpu = []


async def worker_main(conn, plan, accounts, first_number):
    context = tls_context()
    transport = plan["transport"]
    connections = [Connection(a, plan, transport) for a in accounts]
    started = time.monotonic()
    results = await asyncio.gather(*(c.connect(context, plan["login_timeout"]) for c in connections),
                                   return_exceptions=True)
    failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
    mechanisms = collections.Counter(getattr(c, "mechanism", None) for c in connections)
    login_seconds = time.monotonic() - started
    sides = [Side(c, first_number + i) for i, c in enumerate(connections)]
    for i in range(0, len(sides) - 1, 2):
        sides[i].partner, sides[i + 1].partner = sides[i + 1], sides[i]
    # Let the presences and whatever the servers send after login arrive before the timing.
    for c in connections:
        c.queue.clear()
    conn.send({"ready": not failures, "failures": failures[:5], "login_seconds": round(login_seconds, 3),
               "mechanisms": {str(k): v for k, v in mechanisms.items()}})
    order = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    if order.get("stop"):
        for c in connections:
            await c.close()
        return
    run = Run()
    loop = asyncio.get_running_loop()
    # monotonic stamps from the coordinator; the loop's clock is time.monotonic()
    tasks = [asyncio.ensure_future(s.pump(run)) for s in sides]
    await asyncio.sleep(max(0.0, order["start"] - time.monotonic()))
    for s in sides:
        s.send(plan["window"], run)
    await asyncio.sleep(max(0.0, order["window_start"] - time.monotonic()))
    run.counting = True
    cpu_start = cpu_self()
    await asyncio.sleep(max(0.0, order["window_end"] - time.monotonic()))
    run.counting = False
    cpu_window = cpu_self() - cpu_start
    run.sending = False
    drain_deadline = time.monotonic() + plan["drain_timeout"]
    while time.monotonic() < drain_deadline:
        if all(s.received >= s.partner.sent or s.c.closed for s in sides):
            break
        await asyncio.sleep(0.05)
    drained = all(s.received >= s.partner.sent for s in sides)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = collections.Counter()
    for s in sides:
        errors.update(s.errors)
    closed = [f"{s.c.jid}: {s.c.closed}" for s in sides if s.c.closed]
    for c in connections:
        await c.close()
    conn.send({"window_received": run.window_received, "histogram": dict(run.histogram),
               "sent": sum(s.sent for s in sides), "received": sum(s.received for s in sides),
               "lost": sum(max(0, s.partner.sent - s.received) for s in sides), "drained": drained,
               "errors": dict(errors), "closed": closed[:5], "closed_count": len(closed),
               "driver_cpu_seconds": round(cpu_window, 3)})


def worker_process(conn, plan, accounts, first_number):
    try:
        asyncio.run(worker_main(conn, plan, accounts, first_number))
    except Exception as error:  # noqa: BLE001 - reported to the coordinator
        traceback.print_exc()
        try:
            conn.send({"error": f"{type(error).__name__}: {error}"})
        except OSError:
            pass


def machine_busy_seconds():
    """CPU seconds all cores spent running processes since boot (/proc/stat user + nice +
    system; interrupt and softirq time, which loopback traffic causes, is not counted)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:4]]
    return sum(fields) / os.sysconf("SC_CLK_TCK")


def percentile_from_histogram(histogram, fraction):
    total = sum(histogram.values())
    if not total:
        return None
    rank = fraction * (total - 1)
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen > rank:
            return (bucket + 0.5) / 10.0  # ms
    return None


def messages(plan):
    pairs = plan["pairs"]
    accounts = plan["accounts"][:2 * pairs]
    processes = max(1, min(plan.get("processes", 1), pairs))
    per = -(-pairs // processes)
    context = multiprocessing.get_context("fork")
    workers = []
    for p in range(processes):
        chunk = accounts[2 * per * p:2 * per * (p + 1)]
        if not chunk:
            continue
        parent, child = context.Pipe()
        process = context.Process(target=worker_process, args=(child, plan, chunk, 2 * per * p), daemon=True)
        process.start()
        workers.append((process, parent))
    out = {"transport": plan["transport"], "pairs": pairs, "window": plan["window"], "processes": len(workers)}
    limit = time.monotonic() + plan["login_timeout"] + 30
    ready = []
    for process, parent in workers:
        if not parent.poll(max(0.1, limit - time.monotonic())):
            ready.append({"error": "no answer from a worker after the logins"})
        else:
            ready.append(parent.recv())
    out["login_seconds"] = max((r.get("login_seconds") or 0) for r in ready)
    out["mechanisms"] = dict(sum((collections.Counter(r.get("mechanisms") or {}) for r in ready), collections.Counter()))
    failures = [f for r in ready for f in (r.get("failures") or [])] + [r["error"] for r in ready if r.get("error")]
    if failures or not all(r.get("ready") for r in ready):
        out["error"] = "login failed: " + "; ".join(failures[:5])
        for process, parent in workers:
            try:
                parent.send({"stop": True})
            except OSError:
                pass
        for process, _ in workers:
            process.join(10)
        return out
    start = time.monotonic() + 0.5
    order = {"start": start, "window_start": start + plan["warmup"], "window_end": start + plan["warmup"] + plan["seconds"]}
    for _, parent in workers:
        parent.send(order)
    pids = plan["server_pids"]
    time.sleep(max(0.0, order["window_start"] - time.monotonic()))
    cpu0, busy0 = cpu_seconds(pids), machine_busy_seconds()
    time.sleep(max(0.0, order["window_end"] - time.monotonic()))
    cpu1, busy1 = cpu_seconds(pids), machine_busy_seconds()
    with open("/proc/loadavg") as handle:
        load = [float(x) for x in handle.read().split()[:3]]
    results = []
    limit = time.monotonic() + plan["drain_timeout"] + 30
    for process, parent in workers:
        if parent.poll(max(0.1, limit - time.monotonic())):
            results.append(parent.recv())
        else:
            results.append({"error": "no result from a worker"})
    for process, _ in workers:
        process.join(10)
    histogram = collections.Counter()
    for r in results:
        histogram.update({int(k): v for k, v in (r.get("histogram") or {}).items()})
    window_received = sum(r.get("window_received") or 0 for r in results)
    errors = collections.Counter()
    for r in results:
        errors.update(r.get("errors") or {})
    out.update({
        "seconds": plan["seconds"], "warmup": plan["warmup"],
        "window_received": window_received,
        "delivered_per_second": round(window_received / plan["seconds"], 1),
        "p50_ms": percentile_from_histogram(histogram, 0.5), "p99_ms": percentile_from_histogram(histogram, 0.99),
        "sent": sum(r.get("sent") or 0 for r in results), "received": sum(r.get("received") or 0 for r in results),
        "lost": sum(r.get("lost") or 0 for r in results), "drained": all(r.get("drained") for r in results),
        "errors": dict(errors), "closed": [c for r in results for c in (r.get("closed") or [])][:5],
        "closed_count": sum(r.get("closed_count") or 0 for r in results),
        "server_cpu_seconds": round(cpu1 - cpu0, 3),
        "driver_cpu_seconds": round(sum(r.get("driver_cpu_seconds") or 0 for r in results), 3),
        "machine_busy_seconds": round(busy1 - busy0, 2), "load_average_at_window_end": load,
    })
    # What neither the server nor the driver used: someone else's work on the machine.
    out["other_cpu_seconds"] = round(out["machine_busy_seconds"] - out["server_cpu_seconds"] - out["driver_cpu_seconds"], 2)
    if out["server_cpu_seconds"] > 0:
        out["messages_per_server_cpu_second"] = round(window_received / out["server_cpu_seconds"], 1)
    worker_errors = [r["error"] for r in results if r.get("error")]
    if worker_errors:
        out["error"] = "; ".join(worker_errors)[:600]
    elif not window_received:
        out["error"] = "no message delivered in the window"
    elif out["lost"] or not out["drained"]:
        out["error"] = f"{out['lost']} messages not delivered within {plan['drain_timeout']} s after sending stopped"
    elif out["closed_count"]:
        out["error"] = f"{out['closed_count']} streams closed: {out['closed'][:2]}"
    return out


# -- upload --------------------------------------------------------------------------------

class RssPeak(threading.Thread):
    def __init__(self, pids, interval):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.peak = max(self.peak, rss_kib(self.pids))
            self.samples += 1
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(5)
        self.peak = max(self.peak, rss_kib(self.pids))
        return self.peak


def http_request(method, url, headers, body, size, timeout, context, compare=None):
    """(status, seconds, bytes read, mismatch offset or None, answer head) for one request."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=context)
    path = parts.path + (("?" + parts.query) if parts.query else "")
    started = time.monotonic()
    connection.putrequest(method, path)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body is not None:
        connection.putheader("Content-Length", str(size))
    connection.endheaders()
    if body is not None:
        view = memoryview(body)
        step = 256 * 1024
        for offset in range(0, size, step):
            connection.send(view[offset:offset + step])
    response = connection.getresponse()
    read = 0
    mismatch = None
    text = b""
    step = 1024 * 1024
    while True:
        chunk = response.read(step)
        if not chunk:
            break
        if compare is not None and response.status == 200:
            if mismatch is None and bytes(compare[read:read + len(chunk)]) != chunk:
                mismatch = read
        elif len(text) < 400:
            text += chunk[:400]
        read += len(chunk)
    seconds = time.monotonic() - started
    connection.close()
    return response.status, seconds, read, mismatch, text.decode("utf-8", "replace")[:300]


async def request_slot(c, number, size, service, deadline):
    ident = f"slot{number}"
    c.send(f"<iq xmlns='jabber:client' type='get' to='{service}' id='{ident}'><request xmlns='{UPLOAD}' "
           f"filename='bench-{number}.bin' size='{size}' content-type='application/octet-stream'/></iq>")
    answer = await c.until_id(ident, deadline)
    if answer.get("type") != "result":
        raise RuntimeError(f"slot refused: {ET.tostring(answer)[:400]!r}")
    slot = answer.find(f"{{{UPLOAD}}}slot")
    put, get = slot.find(f"{{{UPLOAD}}}put"), slot.find(f"{{{UPLOAD}}}get")
    headers = {h.get("name"): (h.text or "") for h in put.findall(f"{{{UPLOAD}}}header")}
    return put.get("url"), get.get("url"), headers


async def upload(plan):
    u = plan["upload"]
    context = tls_context()
    c = Connection(plan["accounts"][0], plan, "tcp")
    await c.connect(context, plan["login_timeout"])
    pids = plan["server_pids"]
    transfers = []
    number = 0
    for size, repetitions in u["transfers"]:
        for repetition in range(repetitions):
            number += 1
            entry = {"bytes": size, "repetition": repetition + 1}
            transfers.append(entry)
            try:
                data = os.urandom(size)
                put_url, get_url, headers = await request_slot(c, number, size, u["service"],
                                                               time.monotonic() + plan["login_timeout"])
                entry.update({"put_url": put_url, "get_url": get_url, "slot_headers": sorted(headers)})
                headers = dict(headers, **{"Content-Type": "application/octet-stream"})
                entry["rss_before_kib"] = rss_kib(pids)
                sampler = RssPeak(pids, u["rss_interval"])
                cpu0 = cpu_seconds(pids)
                sampler.start()
                status, seconds, _, _, text = await asyncio.to_thread(
                    http_request, "PUT", put_url, headers, data, size, u["http_timeout"], context)
                entry["put_peak_rss_kib"] = sampler.stop()
                entry["put_server_cpu_seconds"] = round(cpu_seconds(pids) - cpu0, 3)
                entry.update({"put_status": status, "put_seconds": round(seconds, 4),
                              "put_mb_per_second": round(size / seconds / 1e6, 2)})
                if status not in (200, 201):
                    raise RuntimeError(f"PUT answered {status}: {text}")
                entry["rss_between_kib"] = rss_kib(pids)
                sampler = RssPeak(pids, u["rss_interval"])
                cpu0 = cpu_seconds(pids)
                sampler.start()
                status, seconds, read, mismatch, text = await asyncio.to_thread(
                    http_request, "GET", get_url, {}, None, 0, u["http_timeout"], context, data)
                entry["get_peak_rss_kib"] = sampler.stop()
                entry["get_server_cpu_seconds"] = round(cpu_seconds(pids) - cpu0, 3)
                entry.update({"get_status": status, "get_seconds": round(seconds, 4),
                              "get_mb_per_second": round(size / seconds / 1e6, 2), "get_bytes": read,
                              "rss_samples": sampler.samples})
                if status != 200:
                    raise RuntimeError(f"GET answered {status}: {text}")
                if read != size or mismatch is not None:
                    raise RuntimeError(f"GET returned {read} bytes of {size}"
                                       + (f", first difference in the chunk at {mismatch}" if mismatch is not None else ""))
                entry["verified"] = True
                entry["rss_after_kib"] = rss_kib(pids)
            except Exception as error:  # noqa: BLE001 - a failed transfer is a result
                entry["error"] = f"{type(error).__name__}: {str(error)[:400]}"
                log(f"transfer {number} ({size} bytes): {entry['error']}")
            log(f"transfer {number}: {json.dumps({k: v for k, v in entry.items() if k not in ('put_url', 'get_url')})}")
    await c.close()
    return {"transfers": transfers}


def main():
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    try:
        if plan["mode"] == "messages":
            result = messages(plan)
        else:
            result = asyncio.run(upload(plan))
    except Exception as error:  # noqa: BLE001 - the coordinator records it
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
