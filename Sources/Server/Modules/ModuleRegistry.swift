import XMPPCore

/// How an IQ request was answered.
public enum IQResponse: Sendable {
    /// A `result`, with an optional payload.
    case result(XMLElement?)
    /// An `error`.
    case error(StanzaError)
    /// The module answered by itself, or the request needs no answer.
    case handled
}

/// One IQ request, with who is asking and on whose behalf the server answers.
public struct IQRequest: Sendable {
    public let iq: IQ
    public let payload: XMLElement
    /// The domain (server IQs) or the bare account JID (account IQs) addressed.
    public let target: JID
    /// The sender's full JID, as authenticated.
    public let requester: JID
    /// The requester's own session, when the request came from the account's own client.
    public let session: ClientSession?
    let router: Router
}

/// A feature module: it answers IQs in its namespaces and names its disco features. Modules
/// are registered once at start-up; the router dispatches to them by payload namespace, the
/// way Prosody fires `iq/host/<xmlns>` and `iq/bare/<xmlns>` events.
public protocol IQModule: Sendable {
    /// Features advertised in the server's disco#info (XEP-0030).
    var features: [String] { get }
    /// Namespaces of IQs to the server's domain this module answers.
    var serverNamespaces: [String] { get }
    /// Namespaces of IQs to an account (the bare JID) this module answers for it.
    var accountNamespaces: [String] { get }

    func handleServerIQ(_ request: IQRequest) async -> IQResponse
    func handleAccountIQ(_ request: IQRequest) async -> IQResponse
}

extension IQModule {
    public var serverNamespaces: [String] { [] }
    public var accountNamespaces: [String] { [] }
    public func handleServerIQ(_ request: IQRequest) async -> IQResponse { .error(StanzaError(.serviceUnavailable)) }
    public func handleAccountIQ(_ request: IQRequest) async -> IQResponse { .error(StanzaError(.serviceUnavailable)) }
}

/// The installed modules, by namespace.
final class ModuleRegistry: Sendable {
    private let serverHandlers: [String: any IQModule]
    private let accountHandlers: [String: any IQModule]
    let features: [String]

    init(modules: [any IQModule] = ModuleRegistry.standard) {
        var server: [String: any IQModule] = [:]
        var account: [String: any IQModule] = [:]
        var features: Set<String> = []
        for module in modules {
            for namespace in module.serverNamespaces { server[namespace] = module }
            for namespace in module.accountNamespaces { account[namespace] = module }
            features.formUnion(module.features)
        }
        serverHandlers = server
        accountHandlers = account
        self.features = features.sorted()
    }

    static let standard: [any IQModule] = [
        DiscoModule(), PingModule(), VersionModule(), RosterModule(), CarbonsModule(), LegacySessionModule(),
    ]

    func handleServerIQ(_ iq: IQ, domain: JID, requester: JID, router: Router) async -> IQResponse {
        // RFC 6120 §8.2.3: a get or set carries exactly one payload element.
        guard let payload = iq.payload else { return .error(StanzaError(.badRequest)) }
        guard let module = serverHandlers[payload.namespace] else { return .error(StanzaError(.serviceUnavailable)) }
        return await module.handleServerIQ(IQRequest(iq: iq, payload: payload, target: domain, requester: requester, session: nil, router: router))
    }

    func handleAccountIQ(_ iq: IQ, account: JID, requester: JID, session: ClientSession?, router: Router) async -> IQResponse {
        guard let payload = iq.payload else { return .error(StanzaError(.badRequest)) }
        // RFC 6121 §8.5.2.1.3: an unknown namespace gets service-unavailable, whether or not
        // the account exists.
        guard let module = accountHandlers[payload.namespace] else { return .error(StanzaError(.serviceUnavailable)) }
        return await module.handleAccountIQ(IQRequest(iq: iq, payload: payload, target: account, requester: requester, session: session, router: router))
    }
}

// MARK: - Standard modules

/// XEP-0030 service discovery.
struct DiscoModule: IQModule {
    static let info = "http://jabber.org/protocol/disco#info"
    static let items = "http://jabber.org/protocol/disco#items"

    var features: [String] { [Self.info, Self.items] }
    var serverNamespaces: [String] { [Self.info, Self.items] }
    var accountNamespaces: [String] { [Self.info, Self.items] }

