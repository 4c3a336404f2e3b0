import CoreMetrics
import Synchronization

/// A swift-metrics backend that keeps every metric in memory and renders them in the
/// Prometheus text format.
///
/// Each server instance owns one, passed explicitly as the `factory:` of its metrics, so two
/// servers in one process (as in tests) never mix their numbers and nothing global is
/// mutated.
public final class MetricsRegistry: MetricsFactory, Sendable {
    struct Key: Hashable, Comparable {
        var label: String
        var dimensions: [String]

        init(_ label: String, _ dimensions: [(String, String)]) {
            self.label = label
            self.dimensions = dimensions.sorted { $0.0 < $1.0 }.map { "\($0.0)=\"\(Self.escape($0.1))\"" }
        }

        static func < (lhs: Key, rhs: Key) -> Bool {
            (lhs.label, lhs.dimensions.joined(separator: ",")) < (rhs.label, rhs.dimensions.joined(separator: ","))
        }

        static func escape(_ value: String) -> String {
            value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
        }
    }

    private let counters = Mutex<[Key: CounterBox]>([:])
    private let gauges = Mutex<[Key: GaugeBox]>([:])
    private let summaries = Mutex<[Key: SummaryBox]>([:])
    /// Run before every export, to set gauges that are cheaper to compute on demand.
    private let exportHooks = Mutex<[@Sendable () async -> Void]>([])

    public init() {}

    /// Registers `hook` to run before each export (``prometheusText()``).
    public func onExport(_ hook: @escaping @Sendable () async -> Void) {
        exportHooks.withLock { $0.append(hook) }
    }

    // MARK: MetricsFactory

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        let key = Key(label, dimensions)
        return counters.withLock { boxes in
            if let box = boxes[key] { return box }
            let box = CounterBox()
            boxes[key] = box
            return box
        }
    }

    public func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        makeGauge(label: label, dimensions: dimensions)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        makeGauge(label: label, dimensions: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        if !aggregate { return makeGauge(label: label, dimensions: dimensions) }
        return makeSummary(label: label, dimensions: dimensions)
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        makeSummary(label: label, dimensions: dimensions)
    }

    public func destroyCounter(_ handler: any CounterHandler) {}
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {}
    public func destroyMeter(_ handler: any MeterHandler) {}
    public func destroyRecorder(_ handler: any RecorderHandler) {}
    public func destroyTimer(_ handler: any TimerHandler) {}

    private func makeGauge(label: String, dimensions: [(String, String)]) -> GaugeBox {
        let key = Key(label, dimensions)
        return gauges.withLock { boxes in
            if let box = boxes[key] { return box }
            let box = GaugeBox()
            boxes[key] = box
            return box
        }
    }

    private func makeSummary(label: String, dimensions: [(String, String)]) -> SummaryBox {
        let key = Key(label, dimensions)
        return summaries.withLock { boxes in
            if let box = boxes[key] { return box }
            let box = SummaryBox()
            boxes[key] = box
            return box
        }
    }

    // MARK: Reading

    /// The current value of a counter, or 0 if it was never created.
    public func counterValue(_ label: String, _ dimensions: [(String, String)] = []) -> Int64 {
        counters.withLock { $0[Key(label, dimensions)]?.value } ?? 0
    }

    /// The sum of a counter over all its dimension sets.
    public func counterTotal(_ label: String) -> Int64 {
        counters.withLock { boxes in boxes.filter { $0.key.label == label }.reduce(0) { $0 + $1.value.value } }
    }

    /// The current value of a gauge, or nil if it was never created.
    public func gaugeValue(_ label: String, _ dimensions: [(String, String)] = []) -> Double? {
        gauges.withLock { $0[Key(label, dimensions)]?.value }
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    public func prometheusText() async -> String {
        for hook in exportHooks.withLock({ $0 }) { await hook() }
        var lines: [String] = []
        func name(_ key: Key, suffix: String = "") -> String {
            let base = key.label + suffix
            return key.dimensions.isEmpty ? base : "\(base){\(key.dimensions.joined(separator: ","))}"
        }
        for (key, box) in counters.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            lines.append("\(name(key)) \(box.value)")
        }
        for (key, box) in gauges.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            lines.append("\(name(key)) \(box.value)")
        }
        for (key, box) in summaries.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            let (count, sum) = box.snapshot
            lines.append("\(name(key, suffix: "_count")) \(count)")
            lines.append("\(name(key, suffix: "_sum")) \(sum)")
        }
        return lines.joined(separator: "\n") + "\n"
    }
}

final class CounterBox: CounterHandler, Sendable {
    private let storage = Atomic<Int64>(0)

    func increment(by amount: Int64) {
        storage.wrappingAdd(amount, ordering: .relaxed)
    }

    func reset() {
        storage.store(0, ordering: .relaxed)
    }

    var value: Int64 { storage.load(ordering: .relaxed) }
}

final class GaugeBox: MeterHandler, RecorderHandler, FloatingPointCounterHandler, Sendable {
    private let storage = Mutex<Double>(0)

    func set(_ value: Int64) { storage.withLock { $0 = Double(value) } }
    func set(_ value: Double) { storage.withLock { $0 = value } }
    func increment(by amount: Double) { storage.withLock { $0 += amount } }
    func decrement(by amount: Double) { storage.withLock { $0 -= amount } }
    func record(_ value: Int64) { set(value) }
    func record(_ value: Double) { set(value) }
    func reset() { set(0.0) }

    var value: Double { storage.withLock { $0 } }
}

final class SummaryBox: RecorderHandler, TimerHandler, Sendable {
    private let storage = Mutex<(count: Int64, sum: Double)>((0, 0))

    func record(_ value: Int64) { record(Double(value)) }
    func record(_ value: Double) { storage.withLock { $0.count += 1; $0.sum += value } }
    func recordNanoseconds(_ duration: Int64) { record(Double(duration) / 1e9) }

    var snapshot: (Int64, Double) { storage.withLock { ($0.count, $0.sum) } }
}
