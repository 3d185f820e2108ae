import Foundation
import LedgerCore
import Logging
import Metrics
import LedgerStore
import Synchronization

/// What one request did, gathered while it runs, for its log line and its metrics.
final class RequestTrace {
    let requestID: String
    var route = "unmatched"
    var client: String?
    var idempotencyOutcome: String?
    var problemCode: String?
    /// `Preference-Applied` of a keyed POST with a well-formed `Prefer: wait`, sent on whatever it answers.
    var preferenceApplied: String?

    init(requestID: String) {
        self.requestID = requestID
    }

    /// The client's `X-Request-Id` when it is a sane token (1-128 visible ASCII characters), else a new one.
    static func requestID(from header: String?) -> String {
        if let header, (1...128).contains(header.utf8.count), header.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) {
            return header
        }
        return newRequestID()
    }

    /// This process's random 64 bits, then a count: unique across replicas and restarts without a system call per
    /// request (Foundation's `UUID()` opened, read and closed /dev/urandom each time: 6 % of the service's CPU when
    /// it answers replays). A request id is a label for logs, not a secret.
    private static let processPrefix: String = {
        var generator = SystemRandomNumberGenerator()
        return hex16(generator.next())
    }()
    private static let requestCount = Atomic<UInt64>(0)

    static func newRequestID() -> String {
        let count = requestCount.wrappingAdd(1, ordering: .relaxed).newValue
        return processPrefix + "-" + hex16(count)
    }

    /// The 16 hex digits of a value, most significant first.
    private static func hex16(_ value: UInt64) -> String {
        Hex.encode(stride(from: 56, through: 0, by: -8).map { UInt8(truncatingIfNeeded: value >> UInt64($0)) })
    }
}

/// The service's metrics, through swift-metrics (exported by swift-prometheus at GET /metrics). Labels are route
/// templates, status codes, outcomes and SQLSTATE classes only: never an id, a key or a token.
enum LedgerMetrics {
    /// Handles made so far, by label and dimensions: asking the metrics backend for one validates its names and takes
    /// its registry's lock, on every request. Bounded by the label sets, which are finite by design.
    private static let counters = Mutex<[String: Counter]>([:])
    private static let timers = Mutex<[String: Timer]>([:])

    private static func handleKey(_ label: String, _ dimensions: [(String, String)]) -> String {
        dimensions.reduce(label) { $0 + "\u{1F}" + $1.0 + "=" + $1.1 }
    }

    static func counter(_ label: String, _ dimensions: [(String, String)] = []) -> Counter {
        known(in: counters, handleKey(label, dimensions)) { Counter(label: label, dimensions: dimensions) }
    }

    static func timer(_ label: String, _ dimensions: [(String, String)] = []) -> Timer {
        known(in: timers, handleKey(label, dimensions)) { Timer(label: label, dimensions: dimensions) }
    }

    private static func known<Handle: Sendable>(
        in cache: borrowing Mutex<[String: Handle]>, _ key: String, make: () -> Handle
    ) -> Handle {
        if let known = cache.withLock({ $0[key] }) { return known }
        let made = make()
        cache.withLock { $0[key] = made }
        return made
    }

    static func request(route: String, method: String, status: Int, duration: Duration) {
        counter("ledger_http_requests_total", [("route", route), ("method", method), ("status", String(status))])
            .increment()
        timer("ledger_http_request_duration_seconds", [("route", route)])
            .recordNanoseconds(duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000)
    }

    /// The idempotency outcome of a POST: executed, replayed, reused (422), in_progress (409). A high replay rate
    /// means clients retry a lot: a sign of client timeouts set too short, or of a retry bug.
    static func idempotency(outcome: String) {
        counter("ledger_idempotency_outcomes_total", [("outcome", outcome)]).increment()
        switch outcome {
        case "replayed": counter("ledger_idempotent_replays_total").increment()
        case "reused": counter("ledger_idempotency_key_reused_total").increment()
        case "in_progress": counter("ledger_idempotency_key_in_progress_total").increment()
        default: break
        }
    }

    /// A business outcome stored for replay: insufficient-funds, currency-mismatch, account-not-found, ...
    static func businessProblem(code: String) {
        counter("ledger_transfer_problems_total", [("code", code)]).increment()
        if code == "insufficient-funds" { counter("ledger_insufficient_funds_total").increment() }
    }

