import CLibPQ
import Foundation
import NIOPosix
import Synchronization

/// One libpq connection.
///
/// Why every call hops to a thread pool: libpq's `PQexecParams`, `PQconnectdbParams` and friends block the calling
/// thread until the server answers. Swift's cooperative pool has one thread per core (two here) and NIO's event loops
/// must never block, so a libpq call made on either would stall every other task or socket for the length of a
/// query. Each call therefore runs on a `NIOThreadPool` thread, made for blocking work, and the calling task simply
/// suspends until it is done.
///
/// Why `@unchecked Sendable` is sound: a connection is used by one task at a time (the pool hands it out
/// exclusively, and a lease holder awaits each call before making the next), so no two libpq calls on one `PGconn`
/// ever overlap; the handle itself is only touched inside those calls.
///
/// Why no session state: behind a pooler in transaction mode (pgbouncer `pool_mode = transaction`) a session `SET`
/// lands on whichever server connection ran it, is lost for our next transaction and leaks into another client's.
/// So the bounds (`statement_timeout`, `idle_in_transaction_session_timeout`) and the UTC time zone are set per
/// transaction with `set_config(..., true)`: a query or DML statement outside a transaction goes in one libpq
/// pipeline behind that `set_config` (one implicit transaction, one round trip); `withTransaction` sends them with
/// its BEGIN (one simple-protocol message). Only unnamed prepared statements are used (`PQexecParams`, and
/// `PQsendQueryParams` in the pipeline), which a pooler in transaction mode carries.
public final class PostgresConnection: @unchecked Sendable {
    private var handle: OpaquePointer?
    private let threadPool: NIOThreadPool
    /// What cancelling the running statement needs (libpq's `PGcancel`, made once at connect), and which statement
    /// runs now: a cancellation reaches the server only while the statement that asked for it is still running.
    private let canceller: Mutex<Canceller>

    struct Canceller: Sendable {
        var cancel: CancelHandle?
        var running: UInt64 = 0
        var next: UInt64 = 0
        /// When the running call started (`DispatchTime` uptime), for the call deadline.
        var startedNanoseconds: UInt64 = 0
        /// The connection's socket while it is open: shut down (never closed) when a call misses its deadline.
        var socket: Int32?
        /// Set when the deadline gave the connection up: the call's error then says why.
        var abandoned = false
    }

    /// libpq's `PGcancel`, freed when the last user lets go: a cancellation sent from another thread keeps it alive
    /// even if the connection closes meanwhile.
    final class CancelHandle: @unchecked Sendable {
        let pointer: OpaquePointer
        init?(_ pointer: OpaquePointer?) {
            guard let pointer else { return nil }
            self.pointer = pointer
        }
        deinit { PQfreeCancel(pointer) }
    }
    /// The statement that applies this process's bounds to the current transaction only.
    let localSettings: String

    init(handle: OpaquePointer, threadPool: NIOThreadPool, localSettings: String) {
        self.handle = handle
        self.threadPool = threadPool
        let socket = PQsocket(handle)
        self.canceller = Mutex(
            Canceller(cancel: CancelHandle(PQgetCancel(handle)), socket: socket >= 0 ? socket : nil))
        self.localSettings = localSettings
    }

    /// `SELECT set_config(..., true), ...`: the configuration's bounds and the UTC time zone, local to a transaction.
    static func localSettings(for configuration: PostgresConfiguration) -> String {
        "SELECT set_config('statement_timeout', '\(max(0, configuration.statementTimeoutMilliseconds))', true), "
            + "set_config('idle_in_transaction_session_timeout', "
            + "'\(max(0, configuration.idleInTransactionTimeoutMilliseconds))', true), "
            + "set_config('TimeZone', 'UTC', true)"
    }

    deinit {
        if let handle { PQfinish(handle) }
    }

    /// Opens a connection on the thread pool.
    static func connect(
        configuration: PostgresConfiguration, threadPool: NIOThreadPool
    ) async throws -> PostgresConnection {
        let handle = try await threadPool.runIfActive {
            try SendableHandle(connectBlocking(configuration: configuration))
        }
        return PostgresConnection(
            handle: handle.pointer, threadPool: threadPool, localSettings: localSettings(for: configuration))
    }

    // MARK: Statements

