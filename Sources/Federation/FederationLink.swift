import Foundation
import NIOCore
import Synchronization
import Trust
import X509
import XMPPCore
import XMPPStream

/// One TCP connection to another server, in either direction, and the domain pairs
/// authorised on it.
///
/// The table of ``PairAuthorization``s is the link's only authority: a stanza is sent for a
/// pair only if an outbound authorisation for it is valid now, and a stanza received is
/// routed only if an inbound one is (RFC 6120 §8.1.1.2, §8.1.2.2). Authorisations are added
/// only where a proof succeeds.
///
/// Once negotiated, a link is symmetric when it is bidirectional (XEP-0288): either end may
/// assert further pairs with `db:result`, answer the other's, and send stanzas. Outgoing
/// stanzas wait in one queue per pair and are written round-robin, as fast as the socket
/// takes them, so one busy pair cannot starve the others.
public final class FederationLink: Sendable {
    public enum Origin: String, Sendable, Hashable, Codable {
        /// We connected to the peer.
        case outgoing
        /// The peer connected to us.
        case incoming
    }

    public let id: String
    public let origin: Origin
    /// Outgoing: the target host and port; incoming: the peer's address.
    public let peerAddress: String
    /// The SRV target we connected to (outgoing links only).
    public let peerTarget: ServerTarget?
    public let createdAt: Date
    let channel: any Channel
    private let state = Mutex(State())

    struct State {
        var certificateChain: [Certificate] = []
        var authorizations: [Key: PairAuthorization] = [:]
        /// Pairs withdrawn because the local domain stopped being hosted: stanzas for them
        /// get a stanza error rather than closing the link.
        var withdrawn: Set<DomainPair> = []
        /// Domains the peer proved on this connection, with how and until when; a later pair
        /// for the same remote domain reuses the proof (RFC 7712 §4.4, XEP-0344).
        var provenDomains: [String: (method: ProofMethod, expires: Date?)] = [:]
        var capabilities = OutgoingServerNegotiation.PeerCapabilities()
        /// Both directions may be used (XEP-0288).
        var bidi = false
        /// The id of the accepting side's stream: dialback keys on this link are bound to it.
        var streamID: String?
        var closed = false
        var stanzasSent = 0
        var stanzasReceived = 0
        var outbound = OutboundQueues()
        var streamManagement: StreamManagement?
        /// When a stanza last went either way.
        var lastActivity = Date()
        /// When the peer's certificate is next checked for revocation.
        var nextRevocationCheck = Date.distantPast
        /// Our `db:result` requests waiting for an answer.
        var pendingRequests: [DomainPair: [CheckedContinuation<PairRequestOutcome, Never>]] = [:]
        /// The proof each outstanding request rests on, applied the moment the answer arrives.
        var pendingProofs: [DomainPair: (method: ProofMethod, expires: Date?)] = [:]
        /// Being closed because the peer's own link to us is kept instead.
        var retiring = false
        /// On a link the peer opened: its stream header declared the dialback namespace, so
        /// it may answer our `db:result` here (on our links the stream features say).
        var peerDeclaredDialback = false
        /// The leaf certificate we present on this link (DER): our client certificate on
        /// ours, the one chosen for the requested domain on the peer's.
        var localCertificate: [UInt8]?
        var peerCertificateNamesOneDomain = false
        var peerCertificateHash: Int?
        /// Local domains the peer refused on this link (a dialback error or an invalid key):
        /// their pairs get a connection of their own instead of asking here again.
        var refusedLocals: Set<String> = []
        /// When the peer last acknowledged (XEP-0198), or when acknowledgements were last
        /// not owed: a peer that stops acknowledging gets its link reset.
        var lastAcknowledgement = Date()
        /// The peer answered one of our `db:result` requests on this link, so it accepts them.
        var assertionsAnswered = false
        /// Stanzas written since our first `db:result` on a link the peer opened, kept until
        /// the peer answers it. A peer whose outgoing side cannot take dialback (Prosody 0.12
        /// closes with `<invalid-id/>`) discards what follows the request; these are then
        /// sent again on another link (digest §14, fallback matrix). Nil when not on trial.
        var assertionTrial: [Stanza]?
    }

