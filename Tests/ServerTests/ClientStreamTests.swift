import Foundation
import NIOCore
import Testing
import TestSupport
import XMPPCore
import XMPPStream
@testable import Server

/// Client streams over real loopback sockets with real TLS: negotiation, authentication,
/// binding, and the stream errors of RFC 6120.
@Suite("Client streams", .serialized)
struct ClientStreamTests {
    @Test("The first features offer only <starttls><required/></starttls>")
    func firstFeaturesRequireTLS() async throws {
        try await withServer { server in
            let client = try await server.client()
            try await client.sendHeader(to: "a.example")
            let features = try await client.nextElement()
            #expect(features.name == "features" && features.namespace == XMLNamespace.streams)
            #expect(features.children.count == 1)
            let starttls = features.firstChild(name: "starttls", namespace: XMLNamespace.tls)
            #expect(starttls?.firstChild(name: "required", namespace: XMLNamespace.tls) != nil)
            await client.close()
        }
    }

    @Test("Each SASL mechanism logs in and binds", arguments: ["SCRAM-SHA-256", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "PLAIN"])
    func mechanisms(mechanism: String) async throws {
        try await withServer { server in
            let (client, jid) = try await server.loggedIn("alice@a.example", resource: "phone", mechanism: mechanism)
            #expect(jid.description == "alice@a.example/phone")
            #expect(server.metrics.counterValue("braid_auth_successes_total", [("mechanism", mechanism)]) == 1)
            await client.close()
        }
    }

