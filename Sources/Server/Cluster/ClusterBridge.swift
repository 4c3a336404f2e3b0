import Cluster
import Federation
import Foundation
import Logging
import NIOCore
import Synchronization
import XMPPCore
import XMPPStream

/// Joins this node's sessions and router to the cluster (issue 18).
///
/// Every session bound on another node has a stand-in here, in the same ``SessionRegistry``
/// (a ``ClientSession`` whose ``ClientSession/remote`` is set), with the presence, priority
/// and flags its node reports. Routing therefore needs no cluster code of its own: a
/// message to a bare JID picks among all of the account's resources wherever they are, a
/// presence broadcast reaches every node, and what is delivered to a stand-in goes over the
/// node link to the node that holds the session.
final class ClusterBridge: ClusterHost, SessionRegistry.Observer {
    let cluster: ClusterService
    let context: ServerContext
    private let group: any EventLoopGroup
    private let logger: Logger
    private let nodeLinks = Mutex<[String: NodeSessionLink]>([:])
    /// Federation on this node (when enabled), served only while this node holds the
    /// federation lease; and where the ports it binds are reported.
    private let federation = Mutex<(manager: FederationManager, portsBound: @Sendable ([String: Int]) -> Void)?>(nil)
    /// Messages other nodes sent here for remote domains that the peer server does not have
    /// yet, by ``handoverKey(_:)``: their node and frame number, to confirm when it does.
    private let awaitingHandover = Mutex<[String: (node: String, seq: UInt64)]>([:])

    init(cluster: ClusterService, context: ServerContext, group: any EventLoopGroup, logger: Logger) {
        self.cluster = cluster
        self.context = context
        self.group = group
        self.logger = logger
    }

    // MARK: This node's sessions, told to the others

    func localSessionChanged(_ entry: SessionRegistry.Entry, isNew: Bool) {
        cluster.localSessionChanged(Self.record(entry), isNew: isNew)
    }

    func localSessionGone(_ entry: SessionRegistry.Entry) {
        cluster.localSessionGone(jid: entry.session.jid.description)
    }

    func localSessionRecords() -> [SessionRecord] {
        context.sessions.localEntries().map(Self.record)
    }

    func localSessionCount() -> Int {
        context.sessions.count
    }

    func federationLinkCount() async -> Int {
        guard let manager = federation.withLock({ $0?.manager }) else { return 0 }
        return await manager.links.count
    }

    static func record(_ entry: SessionRegistry.Entry) -> SessionRecord {
        SessionRecord(jid: entry.session.jid.description, boundAt: entry.boundAt, presence: entry.presence.map(XMLFragment.serialize),
                      priority: entry.priority, interestedInRoster: entry.interestedInRoster, carbons: entry.carbons)
    }

    // MARK: The other nodes' sessions

    func remoteSessionChanged(_ record: SessionRecord, node: String) {
        guard let jid = try? JID(record.jid), jid.resourcepart != nil, context.domains.isHosted(jid.domainpart) else {
            logger.warning("node sent a session that is not a full JID of a hosted domain", metadata: ["peer": "\(node)", "jid": "\(record.jid)"])
            context.metrics.clusterBadFrames.increment()
            return
        }
        var presence: XMLElement?
        if let text = record.presence {
            guard let parsed = try? XMLFragment.parse(text), parsed.name == "presence" else {
                logger.warning("node sent a presence that does not parse", metadata: ["peer": "\(node)", "jid": "\(record.jid)"])
                context.metrics.clusterBadFrames.increment()
                return
            }
            presence = parsed
        }
        let link = sessionLink(for: node)
        let outcome = context.sessions.applyRemote(
            jid: jid, node: node, localNode: cluster.nodeName, boundAt: record.boundAt,
            state: .init(presence: presence, priority: record.priority, interestedInRoster: record.interestedInRoster, carbons: record.carbons)
        ) {
            ClientSession(remoteJID: jid, link: link, loop: group.next(), settings: proxySettings, logger: logger)
        }
        if case .localLoses(let session) = outcome {
            logger.info("resource bound on another node later; replacing the session here", metadata: ["jid": "\(jid)", "peer": "\(node)"])
            session.closeWithError(StreamError(.conflict, text: "replaced by a new session"))
        }
    }

