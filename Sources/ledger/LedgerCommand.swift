import ArgumentParser
import Foundation
import LedgerCore
import LedgerHTTP
import LedgerMaintenance
import LedgerStore
import Logging
import PostgresClient

/// `ledger`: the one executable. Thin: it reads flags and the environment, then calls into the libraries.
@main
struct LedgerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ledger",
        abstract: "An idempotent, double-entry wallet service on PostgreSQL.",
        version: ledgerVersion,
        subcommands: [
            Serve.self, Migrate.self, Token.self, Verify.self, Purge.self, Routes.self, Bench.self,
            Credit.self, Debit.self, Transfer.self, Hold.self, Capture.self, VoidHold.self, Reverse.self, Events.self,
        ]
    )
}

/// Options every command shares.
struct DatabaseOptions: ParsableArguments {
    @Option(
        name: .customLong("database-url"),
        help: "libpq URI or conninfo string (env: DATABASE_URL; default: libpq's defaults, PGHOST etc.).")
    var databaseURL: String?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical (env: LOG_LEVEL; default: info).")
    var logLevel: String?

    @Option(name: .customLong("log-format"), help: "text or json, one line per event on standard error (env: LOG_FORMAT; default: text).")
    var logFormat: String?

    var conninfo: String { databaseURL ?? Environment.string("DATABASE_URL") ?? "" }

    /// Runs a short command's work on a one-connection store, closes it, and turns database failures into a
    /// one-line message and exit code 2. `statement_timeout` is off: these commands may scan the whole ledger.
    /// No group commit (`batchMax` 1): these commands post no transfers.
    func withStore<T: Sendable>(logger: Logger, _ body: (LedgerStore) async throws -> T) async throws -> T {
        let pool = PostgresPool(
            configuration: PostgresConfiguration(conninfo: conninfo, statementTimeoutMilliseconds: 0, poolSizeMax: 1),
            logger: logger)
        let store = LedgerStore(pool: pool, options: .init(batchMax: 1), logger: logger)
        do {
            let value = try await withDatabaseErrors { try await body(store) }
            await store.close()
            return value
        } catch {
            await store.close()
            throw error
        }
    }

    /// `withStore` with a logger of this label: the whole of a short command's database work.
    func withStore<T: Sendable>(label: String, _ body: (LedgerStore) async throws -> T) async throws -> T {
        try await withStore(logger: try makeLogger(label: label), body)
    }

    func makeLogger(label: String) throws -> Logger {
        let levelName = logLevel ?? Environment.string("LOG_LEVEL") ?? "info"
        guard let level = Logger.Level(rawValue: levelName.lowercased()) else {
            throw ValidationError("log level \(levelName) is not one of trace, debug, info, notice, warning, error, critical")
        }
        let format = (logFormat ?? Environment.string("LOG_FORMAT") ?? "text").lowercased()
        switch format {
        case "text":
            LoggingSystem.bootstrap { label in
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        case "json":
            LoggingSystem.bootstrap { label in JSONLogHandler(label: label, level: level) }
        default:
            throw ValidationError("log format \(format) is not text or json")
        }
        return Logger(label: label)
    }
}

/// Reads settings from the environment, refusing values that do not parse instead of silently using a default.
enum Environment {
    static func string(_ name: String) -> String? {
        guard let value = ProcessInfo.processInfo.environment[name], !value.isEmpty else { return nil }
        return value
    }

    static func int(_ name: String, flag: Int?, default defaultValue: Int, range: ClosedRange<Int>) throws -> Int {
        let value: Int
        if let flag {
            value = flag
        } else if let text = string(name) {
            guard let parsed = Int(text) else { throw ValidationError("\(name)=\(text) is not an integer") }
            value = parsed
        } else {
            value = defaultValue
        }
        guard range.contains(value) else {
            // Name what the value came from: the flag when it was given, else the environment variable.
            let source = flag != nil ? flagName(ofEnvironment: name) : name
            throw ValidationError("\(source) must be within \(range.lowerBound)...\(range.upperBound), not \(value)")
        }
        return value
    }

