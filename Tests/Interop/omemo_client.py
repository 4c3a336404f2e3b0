#!/usr/bin/python3
"""A small OMEMO client for the interop tests: OMEMO 0.3 (XEP-0384 in the
`eu.siacs.conversations.axolotl` namespace, as Conversations, Dino and Gajim use it) over a
slixmpp client, with Debian's python3-omemo and python3-oldmemo.

What goes over the wire (all of it is PEP, XEP-0163, on the account's own bare JID):
  - device list: node `eu.siacs.conversations.axolotl.devicelist`, item id `current`,
    payload `<list xmlns='eu.siacs.conversations.axolotl'><device id='N'/>...</list>`;
  - bundle: node `eu.siacs.conversations.axolotl.bundles:N`, item id `current`, payload
    `<bundle xmlns='eu.siacs.conversations.axolotl'>...</bundle>`;
  - both published with XEP-0060 publish-options `pubsub#access_model=open` (as Conversations
    does, so that people without a presence subscription can fetch them), in an IQ without
    `to`; fetched with `<items node='...'/>` addressed to the owner's bare JID;
  - device-list updates arrive as PEP notifications (headline messages with a pubsub#event
    payload): the client advertises `eu.siacs.conversations.axolotl.devicelist+notify` in
    its XEP-0115 entity capabilities, and contacts are subscribed to each other's presence;
  - messages: `<message type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'>
    <header sid='..'><key rid='..' [prekey='true']>..</key><iv>..</iv></header>
    <payload>..</payload></encrypted>` plus an EME hint, a store hint and a fallback body.
The XML of device lists, bundles and messages is made and read by oldmemo.etree.

Trust is blind (every new device is trusted when first needed): this is a test client.
Keys live in memory only.

Self-test against a throwaway Prosody 0.12 (Debian's `prosody`, mod_pep), two accounts,
one message each way:
    /usr/bin/python3 Tests/Interop/omemo_client.py --selftest-prosody
OMEMO_TRACE=1 prints every stanza sent or received that carries PEP or OMEMO data.
"""

import asyncio
import copy
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (free ports, waiting for a port, PR_SET_PDEATHSIG)

import omemo  # noqa: E402
import oldmemo  # noqa: E402
import oldmemo.etree  # noqa: E402  (needs python3-xmlschema)
from slixmpp import ClientXMPP, JID  # noqa: E402
from slixmpp.exceptions import IqError, IqTimeout  # noqa: E402
from slixmpp.xmlstream.handler import Callback  # noqa: E402
from slixmpp.xmlstream.matcher import MatchXPath  # noqa: E402

if not os.environ.get("INTEROP_DEBUG"):
    # python-omemo logs expected situations (a sender found only by a device-list refresh) as warnings.
    logging.getLogger("omemo").setLevel(logging.CRITICAL)

NS_OMEMO = oldmemo.oldmemo.NAMESPACE                      # eu.siacs.conversations.axolotl
NODE_DEVICELIST = f"{NS_OMEMO}.devicelist"
NODE_BUNDLE = f"{NS_OMEMO}.bundles:{{}}"                  # .format(device_id)
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_PUBSUB_OWNER = "http://jabber.org/protocol/pubsub#owner"
NS_PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
NS_DATA = "jabber:x:data"
NS_EME = "urn:xmpp:eme:0"
NS_HINTS = "urn:xmpp:hints"
ITEM_ID = "current"
FALLBACK_BODY = "I sent you an OMEMO encrypted message but your client doesn't seem to support that."

IQ_TIMEOUT = 10.0   # one PEP request
WAIT = 10.0         # one expected message or notification

TRUSTED, DISTRUSTED, UNDECIDED = "trusted", "distrusted", "undecided"


# -- storage and session manager -----------------------------------------------------------

class MemoryStorage(omemo.Storage):
    """python-omemo's key/value storage, kept in a dict (values are JSON-like)."""

    def __init__(self):
        super().__init__(disable_cache=True)
        self.data = {}

    async def _load(self, key):
        return omemo.Just(self.data[key]) if key in self.data else omemo.Nothing()

    async def _store(self, key, value):
        self.data[key] = copy.deepcopy(value)

    async def _delete(self, key):
        self.data.pop(key, None)


