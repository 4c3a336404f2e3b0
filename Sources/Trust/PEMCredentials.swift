import Foundation
import SwiftASN1
import X509

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A certificate chain and its private key, as PEM text.
///
/// The chain starts with the leaf certificate; intermediates may follow (RFC 8446 §4.4.2).
/// The key may be PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
/// (`RSA PRIVATE KEY`); encrypted keys are not supported.
public struct PEMCredentials: Sendable, Hashable {
    /// The certificate chain, leaf first, as concatenated PEM blocks.
    public var certificateChainPEM: String
    /// The private key of the leaf certificate, as one PEM block.
    public var privateKeyPEM: String

    public init(certificateChainPEM: String, privateKeyPEM: String) {
        self.certificateChainPEM = certificateChainPEM
        self.privateKeyPEM = privateKeyPEM
    }

    // MARK: Parsing

    /// The certificates of the chain, leaf first.
    ///
    /// - Throws: ``TrustError/Code/invalidCertificate`` when the text holds no certificate or a
    ///   block does not parse.
    public func certificateChain() throws(TrustError) -> [Certificate] {
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: certificateChainPEM)
        } catch {
            throw TrustError(.invalidCertificate, "the certificate PEM does not parse: \(error)")
        }
        var certificates: [Certificate] = []
        for document in documents where document.discriminator == "CERTIFICATE" {
            do {
                certificates.append(try Certificate(derEncoded: document.derBytes))
            } catch {
                throw TrustError(.invalidCertificate, "a certificate in the chain does not parse: \(error)")
            }
        }
        guard !certificates.isEmpty else {
            throw TrustError(.invalidCertificate, "the certificate PEM holds no CERTIFICATE block")
        }
        return certificates
    }

    /// The leaf certificate, the first of the chain.
    public func leafCertificate() throws(TrustError) -> Certificate {
        // certificateChain() never returns an empty array.
        guard let leaf = try certificateChain().first else {
            throw TrustError(.invalidCertificate, "the certificate PEM holds no certificate")
        }
        return leaf
    }

    /// The private key.
    public func privateKey() throws(TrustError) -> Certificate.PrivateKey {
        do {
            return try Certificate.PrivateKey(pemEncoded: privateKeyPEM)
        } catch {
            throw TrustError(.invalidPrivateKey, "the private key PEM does not parse: \(error)")
        }
    }

    /// Checks that the chain and the key parse and that the key belongs to the leaf.
    ///
    /// A mismatched pair would otherwise only show up as a failed handshake with every peer.
    public func validate() throws(TrustError) {
        let leaf = try leafCertificate()
        let key = try privateKey()
        guard key.publicKey == leaf.publicKey else {
            throw TrustError(.keyDoesNotMatchCertificate, "the private key does not belong to the leaf certificate")
        }
    }

    // MARK: Files

    /// Reads a certificate chain and a key from PEM files and validates the pair.
    ///
    /// - Throws: ``TrustError`` with ``TrustError/Code/fileSystem`` when a file cannot be read,
    ///   or the codes of ``validate()``.
    public static func load(certificatePath: String, keyPath: String) throws(TrustError) -> PEMCredentials {
        let credentials = PEMCredentials(
            certificateChainPEM: try readText(certificatePath),
            privateKeyPEM: try readText(keyPath)
        )
        try credentials.validate()
        return credentials
    }

    /// Writes the chain (mode 0644) and the key (mode 0600) to files.
    ///
    /// Each file is written to a temporary file in the same directory, created with its final
    /// mode so that the key is never readable by others, not even briefly, and then renamed
    /// over the destination, so a reader never sees half a file.
    public func write(certificatePath: String, keyPath: String) throws(TrustError) {
        try Self.writeAtomically(certificateChainPEM, to: certificatePath, mode: 0o644)
        try Self.writeAtomically(privateKeyPEM, to: keyPath, mode: 0o600)
    }

    private static func readText(_ path: String) throws(TrustError) -> String {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw TrustError(.fileSystem, "cannot read \(path): \(error)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw TrustError(.fileSystem, "\(path) is not UTF-8 text")
        }
        return text
    }

    private static func writeAtomically(_ text: String, to path: String, mode: mode_t) throws(TrustError) {
        let temporaryPath = path + ".tmp-\(UInt64.random(in: 0...UInt64.max))"
        let descriptor = open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL, mode)
        guard descriptor >= 0 else {
            throw TrustError(.fileSystem, "cannot create \(temporaryPath): \(String(cString: strerror(errno)))")
        }
        var failure: String?
        // open() applies the umask to the mode; set it explicitly so the file gets exactly the
        // mode asked for.
        if fchmod(descriptor, mode) != 0 {
            failure = "cannot set the mode of \(temporaryPath): \(String(cString: strerror(errno)))"
        }
        if failure == nil {
            let bytes = Array(text.utf8)
            var written = 0
            while written < bytes.count {
                let result = bytes.withUnsafeBytes { buffer in
                    posixWrite(descriptor, UnsafeRawBufferPointer(rebasing: buffer[written...]))
                }
                if result < 0 {
                    if errno == EINTR { continue }
                    failure = "cannot write \(temporaryPath): \(String(cString: strerror(errno)))"
                    break
                }
                written += result
            }
        }
        if failure == nil && fsync(descriptor) != 0 {
            failure = "cannot sync \(temporaryPath): \(String(cString: strerror(errno)))"
        }
        close(descriptor)
        if failure == nil && rename(temporaryPath, path) != 0 {
            failure = "cannot rename \(temporaryPath) to \(path): \(String(cString: strerror(errno)))"
        }
        if let failure {
            unlink(temporaryPath)
            throw TrustError(.fileSystem, failure)
        }
    }
}

/// `write(2)`, under another name: inside `PEMCredentials` the method `write(certificatePath:keyPath:)`
/// hides the C function.
private func posixWrite(_ descriptor: Int32, _ buffer: UnsafeRawBufferPointer) -> Int {
    guard let base = buffer.baseAddress else { return 0 }
    return write(descriptor, base, buffer.count)
}
