import Foundation
import Logging
import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// Personal eventing (XEP-0163) on the subset of publish-subscribe (XEP-0060) clients use:
/// OMEMO device lists and bundles, avatars, bookmarks, nicknames. Every account is a PEP
/// service at its bare JID; nodes are created by the first publish (with publish-options as
/// their configuration, XEP-0223) and live in the account stores `pep` (node → configuration)
/// and `pep/NODE` (item id → payload, newest last).
///
/// Notifications go to the owner's resources and to contacts allowed by the node's access
/// model whose entity capabilities (XEP-0115) include `NODE+notify`. The service learns the
/// capabilities of the resources it may notify from the presence they send the owner (local
/// or remote, with one `disco#info` per unknown `ver`), and sends each the last item of the
/// nodes it is interested in when it becomes available.
struct PEPModule: BraidModule {
    static let features = [
        "http://jabber.org/protocol/pubsub", "http://jabber.org/protocol/pubsub#publish", "http://jabber.org/protocol/pubsub#publish-options",
        "http://jabber.org/protocol/pubsub#auto-create", "http://jabber.org/protocol/pubsub#auto-subscribe",
        "http://jabber.org/protocol/pubsub#access-presence", "http://jabber.org/protocol/pubsub#access-open",
        "http://jabber.org/protocol/pubsub#access-roster", "http://jabber.org/protocol/pubsub#access-whitelist",
        "http://jabber.org/protocol/pubsub#persistent-items", "http://jabber.org/protocol/pubsub#retrieve-items",
        "http://jabber.org/protocol/pubsub#retract-items", "http://jabber.org/protocol/pubsub#delete-items",
        "http://jabber.org/protocol/pubsub#delete-nodes", "http://jabber.org/protocol/pubsub#purge-nodes",
        "http://jabber.org/protocol/pubsub#create-nodes", "http://jabber.org/protocol/pubsub#config-node",
        "http://jabber.org/protocol/pubsub#filtered-notifications", "http://jabber.org/protocol/pubsub#last-published",
        "http://jabber.org/protocol/pubsub#presence-notifications", "http://jabber.org/protocol/pubsub#item-ids",
        "http://jabber.org/protocol/pubsub#modify-affiliations", "http://jabber.org/protocol/pubsub#member-affiliation",
    ]

    let service: PEPService

    init(settings: BraidConfiguration.PEPSettings = .init()) {
        service = PEPService(settings: settings)
    }

    var name: String { "pep" }

    func register(in builder: inout ModuleBuilder) {
        let service = self.service
        builder.accountIdentity(category: "pubsub", type: "pep")
        for feature in Self.features + Bookmarks.features { builder.accountFeature(feature) }
        builder.onAccountIQ(PubSubNamespace.pubsub) { request in await service.pubsub(request) }
        builder.onAccountIQ(PubSubNamespace.owner) { request in await service.owner(request) }
        builder.onAccountItems { account, requester, router in await service.discoItems(of: account, requester: requester, router: router) }
        // The presence an owner receives tells which resources want which notifications.
        builder.onStanza(.presence, namespace: nil, priority: 100) { local in
            await service.observe(local.stanza, to: local.to, router: local.router)
            return .pass
        }
        // The owner's own resources: their undirected presence; and their answers to the
        // service's caps queries, which come from the account's bare JID (as Prosody's do),
        // so a client answers its own bare JID and the answer never reaches the router.
        builder.onClientStanza { client in
            if service.takeAnswer(client.stanza) { return .handled }
            if client.stanza.kind == .presence, client.to == nil {
                await service.observe(client.stanza, to: client.session.jid.bare, router: client.router)
            }
            return .pass
        }
        // XEP-0163 §4.3.4: a contact that just got a presence subscription gets the last
        // items its resources want.
        builder.onRosterChange { change in
            let granted: (RosterItem?) -> Bool = { $0?.subscription == .from || $0?.subscription == .both }
            guard granted(change.after), !granted(change.before) else { return }
            service.subscriptionGranted(owner: change.account, contact: change.contact, router: change.router)
        }
        // Answers to the service's own caps queries.
        builder.onRoute(priority: 100) { routed in
            service.takeAnswer(routed.stanza) ? .handled : .pass
        }
    }
}

