import Foundation
import LedgerCore
import LedgerStore
import Synchronization

/// Resolves `Authorization: Bearer <token>` to a client.
///
/// Tokens are looked up by their SHA-256, so what is compared is a digest, not the secret: a timing difference
/// reveals nothing about the token. Known tokens are cached in memory for `cacheTTL` so that a request costs no extra
/// round trip to PostgreSQL; unknown tokens are never cached, so a newly created token works at once. A revoked token
/// is refused once its cache entry expires (within `cacheTTL`); an expiring token is never cached past its expiry.
final class Authenticator: Sendable {
    private let store: LedgerStore
    private let cacheTTL: Duration
    private let cacheEntriesMax: Int
    private let cache = Mutex<[Data: (client: String, expires: ContinuousClock.Instant)]>([:])

    init(store: LedgerStore, cacheTTL: Duration, cacheEntriesMax: Int = 10_000) {
        self.store = store
        self.cacheTTL = cacheTTL
        self.cacheEntriesMax = cacheEntriesMax
    }

    /// The token of an `Authorization` header value, or nil if it is not a Bearer credential.
    static func bearerToken(_ header: String?) -> String? {
        guard let header else { return nil }
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        let token = String(parts[1].trimmingOWS)
        guard !token.isEmpty, token.utf8.count <= 512 else { return nil }
        return token
    }

    /// The client the token acts for, or nil for an unknown token.
    func client(forToken token: String) async throws -> String? {
        let digest = LedgerStore.tokenDigest(token)
        let now = ContinuousClock.now
        if let hit = cache.withLock({ $0[digest] }), hit.expires > now { return hit.client }
        guard let accepted = try await store.acceptedToken(token) else { return nil }
        let client = accepted.client
        let entriesMax = cacheEntriesMax
        // Never cached past the token's own expiry; a revocation is noticed when the entry expires.
        let expires = now + min(cacheTTL, accepted.expiresIn ?? cacheTTL)
        cache.withLock { cache in
            // Bounded: when full, start over rather than track recency; refills cost one query per token.
            if cache.count >= entriesMax { cache.removeAll(keepingCapacity: true) }
            cache[digest] = (client, expires)
        }
        return client
    }
}