    /// Runs one parameterised statement (`$1`, `$2`, ...) and returns its rows. Outside a transaction a query or DML
    /// statement runs under the configuration's bounds, set for its own implicit transaction in the same round trip
    /// (see `runsInTransactionBlock`).
    ///
    /// When the calling task is cancelled (a shutdown past its grace, say), the statement is cancelled on the server
    /// too (`PQcancel`), so that it ends now with 57014 instead of running on to its statement timeout.
    @discardableResult
    public func query(_ sql: String, _ binds: [PostgresBind] = []) async throws -> PostgresRows {
        try await call { try self.queryBlocking(sql, binds) }
    }

    /// Runs one blocking libpq call on the thread pool as the connection's running call: cancellable with the
    /// calling task, and watched by the pool against the call deadline (`abandonIfOverdue`).
    private func call<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        let statement = canceller.withLock { state -> UInt64 in
            state.next += 1
            return state.next
        }
        return try await withTaskCancellationHandler {
            try await threadPool.runIfActive {
                self.canceller.withLock {
                    $0.running = statement
                    $0.startedNanoseconds = DispatchTime.now().uptimeNanoseconds
                }
                defer { self.canceller.withLock { $0.running = 0 } }
                do {
                    return try body()
                } catch let error as PostgresError where self.canceller.withLock({ $0.abandoned }) {
                    throw PostgresError(
                        code: error.code == .commitOutcomeUnknown ? error.code : .connectionLost,
                        message: "no answer from the server within the call timeout: the connection was dropped")
                }
            }
        } onCancel: {
            cancelStatement(statement)
        }
    }

    /// Gives the connection up when its running call has waited longer than `timeoutNanoseconds`: the socket is shut
    /// down (not closed, so its descriptor cannot be reused under libpq), which wakes the blocked call with a lost
    /// connection at once; the pool then discards the connection, and the server rolls back whatever it had not
    /// committed when it notices. Called by the pool's watchdog, from any thread. Returns whether it gave up.
    func abandonIfOverdue(nowNanoseconds: UInt64, timeoutNanoseconds: UInt64) -> Bool {
        canceller.withLock { state in
            guard state.running != 0, !state.abandoned, let socket = state.socket,
                nowNanoseconds > state.startedNanoseconds,
                nowNanoseconds - state.startedNanoseconds > timeoutNanoseconds
            else { return false }
            state.abandoned = true
            _ = shutdown(socket, Int32(SHUT_RDWR))
            return true
        }
    }

    /// Asks the server to cancel whatever statement runs now on this connection, if any (closing the pool).
    public func cancelRunningStatement() {
        let running = canceller.withLock { $0.running }
        if running != 0 { cancelStatement(running) }
    }

    /// Asks the server to cancel `statement` if it is the one running now. PQcancel is thread-safe but opens a
    /// connection of its own and waits for the server, which may be the very thing that hangs: it runs on a thread
    /// of its own, never on the caller's (a cooperative or event-loop thread must not block).
    private func cancelStatement(_ statement: UInt64) {
        let handle = canceller.withLock { state -> CancelHandle? in
            state.running == statement ? state.cancel : nil
        }
        guard let handle else { return }
        Thread.detachNewThread {
            var message = [CChar](repeating: 0, count: 256)
            _ = PQcancel(handle.pointer, &message, Int32(message.count))
        }
    }

    /// Runs `body` in a transaction: BEGIN (with the bounds set local to the transaction, in the same message), then
    /// COMMIT, or ROLLBACK when `body` throws.
    ///
    /// A COMMIT that fails, or that answers ROLLBACK because an earlier statement failed, throws: it is never taken
    /// for success. A COMMIT whose answer was lost throws `.commitOutcomeUnknown`, and the connection is broken so the
    /// pool discards it.
    public func withTransaction<T: Sendable>(
        _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        try await call { try self.beginBlocking() }
        let value: T
        do {
            value = try await body(self)
        } catch {
            // A failed ROLLBACK leaves the connection in an unknown state: close it so the pool replaces it.
            do { try await query("ROLLBACK") } catch { close() }
            throw error
        }
        try await commit()
        return value
    }

    private func commit() async throws {
        let rows: PostgresRows
        do {
            rows = try await query("COMMIT")
        } catch let error as PostgresError where error.code == .connectionLost {
            close()
            throw PostgresError(
                code: .commitOutcomeUnknown, message: "connection lost while waiting for COMMIT: \(error.message)")
        }
        guard rows.commandTag == "COMMIT" else {
            throw PostgresError(
                code: .transactionRolledBack,
                message: "COMMIT answered \(rows.commandTag): an earlier statement failed, nothing was committed")
        }
    }

    // MARK: State

    /// Whether the connection can be handed out again: open and outside any transaction.
    ///
    /// `PQconsumeInput` reads whatever the server sent while we were idle without blocking (libpq keeps its socket
    /// non-blocking), so a backend killed by `pg_terminate_backend` or a server restart is noticed here. A killed
    /// backend first sends its FATAL message, then closes: the first read takes the message, a second one sees the
    /// end of the stream.
    var isReusable: Bool {
        guard let handle else { return false }
        for _ in 0..<2 where PQconsumeInput(handle) == 0 { return false }
        return PQstatus(handle) == CONNECTION_OK && PQtransactionStatus(handle) == PQTRANS_IDLE
    }

    /// Closes the connection now; later calls fail with `.connectionLost`.
    public func close() {
        canceller.withLock {
            $0.cancel = nil
            $0.socket = nil
        }
        if let handle {
            PQfinish(handle)
            self.handle = nil
        }
    }

    /// The backend's process id, for `pg_terminate_backend` in tests and for logs.
    public var backendPID: Int32 {
        guard let handle else { return 0 }
        return PQbackendPID(handle)
    }
}

