@testable import Cluster
@testable import Federation
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOPosix
import Storage
import Testing
import TestSupport
import Trust
import XMPPCore
import XMPPStream
@testable import Server

/// Several Braid nodes of one provider on one PostgreSQL database (issue 18): sessions on
/// different nodes reach each other over the node links, a resource is bound once in the
/// whole cluster, and a node that dies takes nothing with it that was handed to it.
@Suite("Cluster: nodes on one database", .serialized, .postgresServer)
struct ClusterTests {
    /// Certificates for node links: one CA, one certificate per node.
    struct NodeCertificates {
        let directory: String
        let caFile: String

        init() throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-cluster-\(UUID().uuidString)").path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let ca = try TestCertificateAuthority(commonName: "Braid Cluster Test CA")
            caFile = "\(directory)/ca.pem"
            try ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
            self.ca = ca
        }

        private let ca: TestCertificateAuthority

        func files(for node: String) throws -> (certificate: String, key: String) {
            let credentials = try ca.issue(commonName: node, dnsIDs: ["\(node).cluster.invalid"])
            let files = (certificate: "\(directory)/\(node).crt", key: "\(directory)/\(node).key")
            try credentials.write(certificatePath: files.certificate, keyPath: files.key)
            return files
        }
    }

    static let users = ["alice@a.example", "bob@b.example", "carol@a.example"]

    /// Starts `count` nodes on one fresh database; node 1 creates the accounts.
    func withCluster(nodes count: Int = 2, deadAfter: Double = 2, certificates given: NodeCertificates? = nil,
                     _ body: ([TestServer]) async throws -> Void) async throws {
        let url = try await #require(PostgresTestServer.current).createDatabase()
        let certificates = try given ?? NodeCertificates()
        var nodes: [TestServer] = []
        do {
            for index in 1...count {
                let name = "node-\(index)"
                let files = try certificates.files(for: name)
                let node = try await TestServer.start(users: index == 1 ? Self.users : []) {
                    $0.storage.backend = .postgresql
                    $0.storage.url = url
                    // Opening storage migrates a fresh database; with every suite starting its
                    // own PostgreSQL at once on 2 cores, 10 s was once not enough (Scripts/test,
                    // run 5 of 5).
                    $0.storage.connectTimeoutSeconds = 30
                    $0.cluster.enabled = true
                    $0.cluster.nodeName = name
                    $0.cluster.listen = "127.0.0.1:0"
                    $0.cluster.tlsCertificateFile = files.certificate
                    $0.cluster.tlsKeyFile = files.key
                    $0.cluster.tlsCAFile = certificates.caFile
                    $0.cluster.heartbeatIntervalSeconds = 0.2
                    $0.cluster.deadAfterSeconds = deadAfter
                }
                nodes.append(node)
            }
            // Every node sees every other as alive, with a node link up.
            for node in nodes {
                let cluster = try #require(node.server.cluster)
                try await waitUntil(timeout: .seconds(10), "\(cluster.nodeName) linked to every other node") {
                    cluster.aliveNodes.count == count && cluster.linkStatus.filter(\.connected).count == count - 1
                }
            }
            try await body(nodes)
        } catch {
            for node in nodes { await node.stop() }
            try? FileManager.default.removeItem(atPath: certificates.directory)
            throw error
        }
        for node in nodes { await node.stop() }
        try? FileManager.default.removeItem(atPath: certificates.directory)
    }

    @Test("Messages and presence reach sessions on another node, to the full and to the bare JID")
    func acrossNodes() async throws {
        try await withCluster { nodes in
            let (alice, aliceJID) = try await nodes[0].loggedIn("alice@a.example", resource: "laptop")
            let (bob, bobJID) = try await nodes[1].loggedIn("bob@b.example", resource: "phone")
            try await bob.sendPresence(priority: 5)
            // Node 1 learns of Bob's session and its presence through the node link.
            try await waitUntil(timeout: .seconds(5), "bob's available session known on node 1") {
                nodes[0].context.sessions.entry(for: bobJID)?.isAvailable == true
            }
            #expect(nodes[0].context.sessions.entry(for: bobJID)?.session.remote?.node == "node-2")
            #expect(nodes[0].context.sessions.entry(for: bobJID)?.priority == 5)
            #expect(nodes[0].context.sessions.count == 1, "a stand-in is not a session of this node")

            try await alice.sendMessage(to: bobJID.description, body: "to your phone", id: "full")
            let full = try await bob.waitFor { $0.attribute("id") == "full" }
            #expect(full.attribute("from") == aliceJID.description)
            try await alice.sendMessage(to: "bob@b.example", body: "to you", id: "bare")
            let bare = try await bob.waitFor { $0.attribute("id") == "bare" }
            #expect(bare.body == "to you")

            // And back, with directed presence to the full JID.
            try await bob.sendMessage(to: aliceJID.description, body: "got both", id: "reply")
            let reply = try await alice.waitFor { $0.attribute("id") == "reply" }
            #expect(reply.attribute("from") == bobJID.description)
            try await bob.sendPresence(to: aliceJID.description)
            let presence = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == bobJID.description }
            #expect(presence.attribute("type") == nil)

            // The session directory in the database says where each session is.
            let directory = try #require(nodes[0].server.cluster).directory
            let rows = try await directory.sessions()
            #expect(rows.contains { $0.jid == aliceJID.description && $0.node == "node-1" })
            #expect(rows.contains { $0.jid == bobJID.description && $0.node == "node-2" })

            // Bob leaves: node 1 forgets him, and a message to him is stored for later.
            await bob.close()
            try await waitUntil(timeout: .seconds(5), "bob's session gone from node 1") {
                nodes[0].context.sessions.entry(for: bobJID) == nil
            }
            try await alice.sendMessage(to: "bob@b.example", body: "while you were out", id: "offline")
            try await waitUntil(timeout: .seconds(5)) { try await nodes[0].context.storage.offlineMessageCount(for: bobJID.bare) == 1 }
            await alice.close()
        }
    }

    @Test("A resource bound on a second node replaces the session on the first (conflict)")
    func resourceConflictAcrossNodes() async throws {
        try await withCluster { nodes in
            let (first, jid) = try await nodes[0].loggedIn("carol@a.example", resource: "desk")
            try await waitUntil(timeout: .seconds(5), "carol known on node 2") { nodes[1].context.sessions.entry(for: jid) != nil }
            let (second, secondJID) = try await nodes[1].loggedIn("carol@a.example", resource: "desk")
            #expect(secondJID == jid)
            #expect(try await first.streamErrorCondition() == .conflict)
            try await waitUntil(timeout: .seconds(5), "node 1 routes carol/desk to node 2") {
                nodes[0].context.sessions.entry(for: jid)?.session.remote?.node == "node-2"
            }
            // The surviving session still gets what is sent to the full JID from node 1.
            let (alice, _) = try await nodes[0].loggedIn("alice@a.example")
            try await alice.sendMessage(to: jid.description, body: "still there?", id: "after")
            _ = try await second.waitFor { $0.attribute("id") == "after" }
            await alice.close()
            await second.close()
            await first.close()
        }
    }

    @Test("XEP-0198: a session dropped on node 1 is resumed on node 2, with what it had not acknowledged, and stays reachable")
    func resumeOnAnotherNode() async throws {
        try await withCluster { nodes in
            let (alice, aliceJID) = try await nodes[0].loggedIn("alice@a.example", resource: "mobile")
            try await alice.send(XMLElement(name: "enable", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("resume", "true")]))
            let id = try #require(try await alice.waitFor { $0.name == "enabled" }.attribute("id"))
            try await alice.sendPresence(priority: 3)
            try await alice.send(XMLElement(name: "r", namespace: XMLNamespace.streamManagement))
            #expect(try await alice.waitFor { $0.name == "a" }.attribute("h") == "1")

            // Bob is on node 2; what he sends before and after the drop waits in node 1's
            // session, unacknowledged.
            let (bob, _) = try await nodes[1].loggedIn("bob@b.example")
            try await waitUntil(timeout: .seconds(5), "alice known on node 2") { nodes[1].context.sessions.entry(for: aliceJID)?.isAvailable == true }
            try await bob.sendMessage(to: aliceJID.description, body: "before the drop")
            _ = try await alice.waitFor { $0.name == "message" }
            try await alice.channel.close()
            try await waitUntil { nodes[0].metrics.counterValue("braid_sm_awaiting_resumption_total") == 1 }
            for index in 1...2 {
                try await bob.sendMessage(to: aliceJID.description, body: "while away \(index)")
            }
            try await bob.roundTrip()

            // The client comes back through node 2.
            let again = try await nodes[1].authenticatedWithoutBind("alice@a.example")
            try await again.send(XMLElement(name: "resume", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("previd", id), XMLAttribute("h", "0")]))
            let resumed = try await again.waitFor { $0.name == "resumed" || $0.name == "failed" }
            #expect(resumed.name == "resumed")
            #expect(resumed.attribute("h") == "1")
            var bodies: [String] = []
            while bodies.count < 3 {
                bodies.append(try await again.waitFor { $0.name == "message" }.body ?? "")
            }
            #expect(bodies == ["before the drop", "while away 1", "while away 2"])
            #expect(nodes[1].metrics.counterValue("braid_sm_resumed_total") == 1)
            // Now held by node 2, with its presence; node 1 routes to it there, and stored
            // nothing offline on the way.
            #expect(nodes[1].context.sessions.entry(for: aliceJID)?.session.remote == nil)
            #expect(nodes[1].context.sessions.entry(for: aliceJID)?.priority == 3)
            try await waitUntil(timeout: .seconds(5), "node 1 routes alice/mobile to node 2") {
                nodes[0].context.sessions.entry(for: aliceJID)?.session.remote?.node == "node-2"
            }
            #expect(try await nodes[0].context.storage.offlineMessageCount(for: aliceJID.bare) == 0)
            try await bob.sendMessage(to: "alice@a.example", body: "after", id: "after")
            _ = try await again.waitFor { $0.attribute("id") == "after" }

            // A session id no node holds gets <failed/> (item-not-found), as on one node.
            let stranger = try await nodes[1].authenticatedWithoutBind("alice@a.example")
            try await stranger.send(XMLElement(name: "resume", namespace: XMLNamespace.streamManagement, attributes: [XMLAttribute("previd", "no-such-session"), XMLAttribute("h", "0")]))
            #expect(try await stranger.waitFor { $0.name == "resumed" || $0.name == "failed" }.name == "failed")
            await stranger.close()
            await again.close()
            await bob.close()
        }
    }

    @Test("Bad input on a node link (a malformed frame, a stream without hello) ends that stream, is counted, and leaves the other nodes' traffic alone")
    func badNodeLinkInput() async throws {
        let certificates = try NodeCertificates()
        try await withCluster(certificates: certificates) { nodes in
            let (alice, _) = try await nodes[0].loggedIn("alice@a.example")
            let (bob, bobJID) = try await nodes[1].loggedIn("bob@b.example")
            try await waitUntil(timeout: .seconds(5), "bob known on node 1") { nodes[0].context.sessions.entry(for: bobJID) != nil }
            let cluster1 = try #require(nodes[0].server.cluster)
            let port = try #require(cluster1.boundPort)
            // A holder of a certificate from the cluster's CA, as a broken node would be.
            let rogue = try certificates.files(for: "rogue")
            struct Raw: MessageSerializer {
                func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
            }
            for frame in [[UInt8]([99, 1, 2]), NodeFrameCodec.encode(.ack(1))] {
                let transport = try HTTP2ClientTransport.Posix(
                    target: .ipv4(address: "127.0.0.1", port: port),
                    transportSecurity: .mTLS(certificateChain: [.file(path: rogue.certificate, format: .pem)], privateKey: .file(path: rogue.key, format: .pem)) {
                        $0.trustRoots = .certificates([.file(path: nodes[0].server.configuration.cluster.tlsCAFile, format: .pem)])
                        $0.serverCertificateVerification = .noHostnameVerification
                    })
                let before = nodes[0].metrics.counterValue("braid_cluster_node_link_errors_total")
                try? await withGRPCClient(transport: transport) { client in
                    let request = StreamingClientRequest<[UInt8]> { writer in try await writer.write(frame) }
                    try await client.bidirectionalStreaming(request: request, descriptor: NodeLinkRPC.method, serializer: Raw(),
                                                            deserializer: NodeLinkRPC.Deserializer(), options: .defaults) { response in
                        for try await _ in response.messages {}
                    }
                }
                try await waitUntil(timeout: .seconds(5), "the bad stream counted") {
                    nodes[0].metrics.counterValue("braid_cluster_node_link_errors_total") == before + 1
                }
            }
            // The real nodes' link and sessions are untouched.
            #expect(cluster1.linkStatus.filter(\.connected).map(\.peer) == ["node-2"])
            try await alice.sendMessage(to: bobJID.description, body: "still fine", id: "fine")
            _ = try await bob.waitFor { $0.attribute("id") == "fine" }
            await alice.close()
            await bob.close()
        }
        try? FileManager.default.removeItem(atPath: certificates.directory)
    }

    @Test("A message to a bare JID that went to resources on two nodes: the copy lost with one node is not delivered to the other resource again")
    func copyLostWithNodeIsNotDuplicated() async throws {
        try await withCluster(deadAfter: 1.5) { nodes in
            let (mobile, mobileJID) = try await nodes[0].loggedIn("alice@a.example", resource: "mobile")
            let (desk, deskJID) = try await nodes[1].loggedIn("alice@a.example", resource: "desk")
            try await mobile.sendPresence()
            try await desk.sendPresence()
            try await waitUntil(timeout: .seconds(5), "both resources available on node 1") {
                nodes[0].context.sessions.entry(for: deskJID)?.isAvailable == true && nodes[0].context.sessions.entry(for: mobileJID)?.isAvailable == true
            }
            let (bob, _) = try await nodes[0].loggedIn("bob@b.example")
            // Node 2 stops answering; the copy for the desk waits in node 1's link to it.
            try #require(nodes[1].server.cluster).stopAbruptly()
            try await waitUntil(timeout: .seconds(5), "node 1 sees the link down") {
                try #require(nodes[0].server.cluster).linkStatus.allSatisfy { !$0.connected }
            }
            try await bob.sendMessage(to: "alice@a.example", body: "to both", id: "both")
            _ = try await mobile.waitFor { $0.attribute("id") == "both" }
            try await waitUntil(timeout: .seconds(10), "node 2 counted dead, its copy not delivered again") {
                nodes[0].metrics.counterValue("braid_cluster_copies_not_redelivered_total") == 1
            }
            // A marker after it: had the copy been routed again, it would have come first.
            try await bob.sendMessage(to: "alice@a.example", body: "marker", id: "marker")
            let next = try await mobile.waitFor { $0.name == "message" }
            #expect(next.attribute("id") == "marker")
            #expect(try await nodes[0].context.storage.offlineMessageCount(for: mobileJID.bare) == 0)
            await bob.close()
            await mobile.close()
            await desk.close()
        }
    }

    @Test("The database away for longer than dead_after: nobody is counted dead, and messages cross nodes afterwards")
    func databaseRestart() async throws {
        try await withCluster(deadAfter: 1.5) { nodes in
            let database = try #require(PostgresTestServer.current)
            let (alice, aliceJID) = try await nodes[0].loggedIn("alice@a.example")
            let (bob, bobJID) = try await nodes[1].loggedIn("bob@b.example")
            try await waitUntil(timeout: .seconds(5), "each known on the other node") {
                nodes[0].context.sessions.entry(for: bobJID) != nil && nodes[1].context.sessions.entry(for: aliceJID) != nil
            }
            await database.stopServer()
            // Longer than dead_after without a heartbeat: failed checks on each node (each
            // fails at once, or after the storage's operation timeout).
            do {
                for node in nodes {
                    try await waitUntil(timeout: .seconds(40), "membership checks failing") {
                        node.metrics.counterValue("braid_cluster_database_failures_total") >= 2
                    }
                }
            } catch {
                try await database.restart()
                throw error
            }
            let checksBefore = nodes.map { $0.metrics.counterValue("braid_cluster_membership_checks_total") }
            try await database.restart()
            // Well past one dead_after of successful checks after the database is back.
            for (index, node) in nodes.enumerated() {
                try await waitUntil(timeout: .seconds(30), "membership checks succeeding again") {
                    node.metrics.counterValue("braid_cluster_membership_checks_total") >= checksBefore[index] + 12
                }
            }
            for node in nodes {
                #expect(node.metrics.counterValue("braid_cluster_nodes_gone_total") == 0, "nobody counted dead on stale heartbeats")
            }
            try await alice.sendMessage(to: bobJID.description, body: "after the restart", id: "after")
            _ = try await bob.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "after" }
            try await bob.sendMessage(to: aliceJID.description, body: "got it", id: "back")
            _ = try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "back" }
            await alice.close()
            await bob.close()
        }
    }

    @Test("A database connection that stops answering without closing: the call fails at its deadline, and the next one connects afresh")
    func unansweringDatabaseConnection() async throws {
        let database = try #require(PostgresTestServer.current)
        let url = try await database.createDatabase()
        var settings = try PostgresConnectionSettings(url: url)
        settings.operationTimeout = .seconds(1)
        let directory = try ClusterDirectory(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "test.cluster"))
        defer { directory.close() }
        try await directory.prepare()
        try await directory.register(node: "node-1", address: "127.0.0.1:1", incarnation: 1)
        #expect(try await directory.heartbeat(node: "node-1", incarnation: 1, sessions: 0))
        // Every server process of this database's connections stopped (SIGSTOP): the TCP
        // connections stay open and nothing answers, as when the database host drops off the
        // network. postgres-nio cannot cancel a query in flight on such a connection.
        let name = try #require(url.split(separator: "/").last?.split(separator: "?").first.map(String.init))
        let query = try await ChildProcess.run("/usr/bin/psql", ["-h", "127.0.0.1", "-p", "\(database.port)", "-U", "postgres", "-At", "-c",
                                                                 "SELECT pid FROM pg_stat_activity WHERE datname = '\(name)' AND backend_type = 'client backend'"],
                                               outputPath: "\(database.directory)/psql-stuck-\(name).log", timeout: .seconds(30))
        let stopped = query.output.split(whereSeparator: \.isNewline).compactMap { Int32($0.trimmingCharacters(in: .whitespaces)) }
        try #require(query.exitCode == 0 && !stopped.isEmpty, "the directory's server processes: \(query.output)")
        for pid in stopped { kill(pid, SIGSTOP) }
        defer { for pid in stopped { kill(pid, SIGCONT) } }
        // Each call bounded by the operation timeout, though the query never ends; a call
        // that meets a stuck connection has the pool replaced, so within a few calls one
        // reaches a fresh server process.
        let clock = ContinuousClock()
        var failures = 0
        var answered = false
        for _ in 0..<6 where !answered {
            let started = clock.now
            do {
                answered = try await directory.heartbeat(node: "node-1", incarnation: 1, sessions: 0)
            } catch {
                #expect(error is DeadlineExceeded, "\(error)")
                failures += 1
            }
            #expect(clock.now - started < .seconds(10), "a call ends at its deadline, not with the stuck query")
        }
        #expect(failures >= 1, "the stuck connection was met")
        #expect(answered, "the directory answers again on new connections while the old ones stay stuck")
    }

    @Test("A new numbering of frames from the same run of a node is not taken for frames already handled")
    func newNumberingIsNotDuplicate() {
        let link = NodeLink(peer: "node-2", maximumQueued: 10)
        #expect(link.peerIs(incarnation: 7, numbering: 100) == false)
        #expect(link.receiving(1) == .handle)
        link.handled(1)
        #expect(link.receiving(2) == .handle)
        link.handled(2)
        #expect(link.receiving(2) == .duplicate, "sent again after a reconnect")
        // The other node counted this one gone and linked again: numbering from 1 anew.
        #expect(link.peerIs(incarnation: 7, numbering: 101) == false)
        #expect(link.receiving(1) == .handle)
        // A restart is a new run.
        #expect(link.peerIs(incarnation: 8, numbering: 102) == true)
    }

    @Test("An archived message is held after its ack until the sender lets it go, in order, and only once")
    func archivedDeliveriesWaitForRelease() {
        let sender = NodeLink(peer: "node-2", maximumQueued: 10)
        #expect(sender.send { .deliver(seq: $0, to: "a@b/c", stanza: "<presence/>") } == .queued)
        #expect(sender.acknowledged(1) == false, "no archived message among them: nothing to release")
        #expect(sender.send { .deliverArchived(seq: $0, to: "a@b/c", stanza: "<message id='2'/>") } == .queued)
        #expect(sender.send { .deliverArchived(seq: $0, to: "a@b/c", stanza: "<message id='3'/>") } == .queued)
        #expect(sender.acknowledged(2) == true)
        #expect(sender.snapshot.unacknowledged == 1)

        let receiver = NodeLink(peer: "node-1", maximumQueued: 10)
        receiver.hold(2, to: "a@b/c", stanza: "<message id='2'/>")
        receiver.hold(3, to: "a@b/c", stanza: "<message id='3'/>")
        #expect(receiver.takeHeld(upTo: 1).isEmpty)
        #expect(receiver.takeHeld(upTo: 2).map(\.stanza) == ["<message id='2'/>"])
        #expect(receiver.takeHeld().map(\.stanza) == ["<message id='3'/>"], "the rest at the end of the stream")
        #expect(receiver.takeHeld().isEmpty, "never twice")
    }

    @Test("Only a message stamped by the recipient's archive is sent to be held")
    func archivedMeansStampedForTheRecipient() throws {
        let bob = try JID("bob@b.example/phone")
        func message(by: String) throws -> XMLElement {
            try XMLFragment.parse("<message xmlns='jabber:client' to='bob@b.example'><body>hi</body><stanza-id xmlns='urn:xmpp:sid:0' id='x' by='\(by)'/></message>")
        }
        #expect(ClusterBridge.NodeSessionLink.isArchived(try message(by: "bob@b.example"), for: bob))
        #expect(!ClusterBridge.NodeSessionLink.isArchived(try message(by: "room@conference.b.example"), for: bob))
        #expect(!ClusterBridge.NodeSessionLink.isArchived(try XMLFragment.parse("<message xmlns='jabber:client'><body>hi</body></message>"), for: bob))
        #expect(!ClusterBridge.NodeSessionLink.isArchived(try XMLFragment.parse("<presence xmlns='jabber:client'><stanza-id xmlns='urn:xmpp:sid:0' id='x' by='bob@b.example'/></presence>"), for: bob))
    }

    @Test("A node that dies: the others drop its sessions and store what it never acknowledged")
    func nodeDies() async throws {
        try await withCluster(deadAfter: 1.5) { nodes in
            let (alice, _) = try await nodes[0].loggedIn("alice@a.example")
            let (bob, bobJID) = try await nodes[1].loggedIn("bob@b.example")
            try await bob.sendPresence()
            try await waitUntil(timeout: .seconds(5), "bob available on node 1") { nodes[0].context.sessions.entry(for: bobJID)?.isAvailable == true }
            let started = ContinuousClock.now
            // Node 2 stops as a crash would look: no heartbeat, no goodbye, links cut.
            try #require(nodes[1].server.cluster).stopAbruptly()
            try await waitUntil(timeout: .seconds(5), "node 1 sees the link down") {
                try #require(nodes[0].server.cluster).linkStatus.allSatisfy { !$0.connected }
            }
            // Sent while node 2 is unreachable but not yet counted dead: queued for it.
            try await alice.sendMessage(to: "bob@b.example", body: "are you there?", id: "in-flight")
            try await waitUntil(timeout: .seconds(10), "node 2 counted dead by node 1") {
                nodes[0].context.sessions.entry(for: bobJID) == nil
            }
            let detected = ContinuousClock.now - started
            #expect(detected < .seconds(6), "dead within a few heartbeats of dead_after (took \(detected))")
            // Never acknowledged by node 2, so stored offline here rather than lost.
            try await waitUntil(timeout: .seconds(5), "the in-flight message stored offline") {
                try await nodes[0].context.storage.offlineMessageCount(for: bobJID.bare) == 1
            }
            #expect(try #require(nodes[0].server.cluster).aliveNodes == ["node-1"])
            await alice.close()
            await bob.close()
        }
    }

    @Test("A group chat room lives on one node: occupants on both nodes see each other and the room's messages")
    func roomAcrossNodes() async throws {
        try await withCluster { nodes in
            let muc = "http://jabber.org/protocol/muc"
            // A room whose owner is node 2, entered from node 1 first, so the stanzas of
            // node 1's client must be routed to node 2 to reach it.
            let cluster1 = try #require(nodes[0].server.cluster)
            let room = try #require((1...200).lazy.map { "room\($0)@conference.a.example" }.first { cluster1.owner(of: $0) == "node-2" })
            let (alice, _) = try await nodes[0].loggedIn("alice@a.example")
            let (bob, _) = try await nodes[1].loggedIn("bob@b.example")
            func enter(_ client: TestClient, _ nick: String) async throws {
                try await client.send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: [XMLAttribute("to", "\(room)/\(nick)")], children: [
                    .element(XMLElement(name: "x", namespace: muc)),
                ]))
            }
            try await enter(alice, "alice")
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/alice" }
            let accepted = try await alice.iq(.set, to: room, payload: XMLElement(name: "query", namespace: "\(muc)#owner", children: [
                .element(XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "submit")])),
            ]))
            #expect(accepted.attribute("type") == "result")
            try await enter(bob, "bob")
            _ = try await bob.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/alice" }
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == "\(room)/bob" }
            try await alice.send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("to", room), XMLAttribute("type", "groupchat"), XMLAttribute("id", "hello-room"),
            ], children: [.element(XMLElement(name: "body", namespace: XMLNamespace.client, children: [.text("hello room")]))]))
            let atBob = try await bob.waitFor { $0.name == "message" && $0.attribute("id") == "hello-room" }
            #expect(atBob.attribute("from") == "\(room)/alice")
            _ = try await alice.waitFor { $0.name == "message" && $0.attribute("id") == "hello-room" }
            // One room, on its owner: node 1's group chat service never saw it.
            #expect(nodes[0].metrics.counterValue("braid_cluster_stanzas_forwarded_total") > 0)
            await alice.close()
            await bob.close()
        }
    }

    @Test("Federation from a cluster: one connection to the peer provider, whichever node a user is on; the lease moves when its holder dies")
    func federationThroughLeaseHolder() async throws {
        let url = try await #require(PostgresTestServer.current).createDatabase()
        let certificates = try NodeCertificates()
        defer { try? FileManager.default.removeItem(atPath: certificates.directory) }
        // Both providers' certificates from one test CA, naming every served name.
        var builder = ModuleBuilder()
        for module in StandardModules.all() { builder.add(module) }
        let labels = try builder.freeze().serviceLabels.sorted()
        func served(_ domain: String) -> [String] { [domain] + labels.map { "\($0).\(domain)" } }
        let ca = try TestCertificateAuthority(commonName: "Braid Federation Test CA")
        let caFile = "\(certificates.directory)/federation-ca.pem"
        try ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
        func certificateFiles(_ domain: String) throws -> BraidConfiguration.CertificateFiles {
            let files = BraidConfiguration.CertificateFiles(certificate: "\(certificates.directory)/\(domain).crt", key: "\(certificates.directory)/\(domain).key", domains: served(domain))
            try ca.issueXMPPServerCertificate(domains: served(domain)).write(certificatePath: files.certificate, keyPath: files.key)
            return files
        }
        let aFiles = try certificateFiles("a.example")
        let bFiles = try certificateFiles("b.example")
        // Provider A's nodes share one s2s port on loopback: only the lease holder binds it,
        // as only the holder answers at the SRV targets a provider publishes for its nodes.
        let aPort = try LoopbackPorts.freePort()
        let bPort = try LoopbackPorts.freePort()
        func federate(_ configuration: inout BraidConfiguration, port: Int, files: BraidConfiguration.CertificateFiles, peer: String, peerPort: Int) {
            configuration.federateOnLoopback(port: port, certificates: [files], caFile: caFile, peers: served(peer), peerPort: peerPort)
        }
        var servers: [TestServer] = []
        do {
            for index in 1...2 {
                let files = try certificates.files(for: "node-\(index)")
                servers.append(try await TestServer.start(domains: ["a.example"], users: index == 1 ? ["alice@a.example", "carol@a.example"] : []) {
                    federate(&$0, port: aPort, files: aFiles, peer: "b.example", peerPort: bPort)
                    $0.storage.backend = .postgresql
                    $0.storage.url = url
                    // Opening storage migrates a fresh database; with every suite starting its
                    // own PostgreSQL at once on 2 cores, 10 s was once not enough (Scripts/test,
                    // run 5 of 5).
                    $0.storage.connectTimeoutSeconds = 30
                    $0.cluster.enabled = true
                    $0.cluster.nodeName = "node-\(index)"
                    $0.cluster.listen = "127.0.0.1:0"
                    $0.cluster.tlsCertificateFile = files.certificate
                    $0.cluster.tlsKeyFile = files.key
                    $0.cluster.tlsCAFile = certificates.caFile
                    $0.cluster.heartbeatIntervalSeconds = 0.2
                    $0.cluster.deadAfterSeconds = 1.5
                })
            }
            servers.append(try await TestServer.start(domains: ["b.example"], users: ["bob@b.example"]) {
                federate(&$0, port: bPort, files: bFiles, peer: "a.example", peerPort: aPort)
            })
            let a = Array(servers[0...1])
            let b = servers[2]
            for node in a {
                let cluster = try #require(node.server.cluster)
                try await waitUntil(timeout: .seconds(10), "\(cluster.nodeName) linked") { cluster.linkStatus.filter(\.connected).count == 1 }
            }
            let holderIndex = try #require(a.firstIndex { $0.server.cluster?.holdsFederationLease == true })
            let holder = a[holderIndex]
            let other = a[1 - holderIndex]
            #expect(other.server.cluster?.holdsFederationLease == false)
            #expect(holder.server.federation?.isListening == true)
            #expect(other.server.federation?.isListening == false, "only the lease holder listens")
            // One dialback secret for the cluster: a key either node issues verifies on both.
            let keyOnHolder = try #require(holder.server.federation).keys.key(receiving: "b.example", originating: "a.example", streamID: "s1")
            let keyOnOther = try #require(other.server.federation).keys.key(receiving: "b.example", originating: "a.example", streamID: "s1")
            #expect(keyOnHolder == keyOnOther)

            // One user of A on each node, and Bob on B.
            let (alice, aliceJID) = try await holder.loggedIn("alice@a.example")
            let (carol, carolJID) = try await other.loggedIn("carol@a.example")
            let (bob, bobJID) = try await b.loggedIn("bob@b.example")
            try await waitUntil(timeout: .seconds(5), "carol known on the holder") { holder.context.sessions.entry(for: carolJID) != nil }
            try await alice.sendMessage(to: bobJID.description, body: "from the holder", id: "a1")
            try await carol.sendMessage(to: bobJID.description, body: "from the other node", id: "c1")
            _ = try await bob.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "a1" }
            _ = try await bob.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "c1" }
            try await bob.sendMessage(to: aliceJID.description, body: "hi alice", id: "b1")
            try await bob.sendMessage(to: carolJID.description, body: "hi carol", id: "b2")
            _ = try await alice.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "b1" }
            _ = try await carol.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "b2" }
            // The other node kept Carol's message until the holder said B had it (B's
            // XEP-0198 acknowledgement): nothing waits now.
            let otherCluster = try #require(other.server.cluster)
            try await waitUntil(timeout: .seconds(10), "the holder confirmed B has carol's message") {
                otherCluster.linkStatus.allSatisfy { $0.unacknowledged == 0 }
            }
            // Exactly one connection between the providers, held by the lease holder.
            let bFederation = try #require(b.server.federation)
            try await waitUntil(timeout: .seconds(10), "one link between A and B") {
                let links = await bFederation.links.count
                let holderLinks = await holder.server.federation?.links.count ?? -1
                let otherLinks = await other.server.federation?.links.count ?? -1
                return links == 1 && holderLinks == 1 && otherLinks == 0
            }

            // What `braid cluster status` reads: the holder's heartbeat row counts its link.
            let holderCluster = try #require(holder.server.cluster)
            try await waitUntil(timeout: .seconds(5), "the holder's row counts one s2s link") {
                let members = try await holderCluster.directory.members()
                return members.first { $0.name == holderCluster.nodeName }?.links == 1 && members.first { $0.name != holderCluster.nodeName }?.links == 0
            }

            // The holder dies (no goodbye, its links and listener gone): within the lease's
            // lifetime the other node holds it, listens, and Carol reaches Bob again.
            try #require(holder.server.cluster).stopAbruptly()
            await holder.server.federation?.shutdown()
            try await waitUntil(timeout: .seconds(10), "the other node holds the lease and listens") {
                other.server.cluster?.holdsFederationLease == true && other.server.federation?.isListening == true
            }
            try await carol.sendMessage(to: bobJID.description, body: "after the failover", id: "c2")
            _ = try await bob.waitFor(timeout: .seconds(15)) { $0.attribute("id") == "c2" }
            try await bob.sendMessage(to: carolJID.description, body: "still here", id: "b3")
            _ = try await carol.waitFor(timeout: .seconds(10)) { $0.attribute("id") == "b3" }
            try await waitUntil(timeout: .seconds(10), "one link between A and B after the failover") {
                let links = await bFederation.links.count
                let otherLinks = await other.server.federation?.links.count ?? -1
                return links == 1 && otherLinks == 1
            }
            await alice.close()
            await carol.close()
            await bob.close()
        } catch {
            for server in servers { await server.stop() }
            throw error
        }
        for server in servers { await server.stop() }
    }

    @Test("Owners of service entities: every node computes the same, and a node leaving moves only its own keys")
    func rendezvousOwners() {
        let keys = (0..<2_000).map { "room\($0)@conference.example" }
        let three = ["node-1", "node-2", "node-3"]
        let owners = keys.map { ClusterService.rendezvousOwner(of: $0, among: three) }
        // Spread over all three, roughly evenly.
        for node in three {
            let share = owners.filter { $0 == node }.count
            #expect(share > 500 && share < 830, "\(node) owns \(share) of 2,000")
        }
        // The same answer whatever order the nodes are listed in.
        #expect(keys.map { ClusterService.rendezvousOwner(of: $0, among: three.reversed()) } == owners)
        // node-3 gone: its keys move, no other key does.
        let two = keys.map { ClusterService.rendezvousOwner(of: $0, among: ["node-1", "node-2"]) }
        for (before, after) in zip(owners, two) where before != "node-3" {
            #expect(before == after)
        }
    }

    @Test("Node frames: every kind round-trips, and malformed input is refused, not trapped on")
    func frameCodec() throws {
        let frames: [NodeFrame] = [
            .hello(node: "node-ä", incarnation: 1_765_000_000_000, numbering: UInt64.max),
            .deliver(seq: 1, to: "bob@b.example/phone", stanza: "<message xmlns='jabber:client'><body>hi</body></message>"),
            .session(seq: 2, SessionRecord(jid: "a@b/c", boundAt: -5, presence: "<presence/>", priority: -128, interestedInRoster: true, carbons: false)),
            .session(seq: UInt64.max, SessionRecord(jid: "a@b/c", boundAt: Int64.max, presence: nil, priority: 127, interestedInRoster: false, carbons: true)),
            .unbound(seq: 3, jid: "a@b/c"),
            .kick(seq: 4, jid: "a@b/c"),
            .ack(5),
            .route(seq: 6, stanza: "<presence xmlns='jabber:client' to='room@conference.a.example/nick'/>"),
            .routeRemote(seq: 7, stanza: "<message xmlns='jabber:client' id='m1' to='bob@b.example'/>"),
            .delivered(7),
            .deliverArchived(seq: 11, to: "bob@b.example/phone", stanza: "<message xmlns='jabber:client'><body>kept</body></message>"),
            .released(11),
            .resumeRequest(seq: 8, request: 1, previd: "abc", account: "alice@a.example", handled: UInt32.max),
            .resumeAnswer(seq: 9, request: 1, transfer: nil),
            .resumeAnswer(seq: 10, request: 2, transfer: SessionTransfer(
                record: SessionRecord(jid: "a@b/c", boundAt: 1, presence: nil, priority: 0, interestedInRoster: true, carbons: true),
                receivedInbound: 3, sentOutbound: 4, acknowledged: 2, unacknowledged: ["<message xmlns='jabber:client'/>", ""])),
        ]
        for frame in frames {
            let bytes = NodeFrameCodec.encode(frame)
            #expect(try NodeFrameCodec.decode(bytes) == frame)
            // Every truncation is an error, never a crash or a different frame.
            for length in 0..<bytes.count {
                #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode(bytes[0..<length]) }
            }
            #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode(bytes + [0]) }
        }
        #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode([99]) }
        // A transfer claiming more stanzas than bytes left.
        var lying = NodeFrameCodec.encode(.resumeAnswer(seq: 1, request: 1, transfer: SessionTransfer(
            record: SessionRecord(jid: "a@b/c", boundAt: 0, presence: nil, priority: 0, interestedInRoster: false, carbons: false),
            receivedInbound: 0, sentOutbound: 0, acknowledged: 0, unacknowledged: [])))
        lying[lying.count - 1] = 0x7F
        #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode(lying) }
        // A length claiming more than there is, an overlong integer, and bytes that are not UTF-8.
        #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode([4, 1, 0xFF, 0xFF, 0xFF, 0x0F]) }
        #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode([6] + [UInt8](repeating: 0xFF, count: 11)) }
        #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode([4, 1, 2, 0xC3, 0x28]) }
        // A priority outside RFC 6121's range.
        var bad = NodeFrameCodec.encode(.session(seq: 1, SessionRecord(jid: "a@b/c", boundAt: 0, presence: nil, priority: 0, interestedInRoster: false, carbons: false)))
        bad[bad.count - 2] = 0xC8  // 200, as LEB128 0xC8 0x01
        bad.insert(0x01, at: bad.count - 1)
        #expect(throws: NodeFrameError.self) { try NodeFrameCodec.decode(bad) }
    }

    @Test("Cluster settings: what keeps a node from starting is said in words")
    func settingsProblems() {
        var settings = ClusterSettings()
        #expect(settings.problems(storageIsPostgreSQL: false).isEmpty, "off: nothing to check")
        settings.enabled = true
        let problems = settings.problems(storageIsPostgreSQL: false)
        #expect(problems.contains { $0.contains("storage.backend: postgresql") })
        #expect(problems.contains { $0.contains("tls_certificate_file") })
        settings.listen = "nowhere"
        settings.deadAfterSeconds = 1
        #expect(settings.problems(storageIsPostgreSQL: true).contains { $0.contains("cluster.listen") })
        #expect(settings.problems(storageIsPostgreSQL: true).contains { $0.contains("dead_after_seconds") })
        #expect(ClusterSettings.Endpoint(parsing: "[::1]:5270") == .init(host: "::1", port: 5270))
        #expect(ClusterSettings.Endpoint(parsing: "10.0.0.1:99999") == nil)
    }
}
