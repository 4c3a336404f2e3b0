import Synchronization

/// A database call that did not answer within its deadline.
public struct DeadlineExceeded: Error, Sendable, Equatable {
    public let timeout: Duration
    public init(timeout: Duration) { self.timeout = timeout }
}

/// Runs `body` and returns its result, or throws ``DeadlineExceeded`` once `timeout` has
/// passed, whichever comes first. `body` is cancelled at the deadline, but the caller does not
/// wait for it to notice: postgres-nio's query in flight on a connection is not cancellable, so
/// a connection that stops answering without closing would otherwise hold the caller (a
/// cluster heartbeat, a client's request) for as long as the connection lives. A task group
/// cannot do this: it waits for every child before it returns.
///
/// Cancelling the calling task cancels `body` and throws `CancellationError` at once.
public func withDeadline<Result: Sendable>(_ timeout: Duration, _ body: @escaping @Sendable () async throws -> Result) async throws -> Result {
    let race = DeadlineRace<Result>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Result, any Error>) in
            race.start(continuation: continuation, timeout: timeout, body: body)
        }
    } onCancel: {
        race.finish(.failure(CancellationError()))
    }
}

/// The one continuation of ``withDeadline``, resumed by whichever of the body, the timer and
/// cancellation comes first; the two tasks are cancelled when it is.
private final class DeadlineRace<Result: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<Result, any Error>?
        var finished: Swift.Result<Result, any Error>?
        var tasks: [Task<Void, Never>] = []
    }

    private let state = Mutex(State())

    func start(continuation: CheckedContinuation<Result, any Error>, timeout: Duration, body: @escaping @Sendable () async throws -> Result) {
        // Cancelled before the continuation existed: finished already, nothing to start.
        let early: Swift.Result<Result, any Error>? = state.withLock { state in
            if let finished = state.finished { return finished }
            state.continuation = continuation
            return nil
        }
        if let early {
            continuation.resume(with: early)
            return
        }
        let work = Task {
            do {
                self.finish(.success(try await body()))
            } catch {
                self.finish(.failure(error))
            }
        }
        let timer = Task {
            // Cancelled when the body finishes first; only a full sleep is a timeout.
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            self.finish(.failure(DeadlineExceeded(timeout: timeout)))
        }
        let cancel: Bool = state.withLock { state in
            guard state.continuation != nil else { return true }
            state.tasks = [work, timer]
            return false
        }
        if cancel {
            work.cancel()
            timer.cancel()
        }
    }

    func finish(_ result: Swift.Result<Result, any Error>) {
        let (continuation, tasks): (CheckedContinuation<Result, any Error>?, [Task<Void, Never>]) = state.withLock { state in
            guard state.finished == nil else { return (nil, []) }
            state.finished = result
            defer { state.continuation = nil; state.tasks = [] }
            return (state.continuation, state.tasks)
        }
        for task in tasks { task.cancel() }
        continuation?.resume(with: result)
    }
}
