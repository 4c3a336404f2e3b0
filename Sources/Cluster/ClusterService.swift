import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Metrics
import NIOCore
import Storage
import Synchronization

/// A stanza sent to a session on a node that died before acknowledging it.
public struct UndeliveredStanza: Sendable {
    public var to: String
    public var stanza: String
    /// The other resources that got the same message (one sent to a bare JID): if any of
    /// them is still there, the account has it, and it is not delivered again.
    public var copies: [String]
}

/// What the cluster needs from the server it is part of. Implemented by the server's bridge
/// (Server's `ClusterBridge`), which owns sessions and routing.
public protocol ClusterHost: Sendable {
    /// A stanza another node routed to a session bound here.
    func deliverFromNode(to jid: String, stanza: String, node: String) async
    /// Another node's session was bound, or changed its presence or flags.
    func remoteSessionChanged(_ record: SessionRecord, node: String)
    /// Another node's session is gone.
    func remoteSessionGone(jid: String, node: String)
    /// Another node bound `jid` and replaces the session bound here (`<conflict/>`).
    func kickLocalSession(jid: String, node: String)
    /// A stanza for a service entity this node owns, routed by another node.
    func routeFromNode(stanza: String, node: String) async
    /// A message for a remote domain from another node (this node holds the federation
    /// lease): routed, and ``ClusterService/confirmDelivered(_:to:)`` called with `seq`
    /// once the peer server has it or it bounced. `duplicate`: sent again after a reconnect,
    /// already routed; confirm it if that already happened.
    func routeRemoteFromNode(stanza: String, node: String, seq: UInt64, duplicate: Bool) async
    /// A client on another node resumes session `previd` of `account` (XEP-0198): if it is
    /// held here and may be resumed, it ends here without side effects and its state is
    /// returned, to be handed over; else nil.
    func handOverSession(previd: String, account: String, handled: UInt32) async -> SessionTransfer?
    /// A session handed over that no node adopted (its requester gave up waiting): what it
    /// owed the client is handled as undelivered here.
    func orphanedTransfer(_ transfer: SessionTransfer) async
    /// A node died or left: its sessions are gone. `unacknowledged` are the stanzas sent to
    /// it that it never acknowledged, oldest first, to be routed again as undelivered.
    /// `announce`: this node is the one that tells the contacts of those sessions that they
    /// went offline (exactly one live node is).
    /// `rerouted` are stanzas this node had sent it to route (for its rooms, or as the holder
    /// of the federation lease) that it never acknowledged: routed again from the start.
    func nodeGone(_ node: String, unacknowledged: [UndeliveredStanza], rerouted: [String], announce: Bool) async
    /// Every session bound here, for a node that has just linked up.
    func localSessionRecords() -> [SessionRecord]
    /// How many sessions are bound here (for the heartbeat row).
    func localSessionCount() -> Int
    /// How many s2s links this node holds (for the heartbeat row).
    func federationLinkCount() async -> Int
    /// Called at every membership check while the federation lease is wanted: whether this
    /// node holds it now. The holder serves federation (listens for, and dials, peer
    /// servers); the others send their stanzas for remote domains to it.
    func federationLease(held: Bool) async
}

/// One node of a cluster: its membership (heartbeat in PostgreSQL), its node links (a gRPC
/// bidirectional stream to every other live node, mutual TLS), and the directory of which
/// node holds which session (issue 18).
///
/// Of two nodes, the one whose name sorts first dials; the stream then carries frames both
/// ways. A link that breaks is dialed again while the other node's heartbeat is fresh;
/// what was sent meanwhile waits (``NodeLink``). A node whose heartbeat is older than
/// `dead_after_seconds`, or that left, is gone: its sessions are removed and what it never
/// acknowledged is routed again here.
public final class ClusterService: Sendable {
    public let settings: ClusterSettings
    public let nodeName: String
    /// This run of the node: a restarted node is another incarnation, so the others reset
    /// their numbering of its frames.
    public let incarnation: UInt64
    let directory: ClusterDirectory
    private let logger: Logger
    private let host: Mutex<(any ClusterHost)?> = Mutex(nil)
    private let links = Mutex<[String: NodeLink]>([:])
    private let state = Mutex(State())
    private let boundPortBox = Mutex<Int?>(nil)
    private let directoryWriter: AsyncStream<ClusterDirectory.Change>.Continuation
    private let directoryChanges: AsyncStream<ClusterDirectory.Change>
    private let metrics: ClusterMetrics
    private let resumeRequests = Mutex<ResumeRequests>(ResumeRequests())

    struct ResumeRequests {
        var next: UInt64 = 1
        var waiting: [UInt64: (remaining: Set<String>, continuation: CheckedContinuation<(node: String, transfer: SessionTransfer)?, Never>)] = [:]
    }

