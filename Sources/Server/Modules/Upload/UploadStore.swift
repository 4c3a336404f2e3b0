import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// A slot's id: 16 random bytes, base64url without padding (22 characters). Every path the
/// local store builds comes from one of these, checked character by character, so nothing a
/// URL says reaches the filesystem unvalidated.
struct UploadID: Sendable, Hashable, CustomStringConvertible {
    let value: String

    /// Nil unless `text` is exactly 22 characters of the base64url alphabet.
    init?(_ text: some StringProtocol) {
        guard text.utf8.count == 22, text.utf8.allSatisfy(Self.isAllowed) else { return nil }
        value = String(text)
    }

    static func random() -> UploadID {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        // 16 bytes always encode to 22 allowed characters.
        return UploadID(unchecked: UploadSigner.base64URL(bytes))
    }

    private init(unchecked value: String) {
        self.value = value
    }

    private static func isAllowed(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "_"): true
        default: false
        }
    }

    var description: String { value }
}

/// What is known of one uploaded file; the local store keeps it as a JSON sidecar beside the
/// file, so no database table is needed.
struct UploadRecord: Codable, Sendable, Equatable {
    var id: String
    /// The uploader's bare JID.
    var account: String
    /// The hosted domain whose service gave the slot.
    var domain: String
    var filename: String
    var size: Int
    var contentType: String?
    /// Seconds since 1970.
    var created: Int64
    /// When the PUT URL stopped working (it is signed over this).
    var putExpires: Int64
    /// When the file goes (the GET URL is signed over this); nil: kept for good.
    var expires: Int64?

    var uploadID: UploadID? { UploadID(id) }

    func isExpired(at now: Date) -> Bool {
        guard let expires else { return false }
        return Int64(now.timeIntervalSince1970) >= expires
    }
}

/// Where uploaded files live. The local directory is the one implementation; an object store
/// would be another. Usage and listing answer from memory (slot requests check quotas under
/// a lock); reading and writing are asynchronous.
protocol UploadFileStore: Sendable {
    /// Makes the store ready (directories, the index of what is stored); called before any
    /// other method, again harmlessly.
    func prepare() async throws
    /// Stores `record`'s file from `chunks`, which must add up to exactly `record.size`
    /// bytes; nothing is visible until all arrived. `progress` is called after each chunk.
    func write(_ record: UploadRecord, from chunks: some AsyncSequence<ByteBuffer, any Error> & Sendable,
               progress: @escaping @Sendable () -> Void) async throws
    func record(_ id: UploadID) -> UploadRecord?
    /// Hands the bytes of `range` to `deliver`, in chunks, in order.
    func read(_ id: UploadID, range: ClosedRange<Int>, deliver: (ByteBuffer) async throws -> Void) async throws
    func delete(_ id: UploadID) async throws
    /// Bytes stored for an account (bare JID) or a hosted domain.
    func usage(account: String) -> Int
    func usage(domain: String) -> Int
    func records(account: String) -> [UploadRecord]
    func records(domain: String) -> [UploadRecord]
    func expired(at now: Date) -> [UploadRecord]
    /// Every record (for the cleanup's account and domain checks).
    func all() -> [UploadRecord]
}

enum UploadStoreError: Error, Equatable {
    /// The body ended before, or went beyond, the declared size.
    case sizeMismatch(received: Int, expected: Int)
    case exists
}

/// Files in a local directory:
///
/// ```
/// DIR/signing.key          the URL signing key (created once, 0600)
/// DIR/files/AB/ID          the file (AB: the id's first two characters)
/// DIR/files/AB/ID.json     its UploadRecord
/// DIR/tmp/ID.part          a PUT in progress
/// ```
///
/// The file is renamed into place before its sidecar is written, and the index learns of it
/// after both: a crash leaves at most an orphan, which the next start removes.
final class LocalUploadStore: UploadFileStore {
    private struct Index {
        var records: [String: UploadRecord] = [:]
        var byAccount: [String: Set<String>] = [:]
        var byDomain: [String: Set<String>] = [:]
        var accountBytes: [String: Int] = [:]
        var domainBytes: [String: Int] = [:]

        mutating func insert(_ record: UploadRecord) {
            if records[record.id] != nil { remove(record.id) }
            records[record.id] = record
            byAccount[record.account, default: []].insert(record.id)
            byDomain[record.domain, default: []].insert(record.id)
            accountBytes[record.account, default: 0] += record.size
            domainBytes[record.domain, default: 0] += record.size
        }

