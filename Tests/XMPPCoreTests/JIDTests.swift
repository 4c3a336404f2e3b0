import Testing
@testable import XMPPCore

/// The code points of a string. Tests compare these rather than strings because
/// `String ==` is canonical equivalence, which would hide a missing normalisation.
func codePoints(_ string: String) -> [Unicode.Scalar] { Array(string.unicodeScalars) }
func codePoints(_ string: String?) -> [Unicode.Scalar]? { string.map(codePoints) }

@Suite("JID parsing and preparation (RFC 7622)")
struct JIDTests {
    struct Parts: Sendable, CustomTestStringConvertible {
        let input: String
        let localpart: String?
        let domainpart: String
        let resourcepart: String?
        let canonical: String

        init(_ input: String, _ localpart: String?, _ domainpart: String, _ resourcepart: String?, canonical: String? = nil) {
            self.input = input
            self.localpart = localpart
            self.domainpart = domainpart
            self.resourcepart = resourcepart
            self.canonical = canonical ?? input
        }

        var testDescription: String { input.debugDescription }
    }

    /// RFC 7622 §3.5, Table 1, with the canonical parts.
    static let validExamples: [Parts] = [
        Parts("juliet@example.com", "juliet", "example.com", nil),
        Parts("juliet@example.com/foo", "juliet", "example.com", "foo"),
        Parts("juliet@example.com/foo bar", "juliet", "example.com", "foo bar"),
        Parts("juliet@example.com/foo@bar", "juliet", "example.com", "foo@bar"),
        Parts("foo\\20bar@example.com", "foo\\20bar", "example.com", nil),
        Parts("fussball@example.com", "fussball", "example.com", nil),
        Parts("fußball@example.com", "fußball", "example.com", nil),
        Parts("π@example.com", "π", "example.com", nil),
        Parts("Σ@example.com/foo", "σ", "example.com", "foo", canonical: "σ@example.com/foo"),
        Parts("σ@example.com/foo", "σ", "example.com", "foo"),
        Parts("ς@example.com/foo", "ς", "example.com", "foo"),
        Parts("king@example.com/♚", "king", "example.com", "♚"),
        Parts("example.com", nil, "example.com", nil),
        Parts("example.com/foobar", nil, "example.com", "foobar"),
        Parts("a.example.com/b@example.net", nil, "a.example.com", "b@example.net"),
    ]

    @Test("RFC 7622 §3.5 valid JIDs", arguments: validExamples)
    func validExample(_ example: Parts) throws {
        let jid = try JID(example.input)
        #expect(codePoints(jid.localpart) == codePoints(example.localpart))
        #expect(codePoints(jid.domainpart) == codePoints(example.domainpart))
        #expect(codePoints(jid.resourcepart) == codePoints(example.resourcepart))
        #expect(codePoints(jid.description) == codePoints(example.canonical))
        // The canonical form parses to the same JID.
        #expect(try JID(jid.description) == jid)
    }

    /// RFC 7622 §3.5, Table 2, less `juliet@example.com/ foo` (see below), with the error
    /// each one gets.
    static let invalidExamples: [(String, JIDError)] = [
        ("\"juliet\"@example.com", JIDError(.localpart, .disallowedCharacter("\""))),
        ("foo bar@example.com", JIDError(.localpart, .disallowedCharacter(" "))),
        ("@example.com/", JIDError(.localpart, .empty)),
        // ROMAN NUMERAL FOUR is lower-cased to U+2173, which has a compatibility mapping.
        ("henryⅣ@example.com", JIDError(.localpart, .disallowedCharacter("\u{2173}"))),
        ("♚@example.com", JIDError(.localpart, .disallowedCharacter("♚"))),
        ("juliet@", JIDError(.domainpart, .empty)),
        ("/foobar", JIDError(.domainpart, .empty)),
    ]

    @Test("RFC 7622 §3.5 invalid JIDs", arguments: invalidExamples)
    func invalidExample(_ input: String, _ error: JIDError) {
        #expect(throws: error) { try JID(input) }
    }

    /// RFC 7622 §3.5 lists this as invalid ("leading space in resourcepart"), but
    /// OpaqueString (RFC 8265 §4.2) allows U+0020 anywhere and no rule rejects a leading
    /// one, so we accept it.
    @Test func leadingSpaceInResourcepartFollowsOpaqueString() throws {
        let jid = try JID("juliet@example.com/ foo")
        #expect(jid.resourcepart == " foo")
        #expect(jid.description == "juliet@example.com/ foo")
    }

