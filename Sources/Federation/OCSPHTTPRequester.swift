import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Trust
import X509

/// Why an OCSP request over HTTP failed.
public struct OCSPHTTPError: Error, Sendable, Hashable, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// Sends OCSP requests over HTTP with AsyncHTTPClient (RFC 6960 App. A.1): a POST of the
/// DER request with `Content-Type: application/ocsp-request`, answered by a DER
/// `application/ocsp-response`.
///
/// - `http:` and `https:` responder URLs are accepted (responders are normally plain HTTP:
///   the response is signed, RFC 6960 §4.2.2.2); HTTPS is verified against the system
///   store. Redirects are not followed.
/// - Every request must finish within ``timeout``, body included, and the body may not
///   exceed ``maximumBodyBytes``: a revocation check must never hold a stream.
/// - Conforms to swift-certificates' `OCSPRequester` (through ``OCSPFetching``), so it also
///   works with `OCSPVerifierPolicy` directly; every failure is reported as non-terminal,
///   i.e. soft.
///
/// Call ``shutdown()`` when done if the requester made its own client.
public struct OCSPHTTPRequester: OCSPFetching {
    public let timeout: Duration
    public let maximumBodyBytes: Int
    private let client: HTTPClient
    private let ownsClient: Bool

    /// - Parameters:
    ///   - client: an existing client to share; nil makes one (then call ``shutdown()``).
    ///   - timeout: for each request, connection, upload and body included.
    ///   - maximumBodyBytes: the largest response accepted. Responses carrying a delegated
    ///     responder certificate are a few kilobytes.
    ///   - eventLoopGroup: for a client made here; nil: AsyncHTTPClient's shared group.
    public init(
        client: HTTPClient? = nil,
        timeout: Duration = .seconds(5),
        maximumBodyBytes: Int = 64 * 1024,
        eventLoopGroup: (any EventLoopGroup)? = nil
    ) {
        self.timeout = timeout
        self.maximumBodyBytes = maximumBodyBytes
        if let client {
            self.client = client
            self.ownsClient = false
        } else {
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.minimumTLSVersion = .tlsv12
            tls.certificateVerification = .fullVerification
            let amount = TimeAmount.nanoseconds(Self.nanoseconds(timeout))
            var configuration = HTTPClient.Configuration(
                tlsConfiguration: tls,
                redirectConfiguration: .disallow,
                timeout: .init(connect: amount, read: amount),
                decompression: .disabled
            )
            configuration.httpVersion = .http1Only
            self.client = HTTPClient(eventLoopGroup: eventLoopGroup ?? HTTPClient.defaultEventLoopGroup, configuration: configuration)
            self.ownsClient = true
        }
    }

    /// Shuts down the client if this requester made it.
    public func shutdown() async {
        guard ownsClient else { return }
        try? await client.shutdown()
    }

    public func fetch(request: [UInt8], uri: String) async throws -> [UInt8] {
        guard let components = URLComponents(string: uri), let scheme = components.scheme?.lowercased(),
              scheme == "http" || scheme == "https", components.host?.isEmpty == false
        else {
            throw OCSPHTTPError("unusable OCSP responder URL '\(uri)'")
        }
        let deadline = NIODeadline.now() + .nanoseconds(Self.nanoseconds(timeout))
        let limit = timeout
        return try await withThrowingTaskGroup(of: [UInt8].self) { group in
            group.addTask { try await self.post(request, to: uri, deadline: deadline) }
            group.addTask {
                try await Task.sleep(for: limit)
                throw OCSPHTTPError("no answer from \(uri) within \(limit)")
            }
            defer { group.cancelAll() }
            // The first child to finish decides; the other is cancelled.
            guard let result = try await group.next() else {
                throw OCSPHTTPError("OCSP request to \(uri) ended without a result")
            }
            return result
        }
    }

    private func post(_ body: [UInt8], to uri: String, deadline: NIODeadline) async throws -> [UInt8] {
        var request = HTTPClientRequest(url: uri)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/ocsp-request")
        request.headers.add(name: "Accept", value: "application/ocsp-response")
        request.headers.add(name: "User-Agent", value: "Braid-OCSP")
        // One request per connection (checks are daily per certificate): a kept-alive idle
        // connection holds a single-threaded responder (OpenSSL's `ocsp` serves one
        // connection at a time), and every other checker, another server's included, then
        // times out and learns nothing for an hour.
        request.headers.add(name: "Connection", value: "close")
        request.body = .bytes(ByteBuffer(bytes: body))
        let response = try await client.execute(request, deadline: deadline)
        guard response.status == .ok else {
            throw OCSPHTTPError("\(uri): HTTP \(response.status.code)")
        }
        if let length = response.headers.first(name: "Content-Length").flatMap(Int.init), length > maximumBodyBytes {
            throw OCSPHTTPError("\(uri): response of \(length) bytes exceeds \(maximumBodyBytes)")
        }
        do {
            let collected = try await response.body.collect(upTo: maximumBodyBytes)
            return Array(collected.readableBytesView)
        } catch let error as NIOTooManyBytesError {
            throw OCSPHTTPError("\(uri): response exceeds \(maximumBodyBytes) bytes: \(error)")
        }
    }

    private static func nanoseconds(_ duration: Duration) -> Int64 {
        let components = duration.components
        let (seconds, overflow) = components.seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return Int64.max }
        return seconds &+ components.attoseconds / 1_000_000_000
    }
}
