/// The `Idempotency-Key` header of the IETF draft: an RFC 8941 sf-string (`"abc"`, with `\"` and `\\` escapes), or,
/// as Stripe clients send it, a bare token of visible ASCII. Both spell the same key.
public struct IdempotencyKey: Sendable, Hashable, CustomStringConvertible {
    /// The key after unquoting, 1...255 printable ASCII characters; case-sensitive.
    public let value: String

    /// Keys longer than this (after unquoting) are refused.
    public static let lengthMax = 255

    public var description: String { value }

    public init(unchecked value: String) {
        self.value = value
    }

    /// Parses the header's field values (all of them: a repeated header is ambiguous and refused).
    public static func parse(headerValues: [String]) -> Result<IdempotencyKey, Problem> {
        guard let raw = headerValues.first else { return .failure(.idempotencyKeyMissing) }
        guard headerValues.count == 1 else {
            return .failure(.idempotencyKeyInvalid("Send exactly one Idempotency-Key header."))
        }
        let bytes = Array(raw.utf8)
        guard !bytes.isEmpty else { return .failure(.idempotencyKeyInvalid("The Idempotency-Key is empty.")) }
        let key: [UInt8]
        if bytes[0] == UInt8(ascii: "\"") {
            guard let unquoted = unquoteSFString(bytes) else {
                return .failure(.idempotencyKeyInvalid("The Idempotency-Key is not a valid quoted string."))
            }
            key = unquoted
        } else {
            guard bytes.allSatisfy({ $0 >= 0x21 && $0 <= 0x7E && $0 != UInt8(ascii: "\"") }) else {
                return .failure(
                    .idempotencyKeyInvalid("The Idempotency-Key must be printable ASCII without spaces or quotes."))
            }
            key = bytes
        }
        guard !key.isEmpty else { return .failure(.idempotencyKeyInvalid("The Idempotency-Key is empty.")) }
        guard key.count <= lengthMax else {
            return .failure(.idempotencyKeyInvalid("The Idempotency-Key is longer than \(lengthMax) characters."))
        }
        return .success(IdempotencyKey(unchecked: String(decoding: key, as: UTF8.self)))
    }

    /// RFC 8941 §3.3.3: `"` then printable ASCII with `\"` and `\\` escapes, then `"`, and nothing after.
    private static func unquoteSFString(_ bytes: [UInt8]) -> [UInt8]? {
        var output: [UInt8] = []
        var index = 1
        while index < bytes.count {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "\\"):
                guard index + 1 < bytes.count else { return nil }
                let next = bytes[index + 1]
                guard next == UInt8(ascii: "\"") || next == UInt8(ascii: "\\") else { return nil }
                output.append(next)
                index += 2
            case UInt8(ascii: "\""):
                return index == bytes.count - 1 ? output : nil
            case 0x20...0x7E:
                output.append(byte)
                index += 1
            default:
                return nil
            }
        }
        return nil  // no closing quote
    }
}
