import Foundation
import NIOCore
import Trust
import X509
import XMPPCore
import XMPPStream

/// The state of one link as a value: one phase, the table of pair authorisations, the
/// queues, and stream management. Every event is a method that changes the value and returns
/// what the caller must do (resume waiters, drain, write); nothing here does I/O, takes a
/// lock or reads a clock, so each event is tested alone (`LinkStateMachineTests`).
///
/// ``authorize(_:_:method:expires:alsoReverse:at:)`` is the only place a
/// ``PairAuthorization`` is made: a proof that succeeded, wherever it was decided (a
/// certificate, a dialback answer we received, one we gave), enters the table here.
struct LinkStateMachine: Sendable {
    /// Where the link is in its life.
    enum Phase: Sendable, Hashable {
        /// TCP and TLS are up, or coming up; no pair is authorised yet.
        case negotiating
        /// Some pair was authorised: the link carries stanzas.
        case established
        /// Established, and our first `db:result` on a link the peer opened waits for its
        /// answer: what is written meanwhile is kept (``trialKept``), because a peer that
        /// cannot take requests on its links closes and discards what followed.
        case onTrial
        /// Being closed because the peer's own link to us is kept instead: our `</stream>`
        /// is sent, nothing more goes out.
        case retiring
        /// Closed: what it owed was handed back once.
        case closed
    }

    struct Key: Hashable, Sendable {
        var pair: DomainPair
        var direction: PairDirection
    }

    let origin: FederationLink.Origin
    private(set) var phase: Phase = .negotiating

    private(set) var certificateChain: [Certificate] = []
    private(set) var peerCertificateNamesOneDomain = false
    private(set) var peerCertificateHash: Int?
    private(set) var authorizations: [Key: PairAuthorization] = [:]
    /// Pairs withdrawn because the local domain stopped being hosted: stanzas for them get a
    /// stanza error rather than closing the link.
    private(set) var withdrawn: Set<DomainPair> = []
    /// Domains the peer proved on this connection, with how and until when; a later pair for
    /// the same remote domain reuses the proof (RFC 7712 §4.4, XEP-0344).
    private(set) var provenDomains: [String: (method: ProofMethod, expires: Date?)] = [:]
    var capabilities = OutgoingServerNegotiation.PeerCapabilities()
    /// Both directions may be used (XEP-0288).
    private(set) var bidi = false
    /// The id of the accepting side's stream: dialback keys on this link are bound to it.
    var streamID: String?
    private(set) var stanzasSent = 0
    private(set) var stanzasReceived = 0
    private(set) var outbound = OutboundQueues()
    private(set) var streamManagement: StreamManagement?
    /// When a stanza last went either way.
    private(set) var lastActivity: Date
    /// When the peer's certificate is next checked for revocation.
    var nextRevocationCheck = Date.distantPast
    /// Our `db:result` requests waiting for an answer, with the proof each rests on.
    private(set) var pendingRequests: [DomainPair: [CheckedContinuation<FederationLink.PairRequestOutcome, Never>]] = [:]
    private var pendingProofs: [DomainPair: (method: ProofMethod, expires: Date?)] = [:]
    /// On a link the peer opened: its stream header declared the dialback namespace.
    var peerDeclaredDialback = false
    /// The leaf certificate we present on this link (DER), set once.
    private(set) var localCertificate: [UInt8]?
    /// Local domains the peer refused on this link: they get a connection of their own.
    private(set) var refusedLocals: Set<String> = []
    /// When the peer last acknowledged (XEP-0198), or when acknowledgements were last not
    /// owed.
    private(set) var lastAcknowledgement: Date
    /// The peer answered one of our `db:result` requests on this link.
    private(set) var assertionsAnswered = false
    /// Stanzas written during the trial (see ``Phase/onTrial``), kept after it too when the
    /// link retires or closes before the answer.
    private(set) var trialKept: [Stanza] = []
    /// Stanzas now in the peer's hands (acknowledged under XEP-0198, or written on a link
    /// without it), not yet reported: ``takeHandedOver()`` empties it.
    private(set) var handedOver: [Stanza] = []

