import Foundation
import Synchronization
import Testing
import TestSupport
import XMPPCore
@testable import Admin
@testable import Federation
@testable import Server

/// A service for tests: `echo.DOMAIN` for every hosted domain answers each message with its
/// body, from the address the message was sent to.
struct EchoService: BraidModule {
    static let feature = "urn:braid:test:echo"

    var name: String { "echo" }

    func register(in builder: inout ModuleBuilder) {
        builder.service(ServiceRegistration(label: "echo", category: "component", type: "generic", displayName: "Echo",
                                            features: [Self.feature]) { service in
            guard service.stanza.kind == .message, let from = try? service.stanza.from(), let body = Message(service.stanza)?.body else {
                if service.stanza.kind == .iq { await service.bounce(with: StanzaError(.featureNotImplemented)) }
                return
            }
            var attributes = [XMLAttribute("from", service.to.description), XMLAttribute("to", from.description), XMLAttribute("type", "chat")]
            if let id = service.stanza.id { attributes.append(XMLAttribute("id", id)) }
            let reply = XMLElement(name: "message", namespace: XMLNamespace.client, attributes: attributes, children: [
                .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "echo \(body) for \(service.parent)")),
            ])
            if let stanza = Stanza(reply) { await service.send(stanza) }
        })
    }
}

/// What a module's handlers saw.
final class Seen: Sendable {
    private let entries = Mutex<[String]>([])

    func append(_ entry: String) { entries.withLock { $0.append(entry) } }
    var all: [String] { entries.withLock { $0 } }
}

/// Records which of its message handlers saw what, for the dispatch-order tests.
struct RecordingModule: BraidModule {
    static let claimed = "urn:braid:test:claimed"
    let seen: Seen

    var name: String { "recording" }

    func register(in builder: inout ModuleBuilder) {
        let seen = self.seen
        // The catch-all runs after the namespace handler (lower priority) and lets it pass.
        builder.onStanza(.message, namespace: nil, priority: 0) { local in
            seen.append("any:\(local.stanza.id ?? "")")
            return .pass
        }
        builder.onStanza(.message, namespace: Self.claimed, priority: 10) { local in
            seen.append("claimed:\(local.stanza.id ?? "")")
            return .handled
        }
    }
}

