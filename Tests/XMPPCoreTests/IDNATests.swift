import Testing
@testable import XMPPCore

@Suite("Punycode (RFC 3492)")
struct PunycodeTests {
    /// RFC 3492 §7.1 sample strings (those without mixed-case annotations).
    static let samples: [(String, String)] = [
        // (A) Arabic (Egyptian)
        ("\u{0644}\u{064A}\u{0647}\u{0645}\u{0627}\u{0628}\u{062A}\u{0643}\u{0644}\u{0645}\u{0648}\u{0634}\u{0639}\u{0631}\u{0628}\u{064A}\u{061F}",
         "egbpdaj6bu4bxfgehfvwxn"),
        // (B) Chinese (simplified)
        ("\u{4ED6}\u{4EEC}\u{4E3A}\u{4EC0}\u{4E48}\u{4E0D}\u{8BF4}\u{4E2D}\u{6587}", "ihqwcrb4cv8a8dqg056pqjye"),
        // (C) Chinese (traditional)
        ("\u{4ED6}\u{5011}\u{7232}\u{4EC0}\u{9EBD}\u{4E0D}\u{8AAA}\u{4E2D}\u{6587}", "ihqwctvzc91f659drss3x8bo0yb"),
        // (D) Czech
        ("Pro\u{010D}prost\u{011B}nemluv\u{00ED}\u{010D}esky", "Proprostnemluvesky-uyb24dma41a"),
        // (E) Hebrew
        ("\u{05DC}\u{05DE}\u{05D4}\u{05D4}\u{05DD}\u{05E4}\u{05E9}\u{05D5}\u{05D8}\u{05DC}\u{05D0}\u{05DE}\u{05D3}\u{05D1}\u{05E8}\u{05D9}\u{05DD}\u{05E2}\u{05D1}\u{05E8}\u{05D9}\u{05EA}",
         "4dbcagdahymbxekheh6e0a7fei0b"),
        // (G) Japanese
        ("\u{306A}\u{305C}\u{307F}\u{3093}\u{306A}\u{65E5}\u{672C}\u{8A9E}\u{3092}\u{8A71}\u{3057}\u{3066}\u{304F}\u{308C}\u{306A}\u{3044}\u{306E}\u{304B}",
         "n8jok5ay5dzabd5bym9f0cm5685rrjetr6pdxa"),
        // (J) Spanish
        ("Porqu\u{00E9}nopuedensimplementehablarenEspa\u{00F1}ol", "PorqunopuedensimplementehablarenEspaol-fmd56a"),
        // (L) 3<nen>B<gumi><kinpachi><sensei>
        ("3年B組金八先生", "3B-ww4c5e180e575a65lsy2b"),
        // (S) -> $1.00 <-
        ("-> $1.00 <-", "-> $1.00 <--"),
    ]

    @Test("RFC 3492 §7.1 samples encode", arguments: samples)
    func encode(_ unicode: String, _ punycode: String) throws {
        #expect(try Punycode.encode(Array(unicode.unicodeScalars)) == punycode)
    }

    @Test("RFC 3492 §7.1 samples decode", arguments: samples)
    func decode(_ unicode: String, _ punycode: String) throws {
        #expect(try Punycode.decode(punycode) == Array(unicode.unicodeScalars))
        // Digits are case-insensitive; basic code points are copied as they are.
        let upperBasic = unicode.unicodeScalars.map { scalar in
            scalar.value >= 0x61 && scalar.value <= 0x7A ? Unicode.Scalar(UInt8(scalar.value - 0x20)) : scalar
        }
        #expect(try Punycode.decode(punycode.uppercased()) == upperBasic)
    }

    @Test("Malformed Punycode throws", arguments: [
        ("-", "invalid Punycode digit"),  // a lone delimiter with no basic code points
        ("ab!c", "invalid Punycode digit"),
        ("a-b!", "invalid Punycode digit"),
        ("b", "truncated Punycode"),  // a digit that needs a continuation
        ("99999999999", "Punycode overflow"),
        ("\u{E9}-abc", "non-ASCII code point"),
    ])
    func malformed(_ input: String, _ why: String) {
        #expect(throws: JIDError(.domainpart, .invalidLabel(why))) { try Punycode.decode(input) }
    }

