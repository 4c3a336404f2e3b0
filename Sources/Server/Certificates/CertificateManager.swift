import Foundation
import Logging
import NIOSSL
import Synchronization
import Trust
import X509
import XMPPCore
import XMPPStream

/// The certificates Braid presents, one per hosted domain or shared.
///
/// Sources, in order: the certificate files named in the configuration; certificates in
/// `<data>/certs/` (which `braid cert selfsign` writes); and, when `tls.self_sign_missing` is
/// on, a self-signed certificate made on first use for a hosted domain nothing else covers.
/// Generation is lazy so that ten thousand domains start without ten thousand key pairs.
public final class CertificateManager: Sendable {
    public let store: TLSContextStore
    let directory: String
    let selfSignMissing: Bool
    let domains: DomainRegistry
    let logger: Logger
    /// Certificates being made, by domain, so concurrent handshakes wait for one.
    private let generating = Mutex<[String: Task<Bool, Never>]>([:])

    init(directory: String, selfSignMissing: Bool, domains: DomainRegistry, logger: Logger) {
        self.store = TLSContextStore(logger: logger)
        self.directory = directory
        self.selfSignMissing = selfSignMissing
        self.domains = domains
        self.logger = logger
    }

    /// Where generated certificates for `domain` live (A-label file names).
    public static func paths(for domain: String, in directory: String) -> (certificate: String, key: String) {
        let name = (try? JID(domain: domain).asciiDomain) ?? domain
        return ("\(directory)/\(name).crt", "\(directory)/\(name).key")
    }

    /// Installs the configured certificate files. Each covers the domains listed, or every
    /// name its certificate covers.
    func loadConfigured(_ files: [BraidConfiguration.CertificateFiles]) throws {
        for file in files {
            let credentials: PEMCredentials
            do {
                credentials = try PEMCredentials.load(certificatePath: file.certificate, keyPath: file.key)
                try credentials.validate()
            } catch {
                throw ConfigurationError("certificate \(file.certificate): \(error)")
            }
            let names: [String]
            if let listed = file.domains {
                names = listed
            } else {
                let leaf = try credentials.leafCertificate()
                names = Array(try CertificateIdentity(certificate: leaf).allDomains)
            }
            guard !names.isEmpty else { throw ConfigurationError("certificate \(file.certificate) names no domain; list them under 'domains'") }
            try store.install(credentials, for: names)
            logger.info("certificate loaded", metadata: ["file": "\(file.certificate)", "domains": "\(names.sorted().joined(separator: ","))"])
        }
    }

    /// Installs every `NAME.crt`/`NAME.key` pair in the certificates directory.
    func loadDirectory() throws {
        let manager = FileManager.default
        guard let names = try? manager.contentsOfDirectory(atPath: directory) else { return }
        for file in names where file.hasSuffix(".crt") {
            let domain = String(file.dropLast(4))
            let (certificate, key) = Self.paths(for: domain, in: directory)
            guard manager.fileExists(atPath: key) else { continue }
            do {
                let credentials = try PEMCredentials.load(certificatePath: certificate, keyPath: key)
                let leaf = try credentials.leafCertificate()
                let covered = try CertificateIdentity(certificate: leaf).allDomains
                try store.install(credentials, for: covered.isEmpty ? [domain] : Array(covered))
            } catch {
                logger.warning("skipping unreadable certificate", metadata: ["file": "\(certificate)", "error": "\(error)"])
            }
        }
    }

    /// What a reload changed.
    public struct ReloadOutcome: Sendable, Equatable {
        /// Domains whose presented certificate is now a different one.
        public var changed: [String]
        /// Configured files that could not be loaded; their domains keep the certificate
        /// they had, so a half-written renewal never leaves a domain without one.
        public var failures: [String]
    }

