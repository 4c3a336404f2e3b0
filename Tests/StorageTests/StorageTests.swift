import Foundation
import Testing
import NIOPosix
import Synchronization
import TestSupport
import Trust
import XMPPCore
@testable import Storage

// MARK: Fixtures

/// A fresh directory under the system temporary directory, removed when `body` returns.
private func withTemporaryDirectory<T>(_ body: (URL) async throws -> T) async throws -> T {
    let directory = FileManager.default.temporaryDirectory
        .appendingPathComponent("braid-storage-tests-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    return try await body(directory)
}

private func databasePath(in directory: URL) -> String {
    directory.appendingPathComponent("braid.sqlite").path
}

/// Opens a database with a logger that stays quiet unless something is wrong.
private func openStorage(_ path: String) throws -> SQLiteStorage {
    try SQLiteStorage(quietlyAt: path)
}

/// A new SQLite database in a temporary directory, with `example.com` hosted (for the tests
/// that reach into SQLite itself).
private func withSQLiteStorage(_ body: (SQLiteStorage) async throws -> Void) async throws {
    try await withTemporaryDirectory { directory in
        let storage = try openStorage(databasePath(in: directory))
        #expect(try await storage.addDomain("example.com"))
        try await body(storage)
    }
}

private func jid(_ string: String) throws -> JID {
    try JID(string)
}

/// Distinct, recognisable credentials for each seed.
private func credentials(_ seed: UInt8) -> StoredCredentials {
    StoredCredentials(
        sha1: ScramCredentials(salt: [seed, 1, 2, 3], iterations: 4096 + Int(seed), storedKey: Array(repeating: seed, count: 20), serverKey: Array(repeating: seed &+ 1, count: 20)),
        sha256: ScramCredentials(salt: [seed, 0, 0xFF, 9, 8], iterations: 10_000 + Int(seed), storedKey: Array(repeating: seed &+ 2, count: 32), serverKey: Array(repeating: seed &+ 3, count: 32)))
}

private func nowMilliseconds() -> Int64 {
    Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
}

private func nowSeconds() -> Int64 {
    Int64(Date().timeIntervalSince1970.rounded(.down))
}

// MARK: Opening

@Suite("SQLiteStorage: opening")
struct SQLiteStorageOpeningTests {
    @Test func missingDirectoryIsAClearError() async throws {
        try await withTemporaryDirectory { directory in
            let missing = directory.appendingPathComponent("no-such-dir")
            let path = missing.appendingPathComponent("braid.sqlite").path
            #expect(throws: SQLiteStorageError.directoryNotFound(missing.path)) {
                try openStorage(path)
            }
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }

    @Test func createsFileWithDurableSettings() async throws {
        try await withTemporaryDirectory { directory in
            let path = databasePath(in: directory)
            let storage = try openStorage(path)
            #expect(FileManager.default.fileExists(atPath: path))
            #expect(storage.path == path)
            let settings = try await storage.writerConnectionSettings()
            #expect(settings == .init(journalMode: "wal", synchronous: 2, foreignKeys: true, busyTimeoutMilliseconds: 5000))
        }
    }

    @Test func reopeningKeepsSchemaAndData() async throws {
        try await withTemporaryDirectory { directory in
            let path = databasePath(in: directory)
            do {
                let first = try openStorage(path)
                #expect(try await first.addDomain("example.com"))
            }
            // Migrations already applied must not run again (they would fail on CREATE TABLE).
            let second = try openStorage(path)
            #expect(try await second.domains().map(\.name) == ["example.com"])
            #expect(try await second.domainsGeneration() == 1)
        }
    }

    @Test func concurrentFirstOpensOfOneFile() async throws {
        try await withTemporaryDirectory { directory in
            let path = databasePath(in: directory)
            // Server and CLI may both be the first to open a new file.
            let opened = try await withThrowingTaskGroup(of: SQLiteStorage.self) { group in
                for _ in 0..<4 {
                    group.addTask { try openStorage(path) }
                }
                return try await group.reduce(into: [SQLiteStorage]()) { $0.append($1) }
            }
            #expect(opened.count == 4)
            #expect(try await opened[0].addDomain("example.com"))
            for storage in opened {
                #expect(try await storage.domains().map(\.name) == ["example.com"])
                #expect(try await storage.domainsGeneration() == 1)
            }
        }
    }

    @Test func refusesDatabaseFromNewerVersion() async throws {
        try await withTemporaryDirectory { directory in
            let path = databasePath(in: directory)
            do {
                let storage = try openStorage(path)
                #expect(try await storage.executeRawSQLForTesting("INSERT INTO grdb_migrations (identifier) VALUES ('v99')") == 1)
            }
            #expect(throws: SQLiteStorageError.schemaTooNew(applied: ["v1", "v2", "v3", "v4", "v5", "v6", "v7", "v99"])) {
                try openStorage(path)
            }
        }
    }
}

// MARK: Behaviour, on both backends

/// The storage protocol's behaviour, each test on SQLite and on PostgreSQL (one server for
/// the whole suite, a new database per test).
@Suite("Storage behaviour, on SQLite and PostgreSQL", .postgresServer)
struct StorageBehaviourTests {}

// MARK: Domains

extension StorageBehaviourTests {
@Suite("domains")
struct DomainTests {
    @Test(arguments: Backend.allCases) func addListRemoveAndGeneration(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.domains() == [])
            #expect(try await storage.domainsGeneration() == 0)

            let before = nowSeconds()
            #expect(try await storage.addDomain("example.org"))
            #expect(try await storage.domainsGeneration() == 1)
            #expect(try await storage.addDomain("example.com"))
            #expect(try await storage.domainsGeneration() == 2)
            let after = nowSeconds()

            // A duplicate changes nothing, not even the generation.
            #expect(try await storage.addDomain("example.com") == false)
            #expect(try await storage.domainsGeneration() == 2)

            let domains = try await storage.domains()
            #expect(domains.map(\.name) == ["example.com", "example.org"])
            for domain in domains {
                #expect(domain.addedAt >= before && domain.addedAt <= after)
            }