    func remoteSessionGone(jid: String, node: String) {
        guard let jid = try? JID(jid) else { return }
        context.sessions.removeRemote(jid: jid, node: node)
    }

    func kickLocalSession(jid: String, node: String) {
        guard let jid = try? JID(jid), let entry = context.sessions.entry(for: jid), entry.session.remote == nil else { return }
        logger.info("resource bound on another node; replacing the session here", metadata: ["jid": "\(jid)", "peer": "\(node)"])
        entry.session.closeWithError(StreamError(.conflict, text: "replaced by a new session"))
    }

    func deliverFromNode(to jid: String, stanza: String, node: String) async {
        guard let target = try? JID(jid), let element = try? XMLFragment.parse(stanza) else {
            logger.warning("node sent a stanza that does not parse", metadata: ["peer": "\(node)", "to": "\(jid)"])
            context.metrics.clusterBadFrames.increment()
            return
        }
        if let entry = context.sessions.entry(for: target), entry.session.remote == nil {
            entry.session.deliver(element)
        } else {
            // The session ended while the stanza was on its way: as for any session that
            // ends with stanzas undelivered (stored offline, or bounced).
            await context.router.messages.handleUndelivered(element, to: target, router: context.router)
        }
    }

    func routeFromNode(stanza: String, node: String) async {
        guard let element = try? XMLFragment.parse(stanza), let parsed = Stanza(element) else {
            logger.warning("node sent a stanza to route that does not parse", metadata: ["peer": "\(node)"])
            context.metrics.clusterBadFrames.increment()
            return
        }
        // Routed here as on the sending node, minus the owner check: were the two nodes to
        // disagree on the owner for a moment, the stanza must not go back and forth.
        await context.router.route(parsed, fromNode: true)
    }

    func routeRemoteFromNode(stanza: String, node: String, seq: UInt64, duplicate: Bool) async {
        guard let element = try? XMLFragment.parse(stanza), let parsed = Stanza(element) else {
            logger.warning("node sent a stanza to route that does not parse", metadata: ["peer": "\(node)"])
            context.metrics.clusterBadFrames.increment()
            // Nothing will ever become of it: released, so the sender does not keep it.
            cluster.confirmDelivered(seq, to: node)
            return
        }
        guard let key = Self.handoverKey(parsed) else {
            await context.router.route(parsed, fromNode: true)
            cluster.confirmDelivered(seq, to: node)
            return
        }
        if duplicate {
            // Routed before a reconnect; if its fate is known, its confirmation may have
            // been lost with the old stream: confirm again.
            if awaitingHandover.withLock({ $0[key] == nil }) { cluster.confirmDelivered(seq, to: node) }
            return
        }
        awaitingHandover.withLock { $0[key] = (node, seq) }
        await context.router.route(parsed, fromNode: true)
    }

    // MARK: XEP-0198 resumption on another node

    func handOverSession(previd: String, account: String, handled: UInt32) async -> SessionTransfer? {
        guard let previous = context.resumption.session(id: previd), previous.remote == nil, previous.jid.bare.description == account,
              let state = try? await previous.loop.submit({ previous.takeOverForResumption(handled: handled) }).get() else {
            return nil
        }
        // Ended here without side effects (no unavailable presence, nothing stored): the
        // session lives on, on the other node.
        context.resumption.remove(previous)
        let entry = context.sessions.unbind(previous)
        context.metrics.sessionsActive.set(Int64(context.sessions.count))
        let record = entry.map(Self.record) ?? SessionRecord(jid: previous.jid.description, boundAt: Int64(Date().timeIntervalSince1970 * 1000),
                                                              presence: nil, priority: 0, interestedInRoster: false, carbons: false)
        logger.info("session handed over to another node for resumption", metadata: ["jid": "\(previous.jid)", "unacknowledged": "\(state.unacked.count)"])
        return SessionTransfer(record: record, receivedInbound: state.receivedInbound, sentOutbound: state.sentOutbound,
                               acknowledged: state.acknowledged, unacknowledged: state.unacked.map(XMLFragment.serialize))
    }

