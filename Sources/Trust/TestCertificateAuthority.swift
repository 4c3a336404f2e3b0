import Crypto
import Foundation
import X509

/// A throwaway certificate authority for tests and federation labs. **Not for production.**
///
/// It makes a P-256 root certificate and issues leaf certificates with exactly the
/// subjectAltNames, validity and extended key usages a test asks for, including broken ones
/// (wildcards in odd places, already expired, serverAuth only), so that the identity and
/// PKIX checks can be exercised against a real chain. Nothing here checks that a request is
/// sensible; that is the point.
///
/// The CA's private key lives in memory only, for as long as the value does.
public struct TestCertificateAuthority: Sendable {
    /// The root certificate.
    public let certificate: Certificate
    /// The root certificate as PEM, for use as a trust root.
    public let certificatePEM: String
    private let privateKey: Certificate.PrivateKey
    private let name: DistinguishedName
    private let keyIdentifier: ArraySlice<UInt8>

    /// Which extended key usages a leaf carries.
    public enum ExtendedKeyUsages: Sendable, Hashable {
        /// serverAuth and clientAuth, the traditional XMPP server certificate.
        case serverAndClientAuth
        /// serverAuth only, as public CAs issue from 2026 on (see XEP-0178 §3 traps in the
        /// federation digest): s2s peers must still accept it for SASL EXTERNAL.
        case serverAuthOnly
        /// clientAuth only.
        case clientAuthOnly
        /// No extended key usage extension at all (any purpose, RFC 5280 §4.2.1.12).
        case omitted
    }

    /// Creates a CA with a new P-256 key.
    ///
    /// - Parameters:
    ///   - commonName: the CA's subject CN.
    ///   - now: the reference time; the CA is valid from a day before to `validityDays` after.
    ///   - validityDays: the CA's lifetime.
    public init(commonName: String = "Braid Test CA", now: Date = Date(), validityDays: Int = 3650) throws {
        let key = P256.Signing.PrivateKey()
        let privateKey = Certificate.PrivateKey(key)
        let name = try CertificateFactory.commonNameOnly(commonName)
        let keyIdentifier = SubjectKeyIdentifier(hash: privateKey.publicKey).keyIdentifier
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true))
        try extensions.append(Certificate.Extension(KeyUsage(keyCertSign: true, cRLSign: true), critical: true))
        try extensions.append(Certificate.Extension(SubjectKeyIdentifier(keyIdentifier: keyIdentifier), critical: false))
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: privateKey.publicKey,
            notValidBefore: now - 86_400,
            notValidAfter: now + TimeInterval(validityDays) * 86_400,
            issuer: name,
            subject: name,
            signatureAlgorithm: CertificateFactory.signatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: privateKey
        )
        self.certificate = certificate
        self.certificatePEM = try CertificateFactory.pem(certificate)
        self.privateKey = privateKey
        self.name = name
        self.keyIdentifier = keyIdentifier
    }

    /// Issues a leaf certificate with a new P-256 key.
    ///
    /// Identifier values are written exactly as given, so tests can present invalid forms.
    ///
    /// - Parameters:
    ///   - commonName: the subject CN, or nil for an empty subject (the SAN extension is then
    ///     critical, RFC 5280 §4.2.1.6).
    ///   - dnsIDs: dNSName values, e.g. `example.com` or `*.example.com`.
    ///   - srvIDs: SRVName values, e.g. `_xmpp-server.example.com`.
    ///   - xmppAddrs: XmppAddr values, e.g. `example.com`.
    ///   - notValidBefore: start of validity.
    ///   - notValidAfter: end of validity; may lie in the past for an expired certificate.
    ///   - extendedKeyUsages: which extended key usages to include.
    /// - Returns: the leaf alone as the chain (the root is the trust anchor, ``certificatePEM``)
    ///   and its key.
    public func issue(
        commonName: String? = nil,
        dnsIDs: [String] = [],
        srvIDs: [String] = [],
        xmppAddrs: [String] = [],
        notValidBefore: Date = Date() - 3600,
        notValidAfter: Date = Date() + 86_400 * 30,
        extendedKeyUsages: ExtendedKeyUsages = .serverAndClientAuth
    ) throws -> PEMCredentials {
        let key = P256.Signing.PrivateKey()
        let leafKey = Certificate.PrivateKey(key)
        var names: [GeneralName] = dnsIDs.map(CertificateFactory.dnsID)
        for srvID in srvIDs { names.append(try CertificateFactory.srvID(srvID)) }
        for address in xmppAddrs { names.append(try CertificateFactory.xmppAddr(address)) }
        let subject = try commonName.map(CertificateFactory.commonNameOnly) ?? DistinguishedName()
        let usages: [ExtendedKeyUsage.Usage]? = switch extendedKeyUsages {
        case .serverAndClientAuth: CertificateFactory.extendedKeyUsages(serverAuth: true, clientAuth: true)
        case .serverAuthOnly: CertificateFactory.extendedKeyUsages(serverAuth: true, clientAuth: false)
        case .clientAuthOnly: CertificateFactory.extendedKeyUsages(serverAuth: false, clientAuth: true)
        case .omitted: nil
        }
        let certificate = try CertificateFactory.makeLeaf(
            publicKey: leafKey.publicKey,
            subject: subject,
            issuer: name,
            issuerPrivateKey: privateKey,
            issuerKeyIdentifier: keyIdentifier,
            notValidBefore: notValidBefore,
            notValidAfter: notValidAfter,
            subjectAltNames: names,
            extendedKeyUsages: usages ?? []
        )
        return PEMCredentials(
            certificateChainPEM: try CertificateFactory.pem(certificate),
            privateKeyPEM: CertificateFactory.pem(key)
        )
    }

    /// Issues a leaf with the full XMPP identifier set for `domains`, like
    /// ``SelfSignedCertificate/generate(domains:validityDays:now:)`` but signed by this CA.
    public func issueXMPPServerCertificate(
        domains: [String],
        notValidBefore: Date = Date() - 3600,
        notValidAfter: Date = Date() + 86_400 * 30,
        extendedKeyUsages: ExtendedKeyUsages = .serverAndClientAuth
    ) throws -> PEMCredentials {
        let prepared = try CertificateFactory.prepare(domains: domains)
        var dnsIDs: [String] = []
        var srvIDs: [String] = []
        var xmppAddrs: [String] = []
        for domain in prepared {
            dnsIDs.append(domain.ascii)
            srvIDs.append("_xmpp-server.\(domain.ascii)")
            srvIDs.append("_xmpp-client.\(domain.ascii)")
            xmppAddrs.append(domain.unicode)
        }
        return try issue(
            commonName: prepared.first?.ascii,
            dnsIDs: dnsIDs,
            srvIDs: srvIDs,
            xmppAddrs: xmppAddrs,
            notValidBefore: notValidBefore,
            notValidAfter: notValidAfter,
            extendedKeyUsages: extendedKeyUsages
        )
    }
}
