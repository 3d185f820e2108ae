/// The event feed's vocabulary and the query of `GET /v1/events`.
public enum EventType {
    /// Every type the feed carries, in the contract's order.
    public static let all: [String] = [
        "account.created", "transfer.created", "hold.created", "hold.captured", "hold.voided", "hold.expired",
    ]
}

/// `GET /v1/events?after=ID&limit=N&wait_s=S`, validated.
public struct EventsQuery: Sendable, Equatable {
    public static let limitDefault = 100
    public static let limitMax = 1_000
    public static let waitSecondsMax = 30

    /// The position after which to read; nil: from the first event.
    public var after: Int64?
    public var limit: Int
    public var waitSeconds: Int

    public init(after: Int64?, limit: Int, waitSeconds: Int) {
        self.after = after
        self.limit = limit
        self.waitSeconds = waitSeconds
    }

    /// Checks limit, then wait_s, then the form of after (whether this client was given it is the database's to say).
    public static func parse(after: String?, limit: String?, waitSeconds: String?) -> Result<EventsQuery, Problem> {
        var parsedLimit = limitDefault
        if let limit {
            guard let value = decimal(limit), (1...Int64(limitMax)).contains(value) else {
                return .failure(.invalidLimit("limit must be an integer from 1 to \(limitMax)."))
            }
            parsedLimit = Int(value)
        }
        var wait = 0
        if let waitSeconds {
            guard let value = decimal(waitSeconds), (0...Int64(waitSecondsMax)).contains(value) else {
                return .failure(.invalidWait)
            }
            wait = Int(value)
        }
        var position: Int64?
        if let after {
            guard let value = decimal(after), value >= 1, String(value) == after else { return .failure(.invalidEventCursor) }
            position = value
        }
        return .success(EventsQuery(after: position, limit: parsedLimit, waitSeconds: wait))
    }

    /// A non-negative decimal integer of at most 18 digits, else nil.
    static func decimal(_ text: String) -> Int64? {
        guard !text.isEmpty, text.utf8.count <= 18, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return Int64(text)
    }
}

extension Problem {
    public static let invalidWait = Problem(
        status: 400, code: "invalid-wait", title: "Invalid wait", detail: "wait_s must be an integer from 0 to 30.")
    public static let invalidEventCursor = Problem(
        status: 400, code: "invalid-cursor", title: "Invalid cursor",
        detail: "after must be an event id this service gave this client.")
    public static func eventWaitersExhausted(retryAfterSeconds: Int) -> Problem {
        Problem(
            status: 503, code: "events-waiters-exhausted", title: "Too many waiting requests",
            detail: "Too many requests are waiting for events on this instance; retry later or with wait_s=0.",
            retryAfterSeconds: retryAfterSeconds)
    }
    public static func invalidWebhookID(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-webhook-id", title: "Invalid webhook id", detail: detail)
    }
    public static func invalidWebhookURL(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-webhook-url", title: "Invalid webhook URL", detail: detail)
    }
    public static func invalidEventType(_ detail: String) -> Problem {
        Problem(status: 400, code: "invalid-event-type", title: "Invalid event type", detail: detail)
    }
    public static func webhookNotFound(_ id: String) -> Problem {
        Problem(status: 404, code: "webhook-not-found", title: "Webhook not found", detail: "Webhook \(id) does not exist.")
    }
}