/// A PGconn pointer passed from the thread that opened it to its owner.
private struct SendableHandle: @unchecked Sendable {
    let pointer: OpaquePointer
    init(_ pointer: OpaquePointer) { self.pointer = pointer }
}

// MARK: - Blocking libpq calls (run only on the thread pool)

extension PostgresConnection {
    static func connectBlocking(configuration: PostgresConfiguration) throws -> OpaquePointer {
        // Our defaults come first and the caller's conninfo after them, so anything the conninfo says wins
        // (libpq: with expand_dbname, later values override earlier ones).
        let pairs: [(String, String)] = [
            ("connect_timeout", String(configuration.connectTimeoutSeconds)),
            ("application_name", configuration.applicationName),
            // A server that stops answering (a frozen host, a partition dropping packets) leaves the socket open:
            // keepalives notice it within ~11 s while we wait for an answer, and tcp_user_timeout within 10 s when
            // what we sent is never acknowledged. The call then fails and the connection is dropped.
            ("keepalives", "1"),
            ("keepalives_idle", "5"),
            ("keepalives_interval", "2"),
            ("keepalives_count", "3"),
            ("tcp_user_timeout", "10000"),
            ("dbname", configuration.conninfo),
        ]
        let keywords = pairs.map { strdup($0.0) }
        let values = pairs.map { strdup($0.1) }
        defer {
            keywords.forEach { free($0) }
            values.forEach { free($0) }
        }
        var keywordPointers: [UnsafePointer<CChar>?] = keywords.map { UnsafePointer($0) } + [nil]
        var valuePointers: [UnsafePointer<CChar>?] = values.map { UnsafePointer($0) } + [nil]
        guard let handle = PQconnectdbParams(&keywordPointers, &valuePointers, 1) else {
            throw PostgresError(code: .connectionFailed, message: "libpq could not allocate a connection")
        }
        guard PQstatus(handle) == CONNECTION_OK else {
            let message = String(cString: PQerrorMessage(handle)).trimmingCharacters(in: .whitespacesAndNewlines)
            PQfinish(handle)
            throw PostgresError(code: .connectionFailed, message: message)
        }
        // Server notices (`NOTICE: relation already exists, skipping`) are not errors; libpq would print them on
        // standard error, outside our logging. Drop them.
        PQsetNoticeProcessor(handle, { _, _ in }, nil)
        // No session settings here: behind a transaction-mode pooler they would not stay with us. The bounds and
        // the time zone are set per transaction (see `localSettings`).
        return handle
    }

    /// BEGIN and the bounds local to the new transaction, in one simple-protocol message (one round trip).
    func beginBlocking() throws {
        guard let handle else {
            throw PostgresError(code: .connectionLost, message: "the connection is closed")
        }
        let result = PQexec(handle, "BEGIN; " + localSettings)
        defer { PQclear(result) }
        _ = try Self.readResult(result, connection: handle)
    }

