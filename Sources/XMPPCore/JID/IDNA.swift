/// IDNA2008 processing of a JID domainpart (RFC 7622 §3.2; RFC 5890–5895).
///
/// A JID carries its domainpart as U-labels, lower case and in NFC: A-labels are decoded,
/// and only NR-LDH labels and U-labels are allowed. DNS and certificate matching need the
/// A-label form, which `toASCII` produces.
enum IDNA {
    /// DNS limits, applied to the A-label form (RFC 5890 §2.3.2.1, RFC 1034 §3.1). The name
    /// limit is 253 octets because the 255 of RFC 1035 counts the length octets of the wire
    /// form, and 253 is what that allows for a textual name without a trailing dot.
    static let maximumLabelLength = 63
    static let maximumNameLength = 253

    /// Prepares a domainpart that is not an IP literal: maps it (RFC 5895), converts
    /// A-labels to U-labels, validates every label (RFC 5891 §5.4) and the DNS limits, and
    /// returns the U-label form joined with ".". The caller has already stripped one
    /// trailing dot.
    static func toUnicode(_ input: Substring) throws(JIDError) -> String {
        guard !input.isEmpty else { throw JIDError(.domainpart, .empty) }
        let mapped = map(input)

        var uLabels: [[Unicode.Scalar]] = []
        var aLabelLengths = 0
        var label: [Unicode.Scalar] = []
        var scalars = mapped.makeIterator()
        while true {
            let next = scalars.next()
            if let next, next != "." {
                label.append(next)
                continue
            }
            let (uLabel, aLabelLength) = try prepareLabel(label)
            uLabels.append(uLabel)
            aLabelLengths += aLabelLength
            label.removeAll(keepingCapacity: true)
            if next == nil { break }
        }
        guard aLabelLengths + uLabels.count - 1 <= maximumNameLength else {
            throw JIDError(.domainpart, .tooLong)
        }

        // RFC 5893 §1.4, §2: in a domain name with any right-to-left label, every label
        // must satisfy the Bidi Rule.
        if uLabels.contains(where: { CodePointRules.containsRightToLeft($0) }) {
            for uLabel in uLabels where !CodePointRules.satisfiesBidiRule(uLabel) {
                throw JIDError(.domainpart, .bidiRuleFailed)
            }
        }

        var result = String.UnicodeScalarView()
        for (index, uLabel) in uLabels.enumerated() {
            if index > 0 { result.append(".") }
            result.append(contentsOf: uLabel)
        }
        return String(result)
    }

