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
        return UUID().uuidString.lowercased()
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
        Counter(
            label: "ledger_db_errors_total", dimensions: [("sqlstate_class", sqlClass), ("kind", error.databaseKind)]
        ).increment()
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
