import Foundation
import Hummingbird
import LedgerStore
import Logging
import PostgresClient
import Prometheus
import ServiceLifecycle

/// Everything `ledger serve` needs, read from flags and the environment by the executable.
public struct ServeConfiguration: Sendable {
    public var hostname: String
    public var port: Int
    public var postgres: PostgresConfiguration
    public var store: LedgerStore.Options
    public var http: HTTPOptions
    public var retention: RetentionOptions
    /// Apply pending migrations before accepting requests. Default true.
    public var migrateAtStart: Bool
    /// Where the migrations are (found by `Migrator.locateDirectory` when nil).
    public var migrationsDirectory: String?

    public init(
        hostname: String = "127.0.0.1", port: Int = 8080, postgres: PostgresConfiguration,
        store: LedgerStore.Options = .init(), http: HTTPOptions = .init(), retention: RetentionOptions = .init(),
        migrateAtStart: Bool = true,
        migrationsDirectory: String? = nil
    ) {
        self.hostname = hostname
        self.port = port
        self.postgres = postgres
        self.store = store
        self.http = http
        self.retention = retention
        self.migrateAtStart = migrateAtStart
        self.migrationsDirectory = migrationsDirectory
    }
}

/// Closes the pool when the service group shuts down. Added before the server, so it stops after the server has
/// finished its in-flight requests (a service group stops services in reverse order).
struct PoolService: Service {
    let pool: PostgresPool

    func run() async throws {
        try? await gracefulShutdown()
        await pool.close()
    }
}

/// Builds the whole service; `ledger serve` runs it and tests build the very same thing.
public func buildApplication(
    configuration: ServeConfiguration, metricsRegistry: PrometheusCollectorRegistry? = nil, logger: Logger
) throws -> some ApplicationProtocol {
    let pool = PostgresPool(configuration: configuration.postgres, logger: logger)
    let store = LedgerStore(pool: pool, options: configuration.store, logger: logger).batching()
    let api = LedgerAPI(store: store, options: configuration.http, metricsRegistry: metricsRegistry, logger: logger)
    var app = Application(
        responder: api,
        configuration: .init(address: .hostname(configuration.hostname, port: configuration.port), serverName: nil),
        logger: logger
    )
    app.addServices(
        PoolService(pool: pool), PurgeService(store: store, options: configuration.retention, logger: logger))
    if configuration.migrateAtStart {
        let directory = try configuration.migrationsDirectory.map { URL(fileURLWithPath: $0) }
            ?? Migrator.locateDirectory()
        let migrator = try Migrator.load(directory: directory, logger: logger)
        app.beforeServerStarts {
            try await migrator.migrate(pool: pool)
        }
    }
    return app
}
