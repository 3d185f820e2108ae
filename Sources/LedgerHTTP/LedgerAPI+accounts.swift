import Hummingbird
import LedgerCore
import LedgerStore

/// Accounts: `GET` and `PUT /v1/accounts/{id}`, and `GET /v1/accounts/{id}/entries`.
extension LedgerAPI {
    /// The account with `ETag: "<version>"`; 304 with the tag and no body when `If-None-Match` matches it.
    func getAccount(_ call: RouteCall) async throws -> Response {
        let id = try accountID(fromPathSegment: call.parameter("id"))
        guard let (json, version) = try await store.accountWithVersion(client: call.client, id: id) else {
            throw Problem.accountNotFound(id)
        }
        let tag = Conditional.entityTag(version: version)
        let noneMatch = call.request.headers[values: .ifNoneMatch].map { Substring($0) }
        if !noneMatch.isEmpty && Conditional.noneMatchMatches(noneMatch, version: version) {
            return Response(status: .notModified, headers: [.eTag: tag])
        }
        return .json(status: 200, body: json, headers: [.eTag: tag])
    }

    /// Naturally idempotent: 201 the first time, 200 when identical, 409 with other settings. The id is checked
    /// before the media type and the body, as the contract orders them.
    func putAccount(_ call: RouteCall) async throws -> Response {
        let id = try accountID(fromPathSegment: call.parameter("id"))
        try checkContentType(call.request)
        let account = try AccountRequest.decode(body: call.body).get()
        switch try await store.putAccount(client: call.client, id: id, request: account) {
        case .created(let json): return .json(status: 201, body: json)
        case .unchanged(let json): return .json(status: 200, body: json)
        case .conflict: throw Problem.accountConflict
        }
    }

    /// One page of entries, newest first; the cursor must be one this service issued for this client's account.
    func getEntries(_ call: RouteCall) async throws -> Response {
        let id = try accountID(fromPathSegment: call.parameter("id"))
        let query = call.request.uri.queryParameters
        let page = try EntriesPage.parse(
            client: call.client, account: id, limit: query["limit"].map(String.init),
            cursor: query["cursor"].map(String.init), key: try await store.cursorKey()
        ).get()
        guard let json = try await store.entries(client: call.client, account: id, page: page) else {
            throw Problem.accountNotFound(id)
        }
        return .json(status: 200, body: json)
    }
}
