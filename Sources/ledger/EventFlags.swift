import ArgumentParser
import Foundation
import LedgerCore
import LedgerMaintenance

/// The flags of the event feed and of webhooks, for `ledger serve`.
struct EventFlags: ParsableArguments {
    @Option(name: .customLong("events-waiters-max"), help: "Requests of GET /v1/events waiting for events at once, at most; one more is answered 503 (env: LEDGER_EVENTS_WAITERS_MAX; default: 1000).")
    var eventsWaitersMax: Int?

    @Option(name: .customLong("events-poll-interval-ms"), help: "How often waiting GET /v1/events requests look for new commits, in ms (env: LEDGER_EVENTS_POLL_INTERVAL_MS; default: 100).")
    var eventsPollIntervalMilliseconds: Int?

    @Option(name: .customLong("webhook-hosts-allowed"), help: "Hosts webhook URLs may target: comma-separated names, IP addresses or CIDR ranges, * for any; link-local addresses never (env: LEDGER_WEBHOOK_HOSTS_ALLOWED; default: *).")
    var webhookHostsAllowed: String?

    @Option(name: .customLong("webhook-timeout-ms"), help: "An attempt without a 2xx answer within this many ms failed (env: LEDGER_WEBHOOK_TIMEOUT_MS; default: 10000).")
    var webhookTimeoutMilliseconds: Int?

    @Option(name: .customLong("webhook-retry-base-ms"), help: "Backoff after a first failed attempt, in ms; doubles per attempt, with jitter (env: LEDGER_WEBHOOK_RETRY_BASE_MS; default: 5000).")
    var webhookRetryBaseMilliseconds: Int?

    @Option(name: .customLong("webhook-retry-max-ms"), help: "Longest backoff, in ms; a Retry-After may be longer (env: LEDGER_WEBHOOK_RETRY_MAX_MS; default: 3600000).")
    var webhookRetryMaxMilliseconds: Int?

    @Option(name: .customLong("webhook-attempts-max"), help: "Attempts per event and webhook before it counts as failed (env: LEDGER_WEBHOOK_ATTEMPTS_MAX; default: 12).")
    var webhookAttemptsMax: Int?

    @Option(name: .customLong("webhook-concurrency-max"), help: "Requests in flight to one webhook at most, per replica (env: LEDGER_WEBHOOK_CONCURRENCY_MAX; default: 16).")
    var webhookConcurrencyMax: Int?

    @Option(name: .customLong("webhook-poll-interval-ms"), help: "How often due webhook deliveries are looked for, in ms (env: LEDGER_WEBHOOK_POLL_INTERVAL_MS; default: 100).")
    var webhookPollIntervalMilliseconds: Int?

    func waitersMax() throws -> Int {
        try Environment.int("LEDGER_EVENTS_WAITERS_MAX", flag: eventsWaitersMax, default: 1_000, range: 0...100_000)
    }

    func pollInterval() throws -> Duration {
        .milliseconds(
            try Environment.int(
                "LEDGER_EVENTS_POLL_INTERVAL_MS", flag: eventsPollIntervalMilliseconds, default: 100, range: 10...1_000))
    }

    func hostsAllowed() throws -> WebhookHostsAllowed {
        let list = webhookHostsAllowed ?? Environment.string("LEDGER_WEBHOOK_HOSTS_ALLOWED") ?? "*"
        guard let parsed = WebhookHostsAllowed(parsing: list) else {
            throw ValidationError("--webhook-hosts-allowed: each entry is *, a host name, an IP address or a CIDR range")
        }
        return parsed
    }

    func deliveryOptions() throws -> WebhookDeliveryOptions {
        let base = try Environment.int(
            "LEDGER_WEBHOOK_RETRY_BASE_MS", flag: webhookRetryBaseMilliseconds, default: 5_000, range: 1...86_400_000)
        return WebhookDeliveryOptions(
            timeoutMilliseconds: try Environment.int(
                "LEDGER_WEBHOOK_TIMEOUT_MS", flag: webhookTimeoutMilliseconds, default: 10_000, range: 1...300_000),
            retryBaseMilliseconds: base,
            retryMaxMilliseconds: try Environment.int(
                "LEDGER_WEBHOOK_RETRY_MAX_MS", flag: webhookRetryMaxMilliseconds, default: max(base, 3_600_000),
                range: base...(30 * 86_400_000)),
            attemptsMax: try Environment.int(
                "LEDGER_WEBHOOK_ATTEMPTS_MAX", flag: webhookAttemptsMax, default: 12, range: 1...1_000),
            concurrencyMax: try Environment.int(
                "LEDGER_WEBHOOK_CONCURRENCY_MAX", flag: webhookConcurrencyMax, default: 16, range: 1...1_000),
            pollIntervalMilliseconds: try Environment.int(
                "LEDGER_WEBHOOK_POLL_INTERVAL_MS", flag: webhookPollIntervalMilliseconds, default: 100, range: 10...60_000))
    }

    /// `LEDGER_WEBHOOK_KEY`: base64 of at least 32 random bytes, the same on every replica; nil when unset.
    static func webhookKey() throws -> [UInt8]? {
        guard let text = Environment.string("LEDGER_WEBHOOK_KEY") else { return nil }
        guard let bytes = Data(base64Encoded: text), bytes.count >= 32 else {
            throw ValidationError("LEDGER_WEBHOOK_KEY must be base64 of at least 32 bytes (e.g. openssl rand -base64 32)")
        }
        return Array(bytes)
    }
}
