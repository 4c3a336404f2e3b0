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
    ///
    /// Bounded by time (`pair_setup_timeout_seconds`), not by a count of attempts: a burst of
    /// new pairs to one provider that needs as many connections gets them. A refusal on a
    /// shared link is an answer about that link: the pair then gets a connection of its own,
    /// presenting its local domain's own certificate, as a classic server would; only if that
    /// fails too is it bounced, with the precise condition.
    func establish(_ pair: DomainPair) async {
        defer { establishmentFinished(pair) }
        let budget = Duration.seconds(configuration.pairSetupTimeoutSeconds)
        let deadline = ContinuousClock.now + budget
        // Links that refused this pair or closed under its request.
        var excluded: Set<String> = []
        var waited = WaitHistory()
        var lookedAgain = 0
        while ContinuousClock.now < deadline {
            if isShuttingDown {
                pairFailed(pair, error: StanzaError(.remoteServerTimeout, text: "the server is shutting down"), backoff: false)
                return
            }
            // Links that could be joined now; a connection is opened only if none appears
            // between this look and taking the connection slot (see connect).
            let considered = state.withLock { $0.linkGeneration }
            if await adoptRoutedLink(for: pair) {
                // Authorised already (the reverse of a pair the peer asserted on a bidi link):
                // only the route and what waited remained.
                return
            }
            if configuration.multiplex, let (link, proof) = await linkToJoin(for: pair, excluding: excluded) {
                let outcome = await requestPair(pair, on: link, method: proof.method, expires: proof.expires)
                var presentsOwnCertificate = false
                if case .error(let error) = outcome, error.condition == .notAuthorized {
                    let presented = await link.onLoop { $0.localCertificate } ?? nil
                    presentsOwnCertificate = presentsCertificate(of: pair.local, presented: presented)
                }
                switch outcome {
                case .valid:
                    // The link authorised the pair and routed it when the answer arrived
                    // (LinkSession, before the peer's next element was read).
                    metrics.connectionsSaved.increment()
                    logger.debug("pair joined an existing link", metadata: ["pair": "\(pair)", "link": "\(link.id.prefix(8))", "proof": "\(proof.method.rawValue)"])
                    return
                case .error(let error) where error.condition == .notAuthorized && presentsOwnCertificate:
                    // The peer found no proof of our domain in the certificate this link
                    // presents, which is the one a connection of its own would present too:
                    // the answer is about the domain, and final (a POSH document listing
                    // other certificates, say). The link and its pairs stay up (XEP-0220 §2.5).
                    pairFailed(pair, error: StanzaError(.notAuthorized, text: "\(pair.remote) refused \(pair.local): \(error.text ?? error.condition.rawValue)"), backoff: true)
                    return
                case .invalid, .error:
                    // XEP-0220 §2.4 and §2.5: the link and its pairs stay up; this local
                    // domain is not asked for on it again. A connection of its own proves the
                    // pair afresh (its certificate, or dialback on its own stream).
                    rememberRefusal(of: pair.local, on: link)
                    excluded.insert(link.id)
                    let reason: String
                    if case .error(let error) = outcome { reason = error.text ?? error.condition.rawValue } else { reason = "our dialback key was refused" }
                    logger.info("the peer refused the pair on a shared link; giving it a connection of its own",
                                metadata: ["pair": "\(pair)", "link": "\(link.id.prefix(8))", "reason": "\(reason)"])
                    metrics.pairFallbacks.increment()
                    continue
                case .closed:
                    excluded.insert(link.id)
                    continue
                }
            }
            let outcome = await connect(pair, considered: considered, waited: &waited, lookAgain: lookedAgain < 3, deadline: deadline)
            switch outcome {
            case .established:
                return
            case .waited:
                break
            case .retry:
                lookedAgain += 1
            case .failed:
                return
            }
        }
        pairFailed(pair, error: StanzaError(.remoteServerTimeout, text: "could not set up \(pair) within \(configuration.pairSetupTimeoutSeconds) s"), backoff: false)
    }

    /// When the pair is authorised already on the link its route names (for example, the
    /// reverse of a pair the peer asserted on a bidirectional link): the route table says,
    /// without a scan, and the link confirms on its loop, where what waited is flushed.
    private func adoptRoutedLink(for pair: DomainPair) async -> Bool {
        guard let link = state.withLock({ $0.routes[pair]?.link }) else { return false }
        let manager = self
        return await link.onLoop { link -> Bool in
            guard link.isAuthorized(pair, .outbound), let authorization = link.authorization(pair, .outbound) else { return false }
            manager.authorized(pair, [.outbound], on: link, method: authorization.method)
            return true
        } ?? false
    }

    /// What ``PairPlacement`` needs to know about `link` for `pair` (`facts`, read on its
    /// loop), without proving anything. `refusingPeers`: the peer servers (IP addresses) that
    /// refused the local domain on some link lately.
    func placementCandidate(_ link: FederationLink, facts: FederationLink.PlacementFacts, targets: [PeerTarget]?, refusingPeers: Set<String>) -> PairPlacement.Candidate {
        let reaches: Bool
        if link.origin == .outgoing {
            reaches = link.peerTarget.map { target in targets?.contains { $0.serverTarget == target } ?? false } ?? false
        } else {
            reaches = targets != nil
        }
        let refusedByPeer = !refusingPeers.isEmpty && link.peerIP.map(refusingPeers.contains) == true
        return PairPlacement.Candidate(
            id: link.id, outgoing: link.origin == .outgoing, bidirectional: facts.bidirectional, usable: facts.usable,
            peerSpeaksDialback: facts.peerSpeaksDialback, mayRequest: link.origin == .outgoing || mayRequestPairs(on: link),
            handlesDialbackErrors: facts.handlesDialbackErrors, carriesRemote: facts.carriesRemote, reachesRemote: reaches,
            // A refusal elsewhere by the same peer counts too, except on a link that already
            // carries the local domain (its own certificate is presented there).
            refusedLocal: facts.refusedLocal || (refusedByPeer && !facts.carriesLocal),
            remoteProof: facts.remoteProof, pairCount: facts.pairCount)
    }

    /// An established link the pair may join, with the proof of the peer domain on it
    /// (``PairPlacement`` has the rules). The remote domain is proven only on links that
    /// pass every other test, and a proof that failed on a certificate is not tried again
    /// on another link presenting the same one for a few seconds.
    func linkToJoin(for pair: DomainPair, excluding excluded: Set<String>) async -> (FederationLink, (method: ProofMethod, expires: Date?))? {
        let now = wallClock.now()
        // Every link's facts for this pair, read on the links' loops (one hop per loop).
        let read = openLinks.filter { !excluded.contains($0.id) }
        let readFacts = await FederationLink.onLoops(read) { $0.placementFacts(for: pair, at: now) }
        let links = zip(read, readFacts).compactMap { link, facts in facts.map { (link, $0) } }
        guard !links.isEmpty else { return nil }
        let refusingPeers = peersRefusing(pair.local)
        var candidates = links.map { placementCandidate($0.0, facts: $0.1, targets: nil, refusingPeers: refusingPeers) }
        // Sender multiplexing needs no DNS; a new target does (a bogus or absent domain is
        // never sent to, not even over a link whose peer could prove it).
        if case .join(let id, .senderMultiplexing) = PairPlacement.decide(candidates), let link = links.first(where: { $0.0.id == id })?.0 {
            let remote = pair.remote
            guard let proof = await link.onLoop({ $0.proof(of: remote) ?? $0.carriedProof(of: remote) }) else { return nil }
            return (link, proof)
        }
        guard case .targets(let targets) = await locate(pair.remote) else { return nil }
        candidates = links.map { placementCandidate($0.0, facts: $0.1, targets: targets, refusingPeers: refusingPeers) }
        for (index, (link, facts)) in links.enumerated() where PairPlacement.needsRemoteProof(candidates[index]) && candidates[index].remoteProof == nil {
            guard !isKnownUnprovable(pair.remote, certificate: facts.peerCertificateHash, on: link) else { continue }
            switch await proveRemote(pair.remote, on: link) {
            case .proven(let method, _):
                candidates[index].remoteProof = method
            case .refuted, .notApplicable:
                rememberUnprovable(pair.remote, certificate: facts.peerCertificateHash, on: link)
            }
            // One proven link is enough: the rest would only be ranked below it.
            if candidates[index].remoteProof != nil { break }
        }
        guard case .join(let id, let via) = PairPlacement.decide(candidates), let link = links.first(where: { $0.0.id == id })?.0 else { return nil }
        let remote = pair.remote
        let proofs = await link.onLoop { ($0.proof(of: remote), $0.carriedProof(of: remote)) }
        guard let (proof, carried) = proofs else { return nil }
        if let proof { return (link, proof) }
        return via == .senderMultiplexing ? (link, carried) : nil
    }

    /// A proof of `domain` failed on this link's certificate at this target a moment ago.
    private func isKnownUnprovable(_ domain: String, certificate: Int?, on link: FederationLink) -> Bool {
        guard let key = unprovableKey(domain, certificate: certificate, on: link) else { return false }
        let now = ContinuousClock.now
        return state.withLock { state in
            guard let until = state.unprovable[key] else { return false }
            if until <= now {
                state.unprovable[key] = nil
                return false
            }
            return true
        }
    }

    private func rememberUnprovable(_ domain: String, certificate: Int?, on link: FederationLink) {
        guard let key = unprovableKey(domain, certificate: certificate, on: link) else { return }
        // Short: a POSH document or TLSA record published meanwhile is seen soon.
        let until = ContinuousClock.now + .seconds(5)
        state.withLock { state in
            if state.unprovable.count > 100_000 { state.unprovable = [:] }
            state.unprovable[key] = until
        }
    }

    private func unprovableKey(_ domain: String, certificate: Int?, on link: FederationLink) -> UnprovableKey? {
        guard let certificate else { return nil }
        return UnprovableKey(certificate: certificate, domain: domain, target: link.peerTarget)
    }

    /// Sends `db:result` for `pair` on `link`, with a key bound to the link's stream id, and
    /// waits for the answer (bounded by the negotiation timeout).
    func requestPair(_ pair: DomainPair, on link: FederationLink, method: ProofMethod, expires: Date?) async -> FederationLink.PairRequestOutcome {
        guard let streamID = await link.onLoop({ $0.streamID }) ?? nil else { return .closed }
        await host.prepareCertificate(for: pair.local)
        let key = keys.key(receiving: pair.remote, originating: pair.local, streamID: streamID)
        let timeout = Int64(configuration.negotiationTimeoutSeconds)
        return await withCheckedContinuation { continuation in
            // Registered, marked and sent in one step of the link's loop: the answer is
            // read on the same loop, after it.
            link.eventLoop.execute {
                guard link.awaitAnswer(for: pair, method: method, expires: expires, continuation: continuation) else { return }
                link.beginAssertionTrial()
                link.sendControl(DialbackElement(kind: .result, from: pair.local, to: pair.remote, key: key).element)
                link.eventLoop.scheduleTask(in: .seconds(timeout)) {
                    let timedOut = FederationLink.PairRequestOutcome.error(StanzaError(.remoteServerTimeout, text: "no answer from \(pair.remote) for \(pair.local)"))
                    if let effects = link.answer(pair, timedOut, fromPeer: false) { link.resume(effects, with: timedOut) }
                }
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

    /// A target's addresses, remembered as long as the domain's location is, and looked up
    /// once however many connections to it are being opened at the same time (a burst of
    /// pairs that each need a connection asked DNS the same question hundreds of times).
    func resolveTarget(_ target: PeerTarget) async throws(TargetResolutionError) -> ResolvedTarget {
        let now = ContinuousClock.now
        if let (resolved, until) = state.withLock({ $0.resolvedTargets[target] }), until > now {
            return resolved
        }
        let locator = self.locator
        let result: Result<ResolvedTarget, TargetResolutionError> = await inFlight.run("resolve|\(target.host)|\(target.port)|\(target.directTLS)") {
            do throws(TargetResolutionError) {
                return .success(try await locator.resolve(target))
            } catch {
                return .failure(error)
            }
        }
        let resolved = try result.get()
        let until = ContinuousClock.now + .seconds(configuration.locationCacheSeconds)
        state.withLock { $0.resolvedTargets[target] = (resolved, until) }
        return resolved
    }

    // MARK: New connections

    enum ConnectOutcome {
        case established
        /// Another connection to the same server finished: see whether the pair can join it.
        case waited
        /// A link became joinable meanwhile: look again before opening another.
        case retry
        case failed
    }

    /// Opens a new link for `pair` (its first pair), trying each SRV target in order (RFC
    /// 6120 §3.2; never A/AAAA after SRV targets failed).
    ///
    /// Waiting (`waited` records what the pair already waited for): a connection under
    /// way to the same servers may turn out to be the provider's one link, so the first time
    /// round the pair waits for the oldest one rather than open another in parallel. After
    /// that it waits once more for a connection under way for the same remote domain (it
    /// may join it by sender multiplexing, unless the peer has been refusing our domains for
    /// lack of proof) and once for one of the same local domain (presenting that domain's
    /// certificate, it may take further targets the peer's certificate names); then it
    /// opens its own. At most `max_concurrent_connects` handshakes run per server; the rest
    /// queue for a slot.
    ///
    /// `considered`: the link generation the caller looked at. If pairs were authorised since
    /// (a connection finished just before we got here), the caller looks again instead of
    /// opening a second connection to the same provider.
    private func connect(_ pair: DomainPair, considered: Int, waited: inout WaitHistory, lookAgain: Bool, deadline: ContinuousClock.Instant) async -> ConnectOutcome {
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
        let serverTargets = Set(targets.map(\.serverTarget))
        if lookAgain && state.withLock({ $0.linkGeneration }) != considered {
            return .retry
        }
        // Only worth waiting for a connection of the same local domain when the peer's
        // certificates name several of its domains: a certificate per domain never takes a
        // further target. One pass over the links for both facts.
        let (refusesUnproven, singleNameCertificates) = await peerFacts(at: serverTargets)
        let attempt = UUID()
        let slotLimit = max(1, configuration.maxConcurrentConnects)
        // What to wait for is chosen, or our own attempt registered, under one lock: two
        // pairs of the same domain cannot both decide to connect.
        var history = waited
        let awaited: UUID? = state.withLock { state in
            let underWay = serverTargets.flatMap { state.connecting[$0]?.attempts ?? [] }.filter(\.started)
            var awaited: UUID?
            if !history.any, let oldest = underWay.first {
                history.any = true
                awaited = oldest.id
            }
            if awaited == nil, !history.remotes, let same = underWay.first(where: { $0.pair.remote == pair.remote && $0.pair.local != pair.local }) {
                history.remotes = true
                if !refusesUnproven { awaited = same.id }
            }
            if awaited == nil, !history.locals, let same = underWay.first(where: { $0.pair.local == pair.local && $0.pair.remote != pair.remote }) {
                history.locals = true
                if !singleNameCertificates { awaited = same.id }
            }
            if awaited == nil {
                // A free slot is taken at once, so that pairs arriving next see a handshake
                // under way and wait for it.
                let started = connectionSlots.tryAcquire(key, limit: slotLimit)
                state.connecting[key, default: ConnectingTarget()].attempts.append(ConnectionAttempt(id: attempt, pair: pair, started: started))
            }
            return awaited
        }
        waited = history
        if let awaited {
            await waitForConnection(awaited, among: serverTargets)
            return .waited
        }
        defer {
            // The pairs that waited for this attempt see whether they can join what it made.
            let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                guard var entry = state.connecting[key], let index = entry.attempts.firstIndex(where: { $0.id == attempt }) else { return [] }
                let waiters = entry.attempts.remove(at: index).waiters
                state.connecting[key] = entry.attempts.isEmpty ? nil : entry
                return waiters
            }
            for waiter in waiters { waiter.resume() }
        }
        let holdsSlot = state.withLock { $0.connecting[key]?.attempts.first { $0.id == attempt }?.started ?? false }
        if !holdsSlot {
            guard await connectionSlots.acquire(key, limit: slotLimit, until: deadline) else {
                outgoingFailed(pair, error: StanzaError(.remoteServerTimeout, text: "no connection slot for \(pair.remote) in time"), scope: .pair)
                return .failed
            }
            state.withLock { state in
                if let index = state.connecting[key]?.attempts.firstIndex(where: { $0.id == attempt }) {
                    state.connecting[key]?.attempts[index].started = true
                }
            }
        }
        defer { connectionSlots.release(key) }
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
                    outgoingFailed(pair, error: failure.stanzaError, scope: failure.scope)
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

    /// Waits until the connection attempt `id` ends (at once if it already has).
    private func waitForConnection(_ id: UUID, among targets: Set<ServerTarget>) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let queued = state.withLock { state -> Bool in
                for target in targets {
                    guard let index = state.connecting[target]?.attempts.firstIndex(where: { $0.id == id }) else { continue }
                    state.connecting[target]?.attempts[index].waiters.append(continuation)
                    return true
                }
                return false
            }
            if !queued { continuation.resume() }
        }
    }

    /// About the peer at these servers, from our links to it: whether it refused one of our
    /// domains on a link (it wants a proof a shared link cannot give, so waiting to share a
    /// connection opened for another of our domains is pointless), and whether every
    /// certificate it presented names a single domain (false while none was seen).
    private func peerFacts(at targets: Set<ServerTarget>) async -> (refusesUnproven: Bool, singleNameCertificates: Bool) {
        var refuses = false
        var seen = false
        var single = true
        let links = openLinks.filter { $0.peerTarget.map(targets.contains) == true }
        let facts = await FederationLink.onLoops(links) { link in
            link.isClosed ? nil : (refused: link.hasRefusedAny, certificate: link.peerCertificateHash, oneDomain: link.peerCertificateNamesOneDomain)
        }
        for case let fact?? in facts {
            if fact.refused { refuses = true }
            if fact.certificate != nil {
                seen = true
                if !fact.oneDomain { single = false }
            }
        }
        return (refuses, seen && single)
    }

    /// A failed outgoing attempt, with what to tell the senders.
    struct LinkFailure: Error {
        var reason: String
        var stanzaError: StanzaError
        /// Connection-level failures move on to the next SRV target; authentication
        /// failures are final for the domain.
        var tryNextTarget: Bool
        /// Whom the failure concerns: the peer domain (DNS, TCP, TLS, its certificate), or
        /// only this pair (the peer refused our local domain): other local domains may
        /// still reach the peer.
        var scope: FailureScope = .domain
    }

    enum FailureScope {
        case domain
        case pair
    }

    /// The connection for `pair` failed: bounce what waits for it and back off the domain
    /// (or only the pair, when the peer refused our local domain).
    private func outgoingFailed(_ pair: DomainPair, error: StanzaError, scope: FailureScope = .domain) {
        metrics.linkFailures.increment()
        guard scope == .domain else {
            pairFailed(pair, error: error, backoff: true)
            return
        }
        state.withLock { state in
            let failures = (state.backoff[pair.remote]?.failures ?? 0) + 1
            state.backoff[pair.remote] = Backoff(until: .now + Self.retryDelay(failures: failures, base: configuration.retryBaseSeconds), failures: failures, error: error)
        }
        pairFailed(pair, error: error, backoff: false)
    }

    /// Connects to one target (its addresses in order, resolved by the validating resolver,
    /// never the system's) and negotiates the first pair; returns the link once the pair is
    /// authorised and its waiting stanzas flushed.
    func open(_ target: PeerTarget, pair: DomainPair) async throws -> FederationLink {
        let resolved: ResolvedTarget
        do {
            resolved = try await resolveTarget(target)
        } catch {
            throw LinkFailure(reason: "\(target): \(error.reason)", stanzaError: StanzaError(.remoteServerNotFound, text: error.reason), tryNextTarget: true)
        }
        let clientContext = try makeClientContext(local: pair.local, directTLS: target.directTLS)
        let localCertificate = host.tls.certificateDER(for: pair.local)
        let asciiRemote = (try? JID(domain: pair.remote).asciiDomain) ?? pair.remote
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.maxStanzaBytes)
        let useExternal = host.tls.clientCredentials(for: pair.local)?.identity.matches(domain: pair.local, service: .xmppServer) != nil
        let negotiation = OutgoingServerNegotiation(configuration: .init(localDomain: pair.local, remoteDomain: pair.remote, useExternal: useExternal,
                                                                        requestBidi: configuration.bidi))
        let manager = self
        do {
            return try await connectFirst(resolved.addresses, target: "\(target)", tuned: true, install: { channel, negotiated in
                let link = FederationLink(origin: .outgoing, peerAddress: target.description, peerTarget: target.serverTarget, channel: channel, wallClock: manager.wallClock,
                                          onHandedOver: manager.handoverCallback)
                link.setLocalCertificate(localCertificate)
                let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.server, limits: limits)
                let handler = OutgoingLinkHandler(
                    manager: manager, link: link, decoder: decoder, clientContext: clientContext,
                    serverName: asciiRemote, directTLS: target.directTLS, negotiation: negotiation, negotiated: negotiated)
                try StreamPipeline.install(on: channel, directTLS: target.directTLS ? try handler.makeTLSHandler() : nil, decoder: decoder,
                                           contentNamespace: XMLNamespace.server, handler: handler)
            }, timedOut: {
                LinkFailure(reason: "\(target): negotiation timed out", stanzaError: StanzaError(.remoteServerTimeout, text: "negotiation with \(pair.remote) timed out"), tryNextTarget: true)
            })
        } catch let failed as NoConnection {
            throw LinkFailure(reason: "\(target): cannot connect (\(failed.last))", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true)
        }
    }

    /// Out of file descriptors (`ulimit -n`): said loudly and counted, since every pair that
    /// needs a connection of its own then bounces.
    func noteConnectFailure(_ error: any Error, to target: String) {
        guard let io = error as? IOError, io.errnoCode == EMFILE || io.errnoCode == ENFILE else { return }
        metrics.descriptorLimit.increment()
        logger.error("cannot open an s2s connection: out of file descriptors (raise `ulimit -n`)", metadata: ["target": "\(target)", "error": "\(io)"])
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
