import Foundation
import Hummingbird
import LedgerCore
import LedgerStore

/// Credits, debits and transfers: `POST /v1/credits`, `/v1/debits`, `/v1/transfers` and `GET /v1/transfers/{id}`.
extension LedgerAPI {
    /// One credit, debit or transfer, exactly once per Idempotency-Key: the key, then the body, then the store.
    func postTransfer(_ kind: TransferRequest.Kind, _ call: RouteCall) async throws -> Response {
        let (key, version, keyWait) = try keyedRequest(call)
        let transfer = try TransferRequest.decode(kind: kind, body: call.body).get().conditioned(on: version)
        return try answer(
            try await store.postAnswer(client: call.client, key: key, request: transfer, keyWait: keyWait),
            trace: call.trace)
    }

    func getTransfer(_ call: RouteCall) async throws -> Response {
        let id = pathID(call.parameter("id"))
        guard let json = try await store.transfer(client: call.client, id: id) else {
            throw Problem.transferNotFound(id)
        }
        return .json(status: 200, body: json)
    }
}
