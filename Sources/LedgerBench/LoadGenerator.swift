import Foundation
import Histogram
import NIOCore
import NIOHTTP1
import NIOPosix

/// Drives a running Ledger service with N connections for T seconds and reports throughput and latency.
///
/// Workloads:
/// - `transfers`: unique keys, random pairs out of `accounts` funded accounts;
/// - `hot`: every transfer moves money between the same 2 accounts, either way;
/// - `replays`: the keys of transfers made beforehand, sent again with the same bodies (each answer must be a replay);
/// - `mixed`: `transfers` with 10 % of requests replaying a key the same connection used before;
/// - `batch`: POST /v1/transfers/batch with `batchSize` transfers between random pairs each, atomic;
/// - `batch-disjoint`: as `batch`, but each connection draws its pairs from a slice of the accounts of its own, so no
///   two connections' batches share an account (payout runs of different merchants): what batches cost when they
///   need not wait for each other's row locks;
/// - `holds`: a hold between two random accounts, then its capture (two requests, measured as one: the pair's
///   latency, one transfer).
public struct LoadGenerator: Sendable {
    public enum Workload: String, Sendable, CaseIterable {
        case transfers, hot, replays, mixed, batch, holds
        case batchDisjoint = "batch-disjoint"

        var isBatch: Bool { self == .batch || self == .batchDisjoint }
    }

    public struct Options: Sendable {
        public var host: String
        public var port: Int
        public var token: String
        public var workload: Workload
        /// Concurrent connections, each with one request in flight. Default 16.
        public var connections: Int
        /// Length of the measured run. Default 10 s.
        public var duration: Duration
        /// Accounts `bench-0` ... for `transfers` and `mixed`. Default 10,000.
        public var accounts: Int
        /// Transfers per request of the `batch` workload, 1 to 1,000. Default 1,000.
        public var batchSize: Int
        /// A prefix for keys, unique per run so that runs never replay each other.
        public var runID: String
        /// Open loop: requests per second in all, sent on a fixed schedule (the connections take turns), each timed
        /// from when it was due rather than from when it went out, so that a stall shows in the latencies instead of
        /// silently delaying the requests behind it (coordinated omission). nil: closed loop, each connection sends
        /// its next request as soon as the answer to the last one arrived.
        public var rate: Double?

        public init(
            host: String, port: Int, token: String, workload: Workload, connections: Int = 16,
            duration: Duration = .seconds(10), accounts: Int = 10_000, batchSize: Int = 1_000,
            runID: String = UUID().uuidString, rate: Double? = nil
        ) {
            precondition(connections >= 1 && accounts >= 2, "need a connection and two accounts")
            precondition(workload != .batchDisjoint || accounts >= 2 * connections, "each connection needs two accounts of its own")
            precondition((1...1_000).contains(batchSize), "a batch holds 1 to 1000 transfers")
            precondition(rate.map { $0 > 0 && $0.isFinite } ?? true, "the rate must be positive")
            self.rate = rate
            self.batchSize = batchSize
            self.host = host
            self.port = port
            self.token = token
            self.workload = workload
            self.connections = connections
            self.duration = duration
            self.accounts = accounts
            self.runID = runID
        }
    }

    public struct Report: Sendable {
        public var workload: Workload
        public var connections: Int
        public var seconds: Double
        public var requests: Int
        /// Transfers the requests asked for: `requests` times the batch size for the batch workloads, else `requests`.
        public var transfers: Int
        public var errors: [Int: Int]
        public var replays: Int
        public var p50Milliseconds: Double
        public var p99Milliseconds: Double
        public var p999Milliseconds: Double
        public var maxMilliseconds: Double
        /// The open-loop schedule, requests per second; nil for a closed-loop run.
        public var rate: Double?
        /// Open loop: requests that fell due before the end but were not sent by then (the service fell behind the
        /// schedule: the rate is above what it can take).
        public var missed = 0

        /// Transfers per second.
        public var perSecond: Double { Double(transfers) / seconds }
        public var errorCount: Int { errors.values.reduce(0, +) }

