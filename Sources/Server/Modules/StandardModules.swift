import XMPPCore
import XMPPStream

/// The modules every Braid server has.
public enum StandardModules {
    public static func all(_ configuration: BraidConfiguration = BraidConfiguration()) -> [any BraidModule] {
        let pep = PEPModule(settings: configuration.pep)
        return [DiscoModule(contactAddresses: configuration.contactAddresses), PingModule(), VersionModule(), RosterModule(), CarbonsModule(), LegacySessionModule(),
                BlockingModule(maxItems: configuration.blocking.maxItems),
                PrivateStorageModule(bookmarks: pep.service), VCardModule(avatars: pep.service), PasswordChangeModule(),
                MUCModule(settings: configuration.muc),
                MAMModule(settings: configuration.mam), PushModule(settings: configuration.push),
                ExternalServicesModule(settings: configuration.externalServices),
                UploadModule(configuration: configuration),
                ProvisioningModule(settings: configuration.provisioning),
                pep]
    }
}

extension ModuleBuilder {
    /// A builder holding `modules`, with the operator's service settings.
    static func with(_ modules: [any BraidModule], serviceSettings: [String: BraidConfiguration.ServiceSettings] = [:]) -> ModuleBuilder {
        var builder = ModuleBuilder(serviceSettings: serviceSettings)
        for module in modules { builder.add(module) }
        return builder
    }
}

/// XEP-0030 service discovery for hosted domains and accounts. A hosted domain's
/// `disco#items` lists its services (`conference.customer.example`, …).
struct DiscoModule: BraidModule {
    static let info = "http://jabber.org/protocol/disco#info"
    static let items = "http://jabber.org/protocol/disco#items"
    static let serverInfo = "http://jabber.org/network/serverinfo"

    var contactAddresses = BraidConfiguration.ContactAddresses()

    var name: String { "disco" }

    func register(in builder: inout ModuleBuilder) {
        builder.serverFeature(Self.info)
        builder.serverFeature(Self.items)
        builder.onServerIQ(Self.info, serverInfo)
        builder.onServerIQ(Self.items, serverItems)
        builder.onAccountIQ(Self.info, account)
        builder.onAccountIQ(Self.items, account)
    }

    private func serverInfo(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        let info = Self.domainInfo(request.target.domainpart, features: request.router.modules.serverFeatures, contactAddresses: contactAddresses)
        guard let node = request.payload.attribute("node") else { return .result(info) }
        // XEP-0115 §6.2: the node of our caps (NODE#VER) answers as the plain query; other
        // nodes are not supported, and an empty identity list would lie.
        guard node == Self.capsNode + "#" + (Self.capsVer(info) ?? "") else { return .error(StanzaError(.itemNotFound)) }
        return .result(XMLElement(name: info.name, namespace: info.namespace, attributes: [XMLAttribute("node", node)], children: info.children))
    }

    /// A hosted domain's `disco#info`: the server identity, every module's server features,
    /// and the domain's contact addresses (XEP-0157).
    static func domainInfo(_ domain: String, features: [String], contactAddresses: BraidConfiguration.ContactAddresses) -> XMLElement {
        let info = Self.info(identity: ("server", "im", "Braid"), features: features)
        guard let form = Self.contactForm(contactAddresses.forDomain(domain)) else { return info }
        return info.appending(form)
    }

    /// XEP-0115's node for Braid: a URI naming the software. The project has no public
    /// address yet, so it names it under the reserved `.invalid` domain.
    static let capsNode = "https://braid.invalid/caps"

    static func capsVer(_ info: XMLElement) -> String? {
        EntityCaps.verificationString(info).map(EntityCaps.sha1Base64)
    }

    /// The `<c/>` a client finds in the stream features of `domain` (XEP-0115 §6.3).
    static func capabilities(of domain: String, server: ServerContext) -> XMLElement? {
        let info = domainInfo(domain, features: server.router.modules.serverFeatures, contactAddresses: server.configuration.contactAddresses)
        guard let ver = capsVer(info) else { return nil }
        return XMLElement(name: "c", namespace: "http://jabber.org/protocol/caps", attributes: [
            XMLAttribute("hash", "sha-1"), XMLAttribute("node", capsNode), XMLAttribute("ver", ver),
        ])
    }

    /// XEP-0157: the `serverinfo` form (XEP-0128) with the domain's contact addresses; nil
    /// when there are none.
    static func contactForm(_ addresses: [String: [String]]) -> XMLElement? {
        let kinds = BraidConfiguration.ContactAddresses.kinds.filter { !(addresses[$0] ?? []).isEmpty }
        guard !kinds.isEmpty else { return nil }
        let dataForms = "jabber:x:data"
        var fields: [XMLNode] = [.element(XMLElement(name: "field", namespace: dataForms, attributes: [XMLAttribute("var", "FORM_TYPE"), XMLAttribute("type", "hidden")],
                                                     children: [.element(XMLElement(name: "value", namespace: dataForms, text: serverInfo))]))]
        for kind in kinds {
            fields.append(.element(XMLElement(name: "field", namespace: dataForms, attributes: [XMLAttribute("var", "\(kind)-addresses"), XMLAttribute("type", "list-multi")],
                                              children: (addresses[kind] ?? []).map { .element(XMLElement(name: "value", namespace: dataForms, text: $0)) })))
        }
        return XMLElement(name: "x", namespace: dataForms, attributes: [XMLAttribute("type", "result")], children: fields)
    }

