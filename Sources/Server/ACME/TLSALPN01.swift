import Admin
import Crypto
import Foundation
import NIOSSL
import Synchronization
import X509

/// The ACME challenge types Braid answers (`acme.challenges`, in order of preference).
public enum ACMEChallengeType: String, Codable, Sendable, CaseIterable {
    /// RFC 8555 §8.3: the key authorisation over plain HTTP on port 80.
    case http01 = "http-01"
    /// RFC 8737: a certificate made for the validation, presented on port 443 to a
    /// handshake offering ALPN `acme-tls/1`.
    case tlsALPN01 = "tls-alpn-01"
}

/// One challenge being answered: what the ACME client hands the renewal service to publish.
struct ACMEChallengeAnswer: Sendable, Equatable {
    var type: ACMEChallengeType
    /// The identifier validated (a lower-case A-label).
    var identifier: String
    var token: String
    var keyAuthorization: String
}

/// The TLS-ALPN-01 validation contexts being offered, by server name; the HTTPS listener
/// asks ``context(forServerName:)`` for a ClientHello that offers `acme-tls/1`.
public final class ACMETLSALPNCertificates: Sendable {
    private let table = Mutex<[String: NIOSSLContext]>([:])

    public init() {}

    /// Makes the validation certificate for `name` and offers it until ``withdraw(name:)``.
    func publish(name: String, keyAuthorization: String) throws(ACMEError) {
        let context = try Self.validationContext(name: name, keyAuthorization: keyAuthorization)
        table.withLock { $0[name.lowercased()] = context }
    }

    func withdraw(name: String) {
        table.withLock { _ = $0.removeValue(forKey: name.lowercased()) }
    }

    public func context(forServerName name: String) -> NIOSSLContext? {
        table.withLock { $0[name.lowercased()] }
    }

    /// Names with a validation certificate on offer (tests check none is left behind).
    public var pendingNames: [String] {
        table.withLock { $0.keys.sorted() }
    }

    /// The validation certificate (RFC 8737 §3): self-signed, one dNSName, and the critical
    /// acmeIdentifier extension holding an OCTET STRING of SHA-256(key authorisation). A
    /// new P-256 key each time; it lives as long as the challenge.
    static func validationCertificate(name: String, keyAuthorization: String, now: Date = Date()) throws(ACMEError) -> (Certificate, P256.Signing.PrivateKey) {
        do {
            let key = P256.Signing.PrivateKey()
            let certificateKey = Certificate.PrivateKey(key)
            let digest = SHA256.hash(data: Data(keyAuthorization.utf8))
            // DER OCTET STRING: tag 4, length 32, the digest.
            let value = [0x04, 0x20] + Array(digest)
            // id-pe-acmeIdentifier (RFC 8737 §6.1).
            let identifier = Certificate.Extension(oid: [1, 3, 6, 1, 5, 5, 7, 1, 31], critical: true, value: ArraySlice(value))
            let subject = try DistinguishedName { CommonName(name) }
            let certificate = try Certificate(
                version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: certificateKey.publicKey,
                notValidBefore: now - 3600, notValidAfter: now + 7 * 86_400, issuer: subject, subject: subject,
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    SubjectAlternativeNames([.dnsName(name)])
                    identifier
                },
                issuerPrivateKey: certificateKey)
            return (certificate, key)
        } catch {
            throw ACMEError(.internal, "cannot make the tls-alpn-01 certificate for \(name): \(error)")
        }
    }

    /// A server context presenting the validation certificate and speaking only
    /// `acme-tls/1` (RFC 8737 §3: the protocol must be negotiated; TLS 1.2 or later).
    static func validationContext(name: String, keyAuthorization: String) throws(ACMEError) -> NIOSSLContext {
        let (certificate, key) = try validationCertificate(name: name, keyAuthorization: keyAuthorization)
        do {
            var tls = TLSConfiguration.makeServerConfiguration(
                certificateChain: [.certificate(try NIOSSLCertificate(bytes: try certificate.serializeAsPEM().derBytes, format: .der))],
                privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(key.pemRepresentation.utf8), format: .pem)))
            tls.applicationProtocols = [TLSALPNChallenges.protocolName]
            tls.minimumTLSVersion = .tlsv12
            tls.shutdownTimeout = .seconds(1)
            return try NIOSSLContext(configuration: tls)
        } catch {
            throw ACMEError(.internal, "cannot make the tls-alpn-01 context for \(name): \(error)")
        }
    }
}
