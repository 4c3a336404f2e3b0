#!/usr/bin/python3
"""The clients of the message-archive benchmark (XEP-0313), for bench/mam.py.

Usage: mamdriver.py PLAN.json   (prints one JSON object on stdout; progress on stderr)

PLAN: {"accounts": [{"jid", "password"}...], "host", "port",
       "steps": [archived rows...] (may be empty), "populate_limit": s, "window": W,
       "queries": Q, "page": 50,
       "throughput": null or {"rate": msg/s, "seconds": T, "window": W, "saturate_seconds": T2},
       "server_pids": [...], "db": null or {"path", "count_sql"}, "login_timeout": s}

Every account is a real client session (STARTTLS, SASL PLAIN inside TLS, bind, session,
initial presence: mucdriver.Occupant's login), all in this one process, served by one epoll
loop over non-blocking TLS sockets (mucdriver.Worker's read and flush). Message k goes from
account s = k mod N to its neighbour, (s + 1) mod N on even rounds and (s - 1) mod N on odd
ones (round = k div N): every account sends as many messages as it receives and talks with
two contacts, so a query by `with` has pages to fill. A message between two local accounts
is archived twice, in the sender's archive and in the recipient's: "archived rows" are
those copies, 2 per message (checked by counting the rows in the server's database).

Phases:
  populate  for each step, messages are sent until the archives hold (about) that many rows,
            with at most W messages in flight (sent, not yet received), as fast as the
            server takes them; each step stops at the overall time limit (populate_limit),
            and then the step is reported with what it reached. Then the driver waits until
            every message has arrived (or nothing arrives for 10 s).
  query     Q MAM queries (urn:xmpp:mam:2), one at a time, from the sessions already logged
            in, cycling over four kinds, each asking for a page of 50 (RSM max 50):
              latest  the last page (RSM <before/>);
              with    the last page with one contact (form field `with`, <before/>);
              start   the first page after the middle of the archive (form field `start`:
                      the time when half of the messages so far had been sent);
              before  the page before that one (RSM <before>first id of the start page</before>,
                      no form: the 50 messages before the middle).
            Latency: from the send of the query to the arrival (read from the socket) of the
            <iq type='result'> that ends it, after the 50 forwarded results; the bytes are
            parsed only after the timing.
  throughput  a fixed offered rate (rate msg/s for T s; latency from the send stamp in the
            body to the read at the receiver), then a saturating run (W messages in flight
            for T2 s: delivered messages/s). Server CPU seconds (server_pids, /proc) and the
            driver's own CPU over each window.
"""

import collections
import json
import os
import re
import select
import selectors
import sqlite3
import ssl
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_seconds, rss_kib  # noqa: E402
from mucdriver import Occupant, Worker, cpu_self, histogram_percentile, percentile  # noqa: E402

MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
TOKEN = re.compile(rb"mam(\d+)t(\d+)q")
ERROR_MESSAGE = re.compile(rb"<message\b[^>]*\btype=['\"]error['\"]")
KINDS = ["latest", "with", "start", "before"]
QUIET = 10.0


