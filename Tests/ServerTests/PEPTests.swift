import Foundation
import Storage
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// Personal eventing (XEP-0163) through real client streams: what an OMEMO, avatar or
/// bookmarks client does.
@Suite("PEP (XEP-0163) with publish-options, notifications by entity capabilities")
struct PEPTests {
    static let devicelist = "eu.siacs.conversations.axolotl.devicelist"
    static let avatar = "urn:xmpp:avatar:metadata"
    static let bookmarks2 = "urn:xmpp:bookmarks:1"

    /// A client's capabilities: its presence `<c/>` and the `disco#info` it answers with.
    struct Capabilities {
        var info: XMLElement
        var node = "https://braid.example/test"
        var ver: String { EntityCaps.verificationString(info).map(EntityCaps.sha1Base64) ?? "" }

        init(name: String, notify: [String]) {
            info = PEPNodeTests.discoInfo(identities: [("client", "pc", name)],
                                          features: ["http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info"] + notify.map { $0 + "+notify" })
        }

        var c: XMLElement {
            XMLElement(name: "c", namespace: EntityCaps.namespace, attributes: [XMLAttribute("node", node), XMLAttribute("ver", ver), XMLAttribute("hash", "sha-1")])
        }
    }

    /// Sends available presence with `caps`.
    func available(_ client: TestClient, _ caps: Capabilities) async throws {
        try await client.send(XMLElement(name: "presence", namespace: XMLNamespace.client, children: [.element(caps.c)]))
    }

