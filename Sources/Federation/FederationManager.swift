import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Trust
import X509
import XMPPCore
import XMPPStream

/// What federation needs from the server that hosts it.
public protocol FederationHost: Sendable {
    /// Whether `domain` (canonical) is hosted here.
    func isHosted(_ domain: String) -> Bool
    /// A stanza that arrived from a peer and passed every check: route it locally.
    func deliverInbound(_ stanza: Stanza) async
    /// A stanza that could not be sent: answer its sender with `error`.
    func bounce(_ stanza: Stanza, with error: StanzaError) async
    /// Our certificates.
    var tls: TLSContextStore { get }
    /// Makes sure a certificate covers `domain` (a self-signed one may be made on first use).
    func prepareCertificate(for domain: String) async
}

/// Where a peer domain's servers are.
public enum PeerLocation: Sendable, Hashable {
    case targets([PeerTarget])
    /// No service, no such domain, or a DNSSEC-bogus answer: fail closed.
    case notFound(String)
}

public struct PeerTarget: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public var directTLS: Bool
    /// The SRV answer was DNSSEC-secure (RFC 7673 §4.1).
    public var secure: Bool

    public init(host: String, port: Int, directTLS: Bool, secure: Bool = false) {
        self.host = host
        self.port = port
        self.directTLS = directTLS
        self.secure = secure
    }

    public var description: String { "\(host):\(port)\(directTLS ? " (direct TLS)" : "")" }

    /// Host and port, the identity of a connection (XEP-0220 §2.6.2).
    public var serverTarget: ServerTarget {
        ServerTarget(host: host.lowercased().trimmingSuffix("."), port: port)
    }
}

/// Finds a domain's servers (DNS, in production).
public protocol PeerLocating: Sendable {
    func locate(_ domain: String) async -> PeerLocation
    /// The addresses of one target, in the order to try. Resolved by the same validating
    /// resolver as the SRV records, so a forged or bogus answer is never connected to.
    func resolve(_ target: PeerTarget) async throws(TargetResolutionError) -> ResolvedTarget
}

/// The socket addresses of a target host.
public struct ResolvedTarget: Sendable {
    public var addresses: [SocketAddress]
    /// The address records were DNSSEC-secure (RFC 7673 §3.2: only then may TLSA apply).
    public var secure: Bool

    public init(addresses: [SocketAddress], secure: Bool) {
        self.addresses = addresses
        self.secure = secure
    }
}

/// A target whose addresses cannot be used.
public struct TargetResolutionError: Error, Sendable, CustomStringConvertible {
    public var reason: String

