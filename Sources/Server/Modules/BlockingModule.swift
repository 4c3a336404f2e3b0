import CoreMetrics
import Logging
import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// XEP-0191 Blocking Command (version 1.3): each account keeps a list of JIDs it blocked
/// (account store `blocklist`, one entry per JID, keyed by its canonical form), and the
/// server keeps every stanza between the account and those JIDs from passing, both ways.
///
/// Enforcement has two halves:
/// - what one of the account's clients sends to a blocked JID is stopped in `onClientStanza`,
///   before the server acts on it (no roster change for a subscription request), and
///   answered there, straight to the sending session, with `not-acceptable` and
///   `<blocked/>` (§3.3);
/// - everything else goes through the router's `onRoute` filter: stanzas from a blocked JID
///   to the account (from a local client, a module, or a peer server, by their authenticated
///   `from`), and what the server sends on the account's behalf to a blocked JID (presence
///   broadcasts, probes).
///
/// The filter runs on every routed stanza, so lists are answered from memory
/// (``BlockLists``): read from storage once per local account, on first use, and replaced
/// whenever the account changes its list.
struct BlockingModule: BraidModule {
    static let namespace = "urn:xmpp:blocking"
    static let errors = "urn:xmpp:blocking:errors"
    /// The account store holding the list: the key is the blocked JID, the value unused.
    static let store = "blocklist"
    /// The most JIDs one account may block (`blocking.max_items`); a block beyond it gets
    /// `resource-constraint`.
    var maxItems = BraidConfiguration.BlockingSettings().maxItems
    static let blockedMetric = "braid_blocked_stanzas_total"

    /// Per server: `StandardModules.all` makes a module per server, so two servers in one
    /// process (tests) never share lists.
    let lists = BlockLists()

    var name: String { "blocking" }

    func register(in builder: inout ModuleBuilder) {
        // §3.1: clients ask their server's domain; the account's own disco#info lists it too.
        builder.serverFeature(Self.namespace)
        builder.accountFeature(Self.namespace)
        builder.onAccountIQ(Self.namespace, handle)
        // Before other modules: a stanza to or from a blocked JID is nobody else's business.
        builder.onClientStanza(priority: 100, outbound)
        builder.onRoute(priority: 100, filter)
    }

    // MARK: The protocol (§3.2–§3.5)

    private func handle(_ request: IQRequest) async -> IQResponse {
        let account = request.target
        // Only the account's own resources see or change the list; anyone else gets what an
        // unknown namespace gets, which does not tell whether the account exists.
        guard request.requester.bare == account else { return .error(StanzaError(.serviceUnavailable)) }
        let payload = request.payload
        switch (request.iq.type, payload.name) {
        case (.get, "blocklist"):
            do {
                let list = try await lists.list(of: account, storage: request.router.server.storage)
                return .result(Self.element("blocklist", items: list.items.sorted()))
            } catch {
                request.router.logger.error("reading the block list failed", metadata: ["account": "\(account)", "error": "\(error)"])
                return .error(StanzaError(.internalServerError))
            }
        case (.set, "block"):
            switch Self.items(of: payload) {
            case .failure(let error):
                return .error(error)
            case .success(let items):
                // §3.3: a block without items is a bad request.
                guard !items.isEmpty else { return .error(StanzaError(.badRequest, text: "block needs at least one item")) }
                return await change(.block(items), request: request)
            }
        case (.set, "unblock"):
            switch Self.items(of: payload) {
            case .failure(let error):
                return .error(error)
            case .success(let items):
                // §3.5: an empty unblock unblocks everything.
                return await change(items.isEmpty ? .unblockAll : .unblock(items), request: request)
            }
        default:
            return .error(StanzaError(.badRequest))
        }
    }

    /// The `<item jid/>` children, in canonical form without repeats; `jid-malformed` for an
    /// address that is not one (RFC 7622), `bad-request` for an item without one.
    static func items(of payload: XMLElement) -> Result<[JID], StanzaError> {
        var items: [JID] = []
        var seen = Set<JID>()
        for item in payload.children(name: "item", namespace: namespace) {
            guard let text = item.attribute("jid") else { return .failure(StanzaError(.badRequest, text: "item without jid")) }
            guard let jid = try? JID(text) else { return .failure(StanzaError(.jidMalformed)) }
            if seen.insert(jid).inserted { items.append(jid) }
        }
        return .success(items)
    }

