import Foundation
import HTTPTypes
import OpenAPIRuntime

/// Sends the generated calls' string headers as written.
///
/// The OpenAPI runtime writes a string header value as a URI component, percent-encoded: `If-Match: "7"` would
/// leave as `%227%22` and `Prefer: wait=5` as `wait%3D5`, which the service rightly refuses or ignores. Its
/// percent-encoding is exact (every byte outside the unreserved set, `%` included), so decoding it gives back the
/// value the caller passed.
struct PlainHeadersMiddleware: ClientMiddleware {
    static let names: [HTTPField.Name] = ["Idempotency-Key", "If-Match", "If-None-Match", "Prefer", "X-Request-Id"]
        .compactMap { HTTPField.Name($0) }

    func intercept(
        _ request: HTTPRequest, body: HTTPBody?, baseURL: URL, operationID: String,
        next: @Sendable (HTTPRequest, HTTPBody?, URL) async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        var request = request
        for name in Self.names {
            guard let value = request.headerFields[name], let plain = value.removingPercentEncoding else { continue }
            request.headerFields[name] = plain
        }
        return try await next(request, body, baseURL)
    }
}