        public var line: String {
            let errorText = errors.isEmpty ? "0" : errors.sorted { $0.key < $1.key }.map { "\($0.value)x\($0.key)" }.joined(separator: ",")
            return "workload=\(workload.rawValue) connections=\(connections) seconds=\(fmt(seconds)) requests=\(requests) transfers=\(transfers) "
                + "rate=\(fmt(perSecond))/s p50=\(fmt(p50Milliseconds))ms p99=\(fmt(p99Milliseconds))ms "
                + "p99.9=\(fmt(p999Milliseconds))ms max=\(fmt(maxMilliseconds))ms replays=\(replays) errors=\(errorText)"
                + (rate.map { " schedule=\(fmt($0))/s missed=\(missed)" } ?? "")
        }
    }

    public let options: Options

    public init(options: Options) {
        self.options = options
    }

    static let hotAccounts = ["bench-hot-a", "bench-hot-b"]
    static let fundingAmount = 1_000_000_000_000

    /// Creates the workload's accounts (idempotent: PUT and keyed credits), funded so that no transfer of the run
    /// can fail for lack of money.
    public func prepare(group: any EventLoopGroup) async throws {
        let names = options.workload == .hot ? Self.hotAccounts : (0..<options.accounts).map { "bench-\($0)" }
        let host = "\(options.host):\(options.port)"
        let lanes = max(1, min(options.connections, 32))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for lane in 0..<lanes {
                tasks.addTask {
                    try await BenchConnection.with(host: options.host, port: options.port, group: group) { connection in
                        for index in stride(from: lane, to: names.count, by: lanes) {
                            let name = names[index]
                            let put = try await connection.send(
                                BenchConnection.request(
                                    method: .PUT, path: "/v1/accounts/\(name)", host: host, headers: self.headers(key: nil),
                                    body: #"{"currency":"USD"}"#))
                            guard put.status == 200 || put.status == 201 else {
                                throw BenchConnection.Failure(description: "PUT /v1/accounts/\(name) answered \(put.status)")
                            }
                            let credit = try await connection.send(
                                BenchConnection.request(
                                    method: .POST, path: "/v1/credits", host: host,
                                    headers: self.headers(key: "bench-fund-\(name)"),
                                    body: #"{"account":"\#(name)","amount":\#(Self.fundingAmount),"currency":"USD"}"#))
                            guard credit.status == 201 else {
                                throw BenchConnection.Failure(description: "funding \(name) answered \(credit.status)")
                            }
                        }
                    }
                }
            }
            try await tryAll(tasks)
        }
    }

    /// Runs the measured phase and reports.
    public func run(group: any EventLoopGroup) async throws -> Report {
        let host = "\(options.host):\(options.port)"
        // For `replays`: the keys to replay are made first, outside the measured time.
        var replayPool: [[BenchConnection.Request]] = Array(repeating: [], count: options.connections)
        if options.workload == .replays {
            replayPool = try await makeReplayPool(group: group, host: host)
        }
        let started = ContinuousClock.now
        let deadline = started + options.duration
        let lanes = try await withThrowingTaskGroup(of: Lane.self) { tasks in
            for lane in 0..<options.connections {
                let pool = replayPool[lane]
                tasks.addTask {
                    try await self.lane(
                        lane, host: host, replayPool: pool, from: started, until: deadline, group: group)
                }
            }
            var all: [Lane] = []
            for try await lane in tasks { all.append(lane) }
            return all
        }
        let elapsed = ContinuousClock.now - started
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        var errors: [Int: Int] = [:]
        var requests = 0
        var replays = 0
        for lane in lanes {
            histogram.add(lane.histogram)
            requests += lane.requests
            replays += lane.replays
            errors.merge(lane.errors, uniquingKeysWith: +)
        }
        func ms(_ microseconds: UInt64) -> Double { Double(microseconds) / 1_000 }
        return Report(
            workload: options.workload, connections: options.connections,
            seconds: Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18,
            requests: requests, transfers: options.workload.isBatch ? requests * options.batchSize : requests,
            errors: errors, replays: replays,
            p50Milliseconds: ms(histogram.valueAtPercentile(50)), p99Milliseconds: ms(histogram.valueAtPercentile(99)),
            p999Milliseconds: ms(histogram.valueAtPercentile(99.9)), maxMilliseconds: ms(histogram.max),
            rate: options.rate, missed: lanes.reduce(0) { $0 + $1.missed })
    }

    struct Lane: Sendable {
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        var requests = 0
        var replays = 0
        var errors: [Int: Int] = [:]
        var missed = 0
    }

    private func lane(
        _ index: Int, host: String, replayPool: [BenchConnection.Request], from start: ContinuousClock.Instant,
        until deadline: ContinuousClock.Instant, group: any EventLoopGroup
    ) async throws -> Lane {
        try await BenchConnection.with(host: options.host, port: options.port, group: group) { connection in
            try await lane(index, host: host, replayPool: replayPool, from: start, until: deadline, on: connection)
        }
    }

    private func lane(
        _ index: Int, host: String, replayPool: [BenchConnection.Request], from start: ContinuousClock.Instant,
        until deadline: ContinuousClock.Instant, on connection: BenchConnection
    ) async throws -> Lane {
        var generator = SystemRandomNumberGenerator()
        var lane = Lane()
        var sent: [BenchConnection.Request] = []
        var sequence = 0
        // Batch bodies are made once per connection and sent under new keys: building 1,000 random transfers per
        // request would take CPU from the service and the database it measures.
        let batchAccounts = options.workload == .batchDisjoint
            ? (index * options.accounts / options.connections)..<((index + 1) * options.accounts / options.connections)
            : 0..<options.accounts
        let batchBodies = options.workload.isBatch
            ? (0..<8).map { _ in batchBody(accounts: batchAccounts, using: &generator) } : []
        while true {
            // When this request is due: now (closed loop), or its turn on the open-loop schedule, where request k of
            // connection i is the (k * connections + i)-th of the run.
            var due = ContinuousClock.now
            if let rate = options.rate {
                let turn = Double(sequence * options.connections + index)
                due = start + .nanoseconds(Int64((turn / rate * 1e9).rounded()))
                if due >= deadline { break }
                if due > ContinuousClock.now {
                    try await Task.sleep(until: due, clock: .continuous)
                } else if ContinuousClock.now >= deadline {
                    // Behind at the end: what was still due is counted, not sent (the run ends on time).
                    let total = options.duration / .seconds(1) * rate
                    let due = ((total - Double(index)) / Double(options.connections)).rounded(.up)
                    lane.missed = max(0, Int(due) - sequence)
                    break
                }
            } else if due >= deadline {
                break
            }
            let request: BenchConnection.Request
            let expectReplay: Bool
            switch options.workload {
            case .replays:
                request = replayPool[sequence % replayPool.count]
                expectReplay = true
            case .batch, .batchDisjoint:
                request = BenchConnection.request(
                    method: .POST, path: "/v1/transfers/batch", host: host,
                    headers: headers(key: "bench-\(options.runID)-\(index)-\(sequence)"),
                    body: batchBodies[sequence % batchBodies.count])
                expectReplay = false
            case .mixed where !sent.isEmpty && Int.random(in: 0..<10, using: &generator) == 0:
                request = sent[Int.random(in: 0..<sent.count, using: &generator)]
                expectReplay = true
            case .holds:
                request = BenchConnection.request(
                    method: .POST, path: "/v1/holds", host: host,
                    headers: headers(key: "bench-\(options.runID)-\(index)-\(sequence)-hold"),
                    body: transferBody(accounts: 0..<options.accounts, using: &generator))
                expectReplay = false
            default:
                request = newTransfer(lane: index, sequence: sequence, host: host, using: &generator)
                expectReplay = false
                if options.workload == .mixed && sent.count < 10_000 { sent.append(request) }
            }
            sequence += 1
            let started = due
            var response = try await connection.send(request)
            if options.workload == .holds && response.status == 201 {
                response = try await connection.send(capture(of: response, lane: index, sequence: sequence, host: host))
                if response.status == 200 { response.status = 201 }
            }
            let latency = ContinuousClock.now - started
            _ = lane.histogram.record(UInt64(latency.components.attoseconds / 1_000_000_000_000) + UInt64(latency.components.seconds) * 1_000_000)
            lane.requests += 1
            if response.replayed { lane.replays += 1 }
            if response.status != 201 || response.replayed != expectReplay {
                lane.errors[response.status == 201 ? 0 : response.status, default: 0] += 1
            }
        }
        return lane
    }

    private func newTransfer(
        lane: Int, sequence: Int, host: String, using generator: inout SystemRandomNumberGenerator
    ) -> BenchConnection.Request {
        BenchConnection.request(
            method: .POST, path: "/v1/transfers", host: host,
            headers: headers(key: "bench-\(options.runID)-\(lane)-\(sequence)"),
            body: transferBody(accounts: 0..<options.accounts, using: &generator))
    }

    /// The capture of the hold a 201 answer describes (its `"id"` is the first member).
    private func capture(
        of placed: BenchConnection.Response, lane: Int, sequence: Int, host: String
    ) throws -> BenchConnection.Request {
        let text = String(buffer: placed.body)
        guard text.hasPrefix("{\"id\":\""), let end = text.dropFirst(7).firstIndex(of: "\"") else {
            throw BenchConnection.Failure(description: "a hold answer without an id: \(text.prefix(80))")
        }
        let id = text[text.index(text.startIndex, offsetBy: 7)..<end]
        return BenchConnection.request(
            method: .POST, path: "/v1/holds/\(id)/capture", host: host,
            headers: headers(key: "bench-\(options.runID)-\(lane)-\(sequence)-capture"), body: "{}")
    }

    /// `{"from":...,"to":...,"amount":1,"currency":"USD"}` between the hot pair or two random accounts of `accounts`.
    private func transferBody(accounts: Range<Int>, using generator: inout SystemRandomNumberGenerator) -> String {
        let from: String
        let to: String
        if options.workload == .hot {
            let flip = Bool.random(using: &generator)
            (from, to) = flip ? (Self.hotAccounts[0], Self.hotAccounts[1]) : (Self.hotAccounts[1], Self.hotAccounts[0])
        } else {
            let a = Int.random(in: accounts, using: &generator)
            var b = Int.random(in: accounts.lowerBound..<(accounts.upperBound - 1), using: &generator)
            if b >= a { b += 1 }
            (from, to) = ("bench-\(a)", "bench-\(b)")
        }
        return #"{"from":"\#(from)","to":"\#(to)","amount":1,"currency":"USD"}"#
    }

    /// `{"atomic":true,"transfers":[...]}` with `batchSize` random transfers between accounts of `accounts`.
    private func batchBody(accounts: Range<Int>, using generator: inout SystemRandomNumberGenerator) -> String {
        let items = (0..<options.batchSize).map { _ in transferBody(accounts: accounts, using: &generator) }
        return #"{"atomic":true,"transfers":["# + items.joined(separator: ",") + "]}"
    }

    /// Makes 500 transfers per connection (unmeasured) and returns their requests, to be sent again.
    private func makeReplayPool(group: any EventLoopGroup, host: String) async throws -> [[BenchConnection.Request]] {
        try await withThrowingTaskGroup(of: (Int, [BenchConnection.Request]).self) { tasks in
            for lane in 0..<options.connections {
                tasks.addTask {
                    try await BenchConnection.with(host: options.host, port: options.port, group: group) { connection in
                        var generator = SystemRandomNumberGenerator()
                        var made: [BenchConnection.Request] = []
                        for sequence in 0..<500 {
                            let request = self.newTransfer(lane: lane, sequence: sequence, host: host, using: &generator)
                            let response = try await connection.send(request)
                            guard response.status == 201 else {
                                throw BenchConnection.Failure(description: "making replay keys: answered \(response.status)")
                            }
                            made.append(request)
                        }
                        return (lane, made)
                    }
                }
            }
            var pool = Array(repeating: [BenchConnection.Request](), count: options.connections)
            for try await (lane, made) in tasks { pool[lane] = made }
            return pool
        }
    }

    private func headers(key: String?) -> [(String, String)] {
        var headers = [("Authorization", "Bearer \(options.token)"), ("Content-Type", "application/json")]
        if let key { headers.append(("Idempotency-Key", key)) }
        return headers
    }
}

private func tryAll(_ tasks: ThrowingTaskGroup<Void, any Error>) async throws {
    var tasks = tasks
    try await tasks.waitForAll()
}

private func fmt(_ value: Double) -> String {
    String(format: "%.2f", value)
}