/// The PEP service's state: the resources it may notify, the capabilities cache, and its
/// outstanding `disco#info` queries.
final class PEPService: Sendable {
    let settings: BraidConfiguration.PEPSettings
    let caps: EntityCaps
    /// XEP-0153 photo hashes, shared with the vCard module: the avatar conversion
    /// (Avatars.swift, XEP-0398) changes the vCard photo from here.
    let photoHashes = VCardPhotoHashes()

    private struct State {
        /// Per owner (bare JID): the available resources that told it their capabilities.
        var interested: [JID: [JID: EntityCaps.Claim]] = [:]
        var queries: [String: CheckedContinuation<XMLElement?, Never>] = [:]
        /// Each query's timeout, cancelled when the answer comes: a sleeping task per query
        /// held memory for the whole timeout (8.7 KB per caps entry in the PEP benchmark
        /// when 10,000 clients announced new caps within seconds).
        var timers: [String: Task<Void, Never>] = [:]
        /// Per publishing account: the notifications it may still cause.
        var allowances: [JID: SendingAllowance] = [:]
    }

    var notificationRate: SendingRate? {
        settings.notificationsPerSecond > 0 ? SendingRate(perSecond: settings.notificationsPerSecond, burst: max(1, settings.notificationBurst)) : nil
    }

    /// Whether `owner` may publish now: false while its notifications are over the rate.
    func mayNotify(_ owner: JID, now: Date = Date()) -> Bool {
        guard let rate = notificationRate else { return true }
        return state.withLock { state in
            var allowance = state.allowances[owner] ?? SendingAllowance(at: now)
            let may = allowance.mayStart(now: now, rate: rate)
            state.allowances[owner] = allowance
            return may
        }
    }

    /// Counts `count` notifications caused by `owner`.
    func notified(_ count: Int, by owner: JID, now: Date = Date()) {
        guard let rate = notificationRate, count > 0 else { return }
        state.withLock { state in
            var allowance = state.allowances[owner] ?? SendingAllowance(at: now)
            allowance.spend(count, now: now, rate: rate)
            state.allowances[owner] = allowance
            // Bounded: accounts whose bucket is full again need no entry.
            if state.allowances.count > 10_000 {
                state.allowances = state.allowances.filter { _, value in
                    var refilled = value
                    return !(refilled.mayStart(now: now, rate: rate) && refilled.tokens >= rate.burst)
                }
            }
        }
    }

    private let state = Mutex(State())

    init(settings: BraidConfiguration.PEPSettings) {
        self.settings = settings
        caps = EntityCaps(limit: settings.capsCacheSize)
    }

    // MARK: Presence and capabilities

    /// Available presence from a resource to `owner` records its capabilities (and sends it
    /// the last items it wants once they are known); unavailable forgets it.
    func observe(_ stanza: Stanza, to owner: JID, router: Router) async {
        guard let from = try? stanza.from(), from.resourcepart != nil else { return }
        let owner = owner.bare
        switch stanza.typeAttribute {
        case nil:
            let claim = EntityCaps.Claim(stanza.element)
            let changed = state.withLock { state -> Bool in
                var resources = state.interested[owner] ?? [:]
                let before = resources[from]
                if let claim {
                    guard before != claim else { return false }
                    // Bounded: a flood of resources does not grow the table without end.
                    guard before != nil || resources.count < settings.maxInterestedResources else { return false }
                    resources[from] = claim
                } else {
                    resources[from] = nil
                }
                state.interested[owner] = resources.isEmpty ? nil : resources
                return claim != nil
            }
            guard changed, let claim else { return }
            // A resource that just became available, or changed its capabilities: learning
            // what it wants may take a round trip, which the presence does not wait for.
            Task {
                guard let features = await self.caps.resolve(claim, entity: from, ask: { entity, node in
                    await self.ask(entity, node: node, from: owner, router: router)
                }) else { return }
                await self.sendLastItems(of: owner, to: from, features: features, router: router)
            }
        case "unavailable", "error":
            state.withLock { state in
                state.interested[owner]?[from] = nil
                if state.interested[owner]?.isEmpty == true { state.interested[owner] = nil }
            }
        default:
            break
        }
    }