    /// Reads the configured certificate files and the certificates directory again (SIGHUP,
    /// as after a certbot renewal). New handshakes present the new certificates at once;
    /// established streams keep theirs, and a peer re-validates when it reconnects or when
    /// the old certificate expires (RFC 6120 §13.7.2.3).
    public func reload(_ files: [BraidConfiguration.CertificateFiles]) -> ReloadOutcome {
        let before = Dictionary(uniqueKeysWithValues: store.domains.map { ($0, store.certificateDER(for: $0)) })
        var failures: [String] = []
        for file in files {
            do {
                try loadConfigured([file])
            } catch {
                failures.append(file.certificate)
                logger.error("certificate reload failed; the previous one stays", metadata: ["file": "\(file.certificate)", "error": "\(error)"])
            }
        }
        do { try loadDirectory() } catch {
            logger.error("reading the certificates directory failed", metadata: ["directory": "\(directory)", "error": "\(error)"])
        }
        let changed = store.domains.filter { domain in
            guard let old = before[domain] else { return true }
            return old != store.certificateDER(for: domain)
        }.sorted()
        return ReloadOutcome(changed: changed, failures: failures)
    }

    /// Every certificate presented, once (many names may share one), with its expiry:
    /// what the certificate metrics report after a load or reload.
    public func presentedExpiries() -> [Date] {
        var seen = Set<[UInt8]>()
        var expiries: [Date] = []
        for domain in store.domains {
            guard let der = store.certificateDER(for: domain), seen.insert(der).inserted,
                  let certificate = try? Certificate(derEncoded: der) else { continue }
            expiries.append(certificate.notValidAfter)
        }
        return expiries
    }

    /// True when some certificate covers `domain`.
    public func covers(_ domain: String) -> Bool {
        store.certificateDER(for: domain) != nil
    }

    /// Makes (and saves) a self-signed certificate for a domain served here (hosted, or a
    /// service domain such as `conference.customer.example`) that nothing covers. Key
    /// generation and file writes run off the event loops; concurrent callers share one task.
    @discardableResult
    func prepareCertificate(for domain: String) async -> Bool {
        if covers(domain) { return true }
        guard selfSignMissing, domains.isServed(domain) else { return false }
        let task = generating.withLock { running -> Task<Bool, Never> in
            if let existing = running[domain] { return existing }
            let task = Task.detached { [self] in self.generate(domain) }
            running[domain] = task
            return task
        }
        let made = await task.value
        generating.withLock { _ = $0.removeValue(forKey: domain) }
        return made
    }

    private func generate(_ domain: String) -> Bool {
        if covers(domain) { return true }
        do {
            let credentials = try SelfSignedCertificate.generate(domains: [domain])
            let (certificate, key) = Self.paths(for: domain, in: directory)
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try credentials.write(certificatePath: certificate, keyPath: key)
            try store.install(credentials, for: [domain])
            logger.notice("created a self-signed certificate", metadata: ["domain": "\(domain)", "file": "\(certificate)"])
            return true
        } catch {
            logger.error("cannot create a certificate", metadata: ["domain": "\(domain)", "error": "\(error)"])
            return false
        }
    }

    /// The context for STARTTLS on a stream to `domain` (RFC 6120 §5.4.3.1), once a
    /// certificate covers it.
    func serverContext(for domain: String) -> NIOSSLContext? {
        store.serverContext(for: domain)
    }

    /// `tls-server-end-point` channel binding (RFC 5929) for the certificate presented for
    /// `domain`, for SCRAM-*-PLUS. (`tls-exporter` comes from the live connection:
    /// ``TLSChannelBindings``.)
    func channelBinding(for domain: String) -> ChannelBinding? {
        guard let der = store.certificateDER(for: domain), let hash = TLSContextStore.tlsServerEndPointHash(certificateDER: der) else { return nil }
        return ChannelBinding(type: "tls-server-end-point", data: hash)
    }

    /// Direct TLS (XEP-0368): the certificate is chosen by SNI, made on first use if needed.
    func directTLSConfiguration(defaultDomain: String, alpn: [String]) -> TLSConfiguration {
        var configuration = store.makeServerConfiguration(defaultDomain: defaultDomain, alpn: alpn)
        let choose = configuration.sslContextCallback
        configuration.sslContextCallback = { [self] values, promise in
            let choice = { @Sendable in
                if let choose { choose(values, promise) } else { promise.succeed(.noChanges) }
            }
            // A served name no certificate covers yet gets one first, made off the event
            // loop; the handshake waits on the promise meanwhile.
            if let name = values.serverHostname, let domain = try? JID(domain: name),
               !self.covers(domain.domainpart), self.selfSignMissing, self.domains.isServed(domain.domainpart) {
                Task {
                    await self.prepareCertificate(for: domain.domainpart)
                    choice()
                }
            } else {
                choice()
            }
        }
        return configuration
    }
}