    /// Waits for the server's `disco#info` about `caps` and answers it, as a client does.
    func answerCapsQuery(_ client: TestClient, _ caps: Capabilities) async throws {
        let query = try await client.waitFor { element in
            element.name == "iq" && element.attribute("type") == "get"
                && element.firstChild(name: "query", namespace: DiscoModule.info)?.attribute("node") == "\(caps.node)#\(caps.ver)"
        }
        var attributes = [XMLAttribute("type", "result"), XMLAttribute("id", query.attribute("id") ?? "")]
        if let from = query.attribute("from") { attributes.append(XMLAttribute("to", from)) }
        try await client.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: attributes, children: [
            .element(caps.info.setting(attribute: "node", to: "\(caps.node)#\(caps.ver)")),
        ]))
    }

    static func publish(node: String, id: String, payload: XMLElement, options: [(String, String)] = []) -> XMLElement {
        var children: [XMLNode] = [.element(XMLElement(name: "publish", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", node)], children: [
            .element(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("id", id)], children: [.element(payload)])),
        ]))]
        if !options.isEmpty {
            children.append(.element(XMLElement(name: "publish-options", namespace: PubSubNamespace.pubsub, children: [
                .element(PEPNodeTests.form(options.map { ($0.0, [$0.1]) })),
            ])))
        }
        return XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: children)
    }

    static func items(node: String) -> XMLElement {
        XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
            .element(XMLElement(name: "items", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", node)])),
        ])
    }

    static func deviceList(_ ids: [Int]) -> XMLElement {
        XMLElement(name: "list", namespace: "eu.siacs.conversations.axolotl", children: ids.map {
            .element(XMLElement(name: "device", namespace: "eu.siacs.conversations.axolotl", attributes: [XMLAttribute("id", "\($0)")]))
        })
    }

    static func errorCondition(_ element: XMLElement) -> (String?, String?) {
        let error = element.firstChild(name: "error", namespace: XMLNamespace.client)
        return (error?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name, error?.firstChild(namespace: PubSubNamespace.errors)?.name)
    }

    static func event(_ element: XMLElement) -> XMLElement? {
        element.name == "message" ? element.firstChild(name: "event", namespace: PubSubNamespace.event) : nil
    }

    /// alice and bob share presence both ways (set in storage before they log in).
    func befriend(_ server: TestServer, _ a: String, _ b: String) async throws {
        try await server.context.storage.putRosterItem(RosterItem(jid: try JID(b), subscription: .both), of: try JID(a))
        try await server.context.storage.putRosterItem(RosterItem(jid: try JID(a), subscription: .both), of: try JID(b))
    }

    @Test("OMEMO's way: publish with publish-options, notifications to the owner's and contacts' +notify resources, items by anyone for an open node, preconditions, retraction")
    func publishNotifyAndRead() async throws {
        try await withServer { server in
            try await befriend(server, "alice@a.example", "bob@b.example")
            let aliceCaps = Capabilities(name: "alice's client", notify: [Self.devicelist])
            let bobCaps = Capabilities(name: "bob's client", notify: [Self.devicelist, Self.avatar])
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            try await available(alice, aliceCaps)
            try await answerCapsQuery(alice, aliceCaps)
            let (bob, bobJID) = try await server.loggedIn("bob@b.example")
            try await available(bob, bobCaps)
            try await answerCapsQuery(bob, bobCaps)
            // bob's presence has reached alice: the service knows bob is interested.
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == bobJID.description }

            let published = try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([1234]),
                                                                             options: [("pubsub#access_model", "open")]))
            #expect(published.attribute("type") == "result")
            #expect(published.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "publish", namespace: PubSubNamespace.pubsub)?
                .firstChild(name: "item", namespace: PubSubNamespace.pubsub)?.attribute("id") == "current")
            for (client, jid) in [(bob, bobJID), (alice, aliceJID)] {
                let notification = try await client.waitFor { Self.event($0) != nil }
                #expect(notification.attribute("from") == "alice@a.example")
                #expect(notification.attribute("to") == jid.description)
                let items = Self.event(notification)?.firstChild(name: "items", namespace: PubSubNamespace.event)
                #expect(items?.attribute("node") == Self.devicelist)
                #expect(items?.firstChild(name: "item", namespace: PubSubNamespace.event)?.attribute("id") == "current")
                #expect(items?.firstChild(name: "item", namespace: PubSubNamespace.event)?.firstChild(name: "list", namespace: "eu.siacs.conversations.axolotl") != nil)
            }

            // Anyone reads an open node: carol, who is no contact.
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let read = try await carol.iq(.get, to: "alice@a.example", payload: Self.items(node: Self.devicelist))
            #expect(read.attribute("type") == "result")
            let readItems = read.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "items", namespace: PubSubNamespace.pubsub)
            #expect(readItems?.children(name: "item", namespace: PubSubNamespace.pubsub).map { $0.attribute("id") } == ["current"])

            // XEP-0223: publish-options that the node does not have are a failed precondition.
            let mismatch = try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([1, 2]),
                                                                            options: [("pubsub#access_model", "presence")]))
            #expect(mismatch.attribute("type") == "error")
            #expect(Self.errorCondition(mismatch) == ("conflict", "precondition-not-met"))

            // A node with the default access model (presence): bob reads it, carol learns nothing.
            let metadata = XMLElement(name: "metadata", namespace: Self.avatar, children: [
                .element(XMLElement(name: "info", namespace: Self.avatar, attributes: [XMLAttribute("id", "abc"), XMLAttribute("bytes", "10"), XMLAttribute("type", "image/png")])),
            ])
            #expect(try await alice.iq(.set, payload: Self.publish(node: Self.avatar, id: "abc", payload: metadata)).attribute("type") == "result")
            let avatarNotice = try await bob.waitFor { Self.event($0)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.avatar }
            #expect(avatarNotice.attribute("from") == "alice@a.example")
            #expect(try await bob.iq(.get, to: "alice@a.example", payload: Self.items(node: Self.avatar)).attribute("type") == "result")
            let hidden = try await carol.iq(.get, to: "alice@a.example", payload: Self.items(node: Self.avatar))
            #expect(Self.errorCondition(hidden).0 == "item-not-found")
            // The same answer for an account that does not exist.
            let nobody = try await carol.iq(.get, to: "nobody@a.example", payload: Self.items(node: Self.avatar))
            #expect(Self.errorCondition(nobody).0 == "item-not-found")

            // Only the owner publishes.
            let intruder = try await bob.iq(.set, to: "alice@a.example", payload: Self.publish(node: Self.avatar, id: "x", payload: metadata))
            #expect(Self.errorCondition(intruder).0 == "forbidden")

            // Discovery: the pubsub/pep identity and publish-options; the nodes bob may read.
            let info = try await alice.iq(.get, to: "alice@a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let query = info.firstChild(name: "query", namespace: DiscoModule.info)
            #expect(query?.children(name: "identity", namespace: DiscoModule.info).contains { $0.attribute("category") == "pubsub" && $0.attribute("type") == "pep" } == true)
            #expect(query?.children(name: "feature", namespace: DiscoModule.info).contains { $0.attribute("var") == PubSubNamespace.publishOptions } == true)
            let discoItems = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "query", namespace: DiscoModule.items))
            let nodes = Set(discoItems.firstChild(name: "query", namespace: DiscoModule.items)?.children(name: "item", namespace: DiscoModule.items).compactMap { $0.attribute("node") } ?? [])
            #expect(nodes == [Self.devicelist, Self.avatar])

            // Retraction is notified (notify_retract defaults to true).
            let retracted = try await alice.iq(.set, payload: XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
                .element(XMLElement(name: "retract", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", Self.avatar)], children: [
                    .element(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("id", "abc")])),
                ])),
            ]))
            #expect(retracted.attribute("type") == "result")
            let retraction = try await bob.waitFor { Self.event($0)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.firstChild(name: "retract", namespace: PubSubNamespace.event) != nil }
            #expect(Self.event(retraction)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.firstChild(name: "retract", namespace: PubSubNamespace.event)?.attribute("id") == "abc")
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    @Test("pep.notifications_per_second: a publish whose notifications exhaust the allowance goes out whole, the next waits (resource-constraint, wait) until it refills")
    func notificationRate() async throws {
        // Slow to refill (one notification every 10 s), so a loaded machine cannot refill the
        // allowance between the two publishes (at 2 per second, CI once did).
        try await withServer(configure: { $0.pep.notificationsPerSecond = 0.1; $0.pep.notificationBurst = 2 }) { server in
            try await befriend(server, "alice@a.example", "bob@b.example")
            let caps = Capabilities(name: "client", notify: [Self.devicelist])
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await available(alice, caps)
            try await answerCapsQuery(alice, caps)
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await available(bob, caps)
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from")?.hasPrefix("bob@b.example") == true }
            // Two notifications (alice's own resource and bob's) spend the burst of two.
            let first = try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([1])))
            #expect(first.attribute("type") == "result")
            _ = try await bob.waitFor { Self.event($0) != nil }
            let refused = try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([2])))
            #expect(refused.attribute("type") == "error")
            #expect(Self.errorCondition(refused).0 == "resource-constraint")
            #expect(refused.firstChild(name: "error", namespace: XMLNamespace.client)?.attribute("type") == "wait")
            // Refilled after about 10 s: accepted again (polled, bounded).
            let deadline = ContinuousClock.now + .seconds(30)
            var accepted = false
            while !accepted, ContinuousClock.now < deadline {
                let again = try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([3])))
                accepted = again.attribute("type") == "result"
                if !accepted { try await Task.sleep(for: .milliseconds(250)) }
            }
            #expect(accepted, "the allowance refilled")
            // And its notification reaches bob.
            _ = try await bob.waitFor { element in
                Self.event(element)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.firstChild(name: "item", namespace: PubSubNamespace.event)?
                    .firstChild(name: "list", namespace: "eu.siacs.conversations.axolotl")?.firstChild(name: "device", namespace: "eu.siacs.conversations.axolotl")?
                    .attribute("id") == "3"
            }
            await alice.close()
            await bob.close()
        }
    }

    @Test("A contact that comes online gets the last item of each node it wants; one without +notify gets none")
    func lastItemOnPresence() async throws {
        try await withServer { server in
            try await befriend(server, "alice@a.example", "bob@b.example")
            try await befriend(server, "alice@a.example", "carol@a.example")
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([7]))).attribute("type") == "result")
            #expect(try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([7, 8]))).attribute("type") == "result")
            let (bob, bobJID) = try await server.loggedIn("bob@b.example")
            let bobCaps = Capabilities(name: "bob's client", notify: [Self.devicelist])
            try await available(bob, bobCaps)
            try await answerCapsQuery(bob, bobCaps)
            let last = try await bob.waitFor { Self.event($0) != nil }
            #expect(last.attribute("to") == bobJID.description)
            let devices = Self.event(last)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.firstChild(name: "item", namespace: PubSubNamespace.event)?
                .firstChild(name: "list", namespace: "eu.siacs.conversations.axolotl")?.children(name: "device", namespace: "eu.siacs.conversations.axolotl").compactMap { $0.attribute("id") }
            #expect(devices == ["7", "8"], "the last item, once")
            // carol's client does not want device lists.
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let carolCaps = Capabilities(name: "carol's client", notify: ["urn:xmpp:something-else"])
            try await available(carol, carolCaps)
            try await answerCapsQuery(carol, carolCaps)
            _ = try await carol.waitFor { $0.name == "presence" && $0.attribute("from")?.hasPrefix("alice@a.example") == true }
            _ = try await carol.iq(.get, payload: XMLElement(name: "query", namespace: RosterNamespace.roster))
            #expect(await carol.expectSilence(for: .milliseconds(300)).flatMap(Self.event) == nil)
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    @Test("Owner operations: max_items trims, configure, purge and delete notify; items and nodes survive a restart; limits give the XEP's errors")
    func ownerOperationsAndRestart() async throws {
        let server = try await TestServer.start { $0.pep.maxItemBytes = 2048; $0.pep.maxNodesPerAccount = 3 }
        let bookmarks = "urn:xmpp:bookmarks:1"
        do {
            let (alice, _) = try await server.loggedIn("alice@a.example")
            for room in ["one", "two", "three"] {
                let conference = XMLElement(name: "conference", namespace: bookmarks, attributes: [XMLAttribute("name", room)])
                let result = try await alice.iq(.set, payload: Self.publish(node: bookmarks, id: "\(room)@conference.a.example", payload: conference,
                                                                              options: [("pubsub#max_items", "2"), ("pubsub#access_model", "whitelist")]))
                #expect(result.attribute("type") == "result")
            }
            let kept = try await alice.iq(.get, to: "alice@a.example", payload: Self.items(node: bookmarks))
            let ids = kept.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "items", namespace: PubSubNamespace.pubsub)?
                .children(name: "item", namespace: PubSubNamespace.pubsub).compactMap { $0.attribute("id") }
            #expect(Set(ids ?? []) == ["two@conference.a.example", "three@conference.a.example"])
            // Too big.
            let big = XMLElement(name: "data", namespace: "urn:xmpp:avatar:data", text: String(repeating: "A", count: 4096))
            let tooBig = try await alice.iq(.set, payload: Self.publish(node: "urn:xmpp:avatar:data", id: "big", payload: big))
            #expect(Self.errorCondition(tooBig) == ("not-acceptable", "payload-too-big"))
            // Too many nodes.
            for node in ["n1", "n2"] {
                _ = try await alice.iq(.set, payload: Self.publish(node: node, id: "i", payload: XMLElement(name: "x", namespace: "urn:test")))
            }
            let tooMany = try await alice.iq(.set, payload: Self.publish(node: "n3", id: "i", payload: XMLElement(name: "x", namespace: "urn:test")))
            #expect(Self.errorCondition(tooMany) == ("not-allowed", "max-nodes-exceeded"))
            // Configure shows the whitelist model; purge empties n1; delete removes n2.
            let configuration = try await alice.iq(.get, payload: XMLElement(name: "pubsub", namespace: PubSubNamespace.owner, children: [
                .element(XMLElement(name: "configure", namespace: PubSubNamespace.owner, attributes: [XMLAttribute("node", bookmarks)])),
            ]))
            let form = configuration.firstChild(name: "pubsub", namespace: PubSubNamespace.owner)?.firstChild(name: "configure", namespace: PubSubNamespace.owner)?
                .firstChild(name: "x", namespace: PubSubNamespace.dataForms)
            #expect(form.map(PEPNodeConfiguration.fields)?.first { $0.0 == "pubsub#access_model" }?.1 == ["whitelist"])
            for action in ["purge", "delete"] {
                let node = action == "purge" ? "n1" : "n2"
                let done = try await alice.iq(.set, payload: XMLElement(name: "pubsub", namespace: PubSubNamespace.owner, children: [
                    .element(XMLElement(name: action, namespace: PubSubNamespace.owner, attributes: [XMLAttribute("node", node)])),
                ]))
                #expect(done.attribute("type") == "result", "\(action)")
            }
            let purged = try await alice.iq(.get, to: "alice@a.example", payload: Self.items(node: "n1"))
            #expect(purged.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "items", namespace: PubSubNamespace.pubsub)?.children.isEmpty == true)
            #expect(Self.errorCondition(try await alice.iq(.get, to: "alice@a.example", payload: Self.items(node: "n2"))).0 == "item-not-found")
            await alice.close()
        } catch {
            await server.stop()
            throw error
        }
        await server.stopKeepingData()
        let again = try await TestServer.start(users: [], directory: server.directory) { $0.pep.maxItemBytes = 2048; $0.pep.maxNodesPerAccount = 3 }
        do {
            let (alice, _) = try await again.loggedIn("alice@a.example")
            let kept = try await alice.iq(.get, to: "alice@a.example", payload: Self.items(node: bookmarks))
            #expect(kept.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "items", namespace: PubSubNamespace.pubsub)?
                .children(name: "item", namespace: PubSubNamespace.pubsub).count == 2)
            // A whitelist node is closed to a contact who is no member.
            try await again.context.storage.putRosterItem(RosterItem(jid: try JID("bob@b.example"), subscription: .both), of: try JID("alice@a.example"))
            let (bob, _) = try await again.loggedIn("bob@b.example")
            #expect(Self.errorCondition(try await bob.iq(.get, to: "alice@a.example", payload: Self.items(node: bookmarks))) == ("not-allowed", "closed-node"))
            await alice.close()
            await bob.close()
        } catch {
            await again.stop()
            throw error
        }
        await again.stop()
    }

    @Test("Over federation: a remote contact's capabilities are learned across the link, it gets notifications and reads the owner's nodes")
    func remoteContact() async throws {
        try await withFederation { pair in
            try await pair.a.context.storage.putRosterItem(RosterItem(jid: try JID("bob@b.example"), subscription: .both), of: try JID("alice@a.example"))
            try await pair.b.context.storage.putRosterItem(RosterItem(jid: try JID("alice@a.example"), subscription: .both), of: try JID("bob@b.example"))
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, bobJID) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            let bobCaps = Capabilities(name: "bob far away", notify: [Self.devicelist])
            try await available(bob, bobCaps)
            // Two queries may come: bob's own server's and alice's (over the link); answer both.
            try await answerCapsQuery(bob, bobCaps)
            _ = try await alice.waitFor(timeout: .seconds(10)) { $0.name == "presence" && $0.attribute("from") == bobJID.description }
            let fromA = try await bob.waitFor(timeout: .seconds(10)) { element in
                element.name == "iq" && element.attribute("from") == "alice@a.example"
                    && element.firstChild(name: "query", namespace: DiscoModule.info)?.attribute("node") == "\(bobCaps.node)#\(bobCaps.ver)"
            }
            try await bob.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("type", "result"), XMLAttribute("id", fromA.attribute("id") ?? ""), XMLAttribute("to", "alice@a.example"),
            ], children: [.element(bobCaps.info.setting(attribute: "node", to: "\(bobCaps.node)#\(bobCaps.ver)"))]))
            #expect(try await alice.iq(.set, payload: Self.publish(node: Self.devicelist, id: "current", payload: Self.deviceList([42]))).attribute("type") == "result")
            let notification = try await bob.waitFor(timeout: .seconds(10)) { Self.event($0) != nil }
            #expect(notification.attribute("from") == "alice@a.example")
            let read = try await bob.iq(.get, to: "alice@a.example", payload: Self.items(node: Self.devicelist))
            #expect(read.attribute("type") == "result")
            // Both sides sent presence at once: a second link from the simultaneous open is
            // merged away by the duplicate pass; the pairs end on one link.
            try await waitUntil(timeout: .seconds(10), "one link between the providers") { await pair.a.openLinkSnapshots.count == 1 }
            await alice.close()
            await bob.close()
        }
    }

    /// The new way (as Conversations publishes), then a retraction: private XML follows.
    func bookmarksBackToPrivate(_ alice: TestClient) async throws {
        let legacyNS = "storage:bookmarks"
        let added = XMLElement(name: "conference", namespace: Self.bookmarks2, attributes: [XMLAttribute("name", "Club"), XMLAttribute("autojoin", "true")],
                           children: [.element(XMLElement(name: "nick", namespace: Self.bookmarks2, text: "ally"))])
        let published = try await alice.iq(.set, payload: Self.publish(node: Self.bookmarks2, id: "club@conference.a.example", payload: added, options: [
            ("pubsub#persist_items", "true"), ("pubsub#max_items", "max"), ("pubsub#send_last_published_item", "never"), ("pubsub#access_model", "whitelist"),
        ]))
        #expect(published.attribute("type") == "result", "Conversations' publish-options are the node's")
        let retracted = try await alice.iq(.set, payload: XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
            .element(XMLElement(name: "retract", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", Self.bookmarks2)], children: [
                .element(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("id", "work@conference.b.example")])),
            ])),
        ]))
        #expect(retracted.attribute("type") == "result")
        let legacy = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:private", children: [
            .element(XMLElement(name: "storage", namespace: legacyNS)),
        ]))
        let stored = legacy.firstChild(name: "query", namespace: "jabber:iq:private")?.firstChild(name: "storage", namespace: legacyNS)
        let rooms = Set(stored?.children(name: "conference", namespace: legacyNS).compactMap { $0.attribute("jid") } ?? [])
        #expect(rooms == ["tea@conference.a.example", "club@conference.a.example"])
        #expect(stored?.children(name: "conference", namespace: legacyNS).first { $0.attribute("jid") == "club@conference.a.example" }?
            .firstChild(name: "nick", namespace: legacyNS)?.text == "ally")
        #expect(stored?.firstChild(name: "url", namespace: legacyNS)?.attribute("url") == "https://a.example", "what else the storage held stays")
    }

    /// A XEP-0048 `<conference/>`.
    static func legacyConference(_ jid: String, _ name: String, autojoin: Bool, nick: String) -> XMLNode {
        .element(XMLElement(name: "conference", namespace: "storage:bookmarks", attributes: [
            XMLAttribute("jid", jid), XMLAttribute("name", name), XMLAttribute("autojoin", autojoin ? "true" : "false"),
        ], children: [.element(XMLElement(name: "nick", namespace: "storage:bookmarks", text: nick))]))
    }

    @Test("XEP-0402 §5.3: bookmarks written in private XML become PEP items (notified), PEP items and retractions are written back to private XML, URLs kept")
    func bookmarksCompatibility() async throws {
        try await withServer { server in
            let legacyNS = "storage:bookmarks"
            let (alice, _) = try await server.loggedIn("alice@a.example")
            // A second resource that follows bookmarks (as Conversations does).
            let (watcher, watcherJID) = try await server.loggedIn("alice@a.example", resource: "watcher")
            let caps = Capabilities(name: "bookmarks client", notify: [Self.bookmarks2])
            try await available(watcher, caps)
            try await answerCapsQuery(watcher, caps)
            let info = try await alice.iq(.get, to: "alice@a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            // (Written without a closure inside #expect: that shape crashes Swift 6.3.1's
            // SendNonSendable pass in this function.)
            let features = info.firstChild(name: "query", namespace: DiscoModule.info)?.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") } ?? []
            #expect(features.contains("urn:xmpp:bookmarks:1#compat"))

            let storage = XMLElement(name: "storage", namespace: legacyNS, children: [
                Self.legacyConference("tea@conference.a.example", "Tea", autojoin: true, nick: "al"),
                Self.legacyConference("work@conference.b.example", "Work", autojoin: false, nick: "alice"),
                .element(XMLElement(name: "url", namespace: legacyNS, attributes: [XMLAttribute("name", "Home"), XMLAttribute("url", "https://a.example")])),
            ])
            #expect(try await alice.iq(.set, payload: XMLElement(name: "query", namespace: "jabber:iq:private", children: [.element(storage)])).attribute("type") == "result")
            let notified = try await watcher.waitFor { Self.event($0)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.bookmarks2 }
            #expect(notified.attribute("to") == watcherJID.description)
            let items = try await alice.iq(.get, to: "alice@a.example", payload: Self.items(node: Self.bookmarks2))
            let conferences = items.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "items", namespace: PubSubNamespace.pubsub)?
                .children(name: "item", namespace: PubSubNamespace.pubsub) ?? []
            #expect(Set(conferences.compactMap { $0.attribute("id") }) == ["tea@conference.a.example", "work@conference.b.example"])
            let tea = conferences.first { $0.attribute("id") == "tea@conference.a.example" }?.firstChild(name: "conference", namespace: Self.bookmarks2)
            #expect(tea?.attribute("name") == "Tea" && tea?.attribute("autojoin") == "true")
            #expect(tea?.firstChild(name: "nick", namespace: Self.bookmarks2)?.text == "al")

            try await bookmarksBackToPrivate(alice)
            await alice.close()
            await watcher.close()
        }
    }

    @Test("XEP-0163 §4.3.4: a contact whose subscription is approved while it is online gets the last items it wants at once")
    func newSubscriberGetsLastItem() async throws {
        try await withServer { server in
            // alice already follows bob's presence (so she knows his capabilities); bob asks
            // for hers later.
            try await server.context.storage.putRosterItem(RosterItem(jid: try JID("bob@b.example"), subscription: .to), of: try JID("alice@a.example"))
            try await server.context.storage.putRosterItem(RosterItem(jid: try JID("alice@a.example"), subscription: .from), of: try JID("bob@b.example"))
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendPresence()
            #expect(try await alice.iq(.set, payload: Self.publish(node: Self.avatar, id: "pic", payload: XMLElement(name: "metadata", namespace: Self.avatar))).attribute("type") == "result")
            let (bob, bobJID) = try await server.loggedIn("bob@b.example")
            let bobCaps = Capabilities(name: "bob, avatar-minded", notify: [Self.avatar])
            try await available(bob, bobCaps)
            try await answerCapsQuery(bob, bobCaps)
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == bobJID.description }
            try await bob.sendPresence(type: "subscribe", to: "alice@a.example")
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "subscribe" }
            try await alice.sendPresence(type: "subscribed", to: "bob@b.example")
            let last = try await bob.waitFor { Self.event($0)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.avatar }
            #expect(last.attribute("from") == "alice@a.example")
            await alice.close()
            await bob.close()
        }
    }
}
