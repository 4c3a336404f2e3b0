import Admin
import Cluster
import Federation
import Foundation
import Storage
import Yams

/// Braid's configuration. Every field has a default, so an empty file (or none at all) gives
/// the embedded default: data under `./braid-data`, the domain `localhost` with a
/// self-signed certificate, and client listeners on 5222 (STARTTLS) and 5223 (direct TLS).
///
/// Loaded from YAML (`braid.yaml`); every leaf can be overridden by an environment variable
/// named after its path, e.g. `BRAID_C2S_MAX_STANZA_BYTES` or `BRAID_DATA_DIRECTORY`.
/// `docs/braid.example.yaml` documents every key.
public struct BraidConfiguration: Codable, Sendable, Equatable {
    /// Where the database and generated certificates live. Relative paths are resolved
    /// against the working directory.
    public var dataDirectory: String = "braid-data"
    /// The domain created on first start, when no domain is hosted yet.
    public var defaultDomain: String = "localhost"
    /// trace, debug, info, notice, warning, error or critical.
    public var logLevel: String = "info"
    public var c2s = ClientSettings()
    public var auth = AuthSettings()
    public var tls = TLSSettings()
    public var offline = OfflineSettings()
    public var streamManagement = StreamManagementSettings()
    /// Server-to-server federation.
    public var s2s = FederationConfiguration()
    /// How peers are looked up in DNS.
    public var dns = DNSConfiguration()
    /// The HTTP side: POSH documents, metrics, the links API.
    public var admin = AdminConfiguration()
    /// Per-domain services (group chat, upload, …), by module name: each hosted domain gets
    /// each enabled service at `SUBDOMAIN.DOMAIN`.
    public var services: [String: ServiceSettings] = [:]
    /// Where data lives: SQLite under `data_directory` (the default) or PostgreSQL.
    public var storage = StorageSettings()
    /// Group chat (XEP-0045) limits.
    public var muc = MUCSettings()
    public var pep = PEPSettings()
    public var mam = MAMSettings()
    public var contactAddresses = ContactAddresses()
    public var push = PushSettings()
    public var externalServices = ExternalServices()
    public var blocking = BlockingSettings()
    public var registration = RegistrationSettings()
    /// HTTP file upload (XEP-0363) at `upload.DOMAIN`.
    public var upload = UploadSettings()
    /// The provisioning API for control panels (docs/provisioning-api.md).
    public var provisioning = ProvisioningSettings()
    /// Certificates from an ACME CA for every hosted domain (docs/acme.md).
    public var acme = ACMESettings()
    /// Several nodes serving one provider on one PostgreSQL database (docs/cluster.md).
    public var cluster = ClusterSettings()

    public init() {}

    enum CodingKeys: String, CodingKey {
        case dataDirectory = "data_directory"
        case defaultDomain = "default_domain"
        case logLevel = "log_level"
        case c2s, auth, tls, offline
        case streamManagement = "stream_management"
        case s2s, dns, admin, services, storage, muc, pep, mam
        case contactAddresses = "contact_addresses"
        case push
        case externalServices = "external_services"
        case blocking, registration, upload
        case provisioning
        case acme
        case cluster
    }

