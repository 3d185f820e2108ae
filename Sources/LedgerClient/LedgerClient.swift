import AsyncHTTPClient
import Foundation
import HTTPTypes
import NIOCore
import OpenAPIAsyncHTTPClient
import OpenAPIRuntime
import Synchronization

/// A client of the Ledger HTTP API: the typed calls generated from the served OpenAPI description (`api`), each
/// sent through the retry policy with the bearer token.
///
///     let ledger = LedgerClient(url: URL(string: "http://127.0.0.1:8080")!, token: token)
///     let key = LedgerClient.newIdempotencyKey()   // keep it until the answer is definitive
///     let (answer, output) = try await ledger.answer {
///         try await $0.postTransfer(headers: .init(idempotencyKey: key), body: .json(.init(
///             from: "alice", to: "bob", amount: 250, currency: "USD")))
///     }
public struct LedgerClient: Sendable {
    /// Every operation of the description, typed; calls retry as `policy` says.
    public let api: Client
    public let policy: RetryPolicy

    /// - Parameter onRetry: called before each wait for another attempt (to log it; never with the token).
    public init(
        url: URL, token: String?, policy: RetryPolicy = RetryPolicy(), httpClient: HTTPClient = sharedHTTPClient,
        onRetry: (@Sendable (RetryEvent) -> Void)? = nil
    ) {
        self.policy = policy
        // The retry middleware bounds each attempt and the whole call itself; the transport's own bound only
        // backs it up.
        let transport = AsyncHTTPClientTransport(
            configuration: .init(client: httpClient, timeout: .seconds(Int64(max(1, policy.timeoutS)))))
        // Outermost first: the request is finished before the retry middleware keeps it for every attempt.
        var middlewares: [any ClientMiddleware] = [
            PlainHeadersMiddleware(), RetryMiddleware(policy: policy, observer: onRetry),
        ]
        if let token { middlewares.insert(BearerTokenMiddleware(token: token), at: 0) }
        api = Client(
            serverURL: url,
            // The service's times carry microseconds.
            configuration: Configuration(dateTranscoder: .iso8601WithFractionalSeconds),
            transport: transport,
            middlewares: middlewares)
    }

    /// The HTTP client calls use unless given another. async-http-client's own retries of failed connection
    /// attempts are off: they would go on silently until the connect timeout, where the retry policy retries with
    /// jitter, within its bounds, and reports each retry. The service never redirects. Like `HTTPClient.shared`,
    /// it lives as long as the process.
    public static let sharedHTTPClient: HTTPClient = {
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.timeout.connect = .seconds(10)
        configuration.redirectConfiguration = .disallow
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    /// A fresh key for a new operation: a random UUID. Reuse it for every retry of that operation, never for
    /// another.
    public static func newIdempotencyKey() -> String { UUID().uuidString.lowercased() }

    /// Runs one typed call and returns the final answer as the service sent it (status, headers, body bytes)
    /// along with the typed output, which is nil when the body did not decode as described.
    ///
    /// Throws `LedgerClientError.gaveUp` when there was no definitive answer within the policy.
    public func answer<Output: Sendable>(
        _ call: (Client) async throws -> Output
    ) async throws -> (answer: LedgerAnswer, output: Output?) {
        let recorder = AnswerRecorder()
        do {
            let output = try await AnswerRecorder.$current.withValue(recorder) { try await call(api) }
            guard let answer = recorder.answer else { throw LedgerClientError.noAnswerRecorded }
            return (answer, output)
        } catch let error as ClientError {
            if let gaveUp = error.underlyingError as? LedgerClientError { throw gaveUp }
            guard let answer = recorder.answer else { throw error }
            return (answer, nil)
        }
    }
}

/// Adds `Authorization: Bearer <token>` to every request.
struct BearerTokenMiddleware: ClientMiddleware {
    let token: String

    func intercept(
        _ request: HTTPRequest, body: HTTPBody?, baseURL: URL, operationID: String,
        next: @Sendable (HTTPRequest, HTTPBody?, URL) async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        var request = request
        request.headerFields[.authorization] = "Bearer \(token)"
        return try await next(request, body, baseURL)
    }
}

/// Keeps the final answer of the call running in this task, for `LedgerClient.answer`.
final class AnswerRecorder: Sendable {
    @TaskLocal static var current: AnswerRecorder?
    private let stored = Mutex<LedgerAnswer?>(nil)

    func record(_ answer: LedgerAnswer) { stored.withLock { $0 = answer } }
    var answer: LedgerAnswer? { stored.withLock { $0 } }
}