def describe_iq_error(error):
    """`<condition/> (type ..., text)` of an IqError, or 'timed out' for an IqTimeout."""
    if isinstance(error, IqTimeout):
        return f"no answer within {IQ_TIMEOUT}s"
    stanza_error = error.iq["error"]
    text = stanza_error["text"]
    return f"<{stanza_error['condition']}/> (type {stanza_error['type']}{', ' + repr(text) if text else ''})"


class PepPublishRefused(omemo.BundleUploadFailed, omemo.DeviceListUploadFailed):
    pass


class PepFetchFailed(omemo.BundleDownloadFailed, omemo.DeviceListDownloadFailed):
    pass


class OmemoManager(omemo.SessionManager):
    """The python-omemo session manager over one slixmpp client.

    SessionManager.create() is a classmethod that builds the instance with `cls()` and already
    talks to the server (fetches and publishes) before returning it, so the client cannot be
    passed to an instance: `bound_to(client)` makes a subclass that carries it.
    """

    xmpp = None  # the slixmpp client; set on the subclass made by bound_to()

    @classmethod
    def bound_to(cls, client):
        return type(f"OmemoManagerFor{client.boundjid.bare}", (cls,), {"xmpp": client})

    # -- PEP requests --------------------------------------------------------------------

    async def _publish(self, node, payload):
        """Publishes `payload` as item `current` of our own PEP node `node`, with
        publish-options access_model=open. Raises PepPublishRefused on an error answer."""
        pubsub = ET.Element(f"{{{NS_PUBSUB}}}pubsub")
        publish = ET.SubElement(pubsub, f"{{{NS_PUBSUB}}}publish", node=node)
        ET.SubElement(publish, f"{{{NS_PUBSUB}}}item", id=ITEM_ID).append(payload)
        form = ET.SubElement(ET.SubElement(pubsub, f"{{{NS_PUBSUB}}}publish-options"), f"{{{NS_DATA}}}x", type="submit")
        for var, value, kind in (("FORM_TYPE", NS_PUBLISH_OPTIONS, "hidden"), ("pubsub#access_model", "open", None)):
            field = ET.SubElement(form, f"{{{NS_DATA}}}field", var=var)
            if kind:
                field.set("type", kind)
            ET.SubElement(field, f"{{{NS_DATA}}}value").text = value
        iq = self.xmpp.make_iq_set()  # no 'to': our own account's PEP service
        iq.append(pubsub)
        try:
            await iq.send(timeout=IQ_TIMEOUT)
        except (IqError, IqTimeout) as error:
            raise PepPublishRefused(f"PEP publish refused: {describe_iq_error(error)} "
                                    f"(node {node}, account {self.xmpp.boundjid.bare})") from None

    async def _fetch(self, bare_jid, node):
        """The payload of the first item of `node` at `bare_jid`, or None if the node or item
        does not exist (item-not-found). Raises PepFetchFailed on any other error."""
        pubsub = ET.Element(f"{{{NS_PUBSUB}}}pubsub")
        ET.SubElement(pubsub, f"{{{NS_PUBSUB}}}items", node=node)
        iq = self.xmpp.make_iq_get(ito=bare_jid)
        iq.append(pubsub)
        try:
            result = await iq.send(timeout=IQ_TIMEOUT)
        except IqError as error:
            if error.iq["error"]["condition"] == "item-not-found":
                return None
            raise PepFetchFailed(f"PEP items request refused: {describe_iq_error(error)} "
                                 f"(node {node} at {bare_jid})") from None
        except IqTimeout as error:
            raise PepFetchFailed(f"PEP items request: {describe_iq_error(error)} (node {node} at {bare_jid})") from None
        items = result.xml.find(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}items")
        if items is None:
            raise PepFetchFailed(f"PEP items result without <items/> (node {node} at {bare_jid}): {result}")
        for item in items.findall(f"{{{NS_PUBSUB}}}item"):
            if len(item):
                return item[0]
        return None

    # -- python-omemo's abstract methods ------------------------------------------------

    async def _upload_bundle(self, bundle):
        if bundle.namespace != NS_OMEMO:
            raise omemo.UnknownNamespace(bundle.namespace)
        await self._publish(NODE_BUNDLE.format(bundle.device_id), oldmemo.etree.serialize_bundle(bundle))

    async def _download_bundle(self, namespace, bare_jid, device_id):
        if namespace != NS_OMEMO:
            raise omemo.UnknownNamespace(namespace)
        payload = await self._fetch(bare_jid, NODE_BUNDLE.format(device_id))
        if payload is None:
            raise omemo.BundleNotFound(f"no bundle for device {device_id} of {bare_jid}")
        try:
            return oldmemo.etree.parse_bundle(payload, bare_jid, device_id)
        except Exception as error:  # noqa: BLE001 - schema or key errors
            raise omemo.BundleDownloadFailed(f"bad bundle for device {device_id} of {bare_jid}: {error}") from error

    async def _delete_bundle(self, namespace, device_id):
        if namespace != NS_OMEMO:
            raise omemo.UnknownNamespace(namespace)
        pubsub = ET.Element(f"{{{NS_PUBSUB_OWNER}}}pubsub")
        ET.SubElement(pubsub, f"{{{NS_PUBSUB_OWNER}}}delete", node=NODE_BUNDLE.format(device_id))
        iq = self.xmpp.make_iq_set()
        iq.append(pubsub)
        try:
            await iq.send(timeout=IQ_TIMEOUT)
        except IqError as error:
            if error.iq["error"]["condition"] != "item-not-found":
                raise omemo.BundleDeletionFailed(describe_iq_error(error)) from None
        except IqTimeout as error:
            raise omemo.BundleDeletionFailed(describe_iq_error(error)) from None

    async def _upload_device_list(self, namespace, device_list):
        if namespace != NS_OMEMO:
            raise omemo.UnknownNamespace(namespace)
        await self._publish(NODE_DEVICELIST, oldmemo.etree.serialize_device_list(device_list))

    async def _download_device_list(self, namespace, bare_jid):
        if namespace != NS_OMEMO:
            raise omemo.UnknownNamespace(namespace)
        payload = await self._fetch(bare_jid, NODE_DEVICELIST)
        return parse_device_list(payload, f"device list of {bare_jid}", omemo.DeviceListDownloadFailed)

    async def _evaluate_custom_trust_level(self, device):
        levels = {TRUSTED: omemo.TrustLevel.TRUSTED, DISTRUSTED: omemo.TrustLevel.DISTRUSTED,
                  UNDECIDED: omemo.TrustLevel.UNDECIDED}
        if device.trust_level_name not in levels:
            raise omemo.UnknownTrustLevel(device.trust_level_name)
        return levels[device.trust_level_name]

    async def _make_trust_decision(self, undecided, identifier):
        # Blind trust: every device not decided on yet is trusted.
        for device in undecided:
            await self.set_trust(device.bare_jid, device.identity_key, TRUSTED)

    async def _send_message(self, message, bare_jid):
        # Messages python-omemo sends by itself (completing a key exchange, heartbeats): no body.
        self.xmpp.send(omemo_stanza(self.xmpp, bare_jid, message, body=None))


