/// The PostgreSQL schema, versioned like the SQLite one (``SQLiteStatements``): the same
/// tables and columns, so `braid storage migrate` copies rows one for one. Differences:
/// `BYTEA` for `BLOB`, an identity column for the offline messages' order. The statements
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
        ("v2", SQLiteStatements.schemaV2),
    ]

    static let schemaV1: [String] = [
        """
        CREATE TABLE meta (
            name TEXT NOT NULL PRIMARY KEY,
            value BIGINT NOT NULL
        )
        """,
        "INSERT INTO meta (name, value) VALUES ('\(domainsGenerationKey)', 0)",
        """
        CREATE TABLE domains (
            name TEXT NOT NULL PRIMARY KEY,
            added_at BIGINT NOT NULL
        )
        """,
        """
        CREATE TABLE users (
            jid TEXT NOT NULL PRIMARY KEY,
            domain TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
            sha1_salt BYTEA NOT NULL,
            sha1_iterations BIGINT NOT NULL,
            sha1_stored_key BYTEA NOT NULL,
            sha1_server_key BYTEA NOT NULL,
            sha256_salt BYTEA NOT NULL,
            sha256_iterations BIGINT NOT NULL,
            sha256_stored_key BYTEA NOT NULL,
            sha256_server_key BYTEA NOT NULL,
            roster_version BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )
        """,
        "CREATE INDEX users_by_domain ON users (domain)",
        """
        CREATE TABLE roster_items (
            user_jid TEXT NOT NULL REFERENCES users (jid) ON DELETE CASCADE,
            contact_jid TEXT NOT NULL,
            name TEXT,
            subscription TEXT NOT NULL CHECK (subscription IN ('none', 'to', 'from', 'both')),
            pending_out BOOLEAN NOT NULL,
            pending_in BOOLEAN NOT NULL,
            approved BOOLEAN NOT NULL,
            groups_json TEXT NOT NULL,
            PRIMARY KEY (user_jid, contact_jid)
        )
        """,
        """
        CREATE TABLE subscription_requests (
            user_jid TEXT NOT NULL REFERENCES users (jid) ON DELETE CASCADE,
            contact_jid TEXT NOT NULL,
            stanza TEXT NOT NULL,
            stored_at BIGINT NOT NULL,
            seq BIGINT NOT NULL,
            PRIMARY KEY (user_jid, contact_jid)
        )
        """,
        """
        CREATE TABLE offline_messages (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            user_jid TEXT NOT NULL REFERENCES users (jid) ON DELETE CASCADE,
            stanza TEXT NOT NULL,
            stored_at BIGINT NOT NULL
        )
        """,
        "CREATE INDEX offline_messages_by_user ON offline_messages (user_jid, id)",
    ]
}
