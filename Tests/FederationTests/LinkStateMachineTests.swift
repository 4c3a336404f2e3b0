import Foundation
import Testing
import Trust
import XMPPCore
@testable import Federation

/// The link state machine without sockets, clocks or locks: each event in each phase.
@Suite("Link state machine")
struct LinkStateMachineTests {
    static let t0 = Date(timeIntervalSince1970: 1_800_000_000)
    let pair = DomainPair(local: "a.example", remote: "b.example")
    let other = DomainPair(local: "a2.example", remote: "b.example")

    func stanza(_ id: String) -> Stanza {
        Stanza(XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("id", id)]))!
    }

    /// A machine brought to `phase` by the events that lead there.
    func machine(_ origin: FederationLink.Origin = .incoming, in phase: LinkStateMachine.Phase, bidi: Bool = false) -> LinkStateMachine {
        var machine = LinkStateMachine(origin: origin, now: Self.t0)
        machine.streamID = "s1"
        if bidi { machine.setBidirectional() }
        switch phase {
        case .negotiating:
            break
        case .established:
            machine.authorize(pair, .inbound, method: .pkix, expires: nil, at: Self.t0)
        case .onTrial:
            machine.authorize(pair, .inbound, method: .pkix, expires: nil, at: Self.t0)
            machine.beginAssertionTrial()
        case .retiring:
            machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
            machine.authorize(pair, .inbound, method: .pkix, expires: nil, at: Self.t0)
            _ = machine.beginRetiring()
        case .closed:
            machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
            _ = machine.close()
        }
        #expect(machine.phase == phase)
        return machine
    }

    static let phases: [LinkStateMachine.Phase] = [.negotiating, .established, .onTrial, .retiring, .closed]

    // MARK: authorize

    @Test("authorize: the first proof establishes the link; a closed link takes none", arguments: phases)
    func authorizeInEveryPhase(phase: LinkStateMachine.Phase) {
        var machine = machine(in: phase)
        let directions = machine.authorize(other, .outbound, method: .dialback, expires: nil, at: Self.t0)
        switch phase {
        case .closed:
            #expect(directions.isEmpty)
            #expect(!machine.isAuthorized(other, .outbound, at: Self.t0))
            #expect(machine.phase == .closed)
        case .retiring:
            // Recorded, but nothing more goes out on a link that sent its </stream>.
            #expect(directions == [.outbound])
            #expect(!machine.isAuthorized(other, .outbound, at: Self.t0))
            #expect(machine.phase == .retiring)
        case .negotiating, .established, .onTrial:
            #expect(directions == [.outbound])
            #expect(machine.isAuthorized(other, .outbound, at: Self.t0))
            #expect(machine.phase == (phase == .negotiating ? .established : phase))
            #expect(machine.authorization(other, .outbound)?.method == .dialback)
        }
    }

    @Test("authorize with the reverse: only on a bidirectional link, only when the reverse is not valid already")
    func reverseDirection() {
        var oneWay = machine(.outgoing, in: .negotiating)
        #expect(oneWay.authorize(pair, .outbound, method: .pkix, expires: nil, alsoReverse: true, at: Self.t0) == [.outbound])
        #expect(!oneWay.isAuthorized(pair, .inbound, at: Self.t0))

        var bidi = machine(.outgoing, in: .negotiating, bidi: true)
        #expect(bidi.authorize(pair, .outbound, method: .pkix, expires: nil, alsoReverse: true, at: Self.t0) == [.outbound, .inbound])
        #expect(bidi.isAuthorized(pair, .inbound, at: Self.t0))
        // The reverse holds a valid proof: it is kept, not overwritten.
        #expect(bidi.authorize(pair, .inbound, method: .dialback, expires: nil, alsoReverse: true, at: Self.t0) == [.inbound])
        #expect(bidi.authorization(pair, .outbound)?.method == .pkix)
        // A lapsed reverse is renewed with the new proof.
        var lapsed = machine(.outgoing, in: .negotiating, bidi: true)
        lapsed.authorize(pair, .inbound, method: .pkix, expires: Self.t0 + 10, at: Self.t0)
        #expect(lapsed.authorize(pair, .outbound, method: .dane, expires: nil, alsoReverse: true, at: Self.t0 + 20) == [.outbound, .inbound])
        #expect(lapsed.authorization(pair, .inbound)?.method == .dane)
    }

    @Test("A proof lapses at its expiry; renew moves it and never brings back a withdrawn pair")
    func expiryAndRenewal() {
        var machine = machine(in: .negotiating)
        machine.authorize(pair, .inbound, method: .posh, expires: Self.t0 + 60, at: Self.t0)
        #expect(machine.isAuthorized(pair, .inbound, at: Self.t0 + 59))
        #expect(!machine.isAuthorized(pair, .inbound, at: Self.t0 + 60))
        #expect(machine.hasLapsed(pair, .inbound, at: Self.t0 + 60))
        machine.renew(pair, .inbound, method: .posh, expires: Self.t0 + 120, at: Self.t0 + 30)
        #expect(machine.isAuthorized(pair, .inbound, at: Self.t0 + 90))
        #expect(machine.withdraw(local: "a.example") == [pair])
        machine.renew(pair, .inbound, method: .posh, expires: Self.t0 + 500, at: Self.t0 + 100)
        #expect(machine.authorization(pair, .inbound) == nil)
        // A new proof for the pair does bring it back.
        machine.authorize(pair, .inbound, method: .pkix, expires: nil, at: Self.t0 + 100)
        #expect(machine.isAuthorized(pair, .inbound, at: Self.t0 + 100))
        #expect(!machine.withdrawn.contains(pair))
    }

    // MARK: placement

    @Test("A link is offered to new pairs only while established (or on trial), with a stream id and a valid pair", arguments: phases)
    func usableOnlyWhileOpen(phase: LinkStateMachine.Phase) {
        let machine = machine(in: phase, bidi: true)
        let facts = machine.placementFacts(for: other, at: Self.t0)
        #expect(facts.usable == (phase == .established || phase == .onTrial))
    }

    // MARK: trial

    @Test("beginAssertionTrial: only on a link the peer opened that never answered a request", arguments: phases)
    func trialStarts(phase: LinkStateMachine.Phase) {
        var incoming = machine(.incoming, in: phase)
        incoming.beginAssertionTrial()
        #expect(incoming.phase == (phase == .established ? .onTrial : phase == .negotiating ? .onTrial : phase))
        var outgoing = machine(.outgoing, in: phase == .onTrial ? .established : phase)
        let before = outgoing.phase
        outgoing.beginAssertionTrial()
        #expect(outgoing.phase == before)
    }

    @Test("On trial, written stanzas are kept; the peer's answer ends the trial and authorises both ways on bidi")
    func trialAnswered() async {
        var machine = machine(.incoming, in: .established, bidi: true)
        let outcome: FederationLink.PairRequestOutcome = await withCheckedContinuation { continuation in
            #expect(machine.awaitAnswer(for: other, method: .pkix, expires: nil, continuation: continuation) == .send)
            machine.beginAssertionTrial()
            machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
            _ = machine.enqueue(stanza("1"), for: pair, limit: 10)
            #expect(machine.nextToWrite(at: Self.t0)?.id == "1")
            #expect(machine.trialKept.map(\.id) == ["1"])
            let effects = machine.answer(other, .valid, fromPeer: true, at: Self.t0)
            #expect(effects.authorized == [.outbound, .inbound])
            #expect(effects.proof?.method == .pkix)
            for waiter in effects.waiters ?? [] { waiter.resume(returning: .valid) }
        }
        #expect(outcome == .valid)
        #expect(machine.phase == .established)
        #expect(machine.trialKept.isEmpty)
        #expect(machine.isAuthorized(other, .inbound, at: Self.t0))
    }

    @Test("Closing during the trial hands back what was kept, and says the peer refuses requests on its links")
    func trialClosed() async {
        var machine = machine(.incoming, in: .established, bidi: true)
        machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
        let outcome: FederationLink.PairRequestOutcome = await withCheckedContinuation { continuation in
            _ = machine.awaitAnswer(for: other, method: .pkix, expires: nil, continuation: continuation)
            machine.beginAssertionTrial()
            for id in ["1", "2"] { _ = machine.enqueue(stanza(id), for: pair, limit: 10) }
            _ = machine.nextToWrite(at: Self.t0)
            let effects = machine.close()
            #expect(effects.owed.map(\.id) == ["1", "2"])
            #expect(effects.refusedRequests)
            for waiter in effects.waiters { waiter.resume(returning: .closed) }
        }
        #expect(outcome == .closed)
        #expect(machine.close().owed.isEmpty, "a second close hands back nothing")
    }

    /// How the peer ended its stream while our first request waited, and whether that counts
    /// as a refusal of requests on its links.
    enum PeerEndingCase: String, CaseIterable, Sendable {
        case dropped, streamError, streamErrorThenEnd, cleanEnd
    }

    @Test("A stream error (Prosody's <invalid-id/>) or a dropped connection during the trial is a refusal; a clean </stream> is a Braid peer retiring its duplicate link, and is not", arguments: PeerEndingCase.allCases)
    func trialEndedBy(_ ending: PeerEndingCase) async {
        var machine = machine(.incoming, in: .established, bidi: true)
        machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
        let outcome: FederationLink.PairRequestOutcome = await withCheckedContinuation { continuation in
            _ = machine.awaitAnswer(for: other, method: .pkix, expires: nil, continuation: continuation)
            machine.beginAssertionTrial()
            _ = machine.enqueue(stanza("1"), for: pair, limit: 10)
            _ = machine.nextToWrite(at: Self.t0)
            switch ending {
            case .dropped: break
            case .streamError: machine.peerSentStreamError()
            case .streamErrorThenEnd: machine.peerSentStreamError(); machine.peerEndedStream()
            case .cleanEnd: machine.peerEndedStream()
            }
            let effects = machine.close()
            #expect(effects.owed.map(\.id) == ["1"], "what the trial kept is sent again either way")
            #expect(effects.refusedRequests == (ending != .cleanEnd))
            for waiter in effects.waiters { waiter.resume(returning: .closed) }
        }
        #expect(outcome == .closed)
    }

    @Test("Our own timeout is not an answer from the peer: the trial goes on")
    func timeoutIsNotAnAnswer() async {
        var machine = machine(.incoming, in: .established)
        _ = await withCheckedContinuation { continuation in
            _ = machine.awaitAnswer(for: other, method: .pkix, expires: nil, continuation: continuation)
            machine.beginAssertionTrial()
            let effects = machine.answer(other, .error(StanzaError(.remoteServerTimeout)), fromPeer: false, at: Self.t0)
            #expect(effects.authorized.isEmpty)
            for waiter in effects.waiters ?? [] { waiter.resume(returning: .closed) }
        }
        #expect(machine.phase == .onTrial)
        #expect(!machine.assertionsAnswered)
    }

    @Test("An answer nobody asked for changes nothing (CVE-2012-3525)")
    func unsolicitedAnswer() {
        var machine = machine(in: .established)
        let effects = machine.answer(other, .valid, fromPeer: true, at: Self.t0)
        #expect(effects.waiters == nil)
        #expect(effects.authorized.isEmpty)
        #expect(!machine.isAuthorized(other, .outbound, at: Self.t0))
        #expect(!machine.assertionsAnswered)
    }

    @Test("A request on a closed link is answered closed at once")
    func requestOnClosed() async {
        var closed = machine(in: .closed)
        let outcome: FederationLink.PairRequestOutcome = await withCheckedContinuation { continuation in
            #expect(closed.awaitAnswer(for: other, method: .pkix, expires: nil, continuation: continuation) == .closed)
        }
        #expect(outcome == .closed)
    }

    // MARK: sending

    @Test("Writes stop while retiring or closed; the drain ends when the queues are empty", arguments: phases)
    func writing(phase: LinkStateMachine.Phase) {
        var machine = machine(in: phase)
        let first = machine.enqueue(stanza("1"), for: pair, limit: 10)
        #expect(first == .queuedStartDrain)
        #expect(machine.enqueue(stanza("2"), for: pair, limit: 10) == .queued)
        #expect(machine.enqueue(stanza("3"), for: pair, limit: 2) == .refused)
        let written = machine.nextToWrite(at: Self.t0)
        if phase == .retiring || phase == .closed {
            #expect(written == nil)
        } else {
            #expect(written?.id == "1")
            #expect(machine.nextToWrite(at: Self.t0)?.id == "2")
            #expect(machine.nextToWrite(at: Self.t0) == nil)
            // The drain ended: the next stanza schedules a new one.
            #expect(machine.enqueue(stanza("4"), for: pair, limit: 10) == .queuedStartDrain)
        }
    }

    @Test("Stream management: unacknowledged stanzas are owed on close, acknowledged ones are not; h beyond what was sent is refused")
    func streamManagement() {
        var machine = machine(.outgoing, in: .established)
        machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
        machine.enableStreamManagement(requested: true)
        for id in (1...20).map(String.init) { _ = machine.enqueue(stanza(id), for: pair, limit: 100) }
        while machine.nextToWrite(at: Self.t0) != nil {}
        let ended = machine.drainPassEnded(wrote: true)
        #expect(ended.requestAcknowledgement)
        #expect(machine.acknowledgementOverdue(at: Self.t0 + 5) == 5)
        let acknowledged = machine.acknowledge(15, at: Self.t0 + 5)
        #expect(acknowledged.valid && !acknowledged.resumeDrain)
        #expect(machine.acknowledge(21, at: Self.t0 + 5).valid == false)
        let closed = machine.close()
        #expect(closed.owed.map(\.id) == ["16", "17", "18", "19", "20"])
    }

    @Test("Handed over: what the peer acknowledged under XEP-0198, in order and once; without it, what was written")
    func handedOver() {
        var machine = machine(.outgoing, in: .established)
        machine.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
        machine.enableStreamManagement(requested: true)
        for id in (1...5).map(String.init) { _ = machine.enqueue(stanza(id), for: pair, limit: 100) }
        while machine.nextToWrite(at: Self.t0) != nil {}
        #expect(machine.takeHandedOver().isEmpty, "written is not acknowledged")
        _ = machine.acknowledge(3, at: Self.t0 + 1)
        #expect(machine.takeHandedOver().map(\.id) == ["1", "2", "3"])
        #expect(machine.takeHandedOver().isEmpty)
        _ = machine.acknowledge(3, at: Self.t0 + 2)
        #expect(machine.takeHandedOver().isEmpty, "the same h again hands over nothing")
        _ = machine.acknowledge(5, at: Self.t0 + 2)
        #expect(machine.takeHandedOver().map(\.id) == ["4", "5"])

        var plain = self.machine(.outgoing, in: .established)
        plain.authorize(pair, .outbound, method: .pkix, expires: nil, at: Self.t0)
        _ = plain.enqueue(stanza("x"), for: pair, limit: 100)
        #expect(plain.nextToWrite(at: Self.t0)?.id == "x")
        #expect(plain.takeHandedOver().map(\.id) == ["x"])
    }

    @Test("Inbound stanzas count toward h only once the peer confirmed our <enable/>")
    func inboundCounting() {
        var machine = machine(.outgoing, in: .established)
        machine.enableStreamManagement(requested: true)
        machine.countReceived(at: Self.t0)
        #expect(machine.handledInbound == 0)
        machine.streamManagementConfirmed()
        machine.countReceived(at: Self.t0)
        #expect(machine.handledInbound == 1)
        #expect(machine.stanzasReceived == 2)
    }

    @Test("beginRetiring: once, and never after close", arguments: phases)
    func retiring(phase: LinkStateMachine.Phase) {
        var machine = machine(in: phase)
        #expect(machine.beginRetiring() == (phase != .retiring && phase != .closed))
        #expect(machine.beginRetiring() == false)
    }
}
