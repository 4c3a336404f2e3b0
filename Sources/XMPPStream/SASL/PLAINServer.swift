import XMPPCore

/// The server side of SASL PLAIN (RFC 4616) as a state machine that does no I/O.
///
///     start(initialResponse:)   → .challenge([]) without an initial response, then
///     responseReceived(message)   (or directly, with one:)
///                               → .verifyPassword(username:, password:)
///     verificationFinished(ok)  → .success(username:, additionalData: nil)
///                                 or .failure(.notAuthorized)
///
/// Both the username (authcid) and the password are PRECIS-prepared before they are handed
/// out: the username as a localpart (UsernameCaseMapped, RFC 8265 §3.4) and the password with
/// OpaqueString (RFC 8265 §4.2), which is how SCRAM keys are derived too, so a password checks
/// out the same way over PLAIN and SCRAM.
///
/// **Unknown users.** The caller should answer `.verifyPassword` for an unknown user by
/// calling ``SCRAMKeyDerivation/verify(password:keys:hash:)`` on
/// ``SCRAMKeyDerivation/fakeKeys(username:serverSecret:iterations:hash:)`` and then
/// `verificationFinished(false)`, so the reply takes the same PBKDF2 time as a wrong password
/// (RFC 6120 §13.11). A username or password that cannot be prepared names no account and
/// fails at once with `not-authorized`.
///
/// **Authorization identity.** As with ``SCRAMServer``, a non-empty authzid is exposed as
/// ``authzid`` and the caller checks it on `.success` (RFC 6120 §6.3.8),
/// answering `invalid-authzid` when it is not the authenticated account's bare JID.
public struct PLAINServer: Sendable {
    public static let mechanismName = "PLAIN"

    /// The authzid sent by the client, or nil when the field was empty.
    public private(set) var authzid: String?
    /// The prepared username, set when the exchange ends in `.success`.
    public private(set) var authenticatedUsername: String?

    private enum State: Sendable {
        case initial
        case awaitingMessage
        case awaitingVerification(username: String)
        case finished
    }

    private var state: State = .initial

    public init() {}

    /// Whether the exchange has ended, in success or failure.
    public var isFinished: Bool {
        if case .finished = state { true } else { false }
    }

    /// Begins the exchange with the `<auth/>` element's content; nil means no initial
    /// response, answered with an empty challenge (RFC 6120 §6.4.2).
    public mutating func start(initialResponse: [UInt8]?) -> SASLServerAction {
        guard case .initial = state else { return fail(.malformedRequest) }
        guard let initialResponse else {
            state = .awaitingMessage
            return .challenge([])
        }
        return messageReceived(initialResponse)
    }

    /// The content of a `<response/>`.
    public mutating func responseReceived(_ bytes: [UInt8]) -> SASLServerAction {
        guard case .awaitingMessage = state else { return fail(.malformedRequest) }
        return messageReceived(bytes)
    }

    /// The caller's answer to `.verifyPassword`.
    public mutating func verificationFinished(_ ok: Bool) -> SASLServerAction {
        guard case .awaitingVerification(let username) = state else { return fail(.malformedRequest) }
        guard ok else { return fail(.notAuthorized) }
        state = .finished
        authenticatedUsername = username
        return .success(username: username, additionalData: nil)
    }

    /// The client sent `<abort/>` (RFC 6120 §6.4.4).
    public mutating func abort() -> SASLServerAction {
        if case .finished = state { return .failure(.malformedRequest) }
        return fail(.aborted)
    }

    /// message = [authzid] UTF8NUL authcid UTF8NUL passwd (RFC 4616 §2)
    private mutating func messageReceived(_ bytes: [UInt8]) -> SASLServerAction {
        let parts = bytes.split(separator: 0, omittingEmptySubsequences: false)
        guard parts.count == 3,
              let requestedAuthzid = String(validating: parts[0], as: UTF8.self),
              let authcid = String(validating: parts[1], as: UTF8.self),
              let password = String(validating: parts[2], as: UTF8.self) else {
            return fail(.malformedRequest)
        }
        // authcid is 1*SAFE: an empty one is a syntax error. An empty password can match no
        // account (OpaqueString rejects it), so it is simply the wrong password.
        guard !authcid.isEmpty else { return fail(.malformedRequest) }
        guard !password.isEmpty else { return fail(.notAuthorized) }
        authzid = requestedAuthzid.isEmpty ? nil : requestedAuthzid
        guard let username = try? PRECISProfiles.localpart(authcid),
              let preparedPassword = try? PRECISProfiles.opaqueString(password) else {
            return fail(.notAuthorized)
        }
        state = .awaitingVerification(username: username)
        return .verifyPassword(username: username, password: preparedPassword)
    }

    private mutating func fail(_ failure: SASLFailure) -> SASLServerAction {
        state = .finished
        return .failure(failure)
    }
}
