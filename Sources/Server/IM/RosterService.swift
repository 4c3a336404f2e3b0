import Storage
import XMPPCore

/// Namespaces of the roster protocol.
enum RosterNamespace {
    static let roster = "jabber:iq:roster"
}

/// Rosters (RFC 6121 §2): the IQ protocol, versioning, pushes, and serialized updates.
///
/// Every change to an account's roster runs inside ``AccountSerializer`` for that account, so
/// a roster set from the client and a subscription answer from a contact arriving at the same
/// time cannot overwrite each other.
final class RosterService: Sendable {
    let server: ServerContext
    var serializer: AccountSerializer { server.accounts }

    init(server: ServerContext) {
        self.server = server
    }

    // MARK: IQ

    func handleIQ(_ iq: IQ, account: JID, requester: JID, session: ClientSession?) async -> IQResponse {
        // Only the account itself reads or writes its roster (RFC 6121 §2.1.5).
        guard requester.bare == account, let query = iq.payload else {
            return .error(StanzaError(.serviceUnavailable))
        }
        do {
            switch iq.type {
            case .get:
                return try await get(query, account: account, session: session)
            case .set:
                return try await set(query, account: account)
            default:
                return .handled
            }
        } catch {
            server.logger.error("roster storage failed", metadata: ["account": "\(account)", "error": "\(error)"])
            return .error(StanzaError(.internalServerError))
        }
    }

    private func get(_ query: XMLElement, account: JID, session: ClientSession?) async throws -> IQResponse {
        if let session {
            server.sessions.update(session) { $0.interestedInRoster = true }
        }
        let roster = try await server.storage.roster(of: account)
        // §2.6.3: when the client's version is current, an empty result; pushes follow.
        if let version = query.attribute("ver"), version == "\(roster.version)" {
            return .result(nil)
        }
        let items = roster.items.sorted { $0.jid < $1.jid }.map(Self.element(for:))
        return .result(XMLElement(name: "query", namespace: RosterNamespace.roster, attributes: [XMLAttribute("ver", "\(roster.version)")], children: items.map(XMLNode.element)))
    }

    private func set(_ query: XMLElement, account: JID) async throws -> IQResponse {
        let items = query.children(name: "item", namespace: RosterNamespace.roster)
        // §2.3.3: exactly one item.
        guard items.count == 1, let item = items.first else { return .error(StanzaError(.badRequest, text: "exactly one item")) }
        guard let jidText = item.attribute("jid") else { return .error(StanzaError(.badRequest, text: "missing jid")) }
        guard let contact = try? JID(jidText) else { return .error(StanzaError(.jidMalformed)) }
        guard contact.isBare else { return .error(StanzaError(.badRequest, text: "roster items are bare JIDs")) }

        if item.attribute("subscription") == "remove" {
            return try await remove(contact, account: account)
        }
        let name = item.attribute("name").flatMap { $0.isEmpty ? nil : $0 }
        if let name, name.utf8.count > 1023 { return .error(StanzaError(.notAcceptable, text: "name too long")) }
        var groups: [String] = []
        for group in item.children(name: "group", namespace: RosterNamespace.roster) {
            let text = group.text
            // §2.3.3: empty groups are not acceptable; duplicates are a bad request.
            guard !text.isEmpty, text.utf8.count <= 1023 else { return .error(StanzaError(.notAcceptable, text: "invalid group name")) }
            guard !groups.contains(text) else { return .error(StanzaError(.badRequest, text: "duplicate group")) }
            groups.append(text)
        }
        let chosenGroups = groups
        try await update(account: account, contact: contact) { existing in
            var updated = existing ?? RosterItem(jid: contact)
            // The client sets name and groups only; subscription state is the server's (§2.1.2.5).
            updated.name = name
            updated.groups = chosenGroups
            return (updated, ())
        }
        return .result(nil)
    }

