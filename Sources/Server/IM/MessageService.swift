import Foundation
import Storage
import XMPPCore
import XMPPStream

/// Message delivery (RFC 6121 §8.5) and offline storage. Features that act on messages
/// (carbons, and later the archive) are modules that observe what this sends and delivers.
final class MessageService: Sendable {
    static let delay = "urn:xmpp:delay"

    let server: ServerContext

    init(server: ServerContext) {
        self.server = server
    }

    // MARK: From the user's own client

    func outbound(_ stanza: Stanza, to target: JID?, from session: ClientSession, router: Router) async {
        guard let target else {
            // A message with no `to` is for the account itself (RFC 6120 §10.3.1).
            await inbound(stanza.setting(attribute: "to", to: session.jid.bare.description), to: session.jid.bare, router: router)
            return
        }
        if let message = Message(stanza) {
            await router.modules.messageSent(message, session: session, router: router)
        }
        await router.route(stanza.addressed(to: target, from: session.jid))
    }

    // MARK: To a local user

    func inbound(_ stanza: Stanza, to target: JID, router: Router) async {
        guard let message = Message(stanza) else { return }
        let account = target.bare
        if !target.isBare {
            if let entry = server.sessions.entry(for: target) {
                // §8.5.3.1: the resource exists.
                entry.session.deliver(stanza.element)
                router.modules.messageDelivered(message, account: account, resources: [target], router: router)
                // A device that lost its connection and may resume (XEP-0198) has not got it
                // yet: push wakes it (XEP-0357 §5.2), as for a message to the bare JID.
                if entry.session.isWaitingForResumption, message.type == .chat || message.type == .normal {
                    await router.modules.messageWaiting(message, account: account, waiting: .awaitingResumption, router: router)
                }
                return
            }
            // §8.5.3.2.1: no such resource.
            switch message.type {
            case .normal, .chat:
                break  // treated as addressed to the bare JID, below
            case .groupchat:
                await router.bounce(stanza, with: StanzaError(.serviceUnavailable))
                return
            case .headline, .error:
                return
            }
        }
        await deliverToBare(stanza, message: message, account: account, router: router)
    }

    /// §8.5.2: a message for the account as a whole.
    ///
    /// Whether the account has an available resource, and so whether the message is
    /// delivered now or stored, is decided under the account's serializer, the same one the
    /// initial presence runs under while it delivers stored messages: so a live message can
    /// neither overtake the stored ones nor be stored after they were taken (RFC 6120 §10.1).
    private func deliverToBare(_ stanza: Stanza, message: Message, account: JID, router: Router) async {
        enum Outcome: Sendable {
            case done
            /// Delivered or stored, and no device has it yet.
            case waiting(WaitingMessage.Where)
            case bounce(StanzaError)
        }
        let server = self.server
        let outcome: Outcome = (try? await server.accounts.run(account) { () async -> Outcome in
            let candidates = server.sessions.entries(of: account).filter { $0.isAvailable && $0.priority >= 0 }
            if !candidates.isEmpty {
                switch message.type {
                case .normal, .chat:
                    // §8.5.2.1.1: the most available resources: those with the highest priority.
                    let top = candidates.map(\.priority).max() ?? 0
                    let chosen = candidates.filter { $0.priority == top }
                    // In a cluster, a copy sent to another node's session carries who else got
                    // one (ClusterBridge.deliveredTogether): lost with that node, it is not
                    // delivered to them again.
                    if chosen.count > 1 {
                        ClusterBridge.$deliveredTogether.withValue(chosen.map { $0.session.jid }) {
                            for entry in chosen { entry.session.deliver(stanza.element) }
                        }
                    } else {
                        for entry in chosen { entry.session.deliver(stanza.element) }
                    }
                    router.modules.messageDelivered(message, account: account, resources: Set(chosen.map { $0.session.jid }), router: router)
                    return chosen.allSatisfy { $0.session.isWaitingForResumption } ? .waiting(.awaitingResumption) : .done
                case .headline:
                    for entry in candidates { entry.session.deliver(stanza.element) }
                    return .done
                case .groupchat:
                    return .bounce(StanzaError(.serviceUnavailable))
                case .error:
                    return .done  // §8.5.2.1.1: silently ignored
                }
            }
            // §8.5.2.2: no available resource.
            switch message.type {
            case .normal, .chat:
                return await self.storeOffline(stanza, account: account) ? .waiting(.offline) : .bounce(StanzaError(.serviceUnavailable))
            case .groupchat:
                return .bounce(StanzaError(.serviceUnavailable))
            case .headline, .error:
                return .done
            }
        }) ?? .bounce(StanzaError(.internalServerError))
        switch outcome {
        case .bounce(let error):
            await router.bounce(stanza, with: error)
        case .waiting(let place):
            await router.modules.messageWaiting(message, account: account, waiting: place, router: router)
        case .done:
            break
        }
    }