    struct Key: Hashable {
        var pair: DomainPair
        var direction: PairDirection
    }

    /// Per-pair queues drained round-robin. Each queue is a ring buffer mutated in place, so
    /// taking a stanza is O(1) however long its pair's queue is.
    struct OutboundQueues {
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

        /// Stanzas waiting for `pair`.
        func count(for pair: DomainPair) -> Int {
            queues[pair]?.count ?? 0
        }
    }

    /// XEP-0198 on s2s: acknowledgements only, no resumption (digest §13.4). Unacknowledged
    /// stanzas are re-sent on the next link when this one goes.
    struct StreamManagement {
        var handledInbound: UInt32 = 0
        var sentOutbound: UInt32 = 0
        var acknowledged: UInt32 = 0
        var unacked: [Stanza] = []
        var sentSinceRequest = 0
        /// Whether received stanzas count toward `h` yet. The side that sent `<enable/>`
        /// starts counting when `<enabled/>` arrives (XEP-0198 §4): on a bidirectional link
        /// the peer may send stanzas before it has read our `<enable/>`, and those it does
        /// not count as sent under stream management.
        var countingInbound = true
    }

    init(origin: Origin, peerAddress: String, peerTarget: ServerTarget? = nil, channel: any Channel) {
        self.id = UUID().uuidString
        self.origin = origin
        self.peerAddress = peerAddress
        self.peerTarget = peerTarget
        self.channel = channel
        self.createdAt = Date()
    }

    // MARK: Peer facts

    var certificateChain: [Certificate] { state.withLock { $0.certificateChain } }

    func setCertificateChain(_ chain: [Certificate]) {
        let single = chain.first.map(Self.namesOneDomain) ?? false
        let hash = chain.first.flatMap { try? $0.derBytes() }.map { der -> Int in
            var hasher = Hasher()
            hasher.combine(der)
            return hasher.finalize()
        }
        state.withLock {
            $0.certificateChain = chain
            $0.peerCertificateNamesOneDomain = single
            $0.peerCertificateHash = hash
        }
    }

    /// A hash of the peer's leaf certificate, for remembering proofs that failed on it.
    var peerCertificateHash: Int? { state.withLock { $0.peerCertificateHash } }

    /// Established, not closing, and open to our `db:result` (one lock, for scans of every
    /// link).
    var acceptsPairRequests: Bool {
        let now = Date()
        return state.withLock { state in
            !state.closed && !state.retiring && (origin == .outgoing || state.bidi) && state.streamID != nil
                && (origin == .outgoing ? state.capabilities.dialbackFeature : state.peerDeclaredDialback)
                && state.authorizations.values.contains { $0.isValid(at: now) }
        }
    }

    /// The peer's certificate names one domain only (a certificate per customer domain):
    /// such a link never takes a further target. Worked out once, when the chain arrives.
    var peerCertificateNamesOneDomain: Bool { state.withLock { $0.peerCertificateNamesOneDomain } }

    private static func namesOneDomain(_ leaf: Certificate) -> Bool {
        guard let identity = try? CertificateIdentity(certificate: leaf) else { return false }
        let names = Set(identity.dnsIDs.map { $0.lowercased() } + identity.srvIDs.map(\.domain) + identity.xmppAddrs)
        return names.count == 1 && !identity.dnsIDs.contains { $0.contains("*") }
    }

    /// What pair placement needs to know about this link for one pair, read under one lock:
    /// a burst of new pairs asks this of every link for every pair.
    struct PlacementFacts {
        var usable: Bool
        var bidirectional: Bool
        var peerSpeaksDialback: Bool
        var handlesDialbackErrors: Bool
        var carriesRemote: Bool
        var carriesLocal: Bool
        var refusedLocal: Bool
        var remoteProof: ProofMethod?
        var pairCount: Int
    }

