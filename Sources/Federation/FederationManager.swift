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
}

/// Finds a domain's servers (DNS, in production).
public protocol PeerLocating: Sendable {
    func locate(_ domain: String) async -> PeerLocation
}

/// Server-to-server federation: the links, the pairs authorised on them, and the queues of
/// stanzas waiting for a pair to be authorised (RFC 6120 §10.4, XEP-0220).
///
/// Outgoing links are keyed by the remote domain they were opened for; further local
/// domains join them as senders with dialback (XEP-0220 §2.6.1). Incoming links authorise
/// each pair the peer asserts, by certificate or by dialback verified on a separate
/// connection. Nothing is routed for a pair that is not authorised on the link it uses.
public final class FederationManager: Sendable {
    public let configuration: FederationConfiguration
    let host: any FederationHost
    let locator: any PeerLocating
    let group: any EventLoopGroup
    let logger: Logger
    let keys: DialbackKeyGenerator
    let validator: PeerCertificateValidator
    let metrics: FederationMetrics
    private let state = Mutex(State())
    private let listeners = Mutex<[any Channel]>([])
    private let clientContexts = Mutex<[String: NIOSSLContext]>([:])

    struct State {
        var outgoing: [String: Outgoing] = [:]
        var incoming: [String: FederationLink] = [:]
        var queues: [DomainPair: [Stanza]] = [:]
        /// Remote domains whose last attempt failed, with when to try again and why.
        var backoff: [String: Backoff] = [:]
        var shuttingDown = false
    }

    enum Outgoing {
        case connecting
        /// `requested`: local domains a `db:result` was sent for (or that SASL authorised).
        case established(FederationLink, requested: Set<String>)
    }

    struct Backoff {
        var until: ContinuousClock.Instant
        var failures: Int
        var error: StanzaError
    }

    public init(configuration: FederationConfiguration, host: any FederationHost, locator: any PeerLocating,
                group: any EventLoopGroup, logger: Logger, metrics: FederationMetrics) throws {
        self.configuration = configuration
        self.host = host
        self.locator = locator
        self.group = group
        self.logger = logger
        self.metrics = metrics
        var secret = configuration.dialbackSecret
        if secret.isEmpty {
            var generator = SystemRandomNumberGenerator()
            secret = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        }
        keys = DialbackKeyGenerator(secret: secret)
        var defaultRoots = configuration.useSystemTrustStore ? PeerTrustAnchors.systemRoots() : []
        for file in configuration.trustAnchorFiles {
            defaultRoots += try PeerTrustAnchors.load(pemFile: file)
        }
        var peerRoots: [String: [Certificate]] = [:]
        for (domain, settings) in configuration.peers {
            guard let files = settings.trustAnchorFiles else { continue }
            let canonical = try JID(domain: domain).domainpart
            peerRoots[canonical] = try files.flatMap { file throws(TrustError) in try PeerTrustAnchors.load(pemFile: file) }
        }
        validator = PeerCertificateValidator(anchors: PeerTrustAnchors(defaultRoots: defaultRoots, peerRoots: peerRoots))
    }

    // MARK: Sending

    /// Sends a stanza from a local domain to a remote one, setting up a link if needed.
    public func send(_ stanza: Stanza) async {
        guard let to = try? stanza.to(), let from = try? stanza.from() else {
            await host.bounce(stanza, with: StanzaError(.jidMalformed))
            return
        }
        let pair = DomainPair(local: from.domainpart, remote: to.domainpart)
        enum Decision {
            case send(FederationLink)
            case bounce(StanzaError)
            case connect
            case requestPair(FederationLink)
            case queued
        }
        let now = ContinuousClock.now
        let decision: Decision = state.withLock { state in
            if state.shuttingDown { return .bounce(StanzaError(.remoteServerTimeout, text: "the server is shutting down")) }
            if case .established(let link, _) = state.outgoing[pair.remote], link.isAuthorized(pair, .outbound) {
                return .send(link)
            }
            if let backoff = state.backoff[pair.remote], backoff.until > now, state.outgoing[pair.remote] == nil {
                return .bounce(backoff.error)
            }
            var queue = state.queues[pair] ?? []
            guard queue.count < configuration.queueLimit else {
                return .bounce(StanzaError(.resourceConstraint, text: "too many stanzas waiting for \(pair.remote)"))
            }
            queue.append(stanza)
            state.queues[pair] = queue
            switch state.outgoing[pair.remote] {
            case nil:
                state.outgoing[pair.remote] = .connecting
                return .connect
            case .connecting:
                return .queued
            case .established(let link, var requested):
                if requested.contains(pair.local) { return .queued }
                requested.insert(pair.local)
                state.outgoing[pair.remote] = .established(link, requested: requested)
                return .requestPair(link)
            }
        }
        switch decision {
        case .send(let link):
            metrics.stanzasOut.increment()
            link.send(stanza.element)
        case .bounce(let error):
            metrics.bounced.increment()
            await host.bounce(stanza, with: error)
        case .connect:
            let manager = self
            Task { await manager.connect(remote: pair.remote, firstLocal: pair.local) }
        case .requestPair(let link):
            requestPair(pair, on: link)
        case .queued:
            break
        }
    }

