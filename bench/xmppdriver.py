#!/usr/bin/python3
"""Many XMPP clients in one asyncio process, for the s2s fan-out benchmark.

Usage: xmppdriver.py PLAN.json   (prints one JSON object on stdout)

PLAN: {"accounts": [{"jid", "password", "host", "port"}...],
       "pairs": [[sender_index, receiver_index]...],   ordered pairs to message
       "cold_timeout": s, "warm_total": n, "warm_timeout": s, "login_timeout": s,
       "sequential": {...}}                                     optional, see below

A minimal client (STARTTLS, SASL PLAIN inside TLS, bind, initial presence), because one
slixmpp process per user would cost ~25 MB each at 200 users. Certificates are not
checked: the benchmark measures the servers, and the federation lab checks trust.

Phases:
  login  every account logs in (50 at a time);
  cold   one message on every pair, all sent at once; time until the last first message
         arrives (or cold_timeout);
  warm   warm_total messages spread round-robin over the pairs, sent as fast as the
         sockets take them; throughput = delivered / (last arrival - first send); lost =
         sent - delivered once nothing has arrived for 5 s (or warm_timeout).
  Cold and warm run only when "pairs" is not empty (warm also needs warm_total > 0).
  sequential  (bench/newpair.py) with plan["sequential"] = {"warmup": [[s, r]...],
         "pairs": [[s, r]...], "warm_repeats": k, "timeout": s, "warmup_timeout": s,
         "give_up_after": k, "sync": bool}: one message at a time, each sent once the previous one arrived
         (or bounced, or timed out), latency = arrival - send in ms. First the warmup
         pairs (they open the link; reported apart), then one message on each listed pair
         (new_pair_ms, in the order of the list), then warm_repeats messages round-robin
         over those pairs, already used (warm_ms). With "sync", the driver writes
         {"sync": "new-start" | "warm-start" | "warm-end"} lines on stderr before each
         phase and after the last, and waits for a line on stdin each time, so that the
         caller can read the servers' CPU time at the boundaries. After give_up_after
         timeouts in a row (0: never) the new pairs stop (gave_up).
"""

import asyncio
import base64
import json
import ssl
import sys
import time
import xml.etree.ElementTree as ET

