import XMPPCore

/// Turning the names callers give us into query names.
///
/// RFC 7673 §8 (and RFC 6120 §3.2.1) want A-labels in every query. Domains may arrive as
/// U-labels (`bücher.example`), so the host part goes through XMPPCore's IDNA2008 code
/// (`JID(domain:).asciiDomain`). The leading `_service._proto` / `_port._tcp` labels of SRV and
/// TLSA names are not hostnames and would be rejected by IDNA, so they are split off first
/// and only checked for the characters such labels use.
public enum DNSName {
    /// The lower-case A-label form of `name`, without a trailing dot.
    ///
    /// - Throws: ``DNSError/invalidName(_:)`` when the name is empty, has an invalid label,
    ///   is too long, or is an IP literal (which is not something to query).
    public static func queryName(_ name: String) throws(DNSError) -> String {
        var text = Substring(name)
        if text.hasSuffix(".") { text = text.dropLast() }
        guard !text.isEmpty else { throw .invalidName(name) }

        var serviceLabels: [String] = []
        var rest = text
        while rest.hasPrefix("_") {
            let end = rest.firstIndex(of: ".") ?? rest.endIndex
            let label = rest[..<end]
            guard label.utf8.count <= 63,
                label.utf8.allSatisfy({ isServiceLabelByte($0) })
            else { throw .invalidName(name) }
            serviceLabels.append(label.lowercased())
            guard end < rest.endIndex else { throw .invalidName(name) }
            rest = rest[rest.index(after: end)...]
        }
        guard !rest.isEmpty, ipLiteral(String(rest)) == nil, !rest.hasPrefix("[") else {
            throw .invalidName(name)
        }
        let host: String
        do {
            host = try JID(domain: rest).asciiDomain
        } catch {
            throw .invalidName(name)
        }
        let full = (serviceLabels + [host]).joined(separator: ".")
        guard full.utf8.count <= 253 else { throw .invalidName(name) }
        return full
    }

    /// The address when `host` is an IP literal: a dotted-quad IPv4 address, or an IPv6
    /// address with or without brackets (a JID domainpart may be either, RFC 7622 §3.2).
    public static func ipLiteral(_ host: String) -> IPAddress? {
        // Only digits, dots, hex digits, colons and brackets can form an address; checking
        // first keeps ordinary hostnames away from inet_pton.
        guard host.utf8.allSatisfy({ $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: ":") || $0 == UInt8(ascii: "[") || $0 == UInt8(ascii: "]") || isHexDigit($0) }) else {
            return nil
        }
        return IPAddress(host)
    }

    private static func isServiceLabelByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
            true
        default:
            false
        }
    }

    private static func isHexDigit(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "a")...UInt8(ascii: "f"),
            UInt8(ascii: "A")...UInt8(ascii: "F"):
            true
        default:
            false
        }
    }
}
