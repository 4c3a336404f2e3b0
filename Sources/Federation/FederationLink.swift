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
    /// The link's state (``LinkStateMachine``), confined to the channel's event loop as in
    /// SwiftNIO: no lock; the box traps an access from any other thread. The handlers run
    /// there; the manager hops there (``onLoop(_:)``, ``onLoops(_:_:)``, ``submit(_:for:)``), so a
    /// check and the action it guards are one step of the loop.
    private let machine: NIOLoopBoundBox<LinkStateMachine>

    /// The event loop the link's state lives on.
    var eventLoop: any EventLoop { channel.eventLoop }

    /// The state, for the accessors below; on the event loop only.
    private var state: LinkStateMachine {
        get { machine.value }
        _modify { yield &machine.value }
    }

    /// Where this link reads the time of day (the manager's clock).
    let wallClock: WallClock

    /// Told of stanzas the peer now has (its acknowledgement, or written on a link without
    /// stream management); a cluster node that sends for other nodes tells them.
    let onHandedOver: (@Sendable ([Stanza]) -> Void)?

    init(origin: Origin, peerAddress: String, peerTarget: ServerTarget? = nil, channel: any Channel, wallClock: WallClock = .system,
         onHandedOver: (@Sendable ([Stanza]) -> Void)? = nil) {
        self.onHandedOver = onHandedOver
        self.wallClock = wallClock
        self.id = UUID().uuidString
        self.origin = origin
        self.peerAddress = peerAddress
        self.peerTarget = peerTarget
        self.channel = channel
        let now = wallClock.now()
        self.createdAt = now
        // Made off the loop too (tests); the value is handed over, not shared.
        self.machine = .makeBoxSendingValue(LinkStateMachine(origin: origin, now: now), eventLoop: channel.eventLoop)
    }

    // MARK: Reaching the loop

    /// Runs `body` on the link's event loop and hands back its result; nil when the loop is
    /// gone (the server is shutting down).
    func onLoop<Result: Sendable>(_ body: @escaping @Sendable (FederationLink) -> Result) async -> Result? {
        let link = self
        return try? await channel.eventLoop.submit { body(link) }.get()
    }

    /// ``onLoop(_:)`` for many links with one hop per event loop, not per link: placement asks
    /// every link about every new pair, and with a certificate per customer domain there are
    /// thousands. Results are in the order of `links`; nil for a link whose loop is gone.
    static func onLoops<Result: Sendable>(_ links: [FederationLink], _ body: @escaping @Sendable (FederationLink) -> Result) async -> [Result?] {
        var byLoop: [ObjectIdentifier: (loop: any EventLoop, members: [(Int, FederationLink)])] = [:]
        for (index, link) in links.enumerated() {
            byLoop[ObjectIdentifier(link.eventLoop), default: (link.eventLoop, [])].members.append((index, link))
        }
        var results = [Result?](repeating: nil, count: links.count)
        await withTaskGroup(of: [(Int, Result)].self) { tasks in
            for (loop, members) in byLoop.values {
                tasks.addTask {
                    (try? await loop.submit { members.map { ($0.0, body($0.1)) } }.get()) ?? []
                }
            }
            for await part in tasks {
                for (index, result) in part { results[index] = result }
            }
        }
        return results
    }

    // Everything below runs on the link's event loop (the box checks), except `channel`
    // writes (`sendControl`, `closeStream`, `close(with:)`), which NIO takes from anywhere.

    // MARK: Peer facts

    var certificateChain: [Certificate] { state.certificateChain }

    func setCertificateChain(_ chain: [Certificate]) {
        let single = chain.first.map(Self.namesOneDomain) ?? false
        let hash = chain.first.flatMap { try? $0.derBytes() }.map { der -> Int in
            var hasher = Hasher()
            hasher.combine(der)
            return hasher.finalize()
        }
        state.peerPresented(chain, namesOneDomain: single, hash: hash)
    }

    /// A hash of the peer's leaf certificate, for remembering proofs that failed on it.
    var peerCertificateHash: Int? { state.peerCertificateHash }

    /// The peer's certificate names one domain only (a certificate per customer domain):
    /// such a link never takes a further target. Worked out once, when the chain arrives.
    var peerCertificateNamesOneDomain: Bool { state.peerCertificateNamesOneDomain }

    private static func namesOneDomain(_ leaf: Certificate) -> Bool {
        guard let identity = try? CertificateIdentity(certificate: leaf) else { return false }
        let names = Set(identity.dnsIDs.map { $0.lowercased() } + identity.srvIDs.map(\.domain) + identity.xmppAddrs)
        return names.count == 1 && !identity.dnsIDs.contains { $0.contains("*") }
    }

    /// What pair placement needs to know about this link for one pair, read at once: a
    /// burst of new pairs asks this of every link for every pair.
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
        /// For remembering proofs that failed on the peer's certificate.
        var peerCertificateHash: Int?
    }

    func placementFacts(for pair: DomainPair, at time: Date? = nil) -> PlacementFacts {
        let time = time ?? wallClock.now()
        return state.placementFacts(for: pair, at: time)
    }

    func setCapabilities(_ capabilities: OutgoingServerNegotiation.PeerCapabilities) {
        state.capabilities = capabilities
    }

    var isBidirectional: Bool { state.bidi }

    func setBidirectional() {
        state.setBidirectional()
    }

    var streamID: String? { state.streamID }

    func setStreamID(_ id: String?) {
        state.streamID = id
    }

    /// Whether the peer takes `db:result` for further pairs on this link.
    var peerSpeaksDialback: Bool { state.peerSpeaksDialback }

    func setPeerDeclaredDialback(_ declared: Bool) {
        state.peerDeclaredDialback = declared
    }

    var localCertificate: [UInt8]? { state.localCertificate }

    func setLocalCertificate(_ der: [UInt8]?) {
        state.setLocalCertificate(der)
    }

    /// The peer sent a stream error: what closes the link next is a refusal of what waited.
    func peerSentStreamError() {
        state.peerSentStreamError()
    }

    /// The peer sent `</stream>` (after an error or not).
    func peerEndedStream() {
        state.peerEndedStream()
    }

    /// The peer refused `local` on this link: an answer about the link, not the pair.
    func recordRefusal(of local: String) {
        state.recordRefusal(of: local)
    }

    var hasRefusedAny: Bool { !state.refusedLocals.isEmpty }

    /// The peer handles dialback errors, so a refused pair leaves the link up.
    var handlesDialbackErrors: Bool { state.handlesDialbackErrors }

    func recordProof(of domain: String, method: ProofMethod, expires: Date?) {
        state.recordProof(of: domain, method: method, expires: expires)
    }

    /// A proof of `domain` still valid on this link, if any.
    func proof(of domain: String, at time: Date? = nil) -> (method: ProofMethod, expires: Date?)? {
        let time = time ?? wallClock.now()
        return state.proof(of: domain, at: time)
    }

    /// What the pairs with `domain` already on this link rest on (see
    /// ``LinkStateMachine/carriedProof(of:at:)``).
    func carriedProof(of domain: String, at time: Date? = nil) -> (method: ProofMethod, expires: Date?) {
        let time = time ?? wallClock.now()
        return state.carriedProof(of: domain, at: time)
    }

    /// Some pair or recorded proof here rests on the peer's certificate.
    var restsOnCertificate: Bool { state.restsOnCertificate }

    var nextRevocationCheck: Date { state.nextRevocationCheck }

    func setNextRevocationCheck(_ date: Date) {
        state.nextRevocationCheck = date
    }

    // MARK: Authorisations

    /// Enters a proof for `pair` (see ``LinkStateMachine/authorize(_:_:method:expires:alsoReverse:at:)``);
    /// returns the directions newly authorised.
    @discardableResult
    func authorize(_ pair: DomainPair, _ direction: PairDirection, method: ProofMethod, expires: Date?, alsoReverse: Bool = false) -> [PairDirection] {
        let now = wallClock.now()
        return state.authorize(pair, direction, method: method, expires: expires, alsoReverse: alsoReverse, at: now)
    }

    /// A renewed proof for an existing authorisation.
    func renew(_ pair: DomainPair, _ direction: PairDirection, method: ProofMethod, expires: Date?) {
        let now = wallClock.now()
        state.renew(pair, direction, method: method, expires: expires, at: now)
    }

    /// Whether stanzas for `pair` may flow in `direction` now.
    public func isAuthorized(_ pair: DomainPair, _ direction: PairDirection, at time: Date? = nil) -> Bool {
        let time = time ?? wallClock.now()
        return state.isAuthorized(pair, direction, at: time)
    }

    func authorization(_ pair: DomainPair, _ direction: PairDirection) -> PairAuthorization? {
        state.authorization(pair, direction)
    }

    var pairCount: Int { state.authorizations.count }

    /// True when any remote domain is authenticated inbound (some stanza may arrive).
    func hasInboundPairs(at time: Date? = nil) -> Bool {
        let time = time ?? wallClock.now()
        return state.hasValidPair(where: { $0.direction == .inbound }, at: time)
    }

    /// True when `remote` is authenticated for some inbound pair (the stanza's `from`).
    func isRemoteAuthenticated(_ remote: String, at time: Date? = nil) -> Bool {
        hasValidPair(remote: remote, .inbound, at: time)
    }

    /// True when some pair with this remote domain is valid in `direction`.
    func hasValidPair(remote: String, _ direction: PairDirection, at time: Date? = nil) -> Bool {
        let time = time ?? wallClock.now()
        return state.hasValidPair(where: { $0.direction == direction && $0.pair.remote == remote }, at: time)
    }

    /// True when some pair of this local domain is valid in `direction`.
    func hasValidPair(local: String, _ direction: PairDirection, at time: Date? = nil) -> Bool {
        let time = time ?? wallClock.now()
        return state.hasValidPair(where: { $0.direction == direction && $0.pair.local == local }, at: time)
    }

    /// An authorisation that exists but whose proof has lapsed.
    func hasLapsed(_ pair: DomainPair, _ direction: PairDirection, at time: Date? = nil) -> Bool {
        let time = time ?? wallClock.now()
        return state.hasLapsed(pair, direction, at: time)
    }

    /// Withdraws every pair of a local domain that is no longer hosted. The link stays up.
    func withdraw(local: String) -> [DomainPair] {
        state.withdraw(local: local)
    }

    var hasWithdrawnPairs: Bool { !state.withdrawn.isEmpty }

    func wasWithdrawn(_ pair: DomainPair) -> Bool {
        state.withdrawn.contains(pair)
    }

    public var authorizations: [PairAuthorization] {
        Array(state.authorizations.values)
    }

    // MARK: Pair requests

    enum PairRequestOutcome: Sendable, Equatable {
        case valid
        case invalid
        case error(StanzaError)
        case closed
    }

    /// Before a `db:result` on a link the peer opened whose peer has not yet answered one.
    func beginAssertionTrial() {
        state.beginAssertionTrial()
    }

    /// On an outgoing link: the peer said it answers our `db:result` on the links it opens.
    var peerAnswersRequestsOnItsLinks: Bool { state.capabilities.answersRequestsOnItsLinks }

    /// Marks the link as being retired; false if it already was (close it once).
    func beginRetiring() -> Bool {
        state.beginRetiring()
    }

    /// The peer's IP address, for remembering how a provider's servers behave.
    var peerIP: String? { channel.remoteAddress?.ipAddress }

    /// Registers a wait for the answer to our `db:result` for `pair`. Returns false when a
    /// request for the pair is already outstanding (the caller should not send another).
    func awaitAnswer(for pair: DomainPair, method: ProofMethod, expires: Date?,
                     continuation: CheckedContinuation<PairRequestOutcome, Never>) -> Bool {
        state.awaitAnswer(for: pair, method: method, expires: expires, continuation: continuation) == .send
    }

    /// Takes the peer's answer (see ``LinkStateMachine/answer(_:_:fromPeer:at:)``). Nil if
    /// nobody asked (unsolicited); otherwise what the answer authorised, for the caller to
    /// route, and the requesters, whom the caller resumes (``resume(_:with:)``) only after
    /// that: a requester resumed first could find the pair's stanzas still waiting and send
    /// them again through a second request (seen under load: two `db:result` for one pair).
    func answer(_ pair: DomainPair, _ outcome: PairRequestOutcome, fromPeer: Bool = true) -> LinkStateMachine.AnswerEffects? {
        let now = wallClock.now()
        let effects = state.answer(pair, outcome, fromPeer: fromPeer, at: now)
        reportHandedOver()
        if effects.resumeDrain { channel.eventLoop.execute { self.drain() } }
        return effects.waiters == nil ? nil : effects
    }

    /// Resumes the requesters an answer concerned.
    func resume(_ effects: LinkStateMachine.AnswerEffects, with outcome: PairRequestOutcome) {
        for waiter in effects.waiters ?? [] { waiter.resume(returning: outcome) }
    }

    // MARK: Sending

    /// Queues a stanza for an authorised pair; it is written when the socket can take it.
    /// Refused (false) when the pair already has `limit` stanzas waiting on this link.
    @discardableResult
    func enqueue(_ stanza: Stanza, for pair: DomainPair, limit: Int = .max) -> Bool {
        switch state.enqueue(stanza, for: pair, limit: limit) {
        case .refused:
            return false
        case .queued:
            return true
        case .queuedStartDrain:
            channel.eventLoop.execute { self.drain() }
            return true
        }
    }

    static let maximumUnacknowledged = LinkStateMachine.maximumUnacknowledged

    private func reportHandedOver() {
        guard let onHandedOver else { return }
        let stanzas = state.takeHandedOver()
        if !stanzas.isEmpty { onHandedOver(stanzas) }
    }

    /// Writes queued stanzas round-robin while the channel is writable (NIO backpressure).
    /// Runs on the channel's event loop.
    func drain() {
        channel.eventLoop.preconditionInEventLoop()
        var wrote = false
        while channel.isWritable {
            let now = wallClock.now()
            guard let next = state.nextToWrite(at: now) else { break }
            channel.write(StreamOutput.element(next.element), promise: nil)
            wrote = true
        }
        reportHandedOver()
        let (requestAcknowledgement, _) = state.drainPassEnded(wrote: wrote)
        if requestAcknowledgement {
            channel.write(StreamOutput.element(XMLElement(name: "r", namespace: XMLNamespace.streamManagement)), promise: nil)
        }
        if wrote || requestAcknowledgement { channel.flush() }
        // If the socket is full, the handler calls drain() again when it becomes writable.
    }

    /// Writes a first-level element that is not a stanza (dialback, stream management).
    func sendControl(_ element: XMLElement) {
        channel.writeAndFlush(StreamOutput.element(element), promise: nil)
    }

    var queuedCount: Int { state.queuedCount }

    func idleSeconds(at time: Date) -> TimeInterval? {
        state.idleSeconds(at: time)
    }

    // MARK: Stream management (XEP-0198, acknowledgements only)

    func enableStreamManagement(requested: Bool) {
        state.enableStreamManagement(requested: requested)
    }

    func streamManagementConfirmed() {
        state.streamManagementConfirmed()
    }

    var streamManagementEnabled: Bool { state.streamManagement != nil }

    func disableStreamManagement() {
        state.disableStreamManagement()
    }

    func countReceived() {
        let now = wallClock.now()
        state.countReceived(at: now)
    }

    var handledInbound: UInt32 { state.handledInbound }

    /// Applies the peer's `<a h='…'/>`. False if it acknowledges more than we sent.
    func acknowledge(_ handled: UInt32) -> Bool {
        let now = wallClock.now()
        let (valid, resume) = state.acknowledge(handled, at: now)
        reportHandedOver()
        if resume { drain() }
        return valid
    }

    func acknowledgementOverdue(at time: Date) -> TimeInterval? {
        state.acknowledgementOverdue(at: time)
    }

    // MARK: Closing

    var isClosed: Bool { state.isClosed }

    /// Marks the link closed and hands back what it still owed, to be re-sent on another
    /// link; waiting pair requests are answered `.closed`. Idempotent.
    @discardableResult
    func markClosed() -> (owed: [Stanza], refusedRequests: Bool) {
        let effects = state.close()
        for waiter in effects.waiters { waiter.resume(returning: .closed) }
        return (effects.owed, effects.refusedRequests)
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

    /// A description for operators (`braid links`) and logs (on the event loop: see
    /// ``FederationManager/links``).
    var snapshot: LinkSnapshot {
        let state = self.state
        return LinkSnapshot(id: id, origin: origin, peerAddress: peerAddress, createdAt: createdAt,
                         pairs: state.authorizations.values.sorted { ($0.pair.local, $0.pair.remote, $0.direction.rawValue) < ($1.pair.local, $1.pair.remote, $1.direction.rawValue) },
                         stanzasSent: state.stanzasSent, stanzasReceived: state.stanzasReceived, closed: state.isClosed,
                         bidirectional: state.bidi, queued: state.queuedCount,
                         unacknowledged: state.streamManagement?.unacked.count ?? 0)
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
