import Foundation
import Logging
import NIOCore
import NIOSSL
import Synchronization
import Trust
import XMPPCore
import XMPPStream

/// The established phase of a link, whichever side opened it: what happens to each
/// first-level element once the stream is negotiated.
///
/// Both link handlers hand their elements here, so an outgoing bidirectional link and an
/// incoming one behave alike (XEP-0288 §2.2): either end may assert pairs with `db:result`,
/// answers are matched against what was asked on this stream (XEP-0220 §3.1), stream
/// management acknowledgements are counted per connection (XEP-0198 on s2s, digest §13.4),
/// and every stanza passes the pair checks before it is routed.
///
/// Confined to the link's event loop.
final class LinkSession {
    let manager: FederationManager
    let link: FederationLink
    let logger: Logger
    private let inbound: InboundStanzaQueue

    init(manager: FederationManager, link: FederationLink, logger: Logger) {
        self.manager = manager
        self.link = link
        self.logger = logger
        inbound = InboundStanzaQueue(manager: manager, link: link)
    }

    /// The link is gone: stop routing what it received after what was already queued.
    func finish() {
        inbound.finish()
    }

    /// A first-level element on a negotiated stream.
    func handle(_ element: XMLElement) {
        switch element.namespace {
        case XMLNamespace.dialback:
            guard let dialback = DialbackElement(element) else {
                close(StreamError(.badFormat, text: "dialback element without addresses"), reason: "malformed dialback element")
                return
            }
            handleDialback(dialback)
        case XMLNamespace.streamManagement:
            handleStreamManagement(element)
        case XMLNamespace.streams where element.name == "error":
            // The peer is closing the link (shutdown, reset, ...); RFC 6120 §4.9.1.
            let error = StreamError(element: element) ?? StreamError(.undefinedCondition)
            logger.info("the peer closed the link with a stream error", metadata: ["condition": "\(error.condition.rawValue)", "text": "\(error.text ?? "")"])
            manager.metrics.streamErrorReceived(error.condition.rawValue)
            link.peerSentStreamError()
            link.closeStream()
        default:
            handleStanza(element)
        }
    }

    // MARK: Dialback on the link

    private func handleDialback(_ element: DialbackElement) {
        switch (element.kind, element.outcome) {
        case (.result, .some(let outcome)):
            // The answer to a pair we asked for. Anything we did not ask for on this stream
            // is ignored: acting on it is how CVE-2012-3525 worked (XEP-0220 §3.1).
            guard let local = try? JID(domain: element.to).domainpart, let remote = try? JID(domain: element.from).domainpart else { return }
            let answer: FederationLink.PairRequestOutcome = switch outcome {
            case .valid: .valid
            case .invalid: .invalid
            case .error: .error(element.error ?? StanzaError(.undefinedCondition))
            }
            let pair = DomainPair(local: local, remote: remote)
            guard let effects = link.answer(pair, answer) else {
                logger.info("ignoring an unsolicited dialback answer", metadata: ["from": "\(element.from)", "to": "\(element.to)"])
                return
            }
            if let proof = effects.proof {
                manager.authorized(pair, effects.authorized, on: link, method: proof.method)
            }
            // Routed first, then the requesters go on.
            link.resume(effects, with: answer)
        case (.result, nil):
            // The peer asserts a further domain. On a link we opened this is only allowed
            // when it is bidirectional (XEP-0288 §2.2).
            guard link.origin == .incoming || link.isBidirectional, let streamID = link.streamID else {
                logger.info("ignoring a dialback request on a one-way outgoing link", metadata: ["from": "\(element.from)", "to": "\(element.to)"])
                return
            }
            peerAsserts(element, streamID: streamID)
        case (.verify, nil):
            answerVerify(element)
        case (.verify, .some):
            // Our own db:verify requests go out on separate connections, never on a link.
            logger.info("ignoring an unsolicited db:verify answer", metadata: ["from": "\(element.from)", "to": "\(element.to)"])
        }
    }

    /// XEP-0220 Steps 1–4 as the Receiving Server, on any link: the pair is authorised with
    /// the strongest proof available on this connection, for that domain, now. A refusal is
    /// a dialback error: the link and every pair on it stay up (§2.2.1).
    func peerAsserts(_ request: DialbackElement, streamID: String) {
        let manager = self.manager
        let link = self.link
        let loop = link.channel.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        loop.makeFutureWithTask {
            await manager.decideAssertion(request, streamID: streamID, on: link)
        }.whenSuccess { decision in
            bound.value.answerAssertion(request, decision: decision)
        }
    }

