import Foundation
import NIOCore
import Testing
import TestSupport
import Trust
import XMPPCore
@testable import Federation
@testable import Server

/// Graceful fallback (issue 9): a pair that cannot join the shared link gets a connection of
/// its own, as a classic server would give it, and nothing is lost. Two Braid providers on
/// loopback with real TLS; each customer domain has a certificate of its own naming only
/// that domain, the most common hosting set-up.
@Suite("Graceful fallback to a connection per pair", .serialized)
struct FallbackTests {
    static let aDomains = ["a1.example", "a2.example", "a3.example"]
    static let bDomains = ["b1.example", "b2.example", "b3.example"]
    static var aUsers: [String] { aDomains.map { "user@\($0)" } }
    static var bUsers: [String] { bDomains.map { "user@\($0)" } }

    func clients(_ server: TestServer, _ users: [String]) async throws -> [String: TestClient] {
        try await server.clientsWithPresence(users)
    }

    /// Waits for `count` messages on `client`; an error bounced back fails the test with
    /// its text (nothing may be bounced).
    func receive(_ count: Int, on client: TestClient, timeout: Duration = .seconds(40)) async throws -> Set<String> {
        var bodies: Set<String> = []
        while bodies.count < count {
            let message = try await client.waitFor(timeout: timeout) { $0.name == "message" }
            if message.attribute("type") == "error" {
                Issue.record("bounced: \(message)")
                continue
            }
            bodies.insert(message.body ?? "")
        }
        return bodies
    }

    /// Every user of `senders` writes to every user of `receivers` at once (a burst of new
    /// pairs), and each receiver gets exactly its messages.
    func burst(from senders: [String: TestClient], to receivers: [String: TestClient], label: String) async throws {
        for (sender, client) in senders {
            for receiver in receivers.keys {
                try await client.sendMessage(to: receiver, body: "\(label) \(sender)→\(receiver)")
            }
        }
        for (receiver, client) in receivers {
            let expected = Set(senders.keys.map { "\(label) \($0)→\(receiver)" })
            let got = try await receive(expected.count, on: client)
            #expect(got == expected, "\(receiver): missing \(expected.subtracting(got).sorted()), unexpected \(got.subtracting(expected).sorted())")
        }
    }

    func openLinks(_ server: TestServer) async -> [LinkSnapshot] {
        await server.openLinkSnapshots
    }

    func outboundPairs(_ server: TestServer) async -> Set<String> {
        Set(await openLinks(server).flatMap { $0.pairs.filter { $0.direction == .outbound }.map { "\($0.pair.local)⇄\($0.pair.remote) \($0.method.rawValue)" } })
    }

