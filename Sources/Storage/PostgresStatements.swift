/// The PostgreSQL schema: the SQLite one (``SQLiteStatements``) in PostgreSQL's dialect, so
/// the tables and columns are the same and `braid storage migrate` copies rows one for one
/// (`BYTEA` for `BLOB`, an identity column for the offline messages' order). The statements
/// of ``PostgresStorage`` are written beside their calls, with bound parameters.
enum PostgresStatements {
    static let domainsGenerationKey = SQLiteStatements.domainsGenerationKey

    static let createMigrations = """
        CREATE TABLE IF NOT EXISTS braid_migrations (
            id TEXT NOT NULL PRIMARY KEY,
            applied_at BIGINT NOT NULL
        )
        """
    static let selectMigrations = "SELECT id FROM braid_migrations"

    /// Every migration, in order; each runs once, in one transaction.
    static let migrations: [(id: String, statements: [String])] = [
        ("v1", schemaV1),
        ("v2", SQLiteStatements.schemaV2.map(dialect)),
        ("v3", SQLiteStatements.schemaV3.map(dialect)),
        ("v4", ArchiveSQL.schemaV4.map(dialect)),
        ("v5", ArchiveSQL.schemaV5.map(dialect)),
        ("v6", ProvisioningSQL.schemaV6.map(dialect)),
        ("v7", ProvisioningSQL.schemaV7.map(dialect)),
    ]

    /// The SQLite schema in PostgreSQL's dialect: the two spots marked `PostgreSQL:` there.
    static let schemaV1: [String] = SQLiteStatements.schemaV1.map(dialect)

    static func dialect(_ statement: String) -> String {
        statement
            .replacingOccurrences(of: " BLOB ", with: " BYTEA ")
            .replacingOccurrences(of: "id INTEGER PRIMARY KEY AUTOINCREMENT", with: "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    }
}
