/// What a POST to /v1/holds asks for, once decoded and validated.
public struct HoldRequest: Sendable, Equatable {
    public static let expiresInSecondsDefault = 604_800
    public static let expiresInSecondsMax = 2_592_000

    public var from: String
    /// nil: `@world` (money that leaves the ledger when captured).
    public var to: String?
    public var amount: Int64
    public var currency: String
    public var expiresInSeconds: Int
    public var metadataJSON: String
    /// `POST /v1/holds\n<canonical body>`.
    public var fingerprintText: String
    /// The version `If-Match` names for `from`.
    public private(set) var ifMatch: Int64? = nil

    /// This request under `If-Match`, which the fingerprint covers.
    public func conditioned(on version: Int64?) -> HoldRequest {
        var copy = self
        copy.ifMatch = version
        if let version { copy.fingerprintText += "\nIf-Match: \(version)" }
        return copy
    }

    /// Checks in the order of a transfer (shape, account ids, amount, currency, same-account, metadata), then
    /// `expires_in_s`. `to` may be absent; present, it must be a client account id (never null or `@world`).
    public static func decode(body: [UInt8]) -> Result<HoldRequest, Problem> {
        let value: JSONValue
        switch TransferRequest.parseJSON(body) {
        case .success(let parsed): value = parsed
        case .failure(let problem): return .failure(problem)
        }
        let allowed: Set<String> = ["from", "to", "amount", "currency", "expires_in_s", "metadata"]
        if let problem = TransferRequest.objectProblem(value, allowed: allowed) { return .failure(problem) }
        var ids: [String?] = []
        for field in ["from", "to"] {
            if field == "to" && value["to"] == nil {
                ids.append(nil)
                continue
            }
            guard case .string(let id)? = value[field], LedgerRules.isValidAccountID(id) else {
                return .failure(.invalidAccountID("\(field) must be an account id matching [A-Za-z0-9][A-Za-z0-9._:-]{0,63}."))
            }
            ids.append(id)
        }
        guard case .number(let lexeme)? = value["amount"], let amount = LedgerRules.amount(fromLexeme: lexeme) else {
            return .failure(.invalidAmount("amount must be an integer from 1 to \(LedgerRules.amountMax)."))
        }
        guard case .string(let currency)? = value["currency"], LedgerRules.isValidCurrency(currency) else {
            return .failure(.invalidCurrency("currency must be three upper-case letters, e.g. USD."))
        }
        if ids[0] == ids[1] { return .failure(.sameAccount) }
        let metadataJSON: String
        switch TransferRequest.decodeMetadata(value["metadata"]) {
        case .success(let text): metadataJSON = text
        case .failure(let problem): return .failure(problem)
        }
        var expires = expiresInSecondsDefault
        if let given = value["expires_in_s"] {
            guard case .number(let lexeme) = given, let seconds = LedgerRules.amount(fromLexeme: lexeme),
                seconds <= Int64(expiresInSecondsMax)
            else {
                return .failure(.invalidExpiry)
            }
            expires = Int(seconds)
        }
        return .success(
            HoldRequest(
                from: ids[0]!, to: ids[1], amount: amount, currency: currency, expiresInSeconds: expires,
                metadataJSON: metadataJSON, fingerprintText: "POST /v1/holds\n\(value.canonicalText)"))
    }
}

/// The body of a capture (`POST /v1/holds/{id}/capture`) or a reversal (`POST /v1/transfers/{id}/reversals`):
/// `amount` and `metadata`, both optional; an empty body is `{}`.
public struct AmendRequest: Sendable, Equatable {
    public var amount: Int64?
    /// Compact JSON of `metadata` when the body has that member (even `{}`), else nil.
    public var metadataJSON: String?
    /// `POST <path>\n<canonical body>`.
    public var fingerprintText: String

    public static func decode(path: String, body: [UInt8]) -> Result<AmendRequest, Problem> {
        let value: JSONValue
        switch body.isEmpty ? .success(.object([])) : TransferRequest.parseJSON(body) {
        case .success(let parsed): value = parsed
        case .failure(let problem): return .failure(problem)
        }
        if let problem = TransferRequest.objectProblem(value, allowed: ["amount", "metadata"]) { return .failure(problem) }
        var amount: Int64?
        if let given = value["amount"] {
            guard case .number(let lexeme) = given, let parsed = LedgerRules.amount(fromLexeme: lexeme) else {
                return .failure(.invalidAmount("amount must be an integer from 1 to \(LedgerRules.amountMax)."))
            }
            amount = parsed
        }
        var metadataJSON: String?
        if let given = value["metadata"] {
            switch TransferRequest.decodeMetadata(given) {
            case .success(let text): metadataJSON = text
            case .failure(let problem): return .failure(problem)
            }
        }
        return .success(
            AmendRequest(amount: amount, metadataJSON: metadataJSON, fingerprintText: "POST \(path)\n\(value.canonicalText)"))
    }

    /// A void's body: `{}` or empty; any member is invalid-json. Returns the fingerprint text.
    public static func decodeVoid(path: String, body: [UInt8]) -> Result<String, Problem> {
        let value: JSONValue
        switch body.isEmpty ? .success(.object([])) : TransferRequest.parseJSON(body) {
        case .success(let parsed): value = parsed
        case .failure(let problem): return .failure(problem)
        }
        if let problem = TransferRequest.objectProblem(value, allowed: []) { return .failure(problem) }
        return .success("POST \(path)\n\(value.canonicalText)")
    }
}

/// `status` of GET /v1/accounts/{id}/holds.
public enum HoldStatus: String, Sendable, CaseIterable {
    case pending, captured, voided, expired

    public static func parse(_ text: String?) -> Result<HoldStatus?, Problem> {
        guard let text else { return .success(nil) }
        guard let status = HoldStatus(rawValue: text) else { return .failure(.invalidStatus) }
        return .success(status)
    }
}
