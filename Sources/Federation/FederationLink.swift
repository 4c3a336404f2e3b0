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
/// The table of ``PairAuthorization``s is the link's only authority: a stanza may be sent
/// for a pair only if an outbound authorisation for it is valid now, and a stanza received is
/// routed only if an inbound one is (RFC 6120 §8.1.1.2, §8.1.2.2). Authorisations are added
/// only by the federation layer, where a proof succeeds.
public final class FederationLink: Sendable {
    public enum Origin: String, Sendable, Hashable {
        /// We connected to the peer.
        case outgoing
        /// The peer connected to us.
        case incoming
    }

    public let id: String
    public let origin: Origin
    /// Outgoing: the target host and port; incoming: the peer's address.
    public let peerAddress: String
    public let createdAt: Date
    let channel: any Channel
    private let state = Mutex(State())

    struct State {
        var certificateChain: [Certificate] = []
        var authorizations: [Key: PairAuthorization] = [:]
        /// Domains the peer proved on this connection, with how and until when; a later pair
        /// for the same remote domain reuses the proof (RFC 7712 §4.4, XEP-0344).
        var provenDomains: [String: (method: ProofMethod, expires: Date?)] = [:]
        var capabilities = OutgoingServerNegotiation.PeerCapabilities()
        var closed = false
        var stanzasSent = 0
        var stanzasReceived = 0
    }

    struct Key: Hashable {
        var pair: DomainPair
        var direction: PairDirection
    }

    init(origin: Origin, peerAddress: String, channel: any Channel) {
        self.id = UUID().uuidString
        self.origin = origin
        self.peerAddress = peerAddress
        self.channel = channel
        self.createdAt = Date()
    }

    // MARK: Certificates and capabilities

    var certificateChain: [Certificate] {
        get { state.withLock { $0.certificateChain } }
    }

    func setCertificateChain(_ chain: [Certificate]) {
        state.withLock { $0.certificateChain = chain }
    }

    var capabilities: OutgoingServerNegotiation.PeerCapabilities {
        state.withLock { $0.capabilities }
    }

    func setCapabilities(_ capabilities: OutgoingServerNegotiation.PeerCapabilities) {
        state.withLock { $0.capabilities = capabilities }
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

    // MARK: Authorisations

    func authorize(_ pair: DomainPair, _ direction: PairDirection, method: ProofMethod, expires: Date?) {
        let authorization = PairAuthorization(pair: pair, direction: direction, method: method, authorizedAt: Date(), expires: expires)
        state.withLock { $0.authorizations[Key(pair: pair, direction: direction)] = authorization }
    }

    /// Whether stanzas for `pair` may flow in `direction` now.
    public func isAuthorized(_ pair: DomainPair, _ direction: PairDirection, at time: Date = Date()) -> Bool {
        state.withLock { state in
            guard !state.closed, let authorization = state.authorizations[Key(pair: pair, direction: direction)] else { return false }
            return authorization.isValid(at: time)
        }
    }

    /// True when any remote domain is authenticated inbound (some stanza may arrive).
    func hasInboundPairs(at time: Date = Date()) -> Bool {
        state.withLock { $0.authorizations.values.contains { $0.direction == .inbound && $0.isValid(at: time) } }
    }

    /// True when `remote` is authenticated for some inbound pair (the stanza's `from`).
    func isRemoteAuthenticated(_ remote: String, at time: Date = Date()) -> Bool {
        state.withLock { $0.authorizations.values.contains { $0.direction == .inbound && $0.pair.remote == remote && $0.isValid(at: time) } }
    }

    public var authorizations: [PairAuthorization] {
        state.withLock { Array($0.authorizations.values) }
    }

    // MARK: Traffic

    /// Sends a stanza already checked against the authorisations.
    func send(_ element: XMLElement) {
        state.withLock { $0.stanzasSent += 1 }
        channel.writeAndFlush(StreamOutput.element(element), promise: nil)
    }

    func countReceived() {
        state.withLock { $0.stanzasReceived += 1 }
    }

    var isClosed: Bool { state.withLock { $0.closed } }

    func markClosed() {
        state.withLock { $0.closed = true }
    }

    /// Closes with a stream error.
    func close(with error: StreamError) {
        markClosed()
        let channel = self.channel
        channel.writeAndFlush(StreamOutput.error(error)).whenComplete { _ in channel.close(promise: nil) }
    }

    /// A description for operators (`braid links`) and logs.
    public var snapshot: LinkSnapshot {
        state.withLock { state in
            LinkSnapshot(id: id, origin: origin, peerAddress: peerAddress, createdAt: createdAt,
                         pairs: state.authorizations.values.sorted { ($0.pair.local, $0.pair.remote, $0.direction.rawValue) < ($1.pair.local, $1.pair.remote, $1.direction.rawValue) },
                         stanzasSent: state.stanzasSent, stanzasReceived: state.stanzasReceived, closed: state.closed)
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
}
