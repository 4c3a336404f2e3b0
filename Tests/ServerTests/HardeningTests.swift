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
