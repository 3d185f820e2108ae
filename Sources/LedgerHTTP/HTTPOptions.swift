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

    public init(
        bodyBytesMax: Int = 65_536, batchBodyBytesMax: Int = 1_048_576, retryAfterSeconds: Int = 1,
        authCacheTTL: Duration = .seconds(30)
    ) {
        precondition(bodyBytesMax >= 1 && batchBodyBytesMax >= 1, "body limits must be positive")
        self.bodyBytesMax = bodyBytesMax
        self.batchBodyBytesMax = batchBodyBytesMax
        self.retryAfterSeconds = retryAfterSeconds
        self.authCacheTTL = authCacheTTL
    }
}
