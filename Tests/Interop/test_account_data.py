#!/usr/bin/python3
"""Account data interop: Debian's slixmpp 1.8.3 plugins against a real Braid server.

Covers XEP-0049 private XML storage (xep_0049, with XEP-0048 bookmarks stored there), its
refusal to other users and its survival across a restart; XEP-0054 vCards (xep_0054):
publishing, reading one's own and another's, and the same answer for an account without a
vCard and one that does not exist; XEP-0077 (xep_0077): a password change with and without
`to`, after which only the new password logs in, and registration of new accounts refused,
before and after logging in.

Run with Debian's Python (the one that has slixmpp):
    /usr/bin/python3 Tests/Interop/test_account_data.py
Set INTEROP_DEBUG=1 to see slixmpp's own log, INTEROP_ONLY=name,name to run only those tests.
"""

import asyncio
import base64
import logging
import os
import ssl
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, unique  # noqa: E402

from slixmpp import ClientXMPP  # noqa: E402
from slixmpp.exceptions import IqError  # noqa: E402
from slixmpp.plugins.xep_0048.stanza import Bookmarks  # noqa: E402
from slixmpp.plugins.xep_0054.stanza import VCardTemp  # noqa: E402
from slixmpp.stanza import StreamFeatures  # noqa: E402
from slixmpp.xmlstream import ET, ElementBase  # noqa: E402

DOMAIN_A = "alpha.test"
DOMAIN_B = "beta.test"
PASSWORD = "correct horse ✓"

LOGIN_TIMEOUT = 15.0    # connect, TLS, SASL, bind
WAIT = 5.0              # any single expected answer

VCARD = "vcard-temp"

if not os.environ.get("INTEROP_DEBUG"):
    # slixmpp logs expected failures (wrong passwords, refused registrations) as errors.
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
else:
    logging.basicConfig(level=logging.DEBUG)


class LoginFailed(Exception):
    pass


class Prefs(ElementBase):
    """A client's own preferences, as a client would keep them in private XML storage."""
    name = "prefs"
    namespace = "urn:braid:interop:prefs"
    plugin_attrib = "braid_prefs"
    interfaces = {"nick", "theme"}
    sub_interfaces = interfaces


class Client(ClientXMPP):
    """A slixmpp client with the account-data plugins, no certificate checks (self-signed),
    and plain SCRAM-SHA-256 (the gs2 flag 'n', as in test_clients.py)."""

    def __init__(self, jid, password, register_config=None):
        super().__init__(jid, password, sasl_mech="SCRAM-SHA-256")
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.register_plugin("xep_0049")
        self.register_plugin("xep_0054")
        self.register_plugin("xep_0077", pconfig=register_config or {})
        self["xep_0049"].register(Prefs)
        self["xep_0049"].register(Bookmarks)
        self.sasl_conditions = []
        self.stream_errors = []
        self.add_event_handler("failed_auth", lambda failure: self.sasl_conditions.append(failure["condition"]))
        self.add_event_handler("stream_error", lambda error: self.stream_errors.append(error["condition"]))
        mechanisms = self["feature_mechanisms"]
        default_callback = mechanisms.sasl_callback

        def callback(required, optional):
            values = default_callback(required, optional)
            if "channel_binding" in values:
                values["channel_binding"] = None
            return values
        mechanisms.sasl_callback = callback


# Bounded slixmpp disconnect, shared by the suites.
close = harness.close_client


async def login(server, jid, password=PASSWORD, register_config=None, until="session_start"):
    """Connects over STARTTLS and waits for `until` (session_start by default); raises
    LoginFailed with the reason when the login ends otherwise."""
    client = Client(jid, password, register_config=register_config)
    outcome = asyncio.get_running_loop().create_future()

    def settle(error=None):
        if not outcome.done():
            outcome.set_result(error)
    client.add_event_handler(until, lambda _: settle())
    client.add_event_handler("failed_all_auth", lambda _: settle(LoginFailed(f"SASL failed: {client.sasl_conditions}")))
    client.add_event_handler("stream_error", lambda error: settle(LoginFailed(f"stream error <{error['condition']}/>")))
    client.add_event_handler("disconnected", lambda reason: settle(LoginFailed(f"disconnected ({reason})")))
    client.add_event_handler("connection_failed", lambda error: settle(LoginFailed(f"connection failed: {error}")))
    client.connect((harness.HOST, server.starttls_port))
    try:
        error = await asyncio.wait_for(outcome, LOGIN_TIMEOUT)
        if error is not None:
            raise error
    except BaseException:
        await close(client)
        raise
    return client


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


