/// Strict UTF-8 validation (RFC 3629), used to tell a wrong encoding from bad XML.
enum UTF8Validation {
    enum Result: Equatable {
        case valid
        /// Valid, except that it ends inside a sequence whose bytes so far are allowed.
        case truncated
        case invalid
    }

    /// Validates `bytes`, skipping continuation bytes at the very start: a window cut from
    /// the middle of a stream may begin inside a sequence.
    static func check<C: Collection<UInt8>>(_ bytes: C) -> Result {
        var iterator = bytes.makeIterator()
        var skippedLeading = 0
        var pending: UInt8? = iterator.next()
        while let byte = pending, byte & 0xC0 == 0x80, skippedLeading < 3 {
            skippedLeading += 1
            pending = iterator.next()
        }
        while let lead = pending {
            pending = iterator.next()
            let needed: Int
            var low: UInt8 = 0x80
            var high: UInt8 = 0xBF
            switch lead {
            case 0x00...0x7F: continue
            case 0xC2...0xDF: needed = 1
            case 0xE0: needed = 2; low = 0xA0
            case 0xE1...0xEC, 0xEE...0xEF: needed = 2
            case 0xED: needed = 2; high = 0x9F
            case 0xF0: needed = 3; low = 0x90
            case 0xF1...0xF3: needed = 3
            case 0xF4: needed = 3; high = 0x8F
            default: return .invalid
            }
            for index in 0..<needed {
                guard let continuation = pending else { return .truncated }
                let (min, max) = index == 0 ? (low, high) : (UInt8(0x80), UInt8(0xBF))
                guard continuation >= min && continuation <= max else { return .invalid }
                pending = iterator.next()
            }
        }
        return .valid
    }
}