    enum Command: Sendable {
        case block([JID])
        case unblock([JID])
        case unblockAll

        var payload: XMLElement {
            switch self {
            case .block(let items): BlockingModule.element("block", items: items)
            case .unblock(let items): BlockingModule.element("unblock", items: items)
            case .unblockAll: BlockingModule.element("unblock", items: [])
            }
        }
    }

    /// A list before and after one command.
    struct Change: Sendable {
        var before: BlockList
        var after: BlockList
    }

    /// Applies a command: storage, the in-memory list, the result and the pushes happen under
    /// the account's serializer, so two commands from two resources cannot interleave and
    /// every resource sees the pushes in the order the list changed. The presence that goes
    /// with the change follows outside it.
    private func change(_ command: Command, request: IQRequest) async -> IQResponse {
        let account = request.target
        let router = request.router
        let server = router.server
        let lists = self.lists
        let outcome: Result<Change, StanzaError>
        do {
            outcome = try await server.accounts.run(account) { () async -> Result<Change, StanzaError> in
                do {
                    let before = try await lists.list(of: account, storage: server.storage)
                    var after = before
                    switch command {
                    case .block(let items):
                        let added = items.filter { !before.items.contains($0) }
                        guard before.count + added.count <= maxItems else {
                            server.logger.info("block list full", metadata: ["account": "\(account)", "limit": "\(maxItems)"])
                            return .failure(StanzaError(.resourceConstraint, text: "at most \(maxItems) blocked JIDs"))
                        }
                        for jid in added {
                            try await server.storage.putStoreEntry(Self.store, of: account, key: jid.description, value: "", keepLast: nil)
                            after.insert(jid)
                        }
                    case .unblock(let items):
                        for jid in items where before.items.contains(jid) {
                            try await server.storage.removeStoreEntry(Self.store, of: account, key: jid.description)
                            after.remove(jid)
                        }
                    case .unblockAll:
                        try await server.storage.removeStore(Self.store, of: account)
                        after = BlockList()
                    }
                    lists.set(after, for: account)
                    // The result first, then the pushes (§3.3 to §3.5), to every resource:
                    // the requester's included, as in the XEP's examples.
                    await router.route(request.iq.result().stanza)
                    Self.push(command.payload, account: account, sessions: server.sessions)
                    return .success(Change(before: before, after: after))
                } catch {
                    // Part of a command may have been stored: the next use reads storage again.
                    lists.forget(account)
                    server.logger.error("changing the block list failed", metadata: ["account": "\(account)", "error": "\(error)"])
                    return .failure(StanzaError(.internalServerError))
                }
            }
        } catch {
            outcome = .failure(StanzaError(.internalServerError))
        }
        switch outcome {
        case .failure(let error):
            return .error(error)
        case .success(let change):
            server.logger.info("block list changed", metadata: [
                "account": "\(account)", "command": "\(command.payload.name)", "blocked": "\(change.after.count)",
            ])
            await Self.presence(after: change, account: account, router: router)
            return .handled
        }
    }