    @Test("SCRAM-*-PLUS binds to tls-exporter (TLS 1.3) or tls-server-end-point; tls-unique is refused with its RFC 5802 error",
          arguments: ["tls-exporter", "tls-server-end-point"])
    func channelBindingTypes(type: String) async throws {
        try await withServer { server in
            let (client, jid) = try await server.loggedIn("alice@a.example", resource: "cb", mechanism: "SCRAM-SHA-256-PLUS", bindingType: type)
            #expect(jid.description == "alice@a.example/cb")
            await client.close()
            // The other type's data under this type's name is another channel: refused.
            let crossed = try await server.client()
            try await crossed.sendHeader(to: "a.example")
            _ = try await crossed.nextElement()
            try await crossed.startTLS()
            try await crossed.sendHeader(to: "a.example")
            _ = try await crossed.nextElement()
            let wrongData = type == "tls-exporter" ? try await crossed.serverEndPoint() : try await crossed.exporter()
            var scram = SCRAMClient(hash: .sha256, username: "alice", password: TestServer.password,
                                    channelBinding: ChannelBinding(type: type, data: wrongData), clientSupportsChannelBinding: true)
            try await crossed.send(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "SCRAM-SHA-256-PLUS")],
                                              text: Base64.encode(try scram.clientFirstMessage())))
            let challenge = try await crossed.nextElement()
            let serverFirst = try #require(Base64.decode(challenge.text))
            try await crossed.send(XMLElement(name: "response", namespace: XMLNamespace.sasl, text: Base64.encode(try scram.serverFirstReceived(serverFirst))))
            let outcome = try await crossed.nextElement()
            #expect(outcome.name == "failure")
            #expect(outcome.firstChild(name: "not-authorized", namespace: XMLNamespace.sasl) != nil)
            // tls-unique (undefined on TLS 1.3): refused at once, with RFC 5802's error value.
            var unique = SCRAMClient(hash: .sha256, username: "alice", password: TestServer.password,
                                     channelBinding: ChannelBinding(type: "tls-unique", data: wrongData), clientSupportsChannelBinding: true)
            try await crossed.send(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "SCRAM-SHA-256-PLUS")],
                                              text: Base64.encode(try unique.clientFirstMessage())))
            let refused = try await crossed.nextElement()
            #expect(refused.name == "failure")
            #expect(refused.firstChild(name: "text", namespace: XMLNamespace.sasl)?.text == "e=unsupported-channel-binding-type")
            await crossed.close()
        }
    }

    @Test("Mechanisms offered after TLS put -PLUS first and include PLAIN; XEP-0440 names the binding")
    func offeredMechanisms() async throws {
        try await withServer { server in
            let client = try await server.client()
            try await client.sendHeader(to: "a.example")
            _ = try await client.nextElement()
            try await client.startTLS()
            try await client.sendHeader(to: "a.example")
            let features = try await client.nextElement()
            let mechanisms = features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.children(name: "mechanism", namespace: XMLNamespace.sasl).map(\.text)
            #expect(mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
            let bindings = features.firstChild(name: "sasl-channel-binding", namespace: "urn:xmpp:sasl-cb:0")?.elements.compactMap { $0.attribute("type") }
            #expect(bindings == ["tls-exporter", "tls-server-end-point"])
            await client.close()
        }
    }

    @Test("An error right after the TLS handshake or SASL success comes inside a new stream header (RFC 6120 §4.9.1.1)",
          arguments: ["tls", "sasl"])
    func errorOpensTheRestartedStream(restart: String) async throws {
        try await withServer { server in
            let client = try await server.client()
            try await client.sendHeader(to: "a.example")
            _ = try await client.nextElement()
            try await client.startTLS()
            if restart == "sasl" {
                try await client.sendHeader(to: "a.example")
                try await client.authenticate(features: try await client.nextElement(), username: "alice", password: TestServer.password, mechanism: "SCRAM-SHA-256")
            }
            // Not XML where the client's new header should be.
            try await client.sendRaw("<<")
            guard case .stream(.streamStart) = try await client.next() else { Issue.record("no stream header before the error"); return }
            #expect(try await client.streamErrorCondition() == .notWellFormed)
        }
    }

    @Test("Without mandatory TLS, PLAIN is not offered in the clear")
    func plainOnlyInsideTLS() async throws {
        try await withServer(configure: { $0.c2s.requireTLS = false }) { server in
            let client = try await server.client()
            try await client.sendHeader(to: "a.example")
            let features = try await client.nextElement()
            let mechanisms = features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.children(name: "mechanism", namespace: XMLNamespace.sasl).map(\.text)
            #expect(mechanisms == ["SCRAM-SHA-256", "SCRAM-SHA-1"])
            #expect(features.firstChild(name: "starttls", namespace: XMLNamespace.tls)?.firstChild(name: "required", namespace: XMLNamespace.tls) == nil)
            await client.close()
        }
    }

    @Test("A wrong password and an unknown account fail alike with not-authorized")
    func failuresLookAlike() async throws {
        try await withServer { server in
            for (user, password) in [("alice", "wrong"), ("nobody", TestServer.password)] {
                let client = try await server.client()
                do {
                    try await client.login(domain: "a.example", username: user, password: password)
                    Issue.record("\(user) logged in")
                } catch let failure as TestClient.SASLFailed {
                    #expect(failure.condition == "not-authorized", "\(user)")
                }
                await client.close()
            }
            // PLAIN, too.
            for user in ["alice", "nobody"] {
                let client = try await server.client()
                var options = TestClient.LoginOptions()
                options.mechanism = "PLAIN"
                do {
                    try await client.login(domain: "a.example", username: user, password: "wrong", options: options)
                    Issue.record("\(user) logged in with PLAIN")
                } catch let failure as TestClient.Failure {
                    #expect(failure.description.contains("not-authorized"), "\(user): \(failure)")
                }
                await client.close()
            }
            #expect(server.metrics.counterTotal("braid_auth_failures_total") == 4)
        }
    }

    @Test("Direct TLS (XEP-0368) picks the certificate by SNI and logs in")
    func directTLS() async throws {
        try await withServer { server in
            let client = try await server.client(directTLS: "b.example")
            let jid = try await client.login(domain: "b.example", username: "bob", password: TestServer.password, directTLS: true)
            #expect(jid.description == "bob@b.example/test")
            let certificate = try await client.channel.nioSSL_peerCertificate().get()
            #expect(try certificate.map { try String(describing: $0.toDERBytes().count) } != nil)
            #expect(server.context.certificates.covers("b.example"))
            await client.close()
        }
    }

    @Test("A bind without a resource gets a generated one")
    func generatedResource() async throws {
        try await withServer { server in
            let client = try await server.client()
            var options = TestClient.LoginOptions()
            options.resource = nil
            let jid = try await client.login(domain: "a.example", username: "alice", password: TestServer.password, options: options)
            #expect(jid.bare.description == "alice@a.example")
            #expect((jid.resourcepart?.count ?? 0) >= 8)
            await client.close()
        }
    }

    @Test("By default the newest session wins a resource; the old one gets <conflict/>")
    func conflictReplace() async throws {
        try await withServer { server in
            let (first, _) = try await server.loggedIn("alice@a.example", resource: "same")
            let (second, jid) = try await server.loggedIn("alice@a.example", resource: "same")
            #expect(jid.description == "alice@a.example/same")
            #expect(try await first.streamErrorCondition() == .conflict)
            await second.close()
        }
    }

    @Test("With the refuse policy the new bind fails with conflict")
    func conflictRefuse() async throws {
        try await withServer(configure: { $0.c2s.resourceConflict = .refuse }) { server in
            let (first, _) = try await server.loggedIn("alice@a.example", resource: "same")
            do {
                _ = try await server.loggedIn("alice@a.example", resource: "same")
                Issue.record("second bind succeeded")
            } catch let failure as TestClient.BindFailed {
                #expect(failure.condition == "conflict")
            }
            #expect(await first.expectSilence() == nil)
            await first.close()
        }
    }

    @Test("With the rename policy the new session gets another resource")
    func conflictRename() async throws {
        try await withServer(configure: { $0.c2s.resourceConflict = .rename }) { server in
            let (first, _) = try await server.loggedIn("alice@a.example", resource: "same")
            let (second, jid) = try await server.loggedIn("alice@a.example", resource: "same")
            #expect(jid.resourcepart?.hasPrefix("same-") == true)
            #expect(await first.expectSilence() == nil)
            await first.close()
            await second.close()
        }
    }

    @Test("A stream to an unhosted domain gets host-unknown, after a header")
    func hostUnknown() async throws {
        try await withServer { server in
            let client = try await server.client()
            try await client.sendHeader(to: "elsewhere.example")
            guard case .stream(.streamStart) = try await client.next() else {
                Issue.record("no header before the error")
                return
            }
            #expect(try await client.streamErrorCondition() == .hostUnknown)
            #expect(server.metrics.counterValue("braid_stream_errors_sent_total", [("condition", "host-unknown"), ("stream", "c2s")]) == 1)
        }
    }

    @Test("A pre-1.0 stream gets unsupported-version")
    func unsupportedVersion() async throws {
        try await withServer { server in
            let client = try await server.client()
            try await client.sendHeader(to: "a.example", version: nil)
            #expect(try await client.streamErrorCondition() == .unsupportedVersion)
        }
    }

    @Test("A stanza before authentication gets not-authorized and is not processed")
    func stanzaBeforeAuthentication() async throws {
        try await withServer { server in
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            // Bob's own presence comes back to him (RFC 6121 §4.2.2).
            _ = try await bob.waitFor { $0.name == "presence" }
            let client = try await server.client()
            try await client.sendHeader(to: "a.example")
            _ = try await client.nextElement()
            try await client.sendMessage(to: "bob@b.example", body: "sneaky")
            #expect(try await client.streamErrorCondition() == .notAuthorized)
            #expect(await bob.expectSilence() == nil)
            await bob.close()
        }
    }

    @Test("The server stamps the sender's full JID over a forged from")
    func fromStamping() async throws {
        try await withServer { server in
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", "bob@b.example"), XMLAttribute("from", "carol@a.example/forged"), XMLAttribute("type", "chat"),
            ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "hi"))]))
            let received = try await bob.waitFor { $0.name == "message" }
            #expect(received.attribute("from") == aliceJID.description)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A client's </stream> is answered with </stream>")
    func cleanClose() async throws {
        try await withServer { server in
            let (client, _) = try await server.loggedIn("alice@a.example")
            try await client.sendEnd()
            #expect(try await client.streamErrorCondition() == nil)
        }
    }

    @Test("A client that never finishes logging in gets connection-timeout when the negotiation time is up, not before")
    func negotiationTimeout() async throws {
        let time = ManualSessionClock()
        try await withServer(sessionClock: time.clock, configure: { $0.c2s.negotiationTimeoutSeconds = 30 }) { server in
            let client = try await server.client()
            try await client.sendHeader(to: "a.example")
            _ = try await client.nextElement()
            await time.advance(by: .seconds(29))
            #expect(await client.expectSilence(for: .milliseconds(100)) == nil)
            await time.advance(by: .seconds(2))
            #expect(try await client.streamErrorCondition() == .connectionTimeout)
        }
    }

    @Test("An idle client gets connection-timeout after idle_timeout_seconds; anything it sends starts the count again")
    func idleTimeout() async throws {
        let time = ManualSessionClock()
        // Checked every 15 s (half the keepalive interval); idle once over 60 s.
        try await withServer(sessionClock: time.clock, configure: { $0.c2s.idleTimeoutSeconds = 60; $0.c2s.keepaliveSeconds = 30 }) { server in
            let (quiet, _) = try await server.loggedIn("alice@a.example")
            let (talking, _) = try await server.loggedIn("bob@b.example")
            await time.advance(by: .seconds(45))
            try await talking.roundTrip()
            #expect(await quiet.expectSilence(for: .milliseconds(100)) == nil)
            // 76 s: the quiet client has sent nothing for more than 60 s, the other for 31 s.
            await time.advance(by: .seconds(31))
            #expect(try await quiet.streamErrorCondition() == .connectionTimeout)
            try await talking.roundTrip()
            // 135 s: 59 s since the other client's last stanza; 150 s: 74 s.
            await time.advance(by: .seconds(59))
            #expect(await talking.expectSilence(for: .milliseconds(100)) == nil)
            await time.advance(by: .seconds(15))
            #expect(try await talking.streamErrorCondition() == .connectionTimeout)
        }
    }

    @Test("A client over the stanza rate gets policy-violation; the bucket refills with time")
    func rateLimit() async throws {
        let time = ManualSessionClock()
        try await withServer(sessionClock: time.clock, configure: { $0.c2s.stanzasPerSecond = 1; $0.c2s.stanzaBurst = 5 }) { server in
            let (client, _) = try await server.loggedIn("alice@a.example")
            // The burst: four messages and the round trip's IQ, with no time passing.
            for index in 0..<4 {
                try await client.sendMessage(to: "alice@a.example", body: "\(index)", type: "headline")
            }
            try await client.roundTrip()
            // Three seconds give three more.
            await time.advance(by: .seconds(3))
            for index in 4..<6 {
                try await client.sendMessage(to: "alice@a.example", body: "\(index)", type: "headline")
            }
            try await client.roundTrip()
            // And no more without time passing.
            try await client.sendMessage(to: "alice@a.example", body: "over", type: "headline")
            #expect(try await client.streamErrorCondition() == .policyViolation)
        }
    }

    @Test("A stanza over the size limit gets policy-violation; another client is unaffected")
    func stanzaSizeLimit() async throws {
        try await withServer(configure: { $0.c2s.maxStanzaBytes = 10_000 }) { server in
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            let (client, _) = try await server.loggedIn("alice@a.example")
            try await client.sendMessage(to: "bob@b.example", body: String(repeating: "x", count: 12_000))
            #expect(try await client.streamErrorCondition() == .policyViolation)
            let (carol, _) = try await server.loggedIn("carol@a.example")
            try await carol.sendMessage(to: "bob@b.example", body: "still here")
            let message = try await bob.waitFor { $0.name == "message" }
            #expect(message.firstChild(name: "body", namespace: XMLNamespace.client)?.text == "still here")
            await bob.close()
            await carol.close()
        }
    }

    @Test("On shutdown every stream gets <system-shutdown/>")
    func systemShutdown() async throws {
        let server = try await TestServer.start()
        let (alice, _) = try await server.loggedIn("alice@a.example")
        let (bob, _) = try await server.loggedIn("bob@b.example")
        async let stopping: Void = server.stop()
        #expect(try await alice.streamErrorCondition() == .systemShutdown)
        #expect(try await bob.streamErrorCondition() == .systemShutdown)
        await stopping
    }

    @Test("A listener port held by another program stops the start with an error naming the listener and the port")
    func portInUse() async throws {
        let held = try LoopbackPorts.boundSocket(type: LoopbackPorts.stream, port: 0)
        defer { close(held.fd) }
        _ = listen(held.fd, 1)
        let error = await #expect(throws: ListenerBindFailure.self) {
            _ = try await TestServer.start { $0.c2s.starttlsPort = held.port }
        }
        #expect(error?.listener == "c2s_starttls")
        #expect(error?.description.hasPrefix("cannot listen on 127.0.0.1:\(held.port) for c2s_starttls:") == true)
    }

}
