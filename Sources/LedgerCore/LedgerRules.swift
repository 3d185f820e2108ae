/// The contract's rules for ids, currencies, amounts and metadata. Pure functions, no I/O.
public enum LedgerRules {
    /// The largest amount: 2^53-1, so that every amount is exact in any JSON client's numbers.
    public static let amountMax: Int64 = 9_007_199_254_740_991
    /// Metadata's compact JSON serialisation may hold at most this many UTF-8 bytes.
    public static let metadataBytesMax = 4096
    /// Account ids and client names: `[A-Za-z0-9][A-Za-z0-9._:-]{0,63}`.
    public static let accountIDLengthMax = 64

    /// Whether `id` is an id a client may pick. `@world`, `.` and `..` never match (the first character must be a
    /// letter or digit).
    public static func isValidAccountID(_ id: String) -> Bool {
        let bytes = Array(id.utf8)
        guard (1...accountIDLengthMax).contains(bytes.count), isAlphanumeric(bytes[0]) else { return false }
        return bytes.dropFirst().allSatisfy { byte in
            isAlphanumeric(byte) || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: ":") || byte == UInt8(ascii: "-")
        }
    }

    /// Three upper-case ASCII letters.
    public static func isValidCurrency(_ currency: String) -> Bool {
        let bytes = Array(currency.utf8)
        return bytes.count == 3 && bytes.allSatisfy { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }
    }

    /// An amount from its JSON lexeme: a plain integer in 1...2^53-1. Fractions, exponents and `-0` are refused,
    /// even when their value is whole, so that no float ever stands for money.
    public static func amount(fromLexeme lexeme: String) -> Int64? {
        let bytes = Array(lexeme.utf8)
        guard !bytes.isEmpty, bytes.count <= 16, bytes[0] != UInt8(ascii: "0"),
            bytes.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            let value = Int64(lexeme), value >= 1, value <= amountMax
        else { return nil }
        return value
    }

    private static func isAlphanumeric(_ byte: UInt8) -> Bool {
        (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
            || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
    }
}
