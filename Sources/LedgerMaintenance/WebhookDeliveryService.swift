import AsyncHTTPClient
import Foundation
import LedgerCore
import LedgerStore
import Logging
import Metrics
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle

/// Limits of webhook delivery. Every one has a unit and a documented default.
public struct WebhookDeliveryOptions: Sendable {
    /// An attempt that has no 2xx answer within this is a failed attempt. Default 10,000 ms.
    public var timeoutMilliseconds: Int
    /// The first retry's backoff; it doubles per attempt, with jitter. Default 5,000 ms.
    public var retryBaseMilliseconds: Int
    /// The longest backoff (a Retry-After may be longer). Default 3,600,000 ms.
    public var retryMaxMilliseconds: Int
    /// Attempts per event and webhook, then it is counted failed. Default 12.
    public var attemptsMax: Int
    /// Requests in flight to one webhook at most, per replica. Default 16.
    public var concurrencyMax: Int
    /// Requests in flight in all, per replica. Default 256.
    public var inFlightMax: Int
    /// How often due deliveries are looked for (and committed events placed in their feeds). Default 100 ms.
    public var pollIntervalMilliseconds: Int

    public init(
        timeoutMilliseconds: Int = 10_000, retryBaseMilliseconds: Int = 5_000, retryMaxMilliseconds: Int = 3_600_000,
        attemptsMax: Int = 12, concurrencyMax: Int = 16, inFlightMax: Int = 256, pollIntervalMilliseconds: Int = 100
    ) {
        precondition(timeoutMilliseconds >= 1 && retryBaseMilliseconds >= 1, "webhook timings must be positive")
        precondition(retryMaxMilliseconds >= retryBaseMilliseconds, "the retry maximum is below its base")
        precondition(attemptsMax >= 1 && concurrencyMax >= 1 && inFlightMax >= 1, "webhook limits must be positive")
        precondition(pollIntervalMilliseconds >= 1, "the poll interval must be positive")
        self.timeoutMilliseconds = timeoutMilliseconds
        self.retryBaseMilliseconds = retryBaseMilliseconds
        self.retryMaxMilliseconds = retryMaxMilliseconds
        self.attemptsMax = attemptsMax
        self.concurrencyMax = concurrencyMax
        self.inFlightMax = inFlightMax
        self.pollIntervalMilliseconds = pollIntervalMilliseconds
    }

    /// A claimed attempt is not claimed again before this: its timeout and a margin for recording its outcome.
    var leaseMilliseconds: Int { timeoutMilliseconds + 5_000 }
}

/// Delivers webhooks: claims due deliveries (shared across replicas by `FOR UPDATE SKIP LOCKED`), POSTs each with
/// Standard Webhooks headers, and records the outcomes; also places committed events in their feeds. No database
/// transaction is open during an HTTP call. On graceful shutdown it stops claiming and lets what is in flight end;
/// an attempt cut short (or a kill -9) is retried by any replica once its lease ends.
public struct WebhookDeliveryService: Service {
    let store: LedgerStore
    let options: WebhookDeliveryOptions
    let logger: Logger

    public init(store: LedgerStore, options: WebhookDeliveryOptions, logger: Logger) {
        self.store = store
        self.options = options
        self.logger = logger
    }

    struct WebhookKey: Hashable {
        let client: String
        let webhookID: String
    }

    enum Step: Sendable {
        case tick
        case done(LedgerStore.DeliveryResult)
    }

    public func run() async throws {
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(
                connect: .milliseconds(Int64(min(options.timeoutMilliseconds, 5_000))),
                read: .milliseconds(Int64(options.timeoutMilliseconds))))
        configuration.connectionPool = .init(
            idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: options.concurrencyMax)
        let http = HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: configuration)
        let attempter = WebhookAttempter(http: http, store: store, options: options, logger: logger)
        await deliverUntilShutdown(attempter)
        try? await http.shutdown()
    }

    private func deliverUntilShutdown(_ attempter: WebhookAttempter) async {
        await withTaskGroup(of: Step.self) { group in
            var inFlight: [WebhookKey: Int] = [:]
            var total = 0
            var finished: [LedgerStore.DeliveryResult] = []
            var statisticsDue = ContinuousClock.now
            group.addTask { await Self.tick(self.options.pollIntervalMilliseconds) }
            while let step = await group.next() {
                switch step {
                case .done(let result):
                    inFlight[WebhookKey(client: result.client, webhookID: result.webhookID), default: 1] -= 1
                    total -= 1
                    finished.append(result)
                    // Outcomes are recorded together: at a tick, or once a batch of them is waiting.
                    if finished.count < 32 { continue }
                case .tick:
                    group.addTask { await Self.tick(self.options.pollIntervalMilliseconds) }
                }
                await record(&finished)
                if Task.isShuttingDownGracefully || Task.isCancelled {
                    if total == 0 { break }
                    continue
                }
                await placeEvents()
                if ContinuousClock.now >= statisticsDue {
                    statisticsDue = .now + .seconds(15)
                    await reportStatistics()
                }
                let capacity = options.inFlightMax - total
                guard capacity > 0 else { continue }
                let busy = inFlight.filter { $0.value > 0 }.map { (client: $0.key.client, webhookID: $0.key.webhookID, count: $0.value) }
                for delivery in await claim(limit: capacity, busy: busy) {
                    guard delivery.claimed else {
                        Counter(label: "ledger_webhook_deliveries_total", dimensions: [("outcome", "failed")]).increment()
                        continue
                    }
                    inFlight[WebhookKey(client: delivery.client, webhookID: delivery.webhookID), default: 0] += 1
                    total += 1
                    group.addTask { .done(await attempter.attempt(delivery)) }
                }
            }
            group.cancelAll()
        }
    }

    private static func tick(_ milliseconds: Int) async -> Step {
        try? await Task.sleep(for: .milliseconds(milliseconds))
        return .tick
    }

    private func record(_ finished: inout [LedgerStore.DeliveryResult]) async {
        guard !finished.isEmpty else { return }
        do {
            try await store.recordDeliveries(finished)
            finished.removeAll()
        } catch {
            // Kept for the next tick; if the process dies first, the leases end and the attempts are made again.
            logger.warning("recording webhook deliveries failed", metadata: ["error": "\(error)"])
            if finished.count > 10 * options.inFlightMax { finished.removeFirst(finished.count - 10 * options.inFlightMax) }
        }
    }

    private func placeEvents() async {
        do {
            _ = try await store.sequencePendingEvents(clientsMax: 100)
        } catch {
            logger.warning("placing events failed", metadata: ["error": "\(error)"])
        }
    }

    private func claim(
        limit: Int, busy: [(client: String, webhookID: String, count: Int)]
    ) async -> [LedgerStore.WebhookDelivery] {
        do {
            return try await store.claimDeliveries(
                limit: limit, perWebhook: options.concurrencyMax, busy: busy, leaseMilliseconds: options.leaseMilliseconds,
                attemptsMax: options.attemptsMax)
        } catch {
            logger.warning("claiming webhook deliveries failed", metadata: ["error": "\(error)"])
            return []
        }
    }

    private func reportStatistics() async {
        guard let statistics = try? await store.deliveryStatistics() else { return }
        Gauge(label: "ledger_webhook_deliveries_pending").record(statistics.pending)
        Gauge(label: "ledger_webhook_deliveries_failed").record(statistics.failed)
        Gauge(label: "ledger_events_appended").record(statistics.eventsAppended)
    }
}