    /// `contact` may now see `owner`'s presence-model nodes: its resources the service knows
    /// get the last items they want.
    func subscriptionGranted(owner: JID, contact: JID, router: Router) {
        let resources = state.withLock { ($0.interested[owner.bare] ?? [:]).filter { $0.key.bare == contact.bare } }
        for (resource, claim) in resources {
            Task {
                guard let features = await self.caps.resolve(claim, entity: resource, ask: { entity, node in
                    await self.ask(entity, node: node, from: owner.bare, router: router)
                }) else { return }
                await self.sendLastItems(of: owner.bare, to: resource, features: features, router: router)
            }
        }
    }

    /// Sends a `disco#info` query for a caps node and waits (bounded) for the answer.
    private func ask(_ entity: JID, node: String, from owner: JID, router: Router) async -> XMLElement? {
        let id = "caps-" + ServerContext.randomIdentifier(bytes: 8)
        let query = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("type", "get"), XMLAttribute("id", id), XMLAttribute("from", owner.description), XMLAttribute("to", entity.description),
        ], children: [.element(XMLElement(name: "query", namespace: DiscoModule.info, attributes: [XMLAttribute("node", node)]))])
        let timeout = settings.capsQueryTimeoutSeconds
        return await withCheckedContinuation { continuation in
            state.withLock { $0.queries[id] = continuation }
            let timer = Task {
                if let stanza = Stanza(query) { await router.route(stanza) }
                try? await Task.sleep(for: .seconds(timeout))
                let late = state.withLock { state in
                    state.timers[id] = nil
                    return state.queries.removeValue(forKey: id)
                }
                late?.resume(returning: nil)
            }
            // The answer may already have come (and found no timer to cancel).
            let answered = state.withLock { state -> Bool in
                guard state.queries[id] != nil else { return true }
                state.timers[id] = timer
                return false
            }
            if answered { timer.cancel() }
        }
    }

    /// An answer to one of the service's queries: resumes its waiter; true when it was one.
    func takeAnswer(_ stanza: Stanza) -> Bool {
        guard stanza.kind == .iq, let id = stanza.id, id.hasPrefix("caps-"),
              stanza.typeAttribute == "result" || stanza.typeAttribute == "error" else { return false }
        let (waiter, timer) = state.withLock { ($0.queries.removeValue(forKey: id), $0.timers.removeValue(forKey: id)) }
        timer?.cancel()
        guard let waiter else { return false }
        waiter.resume(returning: stanza.typeAttribute == "result" ? stanza.element.firstChild(name: "query", namespace: DiscoModule.info) : nil)
        return true
    }

    /// The resources of `owner`'s audience that want notifications of `node`, and those
    /// whose capabilities are still being learned.
    private func interested(in node: String, owner: JID) -> (wanting: [JID], unresolved: [(JID, EntityCaps.Claim)]) {
        let resources = state.withLock { $0.interested[owner] ?? [:] }
        var wanting: [JID] = []
        var unresolved: [(JID, EntityCaps.Claim)] = []
        for (jid, claim) in resources {
            if let features = caps.features(ver: claim.ver) {
                if features.contains(node + "+notify") { wanting.append(jid) }
            } else {
                unresolved.append((jid, claim))
            }
        }
        return (wanting, unresolved)
    }

    // MARK: Storage

    static func store(_ node: String) -> String { "pep/" + node }

    func configuration(of node: String, owner: JID, storage: any Storage) async throws -> PEPNodeConfiguration? {
        guard let entry = try await storage.storeEntry("pep", of: owner, key: node) else { return nil }
        return try JSONDecoder().decode(PEPNodeConfiguration.self, from: Data(entry.value.utf8))
    }

    func save(_ configuration: PEPNodeConfiguration, node: String, owner: JID, storage: any Storage) async throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        try await storage.putStoreEntry("pep", of: owner, key: node, value: String(decoding: try encoder.encode(configuration), as: UTF8.self), keepLast: nil)
    }

    struct Item {
        var id: String
        var payload: XMLElement?
    }

    private func items(of node: String, owner: JID, storage: any Storage) async throws -> [Item] {
        try await storage.storeEntries(Self.store(node), of: owner).map { entry in
            Item(id: entry.key, payload: entry.value.isEmpty ? nil : try? XMLFragment.parse(entry.value))
        }
    }

    func itemElement(_ item: Item, namespace: String, withPayload: Bool = true) -> XMLElement {
        XMLElement(name: "item", namespace: namespace, attributes: [XMLAttribute("id", item.id)],
                   children: withPayload ? item.payload.map { [.element($0)] } ?? [] : [])
    }

    // MARK: pubsub (XEP-0060 §6, §7)

    func pubsub(_ request: IQRequest) async -> IQResponse {
        let owner = request.target.bare
        let router = request.router
        let pubsub = request.payload
        guard let action = pubsub.children.compactMap({ node -> XMLElement? in
            guard case .element(let child) = node, child.namespace == PubSubNamespace.pubsub, child.name != "publish-options" else { return nil }
            return child
        }).first else {
            return .error(StanzaError(.badRequest))
        }
        let isOwner = request.requester.bare == owner
        do {
            switch (request.iq.type, action.name) {
            case (.get, "items"):
                return try await retrieve(action, owner: owner, requester: request.requester, router: router)
            case (.set, "publish") where isOwner:
                return try await router.server.accounts.run(owner) {
                    try await self.publish(action, options: pubsub.firstChild(name: "publish-options", namespace: PubSubNamespace.pubsub), owner: owner, router: router)
                }
            case (.set, "retract") where isOwner:
                return try await router.server.accounts.run(owner) { try await self.retract(action, owner: owner, router: router) }
            case (.set, "create") where isOwner:
                return try await router.server.accounts.run(owner) {
                    try await self.create(action, configure: pubsub.firstChild(name: "configure", namespace: PubSubNamespace.pubsub), owner: owner, router: router)
                }
            case (.get, "subscriptions"):
                // PEP subscriptions are implicit (presence and +notify, XEP-0163 §4).
                return .result(XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [.element(XMLElement(name: "subscriptions", namespace: PubSubNamespace.pubsub))]))
            case (.get, "affiliations") where isOwner:
                let nodes = try await router.server.storage.storeEntries("pep", of: owner).map(\.key)
                return .result(XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
                    .element(XMLElement(name: "affiliations", namespace: PubSubNamespace.pubsub, children: nodes.map { node in
                        .element(XMLElement(name: "affiliation", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", node), XMLAttribute("affiliation", "owner")]))
                    })),
                ]))
            case (.set, "publish"), (.set, "retract"), (.set, "create"), (.get, "affiliations"):
                // XEP-0060 §7.1.3.1: only the owner publishes to a PEP node.
                return .error(StanzaError(.forbidden))
            default:
                return unsupported(action.name)
            }
        } catch let refusal as PEPRefusal {
            return refusal.response
        } catch {
            router.logger.error("PEP request failed", metadata: ["account": "\(owner)", "action": "\(action.name)", "error": "\(error)"])
            return .error(StanzaError(.internalServerError))
        }
    }

    private func unsupported(_ feature: String) -> IQResponse {
        .error(StanzaError(.featureNotImplemented))
    }

    /// §6.5: items of a node, all (newest `max_items`) or by id.
    private func retrieve(_ request: XMLElement, owner: JID, requester: JID, router: Router) async throws -> IQResponse {
        guard let node = request.attribute("node"), !node.isEmpty else { throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, "nodeid-required") }
        let storage = router.server.storage
        let rosterItem = requester.bare == owner ? nil : await router.roster.item(of: owner, contact: requester.bare)
        // An account that does not exist has no nodes: the same answer (RFC 6120 §13).
        guard let configuration = try await configuration(of: node, owner: owner, storage: storage) else { throw PEPRefusal(StanzaError(.itemNotFound)) }
        let decision = PEPAccess.decide(configuration, owner: owner, requester: requester, rosterItem: rosterItem)
        guard decision == .allowed else {
            let (error, condition) = PEPAccess.error(decision, rosterItem: rosterItem)
            throw PEPRefusal(error, condition)
        }
        var items = try await items(of: node, owner: owner, storage: storage)
        let wanted = request.children(name: "item", namespace: PubSubNamespace.pubsub).compactMap { $0.attribute("id") }
        if !wanted.isEmpty {
            items = items.filter { wanted.contains($0.id) }
        } else if let maxItems = request.attribute("max_items").flatMap(Int.init), maxItems >= 0 {
            items = Array(items.suffix(maxItems))
        }
        return .result(XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
            .element(XMLElement(name: "items", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", node)],
                                children: items.reversed().map { .element(itemElement($0, namespace: PubSubNamespace.pubsub)) })),
        ]))
    }

    /// §7.1: publish, creating the node with the publish-options (XEP-0223) or checking them
    /// as preconditions on an existing node.
    private func publish(_ publish: XMLElement, options: XMLElement?, owner: JID, router: Router) async throws -> IQResponse {
        guard let node = publish.attribute("node"), !node.isEmpty else { throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, "nodeid-required") }
        guard mayNotify(owner) else {
            router.server.metrics.pepRateLimited.increment()
            router.logger.info("PEP publish refused: the account's notifications are over the rate", metadata: ["account": "\(owner)", "node": "\(node)"])
            throw PEPRefusal(StanzaError(.resourceConstraint, type: .wait, text: "too many notifications; publish again in a moment"))
        }
        let storage = router.server.storage
        let items = publish.children(name: "item", namespace: PubSubNamespace.pubsub)
        // §7.1.3.6: PEP publishes one item at a time, with one payload.
        guard items.count == 1, let item = items.first else { throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, "invalid-payload") }
        let payloads = item.children.compactMap { node -> XMLElement? in if case .element(let child) = node { return child }; return nil }
        guard payloads.count == 1, let payload = payloads.first else {
            throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, payloads.isEmpty ? "payload-required" : "invalid-payload")
        }
        let serialized = XMLFragment.serialize(payload)
        guard serialized.utf8.count <= settings.maxItemBytes else { throw PEPRefusal(StanzaError(.notAcceptable), PubSubNamespace.errors, "payload-too-big") }
        let form = options?.firstChild(name: "x", namespace: PubSubNamespace.dataForms)
        var configuration: PEPNodeConfiguration
        if let existing = try await self.configuration(of: node, owner: owner, storage: storage) {
            configuration = existing
            if let form, let field = existing.unmetPrecondition(form, limit: settings.maxItemsPerNode) {
                router.logger.debug("PEP publish-options not met", metadata: ["account": "\(owner)", "node": "\(node)", "field": "\(field)"])
                throw PEPRefusal(StanzaError(.conflict, text: "the node's \(field) differs"), PubSubNamespace.errors, "precondition-not-met")
            }
        } else {
            // §7.1.4 auto-create, XEP-0223: the options configure the new node.
            guard try await storage.storeEntries("pep", of: owner).count < settings.maxNodesPerAccount else {
                throw PEPRefusal(StanzaError(.notAllowed, text: "too many nodes"), PubSubNamespace.errors, "max-nodes-exceeded")
            }
            configuration = PEPNodeConfiguration()
            if let form {
                do {
                    configuration = try configuration.applying(form, limit: settings.maxItemsPerNode)
                } catch {
                    throw PEPRefusal(StanzaError(.conflict, text: "publish-options cannot be applied"), PubSubNamespace.errors, "precondition-not-met")
                }
            }
            try await save(configuration, node: node, owner: owner, storage: storage)
        }
        let id = item.attribute("id").flatMap { $0.isEmpty ? nil : $0 } ?? UUID().uuidString.lowercased()
        try await storage.putStoreEntry(Self.store(node), of: owner, key: id, value: serialized,
                                        keepLast: configuration.keptItems(limit: settings.maxItemsPerNode))
        let published = Item(id: id, payload: payload)
        await notify(owner: owner, node: node, configuration: configuration, router: router) {
            XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", node)],
                       children: [.element(self.itemElement(published, namespace: PubSubNamespace.event, withPayload: configuration.deliverPayloads))])
        }
        // XEP-0402 §5.3: the other bookmark stores follow.
        if node == Bookmarks.node {
            try await bookmarkItemsChanged(owner: owner, router: router)
        } else if node == Bookmarks.legacyNamespace, payload.name == "storage", payload.namespace == Bookmarks.legacyNamespace {
            try await bookmarksChanged(legacy: payload, owner: owner, router: router, fromPrivate: false)
        }
        // XEP-0398 §3.1: the vCard photo follows the avatar.
        if node == Avatars.metadataNode { await avatarMetadataChanged(owner: owner, router: router) }
        return .result(XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
            .element(XMLElement(name: "publish", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", node)], children: [
                .element(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("id", id)])),
            ])),
        ]))
    }

    /// §7.2: retract, notifying when the node or the request asks.
    private func retract(_ retract: XMLElement, owner: JID, router: Router) async throws -> IQResponse {
        guard let node = retract.attribute("node"), !node.isEmpty else { throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, "nodeid-required") }
        let storage = router.server.storage
        guard let configuration = try await configuration(of: node, owner: owner, storage: storage) else { throw PEPRefusal(StanzaError(.itemNotFound)) }
        let ids = retract.children(name: "item", namespace: PubSubNamespace.pubsub).compactMap { $0.attribute("id") }
        guard !ids.isEmpty else { throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, "item-required") }
        var removed: [String] = []
        for id in ids where try await storage.removeStoreEntry(Self.store(node), of: owner, key: id) { removed.append(id) }
        guard !removed.isEmpty else { throw PEPRefusal(StanzaError(.itemNotFound)) }
        if node == Bookmarks.node { try await bookmarkItemsChanged(owner: owner, router: router) }
        if node == Avatars.metadataNode { await avatarMetadataChanged(owner: owner, router: router) }
        let notifyAttribute = retract.attribute("notify")
        if configuration.notifyRetract || notifyAttribute == "true" || notifyAttribute == "1" {
            await notify(owner: owner, node: node, configuration: configuration, router: router) {
                XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", node)], children: removed.map { id in
                    .element(XMLElement(name: "retract", namespace: PubSubNamespace.event, attributes: [XMLAttribute("id", id)]))
                })
            }
        }
        return .result(nil)
    }

    /// §8.1: an explicit create, with an optional configuration.
    private func create(_ create: XMLElement, configure: XMLElement?, owner: JID, router: Router) async throws -> IQResponse {
        guard let node = create.attribute("node"), !node.isEmpty else {
            // Instant (unnamed) nodes make no sense for PEP.
            throw PEPRefusal(StanzaError(.notAcceptable), PubSubNamespace.errors, "nodeid-required")
        }
        let storage = router.server.storage
        guard try await configuration(of: node, owner: owner, storage: storage) == nil else { throw PEPRefusal(StanzaError(.conflict)) }
        guard try await storage.storeEntries("pep", of: owner).count < settings.maxNodesPerAccount else {
            throw PEPRefusal(StanzaError(.notAllowed, text: "too many nodes"), PubSubNamespace.errors, "max-nodes-exceeded")
        }
        var configuration = PEPNodeConfiguration()
        if let form = configure?.firstChild(name: "x", namespace: PubSubNamespace.dataForms) {
            do {
                configuration = try configuration.applying(form, limit: settings.maxItemsPerNode)
            } catch {
                throw PEPRefusal(StanzaError(.notAcceptable), PubSubNamespace.errors, "unsupported-access-model")
            }
        }
        try await save(configuration, node: node, owner: owner, storage: storage)
        return .result(nil)
    }

    // MARK: pubsub#owner (XEP-0060 §8)

    func owner(_ request: IQRequest) async -> IQResponse {
        let owner = request.target.bare
        let router = request.router
        guard request.requester.bare == owner else { return .error(StanzaError(.forbidden)) }
        guard let action = request.payload.children.compactMap({ node -> XMLElement? in
            if case .element(let child) = node, child.namespace == PubSubNamespace.owner { return child }
            return nil
        }).first else { return .error(StanzaError(.badRequest)) }
        let storage = router.server.storage
        let limit = settings.maxItemsPerNode
        do {
            if action.name == "default", request.iq.type == .get {
                return .result(Self.ownerPayload("default", node: nil, children: [PEPNodeConfiguration().form(limit: limit)]))
            }
            guard let node = action.attribute("node"), !node.isEmpty else { throw PEPRefusal(StanzaError(.badRequest), PubSubNamespace.errors, "nodeid-required") }
            return try await router.server.accounts.run(owner) { () async throws -> IQResponse in
                guard var configuration = try await self.configuration(of: node, owner: owner, storage: storage) else { throw PEPRefusal(StanzaError(.itemNotFound)) }
                switch (request.iq.type, action.name) {
                case (.get, "configure"):
                    return .result(Self.ownerPayload("configure", node: node, children: [configuration.form(limit: limit)]))
                case (.set, "configure"):
                    guard let form = action.firstChild(name: "x", namespace: PubSubNamespace.dataForms) else { throw PEPRefusal(StanzaError(.badRequest)) }
                    if form.attribute("type") == "cancel" { return .result(nil) }
                    do {
                        configuration = try configuration.applying(form, limit: limit)
                    } catch {
                        throw PEPRefusal(StanzaError(.notAcceptable, text: "a field has a value the node cannot take"))
                    }
                    try await self.save(configuration, node: node, owner: owner, storage: storage)
                    // A smaller max_items trims at once.
                    let entries = try await storage.storeEntries(Self.store(node), of: owner)
                    for entry in entries.dropLast(configuration.keptItems(limit: limit)) {
                        try await storage.removeStoreEntry(Self.store(node), of: owner, key: entry.key)
                    }
                    return .result(nil)
                case (.set, "delete"):
                    try await storage.removeStore(Self.store(node), of: owner)
                    try await storage.removeStoreEntry("pep", of: owner, key: node)
                    if node == Bookmarks.node { try await self.bookmarkItemsChanged(owner: owner, router: router) }
                    if node == Avatars.metadataNode { await self.avatarMetadataChanged(owner: owner, router: router) }
                    await self.notify(owner: owner, node: node, configuration: configuration, router: router) {
                        XMLElement(name: "delete", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", node)])
                    }
                    return .result(nil)
                case (.set, "purge"):
                    try await storage.removeStore(Self.store(node), of: owner)
                    if node == Bookmarks.node { try await self.bookmarkItemsChanged(owner: owner, router: router) }
                    if node == Avatars.metadataNode { await self.avatarMetadataChanged(owner: owner, router: router) }
                    await self.notify(owner: owner, node: node, configuration: configuration, router: router) {
                        XMLElement(name: "purge", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", node)])
                    }
                    return .result(nil)
                case (.get, "affiliations"):
                    let affiliations = [("owner", owner.description)] + configuration.members.map { ("member", $0) }
                    return .result(Self.ownerPayload("affiliations", node: node, children: affiliations.map { affiliation, jid in
                        XMLElement(name: "affiliation", namespace: PubSubNamespace.owner, attributes: [XMLAttribute("jid", jid), XMLAttribute("affiliation", affiliation)])
                    }))
                case (.set, "affiliations"):
                    // §8.9.2: members are the readers of a whitelist node.
                    var members = Set(configuration.members)
                    for entry in action.children(name: "affiliation", namespace: PubSubNamespace.owner) {
                        guard let jid = entry.attribute("jid").flatMap({ try? JID($0) })?.bare.description, jid != owner.description else { throw PEPRefusal(StanzaError(.badRequest)) }
                        switch entry.attribute("affiliation") {
                        case "member": members.insert(jid)
                        case "none": members.remove(jid)
                        default: throw PEPRefusal(StanzaError(.notAcceptable, text: "PEP nodes have members only"))
                        }
                    }
                    configuration.members = members.sorted()
                    try await self.save(configuration, node: node, owner: owner, storage: storage)
                    return .result(nil)
                case (.get, "subscriptions"):
                    return .result(Self.ownerPayload("subscriptions", node: node, children: []))
                default:
                    return .error(StanzaError(.featureNotImplemented))
                }
            }
        } catch let refusal as PEPRefusal {
            return refusal.response
        } catch {
            router.logger.error("PEP owner request failed", metadata: ["account": "\(owner)", "action": "\(action.name)", "error": "\(error)"])
            return .error(StanzaError(.internalServerError))
        }
    }

    private static func ownerPayload(_ name: String, node: String?, children: [XMLElement]) -> XMLElement {
        XMLElement(name: "pubsub", namespace: PubSubNamespace.owner, children: [
            .element(XMLElement(name: name, namespace: PubSubNamespace.owner, attributes: node.map { [XMLAttribute("node", $0)] } ?? [],
                                children: children.map { .element($0) })),
        ])
    }

    // MARK: Notifications

    /// Sends an event to every interested resource the node's access model allows: the
    /// owner's, and its contacts' (XEP-0163 §4.3).
    func notify(owner: JID, node: String, configuration: PEPNodeConfiguration, router: Router, _ event: () -> XMLElement) async {
        let (recipients, unresolved) = interested(in: node, owner: owner)
        guard !recipients.isEmpty || !unresolved.isEmpty else { return }
        let roster = (try? await router.server.storage.roster(of: owner).items) ?? []
        let byJID = Dictionary(roster.map { ($0.jid, $0) }, uniquingKeysWith: { first, _ in first })
        let payload = event()
        var sent = 0
        for recipient in recipients {
            guard PEPAccess.decide(configuration, owner: owner, requester: recipient, rosterItem: byJID[recipient.bare]) == .allowed else { continue }
            await send(payload, from: owner, to: recipient, router: router)
            sent += 1
        }
        router.server.metrics.pepNotifications.increment(by: Int64(sent))
        notified(sent, by: owner)
        // A resource that came online a moment ago and whose answer about its capabilities
        // is still on its way is notified once it is known, without holding up the owner.
        for (recipient, claim) in unresolved
        where PEPAccess.decide(configuration, owner: owner, requester: recipient, rosterItem: byJID[recipient.bare]) == .allowed {
            Task {
                let features = await self.caps.resolve(claim, entity: recipient) { entity, node in
                    await self.ask(entity, node: node, from: owner, router: router)
                }
                if features?.contains(node + "+notify") == true { await self.send(payload, from: owner, to: recipient, router: router) }
            }
        }
    }

    private func send(_ payload: XMLElement, from owner: JID, to recipient: JID, router: Router) async {
        let message = XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("from", owner.description), XMLAttribute("to", recipient.description), XMLAttribute("type", "headline"),
            XMLAttribute("id", ServerContext.randomIdentifier(bytes: 6)),
        ], children: [.element(XMLElement(name: "event", namespace: PubSubNamespace.event, children: [.element(payload)]))])
        if let stanza = Stanza(message) { await router.route(stanza) }
    }

    /// XEP-0163 §4.3.3: a resource that became available gets the last item of each node
    /// it wants and may read.
    private func sendLastItems(of owner: JID, to recipient: JID, features: Set<String>, router: Router) async {
        let storage = router.server.storage
        guard let nodes = try? await storage.storeEntries("pep", of: owner), !nodes.isEmpty else { return }
        let rosterItem = recipient.bare == owner ? nil : await router.roster.item(of: owner, contact: recipient.bare)
        let decoder = JSONDecoder()
        for entry in nodes where features.contains(entry.key + "+notify") {
            guard let configuration = try? decoder.decode(PEPNodeConfiguration.self, from: Data(entry.value.utf8)),
                  configuration.sendLastPublishedItem == "on_sub_and_presence",
                  PEPAccess.decide(configuration, owner: owner, requester: recipient, rosterItem: rosterItem) == .allowed,
                  let last = try? await items(of: entry.key, owner: owner, storage: storage).last else { continue }
            let item = itemElement(last, namespace: PubSubNamespace.event, withPayload: configuration.deliverPayloads)
            await send(XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", entry.key)], children: [.element(item)]),
                       from: owner, to: recipient, router: router)
        }
    }

    // MARK: Discovery

    /// The nodes `requester` may read, for the account's `disco#items` (XEP-0163 §6.2).
    func discoItems(of owner: JID, requester: JID, router: Router) async -> [XMLElement] {
        guard let nodes = try? await router.server.storage.storeEntries("pep", of: owner.bare) else { return [] }
        let rosterItem = requester.bare == owner.bare ? nil : await router.roster.item(of: owner.bare, contact: requester.bare)
        let decoder = JSONDecoder()
        return nodes.compactMap { entry in
            guard let configuration = try? decoder.decode(PEPNodeConfiguration.self, from: Data(entry.value.utf8)),
                  PEPAccess.decide(configuration, owner: owner, requester: requester, rosterItem: rosterItem) == .allowed else { return nil }
            return XMLElement(name: "item", namespace: DiscoModule.items, attributes: [XMLAttribute("jid", owner.bare.description), XMLAttribute("node", entry.key)])
        }
    }
}

/// A PEP request refused with a stanza error and, often, a `pubsub#errors` condition.
struct PEPRefusal: Error {
    var error: StanzaError
    var condition: XMLElement?

    init(_ error: StanzaError, _ condition: XMLElement? = nil) {
        self.error = error
        self.condition = condition
    }

    init(_ error: StanzaError, _ namespace: String, _ name: String) {
        self.init(error, XMLElement(name: name, namespace: namespace))
    }

    var response: IQResponse {
        condition.map { .errorWithCondition(error, $0) } ?? .error(error)
    }
}
