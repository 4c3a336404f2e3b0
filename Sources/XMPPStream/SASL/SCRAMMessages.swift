import XMPPCore

// The SCRAM message syntax of RFC 5802 §7, shared by SCRAMServer and SCRAMClient. Messages
// are handled as bytes: the AuthMessage that both sides sign is built from the exact octets
// that were sent, so nothing here re-serialises what it parsed.

enum SCRAMSyntax {
    static let comma = UInt8(ascii: ",")
    static let equals = UInt8(ascii: "=")

    /// Splits on commas, keeping empty fields so that `,,` is seen and rejected.
    static func fields(_ bytes: ArraySlice<UInt8>) -> [ArraySlice<UInt8>] {
        bytes.split(separator: comma, omittingEmptySubsequences: false)
    }

    /// The value of `field` if it is the attribute `name` (`name=value`), else nil.
    static func value(of field: ArraySlice<UInt8>, named name: Character) -> ArraySlice<UInt8>? {
        guard let ascii = name.asciiValue, field.count >= 2,
              field[field.startIndex] == ascii,
              field[field.startIndex + 1] == equals else { return nil }
        return field.dropFirst(2)
    }

    /// Whether `bytes` is valid UTF-8 with no NUL: RFC 5802 §7 builds every value from
    /// UTF8-char and excludes NUL from all of them.
    static func isTextWithoutNUL(_ bytes: ArraySlice<UInt8>) -> Bool {
        guard !bytes.contains(0) else { return false }
        return String(validating: bytes, as: UTF8.self) != nil
    }

    /// `saslname` of RFC 5802 §7: one or more characters, where `,` and `=` appear only as
    /// `=2C` and `=3D`. Any other use of `=` is an error (RFC 5802 §5.1, "n" attribute).
    static func decodeSaslname(_ value: ArraySlice<UInt8>) -> String? {
        guard !value.isEmpty else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(value.count)
        var index = value.startIndex
        while index < value.endIndex {
            let byte = value[index]
            if byte == equals {
                guard value.endIndex - index >= 3 else { return nil }
                let escape = (value[index + 1], value[index + 2])
                switch escape {
                case (UInt8(ascii: "2"), UInt8(ascii: "C")): out.append(comma)
                case (UInt8(ascii: "3"), UInt8(ascii: "D")): out.append(equals)
                default: return nil
                }
                index += 3
            } else {
                guard byte != comma, byte != 0 else { return nil }
                out.append(byte)
                index += 1
            }
        }
        return String(validating: out, as: UTF8.self)
    }

    /// The inverse of ``decodeSaslname(_:)``.
    static func encodeSaslname(_ string: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(string.utf8.count)
        for byte in string.utf8 {
            switch byte {
            case comma: out.append(contentsOf: "=2C".utf8)
            case equals: out.append(contentsOf: "=3D".utf8)
            default: out.append(byte)
            }
        }
        return out
    }

    /// `c-nonce` / `s-nonce`: one or more `printable` characters, %x21-7E except `,`.
    static func isValidNonce(_ value: ArraySlice<UInt8>) -> Bool {
        !value.isEmpty && value.allSatisfy { $0 >= 0x21 && $0 <= 0x7E && $0 != comma }
    }

    /// An optional extension `attr-val` (ALPHA "=" 1*value-char) other than `m`, which
    /// RFC 5802 §5.1 reserves: its presence MUST cause authentication to fail, since no
    /// mandatory extension is defined that we could honour.
    static func isIgnorableExtension(_ field: ArraySlice<UInt8>) -> Bool {
        guard field.count >= 3, let first = field.first,
              (first >= UInt8(ascii: "a") && first <= UInt8(ascii: "z")) || (first >= UInt8(ascii: "A") && first <= UInt8(ascii: "Z")),
              field[field.startIndex + 1] == equals else { return false }
        return first != UInt8(ascii: "m")
    }

    /// `cb-name` of RFC 5056 §7: ALPHA / DIGIT / "." / "-", at least one.
    static func isValidChannelBindingName(_ value: ArraySlice<UInt8>) -> Bool {
        !value.isEmpty && value.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "-")
        }
    }

    /// A positive decimal iteration count without leading zeros, bounded so that it fits
    /// an Int on every platform.
    static func parseIterationCount(_ value: ArraySlice<UInt8>) -> Int? {
        guard !value.isEmpty, value.count <= 9, value.first != UInt8(ascii: "0") else { return nil }
        var result = 0
        for byte in value {
            guard byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") else { return nil }
            result = result * 10 + Int(byte - UInt8(ascii: "0"))
        }
        return result
    }
}

/// The GS2 header that starts a client-first message (RFC 5802 §7, RFC 5801 §4).
struct GS2Header: Sendable, Hashable {
    enum ChannelBindingFlag: Sendable, Hashable {
        /// `n`: the client does not support channel binding.
        case notSupported
        /// `y`: the client supports channel binding but thinks the server does not.
        case supportedButNotUsed
        /// `p=name`: the client uses channel binding of this type.
        case used(type: String)
    }

    var flag: ChannelBindingFlag
    var authzid: String?

    /// The header as sent, including its final comma; `c=` in the client-final message
    /// covers exactly these bytes (RFC 5802 §5.1, "c" attribute).
    var encoded: [UInt8] {
        var out: [UInt8]
        switch flag {
        case .notSupported: out = Array("n".utf8)
        case .supportedButNotUsed: out = Array("y".utf8)
        case .used(let type): out = Array("p=".utf8) + Array(type.utf8)
        }
        out.append(SCRAMSyntax.comma)
        if let authzid {
            out.append(contentsOf: "a=".utf8)
            out.append(contentsOf: SCRAMSyntax.encodeSaslname(authzid))
        }
        out.append(SCRAMSyntax.comma)
        return out
    }
}

