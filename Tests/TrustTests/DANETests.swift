import Foundation
import Synchronization
import Testing
import X509
@testable import Trust

/// A DANE record source that answers from memory and remembers what it was asked. The DNS
/// side is tested with a real signed zone in FederationTests (DNSDANESourceTests).
final class MemoryDANESource: DANERecordSource {
    let lookup: DANELookup
    private let calls = Mutex<[(domain: String, target: ServerTarget?)]>([])

    init(_ lookup: DANELookup) {
        self.lookup = lookup
    }

    static func secure(_ associations: [TLSAAssociation], expires: Date = DANETests.lookupExpiry) -> MemoryDANESource {
        MemoryDANESource(.secure(associations, expires: expires))
    }

    var asked: [(domain: String, target: ServerTarget?)] { calls.withLock { $0 } }

    func associations(for domain: String, target: ServerTarget?) async -> DANELookup {
        calls.withLock { $0.append((domain, target)) }
        return lookup
    }
}

/// A root, an intermediate under it, and leaves for `example.net` served by
/// `xmpp.example.net:5269`; plus an unrelated CA for mismatches.
struct DANEPKI {
    let root: TestCertificateAuthority
    let intermediate: TestCertificateAuthority
    let other: TestCertificateAuthority
    /// leaf for example.net, then the intermediate (as a server sends it).
    let chain: [Certificate]
    /// Another leaf for example.net from the same intermediate (a different key).
    let sibling: [Certificate]

    var leaf: Certificate { chain[0] }

    init() throws {
        root = try TestCertificateAuthority(commonName: "DANE Root")
        intermediate = try root.issueIntermediate(commonName: "DANE Intermediate")
        other = try TestCertificateAuthority(commonName: "Unrelated CA")
        chain = try intermediate.issueXMPPServerCertificate(domains: ["example.net"]).certificateChain()
        sibling = try intermediate.issueXMPPServerCertificate(domains: ["example.net"]).certificateChain()
    }

    var validator: PeerCertificateValidator {
        PeerCertificateValidator(anchors: PeerTrustAnchors(defaultRoots: [root.certificate]))
    }
}

@Suite("DANE prooftype (RFC 7673, RFC 6698, RFC 7671)")
struct DANETests {
    static let lookupExpiry = Date() + 3600
    static let domain = "example.net"
    static let target = ServerTarget(host: "xmpp.example.net", port: 5269)

    static let usages: [UInt8] = [0, 1, 2, 3]
    static let selectors: [UInt8] = [0, 1]
    static let matchingTypes: [UInt8] = [0, 1, 2]

    func outgoing(_ chain: [Certificate], time: Date = Date()) -> PeerEvidence {
        PeerEvidence(certificateChain: chain, time: time, connectedTarget: Self.target)
    }

    func incoming(_ chain: [Certificate]) -> PeerEvidence {
        PeerEvidence(certificateChain: chain, connectedTarget: nil)
    }

    func prove(_ associations: [TLSAAssociation], _ evidence: PeerEvidence, pki: DANEPKI, domain: String = DANETests.domain) async -> ProofOutcome {
        await DANEProof(source: MemoryDANESource.secure(associations), validator: pki.validator).prove(domain, evidence: evidence)
    }

    func isProven(_ outcome: ProofOutcome) -> Bool {
        if case .proven(.dane, _) = outcome { return true }
        return false
    }

    func isRefuted(_ outcome: ProofOutcome) -> Bool {
        if case .refuted = outcome { return true }
        return false
    }

    func isNotApplicable(_ outcome: ProofOutcome) -> Bool {
        if case .notApplicable = outcome { return true }
        return false
    }

    // MARK: Association data

