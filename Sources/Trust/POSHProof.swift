import Foundation
import SwiftASN1
import Synchronization
import X509

/// Fetches a POSH document over HTTPS.
///
/// Implementations must verify the HTTPS server with PKIX (RFC 2818; RFC 7711 §3), follow
/// redirects only to `https:` URLs and at most ten times (§10), and bound time and size.
public protocol POSHFetching: Sendable {
    /// The body at `url`; nil when the server answers 404 (nothing published, RFC 7711 §3).
    /// Throws for any other failure: TLS, timeout, another status, a body too large.
    func fetch(_ url: String) async throws -> [UInt8]?
}

/// POSH as a prooftype (RFC 7712 §5.2, RFC 7711): the peer is proven for a domain when the
/// domain publishes, over HTTPS, the fingerprint of the certificate the peer presented.
///
/// This is how a hosted domain vouches for its provider's certificate without the provider
/// holding a certificate for the domain (RFC 7711 §1).
///
/// Outcomes:
/// - `.proven(.posh, expires:)` when a listed fingerprint matches the peer's leaf; the proof
///   lapses with the documents: the lower of every `expires` followed, counted from when
///   they were fetched, capped by `maximumCache` (§6).
/// - `.refuted` when the domain publishes fingerprints and none is the peer's certificate
///   (§3.3: the client SHOULD reject unless another prooftype succeeds; the caller decides).
/// - `.notApplicable` when there is nothing usable: no document (404), a fetch error, a
///   malformed document, `expires: 0` (the publisher withdrew it), a reference that is not
///   HTTPS or leads to another reference, or no hash this implementation supports.
///
/// **Not checked here:** RFC 7711 §6 says an expired PKIX certificate is invalid whatever the
/// POSH document says. POSH replaces only the *name* check; the caller must still check the
/// certificate's validity period (and anything else it wants of it) before accepting this
/// outcome, and let the proof lapse no later than the certificate.
///
/// Results are cached per domain, never indefinitely: a document until its `expires` (at
/// most `maximumCache`), a failure for `failureCache`. When an entry is stale the whole chain
/// is fetched again from the source domain (§6). Concurrent proofs for one domain share one
/// fetch.
///
/// A document is fetched again *before* it expires, once it is in its refresh window (the
/// last half of its lifetime, at most `refreshAhead` or a minute, whichever is longer), so
/// that a proof relying on it can be renewed while it still holds. A failed fetch in that
/// window keeps the material that is still valid and is tried again later: one slow fetch
/// must not lapse the proof and reset a link carrying every other pair (seen in the lab,
/// issue 10). Nothing is used past its `expires`.
public final class POSHProof: DomainProof, Sendable {
    public var method: ProofMethod { .posh }

    private let fetcher: any POSHFetching
    private let service: String
    private let maximumCache: TimeInterval
    private let failureCache: TimeInterval
    private let refreshAhead: TimeInterval
    private let now: @Sendable () -> Date
    private let cache = Mutex<[String: Entry]>([:])

    /// What is known about one domain's POSH material.
    enum Resolution: Sendable, Equatable {
        /// Usable fingerprints, valid until the date.
        case published([POSHFingerprint], validUntil: Date)
        /// Nothing usable, and why.
        case unavailable(String)
    }

    private enum Entry: Sendable {
        /// Served from the cache until `refreshFrom`, then fetched again; unusable at `until`.
        case resolved(Resolution, until: Date, refreshFrom: Date)
        case pending(Task<Resolution, Never>)
    }

    /// Entries beyond this many trigger a sweep of stale ones, so a peer that asks for many
    /// domains cannot grow the cache without bound.
    private static let sweepThreshold = 1024