            #expect(try await storage.removeDomain("example.org"))
            #expect(try await storage.domainsGeneration() == 3)
            #expect(try await storage.removeDomain("example.org") == false)
            #expect(try await storage.removeDomain("not a domain!") == false)
            #expect(try await storage.domainsGeneration() == 3)
            #expect(try await storage.domains().map(\.name) == ["example.com"])
        }
    }

    @Test(arguments: Backend.allCases) func addDomainsInOneTransaction(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.addDomain("b.example"))
            let names = (0..<1000).map { "customer\($0).example" } + ["B.EXAMPLE"]
            #expect(try await storage.addDomains(names) == 1000)
            // One generation step for the whole batch.
            #expect(try await storage.domainsGeneration() == 2)
            #expect(try await storage.domains().count == 1001)
            // A bad name anywhere adds nothing.
            await #expect(throws: (any Error).self) { try await storage.addDomains(["fine.example", "not a domain!"]) }
            #expect(try await storage.domains().contains { $0.name == "fine.example" } == false)
            #expect(try await storage.addDomains([]) == 0)
            #expect(try await storage.domainsGeneration() == 2)
        }
    }

    @Test(arguments: Backend.allCases) func domainNamesAreCanonicalised(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.addDomain("Example.COM."))
            #expect(try await storage.addDomain("example.com") == false)
            // An A-label is stored as its U-label, as JIDs carry it.
            #expect(try await storage.addDomain("xn--bcher-kva.example"))
            #expect(try await storage.domains().map(\.name) == ["bücher.example", "example.com"])
            try await storage.createUser(jid("Anna@BÜCHER.example"), credentials: credentials(1))
            #expect(try await storage.users(in: "XN--BCHER-KVA.EXAMPLE") == [jid("anna@bücher.example")])
            #expect(try await storage.removeDomain("EXAMPLE.com"))
            #expect(try await storage.domains().map(\.name) == ["bücher.example"])
        }
    }

    @Test(arguments: Backend.allCases) func invalidDomainNameIsRejected(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            await #expect(throws: JIDError.self) { try await storage.addDomain("bad domain") }
            #expect(try await storage.domains() == [])
            #expect(try await storage.domainsGeneration() == 0)
        }
    }

    @Test("A domain added by another instance is announced: SQLite by polling, PostgreSQL by NOTIFY alone", arguments: Backend.allCases)
    func domainChangesAreAnnounced(_ backend: Backend) async throws {
        try await withTwoInstances(backend) { (server: any Storage, cli: any Storage) async throws in
            // SQLite: the poll interval a server uses. PostgreSQL: so long that only a
            // notification can announce anything within the test.
            let interval: Duration = backend == .sqlite ? .milliseconds(50) : .seconds(3600)
            let changes = server.domainChanges(pollInterval: interval)
            let seen = Counter()
            let reader = Task {
                for await _ in changes { seen.increment() }
            }
            defer { reader.cancel() }
            // One element at once (and, on PostgreSQL, one once listening).
            try await waitUntil("first element") { seen.value >= (backend == .sqlite ? 1 : 2) }
            try await Task.sleep(for: .milliseconds(150))
            for round in 0..<3 {
                let before = seen.value
                #expect(try await cli.addDomain("live\(round).example"))
                // Latency is measured in bench/; here, that the change is told at all.
                try await waitUntil(timeout: .seconds(5), "announced") { seen.value > before }
            }
        }
    }

    @Test(arguments: Backend.allCases) func generationIsVisibleAcrossInstances(_ backend: Backend) async throws {
        // Two instances on one store behave like the server and the CLI process.
        try await withTwoInstances(backend) { (server: any Storage, cli: any Storage) async throws in
            #expect(try await server.domainsGeneration() == 0)

            #expect(try await cli.addDomain("example.net"))
            #expect(try await server.domainsGeneration() == 1)
            #expect(try await server.domains().map(\.name) == ["example.net"])

            #expect(try await cli.addDomain("example.org"))
            #expect(try await server.domainsGeneration() == 2)

            #expect(try await server.removeDomain("example.net"))
            #expect(try await cli.domainsGeneration() == 3)
            #expect(try await cli.domains().map(\.name) == ["example.org"])
            #expect(try await cli.addDomain("example.org") == false)
            #expect(try await server.domainsGeneration() == 3)
        }
    }

    @Test(arguments: Backend.allCases) func removeDomainCascadesToItsUsers(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.addDomain("example.org"))
            let alice = try jid("alice@example.com")
            let bob = try jid("bob@example.com")
            let carol = try jid("carol@example.org")
            for (user, seed) in [(alice, UInt8(1)), (bob, 2), (carol, 3)] {
                try await storage.createUser(user, credentials: credentials(seed))
                try await storage.putRosterItem(RosterItem(jid: jid("friend@elsewhere.example"), subscription: .both), of: user)
                #expect(try await storage.storeOfflineMessage(for: user, stanza: "<message/>", limit: 10))
                try await storage.putSubscriptionRequest(of: user, from: jid("stranger@elsewhere.example"), stanza: "<presence type='subscribe'/>")
            }

            #expect(try await storage.removeDomain("example.com"))

            #expect(try await storage.users(in: "example.com") == [])
            for user in [alice, bob] {
                #expect(try await storage.userExists(user) == false)
                #expect(try await storage.credentials(for: user) == nil)
                #expect(try await storage.roster(of: user) == Roster(version: 0, items: []))
                #expect(try await storage.offlineMessageCount(for: user) == 0)
                #expect(try await storage.subscriptionRequests(of: user) == [])
            }
            // The other domain is untouched.
            #expect(try await storage.users(in: "example.org") == [carol])
            #expect(try await storage.credentials(for: carol) == credentials(3))
            #expect(try await storage.roster(of: carol).items.count == 1)
            #expect(try await storage.offlineMessageCount(for: carol) == 1)
            #expect(try await storage.subscriptionRequests(of: carol).count == 1)

            // Hosting the domain again does not bring anything back.
            #expect(try await storage.addDomain("example.com"))
            #expect(try await storage.users(in: "example.com") == [])
            try await storage.createUser(alice, credentials: credentials(9))
            #expect(try await storage.roster(of: alice) == Roster(version: 0, items: []))
            #expect(try await storage.offlineMessageCount(for: alice) == 0)
            #expect(try await storage.subscriptionRequests(of: alice) == [])
        }
    }
}
}

// MARK: Accounts

extension StorageBehaviourTests {
@Suite("accounts")
struct AccountTests {
    @Test(arguments: Backend.allCases) func createAndReadBackCredentials(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            #expect(try await storage.userExists(alice) == false)
            #expect(try await storage.credentials(for: alice) == nil)

            try await storage.createUser(alice, credentials: credentials(7))
            #expect(try await storage.userExists(alice))
            let stored = try #require(try await storage.credentials(for: alice))
            #expect(stored == credentials(7))
            #expect(stored.sha1.iterations == 4103)
            #expect(stored.sha256.salt == [7, 0, 0xFF, 9, 8])
            #expect(stored.sha256.storedKey == Array(repeating: 9, count: 32))
        }
    }

    @Test(arguments: Backend.allCases) func duplicateUserIsRejected(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            await #expect(throws: StorageError.userExists) {
                try await storage.createUser(jid("ALICE@Example.com"), credentials: credentials(2))
            }
            // The first credentials survive.
            #expect(try await storage.credentials(for: alice) == credentials(1))
        }
    }

    @Test(arguments: Backend.allCases) func unknownDomainIsRejected(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let dave = try jid("dave@example.net")
            await #expect(throws: StorageError.unknownDomain) {
                try await storage.createUser(dave, credentials: credentials(1))
            }
            #expect(try await storage.userExists(dave) == false)
            #expect(try await storage.users(in: "example.net") == [])
        }
    }

    @Test(arguments: Backend.allCases) func setCredentialsReplaces(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            try await storage.setCredentials(alice, credentials: credentials(200))
            #expect(try await storage.credentials(for: alice) == credentials(200))
            await #expect(throws: StorageError.userNotFound) {
                try await storage.setCredentials(jid("nobody@example.com"), credentials: credentials(3))
            }
            #expect(try await storage.userExists(jid("nobody@example.com")) == false)
        }
    }

    @Test(arguments: Backend.allCases) func usersAreListedPerDomainSorted(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.addDomain("example.org"))
            for name in ["zoe@example.com", "bob@example.com", "alice@example.com", "carol@example.org"] {
                try await storage.createUser(jid(name), credentials: credentials(1))
            }
            #expect(try await storage.users(in: "example.com") == [jid("alice@example.com"), jid("bob@example.com"), jid("zoe@example.com")])
            #expect(try await storage.users(in: "example.org") == [jid("carol@example.org")])
            #expect(try await storage.users(in: "example.net") == [])
            #expect(try await storage.users(in: "not a domain") == [])
        }
    }

    @Test(arguments: Backend.allCases) func unicodeLocalpartRoundTrips(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let user = try jid("Zoë.Ünïcode@example.com")
            #expect(user.localpart == "zoë.ünïcode")
            try await storage.createUser(user, credentials: credentials(5))
            #expect(try await storage.users(in: "example.com") == [user])
            #expect(try await storage.credentials(for: jid("zoë.ünïcode@example.com")) == credentials(5))
        }
    }

    @Test(arguments: Backend.allCases) func removeUserCascades(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            let bob = try jid("bob@example.com")
            for user in [alice, bob] {
                try await storage.createUser(user, credentials: credentials(1))
                try await storage.putRosterItem(RosterItem(jid: jid("friend@example.org"), name: "Friend", subscription: .both, groups: ["Friends"]), of: user)
                #expect(try await storage.storeOfflineMessage(for: user, stanza: "<message>hi</message>", limit: 10))
                try await storage.putSubscriptionRequest(of: user, from: jid("stranger@example.org"), stanza: "<presence type='subscribe'/>")
            }

            #expect(try await storage.removeUser(alice))
            #expect(try await storage.removeUser(alice) == false)

            #expect(try await storage.userExists(alice) == false)
            #expect(try await storage.credentials(for: alice) == nil)
            #expect(try await storage.users(in: "example.com") == [bob])
            #expect(try await storage.roster(of: alice) == Roster(version: 0, items: []))
            #expect(try await storage.rosterItem(of: alice, contact: jid("friend@example.org")) == nil)
            #expect(try await storage.offlineMessageCount(for: alice) == 0)
            #expect(try await storage.takeOfflineMessages(for: alice) == [])
            #expect(try await storage.subscriptionRequests(of: alice) == [])

            // A new account with the same name starts empty: the rows are gone, not hidden.
            try await storage.createUser(alice, credentials: credentials(2))
            #expect(try await storage.roster(of: alice) == Roster(version: 0, items: []))
            #expect(try await storage.offlineMessageCount(for: alice) == 0)
            #expect(try await storage.subscriptionRequests(of: alice) == [])

            // Bob keeps everything.
            #expect(try await storage.roster(of: bob).version == 1)
            #expect(try await storage.roster(of: bob).items.map(\.name) == ["Friend"])
            #expect(try await storage.offlineMessageCount(for: bob) == 1)
            #expect(try await storage.subscriptionRequests(of: bob).map(\.stanza) == ["<presence type='subscribe'/>"])
        }
    }

    @Test(arguments: Backend.allCases, ["alice@example.com/phone", "example.com", "example.com/res"])
    func nonAccountJIDsAreRejected(_ backend: Backend, _ string: String) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let bad = try jid(string)
            let contact = try jid("friend@example.org")
            await #expect(throws: StorageError.notAnAccount) { try await storage.createUser(bad, credentials: credentials(1)) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.setCredentials(bad, credentials: credentials(1)) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.removeUser(bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.credentials(for: bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.userExists(bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.roster(of: bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.rosterItem(of: bad, contact: contact) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.putRosterItem(RosterItem(jid: contact), of: bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.removeRosterItem(of: bad, contact: contact) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.putSubscriptionRequest(of: bad, from: contact, stanza: "<presence/>") }
            await #expect(throws: StorageError.notAnAccount) { try await storage.removeSubscriptionRequest(of: bad, from: contact) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.subscriptionRequests(of: bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.storeOfflineMessage(for: bad, stanza: "<message/>", limit: 10) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.takeOfflineMessages(for: bad) }
            await #expect(throws: StorageError.notAnAccount) { try await storage.offlineMessageCount(for: bad) }
            #expect(try await storage.users(in: "example.com") == [])
        }
    }
}
}

