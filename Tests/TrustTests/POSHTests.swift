import Foundation
import SwiftASN1
import Synchronization
import Testing
import X509
@testable import Trust

/// A stand-in for the HTTPS fetcher: canned answers per URL, with a call log. (The real
/// HTTPS path is exercised against a real server in AdminTests.)
final class FakePOSHFetcher: POSHFetching {
    enum Answer: Sendable {
        case document(String)
        case notFound
        case failure
    }

    struct FetchFailed: Error {}

    private let answers: Mutex<[String: Answer]>
    private let log = Mutex<[String]>([])
    private let delay: Duration?

    init(_ answers: [String: Answer] = [:], delay: Duration? = nil) {
        self.answers = Mutex(answers)
        self.delay = delay
    }

    func set(_ url: String, _ answer: Answer) {
        answers.withLock { $0[url] = answer }
    }

    var calls: [String] { log.withLock { $0 } }

    func fetch(_ url: String) async throws -> [UInt8]? {
        log.withLock { $0.append(url) }
        if let delay { try await Task.sleep(for: delay) }
        switch answers.withLock({ $0[url] }) ?? .notFound {
        case .document(let text): return Array(text.utf8)
        case .notFound: return nil
        case .failure: throw FetchFailed()
        }
    }
}

/// A clock tests move by hand.
final class ManualClock: Sendable {
    private let current: Mutex<Date>

    init(_ start: Date = Date(timeIntervalSince1970: 1_800_000_000)) {
        current = Mutex(start)
    }

    var now: Date { current.withLock { $0 } }

    func advance(_ seconds: TimeInterval) {
        current.withLock { $0 += seconds }
    }
}

/// Base64 of 32 and 64 bytes: digests of the right lengths for SHA-256 and SHA-512.
private let sha256 = Data(repeating: 0xAB, count: 32).base64EncodedString()
private let sha512 = Data(repeating: 0xCD, count: 64).base64EncodedString()

/// One namespace for the POSH suites, so that `--filter POSHTests` selects them all.
@Suite("POSH (RFC 7711)")
enum POSHTests {}

extension POSHTests {
    @Suite("POSH documents (RFC 7711 §3)")
    struct Documents {

        func parse(_ text: String) throws(POSHError) -> POSHDocument {
            try POSHDocument(parsing: Array(text.utf8))
        }

        @Test("A fingerprints document with several descriptors parses in order")
        func fingerprints() throws {
            let document = try parse("""
                {"fingerprints": [{"sha-256": "\(sha256)", "sha-512": "\(sha512)"}, {"SHA-256": "\(sha256)"}], "expires": 604800}
                """)
            #expect(document.expires == 604_800)
            #expect(document.referenceURL == nil)
            #expect(document.fingerprints.count == 2)
            #expect(document.fingerprints[0].digests["sha-256"] == Array(repeating: 0xAB, count: 32))
            #expect(document.fingerprints[0].digests["sha-512"] == Array(repeating: 0xCD, count: 64))
            // Hash names are matched case-insensitively and kept in lower case.
            #expect(document.fingerprints[1].digests == ["sha-256": Array(repeating: 0xAB, count: 32)])
            #expect(document.fingerprints[1].supportedAlgorithms == [.sha256])
        }

