import Storage
import XMPPCore
import XMPPStream

/// Presence (RFC 6121 §3–§4): subscriptions, broadcast, probes and directed presence.
final class PresenceService: Sendable {
    let server: ServerContext
    let roster: RosterService

    init(server: ServerContext, roster: RosterService) {
        self.server = server
        self.roster = roster
    }

    // MARK: From the user's own client

    func outbound(_ stanza: Stanza, to target: JID?, from session: ClientSession, router: Router) async {
        guard let presence = Presence(stanza) else { return }
        guard presence.hasValidType else {
            await router.deliverError(to: session, replyingTo: stanza, StanzaError(.badRequest, text: "unknown presence type"))
            return
        }
        let type = presence.type
        switch type {
        case .subscribe, .subscribed, .unsubscribe, .unsubscribed:
            guard let type, let target else {
                await router.deliverError(to: session, replyingTo: stanza, StanzaError(.badRequest, text: "subscription requests need a 'to'"))
                return
            }
            await outboundSubscription(type, stanza: stanza, contact: target.bare, account: session.jid.bare, router: router)
        case .probe:
            // Probes are the server's business (§4.3); ignore a client's.
            return
        case .error:
            if target != nil { await router.route(stanza) }
        case nil, .unavailable:
            if let target {
                await directed(stanza, to: target, from: session, router: router)
            } else {
                await broadcast(presence, from: session, router: router)
            }
        }
    }

    /// §3: the user subscribes, approves, cancels or denies.
    private func outboundSubscription(_ type: PresenceType, stanza: Stanza, contact: JID, account: JID, router: Router) async {
        guard contact != account else { return }
        do {
            let requestStored = try await hasStoredRequest(account: account, contact: contact)
            let decision = try await roster.update(account: account, contact: contact) { item in
                let result = SubscriptionRules.outbound(type, SubscriptionState(item: item, requestStored: requestStored))
                // An approval or pre-approval of a contact not yet on the roster creates the item
                // (§3.1.5, §3.4); denying a stranger's request does not.
                let state = result.state
                if item == nil && !state.to && !state.from && !state.pendingOut && !state.approved { return (nil, result) }
                return (result.state.applied(to: item, contact: contact), result)
            }
            if type == .subscribed || type == .unsubscribed {
                try await server.storage.removeSubscriptionRequest(of: account, from: contact)
            }
            guard decision.route else { return }
            // §3.1.2: the user's server stamps the bare JID on subscription stanzas.
            await router.route(stanza.addressed(to: contact, from: account))
            if type == .subscribed {
                // §3.1.5: the new subscriber gets the user's current presence.
                for entry in server.sessions.entries(of: account) {
                    if let current = entry.presence {
                        await router.route(Stanza(current)?.addressed(to: contact, from: entry.session.jid) ?? stanza)
                    }
                }
            }
        } catch {
            server.logger.error("subscription update failed", metadata: ["account": "\(account)", "error": "\(error)"])
        }
    }

    /// §4.6: presence sent to one entity, outside the roster's broadcast.
    private func directed(_ stanza: Stanza, to target: JID, from session: ClientSession, router: Router) async {
        let available = Presence(stanza)?.type == nil
        let subscribed = await roster.item(of: session.jid.bare, contact: target.bare).map { $0.subscription == .from || $0.subscription == .both } ?? false
        if !subscribed {
            server.sessions.update(session) { entry in
                if available { entry.directedPresence.insert(target) } else { entry.directedPresence.remove(target) }
            }
        }
        await router.route(stanza)
    }

    /// §4.2 and §4.4: initial and subsequent presence, and §4.5 unavailable.
    private func broadcast(_ presence: Presence, from session: ClientSession, router: Router) async {
        let account = session.jid.bare
        let isAvailable = presence.type == nil
        let element = presence.element.setting(attribute: "to", to: nil)
        let server = self.server
        // Becoming available and receiving the stored messages happen as one step for the
        // account, so no live message slips in between (see MessageService.deliverToBare).
        let previous = try? await server.accounts.run(account) { () async -> (wasAvailable: Bool, directed: Set<JID>)? in
            let previous = server.sessions.update(session) { entry -> (wasAvailable: Bool, directed: Set<JID>) in
                let before = (entry.isAvailable, entry.directedPresence)
                entry.presence = isAvailable ? element : nil
                entry.priority = presence.priority
                if !isAvailable { entry.directedPresence = [] }
                return before
            }
            if let previous, isAvailable, !previous.wasAvailable, presence.priority >= 0 {
                await router.messages.deliverOffline(to: session, router: router)
            }
            return previous
        } ?? nil
        guard let previous else { return }
        if !isAvailable && !previous.wasAvailable && previous.directed.isEmpty { return }
        let initial = isAvailable && !previous.wasAvailable

        let subscribers = await roster.contacts(of: account) { $0.subscription == .from || $0.subscription == .both }
        var recipients = Set(subscribers)
        if !isAvailable { recipients.formUnion(previous.directed) }
        for contact in recipients where contact != account {
            await router.route(Stanza(element)?.addressed(to: contact, from: session.jid) ?? presence.stanza)
        }
        // §4.2.2 and §4.4.2: every available resource of the user sees it, including the one
        // that sent it (clients use the echo to confirm their own state; Prosody and ejabberd
        // send it too). A new resource also sees the others'.
        if isAvailable {
            session.deliver(element.setting(attribute: "to", to: session.jid.description).setting(attribute: "from", to: session.jid.description))
        }
        for entry in server.sessions.entries(of: account) where entry.session !== session {
            if entry.isAvailable {
                entry.session.deliver(element.setting(attribute: "to", to: entry.session.jid.description).setting(attribute: "from", to: session.jid.description))
            }
            if initial, let theirs = entry.presence {
                session.deliver(theirs.setting(attribute: "to", to: session.jid.description).setting(attribute: "from", to: entry.session.jid.description))
            }
        }
        guard initial else { return }
        // §4.3: probe the contacts the user is subscribed to.
        let subscriptions = await roster.contacts(of: account) { $0.subscription == .to || $0.subscription == .both }
        for contact in subscriptions where contact != account {
            await router.route(Presence(to: contact, from: account, type: .probe).stanza)
        }
        // §3.1.3: requests that arrived while the user was away are delivered now.
        do {
            for request in try await server.storage.subscriptionRequests(of: account) {
                if let element = try? XMLFragment.parse(request.stanza) {
                    session.deliver(element.setting(attribute: "to", to: account.description))
                }
            }
        } catch {
            server.logger.error("reading subscription requests failed", metadata: ["account": "\(account)", "error": "\(error)"])
        }
    }

