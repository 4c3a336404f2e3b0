import Crypto
import Foundation
import Logging
import Synchronization
import XMPPCore

/// Signs and checks upload URLs: HMAC-SHA256 over what the URL grants (the slot, its file
/// name, size, content type and expiry) and which method it is for, so a GET URL cannot be
/// used to PUT, and no part of either can be changed.
struct UploadSigner: Sendable {
    enum Purpose: String, Sendable { case put, get }

    let key: SymmetricKey

    init(key: [UInt8]) {
        self.key = SymmetricKey(data: key)
    }

    func signature(_ purpose: Purpose, for record: UploadRecord) -> String {
        // Neither the file name nor the content type can hold a line feed (both are checked
        // at the slot request), so the fields cannot run into each other.
        let fields = ["braid-upload-1", purpose.rawValue, record.id, record.filename, String(record.size), record.contentType ?? "",
                      String(purpose == .put ? record.putExpires : record.expires ?? 0)]
        let mac = HMAC<SHA256>.authenticationCode(for: Data(fields.joined(separator: "\n").utf8), using: key)
        return Self.base64URL(Array(mac))
    }

    /// Compared in constant time.
    func isValid(_ signature: String, _ purpose: Purpose, for record: UploadRecord) -> Bool {
        let expected = Array(self.signature(purpose, for: record).utf8)
        let given = Array(signature.utf8)
        guard given.count == expected.count else { return false }
        var difference: UInt8 = 0
        for (a, b) in zip(given, expected) { difference |= a ^ b }
        return difference == 0
    }

    static func base64URL(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }
}

/// A slot request (XEP-0363 §4), checked.
struct SlotRequest: Sendable, Equatable {
    var filename: String
    var size: Int
    var contentType: String?

    /// Why a request is malformed (`bad-request`), for the error text and the log.
    struct Malformed: Error, Equatable {
        var reason: String
    }

    static let maxFilenameBytes = 255

    init(filename: String, size: Int, contentType: String?) {
        self.filename = filename
        self.size = size
        self.contentType = contentType
    }

    init(_ element: XMLElement) throws(Malformed) {
        guard let filename = element.attribute("filename"), !filename.isEmpty else { throw Malformed(reason: "no filename") }
        guard let sizeText = element.attribute("size") else { throw Malformed(reason: "no size") }
        // Digits only: no sign, no spaces, no exponent.
        guard !sizeText.isEmpty, sizeText.utf8.count <= 18, sizeText.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let size = Int(sizeText), size > 0 else {
            throw Malformed(reason: "size is not a positive integer")
        }
        try Self.check(filename: filename)
        var contentType = element.attribute("content-type")
        if contentType?.isEmpty == true { contentType = nil }
        if let contentType { try Self.check(contentType: contentType) }
        self.init(filename: filename, size: size, contentType: contentType)
    }

    /// A file name is one path component: no `/`, no control characters, not `.` or `..`
    /// (clients would resolve those in the URL).
    static func check(filename: String) throws(Malformed) {
        guard filename.utf8.count <= maxFilenameBytes else { throw Malformed(reason: "filename longer than \(maxFilenameBytes) bytes") }
        guard filename != ".", filename != ".." else { throw Malformed(reason: "filename is a relative path") }
        for scalar in filename.unicodeScalars where scalar == "/" || scalar.properties.generalCategory == .control {
            throw Malformed(reason: scalar == "/" ? "filename contains '/'" : "filename contains a control character")
        }
    }

    /// `type/subtype` with optional parameters, printable ASCII (it becomes an HTTP header).
    static func check(contentType: String) throws(Malformed) {
        let bytes = contentType.utf8
        guard bytes.count <= 255, bytes.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) else { throw Malformed(reason: "content-type is not printable ASCII") }
        let mediaType = contentType.split(separator: ";", maxSplits: 1).first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        let parts = mediaType.split(separator: "/", omittingEmptySubsequences: false)
        let token: (Substring) -> Bool = { part in
            !part.isEmpty && part.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || Array("!#$&-^_.+".utf8).contains(byte)
            }
        }
        guard parts.count == 2, token(parts[0]), token(parts[1]) else { throw Malformed(reason: "content-type is not type/subtype") }
    }
}

/// Why a slot was refused, with what XEP-0363 §4 says to answer.
enum SlotRefusal: Error, Equatable {
    /// Not an account of the service's hosted domain.
    case notAllowed
    case badRequest(String)
    /// §4: `not-acceptable` (modify) with `<file-too-large><max-file-size/></file-too-large>`.
    case fileTooLarge(max: Int)
    /// §4: `resource-constraint` (wait), with `<retry stamp/>` when waiting helps.
    case quota(String, retry: Date?)
    case rateLimited(retry: Date)
    /// No URL can be made (no HTTPS listener and no `upload.base_url`), or the store failed.
    case unavailable

    var metricOutcome: String {
        switch self {
        case .notAllowed: "not-allowed"
        case .badRequest: "bad-request"
        case .fileTooLarge: "file-too-large"
        case .quota: "quota"
        case .rateLimited: "rate-limited"
        case .unavailable: "unavailable"
        }
    }
}

