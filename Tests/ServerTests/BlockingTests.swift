import Foundation
import Storage
import Testing
import TestSupport
import XMPPCore
@testable import Server

/// XEP-0191 Blocking Command through real client streams: the list and its pushes, what
/// stops both ways (messages, IQs, presence), domain items, persistence, federation.
@Suite("Blocking Command (XEP-0191)")
struct BlockingTests {
    static let ping = XMLElement(name: "ping", namespace: "urn:xmpp:ping")

    // MARK: Helpers

    func jids(_ strings: [String]) throws -> [JID] { try strings.map { try JID($0) } }

    func block(_ client: TestClient, _ items: [String]) async throws -> XMLElement {
        try await client.iq(.set, payload: BlockingModule.element("block", items: try jids(items)))
    }

    func unblock(_ client: TestClient, _ items: [String]) async throws -> XMLElement {
        try await client.iq(.set, payload: BlockingModule.element("unblock", items: try jids(items)))
    }

    /// The list as the server returns it.
    func blocklist(_ client: TestClient) async throws -> [String] {
        let reply = try await client.iq(.get, payload: XMLElement(name: "blocklist", namespace: BlockingModule.namespace))
        #expect(reply.attribute("type") == "result")
        let list = try #require(reply.firstChild(name: "blocklist", namespace: BlockingModule.namespace))
        return items(list)
    }

    func items(_ element: XMLElement) -> [String] {
        element.children(name: "item", namespace: BlockingModule.namespace).compactMap { $0.attribute("jid") }
    }

    /// The next block or unblock push, with the payload's name and items.
    func push(_ client: TestClient, _ name: String) async throws -> (to: String?, from: String?, items: [String]) {
        let push = try await client.waitFor { $0.name == "iq" && $0.attribute("type") == "set" && $0.firstChild(name: name, namespace: BlockingModule.namespace) != nil }
        let payload = try #require(push.firstChild(name: name, namespace: BlockingModule.namespace))
        return (push.attribute("to"), push.attribute("from"), items(payload))
    }

