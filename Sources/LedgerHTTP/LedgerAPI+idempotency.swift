import Hummingbird
import LedgerCore
import LedgerStore

/// What every idempotent POST shares: the Idempotency-Key header, and the answer built from the stored outcome.
extension LedgerAPI {
    /// The Idempotency-Key of a POST, then its media type: the contract checks the key before the body.
    func idempotencyKey(_ request: Request) throws -> IdempotencyKey {
        try conditionalKey(request, ifMatch: false).key
    }

    /// The Idempotency-Key, then `If-Match` (400 invalid-if-match right after the key, as the contract orders
    /// them), then the media type. `ifMatch: false`: a route that takes no If-Match ignores it.
    func conditionalKey(_ request: Request, ifMatch: Bool = true) throws -> (key: IdempotencyKey, version: Int64?) {
        let key = try IdempotencyKey.parse(headerValues: request.headers[values: .idempotencyKey]).get()
        let version = ifMatch ? try Conditional.ifMatch(request.headers[values: .ifMatch].map { Substring($0) }).get() : nil
        try checkContentType(request)
        return (key, version)
    }

    /// What every keyed POST reads of its headers, in the contract's order: `Prefer: wait` (noted first, so that
    /// even a 400 for the key carries `Preference-Applied`), the Idempotency-Key, `If-Match` (when the route takes
    /// it), the media type. `keyWait`: this request's bound on the wait for its key, in ms, or nil for the default.
    func keyedRequest(_ call: RouteCall, ifMatch: Bool = true) throws
        -> (key: IdempotencyKey, version: Int64?, keyWait: Int?)
    {
        let keyWait = waitBound(call)
        let (key, version) = try conditionalKey(call.request, ifMatch: ifMatch)
        return (key, version, keyWait)
    }

    /// `Prefer: wait=<seconds>` (RFC 7240), cut to `--key-wait-ms`; nil when absent or malformed (ignored: the
    /// default wait applies and no Preference-Applied is sent). The bound used is echoed in whole seconds, rounded
    /// down, as `Preference-Applied: wait=N` on every answer to this request.
    func waitBound(_ call: RouteCall) -> Int? {
        guard let seconds = WaitPreference.seconds(inPreferValues: call.request.headers[values: .preferField]) else {
            return nil
        }
        let keyWaitMax = store.options.keyWaitMilliseconds
        let bound = seconds > keyWaitMax / 1_000 ? keyWaitMax : seconds * 1_000
        call.trace.preferenceApplied = "wait=\(bound / 1_000)"
        LedgerMetrics.waitPreference()
        return bound
    }

    /// The answer to an idempotent POST: its stored outcome (with `Idempotency-TTL`), or 422 reused, or 409 in
    /// progress.
    func answer(_ keyed: LedgerStore.KeyedAnswer, trace: RequestTrace) throws -> Response {
        var response = try answer(keyed.outcome, trace: trace)
        if let ttl = keyed.ttlSeconds(retentionSeconds: store.options.retentionSeconds) {
            response.headers[.idempotencyTTL] = String(ttl)
        }
        return response
    }

    /// The same without a TTL.
    func answer(_ outcome: LedgerStore.PostOutcome, trace: RequestTrace) throws -> Response {
        switch outcome {
        case .executed(let status, let json):
            return answer(status: status, body: json, replayed: false, trace: trace)
        case .replayed(let status, let json):
            return answer(status: status, body: json, replayed: true, trace: trace)
        case .reused:
            trace.idempotencyOutcome = "reused"
            LedgerMetrics.idempotency(outcome: "reused")
            throw Problem.idempotencyKeyReused
        case .inProgress:
            trace.idempotencyOutcome = "in_progress"
            LedgerMetrics.idempotency(outcome: "in_progress")
            throw Problem.idempotencyKeyInProgress(retryAfterSeconds: options.retryAfterSeconds)
        }
    }

    /// A stored outcome (201 or a stored problem), first time or replayed, with `Idempotent-Replayed`.
    private func answer(status: Int, body: String, replayed: Bool, trace: RequestTrace) -> Response {
        let outcome = replayed ? "replayed" : "executed"
        trace.idempotencyOutcome = outcome
        LedgerMetrics.idempotency(outcome: outcome)
        if status != 201, let code = Problem.code(ofJSON: body) {
            trace.problemCode = code
            if !replayed {
                LedgerMetrics.businessProblem(code: code)
                if code == "version-mismatch" { LedgerMetrics.preconditionFailed() }
            }
        }
        return .json(status: status, body: body, headers: [.idempotentReplayed: replayed ? "true" : "false"])
    }
}
