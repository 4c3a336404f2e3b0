import Crypto
import Foundation
import SwiftASN1
import Trust
import X509
import XMPPCore
import XMPPStream

/// Checks a peer's certificate chain for revocation (OCSP, in production).
public protocol RevocationChecking: Sendable {
    func check(chain: [Certificate], at time: Date) async -> RevocationVerdict
}

/// What a revocation check found, and when to look again (RFC 6120 §13.7.2.3: at the
/// response's `nextUpdate`, or every 24 hours).
public struct RevocationVerdict: Sendable, Hashable {
    public enum Status: Sendable, Hashable {
        case good
        case revoked(String)
        /// No responder, no answer, or no OCSP URL: nothing to act on.
        case unknown(String)
    }

    public var status: Status
    public var nextCheck: Date?

    public init(status: Status, nextCheck: Date?) {
        self.status = status
        self.nextCheck = nextCheck
    }
}

/// Proofs of peer domains on links, for both roles, and their re-validation.
extension FederationManager {
    /// Whether the peer on `link` speaks for `domain`, by the first proof that succeeds
    /// (PKIX, then POSH and DANE as configured). A success is remembered on the link until it
    /// expires; concurrent questions about the same domain on the same link share one check.
    func proveRemote(_ domain: String, on link: FederationLink, fresh: Bool = false) async -> ProofOutcome {
        guard let (known, chain) = await link.onLoop({ ($0.proof(of: domain), $0.certificateChain) }) else {
            return .notApplicable("the link is gone")
        }
        if !fresh, let known {
            return .proven(known.method, expires: known.expires)
        }
        let evidence = PeerEvidence(certificateChain: chain, time: wallClock.now(), connectedTarget: link.peerTarget)
        if let leaf = evidence.certificateChain.first, isRevoked(leaf) {
            return .notApplicable("the certificate presented was revoked")
        }
        // The order and the rules of combining proofs (role, pins, POSH's validity window)
        // are DomainProofPolicy's, in Trust.
        let rule = await trustRule(for: domain, on: link)
        let policy = proofPolicy
        let validator = self.validator
        let ordered = policy.ordered(connecting: link.peerTarget != nil, pin: rule) { PKIXProof(validator: validator.pinned(to: $0)) }
        let outcome: ProofOutcome = await inFlight.run("prove|\(link.id)|\(domain)|\(fresh)") {
            await policy.prove(domain, evidence: evidence, ordered: ordered, pin: rule)
        }
        if case .proven(let method, let expires) = outcome {
            _ = await link.onLoop { $0.recordProof(of: domain, method: method, expires: expires) }
        }
        return outcome
    }

    /// The trust pin covering `domain` on `link`, if any: by the domain or a pattern, else by
    /// server host: the one we connected to, and those the domain's SRV records name (looked
    /// up, and cached, only when some rule matches by host).
    func trustRule(for domain: String, on link: FederationLink?) async -> PeerTrustRule? {
        let anchors = validator.anchors
        if let rule = anchors.rule(for: domain) { return rule }
        guard anchors.hasHostRules else { return nil }
        var hosts: [String] = []
        if let target = link?.peerTarget { hosts.append(target.host) }
        if case .targets(let targets) = await locate(domain) { hosts += targets.map(\.host) }
        return anchors.rule(for: domain, targetHosts: hosts)
    }

    /// Whether `remote` may be authenticated only by a certificate on the connection: the
    /// `require_certificates` policy, or a trust pin that does not allow dialback.
    func certificateRequired(_ remote: String, on link: FederationLink?) async -> Bool {
        if requiresCertificates(remote) { return true }
        guard let rule = await trustRule(for: remote, on: link) else { return false }
        return !rule.permits(.dialback)
    }

    /// PKIX for SASL EXTERNAL (RFC 6120 §6.4, XEP-0178): to the pin's roots when `domain` is
    /// pinned, else to the default ones.
    func validateCertificate(_ chain: [Certificate], for domain: String, on link: FederationLink) async -> Result<ValidatedPeerCertificate, PeerCertificateFailure> {
        if let leaf = chain.first, isRevoked(leaf) {
            return .failure(.untrusted("the certificate presented was revoked"))
        }
        let rule = await trustRule(for: domain, on: link)
        return await (rule.map { validator.pinned(to: $0) } ?? validator).validate(chain: chain, for: domain)
    }

