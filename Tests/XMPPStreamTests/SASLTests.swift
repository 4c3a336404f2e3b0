import Testing
import XMPPCore
@testable import XMPPStream

// MARK: - Helpers

private func bytes(_ string: String) -> [UInt8] { Array(string.utf8) }
private func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

private func hex(_ string: String) -> [UInt8] {
    var out: [UInt8] = []
    var index = string.startIndex
    while index < string.endIndex {
        let next = string.index(index, offsetBy: 2)
        out.append(UInt8(string[index ..< next], radix: 16) ?? 0)
        index = next
    }
    return out
}

/// The shape of a server action, for comparing exchanges without their random parts.
private enum ActionKind: Equatable, CustomStringConvertible {
    case challenge, lookUp, verifyPassword, success, failure(SASLFailure)

    init(_ action: SASLServerAction) {
        switch action {
        case .challenge: self = .challenge
        case .lookUpSCRAMKeys: self = .lookUp
        case .verifyPassword: self = .verifyPassword
        case .success: self = .success
        case .failure(let condition): self = .failure(condition)
        }
    }

    var description: String {
        switch self {
        case .challenge: "challenge"
        case .lookUp: "lookUp"
        case .verifyPassword: "verifyPassword"
        case .success: "success"
        case .failure(let condition): "failure(\(condition.rawValue))"
        }
    }
}

private let secret: [UInt8] = Array(0 ..< 32)
private let cbData: [UInt8] = hex("5f1b0e3c9a8d7e6f00112233445566778899aabbccddeeff0123456789abcdef")

private func server(
    _ hash: SCRAMHash, binding: ChannelBinding? = nil, plusOffered: Bool = false, fakeIterations: Int = 4096
) -> SCRAMServer {
    SCRAMServer(hash: hash, channelBindings: binding.map { [$0] } ?? [], plusOffered: plusOffered, serverSecret: secret, fakeIterations: fakeIterations)
}

/// Everything one client↔server exchange produced.
private struct Exchange {
    var actions: [SASLServerAction] = []
    var challenges: [[UInt8]] = []
    var clientError: SCRAMClientError?
    var client: SCRAMClient
    var server: SCRAMServer

    var kinds: [ActionKind] { actions.map(ActionKind.init) }
    var last: SASLServerAction? { actions.last }
}

/// Drives `client` against `server`, answering key lookups from `accounts`. The client's
/// replies replace the message at `step` (0: client-first, 1: client-final) when `tamper`
/// is given.
private func runExchange(
    client: SCRAMClient,
    server: SCRAMServer,
    accounts: [String: SCRAMServerKeys],
    useInitialResponse: Bool = true,
    tamper: ((Int, [UInt8]) -> [UInt8])? = nil
) -> Exchange {
    var exchange = Exchange(client: client, server: server)
    var step = 0
    func outgoing(_ message: [UInt8]) -> [UInt8] {
        defer { step += 1 }
        return tamper?(step, message) ?? message
    }
    do {
        var action: SASLServerAction
        if useInitialResponse {
            action = exchange.server.start(initialResponse: outgoing(try exchange.client.clientFirstMessage()))
        } else {
            action = exchange.server.start(initialResponse: nil)
        }
        while true {
            exchange.actions.append(action)
            switch action {
            case .lookUpSCRAMKeys(let username):
                action = exchange.server.credentialsReceived(accounts[username])
            case .challenge(let challenge):
                exchange.challenges.append(challenge)
                if challenge.isEmpty {
                    action = exchange.server.responseReceived(outgoing(try exchange.client.clientFirstMessage()))
                } else {
                    action = exchange.server.responseReceived(outgoing(try exchange.client.serverFirstReceived(challenge)))
                }
            case .success(_, let data):
                try exchange.client.serverFinalReceived(data ?? [])
                return exchange
            case .failure, .verifyPassword:
                return exchange
            }
        }
    } catch {
        exchange.clientError = error
        return exchange
    }
}

/// Splits a server-first message into its attributes.
private func attributes(_ message: [UInt8]) -> [(name: String, value: String)] {
    text(message).split(separator: ",", omittingEmptySubsequences: false).map { field in
        (String(field.prefix(1)), String(field.dropFirst(2)))
    }
}

/// All SASL tests, grouped so that `--filter SASLTests` selects them.
@Suite("SASL")
struct SASLTests {}

// MARK: - RFC test vectors

/// The examples of RFC 5802 §5 (SCRAM-SHA-1) and RFC 7677 §3 (SCRAM-SHA-256): user "user",
/// password "pencil". StoredKey and ServerKey are not printed in the RFCs; the values here
/// were computed independently (Python hashlib/hmac) and are confirmed by the proofs and
/// signatures below, which are the RFCs' own.
struct RFCVector: Sendable, CustomTestStringConvertible {
    var hash: SCRAMHash
    var clientNonce: String
    var serverNonce: String
    var salt: String
    var clientFirst: String
    var serverFirst: String
    var clientFinal: String
    var serverFinal: String
    var storedKey: String
    var serverKey: String

    var testDescription: String { hash.mechanismName }

    static let sha1 = RFCVector(
        hash: .sha1,
        clientNonce: "fyko+d2lbbFgONRv9qkxdawL",
        serverNonce: "3rfcNHYJY1ZVvWVs7j",
        salt: "QSXCR+Q6sek8bf92",
        clientFirst: "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        serverFirst: "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        clientFinal: "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        serverFinal: "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        storedKey: "e9d94660c39d65c38fbad91c358f14da0eef2bd6",
        serverKey: "0fe09258b3ac852ba502cc62ba903eaacdbf7d31"
    )

    static let sha256 = RFCVector(
        hash: .sha256,
        clientNonce: "rOprNGfwEbeRWgbNEkqO",
        serverNonce: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        salt: "W22ZaJ0SNY7soEsUEjb6gQ==",
        clientFirst: "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        serverFirst: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        clientFinal: "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        serverFinal: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        storedKey: "586e5df283e6dceb5c3e791d8b8528ec191e664045ce971792e2e6b5bb13e2a6",
        serverKey: "c1f3cbc1c13a9d35a14c0990eed97629ea225863e566a4314ab99f3f00e5d9d5"
    )

    static let all = [sha1, sha256]

    func keys() throws -> SCRAMServerKeys {
        try SCRAMKeyDerivation.deriveKeys(password: "pencil", salt: Base64.decode(salt) ?? [], iterations: 4096, hash: hash)
    }
}

