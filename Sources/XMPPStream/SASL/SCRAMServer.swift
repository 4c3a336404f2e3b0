import XMPPCore

/// The server side of SCRAM-SHA-1, SCRAM-SHA-256 and their -PLUS variants (RFC 5802,
/// RFC 7677) as a state machine that does no I/O. The caller feeds it the decoded contents of
/// `<auth/>`, `<response/>` and `<abort/>` (RFC 6120 §6.4) and performs the returned
/// ``SASLServerAction``s.
///
/// The exchange:
///
///     start(initialResponse:)      → .challenge([]) if there was no initial response, then
///     responseReceived(clientFirst)  (or directly, with an initial response:)
///                                  → .lookUpSCRAMKeys(username:)
///     credentialsReceived(keys?)   → .challenge(server-first-message)
///     responseReceived(clientFinal)→ .success(username:, additionalData: "v=…")
///                                    or .failure(.notAuthorized)
///
/// Any call after the exchange has finished, or in the wrong state, gives
/// `.failure(.malformedRequest)`; every `.failure` ends the exchange.
///
/// **Unknown users.** When the account does not exist (`credentialsReceived(nil)`), or the
/// username cannot be prepared, the exchange continues with keys derived from the username and
/// the server secret (``SCRAMKeyDerivation/fakeKeys(username:serverSecret:iterations:hash:)``).
/// The server-first message has the same form, the salt is stable for the name, and the
/// exchange fails at the client-final step with `not-authorized`, exactly as for a wrong
/// password, so an attacker cannot harvest account names (RFC 6120 §13.11).
///
/// **Authorization identity.** The state machine does not know the domain, so it does not
/// judge the `a=` authzid. It is exposed as ``authzid`` once the client-first
/// message is parsed. When the caller receives `.success`, it must check it (RFC 6120 §6.3.8;
/// an account may act only as itself, so an authzid other than the bare JID
/// `username@domain` is refused) and, if it is not acceptable, send
/// `<failure><invalid-authzid/></failure>` instead of `<success/>`.
public struct SCRAMServer: Sendable {
    /// The hash this exchange uses.
    public let hash: SCRAMHash
    /// Non-empty when this is the -PLUS mechanism: the binding types this connection can
    /// provide, each with the data the TLS layer computed (`tls-exporter`, RFC 9266, the
    /// exported keying material; `tls-server-end-point`, RFC 5929 §4, the hash of our
    /// certificate). The client picks one with `p=`.
    public let channelBindings: [ChannelBinding]
    /// Whether the server advertised any -PLUS mechanism on this stream. A non-PLUS exchange
    /// uses it to detect a downgrade: a client that sends the `y` flag supports channel
    /// binding but saw no -PLUS offer, so someone removed it (RFC 5802 §6).
    public let plusOffered: Bool
    /// The iteration count announced for unknown users; it should equal the count used for
    /// new accounts, so fake and real challenges look the same.
    public let fakeIterations: Int
    private let serverSecret: [UInt8]
    /// Test hook: a fixed server nonce, so that the RFC examples can be reproduced.
    private let fixedServerNonce: [UInt8]?

    /// The authzid from the GS2 header (unescaped, not prepared), or nil when the client sent
    /// none. Available once the client-first message has been parsed; see the type's notes.
    public private(set) var authzid: String?
    /// The prepared username, set when the exchange ends in `.success`.
    public private(set) var authenticatedUsername: String?
    /// RFC 5802 §7's `server-error-value` for a failure the client can act on, such as
    /// `unsupported-channel-binding-type`; nil for every other failure (in particular a wrong
    /// password or an unknown user, which must look alike).
    public private(set) var serverError: String?

    private var state: State = .initial

    /// Server-side nonce length in random bytes before Base64; RFC 5802 §5.1 asks for a
    /// fresh, hard-to-predict value, and 18 bytes give 144 bits in 24 characters.
    static let serverNonceByteCount = 18

    private struct Exchange: Sendable {
        var clientFirst: SCRAMClientFirst
        /// The prepared username, or nil when it could not be prepared.
        var username: String?
        /// What the client's `c=` must decode to: GS2 header plus channel-binding data.
        var expectedChannelBinding: [UInt8]
    }

    private enum State: Sendable {
        case initial
        case awaitingClientFirst
        case awaitingCredentials(Exchange)
        case awaitingClientFinal(Exchange, keys: SCRAMServerKeys, isFake: Bool, serverFirst: [UInt8], nonce: [UInt8])
        case finished
    }