    /// A block or unblock push to each bound resource of the account, from its bare JID as
    /// roster pushes are.
    private static func push(_ payload: XMLElement, account: JID, sessions: SessionRegistry) {
        for entry in sessions.entries(of: account) {
            entry.session.deliver(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("type", "set"), XMLAttribute("id", "block-" + ServerContext.randomIdentifier(bytes: 6)),
                XMLAttribute("to", entry.session.jid.description), XMLAttribute("from", account.description),
            ], children: [.element(payload)]))
        }
    }

    static func element(_ name: String, items: [JID]) -> XMLElement {
        XMLElement(name: name, namespace: namespace, children: items.map { .element(XMLElement(name: "item", namespace: namespace, attributes: [XMLAttribute("jid", $0.description)])) })
    }

    // MARK: Presence on block and unblock

    /// §3.3: a newly blocked JID that may see the user's presence gets unavailable from each
    /// available resource (roster subscribers, and those that got directed presence). §3.4:
    /// a newly unblocked subscriber gets each resource's current presence, and a contact the
    /// user is subscribed to is probed, since its presence was dropped while it was blocked.
    /// The user's own resources are told a blocked contact is unavailable, so clients stop
    /// showing it online. Stored subscription requests from a newly blocked JID are dropped:
    /// they would otherwise be delivered at every login (RFC 6121 §3.1.3).
    static func presence(after change: Change, account: JID, router: Router) async {
        let server = router.server
        let available = server.sessions.entries(of: account).filter(\.isAvailable)
        let roster: [RosterItem]
        do {
            roster = try await server.storage.roster(of: account).items
        } catch {
            server.logger.error("roster read failed", metadata: ["account": "\(account)", "error": "\(error)"])
            roster = []
        }
        // Full JIDs on either list are matched against the contact they belong to too: a
        // block of `bob@b.example/phone` concerns that resource of the contact bob@b.example.
        let fullItems = change.before.items.symmetricDifference(change.after.items).filter(\.isFull)
        var sentUnavailable = Set<JID>()
        var probed = Set<JID>()
        for item in roster where item.jid != account {
            let sharesOurs = item.subscription == .from || item.subscription == .both
            let sharesTheirs = item.subscription == .to || item.subscription == .both
            for address in [item.jid] + fullItems.filter({ $0.bare == item.jid }) {
                let was = change.before.matches(address)
                let now = change.after.matches(address)
                if !was && now {
                    if sharesOurs, sentUnavailable.insert(address).inserted {
                        for entry in available {
                            await router.route(Presence(to: address, from: entry.session.jid, type: .unavailable).stanza)
                        }
                    }
                    if sharesTheirs {
                        for entry in available {
                            entry.session.deliver(Presence(to: entry.session.jid, from: address, type: .unavailable).element)
                        }
                    }
                } else if was && !now {
                    if sharesOurs {
                        for entry in available {
                            if let current = entry.presence, let stanza = Stanza(current) {
                                await router.route(stanza.addressed(to: address, from: entry.session.jid))
                            }
                        }
                    }
                    if sharesTheirs, probed.insert(item.jid).inserted {
                        await router.route(Presence(to: item.jid, from: account, type: .probe).stanza)
                    }
                }
            }
        }
        // RFC 6121 §4.6: directed presence recipients also learn the user went offline.
        for entry in available {
            for target in entry.directedPresence where !change.before.matches(target) && change.after.matches(target) {
                await router.route(Presence(to: target, from: entry.session.jid, type: .unavailable).stanza)
            }
        }
        guard change.after.count > change.before.count else { return }
        do {
            for request in try await server.storage.subscriptionRequests(of: account) {
                guard let from = (try? XMLFragment.parse(request.stanza))?.attribute("from"), let sender = try? JID(from) else { continue }
                if !change.before.matches(sender) && change.after.matches(sender) {
                    try await server.storage.removeSubscriptionRequest(of: account, from: sender.bare)
                }
            }
        } catch {
            server.logger.error("dropping subscription requests from blocked JIDs failed", metadata: ["account": "\(account)", "error": "\(error)"])
        }
    }

    // MARK: Enforcement

    /// What one of the account's clients sends to a JID it blocked (§3.3): messages and IQ
    /// requests get `not-acceptable` with `<blocked/>`, straight to the session (routed, the
    /// error would come from the blocked JID and be dropped by the filter); the rest is
    /// dropped. Unavailable presence and subscription cancellations still leave: they tell
    /// the blocked JID no more than that the user is offline or gone from the roster, and
    /// keep both rosters in step.
    private func outbound(_ client: ClientStanza) async -> StanzaDisposition {
        guard let target = client.to else { return .pass }
        let account = client.session.jid.bare
        guard !Self.isOwn(target, account: account) else { return .pass }
        let server = client.router.server
        guard let list = await list(of: account, server: server), list.matches(target) else { return .pass }
        let stanza = client.stanza
        if stanza.kind == .presence, !stanza.isError, Self.mayLeave(stanza) { return .pass }
        Self.count(stanza, direction: "outbound", account: account, peer: target, server: server)
        switch stanza.kind {
        case .presence:
            break
        case .message:
            if !stanza.isError { Self.answerBlocked(stanza, session: client.session, server: server) }
        case .iq:
            if IQ(stanza)?.type?.isRequest == true { Self.answerBlocked(stanza, session: client.session, server: server) }
        }
        return .handled
    }

    /// The §3.3 error for a stanza the user sent to a JID it blocked.
    private static func answerBlocked(_ stanza: Stanza, session: ClientSession, server: ServerContext) {
        guard let reply = stanza.errorReply(StanzaError(.notAcceptable, type: .cancel)) else { return }
        let blocked = XMLElement(name: "blocked", namespace: errors)
        let element = reply.element.replacingChildren(reply.element.children.map { node in
            guard case .element(let child) = node, child.name == "error" else { return node }
            return .element(child.appending(blocked))
        })
        server.metrics.stanzaErrorSent(.notAcceptable)
        session.deliver(element)
    }

    /// Every routed stanza: (a) what the server sends on behalf of a local account to a JID
    /// it blocked, (b) what a blocked JID sends to a local account, wherever it comes from.
    private func filter(_ routed: RoutedStanza) async -> StanzaDisposition {
        guard let from = routed.from else { return .pass }
        let to = routed.to
        let stanza = routed.stanza
        let server = routed.router.server
        // (a) Client stanzas were judged in `outbound`; here are the server's: presence
        // broadcasts and probes are dropped. Errors pass (the `service-unavailable` that (b)
        // sends the blocked JID comes from the account), and so does the unavailable presence
        // §3.3 sends on block (see `outbound` for cancellations).
        if from.localpart != nil, !Self.isOwn(to, account: from.bare), server.domains.isHosted(from.domainpart),
           let list = await list(of: from.bare, server: server), list.matches(to), !Self.mayLeave(stanza) {
            Self.count(stanza, direction: "outbound", account: from.bare, peer: to, server: server)
            return .handled
        }
        // (b) §3.3: nothing from a blocked JID reaches the user. Presence and IQ results and
        // errors are dropped; messages and IQ requests get `service-unavailable`, the answer
        // of an account that is offline or does not exist, so the block is not revealed.
        // Group-chat and headline messages are dropped: an error to a room can get the
        // user removed from it, and headlines expect no answer.
        guard to.localpart != nil, !Self.isOwn(from, account: to.bare), server.domains.isHosted(to.domainpart),
              let list = await list(of: to.bare, server: server), list.matches(from) else { return .pass }
        Self.count(stanza, direction: "inbound", account: to.bare, peer: from, server: server)
        switch stanza.kind {
        case .presence:
            break
        case .message:
            if let type = Message(stanza)?.type, type == .normal || type == .chat {
                await routed.bounce(with: StanzaError(.serviceUnavailable))
            }
        case .iq:
            if IQ(stanza)?.type?.isRequest == true { await routed.bounce(with: StanzaError(.serviceUnavailable)) }
        }
        return .handled
    }

    /// What the server may still send on the account's behalf to a JID it blocked.
    private static func mayLeave(_ stanza: Stanza) -> Bool {
        if stanza.isError { return true }
        guard stanza.kind == .presence else { return false }
        switch Presence(stanza)?.type {
        case .unavailable, .unsubscribe, .unsubscribed: return true
        default: return false
        }
    }

    /// The account's own addresses and its server's, which no list blocks (XEP-0191 §5: no
    /// rule blocks one of the user's resources from another; and a block of the user's own
    /// domain must not stop roster pushes or the server's answers).
    static func isOwn(_ jid: JID, account: JID) -> Bool {
        jid.bare == account || (jid.localpart == nil && jid.domainpart == account.domainpart)
    }

    /// The account's list, or nil when storage cannot be read: then the stanza passes (a
    /// database outage must not stop all traffic) and the error is logged.
    private func list(of account: JID, server: ServerContext) async -> BlockList? {
        do {
            return try await lists.list(of: account, storage: server.storage)
        } catch {
            server.logger.error("reading the block list failed; not enforcing it for this stanza", metadata: ["account": "\(account)", "error": "\(error)"])
            return nil
        }
    }

    private static func count(_ stanza: Stanza, direction: String, account: JID, peer: JID, server: ServerContext) {
        Counter(label: blockedMetric, dimensions: [("direction", direction), ("kind", stanza.kind.rawValue)], factory: server.metrics.registry).increment()
        server.logger.debug("stanza blocked (XEP-0191)", metadata: [
            "direction": "\(direction)", "kind": "\(stanza.kind.rawValue)", "type": "\(stanza.typeAttribute ?? "")",
            "account": "\(account)", "peer": "\(peer)",
        ])
    }
}

