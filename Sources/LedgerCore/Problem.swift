/// An RFC 9457 problem, with the contract's exact `code` slug.
///
/// Problems of outcomes that are stored for replay (account-not-found, insufficient-funds, currency-mismatch,
/// balance-overflow) are rendered by the database in the same shape (see `ledger.problem_json` in sql/), so that a
/// stored answer can be replayed byte for byte; everything else is rendered here.
public struct Problem: Error, Sendable, Equatable {
    public var status: Int
    public var code: String
    public var title: String
    public var detail: String
    /// Seconds for `Retry-After` (409 in progress, 503).
    public var retryAfterSeconds: Int?
    /// Methods for `Allow` (405).
    public var allow: [String]?

    public init(
        status: Int, code: String, title: String, detail: String, retryAfterSeconds: Int? = nil, allow: [String]? = nil
    ) {
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.retryAfterSeconds = retryAfterSeconds
        self.allow = allow
    }

    /// The type URI of a code: a stable name, not a page to fetch.
    public static func typeURI(_ code: String) -> String { "urn:ledger:problem:\(code)" }

    /// The `code` of a problem+json body (a stored outcome rendered by the database), or nil.
    public static func code(ofJSON json: String) -> String? {
        guard let value = try? JSONParser.parse(Array(json.utf8)), case .string(let code)? = value["code"] else {
            return nil
        }
        return code
    }

    /// `{"type":...,"title":...,"status":...,"detail":...,"code":...}`, compact.
    public var jsonText: String {
        "{\"type\":\(JSONValue.quoted(Problem.typeURI(code))),\"title\":\(JSONValue.quoted(title)),"
            + "\"status\":\(status),\"detail\":\(JSONValue.quoted(detail)),\"code\":\(JSONValue.quoted(code))}"
    }
}

extension Problem {
    public static func unauthorized(_ detail: String) -> Problem {
        Problem(status: 401, code: "unauthorized", title: "Unauthorized", detail: detail)
    }
    public static func bodyTooLarge(limitBytes: Int) -> Problem {
        Problem(
            status: 413, code: "body-too-large", title: "Request body too large",
            detail: "The request body is larger than \(limitBytes) bytes.")
    }
    public static func notFound() -> Problem {
        Problem(status: 404, code: "not-found", title: "Not found", detail: "No such route.")
    }
    public static func methodNotAllowed(allow: [String]) -> Problem {
        Problem(
            status: 405, code: "method-not-allowed", title: "Method not allowed",
            detail: "This route accepts \(allow.joined(separator: ", ")).", allow: allow)
    }
    public static func unsupportedMediaType() -> Problem {
        Problem(
            status: 415, code: "unsupported-media-type", title: "Unsupported media type",
            detail: "Send the body as application/json.")
    }
    public static let idempotencyKeyMissing = Problem(
        status: 400, code: "idempotency-key-missing", title: "Idempotency-Key missing",
        detail: "This request needs an Idempotency-Key header.")
    public static func idempotencyKeyInvalid(_ detail: String) -> Problem {
        Problem(status: 400, code: "idempotency-key-invalid", title: "Idempotency-Key invalid", detail: detail)
    }
    public static func invalidJSON(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-json", title: "Invalid JSON body", detail: detail)
    }
    public static func invalidAmount(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-amount", title: "Invalid amount", detail: detail)
    }
    public static func invalidCurrency(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-currency", title: "Invalid currency", detail: detail)
    }
    public static func invalidAccountID(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-account-id", title: "Invalid account id", detail: detail)
    }
    public static let sameAccount = Problem(
        status: 400, code: "same-account", title: "Same account", detail: "from and to must be different accounts.")
    public static func invalidMetadata(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-metadata", title: "Invalid metadata", detail: detail)
    }
    public static func invalidBatch(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-batch", title: "Invalid batch", detail: detail)
    }
    public static func invalidLimit(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-limit", title: "Invalid limit", detail: detail)
    }
    public static let invalidCursor = Problem(
        status: 400, code: "invalid-cursor", title: "Invalid cursor",
        detail: "The cursor was not issued by this service for this account.")
    public static let idempotencyKeyReused = Problem(
        status: 422, code: "idempotency-key-reused", title: "Idempotency-Key reused",
        detail: "This Idempotency-Key was already used with a different request.")
    public static func idempotencyKeyInProgress(retryAfterSeconds: Int) -> Problem {
        Problem(
            status: 409, code: "idempotency-key-in-progress", title: "Idempotency-Key in progress",
            detail: "A request with this Idempotency-Key is still being processed; retry later.",
            retryAfterSeconds: retryAfterSeconds)
    }
    public static let accountConflict = Problem(
        status: 409, code: "account-conflict", title: "Account conflict",
        detail: "The account exists with other settings.")
    /// Same title and type as the database renders for a stored account-not-found.
    public static func accountNotFound(_ id: String) -> Problem {
        Problem(
            status: 404, code: "account-not-found", title: "Account not found", detail: "Account \(id) does not exist.")
    }
    public static let idempotencyKeyNotFound = Problem(
        status: 404, code: "idempotency-key-not-found", title: "Idempotency-Key not found",
        detail: "This client has no such Idempotency-Key: never used, or its purged outcome made nothing.")
    public static func transferNotFound(_ id: String) -> Problem {
        Problem(
            status: 404, code: "transfer-not-found", title: "Transfer not found",
            detail: "Transfer \(id) does not exist.")
    }
    public static func databaseUnavailable(retryAfterSeconds: Int) -> Problem {
        Problem(
            status: 503, code: "database-unavailable", title: "Database unavailable",
            detail: "The database could not be reached or did not answer in time; nothing was written. Retry later.",
            retryAfterSeconds: retryAfterSeconds)
    }
    public static func shuttingDown(retryAfterSeconds: Int) -> Problem {
        Problem(
            status: 503, code: "shutting-down", title: "Shutting down",
            detail: "This instance is draining before it stops; send new requests to another one.",
            retryAfterSeconds: retryAfterSeconds)
    }
    public static let malformedBody = Problem(
        status: 400, code: "malformed-request", title: "Malformed request",
        detail: "The request's body framing is malformed or the body ended early.")
    public static let transferCodingNotImplemented = Problem(
        status: 501, code: "transfer-coding-not-implemented", title: "Transfer-coding not implemented",
        detail: "Only chunked framing is supported for request bodies.")
    public static let internalError = Problem(
        status: 500, code: "internal", title: "Internal error", detail: "An unexpected error occurred.")
}