    @Test func decodesToCodePointsBeyondTheBMP() throws {
        #expect(try Punycode.decode("ls8h") == ["\u{1F4A9}"])
        #expect(try Punycode.encode(["\u{1F4A9}"]) == "ls8h")
        #expect(try Punycode.encode([]) == "")
    }
}

@Suite("IDNA2008 domainparts (RFC 7622 §3.2, RFC 5891)")
struct IDNATests {
    @Test("toUnicode maps and accepts", arguments: [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("a-b.c-d", "a-b.c-d"),
        ("xn--mnchen-3ya.de", "münchen.de"),
        ("XN--MNCHEN-3YA.DE", "münchen.de"),
        ("MÜNCHEN.DE", "münchen.de"),
        ("mu\u{0308}nchen.de", "münchen.de"),
        ("ｅｘａｍｐｌｅ．ｃｏｍ", "example.com"),
        ("ＥＸＡＭＰＬＥ。com", "example.com"),
        ("bücher｡example", "bücher.example"),
        ("例え。テスト", "例え.テスト"),
        ("xn--r8jz45g.xn--zckzah", "例え.テスト"),
        ("faß.de", "faß.de"),
        ("xn--fa-hia.de", "faß.de"),
        ("l·l.cat", "l·l.cat"),
        ("͵α.example", "͵α.example"),
        ("192.0.2.1", "192.0.2.1"),
        // Capital sigma maps to U+03C3 whatever its position (as in UTS #46).
        ("ΟΔΟΣ.gr", "οδοσ.gr"),
        ("οδος.gr", "οδος.gr"),
        ("\u{0628}\u{200C}\u{0628}.example", "\u{0628}\u{200C}\u{0628}.example"),
        ("xn--ngba799q", "\u{0628}\u{200C}\u{0628}"),  // the same label as an A-label
        // Bidi domain names: every label must satisfy the Bidi Rule.
        ("אב.example", "אב.example"),
        ("a123.אב.example", "a123.אב.example"),
        ("אב1.example", "אב1.example"),
        ("אב\u{05B0}.example", "אב\u{05B0}.example"),
    ])
    func accepts(_ input: String, _ expected: String) throws {
        #expect(try codePoints(IDNA.toUnicode(input[...])) == codePoints(expected))
        // The result is canonical: preparing it again changes nothing.
        #expect(try codePoints(IDNA.toUnicode(expected[...])) == codePoints(expected))
    }

    @Test("toUnicode rejects", arguments: [
        ("xn--abc-.example", JIDError.Reason.invalidLabel("A-label does not encode a U-label")),
        ("xn--.example", .invalidLabel("A-label does not encode a U-label")),
        ("xn--a-b!.example", .invalidLabel("invalid Punycode digit")),
        ("xn--y-xbb.example", .invalidLabel("A-label does not decode to a canonical U-label")),  // "y" + COMBINING ACUTE
        ("xn--wca.example", .invalidLabel("A-label does not decode to a canonical U-label")),  // an A-label for an upper-case U-label
        ("xn--ls8h.example", .disallowedCharacter("\u{1F4A9}")),
        ("-abc.example", .invalidLabel("label begins or ends with a hyphen")),
        ("abc-.example", .invalidLabel("label begins or ends with a hyphen")),
        ("ab--cd.example", .invalidLabel("\"--\" in the third and fourth positions")),
        ("a..b", .invalidLabel("empty label")),
        (".example", .invalidLabel("empty label")),
        ("\u{0301}a.example", .invalidLabel("label begins with a combining mark")),
        ("_xmpp.example", .disallowedCharacter("_")),
        ("a b.example", .disallowedCharacter(" ")),
        ("example.com:5222", .disallowedCharacter(":")),
        ("😀.example", .disallowedCharacter("😀")),
        ("\u{0378}.example", .disallowedCharacter("\u{0378}")),
        ("\u{00AD}.example", .disallowedCharacter("\u{00AD}")),
        ("ⅳ.example", .disallowedCharacter("ⅳ")),
        ("a\u{200D}b.example", .contextRuleFailed("\u{200D}")),
        ("a·b.example", .contextRuleFailed("\u{00B7}")),
        ("١۲.example", .contextRuleFailed("\u{0661}")),
        ("123.אב.example", .bidiRuleFailed),
        ("אבa.example", .bidiRuleFailed),
        ("אב1\u{0661}.example", .bidiRuleFailed),
    ])
    func rejects(_ input: String, _ reason: JIDError.Reason) {
        #expect(throws: JIDError(.domainpart, reason)) { try IDNA.toUnicode(input[...]) }
    }