/// A slot given and not used yet: its bytes count against the quotas until it is used or
/// its PUT URL expires.
struct PendingSlot: Sendable, Equatable {
    var record: UploadRecord
    /// A PUT is streaming into it now.
    var uploading = false
}

/// File upload without XMPP or HTTP: slots (checks, quotas, rate), signed URLs, the PUT and
/// GET decisions, and the cleanup. Its clock is injected, so expiry is tested without waiting.
final class UploadService: Sendable {
    private struct State {
        var pending: [String: PendingSlot] = [:]
        var allowances: [String: SendingAllowance] = [:]
    }

    let settings: BraidConfiguration.UploadSettings
    let store: LocalUploadStore
    let now: @Sendable () -> Date
    private let state = Mutex(State())
    private let signerBox = Mutex<UploadSigner?>(nil)

    static let day: TimeInterval = 86_400

    init(settings: BraidConfiguration.UploadSettings, directory: String, now: @escaping @Sendable () -> Date = { Date() }) {
        self.settings = settings
        self.store = LocalUploadStore(directory: directory)
        self.now = now
    }

    /// The store's index and the signing key, loaded once.
    func prepare() async throws -> UploadSigner {
        try await store.prepare()
        if let signer = signerBox.withLock({ $0 }) { return signer }
        let signer = UploadSigner(key: try await store.signingKey())
        signerBox.withLock { $0 = signer }
        return signer
    }

    private var rate: SendingRate {
        SendingRate(perSecond: Double(settings.slotsPerMinute) / 60, burst: Double(settings.slotsPerMinute))
    }

    /// Decides a slot for `account` (bare JID) of `domain`, and reserves its bytes.
    func requestSlot(_ request: SlotRequest, account: String, domain: String) -> Result<UploadRecord, SlotRefusal> {
        let now = self.now()
        if settings.maxFileSize > 0, request.size > settings.maxFileSize { return .failure(.fileTooLarge(max: settings.maxFileSize)) }
        return state.withLock { state -> Result<UploadRecord, SlotRefusal> in
            state.pending = state.pending.filter { $0.value.uploading || Date(timeIntervalSince1970: Double($0.value.record.putExpires)) > now }
            if settings.slotsPerMinute > 0 {
                var allowance = state.allowances[account] ?? SendingAllowance(at: now)
                let allowed = allowance.take(now: now, rate: rate)
                state.allowances[account] = allowance
                if !allowed {
                    let wait = max(0, 1 - allowance.tokens) / rate.perSecond
                    return .failure(.rateLimited(retry: now.addingTimeInterval(wait.rounded(.up))))
                }
                // Accounts that have refilled need no entry (the map would only grow).
                if state.allowances.count > 10_000 {
                    state.allowances = state.allowances.filter { $0.value.tokens < rate.burst - 1 || now.timeIntervalSince($0.value.at) < 60 }
                }
            }
            let pending = Array(state.pending.values.map(\.record))
            // (what is counted, when each part stops counting)
            let accountEntries = store.records(account: account).map { ($0.size, $0.expires.map { Date(timeIntervalSince1970: Double($0)) }) }
                + pending.filter { $0.account == account }.map { ($0.size, Optional(Date(timeIntervalSince1970: Double($0.putExpires)))) }
            if settings.quotaBytesPerAccount > 0,
               let refusal = Self.overQuota(accountEntries, adding: request.size, limit: settings.quotaBytesPerAccount, what: "account's storage quota") {
                return .failure(refusal)
            }
            if settings.quotaBytesPerDomain > 0 {
                let domainEntries = store.records(domain: domain).map { ($0.size, $0.expires.map { Date(timeIntervalSince1970: Double($0)) }) }
                    + pending.filter { $0.domain == domain }.map { ($0.size, Optional(Date(timeIntervalSince1970: Double($0.putExpires)))) }
                if let refusal = Self.overQuota(domainEntries, adding: request.size, limit: settings.quotaBytesPerDomain, what: "domain's storage quota") {
                    return .failure(refusal)
                }
            }
            if settings.bytesPerDayPerAccount > 0 {
                // The last 24 hours' uploads (and reservations) each stop counting a day after they were made.
                let since = Int64(now.addingTimeInterval(-Self.day).timeIntervalSince1970)
                let recent = (store.records(account: account) + pending.filter { $0.account == account }).filter { $0.created > since }
                let entries = recent.map { ($0.size, Optional(Date(timeIntervalSince1970: Double($0.created) + Self.day))) }
                if let refusal = Self.overQuota(entries, adding: request.size, limit: settings.bytesPerDayPerAccount, what: "account's daily upload limit") {
                    return .failure(refusal)
                }
            }
            let created = Int64(now.timeIntervalSince1970)
            let retention = settings.retentionDays(for: domain)
            let record = UploadRecord(id: UploadID.random().value, account: account, domain: domain, filename: request.filename, size: request.size,
                                      contentType: request.contentType, created: created, putExpires: created + Int64(max(1, settings.putURLSeconds)),
                                      expires: retention > 0 ? created + Int64(retention) * Int64(Self.day) : nil)
            state.pending[record.id] = PendingSlot(record: record)
            return .success(record)
        }
    }

