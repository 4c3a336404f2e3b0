import Histogram

/// A JSON value and its text (no Foundation: the generator stays small).
indirect enum JSON {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case int(Int)
    case number(Double)
    case bool(Bool)
    case null

    func rendered(indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent + 1)
        let end = String(repeating: " ", count: indent)
        switch self {
        case .object(let pairs):
            if pairs.isEmpty { return "{}" }
            return "{\n" + pairs.map { pad + Self.quote($0.0) + ": " + $0.1.rendered(indent: indent + 1) }.joined(separator: ",\n") + "\n" + end + "}"
        case .array(let items):
            if items.isEmpty { return "[]" }
            return "[" + items.map { $0.rendered(indent: indent + 1) }.joined(separator: ", ") + "]"
        case .string(let text):
            return Self.quote(text)
        case .int(let value):
            return String(value)
        case .number(let value):
            guard value.isFinite else { return "null" }
            let rounded = (value * 1000).rounded() / 1000
            return rounded == rounded.rounded() && abs(rounded) < 1e15 ? String(Int(rounded)) : String(rounded)
        case .bool(let value):
            return value ? "true" : "false"
        case .null:
            return "null"
        }
    }

    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    static func counts(_ values: [String: Int]) -> JSON {
        .object(values.sorted { $0.key < $1.key }.map { ($0.key, .int($0.value)) })
    }
}

/// The run's figures as JSON: rates, counts, latency percentiles in milliseconds, and the
/// generator's own CPU so that a saturated generator is visible.
struct Report {
    var config: LoadConfig
    var threads: Int
    var insecure: Bool
    var tls12: Bool
    var stats: Stats
    var loginSeconds: Double
    var sendSeconds: Double
    var drainSeconds: Double
    var wallSeconds: Double
    var cpuLogin: CPUTime
    var cpuMessages: CPUTime
    var threadCPU: (name: String, seconds: Double)?
    var messageWindowSeconds: Double

    static func percentiles(_ h: Histogram<UInt64>) -> JSON {
        guard h.totalCount > 0 else { return .object([("count", .int(0))]) }
        func ms(_ micros: UInt64) -> JSON { .number(Double(micros) / 1000) }
        return .object([
            ("count", .int(Int(h.totalCount))),
            ("p50", ms(h.valueAtPercentile(50))),
            ("p90", ms(h.valueAtPercentile(90))),
            ("p99", ms(h.valueAtPercentile(99))),
            ("p99_9", ms(h.valueAtPercentile(99.9))),
            ("max", ms(h.max)),
            ("mean", .number(h.mean / 1000)),
        ])
    }

