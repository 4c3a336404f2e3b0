import ArgumentParser
import Foundation
import Logging
import NIOPosix
import Server
import ServiceLifecycle
import UnixSignals
import Storage
import Trust
import XMPPCore
import XMPPStream

@main
struct Braid: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "braid",
        abstract: "An XMPP server for hosting providers.",
        discussion: """
            With no configuration file, every command uses the embedded defaults: data in \
            ./braid-data, the domain 'localhost' with a self-signed certificate, and client \
            listeners on ports 5222 (STARTTLS) and 5223 (direct TLS).
            """,
        version: BraidInfo.version,
        subcommands: [Serve.self, DomainCommand.self, UserCommand.self, CertCommand.self, PoshCommand.self, LinksCommand.self, CheckCommand.self, APICommand.self, StorageCommand.self, ClusterCommand.self]
    )
}

/// The `--config` option every command takes.
struct ConfigOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Configuration file (YAML). Default: $BRAID_CONFIG, then ./braid.yaml if present.", valueName: "path"))
    var config: String?

    func load() throws -> BraidConfiguration {
        do {
            return try BraidConfiguration.load(path: BraidConfiguration.locateFile(explicit: config))
        } catch let error as ConfigurationError {
            throw ValidationError(error.description)
        }
    }

    /// The data store, hosting the default domain if none is hosted yet (as `serve` does), so
    /// that commands work in any order on a fresh directory.
    func openStorage(_ configuration: BraidConfiguration) async throws -> any Storage {
        try FileManager.default.createDirectory(atPath: configuration.dataDirectory, withIntermediateDirectories: true)
        var logger = Logger(label: "braid")
        logger.logLevel = .warning
        let storage = try configuration.storage.open(dataDirectory: configuration.dataDirectory, logger: logger, eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
        try await storage.prepare()
        _ = try await BraidServer.hostDefaultDomainIfNone(storage: storage, configuration: configuration)
        return storage
    }
}

// MARK: - serve

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the server until SIGTERM or SIGINT.",
        discussion: "On SIGTERM every stream is closed with <system-shutdown/>; stanzas in flight are delivered, stored or bounced. SIGHUP re-reads the certificates.")

    @OptionGroup var options: ConfigOptions

    func run() async throws {
        let configuration = try options.load()
        let level = Logger.Level(rawValue: configuration.logLevel.lowercased()) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "braid")
        raiseDescriptorLimit(logger: logger)
        let server = try BraidServer(configuration: configuration, logger: logger)
        let group = ServiceGroup(configuration: .init(services: [server], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        // SIGHUP re-reads certificates, as Prosody and ejabberd operators expect after a renewal.
        let reloader = Task {
            for await _ in await UnixSignalsSequence(trapping: .sighup) {
                server.reloadCertificates()
            }
        }
        defer { reloader.cancel() }
        try await group.run()
    }
}

// MARK: - storage

struct StorageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "storage",
        abstract: "Move data between backends.",
        subcommands: [Migrate.self])

    struct Migrate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy an SQLite deployment into PostgreSQL.",
            discussion: """
                Copies domains, accounts with their SCRAM keys, rosters (with their versions),                 subscription requests and offline messages, row for row. Rows already in                 PostgreSQL are kept, so it can run again (say, once more right before switching);                 every table's rows are counted on both sides at the end. Stop 'braid serve' first                 so that nothing changes meanwhile, then set storage.backend: postgresql and                 storage.url.
                """)
        @OptionGroup var options: ConfigOptions
        @Option(help: ArgumentHelp("The PostgreSQL database to copy into.", valueName: "postgresql://user@host/db")) var to: String
        @Option(help: ArgumentHelp("The SQLite file to copy from. Default: <data_directory>/braid.sqlite.", valueName: "path")) var from: String?

        func run() async throws {
            let configuration = try options.load()
            let path = from ?? "\(configuration.dataDirectory)/braid.sqlite"
            guard FileManager.default.fileExists(atPath: path) else {
                throw ValidationError("no SQLite database at \(path)")
            }
            var logger = Logger(label: "braid")
            logger.logLevel = .warning
            let source = try SQLiteStorage(path: path, logger: logger)
            var settings = try PostgresConnectionSettings(url: to)
            settings.connectTimeout = .seconds(max(1, configuration.storage.connectTimeoutSeconds))
            let target = try PostgresStorage(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger)
            do {
                let counts = try await StorageMigration.copy(from: source, to: target, logger: logger)
                for count in counts { print(count) }
                print("done: every row of \(path) is in \(settings.redactedDescription)")
                print("next: set storage.backend: postgresql and storage.url (or BRAID_STORAGE_URL), then start braid serve")
                await target.close()
            } catch {
                await target.close()
                throw CommandFailure("\(error)")
            }
        }
    }
}