    struct State {
        var server: GRPCServer<HTTP2ServerTransport.Posix>?
        var tasks: [Task<Void, Never>] = []
        /// Dialing tasks, by the node dialed.
        var dialers: [String: Task<Void, Never>] = [:]
        /// Nodes alive at the last membership check, with their run and address.
        var alive: [String: (incarnation: UInt64, address: String)] = [:]
        var members: [ClusterMember] = []
        var stopping = false
        /// Whether this node competes for the federation lease (federation is enabled).
        var wantsFederationLease = false
        /// The node holding the federation lease, as of the last check.
        var federationHolder: String?
        /// When this node last renewed the lease; past `dead_after_seconds` without a
        /// renewal (the database away) it must assume another node took it.
        var leaseRenewedAt: ContinuousClock.Instant?
        /// After the database was away, nobody is counted dead before this: the other nodes
        /// could not write heartbeats either, and need a full `dead_after_seconds` to show
        /// they are alive.
        var noDeathsBefore: ContinuousClock.Instant?
        /// When the last membership check ended well: a check that comes long after it (the
        /// database answered slowly, or not at all until it came back) means the others'
        /// heartbeats may be stale for the same reason.
        var lastGoodCheck: ContinuousClock.Instant?
        /// This node's s2s links at the last count that answered in time.
        var lastLinkCount = 0
    }

    /// The lease that makes one node at a time the cluster's federation endpoint: one TCP
    /// connection to each peer provider, whichever node a user is on (issue 18).
    public static let federationLeaseName = "s2s"

    public init(settings: ClusterSettings, directory: ClusterDirectory, logger: Logger, metrics: any MetricsFactory = MetricsSystem.factory) {
        self.settings = settings
        nodeName = settings.effectiveNodeName
        // Milliseconds since 1970: a later run has a larger number.
        incarnation = UInt64(max(1, Date().timeIntervalSince1970 * 1000))
        self.directory = directory
        var logger = logger
        logger[metadataKey: "node"] = "\(settings.effectiveNodeName)"
        self.logger = logger
        (directoryChanges, directoryWriter) = AsyncStream.makeStream(of: ClusterDirectory.Change.self)
        self.metrics = ClusterMetrics(factory: metrics)
    }

    public func install(host: any ClusterHost) {
        self.host.withLock { $0 = host }
    }

    /// A secret every node of the cluster shares (the dialback secret), from the database.
    public func sharedSecret(named name: String) async throws -> String {
        try await directory.sharedSecret(name)
    }

    /// Compete for the federation lease (call before ``start()`` when federation is on).
    public func enableFederationLease() {
        state.withLock { $0.wantsFederationLease = true }
    }

    /// The node holding the federation lease, if any.
    public var federationOwner: String? { state.withLock { $0.federationHolder } }

    public var holdsFederationLease: Bool { federationOwner == nodeName }

    private var currentHost: (any ClusterHost)? { host.withLock { $0 } }

    /// The port the node-link listener bound.
    public var boundPort: Int? { boundPortBox.withLock { $0 } }

    /// The address other nodes are told to dial.
    public var advertisedAddress: String {
        if !settings.address.isEmpty { return settings.address }
        var endpoint = ClusterSettings.Endpoint(parsing: settings.listen) ?? .init(host: "127.0.0.1", port: 0)
        if let port = boundPort { endpoint.port = port }
        if endpoint.host == "0.0.0.0" || endpoint.host == "::" { endpoint.host = ProcessInfo.processInfo.hostName }
        return endpoint.description
    }

    // MARK: Lifecycle

    /// Creates the tables, binds the node-link listener, registers, and starts the
    /// heartbeat and membership loop. Throws when the database or the listener fails.
    public func start() async throws {
        guard let listen = ClusterSettings.Endpoint(parsing: settings.listen) else {
            throw ClusterError.configuration("cluster.listen: '\(settings.listen)' is not HOST:PORT")
        }
        try await directory.prepare()
        let transport = HTTP2ServerTransport.Posix(
            address: .ipv4(host: listen.host, port: listen.port),
            transportSecurity: .mTLS(
                certificateChain: [.file(path: settings.tlsCertificateFile, format: .pem)],
                privateKey: .file(path: settings.tlsKeyFile, format: .pem)
            ) { tls in
                tls.trustRoots = .certificates([.file(path: settings.tlsCAFile, format: .pem)])
                tls.clientCertificateVerification = .noHostnameVerification
            })
        var router = RPCRouter<HTTP2ServerTransport.Posix>()
        router.registerHandler(forMethod: NodeLinkRPC.method, deserializer: NodeLinkRPC.Deserializer(), serializer: NodeLinkRPC.Serializer()) { [weak self] request, _ in
            guard let self else { return StreamingServerResponse(error: RPCError(code: .unavailable, message: "node stopping")) }
            return self.accept(request)
        }
        let server = GRPCServer(transport: transport, router: router)
        let serving = Task { [logger] in
            do {
                try await server.serve()
            } catch {
                logger.error("node-link listener stopped", metadata: ["error": "\(error)"])
            }
        }
        guard let address = try await transport.listeningAddress.ipv4 else {
            serving.cancel()
            throw ClusterError.configuration("cluster.listen: could not bind \(listen)")
        }
        boundPortBox.withLock { $0 = address.port }
        try await directory.register(node: nodeName, address: advertisedAddress, incarnation: incarnation)
        // One check before serving: who is alive, and whether this node holds the lease.
        await checkMembership()
        let writer = Task { [weak self] in
            guard let self else { return }
            await self.writeDirectory()
        }
        let membership = Task { [weak self] in
            guard let self else { return }
            await self.runMembership()
        }
        state.withLock {
            $0.server = server
            $0.tasks = [serving, writer, membership]
        }
        logger.notice("cluster node started", metadata: ["address": "\(advertisedAddress)", "incarnation": "\(incarnation)"])
    }

