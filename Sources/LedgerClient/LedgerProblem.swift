import Foundation

/// An RFC 9457 problem the service answered (`application/problem+json`): the typed error of every call.
public struct LedgerProblem: Error, Sendable, Hashable, Decodable {
    /// `urn:ledger:problem:<code>`.
    public var type: String
    public var title: String
    public var status: Int
    public var detail: String
    /// The stable slug to branch on (`insufficient-funds`, `idempotency-key-in-progress`, ...).
    public var code: String
    /// `version-mismatch` only: the payer's version now.
    public var currentVersion: Int64?

    enum CodingKeys: String, CodingKey {
        case type, title, status, detail, code
        case currentVersion = "current_version"
    }

    /// The problem in a response body, or nil when the body is not one.
    public static func decode(_ body: some Collection<UInt8>) -> LedgerProblem? {
        try? JSONDecoder().decode(LedgerProblem.self, from: Data(body))
    }
}
