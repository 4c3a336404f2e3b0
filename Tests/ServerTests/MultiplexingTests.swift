import Synchronization
import Foundation
import Testing
import TestSupport
import Trust
import XMPPCore
@testable import Federation
@testable import Server

/// One link per provider pair (XEP-0220 §2.6, XEP-0288, RFC 7712 §4.4), between two Braid
/// servers over loopback with real TLS. DNS is replaced by static peer settings that point
/// every peer domain at the same host and port, as SRV would for one provider.
@Suite("Multiplexed links between two Braid providers", .serialized)
struct MultiplexingTests {
    static let aDomains = ["a1.example", "a2.example", "a3.example"]
    static let bDomains = ["b1.example", "b2.example", "b3.example"]
    static var aUsers: [String] { aDomains.map { "user@\($0)" } }
    static var bUsers: [String] { bDomains.map { "user@\($0)" } }

    /// Every pair on every link of `server`, as "direction local⇄remote method".
    func pairs(_ server: TestServer) async -> [String] {
        (await server.server.federation?.links ?? []).filter { !$0.closed }.flatMap { link in
            link.pairs.map { "\($0.direction.rawValue) \($0.pair.local)⇄\($0.pair.remote) \($0.method.rawValue)" }
        }.sorted()
    }

    func openLinks(_ server: TestServer) async -> [LinkSnapshot] {
        await server.openLinkSnapshots
    }

    /// Waits until each side holds one open link; if not, the failure says which links each
    /// holds (origin, pairs, traffic), since the CI shows nothing else of a run.
    func waitForOneLink(_ pair: FederatedPair, timeout: Duration = .seconds(10), fileID: String = #fileID, line: Int = #line) async throws {
        do {
            try await waitUntil(timeout: timeout, "one link between the providers", fileID: fileID, line: line) {
                let (a, b) = (await openLinks(pair.a).count, await openLinks(pair.b).count)
                return a == 1 && b == 1
            }
        } catch {
            func describe(_ links: [LinkSnapshot]) -> String {
                links.map { link in
                    let pairs = link.pairs.map { "\($0.direction.rawValue) \($0.pair.local)⇄\($0.pair.remote)" }.joined(separator: ", ")
                    return "\(link.id.prefix(8)) \(link.origin) bidi=\(link.bidirectional) sent=\(link.stanzasSent) received=\(link.stanzasReceived) [\(pairs)]"
                }.joined(separator: "; ")
            }
            Issue.record("links of a: \(describe(await openLinks(pair.a))) | links of b: \(describe(await openLinks(pair.b)))")
            throw error
        }
    }

    /// Logs every user in with presence, so messages to their bare JIDs are delivered live.
    func clients(_ server: TestServer, _ users: [String]) async throws -> [String: TestClient] {
        try await server.clientsWithPresence(users)
    }

    /// Waits for `count` messages and returns their bodies.
    func receive(_ count: Int, on client: TestClient, timeout: Duration = .seconds(15)) async throws -> [String] {
        var bodies: [String] = []
        while bodies.count < count {
            let message = try await client.waitFor(timeout: timeout) { $0.name == "message" }
            bodies.append(message.body ?? "")
        }
        return bodies
    }

