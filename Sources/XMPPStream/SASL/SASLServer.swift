import XMPPCore

/// SASL failure conditions of RFC 6120 §6.5.
public enum SASLFailure: String, Sendable, Hashable, Error, CaseIterable {
    case aborted = "aborted"
    case accountDisabled = "account-disabled"
    case credentialsExpired = "credentials-expired"
    case encryptionRequired = "encryption-required"
    case incorrectEncoding = "incorrect-encoding"
    case invalidAuthzid = "invalid-authzid"
    case invalidMechanism = "invalid-mechanism"
    case malformedRequest = "malformed-request"
    case mechanismTooWeak = "mechanism-too-weak"
    case notAuthorized = "not-authorized"
    case temporaryAuthFailure = "temporary-auth-failure"
}

/// The SCRAM keys of one account for one hash function (RFC 5802 §3). Derived from the
/// password once, at account creation; the password is never kept.
public struct SCRAMServerKeys: Sendable, Hashable {
    public var salt: [UInt8]
    public var iterations: Int
    public var storedKey: [UInt8]
    public var serverKey: [UInt8]

    public init(salt: [UInt8], iterations: Int, storedKey: [UInt8], serverKey: [UInt8]) {
        self.salt = salt
        self.iterations = iterations
        self.storedKey = storedKey
        self.serverKey = serverKey
    }
}

/// The hash functions SCRAM is offered with.
public enum SCRAMHash: String, Sendable, Hashable, CaseIterable {
    case sha1 = "SHA-1"
    case sha256 = "SHA-256"
}

/// Channel-binding data the TLS layer can provide (RFC 5929, RFC 9266).
public struct ChannelBinding: Sendable, Hashable {
    /// The binding type name, such as `tls-server-end-point`.
    public var type: String
    public var data: [UInt8]

    public init(type: String, data: [UInt8]) {
        self.type = type
        self.data = data
    }
}

/// What a server-side SASL exchange asks its caller to do next. The exchange itself does no
/// I/O: looking up an account is an action, and its answer comes back as an input.
public enum SASLServerAction: Sendable, Hashable {
    /// Send `<challenge/>` with these bytes.
    case challenge([UInt8])
    /// Look up the SCRAM keys of `username` (a prepared localpart) for the mechanism's hash,
    /// then call ``SCRAMServer/credentialsReceived(_:)`` with them, or with nil when there is
    /// no such account. The exchange continues identically either way.
    case lookUpSCRAMKeys(username: String)
    /// Check `password` for `username` (PLAIN), then call
    /// ``PLAINServer/verificationFinished(_:)``.
    case verifyPassword(username: String, password: String)
    /// Send `<success/>` with optional additional data: `username` is now authenticated.
    case success(username: String, additionalData: [UInt8]?)
    /// Send `<failure/>` with this condition.
    case failure(SASLFailure)
}
