import DNS
import Federation
import Foundation
import Testing
import TestSupport
import Trust
import X509

/// Certificates for the DANE lab, made once so that the zones can carry their TLSA records.
struct DANELabCertificates: Sendable {
    /// The certificate served at xmpp.a, e, xmpp1.m and the unsigned zone's host.
    let leaf: [Certificate]
    /// The certificate served at xmpp2.m.
    let second: [Certificate]
    /// A certificate nobody publishes.
    let stranger: [Certificate]

    init() throws {
        let ca = try TestCertificateAuthority(commonName: "DANE Lab CA")
        leaf = try ca.issueXMPPServerCertificate(domains: ["a.dane.braid.test"]).certificateChain()
        second = try ca.issueXMPPServerCertificate(domains: ["m.dane.braid.test"]).certificateChain()
        stranger = try ca.issueXMPPServerCertificate(domains: ["a.dane.braid.test"]).certificateChain()
    }

    func association(_ usage: UInt8, _ selector: UInt8, _ matchingType: UInt8, of chain: [Certificate]) throws -> TLSAAssociation {
        try TLSAAssociation(usage: usage, selector: selector, matchingType: matchingType, certificate: chain[0])
    }

    /// Zone-file presentation of a TLSA record's data (RFC 6698 §2.2).
    func rdata(_ association: TLSAAssociation) -> String {
        association.description
    }
}

// Made once per test process: the suite's zones are fixed when the suite is declared. A
// failure here is a broken test setup, not a test result.
let daneLab: DANELabCertificates = {
    do {
        return try DANELabCertificates()
    } catch {
        fatalError("cannot make the DANE lab certificates: \(error)")
    }
}()

/// The signed zone. a: SRV → xmpp.a with two TLSA records for the leaf (3 1 1 and 3 0 2,
/// TTL 120); b: SRV → xmpp.b without TLSA; c: SRV → a host in the unsigned zone; e: no SRV,
/// fallback e:5269 with TLSA; m: both services, one TLSA record per target.
func daneSignedZone() throws -> KnotFixture.Zone {
    let lab = daneLab
    return KnotFixture.Zone(name: "dane.braid.test", body: """
        _xmpp-server._tcp.a SRV 0 0 5269 xmpp.a
        xmpp.a A 127.0.0.10
        _5269._tcp.xmpp.a 120 TLSA \(lab.rdata(try lab.association(3, 1, 1, of: lab.leaf)))
        _5269._tcp.xmpp.a 120 TLSA \(lab.rdata(try lab.association(3, 0, 2, of: lab.leaf)))
        _xmpp-server._tcp.b SRV 0 0 5269 xmpp.b
        xmpp.b A 127.0.0.11
        _xmpp-server._tcp.c SRV 0 0 5269 host.plain-dane.braid.test.
        e A 127.0.0.30
        _5269._tcp.e TLSA \(lab.rdata(try lab.association(3, 1, 1, of: lab.leaf)))
        _xmpps-server._tcp.m SRV 0 0 5270 xmpp1.m
        _xmpp-server._tcp.m SRV 0 0 5269 xmpp2.m
        xmpp1.m A 127.0.0.20
        xmpp2.m A 127.0.0.21
        _5270._tcp.xmpp1.m TLSA \(lab.rdata(try lab.association(3, 1, 1, of: lab.leaf)))
        _5269._tcp.xmpp2.m TLSA \(lab.rdata(try lab.association(3, 1, 2, of: lab.second)))
        """, signed: true)
}

/// The same kind of records in a zone outside every trust anchor.
func daneUnsignedZone() throws -> KnotFixture.Zone {
    let lab = daneLab
    return KnotFixture.Zone(name: "plain-dane.braid.test", body: """
        _xmpp-server._tcp SRV 0 0 5269 host
        host A 127.0.0.50
        _5269._tcp.host TLSA \(lab.rdata(try lab.association(3, 1, 1, of: lab.leaf)))
        """, signed: false)
}

func daneZones() -> [KnotFixture.Zone] {
    do {
        return [try daneSignedZone(), try daneUnsignedZone()]
    } catch {
        fatalError("cannot build the DANE lab zones: \(error)")
    }
}

@Suite("DNS-backed DANE records against a signed knot zone (RFC 7673 §3)", .serialized, .enabled(if: KnotFixture.isAvailable), .knot(daneZones()))
struct DNSDANESourceTests {
    static let zone = "dane.braid.test"