    /// HTTP file upload (`upload`, XEP-0363): slots at `upload.DOMAIN`, files served by the
    /// HTTPS listener (`admin.posh_port`). Sizes are bytes; a limit of 0 is no limit.
    public struct UploadSettings: Codable, Sendable, Equatable {
        /// The largest file; announced in the service's `disco#info` (`max-file-size`).
        public var maxFileSize = 100 * 1024 * 1024
        /// Bytes one account may have stored (files not expired yet, and slots not used yet).
        public var quotaBytesPerAccount = 1024 * 1024 * 1024
        /// Bytes all accounts of one hosted domain may have stored.
        public var quotaBytesPerDomain = 0
        /// Bytes one account may upload in 24 hours.
        public var bytesPerDayPerAccount = 1024 * 1024 * 1024
        /// Slot requests one account may make per minute (with a burst of as many).
        public var slotsPerMinute = 30
        /// Days a file is kept (and its GET URL works); 0 keeps files for good.
        public var retentionDays = 30
        /// Per hosted domain, in place of `retention_days` (customer.example: 7).
        public var domainRetentionDays: [String: Int] = [:]
        /// Seconds a PUT URL is valid after the slot is given.
        public var putURLSeconds = 300
        /// Seconds a PUT may go without receiving any bytes, and seconds a whole PUT may take,
        /// before it is cut off (slow senders hold a connection and a temporary file).
        public var putIdleSeconds = 30
        public var putTimeoutSeconds = 3600
        /// How often expired files, and files of removed accounts and domains, are deleted.
        public var cleanupIntervalSeconds: Double = 3600
        /// Where URLs point, e.g. `https://upload.provider.example` (a proxy in front); empty:
        /// `https://` + `admin.posh_host_name` (else the service domain) + the HTTPS port.
        public var baseURL = ""
        /// Where files are kept; empty: `uploads` under `data_directory`.
        public var directory = ""

        public init() {}

        enum CodingKeys: String, CodingKey {
            case maxFileSize = "max_file_size"
            case quotaBytesPerAccount = "quota_bytes_per_account"
            case quotaBytesPerDomain = "quota_bytes_per_domain"
            case bytesPerDayPerAccount = "bytes_per_day_per_account"
            case slotsPerMinute = "slots_per_minute"
            case retentionDays = "retention_days"
            case domainRetentionDays = "domain_retention_days"
            case putURLSeconds = "put_url_seconds"
            case putIdleSeconds = "put_idle_seconds"
            case putTimeoutSeconds = "put_timeout_seconds"
            case cleanupIntervalSeconds = "cleanup_interval_seconds"
            case baseURL = "base_url"
            case directory
        }

        /// Days files of `domain` are kept (0: for good).
        public func retentionDays(for domain: String) -> Int {
            domainRetentionDays[domain] ?? retentionDays
        }
    }

    /// In-band registration (XEP-0077): off unless a domain is listed.
    public struct RegistrationSettings: Codable, Sendable, Equatable {
        /// Hosted domains where anyone may create an account from a client; `"*"` is every
        /// hosted domain. Empty (the default): accounts come from `braid user add` only.
        public var domains: [String] = []
        /// Registration attempts one client address may make per hour (an IPv6 address
        /// counts by its /64, which one host usually holds whole).
        public var attemptsPerAddressPerHour = 3
        /// The shortest password accepted for a new account.
        public var minPasswordLength = 8

        public init() {}

        enum CodingKeys: String, CodingKey {
            case domains
            case attemptsPerAddressPerHour = "attempts_per_address_per_hour"
            case minPasswordLength = "min_password_length"
        }

        public func isOpen(_ domain: String) -> Bool {
            domains.contains("*") || domains.contains { $0.lowercased() == domain.lowercased() }
        }
    }

    /// Blocking (XEP-0191).
    public struct BlockingSettings: Codable, Sendable, Equatable {
        /// JIDs one account may block; a block beyond it gets `resource-constraint`.
        public var maxItems = 1000

        public init() {}

        enum CodingKeys: String, CodingKey {
            case maxItems = "max_items"
        }
    }

    /// Limits of the group-chat service (`muc`); beyond them, the XEP's errors.
    public struct MUCSettings: Codable, Sendable, Equatable {
        /// Rooms one service (one hosted domain's `conference.`) may hold.
        public var maxRoomsPerService = 1000
        /// The most occupants a room may be configured for.
        public var maxOccupantsPerRoom = 500
        /// Characters in a nickname.
        public var maxNickLength = 64
        /// Characters in a subject.
        public var maxSubjectLength = 1024
        /// Messages kept as a room's history for newcomers.
        public var historyLength = 20
        /// Who may create rooms: `domain` (the users of the hosted domain whose service it
        /// is, as Prosody 13 does), `local` (the users of any domain hosted here) or
        /// `anyone` (users of other servers too).
        public var roomCreators = "domain"
        /// Messages one occupant may send to a room per second, sustained (0: no limit) …
        public var messagesPerSecond: Double = 5
        /// … and in one burst; beyond them the sender gets `resource-constraint` and waits.
        public var messageBurst: Double = 20

