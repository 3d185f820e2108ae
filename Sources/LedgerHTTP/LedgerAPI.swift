import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import LedgerCore
import LedgerStore
import Logging
import PostgresClient
import Prometheus

/// The HTTP API of the contract.
///
/// Routing is done here rather than by a router so that the contract's precedence holds exactly: 401, then 413,
/// then the route (404/405), then the Idempotency-Key header, then the body, then what the database decides.
public struct LedgerAPI: HTTPResponder {
    public typealias Context = BasicRequestContext

    let store: LedgerStore
    let authenticator: Authenticator
    let options: HTTPOptions
    let logger: Logger
    /// Exported at GET /metrics; nil when metrics were not bootstrapped (they then go nowhere).
    let metricsRegistry: PrometheusCollectorRegistry?

    public init(
        store: LedgerStore, options: HTTPOptions, metricsRegistry: PrometheusCollectorRegistry? = nil, logger: Logger
    ) {
        self.store = store
        self.authenticator = Authenticator(store: store, cacheTTL: options.authCacheTTL)
        self.options = options
        self.metricsRegistry = metricsRegistry
        self.logger = logger
    }

    /// The routes, matched on path segments after the auth and size checks.
    enum Route: Equatable {
        case health
        case metrics
        case openAPI
        case account(String)
        case entries(String)
        case post(TransferRequest.Kind)
        case batch
        case transfer(String)

        /// The route template, for logs and metric labels (never the ids in the path).
        var label: String {
            switch self {
            case .health: return "/health"
            case .metrics: return "/metrics"
            case .openAPI: return "/openapi.yaml"
            case .account: return "/v1/accounts/{id}"
            case .entries: return "/v1/accounts/{id}/entries"
            case .post(let kind): return kind.path
            case .batch: return "/v1/transfers/batch"
            case .transfer: return "/v1/transfers/{id}"
            }
        }

        var methods: [HTTPRequest.Method] {
            switch self {
            case .health, .metrics, .openAPI, .entries, .transfer: return [.get]
            case .account: return [.get, .put]
            case .post, .batch: return [.post]
            }
        }

        /// nil for an unknown path. Segments are still percent-encoded. An empty id (`/v1/accounts/`,
        /// `/v1/transfers/`) names no resource: the path is unknown, not a malformed id.
        static func match(_ path: String) -> Route? {
            let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
            if segments.count >= 3 && segments[2].isEmpty { return nil }
            switch segments.count {
            case 1 where segments[0] == "health": return .health
            case 1 where segments[0] == "metrics": return .metrics
            case 1 where segments[0] == "openapi.yaml": return .openAPI
            case 2 where segments[0] == "v1":
                switch segments[1] {
                case "credits": return .post(.credit)
                case "debits": return .post(.debit)
                case "transfers": return .post(.transfer)
                default: return nil
                }
            case 3 where segments[0] == "v1" && segments[1] == "accounts": return .account(segments[2])
            // Transfer ids are decimal: "batch" can never be one.
            case 3 where segments[0] == "v1" && segments[1] == "transfers" && segments[2] == "batch": return .batch
            case 3 where segments[0] == "v1" && segments[1] == "transfers": return .transfer(segments[2])
            case 4 where segments[0] == "v1" && segments[1] == "accounts" && segments[3] == "entries":
                return .entries(segments[2])
            default: return nil
            }
        }
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        let started = ContinuousClock.now
        let trace = RequestTrace(requestID: RequestTrace.requestID(from: request.headers[.xRequestID]))
        var response: Response
        do {
            response = try await handle(request, trace: trace)
        } catch let problem as Problem {
            trace.problemCode = problem.code
            response = .problem(problem)
        } catch let error as PostgresError {
            let problem = problemFor(error, trace: trace)
            trace.problemCode = problem.code
            response = .problem(problem)
        } catch {
            logger.error(
                "unexpected error", metadata: ["request.id": "\(trace.requestID)", "error.type": "\(type(of: error))"])
            trace.problemCode = Problem.internalError.code
            response = .problem(.internalError)
        }
        response.headers[.xRequestID] = trace.requestID
        let duration = ContinuousClock.now - started
        LedgerMetrics.request(
            route: trace.route, method: request.method.rawValue, status: response.status.code, duration: duration)
        // The request's log line is built only when it will be written: under load at the default level it is, but
        // a service run at warning saves the formatting.
        guard logger.logLevel <= .info else { return response }
        var metadata: Logger.Metadata = [
            "request.id": "\(trace.requestID)", "http.method": "\(request.method.rawValue)",
            "http.route": "\(trace.route)", "http.status": "\(response.status.code)",
            "http.duration_ms": "\(Double(duration.components.attoseconds / 1_000_000_000_000) / 1_000 + Double(duration.components.seconds) * 1_000)",
        ]
        if let client = trace.client { metadata["client.id"] = "\(client)" }
        if let outcome = trace.idempotencyOutcome { metadata["idempotency.outcome"] = "\(outcome)" }
        if let code = trace.problemCode { metadata["problem.code"] = "\(code)" }
        logger.info("request", metadata: metadata)
        return response
    }

