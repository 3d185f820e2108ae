import Crypto
import Foundation
import Logging
import PostgresClient

/// Applies the numbered SQL files of `sql/` in order: forward only, each in its own transaction, each exactly once
/// even when several processes migrate at once, and never a file that changed after it was applied.
public struct Migrator: Sendable {
    public struct Migration: Sendable, Equatable {
        /// `0001` of `0001_init.sql`.
        public var version: String
        public var name: String
        public var sql: String
        public var sha256: String
    }

    public enum Failure: Error, CustomStringConvertible {
        case directoryNotFound(searched: [String])
        case badFileName(String)
        case duplicateVersion(String)
        case changedAfterApplied(name: String, appliedSHA256: String, fileSHA256: String)

        public var description: String {
            switch self {
            case .directoryNotFound(let searched):
                return "no sql/ directory with migrations found (looked in: \(searched.joined(separator: ", "))); "
                    + "set LEDGER_SQL_DIR"
            case .badFileName(let name):
                return "migration file \(name) is not named NNNN_name.sql"
            case .duplicateVersion(let version):
                return "two migration files share the number \(version)"
            case .changedAfterApplied(let name, let applied, let file):
                return "migration \(name) changed after it was applied (applied sha256 \(applied), file sha256 \(file)); "
                    + "applied migrations are immutable: add a new file instead"
            }
        }
    }

    /// Session advisory lock key held while migrating ("ledger" in ASCII), so that concurrent migrators queue.
    static let lockKey: Int64 = 0x6C65_6467_6572

    public let migrations: [Migration]
    let logger: Logger

    public init(migrations: [Migration], logger: Logger) {
        self.migrations = migrations
        self.logger = logger
    }

    /// Reads `NNNN_name.sql` files from `directory`, in order.
    public static func load(directory: URL, logger: Logger) throws -> Migrator {
        let names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
            .filter { $0.hasSuffix(".sql") }
            .sorted()
        var migrations: [Migration] = []
        for name in names {
            let version = String(name.prefix { $0 != "_" })
            guard version.count == 4, version.allSatisfy(\.isASCIIDigit), name.count > 9 else {
                throw Failure.badFileName(name)
            }
            guard migrations.last?.version != version else { throw Failure.duplicateVersion(version) }
            let sql = try String(contentsOf: directory.appendingPathComponent(name), encoding: .utf8)
            let digest = SHA256.hash(data: Data(sql.utf8)).map { String(format: "%02x", $0) }.joined()
            migrations.append(Migration(version: version, name: name, sql: sql, sha256: digest))
        }
        return Migrator(migrations: migrations, logger: logger)
    }

    /// Where the migrations are: `$LEDGER_SQL_DIR`, else `./sql`, else a `sql/` beside or above the executable
    /// (a build tree or an install prefix).
    public static func locateDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) throws
        -> URL
    {
        var candidates: [URL] = []
        if let configured = environment["LEDGER_SQL_DIR"], !configured.isEmpty {
            candidates.append(URL(fileURLWithPath: configured))
        }
        candidates.append(URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent("sql"))
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
            .deletingLastPathComponent()
        for _ in 0..<6 {
            candidates.append(directory.appendingPathComponent("sql"))
            candidates.append(directory.appendingPathComponent("share/ledger/sql"))
            directory = directory.deletingLastPathComponent()
        }
        for candidate in candidates {
            let marker = candidate.appendingPathComponent("0001_init.sql").path
            if FileManager.default.fileExists(atPath: marker) { return candidate }
        }
        // The working directory is often the executable's, and "/" is its own parent: name each place once.
        var searched: [String] = []
        for path in candidates.map(\.path) where !searched.contains(path) { searched.append(path) }
        throw Failure.directoryNotFound(searched: searched)
    }

    /// Applies pending migrations; returns the names applied now (empty when up to date).
    @discardableResult
    public func migrate(pool: PostgresPool) async throws -> [String] {
        try await pool.withConnection { connection in
            // Migrations may take longer than a request's statement timeout, and waiting for another migrator's
            // lock must not time out either; restore the session's value afterwards.
            let previousTimeout = try await connection.query("SELECT current_setting('statement_timeout') AS value")
                .rows[0].decode(String.self, "value")
            try await connection.query("SELECT set_config('statement_timeout', '0', false)")
            try await connection.query("SELECT pg_advisory_lock($1)", [.int64(Self.lockKey)])
            do {
                let applied = try await applyPending(connection)
                try await connection.query("SELECT pg_advisory_unlock($1)", [.int64(Self.lockKey)])
                try await connection.query(
                    "SELECT set_config('statement_timeout', $1, false)", [.string(previousTimeout)])
                return applied
            } catch {
                // Closing drops the session lock too; the pool replaces the connection.
                connection.close()
                throw error
            }
        }
    }

    private func applyPending(_ connection: PostgresConnection) async throws -> [String] {
        try await connection.executeScript(
            """
            CREATE SCHEMA IF NOT EXISTS ledger;
            CREATE TABLE IF NOT EXISTS ledger.schema_migrations (
                version    text        PRIMARY KEY,
                name       text        NOT NULL,
                sha256     text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            COMMENT ON TABLE ledger.schema_migrations IS 'SQL files of sql/ applied by `ledger migrate`, with the SHA-256 of their text.';
            """)
        let rows = try await connection.query("SELECT version, sha256 FROM ledger.schema_migrations")
        var appliedSHA: [String: String] = [:]
        for row in rows.rows {
            appliedSHA[try row.decode(String.self, "version")] = try row.decode(String.self, "sha256")
        }
        // Refuse before applying anything if an applied file changed.
        for migration in migrations {
            if let sha = appliedSHA[migration.version], sha != migration.sha256 {
                throw Failure.changedAfterApplied(name: migration.name, appliedSHA256: sha, fileSHA256: migration.sha256)
            }
        }
        var appliedNow: [String] = []
        for migration in migrations where appliedSHA[migration.version] == nil {
            try await connection.withTransaction { connection in
                try await connection.executeScript(migration.sql)
                try await connection.query(
                    "INSERT INTO ledger.schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                    [.string(migration.version), .string(migration.name), .string(migration.sha256)])
            }
            logger.info("applied migration", metadata: ["migration.name": "\(migration.name)"])
            appliedNow.append(migration.name)
        }
        return appliedNow
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { isASCII && isNumber }
}