        public init() {}

        enum CodingKeys: String, CodingKey {
            case maxRoomsPerService = "max_rooms_per_service"
            case maxOccupantsPerRoom = "max_occupants_per_room"
            case maxNickLength = "max_nick_length"
            case maxSubjectLength = "max_subject_length"
            case historyLength = "history_length"
            case roomCreators = "room_creators"
            case messagesPerSecond = "messages_per_second"
            case messageBurst = "message_burst"
        }
    }

    /// Limits of personal eventing (`pep`, XEP-0163); beyond them, the XEP-0060 errors.
    public struct PEPSettings: Codable, Sendable, Equatable {
        /// Items one node keeps at most (its `pubsub#max_items` cannot exceed it; `max` is it).
        public var maxItemsPerNode = 1000
        /// Nodes one account may have.
        public var maxNodesPerAccount = 256
        /// Bytes of one item's payload (avatars are the largest, base64).
        public var maxItemBytes = 262_144
        /// Distinct entity-capabilities hashes remembered (XEP-0115), shared by all accounts.
        public var capsCacheSize = 10_000
        /// Seconds to wait for a client's answer about its capabilities.
        public var capsQueryTimeoutSeconds: Double = 10
        /// Resources of contacts one account keeps track of for notifications.
        public var maxInterestedResources = 10_000
        /// Notifications one account's publishes may cause per second, with a burst: a
        /// publish to 1,000 contacts goes out whole, and the account's next publishes get
        /// `resource-constraint` (wait) until the allowance has refilled. 0: no limit.
        public var notificationsPerSecond: Double = 1_000
        public var notificationBurst: Double = 10_000

        public init() {}

        enum CodingKeys: String, CodingKey {
            case maxItemsPerNode = "max_items_per_node"
            case maxNodesPerAccount = "max_nodes_per_account"
            case maxItemBytes = "max_item_bytes"
            case capsCacheSize = "caps_cache_size"
            case capsQueryTimeoutSeconds = "caps_query_timeout_seconds"
            case maxInterestedResources = "max_interested_resources"
            case notificationsPerSecond = "notifications_per_second"
            case notificationBurst = "notification_burst"
        }
    }

    /// The message archive (`mam`, XEP-0313).
    public struct MAMSettings: Codable, Sendable, Equatable {
        /// Days a message is kept; 0 keeps it for good.
        public var retentionDays = 0
        /// Per hosted domain, in place of `retention_days` (customer.example: 30).
        public var domainRetentionDays: [String: Int] = [:]
        /// Messages in one page when the client does not say (RSM `max`) …
        public var defaultPageSize = 50
        /// … and at most, whatever it says.
        public var maxPageSize = 250
        /// What an account without preferences archives: always, never or roster.
        public var defaultPreference = "always"
        /// Messages kept per account, the oldest going first; 0 keeps every one (the
        /// retention still applies). Checked every 64 appends, so an archive may hold up to
        /// 64 more for a while.
        public var maxMessagesPerAccount = 0

        public init() {}

        enum CodingKeys: String, CodingKey {
            case retentionDays = "retention_days"
            case domainRetentionDays = "domain_retention_days"
            case defaultPageSize = "default_page_size"
            case maxPageSize = "max_page_size"
            case defaultPreference = "default_preference"
            case maxMessagesPerAccount = "max_messages_per_account"
        }
    }

