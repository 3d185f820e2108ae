// swift-tools-version: 6.2
// Ledger: an idempotent, double-entry wallet service on PostgreSQL.
//
// Layers (arrows point one way only):
//   CLibPQ -> PostgresClient -> LedgerStore <- LedgerCore (pure domain, no I/O)
//   LedgerStore, LedgerCore -> LedgerHTTP (Hummingbird 2) -> ledger (the one executable)
//   LedgerStore -> LedgerMaintenance (purge, hold sweep, webhook deliveries) -> ledger
//   LedgerClient (HTTP client of the API, generated from openapi.yaml; nothing of the server) -> ledger
// LedgerHTTP never sees PostgresClient: the store maps its errors into LedgerStoreError and reports pool statistics.
// Every target lists each module it imports (MemberImportVisibility is on), so an import across layers shows here.
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "ledger",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ledger", targets: ["ledger"]),
        // For services that post money: `.product(name: "LedgerClient", package: "ledger")`.
        .library(name: "LedgerClient", targets: ["LedgerClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", exact: "2.28.1"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        // The client: the runtime of the code swift-openapi-generator made from openapi.yaml, and its transport.
        .package(url: "https://github.com/apple/swift-openapi-runtime.git", from: "1.13.4"),
        .package(url: "https://github.com/swift-server/swift-openapi-async-http-client.git", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
    ],
    targets: [
        // libpq from Debian's libpq-dev, through pkg-config.
        .systemLibrary(
            name: "CLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"])]
        ),
        // Our thin, safe libpq wrapper: connections on threads made for blocking work, a bounded pool.
        .target(
            name: "PostgresClient",
            dependencies: [
                "CLibPQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // The domain: request decoding and validation, idempotency keys, problem codes. No I/O.
        .target(
            name: "LedgerCore",
            dependencies: [.product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: swiftSettings
        ),
        // The ledger's SQL: migrations, the transfer function call, tokens, verify.
        .target(
            name: "LedgerStore",
            dependencies: [
                "PostgresClient",
                "LedgerCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        // Work `ledger serve` runs beside the HTTP server: the periodic purge of stored responses, the hold sweep and
        // webhook deliveries (async-http-client). A target of its own
        // rather than part of LedgerStore, so the data layer stays free of service lifecycles, and rather than part
        // of LedgerHTTP, which only answers requests.
        .target(
            name: "LedgerMaintenance",
            dependencies: [
                "LedgerStore",
                "LedgerCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // The HTTP API on Hummingbird 2.
        .target(
            name: "LedgerHTTP",
            dependencies: [
                "LedgerCore",
                "LedgerStore",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            resources: [.copy("Resources/openapi.yaml")],
            swiftSettings: swiftSettings
        ),
        // The load generator of `ledger bench`: plain NIO HTTP/1.1 connections and HdrHistogram latencies.
        .target(
            name: "LedgerBench",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            swiftSettings: swiftSettings
        ),
        // A client of the HTTP API for services that post money: typed calls generated from the served description
        // (Generated/, made by scripts/openapi-client; the build runs no generator), a retry policy that resends the
        // same key and bytes, and typed problems. Of the server's targets it shares only LedgerCore (pure: no
        // database, no server), for what both sides parse alike (Retry-After).
        .target(
            name: "LedgerClient",
            dependencies: [
                "LedgerCore",
                .product(name: "OpenAPIRuntime", package: "swift-openapi-runtime"),
                .product(name: "OpenAPIAsyncHTTPClient", package: "swift-openapi-async-http-client"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "ledger",
            dependencies: [
                "LedgerHTTP",
                "LedgerBench",
                "LedgerMaintenance",
                "LedgerStore",
                "LedgerCore",
                "LedgerClient",
                // The executable opens the pool the store runs on: the one place above the store that may.
                "PostgresClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: swiftSettings
        ),
        // Test helpers shared by the test targets: throw-away databases on the PostgreSQL that scripts/test starts.
        .target(
            name: "LedgerTestSupport",
            dependencies: ["PostgresClient", .product(name: "Logging", package: "swift-log")],
            path: "Tests/LedgerTestSupport",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "PostgresClientTests", dependencies: ["PostgresClient", "LedgerTestSupport"],
            swiftSettings: swiftSettings),
        .testTarget(name: "LedgerCoreTests", dependencies: ["LedgerCore"], swiftSettings: swiftSettings),
        .testTarget(
            name: "LedgerClientTests",
            dependencies: ["LedgerClient", .product(name: "HTTPTypes", package: "swift-http-types")],
            swiftSettings: swiftSettings),
        .testTarget(
            name: "LedgerHTTPTests",
            dependencies: ["LedgerHTTP", "LedgerCore", .product(name: "HTTPTypes", package: "swift-http-types")],
            swiftSettings: swiftSettings),
        .testTarget(
            name: "LedgerBenchTests",
            dependencies: [
                "LedgerBench", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings),
        .testTarget(
            name: "LedgerStoreTests",
            dependencies: ["LedgerStore", "PostgresClient", "LedgerCore", "LedgerTestSupport"],
            swiftSettings: swiftSettings),
    ]
)