    /// - Parameters:
    ///   - fetcher: how documents are fetched (``POSHFetching``).
    ///   - service: the POSH service name: `xmpp-server` for s2s, `xmpp-client` for c2s
    ///     (RFC 7712 §5.2, RFC 7711 §8).
    ///   - maximumCache: the longest a document is trusted, whatever its `expires`.
    ///   - failureCache: how long "nothing usable" is remembered before asking again.
    ///   - refreshAhead: how long before a document expires it is fetched again, at least
    ///     (the caller's renewal margin); never more than half the document's lifetime.
    ///   - now: the clock, for tests.
    public init(
        fetcher: any POSHFetching,
        service: String = "xmpp-server",
        maximumCache: Duration = .seconds(86_400),
        failureCache: Duration = .seconds(60),
        refreshAhead: Duration = .seconds(60),
        now: @escaping @Sendable () -> Date = Date.init
    ) {
        self.fetcher = fetcher
        self.service = service
        self.maximumCache = Self.seconds(maximumCache)
        self.failureCache = Self.seconds(failureCache)
        self.refreshAhead = Self.seconds(refreshAhead)
        self.now = now
    }

    public func prove(_ domain: String, evidence: PeerEvidence) async -> ProofOutcome {
        guard let leaf = evidence.certificateChain.first else { return .notApplicable("no certificate") }
        let prepared: PreparedDomain
        do {
            prepared = try PreparedDomain(domain)
        } catch {
            return .notApplicable("POSH: \(error)")
        }
        let leafDER: [UInt8]
        do {
            var serializer = DER.Serializer()
            try serializer.serialize(leaf)
            leafDER = serializer.serializedBytes
        } catch {
            return .notApplicable("POSH: the peer's certificate cannot be encoded: \(error)")
        }
        switch await resolve(prepared.ascii) {
        case .unavailable(let reason):
            return .notApplicable(reason)
        case .published(let descriptors, let validUntil):
            let verdicts = descriptors.map { $0.matches(certificateDER: leafDER) }
            if verdicts.contains(true) {
                return .proven(.posh, expires: validUntil)
            }
            guard verdicts.contains(false) else {
                return .notApplicable("POSH for \(prepared.ascii) lists no hash this server supports")
            }
            return .refuted("the certificate presented is not among the fingerprints \(prepared.ascii) publishes over POSH (RFC 7711 §3.3)")
        }
    }

    /// Forgets what is cached for `domain` (e.g. when an operator knows the tenant changed
    /// its document).
    public func invalidate(domain: String) {
        guard let prepared = try? PreparedDomain(domain) else { return }
        cache.withLock { entries in
            if case .resolved = entries[prepared.ascii] { entries[prepared.ascii] = nil }
        }
    }

    // MARK: Resolution and cache

    /// The POSH material of `domain` (A-label form), from the cache or fetched; one fetch per
    /// domain at a time.
    func resolve(_ domain: String) async -> Resolution {
        let current = now()
        enum Step {
            case cached(Resolution)
            case wait(Task<Resolution, Never>)
        }
        let step: Step = cache.withLock { entries in
            // Material still valid while a new copy is fetched: kept if that fetch fails.
            let stillValid: (resolution: Resolution, until: Date)?
            switch entries[domain] {
            case .resolved(let resolution, _, let refreshFrom) where current < refreshFrom:
                return .cached(resolution)
            case .resolved(let resolution, let until, _) where current < until:
                stillValid = (resolution, until)
            case .pending(let task):
                return .wait(task)
            case .resolved, nil:
                stillValid = nil
            }
            // The fetch runs in its own task so that a caller giving up (a cancelled stream)
            // does not cancel it for the others waiting on it. It takes the lock only after
            // this critical section ends, so it always finds its own entry.
            let task = Task { [self] in
                let started = now()
                let fetched = await lookUp(domain, at: started)
                return store(fetched, for: domain, fetchedAt: started, stillValid: stillValid)
            }
            entries[domain] = .pending(task)
            return .wait(task)
        }
        switch step {
        case .cached(let resolution): return resolution
        case .wait(let task): return await task.value
        }
    }

