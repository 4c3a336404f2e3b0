// Parsing of the record data (RDATA) that libunbound hands back in `ub_result->data`: each
// item is one record's RDATA in network format, with names uncompressed (SRV targets must not
// be compressed anyway, RFC 2782 "Target"; RFC 3597 §4). Every read is bounds-checked and
// anything that does not fit the type's layout is a `DNSError.malformedRecord`.

/// A bounds-checked cursor over one record's RDATA.
struct RdataReader {
    let bytes: [UInt8]
    let type: DNSRecordType
    private(set) var offset = 0

    init(_ bytes: [UInt8], type: DNSRecordType) {
        self.bytes = bytes
        self.type = type
    }

    var remaining: Int { bytes.count - offset }

    func malformed(_ reason: String) -> DNSError {
        .malformedRecord(type: type, reason: reason)
    }

    mutating func readUInt8() throws(DNSError) -> UInt8 {
        guard remaining >= 1 else { throw malformed("truncated at byte \(offset)") }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func readUInt16() throws(DNSError) -> UInt16 {
        guard remaining >= 2 else { throw malformed("truncated at byte \(offset)") }
        defer { offset += 2 }
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    mutating func readRest() -> [UInt8] {
        defer { offset = bytes.count }
        return Array(bytes[offset...])
    }

    /// Reads an uncompressed domain name (RFC 1035 §3.1) and returns it in presentation form:
    /// lower-case, without the trailing dot, `"."` for the root. Bytes other than letters,
    /// digits, `-` and `_` are written as `\DDD` (RFC 1035 §5.1), so an odd label can never
    /// be mistaken for a label boundary.
    mutating func readName() throws(DNSError) -> String {
        var labels: [String] = []
        var wireLength = 0
        while true {
            let length = try readUInt8()
            wireLength += 1
            if length == 0 { break }
            // 0b11 is a compression pointer and 0b01/0b10 are extended label types (RFC 6891
            // §5); none of them is allowed here.
            guard length & 0xC0 == 0 else { throw malformed("compressed or extended label in name") }
            guard remaining >= Int(length) else { throw malformed("label runs past the end of the data") }
            wireLength += Int(length)
            guard wireLength <= 255 else { throw malformed("name longer than 255 octets") }
            var label = ""
            label.reserveCapacity(Int(length))
            for byte in bytes[offset ..< offset + Int(length)] {
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                    UInt8(ascii: "-"), UInt8(ascii: "_"):
                    label.unicodeScalars.append(Unicode.Scalar(byte))
                case UInt8(ascii: "A")...UInt8(ascii: "Z"):
                    label.unicodeScalars.append(Unicode.Scalar(byte + 0x20))
                default:
                    let digits = String(byte)
                    label += "\\" + String(repeating: "0", count: 3 - digits.count) + digits
                }
            }
            offset += Int(length)
            labels.append(label)
        }
        return labels.isEmpty ? "." : labels.joined(separator: ".")
    }

    func expectEnd() throws(DNSError) {
        guard remaining == 0 else { throw malformed("\(remaining) unexpected trailing bytes") }
    }
}

extension SRVRecord {
    /// Parses SRV RDATA (RFC 2782): priority, weight, port (16 bits each), then the target.
    public init(rdata: [UInt8]) throws(DNSError) {
        var reader = RdataReader(rdata, type: .srv)
        let priority = try reader.readUInt16()
        let weight = try reader.readUInt16()
        let port = try reader.readUInt16()
        let target = try reader.readName()
        try reader.expectEnd()
        self.init(priority: priority, weight: weight, port: port, target: target)
    }
}

extension TLSARecord {
    /// Parses TLSA RDATA (RFC 6698 §2.1): usage, selector, matching type (8 bits each), then
    /// the certificate association data, which must not be empty.
    public init(rdata: [UInt8]) throws(DNSError) {
        var reader = RdataReader(rdata, type: .tlsa)
        let usage = try reader.readUInt8()
        let selector = try reader.readUInt8()
        let matchingType = try reader.readUInt8()
        guard reader.remaining > 0 else { throw reader.malformed("no certificate association data") }
        self.init(usage: usage, selector: selector, matchingType: matchingType, data: reader.readRest())
    }
}

extension IPAddress {
    /// Parses A (4 bytes, RFC 1035 §3.4.1) or AAAA (16 bytes, RFC 3596 §2.2) RDATA.
    public init(rdata: [UInt8], type: DNSRecordType) throws(DNSError) {
        let expected: Int
        switch type {
        case .a: expected = 4
        case .aaaa: expected = 16
        default: throw DNSError.malformedRecord(type: type, reason: "not an address record type")
        }
        guard rdata.count == expected, let address = IPAddress(bytes: rdata) else {
            throw DNSError.malformedRecord(type: type, reason: "\(rdata.count) bytes, expected \(expected)")
        }
        self = address
    }
}
