import Foundation
import GRDB
import Logging
import XMPPCore

/// ``Storage`` in one SQLite file, through GRDB.
///
/// The file may be shared with other processes (the `braid domain` commands write to it
/// while the server runs): SQLite's file locks serialise the writers, WAL mode lets readers
/// go on meanwhile, and every read starts a fresh transaction, so changes committed by
/// another process are seen by the next call.
///
/// Conventions for calls about a user that has no account: reads return nothing (an empty
/// roster at version 0, no item, no requests, no messages); calls that would store
/// something for the user throw ``StorageError/userNotFound``.
///
/// Sendable without `@unchecked`: its only stored properties are immutable and Sendable
/// (GRDB's `DatabasePool` is thread-safe and declared Sendable).
public final class SQLiteStorage: Storage {
    /// Internal rather than private only so that the test hooks in SQLiteStorage+Testing.swift
    /// can reach it.
    let pool: DatabasePool
    private let logger: Logger
    /// The database file, as given.
    public let path: String
    /// Archive appends from many sessions share a transaction (group commit): one fsync for
    /// a batch instead of one each, every caller still answered after its row is committed.
    private let archiveAppends: CommitBatcher<ArchiveAppend>

    struct ArchiveAppend: Sendable {
        var key: String
        var message: ArchivedMessage
        var expireBefore: Int64?
        var keepLast: Int?
    }

    private typealias SQL = SQLiteStatements

    /// Opens the database at `path`, creating the file if needed, and brings its schema up
    /// to date. The directory must exist already.
    public init(path: String, logger: Logger = Logger(label: "braid.storage")) throws {
        self.path = path
        self.logger = logger

        // SQLite only says "unable to open database file" when the directory is missing;
        // say what is wrong.
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw SQLiteStorageError.directoryNotFound(directory)
        }

        var configuration = Configuration()
        configuration.foreignKeysEnabled = true
        // Another process (the CLI) may hold the write lock for a moment: wait for it rather
        // than fail at once.
        configuration.busyMode = .timeout(5)
        configuration.label = "braid.storage"
        // DatabasePool always uses WAL mode. With synchronous=NORMAL a WAL commit is not
        // fsynced, so it survives a killed process but can be rolled back by a power cut or
        // OS crash. A server acknowledges what it stored (a roster push, a message accepted
        // for offline delivery), so every commit must be on disk before the call returns:
        // FULL fsyncs the WAL at each commit (and around checkpoints, which any connection,
        // reader or writer, may run).
        configuration.prepareDatabase { db in
            try db.execute(sql: SQL.fullSynchronous)
        }
        let pool = try Self.openPool(path: path, configuration: configuration)
        self.pool = pool
        archiveAppends = CommitBatcher { appends in
            do {
                return try await pool.write { db in
                    // Each append in a savepoint of its own: one that fails (no such account)
                    // leaves the others in the transaction.
                    appends.map { append -> (any Error)? in
                        do {
                            try db.inSavepoint {
                                try Self.archive(append, db)
                                return .commit
                            }
                            return nil
                        } catch {
                            return error
                        }
                    }
                }
            } catch {
                return appends.map { _ in error }
            }
        }
        // GRDB sets synchronous=NORMAL on the writer when it switches the file to WAL,
        // after prepareDatabase ran; the writer connection lives as long as the pool, so
        // setting it back once is enough.
        try pool.writeWithoutTransaction { db in
            try db.execute(sql: SQL.fullSynchronous)
        }

