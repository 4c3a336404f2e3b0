import Foundation
import Testing
import TestSupport
import XMPPCore
@testable import Server

/// External service discovery (XEP-0215): STUN and TURN for calls, TURN with coturn's
/// time-limited credentials.
@Suite("External services (XEP-0215)")
struct ExternalServicesTests {
    static let namespace = ExternalServicesModule.namespace

    @Test("coturn's REST API credentials: EXPIRY:USER and base64(HMAC-SHA1(secret, username)) (vector computed with Python's hmac)")
    func credentialScheme() {
        let (username, password) = ExternalServicesModule.credentials(secret: "s3cret", expiry: 1_800_086_400, user: "alice@a.example")
        #expect(username == "1800086400:alice@a.example")
        #expect(password == "SlWmK0N3tExQ2+iFXlD9rLkXKxg=")
    }

    @Test("The configured services, TURN with credentials that expire; filtered by type; credentials for one; only the server's own users ask")
    func services() async throws {
        try await withServer(configure: { configuration in
            configuration.externalServices.secret = "s3cret"
            configuration.externalServices.credentialSeconds = 600
            configuration.externalServices.services = [
                .init(type: "stun", host: "turn.provider.example", port: 3478, transport: "udp"),
                .init(type: "turn", host: "turn.provider.example", port: 3478, transport: "udp"),
            ]
        }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            let before = Int64(Date().timeIntervalSince1970)
            let answer = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "services", namespace: Self.namespace))
            let services = answer.firstChild(name: "services", namespace: Self.namespace)?.children(name: "service", namespace: Self.namespace) ?? []
            #expect(services.map { $0.attribute("type") } == ["stun", "turn"])
            #expect(services[0].attribute("username") == nil && services[0].attribute("restricted") == nil)
            let turn = services[1]
            #expect(turn.attribute("restricted") == "1")
            let username = try #require(turn.attribute("username"))
            let expiry = try #require(Int64(username.split(separator: ":").first ?? ""))
            #expect(username.hasSuffix(":alice@a.example"))
            #expect(expiry >= before + 600 && expiry <= before + 660)
            #expect(turn.attribute("password") == ExternalServicesModule.credentials(secret: "s3cret", expiry: expiry, user: "alice@a.example").password)
            #expect(turn.attribute("expires") != nil)
            // By type.
            let onlyTurn = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "services", namespace: Self.namespace, attributes: [XMLAttribute("type", "turn")]))
            #expect(onlyTurn.firstChild(name: "services", namespace: Self.namespace)?.children(name: "service", namespace: Self.namespace).count == 1)
            // Credentials for one service.
            let credentials = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "credentials", namespace: Self.namespace, children: [
                .element(XMLElement(name: "service", namespace: Self.namespace, attributes: [XMLAttribute("host", "turn.provider.example"), XMLAttribute("type", "turn")])),
            ]))
            #expect(credentials.firstChild(name: "credentials", namespace: Self.namespace)?.firstChild(name: "service", namespace: Self.namespace)?.attribute("username") != nil)
            let unknown = try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "credentials", namespace: Self.namespace, children: [
                .element(XMLElement(name: "service", namespace: Self.namespace, attributes: [XMLAttribute("host", "elsewhere.example")])),
            ]))
            #expect(unknown.attribute("type") == "error")
            // A user of another hosted domain asks its own domain, not this one.
            let (bob, _) = try await server.loggedIn("bob@b.example")
            #expect(try await bob.iq(.get, to: "a.example", payload: XMLElement(name: "services", namespace: Self.namespace)).attribute("type") == "error")
            await alice.close()
            await bob.close()
        }
        // Nothing configured: no feature, the namespace unknown.
        try await withServer { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await alice.iq(.get, to: "a.example", payload: XMLElement(name: "services", namespace: Self.namespace)).attribute("type") == "error")
            await alice.close()
        }
    }
}
