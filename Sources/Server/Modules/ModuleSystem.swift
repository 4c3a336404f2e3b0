import Storage
import XMPPCore

/// A feature of the server, in Prosody's manner: one type that registers its handlers on a
/// ``ModuleBuilder`` once at start-up and owns whatever state and store it needs. The core
/// (router, sessions, presence and message delivery) knows no feature by name; see
/// docs/architecture.md, "Adding a feature".
public protocol BraidModule: Sendable {
    /// For logs and errors (a namespace registered twice names both modules).
    var name: String { get }
    func register(in builder: inout ModuleBuilder)
}

/// How an IQ request was answered.
public enum IQResponse: Sendable {
    /// A `result`, with an optional payload.
    case result(XMLElement?)
    /// An `error`.
    case error(StanzaError)
    /// An `error` with an application-specific condition (RFC 6120 §8.3.3.2), such as
    /// XEP-0060's `<precondition-not-met/>`.
    case errorWithCondition(StanzaError, XMLElement)
    /// The module answered by itself, or the request needs no answer.
    case handled
}

/// One IQ request, with who is asking and on whose behalf the server answers.
public struct IQRequest: Sendable {
    public let iq: IQ
    public let payload: XMLElement
    /// The domain (server IQs), the bare account JID (account IQs), or the service address
    /// (service IQs) addressed.
    public let target: JID
    /// The sender's full JID, as authenticated.
    public let requester: JID
    /// The requester's own session, when the request came from the account's own client.
    public let session: ClientSession?
    let router: Router
}

public typealias IQHandler = @Sendable (IQRequest) async -> IQResponse

/// An identity an account shows in `disco#info` (XEP-0030).
public struct AccountIdentity: Sendable, Hashable {
    public var category: String
    public var type: String
}

/// Items of an account's `disco#items`: (account, requester, router) → `<item/>` elements.
public typealias AccountItemsProvider = @Sendable (JID, JID, Router) async -> [XMLElement]

/// What a stanza handler did with a stanza it was offered.
public enum StanzaDisposition: Sendable, Equatable {
    /// Taken care of: nobody else sees it, and the built-in delivery does not run.
    case handled
    /// Not this handler's: the next one (by priority), then the built-in delivery, gets it.
    case pass
    /// Changed: the next handlers and the built-in delivery get this stanza instead (the
    /// archive stamps its `stanza-id` on a message it keeps).
    case replace(Stanza)
}

/// A stanza for a local account (bare or full JID), offered to modules before the built-in
/// delivery (RFC 6121 §8.5).
public struct LocalStanza: Sendable {
    public let stanza: Stanza
    public let to: JID
    let router: Router
}

public typealias StanzaHandler = @Sendable (LocalStanza) async -> StanzaDisposition

/// Any stanza one of the account's clients sent, stamped with its full JID, before the
/// server acts on it (`to` nil: for the server on the account's behalf, or undirected
/// presence).
public struct ClientStanza: Sendable {
    public let stanza: Stanza
    public let to: JID?
    public let session: ClientSession
    let router: Router

    /// Answers the client with an error (RFC 6120 §8.3).
    public func bounce(with error: StanzaError, extra: XMLElement? = nil) async {
        await router.bounce(stanza, with: error, extra: extra)
    }
}

public typealias ClientStanzaHandler = @Sendable (ClientStanza) async -> StanzaDisposition

/// A stanza on its way through the router, with its authenticated `from`: from a local
/// client, from a module or service, or from a peer server. Filters see it before it goes to
/// a local account, a service or another server.
public struct RoutedStanza: Sendable {
    public let stanza: Stanza
    public let from: JID?
    public let to: JID
    let router: Router

    /// Answers the sender with an error (RFC 6120 §8.3), with an application-specific
    /// condition element when given.
    public func bounce(with error: StanzaError, extra: XMLElement? = nil) async {
        await router.bounce(stanza, with: error, extra: extra)
    }
}

public typealias RouteFilter = @Sendable (RoutedStanza) async -> StanzaDisposition

