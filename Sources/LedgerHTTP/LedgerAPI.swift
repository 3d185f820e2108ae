import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import LedgerCore
import LedgerStore
import Logging
import PostgresClient

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

    public init(store: LedgerStore, options: HTTPOptions, logger: Logger) {
        self.store = store
        self.authenticator = Authenticator(store: store, cacheTTL: options.authCacheTTL)
        self.options = options
        self.logger = logger
    }

    /// The routes, matched on path segments after the auth and size checks.
    enum Route: Equatable {
        case health
        case account(String)
        case entries(String)
        case post(TransferRequest.Kind)
        case transfer(String)

        var methods: [HTTPRequest.Method] {
            switch self {
            case .health, .entries, .transfer: return [.get]
            case .account: return [.get, .put]
            case .post: return [.post]
            }
        }

        /// nil for an unknown path. Segments are still percent-encoded.
        static func match(_ path: String) -> Route? {
            let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
            switch segments.count {
            case 1 where segments[0] == "health": return .health
            case 2 where segments[0] == "v1":
                switch segments[1] {
                case "credits": return .post(.credit)
                case "debits": return .post(.debit)
                case "transfers": return .post(.transfer)
                default: return nil
                }
            case 3 where segments[0] == "v1" && segments[1] == "accounts": return .account(segments[2])
            case 3 where segments[0] == "v1" && segments[1] == "transfers": return .transfer(segments[2])
            case 4 where segments[0] == "v1" && segments[1] == "accounts" && segments[3] == "entries":
                return .entries(segments[2])
            default: return nil
            }
        }
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        do {
            return try await handle(request)
        } catch let problem as Problem {
            return .problem(problem)
        } catch let error as PostgresError {
            return .problem(problemFor(error))
        } catch {
            logger.error("unexpected error", metadata: ["error.type": "\(type(of: error))"])
            return .problem(.internalError)
        }
    }

    private func handle(_ request: Request) async throws -> Response {
        let path = request.uri.path
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
        }
        let body = try await collectBody(request)
        guard let route = Route.match(path) else { throw Problem.notFound() }
        guard route.methods.contains(request.method) else {
            throw Problem.methodNotAllowed(allow: route.methods.map(\.rawValue))
        }
        switch route {
        case .health:
            return try await health()
        case .post(let kind):
            return try await post(kind: kind, client: client, request: request, body: body)
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
                account: id, limit: query["limit"].map(String.init), cursor: query["cursor"].map(String.init)
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

    private func post(kind: TransferRequest.Kind, client: String, request: Request, body: [UInt8]) async throws
        -> Response
    {
        let key = try IdempotencyKey.parse(headerValues: request.headers[values: .idempotencyKey]).get()
        try checkContentType(request)
        let transfer = try TransferRequest.decode(kind: kind, body: body).get()
        switch try await store.post(client: client, key: key, request: transfer) {
        case .executed(let status, let json):
            return .json(status: status, body: json, headers: [.idempotentReplayed: "false"])
        case .replayed(let status, let json):
            return .json(status: status, body: json, headers: [.idempotentReplayed: "true"])
        case .reused:
            throw Problem.idempotencyKeyReused
        case .inProgress:
            throw Problem.idempotencyKeyInProgress(retryAfterSeconds: options.retryAfterSeconds)
        }
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

    /// The body, at most `bodyBytesMax` bytes; a declared or actual larger body is 413.
    private func collectBody(_ request: Request) async throws -> [UInt8] {
        let limit = options.bodyBytesMax
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
            .map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
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
    private func problemFor(_ error: PostgresError) -> Problem {
        let unavailable =
            error.isConnectionError || error.isQueryCanceled || error.isLockTimeout || error.isTransientConflict
            || (error.sqlState?.hasPrefix("53") ?? false)
        if unavailable {
            logger.warning(
                "database unavailable", metadata: ["db.sqlstate": "\(error.sqlState ?? "")", "error": "\(error)"])
            return .databaseUnavailable(retryAfterSeconds: options.retryAfterSeconds)
        }
        logger.error("database error", metadata: ["db.sqlstate": "\(error.sqlState ?? "")", "error": "\(error)"])
        return .internalError
    }
}
