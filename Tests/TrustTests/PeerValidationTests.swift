import Foundation
import Testing
import X509
@testable import Trust

@Suite("PKIX validation of s2s peers")
struct PeerValidationTests {
    static let ca = try! TestCertificateAuthority(commonName: "Peer Test CA")
    static let otherCA = try! TestCertificateAuthority(commonName: "Other CA")

    func chain(_ credentials: PEMCredentials) throws -> [Certificate] {
        try credentials.certificateChain()
    }

    func validator(peerRoots: [String: [Certificate]] = [:]) -> PeerCertificateValidator {
        PeerCertificateValidator(anchors: PeerTrustAnchors(defaultRoots: [Self.ca.certificate], peerRoots: peerRoots))
    }

    @Test("A CA-issued certificate naming the domain is valid until the earliest expiry in the chain")
    func valid() async throws {
        let expiry = Date() + 86_400 * 7
        let credentials = try Self.ca.issueXMPPServerCertificate(domains: ["peer.example"], notValidAfter: expiry)
        let result = await validator().validate(chain: try chain(credentials), for: "peer.example")
        guard case .success(let validated) = result else {
            Issue.record("not valid: \(result)")
            return
        }
        #expect(validated.match == .srvID)
        #expect(abs(validated.expires.timeIntervalSince(expiry)) < 2)
        #expect(validated.chain.count == 2)
    }

    @Test("A certificate in its last seconds is not relied on when a minimum lifetime is set")
    func minimumLifetime() async throws {
        let credentials = try Self.ca.issueXMPPServerCertificate(domains: ["peer.example"], notValidAfter: Date() + 5)
        var strict = validator()
        strict.minimumRemainingLifetime = 10
        guard case .failure(.untrusted(let reason)) = await strict.validate(chain: try chain(credentials), for: "peer.example") else {
            Issue.record("a certificate with 5 s left was accepted with a 10 s minimum")
            return
        }
        #expect(reason.contains("too soon"))
        guard case .success = await validator().validate(chain: try chain(credentials), for: "peer.example") else {
            Issue.record("without a minimum the certificate is still valid")
            return
        }
    }

    @Test("Another name, an expired certificate and an untrusted issuer all fail", arguments: ["name", "expired", "issuer", "empty"])
    func failures(kind: String) async throws {
        let result: Result<ValidatedPeerCertificate, PeerCertificateFailure>
        switch kind {
        case "name":
            result = await validator().validate(chain: try chain(Self.ca.issueXMPPServerCertificate(domains: ["other.example"])), for: "peer.example")
            #expect(result == .failure(.nameMismatch("peer.example")))
        case "expired":
            let expired = try Self.ca.issueXMPPServerCertificate(domains: ["peer.example"], notValidBefore: Date() - 86_400 * 30, notValidAfter: Date() - 60)
            result = await validator().validate(chain: try chain(expired), for: "peer.example")
            guard case .failure(.untrusted) = result else { Issue.record("expired accepted: \(result)"); return }
        case "issuer":
            result = await validator().validate(chain: try chain(Self.otherCA.issueXMPPServerCertificate(domains: ["peer.example"])), for: "peer.example")
            guard case .failure(.untrusted) = result else { Issue.record("untrusted issuer accepted: \(result)"); return }
        default:
            result = await validator().validate(chain: [], for: "peer.example")
            #expect(result == .failure(.noCertificate))
        }
    }

    @Test("Per-peer trust anchors replace the general store for that peer (RFC 6120 §13.6)")
    func perPeerAnchors() async throws {
        let pinned = validator(peerRoots: ["peer.example": [Self.otherCA.certificate]])
        // The general CA no longer vouches for peer.example ...
        let general = await pinned.validate(chain: try chain(Self.ca.issueXMPPServerCertificate(domains: ["peer.example"])), for: "peer.example")
        guard case .failure(.untrusted) = general else { Issue.record("general store used for a pinned peer: \(general)"); return }
        // ... only its own anchor does ...
        let own = await pinned.validate(chain: try chain(Self.otherCA.issueXMPPServerCertificate(domains: ["peer.example"])), for: "PEER.example")
        guard case .success = own else { Issue.record("pinned anchor refused: \(own)"); return }
        // ... and other peers keep the general store.
        let other = await pinned.validate(chain: try chain(Self.ca.issueXMPPServerCertificate(domains: ["else.example"])), for: "else.example")
        guard case .success = other else { Issue.record("general store lost for other peers: \(other)"); return }
    }

