import Testing
import Trust

@Suite("tls-server-end-point channel binding (RFC 5929 §4.1)")
struct ChannelBindingTests {
    @Test("ECDSA with SHA-256: the SHA-256 of the DER")
    func ecdsaSHA256() throws {
        let hash = TLSContextStore.tlsServerEndPointHash(certificateDER: try Fixtures.der(Fixtures.ecdsaSHA256))
        #expect(hash.map(Fixtures.hex) == Fixtures.ecdsaSHA256DigestSHA256)
    }

    @Test("ECDSA with SHA-384: the SHA-384 of the DER")
    func ecdsaSHA384() throws {
        let hash = TLSContextStore.tlsServerEndPointHash(certificateDER: try Fixtures.der(Fixtures.ecdsaSHA384))
        #expect(hash.map(Fixtures.hex) == Fixtures.ecdsaSHA384DigestSHA384)
    }

    @Test("RSA with SHA-1: upgraded to SHA-256")
    func rsaSHA1() throws {
        let hash = TLSContextStore.tlsServerEndPointHash(certificateDER: try Fixtures.der(Fixtures.rsaSHA1))
        #expect(hash.map(Fixtures.hex) == Fixtures.rsaSHA1DigestSHA256)
    }

    @Test("RSASSA-PSS names SHA-512 in its parameters: the SHA-512 of the DER")
    func rsaPSS() throws {
        let hash = TLSContextStore.tlsServerEndPointHash(certificateDER: try Fixtures.der(Fixtures.rsaPSSSHA512))
        #expect(hash.map(Fixtures.hex) == Fixtures.rsaPSSSHA512DigestSHA512)
    }

    @Test("Ed25519 and garbage have no binding")
    func undefined() throws {
        #expect(TLSContextStore.tlsServerEndPointHash(certificateDER: try Fixtures.der(Fixtures.ed25519)) == nil)
        #expect(TLSContextStore.tlsServerEndPointHash(certificateDER: [0x30, 0x00]) == nil)
        #expect(TLSContextStore.tlsServerEndPointHash(certificateDER: []) == nil)
    }

    @Test("A generated certificate gets a 32-byte binding that the store hands out per domain")
    func generatedCertificate() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["example.com"])
        let store = TLSContextStore()
        try store.install(credentials, for: ["example.com"])
        let der = try #require(store.certificateDER(for: "example.com"))
        #expect(der == (try Fixtures.der(credentials.certificateChainPEM)))
        let hash = try #require(TLSContextStore.tlsServerEndPointHash(certificateDER: der))
        #expect(hash.count == 32)
        #expect(TLSContextStore.tlsServerEndPointHash(certificateDER: der) == hash)
    }
}