// MARK: Rosters

extension StorageBehaviourTests {
@Suite("rosters")
struct RosterTests {
    @Test(arguments: Backend.allCases) func versionsCountChanges(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            #expect(try await storage.roster(of: alice) == Roster(version: 0, items: []))

            let bob = try jid("bob@example.org")
            var item = RosterItem(jid: bob, name: "Bob", subscription: .none, pendingOut: true)
            #expect(try await storage.putRosterItem(item, of: alice) == 1)
            #expect(try await storage.rosterItem(of: alice, contact: bob) == item)

            // Replacing changes the item and the version.
            item.subscription = .to
            item.pendingOut = false
            item.name = "Bobby"
            #expect(try await storage.putRosterItem(item, of: alice) == 2)
            #expect(try await storage.roster(of: alice) == Roster(version: 2, items: [item]))

            // Writing the same item again is not a change (RFC 6121 §2.6).
            #expect(try await storage.putRosterItem(item, of: alice) == 2)
            #expect(try await storage.roster(of: alice).version == 2)

            let carol = RosterItem(jid: try jid("carol@example.org"), subscription: .both, groups: ["Work"])
            #expect(try await storage.putRosterItem(carol, of: alice) == 3)
            let aaron = RosterItem(jid: try jid("aaron@example.org"), subscription: .from, pendingIn: true)
            #expect(try await storage.putRosterItem(aaron, of: alice) == 4)
            #expect(try await storage.roster(of: alice) == Roster(version: 4, items: [aaron, item, carol]))

            #expect(try await storage.removeRosterItem(of: alice, contact: bob) == 5)
            #expect(try await storage.rosterItem(of: alice, contact: bob) == nil)
            #expect(try await storage.removeRosterItem(of: alice, contact: bob) == nil)
            #expect(try await storage.roster(of: alice) == Roster(version: 5, items: [aaron, carol]))
        }
    }

    @Test(arguments: Backend.allCases) func versionsArePerUser(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            let bob = try jid("bob@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            try await storage.createUser(bob, credentials: credentials(2))
            for index in 1...3 {
                #expect(try await storage.putRosterItem(RosterItem(jid: jid("c\(index)@example.org")), of: alice) == Int64(index))
            }
            #expect(try await storage.putRosterItem(RosterItem(jid: jid("c1@example.org")), of: bob) == 1)
            #expect(try await storage.roster(of: alice).version == 3)
            #expect(try await storage.roster(of: bob).version == 1)
            #expect(try await storage.roster(of: bob).items.map(\.jid) == [jid("c1@example.org")])
        }
    }

    @Test(arguments: Backend.allCases) func everyFieldRoundTrips(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            var expected: [RosterItem] = []
            var index = 0
            for subscription in Subscription.allCases {
                for flags in 0..<8 {
                    let item = RosterItem(
                        jid: try jid("contact\(String(format: "%02d", index))@example.org"),
                        name: flags % 2 == 0 ? nil : "Name \(index)",
                        subscription: subscription,
                        pendingOut: flags & 1 != 0,
                        pendingIn: flags & 2 != 0,
                        approved: flags & 4 != 0,
                        groups: Array(repeating: "g", count: flags % 3).enumerated().map { "\($1)\($0)" })
                    expected.append(item)
                    #expect(try await storage.putRosterItem(item, of: alice) == Int64(index + 1))
                    #expect(try await storage.rosterItem(of: alice, contact: item.jid) == item)
                    index += 1
                }
            }
            let roster = try await storage.roster(of: alice)
            #expect(roster.version == 32)
            #expect(roster.items == expected)
        }
    }

    @Test(arguments: Backend.allCases) func unicodeNamesAndGroups(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            let groups = ["Família", "友達", "🎉 party", "quote \" slash / backslash \\", "", "Ünïcödé"]
            let item = RosterItem(jid: try jid("jürgen@münchen.example"), name: "Zoë 🐱 \u{202E}rtl", subscription: .both, groups: groups)
            #expect(try await storage.putRosterItem(item, of: alice) == 1)
            let stored = try #require(try await storage.rosterItem(of: alice, contact: jid("JÜRGEN@MÜNCHEN.example")))
            #expect(stored.groups == groups)
            #expect(stored.name == "Zoë 🐱 \u{202E}rtl")
            #expect(stored.jid.description == "jürgen@münchen.example")

            // Changing only the order of groups is a change.
            var reordered = item
            reordered.groups = groups.reversed()
            #expect(try await storage.putRosterItem(reordered, of: alice) == 2)
            #expect(try await storage.roster(of: alice).items.first?.groups == groups.reversed())
        }
    }

    @Test(arguments: Backend.allCases) func contactsMayBeDomainsButNotFullJIDs(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            let gateway = RosterItem(jid: try jid("gateway.example.org"), subscription: .both)
            #expect(try await storage.putRosterItem(gateway, of: alice) == 1)
            #expect(try await storage.rosterItem(of: alice, contact: jid("gateway.example.org")) == gateway)
            await #expect(throws: StorageError.notAnAccount) {
                try await storage.putRosterItem(RosterItem(jid: jid("bob@example.org/phone")), of: alice)
            }
            #expect(try await storage.roster(of: alice) == Roster(version: 1, items: [gateway]))
        }
    }

    @Test(arguments: Backend.allCases) func unknownUser(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let ghost = try jid("ghost@example.com")
            let contact = try jid("bob@example.org")
            await #expect(throws: StorageError.userNotFound) {
                try await storage.putRosterItem(RosterItem(jid: contact), of: ghost)
            }
            #expect(try await storage.removeRosterItem(of: ghost, contact: contact) == nil)
            #expect(try await storage.rosterItem(of: ghost, contact: contact) == nil)
            #expect(try await storage.roster(of: ghost) == Roster(version: 0, items: []))
        }
    }
}
}

// MARK: Subscription requests