    @Test("Trust rules: a domain entry beats a pattern, the longest pattern wins, hosts match last; only PKIX unless allowed")
    func trustRules() {
        let exact = PeerTrustRule(name: "exact", domains: ["Customer.Example"], roots: [Self.otherCA.certificate])
        let broad = PeerTrustRule(name: "broad", patterns: ["*.provider.example"], roots: [Self.otherCA.certificate], allowedProofs: [.dane])
        let narrow = PeerTrustRule(name: "narrow", patterns: ["*.eu.provider.example"], roots: [Self.otherCA.certificate])
        let byHost = PeerTrustRule(name: "host", targetHosts: ["XMPP.Provider.Example."], roots: [Self.otherCA.certificate], allowedProofs: [.dialback])
        let anchors = PeerTrustAnchors(defaultRoots: [Self.ca.certificate], rules: [byHost, broad, narrow, exact])
        #expect(anchors.rule(for: "customer.example", targetHosts: ["xmpp.provider.example"])?.name == "exact")
        #expect(anchors.rule(for: "a.eu.provider.example")?.name == "narrow")
        #expect(anchors.rule(for: "x.y.provider.example")?.name == "broad")
        // A pattern covers subdomains, not the suffix itself.
        #expect(anchors.rule(for: "provider.example") == nil)
        #expect(anchors.rule(for: "shop.example", targetHosts: ["xmpp.provider.example"])?.name == "host")
        #expect(anchors.rule(for: "shop.example", targetHosts: ["other.example"]) == nil)
        #expect(anchors.rule(for: "shop.example") == nil)
        #expect(anchors.hasHostRules)
        #expect(anchors.roots(for: "shop.example") == [Self.ca.certificate])
        #expect(anchors.roots(for: "x.provider.example") == [Self.otherCA.certificate])
        // PKIX is always the way in; others only when listed.
        #expect(broad.permits(.pkix) && broad.permits(.dane) && !broad.permits(.posh) && !broad.permits(.dialback))
        #expect(byHost.permits(.dialback) && !byHost.permits(.dane))
        // The peerRoots shorthand is an exact rule with nothing else allowed.
        let shorthand = PeerTrustAnchors(defaultRoots: [], peerRoots: ["peer.example": [Self.otherCA.certificate]]).rule(for: "PEER.example")
        #expect(shorthand?.allowedProofs.isEmpty == true)
    }

    @Test("Server-auth-only, client-auth-only and no EKU are accepted; other purposes are not", arguments: [
        (TestCertificateAuthority.ExtendedKeyUsages.serverAuthOnly, true),
        (.clientAuthOnly, true),
        (.omitted, true),
        (.serverAndClientAuth, true),
    ])
    func extendedKeyUsage(usages: TestCertificateAuthority.ExtendedKeyUsages, accepted: Bool) async throws {
        let credentials = try Self.ca.issueXMPPServerCertificate(domains: ["peer.example"], extendedKeyUsages: usages)
        let result = await validator().validate(chain: try chain(credentials), for: "peer.example")
        if case .success = result { #expect(accepted) } else { #expect(!accepted, "\(usages): \(result)") }
    }

    @Test("The PKIX proof reports the method and expiry, or declines without a certificate")
    func pkixProof() async throws {
        let proof = PKIXProof(validator: validator())
        let credentials = try Self.ca.issueXMPPServerCertificate(domains: ["peer.example"])
        let outcome = await proof.prove("peer.example", evidence: PeerEvidence(certificateChain: try chain(credentials)))
        guard case .proven(.pkix, let expires) = outcome else { Issue.record("\(outcome)"); return }
        #expect(expires != nil)
        #expect(await proof.prove("peer.example", evidence: PeerEvidence(certificateChain: [])) == .notApplicable("no certificate"))
        guard case .notApplicable = await proof.prove("other.example", evidence: PeerEvidence(certificateChain: try chain(credentials))) else {
            Issue.record("mismatch proven")
            return
        }
    }
}

extension Result: @retroactive Equatable where Success == ValidatedPeerCertificate, Failure == PeerCertificateFailure {
    public static func == (lhs: Self, rhs: Self) -> Bool {
        switch (lhs, rhs) {
        case (.success(let a), .success(let b)): a == b
        case (.failure(let a), .failure(let b)): a == b
        default: false
        }
    }
}