        mutating func remove(_ id: String) {
            guard let record = records.removeValue(forKey: id) else { return }
            byAccount[record.account]?.remove(id)
            if byAccount[record.account]?.isEmpty == true { byAccount[record.account] = nil }
            byDomain[record.domain]?.remove(id)
            if byDomain[record.domain]?.isEmpty == true { byDomain[record.domain] = nil }
            accountBytes[record.account, default: 0] -= record.size
            if accountBytes[record.account] == 0 { accountBytes[record.account] = nil }
            domainBytes[record.domain, default: 0] -= record.size
            if domainBytes[record.domain] == 0 { domainBytes[record.domain] = nil }
        }
    }

    let directory: String
    private let index = Mutex(Index())
    private let loading = Mutex<Task<Void, any Error>?>(nil)
    private let pool: NIOThreadPool
    /// Bytes read from disk per chunk when serving a file.
    static let readChunk = 128 * 1024

    init(directory: String, pool: NIOThreadPool = .singleton) {
        self.directory = directory
        self.pool = pool
    }

    private var filesDirectory: String { directory + "/files" }
    private var temporaryDirectory: String { directory + "/tmp" }

    private func dataPath(_ id: UploadID) -> String {
        "\(filesDirectory)/\(id.value.prefix(2))/\(id.value)"
    }

    private func sidecarPath(_ id: UploadID) -> String { dataPath(id) + ".json" }
    private func temporaryPath(_ id: UploadID) -> String { "\(temporaryDirectory)/\(id.value).part" }

    func prepare() async throws {
        let task = loading.withLock { loading in
            if let loading { return loading }
            let task = Task { try await self.load() }
            loading = task
            return task
        }
        do {
            try await task.value
        } catch {
            // A failed load (a full disk, permissions) is tried again by the next request.
            loading.withLock { $0 = nil }
            throw error
        }
    }

    /// Reads every sidecar; removes temporary files (no PUT survives a restart), orphans and
    /// records whose file is missing or of the wrong size.
    private func load() async throws {
        let (filesDirectory, temporaryDirectory) = (self.filesDirectory, self.temporaryDirectory)
        let records: [UploadRecord] = try await pool.runIfActive {
            let files = FileManager.default
            try files.createDirectory(atPath: filesDirectory, withIntermediateDirectories: true)
            try files.createDirectory(atPath: temporaryDirectory, withIntermediateDirectories: true)
            for name in (try? files.contentsOfDirectory(atPath: temporaryDirectory)) ?? [] {
                try? files.removeItem(atPath: "\(temporaryDirectory)/\(name)")
            }
            var found: [UploadRecord] = []
            let decoder = JSONDecoder()
            for shard in (try? files.contentsOfDirectory(atPath: filesDirectory)) ?? [] {
                let shardPath = "\(filesDirectory)/\(shard)"
                let names = (try? files.contentsOfDirectory(atPath: shardPath)) ?? []
                let sidecars = Set(names.filter { $0.hasSuffix(".json") })
                for name in names {
                    let path = "\(shardPath)/\(name)"
                    if sidecars.contains(name) {
                        let base = String(name.dropLast(5))
                        let dataSize = (try? files.attributesOfItem(atPath: "\(shardPath)/\(base)")[.size] as? NSNumber)?.intValue
                        if let data = files.contents(atPath: path), let record = try? decoder.decode(UploadRecord.self, from: data),
                           record.id == base, UploadID(base) != nil, dataSize == record.size {
                            found.append(record)
                        } else {
                            try? files.removeItem(atPath: path)
                            try? files.removeItem(atPath: "\(shardPath)/\(base)")
                        }
                    } else if !sidecars.contains(name + ".json") {
                        // A file whose sidecar was never written: its PUT did not finish.
                        try? files.removeItem(atPath: path)
                    }
                }
            }
            return found
        }
        index.withLock { index in
            for record in records { index.insert(record) }
        }
    }