extension StorageBehaviourTests {
@Suite("subscription requests")
struct SubscriptionRequestTests {
    @Test(arguments: Backend.allCases) func replaceRemoveAndOrder(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            #expect(try await storage.subscriptionRequests(of: alice) == [])

            let before = nowMilliseconds()
            for name in ["carol", "bob", "dave"] {
                try await storage.putSubscriptionRequest(of: alice, from: jid("\(name)@example.org"), stanza: "<presence from='\(name)' type='subscribe'/>")
            }
            var requests = try await storage.subscriptionRequests(of: alice)
            #expect(requests.map(\.stanza) == [
                "<presence from='carol' type='subscribe'/>",
                "<presence from='bob' type='subscribe'/>",
                "<presence from='dave' type='subscribe'/>",
            ])
            let after = nowMilliseconds()
            for request in requests {
                #expect(request.storedAt >= before && request.storedAt <= after)
            }

            // A new request from carol replaces hers and is now the newest.
            try await storage.putSubscriptionRequest(of: alice, from: jid("carol@example.org"), stanza: "<presence from='carol' type='subscribe'><status>again</status></presence>")
            requests = try await storage.subscriptionRequests(of: alice)
            #expect(requests.map(\.stanza) == [
                "<presence from='bob' type='subscribe'/>",
                "<presence from='dave' type='subscribe'/>",
                "<presence from='carol' type='subscribe'><status>again</status></presence>",
            ])

            try await storage.removeSubscriptionRequest(of: alice, from: jid("bob@example.org"))
            try await storage.removeSubscriptionRequest(of: alice, from: jid("nobody@example.org"))
            #expect(try await storage.subscriptionRequests(of: alice).map(\.stanza) == [
                "<presence from='dave' type='subscribe'/>",
                "<presence from='carol' type='subscribe'><status>again</status></presence>",
            ])

            // Requests are per user.
            let bob = try jid("bob@example.com")
            try await storage.createUser(bob, credentials: credentials(2))
            #expect(try await storage.subscriptionRequests(of: bob) == [])
        }
    }

    @Test(arguments: Backend.allCases) func unknownUser(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let ghost = try jid("ghost@example.com")
            await #expect(throws: StorageError.userNotFound) {
                try await storage.putSubscriptionRequest(of: ghost, from: jid("bob@example.org"), stanza: "<presence/>")
            }
            #expect(try await storage.subscriptionRequests(of: ghost) == [])
            try await storage.removeSubscriptionRequest(of: ghost, from: jid("bob@example.org"))
        }
    }
}
}

// MARK: Offline messages

extension StorageBehaviourTests {
@Suite("offline messages")
struct OfflineMessageTests {
    @Test(arguments: Backend.allCases) func limitIsEnforced(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            for index in 1...3 {
                #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>\(index)</message>", limit: 3))
            }
            #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>4</message>", limit: 3) == false)
            #expect(try await storage.offlineMessageCount(for: alice) == 3)
            #expect(try await storage.takeOfflineMessages(for: alice).map(\.stanza) == ["<message>1</message>", "<message>2</message>", "<message>3</message>"])

            #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>x</message>", limit: 0) == false)
            #expect(try await storage.offlineMessageCount(for: alice) == 0)
        }
    }

    @Test(arguments: Backend.allCases) func takeReturnsOldestFirstAndDeletes(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            let bob = try jid("bob@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            try await storage.createUser(bob, credentials: credentials(2))
            #expect(try await storage.takeOfflineMessages(for: alice) == [])

            let before = nowMilliseconds()
            for index in 0..<10 {
                #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message id='\(index)'>ü</message>", limit: 100))
            }
            #expect(try await storage.storeOfflineMessage(for: bob, stanza: "<message>bob</message>", limit: 100))
            let after = nowMilliseconds()
            #expect(try await storage.offlineMessageCount(for: alice) == 10)

            let messages = try await storage.takeOfflineMessages(for: alice)
            #expect(messages.map(\.stanza) == (0..<10).map { "<message id='\($0)'>ü</message>" })
            #expect(messages.allSatisfy { $0.storedAt >= before && $0.storedAt <= after })
            #expect(messages.map(\.storedAt) == messages.map(\.storedAt).sorted())

            #expect(try await storage.offlineMessageCount(for: alice) == 0)
            #expect(try await storage.takeOfflineMessages(for: alice) == [])
            // Bob's are not touched.
            #expect(try await storage.offlineMessageCount(for: bob) == 1)

            // Storing works again after taking.
            #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>later</message>", limit: 1))
            #expect(try await storage.takeOfflineMessages(for: alice).map(\.stanza) == ["<message>later</message>"])
        }
    }

    @Test(arguments: Backend.allCases) func unknownUser(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let ghost = try jid("ghost@example.com")
            await #expect(throws: StorageError.userNotFound) {
                try await storage.storeOfflineMessage(for: ghost, stanza: "<message/>", limit: 10)
            }
            #expect(try await storage.offlineMessageCount(for: ghost) == 0)
            #expect(try await storage.takeOfflineMessages(for: ghost) == [])
        }
    }

    @Test(arguments: Backend.allCases) func concurrentStoresAreAllKept(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            let results = try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0..<200 {
                    group.addTask { try await storage.storeOfflineMessage(for: alice, stanza: "<message>\(index)</message>", limit: 1000) }
                }
                return try await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(results.count == 200)
            #expect(results.allSatisfy { $0 })
            #expect(try await storage.offlineMessageCount(for: alice) == 200)
            let stanzas = try await storage.takeOfflineMessages(for: alice).map(\.stanza)
            #expect(stanzas.count == 200)
            #expect(Set(stanzas) == Set((0..<200).map { "<message>\($0)</message>" }))
        }
    }

    @Test(arguments: Backend.allCases) func concurrentStoresNeverExceedTheLimit(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            let accepted = try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0..<60 {
                    group.addTask { try await storage.storeOfflineMessage(for: alice, stanza: "<message>\(index)</message>", limit: 10) }
                }
                return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
            }
            #expect(accepted == 10)
            #expect(try await storage.offlineMessageCount(for: alice) == 10)
        }
    }

    @Test(arguments: Backend.allCases) func concurrentStoresFromTwoInstances(_ backend: Backend) async throws {
        try await withTwoInstances(backend) { (first: any Storage, second: any Storage) async throws in
            #expect(try await first.addDomain("example.com"))
            let alice = try jid("alice@example.com")
            try await second.createUser(alice, credentials: credentials(1))
            // SQLite: two pools on one file contend for the write lock, and the busy timeout
            // makes them wait. PostgreSQL: two pools lock the account's row in turn.
            let accepted = try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0..<100 {
                    let storage = index % 2 == 0 ? first : second
                    group.addTask { try await storage.storeOfflineMessage(for: alice, stanza: "<message>\(index)</message>", limit: 1000) }
                }
                return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
            }
            #expect(accepted == 100)
            #expect(try await first.offlineMessageCount(for: alice) == 100)
            #expect(try await second.takeOfflineMessages(for: alice).count == 100)
            #expect(try await first.offlineMessageCount(for: alice) == 0)
        }
    }
}
}

// MARK: Group-chat rooms

extension StorageBehaviourTests {
@Suite("group-chat rooms")
struct GroupChatRoomTests {
    @Test(arguments: Backend.allCases) func putListReplaceRemoveAndCascade(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.groupChatRooms() == [])
            let room = StoredRoom(jid: try JID("tea@conference.example.com"), parentDomain: "example.com",
                                  configuration: "{\"name\":\"Tea\"}", affiliations: "{}", createdAt: 1_800_000_000)
            try await storage.putGroupChatRoom(room)
            #expect(try await storage.groupChatRooms() == [room])
            var changed = room
            changed.configuration = "{\"name\":\"Tea & cake\"}"
            changed.createdAt = 1
            try await storage.putGroupChatRoom(changed)
            // Replaced, keeping when it was created.
            var expected = changed
            expected.createdAt = room.createdAt
            #expect(try await storage.groupChatRooms() == [expected])
            await #expect(throws: StorageError.unknownDomain) {
                try await storage.putGroupChatRoom(StoredRoom(jid: try JID("x@conference.nowhere.example"), parentDomain: "nowhere.example",
                                                              configuration: "{}", affiliations: "{}", createdAt: 0))
            }
            #expect(try await storage.removeGroupChatRoom(try JID("tea@conference.example.com")))
            #expect(try await storage.removeGroupChatRoom(try JID("tea@conference.example.com")) == false)
            // A room goes with its domain.
            try await storage.putGroupChatRoom(room)
            #expect(try await storage.removeDomain("example.com"))
            #expect(try await storage.groupChatRooms() == [])
        }
    }
}
}