    public init(reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// Server-to-server federation: the links, the domain pairs authorised on each, and the
/// stanzas waiting for a pair to be authorised (RFC 6120 §10.4, XEP-0220, XEP-0288).
///
/// A link is one TCP connection to a peer provider, in either direction. Every pair between
/// the two providers that can be proven rides on it: further local domains join as senders
/// (XEP-0220 §2.6.1), further peer domains as targets once the peer is proven for them on
/// that connection (§2.6.2 with the RFC 7712 §4.4.2 rule), and with XEP-0288 the peer's
/// pairs come back the same way. A new connection is opened only when no existing link can
/// carry a pair. Nothing is routed for a pair that is not authorised on the link it uses.
public final class FederationManager: Sendable {
    public let configuration: FederationConfiguration
    let host: any FederationHost
    let locator: any PeerLocating
    let group: any EventLoopGroup
    let logger: Logger
    /// Dialback keys (XEP-0185), from the configured secret, a random one, or (in a
    /// cluster) the secret the nodes share through their database.
    var keys: DialbackKeyGenerator { keysBox.withLock { $0 } }
    private let keysBox: Mutex<DialbackKeyGenerator>
    let validator: PeerCertificateValidator
    /// Proofs tried for a peer domain, strongest first: PKIX, then whatever the server added
    /// (POSH, DANE). Dialback is the fallback outside this list.
    let proofs: [any DomainProof]
    let proofPolicy: DomainProofPolicy
    /// Where federation reads the time of day (injected by tests).
    public let wallClock: WallClock
    let revocation: (any RevocationChecking)?
    /// Releases what the manager's helpers hold (HTTP clients), after the links are closed.
    private let onShutdown: [@Sendable () async -> Void]
    let metrics: FederationMetrics
    let resentStanzas: ResentStanzaFilter
    let state = Mutex(State())
    private let listeners = Mutex<[any Channel]>([])
    /// The bind in progress, if any: start-up and the cluster's lease callback can both ask
    /// for the listeners at once, and two binds of one port would fail one of them.
    private let binding = Mutex<Task<[String: Int], any Error>?>(nil)
    /// The domain whose certificate direct TLS presents without SNI, kept for listening again.
    private let defaultDomainBox = Mutex<String?>(nil)
    private let handoverObserver = Mutex<(@Sendable ([Stanza]) -> Void)?>(nil)

    /// Uses `secret` for dialback keys from now on. A cluster gives every node the same one
    /// before federation starts, so a key one node issued verifies on any other (the node
    /// that holds the federation lease changes).
    public func useDialbackSecret(_ secret: String) {
        guard !secret.isEmpty else { return }
        keysBox.withLock { $0 = DialbackKeyGenerator(secret: secret) }
    }

    /// Tells `body` of every stanza a peer now has (acknowledged under XEP-0198, or written
    /// on a link without it). Set before ``start(defaultDomain:listen:)``: links made before
    /// do not report. A cluster node serving federation for the others acknowledges their
    /// stanzas to them only then, so a stanza lost with this node is sent again by theirs.
    public func observeHandover(_ body: @escaping @Sendable ([Stanza]) -> Void) {
        handoverObserver.withLock { $0 = body }
    }

    var handoverCallback: (@Sendable ([Stanza]) -> Void)? { handoverObserver.withLock { $0 } }
    let clientContexts = Mutex<[String: NIOSSLContext]>([:])
    let inFlight = InFlightWork()
    private let maintenance = Mutex<Task<Void, Never>?>(nil)
    /// Peer certificates (DER of the leaf) found revoked: no proof rests on them again.
    let revokedCertificates = Mutex<Set<[UInt8]>>([])
    /// OCSP answers per certificate, shared by every link that presents it.
    let revocationAnswers = RevocationAnswerCache()
    /// Connection attempts under way, awaited on shutdown so none outlives the event loops.
    let connectAttempts = Mutex<[UUID: EventLoopFuture<any Channel>]>([:])
    /// The runner of duplicate-link passes: whether it runs, and whether a new link asked
    /// for a pass since its last one.
    let duplicateChecks = Mutex<(running: Bool, requested: Bool)>((false, false))
    /// Handshakes in flight per peer server (`max_concurrent_connects`).
    let connectionSlots = ConnectionSlots()
    /// db:verify connections in flight per peer server, a pool of their own.
    let verificationSlots = ConnectionSlots()
    /// One dialback verification at a time per (link, peer domain): when it succeeds, the
    /// pairs that waited reuse its proof instead of each opening a db:verify connection.
    let dialbackGates = AsyncSlots<String>()

    struct State {
        /// Every link, negotiating or established, by id.
        var links: [String: FederationLink] = [:]
        /// The link each pair is sent on (RFC 6120 §10.1: one stream per pair at a time).
        var routes: [DomainPair: Route] = [:]
        /// Stanzas waiting for their pair, and whether it is being set up.
        var pending: [DomainPair: PendingPair] = [:]
        /// Connections being opened, by target, with the pairs waiting to see whether they
        /// can join them.
        var connecting: [ServerTarget: ConnectingTarget] = [:]
        /// Proofs that failed a moment ago, by certificate, domain and target: a burst of
        /// pairs does not re-check the same certificate on each of a provider's links.
        var unprovable: [UnprovableKey: ContinuousClock.Instant] = [:]
        /// Peer domains whose last connection attempt failed.
        var backoff: [String: Backoff] = [:]
        /// Pairs the peer refused; retried after the delay (XEP-0220 §2.5).
        var pairBackoff: [DomainPair: Backoff] = [:]
        /// Our domains a peer server (by IP address) refused on some link, until when: the
        /// peer wants a proof those links cannot give, so only a link already carrying the
        /// domain, or a connection of its own, is tried for it.
        var refusedLocals: [String: [String: ContinuousClock.Instant]] = [:]
        /// Peer servers (by IP address) that closed a link they opened when we sent
        /// `db:result` on it, until when we stop doing that on their links.
        var refusesRequestsOnItsLinks: [String: ContinuousClock.Instant] = [:]
        /// Where peer domains' servers are, for a while.
        var locations: [String: (PeerLocation, ContinuousClock.Instant)] = [:]
        /// The addresses of those servers, for as long.
        var resolvedTargets: [PeerTarget: (ResolvedTarget, ContinuousClock.Instant)] = [:]
        var shuttingDown = false
        /// Bumped whenever a pair is authorised on some link: a pair about to open a
        /// connection looks at the links again if it moved meanwhile (a cheap stand-in for
        /// comparing every link).
        var linkGeneration = 0
    }

    /// Connection attempts under way to one server, oldest first, each with the pair it is
    /// for and the pairs waiting to see whether they can join it.
    struct ConnectingTarget {
        var attempts: [ConnectionAttempt] = []
    }

    struct ConnectionAttempt {
        var id: UUID
        var pair: DomainPair
        /// It holds a connection slot: its handshake is under way (only such an attempt is
        /// worth waiting for; one still queued for a slot may take the whole set-up time).
        var started = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    /// Which connections under way a pair has already waited for (see ``connect``).
    struct WaitHistory {
        var any = false
        var remotes = false
        var locals = false
    }

    struct UnprovableKey: Hashable {
        var certificate: Int
        var domain: String
        var target: ServerTarget?
    }

    /// A pair's route: its link, and until when the outbound proof there holds (as the link
    /// said when it authorised or renewed the pair). The link has the last word, on its own
    /// event loop: a route it no longer honours (closed, withdrawn, retiring) hands its
    /// stanza back (``place(_:for:on:)``).
    struct Route {
        let link: FederationLink
        var expires: Date?

        func isValid(at time: Date) -> Bool {
            expires.map { $0 > time } ?? true
        }
    }

    struct PendingPair {
        var stanzas: [Stanza] = []
        var establishing = false
    }

    struct Backoff {
        var until: ContinuousClock.Instant
        var failures: Int
        var error: StanzaError
    }

    public init(configuration: FederationConfiguration, host: any FederationHost, locator: any PeerLocating,
                group: any EventLoopGroup, logger: Logger, metrics: FederationMetrics,
                additionalProofs: (PeerCertificateValidator) -> [any DomainProof] = { _ in [] },
                revocation: (any RevocationChecking)? = nil,
                wallClock: WallClock = .system,
                onShutdown: [@Sendable () async -> Void] = []) throws {
        self.configuration = configuration
        self.host = host
        self.locator = locator
        self.group = group
        self.logger = logger
        self.metrics = metrics
        self.revocation = revocation
        self.wallClock = wallClock
        var secret = configuration.dialbackSecret
        if secret.isEmpty {
            var generator = SystemRandomNumberGenerator()
            secret = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        }
        keysBox = Mutex(DialbackKeyGenerator(secret: secret))
        var defaultRoots = configuration.useSystemTrustStore ? PeerTrustAnchors.systemRoots() : []
        for file in configuration.trustAnchorFiles {
            defaultRoots += try PeerTrustAnchors.load(pemFile: file)
        }
        var rules: [PeerTrustRule] = []
        for (domain, settings) in configuration.peers.sorted(by: { $0.key < $1.key }) {
            guard let files = settings.trustAnchorFiles else { continue }
            let canonical = try JID(domain: domain).domainpart
            rules.append(PeerTrustRule(name: "peers.\(canonical)", domains: [canonical],
                                       roots: try files.flatMap { file throws(TrustError) in try PeerTrustAnchors.load(pemFile: file) },
                                       allowedProofs: Set(settings.allowedProofs ?? [])))
        }
        for (index, provider) in configuration.providerTrust.enumerated() {
            guard !provider.trustAnchorFiles.isEmpty else {
                throw FederationConfigurationError("s2s.provider_trust[\(index)]: trust_anchor_files is empty")
            }
            guard !provider.domains.isEmpty || !provider.targets.isEmpty else {
                throw FederationConfigurationError("s2s.provider_trust[\(index)]: neither domains nor targets")
            }
            rules.append(PeerTrustRule(name: "provider_trust[\(index)]", domains: provider.domains, targetHosts: provider.targets,
                                       roots: try provider.trustAnchorFiles.flatMap { file throws(TrustError) in try PeerTrustAnchors.load(pemFile: file) },
                                       allowedProofs: Set(provider.allowedProofs)))
        }
        // A certificate about to expire is not relied on for new links: the revalidation
        // pass would reset them before they carried anything.
        validator = PeerCertificateValidator(anchors: PeerTrustAnchors(defaultRoots: defaultRoots, rules: rules),
                                             minimumRemainingLifetime: configuration.certificateMinimumLifetimeSeconds)
        proofs = [PKIXProof(validator: validator)] + additionalProofs(validator)
        proofPolicy = DomainProofPolicy(proofs: proofs, minimumRemainingLifetime: configuration.certificateMinimumLifetimeSeconds)
        self.onShutdown = onShutdown
        resentStanzas = ResentStanzaFilter(capacity: configuration.duplicateWindow)
    }

    // MARK: Sending

    /// Sends a stanza from a local domain to a remote one, on the link authorised for its
    /// pair, or sets one up (joining an existing link where the rules allow).
    public func send(_ stanza: Stanza) async {
        // A message without an id gets one before it leaves. A link that is retired or lost
        // re-sends what the peer had not acknowledged, and the peer's re-send filter knows a
        // copy only by its id: without one, a message the peer already had was delivered
        // twice (the clean-clone CI saw it). RFC 6120 §8.1.3 leaves the id optional; one added
        // in transit changes nothing for the recipient.
        var stanza = stanza
        if stanza.kind == .message, (stanza.id ?? "").isEmpty {
            stanza = stanza.setting(attribute: "id", to: "braid-" + UUID().uuidString.lowercased())
        }
        guard let to = try? stanza.to(), let from = try? stanza.from() else {
            await host.bounce(stanza, with: StanzaError(.jidMalformed))
            return
        }
        let pair = DomainPair(local: from.domainpart, remote: to.domainpart)
        let now = ContinuousClock.now
        let wallNow = wallClock.now()
        let manager = self
        let decision: SendDecision = state.withLock { state in
            if state.shuttingDown { return .bounce(StanzaError(.remoteServerTimeout, text: "the server is shutting down")) }
            if let route = state.routes[pair] {
                if route.isValid(at: wallNow) {
                    // Handed to the link's loop under this lock, so stanzas for a pair reach
                    // its queue in the order they were sent here.
                    let link = route.link
                    link.eventLoop.execute { manager.place(stanza, for: pair, on: link) }
                    return .sent
                }
                // Lapsed: stop using it at once (RFC 6120 §13.7.2.3).
                state.routes[pair] = nil
            }
            return Self.awaitSetUp(stanza, for: pair, in: &state, now: now, queueLimit: configuration.queueLimit)
        }
        switch decision {
        case .sent:
            break
        case .bounce(let error):
            metrics.bounced.increment()
            await host.bounce(stanza, with: error)
        case .establish:
            Task { await manager.establish(pair) }
        case .queued:
            break
        }
    }

    enum SendDecision {
        case sent
        case bounce(StanzaError)
        case establish
        case queued
    }

    /// A stanza for a pair without a route: it waits for the pair to be set up (and starts
    /// that), or bounces while the pair or its domain backs off.
    private static func awaitSetUp(_ stanza: Stanza, for pair: DomainPair, in state: inout State, now: ContinuousClock.Instant, queueLimit: Int) -> SendDecision {
        var pending = state.pending[pair] ?? PendingPair()
        if !pending.establishing, let backoff = state.pairBackoff[pair] ?? state.backoff[pair.remote], backoff.until > now {
            return .bounce(backoff.error)
        }
        guard pending.stanzas.count < queueLimit else {
            return .bounce(StanzaError(.resourceConstraint, text: "too many stanzas waiting for \(pair.remote)"))
        }
        pending.stanzas.append(stanza)
        let start = !pending.establishing
        pending.establishing = true
        state.pending[pair] = pending
        return start ? .establish : .queued
    }

    /// On the link's event loop: queues a routed stanza if the link still carries its pair
    /// outbound. Otherwise (closed, withdrawn, retiring, lapsed since the route was read) the
    /// route goes and the stanza waits for the pair to be set up again, like the next ones.
    func place(_ stanza: Stanza, for pair: DomainPair, on link: FederationLink) {
        if link.isAuthorized(pair, .outbound) {
            if link.enqueue(stanza, for: pair, limit: configuration.queueLimit) {
                metrics.stanzasOut.increment()
            } else {
                bounceAll([stanza], StanzaError(.resourceConstraint, text: "too many stanzas waiting for \(pair.remote)"))
            }
            return
        }
        let now = ContinuousClock.now
        let decision = state.withLock { state -> SendDecision in
            if state.shuttingDown { return .bounce(StanzaError(.remoteServerTimeout, text: "the server is shutting down")) }
            if state.routes[pair]?.link === link { state.routes[pair] = nil }
            return Self.awaitSetUp(stanza, for: pair, in: &state, now: now, queueLimit: configuration.queueLimit)
        }
        switch decision {
        case .sent, .queued:
            break
        case .bounce(let error):
            bounceAll([stanza], error)
        case .establish:
            let manager = self
            Task { await manager.establish(pair) }
        }
    }

    /// Records a proof for a pair on a link (on a bidirectional link the reverse direction
    /// comes with it, XEP-0288 §2.2), then routes what waited for it (``authorized``). On the
    /// link's event loop.
    func authorize(_ pair: DomainPair, _ direction: PairDirection, on link: FederationLink, method: ProofMethod, expires: Date?) {
        let directions = link.authorize(pair, direction, method: method, expires: expires, alsoReverse: true)
        authorized(pair, directions, on: link, method: method)
    }

    /// After a link's table took a proof for `pair` in `directions` (its own decision, made
    /// under the same step of the link's loop as the change): metrics and, for the outbound
    /// direction, the link becomes the pair's route and what waited for it is sent, in order.
    /// On the link's event loop.
    func authorized(_ pair: DomainPair, _ directions: [PairDirection], on link: FederationLink, method: ProofMethod) {
        guard !directions.isEmpty else { return }
        state.withLock { $0.linkGeneration &+= 1 }
        for direction in directions { metrics.proof(method, direction: direction) }
        if link.isBidirectional && link.pairCount <= 2 { scheduleDuplicateLinkChecks() }
        guard directions.contains(.outbound) else { return }
        let expires = link.authorization(pair, .outbound)?.expires
        let now = wallClock.now()
        let waiting = state.withLock { state -> [Stanza] in
            // Keep a working route: a pair moves between links only when its link goes.
            if let current = state.routes[pair], current.link !== link, current.isValid(at: now) {
                return []
            }
            state.routes[pair] = Route(link: link, expires: expires)
            state.pairBackoff[pair] = nil
            guard let waiting = state.pending[pair]?.stanzas else { return [] }
            state.pending[pair]?.stanzas = []
            return waiting
        }
        // Still on the loop: stanzas that `send` hands to it from now on run after this, so
        // what waited goes first.
        for stanza in waiting { link.enqueue(stanza, for: pair) }
        if !waiting.isEmpty { metrics.stanzasOut.increment(by: Int64(waiting.count)) }
    }

    /// A renewed outbound proof on `link`: its route holds as long.
    func routeRenewed(_ pair: DomainPair, on link: FederationLink, expires: Date?) {
        state.withLock { state in
            if state.routes[pair]?.link === link { state.routes[pair]?.expires = expires }
        }
    }

    /// The pair is set up (or was given up): stanzas that arrived meanwhile are flushed by
    /// ``authorize``; anything still waiting now goes through ``send`` again.
    func establishmentFinished(_ pair: DomainPair) {
        let leftovers: [Stanza] = state.withLock { state in
            let leftovers = state.pending[pair]?.stanzas ?? []
            state.pending[pair] = nil
            return leftovers
        }
        guard !leftovers.isEmpty else { return }
        let manager = self
        Task { for stanza in leftovers { await manager.send(stanza) } }
    }

    /// Bounces what waits for one pair; with `retryAfter`, new stanzas for it bounce too
    /// until then (XEP-0220 §2.5: a later retry is fine).
    func pairFailed(_ pair: DomainPair, error: StanzaError, backoff: Bool) {
        let bounced: [Stanza] = state.withLock { state in
            if backoff {
                let failures = (state.pairBackoff[pair]?.failures ?? 0) + 1
                state.pairBackoff[pair] = Backoff(until: .now + Self.retryDelay(failures: failures, base: configuration.retryBaseSeconds), failures: failures, error: error)
            }
            let waiting = state.pending[pair]?.stanzas ?? []
            state.pending[pair] = nil
            return waiting
        }
        logger.notice("pair could not be set up", metadata: ["pair": "\(pair)", "error": "\(error)", "bounced": "\(bounced.count)"])
        bounceAll(bounced, error)
    }

    /// RFC 6120 §3.3: a random, growing delay before trying again.
    static func retryDelay(failures: Int, base: Double) -> Duration {
        let ceiling = min(60.0, base * pow(2.0, Double(max(0, failures - 1))))
        return .milliseconds(Int(Double.random(in: ceiling / 2...ceiling) * 1000))
    }

    func bounceAll(_ stanzas: [Stanza], _ error: StanzaError) {
        guard !stanzas.isEmpty else { return }
        metrics.bounced.increment(by: Int64(stanzas.count))
        let host = self.host
        Task {
            for stanza in stanzas { await host.bounce(stanza, with: error) }
        }
    }

    // MARK: Links

    func linkOpened(_ link: FederationLink) {
        state.withLock { $0.links[link.id] = link }
    }

    /// A link is gone. Its routes go with it, and whatever it still owed (queued, or sent
    /// and not acknowledged under XEP-0198) is sent again on another link. On the link's
    /// event loop.
    func linkClosed(_ link: FederationLink) {
        let (owed, refusedRequests) = link.markClosed()
        resentStanzas.linkClosed(link.id)
        if refusedRequests, let ip = link.peerIP {
            // Digest §14: a peer that closes the stream on a multiplexed db:result gets
            // one pair per connection from us on its links (ours to it are unaffected).
            logger.notice("the peer closed its link on our dialback request; not asking on its links again", metadata: ["peer": "\(link.peerAddress)"])
            state.withLock { $0.refusesRequestsOnItsLinks[ip] = .now + .seconds(3600) }
        }
        let shuttingDown = state.withLock { state -> Bool in
            state.links[link.id] = nil
            for (pair, current) in state.routes where current.link === link {
                state.routes[pair] = nil
            }
            return state.shuttingDown
        }
        guard !owed.isEmpty else { return }
        if shuttingDown {
            bounceAll(owed, StanzaError(.remoteServerTimeout, text: "the server is shutting down"))
            return
        }
        logger.info("re-sending what a closed link owed", metadata: ["link": "\(link.id.prefix(8))", "stanzas": "\(owed.count)"])
        metrics.resent.increment(by: Int64(owed.count))
        let manager = self
        Task { for stanza in owed { await manager.send(stanza) } }
    }

    /// Routes a stanza that passed the link's pair checks.
    func deliverInbound(_ stanza: Stanza, from link: FederationLink) async {
        // The link checked that `to` is hosted when the stanza arrived, but the domain may
        // be removed before it is routed: then it is answered on its link and never goes
        // back out over s2s (RFC 6120 §10.5: no relaying for others).
        guard let to = try? stanza.to(), host.isHosted(to.domainpart) else {
            metrics.bounced.increment()
            logger.info("stanza for a domain no longer hosted refused", metadata: ["to": "\(stanza.toString ?? "")", "from": "\(stanza.fromString ?? "")"])
            // Written from here (NIO takes writes from any thread); on a closed link it fails.
            if let reply = stanza.errorReply(StanzaError(.remoteServerNotFound, text: "\((try? stanza.to())?.domainpart ?? "the domain") is no longer served here")) {
                link.sendControl(reply.element)
            }
            return
        }
        metrics.stanzasIn.increment()
        await host.deliverInbound(stanza)
    }

    /// The proof policy for a remote domain.
    func requiresCertificates(_ remote: String) -> Bool {
        configuration.requiresCertificates(remote)
    }

    /// Every open link.
    var isShuttingDown: Bool { state.withLock { $0.shuttingDown } }

    /// Connects to one address, tracked so that shutdown can wait for the attempt.
    func trackedConnect(_ bootstrap: ClientBootstrap, to address: SocketAddress) async throws -> any Channel {
        let id = UUID()
        let future: EventLoopFuture<any Channel>? = state.withLock { state in
            guard !state.shuttingDown else { return nil }
            let future = bootstrap.connect(to: address)
            connectAttempts.withLock { $0[id] = future }
            return future
        }
        guard let future else { throw ShuttingDown() }
        defer { connectAttempts.withLock { _ = $0.removeValue(forKey: id) } }
        return try await future.get()
    }

    struct ShuttingDown: Error {}

    /// No address of a target accepted a connection; `last` is the last attempt's error.
    struct NoConnection: Error {
        var last: any Error
    }

    /// The one way Braid opens a server-to-server connection (links and dialback
    /// verifications alike): tries `addresses` in order, each within the connect timeout and
    /// tracked for shutdown, builds the stream on the first that accepts (`install` gets the
    /// channel and the one-shot its handler settles), and waits for that exchange, bounded by
    /// the negotiation timeout, after which `timedOut()` settles it and the connection is
    /// closed. Each connection is counted with the links. Throws ``NoConnection`` when none
    /// accepted, or what the exchange failed with.
    func connectFirst<T: Sendable>(_ addresses: [SocketAddress], target: String, tuned: Bool,
                                   install: @escaping @Sendable (any Channel, OneShot<T>) throws -> Void,
                                   timedOut: @escaping @Sendable () -> any Error) async throws -> T {
        var lastError: any Error = TargetResolutionError(reason: "\(target) has no address")
        for address in addresses {
            let outcome = OneShot<T>()
            var bootstrap = ClientBootstrap(group: group)
                .connectTimeout(.seconds(Int64(configuration.connectTimeoutSeconds)))
            if tuned {
                // Links carry many pairs: no Nagle delay, and room to queue before
                // backpressure stops the writers.
                bootstrap = bootstrap
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelOption(.writeBufferWaterMark, value: .init(low: 64 * 1024, high: 256 * 1024))
            }
            bootstrap = bootstrap.channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try install(channel, outcome) }
            }
            let channel: any Channel
            do {
                channel = try await trackedConnect(bootstrap, to: address)
            } catch {
                noteConnectFailure(error, to: target)
                lastError = error
                continue
            }
            metrics.connectionsOpened.increment()
            let seconds = configuration.negotiationTimeoutSeconds
            let timeout = Task {
                try await Task.sleep(for: .seconds(seconds))
                outcome.fail(timedOut())
                channel.close(promise: nil)
            }
            defer { timeout.cancel() }
            return try await outcome.value
        }
        throw NoConnection(last: lastError)
    }

    /// When both providers connected to each other at the same moment, each has a
    /// bidirectional link of its own to the other: one is enough. Both ends know both
    /// stream ids, so they agree without a message: the link whose stream id sorts last is
    /// closed by the side that opened it. Its pairs move to the other link (what it owed is
    /// re-sent, XEP-0198 covering what was in flight). Done only when the pairs can move
    /// without asking (their link already carries every pair of ours), or when the peer
    /// said it answers requests on its links (Braid's feature): a classic server's link
    /// may not take ours.
    func retireDuplicateLinks() async {
        /// What the pass needs of each link, read in one step of its loop.
        struct Facts: Sendable {
            var link: FederationLink
            var streamID: String
            var pairs: Set<DomainPair>
            var refusedAny: Bool
            var answersRequests: Bool
            var handlesDialbackErrors: Bool
            var localCertificate: [UInt8]?
            var peerCertificateHash: Int?
            /// The server at the other end: its address and the certificate it presents. Two
            /// providers behind one address (or loopback in tests) are not one server.
            var peerServer: String? {
                guard let ip = link.peerIP, let hash = peerCertificateHash else { return nil }
                return "\(ip)|\(hash)"
            }
        }
        let gathered = await FederationLink.onLoops(openLinks) { link -> Facts? in
            guard !link.isClosed, link.isBidirectional, let streamID = link.streamID else { return nil }
            return Facts(link: link, streamID: streamID, pairs: Set(link.authorizations.map(\.pair)), refusedAny: link.hasRefusedAny,
                         answersRequests: link.peerAnswersRequestsOnItsLinks, handlesDialbackErrors: link.handlesDialbackErrors,
                         localCertificate: link.localCertificate,
                         peerCertificateHash: link.peerCertificateHash)
        }
        let links = gathered.compactMap { $0 ?? nil }
        // Moving pairs that would need a request is safe only while the peer has refused
        // none of our domains: a peer that requires certificates per domain would refuse
        // them on its link, and the pair's own connection would be retired again, over and
        // over.
        let refusingPeers = Set(links.filter(\.refusedAny).compactMap(\.link.peerIP))
        /// Whether `ours` may close and its pairs come back on `kept`.
        func pairsCanMove(from ours: Facts, to kept: Facts, answersRequests: Bool) -> Bool {
            let peerRefused = ours.refusedAny || kept.refusedAny || [ours.link.peerIP, kept.link.peerIP].contains { $0.map(refusingPeers.contains) == true }
            // Only pairs whose local domain the kept link already carries, or whose
            // certificate that link presents: with a certificate per domain, anything else
            // would be refused there and need a connection of its own again.
            return ours.pairs.isSubset(of: kept.pairs)
                || (answersRequests && mayRequestPairs(on: kept.link) && !peerRefused
                    && ours.pairs.allSatisfy { ourPair in presentsCertificate(of: ourPair.local, presented: kept.localCertificate) || kept.pairs.contains { $0.local == ourPair.local } })
        }
        // Two links of our own to one server: two pairs for different domains of one
        // provider connected at once, before either knew the domains shared a server (seen
        // in the lab's cold start, mux:scale). The peer has nothing to retire (both are
        // incoming there), so we close the one with fewer pairs when the other can take them.
        var ownByServer: [String: [Facts]] = [:]
        for ours in links where ours.link.origin == .outgoing {
            if let server = ours.peerServer { ownByServer[server, default: []].append(ours) }
        }
        for (_, group) in ownByServer where group.count > 1 {
            let ordered = group.sorted { ($0.pairs.count, $1.link.id) > ($1.pairs.count, $0.link.id) }
            let kept = ordered[0]
            // Only towards a peer that takes further target domains on one stream (dialback
            // errors, XEP-0220 §2.6.2) and says it multiplexes (Braid's feature): a classic
            // server's one connection per domain is what it wants.
            guard kept.handlesDialbackErrors, kept.answersRequests else { continue }
            for ours in ordered.dropFirst() where pairsCanMove(from: ours, to: kept, answersRequests: true) {
                guard await ours.link.onLoop({ $0.beginRetiring() }) == true else { continue }
                logger.info("closing a second link of ours to the same server", metadata: [
                    "link": "\(ours.link.id.prefix(8))", "kept": "\(kept.link.id.prefix(8))", "peer": "\(ours.link.peerAddress)"])
                metrics.resets("duplicate-own-link")
                ours.link.closeStream()
            }
        }
        let incoming = links.filter { $0.link.origin == .incoming }
        guard !incoming.isEmpty else { return }
        // The peer's links indexed by remote domain: with a certificate per domain there are
        // thousands of links, and comparing every pair of them on every new link took the
        // whole CPU.
        var byRemote: [String: [Facts]] = [:]
        // And by the server at the other end: a simultaneous open can leave two links that
        // carry different pairs (a1→b1 ours, b2→a2 theirs), which share no remote domain.
        // The pair rules below still decide whether ours may move.
        var byPeer: [String: [Facts]] = [:]
        for theirs in incoming {
            for remote in Set(theirs.pairs.map(\.remote)) { byRemote[remote, default: []].append(theirs) }
            if let server = theirs.peerServer { byPeer[server, default: []].append(theirs) }
        }
        for ours in links where ours.link.origin == .outgoing {
            var seen = Set<String>()
            let sameServer = ours.peerServer.flatMap { byPeer[$0] } ?? []
            let candidates = (Set(ours.pairs.map(\.remote)).flatMap { byRemote[$0] ?? [] } + sameServer).filter { seen.insert($0.link.id).inserted }
            for theirs in candidates where ours.streamID > theirs.streamID {
                guard pairsCanMove(from: ours, to: theirs, answersRequests: ours.answersRequests) else { continue }
                // Retired in one step of its loop, once.
                guard await ours.link.onLoop({ $0.beginRetiring() }) == true else { break }
                logger.info("closing our link: the peer opened one to us at the same time", metadata: [
                    "link": "\(ours.link.id.prefix(8))", "kept": "\(theirs.link.id.prefix(8))", "peer": "\(ours.link.peerAddress)"])
                ours.link.closeStream()
                break
            }
        }
    }

    /// A new bidirectional link: look for a duplicate shortly after, once both links carry
    /// their first pairs (the periodic re-validation pass looks again).
    /// Whether a link presenting `presented` (its ``FederationLink/localCertificate``)
    /// presents the certificate we present for `local`.
    func presentsCertificate(of local: String, presented: [UInt8]?) -> Bool {
        guard let presented, let own = host.tls.certificateDER(for: local) else { return false }
        return presented == own
    }

    /// A burst of new links shares one runner: a first pass after 100 ms, then one every
    /// second while links keep coming, and two more after the last (a link's first pairs may
    /// take a moment to arrive).
    private func scheduleDuplicateLinkChecks() {
        let start = duplicateChecks.withLock { checks -> Bool in
            checks.requested = true
            if checks.running { return false }
            checks.running = true
            return true
        }
        guard start else { return }
        let manager = self
        Task {
            var quietPasses = 0
            // The first pass soon (a simultaneous open's second link is usually the one that
            // just got its pairs, and the duplicate should not outlive that by a second: the
            // lab counts connections while both sides send), the next ones a second apart.
            var pause = Duration.milliseconds(100)
            while quietPasses < 2 {
                try? await Task.sleep(for: pause)
                pause = .seconds(1)
                let requested = manager.duplicateChecks.withLock { checks -> Bool in
                    defer { checks.requested = false }
                    return checks.requested
                }
                quietPasses = requested ? 0 : quietPasses + 1
                await manager.retireDuplicateLinks()
            }
            let again = manager.duplicateChecks.withLock { checks -> Bool in
                checks.running = false
                return checks.requested
            }
            if again { manager.scheduleDuplicateLinkChecks() }
        }
    }

    /// Whether we may send `db:result` on `link`: always on ours; on the peer's unless its
    /// server has shown it cannot take them.
    func mayRequestPairs(on link: FederationLink) -> Bool {
        guard link.origin == .incoming, let ip = link.peerIP else { return true }
        return state.withLock { state in
            guard let until = state.refusesRequestsOnItsLinks[ip] else { return true }
            if until <= .now {
                state.refusesRequestsOnItsLinks[ip] = nil
                return true
            }
            return false
        }
    }

    /// The peer servers (IP addresses) that refused `local` on some link a while ago.
    func peersRefusing(_ local: String) -> Set<String> {
        let now = ContinuousClock.now
        return state.withLock { state in
            var refusing: Set<String> = []
            for (ip, locals) in state.refusedLocals {
                guard let until = locals[local] else { continue }
                if until > now { refusing.insert(ip) } else { state.refusedLocals[ip]?[local] = nil }
            }
            return refusing
        }
    }

    func rememberRefusal(of local: String, on link: FederationLink) {
        link.eventLoop.execute { link.recordRefusal(of: local) }
        guard let ip = link.peerIP else { return }
        let until = ContinuousClock.now + .seconds(600)
        state.withLock { $0.refusedLocals[ip, default: [:]][local] = until }
    }

    /// The links not yet gone (a link leaves as soon as its loop sees it close; whoever needs
    /// more asks the link on its loop).
    var openLinks: [FederationLink] {
        state.withLock { Array($0.links.values) }
    }

    // MARK: Hosted domains

    /// A local domain stopped being hosted: its pairs are withdrawn from every link, which
    /// stays up for the others. What the peer sees: `db:result` for the domain gets an
    /// `item-not-found` dialback error, and stanzas already in flight to it come back as
    /// `remote-server-not-found` stanza errors, not stream errors.
    public func withdraw(local domain: String) async {
        let withdrawn = await FederationLink.onLoops(openLinks) { $0.withdraw(local: domain).count }.reduce(0) { $0 + ($1 ?? 0) }
        let bounced: [Stanza] = state.withLock { state in
            for pair in state.routes.keys where pair.local == domain {
                state.routes[pair] = nil
            }
            let pairs = state.pending.keys.filter { $0.local == domain }
            return pairs.flatMap { state.pending.removeValue(forKey: $0)?.stanzas ?? [] }
        }
        logger.notice("withdrew a domain's pairs from the links", metadata: ["domain": "\(domain)", "pairs": "\(withdrawn)"])
        bounceAll(bounced, StanzaError(.remoteServerNotFound, text: "\(domain) is no longer served here"))
    }

    // MARK: Listeners and lifecycle

    /// Binds the s2s listeners (unless `listen` is false: a cluster node without the
    /// federation lease) and starts re-validating links. Returns the bound ports.
    public func start(defaultDomain: String, listen: Bool = true) async throws -> [String: Int] {
        defaultDomainBox.withLock { $0 = defaultDomain }
        let ports = listen ? try await startListening() : [:]
        startMaintenance()
        return ports
    }

    /// Binds the s2s listeners if they are not bound. In a cluster, the node that takes the
    /// federation lease calls it; the port may still be held by the node that had the lease
    /// a moment ago, so a failure here is tried again by the caller.
    @discardableResult
    public func startListening() async throws -> [String: Int] {
        let task: Task<[String: Int], any Error>? = binding.withLock { binding in
            // One bind at a time; a caller that comes while one runs waits for its ports.
            if let binding { return binding }
            guard listeners.withLock({ $0.isEmpty }), let defaultDomain = defaultDomainBox.withLock({ $0 }) else { return nil }
            let started = Task { try await self.bindListeners(defaultDomain: defaultDomain) }
            binding = started
            return started
        }
        guard let task else { return [:] }
        defer { binding.withLock { if $0 == task { $0 = nil } } }
        return try await task.value
    }

    private func bindListeners(defaultDomain: String) async throws -> [String: Int] {
        var ports: [String: Int] = [:]
        do {
            if let port = configuration.starttlsPort {
                ports["s2s_starttls"] = try await bind(port: port, directTLS: nil)
            }
            if let port = configuration.directTLSPort {
                let tls = host.tls.makeServerConfiguration(defaultDomain: defaultDomain, alpn: ["xmpp-server"], requestClientCertificate: true)
                ports["s2s_direct_tls"] = try await bind(port: port, directTLS: try NIOSSLContext(configuration: tls))
            }
        } catch {
            // All or nothing: a half-bound node would take some peers and refuse others.
            await stopListening(closingLinks: false)
            throw error
        }
        return ports
    }

    public var isListening: Bool { !listeners.withLock { $0.isEmpty } }

    /// Closes the s2s listeners and, with `closingLinks`, every link (`<system-shutdown/>`:
    /// the peer connects again, to the node that now serves federation). In a cluster, the
    /// node that loses the federation lease calls it.
    public func stopListening(closingLinks: Bool) async {
        let channels = listeners.withLock { listeners in
            defer { listeners = [] }
            return listeners
        }
        for channel in channels { try? await channel.close() }
        guard closingLinks else { return }
        let links = state.withLock { Array($0.links.values) }
        for link in links { link.close(with: StreamError(.systemShutdown)) }
    }

    private func bind(port: Int, directTLS: NIOSSLContext?) async throws -> Int {
        let manager = self
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.maxStanzaBytes)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 64 * 1024, high: 256 * 1024))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let link = FederationLink(origin: .incoming, peerAddress: channel.remoteAddress.map { "\($0)" } ?? "unknown", channel: channel, wallClock: manager.wallClock,
                                              onHandedOver: manager.handoverCallback)
                    let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.server, limits: limits)
                    let handler = IncomingLinkHandler(manager: manager, link: link, decoder: decoder, directTLS: directTLS != nil)
                    try StreamPipeline.install(on: channel, directTLS: directTLS.map { handler.makeTLSHandler(context: $0) }, decoder: decoder,
                                               contentNamespace: XMLNamespace.server, handler: handler)
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.bind(host: configuration.address, port: port).get()
        } catch {
            throw ListenerBindFailure(listener: directTLS == nil ? "s2s_starttls" : "s2s_direct_tls", host: configuration.address, port: port, underlying: error)
        }
        listeners.withLock { $0.append(channel) }
        return channel.localAddress?.port ?? port
    }

    private func startMaintenance() {
        let manager = self
        let interval = Duration.milliseconds(Int(configuration.revalidationIntervalSeconds * 1000))
        let task = Task {
            while !Task.isCancelled {
                do { try await Task.sleep(for: interval) } catch { return }
                await manager.revalidate()
            }
        }
        maintenance.withLock { $0 = task }
    }

    /// Stops listening and closes every link with `<system-shutdown/>`.
    public func shutdown() async {
        let (links, queued): ([FederationLink], [Stanza]) = state.withLock { state in
            state.shuttingDown = true
            let queued = state.pending.values.flatMap(\.stanzas)
            state.pending = [:]
            return (Array(state.links.values), queued)
        }
        maintenance.withLock { $0?.cancel() }
        for channel in listeners.withLock({ $0 }) { try? await channel.close() }
        for link in links { link.close(with: StreamError(.systemShutdown)) }
        // Each attempt ends within the connect timeout (on loopback, at once).
        for attempt in connectAttempts.withLock({ Array($0.values) }) {
            if let channel = try? await attempt.get() { try? await channel.close() }
        }
        for stanza in queued { await host.bounce(stanza, with: StanzaError(.remoteServerTimeout, text: "the server is shutting down")) }
        for release in onShutdown { await release() }
    }

    /// Every current link, for operators: each described on its own loop.
    public var links: [LinkSnapshot] {
        get async {
            await FederationLink.onLoops(state.withLock { Array($0.links.values) }) { $0.snapshot }
                .compactMap { $0 }.sorted { $0.createdAt < $1.createdAt }
        }
    }

    /// Sets the link gauges (links, pairs by method, queue depth) from the current state.
    public func recordGauges() async {
        metrics.record(links: await links, pending: pendingCount)
    }

    /// Stanzas waiting for a pair to be set up, for operators and metrics.
    public var pendingCount: Int {
        state.withLock { $0.pending.values.reduce(0) { $0 + $1.stanzas.count } }
    }
}

