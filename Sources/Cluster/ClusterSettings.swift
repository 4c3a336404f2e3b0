import Foundation

/// The `cluster` configuration section: several Braid nodes serving one provider, sharing one
/// PostgreSQL database (membership, the session directory) and talking to each other over
/// node links (one gRPC stream per node pair, mutual TLS). See docs/cluster.md.
///
/// Off by default: a single node without it works exactly as before.
public struct ClusterSettings: Codable, Sendable, Equatable {
    public var enabled = false
    /// This node's name, unique in the cluster; empty: the host name.
    public var nodeName = ""
    /// Where the node-link listener binds, `HOST:PORT` (port 0: the system picks one).
    public var listen = "0.0.0.0:5270"
    /// Where other nodes reach this node's listener, `HOST:PORT`; empty: `listen`, with the
    /// port actually bound. Must be reachable from every other node.
    public var address = ""
    /// The node's certificate chain and key (PEM) for node links, and the CA (PEM) every
    /// node's certificate must chain to: a node link is mutual TLS, and a peer whose
    /// certificate does not chain to this CA is not a node of this cluster.
    public var tlsCertificateFile = ""
    public var tlsKeyFile = ""
    public var tlsCAFile = ""
    /// How often the node writes its heartbeat, and how old a heartbeat may be before the
    /// other nodes count the node as dead (its sessions gone, its unacknowledged stanzas
    /// routed again from where they came).
    public var heartbeatIntervalSeconds: Double = 2
    public var deadAfterSeconds: Double = 10
    /// Stanzas queued towards one node (sent and not yet acknowledged, or waiting for the
    /// link); beyond it, what is sent to that node's sessions is handled as undeliverable
    /// (stored offline or bounced), never dropped.
    public var maxQueuedFrames = 10_000

    public init() {}

    enum CodingKeys: String, CodingKey {
        case enabled
        case nodeName = "node_name"
        case listen, address
        case tlsCertificateFile = "tls_certificate_file"
        case tlsKeyFile = "tls_key_file"
        case tlsCAFile = "tls_ca_file"
        case heartbeatIntervalSeconds = "heartbeat_interval_seconds"
        case deadAfterSeconds = "dead_after_seconds"
        case maxQueuedFrames = "max_queued_frames"
    }

    /// A `HOST:PORT` pair (IPv6 in brackets).
    public struct Endpoint: Sendable, Equatable, CustomStringConvertible {
        public var host: String
        public var port: Int

        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }

        public init?(parsing text: String) {
            let host: Substring
            let portText: Substring
            if text.hasPrefix("[") {
                guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
                host = text[text.index(after: text.startIndex)..<close]
                portText = text[text.index(close, offsetBy: 2)...]
            } else {
                guard let colon = text.lastIndex(of: ":") else { return nil }
                host = text[..<colon]
                portText = text[text.index(after: colon)...]
            }
            guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port) else { return nil }
            self.host = String(host)
            self.port = port
        }

        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    /// Problems that keep the cluster from starting, in words an operator can act on.
    public func problems(storageIsPostgreSQL: Bool) -> [String] {
        guard enabled else { return [] }
        var problems: [String] = []
        if !storageIsPostgreSQL { problems.append("cluster.enabled needs storage.backend: postgresql (membership and the session directory live there)") }
        if Endpoint(parsing: listen) == nil { problems.append("cluster.listen: '\(listen)' is not HOST:PORT") }
        if !address.isEmpty, Endpoint(parsing: address).map({ $0.port == 0 }) ?? true {
            problems.append("cluster.address: '\(address)' is not HOST:PORT with a port")
        }
        for (key, value) in [("tls_certificate_file", tlsCertificateFile), ("tls_key_file", tlsKeyFile), ("tls_ca_file", tlsCAFile)] where value.isEmpty {
            problems.append("cluster.\(key) is required: node links are mutual TLS")
        }
        if heartbeatIntervalSeconds <= 0 { problems.append("cluster.heartbeat_interval_seconds must be positive") }
        if deadAfterSeconds < 2 * heartbeatIntervalSeconds { problems.append("cluster.dead_after_seconds must be at least twice the heartbeat interval") }
        if maxQueuedFrames < 1 { problems.append("cluster.max_queued_frames must be at least 1") }
        return problems
    }

    /// The node name in use: `node_name`, else the host name.
    public var effectiveNodeName: String {
        nodeName.isEmpty ? ProcessInfo.processInfo.hostName : nodeName
    }
}
