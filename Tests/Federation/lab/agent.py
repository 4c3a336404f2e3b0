#!/usr/bin/python3
"""An XMPP client for the federation lab, driven over stdin/stdout with JSON lines.

lab.py starts one agent per user inside the user's provider namespace
(`ip netns exec braidlab-NAME /usr/bin/python3 agent.py LOGFILE`) and sends one command per
line; the agent answers each with exactly one line: {"ok": true, ...} or {"ok": false,
"error": "..."}. Everything the server pushes (messages, message errors, presence) is kept
as events, which `wait` picks from, so a command may ask for an event that arrived before it.

Every command that waits takes a `timeout` (seconds); nothing here waits unbounded.

Commands:
  connect    {jid, password, host, port, ca, timeout, omemo?}  log in (STARTTLS, SASL,
                                                        bind), send roster fetch, initial
                                                        presence; returns full_jid
  subscribe  {to}            presence type=subscribe
  approve    {to}            presence type=subscribed
  message    {to, body, id}  a chat message
  wait       {kind, from?, id?, body?, timeout}  first matching event, removed from the queue
  events     {clear?}        events not consumed yet (for diagnostics); with clear, forgets them
  roster     {timeout}       roster from the server: {jid: subscription}
  ping       {to, timeout}   XEP-0199 ping; returns type result|error (+condition)|timeout
  unroster   {to, timeout}   removes TO from the roster (subscription='remove', which also
                             cancels the subscriptions both ways, RFC 6121 §2.5)
  disconnect {timeout}
Event kinds: message, message_error, subscribe, subscribed, available, presence_error.

OMEMO (XEP-0384 0.3, `eu.siacs.conversations.axolotl`) with Tests/Interop/omemo_client.py
(python3-omemo, python3-oldmemo; imported only when asked for). `connect` with `omemo: true`
announces XEP-0115 caps with `eu.siacs.conversations.axolotl.devicelist+notify` before the
initial presence (omemo_client.OmemoPeer.announce); then:
  omemo_start        {timeout}         own identity (in memory): bundle and device list
                                       published to the account's PEP with publish-options
                                       access_model=open; returns device, identity (hex)
  omemo_devices      {jid, timeout}    JID's device list fetched from its PEP now: devices
  omemo_bundle       {jid, device, timeout}  JID's bundle of DEVICE fetched now: identity
                                       (hex), signed_pre_key, pre_keys (count)
  omemo_send         {to, text, timeout}  encrypted chat message(s); returns messages, keys
  omemo_receive      {from, timeout}   decrypts OMEMO messages until one with content from
                                       FROM: plaintext, device
  omemo_notification {jid, device, timeout}  until a PEP notification of JID's device list
                                       lists DEVICE: devices, and every device-list
                                       notification seen so far (notifications)
  omemo_access       {timeout}         pubsub#access_model of the own device-list and bundle
                                       nodes, from their owner configuration (XEP-0060 §8.2)
  omemo_reset        {timeout}         empties the own device list and deletes the own
                                       bundle node (so that a repeated run starts clean)

Client pools (many clients in one process, for the multiplexing scenarios in mux.py, where
one process per user would be too heavy on two cores):
  pool_connect   {jids, password, host, port, ca, timeout}  log them all in (at most 10 at
                                                            a time), initial presence each
  pool_send      {messages: [[from, to, id, body], ...]}    chat messages (FROM in the pool)
  pool_stream    {messages: [[from, to, id, body], ...], interval}  the same, one every
                                                            INTERVAL seconds, in the background
  pool_wait      {count, timeout}     until COUNT messages were received in all (or timeout;
                                      never an error: the lab judges what arrived)
  pool_received  {clear}              [[to, from, id, body], ...] received, and message errors
                                      [[to, from, id, condition, text], ...]
  pool_status    {}                   clients connected now, and disconnections seen
  pool_muc_create {rooms: [[jid, room, nick], ...], timeout}  enter each new room and accept it
                                      as an instant room (XEP-0045 §10.1.2)
  pool_muc_join  {joins: [[jid, room, nick], ...], timeout}  enter rooms (local or remote);
                                      returns how many entries were confirmed (status 110),
                                      which ([[jid, room], ...]) and the errors
  pool_groupchat {messages: [[from, room, id, body], ...]}  groupchat messages (received ones
                                      are recorded like chat messages, `from` the room)
Started with --quiet, the agent logs warnings only (no XML transcript).
"""

import asyncio
import json
import logging
import os
import ssl
import sys
import time

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream import ET

MUC = "http://jabber.org/protocol/muc"
MUC_USER = "http://jabber.org/protocol/muc#user"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
# Tests/Interop, where omemo_client.py is (imported on first use: python3-omemo, -oldmemo).
INTEROP = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Interop"))


