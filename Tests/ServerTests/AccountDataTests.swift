import Foundation
import Storage
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// What an account keeps on its server besides its roster: private XML (XEP-0049), its vCard
/// (XEP-0054), and its password, changed in-band (XEP-0077, with registration off), through
/// real client streams.
@Suite("Account data: private XML, vCards, password change")
struct AccountDataTests {
    static let privateNS = PrivateStorageModule.namespace
    static let vcardNS = VCardModule.namespace
    static let registerNS = PasswordChangeModule.namespace
    static let prefsNS = "urn:braid:test:prefs"

    /// `<query xmlns='jabber:iq:private'>` holding `fragments`.
    func privateQuery(_ fragments: XMLElement...) -> XMLElement {
        XMLElement(name: "query", namespace: Self.privateNS, children: fragments.map { .element($0) })
    }

    func prefs(nick: String?) -> XMLElement {
        XMLElement(name: "prefs", namespace: Self.prefsNS, children: nick.map { [.element(XMLElement(name: "nick", namespace: Self.prefsNS, text: $0))] } ?? [])
    }

    func bookmarks(_ rooms: [String]) -> XMLElement {
        XMLElement(name: "storage", namespace: "storage:bookmarks", children: rooms.map { room in
            .element(XMLElement(name: "conference", namespace: "storage:bookmarks", attributes: [XMLAttribute("jid", room), XMLAttribute("autojoin", "true")]))
        })
    }

    func vCard(name: String, photo: [UInt8]? = nil) -> XMLElement {
        var children: [XMLNode] = [.element(XMLElement(name: "FN", namespace: Self.vcardNS, text: name))]
        if let photo {
            children.append(.element(XMLElement(name: "PHOTO", namespace: Self.vcardNS, children: [
                .element(XMLElement(name: "TYPE", namespace: Self.vcardNS, text: "image/png")),
                .element(XMLElement(name: "BINVAL", namespace: Self.vcardNS, text: Base64.encode(photo))),
            ])))
        }
        return XMLElement(name: "vCard", namespace: Self.vcardNS, children: children)
    }

    func registerQuery(_ children: [(String, String)]) -> XMLElement {
        XMLElement(name: "query", namespace: Self.registerNS, children: children.map { name, text in
            .element(XMLElement(name: name, namespace: Self.registerNS, text: text))
        })
    }

    /// The defined condition of an error reply (nil for a result).
    func condition(_ reply: XMLElement) -> String? {
        guard reply.attribute("type") == "error" else { return nil }
        return reply.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name
    }

    /// The one fragment of a private XML result.
    func fragment(_ reply: XMLElement) -> XMLElement? {
        reply.firstChild(name: "query", namespace: Self.privateNS)?.firstElement
    }

    func login(_ server: TestServer, _ user: String, password: String) async throws -> TestClient {
        let jid = try JID(user)
        let client = try await server.client()
        do {
            try await client.login(domain: jid.domainpart, username: jid.localpart ?? "", password: password)
        } catch {
            await client.close()
            throw error
        }
        return client
    }

    // MARK: Private XML storage (XEP-0049)

    @Test("Private XML: a fragment set is got back as stored, one key per (name, namespace); an empty one clears it; unknown keys answer empty")
    func privateRoundTrip() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            // §2.3: one set may carry several fragments.
            let stored = try await alice.iq(.set, payload: privateQuery(prefs(nick: "Alice ✓"), bookmarks(["tea@conference.a.example"])))
            #expect(stored.attribute("type") == "result")
            #expect(stored.firstElement == nil)

            let got = try await alice.iq(.get, payload: privateQuery(prefs(nick: nil)))
            #expect(fragment(got) == prefs(nick: "Alice ✓"))
            let marks = try await alice.iq(.get, payload: privateQuery(XMLElement(name: "storage", namespace: "storage:bookmarks")))
            #expect(fragment(marks) == bookmarks(["tea@conference.a.example"]))
            // Same namespace, other name: another key, nothing stored there.
            let other = try await alice.iq(.get, payload: privateQuery(XMLElement(name: "other", namespace: Self.prefsNS)))
            #expect(other.attribute("type") == "result")
            #expect(fragment(other) == XMLElement(name: "other", namespace: Self.prefsNS))