    /// What was handed over since the last call.
    mutating func takeHandedOver() -> [Stanza] {
        guard !handedOver.isEmpty else { return [] }
        defer { handedOver = [] }
        return handedOver
    }
    private var trialOpen = false
    /// How the peer ended its stream, if it did before the link closed.
    private(set) var peerEnding: PeerEnding?

    enum PeerEnding: Sendable, Equatable {
        /// `</stream>` with no stream error before it: a Braid peer retiring a duplicate
        /// link, or an idle close.
        case cleanly
        /// A stream error (Prosody 0.12 answers a `db:result` on its own link with
        /// `<invalid-id/>`), possibly followed by `</stream>`.
        case withError
    }

    /// Sent stanzas the peer has not acknowledged yet beyond which sending pauses.
    static let maximumUnacknowledged = 5000
    /// Stanzas between our `<r/>` requests.
    static let acknowledgementRequestInterval = 16

    init(origin: FederationLink.Origin, now: Date) {
        self.origin = origin
        lastActivity = now
        lastAcknowledgement = now
    }

    var isClosed: Bool { phase == .closed }
    var isRetiring: Bool { phase == .retiring }

    // MARK: Peer facts

    mutating func peerPresented(_ chain: [Certificate], namesOneDomain: Bool, hash: Int?) {
        certificateChain = chain
        peerCertificateNamesOneDomain = namesOneDomain
        peerCertificateHash = hash
    }

    mutating func setBidirectional() { bidi = true }

    mutating func setLocalCertificate(_ der: [UInt8]?) {
        if localCertificate == nil { localCertificate = der }
    }

    mutating func recordRefusal(of local: String) { refusedLocals.insert(local) }

    /// The peer sent a stream error.
    mutating func peerSentStreamError() { peerEnding = .withError }

    /// The peer sent `</stream>`; after a stream error it stays an error.
    mutating func peerEndedStream() {
        if peerEnding == nil { peerEnding = .cleanly }
    }

    mutating func recordProof(of domain: String, method: ProofMethod, expires: Date?) {
        provenDomains[domain] = (method, expires)
    }

    func proof(of domain: String, at time: Date) -> (method: ProofMethod, expires: Date?)? {
        guard let proof = provenDomains[domain], proof.expires.map({ time < $0 }) ?? true else { return nil }
        return proof
    }

    /// Whether the peer takes `db:result` here: on ours it advertised dialback after TLS; on
    /// its own, its header declared the namespace.
    var peerSpeaksDialback: Bool { origin == .outgoing ? capabilities.dialbackFeature : peerDeclaredDialback }

    /// The peer handles dialback errors (XEP-0220 §2.4.2); one that asked for bidi must
    /// (XEP-0288 §2.2).
    var handlesDialbackErrors: Bool { capabilities.dialbackErrors || (origin == .incoming && bidi) }

    /// Some pair here, or a proof recorded for a later one, rests on the peer's certificate
    /// (PKIX, DANE, POSH): a revoked certificate must reset the link.
    var restsOnCertificate: Bool {
        authorizations.values.contains { $0.method.isCertificateProof } || provenDomains.values.contains { $0.method.isCertificateProof }
    }

    // MARK: Authorisations

    /// Enters a proof in the table: `pair` may flow in `direction` (and, with `alsoReverse`
    /// on a bidirectional link, the other way too, XEP-0288 §2.2) until `expires`. Returns
    /// the directions newly authorised, decided under the same access as the change. A
    /// closed link takes nothing.
    @discardableResult
    mutating func authorize(_ pair: DomainPair, _ direction: PairDirection, method: ProofMethod, expires: Date?,
                            alsoReverse: Bool = false, at now: Date) -> [PairDirection] {
        guard phase != .closed else { return [] }
        var directions = [direction]
        if alsoReverse && bidi {
            let reverse: PairDirection = direction == .outbound ? .inbound : .outbound
            if authorizations[Key(pair: pair, direction: reverse)].map({ !$0.isValid(at: now) }) ?? true {
                directions.append(reverse)
            }
        }
        for each in directions {
            authorizations[Key(pair: pair, direction: each)] =
                PairAuthorization(pair: pair, direction: each, method: method, authorizedAt: now, expires: expires)
        }
        withdrawn.remove(pair)
        if phase == .negotiating { phase = .established }
        return directions
    }

