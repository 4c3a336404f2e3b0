import Logging
import NIOPosix
import Synchronization

/// A validating ``DNSResolver`` over libunbound.
///
/// **Threads.** No blocking libunbound call runs on a NIO event loop or the Swift cooperative
/// pool. Queries go through `ub_resolve_async` in libunbound's threaded mode: the question is
/// written to a pipe read by libunbound's own background thread, which does the network I/O
/// and DNSSEC validation. Answers are collected by one poller thread, the only thread of an
/// `NIOThreadPool` this resolver starts in `init`: it poll(2)s libunbound's answer descriptor
/// and runs `ub_process`, whose callback resumes the waiting task. Call ``shutdown()`` when
/// done; it stops the poller and deletes the libunbound context.
///
/// **Timeouts and cancellation.** Every query races ``Configuration/timeout``; when the
/// timeout wins, or the calling task is cancelled, the query is cancelled in libunbound
/// (`ub_cancel`) and the call throws ``DNSError/timeout(name:type:)`` or `CancellationError`.
///
/// **Status.** libunbound's `bogus` flag is checked before the RCODE, because a validation
/// failure also comes back as SERVFAIL: it becomes an answer with status
/// ``DNSSECStatus/bogus(reason:)`` (with libunbound's `why_bogus` text). A SERVFAIL without it,
/// other RCODEs and libunbound errors throw ``DNSError``.
public final class UnboundResolver: DNSResolver {
    /// How to reach DNS and which keys to trust.
    public struct Configuration: Sendable {
        /// The resolv.conf whose `nameserver` lines are used as forwarders; nil means
        /// `/etc/resolv.conf`. Ignored when ``forwarders`` is not empty.
        public var resolvConf: String?
        /// Recursive resolvers to forward to, as `IP` or `IP@port`. When not empty, used
        /// instead of resolv.conf. They must pass DNSSEC records through for validation to work.
        public var forwarders: [String]
        /// Zones to query directly at their authoritative servers (`IP` or `IP@port`), like
        /// unbound's `stub-zone`. Also makes RFC 6761 names such as `*.test` resolvable there.
        public var stubZones: [(zone: String, addresses: [String])]
        /// A file of DS or DNSKEY lines (zone-file format) to use as trust anchors, e.g.
        /// Debian's `/usr/share/dns/root.key` for the DNS root.
        public var trustAnchorFile: String?
        /// Trust anchors given inline, each one DS or DNSKEY record on one line,
        /// e.g. `"example. DS 12345 13 2 ab..."`.
        public var trustAnchors: [String]
        /// How long one query may take before it fails with ``DNSError/timeout(name:type:)``.
        public var timeout: Duration
        /// Further unbound.conf `server:` options, for example `("edns-buffer-size", "1232")`.
        public var options: [(name: String, value: String)]

        /// Without any trust anchor nothing validates: every answer is `.insecure`. For DANE
        /// in production, set ``trustAnchorFile`` to the root key.
        public init(
            resolvConf: String? = nil,
            forwarders: [String] = [],
            stubZones: [(zone: String, addresses: [String])] = [],
            trustAnchorFile: String? = nil,
            trustAnchors: [String] = [],
            timeout: Duration = .seconds(10),
            options: [(name: String, value: String)] = []
        ) {
            self.resolvConf = resolvConf
            self.forwarders = forwarders
            self.stubZones = stubZones
            self.trustAnchorFile = trustAnchorFile
            self.trustAnchors = trustAnchors
            self.timeout = timeout
            self.options = options
        }
    }

    public let configuration: Configuration
    private let context: UnboundContext
    private let poller: NIOThreadPool
    private let isShutDown = Atomic<Bool>(false)

    /// Creates the libunbound context, applies the configuration and starts the poller thread.
    ///
    /// This reads resolv.conf and the trust-anchor file, so call it at start-up rather than
    /// on an event loop.
    ///
    /// - Throws: ``DNSError/configuration(_:)`` when libunbound rejects an option, address,
    ///   file or trust anchor.
    public init(configuration: Configuration = Configuration(), logger: Logger = Logger(label: "braid.dns")) throws {
        self.configuration = configuration
        let context = try UnboundContext(configuration: configuration, logger: logger)
        self.context = context
        self.poller = NIOThreadPool(numberOfThreads: 1)
        poller.start()
        poller.submit { state in
            guard case .active = state else { return }
            context.runPollLoop()
        }
    }

    deinit {
        // Without an explicit shutdown(), still stop the poller and free the context.
        if !isShutDown.exchange(true, ordering: .acquiringAndReleasing) {
            context.requestStop()
            let context = self.context
            poller.shutdownGracefully { _ in context.deleteContext() }
        }
    }

