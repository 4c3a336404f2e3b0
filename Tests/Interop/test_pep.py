#!/usr/bin/python3
"""Personal eventing interop: Debian's slixmpp 1.8.3 PEP plugins against a real Braid.

Covers XEP-0084 avatars (xep_0084 over xep_0163/xep_0060): a contact whose entity
capabilities (xep_0115) carry `urn:xmpp:avatar:metadata+notify` gets the metadata
notification and fetches the data by id, hash-checked; a non-contact gets item-not-found
from a `presence` node and the bytes from an `open` one (publish-options, XEP-0223), and
publish-options on an existing node are preconditions. XEP-0402 bookmarks published through
xep_0223, seen by a XEP-0048 client (xep_0048 over xep_0049 private XML) and the other way
round, with PEP notifications for the rooms the legacy client adds and removes. And
caps-driven delivery (XEP-0163 §4.2, XEP-0115): a resource without `NODE+notify` gets no
notification of NODE while one with it does, until it adds the interest. And the last item
for a contact who becomes a subscriber while online (XEP-0163 §4.3.4).

Run with Debian's Python (the one that has slixmpp):
    BRAID_BINARY=/work/main/.build/debug/braid /usr/bin/python3 Tests/Interop/test_pep.py
Set INTEROP_DEBUG=1 to see slixmpp's own log, INTEROP_ONLY=name,name to run only those tests.
"""

import asyncio
import hashlib
import logging
import os
import random
import ssl
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, unique  # noqa: E402

from slixmpp import ClientXMPP, JID  # noqa: E402
from slixmpp.exceptions import IqError  # noqa: E402
from slixmpp.plugins.xep_0048.stanza import Bookmarks  # noqa: E402
from slixmpp.plugins.xep_0118.stanza import UserTune  # noqa: E402
from slixmpp.xmlstream import ET, ElementBase, register_stanza_plugin  # noqa: E402
from slixmpp.xmlstream.handler import Callback  # noqa: E402
from slixmpp.xmlstream.matcher import StanzaPath  # noqa: E402

DOMAIN_A = "alpha.test"
DOMAIN_B = "beta.test"
PASSWORD = "correct horse ✓"

AVATAR_DATA = "urn:xmpp:avatar:data"
AVATAR_METADATA = "urn:xmpp:avatar:metadata"
BOOKMARKS = "urn:xmpp:bookmarks:1"
TUNE = "http://jabber.org/protocol/tune"
# A node of this suite's own: a barrier. Notifications from one owner reach a resource in
# the order the owner published, so a tick that arrives after a publish proves that the
# earlier publish's notification, had there been one for this resource, came first.
CONTROL = "urn:braid:interop:control"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
CAPS = "http://jabber.org/protocol/caps"

LOGIN_TIMEOUT = 15.0    # connect, TLS, SASL, bind
WAIT = 5.0              # any single expected event or answer

if not os.environ.get("INTEROP_DEBUG"):
    # slixmpp logs the expected IQ errors (item-not-found, precondition-not-met) as errors.
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
else:
    logging.basicConfig(level=logging.DEBUG)


class Bookmark(ElementBase):
    """A XEP-0402 item payload (slixmpp 1.8.3 has no xep_0402 plugin)."""
    name = "conference"
    namespace = BOOKMARKS
    plugin_attrib = "bookmark"
    interfaces = {"autojoin", "name", "nick", "password"}
    sub_interfaces = {"nick", "password"}


class Tick(ElementBase):
    """The payload of the barrier node."""
    name = "tick"
    namespace = CONTROL
    plugin_attrib = "tick"