    /// RSA-2048, made with `openssl req -x509 -newkey rsa:2048`; its SPKI carries the NULL
    /// parameters that a re-encoding could drop, so the hash checks the bytes are cut out as
    /// they are.
    static let rsa2048 = """
        -----BEGIN CERTIFICATE-----
        MIIDFzCCAf+gAwIBAgIUSWUChG3xuT+uvEhlRiOJwUw/IqQwDQYJKoZIhvcNAQEL
        BQAwGjEYMBYGA1UEAwwPcnNhMjA0OC5leGFtcGxlMCAXDTI2MTEyMjA3MjYxNFoY
        DzIxMjYxMDI5MDcyNjE0WjAaMRgwFgYDVQQDDA9yc2EyMDQ4LmV4YW1wbGUwggEi
        MA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQCgFAQu4bWx7jO1scgNV3RfokTD
        16Jy/gg2A7tCQ4pToeOZon+EEEVyfImGUTljWBv+swvlcqjRfTDEeVql5SXc4h5P
        Oto00TcD4ymdowKFvTFDks6sdcHskhm26cgfvcC5gi48gdQyBfW1drheQkmlqpH2
        4yL66YXfDCSdEoUvCSRI0y5TugPeSKgYZVF3QHnChsHsIdfzisR5ApC1XQIus9lk
        hGDi5eGsiZKbbWV8YllE/QCx/QqX8meTMw9TGjSzK8h68wuTFGlzv4917BuSpyi1
        /mwYsF0UDI11oQat93rsgiHhJLGg+Zldab5mWeKxHDO0Di6v2bF5fpLy/kNNAgMB
        AAGjUzBRMB0GA1UdDgQWBBT/ssL/XjgTyjawAwOFd7EDQJiZTjAfBgNVHSMEGDAW
        gBT/ssL/XjgTyjawAwOFd7EDQJiZTjAPBgNVHRMBAf8EBTADAQH/MA0GCSqGSIb3
        DQEBCwUAA4IBAQBrvi91fdF5IRpikY6vV0JzW8UXHKwAHdMqyNac7QwrcejcfXfB
        i4dIgxmLv/89YwFaCT84mZoYfdvo00y1DBQWQi/DnMrZbR612lVDxGyvoLXdewTP
        wnNSHGqkjDkJS2+v5RawIqqEs6yoUQ18KyuncTz2/JSU0mW6JyRl9KudQdkbFZAZ
        y8bNh2VxwiAJaiRBkNf0F9VaLAFJ5XBVVdu2/sx1qp/pXgHNQ+sO336tRP+xthVv
        49uubCPUuJQosWcH7IXexc01xlhhaJP7OoHBTs0fojbh6q0rWVAPLuLUJ8Jyxrba
        K2hb1LxftyIos6VhuQhRGoCnYPuSk8LkKXsj
        -----END CERTIFICATE-----
        """

    @Test("Association data equals what OpenSSL computes for the certificate and its SPKI")
    func knownAnswers() throws {
        let ecdsa = try Certificate(pemEncoded: Fixtures.ecdsaSHA256)
        let rsa = try Certificate(pemEncoded: Self.rsa2048)
        func hex(_ usage: UInt8, _ selector: UInt8, _ type: UInt8, _ certificate: Certificate) throws -> String {
            Fixtures.hex(try TLSAAssociation(usage: usage, selector: selector, matchingType: type, certificate: certificate).data)
        }
        // openssl x509 -outform der | openssl dgst -sha256 / -sha512
        #expect(try hex(3, 0, 1, ecdsa) == Fixtures.ecdsaSHA256DigestSHA256)
        #expect(try hex(3, 0, 2, ecdsa) == "aef897df5b4da933499319c5c0b5b597e5e3704f836a7be62d03ccef4ac940e41e705738638d46629f51aa2299ee1dbfeed16daf8a4e26774d6dfcaf497738f7")
        // openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst ...
        #expect(try hex(3, 1, 0, ecdsa) == "3059301306072a8648ce3d020106082a8648ce3d03010703420004be92d1b110c445409be5e7e3792b89c293654d041adb73e6853fc28bfb9732e85b87eee2a145a8a9ea8f284fbf63d53b7393f4e9c9c960e3b8bd981d248dd79a")
        #expect(try hex(3, 1, 1, ecdsa) == "2f48e46c2567185854683ebd36df8a53c9dd82f11134e52c26d473148f57da3a")
        #expect(try hex(3, 1, 2, ecdsa) == "f0260c8f53267509dc51ae49100c1c2c8bf5a1a33886a2fa8c64a32a20ccc1848f4bf7a2503654143b91cbccbc4e181970cb5a07b721750ab0be5bf839871bd7")
        #expect(try hex(3, 1, 1, rsa) == "c895485056326342b8b8dde471cb97d3b3b8cf99fb9a1e9b2e2cfa481a91838a")
        #expect(try hex(3, 0, 1, rsa) == "1fcd6ad9268fb6242ab931f697154eb705ebb3be787283d677d401e90ee2db4e")
        #expect(try Fixtures.hex(TLSAAssociation(usage: 3, selector: 0, matchingType: 0, certificate: ecdsa).data) == Fixtures.hex(Fixtures.der(Fixtures.ecdsaSHA256)))
        #expect(throws: TrustError.self) { try TLSAAssociation(usage: 3, selector: 2, matchingType: 1, certificate: ecdsa) }
        #expect(throws: TrustError.self) { try TLSAAssociation(usage: 3, selector: 1, matchingType: 3, certificate: ecdsa) }
    }