extension SASLTests {
    @Suite("RFC 5802 and RFC 7677 examples")
    struct SCRAMVectorTests {
        @Test("Key derivation gives the example's StoredKey and ServerKey", arguments: RFCVector.all)
        func keyDerivation(vector: RFCVector) throws {
            let keys = try vector.keys()
            #expect(keys.salt == Base64.decode(vector.salt))
            #expect(keys.iterations == 4096)
            #expect(keys.storedKey == hex(vector.storedKey))
            #expect(keys.serverKey == hex(vector.serverKey))
            #expect(SCRAMKeyDerivation.verify(password: "pencil", keys: keys, hash: vector.hash))
            #expect(!SCRAMKeyDerivation.verify(password: "pencil ", keys: keys, hash: vector.hash))
        }

        @Test("The server reproduces server-first and server-final byte for byte", arguments: RFCVector.all)
        func serverSide(vector: RFCVector) throws {
            var server = SCRAMServer(hash: vector.hash, channelBindings: [], plusOffered: false, serverSecret: secret,
                                     fakeIterations: 4096, fixedServerNonce: bytes(vector.serverNonce))
            #expect(server.start(initialResponse: bytes(vector.clientFirst)) == .lookUpSCRAMKeys(username: "user"))
            #expect(server.credentialsReceived(try vector.keys()) == .challenge(bytes(vector.serverFirst)))
            #expect(server.responseReceived(bytes(vector.clientFinal)) == .success(username: "user", additionalData: bytes(vector.serverFinal)))
            #expect(server.isFinished)
            #expect(server.authenticatedUsername == "user")
            #expect(server.authzid == nil)
        }

        @Test("The client reproduces client-first and client-final and accepts server-final", arguments: RFCVector.all)
        func clientSide(vector: RFCVector) throws {
            var client = SCRAMClient(hash: vector.hash, username: "user", password: "pencil", authzid: nil, channelBinding: nil,
                                     clientSupportsChannelBinding: false, minimumIterations: 4096, clientNonce: bytes(vector.clientNonce))
            #expect(client.mechanismName == vector.hash.mechanismName)
            #expect(text(try client.clientFirstMessage()) == vector.clientFirst)
            #expect(text(try client.serverFirstReceived(bytes(vector.serverFirst))) == vector.clientFinal)
            #expect(!client.isServerAuthenticated)
            try client.serverFinalReceived(bytes(vector.serverFinal))
            #expect(client.isServerAuthenticated)
        }

        @Test("A one-bit change in the RFC proof is not-authorized", arguments: RFCVector.all)
        func flippedProof(vector: RFCVector) throws {
            var server = SCRAMServer(hash: vector.hash, channelBindings: [], plusOffered: false, serverSecret: secret,
                                     fakeIterations: 4096, fixedServerNonce: bytes(vector.serverNonce))
            _ = server.start(initialResponse: bytes(vector.clientFirst))
            _ = server.credentialsReceived(try vector.keys())
            let (withoutProof, proofText) = splitProof(vector.clientFinal)
            var proof = Base64.decode(proofText) ?? []
            #expect(proof.count == vector.hash.digestLength)
            proof[0] ^= 0x01
            #expect(server.responseReceived(bytes(withoutProof + ",p=" + Base64.encode(proof))) == .failure(.notAuthorized))
            #expect(server.authenticatedUsername == nil)
        }
    }
}

// MARK: - SCRAM round trips

extension SASLTests {
    @Suite("SCRAM exchanges")
    struct SCRAMExchangeTests {
        static let hashes = SCRAMHash.allCases

        func accounts(_ hash: SCRAMHash, password: String = "correct horse", iterations: Int = 4096) throws -> [String: SCRAMServerKeys] {
            ["juliet": try SCRAMKeyDerivation.deriveKeys(password: password, salt: Array(repeating: 7, count: 16), iterations: iterations, hash: hash)]
        }

        @Test("Client and server agree; the server's signature is verified", arguments: hashes)
        func roundTrip(hash: SCRAMHash) throws {
            let client = SCRAMClient(hash: hash, username: "juliet", password: "correct horse")
            let result = runExchange(client: client, server: server(hash), accounts: try accounts(hash))
            #expect(result.clientError == nil)
            #expect(result.kinds == [.lookUp, .challenge, .success])
            #expect(ActionKind(result.actions[0]) == .lookUp)
            #expect(result.actions[0] == .lookUpSCRAMKeys(username: "juliet"))
            #expect(result.client.isServerAuthenticated)
            #expect(result.server.authenticatedUsername == "juliet")
            guard case .success(let username, let data?) = result.last else {
                Issue.record("no success with data")
                return
            }
            #expect(username == "juliet")
            #expect(text(data).hasPrefix("v="))
            #expect(Base64.decode(text(data).dropFirst(2))?.count == hash.digestLength)
        }

        @Test("Without an initial response the server sends an empty challenge first", arguments: hashes)
        func noInitialResponse(hash: SCRAMHash) throws {
            let client = SCRAMClient(hash: hash, username: "juliet", password: "correct horse")
            let result = runExchange(client: client, server: server(hash), accounts: try accounts(hash), useInitialResponse: false)
            #expect(result.kinds == [.challenge, .lookUp, .challenge, .success])
            #expect(result.challenges.first == [])
            #expect(result.client.isServerAuthenticated)
        }

        @Test("Server nonces are random, 24 Base64 characters appended to the client's")
        func serverNonce() throws {
            var nonces: Set<String> = []
            for _ in 0 ..< 2 {
                var scram = server(.sha256)
                _ = scram.start(initialResponse: bytes("n,,n=juliet,r=clientnonce"))
                guard case .challenge(let challenge) = scram.credentialsReceived(try accounts(.sha256)["juliet"]) else {
                    Issue.record("no challenge")
                    return
                }
                let fields = attributes(challenge)
                #expect(fields.map { $0.name } == ["r", "s", "i"])
                #expect(fields[0].value.hasPrefix("clientnonce"))
                let serverPart = fields[0].value.dropFirst("clientnonce".count)
                #expect(serverPart.count == 24)
                #expect(Base64.decode(serverPart)?.count == 18)
                #expect(fields[1].value == Base64.encode(Array(repeating: 7, count: 16)))
                #expect(fields[2].value == "4096")
                nonces.insert(String(serverPart))
            }
            #expect(nonces.count == 2)
        }