    private func answerAssertion(_ request: DialbackElement, decision: FederationManager.AssertionDecision) {
        guard !link.isClosed else { return }
        switch decision {
        case .valid(let pair, let method, let expires):
            manager.authorize(pair, .inbound, on: link, method: method, expires: expires)
            logger.info("pair authorised", metadata: ["pair": "\(pair)", "method": "\(method.rawValue)"])
            link.sendControl(request.answer(.valid).element)
        case .invalid(let pair):
            logger.warning("security: dialback key refused by the authoritative server", metadata: ["pair": "\(pair)"])
            manager.metrics.dialbackRefused("invalid")
            if link.hasInboundPairs() {
                // §2.2.1: other pairs are valid on this stream, so keep it and say forbidden.
                link.sendControl(request.answer(.error, error: StanzaError(.forbidden)).element)
            } else {
                // §2.1.2: the first pair failed: answer invalid and close the stream.
                link.sendControl(request.answer(.invalid).element)
                link.closeStream()
            }
        case .refused(let error):
            logger.notice("dialback request refused", metadata: ["from": "\(request.from)", "to": "\(request.to)", "condition": "\(error.condition.rawValue)", "reason": "\(error.text ?? "")"])
            manager.metrics.dialbackRefused(error.condition.rawValue)
            link.sendControl(request.answer(.error, error: error).element)
        }
    }

    /// XEP-0220 Step 3: as the Authoritative Server, say whether we issued this key.
    func answerVerify(_ request: DialbackElement) {
        guard let originating = try? JID(domain: request.to).domainpart, manager.host.isHosted(originating) else {
            manager.metrics.dialbackRefused(StanzaError.Condition.itemNotFound.rawValue)
            link.sendControl(request.answer(.error, error: StanzaError(.itemNotFound, text: "\(request.to) is not hosted here")).element)
            return
        }
        let valid = request.id.flatMap { id in
            request.key.map { manager.keys.verify($0, receiving: request.from, originating: originating, streamID: id) }
        } ?? false
        if !valid {
            logger.notice("db:verify for a key we did not issue", metadata: ["from": "\(request.from)", "to": "\(request.to)"])
        }
        link.sendControl(request.answer(valid ? .valid : .invalid).element)
    }

    // MARK: Stream management (XEP-0198, acknowledgements only)

    private func handleStreamManagement(_ element: XMLElement) {
        switch element.name {
        case "enable":
            // §3: only once, and only after authentication.
            if link.streamManagementEnabled || !link.hasInboundPairs() {
                link.sendControl(XMLElement(name: "failed", namespace: XMLNamespace.streamManagement, children: [
                    .element(XMLElement(name: StanzaError.Condition.unexpectedRequest.rawValue, namespace: XMLNamespace.stanzaErrors)),
                ]))
                return
            }
            link.enableStreamManagement(requested: false)
            // Resumption is never offered on s2s (digest §13.4): unacknowledged stanzas are
            // re-sent on a freshly authenticated link instead.
            link.sendControl(XMLElement(name: "enabled", namespace: XMLNamespace.streamManagement))
        case "enabled":
            link.streamManagementConfirmed()
        case "failed":
            logger.info("the peer refused stream management")
            link.disableStreamManagement()
        case "r":
            link.sendControl(XMLElement(name: "a", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("h", String(link.handledInbound))]))
            // Acknowledged: none of it comes again.
            manager.resentStanzas.acknowledged(on: link.id)
        case "a":
            guard let text = element.attribute("h"), let handled = UInt32(text) else {
                close(StreamError(.badFormat, text: "<a/> without a valid 'h'"), reason: "malformed acknowledgement")
                return
            }
            if !link.acknowledge(handled) {
                // §4: acknowledging more than was sent.
                let error = StreamError(.undefinedCondition, text: "acknowledged \(handled) stanzas, more than were sent",
                                        applicationCondition: XMLElement(name: "handled-count-too-high", namespace: XMLNamespace.streamManagement,
                                                                         attributes: [XMLAttribute("h", text)]))
                close(error, reason: "handled count too high")
            }
        default:
            close(StreamError(.unsupportedStanzaType, text: "unexpected <\(element.name)> in \(XMLNamespace.streamManagement)"), reason: "unknown stream management element")
        }
    }

    // MARK: Stanzas

    private func handleStanza(_ element: XMLElement) {
        switch InboundChecks.check(element, link: link, host: manager.host) {
        case .accept(let stanza):
            link.countReceived()
            if manager.resentStanzas.arrived(stanza, on: link.id, track: link.streamManagementEnabled) {
                // Re-sent after a lost acknowledgement on an earlier link (XEP-0198 §4).
                logger.debug("dropping a re-sent duplicate", metadata: ["id": "\(stanza.id ?? "")"])
                manager.metrics.duplicatesDropped.increment()
                return
            }
            inbound.enqueue(stanza)
        case .refuse(let stanza, let error):
            // A pair we withdrew because the local domain is no longer hosted: the stanza is
            // not routed, its sender learns why, and the other pairs keep flowing.
            link.countReceived()
            manager.metrics.bounced.increment()
            logger.info("stanza for a withdrawn domain refused", metadata: ["to": "\(stanza.toString ?? "")", "from": "\(stanza.fromString ?? "")"])
            if let reply = stanza.errorReply(error) {
                link.sendControl(reply.element)
            }
        case .reset(let reason):
            logger.notice("a proof on the link lapsed; resetting it", metadata: ["reason": "\(reason)"])
            manager.metrics.resets("proof-lapsed")
            close(StreamError(.reset, text: reason), reason: reason)
        case .reject(let error, let reason):
            logger.warning("security: refused stanza from peer", metadata: ["reason": "\(reason)", "condition": "\(error.condition.rawValue)"])
            manager.metrics.securityViolations.increment()
            close(error, reason: reason)
        }
    }

    private func close(_ error: StreamError, reason: String) {
        manager.metrics.streamError(error.condition.rawValue)
        logger.notice("closing link with a stream error", metadata: ["condition": "\(error.condition.rawValue)", "reason": "\(reason)"])
        link.close(with: error)
    }
}