    /// Stops the poller thread and deletes the libunbound context. Queries still running
    /// fail with ``DNSError/shutdown``, and so does every later query. Calling it again does
    /// nothing.
    public func shutdown() async {
        guard !isShutDown.exchange(true, ordering: .acquiringAndReleasing) else { return }
        context.requestStop()
        // Returns once the poller thread has left its loop and been joined.
        try? await poller.shutdownGracefully()
        context.deleteContext()
    }

    /// Queries handed to libunbound whose answer has not come back or been cancelled.
    var inFlightCount: Int { context.inFlightCount }

    // MARK: DNSResolver

    public func srv(_ name: String) async throws -> DNSAnswer<SRVRecord> {
        let qname = try DNSName.queryName(name)
        return try await query(qname, .srv) { rdata throws(DNSError) in try SRVRecord(rdata: rdata) }
    }

    public func tlsa(_ name: String) async throws -> DNSAnswer<TLSARecord> {
        let qname = try DNSName.queryName(name)
        return try await query(qname, .tlsa) { rdata throws(DNSError) in try TLSARecord(rdata: rdata) }
    }

    /// A and AAAA, queried in parallel and merged. An IP literal is returned as it is, with
    /// status `.insecure` (it did not come from DNS, so it can carry no DNSSEC proof).
    public func addresses(_ host: String) async throws -> DNSAnswer<IPAddress> {
        if let literal = DNSName.ipLiteral(host) {
            return DNSAnswer(records: [literal], status: .insecure, ttl: 0, nxdomain: false)
        }
        let qname = try DNSName.queryName(host)
        async let v6 = query(qname, .aaaa) { rdata throws(DNSError) in try IPAddress(rdata: rdata, type: .aaaa) }
        async let v4 = query(qname, .a) { rdata throws(DNSError) in try IPAddress(rdata: rdata, type: .a) }
        return try await DNSAnswer.merging(aaaa: v6, a: v4)
    }

    // MARK: Querying

    private func query<Record: Sendable>(
        _ qname: String,
        _ type: DNSRecordType,
        parse: (_ rdata: [UInt8]) throws(DNSError) -> Record
    ) async throws -> DNSAnswer<Record> {
        let raw = try await resolve(qname, type)
        let interpreted = try Self.interpret(raw, name: qname, type: type)
        var records: [Record] = []
        records.reserveCapacity(interpreted.rdata.count)
        for rdata in interpreted.rdata {
            records.append(try parse(rdata))
        }
        return DNSAnswer(records: records, status: interpreted.status, ttl: interpreted.ttl, nxdomain: interpreted.nxdomain)
    }

    /// Runs one query against libunbound, bounded by the configured timeout.
    private func resolve(_ qname: String, _ type: DNSRecordType) async throws -> RawResult {
        let context = self.context
        let timeout = configuration.timeout
        return try await withThrowingTaskGroup(of: RawResult.self) { group in
            group.addTask {
                try await Self.resolveUnbounded(qname, type, context: context)
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                throw DNSError.timeout(name: qname, type: type)
            }
            // Whichever finishes first decides; the other is cancelled, which for the query
            // means ub_cancel.
            defer { group.cancelAll() }
            guard let first = try await group.next() else {
                throw DNSError.timeout(name: qname, type: type)
            }
            return first
        }
    }

    private static func resolveUnbounded(_ qname: String, _ type: DNSRecordType, context: UnboundContext) async throws -> RawResult {
        let query = PendingQuery(name: qname, type: type, context: context)
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<RawResult, any Error>) in
                let proceed = query.state.withLock { state in
                    guard case .idle = state.phase else { return false }
                    state.phase = .waiting(continuation)
                    return true
                }
                guard proceed else {
                    // Cancelled before we got here.
                    continuation.resume(throwing: CancellationError())
                    return
                }
                context.submit(query)
            }
        } onCancel: {
            // Resume the waiter now; the answer, if it still comes, is dropped by libunbound
            // (or, if submission is still under way, submit() cancels right after it).
            query.finish(.failure(CancellationError()))
            context.cancel(query)
        }
    }

    /// Maps libunbound's flags to an answer or an error (see the type's documentation).
    static func interpret(_ raw: RawResult, name: String, type: DNSRecordType) throws(DNSError) -> (rdata: [[UInt8]], status: DNSSECStatus, ttl: UInt32, nxdomain: Bool) {
        let ttl = UInt32(clamping: max(raw.ttl, 0))
        if raw.bogus {
            let reason = raw.whyBogus.flatMap { $0.isEmpty ? nil : $0 } ?? "DNSSEC validation failed"
            return ([], .bogus(reason: reason), ttl, false)
        }
        let status: DNSSECStatus = raw.secure ? .secure : .insecure
        switch raw.rcode {
        case 0:
            return (raw.haveData ? raw.rdata : [], status, ttl, raw.nxdomain)
        case 2:
            throw .serverFailure(name: name, type: type)
        case 3:
            return ([], status, ttl, true)
        default:
            throw .responseCode(name: name, type: type, rcode: Int(raw.rcode))
        }
    }
}