/// A result set once by a channel handler and awaited by a task. Unlike an
/// `EventLoopPromise` it belongs to no event loop, so it cannot leak when the loops shut
/// down first; completing it twice keeps the first result.
final class OneShot<Value: Sendable>: Sendable {
    private struct Box {
        var result: Result<Value, any Error>?
        var waiters: [CheckedContinuation<Value, any Error>] = []
    }

    private let box = Mutex(Box())

    func complete(_ result: Result<Value, any Error>) {
        let waiters = box.withLock { box -> [CheckedContinuation<Value, any Error>] in
            guard box.result == nil else { return [] }
            box.result = result
            defer { box.waiters = [] }
            return box.waiters
        }
        for waiter in waiters { waiter.resume(with: result) }
    }

    func succeed(_ value: Value) { complete(.success(value)) }
    func fail(_ error: any Error) { complete(.failure(error)) }

    var value: Value {
        get async throws {
            try await withCheckedThrowingContinuation { continuation in
                let ready = box.withLock { box -> Result<Value, any Error>? in
                    if let result = box.result { return result }
                    box.waiters.append(continuation)
                    return nil
                }
                if let ready { continuation.resume(with: ready) }
            }
        }
    }
}

extension String {
    func trimmingSuffix(_ suffix: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) : self
    }
}

