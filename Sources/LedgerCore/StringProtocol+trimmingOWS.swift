extension StringProtocol {
    /// Without leading and trailing HTTP optional whitespace (spaces and tabs, RFC 9110 section 5.6.3).
    ///
    /// Header values are trimmed on every request: Foundation's `trimmingCharacters(in:)` walks Unicode character
    /// sets and was 5 % of the service's CPU under load, for what is a few ASCII bytes.
    public var trimmingOWS: Substring {
        let whole = Substring(self)
        let isOWS = { (byte: UInt8) in byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") }
        guard let first = whole.utf8.firstIndex(where: { !isOWS($0) }),
            let last = whole.utf8.lastIndex(where: { !isOWS($0) })
        else { return whole[whole.endIndex...] }
        // The byte after `last` is OWS or the end, so both bounds fall on character boundaries.
        return whole[first..<whole.utf8.index(after: last)]
    }
}