async def refused(request, what):
    """Awaits an IQ that must fail; returns the IqError."""
    try:
        result = await request
    except IqError as error:
        return error
    raise AssertionError(f"{what}: expected an error, got {result}")


def vcard_element(name, photo=None):
    xml = ET.Element(f"{{{VCARD}}}vCard")
    ET.SubElement(xml, f"{{{VCARD}}}FN").text = name
    ET.SubElement(xml, f"{{{VCARD}}}NICKNAME").text = name.split()[0]
    if photo is not None:
        element = ET.SubElement(xml, f"{{{VCARD}}}PHOTO")
        ET.SubElement(element, f"{{{VCARD}}}TYPE").text = "image/png"
        ET.SubElement(element, f"{{{VCARD}}}BINVAL").text = base64.b64encode(photo).decode()
    return VCardTemp(xml=xml)


def vcard_fields(iq):
    """FN, NICKNAME and the decoded photo of a vCard result (read from the XML: slixmpp's
    BINVAL getter does not work on Python 3)."""
    xml = iq.xml.find(f"{{{VCARD}}}vCard")
    assert xml is not None, f"no vCard in {iq}"

    def text(path):
        found = xml.find(path)
        return found.text if found is not None else None
    binval = text(f"{{{VCARD}}}PHOTO/{{{VCARD}}}BINVAL")
    return {"FN": text(f"{{{VCARD}}}FN"), "NICKNAME": text(f"{{{VCARD}}}NICKNAME"),
            "PHOTO": base64.b64decode(binval) if binval else None}


def list_users(server, domain):
    return server.cli("user", "list", "--domain", domain).split()


# -- private XML storage (XEP-0049) ------------------------------------------------------

@test(timeout=60)
async def private_storage_round_trip_and_restart(ctx):
    """Preferences and XEP-0048 bookmarks stored through xep_0049 come back as stored, in
    the same session, from a second resource, and after the server restarts; an unset key
    answers empty."""
    jid = new_account(ctx.server, DOMAIN_A, "keeper")
    room = f"{unique('room')}@conference.{DOMAIN_A}"
    async with Clients(ctx.server) as clients:
        client = await clients.login(jid)
        prefs = Prefs()
        prefs["nick"] = "Keeper ✓"
        prefs["theme"] = "dark"
        marks = Bookmarks()
        marks.add_conference(room, "keeper", name="The room", autojoin=True)
        await client["xep_0049"].store([prefs, marks], timeout=WAIT)

        got = await client["xep_0049"].retrieve("braid_prefs", timeout=WAIT)
        assert got["private"]["braid_prefs"]["nick"] == "Keeper ✓", f"prefs read back: {got}"
        assert got["private"]["braid_prefs"]["theme"] == "dark", f"prefs read back: {got}"
        other = await clients.login(jid + "/other")
        got = await other["xep_0049"].retrieve("bookmarks", timeout=WAIT)
        conferences = got["private"]["bookmarks"]["conferences"]
        assert [(str(c["jid"]), c["nick"], c["autojoin"]) for c in conferences] == [(room, "keeper", True)], f"bookmarks: {got}"

    # Another account's key space is its own: nothing there.
    fresh = new_account(ctx.server, DOMAIN_A, "fresh")
    async with Clients(ctx.server) as clients:
        client = await clients.login(fresh)
        got = await client["xep_0049"].retrieve("braid_prefs", timeout=WAIT)
        element = got.xml.find("{jabber:iq:private}query/{urn:braid:interop:prefs}prefs")
        assert element is not None and len(element) == 0 and not (element.text or "").strip(), f"unset key: {got}"

    try:
        ctx.server.restart()
    except harness.HarnessError as error:
        raise AssertionError(f"restart: {error}") from None
    async with Clients(ctx.server) as clients:
        client = await clients.login(jid)
        got = await client["xep_0049"].retrieve("braid_prefs", timeout=WAIT)
        assert got["private"]["braid_prefs"]["nick"] == "Keeper ✓", f"prefs after the restart: {got}"
        got = await client["xep_0049"].retrieve("bookmarks", timeout=WAIT)
        assert [str(c["jid"]) for c in got["private"]["bookmarks"]["conferences"]] == [room], f"bookmarks after the restart: {got}"


