import Crypto
import Foundation
import SwiftASN1
import X509
import XMPPCore

/// Object identifiers for the XMPP-relevant subjectAltName forms.
enum XMPPObjectIdentifier {
    /// `id-on-xmppAddr` (RFC 6120 §13.7.1.4): an otherName holding a UTF8String JID.
    static let xmppAddr: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 8, 5]
    /// `id-on-dnsSRV` (RFC 4985 §2): an otherName holding an IA5String `_Service.Name`.
    static let dnsSRV: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 8, 7]
}

/// A domain in both of the forms a certificate needs.
struct PreparedDomain: Sendable, Hashable {
    /// Canonical U-label form, as XMPP addresses use it (RFC 7622 §3.2); goes into XmppAddr.
    let unicode: String
    /// A-label form, as DNS and PKIX use it (RFC 6125 §6.4.2); goes into DNS-IDs and SRV-IDs.
    let ascii: String

    /// Prepares `domain` (U-labels or A-labels, any case, optional trailing dot).
    ///
    /// IP literals are refused: a certificate names an IP address with an iPAddress SAN,
    /// never with a DNS-ID (RFC 9525 §3), and XMPP certificates do not use IP-IDs.
    init(_ domain: String) throws(TrustError) {
        let jid: JID
        do {
            jid = try JID(domain: domain)
        } catch {
            throw TrustError(.invalidDomain, "'\(domain)' is not a valid domain: \(error)")
        }
        guard !DomainName.isIPLiteral(jid.domainpart) else {
            throw TrustError(.invalidDomain, "'\(domain)' is an IP literal, not a domain name")
        }
        self.unicode = jid.domainpart
        self.ascii = jid.asciiDomain
    }
}

/// Small helpers over ASCII domain names.
enum DomainName {
    /// Whether a prepared domainpart is an IP literal rather than a DNS name.
    ///
    /// An IPv6 literal is bracketed (RFC 7622 §3.2). An IPv4 literal is recognised by its
    /// all-digit last label: no top-level domain is all digits (RFC 3696 §2), so a DNS name
    /// never looks like that.
    static func isIPLiteral(_ domain: String) -> Bool {
        if domain.utf8.first == UInt8(ascii: "[") { return true }
        let lastLabel = domain.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false).last ?? []
        return !lastLabel.isEmpty && lastLabel.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
    }

    /// Lower-cases ASCII letters only (RFC 4343 §3: DNS comparison ignores ASCII case only).
    static func asciiLowercased(_ text: String) -> String {
        String(decoding: text.utf8.map { ($0 >= 65 && $0 <= 90) ? $0 + 32 : $0 }, as: UTF8.self)
    }

    /// Whether `text` is all ASCII.
    static func isASCII(_ text: String) -> Bool {
        text.utf8.allSatisfy { $0 < 0x80 }
    }
}

/// Builders for the subjectAltName entries of XMPP certificates and for the certificates
/// themselves, shared by ``SelfSignedCertificate`` and ``TestCertificateAuthority``.
enum CertificateFactory {
    /// A dNSName entry, written as given.
    static func dnsID(_ name: String) -> GeneralName {
        .dnsName(name)
    }

    /// An SRVName otherName (RFC 4985), e.g. `_xmpp-server.example.com`, as an IA5String.
    static func srvID(_ name: String) throws -> GeneralName {
        let value = try ASN1Any(erasing: ASN1IA5String(name))
        return .otherName(GeneralName.OtherName(typeID: XMPPObjectIdentifier.dnsSRV, value: value))
    }

    /// An XmppAddr otherName (RFC 6120 §13.7.1.4) as a UTF8String.
    static func xmppAddr(_ address: String) throws -> GeneralName {
        let value = try ASN1Any(erasing: ASN1UTF8String(address))
        return .otherName(GeneralName.OtherName(typeID: XMPPObjectIdentifier.xmppAddr, value: value))
    }

    /// The full set of XMPP identifiers for each domain, in this order: DNS-ID (A-label),
    /// SRV-IDs `_xmpp-server` and `_xmpp-client` (A-label), XmppAddr (U-label).
    ///
    /// RFC 6120 §13.7.1.2 asks for a DNS-ID and SRV-IDs; XmppAddr is still read by older
    /// peers (RFC 6120 §13.7.1.4). SRVName values must be in A-label form (RFC 4985 §2),
    /// while XmppAddr holds a JID, whose domainpart is in U-label form (RFC 7622 §3.2).
    static func xmppSubjectAltNames(for domains: [PreparedDomain]) throws -> [GeneralName] {
        var names: [GeneralName] = []
        for domain in domains {
            names.append(dnsID(domain.ascii))
            names.append(try srvID("_xmpp-server.\(domain.ascii)"))
            names.append(try srvID("_xmpp-client.\(domain.ascii)"))
            names.append(try xmppAddr(domain.unicode))
        }
        return names
    }

