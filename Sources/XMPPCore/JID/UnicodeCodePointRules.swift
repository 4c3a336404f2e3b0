/// The code point rules that PRECIS (RFC 8264) and IDNA2008 (RFC 5892, RFC 5893) share:
/// derived properties computed from Unicode properties, the contextual rules of RFC 5892
/// Appendix A, and the Bidi Rule.
enum CodePointRules {
    /// A derived property value (RFC 5892 §1, RFC 8264 §8).
    enum Property: Equatable {
        case pvalid
        case contextJ
        case contextO
        /// PRECIS ID_DIS / FREE_PVAL: valid in the FreeformClass only.
        case freeformOnly
        case disallowed
        case unassigned
    }

    // MARK: Derived properties

    /// RFC 5892 §2.6 (Exceptions, category F), also used by PRECIS (RFC 8264 §9.2).
    static func exception(_ value: UInt32) -> Property? {
        switch value {
        case 0x00DF, 0x03C2, 0x06FD, 0x06FE, 0x0F0B, 0x3007:
            .pvalid
        case 0x00B7, 0x0375, 0x05F3, 0x05F4, 0x30FB, 0x0660...0x0669, 0x06F0...0x06F9:
            .contextO
        case 0x0640, 0x07FA, 0x302E, 0x302F, 0x3031...0x3035, 0x303B:
            .disallowed
        default:
            nil
        }
    }

    /// The IDNA2008 derived property, RFC 5892 §3. BackwardCompatible (category G) is empty.
    static func idna(_ scalar: Unicode.Scalar) -> Property {
        let value = scalar.value
        if value < 0x80 {
            // LDH (category E) is PVALID; every other ASCII code point is DISALLOWED: upper
            // case is Unstable, the rest are not LetterDigits.
            switch value {
            case 0x2D, 0x30...0x39, 0x61...0x7A: return .pvalid
            default: return .disallowed
            }
        }
        if let exception = exception(value) { return exception }
        if UCD.isUnassigned(scalar) { return .unassigned }
        let properties = scalar.properties
        if properties.isJoinControl { return .contextJ }
        // Unstable (B): toNFKC(toCaseFold(toNFKC(cp))) != cp, which is the derived
        // Changes_When_NFKC_Casefolded property. (That property also covers default
        // ignorables, which IgnorableProperties disallows anyway.)
        if properties.changesWhenNFKCCaseFolded { return .disallowed }
        // IgnorableProperties (C).
        if properties.isDefaultIgnorableCodePoint || properties.isWhitespace || properties.isNoncharacterCodePoint {
            return .disallowed
        }
        // IgnorableBlocks (D): Combining Diacritical Marks for Symbols, Musical Symbols,
        // Ancient Greek Musical Notation.
        switch value {
        case 0x20D0...0x20FF, 0x1D100...0x1D24F: return .disallowed
        default: break
        }
        if UCD.isOldHangulJamo(scalar) { return .disallowed }
        return isLetterDigit(properties.generalCategory) ? .pvalid : .disallowed
    }

    /// The PRECIS derived property, RFC 8264 §8. BackwardCompatible (category G) is empty.
    static func precis(_ scalar: Unicode.Scalar) -> Property {
        let value = scalar.value
        if value >= 0x21 && value <= 0x7E { return .pvalid }  // ASCII7 (K); no exceptions here
        if let exception = exception(value) { return exception }
        if UCD.isUnassigned(scalar) { return .unassigned }
        let properties = scalar.properties
        if properties.isJoinControl { return .contextJ }
        if UCD.isOldHangulJamo(scalar) { return .disallowed }
        // PrecisIgnorableProperties (M), then Controls (L).
        if properties.isDefaultIgnorableCodePoint || properties.isNoncharacterCodePoint { return .disallowed }
        let category = properties.generalCategory
        if category == .control { return .disallowed }
        if UCD.hasCompatibilityMapping(scalar) { return .freeformOnly }  // HasCompat (Q)
        if isLetterDigit(category) { return .pvalid }
        switch category {
        case .titlecaseLetter, .letterNumber, .otherNumber, .enclosingMark,  // OtherLetterDigits (R)
             .spaceSeparator,  // Spaces (N)
             .mathSymbol, .currencySymbol, .modifierSymbol, .otherSymbol,  // Symbols (O)
             .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
             .initialPunctuation, .finalPunctuation, .otherPunctuation:  // Punctuation (P)
            return .freeformOnly
        default:
            return .disallowed
        }
    }

