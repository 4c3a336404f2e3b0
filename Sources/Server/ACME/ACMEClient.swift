import AsyncHTTPClient
import Crypto
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import X509

/// What went wrong talking to an ACME CA. Problem documents (RFC 8555 §6.7) keep their type
/// so the renewal service can tell a rate limit from a failed challenge.
public struct ACMEError: Error, Sendable, CustomStringConvertible {
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private enum Base: String, Sendable, Hashable {
            case configuration, transport, protocolViolation, problem, challengeFailed, timeout, `internal`
        }

        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// Our settings or files: a directory URL, the account key, a CA file.
        public static let configuration = Code(.configuration)
        /// The CA could not be reached or broke the connection.
        public static let transport = Code(.transport)
        /// The CA answered something RFC 8555 does not allow.
        public static let protocolViolation = Code(.protocolViolation)
        /// The CA answered with a problem document (`problemType` says which).
        public static let problem = Code(.problem)
        /// An authorisation ended `invalid`: the CA could not fetch the key authorisation.
        public static let challengeFailed = Code(.challengeFailed)
        /// Polling gave up before the CA was done.
        public static let timeout = Code(.timeout)
        public static let `internal` = Code(.internal)

        public var description: String { base.rawValue }
    }

    public var code: Code
    public var message: String
    /// `urn:ietf:params:acme:error:…` when the CA sent a problem document.
    public var problemType: String?
    /// The CA's Retry-After, when it gave one.
    public var retryAfter: Duration?

    public init(_ code: Code, _ message: String, problemType: String? = nil, retryAfter: Duration? = nil) {
        self.code = code
        self.message = message
        self.problemType = problemType
        self.retryAfter = retryAfter
    }

    public var isRateLimited: Bool { problemType == ACMEClient.Problem.rateLimited }

    public var description: String {
        "\(code): \(message)" + (problemType.map { " (\($0))" } ?? "")
    }
}

