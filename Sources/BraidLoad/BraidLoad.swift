import ArgumentParser
import Histogram
import NIOCore
import NIOPosix
import NIOSSL

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

enum TLSMode: String, Sendable, ExpressibleByArgument, CaseIterable {
    case starttls, direct
}

enum MechanismChoice: String, Sendable, ExpressibleByArgument, CaseIterable {
    case auto
    case scramSHA256 = "SCRAM-SHA-256"
    case scramSHA1 = "SCRAM-SHA-1"
    case plain = "PLAIN"
}

struct LoadConfig: Sendable {
    var host: String
    var port: Int
    var domain: String
    var userPattern: String
    var passwordPattern: String
    var firstIndex: Int
    var sessions: Int
    var loginRate: Double
    var rate: Double
    var duration: Double
    var drain: Double
    var tls: TLSMode
    var mechanism: MechanismChoice
    var streamManagement: Bool
    var presence: Bool
    var resource: String
    var bodyBytes: Int
    var loginTimeout: Double
    var ackEvery: Int
    var tcpNodelay: Bool
    var toBare: Bool
    var tickMs: Double

    /// Account `index` (0-based session number): `%d` in the patterns is firstIndex + index.
    func account(_ index: Int) -> (localpart: String, password: String) {
        let number = String(firstIndex + index)
        let user = userPattern.replacingPercentD(with: number)
        let localpart = user.split(separator: "@", maxSplits: 1).first.map(String.init) ?? user
        return (localpart, passwordPattern.replacingPercentD(with: number))
    }
}

extension String {
    func replacingPercentD(with value: String) -> String {
        var out = ""
        var rest = Substring(self)
        while let range = rest.range(of: "%d") {
            out += rest[..<range.lowerBound] + value
            rest = rest[range.upperBound...]
        }
        return out + rest
    }

    fileprivate func range(of needle: String) -> Range<String.Index>? {
        Substring(self).range(of: needle)
    }
}

extension Substring {
    fileprivate func range(of needle: String) -> Range<String.Index>? {
        guard !needle.isEmpty else { return nil }
        var index = startIndex
        while index < endIndex {
            if self[index...].hasPrefix(needle) {
                return index..<(self.index(index, offsetBy: needle.count))
            }
            index = self.index(after: index)
        }
        return nil
    }
}

@main
struct BraidLoad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "braid-load",
        abstract: "Open-loop c2s load: N sessions log in (TLS, SASL, bind, stream management), then send chat messages to each other at a fixed total rate; prints JSON.")

    @Option(help: "Server address.") var host = "127.0.0.1"
    @Option(help: "Server port (5222 for STARTTLS, 5223 for direct TLS).") var port = 5222
    @Option(help: "Account pattern; %d is the account number.") var user = "user%d@c2s.test"
    @Option(help: "Password pattern; %d is the account number.") var password = "pass%d"
    @Option(help: "Number of the first account.") var firstIndex = 1
    @Option(help: "Concurrent sessions.") var sessions = 200
    @Option(help: "Logins started per second.") var loginRate = 200.0
    @Option(help: "Total offered chat messages per second, over all sessions.") var rate = 1000.0
    @Option(help: "Seconds of messaging.") var duration = 20.0
    @Option(help: "Seconds to wait for messages still in flight after the last send.") var drain = 10.0
    @Option(help: "starttls or direct.") var tls: TLSMode = .starttls
    @Flag(help: "Accept any server certificate (the benchmarks' self-signed ones).") var insecure = false
    @Option(help: "CA certificate (PEM) to verify the server with, instead of --insecure.") var caFile: String?
    @Option(help: "auto (SCRAM-SHA-256, else SCRAM-SHA-1, else PLAIN), SCRAM-SHA-256, SCRAM-SHA-1 or PLAIN.")
    var mechanism: MechanismChoice = .auto
    @Flag(inversion: .prefixedNo, help: "Enable stream management (XEP-0198).") var streamManagement = true
    @Flag(help: "Send initial presence after login.") var presence = false
    @Option(help: "Resource to bind.") var resource = "load"
    @Option(help: "Bytes of each message body (the stamp plus padding).") var bodyBytes = 64
    @Option(help: "Seconds a login may take before it counts as failed.") var loginTimeout = 60.0
    @Option(help: "Ask for an ack (<r/>) after every N messages of a session; 0: only once at the end.") var ackEvery = 0
    @Option(help: "Event-loop threads.") var threads = 1
    @Flag(inversion: .prefixedNo, help: "Set TCP_NODELAY on the client sockets.") var tcpNodelay = true
    @Flag(help: "Address messages to bare JIDs (as tsung does; needs --presence for delivery) instead of the bound full JIDs.")
    var toBare = false
    @Flag(help: "Negotiate at most TLS 1.2.") var tls12 = false
    @Option(help: "Milliseconds between send ticks: each tick sends every message due by then.") var tickMs = 1.0
    @Option(help: "Write the JSON report here instead of standard output.") var output: String?
    @Flag(help: "Progress on standard error.") var verbose = false

    func validate() throws {
        guard sessions >= 2 else { throw ValidationError("--sessions must be at least 2") }
        guard threads >= 1, loginRate > 0, rate >= 0, duration >= 0 else { throw ValidationError("bad rate, duration or threads") }
        guard user.contains("%d"), user.contains("@") else { throw ValidationError("--user needs %d and @domain") }
    }

    func run() throws {
        let domain = String(user.split(separator: "@", maxSplits: 1).last ?? "")
        let config = LoadConfig(
            host: host, port: port, domain: domain, userPattern: user, passwordPattern: password,
            firstIndex: firstIndex, sessions: sessions, loginRate: loginRate, rate: rate, duration: duration,
            drain: drain, tls: tls, mechanism: mechanism, streamManagement: streamManagement, presence: presence,
            resource: resource, bodyBytes: bodyBytes, loginTimeout: loginTimeout, ackEvery: ackEvery,
            tcpNodelay: tcpNodelay, toBare: toBare, tickMs: tickMs)
        let report = try LoadRun(config: config, threads: threads, insecure: insecure, caFile: caFile, tls12: tls12, verbose: verbose).run()
        let text = report.rendered()
        if let output {
            guard let file = fopen(output, "w") else { throw ValidationError("cannot write \(output)") }
            fputs(text + "\n", file)
            fclose(file)
        } else {
            print(text)
        }
    }
}