        @Test("Wrong password fails with not-authorized at the final step", arguments: hashes)
        func wrongPassword(hash: SCRAMHash) throws {
            let client = SCRAMClient(hash: hash, username: "juliet", password: "wrong horse")
            let result = runExchange(client: client, server: server(hash), accounts: try accounts(hash))
            #expect(result.kinds == [.lookUp, .challenge, .failure(.notAuthorized)])
            #expect(result.server.isFinished)
            #expect(result.server.authenticatedUsername == nil)
            #expect(!result.client.isServerAuthenticated)
        }

        @Test("An unknown user goes through the same steps as a wrong password", arguments: hashes)
        func unknownUser(hash: SCRAMHash) throws {
            let known = try accounts(hash)
            let wrong = runExchange(client: SCRAMClient(hash: hash, username: "juliet", password: "wrong horse"),
                                    server: server(hash), accounts: known)
            let unknown = runExchange(client: SCRAMClient(hash: hash, username: "romeo", password: "wrong horse"),
                                      server: server(hash), accounts: known)
            #expect(unknown.kinds == wrong.kinds)
            #expect(unknown.kinds == [.lookUp, .challenge, .failure(.notAuthorized)])
            #expect(unknown.actions[0] == .lookUpSCRAMKeys(username: "romeo"))
            // The challenge has the same attributes, salt length and iteration count.
            let wrongFields = attributes(wrong.challenges[0])
            let unknownFields = attributes(unknown.challenges[0])
            #expect(unknownFields.map { $0.name } == wrongFields.map { $0.name })
            #expect(Base64.decode(unknownFields[1].value)?.count == Base64.decode(wrongFields[1].value)?.count)
            #expect(Base64.decode(unknownFields[1].value)?.count == 16)
            #expect(unknownFields[2].value == wrongFields[2].value)
            #expect(unknownFields[0].value.count == wrongFields[0].value.count)
            // The server signature is never sent, and the client never sees a server error.
            #expect(unknown.clientError == nil)
            #expect(!unknown.client.isServerAuthenticated)
        }

        @Test("An unknown user's fake salt is stable per name and per hash, and tied to the secret")
        func fakeSaltStability() throws {
            func salt(_ username: String, _ hash: SCRAMHash = .sha256, secret serverSecret: [UInt8] = secret) -> String? {
                var scram = SCRAMServer(hash: hash, channelBindings: [], plusOffered: false, serverSecret: serverSecret, fakeIterations: 4096)
                _ = scram.start(initialResponse: bytes("n,,n=\(username),r=abc"))
                guard case .challenge(let challenge) = scram.credentialsReceived(nil) else { return nil }
                return attributes(challenge)[1].value
            }
            let romeo = salt("romeo")
            #expect(romeo != nil)
            #expect(romeo == salt("romeo"))
            #expect(romeo == salt("ROMEO")) // prepared before the fake keys are derived
            #expect(romeo != salt("mercutio"))
            #expect(romeo != salt("romeo", .sha1))
            #expect(romeo != salt("romeo", secret: Array(repeating: 1, count: 32)))
            let expected = SCRAMKeyDerivation.fakeKeys(username: "romeo", serverSecret: secret, iterations: 4096, hash: .sha256)
            #expect(romeo == Base64.encode(expected.salt))
        }

        @Test("The announced fake iteration count is the configured one")
        func fakeIterations() {
            var scram = server(.sha1, fakeIterations: 12_345)
            _ = scram.start(initialResponse: bytes("n,,n=nobody,r=abc"))
            guard case .challenge(let challenge) = scram.credentialsReceived(nil) else {
                Issue.record("no challenge")
                return
            }
            #expect(attributes(challenge)[2].value == "12345")
        }

        @Test("A username that cannot be prepared continues as an unknown user and fails at the end", arguments: [
            "a@b", "tab\there", "x/y", String(repeating: "a", count: 1024),
        ])
        func unpreparableUsername(username: String) throws {
            let client = SCRAMClient(hash: .sha256, username: username, password: "correct horse")
            let result = runExchange(client: client, server: server(.sha256), accounts: try accounts(.sha256))
            // No lookup is asked for a name no account can have; the client sees a normal challenge.
            #expect(result.kinds == [.challenge, .failure(.notAuthorized)])
            #expect(attributes(result.challenges[0]).map { $0.name } == ["r", "s", "i"])
            #expect(result.clientError == nil)
        }

        @Test("SCRAM-*-PLUS with matching tls-server-end-point data succeeds", arguments: hashes)
        func plusRoundTrip(hash: SCRAMHash) throws {
            let binding = ChannelBinding(type: "tls-server-end-point", data: cbData)
            var client = SCRAMClient(hash: hash, username: "juliet", password: "correct horse", channelBinding: binding)
            #expect(client.mechanismName == hash.plusMechanismName)
            let scram = server(hash, binding: binding, plusOffered: true)
            #expect(scram.mechanismName == hash.plusMechanismName)
            let result = runExchange(client: client, server: scram, accounts: try accounts(hash))
            #expect(result.kinds == [.lookUp, .challenge, .success])
            #expect(result.client.isServerAuthenticated)
            // The client's GS2 header names the binding type.
            #expect(text(try client.clientFirstMessage()).hasPrefix("p=tls-server-end-point,,n=juliet,r="))
        }

        @Test("The client-final c= of -PLUS carries the GS2 header and the binding data")
        func plusClientFinal() throws {
            let binding = ChannelBinding(type: "tls-server-end-point", data: [0xDE, 0xAD, 0xBE, 0xEF])
            var client = SCRAMClient(hash: .sha256, username: "user", password: "pencil", authzid: nil, channelBinding: binding,
                                     clientSupportsChannelBinding: false, minimumIterations: 4096, clientNonce: bytes("abc"))
            _ = try client.clientFirstMessage()
            let final = text(try client.serverFirstReceived(bytes("r=abcdef,s=QSXCR+Q6sek8bf92,i=4096")))
            #expect(final.hasPrefix("c=" + Base64.encode(bytes("p=tls-server-end-point,,") + [0xDE, 0xAD, 0xBE, 0xEF]) + ",r=abcdef,p="))
        }

        @Test("Channel-binding data that differs from the server's is not-authorized", arguments: hashes)
        func channelBindingMismatch(hash: SCRAMHash) throws {
            var other = cbData
            other[other.count - 1] ^= 0xFF
            let client = SCRAMClient(hash: hash, username: "juliet", password: "correct horse",
                                     channelBinding: ChannelBinding(type: "tls-server-end-point", data: other))
            let scram = server(hash, binding: ChannelBinding(type: "tls-server-end-point", data: cbData), plusOffered: true)
            let result = runExchange(client: client, server: scram, accounts: try accounts(hash))
            #expect(result.kinds == [.lookUp, .challenge, .failure(.notAuthorized)])
            #expect(result.server.authenticatedUsername == nil)
        }

