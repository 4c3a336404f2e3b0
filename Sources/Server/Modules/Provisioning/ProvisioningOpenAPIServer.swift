import Foundation
import HTTPTypes
import Hummingbird
import OpenAPIHummingbird
import OpenAPIRuntime
import ProvisioningOpenAPI
import Storage

/// The provisioning API's operations as the server generated from
/// docs/provisioning-api.yaml declares them (`APIProtocol`, Sources/ProvisioningOpenAPI):
/// swift-openapi-hummingbird registers one route per documented operation on the HTTPS
/// listener's router, decodes parameters and bodies, and encodes the answers. What every
/// operation shares (token, limits, audit, metrics, errors as JSON) is `ProvisioningGate`,
/// the one middleware, so an operation only does its work and throws a `Failure` to refuse.
extension ProvisioningAPI: APIProtocol {
    /// Registers the documented operations under ``prefix``.
    func install(on router: Hummingbird.Router<BasicRequestContext>) throws {
        guard let prefix = URL(string: Self.prefix) else { return }
        try registerHandlers(on: router, serverURL: prefix,
                             // Compact, sorted keys; no escaped slashes (`<` is escaped anyway).
                             configuration: Configuration(jsonEncodingOptions: [.sortedKeys, .withoutEscapingSlashes]),
                             middlewares: [ProvisioningGate(api: self)])
    }

    func listDomains(_ input: Operations.ListDomains.Input) async throws -> Operations.ListDomains.Output {
        let (_, value) = try await listDomains(try Self.caller())
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func readDomain(_ input: Operations.ReadDomain.Input) async throws -> Operations.ReadDomain.Output {
        let (_, value) = try await readDomain(try Self.caller(), input.path.domain)
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func addDomain(_ input: Operations.AddDomain.Input) async throws -> Operations.AddDomain.Output {
        let (status, value) = try await addDomain(try Self.caller(), input.path.domain)
        return status == .created ? .created(.init(body: .json(try Self.typed(value)))) : .ok(.init(body: .json(try Self.typed(value))))
    }

    func removeDomain(_ input: Operations.RemoveDomain.Input) async throws -> Operations.RemoveDomain.Output {
        _ = try await removeDomain(try Self.caller(), input.path.domain)
        return .noContent(.init())
    }

    func listAccounts(_ input: Operations.ListAccounts.Input) async throws -> Operations.ListAccounts.Output {
        let (_, value) = try await listAccounts(try Self.caller(), input.path.domain)
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func createAccount(_ input: Operations.CreateAccount.Input) async throws -> Operations.CreateAccount.Output {
        guard case .json(let body) = input.body else { throw Self.badBody }
        let (_, value) = try await createAccount(try Self.caller(), input.path.domain, username: body.username, password: body.password)
        return .created(.init(body: .json(try Self.typed(value))))
    }

    func removeAccount(_ input: Operations.RemoveAccount.Input) async throws -> Operations.RemoveAccount.Output {
        _ = try await removeAccount(try Self.caller(), input.path.domain, input.path.user)
        return .noContent(.init())
    }

    func setPassword(_ input: Operations.SetPassword.Input) async throws -> Operations.SetPassword.Output {
        guard case .json(let body) = input.body else { throw Self.badBody }
        _ = try await setPassword(try Self.caller(), input.path.domain, input.path.user, password: body.password)
        return .noContent(.init())
    }

    func readDomainSettings(_ input: Operations.ReadDomainSettings.Input) async throws -> Operations.ReadDomainSettings.Output {
        let (_, value) = try await readDomainSettings(try Self.caller(), input.path.domain)
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func updateDomainSettings(_ input: Operations.UpdateDomainSettings.Input) async throws -> Operations.UpdateDomainSettings.Output {
        guard case .json(let body) = input.body else { throw Self.badBody }
        let settings = DomainSettings(services: body.services?.additionalProperties ?? [:], acme: body.acme)
        let (_, value) = try await updateDomainSettings(try Self.caller(), input.path.domain, to: settings)
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func checkDomain(_ input: Operations.CheckDomain.Input) async throws -> Operations.CheckDomain.Output {
        let checked = try await checkDomain(try Self.caller(), input.path.domain)
        // `Age`: how old a cached result is (RFC 9111 §5.1), for the dashboard to say so.
        return .ok(.init(headers: .init(age: checked.age), body: .json(try Self.typed(.raw(checked.report.json())))))
    }

    func readStatus(_ input: Operations.ReadStatus.Input) async throws -> Operations.ReadStatus.Output {
        let (_, value) = try await status(try Self.caller())
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func listLinks(_ input: Operations.ListLinks.Input) async throws -> Operations.ListLinks.Output {
        let (_, value) = try await listLinks(try Self.caller())
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    func readAudit(_ input: Operations.ReadAudit.Input) async throws -> Operations.ReadAudit.Output {
        let (_, value) = try await readAudit(try Self.caller(), limit: input.query.limit ?? 100)
        return .ok(.init(body: .json(try Self.typed(value))))
    }

    private static var badBody: Failure {
        Failure(status: .badRequest, code: "bad-request", message: "the body is not the JSON expected")
    }
}

/// The middleware in front of every generated operation: names the operation for the audit
/// log and the metrics, and runs it inside ``ProvisioningAPI/handle``.
struct ProvisioningGate: ServerMiddleware {
    let api: ProvisioningAPI

    /// The audit log's action for each operation id, and whether a successful call is audited
    /// (changes are; reads are audited only when refused as forbidden).
    static let actions: [String: (action: String, audited: Bool)] = [
        "listDomains": ("domain.list", false),
        "readDomain": ("domain.read", false),
        "addDomain": ("domain.add", true),
        "removeDomain": ("domain.remove", true),
        "listAccounts": ("account.list", false),
        "createAccount": ("account.create", true),
        "setPassword": ("account.password", true),
        "removeAccount": ("account.remove", true),
        "readDomainSettings": ("domain.settings.read", false),
        "updateDomainSettings": ("domain.settings", true),
        "checkDomain": ("domain.check", false),
        "readStatus": ("status.read", false),
        "listLinks": ("link.list", false),
        "readAudit": ("audit.read", false),
    ]

    func intercept(_ request: HTTPRequest, body: HTTPBody?, metadata: ServerRequestMetadata, operationID: String,
                   next: @Sendable (HTTPRequest, HTTPBody?, ServerRequestMetadata) async throws -> (HTTPResponse, HTTPBody?))
        async throws -> (HTTPResponse, HTTPBody?) {
        // An operation missing from the table is still authenticated, and audited as a change.
        let (action, audited) = Self.actions[operationID] ?? (operationID, true)
        return await api.handle(request, body: body, action: action, target: Self.target(request, metadata), audited: audited) { body in
            try await next(request, body, metadata)
        }
    }

    /// What the audit entry is about: `user@domain` for an account, the domain (as given) for
    /// a domain, else the path without its query.
    static func target(_ request: HTTPRequest, _ metadata: ServerRequestMetadata) -> String {
        let domain = metadata.pathParameters["domain"].map(String.init)
        if let user = metadata.pathParameters["user"] { return "\(user)@\(domain ?? "")" }
        if let domain { return domain }
        let path = request.path ?? ""
        return String(path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
    }
}
