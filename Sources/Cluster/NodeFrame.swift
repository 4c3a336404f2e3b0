import GRPCCore

/// A bound resource as the node that holds it describes it to the others: what routing on
/// another node needs (RFC 6121 §8.5: availability and priority; roster pushes; carbons).
public struct SessionRecord: Sendable, Equatable {
    /// The full JID, as text (parsed again by the receiver, which trusts nothing).
    public var jid: String
    /// When it was bound (milliseconds since 1970): of two nodes that bound the same full
    /// JID at once, the later bind wins (see ``SessionRecord/wins(over:)``).
    public var boundAt: Int64
    /// The last available presence it broadcast, serialized; nil when unavailable.
    public var presence: String?
    public var priority: Int
    public var interestedInRoster: Bool
    public var carbons: Bool

    public init(jid: String, boundAt: Int64, presence: String?, priority: Int, interestedInRoster: Bool, carbons: Bool) {
        self.jid = jid
        self.boundAt = boundAt
        self.presence = presence
        self.priority = priority
        self.interestedInRoster = interestedInRoster
        self.carbons = carbons
    }
}

/// A session moving to another node by XEP-0198 resumption: what the node that held it
/// hands over, so the client's `<resume/>` on the new node loses nothing.
public struct SessionTransfer: Sendable, Equatable {
    public var record: SessionRecord
    /// XEP-0198 counters: stanzas received from the client, sent to it, and acknowledged.
    public var receivedInbound: UInt32
    public var sentOutbound: UInt32
    public var acknowledged: UInt32
    /// Sent to the client and not acknowledged, oldest first, serialized: re-sent after
    /// `<resumed/>`.
    public var unacknowledged: [String]

    public init(record: SessionRecord, receivedInbound: UInt32, sentOutbound: UInt32, acknowledged: UInt32, unacknowledged: [String]) {
        self.record = record
        self.receivedInbound = receivedInbound
        self.sentOutbound = sentOutbound
        self.acknowledged = acknowledged
        self.unacknowledged = unacknowledged
    }
}

/// One message on a node link. The sequenced kinds carry the sender's number for them; the
/// receiver acknowledges what it has handled, and the sender keeps everything unacknowledged
/// to send again after a reconnect or to route again if the receiver dies.
public enum NodeFrame: Sendable, Equatable {
    /// First on every stream, from each side: who it is, which run of it (a restarted node
    /// numbers from 1 again), and which numbering of its frames to the receiver: a node
    /// that counted the receiver as gone and linked again starts a new numbering without
    /// restarting, and the receiver must not take its new frames for ones it has handled.
    case hello(node: String, incarnation: UInt64, numbering: UInt64)
    /// A stanza for a session bound on the receiver, serialized as stored stanzas are.
    case deliver(seq: UInt64, to: String, stanza: String)
    /// A message for a session bound on the receiver that the recipient's archive holds
    /// (XEP-0313). The receiver acknowledges it at once but hands it to the session only
    /// after `released`: once the sender has let it go, so no crash of the receiver can
    /// leave it both with the client and due to be delivered again by the sender. A crash
    /// in between leaves it in the archive, where the client fetches it.
    case deliverArchived(seq: UInt64, to: String, stanza: String)
    /// The sender of this frame has let go every `deliverArchived` up to this number (their
    /// `ack` reached it): the receiver may hand them to their sessions.
    case released(UInt64)
    /// A session of the sender's was bound or changed.
    case session(seq: UInt64, SessionRecord)
    /// A session of the sender's is gone.
    case unbound(seq: UInt64, jid: String)
    /// The receiver must close its session for `jid` with `<conflict/>`: the sender bound the
    /// same full JID and the resource policy replaces the older session (RFC 6120 §7.7.2.2).
    case kick(seq: UInt64, jid: String)
    /// Every sequenced frame up to and including this number was handled.
    case ack(UInt64)
    /// A stanza for a service entity the receiver owns (a group chat room): routed there
    /// as it was on the sender, its `from` already authenticated by the sender.
    case route(seq: UInt64, stanza: String)
    /// A message for a remote domain, for the node holding the federation lease. Unlike
    /// other frames it is not released by a cumulative `ack`: the sender keeps it until
    /// `delivered`, which the holder sends once the peer server has it (its XEP-0198
    /// acknowledgement) or it bounced. A holder that dies therefore loses none: the
    /// sender routes again whatever was not `delivered`.
    case routeRemote(seq: UInt64, stanza: String)
    /// The `routeRemote` frame with this number is in the peer server's hands, or bounced.
    case delivered(UInt64)
    /// A client asks the sender to resume session `previd` of `account` (it acknowledged
    /// `handled` stanzas); whoever holds it hands it over in `resumeAnswer`.
    case resumeRequest(seq: UInt64, request: UInt64, previd: String, account: String, handled: UInt32)
    /// The answer to request `request`: the session, or nil when the receiver does not hold
    /// it (or it cannot be resumed).
    case resumeAnswer(seq: UInt64, request: UInt64, transfer: SessionTransfer?)

