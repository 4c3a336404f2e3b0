/// Strict UTF-8 validation (RFC 3629), used to tell a wrong encoding from bad XML.
enum UTF8Validation {
    /// True when the character that starts `bytes` is not valid UTF-8: a byte that cannot
    /// lead a sequence, or a continuation byte out of range. Bytes past that one character
    /// are ignored, and a sequence cut short by the end of `bytes` is not counted as invalid,
    /// so the answer does not depend on how much input has arrived after it.
    static func firstCharacterIsInvalid<C: Collection<UInt8>>(_ bytes: C) -> Bool {
        var iterator = bytes.makeIterator()
        guard let lead = iterator.next() else { return false }
        let needed: Int
        var low: UInt8 = 0x80
        var high: UInt8 = 0xBF
        switch lead {
        case 0x00...0x7F: return false
        case 0xC2...0xDF: needed = 1
        case 0xE0: needed = 2; low = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: needed = 2
        case 0xED: needed = 2; high = 0x9F
        case 0xF0: needed = 3; low = 0x90
        case 0xF1...0xF3: needed = 3
        case 0xF4: needed = 3; high = 0x8F
        default: return true
        }
        for index in 0..<needed {
            guard let continuation = iterator.next() else { return false }
            let (min, max) = index == 0 ? (low, high) : (UInt8(0x80), UInt8(0xBF))
            if continuation < min || continuation > max { return true }
        }
        return false
    }
}