    @Test("An A-label that decodes to a label the mapping would change is rejected")
    func aLabelMustDecodeToCanonicalForm() throws {
        // Found by FuzzJID: uppercase Cherokee is PVALID, but lower-casing maps it to
        // DISALLOWED small letters, so accepting it would give a canonical form that does not
        // parse again.
        #expect(throws: JIDError.self) { try IDNA.toUnicode("xn--Bmr-Sequencet") }
        #expect(throws: JIDError.self) { try JID("3er@xn--Bmr-Sequencet.") }
        // An ordinary A-label still decodes.
        #expect(try IDNA.toUnicode("xn--mnchen-3ya.de") == "münchen.de")
    }

    @Test func labelLengthIsMeasuredOnTheALabel() throws {
        let ascii63 = String(repeating: "a", count: 63)
        #expect(try IDNA.toUnicode("\(ascii63).example"[...]) == "\(ascii63).example")
        #expect(throws: JIDError(.domainpart, .tooLong)) { try IDNA.toUnicode("\(ascii63)a.example"[...]) }
        // 57 é make a 63-octet A-label, 58 a 64-octet one.
        let accented57 = String(repeating: "é", count: 57)
        #expect(try IDNA.toASCII(accented57).utf8.count == 63)
        #expect(try codePoints(IDNA.toUnicode("\(accented57).example"[...])) == codePoints("\(accented57).example"))
        #expect(throws: JIDError(.domainpart, .tooLong)) { try IDNA.toUnicode("\(accented57)é.example"[...]) }
        // An over-long A-label is refused before it is decoded.
        #expect(throws: JIDError(.domainpart, .tooLong)) { try IDNA.toUnicode("xn--\(ascii63)"[...]) }
    }

    @Test func nameLengthIsMeasuredOnTheALabelForm() throws {
        let label63 = String(repeating: "a", count: 63)
        let name253 = [label63, label63, label63, String(repeating: "b", count: 61)].joined(separator: ".")
        #expect(try IDNA.toUnicode(name253[...]) == name253)
        #expect(throws: JIDError(.domainpart, .tooLong)) { try IDNA.toUnicode((name253 + "b")[...]) }
        // "münchen" is 7 characters but its A-label "xn--mnchen-3ya" is 14 octets.
        let withIDN = [label63, label63, label63, String(repeating: "b", count: 53), "münchen"].joined(separator: ".")
        #expect(withIDN.unicodeScalars.count == 253)
        #expect(throws: JIDError(.domainpart, .tooLong)) { try IDNA.toUnicode(withIDN[...]) }
        #expect(throws: JIDError(.domainpart, .tooLong)) { try JID("juliet@" + withIDN) }
    }