    /// - Parameters:
    ///   - hash: SHA-1 or SHA-256.
    ///   - channelBindings: non-empty for the -PLUS mechanism: the binding types and data the
    ///     TLS layer computed for this connection. The client must use one of these types.
    ///   - plusOffered: whether -PLUS mechanisms were advertised on this stream (downgrade
    ///     detection for the non-PLUS mechanism; ignored when `channelBindings` is non-empty).
    ///   - serverSecret: a per-server secret (at least 32 random bytes, stable across
    ///     restarts) from which fake keys for unknown users are derived.
    ///   - fakeIterations: the iteration count to announce for unknown users (≥ 1).
    public init(hash: SCRAMHash, channelBindings: [ChannelBinding], plusOffered: Bool, serverSecret: [UInt8], fakeIterations: Int) {
        self.init(hash: hash, channelBindings: channelBindings, plusOffered: plusOffered, serverSecret: serverSecret, fakeIterations: fakeIterations, fixedServerNonce: nil)
    }

    /// As the public initializer, with a fixed server nonce (tests only).
    init(hash: SCRAMHash, channelBindings: [ChannelBinding], plusOffered: Bool, serverSecret: [UInt8], fakeIterations: Int, fixedServerNonce: [UInt8]?) {
        precondition(fakeIterations >= 1, "SCRAM iteration counts start at 1")
        self.hash = hash
        self.channelBindings = channelBindings
        self.plusOffered = plusOffered
        self.serverSecret = serverSecret
        self.fakeIterations = fakeIterations
        self.fixedServerNonce = fixedServerNonce
    }

    /// The mechanism name this exchange implements, such as `SCRAM-SHA-256-PLUS`.
    public var mechanismName: String {
        channelBindings.isEmpty ? hash.mechanismName : hash.plusMechanismName
    }

    /// Whether the exchange has ended, in success or failure.
    public var isFinished: Bool {
        if case .finished = state { true } else { false }
    }

    // MARK: - Inputs

    /// Begins the exchange with the `<auth/>` element's content. `nil` means the element had
    /// no initial response: SCRAM is client-first, so the server sends an empty challenge and
    /// waits (RFC 6120 §6.4.2, RFC 4422 §5). An empty array is an empty initial response
    /// (`=`), which is not a valid client-first message.
    public mutating func start(initialResponse: [UInt8]?) -> SASLServerAction {
        guard case .initial = state else { return fail(.malformedRequest) }
        guard let initialResponse else {
            state = .awaitingClientFirst
            return .challenge([])
        }
        return clientFirstReceived(initialResponse)
    }

    /// The caller's answer to `.lookUpSCRAMKeys`: the account's keys for ``hash``, or nil
    /// when there is no such account. Keys with the wrong shape (a storage fault) end the
    /// exchange with `temporary-auth-failure`.
    public mutating func credentialsReceived(_ keys: SCRAMServerKeys?) -> SASLServerAction {
        guard case .awaitingCredentials(let exchange) = state else { return fail(.malformedRequest) }
        guard let keys else {
            return sendServerFirst(exchange, keys: fakeKeys(for: exchange), isFake: true)
        }
        guard keys.iterations >= 1, !keys.salt.isEmpty,
              keys.storedKey.count == hash.digestLength,
              keys.serverKey.count == hash.digestLength else {
            return fail(.temporaryAuthFailure)
        }
        return sendServerFirst(exchange, keys: keys, isFake: false)
    }

    /// The content of a `<response/>`.
    public mutating func responseReceived(_ bytes: [UInt8]) -> SASLServerAction {
        switch state {
        case .awaitingClientFirst:
            return clientFirstReceived(bytes)
        case .awaitingClientFinal(let exchange, let keys, let isFake, let serverFirst, let nonce):
            return clientFinalReceived(bytes, exchange: exchange, keys: keys, isFake: isFake, serverFirst: serverFirst, nonce: nonce)
        case .initial, .awaitingCredentials, .finished:
            return fail(.malformedRequest)
        }
    }

    /// The client sent `<abort/>` (RFC 6120 §6.4.4).
    public mutating func abort() -> SASLServerAction {
        if case .finished = state { return .failure(.malformedRequest) }
        return fail(.aborted)
    }

    // MARK: - Steps

