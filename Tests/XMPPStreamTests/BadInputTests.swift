import NIOCore
import Testing
import XMPPCore
@testable import XMPPStream

/// One test per bad-input case of RFC 6120 §4.9.3 and §11, each asserting the exact condition.
@Suite("Stream parser: bad input gets the RFC condition")
struct BadInputTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var input: [UInt8]
        var expected: StreamError.Condition
        var contentNamespace: String = XMLNamespace.client
        var limits: XMLStreamLimits = .client

        var testDescription: String { name }

        init(_ name: String, _ input: String, _ expected: StreamError.Condition, contentNamespace: String = XMLNamespace.client, limits: XMLStreamLimits = .client) {
            self.name = name
            self.input = Array(input.utf8)
            self.expected = expected
            self.contentNamespace = contentNamespace
            self.limits = limits
        }

        init(_ name: String, bytes: [UInt8], _ expected: StreamError.Condition) {
            self.name = name
            self.input = bytes
            self.expected = expected
        }
    }

    static let billionLaughs = """
    <?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">\
    <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;"><!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">\
    <!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">]>\
    <stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'><message><body>&lol9;</body></message>
    """

    static let cases: [Case] = [
        // §11.3 / §4.9.3.13 not well-formed
        Case("mismatched end tag", clientHeader + "<message><body>hi</message>", .notWellFormed),
        Case("unbound prefix (not namespace-well-formed)", clientHeader + "<message><foo:bar/></message>", .notWellFormed),
        Case("duplicate attribute", clientHeader + "<message to='a' to='b'/>", .notWellFormed),
        Case("unquoted attribute", clientHeader + "<message to=a/>", .notWellFormed),
        Case("invalid XML character (valid UTF-8)", clientHeader + "<message><body>\u{01}</body></message>", .notWellFormed),
        Case("garbage before the header", "hello <stream:stream>", .notWellFormed),
        Case("redeclared xml prefix", clientHeader + "<message xmlns:xml='urn:bad'/>", .notWellFormed),
        // §11.1 restricted XML
        Case("comment inside a stanza", clientHeader + "<message><!-- hi --></message>", .restrictedXML),
        Case("comment between stanzas", clientHeader + "<!-- hi --><message/>", .restrictedXML),
        Case("comment before the header", "<?xml version='1.0'?><!-- hi -->" + clientHeader.dropFirst(21), .restrictedXML),
        Case("processing instruction", clientHeader + "<message><?php echo 1; ?></message>", .restrictedXML),
        Case("processing instruction before the header", "<?xml-stylesheet href='a'?>" + clientHeader.dropFirst(21), .restrictedXML),
        Case("internal DTD subset", "<?xml version='1.0'?><!DOCTYPE stream [<!ELEMENT stream ANY>]><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>", .restrictedXML),
        Case("external DTD", "<!DOCTYPE stream SYSTEM 'http://example.com/x.dtd'><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>", .restrictedXML),
        Case("entity declaration", "<!DOCTYPE s [<!ENTITY x 'y'>]><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>&x;", .restrictedXML),
        Case("non-predefined entity reference", clientHeader + "<message><body>&nbsp;</body></message>", .restrictedXML),
        Case("entity reference in an attribute", clientHeader + "<message to='&foo;'/>", .restrictedXML),
        Case("billion laughs", billionLaughs, .restrictedXML),
        Case("XML declaration in the middle", clientHeader + "<?xml version='1.0'?>", .restrictedXML),
        // §4.9.3.10 invalid-namespace
        Case("wrong stream namespace", "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streamz'>", .invalidNamespace),
        Case("stream element without namespace", "<stream xmlns:x='jabber:client'>", .invalidNamespace),
        Case("server namespace on a client stream", "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>", .invalidNamespace),
        Case("client namespace on a server stream", "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>", .invalidNamespace, contentNamespace: XMLNamespace.server),
        Case("unknown content namespace", "<stream:stream xmlns='urn:example' xmlns:stream='http://etherx.jabber.org/streams'>", .invalidNamespace),
        Case("no content namespace", "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>", .invalidNamespace),
        Case("extension namespace declared on the header", "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' xmlns:x='urn:example'>", .invalidNamespace),
        Case("stanza in the other content namespace", clientHeader + "<message xmlns='jabber:server'/>", .invalidNamespace),
        // §4.9.3.2 bad-namespace-prefix
        Case("prefixed jabber:client stanza", clientHeader + "<cl:message xmlns:cl='jabber:client' to='a@b'/>", .badNamespacePrefix),
        Case("prefixed jabber:client declared on the header", "<stream:stream xmlns='jabber:client' xmlns:cl='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'><cl:iq type='get' id='1'/>", .badNamespacePrefix),
        Case("prefixed jabber:server stanza", serverHeader + "<s:message xmlns:s='jabber:server'/>", .badNamespacePrefix, contentNamespace: XMLNamespace.server),
        Case("prefixed content element inside a stanza", clientHeader + "<message><c:body xmlns:c='jabber:client'>x</c:body></message>", .badNamespacePrefix),
        // §11.6 unsupported-encoding
        Case("declared ISO-8859-1", "<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>", .unsupportedEncoding),
        Case("declared UTF-16", "<?xml version='1.0' encoding='UTF-16'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>", .unsupportedEncoding),
        Case("UTF-16LE bytes with BOM", bytes: [0xFF, 0xFE] + Array("<stream:stream>".utf8).flatMap { [$0, 0] }, .unsupportedEncoding),
        Case("UTF-16BE bytes without BOM", bytes: Array("<stream:stream>".utf8).flatMap { [0, $0] }, .unsupportedEncoding),
        Case("Latin-1 byte in a body", bytes: Array((clientHeader + "<message><body>caf").utf8) + [0xE9] + Array("</body></message>".utf8), .unsupportedEncoding),
        Case("overlong UTF-8", bytes: Array((clientHeader + "<message><body>").utf8) + [0xC0, 0xBC] + Array("</body></message>".utf8), .unsupportedEncoding),
        Case("UTF-8 encoded surrogate", bytes: Array((clientHeader + "<message><body>").utf8) + [0xED, 0xA0, 0x80] + Array("</body></message>".utf8), .unsupportedEncoding),
        Case("0xFF in an attribute", bytes: Array((clientHeader + "<message to='").utf8) + [0xFF] + Array("'/>".utf8), .unsupportedEncoding),
        // §13.12 and limits: policy-violation
        Case("stanza over the size limit", clientHeader + "<message><body>" + String(repeating: "x", count: 11_000) + "</body></message>", .policyViolation, limits: XMLStreamLimits(maximumStanzaBytes: 10_000)),
        Case("nesting deeper than the limit", clientHeader + "<message>" + String(repeating: "<a>", count: 60) + String(repeating: "</a>", count: 60) + "</message>", .policyViolation),
        Case("too many attributes", clientHeader + "<message " + (0..<100).map { "a\($0)='x'" }.joined(separator: " ") + "/>", .policyViolation),
        Case("attribute value too long", clientHeader + "<message to='" + String(repeating: "x", count: 20_000) + "'/>", .policyViolation),
        // Character data at stream level
        Case("text between stanzas", clientHeader + "hello<message/>", .badFormat),
        Case("root element that is not stream", "<foo:bar xmlns:foo='http://etherx.jabber.org/streams' xmlns='jabber:client'>", .badFormat),
    ]

    @Test("Each bad input yields its exact condition", arguments: cases)
    func badInput(_ testCase: Case) {
        let outcome = parse(chunks: [testCase.input], contentNamespace: testCase.contentNamespace, limits: testCase.limits)
        #expect(outcome.condition == testCase.expected, "\(testCase.name): got \(String(describing: outcome.error))")
    }

    @Test("Each bad input yields the same condition when fed byte by byte", arguments: cases)
    func badInputByteByByte(_ testCase: Case) {
        let outcome = parse(chunks: testCase.input.map { [$0] }, contentNamespace: testCase.contentNamespace, limits: testCase.limits)
        #expect(outcome.condition == testCase.expected, "\(testCase.name): got \(String(describing: outcome.error))")
    }

    @Test("Each bad input yields the same condition at every split point", arguments: cases.filter { $0.input.count <= 2048 })
    func badInputEverySplit(_ testCase: Case) {
        for offset in 0...testCase.input.count {
            let outcome = parse(chunks: split(testCase.input, at: offset), contentNamespace: testCase.contentNamespace, limits: testCase.limits)
            if outcome.condition != testCase.expected {
                Issue.record("\(testCase.name): split at \(offset) gave \(String(describing: outcome.error))")
                return
            }
        }
    }

    /// Inputs the fuzzer found whose verdict once depended on where they were split.
    static let splitRegressions: [(String, [UInt8], StreamError.Condition)] = [
        ("a zero second byte arriving alone", [0x21, 0x00, 0x6F, 0xF0, 0xA5, 0xA5], .unsupportedEncoding),
        ("continuation bytes at the start", [0xA6, 0xA6, 0xA6, 0xA6, 0xB5, 0xB5, 0x3C, 0x61], .unsupportedEncoding),
        ("a syntax error before invalid UTF-8", Array("<db:result mo= rf'a.example'>".utf8) + [0x93, 0x8F], .notWellFormed),
        ("stray text ending in ']]>'", Array((serverHeader + "\t)\t\t\t]]>NTITY <message/>").utf8), .notWellFormed),
        ("stray text then a comment", Array((serverHeader + " x <!-- c --><message/>").utf8), .badFormat),
        // Expat refuses the character after ')' at once, before its continuation bytes arrive:
        // the verdict waits for them instead of guessing from a truncated sequence.
        ("a refused character cut short, invalid", [0x09, 0x29, 0xEA, 0xDF, 0xFE, 0xA9, 0x09, 0x29, 0xEA], .unsupportedEncoding),
        ("a refused character cut short, valid", [0x09, 0x29, 0xE2, 0x82, 0xAC, 0x3C, 0x61], .notWellFormed),
    ]

    @Test("Inputs whose verdict once depended on the split now agree at every split", arguments: splitRegressions)
    func splitRegression(name: String, input: [UInt8], expected: StreamError.Condition) {
        for offset in 0...input.count {
            let outcome = parse(chunks: split(input, at: offset), contentNamespace: XMLNamespace.server)
            #expect(outcome.condition == expected, "\(name): split at \(offset)")
        }
    }

    @Test("An oversized stanza is refused while it is still arriving, before its end")
    func oversizedWhileArriving() {
        let limit = 10_000
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: XMLStreamLimits(maximumStanzaBytes: limit))
        parser.feed(Array((clientHeader + "<message><body>").utf8))
        var fed = 0
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 512)
        var caught: XMLStreamError?
        while fed < 10 * limit {
            parser.feed(chunk)
            fed += chunk.count
            do {
                while try parser.nextEvent() != nil {}
            } catch {
                caught = error
                break
            }
        }
        #expect(caught?.condition == .policyViolation)
        // It stopped within one chunk of the limit: memory stays bounded by the limit.
        #expect(fed <= limit + chunk.count)
    }

    @Test("An oversized start tag that never closes is refused while arriving")
    func oversizedOpenTag() {
        let limit = 10_000
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: XMLStreamLimits(maximumStanzaBytes: limit))
        parser.feed(Array((clientHeader + "<message to='").utf8))
        var fed = 0
        var caught: XMLStreamError?
        while fed < 4 * limit {
            parser.feed([UInt8](repeating: UInt8(ascii: "y"), count: 1000))
            fed += 1000
            do {
                while try parser.nextEvent() != nil {}
            } catch {
                caught = error
                break
            }
        }
        #expect(caught?.condition == .policyViolation)
        #expect(fed <= limit + 1000)
    }

    @Test("A huge read holding a whole oversized stanza is refused")
    func oversizedInOneRead() {
        let body = String(repeating: "z", count: 600 * 1024)
        let outcome = parse(clientHeader + "<message><body>" + body + "</body></message>", limits: .client)
        #expect(outcome.condition == .policyViolation)
        #expect(outcome.elements.isEmpty)
    }

    @Test("Elements before the bad input are still delivered in order")
    func eventsBeforeError() {
        let outcome = parse(clientHeader + "<presence/><message/><!-- x -->")
        #expect(outcome.elements.map(\.name) == ["presence", "message"])
        #expect(outcome.condition == .restrictedXML)
    }

    @Test("The billion-laughs document fails without expanding entities")
    func billionLaughsBounded() {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: .client)
        parser.feed(Array(Self.billionLaughs.utf8))
        #expect(throws: XMLStreamError(.restrictedXML, "")) { while try parser.nextEvent() != nil {} }
        #expect(parser.pendingByteCount < Self.billionLaughs.utf8.count + 1)
    }
}
