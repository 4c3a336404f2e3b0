import Foundation
import Testing
import XMPPCore
import XMPPStream
@testable import Server

/// The room value alone, without sockets: each event and what it returns, by XEP-0045 section.
@Suite("MUCRoom: XEP-0045 events, socket-free")
struct MUCRoomTests {
    static let room = try! JID("room@conference.example.com")
    static let t0 = Date(timeIntervalSince1970: 1_800_000_000)
    static let alice = try! JID("alice@example.com/phone")
    static let bob = try! JID("bob@example.org/laptop")
    static let carol = try! JID("carol@example.com/pc")

    static func presence(to nick: String, type: String? = nil, show: String? = nil, join: XMLElement? = nil) -> Stanza {
        var attributes = [XMLAttribute("to", "\(room)/\(nick)")]
        if let type { attributes.append(XMLAttribute("type", type)) }
        var children: [XMLNode] = []
        if let show { children.append(.element(XMLElement(name: "show", namespace: XMLNamespace.client, text: show))) }
        children.append(.element(join ?? XMLElement(name: "x", namespace: MUCNamespace.muc)))
        return Stanza(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: attributes, children: children))!
    }

    static func groupchat(_ body: String? = nil, subject: String? = nil, to nick: String? = nil, type: String = "groupchat") -> Stanza {
        var children: [XMLNode] = []
        if let body { children.append(.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: body))) }
        if let subject { children.append(.element(XMLElement(name: "subject", namespace: XMLNamespace.client, text: subject))) }
        let to = nick.map { "\(room)/\($0)" } ?? room.description
        return Stanza(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", to), XMLAttribute("type", type)], children: children))!
    }

    /// (from, to) of each element, and its type when it has one.
    static func summary(_ out: [XMLElement]) -> [String] {
        out.map { "\($0.name) \($0.attribute("from") ?? "-")→\($0.attribute("to") ?? "-")\($0.attribute("type").map { " " + $0 } ?? "")" }
    }

    static func statuses(_ element: XMLElement) -> [String] {
        element.firstChild(name: "x", namespace: MUCNamespace.user)?.children(name: "status", namespace: MUCNamespace.user).compactMap { $0.attribute("code") } ?? []
    }

    static func errorCondition(_ element: XMLElement) -> String? {
        element.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name
    }

    /// A room with alice (owner, configured) and bob.
    static func populated() -> MUCRoom {
        var room = MUCRoom(jid: Self.room)
        _ = room.presence(presence(to: "alice"), from: alice, nick: "alice", isCreator: true, now: t0)
        _ = room.configure(by: alice)
        _ = room.presence(presence(to: "bob"), from: bob, nick: "bob", isCreator: false, now: t0)
        return room
    }

    @Test("§10.1: the creator gets 110 and 201 and owns the room; it is locked for others until configured")
    func creation() {
        var room = MUCRoom(jid: Self.room)
        let out = room.presence(Self.presence(to: "alice"), from: Self.alice, nick: "alice", isCreator: true, now: Self.t0)
        #expect(Self.summary(out) == ["presence room@conference.example.com/alice→alice@example.com/phone", "message room@conference.example.com→alice@example.com/phone groupchat"])
        #expect(Self.statuses(out[0]) == ["110", "201"])
        #expect(room.locked)
        let refused = room.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(refused[0]) == "item-not-found")
        let byOther = room.configure(by: Self.bob)
        #expect(byOther == nil)
        let byOwner = room.configure(by: Self.alice)
        // Opening the locked room tells nobody of a change: there was no configuration before.
        #expect(byOwner?.isEmpty == true)
        #expect(!room.locked)
        // Someone who may not create rooms cannot bring one into being.
        var empty = MUCRoom(jid: Self.room)
        let refusal1 = empty.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(refusal1[0]) == "not-allowed")
        #expect(empty.isEmpty)
    }

    @Test("§7.2.3: the others' presence first, the newcomer to the others, its own presence, history, the subject last")
    func enteringOrder() {
        var room = Self.populated()
        _ = room.message(Self.groupchat("one"), from: Self.alice, nick: nil, now: Self.t0)
        let out = room.presence(Self.presence(to: "carol"), from: Self.carol, nick: "carol", isCreator: true, now: Self.t0)
        #expect(Self.summary(out) == [
            "presence room@conference.example.com/alice→carol@example.com/pc",
            "presence room@conference.example.com/bob→carol@example.com/pc",
            "presence room@conference.example.com/carol→alice@example.com/phone",
            "presence room@conference.example.com/carol→bob@example.org/laptop",
            "presence room@conference.example.com/carol→carol@example.com/pc",
            "message room@conference.example.com/alice→carol@example.com/pc groupchat",
            "message room@conference.example.com→carol@example.com/pc groupchat",
        ])
        #expect(Self.statuses(out[4]) == ["110"])
        // Semi-anonymous: alice (moderator) sees carol's real JID, bob (participant) does not.
        let item = { (element: XMLElement) in element.firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "item", namespace: MUCNamespace.user) }
        #expect(item(out[2])?.attribute("jid") == Self.carol.description)
        #expect(item(out[3])?.attribute("jid") == nil)
        #expect(out[5].firstChild(name: "delay", namespace: MUCNamespace.delay)?.attribute("stamp") == "2027-01-15T08:00:00Z")
    }

    @Test("§7.2.9, §7.6: a nickname in use is a conflict; changing it sends 303 then the new presence")
    func nicknames() {
        var room = Self.populated()
        let conflict = room.presence(Self.presence(to: "alice"), from: Self.carol, nick: "alice", isCreator: true, now: Self.t0)
        #expect(Self.errorCondition(conflict[0]) == "conflict")
        let renamed = room.presence(Self.presence(to: "robert"), from: Self.bob, nick: "robert", isCreator: false, now: Self.t0)
        #expect(Self.summary(renamed) == [
            "presence room@conference.example.com/bob→alice@example.com/phone unavailable",
            "presence room@conference.example.com/bob→bob@example.org/laptop unavailable",
            "presence room@conference.example.com/robert→alice@example.com/phone",
            "presence room@conference.example.com/robert→bob@example.org/laptop",
        ])
        #expect(Self.statuses(renamed[0]) == ["303"])
        #expect(Self.statuses(renamed[1]) == ["303", "110"])
        #expect(room.occupant(nick: "robert")?.realJID == Self.bob)
        // To a nickname someone else holds: refused, and nothing changes.
        let refusal2 = room.presence(Self.presence(to: "alice"), from: Self.bob, nick: "alice", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(refusal2[0]) == "conflict")
        #expect(room.occupant(nick: "robert") != nil)
    }

    @Test("§7.4, §7.5, §8.1: groupchat to everyone (history bounded), private to one, the subject by moderators, nothing from outsiders")
    func messages() {
        var room = Self.populated()
        let hi = room.message(Self.groupchat("hi"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.summary(hi) == [
            "message room@conference.example.com/bob→alice@example.com/phone groupchat",
            "message room@conference.example.com/bob→bob@example.org/laptop groupchat",
        ])
        let psst = room.message(Self.groupchat("psst", to: "alice", type: "chat"), from: Self.bob, nick: "alice", now: Self.t0)
        #expect(Self.summary(psst) == [
            "message room@conference.example.com/bob→alice@example.com/phone chat",
        ])
        let refusal3 = room.message(Self.groupchat("?", to: "nobody", type: "chat"), from: Self.bob, nick: "nobody", now: Self.t0)
        #expect(Self.errorCondition(refusal3[0]) == "item-not-found")
        let refusal4 = room.message(Self.groupchat("intruder"), from: Self.carol, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(refusal4[0]) == "not-acceptable")
        let refusal5 = room.message(Self.groupchat("wrong type", type: "chat"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(refusal5[0]) == "bad-request")
        let refusal6 = room.message(Self.groupchat(subject: "bob's"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(refusal6[0]) == "forbidden")
        #expect(room.subject == nil)
        let told = room.message(Self.groupchat(subject: "Plans"), from: Self.alice, nick: nil, now: Self.t0)
        #expect(told.count == 2)
        #expect(room.subject?.text == "Plans" && room.subject?.by == "alice")
        for index in 0..<30 { _ = room.message(Self.groupchat("m\(index)"), from: Self.alice, nick: nil, now: Self.t0) }
        #expect(room.history.count == room.historyLimit)
        #expect(room.history.last?.message.body == "m29")
    }

    @Test("§7.14: leaving tells the others and the occupant (110); a bounced presence removes an occupant; the last one leaving empties the room")
    func leaving() {
        var room = Self.populated()
        let left = room.presence(Self.presence(to: "bob", type: "unavailable"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.summary(left) == [
            "presence room@conference.example.com/bob→alice@example.com/phone unavailable",
            "presence room@conference.example.com/bob→bob@example.org/laptop unavailable",
        ])
        #expect(Self.statuses(left[1]) == ["110"])
        _ = room.presence(Self.presence(to: "carol"), from: Self.carol, nick: "carol", isCreator: true, now: Self.t0)
        let removed = room.remove(realJID: Self.carol)
        #expect(Self.summary(removed) == ["presence room@conference.example.com/carol→alice@example.com/phone unavailable"])
        // An unavailable from someone not in the room changes nothing.
        let nothing = room.presence(Self.presence(to: "bob", type: "unavailable"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(nothing.isEmpty)
        _ = room.presence(Self.presence(to: "alice", type: "unavailable"), from: Self.alice, nick: "alice", isCreator: true, now: Self.t0)
        #expect(room.isEmpty)
    }

    @Test("Presence updates reach everyone, the join element is not repeated, history asked as maxstanzas='0' is none")
    func updatesAndHistory() {
        var room = Self.populated()
        _ = room.message(Self.groupchat("before"), from: Self.alice, nick: nil, now: Self.t0)
        let away = room.presence(Self.presence(to: "bob", show: "away"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(away.count == 2)
        #expect(away.allSatisfy { $0.firstChild(name: "show", namespace: XMLNamespace.client)?.text == "away" && $0.firstChild(namespace: MUCNamespace.muc) == nil })
        let noHistory = XMLElement(name: "x", namespace: MUCNamespace.muc, children: [
            .element(XMLElement(name: "history", namespace: MUCNamespace.muc, attributes: [XMLAttribute("maxstanzas", "0")])),
        ])
        let entered = room.presence(Self.presence(to: "carol", join: noHistory), from: Self.carol, nick: "carol", isCreator: true, now: Self.t0)
        #expect(!entered.contains { $0.name == "message" && $0.body == "before" })
    }

    static func configured(_ change: (inout MUCRoomConfiguration) -> Void) -> MUCRoom {
        var room = MUCRoom(jid: Self.room)
        _ = room.presence(presence(to: "alice"), from: alice, nick: "alice", isCreator: true, now: t0)
        var configuration = MUCRoomConfiguration()
        change(&configuration)
        _ = room.configure(by: alice, configuration)
        return room
    }

    @Test("§7.2.5–§7.2.10: members only, password, full rooms, bans; an owner always enters")
    func entryRules() {
        var members = Self.configured { $0.membersOnly = true }
        let notMember = members.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(notMember[0]) == "registration-required")
        let made = members.setAffiliation(of: Self.bob.bare, to: "member", by: Self.alice)
        #expect((try? made.get()) != nil)
        let entered = members.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.statuses(entered.first { $0.attribute("to") == Self.bob.description && $0.attribute("from") == "\(Self.room)/bob" }!) == ["110"])

        var secret = Self.configured { $0.password = "s3cret" }
        let withoutPassword = secret.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(withoutPassword[0]) == "not-authorized")
        let join = XMLElement(name: "x", namespace: MUCNamespace.muc, children: [.element(XMLElement(name: "password", namespace: MUCNamespace.muc, text: "s3cret"))])
        let withPassword = secret.presence(Self.presence(to: "bob", join: join), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(withPassword[0]) == nil)

        var small = Self.configured { $0.maxUsers = 1 }
        let full = small.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(full[0]) == "service-unavailable")

        var room = Self.populated()
        if case .failure(let error) = room.setAffiliation(of: Self.alice.bare, to: "outcast", by: Self.bob) {
            #expect(error.condition == .forbidden, "§9: a participant is no admin")
        } else { Issue.record("a participant banned someone") }
        let banned = room.setAffiliation(of: Self.bob.bare, to: "outcast", by: Self.alice, reason: "spam")
        let out = (try? banned.get()) ?? []
        // Everyone learns (301), bob first, with the reason and who did it, and he is out.
        #expect(Self.summary(out) == [
            "presence room@conference.example.com/bob→bob@example.org/laptop unavailable",
            "presence room@conference.example.com/bob→alice@example.com/phone unavailable",
        ])
        #expect(Self.statuses(out[0]) == ["301", "110"] && Self.statuses(out[1]) == ["301"])
        let item = out[0].firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "item", namespace: MUCNamespace.user)
        #expect(item?.firstChild(name: "reason", namespace: MUCNamespace.user)?.text == "spam")
        #expect(item?.firstChild(name: "actor", namespace: MUCNamespace.user)?.attribute("nick") == "alice")
        let again = room.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(again[0]) == "forbidden")
        // §7.2: a refused entry carries the muc element (clients recognise the refusal by it),
        // and never the password that was given.
        #expect(again[0].firstChild(name: "x", namespace: MUCNamespace.muc) != nil)
        #expect(withPassword.isEmpty == false)
        let wrong = XMLElement(name: "x", namespace: MUCNamespace.muc, children: [.element(XMLElement(name: "password", namespace: MUCNamespace.muc, text: "guess"))])
        let refusedPassword = secret.presence(Self.presence(to: "carol", join: wrong), from: Self.carol, nick: "carol", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(refusedPassword[0]) == "not-authorized")
        #expect(refusedPassword[0].firstChild(name: "x", namespace: MUCNamespace.muc)?.children.isEmpty == true)
    }

    @Test("§8: moderators kick (307) and give or take voice; participants cannot; owners and admins are not kicked; the last owner stays")
    func moderation() {
        var room = Self.populated()
        _ = room.presence(Self.presence(to: "carol"), from: Self.carol, nick: "carol", isCreator: true, now: Self.t0)
        if case .failure(let error) = room.setRole(of: "carol", to: "none", by: Self.bob) { #expect(error.condition == .forbidden) } else { Issue.record("a participant kicked") }
        if case .failure(let error) = room.setRole(of: "alice", to: "none", by: Self.alice) { #expect(error.condition == .notAllowed) } else { Issue.record("an owner was kicked") }
        let kicked = (try? room.setRole(of: "carol", to: "none", by: Self.alice, reason: "be nice").get()) ?? []
        #expect(kicked.count == 3 && kicked.allSatisfy { Self.statuses($0).contains("307") })
        #expect(kicked.first?.attribute("to") == Self.carol.description, "§8.2: the kicked occupant hears it first")
        #expect(kicked.allSatisfy { $0.firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "item", namespace: MUCNamespace.user)?
            .firstChild(name: "reason", namespace: MUCNamespace.user)?.text == "be nice" })
        #expect(room.occupant(nick: "carol") == nil)
        let silenced = (try? room.setRole(of: "bob", to: "visitor", by: Self.alice).get()) ?? []
        #expect(silenced.count == 2)
        let refused = room.message(Self.groupchat("can I speak?"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(refused[0]) == "forbidden")
        if case .failure(let error) = room.setAffiliation(of: Self.alice.bare, to: "member", by: Self.alice) { #expect(error.condition == .conflict) } else { Issue.record("the last owner left") }
        if case .failure(let error) = room.setAffiliation(of: Self.alice.bare, to: "none", by: Self.bob) { #expect(error.condition == .forbidden) } else { Issue.record("a participant changed an owner") }
        // §9.1: an admin cannot touch an owner.
        _ = room.setAffiliation(of: Self.bob.bare, to: "admin", by: Self.alice)
        if case .failure(let error) = room.setAffiliation(of: Self.alice.bare, to: "member", by: Self.bob) { #expect(error.condition == .notAllowed) } else { Issue.record("an admin demoted an owner") }
    }

    @Test("Moderated rooms give newcomers no voice; non-anonymous rooms show real JIDs to all (100)")
    func moderatedAndNonAnonymous() {
        var moderated = Self.configured { $0.moderated = true }
        let entered = moderated.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        let own = entered.first { $0.attribute("from") == "\(Self.room)/bob" && $0.attribute("to") == Self.bob.description }!
        #expect(own.firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "item", namespace: MUCNamespace.user)?.attribute("role") == "visitor")
        let silent = moderated.message(Self.groupchat("hello?"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(silent[0]) == "forbidden")

        var open = Self.configured { $0.whoIs = "anyone" }
        _ = open.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        let third = open.presence(Self.presence(to: "carol"), from: Self.carol, nick: "carol", isCreator: false, now: Self.t0)
        let bobAsSeenByCarol = third.first { $0.attribute("from") == "\(Self.room)/bob" }!
        #expect(bobAsSeenByCarol.firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "item", namespace: MUCNamespace.user)?.attribute("jid") == Self.bob.description)
        #expect(Self.statuses(third.first { $0.attribute("from") == "\(Self.room)/carol" && $0.attribute("to") == Self.carol.description }!) == ["100", "110"])
    }

    @Test("§10.9: the owner destroys the room; every occupant is told, with the alternate venue")
    func destroy() {
        var room = Self.populated()
        #expect(room.destroy(by: Self.bob, alternate: nil, reason: nil) == nil)
        let out = room.destroy(by: Self.alice, alternate: "other@conference.example.com", reason: "moving") ?? []
        #expect(out.count == 2)
        #expect(out.allSatisfy { $0.firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "destroy", namespace: MUCNamespace.user)?.attribute("jid") == "other@conference.example.com" })
        #expect(room.isEmpty && room.isGone)
    }

    @Test("§10.2: the form's fields set the configuration; values a room cannot take are refused")
    func configurationForm() throws {
        func form(_ fields: [(String, String)]) -> XMLElement {
            XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", "submit")], children: fields.map { name, value in
                .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("var", name)],
                                    children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: value))]))
            })
        }
        let applied = try #require(MUCRooms.applyForm(form([
            ("muc#roomconfig_roomname", "Tea"), ("muc#roomconfig_persistentroom", "1"), ("muc#roomconfig_publicroom", "0"),
            ("muc#roomconfig_membersonly", "true"), ("muc#roomconfig_passwordprotectedroom", "1"), ("muc#roomconfig_roomsecret", "pw"),
            ("muc#roomconfig_maxusers", "50"), ("muc#roomconfig_whois", "anyone"), ("muc#roomconfig_unknown", "x"),
        ]), to: MUCRoomConfiguration()))
        #expect(applied.name == "Tea" && applied.persistent && !applied.isPublic && applied.membersOnly)
        #expect(applied.password == "pw" && applied.maxUsers == 50 && applied.whoIs == "anyone")
        #expect(MUCRooms.applyForm(form([("muc#roomconfig_maxusers", "lots")]), to: MUCRoomConfiguration()) == nil)
        #expect(MUCRooms.applyForm(form([("muc#roomconfig_whois", "nobody")]), to: MUCRoomConfiguration()) == nil)
        #expect(MUCRooms.applyForm(form([("muc#roomconfig_passwordprotectedroom", "1")]), to: MUCRoomConfiguration()) == nil)
        // The form offered carries the room's values.
        var room = Self.configured { $0.name = "Named" }
        _ = room.configure(by: Self.alice, applied)
        let offered = MUCRooms.configurationForm(room)
        let value = { (name: String) in offered.children(name: "field", namespace: MUCNamespace.dataForms).first { $0.attribute("var") == name }?.firstChild(name: "value", namespace: MUCNamespace.dataForms)?.text }
        #expect(value("muc#roomconfig_roomname") == "Tea")
        #expect(value("muc#roomconfig_persistentroom") == "1")
        #expect(value("muc#roomconfig_maxusers") == "50")
    }


    @Test("XEP-0421: one occupant-id per bare real JID, the same under any nickname, different for others, never the sender's own claim")
    func occupantIDs() {
        var room = Self.populated()
        room.occupantIDKey = [1, 2, 3]
        let id = { (element: XMLElement) in element.firstChild(name: "occupant-id", namespace: MUCNamespace.occupantID)?.attribute("id") }
        let claimed = Stanza(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", Self.room.description), XMLAttribute("type", "groupchat")], children: [
            .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "hi")),
            .element(XMLElement(name: "occupant-id", namespace: MUCNamespace.occupantID, attributes: [XMLAttribute("id", "forged")])),
        ]))!
        let fromBob = room.message(claimed, from: Self.bob, nick: nil, now: Self.t0)
        #expect(fromBob.allSatisfy { $0.children(name: "occupant-id", namespace: MUCNamespace.occupantID).count == 1 && id($0) != "forged" })
        let bobID = id(fromBob[0])
        let fromAlice = room.message(Self.groupchat("hello"), from: Self.alice, nick: nil, now: Self.t0)
        #expect(id(fromAlice[0]) != bobID)
        // Another client of bob's, under another nickname: the same id.
        let bobPhone = try! JID("bob@example.org/phone")
        let entered = room.presence(Self.presence(to: "bobby"), from: bobPhone, nick: "bobby", isCreator: false, now: Self.t0)
        #expect(id(entered.first { $0.attribute("from") == "\(Self.room)/bobby" }!) == bobID)
    }

    @Test("§7.8.2: an occupant's invitation goes on from the room; in a members-only room only owners and admins invite, and the invitee becomes a member")
    func invitations() {
        func invite(_ to: String) -> Stanza {
            Stanza(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", Self.room.description)], children: [
                .element(XMLElement(name: "x", namespace: MUCNamespace.user, children: [
                    .element(XMLElement(name: "invite", namespace: MUCNamespace.user, attributes: [XMLAttribute("to", to)], children: [
                        .element(XMLElement(name: "reason", namespace: MUCNamespace.user, text: "join us")),
                    ])),
                ])),
            ]))!
        }
        var room = Self.populated()
        let sent = room.message(invite("dave@example.net"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.summary(sent) == ["message room@conference.example.com→dave@example.net"])
        let forwarded = sent[0].firstChild(name: "x", namespace: MUCNamespace.user)?.firstChild(name: "invite", namespace: MUCNamespace.user)
        #expect(forwarded?.attribute("from") == "bob@example.org")
        #expect(forwarded?.firstChild(name: "reason", namespace: MUCNamespace.user)?.text == "join us")

        var members = Self.configured { $0.membersOnly = true }
        _ = members.setAffiliation(of: Self.bob.bare, to: "member", by: Self.alice)
        _ = members.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        let byMember = members.message(invite("dave@example.net"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(byMember[0]) == "forbidden")
        _ = members.message(invite("dave@example.net"), from: Self.alice, nick: nil, now: Self.t0)
        #expect(members.affiliation(of: try! JID("dave@example.net")) == "member")
    }


    @Test("§7.2.15: history by maxstanzas, maxchars, seconds and since; nothing asked is all the room keeps")
    func historyRequests() {
        let history: [(message: XMLElement, at: Date)] = (0..<5).map { index in
            (Self.groupchat("m\(index)").element.setting(attribute: "from", to: "\(Self.room)/alice"), Self.t0.addingTimeInterval(Double(index) * 60))
        }
        let now = Self.t0.addingTimeInterval(300)
        func bodies(_ attributes: [XMLAttribute]?) -> [String] {
            let request = attributes.map { XMLElement(name: "history", namespace: MUCNamespace.muc, attributes: $0) }
            return MUCRoom.historyAsked(request, from: history, room: Self.room, now: now).compactMap { $0.body }
        }
        #expect(bodies(nil) == ["m0", "m1", "m2", "m3", "m4"])
        #expect(bodies([XMLAttribute("maxstanzas", "2")]) == ["m3", "m4"])
        #expect(bodies([XMLAttribute("maxstanzas", "0")]) == [])
        #expect(bodies([XMLAttribute("seconds", "130")]) == ["m3", "m4"])
        #expect(bodies([XMLAttribute("since", "2027-01-15T08:02:00Z")]) == ["m2", "m3", "m4"])
        let one = XMLFragment.serialize(history[4].message).count
        #expect(bodies([XMLAttribute("maxchars", "\(one)")]) == ["m4"])
        #expect(bodies([XMLAttribute("maxchars", "0")]) == [])
        #expect(MUCRoom.historyAsked(nil, from: history, room: Self.room, now: now).allSatisfy {
            $0.firstChild(name: "delay", namespace: MUCNamespace.delay)?.attribute("from") == Self.room.description
        })
    }


    // MARK: Nicknames (RFC 8266), private messages, history length, voice, rate, configuration changes

    @Test("RFC 8266: nicknames are enforced (NFKC, spaces folded; 210 says so), compared without case, and refused when they have controls")
    func nicknameProfile() {
        var room = Self.populated()
        let wide = room.presence(Self.presence(to: "\u{FF43}\u{FF41}\u{FF52}\u{FF4F}\u{FF4C}"), from: Self.carol, nick: "\u{FF43}\u{FF41}\u{FF52}\u{FF4F}\u{FF4C}",
                                 isCreator: false, now: Self.t0)
        let own = wide.first { $0.attribute("to") == Self.carol.description && $0.name == "presence" && $0.attribute("from") == "\(Self.room)/carol" }
        #expect(own != nil, "the fullwidth nickname is shown as its NFKC form")
        #expect(own.map(Self.statuses) == ["210", "110"])
        #expect(room.occupant(nick: "carol")?.realJID == Self.carol)

        var spaced = Self.populated()
        let folded = spaced.presence(Self.presence(to: " Carol\u{00A0}\u{00A0} Jones "), from: Self.carol, nick: " Carol\u{00A0}\u{00A0} Jones ", isCreator: false, now: Self.t0)
        #expect(folded.contains { $0.attribute("from") == "\(Self.room)/Carol Jones" && Self.statuses($0) == ["210", "110"] })

        // Alice is alice: the same name to the room.
        let conflict = room.presence(Self.presence(to: "ALICE"), from: Self.bob, nick: "ALICE", isCreator: false, now: Self.t0)
        #expect(Self.errorCondition(conflict[0]) == "conflict")
        #expect(room.occupant(nick: "Alice")?.realJID == Self.alice)
        // An occupant may change the case of its own nickname.
        let recased = room.presence(Self.presence(to: "Alice"), from: Self.alice, nick: "Alice", isCreator: false, now: Self.t0)
        #expect(recased.contains { $0.attribute("from") == "\(Self.room)/Alice" && $0.attribute("type") == nil })
        // Controls and nothing-but-spaces are no nicknames.
        for bad in ["bell\u{7}", "   "] {
            var fresh = Self.populated()
            let refused = fresh.presence(Self.presence(to: "x"), from: Self.carol, nick: bad, isCreator: false, now: Self.t0)
            #expect(Self.errorCondition(refused[0]) == "jid-malformed", "\(bad.debugDescription)")
            #expect(fresh.occupant(realJID: Self.carol) == nil)
        }
    }

    @Test("muc#roomconfig_allowpm: who may send private messages")
    func privateMessageRule() {
        func attempt(_ rule: String, from sender: JID, senderRole: String? = nil) -> String? {
            var room = Self.configured { $0.allowPrivateMessages = rule }
            _ = room.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
            if let senderRole { _ = room.setRole(of: "bob", to: senderRole, by: Self.alice) }
            let to = sender == Self.alice ? "bob" : "alice"
            let out = room.message(Self.groupchat("psst", to: to, type: "chat"), from: sender, nick: to, now: Self.t0)
            return out.first.flatMap(Self.errorCondition)
        }
        #expect(attempt("anyone", from: Self.bob, senderRole: "visitor") == nil)
        #expect(attempt("participants", from: Self.bob) == nil)
        #expect(attempt("participants", from: Self.bob, senderRole: "visitor") == "forbidden")
        #expect(attempt("moderators", from: Self.bob) == "forbidden")
        #expect(attempt("moderators", from: Self.alice) == nil)
        #expect(attempt("none", from: Self.alice) == "forbidden")
    }

    @Test("muc#maxhistoryfetch: a room keeps the history its owner set, never more than the service's")
    func roomHistoryLength() {
        var short = Self.configured { $0.historyLength = 2 }
        for index in 0..<5 { _ = short.message(Self.groupchat("m\(index)"), from: Self.alice, nick: nil, now: Self.t0) }
        #expect(short.history.map { $0.message.body } == ["m3", "m4"])
        var long = Self.configured { $0.historyLength = 1000 }
        for index in 0..<30 { _ = long.message(Self.groupchat("m\(index)"), from: Self.alice, nick: nil, now: Self.t0) }
        #expect(long.history.count == long.historyLimit)
    }

    @Test("§7.13, §8.6: a visitor's voice request reaches the moderators; a moderator's approval makes it a participant")
    func voiceRequests() {
        var room = Self.configured { $0.moderated = true }
        _ = room.presence(Self.presence(to: "bob"), from: Self.bob, nick: "bob", isCreator: false, now: Self.t0)
        #expect(room.occupant(nick: "bob")?.role == "visitor")
        func form(_ type: String, _ fields: [(String, String)]) -> Stanza {
            let x = XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", type)], children: fields.map { name, value in
                .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("var", name)],
                                    children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: value))]))
            })
            return Stanza(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", Self.room.description)], children: [.element(x)]))!
        }
        let asked = room.message(form("submit", [("FORM_TYPE", MUCNamespace.request), ("muc#role", "participant")]), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.summary(asked) == ["message room@conference.example.com→alice@example.com/phone"])
        let forwarded = asked.first?.firstChild(name: "x", namespace: MUCNamespace.dataForms).map(MUCRoom.formValues) ?? [:]
        #expect(forwarded["muc#roomnick"] == "bob" && forwarded["muc#jid"] == Self.bob.description && forwarded["muc#request_allow"] == "false")
        #expect(room.occupant(nick: "bob")?.role == "visitor")
        // A visitor cannot approve itself; the moderator's approval gives voice.
        _ = room.message(form("submit", [("FORM_TYPE", MUCNamespace.request), ("muc#roomnick", "bob"), ("muc#request_allow", "true")]), from: Self.bob, nick: nil, now: Self.t0)
        #expect(room.occupant(nick: "bob")?.role == "visitor")
        let approved = room.message(form("submit", [("FORM_TYPE", MUCNamespace.request), ("muc#role", "participant"), ("muc#roomnick", "bob"), ("muc#request_allow", "true")]),
                                    from: Self.alice, nick: nil, now: Self.t0)
        #expect(room.occupant(nick: "bob")?.role == "participant")
        #expect(approved.count == 2 && approved.allSatisfy { $0.name == "presence" })
        let spoken = room.message(Self.groupchat("thanks"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(spoken.allSatisfy { Self.errorCondition($0) == nil } && spoken.count == 2)
    }

    @Test("muc.messages_per_second: an occupant beyond its burst waits (resource-constraint); the allowance refills with time")
    func messageRate() {
        var room = Self.populated()
        room.messageRate = SendingRate(perSecond: 1, burst: 2)
        let first = room.message(Self.groupchat("1"), from: Self.bob, nick: nil, now: Self.t0)
        let second = room.message(Self.groupchat("2"), from: Self.bob, nick: nil, now: Self.t0)
        let third = room.message(Self.groupchat("3"), from: Self.bob, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(first[0]) == nil && Self.errorCondition(second[0]) == nil)
        #expect(Self.errorCondition(third[0]) == "resource-constraint")
        #expect(third[0].firstChild(name: "error", namespace: XMLNamespace.client)?.attribute("type") == "wait")
        #expect(room.history.map { $0.message.body } == ["1", "2"])
        let later = room.message(Self.groupchat("4"), from: Self.bob, nick: nil, now: Self.t0.addingTimeInterval(1))
        #expect(Self.errorCondition(later[0]) == nil)
        // Another occupant has its own allowance.
        let other = room.message(Self.groupchat("alice"), from: Self.alice, nick: nil, now: Self.t0)
        #expect(Self.errorCondition(other[0]) == nil)
    }

    @Test("§10.2.1: a configuration change is announced (104, 172); making the room members-only removes non-members (322)")
    func configurationChanges() {
        var room = Self.populated()
        var configuration = room.configuration
        configuration.name = "Plans"
        configuration.whoIs = "anyone"
        let renamed = room.configure(by: Self.alice, configuration) ?? []
        #expect(Self.summary(renamed) == [
            "message room@conference.example.com→alice@example.com/phone groupchat",
            "message room@conference.example.com→bob@example.org/laptop groupchat",
        ])
        #expect(renamed.allSatisfy { Self.statuses($0) == ["104", "172"] })
        #expect(room.configure(by: Self.alice, configuration)?.isEmpty == true, "no change, no notice")
        configuration.membersOnly = true
        let closed = room.configure(by: Self.alice, configuration) ?? []
        #expect(Self.summary(closed) == [
            "presence room@conference.example.com/bob→bob@example.org/laptop unavailable",
            "presence room@conference.example.com/bob→alice@example.com/phone unavailable",
            "message room@conference.example.com→alice@example.com/phone groupchat",
        ])
        #expect(Self.statuses(closed[0]) == ["322", "110"] && Self.statuses(closed[1]) == ["322"])
        #expect(room.occupant(realJID: Self.bob) == nil)
    }

    @Test("Stored configurations from before a field existed load with its default; the form reads allowpm and maxhistoryfetch")
    func configurationCompatibility() throws {
        let old = try JSONDecoder().decode(MUCRoomConfiguration.self, from: Data(#"{"name":"Old","persistent":true,"maxUsers":30}"#.utf8))
        #expect(old.name == "Old" && old.persistent && old.maxUsers == 30)
        #expect(old.allowPrivateMessages == "anyone" && old.historyLength == nil && old.whoIs == "moderators")
        func form(_ fields: [(String, String)]) -> XMLElement {
            XMLElement(name: "x", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("type", "submit")], children: fields.map { name, value in
                .element(XMLElement(name: "field", namespace: MUCNamespace.dataForms, attributes: [XMLAttribute("var", name)],
                                    children: [.element(XMLElement(name: "value", namespace: MUCNamespace.dataForms, text: value))]))
            })
        }
        let applied = MUCRooms.applyForm(form([("muc#roomconfig_allowpm", "moderators"), ("muc#maxhistoryfetch", "5")]), to: MUCRoomConfiguration())
        #expect(applied?.allowPrivateMessages == "moderators" && applied?.historyLength == 5)
        #expect(MUCRooms.applyForm(form([("muc#roomconfig_allowpm", "everybody")]), to: MUCRoomConfiguration()) == nil)
        #expect(MUCRooms.applyForm(form([("muc#maxhistoryfetch", "-1")]), to: MUCRoomConfiguration()) == nil)
    }
}
