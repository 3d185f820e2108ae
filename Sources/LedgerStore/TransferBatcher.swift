import LedgerCore
import Logging
import PostgresClient
import Synchronization

/// Group commit: concurrent credits, debits and transfers of one client are executed together, in one transaction
/// (`ledger.post_transfers`), so that one commit, one WAL flush and one round trip serve them all.
///
/// Each request's idempotency row, transfer, entries and balances still commit atomically (the batch commits or
/// nothing does), under its key's advisory lock; the answer to each is sent only after the COMMIT returned. A batch
/// forms only from what is already waiting, so a lone request is never delayed.
///
/// Fair between clients: one client runs at most `driversPerClientMax` batches at once, and a request of a client
/// with none running gets a driver of its own (up to `driversMax`, the pool's size), so a client whose rows are
/// locked or hot never holds the capacity another client needs. Bounded: at most `queueMax` requests wait (more are
/// answered unavailable at once), and one that waited `queueWaitMax` is answered unavailable instead of run.
final class TransferBatcher: Sendable {
    struct Pending: Sendable {
        let client: String
        let key: IdempotencyKey
        let request: TransferRequest
        let continuation: CheckedContinuation<LedgerStore.KeyedAnswer, any Error>
        let arrived: ContinuousClock.Instant
    }

    private struct State {
        var queue: [Pending] = []
        var drivers = 0
        /// Batches running, per client.
        var running: [String: Int] = [:]
    }

    private let state = Mutex(State())
    private let batchMax: Int
    private let driversPerClientMax: Int
    private let driversMax: Int
    private let queueMax: Int
    private let queueWaitMax: Duration
    private let executor: TransferExecutor

    init(
        executor: TransferExecutor, batchMax: Int, driversPerClientMax: Int, driversMax: Int, queueMax: Int = 10_000,
        queueWaitMax: Duration
    ) {
        precondition(batchMax >= 2 && driversPerClientMax >= 1, "a batcher needs batches of 2 or more and a driver")
        precondition(driversMax >= driversPerClientMax && queueMax >= 1 && queueWaitMax > .zero, "batcher bounds")
        self.executor = executor
        self.batchMax = batchMax
        self.driversPerClientMax = driversPerClientMax
        self.driversMax = driversMax
        self.queueMax = queueMax
        self.queueWaitMax = queueWaitMax
    }

    func submit(client: String, key: IdempotencyKey, request: TransferRequest) async throws -> LedgerStore.KeyedAnswer {
        try await withCheckedThrowingContinuation { continuation in
            let admitted = state.withLock { state -> Bool? in
                guard state.queue.count < queueMax else { return nil }
                state.queue.append(
                    Pending(client: client, key: key, request: request, continuation: continuation, arrived: .now))
                guard state.drivers < driversMax, state.running[client, default: 0] < driversPerClientMax else {
                    return false
                }
                state.drivers += 1
                return true
            }
            switch admitted {
            case nil:
                continuation.resume(
                    throwing: PostgresError(code: .poolWaitersExhausted, message: "\(queueMax) requests already wait"))
            case true?: Task { await self.drive() }
            case false?: break
            }
        }
    }

    /// Takes what waits, a batch of one client at a time, until nothing it may take does: the first waiting request
    /// whose client runs fewer than `driversPerClientMax` batches decides the client.
    private func drive() async {
        var client: String?
        while true {
            let (batch, late) = state.withLock { state -> ([Pending], [Pending]) in
                if let client { state.running[client, default: 1] -= 1 }
                let now = ContinuousClock.now
                let late = state.queue.filter { now - $0.arrived > queueWaitMax }
                if !late.isEmpty { state.queue.removeAll { now - $0.arrived > queueWaitMax } }
                guard let first = state.queue.first(where: { state.running[$0.client, default: 0] < driversPerClientMax })
                else {
                    state.drivers -= 1
                    precondition(state.drivers >= 0, "batch drivers below zero")
                    return ([], late)
                }
                var taken: [Pending] = []
                var kept: [Pending] = []
                for pending in state.queue {
                    if taken.count < batchMax && pending.client == first.client { taken.append(pending) } else { kept.append(pending) }
                }
                state.queue = kept
                state.running[first.client, default: 0] += 1
                return (taken, late)
            }
            for pending in late {
                pending.continuation.resume(
                    throwing: PostgresError(code: .poolAcquireTimeout, message: "waited too long for a batch"))
            }
            if batch.isEmpty { return }
            client = batch[0].client
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
        } catch let error as PostgresError where error.isConnectionError || error.isQueryCanceled || error.isLockTimeout {
            // The COMMIT's outcome is unknown, nothing ran, or the batch ran out of time: every request answers 503
            // at once (run one by one, each would wait out the same timeout again), and its retry replays or executes
            // once.
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
