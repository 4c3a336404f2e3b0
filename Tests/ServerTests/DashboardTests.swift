import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Storage
import Testing
import Trust
import TestSupport
import XMPPCore
@testable import Federation
@testable import Server

/// The operator dashboard and the API it reads: `/api/v1/status`, `/api/v1/domains/{domain}/check`,
/// the three static files and their headers, and the page itself in headless Chromium against
/// two federating servers.
@Suite("Dashboard")
struct DashboardTests {
    typealias API = ProvisioningAPITests.API

    /// A client for the server's HTTPS listener root (the dashboard), next to the API one.
    func withAPI(configure: @escaping (inout BraidConfiguration) -> Void = { _ in },
                 _ body: (TestServer, API, API) async throws -> Void) async throws {
        try await withServer(domains: ["a.example", "b.example"], users: ["alice@a.example", "bob@b.example", "carol@a.example"], configure: configure) { server in
            let port = try #require(server.server.adminPorts.posh)
            var tls = TLSConfiguration.makeClientConfiguration()
            // The test server's certificates are self-signed.
            tls.certificateVerification = .none
            let http = HTTPClient(eventLoopGroupProvider: .shared(server.group), configuration: .init(tlsConfiguration: tls))
            do {
                try await body(server, API(http: http, base: "https://127.0.0.1:\(port)/api/v1"), API(http: http, base: "https://127.0.0.1:\(port)"))
            } catch {
                try? await http.shutdown()
                throw error
            }
            try await http.shutdown()
        }
    }

    func token(_ server: TestServer, domains: [String]?) async throws -> String {
        let (token, stored) = ProvisioningTokens.mint(domains: domains, label: "dashboard test")
        try await server.context.storage.addAPIToken(stored)
        return token
    }

    // MARK: Status