    /// LetterDigits (category A of both RFC 5892 and RFC 8264).
    private static func isLetterDigit(_ category: Unicode.GeneralCategory) -> Bool {
        switch category {
        case .lowercaseLetter, .uppercaseLetter, .otherLetter, .decimalNumber, .modifierLetter,
             .nonspacingMark, .spacingMark:
            true
        default:
            false
        }
    }

    // MARK: Validation

    /// Checks every code point of `scalars` (a PRECIS string or one domain label) against a
    /// derived property, and the contextual rules for the CONTEXTJ and CONTEXTO ones.
    static func validate(
        _ scalars: [Unicode.Scalar],
        part: JIDError.Part,
        allowFreeformOnly: Bool,
        property: (Unicode.Scalar) -> Property
    ) throws(JIDError) {
        var needsContext = false
        for scalar in scalars {
            switch property(scalar) {
            case .pvalid:
                continue
            case .freeformOnly where allowFreeformOnly:
                continue
            case .contextJ, .contextO:
                needsContext = true
            case .freeformOnly, .disallowed, .unassigned:
                throw JIDError(part, .disallowedCharacter(scalar))
            }
        }
        guard needsContext else { return }
        let context = ContextualRules(scalars)
        for (index, scalar) in scalars.enumerated() {
            switch property(scalar) {
            case .contextJ, .contextO:
                if !context.holds(at: index) { throw JIDError(part, .contextRuleFailed(scalar)) }
            default:
                continue
            }
        }
    }

    /// The rules of RFC 5892 Appendix A, evaluated over one string or label.
    struct ContextualRules {
        let scalars: [Unicode.Scalar]
        /// Whether the string has a code point of the Hiragana, Katakana or Han script (A.7).
        let hasKanaOrHan: Bool
        let hasArabicIndicDigit: Bool
        let hasExtendedArabicIndicDigit: Bool

        init(_ scalars: [Unicode.Scalar]) {
            self.scalars = scalars
            var kanaOrHan = false
            var arabicIndic = false
            var extendedArabicIndic = false
            for scalar in scalars {
                switch scalar.value {
                case 0x0660...0x0669: arabicIndic = true
                case 0x06F0...0x06F9: extendedArabicIndic = true
                case 0x2E80...:  // the first Hiragana, Katakana or Han code point
                    if !kanaOrHan {
                        switch UCD.script(scalar) {
                        case .hiragana, .katakana, .han: kanaOrHan = true
                        default: break
                        }
                    }
                default: break
                }
            }
            hasKanaOrHan = kanaOrHan
            hasArabicIndicDigit = arabicIndic
            hasExtendedArabicIndicDigit = extendedArabicIndic
        }