    @Test("Usability: unknown fields and digests of the wrong length are unusable (RFC 7671 §4)")
    func usability() {
        #expect(TLSAAssociation(usage: 3, selector: 1, matchingType: 1, data: Array(repeating: 1, count: 32)).isUsable)
        #expect(TLSAAssociation(usage: 3, selector: 1, matchingType: 2, data: Array(repeating: 1, count: 64)).isUsable)
        #expect(!TLSAAssociation(usage: 3, selector: 1, matchingType: 1, data: Array(repeating: 1, count: 31)).isUsable)
        #expect(!TLSAAssociation(usage: 3, selector: 1, matchingType: 2, data: Array(repeating: 1, count: 32)).isUsable)
        #expect(!TLSAAssociation(usage: 4, selector: 1, matchingType: 1, data: Array(repeating: 1, count: 32)).isUsable)
        #expect(!TLSAAssociation(usage: 3, selector: 2, matchingType: 1, data: Array(repeating: 1, count: 32)).isUsable)
        #expect(!TLSAAssociation(usage: 3, selector: 1, matchingType: 255, data: Array(repeating: 1, count: 32)).isUsable)
        #expect(!TLSAAssociation(usage: 3, selector: 0, matchingType: 0, data: []).isUsable)
        #expect(TLSAAssociation(usage: 3, selector: 1, matchingType: 1, data: [0xab, 0x01]).description == "3 1 1 ab01")
    }

    // MARK: Every combination, outgoing

    @Test("Outgoing: every usage × selector × matching type matches its certificate and refutes another",
          arguments: usages, selectors)
    func everyCombinationOutgoing(usage: UInt8, selector: UInt8) async throws {
        let pki = try DANEPKI()
        for matchingType in Self.matchingTypes {
            // EE usages name the leaf; TA usages name the intermediate, which the chain carries.
            let isEE = usage == 1 || usage == 3
            let subject = isEE ? pki.leaf : pki.intermediate.certificate
            let right = try TLSAAssociation(usage: usage, selector: selector, matchingType: matchingType, certificate: subject)
            let matched = await prove([right], outgoing(pki.chain), pki: pki)
            #expect(isProven(matched), "\(right.usage) \(selector) \(matchingType): \(matched)")

            let unrelated = isEE ? try pki.other.issueXMPPServerCertificate(domains: ["example.net"]).leafCertificate() : pki.other.certificate
            let wrong = try TLSAAssociation(usage: usage, selector: selector, matchingType: matchingType, certificate: unrelated)
            let mismatched = await prove([wrong], outgoing(pki.chain), pki: pki)
            #expect(isRefuted(mismatched), "\(usage) \(selector) \(matchingType) of another certificate: \(mismatched)")
        }
    }