def omemo_module():
    """Tests/Interop/omemo_client.py, and a subclass of its OmemoPeer that also keeps every
    device-list notification it sees (OmemoPeer's own queue is consumed by its waits)."""
    # OMEMO_TRACE makes omemo_client print stanzas to stdout, which is our command channel;
    # the agent's log (DEBUG) has the XML anyway.
    os.environ.pop("OMEMO_TRACE", None)
    if INTEROP not in sys.path:
        sys.path.insert(0, INTEROP)
    import omemo_client

    class LabOmemoPeer(omemo_client.OmemoPeer):
        def __init__(self, client):
            super().__init__(client)
            self.started = time.monotonic()
            self.seen = []   # [{from, devices, at}] of every device-list notification

        def _on_event(self, stanza):
            event = f"{{{omemo_client.NS_PUBSUB_EVENT}}}"
            items = stanza.xml.find(f"{event}event/{event}items")
            if items is not None and items.get("node") == omemo_client.NODE_DEVICELIST:
                devices = [int(device.get("id")) for device in items.iter(f"{{{omemo_client.NS_OMEMO}}}device")
                           if (device.get("id") or "").isdigit()]
                self.seen.append({"from": str(stanza["from"]), "devices": devices,
                                  "at": round(time.monotonic() - self.started, 3)})
            super()._on_event(stanza)

    return omemo_client, LabOmemoPeer


class Agent:
    def __init__(self):
        self.client = None
        self.events = []
        self.changed = asyncio.Condition()
        self.omemo = None       # a LabOmemoPeer once connected with omemo: true
        self.omemo_client = None

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

    async def connect(self, jid, password, host, port, ca, timeout, omemo=False):
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
        if omemo:
            # Caps with devicelist+notify first, then the initial presence (which carries them).
            self.omemo_client, peer_type = omemo_module()
            self.omemo = peer_type(client)
            await self.omemo.announce()
        else:
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

    async def unroster(self, to, timeout):
        iq = self.client.Iq()
        iq["type"] = "set"
        query = ET.Element("{jabber:iq:roster}query")
        ET.SubElement(query, "{jabber:iq:roster}item", jid=to, subscription="remove")
        iq.append(query)
        await iq.send(timeout=timeout)
        return {}

    # -- OMEMO (omemo_client.OmemoPeer) --

    async def omemo_command(self, name, command):
        peer, module = self.omemo, self.omemo_client
        if peer is None:
            raise RuntimeError("not connected with omemo: true")
        timeout = command.get("timeout", 20)

        async def bounded(coroutine):
            try:
                return await asyncio.wait_for(coroutine, timeout)
            except asyncio.TimeoutError:
                raise RuntimeError(f"{name} did not finish within {timeout}s") from None

        if name == "omemo_start":
            device = await bounded(peer.start())
            own = (await peer.manager.get_own_device_information())[0]
            return {"device": device, "identity": own.identity_key.hex()}
        if name == "omemo_devices":
            return {"devices": sorted(await bounded(peer.device_list(command["jid"])))}
        if name == "omemo_bundle":
            bundle = await bounded(peer.manager._download_bundle(module.NS_OMEMO, command["jid"], command["device"]))
            return {"identity": bundle.identity_key.hex(), "signed_pre_key": bundle.signed_pre_key_id,
                    "pre_keys": len(bundle.pre_key_ids)}
        if name == "omemo_send":
            messages = await bounded(peer.send(command["to"], command["text"]))
            return {"messages": len(messages), "keys": sum(len(message.keys) for message in messages)}
        if name == "omemo_receive":
            # OmemoPeer.receive raises AssertionError with the reason after its own timeout.
            plaintext, device = await peer.receive(command["from"], timeout=timeout)
            return {"plaintext": plaintext, "device": device}
        if name == "omemo_notification":
            devices = await peer.device_list_notification(command["jid"], command["device"], timeout=timeout)
            return {"devices": sorted(devices), "notifications": peer.seen}
        if name == "omemo_access":
            # The access model the server applied to our own nodes (owner configuration,
            # XEP-0060 §8.2): publish-options asked for `open`.
            access = {}
            for node in (module.NODE_DEVICELIST, module.NODE_BUNDLE.format(peer.device_id)):
                pubsub = ET.Element(f"{{{module.NS_PUBSUB_OWNER}}}pubsub")
                ET.SubElement(pubsub, f"{{{module.NS_PUBSUB_OWNER}}}configure", node=node)
                iq = self.client.make_iq_get()  # no 'to': our own account's PEP service
                iq.append(pubsub)
                try:
                    result = await iq.send(timeout=timeout)
                except (IqError, IqTimeout) as error:
                    access[node] = {"error": module.describe_iq_error(error)}
                    continue
                values = [field.findtext("{jabber:x:data}value") for field in result.xml.iter("{jabber:x:data}field")
                          if field.get("var") == "pubsub#access_model"]
                access[node] = {"access_model": values[0] if values else None}
            return {"access": access}
        if name == "omemo_reset":
            done = []
            if peer.device_id is not None:
                await bounded(peer.manager._delete_bundle(module.NS_OMEMO, peer.device_id))
                done.append(f"bundle node of device {peer.device_id} deleted")
            await bounded(peer.manager._publish(module.NODE_DEVICELIST, ET.Element(f"{{{module.NS_OMEMO}}}list")))
            done.append("empty device list published")
            return {"done": done}
        raise RuntimeError(f"unknown command {name}")

    async def disconnect(self, timeout):
        if self.omemo is not None:
            await self.omemo.close()
            self.omemo = None
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
            events = self.events
            if command.get("clear"):
                self.events = []
            return {"events": events}
        if name == "unroster":
            return await self.unroster(command["to"], command.get("timeout", 10))
        if name.startswith("omemo_"):
            return await self.omemo_command(name, command)
        if name == "roster":
            return await self.roster(command["timeout"])
        if name == "ping":
            return await self.ping(command["to"], command["timeout"])
        if name == "disconnect":
            return await self.disconnect(command.get("timeout", 5))
        raise RuntimeError(f"unknown command {name}")


