import Foundation
import Testing
import Trust
import XMPPCore
@testable import Federation
@testable import Server

/// Issue 10, item 3: a peer pinned to its own trust anchors is authenticated only by a chain
/// to them, on every path (SASL EXTERNAL, PKIX on an outgoing link, dialback both ways),
/// unless the operator allows more; pins by domain, by pattern and by server host.
@Suite("Trust pins over real federation", .serialized)
struct TrustPinTests {
    enum Pin: String, CaseIterable, CustomTestStringConvertible {
        /// `s2s.peers.b.example.trust_anchor_files`: another CA.
        case peerEntry
        /// `s2s.provider_trust` with the pattern `*.example`: another CA.
        case providerPattern
        /// `s2s.provider_trust` by the peer's server host (the static peer host): another CA.
        case providerHost
        /// The peer entry with another CA, and `allowed_proofs: [dialback]`.
        case peerEntryAllowingDialback
        /// A provider pattern pinned to the CA B's certificate really chains to.
        case providerPatternRightCA

        var testDescription: String { rawValue }

        /// Whether stanzas should flow, and by which method A authenticates B.
        var expected: String? {
            switch self {
            case .peerEntry, .providerPattern, .providerHost: nil
            case .peerEntryAllowingDialback: "dialback"
            case .providerPatternRightCA: "pkix"
            }
        }

        func apply(_ configuration: inout BraidConfiguration, otherCA: String) {
            let sharedCA = configuration.s2s.trustAnchorFiles
            switch self {
            case .peerEntry:
                configuration.s2s.peers["b.example"]?.trustAnchorFiles = [otherCA]
            case .providerPattern:
                configuration.s2s.providerTrust = [.init(domains: ["*.example"], trustAnchorFiles: [otherCA])]
            case .providerHost:
                configuration.s2s.providerTrust = [.init(targets: ["127.0.0.1"], trustAnchorFiles: [otherCA])]
            case .peerEntryAllowingDialback:
                configuration.s2s.peers["b.example"]?.trustAnchorFiles = [otherCA]
                configuration.s2s.peers["b.example"]?.allowedProofs = [.dialback]
            case .providerPatternRightCA:
                configuration.s2s.providerTrust = [.init(domains: ["*.example"], trustAnchorFiles: sharedCA)]
            }
        }
    }

    @Test("B's certificate chains to a CA A trusts globally; A pins b.example", arguments: Pin.allCases)
    func pinnedPeer(pin: Pin) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-pin-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let otherCA = "\(directory)/other-ca.pem"
        try TestCertificateAuthority().certificatePEM.write(toFile: otherCA, atomically: true, encoding: .utf8)

        try await withFederation(certificates: .trustedCA, configureA: { pin.apply(&$0, otherCA: otherCA) }) { pair in
            let (alice, aliceJID) = try await pair.a.loggedIn("alice@a.example")
            let (bob, bobJID) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            try await bob.sendPresence()
            // B → A: B connects to A. EXTERNAL must not be offered against the pin, and the
            // dialback B then tries must be refused unless the pin allows it.
            try await bob.sendMessage(to: aliceJID.description, body: "b to a", id: "ba")
            // A → B: A connects to B; B's server certificate must chain to the pin.
            try await alice.sendMessage(to: bobJID.description, body: "a to b", id: "ab")
            if let method = pin.expected {
                #expect(try await alice.waitFor(timeout: .seconds(10)) { $0.name == "message" }.body == "b to a")
                #expect(try await bob.waitFor(timeout: .seconds(10)) { $0.name == "message" }.body == "a to b")
                // With dialback allowed, B is proven by dialback on a link B opened, or, on the
                // bidirectional link A opened (A proved itself by dialback), labelled by what
                // reached it: DNS. Never PKIX against the pin.
                let inbound = (await pair.a.server.federation?.links ?? []).flatMap(\.pairs).filter { $0.direction == .inbound && $0.pair.remote == "b.example" }
                let accepted: Set<String> = method == "pkix" ? ["pkix"] : ["dialback", "dns"]
                #expect(!inbound.isEmpty && inbound.allSatisfy { accepted.contains($0.method.rawValue) }, "\(inbound.map(\.method.rawValue))")
            } else {
                let bounceToBob = try await bob.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "ba" }
                #expect(bounceToBob.attribute("type") == "error")
                let bounceToAlice = try await alice.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "ab" }
                #expect(bounceToAlice.attribute("type") == "error")
                #expect(bounceToAlice.stanzaErrorCondition == "remote-server-not-found")
                // Nothing from B was authorised on A.
                let inbound = (await pair.a.server.federation?.links ?? []).flatMap(\.pairs).filter { $0.direction == .inbound && $0.pair.remote == "b.example" }
                #expect(inbound.isEmpty)
                #expect(pair.a.metrics.counterValue("braid_s2s_certificate_required_refusals_total") >= 1)
                #expect(await alice.expectSilence(for: .milliseconds(300))?.name != "message")
            }
            await alice.close()
            await bob.close()
        }
    }
}
