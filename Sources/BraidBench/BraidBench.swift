import ArgumentParser
import NIOCore

@main
struct BraidBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "braid-bench",
        abstract: "In-process micro benchmarks for Braid. Build with -c release for real numbers.",
        subcommands: [Parse.self, SCRAM.self, StorageBench.self]
    )
}

extension BraidBench {
    struct Parse: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stream parse throughput against raw expat, measured in the same run.")

        @Option(help: "Size of the generated stream in megabytes.")
        var megabytes: Int = 50

        @Option(help: "Runs of each parser; the best is reported.")
        var repetitions: Int = 5

        @Flag(help: "Print one JSON object instead of a table.")
        var json = false

        @Flag(help: "Run only Braid's parser once, for profiling under callgrind.")
        var profileOnly = false

        func run() {
            if profileOnly {
                let (bytes, _) = ParseBenchmark.generateStream(targetBytes: megabytes * 1_000_000)
                let chunks = stride(from: 0, to: bytes.count, by: ParseBenchmark.readSize).map {
                    ByteBuffer(bytes: bytes[$0..<min($0 + ParseBenchmark.readSize, bytes.count)])
                }
                let (seconds, stanzas) = ParseBenchmark.timeTree(chunks)
                print("\(stanzas) stanzas in \(seconds) s")
                return
            }
            let result = ParseBenchmark(targetBytes: megabytes * 1_000_000, repetitions: repetitions).run()
            if json {
                print("""
                {"benchmark":"stream-parse","bytes":\(result.bytes),"stanzas":\(result.stanzas),\
                "raw_expat_mb_per_s":\(result.rawMBps),"expat_noop_handlers_mb_per_s":\(result.emptyHandlerMBps),"braid_mb_per_s":\(result.treeMBps),\
                "braid_stanzas_per_s":\(result.stanzasPerSecond),"ratio_to_raw":\(result.ratio)}
                """)
            } else {
                print("stream: \(result.bytes) bytes, \(result.stanzas) stanzas, best of \(repetitions)")
                print("raw expat XML_Parse, no handlers: \(String(format2: result.rawMBps)) MB/s")
                print("expat with no-op handlers:        \(String(format2: result.emptyHandlerMBps)) MB/s")
                print("Braid tree-building parser:       \(String(format2: result.treeMBps)) MB/s, \(Int(result.stanzasPerSecond)) stanzas/s")
                print("ratio to raw expat:               \(String(format2: result.ratio * 100)) %")
            }
        }
    }
}

extension BraidBench {
    struct SCRAM: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "SCRAM-SHA-256 logins per second, server side alone and client plus server.")

        @Option(help: "Logins per run.")
        var logins: Int = 2000

        @Option(help: "PBKDF2 iterations of the stored keys (Braid's default is 10000).")
        var iterations: Int = 10_000

        @Option(help: "Runs; the best is reported.")
        var repetitions: Int = 3

        @Flag(help: "Print one JSON object instead of a table.")
        var json = false

        func run() throws {
            var best: SCRAMBenchmark.Result?
            for _ in 0..<max(1, repetitions) {
                let result = try SCRAMBenchmark(logins: logins, iterations: iterations).run()
                if best == nil || result.serverSeconds < best!.serverSeconds { best = result }
            }
            let r = best!
            if json {
                print("""
                {"benchmark":"scram-sha-256","logins":\(r.logins),"iterations":\(r.iterations),\
                "server_logins_per_s":\(r.serverLoginsPerSecond),"server_us_per_login":\(r.serverMicrosecondsPerLogin),\
                "full_logins_per_s":\(r.fullLoginsPerSecond)}
                """)
            } else {
                print("SCRAM-SHA-256, \(r.logins) logins, \(r.iterations) iterations, best of \(repetitions)")
                print("server side only: \(Int(r.serverLoginsPerSecond)) logins/s (\(String(format2: r.serverMicrosecondsPerLogin)) µs each)")
                print("client + server:  \(String(format2: r.fullLoginsPerSecond)) logins/s (client PBKDF2 included)")
            }
        }
    }
}

extension String {
    /// Formats with two decimals, without Foundation.
    init(format2 value: Double) {
        let scaled = (value * 100).rounded()
        let whole = Int(scaled / 100)
        let fraction = Int(abs(scaled).truncatingRemainder(dividingBy: 100))
        self = "\(whole).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}
