import Foundation
import Storage
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// XEP-0045 group chat at conference.DOMAIN (issue 11): what a Conversations, Dino or Gajim
/// user does in a temporary room, through real client streams.
@Suite("Group chat (XEP-0045) at conference.DOMAIN")
struct MUCTests {
    static let muc = "http://jabber.org/protocol/muc"
    static let user = "http://jabber.org/protocol/muc#user"
    static let owner = "http://jabber.org/protocol/muc#owner"

    func enter(_ client: TestClient, _ occupantJID: String, history: Int? = nil) async throws {
        var join: [XMLNode] = []
        if let history {
            join.append(.element(XMLElement(name: "history", namespace: Self.muc, attributes: [XMLAttribute("maxstanzas", "\(history)")])))
        }
        try await client.send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", occupantJID)], children: [
            .element(XMLElement(name: "x", namespace: Self.muc, children: join)),
        ]))
    }

    func statuses(_ presence: XMLElement) -> Set<String> {
        Set(presence.firstChild(name: "x", namespace: Self.user)?.children(name: "status", namespace: Self.user).compactMap { $0.attribute("code") } ?? [])
    }

    func item(_ presence: XMLElement) -> XMLElement? {
        presence.firstChild(name: "x", namespace: Self.user)?.firstChild(name: "item", namespace: Self.user)
    }

    /// Creates `room` as `client` (nick `nick`) and accepts the instant room (§10.1.2).
    func create(_ client: TestClient, room: String, nick: String) async throws {
        try await enter(client, "\(room)/\(nick)")
        let own = try await client.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/\(nick)" }
        #expect(statuses(own) == ["110", "201"])
        #expect(item(own)?.attribute("affiliation") == "owner")
        #expect(item(own)?.attribute("role") == "moderator")
        _ = try await client.waitFor { $0.name == "message" && $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
        let accepted = try await client.iq(.set, to: room, payload: XMLElement(name: "query", namespace: Self.owner, children: [
            .element(XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")])),
        ]))
        #expect(accepted.attribute("type") == "result")
    }

    @Test("A room is created locked by its first occupant, opened as an instant room, and then others enter: presence in the XEP's order, subject last")
    func createAndEnter() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let room = "coffee@conference.a.example"
            // Locked while being set up (§10.1.1): carol is refused until alice accepts.
            try await enter(alice, "\(room)/alice")
            _ = try await alice.waitFor { $0.name == "message" && $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
            try await enter(carol, "\(room)/carol")
            let locked = try await carol.waitFor { $0.name == "presence" }
            #expect(locked.attribute("type") == "error")
            #expect(locked.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "item-not-found")
            let accepted = try await alice.iq(.set, to: room, payload: XMLElement(name: "query", namespace: Self.owner, children: [
                .element(XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")])),
            ]))
            #expect(accepted.attribute("type") == "result")

            try await enter(carol, "\(room)/carol")
            // First alice's presence, then carol's own (110), then the subject.
            let first = try await carol.nextElement()
            #expect(first.name == "presence" && first.attribute("from") == "\(room)/alice")
            // Semi-anonymous: a participant does not see the moderator's real JID.
            #expect(item(first)?.attribute("jid") == nil)
            let own = try await carol.nextElement()
            #expect(own.attribute("from") == "\(room)/carol" && statuses(own) == ["110"])
            #expect(item(own)?.attribute("role") == "participant")
            let subject = try await carol.nextElement()
            #expect(subject.name == "message" && subject.firstChild(name: "subject", namespace: XMLNamespace.client) != nil)
            // Alice (a moderator) learns of carol, with her real JID.
            let joined = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/carol" }
            #expect(item(joined)?.attribute("jid")?.hasPrefix("carol@a.example/") == true)
            // The service lists the open room.
            let items = try await carol.iq(.get, to: "conference.a.example", payload: XMLElement(name: "query", namespace: DiscoModule.items))
            #expect(items.firstChild(name: "query", namespace: DiscoModule.items)?.children(name: "item", namespace: DiscoModule.items).compactMap { $0.attribute("jid") } == [room])
            let info = try await carol.iq(.get, to: room, payload: XMLElement(name: "query", namespace: DiscoModule.info))
            #expect(info.firstChild(name: "query", namespace: DiscoModule.info)?.firstChild(name: "identity", namespace: DiscoModule.info)?.attribute("category") == "conference")
            await alice.close()
            await carol.close()
        }
    }

    @Test("Messages are reflected to every occupant, history is replayed with delays, nicknames conflict and change, private messages reach one occupant")
    func conversation() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (carol, carolJID) = try await server.loggedIn("carol@a.example")
            let room = "tea@conference.a.example"
            try await create(alice, room: room, nick: "alice")
            for index in 0..<3 {
                try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                    XMLAttribute("to", room), XMLAttribute("type", "groupchat"), XMLAttribute("id", "h\(index)"),
                ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "earlier \(index)"))]))
                let reflected = try await alice.waitFor { $0.attribute("id") == "h\(index)" }
                #expect(reflected.attribute("from") == "\(room)/alice")
            }
            // Carol asks for the last two messages of history.
            try await enter(carol, "\(room)/carol", history: 2)
            // Everything up to the subject, which comes last (§7.2.16).
            var beforeSubject: [XMLElement] = []
            while true {
                let element = try await carol.nextElement()
                if element.firstChild(name: "subject", namespace: XMLNamespace.client) != nil { break }
                beforeSubject.append(element)
            }
            let replayed = beforeSubject.filter { $0.name == "message" }
            #expect(replayed.map { $0.attribute("id") } == ["h1", "h2"])
            #expect(replayed.allSatisfy { $0.firstChild(name: "delay", namespace: "urn:xmpp:delay")?.attribute("from") == room })

            // A nickname in use (§7.2.9).
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await enter(bob, "\(room)/alice")
            let conflict = try await bob.waitFor { $0.name == "presence" }
            #expect(conflict.attribute("type") == "error")
            #expect(conflict.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "conflict")

            // Live: to everyone, the sender included.
            try await carol.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", room), XMLAttribute("type", "groupchat"), XMLAttribute("id", "live"),
            ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "hello all"))]))
            for client in [alice, carol] {
                let message = try await client.waitFor { $0.attribute("id") == "live" }
                #expect(message.attribute("from") == "\(room)/carol" && message.body == "hello all")
            }
            // Private, to alice alone, from carol's occupant JID.
            try await carol.sendMessage(to: "\(room)/alice", body: "psst", id: "pm")
            let whisper = try await alice.waitFor { $0.attribute("id") == "pm" }
            #expect(whisper.attribute("from") == "\(room)/carol")
            // A new nickname: 303 with the new one, then presence under it (§7.6).
            try await enter(carol, "\(room)/caroline")
            let renamed = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" && $0.attribute("from") == "\(room)/carol" }
            #expect(statuses(renamed) == ["303"])
            #expect(item(renamed)?.attribute("nick") == "caroline")
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/caroline" }
            // The subject: a participant may not, the moderator may (§8.1).
            try await carol.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", room), XMLAttribute("type", "groupchat"), XMLAttribute("id", "s1"),
            ], children: [.element(XMLElement(name: "subject", namespace: XMLNamespace.client, text: "mine"))]))
            #expect(try await carol.waitFor { $0.attribute("id") == "s1" }.attribute("type") == "error")
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", room), XMLAttribute("type", "groupchat"), XMLAttribute("id", "s2"),
            ], children: [.element(XMLElement(name: "subject", namespace: XMLNamespace.client, text: "Tea and cake"))]))
            #expect(try await carol.waitFor { $0.attribute("id") == "s2" }.firstChild(name: "subject", namespace: XMLNamespace.client)?.text == "Tea and cake")
            // XEP-0410: still in, under the new nickname.
            #expect(try await carol.iq(.get, to: "\(room)/caroline", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping")).attribute("type") == "result")
            #expect(try await carol.iq(.get, to: "\(room)/alice", payload: XMLElement(name: "ping", namespace: "urn:xmpp:ping")).attribute("type") == "error")
            // Leaving (§7.14): 110 to herself, unavailable to the others.
            try await carol.send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", "\(room)/caroline"), XMLAttribute("type", "unavailable"),
            ]))
            let gone = try await carol.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" && $0.attribute("from") == "\(room)/caroline" }
            #expect(statuses(gone) == ["110"])
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" && $0.attribute("from") == "\(room)/caroline" }
            // Not an occupant any more: the room does not take her messages.
            try await carol.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", room), XMLAttribute("type", "groupchat"), XMLAttribute("id", "late"),
            ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "too late"))]))
            #expect(try await carol.waitFor { $0.attribute("id") == "late" }.attribute("type") == "error")
            _ = carolJID
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    @Test("Rooms are created by the domain's users only; the last occupant leaving ends a temporary room; a client that goes away leaves its rooms")
    func lifecycle() async throws {
        try await withServer { server in
            let (bob, _) = try await server.loggedIn("bob@b.example")
            // b.example's user cannot create a room on a.example's service.
            try await enter(bob, "newroom@conference.a.example/bob")
            let refused = try await bob.waitFor { $0.name == "presence" }
            #expect(refused.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "not-allowed")
            // On their own domain's service, they can.
            try await create(bob, room: "club@conference.b.example", nick: "bob")
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendPresence()
            try await enter(alice, "club@conference.b.example/alice")
            _ = try await alice.waitFor { $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
            let module = try #require(server.server.context.router.modules.services["conference"])
            _ = module
            // Alice's client goes away without leaving: her session's unavailable presence
            // reaches the room (directed presence, RFC 6121 §4.6), and she is gone from it.
            await alice.close()
            let left = try await bob.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" && $0.attribute("from") == "club@conference.b.example/alice" }
            #expect(item(left)?.attribute("role") == "none")
            // The last occupant leaves: the room is gone (not listed, no disco info).
            try await bob.send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", "club@conference.b.example/bob"), XMLAttribute("type", "unavailable"),
            ]))
            _ = try await bob.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" }
            let info = try await bob.iq(.get, to: "club@conference.b.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            #expect(info.attribute("type") == "error")
            await bob.close()
        }
    }

    @Test("Over federation: a user of another provider enters a room and talks, on the providers' one link")
    func federatedOccupant() async throws {
        try await withFederation(modules: []) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            try await bob.sendPresence()
            // A first plain pair opens the link.
            try await alice.sendMessage(to: "bob@b.example", body: "hi", id: "hi")
            _ = try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "hi" }
            try await create(alice, room: "lobby@conference.a.example", nick: "alice")
            try await enter(bob, "lobby@conference.a.example/bob")
            let own = try await bob.waitFor(timeout: .seconds(10)) { $0.name == "presence" && $0.attribute("from") == "lobby@conference.a.example/bob" }
            #expect(statuses(own) == ["110"])
            _ = try await bob.waitFor(timeout: .seconds(10)) { $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
            try await bob.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", "lobby@conference.a.example"), XMLAttribute("type", "groupchat"), XMLAttribute("id", "remote"),
            ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "from afar"))]))
            #expect(try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "remote" }.attribute("from") == "lobby@conference.a.example/bob")
            #expect(try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "remote" }.body == "from afar")
            #expect(await pair.a.openLinkSnapshots.count == 1)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A persistent room outlives its last occupant and a restart, with its configuration and members; destroying it removes it for good")
    func persistentRoom() async throws {
        let server = try await TestServer.start()
        let directory = server.directory
        let room = "club@conference.a.example"
        do {
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await enter(alice, "\(room)/alice")
            _ = try await alice.waitFor { $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
            let form = XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")], children: [
                ("muc#roomconfig_persistentroom", "1"), ("muc#roomconfig_roomname", "The Club"), ("muc#roomconfig_membersonly", "1"),
            ].map { name, value in
                .element(XMLElement(name: "field", namespace: "jabber:x:data", attributes: [XMLAttribute("var", name)],
                                    children: [.element(XMLElement(name: "value", namespace: "jabber:x:data", text: value))]))
            })
            #expect(try await alice.iq(.set, to: room, payload: XMLElement(name: "query", namespace: Self.owner, children: [.element(form)])).attribute("type") == "result")
            // carol becomes a member (§10.3 via muc#admin).
            let made = try await alice.iq(.set, to: room, payload: XMLElement(name: "query", namespace: "http://jabber.org/protocol/muc#admin", children: [
                .element(XMLElement(name: "item", namespace: "http://jabber.org/protocol/muc#admin", attributes: [XMLAttribute("jid", "carol@a.example"), XMLAttribute("affiliation", "member")])),
            ]))
            #expect(made.attribute("type") == "result")
            try await alice.send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", "\(room)/alice"), XMLAttribute("type", "unavailable")]))
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" }
            await alice.close()
        } catch {
            await server.stop()
            throw error
        }
        await server.stopKeepingData()

        let again = try await TestServer.start(users: [], directory: directory)
        do {
            let (carol, _) = try await again.loggedIn("carol@a.example")
            let (bob, _) = try await again.loggedIn("bob@b.example")
            // Still there, empty, with its name and features; members only.
            let info = try await carol.iq(.get, to: room, payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let query = try #require(info.firstChild(name: "query", namespace: DiscoModule.info))
            #expect(query.firstChild(name: "identity", namespace: DiscoModule.info)?.attribute("name") == "The Club")
            let features = Set(query.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") })
            #expect(features.isSuperset(of: ["muc_persistent", "muc_membersonly"]))
            try await enter(bob, "\(room)/bob")
            let refused = try await bob.waitFor { $0.name == "presence" }
            #expect(refused.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "registration-required")
            try await enter(carol, "\(room)/carol")
            let own = try await carol.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/carol" }
            #expect(item(own)?.attribute("affiliation") == "member")
            await carol.close()
            await bob.close()
            // The owner destroys it: gone from storage too.
            let (alice, _) = try await again.loggedIn("alice@a.example")
            let destroyed = try await alice.iq(.set, to: room, payload: XMLElement(name: "query", namespace: Self.owner, children: [
                .element(XMLElement(name: "destroy", namespace: Self.owner)),
            ]))
            #expect(destroyed.attribute("type") == "result")
            try await waitUntil { try await again.context.storage.groupChatRooms().isEmpty }
            await alice.close()
        } catch {
            await again.stop()
            throw error
        }
        await again.stop()
    }


    @Test("Limits: nicknames and subjects too long, and more rooms than a service may hold, get the errors; the operator sets them (muc section)")
    func limits() async throws {
        // A refill so slow that no message is earned back during the test.
        try await withServer(configure: {
            $0.muc.maxRoomsPerService = 1; $0.muc.maxNickLength = 8; $0.muc.maxSubjectLength = 10
            $0.muc.messagesPerSecond = 0.001; $0.muc.messageBurst = 2
        }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await enter(alice, "one@conference.a.example/averylongnickname")
            let longNick = try await alice.waitFor { $0.name == "presence" }
            #expect(longNick.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "not-acceptable")
            try await create(alice, room: "one@conference.a.example", nick: "alice")
            try await enter(alice, "two@conference.a.example/alice")
            let tooMany = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == "two@conference.a.example/alice" }
            #expect(tooMany.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "resource-constraint")
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", "one@conference.a.example"), XMLAttribute("type", "groupchat"), XMLAttribute("id", "long"),
            ], children: [.element(XMLElement(name: "subject", namespace: XMLNamespace.client, text: "a subject far too long"))]))
            #expect(try await alice.waitFor { $0.attribute("id") == "long" }.attribute("type") == "error")
            // muc.messages_per_second and message_burst: two are reflected, the third is
            // refused with resource-constraint.
            for id in ["m1", "m2", "m3"] {
                try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                    XMLAttribute("to", "one@conference.a.example"), XMLAttribute("type", "groupchat"), XMLAttribute("id", id),
                ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: id))]))
            }
            for id in ["m1", "m2"] {
                #expect(try await alice.waitFor { $0.attribute("id") == id }.attribute("type") == "groupchat")
            }
            let refused = try await alice.waitFor { $0.attribute("id") == "m3" }
            #expect(refused.attribute("type") == "error")
            #expect(refused.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "resource-constraint")
            await alice.close()
        }
    }


    @Test("muc.room_creators: local lets the users of any hosted domain create rooms; a bad value stops the start; the room's disco#info carries the muc#roominfo form")
    func roomCreatorsAndRoomInfo() async throws {
        try await withServer(configure: { $0.muc.roomCreators = "local" }) { server in
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await create(bob, room: "bobs@conference.a.example", nick: "bob")
            let info = try await bob.iq(.get, to: "bobs@conference.a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let form = info.firstChild(name: "query", namespace: DiscoModule.info)?.firstChild(name: "x", namespace: "jabber:x:data")
            let fields = Dictionary((form?.children(name: "field", namespace: "jabber:x:data") ?? []).compactMap { field in
                field.attribute("var").map { ($0, field.firstChild(name: "value", namespace: "jabber:x:data")?.text ?? "") }
            }, uniquingKeysWith: { $1 })
            #expect(fields["FORM_TYPE"] == "http://jabber.org/protocol/muc#roominfo")
            #expect(fields["muc#roominfo_occupants"] == "1")
            await bob.close()
        }
        await #expect(throws: ConfigurationError.self) {
            _ = try await TestServer.start { $0.muc.roomCreators = "everybody" }
        }
    }


    @Test("A graceful shutdown tells every occupant of every room that it leaves with the server (332), before the stream closes")
    func shutdownTellsOccupants() async throws {
        let server = try await TestServer.start()
        do {
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await create(alice, room: "talk@conference.a.example", nick: "alice")
            try await enter(bob, "talk@conference.a.example/bob")
            _ = try await bob.waitFor { $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
            let stopping = Task { await server.stop() }
            for (client, nick) in [(alice, "alice"), (bob, "bob")] {
                let gone = try await client.waitFor { $0.name == "presence" && $0.attribute("from") == "talk@conference.a.example/\(nick)" && $0.attribute("type") == "unavailable" }
                #expect(statuses(gone) == ["332", "110"])
            }
            await stopping.value
        } catch {
            await server.stop()
            throw error
        }
    }
}