    @Test("Every pair, both directions, rides one connection when certificates name every domain")
    func oneConnection() async throws {
        try await withFederation(aDomains: Self.aDomains, aUsers: Self.aUsers, bDomains: Self.bDomains, bUsers: Self.bUsers) { pair in
            let a = try await clients(pair.a, Self.aUsers)
            let b = try await clients(pair.b, Self.bUsers)
            // A's first domain writes to all of B: the first pair opens the link, the others
            // join it as targets proven by B's certificate.
            for bUser in Self.bUsers {
                try await a["user@a1.example"]!.sendMessage(to: bUser, body: "a1→\(bUser)")
            }
            for bUser in Self.bUsers {
                #expect(try await receive(1, on: b[bUser]!) == ["a1→\(bUser)"])
            }
            // B writes first to A's other domains: it asserts its pairs on the link A opened
            // (XEP-0288 §2.2), A's certificate proving them.
            for bUser in Self.bUsers {
                for aUser in Self.aUsers.dropFirst() {
                    try await b[bUser]!.sendMessage(to: aUser, body: "\(bUser)→\(aUser)")
                }
            }
            for aUser in Self.aUsers.dropFirst() {
                #expect(Set(try await receive(3, on: a[aUser]!)) == Set(Self.bUsers.map { "\($0)→\(aUser)" }))
            }
            // And the rest of A answers.
            for aUser in Self.aUsers.dropFirst() {
                for bUser in Self.bUsers {
                    try await a[aUser]!.sendMessage(to: bUser, body: "\(aUser)→\(bUser)")
                }
            }
            for bUser in Self.bUsers {
                #expect(Set(try await receive(2, on: b[bUser]!)) == Set(Self.aUsers.dropFirst().map { "\($0)→\(bUser)" }))
            }
            // One TCP connection, opened by A; no dialback verification connections.
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_opened_total") == 1)
            #expect(pair.b.metrics.counterValue("braid_s2s_connections_opened_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_connections_accepted_total") == 1)
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_accepted_total") == 0)
            #expect(await openLinks(pair.a).count == 1)
            #expect(await openLinks(pair.b).count == 1)
            #expect(await openLinks(pair.a).first?.bidirectional == true)
            // All nine pairs, both ways, authorised by certificate.
            let expected = Self.aDomains.flatMap { a in Self.bDomains.flatMap { b in ["inbound \(a)⇄\(b) pkix", "outbound \(a)⇄\(b) pkix"] } }.sorted()
            #expect(await pairs(pair.a) == expected)
            #expect(await pairs(pair.b) == Self.bDomains.flatMap { b in Self.aDomains.flatMap { a in ["inbound \(b)⇄\(a) pkix", "outbound \(b)⇄\(a) pkix"] } }.sorted())
            // A added two targets to its link; B asserted six pairs of its own on it.
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_saved_total") == 2)
            #expect(pair.b.metrics.counterValue("braid_s2s_connections_saved_total") == 6)
            // The gauges an operator scrapes say the same.
            _ = await pair.a.metrics.prometheusText()
            #expect(pair.a.metrics.gaugeValue("braid_s2s_links", [("origin", "outgoing")]) == 1)
            #expect(pair.a.metrics.gaugeValue("braid_s2s_links", [("origin", "incoming")]) == 0)
            #expect(pair.a.metrics.gaugeValue("braid_s2s_pairs", [("direction", "outbound"), ("method", "pkix")]) == 9)
            #expect(pair.a.metrics.gaugeValue("braid_s2s_pairs_per_link_max") == 18)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A domain the certificate does not name joins by dialback, verified on a short-lived connection")
    func dialbackDomainJoins() async throws {
        try await withFederation(aDomains: ["a1.example", "a2.example"], aUsers: ["user@a1.example", "user@a2.example"],
                                 bDomains: ["b1.example"], bUsers: ["user@b1.example"], aCertified: ["a1.example"]) { pair in
            let a = try await clients(pair.a, ["user@a1.example", "user@a2.example"])
            let b = try await clients(pair.b, ["user@b1.example"])
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "one")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["one"])
            try await a["user@a2.example"]!.sendMessage(to: "user@b1.example", body: "two")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["two"])
            try await b["user@b1.example"]!.sendMessage(to: "user@a2.example", body: "back")
            #expect(try await receive(1, on: a["user@a2.example"]!) == ["back"])
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_opened_total") == 1)
            #expect(pair.b.metrics.counterValue("braid_s2s_dialback_verifications_total") == 1)
            // The verifying side counts the db:verify connection it opened (issue 9), and A
            // counts it as accepted.
            #expect(pair.b.metrics.counterValue("braid_s2s_connections_opened_total") == 1)
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_accepted_total") == 1)
            #expect(await pairs(pair.b).contains("inbound b1.example⇄a2.example dialback"))
            #expect(await pairs(pair.b).contains("inbound b1.example⇄a1.example pkix"))
            // The verification connection came and went; the link is the only one left.
            try await waitForOneLink(pair)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A refused domain gets a dialback error; the link and its other pairs stay up")
    func refusedAdditionKeepsLink() async throws {
        try await withFederation(aDomains: ["a1.example", "a2.example"], aUsers: ["user@a1.example", "user@a2.example"],
                                 bDomains: ["b1.example"], bUsers: ["user@b1.example"], aCertified: ["a1.example"],
                                 configureB: { $0.s2s.peers["a2.example", default: .init()].requireCertificates = true }) { pair in
            let a = try await clients(pair.a, ["user@a1.example", "user@a2.example"])
            let b = try await clients(pair.b, ["user@b1.example"])
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "before")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["before"])
            let linkID = await openLinks(pair.a).first?.id
            try await a["user@a2.example"]!.sendMessage(to: "user@b1.example", body: "refused", id: "r1")
            let bounce = try await a["user@a2.example"]!.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "r1" }
            #expect(bounce.stanzaErrorCondition == "not-authorized")
            // Refused once: a connection of its own would present the same certificate,
            // which names only a1, so the refusal is final and no connection is opened for it.
            #expect(pair.b.metrics.counterValue("braid_s2s_dialback_refused_total", [("condition", "not-authorized")]) == 1)
            #expect(pair.a.metrics.counterValue("braid_s2s_pair_fallbacks_total") == 0)
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_opened_total") == 1)
            // The same link still carries a1's pair, both ways.
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "after")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["after"])
            try await b["user@b1.example"]!.sendMessage(to: "user@a1.example", body: "reply")
            #expect(try await receive(1, on: a["user@a1.example"]!) == ["reply"])
            #expect(await openLinks(pair.a).map(\.id) == [linkID].compactMap { $0 })
            #expect(pair.a.metrics.counterValue("braid_stream_errors_sent_total", [("condition", "host-unknown"), ("stream", "s2s")]) == 0)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A link cut mid-traffic loses nothing: unacknowledged stanzas are re-sent, duplicates dropped")
    func cutLinkLosesNothing() async throws {
        try await withFederation { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: "bob@b.example", body: "warm-up", id: "w")
            #expect(try await receive(1, on: bob) == ["warm-up"])
            let link = try #require(pair.a.server.federation?.openLinks.first)
            #expect(await link.onLoop { $0.streamManagementEnabled } == true)
            let total = 300
            for index in 0..<total {
                try await alice.sendMessage(to: "bob@b.example", body: "m\(index)", id: "m\(index)")
                if index == total / 2 {
                    // Cut the TCP connection under the link, from A's side.
                    pair.a.server.federation?.openLinks.first?.channel.close(promise: nil)
                }
            }
            let bodies = try await receive(total, on: bob, timeout: .seconds(20))
            #expect(Set(bodies) == Set((0..<total).map { "m\($0)" }))
            #expect(bodies.count == total)
            // Nothing more arrives: each message exactly once.
            #expect(await bob.expectSilence(for: .milliseconds(500)) == nil)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A domain removed at runtime leaves the link: its stanzas get an error, the others flow")
    func removedDomainWithdrawn() async throws {
        try await withFederation(aDomains: ["a1.example", "a2.example"], aUsers: ["user@a1.example", "user@a2.example"],
                                 bDomains: ["b1.example"], bUsers: ["user@b1.example"]) { pair in
            let a = try await clients(pair.a, ["user@a1.example", "user@a2.example"])
            let b = try await clients(pair.b, ["user@b1.example"])
            for aUser in ["user@a1.example", "user@a2.example"] {
                try await a[aUser]!.sendMessage(to: "user@b1.example", body: aUser)
            }
            #expect(Set(try await receive(2, on: b["user@b1.example"]!)) == ["user@a1.example", "user@a2.example"])
            let linkID = await openLinks(pair.b).first?.id
            #expect(try await pair.a.context.storage.removeDomain("a2.example"))
            try await waitUntil { !pair.a.context.domains.isHosted("a2.example") }
            try await waitUntil { await !pairs(pair.a).contains { $0.contains("a2.example") } }
            try await b["user@b1.example"]!.sendMessage(to: "user@a2.example", body: "gone?", id: "g1")
            let bounce = try await b["user@b1.example"]!.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "g1" }
            #expect(bounce.stanzaErrorCondition == "remote-server-not-found")
            try await b["user@b1.example"]!.sendMessage(to: "user@a1.example", body: "still here")
            #expect(try await receive(1, on: a["user@a1.example"]!) == ["still here"])
            #expect(await openLinks(pair.b).map(\.id) == [linkID].compactMap { $0 })
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A domain added at runtime uses the existing link")
    func addedDomainJoins() async throws {
        // The new domain gets a self-signed certificate on first use, which B cannot trust:
        // B verifies it with dialback.
        try await withFederation(aDomains: ["a1.example"], aUsers: ["user@a1.example"],
                                 bDomains: ["b1.example"], bUsers: ["user@b1.example"],
                                 configureA: { $0.tls.selfSignMissing = true },
                                 configureB: { $0.s2s.peers["a9.example"] = $0.s2s.peers["a1.example"] }) { pair in
            let a = try await clients(pair.a, ["user@a1.example"])
            let b = try await clients(pair.b, ["user@b1.example"])
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "first")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["first"])
            #expect(try await pair.a.context.storage.addDomain("a9.example"))
            try await pair.a.context.storage.createUser(try JID("user@a9.example"), credentials: try TestServer.credentials(password: TestServer.password))
            try await waitUntil { pair.a.context.domains.isHosted("a9.example") }
            let newcomer = try await clients(pair.a, ["user@a9.example"])
            try await newcomer["user@a9.example"]!.sendMessage(to: "user@b1.example", body: "new domain")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["new domain"])
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_opened_total") == 1)
            #expect(await pairs(pair.b).contains("inbound b1.example⇄a9.example dialback"))
            for client in Array(a.values) + Array(b.values) + Array(newcomer.values) { await client.close() }
        }
    }

    @Test("An expiring peer certificate resets the link; the next link re-proves every domain")
    func expiringCertificateResets() async throws {
        // A's clock is moved past B's certificate's expiry (an hour away) instead of waiting
        // for it; links are not idle-closed meanwhile.
        let offset = Mutex<TimeInterval>(0)
        let clock = WallClock { Date() + offset.withLock { $0 } }
        try await withFederation(bNotValidAfter: Date() + 3600, aClock: clock, configureA: { $0.s2s.idleTimeoutSeconds = 10_000_000 }) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: "bob@b.example", body: "before expiry")
            #expect(try await receive(1, on: bob) == ["before expiry"])
            #expect(await pairs(pair.a).contains("outbound a.example⇄b.example pkix"))
            // Everything sent was acknowledged first: two hours of silence would otherwise be
            // an acknowledgement timeout, which resets the link for another reason.
            try await waitUntil { await openLinks(pair.a).allSatisfy { $0.unacknowledged == 0 } }
            offset.withLock { $0 = 7200 }
            let federation = try #require(pair.a.server.federation)
            await federation.revalidate()
            #expect(pair.a.metrics.counterValue("braid_s2s_link_resets_total", [("reason", "proof-lapsed")]) == 1)
            // The peer read <reset/> on the wire (RFC 6120 §4.9.3.16), not just a closed socket.
            try await waitUntil { pair.b.metrics.counterValue("braid_stream_errors_received_total", [("condition", "reset"), ("stream", "s2s")]) == 1 }
            try await waitUntil { await openLinks(pair.a).isEmpty }
            // B's certificate has expired: the new link cannot use it; b.example rests on the
            // DNS that led A there (said as such, not as dialback, which A did not do for it;
            // issue 10, item 8), and messages still flow.
            try await alice.sendMessage(to: "bob@b.example", body: "after expiry")
            #expect(try await receive(1, on: bob) == ["after expiry"])
            #expect(await pairs(pair.a).contains("outbound a.example⇄b.example dns"))
            await alice.close()
            await bob.close()
        }
    }
}