        @Test("A channel-binding type the server cannot provide fails at once with unsupported-channel-binding-type")
        func channelBindingTypeMismatch() throws {
            let client = SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse",
                                     channelBinding: ChannelBinding(type: "tls-unique", data: cbData))
            let scram = server(.sha256, binding: ChannelBinding(type: "tls-server-end-point", data: cbData), plusOffered: true)
            let result = runExchange(client: client, server: scram, accounts: try accounts(.sha256))
            #expect(result.kinds == [.failure(.notAuthorized)])
            #expect(result.server.serverError == "unsupported-channel-binding-type")
        }

        @Test("The client picks any offered binding type; each binds to its own data", arguments: ["tls-exporter", "tls-server-end-point"])
        func channelBindingChoice(type: String) throws {
            let exporter = ChannelBinding(type: "tls-exporter", data: Array(repeating: 7, count: 32))
            let endPoint = ChannelBinding(type: "tls-server-end-point", data: cbData)
            let chosen = type == exporter.type ? exporter : endPoint
            let other = type == exporter.type ? endPoint : exporter
            let scram = SCRAMServer(hash: .sha256, channelBindings: [exporter, endPoint], plusOffered: true,
                                    serverSecret: secret, fakeIterations: 4096)
            let good = runExchange(client: SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse", channelBinding: chosen),
                                   server: scram, accounts: try accounts(.sha256))
            #expect(good.server.authenticatedUsername == "juliet")
            // The right type with the other type's data is another channel.
            let crossed = runExchange(client: SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse",
                                                          channelBinding: ChannelBinding(type: chosen.type, data: other.data)),
                                      server: scram, accounts: try accounts(.sha256))
            #expect(crossed.kinds.last == .failure(.notAuthorized))
            #expect(crossed.server.authenticatedUsername == nil)
            #expect(crossed.server.serverError == nil)
        }

        @Test("The y flag is a downgrade when -PLUS was offered, and fine when it was not", arguments: hashes)
        func downgradeDetection(hash: SCRAMHash) throws {
            let client = SCRAMClient(hash: hash, username: "juliet", password: "correct horse", clientSupportsChannelBinding: true)
            var probe = client
            #expect(text(try probe.clientFirstMessage()).hasPrefix("y,,n=juliet,r="))

            let offered = runExchange(client: client, server: server(hash, plusOffered: true), accounts: try accounts(hash))
            #expect(offered.kinds == [.failure(.notAuthorized)])

            let notOffered = runExchange(client: client, server: server(hash, plusOffered: false), accounts: try accounts(hash))
            #expect(notOffered.kinds == [.lookUp, .challenge, .success])
            #expect(notOffered.client.isServerAuthenticated)
        }

        @Test("The n flag on a non-PLUS mechanism succeeds even when -PLUS was offered")
        func nFlagWithPlusOffered() throws {
            let client = SCRAMClient(hash: .sha1, username: "juliet", password: "correct horse")
            let result = runExchange(client: client, server: server(.sha1, plusOffered: true), accounts: try accounts(.sha1))
            #expect(result.kinds == [.lookUp, .challenge, .success])
        }

        @Test("p= on a mechanism without channel binding is malformed-request")
        func bindingOnNonPlus() {
            var scram = server(.sha256, plusOffered: true)
            #expect(scram.start(initialResponse: bytes("p=tls-server-end-point,,n=juliet,r=abc")) == .failure(.malformedRequest))
            #expect(scram.isFinished)
        }

        @Test("n or y on a -PLUS mechanism is malformed-request", arguments: ["n,,n=juliet,r=abc", "y,,n=juliet,r=abc"])
        func noBindingOnPlus(message: String) {
            var scram = server(.sha256, binding: ChannelBinding(type: "tls-server-end-point", data: cbData), plusOffered: true)
            #expect(scram.start(initialResponse: bytes(message)) == .failure(.malformedRequest))
        }

        @Test("The authzid is exposed unescaped for the caller to check", arguments: [
            ("juliet@example.com", "n,a=juliet@example.com,"),
            ("odd,name=x@example.com", "n,a=odd=2Cname=3Dx@example.com,"),
        ])
        func authzid(authzid: String, header: String) throws {
            let client = SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse", authzid: authzid)
            var probe = client
            #expect(text(try probe.clientFirstMessage()).hasPrefix(header + "n=juliet,r="))
            let result = runExchange(client: client, server: server(.sha256), accounts: try accounts(.sha256))
            #expect(result.kinds == [.lookUp, .challenge, .success])
            #expect(result.server.authzid == authzid)
        }

        @Test("Usernames are prepared with UsernameCaseMapped before lookup", arguments: [
            ("Σigma", "σigma"),
            ("ＪＵＬＩＥＴ", "juliet"),
            ("Juliet", "juliet"),
            ("o=2Cdd", "o,dd"),
        ])
        func usernamePreparation(sent: String, prepared: String) {
            var scram = server(.sha256)
            #expect(scram.start(initialResponse: bytes("n,,n=\(sent),r=abc")) == .lookUpSCRAMKeys(username: prepared))
        }

        @Test("A Unicode username authenticates end to end as its prepared form")
        func unicodeRoundTrip() throws {
            let keys = try SCRAMKeyDerivation.newKeys(password: "pässwörd", iterations: 4096, hash: .sha256)
            let client = SCRAMClient(hash: .sha256, username: "Σigma", password: "pässwörd")
            let result = runExchange(client: client, server: server(.sha256), accounts: ["σigma": keys])
            #expect(result.actions.first == .lookUpSCRAMKeys(username: "σigma"))
            guard case .success(let username, let data?) = result.last else {
                Issue.record("no success")
                return
            }
            #expect(username == "σigma")
            #expect(data.starts(with: bytes("v=")))
            #expect(result.server.authenticatedUsername == "σigma")
            #expect(result.client.isServerAuthenticated)
        }

        @Test("Passwords are prepared with OpaqueString: NBSP equals space")
        func passwordPreparation() throws {
            let keys = try SCRAMKeyDerivation.deriveKeys(password: "correct horse", salt: Array(repeating: 3, count: 16), iterations: 4096, hash: .sha256)
            let nbsp = try SCRAMKeyDerivation.deriveKeys(password: "correct\u{00A0}horse", salt: Array(repeating: 3, count: 16), iterations: 4096, hash: .sha256)
            #expect(nbsp == keys)
            let client = SCRAMClient(hash: .sha256, username: "juliet", password: "correct\u{2003}horse") // EM SPACE
            let result = runExchange(client: client, server: server(.sha256), accounts: ["juliet": keys])
            #expect(result.kinds == [.lookUp, .challenge, .success])
        }

        @Test("Extensions other than m= in client-first are ignored")
        func ignoredExtension() {
            var scram = server(.sha1)
            #expect(scram.start(initialResponse: bytes("n,,n=juliet,r=abc,x=future")) == .lookUpSCRAMKeys(username: "juliet"))
        }

        @Test("Malformed client-first messages are malformed-request", arguments: [
            ("empty", ""),
            ("unknown flag", "x,,n=user,r=abc"),
            ("flag without comma", "n"),
            ("missing second comma", "n,n=user,r=abc"),
            ("missing username", "n,,r=abc"),
            ("missing nonce", "n,,n=user"),
            ("empty username", "n,,n=,r=abc"),
            ("bad escape =2X", "n,,n=us=2Xer,r=abc"),
            ("lowercase escape =2c", "n,,n=us=2cer,r=abc"),
            ("truncated escape", "n,,n=user=3,r=abc"),
            ("bare =", "n,,n=us=er,r=abc"),
            ("reserved-mext", "n,,m=ext,n=user,r=abc"),
            ("m= extension", "n,,n=user,r=abc,m=ext"),
            ("empty nonce", "n,,n=user,r="),
            ("nonce with space", "n,,n=user,r=ab c"),
            ("empty field", "n,,n=user,,r=abc"),
            ("attributes swapped", "n,,r=abc,n=user"),
            ("bad extension", "n,,n=user,r=abc,xyz"),
            ("empty authzid", "n,a=,n=user,r=abc"),
            ("bad authzid escape", "n,a=x=41,n=user,r=abc"),
            ("empty channel-binding name", "p=,,n=user,r=abc"),
            ("channel-binding name with _", "p=tls_unique,,n=user,r=abc"),
            ("NUL in username", "n,,n=us\u{0}er,r=abc"),
        ])
        func malformedClientFirst(name: String, message: String) {
            var scram = server(.sha256)
            #expect(scram.start(initialResponse: bytes(message)) == .failure(.malformedRequest), "\(name)")
            #expect(scram.isFinished)
            #expect(scram.responseReceived(bytes("n,,n=user,r=abc")) == .failure(.malformedRequest))
        }

        @Test("Invalid UTF-8 in client-first is malformed-request")
        func invalidUTF8() {
            var scram = server(.sha256)
            #expect(scram.start(initialResponse: bytes("n,,n=") + [0xC3, 0x28] + bytes(",r=abc")) == .failure(.malformedRequest))
        }

        @Test("Malformed or tampered client-final messages", arguments: ClientFinalTampering.allCases)
        func badClientFinal(tampering: ClientFinalTampering) throws {
            let client = SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse")
            let result = runExchange(client: client, server: server(.sha256), accounts: try accounts(.sha256), tamper: { step, message in
                step == 1 ? bytes(tampering.apply(text(message))) : message
            })
            #expect(result.kinds == [.lookUp, .challenge, .failure(tampering.expected)])
        }

        @Test("An ignorable extension in client-final is still covered by the proof")
        func clientFinalExtensionIsSigned() throws {
            // Inserting an extension changes AuthMessage, so the proof no longer holds.
            let client = SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse")
            let result = runExchange(client: client, server: server(.sha256), accounts: try accounts(.sha256), tamper: { step, message in
                step == 1 ? bytes(text(message).replacingFirst(",p=", with: ",x=y,p=")) : message
            })
            #expect(result.kinds == [.lookUp, .challenge, .failure(.notAuthorized)])
        }

        @Test("Anything after success is malformed-request")
        func afterSuccess() throws {
            let client = SCRAMClient(hash: .sha256, username: "juliet", password: "correct horse")
            var result = runExchange(client: client, server: server(.sha256), accounts: try accounts(.sha256))
            #expect(result.kinds == [.lookUp, .challenge, .success])
            #expect(result.server.responseReceived(bytes("c=biws")) == .failure(.malformedRequest))
            #expect(result.server.responseReceived([]) == .failure(.malformedRequest))
            #expect(result.server.credentialsReceived(nil) == .failure(.malformedRequest))
            #expect(result.server.start(initialResponse: nil) == .failure(.malformedRequest))
            #expect(result.server.abort() == .failure(.malformedRequest))
            // The outcome already reached stays.
            #expect(result.server.authenticatedUsername == "juliet")
        }

        @Test("Out-of-order inputs are malformed-request")
        func outOfOrder() throws {
            var a = server(.sha1)
            #expect(a.responseReceived(bytes("n,,n=juliet,r=abc")) == .failure(.malformedRequest))
            var b = server(.sha1)
            #expect(b.credentialsReceived(nil) == .failure(.malformedRequest))
            var c = server(.sha1)
            #expect(c.start(initialResponse: bytes("n,,n=juliet,r=abc")) == .lookUpSCRAMKeys(username: "juliet"))
            #expect(c.responseReceived(bytes("c=biws,r=abc,p=AAAA")) == .failure(.malformedRequest))
            var d = server(.sha1)
            #expect(d.start(initialResponse: nil) == .challenge([]))
            #expect(d.start(initialResponse: nil) == .failure(.malformedRequest))
        }

        @Test("An empty initial response is malformed-request")
        func emptyInitialResponse() {
            var scram = server(.sha256)
            #expect(scram.start(initialResponse: []) == .failure(.malformedRequest))
        }

        @Test("Abort ends the exchange with aborted")
        func abort() throws {
            var scram = server(.sha256)
            #expect(scram.start(initialResponse: bytes("n,,n=juliet,r=abc")) == .lookUpSCRAMKeys(username: "juliet"))
            #expect(scram.abort() == .failure(.aborted))
            #expect(scram.isFinished)
            #expect(scram.credentialsReceived(nil) == .failure(.malformedRequest))
        }

        @Test("Stored keys of the wrong shape are temporary-auth-failure")
        func corruptKeys() {
            var scram = server(.sha256)
            _ = scram.start(initialResponse: bytes("n,,n=juliet,r=abc"))
            let sha1Sized = SCRAMServerKeys(salt: [1, 2, 3], iterations: 4096, storedKey: Array(repeating: 0, count: 20), serverKey: Array(repeating: 0, count: 20))
            #expect(scram.credentialsReceived(sha1Sized) == .failure(.temporaryAuthFailure))
        }
    }
}

