import LedgerStore
import Logging
import ServiceLifecycle

/// How long stored responses are kept, and how the background purge runs.
public struct RetentionOptions: Sendable {
    /// Stored responses older than this are purged. Default 24 h (the contract's minimum promise).
    public var retention: Duration
    /// Time between purge runs. Default 60 s.
    public var purgeInterval: Duration
    /// Rows deleted per statement. Default 1,000.
    public var purgeBatchSize: Int
    /// Batches per run at most, so one run never holds a connection for long. Default 100.
    public var purgeBatchesMax: Int

    public init(
        retention: Duration = .seconds(86_400), purgeInterval: Duration = .seconds(60), purgeBatchSize: Int = 1_000,
        purgeBatchesMax: Int = 100
    ) {
        precondition(purgeBatchSize >= 1 && purgeBatchesMax >= 1, "purge bounds must be positive")
        self.retention = retention
        self.purgeInterval = purgeInterval
        self.purgeBatchSize = purgeBatchSize
        self.purgeBatchesMax = purgeBatchesMax
    }
}

/// Purges stored responses past their retention every `purgeInterval`, until graceful shutdown. A failed run (the
/// database is down, say) is logged and tried again at the next interval.
///
/// Not part of the HTTP layer: it serves no request, and `ledger serve` adds it beside the HTTP server.
public struct PurgeService: Service {
    let store: LedgerStore
    let options: RetentionOptions
    let logger: Logger

    public init(store: LedgerStore, options: RetentionOptions, logger: Logger) {
        self.store = store
        self.options = options
        self.logger = logger
    }

    public func run() async throws {
        // The first run waits one interval: at start, migrations may still be running.
        do {
            try await cancelWhenGracefulShutdown {
                while !Task.isCancelled {
                    try await Task.sleep(for: options.purgeInterval)
                    await purgeOnce()
                }
            }
        } catch is CancellationError {
            // Graceful shutdown: nothing to finish, the next run of any replica picks up where this one stopped.
        }
    }

    private func purgeOnce() async {
        do {
            let deleted = try await store.purgeStoredResponses(
                retention: options.retention, batchSize: options.purgeBatchSize, batchesMax: options.purgeBatchesMax)
            if deleted > 0 {
                logger.info("purged stored responses", metadata: ["purge.deleted": "\(deleted)"])
            }
        } catch {
            logger.warning("purge failed; retrying at the next interval", metadata: ["error": "\(error)"])
        }
    }
}
