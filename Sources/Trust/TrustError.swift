/// An error from the certificate side of the Trust module.
///
/// Equality compares only the ``code`` so that tests and callers can match on the kind of
/// failure; ``reason`` carries the human-readable detail for logs.
public struct TrustError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private enum Base: Sendable, Hashable {
            case invalidDomain
            case noDomains
            case invalidValidity
            case invalidCertificate
            case invalidPrivateKey
            case keyDoesNotMatchCertificate
            case fileSystem
        }

        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// A domain name could not be prepared as an XMPP domainpart (RFC 7622 §3.2).
        public static let invalidDomain = Code(.invalidDomain)
        /// A certificate was requested without any domain.
        public static let noDomains = Code(.noDomains)
        /// A validity period was empty or negative.
        public static let invalidValidity = Code(.invalidValidity)
        /// PEM or DER text did not hold a usable certificate.
        public static let invalidCertificate = Code(.invalidCertificate)
        /// PEM text did not hold a usable private key.
        public static let invalidPrivateKey = Code(.invalidPrivateKey)
        /// The private key does not belong to the leaf certificate.
        public static let keyDoesNotMatchCertificate = Code(.keyDoesNotMatchCertificate)
        /// Reading or writing a file failed.
        public static let fileSystem = Code(.fileSystem)

        public var description: String {
            switch base {
            case .invalidDomain: "invalidDomain"
            case .noDomains: "noDomains"
            case .invalidValidity: "invalidValidity"
            case .invalidCertificate: "invalidCertificate"
            case .invalidPrivateKey: "invalidPrivateKey"
            case .keyDoesNotMatchCertificate: "keyDoesNotMatchCertificate"
            case .fileSystem: "fileSystem"
            }
        }
    }

    public let code: Code
    public let reason: String

    public init(_ code: Code, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public static func == (lhs: TrustError, rhs: TrustError) -> Bool { lhs.code == rhs.code }
    public func hash(into hasher: inout Hasher) { hasher.combine(code) }

    public var description: String { "TrustError.\(code): \(reason)" }
}
