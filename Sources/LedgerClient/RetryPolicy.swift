/// When and how long to wait before sending the same request again.
///
/// A retry resends the same Idempotency-Key with the same body bytes, so the service either replays the first
/// outcome or executes the request once: retrying is safe whatever the failure was. What is retried is what a
/// later attempt may answer differently: no answer at all (a connection error or timeout), 409
/// `idempotency-key-in-progress` (the first attempt still runs), 429, 502, 503 and 504. Everything else is
/// definitive: the same request would get the same answer.
public struct RetryPolicy: Sendable, Hashable {
    /// The first backoff bound; each retry doubles it, up to `retryMaxMs`.
    public var retryBaseMs: Int
    /// The largest backoff bound. A `Retry-After` the service sends may be longer and is still honoured.
    public var retryMaxMs: Int
    /// Retries after the first attempt; 0 sends the request once.
    public var retriesMax: Int
    /// The time all attempts and waits may take together, in seconds.
    public var timeoutS: Int
    /// One attempt's bound, in seconds (cut to what is left of `timeoutS`): an attempt that hears nothing by then
    /// counts as a timeout and is retried.
    public var attemptTimeoutS: Int

    public init(
        retryBaseMs: Int = 100, retryMaxMs: Int = 10_000, retriesMax: Int = 8, timeoutS: Int = 60,
        attemptTimeoutS: Int = 20
    ) {
        self.retryBaseMs = retryBaseMs
        self.retryMaxMs = retryMaxMs
        self.retriesMax = retriesMax
        self.timeoutS = timeoutS
        self.attemptTimeoutS = attemptTimeoutS
    }

    /// The upper bound of the wait before retry number `retry` (0 for the first retry): base * 2^retry, at most
    /// `retryMaxMs`. Computed without overflow for any retry count.
    public func backoffBoundMs(retry: Int) -> Int {
        let base = max(0, retryBaseMs)
        let cap = max(0, retryMaxMs)
        guard base > 0 else { return 0 }
        var bound = base
        for _ in 0..<max(0, retry) {
            if bound >= cap { break }
            bound = bound > cap / 2 ? cap : bound * 2
        }
        return min(bound, cap)
    }

    /// The wait before retry number `retry`: "full jitter", a uniform draw from 0 to the backoff bound, so that
    /// clients that failed together do not come back together. A `Retry-After` is a floor: the service asked not
    /// to be asked again before it.
    public func delayMs(retry: Int, retryAfterMs: Int?, random: (ClosedRange<Int>) -> Int = { Int.random(in: $0) })
        -> Int
    {
        let jittered = random(0...backoffBoundMs(retry: retry))
        guard let retryAfterMs else { return jittered }
        return max(jittered, retryAfterMs)
    }

    /// Whether an answer with this status (and, for 409, this problem code) is worth sending again.
    public static func isRetryable(status: Int, problemCode: String?) -> Bool {
        switch status {
        case 409: return problemCode == "idempotency-key-in-progress"
        case 429, 502, 503, 504: return true
        default: return false
        }
    }
}
