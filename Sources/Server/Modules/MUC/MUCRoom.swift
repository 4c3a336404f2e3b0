import Crypto
import Foundation
import XMPPCore
import XMPPStream

/// XEP-0045 namespaces.
enum MUCNamespace {
    static let muc = "http://jabber.org/protocol/muc"
    static let user = "http://jabber.org/protocol/muc#user"
    static let owner = "http://jabber.org/protocol/muc#owner"
    static let admin = "http://jabber.org/protocol/muc#admin"
    static let delay = "urn:xmpp:delay"
    static let occupantID = "urn:xmpp:occupant-id:0"
    static let dataForms = "jabber:x:data"
    static let request = "http://jabber.org/protocol/muc#request"
}

/// One group-chat room as a value: its occupants, subject and history, and per-event methods
/// that change it and return the stanzas to send, in order. No I/O, no clock (the time is
/// passed in), no lock: the module applies events one at a time per room and routes what they
/// return (`MUCRoomTests` feed it every event without sockets).
///
/// What it implements of XEP-0045 (the rest is listed in issue 11): temporary rooms, created
/// locked by their first occupant (status 201) until the owner accepts the instant room or
/// submits a configuration (§10.1); entering with the presence of everyone already there, then
/// the occupant's own (status 110, with 100 in non-anonymous rooms, 201 for a new room), the
/// discussion history (`maxstanzas`) and the subject, always last (§7.2); nickname conflicts
/// (§7.2.9) and changes (303, §7.6); presence updates; leaving (§7.14); groupchat messages
/// reflected to every occupant (§7.4); private messages (§7.5); the subject, changed by
/// moderators (§8.1); self-ping (XEP-0410). Semi-anonymous: real JIDs go to moderators only.
/// A room's configuration (`muc#roomconfig`, XEP-0045 §10.2): what the owner's form sets.
struct MUCRoomConfiguration: Codable, Sendable, Equatable {
    var name = ""
    var description = ""
    var persistent = false
    var isPublic = true
    var membersOnly = false
    var moderated = false
    var password: String?
    var maxUsers = 200
    /// "moderators" (semi-anonymous) or "anyone" (non-anonymous).
    var whoIs = "moderators"
    var changeSubject = false
    /// Who may send private messages (`muc#roomconfig_allowpm`): anyone, participants,
    /// moderators or none.
    var allowPrivateMessages = "anyone"
    /// Messages of history kept for newcomers (`muc#maxhistoryfetch`); nil is the service's
    /// `muc.history_length`, which also bounds it.
    var historyLength: Int?
    /// Whether the room keeps an archive of what is said (`muc#roomconfig_enablelogging`;
    /// XEP-0313 on the room's JID).
    var logging = true

    init() {}

    /// Rooms stored before a field existed keep its default (each key is optional here).
    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = MUCRoomConfiguration()
        name = try container.decodeIfPresent(String.self, forKey: .name) ?? defaults.name
        description = try container.decodeIfPresent(String.self, forKey: .description) ?? defaults.description
        persistent = try container.decodeIfPresent(Bool.self, forKey: .persistent) ?? defaults.persistent
        isPublic = try container.decodeIfPresent(Bool.self, forKey: .isPublic) ?? defaults.isPublic
        membersOnly = try container.decodeIfPresent(Bool.self, forKey: .membersOnly) ?? defaults.membersOnly
        moderated = try container.decodeIfPresent(Bool.self, forKey: .moderated) ?? defaults.moderated
        password = try container.decodeIfPresent(String.self, forKey: .password)
        maxUsers = try container.decodeIfPresent(Int.self, forKey: .maxUsers) ?? defaults.maxUsers
        whoIs = try container.decodeIfPresent(String.self, forKey: .whoIs) ?? defaults.whoIs
        changeSubject = try container.decodeIfPresent(Bool.self, forKey: .changeSubject) ?? defaults.changeSubject
        allowPrivateMessages = try container.decodeIfPresent(String.self, forKey: .allowPrivateMessages) ?? defaults.allowPrivateMessages
        historyLength = try container.decodeIfPresent(Int.self, forKey: .historyLength)
        logging = try container.decodeIfPresent(Bool.self, forKey: .logging) ?? defaults.logging
    }
}

struct MUCRoom: Sendable {
    struct Occupant: Sendable, Equatable {
        /// The nickname as shown (RFC 8266 enforced) …
        var nick: String
        /// … and as compared (`MUCNickname.key`).
        var nickKey: String
        /// The real full JID of the occupant's client.
        var realJID: JID
        var affiliation: String
        var role: String
        /// The occupant's last presence, as the room shows it (its children, without the
        /// `muc` join element).
        var presence: XMLElement
        /// What it may still send (`SendingRate`).
        var allowance: SendingAllowance
    }