    /// A renewed proof for authorisations that exist: their expiry moves; nothing is added
    /// (a pair withdrawn meanwhile stays withdrawn).
    mutating func renew(_ pair: DomainPair, _ direction: PairDirection, method: ProofMethod, expires: Date?, at now: Date) {
        let key = Key(pair: pair, direction: direction)
        guard phase != .closed, var authorization = authorizations[key] else { return }
        authorization.method = method
        authorization.authorizedAt = now
        authorization.expires = expires
        authorizations[key] = authorization
    }

    func isAuthorized(_ pair: DomainPair, _ direction: PairDirection, at time: Date) -> Bool {
        guard phase != .closed, let authorization = authorizations[Key(pair: pair, direction: direction)] else { return false }
        // A retiring link has sent its </stream>: stanzas are routed to the link that replaces
        // it rather than queued here until it closes.
        if direction == .outbound && phase == .retiring { return false }
        return authorization.isValid(at: time)
    }

    func authorization(_ pair: DomainPair, _ direction: PairDirection) -> PairAuthorization? {
        authorizations[Key(pair: pair, direction: direction)]
    }

    func hasValidPair(where matches: (PairAuthorization) -> Bool, at time: Date) -> Bool {
        authorizations.values.contains { matches($0) && $0.isValid(at: time) }
    }

    func hasLapsed(_ pair: DomainPair, _ direction: PairDirection, at time: Date) -> Bool {
        authorizations[Key(pair: pair, direction: direction)].map { !$0.isValid(at: time) } ?? false
    }

    /// Withdraws every pair of a local domain that is no longer hosted; the link stays up.
    mutating func withdraw(local: String) -> [DomainPair] {
        let keys = authorizations.keys.filter { $0.pair.local == local }
        for key in keys {
            authorizations[key] = nil
            withdrawn.insert(key.pair)
        }
        return Array(Set(keys.map(\.pair)))
    }

    /// What the pairs with `domain` already here rest on, when no proof of it was recorded:
    /// the weakest, never a method that was not used.
    func carriedProof(of domain: String, at time: Date) -> (method: ProofMethod, expires: Date?) {
        let carried = authorizations.values.filter { $0.pair.remote == domain && $0.isValid(at: time) }
        guard let weakest = carried.min(by: { ($0.method.isCertificateProof ? 1 : 0) < ($1.method.isCertificateProof ? 1 : 0) }) else {
            return (ProofMethod.dns, nil)
        }
        return (weakest.method, weakest.expires)
    }

    /// What pair placement needs to know about this link for one pair.
    func placementFacts(for pair: DomainPair, at time: Date) -> FederationLink.PlacementFacts {
        var carriesRemote = false
        var carriesLocal = false
        var anyValid = false
        for authorization in authorizations.values where authorization.isValid(at: time) {
            anyValid = true
            if authorization.pair.remote == pair.remote && (authorization.direction == .outbound || bidi) { carriesRemote = true }
            if authorization.pair.local == pair.local && authorization.direction == .outbound { carriesLocal = true }
            if carriesRemote && carriesLocal { break }
        }
        let open = phase == .established || phase == .onTrial
        return FederationLink.PlacementFacts(
            usable: open && (origin == .outgoing || bidi) && streamID != nil && anyValid,
            bidirectional: bidi,
            peerSpeaksDialback: peerSpeaksDialback,
            handlesDialbackErrors: handlesDialbackErrors,
            carriesRemote: carriesRemote, carriesLocal: carriesLocal,
            refusedLocal: refusedLocals.contains(pair.local),
            remoteProof: proof(of: pair.remote, at: time)?.method, pairCount: authorizations.count,
            peerCertificateHash: peerCertificateHash)
    }

