import ArgumentParser
import Foundation
import LedgerBench
import NIOCore
import NIOPosix

extension LedgerCommand {
    struct Bench: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Drive a running service with N connections for T seconds; print transfers/s, p50/p99/p99.9 latency and errors. scripts/bench runs every workload beside the pgbench ceiling.")

        @Option(name: .customLong("url"), help: "Base URL of the service (env: LEDGER_URL; default: http://127.0.0.1:8080).")
        var url: String?

        @Option(name: .customLong("token"), help: "Bearer token (env: LEDGER_TOKEN).")
        var token: String?

        @Option(name: .customLong("workload"), help: "transfers, hot, replays, mixed, batch, batch-disjoint or holds (default: transfers).")
        var workload: String = "transfers"

        @Option(name: .customLong("connections"), help: "Concurrent connections, one request in flight each (default: 16).")
        var connections: Int = 16

        @Option(name: .customLong("duration-s"), help: "Seconds of measured load (default: 10).")
        var durationSeconds: Int = 10

        @Option(name: .customLong("accounts"), help: "Funded accounts for transfers, mixed and the batch workloads (default: 10000).")
        var accounts: Int = 10_000

        @Option(name: .customLong("batch-size"), help: "Transfers per request of the batch workload, 1 to 1000 (default: 1000).")
        var batchSize: Int = 1_000

        @Option(name: .customLong("rate"), help: "Open loop: requests per second in all, on a fixed schedule; latency counts from when each request was due, so stalls are not hidden (default: closed loop).")
        var rate: Double?

        @Flag(name: .customLong("no-prepare"), help: "Do not create and fund the accounts first (they exist from an earlier run).")
        var noPrepare = false

        func validate() throws {
            guard LoadGenerator.Workload(rawValue: workload) != nil else {
                throw ValidationError("workload must be one of transfers, hot, replays, mixed, batch, batch-disjoint, holds")
            }
            guard workload != "batch-disjoint" || accounts >= 2 * connections else {
                throw ValidationError("batch-disjoint gives each connection accounts of its own: accounts must be at least 2 x connections")
            }
            guard (1...1_000).contains(batchSize) else { throw ValidationError("batch-size 1...1000") }
            guard rate.map({ $0 > 0 && $0 <= 1_000_000 }) ?? true else {
                throw ValidationError("rate 0 < R <= 1000000")
            }
            guard (1...4_096).contains(connections), (1...3_600).contains(durationSeconds), (2...1_000_000).contains(accounts) else {
                throw ValidationError("connections 1...4096, duration-s 1...3600, accounts 2...1000000")
            }
        }

        func run() async throws {
            let base = URL(string: url ?? Environment.string("LEDGER_URL") ?? "http://127.0.0.1:8080")
            guard let base, let host = base.host, base.scheme == "http" else {
                throw ValidationError("--url must be http://host:port")
            }
            guard let token = token ?? Environment.string("LEDGER_TOKEN") else {
                throw ValidationError("a bearer token is needed: --token or LEDGER_TOKEN")
            }
            let generator = LoadGenerator(
                options: .init(
                    host: host, port: base.port ?? 80, token: token, workload: LoadGenerator.Workload(rawValue: workload)!,
                    connections: connections, duration: .seconds(durationSeconds), accounts: accounts,
                    batchSize: batchSize, rate: rate))
            // One event loop: the generator must take as little CPU from the service and PostgreSQL as it can.
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            if !noPrepare { try await generator.prepare(group: group) }
            let report = try await generator.run(group: group)
            try await group.shutdownGracefully()
            print(report.line)
            if report.errorCount > 0 { throw ExitCode(1) }
        }
    }
}
