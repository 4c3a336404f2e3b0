import Foundation
import Testing
import Trust
import X509

/// One row of the matching table: what the certificate presents, what we look for, and the
/// expected outcome.
struct MatchCase: Sendable, CustomTestStringConvertible {
    var name: String
    var commonName: String? = nil
    var dnsIDs: [String] = []
    var srvIDs: [String] = []
    var xmppAddrs: [String] = []
    var reference: String
    var service: CertificateIdentity.Service = .xmppServer
    var expected: CertificateIdentity.Match?

    var testDescription: String { name }
}

@Suite("Certificate identity")
struct CertificateIdentityTests {
    static let table: [MatchCase] = [
        // DNS-ID, exact.
        MatchCase(name: "exact DNS-ID", dnsIDs: ["example.com"], reference: "example.com", expected: .dnsID),
        MatchCase(name: "DNS-ID is valid for c2s too", dnsIDs: ["example.com"], reference: "example.com", service: .xmppClient, expected: .dnsID),
        MatchCase(name: "DNS-ID compares ASCII case-insensitively", dnsIDs: ["Example.COM"], reference: "EXAMPLE.com", expected: .dnsID),
        MatchCase(name: "presented trailing dot is ignored", dnsIDs: ["example.com."], reference: "example.com", expected: .dnsID),
        MatchCase(name: "different domain", dnsIDs: ["example.com"], reference: "example.org", expected: nil),
        MatchCase(name: "suffix is not a match", dnsIDs: ["example.com"], reference: "notexample.com", expected: nil),
        MatchCase(name: "parent is not a match", dnsIDs: ["example.com"], reference: "chat.example.com", expected: nil),
        MatchCase(name: "IDN DNS-ID, U-label reference", dnsIDs: ["xn--mnchen-3ya.example"], reference: "münchen.example", expected: .dnsID),
        MatchCase(name: "IDN DNS-ID, A-label reference", dnsIDs: ["xn--mnchen-3ya.example"], reference: "xn--mnchen-3ya.example", expected: .dnsID),
        MatchCase(name: "IDN DNS-ID, upper-case U-label reference", dnsIDs: ["xn--mnchen-3ya.example"], reference: "MÜNCHEN.example", expected: .dnsID),
        MatchCase(name: "IP reference never matches a DNS-ID", dnsIDs: ["192.0.2.1"], reference: "192.0.2.1", expected: nil),
        MatchCase(name: "invalid reference matches nothing", dnsIDs: ["example.com"], reference: "exa mple.com", expected: nil),
        // Wildcards.
        MatchCase(name: "wildcard matches one label", dnsIDs: ["*.example.com"], reference: "chat.example.com", expected: .dnsID),
        MatchCase(name: "wildcard ignores case", dnsIDs: ["*.EXAMPLE.com"], reference: "Chat.Example.COM", expected: .dnsID),
        MatchCase(name: "wildcard does not match two labels", dnsIDs: ["*.example.com"], reference: "a.b.example.com", expected: nil),
        MatchCase(name: "wildcard does not match the apex", dnsIDs: ["*.example.com"], reference: "example.com", expected: nil),
        MatchCase(name: "partial wildcard f* is ignored", dnsIDs: ["f*.example.com"], reference: "foo.example.com", expected: nil),
        MatchCase(name: "partial wildcard *oo is ignored", dnsIDs: ["*oo.example.com"], reference: "foo.example.com", expected: nil),
        MatchCase(name: "wildcard over a single label (*.com) is ignored", dnsIDs: ["*.com"], reference: "example.com", expected: nil),
        MatchCase(name: "two wildcards are ignored", dnsIDs: ["*.*.example.com"], reference: "a.b.example.com", expected: nil),
        MatchCase(name: "wildcard not left-most is ignored", dnsIDs: ["chat.*.example.com"], reference: "chat.x.example.com", expected: nil),
        MatchCase(name: "wildcard inside an A-label is ignored", dnsIDs: ["xn--*.example.com"], reference: "xn--mnchen-3ya.example.com", expected: nil),
        MatchCase(name: "wildcard may stand for an IDN label", dnsIDs: ["*.example.com"], reference: "münchen.example.com", expected: .dnsID),
        MatchCase(name: "wildcard over an IDN parent", dnsIDs: ["*.xn--mnchen-3ya.example"], reference: "chat.münchen.example", expected: .dnsID),
        // SRV-ID.
        MatchCase(name: "_xmpp-server SRV-ID for s2s", srvIDs: ["_xmpp-server.example.com"], reference: "example.com", service: .xmppServer, expected: .srvID),
        MatchCase(name: "_xmpp-server SRV-ID is not valid for c2s", srvIDs: ["_xmpp-server.example.com"], reference: "example.com", service: .xmppClient, expected: nil),
        MatchCase(name: "_xmpp-client SRV-ID for c2s", srvIDs: ["_xmpp-client.example.com"], reference: "example.com", service: .xmppClient, expected: .srvID),
        MatchCase(name: "_xmpp-client SRV-ID is not valid for s2s", srvIDs: ["_xmpp-client.example.com"], reference: "example.com", service: .xmppServer, expected: nil),
        MatchCase(name: "SRV-ID compares case-insensitively", srvIDs: ["_XMPP-Server.Example.COM"], reference: "example.COM", expected: .srvID),
        MatchCase(name: "SRV-ID for another domain", srvIDs: ["_xmpp-server.other.example"], reference: "example.com", expected: nil),
        MatchCase(name: "SRV-ID for another service", srvIDs: ["_imap.example.com"], reference: "example.com", expected: nil),
        MatchCase(name: "SRV-ID never takes a wildcard", srvIDs: ["_xmpp-server.*.example.com"], reference: "chat.example.com", expected: nil),
        MatchCase(name: "IDN SRV-ID, U-label reference", srvIDs: ["_xmpp-server.xn--mnchen-3ya.example"], reference: "münchen.example", expected: .srvID),
        MatchCase(name: "SRV-ID is preferred over DNS-ID", dnsIDs: ["example.com"], srvIDs: ["_xmpp-server.example.com"], reference: "example.com", expected: .srvID),
        MatchCase(name: "DNS-ID still counts when the SRV-ID is for the other service", dnsIDs: ["example.com"], srvIDs: ["_xmpp-client.example.com"], reference: "example.com", expected: .dnsID),
        // XmppAddr.
        MatchCase(name: "XmppAddr U-label, A-label reference", xmppAddrs: ["münchen.example"], reference: "xn--mnchen-3ya.example", expected: .xmppAddr),
        MatchCase(name: "XmppAddr U-label, U-label reference", xmppAddrs: ["münchen.example"], reference: "münchen.example", expected: .xmppAddr),
        MatchCase(name: "XmppAddr, upper-case reference", xmppAddrs: ["münchen.example"], reference: "MÜNCHEN.EXAMPLE", expected: .xmppAddr),
        MatchCase(name: "XmppAddr holding an A-label", xmppAddrs: ["xn--mnchen-3ya.example"], reference: "münchen.example", expected: .xmppAddr),
        MatchCase(name: "XmppAddr is valid for c2s too", xmppAddrs: ["example.com"], reference: "example.com", service: .xmppClient, expected: .xmppAddr),
        MatchCase(name: "XmppAddr never takes a wildcard", xmppAddrs: ["*.example.com"], reference: "chat.example.com", expected: nil),
        MatchCase(name: "XmppAddr of a user does not vouch for the domain", xmppAddrs: ["user@example.com"], reference: "example.com", expected: nil),
        MatchCase(name: "DNS-ID is preferred over XmppAddr", dnsIDs: ["example.com"], xmppAddrs: ["example.com"], reference: "example.com", expected: .dnsID),
        // CN-ID is gone (RFC 9525).
        MatchCase(name: "CN only never matches", commonName: "example.com", reference: "example.com", expected: nil),
        MatchCase(name: "CN is ignored beside other SANs", commonName: "example.com", dnsIDs: ["other.example"], reference: "example.com", expected: nil),
    ]

