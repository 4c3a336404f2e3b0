import XMPPStream

/// SCRAM-SHA-256 logins, in process: Braid's `SCRAMServer` against `SCRAMClient`, with the
/// account's stored keys derived once up front (as a server holds them in storage).
///
/// Two figures per run:
/// - server logins/s: only the server's side of each exchange (`start` with the client-first
///   message, `credentialsReceived`, `responseReceived` with the client-final message), which
///   is what a server pays per login: nonce generation, HMACs and hashes, no PBKDF2;
/// - full logins/s: the client's side too, which includes the client's PBKDF2 at the
///   account's iteration count (this dominates, and lands on the client in real life).
struct SCRAMBenchmark {
    struct Result {
        var logins: Int
        var iterations: Int
        var serverSeconds: Double
        var totalSeconds: Double
        var serverLoginsPerSecond: Double { Double(logins) / serverSeconds }
        var fullLoginsPerSecond: Double { Double(logins) / totalSeconds }
        var serverMicrosecondsPerLogin: Double { serverSeconds / Double(logins) * 1e6 }
    }

    var logins: Int
    var iterations: Int

    func run() throws -> Result {
        let password = "bench-Passw0rd"
        let keys = try SCRAMKeyDerivation.newKeys(password: password, iterations: iterations, hash: .sha256)
        let secret = [UInt8](repeating: 7, count: 32)
        let clock = ContinuousClock()
        var serverTime = Duration.zero
        let start = clock.now
        for index in 0..<logins {
            var client = SCRAMClient(hash: .sha256, username: "user\(index % 1000)", password: password,
                                     minimumIterations: 1)
            let clientFirst = try client.clientFirstMessage()

            var t = clock.now
            var server = SCRAMServer(hash: .sha256, channelBindings: [], plusOffered: false,
                                     serverSecret: secret, fakeIterations: iterations)
            guard case .lookUpSCRAMKeys = server.start(initialResponse: clientFirst) else {
                fatalError("server did not ask for keys")
            }
            guard case .challenge(let serverFirst) = server.credentialsReceived(keys) else {
                fatalError("server sent no server-first message")
            }
            serverTime += clock.now - t

            let clientFinal = try client.serverFirstReceived(serverFirst)

            t = clock.now
            guard case .success(_, let additional?) = server.responseReceived(clientFinal) else {
                fatalError("login \(index) failed")
            }
            serverTime += clock.now - t

            try client.serverFinalReceived(additional)
            precondition(client.isServerAuthenticated)
        }
        let total = clock.now - start
        return Result(logins: logins, iterations: iterations,
                      serverSeconds: ParseBenchmark.seconds(serverTime),
                      totalSeconds: ParseBenchmark.seconds(total))
    }
}