    /// Stores a message for an offline account; false when it cannot be stored. A missing
    /// account, a full store and a storage failure all end in the same
    /// `service-unavailable`, so the answer never tells whether the account exists (RFC 6120
    /// §13, RFC 6121 §8.5.1).
    private func storeOffline(_ stanza: Stanza, account: JID) async -> Bool {
        do {
            if try await server.storage.userExists(account) {
                let stored = try await server.storage.storeOfflineMessage(
                    for: account, stanza: XMLFragment.serialize(stanza.element), limit: server.configuration.offline.maxMessagesPerUser)
                if stored {
                    server.metrics.offlineStored.increment()
                    return true
                }
                server.logger.info("offline store full", metadata: ["account": "\(account)"])
            }
        } catch {
            server.logger.error("offline store failed", metadata: ["account": "\(account)", "error": "\(error)"])
        }
        server.metrics.offlineRefused.increment()
        return false
    }

    /// Delivers stored messages at the account's next available presence, oldest first,
    /// each stamped with when it was stored (XEP-0203).
    func deliverOffline(to session: ClientSession, router: Router) async {
        let account = session.jid.bare
        do {
            let stored = try await server.storage.takeOfflineMessages(for: account)
            for message in stored {
                guard let element = try? XMLFragment.parse(message.stanza) else {
                    server.logger.error("unreadable offline message dropped", metadata: ["account": "\(account)"])
                    continue
                }
                let delay = XMLElement(name: "delay", namespace: Self.delay, attributes: [
                    XMLAttribute("from", account.domainpart),
                    XMLAttribute("stamp", Self.timestamp(millisecondsSince1970: message.storedAt)),
                ], text: "Offline storage")
                server.metrics.offlineDelivered.increment()
                session.deliver(element.appending(delay))
            }
        } catch {
            server.logger.error("offline delivery failed", metadata: ["account": "\(account)", "error": "\(error)"])
        }
    }

    /// A stanza that reached a session which then ended before the client acknowledged it.
    /// Messages go back through delivery (another resource, or offline storage); IQ
    /// requests get an error; presence is state and is not replayed.
    func handleUndelivered(_ element: XMLElement, to session: ClientSession, router: Router) async {
        await handleUndelivered(element, to: session.jid, router: router)
    }

    /// The same for a stanza that was on its way to `resource` (a session on another node
    /// of a cluster, or one that ended before a node link brought it).
    func handleUndelivered(_ element: XMLElement, to resource: JID, router: Router) async {
        guard let stanza = Stanza(element) else { return }
        switch stanza.kind {
        case .message:
            guard let message = Message(stanza), message.type != .error, message.type != .groupchat, message.type != .headline else { return }
            // What the server itself sent this resource on the account's behalf (from its
            // bare JID: a carbon copy, say) is a copy; the original went elsewhere already.
            if (try? stanza.from()) == resource.bare { return }
            await deliverToBare(stanza, message: message, account: resource.bare, router: router)
        case .iq:
            if IQ(stanza)?.type?.isRequest == true {
                await router.bounce(stanza, with: StanzaError(.recipientUnavailable))
            }
        case .presence:
            break
        }
    }

    // MARK: Helpers

    /// XEP-0082 date-time in UTC with milliseconds.
    static func timestamp(millisecondsSince1970: Int64) -> String {
        let date = Date(timeIntervalSince1970: Double(millisecondsSince1970) / 1000)
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC") ?? calendar.timeZone
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second, .nanosecond], from: date)
        func pad(_ value: Int?, _ width: Int) -> String {
            let text = String(value ?? 0)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        return "\(pad(c.year, 4))-\(pad(c.month, 2))-\(pad(c.day, 2))T\(pad(c.hour, 2)):\(pad(c.minute, 2)):\(pad(c.second, 2)).\(pad((c.nanosecond ?? 0) / 1_000_000, 3))Z"
    }
}

extension XMLElement {
    /// A copy whose content-namespace elements (`jabber:client`/`jabber:server`) are all in
    /// `namespace`, for stanzas embedded in another (RFC 6120 §4.8.3; XEP-0297 wants
    /// `jabber:client` inside `<forwarded/>`).
    func rescopingContent(to namespace: String) -> XMLElement {
        let children = self.children.map { node -> XMLNode in
            if case .element(let child) = node { return .element(child.rescopingContent(to: namespace)) }
            return node
        }
        return XMLElement(name: name, namespace: XMLNamespace.isContent(self.namespace) ? namespace : self.namespace, attributes: attributes, children: children)
    }
}