    public var sequence: UInt64? {
        switch self {
        case .deliver(let seq, _, _), .deliverArchived(let seq, _, _), .session(let seq, _), .unbound(let seq, _), .kick(let seq, _), .route(let seq, _), .routeRemote(let seq, _),
             .resumeRequest(let seq, _, _, _, _), .resumeAnswer(let seq, _, _): seq
        case .hello, .ack, .delivered, .released: nil
        }
    }
}

/// What a malformed frame from another node is.
public struct NodeFrameError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
}

/// The wire form of a ``NodeFrame``: a kind byte, then its fields as LEB128 integers and
/// length-prefixed UTF-8. Written by hand rather than generated from a .proto: a dozen small
/// kinds, and no code generator in the build.
public enum NodeFrameCodec {
    /// Refuses a frame claiming more than this (a stanza is capped far below it by the
    /// sending node's own limits).
    public static let maximumFrameBytes = 16 * 1024 * 1024

    public static func encode(_ frame: NodeFrame) -> [UInt8] {
        var out: [UInt8] = []
        switch frame {
        case .hello(let node, let incarnation, let numbering):
            out.append(1); putString(node, &out); putInteger(incarnation, &out); putInteger(numbering, &out)
        case .deliver(let seq, let to, let stanza):
            out.append(2); putInteger(seq, &out); putString(to, &out); putString(stanza, &out)
        case .session(let seq, let record):
            out.append(3); putInteger(seq, &out)
            putRecord(record, &out)
        case .unbound(let seq, let jid):
            out.append(4); putInteger(seq, &out); putString(jid, &out)
        case .kick(let seq, let jid):
            out.append(5); putInteger(seq, &out); putString(jid, &out)
        case .ack(let seq):
            out.append(6); putInteger(seq, &out)
        case .route(let seq, let stanza):
            out.append(7); putInteger(seq, &out); putString(stanza, &out)
        case .routeRemote(let seq, let stanza):
            out.append(8); putInteger(seq, &out); putString(stanza, &out)
        case .delivered(let seq):
            out.append(9); putInteger(seq, &out)
        case .deliverArchived(let seq, let to, let stanza):
            out.append(12); putInteger(seq, &out); putString(to, &out); putString(stanza, &out)
        case .released(let seq):
            out.append(13); putInteger(seq, &out)
        case .resumeRequest(let seq, let request, let previd, let account, let handled):
            out.append(10); putInteger(seq, &out); putInteger(request, &out); putString(previd, &out); putString(account, &out)
            putInteger(UInt64(handled), &out)
        case .resumeAnswer(let seq, let request, let transfer):
            out.append(11); putInteger(seq, &out); putInteger(request, &out)
            if let transfer {
                out.append(1)
                putRecord(transfer.record, &out)
                putInteger(UInt64(transfer.receivedInbound), &out)
                putInteger(UInt64(transfer.sentOutbound), &out)
                putInteger(UInt64(transfer.acknowledged), &out)
                putInteger(UInt64(transfer.unacknowledged.count), &out)
                for stanza in transfer.unacknowledged { putString(stanza, &out) }
            } else {
                out.append(0)
            }
        }
        return out
    }

    public static func decode(_ bytes: some Collection<UInt8>) throws(NodeFrameError) -> NodeFrame {
        guard bytes.count <= maximumFrameBytes else { throw NodeFrameError(description: "frame of \(bytes.count) bytes") }
        var reader = Reader(bytes: Array(bytes))
        let kind = try reader.byte()
        let frame: NodeFrame
        switch kind {
        case 1:
            frame = .hello(node: try reader.string(), incarnation: try reader.integer(), numbering: try reader.integer())
        case 2:
            frame = .deliver(seq: try reader.integer(), to: try reader.string(), stanza: try reader.string())
        case 3:
            let seq = try reader.integer()
            frame = .session(seq: seq, try reader.record())
        case 4:
            frame = .unbound(seq: try reader.integer(), jid: try reader.string())
        case 5:
            frame = .kick(seq: try reader.integer(), jid: try reader.string())
        case 6:
            frame = .ack(try reader.integer())
        case 7:
            frame = .route(seq: try reader.integer(), stanza: try reader.string())
        case 8:
            frame = .routeRemote(seq: try reader.integer(), stanza: try reader.string())
        case 9:
            frame = .delivered(try reader.integer())
        case 12:
            frame = .deliverArchived(seq: try reader.integer(), to: try reader.string(), stanza: try reader.string())
        case 13:
            frame = .released(try reader.integer())
        case 10:
            frame = .resumeRequest(seq: try reader.integer(), request: try reader.integer(), previd: try reader.string(), account: try reader.string(),
                                   handled: try reader.counter())
        case 11:
            let seq = try reader.integer()
            let request = try reader.integer()
            var transfer: SessionTransfer?
            if try reader.byte() == 1 {
                let record = try reader.record()
                let received = try reader.counter()
                let sent = try reader.counter()
                let acknowledged = try reader.counter()
                let count = try reader.integer()
                // Each stanza takes at least one byte: a count beyond what is left is a lie.
                guard count <= UInt64(reader.remaining) else { throw NodeFrameError(description: "\(count) stanzas in \(reader.remaining) bytes") }
                var stanzas: [String] = []
                for _ in 0..<count { stanzas.append(try reader.string()) }
                transfer = SessionTransfer(record: record, receivedInbound: received, sentOutbound: sent, acknowledged: acknowledged, unacknowledged: stanzas)
            }
            frame = .resumeAnswer(seq: seq, request: request, transfer: transfer)
        default:
            throw NodeFrameError(description: "unknown frame kind \(kind)")
        }
        guard reader.atEnd else { throw NodeFrameError(description: "trailing bytes after frame kind \(kind)") }
        return frame
    }