    /// Nil when `adding` more bytes stays within `limit`; else the refusal, with the time
    /// enough bytes stop counting (nil when they never do, or the file alone is too large).
    static func overQuota(_ entries: [(size: Int, until: Date?)], adding: Int, limit: Int, what: String) -> SlotRefusal? {
        let used = entries.reduce(0) { $0 + $1.size }
        guard used + adding > limit else { return nil }
        guard adding <= limit else { return .quota("the file is larger than the \(what)", retry: nil) }
        var remaining = used
        for entry in entries.compactMap({ entry in entry.until.map { (entry.size, $0) } }).sorted(by: { $0.1 < $1.1 }) {
            remaining -= entry.0
            if remaining + adding <= limit { return .quota("over the \(what)", retry: entry.1) }
        }
        return .quota("over the \(what)", retry: nil)
    }

    // MARK: PUT

    enum PutDecision: Equatable {
        case accept(UploadRecord)
        /// Wrong signature, unknown or expired slot (403).
        case forbidden(String)
        /// The slot was used, or a PUT to it is running (409).
        case conflict
    }

    /// Whether a PUT with this URL may proceed; when it may, the slot is marked as being
    /// uploaded until ``finishPut(_:stored:)``.
    func beginPut(id: UploadID, signature: String, filename: String, signer: UploadSigner) -> PutDecision {
        let now = self.now()
        if let stored = store.record(id) {
            // §5 leaves a second PUT to the service; a valid URL for a used slot is a conflict.
            return signer.isValid(signature, .put, for: stored) && stored.filename == filename ? .conflict : .forbidden("bad signature")
        }
        return state.withLock { state -> PutDecision in
            guard var slot = state.pending[id.value] else { return .forbidden("no such slot") }
            guard signer.isValid(signature, .put, for: slot.record), slot.record.filename == filename else { return .forbidden("bad signature") }
            guard Int64(now.timeIntervalSince1970) < slot.record.putExpires else { return .forbidden("PUT URL expired") }
            guard !slot.uploading else { return .conflict }
            slot.uploading = true
            state.pending[id.value] = slot
            return .accept(slot.record)
        }
    }

    /// The PUT ended: stored (the slot is used up) or not (it may be tried again until its
    /// URL expires).
    func finishPut(_ id: UploadID, stored: Bool) {
        state.withLock { state in
            if stored {
                state.pending[id.value] = nil
            } else {
                state.pending[id.value]?.uploading = false
            }
        }
    }

    /// Slots given and not used.
    var pendingCount: Int { state.withLock { $0.pending.count } }

    // MARK: GET

    enum GetDecision: Equatable {
        case serve(UploadRecord)
        /// The file exists, the URL is not its (403).
        case forbidden
        /// No such file, or it expired (404).
        case notFound
    }

    /// Whether a GET URL names a file that is still kept.
    func authorizeGet(id: UploadID, signature: String, filename: String, signer: UploadSigner) -> GetDecision {
        guard let record = store.record(id), !record.isExpired(at: now()) else { return .notFound }
        guard record.filename == filename, signer.isValid(signature, .get, for: record) else { return .forbidden }
        return .serve(record)
    }

    // MARK: Cleanup

    /// What one cleanup removed.
    struct Removed: Equatable, Sendable {
        var expired = 0
        var account = 0
        var domain = 0
    }

    /// Deletes expired files, and files whose domain or account no longer exists (removed by
    /// `braid domain remove` or `braid user remove`, maybe from another process).
    /// - Parameters:
    ///   - hostedDomains: the hosted domains now; nil when they could not be read (then no
    ///     file goes for that reason).
    ///   - accountExists: whether an account (bare JID) exists; nil when it could not be told.
    func sweep(hostedDomains: Set<String>?, accountExists: (String) async -> Bool?) async -> Removed {
        var removed = Removed()
        let now = self.now()
        state.withLock { state in
            state.pending = state.pending.filter { $0.value.uploading || Date(timeIntervalSince1970: Double($0.value.record.putExpires)) > now }
        }
        for record in store.expired(at: now) {
            guard let id = record.uploadID, (try? await store.delete(id)) != nil else { continue }
            removed.expired += 1
        }
        if let hostedDomains, !hostedDomains.isEmpty {
            for record in store.all() where !hostedDomains.contains(record.domain) {
                guard let id = record.uploadID, (try? await store.delete(id)) != nil else { continue }
                removed.domain += 1
            }
        }
        let accounts = Set(store.all().map(\.account))
        for account in accounts {
            guard await accountExists(account) == false else { continue }
            for record in store.records(account: account) {
                guard let id = record.uploadID, (try? await store.delete(id)) != nil else { continue }
                removed.account += 1
            }
        }
        return removed
    }
}