/// The phases of a run, driven from the main thread; the sessions live on the workers' loops.
struct LoadRun {
    var config: LoadConfig
    var threads: Int
    var insecure: Bool
    var caFile: String?
    var tls12: Bool
    var verbose: Bool

    func log(_ text: String) {
        guard verbose else { return }
        // write(2) on descriptor 2: the C `stderr` global is not concurrency-safe in Swift 6.
        let line = Array("[braid-load] \(text)\n".utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    func tlsContext(alpn: [String]) throws -> NIOSSLContext {
        var tls = TLSConfiguration.makeClientConfiguration()
        if insecure {
            tls.certificateVerification = .none
        } else if let caFile {
            tls.trustRoots = .file(caFile)
        }
        tls.applicationProtocols = alpn
        if tls12 { tls.maximumTLSVersion = .tlsv12 }
        return try NIOSSLContext(configuration: tls)
    }

    /// One descriptor per session: the soft limit goes up to the hard one.
    static func raiseFileLimit() {
        var limit = rlimit()
        #if os(Linux)
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        #else
        let resource = RLIMIT_NOFILE
        #endif
        guard getrlimit(resource, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(resource, &limit)
    }

    func run() throws -> JSON {
        Self.raiseFileLimit()
        let starttls = try tlsContext(alpn: [])
        let direct = config.tls == .direct ? try tlsContext(alpn: ["xmpp-client"]) : nil
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        defer { try? group.syncShutdownGracefully() }
        var loops: [any EventLoop] = []
        for loop in group.makeIterator() { loops.append(loop) }
        let config = self.config
        var workers: [NIOLoopBound<Worker>] = []
        for (number, loop) in loops.enumerated() {
            workers.append(try loop.submit {
                NIOLoopBound(Worker(loop: loop, config: config, tlsContext: starttls, directTLSContext: direct,
                                    seed: 0x5EED_0000 &+ UInt64(number) &* 7919), eventLoop: loop)
            }.wait())
        }
        func each<T: Sendable>(_ body: @escaping @Sendable (Worker) -> T) throws -> [T] {
            try workers.map { bound in try bound.eventLoop.submit { body(bound.value) }.wait() }
        }

        let cpuStart = CPUTime.now()
        let wallStart = NIODeadline.now()

        // Logins, paced: session i starts at i / loginRate, on worker i mod threads. The phase
        // marks let a benchmark measure the server's CPU per login between them.
        log("phase: logins")
        let loginStart = NIODeadline.now() + .milliseconds(20)
        for (number, bound) in workers.enumerated() {
            let indices = Array(stride(from: number, to: config.sessions, by: workers.count))
            let rate = config.loginRate
            bound.eventLoop.execute { bound.value.scheduleLogins(indices, start: loginStart, rate: rate) }
        }
        let loginLimit = loginStart + .nanoseconds(Int64((Double(config.sessions) / config.loginRate + config.loginTimeout + 5) * 1e9))
        var lastLog = NIODeadline.now()
        while true {
            usleep(50_000)
            let pending = try each { $0.pendingLogins }.reduce(0, +)
            if NIODeadline.now() - lastLog > .seconds(2) {
                lastLog = .now()
                log("logins pending: \(pending)")
            }
            if pending == 0 || NIODeadline.now() > loginLimit { break }
        }
        let loginEnd = NIODeadline.now()
        let cpuAfterLogin = CPUTime.now()
        let threadsAfterLogin = ThreadCPU.sample()

        // The directory of bound JIDs: worker w's sessions hold a contiguous range.
        let perWorker = try each { $0.readyJIDs() }
        let bound = perWorker.flatMap { $0 }
        // Bare JIDs: the bound JID up to its '/'.
        let directory = Directory(jids: config.toBare ? bound.map { Array($0.prefix { $0 != UInt8(ascii: "/") }) } : bound)
        let online = directory.jids.count
        log("\(online) of \(config.sessions) sessions logged in in \(Self.seconds(loginEnd - loginStart)) s")

        // A quiet gap after the logins, so a server CPU sample taken in it holds the logins'
        // work and none of the messages'.
        usleep(300_000)
        // Messages: each worker offers the total rate times its share of the sessions.
        let sendStart = NIODeadline.now() + .milliseconds(100)
        log("phase: messages")
        var offset = 0
        for (number, bound) in workers.enumerated() {
            let share = online == 0 ? 0 : config.rate * Double(perWorker[number].count) / Double(online)
            let start = offset
            let duration = config.duration
            bound.eventLoop.execute {
                bound.value.startSending(directory: directory, offset: start, rate: share, start: sendStart, duration: duration)
            }
            offset += perWorker[number].count
        }
        var sendEnd = sendStart
        var statuses: [WorkerStatus] = []
        while true {
            usleep(50_000)
            statuses = try each { $0.status }
            if statuses.allSatisfy(\.sendingDone) { break }
            if NIODeadline.now() - lastLog > .seconds(5) {
                lastLog = .now()
                log("sent \(statuses.map(\.sent).reduce(0, +)), received \(statuses.map(\.received).reduce(0, +))")
            }
        }
        sendEnd = .now()
        log("phase: sent")
        let drainLimit = NIODeadline.now() + .nanoseconds(Int64(config.drain * 1e9))
        while NIODeadline.now() < drainLimit {
            statuses = try each { $0.status }
            let sent = statuses.map(\.sent).reduce(0, +)
            let received = statuses.map(\.received).reduce(0, +)
            if received >= sent && statuses.allSatisfy({ $0.finalAcksOutstanding <= 0 }) { break }
            usleep(20_000)
        }
        let cpuEnd = CPUTime.now()
        let threadsEnd = ThreadCPU.sample()
        let drainEnd = NIODeadline.now()
        log("phase: drained")

        var stats = Stats()
        for part in try each({ $0.stats }) { stats.merge(part) }
        _ = try each { $0.closeAll() }
        usleep(200_000)

        return Report(config: config, threads: threads, insecure: insecure, tls12: tls12, stats: stats,
                      loginSeconds: Self.seconds(loginEnd - loginStart),
                      sendSeconds: Self.seconds(sendEnd - sendStart),
                      drainSeconds: Self.seconds(drainEnd - sendEnd),
                      wallSeconds: Self.seconds(drainEnd - wallStart),
                      cpuLogin: cpuAfterLogin - cpuStart, cpuMessages: cpuEnd - cpuAfterLogin,
                      threadCPU: ThreadCPU.busiest(before: threadsAfterLogin, after: threadsEnd),
                      messageWindowSeconds: Self.seconds(drainEnd - loginEnd)).json()
    }

    static func seconds(_ amount: TimeAmount) -> Double {
        Double(amount.nanoseconds) / 1e9
    }
}

/// user and system CPU seconds of this process (getrusage).
struct CPUTime {
    var user: Double
    var system: Double

    static func now() -> CPUTime {
        var usage = rusage()
        #if os(Linux)
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        #else
        getrusage(RUSAGE_SELF, &usage)
        #endif
        return CPUTime(user: Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6,
                       system: Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6)
    }

    static func - (a: CPUTime, b: CPUTime) -> CPUTime {
        CPUTime(user: a.user - b.user, system: a.system - b.system)
    }

    var total: Double { user + system }
}

/// Per-thread CPU from /proc/self/task (Linux): the busiest event-loop thread shows whether
/// the generator itself was saturated.
enum ThreadCPU {
    static func sample() -> [String: (name: String, seconds: Double)] {
        var out: [String: (name: String, seconds: Double)] = [:]
        guard let dir = opendir("/proc/self/task") else { return out }
        defer { closedir(dir) }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        while let entry = readdir(dir) {
            let tid = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            guard tid.first?.isNumber == true, let stat = readFile("/proc/self/task/\(tid)/stat"),
                  let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")") else { continue }
            let name = String(stat[stat.index(after: open)..<close])
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { continue }
            out[tid] = (name, (user + system) / ticks)
        }
        return out
    }

    static func busiest(before: [String: (name: String, seconds: Double)], after: [String: (name: String, seconds: Double)]) -> (name: String, seconds: Double)? {
        var best: (name: String, seconds: Double)?
        for (tid, value) in after {
            let used = value.seconds - (before[tid]?.seconds ?? 0)
            if best == nil || used > (best?.seconds ?? 0) { best = (value.name, used) }
        }
        return best
    }

    static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 1024)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        return String(decoding: bytes[0..<count], as: UTF8.self)
    }
}
