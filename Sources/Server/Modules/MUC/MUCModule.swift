import Foundation
import Synchronization
import XMPPCore
import XMPPStream

/// XEP-0045 group chat at `conference.DOMAIN` for every hosted domain (`services.muc`), with
/// no object per domain until a room exists. Rooms are temporary and live in memory (persistent
/// rooms, affiliations lists, the admin and owner forms, and limits come next: issue 11).
///
/// Each room's events run one at a time, in arrival order, on the server's per-JID serializer,
/// and what a room returns is routed before its next event: occupants see every room's
/// stanzas in one order.
struct MUCModule: BraidModule {
    static let label = "conference"
    static let features = [
        "http://jabber.org/protocol/muc", "http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items",
        "urn:xmpp:ping",
    ]

    let rooms = MUCRooms()

    var name: String { "muc" }

    func register(in builder: inout ModuleBuilder) {
        let rooms = self.rooms
        builder.service(ServiceRegistration(label: Self.label, category: "conference", type: "text", displayName: "Group chat",
                                            features: Self.features) { service in
            await Self.handle(service, rooms: rooms)
        })
    }

    static func handle(_ service: ServiceStanza, rooms: MUCRooms) async {
        let stanza = service.stanza
        guard let from = try? stanza.from() else { return }
        guard let localpart = service.to.localpart else {
            await handleService(service, from: from, rooms: rooms)
            return
        }
        guard let room = try? JID(localpart: localpart, domainpart: service.to.domainpart, resourcepart: nil as String?) else { return }
        let router = service.router
        // One event at a time per room, its stanzas routed before the next.
        _ = try? await router.server.accounts.run(room) {
            let out = rooms.apply(stanza, from: from, to: service.to, room: room, parent: service.parent, now: Date())
            for element in out {
                if let reply = Stanza(element) { await router.route(reply) }
            }
        }
    }

    /// Stanzas to the service itself: `disco#items` lists the rooms (§6.3).
    private static func handleService(_ service: ServiceStanza, from: JID, rooms: MUCRooms) async {
        guard let iq = IQ(service.stanza), iq.type == .get, let payload = iq.payload else {
            if IQ(service.stanza)?.type?.isRequest == true { await service.bounce(with: StanzaError(.featureNotImplemented)) }
            return
        }
        guard payload.namespace == "http://jabber.org/protocol/disco#items", payload.attribute("node") == nil else {
            await service.bounce(with: StanzaError(.featureNotImplemented))
            return
        }
        let items = rooms.listed(on: service.to.domainpart).map { room in
            XMLNode.element(XMLElement(name: "item", namespace: payload.namespace, attributes: [
                XMLAttribute("jid", room.jid.description), XMLAttribute("name", room.jid.localpart ?? ""),
            ]))
        }
        await service.send(iq.result(payload: XMLElement(name: "query", namespace: payload.namespace, children: items)).stanza)
    }
}

/// The rooms that exist, by bare room JID. Each call is one event of one room (the module
/// serialises them per room), applied to the room's value under the lock.
final class MUCRooms: Sendable {
    private let rooms = Mutex<[JID: MUCRoom]>([:])

    var count: Int { rooms.withLock { $0.count } }

    func room(_ jid: JID) -> MUCRoom? { rooms.withLock { $0[jid] } }

    func listed(on service: String) -> [MUCRoom] {
        rooms.withLock { Array($0.values) }.filter { $0.jid.domainpart == service && !$0.locked }.sorted { $0.jid.description < $1.jid.description }
    }

    /// Applies one stanza to its room; returns what to send.
    func apply(_ stanza: Stanza, from: JID, to: JID, room: JID, parent: String, now: Date) -> [XMLElement] {
        rooms.withLock { rooms -> [XMLElement] in
            var state = rooms[room] ?? MUCRoom(jid: room)
            let out = Self.event(stanza, from: from, to: to, state: &state, parent: parent, now: now)
            rooms[room] = state.isEmpty ? nil : state
            return out
        }
    }

