import Foundation
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
        /// When the resource was bound (milliseconds since 1970); in a cluster, of two binds
        /// of one full JID on two nodes the later wins.
        public var boundAt: Int64

        init(session: ClientSession, boundAt: Int64 = Int64(Date().timeIntervalSince1970 * 1000)) {
            self.session = session
            presence = nil
            priority = 0
            interestedInRoster = false
            carbons = false
            directedPresence = []
            self.boundAt = boundAt
        }

        public var isAvailable: Bool { presence != nil }

        /// What other nodes of a cluster route by; a change to it is told to them.
        var routingState: RoutingState {
            RoutingState(presence: presence, priority: priority, interestedInRoster: interestedInRoster, carbons: carbons)
        }
    }

    struct RoutingState: Equatable {
        var presence: XMLElement?
        var priority: Int
        var interestedInRoster: Bool
        var carbons: Bool
    }

    /// Told, under the registry's lock (so in the order the changes happened), about every
    /// change to a session bound on this node. The cluster uses it to keep the other nodes'
    /// routing tables current; it must not call back into the registry.
    public protocol Observer: Sendable {
        func localSessionChanged(_ entry: Entry, isNew: Bool)
        func localSessionGone(_ entry: Entry)
    }

    public enum BindOutcome: Sendable {
        /// Bound; `replaced` is a session that held the resource and must be closed.
        case bound(replaced: ClientSession?)
        /// The resource is taken and the policy refuses to replace it.
        case conflict
    }

    private let accounts = Mutex<[JID: [String: Entry]]>([:])
    private let observerBox = Mutex<(any Observer)?>(nil)
    /// Sessions held by other nodes of a cluster (their ``ClientSession/remote`` set).
    private let remoteCount = Atomic<Int>(0)

    public init() {}

    /// Set once, by the cluster, before anything is bound.
    public func install(observer: any Observer) {
        observerBox.withLock { $0 = observer }
    }

    private var observer: (any Observer)? { observerBox.withLock { $0 } }

    /// Registers `session` under its full JID.
    public func bind(_ session: ClientSession, replacing: Bool) -> BindOutcome {
        let account = session.jid.bare
        let resource = session.jid.resourcepart ?? ""
        let observer = self.observer
        return accounts.withLock { accounts in
            var resources = accounts[account] ?? [:]
            let existing = resources[resource]
            if existing != nil && !replacing { return .conflict }
            let entry = Entry(session: session)
            resources[resource] = entry
            accounts[account] = resources
            if existing?.session.remote != nil { remoteCount.subtract(1, ordering: .relaxed) }
            observer?.localSessionChanged(entry, isNew: true)
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
            moved.boundAt = entry.boundAt
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
            if session.remote == nil {
                observer?.localSessionGone(entry)
            } else {
                remoteCount.subtract(1, ordering: .relaxed)
            }
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
            let before = entry.routingState
            let result = body(&entry)
            accounts[account]?[resource] = entry
            if session.remote == nil, entry.routingState != before {
                observer?.localSessionChanged(entry, isNew: false)
            }
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

    /// Every session bound on this node, for shutdown and domain removal (a session on
    /// another node of a cluster is that node's to close).
    public func allSessions(inDomain domain: String? = nil) -> [ClientSession] {
        accounts.withLock { accounts in
            accounts.filter { domain == nil || $0.key.domainpart == domain }.flatMap { $0.value.values.map(\.session) }
        }.filter { $0.remote == nil }
    }

    /// Sessions bound on this node.
    public var count: Int {
        accounts.withLock { $0.values.reduce(0) { $0 + $1.count } } - remoteCount.load(ordering: .relaxed)
    }

    /// Sessions bound on other nodes of a cluster, known here.
    public var remoteSessionCount: Int { remoteCount.load(ordering: .relaxed) }

    /// The entries of every session bound on this node.
    public func localEntries() -> [Entry] {
        accounts.withLock { accounts in accounts.values.flatMap { $0.values.filter { $0.session.remote == nil } } }
    }

    // MARK: Sessions on other nodes of a cluster

    public enum RemoteOutcome {
        /// Installed or updated.
        case applied
        /// A session bound here holds the full JID and was bound later: it stays, and the
        /// other node closes its own when it hears of this one.
        case localWins
        /// A session bound here holds the full JID and was bound earlier: it must be closed
        /// with `<conflict/>`; the remote one is installed in its place.
        case localLoses(ClientSession)
    }

    /// Installs or updates the session `jid` bound on `node`; `makeProxy` builds the local
    /// stand-in when there is none yet.
    func applyRemote(jid: JID, node: String, localNode: String, boundAt: Int64, state: RoutingState, makeProxy: () -> ClientSession) -> RemoteOutcome {
        let account = jid.bare
        let resource = jid.resourcepart ?? ""
        return accounts.withLock { accounts in
            var resources = accounts[account] ?? [:]
            var outcome = RemoteOutcome.applied
            var entry: Entry
            if let existing = resources[resource], let remote = existing.session.remote, remote.node == node {
                entry = existing
            } else {
                if let existing = resources[resource] {
                    if existing.session.remote == nil {
                        // Later bind wins; on a tie the node named last (both sides agree).
                        let remoteWins = boundAt != existing.boundAt ? boundAt > existing.boundAt : node > localNode
                        guard remoteWins else { return .localWins }
                        outcome = .localLoses(existing.session)
                    } else {
                        // Another node's older stand-in: that node loses; this one replaces it.
                        remoteCount.subtract(1, ordering: .relaxed)
                    }
                }
                entry = Entry(session: makeProxy(), boundAt: boundAt)
                remoteCount.add(1, ordering: .relaxed)
            }
            entry.presence = state.presence
            entry.priority = state.priority
            entry.interestedInRoster = state.interestedInRoster
            entry.carbons = state.carbons
            entry.boundAt = boundAt
            resources[resource] = entry
            accounts[account] = resources
            return outcome
        }
    }

    /// Removes the stand-in of `jid` if `node` holds it; returns its last entry.
    func removeRemote(jid: JID, node: String) -> Entry? {
        let account = jid.bare
        let resource = jid.resourcepart ?? ""
        return accounts.withLock { accounts in
            guard var resources = accounts[account], let entry = resources[resource], entry.session.remote?.node == node else { return nil }
            resources[resource] = nil
            accounts[account] = resources.isEmpty ? nil : resources
            remoteCount.subtract(1, ordering: .relaxed)
            return entry
        }
    }

    /// Removes every stand-in of `node`'s sessions (it died or left); returns their entries.
    func removeRemote(node: String) -> [Entry] {
        accounts.withLock { accounts in
            var removed: [Entry] = []
            for (account, var resources) in accounts {
                let gone = resources.filter { $0.value.session.remote?.node == node }
                guard !gone.isEmpty else { continue }
                for (resource, entry) in gone {
                    resources[resource] = nil
                    removed.append(entry)
                }
                accounts[account] = resources.isEmpty ? nil : resources
            }
            remoteCount.subtract(removed.count, ordering: .relaxed)
            return removed
        }
    }
}
