import Foundation
import LedgerCore
import PostgresClient
import Synchronization

/// The event feed and webhooks (sql/0009_events.sql): each one call of a SQL function.
extension LedgerStore {
    // MARK: Feed

    /// One page of the feed as the database answers it.
    public struct EventsPage: Sendable, Equatable {
        /// The JSON array of the events, oldest first.
        public var eventsJSON: String
        /// The last event's position, else the `after` given (nil when none).
        public var nextAfter: Int64?
        /// The client's event mark before the page was read (see `eventMarks`).
        public var mark: Int64
    }

    /// The client's events after `after`, at most `limit`; nil when `after` was never given to this client.
    public func eventsPage(client: String, after: Int64?, limit: Int) async throws -> EventsPage? {
        try await mappingErrors {
            let rows = try await retryingConflicts {
                try await pool.query(
                    "SELECT events_json, next_after, mark, cursor_ok FROM ledger.events_page($1, $2, $3)",
                    [.string(client), after.map { .int64($0) } ?? .null, .int32(Int32(limit))])
            }
            let row = rows.rows[0]
            guard try row.decode(Bool.self, "cursor_ok") else { return nil }
            return EventsPage(
                eventsJSON: try row.decode(String.self, "events_json"),
                nextAfter: try row.decodeIfPresent(Int64.self, "next_after"), mark: try row.decode(Int64.self, "mark"))
        }
    }

    /// Per client, a number that grows with every event that commits for it (`ledger.event_marks`).
    public func eventMarks(clients: [String]) async throws -> [String: Int64] {
        try await mappingErrors {
            let rows = try await pool.query(
                "SELECT client_id, mark FROM ledger.event_marks($1::text[])", [.string(PostgresArray.text(clients))])
            var marks: [String: Int64] = [:]
            for row in rows.rows { marks[try row.decode(String.self, "client_id")] = try row.decode(Int64.self, "mark") }
            return marks
        }
    }

    /// Places committed events of up to `clientsMax` clients in their feeds; returns how many it placed.
    public func sequencePendingEvents(clientsMax: Int) async throws -> Int {
        try await mappingErrors {
            try await pool.query(
                "SELECT ledger.sequence_pending_events($1) AS placed", [.int32(Int32(clamping: clientsMax))]
            ).rows[0].decode(Int.self, "placed")
        }
    }

    // MARK: Webhooks

    public enum PutWebhookOutcome: Sendable, Equatable {
        /// New: the webhook's JSON with its `secret`.
        case created(body: String)
        /// It existed: url, types and enabled replaced.
        case replaced(body: String)
    }

    public func putWebhook(client: String, id: String, request: WebhookRequest) async throws -> PutWebhookOutcome {
        try await mappingErrors {
            let key = try await webhookServiceKey()
            var nonce = [UInt8](repeating: 0, count: 32)
            var generator = SystemRandomNumberGenerator()
            for index in nonce.indices { nonce[index] = UInt8.random(in: 0...255, using: &generator) }
            let rows = try await retryingConflicts {
                try await pool.query(
                    "SELECT status_code, body FROM ledger.put_webhook($1, $2, $3, $4::text[], $5, $6, $7)",
                    [
                        .string(client), .string(id), .string(request.url), .string(PostgresArray.text(request.types)),
                        .bool(request.enabled), .bytea(Data(nonce)), .string(key.id),
                    ])
            }
            let row = rows.rows[0]
            let body = try row.decode(String.self, "body")
            guard try row.decode(Int.self, "status_code") == 201 else { return .replaced(body: body) }
            let secret = WebhookSignature.secret(serviceKey: key.bytes, client: client, webhookID: id, nonce: nonce)
            return .created(body: String(body.dropLast()) + ",\"secret\":" + JSONValue.quoted(secret) + "}")
        }
    }

    /// The webhook's JSON, or nil when the client has none of that id.
    public func webhook(client: String, id: String) async throws -> String? {
        try await mappingErrors {
            try await pool.query("SELECT ledger.webhook_json($1, $2) AS body", [.string(client), .string(id)])
                .rows[0].decodeIfPresent(String.self, "body")
        }
    }

    /// `{"webhooks":[...]}`, by id.
    public func webhooks(client: String) async throws -> String {
        try await mappingErrors {
            try await pool.query("SELECT ledger.webhooks_list($1) AS body", [.string(client)])
                .rows[0].decode(String.self, "body")
        }
    }

    /// Deletes the webhook and its undelivered events; false when there was none.
    public func deleteWebhook(client: String, id: String) async throws -> Bool {
        try await mappingErrors {
            try await pool.query(
                "WITH gone AS (DELETE FROM ledger.webhooks w WHERE w.client_id = $1 AND w.id = $2 RETURNING 1) "
                    + "SELECT count(*) AS n FROM gone", [.string(client), .string(id)]
            ).rows[0].decode(Int.self, "n") > 0
        }
    }

    /// The key webhook secrets are derived from: `options.webhookKey` when set, else the database's.
    public func webhookServiceKey() async throws -> (id: String, bytes: [UInt8]) {
        if let configured = options.webhookKey {
            return (WebhookSignature.keyID(configuredKey: configured), configured)
        }
        if let known = webhookKeyCache.key.withLock({ $0 }) { return ("database", known) }
        let rows = try await mappingErrors {
            try await pool.query("SELECT key FROM ledger.service_keys WHERE name = 'webhook-secrets'")
        }
        guard let row = rows.first else {
            throw LedgerStoreError(
                code: .internal, databaseKind: "schema", message: "ledger.service_keys holds no webhook key: run ledger migrate")
        }
        let bytes = Array(try row.decode(Data.self, "key"))
        webhookKeyCache.key.withLock { $0 = bytes }
        return ("database", bytes)
    }
}

/// A string array as a PostgreSQL array literal, bound as text and cast (`$1::text[]`): the wrapper binds scalars.
enum PostgresArray {
    static func text(_ values: [String?]) -> String {
        var literal = "{"
        for (index, value) in values.enumerated() {
            if index > 0 { literal += "," }
            guard let value else {
                literal += "NULL"
                continue
            }
            literal += "\""
            for character in value.unicodeScalars {
                if character == "\"" || character == "\\" { literal += "\\" }
                literal.unicodeScalars.append(character)
            }
            literal += "\""
        }
        return literal + "}"
    }

    static func text(_ values: [String]) -> String { text(values.map { Optional($0) }) }

    static func integers<T: BinaryInteger>(_ values: [T?]) -> String {
        "{" + values.map { $0.map { String($0) } ?? "NULL" }.joined(separator: ",") + "}"
    }
}

/// The database's webhook key, once read: shared by every copy of a store, like the cursor key.
final class WebhookKeyCache: Sendable {
    let key = Mutex<[UInt8]?>(nil)
}