/// A parsed client-first message (RFC 5802 §7).
struct SCRAMClientFirst: Sendable {
    var header: GS2Header
    /// The header's octets as received.
    var headerBytes: [UInt8]
    /// client-first-message-bare, as received: it goes into AuthMessage verbatim.
    var bare: [UInt8]
    /// The username, unescaped but not yet prepared.
    var username: String
    var nonce: [UInt8]

    /// Parses client-first-message. Every syntax error is `malformed-request` (RFC 6120
    /// §6.5.8): these octets are already out of their outer Base64 wrapping.
    static func parse(_ message: [UInt8]) throws(SASLFailure) -> SCRAMClientFirst {
        let bytes = message[...]
        guard SCRAMSyntax.isTextWithoutNUL(bytes) else { throw .malformedRequest }

        // gs2-cbind-flag ","
        var rest = bytes
        let flag: GS2Header.ChannelBindingFlag
        if rest.starts(with: "n,".utf8) {
            flag = .notSupported
            rest = rest.dropFirst(2)
        } else if rest.starts(with: "y,".utf8) {
            flag = .supportedButNotUsed
            rest = rest.dropFirst(2)
        } else if rest.starts(with: "p=".utf8) {
            rest = rest.dropFirst(2)
            guard let end = rest.firstIndex(of: SCRAMSyntax.comma) else { throw .malformedRequest }
            let name = rest[..<end]
            guard SCRAMSyntax.isValidChannelBindingName(name) else { throw .malformedRequest }
            flag = .used(type: String(decoding: name, as: UTF8.self))
            rest = rest[(end + 1)...]
        } else {
            throw .malformedRequest
        }

        // [ authzid ] ","
        var authzid: String?
        if rest.starts(with: "a=".utf8) {
            guard let end = rest.firstIndex(of: SCRAMSyntax.comma),
                  let decoded = SCRAMSyntax.decodeSaslname(rest[(rest.startIndex + 2) ..< end]) else {
                throw .malformedRequest
            }
            authzid = decoded
            rest = rest[(end + 1)...]
        } else if rest.first == SCRAMSyntax.comma {
            rest = rest.dropFirst()
        } else {
            throw .malformedRequest
        }
        let headerBytes = Array(bytes[..<rest.startIndex])

        // client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        // A leading `m=` is the reserved mandatory extension: it must fail (RFC 5802 §5.1).
        let fields = SCRAMSyntax.fields(rest)
        guard fields.count >= 2,
              let rawUsername = SCRAMSyntax.value(of: fields[0], named: "n"),
              let username = SCRAMSyntax.decodeSaslname(rawUsername),
              let nonce = SCRAMSyntax.value(of: fields[1], named: "r"),
              SCRAMSyntax.isValidNonce(nonce) else {
            throw .malformedRequest
        }
        for field in fields.dropFirst(2) where !SCRAMSyntax.isIgnorableExtension(field) {
            throw .malformedRequest
        }
        return SCRAMClientFirst(
            header: GS2Header(flag: flag, authzid: authzid),
            headerBytes: headerBytes,
            bare: Array(rest),
            username: username,
            nonce: Array(nonce)
        )
    }
}

/// A parsed client-final message (RFC 5802 §7).
struct SCRAMClientFinal: Sendable {
    /// The decoded `c=` value: GS2 header followed by any channel-binding data.
    var channelBinding: [UInt8]
    var nonce: [UInt8]
    var proof: [UInt8]
    /// client-final-message-without-proof, as received, for AuthMessage.
    var withoutProof: [UInt8]

    /// Parses client-final-message. Syntax errors are `malformed-request`; a `c=` or `p=`
    /// value that is not valid Base64 is `incorrect-encoding` (RFC 6120 §6.5.5, which names
    /// Base64 errors; these are the only Base64 values inside a SCRAM message).
    static func parse(_ message: [UInt8], proofLength: Int) throws(SASLFailure) -> SCRAMClientFinal {
        let bytes = message[...]
        guard SCRAMSyntax.isTextWithoutNUL(bytes) else { throw .malformedRequest }
        // client-final-message = channel-binding "," nonce ["," extensions] "," proof
        let fields = SCRAMSyntax.fields(bytes)
        guard fields.count >= 3,
              let lastField = fields.last,
              let encodedProof = SCRAMSyntax.value(of: lastField, named: "p"),
              let encodedBinding = SCRAMSyntax.value(of: fields[0], named: "c"),
              let nonce = SCRAMSyntax.value(of: fields[1], named: "r"),
              SCRAMSyntax.isValidNonce(nonce) else {
            throw .malformedRequest
        }
        for field in fields.dropFirst(2).dropLast() where !SCRAMSyntax.isIgnorableExtension(field) {
            throw .malformedRequest
        }
        guard let binding = Base64.decode(bytes: encodedBinding), let proof = Base64.decode(bytes: encodedProof) else {
            throw .incorrectEncoding
        }
        // ClientProof is as long as the hash output; anything else cannot be a proof.
        guard proof.count == proofLength else { throw .malformedRequest }
        // The proof field is last and Base64 has no commas, so it starts after the last comma.
        let withoutProofEnd = lastField.startIndex - 1
        return SCRAMClientFinal(
            channelBinding: binding,
            nonce: Array(nonce),
            proof: proof,
            withoutProof: Array(bytes[..<withoutProofEnd])
        )
    }
}