// MARK: - domain

struct DomainCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "domain",
        abstract: "Manage hosted domains. Changes reach a running server within a second.",
        subcommands: [Add.self, Remove.self, List.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Host one or more domains.",
            discussion: "Many domains (thousands) are best given with --file, one per line: they are added in one transaction.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "Domains, e.g. example.com (an IDN may be given in either form).") var domains: [String] = []
        @Option(help: "A file with one domain per line ('-' for standard input).") var file: String?

        func run() async throws {
            var names = try domains.map(canonicalDomain)
            if let file {
                let text = file == "-" ? readAll() : try String(contentsOfFile: file, encoding: .utf8)
                names += try text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }.map(canonicalDomain)
            }
            guard !names.isEmpty else { throw ValidationError("name at least one domain, or give --file") }
            let storage = try await options.openStorage(try options.load())
            if names.count == 1, let name = names.first {
                print(try await storage.addDomain(name) ? "added \(name)" : "\(name) is already hosted")
            } else {
                let added = try await storage.addDomains(names)
                print("added \(added) of \(names.count) domains (the rest were already hosted)")
            }
        }

        private func readAll() -> String {
            var lines: [String] = []
            while let line = readLine() { lines.append(line) }
            return lines.joined(separator: "\n")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop hosting a domain and delete its accounts, rosters and stored messages. Its sessions are closed with <host-gone/>.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The domain.") var domain: String

        func run() async throws {
            let storage = try await options.openStorage(try options.load())
            let name = try canonicalDomain(domain)
            guard try await storage.removeDomain(name) else {
                throw ValidationError("\(name) is not hosted")
            }
            print("removed \(name)")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List hosted domains.")
        @OptionGroup var options: ConfigOptions

        func run() async throws {
            let storage = try await options.openStorage(try options.load())
            for domain in try await storage.domains() {
                print(domain.name)
            }
        }
    }
}

// MARK: - user

struct UserCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "user",
        abstract: "Manage accounts. Passwords are stored only as SCRAM keys.",
        subcommands: [Add.self, Passwd.self, Remove.self, List.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an account.", discussion: "Without --password, the password is read from standard input (first line).")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The account, e.g. juliet@example.com.") var jid: String
        @Option(help: "The password (visible to other local users in the process list; prefer standard input).") var password: String?

        func run() async throws {
            let configuration = try options.load()
            let storage = try await options.openStorage(configuration)
            let account = try accountJID(jid)
            let credentials = try makeCredentials(password: try readPassword(password), iterations: configuration.auth.scramIterations)
            do {
                try await storage.createUser(account, credentials: credentials)
            } catch StorageError.userExists {
                throw ValidationError("\(account) already exists")
            } catch StorageError.unknownDomain {
                throw ValidationError("\(account.domainpart) is not hosted; run 'braid domain add \(account.domainpart)' first")
            }
            print("created \(account)")
        }
    }

    struct Passwd: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set an account's password.", discussion: "Without --password, the password is read from standard input.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The account.") var jid: String
        @Option(help: "The new password.") var password: String?

        func run() async throws {
            let configuration = try options.load()
            let storage = try await options.openStorage(configuration)
            let account = try accountJID(jid)
            let credentials = try makeCredentials(password: try readPassword(password), iterations: configuration.auth.scramIterations)
            do {
                try await storage.setCredentials(account, credentials: credentials)
            } catch StorageError.userNotFound {
                throw ValidationError("\(account) does not exist")
            }
            print("password changed for \(account)")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete an account with its roster and stored messages.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The account.") var jid: String

        func run() async throws {
            let storage = try await options.openStorage(try options.load())
            let account = try accountJID(jid)
            guard try await storage.removeUser(account) else { throw ValidationError("\(account) does not exist") }
            print("removed \(account)")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List accounts, of one domain or of all.")
        @OptionGroup var options: ConfigOptions
        @Option(help: "Only this domain.") var domain: String?

        func run() async throws {
            let storage = try await options.openStorage(try options.load())
            let domains: [String]
            if let domain {
                domains = [try canonicalDomain(domain)]
            } else {
                domains = try await storage.domains().map(\.name)
            }
            for name in domains {
                for user in try await storage.users(in: name) {
                    print(user)
                }
            }
        }
    }
}