    /// `--retention-s` for `LEDGER_RETENTION_S`, `--port` for `PORT`: every flag is its variable's name without
    /// `LEDGER_`, lower-case, with dashes.
    static func flagName(ofEnvironment name: String) -> String {
        let bare = name.hasPrefix("LEDGER_") ? String(name.dropFirst("LEDGER_".count)) : name
        return "--" + bare.lowercased().replacingOccurrences(of: "_", with: "-")
    }

    static func bool(_ name: String) -> Bool {
        guard let value = string(name)?.lowercased() else { return false }
        return ["1", "true", "yes", "on"].contains(value)
    }
}

extension LedgerCommand {
    struct Migrate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Apply the pending SQL files of sql/ in order; safe to run from several processes at once.")

        @OptionGroup var database: DatabaseOptions

        @Option(name: .customLong("sql-dir"), help: "Directory of the migration files (env: LEDGER_SQL_DIR; default: ./sql, or sql/ beside the executable).")
        var sqlDirectory: String?

        @Flag(name: .customLong("citus"), help: "Then distribute the schema over the Citus cluster whose coordinator this is: run every file of sql/citus/ (idempotent; see docs/scaling.md).")
        var citus = false

        func run() async throws {
            let logger = try database.makeLogger(label: "ledger.migrate")
            let directory = try sqlDirectory.map { URL(fileURLWithPath: $0) } ?? Migrator.locateDirectory()
            let migrator = try Migrator.load(directory: directory, logger: logger)
            if citus && migrator.citusScripts.isEmpty {
                throw ValidationError("--citus: no citus/ directory with scripts in \(directory.path)")
            }
            let (applied, distributed) = try await database.withStore(logger: logger) { store in
                (try await store.migrate(migrator), citus ? try await store.distribute(migrator) : [])
            }
            print(applied.isEmpty ? "ledger migrate: up to date" : "ledger migrate: applied \(applied.joined(separator: ", "))")
            if citus { print("ledger migrate: distributed over Citus (\(distributed.joined(separator: ", ")))") }
        }
    }

    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Manage bearer tokens.", subcommands: [Create.self, List.self, Revoke.self])

        struct Create: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Create the client if new and print a new bearer token for it (the last line of standard output). The token is shown once; only its SHA-256 is stored.")

            @OptionGroup var database: DatabaseOptions

            @Argument(help: "Client name: 1-64 characters matching [A-Za-z0-9][A-Za-z0-9._:-]{0,63}.")
            var client: String

            func validate() throws {
                guard LedgerRules.isValidAccountID(client) else {
                    throw ValidationError("client name must match [A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
                }
                if let expiresInSeconds, !(1...315_360_000).contains(expiresInSeconds) {
                    throw ValidationError("--expires-in-s must be within 1...315360000, not \(expiresInSeconds)")
                }
            }

            @Option(name: .customLong("expires-in-s"), help: "Seconds the token is accepted for, 1-315360000 (default: no expiry).")
            var expiresInSeconds: Int?

            func run() async throws {
                let logger = try database.makeLogger(label: "ledger.token")
                let token = try await database.withStore(logger: logger) {
                    try await $0.createToken(client: client, expiresInSeconds: expiresInSeconds)
                }
                let expiry = expiresInSeconds.map { ", expires in \($0) s" } ?? ""
                FileHandle.standardError.write(
                    Data("created token \(LedgerStore.tokenID(token)) for client \(client)\(expiry); it is shown once:\n".utf8))
                print(token)
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "List a client's tokens, one line each: id, state (active, expired, revoked), created, expires, revoked (- when none). Never the tokens themselves.")

            @OptionGroup var database: DatabaseOptions

            @Argument(help: "Client name.")
            var client: String

            func run() async throws {
                for token in try await database.withStore(label: "ledger.token", { try await $0.tokens(client: client) }) {
                    print([token.id, token.state, token.createdAt, token.expiresAt ?? "-", token.revokedAt ?? "-"]
                        .joined(separator: " "))
                }
            }
        }

        struct Revoke: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Revoke a token by its id (`ledger token list`). A running service refuses it (401) within its auth cache TTL (LEDGER_AUTH_CACHE_TTL_MS, default 30 s). Exit 1 when no token has this id.")

