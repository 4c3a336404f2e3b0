#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import Foundation
import Synchronization

/// A child process started with posix_spawn, so that the test owns its PID and reaps it
/// itself (Foundation's `Process` reaps behind our back). Output goes to a file.
public final class ChildProcess: Sendable {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public let pid: pid_t
    public let executable: String
    public let outputPath: String
    /// The raw wait status once reaped.
    private let waitStatus = Mutex<Int32?>(nil)

    private init(pid: pid_t, executable: String, outputPath: String) {
        self.pid = pid
        self.executable = executable
        self.outputPath = outputPath
    }

    /// Finds a tool on PATH or in the sbin directories (knotd and keymgr live in /usr/sbin,
    /// which a non-root PATH often lacks).
    public static func locate(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/bin"]
        for directory in directories {
            let candidate = directory + "/" + name
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Starts `executable` with `arguments`; stdout and stderr go to `outputPath`.
    public static func spawn(_ executable: String, _ arguments: [String], outputPath: String) throws -> ChildProcess {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // NIO opens sockets without CLOEXEC, so a child would inherit every socket the test
        // process has open; a long-lived one (an OCSP responder) then keeps a listener that
        // another test closed bound, and that test cannot bind its port again. (glibc's
        // closefrom action is not visible to Swift; a close action on a descriptor closed
        // meanwhile is ignored.)
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            if let descriptor = Int32(name), descriptor > 2 { posix_spawn_file_actions_addclose(&actions, descriptor) }
        }

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let code = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        guard code == 0 else { throw Failure(description: "posix_spawn \(executable) failed: \(code)") }
        return ChildProcess(pid: pid, executable: executable, outputPath: outputPath)
    }

    /// Runs a tool to completion (bounded) and returns its exit code and output.
    public static func run(_ executable: String, _ arguments: [String], outputPath: String, timeout: Duration = .seconds(10)) async throws -> (exitCode: Int32, output: String) {
        let child = try spawn(executable, arguments, outputPath: outputPath)
        guard let status = await child.waitForExit(timeout: timeout) else {
            await child.terminate()
            throw Failure(description: "\(executable) \(arguments.joined(separator: " ")) did not finish within \(timeout)")
        }
        return (status, child.output)
    }

    /// What the process wrote so far.
    public var output: String {
        (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
    }

    /// Reaps the process if it has exited; true while it runs.
    public var isRunning: Bool {
        waitStatus.withLock { status in
            if status != nil { return false }
            var raw: Int32 = 0
            let result = waitpid(pid, &raw, WNOHANG)
            if result == pid {
                status = raw
                return false
            }
            // 0: still running. -1 (ECHILD): already gone.
            return result == 0
        }
    }

    /// The exit code (or 128 + signal) once the process has ended and been reaped.
    public var exitCode: Int32? {
        guard let raw = waitStatus.withLock({ $0 }) else { return nil }
        let signal = raw & 0x7F
        return signal == 0 ? (raw >> 8) & 0xFF : 128 + signal
    }

    /// Waits, polling, until the process exits; nil if it still runs after `timeout`.
    public func waitForExit(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while isRunning {
            if ContinuousClock.now >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return exitCode ?? -1
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; always reaps.
    public func terminate(grace: Duration = .seconds(5)) async {
        guard isRunning else { return }
        kill(pid, SIGTERM)
        if await waitForExit(timeout: grace) != nil { return }
        kill(pid, SIGKILL)
        _ = await waitForExit(timeout: .seconds(5))
    }
}

/// Helpers for loopback sockets in tests.
public enum LoopbackPorts {
    /// A port on 127.0.0.1 that is free for both UDP and TCP right now, for a child process
    /// (a DNS server, an OCSP responder) to bind after we let go of it.
    ///
    /// Taken below the kernel's ephemeral range when there is room: a port the kernel handed
    /// out for `bind(0)` is also what it hands out as the source port of outgoing connections,
    /// and with the suites' hundreds of loopback connections one of them took an OCSP
    /// responder's port before `openssl ocsp` bound it ("Address already in use", 1 suite run
    /// in 5). Below the range only another test's pick can collide, and that is checked.
    public static func freePort() throws -> Int {
        // Every suite runs in this one process, and each checks only that its port is free
        // when it asks, binding it later: two suites given the same port in that window made
        // one of them fail to bind (an ACME listener, an OCSP responder) in clean-clone CI
        // runs. A port is handed out once per process.
        func claim(_ port: Int) -> Bool { handedOut.withLock { $0.insert(port).inserted } }
        let ephemeralLow = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8))
            .flatMap { $0.split(whereSeparator: \.isWhitespace).first.flatMap { Int($0) } } ?? 32768
        if ephemeralLow > 12000 {
            for _ in 0 ..< 50 {
                let port = Int.random(in: 10000 ..< ephemeralLow)
                guard let udp = try? boundSocket(type: datagram, port: port) else { continue }
                defer { close(udp.fd) }
                if let tcp = try? boundSocket(type: stream, port: port) {
                    close(tcp.fd)
                    if claim(port) { return port }
                }
            }
        }
        for _ in 0 ..< 20 {
            let udp = try boundSocket(type: datagram, port: 0)
            defer { close(udp.fd) }
            if let tcp = try? boundSocket(type: stream, port: udp.port) {
                close(tcp.fd)
                if claim(udp.port) { return udp.port }
            }
        }
        throw ChildProcess.Failure(description: "no free loopback port found")
    }

    /// The ports ``freePort()`` has handed out in this process.
    private static let handedOut = Mutex<Set<Int>>([])

    /// A TCP port on 127.0.0.1 where nothing listens, held for as long as the test needs it:
    /// a socket bound there without `listen()`, so connections are refused and no other test
    /// can take the port. A port from ``freePort()`` used as "closed" could be taken by another
    /// suite's child meanwhile (an `openssl ocsp` responder, which serves one connection at a
    /// time and then waited on our stray connect until its own client timed out). Call
    /// ``ClosedTCPPort/release()`` when done.
    public static func closedTCPPort() throws -> ClosedTCPPort {
        let (fd, port) = try boundSocket(type: stream, port: 0)
        return ClosedTCPPort(fd: fd, port: port)
    }

    /// A UDP socket bound to 127.0.0.1 that never answers: a black hole for timeout tests.
    /// Close the returned descriptor when done.
    public static func silentUDPSocket() throws -> (fd: Int32, port: Int) {
        try boundSocket(type: datagram, port: 0)
    }

    #if canImport(Glibc) || canImport(Musl)
    public static let datagram = Int32(SOCK_DGRAM.rawValue)
    public static let stream = Int32(SOCK_STREAM.rawValue)
    #else
    public static let datagram = SOCK_DGRAM
    public static let stream = SOCK_STREAM
    #endif

    /// See ``closedTCPPort()``.
    public struct ClosedTCPPort: Sendable {
        fileprivate let fd: Int32
        public let port: Int

        public func release() {
            close(fd)
        }
    }

    public static func boundSocket(type: Int32, port: Int) throws -> (fd: Int32, port: Int) {
        let fd = socket(AF_INET, type, 0)
        guard fd >= 0 else { throw ChildProcess.Failure(description: "socket() failed: \(errno)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0 else {
            close(fd)
            throw ChildProcess.Failure(description: "bind() failed: \(errno)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getsockname(fd, $0, &length)
            }
        }
        return (fd, Int(UInt16(bigEndian: address.sin_port)))
    }
}
