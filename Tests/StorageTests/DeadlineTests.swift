import Storage
import Synchronization
import Testing
import TestSupport

/// A body that ignores cancellation, as postgres-nio's query in flight does: it returns only
/// when the test lets it go.
private final class Gate: Sendable {
    private let waiting = Mutex<CheckedContinuation<Void, Never>?>(nil)
    private let opened = Mutex(false)

    func wait() async {
        await withCheckedContinuation { continuation in
            let openAlready = opened.withLock { opened in
                if !opened { waiting.withLock { $0 = continuation } }
                return opened
            }
            if openAlready { continuation.resume() }
        }
    }

    var isWaiting: Bool { waiting.withLock { $0 != nil } }

    func open() {
        let continuation = opened.withLock { opened -> CheckedContinuation<Void, Never>? in
            opened = true
            return waiting.withLock { waiting in
                defer { waiting = nil }
                return waiting
            }
        }
        continuation?.resume()
    }
}

private struct Refused: Error, Equatable {}

@Suite("withDeadline: a database call bounded in time, whatever the call does")
struct DeadlineTests {
    @Test("A body that ignores cancellation: the caller gets DeadlineExceeded at the deadline, not when the body ends")
    func uncooperativeBody() async throws {
        let gate = Gate()
        let clock = ContinuousClock()
        let started = clock.now
        await #expect(throws: DeadlineExceeded(timeout: .milliseconds(200))) {
            try await withDeadline(.milliseconds(200)) { await gate.wait() }
        }
        let elapsed = clock.now - started
        #expect(elapsed >= .milliseconds(200))
        // A group-based timeout would still be waiting here: the body has not returned.
        #expect(gate.isWaiting, "the body is still running; the caller did not wait for it")
        #expect(elapsed < .seconds(30))
        gate.open()
    }

    @Test("The body's value and the body's error come back as they are")
    func resultAndError() async throws {
        let value = try await withDeadline(.seconds(30)) { 42 }
        #expect(value == 42)
        await #expect(throws: Refused()) {
            try await withDeadline(.seconds(30)) { () async throws -> Int in throw Refused() }
        }
    }

    @Test("Cancelling the caller ends the wait at once with CancellationError, also for a body that ignores it")
    func callerCancelled() async throws {
        let gate = Gate()
        let caller = Task {
            try await withDeadline(.seconds(600)) { await gate.wait() }
        }
        try await waitUntil(timeout: .seconds(30), "the body to start") { gate.isWaiting }
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
        gate.open()
    }

    @Test("Cancelled before it starts: the body never runs")
    func cancelledBeforeStart() async throws {
        let ran = Mutex(false)
        let caller = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await withDeadline(.seconds(600)) { ran.withLock { $0 = true } }
        }
        await #expect(throws: CancellationError.self) { try await caller.value }
        #expect(ran.withLock { $0 } == false)
    }
}