// MARK: Account stores

extension StorageBehaviourTests {
@Suite("account stores")
struct AccountStoreTests {
    @Test("Entries per account and store, in write order; a rewrite moves an entry last; keepLast trims the oldest; removal; unknown accounts; the account's removal takes them", arguments: Backend.allCases)
    func entriesInWriteOrder(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try JID("alice@example.com")
            let bob = try JID("bob@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            try await storage.createUser(bob, credentials: credentials(2))
            #expect(try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: alice) == [])
            for (key, value) in [("a", "<item id='a'/>"), ("b", "<item id='b'/>"), ("c", "<item id='c'/>")] {
                try await storage.putStoreEntry("pep/urn:xmpp:avatar:data", of: alice, key: key, value: value, keepLast: nil)
            }
            #expect(try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: alice).map(\.key) == ["a", "b", "c"])
            // Rewriting "a" makes it the newest, with its new value.
            try await storage.putStoreEntry("pep/urn:xmpp:avatar:data", of: alice, key: "a", value: "<item id='a'>2</item>", keepLast: nil)
            let entries = try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: alice)
            #expect(entries.map(\.key) == ["b", "c", "a"])
            #expect(entries.last?.value == "<item id='a'>2</item>")
            #expect(entries.map(\.seq) == entries.map(\.seq).sorted() && Set(entries.map(\.seq)).count == 3)
            #expect(try await storage.storeEntry("pep/urn:xmpp:avatar:data", of: alice, key: "c")?.value == "<item id='c'/>")
            #expect(try await storage.storeEntry("pep/urn:xmpp:avatar:data", of: alice, key: "zz") == nil)
            // keepLast: 2 keeps the two newest.
            try await storage.putStoreEntry("pep/urn:xmpp:avatar:data", of: alice, key: "d", value: "<item id='d'/>", keepLast: 2)
            #expect(try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: alice).map(\.key) == ["a", "d"])
            // Stores and accounts are separate.
            try await storage.putStoreEntry("private", of: alice, key: "storage:bookmarks", value: "<storage/>", keepLast: nil)
            try await storage.putStoreEntry("pep/urn:xmpp:avatar:data", of: bob, key: "x", value: "<item id='x'/>", keepLast: 1)
            #expect(try await storage.storeEntries("private", of: alice).map(\.key) == ["storage:bookmarks"])
            #expect(try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: bob).map(\.key) == ["x"])
            #expect(try await storage.removeStoreEntry("pep/urn:xmpp:avatar:data", of: alice, key: "a"))
            #expect(try await storage.removeStoreEntry("pep/urn:xmpp:avatar:data", of: alice, key: "a") == false)
            #expect(try await storage.removeStore("pep/urn:xmpp:avatar:data", of: alice) == 1)
            #expect(try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: alice) == [])
            #expect(try await storage.storeEntries("private", of: alice).count == 1)
            await #expect(throws: StorageError.userNotFound) {
                try await storage.putStoreEntry("private", of: try JID("nobody@example.com"), key: "k", value: "v", keepLast: nil)
            }
            #expect(try await storage.removeUser(alice))
            #expect(try await storage.storeEntries("private", of: alice) == [])
            #expect(try await storage.storeEntries("pep/urn:xmpp:avatar:data", of: bob).count == 1)
        }
    }

    @Test("Concurrent writers of one store each get their own place in the order, and keepLast holds", arguments: Backend.allCases)
    func concurrentWriters(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try JID("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<20 {
                    group.addTask { try await storage.putStoreEntry("pep/n", of: alice, key: "k\(index)", value: "\(index)", keepLast: 10) }
                }
                try await group.waitForAll()
            }
            let entries = try await storage.storeEntries("pep/n", of: alice)
            #expect(entries.count == 10)
            #expect(Set(entries.map(\.seq)).count == 10)
        }
    }
}
}

// MARK: Message archive

extension StorageBehaviourTests {
@Suite("message archive")
struct ArchiveTests {
    /// alice's archive: m0…m9, one second apart, with bob (even) and carol (odd).
    static func filled(_ storage: any Storage) async throws -> JID {
        let alice = try JID("alice@example.com")
        try await storage.createUser(alice, credentials: credentials(1))
        for index in 0..<10 {
            try await storage.archive(ArchivedMessage(id: "m\(index)", with: index % 2 == 0 ? "bob@example.org" : "carol@example.org",
                                                      stamp: 1_000_000 + Int64(index) * 1000, stanza: "<message>\(index)</message>"), for: alice, expireBefore: nil)
        }
        return alice
    }

    @Test("Pages forwards and backwards (XEP-0059), with count, index and completeness; the last page; unknown ids", arguments: Backend.allCases)
    func paging(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try await Self.filled(storage)
            let first = try await storage.archivedMessages(ArchiveQuery(limit: 4), for: alice)
            #expect(first.messages.map(\.id) == ["m0", "m1", "m2", "m3"] && !first.complete && first.count == 10 && first.firstIndex == 0)
            let second = try await storage.archivedMessages(ArchiveQuery(after: "m3", limit: 4), for: alice)
            #expect(second.messages.map(\.id) == ["m4", "m5", "m6", "m7"] && !second.complete && second.firstIndex == 4)
            let third = try await storage.archivedMessages(ArchiveQuery(after: "m7", limit: 4), for: alice)
            #expect(third.messages.map(\.id) == ["m8", "m9"] && third.complete && third.firstIndex == 8)
            let last = try await storage.archivedMessages(ArchiveQuery(lastPage: true, limit: 3), for: alice)
            #expect(last.messages.map(\.id) == ["m7", "m8", "m9"] && !last.complete && last.firstIndex == 7)
            let earlier = try await storage.archivedMessages(ArchiveQuery(before: "m7", limit: 3), for: alice)
            #expect(earlier.messages.map(\.id) == ["m4", "m5", "m6"] && !earlier.complete)
            let earliest = try await storage.archivedMessages(ArchiveQuery(before: "m2", limit: 3), for: alice)
            #expect(earliest.messages.map(\.id) == ["m0", "m1"] && earliest.complete && earliest.firstIndex == 0)
            let between = try await storage.archivedMessages(ArchiveQuery(after: "m2", before: "m6", limit: 10), for: alice)
            #expect(between.messages.map(\.id) == ["m3", "m4", "m5"])
            let empty = try await storage.archivedMessages(ArchiveQuery(after: "m9", limit: 5), for: alice)
            #expect(empty.messages.isEmpty && empty.complete && empty.count == 10)
            let none = try await storage.archivedMessages(ArchiveQuery(limit: 0), for: alice)
            #expect(none.messages.isEmpty && !none.complete && none.count == 10, "max 0 asks for the count alone")
            await #expect(throws: StorageError.itemNotFound) { _ = try await storage.archivedMessages(ArchiveQuery(after: "nope", limit: 5), for: alice) }
            await #expect(throws: StorageError.itemNotFound) { _ = try await storage.archivedMessages(ArchiveQuery(before: "nope", limit: 5), for: alice) }
            // Another account's ids are not this one's.
            let bob = try JID("bob@example.com")
            try await storage.createUser(bob, credentials: credentials(2))
            await #expect(throws: StorageError.itemNotFound) { _ = try await storage.archivedMessages(ArchiveQuery(after: "m1", limit: 5), for: bob) }
        }
    }