def parse_device_list(payload, what, error_type):
    """{device id: None} from a `<list/>` payload (None or an empty list: {})."""
    if payload is None:
        return {}
    if payload.tag != f"{{{NS_OMEMO}}}list":
        raise error_type(f"{what}: payload is <{payload.tag}>, not <list xmlns='{NS_OMEMO}'>")
    if len(payload) == 0:
        return {}  # oldmemo's schema wants at least one <device/>
    try:
        return oldmemo.etree.parse_device_list(payload)
    except Exception as error:  # noqa: BLE001 - schema errors
        raise error_type(f"{what}: {error}") from error


def omemo_stanza(client, bare_jid, message, body=FALLBACK_BODY):
    """A chat message to `bare_jid` carrying python-omemo's `message` as <encrypted/>."""
    stanza = client.make_message(mto=bare_jid, mtype="chat")
    stanza.append(oldmemo.etree.serialize_message(message))
    ET.SubElement(stanza.xml, f"{{{NS_EME}}}encryption", namespace=NS_OMEMO, name="OMEMO")
    ET.SubElement(stanza.xml, f"{{{NS_HINTS}}}store")
    if body is not None:
        stanza["body"] = body
    return stanza


# -- one OMEMO-enabled account ---------------------------------------------------------------

class OmemoPeer:
    """One logged-in slixmpp client with OMEMO: `await announce()` before initial presence
    matters (it sets up caps with +notify), `await start()` publishes bundle and device list."""

    def __init__(self, client):
        self.client = client
        self.jid = client.boundjid.bare
        self.manager = None
        self.device_id = None
        self.encrypted = asyncio.Queue()       # <message/> stanzas with <encrypted/>
        self.notifications = asyncio.Queue()   # (from bare JID, {device id: None}) of devicelist events
        self._handlers = []
        self._background = []

    async def announce(self):
        """Handlers for OMEMO messages and device-list notifications; XEP-0115 caps that
        include `eu.siacs.conversations.axolotl.devicelist+notify`; then initial presence.
        Subscription requests are left to the caller (see subscribe_mutually)."""
        client = self.client
        client.auto_authorize = None
        client.auto_subscribe = False
        for name, xpath, callback in (
                ("omemo message", f"{{{client.default_ns}}}message/{{{NS_OMEMO}}}encrypted", self.encrypted.put_nowait),
                ("omemo devicelist", f"{{{client.default_ns}}}message/{{{NS_PUBSUB_EVENT}}}event", self._on_event)):
            handler_name = f"{name} {id(self)}"
            client.register_handler(Callback(handler_name, MatchXPath(xpath), callback))
            self._handlers.append(handler_name)
        client.register_plugin("xep_0030")
        client.register_plugin("xep_0115")
        client["xep_0030"].add_feature(f"{NODE_DEVICELIST}+notify")
        await client["xep_0115"].update_caps(broadcast=False)
        client.send_presence()
        if os.environ.get("OMEMO_TRACE"):
            trace(client)

    def _on_event(self, stanza):
        items = stanza.xml.find(f"{{{NS_PUBSUB_EVENT}}}event/{{{NS_PUBSUB_EVENT}}}items")
        if items is None or items.get("node") != NODE_DEVICELIST:
            return
        sender = JID(stanza["from"]).bare or self.jid
        for item in items.findall(f"{{{NS_PUBSUB_EVENT}}}item"):
            payload = item[0] if len(item) else None
            try:
                devices = parse_device_list(payload, f"device list notification from {sender}", ValueError)
            except ValueError as error:
                devices = error
            self.notifications.put_nowait((sender, devices))

    async def start(self):
        """Creates the OMEMO identity (in memory): fetches our device list, publishes our
        bundle, then the device list with our device added."""
        manager_type = OmemoManager.bound_to(self.client)
        before = asyncio.all_tasks()
        storage = MemoryStorage()
        self.manager = await manager_type.create([oldmemo.Oldmemo(storage)], storage, self.jid, None, UNDECIDED)
        # create() leaves a signed-pre-key rotation loop running (it sleeps for days); keep it to cancel it.
        self._background = [task for task in asyncio.all_tasks() - before
                            if "manage_signed_pre_key_rotation" in getattr(task.get_coro(), "__qualname__", "")]
        # Out of "history synchronisation" mode: key-exchange answers are sent at once.
        await self.manager.after_history_sync()
        self.device_id = (await self.manager.get_own_device_information())[0].device_id
        return self.device_id

    async def device_list(self, bare_jid):
        """The device list at `bare_jid`'s PEP, fetched now; also fed to python-omemo."""
        devices = await self.manager._download_device_list(NS_OMEMO, bare_jid)
        await self.manager.update_device_list(NS_OMEMO, bare_jid, devices)
        return devices

    async def send(self, bare_jid, text):
        messages, errors = await self.manager.encrypt(frozenset([bare_jid]), {NS_OMEMO: text.encode("utf-8")})
        if errors:
            raise AssertionError(f"{self.jid}: encrypting for {bare_jid} failed for some devices: {set(errors)}")
        for message in messages:
            self.client.send(omemo_stanza(self.client, bare_jid, message))
        return messages

    async def receive(self, sender_bare_jid, timeout=WAIT):
        """Decrypts OMEMO messages as they arrive until one with content comes from
        `sender_bare_jid`; returns (plaintext, sending device id). Empty OMEMO messages
        (key-exchange answers) are decrypted and skipped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stanza = await asyncio.wait_for(self.encrypted.get(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(f"{self.jid}: no OMEMO message from {sender_bare_jid} within {timeout}s") from None
            sender = JID(stanza["from"]).bare
            element = stanza.xml.find(f"{{{NS_OMEMO}}}encrypted")
            message = await oldmemo.etree.parse_message(element, sender, self.jid, self.manager)
            plaintext, device, _ = await self.manager.decrypt(message)
            if plaintext is not None and sender == sender_bare_jid:
                return plaintext.decode("utf-8"), device.device_id

    async def device_list_notification(self, bare_jid, device_id, timeout=WAIT):
        """Waits for a PEP notification of `bare_jid`'s device list that lists `device_id`."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                sender, devices = await asyncio.wait_for(self.notifications.get(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"{self.jid}: no PEP notification of {bare_jid}'s device list ({NODE_DEVICELIST}) listing "
                    f"device {device_id} within {timeout}s (notifications seen: {seen or 'none'}; the client "
                    f"advertises {NODE_DEVICELIST}+notify in XEP-0115 caps and has a mutual presence subscription)") from None
            seen.append((sender, devices if isinstance(devices, Exception) else sorted(devices)))
            if sender == bare_jid and isinstance(devices, dict) and device_id in devices:
                await self.manager.update_device_list(NS_OMEMO, bare_jid, devices)
                return devices

    async def close(self):
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        for name in self._handlers:
            self.client.remove_handler(name)


