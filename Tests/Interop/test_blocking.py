#!/usr/bin/python3
"""Blocking Command (XEP-0191) interop: slixmpp 1.8.3's xep_0191 plugin against a real Braid.

A user blocks a contact with slixmpp's `block()`, sees it in `get_blocked()` and in the
server's push, the contact's messages stop (the contact gets service-unavailable, the
blocker not-acceptable with <blocked/> when writing to it), presence stops, and after
`unblock()` messages flow again; an empty unblock clears the list.

Run with Debian's Python (the one that has slixmpp):
    BRAID_BINARY=/work/main/.build/debug/braid /usr/bin/python3 Tests/Interop/test_blocking.py
Set INTEROP_DEBUG=1 to see slixmpp's own log, INTEROP_ONLY=name,name to run only those tests.
"""

import asyncio
import logging
import os
import ssl
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, unique  # noqa: E402

from slixmpp import ClientXMPP, JID  # noqa: E402

DOMAIN_A = "alpha.test"
DOMAIN_B = "beta.test"
PASSWORD = "correct horse ✓"
BLOCKING = "urn:xmpp:blocking"
BLOCKING_ERRORS = "urn:xmpp:blocking:errors"

LOGIN_TIMEOUT = 15.0    # connect, TLS, SASL, bind
WAIT = 5.0              # any single expected event

if not os.environ.get("INTEROP_DEBUG"):
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
else:
    logging.basicConfig(level=logging.DEBUG)


class Client(ClientXMPP):
    """A slixmpp client with the blocking plugin, no certificate checks, and queues of what
    it receives."""

    def __init__(self, jid):
        super().__init__(jid, PASSWORD, sasl_mech="SCRAM-SHA-256")
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self._no_binding_flag()
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0191")
        self.auto_authorize = None
        self.auto_subscribe = False
        self.messages = asyncio.Queue()
        self.message_errors = asyncio.Queue()
        self.presences = asyncio.Queue()
        self.pushes = asyncio.Queue()
        # slixmpp raises `message` for bounced messages too (they keep their body).
        self.add_event_handler("message", lambda msg: msg["type"] == "error" or self.messages.put_nowait(msg))
        self.add_event_handler("message_error", self.message_errors.put_nowait)
        self.add_event_handler("presence_available", self.presences.put_nowait)
        self.add_event_handler("presence_unavailable", self.presences.put_nowait)
        self.add_event_handler("blocked", lambda iq: self.pushes.put_nowait(("block", iq)))
        self.add_event_handler("unblocked", lambda iq: self.pushes.put_nowait(("unblock", iq)))

    def _no_binding_flag(self):
        """SCRAM with the gs2 flag 'n'. slixmpp sends 'y' ("the server does not bind")
        whenever TLS gives it binding data, but this server offers -PLUS, so RFC 5802 §6
        makes it refuse 'y' as a downgrade; a plain SCRAM-SHA-256 login honestly says 'n'."""
        mechanisms = self["feature_mechanisms"]
        default = mechanisms.sasl_callback

        def callback(required, optional):
            values = default(required, optional)
            if "channel_binding" in values:
                values["channel_binding"] = None
            return values
        mechanisms.sasl_callback = callback


async def login(server, jid):
    """Connects, authenticates and sends initial presence; returns the client once the
    server has processed that presence (a roster get answered after it)."""
    client = Client(jid)
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
        client.send_presence()
        await sync(client)
    except BaseException:
        await close(client)
        raise
    return client


async def sync(client):
    """A roster get and its answer. The server handles a session's stanzas in order and
    delivers to a session in order, and slixmpp dispatches what it receives in order: once
    this returns, whatever the server routed to the client before has been seen."""
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

    async def login(self, jid):
        client = await login(self.server, jid)
        self.clients.append(client)
        return client


def new_account(server, domain, prefix):
    jid = f"{unique(prefix)}@{domain}"
    server.add_user(jid, PASSWORD)
    return jid


async def next_item(queue, what, timeout=WAIT):
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


