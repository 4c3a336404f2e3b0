import Foundation
import Logging
import Synchronization
import XMPPCore
import XMPPStream

/// Decides where every stanza goes (RFC 6120 §10, RFC 6121 §8).
///
/// A stanza from a local client is stamped with the session's JID first; from then on its
/// `from` is trusted. A stanza for a hosted domain is handled here and never forwarded
/// (§10.5); one for any other domain goes to the ``RemoteRoute``. Feature logic lives in the
/// services and modules this router holds; the router only applies addressing rules.
public final class Router: SessionOwner {
    let server: ServerContext
    let presence: PresenceService
    let roster: RosterService
    let messages: MessageService
    let modules: ModuleDispatcher
    private let remoteRoute: Mutex<any RemoteRoute>
    var logger: Logger { server.logger }

    init(server: ServerContext, remote: any RemoteRoute, modules: ModuleDispatcher) {
        self.server = server
        remoteRoute = Mutex(remote)
        roster = RosterService(server: server)
        presence = PresenceService(server: server, roster: roster)
        messages = MessageService(server: server)
        self.modules = modules
    }

    /// Replaces the remote route (federation installs itself here).
    public func setRemoteRoute(_ route: any RemoteRoute) {
        remoteRoute.withLock { $0 = route }
    }

    // MARK: From local clients

    public func process(_ element: XMLElement, from session: ClientSession) async {
        guard let stanza = Stanza(element) else { return }
        // RFC 6120 §8.1.2.1: the server stamps `from` with the sender's full JID, whatever
        // the client put there.
        let sent = stanza.stamped(from: session.jid)
        let target: JID?
        do {
            target = try sent.to()
        } catch {
            // RFC 7622 §4: a malformed address in a stanza gets a stanza error.
            await deliverError(to: session, replyingTo: sent, StanzaError(.jidMalformed))
            return
        }
        guard let stamped = await modules.offerClientStanza(sent, to: target, session: session, router: self) else { return }
        switch stamped.kind {
        case .presence:
            await presence.outbound(stamped, to: target, from: session, router: self)
        case .message:
            await messages.outbound(stamped, to: target, from: session, router: self)
        case .iq:
            if target == nil || target == session.jid.bare {
                // No `to`, or the account itself: the server answers on the account's behalf.
                await handleAccountIQ(stamped, account: session.jid.bare, requester: session.jid, session: session)
            } else {
                await route(stamped)
            }
        }
    }

    // MARK: General routing

    /// Routes a stanza whose `from` is already authenticated.
    public func route(_ stanza: Stanza) async {
        await route(stanza, fromNode: false)
    }

    /// `fromNode`: another node of a cluster sent it here as the owner of its service
    /// entity; it is not sent on again.
    func route(_ stanza: Stanza, fromNode: Bool) async {
        let target: JID?
        do {
            target = try stanza.to()
        } catch {
            await bounce(stanza, with: StanzaError(.jidMalformed))
            return
        }
        guard let target else {
            // Only clients may omit `to` (handled in `process`); elsewhere there is nowhere to go.
            logger.debug("dropping stanza without 'to'", metadata: ["kind": "\(stanza.kind.rawValue)"])
            return
        }
        guard let stanza = await modules.filterRouted(stanza, to: target, router: self) else { return }
        switch server.domains.served(target.domainpart) {
        case .hosted:
            await deliverLocally(stanza, to: target)
        case .service(let label, let parent):
            // In a cluster, each service entity (a room) lives on one node: its owner.
            if !fromNode, let cluster = server.cluster, let owner = cluster.serviceOwner(of: target),
               cluster.cluster.route(stanza: XMLFragment.serialize(stanza.element), on: owner) {
                return
            }
            await deliverToService(stanza, to: target, label: label, parent: parent)
        case nil:
            // In a cluster, one node serves federation (the lease holder): one connection per
            // peer provider, whichever node the sender is on.
            if !fromNode, let cluster = server.cluster, let owner = cluster.federationOwnerElsewhere {
                if stanza.kind == .message {
                    // Kept by this node until the peer server has it (docs/cluster.md): with
                    // an id of its own, by which the holder knows it when the peer
                    // acknowledges it.
                    var message = stanza
                    if (message.id ?? "").isEmpty { message = message.setting(attribute: "id", to: "braid-" + UUID().uuidString.lowercased()) }
                    if cluster.cluster.routeRemote(stanza: XMLFragment.serialize(message.element), on: owner) { return }
                } else if cluster.cluster.route(stanza: XMLFragment.serialize(stanza.element), on: owner) {
                    return
                }
            }
            await remoteRoute.withLock { $0 }.send(stanza, router: self)
        }
    }

    /// A stanza for a service domain (`conference.customer.example`) or one of its entities:
    /// the module that owns the label has it; never forwarded (§10.5).
    private func deliverToService(_ stanza: Stanza, to target: JID, label: String, parent: String) async {
        guard let service = modules.services[label] else {
            await bounce(stanza, with: StanzaError(.serviceUnavailable))
            return
        }
        // XEP-0030 on the service domain itself is the same for every service: its identity
        // and features, as registered. Everything else is the module's.
        if target.localpart == nil, target.resourcepart == nil, let iq = IQ(stanza), iq.type == .get,
           let payload = iq.payload, payload.namespace == DiscoModule.info, payload.attribute("node") == nil {
            var info = DiscoModule.info(identity: (service.category, service.type, service.displayName), features: [DiscoModule.info] + service.features)
            for extended in service.extendedInfo { info = info.appending(extended) }
            await route(iq.result(payload: info).stanza)
            return
        }
        await service.handle(ServiceStanza(stanza: stanza, to: target, parent: parent, router: self))
    }

