import Foundation
import Hummingbird
import LedgerCore
import LedgerStore

/// `GET /v1/idempotency-keys/{key}`: what one of the client's keys is now, so a client can tell whether a retry
/// will replay, wait, or execute afresh.
extension LedgerAPI {
    func getIdempotencyKey(_ call: RouteCall) async throws -> Response {
        let key = try idempotencyKey(fromPathSegment: call.parameter("key"))
        guard let (state, body) = try await store.idempotencyKeyState(client: call.client, key: key) else {
            LedgerMetrics.idempotencyKeyLookup(state: "not_found")
            throw Problem.idempotencyKeyNotFound
        }
        LedgerMetrics.idempotencyKeyLookup(state: state)
        return .json(status: 200, body: body)
    }

    /// The key of the path: percent-encoded, as unquoted (what an Idempotency-Key header means after unquoting),
    /// checked as that header is: 1-255 printable ASCII characters.
    func idempotencyKey(fromPathSegment segment: String) throws -> String {
        guard let key = segment.removingPercentEncoding else {
            throw Problem.idempotencyKeyInvalid("The key in the path is not valid percent-encoding.")
        }
        guard !key.isEmpty, key.utf8.count <= IdempotencyKey.lengthMax,
            key.utf8.allSatisfy({ $0 >= 0x20 && $0 <= 0x7E })
        else {
            throw Problem.idempotencyKeyInvalid(
                "The key in the path must be 1-\(IdempotencyKey.lengthMax) printable ASCII characters.")
        }
        return key
    }
}