    func json() -> JSON {
        let s = stats
        // The first to the last actual send: longer than the configured duration when the
        // generator fell behind its schedule.
        let sendSpan = s.lastSendNs > s.firstSendNs ? Double(s.lastSendNs - s.firstSendNs) / 1e9 : 0
        let window = config.duration
        let lost = s.sent > s.received ? Int(s.sent - s.received) : 0
        var mechanism: JSON = .null
        if let top = s.mechanisms.max(by: { $0.value < $1.value }) { mechanism = .string(top.key) }
        return .object([
            ("generator", .string("braid-load")),
            ("config", .object([
                ("host", .string(config.host)), ("port", .int(config.port)), ("domain", .string(config.domain)),
                ("user_pattern", .string(config.userPattern)), ("sessions", .int(config.sessions)),
                ("login_rate_per_second", .number(config.loginRate)),
                ("offered_per_second", .number(config.rate)), ("duration_seconds", .number(config.duration)),
                ("drain_seconds", .number(config.drain)), ("tls", .string(config.tls.rawValue)),
                ("certificate_verification", .bool(!insecure)),
                ("mechanism_requested", .string(config.mechanism.rawValue)),
                ("stream_management", .bool(config.streamManagement)), ("initial_presence", .bool(config.presence)),
                ("body_bytes", .int(config.bodyBytes)), ("ack_every", .int(config.ackEvery)),
                ("threads", .int(threads)), ("tcp_nodelay", .bool(config.tcpNodelay)),
                ("to_bare_jids", .bool(config.toBare)), ("tick_ms", .number(config.tickMs)), ("tls_at_most_1_2", .bool(tls12)),
            ])),
            ("logins", .object([
                ("attempted", .int(s.loginsStarted)), ("succeeded", .int(s.loginsSucceeded)),
                ("failed", .int(s.loginsFailed)), ("errors", JSON.counts(s.loginErrors)),
                ("mechanism", mechanism), ("mechanisms", JSON.counts(s.mechanisms)),
                ("seconds", .number(loginSeconds)),
                ("achieved_per_second", .number(loginSeconds > 0 ? Double(s.loginsSucceeded) / loginSeconds : 0)),
                ("latency_ms", Self.percentiles(s.loginLatency)),
                ("generator_cpu_seconds", .number(cpuLogin.total)),
                ("generator_cpu_ms_per_login", .number(s.loginsSucceeded > 0 ? cpuLogin.total / Double(s.loginsSucceeded) * 1000 : 0)),
            ])),
            ("messages", .object([
                ("offered_per_second", .number(config.rate)),
                ("window_seconds", .number(window)),
                ("scheduled", .int(Int(s.scheduled))), ("sent", .int(Int(s.sent))),
                ("skipped_sender_down", .int(Int(s.skipped))),
                ("received", .int(Int(s.received))), ("lost", .int(lost)),
                ("error_replies", .int(Int(s.messageErrors))), ("other_messages", .int(Int(s.otherMessages))),
                ("sent_per_second", .number(sendSpan > 0 ? Double(s.sent) / sendSpan : 0)),
                ("send_span_seconds", .number(sendSpan)),
                ("delivered_per_second", .number(window > 0 ? Double(s.received) / window : 0)),
                ("drain_seconds", .number(drainSeconds)),
                ("latency_ms", Self.percentiles(s.latency)),
                ("latency_from_schedule_ms", Self.percentiles(s.latencyFromSchedule)),
                ("send_lag_ms", Self.percentiles(s.sendLag)),
            ])),
            ("stream_management", .object([
                ("enabled_sessions", .int(s.smEnabled)),
                ("server_requests_answered", .int(Int(s.smAcksSent))),
                ("requests_sent", .int(Int(s.smRequestsSent))), ("acks_received", .int(Int(s.smAcksReceived))),
                ("final_acks", .int(s.finalAcks)),
                ("final_acked_stanzas", .int(Int(s.finalAcked))), ("final_expected_stanzas", .int(Int(s.finalExpected))),
            ])),
            ("disconnects", JSON.counts(s.disconnects)),
            ("errors", JSON.counts(s.errors)),
            ("generator_cpu", .object([
                ("login_phase_seconds", .number(cpuLogin.total)),
                ("message_phase_user_seconds", .number(cpuMessages.user)),
                ("message_phase_system_seconds", .number(cpuMessages.system)),
                ("message_phase_seconds", .number(cpuMessages.total)),
                ("message_phase_wall_seconds", .number(messageWindowSeconds)),
                ("message_phase_cores", .number(messageWindowSeconds > 0 ? cpuMessages.total / messageWindowSeconds : 0)),
                ("us_per_message_sent_and_received", .number(s.sent + s.received > 0 ? cpuMessages.total / Double(s.sent + s.received) * 1e6 : 0)),
                ("busiest_thread", .string(threadCPU?.name ?? "")),
                ("busiest_thread_share", .number(threadCPU.map { messageWindowSeconds > 0 ? $0.seconds / messageWindowSeconds : 0 } ?? 0)),
            ])),
            ("wall_seconds", .number(wallSeconds)),
        ])
    }
}