    // MARK: Pair requests (our db:result on this link)

    /// Before a `db:result` on a link the peer opened whose peer has not answered one yet.
    mutating func beginAssertionTrial() {
        guard origin == .incoming, !assertionsAnswered, phase == .established || phase == .negotiating else { return }
        phase = .onTrial
        trialOpen = true
    }

    enum AwaitDecision: Equatable {
        /// Send the `db:result`: this is the first request for the pair.
        case send
        /// One is outstanding already; the waiter shares its answer.
        case joined
        /// The link is closed; the waiter was answered `.closed`.
        case closed
    }

    /// Registers a waiter for the answer to our `db:result` for `pair`, whose proof of the
    /// remote domain is `method` until `expires`.
    mutating func awaitAnswer(for pair: DomainPair, method: ProofMethod, expires: Date?,
                              continuation: CheckedContinuation<FederationLink.PairRequestOutcome, Never>) -> AwaitDecision {
        guard phase != .closed else {
            continuation.resume(returning: .closed)
            return .closed
        }
        let first = pendingRequests[pair] == nil
        pendingRequests[pair, default: []].append(continuation)
        if first { pendingProofs[pair] = (method, expires) }
        return first ? .send : .joined
    }

    struct AnswerEffects {
        /// Who asked: resume each with the outcome. Nil: nobody asked (unsolicited).
        var waiters: [CheckedContinuation<FederationLink.PairRequestOutcome, Never>]?
        /// Directions the valid answer authorised (both on a bidirectional link).
        var authorized: [PairDirection] = []
        /// The proof the authorisation rests on.
        var proof: (method: ProofMethod, expires: Date?)?
        /// Sending paused for the trial and may resume now.
        var resumeDrain = false
    }

    /// The peer's answer (or, with `fromPeer` false, our own timeout). A valid answer
    /// authorises the pair here, before the next element from the peer is read: on a
    /// bidirectional link the peer may send for the pair right after its answer (XEP-0288 §2).
    mutating func answer(_ pair: DomainPair, _ outcome: FederationLink.PairRequestOutcome, fromPeer: Bool, at now: Date) -> AnswerEffects {
        var effects = AnswerEffects(waiters: pendingRequests.removeValue(forKey: pair))
        let proof = pendingProofs.removeValue(forKey: pair)
        guard effects.waiters != nil else { return effects }
        if fromPeer {
            assertionsAnswered = true
            if trialOpen {
                effects.resumeDrain = trialKept.count >= Self.maximumUnacknowledged && outbound.count > 0
                trialOpen = false
                handedOver.append(contentsOf: trialKept)
                trialKept = []
                if phase == .onTrial { phase = .established }
            }
        }
        if case .valid = outcome, let proof {
            effects.authorized = authorize(pair, .outbound, method: proof.method, expires: proof.expires, alsoReverse: true, at: now)
            effects.proof = proof
        }
        return effects
    }

    // MARK: Sending

    enum EnqueueDecision: Equatable {
        /// The pair has `limit` stanzas waiting: bounce this one.
        case refused
        case queued
        /// Queued, and no drain is scheduled: schedule one.
        case queuedStartDrain
    }

    mutating func enqueue(_ stanza: Stanza, for pair: DomainPair, limit: Int) -> EnqueueDecision {
        guard outbound.count(for: pair) < limit else { return .refused }
        outbound.push(stanza, for: pair)
        if outbound.drainScheduled { return .queued }
        outbound.drainScheduled = true
        return .queuedStartDrain
    }