    /// Leaves the cluster: the others drop this node's sessions at once rather than after
    /// the heartbeat timeout. Call after the node's own sessions were closed.
    public func shutdown() async {
        let (server, tasks, dialers) = state.withLock { state in
            state.stopping = true
            defer { state.tasks = []; state.dialers = [:] }
            return (state.server, state.tasks, Array(state.dialers.values))
        }
        directoryWriter.finish()
        do {
            if holdsFederationLease {
                try await directory.releaseLease(Self.federationLeaseName, node: nodeName, incarnation: incarnation)
            }
            try await directory.leave(node: nodeName, incarnation: incarnation)
        } catch {
            logger.warning("could not record leaving the cluster", metadata: ["error": "\(error)"])
        }
        for dialer in dialers { dialer.cancel() }
        for link in links.withLock({ Array($0.values) }) { link.clearStream() }
        server?.beginGracefulShutdown()
        for task in tasks { task.cancel() }
        directory.close()
    }

    // MARK: Sending

    /// Sends a stanza to a session bound on `node`. False when it cannot be queued (the node
    /// is gone or too much waits for it): the caller handles the stanza as undeliverable.
    /// `copies`: the other resources the same message went to, if it was sent to several.
    /// `archived`: the recipient's archive holds the message (XEP-0313), so it is sent as
    /// ``NodeFrame/deliverArchived(seq:to:stanza:)``: lost with a crash rather than doubled.
    public func deliver(stanza: String, to jid: String, on node: String, copies: [String] = [], archived: Bool = false) -> Bool {
        guard let link = link(to: node, create: false) else { return false }
        let sent = link.send(copies: copies) { sequence in
            archived ? .deliverArchived(seq: sequence, to: jid, stanza: stanza) : .deliver(seq: sequence, to: jid, stanza: stanza)
        } == .queued
        if sent { metrics.stanzasForwarded.increment() } else { metrics.stanzasRefused.increment() }
        return sent
    }

    /// Routes a stanza on `node`, the owner of the service entity it is for. False when it
    /// cannot be queued: the caller handles it here.
    public func route(stanza: String, on node: String) -> Bool {
        guard let link = link(to: node, create: false) else { return false }
        let sent = link.send { .route(seq: $0, stanza: stanza) } == .queued
        if sent { metrics.stanzasForwarded.increment() } else { metrics.stanzasRefused.increment() }
        return sent
    }

    /// Sends a message for a remote domain to `node`, the holder of the federation lease;
    /// kept until that node confirms the peer server has it (``NodeFrame/routeRemote(seq:stanza:)``).
    public func routeRemote(stanza: String, on node: String) -> Bool {
        guard let link = link(to: node, create: false) else { return false }
        let sent = link.send { .routeRemote(seq: $0, stanza: stanza) } == .queued
        if sent { metrics.stanzasForwarded.increment() } else { metrics.stanzasRefused.increment() }
        return sent
    }