    func placementFacts(for pair: DomainPair, at time: Date = Date()) -> PlacementFacts {
        state.withLock { state in
            var carriesRemote = false
            var carriesLocal = false
            var anyValid = false
            for authorization in state.authorizations.values where authorization.isValid(at: time) {
                anyValid = true
                if authorization.pair.remote == pair.remote && (authorization.direction == .outbound || state.bidi) { carriesRemote = true }
                if authorization.pair.local == pair.local && authorization.direction == .outbound { carriesLocal = true }
                if carriesRemote && carriesLocal { break }
            }
            let proof = state.provenDomains[pair.remote].flatMap { proof in proof.expires.map { time < $0 } ?? true ? proof.method : nil }
            return PlacementFacts(
                usable: !state.closed && !state.retiring && (origin == .outgoing || state.bidi) && state.streamID != nil && anyValid,
                bidirectional: state.bidi,
                peerSpeaksDialback: origin == .outgoing ? state.capabilities.dialbackFeature : state.peerDeclaredDialback,
                handlesDialbackErrors: state.capabilities.dialbackErrors || (origin == .incoming && state.bidi),
                carriesRemote: carriesRemote, carriesLocal: carriesLocal,
                refusedLocal: state.refusedLocals.contains(pair.local),
                remoteProof: proof, pairCount: state.authorizations.count)
        }
    }

    var capabilities: OutgoingServerNegotiation.PeerCapabilities { state.withLock { $0.capabilities } }

    func setCapabilities(_ capabilities: OutgoingServerNegotiation.PeerCapabilities) {
        state.withLock { $0.capabilities = capabilities }
    }

    var isBidirectional: Bool { state.withLock { $0.bidi } }

    func setBidirectional() {
        state.withLock { $0.bidi = true }
    }

    var streamID: String? { state.withLock { $0.streamID } }

    func setStreamID(_ id: String?) {
        state.withLock { $0.streamID = id }
    }

    /// We may ask for pairs on this link: ours, or the peer's when bidirectional.
    var canRequestPairs: Bool {
        state.withLock { !$0.closed && !$0.retiring && (origin == .outgoing || $0.bidi) }
    }

    /// Whether the peer takes `db:result` for further pairs on this link: on ours it
    /// advertised dialback after TLS (a peer that authenticated us by SASL EXTERNAL and
    /// offers no dialback never answers one); on its own, its header declared the dialback
    /// namespace.
    var peerSpeaksDialback: Bool {
        state.withLock { origin == .outgoing ? $0.capabilities.dialbackFeature : $0.peerDeclaredDialback }
    }

    func setPeerDeclaredDialback(_ declared: Bool) {
        state.withLock { $0.peerDeclaredDialback = declared }
    }

    var localCertificate: [UInt8]? { state.withLock { $0.localCertificate } }

    func setLocalCertificate(_ der: [UInt8]?) {
        state.withLock { if $0.localCertificate == nil { $0.localCertificate = der } }
    }

    /// The peer refused `local` on this link: an answer about the link, not the pair.
    func recordRefusal(of local: String) {
        state.withLock { _ = $0.refusedLocals.insert(local) }
    }

    var hasRefusedAny: Bool {
        state.withLock { !$0.refusedLocals.isEmpty }
    }

    func hasRefused(_ local: String) -> Bool {
        state.withLock { $0.refusedLocals.contains(local) }
    }

    /// The peer handles dialback errors, so a refused pair leaves the link up (XEP-0220
    /// §2.4.2). A peer that asked for bidi must handle them (XEP-0288 §2.2).
    var handlesDialbackErrors: Bool {
        state.withLock { $0.capabilities.dialbackErrors || (origin == .incoming && $0.bidi) }
    }

    func recordProof(of domain: String, method: ProofMethod, expires: Date?) {
        state.withLock { $0.provenDomains[domain] = (method, expires) }
    }

