import Foundation
import XMPPCore
import XMPPStream

/// XEP-0045 namespaces.
enum MUCNamespace {
    static let muc = "http://jabber.org/protocol/muc"
    static let user = "http://jabber.org/protocol/muc#user"
    static let owner = "http://jabber.org/protocol/muc#owner"
    static let delay = "urn:xmpp:delay"
    static let dataForms = "jabber:x:data"
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
struct MUCRoom: Sendable {
    struct Occupant: Sendable, Equatable {
        var nick: String
        /// The real full JID of the occupant's client.
        var realJID: JID
        var affiliation: String
        var role: String
        /// The occupant's last presence, as the room shows it (its children, without the
        /// `muc` join element).
        var presence: XMLElement
    }

    let jid: JID
    private(set) var occupants: [Occupant] = []
    /// Until the owner configures it or accepts the instant room, only the owner is in it.
    private(set) var locked = true
    private(set) var subject: (text: String, by: String)?
    private(set) var history: [(message: XMLElement, at: Date)] = []
    /// Owners by bare JID (the creator).
    private(set) var owners: Set<JID> = []
    let historyLimit: Int

    init(jid: JID, historyLimit: Int = 20) {
        self.jid = jid
        self.historyLimit = historyLimit
    }

    var isEmpty: Bool { occupants.isEmpty }

    func occupant(nick: String) -> Occupant? { occupants.first { $0.nick == nick } }
    func occupant(realJID: JID) -> Occupant? { occupants.first { $0.realJID == realJID } }

    // MARK: Presence

    /// Presence from `from` (a real full JID) to `room/nick`.
    mutating func presence(_ stanza: Stanza, from: JID, nick: String, isCreator: Bool, now: Date) -> [XMLElement] {
        let unavailable = stanza.typeAttribute == "unavailable"
        if let current = occupant(realJID: from) {
            if unavailable { return leave(current) }
            if current.nick != nick { return changeNick(current, to: nick, stanza: stanza) }
            return update(current, stanza: stanza)
        }
        if unavailable { return [] }
        return join(stanza, from: from, nick: nick, isCreator: isCreator)
    }

    private mutating func join(_ stanza: Stanza, from: JID, nick: String, isCreator: Bool) -> [XMLElement] {
        if occupants.isEmpty && !isCreator && owners.isEmpty {
            // A room that does not exist is created only by whom the service lets.
            return [Self.error(stanza, StanzaError(.notAllowed, text: "rooms here are created by the domain's users"), from: roomJID(nick))]
        }
        if locked && !owners.isEmpty && !owners.contains(from.bare) {
            // §10.1.1: a locked room is entered by no one but its owner.
            return [Self.error(stanza, StanzaError(.itemNotFound, text: "the room is being set up"), from: roomJID(nick))]
        }
        if occupant(nick: nick) != nil {
            // §7.2.9.
            return [Self.error(stanza, StanzaError(.conflict, text: "that nickname is taken"), from: roomJID(nick))]
        }
        let created = occupants.isEmpty && owners.isEmpty
        if created { owners.insert(from.bare) }
        let owner = owners.contains(from.bare)
        let newcomer = Occupant(nick: nick, realJID: from, affiliation: owner ? "owner" : "none", role: owner ? "moderator" : "participant",
                                presence: Self.shownPresence(stanza.element))
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
        out.append(presenceElement(of: newcomer, to: newcomer, statuses: created ? ["110", "201"] : ["110"]))
        // History (§7.2.15), as much as asked.
        let join = stanza.element.firstChild(name: "x", namespace: MUCNamespace.muc)
        let wanted = join?.firstChild(name: "history", namespace: MUCNamespace.muc)?.attribute("maxstanzas").flatMap(Int.init) ?? historyLimit
        for entry in history.suffix(max(0, wanted)) {
            out.append(entry.message.setting(attribute: "to", to: from.description).appending(
                XMLElement(name: "delay", namespace: MUCNamespace.delay, attributes: [
                    XMLAttribute("from", jid.description), XMLAttribute("stamp", Self.stamp(entry.at)),
                ])))
        }
        // The subject, always, last (§7.2.16).
        out.append(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("from", subject.map { roomJID($0.by).description } ?? jid.description), XMLAttribute("to", from.description), XMLAttribute("type", "groupchat"),
        ], children: [.element(XMLElement(name: "subject", namespace: XMLNamespace.client, text: subject?.text ?? ""))]))
        return out
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