@test(timeout=30)
async def private_storage_refused_to_others(ctx):
    """Another user gets forbidden for a get or set at someone's bare JID, and so does a
    request to an account that does not exist; the owner's data is unchanged."""
    owner_jid = new_account(ctx.server, DOMAIN_A, "owner")
    async with Clients(ctx.server) as clients:
        owner = await clients.login(owner_jid)
        prefs = Prefs()
        prefs["nick"] = "mine"
        await owner["xep_0049"].store(prefs, timeout=WAIT)
        intruder = await clients.login(new_account(ctx.server, DOMAIN_B, "intruder"))
        for target in (owner_jid, f"{unique('nobody')}@{DOMAIN_A}"):
            get = intruder.make_iq_get(ito=target)
            get["private"].enable("braid_prefs")
            error = await refused(get.send(timeout=WAIT), f"get of {target}'s private XML")
            assert error.condition == "forbidden", f"get of {target}: <{error.condition}/>"
            theirs = Prefs()
            theirs["nick"] = "taken"
            put = intruder.make_iq_set(ito=target)
            put["private"].append(theirs)
            error = await refused(put.send(timeout=WAIT), f"set of {target}'s private XML")
            assert error.condition == "forbidden", f"set of {target}: <{error.condition}/>"
        got = await owner["xep_0049"].retrieve("braid_prefs", timeout=WAIT)
        assert got["private"]["braid_prefs"]["nick"] == "mine", f"after the attempts: {got}"


# -- vcard-temp (XEP-0054) ---------------------------------------------------------------

