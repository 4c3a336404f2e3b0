import Foundation
import NIOCore
import Storage
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

let rosterNS = "jabber:iq:roster"

func rosterItem(_ jid: String, name: String? = nil, groups: [String] = [], subscription: String? = nil) -> XMLElement {
    var attributes = [XMLAttribute("jid", jid)]
    if let name { attributes.append(XMLAttribute("name", name)) }
    if let subscription { attributes.append(XMLAttribute("subscription", subscription)) }
    return XMLElement(name: "query", namespace: rosterNS, children: [.element(XMLElement(name: "item", namespace: rosterNS, attributes: attributes, children: groups.map {
        .element(XMLElement(name: "group", namespace: rosterNS, text: $0))
    }))])
}

extension XMLElement {
    var body: String? { firstChild(name: "body", namespace: XMLNamespace.client)?.text }
    var stanzaErrorCondition: String? { firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name }
    func rosterItems() -> [XMLElement] { firstChild(name: "query", namespace: rosterNS)?.children(name: "item", namespace: rosterNS) ?? [] }
}

@Suite("Instant messaging (RFC 6121)", .serialized)
struct InstantMessagingTests {
    // MARK: Roster

    @Test("Roster set, push, get with versioning, and remove")
    func rosterLifecycle() async throws {
        try await withServer { server in
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            let empty = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: rosterNS))
            #expect(empty.attribute("type") == "result")
            #expect(empty.rosterItems().isEmpty)
            #expect(empty.firstChild(name: "query", namespace: rosterNS)?.attribute("ver") == "0")

            let set = try await alice.iq(.set, payload: rosterItem("bob@b.example", name: "Bob", groups: ["Friends", "Ünïcode"]))
            #expect(set.attribute("type") == "result")
            let push = try await alice.waitFor { $0.name == "iq" && $0.attribute("type") == "set" }
            #expect(push.attribute("to") == aliceJID.description)
            let pushed = push.rosterItems().first
            #expect(pushed?.attribute("jid") == "bob@b.example" && pushed?.attribute("subscription") == "none" && pushed?.attribute("name") == "Bob")
            #expect(pushed?.children(name: "group", namespace: rosterNS).map(\.text) == ["Friends", "Ünïcode"])
            let version = push.firstChild(name: "query", namespace: rosterNS)?.attribute("ver")
            #expect(version == "1")

