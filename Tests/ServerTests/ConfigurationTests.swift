import Foundation
import Testing
import Logging
import NIOPosix
import Storage
@testable import Server

@Suite("Configuration")
struct ConfigurationTests {
    @Test("No file at all gives the embedded defaults")
    func defaults() throws {
        let configuration = try BraidConfiguration.parse(yaml: "")
        #expect(configuration == BraidConfiguration())
        #expect(configuration.dataDirectory == "braid-data")
        #expect(configuration.defaultDomain == "localhost")
        #expect(configuration.c2s.starttlsPort == 5222)
        #expect(configuration.c2s.directTLSPort == 5223)
        #expect(configuration.c2s.requireTLS)
        #expect(configuration.c2s.maxStanzaBytes == 262_144)
        #expect(configuration.c2s.resourceConflict == .replace)
    }

    @Test("A file overrides only what it names")
    func partialFile() throws {
        let configuration = try BraidConfiguration.parse(yaml: """
            data_directory: /var/lib/braid
            c2s:
              starttls_port: 15222
              direct_tls_port: null
              resource_conflict: refuse
            offline:
              max_messages_per_user: 10
            tls:
              certificates:
                - certificate: /etc/braid/example.pem
                  key: /etc/braid/example.key
                  domains: [example.com, chat.example.com]
            """)
        #expect(configuration.dataDirectory == "/var/lib/braid")
        #expect(configuration.c2s.starttlsPort == 15222)
        #expect(configuration.c2s.directTLSPort == nil)
        #expect(configuration.c2s.resourceConflict == .refuse)
        #expect(configuration.c2s.maxStanzaBytes == 262_144)
        #expect(configuration.offline.maxMessagesPerUser == 10)
        #expect(configuration.tls.certificates == [.init(certificate: "/etc/braid/example.pem", key: "/etc/braid/example.key", domains: ["example.com", "chat.example.com"])])
    }

    @Test("Environment variables override the file, by key path")
    func environment() throws {
        let configuration = try BraidConfiguration.parse(
            yaml: "c2s:\n  max_stanza_bytes: 20000\n",
            environment: ["BRAID_C2S_MAX_STANZA_BYTES": "30000", "BRAID_DATA_DIRECTORY": "/tmp/b", "BRAID_C2S_REQUIRE_TLS": "false", "BRAID_LOG_LEVEL": "debug", "UNRELATED": "x"])
        #expect(configuration.c2s.maxStanzaBytes == 30000)
        #expect(configuration.dataDirectory == "/tmp/b")
        #expect(configuration.c2s.requireTLS == false)
        #expect(configuration.logLevel == "debug")
    }