    @Test("Matching a reference domain against presented identifiers", arguments: table)
    func matching(_ row: MatchCase) throws {
        let credentials = try TestCertificateAuthority().issue(
            commonName: row.commonName, dnsIDs: row.dnsIDs, srvIDs: row.srvIDs, xmppAddrs: row.xmppAddrs)
        let identity = try CertificateIdentity(certificate: credentials.leafCertificate())
        #expect(identity.matches(domain: row.reference, service: row.service) == row.expected)
    }

    @Test("The identity lists what the certificate presents")
    func listsPresentedIdentifiers() throws {
        let credentials = try TestCertificateAuthority().issue(
            commonName: "cn.example",
            dnsIDs: ["Example.COM.", "*.example.com"],
            srvIDs: ["_xmpp-server.example.com", "_XMPP-Client.Example.NET", "no-underscore.example"],
            xmppAddrs: ["münchen.example", "user@example.com"])
        let identity = try CertificateIdentity(certificate: credentials.leafCertificate())
        #expect(identity.dnsIDs == ["example.com", "*.example.com"])
        #expect(identity.srvIDs == [
            CertificateIdentity.SRVID(service: "xmpp-server", domain: "example.com"),
            CertificateIdentity.SRVID(service: "xmpp-client", domain: "example.net"),
        ])
        #expect(identity.srvIDs.map(\.description) == ["_xmpp-server.example.com", "_xmpp-client.example.net"])
        #expect(identity.xmppAddrs == ["münchen.example", "user@example.com"])
        #expect(identity.commonNames == ["cn.example"])
    }

    @Test("allDomains lists every exactly named domain in U-label form, without wildcards")
    func allDomains() throws {
        let credentials = try TestCertificateAuthority().issue(
            dnsIDs: ["*.example.com", "a.example", "xn--mnchen-3ya.example", "f*.example.org"],
            srvIDs: ["_xmpp-client.c.example", "_xmpp-server.s.example", "_imap.d.example"],
            xmppAddrs: ["b.example", "user@e.example", "*.x.example"])
        let identity = try CertificateIdentity(certificate: credentials.leafCertificate())
        #expect(identity.allDomains == ["a.example", "münchen.example", "c.example", "s.example", "b.example"])
        #expect(identity.domains(for: .xmppServer) == ["a.example", "münchen.example", "s.example", "b.example"])
        #expect(identity.domains(for: .xmppClient) == ["a.example", "münchen.example", "c.example", "b.example"])
    }

    @Test("allDomains of a self-signed certificate is the list it was made for")
    func allDomainsOfSelfSigned() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["example.com", "XN--MNCHEN-3YA.example"])
        let identity = try CertificateIdentity(certificate: credentials.leafCertificate())
        #expect(identity.allDomains == ["example.com", "münchen.example"])
        #expect(identity.matches(domain: "münchen.example", service: .xmppServer) == .srvID)
        #expect(identity.matches(domain: "example.com", service: .xmppClient) == .srvID)
    }

    @Test("A certificate made by OpenSSL reads the same way, and its CN is never used")
    func opensslCertificate() throws {
        let identity = try CertificateIdentity(derEncoded: Fixtures.der(Fixtures.opensslXMPP))
        #expect(identity.dnsIDs == ["openssl.example", "*.wild.example"])
        #expect(identity.srvIDs == [
            CertificateIdentity.SRVID(service: "xmpp-server", domain: "srv-only.example"),
            CertificateIdentity.SRVID(service: "xmpp-client", domain: "client-only.example"),
        ])
        #expect(identity.xmppAddrs == ["münchen.example"])
        #expect(identity.commonNames == ["legacy-cn.example"])
        #expect(identity.matches(domain: "legacy-cn.example", service: .xmppServer) == nil)
        #expect(identity.matches(domain: "srv-only.example", service: .xmppServer) == .srvID)
        #expect(identity.matches(domain: "client-only.example", service: .xmppServer) == nil)
        #expect(identity.matches(domain: "chat.wild.example", service: .xmppServer) == .dnsID)
        #expect(identity.matches(domain: "xn--mnchen-3ya.example", service: .xmppServer) == .xmppAddr)
        #expect(identity.matches(domain: "192.0.2.7", service: .xmppServer) == nil)
        #expect(identity.allDomains == ["openssl.example", "srv-only.example", "client-only.example", "münchen.example"])
    }

    @Test("A certificate with only a CN presents no identifier at all")
    func commonNameOnlyCertificate() throws {
        let identity = try CertificateIdentity(derEncoded: Fixtures.der(Fixtures.opensslCNOnly))
        #expect(identity.dnsIDs.isEmpty)
        #expect(identity.srvIDs.isEmpty)
        #expect(identity.xmppAddrs.isEmpty)
        #expect(identity.commonNames == ["cn-only.example"])
        #expect(identity.matches(domain: "cn-only.example", service: .xmppServer) == nil)
        #expect(identity.matches(domain: "cn-only.example", service: .xmppClient) == nil)
        #expect(identity.allDomains.isEmpty)
    }

    @Test("Identities built from DER and from a parsed certificate are equal")
    func derAndCertificateAgree() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["example.com"])
        let certificate = try credentials.leafCertificate()
        let fromDER = try CertificateIdentity(derEncoded: Fixtures.der(credentials.certificateChainPEM))
        #expect(try CertificateIdentity(certificate: certificate) == fromDER)
        #expect(throws: (any Error).self) { try CertificateIdentity(derEncoded: [0x30, 0x03, 0x02, 0x01]) }
    }
}
