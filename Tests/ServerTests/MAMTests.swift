import Foundation
import Storage
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// The message archive (XEP-0313) through real client streams: a second device finds what
/// the first one got, pages both ways, and every delivered message carries its stanza-id.
@Suite("Message archive (XEP-0313) with stanza-ids (XEP-0359)")
struct MAMTests {
    static let mam = MAMModule.namespace
    static let rsm = MAMModule.rsm

    /// A MAM query with optional form fields and RSM page.
    static func query(id: String = "q1", fields: [(String, [String])] = [], max: Int? = nil, after: String? = nil, before: String? = nil,
                      flip: Bool = false) -> XMLElement {
        var children: [XMLNode] = []
        if !fields.isEmpty {
            children.append(.element(XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")],
                                                children: ([("FORM_TYPE", [mam])] + fields).map { name, values in
                                                    .element(XMLElement(name: "field", namespace: "jabber:x:data", attributes: [XMLAttribute("var", name)],
                                                                        children: values.map { .element(XMLElement(name: "value", namespace: "jabber:x:data", text: $0)) }))
                                                })))
        }
        var set: [XMLNode] = []
        if let max { set.append(.element(XMLElement(name: "max", namespace: rsm, text: String(max)))) }
        if let after { set.append(.element(XMLElement(name: "after", namespace: rsm, text: after))) }
        if let before { set.append(.element(XMLElement(name: "before", namespace: rsm, text: before))) }
        if !set.isEmpty { children.append(.element(XMLElement(name: "set", namespace: rsm, children: set))) }
        if flip { children.append(.element(XMLElement(name: "flip-page", namespace: mam))) }
        return XMLElement(name: "query", namespace: mam, attributes: [XMLAttribute("queryid", id)], children: children)
    }

    struct Page {
        var bodies: [String?]
        var ids: [String]
        var complete: Bool
        var count: Int?
        var first: String?
        var last: String?
        var error: String?
    }

    /// Runs a query and collects its results (which come before the IQ's answer).
    static func run(_ client: TestClient, _ payload: XMLElement, to: String? = nil) async throws -> Page {
        let id = ServerContext.randomIdentifier(bytes: 4)
        var attributes = [XMLAttribute("type", "set"), XMLAttribute("id", id)]
        if let to { attributes.append(XMLAttribute("to", to)) }
        try await client.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: attributes, children: [.element(payload)]))
        var bodies: [String?] = []
        var ids: [String] = []
        while true {
            let element = try await client.waitFor { element in
                (element.name == "iq" && element.attribute("id") == id) || element.firstChild(name: "result", namespace: mam) != nil
            }
            if let result = element.firstChild(name: "result", namespace: mam) {
                #expect(result.attribute("queryid") == payload.attribute("queryid"))
                let forwarded = result.firstChild(name: "forwarded", namespace: MAMModule.forward)
                #expect(forwarded?.firstChild(name: "delay", namespace: MAMModule.delay)?.attribute("stamp") != nil)
                bodies.append(forwarded?.firstChild(name: "message", namespace: XMLNamespace.client)?.firstChild(name: "body", namespace: XMLNamespace.client)?.text)
                ids.append(result.attribute("id") ?? "")
                continue
            }
            guard element.attribute("type") == "result", let fin = element.firstChild(name: "fin", namespace: mam) else {
                let condition = element.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name
                return Page(bodies: bodies, ids: ids, complete: false, error: condition ?? "no fin")
            }
            let set = fin.firstChild(name: "set", namespace: rsm)
            return Page(bodies: bodies, ids: ids, complete: fin.attribute("complete") == "true",
                        count: set?.firstChild(name: "count", namespace: rsm).flatMap { Int($0.text) },
                        first: set?.firstChild(name: "first", namespace: rsm)?.text, last: set?.firstChild(name: "last", namespace: rsm)?.text)
        }
    }

    static func stanzaID(_ message: XMLElement, by: String) -> String? {
        message.children(name: "stanza-id", namespace: MAMModule.stanzaIDs).first { $0.attribute("by") == by }?.attribute("id")
    }

    @Test("A second device finds every message the first got, with the stanza-ids that were delivered; both sides are archived; pages both ways")
    func secondDeviceAndPaging() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (phone, _) = try await server.loggedIn("bob@b.example", resource: "phone")
            try await phone.sendPresence()
            var delivered: [String] = []
            for index in 1...5 {
                // A forged id claiming to be bob's archive's is not kept.
                try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                    XMLAttribute("to", "bob@b.example"), XMLAttribute("type", "chat"), XMLAttribute("id", "m\(index)"),
                ], children: [
                    .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "message \(index)")),
                    .element(XMLElement(name: "stanza-id", namespace: MAMModule.stanzaIDs, attributes: [XMLAttribute("id", "forged"), XMLAttribute("by", "bob@b.example")])),
                ]))
                let got = try await phone.waitFor { $0.name == "message" && $0.attribute("id") == "m\(index)" }
                let id = try #require(Self.stanzaID(got, by: "bob@b.example"))
                #expect(id != "forged")
                #expect(got.children(name: "stanza-id", namespace: MAMModule.stanzaIDs).count == 1)
                delivered.append(id)
            }
            // A chat state without a body, and a message asking not to be stored: not archived.
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", "bob@b.example"), XMLAttribute("type", "chat"), XMLAttribute("id", "cs")],
                                            children: [.element(XMLElement(name: "composing", namespace: "http://jabber.org/protocol/chatstates"))]))
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", "bob@b.example"), XMLAttribute("type", "chat"), XMLAttribute("id", "ns")],
                                            children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "off the record")),
                                                       .element(XMLElement(name: "no-store", namespace: MAMModule.hints))]))
            _ = try await phone.waitFor { $0.attribute("id") == "ns" }

            // bob's laptop was not there: it finds everything.
            let (laptop, _) = try await server.loggedIn("bob@b.example", resource: "laptop")
            let all = try await Self.run(laptop, Self.query())
            #expect(all.error == nil)
            #expect(all.bodies == (1...5).map { "message \($0)" })
            #expect(all.ids == delivered, "the ids the archive delivered")
            #expect(all.complete && all.count == 5)
            // Pages of two, forwards then backwards.
            let first = try await Self.run(laptop, Self.query(max: 2))
            #expect(first.bodies == ["message 1", "message 2"] && !first.complete && first.first == delivered[0] && first.last == delivered[1])
            let second = try await Self.run(laptop, Self.query(max: 2, after: first.last))
            #expect(second.bodies == ["message 3", "message 4"] && !second.complete)
            let third = try await Self.run(laptop, Self.query(max: 2, after: second.last))
            #expect(third.bodies == ["message 5"] && third.complete)
            let newest = try await Self.run(laptop, Self.query(max: 2, before: ""))
            #expect(newest.bodies == ["message 4", "message 5"] && !newest.complete)
            let older = try await Self.run(laptop, Self.query(max: 2, before: newest.first))
            #expect(older.bodies == ["message 2", "message 3"])
            let flipped = try await Self.run(laptop, Self.query(max: 2, before: "", flip: true))
            #expect(flipped.bodies == ["message 5", "message 4"])
            // Filters: with, ids.
            #expect(try await Self.run(laptop, Self.query(fields: [("with", ["carol@a.example"])])).count == 0)
            #expect(try await Self.run(laptop, Self.query(fields: [("with", ["alice@a.example"])])).count == 5)
            #expect(try await Self.run(laptop, Self.query(fields: [("ids", [delivered[3], delivered[1]])])).bodies == ["message 2", "message 4"])
            // alice's own archive has what she sent.
            let sent = try await Self.run(alice, Self.query())
            #expect(sent.bodies == (1...5).map { "message \($0)" } && sent.count == 5)
            await alice.close()
            await phone.close()
            await laptop.close()
        }
    }

    @Test("Bad queries get the XEP's errors; another account's archive is closed; messages that arrived offline are archived too")
    func errorsAndOffline() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            // bob is offline: the message is stored offline and archived.
            try await alice.sendMessage(to: "bob@b.example", body: "while you were away", id: "away")
            try await waitUntil(timeout: .seconds(10), "archived") {
                (try await server.context.storage.archivedMessages(ArchiveQuery(limit: 5), for: try JID("bob@b.example"))).count == 1
            }
            let (bob, _) = try await server.loggedIn("bob@b.example")
            #expect(try await Self.run(bob, Self.query(max: 5, after: "no-such-id")).error == "item-not-found")
            #expect(try await Self.run(bob, Self.query(fields: [("start", ["yesterday"])])).error == "bad-request")
            #expect(try await Self.run(bob, Self.query(fields: [("color", ["blue"])])).error == "bad-request")
            #expect(try await Self.run(alice, Self.query(), to: "bob@b.example").error == "forbidden")
            #expect(try await Self.run(alice, Self.query(), to: "nobody@b.example").error == "forbidden", "the same answer for no account")
            let page = try await Self.run(bob, Self.query())
            #expect(page.bodies == ["while you were away"])
            // The offline copy carries the same stanza-id.
            try await bob.sendPresence()
            let offline = try await bob.waitFor { $0.attribute("id") == "away" }
            #expect(Self.stanzaID(offline, by: "bob@b.example") == page.ids.first)
            await alice.close()
            await bob.close()
        }
    }

    @Test("Preferences (§6): never stops archiving, with exceptions; roster archives only contacts; they are read back")
    func preferences() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            try await bob.sendPresence()
            let prefs = XMLElement(name: "prefs", namespace: Self.mam, attributes: [XMLAttribute("default", "never")], children: [
                .element(XMLElement(name: "always", namespace: Self.mam, children: [.element(XMLElement(name: "jid", namespace: Self.mam, text: "carol@a.example"))])),
            ])
            #expect(try await bob.iq(.set, payload: prefs).attribute("type") == "result")
            let read = try await bob.iq(.get, payload: XMLElement(name: "prefs", namespace: Self.mam))
            #expect(read.firstChild(name: "prefs", namespace: Self.mam)?.attribute("default") == "never")
            try await alice.sendMessage(to: "bob@b.example", body: "not kept", id: "a")
            try await carol.sendMessage(to: "bob@b.example", body: "kept", id: "c")
            _ = try await bob.waitFor { $0.attribute("id") == "a" }
            _ = try await bob.waitFor { $0.attribute("id") == "c" }
            #expect(try await Self.run(bob, Self.query()).bodies == ["kept"])
            // roster: only contacts.
            try await server.context.storage.putRosterItem(RosterItem(jid: try JID("alice@a.example"), subscription: .both), of: try JID("bob@b.example"))
            #expect(try await bob.iq(.set, payload: XMLElement(name: "prefs", namespace: Self.mam, attributes: [XMLAttribute("default", "roster")])).attribute("type") == "result")
            try await alice.sendMessage(to: "bob@b.example", body: "from a contact", id: "a2")
            try await carol.sendMessage(to: "bob@b.example", body: "from a stranger", id: "c2")
            _ = try await bob.waitFor { $0.attribute("id") == "a2" }
            _ = try await bob.waitFor { $0.attribute("id") == "c2" }
            #expect(try await Self.run(bob, Self.query()).bodies == ["kept", "from a contact"])
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }
}
