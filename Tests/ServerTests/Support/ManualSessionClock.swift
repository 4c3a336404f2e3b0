import NIOCore
import Server
import Synchronization

/// A ``SessionClock`` that stands still until a test moves it: timers fire, on their own
/// event loops, only when ``advance(by:)`` passes their deadline, and the rate limiter sees
/// no time pass in between. Tests of timeouts, keepalives, rate limits and the XEP-0198
/// resumption window then wait for nothing.
final class ManualSessionClock: Sendable {
    private struct Entry {
        var id: Int
        var deadline: NIODeadline
        var loop: any EventLoop
        var interval: TimeAmount?
        var work: @Sendable () -> Void
    }

    private struct State {
        var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var nextID = 0
        var entries: [Entry] = []
    }

    private let state = Mutex(State())

    var now: NIODeadline { state.withLock { $0.now } }

    /// How many timers are set (a repeated one counts once).
    var pendingTimers: Int { state.withLock { $0.entries.count } }

    var clock: SessionClock {
        SessionClock(
            now: { [self] in now },
            schedule: { [self] loop, delay, work in add(loop: loop, delay: delay, interval: nil, work: work) },
            scheduleRepeated: { [self] loop, interval, work in add(loop: loop, delay: interval, interval: interval, work: work) })
    }

    private func add(loop: any EventLoop, delay: TimeAmount, interval: TimeAmount?, work: @escaping @Sendable () -> Void) -> SessionClock.Timer {
        let id = state.withLock { state -> Int in
            let id = state.nextID
            state.nextID += 1
            state.entries.append(Entry(id: id, deadline: state.now + delay, loop: loop, interval: interval, work: work))
            return id
        }
        return SessionClock.Timer { [self] in
            state.withLock { $0.entries.removeAll { $0.id == id } }
        }
    }

    /// Moves time forward by `amount`, firing every timer whose deadline it passes, in
    /// deadline order, each on its loop (a repeated timer as often as it falls due); returns
    /// once each has run.
    func advance(by amount: TimeAmount) async {
        let target = state.withLock { $0.now + amount }
        while true {
            let due: Entry? = state.withLock { state in
                guard let index = state.entries.indices.min(by: { state.entries[$0].deadline < state.entries[$1].deadline }),
                      state.entries[index].deadline <= target else { return nil }
                let entry = state.entries[index]
                state.now = max(state.now, entry.deadline)
                if let interval = entry.interval {
                    state.entries[index].deadline = entry.deadline + interval
                } else {
                    state.entries.remove(at: index)
                }
                return entry
            }
            guard let due else { break }
            try? await due.loop.submit { due.work() }.get()
        }
        state.withLock { $0.now = target }
    }
}