    enum AssertionDecision: Sendable {
        case valid(DomainPair, ProofMethod, Date?)
        /// The authoritative server said the key is not its own.
        case invalid(DomainPair)
        /// A dialback error: the pair is refused, the link stays up (XEP-0220 §2.5).
        case refused(StanzaError)
    }

    /// XEP-0220 as the Receiving Server, for a `db:result` on `link`: the strongest proof
    /// available on this connection, for that domain, now (XEP-0344 §2.4, checked for this
    /// exact domain: CVE-2021-32919); else, unless policy requires a certificate, a
    /// `db:verify` on a separate connection to the domain's authoritative server (XEP-0288
    /// §2.2: never on the connection the key arrived on).
    func decideAssertion(_ request: DialbackElement, streamID: String, on link: FederationLink) async -> AssertionDecision {
        guard let local = try? JID(domain: request.to).domainpart, host.isHosted(local) else {
            return .refused(StanzaError(.itemNotFound, text: "\(request.to) is not hosted here"))
        }
        guard let remote = try? JID(domain: request.from).domainpart, !host.isHosted(remote) else {
            return .refused(StanzaError(.notAcceptable, text: "invalid sender domain"))
        }
        guard let key = request.key else {
            return .refused(StanzaError(.badRequest, text: "no dialback key"))
        }
        let pair = DomainPair(local: local, remote: remote)
        switch await proveRemote(remote, on: link) {
        case .proven(let method, let expires):
            return .valid(pair, method, expires)
        case .refuted(let why):
            // RFC 7711 §3.3: a POSH file that lists other certificates refuses the domain,
            // unless another proof succeeded; dialback does not override it.
            return .refused(StanzaError(.notAuthorized, text: "\(remote) is not proven: \(why)"))
        case .notApplicable:
            break
        }
        if await certificateRequired(remote, on: link) {
            metrics.certificateRequiredRefusals.increment()
            return .refused(StanzaError(.notAuthorized, text: "a certificate proof for \(remote) is required"))
        }
        // Pairs with the same peer domain asserted at once on this link wait for one
        // verification; if it succeeds they reuse its proof (digest §14 step 4).
        let gate = "\(link.id)|\(remote)"
        let gated = await dialbackGates.acquire(gate, limit: 1, until: .now + .seconds(configuration.negotiationTimeoutSeconds))
        defer { if gated { dialbackGates.release(gate) } }
        if let known = await link.onLoop({ $0.proof(of: remote) }) ?? nil {
            return .valid(pair, known.method, known.expires)
        }
        metrics.dialbackVerifications.increment()
        switch await verifyDialback(receiving: local, originating: remote, streamID: streamID, key: key) {
        case .valid:
            // The key was bound to this stream, so the peer on this connection speaks for
            // `remote`; further pairs with it reuse the proof (digest §14 step 4).
            _ = await link.onLoop { $0.recordProof(of: remote, method: .dialback, expires: nil) }
            return .valid(pair, .dialback, nil)
        case .invalid:
            return .invalid(pair)
        case .error(let error):
            return .refused(error)
        }
    }

    // MARK: Live re-validation (RFC 6120 §13.7.2.3, RFC 7711 §6, RFC 7673)

