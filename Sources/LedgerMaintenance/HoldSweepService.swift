import LedgerStore
import Logging
import ServiceLifecycle

/// Records holds past their `expires_at` as expired, every `interval`, until graceful shutdown.
///
/// Requests and reads already treat such a hold as expired from its `expires_at` on (the database's clock decides);
/// the sweep writes it down, so that the hold's row, the payer's `held` column and psql agree within one interval.
/// Several replicas share the work (the SQL skips holds another sweep has locked). A failed run is logged and tried
/// again at the next interval.
public struct HoldSweepService: Service {
    /// Time between sweeps. Default 1,000 ms (the contract's bound on recording an expiry).
    public var interval: Duration
    /// Holds recorded per statement, at most; a sweep runs statements until one records fewer. Default 1,000.
    public var batchSize: Int
    /// Statements per sweep at most, so that one sweep never holds a connection for long. Default 100.
    public var batchesMax: Int
    let store: LedgerStore
    let logger: Logger

    public init(store: LedgerStore, interval: Duration, batchSize: Int = 1_000, batchesMax: Int = 100, logger: Logger) {
        precondition(interval > .zero, "the sweep interval must be positive")
        precondition((1...10_000).contains(batchSize) && batchesMax >= 1, "sweep bounds must be positive")
        self.store = store
        self.interval = interval
        self.batchSize = batchSize
        self.batchesMax = batchesMax
        self.logger = logger
    }

    public func run() async throws {
        do {
            try await cancelWhenGracefulShutdown {
                while !Task.isCancelled {
                    try await Task.sleep(for: interval)
                    await sweepOnce()
                }
            }
        } catch is CancellationError {
            // Graceful shutdown: what is left is recorded by the next sweep of any replica.
        }
    }

    private func sweepOnce() async {
        do {
            var recorded = 0
            for _ in 0..<batchesMax {
                let n = try await store.expireHolds(batchSize: batchSize)
                recorded += n
                if n < batchSize { break }
            }
            if recorded > 0 { logger.debug("recorded expired holds", metadata: ["holds.expired": "\(recorded)"]) }
        } catch {
            logger.warning("hold sweep failed; retrying at the next interval", metadata: ["error": "\(error)"])
        }
    }
}