STREAM = ("<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"


class LoginError(Exception):
    pass


class Client:
    def __init__(self, index, account, on_message):
        self.index = index
        self.jid = account["jid"]
        self.local, self.domain = self.jid.split("@")
        self.password = account["password"]
        self.host, self.port = account["host"], account["port"]
        self.on_message = on_message
        self.reader = self.writer = None
        self.parser = None
        self.depth = 0
        self.queue = []
        self.errors = 0
        self.conditions = {}
        self.on_error = None   # optional callback(index, condition), for the sequential phase

    def _new_parser(self):
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0

    async def _stanza(self, timeout=30):
        """Next top-level element of the current stream."""
        deadline = time.monotonic() + timeout
        while not self.queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoginError(f"{self.jid}: nothing from the server in {timeout}s")
            data = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not data:
                raise LoginError(f"{self.jid}: server closed the connection")
            self._feed(data)
        return self.queue.pop(0)

    def _feed(self, data):
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 1:
                    self.queue.append(element)

    def _send(self, text):
        self.writer.write(text.encode() if isinstance(text, str) else text)

    async def _open(self):
        self._new_parser()
        self._send(STREAM.format(domain=self.domain))
        features = await self._stanza()
        if not features.tag.endswith("features"):
            raise LoginError(f"{self.jid}: expected features, got {features.tag}")
        return features

    async def login(self, timeout):
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), timeout)
        features = await self._open()
        if features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None:
            raise LoginError(f"{self.jid}: no STARTTLS offered")
        self._send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        answer = await self._stanza()
        if not answer.tag.endswith("proceed"):
            raise LoginError(f"{self.jid}: STARTTLS refused")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await asyncio.wait_for(self.writer.start_tls(context, server_hostname=self.domain), timeout)
        features = await self._open()
        mechanisms = [m.text for m in features.iter(f"{{{SASL_NS}}}mechanism")]
        if "PLAIN" not in mechanisms:
            raise LoginError(f"{self.jid}: PLAIN not offered ({mechanisms})")
        token = base64.b64encode(b"\0" + self.local.encode() + b"\0" + self.password.encode()).decode()
        self._send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>")
        answer = await self._stanza()
        if not answer.tag.endswith("success"):
            raise LoginError(f"{self.jid}: authentication failed ({answer.tag})")
        await self._open()
        self._send("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                   "<resource>bench</resource></bind></iq>")
        while True:
            answer = await self._stanza()
            if answer.get("id") == "bind1":
                break
        if answer.get("type") != "result":
            raise LoginError(f"{self.jid}: bind failed")
        # Legacy session (ejabberd and Prosody mark it optional; harmless everywhere).
        self._send("<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        while True:
            answer = await self._stanza()
            if answer.get("id") == "sess1":
                break
        self._send("<presence/>")

    async def pump(self):
        """Reads until the connection closes; hands every message to on_message."""
        while True:
            while self.queue:
                element = self.queue.pop(0)
                if element.tag.endswith("message"):
                    if element.get("type") == "error":
                        self.errors += 1
                        error = element.find("{jabber:client}error")
                        condition = "?"
                        if error is not None:
                            for child in error:
                                if not child.tag.endswith("}text"):
                                    condition = child.tag.split("}")[-1]
                                    break
                        self.conditions[condition] = self.conditions.get(condition, 0) + 1
                        if self.on_error is not None:
                            self.on_error(self.index, condition)
                    else:
                        body = element.find("{jabber:client}body")
                        if body is not None and body.text:
                            self.on_message(self.index, body.text)
            try:
                data = await self.reader.read(262144)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            try:
                self._feed(data)
            except ET.ParseError:
                return

    def message(self, to, body):
        self._send(f"<message to='{to}' type='chat'><body>{body}</body></message>")

    async def drain(self):
        await self.writer.drain()


async def main(plan):
    accounts = plan["accounts"]
    pairs = plan.get("pairs", [])
    received = {}          # message id -> arrival time
    state = {"last": None}

    waiters = {}           # message id -> future (sequential phase)

    def on_message(index, body):
        now = time.monotonic()
        received[body] = now
        state["last"] = now
        waiter = waiters.pop(body, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    clients = [Client(i, account, on_message) for i, account in enumerate(accounts)]
    result = {"accounts": len(accounts), "pairs": len(pairs)}

    # -- login --
    started = time.monotonic()
    limit = asyncio.Semaphore(50)
    failures = []

    async def login(client):
        async with limit:
            try:
                await client.login(plan.get("login_timeout", 60))
            except (LoginError, OSError, asyncio.TimeoutError, ssl.SSLError) as error:
                failures.append(f"{client.jid}: {error!r}"[:300])

    await asyncio.gather(*(login(c) for c in clients))
    result["login_seconds"] = round(time.monotonic() - started, 3)
    if failures:
        result["login_failures"] = failures[:10]
        result["login_failed"] = len(failures)
        print(json.dumps(result))
        return 1
    pumps = [asyncio.ensure_future(c.pump()) for c in clients]
    await asyncio.sleep(1.0)   # let presence settle

    async def wait_for(ids, timeout, quiet=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i in received for i in ids):
                return True
            if quiet and state["last"] and time.monotonic() - state["last"] > quiet:
                return False
            await asyncio.sleep(0.05)
        return False

    # -- cold: one message per pair --
    if pairs:
        complete = await cold_phase(plan, pairs, clients, accounts, received, result, wait_for)
    else:
        complete = False

    # -- warm: saturating burst over the pairs, once every cold message has arrived --
    if pairs and complete and plan.get("warm_total", 0) > 0:
        await warm_phase(plan, pairs, clients, accounts, received, result, wait_for)

    # -- sequential: new domain pairs one at a time, then the same pairs warm --
    if plan.get("sequential"):
        result["sequential"] = await sequential_phase(plan["sequential"], clients, accounts, waiters)

    conditions = {}
    for c in clients:
        for key, value in c.conditions.items():
            conditions[key] = conditions.get(key, 0) + value
    result["error_conditions"] = conditions
    for c in clients:
        try:
            c._send("</stream:stream>")
        except Exception:  # noqa: BLE001
            pass
    await asyncio.sleep(0.2)
    for p in pumps:
        p.cancel()
    for c in clients:
        c.writer.close()
    print(json.dumps(result))
    return 0


async def cold_phase(plan, pairs, clients, accounts, received, result, wait_for):
    cold_ids = []
    started = time.monotonic()
    for n, (s, r) in enumerate(pairs):
        body = f"c{n}"
        cold_ids.append(body)
        clients[s].message(accounts[r]["jid"], body)
    await asyncio.gather(*(c.drain() for c in clients))
    sent_done = time.monotonic() - started
    complete = await wait_for(cold_ids, plan["cold_timeout"])
    delivered = [received[i] for i in cold_ids if i in received]
    result["cold"] = {
        "sent": len(cold_ids), "delivered": len(delivered), "complete": complete,
        "send_seconds": round(sent_done, 3),
        "seconds": round(max(delivered) - started, 3) if complete else None,
        "last_arrival_seconds": round(max(delivered) - started, 3) if delivered else None,
        "timeout": plan["cold_timeout"],
        "errors": sum(c.errors for c in clients),
    }
    result["cold_connections_probe"] = True
    print(json.dumps({"phase": "cold-done"}), file=sys.stderr, flush=True)
    return complete


async def warm_phase(plan, pairs, clients, accounts, received, result, wait_for):
    warm_ids = []
    total = plan["warm_total"]
    errors_before = sum(c.errors for c in clients)
    started = time.monotonic()
    for n in range(total):
        s, r = pairs[n % len(pairs)]
        body = f"w{n}"
        warm_ids.append(body)
        clients[s].message(accounts[r]["jid"], body)
        if n % 500 == 499:
            await asyncio.gather(*(c.drain() for c in clients))
    await asyncio.gather(*(c.drain() for c in clients))
    send_seconds = time.monotonic() - started
    done = await wait_for(warm_ids, plan["warm_timeout"], quiet=5.0)
    arrivals = [received[i] for i in warm_ids if i in received]
    span = (max(arrivals) - started) if arrivals else None
    result["warm"] = {
        "sent": total, "delivered": len(arrivals), "lost": total - len(arrivals), "complete": done,
        "send_seconds": round(send_seconds, 3),
        "seconds": round(span, 3) if span else None,
        "messages_per_second": round(len(arrivals) / span, 1) if span else None,
        "errors": sum(c.errors for c in clients) - errors_before,
    }


def summary(values):
    """count, median, p90, p99, max of a list of milliseconds (nearest rank)."""
    if not values:
        return {"count": 0, "median": None, "p90": None, "p99": None, "max": None, "min": None}
    ordered = sorted(values)

    def rank(q):
        return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))]

    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"count": len(ordered), "median": round(median, 3), "p90": round(rank(0.90), 3),
            "p99": round(rank(0.99), 3), "max": round(ordered[-1], 3), "min": round(ordered[0], 3)}


