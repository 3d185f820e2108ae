import Foundation
import LedgerCore
import PostgresClient

/// What the webhook delivery service asks of the database: claims of due deliveries and the outcomes of attempts,
/// each one short transaction, never open during an HTTP call.
extension LedgerStore {
    /// A delivery claimed for one attempt.
    public struct WebhookDelivery: Sendable {
        public var client: String
        public var webhookID: String
        public var eventSeq: Int64
        /// false: it had used its attempts and is now recorded failed; nothing to send.
        public var claimed: Bool
        /// This attempt's number, from 1.
        public var attempt: Int
        public var url: String
        public var secretNonce: [UInt8]
        public var secretKeyID: String
        /// The event's id in the feed: the `webhook-id`.
        public var eventID: Int64
        public var eventCreatedAt: Date
        /// The event's JSON, the same bytes as in a feed answer.
        public var body: String
    }

    public enum DeliveryOutcome: String, Sendable {
        case delivered
        case retry
        case failed
        case gone
    }

    public struct DeliveryResult: Sendable {
        public var client: String
        public var webhookID: String
        public var eventSeq: Int64
        public var outcome: DeliveryOutcome
        /// For `.retry`: when to try again, from now.
        public var retryInMilliseconds: Int?
        public var status: Int?
        /// A short reason for the last failure (no body, no secret).
        public var error: String?

        public init(
            client: String, webhookID: String, eventSeq: Int64, outcome: DeliveryOutcome, retryInMilliseconds: Int?,
            status: Int?, error: String?
        ) {
            self.client = client
            self.webhookID = webhookID
            self.eventSeq = eventSeq
            self.outcome = outcome
            self.retryInMilliseconds = retryInMilliseconds
            self.status = status
            self.error = error
        }
    }

    /// Claims at most `limit` due deliveries, at most `perWebhook` minus `busy` (what this process has in flight)
    /// for one webhook. A claim counts its attempt and is leased for `leaseMilliseconds`.
    public func claimDeliveries(
        limit: Int, perWebhook: Int, busy: [(client: String, webhookID: String, count: Int)], leaseMilliseconds: Int,
        attemptsMax: Int
    ) async throws -> [WebhookDelivery] {
        try await mappingErrors {
            let rows = try await retryingConflicts {
                try await pool.query(
                    """
                    SELECT client_id, webhook_id, event_seq, claimed, attempt, url, secret_nonce, secret_key_id, event_id,
                           extract(epoch FROM event_created_at)::float8::text AS created_epoch, body
                    FROM ledger.claim_deliveries($1, $2, $3::text[], $4::text[], $5::integer[], $6, $7)
                    """,
                    [
                        .int32(Int32(clamping: limit)), .int32(Int32(clamping: perWebhook)),
                        .string(PostgresArray.text(busy.map(\.client))), .string(PostgresArray.text(busy.map(\.webhookID))),
                        .string(PostgresArray.integers(busy.map { Optional($0.count) })),
                        .int32(Int32(clamping: leaseMilliseconds)), .int32(Int32(clamping: attemptsMax)),
                    ])
            }
            return try rows.rows.map { row in
                WebhookDelivery(
                    client: try row.decode(String.self, "client_id"), webhookID: try row.decode(String.self, "webhook_id"),
                    eventSeq: try row.decode(Int64.self, "event_seq"), claimed: try row.decode(Bool.self, "claimed"),
                    attempt: try row.decode(Int.self, "attempt"), url: try row.decode(String.self, "url"),
                    secretNonce: Array(try row.decode(Data.self, "secret_nonce")),
                    secretKeyID: try row.decode(String.self, "secret_key_id"),
                    eventID: try row.decode(Int64.self, "event_id"),
                    eventCreatedAt: Date(timeIntervalSince1970: Double(try row.decode(String.self, "created_epoch")) ?? 0),
                    body: try row.decode(String.self, "body"))
            }
        }
    }

    /// Records the outcomes of attempts in one statement.
    public func recordDeliveries(_ results: [DeliveryResult]) async throws {
        guard !results.isEmpty else { return }
        try await mappingErrors {
            _ = try await retryingConflicts {
                try await pool.query(
                    """
                    SELECT ledger.record_deliveries($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                                                    $6::integer[], $7::text[])
                    """,
                    [
                        .string(PostgresArray.text(results.map(\.client))),
                        .string(PostgresArray.text(results.map(\.webhookID))),
                        .string(PostgresArray.integers(results.map { Optional($0.eventSeq) })),
                        .string(PostgresArray.text(results.map(\.outcome.rawValue))),
                        .string(PostgresArray.integers(results.map(\.retryInMilliseconds))),
                        .string(PostgresArray.integers(results.map(\.status))),
                        .string(PostgresArray.text(results.map(\.error))),
                    ])
            }
        }
    }

    /// Deliveries pending and failed, across every client, and the events appended so far (for metrics).
    public func deliveryStatistics() async throws -> (pending: Int, failed: Int, eventsAppended: Int64) {
        try await mappingErrors {
            let row = try await pool.query(
                """
                SELECT count(*) FILTER (WHERE NOT d.failed) AS pending, count(*) FILTER (WHERE d.failed) AS failed,
                       (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM ledger.events_seq s) AS appended
                FROM ledger.webhook_deliveries d
                """
            ).rows[0]
            return (
                try row.decode(Int.self, "pending"), try row.decode(Int.self, "failed"),
                try row.decode(Int64.self, "appended")
            )
        }
    }
}
