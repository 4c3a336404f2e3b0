import Foundation
import Testing
import Trust
import X509

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@Suite("Self-signed certificates")
struct SelfSignedCertificateTests {
    /// A whole second, because X.509 times have second precision.
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    @Test("A certificate for two domains carries DNS-ID, both SRV-IDs and XmppAddr for each, and nothing else")
    func subjectAltNamesForTwoDomains() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["example.com", "münchen.example"], now: Self.now)
        let certificate = try Certificate(pemEncoded: credentials.certificateChainPEM)
        #expect(try SANEntry.entries(of: certificate) == [
            .dns("example.com"),
            .srv("_xmpp-server.example.com"),
            .srv("_xmpp-client.example.com"),
            .xmppAddr("example.com"),
            .dns("xn--mnchen-3ya.example"),
            .srv("_xmpp-server.xn--mnchen-3ya.example"),
            .srv("_xmpp-client.xn--mnchen-3ya.example"),
            .xmppAddr("münchen.example"),
        ])
        // The XmppAddr really is UTF-8 on the wire: "m", U+00FC as C3 BC, "nchen.example".
        #expect(try SANEntry.xmppAddrBytes(of: certificate)[1] == [0x6D, 0xC3, 0xBC] + Array("nchen.example".utf8))
    }

    @Test("Domains given as A-labels, in upper case or twice give the canonical identifiers once")
    func domainsAreCanonicalised() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["XN--MNCHEN-3YA.Example.", "münchen.example"], now: Self.now)
        let certificate = try Certificate(pemEncoded: credentials.certificateChainPEM)
        #expect(try SANEntry.entries(of: certificate) == [
            .dns("xn--mnchen-3ya.example"),
            .srv("_xmpp-server.xn--mnchen-3ya.example"),
            .srv("_xmpp-client.xn--mnchen-3ya.example"),
            .xmppAddr("münchen.example"),
        ])
        #expect(certificate.subject.description == "CN=xn--mnchen-3ya.example")
    }

    @Test("The profile is a P-256 end entity for server and client auth without key usage, named after the first domain")
    func certificateProfile() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["example.com", "example.net"], validityDays: 30, now: Self.now)
        let certificate = try Certificate(pemEncoded: credentials.certificateChainPEM)
        #expect(certificate.subject.description == "CN=example.com")
        #expect(certificate.issuer == certificate.subject)
        #expect(certificate.version == .v3)
        #expect(certificate.signatureAlgorithm == .ecdsaWithSHA256)
        #expect(certificate.notValidBefore == Self.now - 3600)
        #expect(certificate.notValidAfter == Self.now + 30 * 86_400)
        #expect(try certificate.extensions.basicConstraints == .notCertificateAuthority)
        #expect(certificate.extensions[oid: .X509ExtensionID.basicConstraints]?.critical == true)
        // No key usage, so that BoringSSL accepts the certificate as a pinned trust anchor.
        #expect(try certificate.extensions.keyUsage == nil)
        #expect(try certificate.extensions.extendedKeyUsage == ExtendedKeyUsage([.serverAuth, .clientAuth]))
        #expect(try certificate.extensions.subjectKeyIdentifier != nil)
        let key = try Certificate.PrivateKey(pemEncoded: credentials.privateKeyPEM)
        #expect(key.description == "P256.PrivateKey")
        #expect(key.publicKey == certificate.publicKey)
        #expect(credentials.privateKeyPEM.hasPrefix("-----BEGIN PRIVATE KEY-----\n"))
        #expect(credentials.certificateChainPEM.hasPrefix("-----BEGIN CERTIFICATE-----\n"))
        #expect(credentials.certificateChainPEM.hasSuffix("-----END CERTIFICATE-----\n"))
    }

    @Test("Two certificates get different keys and serial numbers")
    func freshKeys() throws {
        let first = try SelfSignedCertificate.generate(domains: ["localhost"], now: Self.now)
        let second = try SelfSignedCertificate.generate(domains: ["localhost"], now: Self.now)
        #expect(first.privateKeyPEM != second.privateKeyPEM)
        #expect(try first.leafCertificate().serialNumber != second.leafCertificate().serialNumber)
    }

    @Test("No domain, an invalid domain, an IP literal or a non-positive validity are refused")
    func invalidRequests() {
        #expect(throws: TrustError(.noDomains, "")) { try SelfSignedCertificate.generate(domains: []) }
        #expect(throws: TrustError(.invalidDomain, "")) { try SelfSignedCertificate.generate(domains: ["exa mple.com"]) }
        #expect(throws: TrustError(.invalidDomain, "")) { try SelfSignedCertificate.generate(domains: ["127.0.0.1"]) }
        #expect(throws: TrustError(.invalidDomain, "")) { try SelfSignedCertificate.generate(domains: ["[::1]"]) }
        #expect(throws: TrustError(.invalidValidity, "")) { try SelfSignedCertificate.generate(domains: ["example.com"], validityDays: 0) }
    }
}