    /// The next stanza to write while the socket takes more, counted for stream management;
    /// nil when sending pauses (acknowledgements owed, trial full, retiring) or the queues
    /// are empty, in which case the drain ends under the same access as the look, so a stanza
    /// queued from now on schedules a new one.
    mutating func nextToWrite(at now: Date) -> Stanza? {
        if let sm = streamManagement, sm.unacked.count >= Self.maximumUnacknowledged { return nil }
        if trialOpen, trialKept.count >= Self.maximumUnacknowledged { return nil }
        if phase == .retiring || phase == .closed { return nil }
        guard let (_, stanza) = outbound.pop() else {
            outbound.drainScheduled = false
            return nil
        }
        if trialOpen && streamManagement == nil { trialKept.append(stanza) }
        // Without stream management, writing is as far as we can know it went.
        if streamManagement == nil && !trialOpen { handedOver.append(stanza) }
        stanzasSent += 1
        lastActivity = now
        if streamManagement != nil {
            // The clock for the peer's acknowledgement starts when it first owes one.
            if streamManagement?.unacked.isEmpty == true { lastAcknowledgement = now }
            // In place, through the optional: copying the state out and back made the queue
            // of unacknowledged stanzas shared, so every append copied all of it (up to 5,000
            // stanzas per write: two thirds of the CPU of a warm s2s burst, issue 16).
            streamManagement?.sentOutbound &+= 1
            streamManagement?.unacked.append(stanza)
            streamManagement?.sentSinceRequest += 1
        }
        return stanza
    }

    /// After a drain pass: whether to send `<r/>` (every ``acknowledgementRequestInterval``
    /// stanzas, and after the last of a burst), and how many stanzas still wait.
    mutating func drainPassEnded(wrote: Bool) -> (requestAcknowledgement: Bool, remaining: Int) {
        if outbound.count == 0 { outbound.drainScheduled = false }
        guard var sm = streamManagement, sm.sentSinceRequest > 0 else { return (false, outbound.count) }
        let request = sm.sentSinceRequest >= Self.acknowledgementRequestInterval || (wrote && outbound.count == 0)
        if request {
            sm.sentSinceRequest = 0
            streamManagement = sm
        }
        return (request, outbound.count)
    }

    var queuedCount: Int { outbound.count }

    /// Seconds since a stanza last went either way, when nothing is queued, unacknowledged
    /// or requested; nil while the link still has work.
    func idleSeconds(at time: Date) -> TimeInterval? {
        guard outbound.count == 0, streamManagement?.unacked.isEmpty ?? true, pendingRequests.isEmpty else { return nil }
        return time.timeIntervalSince(lastActivity)
    }

    // MARK: Stream management (XEP-0198, acknowledgements only)

    mutating func enableStreamManagement(requested: Bool) {
        guard streamManagement == nil else { return }
        var sm = StreamManagement()
        sm.countingInbound = !requested
        streamManagement = sm
    }

    mutating func streamManagementConfirmed() { streamManagement?.countingInbound = true }

    mutating func disableStreamManagement() { streamManagement = nil }

    mutating func countReceived(at now: Date) {
        stanzasReceived += 1
        lastActivity = now
        if streamManagement?.countingInbound == true { streamManagement?.handledInbound &+= 1 }
    }

    var handledInbound: UInt32 { streamManagement?.handledInbound ?? 0 }

    /// The peer's `<a h='…'/>`: `valid` is false when it acknowledges more than we sent;
    /// `resumeDrain` when sending had paused for want of acknowledgements.
    mutating func acknowledge(_ handled: UInt32, at now: Date) -> (valid: Bool, resumeDrain: Bool) {
        guard let acknowledged = streamManagement?.acknowledged, let unacknowledged = streamManagement?.unacked.count else { return (true, false) }
        let newly = handled &- acknowledged
        guard newly <= UInt32(unacknowledged) else { return (false, false) }
        let wasFull = unacknowledged >= Self.maximumUnacknowledged
        // In place, as in nextToWrite: a copy would duplicate the whole queue.
        if newly > 0, let sm = streamManagement { handedOver.append(contentsOf: sm.unacked.prefix(Int(newly))) }
        streamManagement?.unacked.removeFirst(Int(newly))
        streamManagement?.acknowledged = handled
        if newly > 0 { lastAcknowledgement = now }
        return (true, wasFull && outbound.count > 0)
    }