    /// Everything `client` receives before the answer to a roster get it sends now. The
    /// server handles a session's stanzas in order and delivers to a session in order, so
    /// whatever was routed to the client before this call has arrived by the answer.
    func drain(_ client: TestClient) async throws -> [XMLElement] {
        let id = "sync-" + ServerContext.randomIdentifier(bytes: 4)
        try await client.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "get"), XMLAttribute("id", id)], children: [
            .element(XMLElement(name: "query", namespace: "jabber:iq:roster")),
        ]))
        var seen: [XMLElement] = []
        while true {
            let element = try await client.nextElement()
            if element.name == "iq" && element.attribute("id") == id { return seen }
            seen.append(element)
        }
    }

    func condition(_ element: XMLElement) -> String? {
        element.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name
    }

    func carriesBlocked(_ element: XMLElement) -> Bool {
        element.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(name: "blocked", namespace: BlockingModule.errors) != nil
    }

    func sendIQ(_ client: TestClient, to: String, id: String) async throws {
        try await client.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("type", "get"), XMLAttribute("id", id), XMLAttribute("to", to),
        ], children: [.element(Self.ping)]))
    }

    func subscribe(_ server: TestServer, _ account: String, to contact: String) async throws {
        _ = try await server.context.storage.putRosterItem(RosterItem(jid: try JID(contact), subscription: .both), of: try JID(account))
    }

    func inboundCount(_ server: TestServer, _ kind: String) -> Int64 {
        server.metrics.counterValue(BlockingModule.blockedMetric, [("direction", "inbound"), ("kind", kind)])
    }

    func outboundCount(_ server: TestServer, _ kind: String) -> Int64 {
        server.metrics.counterValue(BlockingModule.blockedMetric, [("direction", "outbound"), ("kind", kind)])
    }

    // MARK: Matching, without sockets

    @Test("Items match as XEP-0191 §6 says: full JID, bare JID (any resource), domain/resource, domain (everything at it, not subdomains)")
    func matching() throws {
        let list = BlockList(try jids(["bob@b.example", "eve@e.example/phone", "c.example", "d.example/bot"]))
        #expect(list.matches(try JID("bob@b.example")))
        #expect(list.matches(try JID("bob@b.example/laptop")))
        #expect(!list.matches(try JID("b.example")))
        #expect(!list.matches(try JID("carl@b.example")))
        #expect(list.matches(try JID("eve@e.example/phone")))
        #expect(!list.matches(try JID("eve@e.example")), "a full-JID item does not block the bare JID")
        #expect(!list.matches(try JID("eve@e.example/laptop")))
        #expect(list.matches(try JID("c.example")))
        #expect(list.matches(try JID("anyone@c.example")))
        #expect(list.matches(try JID("anyone@c.example/res")))
        #expect(list.matches(try JID("c.example/res")))
        #expect(!list.matches(try JID("sub.c.example")))
        #expect(!list.matches(try JID("x@sub.c.example")))
        #expect(list.matches(try JID("d.example/bot")))
        #expect(!list.matches(try JID("d.example")))
        #expect(!list.matches(try JID("someone@d.example/bot")))
        // Canonical forms: case in the localpart and domain does not escape a block.
        #expect(list.matches(try JID("BOB@B.Example/x")))
        #expect(!BlockList().matches(try JID("bob@b.example")))
        let account = try JID("alice@a.example")
        #expect(BlockingModule.isOwn(try JID("alice@a.example/phone"), account: account))
        #expect(BlockingModule.isOwn(try JID("a.example"), account: account))
        #expect(!BlockingModule.isOwn(try JID("carol@a.example"), account: account))
    }

    @Test("Lists are read from storage once per account and then answered from memory; markers of accounts without a list are bounded")
    func cache() async throws {
        try await withServer { server in
            let lists = BlockLists()
            let alice = try JID("alice@a.example")
            #expect(lists.cached(alice) == nil)
            #expect(try await lists.list(of: alice, storage: server.context.storage).isEmpty)
            #expect(lists.cached(alice) == BlockList(), "an account without a list is remembered as such")
            // Storage changed behind the cache's back: the cache still answers (no read per stanza).
            try await server.context.storage.putStoreEntry(BlockingModule.store, of: alice, key: "bob@b.example", value: "", keepLast: nil)
            #expect(try await lists.list(of: alice, storage: server.context.storage).isEmpty)
            lists.forget(alice)
            #expect(try await lists.list(of: alice, storage: server.context.storage) == BlockList(try jids(["bob@b.example"])))
            lists.set(BlockList(), for: alice)
            #expect(lists.cached(alice) == BlockList())
            // Markers are cleared when full (strangers can name any account); lists stay.
            let bob = try JID("bob@b.example")
            lists.set(BlockList(try jids(["eve@e.example"])), for: bob)
            for index in 0..<BlockLists.emptyMarkerLimit {
                lists.set(BlockList(), for: try JID(localpart: "u\(index)", domainpart: "a.example", resourcepart: String?.none))
            }
            #expect(lists.cached(alice) == nil, "the markers were cleared at the limit")
            #expect(lists.cached(bob) == BlockList(try jids(["eve@e.example"])))
        }
    }

    // MARK: The protocol

    @Test("disco#info of the server domain (§3.1) and of the account lists urn:xmpp:blocking")
    func discovery() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            for target in ["a.example", "alice@a.example"] {
                let info = try await alice.iq(.get, to: target, payload: XMLElement(name: "query", namespace: DiscoModule.info))
                let features = info.firstChild(name: "query", namespace: DiscoModule.info)?.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") } ?? []
                #expect(features.contains(BlockingModule.namespace), "\(target): \(features)")
            }
            await alice.close()
        }
    }

    @Test("Get, block, unblock and unblock-all, each pushed to both resources (the requester after its result)")
    func listAndPushes() async throws {
        try await withServer { server in
            let (one, oneJID) = try await server.loggedIn("alice@a.example", resource: "one")
            let (two, twoJID) = try await server.loggedIn("alice@a.example", resource: "two")
            #expect(try await blocklist(one).isEmpty)

            // The requester gets its result, then the push.
            try await one.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "set"), XMLAttribute("id", "b1")], children: [
                .element(BlockingModule.element("block", items: try jids(["bob@b.example", "Evil.Example"]))),
            ]))
            let result = try await one.nextElement()
            #expect(result.attribute("id") == "b1" && result.attribute("type") == "result", "\(result)")
            let first = try await one.nextElement()
            #expect(first.attribute("type") == "set" && first.firstChild(name: "block", namespace: BlockingModule.namespace) != nil, "\(first)")
            #expect(first.attribute("to") == oneJID.description && first.attribute("from") == "alice@a.example")
            #expect(items(try #require(first.firstChild(name: "block", namespace: BlockingModule.namespace))) == ["bob@b.example", "evil.example"])
            let pushedToTwo = try await push(two, "block")
            #expect(pushedToTwo.to == twoJID.description && pushedToTwo.items == ["bob@b.example", "evil.example"])

            #expect(try await blocklist(two) == ["bob@b.example", "evil.example"])
            let stored = try await server.context.storage.storeEntries(BlockingModule.store, of: try JID("alice@a.example")).map(\.key)
            #expect(Set(stored) == ["bob@b.example", "evil.example"])

            // Blocking again what is blocked changes nothing and still succeeds.
            #expect(try await block(two, ["bob@b.example"]).attribute("type") == "result")
            _ = try await push(one, "block")
            _ = try await push(two, "block")

            #expect(try await unblock(two, ["evil.example"]).attribute("type") == "result")
            #expect(try await push(one, "unblock").items == ["evil.example"])
            #expect(try await push(two, "unblock").items == ["evil.example"])
            #expect(try await blocklist(one) == ["bob@b.example"])

            #expect(try await block(one, ["carol@a.example", "x.example/bot"]).attribute("type") == "result")
            _ = try await push(one, "block")
            _ = try await push(two, "block")
            #expect(try await blocklist(one).count == 3)

            // §3.5: an empty unblock empties the list, pushed as an empty unblock.
            #expect(try await unblock(one, []).attribute("type") == "result")
            #expect(try await push(one, "unblock").items.isEmpty)
            #expect(try await push(two, "unblock").items.isEmpty)
            #expect(try await blocklist(two).isEmpty)
            #expect(try await server.context.storage.storeEntries(BlockingModule.store, of: try JID("alice@a.example")).isEmpty)
            await one.close()
            await two.close()
        }
    }

    @Test("Bad requests: no items, a malformed or missing jid, the wrong type, another account asking, more than the limit")
    func refusals() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            #expect(condition(try await block(alice, [])) == "bad-request")
            let malformed = XMLElement(name: "block", namespace: BlockingModule.namespace, children: [
                .element(XMLElement(name: "item", namespace: BlockingModule.namespace, attributes: [XMLAttribute("jid", "bob@b.example")])),
                .element(XMLElement(name: "item", namespace: BlockingModule.namespace, attributes: [XMLAttribute("jid", "bad@@b.example")])),
            ])
            #expect(condition(try await alice.iq(.set, payload: malformed)) == "jid-malformed")
            let missing = XMLElement(name: "unblock", namespace: BlockingModule.namespace, children: [.element(XMLElement(name: "item", namespace: BlockingModule.namespace))])
            #expect(condition(try await alice.iq(.set, payload: missing)) == "bad-request")
            #expect(condition(try await alice.iq(.set, payload: XMLElement(name: "blocklist", namespace: BlockingModule.namespace))) == "bad-request")
            #expect(condition(try await alice.iq(.get, payload: BlockingModule.element("block", items: try jids(["bob@b.example"])))) == "bad-request")
            // Nothing of a refused request was kept.
            #expect(try await blocklist(alice).isEmpty)
            // Another account neither reads nor changes alice's list, nor learns she exists.
            let foreign = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "blocklist", namespace: BlockingModule.namespace))
            #expect(condition(foreign) == "service-unavailable")
            let foreignBlock = try await bob.iq(.set, to: "alice@a.example", payload: BlockingModule.element("block", items: try jids(["carol@a.example"])))
            #expect(condition(foreignBlock) == "service-unavailable")
            #expect(try await blocklist(alice).isEmpty)
            // The limit (blocking.max_items, 1,000 by default).
            let many = try (0...BraidConfiguration.BlockingSettings().maxItems).map { try JID("user\($0)@many.example") }
            let tooMany = try await alice.iq(.set, payload: BlockingModule.element("block", items: many))
            #expect(condition(tooMany) == "resource-constraint")
            #expect(try await blocklist(alice).isEmpty)
            await alice.close()
            await bob.close()
        }
    }

    @Test("blocking.max_items is the operator's: with 3, a fourth JID is refused (resource-constraint) and the list keeps the three")
    func configuredLimit() async throws {
        try await withServer(configure: { $0.blocking.maxItems = 3 }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let three = try await alice.iq(.set, payload: BlockingModule.element("block", items: try jids(["x1@many.example", "x2@many.example", "x3@many.example"])))
            #expect(three.attribute("type") == "result")
            let fourth = try await alice.iq(.set, payload: BlockingModule.element("block", items: try jids(["x4@many.example"])))
            #expect(condition(fourth) == "resource-constraint")
            #expect(try await blocklist(alice).count == 3)
            await alice.close()
        }
    }

    // MARK: Enforcement

    @Test("A blocked contact's messages and IQs do not arrive (service-unavailable to it); the blocker's get not-acceptable with <blocked/>; unblocking restores both")
    func messagesAndIQs() async throws {
        try await withServer { server in
            let clients = try await server.clientsWithPresence(["alice@a.example", "bob@b.example", "carol@a.example"])
            let alice = try #require(clients["alice@a.example"]), bob = try #require(clients["bob@b.example"]), carol = try #require(clients["carol@a.example"])
            _ = try await drain(alice)
            #expect(try await block(alice, ["bob@b.example"]).attribute("type") == "result")

            // bob → alice: refused as if she were not there, without <blocked/>.
            try await bob.sendMessage(to: "alice@a.example", body: "let me in", id: "m1")
            let refused = try await bob.waitFor { $0.attribute("id") == "m1" }
            #expect(refused.attribute("type") == "error" && condition(refused) == "service-unavailable" && !carriesBlocked(refused))
            #expect(refused.attribute("from") == "alice@a.example")
            try await sendIQ(bob, to: "alice@a.example/test", id: "q1")
            #expect(condition(try await bob.waitFor { $0.attribute("id") == "q1" }) == "service-unavailable")
            // The server's answers on alice's behalf are refused too (disco of her bare JID).
            let disco = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            #expect(condition(disco) == "service-unavailable")
            try await carol.sendMessage(to: "alice@a.example", body: "from carol", id: "c1")
            try await carol.roundTrip()
            let atAlice = try await drain(alice)
            #expect(!atAlice.contains { $0.attribute("from")?.hasPrefix("bob@b.example") == true }, "\(atAlice)")
            #expect(atAlice.contains { $0.attribute("id") == "c1" }, "carol is not blocked")

            // alice → bob: §3.3's error, from bob's address, with <blocked/>; bob sees nothing.
            try await alice.sendMessage(to: "bob@b.example", body: "can you hear me?", id: "m2")
            let blocked = try await alice.waitFor { $0.attribute("id") == "m2" }
            #expect(blocked.attribute("type") == "error" && condition(blocked) == "not-acceptable" && carriesBlocked(blocked), "\(blocked)")
            #expect(blocked.attribute("from") == "bob@b.example")
            #expect(blocked.firstChild(name: "error", namespace: XMLNamespace.client)?.attribute("type") == "cancel")
            try await sendIQ(alice, to: "bob@b.example/test", id: "q2")
            let blockedIQ = try await alice.waitFor { $0.attribute("id") == "q2" }
            #expect(condition(blockedIQ) == "not-acceptable" && carriesBlocked(blockedIQ))
            // A resource of the blocked JID is blocked too.
            try await alice.sendMessage(to: "bob@b.example/test", body: "and now?", id: "m3")
            #expect(carriesBlocked(try await alice.waitFor { $0.attribute("id") == "m3" }))
            let atBob = try await drain(bob)
            #expect(!atBob.contains { $0.attribute("from")?.hasPrefix("alice@a.example") == true && $0.name != "presence" }, "\(atBob)")

            #expect(inboundCount(server, "message") == 1)
            #expect(inboundCount(server, "iq") == 2)
            #expect(outboundCount(server, "message") == 2)
            #expect(outboundCount(server, "iq") == 1)

            // Unblocked: both ways again.
            #expect(try await unblock(alice, ["bob@b.example"]).attribute("type") == "result")
            try await bob.sendMessage(to: "alice@a.example", body: "hello again", id: "m4")
            #expect(try await alice.waitFor { $0.name == "message" && $0.attribute("id") == "m4" }.body == "hello again")
            try await alice.sendMessage(to: "bob@b.example", body: "hi", id: "m5")
            #expect(try await bob.waitFor { $0.name == "message" && $0.attribute("id") == "m5" }.attribute("type") == "chat")
            for client in clients.values { await client.close() }
        }
    }

    @Test("Presence stops both ways: the blocked contact gets unavailable, the blocker's clients see it go, nothing of its presence arrives; unblocking sends presence again and probes")
    func presence() async throws {
        try await withServer { server in
            try await subscribe(server, "alice@a.example", to: "bob@b.example")
            try await subscribe(server, "bob@b.example", to: "alice@a.example")
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendPresence()
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            func available(from: String) -> (XMLElement) -> Bool {
                { $0.name == "presence" && $0.attribute("from") == from && $0.attribute("type") == nil }
            }
            func unavailable(from: String) -> (XMLElement) -> Bool {
                { $0.name == "presence" && $0.attribute("from") == from && $0.attribute("type") == "unavailable" }
            }
            _ = try await alice.waitFor(available(from: "bob@b.example/test"))
            _ = try await bob.waitFor(available(from: "alice@a.example/test"))
            // What the logins brought (bob's probe of alice while she was offline, echoes) is
            // not what the checks below are about.
            _ = try await drain(alice)
            _ = try await drain(bob)

            #expect(try await block(alice, ["bob@b.example"]).attribute("type") == "result")
            // §3.3: bob is told alice went offline; alice's client is told bob did.
            _ = try await bob.waitFor(unavailable(from: "alice@a.example/test"))
            _ = try await alice.waitFor(unavailable(from: "bob@b.example"))

            // bob's presence changes and subscription requests no longer reach alice…
            try await bob.send(XMLElement(name: "presence", namespace: XMLNamespace.client, children: [
                .element(XMLElement(name: "show", namespace: XMLNamespace.client, text: "away")),
            ]))
            try await bob.sendPresence(type: "subscribe", to: "alice@a.example")
            try await bob.sendPresence(to: "alice@a.example/test")
            try await bob.roundTrip()
            // …and alice's no longer reach bob (her broadcast and her directed presence).
            try await alice.send(XMLElement(name: "presence", namespace: XMLNamespace.client, children: [
                .element(XMLElement(name: "status", namespace: XMLNamespace.client, text: "busy")),
            ]))
            try await alice.sendPresence(to: "bob@b.example/test")
            try await alice.roundTrip()
            let atAlice = try await drain(alice)
            #expect(!atAlice.contains { $0.name == "presence" && $0.attribute("from")?.hasPrefix("bob@b.example") == true }, "\(atAlice)")
            let atBob = try await drain(bob)
            #expect(!atBob.contains { $0.name == "presence" && $0.attribute("from")?.hasPrefix("alice@a.example") == true }, "\(atBob)")
            #expect(try await server.context.storage.subscriptionRequests(of: try JID("alice@a.example")).isEmpty)
            #expect(inboundCount(server, "presence") >= 3)
            #expect(outboundCount(server, "presence") >= 2)

            // §3.4: unblocked, bob gets alice's current presence, and alice's probe brings bob's.
            #expect(try await unblock(alice, ["bob@b.example"]).attribute("type") == "result")
            let again = try await bob.waitFor(available(from: "alice@a.example/test"))
            #expect(again.firstChild(name: "status", namespace: XMLNamespace.client)?.text == "busy")
            let theirs = try await alice.waitFor(available(from: "bob@b.example/test"))
            #expect(theirs.firstChild(name: "show", namespace: XMLNamespace.client)?.text == "away")
            await alice.close()
            await bob.close()
        }
    }

    @Test("A domain item blocks everyone at the domain; blocking one's own domain still lets the server and one's own resources through")
    func domains() async throws {
        try await withServer { server in
            let clients = try await server.clientsWithPresence(["bob@b.example", "carol@a.example"])
            let bob = try #require(clients["bob@b.example"]), carol = try #require(clients["carol@a.example"])
            let (alice, _) = try await server.loggedIn("alice@a.example", resource: "one")
            try await alice.sendPresence()
            let (other, _) = try await server.loggedIn("alice@a.example", resource: "two")
            try await other.sendPresence()

            #expect(try await block(alice, ["b.example"]).attribute("type") == "result")
            try await bob.sendMessage(to: "alice@a.example", body: "domain", id: "d1")
            #expect(condition(try await bob.waitFor { $0.attribute("id") == "d1" }) == "service-unavailable")
            try await alice.sendMessage(to: "nobody@b.example", body: "out", id: "d2")
            #expect(carriesBlocked(try await alice.waitFor { $0.attribute("id") == "d2" }))
            try await carol.sendMessage(to: "alice@a.example/one", body: "same domain", id: "d3")
            #expect(try await alice.waitFor { $0.attribute("id") == "d3" }.body == "same domain")

            // Her own domain: carol is blocked now, the server and alice's resources are not.
            #expect(try await block(alice, ["a.example"]).attribute("type") == "result")
            try await carol.sendMessage(to: "alice@a.example", body: "neighbour", id: "d4")
            #expect(condition(try await carol.waitFor { $0.attribute("id") == "d4" }) == "service-unavailable")
            let info = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            #expect(info.attribute("type") == "result")
            #expect(try await alice.iq(.get, to: "a.example", payload: Self.ping).attribute("type") == "result")
            // A roster change is pushed from her bare JID.
            let roster = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
            #expect(roster.attribute("type") == "result")
            #expect(try await alice.iq(.set, payload: XMLElement(name: "query", namespace: "jabber:iq:roster", children: [
                .element(XMLElement(name: "item", namespace: "jabber:iq:roster", attributes: [XMLAttribute("jid", "dave@d.example")])),
            ])).attribute("type") == "result")
            _ = try await alice.waitFor { $0.name == "iq" && $0.attribute("type") == "set" && $0.attribute("from") == "alice@a.example" && $0.firstChild(name: "query", namespace: "jabber:iq:roster") != nil }
            try await other.sendMessage(to: "alice@a.example/one", body: "to myself", id: "d5")
            #expect(try await alice.waitFor { $0.attribute("id") == "d5" }.body == "to myself")
            await alice.close()
            await other.close()
            for client in clients.values { await client.close() }
        }
    }

    @Test("The list survives a restart and is enforced from storage at once")
    func survivesRestart() async throws {
        let server = try await TestServer.start()
        let directory = server.directory
        do {
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await block(alice, ["bob@b.example", "e.example"]).attribute("type") == "result")
            await alice.close()
        } catch {
            await server.stop()
            throw error
        }
        await server.stopKeepingData()

        let again = try await TestServer.start(users: [], directory: directory)
        do {
            // Enforced before alice even logs in (first use loads the list).
            let (bob, _) = try await again.loggedIn("bob@b.example")
            try await bob.sendMessage(to: "alice@a.example", body: "after the restart", id: "r1")
            #expect(condition(try await bob.waitFor { $0.attribute("id") == "r1" }) == "service-unavailable")
            #expect(try await again.context.storage.takeOfflineMessages(for: try JID("alice@a.example")).isEmpty)
            let (alice, _) = try await again.loggedIn("alice@a.example")
            #expect(try await blocklist(alice) == ["bob@b.example", "e.example"])
            await alice.close()
            await bob.close()
        } catch {
            await again.stop()
            throw error
        }
        await again.stop()
    }

    @Test("Over federation: a remote blocked sender gets service-unavailable from the blocker's server; the blocker's messages to it never leave")
    func federation() async throws {
        try await withFederation { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            try await alice.sendPresence()
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            // The link comes up with a first message.
            try await bob.sendMessage(to: "alice@a.example", body: "hi", id: "f0")
            _ = try await alice.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "f0" }

            #expect(try await block(alice, ["bob@b.example"]).attribute("type") == "result")
            try await bob.sendMessage(to: "alice@a.example", body: "from afar", id: "f1")
            let refused = try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "f1" }
            #expect(refused.attribute("type") == "error" && condition(refused) == "service-unavailable", "\(refused)")
            try await sendIQ(bob, to: "alice@a.example/test", id: "f2")
            #expect(condition(try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "f2" }) == "service-unavailable")
            try await alice.sendMessage(to: "bob@b.example", body: "no", id: "f3")
            #expect(carriesBlocked(try await alice.waitFor { $0.attribute("id") == "f3" }))
            let atAlice = try await drain(alice)
            #expect(!atAlice.contains { $0.name == "message" && $0.attribute("from")?.hasPrefix("bob@b.example") == true }, "\(atAlice)")
            #expect(inboundCount(pair.a, "message") == 1)
            #expect(outboundCount(pair.a, "message") == 1)

            #expect(try await unblock(alice, []).attribute("type") == "result")
            try await bob.sendMessage(to: "alice@a.example", body: "again", id: "f4")
            #expect(try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "f4" }.body == "again")
            await alice.close()
            await bob.close()
        }
    }
}