// MARK: - Client-side checks

extension SASLTests {
    @Suite("SCRAM client")
    struct SCRAMClientTests {
        func client(minimumIterations: Int = 4096) -> SCRAMClient {
            SCRAMClient(hash: .sha1, username: "user", password: "pencil", authzid: nil, channelBinding: nil,
                        clientSupportsChannelBinding: false, minimumIterations: minimumIterations, clientNonce: bytes("fyko+d2lbbFgONRv9qkxdawL"))
        }

        func afterFirst(_ serverFirst: String, minimumIterations: Int = 4096) -> SCRAMClientError? {
            var scram = client(minimumIterations: minimumIterations)
            _ = try? scram.clientFirstMessage()
            do {
                _ = try scram.serverFirstReceived(bytes(serverFirst))
                return nil
            } catch {
                return error
            }
        }

        @Test("Iteration counts below the minimum are refused; the minimum can be lowered")
        func iterationFloor() {
            #expect(afterFirst("r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4095") == .iterationCountTooLow(4095))
            #expect(afterFirst("r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=1", minimumIterations: 1) == nil)
        }

        @Test("A server nonce must extend the client's", arguments: [
            "r=XXXX+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4096",
            "r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096",
            "r=fyko,s=QSXCR+Q6sek8bf92,i=4096",
        ])
        func nonceMismatch(serverFirst: String) {
            #expect(afterFirst(serverFirst) == .nonceMismatch)
        }