    /// STUN and TURN servers for calls (XEP-0215), with TURN credentials computed from a secret
    /// shared with the TURN server, as coturn's REST API (`use-auth-secret`) expects.
    public struct ExternalServices: Codable, Sendable, Equatable {
        public struct Service: Codable, Sendable, Equatable {
            /// stun, turn, turns.
            public var type: String
            public var host: String
            public var port: Int?
            /// udp or tcp.
            public var transport: String?
            /// Whether it needs credentials (TURN does).
            public var restricted: Bool?

            public init(type: String, host: String, port: Int? = nil, transport: String? = nil, restricted: Bool? = nil) {
                self.type = type
                self.host = host
                self.port = port
                self.transport = transport
                self.restricted = restricted
            }
        }

        public var services: [Service] = []
        /// The TURN server's shared secret (coturn `static-auth-secret`); empty: none.
        public var secret = ""
        /// How long computed credentials are valid.
        public var credentialSeconds = 86_400

        public init() {}

        enum CodingKeys: String, CodingKey {
            case services, secret
            case credentialSeconds = "credential_seconds"
        }
    }

    /// Push notifications (XEP-0357): what a notification to the app server says.
    public struct PushSettings: Codable, Sendable, Equatable {
        /// The sender's bare JID in the notification (the app server, Apple or Google see it).
        public var includeSender = false
        /// The message body in the notification.
        public var includeBody = false
        /// Errors in a row from an app server after which the registration is dropped.
        public var maxErrors = 3
        /// Registrations one account may have (one per device).
        public var maxRegistrations = 20

        public init() {}

        enum CodingKeys: String, CodingKey {
            case includeSender = "include_sender"
            case includeBody = "include_body"
            case maxErrors = "max_errors"
            case maxRegistrations = "max_registrations"
        }
    }

    /// Contact addresses (XEP-0157) in every hosted domain's `disco#info`: URIs (`mailto:`,
    /// `xmpp:`, `https:`) by kind, for all domains, and per domain (a kind given for a domain
    /// replaces the provider's for that kind).
    public struct ContactAddresses: Codable, Sendable, Equatable {
        public var addresses: [String: [String]] = [:]
        public var domains: [String: [String: [String]]] = [:]

        /// The kinds XEP-0157 §3 registers (`abuse` is the field `abuse-addresses`).
        public static let kinds = ["abuse", "admin", "feedback", "sales", "security", "status", "support"]

        public init() {}

        /// The addresses for `domain`, by kind.
        public func forDomain(_ domain: String) -> [String: [String]] {
            addresses.merging(domains[domain] ?? [:]) { _, perDomain in perDomain }
        }

        /// What is wrong: unknown kinds, values that are not URIs.
        public var problems: [String] {
            var problems: [String] = []
            for (place, table) in [("contact_addresses", addresses)] + domains.map({ ("contact_addresses.domains.\($0.key)", $0.value) }) {
                for (kind, uris) in table {
                    if !Self.kinds.contains(kind) { problems.append("\(place).\(kind): not one of \(Self.kinds.joined(separator: ", "))") }
                    for uri in uris where !uri.contains(":") || uri.contains(" ") {
                        problems.append("\(place).\(kind): '\(uri)' is not a URI (mailto:, xmpp:, https:)")
                    }
                }
            }
            return problems.sorted()
        }

