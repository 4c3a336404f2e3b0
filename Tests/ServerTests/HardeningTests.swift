import Foundation
import NIOCore
import NIOEmbedded
import NIOPosix
import Synchronization
import Testing
import TestSupport
import XMPPCore
@testable import Federation
@testable import Server
@testable import Storage

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

    @Test("A stanza from a peer for a domain removed meanwhile gets an error on its link and is never relayed (RFC 6120 §10.5; issue 10, item 5)")
    func noRelayAfterRemoval() async throws {
        try await withFederation(aDomains: ["a.example"], aUsers: ["alice@a.example"],
                                 bDomains: ["b.example", "b2.example"], bUsers: ["bob@b.example", "carol@b2.example"]) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            try await alice.sendPresence()
            let (carol, _) = try await pair.b.loggedIn("carol@b2.example")
            // carol's pair is set up on the link (both ways, bidi).
            try await carol.sendMessage(to: "alice@a.example", body: "hello", id: "h")
            _ = try await alice.waitFor(timeout: .seconds(10)) { $0.name == "message" && $0.attribute("id") == "h" }
            let manager = try #require(pair.b.server.federation)
            let link = try #require(manager.openLinks.first)
            // b2.example is removed from B; alice's stanza to carol had already passed the
            // link's checks and waits to be routed.
            _ = try await pair.b.server.context.storage.removeDomain("b2.example")
            _ = try await pair.b.server.context.domains.synchronize(from: pair.b.server.context.storage)
            #expect(!pair.b.server.context.domains.isHosted("b2.example"))
            let outBefore = pair.b.metrics.counterValue("braid_s2s_stanzas_out_total")
            let element = XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [
                XMLAttribute("from", "alice@a.example/test"), XMLAttribute("to", "carol@b2.example"),
                XMLAttribute("id", "late"), XMLAttribute("type", "chat"),
            ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.server, text: "too late"))])
            await manager.deliverInbound(try #require(Stanza(element)), from: link)
            // Answered on the link with an error...
            let bounce = try await alice.waitFor(timeout: .seconds(10)) { $0.name == "message" && $0.attribute("id") == "late" }
            #expect(bounce.attribute("type") == "error")
            // ...and nothing was sent onwards, nor is anything waiting to be.
            #expect(pair.b.metrics.counterValue("braid_s2s_stanzas_out_total") == outBefore)
            #expect(manager.pendingCount == 0)
            await alice.close()
            await carol.close()
        }
    }

    @Test("Messages that reuse an id all arrive over federation; only re-sent copies of unacknowledged ones are dropped (issue 10, item 2)")
    func reusedIDsAreDelivered() async throws {
        try await withFederation { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            for round in 0..<3 {
                try await alice.sendMessage(to: "bob@b.example", body: "same id \(round)", id: "reused")
                let message = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" && $0.attribute("type") != "error" }
                #expect(message.body == "same id \(round)")
            }
            #expect(pair.b.metrics.counterValue("braid_s2s_duplicates_dropped_total") == 0)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A link whose handshake is still under way is checked for revocation later, not never (issue 10, item 1)")
    func revocationCheckNotSkippedBeforeHandshake() async throws {
        try await withFederation { pair in
            let manager = try #require(pair.a.server.federation)
            // Registered as an incoming link is, when its TCP connection opens: no chain yet.
            let link = FederationLink(origin: .incoming, peerAddress: "slow peer", channel: NIOAsyncTestingChannel())
            manager.linkOpened(link)
            await manager.revalidate()
            let next = try #require(await link.onLoop { $0.nextRevocationCheck })
            #expect(next != .distantFuture)
            #expect(next <= Date())
            _ = await link.onLoop { manager.linkClosed($0) }
        }
    }


    @Test("An outgoing link whose connection closes while the peer is being proven ends cleanly; the next attempt delivers (issue 10: it trapped the process)")
    func closedWhileProving() async throws {
        // B's certificate is self-signed, so A tries POSH for b.example, at a server that
        // accepts and never answers: A's proof waits there while the connection goes.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let held = Mutex<[any Channel]>([])
        let silent = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                held.withLock { $0.append(channel) }
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let silentPort = try #require(silent.localAddress?.port)
        try await withFederation(certificates: .selfSigned, configureA: {
            $0.s2s.poshConnectOverrides = ["b.example": "127.0.0.1:\(silentPort)"]
            $0.s2s.poshTimeoutSeconds = 30
            $0.s2s.retryBaseSeconds = 0.2
        }) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: "bob@b.example", body: "first", id: "first")
            try await waitUntil { held.withLock { !$0.isEmpty } }
            // B drops the connection while A is still proving it.
            let incoming = try #require(pair.b.server.federation?.openLinks.first)
            try await incoming.channel.close()
            try await waitUntil { pair.a.metrics.counterValue("braid_s2s_link_failures_total") >= 1 }
            // Now the proof ends (the POSH server goes): the closed attempt must not go on
            // to start its stream. The first message comes back; the process lives on.
            for channel in held.withLock({ $0 }) { try? await channel.close() }
            try await silent.close()
            let bounced = try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "first" }
            #expect(bounced.attribute("type") == "error")
            // After the back-off, a new connection: POSH fails at once, dialback proves A.
            try await waitUntil {
                try await alice.sendMessage(to: "bob@b.example", body: "second", id: "second-\(UUID().uuidString.prefix(4))")
                return await bob.expectSilence(for: .milliseconds(300)).map { $0.body == "second" } == true
            }
            await alice.close()
            await bob.close()
        }
        try await group.shutdownGracefully()
    }


    @Test("A full disk (SQLITE_FULL): the sender gets service-unavailable, a metric counts it, the server keeps serving; storing works again once there is room (issue 12)")
    func fullDisk() async throws {
        try await withServer { server in
            let storage = try #require(server.context.storage as? SQLiteStorage)
            let (alice, _) = try await server.loggedIn("alice@a.example")
            // Bob is offline: his messages go to storage, which has no room left.
            try await storage.capSizeForTesting(extraPages: 0)
            try await alice.sendMessage(to: "bob@b.example", body: String(repeating: "x", count: 5000), id: "full")
            let refused = try await alice.waitFor { $0.attribute("id") == "full" }
            #expect(refused.attribute("type") == "error")
            #expect(refused.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "service-unavailable")
            #expect(server.metrics.counterTotal("braid_offline_refused_total") >= 1)
            // Still serving.
            try await alice.roundTrip()
            try await storage.capSizeForTesting(extraPages: 1_000_000)
            try await alice.sendMessage(to: "bob@b.example", body: "room again", id: "ok")
            try await waitUntil { try await server.context.storage.offlineMessageCount(for: try JID("bob@b.example")) == 1 }
            await alice.close()
        }
    }

}