    func write(_ record: UploadRecord, from chunks: some AsyncSequence<ByteBuffer, any Error> & Sendable,
               progress: @escaping @Sendable () -> Void) async throws {
        guard let id = record.uploadID else { throw UploadStoreError.sizeMismatch(received: 0, expected: record.size) }
        guard self.record(id) == nil else { throw UploadStoreError.exists }
        let temporary = temporaryPath(id)
        let pool = self.pool
        let handle: FileHandle = try await pool.runIfActive {
            guard FileManager.default.createFile(atPath: temporary, contents: nil, attributes: [.posixPermissions: 0o600]),
                  let handle = FileHandle(forWritingAtPath: temporary) else {
                throw CocoaError(.fileWriteUnknown)
            }
            return handle
        }
        var received = 0
        do {
            for try await chunk in chunks {
                received += chunk.readableBytes
                // Refuse as soon as the body goes beyond the slot, not after storing it all.
                guard received <= record.size else { throw UploadStoreError.sizeMismatch(received: received, expected: record.size) }
                try await pool.runIfActive { try handle.write(contentsOf: chunk.readableBytesView) }
                progress()
            }
            guard received == record.size else { throw UploadStoreError.sizeMismatch(received: received, expected: record.size) }
            let (data, sidecar) = (dataPath(id), sidecarPath(id))
            let json = try JSONEncoder().encode(record)
            try await pool.runIfActive {
                try handle.synchronize()
                try handle.close()
                let files = FileManager.default
                try files.createDirectory(atPath: (data as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                // rename(2) replaces atomically; the sidecar goes through a temporary name too,
                // so a reader never sees half of it.
                guard rename(temporary, data) == 0 else { throw CocoaError(.fileWriteUnknown) }
                let sidecarTemporary = temporary + ".json"
                guard files.createFile(atPath: sidecarTemporary, contents: json, attributes: [.posixPermissions: 0o600]),
                      rename(sidecarTemporary, sidecar) == 0 else {
                    try? files.removeItem(atPath: data)
                    throw CocoaError(.fileWriteUnknown)
                }
            }
        } catch {
            try? handle.close()
            try? FileManager.default.removeItem(atPath: temporary)
            throw error
        }
        index.withLock { $0.insert(record) }
    }

    func record(_ id: UploadID) -> UploadRecord? {
        index.withLock { $0.records[id.value] }
    }

    func read(_ id: UploadID, range: ClosedRange<Int>, deliver: (ByteBuffer) async throws -> Void) async throws {
        let path = dataPath(id)
        let pool = self.pool
        let handle: FileHandle = try await pool.runIfActive {
            guard let handle = FileHandle(forReadingAtPath: path) else { throw CocoaError(.fileReadNoSuchFile) }
            return handle
        }
        defer { try? handle.close() }
        let descriptor = handle.fileDescriptor
        var offset = range.lowerBound
        while offset <= range.upperBound {
            let count = min(Self.readChunk, range.upperBound - offset + 1)
            let at = offset
            // pread(2) straight into the buffer that goes out: one allocation per chunk.
            let chunk: ByteBuffer = try await pool.runIfActive {
                var buffer = ByteBufferAllocator().buffer(capacity: count)
                let read = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { bytes in
                    max(0, pread(descriptor, bytes.baseAddress, count, off_t(at)))
                }
                guard read > 0 else { throw CocoaError(.fileReadCorruptFile) }
                return buffer
            }
            offset += chunk.readableBytes
            try await deliver(chunk)
        }
    }

    func delete(_ id: UploadID) async throws {
        let (data, sidecar) = (dataPath(id), sidecarPath(id))
        // Out of the index first: from now on nobody is given the file.
        index.withLock { $0.remove(id.value) }
        try await pool.runIfActive {
            // The sidecar first: without it, a leftover file is an orphan the next start removes.
            try? FileManager.default.removeItem(atPath: sidecar)
            try? FileManager.default.removeItem(atPath: data)
        }
    }

    func usage(account: String) -> Int { index.withLock { $0.accountBytes[account] ?? 0 } }
    func usage(domain: String) -> Int { index.withLock { $0.domainBytes[domain] ?? 0 } }

    func records(account: String) -> [UploadRecord] {
        index.withLock { index in (index.byAccount[account] ?? []).compactMap { index.records[$0] } }
    }

    func records(domain: String) -> [UploadRecord] {
        index.withLock { index in (index.byDomain[domain] ?? []).compactMap { index.records[$0] } }
    }

    func expired(at now: Date) -> [UploadRecord] {
        index.withLock { $0.records.values.filter { $0.isExpired(at: now) } }
    }

    func all() -> [UploadRecord] {
        index.withLock { Array($0.records.values) }
    }

    /// The URL signing key, created on first use: the per-process `ServerContext.secret`
    /// would break every GET URL at a restart, while a file is kept for weeks.
    func signingKey() async throws -> [UInt8] {
        let path = directory + "/signing.key"
        let directory = self.directory
        return try await pool.runIfActive {
            let files = FileManager.default
            if let data = files.contents(atPath: path), data.count == 32 { return [UInt8](data) }
            try files.createDirectory(atPath: directory, withIntermediateDirectories: true)
            var generator = SystemRandomNumberGenerator()
            let key = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let temporary = path + ".\(UploadID.random().value)"
            guard files.createFile(atPath: temporary, contents: Data(key), attributes: [.posixPermissions: 0o600]) else {
                throw CocoaError(.fileWriteUnknown)
            }
            // link(2) fails if another process created the key meanwhile: use theirs.
            if link(temporary, path) != 0 {
                try? files.removeItem(atPath: temporary)
                guard let data = files.contents(atPath: path), data.count == 32 else { throw CocoaError(.fileReadCorruptFile) }
                return [UInt8](data)
            }
            try? files.removeItem(atPath: temporary)
            return key
        }
    }
}