async def next_presence(client, from_bare, ptype, what):
    """The next presence of `ptype` from `from_bare`, skipping others (own echoes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        presence = await next_item(client.presences, what, max(0.01, deadline - loop.time()))
        if presence["from"].bare == from_bare and presence["type"] == ptype:
            return presence


def drained(queue):
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def blocked_jids(client):
    result = await client["xep_0191"].get_blocked(timeout=WAIT)
    return {str(jid) for jid in result["blocklist"]["items"]}


async def expect_push(client, kind, jids):
    got, iq = await next_item(client.pushes, f"{kind} push at {client.boundjid}")
    assert got == kind, f"{client.boundjid}: {got} push, expected {kind}"
    items = {str(jid) for jid in iq[kind]["items"]}
    assert items == set(jids), f"{client.boundjid}: {kind} push items {items}, expected {set(jids)}"


def carries_blocked(stanza):
    return stanza.xml.find("{jabber:client}error/{%s}blocked" % BLOCKING_ERRORS) is not None


async def subscribe_mutually(first, second):
    """Both subscribe to each other through the clients, as a user would."""
    for asker, answerer in ((first, second), (second, first)):
        asker.send_presence(pto=answerer.boundjid.bare, ptype="subscribe")
        await sync(asker)
        answerer.send_presence(pto=asker.boundjid.bare, ptype="subscribed")
        await sync(answerer)


# -- tests -------------------------------------------------------------------------------

@test(timeout=30)
async def server_advertises_blocking(ctx):
    jid = new_account(ctx.server, DOMAIN_A, "disco")
    async with Clients(ctx.server) as clients:
        client = await clients.login(jid)
        info = await client["xep_0030"].get_info(jid=DOMAIN_A, timeout=WAIT)
        features = info["disco_info"]["features"]
        assert BLOCKING in features, f"{DOMAIN_A} disco#info features: {features}"


@test(timeout=60)
async def block_and_unblock_with_slixmpp(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "bob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        bob = await clients.login(bob_jid)
        await subscribe_mutually(alice, bob)
        bob.send_presence()  # so alice has bob's presence now that she is subscribed
        await sync(bob)
        bob.send_message(mto=alice_jid, mbody="before", mtype="chat")
        message = await next_item(alice.messages, "bob's first message")
        assert message["body"] == "before", message
        await sync(alice)
        drained(alice.presences)
        drained(bob.presences)

        assert await blocked_jids(alice) == set()
        await alice["xep_0191"].block(JID(bob_jid), timeout=WAIT)
        await expect_push(alice, "block", [bob_jid])
        assert await blocked_jids(alice) == {bob_jid}

        # bob learns alice went offline (§3.3); alice's client, that bob did.
        await next_presence(bob, alice_jid, "unavailable", "alice's unavailable presence at bob")
        await next_presence(alice, bob_jid, "unavailable", "bob's unavailable presence at alice")

        # bob's messages bounce as if alice were not there; nothing reaches her.
        bob.send_message(mto=alice_jid, mbody="blocked?", mtype="chat")
        bounced = await next_item(bob.message_errors, "error for bob's message")
        assert bounced["error"]["condition"] == "service-unavailable", bounced
        assert not carries_blocked(bounced), bounced
        bob.send_presence(pstatus="still here")
        await sync(bob)
        await sync(alice)
        assert alice.messages.empty(), f"alice got {drained(alice.messages)}"
        assert not [p for p in drained(alice.presences) if p["from"].bare == bob_jid], "alice got bob's presence"

        # alice's messages to bob get not-acceptable with <blocked/> and never leave.
        alice.send_message(mto=bob_jid, mbody="can you hear me?", mtype="chat")
        refused = await next_item(alice.message_errors, "error for alice's message")
        assert refused["error"]["condition"] == "not-acceptable" and carries_blocked(refused), refused
        assert refused["from"].bare == bob_jid, refused
        await sync(bob)
        assert bob.messages.empty(), f"bob got {drained(bob.messages)}"

        # Unblocked: the push, an empty list, bob sees alice again, messages flow.
        await alice["xep_0191"].unblock(JID(bob_jid), timeout=WAIT)
        await expect_push(alice, "unblock", [bob_jid])
        assert await blocked_jids(alice) == set()
        await next_presence(bob, alice_jid, "available", "alice's presence at bob after the unblock")
        await next_presence(alice, bob_jid, "available", "bob's presence at alice after the unblock (probe)")
        bob.send_message(mto=alice_jid, mbody="after", mtype="chat")
        message = await next_item(alice.messages, "bob's message after the unblock")
        assert message["body"] == "after", message
        alice.send_message(mto=bob_jid, mbody="welcome back", mtype="chat")
        message = await next_item(bob.messages, "alice's message after the unblock")
        assert message["body"] == "welcome back", message


@test(timeout=60)
async def pushes_reach_other_resources_and_unblock_all_clears(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    carol_jid = new_account(ctx.server, DOMAIN_A, "carol")
    async with Clients(ctx.server) as clients:
        phone = await clients.login(alice_jid + "/phone")
        laptop = await clients.login(alice_jid + "/laptop")
        carol = await clients.login(carol_jid)
        await phone["xep_0191"].block([JID(carol_jid), JID(DOMAIN_B)], timeout=WAIT)
        for client in (phone, laptop):
            await expect_push(client, "block", [carol_jid, DOMAIN_B])
        assert await blocked_jids(laptop) == {carol_jid, DOMAIN_B}

        carol.send_message(mto=alice_jid, mbody="hello?", mtype="chat")
        bounced = await next_item(carol.message_errors, "error for carol's message")
        assert bounced["error"]["condition"] == "service-unavailable", bounced
        # A domain item: everyone there is blocked.
        laptop.send_message(mto=f"anyone@{DOMAIN_B}", mbody="out", mtype="chat")
        refused = await next_item(laptop.message_errors, "error for a message to a blocked domain")
        assert carries_blocked(refused), refused

        # An empty unblock (unblock all), pushed to both resources.
        await laptop["xep_0191"].unblock([], timeout=WAIT)
        for client in (phone, laptop):
            await expect_push(client, "unblock", [])
        assert await blocked_jids(phone) == set()
        carol.send_message(mto=alice_jid, mbody="now?", mtype="chat")
        message = await next_item(phone.messages, "carol's message after unblock all")
        assert message["body"] == "now?", message


def main():
    return harness.run_suite(harness.collect_tests(globals()), domains=[DOMAIN_A, DOMAIN_B])


if __name__ == "__main__":
    sys.exit(main())
