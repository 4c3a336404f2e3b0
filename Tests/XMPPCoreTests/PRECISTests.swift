import Testing
@testable import XMPPCore

/// U+FDD0, a noncharacter, which Swift does not accept in a literal.
let noncharacter = Unicode.Scalar(UInt32(0xFDD0)) ?? "?"

@Suite("PRECIS profiles (RFC 8264, RFC 8265)")
struct PRECISTests {
    // MARK: UsernameCaseMapped

    @Test("UsernameCaseMapped maps and accepts", arguments: [
        ("Juliet", "juliet"),
        ("ＪＵＬＩＥＴ", "juliet"),  // width mapping, then case mapping
        ("ＡＢ", "ab"),
        ("ｶﾞ", "\u{30AC}"),  // halfwidth katakana + voiced mark, composed by NFC
        ("A\u{030A}", "\u{E5}"),  // A + COMBINING RING ABOVE → å
        ("Σ", "σ"),
        ("ς", "ς"),
        ("ΟΔΟΣ", "οδος"),  // toLowerCase applies Final_Sigma
        ("fußball", "fußball"),
        ("İ", "i\u{0307}"),  // full lowercase mapping
        ("π", "π"),
        ("l·l", "l·l"),  // A.3: MIDDLE DOT between two l
        ("L·L", "l·l"),  // mapped before the context rule is checked
        ("͵α", "͵α"),  // A.4: KERAIA before a Greek letter
        ("א׳", "א׳"),  // A.5: GERESH after a Hebrew letter
        ("カ・a", "カ・a"),  // A.7: KATAKANA MIDDLE DOT with Katakana in the string
        ("\u{0915}\u{094D}\u{200D}\u{0937}", "\u{0915}\u{094D}\u{200D}\u{0937}"),  // A.2: ZWJ after a virama
        ("\u{0915}\u{094D}\u{200C}\u{0937}", "\u{0915}\u{094D}\u{200C}\u{0937}"),  // A.1: ZWNJ after a virama
        ("\u{0628}\u{200C}\u{0628}", "\u{0628}\u{200C}\u{0628}"),  // A.1: ZWNJ between dual-joining letters
        ("\u{0628}\u{064E}\u{200C}\u{064E}\u{0628}", "\u{0628}\u{064E}\u{200C}\u{064E}\u{0628}"),  // ... across transparent marks
        ("\u{0628}\u{0661}\u{0662}", "\u{0628}\u{0661}\u{0662}"),  // A.8, and an RTL string ending in AN
        ("אב1", "אב1"),  // RTL string ending in a European digit
        ("\u{1100}\u{1161}", "\u{AC00}"),  // conjoining jamo compose to a syllable before the check
        ("foo\\20bar", "foo\\20bar"),
        ("juliet!#$%", "juliet!#$%"),
    ])
    func usernameAccepts(_ input: String, _ expected: String) throws {
        #expect(try codePoints(PRECIS.usernameCaseMapped(input[...])) == codePoints(expected))
        // Enforcement is idempotent.
        #expect(try codePoints(PRECIS.usernameCaseMapped(expected[...])) == codePoints(expected))
    }

