import Foundation

/// Schema version "v6": the provisioning API's bearer tokens and its audit log (issue 17).
/// The same in PostgreSQL (``PostgresStatements/dialect(_:)`` makes `id` an identity
/// column). Tokens are kept only as SHA-256 hashes: a stolen database grants nothing.
enum ProvisioningSQL {
    static let schemaV6: [String] = [
        """
        CREATE TABLE api_tokens (
            id TEXT NOT NULL PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            scope TEXT,
            label TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT
        )
        """,
        """
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at BIGINT NOT NULL,
            token_id TEXT,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_log_by_time ON audit_log (at)",
    ]
}

/// Schema version "v7": per-domain settings the provisioning API changes (issue 17): which
/// services (`services.NAME`) a hosted domain offers where it differs from the server's
/// default, and whether ACME manages its certificate. A row exists only for a domain with an
/// override, and goes with its domain.
extension ProvisioningSQL {
    static let schemaV7: [String] = [
        """
        CREATE TABLE domain_settings (
            domain TEXT NOT NULL PRIMARY KEY REFERENCES domains (name) ON DELETE CASCADE,
            services_json TEXT NOT NULL,
            acme BIGINT
        )
        """,
    ]

    /// The services' overrides as stored: a JSON object of service name to true or false,
    /// keys sorted so that equal settings are equal text.
    static func encodeServices(_ services: [String: Bool]) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(services), as: UTF8.self)
    }

    static func decodeServices(_ text: String) throws -> [String: Bool] {
        guard let services = try? JSONDecoder().decode([String: Bool].self, from: Data(text.utf8)) else {
            throw StorageError.itemNotFound
        }
        return services
    }

    static func encodeACME(_ acme: Bool?) -> Int64? {
        acme.map { $0 ? 1 : 0 }
    }
}

/// What both backends share about tokens and the audit log: the scope's encoding and the
/// audit query.
enum ProvisioningScope {
    /// A token's domains as stored: a JSON array of canonical names.
    static func encode(_ domains: [String]) throws -> String {
        try RosterGroupsColumn.encode(domains.map(StorageKeys.domain).sorted())
    }

    static func decode(_ text: String) throws -> [String] {
        guard let domains = RosterGroupsColumn.decode(text) else { throw StorageError.itemNotFound }
        return domains
    }

    /// The newest `limit` entries, optionally only those about `domain` (itself, its
    /// accounts, its service domains), with the backend's placeholders.
    static func auditQuery(limit: Int, domain: String?, placeholder: (Int) -> String) -> (String, [String]) {
        let columns = "SELECT at, token_id, action, target, outcome, detail FROM audit_log"
        let bounded = max(0, min(limit, 10_000))
        guard let domain else {
            return ("\(columns) ORDER BY id DESC LIMIT \(bounded)", [])
        }
        // LIKE patterns: the domain has no % or _ that matters (escaped anyway).
        let escaped = domain.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "%", with: "\\%").replacingOccurrences(of: "_", with: "\\_")
        let sql = "\(columns) WHERE target = \(placeholder(1)) OR target LIKE \(placeholder(2)) ESCAPE '\\' OR target LIKE \(placeholder(3)) ESCAPE '\\' ORDER BY id DESC LIMIT \(bounded)"
        return (sql, [domain, "%@" + escaped, "%." + escaped])
    }
}
