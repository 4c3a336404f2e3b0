import Foundation
import GRDB
import Logging
import PostgresNIO

/// `braid storage migrate`: copies an SQLite deployment into PostgreSQL, row for row, so that
/// every key, SCRAM key, roster version and timestamp is what it was (clients' cached roster
/// versions stay valid). Rows already in the target are kept: running it again copies only
/// what is missing. At the end every table's rows are counted on both sides.
public enum StorageMigration {
    /// How a column is read from SQLite and bound for PostgreSQL (SQLite stores booleans as
    /// integers; PostgreSQL wants them typed).
    enum Kind {
        case text, optionalText, integer, optionalInteger, bytes, boolean
    }

    struct Table {
        var name: String
        var columns: [(String, Kind)]
        /// What makes a row the same row (its primary key).
        var key: [String]
        var overridingIdentity = false
    }

    /// Every table, parents first. A store added later adds its table here.
    static let tables: [Table] = [
        Table(name: "domains", columns: [("name", .text), ("added_at", .integer)], key: ["name"]),
        Table(name: "users", columns: [
            ("jid", .text), ("domain", .text),
            ("sha1_salt", .bytes), ("sha1_iterations", .integer), ("sha1_stored_key", .bytes), ("sha1_server_key", .bytes),
            ("sha256_salt", .bytes), ("sha256_iterations", .integer), ("sha256_stored_key", .bytes), ("sha256_server_key", .bytes),
            ("roster_version", .integer), ("created_at", .integer),
        ], key: ["jid"]),
        Table(name: "roster_items", columns: [
            ("user_jid", .text), ("contact_jid", .text), ("name", .optionalText), ("subscription", .text),
            ("pending_out", .boolean), ("pending_in", .boolean), ("approved", .boolean), ("groups_json", .text),
        ], key: ["user_jid", "contact_jid"]),
        Table(name: "subscription_requests", columns: [
            ("user_jid", .text), ("contact_jid", .text), ("stanza", .text), ("stored_at", .integer), ("seq", .integer),
        ], key: ["user_jid", "contact_jid"]),
        Table(name: "offline_messages", columns: [
            ("id", .integer), ("user_jid", .text), ("stanza", .text), ("stored_at", .integer),
        ], key: ["id"], overridingIdentity: true),
        Table(name: "muc_rooms", columns: [
            ("jid", .text), ("parent_domain", .text), ("configuration", .text), ("affiliations", .text), ("created_at", .integer),
        ], key: ["jid"]),
        Table(name: "archive", columns: [
            ("id", .integer), ("user_jid", .text), ("stanza_id", .text), ("with_jid", .text), ("stamp", .integer), ("stanza", .text),
        ], key: ["id"], overridingIdentity: true),
        Table(name: "room_archive", columns: [
            ("id", .integer), ("room_jid", .text), ("parent_domain", .text), ("stanza_id", .text), ("with_jid", .text), ("stamp", .integer), ("stanza", .text),
        ], key: ["id"], overridingIdentity: true),
        Table(name: "account_store", columns: [
            ("user_jid", .text), ("store", .text), ("entry_key", .text), ("value", .text), ("seq", .integer), ("updated_at", .integer),
        ], key: ["user_jid", "store", "entry_key"]),
        Table(name: "api_tokens", columns: [
            ("id", .text), ("token_hash", .text), ("scope", .optionalText), ("label", .text), ("created_at", .integer), ("expires_at", .optionalInteger),
        ], key: ["id"]),
        Table(name: "audit_log", columns: [
            ("id", .integer), ("at", .integer), ("token_id", .optionalText), ("action", .text), ("target", .text), ("outcome", .text), ("detail", .text),
        ], key: ["id"], overridingIdentity: true),
        Table(name: "domain_settings", columns: [("domain", .text), ("services_json", .text), ("acme", .optionalInteger)], key: ["domain"]),
    ]

    public struct Count: Sendable, Equatable, CustomStringConvertible {
        public var table: String
        public var source: Int
        public var copied: Int
        public var target: Int

