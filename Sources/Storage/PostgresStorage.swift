import Foundation
import Logging
import NIOCore
import PostgresNIO
import Synchronization
import XMPPCore

/// ``Storage`` in PostgreSQL, through postgres-nio's connection pool, with the semantics of
/// ``SQLiteStorage`` (the same tests run on both).
///
/// SQLite serialises every writer; here each operation that reads and then writes (a roster
/// version, the offline-message limit, a request's sequence number) first locks the account's
/// row (`SELECT … FOR UPDATE`) inside its transaction, so concurrent calls for one account
/// queue and calls for different accounts do not. Changes to the hosted domains send
/// `NOTIFY braid_domains` in the same transaction, so every server sharing the database
/// learns of them at commit (``domainChanges(pollInterval:)``).
///
/// Sendable without `@unchecked`: its stored properties are immutable and Sendable
/// (`PostgresClient` is thread-safe).
public final class PostgresStorage: Storage {
    let client: PostgresClient
    private let runner: Task<Void, Never>
    private let logger: Logger
    public let settings: PostgresConnectionSettings
    /// Whether ``prepare()`` has run to the end (connected, schema up to date).
    private let prepared = Atomic<Bool>(false)

    static let notificationChannel = "braid_domains"
    /// The advisory lock migrations hold, so that servers starting together apply each once.
    static let migrationLock: Int64 = 0x6272_6169_6400

    private typealias SQL = PostgresStatements

    /// Creates the pool; nothing is connected until ``prepare()``.
    public init(settings: PostgresConnectionSettings, eventLoopGroup: any EventLoopGroup, logger: Logger = Logger(label: "braid.storage")) throws {
        self.settings = settings
        self.logger = logger
        let client = PostgresClient(configuration: try settings.clientConfiguration(), eventLoopGroup: eventLoopGroup, backgroundLogger: logger)
        self.client = client
        runner = Task { await client.run() }
    }

    // MARK: Life cycle

    public func prepare() async throws {
        if prepared.load(ordering: .acquiring) { return }
        let timeout = settings.connectTimeout
        do {
            try await withDeadline(timeout) { [self] in try await migrate() }
        } catch let error as PostgresStorageError {
            throw error
        } catch is DeadlineExceeded {
            throw PostgresStorageError.unreachable(settings.redactedDescription, "no connection within \(timeout)")
        } catch {
            throw PostgresStorageError.unreachable(settings.redactedDescription, Self.describe(error))
        }
        prepared.store(true, ordering: .releasing)
        logger.info("Opened database", metadata: ["database": "\(settings.redactedDescription)"])
    }

    public func close() async {
        runner.cancel()
        await runner.value
    }

