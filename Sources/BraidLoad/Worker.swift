import Histogram
import NIOCore
import NIOPosix
import NIOSSL

/// Counters of one worker, merged across workers at the end.
struct Stats: Sendable {
    var loginsStarted = 0
    var loginsSucceeded = 0
    var loginsFailed = 0
    var loginErrors: [String: Int] = [:]
    var mechanisms: [String: Int] = [:]
    var disconnects: [String: Int] = [:]
    var errors: [String: Int] = [:]
    var scheduled: UInt64 = 0
    var sent: UInt64 = 0
    var skipped: UInt64 = 0
    var received: UInt64 = 0
    var messageErrors: UInt64 = 0
    var otherMessages: UInt64 = 0
    var smEnabled = 0
    var smRequestsReceived: UInt64 = 0
    var smAcksSent: UInt64 = 0
    var smRequestsSent: UInt64 = 0
    var smAcksReceived: UInt64 = 0
    var finalAcks = 0
    var finalAcked: UInt64 = 0
    var finalExpected: UInt64 = 0
    var firstSendNs: UInt64 = 0
    var lastSendNs: UInt64 = 0
    var lastReceiveNs: UInt64 = 0
    /// Microseconds; up to an hour, three significant digits.
    var latency = Stats.histogram()
    var loginLatency = Stats.histogram()
    /// From the scheduled send time (includes the generator's own lateness).
    var latencyFromSchedule = Stats.histogram()
    /// How late the generator put each message on the wire against its schedule.
    var sendLag = Stats.histogram()

    static func histogram() -> Histogram<UInt64> {
        Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
    }

    mutating func merge(_ other: Stats) {
        loginsStarted += other.loginsStarted
        loginsSucceeded += other.loginsSucceeded
        loginsFailed += other.loginsFailed
        loginErrors.merge(other.loginErrors, uniquingKeysWith: +)
        mechanisms.merge(other.mechanisms, uniquingKeysWith: +)
        disconnects.merge(other.disconnects, uniquingKeysWith: +)
        errors.merge(other.errors, uniquingKeysWith: +)
        scheduled += other.scheduled
        sent += other.sent
        skipped += other.skipped
        received += other.received
        messageErrors += other.messageErrors
        otherMessages += other.otherMessages
        smEnabled += other.smEnabled
        smRequestsReceived += other.smRequestsReceived
        smAcksSent += other.smAcksSent
        smRequestsSent += other.smRequestsSent
        smAcksReceived += other.smAcksReceived
        finalAcks += other.finalAcks
        finalAcked += other.finalAcked
        finalExpected += other.finalExpected
        if other.firstSendNs != 0 { firstSendNs = firstSendNs == 0 ? other.firstSendNs : min(firstSendNs, other.firstSendNs) }
        lastSendNs = max(lastSendNs, other.lastSendNs)
        lastReceiveNs = max(lastReceiveNs, other.lastReceiveNs)
        latency.add(other.latency)
        loginLatency.add(other.loginLatency)
        sendLag.add(other.sendLag)
        latencyFromSchedule.add(other.latencyFromSchedule)
    }
}

/// What the main thread polls while it waits.
struct WorkerStatus: Sendable {
    var pendingLogins: Int
    var sendingDone: Bool
    var sent: UInt64
    var received: UInt64
    var finalAcksOutstanding: Int
}

/// The full JIDs of every logged-in session, in directory order; shared read-only.
final class Directory: Sendable {
    let jids: [[UInt8]]
    init(jids: [[UInt8]]) { self.jids = jids }
}

/// Fixed byte runs of an outgoing chat message.
struct MessageParts {
    let prefix = Array("<message type='chat' to='".utf8)
    let idPart = Array("' id='m".utf8)
    let bodyPart = Array("'><body>".utf8)
    let suffix: [UInt8]
    let capacity: Int

    init(bodyBytes: Int) {
        // The body: two stamps (sent, scheduled; 15-16 digits each), spaces, then padding to bodyBytes.
        let padding = max(0, bodyBytes - 34)
        suffix = [UInt8(ascii: " ")] + [UInt8](repeating: UInt8(ascii: "x"), count: padding) + Array("</body></message>".utf8)
        capacity = prefix.count + idPart.count + 20 + bodyPart.count + 41 + suffix.count + 32
    }
}