    @Test("/status: a provider token sees every domain's sessions, the links summary, counters and refused attempts; a scoped one only its domains")
    func status() async throws {
        try await withAPI { server, api, _ in
            let provider = try await token(server, domains: nil)
            let customer = try await token(server, domains: ["a.example"])
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            // Refused attempts: one without a token, one of the customer's on its own domain.
            #expect(try await api.call(.GET, "/status", token: nil).status == .unauthorized)
            #expect(try await api.call(.DELETE, "/domains/a.example", token: customer).status == .forbidden)

            // A stanza after the logins, for the client counter.
            try await alice.sendPresence()
            try await waitUntil("alice's presence counted") { server.metrics.counterTotal("braid_stanzas_in_total") > 0 }

            let all = try await api.call(.GET, "/status", token: provider)
            #expect(all.status == .ok)
            #expect(all.json["scope"] as? String == "provider")
            #expect(all.json["hosted_domains"] as? Int == 2)
            let sessions = try #require(all.json["sessions"] as? [String: Any])
            #expect(sessions["online"] as? Int == 3)
            let byDomain = try #require(sessions["by_domain"] as? [[String: Any]])
            #expect(byDomain.map { "\($0["domain"] ?? "") \($0["online"] ?? "")" } == ["a.example 2", "b.example 1"], "busiest first")
            let links = try #require(all.json["links"] as? [String: Any])
            #expect(links["open"] as? Int == 0 && links["classic_connections"] as? Int == 0 && links["saved_now"] as? Int == 0)
            #expect(links["connections_saved_total"] as? Int == 0)
            let security = try #require(all.json["security"] as? [String: Any])
            #expect(security["violations_total"] as? Int == 0)
            #expect(security["certificate_required_refusals_total"] as? Int == 0)
            #expect(security["stream_errors_sent"] is [Any])
            let recent = try #require(security["recent"] as? [[String: Any]])
            #expect(recent.map { "\($0["outcome"] ?? "") \($0["target"] ?? "")" } == ["forbidden a.example", "unauthenticated /api/v1/status"], "newest first")
            #expect((all.json["certificates"] as? [String: Any])?["presented"] is Int)
            let stanzas = try #require(all.json["stanzas"] as? [String: Any])
            #expect((stanzas["client_in_total"] as? Int ?? 0) > 0)
            #expect(stanzas["s2s_in_total"] as? Int == 0)

            let mine = try await api.call(.GET, "/status", token: customer)
            #expect(mine.status == .ok)
            #expect(mine.json["scope"] as? String == "domains")
            #expect(mine.json["hosted_domains"] as? Int == 1)
            let mySessions = try #require(mine.json["sessions"] as? [String: Any])
            #expect(mySessions["online"] as? Int == 2)
            #expect((mySessions["by_domain"] as? [[String: Any]])?.compactMap { $0["domain"] as? String } == ["a.example"])
            // Server-wide figures are left out, not refused.
            for section in ["links", "certificates", "stanzas"] {
                #expect(mine.json[section] == nil, "\(section)")
            }
            let mySecurity = try #require(mine.json["security"] as? [String: Any])
            #expect(Set(mySecurity.keys) == ["recent"])
            #expect((mySecurity["recent"] as? [[String: Any]])?.map { "\($0["outcome"] ?? "") \($0["target"] ?? "")" } == ["forbidden a.example"],
                    "the unauthenticated attempt concerned no domain of the customer's")
            for client in [alice, carol, bob] { await client.close() }
        }
    }

    @Test("The classic estimate counts each authorised (local, remote, direction) once; closed links are left out")
    func classicEstimate() {
        let now = Date()
        func pairs(_ locals: [String], _ remotes: [String], _ directions: [PairDirection], _ method: ProofMethod = .pkix) -> [PairAuthorization] {
            locals.flatMap { local in remotes.flatMap { remote in directions.map { direction in
                PairAuthorization(pair: DomainPair(local: local, remote: remote), direction: direction, method: method, authorizedAt: now, expires: nil)
            } } }
        }
        // 2 local × 3 remote domains, every pair both ways, on one bidirectional link, plus
        // one pair repeated one way on a second link (a fallback connection), and a closed link.
        let shared = LinkSnapshot(id: "l1", origin: .outgoing, peerAddress: "192.0.2.1:5269", createdAt: now,
                                  pairs: pairs(["a1.example", "a2.example"], ["b1.example", "b2.example", "b3.example"], [.outbound, .inbound]),
                                  stanzasSent: 0, stanzasReceived: 0, closed: false, bidirectional: true)
        let fallback = LinkSnapshot(id: "l2", origin: .incoming, peerAddress: "192.0.2.1:40000", createdAt: now,
                                    pairs: pairs(["a1.example"], ["b1.example"], [.inbound], .dialback),
                                    stanzasSent: 0, stanzasReceived: 0, closed: false)
        let closed = LinkSnapshot(id: "l3", origin: .outgoing, peerAddress: "192.0.2.9:5269", createdAt: now,
                                  pairs: pairs(["a1.example"], ["c.example"], [.outbound]), stanzasSent: 0, stanzasReceived: 0, closed: true)
        guard case .object(let summary) = ProvisioningAPI.linkSummary([shared, fallback, closed], savedTotal: 7) else {
            Issue.record("not an object")
            return
        }
        #expect(summary["open"] == JSONValue.number(2))
        #expect(summary["outgoing"] == JSONValue.number(1) && summary["incoming"] == JSONValue.number(1))
        #expect(summary["pairs"] == JSONValue.number(13))
        #expect(summary["domain_pairs"] == JSONValue.number(6))
        #expect(summary["local_domains"] == JSONValue.number(2) && summary["remote_domains"] == JSONValue.number(3))
        #expect(summary["classic_connections"] == JSONValue.number(12))
        #expect(summary["classic_upper_bound"] == JSONValue.number(12), "2·N·M")
        #expect(summary["saved_now"] == JSONValue.number(10))
        #expect(summary["connections_saved_total"] == JSONValue.number(7))
        guard case .object(let none) = ProvisioningAPI.linkSummary([], savedTotal: 0) else { return }
        #expect(none["classic_connections"] == JSONValue.number(0) && none["saved_now"] == JSONValue.number(0))
    }

    // MARK: Check

    @Test("/domains/{domain}/check: braid check's report for the domain and its services, with errors when DNS does not answer, quickly, then from the cache; scoped tokens for their domains only")
    func check() async throws {
        try await withAPI(configure: { configuration in
            // Federation on, so every check runs; DNS a closed port on loopback, as in the
            // federation tests, with a one-second timeout.
            configuration.s2s.enabled = true
            configuration.dns.forwarders = ["127.0.0.1@9"]
            configuration.dns.timeoutSeconds = 1
        }) { server, api, _ in
            let provider = try await token(server, domains: nil)
            let customer = try await token(server, domains: ["a.example"])
            #expect(try await api.call(.GET, "/domains/a.example/check", token: nil).status == .unauthorized)

            let started = ContinuousClock.now
            let first = try await api.call(.GET, "/domains/a.example/check", token: provider)
            let took = ContinuousClock.now - started
            #expect(first.status == .ok, "\(first.body)")
            #expect(took < .seconds(30), "\(took)")
            #expect(first.headers["Content-Type"].first == "application/json")
            // The shape of `braid check --json`: it decodes as a report.
            let report = try JSONDecoder().decode(CheckReport.self, from: Data(first.body.utf8))
            let names = report.domains.map(\.domain)
            #expect(names.first == "a.example")
            #expect(names.contains("conference.a.example"), "\(names)")
            #expect(report.domains.dropFirst().allSatisfy { $0.kind == .service && $0.parent == "a.example" })
            #expect(report.domains.allSatisfy { !$0.checks.isEmpty })
            #expect(report.summary.errors > 0, "no SRV records can be found")
            #expect(report.domains[0].results(.srv).contains { $0.status == .error })
            #expect(!report.configuration.isEmpty)
            #expect((first.json["summary"] as? [String: Any])?["exit_code"] as? Int == 1)

            // Asked again within the cache's lifetime: the same report, not a new run.
            let again = try await api.call(.GET, "/domains/a.example/check", token: provider)
            #expect(again.status == .ok)
            #expect(again.body == first.body)
            #expect(again.headers["Age"].first.flatMap { Int($0) } != nil)

            // The customer gets its domain without the server's configuration findings, and
            // another customer's domain exactly as one nobody hosts.
            let mine = try await api.call(.GET, "/domains/a.example/check", token: customer)
            #expect(mine.status == .ok)
            let myReport = try JSONDecoder().decode(CheckReport.self, from: Data(mine.body.utf8))
            #expect(myReport.configuration.isEmpty)
            #expect(myReport.domains == report.domains)
            let other = try await api.call(.GET, "/domains/b.example/check", token: customer)
            let absent = try await api.call(.GET, "/domains/nobody.example/check", token: customer)
            #expect(other.status == .notFound)
            #expect(other.body == absent.body)
            #expect(try await api.call(.GET, "/domains/nobody.example/check", token: provider).status == .notFound)
        }
    }

    @Test("The check cache runs a domain once within its lifetime, shares a running check, and forgets failures")
    func checkCache() async throws {
        let cache = DomainCheckCache(lifetime: .seconds(60))
        let runs = Counter()
        let report = CheckReport(domains: [], configuration: [])
        let results = try await withThrowingTaskGroup(of: CheckReport.self) { group in
            for _ in 0 ..< 5 {
                group.addTask {
                    try await cache.report(for: "a.example") {
                        await runs.increment()
                        try await Task.sleep(for: .milliseconds(50))
                        return report
                    }.0
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.count == 5)
        #expect(await runs.value == 1)
        struct Broken: Error {}
        await #expect(throws: Broken.self) { try await cache.report(for: "b.example") { throw Broken() } }
        _ = try await cache.report(for: "b.example") { await runs.increment(); return report }
        #expect(await runs.value == 2, "a failed check is not kept")

        let expiring = DomainCheckCache(lifetime: .zero)
        _ = try await expiring.report(for: "a.example") { await runs.increment(); return report }
        _ = try await expiring.report(for: "a.example") { await runs.increment(); return report }
        #expect(await runs.value == 4)
    }

    actor Counter {
        var value = 0
        func increment() { value += 1 }
    }

    // MARK: Static files and XSS

    @Test("The page, script and style sheet are served with the CSP and the other security headers, no cookie, and no inline code")
    func staticFiles() async throws {
        try await withAPI { _, _, root in
            let expected = [
                ("/dashboard", "text/html; charset=utf-8"), ("/dashboard/app.js", "text/javascript; charset=utf-8"),
                ("/dashboard/app.css", "text/css; charset=utf-8"),
            ]
            for (path, type) in expected {
                let answer = try await root.call(.GET, path, token: nil)
                #expect(answer.status == .ok, "\(path)")
                #expect(answer.headers["Content-Type"].first == type)
                #expect(answer.headers["Content-Security-Policy"].first == Dashboard.contentSecurityPolicy)
                #expect(answer.headers["X-Content-Type-Options"].first == "nosniff")
                #expect(answer.headers["Referrer-Policy"].first == "no-referrer")
                #expect(answer.headers["Cache-Control"].first == "no-store")
                #expect(answer.headers["Set-Cookie"].isEmpty)
                #expect(!answer.body.isEmpty)
            }
            #expect(Dashboard.contentSecurityPolicy == "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
            // The page runs only the script file: no inline script, handler or style.
            let page = try await root.call(.GET, "/dashboard", token: nil).body
            let scripts = page.components(separatedBy: "<script").dropFirst()
            #expect(scripts.count == 1 && scripts.allSatisfy { $0.hasPrefix(#" src="/dashboard/app.js""#) })
            #expect(page.range(of: #"\son[a-z]+\s*="#, options: .regularExpression) == nil)
            #expect(!page.contains("style="))
            #expect(!page.contains("<style"))
        }
    }

    @Test("The script never turns data into markup: no innerHTML or its relatives, no cookies; the token goes only in the Authorization header")
    func scriptDoesNotParseMarkup() async throws {
        try await withAPI { _, _, root in
            let script = try await root.call(.GET, "/dashboard/app.js", token: nil).body
            #expect(script == Dashboard.script)
            for forbidden in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "document.cookie", "localStorage", "DOMParser", "createContextualFragment"] {
                #expect(!script.contains(forbidden), "\(forbidden)")
            }
            #expect(script.contains("textContent"))
            #expect(script.contains("'Authorization'") || script.contains("Authorization: 'Bearer '"))
            #expect(script.contains("credentials: 'omit'"))
        }
    }

    @Test("JSON answers escape <, > and &, so a string from storage can never close a script or start a tag")
    func jsonEscapesMarkup() async throws {
        #expect(JSONValue.string("</script><img src=x onerror=alert(1)>&").serialized == #""\u003c/script\u003e\u003cimg src=x onerror=alert(1)\u003e\u0026""#)
        #expect(JSONValue.raw(#"{"message": "<b>&"}"#).serialized == #"{"message": "\u003cb\u003e\u0026"}"#)
        try await withAPI { server, api, _ in
            let provider = try await token(server, domains: nil)
            let hostile = "<script>alert('braid')</script>"
            try await server.context.storage.appendAuditEntry(AuditEntry(at: ProvisioningAPI.now(), tokenID: nil, action: "domain.read", target: hostile,
                                                                         outcome: "unauthenticated", detail: "<img src=x onerror=alert(1)>"))
            for path in ["/status", "/audit"] {
                let answer = try await api.call(.GET, path, token: provider)
                #expect(answer.status == .ok)
                #expect(!answer.body.contains("<") && !answer.body.contains(">"), "\(path)")
                #expect(answer.body.contains(#"\u003cscript\u003e"#))
                #expect(answer.headers["X-Content-Type-Options"].first == "nosniff")
            }
            let status = try await api.call(.GET, "/status", token: provider)
            let recent = (status.json["security"] as? [String: Any])?["recent"] as? [[String: Any]]
            #expect(recent?.first?["target"] as? String == hostile, "decoded, the string is what was stored")
        }
    }

    // MARK: In a browser

    static let chromium = "/usr/bin/chromium"
    static let screenshotDirectory = "/tmp/braid-dashboard"

    /// Loads `url` in headless Chromium and returns what it printed (the DOM with
    /// `--dump-dom`), or takes a screenshot. Chromium's virtual time runs the page's timers
    /// (its polling) without waiting for them, and stops while requests are outstanding.
    static func chromium(_ url: String, profile: String, extra: [String], budgetMilliseconds: Int) async throws -> (Int32, String) {
        let output = "\(profile).out"
        defer { try? FileManager.default.removeItem(atPath: output) }
        let arguments = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-extensions", "--disable-sync",
            // The test servers' certificates come from a CA made for the test.
            "--ignore-certificate-errors",
            "--user-data-dir=\(profile)", "--virtual-time-budget=\(budgetMilliseconds)",
        ] + extra + [url]
        return try await ChildProcess.run(chromium, arguments, outputPath: output, timeout: .seconds(90))
    }

    @Test("In headless Chromium: log in with a token in the fragment, see the domains and no link, then the link with its pairs and proofs once the providers federate; screenshot saved",
          .enabled(if: FileManager.default.isExecutableFile(atPath: DashboardTests.chromium)))
    func browser() async throws {
        try await withFederation(aDomains: ["a.example", "c.example"], aUsers: ["alice@a.example", "carol@c.example"],
                                 bDomains: ["b.example"], bUsers: ["bob@b.example"]) { pair in
            let port = try #require(pair.a.server.adminPorts.posh)
            let (token, stored) = ProvisioningTokens.mint(domains: nil, label: "dashboard browser test")
            try await pair.a.context.storage.addAPIToken(stored)
            // A refused attempt whose target is markup: the page must show it as text.
            try await pair.a.context.storage.appendAuditEntry(AuditEntry(at: ProvisioningAPI.now(), tokenID: nil, action: "domain.read",
                                                                         target: #"<img src=x onerror="document.title='pwned'">"#,
                                                                         outcome: "unauthenticated", detail: "test"))
            let url = "https://127.0.0.1:\(port)/dashboard#token=\(token)"
            let profile = FileManager.default.temporaryDirectory.appendingPathComponent("braid-dashboard-chromium-\(UUID().uuidString)").path
            try FileManager.default.createDirectory(atPath: profile, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: profile) }

            // Before any federation: the domains, no link.
            let (code, before) = try await Self.chromium(url, profile: profile, extra: ["--dump-dom"], budgetMilliseconds: 3000)
            #expect(code == 0, "\(before.suffix(2000))")
            #expect(before.contains(#"data-state="ready""#), "\(before.suffix(4000))")
            #expect(before.contains(#"<td class="domain">a.example</td>"#))
            #expect(before.contains(#"<td class="domain">c.example</td>"#))
            #expect(before.contains("No federation links."))
            #expect(before.contains("provider-wide token"))
            // The markup in the audit entry is text in a cell, and never ran.
            #expect(before.contains(#"&lt;img src=x onerror="document.title='pwned'"&gt;"#) || before.contains("&lt;img src=x onerror=&quot;document.title='pwned'&quot;&gt;"))
            #expect(!before.contains("pwned</title>"))
            #expect(!before.contains("#token="), "the token is taken out of the address")

            // The providers federate: A's two domains write to B, B answers one of them.
            let a = try await pair.a.clientsWithPresence(["alice@a.example", "carol@c.example"])
            let b = try await pair.b.clientsWithPresence(["bob@b.example"])
            try await a["alice@a.example"]?.sendMessage(to: "bob@b.example", body: "hello from a")
            try await a["carol@c.example"]?.sendMessage(to: "bob@b.example", body: "hello from c")
            for _ in 0 ..< 2 { _ = try await b["bob@b.example"]?.waitFor(timeout: .seconds(15)) { $0.name == "message" } }
            try await b["bob@b.example"]?.sendMessage(to: "alice@a.example", body: "hello back")
            _ = try await a["alice@a.example"]?.waitFor(timeout: .seconds(15)) { $0.name == "message" }
            try await waitUntil(timeout: .seconds(10), "A's link carries three pairs") {
                await pair.a.openLinkSnapshots.reduce(0) { $0 + $1.pairs.count } >= 3
            }
            let links = await pair.a.openLinkSnapshots

            // This time with a.example's check run as the page loads (#check=).
            let (again, after) = try await Self.chromium(url + "&check=a.example", profile: profile, extra: ["--dump-dom"], budgetMilliseconds: 3000)
            #expect(again == 0)
            #expect(!after.contains("No federation links."), "\(after.suffix(4000))")
            #expect(after.contains("<article class=\"link\">"))
            for link in links {
                #expect(after.contains(link.peerAddress), "\(link.peerAddress)")
                for authorization in link.pairs {
                    let direction = authorization.direction == .outbound ? "outbound →" : "← inbound"
                    let row = "<tr><td>\(authorization.pair.local)</td><td>\(authorization.pair.remote)</td><td>\(direction)</td>"
                        + "<td><span class=\"proof\">\(authorization.method.rawValue)</span></td></tr>"
                    #expect(after.contains(row), "\(row)")
                }
            }
            #expect(after.contains("Classic federation"))
            // The check's results under the domain: DNS does not answer here, so SRV is an error.
            #expect(after.contains(#"<tr class="check-results">"#), "\(after.suffix(4000))")
            #expect(after.contains("<h4>conference.a.example (service of a.example)</h4>"))
            #expect(after.contains(#"<li class="error"><span class="mark">✘</span> <span class="check-name">srv</span>"#))
            #expect(after.contains(#"<span class="badge error">✘ error</span>"#))

            // The screenshot CI keeps: a few polls, so the charts have points.
            try FileManager.default.createDirectory(atPath: Self.screenshotDirectory, withIntermediateDirectories: true)
            let png = "\(Self.screenshotDirectory)/dashboard.png"
            try? FileManager.default.removeItem(atPath: png)
            let (shot, log) = try await Self.chromium(url, profile: profile, extra: ["--screenshot=\(png)", "--window-size=1280,2000", "--hide-scrollbars"],
                                                      budgetMilliseconds: 16000)
            #expect(shot == 0, "\(log.suffix(2000))")
            let bytes = try #require(FileManager.default.contents(atPath: png))
            #expect(bytes.starts(with: [0x89, 0x50, 0x4E, 0x47]))
            #expect(bytes.count > 20_000, "\(bytes.count) bytes")

            for client in Array(a.values) + Array(b.values) { await client.close() }
        }
    }
}
