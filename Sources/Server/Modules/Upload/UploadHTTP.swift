import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import Synchronization

/// The upload routes on the HTTPS listener: `PUT`, `GET`, `HEAD` and `OPTIONS` on
/// `/upload/ID/SIGNATURE/FILENAME`.
///
/// PUT checks everything it can from the head (signature, expiry, `Content-Length`,
/// `Content-Type`) before it reads a byte, then streams the body to a temporary file: memory
/// stays flat whatever the size. GET serves the declared type only when browsers cannot run
/// it (XEP-0363 §11: a file must not become a page of the service's origin), else an
/// attachment.
struct UploadHTTP: Sendable {
    static let prefix = "upload"

    let service: UploadService
    let server: ServerContext

    private var logger: Logger { server.logger }

    func install(on router: Hummingbird.Router<BasicRequestContext>) {
        let path = RouterPath("/\(Self.prefix)/:id/:signature/:name")
        router.put(path) { request, _ in await self.put(request) }
        router.get(path) { request, _ in await self.get(request, head: false) }
        router.head(path) { request, _ in await self.get(request, head: true) }
        router.on(path, method: .options) { _, _ in
            // CORS preflight: a web client uploads from its own origin (XEP-0363 §6).
            Response(status: .noContent, headers: Self.headers(Self.cors + [("Access-Control-Max-Age", "86400")]))
        }
    }

