/// Conditional requests on an account's version (RFC 9110 section 13): `ETag: "<version>"` on GET, `If-None-Match`
/// answered with 304, and `If-Match` on the writes whose money leaves that account.
public enum Conditional {
    /// The strong entity tag of a version.
    public static func entityTag(version: Int64) -> String { "\"\(version)\"" }

    /// The version an `If-Match` names: exactly one strong tag of 1 to 19 decimal digits without leading zeros
    /// (the values of every `If-Match` field line, as received). nil: no If-Match. A tag above Int64.max names no
    /// version there can be: -1, which never matches (412).
    public static func ifMatch(_ values: [Substring]) -> Result<Int64?, Problem> {
        guard let first = values.first else { return .success(nil) }
        guard values.count == 1 else { return .failure(.invalidIfMatch) }
        let tag = first.trimmingOWS
        let bytes = Array(tag.utf8)
        guard bytes.count >= 3, bytes.count <= 21, bytes.first == UInt8(ascii: "\""), bytes.last == UInt8(ascii: "\"")
        else { return .failure(.invalidIfMatch) }
        let digits = bytes[1..<(bytes.count - 1)]
        guard digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            digits.count == 1 || digits.first != UInt8(ascii: "0")
        else { return .failure(.invalidIfMatch) }
        return .success(Int64(String(decoding: digits, as: UTF8.self)) ?? -1)
    }

    /// Whether `If-None-Match` (the values of every field line) matches the current tag, compared weakly: `*`, or
    /// a listed tag (`"7"` or `W/"7"`) with the same opaque value. A malformed field never matches.
    public static func noneMatchMatches(_ values: [Substring], version: Int64) -> Bool {
        let current = "\(version)"
        for value in values {
            for member in value.split(separator: ",", omittingEmptySubsequences: false) {
                var tag = member.trimmingOWS
                if tag == "*" { return true }
                if tag.hasPrefix("W/") { tag = tag.dropFirst(2) }
                guard tag.count >= 2, tag.first == "\"", tag.last == "\"" else { continue }
                if tag.dropFirst().dropLast() == current { return true }
            }
        }
        return false
    }
}

extension Problem {
    public static let invalidIfMatch = Problem(
        status: 400, code: "invalid-if-match", title: "Invalid If-Match",
        detail: "If-Match must be exactly one strong entity tag of decimal digits, e.g. \"7\".")
    public static let invalidExpiry = Problem(
        status: 400, code: "invalid-expiry", title: "Invalid expiry",
        detail: "expires_in_s must be an integer from 1 to \(HoldRequest.expiresInSecondsMax).")
    public static let invalidStatus = Problem(
        status: 400, code: "invalid-status", title: "Invalid status",
        detail: "status must be one of pending, captured, voided, expired.")
    /// Same title and type as the database renders for a stored hold-not-found.
    public static func holdNotFound(_ id: String) -> Problem {
        Problem(status: 404, code: "hold-not-found", title: "Hold not found", detail: "Hold \(id) does not exist.")
    }
}
