import Federation
import Foundation
import HTTPTypes
import NIOPosix
import Storage
import Synchronization

// `GET /api/v1/status` and `GET /api/v1/domains/{domain}/check`: what the operator dashboard
// (Dashboard.swift) polls. Both are read-only and documented in docs/provisioning-api.yaml.

extension ProvisioningAPI {
    /// How many domains `sessions.by_domain` lists for a provider token (the busiest).
    static let sessionDomainsListed = 10
    /// How many security-relevant audit entries `security.recent` carries.
    static let recentSecurityEntries = 20
    /// Audit outcomes that say someone tried what they may not.
    static let securityOutcomes: Set<String> = ["unauthenticated", "forbidden"]

    // MARK: Status

    /// The figures the dashboard shows. A scoped token gets only what concerns its domains
    /// (hosted count, sessions, security entries about them); the rest is server-wide
    /// (links, counters, certificates, stanza totals) and a customer has no business with
    /// other customers' traffic, so those sections are absent rather than refused: one
    /// dashboard works with both kinds of token.
    func status(_ caller: Caller) async throws -> (HTTPResponse.Status, JSONValue?) {
        var fields: [String: JSONValue] = [
            "scope": .string(caller.isProvider ? "provider" : "domains"),
            "time": .number(Double(Self.now())),
        ]
        let registry = server.metrics.registry

        // Sessions by domain, from the registry (one lock, no storage).
        var online: [String: Int] = [:]
        for session in server.sessions.allSessions() where caller.mayManage(session.jid.domainpart) {
            online[session.jid.domainpart, default: 0] += 1
        }
        if let domains = caller.domains {
            let hosted = domains.filter { server.domains.isHosted($0) }.sorted()
            fields["hosted_domains"] = .number(Double(hosted.count))
            fields["sessions"] = .object([
                "online": .number(Double(online.values.reduce(0, +))),
                "by_domain": .array(hosted.map { Self.sessionEntry($0, online[$0] ?? 0) }),
            ])
        } else {
            fields["hosted_domains"] = .number(Double(server.domains.count))
            let busiest = online.sorted { ($0.value, $1.key) > ($1.value, $0.key) }.prefix(Self.sessionDomainsListed)
            fields["sessions"] = .object([
                "online": .number(Double(online.values.reduce(0, +))),
                "by_domain": .array(busiest.map { Self.sessionEntry($0.key, $0.value) }),
            ])
            fields["links"] = Self.linkSummary(await server.federationLinks(),
                                               savedTotal: registry.counterValue("braid_s2s_connections_saved_total"))
            let expiry = registry.gaugeValue("braid_certificate_earliest_expiry_timestamp_seconds") ?? 0
            fields["certificates"] = .object([
                "presented": .number(registry.gaugeValue("braid_certificates") ?? 0),
                // 0 until the first certificate is loaded.
                "earliest_expiry": expiry > 0 ? .number(expiry) : .null,
            ])
            fields["stanzas"] = .object([
                "client_in_total": .number(Double(registry.counterTotal("braid_stanzas_in_total"))),
                "client_out_total": .number(Double(registry.counterTotal("braid_stanzas_out_total"))),
                "s2s_in_total": .number(Double(registry.counterValue("braid_s2s_stanzas_in_total"))),
                "s2s_out_total": .number(Double(registry.counterValue("braid_s2s_stanzas_out_total"))),
            ])
        }

        var security: [String: JSONValue] = ["recent": .array(try await recentSecurityEntries(caller).map(Self.describe))]
        if caller.isProvider {
            security["violations_total"] = .number(Double(registry.counterValue("braid_s2s_security_violations_total")))
            security["certificate_required_refusals_total"] = .number(Double(registry.counterValue("braid_s2s_certificate_required_refusals_total")))
            let errors = Self.counterSeries("braid_stream_errors_sent_total", in: await registry.prometheusText())
            security["stream_errors_sent"] = .array(errors.map { series in
                .object(["condition": .string(series.labels["condition"] ?? ""), "stream": .string(series.labels["stream"] ?? ""),
                         "count": .number(series.value)])
            })
        }
        fields["security"] = .object(security)
        return (.ok, .object(fields))
    }