    /// The slot id, signature and (percent-decoded) file name of a request path; nil when the
    /// path is not of that shape or the id is not a valid one.
    static func parse(path: String) -> (id: UploadID, signature: String, filename: String)? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 5, parts[0].isEmpty, parts[1] == prefix, let id = UploadID(parts[2]),
              let filename = String(parts[4]).removingPercentEncoding else { return nil }
        return (id, String(parts[3]), filename)
    }

    /// Every byte but the unreserved ones (RFC 3986 §2.3) percent-encoded.
    static func percentEncode(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    static func path(for record: UploadRecord, signature: String) -> String {
        "/\(prefix)/\(record.id)/\(signature)/\(percentEncode(record.filename))"
    }

    // MARK: PUT

    private enum PutFailure: Error {
        case idle, tooSlow
    }

    private func put(_ request: Request) async -> Response {
        let metrics = server.metrics
        guard let (id, signature, filename) = Self.parse(path: request.uri.path) else {
            metrics.uploadPut("forbidden")
            return Self.status(.notFound)
        }
        let signer: UploadSigner
        do {
            signer = try await service.prepare()
        } catch {
            logger.error("upload store unavailable", metadata: ["error": "\(error)"])
            return Self.status(.serviceUnavailable)
        }
        let record: UploadRecord
        switch service.beginPut(id: id, signature: signature, filename: filename, signer: signer) {
        case .forbidden(let reason):
            logger.info("upload PUT refused", metadata: ["slot": "\(id)", "reason": "\(reason)"])
            metrics.uploadPut("forbidden")
            return Self.status(.forbidden)
        case .conflict:
            logger.info("upload PUT refused", metadata: ["slot": "\(id)", "reason": "slot already used"])
            metrics.uploadPut("conflict")
            return Self.status(.conflict)
        case .accept(let accepted):
            record = accepted
        }
        // From here the slot is marked as uploading: every way out must release it.
        if let refusal = Self.checkHead(request, for: record) {
            service.finishPut(id, stored: false)
            logger.info("upload PUT refused", metadata: ["slot": "\(id)", "account": "\(record.account)", "reason": "\(refusal.reason)"])
            metrics.uploadPut(refusal.status == .contentTooLarge ? "too-large" : "bad-request")
            return Self.status(refusal.status)
        }
        let progress = Progress()
        let idle = Duration.seconds(max(1, service.settings.putIdleSeconds))
        let total = Duration.seconds(max(1, service.settings.putTimeoutSeconds))
        let store = service.store
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    try await store.write(record, from: request.body, progress: { progress.touch() })
                }
                group.addTask {
                    // The watchdog: a sender that stops, or takes too long, holds a connection
                    // and a temporary file; cut it off.
                    let started = ContinuousClock.now
                    while true {
                        try await Task.sleep(for: min(idle, .seconds(1)))
                        if ContinuousClock.now - started > total { throw PutFailure.tooSlow }
                        if progress.idle > idle { throw PutFailure.idle }
                    }
                }
                try await group.next()
                group.cancelAll()
            }
        } catch {
            service.finishPut(id, stored: false)
            let (status, outcome): (HTTPResponse.Status, String) = switch error {
            case PutFailure.idle, PutFailure.tooSlow: (.requestTimeout, "timeout")
            case UploadStoreError.sizeMismatch: (.badRequest, "bad-request")
            case UploadStoreError.exists: (.conflict, "conflict")
            default: (.internalServerError, "failed")
            }
            logger.info("upload PUT failed", metadata: ["slot": "\(id)", "account": "\(record.account)", "error": "\(error)"])
            metrics.uploadPut(outcome)
            return Self.status(status)
        }
        service.finishPut(id, stored: true)
        metrics.uploadPut("stored", bytes: record.size)
        logger.debug("upload stored", metadata: ["slot": "\(id)", "account": "\(record.account)", "bytes": "\(record.size)"])
        return Self.status(.created)
    }

    /// What is wrong with a PUT's head, before its body is read.
    static func checkHead(_ request: Request, for record: UploadRecord) -> (status: HTTPResponse.Status, reason: String)? {
        guard let lengthText = request.headers[.contentLength] else { return (.lengthRequired, "no Content-Length") }
        guard let length = Int(lengthText), length >= 0 else { return (.badRequest, "bad Content-Length") }
        if length > record.size { return (.contentTooLarge, "Content-Length \(length) above the slot's \(record.size)") }
        if length != record.size { return (.badRequest, "Content-Length \(length) is not the slot's \(record.size)") }
        // §5: the Content-Type must be the one the slot was requested with.
        if let expected = record.contentType, request.headers[.contentType]?.lowercased() != expected.lowercased() {
            return (.badRequest, "Content-Type \(request.headers[.contentType] ?? "none") is not the slot's \(expected)")
        }
        return nil
    }

    // MARK: GET and HEAD

    private func get(_ request: Request, head: Bool) async -> Response {
        let metrics = server.metrics
        guard let (id, signature, filename) = Self.parse(path: request.uri.path) else {
            metrics.uploadGet(status: 404)
            return Self.status(.notFound)
        }
        guard let signer = try? await service.prepare() else { return Self.status(.serviceUnavailable) }
        let record: UploadRecord
        switch service.authorizeGet(id: id, signature: signature, filename: filename, signer: signer) {
        case .serve(let found) where server.domains.isHosted(found.domain):
            record = found
        case .forbidden:
            logger.info("upload GET refused", metadata: ["slot": "\(id)", "reason": "bad signature"])
            metrics.uploadGet(status: 403)
            return Self.status(.forbidden)
        case .serve, .notFound:
            // Expired, removed (its domain too) and never-existing files look alike.
            metrics.uploadGet(status: 404)
            return Self.status(.notFound)
        }
        var headers = Self.cors + Self.contentHeaders(for: record) + [("Accept-Ranges", "bytes")]
        var status = HTTPResponse.Status.ok
        var range = 0...(record.size - 1)
        switch Self.range(request.headers[.range], size: record.size) {
        case .whole:
            break
        case .part(let part):
            status = .partialContent
            range = part
            headers.append(("Content-Range", "bytes \(part.lowerBound)-\(part.upperBound)/\(record.size)"))
        case .unsatisfiable:
            metrics.uploadGet(status: 416)
            return Response(status: .rangeNotSatisfiable, headers: Self.headers(Self.cors + [("Content-Range", "bytes */\(record.size)"), ("Content-Length", "0")]))
        }
        metrics.uploadGet(status: status.code)
        if head {
            return Response(status: status, headers: Self.headers(headers + [("Content-Length", String(range.count))]))
        }
        let store = service.store
        let logger = self.logger
        let served = range
        return Response(status: status, headers: Self.headers(headers), body: ResponseBody(contentLength: range.count) { writer in
            do {
                try await store.read(id, range: served) { chunk in try await writer.write(chunk) }
            } catch {
                logger.info("upload GET ended early", metadata: ["slot": "\(id)", "error": "\(error)"])
                throw error
            }
            try await writer.finish(nil)
        })
    }

    /// Types a browser shows without running anything (no SVG: it carries scripts).
    static func isSafeInline(_ contentType: String?) -> Bool {
        guard let contentType else { return false }
        let media = (contentType.split(separator: ";").first.map(String.init) ?? "").trimmingCharacters(in: .whitespaces).lowercased()
        if media == "image/svg+xml" { return false }
        return media.hasPrefix("image/") || media.hasPrefix("audio/") || media.hasPrefix("video/") || media == "application/pdf" || media == "text/plain"
    }

    static func contentHeaders(for record: UploadRecord) -> [(String, String)] {
        var headers: [(String, String)] = [
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "default-src 'none'; sandbox"),
            // The URL never changes content; the signature makes it private.
            ("Cache-Control", "private, max-age=604800, immutable"),
        ]
        if let contentType = record.contentType, isSafeInline(contentType) {
            headers.append(("Content-Type", contentType))
        } else {
            headers.append(("Content-Type", "application/octet-stream"))
            headers.append(("Content-Disposition", "attachment; filename*=UTF-8''\(percentEncode(record.filename))"))
        }
        return headers
    }

    enum RangeAnswer: Equatable {
        case whole
        case part(ClosedRange<Int>)
        case unsatisfiable
    }

    /// One `bytes=` range (RFC 9110 §14.2); anything else (several ranges, other units,
    /// nonsense) gets the whole file, as the RFC allows.
    static func range(_ header: String?, size: Int) -> RangeAnswer {
        guard let header, header.hasPrefix("bytes="), !header.contains(",") else { return .whole }
        let spec = header.dropFirst(6).trimmingCharacters(in: .whitespaces)
        guard let dash = spec.firstIndex(of: "-") else { return .whole }
        let first = spec[..<dash], last = spec[spec.index(after: dash)...]
        let digits: (Substring) -> Bool = { !$0.isEmpty && $0.utf8.count <= 18 && $0.utf8.allSatisfy { $0 >= 48 && $0 <= 57 } }
        if first.isEmpty {
            // The last N bytes.
            guard digits(last), let count = Int(last) else { return .whole }
            guard count > 0 else { return .unsatisfiable }
            return .part(max(0, size - count)...(size - 1))
        }
        guard digits(first), let start = Int(first) else { return .whole }
        guard start < size else { return .unsatisfiable }
        if last.isEmpty { return .part(start...(size - 1)) }
        guard digits(last), let end = Int(last), end >= start else { return .whole }
        return .part(start...min(end, size - 1))
    }

    // MARK: Headers

    static let cors: [(String, String)] = [
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Allow-Methods", "PUT, GET, HEAD, OPTIONS"),
        ("Access-Control-Allow-Headers", "Content-Type"),
    ]

    static func headers(_ pairs: [(String, String)]) -> HTTPFields {
        var fields = HTTPFields()
        for (name, value) in pairs {
            if let name = HTTPField.Name(name) { fields.append(HTTPField(name: name, value: value)) }
        }
        return fields
    }

    static func status(_ status: HTTPResponse.Status) -> Response {
        Response(status: status, headers: headers(cors + [("Content-Length", "0")]))
    }
}

/// When the PUT body last moved.
private final class Progress: Sendable {
    private let last = Atomic<Int64>(Progress.nanoseconds())

    private static func nanoseconds() -> Int64 { Int64(clamping: DispatchTime.now().uptimeNanoseconds) }

    func touch() { last.store(Self.nanoseconds(), ordering: .relaxed) }

    var idle: Duration { .nanoseconds(Self.nanoseconds() - last.load(ordering: .relaxed)) }
}
