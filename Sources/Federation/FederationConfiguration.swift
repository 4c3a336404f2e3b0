import Trust

/// Server-to-server settings (the `s2s` section of the configuration).
public struct FederationConfiguration: Codable, Sendable, Equatable {
    /// Federate at all. Without it, stanzas for other domains bounce with
    /// `remote-server-not-found` and no s2s listener runs.
    public var enabled: Bool = true
    /// Address the s2s listeners bind to.
    public var address: String = "0.0.0.0"
    /// RFC 6120 STARTTLS listener; null disables it.
    public var starttlsPort: Int? = 5269
    /// XEP-0368 direct TLS listener (ALPN `xmpp-server`); null disables it.
    public var directTLSPort: Int? = 5270
    /// Refuse every peer that cannot prove its domains with a certificate: no dialback.
    /// A per-peer setting overrides this.
    public var requireCertificates: Bool = false
    /// Extra CA certificates (PEM files) trusted for every peer, besides the system store.
    public var trustAnchorFiles: [String] = []
    /// Also trust the system's CA store (/etc/ssl/certs).
    public var useSystemTrustStore: Bool = true
    /// The dialback secret (XEP-0185). Empty: a random one per process, which invalidates
    /// outstanding keys on restart; set it on every node of a cluster.
    public var dialbackSecret: String = ""
    /// Seconds for a TCP connection and TLS handshake to a peer.
    public var connectTimeoutSeconds: Int = 10
    /// Seconds for a link to authenticate, or for a dialback verification to answer.
    public var negotiationTimeoutSeconds: Int = 30
    /// Seconds a link may stay idle before it is closed.
    public var idleTimeoutSeconds: Int = 900
    /// Seconds a new domain pair may take to be set up (joining a link, or its own
    /// connection after a refusal), counted from its first stanza; then what waits for it
    /// bounces with `remote-server-timeout`.
    public var pairSetupTimeoutSeconds: Int = 75
    /// Connections being opened to one peer server at the same moment; more pairs that need
    /// a connection of their own wait for a slot (within their set-up time). A cap on
    /// simultaneous handshakes, not on connections.
    public var maxConcurrentConnects: Int = 32
    /// Seconds a peer may owe acknowledgements (XEP-0198) for stanzas we sent before the
    /// link is reset and what it did not acknowledge is sent again on a new one.
    public var acknowledgementTimeoutSeconds: Int = 60
    /// Stanzas waiting per domain pair, while its link is being set up and on the link when
    /// the peer reads slowly; beyond that they bounce with `resource-constraint`.
    public var queueLimit: Int = 1000
    /// Largest stanza accepted from a peer, in bytes (RFC 6120 §13.12).
    public var maxStanzaBytes: Int = 512 * 1024
    /// Offer and request bidirectional links (XEP-0288), so one connection carries both
    /// directions.
    public var bidi: Bool = true
    /// Acknowledge stanzas on links (XEP-0198 without resumption); unacknowledged stanzas
    /// are re-sent when a link drops.
    public var streamManagement: Bool = true
    /// Let further domain pairs join an existing link (XEP-0220 §2.6 with the RFC 7712
    /// §4.4.2 proof rule). Off: one connection per peer domain, as classic servers do.
    public var multiplex: Bool = true
    /// Seconds between re-validation passes: proofs about to lapse are renewed, expired
    /// or revoked certificates reset their link, OCSP is polled when due.
    public var revalidationIntervalSeconds: Double = 30
    /// A peer certificate with less time than this left is not relied on for a new proof
    /// (twice the revalidation interval, at most ten seconds).
    public var certificateMinimumLifetimeSeconds: Double { min(10, revalidationIntervalSeconds * 2) }
    /// A pass renews a proof with less than this left (two passes' worth, so one failed
    /// renewal is tried again before the proof lapses).
    public var renewalMarginSeconds: Double { max(2, revalidationIntervalSeconds * 2) }
    /// Seconds a peer's DNS location is remembered.
    public var locationCacheSeconds: Int = 300
    /// Seconds before the first retry of a failed peer or pair (doubling, up to a minute).
    public var retryBaseSeconds: Double = 1
    /// At most how many received message and IQ ids, not yet acknowledged to the peer
    /// (XEP-0198), are remembered so that the copies a peer re-sends after losing a link are
    /// dropped. Stanzas already acknowledged are never dropped as duplicates, whatever their id.
    public var duplicateWindow: Int = 20000
    /// Check peers' certificates for revocation with OCSP, at each response's `nextUpdate`
    /// or daily; a revoked certificate resets its link.
    public var checkRevocation: Bool = true
    /// Seconds for fetching a peer domain's POSH document (RFC 7711).
    public var poshTimeoutSeconds: Int = 10
    /// For labs and tests: fetch these domains' POSH documents from `host:port` instead of
    /// the address DNS gives (the HTTPS certificate is still checked for the domain).
    public var poshConnectOverrides: [String: String] = [:]
    /// Settings for particular peer domains.
    public var peers: [String: PeerSettings] = [:]
    /// Trust pins for whole providers: by domain pattern or by the host names of their
    /// servers, so that 1,000 customer domains of one provider need one entry.
    public var providerTrust: [ProviderTrust] = []