/// Work that many callers may ask for at once (a location, a proof on a link) done once:
/// later callers wait for the first one's answer.
final class InFlightWork: Sendable {
    private let tasks = Mutex<[String: Task<any Sendable, Never>]>([:])

    func run<T: Sendable>(_ key: String, _ work: @escaping @Sendable () async -> T) async -> T {
        let task = tasks.withLock { tasks -> Task<any Sendable, Never> in
            if let running = tasks[key] { return running }
            let task = Task<any Sendable, Never> { await work() }
            tasks[key] = task
            return task
        }
        let value = await task.value
        tasks.withLock { tasks in
            if let current = tasks[key], current == task { tasks[key] = nil }
        }
        // The key names the work, so the value has the type the first caller gave.
        guard let typed = value as? T else { return await work() }
        return typed
    }
}

/// OCSP answers per certificate (its DER), kept until the answer's `nextUpdate`, or 24 hours
/// without one (RFC 6960 §2.4, RFC 6120 §13.7.2.3), and shared by every link that presents
/// the certificate: a provider whose fifty links present one certificate is asked once.
final class RevocationAnswerCache: Sendable {
    private struct Entry {
        var verdict: RevocationVerdict
        var until: Date
    }

    private let entries = Mutex<[[UInt8]: Entry]>([:])
    /// A bound on remembered certificates: a flood of distinct ones cannot grow memory.
    static let capacity = 10_000

