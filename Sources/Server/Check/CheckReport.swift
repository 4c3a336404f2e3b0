import Foundation

// What `braid check` reports: typed results, grouped by domain, rendered as text or as JSON.
// The shape of the JSON is documented in docs/check.md and kept stable: fields are only
// ever added.

/// How one check came out. Ordered: `ok` < `warning` < `error`.
public enum CheckStatus: String, Sendable, Hashable, Codable, Comparable, CaseIterable {
    /// Nothing to do (informational findings are `ok` with a message).
    case ok
    /// Works, but not as it should in production; does not change the exit code.
    case warning
    /// Peers or clients will fail; the exit code is 1.
    case error

    private var rank: Int {
        switch self {
        case .ok: 0
        case .warning: 1
        case .error: 2
        }
    }

    public static func < (lhs: CheckStatus, rhs: CheckStatus) -> Bool { lhs.rank < rhs.rank }

    /// The mark in front of a text line.
    public var mark: String {
        switch self {
        case .ok: "✔"
        case .warning: "!"
        case .error: "✘"
        }
    }
}

/// Which check a result comes from; the raw value is the JSON `name`.
public enum CheckName: String, Sendable, Hashable, Codable, CaseIterable {
    /// One SRV record set (`_xmpp-client._tcp`, `_xmpps-client._tcp`, `_xmpp-server._tcp`,
    /// `_xmpps-server._tcp`); one result per record name.
    case srv
    /// The DNSSEC status of every answer the other checks read.
    case dnssec
    /// TLSA records at the server SRV targets (DANE, RFC 7673).
    case tlsa
    /// The domain's POSH document (RFC 7711).
    case posh
    /// A certificate covers the name, and who issued it.
    case certificate
    /// The certificate's validity period.
    case certificateExpiry = "certificate-expiry"
    /// TCP connects to the server SRV targets.
    case reachability
    /// Configuration checks (once per run, not per domain).
    case configuration
}

/// One finding: a status, a one-line message, and for anything not `ok` what to do.
public struct CheckResult: Sendable, Hashable, Codable {
    public var name: CheckName
    public var status: CheckStatus
    public var message: String
    /// How to fix it; nil for `ok` results without advice.
    public var hint: String?

    public init(_ name: CheckName, _ status: CheckStatus, _ message: String, hint: String? = nil) {
        self.name = name
        self.status = status
        self.message = message
        self.hint = hint
    }

    enum CodingKeys: String, CodingKey {
        case name, status, message, hint
    }

    // `hint` is always present in the JSON (null when there is none), so consumers can
    // rely on every key being there.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(name, forKey: .name)
        try container.encode(status, forKey: .status)
        try container.encode(message, forKey: .message)
        try container.encode(hint, forKey: .hint)
    }
}

/// The results for one name Braid serves.
public struct DomainCheckReport: Sendable, Hashable, Codable {
    /// The name, in U-label form.
    public var domain: String
    /// `hosted` (accounts live here) or `service` (`conference.DOMAIN`, …).
    public var kind: CheckedName.Kind
    /// For a service domain, the hosted domain it belongs to; nil for a hosted one.
    public var parent: String?
    public var checks: [CheckResult]

    public init(domain: String, kind: CheckedName.Kind, parent: String?, checks: [CheckResult]) {
        self.domain = domain
        self.kind = kind
        self.parent = parent
        self.checks = checks
    }

    /// The worst status among the checks.
    public var status: CheckStatus { checks.map(\.status).max() ?? .ok }

    /// The results of one check.
    public func results(_ name: CheckName) -> [CheckResult] { checks.filter { $0.name == name } }

    enum CodingKeys: String, CodingKey {
        case domain, kind, parent, checks
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(domain, forKey: .domain)
        try container.encode(kind, forKey: .kind)
        try container.encode(parent, forKey: .parent)
        try container.encode(checks, forKey: .checks)
    }
}

/// Everything one `braid check` run found.
public struct CheckReport: Sendable, Hashable, Codable {
    public var domains: [DomainCheckReport]
    /// Findings about the configuration itself (once per run).
    public var configuration: [CheckResult]

    public init(domains: [DomainCheckReport], configuration: [CheckResult]) {
        self.domains = domains
        self.configuration = configuration
    }

    /// Counts of results by status, and the exit code they give.
    public struct Summary: Sendable, Hashable, Codable {
        public var domains: Int
        public var ok: Int
        public var warnings: Int
        public var errors: Int
        public var exitCode: Int32

        enum CodingKeys: String, CodingKey {
            case domains, ok, warnings, errors
            case exitCode = "exit_code"
        }
    }

    public var allResults: [CheckResult] { configuration + domains.flatMap(\.checks) }

    public var summary: Summary {
        let results = allResults
        let errors = results.filter { $0.status == .error }.count
        return Summary(
            domains: domains.count,
            ok: results.filter { $0.status == .ok }.count,
            warnings: results.filter { $0.status == .warning }.count,
            errors: errors,
            exitCode: Self.exitCode(for: results))
    }

    /// The rule for the exit code: 1 when any result is an error, else 0. Warnings alone do
    /// not fail the run, so the command can gate a deployment without tripping on a
    /// self-signed test domain.
    public static func exitCode(for results: [CheckResult]) -> Int32 {
        results.contains { $0.status == .error } ? 1 : 0
    }

    public var exitCode: Int32 { Self.exitCode(for: allResults) }

    enum CodingKeys: String, CodingKey {
        case domains, configuration, summary
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        domains = try container.decode([DomainCheckReport].self, forKey: .domains)
        configuration = try container.decode([CheckResult].self, forKey: .configuration)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(domains, forKey: .domains)
        try container.encode(configuration, forKey: .configuration)
        try container.encode(summary, forKey: .summary)
    }

    /// The JSON form (`--json`): keys sorted, so that output diffs cleanly between runs.
    public func json() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(self) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// The human form: the configuration first, then each domain, one line per result, the
    /// hint indented under each problem, and a summary line.
    public func text() -> String {
        var output = ""
        func lines(_ results: [CheckResult]) {
            for result in results {
                output += "  \(result.status.mark) \(result.message)\n"
                if let hint = result.hint, result.status != .ok {
                    for line in hint.split(separator: "\n", omittingEmptySubsequences: false) {
                        output += "      \(line)\n"
                    }
                }
            }
        }
        if !configuration.isEmpty {
            output += "Configuration\n"
            lines(configuration)
            output += "\n"
        }
        for domain in domains {
            let title = domain.parent.map { "\(domain.domain) (service of \($0))" } ?? domain.domain
            output += "\(title)\n"
            lines(domain.checks)
            output += "\n"
        }
        let summary = self.summary
        output += "\(summary.domains) name\(summary.domains == 1 ? "" : "s") checked: \(summary.errors) error\(summary.errors == 1 ? "" : "s"), "
            + "\(summary.warnings) warning\(summary.warnings == 1 ? "" : "s"), \(summary.ok) ok\n"
        return output
    }
}