    @Test("UsernameCaseMapped rejects", arguments: [
        ("foo bar", JIDError.Reason.disallowedCharacter(" ")),
        ("a\tb", .disallowedCharacter("\t")),
        ("henryⅣ", .disallowedCharacter("\u{2173}")),
        ("ﬀ", .disallowedCharacter("\u{FB00}")),  // compatibility character
        ("x\u{00A0}y", .disallowedCharacter("\u{00A0}")),  // NO-BREAK SPACE is not mapped here
        ("♚", .disallowedCharacter("♚")),
        ("😀", .disallowedCharacter("😀")),
        ("a\u{00AD}", .disallowedCharacter("\u{00AD}")),  // default ignorable
        ("\u{0640}", .disallowedCharacter("\u{0640}")),  // exception: DISALLOWED
        ("\u{E000}", .disallowedCharacter("\u{E000}")),  // private use
        (String(noncharacter), .disallowedCharacter(noncharacter)),
        ("\u{0378}", .disallowedCharacter("\u{0378}")),  // unassigned
        ("\u{1100}", .disallowedCharacter("\u{1100}")),  // old Hangul jamo on its own
        ("\u{202E}abc", .disallowedCharacter("\u{202E}")),  // bidi override
        ("a·b", .contextRuleFailed("\u{00B7}")),
        ("͵a", .contextRuleFailed("\u{0375}")),
        ("׳א", .contextRuleFailed("\u{05F3}")),
        ("a・b", .contextRuleFailed("\u{30FB}")),
        ("a\u{200C}b", .contextRuleFailed("\u{200C}")),
        ("a\u{200D}b", .contextRuleFailed("\u{200D}")),
        ("\u{0628}\u{200C}", .contextRuleFailed("\u{200C}")),  // nothing right-joining after ZWNJ
        ("\u{0627}\u{200C}\u{0628}", .contextRuleFailed("\u{200C}")),  // ALEF is right-joining only
        ("\u{0661}\u{06F2}", .contextRuleFailed("\u{0661}")),  // mixed Arabic-Indic digit sets
        ("אבa", .bidiRuleFailed),  // L in an RTL string
        ("aאב", .bidiRuleFailed),  // R in an LTR string
        ("אב-", .bidiRuleFailed),  // RTL string ending in ES
        ("1אב", .bidiRuleFailed),  // starts with EN
        ("אב1\u{0661}", .bidiRuleFailed),  // EN and AN together
        ("\u{0661}\u{0662}", .bidiRuleFailed),  // AN makes it RTL, and AN cannot come first
    ])
    func usernameRejects(_ input: String, _ reason: JIDError.Reason) {
        #expect(throws: JIDError(.localpart, reason)) { try PRECIS.usernameCaseMapped(input[...]) }
    }

    @Test func usernameRejectsEmpty() {
        #expect(throws: JIDError(.localpart, .empty)) { try PRECIS.usernameCaseMapped(""[...]) }
    }

    @Test func finalSigmaDependsOnContext() throws {
        #expect(try codePoints(PRECIS.usernameCaseMapped("ΣΑΣ"[...])) == codePoints("σας"))
        #expect(try codePoints(PRECIS.usernameCaseMapped("ΣΣ"[...])) == codePoints("σς"))
        // Followed by a cased letter after a case-ignorable one: not final.
        #expect(try codePoints(PRECIS.usernameCaseMapped("ΑΣ\u{0301}Α"[...])) == codePoints("ασ\u{0301}α"))
    }

    // MARK: OpaqueString

    @Test("OpaqueString maps and accepts", arguments: [
        ("Foo", "Foo"),  // no case mapping
        ("foo bar", "foo bar"),
        (" foo", " foo"),
        ("foo ", "foo "),
        ("A\u{00A0}B", "A B"),  // non-ASCII spaces become U+0020
        ("\u{2003}x\u{3000}", " x "),
        ("Ｒ", "Ｒ"),  // no width mapping
        ("Ⅳ", "Ⅳ"),
        ("ﬀ", "ﬀ"),
        ("😀", "😀"),
        ("♚", "♚"),
        ("aאב", "aאב"),  // no directionality rule
        ("e\u{0301}", "\u{E9}"),
        ("a@b/c", "a@b/c"),
        ("l·l", "l·l"),
    ])
    func opaqueAccepts(_ input: String, _ expected: String) throws {
        #expect(try codePoints(PRECIS.opaqueString(input[...])) == codePoints(expected))
        #expect(try codePoints(PRECIS.opaqueString(expected[...])) == codePoints(expected))
    }

    @Test("OpaqueString rejects", arguments: [
        ("\u{0000}", JIDError.Reason.disallowedCharacter("\u{0000}")),
        ("a\tb", .disallowedCharacter("\t")),
        ("\u{007F}", .disallowedCharacter("\u{007F}")),
        ("x\u{0085}", .disallowedCharacter("\u{0085}")),
        ("\u{00AD}", .disallowedCharacter("\u{00AD}")),
        ("\u{E000}", .disallowedCharacter("\u{E000}")),
        ("\u{0378}", .disallowedCharacter("\u{0378}")),
        ("line\u{2028}break", .disallowedCharacter("\u{2028}")),
        ("a\u{200D}b", .contextRuleFailed("\u{200D}")),
        ("a·b", .contextRuleFailed("\u{00B7}")),
    ])
    func opaqueRejects(_ input: String, _ reason: JIDError.Reason) {
        #expect(throws: JIDError(.resourcepart, reason)) { try PRECIS.opaqueString(input[...]) }
    }

    // MARK: Derived properties and Unicode data