    /// Caches what a fetch found and returns what callers use: the fetched resolution, or the
    /// still-valid material when a refresh found nothing usable (tried again after half its
    /// remaining time, so a revalidation pass before it lapses retries).
    private func store(_ fetched: Resolution, for domain: String, fetchedAt: Date,
                       stillValid: (resolution: Resolution, until: Date)?) -> Resolution {
        let current = now()
        let result: Resolution
        let until: Date
        let refreshFrom: Date
        switch fetched {
        case .published(_, let validUntil):
            result = fetched
            until = validUntil
            let lifetime = validUntil.timeIntervalSince(fetchedAt)
            refreshFrom = validUntil - min(lifetime / 2, max(refreshAhead, 60))
        case .unavailable:
            if let stillValid, case .published = stillValid.resolution, stillValid.until > current {
                result = stillValid.resolution
                until = stillValid.until
                refreshFrom = min(until, current + max(1, until.timeIntervalSince(current) / 2))
            } else {
                result = fetched
                until = fetchedAt + failureCache
                refreshFrom = until
            }
        }
        cache.withLock { entries in
            if until > current {
                entries[domain] = .resolved(result, until: until, refreshFrom: refreshFrom)
            } else {
                entries[domain] = nil
            }
            if entries.count > Self.sweepThreshold {
                entries = entries.filter { _, entry in
                    if case .resolved(_, let until, _) = entry { return until > current }
                    return true
                }
            }
        }
        return result
    }

    /// Fetches `domain`'s document, following one reference (RFC 7711 §3.2).
    private func lookUp(_ domain: String, at time: Date) async -> Resolution {
        let sourceURL = "https://\(domain)\(POSHPublisher.wellKnownPath(service: service))"
        let first: POSHDocument
        switch await fetchDocument(sourceURL) {
        case .failure(let reason): return .unavailable(reason)
        case .success(let document): first = document
        }
        guard !first.isInvalidated else {
            return .unavailable("POSH at \(sourceURL) has expires 0: the publisher withdrew it (RFC 7711 §3.1)")
        }
        switch first.content {
        case .fingerprints(let descriptors):
            return published(descriptors, lifetimes: [first.expires], at: time)
        case .reference(let url):
            // Parsing already refused non-HTTPS references; checked again because this is
            // the line that decides what gets fetched (RFC 7711 §3.2, §10).
            guard POSHDocument.isHTTPSURL(url) else {
                return .unavailable("POSH at \(sourceURL) refers to a non-HTTPS URL")
            }
            let second: POSHDocument
            switch await fetchDocument(url) {
            case .failure(let reason): return .unavailable("POSH at \(sourceURL) refers to \(url): \(reason)")
            case .success(let document): second = document
            }
            guard case .fingerprints(let descriptors) = second.content else {
                return .unavailable("POSH at \(sourceURL) refers to \(url), which is another reference; only one is followed (RFC 7711 §3.2)")
            }
            guard !second.isInvalidated else {
                return .unavailable("POSH at \(url) (referenced by \(sourceURL)) has expires 0: withdrawn (RFC 7711 §3.1)")
            }
            return published(descriptors, lifetimes: [first.expires, second.expires], at: time)
        }
    }

    /// RFC 7711 §6: the lower of the `expires` values in the chain, and never more than our
    /// own cap.
    private func published(_ descriptors: [POSHFingerprint], lifetimes: [Int], at time: Date) -> Resolution {
        let lifetime = min(TimeInterval(lifetimes.min() ?? 0), maximumCache)
        return .published(descriptors, validUntil: time + lifetime)
    }

    private enum FetchResult {
        case success(POSHDocument)
        case failure(String)
    }

    private func fetchDocument(_ url: String) async -> FetchResult {
        let body: [UInt8]?
        do {
            body = try await fetcher.fetch(url)
        } catch {
            return .failure("cannot fetch \(url): \(error)")
        }
        guard let body else { return .failure("no POSH document at \(url)") }
        do {
            return .success(try POSHDocument(parsing: body))
        } catch {
            return .failure("malformed POSH document at \(url): \(error)")
        }
    }

    private static func seconds(_ duration: Duration) -> TimeInterval {
        let components = duration.components
        return max(0, TimeInterval(components.seconds) + TimeInterval(components.attoseconds) / 1e18)
    }
}