/// A message for an account that no device has now: stored offline, or handed to sessions
/// that all wait for resumption (XEP-0198). Push (XEP-0357) wakes the devices.
public struct WaitingMessage: Sendable {
    public enum Where: Sendable { case offline, awaitingResumption }
    public let message: Message
    public let account: JID
    public let waiting: Where
    let router: Router
}

/// A roster item that changed (RFC 6121 §3: a subscription granted or cancelled, an item
/// added or removed), after it was stored and pushed.
public struct RosterChange: Sendable {
    public let account: JID
    public let contact: JID
    public let before: RosterItem?
    public let after: RosterItem?
    let router: Router
}

/// A message one of the account's clients sent, stamped, before it is routed.
public struct SentMessage: Sendable {
    public let message: Message
    public let session: ClientSession
    let router: Router
}

/// A message delivered to some of an account's resources (RFC 6121 §8.5.2 and §8.5.3).
public struct DeliveredMessage: Sendable {
    public let message: Message
    public let account: JID
    /// The resources that got it.
    public let resources: Set<JID>
    let router: Router
}

/// A service on a subdomain of every hosted domain (`conference.customer.example`): no row
/// per service domain, no object per domain until the service has something to keep.
public struct ServiceRegistration: Sendable {
    /// The subdomain label (`conference`).
    public var label: String
    /// Its XEP-0030 identity.
    public var category: String
    public var type: String
    public var displayName: String
    /// Features listed in the service's own `disco#info`.
    public var features: [String]
    /// Extended information (XEP-0128 forms) in its `disco#info`, such as file upload's
    /// `max-file-size` (XEP-0363 §3).
    public var extendedInfo: [XMLElement]
    /// Every stanza addressed to the service domain or to an entity on it
    /// (`room@conference.customer.example/nick`).
    public var handle: @Sendable (ServiceStanza) async -> Void

    public init(label: String, category: String, type: String, displayName: String, features: [String],
                extendedInfo: [XMLElement] = [], handle: @escaping @Sendable (ServiceStanza) async -> Void) {
        self.label = label
        self.category = category
        self.type = type
        self.displayName = displayName
        self.features = features
        self.extendedInfo = extendedInfo
        self.handle = handle
    }
}

/// A stanza for a service domain, with the hosted domain it belongs to.
public struct ServiceStanza: Sendable {
    public let stanza: Stanza
    public let to: JID
    /// The hosted domain whose service this is (`customer.example`).
    public let parent: String
    let router: Router

    /// Routes a stanza the service sends (its `from` is the service or one of its entities).
    public func send(_ stanza: Stanza) async {
        await router.route(stanza)
    }

    /// Answers with an error (RFC 6120 §8.3).
    public func bounce(with error: StanzaError) async {
        await router.bounce(stanza, with: error)
    }
}

/// Where modules register, once, before the server starts (in the manner of Hummingbird's
/// router builder): mutable while modules add to it, then frozen into a ``ModuleDispatcher``
/// that the router reads without locks.
public struct ModuleBuilder {
    struct Registered<Handler> {
        var module: String
        var handler: Handler
    }

    struct Prioritized<Handler> {
        var module: String
        var namespace: String?
        var priority: Int
        var handler: Handler
    }

    private(set) var serverIQ: [String: Registered<IQHandler>] = [:]
    private(set) var accountIQ: [String: Registered<IQHandler>] = [:]
    private(set) var serverFeatures: [String] = []
    private(set) var accountFeatures: [String] = []
    private(set) var accountIdentities: [AccountIdentity] = []
    private(set) var accountItemProviders: [Registered<AccountItemsProvider>] = []
    private(set) var stanzaHandlers: [StanzaKind: [Prioritized<StanzaHandler>]] = [:]
    private(set) var sentObservers: [Registered<@Sendable (SentMessage) async -> Void>] = []
    private(set) var deliveredObservers: [Registered<@Sendable (DeliveredMessage) -> Void>] = []
    private(set) var services: [String: Registered<ServiceRegistration>] = [:]
    private(set) var shutdownHandlers: [Registered<@Sendable (Router) async -> Void>] = []
    private(set) var clientStanzaHandlers: [Prioritized<ClientStanzaHandler>] = []
    private(set) var rosterObservers: [Registered<@Sendable (RosterChange) async -> Void>] = []
    private(set) var waitingObservers: [Registered<@Sendable (WaitingMessage) async -> Void>] = []
    private(set) var routeFilters: [Prioritized<RouteFilter>] = []
    private(set) var httpRoutes: [Registered<HTTPRouteInstaller>] = []
    /// The operator's settings for services, by module name (`services.NAME`).
    private let serviceSettings: [String: BraidConfiguration.ServiceSettings]
    /// Settings naming a service nobody registered, or a label that is not one DNS label.
    private(set) var configurationProblems: [String] = []
    /// The module registering now, for the tables and for the trap on a duplicate.
    private var current = "core"