def trace(client):
    """Prints PEP and OMEMO stanzas of `client` (OMEMO_TRACE=1)."""
    interesting = (NS_PUBSUB, NS_PUBSUB_EVENT, NS_PUBSUB_OWNER, NS_OMEMO, "disco#info", 'type="error"')

    def show(direction):
        def filter_(stanza):
            text = str(stanza)
            if any(ns in text for ns in interesting):
                print(f"[{client.boundjid.bare} {direction}] {text}", flush=True)
            return stanza
        return filter_
    client.add_filter("in", show("in"))
    client.add_filter("out", show("out"))


async def subscribe_mutually(a, b, timeout=WAIT):
    """Mutual presence subscription between two logged-in, available clients (PEP sends
    notifications to contacts with a subscription): returns once each has the other's
    available presence."""
    loop = asyncio.get_running_loop()
    pending = {}

    def watch(client, other, answer_with_subscribe):
        seen = loop.create_future()
        pending[client] = seen

        def on_subscribe(presence):
            if presence["from"].bare == other.boundjid.bare:
                client.send_presence(pto=other.boundjid.bare, ptype="subscribed")
                if answer_with_subscribe:
                    client.send_presence(pto=other.boundjid.bare, ptype="subscribe")

        def on_available(presence):
            if presence["from"] == other.boundjid and not seen.done():
                seen.set_result(presence)
        client.add_event_handler("presence_subscribe", on_subscribe)
        client.add_event_handler("presence_available", on_available)
        return on_subscribe, on_available

    handlers = {a: watch(a, b, False), b: watch(b, a, True)}
    try:
        a.send_presence(pto=b.boundjid.bare, ptype="subscribe")
        done, _ = await asyncio.wait(pending.values(), timeout=timeout)
        missing = [client.boundjid.bare for client, future in pending.items() if future not in done]
        if missing:
            raise AssertionError(f"mutual presence subscription: no available presence from the contact at {missing} within {timeout}s")
    finally:
        for client, (on_subscribe, on_available) in handlers.items():
            client.del_event_handler("presence_subscribe", on_subscribe)
            client.del_event_handler("presence_available", on_available)