        @Test("A reference document parses")
        func reference() throws {
            let document = try parse(#"{"url": "https://hosting.example.net/.well-known/posh/xmpp-server.json", "expires": 86400}"#)
            #expect(document.content == .reference(url: "https://hosting.example.net/.well-known/posh/xmpp-server.json"))
            #expect(document.expires == 86_400)
            #expect(document.fingerprints.isEmpty)
        }

        @Test("expires 0 parses but marks the material invalid")
        func expiresZero() throws {
            let document = try parse(#"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": 0}"#)
            #expect(document.isInvalidated)
            #expect(try !parse(#"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": 1}"#).isInvalidated)
        }

        @Test("An unknown hash name is kept but supports nothing")
        func unknownHash() throws {
            let document = try parse(#"{"fingerprints": [{"sha3-256": "AAAA"}], "expires": 10}"#)
            #expect(document.fingerprints[0].digests == ["sha3-256": [0, 0, 0]])
            #expect(document.fingerprints[0].supportedAlgorithms.isEmpty)
            #expect(document.fingerprints[0].matches(certificateDER: [1, 2, 3]) == nil)
        }

        @Test("Malformed documents are refused", arguments: [
            "",
            "not json",
            "[]",
            #""fingerprints""#,
            #"{"expires": 10}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}]}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": -1}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": 1.5}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": "10"}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": true}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": null}"#,
            #"{"fingerprints": [], "expires": 10}"#,
            #"{"fingerprints": [{}], "expires": 10}"#,
            #"{"fingerprints": {"sha-256": "\#(sha256)"}, "expires": 10}"#,
            #"{"fingerprints": ["\#(sha256)"], "expires": 10}"#,
            #"{"fingerprints": [{"sha-256": 12}], "expires": 10}"#,
            #"{"fingerprints": [{"sha-256": "not base64!"}], "expires": 10}"#,
            #"{"fingerprints": [{"sha-256": "AAAA"}], "expires": 10}"#,
            #"{"fingerprints": [{"sha-512": "\#(sha256)"}], "expires": 10}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)", "SHA-256": "\#(sha256)"}], "expires": 10}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "url": "https://a.example/x.json", "expires": 10}"#,
            #"{"fingerprints": [{"sha-256": "\#(sha256)"}], "expires": 10, "comment": "hi"}"#,
            #"{"url": "http://hosting.example.net/.well-known/posh/xmpp-server.json", "expires": 10}"#,
            #"{"url": "hosting.example.net/posh.json", "expires": 10}"#,
            #"{"url": "https:///posh.json", "expires": 10}"#,
            #"{"url": 42, "expires": 10}"#,
            #"{"expires": 10, "url": null}"#,
        ])
        func malformed(text: String) {
            #expect(throws: POSHError.self) { try parse(text) }
        }

        @Test("Publisher output: both hashes of the whole DER, matching OpenSSL's digest")
        func publisherFingerprints() throws {
            let der = try Fixtures.der(Fixtures.ecdsaSHA256)
            let text = POSHPublisher.fingerprintsDocument(certificateDER: [der, [1, 2, 3]], expires: 3600)
            let document = try parse(text)
            #expect(document.expires == 3600)
            #expect(document.fingerprints.count == 2)
            let first = document.fingerprints[0]
            #expect(first.digests.keys.sorted() == ["sha-256", "sha-512"])
            #expect(Fixtures.hex(first.digests["sha-256"] ?? []) == Fixtures.ecdsaSHA256DigestSHA256)
            #expect(first.digests["sha-512"]?.count == 64)
            #expect(first.matches(certificateDER: der) == true)
            #expect(document.fingerprints[1].matches(certificateDER: [1, 2, 3]) == true)
            #expect(document.fingerprints[1].matches(certificateDER: der) == false)
            // The exact wire form, so tenants can compare what they copy.
            // SHA-256 of the bytes 01 02 03, computed with Python's hashlib.
            #expect(text.contains(#""sha-256" : "A5BYxvLAy0ksUzsKTRTvd8wPeKvMztUofYShogEc+4E=""#))
            #expect(!text.contains("url"))
            #expect(text.hasSuffix("}\n"))
        }

        @Test("SHA-384 and SHA-512 fingerprints match OpenSSL's digests of the DER")
        func otherHashes() throws {
            let der384 = try Fixtures.der(Fixtures.ecdsaSHA384)
            #expect(Fixtures.hex(POSHFingerprint(certificateDER: der384, algorithms: [.sha384]).digests["sha-384"] ?? []) == Fixtures.ecdsaSHA384DigestSHA384)
            let der512 = try Fixtures.der(Fixtures.rsaPSSSHA512)
            #expect(Fixtures.hex(POSHFingerprint(certificateDER: der512).digests["sha-512"] ?? []) == Fixtures.rsaPSSSHA512DigestSHA512)
        }

        @Test("Publisher reference documents round-trip without escaped slashes")
        func publisherReference() throws {
            let url = "https://hosting.example.net/.well-known/posh/xmpp-server.json"
            let text = POSHPublisher.referenceDocument(url: url, expires: 86_400)
            #expect(text.contains(url))
            #expect(try parse(text) == POSHDocument(content: .reference(url: url), expires: 86_400))
        }

        @Test("Document URLs use the A-label form")
        func documentURL() {
            #expect(POSHPublisher.documentURL(domain: "Bücher.example") == "https://xn--bcher-kva.example/.well-known/posh/xmpp-server.json")
            #expect(POSHPublisher.documentURL(domain: "a.example", service: "xmpp-client") == "https://a.example/.well-known/posh/xmpp-client.json")
            #expect(POSHPublisher.documentURL(domain: "") == nil)
        }
    }

    @Suite("POSH proofs (RFC 7711, RFC 7712 §5.2)")
    struct Proofs {
        static let ca = try! TestCertificateAuthority(commonName: "POSH Test CA")
        static let hosting = try! ca.issueXMPPServerCertificate(domains: ["hosting.example.net"])
        static let other = try! ca.issueXMPPServerCertificate(domains: ["other.example.net"])

        static let sourceURL = "https://tenant.example/.well-known/posh/xmpp-server.json"
        static let providerURL = "https://hosting.example.net/.well-known/posh/xmpp-server.json"

        static func der(_ credentials: PEMCredentials) throws -> [UInt8] {
            var serializer = DER.Serializer()
            try serializer.serialize(try credentials.leafCertificate())
            return serializer.serializedBytes
        }

        static func evidence(_ credentials: PEMCredentials) throws -> PeerEvidence {
            PeerEvidence(certificateChain: try credentials.certificateChain())
        }

        static func fingerprintsDocument(_ credentials: PEMCredentials, algorithms: [POSHHashAlgorithm], expires: Int) throws -> String {
            POSHDocument(content: .fingerprints([POSHFingerprint(certificateDER: try der(credentials), algorithms: algorithms)]), expires: expires).jsonText
        }

        @Test("A listed SHA-256 or SHA-512 fingerprint proves the domain until now + expires",
              arguments: [[POSHHashAlgorithm.sha256], [.sha512], [.sha256, .sha512], [.sha384]])
        func proven(algorithms: [POSHHashAlgorithm]) async throws {
            let clock = ManualClock()
            let fetcher = FakePOSHFetcher([Self.sourceURL: .document(try Self.fingerprintsDocument(Self.hosting, algorithms: algorithms, expires: 3600))])
            let proof = POSHProof(fetcher: fetcher, now: { clock.now })
            #expect(proof.method == .posh)
            let outcome = await proof.prove("tenant.example", evidence: try Self.evidence(Self.hosting))
            #expect(outcome == .proven(.posh, expires: clock.now + 3600))
            #expect(fetcher.calls == [Self.sourceURL])
        }

        @Test("Another certificate is refuted, which differs from nothing published")
        func refuted() async throws {
            let fetcher = FakePOSHFetcher([Self.sourceURL: .document(try Self.fingerprintsDocument(Self.hosting, algorithms: [.sha256, .sha512], expires: 3600))])
            let proof = POSHProof(fetcher: fetcher)
            let outcome = await proof.prove("tenant.example", evidence: try Self.evidence(Self.other))
            guard case .refuted(let reason) = outcome else {
                Issue.record("expected refuted, got \(outcome)")
                return
            }
            #expect(reason.contains("tenant.example"))

            let nothing = await POSHProof(fetcher: FakePOSHFetcher()).prove("tenant.example", evidence: try Self.evidence(Self.other))
            guard case .notApplicable(let why) = nothing else {
                Issue.record("expected notApplicable, got \(nothing)")
                return
            }
            #expect(why.contains("no POSH document at \(Self.sourceURL)"))
        }

        @Test("A descriptor whose SHA-256 matches but whose SHA-512 does not is no match")
        func contradictoryDescriptor() async throws {
            var descriptor = POSHFingerprint(certificateDER: try Self.der(Self.hosting))
            descriptor.digests["sha-512"] = Array(repeating: 0, count: 64)
            let text = POSHDocument(content: .fingerprints([descriptor]), expires: 60).jsonText
            let proof = POSHProof(fetcher: FakePOSHFetcher([Self.sourceURL: .document(text)]))
            guard case .refuted = await proof.prove("tenant.example", evidence: try Self.evidence(Self.hosting)) else {
                Issue.record("a half-matching descriptor was accepted")
                return
            }
        }

        @Test("404, fetch errors, malformed documents, unsupported hashes and no certificate are not applicable",
              arguments: ["404", "error", "malformed", "unsupported", "nocert", "notadomain"])
        func notApplicable(kind: String) async throws {
            let fetcher = FakePOSHFetcher()
            var evidence = try Self.evidence(Self.hosting)
            var domain = "tenant.example"
            switch kind {
            case "error": fetcher.set(Self.sourceURL, .failure)
            case "malformed": fetcher.set(Self.sourceURL, .document(#"{"fingerprints": [], "expires": 10}"#))
            case "unsupported": fetcher.set(Self.sourceURL, .document(#"{"fingerprints": [{"sha-1": "AAAA"}], "expires": 10}"#))
            case "nocert": evidence = PeerEvidence(certificateChain: [])
            case "notadomain": domain = "[::1]"
            default: break
            }
            let outcome = await POSHProof(fetcher: fetcher).prove(domain, evidence: evidence)
            guard case .notApplicable = outcome else {
                Issue.record("\(kind): expected notApplicable, got \(outcome)")
                return
            }
            #expect(fetcher.calls == (["nocert", "notadomain"].contains(kind) ? [] : [Self.sourceURL]))
        }

        @Test("expires 0 withdraws the material: not usable, directly or at the end of a reference")
        func expiresZero() async throws {
            let direct = FakePOSHFetcher([Self.sourceURL: .document(try Self.fingerprintsDocument(Self.hosting, algorithms: [.sha256], expires: 0))])
            let outcome = await POSHProof(fetcher: direct).prove("tenant.example", evidence: try Self.evidence(Self.hosting))
            guard case .notApplicable(let reason) = outcome else {
                Issue.record("expires 0 was used: \(outcome)")
                return
            }
            #expect(reason.contains("expires 0"))

            let referenced = FakePOSHFetcher([
                Self.sourceURL: .document(POSHPublisher.referenceDocument(url: Self.providerURL, expires: 0)),
                Self.providerURL: .document(try Self.fingerprintsDocument(Self.hosting, algorithms: [.sha256], expires: 3600)),
            ])
            guard case .notApplicable = await POSHProof(fetcher: referenced).prove("tenant.example", evidence: try Self.evidence(Self.hosting)) else {
                Issue.record("a reference with expires 0 was followed")
                return
            }
            #expect(referenced.calls == [Self.sourceURL])

            let target = FakePOSHFetcher([
                Self.sourceURL: .document(POSHPublisher.referenceDocument(url: Self.providerURL, expires: 3600)),
                Self.providerURL: .document(try Self.fingerprintsDocument(Self.hosting, algorithms: [.sha256], expires: 0)),
            ])
            guard case .notApplicable = await POSHProof(fetcher: target).prove("tenant.example", evidence: try Self.evidence(Self.hosting)) else {
                Issue.record("a referenced document with expires 0 was used")
                return
            }
        }

        @Test("A reference is followed once; the proof lasts the lower expires, capped by the maximum")
        func reference() async throws {
            let clock = ManualClock()
            let fetcher = FakePOSHFetcher([
                Self.sourceURL: .document(POSHPublisher.referenceDocument(url: Self.providerURL, expires: 7200)),
                Self.providerURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 600)),
            ])
            let proof = POSHProof(fetcher: fetcher, now: { clock.now })
            #expect(await proof.prove("tenant.example", evidence: try Self.evidence(Self.hosting)) == .proven(.posh, expires: clock.now + 600))
            #expect(fetcher.calls == [Self.sourceURL, Self.providerURL])
            guard case .refuted = await proof.prove("tenant.example", evidence: try Self.evidence(Self.other)) else {
                Issue.record("another certificate was accepted through the reference")
                return
            }
            // Served from the cache: no new fetch.
            #expect(fetcher.calls.count == 2)

            // The lower of the two is the referrer's here; and maximumCache caps both.
            let capped = FakePOSHFetcher([
                Self.sourceURL: .document(POSHPublisher.referenceDocument(url: Self.providerURL, expires: 300)),
                Self.providerURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 900)),
            ])
            let short = POSHProof(fetcher: capped, now: { clock.now })
            #expect(await short.prove("tenant.example", evidence: try Self.evidence(Self.hosting)) == .proven(.posh, expires: clock.now + 300))
            let cappedProof = POSHProof(fetcher: capped, maximumCache: .seconds(120), now: { clock.now })
            #expect(await cappedProof.prove("tenant.example", evidence: try Self.evidence(Self.hosting)) == .proven(.posh, expires: clock.now + 120))
        }

        @Test("A document is fetched again before it expires; a failed refresh keeps it until then, never after")
        func refreshAhead() async throws {
            let clock = ManualClock()
            let document = try Self.fingerprintsDocument(Self.hosting, algorithms: [.sha256], expires: 20)
            let fetcher = FakePOSHFetcher([Self.sourceURL: .document(document)])
            let proof = POSHProof(fetcher: fetcher, refreshAhead: .seconds(10), now: { clock.now })
            let evidence = try Self.evidence(Self.hosting)
            let start = clock.now
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 20))
            // Outside the refresh window (the last half of the 20 s): the cache answers.
            clock.advance(9)
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 20))
            #expect(fetcher.calls.count == 1)
            // In it: fetched again, and the renewal gets a later expiry while the first holds.
            clock.advance(2)
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 31))
            #expect(fetcher.calls.count == 2)
            // The next refresh fails (the server is unreachable): the material fetched at 11 s
            // is still valid until 31 s, so the proof holds, and the next call tries again.
            fetcher.set(Self.sourceURL, .failure)
            clock.advance(11)
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 31))
            #expect(fetcher.calls.count == 3)
            clock.advance(5)
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 31))
            #expect(fetcher.calls.count == 4)
            // Past its expires nothing is kept: the failure is the answer.
            clock.advance(6)
            guard case .notApplicable = await proof.prove("tenant.example", evidence: evidence) else {
                Issue.record("material was used past its expires")
                return
            }
            #expect(fetcher.calls.count == 5)
            // A refresh that finds another certificate listed replaces the old material at once.
            fetcher.set(Self.sourceURL, .document(document))
            clock.advance(61)
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: clock.now + 20))
            fetcher.set(Self.sourceURL, .document(try Self.fingerprintsDocument(Self.other, algorithms: [.sha256], expires: 20)))
            clock.advance(12)
            guard case .refuted = await proof.prove("tenant.example", evidence: evidence) else {
                Issue.record("a changed document did not replace the still-valid one")
                return
            }
        }

        @Test("A reference to a reference, or to a non-HTTPS URL, is not followed further")
        func badReferences() async throws {
            let secondURL = "https://third.example/.well-known/posh/xmpp-server.json"
            let chained = FakePOSHFetcher([
                Self.sourceURL: .document(POSHPublisher.referenceDocument(url: Self.providerURL, expires: 3600)),
                Self.providerURL: .document(POSHPublisher.referenceDocument(url: secondURL, expires: 3600)),
                secondURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 3600)),
            ])
            let outcome = await POSHProof(fetcher: chained).prove("tenant.example", evidence: try Self.evidence(Self.hosting))
            guard case .notApplicable(let reason) = outcome else {
                Issue.record("a reference to a reference was followed: \(outcome)")
                return
            }
            #expect(reason.contains("another reference"))
            #expect(chained.calls == [Self.sourceURL, Self.providerURL])

            let httpURL = "http://hosting.example.net/.well-known/posh/xmpp-server.json"
            let insecure = FakePOSHFetcher([
                Self.sourceURL: .document(#"{"url": "\#(httpURL)", "expires": 3600}"#),
                httpURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 3600)),
            ])
            guard case .notApplicable = await POSHProof(fetcher: insecure).prove("tenant.example", evidence: try Self.evidence(Self.hosting)) else {
                Issue.record("a non-HTTPS reference was followed")
                return
            }
            #expect(insecure.calls == [Self.sourceURL])
        }

        @Test("The domain is looked up in A-label form")
        func idn() async throws {
            let url = "https://xn--bcher-kva.example/.well-known/posh/xmpp-client.json"
            let fetcher = FakePOSHFetcher([url: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 60))])
            let proof = POSHProof(fetcher: fetcher, service: "xmpp-client")
            guard case .proven(.posh, _) = await proof.prove("Bücher.example", evidence: try Self.evidence(Self.hosting)) else {
                Issue.record("IDN domain not proven; fetched \(fetcher.calls)")
                return
            }
            #expect(fetcher.calls == [url])
        }

        @Test("Results are cached until expiry, then the whole chain is fetched again")
        func caching() async throws {
            let clock = ManualClock()
            let start = clock.now
            let fetcher = FakePOSHFetcher([
                Self.sourceURL: .document(POSHPublisher.referenceDocument(url: Self.providerURL, expires: 1000)),
                Self.providerURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 1000)),
            ])
            let proof = POSHProof(fetcher: fetcher, now: { clock.now })
            let evidence = try Self.evidence(Self.hosting)
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 1000))
            clock.advance(900)
            // A cache hit (before the last minute, the refresh window) keeps the expiry of
            // the fetch, not "now + expires".
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: start + 1000))
            #expect(fetcher.calls.count == 2)
            clock.advance(100)
            // Stale: the tenant withdrew the reference meanwhile.
            fetcher.set(Self.sourceURL, .notFound)
            guard case .notApplicable = await proof.prove("tenant.example", evidence: evidence) else {
                Issue.record("a stale cache entry was used")
                return
            }
            #expect(fetcher.calls == [Self.sourceURL, Self.providerURL, Self.sourceURL])
        }

        @Test("Failures are cached briefly")
        func failureCache() async throws {
            let clock = ManualClock()
            let fetcher = FakePOSHFetcher([Self.sourceURL: .failure])
            let proof = POSHProof(fetcher: fetcher, failureCache: .seconds(60), now: { clock.now })
            let evidence = try Self.evidence(Self.hosting)
            guard case .notApplicable = await proof.prove("tenant.example", evidence: evidence) else { Issue.record("not notApplicable"); return }
            clock.advance(59)
            guard case .notApplicable = await proof.prove("tenant.example", evidence: evidence) else { Issue.record("not notApplicable"); return }
            #expect(fetcher.calls.count == 1)
            clock.advance(1)
            fetcher.set(Self.sourceURL, .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 60)))
            #expect(await proof.prove("tenant.example", evidence: evidence) == .proven(.posh, expires: clock.now + 60))
            #expect(fetcher.calls.count == 2)

            // With no failure cache, every attempt asks again.
            let uncached = FakePOSHFetcher([Self.sourceURL: .failure])
            let eager = POSHProof(fetcher: uncached, failureCache: .zero, now: { clock.now })
            _ = await eager.prove("tenant.example", evidence: evidence)
            _ = await eager.prove("tenant.example", evidence: evidence)
            #expect(uncached.calls.count == 2)
        }

        @Test("invalidate(domain:) forgets a cached document")
        func invalidate() async throws {
            let fetcher = FakePOSHFetcher([Self.sourceURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 3600))])
            let proof = POSHProof(fetcher: fetcher)
            let evidence = try Self.evidence(Self.hosting)
            _ = await proof.prove("tenant.example", evidence: evidence)
            proof.invalidate(domain: "TENANT.example")
            _ = await proof.prove("tenant.example", evidence: evidence)
            #expect(fetcher.calls.count == 2)
        }

        @Test("Concurrent proofs for one domain share one fetch")
        func concurrent() async throws {
            let fetcher = FakePOSHFetcher(
                [Self.sourceURL: .document(POSHPublisher.fingerprintsDocument(certificateDER: [try Self.der(Self.hosting)], expires: 3600))],
                delay: .milliseconds(200))
            let proof = POSHProof(fetcher: fetcher)
            let matching = try Self.evidence(Self.hosting)
            let other = try Self.evidence(Self.other)
            let outcomes = await withTaskGroup(of: (Int, ProofOutcome).self) { group in
                for index in 0..<20 {
                    group.addTask { (index, await proof.prove("tenant.example", evidence: index % 2 == 0 ? matching : other)) }
                }
                var collected: [Int: ProofOutcome] = [:]
                for await (index, outcome) in group { collected[index] = outcome }
                return collected
            }
            #expect(fetcher.calls == [Self.sourceURL])
            #expect(outcomes.count == 20)
            for (index, outcome) in outcomes {
                if index % 2 == 0 {
                    guard case .proven(.posh, _) = outcome else { Issue.record("\(index): \(outcome)"); continue }
                } else {
                    guard case .refuted = outcome else { Issue.record("\(index): \(outcome)"); continue }
                }
            }
        }
    }
}
