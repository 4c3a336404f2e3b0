import Synchronization
import XMPPCore

/// The bound client sessions, by account and resource, with what routing needs to know about
/// each: its current available presence and priority, and whether it asked for roster pushes
/// or carbons. Routing reads it from any thread; sessions update their own entries.
public final class SessionRegistry: Sendable {
    public struct Entry: Sendable {
        public let session: ClientSession
        /// The last available presence the resource broadcast, or nil before initial presence
        /// and after unavailable (RFC 6121 §4.2).
        public var presence: XMLElement?
        public var priority: Int
        /// The resource asked for the roster, so it gets roster pushes (RFC 6121 §2.1.6).
        public var interestedInRoster: Bool
        /// XEP-0280 carbons are enabled.
        public var carbons: Bool
        /// Entities that got directed presence outside the roster (RFC 6121 §4.6), which must
        /// get unavailable presence when the resource goes offline.
        public var directedPresence: Set<JID>

        init(session: ClientSession) {
            self.session = session
            presence = nil
            priority = 0
            interestedInRoster = false
            carbons = false
            directedPresence = []
        }

        public var isAvailable: Bool { presence != nil }
    }

    public enum BindOutcome: Sendable {
        /// Bound; `replaced` is a session that held the resource and must be closed.
        case bound(replaced: ClientSession?)
        /// The resource is taken and the policy refuses to replace it.
        case conflict
    }

    private let accounts = Mutex<[JID: [String: Entry]]>([:])

    public init() {}

    /// Registers `session` under its full JID.
    public func bind(_ session: ClientSession, replacing: Bool) -> BindOutcome {
        let account = session.jid.bare
        let resource = session.jid.resourcepart ?? ""
        return accounts.withLock { accounts in
            var resources = accounts[account] ?? [:]
            let existing = resources[resource]
            if existing != nil && !replacing { return .conflict }
            resources[resource] = Entry(session: session)
            accounts[account] = resources
            return .bound(replaced: existing?.session)
        }
    }

    /// Puts `session` in place of `previous` (XEP-0198 resumption), keeping the entry's
    /// presence and flags. Returns false if `previous` is no longer registered.
    public func replace(_ previous: ClientSession, with session: ClientSession) -> Bool {
        accounts.withLock { accounts in
            let account = previous.jid.bare
            let resource = previous.jid.resourcepart ?? ""
            guard var resources = accounts[account], let entry = resources[resource], entry.session === previous else { return false }
            var moved = Entry(session: session)
            moved.presence = entry.presence
            moved.priority = entry.priority
            moved.interestedInRoster = entry.interestedInRoster
            moved.carbons = entry.carbons
            moved.directedPresence = entry.directedPresence
            resources[resource] = moved
            accounts[account] = resources
            return true
        }
    }

    /// Removes `session`; returns its final entry, or nil if it was not (or no longer) registered.
    @discardableResult
    public func unbind(_ session: ClientSession) -> Entry? {
        accounts.withLock { accounts in
            let account = session.jid.bare
            let resource = session.jid.resourcepart ?? ""
            guard var resources = accounts[account], let entry = resources[resource], entry.session === session else { return nil }
            resources[resource] = nil
            accounts[account] = resources.isEmpty ? nil : resources
            return entry
        }
    }

    /// Updates the entry of `session`; does nothing if it is not registered.
    @discardableResult
    public func update<T>(_ session: ClientSession, _ body: (inout Entry) -> T) -> T? {
        accounts.withLock { accounts in
            let account = session.jid.bare
            let resource = session.jid.resourcepart ?? ""
            guard var entry = accounts[account]?[resource], entry.session === session else { return nil }
            let result = body(&entry)
            accounts[account]?[resource] = entry
            return result
        }
    }

    /// The entry for a session, if registered.
    public func entry(of session: ClientSession) -> Entry? {
        accounts.withLock { accounts in
            guard let entry = accounts[session.jid.bare]?[session.jid.resourcepart ?? ""], entry.session === session else { return nil }
            return entry
        }
    }

    /// All entries of an account.
    public func entries(of account: JID) -> [Entry] {
        accounts.withLock { Array(($0[account.bare] ?? [:]).values) }
    }

    /// The entry bound to a full JID.
    public func entry(for fullJID: JID) -> Entry? {
        guard let resource = fullJID.resourcepart else { return nil }
        return accounts.withLock { $0[fullJID.bare]?[resource] }
    }

    /// Every session, for shutdown and domain removal.
    public func allSessions(inDomain domain: String? = nil) -> [ClientSession] {
        accounts.withLock { accounts in
            accounts.filter { domain == nil || $0.key.domainpart == domain }.flatMap { $0.value.values.map(\.session) }
        }
    }

    public var count: Int {
        accounts.withLock { $0.values.reduce(0) { $0 + $1.count } }
    }
}
