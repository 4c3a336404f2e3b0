import Logging
import NIOCore
import NIOSSL
import Synchronization
import X509

/// TLS server contexts for every hosted domain, chosen by SNI or by the stream header's `to`.
///
/// RFC 6120 §5.4.3.1: the receiving entity presents the certificate for the domain the
/// initiator asked for. With STARTTLS that domain is the stream header's `to`, known before
/// TLS starts, so the caller asks ``serverContext(for:)`` directly. With direct TLS
/// (XEP-0368, ports 5223/5270) the only hint is SNI, so ``makeServerConfiguration(defaultDomain:alpn:requestClientCertificate:)``
/// returns a configuration whose `sslContextCallback` picks the certificate per handshake.
///
/// One set of credentials may serve several domains, either because it was installed for
/// them or because its certificate covers a name (also through a wildcard DNS-ID). Each set of
/// credentials is parsed once and its `NIOSSLContext`s are built once and shared by every
/// domain that uses it.
///
/// The store is thread-safe: all state sits behind one `Mutex`, held only for dictionary
/// look-ups, never while building contexts or doing I/O.
public final class TLSContextStore: Sendable {
    /// TLS 1.2 is the floor: RFC 9325 §3.1.1 forbids TLS 1.0 and 1.1, and XMPP clients and
    /// servers in use all speak 1.2 or 1.3.
    public static let minimumTLSVersion: TLSVersion = .tlsv12

    /// One installed set of credentials, parsed, with its contexts.
    final class Entry: Sendable {
        let credentials: PEMCredentials
        let identity: CertificateIdentity
        let leafDER: [UInt8]
        let certificateChain: [NIOSSLCertificate]
        let privateKey: NIOSSLPrivateKey
        /// c2s: no client certificate requested.
        let context: NIOSSLContext
        /// s2s: requests a client certificate; built on first use, because loading the
        /// system trust store is not free and c2s-only domains never need it.
        let clientCertificateContext: Mutex<NIOSSLContext?>

        init(_ credentials: PEMCredentials) throws {
            try credentials.validate()
            let chain: [NIOSSLCertificate]
            let key: NIOSSLPrivateKey
            do {
                chain = try NIOSSLCertificate.fromPEMBytes(Array(credentials.certificateChainPEM.utf8))
            } catch {
                throw TrustError(.invalidCertificate, "BoringSSL cannot load the certificate chain: \(error)")
            }
            do {
                key = try NIOSSLPrivateKey(bytes: Array(credentials.privateKeyPEM.utf8), format: .pem)
            } catch {
                throw TrustError(.invalidPrivateKey, "BoringSSL cannot load the private key: \(error)")
            }
            guard let leaf = chain.first else {
                throw TrustError(.invalidCertificate, "the certificate chain is empty")
            }
            self.credentials = credentials
            self.identity = try CertificateIdentity(certificate: credentials.leafCertificate())
            self.leafDER = try leaf.toDERBytes()
            self.certificateChain = chain
            self.privateKey = key
            self.context = try NIOSSLContext(configuration: Self.configuration(chain: chain, key: key, requestClientCertificate: false))
            self.clientCertificateContext = Mutex(nil)
        }

        /// What the SNI callback hands to BoringSSL for this entry.
        var configurationOverride: NIOSSLContextConfigurationOverride {
            var override = NIOSSLContextConfigurationOverride()
            override.certificateChain = certificateChain.map { .certificate($0) }
            override.privateKey = .privateKey(privateKey)
            return override
        }

        func contextRequestingClientCertificate() throws -> NIOSSLContext {
            if let context = clientCertificateContext.withLock({ $0 }) { return context }
            // Built outside the lock; if two threads race, both contexts are equivalent and
            // the first one stored wins.
            let built = try NIOSSLContext(configuration: Self.configuration(chain: certificateChain, key: privateKey, requestClientCertificate: true))
            return clientCertificateContext.withLock { stored in
                if let stored { return stored }
                stored = built
                return built
            }
        }

