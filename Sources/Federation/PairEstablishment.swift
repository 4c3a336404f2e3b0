import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Trust
import XMPPCore
import XMPPStream

/// Setting up a pair for sending: join an existing link where the rules allow, else open a
/// new connection (the fallback matrix of digest §14).
extension FederationManager {
    /// Sets up `pair` and flushes what waits for it, or bounces it with the reason.
    func establish(_ pair: DomainPair) async {
        defer { establishmentFinished(pair) }
        var refusedBy: Set<String> = []
        // Bounded: each round either finishes or learns something (a link refused, a
        // connection attempt ended) before it tries again.
        for _ in 0..<12 {
            // Links that could be joined now; a connection is opened only if none appears
            // between this look and taking the connection slot (see connect).
            let considered = joinableLinkIDs()
            if let link = routedLink(for: pair) {
                authorize(pair, .outbound, on: link, method: link.authorization(pair, .outbound)?.method ?? .dialback, expires: link.authorization(pair, .outbound)?.expires)
                return
            }
            if configuration.multiplex, let (link, proof) = await linkToJoin(for: pair, excluding: refusedBy) {
                switch await requestPair(pair, on: link, method: proof.method, expires: proof.expires) {
                case .valid:
                    authorize(pair, .outbound, on: link, method: proof.method, expires: proof.expires, appliedByAnswer: true)
                    metrics.connectionsSaved.increment()
                    logger.debug("pair joined an existing link", metadata: ["pair": "\(pair)", "link": "\(link.id.prefix(8))", "proof": "\(proof.method.rawValue)"])
                    return
                case .invalid:
                    // XEP-0220 §2.1.1: our key was refused.
                    pairFailed(pair, error: StanzaError(.internalServerError, text: "\(pair.remote) refused our dialback key for \(pair.local)"), backoff: true)
                    return
                case .error(let error) where error.condition == .resourceConstraint:
                    // §2.5: "use another connection for this pair".
                    refusedBy.insert(link.id)
                    continue
                case .error(let error):
                    // A failed addition leaves the link and its pairs alone; the pair may be
                    // tried again after a delay.
                    pairFailed(pair, error: StanzaError(error.condition == .undefinedCondition ? .remoteServerTimeout : error.condition,
                                                        text: "\(pair.remote) refused \(pair.local): \(error.text ?? error.condition.rawValue)"), backoff: true)
                    return
                case .closed:
                    continue
                }
            }
            switch await connect(pair, considered: considered) {
            case .established:
                return
            case .retry:
                continue
            case .failed:
                return
            }
        }
        pairFailed(pair, error: StanzaError(.remoteServerTimeout, text: "could not set up \(pair)"), backoff: false)
    }

    /// A link the pair is already authorised on (for example, the reverse of a pair the
    /// peer asserted on a bidirectional link).
    private func joinableLinkIDs() -> Set<String> {
        Set(openLinks.filter { $0.canRequestPairs && $0.streamID != nil && $0.isEstablished && mayRequestPairs(on: $0) }.map(\.id))
    }

    private func routedLink(for pair: DomainPair) -> FederationLink? {
        openLinks.first { $0.isAuthorized(pair, .outbound) }
    }

    /// An established link the pair may join, with the proof of the peer domain on it.
    ///
    /// - Sender multiplexing: the peer domain is already a target on the link (XEP-0220
    ///   §2.6.1, no negotiation needed).
    /// - With XEP-0288, a domain the peer used as a source may be targeted (§2.2).
    /// - Target multiplexing: the peer advertised dialback errors, the domain's servers
    ///   include the host and port connected to, and the peer is proven for the domain on
    ///   this connection by its certificate, DANE or POSH (RFC 7712 §4.4.2). On a link the
    ///   peer opened to us, the proof alone identifies it.
    func linkToJoin(for pair: DomainPair, excluding refused: Set<String>) async -> (FederationLink, (method: ProofMethod, expires: Date?))? {
        let candidates = openLinks
            .filter { $0.canRequestPairs && $0.streamID != nil && !refused.contains($0.id) && $0.isEstablished && mayRequestPairs(on: $0) }
            .sorted { ($0.origin == .outgoing ? 0 : 1, -$0.pairCount) < ($1.origin == .outgoing ? 0 : 1, -$1.pairCount) }
        for link in candidates {
            if link.hasValidPair(remote: pair.remote, .outbound) || (link.isBidirectional && link.hasValidPair(remote: pair.remote, .inbound)) {
                let proof = link.proof(of: pair.remote) ?? (method: ProofMethod.dialback, expires: nil)
                return (link, proof)
            }
        }
        // A new target: its DNS must answer (a bogus or absent domain is never sent to, not
        // even over a link whose peer could prove it).
        guard case .targets(let targets) = await locate(pair.remote) else { return nil }
        for link in candidates where link.handlesDialbackErrors {
            if link.origin == .outgoing {
                guard let target = link.peerTarget, targets.contains(where: { $0.serverTarget == target }) else { continue }
            }
            if case .proven(let method, let expires) = await proveRemote(pair.remote, on: link) {
                return (link, (method, expires))
            }
        }
        return nil
    }