/// OCSP on links (RFC 6120 §13.7.2.3): a real `openssl ocsp` responder says B's
/// certificate is revoked.
@Suite("Revoked peer certificates", .serialized, .enabled(if: OCSPResponderFixture.isAvailable))
struct RevocationTests {
    @Test("A revoked peer certificate resets the link; the next link does not rest on it")
    func revokedCertificateResets() async throws {
        // CI once saw openssl find the port taken ("Error starting accept"): another port then.
        try await OCSPResponderFixture.withResponderPort { ocspPort in
            try await withFederation(ocspPort: ocspPort, configureA: { $0.s2s.revalidationIntervalSeconds = 0.25 }) { pair in
                try await OCSPResponderFixture.with(port: ocspPort, issuer: pair.ca, states: [(pair.bCertificate, .revoked(reason: "keyCompromise"))]) { _ in
                    let (alice, _) = try await pair.a.loggedIn("alice@a.example")
                    let (bob, _) = try await pair.b.loggedIn("bob@b.example")
                    try await bob.sendPresence()
                    try await alice.sendMessage(to: "bob@b.example", body: "one")
                    _ = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }
                    // Whichever came first, the PKIX proof or the OCSP answer, nothing rests on the
                    // revoked certificate for long: either the link that did was reset, or the
                    // certificate was never a proof (b.example rests on the DNS that led A there,
                    // labelled so, as with dialback).
                    func outbound() async -> [ProofMethod] {
                        (await pair.a.server.federation?.links ?? []).filter { !$0.closed }.flatMap(\.pairs).filter { $0.direction == .outbound }.map(\.method)
                    }
                    do {
                        try await waitUntil(timeout: .seconds(10)) {
                            let methods = await outbound()
                            return pair.a.metrics.counterValue("braid_s2s_link_resets_total", [("reason", "revoked")]) == 1 || methods == [.dns]
                        }
                    } catch {
                        let links = await FederationLink.onLoops(pair.a.server.federation?.openLinks ?? []) {
                            "\($0.origin) next check \($0.nextRevocationCheck) pairs \($0.authorizations.map { "\($0.direction) \($0.method)" })"
                        }
                        func totals(_ server: TestServer) -> String {
                            ["braid_s2s_link_resets_total", "braid_stream_errors_sent_total", "braid_stream_errors_received_total", "braid_s2s_link_failures_total",
                             "braid_s2s_connections_opened_total", "braid_s2s_connections_accepted_total", "braid_s2s_ocsp_requests_total"]
                                .map { "\($0)=\(server.metrics.counterTotal($0))" }.joined(separator: " ")
                        }
                        Issue.record("outbound \(await outbound()), passes \(pair.a.metrics.counterValue("braid_s2s_revalidation_passes_total")), links \(links); A: \(totals(pair.a)); B: \(totals(pair.b))")
                        throw error
                    }
                    try await waitUntil { await !outbound().contains(.pkix) }
                    // Messages still flow.
                    try await alice.sendMessage(to: "bob@b.example", body: "two")
                    #expect(try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }.body == "two")
                    #expect(await outbound() == [.dns])
                    // The link that does not rest on the certificate stays up through further
                    // passes, which take the revoked answer from the cache: one request in all.
                    let link = try #require(pair.a.server.federation?.openLinks.first { $0.origin == .outgoing })
                    let passes = pair.a.metrics.counterValue("braid_s2s_revalidation_passes_total")
                    try await waitUntil { pair.a.metrics.counterValue("braid_s2s_revalidation_passes_total") >= passes + 3 }
                    #expect(pair.a.metrics.counterValue("braid_s2s_link_resets_total", [("reason", "revoked")]) <= 1)
                    #expect(await link.onLoop { $0.isClosed } == false)
                    #expect(pair.a.metrics.counterValue("braid_s2s_ocsp_requests_total") == 1)
                    await alice.close()
                    await bob.close()
                }
            }
        }
    }

    @Test("A good OCSP answer leaves the link alone, and is shared by the next link presenting the certificate")
    func goodCertificateStays() async throws {
        try await OCSPResponderFixture.withResponderPort { ocspPort in
            try await withFederation(ocspPort: ocspPort, configureA: { $0.s2s.revalidationIntervalSeconds = 0.25 }) { pair in
                try await OCSPResponderFixture.with(port: ocspPort, issuer: pair.ca, states: [(pair.bCertificate, .valid)]) { _ in
                    let (alice, _) = try await pair.a.loggedIn("alice@a.example")
                    let (bob, _) = try await pair.b.loggedIn("bob@b.example")
                    try await bob.sendPresence()
                    try await alice.sendMessage(to: "bob@b.example", body: "one")
                    _ = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }
                    let first = try #require(pair.a.server.federation?.openLinks.first)
                    // The check was answered "good": the next one is due at the answer's nextUpdate.
                    try await waitUntil { await first.onLoop { $0.nextRevocationCheck }.map { $0 > Date() + 60 } == true }
                    #expect(pair.a.metrics.counterValue("braid_s2s_ocsp_requests_total") == 1)
                    // Revalidation passes keep running (every 0.25 s) and leave the link alone.
                    let passes = pair.a.metrics.counterValue("braid_s2s_revalidation_passes_total")
                    try await waitUntil { pair.a.metrics.counterValue("braid_s2s_revalidation_passes_total") >= passes + 3 }
                    #expect(pair.a.metrics.counterValue("braid_s2s_link_resets_total", [("reason", "revoked")]) == 0)
                    #expect(pair.a.server.federation?.openLinks.first === first)
                    #expect(pair.a.metrics.counterValue("braid_s2s_ocsp_requests_total") == 1)

                    // A new link presenting the same certificate takes the cached answer (RFC 6960
                    // §2.4: good until nextUpdate) instead of asking the responder again.
                    first.closeStream()
                    try await waitUntil { pair.a.server.federation?.openLinks.contains { $0 === first } == false }
                    try await alice.sendMessage(to: "bob@b.example", body: "two")
                    #expect(try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }.body == "two")
                    let second = try #require(pair.a.server.federation?.openLinks.first { $0 !== first && $0.origin == .outgoing })
                    try await waitUntil { await second.onLoop { $0.nextRevocationCheck }.map { $0 > Date() + 60 } == true }
                    #expect(pair.a.metrics.counterValue("braid_s2s_ocsp_requests_total") == 1)
                    await alice.close()
                    await bob.close()
                }
            }
        }
    }
}


