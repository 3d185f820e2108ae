import Foundation
import Hummingbird
import HummingbirdCore
import LedgerStore
import Logging
import Prometheus
import ServiceLifecycle

/// What the HTTP service needs beyond its store, read from flags and the environment by the executable. The
/// database settings are not here: the executable opens the store, so this layer never sees PostgreSQL.
public struct ServeConfiguration: Sendable {
    public var hostname: String
    public var port: Int
    public var http: HTTPOptions
    /// Apply pending migrations before accepting requests. Default true.
    public var migrateAtStart: Bool
    /// Where the migrations are (found by `Migrator.locateDirectory` when nil).
    public var migrationsDirectory: String?

    public init(
        hostname: String = "127.0.0.1", port: Int = 8080, http: HTTPOptions = .init(), migrateAtStart: Bool = true,
        migrationsDirectory: String? = nil
    ) {
        self.hostname = hostname
        self.port = port
        self.http = http
        self.migrateAtStart = migrateAtStart
        self.migrationsDirectory = migrationsDirectory
    }
}

/// Closes the store's connections when the service group shuts down. Added before the server, so it stops after the
/// server has finished its in-flight requests (a service group stops services in reverse order).
struct StoreClosingService: Service {
    let store: LedgerStore

    func run() async throws {
        try? await gracefulShutdown()
        await store.close()
    }
}

/// Builds the whole service on `store`; `ledger serve` runs it and tests build the very same thing.
///
/// `readiness` is the flag `GET /health/ready` reads; a `DrainService` of the caller's service group sets it.
///
/// `services` run beside the server (the background purge, say): they start after the store's closer and stop
/// before it, so nothing they do outlives the connections.
public func buildApplication(
    store: LedgerStore, configuration: ServeConfiguration, services: [any Service] = [],
    metricsRegistry: PrometheusCollectorRegistry? = nil, readiness: Readiness = Readiness(), logger: Logger
) throws -> some ApplicationProtocol {
    let api = LedgerAPI(
        store: store, options: configuration.http, metricsRegistry: metricsRegistry, readiness: readiness,
        logger: logger)
    // Every connection is bounded: closed after `idleTimeout` without a byte (half-sent requests included), and
    // no more than `connectionsMax` open at once.
    var app = Application(
        responder: api,
        server: .http1(
            configuration: .init(
                additionalChannelHandlers: [HTTP1ConnectionClose.Installer()],
                idleTimeout: .nanoseconds(Int64(configuration.http.idleTimeout.components.seconds) * 1_000_000_000
                + configuration.http.idleTimeout.components.attoseconds / 1_000_000_000))),
        configuration: .init(
            address: .hostname(configuration.hostname, port: configuration.port), serverName: nil,
            availableConnectionsDelegate: MaximumAvailableConnections(configuration.http.connectionsMax, logger: logger)),
        logger: logger
    )
    app.addServices(StoreClosingService(store: store))
    app.addServices(services)
    app.addServices(api.events)
    if configuration.migrateAtStart {
        let directory = try configuration.migrationsDirectory.map { URL(fileURLWithPath: $0) }
            ?? Migrator.locateDirectory()
        let migrator = try Migrator.load(directory: directory, logger: logger)
        app.beforeServerStarts {
            try await store.migrate(migrator)
        }
    }
    return app
}
