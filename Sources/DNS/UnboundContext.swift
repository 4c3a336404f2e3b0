#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import CUnbound
import Logging
import Synchronization

// How libunbound is driven (see also UnboundResolver's documentation):
//
// - The context runs in libunbound's *threaded asynchronous* mode (`ub_ctx_async(ctx, 1)`):
//   `ub_resolve_async` only serialises the question onto a pipe to libunbound's own
//   background thread, which does all network I/O and validation. Without that call
//   libunbound would fork(2) a helper process, which a multi-threaded Swift process must not do.
// - Answers come back over a second pipe (`ub_fd`). One dedicated thread, the only thread of
//   an NIOThreadPool the resolver owns, poll(2)s that descriptor and calls `ub_process`, which
//   runs our C callback for each finished query. The callback copies the answer into Swift
//   values, frees the `ub_result` and resumes the waiting continuation.
// - So no blocking libunbound call ever runs on a NIO event loop or on the Swift cooperative
//   pool: `ub_resolve_async` and `ub_cancel` only take a mutex and write a few bytes to a pipe.

/// An answer as libunbound reported it, copied out of `struct ub_result` before it is freed.
struct RawResult: Sendable, Hashable {
    var rcode: Int32
    var haveData: Bool
    var nxdomain: Bool
    var secure: Bool
    var bogus: Bool
    var whyBogus: String?
    var ttl: Int32
    var rdata: [[UInt8]]

    init(rcode: Int32 = 0, haveData: Bool = false, nxdomain: Bool = false, secure: Bool = false, bogus: Bool = false, whyBogus: String? = nil, ttl: Int32 = 0, rdata: [[UInt8]] = []) {
        self.rcode = rcode
        self.haveData = haveData
        self.nxdomain = nxdomain
        self.secure = secure
        self.bogus = bogus
        self.whyBogus = whyBogus
        self.ttl = ttl
        self.rdata = rdata
    }

    /// Copies a result; every pointer is checked, and lengths must be non-negative.
    init(copying result: UnsafePointer<ub_result>) {
        let r = result.pointee
        self.init(
            rcode: r.rcode,
            haveData: r.havedata != 0,
            nxdomain: r.nxdomain != 0,
            secure: r.secure != 0,
            bogus: r.bogus != 0,
            whyBogus: r.why_bogus.map { String(cString: $0) },
            ttl: r.ttl
        )
        guard let data = r.data, let lengths = r.len else { return }
        var items: [[UInt8]] = []
        var index = 0
        // `data` is NULL-terminated; the cap only guards against a corrupt result.
        while index < 65_536, let item = data[index] {
            let length = Int(lengths[index])
            if length > 0 {
                items.append(Array(UnsafeRawBufferPointer(start: item, count: length)))
            } else {
                items.append([])
            }
            index += 1
        }
        self.rdata = items
    }
}

/// One query between `ub_resolve_async` and its answer (or cancellation).
final class PendingQuery: Sendable {
    enum Phase {
        /// Created; the continuation is not installed yet.
        case idle
        case waiting(CheckedContinuation<RawResult, any Error>)
        /// Cancelled before the continuation was installed.
        case cancelled
        /// The continuation has been resumed.
        case finished
    }

    struct State {
        var phase: Phase = .idle
        /// libunbound's id for `ub_cancel`, once `ub_resolve_async` returned it.
        var asyncID: Int32?
    }

    let name: String
    let type: DNSRecordType
    /// The context the query was submitted to. The reference cycle through
    /// `UnboundContext.inFlight` lasts only while libunbound may still call back.
    let context: UnboundContext
    let state = Mutex(State())

    init(name: String, type: DNSRecordType, context: UnboundContext) {
        self.name = name
        self.type = type
        self.context = context
    }