    /// §2.5: removing an item cancels the subscriptions both ways.
    private func remove(_ contact: JID, account: JID) async throws -> IQResponse {
        let removed: RosterItem? = try await serializer.run(account) {
            guard let existing = try await self.server.storage.rosterItem(of: account, contact: contact) else { return nil }
            if let version = try await self.server.storage.removeRosterItem(of: account, contact: contact) {
                await self.push(RosterItem(jid: contact), removed: true, version: version, account: account)
            }
            return existing
        }
        guard let removed else { return .error(StanzaError(.itemNotFound)) }
        let router = server.router
        if removed.subscription == .to || removed.subscription == .both || removed.pendingOut {
            await router.route(Presence(to: contact, from: account, type: .unsubscribe).stanza)
        }
        if removed.subscription == .from || removed.subscription == .both || removed.pendingIn {
            await router.route(Presence(to: contact, from: account, type: .unsubscribed).stanza)
        }
        try await server.storage.removeSubscriptionRequest(of: account, from: contact)
        return .result(nil)
    }

    // MARK: Updates from the subscription logic

    /// Changes one item, storing and pushing it only when something changed. `transform`
    /// gets the current item and returns the new one (nil deletes it) and a value for the
    /// caller, computed under the same per-account serialization.
    @discardableResult
    func update<T: Sendable>(account: JID, contact: JID, _ transform: @escaping @Sendable (RosterItem?) -> (item: RosterItem?, result: T)) async throws -> T {
        try await serializer.run(account) {
            let existing = try await self.server.storage.rosterItem(of: account, contact: contact)
            let (updated, result) = transform(existing)
            if updated == existing { return result }
            if let updated {
                let version = try await self.server.storage.putRosterItem(updated, of: account)
                await self.push(updated, removed: false, version: version, account: account)
            } else if let version = try await self.server.storage.removeRosterItem(of: account, contact: contact) {
                await self.push(RosterItem(jid: contact), removed: true, version: version, account: account)
            }
            let router = self.server.router
            await router.modules.rosterChanged(account: account, contact: contact, before: existing, after: updated, router: router)
            return result
        }
    }

    func item(of account: JID, contact: JID) async -> RosterItem? {
        do {
            return try await server.storage.rosterItem(of: account, contact: contact)
        } catch {
            server.logger.error("roster read failed", metadata: ["account": "\(account)", "error": "\(error)"])
            return nil
        }
    }

    /// The contacts whose subscription state matches, for presence broadcast and probes.
    func contacts(of account: JID, where predicate: (RosterItem) -> Bool) async -> [JID] {
        do {
            return try await server.storage.roster(of: account).items.filter(predicate).map(\.jid)
        } catch {
            server.logger.error("roster read failed", metadata: ["account": "\(account)", "error": "\(error)"])
            return []
        }
    }

    /// §2.1.6: a roster push to every resource that asked for the roster.
    private func push(_ item: RosterItem, removed: Bool, version: Int64, account: JID) async {
        let itemElement = removed
            ? XMLElement(name: "item", namespace: RosterNamespace.roster, attributes: [XMLAttribute("jid", item.jid.description), XMLAttribute("subscription", "remove")])
            : Self.element(for: item)
        for entry in server.sessions.entries(of: account) where entry.interestedInRoster {
            let push = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("type", "set"), XMLAttribute("id", "push-" + ServerContext.randomIdentifier(bytes: 6)),
                XMLAttribute("to", entry.session.jid.description), XMLAttribute("from", account.description),
            ], children: [.element(XMLElement(name: "query", namespace: RosterNamespace.roster, attributes: [XMLAttribute("ver", "\(version)")], children: [.element(itemElement)]))])
            entry.session.deliver(push)
        }
    }

    // MARK: Representation

    // Inbound requests from contacts not on the roster are kept as stored requests, not
    // as roster items, and are presented as presence stanzas (RFC 6121 §3.1.3); so every
    // stored item is shown.

    static func element(for item: RosterItem) -> XMLElement {
        var attributes = [XMLAttribute("jid", item.jid.description), XMLAttribute("subscription", item.subscription.rawValue)]
        if let name = item.name { attributes.append(XMLAttribute("name", name)) }
        if item.pendingOut { attributes.append(XMLAttribute("ask", "subscribe")) }
        if item.approved { attributes.append(XMLAttribute("approved", "true")) }
        return XMLElement(name: "item", namespace: RosterNamespace.roster, attributes: attributes, children: item.groups.map {
            .element(XMLElement(name: "group", namespace: RosterNamespace.roster, text: $0))
        })
    }
}
