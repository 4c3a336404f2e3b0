import Foundation
import Storage
import XMPPCore
import XMPPStream

/// Bookmarks kept the old ways and the new way in step (XEP-0402 §5.3): XEP-0048's
/// `<storage xmlns='storage:bookmarks'/>` in private XML (`#compat`) and in the PEP node
/// `storage:bookmarks` (`#compat-pep`), and XEP-0402's one item per room in the PEP node
/// `urn:xmpp:bookmarks:1`. A change through any of them is written to the others, with
/// notifications, so Conversations (XEP-0402), Gajim and Dino (either) and older clients
/// (private XML) see the same rooms.
enum Bookmarks {
    static let node = "urn:xmpp:bookmarks:1"
    static let legacyNamespace = "storage:bookmarks"
    /// The private-XML key of XEP-0048's fragment (Clark notation, as the private module keys).
    static let privateKey = "{storage:bookmarks}storage"
    static let features = [node + "#compat", node + "#compat-pep"]

    struct Conference: Equatable, Sendable {
        var jid: String
        var name: String?
        var autojoin: Bool
        var nick: String?
        var password: String?
        /// XEP-0402's `<extensions/>`, kept as given.
        var extensions: XMLElement?
    }

    /// The rooms of a XEP-0048 `<storage/>` (rooms without a valid JID are skipped).
    static func conferences(inLegacy storage: XMLElement) -> [Conference] {
        storage.children(name: "conference", namespace: legacyNamespace).compactMap { conference in
            guard let jid = conference.attribute("jid").flatMap({ try? JID($0) })?.bare.description else { return nil }
            let autojoin = conference.attribute("autojoin")
            return Conference(jid: jid, name: conference.attribute("name"), autojoin: autojoin == "true" || autojoin == "1",
                              nick: conference.firstChild(name: "nick", namespace: legacyNamespace)?.text,
                              password: conference.firstChild(name: "password", namespace: legacyNamespace)?.text)
        }
    }

    /// A XEP-0402 item: its id is the room's JID.
    static func conference(item payload: XMLElement, id: String) -> Conference? {
        guard payload.name == "conference", payload.namespace == node, let jid = (try? JID(id))?.bare.description else { return nil }
        let autojoin = payload.attribute("autojoin")
        return Conference(jid: jid, name: payload.attribute("name"), autojoin: autojoin == "true" || autojoin == "1",
                          nick: payload.firstChild(name: "nick", namespace: node)?.text,
                          password: payload.firstChild(name: "password", namespace: node)?.text,
                          extensions: payload.firstChild(name: "extensions", namespace: node))
    }

    static func item(_ conference: Conference) -> XMLElement {
        var attributes = [XMLAttribute("autojoin", conference.autojoin ? "true" : "false")]
        if let name = conference.name { attributes.append(XMLAttribute("name", name)) }
        var children: [XMLNode] = []
        if let nick = conference.nick { children.append(.element(XMLElement(name: "nick", namespace: node, text: nick))) }
        if let password = conference.password { children.append(.element(XMLElement(name: "password", namespace: node, text: password))) }
        if let extensions = conference.extensions { children.append(.element(extensions)) }
        return XMLElement(name: "conference", namespace: node, attributes: attributes, children: children)
    }

    /// A XEP-0048 `<storage/>` with `conferences`, keeping what else `previous` held (URLs,
    /// other clients' children).
    static func legacy(_ conferences: [Conference], keeping previous: XMLElement?) -> XMLElement {
        let kept = previous?.children.filter { node in
            guard case .element(let child) = node else { return false }
            return !(child.name == "conference" && child.namespace == legacyNamespace)
        } ?? []
        let rooms: [XMLNode] = conferences.map { conference in
            var attributes = [XMLAttribute("jid", conference.jid), XMLAttribute("autojoin", conference.autojoin ? "true" : "false")]
            if let name = conference.name { attributes.append(XMLAttribute("name", name)) }
            var children: [XMLNode] = []
            if let nick = conference.nick { children.append(.element(XMLElement(name: "nick", namespace: legacyNamespace, text: nick))) }
            if let password = conference.password { children.append(.element(XMLElement(name: "password", namespace: legacyNamespace, text: password))) }
            return .element(XMLElement(name: "conference", namespace: legacyNamespace, attributes: attributes, children: children))
        }
        return XMLElement(name: "storage", namespace: legacyNamespace, children: rooms + kept)
    }

    /// XEP-0402 §3: the node's configuration, the publish-options its clients send (so their
    /// first publish finds its preconditions met): owner only, every item kept, no last item.
    static var nodeConfiguration: PEPNodeConfiguration {
        var configuration = PEPNodeConfiguration()
        configuration.accessModel = .whitelist
        configuration.maxItems = nil
        configuration.persistItems = true
        configuration.sendLastPublishedItem = "never"
        return configuration
    }