    public init(serviceSettings: [String: BraidConfiguration.ServiceSettings] = [:]) {
        self.serviceSettings = serviceSettings
    }

    /// Lets `module` register.
    public mutating func add(_ module: some BraidModule) {
        let previous = current
        current = module.name
        module.register(in: &self)
        current = previous
    }

    /// Answers IQs in `namespace` addressed to a hosted domain. A namespace has one handler:
    /// a second registration is a programming error and traps.
    public mutating func onServerIQ(_ namespace: String, _ handler: @escaping IQHandler) {
        if let existing = serverIQ[namespace] {
            preconditionFailure("server IQ namespace \(namespace) registered by \(existing.module) and \(current)")
        }
        serverIQ[namespace] = Registered(module: current, handler: handler)
    }

    /// Answers IQs in `namespace` addressed to an account's bare JID (on its behalf, RFC 6121
    /// §8.5.1). One handler per namespace, as for server IQs.
    public mutating func onAccountIQ(_ namespace: String, _ handler: @escaping IQHandler) {
        if let existing = accountIQ[namespace] {
            preconditionFailure("account IQ namespace \(namespace) registered by \(existing.module) and \(current)")
        }
        accountIQ[namespace] = Registered(module: current, handler: handler)
    }

    /// A feature in the hosted domains' `disco#info` (XEP-0030).
    public mutating func serverFeature(_ feature: String) {
        if !serverFeatures.contains(feature) { serverFeatures.append(feature) }
    }

    /// A feature in the accounts' `disco#info`.
    public mutating func accountFeature(_ feature: String) {
        if !accountFeatures.contains(feature) { accountFeatures.append(feature) }
    }

    /// An identity in the accounts' `disco#info` besides `account/registered` (PEP's
    /// `pubsub/pep`, XEP-0163 §6.1).
    public mutating func accountIdentity(category: String, type: String) {
        let identity = AccountIdentity(category: category, type: type)
        if !accountIdentities.contains(identity) { accountIdentities.append(identity) }
    }

    /// Items in an account's `disco#items` (without a node): the provider answers what the
    /// requester may see (PEP lists the nodes it may read).
    public mutating func onAccountItems(_ provider: @escaping AccountItemsProvider) {
        accountItemProviders.append(Registered(module: current, handler: provider))
    }

    /// Offers message or presence stanzas for local accounts to `handler` before the built-in
    /// delivery: those with a child element in `namespace` (nil: every one), highest priority
    /// first. The first that answers ``StanzaDisposition/handled`` wins; one that answers
    /// `.replace` hands the next ones its version. One handler per (kind, namespace) that
    /// claims a namespace; those for every stanza (nil) are observers or stampers and may be
    /// several (the archive, PEP's presence watch). IQs go to ``onAccountIQ(_:_:)`` instead.
    public mutating func onStanza(_ kind: StanzaKind, namespace: String?, priority: Int = 0, _ handler: @escaping StanzaHandler) {
        precondition(kind != .iq, "IQs are dispatched by namespace: use onAccountIQ or onServerIQ (\(current))")
        if namespace != nil, let existing = stanzaHandlers[kind]?.first(where: { $0.namespace == namespace }) {
            preconditionFailure("\(kind.rawValue) handler for \(namespace ?? "every stanza") registered by \(existing.module) and \(current)")
        }
        stanzaHandlers[kind, default: []].append(Prioritized(module: current, namespace: namespace, priority: priority, handler: handler))
    }