async def omemo_conversation(alice_client, bob_client, log=lambda line: None):
    """The whole scenario between two logged-in clients that have not sent presence yet:
    caps + presence, mutual subscription, OMEMO set-up on both (PEP publish), each fetches the
    other's device list (must list the other's device), alice -> bob and bob -> alice
    messages decrypted, then each must have had a PEP notification of the other's device list.
    Raises AssertionError with the reason; returns a summary dict."""
    alice, bob = OmemoPeer(alice_client), OmemoPeer(bob_client)
    try:
        await alice.announce()
        await bob.announce()
        await subscribe_mutually(alice_client, bob_client)
        log("presence subscribed both ways")

        for peer in (alice, bob):
            try:
                await peer.start()
            except omemo.XMPPInteractionFailed as error:
                raise AssertionError(f"OMEMO set-up of {peer.jid}: {error}") from None
            log(f"{peer.jid}: device {peer.device_id}, bundle and device list published")

        for peer, other in ((alice, bob), (bob, alice)):
            try:
                devices = await peer.device_list(other.jid)
            except omemo.XMPPInteractionFailed as error:
                raise AssertionError(f"{peer.jid} fetching {other.jid}'s device list: {error}") from None
            assert other.device_id in devices, \
                f"{other.jid}'s device list fetched by {peer.jid} is {sorted(devices)}, without device {other.device_id}"
            log(f"{peer.jid} fetched {other.jid}'s device list: {sorted(devices)}")

        texts = {alice: "OMEMO from alice: Grüße 🎉 <&>", bob: "OMEMO reply from bob: ça marche ✓"}
        for sender, receiver in ((alice, bob), (bob, alice)):
            try:
                await sender.send(receiver.jid, texts[sender])
            except omemo.XMPPInteractionFailed as error:
                raise AssertionError(f"{sender.jid} encrypting for {receiver.jid}: {error}") from None
            plaintext, device_id = await receiver.receive(sender.jid)
            assert plaintext == texts[sender], f"{receiver.jid} decrypted {plaintext!r}, expected {texts[sender]!r}"
            assert device_id == sender.device_id, f"{receiver.jid}: message from device {device_id}, expected {sender.device_id}"
            log(f"{receiver.jid} decrypted {sender.jid}'s message: {plaintext!r}")

        for peer, other in ((alice, bob), (bob, alice)):
            await peer.device_list_notification(other.jid, other.device_id)
            log(f"{peer.jid} had a PEP notification of {other.jid}'s device list")
        return {"alice_device": alice.device_id, "bob_device": bob.device_id}
    finally:
        await alice.close()
        await bob.close()


