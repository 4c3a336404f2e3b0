import Foundation
import HTTPTypes
import Admin
import Hummingbird
import Logging
import NIOCore
import OpenAPIRuntime
import Storage
import Synchronization
import XMPPCore

/// The provisioning API on the HTTPS listener (`/api/v1/…`, described in
/// docs/provisioning-api.yaml): what a hosting provider's control panel calls to add
/// customers' domains and accounts.
///
/// Every request carries `Authorization: Bearer braid_…`. A provider-wide token may do
/// everything; a token scoped to domains may manage only those domains' accounts, and sees
/// nothing else: another domain answers 404 exactly as a domain not hosted at all, so a
/// customer cannot learn who else is hosted. Every change, and every refused attempt, is
/// written to the audit log with the token's id.
struct ProvisioningAPI: Sendable {
    static let prefix = "/api/v1"

    let server: ServerContext
    let settings: BraidConfiguration.ProvisioningSettings
    /// `braid check` results for `GET /domains/{domain}/check`.
    let checks: DomainCheckCache
    /// Failed authentications per client address, on the server's monotonic clock.
    let failures: AuthFailureLimiter

    init(server: ServerContext, settings: BraidConfiguration.ProvisioningSettings, checks: DomainCheckCache = DomainCheckCache()) {
        self.server = server
        self.settings = settings
        self.checks = checks
        let clock = server.sessionClock
        failures = AuthFailureLimiter(perMinute: settings.authFailuresPerMinute, now: { clock.now() })
    }

    var storage: any Storage { server.storage }
    var logger: Logger { server.logger }

    /// Who is calling.
    struct Caller: Sendable {
        let tokenID: String
        /// Nil: provider-wide.
        let domains: Set<String>?

        var isProvider: Bool { domains == nil }

        func mayManage(_ domain: String) -> Bool {
            domains?.contains(domain) ?? true
        }
    }

    /// A known token past its `expires_at`.
    struct ExpiredToken: Error {
        let id: String
    }

    /// A refusal or failure, as the JSON body and status it gets.
    struct Failure: Error {
        let status: HTTPResponse.Status
        let code: String
        let message: String
    }

    // MARK: Request handling

