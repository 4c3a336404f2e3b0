import Foundation
import Logging
import Storage
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
        "urn:xmpp:ping", "urn:xmpp:occupant-id:0",
    ]

    let settings: BraidConfiguration.MUCSettings
    let rooms: MUCRooms

    init(settings: BraidConfiguration.MUCSettings = .init()) {
        self.settings = settings
        rooms = MUCRooms(settings: settings)
    }

    var name: String { "muc" }

    func register(in builder: inout ModuleBuilder) {
        let rooms = self.rooms
        builder.service(ServiceRegistration(label: Self.label, category: "conference", type: "text", displayName: "Group chat",
                                            features: Self.features) { service in
            await Self.handle(service, rooms: rooms)
        })
        builder.onShutdown { router in
            // §7.14, status 332: every occupant learns the room is going away with the server.
            for element in rooms.shutDown() {
                if let stanza = Stanza(element) { await router.route(stanza) }
            }
        }
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
        let storage = router.server.storage
        let logger = router.server.logger
        await rooms.loadIfNeeded(from: storage, logger: logger)
        if service.to.resourcepart == nil, let iq = IQ(stanza), iq.type == .set, let payload = iq.payload, payload.namespace == MAMModule.namespace, payload.name == "query" {
            await queryArchive(iq, payload: payload, from: from, room: room, service: service, rooms: rooms)
            return
        }
        // One event at a time per room, its stanzas routed (and the room saved) before the next.
        _ = try? await router.server.accounts.run(room) {
            await rooms.restoreHistoryIfNeeded(room, from: storage, logger: logger)
            let mayCreate: Bool = switch rooms.settings.roomCreators {
            case "anyone": true
            case "local": from.localpart != nil && router.server.domains.isHosted(from.domainpart)
            default: from.localpart != nil && from.domainpart == service.parent
            }
            let effects = rooms.apply(stanza, from: from, to: service.to, room: room, parent: service.parent, now: Date(),
                                      occupantIDKey: router.server.secret, mayCreate: mayCreate)
            do {
                if let saved = effects.save { try await storage.putGroupChatRoom(saved) }
                if let forgotten = effects.forget { try await storage.removeGroupChatRoom(forgotten) }
                if let archived = effects.archive {
                    try await storage.archiveRoomMessage(archived, room: room, parentDomain: service.parent, expireBefore: nil)
                }
                if effects.removeArchive { try await storage.removeRoomArchive(room) }
            } catch {
                logger.error("saving a group-chat room failed", metadata: ["room": "\(room)", "error": "\(error)"])
            }
            for element in effects.out {
                if let reply = Stanza(element) { await router.route(reply) }
            }
        }
    }

    /// XEP-0313 on a room: its archive, for whoever may enter it (an occupant, or anyone when
    /// the room is open); the same `item-not-found` as for a room that does not exist
    /// otherwise.
    private static func queryArchive(_ iq: IQ, payload: XMLElement, from: JID, room: JID, service: ServiceStanza, rooms: MUCRooms) async {
        guard let current = rooms.room(room), current.configuration.logging,
              current.occupant(realJID: from) != nil || (!current.configuration.membersOnly && current.configuration.password == nil)
                || ["owner", "admin", "member"].contains(current.affiliation(of: from)) else {
            await service.bounce(with: StanzaError(.itemNotFound))
            return
        }
        let router = service.router
        let outcome = await MAMModule.answer(payload, archive: room, requester: from, settings: BraidConfiguration.MAMSettings(), router: router,
                                             fetch: { query in try await router.server.storage.archivedRoomMessages(query, room: room) },
                                             deliver: { result in if let stanza = Stanza(result) { await router.route(stanza) } })
        switch outcome {
        case .success(let fin): await service.send(iq.result(payload: fin).stanza.setting(attribute: "from", to: room.description))
        case .failure(let error): await service.bounce(with: error)
        }
    }

    /// Stanzas to the service itself: `disco#items` lists the public rooms (§6.3).
    private static func handleService(_ service: ServiceStanza, from: JID, rooms: MUCRooms) async {
        await rooms.loadIfNeeded(from: service.router.server.storage, logger: service.router.server.logger)
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
                XMLAttribute("jid", room.jid.description), XMLAttribute("name", room.configuration.name.isEmpty ? room.jid.localpart ?? "" : room.configuration.name),
            ]))
        }
        await service.send(iq.result(payload: XMLElement(name: "query", namespace: payload.namespace, children: items)).stanza)
    }
}