    /// Sends `db:result` for `pair` on `link`, with a key bound to the link's stream id, and
    /// waits for the answer (bounded by the negotiation timeout).
    func requestPair(_ pair: DomainPair, on link: FederationLink, method: ProofMethod, expires: Date?) async -> FederationLink.PairRequestOutcome {
        guard let streamID = link.streamID else { return .closed }
        await host.prepareCertificate(for: pair.local)
        let key = keys.key(receiving: pair.remote, originating: pair.local, streamID: streamID)
        let timeout = Int64(configuration.negotiationTimeoutSeconds)
        return await withCheckedContinuation { continuation in
            guard link.awaitAnswer(for: pair, method: method, expires: expires, continuation: continuation) else { return }
            link.beginAssertionTrial()
            link.sendControl(DialbackElement(kind: .result, from: pair.local, to: pair.remote, key: key).element)
            link.channel.eventLoop.scheduleTask(in: .seconds(timeout)) {
                _ = link.answer(pair, .error(StanzaError(.remoteServerTimeout, text: "no answer from \(pair.remote) for \(pair.local)")), fromPeer: false)
            }
        }
    }

    // MARK: Locating peers

    /// Where `domain`'s servers are: a static override, else DNS, remembered for a while
    /// and looked up once however many pairs ask at the same time.
    func locate(_ domain: String) async -> PeerLocation {
        if let settings = configuration.peers[domain], let staticHost = settings.host {
            let directTLS = settings.directTLS ?? false
            return .targets([PeerTarget(host: staticHost, port: settings.port ?? (directTLS ? 5270 : 5269), directTLS: directTLS)])
        }
        let now = ContinuousClock.now
        if let (location, until) = state.withLock({ $0.locations[domain] }), until > now {
            return location
        }
        let locator = self.locator
        let location = await inFlight.run("locate|\(domain)") { await locator.locate(domain) }
        if case .targets = location {
            let until = ContinuousClock.now + .seconds(configuration.locationCacheSeconds)
            state.withLock { $0.locations[domain] = (location, until) }
        }
        return location
    }

    // MARK: New connections

    enum ConnectOutcome {
        case established
        /// Another connection to the same server finished: see whether the pair can join it.
        case retry
        case failed
    }