    /// A proof of `domain` still valid on this link, if any.
    func proof(of domain: String, at time: Date = Date()) -> (method: ProofMethod, expires: Date?)? {
        state.withLock { state in
            guard let proof = state.provenDomains[domain], proof.expires.map({ time < $0 }) ?? true else { return nil }
            return proof
        }
    }

    /// What the pairs with `domain` already on this link rest on, when no proof of it was
    /// recorded (the first pair of a link we opened without one): the same for a further
    /// pair with it (sender multiplexing), never a method that was not used.
    func carriedProof(of domain: String, at time: Date = Date()) -> (method: ProofMethod, expires: Date?) {
        state.withLock { state in
            let carried = state.authorizations.values.filter { $0.pair.remote == domain && $0.isValid(at: time) }
            guard let weakest = carried.min(by: { ($0.method.isCertificateProof ? 1 : 0) < ($1.method.isCertificateProof ? 1 : 0) }) else {
                return (ProofMethod.dns, nil)
            }
            return (weakest.method, weakest.expires)
        }
    }

    var nextRevocationCheck: Date { state.withLock { $0.nextRevocationCheck } }

    func setNextRevocationCheck(_ date: Date) {
        state.withLock { $0.nextRevocationCheck = date }
    }

    // MARK: Authorisations

    func authorize(_ pair: DomainPair, _ direction: PairDirection, method: ProofMethod, expires: Date?) {
        let authorization = PairAuthorization(pair: pair, direction: direction, method: method, authorizedAt: Date(), expires: expires)
        state.withLock {
            $0.authorizations[Key(pair: pair, direction: direction)] = authorization
            $0.withdrawn.remove(pair)
        }
    }

    /// Whether stanzas for `pair` may flow in `direction` now.
    public func isAuthorized(_ pair: DomainPair, _ direction: PairDirection, at time: Date = Date()) -> Bool {
        state.withLock { state in
            guard !state.closed, let authorization = state.authorizations[Key(pair: pair, direction: direction)] else { return false }
            // A retiring link has sent its </stream>: nothing more goes out on it, so stanzas
            // are routed to the link that replaces it rather than queued here until it closes.
            if direction == .outbound && state.retiring { return false }
            return authorization.isValid(at: time)
        }
    }

    func authorization(_ pair: DomainPair, _ direction: PairDirection) -> PairAuthorization? {
        state.withLock { $0.authorizations[Key(pair: pair, direction: direction)] }
    }

    /// Some pair is authorised: the link carries traffic and may take further pairs.
    var isEstablished: Bool {
        let now = Date()
        return state.withLock { !$0.closed && $0.authorizations.values.contains { $0.isValid(at: now) } }
    }

    var pairCount: Int { state.withLock { $0.authorizations.count } }

    /// True when any remote domain is authenticated inbound (some stanza may arrive).
    func hasInboundPairs(at time: Date = Date()) -> Bool {
        state.withLock { $0.authorizations.values.contains { $0.direction == .inbound && $0.isValid(at: time) } }
    }

    /// True when `remote` is authenticated for some inbound pair (the stanza's `from`).
    func isRemoteAuthenticated(_ remote: String, at time: Date = Date()) -> Bool {
        hasValidPair(remote: remote, .inbound, at: time)
    }

    /// True when some pair with this remote domain is valid in `direction`.
    func hasValidPair(remote: String, _ direction: PairDirection, at time: Date = Date()) -> Bool {
        state.withLock { $0.authorizations.values.contains { $0.direction == direction && $0.pair.remote == remote && $0.isValid(at: time) } }
    }

    /// True when some pair of this local domain is valid in `direction`.
    func hasValidPair(local: String, _ direction: PairDirection, at time: Date = Date()) -> Bool {
        state.withLock { $0.authorizations.values.contains { $0.direction == direction && $0.pair.local == local && $0.isValid(at: time) } }
    }