    /// What every operation goes through, around the generated server's decoding and the
    /// operation itself (`next`): the failed-authentication limit, the bearer token, the body
    /// limit, then the audit entry, the metric and the JSON answer. The caller is handed to
    /// the operation in ``current``.
    func handle(_ request: HTTPRequest, body: HTTPBody?, action: String, target: String, audited: Bool,
                next: @Sendable (HTTPBody?) async throws -> (HTTPResponse, HTTPBody?)) async -> (HTTPResponse, HTTPBody?) {
        let address = AuthFailureLimiter.key(WebRequest.remoteAddress)
        if let seconds = failures.retryAfter(address) {
            // Checked before the token: see AuthFailureLimiter.
            let failure = Failure(status: .tooManyRequests, code: "rate_limited",
                                  message: "too many failed authentications from this address; retry in \(seconds) s")
            server.metrics.provisioning(action: action, outcome: "rate_limited")
            logger.notice("provisioning API: rate limited", metadata: ["action": "\(action)", "target": "\(target)", "address": "\(address)", "retry_after": "\(seconds)"])
            await audit(AuditEntry(at: Self.now(), tokenID: nil, action: action, target: target, outcome: "rate_limited", detail: "from \(address)"))
            var response = Self.response(failure)
            response.0.headerFields[.retryAfter] = String(seconds)
            return response
        }
        let caller: Caller
        do {
            caller = try await authenticate(request)
        } catch let expired as ExpiredToken {
            failures.recordFailure(address)
            // The token is known, so the entry names it: the owner of a control panel learns
            // that its token ran out.
            let failure = Failure(status: .unauthorized, code: "unauthenticated", message: "the token expired")
            server.metrics.provisioning(action: action, outcome: "expired")
            logger.notice("provisioning API: refused an expired token", metadata: ["action": "\(action)", "target": "\(target)", "token": "\(expired.id)"])
            await audit(AuditEntry(at: Self.now(), tokenID: expired.id, action: action, target: target, outcome: "expired", detail: failure.message))
            return Self.response(failure)
        } catch let failure as Failure {
            failures.recordFailure(address)
            server.metrics.provisioning(action: action, outcome: "unauthenticated")
            logger.notice("provisioning API: refused", metadata: ["action": "\(action)", "target": "\(target)", "address": "\(address)", "reason": "\(failure.message)"])
            await audit(AuditEntry(at: Self.now(), tokenID: nil, action: action, target: target, outcome: "unauthenticated", detail: failure.message))
            return Self.response(failure)
        } catch {
            return Self.response(Failure(status: .serviceUnavailable, code: "unavailable", message: "storage unavailable"))
        }
        do {
            let limited = try await limitedBody(request, body)
            let note = AuditNote()
            let (response, responseBody) = try await Self.$current.withValue(caller) {
                try await Self.$note.withValue(note) { try await next(limited) }
            }
            server.metrics.provisioning(action: action, outcome: "ok")
            if audited {
                let (detail, unchanged) = note.read()
                await audit(AuditEntry(at: Self.now(), tokenID: caller.tokenID, action: action, target: target,
                                       outcome: unchanged ?? (response.status == .ok) ? "unchanged" : "ok", detail: detail))
            }
            return try await Self.finish(response, responseBody)
        } catch {
            let failure: Failure
            switch Self.classify(error, hadBody: body != nil) {
            case .refused(let refusal):
                failure = refusal
            case .failed(let underlying):
                server.metrics.provisioning(action: action, outcome: "failed")
                logger.error("provisioning API: \(action) failed", metadata: ["token": "\(caller.tokenID)", "target": "\(target)", "error": "\(underlying)"])
                if audited {
                    await audit(AuditEntry(at: Self.now(), tokenID: caller.tokenID, action: action, target: target, outcome: "failed", detail: "\(underlying)"))
                }
                return Self.response(Failure(status: .internalServerError, code: "failed", message: "the operation failed; see the server's log"))
            }
            server.metrics.provisioning(action: action, outcome: failure.code)
            logger.info("provisioning API: \(action) refused", metadata: ["token": "\(caller.tokenID)", "target": "\(target)", "reason": "\(failure.message)"])
            // Refusals of changes, and reads out of scope, are audited.
            if audited || failure.status == .forbidden {
                await audit(AuditEntry(at: Self.now(), tokenID: caller.tokenID, action: action, target: target, outcome: failure.code, detail: failure.message))
            }
            return Self.response(failure)
        }
    }

    /// The caller of the operation running in this task, set by ``handle``.
    @TaskLocal static var current: Caller?
    /// What the operation running in this task adds to its audit entry.
    @TaskLocal static var note: AuditNote?

    /// An operation's word for its audit entry: a detail, and whether it changed anything
    /// where the status cannot tell (else 200 means unchanged, 201 and 204 changed).
    final class AuditNote: Sendable {
        private let state = Mutex<(detail: String, unchanged: Bool?)>(("", nil))

        func record(detail: String, unchanged: Bool) {
            state.withLock { $0 = (detail, unchanged) }
        }

        func read() -> (detail: String, unchanged: Bool?) {
            state.withLock { $0 }
        }
    }

    /// The authenticated caller, inside an operation.
    static func caller() throws -> Caller {
        // Only reachable through `handle`, which sets it; a route registered without it
        // must fail closed.
        guard let current else { throw Failure(status: .unauthorized, code: "unauthenticated", message: "an Authorization: Bearer token is required") }
        return current
    }

    private enum Outcome {
        case refused(Failure)
        case failed(any Error)
    }

    /// A refusal (ours, or a request the generated server could not decode) or a failure.
    private static func classify(_ error: any Error, hadBody: Bool) -> Outcome {
        if let failure = error as? Failure { return .refused(failure) }
        guard let serverError = error as? ServerError else { return .failed(error) }
        if let failure = serverError.underlyingError as? Failure { return .refused(failure) }
        // No input: the request did not match the document (a body that is not the JSON
        // expected, a query parameter that is not a number). With input, the operation threw.
        guard serverError.operationInput == nil else { return .failed(serverError.underlyingError) }
        return .refused(Failure(status: .badRequest, code: "bad-request",
                                message: hadBody ? "the body is not the JSON expected" : "a parameter is not what the API expects"))
    }