async def sync_point(spec, name):
    """With spec["sync"]: tell the caller (stderr) and wait for its line on stdin."""
    if not spec.get("sync"):
        return
    print(json.dumps({"sync": name}), file=sys.stderr, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def sequential_phase(spec, clients, accounts, waiters):
    """One message at a time; each is sent when the previous one has arrived."""
    loop = asyncio.get_running_loop()
    timeout = spec.get("timeout", 30)
    counts = {"lost": 0, "errors": 0}
    current = {"future": None}

    def on_error(index, condition):
        # One message is in flight at a time: an error reply is about it.
        counts["errors"] += 1
        future = current["future"]
        if future is not None and not future.done():
            future.set_exception(LookupError(condition))

    for c in clients:
        c.on_error = on_error
    serial = [0]

    async def one(sender, receiver, tag, limit):
        serial[0] += 1
        body = f"{tag}{serial[0]}"
        future = loop.create_future()
        waiters[body] = future
        current["future"] = future
        sent = time.monotonic()
        clients[sender].message(accounts[receiver]["jid"], body)
        try:
            await clients[sender].drain()
            arrived = await asyncio.wait_for(future, limit)
            return round((arrived - sent) * 1000, 3), None
        except asyncio.TimeoutError:
            counts["lost"] += 1
            return None, "timeout"
        except LookupError as error:
            return None, f"error {error}"
        except (ConnectionError, OSError) as error:
            counts["errors"] += 1
            return None, f"{type(error).__name__}"
        finally:
            waiters.pop(body, None)
            current["future"] = None

    out = {}
    warmup = []
    for sender, receiver in spec.get("warmup", []):
        ms, problem = await one(sender, receiver, "u", spec.get("warmup_timeout", timeout))
        warmup.append({"pair": [sender, receiver], "ms": ms, "problem": problem})
    out["warmup"] = warmup
    out["warmup_delivered"] = all(w["ms"] is not None for w in warmup)
    out["warmup_lost"], out["warmup_errors"] = counts["lost"], counts["errors"]
    counts["lost"] = counts["errors"] = 0
    pairs = spec.get("pairs", [])

    await sync_point(spec, "new-start")
    started = time.monotonic()
    new_ms, problems = [], []
    give_up, in_a_row = spec.get("give_up_after", 0), 0
    out["gave_up"] = False
    for sender, receiver in pairs:
        ms, problem = await one(sender, receiver, "n", timeout)
        if ms is None:
            problems.append({"pair": [sender, receiver], "problem": problem})
            in_a_row += 1 if problem == "timeout" else 0
            if give_up and in_a_row >= give_up:
                out["gave_up"] = True   # that many timeouts in a row: the path is down
                break
        else:
            new_ms.append(ms)
            in_a_row = 0
    out["new_pair_seconds"] = round(time.monotonic() - started, 3)
    out["new_pair_ms"] = new_ms
    out["new_pair"] = summary(new_ms)
    out["new_pair_problems"] = problems[:20]
    out["lost"], out["errors"] = counts["lost"], counts["errors"]
    counts["lost"] = counts["errors"] = 0

    await sync_point(spec, "warm-start")
    started = time.monotonic()
    used = pairs or spec.get("warmup", [])
    warm_ms = []
    in_a_row = 0
    for n in range(spec.get("warm_repeats", 0) if used else 0):
        sender, receiver = used[n % len(used)]
        ms, problem = await one(sender, receiver, "r", timeout)
        if ms is not None:
            warm_ms.append(ms)
            in_a_row = 0
        elif problem == "timeout":
            in_a_row += 1
            if give_up and in_a_row >= give_up:
                out["warm_gave_up"] = True
                break
    out["warm_seconds"] = round(time.monotonic() - started, 3)
    out["warm_ms"] = warm_ms
    out["warm"] = summary(warm_ms)
    out["warm_lost"], out["warm_errors"] = counts["lost"], counts["errors"]
    await sync_point(spec, "warm-end")
    for c in clients:
        c.on_error = None
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    sys.exit(asyncio.run(main(plan)))