    /// Called for every message a local client sends, before it is routed.
    public mutating func onMessageSent(_ observer: @escaping @Sendable (SentMessage) async -> Void) {
        sentObservers.append(Registered(module: current, handler: observer))
    }

    /// Called when a message was delivered to some of an account's resources, on the path
    /// that delivered it (under the account's serializer when it went to the bare JID).
    public mutating func onMessageDelivered(_ observer: @escaping @Sendable (DeliveredMessage) -> Void) {
        deliveredObservers.append(Registered(module: current, handler: observer))
    }

    /// Offers every stanza a local client sends (stamped, before the server acts on it) to
    /// `handler`, highest priority first; `.handled` stops it there. For what a client says
    /// about itself (entity capabilities in its presence) and what it may not send at all
    /// (to a JID it blocked).
    public mutating func onClientStanza(priority: Int = 0, _ handler: @escaping ClientStanzaHandler) {
        clientStanzaHandlers.append(Prioritized(module: current, namespace: nil, priority: priority, handler: handler))
    }

    /// Offers every stanza the router is about to deliver or forward (whoever sent it) to
    /// `filter`, highest priority first; `.handled` stops it there (the filter dropped it or
    /// answered it). For rules between two parties wherever they are (blocking, XEP-0191).
    /// Filters run on every routed stanza: they must answer fast for the common case.
    public mutating func onRoute(priority: Int = 0, _ filter: @escaping RouteFilter) {
        routeFilters.append(Prioritized(module: current, namespace: nil, priority: priority, handler: filter))
    }

    /// Called when a message reached no device of its account (stored offline, or waiting
    /// with sessions that wait for resumption).
    public mutating func onMessageWaiting(_ observer: @escaping @Sendable (WaitingMessage) async -> Void) {
        waitingObservers.append(Registered(module: current, handler: observer))
    }

    /// Called after a roster item changed by the subscription logic (PEP sends a new
    /// subscriber the last items, XEP-0163 §4.3.4).
    public mutating func onRosterChange(_ observer: @escaping @Sendable (RosterChange) async -> Void) {
        rosterObservers.append(Registered(module: current, handler: observer))
    }

    /// Routes the module serves on the HTTPS listener (file upload, host-meta), added to the
    /// listener's router when it starts. Paths are the module's own: two modules must not
    /// claim one.
    public mutating func onHTTP(_ install: @escaping HTTPRouteInstaller) {
        httpRoutes.append(Registered(module: current, handler: install))
    }

    /// Called once when the server shuts down gracefully, after the listeners close and
    /// before the streams do: what a module still has to tell its users (a room's occupants
    /// learn of the shutdown) is routed while they are connected.
    public mutating func onShutdown(_ handler: @escaping @Sendable (Router) async -> Void) {
        shutdownHandlers.append(Registered(module: current, handler: handler))
    }

    /// A service on `registration.label` under every hosted domain, unless the operator
    /// moved it (`services.NAME.subdomain`) or turned it off (`services.NAME.enabled`). One
    /// module per label.
    public mutating func service(_ registration: ServiceRegistration) {
        let settings = serviceSettings[current]
        if settings?.enabled == false { return }
        let label = (settings?.subdomain ?? registration.label).lowercased()
        guard Self.isLabel(label) else {
            precondition(settings?.subdomain != nil, "a service label is one DNS label, not \(registration.label) (\(current))")
            configurationProblems.append("services.\(current).subdomain: '\(label)' is not a single DNS label")
            return
        }
        if let existing = services[label] {
            precondition(settings?.subdomain != nil, "service label \(label) registered by \(existing.module) and \(current)")
            configurationProblems.append("services.\(current).subdomain: '\(label)' is also the label of \(existing.module)")
            return
        }
        var normalized = registration
        normalized.label = label
        services[label] = Registered(module: current, handler: normalized)
    }

    /// One DNS label: letters, digits and hyphens, not at either end (RFC 1035 §2.3.1).
    static func isLabel(_ label: String) -> Bool {
        guard !label.isEmpty, label.count <= 63, label.first != "-", label.last != "-" else { return false }
        return label.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
    }

