import Crypto
import SwiftASN1

extension TLSContextStore {
    /// The `tls-server-end-point` channel binding data for a server certificate (RFC 5929 §4.1),
    /// as SCRAM-PLUS uses it (RFC 5802 §6).
    ///
    /// The data is the hash of the DER certificate, with the hash function of the
    /// certificate's own `signatureAlgorithm`, except that MD5 and SHA-1 are replaced by
    /// SHA-256. RSASSA-PSS names its hash in the parameters (RFC 4055 §3.1; absent means SHA-1,
    /// hence SHA-256 here).
    ///
    /// - Returns: nil when the DER does not parse, or when the signature algorithm uses no
    ///   single hash function (Ed25519, Ed448) or one this module lacks (SHA-224): RFC 5929
    ///   §4.1 leaves the binding undefined then, so `-PLUS` must not be offered with it.
    public static func tlsServerEndPointHash(certificateDER: [UInt8]) -> [UInt8]? {
        guard let hash = try? ChannelBindingHash(certificateDER: certificateDER) else { return nil }
        switch hash {
        case .sha256: return Array(SHA256.hash(data: certificateDER))
        case .sha384: return Array(SHA384.hash(data: certificateDER))
        case .sha512: return Array(SHA512.hash(data: certificateDER))
        }
    }
}

/// The hash function RFC 5929 §4.1 picks for a certificate.
enum ChannelBindingHash: Sendable, Hashable {
    case sha256
    case sha384
    case sha512

    struct Unsupported: Error {}

    /// Reads `Certificate.signatureAlgorithm` (RFC 5280 §4.1.1.2) straight from the DER, since
    /// swift-certificates does not expose the OID of algorithms it does not implement (MD5,
    /// DSA, RSASSA-PSS).
    init(certificateDER: [UInt8]) throws {
        let root = try DER.parse(certificateDER)
        guard root.identifier == .sequence, case .constructed(let fields) = root.content else { throw Unsupported() }
        var iterator = fields.makeIterator()
        guard iterator.next() != nil, let algorithm = iterator.next() else { throw Unsupported() }
        let (oid, parameters) = try Self.algorithmIdentifier(algorithm)
        switch oid {
        // MD5 and SHA-1 signatures: RFC 5929 §4.1 says use SHA-256.
        case [1, 2, 840, 113549, 1, 1, 4],  // md5WithRSAEncryption
             [1, 2, 840, 113549, 1, 1, 5],  // sha1WithRSAEncryption
             [1, 3, 14, 3, 2, 29],  // sha1WithRSASignature (OIW)
             [1, 2, 840, 10045, 4, 1],  // ecdsa-with-SHA1
             [1, 2, 840, 10040, 4, 3]:  // dsa-with-sha1
            self = .sha256
        case [1, 2, 840, 113549, 1, 1, 11],  // sha256WithRSAEncryption
             [1, 2, 840, 10045, 4, 3, 2],  // ecdsa-with-SHA256
             [2, 16, 840, 1, 101, 3, 4, 3, 2]:  // dsa-with-sha256
            self = .sha256
        case [1, 2, 840, 113549, 1, 1, 12],  // sha384WithRSAEncryption
             [1, 2, 840, 10045, 4, 3, 3]:  // ecdsa-with-SHA384
            self = .sha384
        case [1, 2, 840, 113549, 1, 1, 13],  // sha512WithRSAEncryption
             [1, 2, 840, 10045, 4, 3, 4]:  // ecdsa-with-SHA512
            self = .sha512
        case [1, 2, 840, 113549, 1, 1, 10]:  // RSASSA-PSS
            self = try Self.pssHash(parameters)
        default:
            throw Unsupported()
        }
    }

    /// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] HashAlgorithm DEFAULT sha1, ... }
    /// (RFC 4055 §3.1).
    private static func pssHash(_ parameters: ASN1Node?) throws -> ChannelBindingHash {
        guard let parameters, parameters.identifier == .sequence, case .constructed(let fields) = parameters.content else {
            throw Unsupported()
        }
        var iterator = fields.makeIterator()
        guard let first = iterator.next(), first.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific),
              case .constructed(let tagged) = first.content
        else {
            return .sha256  // default SHA-1, replaced by SHA-256
        }
        var inner = tagged.makeIterator()
        guard let hashAlgorithm = inner.next() else { throw Unsupported() }
        let (oid, _) = try algorithmIdentifier(hashAlgorithm)
        switch oid {
        case [1, 3, 14, 3, 2, 26], [2, 16, 840, 1, 101, 3, 4, 2, 1]: return .sha256  // SHA-1, SHA-256
        case [2, 16, 840, 1, 101, 3, 4, 2, 2]: return .sha384
        case [2, 16, 840, 1, 101, 3, 4, 2, 3]: return .sha512
        default: throw Unsupported()
        }
    }

    /// AlgorithmIdentifier ::= SEQUENCE { algorithm OBJECT IDENTIFIER, parameters ANY OPTIONAL }
    private static func algorithmIdentifier(_ node: ASN1Node) throws -> (ASN1ObjectIdentifier, ASN1Node?) {
        guard node.identifier == .sequence, case .constructed(let fields) = node.content else { throw Unsupported() }
        var iterator = fields.makeIterator()
        guard let oidNode = iterator.next() else { throw Unsupported() }
        return (try ASN1ObjectIdentifier(derEncoded: oidNode), iterator.next())
    }
}