    private func migrate() async throws {
        try await client.withTransaction(logger: logger) { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(\(Self.migrationLock))", logger: logger)
            try await connection.query(PostgresQuery(unsafeSQL: SQL.createMigrations), logger: logger)
            var applied: Set<String> = []
            for try await id in try await connection.query(PostgresQuery(unsafeSQL: SQL.selectMigrations), logger: logger).decode(String.self) {
                applied.insert(id)
            }
            let known = Set(SQL.migrations.map(\.id))
            // A database written by a newer Braid has migrations this one does not know;
            // running on it could corrupt data it does not understand.
            guard applied.isSubset(of: known) else {
                throw PostgresStorageError.schemaTooNew(applied: applied.sorted())
            }
            let now = Self.nowSeconds()
            for migration in SQL.migrations where !applied.contains(migration.id) {
                for statement in migration.statements {
                    try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger)
                }
                try await connection.query("INSERT INTO braid_migrations (id, applied_at) VALUES (\(migration.id), \(now))", logger: logger)
                logger.info("Applied database migration", metadata: ["migration": "\(migration.id)"])
            }
        }
    }

    // MARK: Hosted domains

    public func domains() async throws -> [HostedDomain] {
        try await run("domains") { [self] in
            var domains: [HostedDomain] = []
            for try await (name, addedAt) in try await client.query("SELECT name, added_at FROM domains ORDER BY name", logger: logger).decode((String, Int64).self) {
                domains.append(HostedDomain(name: name, addedAt: addedAt))
            }
            return domains.sorted { $0.name < $1.name }
        }
    }

    @discardableResult
    public func addDomain(_ name: String) async throws -> Bool {
        try await addDomains([name]) == 1
    }

    @discardableResult
    public func addDomains(_ names: [String]) async throws -> Int {
        // Validate everything first, so a bad name adds nothing.
        let prepared = try names.map { try StorageKeys.domain($0) }
        let now = Self.nowSeconds()
        let added = try await run("add domains") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Int in
                // One statement for the whole batch: provisioning 10,000 domains is one round
                // trip, not 10,000.
                let rows = try await connection.query("""
                    INSERT INTO domains (name, added_at) SELECT DISTINCT unnest(\(prepared)::text[]), \(now)
                    ON CONFLICT (name) DO NOTHING RETURNING name
                    """, logger: logger)
                let added = try await Self.count(rows)
                if added > 0 { try await Self.domainsChanged(connection, logger: logger) }
                return added
            }
        }
        if added > 0 { logger.info("Added hosted domains", metadata: ["count": "\(added)"]) }
        return added
    }

    @discardableResult
    public func removeDomain(_ name: String) async throws -> Bool {
        // A name that is not a valid domain cannot be hosted.
        guard let name = try? StorageKeys.domain(name) else { return false }
        let removed = try await run("remove domain") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Bool in
                let rows = try await connection.query("DELETE FROM domains WHERE name = \(name) RETURNING name", logger: logger)
                guard try await Self.count(rows) > 0 else { return false }
                try await Self.domainsChanged(connection, logger: logger)
                return true
            }
        }
        if removed { logger.info("Removed hosted domain", metadata: ["domain": "\(name)"]) }
        return removed
    }

    /// Bumps the generation and tells the listeners, at commit.
    private static func domainsChanged(_ connection: PostgresConnection, logger: Logger) async throws {
        try await connection.query("UPDATE meta SET value = value + 1 WHERE name = \(SQL.domainsGenerationKey)", logger: logger)
        try await connection.query(PostgresQuery(unsafeSQL: "NOTIFY \(notificationChannel)"), logger: logger)
    }

    public func domainsGeneration() async throws -> Int64 {
        try await run("domains generation") { [self] in
            for try await value in try await client.query("SELECT value FROM meta WHERE name = \(SQL.domainsGenerationKey)", logger: logger).decode(Int64.self) {
                return value
            }
            throw PostgresStorageError.corruptRow(table: "meta", detail: "no \(SQL.domainsGenerationKey) row")
        }
    }

    /// Told by `LISTEN/NOTIFY`: an element at once, one after each committed change, and one
    /// whenever listening starts again after a lost connection (changes meanwhile were not
    /// heard). `pollInterval` only paces the retries while the database is unreachable.
    public func domainChanges(pollInterval: Duration) -> AsyncStream<Void> {
        let client = self.client
        let logger = self.logger
        return AsyncStream { continuation in
            let task = Task {
                continuation.yield()
                while !Task.isCancelled {
                    do {
                        try await client.withConnection { connection in
                            try await connection.listen(on: Self.notificationChannel) { notifications in
                                continuation.yield()
                                for try await _ in notifications {
                                    continuation.yield()
                                }
                            }
                        }
                    } catch {
                        if Task.isCancelled { break }
                        logger.warning("listening for domain changes failed; retrying", metadata: ["error": "\(Self.describe(error))"])
                    }
                    do { try await Task.sleep(for: max(pollInterval, .milliseconds(200))) } catch { break }
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    // MARK: Accounts

    public func createUser(_ user: JID, credentials: StoredCredentials) async throws {
        let key = try StorageKeys.account(user)
        let domain = user.domainpart
        let now = Self.nowSeconds()
        let (sha1, sha256) = (credentials.sha1, credentials.sha256)
        try await run("create user") { [self] in
            try await client.withTransaction(logger: logger) { connection in
                // The domain row is locked against a concurrent removal until commit.
                guard try await Self.count(try await connection.query("SELECT 1 FROM domains WHERE name = \(domain) FOR SHARE", logger: logger)) > 0 else {
                    throw StorageError.unknownDomain
                }
                let rows = try await connection.query("""
                    INSERT INTO users (jid, domain, sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key,
                                       sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, roster_version, created_at)
                    VALUES (\(key), \(domain), \(Data(sha1.salt)), \(Int64(sha1.iterations)), \(Data(sha1.storedKey)), \(Data(sha1.serverKey)),
                            \(Data(sha256.salt)), \(Int64(sha256.iterations)), \(Data(sha256.storedKey)), \(Data(sha256.serverKey)), 0, \(now))
                    ON CONFLICT (jid) DO NOTHING RETURNING jid
                    """, logger: logger)
                guard try await Self.count(rows) > 0 else { throw StorageError.userExists }
            }
        }
        logger.debug("Created account", metadata: ["user": "\(key)"])
    }

    public func setCredentials(_ user: JID, credentials: StoredCredentials) async throws {
        let key = try StorageKeys.account(user)
        let (sha1, sha256) = (credentials.sha1, credentials.sha256)
        try await run("set credentials") { [self] in
            let rows = try await client.query("""
                UPDATE users SET
                    sha1_salt = \(Data(sha1.salt)), sha1_iterations = \(Int64(sha1.iterations)),
                    sha1_stored_key = \(Data(sha1.storedKey)), sha1_server_key = \(Data(sha1.serverKey)),
                    sha256_salt = \(Data(sha256.salt)), sha256_iterations = \(Int64(sha256.iterations)),
                    sha256_stored_key = \(Data(sha256.storedKey)), sha256_server_key = \(Data(sha256.serverKey))
                WHERE jid = \(key) RETURNING jid
                """, logger: logger)
            guard try await Self.count(rows) > 0 else { throw StorageError.userNotFound }
        }
    }

    @discardableResult
    public func removeUser(_ user: JID) async throws -> Bool {
        let key = try StorageKeys.account(user)
        // The foreign keys cascade to the roster, requests and offline messages.
        let removed = try await run("remove user") { [self] in
            try await Self.count(try await client.query("DELETE FROM users WHERE jid = \(key) RETURNING jid", logger: logger)) > 0
        }
        if removed { logger.debug("Removed account", metadata: ["user": "\(key)"]) }
        return removed
    }

    public func credentials(for user: JID) async throws -> StoredCredentials? {
        let key = try StorageKeys.account(user)
        return try await run("credentials") { [self] in
            let rows = try await client.query("""
                SELECT sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key,
                       sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key
                FROM users WHERE jid = \(key)
                """, logger: logger)
            for try await row in rows.decode((Data, Int64, Data, Data, Data, Int64, Data, Data).self) {
                return StoredCredentials(
                    sha1: try Self.scram(row.0, row.1, row.2, row.3, prefix: "sha1"),
                    sha256: try Self.scram(row.4, row.5, row.6, row.7, prefix: "sha256"))
            }
            return nil
        }
    }

    public func userExists(_ user: JID) async throws -> Bool {
        let key = try StorageKeys.account(user)
        return try await run("user exists") { [self] in
            try await Self.count(try await client.query("SELECT 1 FROM users WHERE jid = \(key)", logger: logger)) > 0
        }
    }

    public func users(in domain: String) async throws -> [JID] {
        guard let domain = try? StorageKeys.domain(domain) else { return [] }
        return try await run("users") { [self] in
            var users: [JID] = []
            for try await text in try await client.query("SELECT jid FROM users WHERE domain = \(domain) ORDER BY jid", logger: logger).decode(String.self) {
                users.append(try Self.jid(text, in: "users"))
            }
            return users.sorted()
        }
    }

    // MARK: Rosters

    public func roster(of user: JID) async throws -> Roster {
        let key = try StorageKeys.account(user)
        return try await run("roster") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Roster in
                guard let version = try await Self.rosterVersion(connection, key, lock: false, logger: logger) else { return Roster(version: 0, items: []) }
                var items: [RosterItem] = []
                for try await row in try await connection.query("""
                    SELECT contact_jid, name, subscription, pending_out, pending_in, approved, groups_json
                    FROM roster_items WHERE user_jid = \(key) ORDER BY contact_jid
                    """, logger: logger).decode(RosterRow.self) {
                    items.append(try Self.rosterItem(row))
                }
                return Roster(version: version, items: items)
            }
        }
    }

    public func rosterItem(of user: JID, contact: JID) async throws -> RosterItem? {
        let key = try StorageKeys.account(user)
        let contactKey = try StorageKeys.contact(contact)
        return try await run("roster item") { [self] in
            try await Self.rosterItem(client, key, contactKey, logger: logger)
        }
    }

    @discardableResult
    public func putRosterItem(_ item: RosterItem, of user: JID) async throws -> Int64 {
        let key = try StorageKeys.account(user)
        let contactKey = try StorageKeys.contact(item.jid)
        let groups = try Self.encodeGroups(item.groups)
        let subscription = item.subscription.rawValue
        return try await run("put roster item") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Int64 in
                guard let version = try await Self.rosterVersion(connection, key, lock: true, logger: logger) else { throw StorageError.userNotFound }
                // RFC 6121 §2.6: the version changes only when the roster does.
                if try await Self.rosterItem(connection, key, contactKey, logger: logger) == item {
                    return version
                }
                try await connection.query("""
                    INSERT INTO roster_items (user_jid, contact_jid, name, subscription, pending_out, pending_in, approved, groups_json)
                    VALUES (\(key), \(contactKey), \(item.name), \(subscription), \(item.pendingOut), \(item.pendingIn), \(item.approved), \(groups))
                    ON CONFLICT (user_jid, contact_jid) DO UPDATE SET
                        name = excluded.name, subscription = excluded.subscription, pending_out = excluded.pending_out,
                        pending_in = excluded.pending_in, approved = excluded.approved, groups_json = excluded.groups_json
                    """, logger: logger)
                return try await Self.incrementRosterVersion(connection, key, logger: logger)
            }
        }
    }

    @discardableResult
    public func removeRosterItem(of user: JID, contact: JID) async throws -> Int64? {
        let key = try StorageKeys.account(user)
        let contactKey = try StorageKeys.contact(contact)
        return try await run("remove roster item") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Int64? in
                guard try await Self.rosterVersion(connection, key, lock: true, logger: logger) != nil else { return nil }
                let rows = try await connection.query(
                    "DELETE FROM roster_items WHERE user_jid = \(key) AND contact_jid = \(contactKey) RETURNING contact_jid", logger: logger)
                guard try await Self.count(rows) > 0 else { return nil }
                return try await Self.incrementRosterVersion(connection, key, logger: logger)
            }
        }
    }

    // MARK: Inbound subscription requests

    public func putSubscriptionRequest(of user: JID, from contact: JID, stanza: String) async throws {
        let key = try StorageKeys.account(user)
        let contactKey = try StorageKeys.contact(contact)
        let now = Self.nowMilliseconds()
        try await run("put subscription request") { [self] in
            try await client.withTransaction(logger: logger) { connection in
                guard try await Self.rosterVersion(connection, key, lock: true, logger: logger) != nil else { throw StorageError.userNotFound }
                var seq: Int64 = 1
                for try await next in try await connection.query(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM subscription_requests WHERE user_jid = \(key)", logger: logger).decode(Int64.self) {
                    seq = next
                }
                try await connection.query("""
                    INSERT INTO subscription_requests (user_jid, contact_jid, stanza, stored_at, seq)
                    VALUES (\(key), \(contactKey), \(stanza), \(now), \(seq))
                    ON CONFLICT (user_jid, contact_jid) DO UPDATE SET
                        stanza = excluded.stanza, stored_at = excluded.stored_at, seq = excluded.seq
                    """, logger: logger)
            }
        }
    }

    public func removeSubscriptionRequest(of user: JID, from contact: JID) async throws {
        let key = try StorageKeys.account(user)
        let contactKey = try StorageKeys.contact(contact)
        try await run("remove subscription request") { [self] in
            try await client.query("DELETE FROM subscription_requests WHERE user_jid = \(key) AND contact_jid = \(contactKey)", logger: logger)
        }
    }

    public func subscriptionRequests(of user: JID) async throws -> [StoredStanza] {
        let key = try StorageKeys.account(user)
        return try await run("subscription requests") { [self] in
            var requests: [StoredStanza] = []
            for try await (stanza, storedAt) in try await client.query(
                "SELECT stanza, stored_at FROM subscription_requests WHERE user_jid = \(key) ORDER BY seq", logger: logger).decode((String, Int64).self) {
                requests.append(StoredStanza(stanza: stanza, storedAt: storedAt))
            }
            return requests
        }
    }

    // MARK: Offline messages

    public func storeOfflineMessage(for user: JID, stanza: String, limit: Int) async throws -> Bool {
        let key = try StorageKeys.account(user)
        let now = Self.nowMilliseconds()
        // Count and insert under the account's row lock, so concurrent calls cannot overshoot.
        return try await run("store offline message") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Bool in
                guard try await Self.rosterVersion(connection, key, lock: true, logger: logger) != nil else { throw StorageError.userNotFound }
                var count: Int64 = 0
                for try await value in try await connection.query("SELECT COUNT(*) FROM offline_messages WHERE user_jid = \(key)", logger: logger).decode(Int64.self) {
                    count = value
                }
                guard count < Int64(limit) else { return false }
                try await connection.query("INSERT INTO offline_messages (user_jid, stanza, stored_at) VALUES (\(key), \(stanza), \(now))", logger: logger)
                return true
            }
        }
    }

    public func takeOfflineMessages(for user: JID) async throws -> [StoredStanza] {
        let key = try StorageKeys.account(user)
        return try await run("take offline messages") { [self] in
            // One statement: what it returns is what it deleted.
            var taken: [(Int64, StoredStanza)] = []
            for try await (id, stanza, storedAt) in try await client.query(
                "DELETE FROM offline_messages WHERE user_jid = \(key) RETURNING id, stanza, stored_at", logger: logger).decode((Int64, String, Int64).self) {
                taken.append((id, StoredStanza(stanza: stanza, storedAt: storedAt)))
            }
            return taken.sorted { $0.0 < $1.0 }.map(\.1)
        }
    }

    public func offlineMessageCount(for user: JID) async throws -> Int {
        let key = try StorageKeys.account(user)
        return try await run("offline message count") { [self] in
            for try await count in try await client.query("SELECT COUNT(*) FROM offline_messages WHERE user_jid = \(key)", logger: logger).decode(Int64.self) {
                return Int(count)
            }
            return 0
        }
    }

    // MARK: Group-chat rooms

    public func groupChatRooms() async throws -> [StoredRoom] {
        try await run("group-chat rooms") { [self] in
            var rooms: [StoredRoom] = []
            for try await (jid, parent, configuration, affiliations, createdAt) in try await client.query(
                "SELECT jid, parent_domain, configuration, affiliations, created_at FROM muc_rooms ORDER BY jid", logger: logger)
                .decode((String, String, String, String, Int64).self) {
                rooms.append(StoredRoom(jid: try Self.jid(jid, in: "muc_rooms"), parentDomain: parent, configuration: configuration,
                                        affiliations: affiliations, createdAt: createdAt))
            }
            return rooms
        }
    }

    public func putGroupChatRoom(_ room: StoredRoom) async throws {
        let parent = try StorageKeys.domain(room.parentDomain)
        let jid = room.jid.bare.description
        let (configuration, affiliations, createdAt) = (room.configuration, room.affiliations, room.createdAt)
        try await run("put group-chat room") { [self] in
            try await client.withTransaction(logger: logger) { connection in
                guard try await Self.count(try await connection.query("SELECT 1 FROM domains WHERE name = \(parent) FOR SHARE", logger: logger)) > 0 else {
                    throw StorageError.unknownDomain
                }
                try await connection.query("""
                    INSERT INTO muc_rooms (jid, parent_domain, configuration, affiliations, created_at)
                    VALUES (\(jid), \(parent), \(configuration), \(affiliations), \(createdAt))
                    ON CONFLICT (jid) DO UPDATE SET configuration = excluded.configuration, affiliations = excluded.affiliations
                    """, logger: logger)
            }
        }
    }

    @discardableResult
    public func removeGroupChatRoom(_ jid: JID) async throws -> Bool {
        let key = jid.bare.description
        return try await run("remove group-chat room") { [self] in
            try await Self.count(try await client.query("DELETE FROM muc_rooms WHERE jid = \(key) RETURNING jid", logger: logger)) > 0
        }
    }

    // MARK: Provisioning API

    public func apiTokens() async throws -> [StoredAPIToken] {
        try await run("API tokens") { [self] in
            var tokens: [StoredAPIToken] = []
            for try await (id, hash, scope, label, createdAt, expiresAt) in try await client.query(
                "SELECT id, token_hash, scope, label, created_at, expires_at FROM api_tokens ORDER BY created_at, id", logger: logger)
                .decode((String, String, String?, String, Int64, Int64?).self) {
                tokens.append(StoredAPIToken(id: id, hash: hash, domains: try scope.map { try ProvisioningScope.decode($0) }, label: label,
                                             createdAt: createdAt, expiresAt: expiresAt))
            }
            return tokens
        }
    }

    public func addAPIToken(_ token: StoredAPIToken) async throws {
        let scope = try token.domains.map(ProvisioningScope.encode)
        let (id, hash, label, createdAt, expiresAt) = (token.id, token.hash, token.label, token.createdAt, token.expiresAt)
        let inserted = try await run("add API token") { [self] in
            try await Self.count(try await client.query("""
                INSERT INTO api_tokens (id, token_hash, scope, label, created_at, expires_at)
                VALUES (\(id), \(hash), \(scope), \(label), \(createdAt), \(expiresAt))
                ON CONFLICT DO NOTHING RETURNING 1
                """, logger: logger))
        }
        guard inserted > 0 else { throw StorageError.tokenExists }
    }

    @discardableResult
    public func removeAPIToken(id: String) async throws -> Bool {
        try await run("remove API token") { [self] in
            try await Self.count(try await client.query("DELETE FROM api_tokens WHERE id = \(id) RETURNING id", logger: logger)) > 0
        }
    }

    public func appendAuditEntry(_ entry: AuditEntry) async throws {
        try await run("append audit entry") { [self] in
            try await client.query("""
                INSERT INTO audit_log (at, token_id, action, target, outcome, detail)
                VALUES (\(entry.at), \(entry.tokenID), \(entry.action), \(entry.target), \(entry.outcome), \(entry.detail))
                """, logger: logger)
        }
    }

    public func domainSettings() async throws -> [String: DomainSettings] {
        try await run("domain settings") { [self] in
            var settings: [String: DomainSettings] = [:]
            for try await (domain, services, acme) in try await client.query("SELECT domain, services_json, acme FROM domain_settings", logger: logger)
                .decode((String, String, Int64?).self) {
                settings[domain] = DomainSettings(services: try ProvisioningSQL.decodeServices(services), acme: acme.map { $0 != 0 })
            }
            return settings
        }
    }

    public func setDomainSettings(_ settings: DomainSettings, for domain: String) async throws {
        guard let name = try? StorageKeys.domain(domain) else { throw StorageError.unknownDomain }
        let services = try ProvisioningSQL.encodeServices(settings.services)
        let acme = ProvisioningSQL.encodeACME(settings.acme)
        let known = try await run("set domain settings") { [self] in
            try await client.withTransaction(logger: logger) { connection -> Bool in
                // Locks the domain's row: a concurrent removal waits, or has happened.
                let rows = try await connection.query("SELECT name FROM domains WHERE name = \(name) FOR UPDATE", logger: logger)
                guard try await Self.count(rows) > 0 else { return false }
                if settings.isEmpty {
                    try await connection.query("DELETE FROM domain_settings WHERE domain = \(name)", logger: logger)
                } else {
                    try await connection.query("""
                        INSERT INTO domain_settings (domain, services_json, acme) VALUES (\(name), \(services), \(acme))
                        ON CONFLICT (domain) DO UPDATE SET services_json = excluded.services_json, acme = excluded.acme
                        """, logger: logger)
                }
                try await Self.domainsChanged(connection, logger: logger)
                return true
            }
        }
        guard known else { throw StorageError.unknownDomain }
    }

    public func auditEntries(limit: Int, domain: String?) async throws -> [AuditEntry] {
        let (sql, arguments) = ProvisioningScope.auditQuery(limit: limit, domain: domain, placeholder: { "$\($0)" })
        return try await run("audit entries") { [self] in
            var bindings = PostgresBindings()
            for argument in arguments { bindings.append(argument) }
            var entries: [AuditEntry] = []
            for try await (at, tokenID, action, target, outcome, detail) in try await client.query(PostgresQuery(unsafeSQL: sql, binds: bindings), logger: logger)
                .decode((Int64, String?, String, String, String, String).self) {
                entries.append(AuditEntry(at: at, tokenID: tokenID, action: action, target: target, outcome: outcome, detail: detail))
            }
            return entries
        }
    }

    // MARK: Account stores

    public func storeEntries(_ store: String, of user: JID) async throws -> [StoredEntry] {
        let key = try StorageKeys.account(user)
        return try await run("account store entries") { [self] in
            var entries: [StoredEntry] = []
            for try await (entryKey, value, seq, updatedAt) in try await client.query(
                "SELECT entry_key, value, seq, updated_at FROM account_store WHERE user_jid = \(key) AND store = \(store) ORDER BY seq", logger: logger)
                .decode((String, String, Int64, Int64).self) {
                entries.append(StoredEntry(key: entryKey, value: value, seq: seq, updatedAt: updatedAt))
            }
            return entries
        }
    }

    public func storeEntry(_ store: String, of user: JID, key entryKey: String) async throws -> StoredEntry? {
        let key = try StorageKeys.account(user)
        return try await run("account store entry") { [self] in
            for try await (found, value, seq, updatedAt) in try await client.query(
                "SELECT entry_key, value, seq, updated_at FROM account_store WHERE user_jid = \(key) AND store = \(store) AND entry_key = \(entryKey)",
                logger: logger).decode((String, String, Int64, Int64).self) {
                return StoredEntry(key: found, value: value, seq: seq, updatedAt: updatedAt)
            }
            return nil
        }
    }

    public func putStoreEntry(_ store: String, of user: JID, key entryKey: String, value: String, keepLast: Int?) async throws {
        let key = try StorageKeys.account(user)
        let now = Self.nowMilliseconds()
        let keep = keepLast.map { Int64(max(0, $0)) }
        try await run("put account store entry") { [self] in
            try await client.withTransaction(logger: logger) { connection in
                // The account's row lock serialises writers of its stores (the next seq).
                guard try await Self.rosterVersion(connection, key, lock: true, logger: logger) != nil else { throw StorageError.userNotFound }
                var seq: Int64 = 1
                for try await next in try await connection.query(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM account_store WHERE user_jid = \(key) AND store = \(store)", logger: logger).decode(Int64.self) {
                    seq = next
                }
                try await connection.query("""
                    INSERT INTO account_store (user_jid, store, entry_key, value, seq, updated_at)
                    VALUES (\(key), \(store), \(entryKey), \(value), \(seq), \(now))
                    ON CONFLICT (user_jid, store, entry_key) DO UPDATE SET
                        value = excluded.value, seq = excluded.seq, updated_at = excluded.updated_at
                    """, logger: logger)
                if let keep {
                    try await connection.query("""
                        DELETE FROM account_store WHERE user_jid = \(key) AND store = \(store) AND seq <= (
                            SELECT seq FROM account_store WHERE user_jid = \(key) AND store = \(store) ORDER BY seq DESC LIMIT 1 OFFSET \(keep))
                        """, logger: logger)
                }
            }
        }
    }

    @discardableResult
    public func removeStoreEntry(_ store: String, of user: JID, key entryKey: String) async throws -> Bool {
        let key = try StorageKeys.account(user)
        return try await run("remove account store entry") { [self] in
            try await Self.count(try await client.query(
                "DELETE FROM account_store WHERE user_jid = \(key) AND store = \(store) AND entry_key = \(entryKey) RETURNING entry_key", logger: logger)) > 0
        }
    }

    @discardableResult
    public func removeStore(_ store: String, of user: JID) async throws -> Int {
        let key = try StorageKeys.account(user)
        return try await run("remove account store") { [self] in
            try await Self.count(try await client.query(
                "DELETE FROM account_store WHERE user_jid = \(key) AND store = \(store) RETURNING entry_key", logger: logger))
        }
    }

    // MARK: Message archive

    public func archive(_ message: ArchivedMessage, for user: JID, expireBefore: Int64?, keepLast: Int?) async throws {
        let key = try StorageKeys.account(user)
        let (id, with, stamp, stanza) = (message.id, message.with, message.stamp, message.stanza)
        try await run("archive message") { [self] in
            try await client.withTransaction(logger: logger) { connection in
                guard try await Self.count(try await connection.query("SELECT 1 FROM users WHERE jid = \(key) FOR SHARE", logger: logger)) > 0 else {
                    throw StorageError.userNotFound
                }
                let inserted = try await connection.query("""
                    INSERT INTO archive (user_jid, stanza_id, with_jid, stamp, stanza) VALUES (\(key), \(id), \(with), \(stamp), \(stanza)) RETURNING id
                    """, logger: logger)
                var rowID: Int64 = 1
                for try await (value) in inserted.decode(Int64.self) { rowID = value }
                if let expireBefore {
                    try await connection.query("DELETE FROM archive WHERE user_jid = \(key) AND stamp < \(expireBefore)", logger: logger)
                }
                if let keepLast, rowID % archiveQuotaCheckInterval == 0 {
                    let quota = max(0, keepLast)
                    try await connection.query("""
                        DELETE FROM archive WHERE user_jid = \(key)
                        AND id <= (SELECT id FROM archive WHERE user_jid = \(key) ORDER BY id DESC LIMIT 1 OFFSET \(quota))
                        """, logger: logger)
                }
            }
        }
    }

    public func archivedMessages(_ query: ArchiveQuery, for user: JID) async throws -> ArchivePage {
        try await archivePage(query, table: "archive", ownerColumn: "user_jid", owner: try StorageKeys.account(user))
    }

    public func archiveRoomMessage(_ message: ArchivedMessage, room: JID, parentDomain: String, expireBefore: Int64?) async throws {
        let roomKey = room.bare.description
        let parent = try StorageKeys.domain(parentDomain)
        let (id, with, stamp, stanza) = (message.id, message.with, message.stamp, message.stanza)
        try await run("archive room message") { [self] in
            try await client.withTransaction(logger: logger) { connection in
                guard try await Self.count(try await connection.query("SELECT 1 FROM domains WHERE name = \(parent) FOR SHARE", logger: logger)) > 0 else {
                    throw StorageError.unknownDomain
                }
                try await connection.query("""
                    INSERT INTO room_archive (room_jid, parent_domain, stanza_id, with_jid, stamp, stanza)
                    VALUES (\(roomKey), \(parent), \(id), \(with), \(stamp), \(stanza))
                    """, logger: logger)
                if let expireBefore {
                    try await connection.query("DELETE FROM room_archive WHERE room_jid = \(roomKey) AND stamp < \(expireBefore)", logger: logger)
                }
            }
        }
    }

    public func archivedRoomMessages(_ query: ArchiveQuery, room: JID) async throws -> ArchivePage {
        try await archivePage(query, table: "room_archive", ownerColumn: "room_jid", owner: room.bare.description)
    }

    @discardableResult
    public func removeRoomArchive(_ room: JID) async throws -> Int {
        let roomKey = room.bare.description
        return try await run("remove room archive") { [self] in
            try await Self.count(try await client.query("DELETE FROM room_archive WHERE room_jid = \(roomKey) RETURNING id", logger: logger))
        }
    }

    /// One page of an archive: an account's or a room's (the same queries on two tables).
    private func archivePage(_ query: ArchiveQuery, table: String, ownerColumn: String, owner key: String) async throws -> ArchivePage {
        try await run("archive query") { [self] in
            try await client.withConnection { connection in
                func rowID(_ stanzaID: String) async throws -> Int64 {
                    for try await id in try await connection.query(PostgresQuery(unsafeSQL: "SELECT id FROM \(table) WHERE \(ownerColumn) = $1 AND stanza_id = $2", binds: Self.bindings([key, stanzaID])), logger: logger)
                        .decode(Int64.self) {
                        return id
                    }
                    throw StorageError.itemNotFound
                }
                let afterRow = try await query.after.asyncMap(rowID)
                let beforeRow = try await query.before.asyncMap(rowID)
                var filtered = ArchiveSQL(style: .dollar, table: table, ownerColumn: ownerColumn)
                let filters = filtered.filters(user: key, query: query)
                func count(_ sql: String, _ built: ArchiveSQL) async throws -> Int {
                    for try await total in try await connection.query(Self.statement(sql, built), logger: logger).decode(Int64.self) { return Int(total) }
                    return 0
                }
                let total = try await count("SELECT COUNT(*) FROM \(table) WHERE \(filters)", filtered)
                var page = filtered
                var bounds = ""
                if let afterRow { bounds += " AND id > \(page.bind(.integer(afterRow)))" }
                if let beforeRow { bounds += " AND id < \(page.bind(.integer(beforeRow)))" }
                let limit = max(0, query.limit)
                let sql = """
                    SELECT id, stanza_id, with_jid, stamp, stanza FROM \(table) WHERE \(filters)\(bounds)
                    ORDER BY id \(query.backwards ? "DESC" : "ASC") LIMIT \(page.bind(.integer(Int64(limit + 1))))
                    """
                var rows: [(Int64, ArchivedMessage)] = []
                for try await (id, stanzaID, with, stamp, stanza) in try await connection.query(Self.statement(sql, page), logger: logger)
                    .decode((Int64, String, String, Int64, String).self) {
                    rows.append((id, ArchivedMessage(id: stanzaID, with: with, stamp: stamp, stanza: stanza)))
                }
                let complete = rows.count <= limit
                var kept = Array(rows.prefix(limit))
                if query.backwards { kept.reverse() }
                var firstIndex = 0
                if let first = kept.first?.0 {
                    var before = filtered
                    let clause = "\(filters) AND id < \(before.bind(.integer(first)))"
                    firstIndex = try await count("SELECT COUNT(*) FROM \(table) WHERE \(clause)", before)
                }
                return ArchivePage(messages: kept.map(\.1), complete: complete, count: total, firstIndex: firstIndex)
            }
        }
    }

    private static func bindings(_ texts: [String]) -> PostgresBindings {
        var bindings = PostgresBindings()
        for text in texts { bindings.append(text) }
        return bindings
    }

    private static func statement(_ sql: String, _ built: ArchiveSQL) -> PostgresQuery {
        var bindings = PostgresBindings()
        for parameter in built.parameters {
            switch parameter {
            case .text(let text): bindings.append(text)
            case .integer(let number): bindings.append(number)
            }
        }
        return PostgresQuery(unsafeSQL: sql, binds: bindings)
    }

    // MARK: Helpers

    /// Runs one operation after ``prepare()``, turning the driver's errors into
    /// ``PostgresStorageError`` with what the server said (postgres-nio's own description
    /// hides it).
    private func run<Result: Sendable>(_ operation: String, _ body: @escaping @Sendable () async throws -> Result) async throws -> Result {
        if !prepared.load(ordering: .acquiring) { try await prepare() }
        do {
            // Bounded: with the database gone, a call fails (the client gets
            // internal-server-error) instead of holding the caller for minutes.
            return try await withDeadline(settings.operationTimeout, body)
        } catch is DeadlineExceeded {
            logger.error("database operation timed out", metadata: ["operation": "\(operation)", "timeout": "\(settings.operationTimeout)"])
            throw PostgresStorageError.failed(operation, "no answer within \(settings.operationTimeout)")
        } catch let error as StorageError {
            throw error
        } catch let error as PostgresStorageError {
            throw error
        } catch let error as PostgresTransactionError where error.closureError is StorageError || error.closureError is PostgresStorageError {
            // Our own refusal inside a transaction (rolled back): what the caller acts on.
            throw error.closureError ?? error
        } catch {
            let described = Self.describe(error)
            logger.error("database operation failed", metadata: ["operation": "\(operation)", "error": "\(described)"])
            throw PostgresStorageError.failed(operation, described)
        }
    }

    /// What the server said, without the query text or binds.
    static func describe(_ error: any Error) -> String {
        if let transaction = error as? PostgresTransactionError {
            let inner = [transaction.beginError, transaction.closureError, transaction.commitError].compactMap { $0 }.first
            return inner.map(describe) ?? "\(transaction)"
        }
        guard let error = error as? PSQLError else { return "\(error)" }
        var parts = ["\(error.code)"]
        if let message = error.serverInfo?[.message] { parts.append(message) }
        if let state = error.serverInfo?[.sqlState] { parts.append("SQLSTATE \(state)") }
        if let underlying = error.underlying { parts.append("\(underlying)") }
        return parts.joined(separator: ": ")
    }

    private static func count(_ rows: PostgresRowSequence) async throws -> Int {
        var count = 0
        for try await _ in rows { count += 1 }
        return count
    }

    private static func rosterVersion(_ connection: PostgresConnection, _ key: String, lock: Bool, logger: Logger) async throws -> Int64? {
        let rows = lock
            ? try await connection.query("SELECT roster_version FROM users WHERE jid = \(key) FOR UPDATE", logger: logger)
            : try await connection.query("SELECT roster_version FROM users WHERE jid = \(key)", logger: logger)
        for try await version in rows.decode(Int64.self) { return version }
        return nil
    }

    private static func incrementRosterVersion(_ connection: PostgresConnection, _ key: String, logger: Logger) async throws -> Int64 {
        for try await version in try await connection.query(
            "UPDATE users SET roster_version = roster_version + 1 WHERE jid = \(key) RETURNING roster_version", logger: logger).decode(Int64.self) {
            return version
        }
        throw StorageError.userNotFound
    }

    private typealias RosterRow = (String, String?, String, Bool, Bool, Bool, String)

    private static func rosterItem(_ connection: PostgresConnection, _ key: String, _ contactKey: String, logger: Logger) async throws -> RosterItem? {
        for try await row in try await connection.query("""
            SELECT contact_jid, name, subscription, pending_out, pending_in, approved, groups_json
            FROM roster_items WHERE user_jid = \(key) AND contact_jid = \(contactKey)
            """, logger: logger).decode(RosterRow.self) {
            return try rosterItem(row)
        }
        return nil
    }

    private static func rosterItem(_ client: PostgresClient, _ key: String, _ contactKey: String, logger: Logger) async throws -> RosterItem? {
        try await client.withConnection { connection in try await rosterItem(connection, key, contactKey, logger: logger) }
    }

    private static func rosterItem(_ row: RosterRow) throws -> RosterItem {
        guard let subscription = Subscription(rawValue: row.2) else {
            throw PostgresStorageError.corruptRow(table: "roster_items", detail: "unknown subscription \(row.2)")
        }
        return RosterItem(jid: try jid(row.0, in: "roster_items"), name: row.1, subscription: subscription,
                          pendingOut: row.3, pendingIn: row.4, approved: row.5, groups: try decodeGroups(row.6))
    }

    private static func scram(_ salt: Data, _ iterations: Int64, _ storedKey: Data, _ serverKey: Data, prefix: String) throws -> ScramCredentials {
        guard let count = Int(exactly: iterations), count > 0 else {
            throw PostgresStorageError.corruptRow(table: "users", detail: "\(prefix)_iterations is \(iterations)")
        }
        return ScramCredentials(salt: [UInt8](salt), iterations: count, storedKey: [UInt8](storedKey), serverKey: [UInt8](serverKey))
    }

    private static func jid(_ text: String, in table: String) throws -> JID {
        do {
            return try JID(text)
        } catch {
            throw PostgresStorageError.corruptRow(table: table, detail: "\(text) is not a JID (\(error))")
        }
    }

    private static func encodeGroups(_ groups: [String]) throws -> String {
        try RosterGroupsColumn.encode(groups)
    }

    private static func decodeGroups(_ json: String) throws -> [String] {
        guard let groups = RosterGroupsColumn.decode(json) else {
            throw PostgresStorageError.corruptRow(table: "roster_items", detail: "groups_json is not a JSON array of strings")
        }
        return groups
    }

    private static func nowSeconds() -> Int64 {
        Int64(Date().timeIntervalSince1970.rounded(.down))
    }

    private static func nowMilliseconds() -> Int64 {
        Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
    }
}

/// Failures specific to the PostgreSQL backend, beyond ``StorageError``.
public enum PostgresStorageError: Error, Sendable, Hashable, CustomStringConvertible {
    /// No connection could be made (wrong address, server down, authentication refused).
    case unreachable(String, String)
    /// The database was written by a newer version of Braid, with migrations this one lacks.
    case schemaTooNew(applied: [String])
    /// A stored row does not hold what the schema promises.
    case corruptRow(table: String, detail: String)
    /// An operation failed on the server or the connection (a full disk, a restart).
    case failed(String, String)

    public var description: String {
        switch self {
        case .unreachable(let database, let reason):
            "cannot use PostgreSQL at \(database): \(reason)"
        case .schemaTooNew(let applied):
            "database schema is newer than this version of Braid understands (migrations: \(applied.joined(separator: ", ")))"
        case .corruptRow(let table, let detail):
            "corrupt row in \(table): \(detail)"
        case .failed(let operation, let reason):
            "database operation \(operation) failed: \(reason)"
        }
    }
}
