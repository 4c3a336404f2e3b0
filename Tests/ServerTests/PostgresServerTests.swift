import Foundation
import NIOPosix
import Testing
import TestSupport
import XMPPCore
import XMPPStream
import Storage
@testable import Server

/// The server on PostgreSQL (issue 12): what a client does, a domain added by another
/// process, and a database restarted under a running server.
@Suite("Braid on PostgreSQL", .serialized, .postgresServer)
struct PostgresServerTests {
    func withPostgresServer(operationTimeout: Int = 10, _ body: (TestServer, String) async throws -> Void) async throws {
        let url = try await #require(PostgresTestServer.current).createDatabase()
        try await withServer(configure: {
            $0.storage.backend = .postgresql
            $0.storage.url = url
            $0.storage.operationTimeoutSeconds = operationTimeout
        }) { server in
            try await body(server, url)
        }
    }

    @Test("Logins, rosters and offline messages work as on SQLite")
    func clientsUseIt() async throws {
        try await withPostgresServer { server, _ in
            #expect(server.context.storage is PostgresStorage)
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let set = try await alice.iq(.set, payload: XMLElement(name: "query", namespace: "jabber:iq:roster", children: [
                .element(XMLElement(name: "item", namespace: "jabber:iq:roster", attributes: [XMLAttribute("jid", "bob@b.example"), XMLAttribute("name", "Bob")])),
            ]))
            #expect(set.attribute("type") == "result")
            // Bob is offline: stored, then delivered at his presence.
            try await alice.sendMessage(to: "bob@b.example", body: "while you were out", id: "off")
            try await waitUntil { try await server.context.storage.offlineMessageCount(for: try JID("bob@b.example")) == 1 }
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            let delivered = try await bob.waitFor { $0.attribute("id") == "off" }
            #expect(delivered.body == "while you were out")
            let roster = try await server.context.storage.roster(of: try JID("alice@a.example"))
            #expect(roster.items.map(\.name) == ["Bob"])
            await alice.close()
            await bob.close()
        }
    }

    @Test("A domain added from another process is served without polling (NOTIFY)")
    func domainFromAnotherProcess() async throws {
        try await withPostgresServer { server, url in
            let other = try PostgresStorage(settings: try PostgresConnectionSettings(url: url), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
            try await other.prepare()
            #expect(try await other.addDomain("c.example"))
            try await waitUntil(timeout: .seconds(5)) { server.context.domains.isHosted("c.example") }
            #expect(try await other.removeDomain("c.example"))
            try await waitUntil(timeout: .seconds(5)) { !server.context.domains.isHosted("c.example") }
            await other.close()
        }
    }

    @Test("The database restarted under a running server: clients get internal-server-error meanwhile, the server stays up and reconnects")
    func databaseRestart() async throws {
        try await withPostgresServer(operationTimeout: 2) { server, _ in
            let database = try #require(PostgresTestServer.current)
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.roundTrip()
            await database.stopServer()
            let failed = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
            #expect(failed.attribute("type") == "error")
            #expect(failed.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(namespace: XMLNamespace.stanzaErrors)?.name == "internal-server-error")
            try await database.restart()
            // Same session, same server: it answers again once the pool has reconnected.
            try await waitUntil(timeout: .seconds(20), "roster answered again") {
                let reply = try await alice.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
                return reply.attribute("type") == "result"
            }
            await alice.close()
        }
    }
}