    /// Renews proofs about to lapse (POSH `expires`, DNS TTLs) and checks revocation. A
    /// proof that lapses and cannot be renewed, an expired certificate, or a revoked one
    /// closes the link with `<reset/>`: the peer reconnects and proves every domain again,
    /// nothing being trusted because it was trusted before. Stanzas the link owed are sent
    /// again on the next one.
    func revalidate(at time: Date? = nil) async {
        let now = time ?? wallClock.now()
        defer { metrics.revalidationPasses.increment() }
        await retireDuplicateLinks()
        let margin = configuration.renewalMarginSeconds
        for link in openLinks {
            // What this pass looks at, read in one step of the link's loop.
            let read = await link.onLoop { link in
                link.isClosed ? nil : (idle: link.idleSeconds(at: now), overdue: link.acknowledgementOverdue(at: now), authorizations: link.authorizations)
            }
            guard let facts = read ?? nil else { continue }
            if let idle = facts.idle, idle > Double(configuration.idleTimeoutSeconds) {
                // RFC 6120 §4.4: an idle link is closed politely; the next stanza opens one.
                logger.info("closing an idle link", metadata: ["link": "\(link.id.prefix(8))", "peer": "\(link.peerAddress)", "idle": "\(Int(idle))s"])
                link.closeStream()
                continue
            }
            if let owed = facts.overdue, owed > Double(configuration.acknowledgementTimeoutSeconds) {
                // XEP-0198 §5: a peer that stops acknowledging holds what we sent; a new link
                // carries it (and the receiver drops copies it had already delivered).
                logger.notice("the peer stopped acknowledging; resetting the link", metadata: [
                    "link": "\(link.id.prefix(8))", "peer": "\(link.peerAddress)", "owed": "\(Int(owed))s"])
                metrics.acknowledgementTimeouts.increment()
                metrics.resets("ack-timeout")
                link.close(with: StreamError(.connectionTimeout, text: "no acknowledgement for \(Int(owed)) s"))
                continue
            }
            var lapsed: [String] = []
            let expiring = facts.authorizations.filter { authorization in
                authorization.expires.map { $0.timeIntervalSince(now) < margin } ?? false
            }
            for domain in Set(expiring.map(\.pair.remote)).sorted() {
                let authorizations = expiring.filter { $0.pair.remote == domain }
                let earliest = authorizations.compactMap(\.expires).min() ?? now
                let outcome = await proveRemote(domain, on: link, fresh: true)
                if case .proven(let method, let expires) = outcome, expires.map({ $0 > earliest }) ?? true {
                    let manager = self
                    _ = await link.onLoop { link in
                        for authorization in authorizations {
                            link.renew(authorization.pair, authorization.direction, method: method, expires: expires)
                            if authorization.direction == .outbound { manager.routeRenewed(authorization.pair, on: link, expires: expires) }
                        }
                    }
                    logger.debug("renewed a proof", metadata: ["link": "\(link.id.prefix(8))", "domain": "\(domain)", "method": "\(method.rawValue)"])
                    continue
                }
                if authorizations.contains(where: { !$0.isValid(at: now) }) {
                    lapsed.append(domain)
                }
            }
            if !lapsed.isEmpty {
                logger.notice("proofs on a link lapsed; resetting it", metadata: ["link": "\(link.id.prefix(8))", "peer": "\(link.peerAddress)", "domains": "\(lapsed.joined(separator: ","))"])
                metrics.resets("proof-lapsed")
                link.close(with: StreamError(.reset, text: "the proof for \(lapsed.joined(separator: ", ")) lapsed"))
                continue
            }
            await checkRevocation(of: link, at: now)
        }
    }

    /// A certificate is about to be relied on (right after the handshake): check it for
    /// revocation now rather than at the next re-validation pass (RFC 6120 §13.7.2.3). On the
    /// link's event loop.
    func checkRevocationSoon(_ link: FederationLink) {
        guard revocation != nil, !link.certificateChain.isEmpty else { return }
        let manager = self
        Task { await manager.checkRevocation(of: link, at: manager.wallClock.now()) }
    }

    func isRevoked(_ certificate: Certificate) -> Bool {
        guard let der = try? certificate.derBytes() else { return false }
        return revokedCertificates.withLock { $0.contains(der) }
    }

    func checkRevocation(of link: FederationLink, at now: Date) async {
        // One check per link at a time: the check right after the handshake and a
        // revalidation pass may meet, and a revoked certificate must reset (and be counted)
        // once.
        let manager = self
        await inFlight.run("revocation|\(link.id)") { await manager.checkRevocationNow(of: link, at: now) }
    }