    /// Converts a canonical domainpart (from `toUnicode` or the ASCII fast path) to its
    /// A-label form. IP literals and all-ASCII names are returned unchanged.
    static func toASCII(_ domain: String) throws(JIDError) -> String {
        if domain.utf8.allSatisfy({ $0 < 0x80 }) { return domain }
        var result = ""
        var first = true
        // Split on the octet, not on Characters: "." followed by a combining mark would be
        // one Character.
        for label in domain.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            if !first { result += "." }
            first = false
            let label = Substring(label)
            if label.utf8.allSatisfy({ $0 < 0x80 }) {
                result += label
            } else {
                result += "xn--"
                result += try Punycode.encode(Array(label.unicodeScalars))
            }
        }
        return result
    }

    // MARK: Mapping

    /// The mapping of RFC 5895 §2: lower case, width mapping, NFC, and the ideographic full
    /// stops of step 4 mapped to ".". RFC 7622 §3.2 asks for case and width mapping and
    /// normalisation of the domainpart.
    ///
    /// Lower-casing uses each code point's full lowercase mapping without the Final_Sigma
    /// context: as in UTS #46, a capital sigma becomes U+03C3, whereas a final sigma typed as
    /// such (U+03C2) stays distinct, as IDNA2008 makes it PVALID.
    static func map(_ input: Substring) -> String.UnicodeScalarView {
        var mapped = String.UnicodeScalarView()
        for scalar in input.unicodeScalars {
            if scalar.value < 0x80 {
                let value = scalar.value
                mapped.append(value >= 0x41 && value <= 0x5A ? Unicode.Scalar(UInt8(value + 0x20)) : scalar)
                continue
            }
            if scalar.properties.changesWhenLowercased {
                for lower in scalar.properties.lowercaseMapping.unicodeScalars {
                    mapped.append(UCD.widthMapping(lower) ?? lower)
                }
            } else {
                mapped.append(UCD.widthMapping(scalar) ?? scalar)
            }
        }
        var normalized = UCD.nfc(String(mapped)).unicodeScalars
        if normalized.contains(where: { $0 == "\u{3002}" || $0 == "\u{FF0E}" || $0 == "\u{FF61}" }) {
            var dotted = String.UnicodeScalarView()
            for scalar in normalized {
                switch scalar {
                case "\u{3002}", "\u{FF0E}", "\u{FF61}": dotted.append(".")
                default: dotted.append(scalar)
                }
            }
            normalized = dotted
        }
        return normalized
    }

    // MARK: Labels

    /// Validates one mapped label and returns its U-label form and the length of its A-label.
    private static func prepareLabel(_ label: [Unicode.Scalar]) throws(JIDError) -> ([Unicode.Scalar], Int) {
        guard !label.isEmpty else { throw JIDError(.domainpart, .invalidLabel("empty label")) }
        let isASCII = label.allSatisfy { $0.value < 0x80 }
        if isASCII {
            // Check the length before any decoding, so that a long label costs nothing.
            guard label.count <= maximumLabelLength else { throw JIDError(.domainpart, .tooLong) }
            if hasACEPrefix(label) {
                return (try decodeALabel(label), label.count)
            }
            try validateULabel(label)
            return (label, label.count)
        }
        // An A-label is at least as long as its U-label has code points; check that bound
        // first so that encoding a long label costs nothing.
        guard label.count + 4 <= maximumLabelLength else { throw JIDError(.domainpart, .tooLong) }
        try validateULabel(label)
        let aLabelLength = 4 + (try Punycode.encode(label)).utf8.count
        guard aLabelLength <= maximumLabelLength else { throw JIDError(.domainpart, .tooLong) }
        return (label, aLabelLength)
    }

    private static func hasACEPrefix(_ label: [Unicode.Scalar]) -> Bool {
        label.count >= 4 && label[0] == "x" && label[1] == "n" && label[2] == "-" && label[3] == "-"
    }

    /// RFC 5891 §5.3: decodes an A-label (already lower case) and checks that it is the
    /// A-label of a valid U-label.
    private static func decodeALabel(_ label: [Unicode.Scalar]) throws(JIDError) -> [Unicode.Scalar] {
        var encoded = String.UnicodeScalarView()
        encoded.append(contentsOf: label[4...])
        let decoded = try Punycode.decode(String(encoded))
        // A U-label has at least one non-ASCII code point (RFC 5890 §2.3.2.1), so an
        // "xn--" label that decodes to ASCII, or to nothing, is not an A-label.
        guard decoded.contains(where: { $0.value >= 0x80 }) else {
            throw JIDError(.domainpart, .invalidLabel("A-label does not encode a U-label"))
        }
        // The decoded label must already be what the mapping produces (lower case, width
        // mapped, NFC): otherwise the canonical domainpart would change when parsed again.
        // Uppercase Cherokee is the case in point: PVALID itself, but lower-cased to small
        // letters that are DISALLOWED (found by FuzzJID). Compare code points: `String ==`
        // is canonical equivalence and would always agree.
        let decodedString = String(String.UnicodeScalarView(decoded))
        guard map(decodedString[...]).elementsEqual(decoded) else {
            throw JIDError(.domainpart, .invalidLabel("A-label does not decode to a canonical U-label"))
        }
        try validateULabel(decoded)
        // The round trip must give back the same A-label: this rejects non-canonical
        // encodings of the same code points.
        guard try Punycode.encode(decoded).unicodeScalars.elementsEqual(label[4...]) else {
            throw JIDError(.domainpart, .invalidLabel("A-label does not round-trip"))
        }
        return decoded
    }

    /// The per-label checks of RFC 5891 §5.4 except the Bidi Rule, which is checked across
    /// the whole name.
    private static func validateULabel(_ label: [Unicode.Scalar]) throws(JIDError) {
        try CodePointRules.validate(label, part: .domainpart, allowFreeformOnly: false, property: CodePointRules.idna)
        // RFC 5891 §4.2.3.1: no "--" in the third and fourth positions (those labels are
        // reserved; valid A-labels were decoded before getting here), and no hyphen at
        // either end.
        if label.count >= 4 && label[2] == "-" && label[3] == "-" {
            throw JIDError(.domainpart, .invalidLabel("\"--\" in the third and fourth positions"))
        }
        if label.first == "-" || label.last == "-" {
            throw JIDError(.domainpart, .invalidLabel("label begins or ends with a hyphen"))
        }
        // RFC 5891 §4.2.3.2: a label must not begin with a combining mark.
        if let first = label.first {
            switch first.properties.generalCategory {
            case .nonspacingMark, .spacingMark, .enclosingMark:
                throw JIDError(.domainpart, .invalidLabel("label begins with a combining mark"))
            default:
                break
            }
        }
    }
}

