import HTTPTypes
import Hummingbird
import NIOCore
import LedgerCore

extension HTTPField.Name {
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    static let idempotentReplayed = HTTPField.Name("Idempotent-Replayed")!
    static let xRequestID = HTTPField.Name("X-Request-Id")!
    static let idempotencyTTL = HTTPField.Name("Idempotency-TTL")!
    static let preferField = HTTPField.Name("Prefer")!
    static let preferenceAppliedField = HTTPField.Name("Preference-Applied")!
}

extension Response {
    /// A JSON body we already hold as text: success bodies are `application/json`, problems
    /// `application/problem+json`, decided by the status as the contract says.
    static func json(status: Int, body: String, headers: HTTPFields = [:]) -> Response {
        var headers = headers
        headers[.contentType] = (200..<300).contains(status) ? "application/json" : "application/problem+json"
        return Response(
            status: .ledger(status), headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
    }

    static func problem(_ problem: Problem) -> Response {
        var headers: HTTPFields = [:]
        if let seconds = problem.retryAfterSeconds { headers[.retryAfter] = String(seconds) }
        if let allow = problem.allow { headers[.allow] = allow.joined(separator: ", ") }
        if problem.status == 401 { headers[.wwwAuthenticate] = "Bearer" }
        return json(status: problem.status, body: problem.jsonText, headers: headers)
    }
}

extension HTTPResponse.Status {
    /// The status for a code, with its standard reason phrase.
    static func ledger(_ code: Int) -> HTTPResponse.Status {
        switch code {
        case 200: return .ok
        case 201: return .created
        case 400: return .badRequest
        case 401: return .unauthorized
        case 404: return .notFound
        case 405: return .methodNotAllowed
        case 409: return .conflict
        case 412: return .preconditionFailed
        case 413: return .contentTooLarge
        case 415: return .unsupportedMediaType
        case 422: return .unprocessableContent
        case 500: return .internalServerError
        case 501: return .notImplemented
        case 503: return .serviceUnavailable
        default: return HTTPResponse.Status(code: code)
        }
    }
}
