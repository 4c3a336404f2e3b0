#!/usr/bin/python3
"""Client interop: Debian's slixmpp 1.8.3 against a real Braid server.

Covers SCRAM-SHA-256 logins on two hosted domains (STARTTLS and direct TLS), SASL failures,
cross-domain presence subscriptions, Unicode messages, offline delivery with XEP-0203 delay
(its order relative to live messages, and the per-account limit), XEP-0198 resumption after
a dropped TCP connection, domains added at run time, directed messages and roster pushes;
group chat (XEP-0045): rooms, kicks, bans, destruction, persistent rooms across a restart,
and invitations (mediated, and XEP-0249's direct ones); OMEMO between two users over PEP
(omemo_client.py, python-omemo from Debian).

Run with Debian's Python (the one that has slixmpp):
    /usr/bin/python3 Tests/Interop/test_clients.py
Set INTEROP_DEBUG=1 to see slixmpp's own log, INTEROP_ONLY=name,name to run only those tests.
"""

import asyncio
import base64
import datetime
import logging
import os
import socket
import ssl
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, unique  # noqa: E402

from slixmpp import ClientXMPP, JID  # noqa: E402
from slixmpp.exceptions import IqError, PresenceError  # noqa: E402
from slixmpp.xmlstream.handler import Callback  # noqa: E402
from slixmpp.xmlstream.matcher import StanzaPath  # noqa: E402

DOMAIN_A = "alpha.test"
DOMAIN_B = "beta.test"
PASSWORD = "correct horse ✓"
OFFLINE_LIMIT = 3

LOGIN_TIMEOUT = 15.0    # connect, TLS, SASL, bind
WAIT = 5.0              # any single expected event
QUIET = 1.0             # how long "nothing more arrives" is watched

if not os.environ.get("INTEROP_DEBUG"):
    # slixmpp logs expected failures (wrong passwords, dropped sockets) as errors.
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
else:
    logging.basicConfig(level=logging.DEBUG)


class LoginFailed(Exception):
    pass


class Client(ClientXMPP):
    """A slixmpp client set up for tests: no certificate checks, no automatic subscription
    handling, and queues of what it receives."""

    def __init__(self, jid, password, mechanism="SCRAM-SHA-256", stream_management=False, plugins=()):
        super().__init__(jid, password, sasl_mech=mechanism)
        # Self-signed certificates: verification off; ALPN for direct TLS (XEP-0368).
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.ssl_context.set_alpn_protocols(["xmpp-client"])
        self.register_plugin("xep_0203")  # delayed delivery
        if stream_management:
            self.register_plugin("xep_0198")
            # Request an ack after every stanza sent, so acknowledgements never lag behind.
            self["xep_0198"].window = 1
        # Plugins that read the stream features (XEP-0352's) must be there before connecting.
        for plugin in plugins:
            self.register_plugin(plugin)
        # Tests decide themselves how to answer subscription requests.
        self.auto_authorize = None
        self.auto_subscribe = False
        if mechanism is not None:
            self._skip_plus_downgrade_flag()
        # mechanism None: slixmpp's own defaults, untouched (it then picks the mechanism).

        self.messages = asyncio.Queue()
        self.message_errors = asyncio.Queue()
        self.available = asyncio.Queue()
        self.subscribe_requests = asyncio.Queue()
        self.roster_pushes = asyncio.Queue()
        self.sasl_failures = []      # serialized <failure/> elements
        self.sasl_conditions = []    # their condition names
        self.sasl_challenges = []    # decoded SCRAM server-first messages
        self.events = []             # names of lifecycle events seen, in order

        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("message_error", self.message_errors.put_nowait)
        self.add_event_handler("presence_available", self.available.put_nowait)
        self.add_event_handler("presence_subscribe", self.subscribe_requests.put_nowait)
        self.add_event_handler("roster_update", self._on_roster_update)
        self.add_event_handler("failed_auth", self._on_sasl_failure)
        for name in ("auth_success", "session_start", "sm_enabled", "session_resumed", "disconnected", "sm_failed"):
            self.add_event_handler(name, lambda _event, name=name: self.events.append(name))
        self.add_filter("in", self._record_challenge)

    def _skip_plus_downgrade_flag(self):
        """Make SCRAM send the gs2 flag 'n' rather than 'y'.

        slixmpp sends 'y' ("I support channel binding but think the server does not")
        whenever TLS gives it binding data, even when the server offers -PLUS and the test
        deliberately picks plain SCRAM-SHA-256. RFC 5802 §6 requires a server that offers
        -PLUS to reject 'y' as a downgrade, so for a non-PLUS login the honest flag is 'n'.
        """
        mechanisms = self["feature_mechanisms"]
        default_callback = mechanisms.sasl_callback

        def callback(required, optional):
            values = default_callback(required, optional)
            if "channel_binding" in values and not (mechanisms.use_mech or "").endswith("-PLUS"):
                values["channel_binding"] = None
            return values
        mechanisms.sasl_callback = callback

    def _on_sasl_failure(self, failure):
        self.sasl_failures.append(str(failure))
        self.sasl_conditions.append(failure["condition"])

    def _on_roster_update(self, iq):
        # Results of our own roster gets also raise roster_update; only pushes are sets.
        if iq["type"] == "set":
            self.roster_pushes.put_nowait(iq)

    def _record_challenge(self, stanza):
        # Match on the element itself: slixmpp's SASL stanza classes report jabber:client.
        if stanza.xml.tag == "{urn:ietf:params:xml:ns:xmpp-sasl}challenge":
            self.sasl_challenges.append(base64.b64decode(stanza.xml.text or "").decode("utf-8", "replace"))
        return stanza

    @property
    def mechanism_used(self):
        mech = self["feature_mechanisms"].mech
        return mech.name if mech is not None else None


async def wait_event(client, name, timeout=WAIT):
    """Waits for the next `name` event of `client` and returns its payload."""
    future = asyncio.get_running_loop().create_future()

    def done(payload):
        if not future.done():
            future.set_result(payload)
    client.add_event_handler(name, done, disposable=True)
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"{client.boundjid}: no '{name}' event within {timeout}s (events: {client.events})") from None


def start_connect(client, server, direct_tls):
    if direct_tls:
        client.connect((harness.HOST, server.direct_tls_port), use_ssl=True)
    else:
        client.connect((harness.HOST, server.starttls_port))


async def login(server, jid, password=PASSWORD, direct_tls=False, stream_management=False,
                presence=True, timeout=LOGIN_TIMEOUT, mechanism="SCRAM-SHA-256", plugins=()):
    """Connects and authenticates with SCRAM-SHA-256 (or `mechanism`; None for slixmpp's
    defaults); returns the client once the session (and, if asked for, XEP-0198) is up.
    Raises LoginFailed with the reason otherwise."""
    client = Client(jid, password, mechanism=mechanism, stream_management=stream_management, plugins=plugins)
    loop = asyncio.get_running_loop()
    outcome = loop.create_future()

    def settle(error=None):
        if not outcome.done():
            outcome.set_result(error)
    client.add_event_handler("session_start", lambda _: settle())
    client.add_event_handler("failed_all_auth", lambda _: settle(LoginFailed(f"SASL failed: {client.sasl_failures}")))
    client.add_event_handler("stream_error", lambda error: settle(LoginFailed(f"stream error <{error['condition']}/>")))
    client.add_event_handler("disconnected", lambda reason: settle(LoginFailed(f"disconnected ({reason})")))
    client.add_event_handler("connection_failed", lambda error: settle(LoginFailed(f"connection failed: {error}")))
    sm_enabled = None
    if stream_management:
        sm_enabled = loop.create_future()
        client.add_event_handler("sm_enabled", lambda stanza: sm_enabled.done() or sm_enabled.set_result(stanza))
    start_connect(client, server, direct_tls)
    try:
        error = await asyncio.wait_for(outcome, timeout)
        if error is not None:
            raise error
        if sm_enabled is not None:
            await asyncio.wait_for(sm_enabled, WAIT)
        if presence:
            await become_available(client)
    except BaseException:
        await close(client)
        raise
    return client


async def become_available(client):
    """Sends initial presence and returns once the server has processed it.

    Braid handles one session's stanzas in order, so the answer to a roster get sent after
    the presence proves the presence was handled: the account is available before the test
    goes on, and a message sent next cannot race it into offline storage.
    """
    client.send_presence()
    await roster_items(client)


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