    private func handle(_ request: Request, trace: RequestTrace) async throws -> Response {
        let path = request.uri.path
        let route = Route.match(path)
        trace.route = route?.label ?? "unmatched"
        let isAPI = path == "/v1" || path.hasPrefix("/v1/")
        var client = ""
        if isAPI {
            guard let token = Authenticator.bearerToken(request.headers[.authorization]) else {
                throw Problem.unauthorized("Send Authorization: Bearer <token>.")
            }
            guard let known = try await authenticator.client(forToken: token) else {
                throw Problem.unauthorized("The bearer token is not known.")
            }
            client = known
            trace.client = known
        }
        let body = try await collectBody(
            request,
            limitBytes: route == .batch && request.method == .post ? options.batchBodyBytesMax : options.bodyBytesMax)
        guard let route else { throw Problem.notFound() }
        guard route.methods.contains(request.method) else {
            throw Problem.methodNotAllowed(allow: route.methods.map(\.rawValue))
        }
        switch route {
        case .health:
            return try await health()
        case .metrics:
            return metrics()
        case .openAPI:
            return try openAPI()
        case .post(let kind):
            let key = try idempotencyKey(request)
            let transfer = try TransferRequest.decode(kind: kind, body: body).get()
            return try answer(try await store.post(client: client, key: key, request: transfer), trace: trace)
        case .batch:
            let key = try idempotencyKey(request)
            let batch = try BatchRequest.decode(body: body).get()
            return try answer(try await store.postBatch(client: client, key: key, batch: batch), trace: trace)
        case .account(let rawID):
            let id = try accountID(fromPathSegment: rawID)
            if request.method == .put {
                try checkContentType(request)
                return try await putAccount(client: client, id: id, body: body)
            }
            guard let json = try await store.account(client: client, id: id) else {
                throw Problem.accountNotFound(id)
            }
            return .json(status: 200, body: json)
        case .entries(let rawID):
            let id = try accountID(fromPathSegment: rawID)
            let query = request.uri.queryParameters
            let page = try EntriesPage.parse(
                client: client, account: id, limit: query["limit"].map(String.init),
                cursor: query["cursor"].map(String.init), key: try await store.cursorKey()
            ).get()
            guard let json = try await store.entries(client: client, account: id, page: page) else {
                throw Problem.accountNotFound(id)
            }
            return .json(status: 200, body: json)
        case .transfer(let rawID):
            let id = rawID.removingPercentEncoding ?? rawID
            guard let json = try await store.transfer(client: client, id: id) else {
                throw Problem.transferNotFound(id)
            }
            return .json(status: 200, body: json)
        }
    }

    // MARK: Handlers

    private func health() async throws -> Response {
        do {
            try await store.ping()
        } catch let error as PostgresError {
            logger.warning("health check failed", metadata: ["error": "\(error)"])
            throw Problem.databaseUnavailable(retryAfterSeconds: options.retryAfterSeconds)
        }
        return .json(status: 200, body: "{\"status\":\"ok\"}")
    }

