import Logging
import NIOCore
import Synchronization
import XMPPCore
import XMPPStream

/// What a session needs from the server when it ends or cannot deliver.
public protocol SessionOwner: AnyObject, Sendable {
    /// The session is gone for good (closed, replaced, or its resumption window expired).
    /// `undelivered` holds the stanzas sent to it that the client never acknowledged, in
    /// order; the owner stores or bounces them so nothing is lost (XEP-0198 §4, RFC 6120 §10).
    func sessionEnded(_ session: ClientSession, undelivered: [XMLElement]) async

    /// An inbound stanza from the client, in order.
    func process(_ element: XMLElement, from session: ClientSession) async
}

/// Where a session bound on another node of a cluster is reached: what is delivered to its
/// local stand-in goes over the node link.
public protocol RemoteSessionLink: Sendable {
    /// The node that holds the session.
    var node: String { get }
    func forward(_ element: XMLElement, to session: ClientSession)
    /// Asks the node to close the session with `<conflict/>` (replaced by a bind here).
    func replace(_ session: ClientSession)
}

/// One bound resource of an account: its outbound path, its XEP-0198 state, and the queue of
/// stanzas it sent that are waiting to be processed in order (RFC 6120 §10.1).
///
/// Mutable state is confined to ``loop``, the event loop of the connection that bound (or
/// resumed) it; every public method may be called from any thread and hops there.
public final class ClientSession: Sendable {
    /// A random identifier, also the XEP-0198 resumption id.
    public let id: String
    /// The full JID.
    public let jid: JID
    public let loop: any EventLoop
    let logger: Logger
    private let state: NIOLoopBoundBox<State>
    private let inbound: AsyncStream<InboundStanza>.Continuation
    private let inboundStream: AsyncStream<InboundStanza>
    /// Stanzas received but not processed yet; reading pauses above a high-water mark.
    private let pendingInbound = Atomic<Int>(0)
    /// The connection is gone and the session waits for the client to resume it (XEP-0198):
    /// what is sent to it now reaches no device until then (push, XEP-0357, wakes it).
    private let waitingForResumption = Atomic<Bool>(false)
    public var isWaitingForResumption: Bool { waitingForResumption.load(ordering: .relaxed) }
    let settings: Settings
    /// Set on the stand-in for a session bound on another node of a cluster (the session
    /// directory's entry here): delivering forwards to that node; it has no connection, no
    /// XEP-0198 state and never ends on its own.
    public let remote: (any RemoteSessionLink)?

    struct Settings: Sendable {
        var resumeTimeout: TimeAmount
        var maxUnacked: Int
        var metrics: ServerMetrics
        var clock: SessionClock = .system
    }

    struct State {
        var connection: (any Channel)?
        var owner: (any SessionOwner)?
        var streamManagement: StreamManagementState?
        /// Ended sessions deliver nothing; anything sent to them goes back to the owner.
        var ended = false
        /// Set when the session was handed to a resumed connection: ending it must not
        /// touch presence or stored stanzas.
        var movedToResumption = false
        var resumeTimer: SessionClock.Timer?
        var ackRequestTimer: SessionClock.Timer?
        var readingPaused = false
        /// XEP-0352: the client said it is inactive; what can wait is held back.
        var inactive = false
        /// Held while inactive, oldest first; one entry per key (a newer presence from the
        /// same contact replaces the older one, which no longer matters).
        var held: [(key: String, element: XMLElement)] = []
    }

    /// The most stanzas held for an inactive client before they are sent anyway.
    static let maxHeld = 500

    /// XEP-0198 bookkeeping.
    struct StreamManagementState {
        var resumable: Bool
        /// Stanzas received from the client since enabling: the `h` of `<resumed/>` (what is
        /// still being processed then is processed all the same, by this process).
        var receivedInbound: UInt32 = 0
        /// Of those, the ones processed (routed, stored, archived): the `h` of `<a/>`. An
        /// acknowledgement hands the stanzas over for good (XEP-0198 §4), so it waits for
        /// that work: a crash right after it loses nothing that was acknowledged.
        var handledInbound: UInt32 = 0
        /// An `<r/>` that came while stanzas before it were still being processed: answered
        /// when processing reaches this count.
        var ackDueAt: UInt32?
        /// Stanzas sent to the client since enabling.
        var sentOutbound: UInt32 = 0
        /// The `h` of the last acknowledgement from the client.
        var acknowledged: UInt32 = 0
        /// Sent and not yet acknowledged, oldest first.
        var unacked: [XMLElement] = []
        var sentSinceRequest = 0
    }

