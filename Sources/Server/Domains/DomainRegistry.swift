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
    /// The labels of the services every hosted domain has (`conference`, …), fixed when the
    /// modules are frozen.
    public let serviceLabels: Set<String>

    public init(serviceLabels: Set<String> = []) {
        self.serviceLabels = serviceLabels
    }

    /// True when `domain` (canonical form, as in ``JID/domainpart``) is hosted here: a
    /// domain with accounts, as added with `braid domain add`.
    public func isHosted(_ domain: String) -> Bool {
        snapshot.withLock { $0.domains.contains(domain) }
    }

    /// What a domain served here is.
    public enum Served: Sendable, Equatable {
        /// A hosted domain, with accounts.
        case hosted
        /// The service `label` of the hosted domain `parent` (`conference.customer.example`).
        case service(label: String, parent: String)
    }

    /// Whether `domain` is served here, and as what. A hosted domain is that even when its
    /// first label is also a service label (an operator who hosts `conference.example.com`
    /// as a domain of its own keeps it). Service domains cost nothing per hosted domain:
    /// they are recognised, not stored.
    public func served(_ domain: String) -> Served? {
        if isHosted(domain) { return .hosted }
        guard !serviceLabels.isEmpty, let dot = domain.firstIndex(of: ".") else { return nil }
        let label = String(domain[..<dot])
        guard serviceLabels.contains(label) else { return nil }
        let parent = String(domain[domain.index(after: dot)...])
        return isHosted(parent) ? .service(label: label, parent: parent) : nil
    }

    /// True for hosted domains and their service domains: everything that may appear as
    /// ours in `to` (routing, federation, certificates, POSH). Client logins use
    /// ``isHosted(_:)``: there are no accounts on a service domain.
    public func isServed(_ domain: String) -> Bool {
        served(domain) != nil
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