    /// Sends `db:result` for a further local domain on an established link (sender
    /// multiplexing, XEP-0220 §2.6.1). The key is bound to the link's stream id.
    func requestPair(_ pair: DomainPair, on link: FederationLink) {
        let manager = self
        link.channel.eventLoop.execute {
            guard let handler = try? link.channel.pipeline.syncOperations.handler(type: OutgoingLinkHandler.self) else {
                manager.pairFailed(pair, error: StanzaError(.remoteServerTimeout, text: "the link to \(pair.remote) closed"))
                return
            }
            handler.requestAdditionalPair(local: pair.local)
        }
    }

    // MARK: Outgoing links

    private func connect(remote: String, firstLocal: String) async {
        let location: PeerLocation
        if let settings = configuration.peers[remote], let staticHost = settings.host {
            location = .targets([PeerTarget(host: staticHost, port: settings.port ?? ((settings.directTLS ?? false) ? 5270 : 5269), directTLS: settings.directTLS ?? false)])
        } else {
            location = await locator.locate(remote)
        }
        guard case .targets(let targets) = location, !targets.isEmpty else {
            let reason: String
            if case .notFound(let why) = location { reason = why } else { reason = "no servers for \(remote)" }
            logger.notice("cannot locate peer", metadata: ["remote": "\(remote)", "reason": "\(reason)"])
            outgoingFailed(remote: remote, error: StanzaError(.remoteServerNotFound, text: reason))
            return
        }
        await host.prepareCertificate(for: firstLocal)
        var lastError = "no target answered"
        // RFC 6120 §3.2: try each target in order; never fall back to A/AAAA after SRV targets.
        for target in targets {
            do {
                try await open(target, local: firstLocal, remote: remote)
                return
            } catch let failure as LinkFailure {
                lastError = failure.reason
                if !failure.tryNextTarget {
                    outgoingFailed(remote: remote, error: failure.stanzaError)
                    return
                }
            } catch {
                lastError = "\(target): \(error)"
            }
            logger.info("peer target failed", metadata: ["remote": "\(remote)", "target": "\(target)", "reason": "\(lastError)"])
        }
        outgoingFailed(remote: remote, error: StanzaError(.remoteServerTimeout, text: "cannot reach \(remote): \(lastError)"))
    }

    /// A failed outgoing attempt, with what to tell the senders.
    struct LinkFailure: Error {
        var reason: String
        var stanzaError: StanzaError
        /// Connection-level failures move on to the next SRV target; authentication
        /// failures are final for the domain.
        var tryNextTarget: Bool
    }