    @Test("Filters: with, start, end, ids; the count and index follow the filters", arguments: Backend.allCases)
    func filters(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try await Self.filled(storage)
            let bob = try await storage.archivedMessages(ArchiveQuery(with: "bob@example.org", limit: 2), for: alice)
            #expect(bob.messages.map(\.id) == ["m0", "m2"] && bob.count == 5 && !bob.complete)
            let bobNext = try await storage.archivedMessages(ArchiveQuery(with: "bob@example.org", after: "m2", limit: 2), for: alice)
            #expect(bobNext.messages.map(\.id) == ["m4", "m6"] && bobNext.firstIndex == 2)
            let window = try await storage.archivedMessages(ArchiveQuery(start: 1_003_000, end: 1_005_000, limit: 10), for: alice)
            #expect(window.messages.map(\.id) == ["m3", "m4", "m5"] && window.complete && window.count == 3)
            let picked = try await storage.archivedMessages(ArchiveQuery(ids: ["m8", "m1", "zz"], limit: 10), for: alice)
            #expect(picked.messages.map(\.id) == ["m1", "m8"] && picked.count == 2)
            #expect(try await storage.archivedMessages(ArchiveQuery(ids: [], limit: 10), for: alice).messages.isEmpty)
            #expect(try await storage.archivedMessages(ArchiveQuery(with: "dave@example.org", limit: 10), for: alice).count == 0)
        }
    }

    @Test("Rooms have archives of their own: paged the same way, removed when the room is destroyed or its domain goes", arguments: Backend.allCases)
    func roomArchives(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let tea = try JID("tea@conference.example.com")
            let cake = try JID("cake@conference.example.com")
            for index in 0..<5 {
                try await storage.archiveRoomMessage(ArchivedMessage(id: "t\(index)", with: "\(tea)/n\(index)", stamp: 1000 + Int64(index), stanza: "<message>\(index)</message>"),
                                                     room: tea, parentDomain: "example.com", expireBefore: nil)
            }
            try await storage.archiveRoomMessage(ArchivedMessage(id: "c0", with: "\(cake)/n", stamp: 1000, stanza: "<message/>"), room: cake, parentDomain: "example.com", expireBefore: nil)
            let last = try await storage.archivedRoomMessages(ArchiveQuery(lastPage: true, limit: 2), room: tea)
            #expect(last.messages.map(\.id) == ["t3", "t4"] && last.count == 5 && !last.complete)
            let first = try await storage.archivedRoomMessages(ArchiveQuery(limit: 2), room: tea)
            #expect(first.messages.map(\.id) == ["t0", "t1"])
            await #expect(throws: StorageError.itemNotFound) { _ = try await storage.archivedRoomMessages(ArchiveQuery(after: "c0", limit: 2), room: tea) }
            await #expect(throws: StorageError.unknownDomain) {
                try await storage.archiveRoomMessage(ArchivedMessage(id: "x", with: "x", stamp: 1, stanza: "<message/>"), room: try JID("r@conference.nowhere.example"),
                                                     parentDomain: "nowhere.example", expireBefore: nil)
            }
            #expect(try await storage.removeRoomArchive(tea) == 5)
            #expect(try await storage.archivedRoomMessages(ArchiveQuery(limit: 10), room: tea).count == 0)
            #expect(try await storage.removeDomain("example.com"))
            #expect(try await storage.archivedRoomMessages(ArchiveQuery(limit: 10), room: cake).count == 0, "the domain's rooms' archives go with it")
        }
    }

    @Test("Retention removes older entries as new ones come; the account's removal takes its archive; unknown accounts", arguments: Backend.allCases)
    func retentionAndRemoval(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try await Self.filled(storage)
            try await storage.archive(ArchivedMessage(id: "new", with: "bob@example.org", stamp: 2_000_000, stanza: "<message/>"), for: alice, expireBefore: 1_005_000)
            let kept = try await storage.archivedMessages(ArchiveQuery(limit: 20), for: alice)
            #expect(kept.messages.map(\.id) == ["m5", "m6", "m7", "m8", "m9", "new"])
            await #expect(throws: StorageError.userNotFound) {
                try await storage.archive(ArchivedMessage(id: "x", with: "b@example.org", stamp: 1, stanza: "<message/>"), for: try JID("nobody@example.com"), expireBefore: nil)
            }
            #expect(try await storage.removeUser(alice))
            try await storage.createUser(alice, credentials: credentials(1))
            #expect(try await storage.archivedMessages(ArchiveQuery(limit: 20), for: alice).count == 0)
        }
    }

    @Test("A quota keeps the newest messages: checked every archiveQuotaCheckInterval appends, the archive never holds more than quota + interval", arguments: Backend.allCases)
    func quotaKeepsTheNewest(_ backend: Backend) async throws {
        try await withStorage(backend) { (storage: any Storage) async throws in
            let alice = try JID("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            let quota = 10
            let appends = Int(archiveQuotaCheckInterval) * 3 + 5
            var peak = 0
            for index in 0..<appends {
                try await storage.archive(ArchivedMessage(id: "q\(index)", with: "bob@example.org", stamp: Int64(index), stanza: "<message/>"),
                                          for: alice, expireBefore: nil, keepLast: quota)
                peak = max(peak, try await storage.archivedMessages(ArchiveQuery(limit: 1), for: alice).count)
            }
            #expect(peak <= quota + Int(archiveQuotaCheckInterval), "the archive grew to \(peak)")
            let kept = try await storage.archivedMessages(ArchiveQuery(limit: 500), for: alice).messages.map(\.id)
            // Trimmed at least once (three intervals passed), the newest always kept, in order.
            #expect(kept.count < appends && kept.count >= quota)
            #expect(kept == (appends - kept.count..<appends).map { "q\($0)" })
            // Without a quota nothing is trimmed.
            let bob = try JID("bob@example.com")
            try await storage.createUser(bob, credentials: credentials(2))
            for index in 0..<Int(archiveQuotaCheckInterval) * 2 {
                try await storage.archive(ArchivedMessage(id: "b\(index)", with: "alice@example.com", stamp: Int64(index), stanza: "<message/>"), for: bob, expireBefore: nil)
            }
            #expect(try await storage.archivedMessages(ArchiveQuery(limit: 1), for: bob).count == Int(archiveQuotaCheckInterval) * 2)
        }
    }
}
}

// MARK: Durability

@Suite("SQLiteStorage: durability")
struct SQLiteStorageDurabilityTests {
    @Test func everythingSurvivesReopening() async throws {
        try await withTemporaryDirectory { directory in
            let path = databasePath(in: directory)
            let alice = try jid("alice@example.com")
            let item = RosterItem(jid: try jid("bob@example.org"), name: "Bob", subscription: .from, pendingOut: true, approved: true, groups: ["Friends", "友達"])
            weak var closed: SQLiteStorage?
            do {
                let storage = try openStorage(path)
                closed = storage
                #expect(try await storage.addDomain("example.com"))
                #expect(try await storage.addDomain("example.org"))
                #expect(try await storage.removeDomain("example.org"))
                try await storage.createUser(alice, credentials: credentials(42))
                #expect(try await storage.putRosterItem(item, of: alice) == 1)
                #expect(try await storage.putRosterItem(RosterItem(jid: jid("temp@example.org")), of: alice) == 2)
                #expect(try await storage.removeRosterItem(of: alice, contact: jid("temp@example.org")) == 3)
                try await storage.putSubscriptionRequest(of: alice, from: jid("carol@example.org"), stanza: "<presence type='subscribe'/>")
                #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>one</message>", limit: 10))
                #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>two</message>", limit: 10))
            }
            // The first instance is gone (its connections closed); a new one reads the file.
            #expect(closed == nil)
            let reopened = try openStorage(path)
            #expect(try await reopened.domains().map(\.name) == ["example.com"])
            #expect(try await reopened.domainsGeneration() == 3)
            #expect(try await reopened.users(in: "example.com") == [alice])
            #expect(try await reopened.credentials(for: alice) == credentials(42))
            #expect(try await reopened.roster(of: alice) == Roster(version: 3, items: [item]))
            #expect(try await reopened.subscriptionRequests(of: alice).map(\.stanza) == ["<presence type='subscribe'/>"])
            #expect(try await reopened.takeOfflineMessages(for: alice).map(\.stanza) == ["<message>one</message>", "<message>two</message>"])
            // The version goes on from where it was.
            #expect(try await reopened.putRosterItem(RosterItem(jid: jid("dave@example.org")), of: alice) == 4)
        }
    }
}

// MARK: SQLite rows

