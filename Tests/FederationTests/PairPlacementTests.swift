import Foundation
import Testing
import Trust
@testable import Federation

/// "Join a link or open a new one", for every combination of what the peer offers on a
/// link and what is proven there (issue 9; digest §14, the fallback matrix).
@Suite("Pair placement: join a link or open a connection")
struct PairPlacementTests {
    /// Every combination of the link facts, with each proof the remote domain may have.
    static var everyCandidate: [PairPlacement.Candidate] {
        var all: [PairPlacement.Candidate] = []
        let proofs: [ProofMethod?] = [nil, .pkix, .dane, .posh, .dialback, .dns]
        for bits in 0..<(1 << 9) {
            func flag(_ index: Int) -> Bool { bits & (1 << index) != 0 }
            for proof in proofs {
                all.append(PairPlacement.Candidate(
                    id: "link", outgoing: flag(0), bidirectional: flag(1), usable: flag(2), peerSpeaksDialback: flag(3),
                    mayRequest: flag(4), handlesDialbackErrors: flag(5), carriesRemote: flag(6), reachesRemote: flag(7),
                    refusedLocal: flag(8), remoteProof: proof, pairCount: 1))
            }
        }
        return all
    }

    @Test("Every combination: a pair joins only a link that takes dialback requests from us and has not refused its domain")
    func everyCombination() {
        var joins = 0
        for candidate in Self.everyCandidate {
            let decision = PairPlacement.decide([candidate])
            // The prerequisites of any db:result on the link.
            let requestable = candidate.usable && (candidate.outgoing || candidate.bidirectional) && candidate.peerSpeaksDialback
                && candidate.mayRequest && !candidate.refusedLocal
            // XEP-0220 §2.6.2 with RFC 7712 §4.4.2: a new target needs errors, the right
            // server, and a proof that is not dialback.
            let strongProof = candidate.remoteProof == .pkix || candidate.remoteProof == .dane || candidate.remoteProof == .posh
            let newTargetAllowed = candidate.handlesDialbackErrors && candidate.reachesRemote && strongProof
            switch decision {
            case .join(let id, let via):
                joins += 1
                #expect(id == "link")
                #expect(requestable, "joined a link that cannot take the request: \(candidate)")
                if candidate.carriesRemote {
                    #expect(via == .senderMultiplexing)
                } else {
                    #expect(via == .targetMultiplexing)
                    #expect(newTargetAllowed, "added a target without the proof rule: \(candidate)")
                }
            case .newConnection:
                #expect(!requestable || (!candidate.carriesRemote && !newTargetAllowed), "a new connection although the link could take the pair: \(candidate)")
            }
        }
        #expect(joins > 0)
    }

    /// A link Braid opened to a peer, usable for everything.
    func link(_ id: String, _ change: (inout PairPlacement.Candidate) -> Void = { _ in }) -> PairPlacement.Candidate {
        var candidate = PairPlacement.Candidate(id: id, outgoing: true, bidirectional: true, usable: true, peerSpeaksDialback: true,
                                                mayRequest: true, handlesDialbackErrors: true, carriesRemote: false, reachesRemote: true,
                                                refusedLocal: false, remoteProof: nil, pairCount: 2)
        change(&candidate)
        return candidate
    }

    @Test("ejabberd without mod_s2s_dialback: SASL EXTERNAL link, no dialback offered: a new connection, never a db:result")
    func peerWithoutDialback() {
        let ejabberd = link("e") { $0.peerSpeaksDialback = false; $0.handlesDialbackErrors = false; $0.carriesRemote = true; $0.remoteProof = .pkix }
        #expect(PairPlacement.decide([ejabberd]) == .newConnection)
        #expect(PairPlacement.exclusion(of: ejabberd) == .noDialback)
    }

