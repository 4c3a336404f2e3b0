import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Trust

/// Why a POSH fetch failed (other than 404, which is "nothing published").
public struct POSHFetchError: Error, Sendable, Hashable, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// Fetches POSH documents over HTTPS with AsyncHTTPClient (RFC 7711 §3, §10).
///
/// - Only `https:` URLs are fetched, and the server is verified with ordinary PKIX: chain to
///   the system trust store (and any extra CA files given, e.g. a federation lab's own CA),
///   name matched per RFC 2818 / RFC 6125. Anything weaker would let whoever can answer for
///   the domain's web address vouch for an XMPP certificate.
/// - Redirects are followed by hand, because AsyncHTTPClient would also follow one to
///   `http:`; each must point to `https:`, and at most ``maximumRedirects`` are followed
///   (RFC 7711 §10). All are treated as temporary: nothing about them is remembered.
/// - The whole fetch, redirects and body included, must finish within the timeout, and the
///   body may not exceed ``maximumBodyBytes``: a receiving server fetches while a peer's
///   stream waits (digest §9.4), so a slow or huge answer must not hold it.
///
/// Call ``shutdown()`` before releasing the fetcher.
public final class POSHHTTPFetcher: POSHFetching {
    public let timeout: Duration
    public let maximumBodyBytes: Int
    public let maximumRedirects: Int
    private let connectOverrides: [String: ServerTarget]
    private let client: HTTPClient