@test(timeout=30)
async def vcard_publish_and_read(ctx):
    """A vCard with a photo published through xep_0054 is read back by its owner and by a
    user of another domain; the owner replaces it; nobody else may publish it."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "alice")
    photo = bytes(range(256)) * 40
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        await alice["xep_0054"].publish_vcard(vcard_element("Alice Liddell ✓", photo), timeout=WAIT)
        # jid= the bare JID: slixmpp asks the server rather than its own cache.
        own = await alice["xep_0054"].get_vcard(alice_jid, timeout=WAIT)
        assert vcard_fields(own) == {"FN": "Alice Liddell ✓", "NICKNAME": "Alice", "PHOTO": photo}, f"own vCard: {vcard_fields(own)}"

        bob = await clients.login(new_account(ctx.server, DOMAIN_B, "bob"))
        theirs = await bob["xep_0054"].get_vcard(alice_jid, timeout=WAIT)
        assert vcard_fields(theirs) == vcard_fields(own), f"alice's vCard as bob reads it: {vcard_fields(theirs)}"

        await alice["xep_0054"].publish_vcard(vcard_element("Alice Again"), timeout=WAIT)
        theirs = await bob["xep_0054"].get_vcard(alice_jid, timeout=WAIT)
        assert vcard_fields(theirs) == {"FN": "Alice Again", "NICKNAME": "Alice", "PHOTO": None}, f"after the update: {vcard_fields(theirs)}"

        forged = bob.make_iq_set(ito=alice_jid)
        forged.append(vcard_element("Mallory"))
        error = await refused(forged.send(timeout=WAIT), "bob publishing alice's vCard")
        assert error.condition == "forbidden", f"bob publishing alice's vCard: <{error.condition}/>"
        theirs = await bob["xep_0054"].get_vcard(alice_jid, timeout=WAIT)
        assert vcard_fields(theirs)["FN"] == "Alice Again", f"after bob's attempt: {vcard_fields(theirs)}"


@test(timeout=30)
async def vcard_missing_and_nonexistent_answer_alike(ctx):
    """An account without a vCard and an account that does not exist give the same error,
    item-not-found, of the same type."""
    quiet_jid = new_account(ctx.server, DOMAIN_A, "quiet")
    async with Clients(ctx.server) as clients:
        reader = await clients.login(new_account(ctx.server, DOMAIN_B, "reader"))
        answers = []
        for target in (quiet_jid, f"{unique('ghost')}@{DOMAIN_A}"):
            error = await refused(reader["xep_0054"].get_vcard(target, timeout=WAIT), f"vCard of {target}")
            answers.append((error.condition, error.etype, error.text))
        assert answers[0] == answers[1], f"an account without a vCard and no account answer differently: {answers}"
        assert answers[0][0] == "item-not-found", f"no vCard: {answers[0]}"


# -- XEP-0077: password change, registration off -----------------------------------------

@test(timeout=60)
async def password_change_then_only_the_new_one_works(ctx):
    """xep_0077's change_password (no 'to'), then the old password fails SASL and the new one
    logs in; again with 'to' the domain, as Conversations and Gajim send it."""
    jid = new_account(ctx.server, DOMAIN_A, "changer")
    first, second = f"new ✓ {unique('pw')}", f"newer {unique('pw')}"
    async with Clients(ctx.server) as clients:
        client = await clients.login(jid)
        form = await client["xep_0077"].get_registration(timeout=WAIT)
        assert form["register"]["registered"], f"the registration form of a logged-in user: {form}"
        assert form["register"]["username"] == jid.split("@")[0], f"username on file: {form}"
        await client["xep_0077"].change_password(first, timeout=WAIT)

    try:
        stale = await login(ctx.server, jid, PASSWORD)
        await close(stale)
        raise AssertionError("the old password still logs in")
    except LoginFailed as failure:
        assert "not-authorized" in str(failure), f"the old password: {failure}"

    async with Clients(ctx.server) as clients:
        client = await clients.login(jid, password=first)
        await client["xep_0077"].change_password(second, jid=DOMAIN_A, timeout=WAIT)
    for old in (PASSWORD, first):
        try:
            stale = await login(ctx.server, jid, old)
            await close(stale)
            raise AssertionError(f"an old password ({old!r}) still logs in")
        except LoginFailed:
            pass
    async with Clients(ctx.server) as clients:
        await clients.login(jid, password=second)


@test(timeout=30)
async def registration_of_new_accounts_refused(ctx):
    """Before login: the server offers no iq-register feature, and slixmpp made to register
    anyway gets the stream closed with not-authorized (a stanza before authentication). After login: registering another name, or
    at another hosted domain, is refused; so is removing the account. No account appears."""
    wanted = unique("mallory")
    registrar = asyncio.get_running_loop().create_future()
    offered = []

    async def on_register(form):
        # Reached only if the server answered the registration get.
        if not registrar.done():
            registrar.set_result(form)

    def force_registration(stanza):
        # slixmpp 1.8.3's own force_registration never fires after STARTTLS (it looks for
        # an ssl.SSLSocket that asyncio does not expose); this is what it would do: once
        # TLS is up and before SASL, act as though the server offered iq-register.
        if isinstance(stanza, StreamFeatures) and "starttls" in client.features and "mechanisms" not in client.features:
            offered.append(stanza.xml.find("{http://jabber.org/features/iq-register}register") is not None)
            stanza.enable("register")
        return stanza

    client = Client(f"{wanted}@{DOMAIN_A}", PASSWORD)
    # slixmpp 1.8.3 also holds back every stanza but bind before the session starts, which
    # would keep the registration get from going out at all.
    client._always_send_everything = True
    try:
        client.add_event_handler("register", on_register)
        client.add_filter("in", force_registration)
        ended = asyncio.get_running_loop().create_future()
        for event in ("stream_error", "disconnected", "session_start", "failed_all_auth"):
            client.add_event_handler(event, lambda payload, event=event: ended.done() or ended.set_result(event))
        client.connect((harness.HOST, ctx.server.starttls_port))
        outcome = await asyncio.wait_for(ended, LOGIN_TIMEOUT)
        assert offered == [False], f"iq-register offered after TLS: {offered}"
        assert outcome == "stream_error", f"an unregistered client's attempt ended in {outcome}"
        assert client.stream_errors == ["not-authorized"], f"stream errors: {client.stream_errors}"
        assert not registrar.done(), "the server sent a registration form"
    finally:
        await close(client)
    assert f"{wanted}@{DOMAIN_A}" not in list_users(ctx.server, DOMAIN_A)

    jid = new_account(ctx.server, DOMAIN_A, "member")
    async with Clients(ctx.server) as clients:
        member = await clients.login(jid)
        taken = member.make_iq_set(ito=DOMAIN_A)
        taken["register"]["username"] = wanted
        taken["register"]["password"] = "secret"
        error = await refused(taken.send(timeout=WAIT), "registering another name")
        assert error.condition == "not-allowed", f"registering another name: <{error.condition}/>"
        error = await refused(member["xep_0077"].get_registration(jid=DOMAIN_B, timeout=WAIT), "registration at another domain")
        assert error.condition == "service-unavailable", f"registration at another domain: <{error.condition}/>"
        error = await refused(member["xep_0077"].cancel_registration(timeout=WAIT), "removing the account")
        assert error.condition == "not-allowed", f"removing the account: <{error.condition}/>"
    assert wanted not in " ".join(list_users(ctx.server, DOMAIN_A) + list_users(ctx.server, DOMAIN_B))
    assert jid in list_users(ctx.server, DOMAIN_A), "the account was removed"


OPEN_DOMAIN = "open.test"
CLOSED_DOMAIN = "closed.test"
REGISTRATION_ATTEMPTS = 4


async def try_registration(server, jid, password):
    """slixmpp's XEP-0077 plugin as a user would drive it: on the iq-register feature it asks
    for the form and the 'register' handler sends username and password. Returns (whether
    iq-register was offered, the registration's outcome: 'created', an error condition, or
    None when no form was asked for, whether the login that follows succeeded)."""
    client = Client(jid, password)
    # slixmpp 1.8.3 holds back every stanza but bind before the session starts; the
    # registration get and set must go out before it.
    client._always_send_everything = True
    registration = asyncio.get_running_loop().create_future()
    ended = asyncio.get_running_loop().create_future()
    offered = []

    def record_features(stanza):
        if isinstance(stanza, StreamFeatures) and "starttls" in client.features and "mechanisms" not in client.features:
            offered.append(stanza.xml.find("{http://jabber.org/features/iq-register}register") is not None)
        return stanza

    async def on_register(form):
        assert form["register"]["instructions"], f"no instructions in the form: {form}"
        request = client.Iq()
        request["type"] = "set"
        request["register"]["username"] = client.boundjid.user
        request["register"]["password"] = client.password
        try:
            await request.send(timeout=WAIT)
            registration.done() or registration.set_result("created")
        except IqError as error:
            registration.done() or registration.set_result(error.condition)
    client.add_filter("in", record_features)
    client.add_event_handler("register", on_register)
    for event in ("session_start", "failed_all_auth", "stream_error", "disconnected"):
        client.add_event_handler(event, lambda _payload, event=event: ended.done() or ended.set_result(event))
    client.connect((harness.HOST, server.starttls_port))
    try:
        outcome = await asyncio.wait_for(ended, LOGIN_TIMEOUT)
        return (offered == [True], registration.result() if registration.done() else None, outcome == "session_start")
    finally:
        await close(client)


@test(timeout=120)
async def in_band_registration_on_an_open_domain(ctx):
    """registration.domains opens one domain: after TLS it offers iq-register, slixmpp's
    XEP-0077 plugin gets the form, creates an account and logs in with it on the same
    stream. A taken name gets conflict, a short password not-acceptable; a domain not listed
    offers nothing; the fifth attempt from one address within the hour gets
    resource-constraint and creates nothing."""
    env = {"BRAID_S2S_ENABLED": "false", "BRAID_REGISTRATION_DOMAINS": f'["{OPEN_DOMAIN}"]',
           "BRAID_REGISTRATION_ATTEMPTS_PER_ADDRESS_PER_HOUR": str(REGISTRATION_ATTEMPTS)}
    with harness.SideServer(env=env, domains=[OPEN_DOMAIN, CLOSED_DOMAIN], title="the registration server") as side:
        first = f"{unique('newcomer')}@{OPEN_DOMAIN}"
        offered, outcome, logged_in = await try_registration(side, first, "long enough ✓")
        assert offered, "iq-register not offered on the open domain"
        assert outcome == "created" and logged_in, f"registering {first}: {outcome}, logged in: {logged_in}"
        assert first in list_users(side, OPEN_DOMAIN)

        offered, outcome, logged_in = await try_registration(side, first, "another password")
        assert outcome == "conflict" and not logged_in, f"registering a taken name: {outcome}, logged in: {logged_in}"
        short = f"{unique('short')}@{OPEN_DOMAIN}"
        offered, outcome, _ = await try_registration(side, short, "short")
        assert outcome == "not-acceptable", f"a short password: {outcome}"
        assert short not in list_users(side, OPEN_DOMAIN)

        closed = f"{unique('closed')}@{CLOSED_DOMAIN}"
        offered, outcome, logged_in = await try_registration(side, closed, "long enough ✓")
        assert not offered and outcome is None and not logged_in, f"the closed domain: offered {offered}, {outcome}"
        assert closed not in list_users(side, CLOSED_DOMAIN)

        # Three attempts so far from 127.0.0.1; one more is allowed, then none this hour.
        fourth = f"{unique('fourth')}@{OPEN_DOMAIN}"
        _, outcome, logged_in = await try_registration(side, fourth, "long enough ✓")
        assert outcome == "created" and logged_in, f"the fourth attempt: {outcome}"
        fifth = f"{unique('fifth')}@{OPEN_DOMAIN}"
        _, outcome, _ = await try_registration(side, fifth, "long enough ✓")
        assert outcome == "resource-constraint", f"the fifth attempt within the hour: {outcome}"
        assert fifth not in list_users(side, OPEN_DOMAIN)


def main():
    return harness.run_suite(harness.collect_tests(globals()), domains=[DOMAIN_A, DOMAIN_B])


if __name__ == "__main__":
    sys.exit(main())