    /// `kind` is the client library's kind of failure (`connectionFailed`, `server`, ...), which the store keeps
    /// for exactly this: finer than the store's three codes, and the label dashboards already use.
    static func databaseError(_ error: LedgerStoreError) {
        let sqlClass = error.sqlState.map { String($0.prefix(2)) } ?? "none"
        counter("ledger_db_errors_total", [("sqlstate_class", sqlClass), ("kind", error.databaseKind)]).increment()
    }

    /// The `# HELP` text of every family, by name. `GET /metrics` adds it to the exposition (the swift-metrics
    /// front end has no help text of its own); the OpenAPI test checks that every family has one.
    static let help: [String: String] = [
        "ledger_http_requests_total": "HTTP requests answered, by route template, method and status.",
        "ledger_http_request_duration_seconds": "Time to answer an HTTP request, by route template.",
        "ledger_idempotency_outcomes_total": "Keyed POSTs by idempotency outcome: executed, replayed, reused (422), in_progress (409).",
        "ledger_idempotent_replays_total": "Keyed POSTs answered with a stored outcome (Idempotent-Replayed: true).",
        "ledger_idempotency_key_reused_total": "Keyed POSTs refused 422 idempotency-key-reused: a key sent with another request.",
        "ledger_idempotency_key_in_progress_total": "Keyed POSTs refused 409 idempotency-key-in-progress: the key was busy past the wait.",
        "ledger_transfer_problems_total": "Stored business failures executed now, by problem code.",
        "ledger_insufficient_funds_total": "Stored 422 insufficient-funds failures executed now.",
        "ledger_db_errors_total": "Database failures, by SQLSTATE class (none without one) and client library kind.",
        "ledger_holds_total": "Hold operations executed now: placed, captured, voided, or the stored problem code.",
        "ledger_reversals_total": "Reversals executed now: reversed, or the stored problem code.",
        "ledger_wait_preferences_total": "Keyed POSTs that sent Prefer: wait=N.",
        "ledger_idempotency_key_lookups_total": "GET /v1/idempotency-keys/{key} answers, by state.",
        "ledger_precondition_failed_total": "Stored 412 version-mismatch failures executed now (a stale If-Match).",
        "ledger_batch_items_total": "Items of batches executed now: succeeded, failed, or rolled_back (an atomic batch with a failed item).",
        "ledger_db_pool_connections": "Database connections of this process's pool, by state (in_use, idle).",
        "ledger_db_pool_waiting": "Requests waiting for a database connection of the pool.",
        "ledger_events_waiters": "GET /v1/events requests of this process waiting for an event now.",
        "ledger_events_appended": "Events appended to the feed so far (all clients).",
        "ledger_webhook_deliveries_total": "Webhook delivery attempts by outcome: delivered, retry, failed (attempts exhausted), gone (410).",
        "ledger_webhook_delivery_lag_seconds": "Time from an event's commit to its webhook's 2xx.",
        "ledger_webhook_deliveries_pending": "Webhook deliveries waiting to be attempted (all clients).",
        "ledger_webhook_deliveries_failed": "Webhook deliveries that exhausted their attempts (all clients).",
    ]

