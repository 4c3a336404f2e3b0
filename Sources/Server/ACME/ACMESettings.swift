import Foundation

extension BraidConfiguration {
    /// Certificates from an ACME CA (RFC 8555), for every hosted domain and its service
    /// domains (`acme`). Off by default; see docs/acme.md.
    public struct ACMESettings: Codable, Sendable, Equatable {
        /// Order certificates at all.
        public var enabled = false
        /// The CA's directory (Let's Encrypt's production one by default).
        public var directoryURL = "https://acme-v02.api.letsencrypt.org/directory"
        /// Where the CA writes about expiring certificates and account problems (an e-mail
        /// address, with or without `mailto:`); empty: no contact.
        public var contact = ""
        /// The challenge types answered, preferred first: `http-01` (the listener below, port
        /// 80) and `tls-alpn-01` (RFC 8737, on the HTTPS listener, `admin.posh_port`, which
        /// the CA reaches at port 443). After a failed order the next attempt leads with the
        /// next type, so one blocked port does not stop renewals.
        public var challenges: [ACMEChallengeType] = [.http01, .tlsALPN01]
        /// The HTTP-01 listener's address and port (bound only with `http-01` among the
        /// challenges). The CA connects to port 80 of each name; every other request there is
        /// redirected to https.
        public var httpAddress = "0.0.0.0"
        public var httpPort = 80
        /// Hosted domains (or single service domains) that bring their own certificate.
        public var excludeDomains: [String] = []
        /// How often every domain is looked at; an order is placed only when a certificate is
        /// missing, self-signed, lacks a name, or is past two thirds of its lifetime.
        public var renewCheckIntervalSeconds: Double = 3600
        /// A PEM file of CA certificates to trust for the directory's HTTPS (a test CA such
        /// as Pebble's); empty: the system's trust store.
        public var caCertificateFile = ""

        public init() {}

        enum CodingKeys: String, CodingKey {
            case enabled
            case directoryURL = "directory_url"
            case contact
            case challenges
            case httpAddress = "http_address"
            case httpPort = "http_port"
            case excludeDomains = "exclude_domains"
            case renewCheckIntervalSeconds = "renew_check_interval_seconds"
            case caCertificateFile = "ca_certificate_file"
        }
    }
}
