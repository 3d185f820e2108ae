import Crypto

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

    /// Reads `limit` and `cursor` from the query string values; the cursor must be one `key` issued for this
    /// client's `account`.
    public static func parse(
        client: String, account: String, limit: String?, cursor: String?, key: CursorKey
    ) -> Result<EntriesPage, Problem> {
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
            guard let version = key.decode(cursor, client: client, account: account) else { return .failure(.invalidCursor) }
            before = version
        }
        return .success(EntriesPage(limit: pageLimit, beforeVersion: before))
    }
}

/// Signs and checks the opaque cursors: base64url of `e2:<version>:<mac>`, where `mac` is the first 16 bytes (hex)
/// of HMAC-SHA-256 over the client, the account and `e2:<version>`, under the service's cursor key (made at
/// migration, read from the database by every replica). A cursor this service did not issue, or issued for another
/// account or client, is refused rather than read as a position: the position is not secret (a client only ever
/// pages its own accounts), but a made-up one must not pass for ours.
public struct CursorKey: Sendable {
    private let key: SymmetricKey

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 32, "a cursor key is 32 bytes")
        self.key = SymmetricKey(data: bytes)
    }

    public func encode(client: String, account: String, beforeVersion: Int64) -> String {
        let payload = "e2:\(beforeVersion)"
        return Base64URL.encode(Array("\(payload):\(mac(client: client, account: account, payload: payload))".utf8))
    }

    public func decode(_ cursor: String, client: String, account: String) -> Int64? {
        guard cursor.utf8.count <= 200, let bytes = Base64URL.decode(cursor) else { return nil }
        let parts = String(decoding: bytes, as: UTF8.self).split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "e2", parts[1].utf8.count <= 19,
            parts[1].utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let version = Int64(parts[1]), version >= 1
        else { return nil }
        // The cursor must be exactly what this key issues for this position (one base64url spelling, one MAC),
        // compared in constant time.
        let expected = Array(encode(client: client, account: account, beforeVersion: version).utf8)
        let given = Array(cursor.utf8)
        guard expected.count == given.count else { return nil }
        var difference: UInt8 = 0
        for (a, b) in zip(expected, given) { difference |= a ^ b }
        return difference == 0 ? version : nil
    }

    private func mac(client: String, account: String, payload: String) -> String {
        // NUL separates the fields: neither client names nor account ids can contain it.
        let message = Array("\(client)\u{0}\(account)\u{0}\(payload)".utf8)
        let code = HMAC<SHA256>.authenticationCode(for: message, using: key)
        return code.prefix(16).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}

/// base64url without padding (RFC 4648 section 5), for cursors.
enum Base64URL {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
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

    static func decode(_ text: String) -> [UInt8]? {
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