    /// Finds the node holding session `previd` of `account` and takes it over (XEP-0198
    /// resumption on another node than the one the client was on). Asks every linked node;
    /// at most one holds the session. Nil when none does within `timeout`.
    public func resume(previd: String, account: String, handled: UInt32, timeout: Duration = .seconds(5)) async -> (node: String, transfer: SessionTransfer)? {
        let linked = links.withLock { Array($0.values) }.filter(\.isConnected)
        guard !linked.isEmpty else { return nil }
        let request = resumeRequests.withLock { requests -> UInt64 in
            defer { requests.next += 1 }
            return requests.next
        }
        let timer = Task { [weak self] in
            try? await Task.sleep(for: timeout)
            self?.finishResume(request, with: nil)
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { continuation in
            resumeRequests.withLock { $0.waiting[request] = (Set(linked.map(\.peer)), continuation) }
            var asked = 0
            for link in linked where link.send({ .resumeRequest(seq: $0, request: request, previd: previd, account: account, handled: handled) }) == .queued {
                asked += 1
            }
            if asked == 0 { finishResume(request, with: nil) }
        }
    }

    private func finishResume(_ request: UInt64, with result: (node: String, transfer: SessionTransfer)?) {
        let waiting = resumeRequests.withLock { $0.waiting.removeValue(forKey: request) }
        waiting?.continuation.resume(returning: result)
    }

    private func resumeAnswered(_ request: UInt64, transfer: SessionTransfer?, from peer: String) async {
        if let transfer {
            let taken: Bool = resumeRequests.withLock { requests in
                guard let waiting = requests.waiting.removeValue(forKey: request) else { return false }
                waiting.continuation.resume(returning: (peer, transfer))
                return true
            }
            // Too late: the client was told <failed/>; what the session owed is not lost.
            if !taken { await currentHost?.orphanedTransfer(transfer) }
            return
        }
        let done: Bool = resumeRequests.withLock { requests in
            guard var waiting = requests.waiting[request] else { return false }
            waiting.remaining.remove(peer)
            requests.waiting[request] = waiting
            return waiting.remaining.isEmpty
        }
        if done { finishResume(request, with: nil) }
    }

    /// Tells `node` that its `routeRemote` frame `seq` is in the peer server's hands.
    public func confirmDelivered(_ seq: UInt64, to node: String) {
        link(to: node, create: false)?.sendUnsequenced(.delivered(seq))
    }

    /// The node that owns `key` (a group chat room's bare JID, a service domain): of the
    /// nodes alive at the last membership check, the one with the highest rendezvous score,
    /// so every node agrees without asking, and when a node dies only its keys move.
    public func owner(of key: String) -> String {
        let alive = state.withLock { Array($0.alive.keys) }
        return Self.rendezvousOwner(of: key, among: alive.isEmpty ? [nodeName] : alive)
    }

    static func rendezvousOwner(of key: String, among nodes: [String]) -> String {
        var best: (score: UInt64, node: String)?
        for node in nodes {
            let score = stableHash(node + "\u{0}" + key)
            if best.map({ score > $0.score || (score == $0.score && node > $0.node) }) ?? true { best = (score, node) }
        }
        return best?.node ?? ""
    }

    /// FNV-1a over the UTF-8 bytes, then a SplitMix64 finish: the same on every node and
    /// every run (Swift's `Hasher` is seeded per process, so it cannot be used here).
    static func stableHash(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01B3
        }
        hash ^= hash >> 30
        hash &*= 0xBF58_476D_1CE4_E5B9
        hash ^= hash >> 27
        hash &*= 0x94D0_49BB_1331_11EB
        hash ^= hash >> 31
        return hash
    }

    /// Asks `node` to close its session for `jid` (this node bound it and replaces it).
    public func kick(jid: String, on node: String) {
        _ = link(to: node, create: false)?.send { .kick(seq: $0, jid: jid) }
    }

    /// A session bound here was bound or changed: every other node is told, and the
    /// directory row written.
    public func localSessionChanged(_ record: SessionRecord, isNew: Bool) {
        for link in links.withLock({ Array($0.values) }) {
            _ = link.send { .session(seq: $0, record) }
        }
        if isNew { directoryWriter.yield(.bound(jid: record.jid, node: nodeName)) }
    }

    /// A session bound here is gone.
    public func localSessionGone(jid: String) {
        for link in links.withLock({ Array($0.values) }) {
            _ = link.send { .unbound(seq: $0, jid: jid) }
        }
        directoryWriter.yield(.unbound(jid: jid, node: nodeName))
    }

    // MARK: Status

    public struct LinkStatus: Sendable {
        public var peer: String
        public var connected: Bool
        public var unacknowledged: Int
        public var framesSent: UInt64
        public var framesReceived: UInt64
    }

    public var linkStatus: [LinkStatus] {
        links.withLock { Array($0.values) }.map(\.snapshot).map {
            LinkStatus(peer: $0.peer, connected: $0.connected, unacknowledged: $0.unacknowledged, framesSent: $0.framesSent, framesReceived: $0.framesReceived)
        }.sorted { $0.peer < $1.peer }
    }

    /// The nodes alive at the last membership check, this one included.
    public var aliveNodes: [String] {
        state.withLock { Array($0.alive.keys) }.sorted()
    }

    // MARK: Links

    private func link(to node: String, create: Bool) -> NodeLink? {
        links.withLock { links in
            if let link = links[node] { return link }
            guard create else { return nil }
            let link = NodeLink(peer: node, maximumQueued: settings.maxQueuedFrames)
            links[node] = link
            return link
        }
    }

    /// An inbound stream from a node that dialed this one.
    private func accept(_ request: StreamingServerRequest<NodeFrame>) -> StreamingServerResponse<NodeFrame> {
        StreamingServerResponse { writer in
            do {
                try await self.exchange(inbound: request.messages, write: { try await writer.write($0) }, dialed: nil)
            } catch {
                self.noteLinkError(error, peer: nil)
                throw error
            }
            return [:]
        }
    }