    /// The answer for `certificate` while it is still current.
    func verdict(for certificate: [UInt8], at time: Date) -> RevocationVerdict? {
        entries.withLock { entries in
            guard let entry = entries[certificate] else { return nil }
            guard time < entry.until else {
                entries[certificate] = nil
                return nil
            }
            return entry.verdict
        }
    }

    func store(_ verdict: RevocationVerdict, for certificate: [UInt8], until: Date) {
        entries.withLock { entries in
            if entries.count >= Self.capacity {
                let now = Date()
                entries = entries.filter { $0.value.until > now }
                if entries.count >= Self.capacity { entries.removeAll() }
            }
            entries[certificate] = Entry(verdict: verdict, until: until)
        }
    }
}

/// Connection attempts in flight per peer server (`max_concurrent_connects`).
typealias ConnectionSlots = AsyncSlots<ServerTarget>

/// A counting semaphore per key: at most `limit` holders at a time, the rest waiting in
/// order for a slot, each no longer than its deadline.
final class AsyncSlots<Key: Hashable & Sendable>: Sendable {
    private struct Waiter {
        var id: UUID
        var continuation: CheckedContinuation<Bool, Never>
    }

    private struct Entry {
        var inUse = 0
        var waiters: [Waiter] = []
    }

    private let entries = Mutex<[Key: Entry]>([:])

