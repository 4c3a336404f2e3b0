#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

import Crypto
import Foundation

/// Base64url without padding (RFC 8555 §6.1, RFC 7515 §2), as every JWS field is written.
enum Base64URL {
    static func encode(_ bytes: some DataProtocol) -> String {
        Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }
}

/// The ACME account key: one P-256 key for the life of the account, kept in
/// `<data>/acme/account.key` (mode 0600), because the CA knows the account by it.
struct ACMEAccountKey: Sendable {
    let privateKey: P256.Signing.PrivateKey

    init(privateKey: P256.Signing.PrivateKey) {
        self.privateKey = privateKey
    }

    /// Loads the key at `path`, or makes one and writes it there (mode 0600, atomically) when
    /// there is none. A file that exists but does not parse is an error: replacing it would
    /// silently lose the account.
    static func loadOrCreate(at path: String) throws(ACMEError) -> ACMEAccountKey {
        let manager = FileManager.default
        if manager.fileExists(atPath: path) {
            do {
                let text = try String(contentsOfFile: path, encoding: .utf8)
                return ACMEAccountKey(privateKey: try P256.Signing.PrivateKey(pemRepresentation: text))
            } catch {
                throw ACMEError(.configuration, "cannot read the ACME account key \(path): \(error)")
            }
        }
        let key = P256.Signing.PrivateKey()
        do {
            try manager.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
                                        attributes: [.posixPermissions: 0o700])
        } catch {
            throw ACMEError(.configuration, "cannot create the directory of \(path): \(error)")
        }
        try ACMEFiles.writeAtomically(key.pemRepresentation, to: path, mode: 0o600)
        return ACMEAccountKey(privateKey: key)
    }

    /// The public key as a JWK (RFC 7518 §6.2.1), members in lexicographic order so the same
    /// text serves the thumbprint (RFC 7638 §3).
    struct JWK: Codable, Sendable, Equatable {
        var crv = "P-256"
        var kty = "EC"
        var x: String
        var y: String
    }

    var jwk: JWK {
        // rawRepresentation is x ‖ y, 32 bytes each.
        let raw = privateKey.publicKey.rawRepresentation
        return JWK(x: Base64URL.encode(raw.prefix(32)), y: Base64URL.encode(raw.suffix(32)))
    }

    /// RFC 7638 thumbprint: SHA-256 over the required members, no whitespace, sorted keys.
    var thumbprint: String {
        let key = jwk
        let canonical = #"{"crv":"\#(key.crv)","kty":"\#(key.kty)","x":"\#(key.x)","y":"\#(key.y)"}"#
        return Base64URL.encode(Array(SHA256.hash(data: Data(canonical.utf8))))
    }

    /// The key authorisation for a challenge token (RFC 8555 §8.1).
    func keyAuthorization(token: String) -> String {
        "\(token).\(thumbprint)"
    }

    /// The protected header (RFC 8555 §6.2): `jwk` for newAccount, `kid` once the account URL
    /// is known.
    enum Signer: Sendable {
        case jwk
        case kid(String)
    }

    private struct ProtectedHeader: Encodable {
        var alg = "ES256"
        var jwk: JWK?
        var kid: String?
        var nonce: String
        var url: String
    }

    private struct FlattenedJWS: Encodable {
        var protected: String
        var payload: String
        var signature: String
    }

    /// A flattened JWS (RFC 7515 §7.2.2) over `payload`; nil payload is POST-as-GET (an
    /// empty string, RFC 8555 §6.3).
    func sign(payload: Data?, url: String, nonce: String, signer: Signer) throws(ACMEError) -> Data {
        var header = ProtectedHeader(nonce: nonce, url: url)
        switch signer {
        case .jwk: header.jwk = jwk
        case .kid(let account): header.kid = account
        }
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let protected = Base64URL.encode(try encoder.encode(header))
            let body = payload.map(Base64URL.encode) ?? ""
            // ES256 signatures are r ‖ s, 32 bytes each (RFC 7518 §3.4), which is what
            // rawRepresentation gives, not DER.
            let signature = try privateKey.signature(for: Data("\(protected).\(body)".utf8))
            return try encoder.encode(FlattenedJWS(protected: protected, payload: body, signature: Base64URL.encode(signature.rawRepresentation)))
        } catch {
            throw ACMEError(.internal, "cannot sign a request: \(error)")
        }
    }
}

/// Writing files so that a reader never sees half of one.
enum ACMEFiles {
    /// Writes `text` to a temporary file beside `path`, created with `mode`, then renames it
    /// over `path`.
    static func writeAtomically(_ text: String, to path: String, mode: mode_t) throws(ACMEError) {
        let temporary = path + ".tmp-\(UInt64.random(in: 0 ... UInt64.max))"
        // Created with its final mode (O_EXCL: never someone else's file), so a key is not
        // readable by others even for a moment.
        let descriptor = open(temporary, O_WRONLY | O_CREAT | O_EXCL, mode)
        guard descriptor >= 0 else {
            throw ACMEError(.configuration, "cannot create \(temporary): errno \(errno)")
        }
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let result = bytes[written...].withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
            guard result > 0 else { break }
            written += result
        }
        // The umask may have narrowed the mode; set it exactly.
        let synced = written == bytes.count && fchmod(descriptor, mode) == 0 && fsync(descriptor) == 0
        close(descriptor)
        guard synced, rename(temporary, path) == 0 else {
            unlink(temporary)
            throw ACMEError(.configuration, "cannot write \(path): errno \(errno)")
        }
    }
}
