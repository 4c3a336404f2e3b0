import XMPPCore

/// Why a client-side SCRAM exchange failed.
public enum SCRAMClientError: Error, Sendable, Hashable {
    /// A message was supplied in the wrong state, or after the exchange ended.
    case outOfOrder
    /// The server's message does not follow RFC 5802 §7.
    case malformedServerMessage
    /// The server demanded a mandatory extension (`m=`), which we cannot honour (RFC 5802 §5.1).
    case unsupportedMandatoryExtension
    /// The server nonce does not extend ours (RFC 5802 §5.1, "r" attribute).
    case nonceMismatch
    /// The server asked for fewer iterations than we accept.
    case iterationCountTooLow(Int)
    /// The password is not valid under OpaqueString.
    case unpreparablePassword(JIDError)
    /// PBKDF2 failed.
    case keyDerivationFailed
    /// The server ended the exchange with `e=` and this value (RFC 5802 §7, server-error).
    case serverError(String)
    /// The server's `v=` is not the signature the password implies: the server does not
    /// know our keys (RFC 5802 §5.1, "v" attribute).
    case serverSignatureMismatch
}

/// The client side of SCRAM (RFC 5802, RFC 7677), for Braid's tests and outgoing connections.
/// It does no I/O: the caller sends ``clientFirstMessage()`` in `<auth/>`, passes each
/// challenge to ``serverFirstReceived(_:)`` and sends the result, then passes the additional
/// data of `<success/>` to ``serverFinalReceived(_:)``, which must not throw for the server
/// to be considered authenticated.
public struct SCRAMClient: Sendable {
    public let hash: SCRAMHash
    public let username: String
    public let authzid: String?
    public let channelBinding: ChannelBinding?
    /// The lowest iteration count accepted from the server.
    public let minimumIterations: Int
    private let password: String
    private let header: GS2Header
    private let clientNonce: [UInt8]

    private enum State: Sendable {
        case initial
        case awaitingServerFirst(clientFirstBare: [UInt8])
        case awaitingServerFinal(expectedSignature: [UInt8])
        case finished
    }

    private var state: State = .initial

    /// Whether the server proved knowledge of our keys with a valid `v=`.
    public private(set) var isServerAuthenticated = false

    /// - Parameters:
    ///   - username: sent as given (escaped for `,` and `=`); the server prepares it.
    ///   - password: prepared with OpaqueString before key derivation (RFC 8265 §4.1).
    ///   - authzid: sent in the GS2 header as `a=`, or nothing when nil.
    ///   - channelBinding: non-nil selects the -PLUS mechanism with this binding type and
    ///     the data our TLS layer computed for the connection (GS2 flag `p=`).
    ///   - clientSupportsChannelBinding: used only when `channelBinding` is nil: true sends the
    ///     `y` flag ("I could bind, but you offered no -PLUS"), which lets a server that did
    ///     offer -PLUS detect a downgrade; false sends `n` (RFC 5802 §6).
    ///   - minimumIterations: the lowest iteration count accepted; RFC 7677 §4 sets 4096 as
    ///     the floor, so the default refuses anything weaker. Tests may lower it.
    public init(
        hash: SCRAMHash,
        username: String,
        password: String,
        authzid: String? = nil,
        channelBinding: ChannelBinding? = nil,
        clientSupportsChannelBinding: Bool = false,
        minimumIterations: Int = 4096
    ) {
        self.init(
            hash: hash, username: username, password: password, authzid: authzid,
            channelBinding: channelBinding, clientSupportsChannelBinding: clientSupportsChannelBinding,
            minimumIterations: minimumIterations,
            clientNonce: Base64.encodeBytes(SecretBytes.random(count: SCRAMServer.serverNonceByteCount))
        )
    }

    /// As the public initializer, with a fixed client nonce (tests only).
    init(
        hash: SCRAMHash, username: String, password: String, authzid: String?,
        channelBinding: ChannelBinding?, clientSupportsChannelBinding: Bool,
        minimumIterations: Int, clientNonce: [UInt8]
    ) {
        self.hash = hash
        self.username = username
        self.password = password
        self.authzid = authzid
        self.channelBinding = channelBinding
        self.minimumIterations = minimumIterations
        self.clientNonce = clientNonce
        let flag: GS2Header.ChannelBindingFlag = if let channelBinding {
            .used(type: channelBinding.type)
        } else if clientSupportsChannelBinding {
            .supportedButNotUsed
        } else {
            .notSupported
        }
        self.header = GS2Header(flag: flag, authzid: authzid)
    }

    /// The mechanism to request: `SCRAM-SHA-1`, `SCRAM-SHA-256-PLUS`, ...
    public var mechanismName: String {
        channelBinding == nil ? hash.mechanismName : hash.plusMechanismName
    }