    /// - Parameters:
    ///   - trustAnchorFiles: PEM files of CA certificates trusted besides (or, without the
    ///     system store, instead of) the system's.
    ///   - useSystemTrustStore: trust the system's CA store too.
    ///   - timeout: for the whole fetch, redirects and body included.
    ///   - maximumBodyBytes: the largest document accepted.
    ///   - maximumRedirects: redirects followed before giving up (RFC 7711 §10: 10).
    ///   - connectOverrides: for tests and labs: connect to this host and port for a name
    ///     instead of looking it up (TLS still checks the certificate for the name).
    ///   - eventLoopGroup: where the HTTP client runs; nil: NIO's shared singleton group.
    /// - Throws: ``POSHFetchError`` when a trust anchor file cannot be read.
    public init(
        trustAnchorFiles: [String] = [],
        useSystemTrustStore: Bool = true,
        timeout: Duration = .seconds(10),
        maximumBodyBytes: Int = 64 * 1024,
        maximumRedirects: Int = 10,
        connectOverrides: [String: ServerTarget] = [:],
        eventLoopGroup: (any EventLoopGroup)? = nil
    ) throws {
        var extraRoots: [NIOSSLCertificate] = []
        for file in trustAnchorFiles {
            do {
                extraRoots += try NIOSSLCertificate.fromPEMFile(file)
            } catch {
                throw POSHFetchError("cannot load trust anchors from \(file): \(error)")
            }
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.certificateVerification = .fullVerification
        if useSystemTrustStore {
            tls.trustRoots = .default
            if !extraRoots.isEmpty { tls.additionalTrustRoots = [.certificates(extraRoots)] }
        } else {
            tls.trustRoots = .certificates(extraRoots)
        }

        let timeoutAmount = TimeAmount.nanoseconds(Self.nanoseconds(timeout))
        var configuration = HTTPClient.Configuration(
            tlsConfiguration: tls,
            redirectConfiguration: .disallow,
            timeout: .init(connect: timeoutAmount, read: timeoutAmount),
            decompression: .disabled
        )
        configuration.httpVersion = .http1Only
        // A refused or unreachable server is an answer ("no POSH here"), not something to
        // retry until the timeout while a peer's stream waits.
        configuration.connectionPool.retryConnectionEstablishment = false
        var normalizedOverrides: [String: ServerTarget] = [:]
        for (name, target) in connectOverrides {
            let key = name.lowercased()
            normalizedOverrides[key] = target
            configuration.dnsOverride[key] = target.host
        }
        self.timeout = timeout
        self.maximumBodyBytes = maximumBodyBytes
        self.maximumRedirects = maximumRedirects
        self.connectOverrides = normalizedOverrides
        if let eventLoopGroup {
            self.client = HTTPClient(eventLoopGroup: eventLoopGroup, configuration: configuration)
        } else {
            self.client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
        }
    }

    /// Closes the client's connections. The fetcher must not be used afterwards.
    public func shutdown() async {
        try? await client.shutdown()
    }

    public func fetch(_ url: String) async throws -> [UInt8]? {
        let deadline = NIODeadline.now() + .nanoseconds(Self.nanoseconds(timeout))
        return try await withThrowingTaskGroup(of: [UInt8]?.self) { group in
            group.addTask { try await self.follow(url, deadline: deadline) }
            group.addTask {
                try await Task.sleep(for: self.timeout)
                throw POSHFetchError("no answer from \(url) within \(self.timeout)")
            }
            defer { group.cancelAll() }
            // The first child to finish decides; the other is cancelled.
            guard let result = try await group.next() else {
                throw POSHFetchError("fetch of \(url) ended without a result")
            }
            return result
        }
    }

    /// GET `url`, following HTTPS redirects.
    private func follow(_ url: String, deadline: NIODeadline) async throws -> [UInt8]? {
        var current = url
        var redirects = 0
        while true {
            guard POSHDocument.isHTTPSURL(current), let components = URLComponents(string: current) else {
                throw POSHFetchError("refusing to fetch \(current): POSH is fetched over HTTPS only (RFC 7711 §3)")
            }
            var request = HTTPClientRequest(url: connectURL(components) ?? current)
            request.method = .GET
            request.headers.add(name: "Accept", value: "application/json")
            request.headers.add(name: "User-Agent", value: "Braid-POSH")
            let response = try await client.execute(request, deadline: deadline)
            switch response.status.code {
            case 200:
                if let length = response.headers.first(name: "Content-Length").flatMap(Int.init), length > maximumBodyBytes {
                    throw POSHFetchError("\(current): document of \(length) bytes exceeds \(maximumBodyBytes)")
                }
                let body: ByteBuffer
                do {
                    body = try await response.body.collect(upTo: maximumBodyBytes)
                } catch let error as NIOTooManyBytesError {
                    throw POSHFetchError("\(current): document exceeds \(maximumBodyBytes) bytes: \(error)")
                }
                return Array(body.readableBytesView)
            case 404:
                // Nothing published (RFC 7711 §3). The body is not read; dropping the
                // response releases the connection.
                return nil
            case 301, 302, 303, 307, 308:
                guard let location = response.headers.first(name: "Location"), !location.isEmpty else {
                    throw POSHFetchError("\(current): redirect without a Location")
                }
                guard let target = URL(string: location, relativeTo: URL(string: current))?.absoluteURL.absoluteString else {
                    throw POSHFetchError("\(current): unusable redirect target '\(location)'")
                }
                guard POSHDocument.isHTTPSURL(target) else {
                    throw POSHFetchError("\(current) redirects to \(target), which is not HTTPS (RFC 7711 §10)")
                }
                redirects += 1
                guard redirects <= maximumRedirects else {
                    throw POSHFetchError("more than \(maximumRedirects) redirects fetching \(url) (RFC 7711 §10)")
                }
                current = target
            default:
                throw POSHFetchError("\(current): HTTP \(response.status.code)")
            }
        }
    }

    /// The URL to request: for an overridden name, the same URL with the override's port
    /// (the host stays, for SNI and certificate checks; the client's DNS override supplies
    /// the address).
    private func connectURL(_ components: URLComponents) -> String? {
        guard let host = components.host?.lowercased(), let target = connectOverrides[host] else { return nil }
        var rewritten = components
        rewritten.port = target.port
        return rewritten.string
    }

    private static func nanoseconds(_ duration: Duration) -> Int64 {
        let components = duration.components
        let (seconds, overflow) = components.seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return Int64.max }
        return seconds &+ components.attoseconds / 1_000_000_000
    }
}