    public init() {}

    enum CodingKeys: String, CodingKey {
        case enabled, address
        case starttlsPort = "starttls_port"
        case directTLSPort = "direct_tls_port"
        case requireCertificates = "require_certificates"
        case trustAnchorFiles = "trust_anchor_files"
        case useSystemTrustStore = "use_system_trust_store"
        case dialbackSecret = "dialback_secret"
        case connectTimeoutSeconds = "connect_timeout_seconds"
        case negotiationTimeoutSeconds = "negotiation_timeout_seconds"
        case idleTimeoutSeconds = "idle_timeout_seconds"
        case pairSetupTimeoutSeconds = "pair_setup_timeout_seconds"
        case maxConcurrentConnects = "max_concurrent_connects"
        case acknowledgementTimeoutSeconds = "acknowledgement_timeout_seconds"
        case queueLimit = "queue_limit"
        case maxStanzaBytes = "max_stanza_bytes"
        case bidi
        case streamManagement = "stream_management"
        case multiplex
        case revalidationIntervalSeconds = "revalidation_interval_seconds"
        case locationCacheSeconds = "location_cache_seconds"
        case retryBaseSeconds = "retry_base_seconds"
        case duplicateWindow = "duplicate_window"
        case checkRevocation = "check_revocation"
        case poshTimeoutSeconds = "posh_timeout_seconds"
        case poshConnectOverrides = "posh_connect_overrides"
        case peers
        case providerTrust = "provider_trust"
    }

    /// Per-peer overrides, keyed by the peer's domain.
    public struct PeerSettings: Codable, Sendable, Equatable {
        /// Overrides the global `require_certificates` for this peer.
        public var requireCertificates: Bool?
        /// When set, this peer's certificates must chain to these CAs only (RFC 6120 §13.6),
        /// and no other proof (DANE, POSH, dialback) is accepted for it unless listed in
        /// `allowedProofs`.
        public var trustAnchorFiles: [String]?
        /// With `trustAnchorFiles`: the other proofs still accepted (`dane`, `posh`,
        /// `dialback`).
        public var allowedProofs: [ProofMethod]?
        /// Connect here instead of looking the domain up in DNS.
        public var host: String?
        public var port: Int?
        /// The static target speaks direct TLS (XEP-0368) rather than STARTTLS.
        public var directTLS: Bool?

        public init(requireCertificates: Bool? = nil, trustAnchorFiles: [String]? = nil, allowedProofs: [ProofMethod]? = nil,
                    host: String? = nil, port: Int? = nil, directTLS: Bool? = nil) {
            self.requireCertificates = requireCertificates
            self.trustAnchorFiles = trustAnchorFiles
            self.allowedProofs = allowedProofs
            self.host = host
            self.port = port
            self.directTLS = directTLS
        }

        enum CodingKeys: String, CodingKey, CaseIterable {
            case requireCertificates = "require_certificates"
            case trustAnchorFiles = "trust_anchor_files"
            case allowedProofs = "allowed_proofs"
            case host, port
            case directTLS = "direct_tls"
        }

