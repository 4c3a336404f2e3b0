#!/usr/bin/python3
"""Mobile interop (issue 14): Debian's slixmpp 1.8.3 against a real Braid.

- Client State Indication (XEP-0352, slixmpp's xep_0352 plugin): while inactive, presence
  updates are held (only the newest per contact) and chat states wait; a message with a body
  goes through at once, after what was held; `<active/>` sends what is left.
- Push (XEP-0357): a small app server (a slixmpp client that answers pubsub publishes) gets
  one notification per message for an account with no device online, and one for a device
  that waits for stream resumption; notifications carry the count and the client's secret,
  not the body or the sender; an app server that keeps answering with errors loses the
  registration.
- The archive after `kill -9`: every message the server acknowledged (XEP-0198 `<a/>`) is
  in the sender's and the recipient's archive, and offline, after a crash and a restart.
- Room history after a restart: a persistent room's history on join comes from its archive.

Run with Debian's Python (the one that has slixmpp):
    BRAID_BINARY=/work/main/.build/debug/braid /usr/bin/python3 Tests/Interop/test_mobile.py
Set INTEROP_DEBUG=1 to see slixmpp's own log, INTEROP_ONLY=name,name to run only those tests.
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test  # noqa: E402
from test_clients import (  # noqa: E402
    DOMAIN_A, DOMAIN_B, LOGIN_TIMEOUT, WAIT, Clients, create_room, cut_connection, expect_nothing,
    login, muc_login, new_account, next_item, room_body, start_connect, unique, wait_event)

from slixmpp import JID  # noqa: E402
from slixmpp.xmlstream import ET  # noqa: E402
from slixmpp.xmlstream.handler import Callback  # noqa: E402
from slixmpp.xmlstream.matcher import MatchXPath  # noqa: E402

PUBSUB = "http://jabber.org/protocol/pubsub"
PUSH = "urn:xmpp:push:0"
DATA_FORMS = "jabber:x:data"
CHAT_STATES = "http://jabber.org/protocol/chatstates"
PUSH_MAX_ERRORS = 2
RESUME_SECONDS = 60


def form_values(form):
    """A data form's fields as {var: [values]}."""
    return {field.get("var"): [value.text or "" for value in field.findall(f"{{{DATA_FORMS}}}value")]
            for field in form.findall(f"{{{DATA_FORMS}}}field")}


# -- Client State Indication (XEP-0352) -------------------------------------------------------

