/// Paging through an account's entries, newest first.
///
/// An entry's position is the account `version` its balance change produced: versions only grow, so "entries with a
/// version below the last one seen" never repeats or skips an entry, however many arrive meanwhile.
public struct EntriesPage: Sendable, Equatable {
    public static let limitDefault = 50
    public static let limitMax = 500

    public var limit: Int
    /// Return entries whose version is below this; nil for the newest.
    public var beforeVersion: Int64?

    /// Reads `limit` and `cursor` from the query string values.
    public static func parse(account: String, limit: String?, cursor: String?) -> Result<EntriesPage, Problem> {
        var pageLimit = limitDefault
        if let limit {
            guard limit.utf8.count <= 4, limit.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let value = Int(limit),
                (1...limitMax).contains(value)
            else {
                return .failure(.invalidLimit("limit must be an integer from 1 to \(limitMax)."))
            }
            pageLimit = value
        }
        var before: Int64?
        if let cursor {
            guard let version = Cursor.decode(cursor, account: account) else { return .failure(.invalidCursor) }
            before = version
        }
        return .success(EntriesPage(limit: pageLimit, beforeVersion: before))
    }
}

/// The opaque cursor: base64url of `e1:<account>:<version>:<check>`, where `check` is a 64-bit FNV-1a hash of the
/// rest. Naming the account means a cursor issued for one account is refused on another; the check means an edited
/// or made-up cursor is refused rather than silently read as another position. It is not a secret: a client can only
/// ever page through its own accounts.
public enum Cursor {
    public static func encode(account: String, beforeVersion: Int64) -> String {
        let payload = "e1:\(account):\(beforeVersion)"
        return base64URLEncode(Array("\(payload):\(String(check(payload), radix: 16))".utf8))
    }

    public static func decode(_ cursor: String, account: String) -> Int64? {
        guard cursor.utf8.count <= 200, let bytes = base64URLDecode(cursor) else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        let prefix = "e1:\(account):"
        guard text.hasPrefix(prefix) else { return nil }
        let parts = text.dropFirst(prefix.count).split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].utf8.count <= 19, parts[0].utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
            let version = Int64(parts[0]), version >= 1, encode(account: account, beforeVersion: version) == cursor
        else { return nil }
        return version
    }

    /// FNV-1a, 64 bit.
    static func check(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01B3
        }
        return hash
    }

    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    static func base64URLEncode(_ bytes: [UInt8]) -> String {
        var output: [UInt8] = []
        var index = 0
        while index < bytes.count {
            let chunk = Array(bytes[index..<min(index + 3, bytes.count)])
            let value = (UInt32(chunk[0]) << 16) | (UInt32(chunk.count > 1 ? chunk[1] : 0) << 8)
                | UInt32(chunk.count > 2 ? chunk[2] : 0)
            let characters = chunk.count + 1
            for position in 0..<characters {
                output.append(alphabet[Int((value >> (18 - 6 * UInt32(position))) & 0x3F)])
            }
            index += 3
        }
        return String(decoding: output, as: UTF8.self)
    }

    static func base64URLDecode(_ text: String) -> [UInt8]? {
        var values: [UInt32] = []
        for byte in text.utf8 {
            guard let position = alphabet.firstIndex(of: byte) else { return nil }
            values.append(UInt32(position))
        }
        guard values.count % 4 != 1 else { return nil }
        var output: [UInt8] = []
        var index = 0
        while index < values.count {
            let chunk = Array(values[index..<min(index + 4, values.count)])
            var value: UInt32 = 0
            for position in 0..<4 { value = value << 6 | (position < chunk.count ? chunk[position] : 0) }
            for position in 0..<(chunk.count - 1) { output.append(UInt8((value >> (16 - 8 * UInt32(position))) & 0xFF)) }
            index += 4
        }
        return output
    }
}