        // In YAML the provider's kinds sit beside `domains` (contact_addresses.abuse: [...]).
        public init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: AnyKey.self)
            for key in container.allKeys {
                if key.stringValue == "domains" {
                    domains = try container.decode([String: [String: [String]]].self, forKey: key)
                } else {
                    addresses[key.stringValue] = try container.decode([String].self, forKey: key)
                }
            }
        }

        public func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: AnyKey.self)
            for (kind, uris) in addresses { try container.encode(uris, forKey: AnyKey(kind)) }
            try container.encode(domains, forKey: AnyKey("domains"))
        }

        struct AnyKey: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(_ string: String) { stringValue = string }
            init?(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }
    }

    /// One service's settings (`services.NAME`); what is not given keeps the module's default.
    public struct ServiceSettings: Codable, Sendable, Equatable {
        /// The label of the service domain under every hosted domain (`conference`).
        public var subdomain: String?
        /// Off: no hosted domain has the service.
        public var enabled: Bool?

        public init(subdomain: String? = nil, enabled: Bool? = nil) {
            self.subdomain = subdomain
            self.enabled = enabled
        }

        enum CodingKeys: String, CodingKey, CaseIterable {
            case subdomain, enabled
        }

        static let configurationKeys = Set(CodingKeys.allCases.map(\.stringValue))
    }

    public struct ClientSettings: Codable, Sendable, Equatable {
        /// The address listeners bind to.
        public var address: String = "0.0.0.0"
        /// STARTTLS listener (RFC 6120); null disables it, 0 picks a free port (tests).
        public var starttlsPort: Int? = 5222
        /// Direct TLS listener (XEP-0368, ALPN `xmpp-client`); null disables it.
        public var directTLSPort: Int? = 5223
        /// Require STARTTLS before anything else (RFC 6120 §5.3.1).
        public var requireTLS: Bool = true
        /// Offer SASL PLAIN (only ever inside TLS).
        public var allowPlain: Bool = true
        /// Largest stanza accepted from a client, in bytes (at least 10,000; RFC 6120 §13.12).
        public var maxStanzaBytes: Int = 256 * 1024
        /// Sustained stanzas per second per session; above it the stream is closed with
        /// `policy-violation`.
        public var stanzasPerSecond: Double = 200
        /// Burst allowance on top of the sustained rate.
        public var stanzaBurst: Double = 1000
        /// Bytes waiting to be written to a slow client before its stream is closed with
        /// `resource-constraint`.
        public var maxOutboundBytes: Int = 4 * 1024 * 1024
        /// Seconds a client may take to authenticate and bind.
        public var negotiationTimeoutSeconds: Int = 60
        /// Seconds without any data from the client before `connection-timeout`.
        public var idleTimeoutSeconds: Int = 600
        /// Seconds of outbound silence after which a whitespace keepalive is sent.
        public var keepaliveSeconds: Int = 60
        /// What happens when a client binds a resource already in use: `replace` (the old
        /// session gets `<conflict/>`), `refuse` (the new bind fails), or `rename` (the server
        /// picks another resource).
        public var resourceConflict: ResourceConflictPolicy = .replace

        public init() {}

        enum CodingKeys: String, CodingKey {
            case address
            case starttlsPort = "starttls_port"
            case directTLSPort = "direct_tls_port"
            case requireTLS = "require_tls"
            case allowPlain = "allow_plain"
            case maxStanzaBytes = "max_stanza_bytes"
            case stanzasPerSecond = "stanzas_per_second"
            case stanzaBurst = "stanza_burst"
            case maxOutboundBytes = "max_outbound_bytes"
            case negotiationTimeoutSeconds = "negotiation_timeout_seconds"
            case idleTimeoutSeconds = "idle_timeout_seconds"
            case keepaliveSeconds = "keepalive_seconds"
            case resourceConflict = "resource_conflict"
        }
    }

    public enum ResourceConflictPolicy: String, Codable, Sendable, Equatable {
        case replace, refuse, rename
    }

    public struct AuthSettings: Codable, Sendable, Equatable {
        /// PBKDF2 iterations for new SCRAM credentials (RFC 7677 asks for at least 4096).
        public var scramIterations: Int = 10_000

        public init() {}

        enum CodingKeys: String, CodingKey {
            case scramIterations = "scram_iterations"
        }
    }

    public struct TLSSettings: Codable, Sendable, Equatable {
        /// Create a self-signed certificate, on first use, for a hosted domain that no
        /// configured certificate covers. Convenient for development; turn it off in
        /// production so a missing certificate is an error you notice.
        public var selfSignMissing: Bool = true
        /// Certificate files. Each covers the domains its certificate names (or those listed).
        public var certificates: [CertificateFiles] = []

        public init() {}

        enum CodingKeys: String, CodingKey {
            case selfSignMissing = "self_sign_missing"
            case certificates
        }
    }

    public struct CertificateFiles: Codable, Sendable, Equatable {
        /// PEM file with the certificate chain, leaf first.
        public var certificate: String
        /// PEM file with the private key.
        public var key: String
        /// The domains to use it for; when absent, every name the certificate covers.
        public var domains: [String]?

        public init(certificate: String, key: String, domains: [String]? = nil) {
            self.certificate = certificate
            self.key = key
            self.domains = domains
        }
    }

    public struct OfflineSettings: Codable, Sendable, Equatable {
        /// Messages kept per account while it is offline; beyond that, senders get
        /// `service-unavailable`.
        public var maxMessagesPerUser: Int = 500

        public init() {}

        enum CodingKeys: String, CodingKey {
            case maxMessagesPerUser = "max_messages_per_user"
        }
    }

    public struct StreamManagementSettings: Codable, Sendable, Equatable {
        /// Offer XEP-0198.
        public var enabled: Bool = true
        /// Seconds a dropped session waits to be resumed.
        public var resumeTimeoutSeconds: Int = 300
        /// Unacknowledged stanzas kept per session; beyond that the stream is closed with
        /// `resource-constraint` rather than losing any.
        public var maxUnackedStanzas: Int = 5000

        public init() {}

        enum CodingKeys: String, CodingKey {
            case enabled
            case resumeTimeoutSeconds = "resume_timeout_seconds"
            case maxUnackedStanzas = "max_unacked_stanzas"
        }
    }
}

