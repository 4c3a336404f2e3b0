import Foundation
import XMPPCore

/// Everything Braid persists, behind one protocol.
///
/// SQLite (``SQLiteStorage``) is the embedded default; PostgreSQL (``PostgresStorage``) sits
/// behind the same protocol with the same semantics; ``StorageSettings/open(dataDirectory:logger:eventLoopGroup:)``
/// picks one from the configuration. Every method may be
/// called from any task; none blocks an event loop (implementations do their I/O on their
/// own threads and are awaited).
///
/// Users are identified by bare JIDs (`localpart@domainpart`), already canonical.
///
/// For an account that does not exist, reads return empty results (a version-0 roster, no
/// item, no requests, no messages) and writes throw ``StorageError/userNotFound``; removing
/// something that is not there does nothing. A roster contact is a bare or domain JID.
public protocol Storage: Sendable {
    // MARK: Hosted domains

    /// All hosted domains, sorted by name.
    func domains() async throws -> [HostedDomain]

    /// Adds a hosted domain. Returns false if it was already hosted.
    @discardableResult
    func addDomain(_ name: String) async throws -> Bool

    /// Adds many hosted domains in one transaction (provisioning thousands of customer
    /// domains one transaction each would cost one disk sync each). Returns how many were new.
    /// Throws, adding nothing, if any name is not a valid domain.
    @discardableResult
    func addDomains(_ names: [String]) async throws -> Int

    /// Removes a hosted domain and everything stored for its users (accounts, rosters,
    /// offline messages, subscription requests). Returns false if it was not hosted.
    @discardableResult
    func removeDomain(_ name: String) async throws -> Bool

    /// A number that changes whenever the set of hosted domains changes, whichever process
    /// made the change. A running server polls it to pick up `braid domain add|remove`.
    func domainsGeneration() async throws -> Int64

    // MARK: Accounts

    /// Creates an account. Throws ``StorageError/userExists`` if there already is one, and
    /// ``StorageError/unknownDomain`` if the domain is not hosted.
    func createUser(_ user: JID, credentials: StoredCredentials) async throws

    /// Replaces an account's credentials. Throws ``StorageError/userNotFound``.
    func setCredentials(_ user: JID, credentials: StoredCredentials) async throws

    /// Removes an account and everything stored for it. Returns false if there was none.
    @discardableResult
    func removeUser(_ user: JID) async throws -> Bool

    /// The stored credentials, or nil when the account does not exist.
    func credentials(for user: JID) async throws -> StoredCredentials?

    func userExists(_ user: JID) async throws -> Bool

    /// The accounts of one domain, sorted.
    func users(in domain: String) async throws -> [JID]

    // MARK: Rosters (RFC 6121 §2) with versioning (RFC 6121 §2.6)

    /// The whole roster and its current version.
    func roster(of user: JID) async throws -> Roster

    /// One roster item, or nil.
    func rosterItem(of user: JID, contact: JID) async throws -> RosterItem?

    /// Inserts or replaces the item for `item.jid`. Returns the new roster version.
    @discardableResult
    func putRosterItem(_ item: RosterItem, of user: JID) async throws -> Int64

    /// Removes the item for `contact`. Returns the new roster version, or nil if there was
    /// no such item (and the version did not change).
    @discardableResult
    func removeRosterItem(of user: JID, contact: JID) async throws -> Int64?

    // MARK: Inbound subscription requests (RFC 6121 §3.1.3)

    /// Stores an inbound `subscribe` the user has not answered yet, replacing any earlier one
    /// from the same contact. `stanza` is the serialized presence.
    func putSubscriptionRequest(of user: JID, from contact: JID, stanza: String) async throws

    /// Removes the stored request from `contact`, if any.
    func removeSubscriptionRequest(of user: JID, from contact: JID) async throws

    /// The stored requests, oldest first.
    func subscriptionRequests(of user: JID) async throws -> [StoredStanza]

    // MARK: Offline messages

    /// Stores a message for a user who is offline. Returns false, storing nothing, when the
    /// user already has `limit` messages waiting.
    func storeOfflineMessage(for user: JID, stanza: String, limit: Int) async throws -> Bool

    /// Removes and returns the waiting messages, oldest first.
    func takeOfflineMessages(for user: JID) async throws -> [StoredStanza]

    func offlineMessageCount(for user: JID) async throws -> Int