        @Test("Malformed server-first messages are refused", arguments: [
            "", "s=QSXCR+Q6sek8bf92,r=fyko+d2lbbFgONRv9qkxdawL3rfc,i=4096",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf9,i=4096",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=,i=4096",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=04096",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=-1",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92",
        ])
        func malformedServerFirst(serverFirst: String) {
            #expect(afterFirst(serverFirst) == .malformedServerMessage)
        }

        @Test("A mandatory extension from the server is refused")
        func mandatoryExtension() {
            #expect(afterFirst("m=x,r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4096") == .unsupportedMandatoryExtension)
        }

        @Test("A wrong server signature or a server error fails the client")
        func serverFinal() throws {
            var a = client()
            _ = try a.clientFirstMessage()
            _ = try a.serverFirstReceived(bytes(RFCVector.sha1.serverFirst))
            #expect(throws: SCRAMClientError.serverSignatureMismatch) { try a.serverFinalReceived(bytes("v=AAAAAAAAAAAAAAAAAAAAAAAAAAA=")) }
            #expect(!a.isServerAuthenticated)

            var b = client()
            _ = try b.clientFirstMessage()
            _ = try b.serverFirstReceived(bytes(RFCVector.sha1.serverFirst))
            #expect(throws: SCRAMClientError.serverError("invalid-proof")) { try b.serverFinalReceived(bytes("e=invalid-proof")) }
        }

        @Test("Calls out of order fail the client")
        func clientOrder() throws {
            var scram = client()
            #expect(throws: SCRAMClientError.outOfOrder) { try scram.serverFirstReceived(bytes(RFCVector.sha1.serverFirst)) }
            var other = client()
            _ = try other.clientFirstMessage()
            #expect(throws: SCRAMClientError.outOfOrder) { try other.clientFirstMessage() }
        }

        @Test("An unpreparable password is reported when keys are needed")
        func unpreparablePassword() throws {
            var scram = SCRAMClient(hash: .sha256, username: "user", password: "bad\u{0007}password", authzid: nil, channelBinding: nil,
                                    clientSupportsChannelBinding: false, minimumIterations: 4096, clientNonce: bytes("abc"))
            #expect(text(try scram.clientFirstMessage()) == "n,,n=user,r=abc")
            #expect(throws: SCRAMClientError.unpreparablePassword(JIDError(.resourcepart, .disallowedCharacter("\u{7}")))) {
                try scram.serverFirstReceived(bytes("r=abcdef,s=QSXCR+Q6sek8bf92,i=4096"))
            }
        }
    }
}

// MARK: - PLAIN

extension SASLTests {
    @Suite("PLAIN")
    struct PLAINTests {
        func message(_ authzid: String, _ authcid: String, _ password: String) -> [UInt8] {
            bytes(authzid) + [0] + bytes(authcid) + [0] + bytes(password)
        }

        @Test("Happy path: verifyPassword then success")
        func happyPath() {
            var plain = PLAINServer()
            #expect(plain.start(initialResponse: message("", "juliet", "r0m30myr0m30")) == .verifyPassword(username: "juliet", password: "r0m30myr0m30"))
            #expect(plain.authzid == nil)
            #expect(plain.verificationFinished(true) == .success(username: "juliet", additionalData: nil))
            #expect(plain.authenticatedUsername == "juliet")
            #expect(plain.isFinished)
        }

        @Test("Without an initial response the server sends an empty challenge")
        func noInitialResponse() {
            var plain = PLAINServer()
            #expect(plain.start(initialResponse: nil) == .challenge([]))
            #expect(plain.responseReceived(message("", "juliet", "pw")) == .verifyPassword(username: "juliet", password: "pw"))
        }

        @Test("Wrong password is not-authorized")
        func wrongPassword() {
            var plain = PLAINServer()
            #expect(plain.start(initialResponse: message("", "juliet", "wrong")) == .verifyPassword(username: "juliet", password: "wrong"))
            #expect(plain.verificationFinished(false) == .failure(.notAuthorized))
            #expect(plain.authenticatedUsername == nil)
        }

        @Test("Unknown user: fake keys cost a real check, and the outcome is the wrong-password one")
        func unknownUser() throws {
            let real = try SCRAMKeyDerivation.newKeys(password: "secret", iterations: 4096, hash: .sha256)
            let fake = SCRAMKeyDerivation.fakeKeys(username: "romeo", serverSecret: secret, iterations: 4096, hash: .sha256)
            #expect(fake.salt.count == real.salt.count)
            #expect(fake.storedKey.count == real.storedKey.count)
            #expect(fake.serverKey.count == real.serverKey.count)
            #expect(fake.iterations == real.iterations)

            var known = PLAINServer()
            var unknown = PLAINServer()
            let knownKinds = [ActionKind(known.start(initialResponse: message("", "juliet", "guess"))),
                              ActionKind(known.verificationFinished(SCRAMKeyDerivation.verify(password: "guess", keys: real, hash: .sha256)))]
            let unknownKinds = [ActionKind(unknown.start(initialResponse: message("", "romeo", "guess"))),
                                ActionKind(unknown.verificationFinished(SCRAMKeyDerivation.verify(password: "guess", keys: fake, hash: .sha256)))]
            #expect(knownKinds == [.verifyPassword, .failure(.notAuthorized)])
            #expect(unknownKinds == knownKinds)
        }

