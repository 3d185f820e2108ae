import Crypto
import Foundation
import LedgerCore
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

    /// Transaction-scoped advisory lock key taken by every migration transaction ("ledger" in ASCII), so that
    /// concurrent migrators queue. Transaction-scoped, not session: it is released by COMMIT or ROLLBACK on the
    /// connection that took it, which a transaction-mode pooler (pgbouncer) guarantees, and nothing outlives it.
    static let lockKey: Int64 = 0x6C65_6467_6572

    /// Files corrected after they landed, and the exact checksums of the texts they replace. A database that applied
    /// such an old text is accepted; a later migration gives it what the correction changed. 0001's three
    /// rendering functions over row types had SQL-standard bodies, which current PostgreSQL 15 minors refuse to keep
    /// while 0005 alters `ledger.transfers` (0007 brings old databases in line).
    public static let supersededChecksums: [String: Set<String>] = [
        "0001": ["5790864f93238c11c932b86161de439f0739accb14d6f7993e9f6cf6eca627ee"]
    ]

    /// For a database that applied a superseded text: the pending migration that repairs it, applied before any
    /// other pending one. A database that applied the old 0001 and then failed at 0005 on a current minor release
    /// needs 0007's string bodies before 0005 can alter `ledger.transfers`; 0007 needs nothing later than 0001.
    static let repairFirst: [String: String] = ["0001": "0007"]

    public let migrations: [Migration]
    /// The files of `sql/citus/`, which distribute the schema over a Citus cluster (`ledger migrate --citus`). Unlike
    /// migrations they are not recorded: every one is idempotent and all run on every `--citus` run, so that tables
    /// and functions of later migrations get distributed too.
    public let citusScripts: [Migration]
    let logger: Logger

    public init(migrations: [Migration], citusScripts: [Migration] = [], logger: Logger) {
        self.migrations = migrations
        self.citusScripts = citusScripts
        self.logger = logger
    }

    /// Reads `NNNN_name.sql` files from `directory`, in order, and those of its `citus/` subdirectory if there is one.
    public static func load(directory: URL, logger: Logger) throws -> Migrator {
        let citus = directory.appendingPathComponent("citus")
        var isDirectory: ObjCBool = false
        let citusScripts =
            FileManager.default.fileExists(atPath: citus.path, isDirectory: &isDirectory) && isDirectory.boolValue
            ? try files(in: citus) : []
        return Migrator(migrations: try files(in: directory), citusScripts: citusScripts, logger: logger)
    }

    /// The `NNNN_name.sql` files of one directory, in order.
    static func files(in directory: URL) throws -> [Migration] {
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
            let digest = Hex.encode(SHA256.hash(data: Data(sql.utf8)))
            migrations.append(Migration(version: version, name: name, sql: sql, sha256: digest))
        }
        return migrations
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
    ///
    /// Each file runs in a transaction of its own that first takes the transaction-scoped lock and re-reads what is
    /// applied, so several processes (or one through a transaction-mode pooler) apply each file exactly once. No
    /// session state is set: `statement_timeout` is lifted with `SET LOCAL` inside each transaction.
    @discardableResult
    public func migrate(pool: PostgresPool) async throws -> [String] {
        try await pool.withConnection { connection in
            var appliedNow: [String] = []
            // The first transaction creates the bookkeeping and checks every applied file before anything runs.
            let repairs = try await locked(connection) { connection in
                try await connection.executeScript(Self.bookkeepingSQL)
                return try self.refuseChangedFiles(applied: try await Self.appliedChecksums(connection))
            }
            let ordered = migrations.filter { repairs.contains($0.version) } + migrations.filter { !repairs.contains($0.version) }
            for migration in ordered {
                let applied = try await locked(connection) { connection -> Bool in
                    let exists = try await connection.query(
                        "SELECT 1 FROM ledger.schema_migrations WHERE version = $1", [.string(migration.version)])
                    guard exists.rows.isEmpty else { return false }
                    try await connection.executeScript(migration.sql)
                    try await connection.query(
                        "INSERT INTO ledger.schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                        [.string(migration.version), .string(migration.name), .string(migration.sha256)])
                    return true
                }
                if applied {
                    logger.info("applied migration", metadata: ["migration.name": "\(migration.name)"])
                    appliedNow.append(migration.name)
                }
            }
            return appliedNow
        }
    }

    /// After `migrate`: runs every file of `sql/citus/` in order, each in a transaction of its own under the
    /// migration lock, on the coordinator of a Citus cluster. The files check what is already distributed, so a
    /// rerun changes nothing and a run after new migrations distributes what they added. Returns the names run.
    @discardableResult
    public func distribute(pool: PostgresPool) async throws -> [String] {
        try await pool.withConnection { connection in
            for script in citusScripts {
                try await locked(connection) { connection in try await connection.executeScript(script.sql) }
                logger.info("ran Citus script", metadata: ["migration.name": "\(script.name)"])
            }
            return citusScripts.map(\.name)
        }
    }

    /// Runs `body` in a transaction holding the migration lock, with no statement timeout: a migration may take
    /// longer than a request, and waiting for another migrator must not time out either.
    private func locked<T: Sendable>(
        _ connection: PostgresConnection, _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        try await connection.withTransaction { connection in
            try await connection.query("SELECT set_config('statement_timeout', '0', true)")
            try await connection.query("SELECT pg_advisory_xact_lock($1)", [.int64(Self.lockKey)])
            return try await body(connection)
        }
    }

    static let bookkeepingSQL = """
        CREATE SCHEMA IF NOT EXISTS ledger;
        CREATE TABLE IF NOT EXISTS ledger.schema_migrations (
            version    text        PRIMARY KEY,
            name       text        NOT NULL,
            sha256     text        NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        COMMENT ON TABLE ledger.schema_migrations IS 'SQL files of sql/ applied by `ledger migrate`, one row each.';
        COMMENT ON COLUMN ledger.schema_migrations.version IS 'The file''s number: 0001 of 0001_init.sql.';
        COMMENT ON COLUMN ledger.schema_migrations.name IS 'The file''s name when it was applied.';
        COMMENT ON COLUMN ledger.schema_migrations.sha256 IS 'SHA-256 of the text applied. A file that changed afterwards is refused, unless the migrator lists this checksum as superseded by a correction of the file.';
        COMMENT ON COLUMN ledger.schema_migrations.applied_at IS 'When the file was applied.';
        """

    static func appliedChecksums(_ connection: PostgresConnection) async throws -> [String: String] {
        var applied: [String: String] = [:]
        for row in try await connection.query("SELECT version, sha256 FROM ledger.schema_migrations").rows {
            applied[try row.decode(String.self, "version")] = try row.decode(String.self, "sha256")
        }
        return applied
    }

    /// Refuses before applying anything if an applied file changed, except for a correction whose superseded text
    /// is exactly the one applied. Returns the versions of the pending repairs those superseded texts call for.
    func refuseChangedFiles(applied: [String: String]) throws -> Set<String> {
        var repairs: Set<String> = []
        for migration in migrations {
            guard let sha = applied[migration.version], sha != migration.sha256 else { continue }
            if Self.supersededChecksums[migration.version]?.contains(sha) == true {
                logger.info("accepted the text a corrected migration supersedes", metadata: ["migration.name": "\(migration.name)"])
                if let repair = Self.repairFirst[migration.version], applied[repair] == nil { repairs.insert(repair) }
                continue
            }
            throw Failure.changedAfterApplied(name: migration.name, appliedSHA256: sha, fileSHA256: migration.sha256)
        }
        return repairs
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { isASCII && isNumber }
}
