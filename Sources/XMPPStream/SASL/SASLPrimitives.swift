import Crypto
import XMPPCore

// Small building blocks shared by the SASL mechanisms.

extension Base64 {
    /// The Base64 text of `bytes` as ASCII octets, for splicing into SCRAM messages, which
    /// are handled as bytes.
    static func encodeBytes(_ bytes: [UInt8]) -> [UInt8] {
        Array(encode(bytes).utf8)
    }

    /// Strictly decodes Base64 held as octets (a field of a SCRAM message); nil when the
    /// octets are not canonical padded Base64 (see ``Base64/decode(_:)``).
    static func decode(bytes: some Collection<UInt8>) -> [UInt8]? {
        guard bytes.allSatisfy({ $0 < 0x80 }) else { return nil }
        return decode(String(decoding: bytes, as: UTF8.self))
    }
}

enum SecretBytes {
    /// Compares two byte strings in time that depends only on their lengths, never on where
    /// they differ: every byte position of the longer one is visited and differences are
    /// accumulated without branching, so a proof or key cannot be guessed byte by byte.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        let length = max(a.count, b.count)
        var difference: UInt = UInt(truncatingIfNeeded: a.count ^ b.count)
        for index in 0 ..< length {
            let x = index < a.count ? a[index] : 0
            let y = index < b.count ? b[index] : 0
            difference |= UInt(x ^ y)
        }
        return difference == 0
    }

    /// `count` bytes from the system's cryptographically secure generator
    /// (`SystemRandomNumberGenerator` is getrandom(2) / arc4random on our platforms).
    static func random(count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        while bytes.count < count {
            var word = generator.next()
            for _ in 0 ..< 8 where bytes.count < count {
                bytes.append(UInt8(truncatingIfNeeded: word))
                word >>= 8
            }
        }
        return bytes
    }

    static func xor(_ a: [UInt8], _ b: [UInt8]) -> [UInt8] {
        var out = a
        for index in 0 ..< min(a.count, b.count) { out[index] ^= b[index] }
        return out
    }
}

extension SCRAMHash {
    /// The SASL mechanism name (RFC 5802 §4, RFC 7677 §2): `SCRAM-SHA-1`, `SCRAM-SHA-256`.
    public var mechanismName: String { "SCRAM-" + rawValue }

    /// The channel-binding variant's name: `SCRAM-SHA-1-PLUS`, `SCRAM-SHA-256-PLUS`.
    public var plusMechanismName: String { mechanismName + "-PLUS" }

    /// Output length of H and HMAC, which is also the length of every SCRAM key and proof.
    public var digestLength: Int {
        switch self {
        case .sha1: Insecure.SHA1.byteCount
        case .sha256: SHA256.byteCount
        }
    }

    /// H(data) of RFC 5802 §2.2.
    func hash(_ data: [UInt8]) -> [UInt8] {
        switch self {
        case .sha1: Array(Insecure.SHA1.hash(data: data))
        case .sha256: Array(SHA256.hash(data: data))
        }
    }

    /// HMAC(key, data) of RFC 5802 §2.2.
    func hmac(key: [UInt8], data: [UInt8]) -> [UInt8] {
        let symmetricKey = SymmetricKey(data: key)
        switch self {
        case .sha1: return Array(HMAC<Insecure.SHA1>.authenticationCode(for: data, using: symmetricKey))
        case .sha256: return Array(HMAC<SHA256>.authenticationCode(for: data, using: symmetricKey))
        }
    }
}