    /// An authorisation that exists but whose proof has lapsed.
    func hasLapsed(_ pair: DomainPair, _ direction: PairDirection, at time: Date = Date()) -> Bool {
        state.withLock { $0.authorizations[Key(pair: pair, direction: direction)].map { !$0.isValid(at: time) } ?? false }
    }

    /// Removes one authorisation (its proof lapsed and could not be renewed).
    func revoke(_ pair: DomainPair, _ direction: PairDirection) {
        state.withLock { _ = $0.authorizations.removeValue(forKey: Key(pair: pair, direction: direction)) }
    }

    /// Forgets a recorded proof, so the next use proves the domain afresh.
    func forgetProof(of domain: String) {
        state.withLock { _ = $0.provenDomains.removeValue(forKey: domain) }
    }

    /// Withdraws every pair of a local domain that is no longer hosted. The link stays up.
    func withdraw(local: String) -> [DomainPair] {
        state.withLock { state in
            let keys = state.authorizations.keys.filter { $0.pair.local == local }
            for key in keys {
                state.authorizations[key] = nil
                state.withdrawn.insert(key.pair)
            }
            return Array(Set(keys.map(\.pair)))
        }
    }

    func wasWithdrawn(_ pair: DomainPair) -> Bool {
        state.withLock { $0.withdrawn.contains(pair) }
    }

    /// Drops authorisations whose proof lapsed; returns them (RFC 6120 §13.7.2.3: a lapsed
    /// proof stops the pair at once).
    func expireAuthorizations(at time: Date = Date()) -> [PairAuthorization] {
        state.withLock { state in
            let lapsed = state.authorizations.filter { !$0.value.isValid(at: time) }
            for key in lapsed.keys { state.authorizations[key] = nil }
            return Array(lapsed.values)
        }
    }

    public var authorizations: [PairAuthorization] {
        state.withLock { Array($0.authorizations.values) }
    }

    // MARK: Pair requests

    enum PairRequestOutcome: Sendable, Equatable {
        case valid
        case invalid
        case error(StanzaError)
        case closed
    }

    /// Before a `db:result` on a link the peer opened whose peer has not yet answered one:
    /// keep what is written until it does (see ``State/assertionTrial``).
    func beginAssertionTrial() {
        guard origin == .incoming else { return }
        state.withLock { state in
            if !state.assertionsAnswered && state.assertionTrial == nil { state.assertionTrial = [] }
        }
    }

    /// On an outgoing link: the peer said it answers our `db:result` on the links it opens.
    var peerAnswersRequestsOnItsLinks: Bool { state.withLock { $0.capabilities.answersRequestsOnItsLinks } }

    /// Marks the link as being retired; false if it already was (close it once).
    func beginRetiring() -> Bool {
        state.withLock { state in
            if state.retiring || state.closed { return false }
            state.retiring = true
            return true
        }
    }

    /// The peer's IP address, for remembering how a provider's servers behave.
    var peerIP: String? { channel.remoteAddress?.ipAddress }

    /// Registers a wait for the answer to our `db:result` for `pair`. Returns false when a
    /// request for the pair is already outstanding (the caller should not send another).
    ///
    /// `method` and `expires` describe the proof the request rests on (the peer proven for
    /// the remote domain on this link).
    func awaitAnswer(for pair: DomainPair, method: ProofMethod, expires: Date?,
                     continuation: CheckedContinuation<PairRequestOutcome, Never>) -> Bool {
        state.withLock { state in
            if state.closed {
                continuation.resume(returning: .closed)
                return false
            }
            let first = state.pendingRequests[pair] == nil
            state.pendingRequests[pair, default: []].append(continuation)
            if first { state.pendingProofs[pair] = (method, expires) }
            return first
        }
    }

