import Crypto
import CryptoExtras
import XMPPCore

/// Why SCRAM keys could not be derived from a password.
public enum SCRAMKeyDerivationError: Error, Sendable, Hashable {
    /// The password is not valid under the OpaqueString profile (RFC 8265 §4.2), for example
    /// because it is empty or contains control characters.
    case unpreparablePassword(JIDError)
    /// The iteration count is below 1.
    case invalidIterationCount(Int)
    /// The salt is empty.
    case emptySalt
    /// The PBKDF2 implementation reported an error.
    case derivationFailed
}

/// Derivation and checking of the SCRAM keys of RFC 5802 §3, from which both SCRAM and PLAIN
/// logins are served: the server stores only salt, iteration count, StoredKey and ServerKey.
public enum SCRAMKeyDerivation {
    /// Salt length for new accounts; RFC 5802 §5.1 leaves it open, and 16 random bytes is
    /// what current deployments use.
    public static let saltLength = 16

    /// Derives the stored keys from `password`:
    ///
    ///     SaltedPassword := Hi(Normalize(password), salt, i)
    ///     ClientKey      := HMAC(SaltedPassword, "Client Key")
    ///     StoredKey      := H(ClientKey)
    ///     ServerKey      := HMAC(SaltedPassword, "Server Key")
    ///
    /// Normalize is the OpaqueString profile (RFC 8265 §4.1 replaces SASLprep for passwords),
    /// and Hi is PBKDF2 with HMAC-H (RFC 5802 §2.2). swift-crypto's checked PBKDF2 refuses
    /// fewer than 210,000 rounds, but SCRAM's interoperable minimum is 4096 (RFC 5802 §5.1,
    /// RFC 7677 §4), so the unchecked entry point is used; the caller picks the count.
    public static func deriveKeys(password: String, salt: [UInt8], iterations: Int, hash: SCRAMHash) throws(SCRAMKeyDerivationError) -> SCRAMServerKeys {
        let prepared: String
        do {
            prepared = try PRECISProfiles.opaqueString(password)
        } catch {
            throw .unpreparablePassword(error)
        }
        let salted = try saltedPassword(preparedPassword: prepared, salt: salt, iterations: iterations, hash: hash)
        return keys(saltedPassword: salted, salt: salt, iterations: iterations, hash: hash)
    }

    /// Derives keys for a new password with a fresh random salt of ``saltLength`` bytes.
    public static func newKeys(password: String, iterations: Int, hash: SCRAMHash) throws(SCRAMKeyDerivationError) -> SCRAMServerKeys {
        try deriveKeys(password: password, salt: SecretBytes.random(count: saltLength), iterations: iterations, hash: hash)
    }

    /// Whether `password` matches `keys`: derives StoredKey with the stored salt and count and
    /// compares it in constant time. Used for PLAIN logins (RFC 4616), where the password
    /// arrives in the clear. A password that cannot be prepared matches nothing.
    ///
    /// For an unknown user, call this with ``fakeKeys(username:serverSecret:iterations:hash:)``
    /// so the answer takes as long as for a real account (RFC 6120 §13.11, directory
    /// harvesting): the PBKDF2 cost dominates and depends only on the iteration count.
    public static func verify(password: String, keys: SCRAMServerKeys, hash: SCRAMHash) -> Bool {
        guard let derived = try? deriveKeys(password: password, salt: keys.salt, iterations: keys.iterations, hash: hash) else {
            return false
        }
        return SecretBytes.constantTimeEqual(derived.storedKey, keys.storedKey)
    }

    /// Keys for an account that does not exist, so that SCRAM and PLAIN treat unknown users
    /// exactly like known ones with a wrong password, and the existence of an account cannot
    /// be probed through authentication (RFC 6120 §13.11, directory harvesting).
    ///
    /// Everything is derived deterministically from `username` and `serverSecret` by HMAC, so
    /// repeated attempts for the same name see the same salt (a changing salt would give the
    /// name away), the salt has the same length as a real one, and the keys look random.
    /// No password matches them except by breaking HMAC. `serverSecret` must be a per-server
    /// secret of at least 32 random bytes, kept stable across restarts; `iterations` should be
    /// the count used for new accounts.
    public static func fakeKeys(username: String, serverSecret: [UInt8], iterations: Int, hash: SCRAMHash) -> SCRAMServerKeys {
        // Domain separation: one input string per output, prefixed by the hash name so that
        // SHA-1 and SHA-256 fake salts differ as real ones would.
        func derive(_ label: String) -> [UInt8] {
            let input = Array("braid-scram-fake/\(hash.rawValue)/\(label)/".utf8) + Array(username.utf8)
            return SCRAMHash.sha256.hmac(key: serverSecret, data: input)
        }
        let salt = Array(derive("salt").prefix(saltLength))
        let storedKey = Array(derive("stored-key").prefix(hash.digestLength))
        let serverKey = Array(derive("server-key").prefix(hash.digestLength))
        return SCRAMServerKeys(salt: salt, iterations: iterations, storedKey: storedKey, serverKey: serverKey)
    }

    // MARK: - Internals shared with SCRAMClient

    /// Hi(password, salt, i) of RFC 5802 §2.2, which is PBKDF2 (RFC 8018 §5.2) with
    /// HMAC-H as the PRF and one block of output.
    static func saltedPassword(preparedPassword: String, salt: [UInt8], iterations: Int, hash: SCRAMHash) throws(SCRAMKeyDerivationError) -> [UInt8] {
        guard iterations >= 1 else { throw .invalidIterationCount(iterations) }
        guard !salt.isEmpty else { throw .emptySalt }
        let function: KDF.Insecure.PBKDF2.HashFunction = switch hash {
        case .sha1: .insecureSHA1
        case .sha256: .sha256
        }
        do {
            let key = try KDF.Insecure.PBKDF2.deriveKey(
                from: Array(preparedPassword.utf8),
                salt: salt,
                using: function,
                outputByteCount: hash.digestLength,
                unsafeUncheckedRounds: iterations
            )
            return key.withUnsafeBytes { Array($0) }
        } catch {
            throw .derivationFailed
        }
    }

    static func clientKey(saltedPassword: [UInt8], hash: SCRAMHash) -> [UInt8] {
        hash.hmac(key: saltedPassword, data: Array("Client Key".utf8))
    }

    static func keys(saltedPassword: [UInt8], salt: [UInt8], iterations: Int, hash: SCRAMHash) -> SCRAMServerKeys {
        let clientKey = clientKey(saltedPassword: saltedPassword, hash: hash)
        return SCRAMServerKeys(
            salt: salt,
            iterations: iterations,
            storedKey: hash.hash(clientKey),
            serverKey: hash.hmac(key: saltedPassword, data: Array("Server Key".utf8))
        )
    }
}