    private static func putInteger(_ value: UInt64, _ out: inout [UInt8]) {
        var value = value
        while value >= 0x80 {
            out.append(UInt8(value & 0x7F) | 0x80)
            value >>= 7
        }
        out.append(UInt8(value))
    }

    private static func putRecord(_ record: SessionRecord, _ out: inout [UInt8]) {
        putString(record.jid, &out)
        putInteger(UInt64(bitPattern: record.boundAt), &out)
        if let presence = record.presence { out.append(1); putString(presence, &out) } else { out.append(0) }
        putInteger(UInt64(bitPattern: Int64(record.priority)), &out)
        out.append((record.interestedInRoster ? 1 : 0) | (record.carbons ? 2 : 0))
    }

    private static func putString(_ value: String, _ out: inout [UInt8]) {
        let utf8 = Array(value.utf8)
        putInteger(UInt64(utf8.count), &out)
        out.append(contentsOf: utf8)
    }

    private struct Reader {
        let bytes: [UInt8]
        var offset = 0

        var atEnd: Bool { offset == bytes.count }
        var remaining: Int { bytes.count - offset }

        mutating func counter() throws(NodeFrameError) -> UInt32 {
            let value = try integer()
            guard value <= UInt64(UInt32.max) else { throw NodeFrameError(description: "counter \(value)") }
            return UInt32(value)
        }

        mutating func record() throws(NodeFrameError) -> SessionRecord {
            let jid = try string()
            let boundAt = Int64(bitPattern: try integer())
            let presence: String? = try byte() == 1 ? try string() : nil
            let priority = Int64(bitPattern: try integer())
            guard (-128...127).contains(priority) else { throw NodeFrameError(description: "priority \(priority)") }
            let flags = try byte()
            return SessionRecord(jid: jid, boundAt: boundAt, presence: presence, priority: Int(priority),
                                 interestedInRoster: flags & 1 != 0, carbons: flags & 2 != 0)
        }

        mutating func byte() throws(NodeFrameError) -> UInt8 {
            guard offset < bytes.count else { throw NodeFrameError(description: "truncated frame") }
            defer { offset += 1 }
            return bytes[offset]
        }

        mutating func integer() throws(NodeFrameError) -> UInt64 {
            var result: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                let byte = try byte()
                guard shift < 64, !(shift == 63 && byte > 1) else { throw NodeFrameError(description: "integer overflow") }
                result |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return result }
                shift += 7
            }
        }

        mutating func string() throws(NodeFrameError) -> String {
            let length = try integer()
            guard length <= UInt64(bytes.count - offset) else { throw NodeFrameError(description: "string of \(length) bytes past the end") }
            let end = offset + Int(length)
            defer { offset = end }
            guard let text = String(validating: bytes[offset..<end], as: UTF8.self) else { throw NodeFrameError(description: "string is not UTF-8") }
            return text
        }
    }
}

extension SessionRecord {
    /// Of two binds of one full JID on two nodes, which stays: the later, and on a tie the
    /// node whose name sorts last. Both nodes apply the same rule, so exactly one session
    /// survives whichever record each sees first.
    public func wins(over other: SessionRecord, myNode: String, otherNode: String) -> Bool {
        if boundAt != other.boundAt { return boundAt > other.boundAt }
        return myNode > otherNode
    }
}

/// The node-link RPC: one bidirectional stream of ``NodeFrame``s per node pair.
enum NodeLinkRPC {
    static let method = MethodDescriptor(fullyQualifiedService: "braid.cluster.NodeLink", method: "Exchange", type: .bidirectionalStreaming)

    struct Serializer: MessageSerializer {
        func serialize<Bytes: GRPCContiguousBytes>(_ message: NodeFrame) throws -> Bytes {
            Bytes(NodeFrameCodec.encode(message))
        }
    }

    struct Deserializer: MessageDeserializer {
        func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws -> NodeFrame {
            let bytes = serializedMessageBytes.withUnsafeBytes { Array($0) }
            return try NodeFrameCodec.decode(bytes)
        }
    }
}