    private func open(_ target: PeerTarget, local: String, remote: String) async throws {
        let negotiated = group.next().makePromise(of: FederationLink.self)
        let clientContext = try makeClientContext(local: local, directTLS: target.directTLS)
        let asciiRemote = (try? JID(domain: remote).asciiDomain) ?? remote
        let manager = self
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.maxStanzaBytes)
        let useExternal = host.tls.clientCredentials(for: local)?.identity.matches(domain: local, service: .xmppServer) != nil
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.seconds(Int64(configuration.connectTimeoutSeconds)))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let link = FederationLink(origin: .outgoing, peerAddress: target.description, channel: channel)
                    let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.server, limits: limits)
                    let handler = OutgoingLinkHandler(
                        manager: manager, link: link, decoder: decoder, clientContext: clientContext,
                        serverName: asciiRemote, directTLS: target.directTLS,
                        negotiation: OutgoingServerNegotiation(configuration: .init(localDomain: local, remoteDomain: remote, useExternal: useExternal)),
                        negotiated: negotiated)
                    if target.directTLS {
                        try channel.pipeline.syncOperations.addHandler(handler.makeTLSHandler())
                    }
                    try channel.pipeline.syncOperations.addHandler(decoder)
                    try channel.pipeline.syncOperations.addHandler(XMLStreamEncoder(contentNamespace: XMLNamespace.server))
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: target.host, port: target.port).get()
        } catch {
            negotiated.fail(error)
            throw LinkFailure(reason: "\(target): cannot connect (\(error))", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true)
        }
        metrics.connectionsOpened.increment()
        // The whole negotiation is bounded; the handler completes the promise either way.
        let timeout = channel.eventLoop.scheduleTask(in: .seconds(Int64(configuration.negotiationTimeoutSeconds))) {
            negotiated.fail(LinkFailure(reason: "\(target): negotiation timed out", stanzaError: StanzaError(.remoteServerTimeout, text: "negotiation with \(remote) timed out"), tryNextTarget: true))
            channel.close(promise: nil)
        }
        defer { timeout.cancel() }
        let link = try await negotiated.futureResult.get()
        outgoingEstablished(link, remote: remote, firstLocal: local)
    }

    private func makeClientContext(local: String, directTLS: Bool) throws -> NIOSSLContext {
        let key = "\(local)|\(directTLS)"
        if let cached = clientContexts.withLock({ $0[key] }) { return cached }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        // The peer's certificate is checked by our own PKIX code (RFC 6125 names, per-peer
        // anchors, serverAuth-only EKU); BoringSSL only hands the chain over.
        configuration.certificateVerification = .noHostnameVerification
        if directTLS { configuration.applicationProtocols = ["xmpp-server"] }
        if let credentials = host.tls.clientCredentials(for: local) {
            // XEP-0178 §3 step 1: present our certificate when the peer asks for one.
            configuration.certificateChain = credentials.chain.map { .certificate($0) }
            configuration.privateKey = .privateKey(credentials.key)
        }
        let context = try NIOSSLContext(configuration: configuration)
        clientContexts.withLock { $0[key] = context }
        return context
    }

    private func outgoingEstablished(_ link: FederationLink, remote: String, firstLocal: String) {
        let (flush, others): ([Stanza], [DomainPair]) = state.withLock { state in
            state.backoff[remote] = nil
            var requested: Set<String> = [firstLocal]
            let first = DomainPair(local: firstLocal, remote: remote)
            let flush = state.queues.removeValue(forKey: first) ?? []
            // Other local domains waiting for the same remote domain join as senders.
            let others = state.queues.keys.filter { $0.remote == remote && $0.local != firstLocal }
            requested.formUnion(others.map(\.local))
            state.outgoing[remote] = .established(link, requested: requested)
            return (flush, others)
        }
        logger.info("outgoing link established", metadata: ["remote": "\(remote)", "peer": "\(link.peerAddress)", "local": "\(firstLocal)"])
        metrics.linksEstablished.increment()
        for stanza in flush {
            metrics.stanzasOut.increment()
            link.send(stanza.element)
        }
        for pair in others { requestPair(pair, on: link) }
    }

    /// A further pair on an outgoing link was answered (XEP-0220 Step 4).
    func pairResult(_ pair: DomainPair, on link: FederationLink, outcome: DialbackElement.Outcome, error: StanzaError?) {
        switch outcome {
        case .valid:
            link.authorize(pair, .outbound, method: .dialback, expires: nil)
            let flush = state.withLock { $0.queues.removeValue(forKey: pair) ?? [] }
            for stanza in flush {
                metrics.stanzasOut.increment()
                link.send(stanza.element)
            }
        case .invalid:
            // XEP-0220 §2.1.1: the key was refused.
            pairFailed(pair, error: StanzaError(.internalServerError, text: "\(pair.remote) refused our dialback key for \(pair.local)"))
        case .error:
            pairFailed(pair, error: error ?? StanzaError(.remoteServerTimeout, text: "dialback error from \(pair.remote)"))
        }
    }

    /// Bounces what waits for one pair and lets it be requested again later.
    func pairFailed(_ pair: DomainPair, error: StanzaError) {
        let bounced: [Stanza] = state.withLock { state in
            if case .established(let link, var requested) = state.outgoing[pair.remote] {
                requested.remove(pair.local)
                state.outgoing[pair.remote] = .established(link, requested: requested)
            }
            return state.queues.removeValue(forKey: pair) ?? []
        }
        bounceAll(bounced, error)
    }

    /// The attempt for `remote` failed: bounce everything queued for it and back off.
    func outgoingFailed(remote: String, error: StanzaError) {
        let bounced: [Stanza] = state.withLock { state in
            state.outgoing[remote] = nil
            let failures = (state.backoff[remote]?.failures ?? 0) + 1
            // RFC 6120 §3.3: wait a random, growing delay before trying again.
            let base = min(60.0, pow(2.0, Double(failures - 1)))
            let delay = Double.random(in: base / 2...base)
            state.backoff[remote] = Backoff(until: .now + .milliseconds(Int(delay * 1000)), failures: failures, error: error)
            let pairs = state.queues.keys.filter { $0.remote == remote }
            return pairs.flatMap { state.queues.removeValue(forKey: $0) ?? [] }
        }
        metrics.linkFailures.increment()
        logger.notice("outgoing link failed", metadata: ["remote": "\(remote)", "error": "\(error)", "bounced": "\(bounced.count)"])
        bounceAll(bounced, error)
    }

    /// An outgoing link closed after it was established.
    func outgoingClosed(_ link: FederationLink, remote: String) {
        let bounced: [Stanza] = state.withLock { state in
            guard case .established(let current, _) = state.outgoing[remote], current === link else { return [] }
            state.outgoing[remote] = nil
            let pairs = state.queues.keys.filter { $0.remote == remote }
            return pairs.flatMap { state.queues.removeValue(forKey: $0) ?? [] }
        }
        bounceAll(bounced, StanzaError(.remoteServerTimeout, text: "the link to \(remote) closed"))
    }

    private func bounceAll(_ stanzas: [Stanza], _ error: StanzaError) {
        guard !stanzas.isEmpty else { return }
        metrics.bounced.increment(by: Int64(stanzas.count))
        let host = self.host
        Task {
            for stanza in stanzas { await host.bounce(stanza, with: error) }
        }
    }

    // MARK: Incoming links

    func incomingAccepted(_ link: FederationLink) {
        state.withLock { $0.incoming[link.id] = link }
        metrics.connectionsAccepted.increment()
    }

    func incomingClosed(_ link: FederationLink) {
        state.withLock { _ = $0.incoming.removeValue(forKey: link.id) }
    }

    /// Routes a stanza that passed the link's pair checks.
    func deliverInbound(_ stanza: Stanza) async {
        metrics.stanzasIn.increment()
        await host.deliverInbound(stanza)
    }

    /// The proof policy for a remote domain.
    func requiresCertificates(_ remote: String) -> Bool {
        configuration.requiresCertificates(remote)
    }

    // MARK: Listeners and lifecycle

    /// Binds the s2s listeners. Returns the bound ports by kind.
    public func start(defaultDomain: String) async throws -> [String: Int] {
        var ports: [String: Int] = [:]
        if let port = configuration.starttlsPort {
            ports["s2s_starttls"] = try await bind(port: port, directTLS: nil)
        }
        if let port = configuration.directTLSPort {
            let tls = host.tls.makeServerConfiguration(defaultDomain: defaultDomain, alpn: ["xmpp-server"], requestClientCertificate: true)
            ports["s2s_direct_tls"] = try await bind(port: port, directTLS: try NIOSSLContext(configuration: tls))
        }
        return ports
    }

    private func bind(port: Int, directTLS: NIOSSLContext?) async throws -> Int {
        let manager = self
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.maxStanzaBytes)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let link = FederationLink(origin: .incoming, peerAddress: channel.remoteAddress.map { "\($0)" } ?? "unknown", channel: channel)
                    let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.server, limits: limits)
                    let handler = IncomingLinkHandler(manager: manager, link: link, decoder: decoder, directTLS: directTLS != nil)
                    if let directTLS {
                        try channel.pipeline.syncOperations.addHandler(handler.makeTLSHandler(context: directTLS))
                    }
                    try channel.pipeline.syncOperations.addHandler(decoder)
                    try channel.pipeline.syncOperations.addHandler(XMLStreamEncoder(contentNamespace: XMLNamespace.server))
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .bind(host: configuration.address, port: port)
            .get()
        listeners.withLock { $0.append(channel) }
        return channel.localAddress?.port ?? port
    }

    /// Stops listening and closes every link with `<system-shutdown/>`.
    public func shutdown() async {
        let (links, queued): ([FederationLink], [Stanza]) = state.withLock { state in
            state.shuttingDown = true
            var links = Array(state.incoming.values)
            for case .established(let link, _) in state.outgoing.values { links.append(link) }
            let queued = state.queues.values.flatMap { $0 }
            state.queues = [:]
            return (links, queued)
        }
        for channel in listeners.withLock({ $0 }) { try? await channel.close() }
        for link in links { link.close(with: StreamError(.systemShutdown)) }
        for stanza in queued { await host.bounce(stanza, with: StanzaError(.remoteServerTimeout, text: "the server is shutting down")) }
    }

    /// Every current link, for operators.
    public var links: [LinkSnapshot] {
        state.withLock { state in
            var links = state.incoming.values.map(\.snapshot)
            for case .established(let link, _) in state.outgoing.values { links.append(link.snapshot) }
            return links.sorted { $0.createdAt < $1.createdAt }
        }
    }
}