    // MARK: DANE-EE

    @Test("DANE-EE ignores expiry, names and PKIX (RFC 7671 §5.1)", arguments: ["expired", "other name", "untrusted issuer", "self-signed"])
    func daneEEIgnoresPKIX(kind: String) async throws {
        let pki = try DANEPKI()
        let chain: [Certificate] = switch kind {
        case "expired":
            try pki.intermediate.issueXMPPServerCertificate(domains: ["example.net"], notValidBefore: Date() - 86_400 * 60, notValidAfter: Date() - 86_400).certificateChain()
        case "other name":
            try pki.intermediate.issueXMPPServerCertificate(domains: ["somewhere-else.example"]).certificateChain()
        case "untrusted issuer":
            try pki.other.issueXMPPServerCertificate(domains: ["example.net"]).certificateChain()
        default:
            try SelfSignedCertificate.generate(domains: ["localhost.example"]).certificateChain()
        }
        // PKIX alone refuses each of them ...
        let pkix = await PKIXProof(validator: pki.validator).prove(Self.domain, evidence: outgoing(chain))
        #expect(isNotApplicable(pkix))
        // ... DANE-EE accepts, for as long as the records live.
        for selector in Self.selectors {
            let association = try TLSAAssociation(usage: 3, selector: selector, matchingType: 1, certificate: chain[0])
            let outcome = await prove([association], outgoing(chain), pki: pki)
            #expect(outcome == .proven(.dane, expires: Self.lookupExpiry), "\(kind), selector \(selector)")
        }
    }

