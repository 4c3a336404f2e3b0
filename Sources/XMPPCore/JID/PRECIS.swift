/// The PRECIS profiles that JIDs use (RFC 8265, on the framework of RFC 8264):
/// UsernameCaseMapped for the localpart (RFC 7622 §3.3) and OpaqueString for the
/// resourcepart (RFC 7622 §3.4).
enum PRECIS {
    /// Enforces UsernameCaseMapped (RFC 8265 §3.3, §3.4): width mapping, case mapping
    /// (Unicode toLowerCase), NFC, then the IdentifierClass and the Bidi Rule.
    static func usernameCaseMapped(_ input: Substring) throws(JIDError) -> String {
        try enforce(input, part: .localpart, applyingOnce: usernameCaseMappedOnce)
    }

    /// Enforces OpaqueString (RFC 8265 §4.2): non-ASCII spaces mapped to U+0020, NFC, then
    /// the FreeformClass. It has no width or case mapping and no directionality rule.
    ///
    /// Spaces are valid anywhere, including at the start: RFC 7622 §3.5 lists
    /// `juliet@example.com/ foo` as invalid, but no rule of OpaqueString (or of RFC 7622
    /// §3.4) rejects a leading space, so we follow the profile and accept it.
    static func opaqueString(_ input: Substring) throws(JIDError) -> String {
        try enforce(input, part: .resourcepart, applyingOnce: opaqueStringOnce)
    }

    /// Applies a profile until the result is stable. RFC 8264 §7 warns that one
    /// application need not be idempotent and says to re-apply the rules, at most three more
    /// times, and to reject a string that does not settle. For these two profiles one
    /// re-application confirms stability, so a changed string costs one extra pass.
    private static func enforce(
        _ input: Substring,
        part: JIDError.Part,
        applyingOnce apply: (String, JIDError.Part) throws(JIDError) -> String
    ) throws(JIDError) -> String {
        guard !input.isEmpty else { throw JIDError(part, .empty) }
        var current = String(input)
        for _ in 0 ..< 4 {
            let next = try apply(current, part)
            // Compare octets: `String ==` is canonical equivalence, blind to normalisation.
            if next.utf8.elementsEqual(current.utf8) { return next }
            current = next
        }
        throw JIDError(part, .invalidLabel("preparation does not reach a stable result"))
    }

    private static func usernameCaseMappedOnce(_ string: String, part: JIDError.Part) throws(JIDError) -> String {
        // Width mapping: <wide> and <narrow> code points to their decompositions.
        var scalars: [Unicode.Scalar] = []
        scalars.reserveCapacity(string.unicodeScalars.count)
        for scalar in string.unicodeScalars {
            scalars.append(UCD.widthMapping(scalar) ?? scalar)
        }
        // Case mapping, then normalisation.
        scalars = UCD.lowercased(scalars)
        let normalized = UCD.nfc(String(String.UnicodeScalarView(scalars)))
        let prepared = Array(normalized.unicodeScalars)
        try CodePointRules.validate(prepared, part: part, allowFreeformOnly: false, property: CodePointRules.precis)
        // Directionality: the Bidi Rule applies to strings with right-to-left code points.
        if CodePointRules.containsRightToLeft(prepared) && !CodePointRules.satisfiesBidiRule(prepared) {
            throw JIDError(part, .bidiRuleFailed)
        }
        guard !prepared.isEmpty else { throw JIDError(part, .empty) }
        return normalized
    }

    private static func opaqueStringOnce(_ string: String, part: JIDError.Part) throws(JIDError) -> String {
        // Additional mapping: any non-ASCII space (general category Zs) becomes U+0020.
        var mapped = String.UnicodeScalarView()
        for scalar in string.unicodeScalars {
            if scalar.value >= 0x80 && scalar.properties.generalCategory == .spaceSeparator {
                mapped.append(" ")
            } else {
                mapped.append(scalar)
            }
        }
        let normalized = UCD.nfc(String(mapped))
        let prepared = Array(normalized.unicodeScalars)
        try CodePointRules.validate(prepared, part: part, allowFreeformOnly: true, property: CodePointRules.precis)
        guard !prepared.isEmpty else { throw JIDError(part, .empty) }
        return normalized
    }
}