    /// Delivers the peer's answer to waiting requesters. False if nobody asked (unsolicited).
    ///
    /// A valid answer authorises the pair here, before the next element from the peer is
    /// read: on a bidirectional link the peer may send for the pair right after its answer
    /// (XEP-0288 §2), and that stanza must not find the pair still unauthorised while the
    /// requester's task has yet to run.
    ///
    /// `fromPeer` is false when the answer is our own timeout, which says nothing about
    /// whether the peer accepts requests on this link.
    func answer(_ pair: DomainPair, _ outcome: PairRequestOutcome, fromPeer: Bool = true) -> Bool {
        let (waiters, resume) = state.withLock { state -> ([CheckedContinuation<PairRequestOutcome, Never>]?, Bool) in
            let waiters = state.pendingRequests.removeValue(forKey: pair)
            let proof = state.pendingProofs.removeValue(forKey: pair)
            var resume = false
            if waiters != nil && fromPeer {
                state.assertionsAnswered = true
                if let trial = state.assertionTrial {
                    resume = trial.count >= Self.maximumUnacknowledged && state.outbound.count > 0
                    state.assertionTrial = nil
                }
            }
            if waiters != nil, case .valid = outcome, let proof, !state.closed {
                let now = Date()
                var directions: [PairDirection] = [.outbound]
                if state.bidi { directions.append(.inbound) }
                for direction in directions {
                    state.authorizations[Key(pair: pair, direction: direction)] =
                        PairAuthorization(pair: pair, direction: direction, method: proof.method, authorizedAt: now, expires: proof.expires)
                }
                state.withdrawn.remove(pair)
            }
            return (waiters, resume)
        }
        if resume { channel.eventLoop.execute { self.drain() } }
        guard let waiters else { return false }
        for waiter in waiters { waiter.resume(returning: outcome) }
        return true
    }

    // MARK: Sending

    /// Queues a stanza for an authorised pair; it is written when the socket can take it.
    /// Refused (false) when the pair already has `limit` stanzas waiting on this link: the
    /// caller bounces it rather than let a slow peer grow memory without bound.
    @discardableResult
    func enqueue(_ stanza: Stanza, for pair: DomainPair, limit: Int = .max) -> Bool {
        let schedule = state.withLock { state -> Bool? in
            guard state.outbound.count(for: pair) < limit else { return nil }
            state.outbound.push(stanza, for: pair)
            if state.outbound.drainScheduled { return false }
            state.outbound.drainScheduled = true
            return true
        }
        guard let schedule else { return false }
        if schedule {
            channel.eventLoop.execute { self.drain() }
        }
        return true
    }

    /// Sent stanzas the peer has not acknowledged yet beyond which sending pauses until it
    /// does (XEP-0198 as flow control: a peer that never acknowledges cannot make us hold an
    /// unbounded re-send buffer).
    static let maximumUnacknowledged = 5000

    /// Writes queued stanzas round-robin while the channel is writable (NIO backpressure),
    /// counting them for stream management. Runs on the channel's event loop.
    func drain() {
        channel.eventLoop.preconditionInEventLoop()
        var wrote = false
        var requestAck = false
        while channel.isWritable {
            let next = state.withLock { state -> Stanza? in
                if let sm = state.streamManagement, sm.unacked.count >= Self.maximumUnacknowledged { return nil }
                if let trial = state.assertionTrial, trial.count >= Self.maximumUnacknowledged { return nil }
                // A retiring link has sent its </stream>: what is queued is handed back on close.
                if state.retiring { return nil }
                guard let (_, stanza) = state.outbound.pop() else {
                    // Empty: the drain ends here, under the same lock as the look, so a stanza
                    // queued from now on schedules a new one. (Clearing the flag after
                    // releasing the lock left such a stanza, and all after it, unsent.)
                    state.outbound.drainScheduled = false
                    return nil
                }
                if state.assertionTrial != nil && state.streamManagement == nil {
                    state.assertionTrial?.append(stanza)
                }
                state.stanzasSent += 1
                state.lastActivity = Date()
                if state.streamManagement != nil {
                    // The clock for the peer's acknowledgement starts when it first owes one.
                    if state.streamManagement?.unacked.isEmpty == true { state.lastAcknowledgement = Date() }
                    state.streamManagement?.sentOutbound &+= 1
                    state.streamManagement?.unacked.append(stanza)
                    state.streamManagement?.sentSinceRequest += 1
                    if (state.streamManagement?.sentSinceRequest ?? 0) >= 16 {
                        state.streamManagement?.sentSinceRequest = 0
                        requestAck = true
                    }
                }
                return stanza
            }
            guard let next else { break }
            channel.write(StreamOutput.element(next.element), promise: nil)
            wrote = true
        }
        let remaining = state.withLock { state -> Int in
            if state.outbound.count == 0 { state.outbound.drainScheduled = false }
            return state.outbound.count
        }
        if requestAck || (wrote && remaining == 0 && state.withLock({ ($0.streamManagement?.sentSinceRequest ?? 0) > 0 })) {
            state.withLock { $0.streamManagement?.sentSinceRequest = 0 }
            if state.withLock({ $0.streamManagement != nil }) {
                channel.write(StreamOutput.element(XMLElement(name: "r", namespace: XMLNamespace.streamManagement)), promise: nil)
            }
        }
        if wrote { channel.flush() }
        // If the socket is full, the handler calls drain() again when it becomes writable.
    }