/// The rooms that exist, by bare room JID: the ones with occupants, and the persistent ones
/// (loaded from storage on first use). Each call is one event of one room (the module
/// serialises them per room), applied to the room's value under the lock.
final class MUCRooms: Sendable {
    private struct State {
        var rooms: [JID: MUCRoom] = [:]
        /// Rooms per service domain, kept with `rooms` (the limit check is O(1)).
        var perService: [String: Int] = [:]
        var loaded = false

        mutating func set(_ room: MUCRoom?, at jid: JID) {
            let had: Bool
            if let room {
                had = rooms.updateValue(room, forKey: jid) != nil
                if !had { perService[jid.domainpart, default: 0] += 1 }
            } else {
                had = rooms.removeValue(forKey: jid) != nil
                if had { perService[jid.domainpart, default: 1] -= 1 }
            }
            if perService[jid.domainpart] == 0 { perService[jid.domainpart] = nil }
        }
    }

    private let state = Mutex(State())
    private let loading = Mutex<Task<Void, Never>?>(nil)
    let settings: BraidConfiguration.MUCSettings

    init(settings: BraidConfiguration.MUCSettings = .init()) {
        self.settings = settings
    }

    /// What one event changed beyond its stanzas.
    struct Effects {
        var out: [XMLElement] = []
        /// The room to store (persistent, configured or its affiliations changed).
        var save: StoredRoom?
        /// The room to forget (destroyed, or made temporary).
        var forget: JID?
        /// A message for the room's archive (XEP-0313), and the archive to remove (the room
        /// is gone: destroyed, or temporary and empty).
        var archive: ArchivedMessage?
        var removeArchive = false
    }

    var count: Int { state.withLock { $0.rooms.count } }

    /// The server is stopping: every occupant of every room leaves with 332; persistent rooms
    /// stay stored.
    func shutDown() -> [XMLElement] {
        state.withLock { state in
            var out: [XMLElement] = []
            for jid in Array(state.rooms.keys) {
                guard var room = state.rooms[jid] else { continue }
                out += room.shutDown()
                state.set(room.isGone ? nil : room, at: jid)
            }
            return out
        }
    }

    func room(_ jid: JID) -> MUCRoom? { state.withLock { $0.rooms[jid] } }

    /// A persistent room's history after a restart comes from its archive: read once, under
    /// the room's serializer, before its first event.
    func restoreHistoryIfNeeded(_ jid: JID, from storage: any Storage, logger: Logger) async {
        guard let current = room(jid), current.historyInArchive else { return }
        var entries: [(message: XMLElement, at: Date)] = []
        if current.configuration.logging {
            do {
                let page = try await storage.archivedRoomMessages(ArchiveQuery(lastPage: true, limit: current.historyLimit), room: jid)
                entries = page.messages.compactMap { archived in
                    (try? XMLFragment.parse(archived.stanza)).map { ($0, Date(timeIntervalSince1970: Double(archived.stamp) / 1000)) }
                }
            } catch {
                // The room works without its history; the next restart tries again.
                logger.error("reading a room's history from its archive failed", metadata: ["room": "\(jid)", "error": "\(error)"])
            }
        }
        state.withLock { state in
            guard var room = state.rooms[jid] else { return }
            room.restoreHistory(entries)
            state.rooms[jid] = room
        }
    }

    func listed(on service: String) -> [MUCRoom] {
        state.withLock { Array($0.rooms.values) }
            .filter { $0.jid.domainpart == service && !$0.locked && $0.configuration.isPublic }
            .sorted { $0.jid.description < $1.jid.description }
    }

    /// Loads the persistent rooms once (concurrent callers share the load).
    func loadIfNeeded(from storage: any Storage, logger: Logger) async {
        if state.withLock({ $0.loaded }) { return }
        let task = loading.withLock { current -> Task<Void, Never> in
            if let current { return current }
            let task = Task { [self] in
                do {
                    let stored = try await storage.groupChatRooms()
                    let decoder = JSONDecoder()
                    state.withLock { state in
                        for room in stored where state.rooms[room.jid] == nil {
                            guard let configuration = try? decoder.decode(MUCRoomConfiguration.self, from: Data(room.configuration.utf8)),
                                  let affiliations = try? decoder.decode([String: String].self, from: Data(room.affiliations.utf8)) else {
                                logger.error("unreadable group-chat room skipped", metadata: ["room": "\(room.jid)"])
                                continue
                            }
                            let byJID = Dictionary(affiliations.compactMap { key, value in (try? JID(key)).map { ($0, value) } }, uniquingKeysWith: { $1 })
                            state.set(MUCRoom(jid: room.jid, configuration: configuration, affiliations: byJID, historyLimit: settings.historyLength), at: room.jid)
                        }
                        state.loaded = true
                    }
                } catch {
                    logger.error("loading group-chat rooms failed; trying again with the next stanza", metadata: ["error": "\(error)"])
                }
            }
            current = task
            return task
        }
        await task.value
        loading.withLock { current in if state.withLock({ !$0.loaded }) { current = nil } }
    }

