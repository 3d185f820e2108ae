import HTTPTypes

/// An answer as the service sent it: status, headers and the body's bytes, untouched.
public struct LedgerAnswer: Sendable {
    public var response: HTTPResponse
    public var body: [UInt8]

    public init(response: HTTPResponse, body: [UInt8]) {
        self.response = response
        self.body = body
    }

    public var status: Int { response.status.code }
    public var isSuccess: Bool { response.status.kind == .successful }
    /// The problem the body carries, for any answer that is not a success.
    public var problem: LedgerProblem? { isSuccess ? nil : LedgerProblem.decode(body) }
    public var retryAfter: String? { response.headerFields[.retryAfter] }
    /// `true` when the service replayed a stored outcome of this key instead of executing.
    public var replayed: Bool { response.headerFields[HTTPField.Name("Idempotent-Replayed")!] == "true" }
    /// Seconds during which a retry with this key still replays this outcome (stored outcomes only).
    public var idempotencyTTLSeconds: Int? {
        response.headerFields[HTTPField.Name("Idempotency-TTL")!].flatMap { Int($0) }
    }

    var isRetryable: Bool {
        RetryPolicy.isRetryable(status: status, problemCode: status == 409 ? problem?.code : nil)
    }
}

/// Why a call ended without a definitive answer.
public enum LedgerClientError: Error, Sendable, CustomStringConvertible {
    /// Attempts or time ran out while every answer was retryable or missing. The key may or may not have
    /// executed: sending the same request with the same key later tells (it replays or executes once).
    case gaveUp(attempts: Int, last: RetryEvent.Failure)
    /// The call returned without passing through the client's middleware (not expected).
    case noAnswerRecorded

    public var description: String {
        switch self {
        case .gaveUp(let attempts, .answer(let answer)):
            let code = answer.problem?.code ?? "no problem body"
            return "gave up after \(attempts) attempt\(attempts == 1 ? "" : "s"); the last answer was \(answer.status) \(code)"
        case .gaveUp(let attempts, .noAnswer(let reason)):
            return "gave up after \(attempts) attempt\(attempts == 1 ? "" : "s"); the last one got no answer: \(reason)"
        case .noAnswerRecorded:
            return "the call ended without an answer"
        }
    }
}
