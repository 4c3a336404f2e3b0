import AsyncHTTPClient
import Foundation
import NIOCore

/// Talks to a running server's admin listener (for the `braid links` command).
public enum AdminClient {
    /// The body of `GET <path>` from the admin listener `configuration` describes.
    ///
    /// A wildcard bind address (`0.0.0.0`, `::`) is reached over loopback.
    ///
    /// - Throws: ``AdminServerError`` when the listener is disabled, unreachable, or answers
    ///   with another status than 200.
    public static func get(_ path: String, configuration: AdminConfiguration, timeout: Duration = .seconds(5)) async throws -> [UInt8] {
        guard let port = configuration.adminPort else {
            throw AdminServerError("the admin listener is disabled (admin.admin_port is null)")
        }
        let url = "http://\(urlHost(configuration.adminAddress)):\(port)\(path)"
        // A client of its own, which does not retry refused connections: when the server
        // is down the answer should be immediate, not after the timeout.
        var settings = HTTPClient.Configuration(timeout: .init(connect: .seconds(Int64(max(1, timeout.components.seconds)))))
        settings.connectionPool.retryConnectionEstablishment = false
        let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: settings)
        let result: Result<[UInt8], AdminServerError>
        do {
            let response = try await client.execute(HTTPClientRequest(url: url), timeout: .seconds(Int64(max(1, timeout.components.seconds))))
            if response.status.code == 200 {
                result = .success(Array(try await response.body.collect(upTo: 64 * 1024 * 1024).readableBytesView))
            } else {
                result = .failure(AdminServerError("\(url) answered HTTP \(response.status.code)"))
            }
        } catch {
            let detail = "\(error)".contains("Connection refused") ? "connection refused" : "\(error)"
            result = .failure(AdminServerError("cannot reach the server's admin listener at \(url) (\(detail)). Is 'braid serve' running with this configuration?"))
        }
        try? await client.shutdown()
        return try result.get()
    }

    /// The federation links of the running server, as JSON and decoded.
    public static func links(configuration: AdminConfiguration) async throws -> (json: [UInt8], links: [AdminLinkInfo]) {
        let json = try await get("/api/links", configuration: configuration)
        do {
            return (json, try AdminJSON.decoder().decode([AdminLinkInfo].self, from: Data(json)))
        } catch {
            throw AdminServerError("the server's /api/links answer does not decode: \(error)")
        }
    }

    static func urlHost(_ address: String) -> String {
        switch address {
        case "", "0.0.0.0": return "127.0.0.1"
        case "::", "[::]": return "[::1]"
        default: return address.contains(":") && !address.hasPrefix("[") ? "[\(address)]" : address
        }
    }
}