    func handleServerIQ(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        if request.payload.namespace == Self.items {
            return .result(XMLElement(name: "query", namespace: Self.items))
        }
        // Node queries are not supported; answering an empty identity list would lie.
        if request.payload.attribute("node") != nil { return .error(StanzaError(.itemNotFound)) }
        var children: [XMLNode] = [.element(XMLElement(name: "identity", namespace: Self.info, attributes: [
            XMLAttribute("category", "server"), XMLAttribute("type", "im"), XMLAttribute("name", "Braid"),
        ]))]
        children += request.router.modules.features.map {
            .element(XMLElement(name: "feature", namespace: Self.info, attributes: [XMLAttribute("var", $0)]))
        }
        return .result(XMLElement(name: "query", namespace: Self.info, children: children))
    }

    func handleAccountIQ(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        // Only the account and its subscribers learn that it exists; everyone else gets the
        // answer a missing account gets (RFC 6120 §13, directory harvesting).
        guard await request.router.mayLearnAbout(account: request.target, requester: request.requester) else {
            return .error(StanzaError(.serviceUnavailable))
        }
        if request.payload.namespace == Self.items {
            return .result(XMLElement(name: "query", namespace: Self.items))
        }
        return .result(XMLElement(name: "query", namespace: Self.info, children: [
            .element(XMLElement(name: "identity", namespace: Self.info, attributes: [XMLAttribute("category", "account"), XMLAttribute("type", "registered")])),
            .element(XMLElement(name: "feature", namespace: Self.info, attributes: [XMLAttribute("var", Self.info)])),
        ]))
    }
}

/// XEP-0199 ping.
struct PingModule: IQModule {
    static let namespace = "urn:xmpp:ping"

    var features: [String] { [Self.namespace] }
    var serverNamespaces: [String] { [Self.namespace] }
    var accountNamespaces: [String] { [Self.namespace] }

    func handleServerIQ(_ request: IQRequest) async -> IQResponse {
        request.iq.type == .get ? .result(nil) : .error(StanzaError(.badRequest))
    }

    func handleAccountIQ(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        guard await request.router.mayLearnAbout(account: request.target, requester: request.requester) else {
            return .error(StanzaError(.serviceUnavailable))
        }
        return .result(nil)
    }
}

/// XEP-0092 software version. The operating system is not disclosed.
struct VersionModule: IQModule {
    static let namespace = "jabber:iq:version"

    var features: [String] { [Self.namespace] }
    var serverNamespaces: [String] { [Self.namespace] }

    func handleServerIQ(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        return .result(XMLElement(name: "query", namespace: Self.namespace, children: [
            .element(XMLElement(name: "name", namespace: Self.namespace, text: "Braid")),
            .element(XMLElement(name: "version", namespace: Self.namespace, text: BraidInfo.version)),
        ]))
    }
}

/// RFC 6121 §2 rosters.
struct RosterModule: IQModule {
    var features: [String] { [] }
    var accountNamespaces: [String] { [RosterNamespace.roster] }

    func handleAccountIQ(_ request: IQRequest) async -> IQResponse {
        await request.router.roster.handleIQ(request.iq, account: request.target, requester: request.requester, session: request.session)
    }
}

/// XEP-0280 message carbons: enabled and disabled per session.
struct CarbonsModule: IQModule {
    var features: [String] { [MessageService.carbons] }
    var accountNamespaces: [String] { [MessageService.carbons] }

    func handleAccountIQ(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .set, let session = request.session, request.requester == session.jid else {
            return .error(StanzaError(.badRequest))
        }
        switch request.payload.name {
        case "enable":
            request.router.server.sessions.update(session) { $0.carbons = true }
        case "disable":
            request.router.server.sessions.update(session) { $0.carbons = false }
        default:
            return .error(StanzaError(.badRequest))
        }
        return .result(nil)
    }
}

/// RFC 3921 §3 session establishment, a no-op since RFC 6121 that old clients still send.
struct LegacySessionModule: IQModule {
    var features: [String] { [] }
    var accountNamespaces: [String] { [XMLNamespace.session] }

    func handleAccountIQ(_ request: IQRequest) async -> IQResponse {
        request.iq.type == .set && request.session != nil ? .result(nil) : .error(StanzaError(.serviceUnavailable))
    }
}

/// Build-time facts.
public enum BraidInfo {
    public static let version = "0.1.0-dev"
}

extension Router {
    /// Whether `requester` may learn that `account` exists: the account itself, or a contact
    /// the account shares its presence with. Everyone else gets the same answer whether the
    /// account exists or not.
    func mayLearnAbout(account: JID, requester: JID) async -> Bool {
        if requester.bare == account { return true }
        guard let item = await roster.item(of: account, contact: requester.bare) else { return false }
        return item.subscription == .from || item.subscription == .both
    }
}
