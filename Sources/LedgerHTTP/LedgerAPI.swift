import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import NIOHTTP1
import LedgerCore
import LedgerStore
import Logging
import Prometheus

/// The HTTP API of the contract.
///
/// Routing is done here, on the route table of `LedgerAPI+routes.swift`, rather than by a router, so that the
/// contract's precedence holds exactly: 401, then 413, then the route (404/405), then the Idempotency-Key header,
/// then the body, then what the database decides. Handlers live beside their resource: `LedgerAPI+accounts.swift`,
/// `+transfers`, `+batches`, `+health`, `+service`.
public struct LedgerAPI: HTTPResponder {
    public typealias Context = BasicRequestContext

    let store: LedgerStore
    let authenticator: Authenticator
    let options: HTTPOptions
    let logger: Logger
    /// Exported at GET /metrics; nil when metrics were not bootstrapped (they then go nowhere).
    let metricsRegistry: PrometheusCollectorRegistry?
    /// Fails `/health/ready` once shutdown begins.
    let readiness: Readiness
    /// The long-polls of GET /v1/events; run as a service beside the server (`buildApplication`).
    let events: EventWaiters

    public init(
        store: LedgerStore, options: HTTPOptions, metricsRegistry: PrometheusCollectorRegistry? = nil,
        readiness: Readiness = Readiness(), logger: Logger
    ) {
        self.store = store
        self.readiness = readiness
        self.events = EventWaiters(
            store: store, waitersMax: options.eventsWaitersMax, pollInterval: options.eventsPollInterval, logger: logger)
        self.authenticator = Authenticator(store: store, cacheTTL: options.authCacheTTL)
        self.options = options
        self.metricsRegistry = metricsRegistry
        self.logger = logger
        LedgerMetrics.prepare(routes: Self.routes.map { ($0.method.rawValue, $0.pattern) })
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
        } catch let error as LedgerStoreError {
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
        if let applied = trace.preferenceApplied { response.headers[.preferenceAppliedField] = applied }
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

    /// The contract's precedence: 401, then 413 (the route's body limit), then 404/405 with `Allow`; the handler
    /// then checks the Idempotency-Key header before it reads the body.
    private func handle(_ request: Request, trace: RequestTrace) async throws -> Response {
        let path = request.uri.path
        let match = RouteMatch.find(path, in: Self.routes)
        let route = match?.route(for: request.method)
        trace.route = match?.label ?? "unmatched"
        var client = ""
        if path == "/v1" || path.hasPrefix("/v1/") {
            guard let token = Authenticator.bearerToken(request.headers[.authorization]) else {
                throw Problem.unauthorized("Send Authorization: Bearer <token>.")
            }
            guard let known = try await authenticator.client(forToken: token) else {
                throw Problem.unauthorized("The bearer token is not known.")
            }
            client = known
            trace.client = known
        }
        // An unknown path or method gets the standard limit: its body is read only to answer 413 before 404/405.
        let body = try await collectBody(request, limitBytes: (route?.bodyLimit ?? .standard).bytes(options))
        guard let match else { throw Problem.notFound() }
        guard let route else { throw Problem.methodNotAllowed(allow: match.allow) }
        let call = RouteCall(request: request, parameters: match.parameters, client: client, body: body, trace: trace)
        return try await route.handler(self, call)
    }

    // MARK: Request parts

    /// The body, at most `limit` bytes; a declared or actual larger body is 413.
    func collectBody(_ request: Request, limitBytes limit: Int) async throws -> [UInt8] {
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit {
            throw Problem.bodyTooLarge(limitBytes: limit)
        }
        // Only chunked framing is understood: a body in any other transfer-coding (gzip, ...) cannot be read.
        for coding in request.headers[values: .transferEncoding].flatMap({ $0.split(separator: ",") })
        where coding.trimmingOWS.lowercased() != "chunked" {
            throw Problem.transferCodingNotImplemented
        }
        var bytes: [UInt8] = []
        do {
            for try await buffer in request.body {
                guard bytes.count + buffer.readableBytes <= limit else { throw Problem.bodyTooLarge(limitBytes: limit) }
                bytes.append(contentsOf: buffer.readableBytesView)
            }
        } catch is HTTPParserError {
            // Malformed chunked framing, or a body cut short: the client's error, not ours (the parser closes the
            // connection after this answer).
            throw Problem.malformedBody
        }
        return bytes
    }

    /// Bodies are JSON. A declared media type of another format (text/plain, multipart/form-data, XML, ...) is 415.
    /// Accepted: no Content-Type, `application/json`, any `application/*+json`, and
    /// `application/x-www-form-urlencoded`, which is what `curl -d` sends by default; the body must parse as JSON
    /// in every case, or it is 400 invalid-json.
    func checkContentType(_ request: Request) throws {
        guard let contentType = request.headers[.contentType] else { return }
        let mediaType = contentType.split(separator: ";", maxSplits: 1).first
            .map { $0.trimmingOWS.lowercased() } ?? ""
        let accepted =
            mediaType == "application/json" || mediaType == "application/x-www-form-urlencoded"
            || (mediaType.hasPrefix("application/") && mediaType.hasSuffix("+json"))
        guard accepted else { throw Problem.unsupportedMediaType() }
    }

    /// An account id from a path segment, percent-decoded and checked against the contract's pattern.
    func accountID(fromPathSegment segment: String) throws -> String {
        guard let id = segment.removingPercentEncoding, LedgerRules.isValidAccountID(id) else {
            throw Problem.invalidAccountID("The account id in the path must match [A-Za-z0-9][A-Za-z0-9._:-]{0,63}.")
        }
        return id
    }

    /// Store failures: unavailable (unreachable, timed out, overloaded) or conflicts retried to exhaustion are 503
    /// with Retry-After; anything else is 500. Nothing was committed in either case (a lost COMMIT is unavailable
    /// too: the retry replays or executes). The SQLSTATE goes to the log and the metrics, never to the client.
    private func problemFor(_ error: LedgerStoreError, trace: RequestTrace) -> Problem {
        LedgerMetrics.databaseError(error)
        let metadata: Logger.Metadata = [
            "request.id": "\(trace.requestID)", "db.sqlstate": "\(error.sqlState ?? "")", "error": "\(error)",
        ]
        switch error.code {
        case .unavailable, .conflictExhausted:
            logger.warning("database unavailable", metadata: metadata)
            return .databaseUnavailable(retryAfterSeconds: error.retryAfterSeconds ?? options.retryAfterSeconds)
        default:
            logger.error("database error", metadata: metadata)
            return .internalError
        }
    }
}
