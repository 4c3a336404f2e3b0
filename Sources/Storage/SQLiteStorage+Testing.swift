import GRDB
import Logging

/// Hooks for the tests, which cannot import GRDB themselves: they inspect the connection
/// settings and damage rows on purpose. Internal, so only `@testable import` sees them.
extension SQLiteStorage {
    /// Opens a database whose logger only reports warnings and worse, so that test output
    /// stays readable.
    convenience init(quietlyAt path: String) throws {
        var logger = Logger(label: "braid.storage.tests")
        logger.logLevel = .warning
        try self.init(path: path, logger: logger)
    }

    struct ConnectionSettings: Sendable, Equatable {
        var journalMode: String
        var synchronous: Int
        var foreignKeys: Bool
        var busyTimeoutMilliseconds: Int
    }

    /// The settings of the connection that writes.
    func writerConnectionSettings() async throws -> ConnectionSettings {
        try await pool.writeWithoutTransaction { db in
            ConnectionSettings(
                journalMode: try String.fetchOne(db, sql: "PRAGMA journal_mode") ?? "",
                synchronous: try Int.fetchOne(db, sql: "PRAGMA synchronous") ?? -1,
                foreignKeys: try Bool.fetchOne(db, sql: "PRAGMA foreign_keys") ?? false,
                busyTimeoutMilliseconds: try Int.fetchOne(db, sql: "PRAGMA busy_timeout") ?? -1)
        }
    }

    /// Runs raw SQL in a write transaction and returns the number of rows it changed.
    @discardableResult
    func executeRawSQLForTesting(_ sql: String) async throws -> Int {
        try await pool.write { db in
            try db.execute(sql: sql)
            return db.changesCount
        }
    }
}

extension SQLiteStorage {
    /// Caps the file at its current size plus `extraPages` pages (SQLite's writer connection
    /// then fails with SQLITE_FULL, "database or disk is full", as on a full disk); a large
    /// number lifts the cap. Returns the cap.
    @discardableResult
    func capSizeForTesting(extraPages: Int) async throws -> Int {
        try await pool.writeWithoutTransaction { db in
            let pages = try Int.fetchOne(db, sql: "PRAGMA page_count") ?? 0
            return try Int.fetchOne(db, sql: "PRAGMA max_page_count = \(pages + extraPages)") ?? 0
        }
    }
}
