import Foundation
import Hummingbird
import LedgerCore
import LedgerStore

/// Holds (two-phase transfers): `POST /v1/holds`, `POST /v1/holds/{id}/capture`, `POST /v1/holds/{id}/void`,
/// `GET /v1/holds/{id}` and `GET /v1/accounts/{id}/holds`.
extension LedgerAPI {
    func postHold(_ call: RouteCall) async throws -> Response {
        let (key, version, keyWait) = try keyedRequest(call)
        let hold = try HoldRequest.decode(body: call.body).get().conditioned(on: version)
        let outcome = try await store.postHoldAnswer(client: call.client, key: key, request: hold, keyWait: keyWait)
        LedgerMetrics.holdOutcome(outcome.outcome, action: "placed")
        return try answer(outcome, trace: call.trace)
    }

    func captureHold(_ call: RouteCall) async throws -> Response {
        let (key, _, keyWait) = try keyedRequest(call, ifMatch: false)
        let id = pathID(call.parameter("id"))
        let capture = try AmendRequest.decode(path: "/v1/holds/\(id)/capture", body: call.body).get()
        let outcome = try await store.captureAnswer(
            client: call.client, key: key, hold: id, request: capture, keyWait: keyWait)
        LedgerMetrics.holdOutcome(outcome.outcome, action: "captured")
        return try answer(outcome, trace: call.trace)
    }

    func voidHold(_ call: RouteCall) async throws -> Response {
        let (key, _, keyWait) = try keyedRequest(call, ifMatch: false)
        let id = pathID(call.parameter("id"))
        let fingerprint = try AmendRequest.decodeVoid(path: "/v1/holds/\(id)/void", body: call.body).get()
        let outcome = try await store.voidAnswer(
            client: call.client, key: key, hold: id, fingerprintText: fingerprint, keyWait: keyWait)
        LedgerMetrics.holdOutcome(outcome.outcome, action: "voided")
        return try answer(outcome, trace: call.trace)
    }

    func getHold(_ call: RouteCall) async throws -> Response {
        let id = pathID(call.parameter("id"))
        guard let json = try await store.hold(client: call.client, id: id) else { throw Problem.holdNotFound(id) }
        return .json(status: 200, body: json)
    }

    /// The holds whose payer is the account, newest first, paged like entries (a cursor of its own scope).
    func getAccountHolds(_ call: RouteCall) async throws -> Response {
        let id = try accountID(fromPathSegment: call.parameter("id"))
        let query = call.request.uri.queryParameters
        let status = try HoldStatus.parse(query["status"].map(String.init)).get()
        let page = try EntriesPage.parse(
            client: call.client, account: LedgerStore.holdsCursorScope(id), limit: query["limit"].map(String.init),
            cursor: query["cursor"].map(String.init), key: try await store.cursorKey()
        ).get()
        guard let json = try await store.holds(client: call.client, account: id, status: status, page: page) else {
            throw Problem.accountNotFound(id)
        }
        return .json(status: 200, body: json)
    }

    /// Reversals (refunds): `POST /v1/transfers/{id}/reversals`.
    func postReversal(_ call: RouteCall) async throws -> Response {
        let (key, _, keyWait) = try keyedRequest(call, ifMatch: false)
        let id = pathID(call.parameter("id"))
        let reversal = try AmendRequest.decode(path: "/v1/transfers/\(id)/reversals", body: call.body).get()
        let outcome = try await store.reverseAnswer(
            client: call.client, key: key, transfer: id, request: reversal, keyWait: keyWait)
        LedgerMetrics.reversalOutcome(outcome.outcome)
        return try answer(outcome, trace: call.trace)
    }

    /// A hold or transfer id from the path, percent-decoded. Any text: the database answers 404 for one it did not
    /// issue, malformed ones included (and stores that answer for a capture, void or reversal).
    func pathID(_ segment: String) -> String { segment.removingPercentEncoding ?? segment }
}