@Suite("The module system: dispatch, service domains, carbons as a module (issue 11)")
struct ModuleSystemTests {
    @Test("A namespace registered twice is a programming error: the builder traps")
    func duplicateNamespaceTraps() async {
        await #expect(processExitsWith: .failure) {
            var builder = ModuleBuilder()
            builder.onServerIQ("urn:braid:test:twice") { _ in .handled }
            builder.onServerIQ("urn:braid:test:twice") { _ in .handled }
        }
        await #expect(processExitsWith: .failure) {
            var builder = ModuleBuilder()
            builder.add(EchoService())
            builder.add(EchoService())
        }
    }

    @Test("Service domains are recognised for hosted parents only, and a hosted domain named like one stays hosted")
    func servedDomains() async throws {
        try await withServer(domains: ["a.example", "echo.b.example"], users: ["alice@a.example"], modules: [EchoService()]) { server in
            let domains = server.context.domains
            #expect(domains.served("a.example") == .hosted)
            #expect(domains.served("echo.a.example") == .service(label: "echo", parent: "a.example"))
            #expect(domains.isServed("echo.a.example"))
            #expect(!domains.isHosted("echo.a.example"))
            // Not a service label, or the parent is not hosted.
            #expect(domains.served("other.a.example") == nil)
            #expect(domains.served("echo.c.example") == nil)
            #expect(domains.served("echo.echo.a.example") == nil)
            // Hosted explicitly: a domain of its own, not b.example's service.
            #expect(domains.served("echo.b.example") == .hosted)
        }
    }

    @Test("Message handlers run by priority; the first that handles wins; the built-in delivery gets what they pass")
    func stanzaHandlerOrder() async throws {
        let seen = Seen()
        try await withServer(modules: [RecordingModule(seen: seen)]) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", "bob@b.example"), XMLAttribute("type", "chat"), XMLAttribute("id", "one"),
            ], children: [
                .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "taken")),
                .element(XMLElement(name: "x", namespace: RecordingModule.claimed)),
            ]))
            try await alice.sendMessage(to: "bob@b.example", body: "passed", id: "two")
            let delivered = try await bob.waitFor { $0.name == "message" && $0.body != nil }
            #expect(delivered.attribute("id") == "two")
            #expect(seen.all == ["claimed:one", "any:two"])
            await alice.close()
            await bob.close()
        }
    }

    /// A route filter that keeps alice's stanzas from bob (answering messages with an
    /// application condition) and a client-stanza handler that answers pings to nobody.
    struct FilteringModule: BraidModule {
        static let condition = "urn:braid:test:filtered"
        let seen: Seen
        var name: String { "filtering" }

        func register(in builder: inout ModuleBuilder) {
            let seen = self.seen
            builder.onRoute { routed in
                guard routed.from?.bare.description == "alice@a.example", routed.to.bare.description == "bob@b.example" else { return .pass }
                seen.append("filtered:\(routed.stanza.kind.rawValue):\(routed.stanza.id ?? "")")
                if routed.stanza.kind == .message { await routed.bounce(with: StanzaError(.notAcceptable), extra: XMLElement(name: "filtered", namespace: Self.condition)) }
                return .handled
            }
            builder.onClientStanza { client in
                guard client.stanza.kind == .iq, client.stanza.element.firstChild(name: "ping", namespace: "urn:braid:test:client") != nil else { return .pass }
                seen.append("client:\(client.session.jid.bare)")
                await client.bounce(with: StanzaError(.featureNotImplemented))
                return .handled
            }
        }
    }

    @Test("onRoute filters see every routed stanza with its sender (drop, or answer with an application condition); onClientStanza sees what a client sends before the server acts")
    func routeFiltersAndClientStanzas() async throws {
        let seen = Seen()
        try await withServer(modules: [FilteringModule(seen: seen)]) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            try await bob.sendPresence()
            try await alice.sendMessage(to: "bob@b.example", body: "blocked", id: "m1")
            let refused = try await alice.waitFor { $0.attribute("id") == "m1" }
            #expect(refused.attribute("type") == "error")
            #expect(refused.firstChild(name: "error", namespace: XMLNamespace.client)?.firstChild(name: "filtered", namespace: FilteringModule.condition) != nil)
            try await carol.sendMessage(to: "bob@b.example", body: "through", id: "m2")
            let delivered = try await bob.waitFor { $0.name == "message" && $0.body != nil }
            #expect(delivered.attribute("id") == "m2", "only alice's message is kept from bob")
            let answered = try await carol.iq(.get, to: nil, payload: XMLElement(name: "ping", namespace: "urn:braid:test:client"))
            #expect(answered.attribute("type") == "error")
            #expect(seen.all.contains("filtered:message:m1") && seen.all.contains("client:carol@a.example"))
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    @Test("conference-style services: every hosted domain has one, listed in disco#items, with its own disco#info; stanzas reach the module")
    func serviceDomainsLocally() async throws {
        try await withServer(modules: [EchoService()]) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let items = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: DiscoModule.items))
            let listed = items.firstChild(name: "query", namespace: DiscoModule.items)?.children(name: "item", namespace: DiscoModule.items).compactMap { $0.attribute("jid") }
            #expect(listed == ["conference.a.example", "echo.a.example", "upload.a.example"])
            let info = try await alice.iq(.get, to: "echo.a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let query = try #require(info.firstChild(name: "query", namespace: DiscoModule.info))
            #expect(query.firstChild(name: "identity", namespace: DiscoModule.info)?.attribute("category") == "component")
            #expect(query.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") }.contains(EchoService.feature))
            // Every hosted domain has it, with no step per domain.
            try await alice.sendMessage(to: "room@echo.b.example", body: "hi", id: "e1")
            let echo = try await alice.waitFor { $0.name == "message" && $0.attribute("id") == "e1" }
            #expect(echo.attribute("from") == "room@echo.b.example")
            #expect(echo.body == "echo hi for b.example")
            // Not a service of a hosted domain: not ours (no federation here: an error).
            try await alice.sendMessage(to: "room@echo.c.example", body: "nobody", id: "e2")
            let refused = try await alice.waitFor { $0.attribute("id") == "e2" }
            #expect(refused.attribute("type") == "error")
            await alice.close()
        }
    }

    @Test("A service domain gets a self-signed certificate when allowed, and a POSH document")
    func serviceDomainCertificateAndPOSH() async throws {
        try await withServer(modules: [EchoService()]) { server in
            #expect(await server.context.certificates.prepareCertificate(for: "echo.a.example"))
            #expect(server.context.certificates.covers("echo.a.example"))
            #expect(server.server.admin.poshDocument(forHost: "echo.a.example") != nil)
            #expect(server.server.admin.poshDocument(forHost: "echo.c.example") == nil)
            #expect(await server.context.certificates.prepareCertificate(for: "nope.a.example") == false)
        }
    }

    @Test("Between two providers, a service domain's pairs join the one link, both ways")
    func serviceDomainsOverFederation() async throws {
        try await withFederation(modules: [EchoService()]) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            try await bob.sendPresence()
            // First a pair of plain domains, then services on both sides.
            try await alice.sendMessage(to: "bob@b.example", body: "hello", id: "h")
            _ = try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "h" }
            try await bob.sendMessage(to: "room@echo.a.example", body: "from b", id: "fb")
            let fromA = try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "fb" }
            #expect(fromA.body == "echo from b for a.example")
            try await alice.sendMessage(to: "room@echo.b.example", body: "from a", id: "fa")
            let fromB = try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "fa" }
            #expect(fromB.body == "echo from a for b.example")
            let links = await pair.a.openLinkSnapshots
            #expect(links.count == 1)
            let pairs = Set(links.flatMap(\.pairs).map { "\($0.pair.local)⇄\($0.pair.remote)" })
            #expect(pairs.isSuperset(of: ["echo.a.example⇄b.example", "a.example⇄echo.b.example"]))
            await alice.close()
            await bob.close()
        }
    }

    @Test("services.NAME moves a service to another label or turns it off; a name or label that cannot be used stops the start")
    func serviceSettings() async throws {
        try await withServer(users: ["alice@a.example"], modules: [EchoService()], configure: {
            $0.services["echo"] = .init(subdomain: "talk")
        }) { server in
            #expect(server.context.domains.served("talk.a.example") == .service(label: "talk", parent: "a.example"))
            #expect(!server.context.domains.isServed("echo.a.example"))
        }
        try await withServer(users: ["alice@a.example"], modules: [EchoService()], configure: {
            $0.services["echo"] = .init(enabled: false)
        }) { server in
            #expect(!server.context.domains.isServed("echo.a.example"))
        }
        for (name, settings, problem) in [("nope", BraidConfiguration.ServiceSettings(subdomain: "x"), "services.nope: no such service"),
                                          ("echo", .init(subdomain: "two.labels"), "services.echo.subdomain: 'two.labels' is not a single DNS label"),
                                          ("echo", .init(subdomain: "-"), "services.echo.subdomain: '-' is not a single DNS label")] {
            var configuration = BraidConfiguration()
            configuration.services[name] = settings
            #expect(throws: ConfigurationError.self) {
                _ = try ModuleBuilder.with(StandardModules.all() + [EchoService()], serviceSettings: configuration.services).freeze()
            }
            do {
                _ = try ModuleBuilder.with(StandardModules.all() + [EchoService()], serviceSettings: configuration.services).freeze()
            } catch {
                #expect(error.description == problem)
            }
        }
        let parsed = try BraidConfiguration.parse(yaml: "services:\n  muc:\n    subdomain: chat\n    enabled: true\n")
        #expect(parsed.services == ["muc": .init(subdomain: "chat", enabled: true)])
        #expect(throws: ConfigurationError.self) {
            _ = try BraidConfiguration.parse(yaml: "services:\n  muc:\n    sub_domain: chat\n")
        }
    }

}

