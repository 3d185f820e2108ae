/// What a POST to /v1/credits, /v1/debits or /v1/transfers asks for, once decoded and validated.
public struct TransferRequest: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        case credit, debit, transfer

        /// The route that posts this kind.
        public var path: String {
            switch self {
            case .credit: return "/v1/credits"
            case .debit: return "/v1/debits"
            case .transfer: return "/v1/transfers"
            }
        }

        var accountFields: [String] {
            switch self {
            case .credit, .debit: return ["account"]
            case .transfer: return ["from", "to"]
            }
        }
    }

    public var kind: Kind
    /// The client's account for credits and debits; `from` for transfers.
    public var from: String?
    public var to: String?
    public var amount: Int64
    public var currency: String
    /// Compact JSON of the metadata object; `{}` when absent.
    public var metadataJSON: String
    /// `POST <path>\n<canonical body>`: the text the idempotency fingerprint is the SHA-256 of.
    public var fingerprintText: String
    /// The version `If-Match` names for the account whose money goes out (the credited account of a credit).
    public private(set) var ifMatch: Int64? = nil

    /// This request under `If-Match`, which the fingerprint covers: the same key and body with another (or no)
    /// If-Match is another request.
    public func conditioned(on version: Int64?) -> TransferRequest {
        var copy = self
        copy.ifMatch = version
        if let version { copy.fingerprintText += "\nIf-Match: \(version)" }
        return copy
    }

    /// The client's own account(s) the request names, in request order.
    public var accounts: [String] { [from, to].compactMap { $0 } }

    /// Decodes and validates a body. Checks go field by field in a fixed order, so one body always gets one code:
    /// JSON shape and unknown fields, account ids, amount, currency, same-account, metadata.
    public static func decode(kind: Kind, body: [UInt8]) -> Result<TransferRequest, Problem> {
        parseJSON(body).flatMap { decode(kind: kind, value: $0, fingerprinted: true) }
    }

    /// The body as JSON, or invalid-json.
    static func parseJSON(_ body: [UInt8]) -> Result<JSONValue, Problem> {
        do {
            return .success(try JSONParser.parse(body))
        } catch {
            return .failure(.invalidJSON("The body is not valid JSON: \(error.reason) at byte \(error.offset)."))
        }
    }

    /// Validates one request's JSON; `fingerprinted: false` (an item of a batch, whose fingerprint is the batch's)
    /// leaves `fingerprintText` empty.
    static func decode(kind: Kind, value: JSONValue, fingerprinted: Bool) -> Result<TransferRequest, Problem> {
        if let problem = objectProblem(value, allowed: Set(kind.accountFields + ["amount", "currency", "metadata"])) {
            return .failure(problem)
        }

        var ids: [String] = []
        for field in kind.accountFields {
            guard case .string(let id)? = value[field] else {
                return .failure(.invalidAccountID("\(field) must be a string account id."))
            }
            guard LedgerRules.isValidAccountID(id) else {
                return .failure(
                    .invalidAccountID("\(field) must match [A-Za-z0-9][A-Za-z0-9._:-]{0,63}."))
            }
            ids.append(id)
        }
        guard case .number(let lexeme)? = value["amount"], let amount = LedgerRules.amount(fromLexeme: lexeme) else {
            return .failure(.invalidAmount("amount must be an integer from 1 to \(LedgerRules.amountMax)."))
        }
        guard case .string(let currency)? = value["currency"], LedgerRules.isValidCurrency(currency) else {
            return .failure(.invalidCurrency("currency must be three upper-case letters, e.g. USD."))
        }
        if kind == .transfer && ids[0] == ids[1] { return .failure(.sameAccount) }
        let metadataJSON: String
        switch decodeMetadata(value["metadata"]) {
        case .success(let text): metadataJSON = text
        case .failure(let problem): return .failure(problem)
        }

        let from: String?
        let to: String?
        switch kind {
        case .credit: (from, to) = (nil, ids[0])
        case .debit: (from, to) = (ids[0], nil)
        case .transfer: (from, to) = (ids[0], ids[1])
        }
        return .success(
            TransferRequest(
                kind: kind, from: from, to: to, amount: amount, currency: currency, metadataJSON: metadataJSON,
                fingerprintText: fingerprinted ? "POST \(kind.path)\n\(value.canonicalText)" : ""))
    }

    /// invalid-json unless `value` is an object with no member outside `allowed`.
    static func objectProblem(_ value: JSONValue, allowed: Set<String>) -> Problem? {
        guard case .object(let members) = value else { return .invalidJSON("The body must be a JSON object.") }
        if let unknown = members.first(where: { !allowed.contains($0.key) }) {
            return .invalidJSON("Unknown field \(JSONValue.quoted(unknown.key)).")
        }
        return nil
    }

    static func decodeMetadata(_ value: JSONValue?) -> Result<String, Problem> {
        guard let value else { return .success("{}") }
        guard case .object = value else { return .failure(.invalidMetadata("metadata must be a JSON object.")) }
        // PostgreSQL's jsonb cannot hold U+0000; refuse it here rather than fail in the database.
        guard !value.containsNUL else { return .failure(.invalidMetadata("metadata must not contain U+0000.")) }
        // Measured on the numbers as the database stores them (no exponents), which is also what it sends back.
        guard let stored = value.expandingNumbers() else {
            return .failure(.invalidMetadata("metadata holds a number too large or too small to store."))
        }
        let text = stored.compactText
        guard text.utf8.count <= LedgerRules.metadataBytesMax else {
            return .failure(
                .invalidMetadata("metadata is larger than \(LedgerRules.metadataBytesMax) bytes as compact JSON."))
        }
        return .success(text)
    }
}

/// The body of PUT /v1/accounts/{id}.
public struct AccountRequest: Sendable, Equatable {
    public var currency: String
    public var allowNegative: Bool

    public init(currency: String, allowNegative: Bool) {
        self.currency = currency
        self.allowNegative = allowNegative
    }

    public static func decode(body: [UInt8]) -> Result<AccountRequest, Problem> {
        let value: JSONValue
        switch TransferRequest.parseJSON(body) {
        case .success(let parsed): value = parsed
        case .failure(let problem): return .failure(problem)
        }
        if let problem = TransferRequest.objectProblem(value, allowed: ["currency", "allow_negative"]) {
            return .failure(problem)
        }
        guard case .string(let currency)? = value["currency"], LedgerRules.isValidCurrency(currency) else {
            return .failure(.invalidCurrency("currency must be three upper-case letters, e.g. USD."))
        }
        var allowNegative = false
        if let flag = value["allow_negative"] {
            guard case .bool(let bool) = flag else { return .failure(.invalidJSON("allow_negative must be a boolean.")) }
            allowNegative = bool
        }
        return .success(AccountRequest(currency: currency, allowNegative: allowNegative))
    }
}