    /// RFC 6121 §8.5: a stanza for a hosted domain.
    func deliverLocally(_ stanza: Stanza, to target: JID) async {
        if target.localpart == nil {
            await handleDomainStanza(stanza, domain: target.domain)
            return
        }
        // Modules see messages and presence for accounts first (by payload namespace), and
        // may change them (the archive's stanza-id).
        var stanza = stanza
        if stanza.kind != .iq {
            guard let offered = await modules.offer(stanza, to: target, router: self) else { return }
            stanza = offered
        }
        switch stanza.kind {
        case .message:
            await messages.inbound(stanza, to: target, router: self)
        case .presence:
            await presence.inbound(stanza, to: target, router: self)
        case .iq:
            if target.isBare {
                let requester = (try? stanza.from()) ?? target.domain
                await handleAccountIQ(stanza, account: target, requester: requester, session: nil)
            } else if let entry = server.sessions.entry(for: target) {
                entry.session.deliver(stanza.element)
            } else if IQ(stanza)?.type?.isRequest == true {
                // §8.5.3.2.1: no such resource.
                await bounce(stanza, with: StanzaError(.serviceUnavailable))
            }
        }
    }

    /// A stanza to the server's own domain (or a resource of it).
    private func handleDomainStanza(_ stanza: Stanza, domain: JID) async {
        switch stanza.kind {
        case .iq:
            guard let iq = IQ(stanza) else { return }
            guard let type = iq.type else {
                await bounce(stanza, with: StanzaError(.badRequest))
                return
            }
            guard type.isRequest else { return }
            let requester = (try? stanza.from()) ?? domain
            let response = await modules.handleServerIQ(iq, domain: domain, requester: requester, router: self)
            await respond(to: iq, with: response)
        case .message:
            // Nothing on the server consumes messages; tell the sender rather than drop.
            if Message(stanza)?.type != .error && Message(stanza)?.type != .headline {
                await bounce(stanza, with: StanzaError(.serviceUnavailable))
            }
        case .presence:
            // Presence to the server itself (probes, directed presence) needs no answer.
            break
        }
    }

    /// An IQ the server answers on behalf of an account (RFC 6121 §8.5.2.1.3, §8.5.1).
    func handleAccountIQ(_ stanza: Stanza, account: JID, requester: JID, session: ClientSession?) async {
        guard let iq = IQ(stanza) else { return }
        guard let type = iq.type else {
            await bounce(stanza, with: StanzaError(.badRequest))
            return
        }
        guard type.isRequest else { return }
        let response = await modules.handleAccountIQ(iq, account: account, requester: requester, session: session, router: self)
        await respond(to: iq, with: response)
    }

    private func respond(to iq: IQ, with response: IQResponse) async {
        switch response {
        case .result(let payload):
            await route(iq.result(payload: payload).stanza)
        case .error(let error):
            await bounce(iq.stanza, with: error)
        case .errorWithCondition(let error, let condition):
            await bounce(iq.stanza, with: error, extra: condition)
        case .handled:
            break
        }
    }

    // MARK: Errors

    /// Sends the error reply for `stanza` back to its sender (RFC 6120 §8.3). Error stanzas
    /// are never answered with errors.
    public func bounce(_ stanza: Stanza, with error: StanzaError, extra: XMLElement? = nil) async {
        server.cluster?.bounced(stanza)
        guard var reply = stanza.errorReply(error) else { return }
        if let extra, let withExtra = Self.addingToError(reply, extra) { reply = withExtra }
        server.metrics.stanzaErrorSent(error.condition)
        await route(reply)
    }

    /// An application-specific condition (RFC 6120 §8.3.3.2) added to an error stanza's
    /// `<error/>`.
    private static func addingToError(_ reply: Stanza, _ extra: XMLElement) -> Stanza? {
        let element = reply.element
        let children = element.children.map { node -> XMLNode in
            guard case .element(let child) = node, child.name == "error" else { return node }
            return .element(child.appending(extra))
        }
        return Stanza(XMLElement(name: element.name, namespace: element.namespace, attributes: element.attributes, children: children))
    }

    /// An error straight back to a local session (for stanzas whose `to` cannot be parsed).
    func deliverError(to session: ClientSession, replyingTo stanza: Stanza, _ error: StanzaError) async {
        guard let reply = stanza.errorReply(error, from: session.jid.domainpart) else { return }
        server.metrics.stanzaErrorSent(error.condition)
        session.deliver(reply.setting(attribute: "to", to: session.jid.description).element)
    }

    // MARK: Session lifecycle

    public func sessionEnded(_ session: ClientSession, undelivered: [XMLElement]) async {
        server.resumption.remove(session)
        if let entry = server.sessions.unbind(session) {
            server.metrics.sessionsActive.set(Int64(server.sessions.count))
            logger.debug("session ended", metadata: ["jid": "\(session.jid)"])
            if entry.isAvailable || !entry.directedPresence.isEmpty {
                await presence.broadcastUnavailable(of: session, entry: entry, router: self)
            }
        }
        for element in undelivered {
            await messages.handleUndelivered(element, to: session, router: self)
        }
    }
}