    /// XEP-0048 over PEP: one item, `current`, owner only.
    static var legacyNodeConfiguration: PEPNodeConfiguration {
        var configuration = PEPNodeConfiguration()
        configuration.accessModel = .whitelist
        return configuration
    }
}

extension PEPService {
    /// The legacy `<storage/>` changed (private XML, or the `storage:bookmarks` node): the
    /// XEP-0402 items follow (added, changed, retracted, each notified), and so does the
    /// other legacy copy. Runs under the owner's serializer (the caller's).
    func bookmarksChanged(legacy storage: XMLElement, owner: JID, router: Router, fromPrivate: Bool) async throws {
        let store = router.server.storage
        let wanted = Bookmarks.conferences(inLegacy: storage)
        let configuration = try await configuration(of: Bookmarks.node, owner: owner, storage: store) ?? Bookmarks.nodeConfiguration
        if try await self.configuration(of: Bookmarks.node, owner: owner, storage: store) == nil {
            try await save(configuration, node: Bookmarks.node, owner: owner, storage: store)
        }
        let current = try await store.storeEntries(Self.store(Bookmarks.node), of: owner)
        var existing: [String: Bookmarks.Conference] = [:]
        for entry in current {
            if let payload = try? XMLFragment.parse(entry.value), let conference = Bookmarks.conference(item: payload, id: entry.key) {
                existing[entry.key] = conference
            }
        }
        for conference in wanted {
            var merged = conference
            merged.extensions = existing[conference.jid]?.extensions
            guard existing[conference.jid] != merged else { continue }
            let payload = Bookmarks.item(merged)
            try await store.putStoreEntry(Self.store(Bookmarks.node), of: owner, key: conference.jid, value: XMLFragment.serialize(payload),
                                          keepLast: configuration.keptItems(limit: settings.maxItemsPerNode))
            let item = Item(id: conference.jid, payload: payload)
            await notify(owner: owner, node: Bookmarks.node, configuration: configuration, router: router) {
                XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", Bookmarks.node)],
                           children: [.element(self.itemElement(item, namespace: PubSubNamespace.event))])
            }
        }
        let kept = Set(wanted.map(\.jid))
        for entry in current where !kept.contains(entry.key) {
            try await store.removeStoreEntry(Self.store(Bookmarks.node), of: owner, key: entry.key)
            await notify(owner: owner, node: Bookmarks.node, configuration: configuration, router: router) {
                XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", Bookmarks.node)], children: [
                    .element(XMLElement(name: "retract", namespace: PubSubNamespace.event, attributes: [XMLAttribute("id", entry.key)])),
                ])
            }
        }
        if fromPrivate {
            try await writeLegacyNode(storage, owner: owner, router: router)
        } else {
            try await store.putStoreEntry("private", of: owner, key: Bookmarks.privateKey, value: XMLFragment.serialize(storage), keepLast: nil)
        }
    }

    /// The XEP-0402 items changed: both legacy copies are rewritten from them.
    func bookmarkItemsChanged(owner: JID, router: Router) async throws {
        let store = router.server.storage
        let conferences = try await store.storeEntries(Self.store(Bookmarks.node), of: owner).compactMap { entry -> Bookmarks.Conference? in
            guard let payload = try? XMLFragment.parse(entry.value) else { return nil }
            return Bookmarks.conference(item: payload, id: entry.key)
        }
        let previous = try await store.storeEntry("private", of: owner, key: Bookmarks.privateKey).flatMap { try? XMLFragment.parse($0.value) }
        let legacy = Bookmarks.legacy(conferences, keeping: previous)
        try await store.putStoreEntry("private", of: owner, key: Bookmarks.privateKey, value: XMLFragment.serialize(legacy), keepLast: nil)
        try await writeLegacyNode(legacy, owner: owner, router: router)
    }

    /// XEP-0048 over PEP, when the account has that node (a client created it): its one item.
    private func writeLegacyNode(_ legacy: XMLElement, owner: JID, router: Router) async throws {
        let store = router.server.storage
        guard let configuration = try await configuration(of: Bookmarks.legacyNamespace, owner: owner, storage: store) else { return }
        let previous = try await store.storeEntry(Self.store(Bookmarks.legacyNamespace), of: owner, key: "current")
        let value = XMLFragment.serialize(legacy)
        guard previous?.value != value else { return }
        try await store.putStoreEntry(Self.store(Bookmarks.legacyNamespace), of: owner, key: "current", value: value, keepLast: 1)
        let item = Item(id: "current", payload: legacy)
        await notify(owner: owner, node: Bookmarks.legacyNamespace, configuration: configuration, router: router) {
            XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", Bookmarks.legacyNamespace)],
                       children: [.element(self.itemElement(item, namespace: PubSubNamespace.event))])
        }
    }
}
