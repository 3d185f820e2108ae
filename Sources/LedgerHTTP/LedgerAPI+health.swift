import Synchronization
import Hummingbird
import LedgerCore
import LedgerStore
import Logging
import ServiceLifecycle

/// Whether this process still wants new requests: false from the moment shutdown begins. `GET /health/ready` says so
/// with a 503 while requests already sent to it are still answered.
public final class Readiness: Sendable {
    private let draining = Atomic<Bool>(false)

    public init() {}

    public var isDraining: Bool { draining.load(ordering: .relaxed) }

    public func beginDraining() { draining.store(true, ordering: .relaxed) }
}

/// The first service to hear of a shutdown (put it after the application in the service group, which stops services
/// in reverse order): readiness fails at once, and the server keeps serving for `delay` more, so that a balancer
/// polling `/health/ready` stops sending requests before the listener closes. Then the application stops as usual.
public struct DrainService: Service {
    let readiness: Readiness
    let delay: Duration
    let logger: Logger

    public init(readiness: Readiness, delay: Duration, logger: Logger) {
        self.readiness = readiness
        self.delay = delay
        self.logger = logger
    }

    public func run() async throws {
        try? await gracefulShutdown()
        readiness.beginDraining()
        logger.info("draining: /health/ready answers 503", metadata: ["drain.delay": "\(delay)"])
        // Sleeps through even when cancelled late: the drain is what the operator asked for.
        try? await Task.sleep(for: delay)
    }
}

/// `GET /health`, `/health/live` and `/health/ready`.
extension LedgerAPI {
    /// `GET /health/live`: 200 as long as the process answers HTTP; it never touches the database, so a database
    /// outage does not get every replica restarted.
    func live(_ call: RouteCall) -> Response {
        .json(status: 200, body: "{\"status\":\"ok\"}")
    }

    /// `GET /health/ready`: 503 shutting-down from the start of a shutdown, else what `GET /health` answers.
    func ready(_ call: RouteCall) async throws -> Response {
        if readiness.isDraining { throw Problem.shuttingDown(retryAfterSeconds: options.retryAfterSeconds) }
        return try await health(call)
    }

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
