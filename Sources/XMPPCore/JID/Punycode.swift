/// Punycode, the Bootstring parameters of RFC 3492, which IDNA uses for the part of an
/// A-label after "xn--".
enum Punycode {
    // RFC 3492 §5.
    private static let base: UInt32 = 36
    private static let tMin: UInt32 = 1
    private static let tMax: UInt32 = 26
    private static let skew: UInt32 = 38
    private static let damp: UInt32 = 700
    private static let initialBias: UInt32 = 72
    private static let initialN: UInt32 = 0x80
    private static let delimiter = UInt8(ascii: "-")

    /// Encodes code points to Punycode, without the "xn--" prefix (RFC 3492 §6.3).
    static func encode(_ input: [Unicode.Scalar]) throws(JIDError) -> String {
        var output: [UInt8] = []
        output.reserveCapacity(input.count + 8)
        for scalar in input where scalar.value < 0x80 {
            output.append(UInt8(scalar.value))
        }
        let basicCount = UInt32(output.count)
        var handled = basicCount
        if basicCount > 0 { output.append(delimiter) }

        var n = initialN
        var delta: UInt32 = 0
        var bias = initialBias
        let total = UInt32(input.count)
        while handled < total {
            // The smallest code point not yet handled.
            var m = UInt32.max
            for scalar in input where scalar.value >= n && scalar.value < m {
                m = scalar.value
            }
            delta = try add(delta, try multiply(m - n, handled + 1))
            n = m
            for scalar in input {
                if scalar.value < n {
                    delta = try add(delta, 1)
                } else if scalar.value == n {
                    var q = delta
                    var k = base
                    while true {
                        let t = threshold(k, bias)
                        if q < t { break }
                        output.append(digit(t + (q - t) % (base - t)))
                        q = (q - t) / (base - t)
                        k += base
                    }
                    output.append(digit(q))
                    bias = adapt(delta, handled + 1, firstTime: handled == basicCount)
                    delta = 0
                    handled += 1
                }
            }
            delta = try add(delta, 1)
            n += 1
        }
        return String(decoding: output, as: UTF8.self)
    }

    /// Decodes Punycode (without the "xn--" prefix) to code points (RFC 3492 §6.2).
    static func decode(_ input: some StringProtocol) throws(JIDError) -> [Unicode.Scalar] {
        let bytes = Array(input.utf8)
        // Basic code points are everything before the last delimiter.
        let lastDelimiter = bytes.lastIndex(of: delimiter)
        var output: [Unicode.Scalar] = []
        if let lastDelimiter {
            for byte in bytes[..<lastDelimiter] {
                guard byte < 0x80 else { throw malformed("non-ASCII code point") }
                output.append(Unicode.Scalar(byte))
            }
        }
        var position = lastDelimiter.map { $0 > 0 ? $0 + 1 : 0 } ?? 0

        var n = initialN
        var i: UInt32 = 0
        var bias = initialBias
        while position < bytes.count {
            let oldI = i
            var w: UInt32 = 1
            var k = base
            while true {
                guard position < bytes.count else { throw malformed("truncated Punycode") }
                guard let value = digitValue(bytes[position]) else { throw malformed("invalid Punycode digit") }
                position += 1
                i = try add(i, try multiply(value, w))
                let t = threshold(k, bias)
                if value < t { break }
                w = try multiply(w, base - t)
                k += base
            }
            let length = UInt32(output.count) + 1
            bias = adapt(i - oldI, length, firstTime: oldI == 0)
            n = try add(n, i / length)
            i %= length
            // Basic code points must be written literally, not encoded (RFC 3492 §6.2).
            guard n >= 0x80, let scalar = Unicode.Scalar(n) else { throw malformed("invalid code point in Punycode") }
            output.insert(scalar, at: Int(i))
            i += 1
        }
        return output
    }

    // MARK: Helpers

    private static func malformed(_ why: String) -> JIDError {
        JIDError(.domainpart, .invalidLabel(why))
    }

    private static func add(_ a: UInt32, _ b: UInt32) throws(JIDError) -> UInt32 {
        let (sum, overflow) = a.addingReportingOverflow(b)
        if overflow { throw malformed("Punycode overflow") }
        return sum
    }

    private static func multiply(_ a: UInt32, _ b: UInt32) throws(JIDError) -> UInt32 {
        let (product, overflow) = a.multipliedReportingOverflow(by: b)
        if overflow { throw malformed("Punycode overflow") }
        return product
    }

    /// The threshold t for digit position k (RFC 3492 §6.2, §6.3).
    private static func threshold(_ k: UInt32, _ bias: UInt32) -> UInt32 {
        if k <= bias { return tMin }
        if k >= bias + tMax { return tMax }
        return k - bias
    }

    /// Bias adaptation, RFC 3492 §6.1.
    private static func adapt(_ delta: UInt32, _ numPoints: UInt32, firstTime: Bool) -> UInt32 {
        var delta = firstTime ? delta / damp : delta / 2
        delta += delta / numPoints
        var k: UInt32 = 0
        while delta > ((base - tMin) * tMax) / 2 {
            delta /= base - tMin
            k += base
        }
        return k + (base - tMin + 1) * delta / (delta + skew)
    }

    /// Digits 0–25 are "a"–"z" and 26–35 are "0"–"9"; we always write lower case.
    private static func digit(_ value: UInt32) -> UInt8 {
        value < 26 ? UInt8(ascii: "a") + UInt8(value) : UInt8(ascii: "0") + UInt8(value - 26)
    }

    private static func digitValue(_ byte: UInt8) -> UInt32? {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"): UInt32(byte - UInt8(ascii: "a"))
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): UInt32(byte - UInt8(ascii: "A"))
        case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt32(byte - UInt8(ascii: "0")) + 26
        default: nil
        }
    }
}