    @Test("PRECIS derived property (RFC 8264 §8)", arguments: [
        ("a", CodePointRules.Property.pvalid),
        ("!", .pvalid),
        ("~", .pvalid),
        (" ", .freeformOnly),
        ("\u{00A0}", .freeformOnly),  // HasCompat
        ("\u{2163}", .freeformOnly),
        ("♚", .freeformOnly),
        ("\u{1F88}", .freeformOnly),  // titlecase letter without a compatibility mapping: OtherLetterDigits
        ("\u{00DF}", .pvalid),
        ("\u{00B7}", .contextO),
        ("\u{200C}", .contextJ),
        ("\u{0009}", .disallowed),
        ("\u{0640}", .disallowed),
        ("\u{1100}", .disallowed),
        (noncharacter, .disallowed),
        ("\u{E000}", .disallowed),
        ("\u{0378}", .unassigned),
    ] as [(Unicode.Scalar, CodePointRules.Property)])
    func precisProperty(_ scalar: Unicode.Scalar, _ expected: CodePointRules.Property) {
        #expect(CodePointRules.precis(scalar) == expected)
    }

    @Test func normalisationAndWidthMapping() {
        #expect(codePoints(UCD.nfc("A\u{030A}")) == codePoints("\u{C5}"))
        #expect(UCD.nfc("A\u{030A}").unicodeScalars.map(\.value) == [0xC5])
        #expect(UCD.nfc("\u{1112}\u{1161}\u{11AB}").unicodeScalars.map(\.value) == [0xD55C])
        #expect(UCD.nfc("\u{212B}").unicodeScalars.map(\.value) == [0xC5])  // singleton decomposition
        let widthMapped = "ＡＢ１\u{3000}ｶ".unicodeScalars.map { UCD.widthMapping($0) ?? $0 }
        #expect(widthMapped.map(\.value) == [0x41, 0x42, 0x31, 0x20, 0x30AB])
        #expect(UCD.widthMapping("A") == nil)
        #expect(UCD.widthMapping("\u{2163}") == nil)  // a compatibility mapping, not a width one
    }

    @Test("Bidi_Class table", arguments: [
        ("a", UCD.BidiClass.l),
        ("1", .en),
        ("+", .es),
        ("$", .et),
        (",", .cs),
        ("!", .on),
        (" ", .other),
        ("\u{05D0}", .r),
        ("\u{0628}", .al),
        ("\u{0661}", .an),
        ("\u{06F1}", .en),
        ("\u{0300}", .nsm),
        ("\u{200C}", .bn),
        ("\u{202E}", .other),
        ("\u{4E2D}", .l),
        ("\u{1E900}", .r),  // ADLAM CAPITAL LETTER ALIF
    ] as [(Unicode.Scalar, UCD.BidiClass)])
    func bidiClass(_ scalar: Unicode.Scalar, _ expected: UCD.BidiClass) {
        #expect(UCD.bidiClass(scalar) == expected)
    }

    @Test func otherTables() {
        #expect(UCD.joiningType("\u{0628}") == .d)
        #expect(UCD.joiningType("\u{0627}") == .r)
        #expect(UCD.joiningType("\u{064E}") == .t)
        #expect(UCD.joiningType("\u{200D}") == .c)
        #expect(UCD.joiningType("a") == .u)
        #expect(UCD.script("\u{03B1}") == .greek)
        #expect(UCD.script("\u{05D0}") == .hebrew)
        #expect(UCD.script("\u{3042}") == .hiragana)
        #expect(UCD.script("\u{30AB}") == .katakana)
        #expect(UCD.script("\u{6F22}") == .han)
        #expect(UCD.script("\u{30FB}") == .other)  // KATAKANA MIDDLE DOT is Common
        #expect(UCD.script("a") == .other)
        #expect(UCD.isOldHangulJamo("\u{1100}"))
        #expect(UCD.isOldHangulJamo("\u{11FF}"))
        #expect(!UCD.isOldHangulJamo("\u{AC00}"))
        #expect(UCD.hasCompatibilityMapping("\u{FB00}"))
        #expect(UCD.hasCompatibilityMapping("\u{212B}"))  // canonical singleton: NFKC changes it too
        #expect(!UCD.hasCompatibilityMapping("\u{E9}"))
        #expect(UCD.isUnassigned("\u{0378}"))
        #expect(!UCD.isUnassigned(noncharacter))
        #expect(!UCD.isUnassigned("\u{1C89}"))  // assigned in Unicode 16.0
    }
}