    private static func sessionEntry(_ domain: String, _ count: Int) -> JSONValue {
        .object(["domain": .string(domain), "online": .number(Double(count))])
    }

    /// The links now, and what classic federation would need for the same traffic.
    ///
    /// Classic server-to-server (one TCP connection per domain pair and direction, RFC 6120
    /// without multiplexing or bidi) needs a connection for every (local, remote, direction)
    /// that is authorised here: `classic_connections` counts those distinct triples over the
    /// open links, so a pair used both ways counts 2 and one used one way counts 1. Between
    /// providers hosting N and M domains that is at most 2·N·M (`classic_upper_bound`, from
    /// the distinct local and remote domains seen in pairs). `saved_now` is classic minus the
    /// links open (never below 0); `connections_saved_total` is the server's counter of pairs
    /// that joined an existing link instead of opening one, since it started.
    static func linkSummary(_ snapshots: [LinkSnapshot], savedTotal: Int64) -> JSONValue {
        struct Directed: Hashable {
            var pair: DomainPair
            var direction: PairDirection
        }
        let open = snapshots.filter { !$0.closed }
        var pairs = 0
        var domainPairs = Set<DomainPair>()
        var directed = Set<Directed>()
        for link in open {
            for authorization in link.pairs {
                pairs += 1
                domainPairs.insert(authorization.pair)
                directed.insert(Directed(pair: authorization.pair, direction: authorization.direction))
            }
        }
        let local = Set(domainPairs.map(\.local)).count
        let remote = Set(domainPairs.map(\.remote)).count
        return .object([
            "open": .number(Double(open.count)),
            "outgoing": .number(Double(open.filter { $0.origin == .outgoing }.count)),
            "incoming": .number(Double(open.filter { $0.origin == .incoming }.count)),
            "pairs": .number(Double(pairs)),
            "domain_pairs": .number(Double(domainPairs.count)),
            "local_domains": .number(Double(local)),
            "remote_domains": .number(Double(remote)),
            "classic_connections": .number(Double(directed.count)),
            "classic_upper_bound": .number(Double(2 * local * remote)),
            "saved_now": .number(Double(max(0, directed.count - open.count))),
            "connections_saved_total": .number(Double(savedTotal)),
        ])
    }

    /// The newest refused attempts the caller may see: all of them for a provider, those
    /// about its domains for a scoped token (as `GET /audit` filters).
    private func recentSecurityEntries(_ caller: Caller) async throws -> [AuditEntry] {
        // Refusals are a minority of entries; reading a few hundred finds the recent ones
        // without a storage query of their own.
        let window = 500
        var entries: [AuditEntry]
        if let domains = caller.domains {
            entries = []
            for domain in domains.sorted() { entries += try await storage.auditEntries(limit: window, domain: domain) }
            entries.sort { $0.at > $1.at }
        } else {
            entries = try await storage.auditEntries(limit: window, domain: nil)
        }
        return Array(entries.filter { Self.securityOutcomes.contains($0.outcome) }.prefix(Self.recentSecurityEntries))
    }

    static func describe(_ entry: AuditEntry) -> JSONValue {
        .object(["at": .number(Double(entry.at)), "token": entry.tokenID.map(JSONValue.string) ?? .null, "action": .string(entry.action),
                 "target": .string(entry.target), "outcome": .string(entry.outcome), "detail": .string(entry.detail)])
    }