/// An ACME client (RFC 8555) over AsyncHTTPClient: one account, HTTP-01 (§8.3) and
/// TLS-ALPN-01 (RFC 8737) challenges.
///
/// Requests are serialised by the actor, so one nonce pool serves them all and `badNonce`
/// retries take the nonce the error carried (§6.5).
public actor ACMEClient {
    enum Problem {
        static let badNonce = "urn:ietf:params:acme:error:badNonce"
        static let rateLimited = "urn:ietf:params:acme:error:rateLimited"
        static let accountDoesNotExist = "urn:ietf:params:acme:error:accountDoesNotExist"
    }

    /// How long polling may take and how often it asks, whatever Retry-After says.
    public struct Polling: Sendable {
        public var first: Duration = .milliseconds(250)
        public var longest: Duration = .seconds(10)
        public var total: Duration = .seconds(120)

        public init() {}
    }

    struct Directory: Decodable {
        var newNonce: String
        var newAccount: String
        var newOrder: String
    }

    struct Identifier: Codable, Sendable {
        var type = "dns"
        var value: String
    }

    struct Order: Decodable {
        var status: String
        var authorizations: [String]
        var finalize: String
        var certificate: String?
        var error: ProblemDocument?
    }

    struct Authorization: Decodable {
        var status: String
        var identifier: Identifier
        var challenges: [Challenge]
        var wildcard: Bool?
    }

    struct Challenge: Decodable {
        var type: String
        var url: String
        var status: String
        var token: String?
        var error: ProblemDocument?
    }

    struct ProblemDocument: Decodable, Sendable {
        var type: String?
        var detail: String?
        var subproblems: [ProblemDocument]?
    }

    struct Response: Sendable {
        var status: Int
        var headers: HTTPHeaders
        var body: Data

        var location: String? { headers.first(name: "Location") }
    }

    private let directoryURL: String
    private let key: ACMEAccountKey
    private let contact: [String]
    private let http: HTTPClient
    private let polling: Polling
    private let logger: Logger
    private var directory: Directory?
    private var nonces: [String] = []
    private var accountURL: String?
    /// Largest body read from the CA (certificate chains are a few kilobytes).
    private static let maximumBodyBytes = 1 << 20

    /// - Parameters:
    ///   - trustRootsFile: PEM CA certificates for the directory's HTTPS; nil: the system's.
    init(directoryURL: String, key: ACMEAccountKey, contact: String, trustRootsFile: String?, polling: Polling = Polling(),
         eventLoopGroup: any EventLoopGroup, logger: Logger) throws(ACMEError) {
        self.directoryURL = directoryURL
        self.key = key
        let trimmed = contact.trimmingCharacters(in: .whitespaces)
        self.contact = trimmed.isEmpty ? [] : [trimmed.hasPrefix("mailto:") ? trimmed : "mailto:\(trimmed)"]
        var tls = TLSConfiguration.makeClientConfiguration()
        if let trustRootsFile {
            do {
                tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(trustRootsFile))
            } catch {
                throw ACMEError(.configuration, "acme.ca_certificate_file \(trustRootsFile): \(error)")
            }
        }
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.timeout = .init(connect: .seconds(10), read: .seconds(30))
        configuration.redirectConfiguration = .disallow
        self.http = HTTPClient(eventLoopGroup: eventLoopGroup, configuration: configuration)
        self.polling = polling
        self.logger = logger
    }

    func shutdown() async {
        try? await http.shutdown()
    }

    /// The key authorisation the HTTP-01 listener serves for `token`.
    nonisolated func keyAuthorization(token: String) -> String {
        key.keyAuthorization(token: token)
    }

    // MARK: The order, end to end

    /// Orders one certificate for `names` and returns its chain (PEM, leaf first).
    ///
    /// - Parameters:
    ///   - certificateKey: the new certificate's key; its public half goes into the CSR.
    ///   - challenges: the types to answer, preferred first; each authorisation takes the
    ///     first of them it offers.
    ///   - publish: called with the challenge's answer before the CA is told to validate it
    ///     (it may fail: a validation certificate that cannot be made); `withdraw` after the
    ///     authorisation is decided, so nothing is offered beyond the order.
    func issue(names: [String], certificateKey: P256.Signing.PrivateKey, challenges: [ACMEChallengeType] = [.http01],
               publish: @Sendable (ACMEChallengeAnswer) throws(ACMEError) -> Void,
               withdraw: @Sendable (ACMEChallengeAnswer) -> Void) async throws(ACMEError) -> String {
        let account = try await ensureAccount()
        let directory = try await loadDirectory()
        let orderRequest = try Self.json(["identifiers": names.map { Identifier(value: $0) }])
        let created = try await post(directory.newOrder, payload: orderRequest, signer: .kid(account))
        guard created.status == 201, let orderURL = created.location else {
            throw ACMEError(.protocolViolation, "newOrder answered \(created.status) without an order URL")
        }
        var order: Order = try Self.decode(created.body)
        logger.debug("ACME order created", metadata: ["order": "\(orderURL)", "names": "\(names.joined(separator: ","))"])

        for authorizationURL in order.authorizations {
            try await authorize(authorizationURL, account: account, challenges: challenges, publish: publish, withdraw: withdraw)
        }

        order = try await pollOrder(orderURL, account: account, until: ["ready", "valid"])
        if order.status == "ready" {
            let csr = try Self.csr(names: names, key: certificateKey)
            let finalized = try await post(order.finalize, payload: try Self.json(["csr": Base64URL.encode(csr)]), signer: .kid(account))
            order = try Self.decode(finalized.body)
            if order.status != "valid" {
                order = try await pollOrder(orderURL, account: account, until: ["valid"])
            }
        }
        guard let certificateURL = order.certificate else {
            throw ACMEError(.protocolViolation, "order \(orderURL) is valid without a certificate URL")
        }
        let download = try await post(certificateURL, payload: nil, signer: .kid(account), accept: "application/pem-certificate-chain")
        guard download.status == 200, let chain = String(data: download.body, encoding: .utf8), chain.contains("-----BEGIN CERTIFICATE-----") else {
            throw ACMEError(.protocolViolation, "certificate download answered \(download.status) without a PEM chain")
        }
        return chain
    }

    /// One authorisation (§7.5): done if already valid, else its challenge (the first of
    /// `challenges` it offers) answered and the authorisation polled until the CA decides.
    private func authorize(_ url: String, account: String, challenges: [ACMEChallengeType],
                           publish: @Sendable (ACMEChallengeAnswer) throws(ACMEError) -> Void,
                           withdraw: @Sendable (ACMEChallengeAnswer) -> Void) async throws(ACMEError) {
        let authorization: Authorization = try Self.decode(try await post(url, payload: nil, signer: .kid(account)).body)
        switch authorization.status {
        case "valid":
            return
        case "pending":
            break
        default:
            throw ACMEError(.challengeFailed, "authorization for \(authorization.identifier.value) is \(authorization.status)")
        }
        let offered = challenges.lazy.compactMap { type in
            authorization.challenges.first { $0.type == type.rawValue }.map { (type, $0) }
        }.first
        guard let (type, challenge) = offered, let token = challenge.token, Self.isToken(token) else {
            throw ACMEError(.protocolViolation, "no usable \(challenges.map(\.rawValue).joined(separator: " or ")) challenge for \(authorization.identifier.value)")
        }
        // The identifier names the validation certificate (tls-alpn-01), so it must be a
        // plain DNS name, as the CSR's are.
        let identifier = authorization.identifier.value.lowercased()
        guard authorization.identifier.type == "dns", authorization.wildcard != true, Self.isDNSName(identifier) else {
            throw ACMEError(.protocolViolation, "authorization for an identifier Braid did not order: \(authorization.identifier.value)")
        }
        let answer = ACMEChallengeAnswer(type: type, identifier: identifier, token: token, keyAuthorization: key.keyAuthorization(token: token))
        try publish(answer)
        defer { withdraw(answer) }
        logger.debug("ACME challenge offered", metadata: ["domain": "\(identifier)", "challenge": "\(type.rawValue)"])
        // The challenge is answered with an empty object (§7.5.1).
        _ = try await post(challenge.url, payload: Data("{}".utf8), signer: .kid(account))
        let final = try await poll(url, account: account, decode: Authorization.self) { ["valid", "invalid", "deactivated", "expired", "revoked"].contains($0.status) }
        guard final.status == "valid" else {
            let failed = final.challenges.first(where: { $0.type == type.rawValue })?.error
            throw ACMEError(.challengeFailed, "authorization for \(final.identifier.value) is \(final.status) (\(type.rawValue)): \(failed?.detail ?? "no detail")",
                            problemType: failed?.type)
        }
        logger.debug("ACME authorization valid", metadata: ["domain": "\(final.identifier.value)"])
    }

    private func pollOrder(_ url: String, account: String, until wanted: Set<String>) async throws(ACMEError) -> Order {
        let order = try await poll(url, account: account, decode: Order.self) { wanted.contains($0.status) || $0.status == "invalid" }
        guard order.status != "invalid" else {
            throw ACMEError(.challengeFailed, "order \(url) is invalid: \(order.error?.detail ?? "no detail")", problemType: order.error?.type)
        }
        return order
    }

    /// POST-as-GET until `done`, waiting Retry-After (within the configured bounds) or a
    /// doubling delay between attempts; gives up after `polling.total`.
    private func poll<T: Decodable>(_ url: String, account: String, decode: T.Type, done: (T) -> Bool) async throws(ACMEError) -> T {
        let deadline = ContinuousClock.now + polling.total
        var delay = polling.first
        while true {
            let response = try await post(url, payload: nil, signer: .kid(account))
            let value: T = try Self.decode(response.body)
            if done(value) { return value }
            let wait = min(max(Self.retryAfter(response.headers) ?? delay, polling.first), polling.longest)
            guard ContinuousClock.now + wait < deadline else {
                throw ACMEError(.timeout, "\(url) not done within \(polling.total)")
            }
            do { try await Task.sleep(for: wait) } catch { throw ACMEError(.timeout, "cancelled while polling \(url)") }
            delay = min(delay * 2, polling.longest)
        }
    }

    // MARK: Account

    /// Registers the account (or finds it: the CA answers 200 for a key it knows, §7.3.1)
    /// and remembers its URL for `kid`.
    private func ensureAccount() async throws(ACMEError) -> String {
        if let accountURL { return accountURL }
        let directory = try await loadDirectory()
        struct NewAccount: Encodable {
            var termsOfServiceAgreed = true
            var contact: [String]
        }
        let response = try await post(directory.newAccount, payload: try Self.json(NewAccount(contact: contact)), signer: .jwk)
        guard response.status == 200 || response.status == 201, let location = response.location else {
            throw ACMEError(.protocolViolation, "newAccount answered \(response.status) without an account URL")
        }
        accountURL = location
        logger.info("ACME account ready", metadata: ["account": "\(location)", "created": "\(response.status == 201)"])
        return location
    }

    // MARK: Transport

    private func loadDirectory() async throws(ACMEError) -> Directory {
        if let directory { return directory }
        let response = try await send(method: .GET, url: directoryURL, body: nil)
        guard response.status == 200 else {
            throw ACMEError(.transport, "directory \(directoryURL) answered \(response.status)")
        }
        let loaded: Directory = try Self.decode(response.body)
        directory = loaded
        return loaded
    }

    private func nonce() async throws(ACMEError) -> String {
        if let next = nonces.popLast() { return next }
        let directory = try await loadDirectory()
        let response = try await send(method: .HEAD, url: directory.newNonce, body: nil)
        guard let fresh = response.headers.first(name: "Replay-Nonce") else {
            throw ACMEError(.protocolViolation, "newNonce answered \(response.status) without Replay-Nonce")
        }
        return fresh
    }

    /// A signed POST; a `badNonce` answer is retried (a few times) with a fresh nonce, and
    /// any other problem document becomes an error.
    private func post(_ url: String, payload: Data?, signer: ACMEAccountKey.Signer, accept: String? = nil) async throws(ACMEError) -> Response {
        var attempts = 0
        while true {
            attempts += 1
            let body = try key.sign(payload: payload, url: url, nonce: try await nonce(), signer: signer)
            let response = try await send(method: .POST, url: url, body: body, accept: accept)
            guard response.status >= 400 else { return response }
            let problem = try? JSONDecoder().decode(ProblemDocument.self, from: response.body)
            if problem?.type == Problem.badNonce, attempts < 5 {
                logger.debug("ACME badNonce; retrying", metadata: ["url": "\(url)"])
                continue
            }
            // The CA forgot the account (a reset test CA, a deactivation): register the
            // key again on the next order rather than failing every order from now on.
            if problem?.type == Problem.accountDoesNotExist { accountURL = nil }
            throw ACMEError(.problem, "\(url) answered \(response.status): \(problem?.detail ?? "no detail")",
                            problemType: problem?.type, retryAfter: Self.retryAfter(response.headers))
        }
    }

    private func send(method: HTTPMethod, url: String, body: Data?, accept: String? = nil) async throws(ACMEError) -> Response {
        var request = HTTPClientRequest(url: url)
        request.method = method
        request.headers.add(name: "User-Agent", value: "Braid-ACME")
        if let accept { request.headers.add(name: "Accept", value: accept) }
        if let body {
            request.headers.add(name: "Content-Type", value: "application/jose+json")
            request.body = .bytes(ByteBuffer(bytes: body))
        }
        do {
            let response = try await http.execute(request, timeout: .seconds(30))
            let bytes = try await response.body.collect(upTo: Self.maximumBodyBytes)
            // Every answer carries a fresh nonce (§6.5); keep it for the next request.
            if let next = response.headers.first(name: "Replay-Nonce") { nonces.append(next) }
            return Response(status: Int(response.status.code), headers: response.headers, body: Data(bytes.readableBytesView))
        } catch {
            throw ACMEError(.transport, "\(method) \(url): \(error)")
        }
    }

    // MARK: Helpers

    /// Retry-After as seconds (the form ACME CAs use) or an HTTP date.
    static func retryAfter(_ headers: HTTPHeaders) -> Duration? {
        guard let value = headers.first(name: "Retry-After")?.trimmingCharacters(in: .whitespaces) else { return nil }
        if let seconds = Int(value), seconds >= 0 { return .seconds(seconds) }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: value) else { return nil }
        return .seconds(max(0, Int(date.timeIntervalSinceNow.rounded(.up))))
    }

    /// Tokens are base64url (§8.3); anything else must not reach a URL path or a file.
    static func isToken(_ token: String) -> Bool {
        !token.isEmpty && token.utf8.count <= 256 && token.utf8.allSatisfy { byte in
            (UInt8(ascii: "A") ... UInt8(ascii: "Z")).contains(byte) || (UInt8(ascii: "a") ... UInt8(ascii: "z")).contains(byte)
                || (UInt8(ascii: "0") ... UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
        }
    }

    /// A lower-case A-label DNS name (letters, digits, hyphens, dots; no empty label).
    static func isDNSName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 253 && name.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            !label.isEmpty && label.utf8.count <= 63 && label.utf8.allSatisfy { byte in
                (UInt8(ascii: "a") ... UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0") ... UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "-")
            }
        }
    }

    /// A PKCS #10 request for `names` (all in subjectAltName; the first also as CN, which
    /// some CAs still like), signed by the certificate's new key.
    static func csr(names: [String], key: P256.Signing.PrivateKey) throws(ACMEError) -> [UInt8] {
        do {
            guard let first = names.first else { throw ACMEError(.internal, "no names to order") }
            let extensions = try Certificate.Extensions {
                SubjectAlternativeNames(names.map { GeneralName.dnsName($0) })
            }
            let attributes = CertificateSigningRequest.Attributes([try CertificateSigningRequest.Attribute(ExtensionRequest(extensions: extensions))])
            let request = try CertificateSigningRequest(
                version: .v1, subject: try DistinguishedName { CommonName(first) },
                privateKey: Certificate.PrivateKey(key), attributes: attributes, signatureAlgorithm: .ecdsaWithSHA256)
            return try request.serializeAsPEM().derBytes
        } catch let error as ACMEError {
            throw error
        } catch {
            throw ACMEError(.internal, "cannot make a CSR: \(error)")
        }
    }

    static func json(_ value: some Encodable) throws(ACMEError) -> Data {
        do {
            return try JSONEncoder().encode(value)
        } catch {
            throw ACMEError(.internal, "cannot encode a request: \(error)")
        }
    }

    static func decode<T: Decodable>(_ data: Data) throws(ACMEError) -> T {
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch {
            throw ACMEError(.protocolViolation, "unexpected answer (\(T.self)): \(error)")
        }
    }
}