    /// Resumes the waiter once; later calls do nothing. Returns whether this call resumed it.
    @discardableResult
    func finish(_ result: Result<RawResult, any Error>) -> Bool {
        let continuation: CheckedContinuation<RawResult, any Error>? = state.withLock { state in
            switch state.phase {
            case .waiting(let continuation):
                state.phase = .finished
                return continuation
            case .idle:
                // Only a cancellation can arrive before the continuation is installed.
                state.phase = .cancelled
                return nil
            case .cancelled, .finished:
                return nil
            }
        }
        continuation?.resume(with: result)
        return continuation != nil
    }
}

/// Owns one `ub_ctx`, the wake-up pipe of the poller thread, and the queries in flight.
///
/// `@unchecked Sendable` because of the raw `ub_ctx` pointer, which Swift cannot check.
/// Sharing it between threads is safe because:
/// - unbound.h ("Application threaded") says several threads may use the same context, and
///   libunbound guards its query table with `cfglock` and each pipe with its own lock
///   (`qqpipe_lock`, `rrpipe_lock`), so `ub_resolve_async` and `ub_cancel` from any thread
///   and `ub_process` on the poller thread may overlap;
/// - all configuration calls happen in `init`, before the pointer is shared;
/// - `ub_ctx_delete` runs once, in `deleteContext()` or `deinit`, only after the poller thread has
///   stopped, and under `closed`, the same lock that every submission and cancellation
///   holds, so no call can use the pointer after it is deleted.
/// All other mutable state is inside `Mutex`es or atomics.
final class UnboundContext: @unchecked Sendable {
    private let ctx: OpaquePointer
    /// Whether `ub_ctx_delete` has run, or the context broke; guards every use of `ctx`
    /// outside the poller thread.
    private let closed = Mutex<DNSError?>(nil)
    /// The queries libunbound may still call back for, keyed by object identity. Holding them
    /// here is what keeps the unretained `mydata` pointer given to libunbound valid.
    private let inFlight = Mutex<[ObjectIdentifier: PendingQuery]>([:])
    private let stopFlag = Atomic<Bool>(false)
    private let wakeReadFD: Int32
    private let wakeWriteFD: Int32
    let logger: Logger

