/// Unicode properties that the PRECIS (RFC 8264) and IDNA2008 (RFC 5892) derivations need
/// but `Unicode.Scalar.Properties` lacks, read from the generated `UnicodeTables`, plus
/// normalisation and the mappings the profiles share.
enum UCD {
    /// Bidi_Class values, reduced to those the Bidi Rule (RFC 5893 §2) names.
    enum BidiClass: UInt8 {
        case l, r, al, en, es, et, an, cs, nsm, bn, on
        /// B, S, WS, and the explicit embedding, override and isolate controls: allowed in
        /// neither an LTR nor an RTL label.
        case other
    }

    enum JoiningType: UInt8 {
        case u, l, r, d, t, c
    }

    /// The scripts that the RFC 5892 Appendix A rules look for.
    enum Script: UInt8 {
        case other, greek, hebrew, hiragana, katakana, han
    }

    static func bidiClass(_ scalar: Unicode.Scalar) -> BidiClass {
        if scalar.value < 0x80 { return asciiBidiClass(scalar.value) }
        return BidiClass(rawValue: runValue(UnicodeTables.bidiClassRuns, scalar.value)) ?? .other
    }

    static func joiningType(_ scalar: Unicode.Scalar) -> JoiningType {
        JoiningType(rawValue: runValue(UnicodeTables.joiningTypeRuns, scalar.value)) ?? .u
    }

    static func script(_ scalar: Unicode.Scalar) -> Script {
        Script(rawValue: runValue(UnicodeTables.scriptRuns, scalar.value)) ?? .other
    }

    /// RFC 8264 §9.13 (HasCompat): the code point changes under NFKC.
    static func hasCompatibilityMapping(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value >= 0xA0 && runValue(UnicodeTables.hasCompatRuns, scalar.value) != 0
    }

    /// RFC 5892 §2.9, RFC 8264 §9.5 (OldHangulJamo): Hangul_Syllable_Type L, V or T.
    static func isOldHangulJamo(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value >= 0x1100 && runValue(UnicodeTables.oldHangulJamoRuns, scalar.value) != 0
    }

    /// Whether the code point is unassigned as far as these tables know (RFC 5892 §2.10,
    /// RFC 8264 §9.6: General_Category Cn and not a noncharacter). A code point that a newer
    /// standard library knows but the tables predate counts as unassigned, so that its
    /// missing Bidi_Class or HasCompat data can never let it through.
    static func isUnassigned(_ scalar: Unicode.Scalar) -> Bool {
        let properties = scalar.properties
        if properties.isNoncharacterCodePoint { return false }
        if properties.generalCategory == .unassigned { return true }
        guard let age = properties.age else { return true }
        return (age.major, age.minor) > UnicodeTables.version
    }

    /// The <wide> or <narrow> decomposition mapping of the code point, if it has one.
    static func widthMapping(_ scalar: Unicode.Scalar) -> Unicode.Scalar? {
        let value = scalar.value
        // Every <wide>/<narrow> code point is U+3000 IDEOGRAPHIC SPACE or in the Halfwidth
        // and Fullwidth Forms block; skip the search for the rest.
        guard value >= 0x3000 else { return nil }
        let table = UnicodeTables.widthMappings
        var low = 0
        var high = table.count / 2
        while low < high {
            let middle = (low + high) / 2
            let from = table[2 * middle]
            if from == value { return Unicode.Scalar(table[2 * middle + 1]) }
            if from < value { low = middle + 1 } else { high = middle }
        }
        return nil
    }

    /// Canonical composition (NFC).
    ///
    /// Uses the standard library's NFC, which is what `String` comparison itself relies
    /// on. It is underscored but public and part of the stdlib ABI; Foundation's
    /// `precomposedStringWithCanonicalMapping` would also work on Linux but would pull
    /// Foundation into XMPPCore for one call.
    static func nfc(_ string: String) -> String {
        if string.utf8.allSatisfy({ $0 < 0x80 }) { return string }
        return String(decoding: string._nfcCodeUnits, as: UTF8.self)
    }

    /// Unicode full lowercase mapping, toLowerCase() of Unicode §3.13, including the
    /// language-independent Final_Sigma condition (capital sigma becomes final sigma
    /// U+03C2 at the end of a word), which `lowercaseMapping` alone does not apply.
    static func lowercased(_ scalars: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var result: [Unicode.Scalar] = []
        result.reserveCapacity(scalars.count)
        for (index, scalar) in scalars.enumerated() {
            if scalar.value < 0x80 {
                result.append(scalar.value >= 0x41 && scalar.value <= 0x5A ? Unicode.Scalar(UInt8(scalar.value + 0x20)) : scalar)
            } else if scalar == "\u{03A3}" {
                result.append(isFinalSigma(scalars, at: index) ? "\u{03C2}" : "\u{03C3}")
            } else if scalar.properties.changesWhenLowercased {
                result.append(contentsOf: scalar.properties.lowercaseMapping.unicodeScalars)
            } else {
                result.append(scalar)
            }
        }
        return result
    }

    /// Unicode Table 3-17, Final_Sigma: preceded by a cased letter and then any case-ignorable
    /// code points, and not followed by any case-ignorable code points and then a cased letter.
    private static func isFinalSigma(_ scalars: [Unicode.Scalar], at index: Int) -> Bool {
        var before = index - 1
        while before >= 0 && scalars[before].properties.isCaseIgnorable { before -= 1 }
        guard before >= 0 && scalars[before].properties.isCased else { return false }
        var after = index + 1
        while after < scalars.count && scalars[after].properties.isCaseIgnorable { after += 1 }
        return !(after < scalars.count && scalars[after].properties.isCased)
    }

    // MARK: Table lookup

    /// The value of the run containing `value` in a table of `start << 4 | value` entries.
    private static func runValue(_ runs: [UInt32], _ value: UInt32) -> UInt8 {
        // Find the first run that starts after `value`; the one before it holds `value`.
        var low = 0
        var high = runs.count
        while low < high {
            let middle = (low + high) / 2
            if runs[middle] >> 4 <= value { low = middle + 1 } else { high = middle }
        }
        guard low > 0 else { return 0 }
        return UInt8(truncatingIfNeeded: runs[low - 1] & 0xF)
    }

    private static func asciiBidiClass(_ value: UInt32) -> BidiClass {
        switch value {
        case 0x30...0x39: .en
        case 0x41...0x5A, 0x61...0x7A: .l
        case 0x2B, 0x2D: .es
        case 0x23...0x25: .et
        case 0x2C, 0x2E, 0x2F, 0x3A: .cs
        case 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C...0x1F, 0x20: .other
        case 0x00...0x08, 0x0E...0x1B, 0x7F: .bn
        default: .on
        }
    }
}