        @Test("Empty or missing fields", arguments: [
            ("empty message", [], SASLFailure.malformedRequest),
            ("empty authcid", [0, 0] + Array("pw".utf8), .malformedRequest),
            ("empty password", [0] + Array("juliet".utf8) + [0], .notAuthorized),
            ("one NUL", Array("juliet".utf8) + [0] + Array("pw".utf8), .malformedRequest),
            ("three NULs", [0] + Array("juliet".utf8) + [0] + Array("pw".utf8) + [0], .malformedRequest),
            ("invalid UTF-8 password", [0] + Array("juliet".utf8) + [0, 0xFF], .malformedRequest),
            ("unpreparable username", [0] + Array("a@b".utf8) + [0] + Array("pw".utf8), .notAuthorized),
            ("unpreparable password", [0] + Array("juliet".utf8) + [0, 0x07], .notAuthorized),
        ] as [(String, [UInt8], SASLFailure)])
        func badMessages(name: String, input: [UInt8], expected: SASLFailure) {
            var plain = PLAINServer()
            #expect(plain.start(initialResponse: input) == .failure(expected), "\(name)")
            #expect(plain.isFinished)
        }

        @Test("The authzid is exposed for the caller to check")
        func authzid() {
            var plain = PLAINServer()
            #expect(plain.start(initialResponse: message("juliet@example.com", "juliet", "pw")) == .verifyPassword(username: "juliet", password: "pw"))
            #expect(plain.authzid == "juliet@example.com")
            #expect(plain.verificationFinished(true) == .success(username: "juliet", additionalData: nil))
            #expect(plain.authzid == "juliet@example.com")
        }

        @Test("Username and password are PRECIS-prepared", arguments: [
            ("Σigma", "pass\u{00A0}word", "σigma", "pass word"),
            ("ＪＵＬＩＥＴ", "Pass", "juliet", "Pass"),
            ("Juliet", "e\u{0301}", "juliet", "\u{00E9}"),
        ])
        func preparation(authcid: String, password: String, username: String, prepared: String) {
            var plain = PLAINServer()
            let action = plain.start(initialResponse: message("", authcid, password))
            #expect(action == .verifyPassword(username: username, password: prepared))
            // Compare octets too: String == is canonical equivalence and would hide an NFC miss.
            if case .verifyPassword(_, let got) = action {
                #expect(Array(got.utf8) == Array(prepared.utf8))
            }
        }

        @Test("A PLAIN password checks against SCRAM keys derived from its prepared form")
        func plainAgainstSCRAMKeys() throws {
            let keys = try SCRAMKeyDerivation.deriveKeys(password: "pass word", salt: Array(repeating: 9, count: 16), iterations: 4096, hash: .sha1)
            var plain = PLAINServer()
            guard case .verifyPassword(_, let password) = plain.start(initialResponse: message("", "juliet", "pass\u{00A0}word")) else {
                Issue.record("no verifyPassword")
                return
            }
            #expect(SCRAMKeyDerivation.verify(password: password, keys: keys, hash: .sha1))
            #expect(SCRAMKeyDerivation.verify(password: "pass\u{2002}word", keys: keys, hash: .sha1))
            #expect(!SCRAMKeyDerivation.verify(password: "password", keys: keys, hash: .sha1))
        }

        @Test("Anything after the outcome, or out of order, is malformed-request")
        func order() {
            var plain = PLAINServer()
            #expect(plain.verificationFinished(true) == .failure(.malformedRequest))
            var done = PLAINServer()
            _ = done.start(initialResponse: message("", "juliet", "pw"))
            _ = done.verificationFinished(true)
            #expect(done.responseReceived(message("", "juliet", "pw")) == .failure(.malformedRequest))
            #expect(done.verificationFinished(true) == .failure(.malformedRequest))
            #expect(done.abort() == .failure(.malformedRequest))
            #expect(done.authenticatedUsername == "juliet")
            var pending = PLAINServer()
            _ = pending.start(initialResponse: message("", "juliet", "pw"))
            #expect(pending.responseReceived(message("", "juliet", "pw")) == .failure(.malformedRequest))
            #expect(pending.verificationFinished(true) == .failure(.malformedRequest))
        }

        @Test("Abort ends the exchange with aborted")
        func abort() {
            var plain = PLAINServer()
            #expect(plain.start(initialResponse: nil) == .challenge([]))
            #expect(plain.abort() == .failure(.aborted))
            #expect(plain.responseReceived(message("", "juliet", "pw")) == .failure(.malformedRequest))
        }
    }
}

// MARK: - Key derivation and primitives

extension SASLTests {
    @Suite("keys and primitives")
    struct SASLPrimitiveTests {
        @Test("newKeys uses a fresh 16-byte salt and the requested count")
        func newKeys() throws {
            let a = try SCRAMKeyDerivation.newKeys(password: "pw", iterations: 4096, hash: .sha256)
            let b = try SCRAMKeyDerivation.newKeys(password: "pw", iterations: 4096, hash: .sha256)
            #expect(a.salt.count == 16)
            #expect(a.salt != b.salt)
            #expect(a.iterations == 4096)
            #expect(a.storedKey.count == 32)
            #expect(a.serverKey.count == 32)
            #expect(SCRAMKeyDerivation.verify(password: "pw", keys: a, hash: .sha256))
            #expect(SCRAMKeyDerivation.verify(password: "pw", keys: b, hash: .sha256))
            #expect(!SCRAMKeyDerivation.verify(password: "pw", keys: a, hash: .sha1))
        }