    init(configuration: UnboundResolver.Configuration, logger: Logger) throws(DNSError) {
        guard let ctx = ub_ctx_create() else { throw .resolver(code: -7, message: "ub_ctx_create failed") }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            ub_ctx_delete(ctx)
            throw .resolver(code: -8, message: "pipe() failed, errno \(errno)")
        }
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        self.ctx = ctx
        self.wakeReadFD = fds[0]
        self.wakeWriteFD = fds[1]
        self.logger = logger
        // If configuration fails, deinit deletes the context and closes the pipe.
        try configure(configuration)
    }

    deinit {
        closed.withLock { closed in
            if closed != .shutdown {
                // Not closed through deleteContext(): the poller has stopped (its loop holds a
                // reference while it runs), so deleting here is safe.
                ub_ctx_delete(ctx)
                closed = .shutdown
            }
        }
        close(wakeReadFD)
        close(wakeWriteFD)
    }

    // MARK: Configuration (before the context is shared)

    private func configure(_ configuration: UnboundResolver.Configuration) throws(DNSError) {
        try check(ub_ctx_async(ctx, 1), "ub_ctx_async")
        for option in configuration.options {
            let name = option.name.hasSuffix(":") ? option.name : option.name + ":"
            try check(ub_ctx_set_option(ctx, name, option.value), "option \(name) \(option.value)")
        }
        if configuration.forwarders.isEmpty {
            try check(ub_ctx_resolvconf(ctx, configuration.resolvConf), "resolv.conf \(configuration.resolvConf ?? "/etc/resolv.conf")")
        } else {
            for forwarder in configuration.forwarders {
                try check(ub_ctx_set_fwd(ctx, forwarder), "forwarder \(forwarder)")
            }
        }
        // libunbound answers the RFC 6761 name `test.` with NXDOMAIN from a built-in local
        // zone, which a stub resolver (what Prosody and ejabberd use) does not: it asks the
        // upstream. Do the same, so domains under test. resolve where an upstream serves them.
        if !configuration.stubZones.contains(where: { $0.zone == "test" || $0.zone == "test." }) {
            try check(ub_ctx_set_option(ctx, "local-zone:", "test. transparent"), "local-zone test.")
        }
        for stub in configuration.stubZones {
            let zone = stub.zone.hasSuffix(".") ? stub.zone : stub.zone + "."
            guard !stub.addresses.isEmpty else { throw .configuration("stub zone \(zone) has no addresses") }
            for address in stub.addresses {
                try check(ub_ctx_set_stub(ctx, zone, address, 0), "stub zone \(zone) at \(address)")
            }
            // libunbound answers RFC 6761 names (test., invalid., onion., ...) from built-in
            // local zones before any stub is consulted. A transparent local zone at the stub
            // lets queries through, so lab zones such as lab.example.test. work; for other
            // names it changes nothing.
            try check(ub_ctx_set_option(ctx, "local-zone:", "\(zone) transparent"), "local-zone \(zone)")
        }
        if let file = configuration.trustAnchorFile {
            try check(ub_ctx_add_ta_file(ctx, file), "trust anchor file \(file)")
        }
        for anchor in configuration.trustAnchors {
            try check(ub_ctx_add_ta(ctx, anchor), "trust anchor \(anchor)")
        }
        // Finalise now rather than in the first ub_resolve_async: that is where libunbound
        // reads trust-anchor files and parses anchors and zones, so configuration errors
        // surface here, and no query ever pays for that file I/O on the caller's thread.
        // libunbound has no call that only finalises; removing a local zone that cannot
        // exist finalises first and then changes nothing.
        try check(ub_ctx_zone_remove(ctx, "finalise.braid.invalid."), "applying the configuration (trust anchors, zones)")
    }

    private func check(_ code: Int32, _ what: String) throws(DNSError) {
        guard code == 0 else {
            throw .configuration("\(what): \(Self.message(for: code))")
        }
    }

    static func message(for code: Int32) -> String {
        guard let text = ub_strerror(code) else { return "error \(code)" }
        return String(cString: text)
    }

    // MARK: Queries

    /// Hands `query`, whose continuation is installed, to libunbound. On failure the waiter
    /// is resumed with the error at once.
    func submit(_ query: PendingQuery) {
        let key = ObjectIdentifier(query)
        // Register before submitting: the answer can arrive on the poller thread before
        // ub_resolve_async even returns.
        inFlight.withLock { $0[key] = query }
        var asyncID: Int32 = 0
        let outcome: Result<Void, DNSError> = closed.withLock { closed in
            if let error = closed { return .failure(error) }
            let code = ub_resolve_async(
                ctx, query.name, Int32(query.type.rawValue), 1 /* IN */,
                Unmanaged.passUnretained(query).toOpaque(), unboundCallback, &asyncID
            )
            return code == 0 ? .success(()) : .failure(.resolver(code: code, message: Self.message(for: code)))
        }
        switch outcome {
        case .failure(let error):
            // libunbound will never call back for a query it did not accept.
            inFlight.withLock { _ = $0.removeValue(forKey: key) }
            query.finish(.failure(error))
        case .success:
            let cancelledMeanwhile = query.state.withLock { state in
                state.asyncID = asyncID
                if case .cancelled = state.phase { return true }
                if case .finished = state.phase { return true }
                return false
            }
            // A cancellation that raced with submission could not cancel yet; do it now.
            if cancelledMeanwhile { cancel(query) }
        }
    }

    /// Tells libunbound to drop `query`'s answer. The waiter has already been (or is being)
    /// resumed by whoever decided to cancel.
    func cancel(_ query: PendingQuery) {
        guard let asyncID = query.state.withLock({ $0.asyncID }) else { return }
        let code: Int32 = closed.withLock { closed in
            guard closed == nil else { return -10 }
            return ub_cancel(ctx, asyncID)
        }
        // UB_NOERROR means the callback will never run, so the entry is ours to drop. Any
        // other result means the answer was (or is being) delivered and the callback removes it.
        if code == 0 {
            inFlight.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(query)) }
        }
    }

    /// Called on the poller thread from inside `ub_process`.
    fileprivate func deliver(_ query: PendingQuery, _ result: Result<RawResult, any Error>) {
        inFlight.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(query)) }
        query.finish(result)
    }

    /// How many queries libunbound may still call back for (for tests).
    var inFlightCount: Int { inFlight.withLock { $0.count } }

    /// Fails every query in flight, e.g. at shutdown.
    private func failAll(_ error: DNSError) {
        let queries = inFlight.withLock { inFlight in
            defer { inFlight.removeAll() }
            return Array(inFlight.values)
        }
        for query in queries { query.finish(.failure(error)) }
    }

    // MARK: The poller thread

    var stopRequested: Bool { stopFlag.load(ordering: .acquiring) }

    /// Asks the poll loop to return, waking it if it is blocked in poll(2).
    func requestStop() {
        stopFlag.store(true, ordering: .releasing)
        var byte: UInt8 = 1
        _ = write(wakeWriteFD, &byte, 1)
    }

    /// The poller thread's body: waits for answers and runs `ub_process` until asked to stop.
    func runPollLoop() {
        let answerFD = ub_fd(ctx)
        guard answerFD >= 0 else {
            breakContext(.resolver(code: -8, message: "ub_fd failed"))
            return
        }
        while !stopRequested {
            var fds = [
                pollfd(fd: answerFD, events: Int16(POLLIN), revents: 0),
                pollfd(fd: wakeReadFD, events: Int16(POLLIN), revents: 0),
            ]
            // The 1 s timeout is only a safety net; stop requests write to the wake pipe.
            let ready = poll(&fds, nfds_t(fds.count), 1000)
            if ready < 0 {
                if errno == EINTR { continue }
                breakContext(.resolver(code: -8, message: "poll() failed, errno \(errno)"))
                return
            }
            if fds[1].revents != 0 {
                var buffer = [UInt8](repeating: 0, count: 64)
                while read(wakeReadFD, &buffer, buffer.count) > 0 {}
            }
            if fds[0].revents != 0 {
                let code = ub_process(ctx)
                if code != 0 {
                    breakContext(.resolver(code: code, message: "ub_process: \(Self.message(for: code))"))
                    return
                }
            }
        }
    }

    /// libunbound's answer channel failed: nothing more will ever be delivered.
    private func breakContext(_ error: DNSError) {
        logger.error("DNS resolver stopped working", metadata: ["error": "\(error)"])
        closed.withLock { closed in
            if closed == nil { closed = error }
        }
        failAll(error)
    }

    /// Deletes the libunbound context. Only after the poll loop has returned.
    func deleteContext() {
        closed.withLock { closed in
            if closed != .shutdown {
                ub_ctx_delete(ctx)
                closed = .shutdown
            }
        }
        // ub_ctx_delete drops outstanding queries without calling back.
        failAll(.shutdown)
    }
}

/// libunbound's completion callback (`ub_callback_type`). `mydata` is the unretained
/// `PendingQuery`, kept alive by `UnboundContext.inFlight` until this runs. It must not
/// capture anything, since it is passed as a C function pointer.
private func unboundCallback(_ mydata: UnsafeMutableRawPointer?, _ error: Int32, _ result: UnsafeMutablePointer<ub_result>?) {
    defer { if let result { ub_resolve_free(result) } }
    guard let mydata else { return }
    let query = Unmanaged<PendingQuery>.fromOpaque(mydata).takeUnretainedValue()
    let outcome: Result<RawResult, any Error>
    if error != 0 {
        outcome = .failure(DNSError.resolver(code: error, message: UnboundContext.message(for: error)))
    } else if let result {
        outcome = .success(RawResult(copying: result))
    } else {
        outcome = .failure(DNSError.resolver(code: -2, message: "no result"))
    }
    query.context.deliver(query, outcome)
}