@Suite("SQLiteStorage: corrupt rows")
struct SQLiteStorageCorruptRowTests {
    @Test func corruptUserRowIsAnErrorNotACrash() async throws {
        try await withSQLiteStorage { storage in
            try await storage.createUser(jid("alice@example.com"), credentials: credentials(1))
            #expect(try await storage.executeRawSQLForTesting("UPDATE users SET jid = 'a@b@c@example.com' WHERE jid = 'alice@example.com'") == 1)
            let error = await #expect(throws: SQLiteStorageError.self) { try await storage.users(in: "example.com") }
            guard case .corruptRow(table: "users", _) = error else {
                Issue.record("unexpected error \(String(describing: error))")
                return
            }

            let bob = try jid("bob@example.com")
            try await storage.createUser(bob, credentials: credentials(2))
            #expect(try await storage.executeRawSQLForTesting("UPDATE users SET sha1_iterations = 0 WHERE jid = 'bob@example.com'") == 1)
            let zero = await #expect(throws: SQLiteStorageError.self) { try await storage.credentials(for: bob) }
            #expect(zero == .corruptRow(table: "users", detail: "sha1_iterations is 0"))

            #expect(try await storage.executeRawSQLForTesting("UPDATE users SET sha1_iterations = 4096, sha256_iterations = 'many' WHERE jid = 'bob@example.com'") == 1)
            let text = await #expect(throws: SQLiteStorageError.self) { try await storage.credentials(for: bob) }
            guard case .corruptRow(table: "users", let detail) = text else {
                Issue.record("unexpected error \(String(describing: text))")
                return
            }
            #expect(detail.hasPrefix("column sha256_iterations"))
        }
    }

    @Test func corruptGroupsAreAnErrorNotACrash() async throws {
        try await withSQLiteStorage { storage in
            let alice = try jid("alice@example.com")
            try await storage.createUser(alice, credentials: credentials(1))
            try await storage.putRosterItem(RosterItem(jid: jid("bob@example.org"), groups: ["A"]), of: alice)
            #expect(try await storage.executeRawSQLForTesting("UPDATE roster_items SET groups_json = '{not json'") == 1)
            let error = await #expect(throws: SQLiteStorageError.self) { try await storage.roster(of: alice) }
            #expect(error == .corruptRow(table: "roster_items", detail: "groups_json is not a JSON array of strings"))
        }
    }
}

// MARK: PostgreSQL faults

@Suite("PostgresStorage: faults", .serialized, .postgresServer)
struct PostgresFaultTests {
    @Test("An unreachable server is a clear error at start, within the connect timeout")
    func unreachableAtStart() async throws {
        let closed = try LoopbackPorts.closedTCPPort()
        defer { closed.release() }
        let port = closed.port
        var settings = try PostgresConnectionSettings(url: "postgresql://braid:secret@127.0.0.1:\(port)/braid?sslmode=disable")
        settings.connectTimeout = .seconds(2)
        let storage = try PostgresStorage(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: StorageLocation.quietLogger())
        let started = ContinuousClock.now
        let error = await #expect(throws: PostgresStorageError.self) { try await storage.prepare() }
        // Bounded by the connect timeout (and the pool's attempt under way when it passes),
        // not left waiting: generous for a loaded machine.
        #expect(ContinuousClock.now - started < .seconds(15))
        guard case .unreachable(let database, _) = error else {
            Issue.record("unexpected \(String(describing: error))")
            return
        }
        // Where, without the password.
        #expect(database == "braid@127.0.0.1:\(port)/braid")
        #expect(!"\(String(describing: error))".contains("secret"))
        await storage.close()
    }

    @Test("A restarted server: calls during the outage fail with an error, and the storage reconnects by itself; nothing acknowledged is lost")
    func restartWhileRunning() async throws {
        let server = try #require(PostgresTestServer.current)
        var settings = try PostgresConnectionSettings(url: try await server.createDatabase())
        settings.operationTimeout = .seconds(2)
        let storage = try PostgresStorage(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: StorageLocation.quietLogger())
        try await storage.prepare()
        #expect(try await storage.addDomain("example.com"))
        let alice = try JID("alice@example.com")
        try await storage.createUser(alice, credentials: credentials(1))
        #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>before</message>", limit: 10))

        await server.stopServer()
        // Fails within the operation timeout, not minutes later.
        let outage = ContinuousClock.now
        await #expect(throws: PostgresStorageError.self) { try await storage.offlineMessageCount(for: alice) }
        #expect(ContinuousClock.now - outage < .seconds(4))
        try await server.restart()

        // Back without a new storage: the pool opens new connections.
        try await waitUntil(timeout: .seconds(20), "reconnected") { (try? await storage.userExists(alice)) == true }
        #expect(try await storage.storeOfflineMessage(for: alice, stanza: "<message>after</message>", limit: 10))
        #expect(try await storage.takeOfflineMessages(for: alice).map(\.stanza) == ["<message>before</message>", "<message>after</message>"])
        await storage.close()
    }
}

/// A count shared with a reading task.
final class Counter: Sendable {
    private let count = Mutex(0)

