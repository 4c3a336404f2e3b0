import Testing
import XMPPCore
@testable import Federation

/// The per-pair queues of a link are drained round-robin, so one busy pair cannot starve the
/// others (fairness on a shared link).
@Suite("Per-pair outbound queues")
struct OutboundQueueTests {
    func stanza(_ id: String) -> Stanza {
        Stanza(XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("id", id)]))!
    }

    @Test("A pair with one stanza waits behind at most one stanza of a pair with a thousand")
    func roundRobin() {
        var queues = LinkStateMachine.OutboundQueues()
        let busy = DomainPair(local: "a.example", remote: "b.example")
        let quiet = DomainPair(local: "c.example", remote: "b.example")
        for index in 0..<1000 { queues.push(stanza("busy\(index)"), for: busy) }
        queues.push(stanza("quiet"), for: quiet)
        let first = queues.pop()
        let second = queues.pop()
        #expect(first?.0 == busy && first?.1.id == "busy0")
        #expect(second?.0 == quiet && second?.1.id == "quiet")
        #expect(queues.count == 999)
    }

    @Test("Each pair keeps its own order, and every stanza comes out exactly once")
    func orderPerPair() {
        var queues = LinkStateMachine.OutboundQueues()
        let pairs = (0..<5).map { DomainPair(local: "a\($0).example", remote: "b.example") }
        for round in 0..<20 {
            for (index, pair) in pairs.enumerated() where round % (index + 1) == 0 {
                queues.push(stanza("\(index)-\(round)"), for: pair)
            }
        }
        let total = queues.count
        var seen: [DomainPair: [String]] = [:]
        var popped = 0
        while let (pair, stanza) = queues.pop() {
            seen[pair, default: []].append(stanza.id ?? "")
            popped += 1
        }
        #expect(popped == total)
        for (index, pair) in pairs.enumerated() {
            let expected = (0..<20).filter { $0 % (index + 1) == 0 }.map { "\(index)-\($0)" }
            #expect(seen[pair] == expected)
        }
        #expect(queues.count == 0)
    }

    @Test("Everything still queued is handed back in order when the link closes")
    func removeAll() {
        var queues = LinkStateMachine.OutboundQueues()
        let pair = DomainPair(local: "a.example", remote: "b.example")
        for index in 0..<3 { queues.push(stanza("s\(index)"), for: pair) }
        #expect(queues.removeAll().map(\.id) == ["s0", "s1", "s2"])
        #expect(queues.pop() == nil)
    }
}
