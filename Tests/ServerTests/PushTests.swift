import Foundation
import Storage
import Synchronization
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// A push app server for tests (XEP-0357 §4): `appserver.DOMAIN` records each publish and
/// answers it with a result, or with an error while `failing` is set.
final class AppServer: BraidModule, Sendable {
    private let received = Mutex<[XMLElement]>([])
    let failing = Atomic<Bool>(false)
    var name: String { "appserver" }
    var publishes: [XMLElement] { received.withLock { $0 } }

    func register(in builder: inout ModuleBuilder) {
        builder.service(ServiceRegistration(label: "appserver", category: "pubsub", type: "push", displayName: "App server", features: [PushModule.namespace]) { service in
            guard let iq = IQ(service.stanza), iq.type == .set, let payload = iq.payload else { return }
            self.received.withLock { $0.append(payload) }
            if self.failing.load(ordering: .relaxed) {
                await service.bounce(with: StanzaError(.itemNotFound))
            } else {
                await service.send(iq.result(payload: nil).stanza)
            }
        })
    }
}

@Suite("Push notifications (XEP-0357)")
struct PushTests {
    static func enable(node: String, secret: String) -> XMLElement {
        XMLElement(name: "enable", namespace: PushModule.namespace, attributes: [XMLAttribute("jid", "appserver.a.example"), XMLAttribute("node", node)], children: [
            .element(PushModule.form(PubSubNamespace.publishOptions, ["secret": [secret]])),
        ])
    }

    static func fields(_ form: XMLElement?) -> [String: [String]] {
        var fields: [String: [String]] = [:]
        for field in form?.children(name: "field", namespace: "jabber:x:data") ?? [] {
            guard let name = field.attribute("var") else { continue }
            fields[name] = field.children(name: "value", namespace: "jabber:x:data").map(\.text)
        }
        return fields
    }