class Inbox:
    """Everything of one kind a client received, in order, and a way to wait for one."""

    def __init__(self):
        self.entries = []
        self.changed = asyncio.Event()

    def add(self, entry):
        self.entries.append(entry)
        self.changed.set()

    async def wait(self, match, what, timeout=WAIT, start=0):
        """The first entry from index `start` on that `match`es, waiting (bounded) for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for entry in self.entries[start:]:
                if match(entry):
                    return entry
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s (received: {[str(e) for e in self.entries]})")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass


class Notification:
    """One item of a `<message><event xmlns='…pubsub#event'><items/>` notification."""

    def __init__(self, sender, node, kind, item_id, payload):
        self.sender = sender
        self.node = node
        self.kind = kind          # publish or retract
        self.id = item_id
        self.payload = payload    # the item's payload element (publish), or None

    def __str__(self):
        return f"{self.kind} {self.node}#{self.id} from {self.sender}"


class Client(ClientXMPP):
    """A slixmpp client with PEP (xep_0060, xep_0115, xep_0163) and the given plugins; no
    certificate checks (self-signed); plain SCRAM-SHA-256 (see test_blocking.py); records
    the presences and PEP notifications it receives. `interests` are the extra nodes it
    asks notifications of (xep_0163's add_interest) once bound."""

    def __init__(self, jid, plugins=(), interests=()):
        super().__init__(jid, PASSWORD, sasl_mech="SCRAM-SHA-256")
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self._no_binding_flag()
        for plugin in ("xep_0030", "xep_0060", "xep_0115", "xep_0163", "xep_0223", *plugins):
            self.register_plugin(plugin)
        register_stanza_plugin(self["xep_0060"].stanza.Item, Bookmark)
        register_stanza_plugin(self["xep_0060"].stanza.EventItem, Bookmark)
        register_stanza_plugin(self["xep_0060"].stanza.Item, Tick)
        register_stanza_plugin(self["xep_0060"].stanza.EventItem, Tick)
        self.interests = list(interests)
        self.auto_authorize = None
        self.auto_subscribe = False
        self.presences = Inbox()
        self.notifications = Inbox()
        self.avatar_metadata = Inbox()
        self.add_event_handler("presence_available", self.presences.add)
        self.add_event_handler("presence_unavailable", self.presences.add)
        # slixmpp's own event for XEP-0084 metadata (xep_0084 maps the node to it).
        self.add_event_handler("avatar_metadata_publish", self.avatar_metadata.add)
        self.register_handler(Callback("interop notifications", StanzaPath("message/pubsub_event/items"), self._on_items))

    def _no_binding_flag(self):
        """SCRAM with the gs2 flag 'n' (see test_blocking.py)."""
        mechanisms = self["feature_mechanisms"]
        default = mechanisms.sasl_callback

        def callback(required, optional):
            values = default(required, optional)
            if "channel_binding" in values:
                values["channel_binding"] = None
            return values
        mechanisms.sasl_callback = callback

    def _on_items(self, message):
        items = message["pubsub_event"]["items"]
        for item in items:
            kind = "retract" if item.name == "retract" else "publish"
            payload = next(iter(item.xml), None) if kind == "publish" else None
            self.notifications.add(Notification(message["from"].full, items["node"], kind, item["id"], payload))

    def received(self, node, kind="publish"):
        return [n for n in self.notifications.entries if n.node == node and n.kind == kind]


async def login(server, jid, **options):
    """Connects, authenticates, advertises its interests (the caps hash computed before the
    first presence) and sends initial presence; returns once the server has processed it."""
    client = Client(jid, **options)
    outcome = asyncio.get_running_loop().create_future()

    def settle(error=None):
        if not outcome.done():
            outcome.set_result(error)
    client.add_event_handler("session_start", lambda _: settle())
    client.add_event_handler("failed_all_auth", lambda _: settle(AssertionError(f"{jid}: SASL failed")))
    client.add_event_handler("disconnected", lambda reason: settle(AssertionError(f"{jid}: disconnected ({reason})")))
    client.connect((harness.HOST, server.starttls_port))
    try:
        error = await asyncio.wait_for(outcome, LOGIN_TIMEOUT)
        if error is not None:
            raise error
        # slixmpp keys disco data by the bound JID; the interests its plugins registered at
        # creation were keyed by the JID asked for, so the server must have bound that one.
        assert client.boundjid.full == jid, f"asked for {jid}, bound {client.boundjid.full}"
        for namespace in client.interests:
            client["xep_0163"].add_interest(namespace)
        # add_interest schedules the caps update without waiting; the presence must carry
        # the final `ver`, so it is computed here, before the presence goes out.
        await client["xep_0115"].update_caps(broadcast=False)
        client.send_presence()
        await sync(client)
    except BaseException:
        await close(client)
        raise
    return client


async def sync(client):
    """A roster get and its answer: the server handles a session's stanzas in order, so
    whatever it did with what the client sent before is done (see test_blocking.py)."""
    iq = client.Iq()
    iq["type"] = "get"
    iq.enable("roster")
    await iq.send(timeout=WAIT)


# Bounded slixmpp disconnect, shared by the suites.
close = harness.close_client


class Clients:
    """Closes every client a test logged in, whatever happens in the test."""

    def __init__(self, server):
        self.server = server
        self.clients = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await asyncio.gather(*(close(client) for client in self.clients), return_exceptions=True)

    async def login(self, jid, **options):
        client = await login(self.server, jid, **options)
        self.clients.append(client)
        return client


def new_account(server, domain, prefix):
    jid = f"{unique(prefix)}@{domain}"
    server.add_user(jid, PASSWORD)
    return jid


async def refused(request, what):
    """Awaits an IQ that must fail; returns the IqError."""
    try:
        result = await request
    except IqError as error:
        return error
    raise AssertionError(f"{what}: expected an error, got {result}")


def pubsub_condition(error):
    """The XEP-0060 condition (pubsub#errors) of an IQ error, if any."""
    element = error.iq.xml.find("{jabber:client}error")
    for child in (list(element) if element is not None else []):
        if child.tag.startswith("{http://jabber.org/protocol/pubsub#errors}"):
            return child.tag.split("}", 1)[1]
    return None


async def subscribe_mutually(first, second):
    """Both subscribe to each other through the clients, as a user would."""
    for asker, answerer in ((first, second), (second, first)):
        asker.send_presence(pto=answerer.boundjid.bare, ptype="subscribe")
        await sync(asker)
        answerer.send_presence(pto=asker.boundjid.bare, ptype="subscribed")
        await sync(answerer)


async def announce_to(client, owner):
    """`client` sends available presence again and `owner` receives it with caps: the PEP
    service has seen which notifications that resource wants (the presence passes the
    service on its way to the owner)."""
    count = len(owner.presences.entries)
    client.send_presence()
    await sync(client)
    presence = await owner.presences.wait(lambda p: p["from"] == client.boundjid and p["type"] == "available",
                                          f"{client.boundjid}'s presence at {owner.boundjid}", start=count)
    caps = presence.xml.find(f"{{{CAPS}}}c")
    assert caps is not None and caps.get("ver") and caps.get("hash") == "sha-1", \
        f"{client.boundjid}'s presence carries no XEP-0115 caps: {presence}"


def png(seed, side=24):
    """A real PNG (RGB, side × side) with pseudo-random pixels, a few kilobytes."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    rows = random.Random(seed)
    raw = b"".join(b"\x00" + bytes(rows.randrange(256) for _ in range(side * 3)) for _ in range(side))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def publish_options(client, **fields):
    """A XEP-0223 publish-options form with pubsub#FIELD values."""
    form = client["xep_0004"].stanza.Form()
    form["type"] = "submit"
    form.add_field(var="FORM_TYPE", ftype="hidden", value=PUBLISH_OPTIONS)
    for name, value in fields.items():
        form.add_field(var=f"pubsub#{name}", value=value)
    return form


async def publish_avatar(client, data, **options):
    """XEP-0084's "User Publishes Data" then "User Publishes Metadata Notification": the data
    (item id = SHA-1 hex of the bytes), then the metadata pointing at it, through xep_0084;
    returns the id."""
    avatar_id = hashlib.sha1(data).hexdigest()
    form = (lambda: publish_options(client, **options)) if options else (lambda: None)
    await client["xep_0084"].publish_avatar(data, options=form(), timeout=WAIT)
    await client["xep_0084"].publish_avatar_metadata({"id": avatar_id, "type": "image/png", "bytes": len(data)},
                                                     options=form(), timeout=WAIT)
    return avatar_id


async def fetch_avatar(client, owner, avatar_id):
    """The data item by id (XEP-0084's "Subscribers Retrieve Data") through xep_0084, decoded."""
    result = await client["xep_0084"].retrieve_avatar(JID(owner), avatar_id, timeout=WAIT)
    items = list(result["pubsub"]["items"])
    assert [item["id"] for item in items] == [avatar_id], f"items for id {avatar_id}: {result}"
    return items[0]["avatar_data"]["value"]


def metadata_infos(message):
    """The <info/> of a metadata notification, as (id, bytes, type)."""
    metadata = message["pubsub_event"]["items"]["item"].xml.find(f"{{{AVATAR_METADATA}}}metadata")
    assert metadata is not None, f"no metadata payload in {message}"
    return [(info.get("id"), info.get("bytes"), info.get("type")) for info in metadata.findall(f"{{{AVATAR_METADATA}}}info")]


# -- XEP-0084 avatars ----------------------------------------------------------------------

@test(timeout=60)
async def avatar_reaches_contact_and_not_strangers(ctx):
    """alice publishes an avatar (data, then metadata) through xep_0084; bob, a mutual
    contact whose caps carry metadata+notify (xep_0084 registers it), gets the metadata
    notification and fetches the data by id, hash-checked, but no data notification (he did
    not ask for one); carol, a stranger, gets item-not-found for the data and the metadata."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    carol_jid = new_account(ctx.server, DOMAIN_A, "carol")
    picture = png(1)
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid + "/phone", plugins=["xep_0084"])
        bob = await clients.login(bob_jid + "/desk", plugins=["xep_0084"], interests=[CONTROL])
        carol = await clients.login(carol_jid + "/laptop")
        await subscribe_mutually(alice, bob)
        await announce_to(bob, alice)

        avatar_id = await publish_avatar(alice, picture)
        message = await bob.avatar_metadata.wait(lambda m: m["from"].bare == alice_jid, "alice's avatar metadata at bob")
        assert metadata_infos(message) == [(avatar_id, str(len(picture)), "image/png")], f"metadata: {message}"
        assert message["pubsub_event"]["items"]["item"]["id"] == avatar_id, f"metadata item id: {message}"
        # XEP-0163 §4.3.1: from the account's bare JID.
        assert message["from"].full == alice_jid, f"notification from {message['from']}, expected {alice_jid}"

        data = await fetch_avatar(bob, alice_jid, avatar_id)
        assert hashlib.sha1(data).hexdigest() == avatar_id and data == picture, \
            f"bob fetched {len(data)} bytes with SHA-1 {hashlib.sha1(data).hexdigest()}, expected {avatar_id}"

        # bob's caps say nothing of urn:xmpp:avatar:data+notify. The barrier: a tick on a
        # node he does want, published after the data.
        await alice["xep_0163"].publish(Tick(), node=CONTROL, id="after-avatar", timeout=WAIT)
        await bob.notifications.wait(lambda n: n.node == CONTROL and n.id == "after-avatar", "the control tick at bob")
        assert bob.received(AVATAR_DATA) == [], \
            f"bob got data notifications without data+notify: {[str(n) for n in bob.received(AVATAR_DATA)]}"

        for node, item_id in ((AVATAR_DATA, avatar_id), (AVATAR_METADATA, avatar_id)):
            error = await refused(carol["xep_0060"].get_item(alice_jid, node, item_id, timeout=WAIT), f"carol reading {node}")
            assert error.condition == "item-not-found", f"carol reading alice's {node}: <{error.condition}/> {error.iq}"
        await sync(carol)
        assert carol.notifications.entries == [], f"carol got notifications: {[str(n) for n in carol.notifications.entries]}"


@test(timeout=60)
async def avatar_with_open_access_model(ctx):
    """With publish-options access_model=open (XEP-0223) the nodes are created open: a
    stranger reads the data by id; the options on a later publish are preconditions
    (XEP-0060 §7.1.5): asking for `presence` on the open node is refused with
    precondition-not-met, and asking for `open` again is accepted."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    carol_jid = new_account(ctx.server, DOMAIN_B, "carol")
    picture = png(2)
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid + "/phone", plugins=["xep_0084"])
        carol = await clients.login(carol_jid + "/laptop", plugins=["xep_0084"])
        avatar_id = await publish_avatar(alice, picture, access_model="open")
        data = await fetch_avatar(carol, alice_jid, avatar_id)
        assert data == picture and hashlib.sha1(data).hexdigest() == avatar_id, \
            f"carol fetched {len(data)} bytes with SHA-1 {hashlib.sha1(data).hexdigest()}, expected {avatar_id}"
        metadata = await carol["xep_0060"].get_items(alice_jid, AVATAR_METADATA, max_items=1, timeout=WAIT)
        infos = [(info.get("id"), info.get("bytes")) for info in metadata.xml.iter(f"{{{AVATAR_METADATA}}}info")]
        assert infos == [(avatar_id, str(len(picture)))], f"metadata as carol reads it: {metadata}"

        second = png(3)
        error = await refused(alice["xep_0084"].publish_avatar(second, options=publish_options(alice, access_model="presence"), timeout=WAIT),
                              "a publish asking for `presence` on an open node")
        assert error.condition == "conflict" and pubsub_condition(error) == "precondition-not-met", \
            f"publish with unmet publish-options: <{error.condition}/> {pubsub_condition(error)} {error.iq}"
        # The refused item is not there: an empty <items/> or item-not-found (XEP-0060
        # leaves the choice open), never the item; the first avatar still is.
        refused_id = hashlib.sha1(second).hexdigest()
        try:
            result = await carol["xep_0060"].get_item(alice_jid, AVATAR_DATA, refused_id, timeout=WAIT)
            assert [item["id"] for item in result["pubsub"]["items"]] == [], f"the refused item was stored: {result}"
        except IqError as error:
            assert error.condition == "item-not-found", f"reading the refused item: <{error.condition}/>"
        assert await fetch_avatar(carol, alice_jid, avatar_id) == picture, "the first avatar after the refused publish"

        third = png(4)
        third_id = await publish_avatar(alice, third, access_model="open")
        assert await fetch_avatar(carol, alice_jid, third_id) == third, "the avatar published with met preconditions"