    // MARK: Persistent group-chat rooms (XEP-0045)

    /// Every persistent room. The group-chat module owns the contents of `configuration`
    /// and `affiliations`; storage keeps them as given.
    func groupChatRooms() async throws -> [StoredRoom]

    /// Inserts or replaces a room. Throws ``StorageError/unknownDomain`` if its parent
    /// domain is not hosted (a room goes with its domain).
    func putGroupChatRoom(_ room: StoredRoom) async throws

    /// Removes a room; returns false if there was none.
    @discardableResult
    func removeGroupChatRoom(_ jid: JID) async throws -> Bool

    // MARK: Account stores (a module's keyed values per account)

    /// The entries of `store` for `user`, oldest write first. A module owns its store names
    /// (`pep`, `pep/NODE`, `private`, `vcard`, `blocklist` …) and the contents of values, as a
    /// Prosody module owns its map store; storage keeps them as given, and removing the
    /// account removes them.
    func storeEntries(_ store: String, of user: JID) async throws -> [StoredEntry]

    /// One entry, or nil.
    func storeEntry(_ store: String, of user: JID, key: String) async throws -> StoredEntry?

    /// Inserts or replaces an entry; a replaced entry becomes the newest. With `keepLast`,
    /// then removes the oldest entries beyond that many, in the same transaction. Throws
    /// ``StorageError/userNotFound`` if the account does not exist.
    func putStoreEntry(_ store: String, of user: JID, key: String, value: String, keepLast: Int?) async throws

    /// Removes an entry; false if there was none.
    @discardableResult
    func removeStoreEntry(_ store: String, of user: JID, key: String) async throws -> Bool

    /// Removes every entry of `store` for `user`; returns how many there were.
    @discardableResult
    func removeStore(_ store: String, of user: JID) async throws -> Int

    // MARK: Provisioning API (tokens and audit log)

    /// Every API token (hashes only), by id.
    func apiTokens() async throws -> [StoredAPIToken]

    /// Inserts a token; throws ``StorageError/tokenExists`` when its id or hash exists.
    func addAPIToken(_ token: StoredAPIToken) async throws

    /// Removes a token; false if there was none.
    @discardableResult
    func removeAPIToken(id: String) async throws -> Bool

    /// Appends an entry to the audit log.
    func appendAuditEntry(_ entry: AuditEntry) async throws

    /// The newest `limit` entries, newest first; with `domain`, only those whose target is
    /// that domain or an account or setting of it.
    func auditEntries(limit: Int, domain: String?) async throws -> [AuditEntry]

    /// Every hosted domain's settings that differ from the server's defaults (schema v7),
    /// by canonical domain name; a domain without overrides is absent.
    func domainSettings() async throws -> [String: DomainSettings]

    /// Replaces `domain`'s settings (empty ones remove its row), in one transaction that also
    /// bumps ``domainsGeneration()`` (and tells, on PostgreSQL), so every server sharing the
    /// storage re-reads them as it re-reads the domains. Throws
    /// ``StorageError/unknownDomain`` when the domain is not hosted.
    func setDomainSettings(_ settings: DomainSettings, for domain: String) async throws

    // MARK: Message archive (XEP-0313)

    /// Appends a message to `user`'s archive. Throws ``StorageError/userNotFound`` if the
    /// account does not exist. With `expireBefore` (milliseconds since 1970), also removes the account's entries
    /// older than that, in the same transaction (retention). With `keepLast`, the account's
    /// oldest entries beyond that many go too (a quota); checked on about one append in
    /// ``archiveQuotaCheckInterval``, so an archive may exceed it by that much for a while.
    func archive(_ message: ArchivedMessage, for user: JID, expireBefore: Int64?, keepLast: Int?) async throws

    /// One page of `user`'s archive (see ``ArchiveQuery``). Throws
    /// ``StorageError/itemNotFound`` when an `after`/`before` id is not in the archive.
    func archivedMessages(_ query: ArchiveQuery, for user: JID) async throws -> ArchivePage

    /// Appends a message to a group-chat room's archive. Throws ``StorageError/unknownDomain``
    /// if the room's hosted domain is not there (the archive goes with its domain).
    func archiveRoomMessage(_ message: ArchivedMessage, room: JID, parentDomain: String, expireBefore: Int64?) async throws