    @Test("Prosody 0.12: dialback without errors: sender multiplexing only")
    func prosodyWithoutErrors() {
        let carrying = link("p") { $0.handlesDialbackErrors = false; $0.carriesRemote = true }
        #expect(PairPlacement.decide([carrying]) == .join(id: "p", via: .senderMultiplexing))
        let newTarget = link("p") { $0.handlesDialbackErrors = false; $0.remoteProof = .pkix }
        #expect(PairPlacement.decide([newTarget]) == .newConnection)
        #expect(PairPlacement.exclusion(of: newTarget) == .noDialbackErrors)
    }

    @Test("A certificate per domain: the peer refused our domain on the shared link, so the pair opens its own")
    func refusedOnSharedLink() {
        let shared = link("shared") { $0.carriesRemote = true; $0.refusedLocal = true; $0.pairCount = 40 }
        #expect(PairPlacement.decide([shared]) == .newConnection)
        // Another link where the domain was not refused is still used.
        let other = link("other") { $0.carriesRemote = true; $0.pairCount = 1 }
        #expect(PairPlacement.decide([shared, other]) == .join(id: "other", via: .senderMultiplexing))
    }

    @Test("Preference: a link carrying the remote domain, then our own links, then the busiest")
    func ranking() {
        let target = link("target") { $0.remoteProof = .pkix; $0.pairCount = 100 }
        let carrying = link("carrying") { $0.carriesRemote = true; $0.pairCount = 1 }
        #expect(PairPlacement.decide([target, carrying]) == .join(id: "carrying", via: .senderMultiplexing))
        let theirs = link("theirs") { $0.outgoing = false; $0.carriesRemote = true; $0.pairCount = 50 }
        #expect(PairPlacement.decide([theirs, carrying]) == .join(id: "carrying", via: .senderMultiplexing))
        let busy = link("busy") { $0.carriesRemote = true; $0.pairCount = 9 }
        #expect(PairPlacement.decide([carrying, busy]) == .join(id: "busy", via: .senderMultiplexing))
        #expect(PairPlacement.decide([]) == .newConnection)
    }

    @Test("A remote domain is proven only on links that pass every other test")
    func proofOnlyWhereUseful() {
        #expect(PairPlacement.needsRemoteProof(link("a")))
        #expect(!PairPlacement.needsRemoteProof(link("a") { $0.carriesRemote = true }))
        #expect(!PairPlacement.needsRemoteProof(link("a") { $0.peerSpeaksDialback = false }))
        #expect(!PairPlacement.needsRemoteProof(link("a") { $0.reachesRemote = false }))
        #expect(!PairPlacement.needsRemoteProof(link("a") { $0.refusedLocal = true }))
        #expect(!PairPlacement.needsRemoteProof(link("a") { $0.outgoing = false; $0.bidirectional = false }))
    }
}

@Suite("Connection slots per peer server")
struct ConnectionSlotsTests {
    let target = ServerTarget(host: "peer.example", port: 5269)

    @Test("At most the limit at once; the next waits for a release, in order")
    func limit() async {
        let slots = ConnectionSlots()
        let far = ContinuousClock.now + .seconds(30)
        #expect(await slots.acquire(target, limit: 2, until: far))
        #expect(await slots.acquire(target, limit: 2, until: far))
        #expect(slots.inUse(target) == 2)
        let third = Task { await slots.acquire(target, limit: 2, until: far) }
        // The third holds no slot until one is released.
        #expect(slots.inUse(target) == 2)
        slots.release(target)
        #expect(await third.value)
        #expect(slots.inUse(target) == 2)
        slots.release(target)
        slots.release(target)
        #expect(slots.inUse(target) == 0)
    }

    @Test("A waiter whose deadline passes gives up without a slot")
    func deadline() async {
        let slots = ConnectionSlots()
        #expect(await slots.acquire(target, limit: 1, until: .now + .seconds(30)))
        #expect(await !slots.acquire(target, limit: 1, until: .now + .milliseconds(50)))
        slots.release(target)
        #expect(slots.inUse(target) == 0)
        #expect(await slots.acquire(target, limit: 1, until: .now + .seconds(1)))
    }
}
