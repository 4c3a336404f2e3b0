#!/usr/bin/python3
"""Many XMPP clients in one asyncio process, for the s2s fan-out benchmark.

Usage: xmppdriver.py PLAN.json   (prints one JSON object on stdout)

PLAN: {"accounts": [{"jid", "password", "host", "port"}...],
       "pairs": [[sender_index, receiver_index]...],   ordered pairs to message
       "cold_timeout": s, "warm_total": n, "warm_timeout": s, "login_timeout": s}

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
    pairs = plan["pairs"]
    received = {}          # message id -> arrival time
    state = {"last": None}

    def on_message(index, body):
        now = time.monotonic()
        received[body] = now
        state["last"] = now

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

    # -- warm: saturating burst over the pairs, once every cold message has arrived --
    if complete and plan.get("warm_total", 0) > 0:
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


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    sys.exit(asyncio.run(main(plan)))