    /// Runs one stream: sends hello, then this node's frames as they come; reads the other
    /// node's frames and handles them, until either side ends it (or this node replaces the
    /// stream, or stops).
    private func exchange(inbound: RPCAsyncSequence<NodeFrame, any Error>, write: @escaping @Sendable (NodeFrame) async throws -> Void,
                          dialed: String?) async throws {
        let (frames, continuation) = AsyncStream.makeStream(of: NodeFrame.self)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                var iterator = inbound.makeAsyncIterator()
                guard case .hello(let peer, let peerIncarnation, let peerNumbering)? = try await iterator.next() else {
                    throw ClusterError.protocolViolation("node link did not start with hello")
                }
                if let dialed, dialed != peer {
                    throw ClusterError.protocolViolation("dialed node \(dialed) answered as \(peer)")
                }
                guard peer != self.nodeName else { throw ClusterError.protocolViolation("a node link to this node itself") }
                guard !self.state.withLock({ $0.stopping }) else { return }
                let (link, token) = await self.linkUp(peer: peer, incarnation: peerIncarnation, numbering: peerNumbering, writer: continuation, dialed: dialed != nil)
                defer {
                    link.detach(token: token)
                    self.logger.info("node link down", metadata: ["peer": "\(peer)"])
                }
                // Frames are handled in order, one at a time: a session's stanzas keep their order.
                do {
                    while let frame = try await iterator.next() {
                        await self.handle(frame, from: peer, link: link)
                    }
                } catch {
                    await self.deliverHeld(link.takeHeld(), from: peer)
                    throw error
                }
                // Held messages whose `released` will not come on this stream: the other
                // node let them go, or will send them again (dropped as already handled).
                await self.deliverHeld(link.takeHeld(), from: peer)
            }
            group.addTask {
                // Ends when the link finishes the writer: replaced by a newer stream, the
                // other node gone, or this node stopping.
                for await frame in frames { try await write(frame) }
            }
            defer {
                group.cancelAll()
                continuation.finish()
            }
            // Either direction ending ends the stream.
            _ = try await group.next()
        }
    }

    /// A stream to `peer` is up: it becomes the link's stream, and what this node holds is
    /// sent after anything unacknowledged (so the latest state is applied last).
    private func linkUp(peer: String, incarnation peerIncarnation: UInt64, numbering peerNumbering: UInt64, writer: AsyncStream<NodeFrame>.Continuation,
                        dialed: Bool) async -> (NodeLink, UInt64) {
        if let known = link(to: peer, create: false), known.knowsPeer(incarnation: peerIncarnation) == false {
            // The other node restarted faster than its heartbeat aged: its earlier run is
            // gone with everything it held.
            await peerGone(peer, reason: "restarted")
        }
        // A link made now (or again, after the restart above).
        let link = self.link(to: peer, create: true) ?? NodeLink(peer: peer, maximumQueued: settings.maxQueuedFrames)
        _ = link.peerIs(incarnation: peerIncarnation, numbering: peerNumbering)
        let token = link.attach(writer: writer, first: .hello(node: nodeName, incarnation: incarnation, numbering: link.numbering))
        metrics.linksConnected.increment()
        logger.info("node link up", metadata: ["peer": "\(peer)", "dialed": "\(dialed)"])
        for record in currentHost?.localSessionRecords() ?? [] {
            _ = link.send { .session(seq: $0, record) }
        }
        return (link, token)
    }

    /// Stops as a crashed node would look to the others: no heartbeat, no goodbye, node
    /// links cut. For tests of what the others do.
    func stopAbruptly() {
        let (server, tasks, dialers) = state.withLock { state in
            state.stopping = true
            defer { state.tasks = []; state.dialers = [:] }
            return (state.server, state.tasks, Array(state.dialers.values))
        }
        for dialer in dialers { dialer.cancel() }
        for task in tasks { task.cancel() }
        server?.beginGracefulShutdown()
        for link in links.withLock({ Array($0.values) }) { link.clearStream() }
    }

    private func handle(_ frame: NodeFrame, from peer: String, link: NodeLink) async {
        if case .ack(let sequence) = frame {
            if link.acknowledged(sequence) {
                // Let go: the other node can hand its held messages to their sessions.
                link.sendUnsequenced(.released(sequence))
            }
            return
        }
        if case .released(let sequence) = frame {
            await deliverHeld(link.takeHeld(upTo: sequence), from: peer)
            return
        }
        if case .hello = frame { return }
        if case .delivered(let sequence) = frame {
            link.delivered(sequence)
            return
        }
        guard let sequence = frame.sequence else { return }
        if link.receiving(sequence) == .duplicate {
            if case .routeRemote(let seq, let stanza) = frame {
                await currentHost?.routeRemoteFromNode(stanza: stanza, node: peer, seq: seq, duplicate: true)
            }
            link.sendUnsequenced(.ack(link.lastHandled))
            return
        }
        let host = currentHost
        switch frame {
        case .deliver(_, let to, let stanza):
            await host?.deliverFromNode(to: to, stanza: stanza, node: peer)
        case .deliverArchived(_, let to, let stanza):
            // Held until the sender has let it go (`released`). Were this node to deliver
            // first and crash before the sender heard the ack, the sender would deliver it
            // again (to another resource, or offline storage): the client would have it
            // twice. Held, a crash before `released` leaves it only in the recipient's
            // archive, which the reconnecting client reads (XEP-0313). One round trip more.
            link.handled(sequence)
            link.hold(sequence, to: to, stanza: stanza)
            link.sendUnsequenced(.ack(sequence))
            return
        case .session(_, let record):
            host?.remoteSessionChanged(record, node: peer)
        case .unbound(_, let jid):
            host?.remoteSessionGone(jid: jid, node: peer)
        case .kick(_, let jid):
            host?.kickLocalSession(jid: jid, node: peer)
        case .route(_, let stanza):
            await host?.routeFromNode(stanza: stanza, node: peer)
        case .routeRemote(let seq, let stanza):
            await host?.routeRemoteFromNode(stanza: stanza, node: peer, seq: seq, duplicate: false)
        case .resumeRequest(_, let request, let previd, let account, let handled):
            let transfer = await host?.handOverSession(previd: previd, account: account, handled: handled)
            if link.send({ .resumeAnswer(seq: $0, request: request, transfer: transfer) }) == .refused, let transfer {
                await host?.orphanedTransfer(transfer)
            }
        case .resumeAnswer(_, let request, let transfer):
            await resumeAnswered(request, transfer: transfer, from: peer)
        case .hello, .ack, .delivered, .released:
            break
        }
        link.handled(sequence)
        link.sendUnsequenced(.ack(sequence))
    }

    private func deliverHeld(_ held: [(to: String, stanza: String)], from peer: String) async {
        for (to, stanza) in held {
            await currentHost?.deliverFromNode(to: to, stanza: stanza, node: peer)
        }
    }

    /// Keeps a stream to `peer` up while it is alive: dials, and dials again after a break.
    private func dial(_ peer: String, address: String) async {
        var backoff: Duration = .milliseconds(100)
        while !Task.isCancelled {
            guard let endpoint = ClusterSettings.Endpoint(parsing: address) else {
                logger.error("a node's address is not HOST:PORT", metadata: ["peer": "\(peer)", "address": "\(address)"])
                return
            }
            do {
                let transport = try HTTP2ClientTransport.Posix(
                    target: .ipv4(address: endpoint.host, port: endpoint.port),
                    transportSecurity: .mTLS(
                        certificateChain: [.file(path: settings.tlsCertificateFile, format: .pem)],
                        privateKey: .file(path: settings.tlsKeyFile, format: .pem)
                    ) { tls in
                        tls.trustRoots = .certificates([.file(path: settings.tlsCAFile, format: .pem)])
                        tls.serverCertificateVerification = .noHostnameVerification
                    })
                try await withGRPCClient(transport: transport) { client in
                    let (requests, requestWriter) = AsyncStream.makeStream(of: NodeFrame.self)
                    let request = StreamingClientRequest<NodeFrame> { writer in
                        for await frame in requests { try await writer.write(frame) }
                    }
                    try await client.bidirectionalStreaming(request: request, descriptor: NodeLinkRPC.method, serializer: NodeLinkRPC.Serializer(),
                                                            deserializer: NodeLinkRPC.Deserializer(), options: .defaults) { response in
                        // The dialing side's hello goes first, on the request stream, with the
                        // numbering of the link its frames will go out on.
                        let numbering = self.link(to: peer, create: true)?.numbering ?? 0
                        requestWriter.yield(.hello(node: self.nodeName, incarnation: self.incarnation, numbering: numbering))
                        try await self.exchange(inbound: response.messages, write: { frame in
                            if case .hello = frame { return }  // sent above already
                            requestWriter.yield(frame)
                        }, dialed: peer)
                        requestWriter.finish()
                    }
                    client.beginGracefulShutdown()
                }
                backoff = .milliseconds(100)
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                noteLinkError(error, peer: peer)
                logger.debug("node link failed; dialing again", metadata: ["peer": "\(peer)", "error": "\(error)"])
            }
            try? await Task.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(2))
        }
    }

    /// A node link that ended on what the other side sent (a malformed frame, a stream
    /// without hello, a node answering under another name): logged and counted. Routine
    /// ends (the other node away, this one stopping) are not.
    private func noteLinkError(_ error: any Error, peer: String?) {
        var cause: (any Error)? = error
        while let current = cause {
            if current is NodeFrameError || current is ClusterError {
                metrics.linkErrors.increment()
                logger.warning("node link ended on bad input from the other node", metadata: ["peer": "\(peer ?? "inbound")", "error": "\(current)"])
                return
            }
            cause = (current as? RPCError)?.cause
        }
    }

    // MARK: Membership

    private func runMembership() async {
        let interval = Duration.milliseconds(Int64(settings.heartbeatIntervalSeconds * 1000))
        while !Task.isCancelled {
            await checkMembership()
            try? await Task.sleep(for: interval)
        }
    }

    /// One heartbeat and one look at the others. Internal so tests can drive it.
    func checkMembership() async {
        // Every step timed: a check that stalls stops the heartbeat, and the others then
        // count this node dead while it serves on. The log line says which step it was.
        var timing = StepTiming()
        defer {
            if timing.total > .seconds(max(2, 2 * settings.heartbeatIntervalSeconds)) {
                metrics.slowMembershipChecks.increment()
                logger.warning("cluster membership check slow", metadata: ["steps": "\(timing.description)"])
            }
        }
        let sessionCount = currentHost?.localSessionCount() ?? 0
        // For operators only (`braid cluster status`): never worth holding the heartbeat for.
        let linkCount: Int
        if let host = currentHost, let count = try? await withDeadline(.seconds(1), { await host.federationLinkCount() }) {
            linkCount = count
            state.withLock { $0.lastLinkCount = count }
        } else {
            linkCount = state.withLock { $0.lastLinkCount }
        }
        timing.step("link count")
        do {
            let registered = try await directory.heartbeat(node: nodeName, incarnation: incarnation, sessions: sessionCount, links: linkCount)
            timing.step("heartbeat")
            if !registered {
                logger.critical("another process registered this node name; check cluster.node_name on every node")
                try await directory.register(node: nodeName, address: advertisedAddress, incarnation: incarnation)
            }
            // The lease before the dead: a dead holder's lease has expired by the time its
            // heartbeat counts as dead, so stanzas routed again below find the new holder.
            try await checkFederationLease()
            timing.step("lease")
            let members = try await directory.members()
            timing.step("members")
            let now = ContinuousClock.now
            let stalled = Duration.milliseconds(Int64((2 * settings.heartbeatIntervalSeconds + 1) * 1000))
            state.withLock { state in
                if let last = state.lastGoodCheck, now - last > stalled {
                    // The database was slow or away for a while without a check failing
                    // outright: the same grace as after a failure.
                    state.noDeathsBefore = max(state.noDeathsBefore ?? now,
                                               now + .milliseconds(Int64((settings.deadAfterSeconds + settings.heartbeatIntervalSeconds) * 1000)))
                }
                state.lastGoodCheck = now
            }
            await apply(members: members)
            timing.step("apply")
            metrics.membershipChecks.increment()
        } catch {
            timing.step("failed")
            // The database away: nodes keep serving what they have, and declare nobody dead
            // on stale information (issue 18: PostgreSQL restarted).
            metrics.membershipFailures.increment()
            logger.warning("cluster membership check failed", metadata: ["error": "\(error)"])
            let grace = ContinuousClock.now + .milliseconds(Int64((settings.deadAfterSeconds + settings.heartbeatIntervalSeconds) * 1000))
            state.withLock { $0.noDeathsBefore = grace }
            await federationLeaseUnconfirmed()
        }
    }

    private func checkFederationLease() async throws {
        guard state.withLock({ $0.wantsFederationLease && !$0.stopping }) else { return }
        let holder = try await directory.acquireLease(Self.federationLeaseName, node: nodeName, incarnation: incarnation, seconds: settings.deadAfterSeconds)
        let changed: Bool = state.withLock { state in
            let changed = state.federationHolder != holder
            state.federationHolder = holder
            if holder == nodeName { state.leaseRenewedAt = .now }
            return changed
        }
        if changed {
            logger.notice("federation lease", metadata: ["holder": "\(holder ?? "none")"])
        }
        await currentHost?.federationLease(held: holder == nodeName)
    }

    /// The lease could not be renewed: past its lifetime, another node may hold it, so
    /// this one stops serving federation rather than risk a second connection.
    private func federationLeaseUnconfirmed() async {
        let lost: Bool = state.withLock { state in
            guard state.wantsFederationLease, state.federationHolder == nodeName, let renewed = state.leaseRenewedAt else { return false }
            guard ContinuousClock.now - renewed > .milliseconds(Int64(settings.deadAfterSeconds * 1000)) else { return false }
            state.federationHolder = nil
            return true
        }
        if lost {
            logger.warning("federation lease not renewed within its lifetime; no longer serving federation")
            await currentHost?.federationLease(held: false)
        }
    }

    private func apply(members: [ClusterMember]) async {
        let deadAfter = settings.deadAfterSeconds
        var nowAlive = Dictionary(uniqueKeysWithValues: members.filter { $0.isAlive(deadAfter: deadAfter) }.map { ($0.name, (incarnation: $0.incarnation, address: $0.address)) })
        let inGrace: Bool = state.withLock { state in
            guard let until = state.noDeathsBefore else { return false }
            if ContinuousClock.now < until { return true }
            state.noDeathsBefore = nil
            return false
        }
        if inGrace {
            // Stale heartbeats right after the database came back prove nothing: whoever was
            // alive stays alive (unless it left, or restarted as another run).
            let before = state.withLock { $0.alive }
            for (name, member) in before where nowAlive[name] == nil {
                if let row = members.first(where: { $0.name == name }), !row.left, row.incarnation == member.incarnation {
                    nowAlive[name] = member
                }
            }
        }
        let (gone, toDial): ([String], [(String, String)]) = state.withLock { state in
            guard !state.stopping else { return ([], []) }
            state.members = members
            var gone: [String] = []
            for (name, before) in state.alive where name != nodeName {
                if let now = nowAlive[name], now.incarnation == before.incarnation { continue }
                gone.append(name)
            }
            state.alive = nowAlive
            var toDial: [(String, String)] = []
            for (name, member) in nowAlive where name > nodeName {
                if gone.contains(name) { state.dialers[name]?.cancel(); state.dialers[name] = nil }
                if state.dialers[name] == nil { toDial.append((name, member.address)) }
            }
            return (gone, toDial)
        }
        for name in gone.sorted() {
            await peerGone(name, reason: "heartbeat older than \(deadAfter) s or left")
        }
        // A node whose link this side has but which is not in the alive set any more (never
        // seen alive, e.g. it dialed and died between two checks).
        let known = links.withLock { Array($0.keys) }
        for name in known where nowAlive[name] == nil && !gone.contains(name) {
            if let member = members.first(where: { $0.name == name }), !member.isAlive(deadAfter: deadAfter) {
                await peerGone(name, reason: "not alive")
            }
        }
        for (name, address) in toDial {
            let task = Task { [weak self] in
                guard let self else { return }
                await self.dial(name, address: address)
            }
            state.withLock { $0.dialers[name] = task }
        }
        metrics.aliveNodes.record(nowAlive.count)
        for member in members where nowAlive[member.name] == nil && member.name != nodeName {
            try? await directory.forgetSessions(ofDeadNode: member.name, deadAfter: deadAfter)
        }
    }

    /// `peer` is gone: its link closes, its sessions leave the routing tables, and what it
    /// never acknowledged is routed again.
    private func peerGone(_ peer: String, reason: String) async {
        let link = links.withLock { $0.removeValue(forKey: peer) }
        state.withLock { state in
            state.dialers[peer]?.cancel()
            state.dialers[peer] = nil
        }
        // What it had let go but this node still held: nobody else will deliver it.
        await deliverHeld(link?.takeHeld() ?? [], from: peer)
        let unacknowledged = link?.close() ?? []
        var stanzas: [UndeliveredStanza] = []
        var rerouted: [String] = []
        for (frame, copies) in unacknowledged {
            if case .deliver(_, let to, let stanza) = frame { stanzas.append(UndeliveredStanza(to: to, stanza: stanza, copies: copies)) }
            if case .deliverArchived(_, let to, let stanza) = frame { stanzas.append(UndeliveredStanza(to: to, stanza: stanza, copies: copies)) }
            if case .route(_, let stanza) = frame { rerouted.append(stanza) }
            if case .routeRemote(_, let stanza) = frame { rerouted.append(stanza) }
        }
        // Exactly one live node tells the gone node's contacts: the first by name.
        let announce = state.withLock { state in
            state.alive.keys.filter { $0 != peer }.min() ?? nodeName
        } == nodeName
        metrics.nodesGone.increment()
        logger.notice("cluster node gone", metadata: ["peer": "\(peer)", "reason": "\(reason)", "undelivered": "\(stanzas.count)", "rerouted": "\(rerouted.count)"])
        await currentHost?.nodeGone(peer, unacknowledged: stanzas, rerouted: rerouted, announce: announce)
    }

    /// Writes directory changes in order. A write that fails (the database away) is kept
    /// and tried again with the next change.
    private func writeDirectory() async {
        var pending: [ClusterDirectory.Change] = []
        for await change in directoryChanges {
            pending.append(change)
            do {
                try await directory.apply(pending)
                pending = []
            } catch {
                metrics.membershipFailures.increment()
                logger.warning("session directory write failed; kept for the next change", metadata: ["error": "\(error)", "pending": "\(pending.count)"])
                if pending.count > 100_000 { pending.removeFirst(pending.count - 100_000) }
            }
        }
    }
}