    @Test("Certificates required, a certificate per domain: every pair delivered, each proven by its own certificate")
    func perDomainStrict() async throws {
        try await withFederation(aDomains: Self.aDomains, aUsers: Self.aUsers, bDomains: Self.bDomains, bUsers: Self.bUsers,
                                 certificates: .perDomain,
                                 configureA: { $0.s2s.requireCertificates = true }, configureB: { $0.s2s.requireCertificates = true }) { pair in
            let a = try await clients(pair.a, Self.aUsers)
            let b = try await clients(pair.b, Self.bUsers)
            try await burst(from: a, to: b, label: "cold")
            try await burst(from: b, to: a, label: "reverse")
            try await burst(from: a, to: b, label: "warm")
            #expect(pair.a.metrics.counterValue("braid_s2s_bounced_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_bounced_total") == 0)
            // No dialback anywhere: every pair rests on the certificate of its own domains.
            let expected = Set(Self.aDomains.flatMap { a in Self.bDomains.map { "\(a)⇄\($0) pkix" } })
            #expect(await outboundPairs(pair.a) == expected)
            #expect(pair.b.metrics.counterValue("braid_s2s_dialback_verifications_total") == 0)
            // B refused A's further domains on the first link (not-authorized), and A gave
            // each of those pairs a connection of its own.
            #expect(pair.a.metrics.counterValue("braid_s2s_pair_fallbacks_total") > 0)
            // One connection per pair at most (bidi carries the reverse direction).
            let opened = pair.a.metrics.counterValue("braid_s2s_connections_opened_total") + pair.b.metrics.counterValue("braid_s2s_connections_opened_total")
            #expect(opened >= 9 && opened <= 18)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("Dialback allowed, a certificate per domain: every pair delivered, both sides sending at once from cold")
    func perDomainDialbackSimultaneous() async throws {
        try await withFederation(aDomains: Self.aDomains, aUsers: Self.aUsers, bDomains: Self.bDomains, bUsers: Self.bUsers,
                                 certificates: .perDomain) { pair in
            let a = try await clients(pair.a, Self.aUsers)
            let b = try await clients(pair.b, Self.bUsers)
            // Both providers open pairs at the same moment.
            async let ab: Void = burst(from: a, to: b, label: "cold-ab")
            async let ba: Void = burst(from: b, to: a, label: "cold-ba")
            _ = try await (ab, ba)
            try await burst(from: a, to: b, label: "warm")
            #expect(pair.a.metrics.counterValue("braid_s2s_bounced_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_bounced_total") == 0)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A burst of 64 new pairs each way at once, a certificate per domain, both policies: nothing lost, at most one connection per pair",
          arguments: [false, true])
    func burstAtScale(requireCertificates: Bool) async throws {
        let aDomains = (1...8).map { "a\($0).example" }
        let bDomains = (1...8).map { "b\($0).example" }
        let aUsers = aDomains.map { "user@\($0)" }
        let bUsers = bDomains.map { "user@\($0)" }
        try await withFederation(aDomains: aDomains, aUsers: aUsers, bDomains: bDomains, bUsers: bUsers, certificates: .perDomain,
                                 configureA: { $0.s2s.requireCertificates = requireCertificates },
                                 configureB: { $0.s2s.requireCertificates = requireCertificates }) { pair in
            let a = try await clients(pair.a, aUsers)
            let b = try await clients(pair.b, bUsers)
            async let ab: Void = burst(from: a, to: b, label: "cold-ab")
            async let ba: Void = burst(from: b, to: a, label: "cold-ba")
            _ = try await (ab, ba)
            try await burst(from: a, to: b, label: "warm")
            #expect(pair.a.metrics.counterValue("braid_s2s_bounced_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_bounced_total") == 0)
            // Links both sides opened at the same moment for the same pairs are merged
            // (simultaneous open): at most one per pair whatever the policy. With dialback the
            // usual result is one per peer domain of whichever side opened it (16 here), but
            // about one run in twenty under parallel test load ends with 17: one side opened
            // two links to the same per-domain target in the cold race, and same-direction
            // duplicates are not merged (issue 10 note; nothing is lost). The ideal is
            // printed, the guarantee asserted.
            let ideal = requireCertificates ? aDomains.count * bDomains.count : aDomains.count + bDomains.count
            let bound = aDomains.count * bDomains.count
            let settleBy = ContinuousClock.now + .seconds(15)
            while await openLinks(pair.a).count > ideal && ContinuousClock.now < settleBy {
                try await Task.sleep(for: .milliseconds(100))
            }
            let open = await openLinks(pair.a)
            let links = open.count
            #expect(links <= bound, "\(open.map { "\($0.origin.rawValue) \($0.bidirectional ? "bidi" : "one-way") \(Set($0.pairs.map(\.pair.remote)).sorted())⇄\(Set($0.pairs.map(\.pair.local)).count) locals, \($0.pairs.count) pairs" }.sorted())")
            print("fallback burst 8x8 require_certificates=\(requireCertificates): open links \(links) (usually \(ideal)), connections opened A \(pair.a.metrics.counterValue("braid_s2s_connections_opened_total")) B \(pair.b.metrics.counterValue("braid_s2s_connections_opened_total")), fallbacks A \(pair.a.metrics.counterValue("braid_s2s_pair_fallbacks_total")) B \(pair.b.metrics.counterValue("braid_s2s_pair_fallbacks_total")), dialback verifications B \(pair.b.metrics.counterValue("braid_s2s_dialback_verifications_total"))")
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A certificate per domain on one side, one naming every domain on the other: one link with dialback, one per local domain with certificates required",
          arguments: [false, true])
    func perDomainOnOneSide(requireCertificates: Bool) async throws {
        try await withFederation(aDomains: Self.aDomains, aUsers: Self.aUsers, bDomains: Self.bDomains, bUsers: Self.bUsers,
                                 certificates: .perDomainA,
                                 configureA: { $0.s2s.requireCertificates = requireCertificates },
                                 configureB: { $0.s2s.requireCertificates = requireCertificates }) { pair in
            let a = try await clients(pair.a, Self.aUsers)
            let b = try await clients(pair.b, Self.bUsers)
            // One pair first, so the rest find its link (a cold burst may open more, merged later).
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "first")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["first"])
            try await burst(from: a, to: b, label: "ab")
            try await burst(from: b, to: a, label: "ba")
            #expect(pair.a.metrics.counterValue("braid_s2s_bounced_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_bounced_total") == 0)
            let expected = requireCertificates ? Self.aDomains.count : 1
            #expect(await openLinks(pair.a).count == expected)
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_opened_total") == expected)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A peer that stops acknowledging: the link is reset and what it did not acknowledge arrives over a new one, once")
    func silentPeerIsReset() async throws {
        try await withFederation(configureA: { configuration in
            configuration.s2s.acknowledgementTimeoutSeconds = 1
            configuration.s2s.revalidationIntervalSeconds = 0.5
        }) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: "bob@b.example", body: "warm-up")
            #expect(try await receive(1, on: bob) == ["warm-up"])
            let linkA = try #require(pair.a.server.federation?.openLinks.first)
            #expect(await linkA.onLoop { $0.streamManagementEnabled } == true)
            // B stops reading the link: nothing it would acknowledge arrives any more.
            let linkB = try #require(pair.b.server.federation?.openLinks.first)
            try await linkB.channel.setOption(ChannelOptions.autoRead, value: false)
            for index in 0..<20 {
                try await alice.sendMessage(to: "bob@b.example", body: "m\(index)", id: "m\(index)")
            }
            let expected = Set((0..<20).map { "m\($0)" })
            #expect(try await receive(expected.count, on: bob, timeout: .seconds(20)) == expected)
            #expect(pair.a.metrics.counterValue("braid_s2s_ack_timeouts_total") >= 1)
            #expect(await linkA.onLoop { $0.isClosed } == true)
            // Nothing more: no copy arrives twice.
            #expect(await bob.expectSilence(for: .milliseconds(500)) == nil)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A local domain without any certificate, certificates required by the peer: bounced with not-authorized, the others delivered")
    func unprovableDomainBounces() async throws {
        // a3 has no certificate of its own (the provider's names only a1 and a2) and B
        // requires certificates: its own connection fails too, so its stanza bounces.
        try await withFederation(aDomains: Self.aDomains, aUsers: Self.aUsers, bDomains: ["b1.example"], bUsers: ["user@b1.example"],
                                 aCertified: ["a1.example", "a2.example"],
                                 configureB: { $0.s2s.requireCertificates = true }) { pair in
            let a = try await clients(pair.a, Self.aUsers)
            let b = try await clients(pair.b, ["user@b1.example"])
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "one")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["one"])
            try await a["user@a3.example"]!.sendMessage(to: "user@b1.example", body: "three")
            let bounce = try await a["user@a3.example"]!.waitFor(timeout: .seconds(40)) { $0.name == "message" }
            #expect(bounce.attribute("type") == "error")
            #expect(bounce.firstChild(name: "error", namespace: bounce.namespace)?.firstChild(name: "not-authorized", namespace: XMLNamespace.stanzaErrors) != nil)
            // The link and a1's pair are untouched.
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "still")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["still"])
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }
}