        @Test("Derivation refuses bad inputs")
        func derivationErrors() {
            #expect(throws: SCRAMKeyDerivationError.unpreparablePassword(JIDError(.resourcepart, .empty))) {
                try SCRAMKeyDerivation.deriveKeys(password: "", salt: [1], iterations: 4096, hash: .sha1)
            }
            #expect(throws: SCRAMKeyDerivationError.unpreparablePassword(JIDError(.resourcepart, .disallowedCharacter("\u{7}")))) {
                try SCRAMKeyDerivation.deriveKeys(password: "a\u{7}", salt: [1], iterations: 4096, hash: .sha1)
            }
            #expect(throws: SCRAMKeyDerivationError.invalidIterationCount(0)) {
                try SCRAMKeyDerivation.deriveKeys(password: "pw", salt: [1], iterations: 0, hash: .sha1)
            }
            #expect(throws: SCRAMKeyDerivationError.emptySalt) {
                try SCRAMKeyDerivation.deriveKeys(password: "pw", salt: [], iterations: 4096, hash: .sha1)
            }
            #expect(!SCRAMKeyDerivation.verify(password: "", keys: SCRAMServerKeys(salt: [1], iterations: 1, storedKey: [], serverKey: []), hash: .sha1))
        }

        @Test("Fake keys are deterministic, hash-sized, and depend on name, hash and secret")
        func fakeKeys() {
            let a = SCRAMKeyDerivation.fakeKeys(username: "romeo", serverSecret: secret, iterations: 8192, hash: .sha1)
            #expect(a == SCRAMKeyDerivation.fakeKeys(username: "romeo", serverSecret: secret, iterations: 8192, hash: .sha1))
            #expect(a.salt.count == 16)
            #expect(a.storedKey.count == 20)
            #expect(a.serverKey.count == 20)
            #expect(a.iterations == 8192)
            #expect(a.storedKey != a.serverKey)
            let b = SCRAMKeyDerivation.fakeKeys(username: "romeo", serverSecret: secret, iterations: 8192, hash: .sha256)
            #expect(b.storedKey.count == 32)
            #expect(b.salt != a.salt)
            #expect(SCRAMKeyDerivation.fakeKeys(username: "juliet", serverSecret: secret, iterations: 8192, hash: .sha1).salt != a.salt)
            #expect(SCRAMKeyDerivation.fakeKeys(username: "romeo", serverSecret: [1], iterations: 8192, hash: .sha1).salt != a.salt)
        }

        @Test("PRECISProfiles forwards to the internal profiles")
        func precisProfiles() throws {
            #expect(try PRECISProfiles.usernameCaseMapped("Σigma") == "σigma")
            #expect(try PRECISProfiles.opaqueString("a\u{00A0}b") == "a b")
            #expect(try PRECISProfiles.localpart("Juliet") == "juliet")
            #expect(throws: JIDError(.localpart, .disallowedCharacter("@"))) { try PRECISProfiles.localpart("a@b") }
            #expect(throws: JIDError(.localpart, .empty)) { try PRECISProfiles.usernameCaseMapped("") }
        }

        @Test("SCRAM's byte-level Base64 helpers round-trip and stay strict")
        func base64Bytes() {
            let all = (0 ... 255).map { UInt8($0) }
            for count in [0, 1, 2, 3, 255, 256] {
                let slice = Array(all.prefix(count))
                #expect(Base64.decode(bytes: Base64.encodeBytes(slice)) == slice)
            }
            #expect(Base64.encodeBytes(bytes("foobar")) == bytes("Zm9vYmFy"))
            #expect(Base64.decode(bytes: bytes("Zh==")) == nil)
            #expect(Base64.decode(bytes: bytes("Zm9v\n")) == nil)
            #expect(Base64.decode(bytes: [0x5A, 0x6D, 0x39, 0xC3]) == nil)
        }

        @Test("Constant-time comparison")
        func constantTime() {
            #expect(SecretBytes.constantTimeEqual([1, 2, 3], [1, 2, 3]))
            #expect(SecretBytes.constantTimeEqual([], []))
            #expect(!SecretBytes.constantTimeEqual([1, 2, 3], [1, 2, 4]))
            #expect(!SecretBytes.constantTimeEqual([1, 2, 3], [1, 2]))
            #expect(!SecretBytes.constantTimeEqual([1, 2], [1, 2, 0]))
            #expect(!SecretBytes.constantTimeEqual([0], []))
        }

        @Test("Mechanism names")
        func mechanismNames() {
            #expect(SCRAMHash.sha1.mechanismName == "SCRAM-SHA-1")
            #expect(SCRAMHash.sha256.plusMechanismName == "SCRAM-SHA-256-PLUS")
            #expect(PLAINServer.mechanismName == "PLAIN")
            #expect(SCRAMHash.sha1.digestLength == 20)
            #expect(SCRAMHash.sha256.digestLength == 32)
        }
    }
}

/// Ways to spoil a valid client-final message, each with the condition it must produce.
enum ClientFinalTampering: String, CaseIterable, Sendable {
    case missingProof, proofNotBase64, proofTooShort, bindingNotBase64, bindingForAnotherHeader
    case nonceChanged, mandatoryExtension, proofNotLast

    func apply(_ message: String) -> String {
        let (withoutProof, _) = splitProof(message)
        let afterBinding = String(message.drop(while: { $0 != "," }))
        switch self {
        case .missingProof: return withoutProof
        case .proofNotBase64: return withoutProof + ",p=!!!!"
        case .proofTooShort: return withoutProof + ",p=AAAA"
        case .bindingNotBase64: return "c=b?ws" + afterBinding
        case .bindingForAnotherHeader: return "c=eSws" + afterBinding // "y,,"
        case .nonceChanged: return message.replacingFirst(",r=", with: ",r=X")
        case .mandatoryExtension: return message.replacingFirst(",p=", with: ",m=x,p=")
        case .proofNotLast: return message + ",x=y"
        }
    }

    var expected: SASLFailure {
        switch self {
        case .proofNotBase64, .bindingNotBase64: .incorrectEncoding
        case .bindingForAnotherHeader, .nonceChanged: .notAuthorized
        case .missingProof, .proofTooShort, .mandatoryExtension, .proofNotLast: .malformedRequest
        }
    }
}

/// Splits a client-final message at its proof: (without-proof, proof value).
private func splitProof(_ message: String) -> (String, String) {
    guard let range = message.firstRange(of: ",p=") else { return (message, "") }
    return (String(message[..<range.lowerBound]), String(message[range.upperBound...]))
}

private extension String {
    func replacingFirst(_ target: String, with replacement: String) -> String {
        guard let range = firstRange(of: target) else { return self }
        var copy = self
        copy.replaceSubrange(range, with: replacement)
        return copy
    }
}
