import LedgerStore
import Logging
import ServiceLifecycle
import Synchronization

/// The long-polls of `GET /v1/events`: requests waiting for a client's next event.
///
/// While any request waits, one query every `pollInterval` reads the mark of each waiting client (it grows with
/// every event that commits, `ledger.event_marks`) and wakes the waiters whose client's mark grew. One query for
/// every waiter keeps the database's load independent of how many wait. (LISTEN/NOTIFY would need a session of its
/// own, which a transaction-mode pooler does not give, and a NOTIFY in every money-moving commit serialises commits
/// on the notification queue.) Waiters are answered early on graceful shutdown.
public final class EventWaiters: Service, Sendable {
    public enum Wake: Sendable, Equatable {
        case event
        case timeout
        case shutdown
    }

    struct Waiter {
        let client: String
        let mark: Int64
        let continuation: CheckedContinuation<Wake, Never>
    }

    struct State {
        var waiters: [Int: Waiter] = [:]
        var reserved = 0
        var nextID = 0
        var closed = false
    }

    let state = Mutex(State())
    let waitersMax: Int
    let pollInterval: Duration
    let store: LedgerStore
    let logger: Logger

    public init(store: LedgerStore, waitersMax: Int, pollInterval: Duration, logger: Logger) {
        precondition(waitersMax >= 0 && pollInterval > .zero, "event wait limits must be positive")
        self.store = store
        self.waitersMax = waitersMax
        self.pollInterval = pollInterval
        self.logger = logger
    }

    /// Waits until an event of `client` commits beyond `mark`, `timeout` passes, or the service shuts down; nil
    /// (at once) when `waitersMax` requests wait already.
    func wait(client: String, mark: Int64, timeout: Duration) async -> Wake? {
        let reservation: Int?? = state.withLock { state in
            if state.closed { return .some(nil) }
            guard state.reserved < waitersMax else { return nil }
            state.reserved += 1
            state.nextID += 1
            return .some(state.nextID)
        }
        guard let reservation else { return nil }
        guard let id = reservation else { return .shutdown }
        LedgerMetrics.eventWaiters(delta: 1)
        defer {
            state.withLock { $0.reserved -= 1 }
            LedgerMetrics.eventWaiters(delta: -1)
        }
        return await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await withCheckedContinuation { continuation in
                    let registered = state.withLock { state in
                        guard !state.closed, !Task.isCancelled else { return false }
                        state.waiters[id] = Waiter(client: client, mark: mark, continuation: continuation)
                        return true
                    }
                    guard registered else { return continuation.resume(returning: .shutdown) }
                    Task {
                        try? await Task.sleep(for: timeout)
                        self.resume(id, .timeout)
                    }
                }
            } onCancel: {
                self.resume(id, .shutdown)
            }
        } onGracefulShutdown: {
            self.resume(id, .shutdown)
        }
    }

    private func resume(_ id: Int, _ wake: Wake) {
        state.withLock { $0.waiters.removeValue(forKey: id) }?.continuation.resume(returning: wake)
    }

    public func run() async throws {
        do {
            try await cancelWhenGracefulShutdown {
                while !Task.isCancelled {
                    try await Task.sleep(for: self.pollInterval)
                    await self.pollOnce()
                }
            }
        } catch is CancellationError {}
        let left = state.withLock { state in
            state.closed = true
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in left { waiter.continuation.resume(returning: .shutdown) }
    }

    /// Wakes the waiters whose client has a new event. A failed poll is logged; the waiters wait on.
    private func pollOnce() async {
        let clients = state.withLock { Set($0.waiters.values.map(\.client)) }
        guard !clients.isEmpty else { return }
        let marks: [String: Int64]
        do {
            marks = try await store.eventMarks(clients: Array(clients))
        } catch {
            logger.warning("event poll failed", metadata: ["error": "\(error)"])
            return
        }
        let woken = state.withLock { state in
            let ids = state.waiters.filter { (marks[$0.value.client] ?? 0) > $0.value.mark }.map(\.key)
            return ids.compactMap { state.waiters.removeValue(forKey: $0) }
        }
        for waiter in woken { waiter.continuation.resume(returning: .event) }
    }
}