    private mutating func changeNick(_ occupant: Occupant, to nick: String, stanza: Stanza) -> [XMLElement] {
        if self.occupant(nick: nick) != nil {
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
    mutating func message(_ stanza: Stanza, from: JID, nick: String?, now: Date) -> [XMLElement] {
        guard let sender = occupant(realJID: from) else {
            // §7.4, §7.5: only occupants speak.
            return [Self.error(stanza, StanzaError(.notAcceptable, text: "only occupants may send messages to the room"), from: nick.map(roomJID) ?? jid)]
        }
        let type = stanza.typeAttribute ?? "normal"
        if let nick {
            // A private message (§7.5), to the occupant's real JID, from the sender's nick.
            guard type != "groupchat" else {
                return [Self.error(stanza, StanzaError(.badRequest, text: "groupchat messages go to the room"), from: roomJID(nick))]
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
        if let subjectElement = stanza.element.firstChild(name: "subject", namespace: stanza.element.namespace) {
            // §8.1: moderators change the subject.
            guard sender.role == "moderator" else {
                return [Self.error(stanza, StanzaError(.forbidden, text: "only moderators may change the subject"), from: jid)]
            }
            subject = (subjectElement.text, sender.nick)
        }
        let reflected = stanza.element.setting(attribute: "from", to: roomJID(sender.nick).description)
        if stanza.element.firstChild(name: "body", namespace: stanza.element.namespace) != nil {
            history.append((reflected.setting(attribute: "to", to: nil), now))
            if history.count > historyLimit { history.removeFirst(history.count - historyLimit) }
        }
        return occupants.map { reflected.setting(attribute: "to", to: $0.realJID.description) }
    }

    // MARK: Configuration

    /// The owner accepted the instant room or submitted a configuration (§10.1.2, §10.1.3).
    mutating func configure(by requester: JID) -> Bool {
        guard owners.contains(requester.bare) else { return false }
        locked = false
        return true
    }

    // MARK: Elements

    func roomJID(_ nick: String) -> JID {
        (try? JID(localpart: jid.localpart, domainpart: jid.domainpart, resourcepart: nick)) ?? jid
    }

    private func presenceElement(of occupant: Occupant, to recipient: Occupant, statuses: [String], unavailable: Bool = false, newNick: String? = nil) -> XMLElement {
        var itemAttributes = [XMLAttribute("affiliation", occupant.affiliation), XMLAttribute("role", unavailable && newNick == nil ? "none" : occupant.role)]
        // Semi-anonymous: the real JID goes to moderators (and to the occupant itself).
        if recipient.role == "moderator" || recipient.realJID == occupant.realJID {
            itemAttributes.append(XMLAttribute("jid", occupant.realJID.description))
        }
        if let newNick { itemAttributes.append(XMLAttribute("nick", newNick)) }
        var x: [XMLNode] = [.element(XMLElement(name: "item", namespace: MUCNamespace.user, attributes: itemAttributes))]
        x += statuses.map { .element(XMLElement(name: "status", namespace: MUCNamespace.user, attributes: [XMLAttribute("code", $0)])) }
        var attributes = [XMLAttribute("from", roomJID(occupant.nick).description), XMLAttribute("to", recipient.realJID.description)]
        if unavailable { attributes.append(XMLAttribute("type", "unavailable")) }
        let shown = unavailable ? [] : occupant.presence.children
        return XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: attributes,
                          children: shown + [.element(XMLElement(name: "x", namespace: MUCNamespace.user, children: x))])
    }

    /// What of a client's presence the room shows: its children, less the join element.
    static func shownPresence(_ element: XMLElement) -> XMLElement {
        XMLElement(name: "presence", namespace: XMLNamespace.client, children: element.children.filter { node in
            guard case .element(let child) = node else { return false }
            return child.namespace != MUCNamespace.muc && child.namespace != MUCNamespace.user
        })
    }

    static func error(_ stanza: Stanza, _ error: StanzaError, from: JID) -> XMLElement {
        (stanza.errorReply(error, from: from.description) ?? stanza).element
    }

    static func stamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
    }
}
