import Foundation
import NIOEmbedded
import Testing
import TestSupport
import XMPPCore
@testable import Federation
@testable import Server

/// Issue 10, the audit's findings: each test failed before its fix.
@Suite("Hardening: the audit's findings", .serialized)
struct HardeningTests {
    @Test("A resource sees its own initial and later presence, and its other resources see it too (RFC 6121 §4.2.2, §4.4.2; issue 10, item 6)")
    func ownPresenceEchoed() async throws {
        try await withServer { server in
            let (phone, phoneJID) = try await server.loggedIn("alice@a.example", resource: "phone")
            let (laptop, laptopJID) = try await server.loggedIn("alice@a.example", resource: "laptop")
            try await laptop.sendPresence()
            let echo = try await laptop.waitFor { $0.name == "presence" }
            #expect(echo.attribute("from") == laptopJID.description)
            #expect(echo.attribute("to") == laptopJID.description)
            try await phone.sendPresence(priority: 5)
            let own = try await phone.waitFor { $0.name == "presence" && $0.attribute("from") == phoneJID.description }
            #expect(own.attribute("to") == phoneJID.description)
            let atLaptop = try await laptop.waitFor { $0.name == "presence" && $0.attribute("from") == phoneJID.description }
            #expect(atLaptop.attribute("to") == laptopJID.description)
            // Subsequent presence (§4.4.2) too.
            try await laptop.send(XMLElement(name: "presence", namespace: XMLNamespace.client, children: [
                .element(XMLElement(name: "show", namespace: XMLNamespace.client, text: "away")),
            ]))
            let away = try await laptop.waitFor { $0.name == "presence" && $0.attribute("from") == laptopJID.description }
            #expect(away.firstChild(name: "show", namespace: XMLNamespace.client)?.text == "away")
            await phone.close()
            await laptop.close()
        }
    }

    @Test("A link whose handshake is still under way is checked for revocation later, not never (issue 10, item 1)")
    func revocationCheckNotSkippedBeforeHandshake() async throws {
        try await withFederation { pair in
            let manager = try #require(pair.a.server.federation)
            // Registered as an incoming link is, when its TCP connection opens: no chain yet.
            let link = FederationLink(origin: .incoming, peerAddress: "slow peer", channel: EmbeddedChannel())
            manager.linkOpened(link)
            await manager.revalidate()
            #expect(link.nextRevocationCheck != .distantFuture)
            #expect(link.nextRevocationCheck <= Date())
            manager.linkClosed(link)
        }
    }

}