extension MultiplexingTests {
    @Test("Pairs set up at the same time from both sides share the link, and nothing is refused")
    func concurrentPairs() async throws {
        let aDomains = (1...4).map { "a\($0).example" }
        let bDomains = (1...4).map { "b\($0).example" }
        let aUsers = aDomains.map { "user@\($0)" }
        let bUsers = bDomains.map { "user@\($0)" }
        try await withFederation(aDomains: aDomains, aUsers: aUsers, bDomains: bDomains, bUsers: bUsers) { pair in
            let a = try await clients(pair.a, aUsers)
            let b = try await clients(pair.b, bUsers)
            // The link exists (A opened it for one pair)...
            try await a[aUsers[0]]!.sendMessage(to: bUsers[0], body: "first")
            #expect(try await receive(1, on: b[bUsers[0]]!) == ["first"])
            // ...then every other pair starts at once, both ways. B's stanzas for a pair that
            // A is asking for follow B's valid answer immediately: A must already count the
            // pair as authorised when they arrive (a refusal would close the link).
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (from, to, clients) in [(aUsers, bUsers, a), (bUsers, aUsers, b)] {
                    for sender in from {
                        let client = clients[sender]!
                        group.addTask {
                            for recipient in to where !(sender == aUsers[0] && recipient == bUsers[0]) {
                                try await client.sendMessage(to: recipient, body: "\(sender)→\(recipient)")
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            for bUser in bUsers {
                let expected = Set(aUsers.filter { !($0 == aUsers[0] && bUser == bUsers[0]) }.map { "\($0)→\(bUser)" })
                #expect(Set(try await receive(expected.count, on: b[bUser]!)) == expected)
            }
            for aUser in aUsers {
                #expect(Set(try await receive(bUsers.count, on: a[aUser]!)) == Set(bUsers.map { "\($0)→\(aUser)" }))
            }
            #expect(pair.a.metrics.counterValue("braid_s2s_security_violations_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_security_violations_total") == 0)
            #expect(pair.a.metrics.counterValue("braid_s2s_connections_opened_total") == 1)
            #expect(pair.b.metrics.counterValue("braid_s2s_connections_opened_total") == 0)
            #expect(await openLinks(pair.a).count == 1)
            #expect(await openLinks(pair.b).count == 1)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("When both providers connect at the same moment, one of the two links is closed and nothing is lost")
    func simultaneousOpen() async throws {
        let aDomains = ["a1.example", "a2.example"]
        let bDomains = ["b1.example", "b2.example"]
        let aUsers = aDomains.map { "user@\($0)" }
        let bUsers = bDomains.map { "user@\($0)" }
        try await withFederation(aDomains: aDomains, aUsers: aUsers, bDomains: bDomains, bUsers: bUsers) { pair in
            let a = try await clients(pair.a, aUsers)
            let b = try await clients(pair.b, bUsers)
            func everyoneWrites(_ round: String) async throws {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for (from, to, clients) in [(aUsers, bUsers, a), (bUsers, aUsers, b)] {
                        for sender in from {
                            let client = clients[sender]!
                            group.addTask {
                                for recipient in to { try await client.sendMessage(to: recipient, body: "\(round) \(sender)→\(recipient)") }
                            }
                        }
                    }
                    try await group.waitForAll()
                }
                for (users, peers, clients) in [(bUsers, aUsers, b), (aUsers, bUsers, a)] {
                    for user in users {
                        #expect(Set(try await receive(peers.count, on: clients[user]!)) == Set(peers.map { "\(round) \($0)→\(user)" }))
                    }
                }
            }
            try await everyoneWrites("cold")
            // Both may have connected; within a few seconds one link is left, the same one
            // seen from both sides.
            try await waitForOneLink(pair)
            let origins = (await openLinks(pair.a).first?.origin, await openLinks(pair.b).first?.origin)
            #expect(origins.0 != origins.1)
            try await everyoneWrites("warm")
            #expect(await openLinks(pair.a).count == 1)
            #expect(await openLinks(pair.b).count == 1)
            #expect(pair.a.metrics.counterValue("braid_s2s_security_violations_total") == 0)
            #expect(pair.b.metrics.counterValue("braid_s2s_security_violations_total") == 0)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A simultaneous open whose two links carry different domain pairs still ends on one link (the CI lab found two left after a1→b1 and b2→a2 opened at once)")
    func simultaneousOpenWithDisjointPairs() async throws {
        let aDomains = ["a1.example", "a2.example"]
        let bDomains = ["b1.example", "b2.example"]
        try await withFederation(aDomains: aDomains, aUsers: ["user@a1.example", "user@a2.example"], bDomains: bDomains, bUsers: ["user@b1.example", "user@b2.example"]) { pair in
            let a = try await clients(pair.a, ["user@a1.example", "user@a2.example"])
            let b = try await clients(pair.b, ["user@b1.example", "user@b2.example"])
            // Each side opens for a pair of its own, at the same moment.
            async let first: Void = a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "a1 to b1")
            async let second: Void = b["user@b2.example"]!.sendMessage(to: "user@a2.example", body: "b2 to a2")
            _ = try await (first, second)
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["a1 to b1"])
            #expect(try await receive(1, on: a["user@a2.example"]!) == ["b2 to a2"])
            try await waitForOneLink(pair, timeout: .seconds(15))
            // And both pairs still work, on it.
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "again")
            try await b["user@b2.example"]!.sendMessage(to: "user@a2.example", body: "again")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["again"])
            #expect(try await receive(1, on: a["user@a2.example"]!) == ["again"])
            #expect(await openLinks(pair.a).count == 1)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("Two links of ours to one server, opened at once for two of its domains, end as one, and both pairs keep working (the lab's cold start left two)")
    func ownDuplicateLinksToOneServer() async throws {
        let bUsers = ["user@b1.example", "user@b2.example"]
        try await withFederation(aDomains: ["a1.example"], aUsers: ["user@a1.example"], bDomains: ["b1.example", "b2.example"], bUsers: bUsers) { pair in
            let a = try await clients(pair.a, ["user@a1.example"])
            let b = try await clients(pair.b, bUsers)
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "first")
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["first"])
            // A second connection of ours, for b2.example, as a pair that connected at the
            // same moment would have opened before either knew both domains were one server's.
            let manager = try #require(pair.a.server.federation)
            guard case .targets(let targets) = await manager.locate("b2.example"), let target = targets.first else {
                Issue.record("b2.example did not resolve")
                return
            }
            _ = try await manager.open(target, pair: DomainPair(local: "a1.example", remote: "b2.example"))
            try await waitForOneLink(pair, timeout: .seconds(15))
            #expect(pair.a.metrics.counterValue("braid_s2s_link_resets_total", [("reason", "duplicate-own-link")]) == 1)
            // Both pairs work, on the one link.
            try await a["user@a1.example"]!.sendMessage(to: "user@b2.example", body: "second")
            try await a["user@a1.example"]!.sendMessage(to: "user@b1.example", body: "third")
            #expect(try await receive(1, on: b["user@b2.example"]!) == ["second"])
            #expect(try await receive(1, on: b["user@b1.example"]!) == ["third"])
            #expect(await openLinks(pair.a).count == 1)
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }

    @Test("A message sent without an id leaves with one, so a copy re-sent after a link is retired or lost is recognised by the peer (one with an id keeps it)")
    func messagesLeaveWithAnID() async throws {
        try await withFederation { pair in
            let a = try await clients(pair.a, ["alice@a.example"])
            let b = try await clients(pair.b, ["bob@b.example"])
            try await a["alice@a.example"]!.sendMessage(to: "bob@b.example", body: "no id")
            let stamped = try await b["bob@b.example"]!.waitFor { $0.name == "message" && $0.body == "no id" }
            #expect(stamped.attribute("id")?.hasPrefix("braid-") == true)
            try await a["alice@a.example"]!.sendMessage(to: "bob@b.example", body: "with id", id: "client-1")
            #expect(try await b["bob@b.example"]!.waitFor { $0.name == "message" && $0.body == "with id" }.attribute("id") == "client-1")
            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }
}