        logger.info("Opened database", metadata: ["path": "\(path)"])
        try Self.migrate(pool, logger: logger, path: path)
    }

    /// Opens the pool, which switches a new file to WAL. SQLite answers that switch with
    /// SQLITE_BUSY at once, without its busy handler, when another process (the server and
    /// the CLI, both first to open a new file) is switching it at the same moment: retried
    /// for up to five seconds, as the busy timeout would have waited.
    private static func openPool(path: String, configuration: Configuration) throws -> DatabasePool {
        let deadline = Date().addingTimeInterval(5)
        while true {
            do {
                return try DatabasePool(path: path, configuration: configuration)
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY && Date() < deadline {
                Thread.sleep(forTimeInterval: 0.02)
            }
        }
    }

    private static func migrate(_ pool: DatabasePool, logger: Logger, path: String) throws {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            for statement in SQL.schemaV1 {
                try db.execute(sql: statement)
            }
        }
        migrator.registerMigration("v2") { db in
            for statement in SQL.schemaV2 {
                try db.execute(sql: statement)
            }
        }
        migrator.registerMigration("v3") { db in
            for statement in SQL.schemaV3 {
                try db.execute(sql: statement)
            }
        }
        migrator.registerMigration("v4") { db in
            for statement in ArchiveSQL.schemaV4 {
                try db.execute(sql: statement)
            }
        }
        migrator.registerMigration("v5") { db in
            for statement in ArchiveSQL.schemaV5 {
                try db.execute(sql: statement)
            }
        }
        migrator.registerMigration("v6") { db in
            for statement in ProvisioningSQL.schemaV6 {
                try db.execute(sql: statement)
            }
        }
        migrator.registerMigration("v7") { db in
            for statement in ProvisioningSQL.schemaV7 {
                try db.execute(sql: statement)
            }
        }
        let before = try pool.read { db in try migrator.appliedIdentifiers(db) }
        // A file written by a newer Braid has migrations this one does not know; running
        // on it could corrupt data it does not understand.
        if try pool.read({ db in try migrator.hasBeenSuperseded(db) }) {
            throw SQLiteStorageError.schemaTooNew(applied: before.sorted())
        }
        // Another process opening the same new file can apply a migration between GRDB's
        // check and its own attempt, which then fails on CREATE TABLE. That is fine once the
        // schema is complete; while the other opener is still part-way (v2 of five done), try
        // again shortly: the next attempt skips what it applied. Bounded: 5 s.
        var attempts = 0
        while true {
            do {
                try migrator.migrate(pool)
                break
            } catch {
                if try pool.read({ db in try migrator.hasCompletedMigrations(db) }) {
                    logger.debug("Migrations were applied concurrently by another connection", metadata: ["path": "\(path)", "error": "\(error)"])
                    break
                }
                attempts += 1
                guard attempts < 100 else { throw error }
                usleep(50_000)
            }
        }
        let after = try pool.read { db in try migrator.appliedMigrations(db) }
        let applied = after.filter { !before.contains($0) }
        if applied.isEmpty {
            logger.debug("Database schema up to date", metadata: ["path": "\(path)", "migrations": "\(after)"])
        } else {
            logger.info("Applied database migrations", metadata: ["path": "\(path)", "applied": "\(applied)"])
        }
    }

    // MARK: Hosted domains

    public func domains() async throws -> [HostedDomain] {
        let domains = try await pool.read { db in
            try Row.fetchAll(db, sql: SQL.selectDomains).map { row in
                HostedDomain(
                    name: try Self.column(row, "name", in: "domains"),
                    addedAt: try Self.column(row, "added_at", in: "domains"))
            }
        }
        return domains.sorted { $0.name < $1.name }
    }

    @discardableResult
    public func addDomain(_ name: String) async throws -> Bool {
        let name = try JID(domain: name).domainpart
        let now = Self.nowSeconds()
        let added = try await pool.write { db in
            try db.execute(sql: SQL.insertDomain, arguments: [name, now])
            guard db.changesCount > 0 else { return false }
            try db.execute(sql: SQL.incrementMeta, arguments: [SQL.domainsGenerationKey])
            return true
        }
        if added { logger.info("Added hosted domain", metadata: ["domain": "\(name)"]) }
        return added
    }

    @discardableResult
    public func addDomains(_ names: [String]) async throws -> Int {
        // Validate everything first, so a bad name adds nothing.
        let prepared = try names.map { try JID(domain: $0).domainpart }
        let now = Self.nowSeconds()
        let added = try await pool.write { db in
            var added = 0
            for name in prepared {
                try db.execute(sql: SQL.insertDomain, arguments: [name, now])
                added += db.changesCount
            }
            if added > 0 { try db.execute(sql: SQL.incrementMeta, arguments: [SQL.domainsGenerationKey]) }
            return added
        }
        if added > 0 { logger.info("Added hosted domains", metadata: ["count": "\(added)"]) }
        return added
    }

    @discardableResult
    public func removeDomain(_ name: String) async throws -> Bool {
        // A name that is not a valid domain cannot be hosted.
        guard let name = try? JID(domain: name).domainpart else { return false }
        let removed = try await pool.write { db in
            try db.execute(sql: SQL.deleteDomain, arguments: [name])
            guard db.changesCount > 0 else { return false }
            try db.execute(sql: SQL.incrementMeta, arguments: [SQL.domainsGenerationKey])
            return true
        }
        if removed { logger.info("Removed hosted domain", metadata: ["domain": "\(name)"]) }
        return removed
    }

    public func domainsGeneration() async throws -> Int64 {
        try await pool.read { db in
            guard let row = try Row.fetchOne(db, sql: SQL.selectMeta, arguments: [SQL.domainsGenerationKey]) else {
                throw SQLiteStorageError.corruptRow(table: "meta", detail: "no \(SQL.domainsGenerationKey) row")
            }
            return try Self.column(row, "value", in: "meta")
        }
    }

    // MARK: Accounts

    public func createUser(_ user: JID, credentials: StoredCredentials) async throws {
        let key = try Self.accountKey(user)
        let domain = user.domainpart
        let now = Self.nowSeconds()
        var arguments: StatementArguments = [key, domain]
        arguments += Self.credentialArguments(credentials)
        arguments += [now]
        try await pool.write { [arguments] db in
            guard try Row.fetchOne(db, sql: SQL.domainExists, arguments: [domain]) != nil else {
                throw StorageError.unknownDomain
            }
            try db.execute(sql: SQL.insertUser, arguments: arguments)
            guard db.changesCount > 0 else { throw StorageError.userExists }
        }
        logger.debug("Created account", metadata: ["user": "\(key)"])
    }

    public func setCredentials(_ user: JID, credentials: StoredCredentials) async throws {
        let key = try Self.accountKey(user)
        var arguments = Self.credentialArguments(credentials)
        arguments += [key]
        try await pool.write { [arguments] db in
            try db.execute(sql: SQL.updateCredentials, arguments: arguments)
            guard db.changesCount > 0 else { throw StorageError.userNotFound }
        }
    }

    @discardableResult
    public func removeUser(_ user: JID) async throws -> Bool {
        let key = try Self.accountKey(user)
        // The foreign keys cascade to the roster, requests and offline messages.
        let removed = try await pool.write { db in
            try db.execute(sql: SQL.deleteUser, arguments: [key])
            return db.changesCount > 0
        }
        if removed { logger.debug("Removed account", metadata: ["user": "\(key)"]) }
        return removed
    }

    public func credentials(for user: JID) async throws -> StoredCredentials? {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            guard let row = try Row.fetchOne(db, sql: SQL.selectCredentials, arguments: [key]) else { return nil }
            return StoredCredentials(
                sha1: try Self.scram(row, prefix: "sha1"),
                sha256: try Self.scram(row, prefix: "sha256"))
        }
    }

    public func userExists(_ user: JID) async throws -> Bool {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            try Row.fetchOne(db, sql: SQL.userExists, arguments: [key]) != nil
        }
    }

    public func users(in domain: String) async throws -> [JID] {
        guard let domain = try? JID(domain: domain).domainpart else { return [] }
        let users = try await pool.read { db in
            try Row.fetchAll(db, sql: SQL.selectUsersInDomain, arguments: [domain]).map { row in
                try Self.jidColumn(row, "jid", in: "users")
            }
        }
        return users.sorted()
    }

    // MARK: Rosters

    public func roster(of user: JID) async throws -> Roster {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            guard let version = try Self.rosterVersion(db, key) else { return Roster(version: 0, items: []) }
            let items = try Row.fetchAll(db, sql: SQL.selectRosterItems, arguments: [key]).map(Self.rosterItem)
            return Roster(version: version, items: items)
        }
    }

    public func rosterItem(of user: JID, contact: JID) async throws -> RosterItem? {
        let key = try Self.accountKey(user)
        let contactKey = try Self.contactKey(contact)
        return try await pool.read { db in
            try Row.fetchOne(db, sql: SQL.selectRosterItem, arguments: [key, contactKey]).map(Self.rosterItem)
        }
    }

    @discardableResult
    public func putRosterItem(_ item: RosterItem, of user: JID) async throws -> Int64 {
        let key = try Self.accountKey(user)
        let contactKey = try Self.contactKey(item.jid)
        let groups = try Self.encodeGroups(item.groups)
        return try await pool.write { db in
            guard let version = try Self.rosterVersion(db, key) else { throw StorageError.userNotFound }
            // RFC 6121 §2.6: the version changes only when the roster does.
            if let row = try Row.fetchOne(db, sql: SQL.selectRosterItem, arguments: [key, contactKey]),
               try Self.rosterItem(row) == item {
                return version
            }
            try db.execute(sql: SQL.upsertRosterItem, arguments: [
                key, contactKey, item.name, item.subscription.rawValue,
                item.pendingOut, item.pendingIn, item.approved, groups,
            ])
            return try Self.incrementRosterVersion(db, key, from: version)
        }
    }

    @discardableResult
    public func removeRosterItem(of user: JID, contact: JID) async throws -> Int64? {
        let key = try Self.accountKey(user)
        let contactKey = try Self.contactKey(contact)
        return try await pool.write { db in
            guard let version = try Self.rosterVersion(db, key) else { return nil }
            try db.execute(sql: SQL.deleteRosterItem, arguments: [key, contactKey])
            guard db.changesCount > 0 else { return nil }
            return try Self.incrementRosterVersion(db, key, from: version)
        }
    }

    // MARK: Inbound subscription requests

    public func putSubscriptionRequest(of user: JID, from contact: JID, stanza: String) async throws {
        let key = try Self.accountKey(user)
        let contactKey = try Self.contactKey(contact)
        let now = Self.nowMilliseconds()
        try await pool.write { db in
            guard try Row.fetchOne(db, sql: SQL.userExists, arguments: [key]) != nil else {
                throw StorageError.userNotFound
            }
            guard let seqRow = try Row.fetchOne(db, sql: SQL.nextSubscriptionRequestSeq, arguments: [key]) else {
                throw SQLiteStorageError.corruptRow(table: "subscription_requests", detail: "no next sequence number")
            }
            let seq: Int64 = try Self.column(seqRow, atIndex: 0, in: "subscription_requests")
            try db.execute(sql: SQL.upsertSubscriptionRequest, arguments: [key, contactKey, stanza, now, seq])
        }
    }

    public func removeSubscriptionRequest(of user: JID, from contact: JID) async throws {
        let key = try Self.accountKey(user)
        let contactKey = try Self.contactKey(contact)
        try await pool.write { db in
            try db.execute(sql: SQL.deleteSubscriptionRequest, arguments: [key, contactKey])
        }
    }

    public func subscriptionRequests(of user: JID) async throws -> [StoredStanza] {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            try Row.fetchAll(db, sql: SQL.selectSubscriptionRequests, arguments: [key]).map { row in
                try Self.storedStanza(row, in: "subscription_requests")
            }
        }
    }

    // MARK: Offline messages

    public func storeOfflineMessage(for user: JID, stanza: String, limit: Int) async throws -> Bool {
        let key = try Self.accountKey(user)
        let now = Self.nowMilliseconds()
        // Count and insert in one write transaction, so concurrent calls cannot overshoot.
        return try await pool.write { db in
            guard try Row.fetchOne(db, sql: SQL.userExists, arguments: [key]) != nil else {
                throw StorageError.userNotFound
            }
            guard let countRow = try Row.fetchOne(db, sql: SQL.countOfflineMessages, arguments: [key]) else {
                throw SQLiteStorageError.corruptRow(table: "offline_messages", detail: "no count")
            }
            let count: Int = try Self.column(countRow, atIndex: 0, in: "offline_messages")
            guard count < limit else { return false }
            try db.execute(sql: SQL.insertOfflineMessage, arguments: [key, stanza, now])
            return true
        }
    }

    public func takeOfflineMessages(for user: JID) async throws -> [StoredStanza] {
        let key = try Self.accountKey(user)
        return try await pool.write { db in
            let messages = try Row.fetchAll(db, sql: SQL.selectOfflineMessages, arguments: [key]).map { row in
                try Self.storedStanza(row, in: "offline_messages")
            }
            if !messages.isEmpty {
                try db.execute(sql: SQL.deleteOfflineMessages, arguments: [key])
            }
            return messages
        }
    }

    public func offlineMessageCount(for user: JID) async throws -> Int {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            guard let row = try Row.fetchOne(db, sql: SQL.countOfflineMessages, arguments: [key]) else { return 0 }
            return try Self.column(row, atIndex: 0, in: "offline_messages")
        }
    }

    // MARK: Group-chat rooms

    public func groupChatRooms() async throws -> [StoredRoom] {
        try await pool.read { db in
            try Row.fetchAll(db, sql: "SELECT jid, parent_domain, configuration, affiliations, created_at FROM muc_rooms ORDER BY jid").map { row in
                StoredRoom(jid: try Self.jidColumn(row, "jid", in: "muc_rooms"), parentDomain: try Self.column(row, "parent_domain", in: "muc_rooms"),
                           configuration: try Self.column(row, "configuration", in: "muc_rooms"),
                           affiliations: try Self.column(row, "affiliations", in: "muc_rooms"), createdAt: try Self.column(row, "created_at", in: "muc_rooms"))
            }
        }
    }

    public func putGroupChatRoom(_ room: StoredRoom) async throws {
        let parent = try StorageKeys.domain(room.parentDomain)
        try await pool.write { db in
            guard try Row.fetchOne(db, sql: SQL.domainExists, arguments: [parent]) != nil else { throw StorageError.unknownDomain }
            try db.execute(sql: """
                INSERT INTO muc_rooms (jid, parent_domain, configuration, affiliations, created_at) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (jid) DO UPDATE SET configuration = excluded.configuration, affiliations = excluded.affiliations
                """, arguments: [room.jid.bare.description, parent, room.configuration, room.affiliations, room.createdAt])
        }
    }

    @discardableResult
    public func removeGroupChatRoom(_ jid: JID) async throws -> Bool {
        try await pool.write { db in
            try db.execute(sql: "DELETE FROM muc_rooms WHERE jid = ?", arguments: [jid.bare.description])
            return db.changesCount > 0
        }
    }

    // MARK: Provisioning API

    public func apiTokens() async throws -> [StoredAPIToken] {
        try await pool.read { db in
            try Row.fetchAll(db, sql: "SELECT id, token_hash, scope, label, created_at, expires_at FROM api_tokens ORDER BY created_at, id").map { row in
                let scope: String? = row["scope"]
                return StoredAPIToken(id: try Self.column(row, "id", in: "api_tokens"), hash: try Self.column(row, "token_hash", in: "api_tokens"),
                                      domains: try scope.map { try ProvisioningScope.decode($0) }, label: try Self.column(row, "label", in: "api_tokens"),
                                      createdAt: try Self.column(row, "created_at", in: "api_tokens"), expiresAt: row["expires_at"])
            }
        }
    }

    public func addAPIToken(_ token: StoredAPIToken) async throws {
        let scope = try token.domains.map(ProvisioningScope.encode)
        try await pool.write { db in
            try db.execute(sql: "INSERT INTO api_tokens (id, token_hash, scope, label, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           arguments: [token.id, token.hash, scope, token.label, token.createdAt, token.expiresAt])
            guard db.changesCount > 0 else { throw StorageError.tokenExists }
        }
    }

    @discardableResult
    public func removeAPIToken(id: String) async throws -> Bool {
        try await pool.write { db in
            try db.execute(sql: "DELETE FROM api_tokens WHERE id = ?", arguments: [id])
            return db.changesCount > 0
        }
    }

    public func appendAuditEntry(_ entry: AuditEntry) async throws {
        try await pool.write { db in
            try db.execute(sql: "INSERT INTO audit_log (at, token_id, action, target, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
                           arguments: [entry.at, entry.tokenID, entry.action, entry.target, entry.outcome, entry.detail])
        }
    }

    public func auditEntries(limit: Int, domain: String?) async throws -> [AuditEntry] {
        let (sql, arguments) = ProvisioningScope.auditQuery(limit: limit, domain: domain, placeholder: { _ in "?" })
        return try await pool.read { db in
            try Row.fetchAll(db, sql: sql, arguments: StatementArguments(arguments.map { $0 as any DatabaseValueConvertible })).map { row in
                AuditEntry(at: try Self.column(row, "at", in: "audit_log"), tokenID: row["token_id"], action: try Self.column(row, "action", in: "audit_log"),
                           target: try Self.column(row, "target", in: "audit_log"), outcome: try Self.column(row, "outcome", in: "audit_log"),
                           detail: try Self.column(row, "detail", in: "audit_log"))
            }
        }
    }

    public func domainSettings() async throws -> [String: DomainSettings] {
        try await pool.read { db in
            var settings: [String: DomainSettings] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT domain, services_json, acme FROM domain_settings") {
                let acme: Int64? = row["acme"]
                settings[try Self.column(row, "domain", in: "domain_settings")] = DomainSettings(
                    services: try ProvisioningSQL.decodeServices(try Self.column(row, "services_json", in: "domain_settings")), acme: acme.map { $0 != 0 })
            }
            return settings
        }
    }

    public func setDomainSettings(_ settings: DomainSettings, for domain: String) async throws {
        guard let name = try? JID(domain: domain).domainpart else { throw StorageError.unknownDomain }
        let services = try ProvisioningSQL.encodeServices(settings.services)
        try await pool.write { db in
            guard try Row.fetchOne(db, sql: "SELECT 1 FROM domains WHERE name = ?", arguments: [name]) != nil else {
                throw StorageError.unknownDomain
            }
            if settings.isEmpty {
                try db.execute(sql: "DELETE FROM domain_settings WHERE domain = ?", arguments: [name])
            } else {
                try db.execute(sql: """
                    INSERT INTO domain_settings (domain, services_json, acme) VALUES (?, ?, ?)
                    ON CONFLICT (domain) DO UPDATE SET services_json = excluded.services_json, acme = excluded.acme
                    """, arguments: [name, services, ProvisioningSQL.encodeACME(settings.acme)])
            }
            try db.execute(sql: SQL.incrementMeta, arguments: [SQL.domainsGenerationKey])
        }
    }

    // MARK: Account stores

    public func storeEntries(_ store: String, of user: JID) async throws -> [StoredEntry] {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            try Row.fetchAll(db, sql: SQL.selectStoreEntries, arguments: [key, store]).map(Self.storedEntry)
        }
    }

    public func storeEntry(_ store: String, of user: JID, key entryKey: String) async throws -> StoredEntry? {
        let key = try Self.accountKey(user)
        return try await pool.read { db in
            try Row.fetchOne(db, sql: SQL.selectStoreEntry, arguments: [key, store, entryKey]).map(Self.storedEntry)
        }
    }

    public func putStoreEntry(_ store: String, of user: JID, key entryKey: String, value: String, keepLast: Int?) async throws {
        let key = try Self.accountKey(user)
        let now = Self.nowMilliseconds()
        try await pool.write { db in
            guard try Row.fetchOne(db, sql: SQL.userExists, arguments: [key]) != nil else { throw StorageError.userNotFound }
            guard let seqRow = try Row.fetchOne(db, sql: SQL.nextStoreSeq, arguments: [key, store]) else {
                throw SQLiteStorageError.corruptRow(table: "account_store", detail: "no next sequence number")
            }
            let seq: Int64 = try Self.column(seqRow, atIndex: 0, in: "account_store")
            try db.execute(sql: SQL.upsertStoreEntry, arguments: [key, store, entryKey, value, seq, now])
            if let keepLast {
                try db.execute(sql: SQL.trimStore, arguments: [key, store, key, store, max(0, keepLast)])
            }
        }
    }

    @discardableResult
    public func removeStoreEntry(_ store: String, of user: JID, key entryKey: String) async throws -> Bool {
        let key = try Self.accountKey(user)
        return try await pool.write { db in
            try db.execute(sql: SQL.deleteStoreEntry, arguments: [key, store, entryKey])
            return db.changesCount > 0
        }
    }

    @discardableResult
    public func removeStore(_ store: String, of user: JID) async throws -> Int {
        let key = try Self.accountKey(user)
        return try await pool.write { db in
            try db.execute(sql: SQL.deleteStore, arguments: [key, store])
            return db.changesCount
        }
    }

    private static func storedEntry(_ row: Row) throws -> StoredEntry {
        StoredEntry(key: try column(row, "entry_key", in: "account_store"), value: try column(row, "value", in: "account_store"),
                    seq: try column(row, "seq", in: "account_store"), updatedAt: try column(row, "updated_at", in: "account_store"))
    }

    // MARK: Message archive

    public func archive(_ message: ArchivedMessage, for user: JID, expireBefore: Int64?, keepLast: Int?) async throws {
        let key = try Self.accountKey(user)
        try await archiveAppends.submit(ArchiveAppend(key: key, message: message, expireBefore: expireBefore, keepLast: keepLast))
    }

    private static func archive(_ append: ArchiveAppend, _ db: Database) throws {
        let (key, message) = (append.key, append.message)
        guard try Row.fetchOne(db, sql: SQL.userExists, arguments: [key]) != nil else { throw StorageError.userNotFound }
        try db.execute(sql: "INSERT INTO archive (user_jid, stanza_id, with_jid, stamp, stanza) VALUES (?, ?, ?, ?, ?)",
                       arguments: [key, message.id, message.with, message.stamp, message.stanza])
        if let expireBefore = append.expireBefore {
            try db.execute(sql: "DELETE FROM archive WHERE user_jid = ? AND stamp < ?", arguments: [key, expireBefore])
        }
        if let keepLast = append.keepLast, db.lastInsertedRowID % archiveQuotaCheckInterval == 0 {
            try db.execute(sql: ArchiveSQL.trimToQuota, arguments: [key, key, max(0, keepLast)])
        }
    }

    public func archivedMessages(_ query: ArchiveQuery, for user: JID) async throws -> ArchivePage {
        try await archivePage(query, table: "archive", ownerColumn: "user_jid", owner: try Self.accountKey(user))
    }

    public func archiveRoomMessage(_ message: ArchivedMessage, room: JID, parentDomain: String, expireBefore: Int64?) async throws {
        let roomKey = room.bare.description
        let parent = try StorageKeys.domain(parentDomain)
        try await pool.write { db in
            guard try Row.fetchOne(db, sql: SQL.domainExists, arguments: [parent]) != nil else { throw StorageError.unknownDomain }
            try db.execute(sql: "INSERT INTO room_archive (room_jid, parent_domain, stanza_id, with_jid, stamp, stanza) VALUES (?, ?, ?, ?, ?, ?)",
                           arguments: [roomKey, parent, message.id, message.with, message.stamp, message.stanza])
            if let expireBefore {
                try db.execute(sql: "DELETE FROM room_archive WHERE room_jid = ? AND stamp < ?", arguments: [roomKey, expireBefore])
            }
        }
    }

    public func archivedRoomMessages(_ query: ArchiveQuery, room: JID) async throws -> ArchivePage {
        try await archivePage(query, table: "room_archive", ownerColumn: "room_jid", owner: room.bare.description)
    }

    @discardableResult
    public func removeRoomArchive(_ room: JID) async throws -> Int {
        let roomKey = room.bare.description
        return try await pool.write { db in
            try db.execute(sql: "DELETE FROM room_archive WHERE room_jid = ?", arguments: [roomKey])
            return db.changesCount
        }
    }

    /// One page of an archive: an account's or a room's (the same queries on two tables).
    private func archivePage(_ query: ArchiveQuery, table: String, ownerColumn: String, owner key: String) async throws -> ArchivePage {
        try await pool.read { db in
            func rowID(_ stanzaID: String) throws -> Int64 {
                guard let row = try Row.fetchOne(db, sql: "SELECT id FROM \(table) WHERE \(ownerColumn) = ? AND stanza_id = ?", arguments: [key, stanzaID]) else {
                    throw StorageError.itemNotFound
                }
                return try Self.column(row, atIndex: 0, in: "archive")
            }
            let afterRow = try query.after.map(rowID)
            let beforeRow = try query.before.map(rowID)
            var filtered = ArchiveSQL(style: .question, table: table, ownerColumn: ownerColumn)
            let filters = filtered.filters(user: key, query: query)
            let count = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM \(table) WHERE \(filters)", arguments: Self.arguments(filtered)) ?? 0
            var page = filtered
            var bounds = ""
            if let afterRow { bounds += " AND id > \(page.bind(.integer(afterRow)))" }
            if let beforeRow { bounds += " AND id < \(page.bind(.integer(beforeRow)))" }
            let limit = max(0, query.limit)
            let rows = try Row.fetchAll(db, sql: """
                SELECT id, stanza_id, with_jid, stamp, stanza FROM \(table) WHERE \(filters)\(bounds)
                ORDER BY id \(query.backwards ? "DESC" : "ASC") LIMIT \(page.bind(.integer(Int64(limit + 1))))
                """, arguments: Self.arguments(page))
            var kept: [(Int64, ArchivedMessage)] = try rows.prefix(limit).map { row in
                (try Self.column(row, "id", in: "archive"),
                 ArchivedMessage(id: try Self.column(row, "stanza_id", in: "archive"), with: try Self.column(row, "with_jid", in: "archive"),
                                 stamp: try Self.column(row, "stamp", in: "archive"), stanza: try Self.column(row, "stanza", in: "archive")))
            }
            if query.backwards { kept.reverse() }
            var firstIndex = 0
            if let first = kept.first?.0 {
                var before = filtered
                let clause = "\(filters) AND id < \(before.bind(.integer(first)))"
                firstIndex = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM \(table) WHERE \(clause)", arguments: Self.arguments(before)) ?? 0
            }
            return ArchivePage(messages: kept.map(\.1), complete: rows.count <= limit, count: count, firstIndex: firstIndex)
        }
    }

    private static func arguments(_ sql: ArchiveSQL) -> StatementArguments {
        StatementArguments(sql.parameters.map { parameter -> any DatabaseValueConvertible in
            switch parameter {
            case .text(let text): text
            case .integer(let number): number
            }
        })
    }

    // MARK: Keys

    private static func accountKey(_ jid: JID) throws(StorageError) -> String {
        try StorageKeys.account(jid)
    }

    private static func contactKey(_ jid: JID) throws(StorageError) -> String {
        try StorageKeys.contact(jid)
    }

    // MARK: Clock

    private static func nowSeconds() -> Int64 {
        Int64(Date().timeIntervalSince1970.rounded(.down))
    }

    private static func nowMilliseconds() -> Int64 {
        Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
    }

    // MARK: Rows

    private static func rosterVersion(_ db: Database, _ key: String) throws -> Int64? {
        guard let row = try Row.fetchOne(db, sql: SQL.selectRosterVersion, arguments: [key]) else { return nil }
        return try column(row, "roster_version", in: "users") as Int64
    }

    /// Bumps the version inside the caller's write transaction, which no other writer can
    /// interleave with, so the new value is the old one plus one.
    private static func incrementRosterVersion(_ db: Database, _ key: String, from version: Int64) throws -> Int64 {
        try db.execute(sql: SQL.incrementRosterVersion, arguments: [key])
        return version + 1
    }

    private static func credentialArguments(_ credentials: StoredCredentials) -> StatementArguments {
        var arguments = StatementArguments()
        for scram in [credentials.sha1, credentials.sha256] {
            arguments += [Data(scram.salt), Int64(scram.iterations), Data(scram.storedKey), Data(scram.serverKey)]
        }
        return arguments
    }

    private static func scram(_ row: Row, prefix: String) throws -> ScramCredentials {
        let salt: Data = try column(row, "\(prefix)_salt", in: "users")
        let iterations: Int64 = try column(row, "\(prefix)_iterations", in: "users")
        let storedKey: Data = try column(row, "\(prefix)_stored_key", in: "users")
        let serverKey: Data = try column(row, "\(prefix)_server_key", in: "users")
        guard let iterationCount = Int(exactly: iterations), iterationCount > 0 else {
            throw SQLiteStorageError.corruptRow(table: "users", detail: "\(prefix)_iterations is \(iterations)")
        }
        return ScramCredentials(salt: [UInt8](salt), iterations: iterationCount, storedKey: [UInt8](storedKey), serverKey: [UInt8](serverKey))
    }

    private static func rosterItem(_ row: Row) throws -> RosterItem {
        let table = "roster_items"
        let subscriptionText: String = try column(row, "subscription", in: table)
        guard let subscription = Subscription(rawValue: subscriptionText) else {
            throw SQLiteStorageError.corruptRow(table: table, detail: "unknown subscription \(subscriptionText)")
        }
        return RosterItem(
            jid: try jidColumn(row, "contact_jid", in: table),
            name: try column(row, "name", in: table),
            subscription: subscription,
            pendingOut: try column(row, "pending_out", in: table),
            pendingIn: try column(row, "pending_in", in: table),
            approved: try column(row, "approved", in: table),
            groups: try decodeGroups(try column(row, "groups_json", in: table)))
    }

    private static func storedStanza(_ row: Row, in table: String) throws -> StoredStanza {
        StoredStanza(stanza: try column(row, "stanza", in: table), storedAt: try column(row, "stored_at", in: table))
    }

    private static func encodeGroups(_ groups: [String]) throws -> String {
        try RosterGroupsColumn.encode(groups)
    }

    private static func decodeGroups(_ json: String) throws -> [String] {
        guard let groups = RosterGroupsColumn.decode(json) else {
            throw SQLiteStorageError.corruptRow(table: "roster_items", detail: "groups_json is not a JSON array of strings")
        }
        return groups
    }

    /// Decodes a column, turning NULL where a value is required, or a value of the wrong
    /// type, into ``SQLiteStorageError/corruptRow(table:detail:)`` instead of a trap.
    private static func column<Value: DatabaseValueConvertible>(_ row: Row, _ name: String, in table: String) throws -> Value {
        do {
            return try row.decode(Value.self, forColumn: name)
        } catch {
            throw SQLiteStorageError.corruptRow(table: table, detail: "column \(name): \(error)")
        }
    }

    private static func column<Value: DatabaseValueConvertible>(_ row: Row, atIndex index: Int, in table: String) throws -> Value {
        guard index < row.count else {
            throw SQLiteStorageError.corruptRow(table: table, detail: "missing column \(index)")
        }
        do {
            return try row.decode(Value.self, atIndex: index)
        } catch {
            throw SQLiteStorageError.corruptRow(table: table, detail: "column \(index): \(error)")
        }
    }

    private static func jidColumn(_ row: Row, _ name: String, in table: String) throws -> JID {
        let text: String = try column(row, name, in: table)
        do {
            return try JID(text)
        } catch {
            throw SQLiteStorageError.corruptRow(table: table, detail: "column \(name) is not a JID (\(error))")
        }
    }
}

/// Failures specific to the SQLite backend, beyond ``StorageError``.
public enum SQLiteStorageError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The directory that should hold the database file does not exist.
    case directoryNotFound(String)
    /// The file was written by a newer version of Braid, with migrations this one lacks.
    case schemaTooNew(applied: [String])
    /// A stored row does not hold what the schema promises.
    case corruptRow(table: String, detail: String)

    public var description: String {
        switch self {
        case .directoryNotFound(let directory):
            "database directory \(directory) does not exist"
        case .schemaTooNew(let applied):
            "database schema is newer than this version of Braid understands (migrations: \(applied.joined(separator: ", ")))"
        case .corruptRow(let table, let detail):
            "corrupt row in \(table): \(detail)"
        }
    }
}