    private func serverItems(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        if request.payload.attribute("node") != nil { return .error(StanzaError(.itemNotFound)) }
        let domain = request.target.domainpart
        // Without the services a domain's own settings turn off (DomainRegistry.served).
        let domains = request.router.server.domains
        let items = request.router.modules.services.values.filter { domains.isServed("\($0.label).\(domain)") }.sorted { $0.label < $1.label }.map { service in
            XMLNode.element(XMLElement(name: "item", namespace: Self.items, attributes: [
                XMLAttribute("jid", "\(service.label).\(domain)"), XMLAttribute("name", service.displayName),
            ]))
        }
        return .result(XMLElement(name: "query", namespace: Self.items, children: items))
    }

    private func account(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
        // Only the account and its subscribers learn that it exists; everyone else gets the
        // answer a missing account gets (RFC 6120 §13, directory harvesting).
        guard await request.router.mayLearnAbout(account: request.target, requester: request.requester) else {
            return .error(StanzaError(.serviceUnavailable))
        }
        if request.payload.namespace == Self.items {
            let items = await request.router.modules.accountItems(of: request.target, requester: request.requester, router: request.router)
            return .result(XMLElement(name: "query", namespace: Self.items, children: items.map { .element($0) }))
        }
        var info = Self.info(identity: ("account", "registered", nil), features: [Self.info] + request.router.modules.accountFeatures)
        // Identities go before features; `info` puts its one identity first.
        let extra = request.router.modules.accountIdentities.map { identity in
            XMLNode.element(XMLElement(name: "identity", namespace: Self.info, attributes: [XMLAttribute("category", identity.category), XMLAttribute("type", identity.type)]))
        }
        if !extra.isEmpty {
            info = XMLElement(name: info.name, namespace: info.namespace, attributes: info.attributes,
                              children: Array(info.children.prefix(1)) + extra + info.children.dropFirst())
        }
        return .result(info)
    }

    /// A `disco#info` answer.
    static func info(identity: (category: String, type: String, name: String?), features: [String]) -> XMLElement {
        var attributes = [XMLAttribute("category", identity.category), XMLAttribute("type", identity.type)]
        if let name = identity.name { attributes.append(XMLAttribute("name", name)) }
        var children: [XMLNode] = [.element(XMLElement(name: "identity", namespace: info, attributes: attributes))]
        var seen = Set<String>()
        for feature in features where seen.insert(feature).inserted {
            children.append(.element(XMLElement(name: "feature", namespace: info, attributes: [XMLAttribute("var", feature)])))
        }
        return XMLElement(name: "query", namespace: info, children: children)
    }
}

/// XEP-0199 ping.
struct PingModule: BraidModule {
    static let namespace = "urn:xmpp:ping"

    var name: String { "ping" }

    func register(in builder: inout ModuleBuilder) {
        builder.serverFeature(Self.namespace)
        builder.onServerIQ(Self.namespace) { request in
            request.iq.type == .get ? .result(nil) : .error(StanzaError(.badRequest))
        }
        builder.onAccountIQ(Self.namespace) { request in
            guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
            guard await request.router.mayLearnAbout(account: request.target, requester: request.requester) else {
                return .error(StanzaError(.serviceUnavailable))
            }
            return .result(nil)
        }
    }
}

/// XEP-0092 software version. The operating system is not disclosed.
struct VersionModule: BraidModule {
    static let namespace = "jabber:iq:version"

    var name: String { "version" }

    func register(in builder: inout ModuleBuilder) {
        builder.serverFeature(Self.namespace)
        builder.onServerIQ(Self.namespace) { request in
            guard request.iq.type == .get else { return .error(StanzaError(.badRequest)) }
            return .result(XMLElement(name: "query", namespace: Self.namespace, children: [
                .element(XMLElement(name: "name", namespace: Self.namespace, text: "Braid")),
                .element(XMLElement(name: "version", namespace: Self.namespace, text: BraidInfo.version)),
            ]))
        }
    }
}

/// RFC 6121 §2 rosters (the roster store and presence subscriptions are the core's: presence
/// delivery depends on them).
struct RosterModule: BraidModule {
    var name: String { "roster" }

    func register(in builder: inout ModuleBuilder) {
        builder.onAccountIQ(RosterNamespace.roster) { request in
            await request.router.roster.handleIQ(request.iq, account: request.target, requester: request.requester, session: request.session)
        }
    }
}

/// RFC 3921 §3 session establishment, a no-op since RFC 6121 that old clients still send.
struct LegacySessionModule: BraidModule {
    var name: String { "legacy-session" }

    func register(in builder: inout ModuleBuilder) {
        builder.onAccountIQ(XMLNamespace.session) { request in
            request.iq.type == .set && request.session != nil ? .result(nil) : .error(StanzaError(.serviceUnavailable))
        }
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