        static func configuration(chain: [NIOSSLCertificate], key: NIOSSLPrivateKey, requestClientCertificate: Bool) -> TLSConfiguration {
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) },
                privateKey: .privateKey(key)
            )
            TLSContextStore.applyCommonSettings(to: &configuration, requestClientCertificate: requestClientCertificate)
            return configuration
        }
    }

    private struct State {
        /// Canonical U-label domain → the credentials installed for it.
        var entries: [String: Entry] = [:]
    }

    private let state = Mutex(State())
    private let logger: Logger

    /// Creates an empty store.
    public init(logger: Logger = Logger(label: "braid.trust.tls")) {
        self.logger = logger
    }

    // MARK: Installing

    /// Installs credentials for `domains`, replacing what those domains had.
    ///
    /// The pair is parsed and checked (key matches leaf) and its contexts built before
    /// anything changes, so a bad pair leaves the store as it was. Installing credentials equal
    /// to ones already installed reuses their parsed form and contexts.
    ///
    /// A domain the certificate does not cover is still installed (an operator may knowingly
    /// serve a mismatched certificate, e.g. during a migration) but a warning is logged, since
    /// peers that check names will refuse it.
    ///
    /// - Parameters:
    ///   - credentials: the chain and key.
    ///   - domains: the domains to serve them for, U-label or A-label form. When empty, every
    ///     domain the certificate names exactly (``CertificateIdentity/allDomains``) is used.
    /// - Throws: ``TrustError`` when the credentials or a domain are invalid.
    public func install(_ credentials: PEMCredentials, for domains: [String]) throws {
        let existing = state.withLock { state in state.entries.values.first { $0.credentials == credentials } }
        let entry = try existing ?? Entry(credentials)
        var prepared = try domains.map { (domain) throws(TrustError) in try PreparedDomain(domain) }
        if prepared.isEmpty {
            prepared = entry.identity.allDomains.sorted().compactMap { try? PreparedDomain($0) }
            guard !prepared.isEmpty else {
                throw TrustError(.noDomains, "no domains given and the certificate names none")
            }
        }
        for domain in prepared where entry.identity.matches(domain, service: .xmppClient) == nil
            && entry.identity.matches(domain, service: .xmppServer) == nil {
            logger.warning("installed certificate does not cover the domain", metadata: ["domain": "\(domain.unicode)"])
        }
        state.withLock { state in
            for domain in prepared { state.entries[domain.unicode] = entry }
        }
    }

    /// Stops serving `domain`. Credentials no domain uses any more are released.
    public func remove(domain: String) {
        guard let prepared = try? PreparedDomain(domain) else { return }
        _ = state.withLock { state in state.entries.removeValue(forKey: prepared.unicode) }
    }

    /// The domains that have credentials installed, in canonical U-label form.
    public var domains: Set<String> {
        state.withLock { Set($0.entries.keys) }
    }

    // MARK: Looking up

    /// The c2s server context for `domain`: no client certificate is requested, since clients
    /// rarely have one and SASL authenticates them (RFC 6120 §6).
    ///
    /// For STARTTLS, call with the stream header's `to` (RFC 6120 §5.4.3.1).
    ///
    /// - Returns: the context of the credentials installed for `domain`, else of credentials
    ///   whose certificate covers it (e.g. by a wildcard), else nil.
    public func serverContext(for domain: String) -> NIOSSLContext? {
        entry(for: domain)?.context
    }

    /// The s2s server context for `domain`: it requests, but does not require, a client
    /// certificate (RFC 6120 §5.4.3.1; XEP-0178 §3 step 1).
    ///
    /// BoringSSL validates a presented certificate against the system trust store and fails
    /// the handshake when that fails. For s2s that is too strict: a peer with a self-signed
    /// certificate may still authenticate with dialback (RFC 6120 §13.14).
    ///
    /// TODO: the s2s layer must create its `NIOSSLServerHandler` with
    /// `customVerificationCallbackWithMetadata:` and a callback that accepts the chain,
    /// records it, and leaves PKIX and name checks (and per-peer trust anchors, RFC 6120 §13.6)
    /// to the federation layer.
    ///
    /// - Throws: when the context cannot be built.
    /// - Returns: nil when no credentials cover `domain`.
    public func serverContextRequestingClientCertificate(for domain: String) throws -> NIOSSLContext? {
        try entry(for: domain)?.contextRequestingClientCertificate()
    }

    /// The leaf certificate presented for `domain`, DER-encoded, for the
    /// `tls-server-end-point` channel binding (RFC 5929 §4). Resolves like
    /// ``serverContext(for:)``.
    ///
    /// With direct TLS, the certificate was chosen by SNI, which the server cannot read back
    /// after the handshake: when the SNI was missing or unknown, the default domain's
    /// certificate was presented, so ask for that domain.
    public func certificateDER(for domain: String) -> [UInt8]? {
        entry(for: domain)?.leafDER
    }

    /// Every distinct leaf certificate installed, DER-encoded, in a stable order: the
    /// provider's POSH document lists them all, so a customer domain that delegates to it
    /// is proven on any link, whichever domain's certificate that link presents.
    public var allCertificateDER: [[UInt8]] {
        let leaves = state.withLock { state in state.entries.values.map(\.leafDER) }
        var seen = Set<[UInt8]>()
        return leaves.filter { seen.insert($0).inserted }.sorted { $0.lexicographicallyPrecedes($1) }
    }

    /// The chain and key to present for `domain` when Braid is the TLS client (outgoing
    /// s2s, where the peer requests a client certificate; XEP-0178 §3 step 1), resolved like
    /// ``serverContext(for:)``, with the identity of that certificate.
    public func clientCredentials(for domain: String) -> (chain: [NIOSSLCertificate], key: NIOSSLPrivateKey, identity: CertificateIdentity)? {
        guard let entry = entry(for: domain) else { return nil }
        return (entry.certificateChain, entry.privateKey, entry.identity)
    }

    /// The identity of the certificate presented for `domain`, resolved like
    /// ``serverContext(for:)``.
    public func certificateIdentity(for domain: String) -> CertificateIdentity? {
        entry(for: domain)?.identity
    }

    // MARK: Direct TLS

    /// A server configuration that picks the certificate by SNI (XEP-0368 direct TLS).
    ///
    /// The `sslContextCallback` looks the SNI name up at every handshake: credentials
    /// installed for it, else credentials whose certificate covers it, else the default
    /// domain's. Because it consults the store each time, credentials installed later (a
    /// renewed certificate, a new domain) take effect without a new configuration.
    ///
    /// - Parameters:
    ///   - defaultDomain: whose certificate to present without SNI or for an unknown name.
    ///   - alpn: the ALPN protocols to offer, e.g. `["xmpp-client"]` or `["xmpp-server"]`
    ///     (XEP-0368 §4).
    ///   - requestClientCertificate: whether to request a client certificate (s2s); see
    ///     ``serverContextRequestingClientCertificate(for:)`` for what that entails.
    public func makeServerConfiguration(defaultDomain: String, alpn: [String], requestClientCertificate: Bool = false) -> TLSConfiguration {
        var configuration: TLSConfiguration
        if let entry = entry(for: defaultDomain) {
            configuration = Entry.configuration(chain: entry.certificateChain, key: entry.privateKey, requestClientCertificate: requestClientCertificate)
        } else {
            // Nothing to present yet; the callback below supplies a certificate once one is
            // installed. makeServerConfiguration insists on a key, and the client defaults
            // differ from the server ones only in certificate, key and verification, which
            // applyCommonSettings sets.
            configuration = TLSConfiguration.makeClientConfiguration()
            Self.applyCommonSettings(to: &configuration, requestClientCertificate: requestClientCertificate)
        }
        configuration.applicationProtocols = alpn
        configuration.sslContextCallback = { [self] values, promise in
            let entry = self.entry(forServerName: values.serverHostname, defaultDomain: defaultDomain)
            promise.succeed(entry?.configurationOverride ?? .noChanges)
        }
        return configuration
    }

    // MARK: Internals

    static func applyCommonSettings(to configuration: inout TLSConfiguration, requestClientCertificate: Bool) {
        configuration.minimumTLSVersion = minimumTLSVersion
        // RFC 5746 / RFC 6120 §5.3.5: no renegotiation on a server.
        configuration.renegotiationSupport = .none
        configuration.certificateVerification = requestClientCertificate ? .optionalVerification : .none
    }

    private func entry(for domain: String) -> Entry? {
        guard let prepared = try? PreparedDomain(domain) else { return nil }
        return entry(for: prepared)
    }

    private func entry(for domain: PreparedDomain) -> Entry? {
        state.withLock { state in
            if let exact = state.entries[domain.unicode] { return exact }
            // Deterministic choice when several certificates cover the name.
            for key in state.entries.keys.sorted() {
                guard let candidate = state.entries[key] else { continue }
                if candidate.identity.matches(domain, service: .xmppClient) != nil
                    || candidate.identity.matches(domain, service: .xmppServer) != nil {
                    return candidate
                }
            }
            return nil
        }
    }

    private func entry(forServerName serverName: String?, defaultDomain: String) -> Entry? {
        if let serverName, let entry = entry(for: serverName) { return entry }
        return entry(for: defaultDomain)
    }
}