    /// Creates at zero every series whose labels are known in advance, so that each family is exported from the
    /// start (a rate over a series that appears with its first event misses that event). Request series exist per
    /// route with its usual success status; database errors with the kind of an unreachable server.
    static func prepare(routes: [(method: String, pattern: String)]) {
        for route in routes {
            let status = route.method == "POST" ? "201" : "200"
            _ = counter("ledger_http_requests_total", [("route", route.pattern), ("method", route.method), ("status", status)])
            _ = timer("ledger_http_request_duration_seconds", [("route", route.pattern)])
        }
        for outcome in ["executed", "replayed", "reused", "in_progress"] {
            _ = counter("ledger_idempotency_outcomes_total", [("outcome", outcome)])
        }
        for name in [
            "ledger_idempotent_replays_total", "ledger_idempotency_key_reused_total",
            "ledger_idempotency_key_in_progress_total", "ledger_insufficient_funds_total",
            "ledger_precondition_failed_total", "ledger_wait_preferences_total",
        ] {
            _ = counter(name)
        }
        for code in ["account-not-found", "insufficient-funds", "currency-mismatch", "balance-overflow", "version-mismatch"] {
            _ = counter("ledger_transfer_problems_total", [("code", code)])
        }
        _ = counter("ledger_db_errors_total", [("sqlstate_class", "none"), ("kind", "connectionFailed")])
        for outcome in ["placed", "captured", "voided"] { _ = counter("ledger_holds_total", [("outcome", outcome)]) }
        _ = counter("ledger_reversals_total", [("outcome", "reversed")])
        for state in ["completed", "in_progress", "consumed", "not_found"] {
            _ = counter("ledger_idempotency_key_lookups_total", [("state", state)])
        }
        batchItems((0, 0, 0))
        Gauge(label: "ledger_db_pool_connections", dimensions: [("state", "in_use")]).record(0)
        Gauge(label: "ledger_db_pool_connections", dimensions: [("state", "idle")]).record(0)
        Gauge(label: "ledger_db_pool_waiting").record(0)
        Gauge(label: "ledger_events_waiters").record(0)
        for outcome in ["delivered", "retry", "failed", "gone"] {
            _ = counter("ledger_webhook_deliveries_total", [("outcome", outcome)])
        }
        _ = timer("ledger_webhook_delivery_lag_seconds")
    }

    /// The exposition with a `# HELP` line before each family's `# TYPE` line.
    static func withHelp(_ exposition: [UInt8]) -> [UInt8] {
        var text = ""
        for line in String(decoding: exposition, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("# TYPE "), let name = line.dropFirst(7).split(separator: " ").first,
                let help = help[String(name)]
            {
                text += "# HELP \(name) \(help)\n"
            }
            text += line + "\n"
        }
        return Array(text.dropLast().utf8)
    }

    /// `ledger_holds_total{outcome}`: placed, captured, voided, or the code of the stored failure; replays are not
    /// counted (they change nothing).
    static func holdOutcome(_ outcome: LedgerStore.PostOutcome, action: String) {
        guard case .executed(let status, let body) = outcome else { return }
        let label = status < 300 ? action : (Problem.code(ofJSON: body) ?? "unknown")
        counter("ledger_holds_total", [("outcome", label)]).increment()
    }

    /// `ledger_reversals_total{outcome}`: reversed, or the code of the stored failure.
    static func reversalOutcome(_ outcome: LedgerStore.PostOutcome) {
        guard case .executed(let status, let body) = outcome else { return }
        let label = status < 300 ? "reversed" : (Problem.code(ofJSON: body) ?? "unknown")
        counter("ledger_reversals_total", [("outcome", label)]).increment()
    }

    /// `ledger_precondition_failed_total`: a 412 version-mismatch executed (a stale If-Match).
    static func waitPreference() {
        counter("ledger_wait_preferences_total").increment()
    }

    static func idempotencyKeyLookup(state: String) {
        counter("ledger_idempotency_key_lookups_total", [("state", state)]).increment()
    }

    static func preconditionFailed() {
        counter("ledger_precondition_failed_total").increment()
    }

    /// `ledger_batch_items_total{outcome}`: the items of batches executed now (replays are not counted).
    static func batchItems(_ items: (succeeded: Int, failed: Int, rolledBack: Int)) {
        counter("ledger_batch_items_total", [("outcome", "succeeded")]).increment(by: items.succeeded)
        counter("ledger_batch_items_total", [("outcome", "failed")]).increment(by: items.failed)
        counter("ledger_batch_items_total", [("outcome", "rolled_back")]).increment(by: items.rolledBack)
    }

    private static let waiting = Mutex(0)

    /// `ledger_events_waiters`: requests of GET /v1/events waiting for an event now.
    static func eventWaiters(delta: Int) {
        Gauge(label: "ledger_events_waiters").record(waiting.withLock { $0 += delta; return $0 })
    }

    static func pool(_ stats: LedgerStore.PoolStatistics) {
        Gauge(label: "ledger_db_pool_connections", dimensions: [("state", "in_use")]).record(stats.inUse)
        Gauge(label: "ledger_db_pool_connections", dimensions: [("state", "idle")]).record(stats.idle)
        Gauge(label: "ledger_db_pool_waiting").record(stats.waiting)
    }
}