@test(timeout=60)
async def last_avatar_reaches_a_new_subscriber(ctx):
    """XEP-0163 §4.3.4: the last published item goes to every new subscriber. alice has an
    avatar; bob, online with metadata+notify, accepts alice's subscription request and asks
    for hers, which alice accepts: bob is now a contact with an available resource that
    wants avatar metadata, and gets alice's current one without reconnecting."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid + "/phone", plugins=["xep_0084"])
        avatar_id = await publish_avatar(alice, png(5))
        bob = await clients.login(bob_jid + "/desk", plugins=["xep_0084"])
        await subscribe_mutually(alice, bob)
        message = await bob.avatar_metadata.wait(lambda m: m["from"].bare == alice_jid,
                                                 "alice's avatar metadata at bob once he is subscribed to her")
        assert [info[0] for info in metadata_infos(message)] == [avatar_id], f"metadata: {message}"


# -- XEP-0402 bookmarks and XEP-0048 compatibility ---------------------------------------

def bookmark(nick, name, autojoin):
    payload = Bookmark()
    payload["name"] = name
    payload["autojoin"] = "true" if autojoin else "false"
    payload["nick"] = nick
    return payload


def bookmark_fields(payload):
    """(autojoin, name, nick) of a XEP-0402 <conference/> element, autojoin as a bool."""
    assert payload is not None and payload.tag == f"{{{BOOKMARKS}}}conference", f"not a XEP-0402 bookmark: {payload}"
    nick = payload.find(f"{{{BOOKMARKS}}}nick")
    return (payload.get("autojoin") in ("true", "1"), payload.get("name"), nick.text if nick is not None else None)


async def bookmark_items(client):
    """The user's XEP-0402 items through xep_0223's retrieve: {room: (autojoin, name, nick)}."""
    result = await client["xep_0223"].retrieve(BOOKMARKS, timeout=WAIT)
    return {item["id"]: bookmark_fields(item.xml.find(f"{{{BOOKMARKS}}}conference")) for item in result["pubsub"]["items"]}


async def legacy_bookmarks(client):
    """XEP-0048 bookmarks in private XML through xep_0048: {room: (autojoin, name, nick)}."""
    result = await client["xep_0048"].get_bookmarks(timeout=WAIT)
    return {str(c["jid"]): (c["autojoin"], c["name"], c["nick"]) for c in result["private"]["bookmarks"]["conferences"]}


@test(timeout=60)
async def bookmarks_between_xep_0402_and_xep_0048(ctx):
    """A XEP-0402 client (caps with urn:xmpp:bookmarks:1+notify) publishes a room through
    xep_0223 with XEP-0402's publish-options and is notified of it; a XEP-0048 client of the
    same account (xep_0048 over xep_0049 private XML) reads it; the legacy client adds a room
    and the XEP-0402 client gets its item notified and listed; the legacy client removes the
    first room and the XEP-0402 client gets the retraction (XEP-0402's compatibility with
    XEP-0048, which the server announces as urn:xmpp:bookmarks:1#compat)."""
    jid = new_account(ctx.server, DOMAIN_A, "alice")
    first = f"{unique('first')}@conference.{DOMAIN_A}"
    second = f"{unique('second')}@conference.{DOMAIN_B}"
    async with Clients(ctx.server) as clients:
        modern = await clients.login(jid + "/modern", interests=[BOOKMARKS])
        legacy = await clients.login(jid + "/legacy", plugins=["xep_0048"])
        info = await modern["xep_0030"].get_info(jid=jid, timeout=WAIT)
        assert f"{BOOKMARKS}#compat" in info["disco_info"]["features"], f"the account's features: {info['disco_info']['features']}"

        options = publish_options(modern, max_items="max", send_last_published_item="never")
        await modern["xep_0223"].store(bookmark("Alice ✓", "First room", True), node=BOOKMARKS, id=first,
                                       options=options, timeout=WAIT)
        own = await modern.notifications.wait(lambda n: n.node == BOOKMARKS and n.id == first, "the notification of the published room")
        assert own.kind == "publish" and bookmark_fields(own.payload) == (True, "First room", "Alice ✓"), \
            f"the published room as notified: {own} {ET.tostring(own.payload) if own.payload is not None else None}"
        # XEP-0163 §4.3.1: from the account's bare JID.
        assert own.sender == jid, f"notification from {own.sender!r}, expected the account {jid}"

        assert await legacy_bookmarks(legacy) == {first: (True, "First room", "Alice ✓")}, "XEP-0048 view of the XEP-0402 room"

        marks = Bookmarks()
        marks.add_conference(first, "Alice ✓", name="First room", autojoin=True)
        marks.add_conference(second, "al", name="Second room", autojoin=False)
        await legacy["xep_0048"].set_bookmarks(marks, timeout=WAIT)
        added = await modern.notifications.wait(lambda n: n.node == BOOKMARKS and n.id == second, "the notification of the room added through XEP-0048")
        assert added.kind == "publish" and bookmark_fields(added.payload) == (False, "Second room", "al"), \
            f"the room added through XEP-0048 as notified: {added} {ET.tostring(added.payload) if added.payload is not None else None}"
        assert await bookmark_items(modern) == {first: (True, "First room", "Alice ✓"), second: (False, "Second room", "al")}, \
            "XEP-0402 items after the XEP-0048 addition"

        marks = Bookmarks()
        marks.add_conference(second, "al", name="Second room", autojoin=False)
        await legacy["xep_0048"].set_bookmarks(marks, timeout=WAIT)
        gone = await modern.notifications.wait(lambda n: n.node == BOOKMARKS and n.kind == "retract", "the retraction of the room removed through XEP-0048")
        assert gone.id == first, f"retracted {gone.id}, expected {first}"
        assert await bookmark_items(modern) == {second: (False, "Second room", "al")}, "XEP-0402 items after the XEP-0048 removal"
        assert await legacy_bookmarks(legacy) == {second: (False, "Second room", "al")}, "XEP-0048 view after the removal"
        # The legacy client asked for no XEP-0402 notifications and got none.
        await sync(legacy)
        assert legacy.received(BOOKMARKS) == [] and legacy.received(BOOKMARKS, "retract") == [], \
            f"the XEP-0048 client got XEP-0402 notifications: {[str(n) for n in legacy.notifications.entries]}"


# -- caps-driven notifications (XEP-0163 §4.2, XEP-0115) ---------------------------------

@test(timeout=60)
async def notifications_follow_notify_features(ctx):
    """Two resources of a contact: one with http://jabber.org/protocol/tune+notify (xep_0118
    registers it), one without. alice publishes a tune through xep_0118: the first gets it;
    the second, after a later control tick that it does want has arrived, has not (and may
    still read the item). The owner's own resource without tune+notify gets none either.
    When the second adds the interest and sends presence with the new caps, it gets the
    next tune."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid + "/home", interests=[CONTROL])
        await alice["xep_0163"].publish(Tick(), node=CONTROL, id="t0", timeout=WAIT)
        # The owner's resource is notified too: its caps are known.
        await alice.notifications.wait(lambda n: n.node == CONTROL and n.id == "t0", "the first tick at alice")

        # The subscription first (from a resource that wants nothing), so that bob's two
        # resources are newly available to a contact when they come (§4.3.3 item 2).
        await subscribe_mutually(alice, await clients.login(bob_jid + "/setup"))
        eager = await clients.login(bob_jid + "/eager", plugins=["xep_0118"], interests=[CONTROL])
        plain = await clients.login(bob_jid + "/plain", interests=[CONTROL])
        for client in (eager, plain):
            # Once the service knows what the resource wants, it sends it the last tick: from
            # here on, notifications to it do not wait for its caps.
            await client.notifications.wait(lambda n: n.node == CONTROL and n.id == "t0", f"the last tick at {client.boundjid}")

        tunes = Inbox()
        eager.add_event_handler("user_tune_publish", tunes.add)
        await publish_tune(alice, "First ✓")
        message = await tunes.wait(lambda m: m["from"].bare == alice_jid, "alice's tune at bob/eager")
        assert message["pubsub_event"]["items"]["item"]["tune"]["title"] == "First ✓", f"tune: {message}"

        await alice["xep_0163"].publish(Tick(), node=CONTROL, id="t1", timeout=WAIT)
        for client in (plain, alice):
            await client.notifications.wait(lambda n: n.node == CONTROL and n.id == "t1", f"the tick after the tune at {client.boundjid}")
            assert client.received(TUNE) == [], f"{client.boundjid} got tune notifications without tune+notify: {[str(n) for n in client.received(TUNE)]}"
        # Not notified, yet allowed to read (a contact of a `presence` node).
        items = await plain["xep_0060"].get_items(alice_jid, TUNE, max_items=1, timeout=WAIT)
        titles = [title.text for title in items.xml.iter(f"{{{TUNE}}}title")]
        assert titles == ["First ✓"], f"the tune as bob/plain reads it: {items}"

        # bob/plain now wants tunes: new caps in a new presence. (Whether the last tune comes
        # then is left open: XEP-0163 §4.3.3 asks it for initial presence only.)
        plain["xep_0163"].add_interest(TUNE)
        await plain["xep_0115"].update_caps(broadcast=False)
        await announce_to(plain, alice)
        await publish_tune(alice, "Second")
        await plain.notifications.wait(lambda n: n.node == TUNE and n.payload is not None and n.payload.findtext(f"{{{TUNE}}}title") == "Second",
                                       "the next tune at bob/plain")
        await tunes.wait(lambda m: m["pubsub_event"]["items"]["item"]["tune"]["title"] == "Second", "the next tune at bob/eager")


async def publish_tune(client, title):
    """A XEP-0118 tune (the stanza class of slixmpp's xep_0118) published through xep_0163,
    by a client that did not register xep_0118 and so has no tune+notify of its own."""
    tune = UserTune()
    tune["artist"] = "Braid"
    tune["title"] = title
    await client["xep_0163"].publish(tune, node=TUNE, timeout=WAIT)


def main():
    return harness.run_suite(harness.collect_tests(globals()), domains=[DOMAIN_A, DOMAIN_B])


if __name__ == "__main__":
    sys.exit(main())
