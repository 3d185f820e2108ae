import HTTPTypes
import LedgerClient
import Testing

@Suite("Retry policy: backoff bounds, full jitter, what is retried")
struct RetryPolicyTests {
    @Test("the bound doubles from the base and stops at the maximum")
    func bounds() {
        let policy = RetryPolicy(retryBaseMs: 100, retryMaxMs: 10_000)
        #expect((0...8).map { policy.backoffBoundMs(retry: $0) } == [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000])
    }

    @Test("huge retry counts and limits neither overflow nor exceed the maximum")
    func noOverflow() {
        let policy = RetryPolicy(retryBaseMs: Int.max / 3, retryMaxMs: Int.max)
        #expect(policy.backoffBoundMs(retry: 1_000) == Int.max)
        #expect(RetryPolicy(retryBaseMs: 100, retryMaxMs: 10_000).backoffBoundMs(retry: 10_000) == 10_000)
        #expect(RetryPolicy(retryBaseMs: 0, retryMaxMs: 10_000).backoffBoundMs(retry: 5) == 0)
        #expect(RetryPolicy(retryBaseMs: 500, retryMaxMs: 100).backoffBoundMs(retry: 0) == 100)
    }

    @Test("full jitter draws from 0 up to the bound")
    func fullJitter() {
        let policy = RetryPolicy(retryBaseMs: 100, retryMaxMs: 10_000)
        var ranges: [ClosedRange<Int>] = []
        _ = policy.delayMs(retry: 3, retryAfterMs: nil) { ranges.append($0); return $0.upperBound }
        #expect(ranges == [0...800])
        for _ in 0..<200 {
            let delay = policy.delayMs(retry: 2, retryAfterMs: nil)
            #expect((0...400).contains(delay))
        }
    }

    @Test("Retry-After is a floor, even above the maximum backoff")
    func retryAfterFloor() {
        let policy = RetryPolicy(retryBaseMs: 100, retryMaxMs: 1_000)
        #expect(policy.delayMs(retry: 0, retryAfterMs: 3_000) { $0.upperBound } == 3_000)
        #expect(policy.delayMs(retry: 5, retryAfterMs: 0) { $0.upperBound } == 1_000)
        #expect(policy.delayMs(retry: 5, retryAfterMs: 0) { $0.lowerBound } == 0)
    }

    @Test("retried: 409 in progress, 429, 502, 503, 504; nothing else")
    func retryable() {
        for status in [429, 502, 503, 504] { #expect(RetryPolicy.isRetryable(status: status, problemCode: nil)) }
        #expect(RetryPolicy.isRetryable(status: 409, problemCode: "idempotency-key-in-progress"))
        #expect(!RetryPolicy.isRetryable(status: 409, problemCode: "account-conflict"))
        #expect(!RetryPolicy.isRetryable(status: 409, problemCode: nil))
        for status in [200, 201, 304, 400, 401, 404, 412, 413, 422, 500, 501] {
            #expect(!RetryPolicy.isRetryable(status: status, problemCode: nil))
        }
    }

    @Test("an answer's problem, replay flag and Idempotency-TTL are read from it")
    func answer() {
        var response = HTTPResponse(status: .init(code: 422))
        response.headerFields[HTTPField.Name("Idempotent-Replayed")!] = "true"
        response.headerFields[HTTPField.Name("Idempotency-TTL")!] = "86399"
        let body = #"{"type":"urn:ledger:problem:insufficient-funds","title":"Insufficient funds","status":422,"detail":"x","code":"insufficient-funds"}"#
        let answer = LedgerAnswer(response: response, body: Array(body.utf8))
        #expect(answer.problem?.code == "insufficient-funds")
        #expect(answer.problem?.status == 422)
        #expect(answer.replayed)
        #expect(answer.idempotencyTTLSeconds == 86_399)
        #expect(!answer.isSuccess)
        #expect(LedgerAnswer(response: HTTPResponse(status: .created), body: Array(body.utf8)).problem == nil)
    }
}