    /// Writes a first-level element that is not a stanza (dialback, stream management).
    func sendControl(_ element: XMLElement) {
        channel.writeAndFlush(StreamOutput.element(element), promise: nil)
    }

    var queuedCount: Int { state.withLock { $0.outbound.count } }

    /// Seconds since a stanza last went either way, when nothing is queued or waiting for
    /// an acknowledgement; nil while the link still has work.
    func idleSeconds(at time: Date) -> TimeInterval? {
        state.withLock { state in
            guard state.outbound.count == 0, (state.streamManagement?.unacked.isEmpty ?? true), state.pendingRequests.isEmpty else { return nil }
            return time.timeIntervalSince(state.lastActivity)
        }
    }

    // MARK: Stream management (XEP-0198, acknowledgements only)

    /// Starts stream management: `requested` when we sent `<enable/>` (inbound counting then
    /// waits for ``streamManagementConfirmed()``), false when we answer the peer's.
    func enableStreamManagement(requested: Bool) {
        state.withLock {
            if $0.streamManagement == nil {
                var sm = StreamManagement()
                sm.countingInbound = !requested
                $0.streamManagement = sm
            }
        }
    }

    /// The peer's `<enabled/>`: stanzas it sends from here on count toward our `h`.
    func streamManagementConfirmed() {
        state.withLock { $0.streamManagement?.countingInbound = true }
    }

    var streamManagementEnabled: Bool { state.withLock { $0.streamManagement != nil } }

    /// The peer answered `<failed/>` to our `<enable/>`: stop counting.
    func disableStreamManagement() {
        state.withLock { $0.streamManagement = nil }
    }

    /// Counts a stanza received, for the `h` we report.
    func countReceived() {
        state.withLock { state in
            state.stanzasReceived += 1
            state.lastActivity = Date()
            if state.streamManagement?.countingInbound == true {
                state.streamManagement?.handledInbound &+= 1
            }
        }
    }

    var handledInbound: UInt32 { state.withLock { $0.streamManagement?.handledInbound ?? 0 } }

    /// Applies the peer's `<a h='…'/>`. False if it acknowledges more than we sent.
    func acknowledge(_ handled: UInt32) -> Bool {
        let (valid, resume) = state.withLock { state -> (Bool, Bool) in
            guard var sm = state.streamManagement else { return (true, false) }
            let newly = handled &- sm.acknowledged
            guard newly <= UInt32(sm.unacked.count) else { return (false, false) }
            let wasFull = sm.unacked.count >= Self.maximumUnacknowledged
            sm.unacked.removeFirst(Int(newly))
            sm.acknowledged = handled
            if newly > 0 { state.lastAcknowledgement = Date() }
            state.streamManagement = sm
            return (true, wasFull && state.outbound.count > 0)
        }
        if resume { drain() }
        return valid
    }

