import Foundation
import Testing
import TestSupport
import Trust
import XMPPCore
@testable import Federation
@testable import Server

/// Two Braid providers federating over loopback with real TLS.
@Suite("Federation between two Braid servers", .serialized)
struct FederationTests {
    func methods(_ server: TestServer) async -> [String] {
        (await server.server.federation?.links ?? []).flatMap { $0.pairs.map { "\($0.direction.rawValue) \($0.pair.local)⇄\($0.pair.remote) \($0.method.rawValue)" } }.sorted()
    }

    @Test("With trusted certificates, messages flow both ways over SASL EXTERNAL links")
    func certificates() async throws {
        try await withFederation(certificates: .trustedCA) { pair in
            let (alice, aliceJID) = try await pair.a.loggedIn("alice@a.example")
            let (bob, bobJID) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            try await bob.sendPresence()
            try await alice.sendMessage(to: bobJID.description, body: "Hello across providers ✓", id: "x1")
            let received = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }
            #expect(received.body == "Hello across providers ✓")
            #expect(received.attribute("from") == aliceJID.description)
            try await bob.sendMessage(to: aliceJID.description, body: "And back", id: "x2")
            #expect(try await alice.waitFor(timeout: .seconds(10)) { $0.name == "message" }.body == "And back")
            // One bidirectional link, opened by A, carries both directions (XEP-0288), each
            // authenticated by certificate.
            #expect(await methods(pair.a) == ["inbound a.example⇄b.example pkix", "outbound a.example⇄b.example pkix"])
            #expect(await methods(pair.b) == ["inbound b.example⇄a.example pkix", "outbound b.example⇄a.example pkix"])
            #expect(await pair.a.server.federation?.links.count == 1)
            #expect(pair.b.metrics.counterValue("braid_s2s_connections_opened_total") == 0)
            await alice.close()
            await bob.close()
        }
    }

    @Test("Without trusted certificates, dialback authenticates, verified on a separate connection")
    func dialback() async throws {
        try await withFederation(certificates: .selfSigned) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, bobJID) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: bobJID.description, body: "via dialback")
            #expect(try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }.body == "via dialback")
            #expect(await methods(pair.b).contains("inbound b.example⇄a.example dialback"))
            #expect(pair.b.metrics.counterValue("braid_s2s_dialback_verifications_total") >= 1)
            // A answered B's db:verify on another connection than the link.
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_accepted_total") >= 1)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A peer that must use certificates is refused dialback; the sender gets the error")
    func certificatesRequired() async throws {
        try await withFederation(certificates: .selfSigned, configureB: { $0.s2s.requireCertificates = true }) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "bob@b.example", body: "refused", id: "r1")
            let bounce = try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "r1" }
            #expect(bounce.attribute("type") == "error")
            #expect(bounce.stanzaErrorCondition == "not-authorized")
            #expect(pair.b.metrics.counterValue("braid_s2s_dialback_refused_total", [("condition", "not-authorized")]) == 1)
            await alice.close()
        }
    }

    @Test("Refusing the peer's certificate on our own link closes with a well-formed stream error (issue 10, item 11)")
    func refusalIsWellFormed() async throws {
        try await withFederation(certificates: .selfSigned, configureA: { $0.s2s.requireCertificates = true }) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "bob@b.example", body: "refused", id: "w1")
            let bounce = try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "w1" }
            #expect(bounce.stanzaErrorCondition == "remote-server-not-found")
            #expect(pair.a.metrics.counterValue("braid_stream_errors_sent_total", [("condition", "policy-violation"), ("stream", "s2s")]) >= 1)
            // B read a stream header and then the error, not a bare <stream:error> with an
            // unbound prefix: it never answered not-well-formed.
            try await waitUntil { pair.b.metrics.counterValue("braid_s2s_connections_accepted_total") >= 1 }
            try await waitUntil { await pair.b.server.federation?.links.allSatisfy(\.closed) ?? true }
            #expect(pair.b.metrics.counterValue("braid_stream_errors_sent_total", [("condition", "not-well-formed"), ("stream", "s2s")]) == 0)
            await alice.close()
        }
    }

    @Test("Two local domains share one outgoing link (sender multiplexing)")
    func senderMultiplexing() async throws {
        try await withFederation(aDomains: ["a.example", "a2.example"], aUsers: ["alice@a.example", "ann@a2.example"], certificates: .selfSigned) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (ann, _) = try await pair.a.loggedIn("ann@a2.example")
            let (bob, bobJID) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: bobJID.description, body: "from a")
            _ = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }
            try await ann.sendMessage(to: bobJID.description, body: "from a2")
            let second = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }
            #expect(second.body == "from a2")
            let outgoing = (await pair.a.server.federation?.links ?? []).filter { $0.origin == .outgoing }
            #expect(outgoing.count == 1)
            #expect(outgoing.first?.pairs.filter { $0.direction == .outbound }.map { "\($0.pair.local)" }.sorted() == ["a.example", "a2.example"])
            for client in [alice, ann, bob] { await client.close() }
        }
    }

    @Test("A domain that cannot be found bounces with remote-server-not-found")
    func unknownDomain() async throws {
        try await withFederation { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "someone@nowhere.example", body: "?", id: "n1")
            let bounce = try await alice.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "n1" }
            #expect(bounce.stanzaErrorCondition == "remote-server-not-found")
            await alice.close()
        }
    }

    @Test("A peer that does not answer bounces with remote-server-timeout")
    func unreachablePeer() async throws {
        let closed = try LoopbackPorts.closedTCPPort()
        defer { closed.release() }
        let closedPort = closed.port
        try await withFederation(configureA: { $0.s2s.peers["down.example"] = .init(host: "127.0.0.1", port: closedPort) }) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            try await alice.sendMessage(to: "someone@down.example", body: "?", id: "d1")
            let bounce = try await alice.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "d1" }
            #expect(bounce.stanzaErrorCondition == "remote-server-timeout")
            #expect(bounce.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(name: "text", namespace: XMLNamespace.stanzaErrors)?.text.contains("down.example") == true)
            await alice.close()
        }
    }

    @Test("Presence subscription and IQ ping across providers")
    func subscriptionAndPing() async throws {
        try await withFederation { pair in
            let (alice, aliceJID) = try await pair.a.loggedIn("alice@a.example")
            let (bob, bobJID) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            try await bob.sendPresence()
            try await alice.sendPresence(type: "subscribe", to: "bob@b.example")
            let request = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "presence" && $0.attribute("type") == "subscribe" }
            #expect(request.attribute("from") == "alice@a.example")
            try await bob.sendPresence(type: "subscribed", to: "alice@a.example")
            _ = try await alice.waitFor(timeout: .seconds(10)) { $0.name == "presence" && $0.attribute("type") == "subscribed" }
            let bobsPresence = try await alice.waitFor(timeout: .seconds(10)) { $0.name == "presence" && $0.attribute("from") == bobJID.description && $0.attribute("type") == nil }
            #expect(bobsPresence.attribute("from") == bobJID.description)
            let roster = try await pair.a.context.storage.rosterItem(of: try JID("alice@a.example"), contact: try JID("bob@b.example"))
            #expect(roster?.subscription == .to)
            // Bob answers a ping to his full JID; a ping to the server domain is answered too.
            let pong = try await alice.iq(.get, to: "b.example", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping"))
            #expect(pong.attribute("type") == "result")
            #expect(pong.attribute("from") == "b.example")
            _ = aliceJID
            await alice.close()
            await bob.close()
        }
    }
}
