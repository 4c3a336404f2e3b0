import Synchronization

/// Group commit: writes submitted while a commit is under way wait for it and then go
/// together in the next one, so many sessions appending at once share one transaction and
/// its fsync instead of queueing for one each. Every caller still returns only once its own
/// write is committed (or with its own error), so what a server acknowledges is on disk.
///
/// No timer and no batch-size wait: a lone write commits at once; batching happens only
/// because commits take time.
final class CommitBatcher<Item: Sendable>: Sendable {
    private typealias Waiter = CheckedContinuation<Void, any Error>

    private struct State {
        var pending: [(item: Item, waiter: Waiter)] = []
        var draining = false
    }

    private let state = Mutex(State())
    /// Commits a batch; returns one outcome per item, in order (nil: committed).
    private let commit: @Sendable ([Item]) async -> [(any Error)?]
    /// Most items in one transaction, so one commit never grows without bound.
    let maxBatch: Int

    init(maxBatch: Int = 512, commit: @escaping @Sendable ([Item]) async -> [(any Error)?]) {
        self.maxBatch = max(1, maxBatch)
        self.commit = commit
    }

    func submit(_ item: Item) async throws {
        try await withCheckedThrowingContinuation { (waiter: Waiter) in
            let start = state.withLock { state -> Bool in
                state.pending.append((item, waiter))
                guard !state.draining else { return false }
                state.draining = true
                return true
            }
            if start { Task { await self.drain() } }
        }
    }

    /// The commit function returned fewer outcomes than items (a bug in it): the items
    /// without one fail rather than wait for ever.
    struct OutcomeMissing: Error {}

    private func drain() async {
        while true {
            let batch = state.withLock { state -> [(item: Item, waiter: Waiter)] in
                let taken = Array(state.pending.prefix(maxBatch))
                state.pending.removeFirst(taken.count)
                if taken.isEmpty { state.draining = false }
                return taken
            }
            guard !batch.isEmpty else { return }
            let outcomes = await commit(batch.map(\.item))
            for (index, entry) in batch.enumerated() {
                if index < outcomes.count, let error = outcomes[index] {
                    entry.waiter.resume(throwing: error)
                } else if index < outcomes.count {
                    entry.waiter.resume()
                } else {
                    entry.waiter.resume(throwing: OutcomeMissing())
                }
            }
        }
    }
}