    private func authenticate(_ request: HTTPRequest) async throws -> Caller {
        guard let header = request.headerFields[.authorization], header.lowercased().hasPrefix("bearer ") else {
            throw Failure(status: .unauthorized, code: "unauthenticated", message: "an Authorization: Bearer token is required")
        }
        let presented = String(header.dropFirst(7)).trimmingCharacters(in: .whitespaces)
        guard let token = ProvisioningTokens.match(presented, in: try await storage.apiTokens()) else {
            throw Failure(status: .unauthorized, code: "unauthenticated", message: "unknown or revoked token")
        }
        guard !token.isExpired(at: Date()) else {
            throw ExpiredToken(id: token.id)
        }
        return Caller(tokenID: token.id, domains: token.domains.map(Set.init))
    }

    private func audit(_ entry: AuditEntry) async {
        do {
            try await storage.appendAuditEntry(entry)
        } catch {
            logger.error("provisioning API: the audit entry could not be written", metadata: ["action": "\(entry.action)", "target": "\(entry.target)", "error": "\(error)"])
        }
    }

    /// The request body read whole, at most `max_body_bytes` (413 beyond, before more is
    /// read), so the generated decoder never sees more.
    private func limitedBody(_ request: HTTPRequest, _ body: HTTPBody?) async throws -> HTTPBody? {
        guard let body else { return nil }
        let limit = max(1, settings.maxBodyBytes)
        let tooLarge = Failure(status: .contentTooLarge, code: "too-large", message: "the body is larger than \(limit) bytes")
        if let length = request.headerFields[.contentLength].flatMap({ Int($0) }), length > limit {
            throw tooLarge
        }
        let bytes: [UInt8]
        do {
            bytes = try await [UInt8](collecting: body, upTo: limit)
        } catch {
            throw tooLarge
        }
        return HTTPBody(bytes)
    }

    // MARK: Domains

    /// A canonical domain the caller may see; out of scope reads as not found.
    func visibleDomain(_ caller: Caller, _ raw: String?, mustBeHosted: Bool = true) throws -> String {
        guard let raw, let domain = try? JID(domain: raw).domainpart else {
            throw Failure(status: .badRequest, code: "bad-request", message: "not a domain name")
        }
        guard caller.mayManage(domain), !mustBeHosted || server.domains.isHosted(domain) else {
            throw Failure(status: .notFound, code: "not-found", message: "no such domain")
        }
        return domain
    }

    private func describe(_ domain: String) -> JSONValue {
        .object([
            "name": .string(domain),
            "services": .array(offeredLabels(domain).map { .string("\($0).\(domain)") }),
        ])
    }

    /// The service labels `domain` offers: every service the server has, but those its own
    /// settings turned off.
    func offeredLabels(_ domain: String) -> [String] {
        let own = server.domains.settings(of: domain).services
        return server.domains.serviceLabels.sorted().filter { own[server.domains.serviceModules[$0] ?? $0] != false }
    }

    // MARK: Domain settings

    /// The services the server offers, by module name (`services.NAME`).
    private var serviceNames: Set<String> {
        Set(server.domains.serviceLabels.map { server.domains.serviceModules[$0] ?? $0 })
    }

    private func describeSettings(_ domain: String) -> JSONValue {
        let own = server.domains.settings(of: domain)
        let acme = server.configuration.acme
        let excluded = acme.excludeDomains.contains { ((try? JID(domain: $0).domainpart) ?? $0.lowercased()) == domain }
        var overrides: [String: JSONValue] = ["services": .object(own.services.mapValues(JSONValue.bool))]
        if let managed = own.acme { overrides["acme"] = .bool(managed) }
        return .object([
            "domain": .string(domain),
            "services": .object(Dictionary(uniqueKeysWithValues: serviceNames.map { ($0, .bool(own.services[$0] != false)) })),
            "acme": .bool(acme.enabled && !excluded && own.acme != false),
            "overrides": .object(overrides),
        ])
    }

    func readDomainSettings(_ caller: Caller, _ raw: String?) async throws -> (HTTPResponse.Status, JSONValue?) {
        (.ok, describeSettings(try visibleDomain(caller, raw)))
    }

