import LedgerCore
import Logging
import PostgresClient
import Synchronization

/// Group commit: concurrent credits, debits and transfers of one client are executed together, in one transaction
/// (`ledger.post_transfers`), so that one commit, one WAL flush and one round trip serve them all.
///
/// Each request's idempotency row, transfer, entries and balances still commit atomically (the batch commits or
/// nothing does), under its key's advisory lock; the answer to each is sent only after the COMMIT returned. A batch
/// forms only from what is already waiting, so a lone request is never delayed: at most `driversMax` batches run at
/// once (one per pooled connection) and a request arriving meanwhile waits for the next one.
final class TransferBatcher: Sendable {
    struct Pending: Sendable {
        let client: String
        let key: IdempotencyKey
        let request: TransferRequest
        let continuation: CheckedContinuation<LedgerStore.KeyedAnswer, any Error>
    }

    private struct State {
        var queue: [Pending] = []
        var drivers = 0
    }

    private let state = Mutex(State())
    private let batchMax: Int
    private let driversMax: Int
    private let executor: TransferExecutor

    init(executor: TransferExecutor, batchMax: Int, driversMax: Int) {
        precondition(batchMax >= 2 && driversMax >= 1, "a batcher needs batches of 2 or more and a driver")
        self.executor = executor
        self.batchMax = batchMax
        self.driversMax = driversMax
    }

    func submit(client: String, key: IdempotencyKey, request: TransferRequest) async throws -> LedgerStore.KeyedAnswer {
        try await withCheckedThrowingContinuation { continuation in
            let startDriver = state.withLock { state -> Bool in
                state.queue.append(Pending(client: client, key: key, request: request, continuation: continuation))
                guard state.drivers < driversMax else { return false }
                state.drivers += 1
                return true
            }
            if startDriver { Task { await self.drive() } }
        }
    }

    /// Takes what waits, in batches of one client, until nothing does.
    private func drive() async {
        while true {
            let batch = state.withLock { state -> [Pending] in
                guard let first = state.queue.first else {
                    state.drivers -= 1
                    return []
                }
                var taken: [Pending] = []
                var kept: [Pending] = []
                for pending in state.queue {
                    if taken.count < batchMax && pending.client == first.client { taken.append(pending) } else { kept.append(pending) }
                }
                state.queue = kept
                return taken
            }
            if batch.isEmpty { return }
            await run(batch)
        }
    }

    private func run(_ batch: [Pending]) async {
        if batch.count == 1 {
            await runAlone(batch[0])
            return
        }
        let outcomes: [LedgerStore.KeyedAnswer?]
        do {
            outcomes = try await executor.postTogether(client: batch[0].client, items: batch.map { ($0.key, $0.request) })
        } catch let error as PostgresError where error.isConnectionError {
            // The COMMIT's outcome is unknown, or nothing ran: every request answers 503, and its retry replays or
            // executes once.
            for pending in batch { pending.continuation.resume(throwing: error) }
            return
        } catch {
            // The database refused the batch as a whole and rolled all of it back: run each request on its own, so
            // that one request's failure is its own.
            await withTaskGroup(of: Void.self) { group in
                for pending in batch { group.addTask { await self.runAlone(pending) } }
            }
            return
        }
        for (pending, outcome) in zip(batch, outcomes) {
            if let outcome {
                pending.continuation.resume(returning: outcome)
            } else {
                // Busy: its key is held by another execution; on its own it waits for it (bounded).
                Task { await self.runAlone(pending) }
            }
        }
    }

    private func runAlone(_ pending: Pending) async {
        do {
            pending.continuation.resume(
                returning: try await executor.postAlone(client: pending.client, key: pending.key, request: pending.request))
        } catch {
            pending.continuation.resume(throwing: error)
        }
    }
}
