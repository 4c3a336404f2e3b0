import Federation
import Foundation
import Trust

// The JSON the admin API speaks. These mirror Federation's snapshot types rather than make
// those Codable, so the wire format is decided here, in one place, and can stay stable while
// the federation layer changes.

/// One federation link, as `GET /api/links` lists it.
public struct AdminLinkInfo: Codable, Sendable, Equatable {
    public var id: String
    /// `outgoing` (we connected) or `incoming`.
    public var origin: String
    /// Outgoing: the target host and port; incoming: the peer's address.
    public var peerAddress: String
    public var createdAt: Date
    public var closed: Bool
    /// Both directions used (XEP-0288).
    public var bidirectional: Bool
    public var stanzasSent: Int
    public var stanzasReceived: Int
    /// Stanzas waiting to be written.
    public var queued: Int
    /// Stanzas sent but not yet acknowledged (XEP-0198).
    public var unacknowledged: Int
    /// The domain pairs authorised on the link.
    public var pairs: [AdminPairInfo]

    public init(id: String, origin: String, peerAddress: String, createdAt: Date, closed: Bool, bidirectional: Bool,
                stanzasSent: Int, stanzasReceived: Int, queued: Int, unacknowledged: Int, pairs: [AdminPairInfo]) {
        self.id = id
        self.origin = origin
        self.peerAddress = peerAddress
        self.createdAt = createdAt
        self.closed = closed
        self.bidirectional = bidirectional
        self.stanzasSent = stanzasSent
        self.stanzasReceived = stanzasReceived
        self.queued = queued
        self.unacknowledged = unacknowledged
        self.pairs = pairs
    }

    /// The API view of a link snapshot; pairs sorted by local, remote, direction.
    public init(_ snapshot: LinkSnapshot) {
        self.init(
            id: snapshot.id,
            origin: snapshot.origin.rawValue,
            peerAddress: snapshot.peerAddress,
            createdAt: snapshot.createdAt,
            closed: snapshot.closed,
            bidirectional: snapshot.bidirectional,
            stanzasSent: snapshot.stanzasSent,
            stanzasReceived: snapshot.stanzasReceived,
            queued: snapshot.queued,
            unacknowledged: snapshot.unacknowledged,
            pairs: snapshot.pairs.map(AdminPairInfo.init).sorted {
                ($0.local, $0.remote, $0.direction) < ($1.local, $1.remote, $1.direction)
            }
        )
    }

    enum CodingKeys: String, CodingKey {
        case id, origin
        case peerAddress = "peer_address"
        case createdAt = "created_at"
        case closed, bidirectional
        case stanzasSent = "stanzas_sent"
        case stanzasReceived = "stanzas_received"
        case queued, unacknowledged, pairs
    }
}

/// One authorised domain pair on a link.
public struct AdminPairInfo: Codable, Sendable, Equatable {
    /// Our domain.
    public var local: String
    /// The peer's domain.
    public var remote: String
    /// `outbound` (we send local → remote) or `inbound` (we accept remote → local).
    public var direction: String
    /// How the remote domain was proven: `pkix`, `dane`, `posh` or `dialback`.
    public var method: String
    public var authorizedAt: Date
    /// When the proof lapses; null: for the life of the link.
    public var expires: Date?

    public init(local: String, remote: String, direction: String, method: String, authorizedAt: Date, expires: Date?) {
        self.local = local
        self.remote = remote
        self.direction = direction
        self.method = method
        self.authorizedAt = authorizedAt
        self.expires = expires
    }

    public init(_ authorization: PairAuthorization) {
        self.init(
            local: authorization.pair.local,
            remote: authorization.pair.remote,
            direction: authorization.direction.rawValue,
            method: authorization.method.rawValue,
            authorizedAt: authorization.authorizedAt,
            expires: authorization.expires
        )
    }

    enum CodingKeys: String, CodingKey {
        case local, remote, direction, method
        case authorizedAt = "authorized_at"
        case expires
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        local = try container.decode(String.self, forKey: .local)
        remote = try container.decode(String.self, forKey: .remote)
        direction = try container.decode(String.self, forKey: .direction)
        method = try container.decode(String.self, forKey: .method)
        authorizedAt = try container.decode(Date.self, forKey: .authorizedAt)
        expires = try container.decodeIfPresent(Date.self, forKey: .expires)
    }

    /// `expires` is written as null rather than left out, so a reader sees "no expiry".
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(local, forKey: .local)
        try container.encode(remote, forKey: .remote)
        try container.encode(direction, forKey: .direction)
        try container.encode(method, forKey: .method)
        try container.encode(authorizedAt, forKey: .authorizedAt)
        try container.encode(expires, forKey: .expires)
    }
}

/// The encoders the admin API uses: ISO 8601 dates, sorted keys.
public enum AdminJSON {
    public static func encoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }

    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}