extension MUCTests {
    @Test("The room's archive (XEP-0313 on the room): groupchat messages carry the room's stanza-id, are paged by anyone who may enter, not by others; a temporary room's archive goes with it; logging can be turned off")
    func roomArchive() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await create(alice, room: "log@conference.a.example", nick: "alice")
            try await enter(bob, "log@conference.a.example/bob")
            _ = try await bob.waitFor { $0.firstChild(name: "subject", namespace: XMLNamespace.client) != nil }
            var ids: [String] = []
            for index in 1...3 {
                try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                    XMLAttribute("to", "log@conference.a.example"), XMLAttribute("type", "groupchat"), XMLAttribute("id", "g\(index)"),
                ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "line \(index)"))]))
                let got = try await bob.waitFor { $0.attribute("id") == "g\(index)" }
                let id = try #require(MAMTests.stanzaID(got, by: "log@conference.a.example"))
                ids.append(id)
            }
            let page = try await MAMTests.run(bob, MAMTests.query(), to: "log@conference.a.example")
            #expect(page.error == nil)
            #expect(page.bodies == ["line 1", "line 2", "line 3"] && page.ids == ids && page.complete)
            let last = try await MAMTests.run(bob, MAMTests.query(max: 2, before: ""), to: "log@conference.a.example")
            #expect(last.bodies == ["line 2", "line 3"] && !last.complete)
            // The room's disco says it is archived.
            let info = try await bob.iq(.get, to: "log@conference.a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let features = info.firstChild(name: "query", namespace: DiscoModule.info)?.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") } ?? []
            #expect(features.contains(MAMModule.namespace))
            // Members only now: carol, no member, may not read it.
            let form = XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")], children: [
                .element(XMLElement(name: "field", namespace: "jabber:x:data", attributes: [XMLAttribute("var", "muc#roomconfig_membersonly")],
                                    children: [.element(XMLElement(name: "value", namespace: "jabber:x:data", text: "1"))])),
            ])
            _ = try await alice.iq(.set, to: "log@conference.a.example", payload: XMLElement(name: "query", namespace: Self.owner, children: [.element(form)]))
            let (carol, _) = try await server.loggedIn("carol@a.example")
            #expect(try await MAMTests.run(carol, MAMTests.query(), to: "log@conference.a.example").error == "item-not-found")
            // Everyone leaves: a temporary room and its archive are gone.
            for (client, nick) in [(alice, "alice"), (bob, "bob")] {
                try await client.send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [
                    XMLAttribute("to", "log@conference.a.example/\(nick)"), XMLAttribute("type", "unavailable"),
                ]))
                _ = try await client.waitFor { $0.name == "presence" && $0.attribute("type") == "unavailable" && $0.attribute("from") == "log@conference.a.example/\(nick)" }
            }
            try await waitUntil(timeout: .seconds(10), "the archive removed") {
                try await server.context.storage.archivedRoomMessages(ArchiveQuery(limit: 1), room: try JID("log@conference.a.example")).count == 0
            }
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }
}