    func queryBlocking(_ sql: String, _ binds: [PostgresBind]) throws -> PostgresRows {
        guard let handle else {
            throw PostgresError(code: .connectionLost, message: "the connection is closed")
        }
        let bounded = PQtransactionStatus(handle) == PQTRANS_IDLE && Self.runsInTransactionBlock(sql)
        let buffers: [UnsafeMutablePointer<CChar>?] = binds.map { bind in
            guard let bytes = bind.wireBytes else { return nil }
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
            bytes.withUnsafeBufferPointer { source in
                source.withMemoryRebound(to: CChar.self) { buffer.update(from: $0.baseAddress!, count: bytes.count) }
            }
            buffer[bytes.count] = 0
            return buffer
        }
        defer { buffers.forEach { $0?.deallocate() } }
        let values: [UnsafePointer<CChar>?] = buffers.map { $0.map { UnsafePointer($0) } }
        let lengths: [Int32] = binds.map { Int32($0.wireBytes?.count ?? 0) }
        let formats: [Int32] = binds.map(\.format)
        let types: [Oid] = binds.map { Oid($0.typeOID) }

        guard bounded else {
            // Inside a transaction: its BEGIN set the bounds already.
            let result = PQexecParams(handle, sql, Int32(binds.count), types, values, lengths, formats, 0)
            defer { PQclear(result) }
            return try Self.readResult(result, connection: handle)
        }
        return try pipelinedBlocking(handle) {
            PQsendQueryParams(handle, sql, Int32(binds.count), types, values, lengths, formats, 0)
        }
    }