def new_account(server, domain, prefix="user"):
    jid = f"{unique(prefix)}@{domain}"
    server.add_user(jid, PASSWORD)
    return jid


async def next_item(queue, what, timeout=WAIT):
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


async def expect_nothing(queue, what, timeout=QUIET):
    """Asserts that nothing arrives on `queue` for `timeout` seconds."""
    try:
        item = await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"unexpected {what}: {item}")


async def roster_items(client):
    """The roster as the server has it now (a fresh roster get, not slixmpp's cache)."""
    iq = client.Iq()
    iq["type"] = "get"
    iq.enable("roster")
    result = await iq.send(timeout=WAIT)
    return {str(jid): dict(item) for jid, item in result["roster"]["items"].items()}


async def roster_set(client, jid, **item):
    iq = client.Iq()
    iq["type"] = "set"
    iq["roster"]["items"] = {jid: item}
    return await iq.send(timeout=WAIT)


# -- tests -------------------------------------------------------------------------------

@test(timeout=45)
async def scram_sha_256_login_on_two_domains(ctx):
    for domain, direct_tls in ((DOMAIN_A, False), (DOMAIN_B, True)):
        jid = new_account(ctx.server, domain)
        async with Clients(ctx.server) as clients:
            client = await clients.login(jid, direct_tls=direct_tls, presence=False)
            how = "direct TLS" if direct_tls else "STARTTLS"
            assert client.mechanism_used == "SCRAM-SHA-256", f"{jid} ({how}) used {client.mechanism_used}"
            # slixmpp checked the server signature (v=) before raising auth_success.
            assert client["feature_mechanisms"].mech._mutual_auth, f"{jid}: server signature not verified"
            assert client.events[:2] == ["auth_success", "session_start"], client.events
            assert client.boundjid.bare == jid, f"bound {client.boundjid}, expected {jid}/..."
            assert client.boundjid.resource, f"{jid}: no resource bound"
            tls = client.transport.get_extra_info("ssl_object")
            assert tls is not None, f"{jid} ({how}): not encrypted"
            if direct_tls:
                assert tls.selected_alpn_protocol() == "xmpp-client", f"ALPN {tls.selected_alpn_protocol()!r}"
            # The session works: the server answers a roster get for this account.
            assert await roster_items(client) == {}, f"{jid}: new account has a non-empty roster"


@test(timeout=45)
async def wrong_password_and_unknown_user_fail_alike(ctx):
    jid = new_account(ctx.server, DOMAIN_A)
    outcomes = {}
    for label, login_jid, password in (("wrong password", jid, "not the password"),
                                       ("unknown user", f"nobody-{unique('x')}@{DOMAIN_A}", PASSWORD)):
        client = Client(login_jid, password)
        try:
            start_connect(client, ctx.server, direct_tls=False)
            await wait_event(client, "failed_all_auth", timeout=LOGIN_TIMEOUT)
        finally:
            await close(client)
        assert "session_start" not in client.events, f"{label}: a session started"
        assert len(client.sasl_failures) == 1, f"{label}: failures {client.sasl_failures}"
        assert client.mechanism_used == "SCRAM-SHA-256", f"{label}: used {client.mechanism_used}"
        outcomes[label] = client
    wrong, unknown = outcomes["wrong password"], outcomes["unknown user"]
    for label, client in outcomes.items():
        # RFC 6120 §6.5.10: bad credentials, whichever part was wrong.
        assert client.sasl_conditions == ["not-authorized"], f"{label}: {client.sasl_failures}"
    assert wrong.sasl_failures == unknown.sasl_failures, (
        f"failures differ: wrong password {wrong.sasl_failures} vs unknown user {unknown.sasl_failures}")
    # The unknown account also got a full SCRAM challenge with the same iteration count and
    # salt size, so the exchange does not reveal which accounts exist.
    assert len(wrong.sasl_challenges) == len(unknown.sasl_challenges) == 1, (wrong.sasl_challenges, unknown.sasl_challenges)

    def fields(challenge):
        return dict(part.split("=", 1) for part in challenge.split(","))
    real, fake = fields(wrong.sasl_challenges[0]), fields(unknown.sasl_challenges[0])
    assert real["i"] == fake["i"], f"iteration counts differ: {real['i']} vs {fake['i']}"
    assert len(base64.b64decode(real["s"])) == len(base64.b64decode(fake["s"])), "salt sizes differ"


async def answer_subscription(client, expected_from, subscribe_back):
    """Approves the next subscription request (which must come from `expected_from`)."""
    request = await next_item(client.subscribe_requests, f"subscription request at {client.boundjid}")
    assert request["from"].bare == expected_from, f"subscription request from {request['from']}, expected {expected_from}"
    client.send_presence(pto=expected_from, ptype="subscribed")
    if subscribe_back:
        client.send_presence(pto=expected_from, ptype="subscribe")


async def wait_for_roster_item(client, jid, subscription, timeout=WAIT):
    """Polls the server roster until `jid` has `subscription` and no pending ask."""
    deadline = time.monotonic() + timeout
    while True:
        item = (await roster_items(client)).get(jid)
        if item is not None and item.get("subscription") == subscription and not item.get("ask"):
            return item
        if time.monotonic() > deadline:
            raise AssertionError(f"{client.boundjid.bare}'s roster item for {jid} is {item}, expected subscription '{subscription}'")
        await asyncio.sleep(0.1)