    /// Seconds the peer has owed an acknowledgement for stanzas we sent (XEP-0198), or nil
    /// when it owes none.
    func acknowledgementOverdue(at time: Date) -> TimeInterval? {
        state.withLock { state in
            guard let sm = state.streamManagement, !sm.unacked.isEmpty, !state.closed else { return nil }
            return time.timeIntervalSince(state.lastAcknowledgement)
        }
    }

    // MARK: Closing

    var isClosed: Bool { state.withLock { $0.closed } }

    /// Marks the link closed and hands back what it still owed: stanzas queued or sent but
    /// not acknowledged, in order, to be re-sent on another link. Waiting pair requests
    /// are answered `.closed`. Idempotent: the second call returns nothing.
    ///
    /// `refusedRequests` is true when the link was one the peer opened and it closed while
    /// our first `db:result` on it waited: the peer does not take them on its links.
    @discardableResult
    func markClosed() -> (owed: [Stanza], refusedRequests: Bool) {
        let (owed, waiters, refused) = state.withLock { state -> ([Stanza], [CheckedContinuation<PairRequestOutcome, Never>], Bool) in
            guard !state.closed else { return ([], [], false) }
            state.closed = true
            let unacked = state.streamManagement?.unacked ?? []
            state.streamManagement?.unacked = []
            let onTrial = state.assertionTrial ?? []
            state.assertionTrial = nil
            let queued = state.outbound.removeAll()
            let refused = origin == .incoming && !state.assertionsAnswered && !state.pendingRequests.isEmpty
            let waiters = state.pendingRequests.values.flatMap { $0 }
            state.pendingRequests = [:]
            state.pendingProofs = [:]
            return (unacked + onTrial + queued, waiters, refused)
        }
        for waiter in waiters { waiter.resume(returning: .closed) }
        return (owed, refused)
    }

    /// Ends the stream and closes the connection.
    func closeStream() {
        let channel = self.channel
        channel.writeAndFlush(StreamOutput.end).whenComplete { _ in channel.close(promise: nil) }
        closeSoon()
    }

    /// Closes with a stream error (`<reset/>` when proofs lapsed, RFC 6120 §4.9.3.16).
    func close(with error: StreamError) {
        let channel = self.channel
        channel.writeAndFlush(StreamOutput.error(error)).whenComplete { _ in channel.close(promise: nil) }
        closeSoon()
    }

    /// A peer that reads nothing never lets the closing write complete: the connection is
    /// closed anyway a little later, so what the link owed is handed back and re-sent.
    private func closeSoon() {
        let channel = self.channel
        channel.eventLoop.scheduleTask(in: .seconds(5)) { channel.close(promise: nil) }
    }

    /// A description for operators (`braid links`) and logs.
    public var snapshot: LinkSnapshot {
        state.withLock { state in
            LinkSnapshot(id: id, origin: origin, peerAddress: peerAddress, createdAt: createdAt,
                         pairs: state.authorizations.values.sorted { ($0.pair.local, $0.pair.remote, $0.direction.rawValue) < ($1.pair.local, $1.pair.remote, $1.direction.rawValue) },
                         stanzasSent: state.stanzasSent, stanzasReceived: state.stanzasReceived, closed: state.closed,
                         bidirectional: state.bidi, queued: state.outbound.count,
                         unacknowledged: state.streamManagement?.unacked.count ?? 0)
        }
    }
}

/// A link as operators see it.
public struct LinkSnapshot: Sendable {
    public var id: String
    public var origin: FederationLink.Origin
    public var peerAddress: String
    public var createdAt: Date
    public var pairs: [PairAuthorization]
    public var stanzasSent: Int
    public var stanzasReceived: Int
    public var closed: Bool
    public var bidirectional: Bool = false
    public var queued: Int = 0
    public var unacknowledged: Int = 0
}
