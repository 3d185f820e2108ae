import Synchronization
import Hummingbird
import LedgerCore
import LedgerStore
import Logging

/// `GET /health`: 200 when the database answers, else 503 database-unavailable with Retry-After.
extension LedgerAPI {
    /// 200 when the database answers `SELECT 1` within `healthDeadline`, else 503: a database that stopped answering
    /// (a frozen host, a partition dropping packets) must not hang the probe that is meant to notice it. The ping is
    /// not awaited past the deadline: its libpq call may block until TCP gives up, and only its own task waits.
    func health(_ call: RouteCall) async throws -> Response {
        do {
            let outcome = await firstOf(ping: store, deadline: Self.healthDeadline)
            switch outcome {
            case .answered: break
            case .failed(let error): throw error
            case .timedOut:
                logger.warning("health check timed out", metadata: ["health.deadline": "\(Self.healthDeadline)"])
                throw Problem.databaseUnavailable(retryAfterSeconds: options.retryAfterSeconds)
            }
        } catch let error as LedgerStoreError {
            // Whatever the store's code: a database that does not answer `SELECT 1` is unavailable to this service.
            logger.warning("health check failed", metadata: ["error": "\(error)"])
            throw Problem.databaseUnavailable(retryAfterSeconds: error.retryAfterSeconds ?? options.retryAfterSeconds)
        }
        return .json(status: 200, body: "{\"status\":\"ok\"}")
    }

    /// How long /health waits for `SELECT 1`. Fixed: probes (a balancer, compose's healthcheck) have timeouts of a
    /// few seconds of their own.
    static let healthDeadline: Duration = .seconds(2)

    enum PingOutcome: Sendable {
        case answered, timedOut
        case failed(any Error)
    }

    /// Whichever comes first: the ping's answer or the deadline. The loser is left to finish on its own.
    func firstOf(ping store: LedgerStore, deadline: Duration) async -> PingOutcome {
        let decided = Mutex<CheckedContinuation<PingOutcome, Never>?>(nil)
        return await withCheckedContinuation { continuation in
            decided.withLock { $0 = continuation }
            let decide: @Sendable (PingOutcome) -> Void = { outcome in
                decided.withLock { pending in
                    pending?.resume(returning: outcome)
                    pending = nil
                }
            }
            Task {
                do {
                    try await store.ping()
                    decide(.answered)
                } catch {
                    decide(.failed(error))
                }
            }
            Task {
                try? await Task.sleep(for: deadline)
                decide(.timedOut)
            }
        }
    }
}
