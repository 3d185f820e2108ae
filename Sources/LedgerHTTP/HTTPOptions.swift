import LedgerCore

/// Limits of the HTTP layer. Every one has a unit in its name and a documented default.
public struct HTTPOptions: Sendable {
    /// Request bodies larger than this get 413 body-too-large. Default 65,536 (64 KiB, the contract's limit).
    public var bodyBytesMax: Int
    /// The same for POST /v1/transfers/batch, whose 1,000 transfers need more room. Default 1,048,576 (1 MiB).
    public var batchBodyBytesMax: Int
    /// `Retry-After` seconds sent with 503 database-unavailable and 409 idempotency-key-in-progress. Default 1.
    public var retryAfterSeconds: Int
    /// How long a known token stays cached in memory. Default 30 s.
    public var authCacheTTL: Duration
    /// A connection that sends nothing for this long is closed: one that stopped mid-headers or mid-body, or an idle
    /// keep-alive connection between requests (a request being answered is never cut). Default 15 s.
    public var idleTimeout: Duration
    /// Open connections at most; beyond it the server stops accepting until one closes (the kernel's backlog holds
    /// the rest). Default 4,096, below a typical `ulimit -n` of 1,048,576 and far below what exhausts memory.
    public var connectionsMax: Int
    /// Requests of `GET /v1/events` waiting (`wait_s`) at once, at most; one more is answered 503 at once. Default
    /// 1,000.
    public var eventsWaitersMax: Int
    /// How often waiting feed requests look for new commits: one query for all of them. It bounds how late a waiter
    /// learns of an event (the contract allows 1 s). Default 100 ms.
    public var eventsPollInterval: Duration
    /// Hosts webhook URLs may target (`--webhook-hosts-allowed`). Default: any.
    public var webhookHostsAllowed: WebhookHostsAllowed

    public init(
        bodyBytesMax: Int = 65_536, batchBodyBytesMax: Int = 1_048_576, retryAfterSeconds: Int = 1,
        authCacheTTL: Duration = .seconds(30), idleTimeout: Duration = .seconds(15), connectionsMax: Int = 4_096,
        eventsWaitersMax: Int = 1_000, eventsPollInterval: Duration = .milliseconds(100),
        webhookHostsAllowed: WebhookHostsAllowed = .everyHost
    ) {
        precondition(bodyBytesMax >= 1 && batchBodyBytesMax >= 1, "body limits must be positive")
        precondition(eventsWaitersMax >= 0 && eventsPollInterval > .zero, "event wait limits must be positive")
        self.eventsWaitersMax = eventsWaitersMax
        self.eventsPollInterval = eventsPollInterval
        self.webhookHostsAllowed = webhookHostsAllowed
        precondition(idleTimeout > .zero && connectionsMax >= 1, "connection limits must be positive")
        self.idleTimeout = idleTimeout
        self.connectionsMax = connectionsMax
        self.bodyBytesMax = bodyBytesMax
        self.batchBodyBytesMax = batchBodyBytesMax
        self.retryAfterSeconds = retryAfterSeconds
        self.authCacheTTL = authCacheTTL
    }
}
