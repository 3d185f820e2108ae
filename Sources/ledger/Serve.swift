import ArgumentParser
import Foundation
import Hummingbird
import LedgerHTTP
import LedgerMaintenance
import LedgerStore
import Metrics
import PostgresClient
import Prometheus
import ServiceLifecycle
import UnixSignals

extension LedgerCommand {
    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve the HTTP API. Applies pending migrations first unless --no-migrate; stops gracefully on SIGTERM and SIGINT.")

        @OptionGroup var database: DatabaseOptions

        @Option(name: .customLong("hostname"), help: "Address to listen on (env: HOST; default: 127.0.0.1).")
        var hostname: String?

        @Option(name: .customLong("port"), help: "Port to listen on (env: PORT; default: 8080).")
        var port: Int?

        @Flag(name: .customLong("no-migrate"), help: "Do not apply pending migrations at start (env: LEDGER_NO_MIGRATE=1).")
        var noMigrate = false

        @Option(name: .customLong("sql-dir"), help: "Directory of the migration files (env: LEDGER_SQL_DIR; default: ./sql, or sql/ beside the executable).")
        var sqlDirectory: String?

        @Option(name: .customLong("pool-size"), help: "PostgreSQL connections at most (env: LEDGER_POOL_SIZE; default: 16).")
        var poolSize: Int?

        @Option(name: .customLong("pool-acquire-wait-ms"), help: "How long a request waits for a free connection before 503, in ms (env: LEDGER_POOL_ACQUIRE_WAIT_MS; default: 5000).")
        var poolAcquireWaitMilliseconds: Int?

        @Option(name: .customLong("connect-timeout-s"), help: "libpq connect_timeout in seconds, at least 2 (env: LEDGER_CONNECT_TIMEOUT_S; default: 5).")
        var connectTimeoutSeconds: Int?

        @Option(name: .customLong("statement-timeout-ms"), help: "statement_timeout of every connection in ms; a statement over it is 503 (env: LEDGER_STATEMENT_TIMEOUT_MS; default: 10000).")
        var statementTimeoutMilliseconds: Int?

        @Option(name: .customLong("database-call-timeout-ms"), help: "How long one database call may go unanswered before its connection is dropped and the request answered 503, in ms; kept by the service, so it holds when the database host or the network stops answering; 0 for no bound (env: LEDGER_DATABASE_CALL_TIMEOUT_MS; default: the statement timeout + 5000).")
        var databaseCallTimeoutMilliseconds: Int?

        @Option(name: .customLong("key-wait-ms"), help: "How long a request waits for another execution of the same Idempotency-Key before 409 idempotency-key-in-progress, in ms (env: LEDGER_KEY_WAIT_MS; default: 5000).")
        var keyWaitMilliseconds: Int?

        @Option(name: .customLong("conflict-retries-max"), help: "Retries of a transaction rolled back by a serialization failure or deadlock (env: LEDGER_CONFLICT_RETRIES_MAX; default: 3).")
        var conflictRetriesMax: Int?

        @Option(name: .customLong("body-bytes-max"), help: "Largest request body in bytes; larger is 413 (env: LEDGER_BODY_BYTES_MAX; default: 65536).")
        var bodyBytesMax: Int?

        @Option(name: .customLong("batch-body-bytes-max"), help: "Largest body of POST /v1/transfers/batch in bytes; larger is 413 (env: LEDGER_BATCH_BODY_BYTES_MAX; default: 1048576).")
        var batchBodyBytesMax: Int?

        @Option(name: .customLong("retry-after-s"), help: "Retry-After seconds on 503 and 409 in-progress (env: LEDGER_RETRY_AFTER_S; default: 1).")
        var retryAfterSeconds: Int?

        @Option(name: .customLong("auth-cache-ttl-ms"), help: "How long a known token is cached in memory, in ms (env: LEDGER_AUTH_CACHE_TTL_MS; default: 30000).")
        var authCacheTTLMilliseconds: Int?

        @Option(name: .customLong("batch-max"), help: "Concurrent requests of one client committed together in one transaction, at most; 1 gives every request a transaction of its own (env: LEDGER_BATCH_MAX; default: 16).")
        var batchMax: Int?

        @Option(name: .customLong("batch-concurrency-max"), help: "Group-commit transactions running at once, at most (env: LEDGER_BATCH_CONCURRENCY_MAX; default: 2).")
        var batchConcurrencyMax: Int?