    /// True once a slot is held (release it); false when the deadline passed first.
    func acquire(_ target: Key, limit: Int, until deadline: ContinuousClock.Instant) async -> Bool {
        let id = UUID()
        let granted: Bool = await withCheckedContinuation { continuation in
            let now = entries.withLock { entries -> Bool in
                var entry = entries[target] ?? Entry()
                if entry.inUse < limit {
                    entry.inUse += 1
                    entries[target] = entry
                    return true
                }
                entry.waiters.append(Waiter(id: id, continuation: continuation))
                entries[target] = entry
                return false
            }
            if now { continuation.resume(returning: true) }
            else {
                let slots = self
                Task {
                    try? await Task.sleep(until: deadline, clock: .continuous)
                    slots.giveUp(id, target: target)
                }
            }
        }
        return granted
    }

    /// Takes a slot if one is free now, without waiting.
    func tryAcquire(_ target: Key, limit: Int) -> Bool {
        entries.withLock { entries in
            var entry = entries[target] ?? Entry()
            guard entry.inUse < limit, entry.waiters.isEmpty else { return false }
            entry.inUse += 1
            entries[target] = entry
            return true
        }
    }

    func release(_ target: Key) {
        let next = entries.withLock { entries -> CheckedContinuation<Bool, Never>? in
            guard var entry = entries[target] else { return nil }
            if entry.waiters.isEmpty {
                entry.inUse -= 1
                entries[target] = entry.inUse > 0 ? entry : nil
                return nil
            }
            // The slot passes straight to the next waiter.
            let waiter = entry.waiters.removeFirst()
            entries[target] = entry
            return waiter.continuation
        }
        next?.resume(returning: true)
    }

    private func giveUp(_ id: UUID, target: Key) {
        let waiter = entries.withLock { entries -> CheckedContinuation<Bool, Never>? in
            guard var entry = entries[target], let index = entry.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            let waiter = entry.waiters.remove(at: index)
            entries[target] = entry
            return waiter.continuation
        }
        waiter?.resume(returning: false)
    }

    /// Attempts holding a slot, for tests.
    func inUse(_ target: Key) -> Int {
        entries.withLock { $0[target]?.inUse ?? 0 }
    }
}