class Pool:
    """Many slixmpp clients in one asyncio loop; received messages are recorded, not queued."""

    def __init__(self):
        self.clients = {}
        self.received = []
        self.errors = []
        self.disconnections = 0
        self.streaming = []
        self.entered = set()      # (jid, room) whose entry the room confirmed (status 110)
        self.entry_errors = []    # [jid, room, condition]

    def _on_error(self, jid, message):
        # slixmpp fires message_error for every <message type='error'> with an <error/>
        # (and `message` too when it has a body, which _on_message ignores).
        self.errors.append([jid, message["from"].bare, message["id"],
                            message["error"]["condition"], message["error"]["text"]])

    def _on_message(self, jid, message):
        if message["type"] in ("chat", "normal", "groupchat") and message["body"]:
            self.received.append([jid, message["from"].bare, message["id"], message["body"]])

    def _on_presence(self, jid, presence):
        room = presence["from"].bare
        if presence["type"] == "error":
            self.entry_errors.append([jid, room, presence["error"]["condition"]])
            return
        x = presence.xml.find(f"{{{MUC_USER}}}x")
        if x is not None and any(status.get("code") == "110" for status in x.findall(f"{{{MUC_USER}}}status")):
            self.entered.add((jid, room))

    def _enter(self, jid, room, nick):
        presence = self.clients[jid].make_presence(pto=f"{room}/{nick}")
        presence.append(ET.Element(f"{{{MUC}}}x"))
        presence.send()

    async def _until_entered(self, pairs, timeout):
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            # Settled: every entry confirmed or refused (an error presence from the room).
            refused = {(error[0], error[1]) for error in self.entry_errors}
            if all(pair in self.entered or pair in refused for pair in pairs):
                break
            await asyncio.sleep(0.05)
        return sum(1 for pair in pairs if pair in self.entered)

    async def muc_create(self, rooms, timeout):
        for jid, room, nick in rooms:
            self._enter(jid, room, nick)
        entered = await self._until_entered({(jid, room) for jid, room, _ in rooms}, timeout)
        for jid, room, _ in rooms:
            client = self.clients[jid]
            iq = client.make_iq_set(ito=room)
            query = ET.Element(f"{{{MUC_OWNER}}}query")
            ET.SubElement(query, "{jabber:x:data}x", {"type": "submit"})
            iq.append(query)
            await iq.send(timeout=timeout)
        return {"entered": entered, "errors": self.entry_errors}

    async def muc_join(self, joins, timeout):
        for jid, room, nick in joins:
            self._enter(jid, room, nick)
        pairs = {(jid, room) for jid, room, _ in joins}
        entered = await self._until_entered(pairs, timeout)
        return {"entered": entered, "confirmed": sorted([jid, room] for jid, room in pairs if (jid, room) in self.entered),
                "errors": self.entry_errors}

    def groupchat(self, messages):
        for sender, room, message_id, body in messages:
            message = self.clients[sender].make_message(mto=room, mbody=body, mtype="groupchat")
            message["id"] = message_id
            message.send()
        return {"sent": len(messages)}

    async def connect(self, jids, password, host, port, ca, timeout, no_name_check=False):
        """NO_NAME_CHECK: the server's certificate is not checked at all (c2s to a domain its
        provider holds no CA-issued certificate for: s2s proves it by POSH, DANE or dialback,
        and its clients see the provider's self-signed one)."""
        loop = asyncio.get_event_loop()
        limit = asyncio.Semaphore(10)

        async def one(jid):
            async with limit:
                client = slixmpp.ClientXMPP(jid, password)
                client.ca_certs = ca
                if no_name_check:
                    client.ssl_context.check_hostname = False
                    client.ssl_context.verify_mode = ssl.CERT_NONE
                    client.ca_certs = None
                done = loop.create_future()

                def settle(outcome):
                    if not done.done():
                        done.set_result(outcome)

                def on_disconnect(_):
                    self.disconnections += 1
                    settle("disconnected during login")

                client.add_event_handler("session_start", lambda _: settle("ok"))
                client.add_event_handler("failed_all_auth", lambda _: settle("authentication failed"))
                client.add_event_handler("connection_failed", lambda error: settle(f"connection failed: {error}"))
                client.add_event_handler("disconnected", on_disconnect)
                client.add_event_handler("message", lambda message: self._on_message(jid, message))
                client.add_event_handler("message_error", lambda message: self._on_error(jid, message))
                client.add_event_handler("presence", lambda presence: self._on_presence(jid, presence))
                client.connect(address=(host, port))
                outcome = await asyncio.wait_for(done, timeout)
                if outcome != "ok":
                    raise RuntimeError(f"{jid}: {outcome}")
                client.send_presence()
                self.clients[jid] = client

        await asyncio.wait_for(asyncio.gather(*(one(jid) for jid in jids)), timeout)
        return {"connected": len(self.clients)}

    def _send(self, sender, to, message_id, body):
        client = self.clients[sender]
        message = client.make_message(mto=to, mbody=body, mtype="chat")
        message["id"] = message_id
        message.send()

    def send(self, messages):
        for sender, to, message_id, body in messages:
            self._send(sender, to, message_id, body)
        return {"sent": len(messages)}

    def stream(self, messages, interval):
        async def run():
            for sender, to, message_id, body in messages:
                self._send(sender, to, message_id, body)
                await asyncio.sleep(interval)
        self.streaming.append(asyncio.ensure_future(run()))
        return {}

    async def wait(self, count, timeout):
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while len(self.received) < count and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return {"received": len(self.received), "errors": len(self.errors)}

    def take(self, clear):
        reply = {"received": self.received, "errors": self.errors}
        if clear:
            self.received, self.errors = [], []
        return reply

    async def disconnect(self, timeout):
        for task in self.streaming:
            task.cancel()
        clients, self.clients = list(self.clients.values()), {}
        if clients:
            await asyncio.wait([asyncio.ensure_future(client.disconnect(wait=1.0)) for client in clients],
                               timeout=timeout)
        return {}

    async def handle(self, name, command):
        if name in ("pool_send", "pool_stream", "pool_received", "pool_status", "pool_groupchat"):
            command.pop("timeout", None)
        if name == "pool_muc_create":
            return await self.muc_create(command["rooms"], command["timeout"])
        if name == "pool_muc_join":
            return await self.muc_join(command["joins"], command["timeout"])
        if name == "pool_groupchat":
            return self.groupchat(command["messages"])
        if name == "pool_connect":
            return await self.connect(**command)
        if name == "pool_send":
            return self.send(command["messages"])
        if name == "pool_stream":
            return self.stream(command["messages"], command["interval"])
        if name == "pool_wait":
            return await self.wait(command["count"], command["timeout"])
        if name == "pool_received":
            return self.take(command.get("clear", False))
        if name == "pool_status":
            return {"connected": sum(1 for client in self.clients.values() if client.is_connected()),
                    "disconnections": self.disconnections}
        raise RuntimeError(f"unknown command {name}")


async def main():
    agent = Agent()
    pool = Pool()
    loop = asyncio.get_event_loop()
    # Pool commands carry thousands of messages in one line.
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break  # the lab closed our stdin: stop
        command = json.loads(line)
        try:
            if command["cmd"].startswith("pool_"):
                name = command.pop("cmd")
                if name == "pool_disconnect":
                    reply = {"ok": True, **(await pool.disconnect(command.get("timeout", 5)))}
                else:
                    reply = {"ok": True, **(await pool.handle(name, command))}
            else:
                reply = {"ok": True, **(await agent.handle(command))}
        except Exception as error:  # noqa: BLE001 - reported to the lab, which decides
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if agent.client is not None:
        agent.client.disconnect()
    if pool.clients:
        await pool.disconnect(3)


if __name__ == "__main__":
    quiet = "--quiet" in sys.argv[2:]
    logging.basicConfig(filename=sys.argv[1] if len(sys.argv) > 1 else None,
                        level=logging.WARNING if quiet else logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