        @Option(name: .customLong("replay-cache-bytes-max"), help: "Memory for answers of completed transfers, kept to answer replays without a database round trip, in bytes; 0 turns it off (env: LEDGER_REPLAY_CACHE_BYTES_MAX; default: 8388608).")
        var replayCacheBytesMax: Int?

        @OptionGroup var retention: RetentionFlags

        @Option(name: .customLong("purge-interval-s"), help: "Seconds between background purges of stored responses past their retention (env: LEDGER_PURGE_INTERVAL_S; default: 60).")
        var purgeIntervalSeconds: Int?

        @Option(name: .customLong("idle-timeout-s"), help: "Seconds a connection may send nothing before it is closed: mid-headers, mid-body or idle between requests (env: LEDGER_IDLE_TIMEOUT_S; default: 15).")
        var idleTimeoutSeconds: Int?

        @Option(name: .customLong("connections-max"), help: "Open client connections at most; beyond it new ones wait in the kernel's backlog (env: LEDGER_CONNECTIONS_MAX; default: 4096).")
        var connectionsMax: Int?

        @Option(name: .customLong("hold-sweep-interval-ms"), help: "Milliseconds between sweeps that record holds past their expires_at as expired (env: LEDGER_HOLD_SWEEP_INTERVAL_MS; default: 1000).")
        var holdSweepIntervalMilliseconds: Int?

        @Option(name: .customLong("memory-trim-interval-s"), help: "Seconds between returns of freed heap memory to the system (glibc keeps it after bursts); 0 turns it off (env: LEDGER_MEMORY_TRIM_INTERVAL_S; default: 10).")
        var memoryTrimIntervalSeconds: Int?

        @OptionGroup var events: EventFlags

        @Option(name: .customLong("shutdown-grace-s"), help: "On SIGTERM/SIGINT, seconds in-flight requests get to finish before they are cancelled (env: LEDGER_SHUTDOWN_GRACE_S; default: 25).")
        var shutdownGraceSeconds: Int?

        @Option(name: .customLong("drain-s"), help: "On SIGTERM/SIGINT, seconds /health/ready answers 503 while every request is still served, before the listener closes: set it above the balancer's probe interval (env: LEDGER_DRAIN_S; default: 0).")
        var drainSeconds: Int?