@available(*, unavailable)
extension LinkSession: Sendable {}

/// The certificates a TLS verification callback saw. Written once on the channel's event
/// loop during the handshake, read on the same loop after it.
final class CapturedChain: Sendable {
    private let storage = Mutex<[NIOSSLCertificate]>([])

    func set(_ certificates: [NIOSSLCertificate]) {
        storage.withLock { $0 = certificates }
    }

    var certificates: [NIOSSLCertificate] {
        storage.withLock { $0 }
    }
}

/// Hands stanzas that passed a link's checks to the router one at a time, in arrival order
/// (RFC 6120 §10.1).
final class InboundStanzaQueue: Sendable {
    private let continuation: AsyncStream<Stanza>.Continuation

    init(manager: FederationManager, link: FederationLink) {
        let (stream, continuation) = AsyncStream.makeStream(of: Stanza.self)
        self.continuation = continuation
        Task {
            for await stanza in stream {
                await manager.deliverInbound(stanza, from: link)
            }
        }
    }

    func enqueue(_ stanza: Stanza) {
        continuation.yield(stanza)
    }

    func finish() {
        continuation.finish()
    }
}

/// RFC 6120 §8.1.1.2 and §8.1.2.2, plus §4.3.5: what a stanza from a peer must satisfy
/// before it is routed. On a link that carries many pairs, a failure closes the whole link,
/// so the reason is logged loudly as a security event naming the peer.
enum InboundChecks {
    enum Verdict {
        case accept(Stanza)
        /// Not routed, answered with a stanza error; the link stays up (a withdrawn pair).
        case refuse(Stanza, StanzaError)
        /// The pair's proof lapsed: re-establish the link so every domain is proven again.
        case reset(String)
        case reject(StreamError, reason: String)
    }

    static func check(_ element: XMLElement, link: FederationLink, host: any FederationHost) -> Verdict {
        guard let stanza = Stanza(element) else {
            return .reject(StreamError(.unsupportedStanzaType), reason: "unexpected <\(element.name)> in \(element.namespace)")
        }
        // The common case costs two lookups; the reasons for a refusal are worked out only
        // when there is one.
        if let toText = stanza.toString, let fromText = stanza.fromString, let to = try? JID(toText), let from = try? JID(fromText),
           link.isAuthorized(DomainPair(local: to.domainpart, remote: from.domainpart), .inbound), host.isHosted(to.domainpart) {
            return .accept(stanza)
        }
        // A link whose only pairs were withdrawn (their local domain removed) did authenticate:
        // its stanzas get the withdrawn pair's error below, and the link stays up.
        guard link.hasInboundPairs() || link.authorizations.contains(where: { $0.direction == .inbound }) || link.hasWithdrawnPairs else {
            return .reject(StreamError(.notAuthorized), reason: "stanza before any domain was authenticated")
        }
        guard let toText = stanza.toString, let fromText = stanza.fromString else {
            return .reject(StreamError(.improperAddressing), reason: "stanza without 'to' or 'from'")
        }
        guard let to = try? JID(toText), let from = try? JID(fromText) else {
            return .reject(StreamError(.improperAddressing), reason: "malformed address in 'to' or 'from'")
        }
        let pair = DomainPair(local: to.domainpart, remote: from.domainpart)
        if link.hasLapsed(pair, .inbound) {
            return .reset("the proof for \(pair.remote) lapsed")
        }
        if link.wasWithdrawn(pair), !host.isHosted(pair.local) {
            return .refuse(stanza, StanzaError(.remoteServerNotFound, text: "\(pair.local) is no longer served here"))
        }
        guard link.isRemoteAuthenticated(from.domainpart) else {
            return .reject(StreamError(.invalidFrom), reason: "'from' domain \(from.domainpart) is not authenticated on this link")
        }
        return .reject(StreamError(.hostUnknown), reason: "pair \(pair) is not authorised on this link")
    }
}