/// A small fast generator for picking destinations (SystemRandomNumberGenerator costs a
/// system call per draw on Linux).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The sessions of one event loop, their counters and their share of the send schedule.
/// Confined to its loop (reached from elsewhere through NIOLoopBound).
final class Worker {
    let loop: any EventLoop
    let config: LoadConfig
    /// For STARTTLS (direct TLS adds its own handler at connect).
    let tlsContext: NIOSSLContext?
    let directTLSContext: NIOSSLContext?
    let streamHeader: ByteBuffer
    let messageParts: MessageParts
    let allocator = ByteBufferAllocator()
    var stats = Stats()
    private var sessions: [Session] = []
    private var ready: [Session] = []
    private var assigned = 0
    private var rng: SplitMix64

    // The send schedule: message k of this worker is due at startNs + k / ratePerNs.
    private var directory: Directory?
    private var directoryOffset = 0
    private var ratePerNs = 0.0
    private var startNs: UInt64 = 0
    private var total: UInt64 = 0
    private var sendingDone = true
    private var finalAcksOutstanding = 0

    init(loop: any EventLoop, config: LoadConfig, tlsContext: NIOSSLContext?, directTLSContext: NIOSSLContext?, seed: UInt64) {
        self.loop = loop
        self.config = config
        self.tlsContext = tlsContext
        self.directTLSContext = directTLSContext
        self.streamHeader = ByteBuffer(string: "<?xml version='1.0'?><stream:stream to='\(config.domain)' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
        self.messageParts = MessageParts(bodyBytes: config.bodyBytes)
        self.rng = SplitMix64(state: seed)
    }

    func newBuffer(capacity: Int) -> ByteBuffer {
        allocator.buffer(capacity: capacity)
    }

    func countError(_ reason: String) {
        stats.errors[reason, default: 0] += 1
    }

    // MARK: logins

    /// Session `indices[k]` connects at `start + indices[k] / rate` (the global pace).
    func scheduleLogins(_ indices: [Int], start: NIODeadline, rate: Double) {
        assigned += indices.count
        let isolated = loop.assumeIsolated()
        for index in indices {
            let at = start + .nanoseconds(Int64(Double(index) / rate * 1e9))
            isolated.scheduleTask(deadline: at) { self.connect(index) }
        }
    }

    private func connect(_ index: Int) {
        let direct = config.tls == .direct
        let session = Session(index: index, worker: self, directTLS: direct)
        sessions.append(session)
        stats.loginsStarted += 1
        session.timeout = loop.assumeIsolated().scheduleTask(in: .nanoseconds(Int64(config.loginTimeout * 1e9))) {
            session.loginTimedOut()
        }
        let bound = NIOLoopBound(session, eventLoop: loop)
        let ssl = direct ? directTLSContext : nil
        let hostname = config.domain
        ClientBootstrap(group: loop)
            .channelOption(.tcpOption(.tcp_nodelay), value: config.tcpNodelay ? 1 : 0)
            .connectTimeout(.seconds(10))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let ssl {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: ssl, serverHostname: hostname))
                    }
                    try channel.pipeline.syncOperations.addHandler(bound.value)
                }
            }
            .connect(host: config.host, port: config.port)
            .assumeIsolated()
            .whenFailure { error in session.connectFailed(error) }
    }

    func mechanismUsed(_ name: String) {
        stats.mechanisms[name, default: 0] += 1
    }

    func loginSucceeded(_ session: Session) {
        stats.loginsSucceeded += 1
        let micros = (NIODeadline.now() - session.loginStarted).nanoseconds / 1000
        _ = stats.loginLatency.record(UInt64(max(1, micros)))
        ready.append(session)
    }

    func sessionEnded(_ session: Session, wasPhase: Session.Phase, reason: String) {
        if wasPhase != .ready {
            stats.loginsFailed += 1
            stats.loginErrors[reason, default: 0] += 1
        } else if !session.closing {
            stats.disconnects[reason, default: 0] += 1
            if session.awaitsFinalAck { finalAcksOutstanding -= 1 }
        }
    }

    var pendingLogins: Int { assigned - stats.loginsSucceeded - stats.loginsFailed }

    /// The bound full JIDs of this worker's logged-in sessions, in the order they will send.
    func readyJIDs() -> [[UInt8]] {
        ready = ready.filter { $0.isReady && $0.boundJID != nil }
        return ready.compactMap(\.boundJID)
    }

    // MARK: messages

    /// Starts this worker's share of the schedule: `rate` messages/s from its sessions,
    /// `duration` seconds from `start`, to random sessions of the whole directory.
    func startSending(directory: Directory, offset: Int, rate: Double, start: NIODeadline, duration: Double) {
        self.directory = directory
        self.directoryOffset = offset
        self.ratePerNs = rate / 1e9
        self.startNs = start.uptimeNanoseconds
        self.total = ready.isEmpty || directory.jids.count < 2 ? 0 : UInt64(rate * duration)
        self.sendingDone = false
        scheduleTick()
    }

    private func scheduleTick() {
        loop.assumeIsolated().scheduleTask(in: .nanoseconds(Int64(config.tickMs * 1e6))) { self.tick() }
    }

    /// Sends every message due by now (open loop: the schedule is fixed in advance, and a
    /// slow server shows as latency, not as fewer messages).
    private func tick() {
        let now = NIODeadline.now().uptimeNanoseconds
        if now >= startNs, let directory {
            let elapsed = Double(now - startNs)
            let due = min(total, UInt64(elapsed * ratePerNs) + 1)
            let count = UInt64(directory.jids.count)
            while stats.scheduled < due {
                let k = stats.scheduled
                stats.scheduled += 1
                let at = startNs + UInt64(Double(k) / ratePerNs)
                let local = Int(k % UInt64(ready.count))
                let sender = ready[local]
                guard sender.isReady else {
                    stats.skipped += 1
                    continue
                }
                let own = UInt64(directoryOffset + local)
                var destination = rng.next() % (count - 1)
                if destination >= own { destination += 1 }
                let sendNs = NIODeadline.now().uptimeNanoseconds
                sender.sendMessage(to: directory.jids[Int(destination)], sent: sendNs, scheduled: at, sequence: k)
                stats.sent += 1
                if stats.firstSendNs == 0 { stats.firstSendNs = sendNs }
                stats.lastSendNs = sendNs
                _ = stats.sendLag.record(max(1, (sendNs &- at) / 1000))
            }
        }
        if stats.scheduled >= total {
            sendingDone = true
            for session in ready where session.requestFinalAck() {
                finalAcksOutstanding += 1
            }
        } else {
            scheduleTick()
        }
    }

    /// `sent`: when the message was written (what tsung measures from); `scheduled`: when
    /// the open-loop schedule wanted it sent, so that a generator falling behind shows too.
    func messageReceived(sent: UInt64, scheduled: UInt64?) {
        let now = NIODeadline.now().uptimeNanoseconds
        stats.received += 1
        stats.lastReceiveNs = now
        // A stamp from the future cannot be ours: count, do not record.
        guard sent > 0, sent <= now else {
            countError("message with a bad stamp")
            return
        }
        _ = stats.latency.record(max(1, (now - sent) / 1000))
        if let scheduled, scheduled > 0, scheduled <= now {
            _ = stats.latencyFromSchedule.record(max(1, (now - scheduled) / 1000))
        }
    }

    func finalAck(acked: UInt64, expected: UInt64) {
        finalAcksOutstanding -= 1
        stats.finalAcks += 1
        stats.finalAcked += acked
        stats.finalExpected += expected
    }

    var status: WorkerStatus {
        WorkerStatus(pendingLogins: pendingLogins, sendingDone: sendingDone, sent: stats.sent,
                     received: stats.received, finalAcksOutstanding: finalAcksOutstanding)
    }

    func closeAll() {
        for session in sessions { session.close() }
    }
}
