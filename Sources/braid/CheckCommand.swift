import ArgumentParser
import Foundation
import Logging
import NIOPosix
import Server

// MARK: - check

/// `braid check [DOMAIN…]`: what `prosodyctl check` is to Prosody. The checks themselves
/// live in the Server module (``ServerCheck``); this reads the configuration and storage,
/// builds the resolver and POSH fetcher the server would, prints, and sets the exit code.
struct CheckCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check DNS, DNSSEC, DANE, POSH, certificates and reachability of the served domains.",
        discussion: """
            With no DOMAIN, every hosted domain is checked, each with its service domains \
            (conference., upload., ...). Exit status: 0 when no check is an error (warnings \
            alone keep it 0), 1 when any is, 2 when the check could not run. See \
            docs/check.md.
            """)

    @OptionGroup var options: ConfigOptions
    @Argument(help: "Domains to check (default: every hosted domain). A hosted domain brings its service domains.") var domains: [String] = []
    @Flag(help: "Print the report as JSON (shape in docs/check.md).") var json = false
    @Option(help: ArgumentHelp("Seconds for each DNS query, TCP connect and POSH fetch.", valueName: "seconds")) var timeout: Double = 5

    func validate() throws {
        guard timeout > 0, timeout <= 300 else { throw ValidationError("--timeout must be between 0 and 300 seconds") }
    }

    func run() async throws {
        let configuration = try options.load()
        let given = try domains.map(canonicalDomain)
        let report: CheckReport
        do {
            report = try await check(configuration, given: given)
        } catch {
            // The check could not run at all (storage, DNS set-up): exit 2, so that 1 keeps
            // meaning "a check found an error".
            FileHandle.standardError.write(Data("Error: \(error)\n".utf8))
            throw ExitCode(2)
        }
        print(json ? report.json() : report.text(), terminator: json ? "\n" : "")
        if report.exitCode != 0 {
            throw ExitCode(report.exitCode)
        }
    }

    private func check(_ configuration: BraidConfiguration, given: [String]) async throws -> CheckReport {
        let storage = try await options.openStorage(configuration)
        let hosted = try await storage.domains().map(\.name)
        let served = try CheckedName.served(hosted: hosted, configuration: configuration)
        // A hosted domain brings its services; a service domain is checked as one; any other
        // name (one not added yet, say) is checked as a hosted domain would be.
        let names = given.isEmpty ? served : given.flatMap { name in
            let known = served.filter { $0.domain == name || $0.parent == name }
            return known.isEmpty ? [CheckedName(domain: name)] : known
        }
        return try await ServerCheck.runLive(configuration: configuration, names: names, timeout: .milliseconds(Int64(timeout * 1000)),
                                             eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: quietCLILogger())
    }
}