        func run() async throws {
            GlibcMalloc.boundArenas()
            let logger = try database.makeLogger(label: "ledger")
            let statementTimeout = try Environment.int(
                "LEDGER_STATEMENT_TIMEOUT_MS", flag: statementTimeoutMilliseconds, default: 10_000, range: 1...3_600_000)
            let postgres = PostgresConfiguration(
                conninfo: database.conninfo,
                connectTimeoutSeconds: try Environment.int(
                    "LEDGER_CONNECT_TIMEOUT_S", flag: connectTimeoutSeconds, default: 5, range: 2...600),
                statementTimeoutMilliseconds: statementTimeout,
                callTimeoutMilliseconds: try Environment.int(
                    "LEDGER_DATABASE_CALL_TIMEOUT_MS", flag: databaseCallTimeoutMilliseconds,
                    default: statementTimeout + 5_000, range: 0...3_600_000),
                poolSizeMax: try Environment.int("LEDGER_POOL_SIZE", flag: poolSize, default: 16, range: 1...1_000),
                acquireWaitMax: .milliseconds(
                    try Environment.int(
                        "LEDGER_POOL_ACQUIRE_WAIT_MS", flag: poolAcquireWaitMilliseconds, default: 5_000, range: 1...600_000))
            )
            let retryAfter = try Environment.int(
                "LEDGER_RETRY_AFTER_S", flag: retryAfterSeconds, default: 1, range: 0...3_600)
            // One retention for the purge, Idempotency-TTL and the expires_at of GET /v1/idempotency-keys/{key}.
            let retentionOptions = try retention.options(purgeIntervalSeconds: purgeIntervalSeconds)
            let storeOptions = LedgerStore.Options(
                keyWaitMilliseconds: try Environment.int(
                    "LEDGER_KEY_WAIT_MS", flag: keyWaitMilliseconds, default: 5_000, range: 1...600_000),
                conflictRetriesMax: try Environment.int(
                    "LEDGER_CONFLICT_RETRIES_MAX", flag: conflictRetriesMax, default: 3, range: 0...100),
                batchMax: try Environment.int("LEDGER_BATCH_MAX", flag: batchMax, default: 16, range: 1...1_000),
                batchConcurrencyMax: try Environment.int(
                    "LEDGER_BATCH_CONCURRENCY_MAX", flag: batchConcurrencyMax, default: 2, range: 1...1_000),
                replayCacheBytesMax: try Environment.int(
                    "LEDGER_REPLAY_CACHE_BYTES_MAX", flag: replayCacheBytesMax, default: 8 << 20, range: 0...(1 << 30)),
                retryAfterSeconds: retryAfter,
                retentionSeconds: Int(retentionOptions.retention.components.seconds),
                webhookKey: try EventFlags.webhookKey())
            let configuration = ServeConfiguration(
                hostname: hostname ?? Environment.string("HOST") ?? "127.0.0.1",
                port: try Environment.int("PORT", flag: port, default: 8080, range: 0...65_535),
                http: HTTPOptions(
                    bodyBytesMax: try Environment.int(
                        "LEDGER_BODY_BYTES_MAX", flag: bodyBytesMax, default: 65_536, range: 1...(64 << 20)),
                    batchBodyBytesMax: try Environment.int(
                        "LEDGER_BATCH_BODY_BYTES_MAX", flag: batchBodyBytesMax, default: 1_048_576, range: 1...(64 << 20)),
                    retryAfterSeconds: retryAfter,
                    authCacheTTL: .milliseconds(
                        try Environment.int(
                            "LEDGER_AUTH_CACHE_TTL_MS", flag: authCacheTTLMilliseconds, default: 30_000, range: 0...3_600_000)),
                    idleTimeout: .seconds(
                        try Environment.int("LEDGER_IDLE_TIMEOUT_S", flag: idleTimeoutSeconds, default: 15, range: 1...3_600)),
                    connectionsMax: try Environment.int(
                        "LEDGER_CONNECTIONS_MAX", flag: connectionsMax, default: 4_096, range: 1...1_000_000),
                    eventsWaitersMax: try events.waitersMax(), eventsPollInterval: try events.pollInterval(),
                    webhookHostsAllowed: try events.hostsAllowed()),
                migrateAtStart: !(noMigrate || Environment.bool("LEDGER_NO_MIGRATE")),
                migrationsDirectory: sqlDirectory ?? Environment.string("LEDGER_SQL_DIR")
            )
            let readiness = Readiness()
            let registry = PrometheusCollectorRegistry()
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
            // The store answers 503s with the same Retry-After as the HTTP layer's 409s: one flag, both layers.
            let store = LedgerStore(
                pool: PostgresPool(configuration: postgres, logger: logger), options: storeOptions, logger: logger)
            let purge = PurgeService(
                store: store, options: retentionOptions, logger: logger)
            let sweep = HoldSweepService(
                store: store,
                interval: .milliseconds(
                    try Environment.int(
                        "LEDGER_HOLD_SWEEP_INTERVAL_MS", flag: holdSweepIntervalMilliseconds, default: 1_000,
                        range: 10...3_600_000)),
                logger: logger)
            let drain = DrainService(
                readiness: readiness,
                delay: .seconds(try Environment.int("LEDGER_DRAIN_S", flag: drainSeconds, default: 0, range: 0...3_600)),
                logger: logger)
            let deliveries = WebhookDeliveryService(store: store, options: try events.deliveryOptions(), logger: logger)
            let trimIntervalSeconds = try Environment.int(
                "LEDGER_MEMORY_TRIM_INTERVAL_S", flag: memoryTrimIntervalSeconds, default: 10, range: 0...3_600)
            var services: [any Service] = [purge, sweep, deliveries]
            if trimIntervalSeconds > 0 { services.append(MemoryTrimService(interval: .seconds(trimIntervalSeconds))) }
            let app = try buildApplication(
                store: store, configuration: configuration, services: services, metricsRegistry: registry,
                readiness: readiness, logger: logger)
            // SIGTERM/SIGINT: /health/ready fails and the drain delay runs (the drain is last, so it stops first);
            // then stop accepting, let in-flight requests finish (bounded), then close the pool.
            var group = ServiceGroupConfiguration(
                services: [app, drain], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
            group.maximumGracefulShutdownDuration = .seconds(
                try Environment.int("LEDGER_SHUTDOWN_GRACE_S", flag: shutdownGraceSeconds, default: 25, range: 1...3_600))
            group.maximumCancellationDuration = .seconds(5)
            try await withDatabaseErrors { try await ServiceGroup(configuration: group).run() }
        }
    }
}
