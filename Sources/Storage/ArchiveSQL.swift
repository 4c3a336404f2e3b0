/// The statements of an archive query, for both backends: the filters of ``ArchiveQuery``
/// as one `WHERE` clause with its parameters, written once with a placeholder style per
/// backend (`?` for SQLite, `$n` for PostgreSQL).
struct ArchiveSQL {
    enum Parameter: Sendable, Equatable {
        case text(String)
        case integer(Int64)
    }

    enum Placeholders {
        case question, dollar
    }

    private(set) var parameters: [Parameter] = []
    let style: Placeholders
    /// The table (`archive` for accounts, `room_archive` for rooms) and the column that
    /// names whose archive a row is in.
    let table: String
    let ownerColumn: String

    init(style: Placeholders, table: String = "archive", ownerColumn: String = "user_jid") {
        self.style = style
        self.table = table
        self.ownerColumn = ownerColumn
    }

    /// A placeholder for a new parameter.
    mutating func bind(_ parameter: Parameter) -> String {
        parameters.append(parameter)
        return style == .question ? "?" : "$\(parameters.count)"
    }

    /// The filters (not the page bounds): the account, `with`, the time range, the ids.
    mutating func filters(user: String, query: ArchiveQuery) -> String {
        var clauses = ["\(ownerColumn) = \(bind(.text(user)))"]
        if let with = query.with { clauses.append("with_jid = \(bind(.text(with)))") }
        if let start = query.start { clauses.append("stamp >= \(bind(.integer(start)))") }
        if let end = query.end { clauses.append("stamp <= \(bind(.integer(end)))") }
        if let ids = query.ids {
            // No ids asked: nothing matches (IN () is not SQL).
            clauses.append(ids.isEmpty ? "1 = 0" : "stanza_id IN (\(ids.map { bind(.text($0)) }.joined(separator: ", ")))")
        }
        return clauses.joined(separator: " AND ")
    }

    /// An account's quota (SQLite; parameters: account, account, quota): everything from the
    /// entry after the newest `quota` back goes. Fewer entries: the inner query is NULL and
    /// nothing matches.
    static let trimToQuota = "DELETE FROM archive WHERE user_jid = ? AND id <= (SELECT id FROM archive WHERE user_jid = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"

    /// Schema version "v4": the message archive (issue 14). Append-only; ordered by `id`;
    /// indexed for an account's pages, by correspondent, by time, and by stanza id.
    static let schemaV4: [String] = [
        // PostgreSQL: id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY.
        """
        CREATE TABLE archive (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_jid TEXT NOT NULL REFERENCES users (jid) ON DELETE CASCADE,
            stanza_id TEXT NOT NULL,
            with_jid TEXT NOT NULL,
            stamp BIGINT NOT NULL,
            stanza TEXT NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX archive_by_stanza_id ON archive (user_jid, stanza_id)",
        "CREATE INDEX archive_by_user ON archive (user_jid, id)",
        "CREATE INDEX archive_by_with ON archive (user_jid, with_jid, id)",
        "CREATE INDEX archive_by_stamp ON archive (user_jid, stamp)",
    ]

    /// Schema version "v5": group-chat rooms' archives (XEP-0313 on rooms). A room is not an
    /// account and a temporary one has no row anywhere, so its entries hang on the hosted
    /// domain whose service holds it (removing the domain removes them).
    static let schemaV5: [String] = [
        // PostgreSQL: id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY.
        """
        CREATE TABLE room_archive (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            room_jid TEXT NOT NULL,
            parent_domain TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
            stanza_id TEXT NOT NULL,
            with_jid TEXT NOT NULL,
            stamp BIGINT NOT NULL,
            stanza TEXT NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX room_archive_by_stanza_id ON room_archive (room_jid, stanza_id)",
        "CREATE INDEX room_archive_by_room ON room_archive (room_jid, id)",
        "CREATE INDEX room_archive_by_stamp ON room_archive (room_jid, stamp)",
        "CREATE INDEX room_archive_by_domain ON room_archive (parent_domain)",
    ]
}

extension Optional {
    /// `map` with an async transform.
    func asyncMap<Result>(_ transform: (Wrapped) async throws -> Result) async rethrows -> Result? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}
