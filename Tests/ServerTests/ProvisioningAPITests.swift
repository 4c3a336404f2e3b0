import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Storage
import Testing
import TestSupport
import XMPPCore
@testable import Server

/// The provisioning API over the real HTTPS listener, with tokens made as `braid api token
/// add` makes them.
@Suite("Provisioning API")
struct ProvisioningAPITests {
    struct Answer {
        var status: HTTPResponseStatus
        var headers: HTTPHeaders
        var json: [String: Any]
        var body: String
    }

    /// One API client against a running server.
    struct API {
        let http: HTTPClient
        let base: String

        func call(_ method: HTTPMethod, _ path: String, token: String?, body: String? = nil, headers: [(String, String)] = []) async throws -> Answer {
            var request = HTTPClientRequest(url: base + path)
            request.method = method
            if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
            for (name, value) in headers { request.headers.add(name: name, value: value) }
            if let body {
                request.headers.add(name: "Content-Type", value: "application/json")
                request.body = .bytes(ByteBuffer(string: body))
            }
            let response = try await http.execute(request, timeout: .seconds(30))
            let bytes = try await response.body.collect(upTo: 1024 * 1024)
            let text = String(buffer: bytes)
            let json = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
            return Answer(status: response.status, headers: response.headers, json: json, body: text)
        }
    }

    func withAPI(sessionClock: SessionClock = .system, configure: (inout BraidConfiguration) -> Void = { _ in },
                 _ body: (TestServer, API) async throws -> Void) async throws {
        try await withServer(domains: ["a.example", "b.example"], users: ["alice@a.example", "bob@b.example"], sessionClock: sessionClock, configure: configure) { server in
            let port = try #require(server.server.adminPorts.posh)
            var tls = TLSConfiguration.makeClientConfiguration()
            // The test server's certificates are self-signed.
            tls.certificateVerification = .none
            let http = HTTPClient(eventLoopGroupProvider: .shared(server.group), configuration: .init(tlsConfiguration: tls))
            do {
                try await body(server, API(http: http, base: "https://127.0.0.1:\(port)/api/v1"))
            } catch {
                try? await http.shutdown()
                throw error
            }
            try await http.shutdown()
        }
    }

    /// A token stored the way the CLI stores it.
    func token(_ server: TestServer, domains: [String]?, label: String = "test") async throws -> (token: String, id: String) {
        let (token, stored) = ProvisioningTokens.mint(domains: domains, label: label)
        try await server.context.storage.addAPIToken(stored)
        return (token, stored.id)
    }

    @Test("Without a valid token every route answers 401 with WWW-Authenticate, and the attempt is audited")
    func unauthenticated() async throws {
        try await withAPI { server, api in
            let (valid, _) = try await token(server, domains: nil)
            // A well-formed token whose secret is wrong, one with an unknown id, garbage, none.
            let wrongSecret = String(valid.dropLast()) + (valid.hasSuffix("A") ? "B" : "A")
            let (unknown, _) = ProvisioningTokens.mint(domains: nil, label: "never stored")
            for presented in [nil, "garbage", unknown, wrongSecret] {
                let answer = try await api.call(.GET, "/domains", token: presented)
                #expect(answer.status == .unauthorized, "\(presented ?? "none")")
                #expect(answer.headers["WWW-Authenticate"].first?.hasPrefix("Bearer") == true)
                #expect(answer.json["error"] as? String == "unauthenticated")
            }
            let put = try await api.call(.PUT, "/domains/evil.example", token: wrongSecret)
            #expect(put.status == .unauthorized)
            #expect(try await server.context.storage.domains().map(\.name) == ["a.example", "b.example"])
            let audit = try await server.context.storage.auditEntries(limit: 10, domain: nil)
            #expect(audit.count == 5)
            #expect(audit.allSatisfy { $0.outcome == "unauthenticated" && $0.tokenID == nil })
            #expect(audit.first?.action == "domain.add" && audit.first?.target == "evil.example")
            #expect(server.metrics.counterValue("braid_provisioning_requests_total", [("action", "domain.list"), ("outcome", "unauthenticated")]) == 4)
        }
    }

