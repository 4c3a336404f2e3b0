import Foundation
import Storage
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// Client state indication (XEP-0352): an inactive client is spared presence updates and
/// chat states until something matters, and gets them all, newest only, when it does.
@Suite("Client state indication (XEP-0352)")
struct ClientStateTests {
    static func csi(_ name: String) -> XMLElement { XMLElement(name: name, namespace: XMLNamespace.clientState) }

    static func presence(show: String) -> XMLElement {
        XMLElement(name: "presence", namespace: XMLNamespace.client, children: [.element(XMLElement(name: "show", namespace: XMLNamespace.client, text: show))])
    }

    static func chatState(to: String, _ state: String) -> XMLElement {
        XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", to), XMLAttribute("type", "chat")],
                   children: [.element(XMLElement(name: "\(state)", namespace: "http://jabber.org/protocol/chatstates"))])
    }

    @Test("Inactive: presence updates are held (only the newest per contact) and chat states too; a message with a body brings them first, in order; <active/> sends the rest")
    func holdsAndFlushes() async throws {
        try await withServer { server in
            try await server.context.storage.putRosterItem(RosterItem(jid: try JID("bob@b.example"), subscription: .both), of: try JID("alice@a.example"))
            try await server.context.storage.putRosterItem(RosterItem(jid: try JID("alice@a.example"), subscription: .both), of: try JID("bob@b.example"))
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendPresence()
            _ = try await bob.waitFor { $0.name == "presence" && $0.attribute("from") == aliceJID.description }
            try await bob.send(Self.csi("inactive"))
            // A round trip: the server has taken the state before alice speaks.
            _ = try await bob.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
            try await alice.send(Self.presence(show: "away"))
            try await alice.send(Self.presence(show: "dnd"))
            try await alice.send(Self.chatState(to: "bob@b.example", "composing"))
            try await alice.sendMessage(to: "bob@b.example", body: "are you there?", id: "body")
            // The held presence (the newest only) and chat state arrive before the message
            // (bob's own presence echo may be among what was held, and a second copy of
            // alice's initial presence, from the probe, may have come before bob went
            // inactive: neither has a <show/>).
            var fromAlice: [XMLElement] = []
            while true {
                let element = try await bob.nextElement()
                guard element.attribute("from") == aliceJID.description else { continue }
                if element.name == "presence", element.firstChild(name: "show", namespace: XMLNamespace.client) == nil { continue }
                fromAlice.append(element)
                if element.attribute("id") == "body" { break }
            }
            #expect(fromAlice.count == 3, "\(fromAlice.map(XMLFragment.serialize))")
            #expect(fromAlice.first?.name == "presence" && fromAlice.first?.firstChild(name: "show", namespace: XMLNamespace.client)?.text == "dnd",
                    "only the newest presence, and before the message")
            #expect(fromAlice.dropFirst().first?.firstChild(name: "composing", namespace: "http://jabber.org/protocol/chatstates") != nil)
            // Still inactive: held again; <active/> sends it.
            try await alice.send(Self.presence(show: "xa"))
            _ = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
            #expect(await bob.expectSilence(for: .milliseconds(300)) == nil)
            try await bob.send(Self.csi("active"))
            let flushed = try await bob.waitFor { $0.name == "presence" && $0.attribute("from") == aliceJID.description }
            #expect(flushed.firstChild(name: "show", namespace: XMLNamespace.client)?.text == "xa")
            // Something unknown in the namespace is ignored, never a stream error.
            try await bob.send(Self.csi("sleepy"))
            #expect(try await bob.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster")).attribute("type") == "result")
            await alice.close()
            await bob.close()
        }
    }

    @Test("The feature is offered after authentication")
    func advertised() async throws {
        try await withServer { server in
            let (client, _) = try await server.loggedIn("alice@a.example")
            #expect(client.featuresAfterAuthentication?.firstChild(name: "csi", namespace: XMLNamespace.clientState) != nil)
            await client.close()
        }
    }
}
