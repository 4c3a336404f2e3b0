import Logging
import Storage
import Synchronization
import XMPPCore

/// The set of hosted domains, read on every stanza and changed rarely.
///
/// The database is the source of truth; ``synchronize(from:)`` reloads it when its
/// generation counter moved, which is how `braid domain add|remove`, run as another process,
/// takes effect within a poll interval and without a restart.
public final class DomainRegistry: Sendable {
    private struct Snapshot {
        var domains: Set<String>
        var generation: Int64
    }

    private let snapshot = Mutex(Snapshot(domains: [], generation: -1))

    public init() {}

    /// True when `domain` (canonical form, as in ``JID/domainpart``) is hosted here.
    public func isHosted(_ domain: String) -> Bool {
        snapshot.withLock { $0.domains.contains(domain) }
    }

    public var all: Set<String> {
        snapshot.withLock { $0.domains }
    }

    public var count: Int {
        snapshot.withLock { $0.domains.count }
    }

    /// What changed in one synchronisation.
    public struct Change: Sendable, Equatable {
        public var added: Set<String>
        public var removed: Set<String>

        public var isEmpty: Bool { added.isEmpty && removed.isEmpty }
    }

    /// Reloads the domains if the stored generation changed. Returns what changed.
    @discardableResult
    public func synchronize(from storage: any Storage) async throws -> Change {
        let generation = try await storage.domainsGeneration()
        if snapshot.withLock({ $0.generation == generation }) {
            return Change(added: [], removed: [])
        }
        let names = Set(try await storage.domains().map(\.name))
        return snapshot.withLock { current in
            let change = Change(added: names.subtracting(current.domains), removed: current.domains.subtracting(names))
            current = Snapshot(domains: names, generation: generation)
            return change
        }
    }
}