@test(timeout=45)
async def csi_holds_presence_and_lets_a_chat_through(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "csialice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "csibob")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid, plugins=("xep_0352", "xep_0085"))
        assert alice["xep_0352"].enabled, "the server did not offer csi in its stream features"
        bob = await clients.login(bob_jid)
        states = asyncio.Queue()
        alice.add_event_handler("chatstate", states.put_nowait)
        # Bob's presence as Alice receives it (slixmpp names the event after <show/>).
        from_bob = asyncio.Queue()
        alice.add_event_handler("presence", lambda p: p["from"].bare == bob_jid and from_bob.put_nowait(p))
        alice["xep_0352"].send_inactive()

        # Three presence updates from Bob (directed), then a chat state: nothing arrives.
        for show in ("away", "xa", "dnd"):
            bob.send_presence(pto=alice.boundjid.full, pshow=show, pstatus=f"now {show}")
        message = bob.make_message(mto=alice.boundjid.full, mtype="chat")
        message.append(ET.Element(f"{{{CHAT_STATES}}}composing"))
        message.send()
        await expect_nothing(from_bob, "presence while inactive", timeout=1.5)
        assert states.empty(), "a chat state reached the inactive client"

        # A message with a body is not held: it arrives, after the newest presence only.
        bob.send_message(mto=alice.boundjid.full, mbody="wake up ☎", mtype="chat")
        presence = await next_item(from_bob, "the held presence")
        assert presence["show"] == "dnd" and presence["status"] == "now dnd", f"got {presence['show']} {presence['status']!r}"
        got = await next_item(alice.messages, "the message with a body")
        while got["body"] == "":
            got = await next_item(alice.messages, "the message with a body")
        assert got["body"] == "wake up ☎", got["body"]
        await expect_nothing(from_bob, "an older, replaced presence", timeout=1.0)

        # Held again, then flushed by <active/>.
        bob.send_presence(pto=alice.boundjid.full, pshow="chat", pstatus="back")
        await expect_nothing(from_bob, "presence while inactive", timeout=1.0)
        alice["xep_0352"].send_active()
        presence = await next_item(from_bob, "the presence held until <active/>")
        assert presence["status"] == "back", presence["status"]
        # Active again: presence arrives at once.
        bob.send_presence(pto=alice.boundjid.full, pshow="away", pstatus="live")
        presence = await next_item(from_bob, "presence while active")
        assert presence["status"] == "live", presence["status"]


# -- Push (XEP-0357) --------------------------------------------------------------------------

class AppServer:
    """A push app server: a logged-in client that records each notification published to it
    and answers with a result (or, when told to, an error)."""

    def __init__(self, client):
        self.client = client
        self.notifications = asyncio.Queue()
        self.fail = False
        client.register_handler(Callback(
            "push publish", MatchXPath(f"{{jabber:client}}iq/{{{PUBSUB}}}pubsub"), self._on_publish))

    def _on_publish(self, iq):
        if iq["type"] != "set":
            return
        publish = iq.xml.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish")
        notification = None if publish is None else publish.find(f"{{{PUBSUB}}}item/{{{PUSH}}}notification")
        summary = None if notification is None else notification.find(f"{{{DATA_FORMS}}}x")
        options = iq.xml.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish-options/{{{DATA_FORMS}}}x")
        self.notifications.put_nowait({
            "from": iq["from"].full, "node": None if publish is None else publish.get("node"),
            "summary": {} if summary is None else form_values(summary),
            "options": {} if options is None else form_values(options)})
        if self.fail:
            error = iq.reply(clear=True)
            error["type"] = "error"
            error["error"]["condition"] = "item-not-found"
            error["error"]["type"] = "cancel"
            error.send()
        else:
            iq.reply(clear=True).send()


async def enable_push(client, app_jid, node, secret):
    iq = client.Iq()
    iq["type"] = "set"
    enable = ET.Element(f"{{{PUSH}}}enable", jid=app_jid, node=node)
    form = ET.SubElement(enable, f"{{{DATA_FORMS}}}x", type="submit")
    for var, value in (("FORM_TYPE", f"{PUBSUB}#publish-options"), ("secret", secret)):
        field = ET.SubElement(form, f"{{{DATA_FORMS}}}field", var=var)
        ET.SubElement(field, f"{{{DATA_FORMS}}}value").text = value
    iq.append(enable)
    await iq.send(timeout=WAIT)


async def app_server(clients, server):
    jid = new_account(server, DOMAIN_B, "pushapp")
    client = await clients.login(jid + "/app")
    return AppServer(client)


@test(timeout=60)
async def push_reaches_the_app_server_once_per_offline_message(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "pushalice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "pushbob")
    async with Clients(ctx.server) as clients:
        app = await app_server(clients, ctx.server)
        phone = await login(ctx.server, alice_jid + "/phone")
        await enable_push(phone, app.client.boundjid.full, "node-1", "s3cret")
        # The phone goes away for good (an iOS app suspended without resumption).
        await phone.disconnect(wait=2.0)
        bob = await clients.login(bob_jid)
        bodies = ["first private words", "second", "third"]
        for index, body in enumerate(bodies, start=1):
            bob.send_message(mto=alice_jid, mbody=body, mtype="chat")
            notification = await next_item(app.notifications, f"notification {index}")
            assert notification["from"] == alice_jid, f"from {notification['from']}"
            assert notification["node"] == "node-1", notification["node"]
            assert notification["options"].get("secret") == ["s3cret"], f"publish-options {notification['options']}"
            summary = notification["summary"]
            assert summary.get("message-count") == [str(index)], f"count {summary.get('message-count')}"
            # Privacy by default: neither the sender nor the body leaves the server.
            assert "last-message-body" not in summary and "last-message-sender" not in summary, summary
        await expect_nothing(app.notifications, "a notification beyond one per message")

        # The phone comes back and gets the messages; messages to an online device push nothing.
        phone = await clients.login(alice_jid + "/phone")
        got = [(await next_item(phone.messages, f"stored message {i}"))["body"] for i in range(len(bodies))]
        assert got == bodies, got
        bob.send_message(mto=alice_jid, mbody="live", mtype="chat")
        assert (await next_item(phone.messages, "the live message"))["body"] == "live"
        await expect_nothing(app.notifications, "a notification for a delivered message")


@test(timeout=60)
async def push_for_a_device_waiting_for_resumption(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "pushsm")
    bob_jid = new_account(ctx.server, DOMAIN_B, "pushsmbob")
    async with Clients(ctx.server) as clients:
        app = await app_server(clients, ctx.server)
        phone = await clients.login(alice_jid + "/phone", stream_management=True)
        await enable_push(phone, app.client.boundjid.full, "node-sm", "k")
        bound = phone.boundjid.full
        bob = await clients.login(bob_jid)
        cut_connection(phone)
        await wait_event(phone, "disconnected")
        # The server learns of the cut when the reset arrives; wait until it has (a message
        # sent before would be written to the dead socket, which is what XEP-0198 covers).
        deadline = time.monotonic() + WAIT
        note = "connection lost; waiting for resumption"
        while note not in ctx.server.log_since(0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        bob.send_message(mto=bound, mbody="are you there?", mtype="chat")
        notification = await next_item(app.notifications, "a notification for the waiting session")
        assert notification["node"] == "node-sm" and notification["from"] == alice_jid, notification
        # The phone resumes and gets the message, once.
        resumed = asyncio.ensure_future(wait_event(phone, "session_resumed", timeout=LOGIN_TIMEOUT))
        start_connect(phone, ctx.server, direct_tls=False)
        await resumed
        got = await next_item(phone.messages, "the message after resumption")
        assert got["body"] == "are you there?", got["body"]
        await expect_nothing(phone.messages, "a duplicate after resumption")


@test(timeout=60)
async def push_registration_dropped_after_repeated_errors(ctx):
    alice_jid = new_account(ctx.server, DOMAIN_A, "pusherr")
    bob_jid = new_account(ctx.server, DOMAIN_B, "pusherrbob")
    async with Clients(ctx.server) as clients:
        app = await app_server(clients, ctx.server)
        app.fail = True
        phone = await login(ctx.server, alice_jid + "/phone")
        await enable_push(phone, app.client.boundjid.full, "node-err", "k")
        await phone.disconnect(wait=2.0)
        bob = await clients.login(bob_jid)
        for index in range(PUSH_MAX_ERRORS):
            bob.send_message(mto=alice_jid, mbody=f"message {index}", mtype="chat")
            await next_item(app.notifications, f"notification {index + 1}, answered with an error")
        # The registration is gone: the next message pushes nothing, even to a healthy server.
        offset = 0
        deadline = time.monotonic() + WAIT
        while "push registration dropped" not in ctx.server.log_since(offset) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "push registration dropped" in ctx.server.log_since(offset), "no log line for the dropped registration"
        app.fail = False
        bob.send_message(mto=alice_jid, mbody="after the drop", mtype="chat")
        await expect_nothing(app.notifications, "a notification after the registration was dropped", timeout=2.0)


# -- The archive after a crash ------------------------------------------------------------------

@test(timeout=120)
async def acknowledged_messages_survive_kill_9(ctx):
    """XEP-0198: an `<a h='n'/>` hands responsibility for n stanzas to the server. After a
    SIGKILL right after the last acknowledgement, each of them is in both archives and in
    the recipient's offline storage."""
    alice_jid = new_account(ctx.server, DOMAIN_A, "crashalice")
    bob_jid = new_account(ctx.server, DOMAIN_B, "crashbob")
    count = 200
    bodies = [f"crash test {index:03d}" for index in range(count)]
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid, stream_management=True)
        sm = alice["xep_0198"]
        for body in bodies:
            alice.send_message(mto=bob_jid, mbody=body, mtype="chat")
        # slixmpp writes the <r/> of its window before the stanza that filled it (its send
        # queue runs later), so the last acknowledgement would wait for a later request: once
        # every stanza went through that queue, ask again (and again, while waiting).
        deadline = time.monotonic() + 30
        asked = 0.0
        while time.monotonic() < deadline:
            if sm.seq >= count + 2 and sm.last_ack == sm.seq:
                break
            if sm.seq >= count + 2 and time.monotonic() - asked > 0.5:
                await asyncio.sleep(0.01)  # let slixmpp's queue write the last stanza first
                sm.request_ack()
                asked = time.monotonic()
            await asyncio.sleep(0.002)
        acknowledged = sm.last_ack
        # Stanzas counted by slixmpp: the presence and roster get of the login, then ours.
        assert acknowledged == sm.seq, f"only {acknowledged} of {sm.seq} acknowledged in 30 s"
        ctx.server.crash_and_restart()

    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        alice.register_plugin("xep_0313")
        sent = [m["mam_result"]["forwarded"]["stanza"]["body"]
                async for m in alice["xep_0313"].iterate(with_jid=JID(bob_jid), rsm={"max": 100})]
        missing = [body for body in bodies if body not in sent]
        assert not missing, f"{len(missing)} acknowledged messages missing from the sender's archive, first {missing[:3]}"
        bob = await clients.login(bob_jid)
        bob.register_plugin("xep_0313")
        received = [m["mam_result"]["forwarded"]["stanza"]["body"]
                    async for m in bob["xep_0313"].iterate(with_jid=JID(alice_jid), rsm={"max": 100})]
        assert received == bodies, f"the recipient's archive has {len(received)} of {count}, in order: {received == sorted(received)}"
        offline = []
        while len(offline) < count:
            offline.append((await next_item(bob.messages, f"offline message {len(offline) + 1}"))["body"])
        assert offline == bodies, "offline messages differ from what was acknowledged"


# -- Room history after a restart -------------------------------------------------------------

@test(timeout=60)
async def room_history_from_the_archive_after_restart(ctx):
    """A persistent room's discussion history lives in its archive: after a restart a
    newcomer gets the last messages, oldest first, with their time (XEP-0203) and the ids
    the room gave them (XEP-0359)."""
    owner_jid = new_account(ctx.server, DOMAIN_A, "histowner")
    guest_jid = new_account(ctx.server, DOMAIN_B, "histguest")
    room = f"{unique('history')}@conference.{DOMAIN_A}"
    bodies = [f"said before the restart {index} ✓" for index in range(3)]
    ids = []
    async with Clients(ctx.server) as clients:
        owner = await muc_login(clients, owner_jid)
        await create_room(owner, room, "owner", **{"muc#roomconfig_persistentroom": True})
        for body in bodies:
            owner.send_message(mto=room, mbody=body, mtype="groupchat")
            echo = await room_body(owner, room, f"the echo of {body!r}")
            stanza_id = echo.xml.find("{urn:xmpp:sid:0}stanza-id")
            assert stanza_id is not None and stanza_id.get("by") == room, f"no stanza-id by the room: {echo}"
            ids.append(stanza_id.get("id"))
    try:
        ctx.server.restart()
    except harness.HarnessError as error:
        raise AssertionError(f"restart: {error}") from None
    async with Clients(ctx.server) as clients:
        guest = await muc_login(clients, guest_jid)
        _presence, _subject, _occupants, history = await guest["xep_0045"].join_muc_wait(room, "guest", timeout=WAIT)
        got = [message["body"] for message in history]
        assert got == bodies, f"history after the restart: {got}"
        got_ids = [message.xml.find("{urn:xmpp:sid:0}stanza-id").get("id") for message in history]
        assert got_ids == ids, f"stanza-ids {got_ids}, the room gave {ids}"
        stamps = [message["delay"]["stamp"] for message in history]
        assert all(stamp is not None for stamp in stamps) and stamps == sorted(stamps), f"delay stamps {stamps}"
        assert all(message["from"].resource == "owner" for message in history), [str(m["from"]) for m in history]


def main():
    env = {"BRAID_STREAM_MANAGEMENT_RESUME_TIMEOUT_SECONDS": str(RESUME_SECONDS),
           "BRAID_PUSH_MAX_ERRORS": str(PUSH_MAX_ERRORS),
           "BRAID_OFFLINE_MAX_MESSAGES_PER_USER": "1000"}
    return harness.run_suite(harness.collect_tests(globals()), env=env, domains=[DOMAIN_A, DOMAIN_B])


if __name__ == "__main__":
    sys.exit(main())