/// A block list. Items match as XEP-0191 §6 says (XEP-0016's order): a full JID matches
/// only itself; a bare JID matches it and every resource of it; `domain/resource` matches
/// only that JID; a domain matches itself and every address at it (not its subdomains).
struct BlockList: Sendable, Equatable {
    private(set) var items: Set<JID>

    init(_ items: some Sequence<JID> = [JID]()) {
        self.items = Set(items)
    }

    var count: Int { items.count }
    var isEmpty: Bool { items.isEmpty }

    mutating func insert(_ jid: JID) { items.insert(jid) }
    mutating func remove(_ jid: JID) { items.remove(jid) }

    func matches(_ jid: JID) -> Bool {
        guard !items.isEmpty else { return false }
        if items.contains(jid) { return true }
        if jid.localpart != nil && jid.resourcepart != nil && items.contains(jid.bare) { return true }
        return !jid.isDomain && items.contains(jid.domain)
    }
}

/// Each local account's block list in memory, so the route filter reads no storage for an
/// account it has seen. It holds one list per account that has one, and a marker per account
/// seen without one; markers are bounded (``emptyMarkerLimit``, cleared when full, as a
/// stranger can address any number of names on a hosted domain), lists are not (one per
/// account that blocks someone).
final class BlockLists: Sendable {
    static let emptyMarkerLimit = 100_000

