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
    /// The CA's key as P-256, kept to export it as PEM (``privateKeyPEM``).
    private let signingKey: P256.Signing.PrivateKey
    /// The OCSP responder URL written into the authorityInfoAccess extension of every
    /// certificate this CA issues (RFC 5280 §4.2.2.1), or nil for none.
    public let ocspResponderURL: String?
    /// The certificates between this CA and its root, this CA's own first; empty for a root.
    /// Issued chains carry them after the leaf (RFC 8446 §4.4.2).
    public let intermediates: [Certificate]
    /// The root this CA chains to: its own certificate for a root.
    public let rootCertificate: Certificate

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
    ///   - ocspResponderURL: when set, every certificate this CA issues names this OCSP
    ///     responder in its authorityInfoAccess extension (e.g. `http://127.0.0.1:8888`,
    ///     served in tests by `openssl ocsp`).
    public init(commonName: String = "Braid Test CA", now: Date = Date(), validityDays: Int = 3650, ocspResponderURL: String? = nil) throws {
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
        self.signingKey = key
        self.ocspResponderURL = ocspResponderURL
        self.intermediates = []
        self.rootCertificate = certificate
    }

    private init(
        certificate: Certificate, signingKey: P256.Signing.PrivateKey, keyIdentifier: ArraySlice<UInt8>,
        ocspResponderURL: String?, intermediates: [Certificate], rootCertificate: Certificate
    ) throws {
        self.certificate = certificate
        self.certificatePEM = try CertificateFactory.pem(certificate)
        self.privateKey = Certificate.PrivateKey(signingKey)
        self.name = certificate.subject
        self.keyIdentifier = keyIdentifier
        self.signingKey = signingKey
        self.ocspResponderURL = ocspResponderURL
        self.intermediates = intermediates
        self.rootCertificate = rootCertificate
    }

    /// The CA's private key as PKCS#8 PEM, for tools that must sign as the CA (for example
    /// `openssl ocsp -rsigner CA.pem -rkey KEY.pem` as the OCSP responder).
    public var privateKeyPEM: String {
        CertificateFactory.pem(signingKey)
    }

    /// Issues an intermediate CA under this one. Its certificate names this CA's OCSP
    /// responder (if any); the certificates it issues name `ocspResponderURL` (if any) and
    /// come with the chain up to, not including, the root.
    public func issueIntermediate(
        commonName: String,
        ocspResponderURL: String? = nil,
        notValidBefore: Date = Date() - 3600,
        notValidAfter: Date = Date() + 86_400 * 365
    ) throws -> TestCertificateAuthority {
        let key = P256.Signing.PrivateKey()
        let publicKey = Certificate.PrivateKey(key).publicKey
        let identifier = SubjectKeyIdentifier(hash: publicKey).keyIdentifier
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(BasicConstraints.isCertificateAuthority(maxPathLength: nil), critical: true))
        try extensions.append(Certificate.Extension(KeyUsage(keyCertSign: true, cRLSign: true), critical: true))
        try extensions.append(Certificate.Extension(SubjectKeyIdentifier(keyIdentifier: identifier), critical: false))
        try extensions.append(Certificate.Extension(AuthorityKeyIdentifier(keyIdentifier: keyIdentifier), critical: false))
        if let url = self.ocspResponderURL {
            try extensions.append(Self.ocspAccess(url))
        }
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: notValidBefore,
            notValidAfter: notValidAfter,
            issuer: name,
            subject: try CertificateFactory.commonNameOnly(commonName),
            signatureAlgorithm: CertificateFactory.signatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: privateKey
        )
        return try TestCertificateAuthority(
            certificate: certificate, signingKey: key, keyIdentifier: identifier,
            ocspResponderURL: ocspResponderURL, intermediates: [certificate] + intermediates, rootCertificate: rootCertificate
        )
    }

    /// Issues a delegated OCSP responder certificate (extended key usage id-kp-OCSPSigning,
    /// RFC 6960 §4.2.2.2), for `openssl ocsp -rsigner`.
    public func issueOCSPResponder(
        commonName: String = "Braid Test OCSP Responder",
        notValidBefore: Date = Date() - 3600,
        notValidAfter: Date = Date() + 86_400 * 30
    ) throws -> PEMCredentials {
        let key = P256.Signing.PrivateKey()
        let certificate = try CertificateFactory.makeLeaf(
            publicKey: Certificate.PrivateKey(key).publicKey,
            subject: try CertificateFactory.commonNameOnly(commonName),
            issuer: name,
            issuerPrivateKey: privateKey,
            issuerKeyIdentifier: keyIdentifier,
            notValidBefore: notValidBefore,
            notValidAfter: notValidAfter,
            subjectAltNames: [],
            extendedKeyUsages: [.ocspSigning]
        )
        return PEMCredentials(certificateChainPEM: try CertificateFactory.pem(certificate), privateKeyPEM: CertificateFactory.pem(key))
    }

    /// An authorityInfoAccess extension naming one OCSP responder (RFC 5280 §4.2.2.1).
    private static func ocspAccess(_ url: String) throws -> Certificate.Extension {
        let access = AuthorityInformationAccess([
            AuthorityInformationAccess.AccessDescription(method: .ocspServer, location: .uniformResourceIdentifier(url))
        ])
        return try Certificate.Extension(access, critical: false)
    }

    /// The leaf as PEM followed by this CA's intermediates (none for a root).
    private func chainPEM(_ leaf: Certificate) throws -> String {
        try ([leaf] + intermediates).map(CertificateFactory.pem).joined()
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
    ///   and its key. For an intermediate CA (``issueIntermediate(commonName:ocspResponderURL:notValidBefore:notValidAfter:)``)
    ///   the chain continues with ``intermediates``. With ``ocspResponderURL`` set, the leaf
    ///   names that OCSP responder.
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
        let certificate: Certificate
        if let ocspResponderURL {
            certificate = try makeLeaf(
                publicKey: leafKey.publicKey, subject: subject, notValidBefore: notValidBefore, notValidAfter: notValidAfter,
                subjectAltNames: names, extendedKeyUsages: usages ?? [], ocspResponderURL: ocspResponderURL
            )
        } else {
            certificate = try CertificateFactory.makeLeaf(
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
        }
        return PEMCredentials(
            certificateChainPEM: try chainPEM(certificate),
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

    /// The profile of `CertificateFactory.makeLeaf`, plus an authorityInfoAccess extension
    /// naming the OCSP responder.
    private func makeLeaf(
        publicKey: Certificate.PublicKey,
        subject: DistinguishedName,
        notValidBefore: Date,
        notValidAfter: Date,
        subjectAltNames: [GeneralName],
        extendedKeyUsages: [ExtendedKeyUsage.Usage],
        ocspResponderURL: String
    ) throws -> Certificate {
        guard notValidAfter > notValidBefore else {
            throw TrustError(.invalidValidity, "the certificate would expire before it becomes valid")
        }
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(BasicConstraints.notCertificateAuthority, critical: true))
        try extensions.append(Certificate.Extension(KeyUsage(digitalSignature: true), critical: true))
        if !extendedKeyUsages.isEmpty {
            try extensions.append(Certificate.Extension(ExtendedKeyUsage(extendedKeyUsages), critical: false))
        }
        try extensions.append(Certificate.Extension(SubjectKeyIdentifier(hash: publicKey), critical: false))
        try extensions.append(Certificate.Extension(AuthorityKeyIdentifier(keyIdentifier: keyIdentifier), critical: false))
        if !subjectAltNames.isEmpty {
            try extensions.append(Certificate.Extension(SubjectAlternativeNames(subjectAltNames), critical: subject.isEmpty))
        }
        try extensions.append(Self.ocspAccess(ocspResponderURL))
        return try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: notValidBefore,
            notValidAfter: notValidAfter,
            issuer: name,
            subject: subject,
            signatureAlgorithm: CertificateFactory.signatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: privateKey
        )
    }
}