// MARK: - cert

struct CertCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cert",
        abstract: "Certificates.",
        subcommands: [SelfSign.self])

    struct SelfSign: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "selfsign",
            abstract: "Create a self-signed certificate for development.",
            discussion: "Written to <data>/certs/DOMAIN.crt and .key, where a server picks it up at start. Peers cannot validate it: use a CA-issued certificate in production.")
        @OptionGroup var options: ConfigOptions
        @Argument(help: "The domain; more may follow, all named in one certificate.") var domains: [String]
        @Option(help: "Validity in days.") var days: Int = 365
        @Option(help: "Directory to write to instead of <data>/certs.") var out: String?

        func run() async throws {
            let configuration = try options.load()
            let names = try domains.map(canonicalDomain)
            guard let first = names.first else { throw ValidationError("name at least one domain") }
            let directory = out ?? "\(configuration.dataDirectory)/certs"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let credentials = try SelfSignedCertificate.generate(domains: names, validityDays: days)
            let (certificate, key) = CertificateManager.paths(for: first, in: directory)
            try credentials.write(certificatePath: certificate, keyPath: key)
            print("wrote \(certificate) and \(key)")
        }
    }
}

// MARK: - Helpers

func canonicalDomain(_ text: String) throws -> String {
    do {
        return try JID(domain: text).domainpart
    } catch {
        throw ValidationError("'\(text)' is not a valid domain: \(error)")
    }
}

func accountJID(_ text: String) throws -> JID {
    let jid: JID
    do {
        jid = try JID(text)
    } catch {
        throw ValidationError("'\(text)' is not a valid JID: \(error)")
    }
    guard jid.localpart != nil, jid.resourcepart == nil else {
        throw ValidationError("'\(text)' is not an account: give user@domain")
    }
    return jid
}

func readPassword(_ given: String?) throws -> String {
    if let given { return given }
    guard let line = readLine(strippingNewline: true), !line.isEmpty else {
        throw ValidationError("no password given: pass --password or write it to standard input")
    }
    return line
}

func makeCredentials(password: String, iterations: Int) throws -> StoredCredentials {
    func convert(_ keys: SCRAMServerKeys) -> ScramCredentials {
        ScramCredentials(salt: keys.salt, iterations: keys.iterations, storedKey: keys.storedKey, serverKey: keys.serverKey)
    }
    do {
        return StoredCredentials(
            sha1: convert(try SCRAMKeyDerivation.newKeys(password: password, iterations: iterations, hash: .sha1)),
            sha256: convert(try SCRAMKeyDerivation.newKeys(password: password, iterations: iterations, hash: .sha256)))
    } catch {
        throw ValidationError("unusable password: \(error)")
    }
}

/// Every client session and s2s connection is a file descriptor, and a provider whose peers
/// have a certificate per domain needs one connection per domain pair: take the hard limit
/// (`ulimit -Hn`) instead of the usual soft 1,024, as Prosody and ejabberd packaging do.
func raiseDescriptorLimit(logger: Logger) {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
    let before = limit.rlim_cur
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max
        if setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) != 0 { limit.rlim_cur = before }
    }
    logger.info("file descriptors", metadata: ["limit": "\(limit.rlim_cur)", "was": "\(before)"])
}
