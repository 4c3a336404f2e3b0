/// Strict UTF-8 validation (RFC 3629), used to tell a wrong encoding from bad XML.
enum UTF8Validation {
    /// What the first character of some bytes is.
    enum FirstCharacter: Equatable {
        case valid
        case invalid
        /// A sequence that is valid so far but cut short by the end of the bytes: only the
        /// bytes still to come can decide it.
        case incomplete
    }

    /// Classifies the character that starts `bytes`: a byte that cannot lead a sequence, or a
    /// continuation byte out of range, is invalid. Bytes past that one character are ignored,
    /// so the answer never depends on how much input follows it.
    static func firstCharacter<C: Collection<UInt8>>(_ bytes: C) -> FirstCharacter {
        var iterator = bytes.makeIterator()
        guard let lead = iterator.next() else { return .incomplete }
        let needed: Int
        var low: UInt8 = 0x80
        var high: UInt8 = 0xBF
        switch lead {
        case 0x00...0x7F: return .valid
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
            guard let continuation = iterator.next() else { return .incomplete }
            let (min, max) = index == 0 ? (low, high) : (UInt8(0x80), UInt8(0xBF))
            if continuation < min || continuation > max { return .invalid }
        }
        return .valid
    }
}