/// IP literals in a domainpart (RFC 7622 §3.2, which takes the IP-literal of RFC 3986).
enum IPLiteral {
    /// Parses `[IPv6address]` (RFC 4291 §2.2 text forms, including a trailing dotted IPv4
    /// address) and returns it bracketed in the canonical form of RFC 5952 §4: lower-case
    /// hexadecimal without leading zeros, the longest run (the first of equal runs) of two or
    /// more zero groups shortened to "::". IPv4-mapped addresses keep the dotted suffix
    /// (RFC 5952 §5). Zone identifiers and IPvFuture literals are rejected.
    static func canonicalIPv6(_ input: Substring) throws(JIDError) -> String {
        let bytes = Array(input.utf8)
        guard bytes.count >= 4, bytes.first == UInt8(ascii: "["), bytes.last == UInt8(ascii: "]") else {
            throw JIDError(.domainpart, .invalidIPLiteral)
        }
        guard let groups = parseIPv6(bytes[1 ..< bytes.count - 1]) else {
            throw JIDError(.domainpart, .invalidIPLiteral)
        }
        return "[" + format(groups) + "]"
    }

    /// Parses the text form of an IPv6 address into its eight 16-bit groups.
    static func parseIPv6(_ text: ArraySlice<UInt8>) -> [UInt16]? {
        guard text.count >= 2, text.count <= 45 else { return nil }
        var head: [UInt16] = []
        var tail: [UInt16] = []
        var compressed = false
        var index = text.startIndex
        // "::" at the very start: the loop below expects a group after every single colon.
        if text[index] == UInt8(ascii: ":") {
            guard text[index + 1] == UInt8(ascii: ":") else { return nil }
            compressed = true
            index += 2
        }
        while index < text.endIndex {
            // One group, or a dotted IPv4 address at the end.
            let start = index
            while index < text.endIndex, text[index] != UInt8(ascii: ":") { index += 1 }
            let field = text[start ..< index]
            if field.contains(UInt8(ascii: ".")) {
                guard index == text.endIndex, let ipv4 = parseIPv4(field) else { return nil }
                if compressed { tail += ipv4 } else { head += ipv4 }
                break
            }
            guard let group = parseGroup(field) else { return nil }
            if compressed { tail.append(group) } else { head.append(group) }
            if index == text.endIndex { break }
            // Step over ":" or "::".
            index += 1
            if index < text.endIndex, text[index] == UInt8(ascii: ":") {
                guard !compressed else { return nil }
                compressed = true
                index += 1
                if index == text.endIndex { break }
            } else if index == text.endIndex {
                return nil  // a trailing single colon
            }
        }
        let count = head.count + tail.count
        if compressed {
            // "::" stands for at least one zero group (RFC 4291 §2.2 item 2).
            guard count <= 7 else { return nil }
            return head + Array(repeating: 0, count: 8 - count) + tail
        }
        return count == 8 ? head : nil
    }

    private static func parseGroup(_ field: ArraySlice<UInt8>) -> UInt16? {
        guard !field.isEmpty, field.count <= 4 else { return nil }
        var value: UInt16 = 0
        for byte in field {
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            value = value << 4 | UInt16(digit)
        }
        return value
    }

    /// A dotted-quad IPv4 address as two groups; each part is a dec-octet of RFC 3986 §3.2.2
    /// (0–255, no leading zeros).
    private static func parseIPv4(_ field: ArraySlice<UInt8>) -> [UInt16]? {
        var octets: [UInt16] = []
        for part in field.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
            if part.count > 1 && part.first == UInt8(ascii: "0") { return nil }
            let value = part.reduce(UInt16(0)) { $0 * 10 + UInt16($1 - 0x30) }
            guard value <= 255 else { return nil }
            octets.append(value)
        }
        guard octets.count == 4 else { return nil }
        return [octets[0] << 8 | octets[1], octets[2] << 8 | octets[3]]
    }

    private static func format(_ groups: [UInt16]) -> String {
        // IPv4-mapped addresses, ::ffff:0:0/96, are written with the dotted suffix.
        if groups[0 ..< 5].allSatisfy({ $0 == 0 }) && groups[5] == 0xFFFF {
            let octets = [groups[6] >> 8, groups[6] & 0xFF, groups[7] >> 8, groups[7] & 0xFF]
            return "::ffff:" + octets.map { String($0) }.joined(separator: ".")
        }
        // The longest run of zero groups, two or more long; the first one on a tie.
        var bestStart = -1
        var bestLength = 1
        var runStart = -1
        for index in 0 ... 8 {
            if index < 8 && groups[index] == 0 {
                if runStart < 0 { runStart = index }
            } else if runStart >= 0 {
                if index - runStart > bestLength {
                    bestStart = runStart
                    bestLength = index - runStart
                }
                runStart = -1
            }
        }
        let hex = groups.map { String($0, radix: 16) }
        guard bestStart >= 0 else { return hex.joined(separator: ":") }
        let before = hex[..<bestStart].joined(separator: ":")
        let after = hex[(bestStart + bestLength)...].joined(separator: ":")
        return before + "::" + after
    }
}