    /// Whether a statement can share an implicit transaction with the bounds: queries and DML (`SELECT`, `WITH`,
    /// `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `VALUES`, `TABLE`), which is every statement the service runs on its
    /// own. Other statements outside a transaction (`CREATE DATABASE`, `VACUUM` and other utility commands, some of
    /// which refuse to run in a transaction block) are sent alone, under the server's settings.
    static func runsInTransactionBlock(_ sql: String) -> Bool {
        let word = sql.drop(while: { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" || $0 == "(" })
            .prefix(while: { $0.isLetter }).uppercased()
        return ["SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE"].contains(word)
    }

    /// Outside a transaction: `localSettings`, then the statement sent by `send`, then a Sync, in one libpq pipeline.
    /// Everything before the Sync is one implicit transaction on one server connection (a transaction-mode pooler
    /// hands the server connection back only at the ReadyForQuery after the Sync), so the bounds hold for the
    /// statement and end with it. One round trip, as for a lone `PQexecParams`.
    private func pipelinedBlocking(_ handle: OpaquePointer, send: () -> Int32) throws -> PostgresRows {
        func lost() -> PostgresError {
            let message = String(cString: PQerrorMessage(handle)).trimmingCharacters(in: .whitespacesAndNewlines)
            let code: PostgresError.Code = PQstatus(handle) == CONNECTION_OK ? .unexpected : .connectionLost
            return PostgresError(code: code, message: message)
        }
        guard PQenterPipelineMode(handle) == 1 else { throw lost() }
        guard PQsendQueryParams(handle, localSettings, 0, nil, nil, nil, nil, 0) == 1, send() == 1,
            PQpipelineSync(handle) == 1
        else {
            let error = lost()
            // Whatever was queued cannot be told apart from what was sent: the connection is not reused.
            close()
            throw error
        }
        var settingsError: PostgresError?
        var statement: OpaquePointer?
        defer { if let statement { PQclear(statement) } }
        var index = 0  // 0: the settings, 1: the statement; a NULL result ends one.
        var synced = false
        while index <= 2 {
            guard let result = PQgetResult(handle) else {
                if PQstatus(handle) != CONNECTION_OK { break }
                index += 1
                continue
            }
            let status = PQresultStatus(result)
            if status == PGRES_PIPELINE_SYNC {
                PQclear(result)
                synced = true
                break
            }
            if index == 0 {
                if status != PGRES_TUPLES_OK && settingsError == nil {
                    settingsError = Self.error(from: result, connection: handle)
                }
                PQclear(result)
            } else if index == 1 && statement == nil {
                statement = result
            } else {
                PQclear(result)
            }
        }
        if !synced || PQexitPipelineMode(handle) != 1 {
            // The Sync's ReadyForQuery never came (the server went away): the connection is done. A server error
            // met on the way is the better account of what happened.
            var error = settingsError ?? lost()
            if settingsError == nil, let statement, PQresultStatus(statement) == PGRES_FATAL_ERROR {
                error = Self.error(from: statement, connection: handle)
            }
            close()
            throw error
        }
        if let settingsError { throw settingsError }
        return try Self.readResult(statement, connection: handle)
    }

    static func readResult(_ result: OpaquePointer?, connection: OpaquePointer) throws -> PostgresRows {
        guard let result else {
            // libpq answers NULL on out-of-memory or when it could not even send the statement.
            let message = String(cString: PQerrorMessage(connection))
            let code: PostgresError.Code = PQstatus(connection) == CONNECTION_OK ? .unexpected : .connectionLost
            throw PostgresError(code: code, message: message)
        }
        let status = PQresultStatus(result)
        if status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK {
            return copyRows(result)
        }
        throw error(from: result, connection: connection)
    }

    static func error(from result: OpaquePointer, connection: OpaquePointer) -> PostgresError {
        func field(_ code: Int32) -> String? {
            guard let pointer = PQresultErrorField(result, code) else { return nil }
            return String(cString: pointer)
        }
        let sqlState = field(LEDGER_PG_DIAG_SQLSTATE)
        let message =
            field(LEDGER_PG_DIAG_MESSAGE_PRIMARY)
            ?? String(cString: PQresultErrorMessage(result)).trimmingCharacters(in: .whitespacesAndNewlines)
        // A result without a SQLSTATE on a broken connection is libpq telling us the server went away.
        let lost = PQstatus(connection) != CONNECTION_OK
        return PostgresError(
            code: lost ? .connectionLost : .server,
            sqlState: sqlState,
            message: message,
            detail: field(LEDGER_PG_DIAG_MESSAGE_DETAIL),
            hint: field(LEDGER_PG_DIAG_MESSAGE_HINT),
            constraint: field(LEDGER_PG_DIAG_CONSTRAINT_NAME)
        )
    }

    static func copyRows(_ result: OpaquePointer) -> PostgresRows {
        let rowCount = Int(PQntuples(result))
        let columnCount = Int(PQnfields(result))
        var names: [String] = []
        var oids: [UInt32] = []
        for column in 0..<columnCount {
            names.append(String(cString: PQfname(result, Int32(column))))
            oids.append(UInt32(PQftype(result, Int32(column))))
        }
        let layout = PostgresRow.ColumnLayout(names: names, typeOIDs: oids)
        var rows: [PostgresRow] = []
        rows.reserveCapacity(rowCount)
        for row in 0..<rowCount {
            var values: [String?] = []
            values.reserveCapacity(columnCount)
            for column in 0..<columnCount {
                if PQgetisnull(result, Int32(row), Int32(column)) == 1 {
                    values.append(nil)
                    continue
                }
                let length = Int(PQgetlength(result, Int32(row), Int32(column)))
                let pointer = PQgetvalue(result, Int32(row), Int32(column))!
                let text = pointer.withMemoryRebound(to: UInt8.self, capacity: length) {
                    String(decoding: UnsafeBufferPointer(start: $0, count: length), as: UTF8.self)
                }
                values.append(text)
            }
            rows.append(PostgresRow(layout: layout, values: values))
        }
        let tag = String(cString: PQcmdStatus(result))
        let affected = Int(String(cString: PQcmdTuples(result))) ?? 0
        return PostgresRows(columns: names, rows: rows, commandTag: tag, affectedRows: affected)
    }
}

extension PostgresConnection {
    /// Runs trusted SQL text that may hold several statements (a migration file), with no parameters.
    ///
    /// Only for SQL that ships with the program: it goes through the simple query protocol, which is why it takes no
    /// binds and must never see input from a request.
    public func executeScript(_ sql: String) async throws {
        try await call { try self.executeScriptBlocking(sql) }
    }

    func executeScriptBlocking(_ sql: String) throws {
        guard let handle else {
            throw PostgresError(code: .connectionLost, message: "the connection is closed")
        }
        let result = PQexec(handle, sql)
        defer { PQclear(result) }
        _ = try Self.readResult(result, connection: handle)
    }
}
