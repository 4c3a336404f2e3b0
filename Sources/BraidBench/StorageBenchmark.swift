import ArgumentParser
import Foundation
import Logging
import NIOPosix
import Storage
import XMPPCore

/// The storage operations a server's load is made of, on SQLite and on PostgreSQL in the
/// same run (issue 12): the login lookup, messages through offline storage, loading a big
/// roster, provisioning many domains, and how long a domain added by another process takes
/// to be announced to a server.
struct StorageBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "storage",
        abstract: "Storage operations per second on SQLite and PostgreSQL, side by side.")

    @Option(help: "A new, empty PostgreSQL database to use; without it only SQLite runs.")
    var postgresURL: String?

    @Option(help: "Accounts created and looked up.")
    var accounts: Int = 500

    @Option(help: "Messages stored and taken.")
    var messages: Int = 2000

    @Option(help: "Contacts in the big roster.")
    var contacts: Int = 1000

    @Option(help: "Domains provisioned in one call.")
    var domains: Int = 10_000

    @Option(help: "Tasks issuing operations at once.")
    var concurrency: Int = 16

    @Flag(help: "Print one JSON object instead of a table.")
    var json = false

    func run() async throws {
        var logger = Logger(label: "braid.bench.storage")
        logger.logLevel = .warning
        var results: [String: [String: Double]] = [:]
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-bench-storage-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        results["sqlite"] = try await measure { try SQLiteStorage(path: "\(directory)/bench.sqlite", logger: logger) }
        if let postgresURL {
            let settings = try PostgresConnectionSettings(url: postgresURL)
            results["postgresql"] = try await measure { try PostgresStorage(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger) }
        }
        if json {
            let data = try JSONSerialization.data(withJSONObject: ["benchmark": "storage", "accounts": accounts, "messages": messages,
                                                                   "contacts": contacts, "domains": domains, "concurrency": concurrency,
                                                                   "results": results], options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for (backend, figures) in results.sorted(by: { $0.key < $1.key }) {
                print(backend)
                for (name, value) in figures.sorted(by: { $0.key < $1.key }) { print("  \(name): \(String(format: "%.1f", value))") }
            }
        }
    }

    /// One backend: two instances on one store (the server and another process).
    private func measure(_ open: () throws -> any Storage) async throws -> [String: Double] {
        let server = try open()
        let other = try open()
        do {
            let figures = try await measure(server: server, other: other)
            await server.close()
            await other.close()
            return figures
        } catch {
            await server.close()
            await other.close()
            throw error
        }
    }

    private func measure(server: any Storage, other: any Storage) async throws -> [String: Double] {
        try await server.prepare()
        try await other.prepare()
        var figures: [String: Double] = [:]
        let domain = "bench-\(UInt32.random(in: 0 ... .max)).example"
        try await server.addDomain(domain)
        let credentials = StoredCredentials(
            sha1: ScramCredentials(salt: Array(repeating: 1, count: 16), iterations: 4096, storedKey: Array(repeating: 2, count: 20), serverKey: Array(repeating: 3, count: 20)),
            sha256: ScramCredentials(salt: Array(repeating: 4, count: 16), iterations: 4096, storedKey: Array(repeating: 5, count: 32), serverKey: Array(repeating: 6, count: 32)))
        let users = try (0..<accounts).map { try JID("user\($0)@\(domain)") }

        figures["accounts_created_per_s"] = try await rate(users.count) { index in try await server.createUser(users[index], credentials: credentials) }
        // What a login reads (PBKDF2 is the SCRAM benchmark's).
        figures["login_lookups_per_s"] = try await rate(users.count * 4) { index in _ = try await server.credentials(for: users[index % users.count]) }
        figures["messages_stored_per_s"] = try await rate(messages) { index in
            _ = try await server.storeOfflineMessage(for: users[index % users.count], stanza: "<message to='\(users[index % users.count])'><body>\(index)</body></message>", limit: 1_000_000)
        }
        figures["messages_taken_per_s"] = Double(messages) / (try await seconds { for user in users { _ = try await server.takeOfflineMessages(for: user) } })

        let owner = users[0]
        for index in 0..<contacts {
            try await server.putRosterItem(RosterItem(jid: try JID("contact\(index)@elsewhere.example"), name: "Contact \(index)", subscription: .both, groups: ["Friends"]), of: owner)
        }
        var loads: [Double] = []
        for _ in 0..<5 { loads.append(try await seconds { _ = try await server.roster(of: owner) }) }
        figures["roster_load_ms_\(contacts)_contacts"] = (loads.min() ?? 0) * 1000

        let names = (0..<domains).map { "tenant\($0)-\(domain)" }
        figures["domains_provisioned_per_s"] = Double(domains) / (try await seconds { _ = try await other.addDomains(names) })

        // A domain added by the other process, until the server is told (SQLite: polled
        // every 50 ms, as a server does; PostgreSQL: NOTIFY).
        var changes = server.domainChanges(pollInterval: .milliseconds(50)).makeAsyncIterator()
        _ = await changes.next()
        try await Task.sleep(for: .milliseconds(300))
        var latencies: [Double] = []
        for round in 0..<10 {
            try await other.addDomain("live\(round)-\(domain)")
            let started = ContinuousClock.now
            _ = await changes.next()
            latencies.append(Self.seconds(ContinuousClock.now - started) * 1000)
            try await Task.sleep(for: .milliseconds(120))
        }
        latencies.sort()
        figures["live_domain_announced_ms_median"] = latencies[latencies.count / 2]
        figures["live_domain_announced_ms_max"] = latencies.last ?? 0
        return figures
    }

    /// Operations per second for `count` operations issued by `concurrency` tasks.
    private func rate(_ count: Int, _ operation: @escaping @Sendable (Int) async throws -> Void) async throws -> Double {
        let workers = max(1, concurrency)
        let elapsed = try await seconds {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<workers {
                    group.addTask {
                        for index in stride(from: worker, to: count, by: workers) { try await operation(index) }
                    }
                }
                try await group.waitForAll()
            }
        }
        return Double(count) / elapsed
    }

    private func seconds(_ body: () async throws -> Void) async throws -> Double {
        let started = ContinuousClock.now
        try await body()
        return Self.seconds(ContinuousClock.now - started)
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}