    /// Applies one stanza to its room. The caller runs one event per room at a time (the
    /// module's per-room serializer), so the room's value is taken out, changed without the
    /// lock, and put back: rooms do not wait for each other, and building the copies of a
    /// message for a large room holds no lock.
    func apply(_ stanza: Stanza, from: JID, to: JID, room: JID, parent: String, now: Date, occupantIDKey: [UInt8] = [],
               mayCreate: Bool? = nil) -> Effects {
        let (stored, roomsOnService) = state.withLock { ($0.rooms[room], $0.perService[room.domainpart] ?? 0) }
        do {
            let exists = stored != nil
            var current = stored ?? MUCRoom(jid: room, historyLimit: settings.historyLength)
            if !exists { current.configuration.maxUsers = min(current.configuration.maxUsers, settings.maxOccupantsPerRoom) }
            current.occupantIDKey = occupantIDKey
            current.messageRate = settings.messagesPerSecond > 0
                ? SendingRate(perSecond: settings.messagesPerSecond, burst: max(1, settings.messageBurst)) : nil
            let wasPersistent = current.isPersistent
            let before = (current.configuration, current.affiliations)
            var effects = Effects()
            if let refusal = limitRefusal(stanza, to: to, room: current, exists: exists, roomsOnService: roomsOnService) {
                effects.out = [refusal]
                return effects
            }
            let creator = mayCreate ?? (from.domainpart == parent && from.localpart != nil)
            let stanzaID = stanza.kind == .message && stanza.typeAttribute == "groupchat" && to.resourcepart == nil && !stanza.isError
                ? ServerContext.randomIdentifier(bytes: 12) : nil
            effects.out = Self.event(stanza, from: from, to: to, state: &current, mayCreate: creator, now: now, stanzaID: stanzaID)
            if let stanzaID, let kept = current.history.last, kept.message.children(name: "stanza-id", namespace: MAMModule.stanzaIDs).contains(where: { $0.attribute("id") == stanzaID }) {
                effects.archive = ArchivedMessage(id: stanzaID, with: kept.message.attribute("from") ?? room.description,
                                                  stamp: Int64((kept.at.timeIntervalSince1970 * 1000).rounded(.down)), stanza: XMLFragment.serialize(kept.message))
            }
            if exists && current.isGone { effects.removeArchive = true }
            let result = current
            state.withLock { $0.set(result.isGone ? nil : result, at: room) }
            if current.isPersistent && (!wasPersistent || before.0 != current.configuration || before.1 != current.affiliations) {
                effects.save = Self.stored(current, parent: parent, now: now)
            } else if wasPersistent && !current.isPersistent {
                effects.forget = room
                effects.removeArchive = effects.removeArchive || current.isEmpty
            }
            return effects
        }
    }

    /// The configured limits, checked before the room sees the stanza: nicknames and
    /// subjects too long, too many rooms on one service (rooms created at the same moment by
    /// different users may pass that check together: it bounds, by a few, not exactly).
    private func limitRefusal(_ stanza: Stanza, to: JID, room: MUCRoom, exists: Bool, roomsOnService: Int) -> XMLElement? {
        switch stanza.kind {
        case .presence where !stanza.isError && stanza.typeAttribute != "unavailable":
            // The nickname's characters are the room's to check (RFC 8266, `MUCNickname`).
            if let nick = to.resourcepart, nick.count > settings.maxNickLength {
                return MUCRoom.error(stanza, StanzaError(.notAcceptable, text: "nicknames are at most \(settings.maxNickLength) characters"), from: to)
            }
            if !exists && roomsOnService >= settings.maxRoomsPerService {
                return MUCRoom.error(stanza, StanzaError(.resourceConstraint, text: "this service holds no more rooms"), from: to)
            }
        case .message where !stanza.isError:
            if let subject = stanza.element.firstChild(name: "subject", namespace: stanza.element.namespace), subject.text.count > settings.maxSubjectLength {
                return MUCRoom.error(stanza, StanzaError(.notAcceptable, text: "subjects are at most \(settings.maxSubjectLength) characters"), from: to)
            }
        case .iq:
            // The form's "most occupants" cannot pass the service's limit.
            if let form = IQ(stanza)?.payload?.firstChild(name: "x", namespace: MUCNamespace.dataForms),
               let field = form.children(name: "field", namespace: MUCNamespace.dataForms).first(where: { $0.attribute("var") == "muc#roomconfig_maxusers" }),
               let value = Int(field.firstChild(name: "value", namespace: MUCNamespace.dataForms)?.text ?? ""), value > settings.maxOccupantsPerRoom {
                return MUCRoom.error(stanza, StanzaError(.notAcceptable, text: "rooms here hold at most \(settings.maxOccupantsPerRoom) occupants"), from: to)
            }
        default:
            break
        }
        return nil
    }

