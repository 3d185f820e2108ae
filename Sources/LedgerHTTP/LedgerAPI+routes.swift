import HTTPTypes
import Hummingbird
import LedgerCore

/// The route table: every endpoint of the service, in one list. Adding an endpoint is one entry here and one
/// handler in the `LedgerAPI+<resource>.swift` file of its resource; `ledger routes` prints this table and the
/// OpenAPI test compares it with the description.
extension LedgerAPI {
    static let routes: [Route] = [
        Route(.get, "/health") { api, call in try await api.health(call) },
        Route(.get, "/health/live") { api, call in api.live(call) },
        Route(.get, "/health/ready") { api, call in try await api.ready(call) },
        Route(.get, "/metrics") { api, call in api.metrics(call) },
        Route(.get, "/openapi.yaml") { api, call in try api.openAPI(call) },
        Route(.get, "/v1/accounts/{id}") { api, call in try await api.getAccount(call) },
        Route(.put, "/v1/accounts/{id}") { api, call in try await api.putAccount(call) },
        Route(.get, "/v1/accounts/{id}/entries") { api, call in try await api.getEntries(call) },
        Route(.get, "/v1/accounts/{id}/holds") { api, call in try await api.getAccountHolds(call) },
        Route(.post, "/v1/credits") { api, call in try await api.postTransfer(.credit, call) },
        Route(.post, "/v1/debits") { api, call in try await api.postTransfer(.debit, call) },
        Route(.post, "/v1/transfers") { api, call in try await api.postTransfer(.transfer, call) },
        // Up to 1,000 transfers: a body limit of its own (`--batch-body-bytes-max`).
        Route(.post, "/v1/transfers/batch", bodyLimit: .batch) { api, call in try await api.postBatch(call) },
        Route(.get, "/v1/transfers/{id}") { api, call in try await api.getTransfer(call) },
        Route(.post, "/v1/transfers/{id}/reversals") { api, call in try await api.postReversal(call) },
        Route(.post, "/v1/holds") { api, call in try await api.postHold(call) },
        Route(.get, "/v1/holds/{id}") { api, call in try await api.getHold(call) },
        Route(.post, "/v1/holds/{id}/capture") { api, call in try await api.captureHold(call) },
        Route(.post, "/v1/holds/{id}/void") { api, call in try await api.voidHold(call) },
        Route(.get, "/v1/idempotency-keys/{key}") { api, call in try await api.getIdempotencyKey(call) },
        Route(.get, "/v1/events") { api, call in try await api.getEvents(call) },
        Route(.get, "/v1/webhooks") { api, call in try await api.listWebhooks(call) },
        Route(.put, "/v1/webhooks/{id}") { api, call in try await api.putWebhook(call) },
        Route(.get, "/v1/webhooks/{id}") { api, call in try await api.getWebhook(call) },
        Route(.delete, "/v1/webhooks/{id}") { api, call in try await api.deleteWebhook(call) },
    ]

    /// `GET /v1/accounts/{id}`, one line per route in table order: what `ledger routes` prints.
    public static var routeDescriptions: [String] {
        routes.map { "\($0.method.rawValue) \($0.pattern)" }
    }
}

/// What a handler gets: the request, its path parameters (still percent-encoded), the authenticated client (empty
/// outside /v1) and the body, already read within the route's limit.
struct RouteCall {
    let request: Request
    let parameters: [String: String]
    let client: String
    let body: [UInt8]
    let trace: RequestTrace

    /// A path parameter the route's pattern names; the pattern guarantees it is there and not empty.
    func parameter(_ name: String) -> String { parameters[name]! }
}

/// One endpoint: a method on a path pattern, the body limit that applies to it, and its handler. The pattern, such
/// as `/v1/accounts/{id}/entries`, is also the route's label in logs and metrics: never the ids themselves.
struct Route: Sendable {
    typealias Handler = @Sendable (LedgerAPI, RouteCall) async throws -> Response

    /// Which `HTTPOptions` limit a route's body has.
    enum BodyLimit: Sendable {
        case standard
        case batch

        func bytes(_ options: HTTPOptions) -> Int {
            switch self {
            case .standard: return options.bodyBytesMax
            case .batch: return options.batchBodyBytesMax
            }
        }
    }

    enum Segment: Sendable, Equatable {
        case literal(String)
        case parameter(String)
    }

    let method: HTTPRequest.Method
    let pattern: String
    let segments: [Segment]
    let bodyLimit: BodyLimit
    let handler: Handler

    init(_ method: HTTPRequest.Method, _ pattern: String, bodyLimit: BodyLimit = .standard, handler: @escaping Handler) {
        self.method = method
        self.pattern = pattern
        self.segments = Route.split(pattern).map { segment in
            segment.hasPrefix("{") && segment.hasSuffix("}")
                ? .parameter(String(segment.dropFirst().dropLast())) : .literal(segment)
        }
        self.bodyLimit = bodyLimit
        self.handler = handler
    }

    var label: String { pattern }

    /// The segments after the leading `/`; empty ones are kept, so `/v1/accounts/` has an empty third segment.
    static func split(_ path: String) -> [String] {
        path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
    }

    /// The path parameters when `segments` fits this pattern, else nil. A parameter is never empty: an empty id
    /// (`/v1/accounts/`, `/v1/accounts//entries`) names no resource, so the path is unknown, not a malformed id.
    func parameters(matching path: [String]) -> [String: String]? {
        guard path.count == segments.count else { return nil }
        var parameters: [String: String] = [:]
        for (segment, value) in zip(segments, path) {
            switch segment {
            case .literal(let literal): guard literal == value else { return nil }
            case .parameter(let name):
                guard !value.isEmpty else { return nil }
                parameters[name] = value
            }
        }
        return parameters
    }

    var literalCount: Int { segments.count { if case .literal = $0 { true } else { false } } }
}

/// What a path resolves to in a table: the routes of its pattern (one per method) and its parameters.
struct RouteMatch {
    /// Every route of the best-matching pattern, in table order: their methods are the `Allow` of a 405.
    let routes: [Route]
    let parameters: [String: String]

    var label: String { routes[0].label }
    var allow: [String] { routes.map(\.method.rawValue) }

    func route(for method: HTTPRequest.Method) -> Route? { routes.first { $0.method == method } }

    /// The pattern that fits `path` with the most literal segments wins, so `/v1/transfers/batch` is the batch
    /// route, not a transfer whose id is "batch"; nil for an unknown path. Segments are still percent-encoded.
    static func find(_ path: String, in table: [Route]) -> RouteMatch? {
        let segments = Route.split(path)
        var best: (pattern: String, literals: Int, parameters: [String: String])?
        for route in table {
            guard let parameters = route.parameters(matching: segments) else { continue }
            if best == nil || route.literalCount > best!.literals {
                best = (route.pattern, route.literalCount, parameters)
            }
        }
        guard let best else { return nil }
        return RouteMatch(routes: table.filter { $0.pattern == best.pattern }, parameters: best.parameters)
    }
}