    /// The series of one counter in Prometheus text, with their labels: the registry reads
    /// one series by its labels, and stream errors are labelled by whatever condition occurred.
    static func counterSeries(_ name: String, in text: String) -> [(labels: [String: String], value: Double)] {
        var series: [(labels: [String: String], value: Double)] = []
        for line in text.split(separator: "\n") where line.hasPrefix(name + "{") {
            guard let close = line.lastIndex(of: "}"), let value = Double(line[line.index(after: close)...].trimmingCharacters(in: .whitespaces)) else { continue }
            var labels: [String: String] = [:]
            // name="value" pairs; values here are condition and listener names, without quotes.
            for part in line[line.index(line.startIndex, offsetBy: name.count + 1) ..< close].split(separator: ",") {
                guard let equals = part.firstIndex(of: "=") else { continue }
                labels[String(part[..<equals])] = String(part[part.index(after: equals)...]).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
            }
            series.append((labels, value))
        }
        return series.sorted { ($0.value, $1.labels["condition"] ?? "") > ($1.value, $0.labels["condition"] ?? "") }
    }

    // MARK: Domain check

    /// `braid check` for one hosted domain and its service domains, from the cache when a
    /// check of it started less than ``DomainCheckCache/lifetime`` ago. A scoped token gets
    /// the domain's results without the configuration findings, which name the server's
    /// files and settings rather than its domain.
    func checkDomain(_ caller: Caller, _ raw: String?) async throws -> (report: CheckReport, age: Int) {
        let domain = try visibleDomain(caller, raw)
        let configuration = server.configuration
        // Service domains as the running server serves them (its frozen modules' labels).
        var names = [CheckedName(domain: domain)]
        for label in offeredLabels(domain) where !server.domains.isHosted("\(label).\(domain)") {
            names.append(CheckedName(domain: "\(label).\(domain)", kind: .service, parent: domain))
        }
        // The server's own DNS timeout, bounded: a request must not wait minutes.
        let timeout = Duration.seconds(min(max(configuration.dns.timeoutSeconds, 1), 10))
        let logger = self.logger
        let checked = names
        let (report, age): (CheckReport, Duration)
        do {
            (report, age) = try await checks.report(for: domain) {
                try await ServerCheck.runLive(configuration: configuration, names: checked, timeout: timeout,
                                              eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger)
            }
        } catch {
            logger.error("provisioning API: the check could not run", metadata: ["domain": "\(domain)", "error": "\(error)"])
            throw Failure(status: .serviceUnavailable, code: "unavailable", message: "the check could not run; see the server's log")
        }
        let shown = caller.isProvider ? report : CheckReport(domains: report.domains, configuration: [])
        return (shown, Int(age.components.seconds))
    }
}

/// Finished and running `braid check`s by hosted domain, so that the dashboard (or anyone
/// with a token) cannot make the server query DNS, POSH and peers' ports more than once per
/// domain per ``lifetime``; concurrent requests for one domain share one run.
final class DomainCheckCache: Sendable {
    /// Five minutes: DNS changes an operator is fixing show up soon enough, and a page left
    /// open (or a script) costs one check per domain per five minutes at most.
    static let defaultLifetime: Duration = .seconds(300)

    private struct Entry {
        var task: Task<(CheckReport, ContinuousClock.Instant), any Error>
        var started: ContinuousClock.Instant
    }

    let lifetime: Duration
    private let entries = Mutex<[String: Entry]>([:])

    init(lifetime: Duration = DomainCheckCache.defaultLifetime) {
        self.lifetime = lifetime
    }

    /// The report for `domain` and how long ago it was made: a cached one, or the result
    /// of `run` (not cached when it throws).
    func report(for domain: String, run: @escaping @Sendable () async throws -> CheckReport) async throws -> (CheckReport, Duration) {
        let now = ContinuousClock.now
        let task = entries.withLock { entries in
            if let entry = entries[domain], now - entry.started < lifetime { return entry.task }
            // Only hosted domains get here, so this stays as large as the domain list; old
            // entries go as new ones come.
            entries = entries.filter { now - $0.value.started < lifetime }
            let task = Task { (try await run(), ContinuousClock.now) }
            entries[domain] = Entry(task: task, started: now)
            return task
        }
        do {
            let (report, finished) = try await task.value
            return (report, max(.zero, ContinuousClock.now - finished))
        } catch {
            entries.withLock { entries in
                if entries[domain]?.task == task { entries[domain] = nil }
            }
            throw error
        }
    }
}