    var knot: KnotFixture {
        get throws { try #require(KnotFixture.current) }
    }

    /// A resolver asking knot directly for both zones; resolv.conf points at a closed port so
    /// nothing leaves the machine.
    func withSource<T: Sendable>(
        trustAnchors: [String]? = nil,
        overrides: [String: [StaticTarget]] = [:],
        _ body: (DNSDANESource) async throws -> T
    ) async throws -> T {
        let knot = try self.knot
        let anchors = try trustAnchors ?? [knot.ds(for: Self.zone)]
        let resolvConf = knot.directory + "/resolv.conf"
        try "nameserver 127.0.0.1\n".write(toFile: resolvConf, atomically: true, encoding: .utf8)
        let resolver = try UnboundResolver(configuration: .init(
            resolvConf: resolvConf,
            stubZones: [(zone: Self.zone, addresses: [knot.address]), (zone: "plain-dane.braid.test", addresses: [knot.address])],
            trustAnchors: anchors,
            timeout: .seconds(10)
        ))
        let source = DNSDANESource(locator: XMPPServiceLocator(resolver: resolver, overrides: overrides))
        do {
            let result = try await body(source)
            await resolver.shutdown()
            return result
        } catch {
            await resolver.shutdown()
            throw error
        }
    }

    func target(_ host: String, _ port: Int = 5269) -> ServerTarget {
        ServerTarget(host: host, port: port)
    }

    func secure(_ lookup: DANELookup) -> (associations: Set<TLSAAssociation>, expires: Date)? {
        if case .secure(let associations, let expires) = lookup { return (Set(associations), expires) }
        return nil
    }

    func isBogus(_ lookup: DANELookup) -> Bool {
        if case .bogus = lookup { return true }
        return false
    }

    @Test("A secure SRV target with secure addresses and TLSA: its records, until the smallest TTL")
    func secureTarget() async throws {
        let lab = daneLab
        try await withSource { source in
            let started = Date()
            let lookup = await source.associations(for: "a.dane.braid.test", target: target("xmpp.a.dane.braid.test"))
            let found = try #require(secure(lookup), "\(lookup)")
            #expect(found.associations == [try lab.association(3, 1, 1, of: lab.leaf), try lab.association(3, 0, 2, of: lab.leaf)])
            // SRV and A have TTL 300, the TLSA records 120.
            let lifetime = found.expires.timeIntervalSince(started)
            #expect(lifetime > 100 && lifetime <= 121, "lifetime \(lifetime)")

            // Names are compared in canonical form.
            let shouted = await source.associations(for: "A.dane.braid.test.", target: target("XMPP.a.dane.braid.test."))
            #expect(secure(shouted)?.associations == found.associations, "\(shouted)")
        }
    }

    @Test("A target the domain's SRV does not list gets nothing, even if it has TLSA records")
    func unlistedTarget() async throws {
        try await withSource { source in
            #expect(await source.associations(for: "a.dane.braid.test", target: target("xmpp1.m.dane.braid.test", 5270)) == .none)
            #expect(await source.associations(for: "a.dane.braid.test", target: target("xmpp.a.dane.braid.test", 5270)) == .none)
            #expect(await source.associations(for: "b.dane.braid.test", target: target("xmpp.a.dane.braid.test")) == .none)
        }
    }

    @Test("No TLSA, an insecure address, an unsigned zone, a static override: DANE does not apply")
    func notApplicable() async throws {
        try await withSource(overrides: ["a.dane.braid.test": [StaticTarget(host: "xmpp.a.dane.braid.test")]]) { source in
            #expect(await source.associations(for: "b.dane.braid.test", target: target("xmpp.b.dane.braid.test")) == .none)
            #expect(await source.associations(for: "b.dane.braid.test", target: nil) == .none)
            // RFC 7673 §3.2: the SRV is secure but the target's address is not.
            #expect(await source.associations(for: "c.dane.braid.test", target: target("host.plain-dane.braid.test")) == .none)
            // The whole zone is outside the trust anchor, although it publishes TLSA.
            #expect(await source.associations(for: "plain-dane.braid.test", target: target("host.plain-dane.braid.test")) == .none)
            #expect(await source.associations(for: "plain-dane.braid.test", target: nil) == .none)
            // Configured targets are not DNS-authenticated.
            #expect(await source.associations(for: "a.dane.braid.test", target: target("xmpp.a.dane.braid.test")) == .none)
            // A name that does not exist.
            #expect(await source.associations(for: "nowhere.dane.braid.test", target: target("nowhere.dane.braid.test")) == .none)
        }
    }

    @Test("No SRV records, securely denied: the RFC 6120 fallback target carries DANE")
    func fallbackTarget() async throws {
        let lab = daneLab
        try await withSource { source in
            let lookup = await source.associations(for: "e.dane.braid.test", target: target("e.dane.braid.test"))
            let expected: Set<TLSAAssociation> = [try lab.association(3, 1, 1, of: lab.leaf)]
            #expect(secure(lookup)?.associations == expected, "\(lookup)")
        }
    }

    @Test("Incoming: the union of every secure target's records")
    func incomingUnion() async throws {
        let lab = daneLab
        try await withSource { source in
            let lookup = await source.associations(for: "m.dane.braid.test", target: nil)
            let found = try #require(secure(lookup), "\(lookup)")
            #expect(found.associations == [try lab.association(3, 1, 1, of: lab.leaf), try lab.association(3, 1, 2, of: lab.second)])
            let lifetime = found.expires.timeIntervalSinceNow
            #expect(lifetime > 250 && lifetime <= 301, "lifetime \(lifetime)")
        }
    }

    @Test("A trust anchor that matches no key makes every answer bogus: fail closed")
    func wrongAnchor() async throws {
        let ds = try knot.ds(for: Self.zone)
        let last = try #require(ds.last)
        let wrong = String(ds.dropLast()) + (last == "0" ? "1" : "0")
        try await withSource(trustAnchors: [wrong]) { source in
            let outgoing = await source.associations(for: "a.dane.braid.test", target: target("xmpp.a.dane.braid.test"))
            #expect(isBogus(outgoing), "\(outgoing)")
            let incoming = await source.associations(for: "m.dane.braid.test", target: nil)
            #expect(isBogus(incoming), "\(incoming)")
            // Outside the (wrong) anchor nothing changes: insecure, so no DANE.
            #expect(await source.associations(for: "plain-dane.braid.test", target: target("host.plain-dane.braid.test")) == .none)
        }
    }

    @Test("End to end: DANEProof over real DNS proves the served certificate and refutes another")
    func endToEnd() async throws {
        let lab = daneLab
        try await withSource { source in
            // No PKIX roots at all: only DANE can prove anything here.
            let proof = DANEProof(source: source, validator: PeerCertificateValidator(anchors: PeerTrustAnchors(defaultRoots: [])))
            let connected = target("xmpp.a.dane.braid.test")
            let served = await proof.prove("a.dane.braid.test", evidence: PeerEvidence(certificateChain: lab.leaf, connectedTarget: connected))
            guard case .proven(.dane, let expires?) = served else {
                Issue.record("expected proven, got \(served)")
                return
            }
            #expect(expires.timeIntervalSinceNow <= 121)

            let impostor = await proof.prove("a.dane.braid.test", evidence: PeerEvidence(certificateChain: lab.stranger, connectedTarget: connected))
            guard case .refuted = impostor else {
                Issue.record("expected refuted, got \(impostor)")
                return
            }

            // Incoming: both of m's server certificates authenticate it as a client.
            for chain in [lab.leaf, lab.second] {
                let outcome = await proof.prove("m.dane.braid.test", evidence: PeerEvidence(certificateChain: chain, connectedTarget: nil))
                guard case .proven(.dane, _) = outcome else {
                    Issue.record("expected proven incoming, got \(outcome)")
                    return
                }
            }
            let stranger = await proof.prove("m.dane.braid.test", evidence: PeerEvidence(certificateChain: lab.stranger, connectedTarget: nil))
            guard case .notApplicable = stranger else {
                Issue.record("an unknown client certificate is not proven: \(stranger)")
                return
            }
            // No DANE for b: another prooftype must decide.
            let none = await proof.prove("b.dane.braid.test", evidence: PeerEvidence(certificateChain: lab.leaf, connectedTarget: target("xmpp.b.dane.braid.test")))
            guard case .notApplicable = none else {
                Issue.record("expected not applicable, got \(none)")
                return
            }
        }
    }
}