def log(message):
    print(f"[mamdriver {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Client(Occupant):
    """One account's session; counts the benchmark's messages it receives."""

    def __init__(self, index, account, plan, driver):
        super().__init__(index, account, plan)
        self.driver = driver
        self.bounced = 0

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
                if start >= 0 and ERROR_MESSAGE.match(buffer, start):
                    self.bounced += 1
                    continue
            self.driver.arrived(now, int(match.group(2)))
        self.tail = buffer[cut:]


class Driver(Worker):
    def __init__(self, plan):
        plan = dict(plan, room="none")  # Occupant wants a room; there is none here
        super().__init__(None, [], 0, plan)
        self.clients = [Client(i, a, plan, self) for i, a in enumerate(plan["accounts"])]
        self.by_index = {c.index: c for c in self.clients}
        self.n = len(self.clients)
        self.domain = self.clients[0].domain
        self.sent = 0
        self.delivered = 0
        self.last_arrival = None
        self.histogram = None  # {100 µs bucket: count} while timing
        self.progress = []     # (messages sent, wall time), for the middle of the archive
        self.query_number = 0

    # -- messages ---------------------------------------------------------------------------

    def arrived(self, now_ns, stamp_ns):
        self.delivered += 1
        self.last_arrival = now_ns
        if self.histogram is not None:
            self.histogram[int((now_ns - stamp_ns) // 100_000)] += 1

    def partner(self, k):
        s = k % self.n
        return s, ((s + 1) if (k // self.n) % 2 == 0 else (s - 1)) % self.n

    def send_next(self):
        k = self.sent
        s, r = self.partner(k)
        client = self.clients[s]
        client.send(f"<message to='{self.clients[r].jid}' type='chat' id='m{k}'><body>mam bench {k}: "
                    f"an ordinary chat message, about sixty bytes long mam{k}t{time.monotonic_ns()}q</body></message>")
        self.flush(client)
        self.sent += 1
        if self.sent % 500 == 0:
            self.progress.append((self.sent, time.time()))

    def pump(self, timeout):
        for client in self.clients:
            if client.dropped is None and client.sock.pending():
                self.read(client)
        for key, mask in self.selector.select(timeout):
            client = key.data
            if mask & selectors.EVENT_READ:
                self.read(client)
            if mask & selectors.EVENT_WRITE:
                self.flush(client)

    def drain(self, limit):
        """Until every message sent has arrived, nothing arrived for QUIET s, or LIMIT s."""
        deadline = time.monotonic() + limit
        while self.delivered < self.sent and time.monotonic() < deadline:
            self.pump(0.05)
            if self.last_arrival and time.monotonic_ns() - self.last_arrival > QUIET * 1e9:
                break
        return self.delivered >= self.sent

    def send_window(self, target, window, deadline):
        """Sends until SENT reaches TARGET (or the deadline), WINDOW messages in flight."""
        stalled_since = None
        while self.sent < target and time.monotonic() < deadline:
            room = min(window - (self.sent - self.delivered), target - self.sent)
            for _ in range(max(0, room)):
                self.send_next()
            before = self.delivered
            self.pump(0.01)
            if self.delivered == before and room <= 0:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > QUIET:
                    return "stalled: nothing arrived for 10 s with the window full"
            else:
                stalled_since = None
        return None

    def errors(self):
        return {"bounced": sum(c.bounced for c in self.clients), "dropped": [c.dropped for c in self.clients if c.dropped][:5]}

    # -- the archive in the database --------------------------------------------------------

    def database(self):
        db = self.plan.get("db")
        if not db:
            return {}
        figures = {"db_bytes": sum(os.path.getsize(db["path"] + suffix) for suffix in ("", "-wal")
                                   if os.path.exists(db["path"] + suffix))}
        try:
            connection = sqlite3.connect(f"file:{db['path']}?mode=ro", uri=True, timeout=60)
            try:
                figures["archived_rows"] = connection.execute(db["count_sql"]).fetchone()[0]
            finally:
                connection.close()
        except sqlite3.Error as error:
            figures["count_error"] = str(error)
        return figures

    # -- queries ----------------------------------------------------------------------------

    def middle_time(self):
        half = self.sent / 2
        return next((wall for sent, wall in self.progress if sent >= half), time.time())

    def query(self, client, kind, middle, first_id):
        """One query, timed to its final <iq/>; returns (ms, figures)."""
        self.query_number += 1
        n = self.query_number
        fields = []
        rsm = "<max>%d</max>" % self.plan["page"]
        if kind in ("latest", "with"):
            rsm += "<before/>"
        if kind == "with":
            partner = self.clients[(client.index + 1) % self.n]
            fields.append(f"<field var='with'><value>{partner.jid}</value></field>")
        if kind == "start":
            stamp = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(middle)) + f".{int(middle * 1000) % 1000:03d}Z"
            fields.append(f"<field var='start'><value>{stamp}</value></field>")
        if kind == "before":
            rsm += f"<before>{first_id}</before>"
        form = ""
        if fields:
            form = (f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>"
                    + "".join(fields) + "</x>")
        text = (f"<iq type='set' id='i{n}z'><query xmlns='{MAM}' queryid='mq{n}x'>{form}"
                f"<set xmlns='{RSM}'>{rsm}</set></query></iq>")
        end = re.compile(rb"<iq\b[^>]*\bid=['\"]i%dz['\"]" % n)
        buffer = bytearray()
        started = time.monotonic_ns()
        client.send(text)
        self.flush(client)
        deadline = time.monotonic() + 60
        stamp = None
        while stamp is None and time.monotonic() < deadline:
            if not client.sock.pending():
                select.select([client.sock], [], [], 0.5)
            while True:
                try:
                    data = client.sock.recv(262144)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                if not data:
                    raise ConnectionError(f"{client.jid}: the server closed the connection")
                now = time.monotonic_ns()
                look = max(0, len(buffer) - 300)
                buffer += data
                if end.search(buffer, look):
                    stamp = now
                    break
        if stamp is None:
            return None, {"error": "no answer in 60 s"}
        # The rest of the final <iq/> (its <fin/>), after the timing.
        while b"</iq>" not in buffer[end.search(buffer).start():] and time.monotonic() < deadline:
            if not client.sock.pending():
                select.select([client.sock], [], [], 0.5)
            try:
                data = client.sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            if not data:
                break
            buffer += data
        tail = bytes(buffer[end.search(buffer).start():])
        figures = {"results": len(re.findall(rb"<result\b", buffer)),
                   "error": "iq error" if re.match(rb"<iq\b[^>]*\btype=['\"]error['\"]", tail) else None}
        first = re.search(rb"<first\b[^>]*>([^<]+)</first>", tail)
        count = re.search(rb"<count>(\d+)</count>", tail)
        figures["first"] = first.group(1).decode() if first else None
        figures["count"] = int(count.group(1)) if count else None
        if figures["error"]:
            figures["error"] += ": " + tail[:300].decode(errors="replace")
        return (stamp - started) / 1e6, figures

    def query_phase(self, count):
        middle = self.middle_time()
        latencies = collections.defaultdict(list)
        results = collections.defaultdict(list)
        counts = []
        errors = []
        first_ids = {}
        for q in range(count):
            kind = KINDS[q % len(KINDS)]
            client = self.clients[((q // len(KINDS)) * 37) % self.n]
            if kind == "before" and not first_ids.get(client.index):
                errors.append(f"{client.jid}: no first id from the start page")
                continue
            ms, figures = self.query(client, kind, middle, first_ids.get(client.index))
            if ms is None or figures.get("error"):
                errors.append(f"{kind} {client.jid}: {figures.get('error')}"[:300])
                continue
            if kind == "start":
                first_ids[client.index] = figures["first"]
            latencies[kind].append(ms)
            results[kind].append(figures["results"])
            if kind == "latest" and figures["count"] is not None:
                counts.append(figures["count"])
        every = [x for values in latencies.values() for x in values]

        def summary(values):
            return {"n": len(values), "p50_ms": round(percentile(values, 50), 3) if values else None,
                    "p99_ms": round(percentile(values, 99), 3) if values else None,
                    "max_ms": round(max(values), 3) if values else None}
        out = {"all": summary(every), "middle_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(middle)),
               "errors": len(errors), "first_errors": errors[:5],
               "rsm_count_median": percentile(counts, 50) if counts else None}
        for kind in KINDS:
            out[kind] = summary(latencies[kind])
            out[kind]["mean_results"] = round(sum(results[kind]) / len(results[kind]), 1) if results[kind] else None
            out[kind]["full_pages"] = sum(1 for r in results[kind] if r >= self.plan["page"])
        return out

    # -- throughput ---------------------------------------------------------------------------

    def window_figures(self, sent0, delivered0, cpu0, own0, started_ns, seconds):
        pids = self.plan.get("server_pids", [])
        window = ((self.last_arrival or time.monotonic_ns()) - started_ns) / 1e9
        delivered = self.delivered - delivered0
        server_cpu = cpu_seconds(pids) - cpu0
        own = cpu_self() - own0
        return {"sent": self.sent - sent0, "delivered": delivered, "lost": (self.sent - sent0) - delivered,
                "send_seconds": seconds, "window_seconds": round(window, 3),
                "delivered_per_second": round(delivered / window, 1) if window > 0 else None,
                "latency_p50_ms": histogram_percentile(self.histogram, 50),
                "latency_p99_ms": histogram_percentile(self.histogram, 99),
                "server_cpu_seconds": round(server_cpu, 3),
                "messages_per_cpu_second": round(delivered / server_cpu, 1) if server_cpu > 0 else None,
                "server_cores_busy": round(server_cpu / window, 3) if window > 0 else None,
                "driver_cpu_seconds": round(own, 3),
                "driver_share": round(own / window, 3) if window > 0 else None}

    def fixed_rate(self, rate, seconds):
        pids = self.plan.get("server_pids", [])
        sent0, delivered0, cpu0, own0 = self.sent, self.delivered, cpu_seconds(pids), cpu_self()
        self.histogram = collections.Counter()
        started = time.monotonic_ns()
        total = int(rate * seconds)
        while self.sent - sent0 < total:
            due = min(total, int((time.monotonic_ns() - started) / 1e9 * rate) + 1)
            while self.sent - sent0 < due:
                self.send_next()
            self.pump(0.002)
        complete = self.drain(30)
        figures = self.window_figures(sent0, delivered0, cpu0, own0, started, seconds)
        figures.update({"offered_per_second": rate, "complete": complete})
        self.histogram = None
        return figures

    def saturate(self, window, seconds):
        pids = self.plan.get("server_pids", [])
        backlog = self.sent - self.delivered  # left over from the fixed rate, if it was not all delivered
        sent0, delivered0, cpu0, own0 = self.sent, self.delivered, cpu_seconds(pids), cpu_self()
        self.histogram = collections.Counter()
        started = time.monotonic_ns()
        stalled = self.send_window(float("inf"), window, time.monotonic() + seconds)
        complete = self.drain(30)
        figures = self.window_figures(sent0, delivered0, cpu0, own0, started, seconds)
        figures.update({"window": window, "complete": complete, "stalled": stalled, "backlog_at_start": backlog})
        if backlog:
            # The backlog's late arrivals are counted as delivered here; its messages fill the window.
            figures["lost"] = (self.sent - sent0) + backlog - (self.delivered - delivered0)
        self.histogram = None
        return figures

    # -- the run ------------------------------------------------------------------------------

    def run(self, result):
        plan = self.plan
        pids = plan.get("server_pids", [])
        login = self.login_all(plan.get("login_timeout", 60))
        result["login"] = login
        if login["failed"]:
            result["error"] = f"{login['failed']} logins failed: {login['failures'][:3]}"
            return
        self.selector = selectors.EpollSelector()
        for client in self.clients:
            client.scan = True
            self.selector.register(client.sock, selectors.EVENT_READ, client)
        # The initial presences' answers, before anything is counted.
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            self.pump(0.05)
        result["rss_after_login_kib"] = rss_kib(pids)

        result["steps"] = []
        started = time.monotonic()
        deadline = started + plan.get("populate_limit", 600)
        for rows in plan.get("steps", []):
            step = {"target_rows": rows}
            if time.monotonic() >= deadline:
                step["not_started"] = f"the population time limit ({plan.get('populate_limit')} s) was used up"
                result["steps"].append(step)
                break
            result["steps"].append(step)
            cpu0, t0, sent0 = cpu_seconds(pids), time.monotonic(), self.sent
            log(f"populating to {rows:,} archived rows ({rows // 2:,} messages)")
            stalled = self.send_window(rows // 2, plan["window"], deadline)
            complete = self.drain(120)
            seconds = time.monotonic() - t0
            step.update({"messages_sent": self.sent, "messages_delivered": self.delivered,
                         "reached": self.sent >= rows // 2, "all_delivered": complete, "stalled": stalled,
                         "populate_seconds": round(seconds, 2),
                         "populate_messages_per_second": round((self.sent - sent0) / seconds, 1) if seconds > 0 else None,
                         "populate_server_cpu_seconds": round(cpu_seconds(pids) - cpu0, 2),
                         "elapsed_populating_seconds": round(time.monotonic() - started, 1),
                         "rss_kib": rss_kib(pids), **self.database(), **self.errors()})
            log(f"step {rows:,}: {json.dumps({k: v for k, v in step.items() if k != 'queries'})}")
            if self.sent == 0:
                break
            step["queries"] = self.query_phase(plan["queries"])
            log(f"queries at {self.sent * 2:,} messages' rows: {json.dumps(step['queries']['all'])}, errors {step['queries']['errors']}")
            if not step["reached"] or stalled:
                break

        t = plan.get("throughput")
        if t:
            log(f"fixed rate {t['rate']} msg/s for {t['seconds']} s")
            result["fixed"] = self.fixed_rate(t["rate"], t["seconds"])
            log(f"fixed: {json.dumps(result['fixed'])}")
            log(f"saturating, {t['window']} in flight, {t['saturate_seconds']} s")
            result["saturated"] = self.saturate(t["window"], t["saturate_seconds"])
            log(f"saturated: {json.dumps(result['saturated'])}")
            result["rss_end_kib"] = rss_kib(pids)
        result.update(self.errors())

    def close(self):
        for client in self.clients:
            if client.sock is not None:
                try:
                    client.sock.setblocking(True)
                    client.sock.settimeout(1)
                    client.sock.sendall(b"</stream:stream>")
                except OSError:
                    pass
                try:
                    client.sock.close()
                except OSError:
                    pass


def main(path):
    with open(path) as handle:
        plan = json.load(handle)
    result = {"accounts": len(plan["accounts"])}
    driver = Driver(plan)
    try:
        driver.run(result)
    except Exception as error:  # noqa: BLE001 - reported in the JSON
        result["error"] = f"{type(error).__name__}: {str(error)[-800:]}"
        result["trace"] = traceback.format_exc()[-1500:]
    finally:
        driver.close()
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