    func orphanedTransfer(_ transfer: SessionTransfer) async {
        guard let jid = try? JID(transfer.record.jid) else { return }
        let router = context.router
        logger.warning("a session handed over for resumption was not adopted; what it owed is handled as undelivered", metadata: ["jid": "\(jid)"])
        for text in transfer.unacknowledged {
            guard let element = try? XMLFragment.parse(text) else { continue }
            await router.messages.handleUndelivered(element, to: jid, router: router)
        }
    }

    /// Takes over session `previd` from whichever node holds it; nil if none does.
    func resumeFromAnotherNode(previd: String, account: JID, handled: UInt32) async -> SessionTransfer? {
        await cluster.resume(previd: previd, account: account.bare.description, handled: handled)?.transfer
    }

    /// What identifies a message on its way to a peer server: its id (the sending node
    /// gives every message one), sender and recipient.
    static func handoverKey(_ stanza: Stanza) -> String? {
        guard stanza.kind == .message, let id = stanza.id, !id.isEmpty else { return nil }
        return id + "\u{0}" + (stanza.element.attribute("from") ?? "") + "\u{0}" + (stanza.element.attribute("to") ?? "")
    }

    /// The peer servers have these: the nodes that sent them are told.
    private func handedOver(_ stanzas: [Stanza]) {
        for stanza in stanzas {
            guard let key = Self.handoverKey(stanza), let waiting = awaitingHandover.withLock({ $0.removeValue(forKey: key) }) else { continue }
            cluster.confirmDelivered(waiting.seq, to: waiting.node)
        }
    }

    /// A stanza bounced here (the peer server unreachable, say): its fate is known, and the
    /// error went back to the sender, wherever it is.
    func bounced(_ stanza: Stanza) {
        guard let key = Self.handoverKey(stanza), let waiting = awaitingHandover.withLock({ $0.removeValue(forKey: key) }) else { return }
        cluster.confirmDelivered(waiting.seq, to: waiting.node)
    }

    /// The node that owns a service entity (a group chat room, keyed by its bare JID), when
    /// it is not this one: rooms keep their state in one node's memory, so all their
    /// stanzas go there.
    func serviceOwner(of target: JID) -> String? {
        let owner = cluster.owner(of: target.bare.description)
        return owner == cluster.nodeName ? nil : owner
    }

    /// While a message sent to a bare JID is delivered to several resources: those
    /// resources, so that a copy forwarded to another node carries who else got it.
    @TaskLocal static var deliveredTogether: [JID] = []

    func nodeGone(_ node: String, unacknowledged: [UndeliveredStanza], rerouted: [String], announce: Bool) async {
        let removed = context.sessions.removeRemote(node: node)
        nodeLinks.withLock { $0[node] = nil }
        let router = context.router
        if announce {
            // The node cannot say its users went offline; one live node says it for them.
            for entry in removed where entry.isAvailable {
                await router.presence.broadcastUnavailable(of: entry.session, entry: entry, router: router)
            }
        }
        var deliveredElsewhere = 0
        for undelivered in unacknowledged {
            guard let target = try? JID(undelivered.to), let element = try? XMLFragment.parse(undelivered.stanza) else { continue }
            // One of several copies, and another resource that got one is still here: the
            // account has the message (and its archive); a second copy would be a duplicate.
            if undelivered.copies.contains(where: { (try? JID($0)).flatMap { context.sessions.entry(for: $0) } != nil }) {
                deliveredElsewhere += 1
                context.metrics.clusterCopiesNotRedelivered.increment()
                continue
            }
            await router.messages.handleUndelivered(element, to: target, router: router)
        }
        if deliveredElsewhere > 0 {
            logger.info("copies lost with a node whose account got the message on another resource", metadata: ["peer": "\(node)", "copies": "\(deliveredElsewhere)"])
        }
        // Sent to it to route (its rooms, or federation while it held the lease): routed
        // again from the start, to whichever node owns them now.
        for text in rerouted {
            guard let element = try? XMLFragment.parse(text), let stanza = Stanza(element) else { continue }
            await router.route(stanza)
        }
        logger.notice("sessions of a gone node removed", metadata: [
            "peer": "\(node)", "sessions": "\(removed.count)", "undelivered": "\(unacknowledged.count)", "rerouted": "\(rerouted.count)",
        ])
    }