# -- slixmpp clients and a throwaway Prosody, for the self-test ---------------------------------

async def connect(jid, password, port, mechanism=None, timeout=15.0):
    """A slixmpp client logged in over STARTTLS on 127.0.0.1:port (no certificate checks)."""
    client = ClientXMPP(jid, password, sasl_mech=mechanism)
    client.ssl_context.check_hostname = False
    client.ssl_context.verify_mode = ssl.CERT_NONE
    outcome = asyncio.get_running_loop().create_future()

    def settle(error=None):
        if not outcome.done():
            outcome.set_result(error)
    client.add_event_handler("session_start", lambda _: settle())
    client.add_event_handler("failed_all_auth", lambda _: settle(f"{jid}: authentication failed"))
    client.add_event_handler("disconnected", lambda reason: settle(f"{jid}: disconnected ({reason})"))
    client.add_event_handler("connection_failed", lambda error: settle(f"{jid}: connection failed ({error})"))
    client.connect((harness.HOST, port))
    try:
        error = await asyncio.wait_for(outcome, timeout)
    except asyncio.TimeoutError:
        error = f"{jid}: not logged in within {timeout}s"
    if error is not None:
        await disconnect(client)
        raise AssertionError(error)
    return client


async def disconnect(client):
    """Closes the stream (bounded), then slixmpp's send task."""
    client.cancel_connection_attempt()
    if client.transport is not None:
        try:
            await asyncio.wait_for(client.disconnect(wait=2.0), 4.0)
        except Exception:  # noqa: BLE001 - closing is best effort
            client.abort()
    sender = client._run_out_filters
    if sender is not None and not sender.done():
        sender.cancel()
        await asyncio.wait({sender}, timeout=1.0)


