/// Limits of the HTTP layer. Every one has a unit in its name and a documented default.
public struct HTTPOptions: Sendable {
    /// Request bodies larger than this get 413 body-too-large. Default 65,536 (64 KiB, the contract's limit).
    public var bodyBytesMax: Int
    /// `Retry-After` seconds sent with 503 database-unavailable and 409 idempotency-key-in-progress. Default 1.
    public var retryAfterSeconds: Int
    /// How long a known token stays cached in memory. Default 30 s.
    public var authCacheTTL: Duration

    public init(bodyBytesMax: Int = 65_536, retryAfterSeconds: Int = 1, authCacheTTL: Duration = .seconds(30)) {
        precondition(bodyBytesMax >= 1, "bodyBytesMax must be positive")
        self.bodyBytesMax = bodyBytesMax
        self.retryAfterSeconds = retryAfterSeconds
        self.authCacheTTL = authCacheTTL
    }
}
