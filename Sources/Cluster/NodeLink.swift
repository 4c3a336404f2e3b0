import Synchronization

/// The state of this node's link to one other node, whichever side dialed: the numbering of
/// what this node sent, what the other has not acknowledged yet, what this node has handled
/// of the other's frames, and the stream in use now (none while reconnecting).
///
/// Everything unacknowledged is sent again on the next stream (the receiver drops what it
/// already handled, by number), and handed back to the router if the other node dies: a
/// stanza given to a node link is delivered, routed again, or bounced, never lost silently.
final class NodeLink: Sendable {
    let peer: String
    /// This link's numbering of frames, told in hello: a new link to the same node (after
    /// counting it gone) numbers from 1 again under a new value.
    let numbering = UInt64.random(in: 1...UInt64.max)

    struct State {
        var nextSequence: UInt64 = 1
        var unacknowledged: [(sequence: UInt64, frame: NodeFrame)] = []
        var writer: AsyncStream<NodeFrame>.Continuation?
        /// The run of the other node, and its numbering, whose frames `lastHandled` counts.
        var peerIncarnation: UInt64?
        var peerNumbering: UInt64?
        var lastHandled: UInt64 = 0
        var framesSent: UInt64 = 0
        var framesReceived: UInt64 = 0
        var closed = false
        /// For `deliver` frames of a message sent to several resources at once: the other
        /// resources that got it (kept here, never sent), so that a copy lost with this node
        /// is not delivered to them a second time.
        var copies: [UInt64: [String]] = [:]
        /// Counts streams attached, so a stream that ends detaches only itself.
        var streamToken: UInt64 = 0
        /// The other node's `deliverArchived` frames, acknowledged and waiting for its
        /// `released` (or the end of the stream) before they go to their sessions.
        var held: [(sequence: UInt64, to: String, stanza: String)] = []
    }

    private let state = Mutex(State())
    private let maximumQueued: Int

    init(peer: String, maximumQueued: Int) {
        self.peer = peer
        self.maximumQueued = maximumQueued
    }

    enum SendOutcome: Equatable {
        case queued
        /// Too much is waiting for this node, or the link was closed for good.
        case refused
    }

    /// Numbers `make`'s frame and sends it now, or when the link is back.
    func send(copies: [String] = [], _ make: (UInt64) -> NodeFrame) -> SendOutcome {
        state.withLock { state in
            guard !state.closed, state.unacknowledged.count < maximumQueued else { return .refused }
            let sequence = state.nextSequence
            state.nextSequence += 1
            let frame = make(sequence)
            state.unacknowledged.append((sequence, frame))
            if !copies.isEmpty { state.copies[sequence] = copies }
            if let writer = state.writer {
                writer.yield(frame)
                state.framesSent += 1
            }
            return .queued
        }
    }

    /// Sends a frame that is not numbered (an acknowledgement) if a stream is up.
    func sendUnsequenced(_ frame: NodeFrame) {
        state.withLock { state in
            if let writer = state.writer {
                writer.yield(frame)
            }
        }
    }

    /// A new stream to the other node: it replaces the old one, and everything
    /// unacknowledged goes out on it again, after `first`. Returns the stream's token for
    /// ``detach(token:)``.
    func attach(writer: AsyncStream<NodeFrame>.Continuation, first: NodeFrame) -> UInt64 {
        let (old, token): (AsyncStream<NodeFrame>.Continuation?, UInt64) = state.withLock { state in
            let old = state.writer
            state.writer = writer
            state.streamToken += 1
            writer.yield(first)
            for (_, frame) in state.unacknowledged {
                writer.yield(frame)
                state.framesSent += 1
            }
            return (old, state.streamToken)
        }
        old?.finish()
        return token
    }

    /// The stream `token` ended; frames wait for the next one. An older stream ending late
    /// changes nothing.
    func detach(token: UInt64) {
        let writer: AsyncStream<NodeFrame>.Continuation? = state.withLock { state in
            guard state.streamToken == token else { return nil }
            defer { state.writer = nil }
            return state.writer
        }
        writer?.finish()
    }

    /// Ends the stream in use (shutdown); frames stay queued.
    func clearStream() {
        let writer: AsyncStream<NodeFrame>.Continuation? = state.withLock { state in
            defer { state.writer = nil }
            return state.writer
        }
        writer?.finish()
    }

