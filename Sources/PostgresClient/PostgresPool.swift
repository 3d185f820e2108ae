import Dispatch
import Logging
import NIOPosix
import Synchronization

/// A bounded pool of PostgreSQL connections.
///
/// - At most `poolSizeMax` connections are open or opening at once; connections are opened lazily.
/// - Tasks that find none free wait in FIFO order, at most `acquireWaitMax`, then fail with `.poolAcquireTimeout`.
/// - A connection goes back to the pool only when it is open and outside a transaction; anything else (a killed
///   backend, a server restart, an unknown COMMIT outcome, a leaked transaction) is closed and its slot freed, so a
///   broken connection is never handed out again.
/// - libpq calls run on a private `NIOThreadPool` with one thread per connection (see `PostgresConnection`).
public final class PostgresPool: Sendable {
    public let configuration: PostgresConfiguration
    private let threadPool: NIOThreadPool
    private let state: Mutex<State>
    private let logger: Logger

    /// A waiter gets either a connection handed over, or the right to open one (a slot already counted).
    private enum Handoff: Sendable {
        case connection(PostgresConnection)
        case openSlot
    }

    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Handoff, any Error>
    }

    private struct State {
        var idle: [PostgresConnection] = []
        /// Connections open or being opened, idle or leased.
        var slotsUsed = 0
        var waiters: [Waiter] = []
        var nextWaiterID: UInt64 = 0
        var closed = false
        /// Connections lent out now, so that closing the pool can cancel what they run.
        var leased: [ObjectIdentifier: PostgresConnection] = [:]
    }

    /// A snapshot for metrics and tests.
    public struct Stats: Sendable, Equatable {
        public var open: Int
        public var idle: Int
        public var waiting: Int
        public var inUse: Int { open - idle }
    }

    public init(configuration: PostgresConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        // One thread per connection so that `poolSizeMax` blocking calls can run at once, plus one for closing.
        self.threadPool = NIOThreadPool(numberOfThreads: configuration.poolSizeMax + 1)
        self.threadPool.start()
        self.state = Mutex(State())
        startWatchdog()
    }

    /// Keeps the call deadline (`callTimeoutMilliseconds`): a few times per deadline, every leased connection whose
    /// running call has waited longer is given up (`PostgresConnection.abandonIfOverdue`). One task per pool, so a
    /// call pays nothing for its deadline but two clock reads under a lock it takes anyway.
    private func startWatchdog() {
        let timeoutMilliseconds = configuration.callTimeoutMilliseconds
        guard timeoutMilliseconds > 0 else { return }
        let interval = Duration.milliseconds(min(250, max(10, timeoutMilliseconds / 4)))
        let timeoutNanoseconds = UInt64(timeoutMilliseconds) * 1_000_000
        Task { [weak self] in
            while true {
                try? await Task.sleep(for: interval)
                guard let self else { return }
                let (closed, leased) = self.state.withLock { ($0.closed, Array($0.leased.values)) }
                if closed { return }
                let now = DispatchTime.now().uptimeNanoseconds
                for connection in leased
                where connection.abandonIfOverdue(nowNanoseconds: now, timeoutNanoseconds: timeoutNanoseconds) {
                    self.logger.warning(
                        "a database call went unanswered past the call timeout; its connection was dropped",
                        metadata: ["postgres.call_timeout_ms": "\(timeoutMilliseconds)"])
                }
            }
        }
    }

    public var stats: Stats {
        state.withLock { Stats(open: $0.slotsUsed, idle: $0.idle.count, waiting: $0.waiters.count) }
    }

    /// Leases a connection for the duration of `body`, then returns it (or discards it if it is no longer usable).
    public func withConnection<T: Sendable>(
        _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        let connection = try await acquire()
        state.withLock { $0.leased[ObjectIdentifier(connection)] = connection }
        defer { state.withLock { _ = $0.leased.removeValue(forKey: ObjectIdentifier(connection)) } }
        do {
            let value = try await body(connection)
            release(connection)
            return value
        } catch {
            release(connection)
            throw error
        }
    }

    /// Runs `body` in a transaction on a leased connection.
    public func withTransaction<T: Sendable>(
        _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        try await withConnection { try await $0.withTransaction(body) }
    }

    /// One statement on a leased connection, in its own implicit transaction.
    @discardableResult
    public func query(_ sql: String, _ binds: [PostgresBind] = []) async throws -> PostgresRows {
        try await withConnection { try await $0.query(sql, binds) }
    }

    /// Fails every waiter, closes idle connections, cancels what leased ones run (a shutdown past its grace must
    /// not wait for a statement's timeout) and closes them when they come back.
    public func close() async {
        let (idle, waiters, leased) = state.withLock { state -> ([PostgresConnection], [Waiter], [PostgresConnection]) in
            state.closed = true
            defer {
                state.slotsUsed -= state.idle.count
                state.idle = []
                state.waiters = []
            }
            return (state.idle, state.waiters, Array(state.leased.values))
        }
        for waiter in waiters {
            waiter.continuation.resume(throwing: PostgresError(code: .poolClosed, message: "the pool is closed"))
        }
        for connection in idle { connection.close() }
        for connection in leased { connection.cancelRunningStatement() }
        try? await threadPool.shutdownGracefully()
    }

    // MARK: Acquire and release

    private func acquire() async throws -> PostgresConnection {
        // Bounded: each pass either returns, throws, or discards one dead idle connection.
        for _ in 0...(configuration.poolSizeMax + 1) {
            switch try await reserve() {
            case .openSlot:
                return try await open()
            case .connection(let connection):
                if connection.isReusable { return connection }
                logger.debug("discarding a dead idle connection")
                discard(connection)
            }
        }
        throw PostgresError(code: .connectionFailed, message: "every pooled connection was dead")
    }

    /// Takes an idle connection or a free slot, or waits in line for one. Decision and registration happen under
    /// one lock so that a release in between can never be missed.
    private func reserve() async throws -> Handoff {
        let waitMax = configuration.acquireWaitMax
        let waitersMax = configuration.waitersMax
        let poolSizeMax = configuration.poolSizeMax
        return try await withCheckedThrowingContinuation { continuation in
            let immediate: Result<Handoff, any Error>? = state.withLock { state in
                if state.closed {
                    return .failure(PostgresError(code: .poolClosed, message: "the pool is closed"))
                }
                if let connection = state.idle.popLast() { return .success(.connection(connection)) }
                if state.slotsUsed < poolSizeMax {
                    state.slotsUsed += 1
                    return .success(.openSlot)
                }
                if state.waiters.count >= waitersMax {
                    return .failure(
                        PostgresError(code: .poolWaitersExhausted, message: "\(waitersMax) tasks already wait"))
                }
                let id = state.nextWaiterID
                state.nextWaiterID += 1
                state.waiters.append(Waiter(id: id, continuation: continuation))
                self.scheduleTimeout(waiterID: id, after: waitMax)
                return nil
            }
            if let immediate { continuation.resume(with: immediate) }
        }
    }

    private func scheduleTimeout(waiterID: UInt64, after wait: Duration) {
        Task { [weak self] in
            try? await Task.sleep(for: wait)
            self?.expireWaiter(id: waiterID, after: wait)
        }
    }

    private func expireWaiter(id: UInt64, after wait: Duration) {
        let waiter = state.withLock { state -> Waiter? in
            guard let index = state.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return state.waiters.remove(at: index)
        }
        waiter?.continuation.resume(
            throwing: PostgresError(
                code: .poolAcquireTimeout,
                message: "no connection became free within \(wait) (pool size \(configuration.poolSizeMax))"))
    }

    private func open() async throws -> PostgresConnection {
        do {
            return try await PostgresConnection.connect(configuration: configuration, threadPool: threadPool)
        } catch {
            freeSlot()
            throw error
        }
    }

    private func release(_ connection: PostgresConnection) {
        guard connection.isReusable else {
            discard(connection)
            return
        }
        let waiter = state.withLock { state -> Waiter? in
            if state.closed { return nil }
            if state.waiters.isEmpty {
                state.idle.append(connection)
                return nil
            }
            return state.waiters.removeFirst()
        }
        if let waiter {
            waiter.continuation.resume(returning: .connection(connection))
        } else if state.withLock({ $0.closed }) {
            discard(connection)
        }
    }

    private func discard(_ connection: PostgresConnection) {
        connection.close()
        freeSlot()
    }

    /// A slot came free: the first waiter, if any, gets the right to open a connection in it.
    private func freeSlot() {
        let waiter = state.withLock { state -> Waiter? in
            if state.closed || state.waiters.isEmpty {
                state.slotsUsed -= 1
                return nil
            }
            return state.waiters.removeFirst()
        }
        waiter?.continuation.resume(returning: .openSlot)
    }
}