// MARK: - Loading

/// A configuration problem, reported before anything starts.
public struct ConfigurationError: Error, CustomStringConvertible, Sendable {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

extension BraidConfiguration {
    /// Where the configuration comes from, in order: `--config PATH`, `BRAID_CONFIG`, then
    /// `./braid.yaml` (or `./braid.yml`) if present. Nil means none: the defaults.
    public static func locateFile(explicit: String?, environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        if let explicit { return explicit }
        if let fromEnvironment = environment["BRAID_CONFIG"], !fromEnvironment.isEmpty { return fromEnvironment }
        for candidate in ["braid.yaml", "braid.yml"] where FileManager.default.fileExists(atPath: candidate) {
            return candidate
        }
        return nil
    }

    /// Loads the configuration from `path` (nil: defaults only), then applies environment
    /// overrides. Unknown keys are errors, so a typo is reported instead of ignored.
    public static func load(path: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> BraidConfiguration {
        var text = ""
        if let path {
            do {
                text = try String(contentsOfFile: path, encoding: .utf8)
            } catch {
                throw ConfigurationError("cannot read configuration file \(path): \(error.localizedDescription)")
            }
        }
        return try parse(yaml: text, environment: environment, source: path ?? "defaults")
    }

    /// Parses YAML text over the defaults, then applies environment overrides.
    public static func parse(yaml: String, environment: [String: String] = [:], source: String = "configuration") throws -> BraidConfiguration {
        let defaultsNode = try Yams.compose(yaml: YAMLEncoder().encode(BraidConfiguration())) ?? Node.Mapping([]).node
        var userNode: Node
        do {
            userNode = try Yams.compose(yaml: yaml) ?? Node.Mapping([]).node
        } catch {
            throw ConfigurationError("\(source): not valid YAML: \(error)")
        }
        if case .scalar(let scalar) = userNode, ["", "~", "null", "Null", "NULL"].contains(scalar.string) {
            userNode = Node.Mapping([]).node
        }
        guard userNode.mapping != nil else {
            throw ConfigurationError("\(source): the top level must be a mapping of keys to values")
        }
        try checkKeys(userNode, against: defaultsNode, path: [], source: source)

        var merged = merge(defaultsNode, userNode)
        for path in leafPaths(of: defaultsNode) {
            let variable = "BRAID_" + path.joined(separator: "_").uppercased()
            guard let value = environment[variable] else { continue }
            let valueNode: Node
            do {
                valueNode = try Yams.compose(yaml: value) ?? Node("")
            } catch {
                throw ConfigurationError("\(variable): not a valid value: \(error)")
            }
            merged = setting(valueNode, at: path, in: merged)
        }
        do {
            return try YAMLDecoder().decode(BraidConfiguration.self, from: merged)
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.dataCorrupted(context) {
            throw ConfigurationError("\(source): bad value at \(context.codingPath.map(\.stringValue).joined(separator: ".")): \(context.debugDescription)")
        } catch {
            throw ConfigurationError("\(source): \(error)")
        }
    }

    /// Mappings whose keys the operator chooses (peer domains), with the keys each entry may
    /// hold, or nil when entries are plain values. Their defaults are empty, so they cannot
    /// be checked against the defaults like the rest.
    private static let openMappings: [String: Set<String>?] = [
        "s2s.peers": FederationConfiguration.PeerSettings.configurationKeys,
        "s2s.posh_connect_overrides": nil,
        "services": ServiceSettings.configurationKeys,
        "mam.domain_retention_days": nil,
        "upload.domain_retention_days": nil,
        // Kinds are checked when the server starts (ContactAddresses.problems).
        "contact_addresses": nil,
    ]

    /// Rejects keys the defaults do not have. Lists (like `tls.certificates`) are checked by
    /// decoding instead.
    private static func checkKeys(_ node: Node, against defaults: Node, path: [String], source: String) throws {
        guard let mapping = node.mapping, let defaultMapping = defaults.mapping else { return }
        if let entryKeys = openMappings[path.joined(separator: ".")] {
            for (key, value) in mapping {
                guard let name = key.string else { throw ConfigurationError("\(source): keys must be strings") }
                guard let entryKeys else { continue }
                for (inner, _) in value.mapping ?? Node.Mapping([]) {
                    guard let innerName = inner.string, entryKeys.contains(innerName) else {
                        let location = (path + [name, inner.string ?? "?"]).joined(separator: ".")
                        throw ConfigurationError("\(source): unknown key '\(location)'")
                    }
                }
            }
            return
        }
        for (key, value) in mapping {
            guard let name = key.string else { throw ConfigurationError("\(source): keys must be strings") }
            guard let defaultValue = defaultMapping[name] else {
                let location = (path + [name]).joined(separator: ".")
                throw ConfigurationError("\(source): unknown key '\(location)'")
            }
            try checkKeys(value, against: defaultValue, path: path + [name], source: source)
        }
    }

    /// `override` laid over `base`, mapping by mapping.
    private static func merge(_ base: Node, _ override: Node) -> Node {
        guard var baseMapping = base.mapping, let overrideMapping = override.mapping else { return override }
        for (key, value) in overrideMapping {
            if let existing = baseMapping[key] {
                baseMapping[key] = merge(existing, value)
            } else {
                baseMapping[key] = value
            }
        }
        return baseMapping.node
    }

    private static func leafPaths(of node: Node, prefix: [String] = []) -> [[String]] {
        guard let mapping = node.mapping else { return [prefix] }
        var paths: [[String]] = []
        for (key, value) in mapping {
            guard let name = key.string else { continue }
            paths += leafPaths(of: value, prefix: prefix + [name])
        }
        return paths
    }

    private static func setting(_ value: Node, at path: [String], in node: Node) -> Node {
        guard let first = path.first else { return value }
        var mapping = node.mapping ?? Node.Mapping([])
        let child = mapping[first] ?? Node.Mapping([]).node
        mapping[first] = setting(value, at: Array(path.dropFirst()), in: child)
        return mapping.node
    }
}

extension Node.Mapping {
    fileprivate var node: Node { .mapping(self) }
}
