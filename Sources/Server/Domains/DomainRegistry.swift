import Logging
import Storage
import Synchronization
import XMPPCore

/// The set of hosted domains and their own settings, read on every stanza and changed rarely.
///
/// The database is the source of truth; ``synchronize(from:)`` reloads it when its
/// generation counter moved, which is how `braid domain add|remove`, run as another process,
/// takes effect within a poll interval and without a restart.
public final class DomainRegistry: Sendable {
    private struct Snapshot {
        var domains: Set<String>
        var generation: Int64
        /// Domains' own settings (provisioning API), only for domains that have any.
        var settings: [String: DomainSettings] = [:]
        /// Counts ``apply(_:for:)`` calls, so a synchronisation that read storage before one
        /// does not put the older settings back.
        var applied = 0
    }

    private let snapshot = Mutex(Snapshot(domains: [], generation: -1))
    /// The labels of the services every hosted domain has (`conference`, …), fixed when the
    /// modules are frozen.
    public let serviceLabels: Set<String>
    /// The module (`services.NAME`) behind each label: per-domain settings name services
    /// by module, as the configuration does, so moving a service keeps its settings.
    public let serviceModules: [String: String]

    public init(serviceLabels: Set<String> = [], serviceModules: [String: String] = [:]) {
        self.serviceLabels = serviceLabels
        self.serviceModules = serviceModules
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
        let module = serviceModules[label] ?? label
        return snapshot.withLock { current in
            // A service the parent's settings turned off is not ours for that domain.
            guard current.domains.contains(parent), current.settings[parent]?.services[module] != false else { return nil }
            return .service(label: label, parent: parent)
        }
    }

    /// `domain`'s own settings (empty when it has none).
    public func settings(of domain: String) -> DomainSettings {
        snapshot.withLock { $0.settings[domain] } ?? DomainSettings()
    }

    /// False when `domain` opted out of ACME (it brings its own certificate).
    public func acmeManages(_ domain: String) -> Bool {
        snapshot.withLock { $0.settings[domain]?.acme } != false
    }

    /// Takes `settings` for `domain` at once, after they were stored: the API's answer holds
    /// when it is sent, and the next synchronisation (the stored generation moved) reads
    /// the same from storage, here and on every server sharing it.
    public func apply(_ settings: DomainSettings, for domain: String) {
        snapshot.withLock {
            $0.settings[domain] = settings.isEmpty ? nil : settings
            $0.applied += 1
        }
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
        let (seen, applied) = snapshot.withLock { ($0.generation, $0.applied) }
        if seen == generation {
            return Change(added: [], removed: [])
        }
        let names = Set(try await storage.domains().map(\.name))
        let settings = try await storage.domainSettings()
        return snapshot.withLock { current in
            let change = Change(added: names.subtracting(current.domains), removed: current.domains.subtracting(names))
            current.domains = names
            if current.applied == applied {
                current.settings = settings
                current.generation = generation
            }
            // Else settings were applied while storage was read, perhaps after that read:
            // they stay, and the generation is left unseen so that the next synchronisation
            // reads everything again (their write moved it anyway).
            return change
        }
    }
}