    func increment() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

// MARK: TLS

@Suite("PostgresStorage over TLS (sslmode)")
struct PostgresTLSTests {
    @Test("verify-full checks the server's certificate against sslrootcert and its name; require encrypts without checking; disable does not encrypt")
    func sslModes() async throws {
        let ca = try TestCertificateAuthority(commonName: "Database CA")
        let certificate = try ca.issue(commonName: "localhost", dnsIDs: ["localhost"])
        let server = try await PostgresTestServer.start(tls: (certificate.certificateChainPEM, certificate.privateKeyPEM))
        do {
            let directory = server.directory
            let trusted = "\(directory)/ca.pem"
            try ca.certificatePEM.write(toFile: trusted, atomically: true, encoding: .utf8)
            let other = "\(directory)/other-ca.pem"
            try TestCertificateAuthority(commonName: "Someone else").certificatePEM.write(toFile: other, atomically: true, encoding: .utf8)
            let database = URLComponents(string: try await server.createDatabase())?.path ?? "/postgres"

            // A refusal is retried until the connect timeout runs out, so it costs the whole
            // timeout: short for the connections that must be refused, generous for the
            // ones that must succeed (one took over 15 s in CI's third Swift run, with
            // every suite of the run on the same 2 cores; it only bounds a failure).
            func open(_ query: String, connectTimeout: Duration = .seconds(60)) async throws -> PostgresStorage {
                var settings = try PostgresConnectionSettings(url: "postgresql://postgres@localhost:\(server.port)\(database)?\(query)")
                settings.connectTimeout = connectTimeout
                let storage = try PostgresStorage(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: StorageLocation.quietLogger())
                do {
                    try await storage.prepare()
                } catch {
                    await storage.close()
                    throw error
                }
                return storage
            }
            for (query, encrypted) in [("sslmode=verify-full&sslrootcert=\(trusted)", true), ("sslmode=require", true),
                                       ("sslmode=disable", false), ("sslmode=prefer", true)] {
                let storage = try await open(query)
                #expect(try await storage.addDomains(["tls-\(query.hashValue & 0xffff).example"]) == 1, "\(query)")
                // What the server says about this very connection.
                var ssl: Bool?
                for try await value in try await storage.client.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").decode(Bool.self) {
                    ssl = value
                }
                #expect(ssl == encrypted, "\(query)")
                await storage.close()
            }
            // A certificate from another CA, or a name it does not carry: refused.
            await #expect(throws: PostgresStorageError.self) { _ = try await open("sslmode=verify-full&sslrootcert=\(other)", connectTimeout: .seconds(3)) }
            var wrongName = try PostgresConnectionSettings(url: "postgresql://postgres@127.0.0.1:\(server.port)\(database)?sslmode=verify-full&sslrootcert=\(trusted)")
            wrongName.connectTimeout = .seconds(3)
            let misnamed = try PostgresStorage(settings: wrongName, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: StorageLocation.quietLogger())
            await #expect(throws: PostgresStorageError.self) { try await misnamed.prepare() }
            await misnamed.close()
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}

// MARK: Migration

@Suite("braid storage migrate: SQLite into PostgreSQL", .postgresServer)
struct StorageMigrationTests {
    @Test("Everything is copied row for row (keys, SCRAM keys, roster versions, timestamps, order); running again copies nothing twice")
    func copiesEverythingOnce() async throws {
        try await StorageLocation.with(.sqlite) { sqliteLocation in
            let source = try #require(try await sqliteLocation.open() as? SQLiteStorage)
            #expect(try await source.addDomains(["example.com", "bücher.example"]) == 2)
            let alice = try JID("alice@example.com")
            let anna = try JID("anna@bücher.example")
            try await source.createUser(alice, credentials: credentials(1))
            try await source.createUser(anna, credentials: credentials(2))
            let item = RosterItem(jid: try JID("bob@example.org"), name: "Bob", subscription: .both, pendingIn: true, approved: true, groups: ["Friends", "友達"])
            #expect(try await source.putRosterItem(item, of: alice) == 1)
            #expect(try await source.putRosterItem(RosterItem(jid: try JID("tmp@example.org")), of: alice) == 2)
            #expect(try await source.removeRosterItem(of: alice, contact: try JID("tmp@example.org")) == 3)
            try await source.putSubscriptionRequest(of: anna, from: try JID("carol@example.org"), stanza: "<presence type='subscribe'/>")
            for index in 0..<3 {
                #expect(try await source.storeOfflineMessage(for: alice, stanza: "<message>\(index)</message>", limit: 10))
            }
            let storedAt = try await source.takeOfflineMessages(for: alice).map(\.storedAt)
            for index in 0..<3 {
                #expect(try await source.storeOfflineMessage(for: alice, stanza: "<message>\(index)</message>", limit: 10))
            }
            try await source.putStoreEntry("pep", of: alice, key: "urn:xmpp:avatar:data", value: "{}", keepLast: nil)
            try await source.archive(ArchivedMessage(id: "a1", with: "bob@example.org", stamp: 1000, stanza: "<message/>"), for: alice, expireBefore: nil)
            try await source.archiveRoomMessage(ArchivedMessage(id: "r1", with: "tea@conference.example.com/al", stamp: 1000, stanza: "<message/>"),
                                                room: try JID("tea@conference.example.com"), parentDomain: "example.com", expireBefore: nil)
            try await source.putStoreEntry("private", of: anna, key: "storage:bookmarks", value: "<storage xmlns='storage:bookmarks'/>", keepLast: nil)
            let token = StoredAPIToken(id: "t1", hash: String(repeating: "f", count: 64), domains: ["example.com"], label: "panel", createdAt: 1000, expiresAt: 2000)
            try await source.addAPIToken(token)
            try await source.appendAuditEntry(AuditEntry(at: 1, tokenID: "t1", action: "account.create", target: "alice@example.com", outcome: "ok"))
            try await source.appendAuditEntry(AuditEntry(at: 2, tokenID: nil, action: "domain.add", target: "x.example", outcome: "unauthenticated", detail: "no token"))

            try await StorageLocation.with(.postgresql) { postgresLocation in
                let target = try #require(try await postgresLocation.open() as? PostgresStorage)
                let counts = try await StorageMigration.copy(from: source, to: target, logger: StorageLocation.quietLogger())
                #expect(counts.map(\.table) == ["domains", "users", "roster_items", "subscription_requests", "offline_messages", "muc_rooms", "archive", "room_archive", "account_store", "api_tokens", "audit_log", "domain_settings"])
                #expect(counts.allSatisfy { $0.source == $0.copied && $0.target == $0.source })
                #expect(counts.first { $0.table == "offline_messages" }?.source == 3)

                #expect(try await target.domains().map(\.name) == ["bücher.example", "example.com"])
                #expect(try await target.credentials(for: alice) == credentials(1))
                #expect(try await target.credentials(for: anna) == credentials(2))
                // The version as it was: a client's cached roster stays valid.
                #expect(try await target.roster(of: alice) == Roster(version: 3, items: [item]))
                #expect(try await target.subscriptionRequests(of: anna).map(\.stanza) == ["<presence type='subscribe'/>"])
                #expect(try await target.storeEntries("private", of: anna) == (try await source.storeEntries("private", of: anna)))
                #expect(try await target.storeEntry("pep", of: alice, key: "urn:xmpp:avatar:data")?.value == "{}")
                #expect(try await target.archivedMessages(ArchiveQuery(limit: 10), for: alice).messages.map(\.id) == ["a1"])
                #expect(try await target.archivedRoomMessages(ArchiveQuery(limit: 10), room: try JID("tea@conference.example.com")).messages.map(\.id) == ["r1"])
                #expect(try await target.apiTokens() == [token])
                #expect(try await target.auditEntries(limit: 10, domain: nil) == (try await source.auditEntries(limit: 10, domain: nil)))

                // Again: nothing new, nothing doubled.
                let again = try await StorageMigration.copy(from: source, to: target, logger: StorageLocation.quietLogger())
                #expect(again.allSatisfy { $0.copied == 0 && $0.target == $0.source })

                // New rows on PostgreSQL come after the copied ones.
                #expect(try await target.storeOfflineMessage(for: alice, stanza: "<message>new</message>", limit: 10))
                let taken = try await target.takeOfflineMessages(for: alice)
                #expect(taken.map(\.stanza) == ["<message>0</message>", "<message>1</message>", "<message>2</message>", "<message>new</message>"])
                #expect(taken.prefix(3).allSatisfy { $0.storedAt >= storedAt.min() ?? 0 })
                #expect(try await target.putRosterItem(RosterItem(jid: try JID("dave@example.org")), of: alice) == 4)
                try await target.appendAuditEntry(AuditEntry(at: 3, tokenID: "t1", action: "account.remove", target: "alice@example.com", outcome: "ok"))
                #expect(try await target.auditEntries(limit: 1, domain: nil).map(\.at) == [3])
            }
        }
    }
}

/// Group commit (CommitBatcher): appends that come while a commit is under way go together
/// in the next one, and each caller still gets its own outcome.
@Suite("Group commit of archive appends")
struct GroupCommitTests {
    @Test("Concurrent submits share commits; each gets its own outcome, in order within a batch")
    func batches() async throws {
        let sizes = Mutex<[Int]>([])
        let batcher = CommitBatcher<Int>(maxBatch: 16) { items in
            sizes.withLock { $0.append(items.count) }
            // A commit takes time (an fsync): that is what lets others queue behind it.
            try? await Task.sleep(for: .milliseconds(5))
            return items.map { $0 % 10 == 7 ? StorageError.userNotFound : nil }
        }
        let outcomes = await withTaskGroup(of: (Int, Bool).self) { group in
            for index in 0..<100 {
                group.addTask {
                    do {
                        try await batcher.submit(index)
                        return (index, true)
                    } catch {
                        return (index, false)
                    }
                }
            }
            return await group.reduce(into: [Int: Bool]()) { $0[$1.0] = $1.1 }
        }
        #expect(outcomes.count == 100)
        #expect(outcomes.filter { !$0.value }.keys.sorted() == [7, 17, 27, 37, 47, 57, 67, 77, 87, 97])
        let recorded = sizes.withLock { $0 }
        #expect(recorded.reduce(0, +) == 100)
        #expect(recorded.count < 100, "appends were batched: \(recorded.count) commits")
        #expect(recorded.allSatisfy { $0 <= 16 })
    }

    @Test("On SQLite, 200 appends at once from many sessions: every row for an existing account is kept, the one for a missing account fails alone")
    func sqliteConcurrentAppends() async throws {
        try await withStorage(.sqlite) { (storage: any Storage) async throws in
            let accounts = try (0..<10).map { try JID("user\($0)@example.com") }
            for account in accounts { try await storage.createUser(account, credentials: credentials(1)) }
            let missing = try JID("nobody@example.com")
            let failures = try await withThrowingTaskGroup(of: Int.self) { group in
                for index in 0..<200 {
                    let account = index == 150 ? missing : accounts[index % 10]
                    group.addTask {
                        do {
                            try await storage.archive(ArchivedMessage(id: "g\(index)", with: "peer@example.org", stamp: Int64(index), stanza: "<message/>"),
                                                      for: account, expireBefore: nil)
                            return 0
                        } catch StorageError.userNotFound {
                            return 1
                        }
                    }
                }
                return try await group.reduce(0, +)
            }
            #expect(failures == 1)
            var total = 0
            for account in accounts { total += try await storage.archivedMessages(ArchiveQuery(limit: 1), for: account).count }
            #expect(total == 199)
        }
    }
}
