import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Storage
import Synchronization
import Testing
import XMPPCore
@testable import Server

/// HTTP file upload (XEP-0363): slots over XMPP from `upload.DOMAIN`, then PUT and GET on the
/// server's HTTPS listener, with real sockets.
@Suite("HTTP file upload (XEP-0363)")
struct UploadTests {
    static let namespace = UploadModule.namespace
    /// The URLs' base in these tests; requests go to the listener's bound port instead
    /// (`UploadTests.local`), since the port is only known once the server runs.
    static let base = "https://upload.test"

    // MARK: Helpers

    static func request(filename: String? = "photo.jpg", size: String? = "1000", contentType: String? = "image/jpeg") -> XMLElement {
        var attributes: [XMLAttribute] = []
        if let filename { attributes.append(XMLAttribute("filename", filename)) }
        if let size { attributes.append(XMLAttribute("size", size)) }
        if let contentType { attributes.append(XMLAttribute("content-type", contentType)) }
        return XMLElement(name: "request", namespace: namespace, attributes: attributes)
    }

    struct Slot {
        var put: String
        var get: String
    }

    /// A slot, or the test fails.
    static func slot(_ client: TestClient, to service: String = "upload.a.example", filename: String = "photo.jpg", size: Int, contentType: String? = "image/jpeg") async throws -> Slot {
        let answer = try await client.iq(.get, to: service, payload: request(filename: filename, size: String(size), contentType: contentType))
        let slot = try #require(answer.firstChild(name: "slot", namespace: namespace), "no slot: \(answer)")
        let put = try #require(slot.firstChild(name: "put", namespace: namespace)?.attribute("url"))
        let get = try #require(slot.firstChild(name: "get", namespace: namespace)?.attribute("url"))
        return Slot(put: put, get: get)
    }

    /// The error of a refused slot request: condition, type, and the XEP-0363 element.
    static func refusal(_ client: TestClient, to service: String = "upload.a.example", _ request: XMLElement, type: IQType = .get) async throws -> (condition: String?, type: String?, extra: XMLElement?) {
        let answer = try await client.iq(type, to: service, payload: request)
        #expect(answer.attribute("type") == "error", "expected an error: \(answer)")
        let error = answer.firstChild(name: "error", namespace: XMLNamespace.client)
        let condition = error?.elements.first(where: { $0.namespace == "urn:ietf:params:xml:ns:xmpp-stanzas" && $0.name != "text" })?.name
        let extra = error?.elements.first(where: { $0.namespace == namespace })
        return (condition, error?.attribute("type"), extra)
    }

    /// `url` pointed at the running listener.
    static func local(_ url: String, _ server: TestServer) throws -> String {
        let port = try #require(server.server.adminPorts.posh)
        #expect(url.hasPrefix(base + "/upload/"))
        return "https://127.0.0.1:\(port)" + url.dropFirst(base.count)
    }

    func withUploadServer(_ configure: @escaping (inout BraidConfiguration) -> Void = { _ in }, _ body: (TestServer, HTTPClient) async throws -> Void) async throws {
        try await withServer(configure: { configuration in
            configuration.upload.baseURL = Self.base
            configure(&configuration)
        }) { server in
            var tls = TLSConfiguration.makeClientConfiguration()
            // The test server's certificates are self-signed.
            tls.certificateVerification = .none
            let http = HTTPClient(eventLoopGroupProvider: .shared(server.group), configuration: .init(tlsConfiguration: tls))
            do {
                try await body(server, http)
            } catch {
                try? await http.shutdown()
                throw error
            }
            try await http.shutdown()
        }
    }

    struct Answer {
        var status: HTTPResponseStatus
        var headers: HTTPHeaders
        var body: [UInt8]
    }

    static func send(_ http: HTTPClient, _ method: HTTPMethod, _ url: String, headers: [(String, String)] = [], body: HTTPClientRequest.Body? = nil) async throws -> Answer {
        var request = HTTPClientRequest(url: url)
        request.method = method
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        if let body { request.body = body }
        let response = try await http.execute(request, timeout: .seconds(30))
        let collected = try await response.body.collect(upTo: 16 * 1024 * 1024)
        return Answer(status: response.status, headers: response.headers, body: Array(collected.readableBytesView))
    }

