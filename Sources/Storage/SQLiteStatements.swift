/// Every SQL statement ``SQLiteStorage`` runs, kept here so that a PostgreSQL backend can be
/// written from this one list.
///
/// The statements stick to SQL that SQLite (3.24 or later) and PostgreSQL both accept:
/// `INSERT … ON CONFLICT … DO UPDATE/DO NOTHING`, `?` placeholders (PostgreSQL drivers
/// spell them `$1`, `$2`…), `BIGINT` for 64-bit integers and `BOOLEAN` columns bound from
/// Swift `Bool`. The few dialect-specific spots are marked `PostgreSQL:` in the schema.
///
/// Column names avoid `user` and `groups`, which PostgreSQL reserves.
enum SQLiteStatements {
    /// The key of the counter bumped on every change to the set of hosted domains.
    static let domainsGenerationKey = "domains_generation"

    // MARK: Connection

    /// SQLite only; see SQLiteStorage.init for why. PostgreSQL commits durably by default.
    static let fullSynchronous = "PRAGMA synchronous = FULL"

    // MARK: Schema

    /// Schema version "v1", as one statement per element.
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
        // One column per SCRAM field rather than an opaque blob, so that other tools (and a
        // migration to PostgreSQL) can read them. PostgreSQL: BLOB is BYTEA.
        """
        CREATE TABLE users (
            jid TEXT NOT NULL PRIMARY KEY,
            domain TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
            sha1_salt BLOB NOT NULL,
            sha1_iterations BIGINT NOT NULL,
            sha1_stored_key BLOB NOT NULL,
            sha1_server_key BLOB NOT NULL,
            sha256_salt BLOB NOT NULL,
            sha256_iterations BIGINT NOT NULL,
            sha256_stored_key BLOB NOT NULL,
            sha256_server_key BLOB NOT NULL,
            roster_version BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )
        """,
        // users(in:) and the domain cascade look users up by domain.
        "CREATE INDEX users_by_domain ON users (domain)",
        // Groups are a JSON array of strings: they are always read and written with their
        // item, and no query looks inside them. No SQL JSON functions are used.
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
        // `seq` orders requests oldest first even within one millisecond; a replaced request
        // takes a new one, because it is a new request.
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
        // PostgreSQL: id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY.
        """
        CREATE TABLE offline_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_jid TEXT NOT NULL REFERENCES users (jid) ON DELETE CASCADE,
            stanza TEXT NOT NULL,
            stored_at BIGINT NOT NULL
        )
        """,
        "CREATE INDEX offline_messages_by_user ON offline_messages (user_jid, id)",
    ]

    /// Schema version "v2": persistent group-chat rooms (issue 11). The same in PostgreSQL.
    static let schemaV2: [String] = [
        """
        CREATE TABLE muc_rooms (
            jid TEXT NOT NULL PRIMARY KEY,
            parent_domain TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
            configuration TEXT NOT NULL,
            affiliations TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )
        """,
        "CREATE INDEX muc_rooms_by_domain ON muc_rooms (parent_domain)",
    ]

    /// Schema version "v3": account stores, the keyed values feature modules keep per
    /// account (PEP nodes and items, private XML, vCards, block lists). The same in
    /// PostgreSQL. `seq` orders a store's entries by last write (PEP's item order and
    /// `max_items` trimming).
    static let schemaV3: [String] = [
        """
        CREATE TABLE account_store (
            user_jid TEXT NOT NULL REFERENCES users (jid) ON DELETE CASCADE,
            store TEXT NOT NULL,
            entry_key TEXT NOT NULL,
            value TEXT NOT NULL,
            seq BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (user_jid, store, entry_key)
        )
        """,
        "CREATE INDEX account_store_by_seq ON account_store (user_jid, store, seq)",
    ]

    // MARK: Meta

    static let selectMeta = "SELECT value FROM meta WHERE name = ?"
    static let incrementMeta = "UPDATE meta SET value = value + 1 WHERE name = ?"

    // MARK: Domains

    static let selectDomains = "SELECT name, added_at FROM domains ORDER BY name"
    static let domainExists = "SELECT 1 FROM domains WHERE name = ?"
    static let insertDomain = "INSERT INTO domains (name, added_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
    static let deleteDomain = "DELETE FROM domains WHERE name = ?"

    // MARK: Users

    private static let credentialColumns = """
        sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, \
        sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key
        """

    static let insertUser = """
        INSERT INTO users (jid, domain, \(credentialColumns), roster_version, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)
        ON CONFLICT (jid) DO NOTHING
        """
    static let updateCredentials = """
        UPDATE users SET
            sha1_salt = ?, sha1_iterations = ?, sha1_stored_key = ?, sha1_server_key = ?,
            sha256_salt = ?, sha256_iterations = ?, sha256_stored_key = ?, sha256_server_key = ?
        WHERE jid = ?
        """
    static let selectCredentials = "SELECT \(credentialColumns) FROM users WHERE jid = ?"
    static let userExists = "SELECT 1 FROM users WHERE jid = ?"
    static let selectUsersInDomain = "SELECT jid FROM users WHERE domain = ? ORDER BY jid"
    static let deleteUser = "DELETE FROM users WHERE jid = ?"

    // MARK: Rosters

    static let selectRosterVersion = "SELECT roster_version FROM users WHERE jid = ?"
    static let incrementRosterVersion = "UPDATE users SET roster_version = roster_version + 1 WHERE jid = ?"

    private static let rosterItemColumns = "contact_jid, name, subscription, pending_out, pending_in, approved, groups_json"

    static let selectRosterItems = "SELECT \(rosterItemColumns) FROM roster_items WHERE user_jid = ? ORDER BY contact_jid"
    static let selectRosterItem = "SELECT \(rosterItemColumns) FROM roster_items WHERE user_jid = ? AND contact_jid = ?"
    static let upsertRosterItem = """
        INSERT INTO roster_items (user_jid, \(rosterItemColumns))
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (user_jid, contact_jid) DO UPDATE SET
            name = excluded.name,
            subscription = excluded.subscription,
            pending_out = excluded.pending_out,
            pending_in = excluded.pending_in,
            approved = excluded.approved,
            groups_json = excluded.groups_json
        """
    static let deleteRosterItem = "DELETE FROM roster_items WHERE user_jid = ? AND contact_jid = ?"

    // MARK: Subscription requests

    static let nextSubscriptionRequestSeq = "SELECT COALESCE(MAX(seq), 0) + 1 FROM subscription_requests WHERE user_jid = ?"
    static let upsertSubscriptionRequest = """
        INSERT INTO subscription_requests (user_jid, contact_jid, stanza, stored_at, seq)
        VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (user_jid, contact_jid) DO UPDATE SET
            stanza = excluded.stanza,
            stored_at = excluded.stored_at,
            seq = excluded.seq
        """
    static let deleteSubscriptionRequest = "DELETE FROM subscription_requests WHERE user_jid = ? AND contact_jid = ?"
    static let selectSubscriptionRequests = "SELECT stanza, stored_at FROM subscription_requests WHERE user_jid = ? ORDER BY seq"

    // MARK: Account stores

    static let selectStoreEntries = "SELECT entry_key, value, seq, updated_at FROM account_store WHERE user_jid = ? AND store = ? ORDER BY seq"
    static let selectStoreEntry = "SELECT entry_key, value, seq, updated_at FROM account_store WHERE user_jid = ? AND store = ? AND entry_key = ?"
    static let nextStoreSeq = "SELECT COALESCE(MAX(seq), 0) + 1 FROM account_store WHERE user_jid = ? AND store = ?"
    static let upsertStoreEntry = """
        INSERT INTO account_store (user_jid, store, entry_key, value, seq, updated_at) VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (user_jid, store, entry_key) DO UPDATE SET
            value = excluded.value, seq = excluded.seq, updated_at = excluded.updated_at
        """
    /// Keeps the newest `?` entries (the subquery is NULL, deleting nothing, when there are
    /// not more than that).
    static let trimStore = """
        DELETE FROM account_store WHERE user_jid = ? AND store = ? AND seq <= (
            SELECT seq FROM account_store WHERE user_jid = ? AND store = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)
        """
    static let deleteStoreEntry = "DELETE FROM account_store WHERE user_jid = ? AND store = ? AND entry_key = ?"
    static let deleteStore = "DELETE FROM account_store WHERE user_jid = ? AND store = ?"

    // MARK: Offline messages

    static let countOfflineMessages = "SELECT COUNT(*) FROM offline_messages WHERE user_jid = ?"
    static let insertOfflineMessage = "INSERT INTO offline_messages (user_jid, stanza, stored_at) VALUES (?, ?, ?)"
    static let selectOfflineMessages = "SELECT stanza, stored_at FROM offline_messages WHERE user_jid = ? ORDER BY id"
    static let deleteOfflineMessages = "DELETE FROM offline_messages WHERE user_jid = ?"
}
