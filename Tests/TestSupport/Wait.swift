/// The one way tests wait: poll a condition until it holds, bounded, instead of sleeping for
/// a fixed time (a fixed sleep is either too long or, on a loaded machine, too short).
public func waitUntil(timeout: Duration = .seconds(10), _ what: String = "condition",
                      fileID: String = #fileID, line: Int = #line,
                      _ condition: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    if try await condition() { return }
    throw WaitTimedOut(description: "\(what) not met within \(timeout) (\(fileID):\(line))")
}

/// ``waitUntil(timeout:_:fileID:line:_:)`` gave up.
public struct WaitTimedOut: Error, CustomStringConvertible {
    public var description: String
}