    /// client-first-message = gs2-header client-first-message-bare, to send as the initial
    /// response (or in reply to an empty challenge).
    public mutating func clientFirstMessage() throws(SCRAMClientError) -> [UInt8] {
        guard case .initial = state else { throw fail(.outOfOrder) }
        let bare = Array("n=".utf8) + SCRAMSyntax.encodeSaslname(username) + Array(",r=".utf8) + clientNonce
        state = .awaitingServerFirst(clientFirstBare: bare)
        return header.encoded + bare
    }

    /// Takes the server-first message and returns client-final-message.
    public mutating func serverFirstReceived(_ bytes: [UInt8]) throws(SCRAMClientError) -> [UInt8] {
        guard case .awaitingServerFirst(let clientFirstBare) = state else { throw fail(.outOfOrder) }

        // server-first-message = [reserved-mext ","] nonce "," salt "," iteration-count ["," extensions]
        let fields = SCRAMSyntax.fields(bytes[...])
        if let first = fields.first, SCRAMSyntax.value(of: first, named: "m") != nil {
            throw fail(.unsupportedMandatoryExtension)
        }
        guard SCRAMSyntax.isTextWithoutNUL(bytes[...]), fields.count >= 3,
              let nonce = SCRAMSyntax.value(of: fields[0], named: "r"), SCRAMSyntax.isValidNonce(nonce),
              let encodedSalt = SCRAMSyntax.value(of: fields[1], named: "s"),
              let salt = Base64.decode(bytes: encodedSalt), !salt.isEmpty,
              let countField = SCRAMSyntax.value(of: fields[2], named: "i"),
              let iterations = SCRAMSyntax.parseIterationCount(countField),
              fields.dropFirst(3).allSatisfy(SCRAMSyntax.isIgnorableExtension) else {
            throw fail(.malformedServerMessage)
        }
        // The server must echo our nonce and add its own part to it.
        guard nonce.count > clientNonce.count, nonce.starts(with: clientNonce) else { throw fail(.nonceMismatch) }
        guard iterations >= minimumIterations else { throw fail(.iterationCountTooLow(iterations)) }

        let preparedPassword: String
        do {
            preparedPassword = try PRECISProfiles.opaqueString(password)
        } catch {
            throw fail(.unpreparablePassword(error))
        }
        let saltedPassword: [UInt8]
        do {
            saltedPassword = try SCRAMKeyDerivation.saltedPassword(preparedPassword: preparedPassword, salt: salt, iterations: iterations, hash: hash)
        } catch {
            throw fail(.keyDerivationFailed)
        }
        let keys = SCRAMKeyDerivation.keys(saltedPassword: saltedPassword, salt: salt, iterations: iterations, hash: hash)
        let clientKey = SCRAMKeyDerivation.clientKey(saltedPassword: saltedPassword, hash: hash)

        // c= covers the GS2 header, then the channel-binding data when binding (RFC 5802 §7).
        let bindingInput = header.encoded + (channelBinding?.data ?? [])
        let withoutProof = Array("c=".utf8) + Base64.encodeBytes(bindingInput) + Array(",r=".utf8) + Array(nonce)
        let authMessage = clientFirstBare + [SCRAMSyntax.comma] + bytes + [SCRAMSyntax.comma] + withoutProof
        // ClientProof := ClientKey XOR HMAC(StoredKey, AuthMessage) (RFC 5802 §3)
        let proof = SecretBytes.xor(clientKey, hash.hmac(key: keys.storedKey, data: authMessage))
        let expectedSignature = hash.hmac(key: keys.serverKey, data: authMessage)
        state = .awaitingServerFinal(expectedSignature: expectedSignature)
        return withoutProof + Array(",p=".utf8) + Base64.encodeBytes(proof)
    }

    /// Takes server-final-message (the additional data of `<success/>`) and checks the
    /// server's signature. Returns normally only when the server is authenticated.
    public mutating func serverFinalReceived(_ bytes: [UInt8]) throws(SCRAMClientError) {
        guard case .awaitingServerFinal(let expectedSignature) = state else { throw fail(.outOfOrder) }
        // server-final-message = (server-error / verifier) ["," extensions]
        let fields = SCRAMSyntax.fields(bytes[...])
        guard SCRAMSyntax.isTextWithoutNUL(bytes[...]), let first = fields.first else { throw fail(.malformedServerMessage) }
        if let error = SCRAMSyntax.value(of: first, named: "e") {
            throw fail(.serverError(String(decoding: error, as: UTF8.self)))
        }
        guard let encoded = SCRAMSyntax.value(of: first, named: "v"),
              let signature = Base64.decode(bytes: encoded),
              fields.dropFirst().allSatisfy(SCRAMSyntax.isIgnorableExtension) else {
            throw fail(.malformedServerMessage)
        }
        guard SecretBytes.constantTimeEqual(signature, expectedSignature) else { throw fail(.serverSignatureMismatch) }
        state = .finished
        isServerAuthenticated = true
    }

    private mutating func fail(_ error: SCRAMClientError) -> SCRAMClientError {
        state = .finished
        return error
    }
}