    private static func stored(_ room: MUCRoom, parent: String, now: Date) -> StoredRoom {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let configuration = (try? encoder.encode(room.configuration)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        let affiliations = Dictionary(room.affiliations.map { ($0.key.description, $0.value) }, uniquingKeysWith: { $1 })
        let affiliationsText = (try? encoder.encode(affiliations)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return StoredRoom(jid: room.jid, parentDomain: parent, configuration: configuration, affiliations: affiliationsText,
                          createdAt: Int64(now.timeIntervalSince1970))
    }

    private static func event(_ stanza: Stanza, from: JID, to: JID, state: inout MUCRoom, mayCreate: Bool, now: Date, stanzaID: String? = nil) -> [XMLElement] {
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
            // Who may create rooms is the operator's choice (muc.room_creators).
            return state.presence(stanza, from: from, nick: nick, isCreator: mayCreate, now: now)
        case .message:
            if stanza.isError {
                return state.remove(realJID: from)
            }
            return state.message(stanza, from: from, nick: to.resourcepart, now: now, stanzaID: stanzaID)
        case .iq:
            return iq(stanza, from: from, to: to, state: &state)
        }
    }

    private static func iq(_ stanza: Stanza, from: JID, to: JID, state: inout MUCRoom) -> [XMLElement] {
        guard let iq = IQ(stanza), let type = iq.type, type.isRequest else { return [] }
        guard let payload = iq.payload else { return [MUCRoom.error(stanza, StanzaError(.badRequest), from: to)] }
        let exists = !state.occupants.isEmpty || state.isPersistent
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
        let isOwner = state.owners.contains(from.bare)
        switch (payload.namespace, type) {
        case ("http://jabber.org/protocol/disco#info", .get) where exists:
            let info = DiscoModule.info(identity: ("conference", "text", state.configuration.name.isEmpty ? state.jid.localpart : state.configuration.name),
                                        features: roomFeatures(state.configuration))
            return [iq.result(payload: info.appending(roomInfoForm(state))).stanza.element]
        case ("http://jabber.org/protocol/disco#info", .get):
            return [MUCRoom.error(stanza, StanzaError(.itemNotFound), from: to)]
        case (MUCNamespace.owner, .get) where isOwner:
            return [iq.result(payload: XMLElement(name: "query", namespace: MUCNamespace.owner, children: [.element(configurationForm(state))])).stanza.element]
        case (MUCNamespace.owner, .set) where isOwner:
            if let destroy = payload.firstChild(name: "destroy", namespace: MUCNamespace.owner) {
                // §10.9.
                let out = state.destroy(by: from, alternate: destroy.attribute("jid"),
                                        reason: destroy.firstChild(name: "reason", namespace: MUCNamespace.owner)?.text) ?? []
                return out + [iq.result(payload: nil).stanza.element]
            }
            // §10.1.2 (an instant room: an empty submit) and §10.1.3 (a submitted form); a
            // cancel leaves the room as it was.
            guard let form = payload.firstChild(name: "x", namespace: MUCNamespace.dataForms) else {
                return [MUCRoom.error(stanza, StanzaError(.badRequest), from: to)]
            }
            if form.attribute("type") == "submit" {
                guard let configuration = applyForm(form, to: state.configuration) else {
                    return [MUCRoom.error(stanza, StanzaError(.notAcceptable, text: "a field has a value the room cannot take"), from: to)]
                }
                return (state.configure(by: from, configuration) ?? []) + [iq.result(payload: nil).stanza.element]
            }
            return [iq.result(payload: nil).stanza.element]
        case (MUCNamespace.owner, _):
            return [MUCRoom.error(stanza, StanzaError(.forbidden), from: to)]
        case (MUCNamespace.admin, .set) where exists:
            var out: [XMLElement] = []
            for item in payload.children(name: "item", namespace: MUCNamespace.admin) {
                let result: Result<[XMLElement], StanzaError>
                let reason = item.firstChild(name: "reason", namespace: MUCNamespace.admin)?.text
                if let affiliation = item.attribute("affiliation"), let target = item.attribute("jid").flatMap({ try? JID($0) }) {
                    result = state.setAffiliation(of: target, to: affiliation, by: from, reason: reason)
                } else if let role = item.attribute("role"), let nick = item.attribute("nick") {
                    result = state.setRole(of: nick, to: role, by: from, reason: reason)
                } else {
                    result = .failure(StanzaError(.badRequest, text: "an item needs jid and affiliation, or nick and role"))
                }
                switch result {
                case .success(let elements): out += elements
                case .failure(let error): return out + [MUCRoom.error(stanza, error, from: to)]
                }
            }
            // §8.2, §9.1: whoever was removed hears it first, then the moderator gets the
            // result, then the others.
            let removedFirst = out.prefix { element in
                element.attribute("type") == "unavailable"
                    && (element.firstChild(name: "x", namespace: MUCNamespace.user)?.children(name: "status", namespace: MUCNamespace.user).contains { $0.attribute("code") == "110" } ?? false)
            }
            return Array(removedFirst) + [iq.result(payload: nil).stanza.element] + out.dropFirst(removedFirst.count)
        case (MUCNamespace.admin, .get) where exists:
            // §9.5, §10.5: lists by affiliation, for owners and admins.
            guard ["owner", "admin"].contains(state.affiliation(of: from)),
                  let wanted = payload.firstChild(name: "item", namespace: MUCNamespace.admin)?.attribute("affiliation") else {
                return [MUCRoom.error(stanza, StanzaError(.forbidden), from: to)]
            }
            let items = state.members(with: wanted).map { jid in
                XMLNode.element(XMLElement(name: "item", namespace: MUCNamespace.admin, attributes: [XMLAttribute("affiliation", wanted), XMLAttribute("jid", jid.description)]))
            }
            return [iq.result(payload: XMLElement(name: "query", namespace: MUCNamespace.admin, children: items)).stanza.element]
        default:
            return [MUCRoom.error(stanza, StanzaError(.featureNotImplemented), from: to)]
        }
    }

    /// §6.4: the `muc#roominfo` form in the room's disco#info (XEP-0128).
    static func roomInfoForm(_ room: MUCRoom) -> XMLElement {
        func field(_ name: String, _ value: String) -> XMLNode {
            .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("var", name)],
                                children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: value))]))
        }
        return XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", "result")], children: [
            .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("var", "FORM_TYPE"), XMLAttribute("type", "hidden")],
                                children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: "http://jabber.org/protocol/muc#roominfo"))])),
            field("muc#roominfo_description", room.configuration.description),
            field("muc#roominfo_occupants", String(room.occupants.count)),
            field("muc#roominfo_subject", room.subject?.text ?? ""),
            field("muc#roomconfig_roomname", room.configuration.name),
            field("muc#roomconfig_changesubject", room.configuration.changeSubject ? "1" : "0"),
        ])
    }

    static func roomFeatures(_ configuration: MUCRoomConfiguration) -> [String] {
        ["http://jabber.org/protocol/muc",
         configuration.persistent ? "muc_persistent" : "muc_temporary",
         configuration.isPublic ? "muc_public" : "muc_hidden",
         configuration.membersOnly ? "muc_membersonly" : "muc_open",
         configuration.moderated ? "muc_moderated" : "muc_unmoderated",
         configuration.whoIs == "anyone" ? "muc_nonanonymous" : "muc_semianonymous",
         configuration.password == nil ? "muc_unsecured" : "muc_passwordprotected"]
            + (configuration.logging ? [MAMModule.namespace, MAMModule.stanzaIDs] : [])
    }

    /// §10.2's fields Braid supports, with the room's values.
    static func configurationForm(_ room: MUCRoom) -> XMLElement {
        let c = room.configuration
        func field(_ name: String, _ type: String, _ label: String, _ values: [String], options: [String] = []) -> XMLNode {
            var children: [XMLNode] = values.map { .element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: $0)) }
            children += options.map { option in
                .element(XMLElement(name: "option", namespace: MUCNamespace.dataForms, children: [
                    .element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: option)),
                ]))
            }
            return .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [
                XMLAttribute("var", name), XMLAttribute("type", type), XMLAttribute("label", label),
            ], children: children))
        }
        func flag(_ value: Bool) -> String { value ? "1" : "0" }
        return XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", "form")], children: [
            .element(XMLElement(name: "title", namespace: MUCNamespace.dataForms, text: "Configuration of \(room.jid)")),
            .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("var", "FORM_TYPE"), XMLAttribute("type", "hidden")],
                                children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: "http://jabber.org/protocol/muc#roomconfig"))])),
            field("muc#roomconfig_roomname", "text-single", "Name", [c.name]),
            field("muc#roomconfig_roomdesc", "text-single", "Description", [c.description]),
            field("muc#roomconfig_persistentroom", "boolean", "Keep the room when it is empty", [flag(c.persistent)]),
            field("muc#roomconfig_publicroom", "boolean", "List the room publicly", [flag(c.isPublic)]),
            field("muc#roomconfig_membersonly", "boolean", "Members only", [flag(c.membersOnly)]),
            field("muc#roomconfig_moderatedroom", "boolean", "Moderated (visitors have no voice)", [flag(c.moderated)]),
            field("muc#roomconfig_passwordprotectedroom", "boolean", "Password protected", [flag(c.password != nil)]),
            field("muc#roomconfig_roomsecret", "text-private", "Password", c.password.map { [$0] } ?? []),
            field("muc#roomconfig_maxusers", "list-single", "Most occupants", [String(c.maxUsers)], options: ["10", "20", "50", "100", "200", "500"]),
            field("muc#roomconfig_whois", "list-single", "Who may see real JIDs", [c.whoIs], options: ["moderators", "anyone"]),
            field("muc#roomconfig_changesubject", "boolean", "Participants may change the subject", [flag(c.changeSubject)]),
            field("muc#roomconfig_allowpm", "list-single", "Who may send private messages", [c.allowPrivateMessages],
                  options: ["anyone", "participants", "moderators", "none"]),
            field("muc#roomconfig_enablelogging", "boolean", "Keep an archive of the discussion (XEP-0313)", [flag(c.logging)]),
            field("muc#maxhistoryfetch", "text-single", "Messages of history for newcomers (at most \(room.historyLimit))",
                  [String(min(room.historyLimit, c.historyLength ?? room.historyLimit))]),
        ])
    }

    /// A submitted form over the current configuration; nil when a value cannot be taken.
    /// Fields Braid does not know are ignored, as §10.2 allows.
    static func applyForm(_ form: XMLElement, to current: MUCRoomConfiguration) -> MUCRoomConfiguration? {
        var c = current
        var passwordProtected: Bool?
        var secret: String?
        for field in form.children(name: "field", namespace: MUCNamespace.dataForms) {
            guard let name = field.attribute("var") else { continue }
            let value = field.firstChild(name: "value", namespace: MUCNamespace.dataForms)?.text ?? ""
            let bool = value == "1" || value == "true"
            switch name {
            case "muc#roomconfig_roomname": c.name = value
            case "muc#roomconfig_roomdesc": c.description = value
            case "muc#roomconfig_persistentroom": c.persistent = bool
            case "muc#roomconfig_publicroom": c.isPublic = bool
            case "muc#roomconfig_membersonly": c.membersOnly = bool
            case "muc#roomconfig_moderatedroom": c.moderated = bool
            case "muc#roomconfig_passwordprotectedroom": passwordProtected = bool
            case "muc#roomconfig_roomsecret": secret = value
            case "muc#roomconfig_maxusers":
                guard let number = Int(value), number > 0, number <= 10_000 else { return nil }
                c.maxUsers = number
            case "muc#roomconfig_whois":
                guard ["moderators", "anyone"].contains(value) else { return nil }
                c.whoIs = value
            case "muc#roomconfig_changesubject": c.changeSubject = bool
            case "muc#roomconfig_allowpm":
                guard ["anyone", "participants", "moderators", "none"].contains(value) else { return nil }
                c.allowPrivateMessages = value
            case "muc#roomconfig_enablelogging": c.logging = bool
            case "muc#maxhistoryfetch":
                guard let number = Int(value), number >= 0 else { return nil }
                c.historyLength = number
            default: continue
            }
        }
        if let passwordProtected {
            c.password = passwordProtected ? (secret?.isEmpty == false ? secret : c.password) : nil
            if passwordProtected && c.password == nil { return nil }
        } else if let secret, !secret.isEmpty {
            c.password = secret
        }
        return c
    }
}