    private func checkRevocationNow(of link: FederationLink, at now: Date) async {
        guard let revocation else { return }
        let read = await link.onLoop { link in
            (next: link.nextRevocationCheck, chain: link.certificateChain, domain: link.authorizations.first?.pair.remote ?? "")
        }
        guard let (nextCheck, chain, domain) = read, nextCheck <= now else { return }
        // No certificate yet (the TLS handshake of a link registered when its TCP connection
        // opened is still under way): nothing to check now, so look again next time. It used
        // to be set to "never", and a slow peer's link was then never checked (issue 10).
        guard !chain.isEmpty else { return }
        // OCSP needs each certificate's issuer: check the validated path, which ends in the
        // trusted root the peer need not have sent.
        let verdict: RevocationVerdict
        let leafDER = chain.first.flatMap { try? $0.derBytes() } ?? []
        if let known = revocationAnswers.verdict(for: leafDER, at: now) {
            // Another link presenting this certificate asked already, and the answer is
            // still current.
            verdict = known
        } else {
            let rule = await trustRule(for: domain, on: link)
            let path = await (rule.map { validator.pinned(to: $0) } ?? validator).trustedPath(of: chain, for: domain, at: now) ?? chain
            // Links that present the same certificate at the same moment share one request.
            let key = "ocsp|" + SHA256.hash(data: leafDER).map { String(format: "%02x", $0) }.joined()
            verdict = await inFlight.run(key) { [metrics] in
                metrics.ocspRequests.increment()
                return await revocation.check(chain: path, at: now)
            }
            revocationAnswers.store(verdict, for: leafDER, until: verdict.nextCheck ?? now.addingTimeInterval(24 * 3600))
        }
        switch verdict.status {
        case .revoked(let reason):
            if let leaf = chain.first, let der = try? leaf.derBytes() {
                revokedCertificates.withLock { _ = $0.insert(der) }
            }
            // RFC 6120 §13.7.2.3: what rests on the certificate goes. A link whose pairs rest
            // on dialback (or on DNS alone) never relied on it: it stays, and the certificate
            // is never a proof again (proveRemote and SASL EXTERNAL check the revoked set).
            // Resetting such a link would only make the next one, presenting the same
            // certificate, be reset in turn.
            enum Consequence: Sendable {
                case none
                /// The link does not rest on the certificate; `first`: noticed for the first time.
                case kept(first: Bool)
                case reset
            }
            // Decided and marked in one step of the link's loop.
            let consequence = await link.onLoop { link -> Consequence in
                guard link.restsOnCertificate else {
                    // Looked at again on every pass (from the cache, no request): a proof
                    // resting on the certificate that was decided while this answer was on its
                    // way resets the link at the next pass. New proofs never rest on it
                    // (revoked set).
                    let first = link.nextRevocationCheck == .distantPast
                    link.setNextRevocationCheck(now)
                    return .kept(first: first)
                }
                // Reset once: the link is closing, later passes leave it alone.
                guard !link.isClosed, link.nextRevocationCheck != .distantFuture else { return .none }
                link.setNextRevocationCheck(.distantFuture)
                return .reset
            } ?? Consequence.none
            guard case .reset = consequence else {
                if case .kept(first: true) = consequence {
                    logger.notice("the peer's certificate was revoked; the link does not rest on it", metadata: ["link": "\(link.id.prefix(8))", "peer": "\(link.peerAddress)", "reason": "\(reason)"])
                }
                return
            }
            logger.warning("security: the peer's certificate was revoked; resetting the link", metadata: ["link": "\(link.id.prefix(8))", "peer": "\(link.peerAddress)", "reason": "\(reason)"])
            metrics.resets("revoked")
            link.close(with: StreamError(.reset, text: "certificate revoked"))
        case .good, .unknown:
            let next = verdict.nextCheck ?? now.addingTimeInterval(24 * 3600)
            _ = await link.onLoop { $0.setNextRevocationCheck(next) }
        }
    }
}

extension Certificate {
    /// The DER encoding, as presented.
    func derBytes() throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(self)
        return serializer.serializedBytes
    }
}