        func holds(at index: Int) -> Bool {
            let before: Unicode.Scalar? = index > 0 ? scalars[index - 1] : nil
            let after: Unicode.Scalar? = index + 1 < scalars.count ? scalars[index + 1] : nil
            switch scalars[index].value {
            case 0x200C:
                // A.1 ZERO WIDTH NON-JOINER: after a virama, or between a left- or dual-joining
                // and a right- or dual-joining code point, with transparent ones in between.
                if let before, before.properties.canonicalCombiningClass.rawValue == 9 { return true }
                return joins(from: index - 1, step: -1, to: [.l, .d]) && joins(from: index + 1, step: 1, to: [.r, .d])
            case 0x200D:
                // A.2 ZERO WIDTH JOINER: only after a virama.
                guard let before else { return false }
                return before.properties.canonicalCombiningClass.rawValue == 9
            case 0x00B7:
                // A.3 MIDDLE DOT: only between two 'l', as in Catalan "l·l".
                return before == "l" && after == "l"
            case 0x0375:
                // A.4 GREEK LOWER NUMERAL SIGN (KERAIA): followed by a Greek code point.
                guard let after else { return false }
                return UCD.script(after) == .greek
            case 0x05F3, 0x05F4:
                // A.5, A.6 HEBREW PUNCTUATION GERESH and GERSHAYIM: after a Hebrew code point.
                guard let before else { return false }
                return UCD.script(before) == .hebrew
            case 0x30FB:
                // A.7 KATAKANA MIDDLE DOT: somewhere with Hiragana, Katakana or Han.
                return hasKanaOrHan
            case 0x0660...0x0669:
                // A.8 ARABIC-INDIC DIGITS: not mixed with Extended Arabic-Indic digits.
                return !hasExtendedArabicIndicDigit
            case 0x06F0...0x06F9:
                // A.9 EXTENDED ARABIC-INDIC DIGITS: not mixed with Arabic-Indic digits.
                return !hasArabicIndicDigit
            default:
                // A CONTEXTJ or CONTEXTO code point without a rule is not allowed.
                return false
            }
        }

        /// Skips transparent (Joining_Type T) code points from `start` in direction `step`
        /// and reports whether the next one has one of the joining types in `wanted`.
        private func joins(from start: Int, step: Int, to wanted: [UCD.JoiningType]) -> Bool {
            var index = start
            while index >= 0 && index < scalars.count {
                let type = UCD.joiningType(scalars[index])
                if type != .t { return wanted.contains(type) }
                index += step
            }
            return false
        }
    }

    // MARK: Bidi Rule

    /// Whether the string has a right-to-left code point (Bidi_Class R, AL or AN), which
    /// makes the Bidi Rule apply (RFC 5893 §1.4: an "RTL label").
    static func containsRightToLeft(_ scalars: some Sequence<Unicode.Scalar>) -> Bool {
        scalars.contains { scalar in
            guard scalar.value >= 0x0590 else { return false }  // nothing earlier is R, AL or AN
            switch UCD.bidiClass(scalar) {
            case .r, .al, .an: return true
            default: return false
            }
        }
    }

    /// The six conditions of the Bidi Rule, RFC 5893 §2.
    static func satisfiesBidiRule(_ scalars: [Unicode.Scalar]) -> Bool {
        guard let first = scalars.first else { return true }
        let classes = scalars.map(UCD.bidiClass)
        // The label ends with its last code point that is not NSM (conditions 3 and 6).
        let lastNonNSM = classes.last { $0 != .nsm }
        switch UCD.bidiClass(first) {
        case .r, .al:
            // Conditions 2, 3 and 4.
            var hasEN = false
            var hasAN = false
            for bidiClass in classes {
                switch bidiClass {
                case .r, .al, .es, .cs, .et, .on, .bn, .nsm: break
                case .en: hasEN = true
                case .an: hasAN = true
                case .l, .other: return false
                }
            }
            if hasEN && hasAN { return false }
            switch lastNonNSM {
            case .r, .al, .en, .an: return true
            default: return false
            }
        case .l:
            // Conditions 5 and 6.
            for bidiClass in classes {
                switch bidiClass {
                case .l, .en, .es, .cs, .et, .on, .bn, .nsm: break
                case .r, .al, .an, .other: return false
                }
            }
            switch lastNonNSM {
            case .l, .en: return true
            default: return false
            }
        default:
            // Condition 1: the first code point must be L, R or AL.
            return false
        }
    }
}
