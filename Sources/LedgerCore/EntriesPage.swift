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
        // The cursor must be exactly what this key issues for this position (one base64url spelling, one MAC).
        // Both are MACed again and the codes compared with swift-crypto's constant-time `==`: the time taken says
        // nothing about how much of a guess was right, not even its length.
        let expected = encode(client: client, account: account, beforeVersion: version)
        let expectedCode = HMAC<SHA256>.authenticationCode(for: Array(expected.utf8), using: key)
        let givenCode = HMAC<SHA256>.authenticationCode(for: Array(cursor.utf8), using: key)
        return expectedCode == givenCode ? version : nil
    }

    private func mac(client: String, account: String, payload: String) -> String {
        // NUL separates the fields: neither client names nor account ids can contain it.
        let message = Array("\(client)\u{0}\(account)\u{0}\(payload)".utf8)
        let code = HMAC<SHA256>.authenticationCode(for: message, using: key)
        return Hex.encode(code.prefix(16))
    }
}