    init(id: String, jid: JID, channel: any Channel, owner: any SessionOwner, settings: Settings, logger: Logger) {
        self.id = id
        self.jid = jid
        self.loop = channel.eventLoop
        self.settings = settings
        var logger = logger
        logger[metadataKey: "jid"] = "\(jid)"
        self.logger = logger
        state = NIOLoopBoundBox(State(connection: channel, owner: owner), eventLoop: channel.eventLoop)
        (inboundStream, inbound) = AsyncStream.makeStream(of: InboundStanza.self)
        remote = nil
    }

    /// The stand-in for `jid`, bound on another node of a cluster.
    init(remoteJID jid: JID, link: any RemoteSessionLink, loop: any EventLoop, settings: Settings, logger: Logger) {
        id = "remote:\(link.node)"
        self.jid = jid
        self.loop = loop
        self.settings = settings
        var logger = logger
        logger[metadataKey: "jid"] = "\(jid)"
        logger[metadataKey: "node"] = "\(link.node)"
        self.logger = logger
        // Made off the loop (by the cluster's tasks), so the value is sent in.
        state = NIOLoopBoundBox.makeBoxSendingValue(State(connection: nil, owner: nil), as: State.self, eventLoop: loop)
        (inboundStream, inbound) = AsyncStream.makeStream(of: InboundStanza.self)
        inbound.finish()
        remote = link
    }

    /// A stanza from the client, and whether XEP-0198 counts it (it arrived after `<enable/>`).
    struct InboundStanza: Sendable {
        var element: XMLElement
        var counted: Bool
    }

    /// Processes inbound stanzas one at a time, in order, until the session ends. The server
    /// runs this in a task per session.
    func runInboundProcessing(owner: any SessionOwner) async {
        for await stanza in inboundStream {
            await owner.process(stanza.element, from: self)
            if stanza.counted { loop.execute { self.inboundHandled() } }
            let remaining = pendingInbound.subtract(1, ordering: .relaxed).newValue
            if remaining == Self.resumeReadingBelow { resumeReading() }
        }
    }

    private static let pauseReadingAbove = 256
    private static let resumeReadingBelow = 64

    // MARK: Inbound (called on the connection's loop by its handler)

    /// A stanza from the client: counted for XEP-0198 and queued for in-order processing.
    func received(_ element: XMLElement) {
        loop.preconditionInEventLoop()
        let counted = state.value.streamManagement != nil
        if counted {
            state.value.streamManagement?.receivedInbound &+= 1
        }
        let queued = pendingInbound.add(1, ordering: .relaxed).newValue
        if queued == Self.pauseReadingAbove, let channel = state.value.connection {
            // Backpressure: stop reading until the processing task catches up.
            state.value.readingPaused = true
            channel.setOption(ChannelOptions.autoRead, value: false).whenFailure { _ in }
        }
        inbound.yield(InboundStanza(element: element, counted: counted))
    }

    /// A counted stanza was processed (routed, stored, archived): it may now be acknowledged,
    /// and an `<r/>` that waited for it is answered.
    private func inboundHandled() {
        guard var sm = state.value.streamManagement else { return }
        sm.handledInbound &+= 1
        var answer: XMLElement?
        if let due = sm.ackDueAt, sm.handledInbound == due {
            sm.ackDueAt = nil
            answer = Self.ack(sm.handledInbound)
        }
        state.value.streamManagement = sm
        if let answer, let channel = state.value.connection {
            channel.writeAndFlush(StreamOutput.element(answer), promise: nil)
        }
    }