    func updateDomainSettings(_ caller: Caller, _ raw: String?, to settings: DomainSettings) async throws -> (HTTPResponse.Status, JSONValue?) {
        let domain = try visibleDomain(caller, raw)
        let offered = serviceNames
        if let unknown = settings.services.keys.sorted().first(where: { !offered.contains($0) }) {
            throw Failure(status: .badRequest, code: "bad-request", message: "this server offers no service '\(unknown)' (offered: \(offered.sorted().joined(separator: ", ")))")
        }
        let before = server.domains.settings(of: domain)
        do {
            try await storage.setDomainSettings(settings, for: domain)
        } catch StorageError.unknownDomain {
            throw Failure(status: .notFound, code: "not-found", message: "no such domain")
        }
        // In effect before the answer leaves; the other servers follow with the generation.
        server.domains.apply(settings, for: domain)
        let detail = (settings.services.sorted { $0.key < $1.key }.map { "services.\($0.key)=\($0.value ? "on" : "off")" }
            + (settings.acme.map { ["acme=\($0 ? "on" : "off")"] } ?? [])).joined(separator: " ")
        Self.note?.record(detail: detail.isEmpty ? "defaults" : detail, unchanged: before == settings)
        logger.notice("provisioning API: domain settings changed", metadata: ["domain": "\(domain)", "token": "\(caller.tokenID)", "settings": "\(detail)"])
        return (.ok, describeSettings(domain))
    }

    func listDomains(_ caller: Caller) async throws -> (HTTPResponse.Status, JSONValue?) {
        let hosted = try await storage.domains().map(\.name).filter(caller.mayManage)
        return (.ok, .object(["domains": .array(hosted.map(describe))]))
    }

    func readDomain(_ caller: Caller, _ raw: String?) async throws -> (HTTPResponse.Status, JSONValue?) {
        let domain = try visibleDomain(caller, raw)
        guard case .object(var fields) = describe(domain) else { return (.ok, describe(domain)) }
        fields["accounts"] = .number(Double(try await storage.users(in: domain).count))
        return (.ok, .object(fields))
    }

    func addDomain(_ caller: Caller, _ raw: String?) async throws -> (HTTPResponse.Status, JSONValue?) {
        guard caller.isProvider else {
            throw Failure(status: .forbidden, code: "forbidden", message: "only a provider-wide token adds domains")
        }
        let domain = try visibleDomain(caller, raw, mustBeHosted: false)
        guard server.domains.served(domain).map({ if case .service = $0 { return false } else { return true } }) ?? true else {
            throw Failure(status: .conflict, code: "conflict", message: "\(domain) is a service domain of a hosted domain")
        }
        let added = try await storage.addDomain(domain)
        logger.notice("provisioning API: domain added", metadata: ["domain": "\(domain)", "token": "\(caller.tokenID)", "new": "\(added)"])
        // Served within a second (the domain poller, or LISTEN/NOTIFY on PostgreSQL).
        return (added ? .created : .ok, describe(domain))
    }

    func removeDomain(_ caller: Caller, _ raw: String?) async throws -> (HTTPResponse.Status, JSONValue?) {
        guard caller.isProvider else {
            throw Failure(status: .forbidden, code: "forbidden", message: "only a provider-wide token removes domains")
        }
        let domain = try visibleDomain(caller, raw, mustBeHosted: false)
        guard try await storage.removeDomain(domain) else {
            throw Failure(status: .notFound, code: "not-found", message: "no such domain")
        }
        logger.notice("provisioning API: domain removed", metadata: ["domain": "\(domain)", "token": "\(caller.tokenID)"])
        return (.noContent, nil)
    }

    // MARK: Accounts

    private func accountJID(_ domain: String, _ user: String?) throws -> JID {
        guard let user, let jid = try? JID(localpart: user, domainpart: domain, resourcepart: Optional<String>.none) else {
            throw Failure(status: .badRequest, code: "bad-request", message: "not a valid user name")
        }
        return jid
    }