@Suite("PEM credentials on disk")
struct PEMCredentialsFileTests {
    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("trust-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    static func mode(_ path: String) throws -> Int {
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        return (attributes[.posixPermissions] as? NSNumber)?.intValue ?? -1
    }

    @Test("Write then load gives the same credentials, with the key file at mode 0600")
    func roundTrip() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let certificatePath = directory.appendingPathComponent("localhost.crt").path
        let keyPath = directory.appendingPathComponent("localhost.key").path
        let credentials = try SelfSignedCertificate.generate(domains: ["localhost"])

        try credentials.write(certificatePath: certificatePath, keyPath: keyPath)

        #expect(try Self.mode(keyPath) == 0o600)
        #expect(try Self.mode(certificatePath) == 0o644)
        let loaded = try PEMCredentials.load(certificatePath: certificatePath, keyPath: keyPath)
        #expect(loaded == credentials)
        #expect(loaded.certificateChainPEM == credentials.certificateChainPEM)
        #expect(loaded.privateKeyPEM == credentials.privateKeyPEM)
        // No temporary files are left behind.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted() == ["localhost.crt", "localhost.key"])
    }

    @Test("Overwriting a world-readable key file leaves it at mode 0600")
    func overwriteTightensMode() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let certificatePath = directory.appendingPathComponent("c.pem").path
        let keyPath = directory.appendingPathComponent("k.pem").path
        #expect(FileManager.default.createFile(atPath: keyPath, contents: Data("old".utf8), attributes: [.posixPermissions: 0o644]))
        #expect(try Self.mode(keyPath) == 0o644)

        let credentials = try SelfSignedCertificate.generate(domains: ["example.com"])
        try credentials.write(certificatePath: certificatePath, keyPath: keyPath)

        #expect(try Self.mode(keyPath) == 0o600)
        #expect(try String(contentsOfFile: keyPath, encoding: .utf8) == credentials.privateKeyPEM)
    }

    @Test("Loading a key that belongs to another certificate, or a missing file, fails")
    func loadFailures() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let a = try SelfSignedCertificate.generate(domains: ["a.example"])
        let b = try SelfSignedCertificate.generate(domains: ["b.example"])
        let mixed = PEMCredentials(certificateChainPEM: a.certificateChainPEM, privateKeyPEM: b.privateKeyPEM)
        let certificatePath = directory.appendingPathComponent("c.pem").path
        let keyPath = directory.appendingPathComponent("k.pem").path
        try mixed.write(certificatePath: certificatePath, keyPath: keyPath)

        #expect(throws: TrustError(.keyDoesNotMatchCertificate, "")) {
            try PEMCredentials.load(certificatePath: certificatePath, keyPath: keyPath)
        }
        #expect(throws: TrustError(.fileSystem, "")) {
            try PEMCredentials.load(certificatePath: directory.appendingPathComponent("missing.pem").path, keyPath: keyPath)
        }
        #expect(throws: TrustError(.invalidCertificate, "")) {
            try PEMCredentials(certificateChainPEM: "not a certificate", privateKeyPEM: a.privateKeyPEM).validate()
        }
        #expect(throws: TrustError(.invalidPrivateKey, "")) {
            try PEMCredentials(certificateChainPEM: a.certificateChainPEM, privateKeyPEM: "not a key").validate()
        }
    }
}