        /// The keys a configuration file may give for one peer.
        public static let configurationKeys = Set(CodingKeys.allCases.map(\.stringValue))
    }

    /// A trust pin for a provider (`s2s.provider_trust` entries): the peers it covers must
    /// present certificates chaining to its CAs, and other proofs are refused unless allowed.
    public struct ProviderTrust: Codable, Sendable, Equatable {
        /// Domains (`customer.example`) and patterns (`*.provider.example`: every subdomain,
        /// at any depth) covered.
        public var domains: [String] = []
        /// Host names of the provider's servers (SRV targets, static peer hosts): a domain is
        /// covered when we connected to one, or its SRV records name one.
        public var targets: [String] = []
        /// PEM files of the CAs its certificates must chain to.
        public var trustAnchorFiles: [String] = []
        /// Other proofs still accepted for these peers (`dane`, `posh`, `dialback`).
        public var allowedProofs: [ProofMethod] = []

        public init(domains: [String] = [], targets: [String] = [], trustAnchorFiles: [String] = [], allowedProofs: [ProofMethod] = []) {
            self.domains = domains
            self.targets = targets
            self.trustAnchorFiles = trustAnchorFiles
            self.allowedProofs = allowedProofs
        }

        enum CodingKeys: String, CodingKey, CaseIterable {
            case domains, targets
            case trustAnchorFiles = "trust_anchor_files"
            case allowedProofs = "allowed_proofs"
        }

        /// Unknown keys are refused (a misspelt `trust_anchor_files` must not silently leave
        /// a provider unpinned); missing keys keep their defaults.
        public init(from decoder: any Decoder) throws {
            let names = try decoder.container(keyedBy: AnyConfigurationKey.self)
            for key in names.allKeys where CodingKeys(rawValue: key.stringValue) == nil {
                throw DecodingError.dataCorruptedError(forKey: key, in: names, debugDescription: "unknown key '\(key.stringValue)'")
            }
            let container = try decoder.container(keyedBy: CodingKeys.self)
            domains = try container.decodeIfPresent([String].self, forKey: .domains) ?? []
            targets = try container.decodeIfPresent([String].self, forKey: .targets) ?? []
            trustAnchorFiles = try container.decodeIfPresent([String].self, forKey: .trustAnchorFiles) ?? []
            allowedProofs = try container.decodeIfPresent([ProofMethod].self, forKey: .allowedProofs) ?? []
        }
    }

    struct AnyConfigurationKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// Whether certificates are required of `domain`.
    public func requiresCertificates(_ domain: String) -> Bool {
        peers[domain]?.requireCertificates ?? requireCertificates
    }
}

/// DNS settings (the `dns` section): how peers' SRV, address and TLSA records are resolved.
public struct DNSConfiguration: Codable, Sendable, Equatable {
    /// A resolv.conf-style file naming upstream resolvers; null: /etc/resolv.conf.
    public var resolvConf: String?
    /// Upstream resolvers (IP or IP@port) to use instead of resolv.conf.
    public var forwarders: [String] = []
    /// A file of DS or DNSKEY records used as DNSSEC trust anchors. With none, DNSSEC
    /// answers are never "secure" (the root key is not built in).
    public var trustAnchorFile: String?
    /// Seconds per query.
    public var timeoutSeconds: Int = 5

    public init() {}

    enum CodingKeys: String, CodingKey {
        case resolvConf = "resolv_conf"
        case forwarders
        case trustAnchorFile = "trust_anchor_file"
        case timeoutSeconds = "timeout_seconds"
    }

    /// Written out in full, nulls included, so every key appears in the defaults (the
    /// configuration loader knows keys, and environment overrides, from them).
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(resolvConf, forKey: .resolvConf)
        try container.encode(forwarders, forKey: .forwarders)
        try container.encode(trustAnchorFile, forKey: .trustAnchorFile)
        try container.encode(timeoutSeconds, forKey: .timeoutSeconds)
    }
}