    // MARK: Federation

    /// Federation on this node; it competes for the lease from now on.
    func serve(federation manager: FederationManager, portsBound: @escaping @Sendable ([String: Int]) -> Void) {
        federation.withLock { $0 = (manager, portsBound) }
        manager.observeHandover { [weak self] stanzas in self?.handedOver(stanzas) }
        cluster.enableFederationLease()
    }

    /// The holder of the federation lease when it is another node: stanzas for remote
    /// domains go there.
    var federationOwnerElsewhere: String? {
        guard federation.withLock({ $0 }) != nil, let owner = cluster.federationOwner, owner != cluster.nodeName else { return nil }
        return owner
    }

    func federationLease(held: Bool) async {
        guard let (manager, portsBound) = federation.withLock({ $0 }) else { return }
        if held {
            guard !manager.isListening else { return }
            do {
                let ports = try await manager.startListening()
                portsBound(ports)
                logger.notice("holding the federation lease: serving federation", metadata: ["ports": "\(ports.map { "\($0.key)=\($0.value)" }.sorted().joined(separator: ","))"])
            } catch {
                // The previous holder may not have let the port go yet: tried again at the
                // next heartbeat.
                logger.warning("holding the federation lease but cannot listen yet", metadata: ["error": "\(error)"])
            }
        } else if cluster.federationOwner != nil {
            // Another node serves federation: this one keeps no listener and no link, so each
            // peer provider has one connection to the whole cluster.
            let hasLinks = !(await manager.links).isEmpty
            guard manager.isListening || hasLinks else { return }
            logger.notice("federation lease held by another node: no longer serving federation", metadata: ["holder": "\(cluster.federationOwner ?? "")"])
            await manager.stopListening(closingLinks: true)
            portsBound([:])
        }
    }

    // MARK: Stand-ins

    private var proxySettings: ClientSession.Settings {
        ClientSession.Settings(resumeTimeout: .seconds(0), maxUnacked: 0, metrics: context.metrics, clock: context.sessionClock)
    }

    private func sessionLink(for node: String) -> NodeSessionLink {
        nodeLinks.withLock { links in
            if let link = links[node] { return link }
            let link = NodeSessionLink(node: node, bridge: self)
            links[node] = link
            return link
        }
    }

    /// What delivering to a stand-in does.
    final class NodeSessionLink: RemoteSessionLink {
        /// A message the recipient's archive holds: stamped with a `stanza-id` by its
        /// account (XEP-0359), which MAMModule adds only once the archive has stored it.
        static func isArchived(_ element: XMLElement, for recipient: JID) -> Bool {
            guard element.name == "message" else { return false }
            let account = recipient.bare.description
            return element.children.contains { node in
                guard case .element(let child) = node else { return false }
                return child.name == "stanza-id" && child.namespace == MAMModule.stanzaIDs && child.attribute("by") == account
            }
        }

        let node: String
        /// Weak: the bridge holds its links.
        weak let bridge: ClusterBridge?

        init(node: String, bridge: ClusterBridge) {
            self.node = node
            self.bridge = bridge
        }

        func forward(_ element: XMLElement, to session: ClientSession) {
            guard let bridge else { return }
            let copies = ClusterBridge.deliveredTogether.filter { $0 != session.jid }.map(\.description)
            guard !bridge.cluster.deliver(stanza: XMLFragment.serialize(element), to: session.jid.description, on: node, copies: copies,
                                          archived: Self.isArchived(element, for: session.jid)) else { return }
            // The node is gone or too much waits for it. Routing again could pick the same
            // stand-in; the sender is told instead (RFC 6120 §8.3.3.18).
            let router = bridge.context.router
            guard let stanza = Stanza(element) else { return }
            Task { await router.bounce(stanza, with: StanzaError(.resourceConstraint)) }
        }

        func replace(_ session: ClientSession) {
            bridge?.cluster.kick(jid: session.jid.description, on: node)
        }
    }
}