            // Replacing, then clearing with an empty fragment.
            #expect(try await alice.iq(.set, payload: privateQuery(prefs(nick: "A."))).attribute("type") == "result")
            #expect(fragment(try await alice.iq(.get, payload: privateQuery(prefs(nick: nil)))) == prefs(nick: "A."))
            #expect(try await alice.iq(.set, payload: privateQuery(prefs(nick: nil))).attribute("type") == "result")
            #expect(fragment(try await alice.iq(.get, payload: privateQuery(prefs(nick: nil)))) == prefs(nick: nil))
            #expect(try await server.context.storage.storeEntries("private", of: JID("alice@a.example")).map(\.key) == ["{storage:bookmarks}storage"])

            // Addressed to her own bare JID, it is the same store.
            let own = try await alice.iq(.get, to: "alice@a.example", payload: privateQuery(XMLElement(name: "storage", namespace: "storage:bookmarks")))
            #expect(fragment(own) == bookmarks(["tea@conference.a.example"]))
            await alice.close()
        }
    }

    @Test("Private XML: no fragment, two in a get, a reserved namespace, an oversized fragment and too many fragments are refused, and nothing is stored")
    func privateErrors() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(condition(try await alice.iq(.get, payload: privateQuery())) == "not-acceptable")
            #expect(condition(try await alice.iq(.set, payload: privateQuery())) == "not-acceptable")
            #expect(condition(try await alice.iq(.get, payload: privateQuery(prefs(nick: nil), bookmarks([])))) == "bad-request")
            for reserved in ["jabber:iq:roster", "http://jabber.org/protocol/muc", "vcard-temp"] {
                let reply = try await alice.iq(.set, payload: privateQuery(XMLElement(name: "x", namespace: reserved, text: "hidden")))
                #expect(condition(reply) == "not-acceptable", "\(reserved)")
            }
            // One good and one reserved fragment: neither is stored.
            let mixed = try await alice.iq(.set, payload: privateQuery(prefs(nick: "kept?"), XMLElement(name: "query", namespace: "jabber:iq:private", text: "x")))
            #expect(condition(mixed) == "not-acceptable")
            let big = XMLElement(name: "blob", namespace: Self.prefsNS, text: String(repeating: "x", count: PrivateStorageModule.maximumFragmentBytes))
            #expect(condition(try await alice.iq(.set, payload: privateQuery(big))) == "not-acceptable")
            #expect(try await server.context.storage.storeEntries("private", of: JID("alice@a.example")).isEmpty)

            // The per-account limit: as many as allowed, then one more is refused.
            let many = (0..<PrivateStorageModule.maximumFragments).map { XMLElement(name: "item\($0)", namespace: Self.prefsNS, text: "\($0)") }
            // One durable write per fragment: seconds on a loaded machine.
            let filled = try await alice.iq(.set, timeout: .seconds(60), payload: XMLElement(name: "query", namespace: Self.privateNS, children: many.map { .element($0) }))
            #expect(filled.attribute("type") == "result")
            let overflow = try await alice.iq(.set, payload: privateQuery(XMLElement(name: "one-more", namespace: Self.prefsNS, text: "!")))
            #expect(condition(overflow) == "resource-constraint")
            // Replacing a fragment at the limit still works.
            #expect(try await alice.iq(.set, payload: privateQuery(XMLElement(name: "item0", namespace: Self.prefsNS, text: "new"))).attribute("type") == "result")
            #expect(try await server.context.storage.storeEntries("private", of: JID("alice@a.example")).count == PrivateStorageModule.maximumFragments)
            await alice.close()
        }
    }

    @Test("Private XML: another user may neither read nor write it (forbidden, the same for an account that does not exist)")
    func privateForbiddenToOthers() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await alice.iq(.set, payload: privateQuery(prefs(nick: "Alice"))).attribute("type") == "result")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            for (client, target) in [(bob, "alice@a.example"), (carol, "alice@a.example"), (carol, "nobody@a.example")] {
                let read = try await client.iq(.get, to: target, payload: privateQuery(prefs(nick: nil)))
                #expect(condition(read) == "forbidden", "get \(target)")
                #expect(fragment(read) == nil, "nothing of alice's in the error")
                let write = try await client.iq(.set, to: target, payload: privateQuery(prefs(nick: "Mallory")))
                #expect(condition(write) == "forbidden", "set \(target)")
            }
            #expect(fragment(try await alice.iq(.get, payload: privateQuery(prefs(nick: nil)))) == prefs(nick: "Alice"))
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    @Test("Private XML survives a restart on the same data")
    func privateSurvivesRestart() async throws {
        let server = try await TestServer.start()
        let directory = server.directory
        do {
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await alice.iq(.set, payload: privateQuery(bookmarks(["club@conference.a.example"]))).attribute("type") == "result")
            await alice.close()
        } catch {
            await server.stop()
            throw error
        }
        await server.stopKeepingData()

        let again = try await TestServer.start(users: [], directory: directory)
        do {
            let (alice, _) = try await again.loggedIn("alice@a.example")
            let got = try await alice.iq(.get, payload: privateQuery(XMLElement(name: "storage", namespace: "storage:bookmarks")))
            #expect(fragment(got) == bookmarks(["club@conference.a.example"]))
            await alice.close()
        } catch {
            await again.stop()
            throw error
        }
        await again.stop()
    }

    // MARK: vcard-temp (XEP-0054)

    @Test("vCard: the owner sets it and reads it back; another user reads it at the bare JID; an empty one removes it")
    func vCardSetAndGet() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let card = vCard(name: "Alice Liddell ✓", photo: Array(repeating: 0x89, count: 2048))
            let set = try await alice.iq(.set, payload: card)
            #expect(set.attribute("type") == "result")
            #expect(set.firstElement == nil)
            // §3.1: no 'to' is her own.
            let own = try await alice.iq(.get, payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(own.firstChild(name: "vCard", namespace: Self.vcardNS) == card)
            // §3.3: anyone, here on another domain, at her bare JID.
            let (bob, _) = try await server.loggedIn("bob@b.example")
            let theirs = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(theirs.attribute("type") == "result")
            #expect(theirs.attribute("from") == "alice@a.example")
            #expect(theirs.firstChild(name: "vCard", namespace: Self.vcardNS) == card)
            // A new one replaces it.
            let renamed = vCard(name: "Alice")
            #expect(try await alice.iq(.set, payload: renamed).attribute("type") == "result")
            let again = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(again.firstChild(name: "vCard", namespace: Self.vcardNS) == renamed)
            // Emptied: as if she never had one.
            #expect(try await alice.iq(.set, payload: XMLElement(name: "vCard", namespace: Self.vcardNS)).attribute("type") == "result")
            #expect(condition(try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))) == "item-not-found")
            #expect(try await server.context.storage.storeEntries("vcard", of: JID("alice@a.example")).isEmpty)
            // Servers that keep vCards say so (§8).
            let info = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let features = Set(info.firstChild(name: "query", namespace: DiscoModule.info)?.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") } ?? [])
            #expect(features.isSuperset(of: [Self.vcardNS, Self.registerNS]))
            await alice.close()
            await bob.close()
        }
    }

    @Test("vCard: an account without one and an account that does not exist answer alike, to the owner too")
    func vCardMissingAnswersAlike() async throws {
        try await withServer { server in
            let (bob, _) = try await server.loggedIn("bob@b.example")
            var errors: [XMLElement] = []
            for target in ["carol@a.example", "nobody@a.example"] {
                let reply = try await bob.iq(.get, to: target, id: "same", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
                #expect(reply.attribute("type") == "error")
                #expect(reply.attribute("from") == target)
                errors.append(try #require(reply.firstChild(name: "error", namespace: XMLNamespace.client)))
                // Nothing but the error: no payload that could differ.
                #expect(Array(reply.elements).count == 1)
            }
            #expect(errors.count == 2 && errors[0] == errors[1])
            #expect(errors.first?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "item-not-found")
            // Her own, none yet: the same item-not-found (§3.1).
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let own = try await carol.iq(.get, payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(own.firstChild(name: "error", namespace: XMLNamespace.client) == errors.first)
            await bob.close()
            await carol.close()
        }
    }

    @Test("vCard: only the owner sets it (forbidden for others, existing account or not); an oversized one is refused")
    func vCardSetByOthersForbidden() async throws {
        try await withServer(configure: { $0.c2s.maxStanzaBytes = 1 << 20 }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let card = vCard(name: "Alice")
            #expect(try await alice.iq(.set, payload: card).attribute("type") == "result")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            for (client, target) in [(bob, "alice@a.example"), (carol, "alice@a.example"), (bob, "nobody@a.example")] {
                let reply = try await client.iq(.set, to: target, payload: vCard(name: "Mallory"))
                #expect(condition(reply) == "forbidden", "\(target)")
            }
            #expect(try await server.context.storage.storeEntries("vcard", of: JID("nobody@a.example")).isEmpty)
            // Larger than the limit (a photo of 200 KiB is 267 KiB in base64): refused, the old one kept.
            let huge = vCard(name: "Alice", photo: Array(repeating: 7, count: 200 * 1024))
            #expect(condition(try await alice.iq(.set, payload: huge)) == "not-acceptable")
            let kept = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(kept.firstChild(name: "vCard", namespace: Self.vcardNS) == card)
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    // MARK: Password change (XEP-0077 §3.3)

    @Test("Password change: the new password logs in (SCRAM-SHA-256, SCRAM-SHA-1, PLAIN) and the old one no longer does")
    func passwordChange() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            // §3.1: a registered user's get shows <registered/> and the username, never a password.
            let form = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: Self.registerNS))
            let query = try #require(form.firstChild(name: "query", namespace: Self.registerNS))
            #expect(query.firstChild(name: "registered", namespace: Self.registerNS) != nil)
            #expect(query.firstChild(name: "username", namespace: Self.registerNS)?.text == "alice")
            #expect(query.firstChild(name: "password", namespace: Self.registerNS)?.text == "")

            let newPassword = "Nouveau-mot-de-passe ✓ ß"
            let changed = try await alice.iq(.set, payload: registerQuery([("username", "alice"), ("password", newPassword)]))
            #expect(changed.attribute("type") == "result")
            await alice.close()

            await #expect(throws: TestClient.SASLFailed(condition: "not-authorized")) {
                let client = try await login(server, "alice@a.example", password: TestServer.password)
                await client.close()
            }
            for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] {
                let client = try await server.client()
                var options = TestClient.LoginOptions()
                options.mechanism = mechanism
                let bound = try await client.login(domain: "a.example", username: "alice", password: newPassword, options: options)
                #expect(bound.bare == (try JID("alice@a.example")), "\(mechanism)")
                await client.close()
            }

            // Conversations and Gajim send it to the domain, with the bare JID as username
            // in some forms: the same change.
            let again = try await login(server, "alice@a.example", password: newPassword)
            let third = "third password"
            let toDomain = try await again.iq(.set, to: "a.example", payload: registerQuery([("username", "alice@a.example"), ("password", third)]))
            #expect(toDomain.attribute("type") == "result")
            await again.close()
            let last = try await login(server, "alice@a.example", password: third)
            await last.close()
            // Other accounts are untouched.
            let (carol, _) = try await server.loggedIn("carol@a.example")
            await carol.close()
        }
    }

    @Test("Password change: an empty or unusable password, a missing username, or a data form change nothing; the error does not echo the request")
    func passwordChangeRefusals() async throws {
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let attempts: [(XMLElement, String)] = [
                (registerQuery([("username", "alice"), ("password", "")]), "bad-request"),
                (registerQuery([("password", "no username")]), "bad-request"),
                (registerQuery([("username", "alice")]), "bad-request"),
                (registerQuery([("username", "alice"), ("password", "unassigned \u{0378}")]), "not-acceptable"),
                (XMLElement(name: "query", namespace: Self.registerNS, children: [
                    .element(XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")])),
                ]), "bad-request"),
            ]
            for (payload, expected) in attempts {
                let reply = try await alice.iq(.set, payload: payload)
                #expect(condition(reply) == expected, "\(payload)")
                #expect(reply.firstChild(name: "query", namespace: Self.registerNS) == nil)
            }
            await alice.close()
            // The old password still works.
            let (again, _) = try await server.loggedIn("alice@a.example")
            await again.close()
        }
    }

    // MARK: Registration stays off

    @Test("In-band registration is off: not offered, refused before login, and an authenticated user can neither register nor remove accounts")
    func registrationRefused() async throws {
        try await withServer { server in
            // Before authentication: no iq-register stream feature, and a registration
            // attempt is a stanza before negotiation (RFC 6120 §6.4.1).
            let anonymous = try await server.client()
            try await anonymous.sendHeader(to: "a.example")
            _ = try await anonymous.nextElement()
            try await anonymous.startTLS()
            try await anonymous.sendHeader(to: "a.example")
            let features = try await anonymous.nextElement()
            #expect(features.firstChild(name: "register", namespace: "http://jabber.org/features/iq-register") == nil)
            try await anonymous.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "set"), XMLAttribute("id", "reg1")], children: [
                .element(registerQuery([("username", "mallory"), ("password", "secret")])),
            ]))
            #expect(try await anonymous.streamErrorCondition() == .notAuthorized)
            await anonymous.close()

            let (alice, _) = try await server.loggedIn("alice@a.example")
            // Another name on her own domain, with or without 'to': registration.
            #expect(condition(try await alice.iq(.set, payload: registerQuery([("username", "mallory"), ("password", "secret")]))) == "not-allowed")
            #expect(condition(try await alice.iq(.set, to: "a.example", payload: registerQuery([("username", "mallory"), ("password", "secret")]))) == "not-allowed")
            // Another hosted domain: she is not registered there, and nobody registers (§3.1).
            #expect(condition(try await alice.iq(.get, to: "b.example", payload: XMLElement(name: "query", namespace: Self.registerNS))) == "service-unavailable")
            #expect(condition(try await alice.iq(.set, to: "b.example", payload: registerQuery([("username", "alice"), ("password", "secret")]))) == "service-unavailable")
            // With another account, nothing to register either.
            #expect(condition(try await alice.iq(.set, to: "carol@a.example", payload: registerQuery([("username", "carol"), ("password", "secret")]))) == "service-unavailable")
            let storage = server.context.storage
            #expect(try await storage.userExists(JID("mallory@a.example")) == false)
            #expect(try await storage.userExists(JID("alice@b.example")) == false)

            // §3.2: removal is not offered in-band; <remove/> with anything else is malformed.
            #expect(condition(try await alice.iq(.set, payload: XMLElement(name: "query", namespace: Self.registerNS, children: [
                .element(XMLElement(name: "remove", namespace: Self.registerNS)),
            ]))) == "not-allowed")
            #expect(condition(try await alice.iq(.set, payload: XMLElement(name: "query", namespace: Self.registerNS, children: [
                .element(XMLElement(name: "remove", namespace: Self.registerNS)),
                .element(XMLElement(name: "username", namespace: Self.registerNS, text: "alice")),
            ]))) == "bad-request")
            #expect(try await storage.userExists(JID("alice@a.example")))
            // Carol's password is unchanged by anything alice sent.
            let (carol, _) = try await server.loggedIn("carol@a.example")
            await carol.close()
            await alice.close()
        }
    }
}