    var isConnected: Bool { state.withLock { $0.writer != nil } }

    /// The other node acknowledged everything up to `sequence`: released, except the
    /// frames that wait for `delivered` (``NodeFrame/routeRemote(seq:stanza:)``). Returns
    /// whether a `deliverArchived` was among them (the other node waits for `released`).
    func acknowledged(_ sequence: UInt64) -> Bool {
        state.withLock { state in
            var archived = false
            state.unacknowledged.removeAll { entry in
                if case .routeRemote = entry.frame { return false }
                guard entry.sequence <= sequence else { return false }
                if case .deliverArchived = entry.frame { archived = true }
                return true
            }
            if !state.copies.isEmpty { state.copies = state.copies.filter { $0.key > sequence } }
            return archived
        }
    }

    /// Keeps the other node's `deliverArchived` frame until ``takeHeld(upTo:)``.
    func hold(_ sequence: UInt64, to: String, stanza: String) {
        state.withLock { $0.held.append((sequence, to, stanza)) }
    }

    /// The held deliveries numbered up to `sequence`, oldest first; they are no longer held.
    func takeHeld(upTo sequence: UInt64 = .max) -> [(to: String, stanza: String)] {
        state.withLock { state in
            guard !state.held.isEmpty else { return [] }
            let due = state.held.prefix { $0.sequence <= sequence }
            state.held.removeFirst(due.count)
            return due.map { ($0.to, $0.stanza) }
        }
    }

    /// The other node says the peer server has the `routeRemote` frame `sequence`.
    func delivered(_ sequence: UInt64) {
        state.withLock { state in
            state.unacknowledged.removeAll { $0.sequence == sequence }
        }
    }

    enum Receipt: Equatable {
        case handle
        /// Sent again after a reconnect and handled already: acknowledge, do not handle.
        case duplicate
    }

    /// The other node said which run it is and which numbering it uses; either changing
    /// starts the count of handled frames afresh. Returns true when this is a different run
    /// than the one seen before (the other node restarted).
    func peerIs(incarnation: UInt64, numbering: UInt64) -> Bool {
        state.withLock { state in
            let restarted = state.peerIncarnation != nil && state.peerIncarnation != incarnation
            if state.peerIncarnation != incarnation || state.peerNumbering != numbering {
                state.peerIncarnation = incarnation
                state.peerNumbering = numbering
                state.lastHandled = 0
            }
            return restarted
        }
    }

    /// Whether the other node is known to be this run (for the restart check before it is
    /// recorded).
    func knowsPeer(incarnation: UInt64) -> Bool? {
        state.withLock { state in state.peerIncarnation.map { $0 == incarnation } }
    }

    func receiving(_ sequence: UInt64) -> Receipt {
        state.withLock { state in
            state.framesReceived += 1
            return sequence <= state.lastHandled ? .duplicate : .handle
        }
    }

    func handled(_ sequence: UInt64) {
        state.withLock { state in
            state.lastHandled = max(state.lastHandled, sequence)
        }
    }

    var lastHandled: UInt64 { state.withLock { $0.lastHandled } }

    /// Closes the link for good (the other node died or left) and returns what it never
    /// acknowledged, oldest first.
    func close() -> [(frame: NodeFrame, copies: [String])] {
        let (writer, frames) = state.withLock { state -> (AsyncStream<NodeFrame>.Continuation?, [(frame: NodeFrame, copies: [String])]) in
            state.closed = true
            let frames = state.unacknowledged.map { (frame: $0.frame, copies: state.copies[$0.sequence] ?? []) }
            state.unacknowledged = []
            state.copies = [:]
            defer { state.writer = nil }
            return (state.writer, frames)
        }
        writer?.finish()
        return frames
    }

    struct Snapshot: Sendable {
        var peer: String
        var connected: Bool
        var unacknowledged: Int
        var framesSent: UInt64
        var framesReceived: UInt64
    }

    var snapshot: Snapshot {
        state.withLock { Snapshot(peer: peer, connected: $0.writer != nil, unacknowledged: $0.unacknowledged.count,
                                  framesSent: $0.framesSent, framesReceived: $0.framesReceived) }
    }
}