async def expect_available_from(client, full_jid, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        presence = await next_item(client.available, f"available presence from {full_jid} at {client.boundjid}",
                                   max(0.01, deadline - time.monotonic()))
        if presence["from"] == full_jid:
            return presence


@test(timeout=45)
async def mutual_subscription_across_domains(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        bob = await clients.login(bob_jid)
        alice.send_presence(pto=bob_jid, ptype="subscribe")
        await answer_subscription(bob, alice_jid, subscribe_back=True)
        await answer_subscription(alice, bob_jid, subscribe_back=False)

        alice_item = await wait_for_roster_item(alice, bob_jid, "both")
        bob_item = await wait_for_roster_item(bob, alice_jid, "both")
        assert alice_item.get("ask") in (None, ""), alice_item
        assert bob_item.get("ask") in (None, ""), bob_item
        # Approving a subscription makes the server send the contact's current presence.
        await expect_available_from(alice, bob.boundjid.full)
        await expect_available_from(bob, alice.boundjid.full)


UNICODE_BODIES = [
    "Grüße aus Köln, ça va? ¿Qué tal?",
    "日本語のメッセージ、中文消息、한국어 메시지",
    "astral plane: 🎉 👩‍💻 𝄞 🇫🇷",
    "right to left: שלום עולם — مرحبا بالعالم",
    "markup must survive: <b>&amp;</b> \"double\" 'single' ]]>",
    "combining e\u0301 vs precomposed é, zero-width\u200bspace",
    "lines\nand\ttabs",
]


@test(timeout=45)
async def unicode_messages_both_ways(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        bob = await clients.login(bob_jid)
        for sender, receiver in ((alice, bob), (bob, alice)):
            for body in UNICODE_BODIES:
                sender.send_message(mto=receiver.boundjid.bare, mbody=body, mtype="chat")
            for body in UNICODE_BODIES:
                message = await next_item(receiver.messages, f"message {body!r} at {receiver.boundjid}")
                assert message["body"] == body, f"{receiver.boundjid} got {message['body']!r}, expected {body!r}"
                assert message["from"] == sender.boundjid.full, f"from {message['from']}, expected {sender.boundjid.full}"
                assert message["to"].bare == receiver.boundjid.bare, f"to {message['to']}"
                assert message["type"] == "chat", f"type {message['type']}"
            await expect_nothing(receiver.messages, f"extra message at {receiver.boundjid}", timeout=0.3)
        assert alice.message_errors.empty() and bob.message_errors.empty(), "a message bounced"


@test(timeout=45)
async def offline_message_delivered_with_delay(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    body = "stored while you were away — ✉"
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        sent_at = datetime.datetime.now(datetime.timezone.utc)
        alice.send_message(mto=bob_jid, mbody=body, mtype="chat")
        await expect_nothing(alice.message_errors, "error bounce for the offline message", timeout=QUIET)

        bob = await clients.login(bob_jid)  # sends initial presence: offline messages follow
        message = await next_item(bob.messages, "the offline message")
        received_at = datetime.datetime.now(datetime.timezone.utc)
        assert message["body"] == body, f"body {message['body']!r}"
        assert message["from"] == alice.boundjid.full, f"from {message['from']}, expected {alice.boundjid.full}"
        assert message["type"] == "chat", f"type {message['type']}"
        delay = message.xml.find("{urn:xmpp:delay}delay")
        assert delay is not None, f"no XEP-0203 <delay/> on the offline message: {message}"
        stamp = message["delay"]["stamp"]
        assert stamp is not None and stamp.tzinfo is not None, f"bad delay stamp {delay.get('stamp')!r}"
        slack = datetime.timedelta(seconds=2)
        assert sent_at - slack <= stamp <= received_at + slack, f"stamp {stamp} not between {sent_at} and {received_at}"
        assert delay.get("from") == DOMAIN_B, f"delay from={delay.get('from')!r}, expected the storing server {DOMAIN_B}"
        await expect_nothing(bob.messages, "second copy of the offline message")

    # Delivered means removed from storage: a new login gets nothing.
    async with Clients(ctx.server) as clients:
        bob = await clients.login(bob_jid)
        await expect_nothing(bob.messages, "offline message delivered again on the next login")


@test(timeout=45)
async def offline_messages_stay_ahead_of_later_live_ones(ctx):
    """RFC 6120 §10.1: messages from one sender reach the recipient in the order sent.

    Bob is connected but not yet available, so Alice's first message is stored offline.
    Then Bob sends initial presence while Alice keeps writing: the stored message must
    still come first, followed by the live ones in order.
    """
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    bodies = [f"in order {index}" for index in range(11)]
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        bob = await clients.login(bob_jid, presence=False)
        alice.send_message(mto=bob_jid, mbody=bodies[0], mtype="chat")
        await asyncio.sleep(0.5)  # stored by now (no bounce expected, none arrives)
        assert alice.message_errors.empty(), f"first message bounced: {alice.message_errors.get_nowait()}"
        bob.send_presence()
        for body in bodies[1:]:
            alice.send_message(mto=bob_jid, mbody=body, mtype="chat")
            await asyncio.sleep(0.002)  # spread the live messages over the presence handling
        got = []
        for _ in bodies:
            message = await next_item(bob.messages, f"message {len(got) + 1} of {len(bodies)} (got so far: {got})")
            got.append(message["body"])
            if message["body"] == bodies[0]:
                assert message.xml.find("{urn:xmpp:delay}delay") is not None, "stored message without <delay/>"
        assert got == bodies, f"delivery order {[bodies.index(b) if b in bodies else b for b in got]}, expected 0..{len(bodies) - 1}"
        await expect_nothing(bob.messages, "duplicate message", timeout=0.3)


@test(timeout=45)
async def offline_storage_limit_bounces_the_excess(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    bodies = [f"offline {index}" for index in range(OFFLINE_LIMIT + 1)]
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        for body in bodies:
            alice.send_message(mto=bob_jid, mbody=body, mtype="chat")
        bounce = await next_item(alice.message_errors, f"error for message {OFFLINE_LIMIT + 1} over the offline limit")
        # RFC 6120 §8.3.1: the error carries the original payload, so this names the 4th one.
        assert bounce["body"] == bodies[-1], f"bounced {bounce['body']!r}, expected {bodies[-1]!r}"
        assert bounce["error"]["condition"] == "service-unavailable", f"condition {bounce['error']['condition']}"
        assert bounce["from"].bare == bob_jid, f"bounce from {bounce['from']}"
        await expect_nothing(alice.message_errors, "more than one bounce")

        bob = await clients.login(bob_jid)
        got = [(await next_item(bob.messages, "stored message"))["body"] for _ in range(OFFLINE_LIMIT)]
        assert got == bodies[:OFFLINE_LIMIT], f"stored {got}, expected {bodies[:OFFLINE_LIMIT]}"
        await expect_nothing(bob.messages, "message beyond the limit")


def cut_connection(client):
    """Drops the TCP connection with a RST: no </stream:stream>, no TLS close_notify."""
    sock = client.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.transport.abort()


@test(timeout=60)
async def stream_management_resumes_without_loss(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid, stream_management=True)
        bob = await clients.login(bob_jid)
        sm = alice["xep_0198"]
        assert sm.sm_id, "sm_enabled without an id: resumption not offered"
        bound_before = alice.boundjid.full

        # One message before the cut, handled by Alice: it must not come back after resuming.
        bob.send_message(mto=bound_before, mbody="before the cut", mtype="chat")
        first = await next_item(alice.messages, "message before the cut")
        assert first["body"] == "before the cut", first["body"]

        cut_connection(alice)
        await wait_event(alice, "disconnected")
        # Give the server a moment to notice the reset, so the following messages meet a
        # detached session (the case XEP-0198 resumption exists for).
        await asyncio.sleep(0.3)
        # Three to the full JID, two to the bare JID: a detached session is still an
        # available resource, so both kinds must wait for it (RFC 6121 §8.5.2.1.1).
        bodies = [f"while away {index} ⏳" for index in range(1, 6)]
        for index, body in enumerate(bodies):
            bob.send_message(mto=bound_before if index < 3 else alice_jid, mbody=body, mtype="chat")
        await asyncio.sleep(0.3)

        resumed = asyncio.ensure_future(wait_event(alice, "session_resumed", timeout=LOGIN_TIMEOUT))
        start_connect(alice, ctx.server, direct_tls=False)
        await resumed
        assert "session_start" not in alice.events[alice.events.index("disconnected"):], (
            f"a new session was bound instead of resuming: {alice.events}")
        assert alice.boundjid.full == bound_before, f"resumed as {alice.boundjid}, was {bound_before}"

        got = []
        for _ in bodies:
            message = await next_item(alice.messages, f"message {len(got) + 1} of {len(bodies)} after resumption")
            got.append(message["body"])
            assert message["from"] == bob.boundjid.full, f"from {message['from']}"
        assert got == bodies, f"after resumption got {got}, expected {bodies}"
        await expect_nothing(alice.messages, "duplicate after resumption", timeout=1.5)
        assert bob.message_errors.empty(), f"Bob got a bounce: {bob.message_errors.get_nowait()}"

        # The resumed stream carries traffic both ways.
        alice.send_message(mto=bob.boundjid.full, mbody="back again", mtype="chat")
        reply = await next_item(bob.messages, "message from the resumed session")
        assert reply["body"] == "back again" and reply["from"] == bound_before, f"{reply['from']}: {reply['body']!r}"


@test(timeout=45)
async def domain_added_at_runtime_is_usable(ctx):
    domain = f"{unique('runtime')}.test"
    ctx.server.add_domain(domain)
    added = time.monotonic()
    jid = new_account(ctx.server, domain)
    failures = []
    # Braid polls the database every 250 ms; retry logins that come too early, but only
    # for two seconds after the domain was added.
    while True:
        attempt_started = time.monotonic()
        try:
            client = await login(ctx.server, jid, presence=False)
            break
        except LoginFailed as failure:
            failures.append(str(failure))
            if attempt_started - added > 2.0:
                raise AssertionError(f"{domain} still unusable 2s after 'braid domain add': {failures}") from None
            await asyncio.sleep(0.1)
    try:
        assert client.boundjid.bare == jid, f"bound {client.boundjid}"
        assert client.mechanism_used == "SCRAM-SHA-256", client.mechanism_used
        assert all("host-unknown" in failure for failure in failures), f"unexpected failures before success: {failures}"
    finally:
        await close(client)


@test(timeout=45)
async def directed_message_reaches_only_that_resource(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        phone = await clients.login(bob_jid + "/phone")
        laptop = await clients.login(bob_jid + "/laptop")
        assert (phone.boundjid.full, laptop.boundjid.full) == (bob_jid + "/phone", bob_jid + "/laptop"), (
            phone.boundjid, laptop.boundjid)
        for target, other in ((laptop, phone), (phone, laptop)):
            body = f"only for {target.boundjid.resource} 📱"
            alice.send_message(mto=target.boundjid.full, mbody=body, mtype="chat")
            message = await next_item(target.messages, f"directed message at {target.boundjid}")
            assert message["body"] == body, f"{target.boundjid} got {message['body']!r}"
            assert message["to"] == target.boundjid.full, f"to {message['to']}"
            assert message["from"] == alice.boundjid.full, f"from {message['from']}"
            await expect_nothing(other.messages, f"copy of a message for {target.boundjid} at {other.boundjid}")


async def expect_push(client, jid, what):
    push = await next_item(client.roster_pushes, f"roster push ({what}) at {client.boundjid}")
    # RFC 6121 §2.1.6: a push comes from the account itself (or carries no 'from').
    assert push["from"] in (JID(""), JID(client.boundjid.bare)), f"push from {push['from']}"
    items = {str(key): dict(value) for key, value in push["roster"]["items"].items()}
    assert list(items) == [jid], f"push at {client.boundjid} names {list(items)}, expected [{jid}]"
    return items[jid]


@test(timeout=45)
async def roster_get_set_remove_with_pushes(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    carol_jid = f"{unique('carol')}@{DOMAIN_B}"
    async with Clients(ctx.server) as clients:
        first = await clients.login(alice_jid + "/first")
        second = await clients.login(alice_jid + "/second")
        # Pushes go to "interested" resources: those that asked for the roster (§2.1.6).
        assert await roster_items(first) == {}
        assert await roster_items(second) == {}

        result = await roster_set(first, carol_jid, name="Carol ✿", groups=["Friends", "Café"])
        assert result["type"] == "result", f"roster set answered {result['type']}"
        for client in (first, second):
            item = await expect_push(client, carol_jid, "add")
            assert item["name"] == "Carol ✿", item
            assert sorted(item["groups"]) == ["Café", "Friends"], item
            assert item["subscription"] == "none", item
        items = await roster_items(second)
        assert list(items) == [carol_jid], items
        assert items[carol_jid]["name"] == "Carol ✿" and sorted(items[carol_jid]["groups"]) == ["Café", "Friends"], items
        assert items[carol_jid]["subscription"] == "none", items

        await roster_set(second, carol_jid, name="Caroline", groups=[])
        for client in (first, second):
            item = await expect_push(client, carol_jid, "update")
            assert item["name"] == "Caroline" and item["groups"] == [], item

        await roster_set(first, carol_jid, subscription="remove")
        for client in (first, second):
            item = await expect_push(client, carol_jid, "remove")
            assert item["subscription"] == "remove", item
        assert await roster_items(first) == {}, "item still there after remove"
        for client in (first, second):
            await expect_nothing(client.roster_pushes, f"extra roster push at {client.boundjid}", timeout=0.3)


GO_SENDXMPP = "/usr/bin/go-sendxmpp"


def go_sendxmpp_command(server, jid, *args):
    """Debian's go-sendxmpp as JID over STARTTLS (it sends a newline after <starttls/> and
    after </auth>, which Braid once refused)."""
    if not os.path.exists(GO_SENDXMPP):
        raise harness.HarnessError(f"{GO_SENDXMPP} is missing (apt-get install go-sendxmpp; Scripts/setup test does)")
    return [GO_SENDXMPP, "-u", jid, "-p", PASSWORD, "-j", f"{harness.HOST}:{server.starttls_port}", "-n", *args]


async def run_go_sendxmpp(server, jid, args, stdin_text=None, timeout=20):
    """Runs go-sendxmpp to completion; returns (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        *go_sendxmpp_command(server, jid, "--timeout", "10", *args),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(stdin_text.encode() if stdin_text else None), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, output.decode(errors="replace")


@test(timeout=60)
async def go_sendxmpp_sends_over_starttls(ctx):
    sender = new_account(ctx.server, DOMAIN_A, "gosend")
    receiver_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        receiver = await clients.login(receiver_jid)
        body = f"from go-sendxmpp ✓ {unique('m')}"
        code, output = await run_go_sendxmpp(ctx.server, sender, [receiver_jid], stdin_text=body + "\n")
        assert code == 0, f"go-sendxmpp exited {code}: {output[-500:]}"
        message = await next_item(receiver.messages, f"go-sendxmpp's message at {receiver_jid}", timeout=15)
        assert message["body"].strip() == body, f"got {message['body']!r}"
        assert message["from"].bare == sender, f"from {message['from']}, expected {sender}"


@test(timeout=60)
async def go_sendxmpp_listens(ctx):
    listener = new_account(ctx.server, DOMAIN_A, "golisten")
    sender_jid = new_account(ctx.server, DOMAIN_B, "alice")
    process = await asyncio.create_subprocess_exec(
        *go_sendxmpp_command(ctx.server, listener, "-l"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        body = f"to go-sendxmpp ✓ {unique('m')}"
        async with Clients(ctx.server) as clients:
            sender = await clients.login(sender_jid)
            # Until go-sendxmpp's session is up, a message to its bare JID would go offline:
            # send again (bounded) until it prints one.
            seen = ""
            deadline = time.monotonic() + 20
            while body not in seen and time.monotonic() < deadline:
                sender.send_message(mto=listener, mbody=body, mtype="chat")
                try:
                    line = await asyncio.wait_for(process.stdout.readline(), 1.0)
                except asyncio.TimeoutError:
                    continue
                if not line:
                    break
                seen += line.decode(errors="replace")
            assert body in seen, f"go-sendxmpp -l printed {seen[-500:]!r}"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()


@test(timeout=60)
async def fresh_directory_any_command_first(ctx):
    """Issue 10, item 7: in a fresh directory `braid user add alice@localhost` works before
    `braid serve` ever ran: every command applies the embedded default (localhost)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="braid-fresh-") as directory:
        env = {key: value for key, value in os.environ.items() if not key.startswith("BRAID_")}
        result = subprocess.run([ctx.server.binary, "user", "add", "alice@localhost", "--password", "secret"],
                                cwd=directory, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"user add exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
        listed = subprocess.run([ctx.server.binary, "domain", "list"], cwd=directory, env=env,
                                capture_output=True, text=True, timeout=30)
        assert "localhost" in listed.stdout, f"domain list: {listed.stdout!r} {listed.stderr!r}"


@test(timeout=60)
async def muc_room_with_slixmpp(ctx):
    """Issue 11: slixmpp's XEP-0045 plugin creates a room at conference.DOMAIN (no setup for
    the domain), accepts it with the configuration form, and two users chat in it, to the room
    and privately; history reaches a later arrival."""
    owner_jid = new_account(ctx.server, DOMAIN_A, "mucowner")
    guest_jid = new_account(ctx.server, DOMAIN_B, "mucguest")
    late_jid = new_account(ctx.server, DOMAIN_A, "muclate")
    room = f"{unique('room')}@conference.{DOMAIN_A}"
    async with Clients(ctx.server) as clients:
        owner = await login(ctx.server, owner_jid)
        clients.clients.append(owner)
        guest = await login(ctx.server, guest_jid)
        clients.clients.append(guest)
        for client in (owner, guest):
            client.register_plugin("xep_0045")
        presence, subject, occupants, history = await owner["xep_0045"].join_muc_wait(room, "owner", timeout=WAIT)
        codes = {status for status in presence["muc"]["status_codes"]}
        assert {110, 201} <= codes, f"creation statuses: {codes}"
        # A new room is locked until configured (XEP-0045 §10.1): the form, submitted as is.
        form = await owner["xep_0045"].get_room_config(room)
        await owner["xep_0045"].set_room_config(room, form)
        await guest["xep_0045"].join_muc_wait(room, "guest", timeout=WAIT)
        # The guest's presence reaches the owner on the owner's own connection, which may be
        # read a moment after the guest's: wait (bounded) for it.
        deadline = asyncio.get_running_loop().time() + WAIT
        while set(owner["xep_0045"].get_roster(room)) != {"owner", "guest"} and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        roster = owner["xep_0045"].get_roster(room)
        assert set(roster) == {"owner", "guest"}, f"occupants: {roster}"

        async def body_from(client, sender, body):
            deadline = asyncio.get_running_loop().time() + WAIT
            while True:
                message = await next_item(client.messages, f"{body!r} from {sender}",
                                          timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
                if str(message["from"]) == sender and message["body"] == body:
                    return message

        owner.send_message(mto=room, mbody="welcome", mtype="groupchat")
        for client in (owner, guest):
            await body_from(client, f"{room}/owner", "welcome")
        guest.send_message(mto=f"{room}/owner", mbody="just for you", mtype="chat")
        private = await body_from(owner, f"{room}/guest", "just for you")
        assert private["type"] == "chat", f"private message type {private['type']}"

        late = await login(ctx.server, late_jid)
        clients.clients.append(late)
        late.register_plugin("xep_0045")
        _, _, occupants, history = await late["xep_0045"].join_muc_wait(room, "late", maxstanzas=5, timeout=WAIT)
        assert [message["body"] for message in history] == ["welcome"], f"history: {[str(m) for m in history]}"


# -- history on every device: the message archive (XEP-0313) ----------------------------------

@test(timeout=60)
async def mam_second_device_pages_history_with_slixmpp(ctx):
    """Issue 14: slixmpp's XEP-0313 plugin on a second device pages through what the first
    device received, forwards and backwards, and every message carries the stanza-id
    (XEP-0359) the archive gave it."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "mamalice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "mambob")
    bodies = [f"history {index} — ✓" for index in range(7)]
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        phone = await clients.login(bob_jid)
        for body in bodies:
            alice.send_message(mto=bob_jid, mbody=body, mtype="chat")
        delivered = []
        for body in bodies:
            message = await next_item(phone.messages, f"{body!r} on the phone")
            assert message["body"] == body, f"phone got {message['body']!r}"
            stanza_id = message.xml.find("{urn:xmpp:sid:0}stanza-id")
            assert stanza_id is not None and stanza_id.get("by") == bob_jid, f"no stanza-id by {bob_jid}: {message}"
            delivered.append(stanza_id.get("id"))

        laptop = await login(ctx.server, bob_jid + "/laptop")
        clients.clients.append(laptop)
        laptop.register_plugin("xep_0313")
        forwards = []
        async for message in laptop["xep_0313"].iterate(with_jid=JID(alice_jid), rsm={"max": 3}):
            forwards.append(message)
        got = [m["mam_result"]["forwarded"]["stanza"]["body"] for m in forwards]
        assert got == bodies, f"forwards: {got}"
        assert [m["mam_result"]["id"] for m in forwards] == delivered, "the archive's ids are the delivered stanza-ids"
        stamps = [m["mam_result"]["forwarded"]["delay"]["stamp"] for m in forwards]
        assert all(stamp is not None for stamp in stamps) and stamps == sorted(stamps), f"delay stamps {stamps}"
        # Backwards, page by page, from before the newest message (slixmpp's own reverse
        # iterator stops after one page: it takes first index + page size == count as the end,
        # which holds for the newest page; and it sends <before>True</before> for "the last
        # page", so that case is left to the Swift tests).
        backwards = []
        anchor = delivered[-1]
        while True:
            page = await laptop["xep_0313"].retrieve(rsm={"max": 2, "before": anchor}, timeout=WAIT)
            got = [m["mam_result"]["forwarded"]["stanza"]["body"] for m in page["mam"]["results"]]
            backwards = got + backwards
            if page["mam_fin"]["complete"] or not got:
                break
            anchor = page["mam_fin"]["rsm"]["first"]
        assert backwards == bodies[:-1], f"backwards: {backwards}"
        # alice's archive has what she sent.
        alice.register_plugin("xep_0313")
        sent = [m["mam_result"]["forwarded"]["stanza"]["body"] async for m in alice["xep_0313"].iterate(rsm={"max": 10})]
        assert sent == bodies, f"alice's archive: {sent}"


# -- group chat: moderation, destruction, persistence, invitations --------------------------

MUC_USER = "http://jabber.org/protocol/muc#user"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DATA_FORMS = "jabber:x:data"


async def muc_login(clients, jid):
    """Logs `jid` in with slixmpp's XEP-0045 plugin and a queue of the room presence it gets."""
    client = await clients.login(jid)
    client.register_plugin("xep_0045")
    client.muc_presences = asyncio.Queue()
    client.add_event_handler("groupchat_presence", client.muc_presences.put_nowait)
    return client


async def enter(client, room, nick):
    """Enters `room` as `nick` (slixmpp's join_muc_wait); returns the self-presence. A refusal
    raises slixmpp's PresenceError."""
    try:
        presence, _subject, _occupants, _history = await client["xep_0045"].join_muc_wait(room, nick, timeout=WAIT)
    except asyncio.TimeoutError:
        raise AssertionError(f"{client.boundjid}: entering {room}/{nick} got no answer within {WAIT}s") from None
    return presence


async def entry_refused(client, room, nick, problems):
    """Tries to enter `room` as `nick`, which must be refused; returns the error condition.

    slixmpp's join_muc_wait recognises a refusal only when it carries the join element
    (<x xmlns='http://jabber.org/protocol/muc'/>) back, as every refusal in XEP-0045 §7.2
    does; without it the client waits forever. The refusal is read from the raw stanza, and
    a missing join element goes to `problems` rather than ending the test.
    """
    loop = asyncio.get_running_loop()
    refusal = loop.create_future()
    occupant = JID(f"{room}/{nick}")

    def on_error(presence):
        if presence["from"] == occupant and not refusal.done():
            refusal.set_result(presence)
    handler = f"refusal {unique('h')}"
    client.register_handler(Callback(handler, StanzaPath("presence@type=error"), on_error))
    joining = asyncio.ensure_future(enter(client, room, nick))
    try:
        await asyncio.wait({joining, refusal}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if not refusal.done():
            if joining.done():
                raise AssertionError(f"{client.boundjid} entered {room} as {nick}: {joining.result()}")
            raise AssertionError(f"{client.boundjid}: entering {room} as {nick} got no answer within {WAIT}s")
        error = refusal.result()
        if error.xml.find("{http://jabber.org/protocol/muc}x") is None:
            problems.append(f"the refusal of {occupant} (<{error['error']['condition']}/>) lacks the "
                            f"<x xmlns='http://jabber.org/protocol/muc'/> join element, so slixmpp's join_muc_wait "
                            f"never returns: {error}")
        else:
            try:
                await asyncio.wait_for(joining, WAIT)
            except PresenceError as seen:
                assert seen.condition == error["error"]["condition"], f"slixmpp saw <{seen.condition}/>: {error}"
            except asyncio.TimeoutError:
                raise AssertionError(f"slixmpp did not see the refusal {error}") from None
        return error["error"]["condition"]
    finally:
        client.remove_handler(handler)
        joining.cancel()
        await asyncio.gather(joining, return_exceptions=True)


async def iq_refused(request, what):
    """Awaits an IQ request that must fail; returns its IqError."""
    try:
        result = await request
    except IqError as error:
        return error
    raise AssertionError(f"{what} was accepted: {result}")


def muc_x(presence):
    x = presence.xml.find(f"{{{MUC_USER}}}x")
    assert x is not None, f"no muc#user <x/> in {presence}"
    return x


def status_codes(presence):
    return {status.get("code") for status in muc_x(presence).findall(f"{{{MUC_USER}}}status")}


def muc_item(presence):
    item = muc_x(presence).find(f"{{{MUC_USER}}}item")
    assert item is not None, f"no <item/> in {presence}"
    return item


def item_reason(presence):
    return muc_item(presence).findtext(f"{{{MUC_USER}}}reason")


async def create_room(owner, room, nick, **fields):
    """`owner` creates `room` (status 201) and submits the configuration form with `fields`
    ({field var: value}) changed; the room is unlocked when this returns."""
    presence = await enter(owner, room, nick)
    assert {"110", "201"} <= status_codes(presence), f"creating {room}: statuses {status_codes(presence)}"
    form = await owner["xep_0045"].get_room_config(room, timeout=WAIT)
    for var, value in fields.items():
        assert var in form.get_fields(), f"the configuration form of {room} has no {var}: {list(form.get_fields())}"
        form.field[var]["value"] = value
    await owner["xep_0045"].set_room_config(room, form, timeout=WAIT)


async def room_presence(client, occupant, what, unavailable=True, timeout=WAIT):
    """The next room presence from `occupant` (an occupant JID) at `client`, of type
    unavailable or not; others before it are skipped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        presence = await next_item(client.muc_presences, f"{what} at {client.boundjid}", timeout=max(0.1, deadline - loop.time()))
        if str(presence["from"]) == occupant and (presence["type"] == "unavailable") == unavailable:
            return presence


async def room_body(client, room, what, timeout=WAIT):
    """The next message with a body from `room` (or one of its occupants) at `client`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await next_item(client.messages, f"{what} at {client.boundjid}", timeout=max(0.1, deadline - loop.time()))
        if message["from"].bare == room and message["body"]:
            return message


async def room_info(client, room):
    """disco#info of `room`: (identities, features, muc#roominfo fields). Raises IqError."""
    result = await client.make_iq_get(queryxmlns=DISCO_INFO, ito=room).send(timeout=WAIT)
    query = result.xml.find(f"{{{DISCO_INFO}}}query")
    assert query is not None, f"disco#info of {room} without a query: {result}"
    identities = [(identity.get("category"), identity.get("type"), identity.get("name"))
                  for identity in query.findall(f"{{{DISCO_INFO}}}identity")]
    features = {feature.get("var") for feature in query.findall(f"{{{DISCO_INFO}}}feature")}
    roominfo = {}
    for form in query.findall(f"{{{DATA_FORMS}}}x"):
        fields = {field.get("var"): field.findtext(f"{{{DATA_FORMS}}}value") for field in form.findall(f"{{{DATA_FORMS}}}field")}
        if fields.get("FORM_TYPE") == "http://jabber.org/protocol/muc#roominfo":
            roominfo = fields
    return identities, features, roominfo


@test(timeout=60)
async def muc_kick_with_reason(ctx):
    """Kicking (muc#admin role 'none' with a reason): a participant may not; the owner may.
    The kicked occupant gets its unavailable presence with 307 and 110, everyone else with
    307, all with role 'none' and the reason; after it, a groupchat message of the kicked
    user bounces with not-acceptable and reaches nobody."""
    owner_jid = new_account(ctx.server, DOMAIN_A, "kickowner")
    victim_jid = new_account(ctx.server, DOMAIN_B, "kicked")
    witness_jid = new_account(ctx.server, DOMAIN_A, "kickwitness")
    room = f"{unique('kick')}@conference.{DOMAIN_A}"
    reason = f"mind your manners ✂ {unique('r')}"
    problems = []
    async with Clients(ctx.server) as clients:
        owner = await muc_login(clients, owner_jid)
        victim = await muc_login(clients, victim_jid)
        witness = await muc_login(clients, witness_jid)
        await create_room(owner, room, "owner")
        await enter(victim, room, "victim")
        await enter(witness, room, "witness")

        # Only moderators kick; a participant's attempt is refused and changes nothing.
        error = await iq_refused(witness["xep_0045"].set_role(room, "victim", "none", timeout=WAIT), "a participant's kick")
        assert error.condition == "forbidden", f"a participant's kick: <{error.condition}/>, expected <forbidden/>"

        await owner["xep_0045"].set_role(room, "victim", "none", reason=reason, timeout=WAIT)
        for client, itself in ((victim, True), (witness, False), (owner, False)):
            presence = await room_presence(client, f"{room}/victim", "the kicked occupant's unavailable presence")
            codes = status_codes(presence)
            assert "307" in codes, f"{client.boundjid}: kick presence without status 307: {presence}"
            assert ("110" in codes) == itself, f"{client.boundjid}: status 110 {'missing' if itself else 'wrongly present'}: {presence}"
            assert muc_item(presence).get("role") == "none", f"{client.boundjid}: kick presence with role {muc_item(presence).get('role')!r}"
            if item_reason(presence) != reason:
                problems.append(f"{client.boundjid} got the kick presence without the reason {reason!r}: {presence}")
        assert "victim" not in witness["xep_0045"].get_roster(room), f"witness's occupants: {witness['xep_0045'].get_roster(room)}"

        # Out of the room: a groupchat message bounces, and the others never get it (the
        # owner's next message, sent after the bounce, is the first body they see).
        victim.send_message(mto=room, mbody="am I still here?", mtype="groupchat")
        bounce = await next_item(victim.message_errors, "the bounce of the kicked user's groupchat message")
        assert bounce["from"].bare == room, f"bounce from {bounce['from']}"
        assert bounce["error"]["condition"] == "not-acceptable", f"bounce: {bounce}"
        owner.send_message(mto=room, mbody="order restored", mtype="groupchat")
        for client in (witness, owner):
            message = await room_body(client, room, "the owner's message after the kick")
            assert message["body"] == "order restored", f"{client.boundjid} got {message['body']!r} from {message['from']}"
    assert not problems, "; ".join(problems)


@test(timeout=60)
async def muc_ban_and_outcast_list(ctx):
    """Banning (muc#admin affiliation 'outcast' on the bare JID): a participant may not
    (forbidden); the owner may. The banned occupant leaves with 301 (and 110 for itself,
    301 for the others), role 'none', affiliation 'outcast'; it cannot enter again under any
    nickname (forbidden); the outcast list holds its bare JID; lifting the ban lets it in."""
    owner_jid = new_account(ctx.server, DOMAIN_A, "banowner")
    target_jid = new_account(ctx.server, DOMAIN_B, "banned")
    witness_jid = new_account(ctx.server, DOMAIN_A, "banwitness")
    room = f"{unique('ban')}@conference.{DOMAIN_A}"
    problems = []
    async with Clients(ctx.server) as clients:
        owner = await muc_login(clients, owner_jid)
        target = await muc_login(clients, target_jid)
        witness = await muc_login(clients, witness_jid)
        await create_room(owner, room, "owner")
        await enter(target, room, "target")
        await enter(witness, room, "witness")

        # Only admins and owners ban: anyone else is refused with forbidden.
        error = await iq_refused(witness["xep_0045"].set_affiliation(room, "outcast", jid=target_jid, timeout=WAIT),
                                 "a participant's ban")
        if error.condition != "forbidden":
            problems.append(f"a participant's ban was refused with <{error.condition}/>, expected <forbidden/> ({error.iq})")

        await owner["xep_0045"].set_affiliation(room, "outcast", jid=target_jid, reason="spam", timeout=WAIT)
        for client, itself in ((target, True), (witness, False), (owner, False)):
            presence = await room_presence(client, f"{room}/target", "the banned occupant's unavailable presence")
            codes = status_codes(presence)
            assert "301" in codes, f"{client.boundjid}: ban presence without status 301: {presence}"
            assert ("110" in codes) == itself, f"{client.boundjid}: status 110 {'missing' if itself else 'wrongly present'}: {presence}"
            item = muc_item(presence)
            assert (item.get("affiliation"), item.get("role")) == ("outcast", "none"), f"{client.boundjid}: ban presence item {item.attrib}"

        for nick in ("target", "another-nick"):
            condition = await entry_refused(target, room, nick, problems)
            assert condition == "forbidden", f"banned user entering as {nick}: <{condition}/>, expected <forbidden/>"
        outcasts = await owner["xep_0045"].get_affiliation_list(room, "outcast", timeout=WAIT)
        assert [str(jid) for jid in outcasts] == [target_jid], f"outcast list: {outcasts}"

        await owner["xep_0045"].set_affiliation(room, "none", jid=target_jid, timeout=WAIT)
        assert await owner["xep_0045"].get_affiliation_list(room, "outcast", timeout=WAIT) == [], "outcast list after lifting the ban"
        presence = await enter(target, room, "target")
        assert muc_item(presence).get("affiliation") == "none", f"after the ban was lifted: {presence}"
        await room_presence(witness, f"{room}/target", "the pardoned user's presence", unavailable=False)
    assert not problems, "; ".join(problems)


@test(timeout=60)
async def muc_destroy_with_alternate_venue(ctx):
    """Destroying a room (muc#owner <destroy jid=... ><reason/>): a non-owner is refused with
    forbidden; the owner's request removes every occupant with one unavailable presence
    carrying <destroy/> with the alternate venue and the reason; afterwards the room is gone
    (disco#info: item-not-found) and entering it creates a new, locked room (201) owned by
    whoever enters."""
    owner_jid = new_account(ctx.server, DOMAIN_A, "destroyowner")
    guest_jid = new_account(ctx.server, DOMAIN_B, "destroyguest")
    other_jid = new_account(ctx.server, DOMAIN_A, "destroyother")
    room = f"{unique('doomed')}@conference.{DOMAIN_A}"
    venue = f"{unique('venue')}@conference.{DOMAIN_A}"
    reason = f"moving house ⌂ {unique('r')}"
    async with Clients(ctx.server) as clients:
        owner = await muc_login(clients, owner_jid)
        guest = await muc_login(clients, guest_jid)
        other = await muc_login(clients, other_jid)
        await create_room(owner, room, "owner")
        for client, nick in ((guest, "guest"), (other, "other")):
            await enter(client, room, nick)

        error = await iq_refused(guest["xep_0045"].destroy(room, reason="mine now", timeout=WAIT), "a participant's destroy")
        assert error.condition == "forbidden", f"a participant's destroy: <{error.condition}/>, expected <forbidden/>"
        assert (await room_info(owner, room))[0], "the room is gone after a refused destroy"

        await owner["xep_0045"].destroy(room, reason=reason, altroom=venue, timeout=WAIT)
        for client, nick in ((owner, "owner"), (guest, "guest"), (other, "other")):
            presence = await room_presence(client, f"{room}/{nick}", "the destroy presence")
            destroy = muc_x(presence).find(f"{{{MUC_USER}}}destroy")
            assert destroy is not None, f"{client.boundjid}: unavailable presence without <destroy/>: {presence}"
            assert destroy.get("jid") == venue, f"{client.boundjid}: alternate venue {destroy.get('jid')!r}, expected {venue}"
            assert destroy.findtext(f"{{{MUC_USER}}}reason") == reason, f"{client.boundjid}: destroy reason: {presence}"
            # A roster get is answered after the room's stanzas to this client: what the room
            # sent is all in the queue now, and it is one presence, the client's own.
            await roster_items(client)
            others = []
            while not client.muc_presences.empty():
                others.append(client.muc_presences.get_nowait())
            assert not others, f"{client.boundjid}: more presence after the destroy: {[str(p) for p in others]}"

        error = await iq_refused(room_info(guest, room), "disco#info of the destroyed room")
        assert error.condition == "item-not-found", f"disco#info of the destroyed room: <{error.condition}/>"
        # The name is free again: whoever enters creates a new room, and owns it.
        presence = await enter(other, room, "other")
        assert {"110", "201"} <= status_codes(presence), f"entering the destroyed room's name: statuses {status_codes(presence)}"
        assert muc_item(presence).get("affiliation") == "owner", f"the new room's creator: {muc_item(presence).attrib}"


@test(timeout=150)
async def muc_persistent_room_survives_restart(ctx):
    """A persistent, members-only room with a name and a member, configured through the
    owner's form, is there after the server restarts on the same storage: entering does not
    create it (no 201), the member is still a member, others are refused
    (registration-required), disco#info shows the name; destroyed, it stays gone after
    another restart."""
    side = harness.BraidServer(env={"BRAID_ADMIN_ADMIN_PORT": str(harness.free_port()),
                                    "BRAID_ADMIN_POSH_PORT": str(harness.free_port()), "BRAID_S2S_ENABLED": "false"},
                               domains=[DOMAIN_A, DOMAIN_B])
    try:
        try:
            side.start()
        except harness.HarnessError as error:
            raise AssertionError(f"{error}: {side.log_since(0)[-1500:]}") from None
        owner_jid = new_account(side, DOMAIN_A, "keeper")
        member_jid = new_account(side, DOMAIN_B, "member")
        outsider_jid = new_account(side, DOMAIN_A, "outsider")
        room = f"{unique('kept')}@conference.{DOMAIN_A}"
        name = f"Kept room ✓ {unique('n')}"
        problems = []

        async with Clients(side) as clients:
            owner = await muc_login(clients, owner_jid)
            await create_room(owner, room, "owner", **{"muc#roomconfig_roomname": name, "muc#roomconfig_persistentroom": True,
                                                       "muc#roomconfig_membersonly": True})
            await owner["xep_0045"].set_affiliation(room, "member", jid=member_jid, timeout=WAIT)
            assert [str(jid) for jid in await owner["xep_0045"].get_affiliation_list(room, "member", timeout=WAIT)] == [member_jid]
        # Everyone has left; the room stays, and so it does across a restart.

        def restart():
            try:
                side.restart()
            except harness.HarnessError as error:
                raise AssertionError(f"restart: {error}: {side.log_since(0)[-1500:]}") from None

        restart()
        async with Clients(side) as clients:
            member = await muc_login(clients, member_jid)
            presence = await enter(member, room, "member")
            assert "201" not in status_codes(presence), f"the room was created anew after the restart: {presence}"
            assert muc_item(presence).get("affiliation") == "member", f"member after the restart: {muc_item(presence).attrib}"

            outsider = await muc_login(clients, outsider_jid)
            condition = await entry_refused(outsider, room, "outsider", problems)
            assert condition == "registration-required", f"a non-member after the restart: <{condition}/>"

            owner = await muc_login(clients, owner_jid)
            identities, features, roominfo = await room_info(owner, room)
            assert ("conference", "text", name) in identities, f"identities after the restart: {identities}"
            assert {"muc_persistent", "muc_membersonly"} <= features, f"features after the restart: {sorted(features)}"
            assert roominfo.get("muc#roomconfig_roomname") == name, f"muc#roominfo after the restart: {roominfo}"
            presence = await enter(owner, room, "owner")
            assert "201" not in status_codes(presence), f"owner entering after the restart: {presence}"
            assert muc_item(presence).get("affiliation") == "owner", f"owner after the restart: {muc_item(presence).attrib}"
            members = await owner["xep_0045"].get_affiliation_list(room, "member", timeout=WAIT)
            assert [str(jid) for jid in members] == [member_jid], f"member list after the restart: {members}"

            await owner["xep_0045"].destroy(room, reason="done", timeout=WAIT)

        restart()
        async with Clients(side) as clients:
            owner = await muc_login(clients, owner_jid)
            error = await iq_refused(room_info(owner, room), "disco#info of the destroyed persistent room after a restart")
            assert error.condition == "item-not-found", f"the destroyed room after a restart: <{error.condition}/>"
        assert not problems, "; ".join(problems)
    except BaseException:
        print("    --- the restarted server's log (last lines) ---", flush=True)
        for line in side.log_since(0).rstrip("\n").splitlines()[-harness.LOG_TAIL_LINES:]:
            print("    | " + line, flush=True)
        raise
    finally:
        side.stop()
        side.cleanup()


@test(timeout=60)
async def muc_invitations_direct_and_mediated(ctx):
    """A XEP-0249 direct invitation (jabber:x:conference, to the invitee's bare JID) reaches
    the invitee from the inviter with the room and reason; a mediated one (muc#user <invite/>
    sent to the room) arrives from the room with the inviter's bare JID and the reason; the
    invitee then enters."""
    inviter_jid = new_account(ctx.server, DOMAIN_A, "inviter")
    invitee_jid = new_account(ctx.server, DOMAIN_B, "invitee")
    room = f"{unique('party')}@conference.{DOMAIN_A}"
    async with Clients(ctx.server) as clients:
        inviter = await muc_login(clients, inviter_jid)
        inviter.register_plugin("xep_0249")
        invitee = await muc_login(clients, invitee_jid)
        invitee.register_plugin("xep_0249")
        direct, mediated = asyncio.Queue(), asyncio.Queue()
        invitee.add_event_handler("groupchat_direct_invite", direct.put_nowait)
        invitee.add_event_handler("groupchat_invite", mediated.put_nowait)
        await create_room(inviter, room, "host")

        reason = f"come along ☺ {unique('r')}"
        inviter["xep_0249"].send_invitation(invitee_jid, room, reason=reason)
        invitation = await next_item(direct, "the direct invitation")
        assert invitation["from"] == inviter.boundjid.full, f"direct invitation from {invitation['from']}"
        assert invitation["groupchat_invite"]["jid"] == room, f"direct invitation to {invitation['groupchat_invite']['jid']}"
        assert invitation["groupchat_invite"]["reason"] == reason, f"direct invitation: {invitation}"

        reason = f"really, come ☺ {unique('r')}"
        inviter["xep_0045"].invite(room, invitee_jid, reason=reason)
        invitation = await next_item(mediated, "the mediated invitation")
        assert invitation["from"] == room, f"mediated invitation from {invitation['from']}, expected the room"
        invite = invitation["muc"]["invite"]
        assert invite["from"].bare == inviter_jid, f"mediated invitation names {invite['from']} as the inviter"
        assert invite["reason"] == reason, f"mediated invitation: {invitation}"

        await enter(invitee, room, "guest")
        await room_presence(inviter, f"{room}/guest", "the invitee entering", unavailable=False)


@test(timeout=120)
async def storage_migrate_keeps_logins_and_rosters(ctx):
    """Issue 12: an SQLite deployment copied into PostgreSQL by `braid storage migrate` keeps
    every account's login (SCRAM keys) and roster; the server then runs on PostgreSQL."""
    import subprocess
    domain = "migrate.example"
    # Beside the suite's own server: HTTP listeners of their own.
    def http_ports():
        return {"BRAID_ADMIN_ADMIN_PORT": str(harness.free_port()), "BRAID_ADMIN_POSH_PORT": str(harness.free_port()),
                "BRAID_S2S_ENABLED": "false"}
    before = harness.BraidServer(env=http_ports(), domains=[domain], storage="sqlite")
    postgres = harness.PostgresServer()
    after = None
    try:
        try:
            before.start()
        except harness.HarnessError as error:
            raise AssertionError(f"{error}: {before.log_since(0)[-1500:]}") from None
        jid = f"{unique('mig')}@{domain}"
        before.add_user(jid, PASSWORD)
        client = await login(before, jid)
        await roster_set(client, "friend@elsewhere.example", name="Friend", groups=["Pals"])
        items = await roster_items(client)
        await close(client)
        assert "friend@elsewhere.example" in items, f"roster before: {items}"
        before.stop()

        postgres.start()
        env = {key: value for key, value in os.environ.items() if not key.startswith("BRAID_")}
        env["BRAID_DATA_DIRECTORY"] = before.data_dir
        for attempt in (1, 2):  # the second run copies nothing and still passes its counts
            result = subprocess.run([before.binary, "storage", "migrate", "--to", postgres.url], cwd=before.data_dir, env=env,
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"migrate (run {attempt}) exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
            assert "users: 1 in SQLite" in result.stdout, f"migrate output: {result.stdout!r}"

        after = harness.BraidServer(env=http_ports(), domains=[], postgres_url=postgres.url)
        try:
            after.start()
        except harness.HarnessError as error:
            raise AssertionError(f"{error}: {after.log_since(0)[-1500:]}") from None
        client = await login(after, jid)
        items = await roster_items(client)
        await close(client)
        assert items.get("friend@elsewhere.example", {}).get("name") == "Friend", f"roster after: {items}"
        assert items["friend@elsewhere.example"].get("groups") == ["Pals"], f"groups after: {items}"
    finally:
        if after is not None:
            after.stop()
            after.cleanup()
        before.stop()
        before.cleanup()
        postgres.stop()


@test(timeout=60)
def scram_plus_tls_exporter_with_openssl(ctx):
    """Issue 10, item 9: SCRAM-SHA-256-PLUS with `tls-exporter` (RFC 9266) on TLS 1.3, the
    binding data computed by OpenSSL on the client's side; `tls-server-end-point` too;
    `tls-unique` refused with RFC 5802's `e=unsupported-channel-binding-type`; on TLS 1.2
    only `tls-server-end-point` is offered."""
    from raw_scram import RawStream, channel_bindings_offered
    jid = new_account(ctx.server, DOMAIN_A)
    username = jid.split("@")[0]

    def stream(max_tls12=False):
        raw = RawStream(harness.HOST, ctx.server.starttls_port, DOMAIN_A, max_tls12=max_tls12)
        return raw, raw.starttls()

    raw, features = stream()
    try:
        assert raw.tls_version() == "TLSv1.3", raw.tls_version()
        assert channel_bindings_offered(features) == ["tls-exporter", "tls-server-end-point"], features
        outcome = raw.scram(username, PASSWORD, "tls-exporter", raw.tls_exporter())
        assert outcome == ("success", True), f"tls-exporter login: {outcome}"
    finally:
        raw.close()

    raw, _ = stream()
    try:
        outcome = raw.scram(username, PASSWORD, "tls-server-end-point", raw.tls_server_end_point())
        assert outcome == ("success", True), f"tls-server-end-point login: {outcome}"
    finally:
        raw.close()

    raw, _ = stream()
    try:
        tampered = bytearray(raw.tls_exporter())
        tampered[0] ^= 0xFF
        outcome = raw.scram(username, PASSWORD, "tls-exporter", bytes(tampered))
        assert outcome[:2] == ("failure", "not-authorized"), f"another channel's data: {outcome}"
        # The stream stays usable after a SASL failure (RFC 6120 §6.4.5).
        outcome = raw.scram(username, PASSWORD, "tls-unique", b"\0" * 12)
        assert outcome == ("failure", "not-authorized", "e=unsupported-channel-binding-type"), f"tls-unique: {outcome}"
        outcome = raw.scram(username, PASSWORD, "tls-exporter", raw.tls_exporter())
        assert outcome == ("success", True), f"retry after failures: {outcome}"
    finally:
        raw.close()

    raw, features = stream(max_tls12=True)
    try:
        assert raw.tls_version() == "TLSv1.2", raw.tls_version()
        assert channel_bindings_offered(features) == ["tls-server-end-point"], features
        outcome = raw.scram(username, PASSWORD, "tls-exporter", raw.tls_exporter())
        assert outcome == ("failure", "not-authorized", "e=unsupported-channel-binding-type"), f"tls-exporter on 1.2: {outcome}"
    finally:
        raw.close()


@test(timeout=60)
async def slixmpp_defaults_log_in(ctx):
    """Issue 10, item 9: Debian's slixmpp with its own defaults. On TLS 1.3 it has only
    `tls-unique` (Python's ssl has no exporter), which Braid refuses with
    `e=unsupported-channel-binding-type`; slixmpp moves on and logs in. (Its non-PLUS SCRAM
    then sends the `y` flag, which RFC 5802 §6 makes a downgrade while -PLUS is offered, so
    it ends on PLAIN; a client with `tls-exporter` logs in with -PLUS, see above.)"""
    jid = new_account(ctx.server, DOMAIN_A)
    async with Clients(ctx.server) as clients:
        client = await login(ctx.server, jid, mechanism=None, presence=False)
        clients.clients.append(client)
        assert client.boundjid.bare == jid, f"bound {client.boundjid}"
        plus_failures = [failure for failure in client.sasl_failures if "unsupported-channel-binding-type" in failure]
        assert plus_failures, f"no RFC 5802 error text in {client.sasl_failures}"
        assert await roster_items(client) == {}, "session does not answer"


@test(timeout=90)
async def omemo_session_between_two_users(ctx):
    """Issue 13: OMEMO 0.3 (XEP-0384, `eu.siacs.conversations.axolotl`, as Conversations, Dino
    and Gajim use it) between two users, with the client in omemo_client.py (python-omemo and
    oldmemo from Debian). Caps with devicelist+notify and a mutual presence subscription;
    each publishes its bundle and device list to PEP with publish-options
    access_model=open, fetches the other's device list (which must list the other's device),
    alice's message is decrypted by bob and bob's reply by alice, and each gets a PEP
    notification of the other's device list. `omemo_client.py --selftest-prosody` runs the
    same scenario against Prosody 0.12."""
    try:
        import omemo_client
    except ImportError as error:
        raise AssertionError(f"OMEMO client libraries missing ({error}); Scripts/setup test installs "
                             "python3-omemo, python3-oldmemo and python3-xmlschema") from None
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        # No initial presence yet: omemo_client sends it once its caps (+notify) are set.
        alice = await clients.login(alice_jid, presence=False)
        bob = await clients.login(bob_jid, presence=False)
        await omemo_client.omemo_conversation(alice, bob)


def main():
    env = {"BRAID_OFFLINE_MAX_MESSAGES_PER_USER": str(OFFLINE_LIMIT),
           "BRAID_STREAM_MANAGEMENT_RESUME_TIMEOUT_SECONDS": "60"}
    return harness.run_suite(harness.collect_tests(globals()), env=env, domains=[DOMAIN_A, DOMAIN_B])


if __name__ == "__main__":
    sys.exit(main())