    /// Broadcasts unavailable for a session that ended without saying so (§4.5.2).
    func broadcastUnavailable(of session: ClientSession, entry: SessionRegistry.Entry, router: Router) async {
        let account = session.jid.bare
        let unavailable = Presence(from: session.jid, type: .unavailable)
        var recipients = Set(await roster.contacts(of: account) { $0.subscription == .from || $0.subscription == .both })
        recipients.formUnion(entry.directedPresence)
        for contact in recipients where contact != account {
            await router.route(unavailable.stanza.addressed(to: contact, from: session.jid))
        }
        for other in server.sessions.entries(of: account) where other.isAvailable {
            other.session.deliver(unavailable.element.setting(attribute: "to", to: other.session.jid.description))
        }
    }

    // MARK: To a local user

    func inbound(_ stanza: Stanza, to target: JID, router: Router) async {
        guard let presence = Presence(stanza) else { return }
        let account = target.bare
        guard let sender = try? stanza.from() else { return }
        switch presence.type {
        case .subscribe, .subscribed, .unsubscribe, .unsubscribed:
            guard let type = presence.type else { return }
            await inboundSubscription(type, stanza: stanza, contact: sender.bare, account: account, router: router)
        case .probe:
            await answerProbe(from: sender, account: account, router: router)
        case nil, .unavailable, .error:
            if target.isBare {
                // §8.5.2.1.3: presence to the bare JID goes to every available resource.
                for entry in server.sessions.entries(of: account) where entry.isAvailable {
                    entry.session.deliver(stanza.element)
                }
            } else if let entry = server.sessions.entry(for: target) {
                // §8.5.3.1: directed to one resource. An unknown resource is ignored (§8.5.3.2.1).
                entry.session.deliver(stanza.element)
            }
        }
    }

    private func inboundSubscription(_ type: PresenceType, stanza: Stanza, contact: JID, account: JID, router: Router) async {
        do {
            // A request for an account that does not exist is dropped silently, exactly as a
            // request that is already pending: nothing reveals which accounts exist.
            guard try await server.storage.userExists(account) else { return }
            let requestStored = try await hasStoredRequest(account: account, contact: contact)
            let decision = try await roster.update(account: account, contact: contact) { item in
                let result = SubscriptionRules.inbound(type, SubscriptionState(item: item, requestStored: requestStored))
                // Requests from strangers stay stored requests, not roster items (§3.1.3).
                guard item != nil || result.state.to || result.state.from || result.state.pendingOut else { return (item, result) }
                return (result.state.applied(to: item, contact: contact), result)
            }
            let bare = stanza.addressed(to: account, from: contact)
            switch type {
            case .subscribe where decision.deliver:
                try await server.storage.putSubscriptionRequest(of: account, from: contact, stanza: XMLFragment.serialize(bare.element))
            case .unsubscribe, .unsubscribed:
                try await server.storage.removeSubscriptionRequest(of: account, from: contact)
            default:
                break
            }
            if decision.deliver {
                for entry in server.sessions.entries(of: account) where entry.isAvailable {
                    entry.session.deliver(bare.element)
                }
            }
            if decision.autoReplySubscribed {
                await router.route(Presence(to: contact, from: account, type: .subscribed).stanza)
            }
            if decision.sendUnavailable {
                for entry in server.sessions.entries(of: account) where entry.isAvailable {
                    await router.route(Presence(to: contact, from: entry.session.jid, type: .unavailable).stanza)
                }
            }
            if type == .subscribed && decision.deliver {
                // The new subscription: ask for the contact's presence right away.
                await router.route(Presence(to: contact, from: account, type: .probe).stanza)
            }
        } catch {
            server.logger.error("inbound subscription failed", metadata: ["account": "\(account)", "error": "\(error)"])
        }
    }

    /// §4.3.2: a probe is answered only for a contact the user shares presence with.
    private func answerProbe(from prober: JID, account: JID, router: Router) async {
        let item = await roster.item(of: account, contact: prober.bare)
        guard let item, item.subscription == .from || item.subscription == .both else {
            // Not subscribed, or no such account: the same silence (no harvesting).
            return
        }
        let available = server.sessions.entries(of: account).filter(\.isAvailable)
        if available.isEmpty {
            await router.route(Presence(to: prober, from: account, type: .unavailable).stanza)
            return
        }
        for entry in available {
            if let presence = entry.presence, let stanza = Stanza(presence) {
                await router.route(stanza.addressed(to: prober, from: entry.session.jid))
            }
        }
    }

    private func hasStoredRequest(account: JID, contact: JID) async throws -> Bool {
        let requests = try await server.storage.subscriptionRequests(of: account)
        return requests.contains { stored in
            guard let element = try? XMLFragment.parse(stored.stanza), let from = element.attribute("from") else { return false }
            return (try? JID(from))?.bare == contact
        }
    }
}
