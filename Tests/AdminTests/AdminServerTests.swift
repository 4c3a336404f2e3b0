import AsyncHTTPClient
import Foundation
import NIOCore
import NIOSSL
import Testing
@testable import Admin
@testable import Federation
import Trust

// Fixtures (Harness, TestSite, bounded) are in AdminTestSupport.swift.

@Suite("The admin server: POSH over HTTPS and the admin API")
struct AdminServerTests {
    @Test("The provider host's document lists every certificate Braid presents, its own first: a delegating domain is proven on any link")
    func providerDocumentListsEveryCertificate() async throws {
        let harness = try await Harness.make()
        do {
            let body = try await harness.fetcher.fetch("https://hosting.example.net/.well-known/posh/xmpp-server.json")
            let document = try POSHDocument(parsing: body ?? [])
            let certificates = [harness.certificates.provider, harness.certificates.alpha, harness.certificates.beta, harness.certificates.unhosted]
            #expect(document.fingerprints.count == certificates.count)
            #expect(document.fingerprints.first?.matches(certificateDER: try leafDER(harness.certificates.provider)) == true)
            for credentials in certificates {
                let der = try leafDER(credentials)
                #expect(document.fingerprints.contains { $0.matches(certificateDER: der) == true })
            }
            #expect(!document.fingerprints.contains { (try? $0.matches(certificateDER: leafDER(harness.certificates.stranger))) == true })
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("Each hosted domain gets the fingerprints of its own certificate, chosen by SNI and Host")
    func poshDocuments() async throws {
        let harness = try await Harness.make()
        do {
            let cases: [(String, PEMCredentials, String)] = [
                ("alpha.example", harness.certificates.alpha, "xmpp-server"),
                ("beta.example", harness.certificates.beta, "xmpp-server"),
                ("beta.example", harness.certificates.beta, "xmpp-client"),
            ]
            for (domain, credentials, service) in cases {
                let url = "https://\(domain)/.well-known/posh/\(service).json"
                let body = try await harness.fetcher.fetch(url)
                let expected = POSHPublisher.fingerprintsDocument(certificateDER: [try leafDER(credentials)], expires: Harness.expires)
                #expect(body.map { String(decoding: $0, as: UTF8.self) } == expected, "\(url)")
                let document = try POSHDocument(parsing: body ?? [])
                #expect(document.expires == Harness.expires)
                #expect(document.fingerprints.count == 1)
                #expect(document.fingerprints.first?.matches(certificateDER: try leafDER(credentials)) == true)
                // Not the other domain's certificate.
                #expect(document.fingerprints.first?.matches(certificateDER: try leafDER(harness.certificates.unhosted)) == false)
            }
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("The response is application/json over TLS; an unhosted name, another path or an IP Host get 404")
    func notFound() async throws {
        let harness = try await Harness.make()
        do {
            // A certificate exists for unhosted.example, but it is not hosted: 404, which the
            // fetcher reports as nil ("nothing published").
            #expect(try await harness.fetcher.fetch("https://unhosted.example/.well-known/posh/xmpp-server.json") == nil)
            #expect(try await harness.fetcher.fetch("https://alpha.example/.well-known/posh/other.json") == nil)
            #expect(try await harness.fetcher.fetch("https://alpha.example/") == nil)

            // Raw requests, to see headers and to send a Host that does not match SNI.
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(harness.certificates.caFile))
            let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: .init(tlsConfiguration: tls))
            do {
                var request = HTTPClientRequest(url: "https://127.0.0.1:\(harness.poshPort)/.well-known/posh/xmpp-server.json")
                // No SNI for an IP: the default (provider) certificate is presented, which does
                // not name 127.0.0.1, so skip name checks for this one request.
                var lax = tls
                lax.certificateVerification = .noHostnameVerification
                request.tlsConfiguration = lax
                let ip = try await client.execute(request, timeout: .seconds(5))
                #expect(ip.status.code == 404)

                var spoofed = HTTPClientRequest(url: "https://127.0.0.1:\(harness.poshPort)/.well-known/posh/xmpp-server.json")
                spoofed.tlsConfiguration = lax
                spoofed.headers.replaceOrAdd(name: "Host", value: "beta.example")
                let byHost = try await client.execute(spoofed, timeout: .seconds(5))
                #expect(byHost.status.code == 200)
                #expect(byHost.headers.first(name: "Content-Type") == "application/json")
                let body = try await byHost.body.collect(upTo: 1 << 16)
                #expect(String(buffer: body) == POSHPublisher.fingerprintsDocument(certificateDER: [try leafDER(harness.certificates.beta)], expires: Harness.expires))
            } catch {
                Issue.record("\(error)")
            }
            try await client.shutdown()
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("POSHProof over the real server proves the hosted domain for its certificate and refutes another")
    func endToEndProof() async throws {
        let harness = try await Harness.make()
        do {
            let now = Date(timeIntervalSince1970: 1_900_000_000)
            let proof = POSHProof(fetcher: harness.fetcher, now: { now })
            let alphaChain = try harness.certificates.alpha.certificateChain()
            #expect(await proof.prove("alpha.example", evidence: PeerEvidence(certificateChain: alphaChain)) == .proven(.posh, expires: now + TimeInterval(Harness.expires)))
            let strangerChain = try harness.certificates.stranger.certificateChain()
            guard case .refuted = await proof.prove("beta.example", evidence: PeerEvidence(certificateChain: strangerChain)) else {
                Issue.record("a certificate beta.example does not publish was accepted")
                await harness.close()
                return
            }
            // Nothing published for a name the server does not host.
            guard case .notApplicable = await proof.prove("unhosted.example", evidence: PeerEvidence(certificateChain: alphaChain)) else {
                Issue.record("unhosted.example was not 'not applicable'")
                await harness.close()
                return
            }

            // A tenant hosted elsewhere delegates to the provider's document by reference
            // (RFC 7711 §3.2): the provider's certificate proves the tenant's domain, for the
            // lower of the two lifetimes (3600 < 7200).
            let providerChain = try harness.certificates.provider.certificateChain()
            #expect(await proof.prove("tenant.example", evidence: PeerEvidence(certificateChain: providerChain)) == .proven(.posh, expires: now + 3600))
            // The provider lists every certificate it presents (alpha's too, issue 9), and
            // nothing else.
            #expect(await proof.prove("tenant.example", evidence: PeerEvidence(certificateChain: alphaChain)) == .proven(.posh, expires: now + 3600))
            guard case .refuted = await proof.prove("tenant.example", evidence: PeerEvidence(certificateChain: strangerChain)) else {
                Issue.record("the tenant's reference accepted a certificate the provider does not list")
                await harness.close()
                return
            }
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("Redirects: up to 10 followed, an 11th or one to http:// refused; HTTPS hosts may change")
    func redirects() async throws {
        let harness = try await Harness.make()
        do {
            let target = POSHPublisher.fingerprintsDocument(certificateDER: [try leafDER(harness.certificates.alpha)], expires: 600)
            let ten = try await harness.fetcher.fetch("https://redirect.example/hop/10")
            #expect(ten.map { String(decoding: $0, as: UTF8.self) } == target)

            await #expect(throws: POSHFetchError.self) { _ = try await harness.fetcher.fetch("https://redirect.example/hop/11") }
            do {
                _ = try await harness.fetcher.fetch("https://redirect.example/hop/11")
            } catch let error as POSHFetchError {
                #expect(error.reason.contains("more than 10 redirects"))
            }
            do {
                _ = try await harness.fetcher.fetch("https://redirect.example/insecure")
                Issue.record("a redirect to http:// was followed")
            } catch let error as POSHFetchError {
                #expect(error.reason.contains("not HTTPS"))
            }
            // Cross-host HTTPS redirect to Braid's POSH listener.
            let moved = try await harness.fetcher.fetch("https://redirect.example/to-braid")
            #expect(moved.map { String(decoding: $0, as: UTF8.self) } == POSHPublisher.fingerprintsDocument(certificateDER: [try leafDER(harness.certificates.alpha)], expires: Harness.expires))
            // http: is refused before any connection.
            await #expect(throws: POSHFetchError.self) { _ = try await harness.fetcher.fetch("http://redirect.example/hop/0") }
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("Other statuses, oversized bodies, slow servers and untrusted certificates are errors, not 'nothing published'")
    func fetchFailures() async throws {
        let harness = try await Harness.make(fetcherTimeout: .seconds(2))
        do {
            await #expect(throws: POSHFetchError.self) { _ = try await harness.fetcher.fetch("https://redirect.example/teapot") }
            await #expect(throws: POSHFetchError.self) { _ = try await harness.fetcher.fetch("https://redirect.example/big") }
            let started = ContinuousClock.now
            await #expect(throws: (any Error).self) { _ = try await harness.fetcher.fetch("https://redirect.example/slow") }
            #expect(ContinuousClock.now - started < .seconds(10))

            // The same server, but a fetcher that trusts only the system store: the test CA
            // is not in it, so the handshake fails.
            let strict = try POSHHTTPFetcher(timeout: .seconds(5), connectOverrides: ["alpha.example": ServerTarget(host: "127.0.0.1", port: harness.poshPort)])
            await #expect(throws: (any Error).self) { _ = try await strict.fetch("https://alpha.example/.well-known/posh/xmpp-server.json") }
            await strict.shutdown()
            // A missing trust anchor file is reported at construction.
            #expect(throws: POSHFetchError.self) { _ = try POSHHTTPFetcher(trustAnchorFiles: ["/nonexistent/ca.pem"]) }
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("/metrics, /api/links and /api/health return what the closures give")
    func adminAPI() async throws {
        let harness = try await Harness.make()
        do {
            let metrics = try await harness.adminGET("/metrics")
            #expect(metrics.status == 200)
            #expect(metrics.contentType == "text/plain; version=0.0.4; charset=utf-8")
            #expect(String(decoding: metrics.body, as: UTF8.self) == Harness.metricsText)

            let health = try await harness.adminGET("/api/health")
            #expect(health.status == 200)
            #expect(String(decoding: health.body, as: UTF8.self) == #"{"status":"ok"}"#)

            let links = try await harness.adminGET("/api/links")
            #expect(links.status == 200)
            #expect(links.contentType == "application/json")
            let decoded = try AdminJSON.decoder().decode([AdminLinkInfo].self, from: Data(links.body))
            let created = Harness.created
            // Sorted by creation; pairs by local, remote, direction.
            #expect(decoded == [
                AdminLinkInfo(
                    id: "link-1", origin: "outgoing", peerAddress: "203.0.113.5:5269", createdAt: created, closed: false, bidirectional: true,
                    stanzasSent: 5, stanzasReceived: 7, queued: 1, unacknowledged: 2,
                    pairs: [
                        AdminPairInfo(local: "alpha.example", remote: "peer.example", direction: "outbound", method: "posh", authorizedAt: created + 1, expires: created + 3600),
                        AdminPairInfo(local: "beta.example", remote: "peer.example", direction: "outbound", method: "pkix", authorizedAt: created + 2, expires: created + 86_400),
                    ]),
                AdminLinkInfo(
                    id: "link-2", origin: "incoming", peerAddress: "198.51.100.7:40112", createdAt: created + 60, closed: false, bidirectional: false,
                    stanzasSent: 0, stanzasReceived: 12, queued: 0, unacknowledged: 0,
                    pairs: [
                        AdminPairInfo(local: "beta.example", remote: "peer.example", direction: "inbound", method: "dialback", authorizedAt: created + 61, expires: nil),
                    ]),
            ])
            let text = String(decoding: links.body, as: UTF8.self)
            #expect(text.contains(#""peer_address":"203.0.113.5:5269""#))
            #expect(text.contains(#""created_at":"2027-01-15T08:00:00Z""#))
            #expect(text.contains(#""expires":null"#))

            // The CLI's client reads the same thing.
            var configuration = AdminConfiguration()
            configuration.adminPort = harness.adminPort
            let fetched = try await AdminClient.links(configuration: configuration)
            #expect(fetched.links == decoded)
            #expect(fetched.json == links.body)

            let missing = try await harness.adminGET("/api/nothing")
            #expect(missing.status == 404)
        } catch {
            Issue.record("\(error)")
        }
        await harness.close()
    }

    @Test("After shutdown nothing listens, and the CLI client says the server is unreachable")
    func shutdown() async throws {
        let harness = try await Harness.make()
        await harness.close()
        var configuration = AdminConfiguration()
        configuration.adminPort = harness.adminPort
        let closed = configuration
        do {
            _ = try await bounded(20, "unreachable admin") { try await AdminClient.links(configuration: closed) }
            Issue.record("the admin listener still answers after shutdown")
        } catch let error as AdminServerError {
            // Refused, or (when a parallel test reuses the freed port at once) reset.
            #expect(error.reason.contains("cannot reach the server's admin listener at http://127.0.0.1:\(harness.adminPort)/api/links ("))
        }
        configuration.adminPort = nil
        await #expect(throws: AdminServerError.self) { _ = try await AdminClient.get("/api/health", configuration: configuration) }
    }

    @Test("A port in use is an error and leaves nothing running; disabled listeners report nil")
    func bindFailures() async throws {
        let first = AdminServer(
            configuration: AdminConfiguration(adminAddress: "127.0.0.1", adminPort: 0, poshPort: nil),
            tls: TLSContextStore(logger: quietLogger), isHosted: { _ in false }, metrics: { "" }, links: { [] }, logger: quietLogger)
        let ports = try await bounded(20, "start") { try await first.start() }
        #expect(ports.posh == nil)
        let adminPort = try #require(ports.admin)
        #expect(adminPort > 0)

        // Same port again: EADDRINUSE is not a permission problem, so start() throws.
        let second = AdminServer(
            configuration: AdminConfiguration(adminAddress: "127.0.0.1", adminPort: adminPort, poshPort: nil),
            tls: TLSContextStore(logger: quietLogger), isHosted: { _ in false }, metrics: { "" }, links: { [] }, logger: quietLogger)
        await #expect(throws: (any Error).self) { _ = try await bounded(20, "second start") { try await second.start() } }
        await second.shutdown()

        // And a POSH listener on a port in use fails the whole start, stopping the admin one.
        let third = AdminServer(
            configuration: AdminConfiguration(adminAddress: "127.0.0.1", adminPort: 0, poshAddress: "127.0.0.1", poshPort: adminPort),
            tls: TLSContextStore(logger: quietLogger), isHosted: { _ in false }, metrics: { "" }, links: { [] }, logger: quietLogger)
        await #expect(throws: (any Error).self) { _ = try await bounded(20, "third start") { try await third.start() } }

        await first.shutdown()
        let none = AdminServer(
            configuration: AdminConfiguration(adminPort: nil, poshPort: nil),
            tls: TLSContextStore(logger: quietLogger), isHosted: { _ in false }, metrics: { "" }, links: { [] }, logger: quietLogger)
        let nothing = try await none.start()
        #expect(nothing.admin == nil && nothing.posh == nil)
        await none.shutdown()
    }

    @Test("Only a permission error on bind is tolerated")
    func permissionErrors() {
        #expect(AdminServer.isPermissionDenied(IOError(errnoCode: EACCES, reason: "bind(descriptor:ptr:bytes:)")))
        #expect(AdminServer.isPermissionDenied(IOError(errnoCode: EPERM, reason: "bind(descriptor:ptr:bytes:)")))
        #expect(!AdminServer.isPermissionDenied(IOError(errnoCode: EADDRINUSE, reason: "bind(descriptor:ptr:bytes:)")))
        #expect(!AdminServer.isPermissionDenied(AdminServerError("other")))
    }

    @Test("Host values map to canonical domains; IP literals and junk do not")
    func hostParsing() {
        #expect(AdminServer.domain(fromHost: "alpha.example") == "alpha.example")
        #expect(AdminServer.domain(fromHost: "Alpha.Example:8443") == "alpha.example")
        #expect(AdminServer.domain(fromHost: "xn--bcher-kva.example") == "bücher.example")
        #expect(AdminServer.domain(fromHost: "127.0.0.1") == nil)
        #expect(AdminServer.domain(fromHost: "127.0.0.1:443") == nil)
        #expect(AdminServer.domain(fromHost: "[::1]:443") == nil)
        #expect(AdminServer.domain(fromHost: "alpha.example:https") == nil)
        #expect(AdminServer.domain(fromHost: "") == nil)
        #expect(AdminServer.domain(fromHost: nil) == nil)
    }
}

extension AdminServerTests {
    @Suite("Admin configuration")
    struct Configuration {
        @Test("Defaults, and every key written out, nulls included")
        func encoding() throws {
            let configuration = AdminConfiguration()
            #expect(configuration.adminAddress == "127.0.0.1")
            #expect(configuration.adminPort == 5280)
            #expect(configuration.poshAddress == "0.0.0.0")
            #expect(configuration.poshPort == 443)
            #expect(configuration.poshHostName == nil)
            #expect(configuration.poshExpiresSeconds == 86_400)
            let encoder = JSONEncoder()
            encoder.outputFormatting = .sortedKeys
            let text = String(decoding: try encoder.encode(configuration), as: UTF8.self)
            #expect(text == #"{"admin_address":"127.0.0.1","admin_port":5280,"posh_address":"0.0.0.0","posh_expires_seconds":86400,"posh_host_name":null,"posh_port":443,"websocket_allowed_origins":[],"websocket_path":"\/xmpp-websocket","websocket_url":null}"#)
        }

        @Test("Decoding: missing keys keep defaults, null disables a listener")
        func decoding() throws {
            let empty = try JSONDecoder().decode(AdminConfiguration.self, from: Data("{}".utf8))
            #expect(empty == AdminConfiguration())
            let custom = try JSONDecoder().decode(AdminConfiguration.self, from: Data(#"{"admin_port": null, "posh_port": 8443, "posh_host_name": "hosting.example.net"}"#.utf8))
            #expect(custom.adminPort == nil)
            #expect(custom.poshPort == 8443)
            #expect(custom.poshHostName == "hosting.example.net")
            #expect(custom.adminAddress == "127.0.0.1")
            let roundTrip = try JSONDecoder().decode(AdminConfiguration.self, from: try JSONEncoder().encode(custom))
            #expect(roundTrip == custom)
        }
    }
}