    @Test("Other invalid JIDs", arguments: [
        ("example.com/", JIDError(.resourcepart, .empty)),
        ("@example.com", JIDError(.localpart, .empty)),
        ("", JIDError(.domainpart, .empty)),
        (".", JIDError(.domainpart, .empty)),
        ("a@b@example.com", JIDError(.domainpart, .disallowedCharacter("@"))),
        // Width mapping turns FULLWIDTH COMMERCIAL AT into "@", which a localpart forbids.
        ("a＠b@example.com", JIDError(.localpart, .disallowedCharacter("@"))),
        ("a／b@example.com", JIDError(.localpart, .disallowedCharacter("/"))),
        ("juliet@example.com/a\u{0}b", JIDError(.resourcepart, .disallowedCharacter("\u{0}"))),
        ("juliet@exa mple.com", JIDError(.domainpart, .disallowedCharacter(" "))),
        ("juliet@[::1", JIDError(.domainpart, .invalidIPLiteral)),
        ("juliet@[1::2::3]", JIDError(.domainpart, .invalidIPLiteral)),
    ])
    func otherInvalid(_ input: String, _ error: JIDError) {
        #expect(throws: error) { try JID(input) }
    }

    @Test func caseFolding() throws {
        let jid = try JID("Juliet@Example.COM/Foo")
        #expect(jid.description == "juliet@example.com/Foo")
        #expect(jid.localpart == "juliet")
        #expect(jid.resourcepart == "Foo")
    }

    @Test("One trailing dot is stripped", arguments: [
        ("juliet@example.com.", "juliet@example.com"),
        ("example.com./res", "example.com/res"),
        ("EXAMPLE.COM.", "example.com"),
        ("münchen.de.", "münchen.de"),
    ])
    func trailingDot(_ input: String, _ canonical: String) throws {
        #expect(try codePoints(JID(input).description) == codePoints(canonical))
    }

    @Test func twoTrailingDotsAreAnEmptyLabel() {
        #expect(throws: JIDError(.domainpart, .invalidLabel("empty label"))) { try JID("example.com..") }
    }

    @Test("Internationalised domainparts", arguments: [
        ("juliet@xn--mnchen-3ya.de", "juliet@münchen.de"),
        ("juliet@XN--MNCHEN-3YA.DE", "juliet@münchen.de"),
        ("juliet@MÜNCHEN.de", "juliet@münchen.de"),
        ("juliet@mu\u{0308}nchen.de", "juliet@münchen.de"),
        ("juliet@ｅｘａｍｐｌｅ．ｃｏｍ", "juliet@example.com"),
        ("ＥＸＡＭＰＬＥ。com/r", "example.com/r"),
        ("例え。テスト", "例え.テスト"),
    ])
    func internationalisedDomain(_ input: String, _ canonical: String) throws {
        #expect(try codePoints(JID(input).description) == codePoints(canonical))
    }

    @Test func asciiDomain() throws {
        let jid = try JID("juliet@xn--mnchen-3ya.de")
        #expect(codePoints(jid.domainpart) == codePoints("münchen.de"))
        #expect(jid.asciiDomain == "xn--mnchen-3ya.de")
        #expect(jid == (try JID("juliet@münchen.de")))
        #expect(try JID("例え.テスト").asciiDomain == "xn--r8jz45g.xn--zckzah")
        #expect(try JID("Example.COM").asciiDomain == "example.com")
        #expect(try JID("[2001:DB8::1]").asciiDomain == "[2001:db8::1]")
    }

    @Test("IP literals", arguments: [
        ("[::1]", "[::1]"),
        ("juliet@[2001:DB8::0:1]/r", "juliet@[2001:db8::1]/r"),
        ("[::ffff:192.0.2.1]", "[::ffff:192.0.2.1]"),
        ("192.0.2.1", "192.0.2.1"),
        ("juliet@192.0.2.1/r", "juliet@192.0.2.1/r"),
    ])
    func ipLiterals(_ input: String, _ canonical: String) throws {
        #expect(try codePoints(JID(input).description) == codePoints(canonical))
    }

    // MARK: Lengths

