import CoreMetrics
import Trust

/// Federation counters, created against the server's metrics registry.
public struct FederationMetrics: Sendable {
    let connectionsOpened: Counter
    let connectionsAccepted: Counter
    let linksEstablished: Counter
    let linkFailures: Counter
    let stanzasIn: Counter
    let stanzasOut: Counter
    let bounced: Counter
    let dialbackVerifications: Counter
    /// Pairs that joined an existing link instead of opening a connection.
    let connectionsSaved: Counter
    /// Pairs refused on a shared link that were given a connection of their own.
    let pairFallbacks: Counter
    /// Connection attempts that failed because the process ran out of file descriptors.
    let descriptorLimit: Counter
    /// Links reset because the peer stopped acknowledging (XEP-0198).
    let acknowledgementTimeouts: Counter
    /// Stanzas a closed link owed (unacknowledged or queued), sent again.
    let resent: Counter
    /// Re-sent stanzas dropped on arrival because they had been delivered already.
    let duplicatesDropped: Counter
    /// Stanzas for unauthorised pairs, bad addresses and the like: the link was closed.
    let securityViolations: Counter
    /// Peers refused because only a certificate could prove them (`require_certificates`, or
    /// a trust pin that does not allow dialback) and none did.
    let certificateRequiredRefusals: Counter
    /// OCSP requests made (answers are shared per certificate until their `nextUpdate`).
    let ocspRequests: Counter
    /// Re-validation passes over the links (every `revalidation_interval_seconds`).
    let revalidationPasses: Counter
    let factory: any MetricsFactory

    public init(factory: any MetricsFactory) {
        self.factory = factory
        connectionsOpened = Counter(label: "braid_s2s_connections_opened_total", factory: factory)
        connectionsAccepted = Counter(label: "braid_s2s_connections_accepted_total", factory: factory)
        linksEstablished = Counter(label: "braid_s2s_links_established_total", factory: factory)
        linkFailures = Counter(label: "braid_s2s_link_failures_total", factory: factory)
        stanzasIn = Counter(label: "braid_s2s_stanzas_in_total", factory: factory)
        stanzasOut = Counter(label: "braid_s2s_stanzas_out_total", factory: factory)
        bounced = Counter(label: "braid_s2s_bounced_total", factory: factory)
        dialbackVerifications = Counter(label: "braid_s2s_dialback_verifications_total", factory: factory)
        connectionsSaved = Counter(label: "braid_s2s_connections_saved_total", factory: factory)
        resent = Counter(label: "braid_s2s_resent_total", factory: factory)
        pairFallbacks = Counter(label: "braid_s2s_pair_fallbacks_total", factory: factory)
        descriptorLimit = Counter(label: "braid_s2s_descriptor_limit_total", factory: factory)
        acknowledgementTimeouts = Counter(label: "braid_s2s_ack_timeouts_total", factory: factory)
        duplicatesDropped = Counter(label: "braid_s2s_duplicates_dropped_total", factory: factory)
        securityViolations = Counter(label: "braid_s2s_security_violations_total", factory: factory)
        certificateRequiredRefusals = Counter(label: "braid_s2s_certificate_required_refusals_total", factory: factory)
        ocspRequests = Counter(label: "braid_s2s_ocsp_requests_total", factory: factory)
        revalidationPasses = Counter(label: "braid_s2s_revalidation_passes_total", factory: factory)
    }

    /// The state of the links now: how many, how many pairs they carry, and what waits.
    func record(links: [LinkSnapshot], pending: Int) {
        let open = links.filter { !$0.closed }
        for origin in [FederationLink.Origin.outgoing, .incoming] {
            Gauge(label: "braid_s2s_links", dimensions: [("origin", origin.rawValue)], factory: factory).record(open.filter { $0.origin == origin }.count)
        }
        for direction in [PairDirection.outbound, .inbound] {
            for method in ProofMethod.allCases {
                let count = open.reduce(0) { $0 + $1.pairs.filter { $0.direction == direction && $0.method == method }.count }
                Gauge(label: "braid_s2s_pairs", dimensions: [("direction", direction.rawValue), ("method", method.rawValue)], factory: factory).record(count)
            }
        }
        Gauge(label: "braid_s2s_pairs_per_link_max", factory: factory).record(open.map(\.pairs.count).max() ?? 0)
        Gauge(label: "braid_s2s_queue_depth", dimensions: [("where", "link")], factory: factory).record(open.reduce(0) { $0 + $1.queued })
        Gauge(label: "braid_s2s_queue_depth", dimensions: [("where", "pending")], factory: factory).record(pending)
        Gauge(label: "braid_s2s_unacknowledged", factory: factory).record(open.reduce(0) { $0 + $1.unacknowledged })
    }

    /// A link reset because proofs lapsed or a certificate was revoked.
    func resets(_ reason: String) {
        Counter(label: "braid_s2s_link_resets_total", dimensions: [("reason", reason)], factory: factory).increment()
    }

    /// A pair authorised, by proof method.
    func proof(_ method: ProofMethod, direction: PairDirection) {
        Counter(label: "braid_s2s_pairs_authorized_total", dimensions: [("method", method.rawValue), ("direction", direction.rawValue)], factory: factory).increment()
    }

    /// A refused dialback request, by condition.
    func dialbackRefused(_ condition: String) {
        Counter(label: "braid_s2s_dialback_refused_total", dimensions: [("condition", condition)], factory: factory).increment()
    }

    /// A stream error we sent on an s2s link, by condition.
    func streamError(_ condition: String) {
        Counter(label: "braid_stream_errors_sent_total", dimensions: [("condition", condition), ("stream", "s2s")], factory: factory).increment()
    }

    /// A stream error a peer closed a link with (`reset` when its proofs lapsed, ...).
    func streamErrorReceived(_ condition: String) {
        Counter(label: "braid_stream_errors_received_total", dimensions: [("condition", condition), ("stream", "s2s")], factory: factory).increment()
    }
}
