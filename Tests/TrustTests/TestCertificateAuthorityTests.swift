import Foundation
import Testing
import Trust
@_spi(FixedExpiryValidationTime) import X509

@Suite("Test certificate authority")
struct TestCertificateAuthorityTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    static func verify(_ leaf: Certificate, root: Certificate, at time: Date) async -> Bool {
        var verifier = Verifier(rootCertificates: CertificateStore([root])) {
            RFC5280Policy(fixedExpiryValidationTime: time)
        }
        switch await verifier.validate(leaf: leaf, intermediates: CertificateStore()) {
        case .validCertificate: return true
        case .couldNotValidate: return false
        }
    }

    @Test("The CA is a P-256 root that may sign certificates")
    func authorityProfile() throws {
        let authority = try TestCertificateAuthority(commonName: "Lab CA", now: Self.now, validityDays: 10)
        let root = authority.certificate
        #expect(root.subject.description == "CN=Lab CA")
        #expect(root.issuer == root.subject)
        #expect(try root.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: nil))
        #expect(try root.extensions.keyUsage == KeyUsage(keyCertSign: true, cRLSign: true))
        #expect(root.notValidBefore == Self.now - 86_400)
        #expect(root.notValidAfter == Self.now + 10 * 86_400)
        #expect(try Certificate(pemEncoded: authority.certificatePEM) == root)
    }

    @Test("A leaf carries exactly the requested identifiers and chains to the CA")
    func leafWithChosenNames() async throws {
        let authority = try TestCertificateAuthority(now: Self.now)
        let credentials = try authority.issue(
            commonName: "leaf.example",
            dnsIDs: ["leaf.example", "*.leaf.example"],
            srvIDs: ["_xmpp-server.leaf.example"],
            xmppAddrs: ["leaf.example"],
            notValidBefore: Self.now - 60,
            notValidAfter: Self.now + 86_400)
        let leaf = try credentials.leafCertificate()
        #expect(try SANEntry.entries(of: leaf) == [
            .dns("leaf.example"), .dns("*.leaf.example"), .srv("_xmpp-server.leaf.example"), .xmppAddr("leaf.example"),
        ])
        #expect(leaf.issuer == authority.certificate.subject)
        #expect(leaf.subject.description == "CN=leaf.example")
        #expect(try leaf.extensions.authorityKeyIdentifier?.keyIdentifier == authority.certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
        #expect(try leaf.extensions.basicConstraints == .notCertificateAuthority)
        #expect(try leaf.extensions.keyUsage == KeyUsage(digitalSignature: true))
        #expect(try leaf.extensions.extendedKeyUsage == ExtendedKeyUsage([.serverAuth, .clientAuth]))
        #expect(leaf.notValidBefore == Self.now - 60)
        #expect(leaf.notValidAfter == Self.now + 86_400)
        #expect(try credentials.certificateChain().count == 1)
        #expect(await Self.verify(leaf, root: authority.certificate, at: Self.now))
    }

    @Test("An already expired leaf is issued and then refused by an RFC 5280 verifier")
    func expiredLeaf() async throws {
        // The CA must be valid over the leaf's whole lifetime for the second check.
        let authority = try TestCertificateAuthority(now: Self.now - 30 * 86_400)
        let credentials = try authority.issue(
            commonName: "old.example", dnsIDs: ["old.example"],
            notValidBefore: Self.now - 10 * 86_400, notValidAfter: Self.now - 86_400)
        let leaf = try credentials.leafCertificate()
        #expect(leaf.notValidAfter == Self.now - 86_400)
        #expect(await Self.verify(leaf, root: authority.certificate, at: Self.now) == false)
        #expect(await Self.verify(leaf, root: authority.certificate, at: Self.now - 2 * 86_400))
    }

    @Test("Extended key usage can be serverAuth only, clientAuth only or absent")
    func extendedKeyUsageOptions() throws {
        let authority = try TestCertificateAuthority(now: Self.now)
        let serverOnly = try authority.issue(dnsIDs: ["a.example"], extendedKeyUsages: .serverAuthOnly).leafCertificate()
        let clientOnly = try authority.issue(dnsIDs: ["a.example"], extendedKeyUsages: .clientAuthOnly).leafCertificate()
        let omitted = try authority.issue(dnsIDs: ["a.example"], extendedKeyUsages: .omitted).leafCertificate()
        #expect(try serverOnly.extensions.extendedKeyUsage == ExtendedKeyUsage([.serverAuth]))
        #expect(try clientOnly.extensions.extendedKeyUsage == ExtendedKeyUsage([.clientAuth]))
        #expect(try omitted.extensions.extendedKeyUsage == nil)
    }

    @Test("A leaf without a subject has a critical subjectAltName extension")
    func emptySubject() throws {
        let authority = try TestCertificateAuthority(now: Self.now)
        let leaf = try authority.issue(dnsIDs: ["a.example"]).leafCertificate()
        #expect(leaf.subject.isEmpty)
        #expect(leaf.extensions[oid: .X509ExtensionID.subjectAlternativeName]?.critical == true)
    }

    @Test("An XMPP server certificate from the CA has the same identifiers as a self-signed one")
    func xmppServerCertificate() throws {
        let authority = try TestCertificateAuthority(now: Self.now)
        let credentials = try authority.issueXMPPServerCertificate(domains: ["münchen.example"], extendedKeyUsages: .serverAuthOnly)
        let leaf = try credentials.leafCertificate()
        #expect(try Set(SANEntry.entries(of: leaf)) == [
            .dns("xn--mnchen-3ya.example"),
            .srv("_xmpp-server.xn--mnchen-3ya.example"),
            .srv("_xmpp-client.xn--mnchen-3ya.example"),
            .xmppAddr("münchen.example"),
        ])
        #expect(try leaf.extensions.extendedKeyUsage == ExtendedKeyUsage([.serverAuth]))
        #expect(leaf.subject.description == "CN=xn--mnchen-3ya.example")
    }
}