    @Test("A message for an account whose devices are all gone reaches each registered app server as a count, with the secret; no sender or body by default; disable stops it")
    func notifiesOfflineMessages() async throws {
        let app = AppServer()
        try await withServer(modules: [app]) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await alice.iq(.set, payload: Self.enable(node: "device-1", secret: "s3cr3t")).attribute("type") == "result")
            await alice.close()
            try await waitUntil(timeout: .seconds(10), "alice's session gone") { server.context.sessions.entries(of: try JID("alice@a.example")).isEmpty }
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendMessage(to: "alice@a.example", body: "secret plans", id: "m1")
            try await waitUntil(timeout: .seconds(10), "a notification at the app server") { app.publishes.count == 1 }
            let publish = try #require(app.publishes.first)
            #expect(publish.firstChild(name: "publish", namespace: PubSubNamespace.pubsub)?.attribute("node") == "device-1")
            let notification = publish.firstChild(name: "publish", namespace: PubSubNamespace.pubsub)?.firstChild(name: "item", namespace: PubSubNamespace.pubsub)?
                .firstChild(name: "notification", namespace: PushModule.namespace)
            let summary = Self.fields(notification?.firstChild(name: "x", namespace: "jabber:x:data"))
            #expect(summary["FORM_TYPE"] == [PushModule.summary] && summary["message-count"] == ["1"])
            #expect(summary["last-message-body"] == nil && summary["last-message-sender"] == nil, "nothing private by default")
            #expect(Self.fields(publish.firstChild(name: "publish-options", namespace: PubSubNamespace.pubsub)?.firstChild(name: "x", namespace: "jabber:x:data"))["secret"] == ["s3cr3t"])
            // A second message: the count grows.
            try await bob.sendMessage(to: "alice@a.example", body: "more", id: "m2")
            try await waitUntil(timeout: .seconds(10), "a second notification") { app.publishes.count == 2 }
            let second = app.publishes.last?.firstChild(name: "publish", namespace: PubSubNamespace.pubsub)?.firstChild(name: "item", namespace: PubSubNamespace.pubsub)?
                .firstChild(name: "notification", namespace: PushModule.namespace)?.firstChild(name: "x", namespace: "jabber:x:data")
            #expect(Self.fields(second)["message-count"] == ["2"])
            // Disabled: nothing more.
            let (again, _) = try await server.loggedIn("alice@a.example")
            #expect(try await again.iq(.set, payload: XMLElement(name: "disable", namespace: PushModule.namespace, attributes: [XMLAttribute("jid", "appserver.a.example")])).attribute("type") == "result")
            await again.close()
            try await waitUntil(timeout: .seconds(10), "alice's session gone") { server.context.sessions.entries(of: try JID("alice@a.example")).isEmpty }
            try await bob.sendMessage(to: "alice@a.example", body: "anyone?", id: "m3")
            // The message is stored (a round trip through the offline store), and no third push.
            try await waitUntil(timeout: .seconds(10), "stored offline") { try await server.context.storage.offlineMessageCount(for: try JID("alice@a.example")) >= 3 }
            _ = try await bob.iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
            #expect(app.publishes.count == 2)
            await bob.close()
        }
    }

    @Test("An app server that keeps answering with errors loses its registration (§7); only the account registers")
    func errorsDropTheRegistration() async throws {
        let app = AppServer()
        app.failing.store(true, ordering: .relaxed)
        try await withServer(modules: [app], configure: { $0.push.maxErrors = 2 }) { server in
            let (alice, _) = try await server.loggedIn("alice@a.example")
            #expect(try await alice.iq(.set, payload: Self.enable(node: "d", secret: "x")).attribute("type") == "result")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            #expect(try await bob.iq(.set, to: "alice@a.example", payload: Self.enable(node: "evil", secret: "x")).attribute("type") == "error")
            await alice.close()
            try await waitUntil(timeout: .seconds(10), "alice's session gone") { server.context.sessions.entries(of: try JID("alice@a.example")).isEmpty }
            for index in 1...2 {
                try await bob.sendMessage(to: "alice@a.example", body: "ping \(index)", id: "p\(index)")
                try await waitUntil(timeout: .seconds(10), "publish \(index)") { app.publishes.count == index }
            }
            try await waitUntil(timeout: .seconds(10), "the registration dropped") {
                try await server.context.storage.storeEntries("push", of: try JID("alice@a.example")).isEmpty
            }
            await bob.close()
        }
    }

    @Test("Over federation: the app server is an entity of another provider (a client at b.example); it gets the publish over the link and its answer comes back, so the registration stays")
    func appServerAcrossFederation() async throws {
        try await withFederation(aUsers: ["alice@a.example", "carol@a.example"], bUsers: ["bob@b.example"]) { pair in
            let (app, appJID) = try await pair.b.loggedIn("bob@b.example")
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let enable = XMLElement(name: "enable", namespace: PushModule.namespace, attributes: [XMLAttribute("jid", appJID.description), XMLAttribute("node", "phone")], children: [
                .element(PushModule.form(PubSubNamespace.publishOptions, ["secret": ["k"]])),
            ])
            #expect(try await alice.iq(.set, payload: enable).attribute("type") == "result")
            await alice.close()
            try await waitUntil(timeout: .seconds(10), "alice's session gone") { pair.a.context.sessions.entries(of: try JID("alice@a.example")).isEmpty }
            let (carol, _) = try await pair.a.loggedIn("carol@a.example")
            for index in 1...2 {
                try await carol.sendMessage(to: "alice@a.example", body: "message \(index)", id: "m\(index)")
                let publish = try await app.waitFor(timeout: .seconds(15)) { $0.name == "iq" && $0.attribute("type") == "set" }
                #expect(publish.attribute("from") == "alice@a.example")
                let published = publish.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)?.firstChild(name: "publish", namespace: PubSubNamespace.pubsub)
                #expect(published?.attribute("node") == "phone")
                let summary = Self.fields(published?.firstChild(name: "item", namespace: PubSubNamespace.pubsub)?
                    .firstChild(name: "notification", namespace: PushModule.namespace)?.firstChild(name: "x", namespace: "jabber:x:data"))
                #expect(summary["message-count"] == ["\(index)"])
                // The app server's answer goes back across the link to alice's bare JID.
                try await app.send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
                    XMLAttribute("type", "result"), XMLAttribute("id", publish.attribute("id") ?? ""), XMLAttribute("to", "alice@a.example"),
                ]))
            }
            // Answered with results: still registered, and no error came back to the app server.
            #expect(try await pair.a.context.storage.storeEntries("push", of: try JID("alice@a.example")).count == 1)
            #expect(await app.expectSilence() == nil)
            await carol.close()
            await app.close()
        }
    }
}
