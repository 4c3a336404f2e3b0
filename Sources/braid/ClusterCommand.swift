import ArgumentParser
import Cluster
import Foundation
import Logging
import NIOPosix
import Server
import Storage

// MARK: - cluster

/// `braid cluster status`: the nodes of a cluster as the shared database knows them.
struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Inspect a cluster of Braid nodes sharing one PostgreSQL database (docs/cluster.md).",
        subcommands: [Status.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the nodes: alive or not, heartbeat age, address, sessions, s2s links.",
            discussion: "Reads the database named by storage.url; needs no running node. Exit status 1 when any registered node is dead.")

        @OptionGroup var options: ConfigOptions
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let configuration = try options.load()
            guard configuration.storage.backend == .postgresql, let url = configuration.storage.url else {
                throw ValidationError("a cluster needs storage.backend: postgresql and storage.url")
            }
            var logger = Logger(label: "braid.cluster")
            logger.logLevel = .error
            let directory = try ClusterDirectory(settings: try PostgresConnectionSettings(url: url), eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger)
            defer { directory.close() }
            try await directory.prepare()
            let members = try await directory.members()
            let sessions = try await directory.sessions()
            let deadAfter = configuration.cluster.deadAfterSeconds
            var anyDead = false
            struct Row: Encodable {
                var node: String
                var alive: Bool
                var left: Bool
                var address: String
                var heartbeatAgeSeconds: Double
                var upSeconds: Double
                var sessions: Int
                var s2sLinks: Int
            }
            var rows: [Row] = []
            for member in members {
                let alive = member.isAlive(deadAfter: deadAfter)
                if !alive && !member.left { anyDead = true }
                rows.append(Row(node: member.name, alive: alive, left: member.left, address: member.address,
                                heartbeatAgeSeconds: (member.heartbeatAge * 10).rounded() / 10, upSeconds: member.startedSecondsAgo.rounded(),
                                sessions: sessions.filter { $0.node == member.name }.count, s2sLinks: member.links))
            }
            if json {
                let encoder = JSONEncoder()
                encoder.keyEncodingStrategy = .convertToSnakeCase
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(rows), as: UTF8.self))
            } else if rows.isEmpty {
                print("No node has registered in this database.")
            } else {
                print("node                 state   heartbeat  sessions  s2s links  address")
                for row in rows {
                    let state = row.alive ? "alive" : (row.left ? "left" : "DEAD")
                    print("\(row.node.padding(toLength: 20, withPad: " ", startingAt: 0)) \(state.padding(toLength: 7, withPad: " ", startingAt: 0)) \(String(format: "%8.1fs", row.heartbeatAgeSeconds))  \(String(row.sessions).padding(toLength: 8, withPad: " ", startingAt: 0))  \(String(row.s2sLinks).padding(toLength: 9, withPad: " ", startingAt: 0))  \(row.address)")
                }
            }
            if anyDead { throw ExitCode(1) }
        }
    }
}