    static func ack(_ handled: UInt32) -> XMLElement {
        XMLElement(name: "a", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("h", "\(handled)")])
    }

    private func resumeReading() {
        loop.execute {
            guard self.state.value.readingPaused, let channel = self.state.value.connection else { return }
            self.state.value.readingPaused = false
            channel.setOption(ChannelOptions.autoRead, value: true).whenFailure { _ in }
        }
    }

    // MARK: Outbound (any thread)

    /// Sends a stanza or other first-level element to the client.
    public func deliver(_ element: XMLElement) {
        if let remote {
            remote.forward(element, to: self)
            return
        }
        if loop.inEventLoop {
            deliverOnLoop(element)
        } else {
            loop.execute { self.deliverOnLoop(element) }
        }
    }

    /// XEP-0352: the client becomes inactive (what can wait is held back) or active again
    /// (everything held is sent at once).
    public func setInactive(_ inactive: Bool) {
        loop.execute {
            self.state.value.inactive = inactive
            if !inactive { self.flushHeld() }
        }
    }

    /// What an inactive client does not need at once: presence updates (not subscriptions)
    /// and messages that carry only a chat state. The key says what a newer one replaces.
    static func holdKey(_ element: XMLElement) -> String? {
        switch element.name {
        case "presence":
            let type = element.attribute("type")
            guard type == nil || type == "unavailable" else { return nil }
            return "presence " + (element.attribute("from") ?? "")
        case "message":
            guard element.firstChild(name: "body", namespace: element.namespace) == nil,
                  element.children.contains(where: { node in
                      if case .element(let child) = node { return child.namespace == "http://jabber.org/protocol/chatstates" }
                      return false
                  }),
                  !element.children.contains(where: { node in
                      if case .element(let child) = node { return child.namespace != "http://jabber.org/protocol/chatstates" && child.name != "thread" }
                      return false
                  }) else { return nil }
            return "chatstate " + (element.attribute("from") ?? "")
        default:
            return nil
        }
    }

    private func flushHeld() {
        let held = state.value.held
        guard !held.isEmpty else { return }
        state.value.held = []
        settings.metrics.csiFlushed.increment(by: Int64(held.count))
        for entry in held { sendOnLoop(entry.element) }
        state.value.connection?.flush()
    }

    private func deliverOnLoop(_ element: XMLElement) {
        if state.value.inactive, !state.value.ended {
            if let key = Self.holdKey(element) {
                state.value.held.removeAll { $0.key == key }
                state.value.held.append((key, element))
                settings.metrics.csiHeld.increment()
                if state.value.held.count > Self.maxHeld { flushHeld() }
                return
            }
            // Something that matters: what was held goes first, so the order stays.
            flushHeld()
        }
        sendOnLoop(element)
    }

    private func sendOnLoop(_ element: XMLElement) {
        if state.value.ended {
            // Sent to a session that is gone: hand it back so it is stored or bounced.
            let owner = state.value.owner
            Task { await owner?.sessionEnded(self, undelivered: [element]) }
            return
        }
        let isStanza = Stanza(element) != nil
        var requestAck = false
        let managed = state.value.streamManagement != nil
        if isStanza, managed {
            // In place (the box yields its value): a copy of the state would make the queue of
            // unacknowledged stanzas shared, and the append would copy all of it.
            state.value.streamManagement?.sentOutbound &+= 1
            state.value.streamManagement?.unacked.append(element)
            state.value.streamManagement?.sentSinceRequest += 1
            if let unacknowledged = state.value.streamManagement?.unacked.count, unacknowledged > settings.maxUnacked {
                logger.warning("client does not acknowledge stanzas; closing", metadata: ["unacked": "\(unacknowledged)"])
                closeWithError(StreamError(.resourceConstraint, text: "too many unacknowledged stanzas"))
                return
            }
            requestAck = (state.value.streamManagement?.sentSinceRequest ?? 0) >= 5
        }
        guard let channel = state.value.connection else { return }
        channel.write(StreamOutput.element(element), promise: nil)
        if isStanza, let kind = StanzaKind(rawValue: element.name) {
            settings.metrics.stanzasOut[kind]?.increment()
        }
        if requestAck {
            sendAckRequest(on: channel)
        } else if isStanza, managed {
            scheduleAckRequest()
        }
        channel.flush()
    }

    private func sendAckRequest(on channel: any Channel) {
        state.value.streamManagement?.sentSinceRequest = 0
        state.value.ackRequestTimer?.cancel()
        state.value.ackRequestTimer = nil
        channel.write(StreamOutput.element(XMLElement(name: "r", namespace: XMLNamespace.streamManagement)), promise: nil)
    }

    /// Asks for an acknowledgement shortly after a quiet spell, so unacknowledged stanzas do
    /// not linger until the next burst.
    private func scheduleAckRequest() {
        guard state.value.ackRequestTimer == nil else { return }
        state.value.ackRequestTimer = settings.clock.schedule(on: loop, in: .seconds(2)) {
            self.state.value.ackRequestTimer = nil
            guard let channel = self.state.value.connection, let sm = self.state.value.streamManagement, !sm.unacked.isEmpty, sm.sentSinceRequest > 0 else { return }
            self.sendAckRequest(on: channel)
            channel.flush()
        }
    }

    // MARK: XEP-0198 (on the loop)

    /// Handles `<enable/>`, `<r/>` and `<a/>`. Returns an element to send back, if any.
    func streamManagementElement(_ element: XMLElement, resumptionEnabled: Bool) -> StreamManagementOutcome {
        loop.preconditionInEventLoop()
        switch element.name {
        case "enable":
            guard state.value.streamManagement == nil else {
                return .reply(Self.smFailed(.unexpectedRequest))
            }
            let wantsResume = element.attribute("resume").map { $0 == "true" || $0 == "1" } ?? false
            let resumable = wantsResume && resumptionEnabled
            state.value.streamManagement = StreamManagementState(resumable: resumable)
            var attributes = [XMLAttribute("id", id)]
            if resumable {
                attributes.append(XMLAttribute("resume", "true"))
                attributes.append(XMLAttribute("max", "\(settings.resumeTimeout.nanoseconds / 1_000_000_000)"))
            }
            return .enabled(XMLElement(name: "enabled", namespace: XMLNamespace.streamManagement, attributes: attributes), resumable: resumable)
        case "r":
            guard var sm = state.value.streamManagement else { return .reply(Self.smFailed(.unexpectedRequest)) }
            guard sm.handledInbound != sm.receivedInbound else { return .reply(Self.ack(sm.handledInbound)) }
            sm.ackDueAt = sm.receivedInbound
            state.value.streamManagement = sm
            return .none
        case "a":
            guard let value = element.attribute("h").flatMap(UInt32.init) else {
                return .streamError(StreamError(.undefinedCondition, text: "invalid h"))
            }
            guard acknowledge(value) else {
                return .streamError(StreamError(.undefinedCondition, text: "h is larger than the number of stanzas sent"))
            }
            return .none
        default:
            return .reply(Self.smFailed(.featureNotImplemented))
        }
    }

    enum StreamManagementOutcome {
        case none
        case reply(XMLElement)
        case enabled(XMLElement, resumable: Bool)
        case streamError(StreamError)
    }

    /// Drops the stanzas the client acknowledged. False if it acknowledged more than we sent.
    private func acknowledge(_ handled: UInt32) -> Bool {
        guard let acknowledged = state.value.streamManagement?.acknowledged,
              let unacknowledged = state.value.streamManagement?.unacked.count else { return true }
        let newlyAcknowledged = handled &- acknowledged
        guard newlyAcknowledged <= UInt32(unacknowledged) else { return false }
        // In place, as when sending: a copy would duplicate the whole queue.
        state.value.streamManagement?.unacked.removeFirst(Int(newlyAcknowledged))
        state.value.streamManagement?.acknowledged = handled
        return true
    }

    static func smFailed(_ condition: StanzaError.Condition) -> XMLElement {
        XMLElement(name: "failed", namespace: XMLNamespace.streamManagement, children: [
            .element(XMLElement(name: condition.rawValue, namespace: XMLNamespace.stanzaErrors)),
        ])
    }

    // MARK: Lifecycle

    /// The connection is gone. A resumable session waits to be resumed; any other ends.
    func connectionLost() {
        loop.preconditionInEventLoop()
        guard !state.value.ended, state.value.connection != nil else { return }
        state.value.connection = nil
        state.value.ackRequestTimer?.cancel()
        state.value.ackRequestTimer = nil
        if state.value.streamManagement?.resumable == true {
            logger.debug("connection lost; waiting for resumption", metadata: ["seconds": "\(settings.resumeTimeout.nanoseconds / 1_000_000_000)"])
            settings.metrics.smAwaitingResumption.increment()
            waitingForResumption.store(true, ordering: .relaxed)
            state.value.resumeTimer = settings.clock.schedule(on: loop, in: settings.resumeTimeout) {
                self.logger.debug("resumption window expired")
                self.end()
            }
        } else {
            end()
        }
    }

    /// Ends the session for good: no resumption, undelivered stanzas go back to the owner.
    func end() {
        if !loop.inEventLoop {
            loop.execute { self.end() }
            return
        }
        guard !state.value.ended else { return }
        state.value.ended = true
        state.value.resumeTimer?.cancel()
        state.value.ackRequestTimer?.cancel()
        inbound.finish()
        let undelivered = state.value.streamManagement?.unacked ?? []
        state.value.streamManagement?.unacked = []
        let moved = state.value.movedToResumption
        let owner = state.value.owner
        state.value.connection = nil
        if moved { return }
        Task { await owner?.sessionEnded(self, undelivered: undelivered) }
    }

    /// Closes the connection with a stream error and ends the session (no resumption).
    public func closeWithError(_ error: StreamError) {
        if let remote {
            // Only a replacing bind closes another node's session from here.
            remote.replace(self)
            return
        }
        if !loop.inEventLoop {
            loop.execute { self.closeWithError(error) }
            return
        }
        if let channel = state.value.connection {
            settings.metrics.streamErrorSent(error.condition, listener: "c2s")
            channel.writeAndFlush(StreamOutput.error(error)).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
        // A stream error is final: the session must not wait for resumption (XEP-0198 §5).
        state.value.streamManagement?.resumable = false
        end()
    }

    /// Whether the session can be resumed by `account` right now.
    var isResumable: Bool {
        loop.preconditionInEventLoop()
        return !state.value.ended && state.value.streamManagement?.resumable == true
    }

    /// Hands this session's XEP-0198 state to a resuming connection: applies the client's
    /// acknowledgement, stops the old connection and marks this object as moved, so ending
    /// it has no side effects. Returns nil if it cannot be resumed or `handled` is invalid.
    func takeOverForResumption(handled: UInt32) -> StreamManagementState? {
        loop.preconditionInEventLoop()
        guard !state.value.ended, state.value.streamManagement?.resumable == true else { return nil }
        guard acknowledge(handled), let sm = state.value.streamManagement else { return nil }
        if let old = state.value.connection {
            // The old stream may still look open to us; the client has left it.
            old.close(promise: nil)
        }
        state.value.connection = nil
        state.value.movedToResumption = true
        end()
        return sm
    }

    /// Installs resumed XEP-0198 state on a new session and re-sends what was unacknowledged.
    /// Returns the `<resumed/>` element, which the handler sends first.
    func adoptResumedState(_ sm: StreamManagementState) -> XMLElement {
        loop.preconditionInEventLoop()
        var adopted = sm
        adopted.sentSinceRequest = 0
        // What the old session still processes is this process's to finish; the new one
        // counts on from everything received.
        adopted.handledInbound = adopted.receivedInbound
        adopted.ackDueAt = nil
        state.value.streamManagement = adopted
        return XMLElement(name: "resumed", namespace: XMLNamespace.streamManagement, attributes: [
            XMLAttribute("h", "\(sm.receivedInbound)"), XMLAttribute("previd", id),
        ])
    }

    /// Re-sends every unacknowledged stanza after `<resumed/>` (XEP-0198 §5).
    func retransmitUnacknowledged() {
        loop.preconditionInEventLoop()
        guard let channel = state.value.connection, let sm = state.value.streamManagement else { return }
        for element in sm.unacked {
            channel.write(StreamOutput.element(element), promise: nil)
        }
        if !sm.unacked.isEmpty { sendAckRequest(on: channel) }
        channel.flush()
    }
}