    @Test("A provider token adds a domain, which is served within seconds; accounts created, changed and removed through the API log in as the API says")
    func providerLifecycle() async throws {
        try await withAPI { server, api in
            let (provider, providerID) = try await token(server, domains: nil)
            let added = try await api.call(.PUT, "/domains/Customer.Example", token: provider)
            #expect(added.status == .created)
            #expect(added.json["name"] as? String == "customer.example")
            #expect((added.json["services"] as? [String])?.contains("conference.customer.example") == true)
            #expect(try await api.call(.PUT, "/domains/customer.example", token: provider).status == .ok, "adding again changes nothing")
            try await waitUntil(timeout: .seconds(10), "the new domain served") { server.context.domains.isHosted("customer.example") }

            let created = try await api.call(.POST, "/domains/customer.example/accounts", token: provider, body: #"{"username": "Juliet", "password": "balcony-1"}"#)
            #expect(created.status == .created)
            #expect(created.json["jid"] as? String == "juliet@customer.example")
            #expect(try await api.call(.POST, "/domains/customer.example/accounts", token: provider, body: #"{"username": "juliet", "password": "balcony-2"}"#).status == .conflict)
            #expect(try await api.call(.POST, "/domains/customer.example/accounts", token: provider, body: #"{"username": "romeo", "password": "short"}"#).status == .badRequest)
            #expect(try await api.call(.POST, "/domains/customer.example/accounts", token: provider, body: #"{"username": "romeo"#).status == .badRequest)
            #expect(try await api.call(.POST, "/domains/customer.example/accounts", token: provider, body: #"{"username": "a b@c", "password": "long enough"}"#).status == .badRequest)
            let listed = try await api.call(.GET, "/domains/customer.example/accounts", token: provider)
            #expect(listed.json["accounts"] as? [String] == ["juliet@customer.example"])
            #expect(try await api.call(.GET, "/domains/customer.example", token: provider).json["accounts"] as? Int == 1)

            // The account logs in with the password the API set, then with the changed one.
            let client = try await server.client()
            _ = try await client.login(domain: "customer.example", username: "juliet", password: "balcony-1")
            await client.close()
            #expect(try await api.call(.PUT, "/domains/customer.example/accounts/juliet/password", token: provider, body: #"{"password": "nightingale"}"#).status == .noContent)
            #expect(try await api.call(.PUT, "/domains/customer.example/accounts/nobody/password", token: provider, body: #"{"password": "nightingale"}"#).status == .notFound)
            let again = try await server.client()
            _ = try await again.login(domain: "customer.example", username: "juliet", password: "nightingale")
            await again.close()

            #expect(try await api.call(.DELETE, "/domains/customer.example/accounts/juliet", token: provider).status == .noContent)
            #expect(try await api.call(.DELETE, "/domains/customer.example/accounts/juliet", token: provider).status == .notFound)
            #expect(try await api.call(.GET, "/links", token: provider).status == .ok)
            #expect(try await api.call(.DELETE, "/domains/customer.example", token: provider).status == .noContent)
            #expect(try await api.call(.DELETE, "/domains/customer.example", token: provider).status == .notFound)
            try await waitUntil(timeout: .seconds(10), "the domain gone") { !server.context.domains.isHosted("customer.example") }

            // Every change is in the audit log, newest first, with the token's id.
            let audit = try await api.call(.GET, "/audit?limit=100", token: provider)
            let entries = try #require(audit.json["entries"] as? [[String: Any]])
            let actions = entries.compactMap { entry -> String? in
                guard entry["token"] as? String == providerID else { return nil }
                return "\(entry["action"] ?? "") \(entry["target"] ?? "") \(entry["outcome"] ?? "")"
            }
            #expect(actions.reversed() == [
                "domain.add Customer.Example ok", "domain.add customer.example unchanged",
                "account.create customer.example ok", "account.create customer.example conflict",
                "account.create customer.example bad-request", "account.create customer.example bad-request",
                "account.create customer.example bad-request",
                "account.password juliet@customer.example ok", "account.password nobody@customer.example not-found",
                "account.remove juliet@customer.example ok", "account.remove juliet@customer.example not-found",
                "domain.remove customer.example ok", "domain.remove customer.example not-found",
            ])
        }
    }

    @Test("A token scoped to one domain manages its accounts only, cannot tell other domains from absent ones, and sees only its own audit entries")
    func scopedToken() async throws {
        try await withAPI { server, api in
            let (customer, customerID) = try await token(server, domains: ["a.example"], label: "customer A")
            let domains = try await api.call(.GET, "/domains", token: customer)
            #expect((domains.json["domains"] as? [[String: Any]])?.compactMap { $0["name"] as? String } == ["a.example"])

            // Another customer's domain answers exactly as a domain nobody hosts.
            let other = try await api.call(.GET, "/domains/b.example/accounts", token: customer)
            let absent = try await api.call(.GET, "/domains/nobody.example/accounts", token: customer)
            #expect(other.status == .notFound)
            #expect(other.body == absent.body)
            let foreign = try await api.call(.POST, "/domains/b.example/accounts", token: customer, body: #"{"username": "mallory", "password": "long enough"}"#)
            #expect(foreign.status == .notFound)
            #expect(try await server.context.storage.userExists(try JID("mallory@b.example")) == false)

            // Provider-wide operations are refused.
            #expect(try await api.call(.PUT, "/domains/new.example", token: customer).status == .forbidden)
            #expect(try await api.call(.DELETE, "/domains/a.example", token: customer).status == .forbidden)
            #expect(try await api.call(.GET, "/links", token: customer).status == .forbidden)
            #expect(try await server.context.storage.domains().map(\.name) == ["a.example", "b.example"])

            // Its own domain works.
            #expect(try await api.call(.POST, "/domains/a.example/accounts", token: customer, body: #"{"username": "dave", "password": "long enough"}"#).status == .created)
            #expect(try await api.call(.GET, "/domains/a.example/accounts", token: customer).json["accounts"] as? [String] == ["alice@a.example", "dave@a.example"])

            // A provider's change to b.example is not in the customer's audit view.
            let (provider, _) = try await token(server, domains: nil)
            #expect(try await api.call(.POST, "/domains/b.example/accounts", token: provider, body: #"{"username": "erin", "password": "long enough"}"#).status == .created)
            let audit = try #require(try await api.call(.GET, "/audit", token: customer).json["entries"] as? [[String: Any]])
            #expect(audit.allSatisfy { ($0["target"] as? String).map { $0 == "a.example" || $0.hasSuffix("@a.example") } == true }, "\(audit)")
            #expect(audit.contains { $0["action"] as? String == "account.create" && $0["token"] as? String == customerID })
            // The refused attempts on b.example were audited (for the provider to see).
            let all = try await server.context.storage.auditEntries(limit: 100, domain: "b.example")
            #expect(all.contains { $0.tokenID == customerID && $0.action == "account.create" && $0.outcome == "not-found" })
            #expect(try await server.context.storage.auditEntries(limit: 100, domain: "new.example").contains { $0.tokenID == customerID && $0.outcome == "forbidden" })
        }
    }

    @Test("An expired token gets 401 like an unknown one, and the audit entry names it with the outcome expired")
    func expiredToken() async throws {
        try await withAPI { server, api in
            let (token, stored) = ProvisioningTokens.mint(domains: nil, label: "old", now: Date() - 7200, lifetime: 3600)
            try await server.context.storage.addAPIToken(stored)
            let answer = try await api.call(.PUT, "/domains/late.example", token: token)
            #expect(answer.status == .unauthorized)
            #expect(answer.json["message"] as? String == "the token expired")
            #expect(try await server.context.storage.domains().map(\.name).contains("late.example") == false)
            let entry = try #require(try await server.context.storage.auditEntries(limit: 1, domain: nil).first)
            #expect(entry.tokenID == stored.id && entry.outcome == "expired" && entry.target == "late.example")
            // One still valid for an hour works.
            let (fresh, freshStored) = ProvisioningTokens.mint(domains: nil, label: "new", lifetime: 3600)
            try await server.context.storage.addAPIToken(freshStored)
            #expect(try await api.call(.GET, "/domains", token: fresh).status == .ok)
        }
    }

    @Test("Failed authentications beyond provisioning.auth_failures_per_minute from one address get 429 with Retry-After, a valid token included, until the budget refills")
    func rateLimitedFailures() async throws {
        let time = ManualSessionClock()
        try await withAPI(sessionClock: time.clock, configure: { $0.provisioning.authFailuresPerMinute = 3 }) { server, api in
            let (valid, validID) = try await token(server, domains: nil)
            let (expired, expiredStored) = ProvisioningTokens.mint(domains: nil, label: "old", now: Date() - 7200, lifetime: 3600)
            try await server.context.storage.addAPIToken(expiredStored)
            // The budget: three failures of any kind (none, wrong, expired) get 401.
            for presented in [nil, "braid_wrong", expired] {
                #expect(try await api.call(.GET, "/domains", token: presented).status == .unauthorized)
            }
            // Beyond it, 429 for a bad token and for the valid one alike; nothing is changed.
            let limited = try await api.call(.PUT, "/domains/guess.example", token: "braid_wrong")
            #expect(limited.status == .tooManyRequests)
            #expect(limited.json["error"] as? String == "rate_limited")
            // One failure per 20 s refills; the bucket is empty, so the next try is 20 s away.
            #expect(limited.headers["Retry-After"].first == "20")
            let refused = try await api.call(.PUT, "/domains/new.example", token: valid)
            #expect(refused.status == .tooManyRequests)
            #expect(try await server.context.storage.domains().map(\.name) == ["a.example", "b.example"])

            let audit = try await server.context.storage.auditEntries(limit: 2, domain: nil)
            #expect(audit.map(\.outcome) == ["rate_limited", "rate_limited"])
            #expect(audit.map(\.target) == ["new.example", "guess.example"])
            #expect(server.metrics.counterValue("braid_provisioning_requests_total", [("action", "domain.add"), ("outcome", "rate_limited")]) == 2)
            #expect(server.metrics.counterValue("braid_provisioning_requests_total", [("action", "domain.list"), ("outcome", "unauthenticated")]) == 2)
            #expect(server.metrics.counterValue("braid_provisioning_requests_total", [("action", "domain.list"), ("outcome", "expired")]) == 1)

            // 19 s later still limited, with 1 s to go; at 20 s one more try is allowed.
            await time.advance(by: .seconds(19))
            let still = try await api.call(.GET, "/domains", token: valid)
            #expect(still.status == .tooManyRequests)
            #expect(still.headers["Retry-After"].first == "1")
            await time.advance(by: .seconds(1))
            #expect(try await api.call(.PUT, "/domains/new.example", token: valid).status == .created)
            #expect(try await server.context.storage.auditEntries(limit: 1, domain: nil).first?.tokenID == validID)
            // A success costs nothing, and the refilled token is spent by the next failure.
            #expect(try await api.call(.GET, "/domains", token: valid).status == .ok)
            #expect(try await api.call(.GET, "/domains", token: "braid_wrong").status == .unauthorized)
            #expect(try await api.call(.GET, "/domains", token: valid).status == .tooManyRequests)
            // A minute refills the whole budget.
            await time.advance(by: .seconds(60))
            for _ in 0..<3 { #expect(try await api.call(.GET, "/domains", token: nil).status == .unauthorized) }
            #expect(try await api.call(.GET, "/domains", token: nil).status == .tooManyRequests)
        }
    }

    @Test("The failure limiter tracks a bounded number of addresses, forgetting the oldest first")
    func limiterBound() {
        let limiter = AuthFailureLimiter(perMinute: 1, capacity: 3, now: { .uptimeNanoseconds(1_000_000_000) })
        for address in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] { limiter.recordFailure(address) }
        #expect(limiter.retryAfter("10.0.0.1") == 60)
        limiter.recordFailure("10.0.0.4")
        #expect(limiter.trackedAddresses == 3)
        #expect(limiter.retryAfter("10.0.0.1") == nil, "the oldest was forgotten")
        #expect(limiter.retryAfter("10.0.0.2") == 60 && limiter.retryAfter("10.0.0.4") == 60)
        for index in 0..<1000 { limiter.recordFailure("192.0.2.\(index)") }
        #expect(limiter.trackedAddresses == 3)
        #expect(limiter.retryAfter("192.0.2.999") == 60 && limiter.retryAfter("192.0.2.996") == nil)
        let off = AuthFailureLimiter(perMinute: 0, now: { .now() })
        for _ in 0..<5 { off.recordFailure("10.0.0.1") }
        #expect(off.retryAfter("10.0.0.1") == nil)
    }

    /// The `jid`s a domain's `disco#items` lists, as `client` sees them.
    func discoItems(_ client: TestClient, _ domain: String) async throws -> [String] {
        let items = try await client.iq(.get, to: domain, payload: XMLElement(name: "query", namespace: DiscoModule.items))
        return items.firstChild(name: "query", namespace: DiscoModule.items)?.children(name: "item", namespace: DiscoModule.items).compactMap { $0.attribute("jid") } ?? []
    }

    /// Whether `disco#info` of `domain` is answered with a result (an identity), for `client`.
    func answers(_ client: TestClient, _ domain: String) async throws -> Bool {
        let info = try await client.iq(.get, to: domain, payload: XMLElement(name: "query", namespace: DiscoModule.info))
        return info.attribute("type") == "result" && info.firstChild(name: "query", namespace: DiscoModule.info)?.firstChild(name: "identity", namespace: DiscoModule.info) != nil
    }

    @Test("Domain settings: a scoped token turns its domain's group chat off, which stops at once for that domain only (disco#items, disco#info, routing) for a client already online, and on again; opts out of ACME; unknown keys and services are 400; other domains 404; every change audited")
    func domainSettings() async throws {
        try await withAPI { server, api in
            let (customer, customerID) = try await token(server, domains: ["a.example"], label: "customer A")
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await discoItems(alice, "a.example").contains("conference.a.example"))
            #expect(try await answers(alice, "conference.a.example"))

            let initial = try await api.call(.GET, "/domains/a.example/settings", token: customer)
            #expect(initial.status == .ok)
            let services = try #require(initial.json["services"] as? [String: Bool])
            #expect(services["muc"] == true && services["upload"] == true, "\(initial.body)")
            #expect(initial.json["acme"] as? Bool == false, "ACME is off on the test server")
            #expect((initial.json["overrides"] as? [String: Any])?["services"] as? [String: Bool] == [:])

            // Refused: unknown keys, services the server does not offer, values of the wrong
            // type, another customer's domain (as if absent). Nothing changes.
            for body in [#"{"services": {"muc": false}, "colour": "red"}"#, #"{"services": {"teleport": false}}"#,
                         #"{"services": {"muc": "no"}}"#, #"{"acme": 0}"#, "[]"] {
                let refused = try await api.call(.PUT, "/domains/a.example/settings", token: customer, body: body)
                #expect(refused.status == .badRequest, "\(body): \(refused.body)")
                #expect(refused.json["error"] as? String == "bad-request")
            }
            let other = try await api.call(.PUT, "/domains/b.example/settings", token: customer, body: #"{"services": {"muc": false}}"#)
            let absent = try await api.call(.PUT, "/domains/nobody.example/settings", token: customer, body: #"{"services": {"muc": false}}"#)
            #expect(other.status == .notFound && other.body == absent.body)
            #expect(try await api.call(.GET, "/domains/b.example/settings", token: customer).body == absent.body)
            #expect(try await server.context.storage.domainSettings().isEmpty)
            #expect(try await answers(alice, "conference.a.example"))

            let changed = try await api.call(.PUT, "/domains/a.example/settings", token: customer, body: #"{"services": {"muc": false}, "acme": false}"#)
            #expect(changed.status == .ok, "\(changed.body)")
            #expect((changed.json["services"] as? [String: Bool])?["muc"] == false)
            #expect((changed.json["services"] as? [String: Bool])?["upload"] == true)
            #expect((changed.json["overrides"] as? [String: Any])?["acme"] as? Bool == false)
            #expect(try await server.context.storage.domainSettings() == ["a.example": DomainSettings(services: ["muc": false], acme: false)])

            // In effect when the answer arrives, for the client that was already online: the
            // service is gone from a.example only.
            #expect(try await discoItems(alice, "a.example") == ["upload.a.example"])
            #expect(try await answers(alice, "conference.a.example") == false)
            #expect(try await answers(alice, "conference.b.example"))
            #expect(try await discoItems(alice, "b.example").contains("conference.b.example"))
            #expect(server.context.domains.served("conference.a.example") == nil)
            #expect(server.context.domains.served("conference.b.example") == .service(label: "conference", parent: "b.example"))
            #expect(server.context.domains.acmeManages("a.example") == false && server.context.domains.acmeManages("b.example"))
            let listed = try #require(try await api.call(.GET, "/domains", token: customer).json["domains"] as? [[String: Any]])
            #expect(listed.first?["services"] as? [String] == ["upload.a.example"])

            // The same again changes nothing; {} is the defaults again, and the room service
            // answers again.
            #expect(try await api.call(.PUT, "/domains/a.example/settings", token: customer, body: #"{"acme": false, "services": {"muc": false}}"#).status == .ok)
            #expect(try await api.call(.PUT, "/domains/a.example/settings", token: customer, body: "{}").status == .ok)
            #expect(try await server.context.storage.domainSettings().isEmpty)
            #expect(try await answers(alice, "conference.a.example"))
            #expect(try await discoItems(alice, "a.example").contains("conference.a.example"))
            #expect(server.context.domains.acmeManages("a.example"))

            let audit = try await server.context.storage.auditEntries(limit: 100, domain: "a.example").filter { $0.action == "domain.settings" }
            #expect(audit.reversed().map { "\($0.outcome) \($0.detail)" }.suffix(3) == [
                "ok services.muc=off acme=off", "unchanged services.muc=off acme=off", "ok defaults",
            ])
            #expect(audit.allSatisfy { $0.tokenID == customerID && $0.target == "a.example" })
            #expect(audit.filter { $0.outcome == "bad-request" }.count == 5)
            #expect(try await server.context.storage.auditEntries(limit: 100, domain: "b.example").contains { $0.action == "domain.settings" && $0.outcome == "not-found" })

            // Settings another server stores (same database) are taken up with the domains.
            try await server.context.storage.setDomainSettings(DomainSettings(services: ["upload": false]), for: "b.example")
            try await waitUntil(timeout: .seconds(10), "b.example's settings read from storage") {
                server.context.domains.served("upload.b.example") == nil
            }
            #expect(try await answers(alice, "upload.b.example") == false)
            #expect(try await answers(alice, "upload.a.example"))
            await alice.close()
        }
    }

    @Test("Bodies beyond provisioning.max_body_bytes are refused with 413 before they are read whole")
    func bodyLimit() async throws {
        try await withAPI { server, api in
            let (provider, _) = try await token(server, domains: nil)
            let big = #"{"username": "x", "password": ""# + String(repeating: "p", count: 70_000) + #""}"#
            let answer = try await api.call(.POST, "/domains/a.example/accounts", token: provider, body: big)
            #expect(answer.status.code == 413)
            #expect(try await server.context.storage.userExists(try JID("x@a.example")) == false)
        }
    }

    /// The (method, path) of every operation docs/provisioning-api.yaml describes, read
    /// from its `paths` section (two-space path keys, four-space method keys).
    static func documentedOperations() throws -> [(method: String, path: String)] {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("docs/provisioning-api.yaml"), encoding: .utf8)
        var operations: [(String, String)] = []
        var inPaths = false
        var path: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line == "paths:" { inPaths = true; continue }
            if inPaths, let first = line.first, first != " " { break }
            guard inPaths else { continue }
            if line.hasPrefix("  /"), line.hasSuffix(":"), !line.hasPrefix("   ") {
                path = String(line.dropFirst(2).dropLast())
            } else if let path, line.hasPrefix("    "), !line.hasPrefix("     "),
                      let method = ["get", "put", "post", "delete"].first(where: { line == "    \($0):" }) {
                operations.append((method.uppercased(), path))
            }
        }
        return operations
    }

    @Test("Every operation docs/provisioning-api.yaml describes is served (401 without a token), and nothing else under /api/v1 is")
    func documentMatchesRoutes() async throws {
        let operations = try Self.documentedOperations()
        #expect(operations.count == 14)
        // One unauthenticated request per operation, more than the default budget of failed
        // authentications from one address (tested in rateLimitedFailures).
        try await withAPI(configure: { $0.provisioning.authFailuresPerMinute = 100 }) { _, api in
            for (method, path) in operations {
                let concrete = path.replacingOccurrences(of: "{domain}", with: "a.example").replacingOccurrences(of: "{user}", with: "alice")
                let answer = try await api.call(HTTPMethod(rawValue: method), concrete, token: nil, body: method == "GET" || method == "DELETE" ? nil : "{}")
                #expect(answer.status == .unauthorized, "\(method) \(path)")
            }
            #expect(try await api.call(.GET, "/nothing-here", token: nil).status == .notFound)
            #expect(try await api.call(.PATCH, "/domains/a.example", token: nil).status != .unauthorized)
        }
    }

    @Test("The generated server in Sources/ProvisioningOpenAPI was generated from the current docs/provisioning-api.yaml (else run Scripts/generate-openapi)")
    func generatedCodeIsCurrent() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let document = try Data(contentsOf: root.appendingPathComponent("docs/provisioning-api.yaml"))
        // SHA-256 of the document's bytes, hex, as `sha256sum` gives it to the script
        // (ProvisioningTokens.hash is SHA-256 of a string's UTF-8).
        let expected = ProvisioningTokens.hash(try #require(String(data: document, encoding: .utf8)))
        let directory = root.appendingPathComponent("Sources/ProvisioningOpenAPI")
        let files = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasSuffix(".swift") }.sorted()
        #expect(files.contains("Server.swift") && files.contains("Types.swift"), "\(files)")
        for file in files {
            let text = try String(contentsOf: directory.appendingPathComponent(file), encoding: .utf8)
            let header = text.split(separator: "\n").prefix(5).first { $0.hasPrefix("// openapi-sha256: ") }
            let recorded = header?.dropFirst("// openapi-sha256: ".count).prefix(64)
            #expect(recorded.map(String.init) == expected, "\(file) is stale: run Scripts/generate-openapi")
        }
    }

    @Test("Tokens: the secret is not stored, only its SHA-256; a token matches only itself")
    func tokens() {
        let (token, stored) = ProvisioningTokens.mint(domains: ["a.example"], label: "l")
        #expect(token.hasPrefix("braid_"))
        #expect(!stored.hash.contains(String(token.split(separator: ".").last ?? "")))
        #expect(stored.hash == ProvisioningTokens.hash(token))
        #expect(ProvisioningTokens.id(of: token) == stored.id)
        #expect(ProvisioningTokens.match(token, in: [stored]) == stored)
        let (other, otherStored) = ProvisioningTokens.mint(domains: nil, label: "m")
        #expect(ProvisioningTokens.match(other, in: [stored]) == nil)
        #expect(ProvisioningTokens.match(token, in: [otherStored]) == nil)
        #expect(ProvisioningTokens.id(of: "braid_short.secret") == nil)
    }
}
