import Foundation
import Logging
import PostgresClient

/// Throw-away databases on the PostgreSQL server that `scripts/test` starts (`LEDGER_TEST_PG`, a conninfo without
/// dbname). Tests talk to a real PostgreSQL: there is no in-memory stand-in.
public enum TestDatabase {
    public static let logger = Logger(label: "test")

    /// The server's conninfo; the tests fail, loudly, when it is missing.
    public static func serverConninfo() throws -> String {
        guard let conninfo = ProcessInfo.processInfo.environment["LEDGER_TEST_PG"], !conninfo.isEmpty else {
            throw SetupError(
                message: "LEDGER_TEST_PG is not set: run the tests with scripts/test, which starts a PostgreSQL")
        }
        return conninfo
    }

    public struct SetupError: Error, CustomStringConvertible {
        public var message: String
        public var description: String { message }
        public init(message: String) { self.message = message }
    }

    /// Creates a new, empty database and returns its conninfo.
    public static func create(prefix: String = "t") async throws -> String {
        let server = try serverConninfo()
        let name = "\(prefix)_\(UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased().prefix(16))"
        let admin = PostgresPool(
            configuration: PostgresConfiguration(conninfo: "\(server) dbname=postgres", poolSizeMax: 1),
            logger: logger)
        // The name is made of [a-z0-9_] above: safe as an identifier (CREATE DATABASE takes no parameters).
        try await admin.query("CREATE DATABASE \(name)")
        await admin.close()
        return "\(server) dbname=\(name)"
    }

    /// A pool on a new database.
    public static func pool(
        poolSizeMax: Int = 4, acquireWaitMax: Duration = .seconds(5), statementTimeoutMilliseconds: Int = 10_000
    ) async throws -> PostgresPool {
        let conninfo = try await create()
        return PostgresPool(
            configuration: PostgresConfiguration(
                conninfo: conninfo, statementTimeoutMilliseconds: statementTimeoutMilliseconds,
                poolSizeMax: poolSizeMax, acquireWaitMax: acquireWaitMax),
            logger: logger)
    }
}
