#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import NIOCore

/// The DNS record types this module asks for (RFC 1035 §3.2.2, RFC 3596, RFC 2782, RFC 6698).
public struct DNSRecordType: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public var rawValue: UInt16

    public init(rawValue: UInt16) {
        self.rawValue = rawValue
    }

    public static let a = DNSRecordType(rawValue: 1)
    public static let aaaa = DNSRecordType(rawValue: 28)
    public static let srv = DNSRecordType(rawValue: 33)
    public static let tlsa = DNSRecordType(rawValue: 52)

    public var description: String {
        switch self {
        case .a: "A"
        case .aaaa: "AAAA"
        case .srv: "SRV"
        case .tlsa: "TLSA"
        default: "TYPE\(rawValue)"
        }
    }
}

/// One SRV record (RFC 2782).
public struct SRVRecord: Sendable, Hashable, CustomStringConvertible {
    public var priority: UInt16
    public var weight: UInt16
    public var port: UInt16
    /// The target host in lower-case A-label form without the trailing dot, for example
    /// `xmpp.example.com`. The root name, which RFC 2782 uses to say "the service is decidedly
    /// not available here", is the single character `"."`; see ``isNoService``.
    public var target: String

    public init(priority: UInt16, weight: UInt16, port: UInt16, target: String) {
        self.priority = priority
        self.weight = weight
        self.port = port
        self.target = target
    }

    /// The target is the root name `.` (RFC 2782: "decidedly not available").
    public var isNoService: Bool { target == "." }

    public var description: String { "\(priority) \(weight) \(port) \(target)" }
}

/// One TLSA record (RFC 6698 §2.1). The meaning of the three fields is RFC 7671's business;
/// this type only carries them.
public struct TLSARecord: Sendable, Hashable, CustomStringConvertible {
    /// Certificate usage: PKIX-TA(0), PKIX-EE(1), DANE-TA(2), DANE-EE(3).
    public var usage: UInt8
    /// Selector: Cert(0), SPKI(1).
    public var selector: UInt8
    /// Matching type: Full(0), SHA2-256(1), SHA2-512(2).
    public var matchingType: UInt8
    /// The certificate association data.
    public var data: [UInt8]

    public init(usage: UInt8, selector: UInt8, matchingType: UInt8, data: [UInt8]) {
        self.usage = usage
        self.selector = selector
        self.matchingType = matchingType
        self.data = data
    }

    public var description: String {
        let hex = data.map { byte in
            let digits = Array("0123456789abcdef".utf8)
            return String(decoding: [digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]], as: UTF8.self)
        }.joined()
        return "\(usage) \(selector) \(matchingType) \(hex)"
    }
}

/// An IPv4 or IPv6 address from an A or AAAA record.
///
/// `description` is the usual text form (dotted quad, or RFC 5952 for IPv6, without brackets),
/// which NIO accepts as a connect host. ``socketAddress(port:)`` skips the text round trip.
public struct IPAddress: Sendable, Hashable, CustomStringConvertible {
    public enum Family: Sendable, Hashable {
        case v4, v6
    }

    /// The address in network byte order: 4 bytes for IPv4, 16 for IPv6.
    public let bytes: [UInt8]

    /// Makes an address from 4 (IPv4) or 16 (IPv6) network-order bytes.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    /// Parses an IPv4 dotted quad or an IPv6 text address; brackets around IPv6 are allowed.
    public init?(_ text: String) {
        var text = Substring(text)
        if text.hasPrefix("["), text.hasSuffix("]") {
            text = text.dropFirst().dropLast()
        }
        var v4 = in_addr()
        var v6 = in6_addr()
        let string = String(text)
        if inet_pton(AF_INET, string, &v4) == 1 {
            self.bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, string, &v6) == 1 {
            self.bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }

    public var family: Family { bytes.count == 4 ? .v4 : .v6 }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        let ok: Bool = bytes.withUnsafeBytes { raw in
            buffer.withUnsafeMutableBufferPointer { out in
                inet_ntop(family == .v4 ? AF_INET : AF_INET6, raw.baseAddress, out.baseAddress, socklen_t(out.count)) != nil
            }
        }
        guard ok else { return "<invalid address>" }
        let end = buffer.firstIndex(of: 0) ?? buffer.endIndex
        return String(decoding: buffer[..<end].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The NIO socket address for connecting to this address on `port`.
    public func socketAddress(port: Int) throws -> SocketAddress {
        var buffer = ByteBufferAllocator().buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return try SocketAddress(packedIPAddress: buffer, port: port)
    }
}

/// The DNSSEC validation state of an answer (RFC 4033 §5, RFC 4035 §4.3).
public enum DNSSECStatus: Sendable, Hashable, CustomStringConvertible {
    /// A chain of trust from a configured anchor proves the answer, including a proven
    /// non-existence.
    case secure
    /// No trust anchor covers the name, or the chain proves the zone unsigned.
    case insecure
    /// Validation failed: signatures missing, expired or wrong, or the chain broke. Callers
    /// must fail closed (RFC 7673 §3.1).
    case bogus(reason: String)

    /// The weaker of two states: bogus beats insecure beats secure. Used when one answer is
    /// built from several queries, such as A plus AAAA.
    public func combined(with other: DNSSECStatus) -> DNSSECStatus {
        switch (self, other) {
        case (.bogus, _): self
        case (_, .bogus): other
        case (.insecure, _), (_, .insecure): .insecure
        case (.secure, .secure): .secure
        }
    }

    public var isSecure: Bool { self == .secure }

    public var isBogus: Bool {
        if case .bogus = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .secure: "secure"
        case .insecure: "insecure"
        case .bogus(let reason): "bogus (\(reason))"
        }
    }
}

/// The result of one look-up.
///
/// An empty `records` array with `nxdomain == false` is NODATA: the name exists but has no
/// records of the type. A bogus answer never carries records, because its data cannot be
/// trusted for anything.
public struct DNSAnswer<Record: Sendable>: Sendable {
    public var records: [Record]
    public var status: DNSSECStatus
    /// The answer's TTL in seconds (for a negative answer, the negative-caching TTL).
    public var ttl: UInt32
    /// The name does not exist (RCODE NXDOMAIN).
    public var nxdomain: Bool

    public init(records: [Record], status: DNSSECStatus, ttl: UInt32, nxdomain: Bool) {
        self.records = records
        self.status = status
        self.ttl = ttl
        self.nxdomain = nxdomain
    }
}

extension DNSAnswer: Equatable where Record: Equatable {}
extension DNSAnswer: Hashable where Record: Hashable {}