    private func credentials(_ password: String) throws -> StoredCredentials {
        guard password.count >= settings.minimumPasswordLength else {
            throw Failure(status: .badRequest, code: "bad-request", message: "the password needs at least \(settings.minimumPasswordLength) characters")
        }
        do {
            return try PasswordChangeModule.credentials(password: password, iterations: server.configuration.auth.scramIterations)
        } catch {
            throw Failure(status: .badRequest, code: "bad-request", message: "the password cannot be used (\(error))")
        }
    }

    func listAccounts(_ caller: Caller, _ raw: String?) async throws -> (HTTPResponse.Status, JSONValue?) {
        let domain = try visibleDomain(caller, raw)
        let users = try await storage.users(in: domain).map(\.description).sorted()
        return (.ok, .object(["accounts": .array(users.map(JSONValue.string))]))
    }

    func createAccount(_ caller: Caller, _ raw: String?, username: String, password: String) async throws -> (HTTPResponse.Status, JSONValue?) {
        let domain = try visibleDomain(caller, raw)
        let jid = try accountJID(domain, username)
        do {
            try await storage.createUser(jid, credentials: try credentials(password))
        } catch StorageError.userExists {
            throw Failure(status: .conflict, code: "conflict", message: "\(jid) exists")
        } catch StorageError.unknownDomain {
            throw Failure(status: .notFound, code: "not-found", message: "no such domain")
        }
        logger.notice("provisioning API: account created", metadata: ["account": "\(jid)", "token": "\(caller.tokenID)"])
        return (.created, .object(["jid": .string(jid.description)]))
    }

    func setPassword(_ caller: Caller, _ raw: String?, _ user: String?, password: String) async throws -> (HTTPResponse.Status, JSONValue?) {
        let domain = try visibleDomain(caller, raw)
        let jid = try accountJID(domain, user)
        do {
            try await storage.setCredentials(jid, credentials: try credentials(password))
        } catch StorageError.userNotFound {
            throw Failure(status: .notFound, code: "not-found", message: "no such account")
        }
        return (.noContent, nil)
    }

    func removeAccount(_ caller: Caller, _ raw: String?, _ user: String?) async throws -> (HTTPResponse.Status, JSONValue?) {
        let domain = try visibleDomain(caller, raw)
        let jid = try accountJID(domain, user)
        guard try await storage.removeUser(jid) else {
            throw Failure(status: .notFound, code: "not-found", message: "no such account")
        }
        logger.notice("provisioning API: account removed", metadata: ["account": "\(jid)", "token": "\(caller.tokenID)"])
        return (.noContent, nil)
    }

    // MARK: Links and audit

    func listLinks(_ caller: Caller) async throws -> (HTTPResponse.Status, JSONValue?) {
        guard caller.isProvider else {
            throw Failure(status: .forbidden, code: "forbidden", message: "only a provider-wide token reads the federation links")
        }
        let links = await server.federationLinks()
        return (.ok, .object(["links": .array(links.filter { !$0.closed }.map { link in
            .object([
                "id": .string(link.id), "origin": .string(link.origin.rawValue), "peer_address": .string(link.peerAddress),
                "bidirectional": .bool(link.bidirectional), "stanzas_sent": .number(Double(link.stanzasSent)),
                "stanzas_received": .number(Double(link.stanzasReceived)),
                "pairs": .array(link.pairs.map { pair in
                    .object(["local": .string(pair.pair.local), "remote": .string(pair.pair.remote),
                             "direction": .string(pair.direction.rawValue), "method": .string(pair.method.rawValue)])
                }),
            ])
        })]))
    }

    func readAudit(_ caller: Caller, limit: Int) async throws -> (HTTPResponse.Status, JSONValue?) {
        let bounded = max(1, min(limit, 1000))
        var entries: [AuditEntry]
        if let domains = caller.domains {
            entries = []
            for domain in domains.sorted() { entries += try await storage.auditEntries(limit: bounded, domain: domain) }
            entries = Array(entries.sorted { $0.at > $1.at }.prefix(bounded))
        } else {
            entries = try await storage.auditEntries(limit: bounded, domain: nil)
        }
        return (.ok, .object(["entries": .array(entries.map(Self.describe))]))
    }

    // MARK: Responses

    static func now() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