    /// Prepares a list of domains, dropping duplicates while keeping the order.
    static func prepare(domains: [String]) throws(TrustError) -> [PreparedDomain] {
        var seen = Set<PreparedDomain>()
        var prepared: [PreparedDomain] = []
        for domain in domains {
            let value = try PreparedDomain(domain)
            if seen.insert(value).inserted { prepared.append(value) }
        }
        guard !prepared.isEmpty else { throw TrustError(.noDomains, "at least one domain is required") }
        return prepared
    }

    /// The extended key usages a leaf asks for.
    static func extendedKeyUsages(serverAuth: Bool, clientAuth: Bool) -> [ExtendedKeyUsage.Usage] {
        var usages: [ExtendedKeyUsage.Usage] = []
        if serverAuth { usages.append(.serverAuth) }
        if clientAuth { usages.append(.clientAuth) }
        return usages
    }

    /// Signs an end-entity certificate.
    ///
    /// The profile follows what XMPP peers expect of a server certificate: CA=false, key usage
    /// digitalSignature (enough for ECDHE with ECDSA keys, RFC 5280 §4.2.1.3) unless
    /// `includeKeyUsage` is false, the requested extended key usages, and the subjectAltNames. The subject key identifier is always
    /// present (RFC 5280 §4.2.1.2); an authority key identifier is added when the issuer has one.
    static func makeLeaf(
        publicKey: Certificate.PublicKey,
        subject: DistinguishedName,
        issuer: DistinguishedName,
        issuerPrivateKey: Certificate.PrivateKey,
        issuerKeyIdentifier: ArraySlice<UInt8>?,
        notValidBefore: Date,
        notValidAfter: Date,
        subjectAltNames: [GeneralName],
        extendedKeyUsages: [ExtendedKeyUsage.Usage],
        includeKeyUsage: Bool = true
    ) throws -> Certificate {
        guard notValidAfter > notValidBefore else {
            throw TrustError(.invalidValidity, "the certificate would expire before it becomes valid")
        }
        var extensions = Certificate.Extensions()
        try extensions.append(Certificate.Extension(BasicConstraints.notCertificateAuthority, critical: true))
        if includeKeyUsage {
            try extensions.append(Certificate.Extension(KeyUsage(digitalSignature: true), critical: true))
        }
        if !extendedKeyUsages.isEmpty {
            try extensions.append(Certificate.Extension(ExtendedKeyUsage(extendedKeyUsages), critical: false))
        }
        try extensions.append(Certificate.Extension(SubjectKeyIdentifier(hash: publicKey), critical: false))
        if let issuerKeyIdentifier {
            try extensions.append(Certificate.Extension(AuthorityKeyIdentifier(keyIdentifier: issuerKeyIdentifier), critical: false))
        }
        if !subjectAltNames.isEmpty {
            // RFC 5280 §4.2.1.6: the SAN extension is critical only when the subject is empty.
            let subjectIsEmpty = subject.isEmpty
            try extensions.append(Certificate.Extension(SubjectAlternativeNames(subjectAltNames), critical: subjectIsEmpty))
        }
        return try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: notValidBefore,
            notValidAfter: notValidAfter,
            issuer: issuer,
            subject: subject,
            signatureAlgorithm: signatureAlgorithm,
            extensions: extensions,
            issuerPrivateKey: issuerPrivateKey
        )
    }

    /// The signature algorithm for the keys this module makes: ECDSA with P-256 and SHA-256,
    /// which every TLS 1.2+ stack supports (RFC 8422 §5.1.1, RFC 8446 §4.2.3).
    static let signatureAlgorithm: Certificate.SignatureAlgorithm = .ecdsaWithSHA256

    /// A distinguished name holding one common name.
    static func commonNameOnly(_ commonName: String) throws -> DistinguishedName {
        try DistinguishedName { CommonName(commonName) }
    }

    /// Serialises a private key to PKCS#8 PEM.
    static func pem(_ key: P256.Signing.PrivateKey) -> String {
        key.pemRepresentation
    }

    /// Serialises a certificate to PEM, ending with a newline.
    static func pem(_ certificate: Certificate) throws -> String {
        try certificate.serializeAsPEM().pemString + "\n"
    }
}
