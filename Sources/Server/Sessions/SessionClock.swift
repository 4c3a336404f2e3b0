import NIOCore

/// Where client streams and sessions read monotonic time and set their timers: the
/// negotiation and idle timeouts, whitespace keepalives, the stanza rate limit, and stream
/// management's acknowledgement requests and resumption window (XEP-0198).
///
/// Injected through ``BraidServer``, as federation's `WallClock` is, so a test moves time
/// forward instead of waiting for it; in production these are NIO's event-loop timers, and
/// a timer's work runs on the loop it was set on either way.
public struct SessionClock: Sendable {
    /// A timer that can be called off. Cancelling twice, or after it fired, does nothing.
    public struct Timer: Sendable {
        private let cancelTimer: @Sendable () -> Void

        public init(cancel: @escaping @Sendable () -> Void) {
            cancelTimer = cancel
        }

        public func cancel() { cancelTimer() }
    }

    public typealias Schedule = @Sendable (_ loop: any EventLoop, _ delay: TimeAmount, _ work: @escaping @Sendable () -> Void) -> Timer
    public typealias ScheduleRepeated = @Sendable (_ loop: any EventLoop, _ interval: TimeAmount, _ work: @escaping @Sendable () -> Void) -> Timer

    private let readNow: @Sendable () -> NIODeadline
    private let scheduleOnce: Schedule
    private let scheduleEvery: ScheduleRepeated

    public init(now: @escaping @Sendable () -> NIODeadline, schedule: @escaping Schedule, scheduleRepeated: @escaping ScheduleRepeated) {
        readNow = now
        scheduleOnce = schedule
        scheduleEvery = scheduleRepeated
    }

    /// NIO's clock and event-loop timers.
    public static let system = SessionClock(
        now: { .now() },
        schedule: { loop, delay, work in
            let task = loop.scheduleTask(in: delay) { work() }
            return Timer { task.cancel() }
        },
        scheduleRepeated: { loop, interval, work in
            let task = loop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in work() }
            return Timer { task.cancel() }
        })

    public func now() -> NIODeadline { readNow() }

    /// Runs `work` on `loop` once, `delay` from now.
    func schedule(on loop: any EventLoop, in delay: TimeAmount, _ work: @escaping @Sendable () -> Void) -> Timer {
        scheduleOnce(loop, delay, work)
    }

    /// Runs `work` on `loop` every `interval`, the first time one interval from now.
    func scheduleRepeated(on loop: any EventLoop, every interval: TimeAmount, _ work: @escaping @Sendable () -> Void) -> Timer {
        scheduleEvery(loop, interval, work)
    }
}