/// Stanzas a peer may send again: those received on some link and not yet acknowledged to
/// the peer (XEP-0198). If that link is lost, the peer re-sends them on the next one, and
/// the copy is dropped here. Nothing else is: a client that reuses an id (many do) has each
/// of its messages delivered (issue 10; earlier every repeat of (kind, from, to, type, id)
/// within the last 20,000 was dropped). Bounded: beyond `capacity` the oldest are forgotten.
final class ResentStanzaFilter: Sendable {
    private struct Entry {
        /// The link it arrived on.
        var link: String
        /// When we acknowledged it: our `<a/>` may still have been lost with the link, so a
        /// copy is expected for a little while after.
        var acknowledgedAt: ContinuousClock.Instant?
    }

    private struct State {
        var entries: [String: Entry] = [:]
        /// Per link, its keys not yet acknowledged, so an acknowledgement can mark them.
        var byLink: [String: [String]] = [:]
        /// Arrival order across links, for the capacity bound.
        var order: [String] = []
        var head = 0
    }

    private let state = Mutex(State())
    let capacity: Int
    /// How long after our acknowledgement a copy is still taken for a re-send.
    let grace: Duration

    init(capacity: Int, grace: Duration = .seconds(60)) {
        self.capacity = max(1, capacity)
        self.grace = grace
    }

    /// The key that identifies a stanza's copies; nil for presence (a repeat is harmless) and
    /// for stanzas without an id.
    static func key(_ stanza: Stanza) -> String? {
        guard stanza.kind != .presence, let id = stanza.id, !id.isEmpty,
              let from = stanza.fromString, let to = stanza.toString else { return nil }
        return "\(stanza.kind.rawValue)\u{0}\(from)\u{0}\(to)\u{0}\(stanza.typeAttribute ?? "")\u{0}\(id)"
    }

    /// A stanza arrived on `link`. True when it is the copy of one that arrived on another
    /// link and was not acknowledged (or only just): drop it. The same id again on the same
    /// link is a new stanza. `track`: the link acknowledges (XEP-0198), so the peer may
    /// re-send this one if the link is lost; on a link without acknowledgements nothing is
    /// re-sent and nothing is remembered.
    func arrived(_ stanza: Stanza, on link: String, track: Bool, now: ContinuousClock.Instant = .now) -> Bool {
        guard let key = Self.key(stanza) else { return false }
        return state.withLock { state in
            if let earlier = state.entries[key] {
                let recent = earlier.acknowledgedAt.map { now - $0 < grace } ?? true
                if earlier.link != link && recent {
                    state.entries[key] = nil
                    return true
                }
            }
            guard track else { return false }
            state.entries[key] = Entry(link: link, acknowledgedAt: nil)
            state.byLink[link, default: []].append(key)
            if state.order.count < capacity {
                state.order.append(key)
            } else {
                let oldest = state.order[state.head]
                if oldest != key { state.entries[oldest] = nil }
                state.order[state.head] = key
                state.head = (state.head + 1) % capacity
            }
            return false
        }
    }

    /// We acknowledged everything received on `link` so far.
    func acknowledged(on link: String, now: ContinuousClock.Instant = .now) {
        state.withLock { state in
            guard let keys = state.byLink.removeValue(forKey: link) else { return }
            for key in keys where state.entries[key]?.link == link {
                state.entries[key]?.acknowledgedAt = now
            }
        }
    }

    /// The link is gone: what it did not acknowledge stays (its copies may come on the
    /// next link); only the per-link bookkeeping goes.
    func linkClosed(_ link: String) {
        state.withLock { _ = $0.byLink.removeValue(forKey: link) }
    }

    /// How many stanzas are held as possible re-sends (for tests).
    var count: Int { state.withLock { $0.entries.count } }
}