public enum ClusterError: Error, Sendable, CustomStringConvertible {
    case configuration(String)
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .configuration(let text): text
        case .protocolViolation(let text): "node link: \(text)"
        }
    }
}

/// How long each step of one piece of work took, for a log line when it was slow.
struct StepTiming: CustomStringConvertible {
    private let clock = ContinuousClock()
    private let started: ContinuousClock.Instant
    private var last: ContinuousClock.Instant
    private var steps: [(String, Duration)] = []

    init() {
        started = clock.now
        last = started
    }

    mutating func step(_ name: String) {
        let now = clock.now
        steps.append((name, now - last))
        last = now
    }

    var total: Duration { last - started }

    var description: String {
        steps.map { "\($0.0) \(Int($0.1 / .milliseconds(1))) ms" }.joined(separator: ", ")
    }
}

/// The cluster's counters (`braid_cluster_*`).
struct ClusterMetrics: Sendable {
    let stanzasForwarded: Counter
    let stanzasRefused: Counter
    let linksConnected: Counter
    let nodesGone: Counter
    let membershipFailures: Counter
    let membershipChecks: Counter
    let slowMembershipChecks: Counter
    let linkErrors: Counter
    let aliveNodes: Recorder

    init(factory: any MetricsFactory) {
        stanzasForwarded = Counter(label: "braid_cluster_stanzas_forwarded_total", factory: factory)
        stanzasRefused = Counter(label: "braid_cluster_stanzas_refused_total", factory: factory)
        linksConnected = Counter(label: "braid_cluster_node_links_connected_total", factory: factory)
        nodesGone = Counter(label: "braid_cluster_nodes_gone_total", factory: factory)
        membershipFailures = Counter(label: "braid_cluster_database_failures_total", factory: factory)
        membershipChecks = Counter(label: "braid_cluster_membership_checks_total", factory: factory)
        slowMembershipChecks = Counter(label: "braid_cluster_membership_checks_slow_total", factory: factory)
        linkErrors = Counter(label: "braid_cluster_node_link_errors_total", factory: factory)
        aliveNodes = Recorder(label: "braid_cluster_nodes_alive", aggregate: false, factory: factory)
    }
}