    /// One page of a room's archive, as ``archivedMessages(_:for:)``.
    func archivedRoomMessages(_ query: ArchiveQuery, room: JID) async throws -> ArchivePage

    /// Removes a room's archive (the room was destroyed); returns how many entries.
    @discardableResult
    func removeRoomArchive(_ room: JID) async throws -> Int

    // MARK: Life cycle

    /// Connects and brings the schema up to date, if the backend has not yet (a server
    /// calls it before anything else; a backend that is unreachable says so here).
    func prepare() async throws

    /// Tells when the set of hosted domains may have changed, whichever process changed it:
    /// an element at once, then one after each change (a change may be reported more than
    /// once). SQLite polls ``domainsGeneration()`` every `pollInterval`; PostgreSQL is told
    /// by `LISTEN/NOTIFY` and polls only as a safety net. Ends when the task is cancelled.
    func domainChanges(pollInterval: Duration) -> AsyncStream<Void>

    /// Releases connections and background tasks. The storage is not used afterwards.
    func close() async
}

extension Storage {
    public func prepare() async throws {}

    public func close() async {}

    /// Polling ``domainsGeneration()``: for backends that cannot be told.
    public func domainChanges(pollInterval: Duration) -> AsyncStream<Void> {
        AsyncStream { continuation in
            let task = Task {
                var seen: Int64?
                while !Task.isCancelled {
                    let generation = try? await domainsGeneration()
                    if seen == nil || (generation != nil && generation != seen) {
                        seen = generation ?? seen ?? -1
                        continuation.yield()
                    }
                    do { try await Task.sleep(for: pollInterval) } catch { break }
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

/// A roster item's groups as both backends store them: a JSON array of strings (always
/// read and written with the item; no query looks inside).
enum RosterGroupsColumn {
    static func encode(_ groups: [String]) throws -> String {
        String(decoding: try JSONEncoder().encode(groups), as: UTF8.self)
    }

    /// Nil when the column does not hold a JSON array of strings.
    static func decode(_ json: String) -> [String]? {
        try? JSONDecoder().decode([String].self, from: Data(json.utf8))
    }
}

/// The keys accounts and contacts are stored under: their canonical JID strings, computed
/// here once for every backend, so that a copy between backends keeps every key.
public enum StorageKeys {
    /// An account: a bare JID with a localpart.
    public static func account(_ jid: JID) throws(StorageError) -> String {
        guard jid.localpart != nil, jid.resourcepart == nil else { throw .notAnAccount }
        return jid.description
    }

    /// A roster contact or the sender of a request: servers and components (no localpart)
    /// are allowed, but always bare.
    public static func contact(_ jid: JID) throws(StorageError) -> String {
        guard jid.resourcepart == nil else { throw .notAnAccount }
        return jid.description
    }

    /// A hosted domain name, canonical (U-label, lower case).
    public static func domain(_ name: String) throws -> String {
        try JID(domain: name).domainpart
    }
}

/// One archived message (XEP-0313).
public struct ArchivedMessage: Sendable, Hashable {
    /// The archive's id for it (XEP-0359 `stanza-id`), unique within the archive.
    public var id: String
    /// The other party's bare JID (the sender for messages received, the recipient for sent).
    public var with: String
    /// Milliseconds since 1970, when it was archived.
    public var stamp: Int64
    /// The message as archived.
    public var stanza: String

    public init(id: String, with: String, stamp: Int64, stanza: String) {
        self.id = id
        self.with = with
        self.stamp = stamp
        self.stanza = stanza
    }
}

/// A question to an archive: filters (XEP-0313 §4.1.1 and `#extended`), and a page
/// (XEP-0059): after or before an id (an empty `before` is the last page), at most `limit`.
public struct ArchiveQuery: Sendable, Hashable {
    public var with: String?
    public var start: Int64?
    public var end: Int64?
    /// Entries after this id (RSM `after`, or the form's `after-id`).
    public var after: String?
    /// Entries before this id (RSM `before`, or the form's `before-id`).
    public var before: String?
    /// The last page (RSM `<before/>` without an id).
    public var lastPage = false
    /// Only these ids (the form's `ids`).
    public var ids: [String]?
    public var limit: Int

    public init(with: String? = nil, start: Int64? = nil, end: Int64? = nil, after: String? = nil, before: String? = nil,
                lastPage: Bool = false, ids: [String]? = nil, limit: Int) {
        self.with = with
        self.start = start
        self.end = end
        self.after = after
        self.before = before
        self.lastPage = lastPage
        self.ids = ids
        self.limit = limit
    }

    /// Paging backwards: the page is the newest `limit` before its bound.
    public var backwards: Bool { before != nil || lastPage }
}

/// A page of an archive, oldest first.
public struct ArchivePage: Sendable, Hashable {
    public var messages: [ArchivedMessage]
    /// No more entries lie beyond the page in the direction of paging.
    public var complete: Bool
    /// Entries matching the filters, all pages together.
    public var count: Int
    /// The position of the page's first entry among them (RSM `index`).
    public var firstIndex: Int

    public init(messages: [ArchivedMessage], complete: Bool, count: Int, firstIndex: Int) {
        self.messages = messages
        self.complete = complete
        self.count = count
        self.firstIndex = firstIndex
    }
}

/// One entry of an account store.
public struct StoredEntry: Sendable, Hashable {
    public var key: String
    public var value: String
    /// Write order within the store: a later write has a larger one.
    public var seq: Int64
    /// Milliseconds since 1970, of the last write.
    public var updatedAt: Int64

    public init(key: String, value: String, seq: Int64, updatedAt: Int64) {
        self.key = key
        self.value = value
        self.seq = seq
        self.updatedAt = updatedAt
    }
}

/// A hosted domain's own settings, where it differs from the server's configuration.
public struct DomainSettings: Sendable, Hashable {
    /// Services (`services.NAME`, by module name: `muc`, `upload`, …) turned on (true) or off
    /// (false) for this domain; a service not named follows the server's configuration.
    public var services: [String: Bool]
    /// Whether ACME manages the domain's certificate; false: the domain brings its own. Nil:
    /// as the server is configured.
    public var acme: Bool?

    public init(services: [String: Bool] = [:], acme: Bool? = nil) {
        self.services = services
        self.acme = acme
    }

    /// No override at all: the server's defaults.
    public var isEmpty: Bool { services.isEmpty && acme == nil }
}

/// A provisioning API bearer token as stored: its SHA-256 (hex), never the token.
public struct StoredAPIToken: Sendable, Hashable {
    /// A short public id, for listing, removal and the audit log.
    public var id: String
    public var hash: String
    /// The hosted domains the token may manage; nil: provider-wide.
    public var domains: [String]?
    public var label: String
    /// Seconds since 1970.
    public var createdAt: Int64
    /// When it stops working (seconds since 1970); nil: until revoked.
    public var expiresAt: Int64?

    public init(id: String, hash: String, domains: [String]?, label: String, createdAt: Int64, expiresAt: Int64? = nil) {
        self.id = id
        self.hash = hash
        self.domains = domains
        self.label = label
        self.createdAt = createdAt
        self.expiresAt = expiresAt
    }

    public func isExpired(at time: Date) -> Bool {
        expiresAt.map { Double($0) <= time.timeIntervalSince1970 } ?? false
    }
}

/// One change (or refused attempt) made through the provisioning API.
public struct AuditEntry: Sendable, Hashable {
    /// Milliseconds since 1970.
    public var at: Int64
    /// The token used; nil when none was valid.
    public var tokenID: String?
    /// `domain.add`, `account.create`, `auth.refused`, …
    public var action: String
    /// The domain, account or path acted on.
    public var target: String
    /// `ok`, `refused`, `conflict`, `not-found`, …
    public var outcome: String
    public var detail: String

    public init(at: Int64, tokenID: String?, action: String, target: String, outcome: String, detail: String = "") {
        self.at = at
        self.tokenID = tokenID
        self.action = action
        self.target = target
        self.outcome = outcome
        self.detail = detail
    }

    /// Whether the entry concerns `domain` (itself, an account or a service of it).
    public func concerns(_ domain: String) -> Bool {
        target == domain || target.hasSuffix("@\(domain)") || target.hasSuffix(".\(domain)")
    }
}

/// A persistent group-chat room as stored.
public struct StoredRoom: Sendable, Hashable {
    /// The bare room JID (`room@conference.customer.example`).
    public var jid: JID
    /// The hosted domain whose service holds it: removing that domain removes the room.
    public var parentDomain: String
    public var configuration: String
    public var affiliations: String
    /// Seconds since 1970.
    public var createdAt: Int64

    public init(jid: JID, parentDomain: String, configuration: String, affiliations: String, createdAt: Int64) {
        self.jid = jid
        self.parentDomain = parentDomain
        self.configuration = configuration
        self.affiliations = affiliations
        self.createdAt = createdAt
    }
}

/// A hosted domain.
public struct HostedDomain: Sendable, Hashable {
    public var name: String
    /// Seconds since 1970 when the domain was added.
    public var addedAt: Int64

    public init(name: String, addedAt: Int64) {
        self.name = name
        self.addedAt = addedAt
    }
}

/// SCRAM credentials for one hash function (RFC 5802 §3). The password itself is never
/// stored; PLAIN logins are checked by deriving the same keys.
public struct ScramCredentials: Sendable, Hashable, Codable {
    public var salt: [UInt8]
    public var iterations: Int
    public var storedKey: [UInt8]
    public var serverKey: [UInt8]

    public init(salt: [UInt8], iterations: Int, storedKey: [UInt8], serverKey: [UInt8]) {
        self.salt = salt
        self.iterations = iterations
        self.storedKey = storedKey
        self.serverKey = serverKey
    }
}

/// What an account stores to authenticate: SCRAM keys for SHA-1 and SHA-256.
public struct StoredCredentials: Sendable, Hashable, Codable {
    public var sha1: ScramCredentials
    public var sha256: ScramCredentials

    public init(sha1: ScramCredentials, sha256: ScramCredentials) {
        self.sha1 = sha1
        self.sha256 = sha256
    }
}

/// RFC 6121 §2.1.2.5 subscription states as stored on a roster item.
public enum Subscription: String, Sendable, Hashable, Codable, CaseIterable {
    case none, to, from, both
}

/// A roster item (RFC 6121 §2.1.2) plus the subscription flags RFC 6121 Appendix A needs.
public struct RosterItem: Sendable, Hashable {
    /// The contact's bare JID.
    public var jid: JID
    public var name: String?
    public var subscription: Subscription
    /// "Pending Out": the user asked to subscribe and the contact has not answered (`ask='subscribe'`).
    public var pendingOut: Bool
    /// "Pending In": the contact asked to subscribe and the user has not answered.
    public var pendingIn: Bool
    /// The user pre-approved a subscription request from the contact (RFC 6121 §3.4).
    public var approved: Bool
    public var groups: [String]

    public init(jid: JID, name: String? = nil, subscription: Subscription = .none, pendingOut: Bool = false, pendingIn: Bool = false, approved: Bool = false, groups: [String] = []) {
        self.jid = jid
        self.name = name
        self.subscription = subscription
        self.pendingOut = pendingOut
        self.pendingIn = pendingIn
        self.approved = approved
        self.groups = groups
    }
}

/// A roster and its version (RFC 6121 §2.6).
public struct Roster: Sendable, Hashable {
    public var version: Int64
    public var items: [RosterItem]

    public init(version: Int64, items: [RosterItem]) {
        self.version = version
        self.items = items
    }
}

/// A stanza stored for later delivery, with when it was stored (for XEP-0203 delay stamps).
public struct StoredStanza: Sendable, Hashable {
    public var stanza: String
    /// Milliseconds since 1970.
    public var storedAt: Int64

    public init(stanza: String, storedAt: Int64) {
        self.stanza = stanza
        self.storedAt = storedAt
    }
}

/// Failures a caller can act on. Anything else is an internal error of the backend.
public enum StorageError: Error, Sendable, Hashable {
    case userExists
    case userNotFound
    case unknownDomain
    /// The JID given where a bare account JID is expected has a resource or no localpart.
    case notAnAccount
    /// An id named in a query (an archive page's `after` or `before`) is not there.
    case itemNotFound
    /// An API token with that id or hash exists already.
    case tokenExists
}

/// How often an append checks the archive's quota (on appends whose row id is a multiple of
/// it): counting an account's entries on every append would cost more than the append.
public let archiveQuotaCheckInterval: Int64 = 64

extension Storage {
    /// An append without a quota.
    public func archive(_ message: ArchivedMessage, for user: JID, expireBefore: Int64?) async throws {
        try await archive(message, for: user, expireBefore: expireBefore, keepLast: nil)
    }
}
