#!/usr/bin/python3
"""An XMPP client for the federation lab, driven over stdin/stdout with JSON lines.

lab.py starts one agent per user inside the user's provider namespace
(`ip netns exec braidlab-NAME /usr/bin/python3 agent.py LOGFILE`) and sends one command per
line; the agent answers each with exactly one line: {"ok": true, ...} or {"ok": false,
"error": "..."}. Everything the server pushes (messages, message errors, presence) is kept
as events, which `wait` picks from, so a command may ask for an event that arrived before it.

Every command that waits takes a `timeout` (seconds); nothing here waits unbounded.

Commands:
  connect    {jid, password, host, port, ca, timeout}   log in (STARTTLS, SASL, bind), send
                                                        roster fetch, initial presence;
                                                        returns full_jid
  subscribe  {to}            presence type=subscribe
  approve    {to}            presence type=subscribed
  message    {to, body, id}  a chat message
  wait       {kind, from?, id?, body?, timeout}  first matching event, removed from the queue
  events     {}              events not consumed yet (for diagnostics)
  roster     {timeout}       roster from the server: {jid: subscription}
  ping       {to, timeout}   XEP-0199 ping; returns type result|error (+condition)|timeout
  disconnect {timeout}
Event kinds: message, message_error, subscribe, subscribed, available, presence_error.
"""

import asyncio
import json
import logging
import sys

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout


class Agent:
    def __init__(self):
        self.client = None
        self.events = []
        self.changed = asyncio.Condition()

    # -- events pushed by the server --

    async def _record(self, event):
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def _on(self, kind, make):
        def handler(stanza):
            asyncio.ensure_future(self._record(dict(kind=kind, **make(stanza))))
        return handler

    @staticmethod
    def _from(stanza):
        return {"from": stanza["from"].bare, "full_from": str(stanza["from"]), "id": stanza["id"]}

    # -- commands --

    async def connect(self, jid, password, host, port, ca, timeout):
        client = slixmpp.ClientXMPP(jid, password)
        self.client = client
        client.ca_certs = ca
        client.register_plugin("xep_0030")
        client.register_plugin("xep_0199")  # answers pings from the other side
        # Subscription requests are answered by the lab explicitly, never automatically.
        client.roster.auto_authorize = None
        client.roster.auto_subscribe = False
        done = asyncio.get_event_loop().create_future()

        def settle(outcome):
            if not done.done():
                done.set_result(outcome)

        client.add_event_handler("session_start", lambda _: settle("ok"))
        # failed_all_auth, not failed_auth: slixmpp 1.8 tries SCRAM-*-PLUS with tls-unique
        # first, which is undefined under TLS 1.3 and refused by strict servers (Braid);
        # it then moves on to the next mechanism, and only when none is left is login lost.
        client.add_event_handler("failed_all_auth", lambda _: settle("authentication failed (every SASL mechanism)"))
        client.add_event_handler("connection_failed", lambda error: settle(f"connection failed: {error}"))
        client.add_event_handler("disconnected", lambda _: settle("disconnected during login"))
        client.add_event_handler("message", self._on_message)
        client.add_event_handler("message_error", self._on("message_error", self._error_fields))
        client.add_event_handler("presence_subscribe", self._on("subscribe", self._from))
        client.add_event_handler("presence_subscribed", self._on("subscribed", self._from))
        client.add_event_handler("presence_available", self._on("available", self._from))
        client.add_event_handler("presence_error", self._on("presence_error", self._error_fields))
        client.connect(address=(host, port))
        outcome = await asyncio.wait_for(done, timeout)
        if outcome != "ok":
            raise RuntimeError(outcome)
        # Fetch the roster before going online: it makes this resource "interested"
        # (RFC 6121 §2.1.6), and Prosody sends subscription presence and roster pushes only
        # to interested resources.
        await client.get_roster(timeout=timeout)
        client.send_presence()
        return {"full_jid": str(client.boundjid)}

    def _on_message(self, message):
        if message["type"] in ("chat", "normal") and message["body"]:
            asyncio.ensure_future(self._record(dict(kind="message", body=message["body"], **self._from(message))))

    def _error_fields(self, stanza):
        fields = self._from(stanza)
        fields["condition"] = stanza["error"]["condition"]
        fields["text"] = stanza["error"]["text"]
        return fields

    async def wait(self, kind, timeout, **match):
        def find():
            for event in self.events:
                if event["kind"] == kind and all(event.get(key) == value for key, value in match.items()
                                                 if value is not None):
                    return event
            return None

        async def until_found():
            async with self.changed:
                while (event := find()) is None:
                    await self.changed.wait()
                self.events.remove(event)
                return event

        try:
            return {"event": await asyncio.wait_for(until_found(), timeout)}
        except asyncio.TimeoutError:
            raise RuntimeError(f"no {kind} event matching {match} within {timeout}s") from None

    async def roster(self, timeout):
        # A plain roster get without `ver`: with roster versioning (XEP-0237) a server may
        # answer a get carrying the current version with an empty result.
        iq = self.client.Iq()
        iq["type"] = "get"
        iq.enable("roster")
        result = await iq.send(timeout=timeout)
        items = result["roster"]["items"]
        return {"roster": {str(jid): item["subscription"] for jid, item in items.items()}}

    async def ping(self, to, timeout):
        iq = self.client.Iq()
        iq["type"] = "get"
        iq["to"] = to
        iq.enable("ping")
        loop = asyncio.get_event_loop()
        started = loop.time()
        try:
            await iq.send(timeout=timeout)
            return {"type": "result", "rtt": round(loop.time() - started, 3)}
        except IqError as error:
            return {"type": "error", "condition": error.iq["error"]["condition"],
                    "text": error.iq["error"]["text"]}
        except IqTimeout:
            return {"type": "timeout"}

    async def disconnect(self, timeout):
        if self.client is not None:
            try:
                await asyncio.wait_for(self.client.disconnect(wait=1.0), timeout)
            except asyncio.TimeoutError:
                pass
            self.client = None
        return {}

    async def handle(self, command):
        name = command.pop("cmd")
        if name == "connect":
            return await self.connect(**command)
        if name == "subscribe":
            self.client.send_presence(pto=command["to"], ptype="subscribe")
            return {}
        if name == "approve":
            self.client.send_presence(pto=command["to"], ptype="subscribed")
            return {}
        if name == "message":
            message = self.client.make_message(mto=command["to"], mbody=command["body"], mtype="chat")
            message["id"] = command["id"]
            message.send()
            return {}
        if name == "wait":
            kind, timeout = command.pop("kind"), command.pop("timeout")
            return await self.wait(kind, timeout, **command)
        if name == "events":
            return {"events": self.events}
        if name == "roster":
            return await self.roster(command["timeout"])
        if name == "ping":
            return await self.ping(command["to"], command["timeout"])
        if name == "disconnect":
            return await self.disconnect(command.get("timeout", 5))
        raise RuntimeError(f"unknown command {name}")


async def main():
    agent = Agent()
    loop = asyncio.get_event_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break  # the lab closed our stdin: stop
        command = json.loads(line)
        try:
            reply = {"ok": True, **(await agent.handle(command))}
        except Exception as error:  # noqa: BLE001 - reported to the lab, which decides
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if agent.client is not None:
        agent.client.disconnect()


if __name__ == "__main__":
    logging.basicConfig(filename=sys.argv[1] if len(sys.argv) > 1 else None, level=logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