            @OptionGroup var database: DatabaseOptions

            @Argument(help: "The token's id: 16 hex digits, as `ledger token list` and `ledger token create` show it.")
            var id: String

            func run() async throws {
                switch try await database.withStore(label: "ledger.token", { try await $0.revokeToken(id: id.lowercased()) }) {
                case .revoked(let client): print("ledger token revoke: revoked \(id) of client \(client)")
                case .alreadyRevoked(let client): print("ledger token revoke: \(id) of client \(client) was already revoked")
                case .notFound:
                    FileHandle.standardError.write(Data("ledger token revoke: no token has the id \(id)\n".utf8))
                    throw ExitCode(1)
                }
            }
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check every ledger invariant; exit 0 when all hold, 1 with one line per breach (2 if the check could not run).")

        @OptionGroup var database: DatabaseOptions

        func run() async throws {
            let logger = try database.makeLogger(label: "ledger.verify")
            let breaches = try await database.withStore(logger: logger) { try await $0.verify() }
            guard breaches.isEmpty else {
                for breach in breaches { print(breach) }
                throw ExitCode(1)
            }
            print("ledger verify: all invariants hold")
        }
    }
}

extension LedgerCommand {
    struct Routes: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the HTTP routes, one per line as METHOD /path/{param}, in the order of the route table.")

        func run() {
            for line in LedgerAPI.routeDescriptions { print(line) }
        }
    }
}

extension LedgerCommand {
    struct Purge: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete stored responses older than the retention time, in bounded batches, and print how many. A key that made a transfer still answers with that transfer afterwards; a purged stored failure lets its key execute afresh.")

        @OptionGroup var database: DatabaseOptions

        @OptionGroup var retention: RetentionFlags

        func run() async throws {
            let logger = try database.makeLogger(label: "ledger.purge")
            let options = try retention.options()
            let deleted = try await database.withStore(logger: logger) {
                try await $0.purgeStoredResponses(
                    retention: options.retention, batchSize: options.purgeBatchSize, batchesMax: Int.max)
            }
            let retention = options.retention.components.seconds
            print("ledger purge: deleted \(deleted) stored responses older than \(retention) s")
        }
    }
}

/// How long stored responses are kept and how they are purged, shared by `ledger serve` (in the background) and
/// `ledger purge`. How often the background purge runs is `serve`'s own flag (`--purge-interval-s`).
struct RetentionFlags: ParsableArguments {
    @Option(name: .customLong("retention-s"), help: "Stored responses are kept at least this long, in seconds (env: LEDGER_RETENTION_S; default: 86400).")
    var retentionSeconds: Int?

    @Option(name: .customLong("purge-batch-size"), help: "Stored responses deleted per statement (env: LEDGER_PURGE_BATCH_SIZE; default: 1000).")
    var purgeBatchSize: Int?

    func options(purgeIntervalSeconds: Int? = nil) throws -> RetentionOptions {
        RetentionOptions(
            retention: .seconds(
                try Environment.int("LEDGER_RETENTION_S", flag: retentionSeconds, default: 86_400, range: 0...(3_650 * 86_400))),
            purgeInterval: .seconds(
                try Environment.int("LEDGER_PURGE_INTERVAL_S", flag: purgeIntervalSeconds, default: 60, range: 1...86_400)),
            purgeBatchSize: try Environment.int(
                "LEDGER_PURGE_BATCH_SIZE", flag: purgeBatchSize, default: 1_000, range: 1...100_000))
    }
}

/// Turns a database failure into a one-line message and a non-zero exit, instead of a stack of types.
func withDatabaseErrors<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as LedgerStoreError {
        FileHandle.standardError.write(Data("ledger: database error: \(error.debugDescription)\n".utf8))
        throw ExitCode(2)
    } catch let error as PostgresError {
        // Raised outside the store (the pool itself); the same message as a store error.
        FileHandle.standardError.write(Data("ledger: database error: \(error.debugDescription)\n".utf8))
        throw ExitCode(2)
    } catch let error as Migrator.Failure {
        FileHandle.standardError.write(Data("ledger: \(error)\n".utf8))
        throw ExitCode(2)
    }
}