    private static func event(_ stanza: Stanza, from: JID, to: JID, state: inout MUCRoom, parent: String, now: Date) -> [XMLElement] {
        switch stanza.kind {
        case .presence:
            if stanza.isError {
                // The occupant's client is gone (its presence bounced): it leaves.
                return state.remove(realJID: from)
            }
            guard let nick = to.resourcepart, !nick.isEmpty else {
                // §7.2.6: entering needs a nickname.
                return [MUCRoom.error(stanza, StanzaError(.jidMalformed, text: "a nickname is required"), from: to)]
            }
            // Rooms are created by the users of the domain the service belongs to.
            let mayCreate = from.domainpart == parent && from.localpart != nil
            return state.presence(stanza, from: from, nick: nick, isCreator: mayCreate, now: now)
        case .message:
            if stanza.isError {
                return state.remove(realJID: from)
            }
            return state.message(stanza, from: from, nick: to.resourcepart, now: now)
        case .iq:
            return iq(stanza, from: from, to: to, state: &state)
        }
    }

    private static func iq(_ stanza: Stanza, from: JID, to: JID, state: inout MUCRoom) -> [XMLElement] {
        guard let iq = IQ(stanza), let type = iq.type, type.isRequest else { return [] }
        guard let payload = iq.payload else { return [MUCRoom.error(stanza, StanzaError(.badRequest), from: to)] }
        if let nick = to.resourcepart {
            // XEP-0410: a ping to one's own occupant JID says whether one is still in.
            guard payload.namespace == "urn:xmpp:ping", type == .get else {
                return [MUCRoom.error(stanza, StanzaError(.featureNotImplemented), from: to)]
            }
            guard state.occupant(nick: nick)?.realJID == from else {
                return [MUCRoom.error(stanza, StanzaError(.notAcceptable, text: "not in the room under that nickname"), from: to)]
            }
            return [iq.result(payload: nil).stanza.setting(attribute: "from", to: to.description).element]
        }
        switch (payload.namespace, type) {
        case ("http://jabber.org/protocol/disco#info", .get) where !state.isEmpty:
            return [iq.result(payload: DiscoModule.info(identity: ("conference", "text", state.jid.localpart), features: [
                "http://jabber.org/protocol/muc", "muc_temporary", "muc_open", "muc_semianonymous", "muc_unmoderated", "muc_public",
            ])).stanza.element]
        case (MUCNamespace.owner, .get) where state.owners.contains(from.bare):
            // §10.1.3: the form; every field has the value the room has (nothing is configurable yet).
            return [iq.result(payload: XMLElement(name: "query", namespace: MUCNamespace.owner, children: [
                .element(XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", "form")], children: [
                    .element(XMLElement(name: "title", namespace: MUCNamespace.dataForms, text: "Configuration of \(state.jid)")),
                    .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [
                        XMLAttribute("var", "FORM_TYPE"), XMLAttribute("type", "hidden"),
                    ], children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: "http://jabber.org/protocol/muc#roomconfig"))])),
                ])),
            ])).stanza.element]
        case (MUCNamespace.owner, .set) where state.owners.contains(from.bare):
            // §10.1.2 (instant room: an empty submit) and §10.1.3 (a submitted form); a
            // cancel leaves the room locked.
            let form = payload.firstChild(name: "x", namespace: MUCNamespace.dataForms)
            if form?.attribute("type") == "submit" { _ = state.configure(by: from) }
            return [iq.result(payload: nil).stanza.element]
        case ("http://jabber.org/protocol/disco#info", .get):
            return [MUCRoom.error(stanza, StanzaError(.itemNotFound), from: to)]
        case (MUCNamespace.owner, _):
            return [MUCRoom.error(stanza, StanzaError(.forbidden), from: to)]
        default:
            return [MUCRoom.error(stanza, StanzaError(.featureNotImplemented), from: to)]
        }
    }
}