    /// The headers every answer carries; JSON ones also say what they are.
    private static func apiHeaders(json length: Int?) -> HTTPFields {
        guard let length else { return headers([("Content-Length", "0"), ("Cache-Control", "no-store")]) }
        return headers([("Content-Type", "application/json"), ("Content-Length", "\(length)"), ("Cache-Control", "no-store"),
                        ("X-Content-Type-Options", "nosniff")])
    }

    static func response(_ status: HTTPResponse.Status, _ value: JSONValue?) -> (HTTPResponse, HTTPBody?) {
        guard let value else { return (HTTPResponse(status: status, headerFields: apiHeaders(json: nil)), nil) }
        let bytes = Array(value.serialized.utf8)
        return (HTTPResponse(status: status, headerFields: apiHeaders(json: bytes.count)), HTTPBody(bytes))
    }

    static func response(_ failure: Failure) -> (HTTPResponse, HTTPBody?) {
        var response = response(failure.status, .object(["error": .string(failure.code), "message": .string(failure.message)]))
        if failure.status == .unauthorized {
            response.0.headerFields[.wwwAuthenticate] = "Bearer realm=\"braid\""
        }
        return response
    }

    /// The generated server's answer with the headers every answer of the API carries, and
    /// `<`, `>` and `&` escaped in its JSON as in ``JSONValue`` (the dashboard's safety
    /// net: no answer holds markup even when read as HTML).
    static func finish(_ response: HTTPResponse, _ body: HTTPBody?) async throws -> (HTTPResponse, HTTPBody?) {
        var response = response
        let extra = response.headerFields.filter { ![.contentType, .contentLength].contains($0.name) }
        guard let body else {
            response.headerFields = apiHeaders(json: nil) + extra
            return (response, nil)
        }
        // Our own answers: a few kilobytes, at most the audit log's 1000 entries.
        let json = try await String(collecting: body, upTo: 16 * 1024 * 1024)
        let bytes = Array(JSONValue.raw(json).serialized.utf8)
        response.headerFields = apiHeaders(json: bytes.count) + extra
        return (response, HTTPBody(bytes))
    }

    /// A value built as JSON, as the generated type the document gives for it: the document
    /// and the answer cannot drift apart, as a mismatch fails here (500, logged) and in the tests.
    static func typed<T: Decodable>(_ value: JSONValue?) throws -> T {
        try JSONDecoder().decode(T.self, from: Data((value ?? .null).serialized.utf8))
    }

    static func headers(_ pairs: [(String, String)]) -> HTTPFields {
        var fields = HTTPFields()
        for (name, value) in pairs {
            if let name = HTTPField.Name(name) { fields.append(HTTPField(name: name, value: value)) }
        }
        return fields
    }
}

/// Enough JSON to answer with, written in a stable key order.
enum JSONValue: Sendable, Equatable {
    case string(String), number(Double), bool(Bool), null
    case array([JSONValue])
    case object([String: JSONValue])
    /// JSON serialised elsewhere (a `braid check` report by its own encoder), written as
    /// is apart from `<`, `>` and `&`, escaped as everywhere else.
    case raw(String)

    var serialized: String {
        switch self {
        case .string(let text): return Self.quote(text)
        case .number(let number): return number == number.rounded() && abs(number) < 1e15 ? String(Int64(number)) : String(number)
        case .bool(let value): return value ? "true" : "false"
        case .null: return "null"
        case .array(let items): return "[" + items.map(\.serialized).joined(separator: ",") + "]"
        case .object(let fields): return "{" + fields.sorted { $0.key < $1.key }.map { Self.quote($0.key) + ":" + $0.value.serialized }.joined(separator: ",") + "}"
        case .raw(let json):
            // Outside strings JSON has none of these characters, so escaping them everywhere
            // only changes how strings are written, not what they say.
            return json.replacingOccurrences(of: "<", with: "\\u003c").replacingOccurrences(of: ">", with: "\\u003e")
                .replacingOccurrences(of: "&", with: "\\u0026")
        }
    }

    private static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "<": out += "\\u003c"  // safe to embed in HTML
            case ">": out += "\\u003e"
            case "&": out += "\\u0026"
            default:
                if scalar.value < 0x20 { out += String(format: "\\u%04x", scalar.value) } else { out.unicodeScalars.append(scalar) }
            }
        }
        return out + "\""
    }
}