    /// The immutable dispatcher the router uses. Throws when the operator's service settings
    /// name no registered service or give an unusable label.
    public func freeze() throws(ConfigurationError) -> ModuleDispatcher {
        let registered = Set(services.values.map(\.module))
        var problems = configurationProblems
        for (name, settings) in serviceSettings.sorted(by: { $0.key < $1.key })
        where !registered.contains(name) && settings.enabled != false && !configurationProblems.contains(where: { $0.hasPrefix("services.\(name).") }) {
            problems.append("services.\(name): no such service")
        }
        guard problems.isEmpty else { throw ConfigurationError(problems.joined(separator: "; ")) }
        return ModuleDispatcher(self)
    }
}

/// The frozen module tables: read by every stanza, never changed, so no lock.
public final class ModuleDispatcher: Sendable {
    private let serverIQ: [String: IQHandler]
    private let accountIQ: [String: IQHandler]
    let serverFeatures: [String]
    let accountFeatures: [String]
    let accountIdentities: [AccountIdentity]
    private let accountItemProviders: [AccountItemsProvider]
    private let stanzaHandlers: [StanzaKind: [(namespace: String?, handler: StanzaHandler)]]
    private let sentObservers: [@Sendable (SentMessage) async -> Void]
    private let deliveredObservers: [@Sendable (DeliveredMessage) -> Void]
    /// Services by label.
    let services: [String: ServiceRegistration]
    /// The module (`services.NAME`) serving each label, for per-domain service settings.
    let serviceModules: [String: String]
    private let shutdownHandlers: [@Sendable (Router) async -> Void]
    private let clientStanzaHandlers: [ClientStanzaHandler]
    private let rosterObservers: [@Sendable (RosterChange) async -> Void]
    private let waitingObservers: [@Sendable (WaitingMessage) async -> Void]
    private let routeFilters: [RouteFilter]
    /// What the modules serve over HTTPS, in registration order.
    let httpRoutes: [HTTPRouteInstaller]

    init(_ builder: ModuleBuilder) {
        serverIQ = builder.serverIQ.mapValues(\.handler)
        accountIQ = builder.accountIQ.mapValues(\.handler)
        serverFeatures = builder.serverFeatures.sorted()
        accountFeatures = builder.accountFeatures.sorted()
        accountIdentities = builder.accountIdentities
        accountItemProviders = builder.accountItemProviders.map(\.handler)
        // Highest priority first; among equals, in registration order.
        stanzaHandlers = builder.stanzaHandlers.mapValues { entries in
            entries.enumerated().sorted { ($0.element.priority, -$0.offset) > ($1.element.priority, -$1.offset) }
                .map { (namespace: $0.element.namespace, handler: $0.element.handler) }
        }
        sentObservers = builder.sentObservers.map(\.handler)
        deliveredObservers = builder.deliveredObservers.map(\.handler)
        services = builder.services.mapValues(\.handler)
        serviceModules = builder.services.mapValues(\.module)
        shutdownHandlers = builder.shutdownHandlers.map(\.handler)
        clientStanzaHandlers = Self.byPriority(builder.clientStanzaHandlers)
        rosterObservers = builder.rosterObservers.map(\.handler)
        waitingObservers = builder.waitingObservers.map(\.handler)
        routeFilters = Self.byPriority(builder.routeFilters)
        httpRoutes = builder.httpRoutes.map(\.handler)
    }

    /// Highest priority first; among equals, in registration order.
    private static func byPriority<Handler>(_ entries: [ModuleBuilder.Prioritized<Handler>]) -> [Handler] {
        entries.enumerated().sorted { ($0.element.priority, -$0.offset) > ($1.element.priority, -$1.offset) }.map(\.element.handler)
    }

    /// The `disco#items` of an account, as `requester` may see them.
    func accountItems(of account: JID, requester: JID, router: Router) async -> [XMLElement] {
        var items: [XMLElement] = []
        for provider in accountItemProviders { items += await provider(account, requester, router) }
        return items
    }