        public var description: String {
            "\(table): \(source) in SQLite, \(copied) copied now, \(target) in PostgreSQL"
        }
    }

    public struct CountMismatch: Error, CustomStringConvertible, Sendable {
        public var counts: [Count]
        public var description: String {
            "PostgreSQL has fewer rows than SQLite: " + counts.filter { $0.target < $0.source }.map(\.description).joined(separator: "; ")
        }
    }

    /// Copies everything from `source` into `target` (prepared: its schema is up to date) in
    /// one transaction per table, and checks the counts. Throws ``CountMismatch`` when the
    /// target ends with fewer rows than the source in some table.
    public static func copy(from source: SQLiteStorage, to target: PostgresStorage, logger: Logger) async throws -> [Count] {
        try await target.prepare()
        var counts: [Count] = []
        for table in tables {
            let rows = try await source.pool.read { db in
                try Row.fetchAll(db, sql: "SELECT \(table.columns.map(\.0).joined(separator: ", ")) FROM \(table.name)")
            }
            let copied = try await target.client.withTransaction(logger: logger) { connection -> Int in
                var copied = 0
                for row in rows {
                    var bindings = PostgresBindings()
                    for (index, (column, kind)) in table.columns.enumerated() {
                        try bind(row[index], kind: kind, column: "\(table.name).\(column)", into: &bindings)
                    }
                    let placeholders = (1...table.columns.count).map { "$\($0)" }.joined(separator: ", ")
                    let sql = """
                        INSERT INTO \(table.name) (\(table.columns.map(\.0).joined(separator: ", ")))\(table.overridingIdentity ? " OVERRIDING SYSTEM VALUE" : "")
                        VALUES (\(placeholders)) ON CONFLICT (\(table.key.joined(separator: ", "))) DO NOTHING RETURNING 1
                        """
                    for try await _ in try await connection.query(PostgresQuery(unsafeSQL: sql, binds: bindings), logger: logger) {
                        copied += 1
                    }
                }
                if table.overridingIdentity {
                    // New rows continue after the copied ids.
                    try await connection.query(PostgresQuery(unsafeSQL: """
                        SELECT setval(pg_get_serial_sequence('\(table.name)', 'id'), GREATEST((SELECT COALESCE(MAX(id), 0) FROM \(table.name)), 1))
                        """), logger: logger)
                }
                return copied
            }
            var targetCount = 0
            for try await count in try await target.client.query(PostgresQuery(unsafeSQL: "SELECT COUNT(*) FROM \(table.name)"), logger: logger).decode(Int64.self) {
                targetCount = Int(count)
            }
            counts.append(Count(table: table.name, source: rows.count, copied: copied, target: targetCount))
            logger.info("copied a table", metadata: ["table": "\(table.name)", "rows": "\(rows.count)", "new": "\(copied)"])
        }
        // Servers on the target take the domains in now (a new generation, announced).
        try await target.client.withTransaction(logger: logger) { connection in
            try await connection.query("UPDATE meta SET value = value + 1 WHERE name = \(PostgresStatements.domainsGenerationKey)", logger: logger)
            try await connection.query(PostgresQuery(unsafeSQL: "NOTIFY \(PostgresStorage.notificationChannel)"), logger: logger)
        }
        if counts.contains(where: { $0.target < $0.source }) { throw CountMismatch(counts: counts) }
        return counts
    }

    private static func bind(_ value: DatabaseValue, kind: Kind, column: String, into bindings: inout PostgresBindings) throws {
        switch (kind, value.storage) {
        case (.optionalText, .null), (.optionalInteger, .null):
            bindings.appendNull()
        case (.text, .string(let text)), (.optionalText, .string(let text)):
            bindings.append(text)
        case (.integer, .int64(let number)), (.optionalInteger, .int64(let number)):
            bindings.append(number)
        case (.boolean, .int64(let number)):
            bindings.append(number != 0)
        case (.bytes, .blob(let data)):
            try bindings.append(data)
        default:
            throw SQLiteStorageError.corruptRow(table: column, detail: "unexpected value \(value)")
        }
    }
}