    let jid: JID
    private(set) var occupants: [Occupant] = []
    /// Until the owner configures it or accepts the instant room, only the owner is in it.
    private(set) var locked = true
    private(set) var subject: (text: String, by: String)?
    private(set) var history: [(message: XMLElement, at: Date)] = []
    /// Affiliations by bare JID: owner, admin, member, outcast (§5.2).
    private(set) var affiliations: [JID: String] = [:]
    var configuration = MUCRoomConfiguration()
    let historyLimit: Int
    /// XEP-0421: each occupant's id is a keyed hash of the room and its bare real JID, the
    /// same for all its clients and nicknames, revealing nothing of the JID. The key is the
    /// server's (per process, for now).
    var occupantIDKey: [UInt8] = []
    /// The service's per-occupant message rate; nil is unlimited.
    var messageRate: SendingRate?
    /// Loaded from storage after a restart: its history is still in the room's archive
    /// (XEP-0313), read before the room's first event.
    private(set) var historyInArchive = false

    init(jid: JID, historyLimit: Int = 20) {
        self.jid = jid
        self.historyLimit = historyLimit
    }

    /// A persistent room as it was stored: open (configured), with its affiliations.
    init(jid: JID, configuration: MUCRoomConfiguration, affiliations: [JID: String], historyLimit: Int = 20) {
        self.jid = jid
        self.historyLimit = historyLimit
        self.configuration = configuration
        self.affiliations = affiliations
        locked = false
        historyInArchive = true
    }

    /// The newest messages of the room's archive, oldest first, as the history newcomers
    /// get (§7.2.15), when the room was loaded from storage and nothing was said since.
    mutating func restoreHistory(_ entries: [(message: XMLElement, at: Date)]) {
        defer { historyInArchive = false }
        guard historyInArchive, history.isEmpty else { return }
        let kept = min(historyLimit, max(0, configuration.historyLength ?? historyLimit))
        history = Array(entries.suffix(kept))
    }

    var owners: Set<JID> { Set(affiliations.filter { $0.value == "owner" }.keys) }

    func affiliation(of jid: JID) -> String { affiliations[jid.bare] ?? "none" }

    /// Whether the room outlives its last occupant.
    var isPersistent: Bool { configuration.persistent && !locked }

    /// A temporary room with nobody in it ends (§10.1.2 note); a persistent one stays.
    var isGone: Bool { occupants.isEmpty && !isPersistent }

    private var nonAnonymous: Bool { configuration.whoIs == "anyone" }

    private func role(for affiliation: String) -> String {
        switch affiliation {
        case "owner", "admin": "moderator"
        case "member": "participant"
        default: configuration.moderated ? "visitor" : "participant"
        }
    }

    var isEmpty: Bool { occupants.isEmpty }

    /// The occupant whose nickname compares equal to `nick` under RFC 8266 (`Alice` is
    /// `alice`).
    func occupant(nick: String) -> Occupant? {
        let key = MUCNickname(nick)?.key ?? nick
        return occupants.first { $0.nickKey == key }
    }
    func occupant(realJID: JID) -> Occupant? { occupants.first { $0.realJID == realJID } }

    // MARK: Presence

    /// Presence from `from` (a real full JID) to `room/nick`.
    /// `nick` is the nickname as the client asked for it; the room enforces the Nickname
    /// profile (RFC 8266) and, when that changed it, says so with 210 (§7.2.3).
    mutating func presence(_ stanza: Stanza, from: JID, nick requested: String, isCreator: Bool, now: Date) -> [XMLElement] {
        let unavailable = stanza.typeAttribute == "unavailable"
        let current = occupant(realJID: from)
        if let current, unavailable { return leave(current) }
        if unavailable { return [] }
        guard let nick = MUCNickname(requested) else {
            return [Self.error(stanza, StanzaError(.jidMalformed, text: "that nickname has characters a nickname cannot have"), from: roomJID(requested))]
        }
        if let current {
            if current.nick != nick.shown { return changeNick(current, to: nick, stanza: stanza) }
            return update(current, stanza: stanza)
        }
        return join(stanza, from: from, nick: nick, requested: requested, isCreator: isCreator, now: now)
    }