class Prosody:
    """Debian's Prosody 0.12 on a free loopback port, in a temporary directory, with mod_pep
    and two accounts; stopped by PID. c2s only (no s2s, no HTTP)."""

    DOMAIN = "localhost"

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="braid-omemo-prosody-")
        self.config = os.path.join(self.directory, "prosody.cfg.lua")
        self.port = harness.free_port()
        self.process = None

    def start(self, accounts):
        certificate, key = (os.path.join(self.directory, name) for name in ("server.crt", "server.key"))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", certificate, "-days", "2", "-subj", f"/CN={self.DOMAIN}",
                        "-addext", f"subjectAltName=DNS:{self.DOMAIN}"], check=True, capture_output=True, timeout=30)
        with open(self.config, "w") as config:
            config.write(f"""-- throwaway Prosody for Tests/Interop/omemo_client.py
run_as_root = true -- only matters when the tests run as root; it is a loopback test server
data_path = "{self.directory}/data"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{self.directory}/prosody.log" }} }}
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "pep", "ping" }}
modules_disabled = {{ "s2s", "s2s_auth_certs" }}
interfaces = {{ "{harness.HOST}" }}
c2s_ports = {{ {self.port} }}
ssl = {{ certificate = "{certificate}", key = "{key}" }}
c2s_require_encryption = true
authentication = "internal_hashed"
storage = "internal"
VirtualHost "{self.DOMAIN}"
""")
        os.makedirs(os.path.join(self.directory, "data"))
        for user, password in accounts:
            subprocess.run(["prosodyctl", "--config", self.config, "register", user, self.DOMAIN, password],
                           check=True, capture_output=True, timeout=60)
        output = open(os.path.join(self.directory, "prosody.out"), "ab")
        self.process = subprocess.Popen(["prosody", "--config", self.config, "-F"], cwd=self.directory,
                                        stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                        preexec_fn=harness._terminate_with_parent)
        output.close()
        harness.wait_for_port(self.port, time.monotonic() + 20, self.process)

    def log_tail(self, lines=30):
        try:
            with open(os.path.join(self.directory, "prosody.log"), errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


async def selftest_conversation(port, domain, password):
    clients = []
    try:
        for user in ("alice", "bob"):
            clients.append(await connect(f"{user}@{domain}", password, port, mechanism="SCRAM-SHA-1"))
        return await omemo_conversation(*clients, log=lambda line: print("  " + line, flush=True))
    finally:
        await asyncio.gather(*(disconnect(client) for client in clients), return_exceptions=True)


def selftest_prosody(timeout=90):
    if shutil.which("prosody") is None:
        print("FAIL omemo_selftest_prosody: prosody is not installed (apt-get install prosody)")
        return 1
    password = "omemo-selftest"
    server = Prosody()
    started = time.monotonic()
    try:
        server.start([("alice", password), ("bob", password)])
        print(f"prosody pid {server.process.pid} on {harness.HOST}:{server.port}", flush=True)
        result = asyncio.run(asyncio.wait_for(selftest_conversation(server.port, server.DOMAIN, password), timeout))
        print(f"PASS omemo_selftest_prosody (devices {result}, {time.monotonic() - started:.1f}s)")
        return 0
    except Exception as error:  # noqa: BLE001 - any error fails the self-test, with its reason
        if isinstance(error, asyncio.TimeoutError):
            error = f"timed out after {timeout}s"
        elif isinstance(error, subprocess.CalledProcessError):
            error = f"{error}: {(error.stderr or b'').decode(errors='replace').strip()}"
        elif not isinstance(error, (AssertionError, harness.HarnessError)):
            traceback.print_exc()
        print(f"FAIL omemo_selftest_prosody: {error}")
        print("--- prosody log (last lines) ---\n" + server.log_tail())
        return 1
    finally:
        server.stop()


def main(argv):
    if argv[1:] != ["--selftest-prosody"]:
        print(__doc__)
        print("usage: omemo_client.py --selftest-prosody")
        return 2
    if not os.environ.get("INTEROP_DEBUG"):
        logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    else:
        logging.basicConfig(level=logging.DEBUG)
    return selftest_prosody()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