    @Test("Unknown keys and bad values are reported with their path")
    func errors() {
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "c2s:\n  max_stanza_byte: 1\n") }
        do {
            _ = try BraidConfiguration.parse(yaml: "c2s:\n  max_stanza_byte: 1\n")
        } catch {
            #expect("\(error)".contains("c2s.max_stanza_byte"))
        }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "c2s:\n  starttls_port: many\n") }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "c2s:\n  resource_conflict: sometimes\n") }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "- a list\n") }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "x: [unclosed\n") }
    }

    @Test("The shipped example configuration parses and matches the defaults")
    func shippedExample() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("docs/braid.example.yaml").path
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(try BraidConfiguration.parse(yaml: text) == BraidConfiguration())
    }

    @Test("The storage section: SQLite by default, PostgreSQL by URL (from the file or BRAID_STORAGE_URL); bad URLs are refused before anything opens")
    func storageSection() throws {
        #expect(BraidConfiguration().storage.backend == .sqlite)
        let parsed = try BraidConfiguration.parse(yaml: """
            storage:
              backend: postgresql
              url: postgresql://braid@db.example:6432/xmpp?sslmode=require
              pool_size: 4
            """)
        #expect(parsed.storage.backend == .postgresql)
        #expect(parsed.storage.poolSize == 4)
        let settings = try PostgresConnectionSettings(url: try #require(parsed.storage.url))
        #expect(settings.host == "db.example" && settings.port == 6432 && settings.database == "xmpp" && settings.username == "braid")
        #expect(settings.tls == .require)
        let fromEnvironment = try BraidConfiguration.parse(yaml: "", environment: [
            "BRAID_STORAGE_BACKEND": "postgresql", "BRAID_STORAGE_URL": "postgresql://braid:s%40cret@127.0.0.1/braid"])
        let secret = try PostgresConnectionSettings(url: try #require(fromEnvironment.storage.url))
        #expect(secret.password == "s@cret")
        #expect(!secret.redactedDescription.contains("cret"))
        let socket = try PostgresConnectionSettings(url: "postgresql://braid@/braid?host=/run/postgresql")
        #expect(socket.socketDirectory == "/run/postgresql")
        for bad in ["mysql://x/y", "postgresql://h/db?sslmode=sometimes", "postgresql://h/db?application=x"] {
            #expect(throws: PostgresConnectionSettings.Invalid.self) { try PostgresConnectionSettings(url: bad) }
        }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "storage:\n  backend: oracle\n") }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "storage:\n  urls: x\n") }
        var missingURL = StorageSettings()
        missingURL.backend = .postgresql
        #expect(throws: PostgresConnectionSettings.Invalid.self) {
            _ = try missingURL.open(dataDirectory: "/nonexistent", logger: Logger(label: "test"), eventLoopGroup: MultiThreadedEventLoopGroup.singleton)
        }
    }

    @Test("Per-peer settings and POSH overrides are keyed by names the operator chooses")
    func peerMappings() throws {
        let yaml = """
        s2s:
          peers:
            example.org:
              host: 10.0.0.1
              port: 5270
              direct_tls: true
              require_certificates: true
          posh_connect_overrides:
            example.org: 127.0.0.1:8443
        """
        let configuration = try BraidConfiguration.parse(yaml: yaml)
        #expect(configuration.s2s.peers["example.org"] == .init(requireCertificates: true, host: "10.0.0.1", port: 5270, directTLS: true))
        #expect(configuration.s2s.poshConnectOverrides == ["example.org": "127.0.0.1:8443"])
        // A misspelt setting inside a peer entry is still caught.
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "s2s:\n  peers:\n    example.org:\n      hots: x\n") }
    }

    @Test("Trust pins: per peer with allowed proofs, and per provider by pattern or host; unknown keys and bad proofs refused")
    func trustPins() throws {
        let yaml = """
        s2s:
          peers:
            partner.example:
              trust_anchor_files: [/etc/braid/partner-ca.pem]
              allowed_proofs: [dane]
          provider_trust:
            - domains: ["*.hosted.example", hosted.example]
              targets: [xmpp.hosted.example]
              trust_anchor_files: [/etc/braid/hosted-ca.pem]
              allowed_proofs: [dialback, posh]
        """
        let configuration = try BraidConfiguration.parse(yaml: yaml)
        #expect(configuration.s2s.peers["partner.example"]?.allowedProofs == [.dane])
        #expect(configuration.s2s.providerTrust == [.init(domains: ["*.hosted.example", "hosted.example"], targets: ["xmpp.hosted.example"],
                                                          trustAnchorFiles: ["/etc/braid/hosted-ca.pem"], allowedProofs: [.dialback, .posh])])
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "s2s:\n  provider_trust:\n    - domains: [x.example]\n      trust_anchors: [a.pem]\n") }
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "s2s:\n  provider_trust:\n    - domains: [x.example]\n      allowed_proofs: [telepathy]\n") }
    }

    @Test("The config file is found by --config, then BRAID_CONFIG")
    func location() {
        #expect(BraidConfiguration.locateFile(explicit: "/x.yaml", environment: ["BRAID_CONFIG": "/y.yaml"]) == "/x.yaml")
        #expect(BraidConfiguration.locateFile(explicit: nil, environment: ["BRAID_CONFIG": "/y.yaml"]) == "/y.yaml")
    }
}