    private mutating func join(_ stanza: Stanza, from: JID, nick enforced: MUCNickname, requested: String, isCreator: Bool, now: Date) -> [XMLElement] {
        let nick = requested
        if occupants.isEmpty && !isCreator && owners.isEmpty {
            // A room that does not exist is created only by whom the service lets.
            return [Self.error(stanza, StanzaError(.notAllowed, text: "rooms here are created by the domain's users"), from: roomJID(nick))]
        }
        if locked && !owners.isEmpty && !owners.contains(from.bare) {
            // §10.1.1: a locked room is entered by no one but its owner.
            return [Self.error(stanza, StanzaError(.itemNotFound, text: "the room is being set up"), from: roomJID(nick))]
        }
        let affiliation = affiliation(of: from)
        if affiliation == "outcast" {
            // §7.2.7: banned.
            return [Self.error(stanza, StanzaError(.forbidden, text: "you are banned from this room"), from: roomJID(nick))]
        }
        let privileged = affiliation == "owner" || affiliation == "admin"
        if configuration.membersOnly && affiliation == "none" {
            // §7.2.6.
            return [Self.error(stanza, StanzaError(.registrationRequired, text: "this room is for members only"), from: roomJID(nick))]
        }
        if let password = configuration.password, !privileged {
            // §7.2.5.
            let given = stanza.element.firstChild(name: "x", namespace: MUCNamespace.muc)?.firstChild(name: "password", namespace: MUCNamespace.muc)?.text
            guard given == password else {
                return [Self.error(stanza, StanzaError(.notAuthorized, text: "a password is required"), from: roomJID(nick))]
            }
        }
        if occupants.count >= max(1, configuration.maxUsers) && !privileged {
            // §7.2.10.
            return [Self.error(stanza, StanzaError(.serviceUnavailable, text: "the room is full"), from: roomJID(nick))]
        }
        if occupants.contains(where: { $0.nickKey == enforced.key }) {
            // §7.2.9.
            return [Self.error(stanza, StanzaError(.conflict, text: "that nickname is taken"), from: roomJID(nick))]
        }
        let created = occupants.isEmpty && owners.isEmpty
        if created { affiliations[from.bare] = "owner" }
        let current = self.affiliation(of: from)
        let newcomer = Occupant(nick: enforced.shown, nickKey: enforced.key, realJID: from, affiliation: current, role: role(for: current),
                                presence: Self.shownPresence(stanza.element), allowance: SendingAllowance(at: now))
        var out: [XMLElement] = []
        // The others, to the newcomer.
        for other in occupants {
            out.append(presenceElement(of: other, to: newcomer, statuses: []))
        }
        occupants.append(newcomer)
        // The newcomer, to the others.
        for other in occupants where other.realJID != from {
            out.append(presenceElement(of: newcomer, to: other, statuses: []))
        }
        // Self-presence, last of the presence (§7.2.3).
        let modified = enforced.shown != requested ? ["210"] : []
        out.append(presenceElement(of: newcomer, to: newcomer, statuses: (nonAnonymous ? ["100"] : []) + modified + (created ? ["110", "201"] : ["110"])))
        // History (§7.2.15), as much as asked.
        let join = stanza.element.firstChild(name: "x", namespace: MUCNamespace.muc)
        for message in Self.historyAsked(join?.firstChild(name: "history", namespace: MUCNamespace.muc), from: history, room: jid, now: now) {
            out.append(message.setting(attribute: "to", to: from.description))
        }
        // The subject, always, last (§7.2.16).
        out.append(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("from", subject.map { roomJID($0.by).description } ?? jid.description), XMLAttribute("to", from.description), XMLAttribute("type", "groupchat"),
        ], children: [.element(XMLElement(name: "subject", namespace: XMLNamespace.client, text: subject?.text ?? ""))]))
        return out
    }

    /// §7.2.15: the history a newcomer asked for, the newest kept; each of `maxstanzas`,
    /// `maxchars` (counted on the messages as sent), `seconds` and `since` limits it, and
    /// nothing asked means all the room keeps.
    static func historyAsked(_ request: XMLElement?, from history: [(message: XMLElement, at: Date)], room: JID, now: Date) -> [XMLElement] {
        var entries = history
        if let seconds = request?.attribute("seconds").flatMap(Int.init) {
            entries = entries.filter { now.timeIntervalSince($0.at) <= Double(seconds) }
        }
        if let since = request?.attribute("since").flatMap({ ISO8601DateFormatter().date(from: $0) }) {
            entries = entries.filter { $0.at >= since }
        }
        if let maxStanzas = request?.attribute("maxstanzas").flatMap(Int.init) {
            entries = Array(entries.suffix(max(0, maxStanzas)))
        }
        if let maxChars = request?.attribute("maxchars").flatMap(Int.init) {
            var total = 0
            var kept: [(message: XMLElement, at: Date)] = []
            for entry in entries.reversed() {
                total += XMLFragment.serialize(entry.message).count
                if total > maxChars { break }
                kept.insert(entry, at: 0)
            }
            entries = kept
        }
        return entries.map { entry in
            entry.message.appending(XMLElement(name: "delay", namespace: MUCNamespace.delay, attributes: [
                XMLAttribute("from", room.description), XMLAttribute("stamp", stamp(entry.at)),
            ]))
        }
    }

    private mutating func leave(_ occupant: Occupant) -> [XMLElement] {
        var out: [XMLElement] = []
        for other in occupants where other.realJID != occupant.realJID {
            out.append(presenceElement(of: occupant, to: other, statuses: [], unavailable: true))
        }
        out.append(presenceElement(of: occupant, to: occupant, statuses: ["110"], unavailable: true))
        occupants.removeAll { $0.realJID == occupant.realJID }
        return out
    }

    private mutating func changeNick(_ occupant: Occupant, to enforced: MUCNickname, stanza: Stanza) -> [XMLElement] {
        let nick = enforced.shown
        if occupants.contains(where: { $0.nickKey == enforced.key && $0.realJID != occupant.realJID }) {
            return [Self.error(stanza, StanzaError(.conflict, text: "that nickname is taken"), from: roomJID(nick))]
        }
        var out: [XMLElement] = []
        // §7.6.3: unavailable under the old nick with 303 and the new one, then available.
        for other in occupants {
            let statuses = other.realJID == occupant.realJID ? ["303", "110"] : ["303"]
            out.append(presenceElement(of: occupant, to: other, statuses: statuses, unavailable: true, newNick: nick))
        }
        guard let index = occupants.firstIndex(where: { $0.realJID == occupant.realJID }) else { return out }
        occupants[index].nick = nick
        occupants[index].nickKey = enforced.key
        occupants[index].presence = Self.shownPresence(stanza.element)
        let renamed = occupants[index]
        for other in occupants {
            out.append(presenceElement(of: renamed, to: other, statuses: other.realJID == renamed.realJID ? ["110"] : []))
        }
        return out
    }

    private mutating func update(_ occupant: Occupant, stanza: Stanza) -> [XMLElement] {
        guard let index = occupants.firstIndex(where: { $0.realJID == occupant.realJID }) else { return [] }
        occupants[index].presence = Self.shownPresence(stanza.element)
        let updated = occupants[index]
        return occupants.map { presenceElement(of: updated, to: $0, statuses: $0.realJID == updated.realJID ? ["110"] : []) }
    }

    /// The occupant leaves because its presence bounced (its client is gone, §7.14 note).
    mutating func remove(realJID: JID) -> [XMLElement] {
        guard let occupant = occupant(realJID: realJID) else { return [] }
        var out = leave(occupant)
        out.removeLast()  // nobody to tell itself
        return out
    }

    // MARK: Messages

    /// A message from `from` to the room (`nick` nil) or to an occupant.
    /// `stanzaID` is the id a groupchat message gets in the room's archive (XEP-0359), stamped
    /// on every copy and kept with the history.
    mutating func message(_ stanza: Stanza, from: JID, nick: String?, now: Date, stanzaID: String? = nil) -> [XMLElement] {
        guard let sender = occupant(realJID: from) else {
            // §7.4, §7.5: only occupants speak.
            return [Self.error(stanza, StanzaError(.notAcceptable, text: "only occupants may send messages to the room"), from: nick.map(roomJID) ?? jid)]
        }
        if let messageRate, let index = occupants.firstIndex(where: { $0.realJID == from }),
           !occupants[index].allowance.take(now: now, rate: messageRate) {
            // The service's limit (muc.messages_per_second): the sender waits; the room is
            // not flooded.
            return [Self.error(stanza, StanzaError(.resourceConstraint, text: "you are sending too fast; wait a moment"), from: nick.map(roomJID) ?? jid)]
        }
        let type = stanza.typeAttribute ?? "normal"
        if nick == nil, let form = stanza.element.firstChild(name: "x", namespace: MUCNamespace.dataForms),
           Self.formType(form) == MUCNamespace.request {
            return voiceRequest(form, from: sender, stanza: stanza)
        }
        if nick == nil, let invite = stanza.element.firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "invite", namespace: MUCNamespace.user) {
            return invitation(invite, from: sender, stanza: stanza)
        }
        if let nick {
            // A private message (§7.5), to the occupant's real JID, from the sender's nick.
            guard type != "groupchat" else {
                return [Self.error(stanza, StanzaError(.badRequest, text: "groupchat messages go to the room"), from: roomJID(nick))]
            }
            guard mayPrivateMessage(sender) else {
                return [Self.error(stanza, StanzaError(.forbidden, text: "private messages are not allowed in this room"), from: roomJID(nick))]
            }
            guard let target = occupant(nick: nick) else {
                return [Self.error(stanza, StanzaError(.itemNotFound, text: "no such occupant"), from: roomJID(nick))]
            }
            return [stanza.element.setting(attribute: "from", to: roomJID(sender.nick).description).setting(attribute: "to", to: target.realJID.description)
                .appending(XMLElement(name: "x", namespace: MUCNamespace.user))]
        }
        guard type == "groupchat" else {
            return [Self.error(stanza, StanzaError(.badRequest, text: "messages to the room are of type groupchat"), from: jid)]
        }
        guard sender.role != "visitor" else {
            // §7.4: in a moderated room, visitors have no voice.
            return [Self.error(stanza, StanzaError(.forbidden, text: "you have no voice in this room"), from: jid)]
        }
        if let subjectElement = stanza.element.firstChild(name: "subject", namespace: stanza.element.namespace) {
            // §8.1: moderators change the subject, and participants when the room lets them.
            guard sender.role == "moderator" || configuration.changeSubject else {
                return [Self.error(stanza, StanzaError(.forbidden, text: "only moderators may change the subject"), from: jid)]
            }
            subject = (subjectElement.text, sender.nick)
        }
        // XEP-0421 §4: the room's occupant-id, never one the sender put there.
        let withoutClaims = XMLElement(name: stanza.element.name, namespace: stanza.element.namespace, attributes: stanza.element.attributes,
                                       children: stanza.element.children.filter { node in
                                           guard case .element(let child) = node else { return true }
                                           return child.namespace != MUCNamespace.occupantID
                                       })
        var reflected = withoutClaims.setting(attribute: "from", to: roomJID(sender.nick).description).appending(occupantIDElement(sender.realJID))
        if let stanzaID, configuration.logging {
            reflected = MAMModule.stamped(reflected, id: stanzaID, by: jid)
        }
        if stanza.element.firstChild(name: "body", namespace: stanza.element.namespace) != nil {
            history.append((reflected.setting(attribute: "to", to: nil), now))
            let kept = min(historyLimit, max(0, configuration.historyLength ?? historyLimit))
            if history.count > kept { history.removeFirst(history.count - kept) }
        }
        return occupants.map { reflected.setting(attribute: "to", to: $0.realJID.description) }
    }

    /// `muc#roomconfig_allowpm`: whether `sender` may send private messages here.
    private func mayPrivateMessage(_ sender: Occupant) -> Bool {
        switch configuration.allowPrivateMessages {
        case "none": false
        case "moderators": sender.role == "moderator"
        case "participants": sender.role != "visitor"
        default: true
        }
    }

    /// §7.13 and §8.6: a visitor asks for voice with a `muc#request` form, which goes to every
    /// moderator; a moderator's submitted form with `muc#request_allow` true grants it.
    private mutating func voiceRequest(_ form: XMLElement, from sender: Occupant, stanza: Stanza) -> [XMLElement] {
        let fields = Self.formValues(form)
        if sender.role == "moderator", let nick = fields["muc#roomnick"] {
            guard fields["muc#request_allow"] == "1" || fields["muc#request_allow"] == "true" else { return [] }
            guard let target = occupant(nick: nick), target.role == "visitor" else { return [] }
            switch setRole(of: target.nick, to: "participant", by: sender.realJID) {
            case .success(let out): return out
            case .failure(let error): return [Self.error(stanza, error, from: jid)]
            }
        }
        guard sender.role == "visitor", (fields["muc#role"] ?? "participant") == "participant" else {
            // A participant has its voice already; anything else is not a voice request.
            return sender.role == "visitor" ? [Self.error(stanza, StanzaError(.badRequest, text: "only voice can be requested"), from: jid)] : []
        }
        func field(_ name: String, _ type: String, _ label: String?, _ value: String) -> XMLNode {
            var attributes = [XMLAttribute("var", name), XMLAttribute("type", type)]
            if let label { attributes.append(XMLAttribute("label", label)) }
            return .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: attributes,
                                       children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: value))]))
        }
        let request = XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", "form")], children: [
            .element(XMLElement(name: "title", namespace: MUCNamespace.dataForms, text: "Voice request")),
            field("FORM_TYPE", "hidden", nil, MUCNamespace.request),
            field("muc#role", "list-single", "Requested role", "participant"),
            field("muc#jid", "jid-single", "User ID", sender.realJID.description),
            field("muc#roomnick", "text-single", "Room nickname", sender.nick),
            field("muc#request_allow", "boolean", "Grant voice to this person?", "false"),
        ])
        return occupants.filter { $0.role == "moderator" }.map { moderator in
            XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("from", jid.description), XMLAttribute("to", moderator.realJID.description),
            ], children: [.element(request)])
        }
    }

    static func formType(_ form: XMLElement) -> String? { formValues(form)["FORM_TYPE"] }

    /// A data form's fields, by `var`, first value each.
    static func formValues(_ form: XMLElement) -> [String: String] {
        var values: [String: String] = [:]
        for field in form.children(name: "field", namespace: MUCNamespace.dataForms) {
            guard let name = field.attribute("var") else { continue }
            values[name] = field.firstChild(name: "value", namespace: MUCNamespace.dataForms)?.text ?? ""
        }
        return values
    }

    /// §7.8.2: a mediated invitation, sent on by the room from its bare JID. In a
    /// members-only room only owners and admins invite, and their invitee becomes a member.
    private mutating func invitation(_ invite: XMLElement, from sender: Occupant, stanza: Stanza) -> [XMLElement] {
        guard let invitee = invite.attribute("to").flatMap({ try? JID($0) }) else {
            return [Self.error(stanza, StanzaError(.badRequest, text: "an invitation needs 'to'"), from: jid)]
        }
        if configuration.membersOnly {
            guard ["owner", "admin"].contains(sender.affiliation) else {
                return [Self.error(stanza, StanzaError(.forbidden, text: "only owners and admins invite to this room"), from: jid)]
            }
            if affiliation(of: invitee) == "none" { affiliations[invitee.bare] = "member" }
        }
        var children: [XMLNode] = [.element(XMLElement(name: "invite", namespace: MUCNamespace.user, attributes: [XMLAttribute("from", sender.realJID.bare.description)],
                                                       children: invite.children(name: "reason", namespace: MUCNamespace.user).map { .element($0) }))]
        if let password = configuration.password {
            children.append(.element(XMLElement(name: "password", namespace: MUCNamespace.user, text: password)))
        }
        return [XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("from", jid.description), XMLAttribute("to", invitee.description),
        ], children: [
            .element(XMLElement(name: "x", namespace: MUCNamespace.user, children: children)),
            .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "\(sender.realJID.bare) invites you to the room \(jid)")),
        ])]
    }

    // MARK: Configuration and administration

    /// The owner accepted the instant room or submitted a configuration (§10.1.2, §10.1.3);
    /// nil when `requester` is no owner. A room already open tells its occupants that its
    /// configuration changed (104, with 172 or 173 when who sees real JIDs changed, §10.2.1);
    /// a room made members-only removes whoever is no member (322, §9.3 note).
    mutating func configure(by requester: JID, _ configuration: MUCRoomConfiguration? = nil) -> [XMLElement]? {
        guard owners.contains(requester.bare) else { return nil }
        let before = self.configuration
        let wasLocked = locked
        if let configuration { self.configuration = configuration }
        locked = false
        var out: [XMLElement] = []
        if self.configuration.membersOnly && !before.membersOnly {
            for occupant in occupants where occupant.affiliation == "none" {
                out += removeWithStatus(occupant, status: "322")
            }
        }
        guard !wasLocked, before != self.configuration else { return out }
        var statuses = ["104"]
        if before.whoIs != self.configuration.whoIs { statuses.append(self.configuration.whoIs == "anyone" ? "172" : "173") }
        let x = XMLElement(name: "x", namespace: MUCNamespace.user, children: statuses.map {
            .element(XMLElement(name: "status", namespace: MUCNamespace.user, attributes: [XMLAttribute("code", $0)]))
        })
        out += occupants.map { occupant in
            XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("from", jid.description), XMLAttribute("to", occupant.realJID.description), XMLAttribute("type", "groupchat"),
            ], children: [.element(x)])
        }
        return out
    }

    /// An affiliation change by `actor` (§9.1–§9.8, §10.3–§10.7). Owners change anything;
    /// admins change members, outcasts and the unaffiliated, never owners or admins. An
    /// occupant banned, or no longer a member of a members-only room, leaves (301, 321);
    /// the others learn of the change.
    mutating func setAffiliation(of target: JID, to affiliation: String, by actor: JID, reason: String? = nil) -> Result<[XMLElement], StanzaError> {
        let actorAffiliation = self.affiliation(of: actor)
        let targetAffiliation = self.affiliation(of: target)
        guard ["owner", "admin", "member", "outcast", "none"].contains(affiliation) else { return .failure(StanzaError(.badRequest)) }
        let privileged: Set<String> = ["owner", "admin"]
        guard privileged.contains(actorAffiliation) else {
            // §9: only admins and owners change affiliations; anyone else is forbidden.
            return .failure(StanzaError(.forbidden, text: "only owners and admins change affiliations"))
        }
        guard actorAffiliation == "owner" || (!privileged.contains(affiliation) && !privileged.contains(targetAffiliation)) else {
            // §9.1: an admin cannot touch owners and admins, nor make them.
            return .failure(StanzaError(.notAllowed, text: "not allowed to change that affiliation"))
        }
        if targetAffiliation == "owner" && affiliation != "owner" && owners.count == 1 {
            // §10.5: the last owner stays.
            return .failure(StanzaError(.conflict, text: "a room keeps at least one owner"))
        }
        affiliations[target.bare] = affiliation == "none" ? nil : affiliation
        var out: [XMLElement] = []
        for index in occupants.indices where occupants[index].realJID.bare == target.bare {
            occupants[index].affiliation = affiliation
            occupants[index].role = role(for: affiliation)
        }
        let removedStatus: String? = affiliation == "outcast" ? "301" : (configuration.membersOnly && affiliation == "none" ? "321" : nil)
        for occupant in occupants where occupant.realJID.bare == target.bare {
            if let removedStatus {
                out += removeWithStatus(occupant, status: removedStatus, reason: reason, actor: self.occupant(realJID: actor)?.nick)
            } else {
                out += occupants.map { presenceElement(of: occupant, to: $0, statuses: $0.realJID == occupant.realJID ? ["110"] : []) }
            }
        }
        return .success(out)
    }

    /// A role change by a moderator (§8.2 kick, §8.3–§8.6 voice, §9.6 moderators).
    mutating func setRole(of nick: String, to role: String, by actor: JID, reason: String? = nil) -> Result<[XMLElement], StanzaError> {
        guard let actorOccupant = occupant(realJID: actor), actorOccupant.role == "moderator" else {
            return .failure(StanzaError(.forbidden, text: "only moderators change roles"))
        }
        guard let target = occupant(nick: nick) else { return .failure(StanzaError(.itemNotFound, text: "no such occupant")) }
        guard ["none", "visitor", "participant", "moderator"].contains(role) else { return .failure(StanzaError(.badRequest)) }
        // §8.2: nobody kicks or silences someone of higher affiliation, or an owner or admin.
        if ["owner", "admin"].contains(target.affiliation) && role != "moderator" {
            return .failure(StanzaError(.notAllowed, text: "owners and admins cannot be kicked or silenced"))
        }
        if role == "moderator" && !["owner", "admin"].contains(actorOccupant.affiliation) {
            return .failure(StanzaError(.notAllowed, text: "only owners and admins make moderators"))
        }
        if role == "none" { return .success(removeWithStatus(target, status: "307", reason: reason, actor: actorOccupant.nick)) }
        guard let index = occupants.firstIndex(where: { $0.realJID == target.realJID }) else { return .success([]) }
        occupants[index].role = role
        let changed = occupants[index]
        return .success(occupants.map { presenceElement(of: changed, to: $0, statuses: $0.realJID == changed.realJID ? ["110"] : []) })
    }

    /// Occupants with an affiliation, for the admin's lists (§9.5, §10.5).
    func members(with affiliation: String) -> [JID] {
        affiliations.filter { $0.value == affiliation }.keys.sorted { $0.description < $1.description }
    }

    /// §10.9: the owner destroys the room; everyone leaves with the reason and, if given,
    /// where to go instead.
    mutating func destroy(by actor: JID, alternate: String?, reason: String?) -> [XMLElement]? {
        guard owners.contains(actor.bare) else { return nil }
        var destroyAttributes: [XMLAttribute] = []
        if let alternate { destroyAttributes.append(XMLAttribute("jid", alternate)) }
        let destroyElement = XMLElement(name: "destroy", namespace: MUCNamespace.user, attributes: destroyAttributes,
                                        children: reason.map { [.element(XMLElement(name: "reason", namespace: MUCNamespace.user, text: $0))] } ?? [])
        let out = occupants.map { occupant in
            XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("from", roomJID(occupant.nick).description), XMLAttribute("to", occupant.realJID.description), XMLAttribute("type", "unavailable"),
            ], children: [.element(XMLElement(name: "x", namespace: MUCNamespace.user, children: [
                .element(XMLElement(name: "item", namespace: MUCNamespace.user, attributes: [XMLAttribute("affiliation", "none"), XMLAttribute("role", "none")])),
                .element(destroyElement),
            ]))])
        }
        occupants = []
        configuration.persistent = false
        return out
    }

    /// The service is shutting down (332): each occupant is told its own departure; the
    /// others need not be told, they leave too.
    mutating func shutDown() -> [XMLElement] {
        let out = occupants.map { occupant in
            var leaving = occupant
            leaving.role = "none"
            return presenceElement(of: leaving, to: occupant, statuses: ["332", "110"], unavailable: true)
        }
        occupants = []
        return out
    }

    /// Removes an occupant with a status (301 banned, 307 kicked, 321 membership), telling
    /// the occupant first, then everyone else (§8.2), with the moderator's reason and nick.
    private mutating func removeWithStatus(_ occupant: Occupant, status: String, reason: String? = nil, actor: String? = nil) -> [XMLElement] {
        var leaving = occupant
        leaving.role = "none"
        let ordered = occupants.filter { $0.realJID == occupant.realJID } + occupants.filter { $0.realJID != occupant.realJID }
        let out = ordered.map {
            presenceElement(of: leaving, to: $0, statuses: $0.realJID == occupant.realJID ? [status, "110"] : [status], unavailable: true,
                            reason: reason, actor: actor)
        }
        occupants.removeAll { $0.realJID == occupant.realJID }
        return out
    }

    // MARK: Elements

    func roomJID(_ nick: String) -> JID {
        (try? JID(localpart: jid.localpart, domainpart: jid.domainpart, resourcepart: nick)) ?? jid
    }

    private func presenceElement(of occupant: Occupant, to recipient: Occupant, statuses: [String], unavailable: Bool = false, newNick: String? = nil,
                                 reason: String? = nil, actor: String? = nil) -> XMLElement {
        var itemAttributes = [XMLAttribute("affiliation", occupant.affiliation), XMLAttribute("role", unavailable && newNick == nil ? "none" : occupant.role)]
        // Semi-anonymous: the real JID goes to moderators (and to the occupant itself);
        // non-anonymous: to everyone.
        if nonAnonymous || recipient.role == "moderator" || recipient.realJID == occupant.realJID {
            itemAttributes.append(XMLAttribute("jid", occupant.realJID.description))
        }
        if let newNick { itemAttributes.append(XMLAttribute("nick", newNick)) }
        var itemChildren: [XMLNode] = []
        if let actor { itemChildren.append(.element(XMLElement(name: "actor", namespace: MUCNamespace.user, attributes: [XMLAttribute("nick", actor)]))) }
        if let reason { itemChildren.append(.element(XMLElement(name: "reason", namespace: MUCNamespace.user, text: reason))) }
        var x: [XMLNode] = [.element(XMLElement(name: "item", namespace: MUCNamespace.user, attributes: itemAttributes, children: itemChildren))]
        x += statuses.map { .element(XMLElement(name: "status", namespace: MUCNamespace.user, attributes: [XMLAttribute("code", $0)])) }
        var attributes = [XMLAttribute("from", roomJID(occupant.nick).description), XMLAttribute("to", recipient.realJID.description)]
        if unavailable { attributes.append(XMLAttribute("type", "unavailable")) }
        let shown = unavailable ? [] : occupant.presence.children
        return XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: attributes,
                          children: shown + [.element(XMLElement(name: "x", namespace: MUCNamespace.user, children: x)), .element(occupantIDElement(occupant.realJID))])
    }

    /// XEP-0421's element for the occupant whose real JID is `realJID`.
    func occupantIDElement(_ realJID: JID) -> XMLElement {
        var data = [UInt8](jid.description.utf8)
        data.append(0)
        data += [UInt8](realJID.bare.description.utf8)
        let code = HMAC<SHA256>.authenticationCode(for: data, using: SymmetricKey(data: occupantIDKey.isEmpty ? [0] : occupantIDKey))
        let id = Data(code).base64EncodedString().prefix(22)
        return XMLElement(name: "occupant-id", namespace: MUCNamespace.occupantID, attributes: [XMLAttribute("id", String(id))])
    }

    /// What of a client's presence the room shows: its children, less the join element.
    static func shownPresence(_ element: XMLElement) -> XMLElement {
        XMLElement(name: "presence", namespace: XMLNamespace.client, children: element.children.filter { node in
            guard case .element(let child) = node else { return false }
            return child.namespace != MUCNamespace.muc && child.namespace != MUCNamespace.user
        })
    }

    /// An error reply. A refused entry carries an empty `<x xmlns='…muc'/>` as every
    /// refusal in §7.2 does: clients tell a refused join from other presence errors by it
    /// (slixmpp waits for it). The password, if any, is not echoed.
    static func error(_ stanza: Stanza, _ error: StanzaError, from: JID) -> XMLElement {
        let reply = (stanza.errorReply(error, from: from.description) ?? stanza).element
        guard stanza.kind == .presence, stanza.element.firstChild(name: "x", namespace: MUCNamespace.muc) != nil else { return reply }
        return XMLElement(name: reply.name, namespace: reply.namespace, attributes: reply.attributes,
                          children: [.element(XMLElement(name: "x", namespace: MUCNamespace.muc))] + reply.children)
    }

    static func stamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
    }
}
