import Foundation
import HTTPTypes
import LedgerCore
import OpenAPIRuntime

/// Sends a request again, with the same key and the same body bytes, until an answer is definitive or the policy's
/// attempts or time run out (see `RetryPolicy`). It sits in the generated client's middleware chain, so every
/// typed call retries the same way.
struct RetryMiddleware: ClientMiddleware {
    let policy: RetryPolicy
    let observer: (@Sendable (RetryEvent) -> Void)?
    /// Bodies are read whole so that every attempt sends the same bytes; answers are read whole to see a 409's code.
    static let bodyBytesMax = 16 * 1024 * 1024

    func intercept(
        _ request: HTTPRequest, body: HTTPBody?, baseURL: URL, operationID: String,
        next: @Sendable (HTTPRequest, HTTPBody?, URL) async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        let bytes = try await Self.collect(body)
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(policy.timeoutS)
        var attempt = 1
        while true {
            let failure: RetryEvent.Failure
            do {
                // The chain's `next` outlives no call of this function: the time limit waits for its task.
                let answer = try await withoutActuallyEscaping(next) { send in
                    try await Self.withTimeLimit(attemptLimit(until: deadline, clock: clock)) {
                        let (response, responseBody) = try await send(request, bytes.map { HTTPBody($0) }, baseURL)
                        return LedgerAnswer(response: response, body: try await Self.collect(responseBody) ?? [])
                    }
                }
                guard answer.isRetryable else {
                    AnswerRecorder.current?.record(answer)
                    return (answer.response, HTTPBody(answer.body))
                }
                failure = .answer(answer)
            } catch {
                // The caller's own cancellation ends the call; anything else was this attempt's failure.
                if Task.isCancelled { throw error }
                failure = .noAnswer(Self.describe(error))
            }
            let waitMs = try nextWaitMs(after: failure, attempt: attempt, deadline: deadline, clock: clock)
            observer?(RetryEvent(attempt: attempt, failure: failure, waitMs: waitMs))
            try await Task.sleep(for: .milliseconds(waitMs))
            attempt += 1
        }
    }

    /// How long to wait before the next attempt, or the error that ends the call when there is none to make.
    private func nextWaitMs(
        after failure: RetryEvent.Failure, attempt: Int, deadline: ContinuousClock.Instant, clock: ContinuousClock
    ) throws -> Int {
        let gaveUp = LedgerClientError.gaveUp(attempts: attempt, last: failure)
        guard attempt <= policy.retriesMax else { throw gaveUp }
        let retryAfterMs = failure.answer?.retryAfter.flatMap { RetryAfter.delayMs($0) }
        let waitMs = policy.delayMs(retry: attempt - 1, retryAfterMs: retryAfterMs)
        // A wait that ends past the deadline would only delay the same outcome: give up now.
        guard clock.now.advanced(by: .milliseconds(waitMs)) < deadline else { throw gaveUp }
        return waitMs
    }

    static func collect(_ body: HTTPBody?) async throws -> [UInt8]? {
        guard let body else { return nil }
        return try await [UInt8](collecting: body, upTo: bodyBytesMax)
    }

    /// The transport's own error under the runtime's wrapping, in one line.
    static func describe(_ error: any Error) -> String {
        if let error = error as? ClientError { return String(describing: error.underlyingError) }
        return String(describing: error)
    }

    private func attemptLimit(until deadline: ContinuousClock.Instant, clock: ContinuousClock) -> Duration {
        min(.seconds(policy.attemptTimeoutS), clock.now.duration(to: deadline))
    }

    /// Runs `body`, cancelling it once `limit` has passed; cancellation stops the HTTP request underneath.
    static func withTimeLimit<T: Sendable>(
        _ limit: Duration, _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T.self) { group in
            group.addTask { try await body() }
            group.addTask {
                try await Task.sleep(for: limit)
                throw AttemptTimedOut(limit: limit)
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }
}

struct AttemptTimedOut: Error, CustomStringConvertible {
    let limit: Duration
    var description: String { "no answer within \(limit)" }
}

/// One retry about to happen, for a caller that logs or counts them.
public struct RetryEvent: Sendable {
    public enum Failure: Sendable {
        /// An answer worth retrying (409 in progress, 429, 502, 503, 504).
        case answer(LedgerAnswer)
        /// No answer: a connection error or a timeout, described.
        case noAnswer(String)

        public var answer: LedgerAnswer? {
            if case .answer(let answer) = self { return answer }
            return nil
        }
    }

    /// The attempt that failed, from 1.
    public var attempt: Int
    public var failure: Failure
    /// The wait before the next attempt.
    public var waitMs: Int
}
