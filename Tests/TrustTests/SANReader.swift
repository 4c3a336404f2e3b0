import SwiftASN1
import X509

/// A subjectAltName entry decoded by the tests themselves, independently of
/// `CertificateIdentity`, so that the generator is checked against a second reader.
enum SANEntry: Hashable, CustomStringConvertible {
    case dns(String)
    case srv(String)
    case xmppAddr(String)
    case other(String)

    var description: String {
        switch self {
        case .dns(let value): "DNS:\(value)"
        case .srv(let value): "SRV:\(value)"
        case .xmppAddr(let value): "XmppAddr:\(value)"
        case .other(let value): "other:\(value)"
        }
    }

    static let xmppAddrOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 8, 5]
    static let dnsSRVOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 8, 7]

    /// All SAN entries of `certificate`, in order. XmppAddr must be a UTF8String and SRVName an
    /// IA5String; anything else shows up as `.other`.
    static func entries(of certificate: Certificate) throws -> [SANEntry] {
        guard let names = try certificate.extensions.subjectAlternativeNames else { return [] }
        return names.map { name in
            switch name {
            case .dnsName(let value):
                return .dns(value)
            case .otherName(let other) where other.typeID == xmppAddrOID:
                guard let value = other.value, let utf8 = try? ASN1UTF8String(asn1Any: value) else { return .other("bad XmppAddr") }
                return .xmppAddr(String(decoding: utf8.bytes, as: UTF8.self))
            case .otherName(let other) where other.typeID == dnsSRVOID:
                guard let value = other.value, let ia5 = try? ASN1IA5String(asn1Any: value) else { return .other("bad SRVName") }
                return .srv(String(ia5))
            default:
                return .other("\(name)")
            }
        }
    }

    /// The raw UTF-8 bytes of every XmppAddr.
    static func xmppAddrBytes(of certificate: Certificate) throws -> [[UInt8]] {
        guard let names = try certificate.extensions.subjectAlternativeNames else { return [] }
        return names.compactMap { name in
            guard case .otherName(let other) = name, other.typeID == xmppAddrOID, let value = other.value,
                  let utf8 = try? ASN1UTF8String(asn1Any: value) else { return nil }
            return Array(utf8.bytes)
        }
    }
}