            // A current version gets an empty result (RFC 6121 §2.6.3).
            let current = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: rosterNS, attributes: [XMLAttribute("ver", "1")]))
            #expect(current.attribute("type") == "result" && current.firstElement == nil)
            let stale = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: rosterNS, attributes: [XMLAttribute("ver", "0")]))
            #expect(stale.rosterItems().map { $0.attribute("jid") } == ["bob@b.example"])

            let removed = try await alice.iq(.set, payload: rosterItem("bob@b.example", subscription: "remove"))
            #expect(removed.attribute("type") == "result")
            let removal = try await alice.waitFor { $0.name == "iq" && $0.attribute("type") == "set" }
            #expect(removal.rosterItems().first?.attribute("subscription") == "remove")
            let missing = try await alice.iq(.set, payload: rosterItem("bob@b.example", subscription: "remove"))
            #expect(missing.stanzaErrorCondition == "item-not-found")
            await alice.close()
        }
    }

    @Test("Bad roster sets get the RFC 6121 §2.3.3 errors")
    func rosterErrors() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let two = XMLElement(name: "query", namespace: rosterNS, children: [
                .element(XMLElement(name: "item", namespace: rosterNS, attributes: [XMLAttribute("jid", "x@b.example")])),
                .element(XMLElement(name: "item", namespace: rosterNS, attributes: [XMLAttribute("jid", "y@b.example")])),
            ])
            #expect(try await alice.iq(.set, payload: two).stanzaErrorCondition == "bad-request")
            #expect(try await alice.iq(.set, payload: rosterItem("not a jid@")).stanzaErrorCondition == "jid-malformed")
            #expect(try await alice.iq(.set, payload: rosterItem("x@b.example", groups: [""])).stanzaErrorCondition == "not-acceptable")
            #expect(try await alice.iq(.set, payload: rosterItem("x@b.example", groups: ["g", "g"])).stanzaErrorCondition == "bad-request")
            // Someone else's roster is not readable.
            let (bob, _) = try await server.loggedIn("bob@b.example")
            #expect(try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "query", namespace: rosterNS)).stanzaErrorCondition == "service-unavailable")
            await alice.close()
            await bob.close()
        }
    }

    // MARK: Subscriptions and presence

    @Test("Mutual subscription across two local domains, with presence both ways")
    func mutualSubscription() async throws {
        try await withServer { server in
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            let (bob, bobJID) = try await server.loggedIn("bob@b.example")
            _ = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: rosterNS))
            _ = try await bob.iq(.get, payload: XMLElement(name: "query", namespace: rosterNS))
            try await alice.sendPresence()
            try await bob.sendPresence()

            try await alice.sendPresence(type: "subscribe", to: "bob@b.example")
            let request = try await bob.waitFor { $0.name == "presence" && $0.attribute("type") == "subscribe" }
            // §3.1.2: stamped with the bare JID.
            #expect(request.attribute("from") == "alice@a.example")
            let pending = try await alice.waitFor { $0.name == "iq" && $0.attribute("type") == "set" }
            #expect(pending.rosterItems().first?.attribute("ask") == "subscribe")

            try await bob.sendPresence(type: "subscribed", to: "alice@a.example")
            let bobPush = try await bob.waitFor { $0.name == "iq" && $0.attribute("type") == "set" }
            #expect(bobPush.rosterItems().first?.attribute("subscription") == "from")
            let approval = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "subscribed" }
            #expect(approval.attribute("from") == "bob@b.example")
            // (Alice's own presence came back to her first, RFC 6121 §4.2.2.)
            let bobsPresence = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == nil && $0.attribute("from") != aliceJID.description }
            #expect(bobsPresence.attribute("from") == bobJID.description)

            try await bob.sendPresence(type: "subscribe", to: "alice@a.example")
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "subscribe" }
            try await alice.sendPresence(type: "subscribed", to: "bob@b.example")
            let alicesPresence = try await bob.waitFor { $0.name == "presence" && $0.attribute("type") == nil && $0.attribute("from") == aliceJID.description }
            #expect(alicesPresence.attribute("to") == "bob@b.example")

            let aliceRoster = try await server.context.storage.roster(of: try JID("alice@a.example"))
            let bobRoster = try await server.context.storage.roster(of: try JID("bob@b.example"))
            #expect(aliceRoster.items.map(\.subscription) == [.both])
            #expect(bobRoster.items.map(\.subscription) == [.both])

            // Going offline is broadcast to the subscriber.
            await alice.close()
            let gone = try await bob.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" }
            #expect(gone.attribute("from") == aliceJID.description)
            // Logging back in, alice's probe brings bob's presence.
            let (again, _) = try await server.loggedIn("alice@a.example", resource: "second")
            try await again.sendPresence()
            let probed = try await again.waitFor { $0.name == "presence" && $0.attribute("from") == bobJID.description }
            #expect(probed.attribute("type") == nil)
            await again.close()
            await bob.close()
        }
    }

    @Test("A subscription request to an offline user is delivered at their next login")
    func storedSubscriptionRequest() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendPresence(type: "subscribe", to: "bob@b.example")
            // A session's stanzas are handled in order: once a later IQ is answered, the
            // request has been stored.
            try await alice.roundTrip()
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            let request = try await bob.waitFor { $0.name == "presence" && $0.attribute("type") == "subscribe" }
            #expect(request.attribute("from") == "alice@a.example")
            await alice.close()
            await bob.close()
        }
    }

    @Test("A pre-approved request is granted without asking (RFC 6121 §3.4)")
    func preApproval() async throws {
        try await withServer { server in
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence(type: "subscribed", to: "alice@a.example")
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await bob.sendPresence()
            // The notification goes to available resources (RFC 6121 §3.1.6).
            try await alice.sendPresence()
            try await alice.sendPresence(type: "subscribe", to: "bob@b.example")
            let granted = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "subscribed" }
            #expect(granted.attribute("from") == "bob@b.example")
            #expect(await bob.expectSilence().map { $0.name == "presence" && $0.attribute("type") == "subscribe" } != true)
            let item = try await server.context.storage.rosterItem(of: try JID("bob@b.example"), contact: try JID("alice@a.example"))
            #expect(item?.subscription == .from)
            await alice.close()
            await bob.close()
        }
    }

    // MARK: Messages

    @Test("Messages to a bare JID go to the highest non-negative priority resources")
    func priorityDelivery() async throws {
        try await withServer { server in
            let (high, _) = try await server.loggedIn("bob@b.example", resource: "high")
            let (low, _) = try await server.loggedIn("bob@b.example", resource: "low")
            let (negative, _) = try await server.loggedIn("bob@b.example", resource: "away")
            try await high.sendPresence(priority: 5)
            try await low.sendPresence(priority: 1)
            try await negative.sendPresence(priority: -1)
            let (alice, _) = try await server.loggedIn("alice@a.example")
            for resource in [high, low, negative] { try await resource.roundTrip() }
            try await alice.sendMessage(to: "bob@b.example", body: "to the best")
            #expect(try await high.waitFor { $0.name == "message" }.body == "to the best")
            #expect(await low.expectSilence().map { $0.name == "message" } != true)
            #expect(await negative.expectSilence().map { $0.name == "message" } != true)
            // A full JID reaches even the negative-priority resource.
            try await alice.sendMessage(to: "bob@b.example/away", body: "direct")
            #expect(try await negative.waitFor { $0.name == "message" }.body == "direct")
            // A chat to a resource that does not exist is treated as bare (§8.5.3.2.1).
            try await alice.sendMessage(to: "bob@b.example/gone", body: "fallback")
            #expect(try await high.waitFor { $0.name == "message" }.body == "fallback")
            // groupchat to a bare JID is refused.
            try await alice.sendMessage(to: "bob@b.example", body: "muc?", type: "groupchat", id: "gc1")
            let refused = try await alice.waitFor { $0.name == "message" && $0.attribute("id") == "gc1" }
            #expect(refused.attribute("type") == "error" && refused.stanzaErrorCondition == "service-unavailable")
            for client in [high, low, negative, alice] { await client.close() }
        }
    }

    @Test("Offline messages are stored and delivered with a delay stamp at the next presence")
    func offlineDelivery() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "bob@b.example", body: "while you were out 📬", id: "off1")
            try await alice.sendMessage(to: "bob@b.example", body: "second", id: "off2")
            #expect(await alice.expectSilence() == nil)
            // Stored by alice's session task, which may lag on a loaded machine: wait for it.
            try await waitUntil("both messages stored offline") {
                try await server.context.storage.offlineMessageCount(for: try JID("bob@b.example")) == 2
            }
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            let first = try await bob.waitFor { $0.name == "message" }
            let second = try await bob.waitFor { $0.name == "message" }
            #expect(first.body == "while you were out 📬" && second.body == "second")
            let delay = first.firstChild(name: "delay", namespace: "urn:xmpp:delay")
            #expect(delay?.attribute("from") == "b.example")
            #expect(delay?.attribute("stamp")?.hasSuffix("Z") == true)
            #expect(try await server.context.storage.offlineMessageCount(for: try JID("bob@b.example")) == 0)
            #expect(server.metrics.counterValue("braid_offline_delivered_total") == 2)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A missing account answers exactly like an offline account whose store is full")
    func noHarvesting() async throws {
        try await withServer(configure: { $0.offline.maxMessagesPerUser = 1 }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "bob@b.example", body: "fills the store", id: "m0")
            #expect(await alice.expectSilence() == nil)
            try await alice.sendMessage(to: "bob@b.example", body: "x", id: "m1")
            let full = try await alice.waitFor { $0.attribute("id") == "m1" }
            try await alice.sendMessage(to: "nobody@b.example", body: "x", id: "m1")
            let missing = try await alice.waitFor { $0.attribute("id") == "m1" }
            // Identical apart from the address they come from.
            #expect(full.setting(attribute: "from", to: nil) == missing.setting(attribute: "from", to: nil).setting(attribute: "from", to: nil))
            #expect(full.stanzaErrorCondition == "service-unavailable")
            #expect(full.firstChild(name: "error", namespace: XMLNamespace.client)?.attribute("type") == "cancel")
            // IQs: a stranger's ping to an existing and to a missing account look the same.
            let existing = try await alice.iq(.get, to: "bob@b.example", id: "p", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping"))
            let absent = try await alice.iq(.get, to: "nobody@b.example", id: "p", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping"))
            #expect(existing.setting(attribute: "from", to: nil) == absent.setting(attribute: "from", to: nil))
            #expect(existing.stanzaErrorCondition == "service-unavailable")
            // Disco#info likewise.
            let info = XMLElement(name: "query", namespace: "http://jabber.org/protocol/disco#info")
            let existingInfo = try await alice.iq(.get, to: "bob@b.example", id: "d", payload: info)
            let absentInfo = try await alice.iq(.get, to: "nobody@b.example", id: "d", payload: info)
            #expect(existingInfo.setting(attribute: "from", to: nil) == absentInfo.setting(attribute: "from", to: nil))
            await alice.close()
        }
    }

    @Test("A stanza for a domain not hosted here is not delivered locally")
    func remoteDomain() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "someone@remote.example", body: "x", id: "r1")
            let bounce = try await alice.waitFor { $0.attribute("id") == "r1" }
            #expect(bounce.stanzaErrorCondition == "remote-server-not-found")
            #expect(bounce.attribute("from") == "someone@remote.example")
            await alice.close()
        }
    }

    // MARK: Services

    @Test("The server answers disco#info, ping and version; unknown namespaces get service-unavailable")
    func serverServices() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let info = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: "http://jabber.org/protocol/disco#info"))
            let query = info.firstChild(name: "query", namespace: "http://jabber.org/protocol/disco#info")
            #expect(query?.firstChild(name: "identity", namespace: "http://jabber.org/protocol/disco#info")?.attribute("category") == "server")
            let features = Set(query?.children(name: "feature", namespace: "http://jabber.org/protocol/disco#info").compactMap { $0.attribute("var") } ?? [])
            #expect(features.isSuperset(of: ["urn:xmpp:ping", "jabber:iq:version", "urn:xmpp:carbons:2", "http://jabber.org/protocol/disco#info"]))
            #expect(try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping")).attribute("type") == "result")
            let version = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: "jabber:iq:version"))
            #expect(version.firstChild(name: "query", namespace: "jabber:iq:version")?.firstChild(name: "name", namespace: "jabber:iq:version")?.text == "Braid")
            #expect(try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: "urn:example:unknown")).stanzaErrorCondition == "service-unavailable")
            // The account's own disco and ping are answered.
            #expect(try await alice.iq(.get, to: "alice@a.example", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping")).attribute("type") == "result")
            await alice.close()
        }
    }

    @Test("Carbons copy sent and received chats to the other resources that asked")
    func carbons() async throws {
        try await withServer { server in
            let (phone, phoneJID) = try await server.loggedIn("alice@a.example", resource: "phone")
            let (laptop, _) = try await server.loggedIn("alice@a.example", resource: "laptop")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            for client in [phone, laptop, bob] { try await client.sendPresence() }
            #expect(try await laptop.iq(.set, payload: XMLElement(name: "enable", namespace: "urn:xmpp:carbons:2")).attribute("type") == "result")
            try await phone.sendMessage(to: "bob@b.example", body: "from the phone")
            let sent = try await laptop.waitFor { $0.name == "message" && $0.firstChild(name: "sent", namespace: "urn:xmpp:carbons:2") != nil }
            let forwarded = sent.firstChild(name: "sent", namespace: "urn:xmpp:carbons:2")?.firstChild(name: "forwarded", namespace: "urn:xmpp:forward:0")?.firstChild(name: "message", namespace: XMLNamespace.client)
            #expect(forwarded?.body == "from the phone")
            #expect(forwarded?.attribute("from") == phoneJID.description)
            _ = try await bob.waitFor { $0.name == "message" }
            try await bob.sendMessage(to: phoneJID.description, body: "to the phone")
            #expect(try await phone.waitFor { $0.name == "message" }.body == "to the phone")
            let received = try await laptop.waitFor { $0.name == "message" && $0.firstChild(name: "received", namespace: "urn:xmpp:carbons:2") != nil }
            #expect(received.attribute("from") == "alice@a.example")
            for client in [phone, laptop, bob] { await client.close() }
        }
    }

    // MARK: Stream management

    @Test("XEP-0198: acks count stanzas, and a resumed session loses nothing")
    func streamManagementResumption() async throws {
        try await withServer { server in
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example", resource: "mobile")
            try await alice.send(XMLElement(name: "enable", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("resume", "true")]))
            let enabled = try await alice.waitFor { $0.name == "enabled" }
            #expect(enabled.attribute("resume") == "true")
            let id = try #require(enabled.attribute("id"))
            try await alice.sendPresence()
            try await alice.send(XMLElement(name: "r", namespace: XMLNamespace.streamManagement))
            let ack = try await alice.waitFor { $0.name == "a" }
            #expect(ack.attribute("h") == "1")

            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendMessage(to: aliceJID.description, body: "before the drop")
            _ = try await alice.waitFor { $0.name == "message" }
            // The connection drops without a stream close; nothing acknowledged the message.
            try await alice.channel.close()
            try await waitUntil { server.metrics.counterValue("braid_sm_awaiting_resumption_total") == 1 }
            for index in 1...3 {
                try await bob.sendMessage(to: aliceJID.description, body: "while away \(index)")
            }
            try await bob.roundTrip()

            let again = try await server.authenticatedWithoutBind("alice@a.example")
            try await again.send(XMLElement(name: "resume", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("previd", id), XMLAttribute("h", "0")]))
            let resumed = try await again.waitFor { $0.name == "resumed" || $0.name == "failed" }
            #expect(resumed.name == "resumed")
            #expect(resumed.attribute("h") == "1")
            var bodies: [String] = []
            while bodies.count < 4 {
                let message = try await again.waitFor { $0.name == "message" }
                bodies.append(message.body ?? "")
            }
            #expect(bodies == ["before the drop", "while away 1", "while away 2", "while away 3"])
            #expect(server.metrics.counterValue("braid_sm_resumed_total") == 1)
            await again.close()
            await bob.close()
        }
    }

    @Test("XEP-0198: when the resumption window passes, and not before, unacknowledged messages go to offline storage")
    func unackedGoOffline() async throws {
        let time = ManualSessionClock()
        try await withServer(sessionClock: time.clock, configure: { $0.streamManagement.resumeTimeoutSeconds = 300 }) { server in
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            try await alice.send(XMLElement(name: "enable", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("resume", "true")]))
            _ = try await alice.waitFor { $0.name == "enabled" }
            try await alice.sendPresence()
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendMessage(to: aliceJID.description, body: "unacknowledged")
            _ = try await alice.waitFor { $0.name == "message" }
            try await alice.channel.close()
            try await waitUntil { server.metrics.counterValue("braid_sm_awaiting_resumption_total") == 1 }
            // Within the window the session waits to be resumed: nothing moves.
            await time.advance(by: .seconds(299))
            #expect(try await server.context.storage.offlineMessageCount(for: try JID("alice@a.example")) == 0)
            // The resumption window closes and the unacknowledged message goes offline.
            await time.advance(by: .seconds(2))
            try await waitUntil { try await server.context.storage.offlineMessageCount(for: try JID("alice@a.example")) == 1 }
            let (back, _) = try await server.loggedIn("alice@a.example", resource: "new")
            try await back.sendPresence()
            #expect(try await back.waitFor { $0.name == "message" }.body == "unacknowledged")
            await back.close()
            await bob.close()
        }
    }

    // MARK: Hosted domains at runtime

    @Test("A domain added while running is served at once; a removed one closes with host-gone")
    func liveDomains() async throws {
        try await withServer { server in
            let storage = server.context.storage
            try await storage.addDomain("c.example")
            try await storage.createUser(try JID("dave@c.example"), credentials: try TestServer.credentials(password: TestServer.password))
            try await waitUntil(timeout: .seconds(10)) { server.context.domains.isHosted("c.example") }
            let (dave, jid) = try await server.loggedIn("dave@c.example")
            #expect(jid.description == "dave@c.example/test")
            try await storage.removeDomain("c.example")
            #expect(try await dave.streamErrorCondition(timeout: .seconds(10)) == .hostGone)
            #expect(server.context.domains.isHosted("c.example") == false)
        }
    }
}