    static func put(_ http: HTTPClient, _ url: String, _ bytes: [UInt8], contentType: String? = "image/jpeg") async throws -> Answer {
        try await send(http, .PUT, url, headers: contentType.map { [("Content-Type", $0)] } ?? [], body: .bytes(ByteBuffer(bytes: bytes)))
    }

    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    /// Waits, up to `timeout`, for `condition`.
    static func eventually(timeout: Duration = .seconds(10), _ condition: () async throws -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(50))
        }
        return try await condition()
    }

    // MARK: Discovery

    @Test("upload.DOMAIN: identity store/file, the feature, and max-file-size in a XEP-0128 form; listed in the domain's disco#items")
    func discovery() async throws {
        try await withServer(configure: { $0.upload.maxFileSize = 5_000_000 }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let items = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "query", namespace: DiscoModule.items))
            let jids = items.firstChild(name: "query", namespace: DiscoModule.items)?.children(name: "item", namespace: DiscoModule.items).compactMap { $0.attribute("jid") } ?? []
            #expect(jids.contains("upload.a.example"))
            let info = try #require(try await alice.iq(.get, to: "upload.a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
                .firstChild(name: "query", namespace: DiscoModule.info))
            let identity = info.firstChild(name: "identity", namespace: DiscoModule.info)
            #expect(identity?.attribute("category") == "store" && identity?.attribute("type") == "file")
            #expect(info.children(name: "feature", namespace: DiscoModule.info).contains { $0.attribute("var") == Self.namespace })
            let form = try #require(info.firstChild(name: "x", namespace: "jabber:x:data"))
            let fields = Dictionary(form.children(name: "field", namespace: "jabber:x:data").map {
                ($0.attribute("var") ?? "", $0.firstChild(name: "value", namespace: "jabber:x:data")?.text ?? "")
            }, uniquingKeysWith: { first, _ in first })
            #expect(fields["FORM_TYPE"] == Self.namespace)
            #expect(fields["max-file-size"] == "5000000")
            await alice.close()
        }
    }

    // MARK: Slots

    @Test("A slot gives PUT and GET URLs under the base URL, signed, with the file name percent-encoded")
    func slotAnswer() async throws {
        try await withServer(configure: { $0.upload.baseURL = "https://files.provider.example/" }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let slot = try await Self.slot(alice, filename: "holiday photo ü.jpg", size: 1234)
            #expect(slot.put.hasPrefix("https://files.provider.example/upload/"))
            #expect(slot.get.hasPrefix("https://files.provider.example/upload/"))
            #expect(slot.put.hasSuffix("/holiday%20photo%20%C3%BC.jpg"))
            #expect(slot.put != slot.get)
            let put = try #require(UploadHTTP.parse(path: String(slot.put.dropFirst("https://files.provider.example".count))))
            let get = try #require(UploadHTTP.parse(path: String(slot.get.dropFirst("https://files.provider.example".count))))
            #expect(put.id == get.id && put.signature != get.signature && put.filename == "holiday photo ü.jpg")
            await alice.close()
        }
    }

    @Test("The default base URL: the provider host name or the service domain, with the HTTPS port unless 443")
    func defaultBaseURL() {
        let module = UploadModule(configuration: BraidConfiguration())
        var admin = BraidConfiguration().admin
        admin.poshPort = 443
        #expect(module.baseURL(service: "upload.a.example", admin: admin) == "https://upload.a.example")
        admin.poshPort = 8443
        #expect(module.baseURL(service: "upload.a.example", admin: admin) == "https://upload.a.example:8443")
        admin.poshHostName = "xmpp.provider.example"
        #expect(module.baseURL(service: "upload.a.example", admin: admin) == "https://xmpp.provider.example:8443")
        // Port 0: the port the listener was given, once it has one.
        admin.poshPort = 0
        #expect(module.baseURL(service: "upload.a.example", admin: admin, boundPort: 40123) == "https://xmpp.provider.example:40123")
        #expect(module.baseURL(service: "upload.a.example", admin: admin, boundPort: nil) == nil)
        admin.poshPort = nil
        #expect(module.baseURL(service: "upload.a.example", admin: admin) == nil)
        #expect(module.baseURL(service: "upload.a.example", admin: admin, boundPort: 40123) == nil, "no listener configured")
    }

    @Test("With posh_port 0 and no base_url, slots name the port the HTTPS listener was given, and the PUT and GET work there")
    func ephemeralPortBaseURL() async throws {
        try await withServer { server in
            let port = try #require(server.server.adminPorts.posh)
            #expect(port > 0)
            let (client, _) = try await server.loggedIn("alice@a.example")
            let slot = try await Self.slot(client, filename: "note.txt", size: 5, contentType: "text/plain")
            let base = "https://upload.a.example:\(port)"
            #expect(slot.put.hasPrefix(base + "/"), "\(slot.put)")
            #expect(slot.get.hasPrefix(base + "/"), "\(slot.get)")
            // upload.a.example is not in DNS here: the same URLs on loopback.
            let loopback = { (url: String) in "https://127.0.0.1:\(port)" + url.dropFirst(base.count) }
            var tls = TLSConfiguration.makeClientConfiguration()
            // The test server's certificates are self-signed.
            tls.certificateVerification = .none
            let http = HTTPClient(eventLoopGroupProvider: .shared(server.group), configuration: .init(tlsConfiguration: tls))
            do {
                let bytes = Array("hello".utf8)
                #expect(try await Self.put(http, loopback(slot.put), bytes, contentType: "text/plain").status == .created)
                let fetched = try await Self.send(http, .GET, loopback(slot.get))
                #expect(fetched.status == .ok)
                #expect(fetched.body == bytes)
            } catch {
                try? await http.shutdown()
                await client.close()
                throw error
            }
            try await http.shutdown()
            await client.close()
        }
    }

    @Test("Refused slots: other domains' users not-allowed; bad input bad-request; too large with max-file-size")
    func slotErrors() async throws {
        try await withServer(configure: { $0.upload.maxFileSize = 10_000; $0.upload.baseURL = Self.base }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            // bob is on b.example: upload.a.example is not his.
            #expect(try await Self.refusal(bob, Self.request()).condition == "not-allowed")
            // His own domain's service gives him one.
            _ = try await Self.slot(bob, to: "upload.b.example", size: 10)
            for (request, why) in [
                (Self.request(filename: nil), "no filename"), (Self.request(filename: ""), "empty filename"),
                (Self.request(filename: "a/b.jpg"), "a slash"), (Self.request(filename: "a\u{85}b.jpg"), "a control character (XML 1.0 allows C1 controls)"),
                (Self.request(filename: ".."), "a relative path"), (Self.request(filename: String(repeating: "x", count: 300)), "too long"),
                (Self.request(size: nil), "no size"), (Self.request(size: "-5"), "negative size"), (Self.request(size: "0"), "zero size"),
                (Self.request(size: "12abc"), "not a number"), (Self.request(size: "1e3"), "an exponent"),
                (Self.request(contentType: "image"), "no subtype"), (Self.request(contentType: "image/jpeg\u{7F}"), "DEL in the type"),
            ] {
                let refused = try await Self.refusal(alice, request)
                #expect(refused.condition == "bad-request", "\(why)")
            }
            #expect(try await Self.refusal(alice, Self.request(), type: .set).condition == "bad-request")
            let tooLarge = try await Self.refusal(alice, Self.request(size: "10001"))
            #expect(tooLarge.condition == "not-acceptable" && tooLarge.type == "modify")
            #expect(tooLarge.extra?.name == "file-too-large")
            #expect(tooLarge.extra?.firstChild(name: "max-file-size", namespace: Self.namespace)?.text == "10000")
            // Exactly the limit is fine.
            _ = try await Self.slot(alice, size: 10_000)
            await alice.close()
            await bob.close()
        }
    }

    @Test("Quotas: per account, per domain, per day; resource-constraint (wait) with a retry stamp when waiting helps; slots per minute")
    func quotas() async throws {
        try await withServer(configure: { upload in
            upload.upload.quotaBytesPerAccount = 1000
            upload.upload.quotaBytesPerDomain = 1500
            upload.upload.bytesPerDayPerAccount = 0
            upload.upload.slotsPerMinute = 0
            upload.upload.baseURL = Self.base
        }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            _ = try await Self.slot(alice, size: 600)
            // Unused slots count until their PUT URL expires: that is when waiting helps.
            let account = try await Self.refusal(alice, Self.request(size: "500"))
            #expect(account.condition == "resource-constraint" && account.type == "wait")
            #expect(account.extra?.name == "retry" && account.extra?.attribute("stamp") != nil)
            // More than the quota can ever hold: no retry.
            let never = try await Self.refusal(alice, Self.request(size: "1001"))
            #expect(never.condition == "resource-constraint" && never.extra == nil)
            _ = try await Self.slot(carol, size: 800)
            // carol is within her own quota, but a.example now has 1,400 of 1,500.
            #expect(try await Self.refusal(carol, Self.request(size: "200")).condition == "resource-constraint")
            _ = try await Self.slot(carol, size: 100)
            await alice.close()
            await carol.close()
        }
        try await withServer(configure: { $0.upload.bytesPerDayPerAccount = 1000; $0.upload.slotsPerMinute = 0; $0.upload.baseURL = Self.base }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            _ = try await Self.slot(alice, size: 700)
            let daily = try await Self.refusal(alice, Self.request(size: "400"))
            #expect(daily.condition == "resource-constraint")
            let stamp = try #require(daily.extra?.attribute("stamp"))
            // A day after the first slot.
            let tomorrow = MessageService.timestamp(millisecondsSince1970: Int64(Date().addingTimeInterval(86_400).timeIntervalSince1970) * 1000)
            #expect(stamp.prefix(13) == tomorrow.prefix(13), "\(stamp) vs \(tomorrow)")
            await alice.close()
        }
        try await withServer(configure: { $0.upload.slotsPerMinute = 3; $0.upload.baseURL = Self.base }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            for _ in 0..<3 { _ = try await Self.slot(alice, size: 10) }
            let limited = try await Self.refusal(alice, Self.request(size: "10"))
            #expect(limited.condition == "resource-constraint" && limited.type == "wait")
            #expect(limited.extra?.name == "retry")
            // Another account has its own allowance.
            let (carol, _) = try await server.loggedIn("carol@a.example")
            _ = try await Self.slot(carol, size: 10)
            #expect(server.metrics.counterValue("braid_upload_slots_total", [("outcome", "rate-limited")]) == 1)
            await alice.close()
            await carol.close()
        }
    }

    @Test("Retry stamps: the time enough reserved or stored bytes stop counting")
    func retryComputation() {
        let t0 = Date(timeIntervalSince1970: 1_000_000)
        let entries: [(size: Int, until: Date?)] = [(400, t0.addingTimeInterval(30)), (300, t0.addingTimeInterval(10)), (200, nil)]
        #expect(UploadService.overQuota(entries, adding: 100, limit: 1000, what: "q") == nil)
        #expect(UploadService.overQuota(entries, adding: 200, limit: 1000, what: "q") == .quota("over the q", retry: t0.addingTimeInterval(10)))
        #expect(UploadService.overQuota(entries, adding: 600, limit: 1000, what: "q") == .quota("over the q", retry: t0.addingTimeInterval(30)))
        #expect(UploadService.overQuota(entries, adding: 900, limit: 1000, what: "q") == .quota("over the q", retry: nil))
        #expect(UploadService.overQuota(entries, adding: 1001, limit: 1000, what: "q") == .quota("the file is larger than the q", retry: nil))
    }

    // MARK: HTTP

    @Test("PUT then GET through the HTTPS listener: the same bytes, nosniff, a sandboxing CSP, CORS; HEAD; a single range")
    func putThenGet() async throws {
        try await withUploadServer { server, http in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let bytes = Self.randomBytes(300_000)
            let slot = try await Self.slot(alice, size: bytes.count)
            let stored = try await Self.put(http, Self.local(slot.put, server), bytes)
            #expect(stored.status == .created)
            #expect(stored.headers["Access-Control-Allow-Origin"] == ["*"])
            let got = try await Self.send(http, .GET, Self.local(slot.get, server))
            #expect(got.status == .ok)
            #expect(got.body == bytes)
            #expect(got.headers["Content-Type"] == ["image/jpeg"])
            #expect(got.headers["Content-Disposition"].isEmpty)
            #expect(got.headers["X-Content-Type-Options"] == ["nosniff"])
            #expect(got.headers["Content-Security-Policy"] == ["default-src 'none'; sandbox"])
            #expect(got.headers["Access-Control-Allow-Origin"] == ["*"])
            let head = try await Self.send(http, .HEAD, Self.local(slot.get, server))
            #expect(head.status == .ok && head.body.isEmpty && head.headers["Content-Length"] == [String(bytes.count)])
            let part = try await Self.send(http, .GET, Self.local(slot.get, server), headers: [("Range", "bytes=1000-1999")])
            #expect(part.status == .partialContent)
            #expect(part.body == Array(bytes[1000...1999]))
            #expect(part.headers["Content-Range"] == ["bytes 1000-1999/\(bytes.count)"])
            let suffix = try await Self.send(http, .GET, Self.local(slot.get, server), headers: [("Range", "bytes=-10")])
            #expect(suffix.status == .partialContent && suffix.body == Array(bytes.suffix(10)))
            let open = try await Self.send(http, .GET, Self.local(slot.get, server), headers: [("Range", "bytes=299990-")])
            #expect(open.status == .partialContent && open.body == Array(bytes.suffix(10)))
            let beyond = try await Self.send(http, .GET, Self.local(slot.get, server), headers: [("Range", "bytes=300000-")])
            #expect(beyond.status == .rangeNotSatisfiable && beyond.headers["Content-Range"] == ["bytes */300000"])
            let preflight = try await Self.send(http, .OPTIONS, Self.local(slot.put, server), headers: [("Origin", "https://web.example"), ("Access-Control-Request-Method", "PUT")])
            #expect(preflight.status == .noContent)
            #expect(preflight.headers["Access-Control-Allow-Methods"].first?.contains("PUT") == true)
            #expect(preflight.headers["Access-Control-Allow-Headers"] == ["Content-Type"])
            #expect(server.metrics.counterValue("braid_upload_puts_total", [("outcome", "stored")]) == 1)
            await alice.close()
        }
    }

    @Test("Content types: the safe list served as declared, everything else (SVG, HTML, none) as an attachment")
    func contentTypes() async throws {
        try await withUploadServer { server, http in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            for (type, served) in [("image/png", "image/png"), ("text/plain; charset=utf-8", "text/plain; charset=utf-8"), ("application/pdf", "application/pdf"),
                                   ("video/mp4", "video/mp4"), ("image/svg+xml", nil), ("text/html", nil), ("application/javascript", nil), (nil, nil)] as [(String?, String?)] {
                let bytes = Array("<script>alert(1)</script>".utf8)
                let slot = try await Self.slot(alice, filename: "f ile", size: bytes.count, contentType: type)
                #expect(try await Self.put(http, Self.local(slot.put, server), bytes, contentType: type).status == .created)
                let got = try await Self.send(http, .GET, Self.local(slot.get, server))
                #expect(got.body == bytes)
                #expect(got.headers["X-Content-Type-Options"] == ["nosniff"])
                if let served {
                    #expect(got.headers["Content-Type"] == [served], "\(type ?? "none")")
                    #expect(got.headers["Content-Disposition"].isEmpty)
                } else {
                    #expect(got.headers["Content-Type"] == ["application/octet-stream"], "\(type ?? "none")")
                    #expect(got.headers["Content-Disposition"] == ["attachment; filename*=UTF-8''f%20ile"], "\(type ?? "none")")
                }
            }
            await alice.close()
        }
    }

    @Test("PUT refusals: forged signature or id 403, a GET URL used to PUT 403, wrong paths 404, no slot 404, a used slot 409")
    func putForgery() async throws {
        try await withUploadServer { server, http in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let bytes = Self.randomBytes(100)
            let slot = try await Self.slot(alice, size: bytes.count)
            let put = try Self.local(slot.put, server)
            var parts = put.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
            // https: '' host upload ID SIGNATURE NAME
            let signature = parts[5]
            parts[5] = String(signature.dropLast()) + (signature.hasSuffix("A") ? "B" : "A")
            #expect(try await Self.put(http, parts.joined(separator: "/"), bytes).status == .forbidden)
            parts[5] = signature
            parts[6] = "other.jpg"
            #expect(try await Self.put(http, parts.joined(separator: "/"), bytes).status == .forbidden)
            // Another slot's id with this signature.
            parts[6] = "photo.jpg"
            parts[4] = UploadID.random().value
            #expect(try await Self.put(http, parts.joined(separator: "/"), bytes).status == .forbidden)
            // The GET URL does not allow a PUT.
            #expect(try await Self.put(http, Self.local(slot.get, server), bytes).status == .forbidden)
            let port = try #require(server.server.adminPorts.posh)
            for path in ["/upload/../../etc/passwd", "/upload/%2e%2e/%2e%2e/signing.key", "/upload/short/sig/name", "/upload/a/b", "/uploads/x"] {
                let status = try await Self.put(http, "https://127.0.0.1:\(port)\(path)", bytes).status
                #expect(status == .notFound || status == .forbidden, "\(path): \(status)")
            }
            // Nothing was stored by any of that, and the real URL still works, once.
            #expect(try await Self.put(http, put, bytes).status == .created)
            #expect(try await Self.put(http, put, bytes).status == .conflict)
            #expect(try await Self.send(http, .GET, Self.local(slot.get, server)).body == bytes)
            // A GET with a wrong signature is refused; an unknown file is not found.
            var getParts = try Self.local(slot.get, server).split(separator: "/", omittingEmptySubsequences: false).map(String.init)
            getParts[5] = signature
            #expect(try await Self.send(http, .GET, getParts.joined(separator: "/")).status == .forbidden)
            getParts[4] = UploadID.random().value
            #expect(try await Self.send(http, .GET, getParts.joined(separator: "/")).status == .notFound)
            await alice.close()
        }
    }

    @Test("PUT head checks before the body: no Content-Length 411, larger 413 (the body never sent), different 400, wrong Content-Type 400; the slot stays usable")
    func putHeadChecks() async throws {
        try await withUploadServer { server, http in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let bytes = Self.randomBytes(1000)
            let slot = try await Self.slot(alice, size: bytes.count)
            let put = try Self.local(slot.put, server)
            // Chunked: no length.
            let chunked = HTTPClientRequest.Body.stream(AsyncStream<ByteBuffer> { continuation in
                continuation.yield(ByteBuffer(bytes: bytes))
                continuation.finish()
            }, length: .unknown)
            #expect(try await Self.send(http, .PUT, put, headers: [("Content-Type", "image/jpeg")], body: chunked).status == .lengthRequired)
            // Larger: answered although the body never comes.
            let (never, continuation) = AsyncStream<ByteBuffer>.makeStream()
            let tooLarge = try await Self.send(http, .PUT, put, headers: [("Content-Type", "image/jpeg")], body: .stream(never, length: .known(Int64(1_000_000_000))))
            continuation.finish()
            #expect(tooLarge.status.code == 413)
            #expect(try await Self.put(http, put, Array(bytes.prefix(999))).status == .badRequest)
            #expect(try await Self.put(http, put, bytes, contentType: "image/png").status == .badRequest)
            #expect(try await Self.put(http, put, bytes, contentType: nil).status == .badRequest)
            #expect(try await Self.put(http, put, bytes).status == .created)
            #expect(try await Self.send(http, .GET, Self.local(slot.get, server)).body == bytes)
            #expect(server.metrics.counterValue("braid_upload_puts_total", [("outcome", "too-large")]) == 1)
            await alice.close()
        }
    }

    @Test("A sender that stops mid-body is cut off (put_idle_seconds), nothing is stored, and the slot can be used again")
    func slowSender() async throws {
        try await withUploadServer({ $0.upload.putIdleSeconds = 1 }) { server, http in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let bytes = Self.randomBytes(2000)
            let slot = try await Self.slot(alice, size: bytes.count)
            let put = try Self.local(slot.put, server)
            let (half, continuation) = AsyncStream<ByteBuffer>.makeStream()
            continuation.yield(ByteBuffer(bytes: bytes.prefix(1000)))
            let started = ContinuousClock.now
            let outcome: HTTPResponseStatus?
            do {
                outcome = try await Self.send(http, .PUT, put, headers: [("Content-Type", "image/jpeg")], body: .stream(half, length: .known(Int64(bytes.count)))).status
            } catch {
                // The server may close the connection instead of answering.
                outcome = nil
            }
            continuation.finish()
            #expect(outcome == nil || outcome == .requestTimeout)
            #expect(ContinuousClock.now - started < .seconds(20))
            #expect(try await Self.eventually { server.metrics.counterValue("braid_upload_puts_total", [("outcome", "timeout")]) == 1 })
            #expect(try await Self.send(http, .GET, Self.local(slot.get, server)).status == .notFound)
            #expect(try await Self.put(http, put, bytes).status == .created)
            await alice.close()
        }
    }

    @Test("GET URLs survive a restart (the signing key is kept in the upload directory)")
    func restart() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-test-\(UUID().uuidString)").path
        let configure: (inout BraidConfiguration) -> Void = { $0.upload.baseURL = Self.base }
        let first = try await TestServer.start(directory: directory, configure: configure)
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .none
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: tls))
        let bytes = Self.randomBytes(5000)
        let get: String
        do {
            let (alice, _) = try await first.loggedIn("alice@a.example")
            let slot = try await Self.slot(alice, size: bytes.count)
            #expect(try await Self.put(http, Self.local(slot.put, first), bytes).status == .created)
            get = slot.get
            await alice.close()
        } catch {
            await first.stop()
            try? await http.shutdown()
            throw error
        }
        await first.stopKeepingData()
        let second: TestServer
        do {
            second = try await TestServer.start(users: [], directory: directory, configure: configure)
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            try? await http.shutdown()
            throw error
        }
        do {
            #expect(try await Self.send(http, .GET, Self.local(get, second)).body == bytes)
        } catch {
            Issue.record(error)
        }
        await second.stop()
        try await http.shutdown()
    }

    // MARK: Cleanup

    @Test("Cleanup with an injected clock: expired files go, per-domain retention applies, pending slots lapse, expired PUT URLs are refused")
    func expiry() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-upload-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let clock = Mutex(Date(timeIntervalSince1970: 1_700_000_000))
        var settings = BraidConfiguration.UploadSettings()
        settings.retentionDays = 30
        settings.domainRetentionDays = ["b.example": 1]
        settings.putURLSeconds = 300
        let service = UploadService(settings: settings, directory: directory, now: { clock.withLock { $0 } })
        let signer = try await service.prepare()
        func upload(_ account: String, _ domain: String) async throws -> UploadRecord {
            let record = try service.requestSlot(SlotRequest(filename: "f.txt", size: 3, contentType: "text/plain"), account: account, domain: domain).get()
            let id = try #require(record.uploadID)
            #expect(service.beginPut(id: id, signature: signer.signature(.put, for: record), filename: "f.txt", signer: signer) == .accept(record))
            try await service.store.write(record, from: AsyncThrowingStream<ByteBuffer, any Error> { $0.yield(ByteBuffer(string: "abc")); $0.finish() }, progress: {})
            service.finishPut(id, stored: true)
            return record
        }
        let a = try await upload("alice@a.example", "a.example")
        let b = try await upload("bob@b.example", "b.example")
        let unused = try service.requestSlot(SlotRequest(filename: "g.txt", size: 3, contentType: nil), account: "alice@a.example", domain: "a.example").get()
        #expect(service.pendingCount == 1)
        let everything: Set<String> = ["a.example", "b.example"]
        // Six minutes on: the unused slot's PUT URL has expired.
        clock.withLock { $0 = $0.addingTimeInterval(360) }
        let unusedID = try #require(unused.uploadID)
        #expect(service.beginPut(id: unusedID, signature: signer.signature(.put, for: unused), filename: "g.txt", signer: signer) == .forbidden("PUT URL expired"))
        #expect(await service.sweep(hostedDomains: everything) { _ in true } == .init())
        #expect(service.pendingCount == 0)
        // Two days on: b.example keeps files one day.
        clock.withLock { $0 = $0.addingTimeInterval(2 * 86_400) }
        #expect(service.authorizeGet(id: try #require(b.uploadID), signature: signer.signature(.get, for: b), filename: "f.txt", signer: signer) == .notFound)
        #expect(await service.sweep(hostedDomains: everything) { _ in true } == .init(expired: 1))
        #expect(service.store.record(try #require(b.uploadID)) == nil)
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/files/\(b.id.prefix(2))/\(b.id)"))
        #expect(service.authorizeGet(id: try #require(a.uploadID), signature: signer.signature(.get, for: a), filename: "f.txt", signer: signer) == .serve(a))
        // Thirty-one days: a.example's file goes too.
        clock.withLock { $0 = $0.addingTimeInterval(29 * 86_400) }
        #expect(await service.sweep(hostedDomains: everything) { _ in true } == .init(expired: 1))
        #expect(service.store.all().isEmpty)
        #expect(service.store.usage(account: "alice@a.example") == 0 && service.store.usage(domain: "a.example") == 0)
    }

    @Test("Files of a removed account or domain are deleted by the cleanup; a removed domain's files are not served meanwhile")
    func removal() async throws {
        try await withUploadServer({ $0.upload.cleanupIntervalSeconds = 0.1 }) { server, http in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            var gets: [String: String] = [:]
            for (client, name, service) in [(alice, "alice", "upload.a.example"), (carol, "carol", "upload.a.example"), (bob, "bob", "upload.b.example")] {
                let slot = try await Self.slot(client, to: service, size: 4)
                #expect(try await Self.put(http, Self.local(slot.put, server), Array("data".utf8)).status == .created)
                gets[name] = try Self.local(slot.get, server)
            }
            await alice.close()
            await bob.close()
            let files = server.directory + "/uploads/files"
            func stored() -> Int {
                ((try? FileManager.default.subpathsOfDirectory(atPath: files)) ?? []).filter { $0.hasSuffix(".json") }.count
            }
            #expect(stored() == 3)
            try await server.context.storage.removeUser(try JID("alice@a.example"))
            #expect(try await Self.eventually { try await Self.send(http, .GET, #require(gets["alice"])).status == .notFound })
            #expect(try await Self.eventually { stored() == 2 })
            #expect(try await Self.send(http, .GET, #require(gets["carol"])).status == .ok)
            try await server.context.storage.removeDomain("b.example")
            #expect(try await Self.eventually { try await Self.send(http, .GET, #require(gets["bob"])).status == .notFound })
            #expect(try await Self.eventually { stored() == 1 })
            #expect(try await Self.send(http, .GET, #require(gets["carol"])).status == .ok)
            // bob's file goes with his domain; a cleanup that read the domains just before the
            // removal and asked about bob just after counts it under his account instead.
            let byAccount = server.metrics.counterValue("braid_upload_files_removed_total", [("reason", "account")])
            let byDomain = server.metrics.counterValue("braid_upload_files_removed_total", [("reason", "domain")])
            #expect(byAccount >= 1 && byAccount + byDomain == 2, "account \(byAccount), domain \(byDomain)")
            await carol.close()
        }
    }

    // MARK: Pieces

    @Test("Ranges: one bytes range, suffix and open ranges; several ranges or nonsense get the whole file; unsatisfiable ones 416")
    func ranges() {
        #expect(UploadHTTP.range(nil, size: 100) == .whole)
        #expect(UploadHTTP.range("bytes=0-9", size: 100) == .part(0...9))
        #expect(UploadHTTP.range("bytes=90-200", size: 100) == .part(90...99))
        #expect(UploadHTTP.range("bytes=50-", size: 100) == .part(50...99))
        #expect(UploadHTTP.range("bytes=-30", size: 100) == .part(70...99))
        #expect(UploadHTTP.range("bytes=-300", size: 100) == .part(0...99))
        #expect(UploadHTTP.range("bytes=100-", size: 100) == .unsatisfiable)
        #expect(UploadHTTP.range("bytes=-0", size: 100) == .unsatisfiable)
        #expect(UploadHTTP.range("bytes=0-1,5-6", size: 100) == .whole)
        #expect(UploadHTTP.range("items=0-1", size: 100) == .whole)
        #expect(UploadHTTP.range("bytes=5-1", size: 100) == .whole)
        #expect(UploadHTTP.range("bytes=a-b", size: 100) == .whole)
    }

    @Test("Slot ids: exactly 22 base64url characters; paths are parsed only in their one shape")
    func identifiers() {
        #expect(UploadID(UploadID.random().value) != nil)
        #expect(UploadID("../../../../etc/passwd") == nil)
        #expect(UploadID("abcdefghijklmnopqrstu/") == nil)
        #expect(UploadID("abcdefghijklmnopqrstu") == nil)
        #expect(UploadHTTP.parse(path: "/upload/abcdefghijklmnopqrstuv/sig/a%20b") != nil)
        #expect(UploadHTTP.parse(path: "/upload/abcdefghijklmnopqrstuv/sig/a/b") == nil)
        #expect(UploadHTTP.parse(path: "/upload/..%2F..%2Fetc/sig/passwd") == nil)
        #expect(UploadHTTP.percentEncode("a b/ü%") == "a%20b%2F%C3%BC%25")
    }
}
