import Crypto
import Foundation
import X509

/// Makes self-signed certificates for hosted XMPP domains.
///
/// Used by `braid cert selfsign DOMAIN` and for the automatic `localhost` certificate on first
/// start. Peers cannot validate such a certificate against a public CA, so for federation it
/// only helps with dialback (XEP-0220) or with peers that pin it (RFC 6120 §13.6); it still
/// gives clients an encrypted channel they can choose to trust.
public enum SelfSignedCertificate {
    /// How far `notValidBefore` is moved into the past, so that peers whose clock runs a little
    /// behind ours accept a certificate made a moment ago.
    public static let clockSkewAllowance: TimeInterval = 3600

    /// Generates a P-256 key and a self-signed certificate covering `domains`.
    ///
    /// For each domain the subjectAltName extension holds, in this order (RFC 6120 §13.7.1.2,
    /// §13.7.1.4):
    /// - a DNS-ID with the A-label form (`xn--mnchen-3ya.example`),
    /// - SRV-IDs `_xmpp-server.<A-label>` and `_xmpp-client.<A-label>` (RFC 4985, IA5String),
    /// - an XmppAddr with the U-label form (`münchen.example`, UTF8String).
    ///
    /// The subject is `CN=<first domain, A-label form>`: the CN is never used for matching
    /// (RFC 9525 §2), but tools display it, and CA/Browser Forum practice wants it to repeat a
    /// SAN value. The certificate is an end entity (CA=false) with extended key usages
    /// serverAuth and clientAuth, since an XMPP server is a TLS client too when it connects to
    /// peers (XEP-0178 §3).
    ///
    /// It has **no key usage extension**, on purpose. The only way a peer can trust a
    /// self-signed certificate is to pin it as a trust anchor, and BoringSSL (hence
    /// swift-nio-ssl) and OpenSSL 1.1 accept a certificate as its own issuer only when its key
    /// usage, if present, includes keyCertSign (`X509_check_issued`); keyCertSign in turn
    /// requires CA=true (RFC 5280 §4.2.1.3). Without the extension the key is not restricted
    /// (RFC 5280 §4.2.1.3), the certificate stays an end entity, and pinning works. A loopback
    /// handshake test pins two such certificates with swift-nio-ssl.
    ///
    /// - Parameters:
    ///   - domains: the domains to cover, in U-label or A-label form; duplicates are dropped.
    ///   - validityDays: how long the certificate is valid, counted from `now`.
    ///   - now: the reference time (injectable for tests).
    /// - Throws: ``TrustError`` with ``TrustError/Code/noDomains``,
    ///   ``TrustError/Code/invalidDomain`` or ``TrustError/Code/invalidValidity``.
    public static func generate(domains: [String], validityDays: Int = 365, now: Date = Date()) throws -> PEMCredentials {
        guard validityDays > 0 else {
            throw TrustError(.invalidValidity, "validityDays must be positive, not \(validityDays)")
        }
        let prepared = try CertificateFactory.prepare(domains: domains)
        let key = P256.Signing.PrivateKey()
        let certificateKey = Certificate.PrivateKey(key)
        // prepare(domains:) never returns an empty list.
        let name = try CertificateFactory.commonNameOnly(prepared.first?.ascii ?? "")
        let certificate = try CertificateFactory.makeLeaf(
            publicKey: certificateKey.publicKey,
            subject: name,
            issuer: name,
            issuerPrivateKey: certificateKey,
            issuerKeyIdentifier: nil,
            notValidBefore: now - clockSkewAllowance,
            notValidAfter: now + TimeInterval(validityDays) * 86_400,
            subjectAltNames: try CertificateFactory.xmppSubjectAltNames(for: prepared),
            extendedKeyUsages: CertificateFactory.extendedKeyUsages(serverAuth: true, clientAuth: true),
            includeKeyUsage: false
        )
        return PEMCredentials(
            certificateChainPEM: try CertificateFactory.pem(certificate),
            privateKeyPEM: CertificateFactory.pem(key)
        )
    }
}
