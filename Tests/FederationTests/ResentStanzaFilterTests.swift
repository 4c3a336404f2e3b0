import Testing
import XMPPCore
@testable import Federation

/// Issue 10, item 2: only copies a peer re-sends after losing a link are dropped; a client
/// that reuses an id has every message delivered.
@Suite("Re-sent stanzas: which copies are dropped")
struct ResentStanzaFilterTests {
    func message(_ id: String, body: String = "x") -> Stanza {
        Stanza(XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [
            XMLAttribute("from", "alice@a.example/phone"), XMLAttribute("to", "bob@b.example"), XMLAttribute("id", id),
        ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.server, text: body))]))!
    }

    @Test("The same id again on the same link is a new stanza")
    func sameLink() {
        let filter = ResentStanzaFilter(capacity: 100)
        for _ in 0..<3 { #expect(!filter.arrived(message("m1"), on: "L1", track: true)) }
    }

    @Test("A copy on another link of a stanza never acknowledged is dropped, once")
    func copyAfterLoss() {
        let filter = ResentStanzaFilter(capacity: 100)
        #expect(!filter.arrived(message("m1"), on: "L1", track: true))
        filter.linkClosed("L1")
        #expect(filter.arrived(message("m1"), on: "L2", track: true))
        // A later message that reuses the id is delivered.
        #expect(!filter.arrived(message("m1"), on: "L2", track: true))
    }

    @Test("Acknowledged stanzas: a copy soon after is dropped (our ack may have been lost), later ones are new")
    func acknowledged() {
        let filter = ResentStanzaFilter(capacity: 100, grace: .seconds(60))
        let start = ContinuousClock.now
        #expect(!filter.arrived(message("m1"), on: "L1", track: true, now: start))
        #expect(!filter.arrived(message("m2"), on: "L1", track: true, now: start))
        filter.acknowledged(on: "L1", now: start)
        #expect(filter.arrived(message("m1"), on: "L2", track: true, now: start + .seconds(5)))
        #expect(!filter.arrived(message("m2"), on: "L2", track: true, now: start + .seconds(61)))
    }

    @Test("On a link without acknowledgements nothing is remembered")
    func untracked() {
        let filter = ResentStanzaFilter(capacity: 100)
        #expect(!filter.arrived(message("m1"), on: "L1", track: false))
        #expect(!filter.arrived(message("m1"), on: "L2", track: false))
        #expect(filter.count == 0)
    }

    @Test("Bounded: beyond the capacity the oldest are forgotten")
    func bounded() {
        let filter = ResentStanzaFilter(capacity: 10)
        for index in 0..<100 { _ = filter.arrived(message("m\(index)"), on: "L1", track: true) }
        #expect(filter.count <= 10)
    }
}