    private struct State {
        var lists: [JID: BlockList] = [:]
        var empty: Set<JID> = []
        /// Moves on every change, so a load that read storage before a change does not put
        /// its older list in place of the new one.
        var epoch: UInt64 = 0

        mutating func put(_ list: BlockList, for account: JID) {
            if list.isEmpty {
                lists[account] = nil
                if empty.count >= BlockLists.emptyMarkerLimit { empty.removeAll() }
                empty.insert(account)
            } else {
                empty.remove(account)
                lists[account] = list
            }
        }
    }

    private let state = Mutex(State())

    func cached(_ account: JID) -> BlockList? {
        state.withLock { state in
            if let list = state.lists[account] { return list }
            return state.empty.contains(account) ? BlockList() : nil
        }
    }

    /// The list, from memory or read from storage on first use.
    func list(of account: JID, storage: any Storage) async throws -> BlockList {
        if let cached = cached(account) { return cached }
        let epoch = state.withLock { $0.epoch }
        let entries = try await storage.storeEntries(BlockingModule.store, of: account)
        let list = BlockList(entries.compactMap { try? JID($0.key) })
        state.withLock { state in
            guard state.epoch == epoch, state.lists[account] == nil, !state.empty.contains(account) else { return }
            state.put(list, for: account)
        }
        return list
    }

    /// The list after a change the caller has stored.
    func set(_ list: BlockList, for account: JID) {
        state.withLock { state in
            state.epoch &+= 1
            state.put(list, for: account)
        }
    }

    /// Drops what is known of an account, so the next use reads storage.
    func forget(_ account: JID) {
        state.withLock { state in
            state.epoch &+= 1
            state.lists[account] = nil
            state.empty.remove(account)
        }
    }
}