    @Test func localpartLengthLimit() throws {
        let longest = String(repeating: "a", count: 1023)
        #expect(try JID("\(longest)@example.com").localpart == longest)
        #expect(throws: JIDError(.localpart, .tooLong)) { try JID("\(longest)a@example.com") }
        // The limit is on octets after preparation: 511 é written decomposed are 1533
        // octets of input but 1022 once composed.
        let composed = String(repeating: "\u{E9}", count: 511) + "a"
        #expect(try codePoints(JID(String(repeating: "e\u{301}", count: 511) + "A@example.com").localpart) == codePoints(composed))
        #expect(throws: JIDError(.localpart, .tooLong)) { try JID(String(repeating: "\u{E9}", count: 512) + "@example.com") }
    }

    @Test func resourcepartLengthLimit() throws {
        let longest = String(repeating: "r", count: 1023)
        #expect(try JID("example.com/\(longest)").resourcepart == longest)
        #expect(throws: JIDError(.resourcepart, .tooLong)) { try JID("example.com/\(longest)r") }
        let emoji = String(repeating: "😀", count: 255) + "abc"
        #expect(try codePoints(JID("example.com/\(emoji)").resourcepart) == codePoints(emoji))
        #expect(throws: JIDError(.resourcepart, .tooLong)) { try JID("example.com/" + String(repeating: "😀", count: 256)) }
    }

    @Test func domainpartLengthLimits() throws {
        let longestName = [String](repeating: String(repeating: "a", count: 63), count: 3).joined(separator: ".") + "." + String(repeating: "b", count: 61)
        #expect(longestName.utf8.count == 253)
        #expect(try JID(longestName).domainpart == longestName)
        // 254 octets once in A-label form; the non-ASCII label takes the IDNA path.
        let tooLongName = [String](repeating: String(repeating: "a", count: 63), count: 3).joined(separator: ".") + "." + String(repeating: "b", count: 54) + ".ü"
        #expect(try IDNA.toASCII(tooLongName).utf8.count == 254)
        #expect(throws: JIDError(.domainpart, .tooLong)) { try JID(tooLongName) }
        #expect(throws: JIDError(.domainpart, .tooLong)) { try JID(String(repeating: "a", count: 64) + ".example") }
    }

    // MARK: Equality

    @Test func equalityAndHashingUseTheCanonicalForm() throws {
        #expect(try JID("A@B.c") == JID("a@b.c"))
        #expect(try JID("e\u{301}@example.com") == JID("\u{E9}@example.com"))
        #expect(try codePoints(JID("e\u{301}@example.com").localpart) == ["\u{E9}"])
        #expect(try JID("Σ@example.com") == JID("σ@example.com"))
        #expect(try JID("ς@example.com") != JID("σ@example.com"))
        #expect(try JID("fußball@example.com") != JID("fussball@example.com"))
        #expect(try JID("a@example.com/R") != JID("a@example.com/r"))
        let set: Set<JID> = [try JID("A@B.c"), try JID("a@b.c"), try JID("a@B.C."), try JID("a@b.c/r")]
        #expect(set.count == 2)
        #expect(set.contains(try JID("a@b.c")))
    }

    @Test func derivedAddresses() throws {
        let jid = try JID("Juliet@Example.com/Balcony")
        #expect(jid.bare.description == "juliet@example.com")
        #expect(jid.domain.description == "example.com")
        #expect(jid.isFull)
        #expect(!jid.isBare)
        #expect(try codePoints(jid.with(resource: "Orchard\u{3000}Wall").description) == codePoints("juliet@example.com/Orchard Wall"))
        #expect(throws: JIDError(.resourcepart, .empty)) { try jid.with(resource: "") }
    }

    @Test func partsInitialiserPreparesEachPart() throws {
        let jid = try JID(localpart: "ＪＵＬＩＥＴ", domainpart: "Example.COM.", resourcepart: "\u{2003}x")
        #expect(jid.localpart == "juliet")
        #expect(jid.domainpart == "example.com")
        #expect(jid.resourcepart == " x")
    }

    // MARK: Errors

    @Test("JIDError maps to jid-malformed", arguments: [
        JIDError(.localpart, .empty),
        JIDError(.domainpart, .invalidIPLiteral),
        JIDError(.resourcepart, .disallowedCharacter("\u{0}")),
        JIDError(.domainpart, .bidiRuleFailed),
    ])
    func stanzaErrorMapping(_ error: JIDError) {
        #expect(error.stanzaError.condition == .jidMalformed)
        #expect(error.stanzaError.type == .modify)
    }

    @Test func thrownErrorMapsToJIDMalformed() {
        do {
            _ = try JID("♚@example.com")
            Issue.record("expected an error")
        } catch {
            #expect(error.stanzaError.condition == .jidMalformed)
            #expect(error.description == "localpart contains disallowed U+265A")
        }
    }
}
