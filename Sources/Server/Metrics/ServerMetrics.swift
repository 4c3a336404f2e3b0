import CoreMetrics
import XMPPCore

/// The metrics Braid reports, created once per server against its registry.
///
/// Names follow Prometheus conventions. Every bad input is counted here by the condition it
/// got, next to the log line that names the peer.
public struct ServerMetrics: Sendable {
    public let registry: MetricsRegistry

    let connectionsAccepted: [ListenerKind: Counter]
    let sessionsActive: Meter
    let stanzasIn: [StanzaKind: Counter]
    let stanzasOut: [StanzaKind: Counter]
    let hostedDomains: Meter
    let offlineStored: Counter
    let offlineDelivered: Counter
    let offlineRefused: Counter
    let smResumed: Counter
    /// Sessions whose connection dropped and that wait for resumption (XEP-0198).
    let smAwaitingResumption: Counter
    let startupSeconds: Meter
    /// XEP-0352: stanzas held back for inactive clients, and sent later.
    let csiHeld: Counter
    let csiFlushed: Counter
    /// PEP (XEP-0163): notifications sent, and publishes refused because their account had
    /// sent too many notifications (`pep.notifications_per_second`).
    let pepNotifications: Counter
    let pepRateLimited: Counter
    /// WebSocket upgrades refused (no `xmpp` subprotocol, an origin not allowed).
    let webSocketUpgradesRefused: Counter
    /// Frames from another cluster node that did not parse or named what is not ours.
    let clusterBadFrames: Counter
    /// Copies of a message lost with a dead node, not delivered again because another
    /// resource of the account got the message.
    let clusterCopiesNotRedelivered: Counter
    /// The certificates presented (each counted once, however many names it covers), and
    /// when the first of them expires (Unix seconds): one series each, not one per domain,
    /// so 10,000 customer certificates do not make 10,000 series. `braid check` names them.
    let certificatesPresented: Meter
    let certificateEarliestExpiry: Meter

    public init(registry: MetricsRegistry) {
        self.registry = registry
        webSocketUpgradesRefused = Counter(label: "braid_websocket_upgrades_refused_total", factory: registry)
        clusterBadFrames = Counter(label: "braid_cluster_bad_frames_total", factory: registry)
        clusterCopiesNotRedelivered = Counter(label: "braid_cluster_copies_not_redelivered_total", factory: registry)
        certificatesPresented = Meter(label: "braid_certificates", factory: registry)
        certificateEarliestExpiry = Meter(label: "braid_certificate_earliest_expiry_timestamp_seconds", factory: registry)
        connectionsAccepted = Dictionary(uniqueKeysWithValues: ListenerKind.allCases.map {
            ($0, Counter(label: "braid_connections_accepted_total", dimensions: [("listener", $0.rawValue)], factory: registry))
        })
        sessionsActive = Meter(label: "braid_c2s_sessions", factory: registry)
        stanzasIn = Dictionary(uniqueKeysWithValues: StanzaKind.allCases.map {
            ($0, Counter(label: "braid_stanzas_in_total", dimensions: [("kind", $0.rawValue)], factory: registry))
        })
        stanzasOut = Dictionary(uniqueKeysWithValues: StanzaKind.allCases.map {
            ($0, Counter(label: "braid_stanzas_out_total", dimensions: [("kind", $0.rawValue)], factory: registry))
        })
        hostedDomains = Meter(label: "braid_hosted_domains", factory: registry)
        offlineStored = Counter(label: "braid_offline_stored_total", factory: registry)
        offlineDelivered = Counter(label: "braid_offline_delivered_total", factory: registry)
        offlineRefused = Counter(label: "braid_offline_refused_total", factory: registry)
        smResumed = Counter(label: "braid_sm_resumed_total", factory: registry)
        smAwaitingResumption = Counter(label: "braid_sm_awaiting_resumption_total", factory: registry)
        startupSeconds = Meter(label: "braid_startup_seconds", factory: registry)
        csiHeld = Counter(label: "braid_csi_held_total", factory: registry)
        csiFlushed = Counter(label: "braid_csi_flushed_total", factory: registry)
        pepNotifications = Counter(label: "braid_pep_notifications_total", factory: registry)
        pepRateLimited = Counter(label: "braid_pep_rate_limited_total", factory: registry)
    }

    /// Provisioning API requests by action (`domain.add`, …) and outcome (`ok`,
    /// `unauthenticated`, `forbidden`, `not-found`, `conflict`, `bad-request`, …).
    func provisioning(action: String, outcome: String) {
        Counter(label: "braid_provisioning_requests_total", dimensions: [("action", action), ("outcome", outcome)], factory: registry).increment()
    }

    /// In-band registration attempts by outcome: created, conflict, refused, rate-limited, failed.
    func registrations(_ outcome: String) {
        Counter(label: "braid_registrations_total", dimensions: [("outcome", outcome)], factory: registry).increment()
    }

    func authentication(mechanism: String, succeeded: Bool) {
        Counter(label: succeeded ? "braid_auth_successes_total" : "braid_auth_failures_total",
                dimensions: [("mechanism", mechanism)], factory: registry).increment()
    }

    /// A stream error we sent, by condition.
    func streamErrorSent(_ condition: StreamError.Condition, listener: String) {
        Counter(label: "braid_stream_errors_sent_total", dimensions: [("condition", condition.rawValue), ("stream", listener)], factory: registry).increment()
    }

    /// A stanza error we generated, by condition.
    func stanzaErrorSent(_ condition: StanzaError.Condition) {
        Counter(label: "braid_stanza_errors_sent_total", dimensions: [("condition", condition.rawValue)], factory: registry).increment()
    }

    /// File upload (XEP-0363): slot requests by outcome (granted, not-allowed, bad-request,
    /// file-too-large, quota, rate-limited, unavailable).
    func uploadSlot(_ outcome: String) {
        Counter(label: "braid_upload_slots_total", dimensions: [("outcome", outcome)], factory: registry).increment()
    }

    /// File upload: PUTs by outcome (stored, forbidden, conflict, too-large, bad-request,
    /// timeout, failed), and the bytes stored.
    func uploadPut(_ outcome: String, bytes: Int = 0) {
        Counter(label: "braid_upload_puts_total", dimensions: [("outcome", outcome)], factory: registry).increment()
        if bytes > 0 { Counter(label: "braid_upload_bytes_stored_total", factory: registry).increment(by: Int64(bytes)) }
    }

    /// File upload: GETs and HEADs by status (200, 206, 403, 404, 416).
    func uploadGet(status: Int) {
        Counter(label: "braid_upload_gets_total", dimensions: [("status", String(status))], factory: registry).increment()
    }

    /// File upload: files deleted by the cleanup, by reason (expired, account, domain).
    func uploadRemoved(_ reason: String, count: Int) {
        guard count > 0 else { return }
        Counter(label: "braid_upload_files_removed_total", dimensions: [("reason", reason)], factory: registry).increment(by: Int64(count))
    }
}

/// The listeners whose connections are counted.
public enum ListenerKind: String, Sendable, CaseIterable {
    case c2sStartTLS = "c2s_starttls"
    case c2sDirectTLS = "c2s_direct_tls"
    /// XMPP over WebSocket (RFC 7395) on the HTTPS listener.
    case c2sWebSocket = "c2s_websocket"
}