    /// Prometheus text exposition. Pool gauges are sampled now, at scrape time.
    private func metrics() -> Response {
        LedgerMetrics.pool(store.pool.stats)
        let text = metricsRegistry?.emitToBuffer() ?? []
        var headers: HTTPFields = [:]
        headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: text)))
    }

    /// The OpenAPI 3.1 description of this API.
    private func openAPI() throws -> Response {
        guard let document = OpenAPIDocument.yaml else { throw Problem.notFound() }
        var headers: HTTPFields = [:]
        headers[.contentType] = "application/yaml"
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: document)))
    }

    /// The Idempotency-Key of a POST, then its media type: the contract checks the key before the body.
    private func idempotencyKey(_ request: Request) throws -> IdempotencyKey {
        let key = try IdempotencyKey.parse(headerValues: request.headers[values: .idempotencyKey]).get()
        try checkContentType(request)
        return key
    }

    /// The answer to an idempotent POST: its stored outcome, or 422 reused, or 409 in progress.
    private func answer(_ outcome: LedgerStore.PostOutcome, trace: RequestTrace) throws -> Response {
        switch outcome {
        case .executed(let status, let json):
            return answer(status: status, body: json, replayed: false, trace: trace)
        case .replayed(let status, let json):
            return answer(status: status, body: json, replayed: true, trace: trace)
        case .reused:
            trace.idempotencyOutcome = "reused"
            LedgerMetrics.idempotency(outcome: "reused")
            throw Problem.idempotencyKeyReused
        case .inProgress:
            trace.idempotencyOutcome = "in_progress"
            LedgerMetrics.idempotency(outcome: "in_progress")
            throw Problem.idempotencyKeyInProgress(retryAfterSeconds: options.retryAfterSeconds)
        }
    }

    /// A stored outcome (201 or a stored problem), first time or replayed, with `Idempotent-Replayed`.
    private func answer(status: Int, body: String, replayed: Bool, trace: RequestTrace) -> Response {
        let outcome = replayed ? "replayed" : "executed"
        trace.idempotencyOutcome = outcome
        LedgerMetrics.idempotency(outcome: outcome)
        if status != 201, let code = Problem.code(ofJSON: body) {
            trace.problemCode = code
            if !replayed { LedgerMetrics.businessProblem(code: code) }
        }
        return .json(status: status, body: body, headers: [.idempotentReplayed: replayed ? "true" : "false"])
    }

    private func putAccount(client: String, id: String, body: [UInt8]) async throws -> Response {
        let account = try AccountRequest.decode(body: body).get()
        switch try await store.putAccount(client: client, id: id, request: account) {
        case .created(let json): return .json(status: 201, body: json)
        case .unchanged(let json): return .json(status: 200, body: json)
        case .conflict: throw Problem.accountConflict
        }
    }

    // MARK: Request parts

    /// The body, at most `limit` bytes; a declared or actual larger body is 413.
    private func collectBody(_ request: Request, limitBytes limit: Int) async throws -> [UInt8] {
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit {
            throw Problem.bodyTooLarge(limitBytes: limit)
        }
        var bytes: [UInt8] = []
        for try await buffer in request.body {
            guard bytes.count + buffer.readableBytes <= limit else { throw Problem.bodyTooLarge(limitBytes: limit) }
            bytes.append(contentsOf: buffer.readableBytesView)
        }
        return bytes
    }

    /// Bodies are JSON. A declared media type of another format (text/plain, multipart/form-data, XML, ...) is 415.
    /// Accepted: no Content-Type, `application/json`, any `application/*+json`, and
    /// `application/x-www-form-urlencoded`, which is what `curl -d` sends by default; the body must parse as JSON
    /// in every case, or it is 400 invalid-json.
    private func checkContentType(_ request: Request) throws {
        guard let contentType = request.headers[.contentType] else { return }
        let mediaType = contentType.split(separator: ";", maxSplits: 1).first
            .map { $0.trimmingOWS.lowercased() } ?? ""
        let accepted =
            mediaType == "application/json" || mediaType == "application/x-www-form-urlencoded"
            || (mediaType.hasPrefix("application/") && mediaType.hasSuffix("+json"))
        guard accepted else { throw Problem.unsupportedMediaType() }
    }

    /// An account id from a path segment, percent-decoded and checked against the contract's pattern.
    private func accountID(fromPathSegment segment: String) throws -> String {
        guard let id = segment.removingPercentEncoding, LedgerRules.isValidAccountID(id) else {
            throw Problem.invalidAccountID("The account id in the path must match [A-Za-z0-9][A-Za-z0-9._:-]{0,63}.")
        }
        return id
    }

    /// Database failures: unreachable, timed out or overloaded is 503 with Retry-After; anything else is 500.
    /// Nothing was committed in either case (a lost COMMIT is answered 503 too: the retry replays or executes).
    private func problemFor(_ error: PostgresError, trace: RequestTrace) -> Problem {
        LedgerMetrics.databaseError(error)
        let unavailable =
            error.isConnectionError || error.isQueryCanceled || error.isLockTimeout || error.isTransientConflict
            || (error.sqlState?.hasPrefix("53") ?? false)
        if unavailable {
            logger.warning(
                "database unavailable",
                metadata: ["request.id": "\(trace.requestID)", "db.sqlstate": "\(error.sqlState ?? "")", "error": "\(error)"])
            return .databaseUnavailable(retryAfterSeconds: options.retryAfterSeconds)
        }
        logger.error(
            "database error",
            metadata: ["request.id": "\(trace.requestID)", "db.sqlstate": "\(error.sqlState ?? "")", "error": "\(error)"])
        return .internalError
    }
}
