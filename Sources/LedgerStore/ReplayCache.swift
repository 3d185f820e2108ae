import Crypto
import Synchronization

/// Answers of completed credits, debits and transfers kept in memory, so that a replay (or a reused key) is answered
/// without a round trip to PostgreSQL.
///
/// Only 201s of single requests are kept, because they are final: the transfer they name is never deleted nor
/// changed, and even after its stored response is purged, the database answers the same bytes for the same request
/// and 422 reused for another (`ledger.execute_transfer`). Stored failures are not kept (after a purge their key
/// executes afresh), nor batches (a purged non-atomic batch re-runs its failed items). So whatever this cache says,
/// the database would say too, on any replica: it is a memo of answers, not a second copy of the ledger's rules.
///
/// Bounded by an estimate of the memory it takes (its strings plus `entryOverheadBytes` each, measured as RSS growth
/// under load); when full it starts over rather than track recency (a miss costs one indexed read). Requests are told
/// apart by the SHA-256 of their fingerprint, 32 bytes kept inline.
final class ReplayCache: Sendable {
    private struct Key: Hashable {
        let client: String
        let key: String
    }

    private struct Entry {
        let fingerprint: SHA256Digest
        let body: String
        /// When the database stored the answer (its `created_at`, on this process's clock), for `Idempotency-TTL`;
        /// nil when it answered from what a purged key made.
        let storedAt: ContinuousClock.Instant?
    }

    /// Heap headers, allocator rounding and the dictionary's slot of one entry, beyond its strings' bytes.
    static let entryOverheadBytes = 320

    private struct State {
        var entries: [Key: Entry] = [:]
        var bytes = 0
    }

    private let state = Mutex(State())
    let bytesMax: Int

    init(bytesMax: Int) {
        precondition(bytesMax >= 1, "a replay cache needs room")
        self.bytesMax = bytesMax
    }

    /// The answer to (client, key, fingerprint) if the key completed with a 201 known here: its replay, or reused.
    func outcome(client: String, key: String, fingerprint: String) -> LedgerStore.PostOutcome? {
        answer(client: client, key: key, fingerprint: fingerprint)?.outcome
    }

    /// The same, with when its answer was stored (remembered from the database's answer), so that its
    /// `Idempotency-TTL` is what the database would give.
    func answer(client: String, key: String, fingerprint: String) -> LedgerStore.KeyedAnswer? {
        guard let entry = state.withLock({ $0.entries[Key(client: client, key: key)] }) else { return nil }
        return entry.fingerprint == SHA256.hash(data: Array(fingerprint.utf8))
            ? LedgerStore.KeyedAnswer(outcome: .replayed(status: 201, body: entry.body), storedAt: entry.storedAt)
            : LedgerStore.KeyedAnswer(outcome: .reused, storedAt: nil)
    }

    /// Keeps a 201, executed or replayed; ignores every other outcome.
    func remember(
        client: String, key: String, fingerprint: String, outcome: LedgerStore.PostOutcome,
        storedAt: ContinuousClock.Instant? = nil
    ) {
        let body: String
        switch outcome {
        case .executed(201, let text), .replayed(201, let text): body = text
        default: return
        }
        let cost = client.utf8.count + key.utf8.count + body.utf8.count + Self.entryOverheadBytes
        guard cost <= bytesMax else { return }
        let digest = SHA256.hash(data: Array(fingerprint.utf8))
        state.withLock { state in
            if state.bytes + cost > bytesMax {
                state.entries.removeAll(keepingCapacity: true)
                state.bytes = 0
            }
            let previous = state.entries.updateValue(
                Entry(fingerprint: digest, body: body, storedAt: storedAt), forKey: Key(client: client, key: key))
            if previous == nil { state.bytes += cost }
        }
    }

    /// Entries held now (for tests and metrics).
    var count: Int { state.withLock { $0.entries.count } }
}