    @Test("toASCII", arguments: [
        ("münchen.de", "xn--mnchen-3ya.de"),
        ("example.com", "example.com"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("faß.de", "xn--fa-hia.de"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("192.0.2.1", "192.0.2.1"),
    ])
    func toASCII(_ domain: String, _ expected: String) throws {
        #expect(try IDNA.toASCII(domain) == expected)
    }

    @Test("IDNA2008 derived property (RFC 5892 §3)", arguments: [
        ("a", CodePointRules.Property.pvalid),
        ("-", .pvalid),
        ("7", .pvalid),
        ("A", .disallowed),
        ("_", .disallowed),
        ("\u{00DF}", .pvalid),
        ("\u{03C2}", .pvalid),
        ("\u{00E9}", .pvalid),
        ("\u{00C9}", .disallowed),  // Unstable: changes under case folding
        ("\u{00B7}", .contextO),
        ("\u{0660}", .contextO),
        ("\u{200C}", .contextJ),
        ("\u{200D}", .contextJ),
        ("\u{0640}", .disallowed),
        ("\u{1100}", .disallowed),
        ("\u{2163}", .disallowed),
        ("\u{20D0}", .disallowed),  // IgnorableBlocks
        ("\u{1D100}", .disallowed),
        ("\u{00A0}", .disallowed),
        (noncharacter, .disallowed),
        ("\u{0378}", .unassigned),
        ("\u{4E2D}", .pvalid),
    ] as [(Unicode.Scalar, CodePointRules.Property)])
    func idnaProperty(_ scalar: Unicode.Scalar, _ expected: CodePointRules.Property) {
        #expect(CodePointRules.idna(scalar) == expected)
    }
}

@Suite("IPv6 literals (RFC 4291, RFC 5952)")
struct IPLiteralTests {
    @Test("Canonical form", arguments: [
        ("[::1]", "[::1]"),
        ("[::]", "[::]"),
        ("[2001:DB8::0:1]", "[2001:db8::1]"),
        ("[2001:0db8:0000:0000:0000:0000:0000:0001]", "[2001:db8::1]"),
        ("[2001:db8:0:0:1:0:0:1]", "[2001:db8::1:0:0:1]"),  // the first of two equal runs
        ("[2001:db8:0:0:0:1:0:0]", "[2001:db8::1:0:0]"),
        ("[2001:db8:0:1:1:1:1:1]", "[2001:db8:0:1:1:1:1:1]"),  // a single zero group stays
        ("[fe80:0:0:0:1:0:0:0]", "[fe80::1:0:0:0]"),
        ("[1:0:0:2:0:0:0:3]", "[1:0:0:2::3]"),  // the longer run wins
        ("[1:2:3:4:5:6:7:8]", "[1:2:3:4:5:6:7:8]"),
        ("[1::]", "[1::]"),
        ("[::ffff:192.0.2.1]", "[::ffff:192.0.2.1]"),
        ("[::FFFF:c000:0201]", "[::ffff:192.0.2.1]"),
        ("[0:0:0:0:0:ffff:192.0.2.1]", "[::ffff:192.0.2.1]"),
        ("[64:ff9b::192.0.2.33]", "[64:ff9b::c000:221]"),
        ("[::192.0.2.1]", "[::c000:201]"),
    ])
    func canonical(_ input: String, _ expected: String) throws {
        #expect(try IPLiteral.canonicalIPv6(input[...]) == expected)
    }

    @Test("Invalid literals", arguments: [
        "[1::2::3]", "[::1", "::1", "[]", "[:]", "[:::]", "[1:2:3:4:5:6:7]", "[1:2:3:4:5:6:7:8:9]",
        "[1:2:3:4:5:6:7::8]", "[12345::]", "[::g]", "[1:]", "[:1]", "[::1%eth0]", "[::1%25eth0]",
        "[::192.0.2.256]", "[::192.0.2]", "[::01.2.3.4]", "[::1.2.3.4:5]", "[v1.abc]", "[192.0.2.1]",
        "[::1]x", "[ ::1]",
    ])
    func invalid(_ input: String) {
        #expect(throws: JIDError(.domainpart, .invalidIPLiteral)) { try IPLiteral.canonicalIPv6(input[...]) }
    }
}