    /// Opens a new link for `pair` (its first pair), trying each SRV target in order (RFC
    /// 6120 §3.2; never A/AAAA after SRV targets failed). Only one connection per target is
    /// opened at a time: other pairs for the same server wait for it and then try to join.
    ///
    /// `considered`: the joinable links the caller already looked at. If another link became
    /// joinable since (its connection finished just before we got here), the caller looks
    /// again instead of opening a second connection to the same provider.
    private func connect(_ pair: DomainPair, considered: Set<String>) async -> ConnectOutcome {
        let now = ContinuousClock.now
        if let backoff = state.withLock({ $0.backoff[pair.remote] }), backoff.until > now {
            pairFailed(pair, error: backoff.error, backoff: false)
            return .failed
        }
        let location = await locate(pair.remote)
        guard case .targets(let targets) = location, let first = targets.first else {
            let reason: String
            if case .notFound(let why) = location { reason = why } else { reason = "no servers for \(pair.remote)" }
            logger.notice("cannot locate peer", metadata: ["remote": "\(pair.remote)", "reason": "\(reason)"])
            outgoingFailed(pair, error: StanzaError(.remoteServerNotFound, text: reason))
            return .failed
        }
        let key = first.serverTarget
        // A connection under way to any of the domain's servers may turn out to be the
        // provider's one link: wait for it rather than open another in parallel.
        let busyWith = state.withLock { state -> ServerTarget? in
            if let busy = targets.first(where: { state.connecting[$0.serverTarget] != nil }) { return busy.serverTarget }
            state.connecting[key] = []
            return nil
        }
        if let busyWith {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let queued = state.withLock { state -> Bool in
                    guard state.connecting[busyWith] != nil else { return false }
                    state.connecting[busyWith]?.append(continuation)
                    return true
                }
                if !queued { continuation.resume() }
            }
            return .retry
        }
        defer {
            let waiters = state.withLock { $0.connecting.removeValue(forKey: key) ?? [] }
            for waiter in waiters { waiter.resume() }
        }
        if !joinableLinkIDs().subtracting(considered).isEmpty {
            return .retry
        }
        await host.prepareCertificate(for: pair.local)
        var lastError = "no target answered"
        // Whether any target could be resolved: if none could, the domain is unreachable
        // for DNS reasons, which senders see as remote-server-not-found (RFC 6120 §10.4.3).
        var anyResolved = false
        for target in targets {
            do {
                let link = try await open(target, pair: pair)
                state.withLock { $0.backoff[pair.remote] = nil }
                logger.info("outgoing link established", metadata: ["remote": "\(pair.remote)", "peer": "\(link.peerAddress)", "local": "\(pair.local)"])
                metrics.linksEstablished.increment()
                return .established
            } catch let failure as LinkFailure {
                lastError = failure.reason
                if failure.stanzaError.condition != .remoteServerNotFound { anyResolved = true }
                if !failure.tryNextTarget {
                    outgoingFailed(pair, error: failure.stanzaError)
                    return .failed
                }
            } catch {
                lastError = "\(target): \(error)"
            }
            logger.info("peer target failed", metadata: ["remote": "\(pair.remote)", "target": "\(target)", "reason": "\(lastError)"])
        }
        outgoingFailed(pair, error: StanzaError(anyResolved ? .remoteServerTimeout : .remoteServerNotFound, text: "cannot reach \(pair.remote): \(lastError)"))
        return .failed
    }

    /// A failed outgoing attempt, with what to tell the senders.
    struct LinkFailure: Error {
        var reason: String
        var stanzaError: StanzaError
        /// Connection-level failures move on to the next SRV target; authentication
        /// failures are final for the domain.
        var tryNextTarget: Bool
    }

    /// The connection for `pair` failed: bounce what waits for it and back off the domain.
    private func outgoingFailed(_ pair: DomainPair, error: StanzaError) {
        state.withLock { state in
            let failures = (state.backoff[pair.remote]?.failures ?? 0) + 1
            state.backoff[pair.remote] = Backoff(until: .now + Self.retryDelay(failures: failures, base: configuration.retryBaseSeconds), failures: failures, error: error)
        }
        metrics.linkFailures.increment()
        pairFailed(pair, error: error, backoff: false)
    }

    /// Connects to one target (its addresses in order, resolved by the validating resolver,
    /// never the system's) and negotiates the first pair; returns the link once the pair is
    /// authorised and its waiting stanzas flushed.
    private func open(_ target: PeerTarget, pair: DomainPair) async throws -> FederationLink {
        let resolved: ResolvedTarget
        do {
            resolved = try await locator.resolve(target)
        } catch {
            throw LinkFailure(reason: "\(target): \(error.reason)", stanzaError: StanzaError(.remoteServerNotFound, text: error.reason), tryNextTarget: true)
        }
        let clientContext = try makeClientContext(local: pair.local, directTLS: target.directTLS)
        let asciiRemote = (try? JID(domain: pair.remote).asciiDomain) ?? pair.remote
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.maxStanzaBytes)
        let useExternal = host.tls.clientCredentials(for: pair.local)?.identity.matches(domain: pair.local, service: .xmppServer) != nil
        let negotiation = OutgoingServerNegotiation(configuration: .init(localDomain: pair.local, remoteDomain: pair.remote, useExternal: useExternal,
                                                                        requestBidi: configuration.bidi))
        var lastError: any Error = TargetResolutionError(reason: "\(target.host) has no address")
        for address in resolved.addresses {
            let negotiated = OneShot<FederationLink>()
            let manager = self
            let bootstrap = ClientBootstrap(group: group)
                .connectTimeout(.seconds(Int64(configuration.connectTimeoutSeconds)))
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelOption(.writeBufferWaterMark, value: .init(low: 64 * 1024, high: 256 * 1024))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let link = FederationLink(origin: .outgoing, peerAddress: target.description, peerTarget: target.serverTarget, channel: channel)
                        let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.server, limits: limits)
                        let handler = OutgoingLinkHandler(
                            manager: manager, link: link, decoder: decoder, clientContext: clientContext,
                            serverName: asciiRemote, directTLS: target.directTLS, negotiation: negotiation, negotiated: negotiated)
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
                channel = try await trackedConnect(bootstrap, to: address)
            } catch {
                lastError = error
                continue
            }
            metrics.connectionsOpened.increment()
            // The whole negotiation is bounded; the handler completes the result either way.
            let seconds = configuration.negotiationTimeoutSeconds
            let timeout = Task {
                try await Task.sleep(for: .seconds(seconds))
                negotiated.fail(LinkFailure(reason: "\(target): negotiation timed out", stanzaError: StanzaError(.remoteServerTimeout, text: "negotiation with \(pair.remote) timed out"), tryNextTarget: true))
                channel.close(promise: nil)
            }
            defer { timeout.cancel() }
            return try await negotiated.value
        }
        throw LinkFailure(reason: "\(target): cannot connect (\(lastError))", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true)
    }

    func makeClientContext(local: String, directTLS: Bool) throws -> NIOSSLContext {
        // Keyed by the certificate too: after a reload (SIGHUP) new links present the new one.
        var hasher = Hasher()
        hasher.combine(host.tls.certificateDER(for: local))
        let key = "\(local)|\(directTLS)|\(hasher.finalize())"
        if let cached = clientContexts.withLock({ $0[key] }) { return cached }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        // The peer's certificate is checked by our own code (RFC 6125 names, per-peer
        // anchors, serverAuth-only EKU, DANE, POSH); BoringSSL only hands the chain over.
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
}