    private mutating func clientFirstReceived(_ bytes: [UInt8]) -> SASLServerAction {
        let clientFirst: SCRAMClientFirst
        do {
            clientFirst = try SCRAMClientFirst.parse(bytes)
        } catch {
            return fail(error)
        }

        // Channel binding negotiation, RFC 5802 §6.
        var expectedChannelBinding = clientFirst.headerBytes
        switch (clientFirst.header.flag, channelBindings.isEmpty) {
        case (.used(let type), false):
            // -PLUS: the client must bind to a type we can provide. One we cannot (for
            // example `tls-unique`, undefined on TLS 1.3, RFC 9266 §3) fails at once with
            // RFC 5802's `unsupported-channel-binding-type`, so the client can try another.
            guard let binding = channelBindings.first(where: { $0.type == type }) else {
                serverError = "unsupported-channel-binding-type"
                return fail(.notAuthorized)
            }
            expectedChannelBinding += binding.data
        case (.notSupported, false), (.supportedButNotUsed, false):
            // The client chose a -PLUS mechanism but does not bind: contradictory.
            return fail(.malformedRequest)
        case (.used, true):
            // Binding requested on a mechanism without it.
            return fail(.malformedRequest)
        case (.supportedButNotUsed, true):
            // The client could bind but saw no -PLUS offer. If we made one, the offer was
            // stripped in transit: a downgrade attack, which the server MUST refuse.
            if plusOffered {
                serverError = "server-does-support-channel-binding"
                return fail(.notAuthorized)
            }
        case (.notSupported, true):
            break
        }
        authzid = clientFirst.header.authzid

        // The username is the account's localpart (RFC 6120 §6.3.7), prepared as one. A name
        // that cannot be prepared names no account; it continues as an unknown user so the
        // client learns nothing before the final step.
        let username = try? PRECISProfiles.localpart(clientFirst.username)
        let exchange = Exchange(clientFirst: clientFirst, username: username, expectedChannelBinding: expectedChannelBinding)
        guard let username else {
            return sendServerFirst(exchange, keys: fakeKeys(for: exchange), isFake: true)
        }
        state = .awaitingCredentials(exchange)
        return .lookUpSCRAMKeys(username: username)
    }

    private func fakeKeys(for exchange: Exchange) -> SCRAMServerKeys {
        SCRAMKeyDerivation.fakeKeys(
            username: exchange.username ?? exchange.clientFirst.username,
            serverSecret: serverSecret,
            iterations: fakeIterations,
            hash: hash
        )
    }

    /// server-first-message = [reserved-mext ","] nonce "," salt "," iteration-count
    private mutating func sendServerFirst(_ exchange: Exchange, keys: SCRAMServerKeys, isFake: Bool) -> SASLServerAction {
        let serverNonce = fixedServerNonce ?? Base64.encodeBytes(SecretBytes.random(count: Self.serverNonceByteCount))
        let nonce = exchange.clientFirst.nonce + serverNonce
        var message = Array("r=".utf8) + nonce
        message += Array(",s=".utf8) + Base64.encodeBytes(keys.salt)
        message += Array(",i=\(keys.iterations)".utf8)
        state = .awaitingClientFinal(exchange, keys: keys, isFake: isFake, serverFirst: message, nonce: nonce)
        return .challenge(message)
    }

    private mutating func clientFinalReceived(
        _ bytes: [UInt8], exchange: Exchange, keys: SCRAMServerKeys, isFake: Bool, serverFirst: [UInt8], nonce: [UInt8]
    ) -> SASLServerAction {
        let clientFinal: SCRAMClientFinal
        do {
            clientFinal = try SCRAMClientFinal.parse(bytes, proofLength: hash.digestLength)
        } catch {
            return fail(error)
        }
        // c= must repeat the GS2 header and, for -PLUS, carry our channel's binding data
        // (RFC 5802 §5.1, "c" attribute); a mismatch means another channel, or tampering.
        guard SecretBytes.constantTimeEqual(clientFinal.channelBinding, exchange.expectedChannelBinding) else {
            return fail(.notAuthorized)
        }
        // r= must be exactly the combined nonce we sent (RFC 5802 §5.1, "r" attribute).
        guard clientFinal.nonce == nonce else { return fail(.notAuthorized) }

        // RFC 5802 §3:
        //   AuthMessage     := client-first-message-bare + "," + server-first-message + ","
        //                      + client-final-message-without-proof
        //   ClientSignature := HMAC(StoredKey, AuthMessage)
        //   ClientKey       := ClientProof XOR ClientSignature
        //   the proof holds when H(ClientKey) = StoredKey
        let authMessage = exchange.clientFirst.bare + [SCRAMSyntax.comma] + serverFirst + [SCRAMSyntax.comma] + clientFinal.withoutProof
        let clientSignature = hash.hmac(key: keys.storedKey, data: authMessage)
        let clientKey = SecretBytes.xor(clientFinal.proof, clientSignature)
        let proofHolds = SecretBytes.constantTimeEqual(hash.hash(clientKey), keys.storedKey)
        // Fake keys are never accepted, whatever the proof (defence in depth).
        guard proofHolds, !isFake, let username = exchange.username else { return fail(.notAuthorized) }

        // ServerSignature := HMAC(ServerKey, AuthMessage), sent as server-final "v=".
        let serverSignature = hash.hmac(key: keys.serverKey, data: authMessage)
        state = .finished
        authenticatedUsername = username
        return .success(username: username, additionalData: Array("v=".utf8) + Base64.encodeBytes(serverSignature))
    }

    private mutating func fail(_ failure: SASLFailure) -> SASLServerAction {
        state = .finished
        return .failure(failure)
    }
}
