import Testing
import XMPPCore
@testable import XMPPStream

@Suite("Dialback (XEP-0220, XEP-0185)")
struct DialbackTests {
    @Test("Keys match the XEP-0185 and XEP-0220 examples")
    func specificationExamples() {
        let generator = DialbackKeyGenerator(secret: "s3cr3tf0rd14lb4ck")
        // XEP-0220 Example 1 / XEP-0185 §3: receiving xmpp.example.com, originating example.org.
        #expect(generator.key(receiving: "xmpp.example.com", originating: "example.org", streamID: "D60000229F")
            == "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643")
        // The domains are ordered: swapping them gives another key.
        #expect(generator.key(receiving: "example.org", originating: "xmpp.example.com", streamID: "D60000229F")
            == "07335aa400436780596e1102ba010c85129ea50e13e58ab8830a523a8706b575")
    }

    @Test("Verification accepts the key in any case and rejects any other")
    func verification() {
        let generator = DialbackKeyGenerator(secret: "s3cr3tf0rd14lb4ck")
        let key = "37C69B1CF07A3F67C04A5EF5902FA5114F2C76FE4A2686482BA5B89323075643"
        #expect(generator.verify(key, receiving: "xmpp.example.com", originating: "example.org", streamID: "D60000229F"))
        #expect(!generator.verify(key, receiving: "xmpp.example.com", originating: "example.org", streamID: "D60000229G"))
        #expect(!generator.verify(String(key.dropLast()), receiving: "xmpp.example.com", originating: "example.org", streamID: "D60000229F"))
        #expect(!DialbackKeyGenerator(secret: "other").verify(key, receiving: "xmpp.example.com", originating: "example.org", streamID: "D60000229F"))
    }

    @Test("Dialback elements read and write with their answers")
    func elements() throws {
        let request = DialbackElement(kind: .verify, from: "b.example", to: "a.example", id: "417GAF25", key: "abc")
        let parsed = try #require(DialbackElement(request.element))
        #expect(parsed == request)
        let answer = request.answer(.valid)
        #expect(answer.from == "a.example" && answer.to == "b.example" && answer.id == "417GAF25" && answer.key == nil)
        #expect(answer.element.attribute("type") == "valid")
        let failure = DialbackElement(kind: .result, from: "a.example", to: "c.example").answer(.error, error: StanzaError(.itemNotFound))
        let failureParsed = try #require(DialbackElement(failure.element))
        #expect(failureParsed.outcome == .error)
        #expect(failureParsed.error?.condition == .itemNotFound)
        // Unknown types and missing addresses are not dialback elements.
        #expect(DialbackElement(XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", "a"), XMLAttribute("to", "b"), XMLAttribute("type", "maybe")])) == nil)
        #expect(DialbackElement(XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("to", "b")])) == nil)
    }
}