    @Test("DANE-EE with selector SPKI survives a new certificate for the same key")
    func spkiSurvivesRenewal() async throws {
        let pki = try DANEPKI()
        let byKey = try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.leaf)
        let byCertificate = try TLSAAssociation(usage: 3, selector: 0, matchingType: 1, certificate: pki.leaf)
        // The sibling has its own key: neither matches.
        #expect(isRefuted(await prove([byKey, byCertificate], outgoing(pki.sibling), pki: pki)))
        #expect(isProven(await prove([byKey], outgoing(pki.chain), pki: pki)))
    }

    // MARK: PKIX-EE

    @Test("PKIX-EE needs the leaf to match and PKIX to pass", arguments: ["valid", "expired", "untrusted", "other name"])
    func pkixEE(kind: String) async throws {
        let pki = try DANEPKI()
        let chain: [Certificate] = switch kind {
        case "valid": pki.chain
        case "expired":
            try pki.intermediate.issueXMPPServerCertificate(domains: ["example.net"], notValidBefore: Date() - 86_400 * 60, notValidAfter: Date() - 86_400).certificateChain()
        case "untrusted":
            try pki.other.issueXMPPServerCertificate(domains: ["example.net"]).certificateChain()
        default:
            try pki.intermediate.issueXMPPServerCertificate(domains: ["somewhere-else.example"]).certificateChain()
        }
        let association = try TLSAAssociation(usage: 1, selector: 1, matchingType: 1, certificate: chain[0])
        let outcome = await prove([association], outgoing(chain), pki: pki)
        if kind == "valid" {
            // The proof lapses with the records or the chain, whichever is first.
            let chainExpiry = min(chain[0].notValidAfter, chain[1].notValidAfter, pki.root.certificate.notValidAfter)
            #expect(outcome == .proven(.dane, expires: min(Self.lookupExpiry, chainExpiry)))
        } else {
            #expect(isRefuted(outcome), "\(kind): \(outcome)")
        }
    }

    // MARK: DANE-TA

    @Test("DANE-TA: the trust anchor must be in the presented chain, and the leaf must chain to it")
    func daneTAChain() async throws {
        let pki = try DANEPKI()
        let anchor = try TLSAAssociation(usage: 2, selector: 0, matchingType: 1, certificate: pki.intermediate.certificate)
        // Leaf alone: the anchor is not presented (RFC 7671 §5.2.2).
        #expect(isRefuted(await prove([anchor], outgoing([pki.leaf]), pki: pki)))
        // A leaf of another CA with the anchor appended does not chain to it.
        let foreign = try pki.other.issueXMPPServerCertificate(domains: ["example.net"]).leafCertificate()
        #expect(isRefuted(await prove([anchor], outgoing([foreign, pki.intermediate.certificate]), pki: pki)))
        // A DANE-TA record naming the leaf itself does not make the leaf a trust anchor.
        let leafAsAnchor = try TLSAAssociation(usage: 2, selector: 1, matchingType: 1, certificate: pki.leaf)
        #expect(isRefuted(await prove([leafAsAnchor], outgoing(pki.chain), pki: pki)))
        // The root as trust anchor, sent by the server at the end of the chain.
        let rootAnchor = try TLSAAssociation(usage: 2, selector: 1, matchingType: 2, certificate: pki.root.certificate)
        #expect(isRefuted(await prove([rootAnchor], outgoing(pki.chain), pki: pki)))
        #expect(isProven(await prove([rootAnchor], outgoing(pki.chain + [pki.root.certificate]), pki: pki)))
        // A private CA nobody trusts for PKIX works with DANE-TA.
        let privateChain = try pki.other.issueXMPPServerCertificate(domains: ["example.net"]).certificateChain() + [pki.other.certificate]
        let privateAnchor = try TLSAAssociation(usage: 2, selector: 0, matchingType: 0, certificate: pki.other.certificate)
        #expect(isProven(await prove([privateAnchor], outgoing(privateChain), pki: pki)))
    }

    @Test("DANE-TA needs the name: the service domain or the SRV target host (RFC 7673 §4.2)")
    func daneTAName() async throws {
        let pki = try DANEPKI()
        let anchor = try TLSAAssociation(usage: 2, selector: 1, matchingType: 1, certificate: pki.intermediate.certificate)
        let elsewhere = try pki.intermediate.issueXMPPServerCertificate(domains: ["somewhere-else.example"]).certificateChain()
        #expect(isRefuted(await prove([anchor], outgoing(elsewhere), pki: pki)))
        let targetNamed = try pki.intermediate.issue(dnsIDs: ["xmpp.example.net"]).certificateChain()
        #expect(isProven(await prove([anchor], outgoing(targetNamed), pki: pki)))
        #expect(isProven(await prove([anchor], outgoing(pki.chain), pki: pki)))
    }

    @Test("DANE-TA checks the dates below the trust anchor, not the anchor's own (RFC 5280 §6.1)")
    func daneTADates() async throws {
        let pki = try DANEPKI()
        let expiredCA = try pki.root.issueIntermediate(commonName: "Expired Intermediate", notValidBefore: Date() - 86_400 * 400, notValidAfter: Date() - 86_400)
        let anchor = try TLSAAssociation(usage: 2, selector: 1, matchingType: 1, certificate: expiredCA.certificate)
        let leafExpiry = Date() + 86_400 * 10
        let chain = try expiredCA.issueXMPPServerCertificate(domains: ["example.net"], notValidAfter: leafExpiry).certificateChain()
        #expect(await prove([anchor], outgoing(chain), pki: pki) == .proven(.dane, expires: min(Self.lookupExpiry, chain[0].notValidAfter)))

        let shortRecords = DANEProof(source: MemoryDANESource.secure([anchor], expires: Date() + 86_400 * 30), validator: pki.validator)
        let lapses = await shortRecords.prove(Self.domain, evidence: outgoing(chain))
        #expect(lapses == .proven(.dane, expires: chain[0].notValidAfter), "the leaf's expiry bounds a TA proof")

        let expiredLeaf = try expiredCA.issueXMPPServerCertificate(domains: ["example.net"], notValidBefore: Date() - 86_400 * 30, notValidAfter: Date() - 60).certificateChain()
        #expect(isRefuted(await prove([anchor], outgoing(expiredLeaf), pki: pki)))
    }

    // MARK: PKIX-TA

    @Test("PKIX-TA needs PKIX and a matching certificate in the validated path")
    func pkixTA() async throws {
        let pki = try DANEPKI()
        // The root is not presented but is part of the validated path.
        let root = try TLSAAssociation(usage: 0, selector: 1, matchingType: 1, certificate: pki.root.certificate)
        #expect(isProven(await prove([root], outgoing(pki.chain), pki: pki)))
        // A matching anchor does not help when PKIX fails (here: the private CA is not trusted).
        let privateChain = try pki.other.issueXMPPServerCertificate(domains: ["example.net"]).certificateChain() + [pki.other.certificate]
        let privateAnchor = try TLSAAssociation(usage: 0, selector: 0, matchingType: 1, certificate: pki.other.certificate)
        #expect(isRefuted(await prove([privateAnchor], outgoing(privateChain), pki: pki)))
        // Nor when the name does not match.
        let elsewhere = try pki.intermediate.issueXMPPServerCertificate(domains: ["somewhere-else.example"]).certificateChain()
        #expect(isRefuted(await prove([root], outgoing(elsewhere), pki: pki)))
    }

    // MARK: Lookup outcomes

    @Test("bogus ⇒ refuted, none ⇒ not applicable, no usable record ⇒ not applicable, no certificate ⇒ not applicable")
    func lookupOutcomes() async throws {
        let pki = try DANEPKI()
        let validator = pki.validator
        let bogus = await DANEProof(source: MemoryDANESource(.bogus("RRSIG expired")), validator: validator).prove(Self.domain, evidence: outgoing(pki.chain))
        #expect(isRefuted(bogus))
        let bogusIncoming = await DANEProof(source: MemoryDANESource(.bogus("RRSIG expired")), validator: validator).prove(Self.domain, evidence: incoming(pki.chain))
        #expect(isRefuted(bogusIncoming))
        let none = await DANEProof(source: MemoryDANESource(.none), validator: validator).prove(Self.domain, evidence: outgoing(pki.chain))
        #expect(isNotApplicable(none))
        let unusable = [
            TLSAAssociation(usage: 4, selector: 1, matchingType: 1, data: Array(repeating: 0, count: 32)),
            TLSAAssociation(usage: 3, selector: 1, matchingType: 1, data: Array(repeating: 0, count: 20)),
        ]
        #expect(isNotApplicable(await prove(unusable, outgoing(pki.chain), pki: pki)))
        #expect(isNotApplicable(await prove([], outgoing(pki.chain), pki: pki)))
        let source = MemoryDANESource.secure([try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.leaf)])
        let noCertificate = await DANEProof(source: source, validator: validator).prove(Self.domain, evidence: outgoing([]))
        #expect(isNotApplicable(noCertificate))
        #expect(source.asked.isEmpty, "no DNS work without a certificate")
    }

    @Test("The source is asked for the domain and the connected target (nil for incoming)")
    func sourceArguments() async throws {
        let pki = try DANEPKI()
        let source = MemoryDANESource.secure([try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.leaf)])
        let proof = DANEProof(source: source, validator: pki.validator)
        #expect(proof.method == .dane)
        _ = await proof.prove(Self.domain, evidence: outgoing(pki.chain))
        _ = await proof.prove(Self.domain, evidence: incoming(pki.chain))
        let asked = source.asked
        #expect(asked.count == 2)
        #expect(asked.first?.domain == Self.domain && asked.first?.target == Self.target)
        #expect(asked.last?.domain == Self.domain && asked.last?.target == nil)
    }

    @Test("Digest agility: the strongest digest per usage and selector decides; Full(0) always counts (RFC 7671 §9)")
    func digestAgility() async throws {
        let pki = try DANEPKI()
        let right256 = try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.leaf)
        let right512 = try TLSAAssociation(usage: 3, selector: 1, matchingType: 2, certificate: pki.leaf)
        let rightFull = try TLSAAssociation(usage: 3, selector: 1, matchingType: 0, certificate: pki.leaf)
        let wrong512 = try TLSAAssociation(usage: 3, selector: 1, matchingType: 2, certificate: pki.sibling[0])
        let wrong256 = try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.sibling[0])
        #expect(isRefuted(await prove([right256, wrong512], outgoing(pki.chain), pki: pki)), "SHA2-256 must not override a published SHA2-512")
        #expect(isProven(await prove([wrong256, right512], outgoing(pki.chain), pki: pki)))
        #expect(isProven(await prove([rightFull, wrong512], outgoing(pki.chain), pki: pki)))
        // Another selector is another group.
        let rightCert256 = try TLSAAssociation(usage: 3, selector: 0, matchingType: 1, certificate: pki.leaf)
        #expect(isProven(await prove([rightCert256, wrong512], outgoing(pki.chain), pki: pki)))
    }

    @Test("Any one matching record among several suffices")
    func anyMatch() async throws {
        let pki = try DANEPKI()
        let records = [
            try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.sibling[0]),
            try TLSAAssociation(usage: 2, selector: 1, matchingType: 1, certificate: pki.other.certificate),
            try TLSAAssociation(usage: 1, selector: 0, matchingType: 1, certificate: pki.leaf),
        ]
        #expect(isProven(await prove(records, outgoing(pki.chain), pki: pki)))
    }

    // MARK: Incoming

    @Test("Incoming: only DANE-EE with selector 0 or 1 and matching type 0–2 authenticates a client certificate",
          arguments: usages, selectors)
    func everyCombinationIncoming(usage: UInt8, selector: UInt8) async throws {
        let pki = try DANEPKI()
        for matchingType in Self.matchingTypes {
            let subject = (usage == 1 || usage == 3) ? pki.leaf : pki.intermediate.certificate
            let association = try TLSAAssociation(usage: usage, selector: selector, matchingType: matchingType, certificate: subject)
            let outcome = await prove([association], incoming(pki.chain), pki: pki)
            if usage == 3 {
                #expect(outcome == .proven(.dane, expires: Self.lookupExpiry), "\(association)")
            } else {
                #expect(isNotApplicable(outcome), "usage \(usage) must not authenticate an incoming peer: \(outcome)")
            }
        }
    }

    @Test("Incoming: DANE-EE ignores names and dates too; a mismatch is not a refutation")
    func incomingDetails() async throws {
        let pki = try DANEPKI()
        let expired = try pki.other.issueXMPPServerCertificate(domains: ["somewhere-else.example"], notValidBefore: Date() - 86_400 * 60, notValidAfter: Date() - 86_400).certificateChain()
        let association = try TLSAAssociation(usage: 3, selector: 0, matchingType: 2, certificate: expired[0])
        #expect(isProven(await prove([association], incoming(expired), pki: pki)))
        // A peer may use another certificate as a client than as a server: not a refutation.
        #expect(isNotApplicable(await prove([association], incoming(pki.chain), pki: pki)))
        // The records are a union of several servers' RRsets: one server's SHA2-512 record
        // does not cancel another server's SHA2-256 record (agility is the source's job, per
        // RRset).
        let server1 = try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: pki.leaf)
        let server2 = try TLSAAssociation(usage: 3, selector: 1, matchingType: 2, certificate: pki.sibling[0])
        #expect(isProven(await prove([server1, server2], incoming(pki.chain), pki: pki)))
        #expect(isProven(await prove([server1, server2], incoming(pki.sibling), pki: pki)))
    }

    @Test("A proof lapses at its expiry and must be made again")
    func lapse() {
        let now = Date()
        #expect(!ProofOutcome.proven(.dane, expires: now + 10).hasLapsed(at: now))
        #expect(ProofOutcome.proven(.dane, expires: now + 10).hasLapsed(at: now + 10))
        #expect(!ProofOutcome.proven(.dialback, expires: nil).hasLapsed(at: now + 86_400 * 365))
        #expect(ProofOutcome.refuted("x").hasLapsed(at: now))
        #expect(ProofOutcome.notApplicable("x").hasLapsed(at: now))
    }
}