    func acknowledgementOverdue(at time: Date) -> TimeInterval? {
        guard let sm = streamManagement, !sm.unacked.isEmpty, phase != .closed else { return nil }
        return time.timeIntervalSince(lastAcknowledgement)
    }

    // MARK: Closing

    /// Retires the link; false if it already was, or is closed (close it once).
    mutating func beginRetiring() -> Bool {
        guard phase != .retiring && phase != .closed else { return false }
        phase = .retiring
        return true
    }

    struct CloseEffects {
        /// What the link owed, in order: unacknowledged, kept during the trial, queued.
        var owed: [Stanza] = []
        /// Requests to answer `.closed`.
        var waiters: [CheckedContinuation<FederationLink.PairRequestOutcome, Never>] = []
        /// A link the peer opened closed while our first `db:result` on it waited: the peer
        /// does not take them on its links.
        var refusedRequests = false
    }

    /// Closes the link and hands back what it owed. Idempotent: the second call returns
    /// nothing.
    mutating func close() -> CloseEffects {
        guard phase != .closed else { return CloseEffects() }
        phase = .closed
        var effects = CloseEffects()
        effects.owed = (streamManagement?.unacked ?? []) + trialKept + outbound.removeAll()
        streamManagement?.unacked = []
        trialKept = []
        trialOpen = false
        // A refusal is a stream error (or the connection dropped) while our first request
        // waited. A clean `</stream>` is how a Braid peer retires its duplicate link after a
        // simultaneous open, with our request crossing it: taken as a refusal, it kept us
        // from asking on that server's links for an hour, so the duplicate could not be
        // retired from our side and two links could stay (the likely cause of a CI failure
        // of the simultaneous-open test).
        effects.refusedRequests = origin == .incoming && !assertionsAnswered && !pendingRequests.isEmpty && peerEnding != .cleanly
        effects.waiters = pendingRequests.values.flatMap { $0 }
        pendingRequests = [:]
        pendingProofs = [:]
        return effects
    }
}

extension LinkStateMachine {
    /// Per-pair queues drained round-robin, each a ring buffer mutated in place, so one busy
    /// pair cannot starve the others and taking a stanza is O(1).
    struct OutboundQueues: Sendable {
        var queues: [DomainPair: CircularBuffer<Stanza>] = [:]
        var order: [DomainPair] = []
        var cursor = 0
        var count = 0
        var drainScheduled = false

        mutating func push(_ stanza: Stanza, for pair: DomainPair) {
            if queues[pair] == nil {
                order.append(pair)
                queues[pair] = CircularBuffer(initialCapacity: 4)
            }
            queues[pair]?.append(stanza)
            count += 1
        }

        /// The next stanza in round-robin order across pairs.
        mutating func pop() -> (DomainPair, Stanza)? {
            while count > 0, !order.isEmpty {
                if cursor >= order.count { cursor = 0 }
                let pair = order[cursor]
                guard let stanza = queues[pair]?.popFirst() else {
                    order.remove(at: cursor)
                    queues[pair] = nil
                    continue
                }
                count -= 1
                if queues[pair]?.isEmpty ?? true {
                    queues[pair] = nil
                    order.remove(at: cursor)
                } else {
                    cursor += 1
                }
                return (pair, stanza)
            }
            return nil
        }

        mutating func removeAll() -> [Stanza] {
            let all = order.flatMap { queues[$0].map(Array.init) ?? [] }
            self = OutboundQueues()
            return all
        }

        func count(for pair: DomainPair) -> Int {
            queues[pair]?.count ?? 0
        }
    }

    /// XEP-0198 on s2s: acknowledgements only, no resumption (digest §13.4).
    struct StreamManagement: Sendable {
        var handledInbound: UInt32 = 0
        var sentOutbound: UInt32 = 0
        var acknowledged: UInt32 = 0
        var unacked: [Stanza] = []
        var sentSinceRequest = 0
        /// Whether received stanzas count toward `h` yet. The side that sent `<enable/>`
        /// starts counting when `<enabled/>` arrives (XEP-0198 §4).
        var countingInbound = true
    }
}
