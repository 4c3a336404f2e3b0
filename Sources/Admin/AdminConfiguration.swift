/// Settings of the HTTP side (the `admin` section of the configuration): the admin API and
/// metrics listener, and the HTTPS listener that serves POSH documents (RFC 7711).
public struct AdminConfiguration: Codable, Sendable, Equatable {
    /// Address of the admin listener (metrics, API). It has no authentication, so it binds
    /// to loopback unless told otherwise.
    public var adminAddress: String = "127.0.0.1"
    /// Admin listener port; null disables it, 0 picks a free port (tests).
    public var adminPort: Int? = 5280
    /// Address of the POSH listener.
    public var poshAddress: String = "0.0.0.0"
    /// POSH listener port (HTTPS); null disables it. Port 443 needs privileges
    /// (CAP_NET_BIND_SERVICE); without them the server logs a warning and runs without it.
    public var poshPort: Int? = 443
    /// The provider's own host name, whose POSH document is also served so that tenants can
    /// publish a reference to it (RFC 7711 §3.2); null: none.
    public var poshHostName: String? = nil
    /// The `expires` of the documents served, in seconds (RFC 7711 §3.1).
    public var poshExpiresSeconds: Int = 86_400
    /// The path of XMPP over WebSocket (RFC 7395) on the HTTPS listener; null turns it off.
    public var webSocketPath: String? = "/xmpp-websocket"
    /// Origins (`https://chat.example.com`) whose pages may open a WebSocket stream; empty
    /// allows every origin. Logging in still needs the user's password, so a foreign page
    /// gains nothing it could not get by connecting itself.
    public var webSocketAllowedOrigins: [String] = []
    /// The WebSocket URL host-meta announces (`{domain}` is replaced by the domain asked
    /// for), for a listener behind a proxy; null: this listener, under the name the client
    /// used.
    public var webSocketURL: String? = nil

    public init() {}

    public init(
        adminAddress: String = "127.0.0.1",
        adminPort: Int? = 5280,
        poshAddress: String = "0.0.0.0",
        poshPort: Int? = 443,
        poshHostName: String? = nil,
        poshExpiresSeconds: Int = 86_400
    ) {
        self.adminAddress = adminAddress
        self.adminPort = adminPort
        self.poshAddress = poshAddress
        self.poshPort = poshPort
        self.poshHostName = poshHostName
        self.poshExpiresSeconds = poshExpiresSeconds
    }

    enum CodingKeys: String, CodingKey {
        case adminAddress = "admin_address"
        case adminPort = "admin_port"
        case poshAddress = "posh_address"
        case poshPort = "posh_port"
        case poshHostName = "posh_host_name"
        case poshExpiresSeconds = "posh_expires_seconds"
        case webSocketPath = "websocket_path"
        case webSocketAllowedOrigins = "websocket_allowed_origins"
        case webSocketURL = "websocket_url"
    }

    /// Missing keys keep their defaults.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = AdminConfiguration()
        adminAddress = try container.decodeIfPresent(String.self, forKey: .adminAddress) ?? defaults.adminAddress
        adminPort = try container.contains(.adminPort) ? container.decodeIfPresent(Int.self, forKey: .adminPort) : defaults.adminPort
        poshAddress = try container.decodeIfPresent(String.self, forKey: .poshAddress) ?? defaults.poshAddress
        poshPort = try container.contains(.poshPort) ? container.decodeIfPresent(Int.self, forKey: .poshPort) : defaults.poshPort
        poshHostName = try container.decodeIfPresent(String.self, forKey: .poshHostName)
        poshExpiresSeconds = try container.decodeIfPresent(Int.self, forKey: .poshExpiresSeconds) ?? defaults.poshExpiresSeconds
        webSocketPath = try container.contains(.webSocketPath) ? container.decodeIfPresent(String.self, forKey: .webSocketPath) : defaults.webSocketPath
        webSocketAllowedOrigins = try container.decodeIfPresent([String].self, forKey: .webSocketAllowedOrigins) ?? defaults.webSocketAllowedOrigins
        webSocketURL = try container.decodeIfPresent(String.self, forKey: .webSocketURL)
    }

    /// Written out in full, nulls included: the configuration loader learns the valid keys
    /// (and the environment overrides) from the encoded defaults, so an optional left out
    /// would become an "unknown key".
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(adminAddress, forKey: .adminAddress)
        try container.encode(adminPort, forKey: .adminPort)
        try container.encode(poshAddress, forKey: .poshAddress)
        try container.encode(poshPort, forKey: .poshPort)
        try container.encode(poshHostName, forKey: .poshHostName)
        try container.encode(poshExpiresSeconds, forKey: .poshExpiresSeconds)
        try container.encode(webSocketPath, forKey: .webSocketPath)
        try container.encode(webSocketAllowedOrigins, forKey: .webSocketAllowedOrigins)
        try container.encode(webSocketURL, forKey: .webSocketURL)
    }
}