    /// A client's stanza, to the modules that asked: nil when one handled it, else the
    /// stanza as they left it.
    func offerClientStanza(_ stanza: Stanza, to target: JID?, session: ClientSession, router: Router) async -> Stanza? {
        var current = stanza
        for handler in clientStanzaHandlers {
            switch await handler(ClientStanza(stanza: current, to: target, session: session, router: router)) {
            case .handled: return nil
            case .pass: continue
            case .replace(let replaced): current = replaced
            }
        }
        return current
    }

    /// A stanza about to be delivered or forwarded, to the filters: nil when one handled it,
    /// else the stanza as they left it.
    func filterRouted(_ stanza: Stanza, to target: JID, router: Router) async -> Stanza? {
        var current = stanza
        for filter in routeFilters {
            switch await filter(RoutedStanza(stanza: current, from: try? current.from(), to: target, router: router)) {
            case .handled: return nil
            case .pass: continue
            case .replace(let replaced): current = replaced
            }
        }
        return current
    }

    func messageWaiting(_ message: Message, account: JID, waiting: WaitingMessage.Where, router: Router) async {
        guard !waitingObservers.isEmpty else { return }
        let event = WaitingMessage(message: message, account: account, waiting: waiting, router: router)
        for observer in waitingObservers { await observer(event) }
    }

    func rosterChanged(account: JID, contact: JID, before: RosterItem?, after: RosterItem?, router: Router) async {
        guard !rosterObservers.isEmpty else { return }
        let change = RosterChange(account: account, contact: contact, before: before, after: after, router: router)
        for observer in rosterObservers { await observer(change) }
    }

    /// The modules' last words (`onShutdown`), in registration order.
    func shutdown(router: Router) async {
        for handler in shutdownHandlers { await handler(router) }
    }

    /// The service labels, for the domain registry.
    public var serviceLabels: Set<String> { Set(services.keys) }

    func handleServerIQ(_ iq: IQ, domain: JID, requester: JID, router: Router) async -> IQResponse {
        // RFC 6120 §8.2.3: a get or set carries exactly one payload element.
        guard let payload = iq.payload else { return .error(StanzaError(.badRequest)) }
        guard let handler = serverIQ[payload.namespace] else { return .error(StanzaError(.serviceUnavailable)) }
        return await handler(IQRequest(iq: iq, payload: payload, target: domain, requester: requester, session: nil, router: router))
    }

    func handleAccountIQ(_ iq: IQ, account: JID, requester: JID, session: ClientSession?, router: Router) async -> IQResponse {
        guard let payload = iq.payload else { return .error(StanzaError(.badRequest)) }
        // RFC 6121 §8.5.2.1.3: an unknown namespace gets service-unavailable, whether or not
        // the account exists.
        guard let handler = accountIQ[payload.namespace] else { return .error(StanzaError(.serviceUnavailable)) }
        return await handler(IQRequest(iq: iq, payload: payload, target: account, requester: requester, session: session, router: router))
    }

    /// Offers a message or presence for a local account to the modules: nil when one
    /// handled it, else the stanza as they left it, for the built-in delivery.
    func offer(_ stanza: Stanza, to target: JID, router: Router) async -> Stanza? {
        guard let handlers = stanzaHandlers[stanza.kind], !handlers.isEmpty else { return stanza }
        var current = stanza
        for entry in handlers {
            if let namespace = entry.namespace, current.element.firstChild(namespace: namespace) == nil { continue }
            switch await entry.handler(LocalStanza(stanza: current, to: target, router: router)) {
            case .handled: return nil
            case .pass: continue
            case .replace(let replaced): current = replaced
            }
        }
        return current
    }

    func messageSent(_ message: Message, session: ClientSession, router: Router) async {
        for observer in sentObservers {
            await observer(SentMessage(message: message, session: session, router: router))
        }
    }

    func messageDelivered(_ message: Message, account: JID, resources: Set<JID>, router: Router) {
        guard !deliveredObservers.isEmpty else { return }
        let delivered = DeliveredMessage(message: message, account: account, resources: resources, router: router)
        for observer in deliveredObservers { observer(delivered) }
    }
}