@Suite("Contact addresses (XEP-0157)")
struct ContactAddressTests {
    static func fields(_ info: XMLElement) -> [String: [String]] {
        let form = info.firstChild(name: "query", namespace: DiscoModule.info)?.children(name: "x", namespace: "jabber:x:data")
            .first { $0.children(name: "field", namespace: "jabber:x:data").contains { $0.attribute("var") == "FORM_TYPE" && $0.firstChild(name: "value", namespace: "jabber:x:data")?.text == DiscoModule.serverInfo } }
        var fields: [String: [String]] = [:]
        for field in form?.children(name: "field", namespace: "jabber:x:data") ?? [] {
            guard let name = field.attribute("var"), name != "FORM_TYPE" else { continue }
            fields[name] = field.children(name: "value", namespace: "jabber:x:data").map(\.text)
        }
        return fields
    }

    @Test("The provider's addresses on every hosted domain, a domain's own replacing a kind; bad kinds and non-URIs stop the start")
    func perDomain() async throws {
        let yaml = """
            contact_addresses:
              abuse: ["mailto:abuse@provider.example"]
              support: ["https://provider.example/help"]
              domains:
                b.example:
                  support: ["xmpp:help@b.example"]
            """
        let parsed = try BraidConfiguration.parse(yaml: yaml)
        #expect(parsed.contactAddresses.forDomain("b.example")["support"] == ["xmpp:help@b.example"])
        try await withServer(configure: { $0.contactAddresses = parsed.contactAddresses }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let a = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            #expect(Self.fields(a) == ["abuse-addresses": ["mailto:abuse@provider.example"], "support-addresses": ["https://provider.example/help"]])
            let b = try await alice.iq(.get, to: "b.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            #expect(Self.fields(b) == ["abuse-addresses": ["mailto:abuse@provider.example"], "support-addresses": ["xmpp:help@b.example"]])
            await alice.close()
        }
        // None configured: no form.
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(Self.fields(try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))).isEmpty)
            await alice.close()
        }
        for bad in ["contact_addresses:\n  complaints: [\"mailto:x@y\"]\n", "contact_addresses:\n  abuse: [\"abuse at provider\"]\n"] {
            let configuration = try BraidConfiguration.parse(yaml: bad)
            await #expect(throws: ConfigurationError.self) {
                _ = try await TestServer.start { $0.contactAddresses = configuration.contactAddresses }
            }
        }
    }

    @Test("The server's caps (XEP-0115 §6.3) are in the stream features: ver hashes the domain's disco#info, contact form included, and NODE#VER answers it")
    func capsInStreamFeatures() async throws {
        let parsed = try BraidConfiguration.parse(yaml: "contact_addresses:\n  domains:\n    b.example:\n      abuse: [\"mailto:abuse@b.example\"]\n")
        try await withServer(configure: { $0.contactAddresses = parsed.contactAddresses }) { server in
            var vers: [String: String] = [:]
            for (domain, user) in [("a.example", "alice@a.example"), ("b.example", "bob@b.example")] {
                let (client, _) = try await server.loggedIn(user)
                let caps = try #require(client.featuresAfterAuthentication?.firstChild(name: "c", namespace: "http://jabber.org/protocol/caps"))
                #expect(caps.attribute("hash") == "sha-1" && caps.attribute("node") == DiscoModule.capsNode)
                let ver = try #require(caps.attribute("ver"))
                let info = try await client.iq(.get, to: domain, payload: XMLElement(name: "query", namespace: DiscoModule.info))
                let query = try #require(info.firstChild(name: "query", namespace: DiscoModule.info))
                #expect(EntityCaps.verificationString(query).map(EntityCaps.sha1Base64) == ver, "ver is the hash of what disco#info answers")
                let byNode = try await client.iq(.get, to: domain, payload: XMLElement(name: "query", namespace: DiscoModule.info, attributes: [XMLAttribute("node", DiscoModule.capsNode + "#" + ver)]))
                #expect(byNode.attribute("type") == "result")
                #expect(byNode.firstChild(name: "query", namespace: DiscoModule.info)?.attribute("node") == DiscoModule.capsNode + "#" + ver)
                let wrongNode = try await client.iq(.get, to: domain, payload: XMLElement(name: "query", namespace: DiscoModule.info, attributes: [XMLAttribute("node", DiscoModule.capsNode + "#nope")]))
                #expect(wrongNode.attribute("type") == "error")
                vers[domain] = ver
                await client.close()
            }
            // b.example's contact form is part of what it announces.
            #expect(vers["a.example"] != vers["b.example"])
        }
    }
}
